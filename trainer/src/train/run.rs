//! The training loop: iteration-based, gradient accumulation over micro-batches, the recipe's
//! AdamW groups and LR schedule, periodic logging, evaluation and checkpoints, and exact resume.
//!
//! Determinism: libtorch's generator (dropout, drop path) is re-seeded before every micro-batch
//! from (seed, iteration, global micro-batch index `k`), and augmentation randomness is a
//! function of (seed, epoch, sample position) in the loader, so a resumed run needs no RNG state
//! beyond the iteration and the sampler position, and reproduces an uninterrupted run bit for
//! bit (on the same device kind).
//!
//! Elastic world size: an attempt may run on `world` ranks with `accumulate_steps` micro-batches
//! each, other than the spec's, when the global batch is the spec's
//! ([`super::options::check_layout`]). The sampler gives micro-batch `k = m·world + rank` of a
//! step the same images for any split, and `k` (not the rank) seeds its dropout, so every split
//! computes the same micro-batch losses and the same averaged gradient: a job can go from 2 ranks
//! to 1 rank accumulating 2 and back through checkpoints and follow the uninterrupted trajectory
//! to rounding (not with SyncBN, whose normalisation groups depend on the world size).
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
use super::eval::{accumulate, EvalConfig, EvalResult};
use super::events::{EventSink, RunStart, TrainEvent, TrainSummary};
use super::options::{check_layout, TrainOptions};
use super::remote::{self};
use super::rendezvous::{connect, sync_start};
use super::resume::pick_resume_point;
use super::step::forward_backward;
use super::stop::deterministic;
use crate::collective::Collective;
use crate::data::augment::AugmentConfig;
use crate::data::cityscapes;
use crate::data::cityscapes::Sample;
use crate::data::error::DataError;
use crate::data::loader::{eval_samples, TrainLoader};
use crate::data::sampler::{BatchLayout, DistributedSampler};
use crate::data::SamplerState;
use crate::model::{weights, SegFormer, SegFormerConfig};
use crate::optim::adamw::AdamWConfig;
use crate::optim::{FlatAdamW, LrSchedule};
use crate::seed::splitmix64 as mix;
use anyhow::Context;
use segtrain_wire::checkpoint_location::{is_remote, local_path};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tch::{nn, Device, Kind, Tensor};

/// On CUDA, how many iterations apart the ranks agree on stopping (the agreement reads one
/// number back to the host); on the CPU it is every iteration.
const STOP_CHECK_EVERY_CUDA: u64 = 10;

fn due(iteration: u64, interval: u64) -> bool {
    interval > 0 && iteration.is_multiple_of(interval)
}

/// Evaluation with `world` ranks: this rank takes val samples rank, rank + world, ...; the
/// confusion matrices, loss sums and image counts are summed over ranks, so every rank gets
/// the metrics of the whole val set (a world of 1 evaluates it all, with no collective).
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
    if comm.world() == 1 {
        return Ok(totals.result());
    }
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
    on_stop: bool,
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
            // The staging copy goes once the store holds it, and when the upload fails.
            let staged = checkpoint::Scratch::new(saved.dir.clone());
            let uri = r.upload(&saved.dir)?;
            drop(staged);
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
        on_stop,
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
    let (rank, world, accumulate) = (opts.rank, opts.world, opts.accumulate_steps);
    check_layout(spec, world, accumulate).map_err(|e| deterministic(anyhow::anyhow!(e)))?;
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

    // Resume (the sampler state is read once the train split's length is known).
    let mut start = 0u64;
    let mut resumed_manifest = None;
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
        best = ck.manifest.best;
        if rank == 0 {
            sink.event(&TrainEvent::Resumed {
                iteration: start,
                uri,
                skipped,
            });
        }
        resumed_from = Some(dir);
        resumed_manifest = Some(ck.manifest);
    }

    // Data.
    let root = Path::new(&spec.dataset_root);
    let train_samples = cityscapes::scan(root, "train")?;
    let mut sampler_state = resumed_manifest
        .as_ref()
        .map_or(SamplerState::default(), |m| {
            m.sampler_state(train_samples.len())
        });
    if world > 1 {
        sync_start(
            &mut *comm,
            &vs,
            &opt,
            start,
            sampler_state,
            accumulate,
            device,
        )?;
    }
    // No val split means no evaluation; a broken one is an error like a broken train split.
    let val_samples = match cityscapes::scan(root, "val") {
        Ok(v) => v,
        Err(DataError::MissingSplit { .. } | DataError::NoImages { .. }) => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    let layout = BatchLayout {
        rank,
        world,
        batch_per_gpu: spec.batch_per_gpu as usize,
        accumulate_steps: accumulate as usize,
    };
    let sampler = DistributedSampler::new(train_samples.len(), layout, spec.seed, true)?
        .with_state(sampler_state)?;
    let augment = AugmentConfig::recipe(spec.crop_height as usize, spec.crop_width as usize);
    let mut loader = TrainLoader::start(
        train_samples.clone(),
        sampler,
        augment,
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
    sink.event(&TrainEvent::Started(RunStart {
        start_iteration: start,
        max_iters: spec.max_iters,
        train_images: train_samples.len() as u64,
        val_images: val_samples.len() as u64,
        device: format!("{device:?}"),
        resumed_from: resumed_from.map(|p| p.display().to_string()),
        parameters: opt.num_params(),
    }));

    let schedule = LrSchedule::from_spec(spec);
    // Images per optimizer step over all ranks (the spec's global batch, by check_layout).
    let images_per_step = layout.global_batch() as f64;
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
        let mut step_buffers = (accumulate > 1).then(|| StepBuffers::begin(&buffers));
        for m in 0..accumulate as usize {
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
            // Dropout and drop path follow the micro-batch, not the rank, so that they are the
            // same for any split of the step; with one micro-batch per rank k is the rank, the
            // seed of earlier versions (mix(rank + 1)).
            let k = layout.micro_batch(m) as u64;
            tch::manual_seed(mix(spec.seed ^ mix(it) ^ mix(k + 1)) as i64);
            loss_acc += forward_backward(
                &model,
                &images,
                &labels,
                spec.precision,
                device,
                accumulate,
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
            let result = evaluate_shard(&model, &val_samples, device, &eval_cfg, &mut *comm)?;
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

        // A stop asked on any rank ends the run here, with a checkpoint of this iteration.
        let stop = iteration < end && stop_agreed(&opts, &mut *comm, iteration)?;
        if stop && world > 1 && !sync_bn {
            buffers.mean_over_ranks(&mut *comm)?;
        }
        let keep_best_here = new_best && spec.keep_best;
        // Only rank 0 writes checkpoints (the others hold the same parameters).
        if rank == 0 && (checkpoint_due || keep_best_here || stop) {
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
                stop,
                sink,
            )?;
            last_checkpoint = Some(saved);
            window_start = Instant::now();
        }

        if stop {
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
