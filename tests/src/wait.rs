//! Waiting for a condition that the processes under test make true in their own time.

use std::future::Future;
use std::time::{Duration, Instant};

/// Checks `check` every 100 ms until it is true. After `timeout`, panics naming `what` it waited
/// for, with `logs()` (the processes' logs, to see why): the one polling loop the tests share.
pub async fn poll_until<F, Fut>(timeout: Duration, what: &str, logs: impl Fn() -> String, check: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for: {what}\n{}",
            logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// [`poll_until`] for a check that can fail, such as a SQL query while PostgreSQL restarts: true
/// once `check` answers `Ok(true)`; an error counts as "not yet".
pub async fn poll_until_ok<F, Fut, E>(
    timeout: Duration,
    what: &str,
    logs: impl Fn() -> String,
    check: F,
) where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<bool, E>>,
{
    poll_until(timeout, what, logs, || async {
        check().await.ok() == Some(true)
    })
    .await;
}
