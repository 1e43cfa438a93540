//! Conversions to and from the wire type `segtrain.v1.JobSpec`, whose fields are all `optional`
//! and carry the same names as ours.

//! Traits, since the spec types live in `segtrain-spec`, which knows no proto: bring
//! [`ProtoSpecInput`] and [`ProtoSpec`] into scope and call `JobSpec::from_proto(&p)`.

use crate::v1 as pb;
use segtrain_spec::{JobSpec, JobSpecInput, SpecError};

/// A job-spec input to and from the wire.
pub trait ProtoSpecInput {
    /// Takes every field as given; unset fields stay `None` (defaults come in `resolve`).
    fn from_proto(p: &pb::JobSpec) -> Self;
    /// Sets exactly the fields that are set.
    fn to_proto(&self) -> pb::JobSpec;
}

/// A resolved job spec to and from the wire.
pub trait ProtoSpec: Sized {
    /// The fully resolved form the server echoes back: every field set. An unset path
    /// (`pretrained`, `resume_from`) is sent as `Some("")`, which means "none" on the wire.
    fn to_proto(&self) -> pb::JobSpec;
    /// Resolves and validates a request's spec: `JobSpecInput::from_proto(p).resolve()`.
    fn from_proto(p: &pb::JobSpec) -> Result<Self, SpecError>;
}

impl ProtoSpecInput for JobSpecInput {
    fn from_proto(p: &pb::JobSpec) -> JobSpecInput {
        JobSpecInput {
            name: p.name.clone(),
            priority: p.priority,
            variant: p.variant.clone(),
            num_classes: p.num_classes,
            pretrained: p.pretrained.clone(),
            dataset_root: p.dataset_root.clone(),
            crop_height: p.crop_height,
            crop_width: p.crop_width,
            loader_threads: p.loader_threads,
            world_size: p.world_size,
            batch_per_gpu: p.batch_per_gpu,
            accumulate_steps: p.accumulate_steps,
            max_iters: p.max_iters,
            precision: p.precision.clone(),
            seed: p.seed,
            sync_bn: p.sync_bn,
            base_lr: p.base_lr,
            warmup_iters: p.warmup_iters,
            warmup_ratio: p.warmup_ratio,
            poly_power: p.poly_power,
            weight_decay: p.weight_decay,
            head_lr_mult: p.head_lr_mult,
            log_interval: p.log_interval,
            eval_interval: p.eval_interval,
            checkpoint_interval: p.checkpoint_interval,
            eval_mode: p.eval_mode.clone(),
            eval_crop: p.eval_crop,
            eval_stride: p.eval_stride,
            resume_from: p.resume_from.clone(),
            max_restarts: p.max_restarts,
            min_world_size: p.min_world_size,
            elastic_wait_seconds: p.elastic_wait_seconds,
            keep_last: p.keep_last,
            keep_best: p.keep_best,
            checkpoint_root: p.checkpoint_root.clone(),
        }
    }

    /// The request form of this input (e.g. for `SubmitJob`): unset fields stay unset, so that
    /// the server fills in its defaults.
    fn to_proto(&self) -> pb::JobSpec {
        // Written out (no `..Default::default()`) so that a new proto field fails to compile here.
        pb::JobSpec {
            name: self.name.clone(),
            priority: self.priority,
            variant: self.variant.clone(),
            num_classes: self.num_classes,
            pretrained: self.pretrained.clone(),
            dataset_root: self.dataset_root.clone(),
            crop_height: self.crop_height,
            crop_width: self.crop_width,
            loader_threads: self.loader_threads,
            world_size: self.world_size,
            batch_per_gpu: self.batch_per_gpu,
            accumulate_steps: self.accumulate_steps,
            max_iters: self.max_iters,
            precision: self.precision.clone(),
            seed: self.seed,
            sync_bn: self.sync_bn,
            base_lr: self.base_lr,
            warmup_iters: self.warmup_iters,
            warmup_ratio: self.warmup_ratio,
            poly_power: self.poly_power,
            weight_decay: self.weight_decay,
            head_lr_mult: self.head_lr_mult,
            log_interval: self.log_interval,
            eval_interval: self.eval_interval,
            checkpoint_interval: self.checkpoint_interval,
            eval_mode: self.eval_mode.clone(),
            eval_crop: self.eval_crop,
            eval_stride: self.eval_stride,
            resume_from: self.resume_from.clone(),
            max_restarts: self.max_restarts,
            min_world_size: self.min_world_size,
            elastic_wait_seconds: self.elastic_wait_seconds,
            keep_last: self.keep_last,
            keep_best: self.keep_best,
            checkpoint_root: self.checkpoint_root.clone(),
        }
    }
}

impl ProtoSpec for JobSpec {
    fn to_proto(&self) -> pb::JobSpec {
        let mut p = JobSpecInput::from(self.clone()).to_proto();
        p.pretrained.get_or_insert_with(String::new);
        p.resume_from.get_or_insert_with(String::new);
        p
    }

    fn from_proto(p: &pb::JobSpec) -> Result<JobSpec, SpecError> {
        JobSpecInput::from_proto(p).resolve()
    }
}
