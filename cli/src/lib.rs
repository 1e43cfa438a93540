//! `segtrain`: the command-line client of the coordinator's gRPC API.
//!
//! Every command is one or a few RPCs; output is a table or lines for people, or JSON with
//! `--json`. A failure prints one line saying what failed and what to do, and exits non-zero.

/// `println!` for whatever the CLI prints: the text made terminal-safe first (a control
/// character stored by an older version or by hand is shown as `\u{…}`, never obeyed).
macro_rules! say {
    ($($arg:tt)*) => {
        println!("{}", segtrain_proto::text::terminal_safe(&format!($($arg)*)))
    };
}

/// [`say!`] on stderr.
macro_rules! say_err {
    ($($arg:tt)*) => {
        eprintln!("{}", segtrain_proto::text::terminal_safe(&format!($($arg)*)))
    };
}

mod export;
mod output;
mod pages;
mod plot;
mod tensorboard;

use anyhow::{anyhow, bail, Context};
use clap::{Args, Parser, Subcommand};
use output::{JobView, Printer};
use segtrain_proto::client::{self as conn, AuthChannel, BearerToken, ClientTls};
use segtrain_proto::job_spec::ProtoSpecInput;
use segtrain_proto::v1 as pb;
use segtrain_proto::v1::cluster_service_client::ClusterServiceClient;
use segtrain_proto::v1::job_service_client::JobServiceClient;
use segtrain_proto::v1::team_service_client::TeamServiceClient;
use segtrain_proto::v1::token_service_client::TokenServiceClient;
use segtrain_spec::JobSpecInput;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tonic::{Code, Status};

/// Exit code of `watch` when the job was canceled (failure and errors exit 1).
const EXIT_CANCELED: u8 = 3;

#[derive(Parser, Debug)]
#[command(
    name = "segtrain",
    version,
    about = "Submit, watch and manage SegFormer training jobs on a segtrain coordinator"
)]
struct Cli {
    /// Coordinator address: https://host:port (TLS) or http://host:port (plaintext, for a
    /// coordinator on this machine started with --plaintext). Several coordinators on one
    /// database: their addresses comma-separated (the first that answers is used).
    #[arg(
        long,
        global = true,
        env = "SEGTRAIN_COORDINATOR",
        default_value = "http://127.0.0.1:50051"
    )]
    coordinator: String,
    /// The CA certificate (PEM) that signed the coordinator's certificate, e.g. ca.pem from
    /// `segtrain-coordinator certs` (default: the system's trusted roots).
    #[arg(long, global = true, env = "SEGTRAIN_CA")]
    ca: Option<PathBuf>,
    /// A file holding the bearer token (or set SEGTRAIN_TOKEN to the token itself).
    #[arg(long, global = true, env = "SEGTRAIN_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// This client's certificate (PEM), for a coordinator that requires one (--tls-client-ca).
    #[arg(long, global = true, env = "SEGTRAIN_CLIENT_CERT")]
    client_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, global = true, env = "SEGTRAIN_CLIENT_KEY")]
    client_key: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Submit a training job from a job file and/or flags (flags win over the file).
    Submit(Box<SubmitArgs>),
    /// List jobs, newest first.
    List(ListArgs),
    /// Show one job.
    Status { job: String },
    /// Follow a job's events until it finishes. Exit code: 0 succeeded, 1 failed, 3 canceled.
    Watch {
        job: String,
        /// Start after this event id (0: from the beginning).
        #[arg(long, default_value_t = 0)]
        after_event: u64,
    },
    /// Cancel a job (a running job stops gracefully first).
    Cancel {
        job: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// List a job's attempts: world size, accumulation, workers, how each ended.
    Attempts { job: String },
    /// List a job's checkpoints.
    Checkpoints {
        job: String,
        /// Include deleted checkpoints.
        #[arg(long)]
        all: bool,
    },
    /// Print a job's metric points.
    Metrics {
        job: String,
        /// Only these metrics (repeatable), e.g. --name loss --name lr.
        #[arg(long = "name")]
        names: Vec<String>,
        /// Only from this iteration on.
        #[arg(long, default_value_t = 0)]
        since: u64,
    },
    /// Export every metric point of a job: TensorBoard event files, CSV or JSON.
    #[command(subcommand)]
    Export(ExportCommand),
    /// Draw a job's loss, learning rate and mIoU curves to a PNG or SVG file.
    Plot {
        job: String,
        /// Output file (.png or .svg).
        #[arg(short = 'o', long = "out", default_value = "loss.png")]
        out: PathBuf,
    },
    /// List the worker daemons (one per GPU) and what they run.
    Workers,
    /// Take a worker out of scheduling: it finishes the rank it runs and is given no new one
    /// until `undrain` (needs an admin token).
    Drain {
        /// HOST:GPU as `segtrain workers` shows it (HOST:cpu for a CPU worker), or its id.
        worker: String,
    },
    /// Give a drained worker back to the scheduler (needs an admin token).
    Undrain {
        /// HOST:GPU (HOST:cpu for a CPU worker), or the worker's id.
        worker: String,
    },
    /// Print a commented job file with every field and its default.
    JobTemplate,
    /// Manage bearer tokens (needs an admin token).
    #[command(subcommand)]
    Token(TokenCommand),
    /// Set and list teams' limits (needs an admin token).
    #[command(subcommand)]
    Team(TeamCommand),
}

#[derive(Subcommand, Debug)]
enum TeamCommand {
    /// Set a team's limits, replacing the ones it had (a limit not given is removed).
    Set {
        name: String,
        /// The highest priority its jobs may be submitted with.
        #[arg(long)]
        max_priority: Option<i32>,
        /// GPUs its jobs may hold at once (a job over it waits QUEUED, saying so).
        #[arg(long)]
        max_gpus: Option<u32>,
        /// Where its specs' dataset_root, pretrained, resume_from and checkpoint_root may
        /// point (repeatable): /path prefixes and gs://bucket[/prefix]. None: anywhere.
        #[arg(long = "allowed-root")]
        allowed_roots: Vec<String>,
    },
    /// List teams: their limits and the GPUs they hold.
    List,
}

#[derive(Subcommand, Debug)]
enum TokenCommand {
    /// Create a token; it is printed once (only its hash is kept).
    Create {
        /// client (jobs and cluster), worker (worker daemons) or admin (everything, and tokens).
        #[arg(long)]
        role: String,
        /// A label for people, e.g. "ci" or "gpu-host-3".
        #[arg(long)]
        name: String,
        /// Bind a worker token to one host (the daemons' --host): it registers and acts only
        /// for that host's workers.
        #[arg(long)]
        host: Option<String>,
        /// Who the token speaks for (default: its --name).
        #[arg(long)]
        principal: Option<String>,
        /// Its team: a client token sees and acts on that team's jobs only (default "default").
        #[arg(long)]
        team: Option<String>,
    },
    /// List tokens (never the secrets).
    List {
        /// Include revoked tokens.
        #[arg(long)]
        all: bool,
    },
    /// Revoke a token by id (coordinators stop accepting it within 5 seconds).
    Revoke { id: String },
}

#[derive(Subcommand, Debug)]
enum ExportCommand {
    /// Write one TensorBoard run into DIR (`tensorboard --logdir DIR`): a scalar per metric
    /// name, per-class IoU included (class_iou/NAME), at step = iteration.
    Tensorboard { job: String, dir: PathBuf },
    /// Write `attempt,iteration,name,value` lines.
    Csv {
        job: String,
        /// Output file (default: standard output).
        #[arg(short = 'o', long = "out")]
        out: Option<PathBuf>,
    },
    /// Write an array of {attempt, iteration, name, value}.
    Json {
        job: String,
        /// Output file (default: standard output).
        #[arg(short = 'o', long = "out")]
        out: Option<PathBuf>,
    },
}

#[derive(Args, Debug)]
struct SubmitArgs {
    /// A TOML job file (see `segtrain job-template`).
    #[arg(short = 'f', long = "file")]
    file: Option<PathBuf>,
    /// Makes a retried submit return the job created by the first one instead of a new job.
    #[arg(long, default_value = "")]
    idempotency_key: String,
    #[command(flatten)]
    spec: JobSpecInput,
}

#[derive(Args, Debug)]
struct ListArgs {
    /// Only jobs in this state (repeatable): queued, scheduled, running, succeeded, failed,
    /// canceled, restarting, canceling.
    #[arg(long = "state")]
    states: Vec<String>,
    /// Jobs per page (1..=1000).
    #[arg(long, default_value_t = 50)]
    limit: u32,
    /// Continue from the token a previous `list` printed.
    #[arg(long, default_value = "")]
    page_token: String,
    /// Only this team's jobs (an admin's filter; a client token lists its own team's only).
    #[arg(long, default_value = "")]
    team: String,
}

/// Entry point of the `segtrain` binary.
pub fn main() -> ExitCode {
    // Die quietly on a closed pipe (`segtrain ... | head`) like other Unix tools, instead of
    // panicking in println!.
    // SAFETY: restores the default disposition of one signal before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            say_err!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            say_err!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let out = Printer { json: cli.json };
    if let Command::JobTemplate = cli.command {
        print!("{}", segtrain_spec::template());
        return Ok(ExitCode::SUCCESS);
    }
    let channel = connect(&cli).await?;
    let mut jobs = JobServiceClient::new(channel.clone())
        .max_decoding_message_size(conn::MAX_RESPONSE_BYTES)
        .max_encoding_message_size(conn::MAX_REQUEST_BYTES);
    let rpc = |s: Status| describe(s, &cli.coordinator);
    match cli.command {
        Command::Submit(args) => {
            let mut input = match &args.file {
                Some(path) => JobSpecInput::from_file(path).map_err(|e| anyhow!("{e}"))?,
                None => JobSpecInput::default(),
            };
            input = input.overlay(args.spec);
            let resp = jobs
                .submit_job(pb::SubmitJobRequest {
                    spec: Some(input.to_proto()),
                    idempotency_key: args.idempotency_key,
                })
                .await
                .map_err(rpc)?
                .into_inner();
            let job = resp.job.context("the coordinator returned no job")?;
            for w in &resp.warnings {
                say_err!("warning: {w}");
            }
            out.submitted(&JobView::from(&job), resp.existing, &resp.warnings);
        }
        Command::List(args) => {
            let states = args
                .states
                .iter()
                .map(|s| parse_state(s))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let resp = jobs
                .list_jobs(pb::ListJobsRequest {
                    states,
                    page_size: args.limit,
                    page_token: args.page_token,
                    team: args.team,
                })
                .await
                .map_err(rpc)?
                .into_inner();
            let views: Vec<JobView> = resp.jobs.iter().map(JobView::from).collect();
            out.job_list(&views, &resp.next_page_token);
        }
        Command::Status { job } => {
            let j = get_job(&mut jobs, &job, &cli.coordinator).await?;
            out.job(&JobView::from(&j));
        }
        Command::Watch { job, after_event } => {
            return watch(&mut jobs, &out, &cli.coordinator, job, after_event).await;
        }
        Command::Cancel { job, reason } => {
            let resp = jobs
                .cancel_job(pb::CancelJobRequest {
                    job_id: job,
                    reason,
                })
                .await
                .map_err(rpc)?
                .into_inner();
            let job = resp.job.context("the coordinator returned no job")?;
            out.canceled(&JobView::from(&job));
        }
        Command::Attempts { job } => {
            let attempts = pages::attempts(&mut jobs, &job).await.map_err(rpc)?;
            out.attempts(&attempts);
        }
        Command::Checkpoints { job, all } => {
            let checkpoints = pages::checkpoints(&mut jobs, &job, all)
                .await
                .map_err(rpc)?;
            out.checkpoints(&checkpoints);
        }
        Command::Metrics { job, names, since } => {
            let resp = jobs
                .get_metrics(pb::GetMetricsRequest {
                    job_id: job,
                    names,
                    since_iteration: since,
                    limit: 0,
                })
                .await
                .map_err(rpc)?
                .into_inner();
            out.metrics(&resp.points);
        }
        Command::Export(what) => {
            export(&mut jobs, &out, what)
                .await
                .map_err(|e| match e.downcast::<Status>() {
                    Ok(s) => rpc(s),
                    Err(e) => e,
                })?
        }
        Command::Plot { job, out: file } => {
            let points = jobs
                .get_metrics(pb::GetMetricsRequest {
                    job_id: job.clone(),
                    names: vec!["loss".into(), "lr".into(), "miou".into()],
                    since_iteration: 0,
                    limit: 100_000,
                })
                .await
                .map_err(rpc)?
                .into_inner()
                .points;
            plot::plot(&job, &points, &file)?;
            if out.json {
                println!(
                    "{}",
                    segtrain_proto::text::json_safe(
                        &serde_json::json!({ "plot": file }).to_string()
                    )
                );
            } else {
                say!("wrote {}", file.display());
            }
        }
        Command::Workers => {
            let mut cluster = ClusterServiceClient::new(channel)
                .max_decoding_message_size(conn::MAX_RESPONSE_BYTES);
            out.workers(&pages::workers(&mut cluster).await.map_err(rpc)?);
        }
        Command::Drain { worker } => set_draining(channel, &out, &worker, true, &rpc).await?,
        Command::Undrain { worker } => set_draining(channel, &out, &worker, false, &rpc).await?,
        Command::Token(t) => {
            let mut tokens = TokenServiceClient::new(channel)
                .max_decoding_message_size(conn::MAX_RESPONSE_BYTES)
                .max_encoding_message_size(conn::MAX_REQUEST_BYTES);
            match t {
                TokenCommand::Create {
                    role,
                    name,
                    host,
                    principal,
                    team,
                } => {
                    let role = parse_role(&role)?;
                    let resp = tokens
                        .create_token(pb::CreateTokenRequest {
                            name,
                            role: role as i32,
                            host: host.unwrap_or_default(),
                            principal: principal.unwrap_or_default(),
                            team: team.unwrap_or_default(),
                        })
                        .await
                        .map_err(rpc)?
                        .into_inner();
                    let info = resp
                        .info
                        .context("the coordinator returned no token info")?;
                    out.token_created(&resp.token, &info);
                }
                TokenCommand::List { all } => {
                    let resp = tokens
                        .list_tokens(pb::ListTokensRequest {
                            include_revoked: all,
                        })
                        .await
                        .map_err(rpc)?
                        .into_inner();
                    out.tokens(&resp.tokens);
                }
                TokenCommand::Revoke { id } => {
                    let resp = tokens
                        .revoke_token(pb::RevokeTokenRequest { token_id: id })
                        .await
                        .map_err(rpc)?
                        .into_inner();
                    let t = resp.token.context("the coordinator returned no token")?;
                    out.token_revoked(&t);
                }
            }
        }
        Command::Team(t) => team(channel, &out, t, &rpc).await?,
        Command::JobTemplate => unreachable!("handled before connecting"),
    }
    Ok(ExitCode::SUCCESS)
}

async fn get_job(
    jobs: &mut JobServiceClient<AuthChannel>,
    job_id: &str,
    coordinator: &str,
) -> anyhow::Result<pb::Job> {
    let req = pb::GetJobRequest {
        job_id: job_id.to_string(),
    };
    Ok(jobs
        .get_job(req)
        .await
        .map_err(|s| describe(s, coordinator))?
        .into_inner())
}

/// `segtrain export`: the points first (an RPC error comes back as the `Status` it is), then
/// the file.
async fn export(
    jobs: &mut JobServiceClient<AuthChannel>,
    out: &Printer,
    what: ExportCommand,
) -> anyhow::Result<()> {
    let (job, file) = match &what {
        ExportCommand::Tensorboard { job, .. } => (job, None),
        ExportCommand::Csv { job, out } | ExportCommand::Json { job, out } => (job, out.as_ref()),
    };
    let points = export::all_points(jobs, job, &[]).await?;
    let write = |f: &dyn Fn(&mut dyn std::io::Write) -> std::io::Result<()>| -> anyhow::Result<()> {
        match file {
            Some(path) => {
                let mut w = std::io::BufWriter::new(
                    std::fs::File::create(path)
                        .with_context(|| format!("--out {}: cannot create", path.display()))?,
                );
                f(&mut w)
                    .and_then(|()| std::io::Write::flush(&mut w))
                    .with_context(|| format!("--out {}: cannot write", path.display()))
            }
            None => f(&mut std::io::stdout().lock()).context("cannot write to standard output"),
        }
    };
    match what {
        ExportCommand::Tensorboard { job, dir } => {
            let path = export::write_tensorboard(&job, &points, &dir)?;
            if out.json {
                say!(
                    "{}",
                    serde_json::json!({ "file": path, "points": points.len() })
                );
            } else {
                say!("wrote {} points to {}", points.len(), path.display());
            }
        }
        ExportCommand::Csv { .. } => write(&|w| export::write_csv(&points, w))?,
        ExportCommand::Json { .. } => write(&|w| export::write_json(&points, w))?,
    }
    Ok(())
}

/// Follows the job's events; reconnects and resumes from the last event seen when the
/// coordinator restarts or the connection drops.
async fn watch(
    jobs: &mut JobServiceClient<AuthChannel>,
    out: &Printer,
    coordinator: &str,
    job_id: String,
    after_event: u64,
) -> anyhow::Result<ExitCode> {
    let mut cursor = after_event;
    let mut outage = Duration::ZERO;
    const GIVE_UP: Duration = Duration::from_secs(120);
    // The job's length, for the progress bar (the request also checks the job exists).
    let job = get_job(jobs, &job_id, coordinator).await?;
    let max_iters = job.spec.as_ref().and_then(|s| s.max_iters).unwrap_or(0);
    let mut live = output::Live::new(out.json, max_iters, job.iteration);
    loop {
        let attempt = jobs
            .watch_job(pb::WatchJobRequest {
                job_id: job_id.clone(),
                after_event_id: cursor,
            })
            .await;
        let mut stream = match attempt {
            Ok(s) => s.into_inner(),
            Err(s) if connection_lost(&s) && outage < GIVE_UP => {
                outage += pause(outage).await;
                continue;
            }
            Err(s) => return Err(describe(s, coordinator)),
        };
        loop {
            match stream.message().await {
                Ok(Some(ev)) => {
                    outage = Duration::ZERO;
                    cursor = ev.id;
                    live.event(out, &ev);
                }
                Ok(None) => {
                    // The stream ends when the job is finished.
                    let job = get_job(jobs, &job_id, coordinator).await?;
                    let view = JobView::from(&job);
                    live.finish();
                    out.finished(&view);
                    return Ok(match job.state() {
                        pb::JobState::Succeeded => ExitCode::SUCCESS,
                        pb::JobState::Canceled => ExitCode::from(EXIT_CANCELED),
                        _ => ExitCode::FAILURE,
                    });
                }
                Err(s) if connection_lost(&s) && outage < GIVE_UP => {
                    if !out.json {
                        say_err!(
                            "connection to the coordinator lost ({}); reconnecting…",
                            s.message()
                        );
                    }
                    outage += pause(outage).await;
                    break;
                }
                Err(s) => return Err(describe(s, coordinator)),
            }
        }
    }
}

/// How a call fails when its coordinator went away (refused, reset, killed mid-stream): worth
/// calling again, on the next coordinator when several are given.
fn connection_lost(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable | Code::Unknown | Code::Internal | Code::Cancelled
    )
}

async fn pause(so_far: Duration) -> Duration {
    let d = (so_far / 2).clamp(Duration::from_millis(500), Duration::from_secs(5));
    tokio::time::sleep(d).await;
    d
}

/// A channel with TLS and the bearer token as the flags say, to the first of the coordinators
/// that answers (an unreachable one is reported by the RPC, with the address in the message).
async fn connect(cli: &Cli) -> anyhow::Result<AuthChannel> {
    let tls = ClientTls {
        ca: cli.ca.clone(),
        cert: cli.client_cert.clone(),
        key: cli.client_key.clone(),
    };
    let token = BearerToken::from_file_or_env(cli.token_file.as_deref())?;
    Ok(conn::connect_first_reachable(&cli.coordinator, &tls, token).await?)
}

fn parse_role(s: &str) -> anyhow::Result<pb::TokenRole> {
    match pb::TokenRole::from_str_name(&format!("TOKEN_ROLE_{}", s.to_ascii_uppercase())) {
        Some(r) if r != pb::TokenRole::Unspecified => Ok(r),
        _ => bail!("--role: must be client, worker or admin, got {s:?}"),
    }
}

fn parse_state(s: &str) -> anyhow::Result<i32> {
    segtrain_proto::json::parse_state_name(s)
        .map(|st| st as i32)
        .map_err(|e| anyhow!("--state: {e}"))
}

/// One line for a failed RPC: what went wrong and, where it helps, what to do.
fn describe(s: Status, coordinator: &str) -> anyhow::Error {
    let detail = conn::status_detail(&s);
    let msg = s.message();
    if conn::is_tls_failure(&s) {
        return anyhow!(
            "cannot connect securely to the coordinator at {coordinator} ({detail}); check --ca \
             (SEGTRAIN_CA), that the URL's host is one the server certificate was made for, and \
             https:// vs http://"
        );
    }
    match s.code() {
        Code::Unavailable => anyhow!(
            "cannot reach the coordinator at {coordinator} ({detail}); is segtrain-coordinator running? \
             Set --coordinator or SEGTRAIN_COORDINATOR"
        ),
        Code::InvalidArgument => anyhow!("invalid request: {msg}"),
        Code::NotFound => anyhow!("not found: {msg}"),
        Code::FailedPrecondition | Code::AlreadyExists => anyhow!("refused: {msg}"),
        Code::Unauthenticated => anyhow!(
            "not allowed: {msg} (give a token with --token-file or SEGTRAIN_TOKEN)"
        ),
        Code::PermissionDenied => anyhow!("not allowed: {msg}"),
        Code::DeadlineExceeded => anyhow!("the coordinator at {coordinator} did not answer in time"),
        other => anyhow!("the coordinator failed ({}): {msg}", other.description()),
    }
}

/// `segtrain drain` (`drain`) and `segtrain undrain`.
/// `segtrain team set|list`.
async fn team(
    channel: AuthChannel,
    out: &Printer,
    cmd: TeamCommand,
    rpc: &dyn Fn(Status) -> anyhow::Error,
) -> anyhow::Result<()> {
    let mut teams = TeamServiceClient::new(channel)
        .max_decoding_message_size(conn::MAX_RESPONSE_BYTES)
        .max_encoding_message_size(conn::MAX_REQUEST_BYTES);
    let listed = match cmd {
        TeamCommand::Set {
            name,
            max_priority,
            max_gpus,
            allowed_roots,
        } => {
            let req = pb::SetTeamRequest {
                name,
                max_priority,
                max_gpus,
                allowed_roots,
            };
            let resp = teams.set_team(req).await.map_err(rpc)?.into_inner();
            resp.team.into_iter().collect()
        }
        TeamCommand::List => {
            let req = pb::ListTeamsRequest {};
            teams.list_teams(req).await.map_err(rpc)?.into_inner().teams
        }
    };
    out.teams(&listed);
    Ok(())
}

async fn set_draining(
    channel: AuthChannel,
    out: &Printer,
    worker: &str,
    drain: bool,
    rpc: &dyn Fn(Status) -> anyhow::Error,
) -> anyhow::Result<()> {
    let mut cluster =
        ClusterServiceClient::new(channel).max_decoding_message_size(conn::MAX_RESPONSE_BYTES);
    let workers = pages::workers(&mut cluster).await.map_err(rpc)?;
    let w = find_worker(&workers, worker)?;
    let worker_id = w.id.clone();
    let state = if drain {
        let req = pb::DrainWorkerRequest { worker_id };
        cluster
            .drain_worker(req)
            .await
            .map_err(rpc)?
            .into_inner()
            .state
    } else {
        let req = pb::UndrainWorkerRequest { worker_id };
        cluster
            .undrain_worker(req)
            .await
            .map_err(rpc)?
            .into_inner()
            .state
    };
    out.worker_state(w, state);
    Ok(())
}

/// The worker `name` means: its id, or HOST:GPU as `segtrain workers` shows it (HOST:cpu for a
/// CPU worker).
fn find_worker<'a>(workers: &'a [pb::Worker], name: &str) -> anyhow::Result<&'a pb::Worker> {
    let found = workers
        .iter()
        .find(|w| w.id == name.trim() || { output::worker_name(w) == name.trim() });
    found.with_context(|| {
        let known: Vec<String> = workers.iter().map(output::worker_name).collect();
        format!(
            "worker: no worker {name:?} is registered; give HOST:GPU (HOST:cpu for a CPU worker) \
             or an id, one of: {}",
            if known.is_empty() {
                "(none)".to_string()
            } else {
                known.join(", ")
            }
        )
    })
}
