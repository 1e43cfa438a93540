//! Training metrics and checkpoint metadata.

use super::{u32_of, u64_of, Store, StoreError};
use chrono::{DateTime, Utc};
use sqlx::types::Json;
use sqlx::{Postgres, Transaction};
use std::collections::BTreeMap;
use uuid::Uuid;

/// The points an evaluation adds to the `metrics` table, beside the names metrics reports use:
/// these three and one `class_iou/CLASS` per class ([`class_iou_point`]). A metrics report may
/// not use them (`api::worker_requests`): the two would share a key, and a metrics event's
/// values are read back as its iteration's points less the evaluation's.
pub const EVAL_POINT_NAMES: [&str; 3] = ["miou", "aacc", "val_loss"];
pub const CLASS_IOU_PREFIX: &str = "class_iou/";

/// Whether `name` is one of an evaluation's points.
pub fn is_eval_point(name: &str) -> bool {
    EVAL_POINT_NAMES.contains(&name) || name.starts_with(CLASS_IOU_PREFIX)
}

/// The point name of class `index` of `num_classes`: `class_iou/road` for Cityscapes' 19
/// classes, `class_iou/7` for another class list.
pub fn class_iou_point(index: usize, num_classes: usize) -> String {
    match segtrain_spec::CITYSCAPES_CLASSES.get(index) {
        Some(name) if num_classes == segtrain_spec::CITYSCAPES_CLASSES.len() => {
            format!("{CLASS_IOU_PREFIX}{name}")
        }
        _ => format!("{CLASS_IOU_PREFIX}{index}"),
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct MetricPoint {
    pub attempt: u32,
    pub iteration: u64,
    pub name: String,
    pub value: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointRecord {
    pub job_id: Uuid,
    pub attempt: u32,
    pub iteration: u64,
    pub uri: String,
    pub bytes: u64,
    pub sha256: String,
    /// PENDING, COMPLETE, CORRUPT or DELETED.
    pub state: String,
    /// The trainer's numbers at the checkpoint (NaN where it had none that was finite).
    pub metrics: BTreeMap<String, f64>,
    pub created_at: DateTime<Utc>,
    /// Written because the run was asked to stop (preemption, resize, cancel).
    pub on_stop: bool,
}

#[derive(sqlx::FromRow)]
struct CheckpointRow {
    job_id: Uuid,
    attempt: i32,
    iteration: i64,
    uri: String,
    bytes: i64,
    sha256: String,
    state: String,
    /// Non-finite values are null in JSON.
    metrics: Json<BTreeMap<String, Option<f64>>>,
    created_at: DateTime<Utc>,
    on_stop: bool,
}

/// GetMetrics' query: job `$1`'s points from iteration `$2` on, at most `$3`, and with `by_name`
/// only the names in `$4`. Every name: `metrics_job_points_idx` in its order up to the limit.
/// Some names: each name's first `$3` on `metrics_job_name_points_idx`, then the first of
/// those, so that a sparse name is as cheap as a dense one. Two texts rather than a catch-all
/// filter, so that even the generic plan of each reads a page (tests/tests/query_plans.rs).
pub fn get_metrics_sql(by_name: bool) -> &'static str {
    if by_name {
        "SELECT p.attempt, p.iteration, p.name, p.value FROM unnest($4::text[]) AS n(name),
           LATERAL (SELECT DISTINCT ON (iteration) attempt, iteration, name, value FROM metrics m
                    WHERE m.job_id = $1 AND m.name = n.name AND m.iteration >= $2
                    ORDER BY iteration, attempt DESC LIMIT $3) AS p
         ORDER BY p.iteration, p.name LIMIT $3"
    } else {
        "SELECT DISTINCT ON (iteration, name) attempt, iteration, name, value FROM metrics
         WHERE job_id = $1 AND iteration >= $2
         ORDER BY iteration, name, attempt DESC LIMIT $3"
    }
}

impl Store {
    /// Stores metric points (iteration, name, value) in one transaction, as [`record_points`]
    /// does for a daemon's report. Returns how many were new.
    pub async fn insert_metrics(
        &self,
        job_id: Uuid,
        attempt: u32,
        points: &[(u64, String, f64)],
    ) -> Result<u64, StoreError> {
        let mut by_iteration: BTreeMap<u64, BTreeMap<String, f64>> = BTreeMap::new();
        for (it, name, v) in points {
            by_iteration
                .entry(*it)
                .or_default()
                .insert(name.clone(), *v);
        }
        let mut tx = self.pool.begin().await?;
        let mut new = 0;
        for (it, values) in &by_iteration {
            new += record_points(&mut tx, job_id, attempt, *it, values).await?;
        }
        tx.commit().await?;
        Ok(new)
    }

    /// Metric points of a job ordered by iteration then name, optionally only some names, from
    /// `since` on, at most `limit`. One point per (iteration, name): the newest attempt's, since
    /// a resumed attempt re-runs the iterations after its checkpoint and supersedes the failed
    /// attempt's points there.
    pub async fn get_metrics(
        &self,
        job_id: Uuid,
        names: &[String],
        since: u64,
        limit: u32,
    ) -> Result<Vec<MetricPoint>, StoreError> {
        let sql = get_metrics_sql(!names.is_empty());
        let mut query = sqlx::query_as(sql)
            .bind(job_id)
            .bind(since as i64)
            .bind(i64::from(limit));
        if !names.is_empty() {
            query = query.bind(names);
        }
        let rows: Vec<(i32, i64, String, f64)> = query.fetch_all(&self.pool).await?;
        rows.into_iter()
            .map(|(attempt, iteration, name, value)| {
                Ok(MetricPoint {
                    attempt: u32_of(attempt, "attempt")?,
                    iteration: u64_of(iteration, "iteration")?,
                    name,
                    value,
                })
            })
            .collect()
    }

    /// Checkpoints of a job, oldest first.
    pub async fn list_checkpoints(
        &self,
        job_id: Uuid,
        include_deleted: bool,
        after: Option<u64>,
        limit: u32,
    ) -> Result<Vec<CheckpointRecord>, StoreError> {
        let rows: Vec<CheckpointRow> = sqlx::query_as(
            "SELECT job_id, attempt, iteration, uri, bytes, sha256, state, metrics, created_at, on_stop
             FROM checkpoints WHERE job_id = $1 AND ($2 OR state <> 'DELETED') AND iteration > $3
             ORDER BY iteration LIMIT $4",
        )
        .bind(job_id)
        .bind(include_deleted)
        .bind(after.map_or(-1, |a| i64::try_from(a).unwrap_or(i64::MAX)))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|r| {
                Ok(CheckpointRecord {
                    job_id: r.job_id,
                    attempt: u32_of(r.attempt, "attempt")?,
                    iteration: u64_of(r.iteration, "iteration")?,
                    uri: r.uri,
                    bytes: u64_of(r.bytes, "bytes")?,
                    sha256: r.sha256,
                    state: r.state,
                    metrics: r
                        .metrics
                        .0
                        .into_iter()
                        .map(|(k, v)| (k, v.unwrap_or(f64::NAN)))
                        .collect(),
                    created_at: r.created_at,
                    on_stop: r.on_stop,
                })
            })
            .collect()
    }
}

/// An event of `attempt` reported `iteration`: raises `jobs.furthest_iteration`, and
/// `jobs.iteration` (the progress) when it is the job's current attempt.
pub(super) async fn bump_iteration(
    tx: &mut Transaction<'_, Postgres>,
    job_id: Uuid,
    attempt: u32,
    iteration: u64,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE jobs SET furthest_iteration = GREATEST(furthest_iteration, $2),
                         iteration = CASE WHEN attempt = $3 THEN GREATEST(iteration, $2)
                                          ELSE iteration END
         WHERE id = $1",
    )
    .bind(job_id)
    .bind(i64::try_from(iteration).unwrap_or(i64::MAX))
    .bind(attempt as i32)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Stores metric points of one iteration in one statement (a point already stored, same job,
/// attempt, iteration and name, is skipped, so a replayed report cannot duplicate it) and
/// raises the job's iteration. Returns how many were new.
pub(super) async fn record_points(
    tx: &mut Transaction<'_, Postgres>,
    job_id: Uuid,
    attempt: u32,
    iteration: u64,
    values: &BTreeMap<String, f64>,
) -> Result<u64, StoreError> {
    let names: Vec<&str> = values.keys().map(String::as_str).collect();
    let vals: Vec<f64> = values.values().copied().collect();
    let new = sqlx::query(
        "INSERT INTO metrics (job_id, attempt, iteration, name, value)
         SELECT $1, $2, $3, * FROM UNNEST($4::text[], $5::float8[])
         ON CONFLICT DO NOTHING",
    )
    .bind(job_id)
    .bind(attempt as i32)
    .bind(iteration as i64)
    .bind(&names)
    .bind(&vals)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    bump_iteration(tx, job_id, attempt, iteration).await?;
    Ok(new)
}
