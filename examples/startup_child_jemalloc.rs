//! A start-up child of `examples/startup.rs` with jemalloc as its only allocator.

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[path = "common/startup_work.rs"]
mod work;

fn main() {
    work::run();
}
