//! The text outputs: collapsed stacks (the input of flame-graph tools) and a top-N
//! table of functions (as `go tool pprof -top`).

use std::collections::HashMap;
use std::io::{self, Write};

use super::{SampleType, Stack, Symbolized};

pub(super) fn type_name(t: SampleType) -> &'static str {
    match t {
        SampleType::AllocObjects => "alloc_objects",
        SampleType::AllocSpace => "alloc_space",
        SampleType::InuseObjects => "inuse_objects",
        SampleType::InuseSpace => "inuse_space",
    }
}

pub(super) fn is_bytes(t: SampleType) -> bool {
    matches!(t, SampleType::AllocSpace | SampleType::InuseSpace)
}

/// `v` as pprof prints it: bytes in B/kB/MB (binary units), counts plain.
pub(super) fn human(v: u64, bytes: bool) -> String {
    if !bytes {
        return v.to_string();
    }
    const UNITS: [(&str, u64); 3] = [("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];
    for (u, n) in UNITS {
        if v >= n {
            return format!("{:.2}{u}", v as f64 / n as f64);
        }
    }
    format!("{v}B")
}

impl Symbolized {
    /// The functions of a stack as the outputs for flame graphs name them, root first:
    /// `?` for one without a name, and `[allocator]` alone for a stack that has no frame
    /// left once the allocator's are trimmed.
    pub(super) fn root_to_leaf<'a>(&'a self, s: &'a Stack) -> Vec<&'a str> {
        let mut names: Vec<&str> = self
            .functions(s)
            .map(|n| if n.is_empty() { "?" } else { n })
            .collect();
        if names.is_empty() {
            names.push("[allocator]");
        }
        names.reverse();
        names
    }

    /// Writes one line per stack with a non-zero value of `t`: the functions from the
    /// root to the leaf separated by `;`, a space and the value (Brendan Gregg's
    /// collapsed format, as `inferno-collapse-*` writes it).
    pub fn write_collapsed(&self, w: &mut dyn Write, t: SampleType) -> io::Result<()> {
        let mut lines: HashMap<String, u64> = HashMap::new();
        for s in &self.stacks {
            let v = s.values.get(t);
            if v == 0 {
                continue;
            }
            let key = self.root_to_leaf(s).join(";").replace([' ', '\n'], "_");
            *lines.entry(key).or_default() += v;
        }
        let mut lines: Vec<(String, u64)> = lines.into_iter().collect();
        lines.sort();
        for (k, v) in lines {
            writeln!(w, "{k} {v}")?;
        }
        Ok(())
    }

    /// Writes the `n` functions with the most of `t` in their own frame (flat: the leaf
    /// function of the stack, after the allocator's frames are trimmed) and the total
    /// under them (cum: every stack the function is in), as `go tool pprof -top`.
    pub fn write_top(&self, w: &mut dyn Write, t: SampleType, n: usize) -> io::Result<()> {
        let mut flat: HashMap<&str, u64> = HashMap::new();
        let mut cum: HashMap<&str, u64> = HashMap::new();
        // The fewest frames between the function and a leaf: among equal flat and cum
        // values, the functions nearer the allocation come first.
        let mut depth: HashMap<&str, usize> = HashMap::new();
        let mut total = 0u64;
        for s in &self.stacks {
            let v = s.values.get(t);
            if v == 0 {
                continue;
            }
            total += v;
            let mut seen: Vec<&str> = Vec::new();
            for (i, f) in self.functions(s).enumerate() {
                if i == 0 {
                    *flat.entry(f).or_default() += v;
                }
                let d = depth.entry(f).or_insert(i);
                *d = (*d).min(i);
                if !seen.contains(&f) {
                    seen.push(f);
                    *cum.entry(f).or_default() += v;
                }
            }
            if s.locations.is_empty() {
                *flat.entry("[allocator]").or_default() += v;
                *cum.entry("[allocator]").or_default() += v;
            }
        }
        let mut rows: Vec<(&str, u64, u64)> = cum
            .iter()
            .map(|(&f, &c)| (f, flat.get(f).copied().unwrap_or(0), c))
            .collect();
        let d = |f: &str| depth.get(f).copied().unwrap_or(0);
        rows.sort_by(|a, b| {
            b.1.cmp(&a.1)
                .then(b.2.cmp(&a.2))
                .then(d(a.0).cmp(&d(b.0)))
                .then(a.0.cmp(b.0))
        });
        let b = is_bytes(t);
        writeln!(
            w,
            "Showing top {} of {} functions, {} (total {}, sampled every {} bytes on average)",
            n.min(rows.len()),
            rows.len(),
            type_name(t),
            human(total, b),
            self.rate
        )?;
        writeln!(
            w,
            "{:>12} {:>7} {:>7} {:>12} {:>7}  function",
            "flat", "flat%", "sum%", "cum", "cum%"
        )?;
        let pct = |v: u64| {
            if total == 0 {
                0.0
            } else {
                v as f64 * 100.0 / total as f64
            }
        };
        let mut sum = 0u64;
        for &(f, fl, c) in rows.iter().take(n) {
            sum += fl;
            writeln!(
                w,
                "{:>12} {:>6.2}% {:>6.2}% {:>12} {:>6.2}%  {f}",
                human(fl, b),
                pct(fl),
                pct(sum),
                human(c, b),
                pct(c)
            )?;
        }
        Ok(())
    }
}
