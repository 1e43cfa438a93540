//! On an NVIDIA GPU: the parity test on CUDA in fp32, and bf16 autocast against fp32.
//! Run on a GPU machine with `cargo test -p segtrain-worker --test cuda -- --ignored`
//! (or the prebuilt test binary with `--ignored`); they fail, not skip, without CUDA.

mod common;

use common::{fixture, max_abs_diff, write_b0_weights};
use segtrain_spec::Variant;
use segtrain_trainer::model::{weights, SegFormer, SegFormerConfig};
use segtrain_trainer::torch_ext;
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

/// A bf16 step on CUDA from CPU u8 batches (the pinned asynchronous copy) fills the optimizer's
/// flat gradient buffer through the parameters' .grad views, and torch's fused AdamW kernel on
/// CUDA updates exactly as the CPU kernel does with the same gradient.
#[test]
#[ignore = "needs an NVIDIA GPU"]
fn a_cuda_step_fills_the_flat_gradients_and_fused_adamw_matches_the_cpu() {
    use segtrain_spec::Precision;
    use segtrain_trainer::optim::adamw::AdamWConfig;
    use segtrain_trainer::optim::FlatAdamW;
    use segtrain_trainer::train::forward_backward;
    let dev = cuda();
    torch_ext::set_tf32(false);
    let cfg = SegFormerConfig::variant(Variant::B0, 19);
    let vs_cpu = nn::VarStore::new(Device::Cpu);
    let _cpu_model = SegFormer::new(&vs_cpu.root(), cfg.clone());
    let mut vs_gpu = nn::VarStore::new(dev);
    let gpu_model = SegFormer::new(&vs_gpu.root(), cfg);
    vs_gpu.copy(&vs_cpu).expect("same variables");
    let mut opt_cpu = FlatAdamW::new(&vs_cpu, AdamWConfig::default());
    let mut opt_gpu = FlatAdamW::new(&vs_gpu, AdamWConfig::default());
    assert!(opt_gpu
        .params()
        .to_device(Device::Cpu)
        .equal(opt_cpu.params()));

    let images = Tensor::randint(256, [2, 128, 128, 3], (Kind::Uint8, Device::Cpu));
    let labels = Tensor::randint(19, [2, 128, 128], (Kind::Uint8, Device::Cpu));
    let loss = forward_backward(&gpu_model, &images, &labels, Precision::Bf16, dev, 1, None)
        .expect("step");
    let loss = f64::try_from(loss).expect("scalar");
    assert!(loss.is_finite() && loss > 0.0, "loss {loss}");
    let grad = opt_gpu.flat_grad();
    let g = grad.to_device(Device::Cpu);
    assert!(
        bool::try_from(g.isfinite().all()).expect("bool"),
        "finite gradients"
    );
    assert!(f64::try_from(g.abs().sum(Kind::Double)).expect("scalar") > 0.0);

    for _ in 0..3 {
        opt_gpu.step(&grad, 1e-3).expect("CUDA step");
        opt_cpu.step(&g, 1e-3).expect("CPU step");
    }
    let d = max_abs_diff(&opt_gpu.params().to_device(Device::Cpu), opt_cpu.params());
    assert!(d <= 1e-6, "fused AdamW on CUDA vs CPU: {d}");
}
