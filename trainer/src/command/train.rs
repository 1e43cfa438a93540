//! `segtrain-worker train`: one rank of a job (or a standalone run) from a job file and flags.

use super::parse_device;
use crate::train;
use anyhow::{bail, Context};
use segtrain_wire::checkpoint_location::{self, CheckpointLocation};
use std::path::PathBuf;
use std::process::ExitCode;
use tch::Device;

#[derive(clap::Args, Debug)]
// The flattened job spec has its own `--accumulate-steps`, which would override the job's
// accumulate_steps and so its global batch. For `train` the flag is this attempt's accumulation
// instead (read into TrainOptions, never into the spec); it is re-described here.
#[command(mut_arg("accumulate_steps", |a| a
    .help_heading(None::<&str>)
    .value_name("N")
    .value_parser(clap::value_parser!(u32).range(1..))
    .help(
        "Micro-batches per rank per optimizer step for this run (default: the job's \
         accumulate_steps). --world x batch_per_gpu x --accumulate-steps must equal the job's \
         global batch, world_size x batch_per_gpu x accumulate_steps; then another world size \
         trains the same model. So a world_size = 2 job runs standalone (one rank) with twice \
         its accumulate_steps, and its checkpoints resume on either"
    )))]
pub struct TrainArgs {
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
    /// How many ranks this run has (default 1: standalone). It may differ from the job's
    /// world_size when --accumulate-steps keeps the global batch (see there).
    #[arg(long)]
    world: Option<usize>,
    /// How the ranks meet: single (world 1), tcp-listen:HOST:PORT (rank 0 of CPU ranks; port 0
    /// picks a free one), tcp:HOST:PORT (the other CPU ranks), nccl-create (rank 0 of GPU
    /// ranks), nccl:<base64 unique id> (the other GPU ranks). Rank 0 reports its endpoint as a
    /// `rendezvous` event.
    #[arg(long)]
    rendezvous: Option<train::Rendezvous>,
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

/// The options of one training run, from the job file and the flags.
pub fn options(mut args: TrainArgs) -> anyhow::Result<train::TrainOptions> {
    // The attempt's accumulation, not a spec override (see TrainArgs).
    let accumulate_arg = args.spec.accumulate_steps.take();
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
    // Standalone (no --world) is one rank; any world goes if the global batch is the job's.
    let world = args.world.unwrap_or(1);
    let accumulate_steps = accumulate_arg.unwrap_or(spec.accumulate_steps);
    train::options::check_layout(&spec, world, accumulate_steps).map_err(|e| {
        if args.world.is_none() && spec.world_size != 1 {
            anyhow::anyhow!(
                "{e}; standalone training runs one rank (submit the job to a coordinator, or \
                 pass --accumulate-steps)"
            )
        } else {
            anyhow::anyhow!(e)
        }
    })?;
    if args.rank >= world {
        bail!("--rank {}: must be less than --world ({world})", args.rank);
    }
    let rendezvous = match args.rendezvous {
        Some(r) => r,
        None if world == 1 => train::Rendezvous::Single,
        None => bail!(
            "--rendezvous: required with --world {world}: tcp-listen:HOST:PORT or \
             nccl-create on rank 0, tcp:HOST:PORT or nccl:<id> on the others"
        ),
    };
    if args.rendezvous_timeout == 0 || args.collective_timeout == 0 {
        bail!("--rendezvous-timeout and --collective-timeout must be at least 1 second");
    }
    // The flags win; else <checkpoint_root>/<name>, staged in a temporary directory when it is
    // an object store.
    let staging = || std::env::temp_dir().join(format!("segtrain-staging-{}", spec.name));
    let location = checkpoint_location::locate(&spec.checkpoint_root, &spec.name)?;
    let (checkpoint_dir, checkpoint_uri) =
        match (args.checkpoint_dir, args.checkpoint_uri, location) {
            (dir, Some(uri), _) | (dir, None, CheckpointLocation::Remote(uri)) => {
                (dir.unwrap_or_else(staging), Some(uri))
            }
            (dir, None, CheckpointLocation::Local(local)) => (dir.unwrap_or(local), None),
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
        accumulate_steps,
        rendezvous,
        token: args.rendezvous_token,
        timeouts: crate::collective::Timeouts {
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
/// the last line on stdout: {"event": "failed", "class": "deterministic"|"infra"|"disk_full",
/// "reason"}.
pub fn run(args: TrainArgs) -> ExitCode {
    let json = args.json;
    train::stop::install_signal_handlers();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let opts = options(args).map_err(train::stop::deterministic)?;
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
                use segtrain_wire::{FailureClass, TrainerLine};
                let class = if train::stop::is_disk_full(&e) {
                    FailureClass::DiskFull
                } else if deterministic {
                    FailureClass::Deterministic
                } else {
                    FailureClass::Infra
                };
                let line = TrainerLine::Failed {
                    class,
                    reason: format!("{e:#}"),
                };
                println!("{}", line.to_line());
            }
            ExitCode::from(if deterministic { 3 } else { 1 })
        }
    }
}
