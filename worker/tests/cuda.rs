//! On an NVIDIA GPU: the parity test on CUDA in fp32, and bf16 autocast against fp32.
//! Run on a GPU machine with `cargo test -p segtrain-worker --test cuda -- --ignored`
//! (or the prebuilt test binary with `--ignored`); they fail, not skip, without CUDA.

mod common;

use common::{fixture, max_abs_diff, write_b0_weights};
use segtrain_spec::Variant;
use segtrain_worker::model::{weights, SegFormer, SegFormerConfig};
use segtrain_worker::torch_ext;
use tch::{nn, Device, Kind, Tensor};

fn cuda() -> Device {
    assert!(tch::Cuda::is_available(), "these tests need a CUDA device");
    Device::Cuda(0)
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn parity_on_cuda_in_fp32() {
    let dev = cuda();
    torch_ext::set_tf32(false); // true fp32 math, as the reference logits
    let fx = fixture("b0.safetensors");
    let dir = tempfile::tempdir().expect("temp dir");
    let file = write_b0_weights(&fx, dir.path());
    let vs = nn::VarStore::new(dev);
    let model = SegFormer::new(&vs.root(), SegFormerConfig::variant(Variant::B0, 19));
    weights::load_file(&vs, &file).expect("strict load");
    let x = fx["pixel_values"].to_device(dev);
    let logits = tch::no_grad(|| model.forward_t(&x, false)).to_device(Device::Cpu);
    let d = max_abs_diff(&logits, &fx["logits"]);
    assert!(
        d <= 1e-4,
        "CUDA fp32 logits differ from the reference by {d}"
    );
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn bf16_autocast_logits_are_within_two_percent_of_fp32() {
    let dev = cuda();
    torch_ext::set_tf32(false);
    for v in [Variant::B0, Variant::B3] {
        tch::manual_seed(0);
        let vs = nn::VarStore::new(dev);
        let model = SegFormer::new(&vs.root(), SegFormerConfig::variant(v, 19));
        let x = Tensor::randn([2, 3, 512, 512], (Kind::Float, dev));
        let fp32 = tch::no_grad(|| model.forward_t(&x, false));
        let bf16 = tch::no_grad(|| torch_ext::with_bf16_autocast(|| model.forward_t(&x, false)));
        assert_eq!(
            bf16.kind(),
            Kind::BFloat16,
            "{v}: autocast ran the model in bf16"
        );
        let rel = f64::try_from((bf16.to_kind(Kind::Float) - &fp32).norm() / fp32.norm())
            .expect("scalar");
        assert!(rel <= 2e-2, "{v}: bf16 relative error {rel}");
        println!("{v}: bf16 vs fp32 relative error {rel:.2e}");
    }
}
