//! splitmix64, shared by the examples that need a small deterministic generator.
//! Included with `#[path = "common/rng.rs"] mod rng;`.

/// splitmix64.
pub struct Rng(pub u64);

impl Rng {
    /// A number in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) % n as u64) as usize
    }

    /// A size from 8 B to 128 KiB with a power law: a leading range `[8 << k,
    /// 16 << k)` with probability ~2^-(k+1), uniform inside it (the benchmark suite's
    /// `churn-10k` sizes).
    #[allow(dead_code)] // not every example draws sizes
    pub fn power_law_size(&mut self) -> usize {
        let k = (self.below(1 << 14) | (1 << 13)).trailing_zeros() as usize;
        let base = 8usize << k;
        base + self.below(base)
    }
}
