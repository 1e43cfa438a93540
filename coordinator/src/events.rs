//! Job events: what `job_events.payload` holds, and how it becomes a `segtrain.v1.JobEvent`.
//!
//! The database keeps each payload as JSON (the `kind` column names the variant, so it can be
//! filtered without parsing); on the wire every event is a typed protobuf message.

use crate::state::JobState;
use segtrain_proto::v1 as pb;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EventPayload {
    /// `from` is `None` for the creation of the job.
    StateChange {
        from: Option<String>,
        to: String,
        reason: String,
    },
    Metrics {
        iteration: u64,
        values: BTreeMap<String, f64>,
    },
    Eval {
        iteration: u64,
        miou: f64,
        aacc: f64,
        loss: f64,
        /// `None` for a class absent from both prediction and label (JSON has no NaN).
        class_iou: Vec<Option<f64>>,
    },
    Checkpoint {
        iteration: u64,
        uri: String,
        bytes: u64,
        sha256: String,
        metrics: BTreeMap<String, f64>,
    },
    Note {
        text: String,
    },
}

impl EventPayload {
    pub fn state_change(from: Option<JobState>, to: JobState, reason: &str) -> EventPayload {
        EventPayload::StateChange {
            from: from.map(|s| s.as_str().to_string()),
            to: to.as_str().to_string(),
            reason: reason.to_string(),
        }
    }

    /// The value of the `kind` column.
    pub fn kind(&self) -> &'static str {
        match self {
            EventPayload::StateChange { .. } => "state_change",
            EventPayload::Metrics { .. } => "metrics",
            EventPayload::Eval { .. } => "eval",
            EventPayload::Checkpoint { .. } => "checkpoint",
            EventPayload::Note { .. } => "note",
        }
    }

    pub fn to_proto(&self, job_id: &str, attempt: u32) -> pb::job_event::Payload {
        use pb::job_event::Payload;
        let state = |s: &str| {
            JobState::parse(s)
                .map(JobState::to_proto)
                .unwrap_or(pb::JobState::Unspecified) as i32
        };
        match self {
            EventPayload::StateChange { from, to, reason } => {
                Payload::StateChange(pb::StateChange {
                    from: from.as_deref().map(state).unwrap_or(0),
                    to: state(to),
                    reason: reason.clone(),
                })
            }
            EventPayload::Metrics { iteration, values } => Payload::Metrics(pb::MetricsReport {
                iteration: *iteration,
                values: values.clone().into_iter().collect(),
            }),
            EventPayload::Eval {
                iteration,
                miou,
                aacc,
                loss,
                class_iou,
            } => Payload::Eval(pb::EvalReport {
                iteration: *iteration,
                miou: *miou,
                aacc: *aacc,
                loss: *loss,
                class_iou: class_iou.iter().map(|v| v.unwrap_or(f64::NAN)).collect(),
            }),
            EventPayload::Checkpoint {
                iteration,
                uri,
                bytes,
                sha256,
                metrics,
            } => Payload::Checkpoint(pb::CheckpointReport {
                checkpoint: Some(pb::Checkpoint {
                    job_id: job_id.to_string(),
                    attempt,
                    iteration: *iteration,
                    uri: uri.clone(),
                    bytes: *bytes,
                    sha256: sha256.clone(),
                    state: pb::CheckpointState::Complete as i32,
                    metrics: metrics.clone().into_iter().collect(),
                    created_at: None,
                }),
            }),
            EventPayload::Note { text } => Payload::Note(pb::Note { text: text.clone() }),
        }
    }
}
