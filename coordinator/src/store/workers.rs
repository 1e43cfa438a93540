//! Worker daemons as the coordinator knows them.

use super::{Store, StoreError};
use crate::state::WorkerState;
use chrono::{DateTime, Utc};
use uuid::Uuid;

#[derive(Debug, Clone, PartialEq)]
pub struct WorkerRecord {
    pub id: Uuid,
    pub host: String,
    pub gpu_index: i32,
    pub gpu_name: String,
    pub gpu_memory_bytes: u64,
    pub state: WorkerState,
    pub last_heartbeat: DateTime<Utc>,
    pub lease_until: DateTime<Utc>,
    /// The rank it holds in the newest live attempt, if any: (job, attempt, rank).
    pub assignment: Option<(Uuid, u32, u32)>,
}

#[derive(sqlx::FromRow)]
struct WorkerRow {
    id: Uuid,
    host: String,
    gpu_index: i32,
    gpu_name: String,
    gpu_memory_bytes: i64,
    state: String,
    last_heartbeat: DateTime<Utc>,
    lease_until: DateTime<Utc>,
    job_id: Option<Uuid>,
    attempt: Option<i32>,
    rank: Option<i32>,
}

impl Store {
    /// Every registered worker, by host and GPU index.
    pub async fn list_workers(&self) -> Result<Vec<WorkerRecord>, StoreError> {
        let rows: Vec<WorkerRow> = sqlx::query_as(
            "SELECT w.id, w.host, w.gpu_index, w.gpu_name, w.gpu_memory_bytes, w.state,
                    w.last_heartbeat, w.lease_until, r.job_id, r.attempt, r.rank
             FROM workers w
             LEFT JOIN LATERAL (
                 SELECT ar.job_id, ar.attempt, ar.rank FROM attempt_ranks ar
                 JOIN attempts a ON a.job_id = ar.job_id AND a.attempt = ar.attempt
                 WHERE ar.worker_id = w.id AND a.state IN ('PENDING','RENDEZVOUS','RUNNING')
                 LIMIT 1) r ON true
             ORDER BY w.host, w.gpu_index",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|r| {
                let state = WorkerState::parse(&r.state).ok_or_else(|| {
                    StoreError::Corrupt(format!("worker {} state {:?}", r.id, r.state))
                })?;
                let assignment = match (r.job_id, r.attempt, r.rank) {
                    (Some(j), Some(a), Some(k)) => Some((j, a.max(0) as u32, k.max(0) as u32)),
                    _ => None,
                };
                Ok(WorkerRecord {
                    id: r.id,
                    host: r.host,
                    gpu_index: r.gpu_index,
                    gpu_name: r.gpu_name,
                    gpu_memory_bytes: r.gpu_memory_bytes.max(0) as u64,
                    state,
                    last_heartbeat: r.last_heartbeat,
                    lease_until: r.lease_until,
                    assignment,
                })
            })
            .collect()
    }
}
