//! Gang placement: one scheduling pass books a whole attempt (every rank's worker) or nothing,
//! at the job's world size or, for an elastic job that has waited long enough, at a smaller one
//! ([`super::elastic::attempt_size`]); and RESTARTING jobs whose backoff is over go back to the
//! queue.

use super::attempts::seconds;
use super::elastic::attempt_size;
use super::jobs::{lock_job, transition_in_tx};
use super::teams::gpu_limited_teams;
use super::{u32_of, Store, StoreError, WORKERS_CHANNEL};
use crate::state::{JobState, WorkerState};
use uuid::Uuid;

/// Serialises scheduling passes across every coordinator sharing the database (a transaction
/// level advisory lock; released at commit or rollback).
pub(super) const SCHEDULER_LOCK: i64 = 0x5e67_7261_696e_0001;

/// An idle worker with a live lease, as the placement function sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub id: Uuid,
    pub host: String,
    pub gpu_index: i32,
}

/// One job placed: its new attempt on these workers (in rank order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub job_id: Uuid,
    pub attempt: u32,
    pub workers: Vec<Uuid>,
    /// How long the job had been QUEUED (since it was submitted, or queued again after a
    /// restart's backoff).
    pub queued_for: std::time::Duration,
}

/// Where a scheduling transaction stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueueEnd {
    /// No job is queued (any more).
    Empty,
    /// The head of the queue does not fit the idle workers (strict FIFO: nothing behind it is
    /// placed).
    Blocked {
        job_id: Uuid,
        world_size: u32,
        idle: usize,
    },
    /// [`PLACEMENTS_PER_TRANSACTION`] jobs were placed; more may fit.
    More,
}

/// Jobs placed in one transaction at most. Measured with segtrain-loadgen at 1,024 simulated
/// GPUs (bench/results.md): 32 per transaction placed 23.5 jobs/s against 20.4 with one, but
/// held the booked workers' rows locked until the commit, so their heartbeats and the jobs'
/// reports waited (Heartbeat p50 62 ms → 678 ms). The placement rate is set elsewhere (see
/// the issue notes); one job per transaction keeps every lock short.
pub const PLACEMENTS_PER_TRANSACTION: usize = 1;

/// What placing the head of the queue did, inside the transaction.
enum Step {
    Placed(Placement),
    Blocked { job_id: Uuid, world_size: u32 },
    Empty,
}

impl Store {
    /// Places queued jobs from the head (highest priority, then oldest), up to
    /// [`PLACEMENTS_PER_TRANSACTION`], in one transaction; returns them and why it stopped.
    ///
    /// Gang placement: `place` gets the idle workers with a live lease and the job's world size
    /// and returns exactly that many workers in rank order, or `None`. For each job the
    /// transaction makes attempt+1 (PENDING) with one rank per worker, the workers BUSY and the
    /// job QUEUED→SCHEDULED (with its event). An advisory lock serialises passes across
    /// coordinators, and each booking updates only rows still IDLE and refuses the whole
    /// transaction unless every chosen one was, so no worker is ever booked twice.
    ///
    /// `idle` is what [`Store::idle_workers`] read, kept across a scheduling pass: at 10,000
    /// workers, reading them all again for every placement was most of a placement's cost. It
    /// loses the workers booked here. A booking of a worker that has meanwhile stopped being
    /// free (booked by another coordinator, drained, lost, leaving) fails with
    /// [`StoreError::Conflict`] and changes nothing: read `idle` again and retry.
    pub async fn schedule_queue(
        &self,
        idle: &mut Vec<Candidate>,
        place: impl Fn(&[Candidate], usize) -> Option<Vec<Uuid>>,
    ) -> Result<(Vec<Placement>, QueueEnd), StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(SCHEDULER_LOCK)
            .execute(&mut *tx)
            .await?;
        let mut placed = Vec::new();
        let end = loop {
            if placed.len() >= PLACEMENTS_PER_TRANSACTION {
                break QueueEnd::More;
            }
            match place_head(&mut tx, idle, &place).await? {
                Step::Placed(p) => placed.push(p),
                Step::Blocked { job_id, world_size } => {
                    break QueueEnd::Blocked {
                        job_id,
                        world_size,
                        idle: idle.len(),
                    }
                }
                Step::Empty => break QueueEnd::Empty,
            }
        };
        if placed.is_empty() {
            tx.rollback().await?;
        } else {
            tx.commit().await?;
        }
        Ok((placed, end))
    }

    /// The workers a placement may book: idle, with a live lease, not leaving; by host and GPU.
    /// Read, not locked: the advisory lock serialises placements, and each booking re-checks
    /// its rows. (Locking every idle row per placement cost a lock per worker, and SKIP LOCKED
    /// read workers that a heartbeat held for a moment as absent.)
    pub async fn idle_workers(&self) -> Result<Vec<Candidate>, StoreError> {
        let rows: Vec<(Uuid, String, i32)> = sqlx::query_as(
            "SELECT id, host, gpu_index FROM workers
             WHERE state = 'IDLE' AND lease_until > now() AND NOT leaving
             ORDER BY host, gpu_index",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(id, host, gpu_index)| Candidate {
                id,
                host,
                gpu_index,
            })
            .collect())
    }

    /// RESTARTING jobs whose backoff is over go back to QUEUED (at their old place: priority,
    /// then submission time), saying where the next attempt will resume. Returns how many.
    pub async fn requeue_restarting(&self) -> Result<usize, StoreError> {
        let due: Vec<Uuid> = sqlx::query_scalar(
            "SELECT id FROM jobs WHERE state = 'RESTARTING' AND restart_at <= now() ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut n = 0;
        for id in due {
            let mut tx = self.pool.begin().await?;
            let job = lock_job(&mut tx, id).await?;
            if job.state != JobState::Restarting {
                tx.rollback().await?; // canceled meanwhile
                continue;
            }
            let latest: Option<i64> = sqlx::query_scalar(
                "SELECT max(iteration) FROM checkpoints WHERE job_id = $1 AND state = 'COMPLETE'",
            )
            .bind(id)
            .fetch_one(&mut *tx)
            .await?;
            let from = match (latest, &job.spec.resume_from) {
                (Some(it), _) => format!("from the checkpoint of iteration {it}"),
                (None, Some(uri)) => format!("from {uri} (resume_from)"),
                (None, None) => "from the beginning (no complete checkpoint yet)".to_string(),
            };
            let reason = format!(
                "backoff over; attempt {} will resume {from}",
                job.attempt + 1
            );
            transition_in_tx(&mut tx, id, JobState::Queued, &reason).await?;
            tx.commit().await?;
            n += 1;
        }
        Ok(n)
    }
}

/// The GPUs each team with a limit may still take, as two parallel lists (for `unnest`).
pub(super) async fn team_rooms(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
) -> Result<(Vec<String>, Vec<i64>), StoreError> {
    let teams = gpu_limited_teams(tx).await?;
    Ok(teams
        .into_values()
        .map(|t| {
            let room = crate::teams::room(&t.limits, t.held_gpus).unwrap_or(u32::MAX);
            (t.name, i64::from(room))
        })
        .unzip())
}

/// Places the head of the queue on some of `idle` (which loses the workers it books), inside
/// the caller's transaction.
async fn place_head(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    idle: &mut Vec<Candidate>,
    place: &impl Fn(&[Candidate], usize) -> Option<Vec<Uuid>>,
) -> Result<Step, StoreError> {
    // A job whose team cannot take even its smallest attempt waits, and is not the head: it
    // blocks nobody else's (crate::teams).
    let (teams, rooms) = team_rooms(tx).await?;
    // `updated_at` is when the job entered QUEUED (only state changes set it).
    let head: Option<(Uuid, f64)> = sqlx::query_as(
        "SELECT id, EXTRACT(EPOCH FROM clock_timestamp() - updated_at)::float8 FROM jobs j
         WHERE state = 'QUEUED'
           AND NOT EXISTS (SELECT 1 FROM unnest($1::text[], $2::int8[]) AS r(team, room)
                           WHERE r.team = j.team
                             AND r.room < (j.spec->>'min_world_size')::int8)
         ORDER BY priority DESC, created_at, id LIMIT 1 FOR UPDATE",
    )
    .bind(&teams)
    .bind(&rooms)
    .fetch_optional(&mut **tx)
    .await?;
    let Some((job_id, queued_secs)) = head else {
        return Ok(Step::Empty);
    };
    let job = lock_job(tx, job_id).await?;
    let candidates = &*idle;
    let room = teams.iter().position(|t| *t == job.team).map(|i| rooms[i]);
    let usable = room.map_or(candidates.len(), |r| candidates.len().min(r as usize));
    let size = attempt_size(&job.spec, usable, seconds(queued_secs));
    let chosen = match size.and_then(|s| place(candidates, s.world_size as usize)) {
        Some(c) if Some(c.len()) == size.map(|s| s.world_size as usize) => c,
        _ => {
            return Ok(Step::Blocked {
                job_id,
                world_size: job.spec.world_size,
            })
        }
    };
    let Some(size) = size else {
        return Err(StoreError::Corrupt("placed without a size".into()));
    };

    let attempt: i32 = sqlx::query_scalar(
        "UPDATE jobs SET attempt = attempt + 1, iteration = 0, resumed_from_iteration = NULL, restart_at = NULL
         WHERE id = $1 RETURNING attempt",
    )
    .bind(job_id)
    .fetch_one(&mut **tx)
    .await?;
    // Resume from the newest complete checkpoint of an earlier attempt, else the spec's.
    let latest: Option<(String, i64)> = sqlx::query_as(
        "SELECT uri, iteration FROM checkpoints WHERE job_id = $1 AND state = 'COMPLETE'
         ORDER BY iteration DESC LIMIT 1",
    )
    .bind(job_id)
    .fetch_optional(&mut **tx)
    .await?;
    let (resume_uri, resume_iter) = match latest {
        Some((uri, it)) => (Some(uri), Some(it)),
        None => (job.spec.resume_from.clone(), None),
    };
    sqlx::query(
        "INSERT INTO attempts
             (job_id, attempt, state, world_size, accumulate_steps, resume_uri, resume_iter)
         VALUES ($1, $2, 'PENDING', $3, $4, $5, $6)",
    )
    .bind(job_id)
    .bind(attempt)
    .bind(size.world_size as i32)
    .bind(size.accumulate_steps as i32)
    .bind(&resume_uri)
    .bind(resume_iter)
    .execute(&mut **tx)
    .await?;
    let ranks: Vec<i32> = (0..chosen.len() as i32).collect();
    sqlx::query(
        "INSERT INTO attempt_ranks (job_id, attempt, rank, worker_id)
         SELECT $1, $2, * FROM UNNEST($3::int[], $4::uuid[])",
    )
    .bind(job_id)
    .bind(attempt)
    .bind(&ranks)
    .bind(&chosen)
    .execute(&mut **tx)
    .await?;
    WorkerState::Idle.check_transition(WorkerState::Busy)?;
    let booked = sqlx::query(
        "UPDATE workers SET state = 'BUSY'
             WHERE id = ANY($1) AND state = 'IDLE' AND lease_until > now() AND NOT leaving",
    )
    .bind(&chosen)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    if booked != chosen.len() as u64 {
        // A chosen worker stopped being free since it was read (booked by another coordinator,
        // registered again, drained, lost, leaving): book nothing (the transaction rolls
        // back); the caller reads the idle workers again.
        return Err(StoreError::Conflict(format!(
            "placement of job {job_id} raced: {booked} of {} workers were still idle",
            chosen.len()
        )));
    }
    let names: Vec<String> = chosen
        .iter()
        .filter_map(|id| candidates.iter().find(|c| c.id == *id))
        .map(|c| super::worker_name(&c.host, c.gpu_index))
        .collect();
    let reason = format!(
        "attempt {attempt} placed on {} worker{}: {}{}",
        chosen.len(),
        if chosen.len() == 1 { "" } else { "s" },
        names.join(", "),
        size.note(&job.spec, candidates.len(), seconds(queued_secs))
    );
    let idle_before = candidates.len();
    transition_in_tx(tx, job_id, JobState::Scheduled, &reason).await?;
    super::bus::notify_each(tx, WORKERS_CHANNEL, &chosen).await?;
    idle.retain(|c| !chosen.contains(&c.id));
    debug_assert_eq!(idle.len() + chosen.len(), idle_before);
    Ok(Step::Placed(Placement {
        job_id,
        attempt: u32_of(attempt, "attempt")?,
        workers: chosen,
        queued_for: seconds(queued_secs),
    }))
}
