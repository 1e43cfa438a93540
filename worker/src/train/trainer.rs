//! The training loop: iteration-based, gradient accumulation over micro-batches, the recipe's
//! AdamW groups and LR schedule, periodic logging, evaluation and checkpoints, and exact resume.
//!
//! Determinism: libtorch's generator (dropout, drop path) is re-seeded from (seed, iteration,
//! rank) at every iteration, and augmentation randomness is a function of (seed, epoch, sample
//! position) in the loader, so a resumed run needs no RNG state beyond the iteration and the
//! sampler position, and reproduces an uninterrupted run bit for bit (on the same device kind).

use super::checkpoint::{self, Saved};
use super::eval::{evaluate, normalise, EvalConfig, EvalResult};
use super::loss::segmentation_loss;
use crate::data::augment::AugmentConfig;
use crate::data::cityscapes;
use crate::data::error::DataError;
use crate::data::loader::{eval_samples, TrainLoader};
use crate::data::sampler::DistributedSampler;
use crate::data::SamplerState;
use crate::model::{weights, SegFormer, SegFormerConfig};
use crate::optim::adamw::AdamWConfig;
use crate::optim::{FlatAdamW, LrSchedule};
use anyhow::{bail, Context};
use segtrain_spec::{JobSpec, Precision};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
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
}

/// What the loop reports, in order.
#[derive(Debug, Clone)]
pub enum TrainEvent {
    Started {
        start_iteration: u64,
        max_iters: u64,
        train_images: usize,
        val_images: usize,
        device: String,
        resumed_from: Option<PathBuf>,
        parameters: i64,
    },
    /// Averages since the previous report: loss, lr, images_per_s, data_wait_ms, step_ms.
    Metrics {
        iteration: u64,
        values: BTreeMap<String, f64>,
    },
    Eval {
        iteration: u64,
        result: EvalResult,
    },
    Checkpoint {
        saved: Saved,
        metrics: BTreeMap<String, f64>,
        deleted: Vec<PathBuf>,
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

/// A checkpoint location from the spec: an absolute path or a file:// URI (object stores come
/// with the operations work).
pub fn local_path(field: &str, uri: &str) -> anyhow::Result<PathBuf> {
    if let Some(p) = uri.strip_prefix("file://") {
        return Ok(PathBuf::from(p));
    }
    if uri.starts_with("gs://") {
        bail!("{field}: {uri}: gs:// locations are not supported by this trainer yet; use a path (a gcsfuse mount works)");
    }
    Ok(PathBuf::from(uri))
}

fn due(iteration: u64, interval: u64) -> bool {
    interval > 0 && iteration.is_multiple_of(interval)
}

/// Runs (or resumes) a job on this rank. Returns after `max_iters` (or `stop_at`).
pub fn train(opts: TrainOptions, sink: &mut dyn EventSink) -> anyhow::Result<TrainSummary> {
    let spec = &opts.spec;
    let device = opts.device;
    if opts.world != 1 {
        bail!("this trainer runs one rank; distributed training arrives with the worker daemons");
    }
    tch::manual_seed(mix(spec.seed) as i64);
    if device != Device::Cpu {
        crate::torch_ext::set_cudnn_flags(false, true); // the recipe: cudnn_benchmark=True
    }

    // Model, initial weights, optimizer.
    let vs = nn::VarStore::new(device);
    let model = SegFormer::new(
        &vs.root(),
        SegFormerConfig::variant(spec.variant, spec.num_classes as i64),
    );
    if let Some(p) = &spec.pretrained {
        let path = local_path("pretrained", p)?;
        weights::load_file(&vs, &path)
            .with_context(|| format!("pretrained: {}", path.display()))?;
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
    if let Some(r) = &spec.resume_from {
        let dir = local_path("resume_from", r)?;
        let ck =
            checkpoint::load(&dir).with_context(|| format!("resume_from: {}", dir.display()))?;
        if ck.manifest.optimizer_layout != opt.slots() {
            bail!(
                "resume_from: {}: the checkpoint was made for a different model",
                dir.display()
            );
        }
        weights::load_tensors(&vs, ck.model, &dir.display().to_string())?;
        opt.load_state(&ck.optimizer, ck.manifest.optimizer_steps)?;
        start = ck.manifest.iteration;
        sampler_state = ck.manifest.sampler;
        best = ck.manifest.best;
        resumed_from = Some(dir);
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
    let images_per_step = (spec.batch_per_gpu * spec.accumulate_steps) as f64;
    let mut loss_acc = Tensor::zeros([], (Kind::Float, device));
    let (mut window_iters, mut window_wait, mut window_start) =
        (0u64, Duration::ZERO, Instant::now());
    let mut last_checkpoint = None;
    let mut last_eval = None;
    let mut last_metrics: BTreeMap<String, f64> = BTreeMap::new();

    for it in start..end {
        let iteration = it + 1;
        let lr = schedule.lr(it);
        tch::manual_seed(mix(spec.seed ^ mix(it) ^ mix(opts.rank as u64 + 1)) as i64);
        for _ in 0..spec.accumulate_steps {
            let wait = Instant::now();
            let batch = loader.next_batch()?;
            window_wait += wait.elapsed();
            sampler_state = batch.next;
            let (n, h, w) = (batch.n as i64, batch.height as i64, batch.width as i64);
            let images = Tensor::from_data_size(&batch.images, &[n, h, w, 3], Kind::Uint8);
            let labels = Tensor::from_data_size(&batch.labels, &[n, h, w], Kind::Uint8);
            let (images, labels) = if device == Device::Cpu {
                (images, labels)
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
            let x = normalise(&images);
            let y = labels.to_kind(Kind::Int64);
            let logits = match spec.precision {
                Precision::Bf16 if device != Device::Cpu => {
                    crate::torch_ext::with_bf16_autocast(|| model.forward_t(&x, true))
                }
                _ => model.forward_t(&x, true),
            };
            let loss = segmentation_loss(&logits, &y) / spec.accumulate_steps as f64;
            loss.backward();
            loss_acc += loss.detach();
        }
        let grad = opt.flat_grad();
        opt.step(&grad, lr);
        opt.zero_grad();
        window_iters += 1;

        let last = iteration == spec.max_iters;
        if due(iteration, spec.log_interval) || last || iteration == end {
            // The one host read-back of the loss per log interval.
            let loss = f64::try_from(&loss_acc)? / window_iters as f64;
            if !loss.is_finite() {
                bail!("the loss is {loss} at iteration {iteration}: training diverged");
            }
            let secs = window_start.elapsed().as_secs_f64().max(1e-9);
            let values = BTreeMap::from([
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
            sink.event(&TrainEvent::Metrics {
                iteration,
                values: values.clone(),
            });
            last_metrics = values;
            loss_acc = Tensor::zeros([], (Kind::Float, device));
            window_iters = 0;
            window_wait = Duration::ZERO;
            window_start = Instant::now();
        }

        let mut new_best = false;
        let mut eval_metrics = BTreeMap::new();
        if (due(iteration, spec.eval_interval) || last) && !val_samples.is_empty() {
            let result = evaluate(
                &model,
                eval_samples(&val_samples).map(|r| r.map_err(anyhow::Error::from)),
                device,
                &eval_cfg,
            )?;
            eval_metrics = BTreeMap::from([
                ("miou".to_string(), result.metrics.miou),
                ("aacc".to_string(), result.metrics.aacc),
                ("val_loss".to_string(), result.loss),
            ]);
            if best.is_none_or(|(b, _)| result.metrics.miou > b) {
                best = Some((result.metrics.miou, iteration));
                new_best = true;
            }
            sink.event(&TrainEvent::Eval {
                iteration,
                result: result.clone(),
            });
            last_eval = Some(result);
            window_start = Instant::now(); // evaluation time is not training throughput
        }

        let keep_best_here = new_best && spec.keep_best;
        if due(iteration, spec.checkpoint_interval) || last || iteration == end || keep_best_here {
            let mut metrics = last_metrics.clone();
            metrics.extend(eval_metrics);
            let saved = checkpoint::save(
                &opts.checkpoint_dir,
                checkpoint::Contents {
                    iteration,
                    optimizer_steps: opt.steps(),
                    sampler: sampler_state,
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
            let deleted =
                checkpoint::retain(&opts.checkpoint_dir, spec.keep_last as usize, best_it)?;
            sink.event(&TrainEvent::Checkpoint {
                saved: saved.clone(),
                metrics,
                deleted,
            });
            last_checkpoint = Some(saved);
            window_start = Instant::now();
        }
    }
    sink.event(&TrainEvent::Finished {
        iteration: end,
        best,
    });
    Ok(TrainSummary {
        iteration: end,
        last_checkpoint,
        best,
        last_eval,
    })
}
