//! Validation of `segtrain.v1.WorkerService` requests: every field is checked against its bounds
//! before the store sees it, and a bad one is refused with INVALID_ARGUMENT naming the field
//! (`events[3].eval.miou: ...`) and what it allows. Nothing here touches the store.

use super::parse_job_id;
use crate::auth::{secret_sha256, Caller};
use crate::store::{
    is_eval_point, AttemptRank, Claim, IngestBody, IngestEvent, InstanceProof, RankOutcome,
    RendezvousEndpoint, WorkerRegistration, EVAL_POINT_NAMES,
};
use segtrain_proto::v1 as pb;
use std::collections::BTreeMap;
use std::time::Duration;
use tonic::Status;
use uuid::Uuid;

const MAX_HOST: usize = 255;
const MAX_GPU_INDEX: i32 = 1023;
const MAX_GPU_NAME: usize = 255;
const MAX_RUNNING: usize = 1024;
const MAX_RANK: u32 = 1023;
const MAX_EVENTS: usize = 10_000;
const MAX_VALUES: usize = 256;
const MAX_NAME: usize = 64;
const MAX_TEXT: usize = 4096;
const MAX_CLASSES: usize = 1024;
const NCCL_ID_BYTES: usize = 128;
const MAX_RENDEZVOUS_WAIT: u32 = 600;

fn invalid(field: impl AsRef<str>, msg: impl AsRef<str>) -> Status {
    Status::invalid_argument(format!("{}: {}", field.as_ref(), msg.as_ref()))
}

pub(super) fn worker_id(s: &str) -> Result<Uuid, Status> {
    Uuid::parse_str(s.trim()).map_err(|_| {
        invalid(
            "worker_id",
            format!("not a worker id (the UUID Register returned), got {s:?}"),
        )
    })
}

/// The daemon instance a request comes from (required).
pub(super) fn instance(field: &str, s: &str) -> Result<Uuid, Status> {
    Uuid::parse_str(s.trim()).map_err(|_| {
        invalid(
            field,
            format!("not a daemon instance id (the UUID a daemon makes at its start), got {s:?}"),
        )
    })
}

/// Longest instance secret accepted (the coordinator makes 43-character ones).
const MAX_SECRET: usize = 256;

/// The SHA-256 of an instance secret; `None` when empty (and `required` is false).
fn secret(field: &str, s: &str, required: bool) -> Result<Option<[u8; 32]>, Status> {
    if s.is_empty() {
        return if required {
            Err(invalid(
                field,
                "required: the secret RegisterResponse.instance_secret gave this daemon instance",
            ))
        } else {
            Ok(None)
        };
    }
    if s.len() > MAX_SECRET || !s.chars().all(|c| c.is_ascii_graphic()) {
        // Never echo a secret, not even a malformed one.
        return Err(invalid(
            field,
            format!(
                "must be at most {MAX_SECRET} printable ASCII characters, got {} bytes",
                s.len()
            ),
        ));
    }
    Ok(Some(secret_sha256(s)))
}

/// What a worker request shows for its instance: the instance id, its secret (required) and
/// the host the caller's token is bound to.
pub(super) fn proof(
    instance_id: &str,
    instance_secret: &str,
    caller: Option<&Caller>,
) -> Result<InstanceProof, Status> {
    Ok(InstanceProof {
        instance: instance("instance_id", instance_id)?,
        secret_sha256: secret("instance_secret", instance_secret, true)?.unwrap_or_default(),
        bound_host: caller.and_then(|c| c.host.clone()),
    })
}

fn has_control(s: &str) -> bool {
    s.chars().any(char::is_control)
}

fn host(s: &str) -> Result<String, Status> {
    let n = s.chars().count();
    if n == 0 || n > MAX_HOST {
        return Err(invalid(
            "host",
            format!("must be 1-{MAX_HOST} characters, got {n}"),
        ));
    }
    if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(invalid(
            "host",
            format!("must not contain spaces or control characters, got {s:?}"),
        ));
    }
    Ok(s.to_string())
}

pub(super) fn running(list: &[pb::AttemptRank]) -> Result<Vec<AttemptRank>, Status> {
    if list.len() > MAX_RUNNING {
        return Err(invalid(
            "running",
            format!("at most {MAX_RUNNING} entries, got {}", list.len()),
        ));
    }
    list.iter()
        .enumerate()
        .map(|(i, r)| {
            let job_id = parse_job_id(&format!("running[{i}].job_id"), &r.job_id)?;
            if r.attempt == 0 {
                return Err(invalid(
                    format!("running[{i}].attempt"),
                    "must be at least 1 (attempts are numbered from 1)",
                ));
            }
            if r.rank > MAX_RANK {
                return Err(invalid(
                    format!("running[{i}].rank"),
                    format!("must be 0..={MAX_RANK}, got {}", r.rank),
                ));
            }
            Ok(AttemptRank {
                job_id,
                attempt: r.attempt,
                rank: r.rank,
            })
        })
        .collect()
}

fn values(
    field: &str,
    v: &std::collections::HashMap<String, f64>,
) -> Result<BTreeMap<String, f64>, Status> {
    if v.len() > MAX_VALUES {
        return Err(invalid(
            field,
            format!("at most {MAX_VALUES} values, got {}", v.len()),
        ));
    }
    if let Some(bad) = v
        .keys()
        .find(|k| k.is_empty() || k.len() > MAX_NAME || has_control(k))
    {
        return Err(invalid(
            field,
            format!("each name must be 1-{MAX_NAME} bytes without control characters, got {bad:?}"),
        ));
    }
    Ok(v.iter().map(|(k, x)| (k.clone(), *x)).collect())
}

fn iteration(field: &str, it: u64) -> Result<u64, Status> {
    if it > i64::MAX as u64 {
        return Err(invalid(
            field,
            format!("must be at most {}, got {it}", i64::MAX),
        ));
    }
    Ok(it)
}

fn text(field: &str, s: &str, allow_empty: bool) -> Result<String, Status> {
    if (!allow_empty && s.is_empty()) || s.len() > MAX_TEXT {
        let min = if allow_empty { 0 } else { 1 };
        return Err(invalid(
            field,
            format!("must be {min}-{MAX_TEXT} bytes, got {}", s.len()),
        ));
    }
    // Several lines of a trainer's output: line feeds and tabs, no other control character (a
    // terminal showing the note would obey it; PostgreSQL cannot store NUL).
    if let Some(why) = segtrain_proto::text::control_refusal(s, true) {
        return Err(invalid(field, why));
    }
    Ok(s.to_string())
}

fn checkpoint_uri(field: &str, uri: &str) -> Result<String, Status> {
    if uri.is_empty() || uri.len() > MAX_TEXT || has_control(uri) {
        return Err(invalid(
            field,
            format!(
                "must be 1-{MAX_TEXT} bytes without control characters, got {} bytes",
                uri.len()
            ),
        ));
    }
    Ok(uri.to_string())
}

fn event(i: usize, e: &pb::WorkerEvent) -> Result<IngestEvent, Status> {
    use pb::worker_event::Payload;
    let f = |name: &str| format!("events[{i}].{name}");
    if e.seq == 0 || e.seq > i64::MAX as u64 {
        return Err(invalid(
            f("seq"),
            format!(
                "must be 1..={} (numbered from 1 per worker), got {}",
                i64::MAX,
                e.seq
            ),
        ));
    }
    let job_id = parse_job_id(&f("job_id"), &e.job_id)?;
    if e.rank > MAX_RANK {
        return Err(invalid(
            f("rank"),
            format!("must be 0..={MAX_RANK}, got {}", e.rank),
        ));
    }
    // `attempt` is the fencing token: any value other than the job's current attempt (0
    // included) refuses the batch with FAILED_PRECONDITION in the store, which is what tells a
    // daemon to drop those events (INVALID_ARGUMENT would make it resend them forever).
    if let Some(t) = &e.time {
        // Years 1970 to 9999, nanoseconds within the second.
        if !(0..=253_402_300_799).contains(&t.seconds) || !(0..1_000_000_000).contains(&t.nanos) {
            return Err(invalid(
                f("time"),
                format!(
                    "must be a time between 1970 and 9999 with 0..1e9 nanoseconds, got {}s {}ns",
                    t.seconds, t.nanos
                ),
            ));
        }
    }
    let body = match &e.payload {
        None => {
            return Err(invalid(
                f("payload"),
                "missing: set one of started, metrics, eval, checkpoint, finished, note, \
                 checkpoint_pending, checkpoints_deleted, resumed",
            ))
        }
        Some(Payload::Started(_)) => IngestBody::Started,
        Some(Payload::Metrics(m)) => {
            // The evaluation's points share the key (attempt, iteration, name): a metrics
            // report of the same name would lose one of the two.
            if let Some(name) = m.values.keys().find(|n| is_eval_point(n)) {
                return Err(invalid(
                    f("metrics.values"),
                    format!(
                        "{name:?} is an evaluation score: send it in an eval report \
                         (reserved: {}, class_iou/*)",
                        EVAL_POINT_NAMES.join(", ")
                    ),
                ));
            }
            IngestBody::Metrics {
                iteration: iteration(&f("metrics.iteration"), m.iteration)?,
                values: values(&f("metrics.values"), &m.values)?,
            }
        }
        Some(Payload::Eval(ev)) => {
            if ev.class_iou.len() > MAX_CLASSES {
                return Err(invalid(
                    f("eval.class_iou"),
                    format!("at most {MAX_CLASSES} classes, got {}", ev.class_iou.len()),
                ));
            }
            // Scores may be NaN or infinite (a diverged validation loss, classes absent from
            // the val set): stored as they are, never a reason to refuse the batch.
            IngestBody::Eval {
                iteration: iteration(&f("eval.iteration"), ev.iteration)?,
                miou: ev.miou,
                aacc: ev.aacc,
                loss: ev.loss,
                class_iou: ev.class_iou.clone(),
            }
        }
        Some(Payload::Checkpoint(c)) => {
            let Some(c) = &c.checkpoint else {
                return Err(invalid(f("checkpoint.checkpoint"), "missing"));
            };
            let uri = checkpoint_uri(&f("checkpoint.uri"), &c.uri)?;
            if !(c.sha256.is_empty()
                || (c.sha256.len() == 64 && c.sha256.bytes().all(|b| b.is_ascii_hexdigit())))
            {
                return Err(invalid(
                    f("checkpoint.sha256"),
                    format!("must be empty or 64 hex digits, got {:?}", c.sha256),
                ));
            }
            if c.bytes > i64::MAX as u64 {
                return Err(invalid(
                    f("checkpoint.bytes"),
                    format!("must be at most {}, got {}", i64::MAX, c.bytes),
                ));
            }
            IngestBody::Checkpoint {
                iteration: iteration(&f("checkpoint.iteration"), c.iteration)?,
                uri,
                bytes: c.bytes,
                sha256: c.sha256.to_ascii_lowercase(),
                metrics: values(&f("checkpoint.metrics"), &c.metrics)?,
                on_stop: c.on_stop,
            }
        }
        Some(Payload::Finished(fin)) => {
            let outcome = match pb::RankOutcome::try_from(fin.outcome) {
                Ok(pb::RankOutcome::Succeeded) => RankOutcome::Succeeded,
                Ok(pb::RankOutcome::FailedInfra) => RankOutcome::FailedInfra,
                Ok(pb::RankOutcome::FailedDeterministic) => RankOutcome::FailedDeterministic,
                Ok(pb::RankOutcome::Canceled) => RankOutcome::Canceled,
                Ok(pb::RankOutcome::Preempted) => RankOutcome::Preempted,
                Ok(pb::RankOutcome::Lost) => {
                    return Err(invalid(
                        f("finished.outcome"),
                        "LOST is the coordinator's to decide (the worker's lease expired); a \
                         daemon reports FAILED_INFRA for a rank whose peer or trainer it lost",
                    ))
                }
                Ok(pb::RankOutcome::Unspecified) | Err(_) => {
                    return Err(invalid(
                        f("finished.outcome"),
                        format!(
                        "must be SUCCEEDED, FAILED_INFRA, FAILED_DETERMINISTIC, CANCELED or PREEMPTED, got {}",
                        fin.outcome
                    ),
                    ))
                }
            };
            IngestBody::Finished {
                outcome,
                reason: text(&f("finished.reason"), &fin.reason, true)?,
            }
        }
        Some(Payload::Note(n)) => IngestBody::Note {
            text: text(&f("note.text"), &n.text, false)?,
        },
        Some(Payload::CheckpointPending(p)) => IngestBody::CheckpointPending {
            iteration: iteration(&f("checkpoint_pending.iteration"), p.iteration)?,
            uri: checkpoint_uri(&f("checkpoint_pending.uri"), &p.uri)?,
        },
        Some(Payload::CheckpointsDeleted(d)) => {
            if d.uris.len() > MAX_VALUES {
                return Err(invalid(
                    f("checkpoints_deleted.uris"),
                    format!("at most {MAX_VALUES} per event, got {}", d.uris.len()),
                ));
            }
            IngestBody::CheckpointsDeleted {
                uris: d
                    .uris
                    .iter()
                    .enumerate()
                    .map(|(k, u)| checkpoint_uri(&f(&format!("checkpoints_deleted.uris[{k}]")), u))
                    .collect::<Result<_, _>>()?,
            }
        }
        Some(Payload::Resumed(r)) => {
            if r.skipped.len() > MAX_VALUES {
                return Err(invalid(
                    f("resumed.skipped"),
                    format!("at most {MAX_VALUES} entries, got {}", r.skipped.len()),
                ));
            }
            IngestBody::Resumed {
                iteration: iteration(&f("resumed.iteration"), r.iteration)?,
                uri: checkpoint_uri(&f("resumed.uri"), &r.uri)?,
                skipped: r
                    .skipped
                    .iter()
                    .enumerate()
                    .map(|(k, sk)| {
                        let g = |n: &str| f(&format!("resumed.skipped[{k}].{n}"));
                        Ok((
                            iteration(&g("iteration"), sk.iteration)?,
                            checkpoint_uri(&g("uri"), &sk.uri)?,
                            text(&g("reason"), &sk.reason, true)?,
                        ))
                    })
                    .collect::<Result<_, Status>>()?,
            }
        }
    };
    Ok(IngestEvent {
        seq: e.seq,
        job_id,
        attempt: e.attempt,
        rank: e.rank,
        body,
    })
}

pub(super) fn publish_endpoint(
    e: &Option<pb::publish_rendezvous_request::Endpoint>,
) -> Result<RendezvousEndpoint, Status> {
    use pb::publish_rendezvous_request::Endpoint;
    match e {
        None => Err(invalid(
            "endpoint",
            "missing: set nccl_unique_id or tcp_address",
        )),
        Some(Endpoint::NcclUniqueId(b)) => {
            if b.len() != NCCL_ID_BYTES {
                return Err(invalid(
                    "nccl_unique_id",
                    format!("must be {NCCL_ID_BYTES} bytes, got {}", b.len()),
                ));
            }
            Ok(RendezvousEndpoint::Nccl(b.clone()))
        }
        Some(Endpoint::TcpAddress(a)) => {
            let ok = a.len() <= MAX_HOST
                && !a.chars().any(|c| c.is_whitespace() || c.is_control())
                && a.rsplit_once(':')
                    .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
            if !ok {
                return Err(invalid(
                    "tcp_address",
                    format!("must be host:port (at most {MAX_HOST} characters, port 1-65535), got {a:?}"),
                ));
            }
            Ok(RendezvousEndpoint::Tcp(a.clone()))
        }
    }
}

/// A `Register` request, checked field by field. `new_secret_sha256`: the digest of the secret
/// the instance gets if it takes the worker.
pub(super) fn registration(
    req: pb::RegisterRequest,
    new_secret_sha256: [u8; 32],
) -> Result<WorkerRegistration, Status> {
    let host = host(&req.host)?;
    if !(-1..=MAX_GPU_INDEX).contains(&req.gpu_index) {
        return Err(invalid(
            "gpu_index",
            format!(
                "must be -1 (CPU) or 0..={MAX_GPU_INDEX}, got {}",
                req.gpu_index
            ),
        ));
    }
    let n = req.gpu_name.chars().count();
    if n > MAX_GPU_NAME || has_control(&req.gpu_name) {
        return Err(invalid(
            "gpu_name",
            format!(
                "must be at most {MAX_GPU_NAME} characters without control characters, got {n}"
            ),
        ));
    }
    if req.gpu_memory_bytes > i64::MAX as u64 {
        return Err(invalid(
            "gpu_memory_bytes",
            format!("must be at most {}, got {}", i64::MAX, req.gpu_memory_bytes),
        ));
    }
    let instance_id = instance("instance_id", &req.instance_id)?;
    let previous_instance_id = match req.previous_instance_id.trim() {
        "" => None,
        p => Some(instance("previous_instance_id", p)?),
    };
    let claim = Claim {
        instance: instance_id,
        secret_sha256: secret("instance_secret", &req.instance_secret, false)?,
        previous: previous_instance_id,
        previous_secret_sha256: secret(
            "previous_instance_secret",
            &req.previous_instance_secret,
            false,
        )?,
    };
    Ok(WorkerRegistration {
        host,
        gpu_index: req.gpu_index,
        gpu_name: req.gpu_name,
        gpu_memory_bytes: req.gpu_memory_bytes,
        running: running(&req.running)?,
        claim,
        new_secret_sha256,
    })
}

/// The events of a `ReportEvents` request, checked (at most [`MAX_EVENTS`]; each as [`event`]).
pub(super) fn events(list: &[pb::WorkerEvent]) -> Result<Vec<IngestEvent>, Status> {
    if list.len() > MAX_EVENTS {
        return Err(invalid(
            "events",
            format!("at most {MAX_EVENTS} per request, got {}", list.len()),
        ));
    }
    list.iter().enumerate().map(|(i, e)| event(i, e)).collect()
}

/// `AwaitRendezvous.timeout_seconds`: 1..=[`MAX_RENDEZVOUS_WAIT`].
pub(super) fn rendezvous_wait(seconds: u32) -> Result<Duration, Status> {
    if !(1..=MAX_RENDEZVOUS_WAIT).contains(&seconds) {
        return Err(invalid(
            "timeout_seconds",
            format!("must be 1..={MAX_RENDEZVOUS_WAIT}, got {seconds}"),
        ));
    }
    Ok(Duration::from_secs(u64::from(seconds)))
}
