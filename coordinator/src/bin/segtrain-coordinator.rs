//! `segtrain-coordinator`: the gRPC service that owns jobs and their record in PostgreSQL.

use clap::Parser;
use segtrain_coordinator::logging::{self, LogFormat};
use segtrain_coordinator::server::{serve, ServerConfig};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(
    name = "segtrain-coordinator",
    version,
    about = "The segtrain coordinator: job API, scheduler and PostgreSQL record"
)]
struct Args {
    /// Address to serve gRPC on (job API, worker API, reflection and health).
    #[arg(long, env = "SEGTRAIN_LISTEN", default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    /// PostgreSQL URL, e.g. postgres://segtrain@localhost/segtrain.
    #[arg(long, env = "SEGTRAIN_DATABASE_URL")]
    database_url: String,
    /// Give up if PostgreSQL is unreachable at start for this many seconds (0: retry forever).
    #[arg(long, env = "SEGTRAIN_DB_CONNECT_TIMEOUT", default_value_t = 0)]
    db_connect_timeout: u64,
    /// Worker lease, seconds: a worker that has not heartbeat for this long is declared lost and
    /// its attempt fails. Daemons heartbeat well within it.
    #[arg(long, env = "SEGTRAIN_LEASE_SECONDS", default_value_t = 15,
          value_parser = clap::value_parser!(u32).range(1..=3600))]
    lease_seconds: u32,
    /// Seconds a trainer gets to checkpoint and exit after it is told to stop.
    #[arg(long, env = "SEGTRAIN_STOP_GRACE_SECONDS", default_value_t = 30,
          value_parser = clap::value_parser!(u32).range(0..=3600))]
    stop_grace_seconds: u32,
    /// The scheduler runs at least this often, milliseconds (NOTIFY hints wake it sooner).
    #[arg(long, env = "SEGTRAIN_SCHEDULER_INTERVAL_MS", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(10..=60000))]
    scheduler_interval_ms: u64,
    /// Assignment streams and rendezvous waits re-read at least this often, milliseconds.
    #[arg(long, env = "SEGTRAIN_POLL_INTERVAL_MS", default_value_t = 2000,
          value_parser = clap::value_parser!(u64).range(10..=60000))]
    poll_interval_ms: u64,
    /// Wait before restarting a job after an infrastructure failure, milliseconds; doubles with
    /// every restart of the job, up to --restart-backoff-max-ms.
    #[arg(long, env = "SEGTRAIN_RESTART_BACKOFF_MS", default_value_t = 5000,
          value_parser = clap::value_parser!(u64).range(0..=3_600_000))]
    restart_backoff_ms: u64,
    /// The longest wait between restarts, milliseconds.
    #[arg(long, env = "SEGTRAIN_RESTART_BACKOFF_MAX_MS", default_value_t = 300_000,
          value_parser = clap::value_parser!(u64).range(0..=86_400_000))]
    restart_backoff_max_ms: u64,
    #[arg(long, env = "SEGTRAIN_LOG_FORMAT", value_enum, default_value_t = LogFormat::Auto)]
    log_format: LogFormat,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    logging::init(args.log_format);
    let mut cfg = ServerConfig::new(args.listen, args.database_url);
    cfg.connect_timeout =
        (args.db_connect_timeout > 0).then(|| Duration::from_secs(args.db_connect_timeout));
    cfg.workers.lease = Duration::from_secs(u64::from(args.lease_seconds));
    cfg.workers.stop_grace_seconds = args.stop_grace_seconds;
    cfg.workers.poll = Duration::from_millis(args.poll_interval_ms);
    cfg.scheduler.interval = Duration::from_millis(args.scheduler_interval_ms);
    cfg.restart.base = Duration::from_millis(args.restart_backoff_ms);
    cfg.restart.max =
        Duration::from_millis(args.restart_backoff_max_ms.max(args.restart_backoff_ms));
    match serve(cfg, shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "coordinator failed");
            eprintln!("segtrain-coordinator: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// SIGINT or SIGTERM (systemd's stop).
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
}
