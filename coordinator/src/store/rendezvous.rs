//! Rank 0's endpoint: published once per attempt (PENDING→RENDEZVOUS), read by the other ranks.

use super::attempts::{fence, parse_attempt_state, set_attempt_state, unknown_job_is_stale};
use super::jobs::lock_job;
use super::{notify, Store, StoreError, ATTEMPTS_CHANNEL};
use crate::state::AttemptState;
use uuid::Uuid;

/// Rank 0's endpoint for the other ranks of its attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RendezvousEndpoint {
    /// The 128-byte NCCL unique id.
    Nccl(Vec<u8>),
    /// `host:port` of rank 0's TCP collective listener.
    Tcp(String),
}

impl Store {
    /// Rank 0 records its endpoint; the attempt goes PENDING→RENDEZVOUS. Publishing the same
    /// endpoint again is a no-op; a different one, a stale attempt, a finished attempt, or a
    /// worker that is not rank 0 is refused (`Conflict`).
    pub async fn publish_rendezvous(
        &self,
        worker_id: Uuid,
        job_id: Uuid,
        attempt: u32,
        endpoint: &RendezvousEndpoint,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        let job = lock_job(&mut tx, job_id)
            .await
            .map_err(unknown_job_is_stale)?;
        fence(job.id, job.attempt, attempt)?;
        let rank0: Option<Uuid> = sqlx::query_scalar(
            "SELECT worker_id FROM attempt_ranks WHERE job_id = $1 AND attempt = $2 AND rank = 0",
        )
        .bind(job_id)
        .bind(attempt as i32)
        .fetch_optional(&mut *tx)
        .await?;
        if rank0 != Some(worker_id) {
            return Err(StoreError::Conflict(format!(
                "worker {worker_id} is not rank 0 of attempt {attempt} of job {job_id}; only rank 0 publishes the rendezvous"
            )));
        }
        let (state, nccl, tcp): (String, Option<Vec<u8>>, Option<String>) = sqlx::query_as(
            "SELECT state, rendezvous, rendezvous_tcp FROM attempts
             WHERE job_id = $1 AND attempt = $2 FOR UPDATE",
        )
        .bind(job_id)
        .bind(attempt as i32)
        .fetch_one(&mut *tx)
        .await?;
        let state = parse_attempt_state(&state)?;
        if !state.wants_ranks() {
            return Err(StoreError::Conflict(format!(
                "attempt {attempt} of job {job_id} is already {state}"
            )));
        }
        match endpoint_of(nccl, tcp) {
            Some(existing) if existing == *endpoint => return Ok(()),
            Some(_) => {
                return Err(StoreError::Conflict(format!(
                    "rank 0 already published a different rendezvous endpoint for attempt {attempt} of job {job_id}"
                )))
            }
            None => {}
        }
        let (nccl, tcp) = match endpoint {
            RendezvousEndpoint::Nccl(b) => (Some(b.as_slice()), None),
            RendezvousEndpoint::Tcp(a) => (None, Some(a.as_str())),
        };
        sqlx::query(
            "UPDATE attempts SET rendezvous = $3, rendezvous_tcp = $4, rendezvous_at = now()
             WHERE job_id = $1 AND attempt = $2",
        )
        .bind(job_id)
        .bind(attempt as i32)
        .bind(nccl)
        .bind(tcp)
        .execute(&mut *tx)
        .await?;
        if state == AttemptState::Pending {
            set_attempt_state(
                &mut tx,
                job_id,
                attempt,
                state,
                AttemptState::Rendezvous,
                "",
            )
            .await?;
        }
        notify(&mut tx, ATTEMPTS_CHANNEL, job_id).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Rank 0's endpoint once published (`None`: not yet). The worker must hold a rank of the
    /// job's current, unfinished attempt.
    pub async fn rendezvous(
        &self,
        worker_id: Uuid,
        job_id: Uuid,
        attempt: u32,
    ) -> Result<Option<RendezvousEndpoint>, StoreError> {
        let job = self.get_job(job_id).await.map_err(unknown_job_is_stale)?;
        fence(job.id, job.attempt, attempt)?;
        let holds: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM attempt_ranks
                            WHERE job_id = $1 AND attempt = $2 AND worker_id = $3)",
        )
        .bind(job_id)
        .bind(attempt as i32)
        .bind(worker_id)
        .fetch_one(&self.pool)
        .await?;
        if !holds {
            return Err(StoreError::Conflict(format!(
                "worker {worker_id} holds no rank of attempt {attempt} of job {job_id}"
            )));
        }
        let (state, reason, nccl, tcp): (String, String, Option<Vec<u8>>, Option<String>) =
            sqlx::query_as(
                "SELECT state, reason, rendezvous, rendezvous_tcp FROM attempts
                 WHERE job_id = $1 AND attempt = $2",
            )
            .bind(job_id)
            .bind(attempt as i32)
            .fetch_one(&self.pool)
            .await?;
        let state = parse_attempt_state(&state)?;
        if !state.wants_ranks() {
            return Err(StoreError::Conflict(format!(
                "attempt {attempt} of job {job_id} is already {state}{}",
                if reason.is_empty() {
                    String::new()
                } else {
                    format!(": {reason}")
                }
            )));
        }
        Ok(endpoint_of(nccl, tcp))
    }
}

fn endpoint_of(nccl: Option<Vec<u8>>, tcp: Option<String>) -> Option<RendezvousEndpoint> {
    match (nccl, tcp) {
        (Some(b), _) => Some(RendezvousEndpoint::Nccl(b)),
        (None, Some(a)) => Some(RendezvousEndpoint::Tcp(a)),
        (None, None) => None,
    }
}
