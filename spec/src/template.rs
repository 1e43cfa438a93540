//! The human-facing description of every field, in one table: it writes the commented job
//! template (`segtrain job-template`), lays out [`JobSpec::to_toml`] and gives the CLI flags their
//! help text, so the three cannot drift apart.

use crate::JobSpec;

/// One field as documented to users.
struct FieldDoc {
    name: &'static str,
    /// Meaning and allowed range, one line.
    doc: &'static str,
    /// For the fields the template leaves unset (optional paths, conditional defaults): the
    /// commented-out example value, as TOML.
    example: Option<&'static str>,
}

const fn field(name: &'static str, doc: &'static str) -> FieldDoc {
    FieldDoc {
        name,
        doc,
        example: None,
    }
}

/// The fields in declaration order, grouped under the template's headings.
const SECTIONS: &[(&str, &[FieldDoc])] = &[
    (
        "Job",
        &[
            field("name", "Job name: 1..=128 characters from [A-Za-z0-9._-]."),
            field(
                "priority",
                "Scheduling priority, -1000..=1000; higher runs first.",
            ),
        ],
    ),
    (
        "Model",
        &[
            field(
                "variant",
                "Model variant: b0..b5 (MiT-B0..B5 encoder + all-MLP decode head).",
            ),
            field(
                "num_classes",
                "Classes the head predicts, 1..=254 (label 255 means ignore).",
            ),
            FieldDoc {
                name: "pretrained",
                doc: "Initial weights: a safetensors file with HuggingFace SegFormer key names \
                      (absolute path, file:///path or gs://bucket/path). Unset: random init.",
                example: Some("\"/path/mit_b0.safetensors\""),
            },
        ],
    ),
    (
        "Data",
        &[
            field(
                "dataset_root",
                "Dataset root in the Cityscapes layout (leftImg8bit/, gtFine/). \
                 Required: an absolute path.",
            ),
            field(
                "crop_height",
                "Training crop height, pixels: a multiple of 32 in 32..=8192.",
            ),
            field(
                "crop_width",
                "Training crop width, pixels: a multiple of 32 in 32..=8192.",
            ),
            field(
                "loader_threads",
                "Decode/augment threads per rank, 1..=256.",
            ),
        ],
    ),
    (
        "Training (global batch = world_size * batch_per_gpu * accumulate_steps)",
        &[
            field("world_size", "Number of ranks (one GPU each), 1..=1024."),
            field(
                "batch_per_gpu",
                "Images per rank per micro-batch, 1..=1024.",
            ),
            field(
                "accumulate_steps",
                "Micro-batches accumulated per optimizer step, 1..=1024.",
            ),
            field("max_iters", "Optimizer steps to train, 1..=100000000."),
            field("precision", "Precision: fp32, or bf16 (autocast on CUDA)."),
            field(
                "seed",
                "Seed for initialisation, sampling and augmentation, 0..=9223372036854775807.",
            ),
            field(
                "sync_bn",
                "SyncBN in the decode head (BatchNorm statistics over all ranks): true or false. \
                 Default: true when world_size > 1, else false; the paper's recipe trains \
                 8 GPUs x 1 image with SyncBN in the head, and plain BN would normalise over one \
                 image per rank. True with world_size 1 changes nothing.",
            ),
        ],
    ),
    (
        "Optimizer (AdamW, linear warmup, then poly decay)",
        &[
            field("base_lr", "Learning rate of the encoder, in (0, 1]."),
            field(
                "warmup_iters",
                "Linear warmup length in iterations, 0..max_iters (less than max_iters).",
            ),
            field(
                "warmup_ratio",
                "Warmup starts at base_lr * warmup_ratio, in (0, 1].",
            ),
            field("poly_power", "Poly decay power, in (0, 10]."),
            field("weight_decay", "Weight decay, in [0, 1]."),
            field(
                "head_lr_mult",
                "Learning-rate multiplier of the decode head, in (0, 1000].",
            ),
        ],
    ),
    (
        "Logging and evaluation",
        &[
            field(
                "log_interval",
                "Iterations between metric reports, 1..=100000000 (the last iteration always reports).",
            ),
            field(
                "eval_interval",
                "Iterations between evaluations, 0..=100000000 (0 or more than max_iters: only at the end).",
            ),
            field(
                "checkpoint_interval",
                "Iterations between checkpoints, 0..=100000000 (0 or more than max_iters: only at the end).",
            ),
            field(
                "eval_mode",
                "Evaluation: slide (sliding window) or whole (the full image in one pass).",
            ),
            field(
                "eval_crop",
                "Sliding-window size, pixels: a multiple of 32 in 32..=8192.",
            ),
            field(
                "eval_stride",
                "Sliding-window stride, pixels: 1..=eval_crop.",
            ),
        ],
    ),
    (
        "Checkpoints and restarts",
        &[
            FieldDoc {
                name: "resume_from",
                doc:
                    "Checkpoint to resume from (absolute path, file:///path or gs://bucket/path). \
                      Unset: start fresh.",
                example: Some("\"gs://my-bucket/checkpoints/run-1/iter_4000\""),
            },
            field(
                "max_restarts",
                "Restarts allowed after infrastructure failures, 0..=100 (preemptions and resizes \
                 are not counted).",
            ),
            FieldDoc {
                name: "min_world_size",
                doc: "Elastic jobs: the fewest ranks an attempt may run with, 1..=world_size \
                      (default: world_size, never smaller). A smaller attempt raises \
                      accumulate_steps to keep the global batch, so a world size in \
                      min..world_size must divide world_size * accumulate_steps.",
                example: Some("1"),
            },
            field(
                "elastic_wait_seconds",
                "Elastic jobs: seconds a restart waits for world_size idle workers before it \
                 starts smaller, 0..=86400.",
            ),
            field("keep_last", "Keep the newest K checkpoints, K in 1..=1000."),
            field(
                "keep_best",
                "Also keep the checkpoint with the best mIoU: true or false.",
            ),
            field(
                "checkpoint_root",
                "Where checkpoints go: an absolute path, file:///path or gs://bucket[/prefix].",
            ),
        ],
    ),
];

const HEADER: &str = "\
# segtrain job file: one SegFormer training run.
#
# Submit it with `segtrain submit -f job.toml` (flags such as --max-iters 80000 override the file),
# or train from it directly with `segtrain-worker train --config job.toml`.
# Every field is optional except dataset_root; the values below are the defaults, the SegFormer
# paper's Cityscapes recipe. Unknown keys are rejected.
";

/// The commented job template printed by `segtrain job-template`: every field with its meaning,
/// allowed range and default value. It parses and resolves to the defaults, with
/// `dataset_root = "/data/cityscapes"`.
pub fn template() -> String {
    render(&JobSpec::with_defaults("/data/cityscapes"), true)
}

/// Writes `spec` as a flat TOML job file under the section headings; with `docs`, also the header,
/// each field's description, and commented-out examples for the unset optional paths.
pub(crate) fn render(spec: &JobSpec, docs: bool) -> String {
    let values = toml_values(spec);
    let mut out = String::new();
    if docs {
        out.push_str(HEADER);
    }
    for (title, fields) in SECTIONS {
        if !out.is_empty() {
            out.push('\n');
        }
        out.push_str(&format!("# --- {title}\n"));
        for f in fields.iter() {
            let value = values
                .iter()
                .find(|(name, _)| *name == f.name)
                .and_then(|(_, v)| v.as_ref());
            if docs {
                push_comment(&mut out, f.doc);
            }
            match (value, f.example) {
                (Some(v), _) => out.push_str(&format!("{} = {v}\n", f.name)),
                (None, Some(example)) if docs => {
                    out.push_str(&format!("# {} = {example}\n", f.name))
                }
                (None, _) => {}
            }
        }
    }
    out
}

/// The `--flag` help of a field: its description and its default.
pub(crate) fn help(name: &str) -> String {
    let doc = SECTIONS
        .iter()
        .flat_map(|(_, fields)| fields.iter())
        .find(|f| f.name == name)
        .map(|f| f.doc)
        .unwrap_or_default();
    if name == "dataset_root" {
        return doc.to_string();
    }
    // The conditional defaults (see `JobSpecInput::resolve`), not the values for 8 ranks.
    if name == "sync_bn" {
        return format!("{doc} [default: world_size > 1]");
    }
    if name == "min_world_size" {
        return format!("{doc} [default: world_size]");
    }
    let defaults = JobSpec::with_defaults(String::new());
    match toml_values(&defaults).into_iter().find(|(n, _)| *n == name) {
        Some((_, Some(default))) => format!("{doc} [default: {}]", default.trim_matches('"')),
        _ => doc.to_string(),
    }
}

/// Every field's value as a TOML literal, `None` for an unset optional path.
fn toml_values(s: &JobSpec) -> Vec<(&'static str, Option<String>)> {
    let string = |v: &str| Some(toml_string(v));
    let float = |v: f64| Some(toml_float(v));
    let int = |v: u64| Some(v.to_string());
    vec![
        ("name", string(&s.name)),
        ("priority", Some(s.priority.to_string())),
        ("variant", string(s.variant.as_str())),
        ("num_classes", int(s.num_classes.into())),
        ("pretrained", s.pretrained.as_deref().map(toml_string)),
        ("dataset_root", string(&s.dataset_root)),
        ("crop_height", int(s.crop_height.into())),
        ("crop_width", int(s.crop_width.into())),
        ("loader_threads", int(s.loader_threads.into())),
        ("world_size", int(s.world_size.into())),
        ("batch_per_gpu", int(s.batch_per_gpu.into())),
        ("accumulate_steps", int(s.accumulate_steps.into())),
        ("max_iters", int(s.max_iters)),
        ("precision", string(s.precision.as_str())),
        ("seed", int(s.seed)),
        ("sync_bn", Some(s.sync_bn.to_string())),
        ("base_lr", float(s.base_lr)),
        ("warmup_iters", int(s.warmup_iters)),
        ("warmup_ratio", float(s.warmup_ratio)),
        ("poly_power", float(s.poly_power)),
        ("weight_decay", float(s.weight_decay)),
        ("head_lr_mult", float(s.head_lr_mult)),
        ("log_interval", int(s.log_interval)),
        ("eval_interval", int(s.eval_interval)),
        ("checkpoint_interval", int(s.checkpoint_interval)),
        ("eval_mode", string(s.eval_mode.as_str())),
        ("eval_crop", int(s.eval_crop.into())),
        ("eval_stride", int(s.eval_stride.into())),
        ("resume_from", s.resume_from.as_deref().map(toml_string)),
        ("max_restarts", int(s.max_restarts.into())),
        // Left out at its conditional default (world_size), so that a job file changing
        // world_size alone does not pin the old one.
        (
            "min_world_size",
            (s.min_world_size != s.world_size)
                .then(|| int(s.min_world_size.into()))
                .flatten(),
        ),
        ("elastic_wait_seconds", int(s.elastic_wait_seconds.into())),
        ("keep_last", int(s.keep_last.into())),
        ("keep_best", Some(s.keep_best.to_string())),
        ("checkpoint_root", string(&s.checkpoint_root)),
    ]
}

/// A TOML float literal that reads back as exactly `v`. Rust's `{:?}` is the shortest exact form
/// and keeps the usual notation of learning rates (`6e-5`), which is valid TOML except for NaN.
fn toml_float(v: f64) -> String {
    if v.is_nan() {
        "nan".to_string()
    } else {
        format!("{v:?}")
    }
}

/// Appends `text` as `# ` comment lines, wrapped at 100 columns.
fn push_comment(out: &mut String, text: &str) {
    const WIDTH: usize = 100;
    let mut line = String::from("#");
    for word in text.split_whitespace() {
        if line.len() > 1 && line.len() + 1 + word.len() > WIDTH {
            out.push_str(&line);
            out.push('\n');
            line = String::from("#");
        }
        line.push(' ');
        line.push_str(word);
    }
    out.push_str(&line);
    out.push('\n');
}

/// A TOML string literal, escaped as needed.
fn toml_string(v: &str) -> String {
    toml::Value::String(v.to_string()).to_string()
}

/// Test hooks into the table.
#[cfg(test)]
pub(crate) fn documented_fields() -> Vec<&'static str> {
    SECTIONS
        .iter()
        .flat_map(|(_, fields)| fields.iter().map(|f| f.name))
        .collect()
}
