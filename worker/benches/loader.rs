//! Loader benchmark: decode + augment throughput of the training pipeline at the recipe's
//! 1024x1024 crop, on synthetic 2048x1024 PNGs (Cityscapes-sized, noisy like photographs).
//!
//! `cargo bench -p segtrain-worker --bench loader`. Prints the machine, a per-stage breakdown on
//! one thread, then the loader pool's throughput with 1 thread and with every available thread.
//! Environment: `SEGTRAIN_BENCH_IMAGES` (default 24) images are generated; each run pulls two
//! epochs of them.

use std::time::Instant;

use anyhow::Context;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use segtrain_telemetry::host;
use segtrain_trainer::data::augment::{AugmentConfig, Augmenter};
use segtrain_trainer::data::cityscapes::{load_image, load_label, scan};
use segtrain_trainer::data::loader::TrainLoader;
use segtrain_trainer::data::sampler::{BatchLayout, DistributedSampler};
use segtrain_trainer::data::synth::{generate, SynthOptions};

fn main() -> anyhow::Result<()> {
    let images: usize = std::env::var("SEGTRAIN_BENCH_IMAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(24);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("machine: {cores} cores (nproc), {}", host::cpu_model());

    let dir = tempfile::tempdir()?;
    let t = Instant::now();
    let summary = generate(&SynthOptions {
        out: dir.path().to_path_buf(),
        train: images,
        val: 0,
        width: 2048,
        height: 1024,
        seed: 0,
    })?;
    println!(
        "generated {images} synthetic 2048x1024 images + labels in {:.1} s ({:.1} MB on disk)",
        t.elapsed().as_secs_f64(),
        summary.bytes as f64 / 1e6
    );
    let samples = scan(dir.path(), "train")?;
    let cfg = AugmentConfig::recipe(1024, 1024);

    // Per-stage breakdown on this thread.
    let mut aug = Augmenter::new(cfg.clone())?;
    let (mut t_img, mut t_lbl, mut t_aug) = (0.0, 0.0, 0.0);
    let mut out_img = vec![0u8; 1024 * 1024 * 3];
    let mut out_lbl = vec![0u8; 1024 * 1024];
    for (i, s) in samples.iter().enumerate() {
        let t = Instant::now();
        let image = load_image(&s.image)?;
        t_img += t.elapsed().as_secs_f64();
        let t = Instant::now();
        let label = load_label(&s.label, s.label_kind)?;
        t_lbl += t.elapsed().as_secs_f64();
        let t = Instant::now();
        let mut rng = ChaCha8Rng::seed_from_u64(i as u64);
        aug.augment_into(&image, &label, &mut rng, &mut out_img, &mut out_lbl)?;
        t_aug += t.elapsed().as_secs_f64();
    }
    let per = |t: f64| 1e3 * t / samples.len() as f64;
    println!(
        "one thread, per image: decode RGB {:.1} ms, decode label {:.1} ms, augment (full recipe, 1024x1024) {:.1} ms",
        per(t_img),
        per(t_lbl),
        per(t_aug)
    );

    println!();
    println!("| threads | images | seconds | images/s | images/s per core |");
    println!("|---|---|---|---|---|");
    let mut runs = vec![1];
    if cores > 1 {
        runs.push(cores);
    }
    for threads in runs {
        let batch = 2;
        let prefetch = threads.max(2); // prefetch·batch ≥ 2·threads keeps every thread busy
        let sampler = DistributedSampler::new(samples.len(), BatchLayout::single(batch), 0, true)?;
        let n_batches = samples.len(); // two epochs
        let t = Instant::now();
        let mut loader =
            TrainLoader::start(samples.clone(), sampler, cfg.clone(), threads, prefetch, 0)?;
        for _ in 0..n_batches {
            loader.next_batch().context("loader")?;
        }
        let secs = t.elapsed().as_secs_f64();
        drop(loader);
        let n = n_batches * batch;
        println!(
            "| {threads} | {n} | {secs:.2} | {:.1} | {:.1} |",
            n as f64 / secs,
            n as f64 / secs / threads as f64
        );
    }
    Ok(())
}
