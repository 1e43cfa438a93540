//! Draining a worker: it keeps the rank it runs but gets no new one, until it is undrained. For
//! an operator taking a machine out (maintenance, a preemption notice) without stopping a job.
//! A drained worker stays DRAINING across daemon restarts; one that is lost comes back IDLE (it
//! may be a new machine under the old name).

use super::workers::{open_ranks, set_worker_state, worker_state};
use super::{Store, StoreError};
use crate::state::WorkerState;
use uuid::Uuid;

impl Store {
    /// IDLE or BUSY → DRAINING (DRAINING stays). Returns the new state. A LOST worker cannot be
    /// drained (FAILED_PRECONDITION): it runs nothing and gets nothing until it registers again.
    pub async fn drain_worker(&self, id: Uuid) -> Result<WorkerState, StoreError> {
        self.set_draining(id, true).await
    }

    /// DRAINING → IDLE, or BUSY while it still holds a rank (IDLE and BUSY stay). Returns the
    /// new state.
    pub async fn undrain_worker(&self, id: Uuid) -> Result<WorkerState, StoreError> {
        self.set_draining(id, false).await
    }

    async fn set_draining(&self, id: Uuid, drain: bool) -> Result<WorkerState, StoreError> {
        let mut tx = self.pool.begin().await?;
        let state: Option<String> =
            sqlx::query_scalar("SELECT state FROM workers WHERE id = $1 FOR UPDATE")
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
        let Some(state) = state else {
            return Err(StoreError::NotFound {
                what: "worker",
                id: id.to_string(),
            });
        };
        let from = worker_state(id, &state)?;
        let to = match (from, drain) {
            (WorkerState::Lost, _) => {
                return Err(StoreError::Conflict(format!(
                    "worker {id} is LOST: it runs nothing and is given nothing until its daemon \
                     registers again"
                )))
            }
            (_, true) => WorkerState::Draining,
            (WorkerState::Draining, false) => {
                if open_ranks(&mut tx, id).await?.is_empty() {
                    WorkerState::Idle
                } else {
                    WorkerState::Busy
                }
            }
            (s, false) => s,
        };
        set_worker_state(&mut tx, id, from, to).await?;
        tx.commit().await?;
        Ok(to)
    }
}
