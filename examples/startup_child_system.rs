//! A start-up child of `examples/startup.rs` with system as its only allocator.

// The system allocator: Rust's default, no `#[global_allocator]`.

#[path = "common/startup_work.rs"]
mod work;

fn main() {
    work::run();
}
