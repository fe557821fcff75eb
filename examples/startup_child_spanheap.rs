//! A start-up child of `examples/startup.rs` with spanheap as its only allocator.

#[global_allocator]
static GLOBAL: spanheap::SpanHeap = spanheap::SpanHeap;

#[path = "common/startup_work.rs"]
mod work;

fn main() {
    work::run();
}
