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
