//! Retention: the events and metric points of finished jobs, deleted once they are old enough
//! (`segtrain-coordinator prune`, docs/operations.md "Retention"). The job row, its attempts
//! and its checkpoints stay, so the job is still listed and its history says it was pruned.

use super::jobs::{insert_event, lock_job};
use super::{Store, StoreError};
use crate::events::EventPayload;
use chrono::{DateTime, Utc};
use uuid::Uuid;

/// A finished job whose events and points may go.
#[derive(Debug, Clone, PartialEq)]
pub struct Prunable {
    pub job_id: Uuid,
    pub name: String,
    pub state: String,
    pub finished_at: DateTime<Utc>,
    pub events: i64,
    pub metrics: i64,
}

/// What one job held, for an archive: its events and its points as stored.
#[derive(Debug, Clone)]
pub struct JobHistory {
    /// (id, attempt, kind, payload, created_at)
    pub events: Vec<(i64, i32, String, serde_json::Value, DateTime<Utc>)>,
    /// (attempt, iteration, name, value)
    pub metrics: Vec<(i32, i64, String, f64)>,
}

impl Store {
    /// The finished, not yet pruned jobs that ended before `before`, oldest first, with how
    /// many events and points each holds.
    pub async fn prunable_jobs(&self, before: DateTime<Utc>) -> Result<Vec<Prunable>, StoreError> {
        let rows: Vec<(Uuid, String, String, DateTime<Utc>, i64, i64)> = sqlx::query_as(
            "SELECT j.id, j.name, j.state, j.finished_at,
                    (SELECT count(*) FROM job_events e WHERE e.job_id = j.id),
                    (SELECT count(*) FROM metrics m WHERE m.job_id = j.id)
             FROM jobs j
             WHERE j.finished_at IS NOT NULL AND j.pruned_at IS NULL AND j.finished_at < $1
             ORDER BY j.finished_at, j.id",
        )
        .bind(before)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(
                |(job_id, name, state, finished_at, events, metrics)| Prunable {
                    job_id,
                    name,
                    state,
                    finished_at,
                    events,
                    metrics,
                },
            )
            .collect())
    }

    /// Everything `prune_job` would delete of one job, in order (for `--archive`).
    pub async fn job_history(&self, job_id: Uuid) -> Result<JobHistory, StoreError> {
        let events = sqlx::query_as(
            "SELECT id, attempt, kind, payload, created_at FROM job_events
             WHERE job_id = $1 ORDER BY id",
        )
        .bind(job_id)
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(
            |(id, attempt, kind, payload, at): (
                i64,
                i32,
                String,
                sqlx::types::Json<serde_json::Value>,
                DateTime<Utc>,
            )| (id, attempt, kind, payload.0, at),
        )
        .collect();
        let metrics = sqlx::query_as(
            "SELECT attempt, iteration, name, value FROM metrics
             WHERE job_id = $1 ORDER BY iteration, name, attempt",
        )
        .bind(job_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(JobHistory { events, metrics })
    }

    /// Deletes one job's events and points in one transaction under its row lock, if it is
    /// still finished before `before` and not pruned, and leaves a note (the new first event)
    /// saying so. Returns (events, points) deleted; `None` if the job no longer qualifies.
    pub async fn prune_job(
        &self,
        job_id: Uuid,
        before: DateTime<Utc>,
        note: &str,
    ) -> Result<Option<(u64, u64)>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let job = lock_job(&mut tx, job_id).await?;
        let qualifies: bool = sqlx::query_scalar(
            "SELECT finished_at IS NOT NULL AND finished_at < $2 AND pruned_at IS NULL
             FROM jobs WHERE id = $1",
        )
        .bind(job_id)
        .bind(before)
        .fetch_one(&mut *tx)
        .await?;
        if !qualifies || !job.state.is_terminal() {
            tx.rollback().await?;
            return Ok(None);
        }
        let events = sqlx::query("DELETE FROM job_events WHERE job_id = $1")
            .bind(job_id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        let metrics = sqlx::query("DELETE FROM metrics WHERE job_id = $1")
            .bind(job_id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        sqlx::query("UPDATE jobs SET pruned_at = now() WHERE id = $1")
            .bind(job_id)
            .execute(&mut *tx)
            .await?;
        let text = format!("{note} ({events} events and {metrics} metric points deleted)");
        insert_event(&mut tx, job_id, job.attempt, &EventPayload::Note { text }).await?;
        tx.commit().await?;
        Ok(Some((events, metrics)))
    }
}
