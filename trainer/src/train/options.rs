//! How one rank runs a job: [`TrainOptions`] and how it meets the others ([`Rendezvous`]).

use crate::collective::Timeouts;
use crate::train::remote::RemoteDir;
use segtrain_spec::JobSpec;
use segtrain_wire::ResumeCandidate;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use tch::Device;

/// How one rank runs a job.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    pub spec: JobSpec,
    pub device: Device,
    /// Where this run's checkpoints go.
    pub checkpoint_dir: PathBuf,
    /// Stop after this iteration (with a checkpoint) even if max_iters is later.
    pub stop_at: Option<u64>,
    pub rank: usize,
    pub world: usize,
    /// This attempt's micro-batches per rank per optimizer step. It may differ from
    /// `spec.accumulate_steps` when the attempt runs on another number of ranks than
    /// `spec.world_size`, as long as the global batch stays the spec's ([`check_layout`]).
    pub accumulate_steps: u32,
    /// How this rank finds the others ([`Rendezvous::Single`] for world 1).
    pub rendezvous: Rendezvous,
    /// The job/attempt fingerprint every rank of one attempt shares: a peer with another token
    /// (a stale rank of an earlier attempt) is refused.
    pub token: u64,
    /// How long a rank waits for the others (rendezvous; each collective operation).
    pub timeouts: Timeouts,
    /// Turn off dropout and drop path (for equivalence checks).
    pub no_dropout: bool,
    /// Checkpoints to resume from, newest first (from the coordinator): the first intact one
    /// is used, and the skipped ones are reported. Empty: `spec.resume_from`, if any.
    pub resume_candidates: Vec<ResumeCandidate>,
    /// Set when this rank is asked to stop (see [`super::stop`]); checked at iteration
    /// boundaries.
    pub stop: &'static AtomicBool,
    /// Where checkpoints go when they live in an object store: each is written into
    /// `checkpoint_dir` first (the staging copy), uploaded here, and the staging copy removed.
    pub checkpoint_remote: Option<RemoteDir>,
}

/// Never set: for runs nobody stops.
pub static NEVER_STOP: AtomicBool = AtomicBool::new(false);

impl TrainOptions {
    /// One rank, no collectives, default everything else.
    pub fn single(spec: JobSpec, device: Device, checkpoint_dir: PathBuf) -> TrainOptions {
        TrainOptions {
            accumulate_steps: spec.accumulate_steps,
            spec,
            device,
            checkpoint_dir,
            stop_at: None,
            rank: 0,
            world: 1,
            rendezvous: Rendezvous::Single,
            token: 0,
            timeouts: Timeouts::default(),
            no_dropout: false,
            resume_candidates: Vec::new(),
            stop: &NEVER_STOP,
            checkpoint_remote: None,
        }
    }
}

/// The rule for an attempt's layout: `world × batch_per_gpu × accumulate_steps` must be the
/// spec's `world_size × batch_per_gpu × accumulate_steps`, so that every attempt of a job trains
/// on the same global batches (the sampler and the loss make the step independent of the split)
/// and the optimisation does not depend on how many ranks the job got. The error names the
/// flags and the spec fields, both products, and an accumulation that would fit.
pub fn check_layout(spec: &JobSpec, world: usize, accumulate_steps: u32) -> Result<(), String> {
    if world == 0 {
        return Err("--world: must be at least 1".to_string());
    }
    if accumulate_steps == 0 {
        return Err("--accumulate-steps: must be at least 1".to_string());
    }
    let b = u128::from(spec.batch_per_gpu);
    let mine = world as u128 * b * u128::from(accumulate_steps);
    let job = u128::from(spec.global_batch());
    if mine == job {
        return Ok(());
    }
    let hint = match u32::try_from(world)
        .ok()
        .and_then(|w| spec.accumulate_steps_at(w))
    {
        Some(a) => format!("with --world {world}, use --accumulate-steps {a}"),
        None => format!(
            "--world {world} does not divide {} micro-batches per step",
            u64::from(spec.world_size) * u64::from(spec.accumulate_steps)
        ),
    };
    Err(format!(
        "--world {world} x batch_per_gpu {} x --accumulate-steps {accumulate_steps} = {mine} \
         images per optimizer step, but the job's world_size {} x batch_per_gpu {} x \
         accumulate_steps {} = {job}: an attempt may run on another number of ranks only with \
         the same global batch ({hint})",
        spec.batch_per_gpu, spec.world_size, spec.batch_per_gpu, spec.accumulate_steps
    ))
}

/// How a rank joins the others.
#[derive(Clone, PartialEq, Eq)]
pub enum Rendezvous {
    /// World 1: no collectives.
    Single,
    /// Rank 0 of CPU ranks: listen on `bind` (`host:port`, port 0 for any) and report the
    /// address bound.
    TcpListen { bind: String },
    /// Ranks 1.. of CPU ranks: connect to rank 0's reported address.
    TcpConnect { addr: String },
    /// Rank 0 of GPU ranks: make an NCCL unique id and report it.
    NcclCreate,
    /// Ranks 1.. of GPU ranks: join with rank 0's unique id.
    NcclJoin { id: [u8; 128] },
}

impl std::str::FromStr for Rendezvous {
    type Err = String;

    /// `single`, `tcp-listen:HOST:PORT`, `tcp:HOST:PORT`, `nccl-create` or `nccl:<base64 id>`.
    fn from_str(s: &str) -> Result<Rendezvous, String> {
        use base64::Engine;
        let host_port = |rest: &str| match rest.rsplit_once(':') {
            Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok() => Ok(rest.to_string()),
            _ => Err(format!("expected HOST:PORT after the colon, got {rest:?}")),
        };
        if s == "single" {
            Ok(Rendezvous::Single)
        } else if s == "nccl-create" {
            Ok(Rendezvous::NcclCreate)
        } else if let Some(rest) = s.strip_prefix("tcp-listen:") {
            Ok(Rendezvous::TcpListen {
                bind: host_port(rest)?,
            })
        } else if let Some(rest) = s.strip_prefix("tcp:") {
            Ok(Rendezvous::TcpConnect {
                addr: host_port(rest)?,
            })
        } else if let Some(rest) = s.strip_prefix("nccl:") {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(rest.trim())
                .map_err(|e| format!("nccl:<id>: the id is not base64 ({e})"))?;
            let id: [u8; 128] = bytes.as_slice().try_into().map_err(|_| {
                format!(
                    "nccl:<id>: an NCCL unique id has 128 bytes, got {}",
                    bytes.len()
                )
            })?;
            Ok(Rendezvous::NcclJoin { id })
        } else {
            Err(format!(
                "expected single, tcp-listen:HOST:PORT, tcp:HOST:PORT, nccl-create or \
                 nccl:<base64 id>, got {s:?}"
            ))
        }
    }
}

impl std::fmt::Debug for Rendezvous {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rendezvous::Single => write!(f, "single"),
            Rendezvous::TcpListen { bind } => write!(f, "tcp-listen:{bind}"),
            Rendezvous::TcpConnect { addr } => write!(f, "tcp:{addr}"),
            Rendezvous::NcclCreate => write!(f, "nccl-create"),
            Rendezvous::NcclJoin { .. } => write!(f, "nccl:<unique id>"),
        }
    }
}
