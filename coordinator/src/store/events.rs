//! The job event log: append (under the job's row lock) and read after a cursor.

use super::jobs::{insert_event, lock_job};
use super::metrics::{CLASS_IOU_PREFIX, EVAL_POINT_NAMES};
use super::{u32_of, Store, StoreError};
use crate::events::{json_number, EventPayload};
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
    /// A metrics event's points (its attempt and iteration, less the evaluation's), in name order.
    point_names: Option<Vec<String>>,
    point_values: Option<Vec<f64>>,
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

    /// Up to `limit` events of one job with id greater than `after`, in id order. A metrics
    /// event gets its values from the `metrics` table (`metrics_job_points_idx`, one job,
    /// iteration and attempt: a handful of rows).
    pub async fn events_after(
        &self,
        job_id: Uuid,
        after: i64,
        limit: i64,
    ) -> Result<Vec<EventRecord>, StoreError> {
        let rows: Vec<EventRow> = sqlx::query_as(
            "SELECT e.id, e.job_id, e.attempt, e.payload, e.created_at,
                    p.point_names, p.point_values
             FROM job_events e
             LEFT JOIN LATERAL (
                 SELECT array_agg(m.name ORDER BY m.name) AS point_names,
                        array_agg(m.value ORDER BY m.name) AS point_values
                 FROM metrics m
                 WHERE e.kind = 'metrics' AND NOT (e.payload ? 'values')
                   AND m.job_id = e.job_id AND m.attempt = e.attempt
                   AND m.iteration = (e.payload->>'iteration')::bigint
                   AND m.name <> ALL($4::text[]) AND NOT starts_with(m.name, $5)
             ) p ON true
             WHERE e.job_id = $1 AND e.id > $2 ORDER BY e.id LIMIT $3",
        )
        .bind(job_id)
        .bind(after)
        .bind(limit)
        .bind(EVAL_POINT_NAMES)
        .bind(CLASS_IOU_PREFIX)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|r| {
                let mut payload = serde_json::from_value(r.payload.0).map_err(|e| {
                    StoreError::Corrupt(format!("event {} of job {}: {e}", r.id, r.job_id))
                })?;
                if let (EventPayload::Metrics { values, .. }, Some(names), Some(points)) =
                    (&mut payload, r.point_names, r.point_values)
                {
                    values.extend(names.into_iter().zip(points.into_iter().map(json_number)));
                }
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
