//! Heartbeats: the call every daemon makes every lease/3, so the one the database sees most
//! (2,000 a second at 10,000 GPUs with a 15 s lease). Almost always nothing but the lease
//! changes: the daemon runs exactly the ranks the store has on it, and each should go on. That
//! case is one statement (no transaction round trips, no row locks beyond the worker's own);
//! anything else falls through to the full transaction in workers.rs.

use super::attempts::{parse_attempt_state, rank_should_run};
use super::instances::{InstanceProof, PROVEN};
use super::jobs::parse_job_state;
use super::workers::{lease_secs, worker_state, AttemptRank, Heartbeat};
use super::{u32_of, Store, StoreError};
use crate::state::WorkerState;
use chrono::{DateTime, Utc};
use std::collections::BTreeSet;
use std::time::Duration;
use uuid::Uuid;

/// The worker's row after the lease update, with one row per unfinished rank it holds.
type FastRow = (
    String,
    DateTime<Utc>,
    Option<Uuid>,
    Option<i32>,
    Option<i32>,
    Option<i32>,
    Option<String>,
    Option<String>,
);

/// One heartbeat: who sends it, what it runs, whether its host is going away, and the lease
/// to grant.
#[derive(Debug, Clone, Copy)]
pub struct Beat<'a> {
    pub worker: Uuid,
    /// What the daemon instance shows (another's, or one without its secret, is refused).
    pub proof: &'a InstanceProof,
    pub running: &'a [AttemptRank],
    pub leaving: bool,
    pub lease: Duration,
}

impl Store {
    /// Extends the lease and says which of the `running` ranks the daemon must stop: those of a
    /// canceling or finished job, of a finished or stale attempt, not assigned to this worker, or
    /// already finished in the coordinator's record. A rank that must stop and is not listed has
    /// stopped: it ends CANCELED (which frees the worker). A worker declared LOST comes back.
    /// `leaving` (the daemon is going away) takes the worker out of placement until a daemon
    /// registers for it again.
    pub async fn heartbeat(&self, beat: &Beat<'_>) -> Result<Heartbeat, StoreError> {
        if let Some(done) = self.heartbeat_nothing_else(beat).await? {
            return Ok(done);
        }
        self.heartbeat_in_full(beat).await
    }

    /// The common case in one statement: the lease is extended, and if the worker is not LOST
    /// and its unfinished ranks are exactly `running`, each of which should run, that is all
    /// (`Some`). Otherwise `None`, and the full heartbeat redoes the update with the rest. The
    /// read takes no job locks: a rank that must stop a moment later is told by the next
    /// heartbeat, and at once by its assignment stream.
    async fn heartbeat_nothing_else(
        &self,
        beat: &Beat<'_>,
    ) -> Result<Option<Heartbeat>, StoreError> {
        let id = beat.worker;
        let rows: Vec<FastRow> = sqlx::query_as(&format!(
            "WITH w AS (
                UPDATE workers SET last_heartbeat = now(),
                                   lease_until = now() + make_interval(secs => $2),
                                   leaving = leaving OR $4
                WHERE id = $1 AND {PROVEN} RETURNING state, lease_until)
             SELECT w.state, w.lease_until, r.job_id, r.attempt, r.rank, r.job_attempt,
                    r.job_state, r.attempt_state
             FROM w LEFT JOIN LATERAL (
                SELECT ar.job_id, ar.attempt, ar.rank, j.attempt AS job_attempt,
                       j.state AS job_state, a.state AS attempt_state
                FROM attempt_ranks ar
                JOIN jobs j ON j.id = ar.job_id
                JOIN attempts a ON a.job_id = ar.job_id AND a.attempt = ar.attempt
                WHERE ar.worker_id = $1 AND ar.finished_at IS NULL) r ON true"
        ))
        .bind(id)
        .bind(lease_secs(beat.lease))
        .bind(beat.proof.instance)
        .bind(beat.leaving)
        .bind(&beat.proof.secret_sha256[..])
        .bind(beat.proof.bound_host.as_deref())
        .fetch_all(&self.pool)
        .await?;
        let Some((state, lease_until, ..)) = rows.first() else {
            return Ok(None); // unknown, another's, not proven: the full path says which
        };
        if worker_state(id, state)? == WorkerState::Lost {
            return Ok(None);
        }
        let mut open = BTreeSet::new();
        for (_, _, job, attempt, rank, job_attempt, job_state, attempt_state) in &rows {
            let (Some(job_id), Some(attempt), Some(rank)) = (job, attempt, rank) else {
                continue; // no unfinished rank: the LEFT JOIN's one empty row
            };
            let r = AttemptRank {
                job_id: *job_id,
                attempt: u32_of(*attempt, "attempt_ranks.attempt")?,
                rank: u32_of(*rank, "attempt_ranks.rank")?,
            };
            let job_state = parse_job_state(*job_id, job_state.as_deref().unwrap_or_default())?;
            let attempt_state = parse_attempt_state(attempt_state.as_deref().unwrap_or_default())?;
            let job_attempt = u32_of(job_attempt.unwrap_or_default(), "jobs.attempt")?;
            if !rank_should_run(job_attempt, job_state, r.attempt, attempt_state) {
                return Ok(None);
            }
            open.insert(r);
        }
        let listed: BTreeSet<AttemptRank> = beat.running.iter().copied().collect();
        if open != listed {
            return Ok(None);
        }
        Ok(Some(Heartbeat {
            lease_until: *lease_until,
            stop: Vec::new(),
        }))
    }
}
