//! The gRPC services the coordinator serves: requests in, store calls, protobuf out.
//!
//! Who may call what is decided before a request gets here, by [`crate::auth`]. This layer
//! validates every request field, turns store errors into gRPC status codes with a
//! message naming the field or object, and knows nothing of SQL.

mod cluster_service;
mod convert;
mod job_service;
mod token_service;
mod watch;
mod worker_service;

pub use cluster_service::ClusterApi;
pub use job_service::JobApi;
pub use token_service::TokenApi;
pub use watch::EventHub;
pub use worker_service::{WorkerApi, WorkerApiConfig};

use crate::store::StoreError;
use tonic::Status;
use uuid::Uuid;

/// The status a store error becomes on the wire.
pub(crate) fn status_of(e: StoreError) -> Status {
    match e {
        StoreError::NotFound { .. } => Status::not_found(e.to_string()),
        StoreError::Illegal(t) => Status::failed_precondition(t.to_string()),
        StoreError::Conflict(m) => Status::failed_precondition(m),
        StoreError::Db(sqlx::Error::PoolTimedOut)
        | StoreError::Db(sqlx::Error::Io(_))
        | StoreError::Db(sqlx::Error::PoolClosed) => Status::unavailable(format!(
            "the coordinator's database is unreachable ({e}); retry later"
        )),
        StoreError::Db(_) | StoreError::Migrate(_) | StoreError::Corrupt(_) => {
            tracing::error!(error = %e, "store error");
            Status::internal(e.to_string())
        }
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
