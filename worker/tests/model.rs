//! SegFormer structure: parameter counts, stage shapes, gradients, train vs eval, weight loading
//! errors.

use segtrain_spec::Variant;
use segtrain_trainer::model::weights::{self, CheckpointKind, WeightsError};
use segtrain_trainer::model::{parameter_counts, SegFormer, SegFormerConfig};
use tch::{nn, Device, Kind, Tensor};

fn model(v: Variant, classes: i64) -> (nn::VarStore, SegFormer) {
    tch::manual_seed(0);
    let vs = nn::VarStore::new(Device::Cpu);
    let m = SegFormer::new(&vs.root(), SegFormerConfig::variant(v, classes));
    (vs, m)
}

#[test]
fn parameter_counts_equal_the_reference_for_every_variant() {
    // docs/recipe.md §1.6 (19 classes): encoder, head, total.
    let expected = [
        (Variant::B0, 3_319_392, 399_635, 3_719_027),
        (Variant::B1, 13_151_424, 530_707, 13_682_131),
        (Variant::B2, 24_196_288, 3_164_947, 27_361_235),
        (Variant::B3, 44_072_128, 3_164_947, 47_237_075),
        (Variant::B4, 60_842_688, 3_164_947, 64_007_635),
        (Variant::B5, 81_443_008, 3_164_947, 84_607_955),
    ];
    for (v, enc, head, total) in expected {
        let (vs, _) = model(v, 19);
        let (e, h) = parameter_counts(&vs);
        assert_eq!((e, h, e + h), (enc, head, total), "{v}");
    }
}

#[test]
fn stage_maps_are_quarter_to_thirty_second_and_logits_quarter_size() {
    // A real forward pass at 1024x1024 for B0 (cheap on CPU), and the shape arithmetic that
    // model-info prints checked against real forward passes for every variant at 256x256.
    let (_, m) = model(Variant::B0, 19);
    let x = Tensor::randn([1, 3, 1024, 1024], (Kind::Float, Device::Cpu));
    let (maps, logits) = tch::no_grad(|| (m.features(&x, false), m.forward_t(&x, false)));
    let widths = [32, 64, 160, 256];
    for (s, map) in maps.iter().enumerate() {
        let side = 1024 / (4 << s);
        assert_eq!(map.size(), vec![1, widths[s], side, side], "stage {s}");
    }
    assert_eq!(logits.size(), vec![1, 19, 256, 256]);

    for v in Variant::ALL {
        let (_, m) = model(*v, 19);
        let x = Tensor::randn([2, 3, 256, 256], (Kind::Float, Device::Cpu));
        let maps = tch::no_grad(|| m.features(&x, false));
        for (s, (map, (c, h, w))) in maps.iter().zip(m.config.stage_shapes(256, 256)).enumerate() {
            assert_eq!(map.size(), vec![2, c, h, w], "{v} stage {s}");
            assert_eq!(h, 256 / (4 << s));
        }
        // And the arithmetic at 1024: 1/4 .. 1/32 with the variant's widths.
        let at_1024 = m.config.stage_shapes(1024, 1024);
        assert_eq!(
            at_1024.map(|(_, h, w)| (h, w)),
            [(256, 256), (128, 128), (64, 64), (32, 32)]
        );
        assert_eq!(at_1024.map(|(c, _, _)| c), m.config.hidden_sizes);
    }
}

#[test]
fn one_backward_gives_every_parameter_a_gradient() {
    let (vs, mut m) = model(Variant::B0, 19);
    m.disable_stochastic();
    let x = Tensor::randn([2, 3, 64, 64], (Kind::Float, Device::Cpu));
    let target = Tensor::randint(19, [2, 16, 16], (Kind::Int64, Device::Cpu));
    let loss = m.forward_t(&x, true).cross_entropy_loss::<Tensor>(
        &target,
        None,
        tch::Reduction::Mean,
        255,
        0.0,
    );
    loss.backward();
    let mut checked = 0;
    for (name, v) in vs.variables() {
        if !v.requires_grad() {
            continue; // BatchNorm running statistics
        }
        let g = v.grad();
        assert!(g.defined(), "{name} has no gradient");
        assert!(
            f64::try_from(g.abs().sum(Kind::Double)).expect("scalar") > 0.0,
            "{name} gradient is zero"
        );
        checked += 1;
    }
    // docs/recipe.md §1.6: B0 has 192 encoder and 13 head parameter tensors.
    assert_eq!(checked, 192 + 13, "every parameter tensor was checked");
}

#[test]
fn train_and_eval_differ_only_by_dropout_drop_path_and_batchnorm_statistics() {
    let (vs, mut m) = model(Variant::B0, 19);
    let x = Tensor::randn([2, 3, 64, 64], (Kind::Float, Device::Cpu));

    // With dropout and drop path on, train mode is random and eval mode is not.
    let (a, b) = tch::no_grad(|| (m.forward_t(&x, true), m.forward_t(&x, true)));
    assert!(
        f64::try_from((&a - &b).abs().max()).expect("scalar") > 1e-3,
        "train mode is stochastic"
    );
    let (e1, e2) = tch::no_grad(|| (m.forward_t(&x, false), m.forward_t(&x, false)));
    assert!(e1.equal(&e2), "eval mode is deterministic");

    // Without them, train mode is deterministic and equals eval mode once the BatchNorm running
    // statistics are the batch's own.
    m.disable_stochastic();
    let vars = vs.variables();
    let mut mean = vars["decode_head.batch_norm.running_mean"].shallow_clone();
    let mut var = vars["decode_head.batch_norm.running_var"].shallow_clone();
    tch::no_grad(|| {
        let _ = mean.fill_(0.0);
        let _ = var.fill_(1.0);
    });
    let t1 = tch::no_grad(|| m.forward_t(&x, true)); // updates running stats with momentum 0.1
                                                     // Recover the batch statistics from the update: new = 0.9 * old + 0.1 * batch (variance unbiased).
    let n = (2 * 16 * 16) as f64;
    tch::no_grad(|| {
        let batch_mean = &mean / 0.1;
        let batch_var_unbiased = (&var - 0.9) / 0.1;
        mean.copy_(&batch_mean);
        var.copy_(&(batch_var_unbiased * ((n - 1.0) / n)));
    });
    let e = tch::no_grad(|| m.forward_t(&x, false));
    let d = f64::try_from((&t1 - &e).abs().max()).expect("scalar");
    assert!(
        d < 1e-3,
        "train (no dropout/drop path) vs eval with batch statistics: {d}"
    );
}

#[test]
fn encoder_only_checkpoints_fill_the_encoder_and_keep_the_head() {
    let (src_vs, _) = model(Variant::B0, 19);
    let mut tensors: Vec<(String, Tensor)> = src_vs
        .variables()
        .into_iter()
        .filter(|(k, _)| k.starts_with("segformer.encoder."))
        .collect();
    // An ImageNet checkpoint also carries its 1000-class classifier.
    tensors.push((
        "classifier.weight".into(),
        Tensor::zeros([1000, 256], (Kind::Float, Device::Cpu)),
    ));
    tensors.push((
        "classifier.bias".into(),
        Tensor::zeros([1000], (Kind::Float, Device::Cpu)),
    ));

    tch::manual_seed(42);
    let vs = nn::VarStore::new(Device::Cpu);
    let _m = SegFormer::new(&vs.root(), SegFormerConfig::variant(Variant::B0, 19));
    let head_before = vs.variables()["decode_head.classifier.weight"].copy();
    let report = weights::load_tensors(&vs, tensors, "mit-b0").expect("encoder-only load");
    assert_eq!(report.kind, CheckpointKind::EncoderOnly);
    assert_eq!(report.skipped.len(), 2);
    let vars = vs.variables();
    let src = src_vs.variables();
    let key = "segformer.encoder.block.3.1.mlp.dense2.weight";
    assert!(vars[key].equal(&src[key]), "encoder weights were copied");
    assert!(
        vars["decode_head.classifier.weight"].equal(&head_before),
        "head kept its init"
    );
}

#[test]
fn loading_reports_missing_unexpected_and_mismatched_keys_by_name_and_changes_nothing() {
    let (src_vs, _) = model(Variant::B0, 19);
    let mut tensors: Vec<(String, Tensor)> = src_vs.variables().into_iter().collect();
    tensors.retain(|(k, _)| k != "decode_head.linear_fuse.weight");
    tensors.push((
        "decode_head.extra.weight".into(),
        Tensor::zeros([3], (Kind::Float, Device::Cpu)),
    ));
    for (k, t) in tensors.iter_mut() {
        if k == "decode_head.classifier.weight" {
            *t = Tensor::zeros([7, 256, 1, 1], (Kind::Float, Device::Cpu));
        }
    }
    let vs = nn::VarStore::new(Device::Cpu);
    let _m = SegFormer::new(&vs.root(), SegFormerConfig::variant(Variant::B0, 19));
    let before = vs.variables()["segformer.encoder.patch_embeddings.0.proj.weight"].copy();
    let err = weights::load_tensors(&vs, tensors, "bad.safetensors").expect_err("must not fit");
    let WeightsError::Mismatch {
        missing,
        unexpected,
        mismatched,
        ..
    } = &err
    else {
        panic!("expected a mismatch, got {err}");
    };
    assert_eq!(missing, &vec!["decode_head.linear_fuse.weight".to_string()]);
    assert_eq!(unexpected, &vec!["decode_head.extra.weight".to_string()]);
    assert_eq!(mismatched.len(), 1);
    assert_eq!(mismatched[0].0, "decode_head.classifier.weight");
    let msg = err.to_string();
    for needle in [
        "bad.safetensors",
        "decode_head.linear_fuse.weight",
        "decode_head.extra.weight",
        "[19, 256, 1, 1]",
        "[7, 256, 1, 1]",
    ] {
        assert!(msg.contains(needle), "{needle} missing from: {msg}");
    }
    assert!(
        vs.variables()["segformer.encoder.patch_embeddings.0.proj.weight"].equal(&before),
        "a failed load changes nothing"
    );

    let err = weights::load_file(&vs, std::path::Path::new("/nonexistent/w.safetensors"))
        .expect_err("no file");
    assert!(
        err.to_string().contains("/nonexistent/w.safetensors"),
        "{err}"
    );
}

#[test]
fn bad_inputs_are_refused_before_the_forward_pass() {
    for (shape, kind) in [
        (vec![3, 64, 64], Kind::Float),
        (vec![1, 4, 64, 64], Kind::Float),
        (vec![1, 3, 16, 64], Kind::Float),
        (vec![1, 3, 64, 64], Kind::Uint8),
    ] {
        let x = Tensor::zeros(shape.as_slice(), (kind, Device::Cpu));
        assert!(SegFormer::check_input(&x).is_err(), "{shape:?} {kind:?}");
    }
    assert!(
        SegFormer::check_input(&Tensor::zeros([2, 3, 64, 96], (Kind::Float, Device::Cpu))).is_ok()
    );
}

#[test]
fn sliding_window_equals_whole_image_when_one_window_covers_it() {
    use segtrain_trainer::train::eval::{slide_logits, window_logits};
    let (_, m) = model(Variant::B0, 19);
    let x = Tensor::randn([1, 3, 64, 96], (Kind::Float, Device::Cpu));
    let (slide, whole) = tch::no_grad(|| {
        (
            slide_logits(&m, &x, 19, 128, 96, segtrain_spec::Precision::Fp32),
            window_logits(&m, &x, segtrain_spec::Precision::Fp32),
        )
    });
    assert_eq!(slide.size(), vec![1, 19, 64, 96]);
    assert!(slide.allclose(&whole, 1e-6, 1e-6, false));
    // Overlapping windows average: still the image size, finite everywhere.
    let overlapped =
        tch::no_grad(|| slide_logits(&m, &x, 19, 64, 32, segtrain_spec::Precision::Fp32));
    assert_eq!(overlapped.size(), vec![1, 19, 64, 96]);
    assert!(bool::try_from(overlapped.isfinite().all()).expect("bool"));
}

/// The fast head (fuse merged into each stage's projection, before upsampling) computes the same
/// logits and the same gradients for every parameter as the paper's upsample-concat-fuse order,
/// in train mode (BatchNorm on batch statistics), and so do contiguous and channels-last stage
/// maps.
#[test]
fn the_merged_head_equals_upsample_concat_fuse_in_value_and_gradient() {
    use segtrain_trainer::model::HeadMode;
    let (vs, mut m) = model(Variant::B0, 19);
    m.disable_stochastic();
    // A non-square input, so the four stage sizes differ in both directions.
    let x = Tensor::randn([2, 3, 96, 64], (Kind::Float, Device::Cpu));
    let r = Tensor::randn([2, 19, 24, 16], (Kind::Float, Device::Cpu));
    let mut run = |mode: HeadMode, contiguous: bool| {
        m.set_head_mode(mode);
        m.set_contiguous_maps(contiguous);
        for (_, mut v) in vs.variables() {
            v.zero_grad();
        }
        let logits = m.forward_t(&x, true);
        (&logits * &r).sum(Kind::Float).backward();
        let mut grads: Vec<(String, Tensor)> = vs
            .variables()
            .into_iter()
            .filter(|(_, v)| v.requires_grad())
            .map(|(k, v)| (k, v.grad().copy()))
            .collect();
        grads.sort_by(|a, b| a.0.cmp(&b.0));
        (logits.detach(), grads)
    };
    let (concat, concat_grads) = run(HeadMode::Concat, true);
    for contiguous in [false, true] {
        let (merged, merged_grads) = run(HeadMode::Merged, contiguous);
        let d = f64::try_from((&merged - &concat).abs().max()).expect("scalar");
        assert!(
            d < 1e-4,
            "logits differ by {d} (contiguous maps: {contiguous})"
        );
        assert_eq!(merged_grads.len(), concat_grads.len());
        for ((name, a), (other, b)) in merged_grads.iter().zip(&concat_grads) {
            assert_eq!(name, other);
            // The stage projections' biases get (mathematically) zero gradient, as BatchNorm
            // removes any constant shift: hence the absolute floor, far below the typical
            // gradient (order 1 to 100 for this loss).
            let scale = f64::try_from(b.abs().max()).expect("scalar");
            let d = f64::try_from((a - b).abs().max()).expect("scalar");
            assert!(
                d <= 1e-4 * scale + 1e-4,
                "{name}: gradients differ by {d} (scale {scale})"
            );
        }
    }
}
