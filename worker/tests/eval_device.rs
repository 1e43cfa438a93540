//! On an NVIDIA GPU: the evaluation's confusion matrix accumulated on the device equals the
//! per-image host path.
//! Run on a GPU machine with `cargo test -p segtrain-worker --test eval_device -- --ignored`;
//! they fail, not skip, without CUDA.

use segtrain_trainer::train::metrics::{ConfusionMatrix, DeviceConfusion};
use tch::{Device, Kind, Tensor};

fn cuda() -> Device {
    assert!(tch::Cuda::is_available(), "these tests need a CUDA device");
    Device::Cuda(0)
}

/// A random prediction and label of `h` x `w` on `dev`: labels in 0..k or 255 (about a fifth).
fn random_pair(k: i64, h: i64, w: i64, dev: Device) -> (Tensor, Tensor) {
    let pred = Tensor::randint(k, [1, h, w], (Kind::Int64, dev));
    let mut label = Tensor::randint(k, [1, h, w], (Kind::Int64, dev));
    let ignore = Tensor::rand([1, h, w], (Kind::Float, dev)).lt(0.2);
    let _ = label.masked_fill_(&ignore, 255);
    (pred, label.to_kind(Kind::Uint8))
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn device_confusion_on_cuda_equals_the_host_path() {
    let dev = cuda();
    tch::manual_seed(5);
    let k = 19;
    let mut host = ConfusionMatrix::new(k as usize);
    let mut on_device = DeviceConfusion::new(k as usize, dev);
    for (h, w) in [(1024, 2048), (512, 1024), (37, 91), (1, 1)] {
        let (pred, label) = random_pair(k, h, w, dev);
        host.update(&pred, &label);
        on_device.update(&pred, &label);
    }
    assert_eq!(on_device.device(), dev);
    let got = on_device.to_host();
    assert_eq!(got, host);
    assert_eq!(got.metrics(), host.metrics());
}
