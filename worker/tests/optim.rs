//! The flat-buffer AdamW: parameter groups as the recipe, updates equal to a per-tensor
//! implementation of torch.optim.AdamW, state save/restore that continues exactly.

use segtrain_spec::Variant;
use segtrain_trainer::model::{SegFormer, SegFormerConfig};
use segtrain_trainer::optim::adamw::AdamWConfig;
use segtrain_trainer::optim::{FlatAdamW, ParamGroup};
use std::collections::BTreeMap;
use tch::{nn, Device, Kind, Tensor};

#[test]
fn parameter_groups_follow_the_recipe() {
    use ParamGroup::*;
    for (name, group) in [
        (
            "segformer.encoder.block.0.0.attention.self.query.weight",
            Encoder,
        ),
        (
            "segformer.encoder.block.0.0.attention.self.query.bias",
            Encoder,
        ), // biases keep decay
        (
            "segformer.encoder.block.1.0.mlp.dwconv.dwconv.bias",
            Encoder,
        ),
        (
            "segformer.encoder.patch_embeddings.0.layer_norm.weight",
            EncoderNorm,
        ),
        ("segformer.encoder.block.2.1.layer_norm_1.bias", EncoderNorm),
        (
            "segformer.encoder.block.0.0.attention.self.layer_norm.weight",
            EncoderNorm,
        ),
        ("segformer.encoder.layer_norm.3.weight", EncoderNorm),
        ("decode_head.batch_norm.weight", Head), // "head" wins over "norm"
        ("decode_head.linear_c.0.proj.bias", Head),
        ("decode_head.classifier.weight", Head),
    ] {
        assert_eq!(ParamGroup::of(name), group, "{name}");
    }
}

/// torch.optim.AdamW on one tensor, in f64.
struct Reference {
    m: Tensor,
    v: Tensor,
}

impl Reference {
    fn step(&mut self, p: &mut Tensor, g: &Tensor, lr: f64, wd: f64, t: i32) {
        let (b1, b2, eps) = (0.9, 0.999, 1e-8);
        *p = &*p * (1.0 - lr * wd);
        self.m = &self.m * b1 + g * (1.0 - b1);
        self.v = &self.v * b2 + g * g * (1.0 - b2);
        let bc1 = 1.0 - f64::powi(b1, t);
        let bc2 = 1.0 - f64::powi(b2, t);
        let denom = (&self.v / bc2).sqrt() + eps;
        *p = &*p - (&self.m / bc1) / denom * lr;
    }
}

#[test]
fn updates_equal_a_per_tensor_adamw_with_groups() {
    tch::manual_seed(1);
    let vs = nn::VarStore::new(Device::Cpu);
    let _m = SegFormer::new(&vs.root(), SegFormerConfig::variant(Variant::B0, 19));
    let cfg = AdamWConfig {
        weight_decay: 0.05,
        head_lr_mult: 10.0,
        ..AdamWConfig::default()
    };
    let before: BTreeMap<String, Tensor> = vs
        .variables()
        .into_iter()
        .filter(|(_, t)| t.requires_grad())
        .map(|(k, t)| (k, t.to_kind(Kind::Double).copy()))
        .collect();
    let mut opt = FlatAdamW::new(&vs, cfg);
    let mut reference: BTreeMap<String, (Tensor, Reference)> = before
        .iter()
        .map(|(k, t)| {
            (
                k.clone(),
                (
                    t.copy(),
                    Reference {
                        m: t.zeros_like(),
                        v: t.zeros_like(),
                    },
                ),
            )
        })
        .collect();

    for step in 1..=3 {
        // A made-up gradient per parameter, set through autograd's .grad.
        let grads: BTreeMap<String, Tensor> = before
            .iter()
            .map(|(k, t)| {
                (
                    k.clone(),
                    Tensor::randn(t.size(), (Kind::Float, Device::Cpu)),
                )
            })
            .collect();
        let vars = vs.variables();
        let flat = Tensor::cat(
            &opt.slots()
                .iter()
                .map(|s| grads[&s.name].reshape([-1]))
                .collect::<Vec<_>>(),
            0,
        );
        let lr = 1e-3 * step as f64;
        opt.step(&flat, lr).expect("step");
        for (name, (p, r)) in reference.iter_mut() {
            let (glr, wd) = match ParamGroup::of(name) {
                ParamGroup::Encoder => (lr, 0.05),
                ParamGroup::EncoderNorm => (lr, 0.0),
                ParamGroup::Head => (lr * 10.0, 0.05),
            };
            r.step(p, &grads[name].to_kind(Kind::Double), glr, wd, step);
            let got = vars[name].to_kind(Kind::Double);
            let d = f64::try_from((&got - &*p).abs().max()).expect("scalar");
            assert!(d < 1e-6, "{name} after step {step}: differs by {d}");
        }
    }
    assert_eq!(opt.steps(), 3);
}

#[test]
fn saved_state_continues_exactly() {
    // libtorch's generator is process-global and tests run in parallel threads, so the models
    // are not made equal by seeding: each gets the same explicit initial values.
    let init: Vec<(String, Tensor)> = {
        let vs = nn::VarStore::new(Device::Cpu);
        let _m = SegFormer::new(&vs.root(), SegFormerConfig::variant(Variant::B0, 19));
        vs.variables()
            .into_iter()
            .map(|(k, t)| (k, t.copy()))
            .collect()
    };
    let make = || {
        let vs = nn::VarStore::new(Device::Cpu);
        let _m = SegFormer::new(&vs.root(), SegFormerConfig::variant(Variant::B0, 19));
        tch::no_grad(|| {
            let vars = vs.variables();
            for (k, t) in &init {
                vars[k].shallow_clone().copy_(t);
            }
        });
        let opt = FlatAdamW::new(&vs, AdamWConfig::default());
        (vs, opt)
    };
    let n = make().1.num_params();
    let grads: Vec<Tensor> = (1..=4)
        .map(|i| Tensor::arange(n, (Kind::Float, Device::Cpu)).sin() * (0.1 * i as f64))
        .collect();
    // Straight: 4 steps.
    let (vs_a, mut a) = make();
    for g in &grads {
        a.step(g, 1e-3).expect("step");
    }
    // Interrupted: 2 steps, save, a fresh optimizer restores, 2 more.
    let (vs_b, mut b) = make();
    for g in &grads[..2] {
        b.step(g, 1e-3).expect("step");
    }
    let state = b
        .state_tensors()
        .into_iter()
        .map(|(k, t)| (k, t.copy()))
        .collect::<Vec<_>>();
    let params: Vec<(String, Tensor)> = vs_b
        .variables()
        .into_iter()
        .map(|(k, t)| (k, t.copy()))
        .collect();
    let (vs_c, mut c) = make();
    tch::no_grad(|| {
        let vars = vs_c.variables();
        for (k, t) in &params {
            vars[k].shallow_clone().copy_(t);
        }
    });
    c.load_state(&state, b.steps()).expect("same layout");
    assert!(b.params().equal(c.params()), "restored parameters");
    assert!(
        b.state_tensors()[0].1.equal(&c.state_tensors()[0].1),
        "restored m"
    );
    for g in &grads[2..] {
        c.step(g, 1e-3).expect("step");
    }
    assert!(a.params().equal(c.params()), "parameters bit for bit");
    let (sa, sc) = (a.state_tensors(), c.state_tensors());
    assert!(
        sa[0].1.equal(&sc[0].1) && sa[1].1.equal(&sc[1].1),
        "moments bit for bit"
    );
    // The model's variables are views of the flat buffer.
    let key = "decode_head.classifier.weight";
    assert!(vs_a.variables()[key].equal(&vs_c.variables()[key]));

    // A state of the wrong size is refused by name.
    let bad = vec![
        (
            "m".to_string(),
            Tensor::zeros([3], (Kind::Float, Device::Cpu)),
        ),
        (
            "v".to_string(),
            Tensor::zeros([3], (Kind::Float, Device::Cpu)),
        ),
    ];
    let err = c.load_state(&bad, 1).expect_err("wrong layout");
    assert!(err.to_string().contains("shape"), "{err}");
}

/// Autograd accumulates straight into the optimizer's flat gradient buffer (each parameter's
/// `.grad` is a view of it): two backward passes sum there, `zero_grad` clears it, and a gradient
/// of the wrong size is refused without changing anything.
#[test]
fn gradients_accumulate_in_the_flat_buffer() {
    let vs = nn::VarStore::new(Device::Cpu);
    let mut model = SegFormer::new(&vs.root(), SegFormerConfig::variant(Variant::B0, 19));
    model.disable_stochastic();
    let mut opt = FlatAdamW::new(&vs, AdamWConfig::default());
    let x = Tensor::randn([2, 3, 64, 64], (Kind::Float, Device::Cpu));
    let loss = || model.forward_t(&x, true).square().mean(Kind::Float);

    loss().backward();
    let once = opt.flat_grad().copy();
    assert!(f64::try_from(once.abs().sum(Kind::Double)).expect("scalar") > 0.0);
    // The flat buffer and every parameter's .grad are the same memory.
    let vars = vs.variables();
    for s in opt.slots() {
        let n: i64 = s.shape.iter().product();
        let flat = opt.flat_grad().narrow(0, s.offset, n);
        assert!(
            flat.equal(&vars[&s.name].grad().reshape([-1])),
            "{}: .grad is not its slice of the flat buffer",
            s.name
        );
    }
    loss().backward();
    let twice = opt.flat_grad();
    let d = f64::try_from((&twice - &once * 2.0).abs().max()).expect("scalar");
    let scale = f64::try_from(once.abs().max()).expect("scalar");
    assert!(
        d <= 1e-5 * scale,
        "second backward accumulates: {d} (scale {scale})"
    );

    opt.zero_grad();
    assert_eq!(
        f64::try_from(opt.flat_grad().abs().sum(Kind::Double)).expect("scalar"),
        0.0
    );
    let vars = vs.variables();
    let key = "decode_head.classifier.weight";
    assert!(vars[key].grad().defined(), "zeroing keeps the views");

    let before = opt.params().copy();
    let err = opt
        .step(&Tensor::zeros([5], (Kind::Float, Device::Cpu)), 1e-3)
        .expect_err("wrong size");
    assert!(err.to_string().contains("gradient"), "{err}");
    assert!(opt.params().equal(&before), "nothing changed");
    assert_eq!(opt.steps(), 0);
}
