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

use super::worker_requests::{
    events, proof, publish_endpoint, registration, rendezvous_wait, running, worker_id,
};
use super::{convert, parse_job_id, status_of};
use crate::auth::{self, Caller};
use crate::metrics;
use crate::store::bus::{Bus, Hint, Interest};
use crate::store::{Beat, Ingested, InstanceProof, Store, StoreError};
use segtrain_proto::v1 as pb;
use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use uuid::Uuid;

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
    bus: Bus,
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
    pub fn new(store: Store, bus: Bus, cfg: WorkerApiConfig) -> WorkerApi {
        WorkerApi {
            store,
            bus,
            cfg,
            streams: Arc::new(StreamSlots::default()),
        }
    }

    /// The worker exists and the request's `proof` holds it.
    async fn known_instance(&self, id: Uuid, proof: &InstanceProof) -> Result<(), Status> {
        self.store
            .check_worker_instance(id, proof)
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
                let outcome = pb::RankOutcome::try_from(f.outcome).map_or_else(
                    |_| f.outcome.to_string(),
                    |o| {
                        o.as_str_name()
                            .trim_start_matches("RANK_OUTCOME_")
                            .to_string()
                    },
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
        let bound = req
            .extensions()
            .get::<Caller>()
            .and_then(|c| c.host.clone());
        let secret = auth::new_instance_secret()
            .map_err(|e| Status::internal(format!("cannot make an instance secret: {e}")))?;
        let reg = registration(req.into_inner(), auth::secret_sha256(&secret))?;
        if let Some(token_host) = bound.filter(|b| *b != reg.host) {
            return Err(status_of(StoreError::HostBound {
                token_host,
                host: reg.host,
                gpu_index: reg.gpu_index,
            }));
        }
        let r = self
            .store
            .register_worker(&reg, self.cfg.lease)
            .await
            .map_err(status_of)?;
        tracing::info!(worker = %r.id, host = %reg.host, gpu = reg.gpu_index, instance = %reg.claim.instance, state = %r.state, "worker registered");
        Ok(Response::new(pb::RegisterResponse {
            worker_id: r.id.to_string(),
            lease_seconds: self.cfg.lease.as_secs().max(1) as u32,
            acked_seq: r.acked_seq,
            stop_grace_seconds: self.cfg.stop_grace_seconds,
            instance_secret: if r.secret_issued {
                secret
            } else {
                String::new()
            },
        }))
    }

    async fn heartbeat(
        &self,
        req: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let caller = req.extensions().get::<Caller>().cloned();
        let req = req.into_inner();
        let id = worker_id(&req.worker_id)?;
        let running = running(&req.running)?;
        let proof = proof(&req.instance_id, &req.instance_secret, caller.as_ref())?;
        let hb = self
            .store
            .heartbeat(&Beat {
                worker: id,
                proof: &proof,
                running: &running,
                leaving: req.leaving,
                lease: self.cfg.lease,
            })
            .await
            .map_err(instance_status)?;
        Ok(Response::new(pb::HeartbeatResponse {
            lease_until: Some(convert::timestamp(hb.lease_until)),
            stop: hb.stop.iter().map(convert::attempt_rank).collect(),
        }))
    }

    type AwaitAssignmentStream =
        Pin<Box<dyn Stream<Item = Result<pb::AssignmentMessage, Status>> + Send>>;

    async fn await_assignment(
        &self,
        req: Request<pb::AwaitAssignmentRequest>,
    ) -> Result<Response<Self::AwaitAssignmentStream>, Status> {
        let caller = req.extensions().get::<Caller>().cloned();
        let req = req.into_inner();
        let id = worker_id(&req.worker_id)?;
        let proof = proof(&req.instance_id, &req.instance_secret, caller.as_ref())?;
        self.known_instance(id, &proof).await?;
        let stream = assignment_stream(
            self.store.clone(),
            self.bus.interest([Hint::Worker(id)]),
            Owner { worker: id, proof },
            self.streams.clone(),
            self.cfg.clone(),
        );
        Ok(Response::new(Box::pin(stream)))
    }

    async fn report_events(
        &self,
        req: Request<pb::ReportEventsRequest>,
    ) -> Result<Response<pb::ReportEventsResponse>, Status> {
        let caller = req.extensions().get::<Caller>().cloned();
        let req = req.into_inner();
        let id = worker_id(&req.worker_id)?;
        let events = events(&req.events)?;
        let proof = proof(&req.instance_id, &req.instance_secret, caller.as_ref())?;
        let done = self
            .store
            .ingest_events(id, &proof, &events)
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
        let caller = req.extensions().get::<Caller>().cloned();
        let req = req.into_inner();
        let id = worker_id(&req.worker_id)?;
        let job = parse_job_id("job_id", &req.job_id)?;
        let endpoint = publish_endpoint(&req.endpoint)?;
        let proof = proof(&req.instance_id, &req.instance_secret, caller.as_ref())?;
        self.known_instance(id, &proof).await?;
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
        let caller = req.extensions().get::<Caller>().cloned();
        let req = req.into_inner();
        let id = worker_id(&req.worker_id)?;
        let job = parse_job_id("job_id", &req.job_id)?;
        let patience = rendezvous_wait(req.timeout_seconds)?;
        let proof = proof(&req.instance_id, &req.instance_secret, caller.as_ref())?;
        self.known_instance(id, &proof).await?;
        let deadline = tokio::time::Instant::now() + patience;
        let wake = self.bus.interest([Hint::Attempt(job), Hint::JobState(job)]);
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
            wake.wait(until).await;
        }
    }
}

/// Whose assignment stream it is.
#[derive(Clone)]
struct Owner {
    worker: Uuid,
    proof: InstanceProof,
}

/// The assignment stream of one worker: it holds the worker's slot until it ends, and ends
/// when a newer stream takes the slot (ABORTED) or another daemon instance takes the worker
/// (FAILED_PRECONDITION, WORKER_SUPERSEDED).
fn assignment_stream(
    store: Store,
    wake: Interest,
    owner: Owner,
    slots: Arc<StreamSlots>,
    cfg: WorkerApiConfig,
) -> ReceiverStream<Result<pb::AssignmentMessage, Status>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let worker = owner.worker;
    let (n, replaced) = slots.take(worker);
    tokio::spawn(async move {
        let tx2 = tx.clone();
        tokio::select! {
            () = send_assignments(store, wake, owner, &tx, cfg) => {}
            _ = replaced => {
                let _ = tx2
                    .send(Err(Status::aborted(format!(
                        "a newer AwaitAssignment stream of worker {worker} replaced this one"
                    ))))
                    .await;
            }
        }
        slots.release(worker, n);
    });
    ReceiverStream::new(rx)
}

/// Assignment streams re-read without a hint this many poll intervals apart: their hints come
/// to them alone and are lost only while the listener reconnects (which wakes every stream), so
/// the timer is a safety net. At 10,000 streams, re-reading every poll interval (2 s) was 10,000
/// queries a second on its own.
const ASSIGNMENT_POLL_FACTOR: u32 = 10;

/// Sends `start` and `stop` messages until the daemon goes away or may no longer act for the
/// worker.
async fn send_assignments(
    store: Store,
    mut wake: Interest,
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
            if let Err(e) = store.check_worker_instance(worker, &owner.proof).await {
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
            // This worker's changes, and its jobs' state and attempt changes (not their
            // metrics and checkpoints: those change no assignment).
            let jobs = open.iter().map(|a| a.job_id);
            wake.set(
                std::iter::once(Hint::Worker(worker))
                    .chain(jobs.flat_map(|j| [Hint::JobState(j), Hint::Attempt(j)])),
            );
            let until = tokio::time::Instant::now() + cfg.poll * ASSIGNMENT_POLL_FACTOR;
            tokio::select! {
                _ = tx.closed() => return,
                _ = wake.wait(until) => {}
            }
        }
    }
}
