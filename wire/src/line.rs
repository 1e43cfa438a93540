//! The trainer → daemon line format: one JSON object per stdout line of
//! `segtrain-worker train --json`, tagged by `"event"`. Both ends use [`TrainerLine`]: the
//! trainer serialises it (`train::report`), the daemon parses it (`daemon::trainer_process`), so
//! a field renamed on one side cannot be silently read as a default on the other.
//!
//! Numbers that may be NaN or infinite (losses, scores, the IoU of a class absent from the val
//! set) are [`Real`]s: JSON numbers when finite, the strings `"NaN"`, `"inf"` and `"-inf"`
//! otherwise (`null` also reads as NaN), so they arrive as what they are.
//!
//! A line that does not parse is a [`LineError`]: the daemon counts, logs and notes it, and goes
//! on with the next line. Parsing never panics (a property test feeds it arbitrary input).

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::collections::BTreeMap;

/// The collective backend is up (after the rendezvous): the trainer's `collective` event and
/// line alike.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CollectiveReady {
    /// `nccl` or `tcp`.
    pub backend: String,
    /// What it runs on: library and version, rank, world, device.
    pub detail: String,
}

/// What a run starts with, once its data, model and resume point are ready: the trainer's
/// `started` event and line alike.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunStart {
    /// The first iteration it runs (0, or the checkpoint's it resumed from).
    pub start_iteration: u64,
    pub max_iters: u64,
    pub train_images: u64,
    pub val_images: u64,
    /// The device, as libtorch names it (`Cpu`, `Cuda(0)`).
    pub device: String,
    /// The checkpoint directory it resumed from.
    #[serde(default)]
    pub resumed_from: Option<String>,
    pub parameters: i64,
}

/// The longest line the daemon reads; a longer one is skipped to its end (and noted).
pub const MAX_LINE_BYTES: usize = 1 << 20;

/// A number that may be NaN or infinite.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Real(pub f64);

impl Serialize for Real {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let v = self.0;
        if v.is_finite() {
            s.serialize_f64(v)
        } else if v.is_nan() {
            s.serialize_str("NaN")
        } else if v > 0.0 {
            s.serialize_str("inf")
        } else {
            s.serialize_str("-inf")
        }
    }
}

impl<'de> Deserialize<'de> for Real {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Real, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Real;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(r#"a number, "NaN", "inf", "-inf" or null"#)
            }
            fn visit_f64<E>(self, v: f64) -> Result<Real, E> {
                Ok(Real(v))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Real, E> {
                Ok(Real(v as f64))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Real, E> {
                Ok(Real(v as f64))
            }
            fn visit_unit<E>(self) -> Result<Real, E> {
                Ok(Real(f64::NAN))
            }
            fn visit_none<E>(self) -> Result<Real, E> {
                Ok(Real(f64::NAN))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Real, E> {
                match v {
                    "NaN" | "nan" => Ok(Real(f64::NAN)),
                    "inf" | "Infinity" => Ok(Real(f64::INFINITY)),
                    "-inf" | "-Infinity" => Ok(Real(f64::NEG_INFINITY)),
                    _ => Err(E::invalid_value(serde::de::Unexpected::Str(v), &self)),
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// Named numbers (metrics).
pub type Values = BTreeMap<String, Real>;

/// A checkpoint the trainer skipped when resuming.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Skipped {
    pub iteration: u64,
    pub uri: String,
    pub reason: String,
}

/// Whether a restart would repeat a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureClass {
    Deterministic,
    Infra,
    /// The worker's disk is full (ENOSPC): an infrastructure failure of this worker, which
    /// takes no new rank until its daemon restarts, so restarts go elsewhere.
    DiskFull,
}

/// One line of trainer output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum TrainerLine {
    /// Rank 0's endpoint, before it waits for the others: a TCP address, or the NCCL unique id
    /// in base64.
    Rendezvous {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tcp_address: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        nccl_unique_id: Option<String>,
    },
    /// The collective backend is up.
    Collective(CollectiveReady),
    Started(RunStart),
    /// Rank 0's metrics of a log interval: the job's.
    Metrics {
        iteration: u64,
        values: Values,
    },
    /// Another rank's own metrics: for its daemon's gauges only.
    RankMetrics {
        iteration: u64,
        values: Values,
    },
    Eval {
        iteration: u64,
        miou: Real,
        aacc: Real,
        loss: Real,
        #[serde(default)]
        class_iou: Vec<Real>,
        #[serde(default)]
        images: u64,
    },
    Resumed {
        iteration: u64,
        uri: String,
        #[serde(default)]
        skipped: Vec<Skipped>,
    },
    CheckpointPending {
        iteration: u64,
        uri: String,
    },
    Checkpoint {
        iteration: u64,
        uri: String,
        bytes: u64,
        sha256: String,
        #[serde(default)]
        metrics: Values,
        #[serde(default)]
        deleted: Vec<String>,
        /// Written because the run was asked to stop (a preemption, a resize, a cancel), not
        /// on `checkpoint_interval`: the newest state of the run.
        #[serde(default)]
        on_stop: bool,
    },
    Stopped {
        iteration: u64,
    },
    Finished {
        iteration: u64,
        #[serde(default)]
        best_miou: Option<Real>,
        #[serde(default)]
        best_iteration: Option<u64>,
    },
    /// The trainer's last line before a failing exit.
    Failed {
        class: FailureClass,
        reason: String,
    },
}

/// Every `"event"` tag [`TrainerLine`] has (a unit test keeps it complete).
pub const KINDS: &[&str] = &[
    "rendezvous",
    "collective",
    "started",
    "metrics",
    "rank_metrics",
    "eval",
    "resumed",
    "checkpoint_pending",
    "checkpoint",
    "stopped",
    "finished",
    "failed",
];

/// Why a line was not read.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LineError {
    #[error("not JSON ({0})")]
    NotJson(String),
    #[error("a JSON line without an \"event\" kind")]
    NoKind,
    #[error("unknown event kind {0:?}")]
    UnknownKind(String),
    #[error("a malformed {kind:?} event ({error})")]
    Malformed { kind: String, error: String },
    #[error("a line longer than {MAX_LINE_BYTES} bytes ({0} bytes)")]
    TooLong(usize),
    #[error("a line that is not UTF-8")]
    NotUtf8,
}

impl LineError {
    /// The `reason` label of `segtrain_worker_trainer_lines_dropped_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            LineError::UnknownKind(_) => "unknown_kind",
            LineError::TooLong(_) => "too_long",
            LineError::NotJson(_)
            | LineError::NoKind
            | LineError::Malformed { .. }
            | LineError::NotUtf8 => "malformed",
        }
    }
}

/// At most `n` characters of `s`, for messages about a bad line.
pub fn preview(s: &str, n: usize) -> String {
    let mut out: String = s.chars().take(n).collect();
    if s.chars().nth(n).is_some() {
        out.push('…');
    }
    out
}

impl TrainerLine {
    /// Parses one line (without its newline).
    pub fn parse(line: &str) -> Result<TrainerLine, LineError> {
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| LineError::NotJson(e.to_string()))?;
        let kind = v
            .get("event")
            .and_then(serde_json::Value::as_str)
            .ok_or(LineError::NoKind)?;
        if !KINDS.contains(&kind) {
            return Err(LineError::UnknownKind(preview(kind, 64)));
        }
        let kind = kind.to_string();
        serde_json::from_value(v).map_err(|e| LineError::Malformed {
            kind,
            error: e.to_string(),
        })
    }

    /// The line as the trainer prints it (one JSON object, no newline).
    pub fn to_line(&self) -> String {
        // Only maps with string keys, strings and numbers: serialising cannot fail.
        serde_json::to_string(self).unwrap_or_else(|e| {
            format!(
                r#"{{"event":"failed","class":"infra","reason":"cannot encode an event: {e}"}}"#
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<TrainerLine> {
        let values = Values::from([
            ("loss".to_string(), Real(0.5)),
            ("nan".to_string(), Real(f64::NAN)),
        ]);
        vec![
            TrainerLine::Rendezvous {
                tcp_address: Some("10.0.0.1:4000".into()),
                nccl_unique_id: None,
            },
            TrainerLine::Collective(CollectiveReady {
                backend: "tcp".into(),
                detail: "x".into(),
            }),
            TrainerLine::Started(RunStart {
                start_iteration: 0,
                max_iters: 10,
                train_images: 8,
                val_images: 2,
                device: "cpu".into(),
                resumed_from: None,
                parameters: 7,
            }),
            TrainerLine::Metrics {
                iteration: 1,
                values: values.clone(),
            },
            TrainerLine::RankMetrics {
                iteration: 1,
                values: values.clone(),
            },
            TrainerLine::Eval {
                iteration: 2,
                miou: Real(f64::NAN),
                aacc: Real(f64::INFINITY),
                loss: Real(f64::NEG_INFINITY),
                class_iou: vec![Real(0.25), Real(f64::NAN)],
                images: 2,
            },
            TrainerLine::Resumed {
                iteration: 4,
                uri: "/c".into(),
                skipped: vec![Skipped {
                    iteration: 6,
                    uri: "/d".into(),
                    reason: "bad".into(),
                }],
            },
            TrainerLine::CheckpointPending {
                iteration: 4,
                uri: "/c".into(),
            },
            TrainerLine::Checkpoint {
                iteration: 4,
                uri: "/c".into(),
                bytes: 9,
                sha256: "ab".into(),
                metrics: values,
                deleted: vec!["/b".into()],
                on_stop: true,
            },
            TrainerLine::Stopped { iteration: 4 },
            TrainerLine::Finished {
                iteration: 4,
                best_miou: Some(Real(0.5)),
                best_iteration: Some(4),
            },
            TrainerLine::Failed {
                class: FailureClass::Deterministic,
                reason: "no data".into(),
            },
        ]
    }

    /// NaN != NaN: compare through the encoding.
    fn same(a: &TrainerLine, b: &TrainerLine) -> bool {
        a.to_line() == b.to_line()
    }

    #[test]
    fn every_kind_round_trips_and_kinds_lists_them_all() {
        let lines = samples();
        let mut tags: Vec<String> = Vec::new();
        for l in &lines {
            let text = l.to_line();
            let back = TrainerLine::parse(&text).expect("parses");
            assert!(same(l, &back), "{text}");
            let v: serde_json::Value = serde_json::from_str(&text).expect("json");
            tags.push(v["event"].as_str().expect("tag").to_string());
        }
        tags.sort();
        let mut kinds: Vec<String> = KINDS.iter().map(|k| k.to_string()).collect();
        kinds.sort();
        assert_eq!(tags, kinds);
    }

    #[test]
    fn non_finite_numbers_are_kept_and_null_reads_as_nan() {
        let line = r#"{"event":"eval","iteration":1,"miou":null,"aacc":"inf","loss":"NaN","class_iou":[0.5,null,"-inf"]}"#;
        match TrainerLine::parse(line).expect("parses") {
            TrainerLine::Eval {
                miou,
                aacc,
                loss,
                class_iou,
                ..
            } => {
                assert!(miou.0.is_nan() && loss.0.is_nan());
                assert_eq!(aacc.0, f64::INFINITY);
                assert_eq!(class_iou[0].0, 0.5);
                assert!(class_iou[1].0.is_nan());
                assert_eq!(class_iou[2].0, f64::NEG_INFINITY);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            TrainerLine::Eval {
                iteration: 1,
                miou: Real(f64::NAN),
                aacc: Real(1.0),
                loss: Real(f64::INFINITY),
                class_iou: vec![],
                images: 0
            }
            .to_line(),
            r#"{"event":"eval","iteration":1,"miou":"NaN","aacc":1.0,"loss":"inf","class_iou":[],"images":0}"#
        );
    }

    #[test]
    fn bad_lines_say_why() {
        let e = |l: &str| TrainerLine::parse(l).expect_err("refused");
        assert!(matches!(e("not json {"), LineError::NotJson(_)));
        assert_eq!(e(r#"{"iteration":1}"#), LineError::NoKind);
        assert_eq!(e(r#"{"event":7}"#), LineError::NoKind);
        assert_eq!(
            e(r#"{"event":"bogus"}"#),
            LineError::UnknownKind("bogus".into())
        );
        match e(r#"{"event":"metrics","iteration":"x","values":{}}"#) {
            LineError::Malformed { kind, .. } => assert_eq!(kind, "metrics"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            e(r#"{"event":"metrics","iteration":1,"values":{"loss":"lots"}}"#),
            LineError::Malformed { .. }
        ));
        assert_eq!(e(r#"{"event":"bogus"}"#).reason(), "unknown_kind");
        assert_eq!(LineError::TooLong(5).reason(), "too_long");
        assert_eq!(e("[").reason(), "malformed");
        assert_eq!(preview("abcdef", 3), "abc…");
        assert_eq!(preview("abc", 3), "abc");
    }
}
