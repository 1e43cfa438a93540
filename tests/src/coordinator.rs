//! The real `segtrain-coordinator` binary as a child process: start, wait until it serves,
//! kill -9, start again on the same port and database. [`FakeWorker`] plays a worker daemon
//! through plain WorkerService calls (no trainer), for scheduling and worker API tests.
//!
//! [`CoordinatorProcess::start`] and [`start_with_args`](CoordinatorProcess::start_with_args)
//! run it the way a developer does on one machine: `--plaintext --insecure-no-auth` on
//! 127.0.0.1. [`start_secure`](CoordinatorProcess::start_secure) runs it as in production: TLS
//! with certificates from `segtrain-coordinator certs`, bearer tokens required, and an admin
//! token bootstrapped with `segtrain-coordinator token create`.

use segtrain_proto::client::{self as conn, AuthChannel, BearerToken, ClientTls};
use segtrain_proto::v1 as pb;
use segtrain_proto::v1::cluster_service_client::ClusterServiceClient;
use segtrain_proto::v1::job_service_client::JobServiceClient;
use segtrain_proto::v1::token_service_client::TokenServiceClient;
use segtrain_proto::v1::worker_service_client::WorkerServiceClient;
use std::collections::HashMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tonic::codegen::{Body, Bytes, StdError};
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

pub struct CoordinatorProcess {
    database_url: String,
    /// The address it listens on: 127.0.0.1, or another loopback-range address (partition.rs).
    host: String,
    port: u16,
    child: Option<Child>,
    log: PathBuf,
    /// Extra command-line flags (e.g. `--lease-seconds 2`), kept across restarts.
    args: Vec<String>,
    /// TLS and tokens (`start_secure`); `None`: plaintext without authentication.
    secure: Option<Secure>,
    _logdir: tempfile::TempDir,
}

/// How a [`CoordinatorProcess::start_secure`] coordinator is reached.
pub struct Secure {
    /// `ca.pem`, `server.pem`, `server-key.pem`, `client.pem`, `client-key.pem` from
    /// `segtrain-coordinator certs`.
    pub cert_dir: PathBuf,
    /// The admin token bootstrapped with `segtrain-coordinator token create`.
    pub admin_token: String,
    /// Whether clients must present a certificate (`--tls-client-ca`).
    pub client_certificates: bool,
}

/// Runs `segtrain-coordinator` with `args` to completion; its stdout, or a panic with stderr.
pub fn coordinator_command(args: &[&str]) -> String {
    let mut cmd = Command::new(crate::binaries::path("segtrain-coordinator"));
    let out = crate::binaries::run_ok(cmd.args(args), &format!("segtrain-coordinator {args:?}"));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A port on 127.0.0.1 that was free a moment ago (for `--listen`, `--metrics-listen`).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port on 127.0.0.1")
}

impl CoordinatorProcess {
    /// Starts the coordinator on a free port and waits until its health service reports SERVING.
    pub async fn start(database_url: &str) -> CoordinatorProcess {
        CoordinatorProcess::start_with_args(database_url, &[]).await
    }

    /// [`start`](Self::start) with extra flags, such as `["--lease-seconds", "2"]`.
    pub async fn start_with_args(database_url: &str, args: &[&str]) -> CoordinatorProcess {
        let mut all = vec!["--plaintext", "--insecure-no-auth"];
        all.extend_from_slice(args);
        CoordinatorProcess::launch(database_url, &all, None).await
    }

    /// [`start_with_args`](Self::start_with_args) with bearer tokens required (still plaintext,
    /// on loopback): for tests that speak plain HTTP to the dashboard themselves.
    pub async fn start_plaintext_with_auth(
        database_url: &str,
        args: &[&str],
    ) -> CoordinatorProcess {
        let mut all = vec!["--plaintext"];
        all.extend_from_slice(args);
        CoordinatorProcess::launch(database_url, &all, None).await
    }

    /// [`start_with_args`](Self::start_with_args) listening on `host` (a loopback-range address
    /// such as a test network's 127.77.0.1) instead of 127.0.0.1.
    pub async fn start_on(database_url: &str, host: &str, args: &[&str]) -> CoordinatorProcess {
        let mut all = vec!["--plaintext", "--insecure-no-auth"];
        all.extend_from_slice(args);
        let logdir = tempfile::tempdir().expect("temp dir for the coordinator log");
        let mut c = CoordinatorProcess::new(database_url, &all, None, logdir);
        c.host = host.to_string();
        c.spawn().await;
        c
    }

    /// Starts the coordinator with TLS (a fresh private CA; the server certificate is for
    /// localhost and 127.0.0.1) and tokens required, after bootstrapping an admin token.
    /// `client_certificates`: also require client certificates (`--tls-client-ca`).
    pub async fn start_secure(
        database_url: &str,
        args: &[&str],
        client_certificates: bool,
    ) -> CoordinatorProcess {
        let logdir = tempfile::tempdir().expect("temp dir for the coordinator");
        let cert_dir = logdir.path().join("certs");
        let out = cert_dir.to_string_lossy().into_owned();
        coordinator_command(&["certs", "--out", &out]);
        let admin_token = coordinator_command(&[
            "token",
            "create",
            "--database-url",
            database_url,
            "--role",
            "admin",
            "--name",
            "test-admin",
        ])
        .trim()
        .to_string();
        let path = |f: &str| cert_dir.join(f).to_string_lossy().into_owned();
        let mut all: Vec<String> = vec![
            "--tls-cert".into(),
            path("server.pem"),
            "--tls-key".into(),
            path("server-key.pem"),
        ];
        if client_certificates {
            all.extend(["--tls-client-ca".into(), path("ca.pem")]);
        }
        all.extend(args.iter().map(|a| a.to_string()));
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        let secure = Secure {
            cert_dir,
            admin_token,
            client_certificates,
        };
        CoordinatorProcess::launch_in(database_url, &refs, Some(secure), logdir).await
    }

    async fn launch(
        database_url: &str,
        args: &[&str],
        secure: Option<Secure>,
    ) -> CoordinatorProcess {
        let logdir = tempfile::tempdir().expect("temp dir for the coordinator log");
        CoordinatorProcess::launch_in(database_url, args, secure, logdir).await
    }

    async fn launch_in(
        database_url: &str,
        args: &[&str],
        secure: Option<Secure>,
        logdir: tempfile::TempDir,
    ) -> CoordinatorProcess {
        let mut c = CoordinatorProcess::new(database_url, args, secure, logdir);
        c.spawn().await;
        c
    }

    fn new(
        database_url: &str,
        args: &[&str],
        secure: Option<Secure>,
        logdir: tempfile::TempDir,
    ) -> CoordinatorProcess {
        CoordinatorProcess {
            database_url: database_url.to_string(),
            host: "127.0.0.1".to_string(),
            port: free_port(),
            child: None,
            log: logdir.path().join("coordinator.log"),
            args: args.iter().map(|a| a.to_string()).collect(),
            secure,
            _logdir: logdir,
        }
    }

    /// TLS and token settings, when started with [`start_secure`](Self::start_secure).
    pub fn secure(&self) -> Option<&Secure> {
        self.secure.as_ref()
    }

    /// The CA that signed the server certificate (`--ca` for clients), when TLS is on.
    pub fn ca(&self) -> Option<PathBuf> {
        self.secure.as_ref().map(|s| s.cert_dir.join("ca.pem"))
    }

    /// The admin token, when tokens are required.
    pub fn admin_token(&self) -> Option<&str> {
        self.secure.as_ref().map(|s| s.admin_token.as_str())
    }

    /// The TLS settings a client of this coordinator needs (none for plaintext).
    pub fn client_tls(&self) -> ClientTls {
        match &self.secure {
            None => ClientTls::default(),
            Some(s) => ClientTls {
                ca: Some(s.cert_dir.join("ca.pem")),
                cert: s.client_certificates.then(|| s.cert_dir.join("client.pem")),
                key: s
                    .client_certificates
                    .then(|| s.cert_dir.join("client-key.pem")),
            },
        }
    }

    /// A lazy channel that sends `token` (or none) with every request.
    pub fn channel_with_token(&self, token: Option<&str>) -> AuthChannel {
        let token = match token {
            Some(t) => BearerToken::new(t, "test token").expect("a valid token"),
            None => BearerToken::none(),
        };
        conn::connect_lazy(&self.url(), &self.client_tls(), token).expect("client channel")
    }

    /// Creates a token through TokenService with the admin token; returns (token, id).
    pub async fn create_token(&self, role: pb::TokenRole, name: &str) -> (String, String) {
        let resp = TokenServiceClient::new(self.channel_with_token(self.admin_token()))
            .create_token(pb::CreateTokenRequest {
                name: name.into(),
                role: role as i32,
                ..Default::default()
            })
            .await
            .expect("create token")
            .into_inner();
        let id = resp.info.map(|i| i.id).unwrap_or_default();
        (resp.token, id)
    }

    /// Writes `token` into a file in `dir` (for `--token-file`); returns its path.
    pub fn token_file(dir: &Path, name: &str, token: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, format!("{token}\n")).expect("write token file");
        p
    }

    async fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open the coordinator log");
        let child = Command::new(crate::binaries::path("segtrain-coordinator"))
            .arg("--listen")
            .arg(format!("{}:{}", self.host, self.port))
            .arg("--database-url")
            .arg(&self.database_url)
            .arg("--log-format")
            .arg("json")
            .args(&self.args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn segtrain-coordinator");
        self.child = Some(child);
        self.wait_serving().await;
    }

    async fn wait_serving(&mut self) {
        let (url, tls) = (self.url(), self.client_tls());
        let child = self.child.as_mut().expect("started");
        wait_until_serving(&url, &tls, child, &self.log, Duration::from_secs(30)).await;
    }

    /// `http://HOST:<port>`, or `https://HOST:<port>` with TLS (HOST: 127.0.0.1 unless started
    /// with [`start_on`](Self::start_on)).
    pub fn url(&self) -> String {
        let scheme = if self.secure.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}:{}", self.host, self.port)
    }

    /// The port it listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A connected channel (TLS when the coordinator serves TLS; no token).
    pub async fn channel(&self) -> Channel {
        conn::endpoint(&self.url(), &self.client_tls())
            .expect("valid endpoint")
            .connect()
            .await
            .expect("connect to the coordinator")
    }

    /// A JobService client on a fresh channel (the coordinator may have been restarted).
    pub async fn jobs(&self) -> JobServiceClient<Channel> {
        JobServiceClient::new(self.channel().await)
    }

    /// Submits `spec` (no idempotency key); the new job's id.
    pub async fn submit_spec(&self, spec: pb::JobSpec) -> String {
        self.submit(spec).await.id
    }

    /// Submits `spec` (no idempotency key); the new job as SubmitJob returns it.
    pub async fn submit(&self, spec: pb::JobSpec) -> pb::Job {
        submit_job(&mut self.jobs().await, spec).await
    }

    /// Every worker ListWorkers reports, by id (the cluster view the scheduling tests check).
    pub async fn list_workers(&self) -> HashMap<String, pb::Worker> {
        ClusterServiceClient::new(self.channel().await)
            .list_workers(pb::ListWorkersRequest::default())
            .await
            .expect("list workers")
            .into_inner()
            .workers
            .into_iter()
            .map(|w| (w.id.clone(), w))
            .collect()
    }

    /// Cancels job `id` with `reason`; the job as CancelJob returns it.
    pub async fn cancel(&self, id: &str, reason: &str) -> pb::Job {
        self.jobs()
            .await
            .cancel_job(pb::CancelJobRequest {
                job_id: id.to_string(),
                reason: reason.to_string(),
            })
            .await
            .expect("cancel")
            .into_inner()
            .job
            .expect("job")
    }

    /// WatchJob from the first event, on a fresh channel.
    pub async fn watch(&self, id: &str) -> tonic::Streaming<pb::JobEvent> {
        watch_job(&mut self.jobs().await, id, 0).await
    }

    pub async fn get_job(&self, id: &str) -> pb::Job {
        get_job(&mut self.jobs().await, id).await
    }

    /// Every event of a job, oldest first: WatchJob from the start, until the stream ends (a
    /// terminal job) or is quiet for 10 s.
    pub async fn job_events(&self, id: &str) -> Vec<pb::JobEvent> {
        events_until_quiet(&mut self.watch(id).await, Duration::from_secs(10)).await
    }

    /// SIGKILL: no shutdown code runs, as in a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOP: the coordinator neither answers nor acts (its connections stay open, silent),
    /// until [`thaw`](Self::thaw).
    pub fn freeze(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// SIGCONT after [`freeze`](Self::freeze).
    pub fn thaw(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            // SAFETY: signalling our own child process by pid.
            unsafe {
                libc::kill(c.id() as i32, sig);
            }
        }
    }

    /// Starts the coordinator again on the same port and database.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for CoordinatorProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What a JobService client may run on: a plain [`Channel`] or an [`AuthChannel`] that sends a
/// token (the bounds of tonic's generated client).
pub trait JobTransport:
    tonic::client::GrpcService<tonic::body::Body, Error: Into<StdError>, ResponseBody = Self::Body>
{
    type Body: Body<Data = Bytes, Error: Into<StdError> + Send> + Send + 'static;
}

impl<T, B> JobTransport for T
where
    T: tonic::client::GrpcService<tonic::body::Body, ResponseBody = B>,
    T::Error: Into<StdError>,
    B: Body<Data = Bytes, Error: Into<StdError> + Send> + Send + 'static,
{
    type Body = B;
}

/// Asserts that a call failed with `code` and a message naming `needle`; the status, for more
/// checks. The one way the API tests check a refusal.
pub fn assert_code<T: std::fmt::Debug>(
    r: Result<T, tonic::Status>,
    code: tonic::Code,
    needle: &str,
) -> tonic::Status {
    let e = r.expect_err("the call should fail");
    assert_eq!(e.code(), code, "{}", e.message());
    assert!(
        e.message().contains(needle),
        "{needle:?} not in {:?}",
        e.message()
    );
    e
}

/// Waits until the coordinator `child` serves JobService at `url`; fails the test, with the
/// coordinator's log, if it exits first or `timeout` passes.
pub async fn wait_until_serving(
    url: &str,
    tls: &ClientTls,
    child: &mut Child,
    log: &Path,
    timeout: Duration,
) {
    let log = || std::fs::read_to_string(log).unwrap_or_default();
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the coordinator exited with {status}; log:\n{}", log());
        }
        if job_service_serving(url, tls).await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the coordinator is not serving after {timeout:?}; log:\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether a coordinator at `url` answers its health service with JobService SERVING (false
/// while it cannot be reached): the readiness check of every coordinator a test starts.
pub async fn job_service_serving(url: &str, tls: &ClientTls) -> bool {
    let Ok(ch) = conn::endpoint(url, tls)
        .expect("valid endpoint")
        .connect()
        .await
    else {
        return false;
    };
    let resp = HealthClient::new(ch)
        .check(HealthCheckRequest {
            service: "segtrain.v1.JobService".into(),
        })
        .await;
    resp.is_ok_and(|r| r.get_ref().status == ServingStatus::Serving as i32)
}

/// A job spec that nothing runs (fake workers only report on it): a Cityscapes path, 1000
/// iterations, `world_size` ranks. The one shape the scheduling and API tests submit.
pub fn queued_spec(name: &str, world_size: u32) -> pb::JobSpec {
    pb::JobSpec {
        name: Some(name.into()),
        dataset_root: Some("/data/cityscapes".into()),
        world_size: Some(world_size),
        max_iters: Some(1000),
        warmup_iters: Some(10),
        ..Default::default()
    }
}

/// The checkpoint root of [`queued_spec`] (the spec's default).
pub const DEFAULT_CHECKPOINT_ROOT: &str = "/var/lib/segtrain/checkpoints";

/// Where a trainer of `attempt` of a [`queued_spec`] job writes the checkpoint `name`: its own
/// job's directory, the only place the coordinator accepts a checkpoint from.
pub fn checkpoint_uri(job_id: &str, attempt: u32, name: &str) -> String {
    format!("{DEFAULT_CHECKPOINT_ROOT}/{job_id}/attempt-{attempt}/{name}")
}

/// GetMetrics through `client`: the points named `names` (every name when empty) from
/// `since_iteration` on, without a limit. One request shape for the tests that read metrics.
pub async fn metric_points<T: JobTransport>(
    client: &mut JobServiceClient<T>,
    job_id: &str,
    names: &[&str],
    since_iteration: u64,
) -> Vec<pb::MetricPoint> {
    client
        .get_metrics(pb::GetMetricsRequest {
            job_id: job_id.to_string(),
            names: names.iter().map(|n| n.to_string()).collect(),
            since_iteration,
            limit: 0,
        })
        .await
        .expect("metrics")
        .into_inner()
        .points
}

/// Submits `spec` through `client` (no idempotency key); the new job. One request shape for the
/// tests that submit through a client of their own (a token, a second coordinator).
pub async fn submit_job<T: JobTransport>(
    client: &mut JobServiceClient<T>,
    spec: pb::JobSpec,
) -> pb::Job {
    client
        .submit_job(pb::SubmitJobRequest {
            spec: Some(spec),
            idempotency_key: String::new(),
        })
        .await
        .expect("submit")
        .into_inner()
        .job
        .expect("job")
}

/// GetJob through `client` (one that sends a token, or a test's own).
pub async fn get_job<T: JobTransport>(client: &mut JobServiceClient<T>, job_id: &str) -> pb::Job {
    client
        .get_job(pb::GetJobRequest {
            job_id: job_id.to_string(),
        })
        .await
        .expect("get")
        .into_inner()
}

/// WatchJob through `client` for the events after `after_event_id` (0: from the first).
pub async fn watch_job<T: JobTransport>(
    client: &mut JobServiceClient<T>,
    job_id: &str,
    after_event_id: u64,
) -> tonic::Streaming<pb::JobEvent> {
    client
        .watch_job(pb::WatchJobRequest {
            job_id: job_id.to_string(),
            after_event_id,
        })
        .await
        .expect("watch")
        .into_inner()
}

/// Reads a watch until it ends (the job is terminal). Panics when the watch fails or stays quiet
/// for `quiet`, with the events so far and `logs()` (the processes' logs, to see why).
pub async fn events_until_end(
    stream: &mut tonic::Streaming<pb::JobEvent>,
    quiet: Duration,
    logs: impl Fn() -> String,
) -> Vec<pb::JobEvent> {
    let mut events = Vec::new();
    loop {
        match tokio::time::timeout(quiet, stream.message()).await {
            Ok(Ok(Some(ev))) => events.push(ev),
            Ok(Ok(None)) => return events,
            Ok(Err(e)) => panic!("watch failed: {e}"),
            Err(_) => panic!(
                "no event for {quiet:?}; events so far: {events:#?}\n{}",
                logs()
            ),
        }
    }
}

/// What a watch delivers until it ends or stays quiet for `quiet` (a non-terminal job's watch
/// stays open: this reads what is there).
pub async fn events_until_quiet(
    stream: &mut tonic::Streaming<pb::JobEvent>,
    quiet: Duration,
) -> Vec<pb::JobEvent> {
    let mut out = Vec::new();
    while let Ok(Ok(Some(ev))) = tokio::time::timeout(quiet, stream.message()).await {
        out.push(ev);
    }
    out
}

/// The texts of a job's notes, oldest first (what the coordinator says it dropped or did).
pub fn notes(events: &[pb::JobEvent]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match &e.payload {
            Some(pb::job_event::Payload::Note(n)) => Some(n.text.clone()),
            _ => None,
        })
        .collect()
}

/// A job event in one line (`state JOB_STATE_QUEUED`, `metrics 50`, `note ...`), so that tests
/// can compare event sequences as plain lists.
pub fn describe_event(ev: &pb::JobEvent) -> String {
    use pb::job_event::Payload as P;
    match &ev.payload {
        Some(P::StateChange(c)) => format!(
            "state {}",
            pb::JobState::try_from(c.to)
                .map(|s| s.as_str_name())
                .unwrap_or("?")
        ),
        Some(P::Metrics(m)) => format!("metrics {}", m.iteration),
        Some(P::Eval(e)) => format!("eval {}", e.iteration),
        Some(P::Checkpoint(c)) => format!(
            "checkpoint {}",
            c.checkpoint.as_ref().map(|c| c.iteration).unwrap_or(0)
        ),
        Some(P::Note(n)) => format!("note {}", n.text),
        other => format!("{other:?}"),
    }
}

/// A fresh daemon instance id, as a daemon makes one at its start.
pub fn new_instance() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// How long a [`FakeWorker`] waits for an expected assignment message.
pub const MESSAGE_TIMEOUT: Duration = Duration::from_secs(20);

/// A worker daemon played by a test: registers, reads its assignment stream, reports numbered
/// events, heartbeats. Nothing runs in the background: leases last as long as the coordinator's
/// `--lease-seconds` unless the test heartbeats.
pub struct FakeWorker {
    pub id: String,
    /// The daemon instance this fake plays and the secret the coordinator gave it (every
    /// request carries both).
    pub instance: String,
    pub secret: String,
    pub host: String,
    pub gpu_index: i32,
    pub client: WorkerServiceClient<AuthChannel>,
    /// The sequence number of the last event made by [`event`](Self::event).
    pub seq: u64,
    stream: Option<tonic::Streaming<pb::AssignmentMessage>>,
}

impl FakeWorker {
    /// Registers (host, gpu_index) and opens its assignment stream.
    pub async fn register(coord: &CoordinatorProcess, host: &str, gpu_index: i32) -> FakeWorker {
        FakeWorker::register_after(coord, None, host, gpu_index, None).await
    }

    /// [`register`](Self::register) with a worker token (a coordinator that requires tokens).
    pub async fn register_with_token(
        coord: &CoordinatorProcess,
        token: &str,
        host: &str,
        gpu_index: i32,
    ) -> FakeWorker {
        FakeWorker::register_after(coord, Some(token), host, gpu_index, None).await
    }

    /// A restart of this daemon: a new instance, succeeding this one (as a real daemon proves
    /// through its work dir: the id and secret the previous one recorded).
    pub async fn restarted(&self, coord: &CoordinatorProcess) -> FakeWorker {
        let previous = (self.instance.as_str(), self.secret.as_str());
        FakeWorker::register_after(coord, None, &self.host, self.gpu_index, Some(previous)).await
    }

    async fn register_after(
        coord: &CoordinatorProcess,
        token: Option<&str>,
        host: &str,
        gpu_index: i32,
        previous: Option<(&str, &str)>,
    ) -> FakeWorker {
        let mut client = WorkerServiceClient::new(coord.channel_with_token(token));
        let instance = new_instance();
        let resp = client
            .register(pb::RegisterRequest {
                host: host.into(),
                gpu_index,
                gpu_name: "Fake GPU".into(),
                gpu_memory_bytes: 80 << 30,
                running: vec![],
                instance_id: instance.clone(),
                previous_instance_id: previous.map(|p| p.0).unwrap_or_default().to_string(),
                previous_instance_secret: previous.map(|p| p.1).unwrap_or_default().to_string(),
                ..Default::default()
            })
            .await
            .expect("register")
            .into_inner();
        let mut w = FakeWorker {
            id: resp.worker_id,
            instance,
            secret: resp.instance_secret,
            host: host.into(),
            gpu_index,
            client,
            seq: resp.acked_seq,
            stream: None,
        };
        w.open_stream().await;
        w
    }

    /// (Re)opens the assignment stream.
    pub async fn open_stream(&mut self) {
        let s = self
            .client
            .await_assignment(pb::AwaitAssignmentRequest {
                worker_id: self.id.clone(),
                instance_id: self.instance.clone(),
                instance_secret: self.secret.clone(),
            })
            .await
            .expect("await_assignment")
            .into_inner();
        self.stream = Some(s);
    }

    /// Takes the open assignment stream away (e.g. to open a second one and watch the first).
    pub fn take_stream(&mut self) -> Option<tonic::Streaming<pb::AssignmentMessage>> {
        self.stream.take()
    }

    /// The next message on the stream within `timeout`, or `None`.
    pub async fn try_message(&mut self, timeout: Duration) -> Option<pb::AssignmentMessage> {
        let s = self.stream.as_mut().expect("stream open");
        match tokio::time::timeout(timeout, s.message()).await {
            Ok(Ok(Some(m))) => Some(m),
            Ok(Ok(None)) => panic!("assignment stream of {} ended", self.id),
            Ok(Err(e)) => panic!("assignment stream of {} failed: {e}", self.id),
            Err(_) => None,
        }
    }

    /// The next message; panics after [`MESSAGE_TIMEOUT`].
    pub async fn message(&mut self) -> pb::AssignmentMessage {
        match self.try_message(MESSAGE_TIMEOUT).await {
            Some(m) => m,
            None => panic!(
                "worker {}:{} got no assignment message within {:?}",
                self.host, self.gpu_index, MESSAGE_TIMEOUT
            ),
        }
    }

    /// The next message, which must be a `start`.
    pub async fn start(&mut self) -> pb::Assignment {
        match self.message().await.kind {
            Some(pb::assignment_message::Kind::Start(a)) => a,
            other => panic!("expected a start, got {other:?}"),
        }
    }

    /// The next message, which must be a `stop`.
    pub async fn stop(&mut self) -> pb::StopAssignment {
        match self.message().await.kind {
            Some(pb::assignment_message::Kind::Stop(s)) => s,
            other => panic!("expected a stop, got {other:?}"),
        }
    }

    /// A numbered event about one rank (the next sequence number).
    pub fn event(
        &mut self,
        job_id: &str,
        attempt: u32,
        rank: u32,
        payload: pb::worker_event::Payload,
    ) -> pb::WorkerEvent {
        self.seq += 1;
        pb::WorkerEvent {
            seq: self.seq,
            job_id: job_id.into(),
            attempt,
            rank,
            time: None,
            payload: Some(payload),
        }
    }

    pub async fn report(
        &mut self,
        events: Vec<pb::WorkerEvent>,
    ) -> Result<pb::ReportEventsResponse, tonic::Status> {
        self.client
            .report_events(pb::ReportEventsRequest {
                worker_id: self.id.clone(),
                events,
                instance_id: self.instance.clone(),
                instance_secret: self.secret.clone(),
            })
            .await
            .map(|r| r.into_inner())
    }

    /// Reports `started` for an assignment.
    pub async fn started(&mut self, a: &pb::Assignment) {
        let ev = self.event(
            &a.job_id,
            a.attempt,
            a.rank,
            pb::worker_event::Payload::Started(pb::RankStarted {}),
        );
        self.report(vec![ev]).await.expect("report started");
    }

    /// Reports `finished` with `outcome` for (job, attempt, rank).
    pub async fn finished(
        &mut self,
        job_id: &str,
        attempt: u32,
        rank: u32,
        outcome: pb::RankOutcome,
    ) {
        let ev = self.event(
            job_id,
            attempt,
            rank,
            pb::worker_event::Payload::Finished(pb::RankFinished {
                outcome: outcome as i32,
                reason: format!("test says {}", outcome.as_str_name()),
            }),
        );
        self.report(vec![ev]).await.expect("report finished");
    }

    /// Heartbeats with the ranks it runs; the coordinator's answer (stops, lease).
    pub async fn heartbeat(&mut self, running: Vec<pb::AttemptRank>) -> pb::HeartbeatResponse {
        let (worker_id, instance_id) = (self.id.clone(), self.instance.clone());
        let req = pb::HeartbeatRequest {
            worker_id,
            running,
            instance_id,
            leaving: false,
            instance_secret: self.secret.clone(),
        };
        self.client
            .heartbeat(req)
            .await
            .expect("heartbeat")
            .into_inner()
    }
}
