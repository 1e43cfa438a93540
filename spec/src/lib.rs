//! The segtrain training-job spec: one typed, validated description of a SegFormer training run,
//! shared by the coordinator (which validates it at `SubmitJob`), the `segtrain` CLI
//! (`segtrain submit -f job.toml`, `segtrain job-template`) and the worker
//! (`segtrain-worker train --config job.toml`).
//!
//! Two types carry it:
//! - [`JobSpecInput`]: every field optional, as a job file, CLI flags or a `SubmitJob` request give
//!   it. Inputs layer with [`JobSpecInput::overlay`] (flags over a file).
//! - [`JobSpec`]: fully resolved (defaults filled in) and validated; what is stored and trained.
//!
//! The contract is `message JobSpec` in `proto/segtrain/v1/job.proto`: the field names are the
//! same in Rust, in the (flat) TOML job file and in the proto, and the defaults are the SegFormer
//! paper's Cityscapes recipe.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

pub mod location;
mod parse;
mod template;
mod validate;

#[cfg(test)]
mod tests;

pub use template::template;

/// Cityscapes' 19 training classes in trainId order: the class of each entry of an evaluation's
/// per-class IoU when `num_classes` is 19 (the trainer's labels, the coordinator's
/// `class_iou/NAME` points and the dashboard all use these names).
pub const CITYSCAPES_CLASSES: [&str; 19] = [
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
];

/// Every field name, in declaration order (which is also the proto's field-number order).
pub const FIELDS: &[&str] = &[
    "name",
    "priority",
    "variant",
    "num_classes",
    "pretrained",
    "dataset_root",
    "crop_height",
    "crop_width",
    "loader_threads",
    "world_size",
    "batch_per_gpu",
    "accumulate_steps",
    "max_iters",
    "precision",
    "seed",
    "sync_bn",
    "base_lr",
    "warmup_iters",
    "warmup_ratio",
    "poly_power",
    "weight_decay",
    "head_lr_mult",
    "log_interval",
    "eval_interval",
    "checkpoint_interval",
    "eval_mode",
    "eval_crop",
    "eval_stride",
    "resume_from",
    "max_restarts",
    "min_world_size",
    "elastic_wait_seconds",
    "keep_last",
    "keep_best",
    "checkpoint_root",
];

/// A bad spec: which field, what is allowed, what was given.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct SpecError {
    pub field: String,
    pub message: String,
}

impl SpecError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> SpecError {
        SpecError {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Declares a string-valued enum: serde and `Display`/`FromStr` all use the same lowercase names,
/// and a bad name is a [`SpecError`] on `$field` that lists the accepted ones.
macro_rules! string_enum {
    ($(#[$meta:meta])* $name:ident, $field:literal, { $($variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum $name {
            $(#[serde(rename = $text)] $variant),+
        }

        impl $name {
            /// Every value, in order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The name used in job files, flags, the proto and JSON.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = SpecError;

            /// Exact (lowercase) names only, so that a job file has one spelling per value.
            fn from_str(s: &str) -> Result<$name, SpecError> {
                $name::ALL.iter().copied().find(|v| v.as_str() == s).ok_or_else(|| {
                    let names: Vec<&str> = $name::ALL.iter().map(|v| v.as_str()).collect();
                    SpecError::new($field, format!("must be one of {}, got {s:?}", names.join(", ")))
                })
            }
        }
    };
}

string_enum!(
    /// SegFormer model size: the MiT-B0..B5 encoder with its all-MLP decode head.
    Variant, "variant", { B0 => "b0", B1 => "b1", B2 => "b2", B3 => "b3", B4 => "b4", B5 => "b5" }
);
string_enum!(
    /// Numeric precision of training: fp32, or bf16 autocast on CUDA.
    Precision, "precision", { Fp32 => "fp32", Bf16 => "bf16" }
);
string_enum!(
    /// How evaluation runs: a sliding window, or the whole image in one pass.
    EvalMode, "eval_mode", { Slide => "slide", Whole => "whole" }
);

/// A fully resolved and validated training spec: every field set. Stored as JSON in PostgreSQL
/// and handed to trainers. See `proto/segtrain/v1/job.proto` (or [`template()`]) for each field's
/// meaning and allowed range.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    pub name: String,
    pub priority: i32,

    pub variant: Variant,
    pub num_classes: u32,
    /// Initial weights (path or URI); `None`: random initialisation.
    pub pretrained: Option<String>,

    pub dataset_root: String,
    pub crop_height: u32,
    pub crop_width: u32,
    pub loader_threads: u32,

    pub world_size: u32,
    pub batch_per_gpu: u32,
    pub accumulate_steps: u32,
    pub max_iters: u64,
    pub precision: Precision,
    pub seed: u64,
    /// SyncBN in the decode head (BatchNorm statistics over all ranks). Absent from specs stored
    /// before the field existed: those read as `false`, the behaviour they were trained with.
    #[serde(default)]
    pub sync_bn: bool,

    pub base_lr: f64,
    pub warmup_iters: u64,
    pub warmup_ratio: f64,
    pub poly_power: f64,
    pub weight_decay: f64,
    pub head_lr_mult: f64,

    pub log_interval: u64,
    pub eval_interval: u64,
    pub checkpoint_interval: u64,
    pub eval_mode: EvalMode,
    pub eval_crop: u32,
    pub eval_stride: u32,

    /// Checkpoint to resume from (path or URI); `None`: start fresh.
    pub resume_from: Option<String>,
    pub max_restarts: u32,
    /// The fewest ranks an attempt may run with (1..=world_size; world_size: never smaller).
    /// 0 only in specs stored before the field existed (checkpoint manifests): read as
    /// world_size, see [`JobSpec::elastic_world_sizes`].
    #[serde(default)]
    pub min_world_size: u32,
    /// How long a restart waits for world_size idle workers before it starts smaller.
    #[serde(default = "default_elastic_wait_seconds")]
    pub elastic_wait_seconds: u32,
    pub keep_last: u32,
    pub keep_best: bool,
    pub checkpoint_root: String,
}

fn default_elastic_wait_seconds() -> u32 {
    60
}

impl JobSpec {
    /// The defaults of every field (the SegFormer paper's Cityscapes recipe), with the given
    /// dataset root, the one field that has no default. This is the single place defaults live.
    pub fn with_defaults(dataset_root: impl Into<String>) -> JobSpec {
        JobSpec {
            name: "segformer".to_string(),
            priority: 0,
            variant: Variant::B0,
            num_classes: 19,
            pretrained: None,
            dataset_root: dataset_root.into(),
            crop_height: 1024,
            crop_width: 1024,
            loader_threads: 4,
            world_size: 8,
            batch_per_gpu: 1,
            accumulate_steps: 1,
            max_iters: 160_000,
            precision: Precision::Fp32,
            seed: 0,
            // The conditional default `world_size > 1` (see `resolve`), for the default world of 8.
            sync_bn: true,
            base_lr: 6e-5,
            warmup_iters: 1500,
            warmup_ratio: 1e-6,
            poly_power: 1.0,
            weight_decay: 0.01,
            head_lr_mult: 10.0,
            log_interval: 50,
            // mmseg 1.x's 160k schedule: `val_interval=16000`.
            eval_interval: 16_000,
            checkpoint_interval: 4000,
            eval_mode: EvalMode::Slide,
            eval_crop: 1024,
            eval_stride: 768,
            resume_from: None,
            max_restarts: 3,
            // The conditional default `world_size` (see `resolve`), for the default world of 8.
            min_world_size: 8,
            elastic_wait_seconds: default_elastic_wait_seconds(),
            keep_last: 3,
            keep_best: true,
            checkpoint_root: "/var/lib/segtrain/checkpoints".to_string(),
        }
    }

    /// Checks every rule; the error is the first violation in field order.
    pub fn validate(&self) -> Result<(), SpecError> {
        validate::validate(self)
    }

    /// Images per optimizer step: `world_size * batch_per_gpu * accumulate_steps`.
    pub fn global_batch(&self) -> u64 {
        u64::from(self.world_size)
            * u64::from(self.batch_per_gpu)
            * u64::from(self.accumulate_steps)
    }

    /// The world sizes an attempt may run with, largest first: every w in
    /// min_world_size..=world_size that divides `world_size * accumulate_steps`, so that w ranks
    /// accumulating `world_size * accumulate_steps / w` micro-batches of batch_per_gpu images make
    /// exactly the global batch. world_size itself is always one.
    pub fn elastic_world_sizes(&self) -> Vec<u32> {
        let micro_batches = u64::from(self.world_size) * u64::from(self.accumulate_steps);
        let min = match self.min_world_size {
            0 => self.world_size,
            m => m.min(self.world_size),
        };
        (min.max(1)..=self.world_size)
            .rev()
            .filter(|w| micro_batches.is_multiple_of(u64::from(*w)))
            .collect()
    }

    /// The accumulation that keeps the global batch at a world of `world` ranks, or `None` when
    /// no whole number does.
    pub fn accumulate_steps_at(&self, world: u32) -> Option<u32> {
        let micro_batches = u64::from(self.world_size) * u64::from(self.accumulate_steps);
        (world > 0 && micro_batches.is_multiple_of(u64::from(world)))
            .then(|| u32::try_from(micro_batches / u64::from(world)).ok())
            .flatten()
    }

    /// Things about a valid spec that are allowed but probably not meant, one sentence each. The
    /// coordinator returns them from `SubmitJob` and records each as a note on the new job.
    ///
    /// - No `pretrained` weights for a run of at least [`FULL_RUN_ITERS`] iterations: the paper
    ///   fine-tunes ImageNet-1k MiT weights; from random initialisation the recipe falls far short.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.pretrained.is_none() && self.max_iters >= FULL_RUN_ITERS {
            out.push(
                "no pretrained weights: training from random initialisation; the SegFormer \
                 recipe fine-tunes ImageNet-1k MiT weights (set spec.pretrained)"
                    .to_string(),
            );
        }
        if self.sync_bn && self.min_world_size < self.world_size && self.world_size > 1 {
            out.push(format!(
                "sync_bn with min_world_size {} < world_size {}: an attempt with fewer ranks \
                 normalises the head's BatchNorm over fewer images at a time, so it does not \
                 continue the exact trajectory of a full-size one (set sync_bn = false for that)",
                self.min_world_size, self.world_size
            ));
        }
        out
    }

    /// A job file (flat TOML, grouped by comment headings) that parses and resolves back to this
    /// spec. Holds for any spec that passes [`JobSpec::validate`].
    pub fn to_toml(&self) -> String {
        template::render(self, false)
    }
}

/// From this many iterations on, a job counts as a real training run rather than a smoke test, and
/// [`JobSpec::warnings`] warns about one without pretrained weights. 16000 is one evaluation
/// interval of the 160k recipe (a tenth of it): far more than any test or quick check runs.
pub const FULL_RUN_ITERS: u64 = 16_000;

/// The same fields as [`JobSpec`], every one optional: what a job file, CLI flags or a `SubmitJob`
/// request give. Unset fields take their defaults in [`JobSpecInput::resolve`]. The enum-valued
/// fields are strings here so that a bad value reaches validation and gets a field-named error.
///
/// As CLI flags, each field is a `--kebab-case` option (`--crop-height 512`,
/// `--keep-best false`) whose help gives meaning, range and default.
#[derive(Default, Debug, Clone, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
#[command(next_help_heading = "Job spec (overrides the job file)")]
pub struct JobSpecInput {
    #[serde(skip_serializing_if = "Option::is_none")]
    #[arg(long, help = template::help("name"))]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[arg(long, allow_negative_numbers = true, help = template::help("priority"))]
    pub priority: Option<i32>,

    #[serde(skip_serializing_if = "Option::is_none")]
    #[arg(long, value_name = "b0..b5", help = template::help("variant"))]
    pub variant: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[arg(long, help = template::help("num_classes"))]
    pub num_classes: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[arg(long, value_name = "PATH|URI", help = template::help("pretrained"))]
    pub pretrained: Option<String>,

    #[serde(skip_serializing_if = "Option::is_none")]
    #[arg(long, value_name = "PATH", help = template::help("dataset_root"))]
    pub dataset_root: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[arg(long, help = template::help("crop_height"))]
    pub crop_height: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[arg(long, help = template::help("crop_width"))]
    pub crop_width: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[arg(long, help = template::help("loader_threads"))]
    pub loader_threads: Option<u32>,

    #[serde(skip_serializing_if = "Option::is_none")]
    #[arg(long, help = template::help("world_size"))]
    pub world_size: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[arg(long, help = template::help("batch_per_gpu"))]
    pub batch_per_gpu: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[arg(long, help = template::help("accumulate_steps"))]
    pub accumulate_steps: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[arg(long, help = template::help("max_iters"))]
    pub max_iters: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[arg(long, value_name = "fp32|bf16", help = template::help("precision"))]
    pub precision: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[arg(long, help = template::help("seed"))]
    pub seed: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[arg(long, value_name = "true|false", help = template::help("sync_bn"))]
    pub sync_bn: Option<bool>,

    #[serde(skip_serializing_if = "Option::is_none")]
    #[arg(long, help = template::help("base_lr"))]
    pub base_lr: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[arg(long, help = template::help("warmup_iters"))]
    pub warmup_iters: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[arg(long, help = template::help("warmup_ratio"))]
    pub warmup_ratio: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[arg(long, help = template::help("poly_power"))]
    pub poly_power: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[arg(long, help = template::help("weight_decay"))]
    pub weight_decay: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[arg(long, help = template::help("head_lr_mult"))]
    pub head_lr_mult: Option<f64>,

    #[serde(skip_serializing_if = "Option::is_none")]
    #[arg(long, help = template::help("log_interval"))]
    pub log_interval: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[arg(long, help = template::help("eval_interval"))]
    pub eval_interval: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[arg(long, help = template::help("checkpoint_interval"))]
    pub checkpoint_interval: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[arg(long, value_name = "slide|whole", help = template::help("eval_mode"))]
    pub eval_mode: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[arg(long, help = template::help("eval_crop"))]
    pub eval_crop: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[arg(long, help = template::help("eval_stride"))]
    pub eval_stride: Option<u32>,

    #[serde(skip_serializing_if = "Option::is_none")]
    #[arg(long, value_name = "PATH|URI", help = template::help("resume_from"))]
    pub resume_from: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[arg(long, help = template::help("max_restarts"))]
    pub max_restarts: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[arg(long, help = template::help("min_world_size"))]
    pub min_world_size: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[arg(long, help = template::help("elastic_wait_seconds"))]
    pub elastic_wait_seconds: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[arg(long, help = template::help("keep_last"))]
    pub keep_last: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[arg(long, value_name = "true|false", help = template::help("keep_best"))]
    pub keep_best: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[arg(long, value_name = "PATH|URI", help = template::help("checkpoint_root"))]
    pub checkpoint_root: Option<String>,
}

impl JobSpecInput {
    /// Layers `over` on top of `self`: every field set in `over` wins, the rest are kept.
    /// (E.g. CLI flags over a job file.)
    pub fn overlay(self, over: JobSpecInput) -> JobSpecInput {
        JobSpecInput {
            name: over.name.or(self.name),
            priority: over.priority.or(self.priority),
            variant: over.variant.or(self.variant),
            num_classes: over.num_classes.or(self.num_classes),
            pretrained: over.pretrained.or(self.pretrained),
            dataset_root: over.dataset_root.or(self.dataset_root),
            crop_height: over.crop_height.or(self.crop_height),
            crop_width: over.crop_width.or(self.crop_width),
            loader_threads: over.loader_threads.or(self.loader_threads),
            world_size: over.world_size.or(self.world_size),
            batch_per_gpu: over.batch_per_gpu.or(self.batch_per_gpu),
            accumulate_steps: over.accumulate_steps.or(self.accumulate_steps),
            max_iters: over.max_iters.or(self.max_iters),
            precision: over.precision.or(self.precision),
            seed: over.seed.or(self.seed),
            sync_bn: over.sync_bn.or(self.sync_bn),
            base_lr: over.base_lr.or(self.base_lr),
            warmup_iters: over.warmup_iters.or(self.warmup_iters),
            warmup_ratio: over.warmup_ratio.or(self.warmup_ratio),
            poly_power: over.poly_power.or(self.poly_power),
            weight_decay: over.weight_decay.or(self.weight_decay),
            head_lr_mult: over.head_lr_mult.or(self.head_lr_mult),
            log_interval: over.log_interval.or(self.log_interval),
            eval_interval: over.eval_interval.or(self.eval_interval),
            checkpoint_interval: over.checkpoint_interval.or(self.checkpoint_interval),
            eval_mode: over.eval_mode.or(self.eval_mode),
            eval_crop: over.eval_crop.or(self.eval_crop),
            eval_stride: over.eval_stride.or(self.eval_stride),
            resume_from: over.resume_from.or(self.resume_from),
            max_restarts: over.max_restarts.or(self.max_restarts),
            min_world_size: over.min_world_size.or(self.min_world_size),
            elastic_wait_seconds: over.elastic_wait_seconds.or(self.elastic_wait_seconds),
            keep_last: over.keep_last.or(self.keep_last),
            keep_best: over.keep_best.or(self.keep_best),
            checkpoint_root: over.checkpoint_root.or(self.checkpoint_root),
        }
    }

    /// Fills unset fields with their defaults ([`JobSpec::with_defaults`]) and validates. The one
    /// conditional defaults: an unset `min_world_size` is `world_size` (never smaller); an unset `sync_bn` is `world_size > 1` (SyncBN for more than one rank,
    /// plain BN for one), whatever `world_size` resolves to. An empty
    /// `pretrained` or `resume_from` means unset (so a flag `--pretrained ""` can clear a file's
    /// value). The error is the first problem in field order, whether it is a bad enum name, the
    /// missing `dataset_root`, or a rule of [`JobSpec::validate`].
    pub fn resolve(self) -> Result<JobSpec, SpecError> {
        let d = JobSpec::with_defaults(String::new());
        // Problems found while converting are held back so that a violation in an earlier field
        // (found by validate()) is still the one reported. Conversions run in field order, so
        // the first one recorded is the earliest of them.
        let mut first: Option<SpecError> = None;
        let variant = parse_or(self.variant, d.variant, &mut first);
        let dataset_root = match self.dataset_root {
            Some(root) => root,
            None => {
                first.get_or_insert(SpecError::new(
                    "dataset_root",
                    "required: the dataset root, an absolute path",
                ));
                // A valid stand-in, so that validate() still checks the later fields.
                "/".to_string()
            }
        };
        let precision = parse_or(self.precision, d.precision, &mut first);
        let eval_mode = parse_or(self.eval_mode, d.eval_mode, &mut first);

        let world_size = self.world_size.unwrap_or(d.world_size);
        let spec = JobSpec {
            name: self.name.unwrap_or(d.name),
            priority: self.priority.unwrap_or(d.priority),
            variant,
            num_classes: self.num_classes.unwrap_or(d.num_classes),
            pretrained: self.pretrained.filter(|p| !p.is_empty()),
            dataset_root,
            crop_height: self.crop_height.unwrap_or(d.crop_height),
            crop_width: self.crop_width.unwrap_or(d.crop_width),
            loader_threads: self.loader_threads.unwrap_or(d.loader_threads),
            world_size,
            batch_per_gpu: self.batch_per_gpu.unwrap_or(d.batch_per_gpu),
            accumulate_steps: self.accumulate_steps.unwrap_or(d.accumulate_steps),
            max_iters: self.max_iters.unwrap_or(d.max_iters),
            precision,
            seed: self.seed.unwrap_or(d.seed),
            sync_bn: self.sync_bn.unwrap_or(world_size > 1),
            base_lr: self.base_lr.unwrap_or(d.base_lr),
            warmup_iters: self.warmup_iters.unwrap_or(d.warmup_iters),
            warmup_ratio: self.warmup_ratio.unwrap_or(d.warmup_ratio),
            poly_power: self.poly_power.unwrap_or(d.poly_power),
            weight_decay: self.weight_decay.unwrap_or(d.weight_decay),
            head_lr_mult: self.head_lr_mult.unwrap_or(d.head_lr_mult),
            log_interval: self.log_interval.unwrap_or(d.log_interval),
            eval_interval: self.eval_interval.unwrap_or(d.eval_interval),
            checkpoint_interval: self.checkpoint_interval.unwrap_or(d.checkpoint_interval),
            eval_mode,
            eval_crop: self.eval_crop.unwrap_or(d.eval_crop),
            eval_stride: self.eval_stride.unwrap_or(d.eval_stride),
            resume_from: self.resume_from.filter(|p| !p.is_empty()),
            max_restarts: self.max_restarts.unwrap_or(d.max_restarts),
            min_world_size: self.min_world_size.unwrap_or(world_size),
            elastic_wait_seconds: self.elastic_wait_seconds.unwrap_or(d.elastic_wait_seconds),
            keep_last: self.keep_last.unwrap_or(d.keep_last),
            keep_best: self.keep_best.unwrap_or(d.keep_best),
            checkpoint_root: self.checkpoint_root.unwrap_or(d.checkpoint_root),
        };

        match (first, spec.validate()) {
            (None, Ok(())) => Ok(spec),
            (Some(e), Ok(())) | (None, Err(e)) => Err(e),
            (Some(a), Err(b)) => Err(if field_index(&a.field) <= field_index(&b.field) {
                a
            } else {
                b
            }),
        }
    }
}

/// Every field set, so that the input resolves back to the same spec.
impl From<JobSpec> for JobSpecInput {
    fn from(s: JobSpec) -> JobSpecInput {
        JobSpecInput {
            name: Some(s.name),
            priority: Some(s.priority),
            variant: Some(s.variant.to_string()),
            num_classes: Some(s.num_classes),
            pretrained: s.pretrained,
            dataset_root: Some(s.dataset_root),
            crop_height: Some(s.crop_height),
            crop_width: Some(s.crop_width),
            loader_threads: Some(s.loader_threads),
            world_size: Some(s.world_size),
            batch_per_gpu: Some(s.batch_per_gpu),
            accumulate_steps: Some(s.accumulate_steps),
            max_iters: Some(s.max_iters),
            precision: Some(s.precision.to_string()),
            seed: Some(s.seed),
            sync_bn: Some(s.sync_bn),
            base_lr: Some(s.base_lr),
            warmup_iters: Some(s.warmup_iters),
            warmup_ratio: Some(s.warmup_ratio),
            poly_power: Some(s.poly_power),
            weight_decay: Some(s.weight_decay),
            head_lr_mult: Some(s.head_lr_mult),
            log_interval: Some(s.log_interval),
            eval_interval: Some(s.eval_interval),
            checkpoint_interval: Some(s.checkpoint_interval),
            eval_mode: Some(s.eval_mode.to_string()),
            eval_crop: Some(s.eval_crop),
            eval_stride: Some(s.eval_stride),
            resume_from: s.resume_from,
            max_restarts: Some(s.max_restarts),
            min_world_size: Some(s.min_world_size),
            elastic_wait_seconds: Some(s.elastic_wait_seconds),
            keep_last: Some(s.keep_last),
            keep_best: Some(s.keep_best),
            checkpoint_root: Some(s.checkpoint_root),
        }
    }
}

/// Parses an enum-valued field, or takes its default when unset. A bad name is recorded in `first`
/// (unless an earlier problem already is) and the default stands in for it.
fn parse_or<T: FromStr<Err = SpecError>>(
    value: Option<String>,
    default: T,
    first: &mut Option<SpecError>,
) -> T {
    match value.map(|s| s.parse::<T>()) {
        None => default,
        Some(Ok(v)) => v,
        Some(Err(e)) => {
            first.get_or_insert(e);
            default
        }
    }
}

/// Position of a field in [`FIELDS`]; names that are not fields sort last.
fn field_index(field: &str) -> usize {
    FIELDS
        .iter()
        .position(|f| *f == field)
        .unwrap_or(FIELDS.len())
}
