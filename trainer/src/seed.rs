//! Seeds derived from small integers (a run's seed, an epoch, a position, a rank).

/// splitmix64: one step of Steele et al.'s generator, which turns nearby inputs into unrelated
/// outputs (so seed 1 and seed 2 do not give correlated streams).
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
