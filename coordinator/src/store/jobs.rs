//! Jobs: submission (idempotent), reads, paging, and the one transition function.

use super::{u32_of, u64_of, Store, StoreError, EVENTS_CHANNEL};
use crate::events::EventPayload;
use crate::state::JobState;
use chrono::{DateTime, Utc};
use segtrain_spec::JobSpec;
use sqlx::types::Json;
use sqlx::{Postgres, Transaction};
use uuid::Uuid;

/// A job as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRecord {
    pub id: Uuid,
    pub spec: JobSpec,
    pub state: JobState,
    pub attempt: u32,
    /// Restarts after failures (bounded by `spec.max_restarts`).
    pub restarts: u32,
    /// Attempts ended by a preemption (not bounded, not counted as restarts).
    pub preemptions: u32,
    /// The current attempt's ranks and accumulation (0, 0 before the first attempt).
    pub attempt_world_size: u32,
    pub attempt_accumulate_steps: u32,
    pub idempotency_key: Option<String>,
    pub reason: String,
    /// The current attempt's newest reported iteration (its progress).
    pub iteration: u64,
    /// The newest iteration any attempt reached (ahead of `iteration` after a restart that
    /// resumed from an earlier checkpoint).
    pub furthest_iteration: u64,
    /// The checkpoint iteration the current attempt resumed from (`None`: started fresh).
    pub resumed_from_iteration: Option<u64>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    /// Who submitted it (empty: before owners were recorded) and its team.
    pub submitted_by: String,
    pub team: String,
}

/// Who a new job is submitted by, for which team.
#[derive(Debug, Clone, Copy)]
pub struct Owner<'a> {
    pub principal: &'a str,
    pub team: &'a str,
}

#[derive(sqlx::FromRow)]
struct JobRow {
    id: Uuid,
    spec: Json<serde_json::Value>,
    state: String,
    attempt: i32,
    restarts: i32,
    preemptions: i32,
    attempt_world_size: i32,
    attempt_accumulate_steps: i32,
    idempotency_key: Option<String>,
    reason: String,
    iteration: i64,
    furthest_iteration: i64,
    resumed_from_iteration: Option<i64>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    finished_at: Option<DateTime<Utc>>,
    submitted_by: String,
    team: String,
}

const JOB_COLUMNS: &str = "id, spec, state, attempt, restarts, preemptions, \
     coalesce((SELECT a.world_size FROM attempts a \
               WHERE a.job_id = jobs.id AND a.attempt = jobs.attempt), 0) AS attempt_world_size, \
     coalesce((SELECT a.accumulate_steps FROM attempts a \
               WHERE a.job_id = jobs.id AND a.attempt = jobs.attempt), 0) AS attempt_accumulate_steps, \
     idempotency_key, reason, iteration, furthest_iteration, resumed_from_iteration, created_at, \
     updated_at, finished_at, submitted_by, team";

/// ListJobs' query: a page of jobs older than `$1` (a job id; `Uuid::max()` for the first page),
/// newest first, at most `$2`, with `by_state` only those whose state is in `$3`, and with
/// `by_team` only the team's named by the next parameter (`$4`, or `$3` without states).
/// Separate texts rather than one with `cardinality($3) = 0 OR …`,
/// and the cursor never NULL, so that even PostgreSQL's generic plan of each reads a page, not
/// the table (tests/tests/query_plans.rs): with states, the newest `$2` of each state on
/// `jobs_state_id_idx` (`jobs_team_state_id_idx` for a team), then the newest of those.
pub fn list_jobs_sql(by_state: bool, by_team: bool) -> String {
    let team = if by_team { "j.team = $4 AND " } else { "" };
    let filter = if by_state {
        format!(
            "id IN (SELECT p.id FROM unnest($3::text[]) AS s(state),
                  LATERAL (SELECT id FROM jobs j WHERE {team}j.state = s.state AND j.id < $1
                           ORDER BY j.id DESC LIMIT $2) AS p)"
        )
    } else if by_team {
        "team = $3 AND id < $1".to_string()
    } else {
        "id < $1".to_string()
    };
    format!("SELECT {JOB_COLUMNS} FROM jobs WHERE {filter} ORDER BY id DESC LIMIT $2")
}

/// A job's stored state, or the row is corrupt.
pub(super) fn parse_job_state(job: Uuid, s: &str) -> Result<JobState, StoreError> {
    JobState::parse(s).ok_or_else(|| StoreError::Corrupt(format!("job {job} state {s:?}")))
}

impl TryFrom<JobRow> for JobRecord {
    type Error = StoreError;

    fn try_from(r: JobRow) -> Result<JobRecord, StoreError> {
        let spec: JobSpec = serde_json::from_value(r.spec.0)
            .map_err(|e| StoreError::Corrupt(format!("job {} spec: {e}", r.id)))?;
        let state = parse_job_state(r.id, &r.state)?;
        Ok(JobRecord {
            id: r.id,
            spec,
            state,
            attempt: u32_of(r.attempt, "attempt")?,
            restarts: u32_of(r.restarts, "restarts")?,
            preemptions: u32_of(r.preemptions, "preemptions")?,
            attempt_world_size: u32_of(r.attempt_world_size, "attempt_world_size")?,
            attempt_accumulate_steps: u32_of(
                r.attempt_accumulate_steps,
                "attempt_accumulate_steps",
            )?,
            idempotency_key: r.idempotency_key,
            reason: r.reason,
            iteration: u64_of(r.iteration, "iteration")?,
            furthest_iteration: u64_of(r.furthest_iteration, "furthest_iteration")?,
            resumed_from_iteration: r
                .resumed_from_iteration
                .map(|i| u64_of(i, "resumed_from_iteration"))
                .transpose()?,
            created_at: r.created_at,
            updated_at: r.updated_at,
            finished_at: r.finished_at,
            submitted_by: r.submitted_by,
            team: r.team,
        })
    }
}

impl Store {
    /// Creates a QUEUED job for `owner`, or, when `idempotency_key` names an existing job of
    /// the same principal with an equal spec, returns that job and `true`. The same key with a
    /// different spec is a conflict. A new job's first events are its creation, a note of who
    /// submitted it, and one note per [`JobSpec::warnings`] (in the same transaction; a resubmit
    /// that finds the job adds none).
    pub async fn submit_job(
        &self,
        spec: &JobSpec,
        idempotency_key: Option<&str>,
        owner: Owner<'_>,
    ) -> Result<(JobRecord, bool), StoreError> {
        let spec_json = serde_json::to_value(spec)
            .map_err(|e| StoreError::Corrupt(format!("spec does not serialise: {e}")))?;
        let mut tx = self.pool.begin().await?;
        let id = Uuid::now_v7();
        let inserted: Option<JobRow> = sqlx::query_as(&format!(
            "INSERT INTO jobs (id, name, spec, state, priority, world_size, max_restarts,
                               idempotency_key, submitted_by, team)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
             ON CONFLICT (submitted_by, idempotency_key) WHERE idempotency_key IS NOT NULL
             DO NOTHING
             RETURNING {JOB_COLUMNS}"
        ))
        .bind(id)
        .bind(&spec.name)
        .bind(Json(&spec_json))
        .bind(JobState::INITIAL.as_str())
        .bind(spec.priority)
        .bind(spec.world_size as i32)
        .bind(spec.max_restarts as i32)
        .bind(idempotency_key)
        .bind(owner.principal)
        .bind(owner.team)
        .fetch_optional(&mut *tx)
        .await?;

        let Some(row) = inserted else {
            // The key exists: same spec means a retried request; anything else is a mistake.
            tx.rollback().await?;
            let key = idempotency_key.unwrap_or_default();
            let existing: JobRow = sqlx::query_as(&format!(
                "SELECT {JOB_COLUMNS} FROM jobs WHERE submitted_by = $2 AND idempotency_key = $1"
            ))
            .bind(key)
            .bind(owner.principal)
            .fetch_one(&self.pool)
            .await?;
            let existing = JobRecord::try_from(existing)?;
            if existing.spec != *spec {
                return Err(StoreError::Conflict(format!(
                    "idempotency_key {key:?} was already used by job {} with a different spec",
                    existing.id
                )));
            }
            return Ok((existing, true));
        };

        insert_event(
            &mut tx,
            id,
            0,
            &EventPayload::state_change(None, JobState::INITIAL, "submitted"),
        )
        .await?;
        if !owner.principal.is_empty() {
            let text = format!("submitted by {} (team {})", owner.principal, owner.team);
            insert_event(&mut tx, id, 0, &EventPayload::Note { text }).await?;
        }
        for text in spec.warnings() {
            insert_event(&mut tx, id, 0, &EventPayload::Note { text }).await?;
        }
        tx.commit().await?;
        Ok((JobRecord::try_from(row)?, false))
    }

    pub async fn get_job(&self, id: Uuid) -> Result<JobRecord, StoreError> {
        let row: Option<JobRow> =
            sqlx::query_as(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1"))
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
        row.ok_or_else(|| not_found(id))?.try_into()
    }

    /// Newest first. `before`: the last id of the previous page; `team`: only its jobs.
    pub async fn list_jobs(
        &self,
        states: &[JobState],
        limit: u32,
        before: Option<Uuid>,
        team: Option<&str>,
    ) -> Result<Vec<JobRecord>, StoreError> {
        let states: Vec<&str> = states.iter().map(|s| s.as_str()).collect();
        let sql = list_jobs_sql(!states.is_empty(), team.is_some());
        let mut query = sqlx::query_as(&sql)
            .bind(before.unwrap_or(Uuid::max()))
            .bind(i64::from(limit));
        if !states.is_empty() {
            query = query.bind(&states);
        }
        if let Some(team) = team {
            query = query.bind(team);
        }
        let rows: Vec<JobRow> = query.fetch_all(&self.pool).await?;
        rows.into_iter().map(JobRecord::try_from).collect()
    }

    /// Moves a job to `to` if the state table allows it from its current state, recording the
    /// change as an event in the same transaction. An illegal edge changes nothing.
    pub async fn transition_job(
        &self,
        id: Uuid,
        to: JobState,
        reason: &str,
    ) -> Result<JobRecord, StoreError> {
        let mut tx = self.pool.begin().await?;
        let job = transition_in_tx(&mut tx, id, to, reason).await?;
        tx.commit().await?;
        Ok(job)
    }

    /// Cancel: QUEUED and RESTARTING jobs become CANCELED at once; SCHEDULED and RUNNING jobs
    /// become CANCELING until their trainers have stopped. Canceling a job that is already
    /// canceling or canceled returns it unchanged; a succeeded or failed job cannot be canceled.
    /// `by` (who asked) is noted on the job with the change.
    pub async fn cancel_job(
        &self,
        id: Uuid,
        reason: &str,
        by: Option<&str>,
    ) -> Result<JobRecord, StoreError> {
        let mut tx = self.pool.begin().await?;
        let current = lock_job(&mut tx, id).await?;
        let job = match current.state.cancel_target() {
            Some(to) => {
                if let Some(by) = by {
                    let text = format!("cancel asked by {by}");
                    insert_event(&mut tx, id, current.attempt, &EventPayload::Note { text })
                        .await?;
                }
                transition_locked(&mut tx, current, to, reason).await?
            }
            None if matches!(current.state, JobState::Canceling | JobState::Canceled) => current,
            None => {
                return Err(StoreError::Conflict(format!(
                    "job {id} already finished as {}; nothing to cancel",
                    current.state
                )))
            }
        };
        tx.commit().await?;
        Ok(job)
    }
}

fn not_found(id: Uuid) -> StoreError {
    StoreError::NotFound {
        what: "job",
        id: id.to_string(),
    }
}

/// Reads a job and locks its row until the transaction ends. Every writer of a job's events
/// holds this lock, which is what keeps event ids in commit order within a job.
pub(super) async fn lock_job(
    tx: &mut Transaction<'_, Postgres>,
    id: Uuid,
) -> Result<JobRecord, StoreError> {
    let row: Option<JobRow> = sqlx::query_as(&format!(
        "SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1 FOR UPDATE"
    ))
    .bind(id)
    .fetch_optional(&mut **tx)
    .await?;
    row.ok_or_else(|| not_found(id))?.try_into()
}

/// Locks job `id`'s row and returns its current attempt alone: the fence of a worker report,
/// which needs neither the spec (decoded from JSON) nor the attempt's columns a full read has.
pub(super) async fn lock_job_attempt(
    tx: &mut Transaction<'_, Postgres>,
    id: Uuid,
) -> Result<u32, StoreError> {
    let attempt: Option<i32> =
        sqlx::query_scalar("SELECT attempt FROM jobs WHERE id = $1 FOR UPDATE")
            .bind(id)
            .fetch_optional(&mut **tx)
            .await?;
    u32_of(attempt.ok_or_else(|| not_found(id))?, "attempt")
}

pub(super) async fn transition_in_tx(
    tx: &mut Transaction<'_, Postgres>,
    id: Uuid,
    to: JobState,
    reason: &str,
) -> Result<JobRecord, StoreError> {
    let current = lock_job(tx, id).await?;
    transition_locked(tx, current, to, reason).await
}

async fn transition_locked(
    tx: &mut Transaction<'_, Postgres>,
    current: JobRecord,
    to: JobState,
    reason: &str,
) -> Result<JobRecord, StoreError> {
    current.state.check_transition(to)?;
    let row: JobRow = sqlx::query_as(&format!(
        "UPDATE jobs SET state = $2,
                reason = CASE WHEN $3 = '' OR NOT $5 THEN reason ELSE $3 END,
                updated_at = now(),
                finished_at = CASE WHEN $4 THEN now() ELSE finished_at END
         WHERE id = $1
         RETURNING {JOB_COLUMNS}"
    ))
    .bind(current.id)
    .bind(to.as_str())
    .bind(reason)
    .bind(to.is_terminal())
    // The job's reason says why it failed, was canceled, or last restarted; every transition's
    // reason is in its event.
    .bind(matches!(
        to,
        JobState::Failed | JobState::Canceled | JobState::Canceling | JobState::Restarting
    ))
    .fetch_one(&mut **tx)
    .await?;
    insert_event(
        tx,
        current.id,
        current.attempt,
        &EventPayload::state_change(Some(current.state), to, reason),
    )
    .await?;
    row.try_into()
}

/// Appends one event. The caller must hold the job's row lock (see [`lock_job`]).
pub(super) async fn insert_event(
    tx: &mut Transaction<'_, Postgres>,
    job_id: Uuid,
    attempt: u32,
    payload: &EventPayload,
) -> Result<i64, StoreError> {
    let json = serde_json::to_value(payload)
        .map_err(|e| StoreError::Corrupt(format!("event does not serialise: {e}")))?;
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO job_events (job_id, attempt, kind, payload) VALUES ($1, $2, $3, $4) RETURNING id",
    )
    .bind(job_id)
    .bind(attempt as i32)
    .bind(payload.kind())
    .bind(Json(json))
    .fetch_one(&mut **tx)
    .await?;
    super::notify(tx, EVENTS_CHANNEL, job_id).await?;
    if matches!(payload, EventPayload::StateChange { .. }) {
        super::notify(tx, super::bus::STATES_CHANNEL, job_id).await?;
    }
    Ok(id)
}
