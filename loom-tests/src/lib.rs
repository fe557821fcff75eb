//! loom models of spanheap's concurrent core. They only do something under
//! `RUSTFLAGS="--cfg spanheap_loom" cargo test -p loom-tests --release`; see docs/loom.md.
