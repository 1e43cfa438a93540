//! `segtrain-worker daemon`: one per GPU (or one CPU worker). It registers with the coordinator,
//! heartbeats, receives assignments, runs each rank in a child trainer process, and relays the
//! trainer's events — numbered, buffered and resent until acknowledged, so nothing is lost while
//! the coordinator is away. A crashed or hung trainer never takes the daemon down (the
//! torchelastic-agent / Determined-agent split). tch never runs here: the daemon is all tokio.
//!
//! Files: [`instance`] (one daemon per host and GPU), [`rank`] (one trainer: its output, its
//! stop, its end), [`flush`] (the outbox to the coordinator, and what each refusal means),
//! [`lines`] (bounded reading of trainer output), [`outbox`], [`trainer_process`], [`metrics`],
//! [`preemption`] (the host's notice that it is going away);
//! [`command`] turns the `segtrain-worker daemon` options into a [`DaemonConfig`] and runs it.

pub mod command;
pub mod fence;
pub mod flush;
pub mod instance;
pub mod journal;
pub mod lines;
pub mod metrics;
pub mod outbox;
pub mod preemption;
pub mod rank;
pub mod trainer_process;

use metrics::DaemonMetrics;
use outbox::Outbox;
use segtrain_proto::client::{self as conn, AuthChannel, BearerToken, ClientTls};
use segtrain_proto::refusal;
use segtrain_proto::v1 as pb;
use segtrain_proto::v1::worker_service_client::WorkerServiceClient;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::sync::{oneshot, Notify};
use tonic::{Code, Status};
use trainer_process::AttemptRank;

#[derive(Debug, Clone)]
pub struct DaemonConfig {
    pub coordinator: String,
    /// None: a CPU worker.
    pub gpu: Option<u32>,
    /// The GPU's model name, reported at registration (`cpu` for a CPU worker). The daemon
    /// never loads libtorch or CUDA itself: the program that starts it asks.
    pub gpu_name: String,
    pub host: String,
    /// The address other ranks use to reach this host's rank-0 TCP listener.
    pub advertise_host: String,
    /// Per-rank job files and trainer logs; the instance lock and record.
    pub work_dir: PathBuf,
    /// The trainer binary (normally this binary).
    pub exe: PathBuf,
    /// Seconds a stopped trainer gets before it is killed, at most (the coordinator's
    /// `--stop-grace-seconds` may shorten it: see [`stop_grace`]).
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
    /// `--preemption-url`: the metadata server's preemption flag (None: SIGTERM only).
    pub preemption_url: Option<preemption::HttpUrl>,
}

/// A request to stop one trainer: why, and the grace period the coordinator gave (None: the
/// daemon's own, e.g. on its shutdown).
#[derive(Debug, Clone)]
pub struct StopRequest {
    pub reason: String,
    pub grace: Option<Duration>,
    /// The host is going away: the rank ends PREEMPTED rather than CANCELED.
    pub preemption: bool,
}

/// How long a stopped trainer gets before SIGKILL: the smaller of the daemon's `--grace-seconds`
/// and the coordinator's `--stop-grace-seconds`, so neither side's promise is broken (the
/// coordinator's: a cancel ends in its time; the daemon's: `systemctl stop` ends within the
/// unit's TimeoutStopSec).
pub fn stop_grace(daemon: Duration, coordinator: Option<Duration>) -> Duration {
    coordinator.map_or(daemon, |c| c.min(daemon))
}

/// State shared by the daemon's tasks.
pub(crate) struct Shared {
    cfg: DaemonConfig,
    channel: AuthChannel,
    instance: instance::Instance,
    /// The secret the coordinator gave this instance (empty until it registered): every request
    /// shows it. Never logged.
    instance_secret: Mutex<String>,
    worker_id: Mutex<String>,
    /// The lease the coordinator grants (heartbeats go at a third of it).
    lease: Mutex<Duration>,
    /// The coordinator's stop grace (from Register), for stops that do not carry one.
    coordinator_grace: Mutex<Option<Duration>>,
    outbox: Mutex<Outbox>,
    wake_flush: Notify,
    /// Running trainers and how to stop each (`None` once asked to stop: a stopping trainer
    /// stays listed, so its worker is not freed, until its process has exited).
    running: Mutex<HashMap<AttemptRank, Option<oneshot::Sender<StopRequest>>>>,
    metrics: DaemonMetrics,
    /// Set once the host said it is going away: heartbeats say so (no new ranks for it).
    leaving: std::sync::atomic::AtomicBool,
    /// Pauses the trainers when no heartbeat is accepted for nearly the lease.
    fence: fence::Fence,
    /// Set once this daemon must not go on (another instance holds its worker).
    fatal: Mutex<Option<String>>,
    fatal_notify: Notify,
}

fn now() -> prost_types::Timestamp {
    prost_types::Timestamp::from(SystemTime::now())
}

/// Longest text the daemon sends in a note or a reason (the coordinator takes 4096 bytes).
const MAX_TEXT: usize = 4000;

/// Text the coordinator takes: no control character but line feed and tab (a trainer's ESC
/// colour codes, or NUL, become U+FFFD; `segtrain_proto::text`), at most [`MAX_TEXT`] bytes
/// (cut at a character boundary, marked with "…").
pub fn wire_text(s: &str) -> String {
    let clean = segtrain_proto::text::scrub(s, true);
    if clean.len() <= MAX_TEXT {
        return clean;
    }
    let mut end = MAX_TEXT - '…'.len_utf8();
    while !clean.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &clean[..end])
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

    fn instance_id(&self) -> String {
        self.instance.id.to_string()
    }

    fn instance_secret(&self) -> String {
        self.instance_secret
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    /// Who this daemon's requests come from.
    fn sender(&self) -> flush::Sender {
        flush::Sender {
            worker_id: self.worker_id(),
            instance_id: self.instance_id(),
            instance_secret: self.instance_secret(),
        }
    }

    /// The instance this one succeeds, when it left events undelivered and its whole identity
    /// is on record.
    fn predecessor(&self) -> Option<flush::Sender> {
        let i = &self.instance;
        let left = self.outbox.lock().map(|o| !o.is_empty()).unwrap_or(false);
        match (left, i.previous, &i.previous_secret, &i.previous_worker) {
            (true, Some(id), Some(secret), Some(worker)) => Some(flush::Sender {
                worker_id: worker.clone(),
                instance_id: id.to_string(),
                instance_secret: secret.clone(),
            }),
            _ => None,
        }
    }

    fn coordinator_grace(&self) -> Option<Duration> {
        self.coordinator_grace.lock().ok().and_then(|g| *g)
    }

    fn running_list(&self) -> Vec<pb::AttemptRank> {
        self.running
            .lock()
            .map(|r| r.keys().map(AttemptRank::to_proto).collect())
            .unwrap_or_default()
    }

    fn emit(&self, key: &AttemptRank, payload: pb::worker_event::Payload) {
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

    /// A note on the job, about one of its ranks.
    fn note(&self, key: &AttemptRank, text: &str) {
        self.emit(
            key,
            pb::worker_event::Payload::Note(pb::Note {
                text: wire_text(text),
            }),
        );
    }

    /// A trainer found this worker's disk full: the worker takes no new rank (its heartbeats say
    /// it is leaving) until its daemon restarts, so the job's restart is not spent here again.
    fn disk_full(&self, key: &AttemptRank, why: &str) {
        self.leaving
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let worker = segtrain_proto::names::worker_name(
            &self.cfg.host,
            self.cfg.gpu.map_or(-1, |g| g as i32),
        );
        tracing::error!(job = %key.job_id, attempt = key.attempt, rank = key.rank, error = %why, "the disk is full: this worker takes no new rank until its daemon is restarted (free space, then systemctl restart)");
        self.note(
            key,
            &format!(
                "worker {worker}: the disk is full ({why}); the worker takes no new rank until \
                 its daemon is restarted"
            ),
        );
    }

    /// This daemon must stop: another instance holds its worker. The first reason wins.
    fn fail(&self, why: String) {
        if let Ok(mut f) = self.fatal.lock() {
            if f.is_none() {
                tracing::error!(error = %why, "this daemon cannot go on");
                *f = Some(why);
            }
        }
        self.fatal_notify.notify_waiters();
    }

    fn failed(&self) -> Option<String> {
        self.fatal.lock().ok().and_then(|f| f.clone())
    }

    /// Resolves once [`fail`](Self::fail) was called.
    async fn fatal(&self) -> String {
        loop {
            let wait = self.fatal_notify.notified();
            if let Some(why) = self.failed() {
                return why;
            }
            wait.await;
        }
    }

    /// A refusal that ends this daemon (another instance holds its worker); true when it was
    /// one.
    fn fatal_refusal(&self, e: &Status) -> bool {
        let reason = refusal::reason(e);
        let fatal = matches!(
            reason.as_deref(),
            Some(refusal::WORKER_SUPERSEDED | refusal::WORKER_HELD | refusal::INSTANCE_SECRET)
        );
        if fatal {
            self.fail(e.message().to_string());
        }
        fatal
    }

    /// Registers (again), retrying until the coordinator answers. Fails (and marks the daemon
    /// failed) when another daemon instance holds this host and GPU.
    async fn register(&self) -> Result<(), String> {
        let mut delay = Duration::from_millis(200);
        loop {
            if let Some(why) = self.failed() {
                return Err(why);
            }
            let req = pb::RegisterRequest {
                host: self.cfg.host.clone(),
                gpu_index: self.cfg.gpu.map_or(-1, |g| g as i32),
                gpu_name: self.cfg.gpu_name.clone(),
                gpu_memory_bytes: 0,
                running: self.running_list(),
                instance_id: self.instance_id(),
                previous_instance_id: self
                    .instance
                    .previous
                    .map(|p| p.to_string())
                    .unwrap_or_default(),
                instance_secret: self.instance_secret(),
                previous_instance_secret: self.instance.previous_secret.clone().unwrap_or_default(),
            };
            let sent = std::time::Instant::now();
            match self.client().register(req).await {
                Ok(r) => {
                    let r = r.into_inner();
                    self.fence.accepted(sent);
                    tracing::info!(worker_id = %r.worker_id, instance = %self.instance.id, acked_seq = r.acked_seq, "registered");
                    if !r.instance_secret.is_empty() {
                        if let Ok(mut s) = self.instance_secret.lock() {
                            *s = r.instance_secret.clone();
                        }
                        if let Err(e) = self.instance.record(&r.instance_secret, &r.worker_id) {
                            tracing::warn!(error = format!("{e:#}"), "cannot record this daemon's instance; a restart will wait for its lease to expire");
                        }
                    }
                    if let Ok(mut w) = self.worker_id.lock() {
                        *w = r.worker_id;
                    }
                    if let Ok(mut l) = self.lease.lock() {
                        *l = Duration::from_secs(u64::from(r.lease_seconds.max(1)));
                    }
                    if let Ok(mut g) = self.coordinator_grace.lock() {
                        *g = Some(Duration::from_secs(u64::from(r.stop_grace_seconds)));
                    }
                    if let Ok(mut o) = self.outbox.lock() {
                        o.resync(r.acked_seq);
                    }
                    return Ok(());
                }
                Err(e)
                    if e.code() == Code::AlreadyExists
                        || refusal::reason(&e).as_deref() == Some(refusal::WORKER_SUPERSEDED) =>
                {
                    let code = match e.code() {
                        Code::AlreadyExists => "ALREADY_EXISTS",
                        _ => "FAILED_PRECONDITION",
                    };
                    let why = format!("{code}: {}", e.message());
                    self.fail(why.clone());
                    return Err(why);
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

/// Runs the daemon until `shutdown` resolves; then stops its trainers and flushes what it can.
/// Returns an error (and stops its trainers at once) when it must not run: its work dir is in
/// use, or another daemon instance holds its host and GPU.
pub async fn run(
    cfg: DaemonConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let instance = instance::claim(&cfg.work_dir, cfg.gpu)?;
    // The rank dirs a previous daemon of this worker left (its trainers died with it).
    for e in std::fs::read_dir(&cfg.work_dir)
        .into_iter()
        .flatten()
        .flatten()
    {
        if e.file_name()
            .to_str()
            .is_some_and(|n| rank::is_rank_dir(cfg.gpu, n))
        {
            rank::remove_work_dir(&e.path());
        }
    }
    let journal = format!("outbox-{}.journal", instance::label(cfg.gpu));
    let outbox = Outbox::open(&cfg.work_dir, &journal)?;
    let channel = conn::connect_lazy(&cfg.coordinator, &cfg.tls, cfg.token.clone())?;
    // Bound before registering: the endpoint answers while the coordinator is unreachable.
    let metrics_listener = match cfg.metrics_listen {
        Some(addr) => Some(segtrain_telemetry::metrics_http::bind(addr).await?),
        None => None,
    };
    let metrics = DaemonMetrics::new(&cfg.host, cfg.gpu);
    let shared = Arc::new(Shared {
        metrics,
        cfg,
        channel,
        instance,
        instance_secret: Mutex::new(String::new()),
        worker_id: Mutex::new(String::new()),
        lease: Mutex::new(Duration::from_secs(15)),
        coordinator_grace: Mutex::new(None),
        outbox: Mutex::new(outbox),
        wake_flush: Notify::new(),
        running: Mutex::new(HashMap::new()),
        leaving: std::sync::atomic::AtomicBool::new(false),
        fence: fence::Fence::default(),
        fatal: Mutex::new(None),
        fatal_notify: Notify::new(),
    });
    let metrics_server = match metrics_listener {
        Some(listener) => {
            tracing::info!(addr = %listener.local_addr()?, "serving Prometheus metrics on /metrics (plain HTTP)");
            let s = shared.clone();
            let render = Arc::new(move || {
                let pending = s.outbox.lock().map(|o| o.len()).unwrap_or(0);
                s.metrics.render(pending)
            });
            Some(tokio::spawn(segtrain_telemetry::metrics_http::serve(
                listener,
                "segtrain worker daemon",
                render,
            )))
        }
        None => None,
    };
    // A daemon restarted on a VM that is being preempted (systemd's Restart=always) must not
    // take work in its last seconds.
    if let Some(url) = &shared.cfg.preemption_url {
        if preemption::read_flag(url).await == Ok(true) {
            anyhow::bail!(
                "the metadata server says this VM is being preempted (http://{}:{}{}); not \
                 registering",
                url.host,
                url.port,
                url.path
            );
        }
    }
    tokio::pin!(shutdown);
    // What the previous daemon on this work dir reported and could not deliver goes first, as
    // that instance: registering would end its ranks, and the job could restart without it.
    if let Some(previous) = shared.predecessor() {
        let n = shared.outbox.lock().map(|o| o.len()).unwrap_or(0);
        tracing::info!(events = n, instance = %previous.instance_id, "delivering the previous daemon's undelivered events");
        tokio::select! {
            () = flush::deliver_leftovers(&shared, previous) => {}
            () = &mut shutdown => return Ok(()),
        }
    }
    tokio::select! {
        r = shared.register() => r.map_err(anyhow::Error::msg)?,
        () = &mut shutdown => return Ok(()),
    }

    let heartbeat = tokio::spawn(heartbeat_loop(shared.clone()));
    let fencing = tokio::spawn(fence_loop(shared.clone()));
    let flusher = tokio::spawn(flush::flush_loop(shared.clone()));
    let assignments = tokio::spawn(assignment_loop(shared.clone()));
    let notice = async {
        match shared.cfg.preemption_url.clone() {
            Some(url) => preemption::wait_for_notice(url).await,
            None => std::future::pending().await,
        }
    };
    let ended = tokio::select! {
        // systemd's stop: on a spot VM, the ACPI soft-off of a preemption.
        () = &mut shutdown => Ended::Notice("the host sent SIGTERM (a preemption notice, or the daemon being stopped)".to_string()),
        why = notice => Ended::Notice(why),
        why = shared.fatal() => Ended::Fatal(why),
    };
    assignments.abort();
    let stop = match &ended {
        // Another daemon owns the GPU now: free it at once.
        Ended::Fatal(_) => StopRequest {
            reason: "another daemon instance took over this worker".to_string(),
            grace: Some(Duration::ZERO),
            preemption: false,
        },
        Ended::Notice(why) => {
            shared
                .leaving
                .store(true, std::sync::atomic::Ordering::SeqCst);
            tracing::warn!(reason = %why, "this worker is going away: checkpointing and stopping its trainers");
            // Say so before the trainers end, so their workers get no new rank meanwhile.
            let _ = tokio::time::timeout(Duration::from_secs(2), beat(&shared)).await;
            StopRequest {
                reason: why.clone(),
                grace: None,
                preemption: true,
            }
        }
    };
    let fatal = match ended {
        Ended::Fatal(why) => Some(why),
        Ended::Notice(_) => None,
    };
    let grace = stop.grace;
    let stops: Vec<oneshot::Sender<StopRequest>> = shared
        .running
        .lock()
        .map(|mut r| r.values_mut().filter_map(Option::take).collect())
        .unwrap_or_default();
    for tx in stops {
        let _ = tx.send(stop.clone());
    }
    // Wait for the trainers to exit (each gets its grace period to checkpoint, then SIGKILL:
    // they die with this process, so leaving earlier would kill them mid-checkpoint) and for
    // the outbox to drain (their last checkpoint and `finished` events), within the grace
    // period and a little more. systemd's TimeoutStopSec must be longer than this. A daemon
    // that was replaced has nothing to report any more.
    let deadline =
        tokio::time::Instant::now() + grace.unwrap_or(shared.cfg.grace) + Duration::from_secs(10);
    while tokio::time::Instant::now() < deadline {
        let trainers = shared.running.lock().map(|r| r.len()).unwrap_or(0);
        let empty = fatal.is_some() || shared.outbox.lock().map(|o| o.is_empty()).unwrap_or(true);
        if trainers == 0 && empty {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    heartbeat.abort();
    fencing.abort();
    flusher.abort();
    if let Some(m) = metrics_server {
        m.abort();
    }
    match fatal {
        Some(why) => Err(anyhow::Error::msg(why)),
        None => Ok(()),
    }
}

/// Why the daemon ends.
enum Ended {
    /// The host is going away (SIGTERM, the metadata server's preemption flag).
    Notice(String),
    /// Another daemon instance holds this worker.
    Fatal(String),
}

/// One heartbeat, for its own sake (the loop below acts on the answers).
async fn beat(shared: &Shared) -> Result<(), Status> {
    shared.client().heartbeat(heartbeat_request(shared)).await?;
    Ok(())
}

fn heartbeat_request(shared: &Shared) -> pb::HeartbeatRequest {
    pb::HeartbeatRequest {
        worker_id: shared.worker_id(),
        running: shared.running_list(),
        instance_id: shared.instance_id(),
        leaving: shared.leaving.load(std::sync::atomic::Ordering::SeqCst),
        instance_secret: shared.instance_secret(),
    }
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
        let sent = std::time::Instant::now();
        match shared.client().heartbeat(heartbeat_request(&shared)).await {
            Ok(r) => {
                if let Some(paused) = shared.fence.accepted(sent) {
                    tracing::warn!(paused_ms = paused.as_millis() as u64, "a heartbeat is accepted again: the paused trainers go on (the coordinator stops those it no longer wants)");
                }
                for s in r.into_inner().stop {
                    stop(
                        &shared,
                        &s.job_id,
                        s.attempt,
                        StopRequest {
                            reason: "the coordinator asked this attempt to stop".into(),
                            grace: shared.coordinator_grace(),
                            preemption: false,
                        },
                    );
                }
                interval = every(&shared);
            }
            Err(e) if shared.fatal_refusal(&e) => return,
            Err(e) if e.code() == Code::NotFound => {
                shared.metrics.heartbeat_failures.inc();
                if shared.register().await.is_err() {
                    return;
                }
            }
            Err(e) => {
                shared.metrics.heartbeat_failures.inc();
                tracing::warn!(error = %e.message(), "heartbeat failed");
                interval = every(&shared).min(Duration::from_secs(1));
            }
        }
    }
}

/// Watches the lease: pauses every trainer once no heartbeat was accepted for nearly the lease
/// (see [`fence`]).
async fn fence_loop(shared: Arc<Shared>) {
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let lease = shared
            .lease
            .lock()
            .map(|l| *l)
            .unwrap_or(Duration::from_secs(15));
        if let Some(silent) = shared.fence.check(lease) {
            tracing::warn!(silent_ms = silent.as_millis() as u64, lease_s = lease.as_secs(), "self-fenced: no heartbeat accepted for nearly the lease; trainers paused before the coordinator could give their ranks to another worker");
        }
    }
}

async fn assignment_loop(shared: Arc<Shared>) {
    loop {
        let req = pb::AwaitAssignmentRequest {
            worker_id: shared.worker_id(),
            instance_id: shared.instance_id(),
            instance_secret: shared.instance_secret(),
        };
        let mut stream = match shared.client().await_assignment(req).await {
            Ok(s) => s.into_inner(),
            Err(e) if shared.fatal_refusal(&e) => return,
            Err(e) => {
                if e.code() == Code::NotFound {
                    if shared.register().await.is_err() {
                        return;
                    }
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
                        let key = AttemptRank::of(&a);
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
                            tokio::spawn(rank::run_rank(shared.clone(), a, rx));
                        }
                    }
                    Some(pb::assignment_message::Kind::Stop(s)) => stop(
                        &shared,
                        &s.job_id,
                        s.attempt,
                        StopRequest {
                            reason: s.reason,
                            grace: Some(Duration::from_secs(u64::from(s.grace_seconds))),
                            preemption: false,
                        },
                    ),
                    None => {}
                },
                Ok(None) => break,
                Err(e) if shared.fatal_refusal(&e) => return,
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
fn stop(shared: &Shared, job_id: &str, attempt: u32, req: StopRequest) {
    let keys: Vec<AttemptRank> = shared
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
            tracing::info!(job = %k.job_id, attempt = k.attempt, rank = k.rank, reason = %req.reason, "stopping trainer");
            let _ = tx.send(req.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_dirs_are_told_apart() {
        let key = AttemptRank {
            job_id: "01a25259-85ed-7533-be40-27374a26ae59".into(),
            attempt: 3,
            rank: 12,
        };
        let name = rank::rank_dir_name(Some(1), &key);
        assert_eq!(name, format!("gpu1-{}-a3-r12", key.job_id));
        assert!(rank::is_rank_dir(Some(1), &name));
        // Another GPU's on a shared work dir is not this worker's.
        assert!(!rank::is_rank_dir(Some(0), &name));
        assert!(rank::is_rank_dir(None, &rank::rank_dir_name(None, &key)));
        let job = &key.job_id;
        for other in [
            "daemon.log",
            "outbox-cpu.journal",
            "daemon-cpu.instance",
            &format!("gpu1-{job}-a3"),
            &format!("gpu1-{job}-ax-r1"),
            "gpu1-short-a1-r1",
        ] {
            assert!(!rank::is_rank_dir(Some(1), other), "{other}");
        }
    }

    #[test]
    fn the_smaller_grace_wins() {
        let s = Duration::from_secs;
        assert_eq!(stop_grace(s(60), Some(s(2))), s(2));
        assert_eq!(stop_grace(s(5), Some(s(30))), s(5));
        assert_eq!(stop_grace(s(30), None), s(30));
        assert_eq!(stop_grace(s(30), Some(s(0))), s(0));
    }

    #[test]
    fn texts_are_storable() {
        assert_eq!(wire_text("a\0b"), "a\u{FFFD}b");
        assert_eq!(wire_text("\u{1b}[31mred\nline"), "\u{FFFD}[31mred\nline");
        let long = "é".repeat(3000);
        let t = wire_text(&long);
        assert!(t.len() <= MAX_TEXT && t.ends_with('…'), "{}", t.len());
        assert_eq!(wire_text("short"), "short");
    }
}
