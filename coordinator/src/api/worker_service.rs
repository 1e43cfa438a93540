//! `segtrain.v1.WorkerService`: the daemons' side of the coordinator.
//!
//! - `Register` upserts the worker by (host, GPU index) and starts its lease; `Heartbeat` extends
//!   it and names the running ranks the daemon must stop.
//! - `AwaitAssignment` streams `start` for every unfinished rank of a live attempt held by the
//!   worker that has not reported `started` (again after every reconnect: daemons drop duplicates
//!   by job, attempt and rank) and `stop` when the job is canceling, the attempt ended or went
//!   stale. It re-reads on a NOTIFY hint or every poll interval.
//! - `ReportEvents` applies a numbered batch once, in one transaction (see `store::ingest`).
//! - `PublishRendezvous` (rank 0) and `AwaitRendezvous` (every rank; long poll) relay rank 0's
//!   NCCL unique id or TCP address within one attempt.
//!
//! Every message about an attempt is fenced by the attempt number: a stale one is refused with
//! FAILED_PRECONDITION ("stale attempt: job X is at attempt N, got M", reason STALE_ATTEMPT) and
//! changes nothing. Every request names the daemon instance (random per daemon start): one that
//! another instance has replaced is refused with FAILED_PRECONDITION (WORKER_SUPERSEDED), and one
//! (host, GPU) has one assignment stream at a time, so no rank ever runs in two trainers.

use super::{convert, parse_job_id, status_of};
use crate::metrics;
use crate::scheduler::{Hint, Hints};
use crate::store::{
    IngestBody, IngestEvent, Ingested, RankOutcome, RankRef, RendezvousEndpoint, Store,
    WorkerRegistration,
};
use segtrain_proto::v1 as pb;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::sync::broadcast;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
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

/// How the worker API behaves.
#[derive(Debug, Clone)]
pub struct WorkerApiConfig {
    /// A worker silent this long is declared lost; daemons heartbeat well within it.
    pub lease: Duration,
    /// Seconds a trainer gets to checkpoint and exit after `stop`.
    pub stop_grace_seconds: u32,
    /// Streams and long polls re-read this often even without a NOTIFY.
    pub poll: Duration,
}

impl Default for WorkerApiConfig {
    fn default() -> WorkerApiConfig {
        WorkerApiConfig {
            lease: Duration::from_secs(15),
            stop_grace_seconds: 30,
            poll: Duration::from_secs(2),
        }
    }
}

pub struct WorkerApi {
    store: Store,
    hints: Hints,
    cfg: WorkerApiConfig,
    streams: Arc<StreamSlots>,
}

/// The open assignment stream of each worker in this process: a newer stream ends the older one
/// (a half-open connection whose daemon has reconnected, or a copy of the daemon), so one
/// worker's starts go to one place.
#[derive(Default)]
struct StreamSlots {
    next: std::sync::atomic::AtomicU64,
    open: Mutex<HashMap<Uuid, (u64, tokio::sync::oneshot::Sender<()>)>>,
}

impl StreamSlots {
    /// Takes the worker's slot: the previous holder's receiver fires. Returns this stream's
    /// number (for [`release`](Self::release)) and its own "replaced" receiver.
    fn take(&self, worker: Uuid) -> (u64, tokio::sync::oneshot::Receiver<()>) {
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (tx, rx) = tokio::sync::oneshot::channel();
        if let Ok(mut open) = self.open.lock() {
            if let Some((_, old)) = open.insert(worker, (n, tx)) {
                let _ = old.send(());
            }
        }
        (n, rx)
    }

    /// Frees the slot if stream `n` still holds it.
    fn release(&self, worker: Uuid, n: u64) {
        if let Ok(mut open) = self.open.lock() {
            if open.get(&worker).is_some_and(|(m, _)| *m == n) {
                open.remove(&worker);
            }
        }
    }
}

impl WorkerApi {
    pub fn new(store: Store, hints: Hints, cfg: WorkerApiConfig) -> WorkerApi {
        WorkerApi {
            store,
            hints,
            cfg,
            streams: Arc::new(StreamSlots::default()),
        }
    }

    /// The worker exists and `instance` holds it.
    async fn known_instance(&self, id: Uuid, instance: Uuid) -> Result<(), Status> {
        self.store
            .check_worker_instance(id, instance)
            .await
            .map_err(instance_status)
    }
}

/// NotFound says "register again"; the rest as [`status_of`].
fn instance_status(e: crate::store::StoreError) -> Status {
    match e {
        crate::store::StoreError::NotFound { id, .. } => {
            Status::not_found(format!("worker {id} not found; register again"))
        }
        e => status_of(e),
    }
}

fn invalid(field: impl AsRef<str>, msg: impl AsRef<str>) -> Status {
    Status::invalid_argument(format!("{}: {}", field.as_ref(), msg.as_ref()))
}

fn worker_id(s: &str) -> Result<Uuid, Status> {
    Uuid::parse_str(s.trim()).map_err(|_| {
        invalid(
            "worker_id",
            format!("not a worker id (the UUID Register returned), got {s:?}"),
        )
    })
}

/// The daemon instance a request comes from (required).
fn instance(field: &str, s: &str) -> Result<Uuid, Status> {
    Uuid::parse_str(s.trim()).map_err(|_| {
        invalid(
            field,
            format!("not a daemon instance id (the UUID a daemon makes at its start), got {s:?}"),
        )
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

fn running(list: &[pb::RunningTrainer]) -> Result<Vec<RankRef>, Status> {
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
            Ok(RankRef {
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
    // PostgreSQL text cannot hold NUL: storing one would fail as INTERNAL, which a daemon retries.
    if let Some(at) = s.find('\0') {
        return Err(invalid(
            field,
            format!("must not contain a NUL character (found at byte {at})"),
        ));
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
        Some(Payload::Metrics(m)) => IngestBody::Metrics {
            iteration: iteration(&f("metrics.iteration"), m.iteration)?,
            values: values(&f("metrics.values"), &m.values)?,
        },
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
            }
        }
        Some(Payload::Finished(fin)) => {
            let outcome = match pb::Outcome::try_from(fin.outcome) {
                Ok(pb::Outcome::Succeeded) => RankOutcome::Succeeded,
                Ok(pb::Outcome::FailedInfra) => RankOutcome::FailedInfra,
                Ok(pb::Outcome::FailedDeterministic) => RankOutcome::FailedDeterministic,
                Ok(pb::Outcome::Canceled) => RankOutcome::Canceled,
                Ok(pb::Outcome::Unspecified) | Err(_) => {
                    return Err(invalid(
                        f("finished.outcome"),
                        format!(
                        "must be SUCCEEDED, FAILED_INFRA, FAILED_DETERMINISTIC or CANCELED, got {}",
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

fn publish_endpoint(
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

/// The `kind` label of `segtrain_events_ingested_total` for an event.
fn event_kind(p: &Option<pb::worker_event::Payload>) -> &'static str {
    use pb::worker_event::Payload;
    match p {
        Some(Payload::Started(_)) => "started",
        Some(Payload::Metrics(_)) => "metrics",
        Some(Payload::Eval(_)) => "eval",
        Some(Payload::CheckpointPending(_)) => "checkpoint_pending",
        Some(Payload::Checkpoint(_)) => "checkpoint",
        Some(Payload::CheckpointsDeleted(_)) => "checkpoints_deleted",
        Some(Payload::Resumed(_)) => "resumed",
        Some(Payload::Note(_)) => "note",
        Some(Payload::Finished(_)) => "finished",
        None => "none",
    }
}

/// Metrics and log lines for the events a batch applied (resent ones were counted before).
fn record_ingested(events: &[pb::WorkerEvent], done: &Ingested) {
    use pb::worker_event::Payload;
    let m = metrics::global();
    let now = SystemTime::now();
    let mut fresh: HashSet<u64> = done.applied.iter().copied().collect();
    for e in events.iter().filter(|e| fresh.remove(&e.seq)) {
        let sent = e.time.and_then(|t| SystemTime::try_from(t).ok());
        m.ingested(event_kind(&e.payload), sent, now);
        match &e.payload {
            Some(Payload::Started(_)) => {
                tracing::info!(job = %e.job_id, attempt = e.attempt, rank = e.rank, "rank started")
            }
            Some(Payload::Finished(f)) => {
                let outcome = pb::Outcome::try_from(f.outcome).map_or_else(
                    |_| f.outcome.to_string(),
                    |o| o.as_str_name().trim_start_matches("OUTCOME_").to_string(),
                );
                tracing::info!(job = %e.job_id, attempt = e.attempt, rank = e.rank, %outcome, reason = %f.reason, "rank finished")
            }
            _ => {}
        }
    }
    for (job, attempt, placed_ago) in &done.running {
        m.rendezvous_latency.observe(placed_ago.as_secs_f64());
        tracing::info!(job = %job, attempt, rendezvous_ms = placed_ago.as_millis() as u64, "all ranks started");
    }
}

#[tonic::async_trait]
impl pb::worker_service_server::WorkerService for WorkerApi {
    async fn register(
        &self,
        req: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let req = req.into_inner();
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
        let reg = WorkerRegistration {
            host,
            gpu_index: req.gpu_index,
            gpu_name: req.gpu_name,
            gpu_memory_bytes: req.gpu_memory_bytes,
            running: running(&req.running)?,
            instance_id,
            previous_instance_id,
        };
        let r = self
            .store
            .register_worker(&reg, self.cfg.lease)
            .await
            .map_err(status_of)?;
        tracing::info!(worker = %r.id, host = %reg.host, gpu = reg.gpu_index, instance = %reg.instance_id, state = %r.state, "worker registered");
        Ok(Response::new(pb::RegisterResponse {
            worker_id: r.id.to_string(),
            lease_seconds: self.cfg.lease.as_secs().max(1) as u32,
            acked_seq: r.acked_seq,
            stop_grace_seconds: self.cfg.stop_grace_seconds,
        }))
    }

    async fn heartbeat(
        &self,
        req: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let req = req.into_inner();
        let id = worker_id(&req.worker_id)?;
        let instance = instance("instance_id", &req.instance_id)?;
        let running = running(&req.running)?;
        let hb = self
            .store
            .heartbeat(id, instance, &running, self.cfg.lease)
            .await
            .map_err(instance_status)?;
        Ok(Response::new(pb::HeartbeatResponse {
            lease_until: Some(convert::timestamp(hb.lease_until)),
            stop: hb.stop.iter().map(convert::running_trainer).collect(),
        }))
    }

    type AwaitAssignmentStream =
        Pin<Box<dyn Stream<Item = Result<pb::AssignmentMessage, Status>> + Send>>;

    async fn await_assignment(
        &self,
        req: Request<pb::AwaitAssignmentRequest>,
    ) -> Result<Response<Self::AwaitAssignmentStream>, Status> {
        let id = worker_id(&req.get_ref().worker_id)?;
        let instance = instance("instance_id", &req.get_ref().instance_id)?;
        self.known_instance(id, instance).await?;
        let stream = assignment_stream(
            self.store.clone(),
            self.hints.subscribe(),
            Owner {
                worker: id,
                instance,
            },
            self.streams.clone(),
            self.cfg.clone(),
        );
        Ok(Response::new(Box::pin(stream)))
    }

    async fn report_events(
        &self,
        req: Request<pb::ReportEventsRequest>,
    ) -> Result<Response<pb::ReportEventsResponse>, Status> {
        let req = req.into_inner();
        let id = worker_id(&req.worker_id)?;
        let instance = instance("instance_id", &req.instance_id)?;
        if req.events.len() > MAX_EVENTS {
            return Err(invalid(
                "events",
                format!("at most {MAX_EVENTS} per request, got {}", req.events.len()),
            ));
        }
        let events = req
            .events
            .iter()
            .enumerate()
            .map(|(i, e)| event(i, e))
            .collect::<Result<Vec<_>, _>>()?;
        let done = self
            .store
            .ingest_events(id, instance, &events)
            .await
            .map_err(instance_status)?;
        record_ingested(&req.events, &done);
        Ok(Response::new(pb::ReportEventsResponse {
            acked_seq: done.acked,
        }))
    }

    async fn publish_rendezvous(
        &self,
        req: Request<pb::PublishRendezvousRequest>,
    ) -> Result<Response<pb::PublishRendezvousResponse>, Status> {
        let req = req.into_inner();
        let id = worker_id(&req.worker_id)?;
        let job = parse_job_id("job_id", &req.job_id)?;
        let endpoint = publish_endpoint(&req.endpoint)?;
        let instance = instance("instance_id", &req.instance_id)?;
        self.known_instance(id, instance).await?;
        self.store
            .publish_rendezvous(id, job, req.attempt, &endpoint)
            .await
            .map_err(status_of)?;
        tracing::info!(job = %job, attempt = req.attempt, rank = 0, "rendezvous published");
        Ok(Response::new(pb::PublishRendezvousResponse {}))
    }

    async fn await_rendezvous(
        &self,
        req: Request<pb::AwaitRendezvousRequest>,
    ) -> Result<Response<pb::AwaitRendezvousResponse>, Status> {
        let req = req.into_inner();
        let id = worker_id(&req.worker_id)?;
        let job = parse_job_id("job_id", &req.job_id)?;
        if !(1..=MAX_RENDEZVOUS_WAIT).contains(&req.timeout_seconds) {
            return Err(invalid(
                "timeout_seconds",
                format!(
                    "must be 1..={MAX_RENDEZVOUS_WAIT}, got {}",
                    req.timeout_seconds
                ),
            ));
        }
        let instance = instance("instance_id", &req.instance_id)?;
        self.known_instance(id, instance).await?;
        let deadline =
            tokio::time::Instant::now() + Duration::from_secs(u64::from(req.timeout_seconds));
        let mut wake = self.hints.subscribe();
        loop {
            if let Some(ep) = self
                .store
                .rendezvous(id, job, req.attempt)
                .await
                .map_err(status_of)?
            {
                return Ok(Response::new(pb::AwaitRendezvousResponse {
                    endpoint: Some(convert::rendezvous(ep)),
                }));
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(Status::deadline_exceeded(format!(
                    "rank 0 of attempt {} of job {job} did not publish its rendezvous within {} s",
                    req.attempt, req.timeout_seconds
                )));
            }
            let until = deadline.min(now + self.cfg.poll);
            wait(
                &mut wake,
                until,
                |h| matches!(h, Hint::Attempt(j) | Hint::Job(j) if j == job),
            )
            .await;
        }
    }
}

/// Sleeps until `until` or a hint `wanted` accepts (or hints were lost).
async fn wait(
    wake: &mut broadcast::Receiver<Hint>,
    until: tokio::time::Instant,
    wanted: impl Fn(Hint) -> bool,
) {
    let deadline = tokio::time::sleep_until(until);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = &mut deadline => return,
            msg = wake.recv() => match msg {
                Ok(h) if wanted(h) => return,
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(_)) => return,
                Err(broadcast::error::RecvError::Closed) => {
                    (&mut deadline).await;
                    return;
                }
            },
        }
    }
}

/// Whose assignment stream it is.
#[derive(Clone, Copy)]
struct Owner {
    worker: Uuid,
    instance: Uuid,
}

/// The assignment stream of one worker: it holds the worker's slot until it ends, and ends
/// when a newer stream takes the slot (ABORTED) or another daemon instance takes the worker
/// (FAILED_PRECONDITION, WORKER_SUPERSEDED).
fn assignment_stream(
    store: Store,
    wake: broadcast::Receiver<Hint>,
    owner: Owner,
    slots: Arc<StreamSlots>,
    cfg: WorkerApiConfig,
) -> ReceiverStream<Result<pb::AssignmentMessage, Status>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let (n, replaced) = slots.take(owner.worker);
    tokio::spawn(async move {
        let tx2 = tx.clone();
        tokio::select! {
            () = send_assignments(store, wake, owner, &tx, cfg) => {}
            _ = replaced => {
                let _ = tx2
                    .send(Err(Status::aborted(format!(
                        "a newer AwaitAssignment stream of worker {} replaced this one",
                        owner.worker
                    ))))
                    .await;
            }
        }
        slots.release(owner.worker, n);
    });
    ReceiverStream::new(rx)
}

/// Sends `start` and `stop` messages until the daemon goes away or may no longer act for the
/// worker.
async fn send_assignments(
    store: Store,
    mut wake: broadcast::Receiver<Hint>,
    owner: Owner,
    tx: &tokio::sync::mpsc::Sender<Result<pb::AssignmentMessage, Status>>,
    cfg: WorkerApiConfig,
) {
    let worker = owner.worker;
    {
        // What this connection has sent; a new connection starts empty and sends again.
        let mut started_sent: HashSet<(Uuid, u32, u32)> = HashSet::new();
        let mut stop_sent: HashSet<(Uuid, u32, u32)> = HashSet::new();
        loop {
            if let Err(e) = store.check_worker_instance(worker, owner.instance).await {
                let _ = tx.send(Err(instance_status(e))).await;
                return;
            }
            let open = match store.worker_assignments(worker).await {
                Ok(a) => a,
                Err(e) => {
                    let _ = tx.send(Err(status_of(e))).await;
                    return;
                }
            };
            for a in &open {
                let key = (a.job_id, a.attempt, a.rank);
                let msg = match a.stop_reason() {
                    Some(reason) if stop_sent.insert(key) => pb::assignment_message::Kind::Stop(
                        convert::stop_assignment(a, cfg.stop_grace_seconds, reason),
                    ),
                    Some(_) => continue,
                    None if !a.started && started_sent.insert(key) => {
                        pb::assignment_message::Kind::Start(convert::assignment(a))
                    }
                    None => continue,
                };
                if tx
                    .send(Ok(pb::AssignmentMessage { kind: Some(msg) }))
                    .await
                    .is_err()
                {
                    return; // the daemon went away
                }
            }
            let keys: HashSet<(Uuid, u32, u32)> =
                open.iter().map(|a| (a.job_id, a.attempt, a.rank)).collect();
            started_sent.retain(|k| keys.contains(k));
            stop_sent.retain(|k| keys.contains(k));
            let jobs: HashSet<Uuid> = open.iter().map(|a| a.job_id).collect();
            let until = tokio::time::Instant::now() + cfg.poll;
            tokio::select! {
                _ = tx.closed() => return,
                _ = wait(&mut wake, until, |h| match h {
                    Hint::Worker(w) => w == worker,
                    Hint::Job(j) | Hint::Attempt(j) => jobs.contains(&j),
                }) => {}
            }
        }
    }
}
