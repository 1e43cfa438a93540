//! Numerical parity with the reference implementation (HuggingFace transformers'
//! `SegformerForSemanticSegmentation`, fp32, eval mode), on fixtures made by
//! `tests/fixtures/make_parity_fixtures.py`.

mod common;

use common::{fixture, max_abs_diff, write_b0_weights};
use segtrain_trainer::model::weights::{self, CheckpointKind};
use segtrain_trainer::model::{SegFormer, SegFormerConfig};
use std::collections::BTreeMap;
use tch::{nn, Device, Tensor};

const TOLERANCE: f64 = 1e-4;

/// Runs the model on the fixture's input and compares the stage maps and logits.
fn check(model: &SegFormer, fx: &BTreeMap<String, Tensor>) {
    let x = &fx["pixel_values"];
    let (maps, logits) = tch::no_grad(|| (model.features(x, false), model.forward_t(x, false)));
    for (i, m) in maps.iter().enumerate() {
        let d = max_abs_diff(m, &fx[&format!("hidden_states.{i}")]);
        assert!(d <= TOLERANCE, "stage {i} differs by {d}");
    }
    let d = max_abs_diff(&logits, &fx["logits"]);
    assert!(d <= TOLERANCE, "logits differ by {d}");
    // The reference must not be trivially small: a wrong model would be far off.
    let scale = f64::try_from(fx["logits"].abs().max()).expect("scalar");
    assert!(
        scale > 0.1,
        "reference logits too small to be meaningful: {scale}"
    );
}

#[test]
fn tiny_custom_config_matches_the_reference() {
    let fx = fixture("tiny.safetensors");
    let cfg = SegFormerConfig {
        hidden_sizes: [8, 16, 24, 32],
        depths: [1, 1, 2, 1],
        num_heads: [1, 2, 3, 4],
        decoder_dim: 16,
        num_classes: 5,
        ..SegFormerConfig::variant(segtrain_spec::Variant::B0, 5)
    };
    let vs = nn::VarStore::new(Device::Cpu);
    let model = SegFormer::new(&vs.root(), cfg);
    let weights: Vec<(String, Tensor)> = fx
        .iter()
        .filter(|(k, _)| k.starts_with("segformer.") || k.starts_with("decode_head."))
        .map(|(k, t)| (k.clone(), t.shallow_clone()))
        .collect();
    let report = weights::load_tensors(&vs, weights, "tiny fixture").expect("strict load");
    assert_eq!(report.kind, CheckpointKind::Full);
    assert_eq!(
        report.loaded,
        vs.variables().len(),
        "every model tensor came from the file"
    );
    assert_eq!(
        report.skipped,
        vec!["decode_head.batch_norm.num_batches_tracked".to_string()]
    );
    check(&model, &fx);
}

#[test]
fn b0_matches_the_reference_loading_an_hf_safetensors_file() {
    let fx = fixture("b0.safetensors");
    let dir = tempfile::tempdir().expect("temp dir");
    let file = write_b0_weights(&fx, dir.path());

    let vs = nn::VarStore::new(Device::Cpu);
    let model = SegFormer::new(
        &vs.root(),
        SegFormerConfig::variant(segtrain_spec::Variant::B0, 19),
    );
    let report = weights::load_file(&vs, &file).expect("strict load of an HF file");
    assert_eq!(report.kind, CheckpointKind::Full);
    assert_eq!(report.loaded, vs.variables().len());
    check(&model, &fx);
}
