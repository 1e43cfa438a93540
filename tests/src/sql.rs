//! One-line reads of the coordinator's tables for a test's assertions: `$1` is a job id as text.

use sqlx::{PgPool, Postgres};

/// Every value `sql` selects about `job`, in its order.
pub async fn job_values<T>(pool: &PgPool, sql: &str, job: &str) -> Vec<T>
where
    T: for<'r> sqlx::Decode<'r, Postgres> + sqlx::Type<Postgres> + Send + Unpin,
{
    sqlx::query_scalar(sql)
        .bind(job)
        .fetch_all(pool)
        .await
        .unwrap_or_else(|e| panic!("{sql} ({job}): {e}"))
}

/// The first value `sql` selects about `job` (there must be one).
pub async fn job_value<T>(pool: &PgPool, sql: &str, job: &str) -> T
where
    T: for<'r> sqlx::Decode<'r, Postgres> + sqlx::Type<Postgres> + Send + Unpin,
{
    let values = job_values(pool, sql, job).await;
    values
        .into_iter()
        .next()
        .unwrap_or_else(|| panic!("{sql} ({job}): no row"))
}

/// Each rank's outcome in the attempt, in rank order (empty text while it runs).
pub async fn rank_outcomes(pool: &PgPool, job: &str, attempt: i32) -> Vec<String> {
    let sql = format!(
        "SELECT coalesce(outcome, '') FROM attempt_ranks
         WHERE job_id = $1::uuid AND attempt = {attempt} ORDER BY rank"
    );
    job_values(pool, &sql, job).await
}

/// Why the attempt ended (or what it is doing), as the store recorded it.
pub async fn attempt_reason(pool: &PgPool, job: &str, attempt: i32) -> String {
    let sql =
        format!("SELECT reason FROM attempts WHERE job_id = $1::uuid AND attempt = {attempt}");
    job_value(pool, &sql, job).await
}

/// Polls until `sql` (one boolean about `job`) is true; after `timeout`, panics naming `what`,
/// with `logs()`.
pub async fn wait_until(
    pool: &PgPool,
    sql: &str,
    job: &str,
    timeout: std::time::Duration,
    what: &str,
    logs: impl Fn() -> String,
) {
    let check = || async { job_value::<bool>(pool, sql, job).await };
    crate::wait::poll_until(timeout, what, logs, check).await;
}
