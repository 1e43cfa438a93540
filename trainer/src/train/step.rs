//! One micro-batch of a training step: to the device, forward (autocast), loss, backward. The
//! trainer and `segtrain-worker bench` share it.

use crate::collective::Collective;
use crate::model::SegFormer;
use crate::train::eval::normalise;
use crate::train::loss::segmentation_loss;
use anyhow::Context;
use segtrain_spec::Precision;
use tch::{Device, Kind, Tensor};

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
pub(crate) fn autocast<T>(precision: Precision, device: Device, forward: impl FnOnce() -> T) -> T {
    match precision {
        Precision::Bf16 if device != Device::Cpu => crate::torch_ext::with_bf16_autocast(forward),
        _ => forward(),
    }
}

/// A micro-batch on `device`: normalised f32 NCHW images and i64 labels.
pub(crate) fn on_device(images: &Tensor, labels: &Tensor, device: Device) -> (Tensor, Tensor) {
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
