//! ReportEvents: a daemon's numbered events, applied once each, all in one transaction.
//!
//! The worker row holds `acked_seq`, the highest sequence number stored for it. A batch is
//! applied under that row's lock: events at or below it are skipped (a resend after a lost
//! acknowledgement), the rest are applied in sequence order together with the new `acked_seq`.
//! Every event must name the job's current attempt and a rank assigned to this worker; one that
//! does not refuses the whole batch and writes nothing.

use super::attempts::{fence, finish_rank, start_rank, unknown_job_is_stale, RankOutcome};
use super::checkpoint_scope;
use super::instances::{instance_verdict, Holder, InstanceProof, HOLDER_COLUMNS};
use super::jobs::{insert_event, lock_job_attempt, parse_job_state};
use super::metrics::{bump_iteration, class_iou_point, record_points, EVAL_POINT_NAMES};
use super::{u64_of, RestartPolicy, Store, StoreError};
use crate::events::{json_number, json_values, EventPayload};
use sqlx::types::Json;
use sqlx::{Postgres, Transaction};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use uuid::Uuid;

/// One event from a daemon, already validated field by field.
#[derive(Debug, Clone, PartialEq)]
pub struct IngestEvent {
    pub seq: u64,
    pub job_id: Uuid,
    pub attempt: u32,
    pub rank: u32,
    pub body: IngestBody,
}

#[derive(Debug, Clone, PartialEq)]
pub enum IngestBody {
    Started,
    Metrics {
        iteration: u64,
        values: BTreeMap<String, f64>,
    },
    Eval {
        iteration: u64,
        miou: f64,
        aacc: f64,
        loss: f64,
        class_iou: Vec<f64>,
    },
    Checkpoint {
        iteration: u64,
        uri: String,
        bytes: u64,
        sha256: String,
        metrics: BTreeMap<String, f64>,
        /// Written because the run was asked to stop (the newest state of the attempt).
        on_stop: bool,
    },
    Finished {
        outcome: RankOutcome,
        reason: String,
    },
    Note {
        text: String,
    },
    /// Rank 0 began writing this checkpoint.
    CheckpointPending {
        iteration: u64,
        uri: String,
    },
    /// Retention removed these checkpoints.
    CheckpointsDeleted {
        uris: Vec<String>,
    },
    /// The attempt resumed from `uri` (at `iteration`), skipping newer unusable checkpoints.
    Resumed {
        iteration: u64,
        uri: String,
        /// (iteration, uri, why)
        skipped: Vec<(u64, String, String)>,
    },
}

/// The worker row a batch locks: its acknowledged sequence and who holds it.
#[derive(sqlx::FromRow)]
struct IngestingRow {
    acked_seq: i64,
    #[sqlx(flatten)]
    holder: Holder,
}

/// What a ReportEvents batch did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Ingested {
    /// The worker's acknowledged sequence number afterwards.
    pub acked: u64,
    /// The sequence numbers applied by this batch (not those stored before: a resend).
    pub applied: Vec<u64>,
    /// Attempts whose last rank started in this batch (now RUNNING), with the time since their
    /// placement.
    pub running: Vec<(Uuid, u32, std::time::Duration)>,
}

impl Store {
    /// Applies a batch; returns the worker's acknowledged sequence number afterwards and what
    /// was new.
    pub async fn ingest_events(
        &self,
        worker_id: Uuid,
        proof: &InstanceProof,
        events: &[IngestEvent],
    ) -> Result<Ingested, StoreError> {
        let mut tx = self.pool.begin().await?;
        let sql =
            format!("SELECT acked_seq, {HOLDER_COLUMNS} FROM workers WHERE id = $1 FOR UPDATE");
        let row: Option<IngestingRow> = sqlx::query_as(&sql)
            .bind(worker_id)
            .fetch_optional(&mut *tx)
            .await?;
        let acked = row.as_ref().map_or(0, |r| r.acked_seq);
        instance_verdict(worker_id, proof, row.map(|r| r.holder))?;
        let acked = u64_of(acked, "acked_seq")?;
        let mut fresh: Vec<&IngestEvent> = events.iter().filter(|e| e.seq > acked).collect();
        fresh.sort_by_key(|e| e.seq);
        fresh.dedup_by_key(|e| e.seq);
        let Some(last) = fresh.last().map(|e| e.seq) else {
            tx.rollback().await?;
            return Ok(Ingested {
                acked,
                ..Ingested::default()
            });
        };

        // Fence every (job, attempt, rank) first, locking jobs in id order.
        let jobs: BTreeSet<Uuid> = fresh.iter().map(|e| e.job_id).collect();
        let mut current: HashMap<Uuid, u32> = HashMap::new();
        for id in jobs {
            let attempt = lock_job_attempt(&mut tx, id)
                .await
                .map_err(unknown_job_is_stale)?;
            current.insert(id, attempt);
        }
        let ranks: BTreeSet<(Uuid, u32, u32)> = fresh
            .iter()
            .map(|e| (e.job_id, e.attempt, e.rank))
            .collect();
        for (job_id, attempt, rank) in ranks {
            fence(job_id, current[&job_id], attempt)?;
            let holder: Option<Uuid> = sqlx::query_scalar(
                "SELECT worker_id FROM attempt_ranks WHERE job_id = $1 AND attempt = $2 AND rank = $3",
            )
            .bind(job_id)
            .bind(attempt as i32)
            .bind(rank as i32)
            .fetch_optional(&mut *tx)
            .await?;
            if holder != Some(worker_id) {
                return Err(StoreError::Conflict(format!(
                    "job {job_id} attempt {attempt}: rank {rank} is not assigned to worker {worker_id}"
                )));
            }
        }

        checkpoint_scope::check_events(&mut tx, &fresh).await?;

        let mut done = Ingested {
            acked: last,
            applied: fresh.iter().map(|e| e.seq).collect(),
            running: Vec::new(),
        };
        for ev in fresh {
            if let Some(placed_ago) = apply(&mut tx, ev, &self.restart).await? {
                done.running.push((ev.job_id, ev.attempt, placed_ago));
            }
        }
        sqlx::query("UPDATE workers SET acked_seq = $2 WHERE id = $1")
            .bind(worker_id)
            .bind(last as i64)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(done)
    }
}

/// Whether the job still records events (a finished job's log is closed: WatchJob has ended).
/// The caller holds the job's row lock already (the fence took it), so this reads the state
/// alone: an event before this one in the same report may have ended the job.
async fn open(tx: &mut Transaction<'_, Postgres>, job_id: Uuid) -> Result<bool, StoreError> {
    let state: String = sqlx::query_scalar("SELECT state FROM jobs WHERE id = $1")
        .bind(job_id)
        .fetch_one(&mut **tx)
        .await?;
    Ok(!parse_job_state(job_id, &state)?.is_terminal())
}

/// Applies one event; returns the time since placement when it was the last rank's `started`.
async fn apply(
    tx: &mut Transaction<'_, Postgres>,
    ev: &IngestEvent,
    policy: &RestartPolicy,
) -> Result<Option<std::time::Duration>, StoreError> {
    let (job_id, attempt) = (ev.job_id, ev.attempt);
    match &ev.body {
        IngestBody::Started => return start_rank(tx, job_id, attempt, ev.rank).await,
        IngestBody::Finished { outcome, reason } => {
            finish_rank(tx, job_id, attempt, ev.rank, *outcome, reason, policy).await?;
        }
        IngestBody::Metrics { iteration, values } => {
            let new = record_points(tx, job_id, attempt, *iteration, values).await?;
            // A report whose every point is already stored is a replay: no second event. The
            // event names the iteration only: its values are the points just stored, read back
            // by `events_after`, so each point is stored once.
            if (new > 0 || values.is_empty()) && open(tx, job_id).await? {
                let payload = EventPayload::Metrics {
                    iteration: *iteration,
                    values: BTreeMap::new(),
                };
                insert_event(tx, job_id, attempt, &payload).await?;
            }
        }
        IngestBody::Eval {
            iteration,
            miou,
            aacc,
            loss,
            class_iou,
        } => {
            // The scores are metric points too, so curves (`segtrain plot`), GetMetrics and the
            // exports see them, per class included.
            let mut points: BTreeMap<String, f64> = EVAL_POINT_NAMES
                .iter()
                .map(|n| n.to_string())
                .zip([*miou, *aacc, *loss])
                .collect();
            let n = class_iou.len();
            points.extend((0..n).map(|i| (class_iou_point(i, n), class_iou[i])));
            record_points(tx, job_id, attempt, *iteration, &points).await?;
            if open(tx, job_id).await? {
                let payload = EventPayload::Eval {
                    iteration: *iteration,
                    miou: json_number(*miou),
                    aacc: json_number(*aacc),
                    loss: json_number(*loss),
                    class_iou: class_iou.iter().map(|v| json_number(*v)).collect(),
                };
                insert_event(tx, job_id, attempt, &payload).await?;
            }
        }
        IngestBody::Checkpoint {
            iteration,
            uri,
            bytes,
            sha256,
            metrics,
            on_stop,
        } => {
            let metrics = json_values(metrics);
            // An identical row already stored (a replay) is left alone and gets no new event.
            let changed: Option<i64> = sqlx::query_scalar(
                "INSERT INTO checkpoints
                     (job_id, attempt, iteration, uri, bytes, sha256, state, metrics, on_stop)
                 VALUES ($1, $2, $3, $4, $5, $6, 'COMPLETE', $7, $8)
                 ON CONFLICT (job_id, iteration) DO UPDATE
                     SET attempt = EXCLUDED.attempt, uri = EXCLUDED.uri, bytes = EXCLUDED.bytes,
                         sha256 = EXCLUDED.sha256, state = 'COMPLETE', metrics = EXCLUDED.metrics,
                         on_stop = EXCLUDED.on_stop
                     WHERE (checkpoints.attempt, checkpoints.uri, checkpoints.bytes,
                            checkpoints.sha256, checkpoints.state, checkpoints.metrics,
                            checkpoints.on_stop)
                           IS DISTINCT FROM
                           (EXCLUDED.attempt, EXCLUDED.uri, EXCLUDED.bytes,
                            EXCLUDED.sha256, 'COMPLETE', EXCLUDED.metrics, EXCLUDED.on_stop)
                 RETURNING iteration",
            )
            .bind(job_id)
            .bind(attempt as i32)
            .bind(*iteration as i64)
            .bind(uri)
            .bind(i64::try_from(*bytes).unwrap_or(i64::MAX))
            .bind(sha256)
            .bind(Json(&metrics))
            .bind(*on_stop)
            .fetch_optional(&mut **tx)
            .await?;
            bump_iteration(tx, job_id, attempt, *iteration).await?;
            if changed.is_some() && open(tx, job_id).await? {
                let payload = EventPayload::Checkpoint {
                    iteration: *iteration,
                    uri: uri.clone(),
                    bytes: *bytes,
                    sha256: sha256.clone(),
                    metrics,
                    on_stop: *on_stop,
                };
                insert_event(tx, job_id, attempt, &payload).await?;
            }
        }
        IngestBody::CheckpointPending { iteration, uri } => {
            // The files at `uri` are being (re)written: a row for this iteration, whichever
            // attempt made it, is not resumable until the matching `checkpoint` event.
            sqlx::query(
                "INSERT INTO checkpoints (job_id, attempt, iteration, uri, state)
                 VALUES ($1, $2, $3, $4, 'PENDING')
                 ON CONFLICT (job_id, iteration) DO UPDATE
                     SET attempt = EXCLUDED.attempt, uri = EXCLUDED.uri, bytes = 0,
                         sha256 = '', state = 'PENDING', metrics = '{}', created_at = now()
                     WHERE checkpoints.state <> 'COMPLETE' OR checkpoints.attempt <> EXCLUDED.attempt
                        OR checkpoints.uri <> EXCLUDED.uri",
            )
            .bind(job_id)
            .bind(attempt as i32)
            .bind(*iteration as i64)
            .bind(uri)
            .execute(&mut **tx)
            .await?;
        }
        IngestBody::CheckpointsDeleted { uris } => {
            // A trainer deletes only its own attempt's checkpoints; a report naming another's
            // changes nothing.
            sqlx::query(
                "UPDATE checkpoints SET state = 'DELETED'
                 WHERE job_id = $1 AND uri = ANY($2) AND attempt = $3 AND state <> 'DELETED'",
            )
            .bind(job_id)
            .bind(uris)
            .bind(attempt as i32)
            .execute(&mut **tx)
            .await?;
        }
        IngestBody::Resumed {
            iteration,
            uri,
            skipped,
        } => {
            sqlx::query(
                "UPDATE jobs SET resumed_from_iteration = $2, iteration = GREATEST(iteration, $2)
                 WHERE id = $1 AND attempt = $3",
            )
            .bind(job_id)
            .bind(*iteration as i64)
            .bind(attempt as i32)
            .execute(&mut **tx)
            .await?;
            sqlx::query(
                "UPDATE attempts SET resume_uri = $3, resume_iter = $4
                 WHERE job_id = $1 AND attempt = $2",
            )
            .bind(job_id)
            .bind(attempt as i32)
            .bind(uri)
            .bind(*iteration as i64)
            .execute(&mut **tx)
            .await?;
            let mut text = String::new();
            for (it, bad_uri, why) in skipped {
                sqlx::query(
                    "UPDATE checkpoints SET state = 'CORRUPT'
                     WHERE job_id = $1 AND uri = $2 AND state = 'COMPLETE'",
                )
                .bind(job_id)
                .bind(bad_uri)
                .execute(&mut **tx)
                .await?;
                text.push_str(&format!(
                    "checkpoint of iteration {it} ({bad_uri}) is unusable and marked CORRUPT: {why}; "
                ));
            }
            if !skipped.is_empty() {
                text.push_str("fell back to the previous complete checkpoint; ");
            }
            text.push_str(&format!(
                "attempt {attempt} resumed from iteration {iteration} ({uri})"
            ));
            if open(tx, job_id).await? {
                insert_event(tx, job_id, attempt, &EventPayload::Note { text }).await?;
            }
        }
        IngestBody::Note { text } => {
            if open(tx, job_id).await? {
                insert_event(
                    tx,
                    job_id,
                    attempt,
                    &EventPayload::Note { text: text.clone() },
                )
                .await?;
            }
        }
    }
    Ok(None)
}
