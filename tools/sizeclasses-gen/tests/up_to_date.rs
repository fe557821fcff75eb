//! The checked-in `src/sizeclasses.rs` must be exactly what the generator
//! prints.

use std::path::Path;

#[test]
fn generated_file_is_up_to_date() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(sizeclasses_gen::OUTPUT_PATH);
    let want = sizeclasses_gen::generate();
    let have = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    if have != want {
        let first_diff = have
            .lines()
            .zip(want.lines())
            .position(|(a, b)| a != b)
            .map_or_else(
                || "lengths differ".to_string(),
                |n| format!("first difference on line {}", n + 1),
            );
        panic!(
            "{} is out of date ({first_diff}); regenerate it from the workspace root with:\n    {}",
            sizeclasses_gen::OUTPUT_PATH,
            sizeclasses_gen::REGENERATE_COMMAND
        );
    }
}
