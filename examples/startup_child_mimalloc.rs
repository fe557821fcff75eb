//! A start-up child of `examples/startup.rs` with mimalloc as its only allocator.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[path = "common/startup_work.rs"]
mod work;

fn main() {
    work::run();
}
