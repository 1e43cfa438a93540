//! `segtrain-worker predict`: one image (or a ready tensor) through a model in eval mode, written
//! as a colour-coded segmentation and optionally raw logits.

use crate::data::cityscapes;
use crate::model::{weights, SegFormer, SegFormerConfig};
use anyhow::{bail, Context};
use segtrain_spec::{Precision, Variant};
use std::path::{Path, PathBuf};
use tch::{nn, Device, Kind, Tensor};

pub struct PredictArgs {
    /// The model: its variant and head size must match `weights`.
    pub variant: Variant,
    pub classes: i64,
    /// A safetensors file with HuggingFace SegFormer key names.
    pub weights: PathBuf,
    /// A PNG/JPEG image, or a safetensors file with an NCHW `pixel_values` tensor.
    pub input: PathBuf,
    /// Where to write the Cityscapes-coloured mask (PNG) and the raw logits (safetensors).
    pub out: Option<PathBuf>,
    pub logits: Option<PathBuf>,
    pub device: Device,
    /// bf16 runs the forward under autocast (CUDA only).
    pub precision: Precision,
}

/// What a prediction produced.
#[derive(Debug)]
pub struct Prediction {
    /// (N, K, H/4, W/4), fp32.
    pub logits: Tensor,
    /// (N, H, W) class indices at the input size.
    pub classes: Tensor,
}

/// An image file as a normalised (1, 3, H, W) float tensor, as in evaluation: RGB, ImageNet mean
/// and std in pixel units.
pub fn load_image(path: &Path) -> anyhow::Result<Tensor> {
    let img = image::open(path)
        .with_context(|| format!("cannot read image {}", path.display()))?
        .into_rgb8();
    let (w, h) = img.dimensions();
    let t = Tensor::from_data_size(img.as_raw(), &[h as i64, w as i64, 3], Kind::Uint8)
        .permute([2, 0, 1])
        .to_kind(Kind::Float);
    let mean = Tensor::from_slice(&cityscapes::MEAN)
        .to_kind(Kind::Float)
        .view([3, 1, 1]);
    let std = Tensor::from_slice(&cityscapes::STD)
        .to_kind(Kind::Float)
        .view([3, 1, 1]);
    Ok(((t - mean) / std).unsqueeze(0))
}

/// A safetensors file holding an NCHW float tensor named `pixel_values`.
pub fn load_tensor_input(path: &Path) -> anyhow::Result<Tensor> {
    let tensors = Tensor::read_safetensors(path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let Some((_, t)) = tensors.into_iter().find(|(k, _)| k == "pixel_values") else {
        bail!("{}: no tensor named pixel_values", path.display());
    };
    Ok(t.to_kind(Kind::Float))
}

fn is_safetensors(p: &Path) -> bool {
    p.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"))
}

pub fn run(args: &PredictArgs) -> anyhow::Result<Prediction> {
    if args.device != Device::Cpu && !tch::Cuda::is_available() {
        bail!("--device cuda: no CUDA device is available (see `segtrain-worker doctor`)");
    }
    let x = if is_safetensors(&args.input) {
        load_tensor_input(&args.input)?
    } else {
        load_image(&args.input)?
    };
    SegFormer::check_input(&x).with_context(|| format!("input {}", args.input.display()))?;

    let vs = nn::VarStore::new(args.device);
    let model = SegFormer::new(
        &vs.root(),
        SegFormerConfig::variant(args.variant, args.classes),
    );
    let report = weights::load_file(&vs, &args.weights)?;
    if report.kind == weights::CheckpointKind::EncoderOnly {
        eprintln!(
            "warning: {} holds only an encoder; the decode head is untrained",
            args.weights.display()
        );
    }

    let x = x.to_device(args.device);
    let (_, _, h, w) = x.size4()?;
    let logits = tch::no_grad(|| {
        let forward = || model.forward_t(&x, false);
        match args.precision {
            Precision::Bf16 if args.device != Device::Cpu => {
                crate::torch_ext::with_bf16_autocast(forward)
            }
            _ => forward(),
        }
    })
    .to_kind(Kind::Float);
    let classes = logits
        .upsample_bilinear2d([h, w], false, None, None)
        .argmax(1, false)
        .to_kind(Kind::Uint8);
    let prediction = Prediction {
        logits: logits.to_device(Device::Cpu),
        classes: classes.to_device(Device::Cpu),
    };
    if let Some(out) = &args.out {
        write_mask(&prediction.classes, out)?;
    }
    if let Some(path) = &args.logits {
        Tensor::write_safetensors(&[("logits", prediction.logits.contiguous())], path)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(prediction)
}

/// Writes the first image's class map as an RGB PNG in the Cityscapes colours.
pub fn write_mask(classes: &Tensor, path: &Path) -> anyhow::Result<()> {
    let c = classes.get(0);
    let (h, w) = c.size2()?;
    let ids: Vec<u8> = Vec::<u8>::try_from(c.flatten(0, -1))?;
    let mut rgb = Vec::with_capacity(ids.len() * 3);
    for id in ids {
        rgb.extend_from_slice(&cityscapes::colour(id));
    }
    let img = image::RgbImage::from_raw(w as u32, h as u32, rgb)
        .context("mask buffer has the wrong size")?;
    img.save_with_format(path, image::ImageFormat::Png)
        .with_context(|| format!("cannot write {}", path.display()))
}
