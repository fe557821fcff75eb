//! Prints spanheap's `src/sizeclasses.rs` to stdout. From the workspace root:
//!
//! ```text
//! cargo run -p sizeclasses-gen > src/sizeclasses.rs
//! ```
//!
//! A one-line summary of the class table goes to stderr.

use std::io::Write as _;

fn main() {
    let (text, s) = sizeclasses_gen::generate_with_stats();
    std::io::stdout()
        .lock()
        .write_all(text.as_bytes())
        .expect("writing to stdout");
    eprintln!(
        "sizeclasses-gen: {} classes (class 0 included); largest tail waste {:.2}% (class {}); \
         largest max waste {:.2}% (class {}), {:.2}% from {} bytes on",
        s.num_classes,
        100.0 * s.worst_tail,
        s.worst_tail_class,
        100.0 * s.worst_max,
        s.worst_max_class,
        100.0 * s.worst_max_large,
        sizeclasses_gen::MAX_WASTE_FROM_SIZE,
    );
}
