//! PostgreSQL: the coordinator's only state (ARCHITECTURE.md).
//!
//! Plain runtime-checked sqlx queries (no build-time database). Every job state change goes
//! through [`Store::transition_job`], which checks the edge against [`crate::state`] and writes the
//! jobs row and its `job_events` row in one transaction.

mod attempt_view;
mod attempts;
pub mod bus;
mod checkpoint_scope;
mod drain;
mod elastic;
mod events;
mod health;
mod heartbeat;
mod ingest;
mod instances;
mod jobs;
mod metrics;
mod placement;
mod prune;
mod rendezvous;
mod teams;
mod tokens;
mod workers;

pub use attempt_view::AttemptRecord;
pub use attempts::{RankAssignment, RankOutcome, ResumeCandidate};
use bus::notify;
pub use bus::{ATTEMPTS_CHANNEL, EVENTS_CHANNEL, WORKERS_CHANNEL};
pub use events::EventRecord;
pub use health::ClusterCounts;
pub use heartbeat::Beat;
pub use ingest::{IngestBody, IngestEvent, Ingested};
pub use instances::{Claim, InstanceProof};
pub use jobs::{list_jobs_sql, JobRecord, Owner};
pub use metrics::{
    class_iou_point, get_metrics_sql, is_eval_point, CheckpointRecord, MetricPoint,
    EVAL_POINT_NAMES,
};
pub use placement::{Candidate, Placement, QueueEnd, PLACEMENTS_PER_TRANSACTION};
pub use prune::{JobHistory, Prunable};
pub use rendezvous::RendezvousEndpoint;
pub use teams::TeamRecord;
pub use tokens::{NewToken, TokenCheck, TokenRecord};
pub use workers::{AttemptRank, Heartbeat, Registered, WorkerRecord, WorkerRegistration};

use crate::state::IllegalTransition;
use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;
use std::str::FromStr;
use std::time::Duration;

/// The migrations in `migrations/`, embedded at compile time.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{what} {id} not found")]
    NotFound { what: &'static str, id: String },
    #[error(transparent)]
    Illegal(#[from] IllegalTransition),
    /// The request conflicts with what is stored (reused idempotency key, finished job).
    #[error("{0}")]
    Conflict(String),
    /// A message about an attempt that is not the job's current one (or a job that does not
    /// exist): the sender's events of it can never be stored.
    #[error("{0}")]
    StaleAttempt(String),
    /// Register: another daemon instance holds a live lease for this host and GPU.
    #[error(
        "worker {host}:{} is held by another daemon (instance {instance}, held since {}, lease live until {}); \
         is a second segtrain-worker daemon running for this host and GPU (a cloned VM, a second \
         container, a copied unit)? Give each daemon its own --host or --gpu, or stop the other",
        gpu_label(*gpu_index),
        since.format("%Y-%m-%dT%H:%M:%SZ"),
        lease_until.format("%Y-%m-%dT%H:%M:%SZ")
    )]
    WorkerHeld {
        host: String,
        gpu_index: i32,
        instance: uuid::Uuid,
        since: DateTime<Utc>,
        lease_until: DateTime<Utc>,
    },
    /// A request from a daemon instance that another instance has replaced.
    #[error(
        "daemon instance {instance} of worker {host}:{} was replaced by instance {holder} at {} \
         (its lease had expired); this daemon must stop",
        gpu_label(*gpu_index),
        since.format("%Y-%m-%dT%H:%M:%SZ")
    )]
    Superseded {
        host: String,
        gpu_index: i32,
        instance: uuid::Uuid,
        holder: uuid::Uuid,
        since: DateTime<Utc>,
    },
    /// A request that names the daemon instance holding a worker without that instance's
    /// secret (an id alone proves nothing; see `instances.rs`).
    #[error(
        "this request names daemon instance {instance}, which holds worker {host}:{}, without \
         that instance's secret (instance_secret); only the daemon the coordinator gave it to may \
         act for this worker"
        , gpu_label(*gpu_index)
    )]
    InstanceSecret {
        host: String,
        gpu_index: i32,
        instance: uuid::Uuid,
    },
    /// A worker token bound to one host, used for a worker of another.
    #[error(
        "this worker token is bound to host {token_host:?}; worker {host}:{} is on another host",
        gpu_label(*gpu_index)
    )]
    HostBound {
        token_host: String,
        host: String,
        gpu_index: i32,
    },
    /// A value that can never be stored (e.g. a checkpoint outside its job's directory); the
    /// message names the field.
    #[error("{0}")]
    Invalid(String),
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A row that this version cannot read (written by a newer version, or edited by hand).
    #[error("unreadable row: {0}")]
    Corrupt(String),
}

pub use segtrain_proto::names::{gpu_label, worker_name};

/// The coordinator's connection pool (`--database-max-connections`,
/// `--database-acquire-timeout-ms`): RPCs and the scheduler share it. The LISTEN connections and
/// the health probe have their own (see [`Store::side_pool`]), so they never wait behind RPCs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolSettings {
    pub max_connections: u32,
    /// How long a request waits for a free connection before it is refused as busy.
    pub acquire_timeout: Duration,
}

impl Default for PoolSettings {
    fn default() -> PoolSettings {
        PoolSettings {
            max_connections: 16,
            acquire_timeout: Duration::from_secs(5),
        }
    }
}

/// Connections outside the pool: the LISTEN connection of the NOTIFY bus ([`bus::Bus`]) and the
/// health probe.
const SIDE_CONNECTIONS: u32 = 2;

/// Connections for bearer-token lookups ([`Store::check_token`]): their own, so that requests
/// with made-up tokens queue here and never take a connection heartbeats or ingest need.
const TOKEN_CONNECTIONS: u32 = 2;

/// How long a token lookup waits for one of its connections before it fails (and a cached
/// valid verdict serves instead, see `auth::verifier`).
const TOKEN_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(1);

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
    side: PgPool,
    /// Token lookups only (see [`TOKEN_CONNECTIONS`]).
    token_pool: PgPool,
    restart: RestartPolicy,
}

impl Store {
    /// Connects a pool with the default settings. Fails fast when the database is unreachable;
    /// callers decide how to retry.
    pub async fn connect(url: &str) -> Result<Store, StoreError> {
        Store::connect_with(url, PoolSettings::default()).await
    }

    /// Connects a pool of `settings.max_connections`, and the side connections (made when first
    /// used).
    pub async fn connect_with(url: &str, settings: PoolSettings) -> Result<Store, StoreError> {
        let opts = PgConnectOptions::from_str(url)?.application_name("segtrain-coordinator");
        let pool = PgPoolOptions::new()
            .max_connections(settings.max_connections)
            .acquire_timeout(settings.acquire_timeout)
            .connect_with(opts.clone())
            .await?;
        let side = PgPoolOptions::new()
            .max_connections(SIDE_CONNECTIONS)
            .acquire_timeout(Duration::from_secs(3))
            .connect_lazy_with(opts.clone());
        let token_pool = PgPoolOptions::new()
            .max_connections(TOKEN_CONNECTIONS)
            .acquire_timeout(TOKEN_ACQUIRE_TIMEOUT)
            .connect_lazy_with(opts);
        Ok(Store {
            pool,
            side,
            token_pool,
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

    /// The connections that must never wait behind RPCs: LISTEN (one per listener, held) and
    /// the health probe.
    pub fn side_pool(&self) -> &PgPool {
        &self.side
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

fn u32_of(v: i32, what: &str) -> Result<u32, StoreError> {
    u32::try_from(v).map_err(|_| StoreError::Corrupt(format!("{what} is negative: {v}")))
}
