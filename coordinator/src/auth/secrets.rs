//! The secrets the coordinator makes: bearer tokens (shown once, to the admin who creates one)
//! and daemon instance secrets (handed to the daemon instance that takes a worker, see
//! `store::instances`). PostgreSQL keeps only each one's SHA-256.

use super::TOKEN_PREFIX;
use base64::Engine;
use sha2::{Digest, Sha256};

/// 256 random bits from the operating system's generator, base64url without padding.
fn random_text() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

/// Characters of a token after its prefix: 256 bits in base64url without padding.
const TOKEN_BODY_LEN: usize = 43;

/// Whether `s` could be a token this coordinator made: [`TOKEN_PREFIX`] and 43 base64url
/// characters. Anything else is refused without a database lookup.
pub fn has_token_shape(s: &str) -> bool {
    s.strip_prefix(TOKEN_PREFIX).is_some_and(|body| {
        body.len() == TOKEN_BODY_LEN
            && body
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    })
}

/// A new random token: [`TOKEN_PREFIX`] and 256 random bits.
pub fn new_token() -> Result<String, getrandom::Error> {
    Ok(format!("{TOKEN_PREFIX}{}", random_text()?))
}

/// A new daemon instance secret (256 random bits; no token prefix: it is not a token).
pub fn new_instance_secret() -> Result<String, getrandom::Error> {
    random_text()
}

/// What the database stores for a token or an instance secret.
pub fn secret_sha256(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_minted_shape_is_a_token() {
        let t = new_token().expect("random");
        assert!(has_token_shape(&t));
        for bad in [
            "",
            "segtrain_",
            "segtrain_not-a-real-token",
            &format!("{t}x"),
            &t[..t.len() - 1],
            &t.replace("segtrain_", "segtrainx"),
            &format!("segtrain_{}", "é".repeat(21)),
            &format!("segtrain_{}", "+".repeat(43)),
        ] {
            assert!(!has_token_shape(bad), "{bad:?}");
        }
        assert!(!has_token_shape(&new_instance_secret().expect("random")));
    }
}
