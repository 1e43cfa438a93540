//! The attempts of a job as users see them (`ListAttempts`, `segtrain attempts`): world size,
//! accumulation, workers and how each ended.

use super::attempts::parse_attempt_state;
use super::{u32_of, u64_of, Store, StoreError};
use crate::state::AttemptState;
use chrono::{DateTime, Utc};
use uuid::Uuid;

/// One attempt of a job.
#[derive(Debug, Clone, PartialEq)]
pub struct AttemptRecord {
    pub attempt: u32,
    pub state: AttemptState,
    pub world_size: u32,
    pub accumulate_steps: u32,
    pub reason: String,
    pub resumed_from_iteration: Option<u64>,
    /// host:GPU of each rank, in rank order.
    pub workers: Vec<String>,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

type AttemptRow = (
    i32,
    String,
    i32,
    i32,
    String,
    Option<i64>,
    Vec<String>,
    Vec<i32>,
    DateTime<Utc>,
    Option<DateTime<Utc>>,
);

impl Store {
    /// A job's attempts after attempt `after`, oldest first, at most `limit`.
    pub async fn list_attempts(
        &self,
        job_id: Uuid,
        after: u32,
        limit: u32,
    ) -> Result<Vec<AttemptRecord>, StoreError> {
        let rows: Vec<AttemptRow> = sqlx::query_as(
            "SELECT a.attempt, a.state, a.world_size, a.accumulate_steps, a.reason, a.resume_iter,
                    coalesce(array_agg(w.host ORDER BY ar.rank) FILTER (WHERE w.id IS NOT NULL),
                             '{}'),
                    coalesce(array_agg(w.gpu_index ORDER BY ar.rank) FILTER (WHERE w.id IS NOT NULL),
                             '{}'),
                    a.created_at, a.finished_at
             FROM attempts a
             LEFT JOIN attempt_ranks ar ON ar.job_id = a.job_id AND ar.attempt = a.attempt
             LEFT JOIN workers w ON w.id = ar.worker_id
             WHERE a.job_id = $1 AND a.attempt > $2
             GROUP BY a.job_id, a.attempt
             ORDER BY a.attempt LIMIT $3",
        )
        .bind(job_id)
        .bind(i64::from(after))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(
                |(attempt, state, world, acc, reason, resume, hosts, gpus, created, finished)| {
                    Ok(AttemptRecord {
                        attempt: u32_of(attempt, "attempt")?,
                        state: parse_attempt_state(&state)?,
                        world_size: u32_of(world, "world_size")?,
                        accumulate_steps: u32_of(acc, "accumulate_steps")?,
                        reason,
                        resumed_from_iteration: resume
                            .map(|i| u64_of(i, "resume_iter"))
                            .transpose()?,
                        workers: hosts
                            .iter()
                            .zip(&gpus)
                            .map(|(h, g)| super::worker_name(h, *g))
                            .collect(),
                        created_at: created,
                        finished_at: finished,
                    })
                },
            )
            .collect()
    }
}
