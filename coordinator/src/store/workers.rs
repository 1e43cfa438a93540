//! Worker daemons as the coordinator knows them: registration (one row per host and GPU, so the
//! id survives daemon restarts), which daemon instance holds each row, leases and heartbeats, the
//! lease reaper, and the cluster view.

use super::attempts::{finish_rank, parse_attempt_state, rank_should_run, RankOutcome};
use super::heartbeat::Beat;
use super::instances::{may_take, not_found, Claim, Holder, Take, HOLDER_COLUMNS, PROVEN};
use super::jobs::{lock_job, parse_job_state};
use super::{notify, u32_of, u64_of, Store, StoreError, WORKERS_CHANNEL};
use crate::state::{JobState, WorkerState};
use chrono::{DateTime, Utc};
use sqlx::{Postgres, Transaction};
use std::collections::BTreeSet;
use std::time::Duration;
use uuid::Uuid;

#[derive(Debug, Clone, PartialEq)]
pub struct WorkerRecord {
    pub id: Uuid,
    /// The daemon's `--host` and GPU index (-1: a CPU worker): one row per pair.
    pub host: String,
    pub gpu_index: i32,
    /// What the daemon reported at registration (`cpu` for a CPU worker).
    pub gpu_name: String,
    pub gpu_memory_bytes: u64,
    pub state: WorkerState,
    pub last_heartbeat: DateTime<Utc>,
    /// Declared LOST after this unless a heartbeat renews it.
    pub lease_until: DateTime<Utc>,
    /// The rank it holds and has not finished, if any: (job, attempt, rank).
    pub assignment: Option<(Uuid, u32, u32)>,
    /// Its daemon said it is going away: no new rank until a daemon registers again.
    pub leaving: bool,
}

/// One rank of one attempt of a job (a row of `attempt_ranks`; `segtrain.v1.AttemptRank`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AttemptRank {
    pub job_id: Uuid,
    pub attempt: u32,
    pub rank: u32,
}

/// What a daemon says about itself when it (re-)registers.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerRegistration {
    pub host: String,
    pub gpu_index: i32,
    pub gpu_name: String,
    pub gpu_memory_bytes: u64,
    /// Trainers the daemon still runs.
    pub running: Vec<AttemptRank>,
    /// The daemon process (random per start), the instance it succeeds, and the secrets it
    /// shows for each (see `instances.rs`).
    pub claim: Claim,
    /// The SHA-256 of the secret this instance gets if it takes the row from another (or from
    /// nobody); the caller made the secret and hands it out when [`Registered::secret_issued`].
    pub new_secret_sha256: [u8; 32],
}

#[derive(Debug, Clone, PartialEq)]
pub struct Registered {
    pub id: Uuid,
    pub state: WorkerState,
    pub acked_seq: u64,
    pub lease_until: DateTime<Utc>,
    /// The instance took the row and holds the new secret (false: it keeps the one it has).
    pub secret_issued: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Heartbeat {
    pub lease_until: DateTime<Utc>,
    /// Ranks the daemon listed as running that it must stop.
    pub stop: Vec<AttemptRank>,
}

/// The row a registration locks: its lease, and who holds it.
#[derive(sqlx::FromRow)]
struct RegisteringRow {
    id: Uuid,
    lease_until: DateTime<Utc>,
    /// The lease is live (not expired, not LOST).
    live: bool,
    #[sqlx(flatten)]
    holder: Holder,
}

#[derive(sqlx::FromRow)]
struct WorkerRow {
    id: Uuid,
    host: String,
    gpu_index: i32,
    gpu_name: String,
    gpu_memory_bytes: i64,
    state: String,
    last_heartbeat: DateTime<Utc>,
    lease_until: DateTime<Utc>,
    leaving: bool,
    job_id: Option<Uuid>,
    attempt: Option<i32>,
    rank: Option<i32>,
}

/// What the coordinator knows about a rank a daemon says it runs.
#[derive(sqlx::FromRow)]
struct ListedRank {
    job_attempt: i32,
    job_state: String,
    attempt_state: Option<String>,
    worker_id: Option<Uuid>,
    finished: bool,
}

pub(super) fn worker_state(id: Uuid, s: &str) -> Result<WorkerState, StoreError> {
    WorkerState::parse(s).ok_or_else(|| StoreError::Corrupt(format!("worker {id} state {s:?}")))
}

pub(super) fn lease_secs(lease: Duration) -> f64 {
    lease.as_secs_f64()
}

/// Unfinished ranks of a worker: (job, attempt, rank, started).
pub(super) async fn open_ranks(
    tx: &mut Transaction<'_, Postgres>,
    worker: Uuid,
) -> Result<Vec<(AttemptRank, bool)>, StoreError> {
    let rows: Vec<(Uuid, i32, i32, bool)> = sqlx::query_as(
        "SELECT job_id, attempt, rank, started_at IS NOT NULL FROM attempt_ranks
         WHERE worker_id = $1 AND finished_at IS NULL ORDER BY job_id, attempt, rank",
    )
    .bind(worker)
    .fetch_all(&mut **tx)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(job_id, attempt, rank, started)| {
            (
                AttemptRank {
                    job_id,
                    attempt: attempt.max(0) as u32,
                    rank: rank.max(0) as u32,
                },
                started,
            )
        })
        .collect())
}

/// Sets a worker's state along the worker table (no-op when unchanged). The caller holds the
/// worker's row lock.
pub(super) async fn set_worker_state(
    tx: &mut Transaction<'_, Postgres>,
    id: Uuid,
    from: WorkerState,
    to: WorkerState,
) -> Result<(), StoreError> {
    if from == to {
        return Ok(());
    }
    from.check_transition(to)?;
    sqlx::query("UPDATE workers SET state = $2 WHERE id = $1")
        .bind(id)
        .bind(to.as_str())
        .execute(&mut **tx)
        .await?;
    notify(tx, WORKERS_CHANNEL, id).await
}

/// The state a worker should be in given whether it holds an unfinished rank: a drained one
/// stays DRAINING either way (see `drain.rs`).
fn settled_state(current: WorkerState, busy: bool) -> WorkerState {
    match (current, busy) {
        (WorkerState::Draining, _) => WorkerState::Draining,
        (_, true) => WorkerState::Busy,
        (_, false) => WorkerState::Idle,
    }
}

impl Store {
    /// Registers a daemon: one row per (host, GPU index), so a restarted daemon gets its id (and
    /// its acknowledged event sequence) back. The lease starts now.
    ///
    /// Ranks assigned to the worker and not listed in `running` have no trainer any more. One that
    /// never started is kept (its `start` is sent again); one that had started finished with it
    /// (the daemon restarted under it): it ends FAILED_INFRA, or CANCELED when its attempt or job
    /// was stopping anyway. The worker is BUSY while it holds an unfinished rank, IDLE otherwise.
    ///
    /// One instance holds a row at a time: while another holds a live lease, registering is
    /// refused (`WorkerHeld`) unless `previous_instance_id` names it (a restarted daemon).
    pub async fn register_worker(
        &self,
        reg: &WorkerRegistration,
        lease: Duration,
    ) -> Result<Registered, StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO workers (id, host, gpu_index, gpu_name, gpu_memory_bytes, state, lease_until)
             VALUES ($1, $2, $3, $4, $5, 'IDLE', now())
             ON CONFLICT (host, gpu_index) DO NOTHING",
        )
        .bind(Uuid::now_v7())
        .bind(&reg.host)
        .bind(reg.gpu_index)
        .bind(&reg.gpu_name)
        .bind(i64::try_from(reg.gpu_memory_bytes).unwrap_or(i64::MAX))
        .execute(&mut *tx)
        .await?;
        let sql = format!(
            "SELECT id, lease_until, lease_until > now() AND state <> 'LOST' AS live, {HOLDER_COLUMNS}
             FROM workers WHERE host = $1 AND gpu_index = $2 FOR UPDATE"
        );
        let row: RegisteringRow = sqlx::query_as(&sql)
            .bind(&reg.host)
            .bind(reg.gpu_index)
            .fetch_one(&mut *tx)
            .await?;
        let (id, held_until, live, holder) = (row.id, row.lease_until, row.live, row.holder);
        let Some(take) = may_take(&reg.claim, Some(&holder), live) else {
            tx.rollback().await?;
            return Err(StoreError::WorkerHeld {
                host: reg.host.clone(),
                gpu_index: reg.gpu_index,
                instance: holder.instance_id.unwrap_or_default(),
                since: holder.instance_since.unwrap_or(held_until),
                lease_until: held_until,
            });
        };
        let instance = reg.claim.instance;
        if holder.instance_id.is_some_and(|h| h != instance) {
            tracing::info!(worker = %id, host = %reg.host, gpu = reg.gpu_index, old = ?holder.instance_id, new = %instance, "another daemon instance takes the worker");
        }
        let new_secret = (take == Take::Issue).then_some(&reg.new_secret_sha256[..]);
        let (acked, lease_until): (i64, DateTime<Utc>) = sqlx::query_as(
            "UPDATE workers
                 SET gpu_name = $2, gpu_memory_bytes = $3, registered_at = now(),
                     last_heartbeat = now(), lease_until = now() + make_interval(secs => $4),
                     instance_since = CASE WHEN instance_id IS NOT DISTINCT FROM $5
                                           THEN instance_since ELSE now() END,
                     -- A new daemon (the VM came back) is not the one that was leaving.
                     leaving = leaving AND instance_id IS NOT DISTINCT FROM $5,
                     instance_id = $5,
                     instance_secret_sha256 = coalesce($6, instance_secret_sha256)
             WHERE id = $1
             RETURNING acked_seq, lease_until",
        )
        .bind(id)
        .bind(&reg.gpu_name)
        .bind(i64::try_from(reg.gpu_memory_bytes).unwrap_or(i64::MAX))
        .bind(lease_secs(lease))
        .bind(instance)
        .bind(new_secret)
        .fetch_one(&mut *tx)
        .await?;
        let running: BTreeSet<AttemptRank> = reg.running.iter().copied().collect();
        let mut busy = false;
        for (r, started) in open_ranks(&mut tx, id).await? {
            if running.contains(&r) {
                busy = true;
                continue;
            }
            let job = lock_job(&mut tx, r.job_id).await?;
            let live = self
                .rank_is_live(&mut tx, &r, job.attempt, job.state)
                .await?;
            if !started && live {
                busy = true; // not started yet: the assignment stream sends it again
                continue;
            }
            let (outcome, reason) = if live {
                (
                    RankOutcome::FailedInfra,
                    format!(
                        "worker {} re-registered without the trainer of this rank (daemon restart?)",
                        super::worker_name(&reg.host, reg.gpu_index)
                    ),
                )
            } else {
                (
                    RankOutcome::Canceled,
                    "no trainer left after the worker re-registered".to_string(),
                )
            };
            finish_rank(
                &mut tx,
                r.job_id,
                r.attempt,
                r.rank,
                outcome,
                &reason,
                &self.restart,
            )
            .await?;
        }
        // Read the state now: finish_rank may have freed the worker already.
        let state: String = sqlx::query_scalar("SELECT state FROM workers WHERE id = $1")
            .bind(id)
            .fetch_one(&mut *tx)
            .await?;
        let current = worker_state(id, &state)?;
        let target = settled_state(current, busy);
        set_worker_state(&mut tx, id, current, target).await?;
        notify(&mut tx, WORKERS_CHANNEL, id).await?;
        tx.commit().await?;
        Ok(Registered {
            id,
            state: target,
            acked_seq: u64_of(acked, "acked_seq")?,
            lease_until,
            secret_issued: new_secret.is_some(),
        })
    }

    /// Whether a rank's attempt is the job's current one, still live, and the job still wants it.
    async fn rank_is_live(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        r: &AttemptRank,
        job_attempt: u32,
        job_state: JobState,
    ) -> Result<bool, StoreError> {
        let state: String =
            sqlx::query_scalar("SELECT state FROM attempts WHERE job_id = $1 AND attempt = $2")
                .bind(r.job_id)
                .bind(r.attempt as i32)
                .fetch_one(&mut **tx)
                .await?;
        Ok(rank_should_run(
            job_attempt,
            job_state,
            r.attempt,
            parse_attempt_state(&state)?,
        ))
    }

    /// [`Store::heartbeat`] in full: one transaction that also finishes the ranks the worker no
    /// longer runs and brings a LOST worker back (heartbeat.rs tries the common case first).
    pub(super) async fn heartbeat_in_full(&self, beat: &Beat<'_>) -> Result<Heartbeat, StoreError> {
        let Beat {
            worker: id,
            proof,
            running,
            leaving,
            lease,
        } = *beat;
        let mut tx = self.pool.begin().await?;
        let row: Option<(String, DateTime<Utc>)> = sqlx::query_as(&format!(
            "UPDATE workers SET last_heartbeat = now(),
                                lease_until = now() + make_interval(secs => $2),
                                leaving = leaving OR $4
             WHERE id = $1 AND {PROVEN} RETURNING state, lease_until"
        ))
        .bind(id)
        .bind(lease_secs(lease))
        .bind(proof.instance)
        .bind(leaving)
        .bind(&proof.secret_sha256[..])
        .bind(proof.bound_host.as_deref())
        .fetch_optional(&mut *tx)
        .await?;
        let Some((state, lease_until)) = row else {
            tx.rollback().await?;
            // Unknown, another instance's, or not proven: say which.
            self.check_worker_instance(id, proof).await?;
            return Err(not_found(id));
        };
        let state = worker_state(id, &state)?;
        // A rank it was told to stop and no longer runs has stopped, whether or not its
        // `finished` event arrives (a stale attempt's events are refused).
        let listed: BTreeSet<AttemptRank> = running.iter().copied().collect();
        for (r, _) in open_ranks(&mut tx, id).await? {
            if listed.contains(&r) {
                continue;
            }
            let job = lock_job(&mut tx, r.job_id).await?;
            if self
                .rank_is_live(&mut tx, &r, job.attempt, job.state)
                .await?
            {
                continue;
            }
            finish_rank(
                &mut tx,
                r.job_id,
                r.attempt,
                r.rank,
                RankOutcome::Canceled,
                "stopped: the worker no longer runs it",
                &self.restart,
            )
            .await?;
        }
        if state == WorkerState::Lost {
            let busy = !open_ranks(&mut tx, id).await?.is_empty();
            set_worker_state(&mut tx, id, state, settled_state(state, busy)).await?;
        }
        let mut stop = Vec::new();
        for r in running {
            let row: Option<ListedRank> = sqlx::query_as(
                "SELECT j.attempt AS job_attempt, j.state AS job_state,
                        a.state AS attempt_state, ar.worker_id,
                        ar.finished_at IS NOT NULL AS finished
                 FROM jobs j
                 LEFT JOIN attempts a ON a.job_id = j.id AND a.attempt = $2
                 LEFT JOIN attempt_ranks ar
                        ON ar.job_id = j.id AND ar.attempt = $2 AND ar.rank = $3
                 WHERE j.id = $1",
            )
            .bind(r.job_id)
            .bind(r.attempt as i32)
            .bind(r.rank as i32)
            .fetch_optional(&mut *tx)
            .await?;
            let keep = match row {
                Some(ListedRank {
                    job_attempt,
                    job_state,
                    attempt_state: Some(attempt_state),
                    worker_id,
                    finished,
                }) => {
                    worker_id == Some(id)
                        && !finished
                        && rank_should_run(
                            u32_of(job_attempt, "jobs.attempt")?,
                            parse_job_state(r.job_id, &job_state)?,
                            r.attempt,
                            parse_attempt_state(&attempt_state)?,
                        )
                }
                _ => false,
            };
            if !keep {
                stop.push(*r);
            }
        }
        tx.commit().await?;
        Ok(Heartbeat { lease_until, stop })
    }

    /// Declares every worker whose lease has expired LOST. Each unfinished rank it held ends
    /// LOST, which fails its attempt and job (or, for a canceling job, counts as stopped) and
    /// tells the other ranks to stop. Returns the workers declared lost.
    pub async fn reap_expired_workers(&self) -> Result<Vec<Uuid>, StoreError> {
        let expired: Vec<Uuid> = sqlx::query_scalar(
            "SELECT id FROM workers WHERE state <> 'LOST' AND lease_until < now() ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut lost = Vec::new();
        for id in expired {
            let mut tx = self.pool.begin().await?;
            // Re-check under the lock: a heartbeat may have renewed it meanwhile.
            let row: Option<(String, String, i32, DateTime<Utc>)> = sqlx::query_as(
                "SELECT state, host, gpu_index, last_heartbeat FROM workers
                 WHERE id = $1 AND state <> 'LOST' AND lease_until < now()
                 FOR UPDATE SKIP LOCKED",
            )
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
            let Some((state, host, gpu, last)) = row else {
                tx.rollback().await?;
                continue;
            };
            let state = worker_state(id, &state)?;
            let reason = format!(
                "worker {} lost: no heartbeat since {}",
                super::worker_name(&host, gpu),
                last.format("%Y-%m-%dT%H:%M:%SZ")
            );
            for (r, _) in open_ranks(&mut tx, id).await? {
                lock_job(&mut tx, r.job_id).await?;
                finish_rank(
                    &mut tx,
                    r.job_id,
                    r.attempt,
                    r.rank,
                    RankOutcome::Lost,
                    &reason,
                    &self.restart,
                )
                .await?;
            }
            set_worker_state(&mut tx, id, state, WorkerState::Lost).await?;
            tx.commit().await?;
            tracing::warn!(worker = %id, %host, gpu, "worker lease expired; declared lost");
            lost.push(id);
        }
        Ok(lost)
    }

    /// Registered workers by host and GPU index: those after the worker `after` (its host and
    /// GPU), at most `limit`.
    pub async fn list_workers(
        &self,
        after: Option<Uuid>,
        limit: u32,
    ) -> Result<Vec<WorkerRecord>, StoreError> {
        let rows: Vec<WorkerRow> = sqlx::query_as(
            "SELECT w.id, w.host, w.gpu_index, w.gpu_name, w.gpu_memory_bytes, w.state,
                    w.last_heartbeat, w.lease_until, w.leaving, r.job_id, r.attempt, r.rank
             FROM workers w
             LEFT JOIN LATERAL (
                 SELECT ar.job_id, ar.attempt, ar.rank FROM attempt_ranks ar
                 WHERE ar.worker_id = w.id AND ar.finished_at IS NULL
                 ORDER BY ar.attempt DESC LIMIT 1) r ON true
             WHERE $1::uuid IS NULL
                OR (w.host, w.gpu_index) > (SELECT host, gpu_index FROM workers WHERE id = $1)
             ORDER BY w.host, w.gpu_index LIMIT $2",
        )
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|r| {
                let state = worker_state(r.id, &r.state)?;
                let assignment = match (r.job_id, r.attempt, r.rank) {
                    (Some(j), Some(a), Some(k)) => Some((j, a.max(0) as u32, k.max(0) as u32)),
                    _ => None,
                };
                Ok(WorkerRecord {
                    id: r.id,
                    host: r.host,
                    gpu_index: r.gpu_index,
                    gpu_name: r.gpu_name,
                    gpu_memory_bytes: r.gpu_memory_bytes.max(0) as u64,
                    state,
                    last_heartbeat: r.last_heartbeat,
                    lease_until: r.lease_until,
                    assignment,
                    leaving: r.leaving,
                })
            })
            .collect()
    }

    /// Gives every worker at least `lease` from now. For when this coordinator could not hear
    /// heartbeats (it was down, or cut off from the database): the daemons could not renew, so
    /// their expired leases say nothing about them.
    pub async fn extend_leases(&self, lease: Duration) -> Result<u64, StoreError> {
        Ok(sqlx::query(
            "UPDATE workers SET lease_until = greatest(lease_until, now() + make_interval(secs => $1))
             WHERE state <> 'LOST'",
        )
        .bind(lease_secs(lease))
        .execute(&self.pool)
        .await?
        .rows_affected())
    }
}
