//! `segtrain-coordinator`: the gRPC service that owns jobs and their record in PostgreSQL.
//!
//! Without a subcommand it serves. `certs` makes a private CA and certificates for TLS; `token`
//! manages bearer tokens directly in the database (to bootstrap the first admin token, or to
//! regain access), without a running coordinator.

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use segtrain_coordinator::auth::{self, Role};
use segtrain_coordinator::limits::Limits;
use segtrain_coordinator::server::{serve, Security, ServerConfig, TlsFiles};
use segtrain_coordinator::store::{NewToken, Store, TokenRecord};
use segtrain_telemetry::logging::{self, LogFormat};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(
    name = "segtrain-coordinator",
    version,
    about = "The segtrain coordinator: job API, scheduler and PostgreSQL record",
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(flatten)]
    serve: ServeArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// Address to serve gRPC on (job API, worker API, token API, reflection and health).
    #[arg(long, env = "SEGTRAIN_LISTEN", default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    /// PostgreSQL URL, e.g. postgres://segtrain@localhost/segtrain.
    #[arg(long, env = "SEGTRAIN_DATABASE_URL", required = true)]
    database_url: Option<String>,
    /// Give up if PostgreSQL is unreachable at start for this many seconds (0: retry forever).
    #[arg(long, env = "SEGTRAIN_DB_CONNECT_TIMEOUT", default_value_t = 0)]
    db_connect_timeout: u64,
    /// PostgreSQL connections RPCs and the scheduler share (2 more are held apart: the LISTEN
    /// connection of the NOTIFY bus and the health probe). Keep the sum of all coordinators'
    /// pools + 2 each below the server's max_connections.
    #[arg(long, env = "SEGTRAIN_DATABASE_MAX_CONNECTIONS", default_value_t = 16,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    database_max_connections: u32,
    /// How long a request waits for a free connection, milliseconds; then it is refused with
    /// UNAVAILABLE ("all ... connections are busy"), which clients retry.
    #[arg(long, env = "SEGTRAIN_DATABASE_ACQUIRE_TIMEOUT_MS", default_value_t = 5000,
          value_parser = clap::value_parser!(u64).range(10..=600_000))]
    database_acquire_timeout_ms: u64,
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
    /// Rendezvous waits and WatchJob streams re-read at least this often, milliseconds, and
    /// assignment streams ten times as long apart (NOTIFY hints wake them sooner).
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
    /// The server certificate (PEM, with its chain), e.g. server.pem from `certs`.
    #[arg(long, env = "SEGTRAIN_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The server certificate's private key (PEM).
    #[arg(long, env = "SEGTRAIN_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Also require a client certificate signed by this CA (PEM) from every client (mutual TLS).
    #[arg(long, env = "SEGTRAIN_TLS_CLIENT_CA", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Serve without TLS. Accepted only with a loopback --listen address (local testing).
    #[arg(long, env = "SEGTRAIN_PLAINTEXT", conflicts_with_all = ["tls_cert", "tls_key"])]
    plaintext: bool,
    /// Accept requests without a bearer token. Accepted only with a loopback --listen address.
    #[arg(long, env = "SEGTRAIN_INSECURE_NO_AUTH")]
    insecure_no_auth: bool,
    /// Serve Prometheus metrics on http://ADDR/metrics, e.g. 0.0.0.0:9464 (default: off). Plain
    /// HTTP without authentication, for a scraper on an internal network: expose it only there.
    #[arg(long, env = "SEGTRAIN_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Serve the web dashboard on ADDR, e.g. 0.0.0.0:8443 (default: off): HTTPS with the
    /// --tls-cert certificate (and --tls-client-ca when set), or plain HTTP with --plaintext on
    /// a loopback address; sign in with a client or admin token, as for gRPC.
    #[arg(long, env = "SEGTRAIN_WEB_LISTEN")]
    web_listen: Option<SocketAddr>,
    /// How often the metrics read from PostgreSQL (jobs and workers by state, queue length,
    /// restarts) are refreshed, milliseconds.
    #[arg(long, env = "SEGTRAIN_METRICS_REFRESH_MS", default_value_t = 2000,
          value_parser = clap::value_parser!(u64).range(100..=300_000))]
    metrics_refresh_ms: u64,
    /// Concurrent HTTP/2 streams one gRPC connection may open (a daemon needs four).
    #[arg(long, env = "SEGTRAIN_MAX_STREAMS_PER_CONNECTION", default_value_t = Limits::default().streams_per_connection,
          value_parser = clap::value_parser!(u32).range(8..=100_000))]
    max_streams_per_connection: u32,
    /// Open WatchJob streams (and dashboard job pages) one token may hold at once.
    #[arg(long, env = "SEGTRAIN_MAX_WATCH_STREAMS_PER_TOKEN", default_value_t = Limits::default().watch_streams_per_token as u64,
          value_parser = clap::value_parser!(u64).range(1..=100_000))]
    max_watch_streams_per_token: u64,
    /// Seconds from a request's headers to the end of its body; a client still sending after
    /// that is cut off.
    #[arg(long, env = "SEGTRAIN_REQUEST_BODY_TIMEOUT_SECONDS", default_value_t = Limits::default().request_body.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    request_body_timeout_seconds: u64,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Write a private CA, a server certificate for the given hosts and a client certificate
    /// (ca.pem, ca-key.pem, server.pem, server-key.pem, client.pem, client-key.pem; keys mode 0600).
    Certs(CertsArgs),
    /// Manage bearer tokens directly in the database: bootstrap the first admin token, or regain
    /// access. With a running coordinator, prefer `segtrain token ...` (an admin token).
    #[command(subcommand)]
    Token(TokenCommand),
    /// Delete the events and metric points of jobs that finished before --older-than (a dry
    /// run unless --apply): the job, its attempts and checkpoints stay, with a note.
    Prune(PruneArgs),
}

#[derive(Args, Debug)]
struct PruneArgs {
    #[command(flatten)]
    db: DbArgs,
    /// How long ago a job must have finished: 90d, 12h, 30m (days, hours, minutes; at least 1h).
    #[arg(long, default_value = "90d")]
    older_than: String,
    /// Delete (without it: only print what would be deleted).
    #[arg(long)]
    apply: bool,
    /// Before deleting, write each job's events and points to DIR/<job id>.jsonl.
    #[arg(long, value_name = "DIR")]
    archive: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct CertsArgs {
    /// Directory to write into (created if needed).
    #[arg(long)]
    out: PathBuf,
    /// A DNS name or IP address the server certificate is valid for (repeatable; default
    /// localhost and 127.0.0.1). Clients must connect with one of them.
    #[arg(long = "host")]
    hosts: Vec<String>,
    /// Days the server and client certificates are valid (the CA: ten times as long).
    #[arg(long, default_value_t = 825, value_parser = clap::value_parser!(u32).range(1..=36500))]
    days: u32,
    /// Replace existing files.
    #[arg(long)]
    force: bool,
}

#[derive(Args, Debug)]
struct DbArgs {
    /// PostgreSQL URL (the coordinator's database).
    #[arg(long, env = "SEGTRAIN_DATABASE_URL")]
    database_url: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand, Debug)]
enum TokenCommand {
    /// Create a token and print it (once: only its hash is stored). Runs the migrations first.
    Create {
        #[command(flatten)]
        db: DbArgs,
        /// client (jobs and cluster), worker (worker daemons) or admin (everything, and tokens).
        #[arg(long)]
        role: String,
        /// A label for people, e.g. "ci" or "gpu-host-3".
        #[arg(long)]
        name: String,
        /// Bind a worker token to this host (the daemons' --host): it registers only that host's
        /// workers. Unbound tokens may register any host.
        #[arg(long)]
        host: Option<String>,
        /// Who the token speaks for (default: its --name).
        #[arg(long)]
        principal: Option<String>,
        /// Its team: a client token sees and acts on that team's jobs only.
        #[arg(long, default_value = segtrain_coordinator::auth::DEFAULT_TEAM)]
        team: String,
    },
    /// List tokens (never the secrets).
    List {
        #[command(flatten)]
        db: DbArgs,
        /// Include revoked tokens.
        #[arg(long)]
        all: bool,
    },
    /// Revoke a token by id (running coordinators stop accepting it within 5 seconds).
    Revoke {
        #[command(flatten)]
        db: DbArgs,
        id: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("segtrain-coordinator: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        None => runtime.block_on(run_server(cli.serve)),
        Some(Command::Certs(a)) => certs(a),
        Some(Command::Token(t)) => runtime.block_on(token(t)),
        Some(Command::Prune(p)) => runtime.block_on(prune(p)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "coordinator failed");
            eprintln!("segtrain-coordinator: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run_server(args: ServeArgs) -> anyhow::Result<()> {
    logging::init(args.log_format);
    let database_url = args
        .database_url
        .context("--database-url (or SEGTRAIN_DATABASE_URL) is required")?;
    let tls = match (args.tls_cert, args.tls_key, args.plaintext) {
        (Some(cert), Some(key), false) => Some(TlsFiles {
            cert,
            key,
            client_ca: args.tls_client_ca,
        }),
        (None, None, true) => None,
        (None, None, false) => anyhow::bail!(
            "no transport security chosen: pass --tls-cert PATH --tls-key PATH to serve TLS \
             (`segtrain-coordinator certs --out DIR --host NAME` makes them), or --plaintext with a \
             loopback --listen address for local testing"
        ),
        _ => anyhow::bail!("give --tls-cert and --tls-key together, or --plaintext"),
    };
    let mut cfg = ServerConfig::new(args.listen, database_url);
    cfg.security = Security {
        tls,
        auth: !args.insecure_no_auth,
    };
    cfg.connect_timeout =
        (args.db_connect_timeout > 0).then(|| Duration::from_secs(args.db_connect_timeout));
    cfg.pool = segtrain_coordinator::store::PoolSettings {
        max_connections: args.database_max_connections,
        acquire_timeout: Duration::from_millis(args.database_acquire_timeout_ms),
    };
    cfg.workers.lease = Duration::from_secs(u64::from(args.lease_seconds));
    cfg.workers.stop_grace_seconds = args.stop_grace_seconds;
    cfg.workers.poll = Duration::from_millis(args.poll_interval_ms);
    cfg.scheduler.interval = Duration::from_millis(args.scheduler_interval_ms);
    cfg.restart.base = Duration::from_millis(args.restart_backoff_ms);
    cfg.restart.max =
        Duration::from_millis(args.restart_backoff_max_ms.max(args.restart_backoff_ms));
    cfg.metrics_listen = args.metrics_listen;
    cfg.web_listen = args.web_listen;
    cfg.metrics_refresh = Duration::from_millis(args.metrics_refresh_ms);
    cfg.limits = Limits {
        streams_per_connection: args.max_streams_per_connection,
        watch_streams_per_token: usize::try_from(args.max_watch_streams_per_token)
            .unwrap_or(usize::MAX),
        request_body: Duration::from_secs(args.request_body_timeout_seconds),
    };
    serve(cfg, shutdown_signal()).await
}

fn certs(a: CertsArgs) -> anyhow::Result<()> {
    let hosts = if a.hosts.is_empty() {
        segtrain_coordinator::certs::DEFAULT_HOSTS
            .iter()
            .map(|h| h.to_string())
            .collect()
    } else {
        a.hosts
    };
    let f = segtrain_coordinator::certs::write(&a.out, &hosts, a.days, a.force)?;
    println!("wrote {} (for {})", a.out.display(), hosts.join(", "));
    println!("  CA certificate:     {}  (clients: --ca)", f.ca.display());
    println!(
        "  CA key:             {}  (keep it offline)",
        f.ca_key.display()
    );
    println!(
        "  server certificate: {}  (coordinator: --tls-cert)",
        f.server.display()
    );
    println!(
        "  server key:         {}  (coordinator: --tls-key)",
        f.server_key.display()
    );
    println!(
        "  client certificate: {}  (with --tls-client-ca: --client-cert)",
        f.client.display()
    );
    println!(
        "  client key:         {}  (with --tls-client-ca: --client-key)",
        f.client_key.display()
    );
    Ok(())
}

async fn open_store(db: &DbArgs) -> anyhow::Result<Store> {
    let store = Store::connect(&db.database_url)
        .await
        .context("cannot connect to PostgreSQL (--database-url)")?;
    store.migrate().await?;
    Ok(store)
}

fn token_json(t: &TokenRecord) -> serde_json::Value {
    serde_json::json!({
        "id": t.id.to_string(),
        "name": t.name,
        "role": t.role,
        "created_at": t.created_at.to_rfc3339(),
        "revoked_at": t.revoked_at.map(|x| x.to_rfc3339()),
        "last_used_at": t.last_used_at.map(|x| x.to_rfc3339()),
        "host": t.host,
        "principal": t.principal,
        "team": t.team,
    })
}

async fn token(cmd: TokenCommand) -> anyhow::Result<()> {
    match cmd {
        TokenCommand::Create {
            db,
            role,
            name,
            host,
            principal,
            team,
        } => {
            let role = Role::parse(&role).with_context(|| {
                format!("--role: must be client, worker or admin, got {role:?}")
            })?;
            let new = NewToken {
                name: &name,
                role: role.as_str(),
                principal: principal.as_deref().unwrap_or(&name),
                team: &team,
                host: host.as_deref(),
            };
            auth::check_new_token(&new, role)
                .map_err(|(field, m)| anyhow::anyhow!("--{field}: {m}"))?;
            let store = open_store(&db).await?;
            let secret = auth::new_token().context("cannot make a random token")?;
            let t = store
                .create_token(&new, &auth::secret_sha256(&secret))
                .await?;
            if db.json {
                let mut v = token_json(&t);
                v["token"] = serde_json::Value::String(secret);
                println!("{v}");
            } else {
                // The token alone on stdout, so `... > admin.token` works; the rest on stderr.
                eprintln!(
                    "created {} token {:?} ({}); it is shown only now:",
                    t.role, t.name, t.id
                );
                println!("{secret}");
            }
        }
        TokenCommand::List { db, all } => {
            let store = open_store(&db).await?;
            let tokens = store.list_tokens(all).await?;
            if db.json {
                let v: Vec<_> = tokens.iter().map(token_json).collect();
                println!("{}", serde_json::Value::Array(v));
            } else {
                for t in &tokens {
                    let host = t
                        .host
                        .as_ref()
                        .map(|h| format!("  host {h}"))
                        .unwrap_or_default();
                    let revoked = if t.revoked_at.is_some() {
                        "  (revoked)"
                    } else {
                        ""
                    };
                    println!("{}  {:<6}  {}{host}{revoked}", t.id, t.role, t.name);
                }
            }
        }
        TokenCommand::Revoke { db, id } => {
            let id = uuid::Uuid::parse_str(id.trim())
                .map_err(|_| anyhow::anyhow!("ID: not a token id (a UUID), got {id:?}"))?;
            let store = open_store(&db).await?;
            let t = store.revoke_token(id).await?;
            if db.json {
                println!("{}", token_json(&t));
            } else {
                println!("revoked {} token {:?} ({})", t.role, t.name, t.id);
            }
        }
    }
    Ok(())
}

async fn prune(a: PruneArgs) -> anyhow::Result<()> {
    use segtrain_coordinator::retention;
    let older_than = retention::parse_age(&a.older_than).map_err(anyhow::Error::msg)?;
    if a.archive.is_some() && !a.apply {
        anyhow::bail!(
            "--archive writes what --apply deletes: give --apply too (or neither, for a dry run)"
        );
    }
    let store = open_store(&a.db).await?;
    let opts = retention::PruneOptions {
        older_than,
        apply: a.apply,
        archive: a.archive,
    };
    let report = retention::prune(&store, &opts).await?;
    if a.db.json {
        println!("{}", report.json());
    } else {
        print!("{}", report.text());
    }
    Ok(())
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
