//! segtrain.v1 messages as JSON documents: one shape for the CLI's `--json` output and the
//! dashboard's HTTP API (`coordinator/src/web`), so a field has one name in both. Enums are their
//! names without the type prefix (`RUNNING`), times RFC 3339 UTC, and a NaN or infinity `null`
//! (JSON has neither).

use crate::job_spec::ProtoSpec;
use crate::v1 as pb;
use crate::Timestamp;
use segtrain_spec::JobSpec;
use serde::Serialize;
use serde_json::{json, Value};

/// A job as `--json` and the dashboard show it: the proto `Job` with its spec resolved and the
/// enum and time fields as text.
#[derive(Debug, Serialize)]
pub struct JobView {
    pub id: String,
    pub name: String,
    pub state: String,
    pub attempt: u32,
    /// Restarts after failures, of `max_restarts`.
    pub restarts: u32,
    pub max_restarts: u32,
    /// Attempts ended by a preemption (not counted as restarts).
    pub preemptions: u32,
    /// The current attempt's ranks and accumulation (an elastic job's may differ from the
    /// spec's `world_size` and `accumulate_steps`).
    pub attempt_world_size: u32,
    pub attempt_accumulate_steps: u32,
    /// The current attempt's progress.
    pub iteration: u64,
    /// The newest iteration any attempt reached.
    pub furthest_iteration: u64,
    /// The checkpoint iteration the current attempt resumed from.
    pub resumed_from_iteration: Option<u64>,
    pub max_iters: u64,
    pub world_size: u32,
    pub variant: String,
    pub reason: String,
    pub idempotency_key: String,
    pub created_at: String,
    pub updated_at: String,
    pub finished_at: Option<String>,
    /// Who submitted it (empty: before owners were recorded), and its team.
    pub submitted_by: String,
    pub team: String,
    pub spec: Value,
}

impl From<&pb::Job> for JobView {
    fn from(j: &pb::Job) -> JobView {
        let spec = j.spec.clone().unwrap_or_default();
        let spec_json = JobSpec::from_proto(&spec)
            .ok()
            .and_then(|s| serde_json::to_value(s).ok())
            .unwrap_or(Value::Null);
        JobView {
            id: j.id.clone(),
            name: spec.name.clone().unwrap_or_default(),
            state: state_name(j.state),
            attempt: j.attempt,
            restarts: j.restarts,
            max_restarts: spec.max_restarts.unwrap_or_default(),
            preemptions: j.preemptions,
            attempt_world_size: j.attempt_world_size,
            attempt_accumulate_steps: j.attempt_accumulate_steps,
            iteration: j.iteration,
            furthest_iteration: j.furthest_iteration,
            resumed_from_iteration: j.resumed_from_iteration,
            max_iters: spec.max_iters.unwrap_or_default(),
            world_size: spec.world_size.unwrap_or_default(),
            variant: spec.variant.clone().unwrap_or_default(),
            reason: j.reason.clone(),
            idempotency_key: j.idempotency_key.clone(),
            created_at: time(&j.created_at),
            updated_at: time(&j.updated_at),
            finished_at: j.finished_at.as_ref().map(|_| time(&j.finished_at)),
            submitted_by: j.submitted_by.clone(),
            team: j.team.clone(),
            spec: spec_json,
        }
    }
}

/// A worker as people name it: HOST:GPU, HOST:cpu for a CPU worker.
pub fn worker_name(w: &pb::Worker) -> String {
    crate::names::worker_name(&w.host, w.gpu_index)
}

/// A proto enum value as JSON and the CLI's tables show it: its name without the type prefix, or UNKNOWN(n).
fn enum_name(name: Option<&'static str>, prefix: &str, raw: i32) -> String {
    name.map_or_else(
        || format!("UNKNOWN({raw})"),
        |n| n.trim_start_matches(prefix).to_string(),
    )
}

pub fn worker_state_name(s: i32) -> String {
    let name = pb::WorkerState::try_from(s).ok().map(|v| v.as_str_name());
    enum_name(name, "WORKER_STATE_", s)
}

/// The job states in proto order, as a state filter (`--state`, `?state=`) names them.
pub const JOB_STATE_NAMES: [&str; 8] = [
    "queued",
    "scheduled",
    "running",
    "succeeded",
    "failed",
    "canceled",
    "restarting",
    "canceling",
];

/// A job state by name, any case (`running`, `RUNNING`); the error names the allowed values.
pub fn parse_state_name(s: &str) -> Result<pb::JobState, String> {
    match pb::JobState::from_str_name(&format!("JOB_STATE_{}", s.to_ascii_uppercase())) {
        Some(st) if st != pb::JobState::Unspecified => Ok(st),
        _ => Err(format!(
            "unknown state {s:?}; allowed: {}",
            JOB_STATE_NAMES.join(", ")
        )),
    }
}

pub fn state_name(s: i32) -> String {
    let name = pb::JobState::try_from(s).ok().map(|v| v.as_str_name());
    enum_name(name, "JOB_STATE_", s)
}

pub fn time(t: &Option<Timestamp>) -> String {
    t.as_ref()
        .and_then(|t| chrono::DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32))
        .map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_default()
}

pub fn role_name(r: i32) -> String {
    pb::TokenRole::try_from(r)
        .map(|r| {
            r.as_str_name()
                .trim_start_matches("TOKEN_ROLE_")
                .to_ascii_lowercase()
        })
        .unwrap_or_else(|_| format!("unknown({r})"))
}

/// A map's entries in name order.
pub fn sorted(m: &std::collections::HashMap<String, f64>) -> Vec<(String, f64)> {
    let mut v: Vec<(String, f64)> = m.iter().map(|(k, v)| (k.clone(), *v)).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// A metric point as `--json` and `segtrain export json` write it (a non-finite value is null).
pub fn point(p: &pb::MetricPoint) -> Value {
    json!({"attempt": p.attempt, "iteration": p.iteration, "name": p.name, "value": num(p.value)})
}

pub fn checkpoint_state(s: i32) -> String {
    let name = pb::CheckpointState::try_from(s)
        .ok()
        .map(|v| v.as_str_name());
    enum_name(name, "CHECKPOINT_STATE_", s)
}

pub fn checkpoint(c: &pb::Checkpoint) -> Value {
    json!({
        "job_id": c.job_id, "attempt": c.attempt, "iteration": c.iteration, "uri": c.uri,
        "bytes": c.bytes, "sha256": c.sha256, "state": checkpoint_state(c.state),
        "metrics": c.metrics, "created_at": time(&c.created_at), "on_stop": c.on_stop,
    })
}

pub fn attempt_state(s: i32) -> String {
    let name = pb::AttemptState::try_from(s).ok().map(|v| v.as_str_name());
    enum_name(name, "ATTEMPT_STATE_", s)
}

pub fn attempt(a: &pb::Attempt) -> Value {
    json!({
        "attempt": a.attempt, "state": attempt_state(a.state), "world_size": a.world_size,
        "accumulate_steps": a.accumulate_steps, "reason": a.reason,
        "resumed_from_iteration": a.resumed_from_iteration, "workers": a.workers,
        "created_at": time(&a.created_at), "finished_at": a.finished_at.as_ref().map(|_| time(&a.finished_at)),
    })
}

/// JSON has no NaN: a NaN (an IoU of a class seen nowhere) becomes null.
pub fn num(v: f64) -> Value {
    serde_json::Number::from_f64(v)
        .map(Value::Number)
        .unwrap_or(Value::Null)
}

pub fn event(ev: &pb::JobEvent) -> Value {
    use pb::job_event::Payload;
    let (kind, body) = match &ev.payload {
        Some(Payload::StateChange(c)) => (
            "state_change",
            json!({"from": if c.from == 0 { Value::Null } else { Value::String(state_name(c.from)) },
                   "to": state_name(c.to), "reason": c.reason}),
        ),
        Some(Payload::Metrics(m)) => (
            "metrics",
            json!({"iteration": m.iteration,
                   "values": sorted(&m.values).into_iter().map(|(k, v)| (k, num(v))).collect::<serde_json::Map<_, _>>()}),
        ),
        Some(Payload::Eval(e)) => (
            "eval",
            json!({"iteration": e.iteration, "miou": num(e.miou), "aacc": num(e.aacc), "loss": num(e.loss),
                   "class_iou": e.class_iou.iter().map(|v| num(*v)).collect::<Vec<_>>()}),
        ),
        Some(Payload::Checkpoint(c)) => (
            "checkpoint",
            c.checkpoint.as_ref().map(checkpoint).unwrap_or(Value::Null),
        ),
        Some(Payload::Note(n)) => ("note", json!({"text": n.text})),
        None => ("empty", Value::Null),
    };
    json!({"id": ev.id, "job_id": ev.job_id, "attempt": ev.attempt, "time": time(&ev.time), "kind": kind, "data": body})
}

/// A worker (one GPU's daemon).
pub fn worker(w: &pb::Worker) -> Value {
    let state = worker_state_name;
    json!({
        "id": w.id, "host": w.host, "gpu_index": w.gpu_index, "gpu_name": w.gpu_name,
        "gpu_memory_bytes": w.gpu_memory_bytes, "state": state(w.state),
        "job_id": w.job_id, "attempt": w.attempt, "rank": w.rank,
        "last_heartbeat": time(&w.last_heartbeat), "lease_until": time(&w.lease_until),
        "leaving": w.leaving, "name": worker_name(w),
    })
}

/// A token as `--json` shows it (never the secret, except once at creation).
pub fn token(t: &pb::TokenInfo) -> Value {
    json!({
        "id": t.id, "name": t.name, "role": role_name(t.role),
        "created_at": time(&t.created_at),
        "revoked_at": t.revoked_at.as_ref().map(|_| time(&t.revoked_at)),
        "last_used_at": t.last_used_at.as_ref().map(|_| time(&t.last_used_at)),
        "host": (!t.host.is_empty()).then_some(&t.host),
        "principal": t.principal, "team": t.team,
    })
}

/// A team as `segtrain team list --json` prints it.
pub fn team(t: &pb::Team) -> Value {
    json!({
        "name": t.name, "max_priority": t.max_priority, "max_gpus": t.max_gpus,
        "held_gpus": t.held_gpus, "allowed_roots": t.allowed_roots,
    })
}
