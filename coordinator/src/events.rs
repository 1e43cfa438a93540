//! Job events: what `job_events.payload` holds, and how it becomes a `segtrain.v1.JobEvent`.
//!
//! The database keeps each payload as JSON (the `kind` column names the variant, so it can be
//! filtered without parsing); on the wire every event is a typed protobuf message. JSON has no
//! NaN or infinity: a non-finite value (a diverged loss, the IoU of a class absent from the val
//! set) is `null` in a payload and NaN again on the wire; the `metrics` table keeps it as it is.

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
    /// Stored as the iteration alone: `store::events_after` fills `values` from the `metrics`
    /// table, where the points are (events stored before that kept a copy, read as it is).
    Metrics {
        iteration: u64,
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        values: BTreeMap<String, Option<f64>>,
    },
    Eval {
        iteration: u64,
        miou: Option<f64>,
        aacc: Option<f64>,
        loss: Option<f64>,
        /// `None` for a class absent from both prediction and label.
        class_iou: Vec<Option<f64>>,
    },
    Checkpoint {
        iteration: u64,
        uri: String,
        bytes: u64,
        sha256: String,
        metrics: BTreeMap<String, Option<f64>>,
        /// Written on a stop request (absent from events stored before the field existed).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        on_stop: bool,
    },
    Note {
        text: String,
    },
}

/// A number as a payload holds it: `None` (JSON null) when not finite.
pub fn json_number(v: f64) -> Option<f64> {
    v.is_finite().then_some(v)
}

/// Named numbers as a payload holds them (non-finite ones as null).
pub fn json_values(values: &BTreeMap<String, f64>) -> BTreeMap<String, Option<f64>> {
    values
        .iter()
        .map(|(k, v)| (k.clone(), json_number(*v)))
        .collect()
}

/// Back to wire numbers: null is NaN.
fn wire_values(values: &BTreeMap<String, Option<f64>>) -> std::collections::HashMap<String, f64> {
    values
        .iter()
        .map(|(k, v)| (k.clone(), v.unwrap_or(f64::NAN)))
        .collect()
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
                values: wire_values(values),
            }),
            EventPayload::Eval {
                iteration,
                miou,
                aacc,
                loss,
                class_iou,
            } => Payload::Eval(pb::EvalReport {
                iteration: *iteration,
                miou: miou.unwrap_or(f64::NAN),
                aacc: aacc.unwrap_or(f64::NAN),
                loss: loss.unwrap_or(f64::NAN),
                class_iou: class_iou.iter().map(|v| v.unwrap_or(f64::NAN)).collect(),
            }),
            EventPayload::Checkpoint {
                iteration,
                uri,
                bytes,
                sha256,
                metrics,
                on_stop,
            } => Payload::Checkpoint(pb::CheckpointReport {
                checkpoint: Some(pb::Checkpoint {
                    job_id: job_id.to_string(),
                    attempt,
                    iteration: *iteration,
                    uri: uri.clone(),
                    bytes: *bytes,
                    sha256: sha256.clone(),
                    state: pb::CheckpointState::Complete as i32,
                    metrics: wire_values(metrics),
                    created_at: None,
                    on_stop: *on_stop,
                }),
            }),
            EventPayload::Note { text } => Payload::Note(pb::Note { text: text.clone() }),
        }
    }
}
