//! Markdown tables for the comparison examples: a label column, then one column per
//! allocator, numbers right-aligned.
//!
//! Included with `#[path = "common/table.rs"] mod table;`.

/// Column widths of a table.
pub struct Table {
    /// Width of the label column.
    pub label: usize,
    /// Width of each allocator's column.
    pub cell: usize,
}

impl Table {
    /// One row: `label`, then `cells`.
    pub fn row(&self, label: &str, cells: impl IntoIterator<Item = String>) {
        let (lw, cw) = (self.label, self.cell);
        print!("| {label:<lw$} |");
        for c in cells {
            print!(" {c:>cw$} |");
        }
        println!();
    }

    /// The line under the header: labels left, numbers right-aligned.
    pub fn rule(&self, columns: usize) {
        print!("|{}|", "-".repeat(self.label + 2));
        for _ in 0..columns {
            print!("{}:|", "-".repeat(self.cell + 1));
        }
        println!();
    }
}
