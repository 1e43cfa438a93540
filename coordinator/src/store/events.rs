//! The job event log: append (under the job's row lock) and read after a cursor.

use super::jobs::{insert_event, lock_job};
use super::{u32_of, Store, StoreError};
use crate::events::EventPayload;
use chrono::{DateTime, Utc};
use sqlx::types::Json;
use uuid::Uuid;

#[derive(Debug, Clone, PartialEq)]
pub struct EventRecord {
    pub id: i64,
    pub job_id: Uuid,
    pub attempt: u32,
    pub payload: EventPayload,
    pub created_at: DateTime<Utc>,
}

#[derive(sqlx::FromRow)]
struct EventRow {
    id: i64,
    job_id: Uuid,
    attempt: i32,
    payload: Json<serde_json::Value>,
    created_at: DateTime<Utc>,
}

impl Store {
    /// Appends an event that is not a state change (those come from `transition_job`).
    pub async fn append_event(
        &self,
        job_id: Uuid,
        attempt: u32,
        payload: &EventPayload,
    ) -> Result<i64, StoreError> {
        let mut tx = self.pool.begin().await?;
        lock_job(&mut tx, job_id).await?;
        let id = insert_event(&mut tx, job_id, attempt, payload).await?;
        tx.commit().await?;
        Ok(id)
    }

    /// Up to `limit` events of one job with id greater than `after`, in id order.
    pub async fn events_after(
        &self,
        job_id: Uuid,
        after: i64,
        limit: i64,
    ) -> Result<Vec<EventRecord>, StoreError> {
        let rows: Vec<EventRow> = sqlx::query_as(
            "SELECT id, job_id, attempt, payload, created_at FROM job_events
             WHERE job_id = $1 AND id > $2 ORDER BY id LIMIT $3",
        )
        .bind(job_id)
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|r| {
                let payload = serde_json::from_value(r.payload.0).map_err(|e| {
                    StoreError::Corrupt(format!("event {} of job {}: {e}", r.id, r.job_id))
                })?;
                Ok(EventRecord {
                    id: r.id,
                    job_id: r.job_id,
                    attempt: u32_of(r.attempt, "attempt")?,
                    payload,
                    created_at: r.created_at,
                })
            })
            .collect()
    }
}
