//! FNV-1a 64: a fast, stable hash for fingerprints that must not change between
//! runs or machines (event ids in the dedup ring, training data, model ids).

/// An FNV-1a 64 hasher; feed it with [`Fnv::write`], read `.0`.
#[derive(Debug, Clone, Copy)]
pub struct Fnv(pub u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    pub fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= *b as u64;
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }

    pub fn hex(&self) -> String {
        format!("{:016x}", self.0)
    }
}
