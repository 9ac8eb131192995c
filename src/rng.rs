//! A deterministic, dependency-free pseudo-random stream (xorshift64) for
//! synthetic data: the demo's crowd, the load generator, benches and tests.

#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A zero seed would stay zero forever; it is replaced by 1.
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}
