//! The gRPC services the coordinator serves: requests in, store calls, protobuf out.
//!
//! Who may call what is decided before a request gets here, by [`crate::auth`]. This layer
//! validates every request field, turns store errors into gRPC status codes with a
//! message naming the field or object, and knows nothing of SQL.

mod cluster_service;
mod convert;
mod job_access;
mod job_service;
mod paging;
mod team_service;
mod token_service;
mod watch;
mod worker_requests;
mod worker_service;

pub use cluster_service::ClusterApi;
pub use job_service::JobApi;
pub use team_service::TeamApi;
pub use token_service::TokenApi;
pub use watch::Watchers;
pub use worker_service::{WorkerApi, WorkerApiConfig};

use crate::store::StoreError;
use segtrain_proto::refusal;
use tonic::{Code, Status};
use uuid::Uuid;

/// The status a store error becomes on the wire.
pub(crate) fn status_of(e: StoreError) -> Status {
    match e {
        StoreError::NotFound { .. } => Status::not_found(e.to_string()),
        StoreError::Illegal(t) => Status::failed_precondition(t.to_string()),
        StoreError::Conflict(m) => Status::failed_precondition(m),
        StoreError::StaleAttempt(m) => {
            refusal::status(Code::FailedPrecondition, m, refusal::STALE_ATTEMPT)
        }
        StoreError::WorkerHeld { .. } => {
            refusal::status(Code::AlreadyExists, e.to_string(), refusal::WORKER_HELD)
        }
        StoreError::InstanceSecret { .. } => refusal::status(
            Code::PermissionDenied,
            e.to_string(),
            refusal::INSTANCE_SECRET,
        ),
        StoreError::HostBound { .. } => Status::permission_denied(e.to_string()),
        StoreError::Invalid(m) => Status::invalid_argument(m),
        StoreError::Superseded { .. } => refusal::status(
            Code::FailedPrecondition,
            e.to_string(),
            refusal::WORKER_SUPERSEDED,
        ),
        // Reachable, but every connection is taken: the coordinator is overloaded (or a query
        // waits on a lock), which "unreachable" would misdiagnose.
        StoreError::Db(sqlx::Error::PoolTimedOut) => Status::unavailable(
            "all of the coordinator's database connections are busy \
             (--database-max-connections); retry later",
        ),
        StoreError::Db(ref db) if database_away(db) => Status::unavailable(format!(
            "the coordinator's database is unreachable ({e}); retry later"
        )),
        StoreError::Db(_) | StoreError::Migrate(_) | StoreError::Corrupt(_) => {
            tracing::error!(error = %e, "store error");
            Status::internal(e.to_string())
        }
    }
}

/// Errors that mean PostgreSQL is (for now) not there, rather than a bad query: no connection,
/// the server shutting down (SQLSTATE class 57, e.g. 57P01 admin shutdown), or a connection
/// exception (class 08). Clients should retry those.
fn database_away(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(d) => d
            .code()
            .is_some_and(|c| c.starts_with("57") || c.starts_with("08")),
        _ => false,
    }
}

/// Parses a job id field, naming the field in the error.
pub(crate) fn parse_job_id(field: &str, s: &str) -> Result<Uuid, Status> {
    Uuid::parse_str(s.trim()).map_err(|_| {
        Status::invalid_argument(format!(
            "{field}: not a job id (a UUID such as 0196...), got {s:?}"
        ))
    })
}
