//! `segtrain-worker bench`: times full training steps of the trainer's own code path — forward,
//! loss, backward ([`crate::train::forward_backward`]), the gradient all-reduce (free
//! on a world of 1), the flat AdamW step — on synthetic batches already on the device, after a
//! warm-up, and reports the median step time, images/s, peak GPU memory and the achieved
//! TFLOP/s, counting a step as 3 × the forward pass (2 FLOP per multiply-accumulate, from
//! [`SegFormerConfig::forward_macs`]). That is the model's nominal count, the one the reference's
//! numbers use: the merged head ([`HeadMode::Merged`]) executes fewer (for B3 at 1024², 450 of
//! the nominal 760 forward GFLOP per image), so the figure is the model-FLOP rate, comparable
//! across implementations, not the rate of arithmetic actually done.
//!
//! Also here: the loader benchmark ([`run_loader`]) and the checkpoint-write benchmark
//! ([`run_checkpoint`], `segtrain-worker bench checkpoint`).

use crate::collective::{Collective, Single};
use crate::model::{HeadMode, SegFormer, SegFormerConfig};
use crate::optim::adamw::AdamWConfig;
use crate::optim::FlatAdamW;
use crate::train::{forward_backward, forward_loss};
use anyhow::bail;
use segtrain_spec::{Precision, Variant};
use std::time::Instant;
use tch::{nn, Device, Kind, Tensor};

/// What to time.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub variant: Variant,
    pub batch: i64,
    pub crop: i64,
    pub precision: Precision,
    pub warmup: usize,
    pub iters: usize,
    pub device: Device,
    pub num_classes: i64,
    /// The head's computation order (the default is the fast one): for A/B runs.
    pub head: HeadMode,
    /// Contiguous NCHW stage maps instead of channels-last views: for A/B runs.
    pub contiguous_maps: bool,
    /// Also time forward, backward and the optimizer separately (synchronising between them).
    pub breakdown: bool,
    /// Also time the same step with SyncBN in the head, over a world of 1 (its all-reduces are
    /// no-ops): the computation SyncBN adds, without the network.
    pub sync_bn: bool,
    /// Profile [`PROFILED_STEPS`] more steps with libtorch's Kineto profiler: the kernels that
    /// take the time, and a Chrome trace written here.
    pub profile: Option<std::path::PathBuf>,
}

/// Steps run under the profiler.
pub const PROFILED_STEPS: usize = 2;

/// One line of the profile: a kernel (on CUDA) or an operator (on the CPU, inclusive of the
/// operators it calls), summed over its calls.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ProfileRow {
    pub name: String,
    pub ms_per_step: f64,
    pub calls_per_step: f64,
    /// Share of all device time (CUDA), or of the step (CPU).
    pub percent: f64,
}

/// Median milliseconds of each phase of a step, synchronised between phases (so their sum is a
/// little more than the pipelined step).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Breakdown {
    /// Host-to-device already done: normalisation, forward pass, loss.
    pub forward_ms: f64,
    pub backward_ms: f64,
    /// All-reduce (nothing on a world of 1), AdamW, zeroing the gradients.
    pub optimizer_ms: f64,
}

/// The step with SyncBN against the same step with the head's plain BatchNorm.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SyncBnCost {
    pub ms_per_iter_median: f64,
    /// Median SyncBN step minus the median plain step.
    pub extra_ms_per_iter: f64,
    /// SyncBN step time / plain step time.
    pub ratio: f64,
}

/// One benchmark row.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchResult {
    pub variant: String,
    pub precision: String,
    pub batch: i64,
    pub crop: i64,
    pub device: String,
    pub iters: usize,
    pub ms_per_iter_median: f64,
    pub ms_per_iter_min: f64,
    pub images_per_s: f64,
    /// The most the CUDA caching allocator held for tensors (0 on the CPU).
    pub peak_memory_bytes: i64,
    /// 3 × forward FLOPs per step / step time.
    pub tflops: f64,
    /// The nominal forward (the paper's order of operations), per image.
    pub forward_gflop_per_image: f64,
    /// `--head` and `--contiguous-maps`: which A/B row this is.
    pub head: String,
    pub contiguous_maps: bool,
    /// `--breakdown`: forward, backward and optimizer timed apart.
    pub breakdown: Option<Breakdown>,
    /// `--sync-bn`: the same step with SyncBN in the head.
    pub sync_bn: Option<SyncBnCost>,
    /// The top kernels by time, when profiled.
    pub profile: Option<Vec<ProfileRow>>,
}

fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// Runs the benchmark.
pub fn run(o: &BenchOptions) -> anyhow::Result<BenchResult> {
    if o.batch < 1 || o.iters < 1 {
        bail!("--batch and --iters must be at least 1");
    }
    if o.crop < SegFormerConfig::MIN_SIZE || o.crop % 32 != 0 {
        bail!(
            "--crop: must be a multiple of 32, at least 32; got {}",
            o.crop
        );
    }
    let cfg = SegFormerConfig::variant(o.variant, o.num_classes);
    tch::manual_seed(0);
    if o.device != Device::Cpu {
        crate::torch_ext::set_cudnn_flags(false, true);
        crate::torch_ext::set_tf32(true); // as the trainer (fp32 rows run as TF32)
    }
    let vs = nn::VarStore::new(o.device);
    let mut model = SegFormer::new(&vs.root(), cfg.clone());
    model.set_head_mode(o.head);
    model.set_contiguous_maps(o.contiguous_maps);
    let mut opt = FlatAdamW::new(&vs, AdamWConfig::default());
    // A synthetic batch on the device: random pixels, random labels with some ignored ones.
    let images = Tensor::randint(256, [o.batch, o.crop, o.crop, 3], (Kind::Uint8, o.device));
    let labels = Tensor::randint(
        o.num_classes,
        [o.batch, o.crop, o.crop],
        (Kind::Uint8, o.device),
    );
    let ignore = Tensor::rand([o.batch, o.crop, o.crop], (Kind::Float, o.device)).lt(0.05);
    let labels = labels.masked_fill(&ignore, 255);

    // One full step: forward, loss, backward, (all-reduce: none on a world of 1), AdamW; with
    // SyncBN when given a collective.
    let step = |opt: &mut FlatAdamW, sync_bn: Option<&mut dyn Collective>| -> anyhow::Result<()> {
        let _loss = forward_backward(&model, &images, &labels, o.precision, o.device, 1, sync_bn)?;
        let grad = opt.flat_grad();
        opt.step(&grad, 6e-5)?;
        opt.zero_grad();
        Ok(())
    };
    // Sorted step times (ms) of `o.iters` steps after `o.warmup` more.
    let time_steps = |opt: &mut FlatAdamW, with_sync_bn: bool| -> anyhow::Result<Vec<f64>> {
        let mut single = Single;
        let mut run = |opt: &mut FlatAdamW| {
            step(
                opt,
                with_sync_bn.then_some(&mut single as &mut dyn Collective),
            )
        };
        for _ in 0..o.warmup {
            run(opt)?;
        }
        sync(o.device);
        let mut times = Vec::with_capacity(o.iters);
        for _ in 0..o.iters {
            let t = Instant::now();
            run(opt)?;
            sync(o.device);
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        times.sort_by(f64::total_cmp);
        Ok(times)
    };
    let times = time_steps(&mut opt, false)?;
    let median = times[times.len() / 2];
    let sync_bn = if o.sync_bn {
        let t = time_steps(&mut opt, true)?;
        let m = t[t.len() / 2];
        Some(SyncBnCost {
            ms_per_iter_median: m,
            extra_ms_per_iter: m - median,
            ratio: m / median,
        })
    } else {
        None
    };
    let breakdown = if o.breakdown {
        let mut phases: [Vec<f64>; 3] = Default::default();
        for _ in 0..o.iters {
            let t0 = Instant::now();
            let loss = forward_loss(&model, &images, &labels, o.precision, o.device);
            sync(o.device);
            let t1 = Instant::now();
            loss.backward();
            sync(o.device);
            let t2 = Instant::now();
            let grad = opt.flat_grad();
            opt.step(&grad, 6e-5)?;
            opt.zero_grad();
            sync(o.device);
            let t3 = Instant::now();
            for (v, (a, b)) in phases.iter_mut().zip([(t0, t1), (t1, t2), (t2, t3)]) {
                v.push((b - a).as_secs_f64() * 1e3);
            }
        }
        let [f, b, s] = phases.map(|mut v| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        });
        Some(Breakdown {
            forward_ms: f,
            backward_ms: b,
            optimizer_ms: s,
        })
    } else {
        None
    };
    let (macs, _) = cfg.forward_macs(o.crop, o.crop);
    let forward_flop = 2.0 * macs;
    let peak = match o.device {
        Device::Cuda(i) => crate::torch_ext::cuda_memory(i).map_or(0, |m| m.peak_allocated),
        _ => 0,
    };
    let profile = match &o.profile {
        Some(trace) => {
            let cuda = o.device != Device::Cpu;
            crate::torch_ext::profile_start(cuda).map_err(anyhow::Error::msg)?;
            let t = Instant::now();
            for _ in 0..PROFILED_STEPS {
                step(&mut opt, None)?;
            }
            sync(o.device);
            let wall_ms = t.elapsed().as_secs_f64() * 1e3 / PROFILED_STEPS as f64;
            let events = crate::torch_ext::profile_stop(Some(trace)).map_err(anyhow::Error::msg)?;
            Some(summarise_profile(&events, cuda, wall_ms, 30))
        }
        None => None,
    };
    Ok(BenchResult {
        variant: format!("{:?}", o.variant).to_lowercase(),
        precision: o.precision.as_str().to_string(),
        batch: o.batch,
        crop: o.crop,
        device: format!("{:?}", o.device),
        iters: o.iters,
        ms_per_iter_median: median,
        ms_per_iter_min: times[0],
        images_per_s: o.batch as f64 * 1e3 / median,
        peak_memory_bytes: peak,
        tflops: 3.0 * forward_flop * o.batch as f64 / (median / 1e3) / 1e12,
        forward_gflop_per_image: forward_flop / 1e9,
        head: format!("{:?}", o.head).to_lowercase(),
        contiguous_maps: o.contiguous_maps,
        breakdown,
        sync_bn,
        profile,
    })
}

/// The `top` names by total time per step: CUDA kernels (as a share of all kernel time) when
/// `cuda`, else CPU operators (inclusive, as a share of the step's wall time `wall_ms`).
pub fn summarise_profile(
    events: &[crate::torch_ext::ProfiledEvent],
    cuda: bool,
    wall_ms: f64,
    top: usize,
) -> Vec<ProfileRow> {
    let mut by_name: std::collections::HashMap<&str, (u64, u64)> = Default::default();
    for e in events.iter().filter(|e| e.cuda == cuda) {
        let entry = by_name.entry(e.name.as_str()).or_default();
        entry.0 += e.duration_ns;
        entry.1 += 1;
    }
    let steps = PROFILED_STEPS as f64;
    let total_ms = if cuda {
        by_name.values().map(|v| v.0).sum::<u64>() as f64 / 1e6 / steps
    } else {
        wall_ms
    };
    let mut rows: Vec<ProfileRow> = by_name
        .into_iter()
        .map(|(name, (ns, calls))| {
            let ms = ns as f64 / 1e6 / steps;
            ProfileRow {
                name: name.to_string(),
                ms_per_step: ms,
                calls_per_step: calls as f64 / steps,
                percent: 100.0 * ms / total_ms.max(1e-9),
            }
        })
        .collect();
    rows.sort_by(|a, b| b.ms_per_step.total_cmp(&a.ms_per_step));
    rows.truncate(top);
    rows
}

/// What `segtrain-worker bench-loader` times: the training loader alone, exactly as the trainer
/// starts it (the recipe's augmentation), over a dataset's train split.
#[derive(Debug, Clone)]
pub struct LoaderBenchOptions {
    pub data: std::path::PathBuf,
    pub threads: usize,
    pub batch: usize,
    pub crop_h: usize,
    pub crop_w: usize,
    /// Batches timed after the first (which includes the threads' start).
    pub batches: usize,
}

/// How fast the loader delivers.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LoaderBenchResult {
    pub threads: usize,
    pub batch: usize,
    pub crop: [usize; 2],
    pub images: usize,
    pub images_per_s: f64,
    /// Wall time per image per thread: decode, augment, copy into the batch.
    pub ms_per_image_per_thread: f64,
}

/// Times `batches` batches of the training loader (after one untimed batch).
pub fn run_loader(o: &LoaderBenchOptions) -> anyhow::Result<LoaderBenchResult> {
    use crate::data::augment::AugmentConfig;
    use crate::data::loader::TrainLoader;
    use crate::data::sampler::{BatchLayout, DistributedSampler};
    if o.batches == 0 {
        bail!("--batches must be at least 1");
    }
    let samples = crate::data::cityscapes::scan(&o.data, "train")?;
    let sampler = DistributedSampler::new(samples.len(), BatchLayout::single(o.batch), 0, true)?;
    let mut loader = TrainLoader::start(
        samples,
        sampler,
        AugmentConfig::recipe(o.crop_h, o.crop_w),
        o.threads,
        // As the trainer: enough batches in flight to keep every thread busy.
        o.threads.div_ceil(o.batch) + 2,
        0,
    )?;
    loader.next_batch()?;
    let t = Instant::now();
    for _ in 0..o.batches {
        loader.next_batch()?;
    }
    let secs = t.elapsed().as_secs_f64();
    let images = o.batches * o.batch;
    Ok(LoaderBenchResult {
        threads: o.threads,
        batch: o.batch,
        crop: [o.crop_h, o.crop_w],
        images,
        images_per_s: images as f64 / secs,
        ms_per_image_per_thread: secs * 1e3 * o.threads as f64 / images as f64,
    })
}

/// What `segtrain-worker bench checkpoint` times: [`checkpoint::save`], the trainer's own writer
/// (model and AdamW moments as safetensors, each fsynced and hashed, the manifest, the rename),
/// for models built on the CPU.
#[derive(Debug, Clone)]
pub struct CheckpointBenchOptions {
    pub variants: Vec<Variant>,
    /// Timed saves per variant.
    pub reps: usize,
    /// A directory on the disk to time: the checkpoints go into a fresh temporary directory
    /// inside it, each removed once timed.
    pub dir: std::path::PathBuf,
    pub num_classes: i64,
}

/// One variant's checkpoint writes.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CheckpointBenchRow {
    pub variant: String,
    /// Trainable parameters (the model file also holds the BatchNorm statistics).
    pub parameters: i64,
    /// One checkpoint: every file, manifest included.
    pub bytes: u64,
    pub reps: usize,
    pub seconds_median: f64,
    pub seconds_min: f64,
    /// `bytes` / the median, in 10^6 bytes per second.
    pub mb_per_s: f64,
}

/// Times `reps` checkpoint writes of each variant: the model with AdamW moments after one step
/// (so they hold real values), written as the trainer writes them.
pub fn run_checkpoint(o: &CheckpointBenchOptions) -> anyhow::Result<Vec<CheckpointBenchRow>> {
    use crate::train::checkpoint::{self, Contents};
    if o.reps == 0 {
        bail!("--reps must be at least 1");
    }
    if o.variants.is_empty() {
        bail!("--variants: name at least one of b0..b5");
    }
    std::fs::create_dir_all(&o.dir)
        .map_err(|e| anyhow::anyhow!("--dir {}: cannot create it: {e}", o.dir.display()))?;
    // Inside the given directory (same disk), and never touching what is already there.
    let scratch = tempfile::Builder::new()
        .prefix("segtrain-bench-checkpoint-")
        .tempdir_in(&o.dir)
        .map_err(|e| anyhow::anyhow!("--dir {}: {e}", o.dir.display()))?;
    let mut rows = Vec::with_capacity(o.variants.len());
    for &variant in &o.variants {
        tch::manual_seed(0);
        let vs = nn::VarStore::new(Device::Cpu);
        let _model = SegFormer::new(&vs.root(), SegFormerConfig::variant(variant, o.num_classes));
        let mut opt = FlatAdamW::new(&vs, AdamWConfig::default());
        let mut grad = opt.flat_grad();
        tch::no_grad(|| {
            let _ = grad.normal_(0.0, 1e-3);
        });
        opt.step(&grad, 6e-5)?;
        let mut spec = segtrain_spec::JobSpec::with_defaults("/bench");
        spec.variant = variant;
        spec.num_classes = u32::try_from(o.num_classes)
            .map_err(|_| anyhow::anyhow!("--classes: must be in 1..=254"))?;
        let mut times = Vec::with_capacity(o.reps);
        let mut bytes = 0;
        for rep in 0..o.reps {
            let contents = Contents {
                // A new directory each time: replacing one would time its deletion too.
                iteration: rep as u64 + 1,
                optimizer_steps: opt.steps(),
                sampler: crate::data::SamplerState::default(),
                spec: &spec,
                metrics: Default::default(),
                best: None,
                optimizer_layout: opt.slots().to_vec(),
                model: vs.variables().into_iter().collect(),
                optimizer: opt.state_tensors(),
            };
            let t = Instant::now();
            let saved = checkpoint::save(scratch.path(), contents)?;
            times.push(t.elapsed().as_secs_f64());
            bytes = saved.bytes;
            std::fs::remove_dir_all(&saved.dir)
                .map_err(|e| anyhow::anyhow!("cannot remove {}: {e}", saved.dir.display()))?;
        }
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        rows.push(CheckpointBenchRow {
            variant: variant.as_str().to_string(),
            parameters: opt.num_params(),
            bytes,
            reps: o.reps,
            seconds_median: median,
            seconds_min: times[0],
            mb_per_s: bytes as f64 / median.max(1e-9) / 1e6,
        });
    }
    Ok(rows)
}
