//! Assembles the coordinator: database, migrations, the scheduler task, gRPC services (job,
//! cluster and worker APIs), reflection and health.

use crate::api::{ClusterApi, EventHub, JobApi, WorkerApi, WorkerApiConfig};
use crate::scheduler::{self, Hints, SchedulerConfig};
use crate::store::{RestartPolicy, Store, StoreError};
use segtrain_proto::v1 as pb;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

/// How the coordinator is run.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub database_url: String,
    /// Give up connecting to PostgreSQL at start after this long (`None`: retry forever).
    pub connect_timeout: Option<Duration>,
    /// Worker leases, stop grace, stream poll interval.
    pub workers: WorkerApiConfig,
    pub scheduler: SchedulerConfig,
    /// Backoff between a failed attempt and the next.
    pub restart: RestartPolicy,
}

impl ServerConfig {
    /// A configuration with the default worker and scheduler settings.
    pub fn new(listen: SocketAddr, database_url: impl Into<String>) -> ServerConfig {
        ServerConfig {
            listen,
            database_url: database_url.into(),
            connect_timeout: None,
            workers: WorkerApiConfig::default(),
            scheduler: SchedulerConfig::default(),
            restart: RestartPolicy::default(),
        }
    }
}

/// Connects to PostgreSQL, retrying with backoff: a coordinator started before its database (a
/// common boot order under systemd) waits for it instead of crash-looping.
pub async fn connect_store(cfg: &ServerConfig) -> anyhow::Result<Store> {
    let start = tokio::time::Instant::now();
    let mut delay = Duration::from_millis(200);
    loop {
        match Store::connect(&cfg.database_url).await {
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
    let store = connect_store(&cfg).await?.with_restart_policy(cfg.restart);
    store.migrate().await?;
    tracing::info!("database schema is up to date");

    let hub = EventHub::start(&store);
    let hints = Hints::start(&store);
    let scheduler = scheduler::start(
        store.clone(),
        &hints,
        cfg.scheduler.clone(),
        cfg.workers.lease,
    );
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<pb::job_service_server::JobServiceServer<JobApi>>()
        .await;
    health
        .set_serving::<pb::cluster_service_server::ClusterServiceServer<ClusterApi>>()
        .await;
    health
        .set_serving::<pb::worker_service_server::WorkerServiceServer<WorkerApi>>()
        .await;
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
    tracing::info!(%addr, "coordinator serving");

    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .tcp_keepalive(Some(Duration::from_secs(30)))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(pb::job_service_server::JobServiceServer::new(JobApi::new(
            store.clone(),
            hub,
        )))
        .add_service(pb::cluster_service_server::ClusterServiceServer::new(
            ClusterApi::new(store.clone()),
        ))
        .add_service(pb::worker_service_server::WorkerServiceServer::new(
            WorkerApi::new(store.clone(), hints, cfg.workers.clone()),
        ))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown,
        )
        .await?;
    scheduler.abort();
    db_watch.abort();
    store.pool().close().await;
    tracing::info!("coordinator stopped");
    Ok(())
}

/// Probes PostgreSQL every second. While it does not answer, health reports NOT_SERVING for the
/// whole server and every service (load balancers and daemons see the outage; RPCs meanwhile
/// fail with UNAVAILABLE and daemons keep their events until acknowledged); once it answers
/// again, SERVING. The pool reconnects by itself.
async fn watch_database(store: Store, health: tonic_health::server::HealthReporter) {
    use tonic_health::ServingStatus;
    let mut up = true;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let probe = tokio::time::timeout(
            Duration::from_secs(3),
            sqlx::query("SELECT 1").execute(store.pool()),
        )
        .await;
        let ok = matches!(probe, Ok(Ok(_)));
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
        health.set_service_status("", status).await;
        health
            .set_service_status(
                <pb::job_service_server::JobServiceServer<JobApi> as tonic::server::NamedService>::NAME,
                status,
            )
            .await;
        health
            .set_service_status(
                <pb::cluster_service_server::ClusterServiceServer<ClusterApi> as tonic::server::NamedService>::NAME,
                status,
            )
            .await;
        health
            .set_service_status(
                <pb::worker_service_server::WorkerServiceServer<WorkerApi> as tonic::server::NamedService>::NAME,
                status,
            )
            .await;
    }
}
