//! What a start-up child does (`examples/startup.rs`): a few allocations of the kinds a
//! small command-line tool makes, checked, then exit. Included by the four
//! `startup_child_*` examples, each of which has one allocator and links no other.

use std::collections::HashMap;

pub fn run() -> ! {
    let s = String::from("start-up") + " cost";
    let v: Vec<Box<u64>> = (0..100).map(Box::new).collect();
    let m: HashMap<u64, String> = (0..100).map(|i| (i, i.to_string())).collect();
    let ok = s.len() == 13 && v.iter().map(|b| **b).sum::<u64>() == 4950 && m[&42] == "42";
    std::process::exit(if ok { 0 } else { 1 });
}
