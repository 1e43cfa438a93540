//! PostgreSQL: the coordinator's only state (DESIGN.md §6).
//!
//! Plain runtime-checked sqlx queries (no build-time database). Every job state change goes
//! through [`Store::transition_job`], which checks the edge against [`crate::state`] and writes the
//! jobs row and its `job_events` row in one transaction.

mod attempts;
mod events;
mod ingest;
mod jobs;
mod metrics;
mod tokens;
mod workers;

pub use attempts::{
    Candidate, RankAssignment, RankOutcome, RendezvousEndpoint, ResumeCandidate, ScheduleOutcome,
};
pub use events::EventRecord;
pub use ingest::{IngestBody, IngestEvent, Ingested};
pub use jobs::JobRecord;
pub use metrics::{CheckpointRecord, MetricPoint};
pub use tokens::{TokenCheck, TokenRecord};
pub use workers::{Heartbeat, RankRef, Registered, WorkerRecord, WorkerRegistration};

use crate::state::IllegalTransition;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;
use std::str::FromStr;
use std::time::Duration;

/// The migrations in `migrations/`, embedded at compile time.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// The NOTIFY channel that carries a job id whenever that job gets a new event. A hint only:
/// readers always re-read the table.
pub const EVENTS_CHANNEL: &str = "segtrain_job_events";

/// The NOTIFY channel that carries a worker id whenever that worker registers, gets an
/// assignment or becomes free again (wakes its assignment stream and the scheduler).
pub const WORKERS_CHANNEL: &str = "segtrain_workers";

/// The NOTIFY channel that carries a job id whenever one of its attempts changes state or gets
/// its rendezvous endpoint (wakes AwaitRendezvous and the assignment streams).
pub const ATTEMPTS_CHANNEL: &str = "segtrain_attempts";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{what} {id} not found")]
    NotFound { what: &'static str, id: String },
    #[error(transparent)]
    Illegal(#[from] IllegalTransition),
    /// The request conflicts with what is stored (reused idempotency key, finished job).
    #[error("{0}")]
    Conflict(String),
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A row that this version cannot read (written by a newer version, or edited by hand).
    #[error("unreadable row: {0}")]
    Corrupt(String),
}

/// When a failed attempt is retried: after `base`, doubling per restart, capped at `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartPolicy {
    pub base: Duration,
    pub max: Duration,
}

impl Default for RestartPolicy {
    fn default() -> RestartPolicy {
        RestartPolicy {
            base: Duration::from_secs(5),
            max: Duration::from_secs(300),
        }
    }
}

impl RestartPolicy {
    /// The wait before restart number `n` (1 for the first).
    pub fn backoff(&self, n: u32) -> Duration {
        let factor = 1u32 << n.saturating_sub(1).min(16);
        self.base.saturating_mul(factor).min(self.max)
    }
}

#[derive(Clone)]
pub struct Store {
    pool: PgPool,
    restart: RestartPolicy,
}

impl Store {
    /// Connects a pool. Fails fast when the database is unreachable; callers decide how to retry.
    pub async fn connect(url: &str) -> Result<Store, StoreError> {
        let opts = PgConnectOptions::from_str(url)?.application_name("segtrain-coordinator");
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(opts)
            .await?;
        Ok(Store {
            pool,
            restart: RestartPolicy::default(),
        })
    }

    /// Applies every migration not yet applied (idempotent; takes an advisory lock, so two
    /// coordinators starting at once do not race).
    pub async fn migrate(&self) -> Result<(), StoreError> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The same store with another restart backoff.
    pub fn with_restart_policy(mut self, restart: RestartPolicy) -> Store {
        self.restart = restart;
        self
    }
}

fn u64_of(v: i64, what: &str) -> Result<u64, StoreError> {
    u64::try_from(v).map_err(|_| StoreError::Corrupt(format!("{what} is negative: {v}")))
}

/// `pg_notify` inside a transaction: delivered at commit, folded with identical ones.
async fn notify(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    channel: &str,
    id: uuid::Uuid,
) -> Result<(), StoreError> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(channel)
        .bind(id.to_string())
        .execute(&mut **tx)
        .await?;
    Ok(())
}

fn u32_of(v: i32, what: &str) -> Result<u32, StoreError> {
    u32::try_from(v).map_err(|_| StoreError::Corrupt(format!("{what} is negative: {v}")))
}
