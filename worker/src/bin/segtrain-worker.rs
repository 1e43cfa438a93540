//! `segtrain-worker`: the per-GPU worker binary.

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use segtrain_spec::{Precision, Variant};
use segtrain_worker::{doctor, model, predict};
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

fn parse_size(s: &str) -> anyhow::Result<(i64, i64)> {
    let err = || format!("--size: expected HxW such as 1024x1024, got {s:?}");
    let (h, w) = s.split_once(['x', 'X']).with_context(err)?;
    let (h, w): (i64, i64) = (
        h.trim().parse().with_context(err)?,
        w.trim().parse().with_context(err)?,
    );
    if h < 32 || w < 32 || h > 16384 || w > 16384 {
        bail!("--size: each side must be in 32..=16384, got {h}x{w}");
    }
    Ok((h, w))
}

fn parse_device(s: &str) -> anyhow::Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
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

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
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
            let (h, w) = parse_size(&size)?;
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
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
