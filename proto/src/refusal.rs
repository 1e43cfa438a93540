//! Machine-readable reasons on refusals: a `google.rpc.ErrorInfo` in the status details (domain
//! [`DOMAIN`]), for the refusals a caller must tell apart from others with the same code. The
//! meaning of each is in `segtrain/v1/worker.proto`.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// The `ErrorInfo.domain` of every segtrain reason.
pub const DOMAIN: &str = "segtrain.v1";

/// FAILED_PRECONDITION: an attempt that is not the job's current one. Drop its events.
pub const STALE_ATTEMPT: &str = "STALE_ATTEMPT";

/// ALREADY_EXISTS on Register: another daemon instance holds this host and GPU.
pub const WORKER_HELD: &str = "WORKER_HELD";

/// FAILED_PRECONDITION: another daemon instance registered for this worker since.
pub const WORKER_SUPERSEDED: &str = "WORKER_SUPERSEDED";

/// PERMISSION_DENIED: the request names the instance holding the worker without its secret.
pub const INSTANCE_SECRET: &str = "INSTANCE_SECRET";

/// A status with `message` for people and `reason` for programs.
pub fn status(code: Code, message: impl Into<String>, reason: &str) -> Status {
    Status::with_error_details(
        code,
        message,
        ErrorDetails::with_error_info(reason, DOMAIN, std::collections::HashMap::new()),
    )
}

/// The segtrain reason a status carries, if any.
pub fn reason(s: &Status) -> Option<String> {
    s.get_details_error_info()
        .filter(|i| i.domain == DOMAIN)
        .map(|i| i.reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reason_survives_the_status_and_plain_statuses_have_none() {
        let s = status(
            Code::FailedPrecondition,
            "stale attempt: job x",
            STALE_ATTEMPT,
        );
        assert_eq!(s.code(), Code::FailedPrecondition);
        assert_eq!(s.message(), "stale attempt: job x");
        assert_eq!(reason(&s).as_deref(), Some(STALE_ATTEMPT));
        assert_eq!(reason(&Status::failed_precondition("conflict")), None);
    }
}
