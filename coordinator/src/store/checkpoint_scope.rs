//! A checkpoint lies in its own job's directory, `<checkpoint_root>/<job id>/`: a worker cannot
//! make a job resume from files it placed anywhere else.
//!
//! - a `checkpoint` or `checkpoint_pending` event names a URI below its attempt's directory,
//!   `<checkpoint_root>/<job id>/attempt-<n>/` (where the trainer of that attempt writes);
//! - a `resumed` event names a URI below the job's directory, or the spec's `resume_from`;
//! - an attempt is offered only candidates below the job's directory (rows stored before this
//!   rule are filtered, not trusted).
//!
//! Anything else is refused with INVALID_ARGUMENT naming the field, the URI and the directory.

use super::ingest::{IngestBody, IngestEvent};
use super::ResumeCandidate;
use super::StoreError;
use segtrain_spec::location::{attempt_subdir, is_within, join};
use segtrain_spec::JobSpec;
use sqlx::{Postgres, Transaction};
use std::collections::BTreeSet;
use uuid::Uuid;

/// Where one job's checkpoints may be: its root and its `resume_from`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Scope {
    pub job_id: Uuid,
    pub checkpoint_root: String,
    pub resume_from: Option<String>,
}

impl Scope {
    pub fn of(job_id: Uuid, spec: &JobSpec) -> Scope {
        Scope {
            job_id,
            checkpoint_root: spec.checkpoint_root.clone(),
            resume_from: spec.resume_from.clone(),
        }
    }

    fn job_dir(&self) -> String {
        join(&self.checkpoint_root, &self.job_id.to_string())
    }

    fn attempt_dir(&self, attempt: u32) -> String {
        join(
            &self.checkpoint_root,
            &attempt_subdir(&self.job_id.to_string(), attempt),
        )
    }

    /// Whether an attempt may be offered `uri` to resume from.
    pub fn offers(&self, uri: &str) -> bool {
        is_within(&self.job_dir(), uri) || self.resume_from.as_deref() == Some(uri)
    }

    /// The refusal of an event whose URI lies outside what it may name.
    pub fn check(&self, ev: &IngestEvent) -> Result<(), StoreError> {
        let (field, uri, dir) = match &ev.body {
            IngestBody::Checkpoint { uri, .. } => {
                ("checkpoint.uri", uri, self.attempt_dir(ev.attempt))
            }
            IngestBody::CheckpointPending { uri, .. } => {
                ("checkpoint_pending.uri", uri, self.attempt_dir(ev.attempt))
            }
            IngestBody::Resumed { uri, .. } if !self.offers(uri) => {
                ("resumed.uri", uri, self.job_dir())
            }
            _ => return Ok(()),
        };
        if is_within(&dir, uri) {
            return Ok(());
        }
        Err(StoreError::Invalid(format!(
            "{field}: {uri:?} is outside the checkpoint directory of job {} attempt {} ({dir}); \
             a checkpoint must lie in its own job's directory",
            self.job_id, ev.attempt
        )))
    }

    /// The candidates an attempt may be offered, in their order.
    pub fn filter(&self, candidates: Vec<ResumeCandidate>) -> Vec<ResumeCandidate> {
        candidates
            .into_iter()
            .filter(|c| self.offers(&c.uri))
            .collect()
    }

    /// An attempt's resume point and candidates as offered: only what the scope allows (a row
    /// stored before the rule could lie elsewhere; then the newest allowed candidate instead).
    pub fn offered(
        &self,
        resume_uri: Option<String>,
        candidates: Vec<ResumeCandidate>,
    ) -> (Option<String>, Vec<ResumeCandidate>) {
        let candidates = self.filter(candidates);
        let resume_uri = match resume_uri {
            Some(uri) if !self.offers(&uri) => candidates.first().map(|c| c.uri.clone()),
            other => other,
        };
        (resume_uri, candidates)
    }
}

/// Whether an event names a checkpoint URI at all.
fn names_a_checkpoint(ev: &IngestEvent) -> bool {
    matches!(
        ev.body,
        IngestBody::Checkpoint { .. }
            | IngestBody::CheckpointPending { .. }
            | IngestBody::Resumed { .. }
    )
}

/// Checks every event of a batch that names a checkpoint against its job's [`Scope`] (one read
/// of the spec per such job, none for a batch of metrics). The caller holds the jobs' locks.
pub(super) async fn check_events(
    tx: &mut Transaction<'_, Postgres>,
    events: &[&IngestEvent],
) -> Result<(), StoreError> {
    let jobs: BTreeSet<Uuid> = events
        .iter()
        .filter(|e| names_a_checkpoint(e))
        .map(|e| e.job_id)
        .collect();
    for job_id in jobs {
        let (checkpoint_root, resume_from): (Option<String>, Option<String>) = sqlx::query_as(
            "SELECT spec->>'checkpoint_root', spec->>'resume_from' FROM jobs WHERE id = $1",
        )
        .bind(job_id)
        .fetch_one(&mut **tx)
        .await?;
        let scope = Scope {
            job_id,
            checkpoint_root: checkpoint_root.ok_or_else(|| {
                StoreError::Corrupt(format!("job {job_id} spec has no checkpoint_root"))
            })?,
            resume_from,
        };
        for ev in events.iter().filter(|e| e.job_id == job_id) {
            scope.check(ev)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(attempt: u32, body: IngestBody) -> IngestEvent {
        IngestEvent {
            seq: 1,
            job_id: Uuid::nil(),
            attempt,
            rank: 0,
            body,
        }
    }

    fn checkpoint(uri: &str) -> IngestBody {
        IngestBody::Checkpoint {
            iteration: 10,
            uri: uri.into(),
            bytes: 1,
            sha256: "x".into(),
            metrics: Default::default(),
            on_stop: false,
        }
    }

    fn resumed(uri: &str) -> IngestBody {
        IngestBody::Resumed {
            iteration: 10,
            uri: uri.into(),
            skipped: vec![],
        }
    }

    #[test]
    fn a_checkpoint_lies_in_its_own_jobs_directory() {
        let job = Uuid::nil();
        let scope = Scope {
            job_id: job,
            checkpoint_root: "/ckpt".into(),
            resume_from: Some("gs://team/old/iter_100".into()),
        };
        let mine = format!("/ckpt/{job}/attempt-2/iter_10");
        assert!(scope.check(&ev(2, checkpoint(&mine))).is_ok());
        assert!(scope
            .check(&ev(2, checkpoint(&format!("file://{mine}"))))
            .is_ok());
        // Another attempt's directory, another job's, anywhere else, or a climb out.
        for uri in [
            format!("/ckpt/{job}/attempt-1/iter_10"),
            "/ckpt/other-job/attempt-2/iter_10".to_string(),
            "/tmp/evil".to_string(),
            format!("/ckpt/{job}/attempt-2/../../../tmp/evil"),
            "gs://attacker/x".to_string(),
        ] {
            let e = scope
                .check(&ev(2, checkpoint(&uri)))
                .unwrap_err()
                .to_string();
            assert!(
                e.starts_with("checkpoint.uri: ") && e.contains(&format!("/ckpt/{job}/attempt-2")),
                "{e}"
            );
        }
        let pending = IngestBody::CheckpointPending {
            iteration: 10,
            uri: "/tmp/x".into(),
        };
        assert!(scope.check(&ev(2, pending)).is_err());
        // A resume: from any attempt of this job, or from the spec's resume_from.
        assert!(scope
            .check(&ev(3, resumed(&format!("/ckpt/{job}/attempt-1/iter_10"))))
            .is_ok());
        assert!(scope
            .check(&ev(3, resumed("gs://team/old/iter_100")))
            .is_ok());
        let e = scope.check(&ev(3, resumed("/tmp/x"))).unwrap_err();
        assert!(e.to_string().starts_with("resumed.uri: "), "{e}");
        // Metrics name no checkpoint.
        let m = IngestBody::Note {
            text: "/tmp".into(),
        };
        assert!(scope.check(&ev(3, m)).is_ok());
        let c = |uri: &str| ResumeCandidate {
            uri: uri.into(),
            iteration: 1,
            sha256: String::new(),
        };
        assert_eq!(
            scope.filter(vec![c(&mine), c("/tmp/x"), c("gs://team/old/iter_100")]),
            vec![c(&mine), c("gs://team/old/iter_100")]
        );
    }
}
