//! `segtrain-coordinator`: the gRPC service that owns jobs and their record in PostgreSQL.

use clap::Parser;
use segtrain_coordinator::logging::{self, LogFormat};
use segtrain_coordinator::server::{serve, ServerConfig};
use std::net::SocketAddr;
use std::process::ExitCode;

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
    #[arg(long, env = "SEGTRAIN_LOG_FORMAT", value_enum, default_value_t = LogFormat::Auto)]
    log_format: LogFormat,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    logging::init(args.log_format);
    let cfg = ServerConfig {
        listen: args.listen,
        database_url: args.database_url,
        connect_timeout: (args.db_connect_timeout > 0)
            .then(|| std::time::Duration::from_secs(args.db_connect_timeout)),
    };
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
