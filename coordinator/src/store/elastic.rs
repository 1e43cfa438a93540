//! Elastic world size: how many ranks an attempt gets, and growing a shrunk job back.
//!
//! A job whose spec allows fewer ranks (`min_world_size < world_size`) and that has waited
//! `elastic_wait_seconds` in the queue without `world_size` idle workers starts with the largest
//! world size w >= min_world_size that the idle workers allow and that divides
//! `world_size x accumulate_steps`; each rank then accumulates `world_size x accumulate_steps / w`
//! micro-batches, so the global batch, and with the trainer's world-invariant sampler the
//! sequence of global batches, is the same at any world size (docs/data-parallel.md). Once no
//! job is queued and enough workers are idle, a shrunk job's attempt is stopped (every rank
//! checkpoints the current iteration) and the job restarts at its full world size: a planned
//! restart, reason `resize`, not counted against `max_restarts`.

use super::attempts::{parse_attempt_state, set_attempt_state};
use super::jobs::{insert_event, lock_job};
use super::placement::{team_rooms, SCHEDULER_LOCK};
use super::{u32_of, Store, StoreError};
use crate::events::EventPayload;
use crate::state::{AttemptState, JobState};
use segtrain_spec::JobSpec;
use std::time::Duration;
use uuid::Uuid;

/// The ranks and the accumulation of one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttemptSize {
    pub world_size: u32,
    pub accumulate_steps: u32,
}

/// The size of the next attempt of a job that has waited `waited` in the queue with `idle`
/// workers idle: the spec's when they suffice; a smaller elastic one once the job has waited
/// `elastic_wait_seconds`; `None` (keep waiting) otherwise.
pub fn attempt_size(spec: &JobSpec, idle: usize, waited: Duration) -> Option<AttemptSize> {
    if idle >= spec.world_size as usize {
        return Some(AttemptSize {
            world_size: spec.world_size,
            accumulate_steps: spec.accumulate_steps,
        });
    }
    if waited < Duration::from_secs(u64::from(spec.elastic_wait_seconds)) {
        return None;
    }
    let world_size = spec
        .elastic_world_sizes()
        .into_iter()
        .find(|w| *w as usize <= idle)?;
    Some(AttemptSize {
        world_size,
        accumulate_steps: spec.accumulate_steps_at(world_size)?,
    })
}

impl AttemptSize {
    /// What the placement reason adds for a shrunk attempt (nothing at full size).
    pub fn note(&self, spec: &JobSpec, idle: usize, waited: Duration) -> String {
        if self.world_size == spec.world_size {
            return String::new();
        }
        format!(
            " (elastic: world size {} of {}, accumulate_steps {}: {idle} worker{} idle after \
             {:.0} s, elastic_wait_seconds {})",
            self.world_size,
            spec.world_size,
            self.accumulate_steps,
            if idle == 1 { "" } else { "s" },
            waited.as_secs_f64(),
            spec.elastic_wait_seconds
        )
    }
}

impl Store {
    /// Stops the attempts of shrunk elastic jobs that can grow back to their full world size
    /// now: nothing is queued (queued jobs come first), and enough workers are idle beside the
    /// attempt's own. Oldest job first; each is counted against the idle workers once. The
    /// attempt moves to STOPPING with `resize_to`, so its ranks are told to stop, checkpoint the
    /// current iteration and exit; it ends RESIZED and the job restarts (`settle_attempt`).
    /// Returns the jobs asked to grow.
    pub async fn grow_shrunk_jobs(&self) -> Result<Vec<Uuid>, StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(SCHEDULER_LOCK)
            .execute(&mut *tx)
            .await?;
        let (queued, idle): (bool, i64) = sqlx::query_as(
            "SELECT EXISTS (SELECT 1 FROM jobs WHERE state = 'QUEUED'),
                    (SELECT count(*) FROM workers
                     WHERE state = 'IDLE' AND lease_until > now() AND NOT leaving)",
        )
        .fetch_one(&mut *tx)
        .await?;
        if queued || idle == 0 {
            tx.rollback().await?;
            return Ok(Vec::new());
        }
        // A job grows only as far as its team's GPU limit lets it (crate::teams).
        let (teams, rooms) = team_rooms(&mut tx).await?;
        let shrunk: Vec<(Uuid, i32, i32, i32)> = sqlx::query_as(
            "SELECT j.id, j.attempt, j.world_size, a.world_size FROM jobs j
             JOIN attempts a ON a.job_id = j.id AND a.attempt = j.attempt
             WHERE j.state = 'RUNNING' AND a.state = 'RUNNING' AND a.world_size < j.world_size
               AND NOT EXISTS (SELECT 1 FROM unnest($1::text[], $2::int8[]) AS r(team, room)
                               WHERE r.team = j.team AND r.room < j.world_size - a.world_size)
             ORDER BY j.priority DESC, j.created_at, j.id",
        )
        .bind(&teams)
        .bind(&rooms)
        .fetch_all(&mut *tx)
        .await?;
        let mut left = idle;
        let mut grown = Vec::new();
        for (job_id, attempt, full, now) in shrunk {
            let need = i64::from(full - now);
            if need > left {
                continue;
            }
            let job = lock_job(&mut tx, job_id).await?;
            let attempt = u32_of(attempt, "attempt")?;
            let state: String = sqlx::query_scalar(
                "SELECT state FROM attempts WHERE job_id = $1 AND attempt = $2 FOR UPDATE",
            )
            .bind(job_id)
            .bind(attempt as i32)
            .fetch_one(&mut *tx)
            .await?;
            let state = parse_attempt_state(&state)?;
            if job.state != JobState::Running
                || job.attempt != attempt
                || state != AttemptState::Running
            {
                continue;
            }
            left -= need;
            sqlx::query("UPDATE attempts SET resize_to = $3 WHERE job_id = $1 AND attempt = $2")
                .bind(job_id)
                .bind(attempt as i32)
                .bind(full)
                .execute(&mut *tx)
                .await?;
            let reason = format!(
                "resize: {need} more worker{} idle; attempt {attempt} (world size {now}) stops \
                 with a checkpoint of its current iteration to grow back to world size {full}",
                if need == 1 { " is" } else { "s are" }
            );
            set_attempt_state(
                &mut tx,
                job_id,
                attempt,
                state,
                AttemptState::Stopping,
                &reason,
            )
            .await?;
            insert_event(
                &mut tx,
                job_id,
                attempt,
                &EventPayload::Note { text: reason },
            )
            .await?;
            grown.push(job_id);
        }
        tx.commit().await?;
        Ok(grown)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(world: u32, acc: u32, min: u32, wait: u32) -> JobSpec {
        let mut s = JobSpec::with_defaults("/data");
        s.world_size = world;
        s.accumulate_steps = acc;
        s.min_world_size = min;
        s.elastic_wait_seconds = wait;
        s
    }

    fn size(world_size: u32, accumulate_steps: u32) -> Option<AttemptSize> {
        Some(AttemptSize {
            world_size,
            accumulate_steps,
        })
    }

    #[test]
    fn full_size_when_enough_workers_are_idle_whatever_the_wait() {
        let s = spec(4, 2, 1, 60);
        assert_eq!(attempt_size(&s, 4, Duration::ZERO), size(4, 2));
        assert_eq!(attempt_size(&s, 9, Duration::ZERO), size(4, 2));
    }

    #[test]
    fn smaller_only_after_the_elastic_wait_and_never_below_the_minimum() {
        let s = spec(4, 1, 2, 60);
        assert_eq!(attempt_size(&s, 3, Duration::from_secs(59)), None);
        // 3 does not divide 4 micro-batches: the largest that does is 2.
        assert_eq!(attempt_size(&s, 3, Duration::from_secs(60)), size(2, 2));
        assert_eq!(attempt_size(&s, 1, Duration::from_secs(600)), None);
        // Not elastic: waits for the full world however long.
        let rigid = spec(4, 1, 4, 0);
        assert_eq!(attempt_size(&rigid, 3, Duration::from_secs(3600)), None);
    }

    #[test]
    fn the_global_batch_is_kept() {
        let s = spec(6, 2, 1, 0);
        for idle in 1..6 {
            let got = attempt_size(&s, idle, Duration::ZERO).expect("some size fits");
            assert!(got.world_size as usize <= idle);
            assert_eq!(got.world_size * got.accumulate_steps, 12, "{got:?}");
        }
        assert_eq!(attempt_size(&s, 5, Duration::ZERO), size(4, 3));
    }
}
