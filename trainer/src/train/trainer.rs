//! The training loop: iteration-based, gradient accumulation over micro-batches, the recipe's
//! AdamW groups and LR schedule, periodic logging, evaluation and checkpoints, and exact resume.
//!
//! Determinism: libtorch's generator (dropout, drop path) is re-seeded from (seed, iteration,
//! rank) at every iteration, and augmentation randomness is a function of (seed, epoch, sample
//! position) in the loader, so a resumed run needs no RNG state beyond the iteration and the
//! sampler position, and reproduces an uninterrupted run bit for bit (on the same device kind).
//!
//! Data parallelism: every rank runs this loop on its shard of the data. Rank 0
//! opens the rendezvous endpoint and reports it ([`TrainEvent::Rendezvous`]) before it waits
//! for the others; then rank 0's parameters, BatchNorm buffers and optimizer moments are
//! broadcast; every step all-reduces (averages) the one flat gradient before the update;
//! the logged loss and the evaluation's confusion matrix and loss are all-reduced, so every rank
//! computes the same metrics and the same best; only rank 0 reports and writes checkpoints.
//! The head's BatchNorm uses SyncBN when the spec says so (`sync_bn`, the default for more than
//! one rank); its running statistics are the same on every rank before every evaluation and
//! checkpoint ([`super::buffers`]). World 1 uses [`Single`] and skips every collective.

use super::buffers::{Buffers, StepBuffers};
use super::checkpoint::{self, Saved};
use super::eval::{accumulate, evaluate, normalise, EvalConfig, EvalResult};
use super::loss::segmentation_loss;
use super::remote::{self, RemoteDir, RemoteStore};
use super::stop::deterministic;
use crate::collective::nccl::NcclCollective;
use crate::collective::tcp::{TcpCollective, TcpRendezvous};
use crate::collective::{Collective, Single, Timeouts};
use crate::data::augment::AugmentConfig;
use crate::data::cityscapes;
use crate::data::cityscapes::Sample;
use crate::data::error::DataError;
use crate::data::loader::{eval_samples, TrainLoader};
use crate::data::sampler::DistributedSampler;
use crate::data::SamplerState;
use crate::model::{weights, SegFormer, SegFormerConfig};
use crate::optim::adamw::AdamWConfig;
use crate::optim::{FlatAdamW, LrSchedule};
use anyhow::{bail, Context};
use segtrain_spec::{JobSpec, Precision};
use segtrain_wire::checkpoint_location::{is_remote, local_path};
pub use segtrain_wire::ResumeCandidate;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tch::{nn, Device, Kind, Tensor};

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

/// On CUDA, how many iterations apart the ranks agree on stopping (the agreement reads one
/// number back to the host); on the CPU it is every iteration.
const STOP_CHECK_EVERY_CUDA: u64 = 10;

impl TrainOptions {
    /// One rank, no collectives, default everything else.
    pub fn single(spec: JobSpec, device: Device, checkpoint_dir: PathBuf) -> TrainOptions {
        TrainOptions {
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

/// What the loop reports, in order.
#[derive(Debug, Clone)]
pub enum TrainEvent {
    /// Rank 0's rendezvous endpoint, as soon as it exists (before waiting for the others): the
    /// worker daemon publishes it through the coordinator to the other ranks.
    Rendezvous {
        tcp_address: Option<String>,
        nccl_unique_id: Option<Vec<u8>>,
    },
    /// The collective backend is up (after the rendezvous): `backend` "nccl" or "tcp", and
    /// what it runs on (library and version, rank, world, device).
    Collective {
        backend: String,
        detail: String,
    },
    Started {
        start_iteration: u64,
        max_iters: u64,
        train_images: usize,
        val_images: usize,
        device: String,
        resumed_from: Option<PathBuf>,
        parameters: i64,
    },
    /// Averages since the previous report: loss, lr, images_per_s, data_wait_ms, step_ms; on
    /// CUDA also this rank's GPU memory now, at its peak and reserved (gpu_mem_bytes,
    /// gpu_mem_peak_bytes, gpu_mem_reserved_bytes). Rank 0's: the job's metrics.
    Metrics {
        iteration: u64,
        values: BTreeMap<String, f64>,
    },
    /// The same values on ranks other than 0 (their own step time, data wait and memory): for
    /// their worker daemon's gauges, never stored with the job.
    RankMetrics {
        iteration: u64,
        values: BTreeMap<String, f64>,
    },
    Eval {
        iteration: u64,
        result: EvalResult,
    },
    /// The run resumed from `uri` (at `iteration`); `skipped` are newer candidates that were
    /// unusable: (iteration, location, why).
    Resumed {
        iteration: u64,
        uri: String,
        skipped: Vec<(u64, String, String)>,
    },
    /// Rank 0 starts writing the checkpoint of `iteration` to `uri` (a path or a gs:// URI).
    CheckpointPending {
        iteration: u64,
        uri: String,
    },
    /// Asked to stop: every rank stopped after `iteration` (checkpointed by rank 0).
    Stopped {
        iteration: u64,
    },
    /// A checkpoint is durable at `uri` (the local directory, or its object-store copy);
    /// retention deleted `deleted`.
    Checkpoint {
        saved: Saved,
        uri: String,
        metrics: BTreeMap<String, f64>,
        deleted: Vec<String>,
    },
    Finished {
        iteration: u64,
        best: Option<(f64, u64)>,
    },
}

pub trait EventSink {
    fn event(&mut self, ev: &TrainEvent);
}

impl<F: FnMut(&TrainEvent)> EventSink for F {
    fn event(&mut self, ev: &TrainEvent) {
        self(ev)
    }
}

#[derive(Debug, Clone)]
pub struct TrainSummary {
    pub iteration: u64,
    /// The run stopped early because it was asked to (a checkpoint of `iteration` exists).
    pub stopped: bool,
    pub last_checkpoint: Option<Saved>,
    pub best: Option<(f64, u64)>,
    pub last_eval: Option<EvalResult>,
}

/// splitmix64: decorrelates seeds derived from small integers.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn due(iteration: u64, interval: u64) -> bool {
    interval > 0 && iteration.is_multiple_of(interval)
}

/// Joins the other ranks as `opts.rendezvous` says. Rank 0 reports its endpoint through `sink`
/// before it waits for them.
fn connect(opts: &TrainOptions, sink: &mut dyn EventSink) -> anyhow::Result<Box<dyn Collective>> {
    let (rank, world, token, timeouts) = (opts.rank, opts.world, opts.token, opts.timeouts);
    if world == 0 || rank >= world {
        bail!("rank {rank} is not a rank of a world of {world} (ranks are 0..{world})");
    }
    let cuda_ordinal = || match opts.device {
        Device::Cuda(n) => Ok(n),
        d => Err(anyhow::anyhow!(
            "rendezvous {:?}: NCCL needs a CUDA device, this rank runs on {d:?}; CPU ranks use \
             tcp-listen:HOST:PORT / tcp:HOST:PORT",
            opts.rendezvous
        )),
    };
    let nccl_detail = |ordinal: usize| {
        format!(
            "NCCL {} ({}), rank {rank} of {world} on cuda:{ordinal}",
            NcclCollective::version().unwrap_or_else(|e| e.to_string()),
            crate::collective::nccl::library_path()
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        )
    };
    let comm: Box<dyn Collective> = match (&opts.rendezvous, rank) {
        (Rendezvous::Single, _) if world == 1 => Box::new(Single),
        (Rendezvous::Single, _) => bail!(
            "world {world} needs a rendezvous: rank 0 tcp-listen:HOST:PORT or nccl-create, \
             the others tcp:HOST:PORT or nccl:<id>"
        ),
        // NCCL with a world of 1 is allowed (GPU daemons always use NCCL); TCP is not.
        (rv, _) if world == 1 && *rv != Rendezvous::NcclCreate => {
            bail!("rendezvous {rv:?}: a world of 1 has nobody to meet; use single or nccl-create")
        }
        (Rendezvous::TcpListen { bind }, 0) => {
            let (listener, addr) = TcpRendezvous::bind(bind)?;
            sink.event(&TrainEvent::Rendezvous {
                tcp_address: Some(addr),
                nccl_unique_id: None,
            });
            Box::new(listener.accept(world, token, timeouts)?)
        }
        (Rendezvous::TcpConnect { addr }, r) if r > 0 => {
            Box::new(TcpCollective::connect(addr, r, world, token, timeouts)?)
        }
        (Rendezvous::NcclCreate, 0) => {
            let ordinal = cuda_ordinal()?;
            let id = NcclCollective::unique_id()?;
            sink.event(&TrainEvent::Rendezvous {
                tcp_address: None,
                nccl_unique_id: Some(id.to_vec()),
            });
            let comm = NcclCollective::init_on(id, 0, world, ordinal, timeouts)?;
            sink.event(&TrainEvent::Collective {
                backend: "nccl".into(),
                detail: nccl_detail(ordinal),
            });
            Box::new(comm)
        }
        (Rendezvous::NcclJoin { id }, r) if r > 0 => {
            let ordinal = cuda_ordinal()?;
            let comm = NcclCollective::init_on(*id, r, world, ordinal, timeouts)?;
            sink.event(&TrainEvent::Collective {
                backend: "nccl".into(),
                detail: nccl_detail(ordinal),
            });
            Box::new(comm)
        }
        (rv, r) => bail!(
            "rank {r} cannot use rendezvous {rv:?}: rank 0 uses tcp-listen:HOST:PORT or \
             nccl-create, ranks 1.. use tcp:HOST:PORT or nccl:<id>"
        ),
    };
    Ok(comm)
}

/// Makes every rank start from rank 0's state: checks that all ranks resumed at the same point,
/// then broadcasts the parameters, the BatchNorm buffers and the optimizer moments.
fn sync_start(
    comm: &mut dyn Collective,
    vs: &nn::VarStore,
    opt: &FlatAdamW,
    start: u64,
    sampler: SamplerState,
    device: Device,
) -> anyhow::Result<()> {
    let mine = [
        start as i64,
        opt.steps() as i64,
        sampler.epoch as i64,
        sampler.position as i64,
        opt.num_params(),
    ];
    let mut theirs = Tensor::from_slice(&mine).to_device(device);
    comm.broadcast(&mut theirs, 0)?;
    let theirs = Vec::<i64>::try_from(theirs.to_device(Device::Cpu))?;
    if theirs != mine {
        bail!(
            "rank {} does not start where rank 0 does: (iteration, optimizer steps, epoch, \
             sampler position, parameters) = {mine:?} here, {theirs:?} on rank 0; every rank \
             must resume from the same checkpoint",
            comm.rank()
        );
    }
    let mut params = opt.params().shallow_clone();
    comm.broadcast(&mut params, 0)?;
    for (_, mut t) in opt.state_tensors() {
        comm.broadcast(&mut t, 0)?;
    }
    Buffers::of(vs).broadcast(comm, 0)
}

/// Evaluation with `world` ranks: this rank takes val samples rank, rank + world, ...; the
/// confusion matrices, loss sums and image counts are summed over ranks, so every rank gets
/// the metrics of the whole val set.
fn evaluate_shard(
    model: &SegFormer,
    val: &[Sample],
    device: Device,
    cfg: &EvalConfig,
    comm: &mut dyn Collective,
) -> anyhow::Result<EvalResult> {
    let shard: Vec<Sample> = val
        .iter()
        .skip(comm.rank())
        .step_by(comm.world())
        .cloned()
        .collect();
    let mut totals = accumulate(
        model,
        eval_samples(&shard).map(|r| r.map_err(anyhow::Error::from)),
        device,
        cfg,
    )?;
    let counts: Vec<i64> = totals.cm.counts.iter().map(|&c| c as i64).collect();
    let mut counts = Tensor::from_slice(&counts).to_device(device);
    comm.all_reduce_sum(&mut counts)?;
    let mut sums = Tensor::from_slice(&[totals.loss_sum, totals.images as f64]).to_device(device);
    comm.all_reduce_sum(&mut sums)?;
    let counts = Vec::<i64>::try_from(counts.to_device(Device::Cpu))?;
    totals.cm.counts = counts.into_iter().map(|c| c as u64).collect();
    let sums = Vec::<f64>::try_from(sums.to_device(Device::Cpu))?;
    totals.loss_sum = sums[0];
    totals.images = sums[1].round() as usize;
    Ok(totals.result())
}

/// One micro-batch of a training step: u8 NHWC images and u8 labels (on the CPU: copied to
/// `device` through pinned memory, asynchronously), normalised, the forward pass (bf16 autocast
/// on CUDA when asked), the loss scaled by 1/`accumulate`, backward. With `sync_bn`, the head's
/// BatchNorm uses the statistics of every rank's micro-batch, summed through that collective
/// (every rank must call this the same number of times). Returns the detached loss; nothing is
/// read back to the host. The trainer and `segtrain-worker bench` share it.
pub fn forward_backward(
    model: &SegFormer,
    images: &Tensor,
    labels: &Tensor,
    precision: Precision,
    device: Device,
    accumulate: u32,
    sync_bn: Option<&mut dyn Collective>,
) -> anyhow::Result<Tensor> {
    let scale = 1.0 / f64::from(accumulate);
    let Some(comm) = sync_bn else {
        let loss = forward_loss(model, images, labels, precision, device) * scale;
        loss.f_backward()?;
        return Ok(loss.detach());
    };
    let (x, y) = on_device(images, labels, device);
    let mut global_sum =
        |t: &mut Tensor| -> anyhow::Result<()> { comm.all_reduce_sum(t).context("SyncBN") };
    let (logits, tape) = autocast(precision, device, || {
        model.forward_sync(&x, &mut global_sum)
    })?;
    let loss = segmentation_loss(&logits, &y) * scale;
    tape.backward(&loss, &mut global_sum)?;
    Ok(loss.detach())
}

/// The forward half of [`forward_backward`] without SyncBN: the (attached) loss of one
/// micro-batch.
pub fn forward_loss(
    model: &SegFormer,
    images: &Tensor,
    labels: &Tensor,
    precision: Precision,
    device: Device,
) -> Tensor {
    let (x, y) = on_device(images, labels, device);
    let logits = autocast(precision, device, || model.forward_t(&x, true));
    segmentation_loss(&logits, &y)
}

/// Runs a forward pass under bf16 autocast when `precision` asks for it on CUDA.
fn autocast<T>(precision: Precision, device: Device, forward: impl FnOnce() -> T) -> T {
    match precision {
        Precision::Bf16 if device != Device::Cpu => crate::torch_ext::with_bf16_autocast(forward),
        _ => forward(),
    }
}

/// A micro-batch on `device`: normalised f32 NCHW images and i64 labels.
fn on_device(images: &Tensor, labels: &Tensor, device: Device) -> (Tensor, Tensor) {
    let (images, labels) = if images.device() == device {
        (images.shallow_clone(), labels.shallow_clone())
    } else {
        (
            images
                .pin_memory(device)
                .to_device_(device, Kind::Uint8, true, false),
            labels
                .pin_memory(device)
                .to_device_(device, Kind::Uint8, true, false),
        )
    };
    (normalise(&images), labels.to_kind(Kind::Int64))
}

/// A checkpoint that was loaded and verified, with the newer candidates skipped on the way.
type ResumePoint = (
    String,
    PathBuf,
    checkpoint::Loaded,
    Vec<(u64, String, String)>,
);

/// Where this rank resumes: the first intact checkpoint of `opts.resume_candidates` (its
/// manifest digest must match the recorded one, and every file its manifest digest), else
/// `spec.resume_from`, else nowhere. No intact candidate at all is a deterministic failure.
fn pick_resume_point(opts: &TrainOptions) -> anyhow::Result<Option<ResumePoint>> {
    if opts.resume_candidates.is_empty() {
        let Some(r) = &opts.spec.resume_from else {
            return Ok(None);
        };
        let dir = fetch(opts, r)
            .with_context(|| format!("resume_from: {r}"))
            .map_err(deterministic)?;
        let ck = checkpoint::load(&dir)
            .with_context(|| format!("resume_from: {}", dir.display()))
            .map_err(deterministic)?;
        return Ok(Some((r.clone(), dir, ck, Vec::new())));
    }
    let mut skipped = Vec::new();
    for c in &opts.resume_candidates {
        let loaded = fetch(opts, &c.uri)
            .and_then(|dir| checkpoint::verify_manifest_digest(&dir, &c.sha256).map(|()| dir));
        let (dir, loaded) = match loaded {
            Ok(dir) => {
                let ck = checkpoint::load(&dir);
                (dir, ck)
            }
            Err(e) => (PathBuf::new(), Err(e)),
        };
        let loaded = loaded.and_then(|ck| {
            if ck.manifest.iteration == c.iteration {
                Ok(ck)
            } else {
                bail!(
                    "its manifest says iteration {}, the record says {}",
                    ck.manifest.iteration,
                    c.iteration
                )
            }
        });
        match loaded {
            Ok(ck) => return Ok(Some((c.uri.clone(), dir, ck, skipped))),
            Err(e) => skipped.push((c.iteration, c.uri.clone(), format!("{e:#}"))),
        }
    }
    let why: Vec<String> = skipped
        .iter()
        .map(|(it, uri, e)| format!("iteration {it} ({uri}): {e}"))
        .collect();
    Err(deterministic(anyhow::anyhow!(
        "no intact checkpoint to resume from: {}",
        why.join("; ")
    )))
}

/// A local directory holding the checkpoint at `uri`: the path itself, or a download of an
/// object-store checkpoint into `<checkpoint_dir>/.resume/`.
fn fetch(opts: &TrainOptions, uri: &str) -> anyhow::Result<PathBuf> {
    let from_store = |store: &RemoteStore, path: &object_store::path::Path| {
        let name = path
            .filename()
            .map(str::to_string)
            .unwrap_or_else(|| "checkpoint".to_string());
        let local = opts.checkpoint_dir.join(".resume").join(name);
        remote::download(store, path, &local).map(|()| local)
    };
    if let Some(r) = &opts.checkpoint_remote {
        if let Some(path) = r.store.path_of(uri) {
            return from_store(&r.store, &path);
        }
    }
    if is_remote(uri) {
        let (store, path) = RemoteStore::open(uri)?;
        return from_store(&store, &path);
    }
    local_path("resume_from", uri)
}

/// Rank 0 writes the checkpoint of `iteration` (announced first, so it is PENDING until it is
/// durable), then applies retention; both are reported.
#[allow(clippy::too_many_arguments)]
fn write_checkpoint(
    opts: &TrainOptions,
    vs: &nn::VarStore,
    opt: &FlatAdamW,
    iteration: u64,
    sampler: SamplerState,
    metrics: BTreeMap<String, f64>,
    best: Option<(f64, u64)>,
    sink: &mut dyn EventSink,
) -> anyhow::Result<Saved> {
    let spec = &opts.spec;
    let name = checkpoint::dir_name(iteration);
    let pending_uri = match &opts.checkpoint_remote {
        Some(r) => r.store.uri(&r.path.clone().join(name.as_str())),
        None => opts.checkpoint_dir.join(&name).display().to_string(),
    };
    sink.event(&TrainEvent::CheckpointPending {
        iteration,
        uri: pending_uri,
    });
    let saved = checkpoint::save(
        &opts.checkpoint_dir,
        checkpoint::Contents {
            iteration,
            optimizer_steps: opt.steps(),
            sampler,
            spec,
            metrics: metrics.clone(),
            best,
            optimizer_layout: opt.slots().to_vec(),
            model: vs.variables().into_iter().collect(),
            optimizer: opt.state_tensors(),
        },
    )?;
    let best_it = if spec.keep_best {
        best.map(|(_, i)| i)
    } else {
        None
    };
    let (uri, deleted) = match &opts.checkpoint_remote {
        Some(r) => {
            let uri = r.upload(&saved.dir)?;
            // The store holds it now; the staging copy only costs disk.
            std::fs::remove_dir_all(&saved.dir)
                .with_context(|| format!("cannot remove {}", saved.dir.display()))?;
            (uri, r.retain(spec.keep_last as usize, best_it)?)
        }
        None => {
            let deleted =
                checkpoint::retain(&opts.checkpoint_dir, spec.keep_last as usize, best_it)?;
            (
                saved.dir.display().to_string(),
                deleted.iter().map(|d| d.display().to_string()).collect(),
            )
        }
    };
    sink.event(&TrainEvent::Checkpoint {
        saved: saved.clone(),
        uri,
        metrics,
        deleted,
    });
    Ok(saved)
}

/// Whether every rank stops after `iteration`: any rank's stop request counts, agreed through
/// one all-reduce so all ranks leave the loop together. On CUDA only every
/// [`STOP_CHECK_EVERY_CUDA`] iterations (the agreement is a host read-back).
fn stop_agreed(
    opts: &TrainOptions,
    comm: &mut dyn Collective,
    iteration: u64,
) -> anyhow::Result<bool> {
    let mine = opts.stop.load(Ordering::SeqCst);
    if opts.world == 1 {
        return Ok(mine);
    }
    if opts.device != Device::Cpu && !iteration.is_multiple_of(STOP_CHECK_EVERY_CUDA) {
        return Ok(false);
    }
    let mut flag = Tensor::from_slice(&[if mine { 1f32 } else { 0f32 }]).to_device(opts.device);
    comm.all_reduce_sum(&mut flag)?;
    Ok(f32::try_from(flag.to_device(Device::Cpu).reshape([-1i64]).get(0))? > 0.0)
}

/// Runs (or resumes) a job on this rank. Returns after `max_iters` (or `stop_at`).
pub fn train(opts: TrainOptions, sink: &mut dyn EventSink) -> anyhow::Result<TrainSummary> {
    let spec = &opts.spec;
    let device = opts.device;
    let (rank, world) = (opts.rank, opts.world);
    if world as u64 != u64::from(spec.world_size) {
        bail!(
            "world_size: the job has {} ranks, this rank was started for a world of {world}",
            spec.world_size
        );
    }
    // First, so that rank 0 publishes its endpoint as early as possible.
    let mut comm = connect(&opts, sink)?;
    tch::manual_seed(mix(spec.seed) as i64);
    if device != Device::Cpu {
        crate::torch_ext::set_cudnn_flags(false, true); // the recipe: cudnn_benchmark=True
                                                        // fp32 runs its matmuls and convolutions as TF32 on tensor cores (as the reference
                                                        // trainer does); bf16 autocast is unaffected.
        crate::torch_ext::set_tf32(true);
    }

    // Model, initial weights, optimizer.
    let vs = nn::VarStore::new(device);
    let mut model = SegFormer::new(
        &vs.root(),
        SegFormerConfig::variant(spec.variant, spec.num_classes as i64),
    );
    if let Some(p) = &spec.pretrained {
        let fetched;
        let path = if is_remote(p) {
            // Fetched like checkpoints are; loaded from a temporary copy.
            let (store, object) = remote::RemoteStore::open(p)
                .with_context(|| format!("pretrained: {p}"))
                .map_err(deterministic)?;
            fetched = tempfile::Builder::new()
                .prefix("segtrain-pretrained-")
                .suffix(".safetensors")
                .tempfile()
                .context("pretrained: cannot make a temporary file")?;
            remote::fetch(&store, &object, fetched.path()).context("pretrained")?;
            fetched.path().to_path_buf()
        } else {
            local_path("pretrained", p)?
        };
        weights::load_file(&vs, &path)
            .with_context(|| format!("pretrained: {p}"))
            .map_err(deterministic)?;
    }
    if opts.no_dropout {
        model.disable_stochastic();
    }
    let mut opt = FlatAdamW::new(
        &vs,
        AdamWConfig {
            weight_decay: spec.weight_decay,
            head_lr_mult: spec.head_lr_mult,
            ..AdamWConfig::default()
        },
    );

    // Resume.
    let mut start = 0u64;
    let mut sampler_state = SamplerState::default();
    let mut best: Option<(f64, u64)> = None;
    let mut resumed_from = None;
    if let Some((uri, dir, ck, skipped)) = pick_resume_point(&opts)? {
        if ck.manifest.optimizer_layout != opt.slots() {
            return Err(deterministic(anyhow::anyhow!(
                "resume_from: {}: the checkpoint was made for a different model",
                dir.display()
            )));
        }
        weights::load_tensors(&vs, ck.model, &dir.display().to_string())
            .map_err(|e| deterministic(e.into()))?;
        opt.load_state(&ck.optimizer, ck.manifest.optimizer_steps)
            .map_err(|e| deterministic(e.into()))?;
        start = ck.manifest.iteration;
        sampler_state = ck.manifest.sampler;
        best = ck.manifest.best;
        if rank == 0 {
            sink.event(&TrainEvent::Resumed {
                iteration: start,
                uri,
                skipped,
            });
        }
        resumed_from = Some(dir);
    }
    if world > 1 {
        sync_start(&mut *comm, &vs, &opt, start, sampler_state, device)?;
    }

    // Data.
    let root = Path::new(&spec.dataset_root);
    let train_samples = cityscapes::scan(root, "train")?;
    // No val split means no evaluation; a broken one is an error like a broken train split.
    let val_samples = match cityscapes::scan(root, "val") {
        Ok(v) => v,
        Err(DataError::MissingSplit { .. } | DataError::NoImages { .. }) => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    let sampler =
        DistributedSampler::new(train_samples.len(), opts.rank, opts.world, spec.seed, true)?
            .with_state(sampler_state)?;
    let augment = AugmentConfig::recipe(spec.crop_height as usize, spec.crop_width as usize);
    let mut loader = TrainLoader::start(
        train_samples.clone(),
        sampler,
        augment,
        spec.batch_per_gpu as usize,
        spec.loader_threads as usize,
        // Enough batches in flight to keep every loader thread busy.
        (spec.loader_threads as usize).div_ceil(spec.batch_per_gpu as usize) + 2,
        spec.seed,
    )?;
    let eval_cfg = EvalConfig {
        mode: spec.eval_mode,
        crop: spec.eval_crop as i64,
        stride: spec.eval_stride as i64,
        precision: spec.precision,
    };

    let end = opts
        .stop_at
        .map_or(spec.max_iters, |s| s.min(spec.max_iters));
    sink.event(&TrainEvent::Started {
        start_iteration: start,
        max_iters: spec.max_iters,
        train_images: train_samples.len(),
        val_images: val_samples.len(),
        device: format!("{device:?}"),
        resumed_from,
        parameters: opt.num_params(),
    });

    let schedule = LrSchedule::from_spec(spec);
    // Images per optimizer step over all ranks.
    let images_per_step = (spec.batch_per_gpu * spec.accumulate_steps) as f64 * world as f64;
    let mut loss_acc = Tensor::zeros([], (Kind::Float, device));
    let (mut window_iters, mut window_wait, mut window_start) =
        (0u64, Duration::ZERO, Instant::now());
    let mut last_checkpoint = None;
    let mut last_eval = None;
    let mut last_metrics: BTreeMap<String, f64> = BTreeMap::new();
    let sync_bn = world > 1 && spec.sync_bn;
    let mut buffers = Buffers::of(&vs);
    // (offset, length) in the flat gradient of the parameters the loss does not depend on.
    let invariant: Vec<(i64, i64)> = opt
        .slots()
        .iter()
        .filter(|s| crate::model::is_loss_invariant(&s.name))
        .map(|s| (s.offset, s.shape.iter().product()))
        .collect();

    super::stop::entering_loop();
    for it in start..end {
        let iteration = it + 1;
        let lr = schedule.lr(it);
        tch::manual_seed(mix(spec.seed ^ mix(it) ^ mix(opts.rank as u64 + 1)) as i64);
        let mut step_buffers = (spec.accumulate_steps > 1).then(|| StepBuffers::begin(&buffers));
        for _ in 0..spec.accumulate_steps {
            if let Some(s) = step_buffers.as_mut() {
                s.before(&mut buffers);
            }
            let wait = Instant::now();
            let batch = loader.next_batch()?;
            window_wait += wait.elapsed();
            sampler_state = batch.next;
            let (n, h, w) = (batch.n as i64, batch.height as i64, batch.width as i64);
            let images = Tensor::from_data_size(&batch.images, &[n, h, w, 3], Kind::Uint8);
            let labels = Tensor::from_data_size(&batch.labels, &[n, h, w], Kind::Uint8);
            loss_acc += forward_backward(
                &model,
                &images,
                &labels,
                spec.precision,
                device,
                spec.accumulate_steps,
                if sync_bn {
                    Some(&mut *comm as &mut dyn Collective)
                } else {
                    None
                },
            )?;
            if let Some(s) = step_buffers.as_mut() {
                s.after(&buffers);
            }
        }
        if let Some(s) = step_buffers {
            s.end(&mut buffers);
        }
        let mut grad = opt.flat_grad();
        if world > 1 {
            comm.all_reduce_mean(&mut grad)?;
        }
        for &(offset, len) in &invariant {
            let _ = grad.narrow(0, offset, len).zero_();
        }
        opt.step(&grad, lr)?;
        opt.zero_grad();
        window_iters += 1;

        let last = iteration == spec.max_iters;
        if due(iteration, spec.log_interval) || last || iteration == end {
            // The one host read-back of the loss per log interval (averaged over ranks).
            if world > 1 {
                comm.all_reduce_mean(&mut loss_acc)?;
            }
            let loss = f64::try_from(&loss_acc)? / window_iters as f64;
            if !loss.is_finite() {
                return Err(deterministic(anyhow::anyhow!(
                    "the loss is {loss} at iteration {iteration}: training diverged"
                )));
            }
            let secs = window_start.elapsed().as_secs_f64().max(1e-9);
            let mut values = BTreeMap::from([
                ("loss".to_string(), loss),
                ("lr".to_string(), lr),
                (
                    "images_per_s".to_string(),
                    window_iters as f64 * images_per_step / secs,
                ),
                (
                    "data_wait_ms".to_string(),
                    window_wait.as_secs_f64() * 1e3 / window_iters as f64,
                ),
                ("step_ms".to_string(), secs * 1e3 / window_iters as f64),
            ]);
            if let Device::Cuda(index) = device {
                if let Some(m) = crate::torch_ext::cuda_memory(index) {
                    values.insert("gpu_mem_bytes".to_string(), m.allocated as f64);
                    values.insert("gpu_mem_peak_bytes".to_string(), m.peak_allocated as f64);
                    values.insert("gpu_mem_reserved_bytes".to_string(), m.reserved as f64);
                }
            }
            if rank == 0 {
                sink.event(&TrainEvent::Metrics {
                    iteration,
                    values: values.clone(),
                });
            } else {
                // The other ranks' own speed and memory, for their daemons' gauges only.
                sink.event(&TrainEvent::RankMetrics {
                    iteration,
                    values: values.clone(),
                });
            }
            last_metrics = values;
            loss_acc = Tensor::zeros([], (Kind::Float, device));
            window_iters = 0;
            window_wait = Duration::ZERO;
            window_start = Instant::now();
        }

        let eval_due = (due(iteration, spec.eval_interval) || last) && !val_samples.is_empty();
        let checkpoint_due = due(iteration, spec.checkpoint_interval) || last || iteration == end;
        if world > 1 && !sync_bn && (eval_due || checkpoint_due) {
            // One model on every rank: the one evaluated is the one saved.
            buffers.mean_over_ranks(&mut *comm)?;
        }
        let mut new_best = false;
        let mut eval_metrics = BTreeMap::new();
        if eval_due {
            let result = if world == 1 {
                evaluate(
                    &model,
                    eval_samples(&val_samples).map(|r| r.map_err(anyhow::Error::from)),
                    device,
                    &eval_cfg,
                )?
            } else {
                evaluate_shard(&model, &val_samples, device, &eval_cfg, &mut *comm)?
            };
            eval_metrics = BTreeMap::from([
                ("miou".to_string(), result.metrics.miou),
                ("aacc".to_string(), result.metrics.aacc),
                ("val_loss".to_string(), result.loss),
            ]);
            if best.is_none_or(|(b, _)| result.metrics.miou > b) {
                best = Some((result.metrics.miou, iteration));
                new_best = true;
            }
            if rank == 0 {
                sink.event(&TrainEvent::Eval {
                    iteration,
                    result: result.clone(),
                });
            }
            last_eval = Some(result);
            window_start = Instant::now(); // evaluation time is not training throughput
        }

        let keep_best_here = new_best && spec.keep_best;
        // Only rank 0 writes checkpoints (the others hold the same parameters).
        if rank == 0 && (checkpoint_due || keep_best_here) {
            let mut metrics = last_metrics.clone();
            metrics.extend(eval_metrics);
            let saved = write_checkpoint(
                &opts,
                &vs,
                &opt,
                iteration,
                sampler_state,
                metrics,
                best,
                sink,
            )?;
            last_checkpoint = Some(saved);
            window_start = Instant::now();
        }

        if iteration < end && stop_agreed(&opts, &mut *comm, iteration)? {
            if world > 1 && !sync_bn {
                buffers.mean_over_ranks(&mut *comm)?;
            }
            if rank == 0
                && last_checkpoint
                    .as_ref()
                    .is_none_or(|c: &Saved| c.iteration != iteration)
            {
                let saved = write_checkpoint(
                    &opts,
                    &vs,
                    &opt,
                    iteration,
                    sampler_state,
                    last_metrics.clone(),
                    best,
                    sink,
                )?;
                last_checkpoint = Some(saved);
            }
            if world > 1 {
                comm.barrier()?;
            }
            sink.event(&TrainEvent::Stopped { iteration });
            return Ok(TrainSummary {
                iteration,
                stopped: true,
                last_checkpoint,
                best,
                last_eval,
            });
        }
    }
    if world > 1 {
        // Nobody reports success before rank 0 has written the last checkpoint.
        comm.barrier()?;
    }
    sink.event(&TrainEvent::Finished {
        iteration: end,
        best,
    });
    Ok(TrainSummary {
        iteration: end,
        stopped: false,
        last_checkpoint,
        best,
        last_eval,
    })
}
