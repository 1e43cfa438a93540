//! Checking a bearer token, so that nobody without a valid one can slow the service down:
//!
//! - a string without the minted shape ([`has_token_shape`]) is refused before any I/O;
//! - the rest are looked up on the store's token connections (`Store::check_token`), a small
//!   pool of their own: a flood of made-up tokens queues there, never on the connections that
//!   heartbeats and event ingest use;
//! - verdicts are cached for [`CACHE_TTL`], valid and rejected ones apart, each bounded: a flood
//!   fills the rejected side and pushes out its oldest entries, never a valid token;
//! - a valid verdict past its cache period is still used, for [`STALE_VALID`], when the lookup
//!   fails (its pool is busy with a flood, or the database is away): a worker's heartbeat is
//!   not refused because strangers are knocking.
//!
//! A revocation takes effect at once on the coordinator that revoked the token (it forgets every
//! verdict), within [`CACHE_TTL`] on the others, and within [`STALE_VALID`] while their lookups
//! fail.

use super::{has_token_shape, secret_sha256, Caller, Role};
use crate::metrics;
use crate::store::{Store, StoreError, TokenCheck};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a verification result is reused before the database is asked again.
pub const CACHE_TTL: Duration = Duration::from_secs(5);

/// How long a valid verdict serves while the lookup fails.
pub const STALE_VALID: Duration = Duration::from_secs(60);

/// At most this many valid verdicts are cached (the oldest goes first).
const VALID_MAX: usize = 10_000;

/// At most this many rejected verdicts are cached (the oldest goes first).
const REJECTED_MAX: usize = 10_000;

/// The outcome of checking one token.
#[derive(Debug, Clone)]
pub enum Verdict {
    Valid(Caller),
    Revoked { name: String },
    Unknown,
}

#[derive(Clone)]
struct Entry {
    verdict: Verdict,
    at: Instant,
}

/// Cached verdicts by token digest: valid ones and rejected ones apart, each bounded.
#[derive(Default)]
struct Cache {
    valid: HashMap<[u8; 32], Entry>,
    rejected: HashMap<[u8; 32], Entry>,
    /// The rejected digests in the order they were cached (the front goes first).
    rejected_order: VecDeque<[u8; 32]>,
}

impl Cache {
    /// A verdict younger than `ttl`.
    fn fresh(&self, hash: &[u8; 32], ttl: Duration) -> Option<Verdict> {
        self.valid
            .get(hash)
            .or_else(|| self.rejected.get(hash))
            .filter(|e| e.at.elapsed() < ttl)
            .map(|e| e.verdict.clone())
    }

    /// A valid verdict younger than `max`, whatever the cache period.
    fn stale_valid(&self, hash: &[u8; 32], max: Duration) -> Option<Verdict> {
        self.valid
            .get(hash)
            .filter(|e| e.at.elapsed() < max)
            .map(|e| e.verdict.clone())
    }

    fn put(&mut self, hash: [u8; 32], verdict: Verdict, at: Instant) {
        let entry = Entry { verdict, at };
        if matches!(entry.verdict, Verdict::Valid(_)) {
            self.rejected.remove(&hash);
            self.valid.insert(hash, entry);
            if self.valid.len() > VALID_MAX {
                let oldest = self.valid.iter().min_by_key(|(_, e)| e.at).map(|(k, _)| *k);
                if let Some(k) = oldest {
                    self.valid.remove(&k);
                }
            }
            return;
        }
        self.valid.remove(&hash);
        if self.rejected.insert(hash, entry).is_none() {
            self.rejected_order.push_back(hash);
        }
        while self.rejected.len() > REJECTED_MAX {
            match self.rejected_order.pop_front() {
                Some(k) => {
                    self.rejected.remove(&k);
                }
                None => break,
            }
        }
    }
}

/// Verifies tokens against PostgreSQL, with the cache above.
#[derive(Clone)]
pub struct Verifier {
    store: Store,
    cache: Arc<Mutex<Cache>>,
    ttl: Duration,
}

fn count(answer: &str) {
    metrics::global()
        .token_checks
        .with_label_values(&[answer])
        .inc();
}

impl Verifier {
    pub fn new(store: Store) -> Verifier {
        Verifier {
            store,
            cache: Arc::new(Mutex::new(Cache::default())),
            ttl: CACHE_TTL,
        }
    }

    /// The verdict for `token`: Unknown at once for a string of the wrong shape; from the cache
    /// if fresh; else from the database (which also records `last_used_at`); a valid verdict up
    /// to [`STALE_VALID`] old when the database cannot answer.
    pub async fn verify(&self, token: &str) -> Result<Verdict, StoreError> {
        if !has_token_shape(token) {
            count("shape");
            return Ok(Verdict::Unknown);
        }
        let hash = secret_sha256(token);
        let cached =
            |f: &dyn Fn(&Cache) -> Option<Verdict>| self.cache.lock().ok().and_then(|c| f(&c));
        if let Some(v) = cached(&|c| c.fresh(&hash, self.ttl)) {
            count("cache");
            return Ok(v);
        }
        let verdict = match self.store.check_token(&hash).await {
            Ok(check) => verdict_of(check)?,
            Err(e) => {
                if let Some(v) = cached(&|c| c.stale_valid(&hash, STALE_VALID)) {
                    count("stale");
                    tracing::debug!(error = %e, "token lookup failed; using its verdict from the cache");
                    return Ok(v);
                }
                count("failed");
                return Err(e);
            }
        };
        count("database");
        if let Ok(mut cache) = self.cache.lock() {
            cache.put(hash, verdict.clone(), Instant::now());
        }
        Ok(verdict)
    }

    /// Forgets every cached verdict (after a revocation on this coordinator, so that it takes
    /// effect here at once).
    pub fn forget_all(&self) {
        if let Ok(mut cache) = self.cache.lock() {
            *cache = Cache::default();
        }
    }
}

fn verdict_of(check: TokenCheck) -> Result<Verdict, StoreError> {
    Ok(match check {
        TokenCheck::Valid(t) => match Role::parse(&t.role) {
            Some(role) => Verdict::Valid(Caller {
                token_id: t.id,
                name: t.name,
                role,
                host: t.host,
                principal: t.principal,
                team: t.team,
            }),
            None => {
                return Err(StoreError::Corrupt(format!(
                    "token {} has an unknown role {:?}",
                    t.id, t.role
                )))
            }
        },
        TokenCheck::Revoked(t) => Verdict::Revoked { name: t.name },
        TokenCheck::Unknown => Verdict::Unknown,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid(n: u8) -> Verdict {
        Verdict::Valid(Caller {
            token_id: uuid::Uuid::nil(),
            name: format!("t{n}"),
            role: Role::Worker,
            host: None,
            principal: format!("t{n}"),
            team: "default".into(),
        })
    }

    fn key(n: u32) -> [u8; 32] {
        let mut k = [0u8; 32];
        k[..4].copy_from_slice(&n.to_le_bytes());
        k
    }

    #[test]
    fn a_flood_of_rejected_tokens_pushes_out_only_the_oldest_rejected_ones() {
        let mut c = Cache::default();
        let now = Instant::now();
        let ttl = Duration::from_secs(5);
        c.put(key(0), valid(0), now);
        for n in 1..=(REJECTED_MAX as u32 + 500) {
            c.put(key(n), Verdict::Unknown, now);
        }
        assert_eq!(c.rejected.len(), REJECTED_MAX);
        // The valid token stays; the first rejected ones went, the newest stay.
        assert!(matches!(c.fresh(&key(0), ttl), Some(Verdict::Valid(_))));
        assert!(c.fresh(&key(1), ttl).is_none());
        assert!(matches!(
            c.fresh(&key(REJECTED_MAX as u32 + 500), ttl),
            Some(Verdict::Unknown)
        ));
    }

    #[test]
    fn a_valid_verdict_serves_past_its_period_only_when_asked_for_a_stale_one() {
        let mut c = Cache::default();
        let then = Instant::now() - Duration::from_secs(10);
        c.put(key(1), valid(1), then);
        assert!(c.fresh(&key(1), Duration::from_secs(5)).is_none());
        assert!(c.stale_valid(&key(1), STALE_VALID).is_some());
        assert!(c.stale_valid(&key(1), Duration::from_secs(1)).is_none());
        // A revocation seen later replaces it.
        c.put(
            key(1),
            Verdict::Revoked { name: "t1".into() },
            Instant::now(),
        );
        assert!(c.stale_valid(&key(1), STALE_VALID).is_none());
        // The valid side is bounded too, oldest first.
        let start = Instant::now();
        for n in 0..=(VALID_MAX as u32) {
            c.put(
                key(n + 10),
                valid(0),
                start + Duration::from_millis(u64::from(n)),
            );
        }
        assert_eq!(c.valid.len(), VALID_MAX);
        assert!(!c.valid.contains_key(&key(10)));
    }
}
