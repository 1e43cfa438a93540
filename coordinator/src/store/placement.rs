//! Gang placement: one scheduling pass books a whole attempt (every rank's worker) or nothing,
//! at the job's world size or, for an elastic job that has waited long enough, at a smaller one
//! ([`super::elastic::attempt_size`]); and RESTARTING jobs whose backoff is over go back to the
//! queue.

use super::attempts::seconds;
use super::elastic::attempt_size;
use super::jobs::{lock_job, transition_in_tx};
use super::{notify, u32_of, Store, StoreError, WORKERS_CHANNEL};
use crate::state::{JobState, WorkerState};
use uuid::Uuid;

/// Serialises scheduling passes across every coordinator sharing the database (a transaction
/// level advisory lock; released at commit or rollback).
pub(super) const SCHEDULER_LOCK: i64 = 0x5e67_7261_696e_0001;

/// An idle worker with a live lease, as the placement function sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub id: Uuid,
    pub host: String,
    pub gpu_index: i32,
}

/// What one scheduling pass did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScheduleOutcome {
    /// No job is queued.
    Empty,
    /// The head of the queue does not fit the idle workers; nothing was written.
    Blocked {
        job_id: Uuid,
        world_size: u32,
        idle: usize,
    },
    /// The head job got a new attempt on these workers (in rank order).
    Placed {
        job_id: Uuid,
        attempt: u32,
        workers: Vec<Uuid>,
        /// How long the job had been QUEUED (since it was submitted, or queued again after a
        /// restart's backoff).
        queued_for: std::time::Duration,
    },
}

impl Store {
    /// One scheduling pass over the head of the queue (highest priority, then oldest).
    ///
    /// Gang placement: `place` gets the idle workers with a live lease and the job's world size
    /// and returns exactly that many workers in rank order, or `None`. In one transaction the
    /// job gets attempt+1 (PENDING) with one rank per worker, the workers become BUSY and the job
    /// QUEUED→SCHEDULED (with its event). An advisory lock serialises passes across
    /// coordinators, and the worker rows are locked (`FOR UPDATE SKIP LOCKED`) and re-checked, so
    /// no worker is ever booked twice.
    pub async fn schedule_head(
        &self,
        place: impl Fn(&[Candidate], usize) -> Option<Vec<Uuid>>,
    ) -> Result<ScheduleOutcome, StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(SCHEDULER_LOCK)
            .execute(&mut *tx)
            .await?;
        // `updated_at` is when the job entered QUEUED (only state changes set it).
        let head: Option<(Uuid, f64)> = sqlx::query_as(
            "SELECT id, EXTRACT(EPOCH FROM clock_timestamp() - updated_at)::float8 FROM jobs
             WHERE state = 'QUEUED'
             ORDER BY priority DESC, created_at, id LIMIT 1 FOR UPDATE",
        )
        .fetch_optional(&mut *tx)
        .await?;
        let Some((job_id, queued_secs)) = head else {
            tx.rollback().await?;
            return Ok(ScheduleOutcome::Empty);
        };
        let job = lock_job(&mut tx, job_id).await?;
        let candidates: Vec<(Uuid, String, i32)> = sqlx::query_as(
            "SELECT id, host, gpu_index FROM workers
             WHERE state = 'IDLE' AND lease_until > now() AND NOT leaving
             ORDER BY host, gpu_index FOR UPDATE SKIP LOCKED",
        )
        .fetch_all(&mut *tx)
        .await?;
        let candidates: Vec<Candidate> = candidates
            .into_iter()
            .map(|(id, host, gpu_index)| Candidate {
                id,
                host,
                gpu_index,
            })
            .collect();
        let size = attempt_size(&job.spec, candidates.len(), seconds(queued_secs));
        let chosen = match size.and_then(|s| place(&candidates, s.world_size as usize)) {
            Some(c) if Some(c.len()) == size.map(|s| s.world_size as usize) => c,
            _ => {
                tx.rollback().await?;
                return Ok(ScheduleOutcome::Blocked {
                    job_id,
                    world_size: job.spec.world_size,
                    idle: candidates.len(),
                });
            }
        };
        let Some(size) = size else {
            return Err(StoreError::Corrupt("placed without a size".into()));
        };

        let attempt: i32 = sqlx::query_scalar(
            "UPDATE jobs SET attempt = attempt + 1, iteration = 0, resumed_from_iteration = NULL, restart_at = NULL
             WHERE id = $1 RETURNING attempt",
        )
        .bind(job_id)
        .fetch_one(&mut *tx)
        .await?;
        // Resume from the newest complete checkpoint of an earlier attempt, else the spec's.
        let latest: Option<(String, i64)> = sqlx::query_as(
            "SELECT uri, iteration FROM checkpoints WHERE job_id = $1 AND state = 'COMPLETE'
             ORDER BY iteration DESC LIMIT 1",
        )
        .bind(job_id)
        .fetch_optional(&mut *tx)
        .await?;
        let (resume_uri, resume_iter) = match latest {
            Some((uri, it)) => (Some(uri), Some(it)),
            None => (job.spec.resume_from.clone(), None),
        };
        sqlx::query(
            "INSERT INTO attempts
                 (job_id, attempt, state, world_size, accumulate_steps, resume_uri, resume_iter)
             VALUES ($1, $2, 'PENDING', $3, $4, $5, $6)",
        )
        .bind(job_id)
        .bind(attempt)
        .bind(size.world_size as i32)
        .bind(size.accumulate_steps as i32)
        .bind(&resume_uri)
        .bind(resume_iter)
        .execute(&mut *tx)
        .await?;
        let ranks: Vec<i32> = (0..chosen.len() as i32).collect();
        sqlx::query(
            "INSERT INTO attempt_ranks (job_id, attempt, rank, worker_id)
             SELECT $1, $2, * FROM UNNEST($3::int[], $4::uuid[])",
        )
        .bind(job_id)
        .bind(attempt)
        .bind(&ranks)
        .bind(&chosen)
        .execute(&mut *tx)
        .await?;
        WorkerState::Idle.check_transition(WorkerState::Busy)?;
        let booked =
            sqlx::query("UPDATE workers SET state = 'BUSY' WHERE id = ANY($1) AND state = 'IDLE'")
                .bind(&chosen)
                .execute(&mut *tx)
                .await?
                .rows_affected();
        if booked != chosen.len() as u64 {
            // Cannot happen while the rows are locked; refuse rather than double-book.
            tx.rollback().await?;
            return Err(StoreError::Conflict(format!(
                "placement of job {job_id} raced: {booked} of {} workers were still idle",
                chosen.len()
            )));
        }
        let names: Vec<String> = chosen
            .iter()
            .filter_map(|id| candidates.iter().find(|c| c.id == *id))
            .map(|c| super::worker_name(&c.host, c.gpu_index))
            .collect();
        let reason = format!(
            "attempt {attempt} placed on {} worker{}: {}{}",
            chosen.len(),
            if chosen.len() == 1 { "" } else { "s" },
            names.join(", "),
            size.note(&job.spec, candidates.len(), seconds(queued_secs))
        );
        transition_in_tx(&mut tx, job_id, JobState::Scheduled, &reason).await?;
        for w in &chosen {
            notify(&mut tx, WORKERS_CHANNEL, *w).await?;
        }
        tx.commit().await?;
        Ok(ScheduleOutcome::Placed {
            job_id,
            attempt: u32_of(attempt, "attempt")?,
            workers: chosen,
            queued_for: seconds(queued_secs),
        })
    }

    /// RESTARTING jobs whose backoff is over go back to QUEUED (at their old place: priority,
    /// then submission time), saying where the next attempt will resume. Returns how many.
    pub async fn requeue_restarting(&self) -> Result<usize, StoreError> {
        let due: Vec<Uuid> = sqlx::query_scalar(
            "SELECT id FROM jobs WHERE state = 'RESTARTING' AND restart_at <= now() ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut n = 0;
        for id in due {
            let mut tx = self.pool.begin().await?;
            let job = lock_job(&mut tx, id).await?;
            if job.state != JobState::Restarting {
                tx.rollback().await?; // canceled meanwhile
                continue;
            }
            let latest: Option<i64> = sqlx::query_scalar(
                "SELECT max(iteration) FROM checkpoints WHERE job_id = $1 AND state = 'COMPLETE'",
            )
            .bind(id)
            .fetch_one(&mut *tx)
            .await?;
            let from = match (latest, &job.spec.resume_from) {
                (Some(it), _) => format!("from the checkpoint of iteration {it}"),
                (None, Some(uri)) => format!("from {uri} (resume_from)"),
                (None, None) => "from the beginning (no complete checkpoint yet)".to_string(),
            };
            let reason = format!(
                "backoff over; attempt {} will resume {from}",
                job.attempt + 1
            );
            transition_in_tx(&mut tx, id, JobState::Queued, &reason).await?;
            tx.commit().await?;
            n += 1;
        }
        Ok(n)
    }
}
