//! `segtrain.v1.JobSpec` to and from the spec types: nothing lost, unset stays unset, and the
//! wire's empty path means none.

use segtrain_proto::job_spec::{ProtoSpec, ProtoSpecInput};
use segtrain_proto::v1 as pb;
use segtrain_spec::{JobSpec, JobSpecInput, FIELDS};

/// A job file that differs from the defaults in every field, so that a round trip which drops
/// or mixes up a field cannot pass by accident.
const UNUSUAL: &str = r#"
name = "city_b2-run.7"
priority = -17
variant = "b2"
num_classes = 150
pretrained = "gs://my-weights/mit/mit_b2.safetensors"
dataset_root = "/mnt/data/ade \"20k\""
crop_height = 512
crop_width = 640
loader_threads = 12
world_size = 4
batch_per_gpu = 2
accumulate_steps = 3
max_iters = 80000
precision = "bf16"
seed = 9223372036854775807
sync_bn = false
base_lr = 1.2345678901234567e-4
warmup_iters = 0
warmup_ratio = 0.1
poly_power = 0.9
weight_decay = 0.0
head_lr_mult = 1000.0
log_interval = 80000
eval_interval = 0
checkpoint_interval = 8000
eval_mode = "whole"
eval_crop = 512
eval_stride = 341
resume_from = "file:///var/ckpt/iter_4000"
max_restarts = 0
keep_last = 1000
keep_best = false
checkpoint_root = "gs://ckpt-bucket"
"#;

fn unusual() -> JobSpec {
    JobSpecInput::from_toml_str(UNUSUAL)
        .expect("parses")
        .resolve()
        .expect("valid")
}

#[test]
fn a_resolved_spec_survives_the_wire_with_every_field_set() {
    let default = JobSpecInput::from_toml_str("dataset_root = \"/data/cityscapes\"\n")
        .expect("parses")
        .resolve()
        .expect("valid");
    assert_eq!(
        toml::Table::try_from(JobSpecInput::from(unusual()))
            .expect("serialises")
            .len(),
        FIELDS.len()
    );
    for spec in [default, unusual()] {
        let p = spec.to_proto();
        assert_eq!(JobSpec::from_proto(&p), Ok(spec.clone()));
        assert_eq!(JobSpecInput::from_proto(&p).to_proto(), p);
        let set = toml::Table::try_from(JobSpecInput::from_proto(&p)).expect("serialises");
        assert_eq!(set.len(), FIELDS.len(), "every field is set: {set:?}");
        assert_ne!(JobSpecInput::from(spec), JobSpecInput::default());
    }
    let p = JobSpecInput::from_toml_str("dataset_root = \"/d\"\n")
        .expect("parses")
        .resolve()
        .expect("valid")
        .to_proto();
    assert_eq!(p.pretrained.as_deref(), Some(""));
    assert_eq!(p.resume_from.as_deref(), Some(""));
    assert_eq!(p.variant.as_deref(), Some("b0"));
    assert_eq!(p.keep_best, Some(true));
}

#[test]
fn an_input_keeps_unset_fields_unset() {
    let input = JobSpecInput {
        max_iters: Some(1000),
        variant: Some("b3".to_string()),
        ..Default::default()
    };
    let p = input.to_proto();
    assert_eq!(p.max_iters, Some(1000));
    assert_eq!(p.name, None);
    assert_eq!(p.dataset_root, None);
    assert_eq!(JobSpecInput::from_proto(&p), input);
    // An unset proto spec is missing its dataset root.
    let err = JobSpec::from_proto(&pb::JobSpec::default()).unwrap_err();
    assert_eq!(err.field, "dataset_root");
    assert_eq!(err.message, "required: the dataset root, an absolute path");
}

#[test]
fn empty_paths_mean_none_and_sync_bn_follows_the_world() {
    let p = pb::JobSpec {
        dataset_root: Some("/d".to_string()),
        pretrained: Some(String::new()),
        resume_from: Some(String::new()),
        world_size: Some(1),
        ..Default::default()
    };
    let spec = JobSpec::from_proto(&p).expect("valid");
    assert_eq!((spec.pretrained, spec.resume_from), (None, None));
    assert!(!spec.sync_bn);
    let p = pb::JobSpec {
        world_size: Some(4),
        ..p
    };
    assert!(JobSpec::from_proto(&p).expect("valid").sync_bn);
}
