//! `segtrain-worker bench`: times full training steps of the trainer's own code path — forward,
//! loss, backward ([`crate::train::trainer::forward_backward`]), the gradient all-reduce (free
//! on a world of 1), the flat AdamW step — on synthetic batches already on the device, after a
//! warm-up, and reports the median step time, images/s, peak GPU memory and the achieved
//! TFLOP/s, counting a step as 3 × the forward pass (2 FLOP per multiply-accumulate, from
//! [`SegFormerConfig::forward_macs`]).

use crate::model::{SegFormer, SegFormerConfig};
use crate::optim::adamw::AdamWConfig;
use crate::optim::FlatAdamW;
use crate::train::trainer::forward_backward;
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
    pub forward_gflop_per_image: f64,
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
    }
    let vs = nn::VarStore::new(o.device);
    let model = SegFormer::new(&vs.root(), cfg.clone());
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

    let mut step = || {
        let _loss = forward_backward(&model, &images, &labels, o.precision, o.device, 1);
        let grad = opt.flat_grad();
        opt.step(&grad, 6e-5);
        opt.zero_grad();
    };
    for _ in 0..o.warmup {
        step();
    }
    sync(o.device);
    let mut times = Vec::with_capacity(o.iters);
    for _ in 0..o.iters {
        let t = Instant::now();
        step();
        sync(o.device);
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let (macs, _) = cfg.forward_macs(o.crop, o.crop);
    let forward_flop = 2.0 * macs;
    let peak = match o.device {
        Device::Cuda(i) => crate::torch_ext::cuda_memory(i).map_or(0, |m| m.peak_allocated),
        _ => 0,
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
    })
}
