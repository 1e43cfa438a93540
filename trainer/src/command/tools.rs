//! The tools of `segtrain-worker` besides `train` and `daemon`: synthetic data, `doctor`,
//! `model-info`, the step, checkpoint and loader benchmarks, `predict`. Each parses and checks
//! its options here and prints for people (or JSON with `--json`).

use super::{check_classes, parse_device, parse_size, print_json};
use crate::{bench, data, doctor, model, predict};
use anyhow::bail;
use segtrain_spec::{Precision, Variant};
use std::path::PathBuf;

#[derive(clap::Subcommand, Debug)]
pub enum Tool {
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
    /// ms/iter, images/s, peak GPU memory, achieved TFLOP/s (3 × the forward FLOPs). `bench
    /// checkpoint` times checkpoint writes instead.
    #[command(args_conflicts_with_subcommands = true)]
    Bench {
        /// Another measurement than the training step.
        #[command(subcommand)]
        mode: Option<BenchMode>,
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

/// `segtrain-worker bench <MODE>`: what else the benchmark times.
#[derive(clap::Subcommand, Debug)]
pub enum BenchMode {
    /// Time checkpoint writes with the trainer's writer (model and AdamW moments as
    /// safetensors, fsynced and hashed, then the manifest and the rename) of models built on
    /// the CPU: parameters, checkpoint bytes, median seconds, MB/s.
    Checkpoint {
        /// Comma-separated variants, b0..b5.
        #[arg(long, value_delimiter = ',', default_value = "b0,b3,b5")]
        variants: Vec<Variant>,
        /// Timed writes per variant.
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// A directory on the disk to time (default: the system's temporary directory); the
        /// checkpoints go into a fresh subdirectory, removed afterwards.
        #[arg(long)]
        dir: Option<PathBuf>,
        #[arg(long, default_value_t = 19)]
        classes: i64,
        /// One JSON array instead of the table.
        #[arg(long)]
        json: bool,
    },
}

impl BenchMode {
    fn run(self) -> anyhow::Result<()> {
        match self {
            BenchMode::Checkpoint {
                variants,
                reps,
                dir,
                classes,
                json,
            } => {
                check_classes(classes)?;
                let dir = dir.unwrap_or_else(std::env::temp_dir);
                let rows = bench::run_checkpoint(&bench::CheckpointBenchOptions {
                    variants,
                    reps,
                    dir: dir.clone(),
                    num_classes: classes,
                })?;
                json_line_or(json, &rows, || {
                    println!(
                        "checkpoint::save to {} ({} writes each)",
                        dir.display(),
                        reps
                    );
                    println!(
                        "| variant | parameters | checkpoint bytes | seconds (median) | MB/s |"
                    );
                    println!("|---|---|---|---|---|");
                    for r in &rows {
                        println!(
                            "| {} | {} | {} | {:.3} | {:.0} |",
                            r.variant, r.parameters, r.bytes, r.seconds_median, r.mb_per_s
                        );
                    }
                })
            }
        }
    }
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum HeadArg {
    Merged,
    Concat,
}

impl Tool {
    pub fn run(self) -> anyhow::Result<()> {
        match self {
            Tool::Bench {
                mode: Some(mode), ..
            } => mode.run()?,
            Tool::Bench {
                mode: None,
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
                let r = bench::run(&bench::BenchOptions {
                    head: match head {
                        HeadArg::Merged => crate::model::HeadMode::Merged,
                        HeadArg::Concat => crate::model::HeadMode::Concat,
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
                json_line_or(json, &r, || {
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
                })?;
            }
            Tool::BenchLoader {
                data,
                threads,
                batch,
                crop,
                batches,
                json,
            } => {
                let (crop_h, crop_w) = parse_size("--crop", &crop, "HxW")?;
                let r = bench::run_loader(&bench::LoaderBenchOptions {
                    data,
                    threads,
                    batch,
                    crop_h: crop_h as usize,
                    crop_w: crop_w as usize,
                    batches,
                })?;
                json_line_or(json, &r, || {
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
                })?;
            }
            Tool::SynthData {
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
                eprint!("{summary}");
            }
            Tool::Doctor { json } => print_either(json, &doctor::report())?,
            Tool::ModelInfo {
                variant,
                classes,
                size,
                json,
            } => {
                check_classes(classes)?;
                let (h, w) = parse_size("--size", &size, "HxW")?;
                print_either(json, &model::info(variant, classes, h, w))?;
            }
            Tool::Predict {
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
                    bail!(
                        "nothing to write: give --out mask.png and/or --logits logits.safetensors"
                    );
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
}

/// `v` as one line of JSON with `--json` (what bench scripts read), else `table()` for people.
fn json_line_or(json: bool, v: &impl serde::Serialize, table: impl FnOnce()) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(v)?);
    } else {
        table();
    }
    Ok(())
}

/// `v` as pretty JSON with `--json`, else as text for people.
fn print_either(json: bool, v: &(impl serde::Serialize + std::fmt::Display)) -> anyhow::Result<()> {
    if json {
        print_json(v)
    } else {
        println!("{v}");
        Ok(())
    }
}
