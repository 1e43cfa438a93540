//! `segtrain-worker daemon`: one per GPU (or one CPU worker). It registers with the coordinator,
//! heartbeats, receives assignments, runs each rank in a child trainer process, and relays the
//! trainer's events — numbered, buffered and resent until acknowledged, so nothing is lost while
//! the coordinator is away. A crashed or hung trainer never takes the daemon down (the
//! torchelastic-agent / Determined-agent split). tch never runs here: the daemon is all tokio.

pub mod metrics;
pub mod outbox;
pub mod trainer_process;

use metrics::{DaemonMetrics, Phase};
use outbox::Outbox;
use segtrain_proto::client::{self as conn, AuthChannel, BearerToken, ClientTls};
use segtrain_proto::v1 as pb;
use segtrain_proto::v1::worker_service_client::WorkerServiceClient;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::{oneshot, Notify};
use tonic::Code;
use trainer_process::{Parsed, RankKey};

#[derive(Debug, Clone)]
pub struct DaemonConfig {
    pub coordinator: String,
    /// None: a CPU worker.
    pub gpu: Option<u32>,
    pub host: String,
    /// The address other ranks use to reach this host's rank-0 TCP listener.
    pub advertise_host: String,
    /// Per-rank job files and trainer logs.
    pub work_dir: PathBuf,
    /// The trainer binary (normally this binary).
    pub exe: PathBuf,
    /// Seconds a stopped trainer gets before it is killed.
    pub grace: Duration,
    /// libtorch CPU threads per trainer (None: libtorch's default, all cores). Several CPU
    /// workers on one host should share the cores rather than each take them all.
    pub torch_threads: Option<u32>,
    /// TLS for an `https://` coordinator (`--ca`, `--client-cert`, `--client-key`).
    pub tls: ClientTls,
    /// The worker token sent with every request (`--token-file` or SEGTRAIN_TOKEN).
    pub token: BearerToken,
    /// `--metrics-listen`: serve Prometheus metrics on `http://ADDR/metrics` (plain HTTP).
    pub metrics_listen: Option<SocketAddr>,
}

/// State shared by the daemon's tasks.
struct Shared {
    cfg: DaemonConfig,
    channel: AuthChannel,
    worker_id: Mutex<String>,
    /// The lease the coordinator grants (heartbeats go at a third of it).
    lease: Mutex<Duration>,
    outbox: Mutex<Outbox>,
    wake_flush: Notify,
    /// Running trainers and how to stop each (`None` once asked to stop: a stopping trainer
    /// stays listed, so its worker is not freed, until its process has exited).
    running: Mutex<HashMap<RankKey, Option<oneshot::Sender<String>>>>,
    metrics: DaemonMetrics,
}

fn now() -> prost_types::Timestamp {
    prost_types::Timestamp::from(SystemTime::now())
}

impl Shared {
    fn client(&self) -> WorkerServiceClient<AuthChannel> {
        WorkerServiceClient::new(self.channel.clone())
            .max_decoding_message_size(conn::MAX_RESPONSE_BYTES)
            .max_encoding_message_size(conn::MAX_REQUEST_BYTES)
    }

    fn worker_id(&self) -> String {
        self.worker_id.lock().map(|w| w.clone()).unwrap_or_default()
    }

    fn running_list(&self) -> Vec<pb::RunningTrainer> {
        self.running
            .lock()
            .map(|r| r.keys().map(RankKey::to_proto).collect())
            .unwrap_or_default()
    }

    fn emit(&self, key: &RankKey, payload: pb::worker_event::Payload) {
        let ev = pb::WorkerEvent {
            seq: 0,
            job_id: key.job_id.clone(),
            attempt: key.attempt,
            rank: key.rank,
            time: Some(now()),
            payload: Some(payload),
        };
        if let Ok(mut o) = self.outbox.lock() {
            o.push(ev);
        }
        self.wake_flush.notify_one();
    }

    /// Registers (again), retrying until the coordinator answers.
    async fn register(&self) {
        let mut delay = Duration::from_millis(200);
        loop {
            let req = pb::RegisterRequest {
                host: self.cfg.host.clone(),
                gpu_index: self.cfg.gpu.map_or(-1, |g| g as i32),
                gpu_name: gpu_name(self.cfg.gpu),
                gpu_memory_bytes: 0,
                running: self.running_list(),
            };
            match self.client().register(req).await {
                Ok(r) => {
                    let r = r.into_inner();
                    tracing::info!(worker_id = %r.worker_id, acked_seq = r.acked_seq, "registered");
                    if let Ok(mut w) = self.worker_id.lock() {
                        *w = r.worker_id;
                    }
                    if let Ok(mut l) = self.lease.lock() {
                        *l = Duration::from_secs(u64::from(r.lease_seconds.max(1)));
                    }
                    if let Ok(mut o) = self.outbox.lock() {
                        o.resync(r.acked_seq);
                    }
                    return;
                }
                Err(e) if matches!(e.code(), Code::Unauthenticated | Code::PermissionDenied) => {
                    tracing::error!(error = %e.message(), "the coordinator refused this daemon's token; give a worker token (--token-file or SEGTRAIN_TOKEN) and restart; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
                Err(e) => {
                    tracing::warn!(error = %conn::status_detail(&e), "cannot register with the coordinator; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

fn gpu_name(gpu: Option<u32>) -> String {
    match gpu {
        None => "cpu".to_string(),
        Some(_) => crate::doctor::report()
            .gpus
            .first()
            .map(|g| g.name.clone())
            .unwrap_or_default(),
    }
}

/// Runs the daemon until `shutdown` resolves; then stops its trainers and flushes what it can.
pub async fn run(
    cfg: DaemonConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let channel = conn::connect_lazy(&cfg.coordinator, &cfg.tls, cfg.token.clone())?;
    // Bound before registering: the endpoint answers while the coordinator is unreachable.
    let metrics_listener = match cfg.metrics_listen {
        Some(addr) => Some(metrics::bind(addr).await?),
        None => None,
    };
    let metrics = DaemonMetrics::new(&cfg.host, cfg.gpu);
    let shared = Arc::new(Shared {
        metrics,
        cfg,
        channel,
        worker_id: Mutex::new(String::new()),
        lease: Mutex::new(Duration::from_secs(15)),
        outbox: Mutex::new(Outbox::new(0)),
        wake_flush: Notify::new(),
        running: Mutex::new(HashMap::new()),
    });
    let metrics_server = match metrics_listener {
        Some(listener) => {
            tracing::info!(addr = %listener.local_addr()?, "serving Prometheus metrics on /metrics (plain HTTP)");
            let s = shared.clone();
            let render = Arc::new(move || {
                let pending = s.outbox.lock().map(|o| o.len()).unwrap_or(0);
                s.metrics.render(pending)
            });
            Some(tokio::spawn(metrics::serve(listener, render)))
        }
        None => None,
    };
    shared.register().await;

    let heartbeat = tokio::spawn(heartbeat_loop(shared.clone()));
    let flusher = tokio::spawn(flush_loop(shared.clone()));
    let assignments = tokio::spawn(assignment_loop(shared.clone()));
    shutdown.await;
    tracing::info!("shutting down: stopping trainers");
    assignments.abort();
    let stops: Vec<oneshot::Sender<String>> = shared
        .running
        .lock()
        .map(|mut r| r.values_mut().filter_map(Option::take).collect())
        .unwrap_or_default();
    for tx in stops {
        let _ = tx.send("the worker daemon is shutting down".to_string());
    }
    // Wait for the trainers to exit (each gets its grace period to checkpoint, then SIGKILL:
    // they die with this process, so leaving earlier would kill them mid-checkpoint) and for
    // the outbox to drain (their last checkpoint and `finished` events), within the grace
    // period and a little more. systemd's TimeoutStopSec must be longer than this.
    let deadline = tokio::time::Instant::now() + shared.cfg.grace + Duration::from_secs(10);
    while tokio::time::Instant::now() < deadline {
        let trainers = shared.running.lock().map(|r| r.len()).unwrap_or(0);
        let empty = shared.outbox.lock().map(|o| o.is_empty()).unwrap_or(true);
        if trainers == 0 && empty {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    heartbeat.abort();
    flusher.abort();
    if let Some(m) = metrics_server {
        m.abort();
    }
    Ok(())
}

/// Heartbeats at a third of the lease (at most every 3 s), faster while they fail.
async fn heartbeat_loop(shared: Arc<Shared>) {
    let every = |s: &Shared| {
        let lease = s
            .lease
            .lock()
            .map(|l| *l)
            .unwrap_or(Duration::from_secs(15));
        (lease / 3).clamp(Duration::from_millis(300), Duration::from_secs(3))
    };
    let mut interval = every(&shared);
    loop {
        tokio::time::sleep(interval).await;
        let req = pb::HeartbeatRequest {
            worker_id: shared.worker_id(),
            running: shared.running_list(),
        };
        match shared.client().heartbeat(req).await {
            Ok(r) => {
                for s in r.into_inner().stop {
                    stop(
                        &shared,
                        &s.job_id,
                        s.attempt,
                        "the coordinator asked this attempt to stop",
                    );
                }
                interval = every(&shared);
            }
            Err(e) if e.code() == Code::NotFound => {
                shared.metrics.heartbeat_failures.inc();
                shared.register().await
            }
            Err(e) => {
                shared.metrics.heartbeat_failures.inc();
                tracing::warn!(error = %e.message(), "heartbeat failed");
                interval = every(&shared).min(Duration::from_secs(1));
            }
        }
    }
}

/// Sends the outbox in order, one (job, attempt) run at a time, so that a stale attempt's events
/// can be dropped without losing anyone else's.
async fn flush_loop(shared: Arc<Shared>) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let batch: Vec<pb::WorkerEvent> = shared
            .outbox
            .lock()
            .map(|o| o.batch(256))
            .unwrap_or_default();
        let Some(first) = batch.first() else {
            let _ =
                tokio::time::timeout(Duration::from_secs(1), shared.wake_flush.notified()).await;
            continue;
        };
        let (job, attempt) = (first.job_id.clone(), first.attempt);
        let events: Vec<pb::WorkerEvent> = batch
            .into_iter()
            .take_while(|e| e.job_id == job && e.attempt == attempt)
            .collect();
        let req = pb::ReportEventsRequest {
            worker_id: shared.worker_id(),
            events,
        };
        match shared.client().report_events(req).await {
            Ok(r) => {
                if let Ok(mut o) = shared.outbox.lock() {
                    let before = o.len();
                    o.ack(r.into_inner().acked_seq);
                    shared
                        .metrics
                        .events_acked
                        .inc_by(before.saturating_sub(o.len()) as u64);
                }
                backoff = Duration::from_millis(200);
            }
            Err(e) if e.code() == Code::FailedPrecondition => {
                tracing::warn!(job = %job, attempt, error = %e.message(), "events of a stale attempt dropped");
                if let Ok(mut o) = shared.outbox.lock() {
                    o.drop_attempt(&job, attempt);
                }
            }
            Err(e) if e.code() == Code::NotFound => shared.register().await,
            Err(e) => {
                shared.metrics.report_failures.inc();
                let pending = shared.outbox.lock().map(|o| o.len()).unwrap_or(0);
                tracing::warn!(error = %e.message(), pending, "cannot report events yet; keeping them");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

async fn assignment_loop(shared: Arc<Shared>) {
    loop {
        let req = pb::AwaitAssignmentRequest {
            worker_id: shared.worker_id(),
        };
        let mut stream = match shared.client().await_assignment(req).await {
            Ok(s) => s.into_inner(),
            Err(e) => {
                if e.code() == Code::NotFound {
                    shared.register().await;
                } else {
                    tracing::warn!(error = %e.message(), "assignment stream unavailable; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                continue;
            }
        };
        loop {
            match stream.message().await {
                Ok(Some(msg)) => match msg.kind {
                    Some(pb::assignment_message::Kind::Start(a)) => {
                        let key = RankKey::of(&a);
                        let already = shared
                            .running
                            .lock()
                            .map(|r| r.contains_key(&key))
                            .unwrap_or(true);
                        if !already {
                            let (tx, rx) = oneshot::channel();
                            if let Ok(mut r) = shared.running.lock() {
                                r.insert(key.clone(), Some(tx));
                            }
                            tokio::spawn(run_rank(shared.clone(), a, rx));
                        }
                    }
                    Some(pb::assignment_message::Kind::Stop(s)) => {
                        stop(&shared, &s.job_id, s.attempt, &s.reason)
                    }
                    None => {}
                },
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(error = %e.message(), "assignment stream broke; reconnecting");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    break;
                }
            }
        }
    }
}

/// Asks every trainer of (job, attempt) on this worker to stop.
fn stop(shared: &Shared, job_id: &str, attempt: u32, reason: &str) {
    let keys: Vec<RankKey> = shared
        .running
        .lock()
        .map(|r| {
            r.keys()
                .filter(|k| k.job_id == job_id && k.attempt == attempt)
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    for k in keys {
        let tx = shared
            .running
            .lock()
            .ok()
            .and_then(|mut r| r.get_mut(&k).and_then(Option::take));
        if let Some(tx) = tx {
            tracing::info!(job = %k.job_id, attempt = k.attempt, rank = k.rank, reason, "stopping trainer");
            let _ = tx.send(reason.to_string());
        }
    }
}

/// Runs one rank: rendezvous, the child trainer, its events, its end.
async fn run_rank(shared: Arc<Shared>, a: pb::Assignment, mut stop_rx: oneshot::Receiver<String>) {
    let key = RankKey::of(&a);
    shared.metrics.set_phase(&key, Phase::Starting);
    let finish = |outcome: pb::Outcome, reason: String| {
        let name = outcome.as_str_name().trim_start_matches("OUTCOME_");
        tracing::info!(job = %key.job_id, attempt = key.attempt, rank = key.rank, outcome = name, reason = %reason, "trainer finished");
        shared.metrics.finished(&key, name);
        shared.emit(
            &key,
            pb::worker_event::Payload::Finished(pb::AttemptFinished {
                outcome: outcome as i32,
                reason,
            }),
        );
        if let Ok(mut r) = shared.running.lock() {
            r.remove(&key);
        }
    };
    let spec = match segtrain_spec::JobSpec::from_proto(&a.spec.clone().unwrap_or_default()) {
        Ok(s) => s,
        Err(e) => {
            return finish(
                pb::Outcome::FailedDeterministic,
                format!("invalid spec: {e}"),
            )
        }
    };

    // Ranks > 0 wait for rank 0's endpoint (or a stop).
    let mut endpoint = None;
    if a.rank > 0 && a.world_size > 1 {
        loop {
            let req = pb::AwaitRendezvousRequest {
                worker_id: shared.worker_id(),
                job_id: a.job_id.clone(),
                attempt: a.attempt,
                timeout_seconds: 30,
            };
            let mut client = shared.client();
            tokio::select! {
                reason = &mut stop_rx => {
                    return finish(pb::Outcome::Canceled, reason.unwrap_or_else(|_| "stopped".into()));
                }
                r = client.await_rendezvous(req) => match r {
                    Ok(r) => { endpoint = r.into_inner().endpoint; break; }
                    Err(e) if matches!(e.code(), Code::DeadlineExceeded | Code::Unavailable | Code::Unknown) => continue,
                    Err(e) => return finish(pb::Outcome::FailedInfra, format!("rendezvous: {}", e.message())),
                }
            }
        }
    }

    let work_dir = shared
        .cfg
        .work_dir
        .join(format!("{}-a{}-r{}", key.job_id, key.attempt, key.rank));
    let launch = trainer_process::Launch {
        exe: &shared.cfg.exe,
        assignment: &a,
        spec: &spec,
        work_dir: &work_dir,
        gpu: shared.cfg.gpu,
        rendezvous: endpoint,
        advertise_host: &shared.cfg.advertise_host,
        torch_threads: shared.cfg.torch_threads,
    };
    let (mut child, log) = match trainer_process::spawn(&launch) {
        Ok(c) => c,
        Err(e) => return finish(pb::Outcome::FailedInfra, format!("{e:#}")),
    };
    tracing::info!(job = %key.job_id, attempt = key.attempt, rank = key.rank, pid = child.id(), "trainer started");
    let Some(stdout) = child.stdout.take() else {
        return finish(pb::Outcome::FailedInfra, "trainer has no stdout".into());
    };
    let mut lines = BufReader::new(stdout).lines();
    let mut stopped: Option<String> = None;
    let mut failed: Option<(bool, String)> = None;
    let mut stdout_open = true;
    loop {
        tokio::select! {
            line = lines.next_line(), if stdout_open => match line {
                Ok(Some(l)) => match trainer_process::parse_line(&l, &key.job_id, key.attempt) {
                    Ok(Parsed::Event(p)) => {
                        match &p {
                            pb::worker_event::Payload::Started(_) if stopped.is_none() => {
                                shared.metrics.set_phase(&key, Phase::Running)
                            }
                            pb::worker_event::Payload::Metrics(m) => {
                                shared.metrics.observe(m.iteration, &m.values);
                                let v = |k: &str| m.values.get(k).copied().unwrap_or(f64::NAN);
                                tracing::info!(job = %key.job_id, attempt = key.attempt, rank = key.rank, iteration = m.iteration, loss = v("loss"), lr = v("lr"), images_per_s = v("images_per_s"), step_ms = v("step_ms"), data_wait_ms = v("data_wait_ms"), "progress");
                            }
                            _ => {}
                        }
                        shared.emit(&key, p)
                    }
                    Ok(Parsed::Local { iteration, values }) => {
                        shared.metrics.observe(iteration, &values)
                    }
                    Ok(Parsed::Checkpoint { complete, deleted }) => {
                        shared.emit(&key, complete);
                        if let Some(d) = deleted {
                            shared.emit(&key, d);
                        }
                    }
                    Ok(Parsed::Failed { deterministic, reason }) => failed = Some((deterministic, reason)),
                    Ok(Parsed::Rendezvous(ep)) => publish(&shared, &key, ep).await,
                    Ok(Parsed::Collective { backend, detail }) => {
                        tracing::info!(job = %key.job_id, attempt = key.attempt, rank = key.rank, backend, detail, "collective ready")
                    }
                    Ok(Parsed::Ignored) => {}
                    Err(e) => tracing::warn!(job = %key.job_id, attempt = key.attempt, rank = key.rank, error = %e, "unreadable trainer output"),
                },
                _ => stdout_open = false,
            },
            reason = &mut stop_rx, if stopped.is_none() => {
                let reason = reason.unwrap_or_else(|_| "stopped".into());
                stopped = Some(reason);
                shared.metrics.set_phase(&key, Phase::Stopping);
                terminate(&mut child, shared.cfg.grace).await;
            }
            status = child.wait(), if !stdout_open => {
                let (outcome, reason) = outcome_of(stopped.take(), failed.take(), status, &log);
                return finish(outcome, reason);
            }
        }
    }
}

/// How a trainer ended: stopped on request (whatever its exit status), finished, failed as the
/// trainer classified it, or killed (an infrastructure failure: OOM killer, operator, crash).
fn outcome_of(
    stopped: Option<String>,
    failed: Option<(bool, String)>,
    status: std::io::Result<std::process::ExitStatus>,
    log: &std::path::Path,
) -> (pb::Outcome, String) {
    use std::os::unix::process::ExitStatusExt;
    match (stopped, failed, status) {
        (Some(reason), _, _) => (pb::Outcome::Canceled, reason),
        (None, _, Ok(s)) if s.success() => (pb::Outcome::Succeeded, String::new()),
        (None, Some((true, reason)), Ok(_)) => (pb::Outcome::FailedDeterministic, reason),
        (None, Some((false, reason)), Ok(_)) => (pb::Outcome::FailedInfra, reason),
        (None, None, Ok(s)) => match s.signal() {
            Some(sig) => (
                pb::Outcome::FailedInfra,
                format!("the trainer was killed by signal {sig}"),
            ),
            None => (
                pb::Outcome::FailedInfra,
                format!(
                    "the trainer exited with {s}: {}",
                    trainer_process::log_tail(log, 3)
                ),
            ),
        },
        (None, _, Err(e)) => (
            pb::Outcome::FailedInfra,
            format!("cannot wait for the trainer: {e}"),
        ),
    }
}

/// SIGTERM, then SIGKILL after the grace period.
async fn terminate(child: &mut tokio::process::Child, grace: Duration) {
    if let Some(pid) = child.id() {
        // SAFETY: signalling our own child process by its pid.
        unsafe {
            libc::kill(pid as i32, libc::SIGTERM);
        }
    }
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        let _ = child.kill().await;
    }
}

/// Publishes rank 0's endpoint, retrying while the coordinator is unreachable.
async fn publish(shared: &Shared, key: &RankKey, ep: pb::publish_rendezvous_request::Endpoint) {
    for _ in 0..60 {
        let req = pb::PublishRendezvousRequest {
            worker_id: shared.worker_id(),
            job_id: key.job_id.clone(),
            attempt: key.attempt,
            endpoint: Some(ep.clone()),
        };
        match shared.client().publish_rendezvous(req).await {
            Ok(_) => {
                tracing::info!(job = %key.job_id, attempt = key.attempt, rank = key.rank, "rendezvous published");
                return;
            }
            Err(e) if e.code() == Code::Unavailable => {
                tokio::time::sleep(Duration::from_secs(1)).await
            }
            Err(e) => {
                tracing::warn!(job = %key.job_id, attempt = key.attempt, rank = key.rank, error = %e.message(), "cannot publish the rendezvous");
                return;
            }
        }
    }
}
