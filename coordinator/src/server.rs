//! Assembles the coordinator: database, migrations, the scheduler task, gRPC services (job,
//! cluster, worker and token APIs), reflection and health, behind TLS and the bearer-token
//! [`AuthLayer`], with explicit message size limits; and, with `--metrics-listen`, Prometheus
//! metrics over plain HTTP ([`crate::metrics`]).

use crate::api::{ClusterApi, JobApi, TeamApi, TokenApi, Watchers, WorkerApi, WorkerApiConfig};
use crate::auth::{AuthLayer, Verifier};
use crate::limits::{BodyDeadlineLayer, Limits, WatchQuota, HANDSHAKE_TIMEOUT};
use crate::metrics;
use crate::scheduler::{self, SchedulerConfig};
use crate::store::bus::Bus;
use crate::store::{PoolSettings, RestartPolicy, Store, StoreError};
use crate::web;
use segtrain_proto::client::{read_pem, MAX_REQUEST_BYTES, MAX_RESPONSE_BYTES};
use segtrain_proto::v1 as pb;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

/// The coordinator's TLS files (PEM).
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// `--tls-cert`: the server certificate (chain).
    pub cert: PathBuf,
    /// `--tls-key`: its private key.
    pub key: PathBuf,
    /// `--tls-client-ca`: when set, clients must present a certificate signed by this CA.
    pub client_ca: Option<PathBuf>,
}

/// Transport security and authentication. The safe settings are the default; the two
/// relaxations are accepted only on a loopback listen address.
#[derive(Debug, Clone)]
pub struct Security {
    /// `None`: plaintext (`--plaintext`).
    pub tls: Option<TlsFiles>,
    /// `false`: no bearer tokens needed (`--insecure-no-auth`).
    pub auth: bool,
}

impl Security {
    /// Refuses plaintext or no authentication on an address other machines can reach; `flag`
    /// names the listen address in the error (`--listen`, `--web-listen`).
    pub fn check(&self, flag: &str, listen: SocketAddr) -> anyhow::Result<()> {
        let loopback = listen.ip().is_loopback();
        if self.tls.is_none() && !loopback {
            anyhow::bail!(
                "--plaintext is accepted only with a loopback {flag} address (127.0.0.1 or [::1]), \
                 got {listen}; serve TLS instead with --tls-cert PATH --tls-key PATH \
                 (`segtrain-coordinator certs` makes a private CA and a server certificate)"
            );
        }
        if !self.auth && !loopback {
            anyhow::bail!(
                "--insecure-no-auth is accepted only with a loopback {flag} address (127.0.0.1 or [::1]), \
                 got {listen}; create tokens instead (`segtrain-coordinator token create --role admin`)"
            );
        }
        Ok(())
    }

    /// Reads the TLS files (errors name the flag and the path).
    fn tls_config(&self) -> anyhow::Result<Option<ServerTlsConfig>> {
        let Some(t) = &self.tls else {
            return Ok(None);
        };
        let cert = read_pem("--tls-cert", &t.cert, "CERTIFICATE")?;
        let key = read_pem("--tls-key", &t.key, "PRIVATE KEY")?;
        let mut cfg = ServerTlsConfig::new()
            .identity(Identity::from_pem(cert, key))
            .timeout(HANDSHAKE_TIMEOUT);
        if let Some(ca) = &t.client_ca {
            cfg = cfg.client_ca_root(Certificate::from_pem(read_pem(
                "--tls-client-ca",
                ca,
                "CERTIFICATE",
            )?));
        }
        Ok(Some(cfg))
    }
}

/// How the coordinator is run.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub database_url: String,
    /// Give up connecting to PostgreSQL at start after this long (`None`: retry forever).
    pub connect_timeout: Option<Duration>,
    /// The connection pool RPCs and the scheduler share.
    pub pool: PoolSettings,
    /// Worker leases, stop grace, stream poll interval.
    pub workers: WorkerApiConfig,
    pub scheduler: SchedulerConfig,
    /// Backoff between a failed attempt and the next.
    pub restart: RestartPolicy,
    pub security: Security,
    /// `--metrics-listen`: serve Prometheus metrics on `http://ADDR/metrics` (plain HTTP).
    pub metrics_listen: Option<SocketAddr>,
    /// How often the metrics read from PostgreSQL are refreshed.
    pub metrics_refresh: Duration,
    /// `--web-listen`: serve the dashboard (crate::web), with the same TLS and tokens as gRPC.
    pub web_listen: Option<SocketAddr>,
    /// What one client may hold (streams, WatchJobs per token, request bodies).
    pub limits: Limits,
}

impl ServerConfig {
    /// A configuration with the default worker and scheduler settings, plaintext, with
    /// authentication; set [`security`](Self::security) for TLS.
    pub fn new(listen: SocketAddr, database_url: impl Into<String>) -> ServerConfig {
        ServerConfig {
            listen,
            database_url: database_url.into(),
            connect_timeout: None,
            pool: PoolSettings::default(),
            workers: WorkerApiConfig::default(),
            scheduler: SchedulerConfig::default(),
            restart: RestartPolicy::default(),
            security: Security {
                tls: None,
                auth: true,
            },
            metrics_listen: None,
            metrics_refresh: Duration::from_secs(2),
            web_listen: None,
            limits: Limits::default(),
        }
    }
}

/// Connects to PostgreSQL, retrying with backoff: a coordinator started before its database (a
/// common boot order under systemd) waits for it instead of crash-looping.
pub async fn connect_store(cfg: &ServerConfig) -> anyhow::Result<Store> {
    let start = tokio::time::Instant::now();
    let mut delay = Duration::from_millis(200);
    loop {
        match Store::connect_with(&cfg.database_url, cfg.pool).await {
            Ok(store) => return Ok(store),
            Err(StoreError::Db(sqlx::Error::Configuration(e))) => {
                anyhow::bail!("database URL is invalid: {e}")
            }
            Err(e) => {
                if cfg.connect_timeout.is_some_and(|t| start.elapsed() >= t) {
                    anyhow::bail!("could not connect to PostgreSQL: {e}");
                }
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "PostgreSQL not reachable yet");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Runs the coordinator until `shutdown` resolves.
pub async fn serve(cfg: ServerConfig, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    // Configuration mistakes first, before waiting for a database.
    cfg.security.check("--listen", cfg.listen)?;
    let tls = cfg.security.tls_config()?;
    let web_tls = match (cfg.web_listen, &cfg.security.tls) {
        (Some(addr), tls_files) => {
            cfg.security.check("--web-listen", addr)?;
            tls_files.as_ref().map(web::web_tls_config).transpose()?
        }
        (None, _) => None,
    };
    // The metrics endpoint answers from the start, also while PostgreSQL is not reachable yet
    // (`segtrain_database_up 0`).
    let metrics_server = match cfg.metrics_listen {
        Some(addr) => {
            let listener = segtrain_telemetry::metrics_http::bind(addr).await?;
            tracing::info!(addr = %listener.local_addr()?, "serving Prometheus metrics on /metrics (plain HTTP)");
            Some(tokio::spawn(metrics::serve(listener)))
        }
        None => None,
    };
    let store = connect_store(&cfg).await?.with_restart_policy(cfg.restart);
    store.migrate().await?;
    tracing::info!("database schema is up to date");
    let metrics_refresh = metrics_server
        .is_some()
        .then(|| tokio::spawn(metrics::refresh_loop(store.clone(), cfg.metrics_refresh)));

    let bus = Bus::start(&store);
    let scheduler = scheduler::start(
        store.clone(),
        &bus,
        cfg.scheduler.clone(),
        cfg.workers.lease,
    );
    let (health, health_service) = tonic_health::server::health_reporter();
    for name in SERVICES {
        health
            .set_service_status(name, tonic_health::ServingStatus::Serving)
            .await;
    }
    let verifier = cfg.security.auth.then(|| Verifier::new(store.clone()));
    let db_watch = tokio::spawn(watch_database(store.clone(), health.clone()));

    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", cfg.listen))?;
    let addr = listener.local_addr()?;
    tracing::info!(
        %addr,
        tls = tls.is_some(),
        client_certificates = cfg.security.tls.as_ref().is_some_and(|t| t.client_ca.is_some()),
        auth = cfg.security.auth,
        "coordinator serving"
    );
    if tls.is_none() {
        tracing::warn!("serving plaintext (--plaintext): for this machine only");
    }
    if !cfg.security.auth {
        tracing::warn!("authentication is off (--insecure-no-auth): for this machine only");
    }

    // Every service gets the same explicit limits: requests up to MAX_REQUEST_BYTES (a larger one
    // is refused with OUT_OF_RANGE and the connection keeps serving), responses up to
    // MAX_RESPONSE_BYTES.
    macro_rules! limited {
        ($svc:expr) => {
            $svc.max_decoding_message_size(MAX_REQUEST_BYTES)
                .max_encoding_message_size(MAX_RESPONSE_BYTES)
        };
    }
    let (stopping_tx, stopping_rx) = tokio::sync::oneshot::channel::<()>();
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls).map_err(|e| {
            anyhow::anyhow!(
                "--tls-cert / --tls-key: cannot use them as the server identity: {e} \
                 (is the key the certificate's? is the certificate PEM?)"
            )
        })?;
    }
    // One WatchJob quota for gRPC and the dashboard.
    let watchers = Watchers {
        bus: bus.clone(),
        poll: cfg.workers.poll,
        quota: WatchQuota::new(cfg.limits.watch_streams_per_token),
    };
    let web_server = match cfg.web_listen {
        Some(addr) => {
            let listener = web::bind(addr).await?;
            let scheme = if web_tls.is_some() { "https" } else { "http" };
            tracing::info!(url = %format!("{scheme}://{}/", listener.local_addr()?), "serving the dashboard");
            let site = web::Web::new(
                JobApi::new(store.clone(), watchers.clone()),
                ClusterApi::new(store.clone()),
                verifier.clone(),
            );
            Some(tokio::spawn(web::serve(listener, web_tls, site)))
        }
        None => None,
    };
    let serving = builder
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .tcp_keepalive(Some(Duration::from_secs(30)))
        .max_concurrent_streams(cfg.limits.streams_per_connection)
        .layer(AuthLayer::new(verifier.clone()))
        .layer(BodyDeadlineLayer {
            limit: cfg.limits.request_body,
        })
        .add_service(limited!(health_service))
        .add_service(limited!(reflection_v1))
        .add_service(limited!(reflection_v1alpha))
        .add_service(limited!(pb::job_service_server::JobServiceServer::new(
            JobApi::new(store.clone(), watchers)
        )))
        .add_service(limited!(
            pb::cluster_service_server::ClusterServiceServer::new(ClusterApi::new(store.clone()))
        ))
        .add_service(limited!(
            pb::worker_service_server::WorkerServiceServer::new(WorkerApi::new(
                store.clone(),
                bus,
                cfg.workers.clone()
            ))
        ))
        .add_service(limited!(pb::token_service_server::TokenServiceServer::new(
            TokenApi::new(store.clone(), verifier)
        )))
        .add_service(limited!(pb::team_service_server::TeamServiceServer::new(
            TeamApi::new(store.clone())
        )))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown_then_drain(shutdown, stopping_tx),
        );
    // Graceful shutdown waits for open calls, but streams (daemons' assignments, WatchJob) last
    // until their clients go: after SHUTDOWN_DRAIN they are cut, and clients reconnect to the
    // next coordinator and resume (systemd's TimeoutStopSec is longer).
    tokio::select! {
        r = serving => r?,
        () = async {
            if stopping_rx.await.is_ok() {
                tokio::time::sleep(SHUTDOWN_DRAIN).await;
            } else {
                std::future::pending::<()>().await;
            }
        } => tracing::info!("open streams cut after {SHUTDOWN_DRAIN:?}"),
    }
    scheduler.abort();
    db_watch.abort();
    for task in [metrics_server, metrics_refresh].into_iter().flatten() {
        task.abort();
    }
    if let Some(task) = web_server {
        task.abort();
    }
    store.close().await;
    tracing::info!("coordinator stopped");
    Ok(())
}

/// How long a stopping coordinator lets open calls and streams finish before it cuts them.
const SHUTDOWN_DRAIN: Duration = Duration::from_secs(5);

/// `shutdown`, then a note on `stopping` that the drain period has begun.
async fn shutdown_then_drain(
    shutdown: impl Future<Output = ()>,
    stopping: tokio::sync::oneshot::Sender<()>,
) {
    shutdown.await;
    let _ = stopping.send(());
}

/// The segtrain services health reports on (besides the whole server, "").
const SERVICES: [&str; 5] = [
    <pb::job_service_server::JobServiceServer<JobApi> as tonic::server::NamedService>::NAME,
    <pb::cluster_service_server::ClusterServiceServer<ClusterApi> as tonic::server::NamedService>::NAME,
    <pb::worker_service_server::WorkerServiceServer<WorkerApi> as tonic::server::NamedService>::NAME,
    <pb::token_service_server::TokenServiceServer<TokenApi> as tonic::server::NamedService>::NAME,
    <pb::team_service_server::TeamServiceServer<TeamApi> as tonic::server::NamedService>::NAME,
];

/// Probes PostgreSQL every second over a side connection (never behind RPCs waiting for the
/// pool: a busy pool is not an outage). While it does not answer, health reports NOT_SERVING for
/// the whole server and every service (load balancers and daemons see the outage; RPCs meanwhile
/// fail with UNAVAILABLE and daemons keep their events until acknowledged); once it answers
/// again, SERVING. The pools reconnect by themselves.
async fn watch_database(store: Store, health: tonic_health::server::HealthReporter) {
    use tonic_health::ServingStatus;
    let mut up = true;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let ok = store.answers(Duration::from_secs(3)).await;
        if ok == up {
            continue;
        }
        up = ok;
        let status = if ok {
            tracing::info!("PostgreSQL answers again; serving");
            ServingStatus::Serving
        } else {
            tracing::warn!("PostgreSQL does not answer; health is NOT_SERVING until it does");
            ServingStatus::NotServing
        };
        for name in std::iter::once("").chain(SERVICES) {
            health.set_service_status(name, status).await;
        }
    }
}
