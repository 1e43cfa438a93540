//! Which daemon instance holds a worker, and what a request must show to act for it.
//!
//! A worker row (one host and GPU) is held by one daemon instance at a time. When an instance
//! takes the row, the coordinator hands it a secret (only its SHA-256 is stored, in
//! `workers.instance_secret_sha256`), and every later request of that instance carries it.
//! Naming an instance id proves nothing: ids appear in logs, errors and lists. A daemon restarted
//! on the same work dir succeeds its predecessor by showing the predecessor's secret, which that
//! daemon recorded in the work dir (readable by the daemon's user only).
//!
//! A worker token may be bound to a host (`tokens.host`): then it acts only for workers of that
//! host (Register checks the request's host, every other call the worker row's).

use super::{Store, StoreError};
use chrono::{DateTime, Utc};
use uuid::Uuid;

/// What a worker request shows: the instance it comes from, the SHA-256 of the secret it
/// presents, and the host its token is bound to (`None`: an unbound or admin token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceProof {
    pub instance: Uuid,
    pub secret_sha256: [u8; 32],
    pub bound_host: Option<String>,
}

/// Who holds a worker row, as stored.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub(super) struct Holder {
    pub host: String,
    pub gpu_index: i32,
    /// `None`: no instance has registered for the row yet (register again).
    pub instance_id: Option<Uuid>,
    pub instance_since: Option<DateTime<Utc>>,
    pub instance_secret_sha256: Option<Vec<u8>>,
}

/// The condition "the request's proof holds this row" in a `workers` statement that binds the
/// instance id as `$3`, the secret's SHA-256 as `$5` and the bound host (or NULL) as `$6`.
pub(super) const PROVEN: &str = "instance_id = $3 AND instance_secret_sha256 = $5 \
     AND ($6::text IS NULL OR host = $6)";

/// The columns of [`Holder`] in a `workers` query.
pub(super) const HOLDER_COLUMNS: &str =
    "host, gpu_index, instance_id, instance_since, instance_secret_sha256";

/// Whether a request showing `proof` may act for worker `id`, held by `holder`.
///
/// - NotFound: an unknown worker, or a row no instance holds yet (register again);
/// - HostBound: the token is bound to another host;
/// - InstanceSecret: the holder's id without its secret;
/// - Superseded: another instance holds it.
pub(super) fn instance_verdict(
    id: Uuid,
    proof: &InstanceProof,
    holder: Option<Holder>,
) -> Result<(), StoreError> {
    let Some(h) = holder else {
        return Err(not_found(id));
    };
    if let Some(bound) = proof.bound_host.as_deref() {
        if bound != h.host {
            return Err(StoreError::HostBound {
                token_host: bound.to_string(),
                host: h.host,
                gpu_index: h.gpu_index,
            });
        }
    }
    match h.instance_id {
        None => Err(not_found(id)),
        Some(i) if i == proof.instance => {
            if secret_matches(
                h.instance_secret_sha256.as_deref(),
                Some(&proof.secret_sha256),
            ) {
                Ok(())
            } else {
                Err(StoreError::InstanceSecret {
                    host: h.host,
                    gpu_index: h.gpu_index,
                    instance: i,
                })
            }
        }
        Some(holder) => Err(StoreError::Superseded {
            host: h.host,
            gpu_index: h.gpu_index,
            instance: proof.instance,
            holder,
            since: h.instance_since.unwrap_or_else(Utc::now),
        }),
    }
}

/// A stored secret digest and a presented one agree. A row without a stored digest (registered
/// before secrets existed) matches nothing: its holder must register again.
fn secret_matches(stored: Option<&[u8]>, presented: Option<&[u8; 32]>) -> bool {
    match (stored, presented) {
        (Some(s), Some(p)) => s.len() == 32 && constant_time_eq(s, p),
        _ => false,
    }
}

/// Equality in time independent of where the inputs differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// What a registering daemon shows about the row's holder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claim {
    pub instance: Uuid,
    /// The SHA-256 of the secret it presents as its own (a re-registration).
    pub secret_sha256: Option<[u8; 32]>,
    /// The instance it says it succeeds, and the SHA-256 of that instance's secret.
    pub previous: Option<Uuid>,
    pub previous_secret_sha256: Option<[u8; 32]>,
}

/// How a registration takes a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Take {
    /// The holder itself, with its secret: it keeps the secret it has.
    Keep,
    /// A new holder: it gets a new secret.
    Issue,
}

/// Whether `claim` may take a row held by `holder` (with the stored secret digest), whose
/// lease is live or not: nobody holds it; the holder itself, or the successor it names, each
/// with the secret; or anyone once the lease has lapsed. `None`: refused.
pub(super) fn may_take(claim: &Claim, holder: Option<&Holder>, lease_live: bool) -> Option<Take> {
    let Some((id, stored)) = holder.and_then(|h| {
        h.instance_id
            .map(|i| (i, h.instance_secret_sha256.as_deref()))
    }) else {
        return Some(Take::Issue);
    };
    if id == claim.instance && secret_matches(stored, claim.secret_sha256.as_ref()) {
        return Some(Take::Keep);
    }
    let successor =
        claim.previous == Some(id) && secret_matches(stored, claim.previous_secret_sha256.as_ref());
    (successor || !lease_live).then_some(Take::Issue)
}

pub(super) fn not_found(id: Uuid) -> StoreError {
    StoreError::NotFound {
        what: "worker",
        id: id.to_string(),
    }
}

impl Store {
    /// Checks that `proof` may act for worker `id` (see [`instance_verdict`]).
    pub async fn check_worker_instance(
        &self,
        id: Uuid,
        proof: &InstanceProof,
    ) -> Result<(), StoreError> {
        let sql = format!("SELECT {HOLDER_COLUMNS} FROM workers WHERE id = $1");
        let holder: Option<Holder> = sqlx::query_as(&sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        instance_verdict(id, proof, holder)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(n: u8) -> [u8; 32] {
        [n; 32]
    }

    fn held(instance: Option<Uuid>, secret: u8) -> Holder {
        Holder {
            host: "h".into(),
            gpu_index: 3,
            instance_id: instance,
            instance_since: None,
            instance_secret_sha256: Some(digest(secret).to_vec()),
        }
    }

    fn claim(instance: Uuid, own: Option<u8>, previous: Option<(Uuid, u8)>) -> Claim {
        Claim {
            instance,
            secret_sha256: own.map(digest),
            previous: previous.map(|p| p.0),
            previous_secret_sha256: previous.map(|p| digest(p.1)),
        }
    }

    #[test]
    fn a_live_lease_is_taken_only_with_the_holders_secret() {
        let (a, b, c) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        let h = held(Some(a), 7);
        // Nobody holds it yet.
        assert_eq!(
            may_take(&claim(a, None, None), None, true),
            Some(Take::Issue)
        );
        // The holder itself with its secret keeps it; the successor it names, with the
        // holder's secret, gets a new one.
        assert_eq!(
            may_take(&claim(a, Some(7), None), Some(&h), true),
            Some(Take::Keep)
        );
        assert_eq!(
            may_take(&claim(b, None, Some((a, 7))), Some(&h), true),
            Some(Take::Issue)
        );
        // Naming the holder proves nothing without its secret.
        assert_eq!(may_take(&claim(a, None, None), Some(&h), true), None);
        assert_eq!(may_take(&claim(a, Some(8), None), Some(&h), true), None);
        assert_eq!(
            may_take(&claim(b, None, Some((a, 8))), Some(&h), true),
            None
        );
        assert_eq!(
            may_take(&claim(b, Some(7), Some((c, 7))), Some(&h), true),
            None
        );
        // A row from before secrets: only a lapsed lease frees it.
        let old = Holder {
            instance_secret_sha256: None,
            ..h.clone()
        };
        assert_eq!(may_take(&claim(a, Some(7), None), Some(&old), true), None);
        // Once the lease has lapsed, anyone (with a new secret).
        assert_eq!(
            may_take(&claim(b, None, None), Some(&h), false),
            Some(Take::Issue)
        );
        assert_eq!(
            may_take(&claim(a, None, None), Some(&old), false),
            Some(Take::Issue)
        );
    }

    #[test]
    fn requests_need_the_holders_secret_and_the_bound_host() {
        let (id, a, b) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        let proof = |instance, secret: u8, host: Option<&str>| InstanceProof {
            instance,
            secret_sha256: digest(secret),
            bound_host: host.map(str::to_string),
        };
        assert!(instance_verdict(id, &proof(a, 7, None), Some(held(Some(a), 7))).is_ok());
        assert!(instance_verdict(id, &proof(a, 7, Some("h")), Some(held(Some(a), 7))).is_ok());
        assert!(matches!(
            instance_verdict(id, &proof(a, 8, None), Some(held(Some(a), 7))),
            Err(StoreError::InstanceSecret { instance, .. }) if instance == a
        ));
        assert!(matches!(
            instance_verdict(id, &proof(a, 7, Some("other")), Some(held(Some(a), 7))),
            Err(StoreError::HostBound { ref token_host, ref host, .. })
                if token_host == "other" && host == "h"
        ));
        match instance_verdict(id, &proof(b, 7, None), Some(held(Some(a), 7))) {
            Err(StoreError::Superseded {
                instance, holder, ..
            }) => assert_eq!((instance, holder), (b, a)),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            instance_verdict(id, &proof(a, 7, None), None),
            Err(StoreError::NotFound { .. })
        ));
        assert!(matches!(
            instance_verdict(id, &proof(a, 7, None), Some(held(None, 7))),
            Err(StoreError::NotFound { .. })
        ));
        assert!(constant_time_eq(b"abc", b"abc") && !constant_time_eq(b"abc", b"abd"));
    }
}
