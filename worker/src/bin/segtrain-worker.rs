//! `segtrain-worker`: the per-GPU worker binary.

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use segtrain_spec::{Precision, Variant};
use segtrain_worker::{data, doctor, model, predict, train};
use std::path::PathBuf;
use std::process::ExitCode;
use tch::Device;

#[derive(Parser, Debug)]
#[command(
    name = "segtrain-worker",
    version,
    about = "segtrain worker: per-GPU daemon and SegFormer trainer"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Train a job from the same job file `segtrain submit -f` takes: standalone on the CPU or
    /// one GPU (world_size 1), or as one rank of a distributed job (--rank, --world,
    /// --rendezvous; the worker daemon starts trainers this way).
    Train(Box<TrainArgs>),
    /// Run the worker daemon for one GPU (or the CPU): register with the coordinator and run the
    /// ranks it assigns, each in a child trainer process.
    Daemon(DaemonArgs),
    /// Write a deterministic synthetic dataset in the Cityscapes layout (for tests and demos).
    SynthData {
        #[arg(long)]
        out: PathBuf,
        /// Training images.
        #[arg(long, default_value_t = 64)]
        train: usize,
        /// Validation images.
        #[arg(long, default_value_t = 16)]
        val: usize,
        /// Image size as WxH.
        #[arg(long, default_value = "256x128")]
        size: String,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Print the libtorch, CUDA, cuDNN, GPUs and NCCL this binary uses.
    Doctor {
        #[arg(long)]
        json: bool,
    },
    /// Parameter counts and stage shapes of a SegFormer variant.
    ModelInfo {
        /// b0..b5
        #[arg(long)]
        variant: Variant,
        #[arg(long, default_value_t = 19)]
        classes: i64,
        /// Input size as HxW.
        #[arg(long, default_value = "1024x1024")]
        size: String,
        #[arg(long)]
        json: bool,
    },
    /// Time full training steps (forward, loss, backward, AdamW) on synthetic batches: median
    /// ms/iter, images/s, peak GPU memory, achieved TFLOP/s (3 × the forward FLOPs).
    Bench {
        /// b0..b5
        #[arg(long, default_value = "b3")]
        variant: Variant,
        /// Images per step.
        #[arg(long, default_value_t = 8)]
        batch: i64,
        /// Square crop side, pixels (a multiple of 32).
        #[arg(long, default_value_t = 1024)]
        crop: i64,
        /// fp32 or bf16 (autocast; CUDA only).
        #[arg(long, default_value = "bf16")]
        precision: Precision,
        /// Timed steps (after the warm-up).
        #[arg(long, default_value_t = 12)]
        iters: usize,
        #[arg(long, default_value_t = 4)]
        warmup: usize,
        /// auto (CUDA if available), cpu, cuda or cuda:N.
        #[arg(long, default_value = "auto")]
        device: String,
        #[arg(long, default_value_t = 19)]
        classes: i64,
        /// One JSON object instead of the table.
        #[arg(long)]
        json: bool,
        /// The head's computation order: merged (fuse before upsampling, the default) or
        /// concat (upsample, concatenate, fuse, as the paper writes it); for A/B runs.
        #[arg(long, default_value = "merged")]
        head: HeadArg,
        /// Copy stage maps to contiguous NCHW instead of channels-last views; for A/B runs.
        #[arg(long)]
        contiguous_maps: bool,
        /// Also time forward, backward and optimizer separately (a per-phase profile).
        #[arg(long)]
        breakdown: bool,
        /// Also time the step with SyncBN in the head (over a world of 1: the computation it
        /// adds, without the network) and print its cost.
        #[arg(long)]
        sync_bn: bool,
        /// Profile two more steps with libtorch's profiler: print the kernels that take the
        /// time and write a Chrome trace (chrome://tracing, Perfetto) to this file.
        #[arg(long, value_name = "TRACE.json")]
        profile: Option<PathBuf>,
    },
    /// Time the training loader alone (decode, the recipe's augmentation, batching) over a
    /// dataset's train split: images/s with N threads, and ms per image per thread.
    BenchLoader {
        /// Dataset root in the Cityscapes layout (e.g. from `synth-data`).
        #[arg(long)]
        data: PathBuf,
        #[arg(long, default_value_t = 16)]
        threads: usize,
        #[arg(long, default_value_t = 8)]
        batch: usize,
        /// Crop as HxW.
        #[arg(long, default_value = "1024x1024")]
        crop: String,
        /// Batches timed (after one untimed).
        #[arg(long, default_value_t = 16)]
        batches: usize,
        #[arg(long)]
        json: bool,
    },
    /// Segment one image (or a safetensors file holding an NCHW `pixel_values` tensor).
    Predict {
        /// b0..b5
        #[arg(long)]
        variant: Variant,
        #[arg(long, default_value_t = 19)]
        classes: i64,
        /// A safetensors file with HuggingFace SegFormer key names.
        #[arg(long)]
        weights: PathBuf,
        /// A PNG/JPEG image, or a .safetensors file with `pixel_values`.
        #[arg(long)]
        input: PathBuf,
        /// Where to write the segmentation (PNG, Cityscapes colours).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Where to write the raw logits (safetensors, tensor `logits`).
        #[arg(long)]
        logits: Option<PathBuf>,
        /// cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// fp32 or bf16 (autocast; CUDA only).
        #[arg(long, default_value = "fp32")]
        precision: Precision,
    },
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum HeadArg {
    Merged,
    Concat,
}

#[derive(clap::Args, Debug)]
struct TrainArgs {
    /// The job file (see `segtrain job-template`).
    #[arg(long)]
    config: PathBuf,
    /// auto (CUDA if available), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Where checkpoints go (default: <checkpoint_root>/<name>); with --checkpoint-uri (or a
    /// gs:// checkpoint_root) the local staging directory they are written to before upload.
    #[arg(long)]
    checkpoint_dir: Option<PathBuf>,
    /// An object-store directory for the checkpoints, gs://bucket/prefix (default:
    /// <checkpoint_root>/<name> when checkpoint_root is gs://).
    #[arg(long)]
    checkpoint_uri: Option<String>,
    /// Stop after this iteration, writing a checkpoint (resume later with --resume-from).
    #[arg(long)]
    stop_at: Option<u64>,
    /// One JSON object per event on stdout instead of log lines.
    #[arg(long)]
    json: bool,
    /// This process's rank in a data-parallel job (0..world).
    #[arg(long, default_value_t = 0)]
    rank: usize,
    /// How many ranks the job has; must equal the job's world_size (default 1: standalone).
    #[arg(long)]
    world: Option<usize>,
    /// How the ranks meet: single (world 1), tcp-listen:HOST:PORT (rank 0 of CPU ranks; port 0
    /// picks a free one), tcp:HOST:PORT (the other CPU ranks), nccl-create (rank 0 of GPU
    /// ranks), nccl:<base64 unique id> (the other GPU ranks). Rank 0 reports its endpoint as a
    /// `rendezvous` event.
    #[arg(long)]
    rendezvous: Option<train::trainer::Rendezvous>,
    /// The job/attempt fingerprint all ranks of one attempt share; peers with another are refused.
    #[arg(long, default_value_t = 0)]
    rendezvous_token: u64,
    /// Seconds to wait for the other ranks to join.
    #[arg(long, env = "SEGTRAIN_RENDEZVOUS_TIMEOUT", default_value_t = 60)]
    rendezvous_timeout: u64,
    /// Seconds one collective operation may wait for the other ranks (a dead rank is an
    /// error after this, never a hang). Trainers started by a daemon inherit its environment,
    /// so SEGTRAIN_COLLECTIVE_TIMEOUT in the worker's environment file sets it for every job.
    #[arg(long, env = "SEGTRAIN_COLLECTIVE_TIMEOUT", default_value_t = 300)]
    collective_timeout: u64,
    /// Turn off dropout and drop path, for equivalence checks.
    #[arg(long)]
    no_dropout: bool,
    /// A JSON list of checkpoints to resume from, newest first ([{"uri", "iteration",
    /// "sha256"}], what the worker daemon writes for a restarted attempt): the first intact
    /// one is used. Overrides resume_from.
    #[arg(long)]
    resume_candidates: Option<PathBuf>,
    #[command(flatten)]
    spec: segtrain_spec::JobSpecInput,
}

#[derive(clap::Args, Debug)]
struct DaemonArgs {
    /// The coordinator's address: https://host:port (TLS) or http://host:port (plaintext, for a
    /// coordinator on this machine started with --plaintext).
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
    /// auto (JSON when stderr is not a terminal, e.g. under systemd), json or pretty.
    #[arg(long, env = "SEGTRAIN_LOG_FORMAT", default_value = "auto",
          value_parser = ["auto", "json", "pretty"])]
    log_format: String,
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

fn run_daemon(args: DaemonArgs) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    let json = args.log_json.unwrap_or(match args.log_format.as_str() {
        "json" => true,
        "pretty" => false,
        _ => !std::io::stderr().is_terminal(),
    });
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
    let cfg = segtrain_worker::daemon::DaemonConfig {
        coordinator: args.coordinator,
        gpu: match (args.cpu, args.gpu) {
            (true, _) | (false, Some(GpuChoice::Cpu)) => None,
            (false, Some(GpuChoice::Index(g))) => Some(g),
            (false, None) => bail!("give --gpu N, --gpu cpu or --cpu"),
        },
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
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(segtrain_worker::daemon::run(cfg, async {
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

/// Two sides `AxB` of option `flag` in the order given; `form` names them for the error (e.g.
/// "HxW").
fn parse_size(flag: &str, s: &str, form: &str) -> anyhow::Result<(i64, i64)> {
    let err = || format!("{flag}: expected {form} such as 1024x1024, got {s:?}");
    let (a, b) = s.split_once(['x', 'X']).with_context(err)?;
    let (a, b): (i64, i64) = (
        a.trim().parse().with_context(err)?,
        b.trim().parse().with_context(err)?,
    );
    if a < 32 || b < 32 || a > 16384 || b > 16384 {
        bail!("{flag}: each side must be in 32..=16384, got {a}x{b}");
    }
    Ok((a, b))
}

fn parse_device(s: &str) -> anyhow::Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        "auto" => Ok(Device::cuda_if_available()),
        "cuda" => Ok(Device::Cuda(0)),
        _ => match s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
        {
            Some(n) => Ok(Device::Cuda(n)),
            None => bail!("--device: expected cpu, cuda or cuda:N, got {s:?}"),
        },
    }
}

fn check_classes(k: i64) -> anyhow::Result<()> {
    if !(1..=254).contains(&k) {
        bail!("--classes: must be in 1..=254, got {k}");
    }
    Ok(())
}

fn print_json(v: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// The options of one training run, from the job file and the flags.
fn train_options(args: TrainArgs) -> anyhow::Result<train::TrainOptions> {
    let input = segtrain_spec::JobSpecInput::from_file(&args.config)
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .overlay(args.spec);
    let spec = input
        .resolve()
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.config.display()))?;
    let device = parse_device(&args.device)?;
    if device != Device::Cpu && !tch::Cuda::is_available() {
        bail!(
            "--device {}: no CUDA device is available (see `segtrain-worker doctor`)",
            args.device
        );
    }
    let world = match args.world {
        None if spec.world_size != 1 => bail!(
            "world_size: standalone training runs one rank, got {}; set world_size = 1 \
             (keep the global batch with batch_per_gpu/accumulate_steps) or submit the job to a coordinator",
            spec.world_size
        ),
        None => 1,
        Some(0) => bail!("--world: must be at least 1"),
        Some(w) if w as u64 != u64::from(spec.world_size) => bail!(
            "--world {w}: the job's world_size is {}; they must agree",
            spec.world_size
        ),
        Some(w) => w,
    };
    if args.rank >= world {
        bail!("--rank {}: must be less than --world ({world})", args.rank);
    }
    let rendezvous = match args.rendezvous {
        Some(r) => r,
        None if world == 1 => train::trainer::Rendezvous::Single,
        None => bail!(
            "--rendezvous: required with --world {world}: tcp-listen:HOST:PORT or \
             nccl-create on rank 0, tcp:HOST:PORT or nccl:<id> on the others"
        ),
    };
    if args.rendezvous_timeout == 0 || args.collective_timeout == 0 {
        bail!("--rendezvous-timeout and --collective-timeout must be at least 1 second");
    }
    let remote_root = train::remote::is_remote(&spec.checkpoint_root);
    let checkpoint_uri = match (&args.checkpoint_uri, remote_root) {
        (Some(u), _) => Some(u.clone()),
        (None, true) => Some(format!(
            "{}/{}",
            spec.checkpoint_root.trim_end_matches('/'),
            spec.name
        )),
        (None, false) => None,
    };
    let checkpoint_dir = match (args.checkpoint_dir, &checkpoint_uri) {
        (Some(d), _) => d,
        (None, Some(_)) => std::env::temp_dir().join(format!("segtrain-staging-{}", spec.name)),
        (None, None) => {
            train::trainer::local_path("checkpoint_root", &spec.checkpoint_root)?.join(&spec.name)
        }
    };
    let checkpoint_remote = match &checkpoint_uri {
        None => None,
        Some(uri) => {
            let (store, path) = train::remote::RemoteStore::open(uri)
                .with_context(|| format!("--checkpoint-uri {uri}"))?;
            Some(train::remote::RemoteDir { store, path })
        }
    };
    let resume_candidates = match &args.resume_candidates {
        None => Vec::new(),
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("--resume-candidates: cannot read {}", path.display()))?;
            serde_json::from_str::<Vec<train::ResumeCandidate>>(&text).with_context(|| {
                format!(
                    "--resume-candidates: {} is not a JSON list of {{uri, iteration, sha256}}",
                    path.display()
                )
            })?
        }
    };
    let opts = train::TrainOptions {
        spec,
        device,
        checkpoint_dir,
        stop_at: args.stop_at,
        rank: args.rank,
        world,
        rendezvous,
        token: args.rendezvous_token,
        timeouts: segtrain_worker::collective::Timeouts {
            setup: std::time::Duration::from_secs(args.rendezvous_timeout),
            step: std::time::Duration::from_secs(args.collective_timeout),
        },
        no_dropout: args.no_dropout,
        resume_candidates,
        stop: &train::stop::STOP_REQUESTED,
        checkpoint_remote,
    };
    Ok(opts)
}

/// `segtrain-worker train`: exit status 0 when the run finished or stopped on request (with a
/// checkpoint), 3 when it failed in a way a restart would repeat (bad job or data, unusable
/// checkpoint, out of memory, NaN loss), 1 for other failures. With --json the failure is also
/// the last line on stdout: {"event": "failed", "class": "deterministic"|"infra", "reason"}.
fn train_command(args: TrainArgs) -> ExitCode {
    let json = args.json;
    train::stop::install_signal_handlers();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let opts = train_options(args).map_err(train::stop::deterministic)?;
        let mut reporter = train::report::Reporter::new(json);
        train::train(opts, &mut reporter).map(|_| ())
    }))
    .unwrap_or_else(|panic| {
        let msg = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "unknown panic".to_string());
        Err(anyhow::anyhow!("the trainer panicked: {msg}"))
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let deterministic = train::stop::is_deterministic(&e);
            eprintln!("error: {e:#}");
            if json {
                use segtrain_worker::wire::{FailureClass, TrainerLine};
                let line = TrainerLine::Failed {
                    class: if deterministic {
                        FailureClass::Deterministic
                    } else {
                        FailureClass::Infra
                    },
                    reason: format!("{e:#}"),
                };
                println!("{}", line.to_line());
            }
            ExitCode::from(if deterministic { 3 } else { 1 })
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Daemon(args) => run_daemon(args)?,
        Command::Train(_) => bail!("train runs through train_command"),
        Command::Bench {
            variant,
            batch,
            crop,
            precision,
            iters,
            warmup,
            device,
            classes,
            json,
            head,
            contiguous_maps,
            breakdown,
            sync_bn,
            profile,
        } => {
            let device = parse_device(&device)?;
            let r = segtrain_worker::bench::run(&segtrain_worker::bench::BenchOptions {
                head: match head {
                    HeadArg::Merged => segtrain_worker::model::HeadMode::Merged,
                    HeadArg::Concat => segtrain_worker::model::HeadMode::Concat,
                },
                contiguous_maps,
                breakdown,
                sync_bn,
                profile: profile.clone(),
                variant,
                batch,
                crop,
                precision,
                warmup,
                iters,
                device,
                num_classes: classes,
            })?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "| variant | precision | batch | crop | device | ms/iter (median) | images/s | peak GiB | TFLOP/s |"
                );
                println!("|---|---|---|---|---|---|---|---|---|");
                println!(
                    "| {} | {} | {} | {} | {} | {:.1} | {:.2} | {:.1} | {:.1} |",
                    r.variant,
                    r.precision,
                    r.batch,
                    r.crop,
                    r.device,
                    r.ms_per_iter_median,
                    r.images_per_s,
                    r.peak_memory_bytes as f64 / (1u64 << 30) as f64,
                    r.tflops
                );
                println!(
                    "head {}, stage maps {}",
                    r.head,
                    if r.contiguous_maps {
                        "contiguous NCHW"
                    } else {
                        "channels-last views"
                    }
                );
                if let Some(b) = &r.breakdown {
                    println!(
                        "phases (median ms, synchronised): forward+loss {:.1}, backward {:.1}, optimizer {:.1}",
                        b.forward_ms, b.backward_ms, b.optimizer_ms
                    );
                }
                if let Some(s) = &r.sync_bn {
                    println!(
                        "SyncBN (world 1, no network): {:.1} ms/iter, +{:.2} ms ({:.3}x the plain BatchNorm step)",
                        s.ms_per_iter_median, s.extra_ms_per_iter, s.ratio
                    );
                }
                if let (Some(rows), Some(trace)) = (&r.profile, &profile) {
                    let what = if r.device == "Cpu" {
                        "operators (inclusive)"
                    } else {
                        "CUDA kernels"
                    };
                    println!("\ntop {what} per step (trace: {})", trace.display());
                    println!("| ms/step | % | calls/step | name |");
                    println!("|---|---|---|---|");
                    for p in rows {
                        let name: String = p.name.chars().take(110).collect();
                        println!(
                            "| {:.2} | {:.1} | {:.0} | {} |",
                            p.ms_per_step, p.percent, p.calls_per_step, name
                        );
                    }
                }
            }
        }
        Command::BenchLoader {
            data,
            threads,
            batch,
            crop,
            batches,
            json,
        } => {
            let (crop_h, crop_w) = parse_size("--crop", &crop, "HxW")?;
            let r =
                segtrain_worker::bench::run_loader(&segtrain_worker::bench::LoaderBenchOptions {
                    data,
                    threads,
                    batch,
                    crop_h: crop_h as usize,
                    crop_w: crop_w as usize,
                    batches,
                })?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!("| threads | batch | crop | images | images/s | ms/image/thread |");
                println!("|---|---|---|---|---|---|");
                println!(
                    "| {} | {} | {}x{} | {} | {:.1} | {:.1} |",
                    r.threads,
                    r.batch,
                    r.crop[0],
                    r.crop[1],
                    r.images,
                    r.images_per_s,
                    r.ms_per_image_per_thread
                );
            }
        }
        Command::SynthData {
            out,
            train,
            val,
            size,
            seed,
        } => {
            let (w, h) = parse_size("--size", &size, "WxH")?;
            let summary = data::synth::generate(&data::synth::SynthOptions {
                out: out.clone(),
                train,
                val,
                width: w as usize,
                height: h as usize,
                seed,
            })?;
            eprintln!(
                "wrote {train} train and {val} val images to {} ({summary:?})",
                out.display()
            );
        }
        Command::Doctor { json } => {
            let report = doctor::report();
            if json {
                print_json(&report)?;
            } else {
                println!("{report}");
            }
        }
        Command::ModelInfo {
            variant,
            classes,
            size,
            json,
        } => {
            check_classes(classes)?;
            let (h, w) = parse_size("--size", &size, "HxW")?;
            let info = model::info(variant, classes, h, w);
            if json {
                print_json(&info)?;
            } else {
                println!("{info}");
            }
        }
        Command::Predict {
            variant,
            classes,
            weights,
            input,
            out,
            logits,
            device,
            precision,
        } => {
            check_classes(classes)?;
            if out.is_none() && logits.is_none() {
                bail!("nothing to write: give --out mask.png and/or --logits logits.safetensors");
            }
            let args = predict::PredictArgs {
                variant,
                classes,
                weights,
                input,
                out: out.clone(),
                logits: logits.clone(),
                device: parse_device(&device)?,
                precision,
            };
            let p = predict::run(&args)?;
            let (n, k, h, w) = p.logits.size4()?;
            eprintln!("logits {n} x {k} x {h} x {w}");
            for path in out.iter().chain(logits.iter()) {
                eprintln!("wrote {}", path.display());
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    // Die quietly on a closed pipe (`segtrain ... | head`) like other Unix tools, instead of
    // panicking in println!.
    // SAFETY: restores the default disposition of one signal before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    if let Command::Train(args) = cli.command {
        return train_command(*args);
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
