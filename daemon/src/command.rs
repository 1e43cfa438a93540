//! `segtrain-worker daemon`: its options, and the [`DaemonConfig`] they make.

use crate::DaemonConfig;
use anyhow::{bail, Context};
use segtrain_telemetry::logging::LogFormat;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct DaemonArgs {
    /// The coordinator's address: https://host:port (TLS) or http://host:port (plaintext, for a
    /// coordinator on this machine started with --plaintext). Several coordinators on one
    /// database: their addresses comma-separated; calls fail over to the next when one cannot
    /// be reached.
    #[arg(
        long,
        env = "SEGTRAIN_COORDINATOR",
        default_value = "http://127.0.0.1:50051"
    )]
    coordinator: String,
    /// The CA certificate (PEM) that signed the coordinator's certificate (default: the
    /// system's trusted roots).
    #[arg(long, env = "SEGTRAIN_CA")]
    ca: Option<PathBuf>,
    /// A file holding this daemon's worker token (or set SEGTRAIN_TOKEN to the token itself).
    #[arg(long, env = "SEGTRAIN_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// This daemon's client certificate (PEM), for a coordinator started with --tls-client-ca.
    #[arg(long, env = "SEGTRAIN_CLIENT_CERT", requires = "client_key")]
    client_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, env = "SEGTRAIN_CLIENT_KEY", requires = "client_cert")]
    client_key: Option<PathBuf>,
    /// The GPU this daemon owns (its trainers see only it), or `cpu` for a CPU worker (the
    /// same as --cpu, so that one systemd template `--gpu %i` serves GPU and CPU workers).
    #[arg(long, value_parser = parse_gpu, conflicts_with = "cpu", required_unless_present = "cpu")]
    gpu: Option<GpuChoice>,
    /// A CPU worker instead of a GPU one (tests, CPU-only hosts).
    #[arg(long)]
    cpu: bool,
    /// This host's name in the cluster (default: the hostname).
    #[arg(long, env = "SEGTRAIN_HOST")]
    host: Option<String>,
    /// The address other hosts reach this one on (rank 0's TCP collective listens there).
    #[arg(long, env = "SEGTRAIN_ADVERTISE_HOST", default_value = "127.0.0.1")]
    advertise_host: String,
    /// Job files and trainer logs.
    #[arg(
        long,
        env = "SEGTRAIN_WORK_DIR",
        default_value = "/var/lib/segtrain/work"
    )]
    work_dir: PathBuf,
    /// Seconds a stopped trainer gets to exit before it is killed (also on the daemon's own
    /// SIGTERM, e.g. `systemctl stop`: give the unit a longer TimeoutStopSec).
    #[arg(long, env = "SEGTRAIN_GRACE_SECONDS", default_value_t = 30)]
    grace_seconds: u64,
    /// libtorch CPU threads per trainer (default: all cores); give CPU workers sharing a host a
    /// share each.
    #[arg(long, env = "SEGTRAIN_TORCH_THREADS")]
    torch_threads: Option<u32>,
    /// The trainer program (default: this binary). Each rank runs `PROGRAM train --config FILE
    /// --json ...`; a wrapper (numactl, a profiler, a test stand-in) gets those arguments and
    /// runs `segtrain-worker train "$@"` itself.
    #[arg(long, env = "SEGTRAIN_TRAINER")]
    trainer: Option<PathBuf>,
    /// JSON log lines (default: as --log-format says).
    #[arg(long)]
    log_json: Option<bool>,
    /// Serve Prometheus metrics on http://ADDR/metrics, e.g. 0.0.0.0:9465 (default: off). Plain
    /// HTTP without authentication, for a scraper on an internal network: expose it only there.
    #[arg(long, env = "SEGTRAIN_METRICS_LISTEN")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Where to read the VM's preemption flag (GCP's metadata server by default; `TRUE` there
    /// stops the trainers with a checkpoint, like SIGTERM). Plain http:// only; an empty value
    /// turns it off. Off GCP the server is unreachable and SIGTERM alone counts.
    #[arg(long, env = "SEGTRAIN_PREEMPTION_URL", default_value = crate::preemption::GCP_PREEMPTED_URL)]
    preemption_url: String,
    /// auto (JSON when stderr is not a terminal, e.g. under systemd), json or pretty.
    #[arg(long, env = "SEGTRAIN_LOG_FORMAT", value_enum, default_value_t = LogFormat::Auto)]
    log_format: LogFormat,
}

/// `--gpu N` or `--gpu cpu`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GpuChoice {
    Index(u32),
    Cpu,
}

fn parse_gpu(s: &str) -> Result<GpuChoice, String> {
    match s.trim() {
        "cpu" => Ok(GpuChoice::Cpu),
        n => n
            .parse()
            .map(GpuChoice::Index)
            .map_err(|_| format!("expected a GPU index (0, 1, ...) or `cpu`, got {s:?}")),
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

/// Runs the daemon the options describe until SIGTERM or Ctrl-C. `gpu_name` names GPU `N`'s
/// model (the caller links CUDA; this crate does not).
pub fn run(args: DaemonArgs, gpu_name: &dyn Fn(u32) -> String) -> anyhow::Result<()> {
    segtrain_telemetry::logging::init(match args.log_json {
        Some(true) => LogFormat::Json,
        Some(false) => LogFormat::Pretty,
        None => args.log_format,
    });
    let gpu = match (args.cpu, args.gpu) {
        (true, _) | (false, Some(GpuChoice::Cpu)) => None,
        (false, Some(GpuChoice::Index(g))) => Some(g),
        (false, None) => bail!("give --gpu N, --gpu cpu or --cpu"),
    };
    let cfg = DaemonConfig {
        coordinator: args.coordinator,
        gpu,
        gpu_name: gpu.map_or_else(|| "cpu".to_string(), gpu_name),
        host: args.host.unwrap_or_else(hostname),
        advertise_host: args.advertise_host,
        work_dir: args.work_dir,
        exe: match args.trainer {
            Some(p) => p,
            None => std::env::current_exe().context("cannot find this binary's path")?,
        },
        grace: std::time::Duration::from_secs(args.grace_seconds),
        torch_threads: args.torch_threads,
        tls: segtrain_proto::client::ClientTls {
            ca: args.ca,
            cert: args.client_cert,
            key: args.client_key,
        },
        token: segtrain_proto::client::BearerToken::from_file_or_env(args.token_file.as_deref())?,
        metrics_listen: args.metrics_listen,
        preemption_url: match args.preemption_url.trim() {
            "" => None,
            url => Some(crate::preemption::parse_url(url).map_err(anyhow::Error::msg)?),
        },
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(crate::run(cfg, async {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }))
}
