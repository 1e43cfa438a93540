//! The rank lifecycle: what each worker must run or stop, a rank starting and finishing, and how
//! an attempt (and its job) ends once its ranks finish. Placement is in `placement.rs`, rank 0's
//! endpoint in `rendezvous.rs`.
//!
//! Every change to an `attempts` or `attempt_ranks` row is made while holding the job's row lock
//! ([`lock_job`]), so decisions such as "every rank has finished" see a consistent picture and
//! the job transitions they cause are written with their events in the same transaction.

use super::checkpoint_scope::Scope;
use super::jobs::{lock_job, parse_job_state, transition_in_tx, JobRecord};
use super::{
    notify, u32_of, u64_of, RestartPolicy, Store, StoreError, ATTEMPTS_CHANNEL, WORKERS_CHANNEL,
};
use crate::state::{AttemptState, JobState, WorkerState};
use segtrain_spec::JobSpec;
use sqlx::types::Json;
use sqlx::{Postgres, Transaction};
use std::fmt;
use uuid::Uuid;

/// How a rank ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RankOutcome {
    Succeeded,
    /// Worth retrying: lost peer, killed process, collective timeout.
    FailedInfra,
    /// A retry would repeat it: bad data path, out of memory, NaN loss.
    FailedDeterministic,
    Canceled,
    /// The coordinator gave up on the worker (lease expired, or it came back without the trainer).
    Lost,
    /// The worker's host is going away (preemption notice, SIGTERM): the trainer stopped with
    /// a checkpoint. Not a failure.
    Preempted,
}

impl RankOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            RankOutcome::Succeeded => "SUCCEEDED",
            RankOutcome::FailedInfra => "FAILED_INFRA",
            RankOutcome::FailedDeterministic => "FAILED_DETERMINISTIC",
            RankOutcome::Canceled => "CANCELED",
            RankOutcome::Lost => "LOST",
            RankOutcome::Preempted => "PREEMPTED",
        }
    }

    pub fn parse(s: &str) -> Option<RankOutcome> {
        [
            RankOutcome::Succeeded,
            RankOutcome::FailedInfra,
            RankOutcome::FailedDeterministic,
            RankOutcome::Canceled,
            RankOutcome::Lost,
            RankOutcome::Preempted,
        ]
        .into_iter()
        .find(|o| o.as_str() == s)
    }

    fn is_failure(self) -> bool {
        matches!(
            self,
            RankOutcome::FailedInfra | RankOutcome::FailedDeterministic | RankOutcome::Lost
        )
    }
}

impl fmt::Display for RankOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether a rank of attempt `attempt` should be running: the attempt is the job's current one
/// and neither over nor stopping, and the job is neither canceling nor over. The one rule behind what an
/// assignment stream sends, what a heartbeat stops and what a re-registration keeps.
pub(super) fn rank_should_run(
    job_attempt: u32,
    job_state: JobState,
    attempt: u32,
    attempt_state: AttemptState,
) -> bool {
    job_attempt == attempt
        && attempt_state.wants_ranks()
        && job_state != JobState::Canceling
        && !job_state.is_terminal()
}

/// One unfinished rank held by a worker, with everything needed to start or stop it.
#[derive(Debug, Clone, PartialEq)]
pub struct RankAssignment {
    pub job_id: Uuid,
    pub attempt: u32,
    pub rank: u32,
    /// The attempt's world size and accumulation (an elastic job's may be smaller / larger than
    /// the spec's).
    pub world_size: u32,
    pub accumulate_steps: u32,
    pub spec: JobSpec,
    pub resume_uri: Option<String>,
    pub resume_iteration: u64,
    /// Every COMPLETE checkpoint at or before the resume point, newest first: the trainer
    /// falls back along them when the newest is corrupt.
    pub resume_candidates: Vec<ResumeCandidate>,
    pub attempt_state: AttemptState,
    pub attempt_reason: String,
    /// The rank reported `started`.
    pub started: bool,
    pub job_state: JobState,
    /// The job's current attempt (differs from `attempt` when this one is stale).
    pub job_attempt: u32,
    pub job_reason: String,
}

impl RankAssignment {
    /// Why the worker must stop this rank, or `None` when it should (keep) run(ning) it.
    pub fn stop_reason(&self) -> Option<String> {
        if rank_should_run(
            self.job_attempt,
            self.job_state,
            self.attempt,
            self.attempt_state,
        ) {
            return None;
        }
        if self.job_attempt != self.attempt {
            return Some(format!(
                "stale attempt: job {} is at attempt {}, this is attempt {}",
                self.job_id, self.job_attempt, self.attempt
            ));
        }
        if matches!(self.job_state, JobState::Canceling | JobState::Canceled) {
            return Some(non_empty(&self.job_reason, "job canceled"));
        }
        if !self.attempt_state.wants_ranks() {
            return Some(non_empty(
                &self.attempt_reason,
                &format!("attempt {}", self.attempt_state),
            ));
        }
        Some(non_empty(
            &self.job_reason,
            &format!("job {}", self.job_state),
        ))
    }
}

/// A checkpoint an attempt may resume from, with the digest recorded when it completed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct ResumeCandidate {
    pub uri: String,
    pub iteration: u64,
    pub sha256: String,
}

fn non_empty(s: &str, default: &str) -> String {
    if s.is_empty() {
        default.to_string()
    } else {
        s.to_string()
    }
}

#[derive(sqlx::FromRow)]
struct AssignmentRow {
    job_id: Uuid,
    attempt: i32,
    rank: i32,
    world_size: i32,
    accumulate_steps: i32,
    resume_uri: Option<String>,
    resume_iter: Option<i64>,
    candidates: Json<Vec<ResumeCandidate>>,
    attempt_state: String,
    attempt_reason: String,
    started: bool,
    spec: Json<serde_json::Value>,
    job_state: String,
    job_attempt: i32,
    job_reason: String,
}

impl TryFrom<AssignmentRow> for RankAssignment {
    type Error = StoreError;

    fn try_from(r: AssignmentRow) -> Result<RankAssignment, StoreError> {
        let spec: JobSpec = serde_json::from_value(r.spec.0)
            .map_err(|e| StoreError::Corrupt(format!("job {} spec: {e}", r.job_id)))?;
        let (resume_uri, candidates) =
            Scope::of(r.job_id, &spec).offered(r.resume_uri, r.candidates.0);
        Ok(RankAssignment {
            job_id: r.job_id,
            attempt: u32_of(r.attempt, "attempt")?,
            rank: u32_of(r.rank, "rank")?,
            world_size: u32_of(r.world_size, "world_size")?,
            accumulate_steps: u32_of(r.accumulate_steps, "accumulate_steps")?,
            spec,
            resume_uri,
            resume_iteration: u64_of(r.resume_iter.unwrap_or(0), "resume_iter")?,
            resume_candidates: candidates,
            attempt_state: parse_attempt_state(&r.attempt_state)?,
            attempt_reason: r.attempt_reason,
            started: r.started,
            job_state: parse_job_state(r.job_id, &r.job_state)?,
            job_attempt: u32_of(r.job_attempt, "attempt")?,
            job_reason: r.job_reason,
        })
    }
}

pub(super) fn parse_attempt_state(s: &str) -> Result<AttemptState, StoreError> {
    AttemptState::parse(s).ok_or_else(|| StoreError::Corrupt(format!("attempt state {s:?}")))
}

/// The refusal of a message about an attempt that is not the job's current one.
/// Checks the fencing token: `attempt` must be job `job_id`'s current attempt, `current`.
pub(super) fn fence(job_id: Uuid, current: u32, attempt: u32) -> Result<(), StoreError> {
    if attempt == 0 || current != attempt {
        return Err(StoreError::StaleAttempt(format!(
            "stale attempt: job {job_id} is at attempt {current}, got {attempt}"
        )));
    }
    Ok(())
}

impl Store {
    /// Every unfinished rank held by a worker (current, stale, or of a stopping job).
    pub async fn worker_assignments(
        &self,
        worker_id: Uuid,
    ) -> Result<Vec<RankAssignment>, StoreError> {
        let rows: Vec<AssignmentRow> = sqlx::query_as(
            "SELECT ar.job_id, ar.attempt, ar.rank, a.world_size, a.accumulate_steps,
                    a.resume_uri, a.resume_iter,
                    (SELECT coalesce(json_agg(json_build_object(
                                'uri', c.uri, 'iteration', c.iteration, 'sha256', c.sha256)
                                ORDER BY c.iteration DESC), '[]'::json)
                     FROM checkpoints c
                     WHERE c.job_id = ar.job_id AND c.state = 'COMPLETE'
                       AND c.iteration <= a.resume_iter) AS candidates,
                    a.state AS attempt_state, a.reason AS attempt_reason,
                    ar.started_at IS NOT NULL AS started,
                    j.spec, j.state AS job_state, j.attempt AS job_attempt, j.reason AS job_reason
             FROM attempt_ranks ar
             JOIN attempts a ON a.job_id = ar.job_id AND a.attempt = ar.attempt
             JOIN jobs j ON j.id = ar.job_id
             WHERE ar.worker_id = $1 AND ar.finished_at IS NULL
             ORDER BY ar.job_id, ar.attempt, ar.rank",
        )
        .bind(worker_id)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(RankAssignment::try_from).collect()
    }
}

/// A job id nobody knows cannot have been assigned to the worker: refused like a stale attempt
/// (FAILED_PRECONDITION), so a daemon drops the events instead of retrying them forever.
pub(super) fn unknown_job_is_stale(e: StoreError) -> StoreError {
    match e {
        StoreError::NotFound { what: "job", id } => {
            StoreError::StaleAttempt(format!("stale attempt: job {id} does not exist"))
        }
        e => e,
    }
}

/// Moves an attempt along the attempt table. The caller holds the job's row lock.
pub(super) async fn set_attempt_state(
    tx: &mut Transaction<'_, Postgres>,
    job_id: Uuid,
    attempt: u32,
    from: AttemptState,
    to: AttemptState,
    reason: &str,
) -> Result<(), StoreError> {
    from.check_transition(to)?;
    sqlx::query(
        "UPDATE attempts SET state = $3,
                reason = CASE WHEN $4 = '' THEN reason ELSE $4 END,
                finished_at = CASE WHEN $5 THEN now() ELSE finished_at END
         WHERE job_id = $1 AND attempt = $2",
    )
    .bind(job_id)
    .bind(attempt as i32)
    .bind(to.as_str())
    .bind(reason)
    .bind(to.is_terminal())
    .execute(&mut **tx)
    .await?;
    notify(tx, ATTEMPTS_CHANNEL, job_id).await
}

#[derive(sqlx::FromRow)]
struct RankRow {
    rank: i32,
    started: bool,
    outcome: Option<String>,
    reason: String,
    host: String,
    gpu_index: i32,
}

async fn ranks_of(
    tx: &mut Transaction<'_, Postgres>,
    job_id: Uuid,
    attempt: u32,
) -> Result<Vec<RankRow>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT ar.rank, ar.started_at IS NOT NULL AS started, ar.outcome,
                ar.reason, w.host, w.gpu_index
         FROM attempt_ranks ar JOIN workers w ON w.id = ar.worker_id
         WHERE ar.job_id = $1 AND ar.attempt = $2 ORDER BY ar.rank",
    )
    .bind(job_id)
    .bind(attempt as i32)
    .fetch_all(&mut **tx)
    .await?)
}

async fn attempt_state(
    tx: &mut Transaction<'_, Postgres>,
    job_id: Uuid,
    attempt: u32,
) -> Result<AttemptState, StoreError> {
    let s: String = sqlx::query_scalar(
        "SELECT state FROM attempts WHERE job_id = $1 AND attempt = $2 FOR UPDATE",
    )
    .bind(job_id)
    .bind(attempt as i32)
    .fetch_one(&mut **tx)
    .await?;
    parse_attempt_state(&s)
}

/// A non-negative, finite number of seconds from PostgreSQL as a duration (0 otherwise).
pub(super) fn seconds(s: f64) -> std::time::Duration {
    std::time::Duration::try_from_secs_f64(s.max(0.0)).unwrap_or_default()
}

/// A rank's trainer runs. Once every rank has started: attempt → RUNNING and, for the current
/// attempt, job SCHEDULED → RUNNING. The caller holds the job's row lock. Returns the time
/// from placement to now when this start moved the attempt to RUNNING (the rendezvous latency).
pub(super) async fn start_rank(
    tx: &mut Transaction<'_, Postgres>,
    job_id: Uuid,
    attempt: u32,
    rank: u32,
) -> Result<Option<std::time::Duration>, StoreError> {
    sqlx::query(
        "UPDATE attempt_ranks SET started_at = now()
         WHERE job_id = $1 AND attempt = $2 AND rank = $3 AND started_at IS NULL",
    )
    .bind(job_id)
    .bind(attempt as i32)
    .bind(rank as i32)
    .execute(&mut **tx)
    .await?;
    promote_if_all_started(tx, job_id, attempt).await
}

/// Moves the attempt to RUNNING once every rank has started; returns how long ago it was placed
/// when it did.
async fn promote_if_all_started(
    tx: &mut Transaction<'_, Postgres>,
    job_id: Uuid,
    attempt: u32,
) -> Result<Option<std::time::Duration>, StoreError> {
    let ranks = ranks_of(tx, job_id, attempt).await?;
    if ranks.is_empty() || !ranks.iter().all(|r| r.started) {
        return Ok(None);
    }
    let state = attempt_state(tx, job_id, attempt).await?;
    let mut placed_ago = None;
    if matches!(state, AttemptState::Pending | AttemptState::Rendezvous) {
        set_attempt_state(tx, job_id, attempt, state, AttemptState::Running, "").await?;
        let secs: f64 = sqlx::query_scalar(
            "SELECT EXTRACT(EPOCH FROM clock_timestamp() - created_at)::float8 FROM attempts
             WHERE job_id = $1 AND attempt = $2",
        )
        .bind(job_id)
        .bind(attempt as i32)
        .fetch_one(&mut **tx)
        .await?;
        placed_ago = Some(seconds(secs));
    }
    let job = lock_job(tx, job_id).await?;
    if job.attempt == attempt && job.state == JobState::Scheduled && state.wants_ranks() {
        let reason = format!("all {} ranks started", ranks.len());
        transition_in_tx(tx, job_id, JobState::Running, &reason).await?;
    }
    Ok(placed_ago)
}

/// A rank's trainer is done (reported by its daemon, or decided by the coordinator when the
/// worker was lost). Frees the worker when it has nothing else open, and settles the attempt.
/// Returns false when the rank had already finished (nothing changes). The caller holds the
/// worker's row lock (when it changes one) and the job's.
pub(super) async fn finish_rank(
    tx: &mut Transaction<'_, Postgres>,
    job_id: Uuid,
    attempt: u32,
    rank: u32,
    outcome: RankOutcome,
    reason: &str,
    policy: &RestartPolicy,
) -> Result<bool, StoreError> {
    // A rank that finished successfully evidently ran; count it as started.
    let worker: Option<Uuid> = sqlx::query_scalar(
        "UPDATE attempt_ranks
         SET finished_at = now(), outcome = $4, reason = $5,
             started_at = CASE WHEN $6 THEN coalesce(started_at, now()) ELSE started_at END
         WHERE job_id = $1 AND attempt = $2 AND rank = $3 AND finished_at IS NULL
         RETURNING worker_id",
    )
    .bind(job_id)
    .bind(attempt as i32)
    .bind(rank as i32)
    .bind(outcome.as_str())
    .bind(reason)
    .bind(outcome == RankOutcome::Succeeded)
    .fetch_optional(&mut **tx)
    .await?;
    let Some(worker) = worker else {
        return Ok(false);
    };
    if outcome == RankOutcome::Succeeded {
        promote_if_all_started(tx, job_id, attempt).await?;
    }
    if outcome == RankOutcome::Preempted {
        // Its daemon is going away: no new rank for it, whatever else it reports meanwhile.
        sqlx::query("UPDATE workers SET leaving = true WHERE id = $1")
            .bind(worker)
            .execute(&mut **tx)
            .await?;
    }
    // BUSY → IDLE once nothing is open on it; a LOST or DRAINING worker keeps its state.
    WorkerState::Busy.check_transition(WorkerState::Idle)?;
    let freed = sqlx::query(
        "UPDATE workers SET state = 'IDLE' WHERE id = $1 AND state = 'BUSY'
           AND NOT EXISTS (SELECT 1 FROM attempt_ranks
                           WHERE worker_id = $1 AND finished_at IS NULL)",
    )
    .bind(worker)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    if freed > 0 {
        notify(tx, WORKERS_CHANNEL, worker).await?;
    }
    settle_attempt(tx, job_id, attempt, policy).await?;
    Ok(true)
}

/// Decides what the ranks' outcomes so far mean for the attempt and its job:
/// - a failed (or lost) rank fails a live attempt at once (the other ranks are then told to
///   stop), and the job with it unless the job is canceling (cancel wins): see
///   [`after_failure`] for restart or fail;
/// - a preempted rank moves the attempt to STOPPING, so the other ranks are told to stop (their
///   trainers have usually stopped with it already: any rank's stop stops them all);
/// - once every rank has finished: a canceling job's attempt ends CANCELED and the job CANCELED;
///   all SUCCEEDED ends the attempt and the job SUCCEEDED; a preempted rank ends it PREEMPTED
///   and a resize (`attempts.resize_to`) RESIZED, both restarting the job at once without
///   counting a restart ([`after_planned_stop`]); any other rank that stopped without being
///   asked to counts as an infrastructure failure.
async fn settle_attempt(
    tx: &mut Transaction<'_, Postgres>,
    job_id: Uuid,
    attempt: u32,
    policy: &RestartPolicy,
) -> Result<(), StoreError> {
    let job = lock_job(tx, job_id).await?;
    let mut state = attempt_state(tx, job_id, attempt).await?;
    let ranks = ranks_of(tx, job_id, attempt).await?;
    let current = job.attempt == attempt;
    let outcomes: Vec<Option<RankOutcome>> = ranks
        .iter()
        .map(|r| r.outcome.as_deref().and_then(RankOutcome::parse))
        .collect();
    let all_finished = outcomes.iter().all(Option::is_some);
    let canceling = matches!(job.state, JobState::Canceling | JobState::Canceled);
    let failed = ranks
        .iter()
        .zip(&outcomes)
        .find(|(_, o)| o.is_some_and(RankOutcome::is_failure));
    let preempted: Vec<&RankRow> = ranks
        .iter()
        .zip(&outcomes)
        .filter(|(_, o)| **o == Some(RankOutcome::Preempted))
        .map(|(r, _)| r)
        .collect();

    if !state.is_terminal() {
        if let (Some((r, Some(o))), false) = (failed, canceling) {
            let reason = format!(
                "rank {} ({}) {o}{}",
                r.rank,
                super::worker_name(&r.host, r.gpu_index),
                if r.reason.is_empty() {
                    String::new()
                } else {
                    format!(": {}", r.reason)
                }
            );
            let to = if *o == RankOutcome::Lost {
                AttemptState::Lost
            } else {
                AttemptState::Failed
            };
            set_attempt_state(tx, job_id, attempt, state, to, &reason).await?;
            if current && matches!(job.state, JobState::Scheduled | JobState::Running) {
                after_failure(tx, &job, *o, &reason, policy).await?;
            }
            return Ok(());
        }
        if let (Some(first), true, false) = (preempted.first(), state.wants_ranks(), canceling) {
            let reason = preempted_reason(&preempted, first);
            set_attempt_state(tx, job_id, attempt, state, AttemptState::Stopping, &reason).await?;
            state = AttemptState::Stopping;
        }
        if !all_finished {
            return Ok(());
        }
        if canceling || !current || job.state.is_terminal() {
            let reason = non_empty(&job.reason, "canceled");
            set_attempt_state(tx, job_id, attempt, state, AttemptState::Canceled, &reason).await?;
        } else if outcomes.iter().all(|o| *o == Some(RankOutcome::Succeeded)) {
            // Every rank finished successfully, so every rank started: the attempt is RUNNING.
            let state = attempt_state(tx, job_id, attempt).await?;
            set_attempt_state(tx, job_id, attempt, state, AttemptState::Succeeded, "").await?;
            let job = lock_job(tx, job_id).await?;
            if job.state == JobState::Running {
                let reason = format!("all {} ranks succeeded", ranks.len());
                transition_in_tx(tx, job_id, JobState::Succeeded, &reason).await?;
            }
            return Ok(());
        } else if let Some(first) = preempted.first() {
            let reason = preempted_reason(&preempted, first);
            set_attempt_state(tx, job_id, attempt, state, AttemptState::Preempted, &reason).await?;
            if matches!(job.state, JobState::Scheduled | JobState::Running) {
                after_planned_stop(tx, &job, &reason, true).await?;
            }
            return Ok(());
        } else if let (AttemptState::Stopping, Some(to)) =
            (state, resize_target(tx, job_id, attempt).await?)
        {
            let reason = format!(
                "resize: attempt {attempt} stopped with a checkpoint; the job restarts at world \
                 size {to}"
            );
            set_attempt_state(tx, job_id, attempt, state, AttemptState::Resized, &reason).await?;
            if matches!(job.state, JobState::Scheduled | JobState::Running) {
                after_planned_stop(tx, &job, &reason, false).await?;
            }
            return Ok(());
        } else {
            let r = ranks
                .iter()
                .zip(&outcomes)
                .find(|(_, o)| **o != Some(RankOutcome::Succeeded))
                .map(|(r, _)| r)
                .ok_or_else(|| StoreError::Corrupt("no rank failed a failed attempt".into()))?;
            let reason = format!(
                "rank {} ({}) stopped without a cancel request",
                r.rank,
                super::worker_name(&r.host, r.gpu_index)
            );
            set_attempt_state(tx, job_id, attempt, state, AttemptState::Failed, &reason).await?;
            if matches!(job.state, JobState::Scheduled | JobState::Running) {
                after_failure(tx, &job, RankOutcome::FailedInfra, &reason, policy).await?;
            }
            return Ok(());
        }
    }
    // The attempt is over; a canceling job ends once its last rank has stopped.
    if all_finished && current && job.state == JobState::Canceling {
        transition_in_tx(tx, job_id, JobState::Canceled, "").await?;
    }
    Ok(())
}

/// "preempted: HOST" for the attempt and the job: the preempted workers' hosts.
fn preempted_reason(preempted: &[&RankRow], first: &RankRow) -> String {
    let mut hosts: Vec<&str> = preempted.iter().map(|r| r.host.as_str()).collect();
    hosts.dedup();
    format!(
        "preempted: {} (rank {}: {})",
        hosts.join(", "),
        first.rank,
        non_empty(&first.reason, "its host is going away")
    )
}

/// The world size a stopping attempt was stopped to grow back to, if that is why it stops.
async fn resize_target(
    tx: &mut Transaction<'_, Postgres>,
    job_id: Uuid,
    attempt: u32,
) -> Result<Option<u32>, StoreError> {
    let to: Option<i32> =
        sqlx::query_scalar("SELECT resize_to FROM attempts WHERE job_id = $1 AND attempt = $2")
            .bind(job_id)
            .bind(attempt as i32)
            .fetch_one(&mut **tx)
            .await?;
    to.map(|t| u32_of(t, "resize_to")).transpose()
}

/// The current attempt stopped on purpose (a preemption, or a resize): the job restarts at
/// once, from the checkpoint its ranks wrote on stopping. Neither counts against
/// `max_restarts`; a preemption is counted in `jobs.preemptions`.
async fn after_planned_stop(
    tx: &mut Transaction<'_, Postgres>,
    job: &JobRecord,
    reason: &str,
    preemption: bool,
) -> Result<(), StoreError> {
    let why = if preemption {
        format!(
            "{reason}; restarting at once (preemption {}, not counted against max_restarts)",
            job.preemptions + 1
        )
    } else {
        format!("{reason} (not counted against max_restarts)")
    };
    transition_in_tx(tx, job.id, JobState::Restarting, &why).await?;
    sqlx::query(
        "UPDATE jobs SET preemptions = preemptions + CASE WHEN $2 THEN 1 ELSE 0 END,
                         restart_at = now()
         WHERE id = $1",
    )
    .bind(job.id)
    .bind(preemption)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// The job's current attempt failed: a deterministic failure (bad data, out of memory, NaN
/// loss) fails the job at once; an infrastructure failure (lost worker, killed trainer,
/// collective timeout) sends it to RESTARTING with exponential backoff while restarts are left
/// (the scheduler queues it again at `restart_at`), and fails it otherwise.
async fn after_failure(
    tx: &mut Transaction<'_, Postgres>,
    job: &JobRecord,
    outcome: RankOutcome,
    reason: &str,
    policy: &RestartPolicy,
) -> Result<(), StoreError> {
    let max = job.spec.max_restarts;
    if outcome == RankOutcome::FailedDeterministic {
        let why = format!("{reason} (not retried: a restart would fail the same way)");
        transition_in_tx(tx, job.id, JobState::Failed, &why).await?;
        return Ok(());
    }
    if job.restarts >= max {
        let why = format!(
            "{reason}; no restarts left ({} of {max} used)",
            job.restarts
        );
        transition_in_tx(tx, job.id, JobState::Failed, &why).await?;
        return Ok(());
    }
    let n = job.restarts + 1;
    let wait = policy.backoff(n);
    let why = format!(
        "{reason}; restart {n} of {max} in {:.1} s",
        wait.as_secs_f64()
    );
    transition_in_tx(tx, job.id, JobState::Restarting, &why).await?;
    sqlx::query(
        "UPDATE jobs SET restarts = $2,
                restart_at = now() + make_interval(secs => $3)
         WHERE id = $1",
    )
    .bind(job.id)
    .bind(n as i32)
    .bind(wait.as_secs_f64())
    .execute(&mut **tx)
    .await?;
    Ok(())
}
