//! Evaluation: whole-image or sliding-window inference (docs/recipe.md §4.6), the
//! dataset-level confusion matrix, and the validation loss.

use super::loss::segmentation_loss;
use super::metrics::{ConfusionMatrix, DeviceConfusion, SegMetrics};
use crate::data::EvalSample;
use crate::model::SegFormer;
use segtrain_spec::{EvalMode, Precision};
use tch::{Device, Kind, Tensor};

#[derive(Debug, Clone, Copy)]
pub struct EvalConfig {
    pub mode: EvalMode,
    pub crop: i64,
    pub stride: i64,
    pub precision: Precision,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct EvalResult {
    #[serde(flatten)]
    pub metrics: SegMetrics,
    /// Mean of the per-image losses.
    pub loss: f64,
    pub images: usize,
}

/// Normalises a u8 NHWC batch on its device: RGB, ImageNet mean/std in pixel units, NCHW f32
/// (a channels-last view, as the first convolution wants it). One kernel reads the u8 pixels and
/// writes `x / std - mean / std`; the per-channel constants are filled on the device, so there is
/// no host-to-device copy (which would synchronise the host with the GPU every step).
pub fn normalise(images_u8: &Tensor) -> Tensor {
    let opts = (Kind::Float, images_u8.device());
    let per_channel = |f: &dyn Fn(usize) -> f64| {
        let parts: Vec<Tensor> = (0..3).map(|c| Tensor::full([1], f(c), opts)).collect();
        Tensor::cat(&parts, 0).view([1, 3, 1, 1])
    };
    let (mean, std) = (crate::data::cityscapes::MEAN, crate::data::cityscapes::STD);
    let scale = per_channel(&|c| 1.0 / std[c]);
    let shift = per_channel(&|c| -mean[c] / std[c]);
    shift.addcmul(&images_u8.permute([0, 3, 1, 2]), &scale)
}

fn forward(model: &SegFormer, x: &Tensor, precision: Precision) -> Tensor {
    let run = || model.forward_t(x, false);
    let out = match precision {
        Precision::Bf16 if x.device() != Device::Cpu => crate::torch_ext::with_bf16_autocast(run),
        _ => run(),
    };
    out.to_kind(Kind::Float)
}

/// Logits of window inference upsampled to the window: (1, K, h, w).
pub fn window_logits(model: &SegFormer, x: &Tensor, precision: Precision) -> Tensor {
    let (_, _, h, w) = x.size4().expect("NCHW");
    forward(model, x, precision).upsample_bilinear2d([h, w], false, None, None)
}

/// The windows (y1, y2, x1, x2) of mmseg's slide_inference over an `h` x `w` image: a grid of
/// `crop`-sized windows every `stride`, the last row and column shifted back inside the image.
pub fn windows(h: i64, w: i64, crop: i64, stride: i64) -> Vec<(i64, i64, i64, i64)> {
    let grids = |len: i64| (len - crop + stride - 1).max(0) / stride + 1;
    let mut out = Vec::new();
    for gy in 0..grids(h) {
        for gx in 0..grids(w) {
            let y2 = (gy * stride + crop).min(h);
            let x2 = (gx * stride + crop).min(w);
            out.push(((y2 - crop).max(0), y2, (x2 - crop).max(0), x2));
        }
    }
    out
}

/// Sliding-window logits at the image size: logits of every window (upsampled to the window)
/// summed, then divided by how many windows covered each pixel.
pub fn slide_logits(
    model: &SegFormer,
    x: &Tensor,
    k: i64,
    crop: i64,
    stride: i64,
    p: Precision,
) -> Tensor {
    let (n, _, h, w) = x.size4().expect("NCHW");
    let acc = Tensor::zeros([n, k, h, w], (Kind::Float, x.device()));
    let count = Tensor::zeros([1, 1, h, w], (Kind::Float, x.device()));
    for (y1, y2, x1, x2) in windows(h, w, crop, stride) {
        let window = x.narrow(2, y1, y2 - y1).narrow(3, x1, x2 - x1);
        let logits = window_logits(model, &window, p);
        let _ = acc
            .narrow(2, y1, y2 - y1)
            .narrow(3, x1, x2 - x1)
            .g_add_(&logits);
        let _ = count
            .narrow(2, y1, y2 - y1)
            .narrow(3, x1, x2 - x1)
            .g_add_scalar_(1.0);
    }
    acc / count
}

/// What evaluation adds up: one confusion matrix, the sum of per-image losses, the image count.
/// Ranks of a distributed evaluation each add up their shard; the sums then add across ranks.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalTotals {
    pub cm: ConfusionMatrix,
    pub loss_sum: f64,
    pub images: usize,
}

impl EvalTotals {
    pub fn result(&self) -> EvalResult {
        EvalResult {
            metrics: self.cm.metrics(),
            loss: if self.images == 0 {
                0.0
            } else {
                self.loss_sum / self.images as f64
            },
            images: self.images,
        }
    }
}

/// A host buffer on `device`: on CUDA through pinned memory and an asynchronous copy (a copy from
/// pageable memory waits for the GPU to finish everything queued before it).
fn upload(host: &Tensor, device: Device) -> Tensor {
    match device {
        Device::Cpu => host.shallow_clone(),
        Device::Cuda(_) => host
            .pin_memory(device)
            .to_device_(device, host.kind(), true, false),
        _ => host.to_device(device),
    }
}

/// Runs `model` in eval mode over `samples` and adds up their totals. Nothing is read back to the
/// host per image: the confusion matrix and the loss sum stay on the device (a [`DeviceConfusion`]
/// and a scalar tensor) and are read back once, after the last image; the images are uploaded
/// asynchronously from pinned memory.
pub fn accumulate<I>(
    model: &SegFormer,
    samples: I,
    device: Device,
    cfg: &EvalConfig,
) -> anyhow::Result<EvalTotals>
where
    I: IntoIterator<Item = anyhow::Result<EvalSample>>,
{
    let k = model.config.num_classes;
    let mut cm = DeviceConfusion::new(k as usize, device);
    let mut loss_sum = Tensor::zeros([], (Kind::Float, device));
    let mut images = 0usize;
    tch::no_grad(|| -> anyhow::Result<()> {
        for sample in samples {
            let s = sample?;
            let (h, w) = (s.height as i64, s.width as i64);
            let img = upload(
                &Tensor::from_data_size(&s.image, &[1, h, w, 3], Kind::Uint8),
                device,
            );
            let label = upload(
                &Tensor::from_data_size(&s.label, &[1, h, w], Kind::Uint8),
                device,
            )
            .to_kind(Kind::Int64);
            let x = normalise(&img);
            let logits = match cfg.mode {
                EvalMode::Whole => window_logits(model, &x, cfg.precision),
                EvalMode::Slide => slide_logits(model, &x, k, cfg.crop, cfg.stride, cfg.precision),
            };
            // Logits are already at the label size: the loss's upsampling is then the identity.
            loss_sum += segmentation_loss(&logits, &label);
            cm.update(&logits.argmax(1, false), &label);
            images += 1;
        }
        Ok(())
    })?;
    // The two read-backs of the evaluation (a device error of the queued work surfaces here).
    let loss_sum = f64::try_from(&loss_sum)?;
    Ok(EvalTotals {
        cm: cm.try_to_host()?,
        loss_sum,
        images,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cityscapes_windows_match_the_reference() {
        // docs/recipe.md §4.6: 1024x2048, crop 1024, stride 768 -> 1 x 3 windows at
        // x = 0, 768, 1024.
        let w = windows(1024, 2048, 1024, 768);
        assert_eq!(
            w,
            vec![
                (0, 1024, 0, 1024),
                (0, 1024, 768, 1792),
                (0, 1024, 1024, 2048)
            ]
        );
    }

    #[test]
    fn windows_cover_every_pixel_and_stay_inside() {
        for (h, w, crop, stride) in [
            (100, 300, 64, 48),
            (64, 64, 64, 32),
            (50, 40, 64, 48),
            (513, 1025, 256, 200),
        ] {
            let mut covered = vec![0u32; (h * w) as usize];
            for (y1, y2, x1, x2) in windows(h, w, crop, stride) {
                assert!(0 <= y1 && y1 < y2 && y2 <= h && 0 <= x1 && x1 < x2 && x2 <= w);
                assert_eq!(y2 - y1, crop.min(h));
                assert_eq!(x2 - x1, crop.min(w));
                for y in y1..y2 {
                    for x in x1..x2 {
                        covered[(y * w + x) as usize] += 1;
                    }
                }
            }
            assert!(
                covered.iter().all(|&c| c > 0),
                "{h}x{w} crop {crop} stride {stride}"
            );
        }
    }

    /// `accumulate` (device confusion matrix and loss sum, read back once) equals the per-image
    /// host path: the same logits, `ConfusionMatrix::update` and a read-back per image.
    #[test]
    fn accumulate_equals_the_per_image_host_path() {
        use crate::model::SegFormerConfig;
        use segtrain_spec::Variant;
        tch::manual_seed(11);
        let cpu = Device::Cpu;
        let vs = tch::nn::VarStore::new(cpu);
        let model = SegFormer::new(&vs.root(), SegFormerConfig::variant(Variant::B0, 19));
        let samples: Vec<EvalSample> = [(32i64, 48i64), (40, 40), (36, 52), (32, 64)]
            .into_iter()
            .enumerate()
            .map(|(i, (h, w))| {
                let image = Tensor::randint(256, [h, w, 3], (Kind::Uint8, cpu));
                let mut label = Tensor::randint(19, [h, w], (Kind::Uint8, cpu));
                let ignore = Tensor::rand([h, w], (Kind::Float, cpu)).lt(0.2);
                let _ = label.masked_fill_(&ignore, 255);
                if i == 3 {
                    let _ = label.fill_(255); // an image without a labelled pixel
                }
                EvalSample {
                    image: Vec::<u8>::try_from(image.flatten(0, -1)).expect("u8"),
                    label: Vec::<u8>::try_from(label.flatten(0, -1)).expect("u8"),
                    height: h as usize,
                    width: w as usize,
                    path: format!("img{i}.png").into(),
                }
            })
            .collect();
        for mode in [EvalMode::Whole, EvalMode::Slide] {
            let cfg = EvalConfig {
                mode,
                crop: 32,
                stride: 24,
                precision: Precision::Fp32,
            };
            let got =
                accumulate(&model, samples.iter().cloned().map(Ok), cpu, &cfg).expect("accumulate");
            let mut cm = ConfusionMatrix::new(19);
            let mut loss_sum = 0.0;
            tch::no_grad(|| {
                for s in &samples {
                    let (h, w) = (s.height as i64, s.width as i64);
                    let img = Tensor::from_data_size(&s.image, &[1, h, w, 3], Kind::Uint8);
                    let label = Tensor::from_data_size(&s.label, &[1, h, w], Kind::Uint8)
                        .to_kind(Kind::Int64);
                    let x = normalise(&img);
                    let logits = match mode {
                        EvalMode::Whole => window_logits(&model, &x, cfg.precision),
                        EvalMode::Slide => {
                            slide_logits(&model, &x, 19, cfg.crop, cfg.stride, cfg.precision)
                        }
                    };
                    loss_sum += f64::try_from(segmentation_loss(&logits, &label)).expect("loss");
                    cm.update(&logits.argmax(1, false), &label);
                }
            });
            assert_eq!(got.images, samples.len());
            assert_eq!(got.cm, cm, "{mode:?}");
            let labelled: u64 = cm.counts.iter().sum();
            let want_labelled = samples
                .iter()
                .flat_map(|s| &s.label)
                .filter(|&&l| l != 255)
                .count() as u64;
            assert_eq!(labelled, want_labelled, "every labelled pixel counted once");
            let predicted = (0..19)
                .filter(|&c| (0..19).any(|r| cm.counts[r * 19 + c] > 0))
                .count();
            assert!(
                predicted >= 2,
                "{mode:?}: the predictions vary ({predicted} classes)"
            );
            assert!(
                (got.loss_sum - loss_sum).abs() <= 1e-5 * loss_sum.abs().max(1.0),
                "{mode:?}: loss sum {} vs {loss_sum}",
                got.loss_sum
            );
            assert_eq!(got.result().metrics, cm.metrics());
        }
    }
}
