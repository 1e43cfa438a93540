//! Property tests ("fuzzing", issue #6) of job-spec validation and of the TOML job-file parser.
//!
//! Nothing here may panic, and every property is checked against an independent statement of the
//! documented rules ([`expected`], [`assert_bounds`]) rather than against the crate's own code:
//! - arbitrary [`JobSpecInput`]s (every field optional, values from wide ranges: out of range,
//!   NaN and infinities, empty, huge, unicode and control-character strings) and arbitrary
//!   [`JobSpec`]s: validation accepts exactly the inputs the rules allow; an error names the first
//!   offending field and states what is allowed; an accepted spec is within every bound, and
//!   validating it again gives the same result;
//! - job-file text: random strings and bytes; structured documents of known keys with values of
//!   every TOML type (wrong ones included) plus unknown keys, whose outcome is predicted; the
//!   template printed by the crate with one line changed;
//! - round trips: a valid spec written as a job file (and as JSON and proto) reads back equal, and
//!   so does any input written with serde's TOML serialiser.
//!
//! Cases per property: `PROPTEST_CASES` when set (for all of them), else each property's own
//! default, sized so that the whole file takes well under a minute in a debug build on one core.
//! `make fuzz` runs it far longer. A failure is saved as a seed in
//! `spec/proptest-regressions/fuzz.txt` (commit it) and replayed first on every later run.

use segtrain_proto::job_spec::{ProtoSpec, ProtoSpecInput};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use proptest::collection::{btree_map, vec};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::FileFailurePersistence;
use segtrain_spec::{template, EvalMode, JobSpec, JobSpecInput, Precision, Variant, FIELDS};

// ------------------------------------------------------------------------------------------------
// Configuration

/// The configuration of a property that runs `default` cases unless `PROPTEST_CASES` says
/// otherwise. Failures persist in `spec/proptest-regressions/fuzz.txt` (tests run in the package
/// directory).
fn config(default: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    ProptestConfig {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "proptest-regressions/fuzz.txt",
        ))),
        ..ProptestConfig::default()
    }
}

// ------------------------------------------------------------------------------------------------
// The documented rules, stated independently of the crate

/// The defaults, as documented (the SegFormer paper's Cityscapes recipe).
const DEFAULT_MAX_ITERS: u64 = 160_000;
const DEFAULT_WORLD_SIZE: u32 = 8;
const DEFAULT_EVAL_INTERVAL: u64 = 16_000;
const DEFAULT_EVAL_CROP: u32 = 1024;
const MAX_ITERS: u64 = 100_000_000;
const LOCATION_FORMS: &str =
    "an absolute path (/...), file:///absolute/path or gs://bucket[/prefix]";
const ABSOLUTE_PATH: &str = "absolute path (starting with /)";

/// The first rule an input breaks: the field, and the phrases of which the error must contain at
/// least one (what is allowed).
#[derive(Debug)]
struct Violation {
    field: &'static str,
    allowed: Vec<String>,
}

fn rule(field: &'static str, ok: bool, allowed: impl Into<String>) -> Result<(), Violation> {
    if ok {
        Ok(())
    } else {
        Err(Violation {
            field,
            allowed: vec![allowed.into()],
        })
    }
}

fn int_rule<T: PartialOrd + std::fmt::Display>(
    field: &'static str,
    v: T,
    lo: T,
    hi: T,
) -> Result<(), Violation> {
    let allowed = format!("{lo}..={hi}");
    rule(field, lo <= v && v <= hi, allowed)
}

fn crop_rule(field: &'static str, v: u32) -> Result<(), Violation> {
    rule(
        field,
        v.is_multiple_of(32) && (32..=8192).contains(&v),
        "a multiple of 32 in 32..=8192",
    )
}

/// A finite float in `(lo, hi]` (`open`) or `[lo, hi]`.
fn float_rule(field: &'static str, v: f64, open: bool, lo: f64, hi: f64) -> Result<(), Violation> {
    let above = if open { v > lo } else { v >= lo };
    let range = if open {
        format!("({lo}, {hi}]")
    } else {
        format!("[{lo}, {hi}]")
    };
    rule(field, v.is_finite() && above && v <= hi, range)
}

fn enum_rule(field: &'static str, v: Option<&str>, names: &[&str]) -> Result<(), Violation> {
    rule(
        field,
        v.is_none_or(|v| names.contains(&v)),
        names.join(", "),
    )
}

/// Paths and URIs: non-empty, at most 4096 bytes, no NUL, and of the allowed form (`abs_only`:
/// only an absolute path). Every rule broken gives its phrase.
fn path_rule(field: &'static str, v: &str, abs_only: bool) -> Result<(), Violation> {
    let gs_ok = |rest: &str| {
        let bucket = rest.split('/').next().unwrap_or("");
        (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
    };
    let form_ok = v.starts_with('/')
        || (!abs_only
            && (v
                .strip_prefix("file://")
                .is_some_and(|p| p.starts_with('/'))
                || v.strip_prefix("gs://").is_some_and(gs_ok)));
    let forms = if abs_only {
        ABSOLUTE_PATH
    } else {
        LOCATION_FORMS
    };
    let mut broken = Vec::new();
    if !form_ok {
        broken.push(forms.to_string());
    }
    if v.len() > 4096 {
        broken.push("at most 4096 bytes".to_string());
    }
    if v.contains('\0') {
        broken.push("NUL".to_string());
    }
    if v.chars().any(char::is_control) {
        broken.push("control characters".to_string());
    }
    if v.split('/').any(|s| s == "..") {
        broken.push("`..` segments".to_string());
    }
    if broken.is_empty() {
        Ok(())
    } else {
        Err(Violation {
            field,
            allowed: broken,
        })
    }
}

/// What resolving `i` must give: `Ok` or the first broken rule in field order. With
/// `empty_is_unset` (resolve), an empty `pretrained`/`resume_from` means unset; without it (a
/// directly built [`JobSpec`]), it is an invalid location.
fn expected(i: &JobSpecInput, empty_is_unset: bool) -> Result<(), Violation> {
    let name = i.name.as_deref().unwrap_or("segformer");
    rule(
        "name",
        (1..=128).contains(&name.chars().count())
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')),
        "1..=128 characters from [A-Za-z0-9._-]",
    )?;
    int_rule("priority", i.priority.unwrap_or(0), -1000, 1000)?;
    enum_rule(
        "variant",
        i.variant.as_deref(),
        &["b0", "b1", "b2", "b3", "b4", "b5"],
    )?;
    int_rule("num_classes", i.num_classes.unwrap_or(19), 1, 254)?;
    let optional_path = |p: &Option<String>| {
        p.as_deref()
            .filter(|p| !(empty_is_unset && p.is_empty()))
            .map(str::to_string)
    };
    if let Some(p) = optional_path(&i.pretrained) {
        path_rule("pretrained", &p, false)?;
    }
    match &i.dataset_root {
        None => rule("dataset_root", false, "required")?,
        Some(root) => path_rule("dataset_root", root, true)?,
    }
    crop_rule("crop_height", i.crop_height.unwrap_or(1024))?;
    crop_rule("crop_width", i.crop_width.unwrap_or(1024))?;
    int_rule("loader_threads", i.loader_threads.unwrap_or(4), 1, 256)?;
    int_rule(
        "world_size",
        i.world_size.unwrap_or(DEFAULT_WORLD_SIZE),
        1,
        1024,
    )?;
    int_rule("batch_per_gpu", i.batch_per_gpu.unwrap_or(1), 1, 1024)?;
    int_rule("accumulate_steps", i.accumulate_steps.unwrap_or(1), 1, 1024)?;
    let max_iters = i.max_iters.unwrap_or(DEFAULT_MAX_ITERS);
    int_rule("max_iters", max_iters, 1, MAX_ITERS)?;
    enum_rule("precision", i.precision.as_deref(), &["fp32", "bf16"])?;
    int_rule("seed", i.seed.unwrap_or(0), 0, i64::MAX as u64)?;
    float_rule("base_lr", i.base_lr.unwrap_or(6e-5), true, 0.0, 1.0)?;
    let warmup = i.warmup_iters.unwrap_or(1500);
    rule(
        "warmup_iters",
        warmup < max_iters,
        format!("0..={} (less than max_iters)", max_iters - 1),
    )?;
    float_rule(
        "warmup_ratio",
        i.warmup_ratio.unwrap_or(1e-6),
        true,
        0.0,
        1.0,
    )?;
    float_rule("poly_power", i.poly_power.unwrap_or(1.0), true, 0.0, 10.0)?;
    float_rule(
        "weight_decay",
        i.weight_decay.unwrap_or(0.01),
        false,
        0.0,
        1.0,
    )?;
    float_rule(
        "head_lr_mult",
        i.head_lr_mult.unwrap_or(10.0),
        true,
        0.0,
        1000.0,
    )?;
    int_rule("log_interval", i.log_interval.unwrap_or(50), 1, MAX_ITERS)?;
    int_rule(
        "eval_interval",
        i.eval_interval.unwrap_or(DEFAULT_EVAL_INTERVAL),
        0,
        MAX_ITERS,
    )?;
    int_rule(
        "checkpoint_interval",
        i.checkpoint_interval.unwrap_or(4000),
        0,
        MAX_ITERS,
    )?;
    enum_rule("eval_mode", i.eval_mode.as_deref(), &["slide", "whole"])?;
    let eval_crop = i.eval_crop.unwrap_or(DEFAULT_EVAL_CROP);
    crop_rule("eval_crop", eval_crop)?;
    let stride = i.eval_stride.unwrap_or(768);
    rule(
        "eval_stride",
        (1..=eval_crop).contains(&stride),
        format!("1..={eval_crop} (eval_crop)"),
    )?;
    if let Some(p) = optional_path(&i.resume_from) {
        path_rule("resume_from", &p, false)?;
    }
    int_rule("max_restarts", i.max_restarts.unwrap_or(3), 0, 100)?;
    // world_size and accumulate_steps are valid here (their rules come first).
    let world = i.world_size.unwrap_or(DEFAULT_WORLD_SIZE);
    let micro_batches = u64::from(world) * u64::from(i.accumulate_steps.unwrap_or(1));
    let min = i.min_world_size.unwrap_or(world);
    rule(
        "min_world_size",
        (1..=world).contains(&min),
        format!("1..={world} (world_size)"),
    )?;
    rule(
        "min_world_size",
        min == world || (min..world).any(|w| micro_batches.is_multiple_of(u64::from(w))),
        "world sizes that do: 1",
    )?;
    int_rule(
        "elastic_wait_seconds",
        i.elastic_wait_seconds.unwrap_or(60),
        0,
        86_400,
    )?;
    int_rule("keep_last", i.keep_last.unwrap_or(3), 1, 1000)?;
    path_rule(
        "checkpoint_root",
        i.checkpoint_root
            .as_deref()
            .unwrap_or("/var/lib/segtrain/checkpoints"),
        false,
    )?;
    Ok(())
}

/// The spec an accepted input must resolve to: its values, the documented defaults elsewhere.
fn with_defaults_filled(i: &JobSpecInput) -> JobSpec {
    fn pick<T: Copy>(all: &[T], name: Option<&str>, text: impl Fn(T) -> &'static str) -> T {
        let name = name.unwrap_or(text(all[0]));
        *all.iter()
            .find(|v| text(**v) == name)
            .expect("a valid name")
    }
    let i = i.clone();
    let world_size = i.world_size.unwrap_or(DEFAULT_WORLD_SIZE);
    JobSpec {
        name: i.name.unwrap_or_else(|| "segformer".to_string()),
        priority: i.priority.unwrap_or(0),
        variant: pick(Variant::ALL, i.variant.as_deref(), Variant::as_str),
        num_classes: i.num_classes.unwrap_or(19),
        pretrained: i.pretrained.filter(|p| !p.is_empty()),
        dataset_root: i.dataset_root.expect("required"),
        crop_height: i.crop_height.unwrap_or(1024),
        crop_width: i.crop_width.unwrap_or(1024),
        loader_threads: i.loader_threads.unwrap_or(4),
        world_size,
        batch_per_gpu: i.batch_per_gpu.unwrap_or(1),
        accumulate_steps: i.accumulate_steps.unwrap_or(1),
        max_iters: i.max_iters.unwrap_or(DEFAULT_MAX_ITERS),
        precision: pick(Precision::ALL, i.precision.as_deref(), Precision::as_str),
        seed: i.seed.unwrap_or(0),
        // The one conditional default: SyncBN when there is more than one rank.
        sync_bn: i.sync_bn.unwrap_or(world_size > 1),
        base_lr: i.base_lr.unwrap_or(6e-5),
        warmup_iters: i.warmup_iters.unwrap_or(1500),
        warmup_ratio: i.warmup_ratio.unwrap_or(1e-6),
        poly_power: i.poly_power.unwrap_or(1.0),
        weight_decay: i.weight_decay.unwrap_or(0.01),
        head_lr_mult: i.head_lr_mult.unwrap_or(10.0),
        log_interval: i.log_interval.unwrap_or(50),
        eval_interval: i.eval_interval.unwrap_or(DEFAULT_EVAL_INTERVAL),
        checkpoint_interval: i.checkpoint_interval.unwrap_or(4000),
        eval_mode: pick(EvalMode::ALL, i.eval_mode.as_deref(), EvalMode::as_str),
        eval_crop: i.eval_crop.unwrap_or(DEFAULT_EVAL_CROP),
        eval_stride: i.eval_stride.unwrap_or(768),
        resume_from: i.resume_from.filter(|p| !p.is_empty()),
        max_restarts: i.max_restarts.unwrap_or(3),
        min_world_size: i.min_world_size.unwrap_or(world_size),
        elastic_wait_seconds: i.elastic_wait_seconds.unwrap_or(60),
        keep_last: i.keep_last.unwrap_or(3),
        keep_best: i.keep_best.unwrap_or(true),
        checkpoint_root: i
            .checkpoint_root
            .unwrap_or_else(|| "/var/lib/segtrain/checkpoints".to_string()),
    }
}

/// Every documented bound of a valid spec, checked on the spec itself.
fn assert_bounds(s: &JobSpec) -> Result<(), TestCaseError> {
    let location = |v: &str| {
        !v.is_empty()
            && v.len() <= 4096
            && !v.contains('\0')
            && (v.starts_with('/')
                || v.starts_with("file:///")
                || v.strip_prefix("gs://").is_some_and(|r| {
                    let b = r.split('/').next().unwrap_or("");
                    (3..=63).contains(&b.len())
                        && b.bytes().all(|c| {
                            c.is_ascii_lowercase() || c.is_ascii_digit() || b"._-".contains(&c)
                        })
                }))
    };
    let n = s.name.chars().count();
    prop_assert!((1..=128).contains(&n), "name length {}", n);
    prop_assert!(s
        .name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)));
    prop_assert!((-1000..=1000).contains(&s.priority));
    prop_assert!((1..=254).contains(&s.num_classes));
    prop_assert!(s.pretrained.as_deref().is_none_or(location));
    prop_assert!(s.dataset_root.starts_with('/') && location(&s.dataset_root));
    for crop in [s.crop_height, s.crop_width, s.eval_crop] {
        prop_assert!(
            crop.is_multiple_of(32) && (32..=8192).contains(&crop),
            "crop {}",
            crop
        );
    }
    prop_assert!((1..=256).contains(&s.loader_threads));
    for n in [s.world_size, s.batch_per_gpu, s.accumulate_steps] {
        prop_assert!((1..=1024).contains(&n));
    }
    prop_assert!((1..=1024 * 1024 * 1024).contains(&s.global_batch()));
    prop_assert!((1..=MAX_ITERS).contains(&s.max_iters));
    prop_assert!(i64::try_from(s.seed).is_ok());
    for (v, lo_open, lo, hi) in [
        (s.base_lr, true, 0.0, 1.0),
        (s.warmup_ratio, true, 0.0, 1.0),
        (s.poly_power, true, 0.0, 10.0),
        (s.weight_decay, false, 0.0, 1.0),
        (s.head_lr_mult, true, 0.0, 1000.0),
    ] {
        prop_assert!(
            v.is_finite() && v <= hi && (v > lo || (!lo_open && v == lo)),
            "{}",
            v
        );
    }
    prop_assert!(s.warmup_iters < s.max_iters);
    prop_assert!((1..=MAX_ITERS).contains(&s.log_interval));
    prop_assert!(s.eval_interval <= MAX_ITERS && s.checkpoint_interval <= MAX_ITERS);
    prop_assert!(1 <= s.eval_stride && s.eval_stride <= s.eval_crop);
    prop_assert!(s.resume_from.as_deref().is_none_or(location));
    prop_assert!(s.max_restarts <= 100);
    prop_assert!((1..=s.world_size).contains(&s.min_world_size));
    prop_assert!(s.elastic_world_sizes().first() == Some(&s.world_size));
    prop_assert!(s.elastic_wait_seconds <= 86_400);
    prop_assert!((1..=1000).contains(&s.keep_last));
    prop_assert!(location(&s.checkpoint_root));
    Ok(())
}

/// Resolves `input` and checks the outcome against the rules; returns the spec when accepted.
fn check_resolve(input: &JobSpecInput) -> Result<Option<JobSpec>, TestCaseError> {
    let got = input.clone().resolve();
    match (&got, expected(input, true)) {
        (Ok(spec), Ok(())) => {
            assert_bounds(spec)?;
            prop_assert_eq!(spec, &with_defaults_filled(input));
            // Validating the resolved spec again, directly or as an input, changes nothing.
            prop_assert_eq!(spec.validate(), Ok(()));
            prop_assert_eq!(JobSpecInput::from(spec.clone()).resolve(), Ok(spec.clone()));
            Ok(Some(spec.clone()))
        }
        (Err(e), Err(v)) => {
            prop_assert_eq!(&e.field, v.field, "{} (expected {:?})", e, v);
            prop_assert!(
                v.allowed.iter().any(|a| e.message.contains(a.as_str())),
                "{} does not say what is allowed ({:?})",
                e,
                v.allowed
            );
            prop_assert!(
                e.message.contains("got") || e.message.starts_with("required"),
                "{} does not say what was given",
                e
            );
            let prefix = format!("{}: ", v.field);
            prop_assert!(e.to_string().starts_with(&prefix), "{}", e);
            prop_assert_eq!(&input.clone().resolve(), &got, "not deterministic");
            Ok(None)
        }
        (Ok(spec), Err(v)) => Err(TestCaseError::fail(format!(
            "accepted a spec that breaks the rule on {} ({:?}): {spec:?}",
            v.field, v.allowed
        ))),
        (Err(e), Ok(())) => Err(TestCaseError::fail(format!(
            "rejected a valid input: {e}; {input:?}"
        ))),
    }
}

// ------------------------------------------------------------------------------------------------
// Field values as plain data (NaN equal to NaN), for comparing inputs and predicting parses

#[derive(Debug, Clone)]
enum Val {
    Str(String),
    Int(i128),
    Float(f64),
    Bool(bool),
}

impl PartialEq for Val {
    fn eq(&self, other: &Val) -> bool {
        match (self, other) {
            (Val::Str(a), Val::Str(b)) => a == b,
            (Val::Int(a), Val::Int(b)) => a == b,
            (Val::Float(a), Val::Float(b)) => a == b || (a.is_nan() && b.is_nan()),
            (Val::Bool(a), Val::Bool(b)) => a == b,
            _ => false,
        }
    }
}

/// Every field of an input, in [`FIELDS`] order.
fn values(i: &JobSpecInput) -> Vec<(&'static str, Option<Val>)> {
    fn s(v: &Option<String>) -> Option<Val> {
        v.clone().map(Val::Str)
    }
    fn n<T: Into<i128>>(v: Option<T>) -> Option<Val> {
        v.map(|v| Val::Int(v.into()))
    }
    fn f(v: Option<f64>) -> Option<Val> {
        v.map(Val::Float)
    }
    vec![
        ("name", s(&i.name)),
        ("priority", n(i.priority)),
        ("variant", s(&i.variant)),
        ("num_classes", n(i.num_classes)),
        ("pretrained", s(&i.pretrained)),
        ("dataset_root", s(&i.dataset_root)),
        ("crop_height", n(i.crop_height)),
        ("crop_width", n(i.crop_width)),
        ("loader_threads", n(i.loader_threads)),
        ("world_size", n(i.world_size)),
        ("batch_per_gpu", n(i.batch_per_gpu)),
        ("accumulate_steps", n(i.accumulate_steps)),
        ("max_iters", n(i.max_iters)),
        ("precision", s(&i.precision)),
        ("seed", n(i.seed)),
        ("sync_bn", i.sync_bn.map(Val::Bool)),
        ("base_lr", f(i.base_lr)),
        ("warmup_iters", n(i.warmup_iters)),
        ("warmup_ratio", f(i.warmup_ratio)),
        ("poly_power", f(i.poly_power)),
        ("weight_decay", f(i.weight_decay)),
        ("head_lr_mult", f(i.head_lr_mult)),
        ("log_interval", n(i.log_interval)),
        ("eval_interval", n(i.eval_interval)),
        ("checkpoint_interval", n(i.checkpoint_interval)),
        ("eval_mode", s(&i.eval_mode)),
        ("eval_crop", n(i.eval_crop)),
        ("eval_stride", n(i.eval_stride)),
        ("resume_from", s(&i.resume_from)),
        ("max_restarts", n(i.max_restarts)),
        ("min_world_size", n(i.min_world_size)),
        ("elastic_wait_seconds", n(i.elastic_wait_seconds)),
        ("keep_last", n(i.keep_last)),
        ("keep_best", i.keep_best.map(Val::Bool)),
        ("checkpoint_root", s(&i.checkpoint_root)),
    ]
}

/// The Rust type of a field, as far as a job file is concerned.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Str,
    I32,
    U32,
    U64,
    F64,
    Bool,
}

fn kind(field: &str) -> Kind {
    match field {
        "name" | "variant" | "pretrained" | "dataset_root" | "precision" | "eval_mode"
        | "resume_from" | "checkpoint_root" => Kind::Str,
        "priority" => Kind::I32,
        "max_iters"
        | "seed"
        | "warmup_iters"
        | "log_interval"
        | "eval_interval"
        | "checkpoint_interval" => Kind::U64,
        "base_lr" | "warmup_ratio" | "poly_power" | "weight_decay" | "head_lr_mult" => Kind::F64,
        "keep_best" | "sync_bn" => Kind::Bool,
        _ => Kind::U32,
    }
}

/// What a TOML value becomes in a field of this kind; `None`: the wrong type (or out of the
/// type's range).
fn typed(kind: Kind, v: &toml::Value) -> Option<Val> {
    use toml::Value as T;
    match (kind, v) {
        (Kind::Str, T::String(s)) => Some(Val::Str(s.clone())),
        (Kind::Bool, T::Boolean(b)) => Some(Val::Bool(*b)),
        (Kind::I32, T::Integer(n)) => i32::try_from(*n).ok().map(|n| Val::Int(n.into())),
        (Kind::U32, T::Integer(n)) => u32::try_from(*n).ok().map(|n| Val::Int(n.into())),
        (Kind::U64, T::Integer(n)) => u64::try_from(*n).ok().map(|n| Val::Int(n.into())),
        (Kind::F64, T::Float(f)) => Some(Val::Float(*f)),
        (Kind::F64, T::Integer(n)) => Some(Val::Float(*n as f64)),
        _ => None,
    }
}

/// A field value as TOML; `None` for integers TOML cannot hold (above `i64::MAX`).
fn to_toml_value(v: &Val) -> Option<toml::Value> {
    Some(match v {
        Val::Str(s) => toml::Value::String(s.clone()),
        Val::Int(n) => toml::Value::Integer(i64::try_from(*n).ok()?),
        Val::Float(f) => toml::Value::Float(*f),
        Val::Bool(b) => toml::Value::Boolean(*b),
    })
}

// ------------------------------------------------------------------------------------------------
// Strategies: wild values

/// Any string: arbitrary chars (control characters, quotes, backslashes, non-ASCII), near-valid
/// names and paths, and huge ones around the length limits.
fn wild_string() -> BoxedStrategy<String> {
    prop_oneof![
        Just(String::new()),
        vec(any::<char>(), 0..40).prop_map(String::from_iter),
        "[ -~]{0,30}",
        "[\\x00-\\x1f\\x7f\"'\\\\/a-z:. #=\\[\\]{}]{0,20}",
        "[A-Za-z0-9._-]{1,130}",
        "[A-Za-z0-9._ -]{0,10}",
        "/(?s:.){0,40}",
        "(file://|file:|gs://|gs:/|s3://)[a-zA-Z0-9._/-]{0,70}",
        (4090usize..4100).prop_map(|n| format!("/{}", "a".repeat(n - 1))),
        (2040usize..2060).prop_map(|n| format!("/{}", "é".repeat(n))),
        (0usize..3).prop_map(|n| "x".repeat(100_000 + n)),
    ]
    .boxed()
}

/// A string for an enum-valued field: mostly a valid name, else a near miss or anything.
fn enum_string(names: &'static [&'static str]) -> BoxedStrategy<String> {
    prop_oneof![
        4 => prop::sample::select(names).prop_map(str::to_string),
        1 => prop::sample::select(names).prop_map(|n| n.to_uppercase()),
        1 => prop::sample::select(names).prop_map(|n| format!(" {n}")),
        1 => wild_string(),
    ]
    .boxed()
}

fn wild_u32(lo: u32, hi: u32) -> BoxedStrategy<u32> {
    prop_oneof![
        any::<u32>(),
        lo.saturating_sub(3)..=hi.saturating_add(3),
        prop::sample::select(vec![
            0,
            lo.saturating_sub(1),
            lo,
            hi,
            hi.saturating_add(1),
            u32::MAX
        ]),
    ]
    .boxed()
}

fn wild_u64(lo: u64, hi: u64) -> BoxedStrategy<u64> {
    prop_oneof![
        any::<u64>(),
        lo.saturating_sub(3)..=hi.saturating_add(3),
        prop::sample::select(vec![
            0,
            lo.saturating_sub(1),
            lo,
            hi,
            hi.saturating_add(1),
            i64::MAX as u64,
            i64::MAX as u64 + 1,
            u64::MAX
        ]),
    ]
    .boxed()
}

fn wild_crop() -> BoxedStrategy<u32> {
    prop_oneof![
        (0u32..260).prop_map(|k| k * 32),
        wild_u32(32, 8192),
        Just(8224),
    ]
    .boxed()
}

fn next_up(v: f64) -> f64 {
    f64::from_bits(v.to_bits() + 1)
}

fn wild_f64(lo: f64, hi: f64) -> BoxedStrategy<f64> {
    prop_oneof![
        any::<f64>(),
        (lo - 1.0)..(hi + 1.0),
        prop::sample::select(vec![
            f64::NAN,
            -f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            0.0,
            -0.0,
            5e-324,
            f64::MIN_POSITIVE,
            lo,
            hi,
            next_up(hi),
            -hi,
            f64::MAX,
        ]),
    ]
    .boxed()
}

fn opt<T: std::fmt::Debug + Clone + 'static>(s: BoxedStrategy<T>) -> BoxedStrategy<Option<T>> {
    prop::option::weighted(0.6, s).boxed()
}

/// An input with every field optional and drawn from wide ranges.
fn wild_input() -> impl Strategy<Value = JobSpecInput> {
    let a = (
        opt(wild_string()),
        opt(prop_oneof![any::<i32>(), -1003i32..=1003].boxed()),
        opt(enum_string(&["b0", "b1", "b2", "b3", "b4", "b5"])),
        opt(wild_u32(1, 254)),
        opt(prop_oneof![wild_string(), location()].boxed()),
        opt(prop_oneof![wild_string(), absolute_path()].boxed()),
        opt(wild_crop()),
        opt(wild_crop()),
    );
    let b = (
        opt(wild_u32(1, 256)),
        opt(wild_u32(1, 1024)),
        opt(wild_u32(1, 1024)),
        opt(wild_u32(1, 1024)),
        opt(wild_u64(1, MAX_ITERS)),
        opt(enum_string(&["fp32", "bf16"])),
        opt(wild_u64(0, i64::MAX as u64)),
        opt(any::<bool>().boxed()),
        opt(wild_f64(0.0, 1.0)),
    );
    let c = (
        opt(wild_u64(0, 200_000)),
        opt(wild_f64(0.0, 1.0)),
        opt(wild_f64(0.0, 10.0)),
        opt(wild_f64(0.0, 1.0)),
        opt(wild_f64(0.0, 1000.0)),
        opt(wild_u64(1, MAX_ITERS)),
        opt(wild_u64(0, MAX_ITERS)),
        opt(wild_u64(0, MAX_ITERS)),
    );
    let d = (
        opt(enum_string(&["slide", "whole"])),
        opt(wild_crop()),
        opt(wild_u32(1, 8192)),
        opt(prop_oneof![wild_string(), location()].boxed()),
        opt(wild_u32(0, 100)),
        opt(wild_u32(1, 1000)),
        opt(any::<bool>().boxed()),
        opt(prop_oneof![wild_string(), location()].boxed()),
        opt(wild_u32(1, 1024)),
        opt(wild_u32(0, 86_400)),
    );
    (a, b, c, d).prop_map(|(a, b, c, d)| JobSpecInput {
        name: a.0,
        priority: a.1,
        variant: a.2,
        num_classes: a.3,
        pretrained: a.4,
        dataset_root: a.5,
        crop_height: a.6,
        crop_width: a.7,
        loader_threads: b.0,
        world_size: b.1,
        batch_per_gpu: b.2,
        accumulate_steps: b.3,
        max_iters: b.4,
        precision: b.5,
        seed: b.6,
        sync_bn: b.7,
        base_lr: b.8,
        warmup_iters: c.0,
        warmup_ratio: c.1,
        poly_power: c.2,
        weight_decay: c.3,
        head_lr_mult: c.4,
        log_interval: c.5,
        eval_interval: c.6,
        checkpoint_interval: c.7,
        eval_mode: d.0,
        eval_crop: d.1,
        eval_stride: d.2,
        resume_from: d.3,
        max_restarts: d.4,
        min_world_size: d.8,
        elastic_wait_seconds: d.9,
        keep_last: d.5,
        keep_best: d.6,
        checkpoint_root: d.7,
    })
}

/// What to do with one field of a valid input.
#[derive(Debug, Clone, Copy)]
enum Mix {
    Keep,
    Unset,
    Wild,
}

/// Takes each field from `base`, leaves it unset, or takes it from `wild`, as `mask` says.
fn mix(base: JobSpecInput, wild: JobSpecInput, mask: &[Mix]) -> JobSpecInput {
    let mut out = base;
    let mut mask = mask.iter().copied();
    macro_rules! each {
        ($($f:ident),*) => {$(
            match mask.next().unwrap_or(Mix::Keep) {
                Mix::Keep => {}
                Mix::Unset => out.$f = None,
                Mix::Wild => out.$f = wild.$f.clone(),
            }
        )*};
    }
    each!(
        name,
        priority,
        variant,
        num_classes,
        pretrained,
        dataset_root,
        crop_height,
        crop_width,
        loader_threads,
        world_size,
        batch_per_gpu,
        accumulate_steps,
        max_iters,
        precision,
        seed,
        sync_bn,
        base_lr,
        warmup_iters,
        warmup_ratio,
        poly_power,
        weight_decay,
        head_lr_mult,
        log_interval,
        eval_interval,
        checkpoint_interval,
        eval_mode,
        eval_crop,
        eval_stride,
        resume_from,
        max_restarts,
        min_world_size,
        elastic_wait_seconds,
        keep_last,
        keep_best,
        checkpoint_root
    );
    out
}

/// Inputs of every kind: wild ones (almost always rejected), and valid ones with some fields
/// unset and a few replaced by wild values (often accepted, else rejected on those fields).
fn any_input() -> impl Strategy<Value = JobSpecInput> {
    let near_valid = (
        valid_spec(),
        wild_input(),
        vec(
            prop_oneof![24 => Just(Mix::Keep), 6 => Just(Mix::Unset), 1 => Just(Mix::Wild)],
            FIELDS.len(),
        ),
    )
        .prop_map(|(spec, wild, mask)| mix(JobSpecInput::from(spec), wild, &mask));
    prop_oneof![1 => wild_input(), 3 => near_valid]
}

/// A spec with typed enums but otherwise wild values, as code could build one directly.
fn wild_spec() -> impl Strategy<Value = JobSpec> {
    (
        wild_input(),
        prop::sample::select(Variant::ALL),
        prop::sample::select(Precision::ALL),
        prop::sample::select(EvalMode::ALL),
        valid_spec(),
        vec(
            prop_oneof![4 => Just(Mix::Keep), 1 => Just(Mix::Wild)],
            FIELDS.len(),
        ),
    )
        .prop_map(|(wild, variant, precision, eval_mode, valid, mask)| {
            let i = mix(JobSpecInput::from(valid.clone()), wild, &mask);
            let d = valid;
            JobSpec {
                name: i.name.unwrap_or(d.name),
                priority: i.priority.unwrap_or(d.priority),
                variant,
                num_classes: i.num_classes.unwrap_or(d.num_classes),
                pretrained: i.pretrained,
                dataset_root: i.dataset_root.unwrap_or(d.dataset_root),
                crop_height: i.crop_height.unwrap_or(d.crop_height),
                crop_width: i.crop_width.unwrap_or(d.crop_width),
                loader_threads: i.loader_threads.unwrap_or(d.loader_threads),
                world_size: i.world_size.unwrap_or(d.world_size),
                batch_per_gpu: i.batch_per_gpu.unwrap_or(d.batch_per_gpu),
                accumulate_steps: i.accumulate_steps.unwrap_or(d.accumulate_steps),
                max_iters: i.max_iters.unwrap_or(d.max_iters),
                precision,
                seed: i.seed.unwrap_or(d.seed),
                sync_bn: i.sync_bn.unwrap_or(d.sync_bn),
                base_lr: i.base_lr.unwrap_or(d.base_lr),
                warmup_iters: i.warmup_iters.unwrap_or(d.warmup_iters),
                warmup_ratio: i.warmup_ratio.unwrap_or(d.warmup_ratio),
                poly_power: i.poly_power.unwrap_or(d.poly_power),
                weight_decay: i.weight_decay.unwrap_or(d.weight_decay),
                head_lr_mult: i.head_lr_mult.unwrap_or(d.head_lr_mult),
                log_interval: i.log_interval.unwrap_or(d.log_interval),
                eval_interval: i.eval_interval.unwrap_or(d.eval_interval),
                checkpoint_interval: i.checkpoint_interval.unwrap_or(d.checkpoint_interval),
                eval_mode,
                eval_crop: i.eval_crop.unwrap_or(d.eval_crop),
                eval_stride: i.eval_stride.unwrap_or(d.eval_stride),
                resume_from: i.resume_from,
                max_restarts: i.max_restarts.unwrap_or(d.max_restarts),
                min_world_size: i.min_world_size.unwrap_or(d.min_world_size),
                elastic_wait_seconds: i.elastic_wait_seconds.unwrap_or(d.elastic_wait_seconds),
                keep_last: i.keep_last.unwrap_or(d.keep_last),
                keep_best: i.keep_best.unwrap_or(d.keep_best),
                checkpoint_root: i.checkpoint_root.unwrap_or(d.checkpoint_root),
            }
        })
}

// ------------------------------------------------------------------------------------------------
// Strategies: valid specs

/// Any char but a control character.
fn path_char() -> impl Strategy<Value = char> {
    any::<char>().prop_map(|c| if c.is_control() { '\u{FFFD}' } else { c })
}

/// A valid absolute path (never a `..` segment): short ones of any printable chars (quotes,
/// `'''`, non-ASCII), and ones at the 4096-byte limit.
fn absolute_path() -> BoxedStrategy<String> {
    prop_oneof![
        4 => vec(path_char(), 0..40).prop_map(|c| format!("/{}", String::from_iter(c))),
        1 => "/[a-z'\"\\\\ ]{0,12}",
        1 => (1usize..4096).prop_map(|n| format!("/{}", "d".repeat(n - 1))),
        1 => (0usize..=2047).prop_map(|n| format!("/{}x", "ü".repeat(n))),
    ]
    .prop_filter("at most 4096 bytes", |p| p.len() <= 4096)
    .prop_filter("no `..` segment", |p| !p.split('/').any(|s| s == ".."))
    .boxed()
}

/// A valid weights/checkpoint location: an absolute path, `file:///...` or `gs://bucket[/...]`.
fn location() -> BoxedStrategy<String> {
    prop_oneof![
        absolute_path(),
        absolute_path().prop_map(|p| format!("file://{p}")),
        (
            "[a-z0-9._-]{3,63}",
            prop::option::of(vec(path_char(), 0..30))
        )
            .prop_map(|(bucket, rest)| match rest {
                None => format!("gs://{bucket}"),
                Some(rest) => format!("gs://{bucket}/{}", String::from_iter(rest)),
            }),
    ]
    .prop_filter("at most 4096 bytes", |p| p.len() <= 4096)
    .prop_filter("no `..` segment", |p| !p.split('/').any(|s| s == ".."))
    .boxed()
}

/// A float in `(lo, hi]` or `[lo, hi]` (lo >= 0): the bounds, uniform values, and values uniform
/// in bit patterns (so tiny, subnormal and long-mantissa ones too).
fn float_in(open: bool, lo: f64, hi: f64) -> BoxedStrategy<f64> {
    prop_oneof![
        Just(hi),
        Just(if open { next_up(lo) } else { lo }),
        lo..=hi,
        (lo.to_bits()..=hi.to_bits()).prop_map(f64::from_bits),
    ]
    .prop_filter("in range", move |v| *v > lo || (!open && *v == lo))
    .boxed()
}

fn valid_crop() -> BoxedStrategy<u32> {
    prop_oneof![(1u32..=256).prop_map(|k| k * 32), Just(32), Just(8192)].boxed()
}

fn edge_u32(lo: u32, hi: u32) -> BoxedStrategy<u32> {
    prop_oneof![Just(lo), Just(hi), lo..=hi].boxed()
}

fn edge_u64(lo: u64, hi: u64) -> BoxedStrategy<u64> {
    prop_oneof![Just(lo), Just(hi), lo..=hi].boxed()
}

/// A spec that satisfies every rule, with values across the allowed ranges and at their edges.
fn valid_spec() -> impl Strategy<Value = JobSpec> {
    let a = (
        "[A-Za-z0-9._-]{1,128}",
        prop_oneof![Just(-1000i32), Just(1000), -1000i32..=1000],
        prop::sample::select(Variant::ALL),
        edge_u32(1, 254),
        prop::option::of(location()),
        absolute_path(),
        valid_crop(),
        valid_crop(),
    );
    let b = (
        edge_u32(1, 256),
        edge_u32(1, 1024),
        edge_u32(1, 1024),
        edge_u32(1, 1024),
        edge_u64(1, MAX_ITERS),
        prop::sample::select(Precision::ALL),
        edge_u64(0, i64::MAX as u64),
        any::<bool>(),
        float_in(true, 0.0, 1.0),
    );
    let c = (
        any::<u64>(), // warmup_iters: reduced below max_iters
        float_in(true, 0.0, 1.0),
        float_in(true, 0.0, 10.0),
        float_in(false, 0.0, 1.0),
        float_in(true, 0.0, 1000.0),
        edge_u64(1, MAX_ITERS),
        edge_u64(0, MAX_ITERS),
        edge_u64(0, MAX_ITERS),
    );
    let d = (
        prop::sample::select(EvalMode::ALL),
        valid_crop(),
        any::<u32>(), // eval_stride: reduced to 1..=eval_crop below
        prop::option::of(location()),
        edge_u32(0, 100),
        edge_u32(1, 1000),
        any::<bool>(),
        location(),
        any::<u32>(), // min_world_size: reduced to a valid one below
        edge_u32(0, 86_400),
    );
    (a, b, c, d).prop_map(|(a, b, c, d)| JobSpec {
        name: a.0,
        priority: a.1,
        variant: a.2,
        num_classes: a.3,
        pretrained: a.4,
        dataset_root: a.5,
        crop_height: a.6,
        crop_width: a.7,
        loader_threads: b.0,
        world_size: b.1,
        batch_per_gpu: b.2,
        accumulate_steps: b.3,
        max_iters: b.4,
        precision: b.5,
        seed: b.6,
        sync_bn: b.7,
        base_lr: b.8,
        warmup_iters: match c.0 % 4 {
            0 => 0,
            1 => b.4 - 1,
            _ => c.0 % b.4,
        },
        warmup_ratio: c.1,
        poly_power: c.2,
        weight_decay: c.3,
        head_lr_mult: c.4,
        log_interval: c.5,
        eval_interval: c.6,
        checkpoint_interval: c.7,
        eval_mode: d.0,
        eval_crop: d.1,
        eval_stride: match d.2 % 4 {
            0 => d.1,
            1 => 1,
            _ => 1 + d.2 % d.1,
        },
        resume_from: d.3,
        max_restarts: d.4,
        min_world_size: {
            // The full world, or a size that some smaller world keeps the global batch at.
            let micro_batches = b.1 * b.3;
            let smaller: Vec<u32> = (1..b.1).filter(|w| micro_batches % w == 0).collect();
            match (d.8 % 3, smaller.is_empty()) {
                (0, _) | (_, true) => b.1,
                (1, _) => 1,
                _ => smaller[d.8 as usize % smaller.len()],
            }
        },
        elastic_wait_seconds: d.9,
        keep_last: d.5,
        keep_best: d.6,
        checkpoint_root: d.7,
    })
}

// ------------------------------------------------------------------------------------------------
// Strategies: TOML

/// Any TOML value, nested arrays and inline tables included.
fn toml_value() -> impl Strategy<Value = toml::Value> {
    use toml::Value as T;
    let datetimes = [
        "1979-05-27T07:32:00Z",
        "1979-05-27T00:32:00.999999-07:00",
        "1979-05-27",
        "07:32:00",
    ]
    .map(|d| T::Datetime(d.parse().expect("a TOML datetime")));
    let leaf = prop_oneof![
        any::<i64>().prop_map(T::Integer),
        (-5i64..2000).prop_map(T::Integer),
        prop::sample::select(vec![
            -1,
            i64::from(i32::MIN) - 1,
            i64::from(i32::MAX) + 1,
            i64::from(u32::MAX),
            i64::from(u32::MAX) + 1,
            i64::MAX,
            i64::MIN
        ])
        .prop_map(T::Integer),
        wild_f64(0.0, 1000.0).prop_map(T::Float),
        wild_string().prop_map(T::String),
        any::<bool>().prop_map(T::Boolean),
        prop::sample::select(datetimes.to_vec()),
    ];
    leaf.prop_recursive(3, 12, 4, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..4).prop_map(T::Array),
            btree_map(any_key(), inner, 0..4).prop_map(|m| T::Table(m.into_iter().collect())),
        ]
    })
}

/// A key that is not a field: anything, or a near miss of a field name.
fn unknown_key() -> impl Strategy<Value = String> {
    prop_oneof![
        wild_string(),
        "[a-z_]{1,20}",
        prop::sample::select(FIELDS).prop_map(|f| f.replace('_', "-")),
        prop::sample::select(FIELDS).prop_map(|f| f.to_uppercase()),
        (prop::sample::select(FIELDS), "[a-z]").prop_map(|(f, c)| format!("{f}{c}")),
        prop::sample::select(FIELDS).prop_map(|f| format!(" {f}")),
    ]
    .prop_filter("not a field", |k| !FIELDS.contains(&k.as_str()))
}

fn any_key() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(FIELDS).prop_map(str::to_string),
        1 => unknown_key(),
    ]
}

/// A key as TOML: bare when it can be, else a basic string with escapes.
fn toml_key(k: &str) -> String {
    let bare = !k.is_empty()
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if bare {
        return k.to_string();
    }
    let mut out = String::from("\"");
    for c in k.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A job file's entries: fields with values of their own type (often valid) or of any type, and
/// sometimes unknown keys, in random order.
fn toml_entries() -> impl Strategy<Value = Vec<(String, toml::Value)>> {
    let typed_fields = any_input().prop_map(|i| {
        values(&i)
            .into_iter()
            .filter_map(|(f, v)| Some((f.to_string(), to_toml_value(&v?)?)))
            .collect::<BTreeMap<_, _>>()
    });
    (
        typed_fields,
        prop::option::weighted(
            0.25,
            vec((prop::sample::select(FIELDS), toml_value()), 1..3),
        )
        .prop_map(Option::unwrap_or_default),
        prop::option::weighted(0.2, vec((unknown_key(), toml_value()), 1..3))
            .prop_map(Option::unwrap_or_default),
    )
        .prop_flat_map(|(mut entries, retyped, unknown)| {
            for (f, v) in retyped {
                entries.insert(f.to_string(), v);
            }
            entries.extend(unknown);
            Just(entries.into_iter().collect::<Vec<_>>()).prop_shuffle()
        })
}

/// Job-file-like text: a soup of TOML tokens, field names and arbitrary chars.
fn toml_soup() -> impl Strategy<Value = String> {
    let token = prop_oneof![
        3 => prop::sample::select(FIELDS).prop_map(str::to_string),
        6 => prop::sample::select(vec![
            " = ", "=", "\n", "\r\n", "\r", " ", "\t", "[", "]", "[[", "]]", "{", "}", ",", ".",
            "\"", "'", "\"\"\"", "'''", "#", "\\", "\\u", "\\U0010FFFF", "nan", "+inf", "-inf",
            "true", "false", "0x", "0o7", "0b1", "1e", "1_000", "-0.0", "1979-05-27T07:32:00Z",
            "\u{feff}", "\0", "é", "\u{7f}",
        ])
        .prop_map(str::to_string),
        2 => "-?[0-9_]{1,25}(\\.[0-9]{0,5})?",
        1 => any::<char>().prop_map(String::from),
        1 => wild_string(),
    ];
    vec(token, 0..40).prop_map(|t| t.concat())
}

/// One change to one line of the template.
#[derive(Debug, Clone)]
enum Edit {
    Delete,
    Duplicate,
    CommentOut,
    Uncomment,
    /// Replace the line by this text (anything, newlines included).
    Replace(String),
    /// Insert a char at a char position.
    InsertChar(Index, char),
    /// Delete the char at a char position.
    DeleteChar(Index),
    /// Set this field's value (on its own line) to this TOML value.
    SetValue(&'static str, toml::Value),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        1 => Just(Edit::Delete),
        1 => Just(Edit::Duplicate),
        1 => Just(Edit::CommentOut),
        1 => Just(Edit::Uncomment),
        1 => wild_string().prop_map(Edit::Replace),
        1 => toml_soup().prop_map(Edit::Replace),
        1 => (any::<Index>(), any::<char>()).prop_map(|(i, c)| Edit::InsertChar(i, c)),
        1 => any::<Index>().prop_map(Edit::DeleteChar),
        2 => (prop::sample::select(FIELDS), toml_value()).prop_map(|(f, v)| Edit::SetValue(f, v)),
        2 => any_input().prop_map(|i| {
            // A typed, often valid, value for one of the fields the input sets.
            let set: Vec<_> = values(&i)
                .into_iter()
                .filter_map(|(f, v)| Some((f, to_toml_value(&v?)?)))
                .collect();
            match set.into_iter().next() {
                Some((f, v)) => Edit::SetValue(f, v),
                None => Edit::Delete,
            }
        }),
    ]
}

// ------------------------------------------------------------------------------------------------
// Checks on parse results

/// What every parse must satisfy, whatever the text: errors name a field, the key at fault, or
/// the job file as a whole; an accepted file holds known keys only, with their values; and an
/// accepted input resolves according to the rules.
fn check_parse(text: &str) -> Result<(), TestCaseError> {
    let parsed = JobSpecInput::from_toml_str(text);
    let table = toml::from_str::<toml::Table>(text);
    match &parsed {
        Err(e) => {
            prop_assert!(!e.message.is_empty(), "{:?}", e);
            if e.field == "job file" {
                prop_assert!(e.message.starts_with("invalid TOML"), "{}", e);
                prop_assert!(table.is_err(), "valid TOML reported as invalid: {}", e);
            } else if let Some(rest) = e.message.strip_prefix("invalid TOML at line ") {
                // A syntax error in the value of a known field names that field: it is the key
                // of the line the error is on.
                prop_assert!(FIELDS.contains(&e.field.as_str()), "{}", e);
                let line: usize = rest
                    .split(',')
                    .next()
                    .and_then(|n| n.parse().ok())
                    .expect("a line number");
                let key = text
                    .lines()
                    .nth(line - 1)
                    .and_then(|l| l.split_once('='))
                    .map(|(k, _)| k.trim());
                prop_assert_eq!(key, Some(e.field.as_str()), "{}", e);
            } else {
                let table = table.expect("the TOML is valid when a key is reported");
                prop_assert!(table.contains_key(&e.field), "{} names no key", e);
                if FIELDS.contains(&e.field.as_str()) {
                    let v = &table[&e.field];
                    prop_assert!(
                        typed(kind(&e.field), v).is_none(),
                        "{} but {:?} is of the right type",
                        e,
                        v
                    );
                } else {
                    prop_assert!(e.message.starts_with("unknown field"), "{}", e);
                }
            }
        }
        Ok(input) => {
            let table = table.expect("accepted text is valid TOML");
            for (field, v) in values(input) {
                let in_file = table.get(field).and_then(|t| typed(kind(field), t));
                prop_assert_eq!(v, in_file, "{}", field);
            }
            for key in table.keys() {
                prop_assert!(FIELDS.contains(&key.as_str()), "{} accepted", key);
            }
            check_resolve(input)?;
        }
    }
    Ok(())
}

/// Parses entries written as a job file, and checks the outcome is the predicted one: an unknown
/// key, else the first field (in field order) with a value of the wrong type, else exactly the
/// given values, resolved by the rules.
fn check_entries(entries: &[(String, toml::Value)], text: &str) -> Result<(), TestCaseError> {
    let parsed = JobSpecInput::from_toml_str(text);
    let unknown: Vec<&str> = entries
        .iter()
        .map(|(k, _)| k.as_str())
        .filter(|k| !FIELDS.contains(k))
        .collect();
    let map: BTreeMap<&str, &toml::Value> = entries.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let wrong_type = FIELDS
        .iter()
        .find(|f| map.get(*f).is_some_and(|v| typed(kind(f), v).is_none()));
    match (&parsed, unknown.is_empty(), wrong_type) {
        (Err(e), false, _) => {
            prop_assert!(
                unknown.contains(&e.field.as_str()),
                "{} (unknown: {:?})",
                e,
                unknown
            );
            prop_assert!(e.message.starts_with("unknown field"), "{}", e);
        }
        (Err(e), true, Some(field)) => {
            prop_assert_eq!(&e.field, field, "{}", e);
        }
        (Ok(input), true, None) => {
            for (field, v) in values(input) {
                let given = map.get(field).and_then(|t| typed(kind(field), t));
                prop_assert_eq!(v, given, "{}", field);
            }
            check_resolve(input)?;
        }
        (got, _, wrong_type) => {
            return Err(TestCaseError::fail(format!(
                "got {got:?}; unknown keys {unknown:?}, wrong type {wrong_type:?}\n{text}"
            )))
        }
    }
    Ok(())
}

/// Entries as `key = value` lines, values inline.
fn inline_document(entries: &[(String, toml::Value)]) -> String {
    entries
        .iter()
        .map(|(k, v)| format!("{} = {v}\n", toml_key(k)))
        .collect()
}

/// The template with `edit` applied to the line at `at` (or to the line of the field it names).
fn apply(template: &str, at: Index, edit: &Edit) -> (Vec<String>, usize) {
    let mut lines: Vec<String> = template.lines().map(str::to_string).collect();
    let mut i = at.index(lines.len());
    match edit {
        Edit::Delete => {
            lines.remove(i);
        }
        Edit::Duplicate => lines.insert(i, lines[i].clone()),
        Edit::CommentOut => lines[i] = format!("# {}", lines[i]),
        Edit::Uncomment => {
            if let Some(rest) = lines[i].strip_prefix("# ") {
                lines[i] = rest.to_string();
            }
        }
        Edit::Replace(s) => lines[i] = s.clone(),
        Edit::InsertChar(pos, c) => {
            let mut chars: Vec<char> = lines[i].chars().collect();
            chars.insert(pos.index(chars.len() + 1), *c);
            lines[i] = chars.into_iter().collect();
        }
        Edit::DeleteChar(pos) => {
            let mut chars: Vec<char> = lines[i].chars().collect();
            if !chars.is_empty() {
                chars.remove(pos.index(chars.len()));
            }
            lines[i] = chars.into_iter().collect();
        }
        Edit::SetValue(field, v) => {
            let set = format!("{field} = ");
            let commented = format!("# {set}");
            i = lines
                .iter()
                .position(|l| l.starts_with(&set) || l.starts_with(&commented))
                .expect("every field is in the template");
            lines[i] = format!("{set}{v}");
        }
    }
    (lines, i)
}

// ------------------------------------------------------------------------------------------------
// The properties

proptest! {
    #![proptest_config(config(3000))]

    /// Validation of any input: accepted exactly when the rules allow, with the first offending
    /// field and what it allows named otherwise; accepted specs within every bound and stable.
    #[test]
    fn resolve_follows_the_rules(input in any_input()) {
        check_resolve(&input)?;
        // Layering with an empty input changes nothing.
        let same = values(&input);
        prop_assert_eq!(values(&input.clone().overlay(JobSpecInput::default())), same.clone());
        prop_assert_eq!(values(&JobSpecInput::default().overlay(input.clone())), same.clone());
        // The wire form carries the input unchanged.
        prop_assert_eq!(values(&JobSpecInput::from_proto(&input.to_proto())), same);
    }
}

proptest! {
    #![proptest_config(config(2000))]

    /// `JobSpec::validate` on directly built specs, where an empty optional path is invalid.
    #[test]
    fn validate_follows_the_rules(spec in wild_spec()) {
        let got = spec.validate();
        match (&got, expected(&JobSpecInput::from(spec.clone()), false)) {
            (Ok(()), Ok(())) => assert_bounds(&spec)?,
            (Err(e), Err(v)) => {
                prop_assert_eq!(&e.field, v.field, "{} (expected {:?})", e, v);
                prop_assert!(v.allowed.iter().any(|a| e.message.contains(a.as_str())), "{}", e);
                prop_assert_eq!(&spec.validate(), &got);
            }
            (got, want) => prop_assert!(false, "got {:?}, want {:?}: {:?}", got, want, spec),
        }
    }
}

proptest! {
    #![proptest_config(config(1500))]

    /// Every valid spec is accepted as it is, and reads back equal from its job file, from the
    /// serde TOML and JSON forms, and from the proto.
    #[test]
    fn valid_specs_round_trip(spec in valid_spec()) {
        prop_assert_eq!(spec.validate(), Ok(()));
        assert_bounds(&spec)?;
        let input = JobSpecInput::from(spec.clone());
        prop_assert_eq!(check_resolve(&input)?, Some(spec.clone()));

        let text = spec.to_toml();
        prop_assert_eq!(
            JobSpecInput::from_toml_str(&text).and_then(JobSpecInput::resolve),
            Ok(spec.clone()),
            "job file:\n{}", text
        );
        let text = toml::to_string(&input).expect("a valid spec serialises");
        prop_assert_eq!(JobSpecInput::from_toml_str(&text), Ok(input), "serde TOML:\n{}", text);
        let json = serde_json::to_string(&spec).expect("serialises");
        prop_assert_eq!(serde_json::from_str::<JobSpec>(&json).ok(), Some(spec.clone()));
        prop_assert_eq!(JobSpec::from_proto(&spec.to_proto()), Ok(spec));
    }
}

proptest! {
    #![proptest_config(config(1000))]

    /// Any input written by serde's TOML serialiser parses back to the same values (NaN and
    /// infinities included), except integers above TOML's i64: the serialiser writes them, and
    /// the parser rejects the file naming one of those fields.
    #[test]
    fn any_input_round_trips_through_toml(input in wild_input()) {
        let too_big: Vec<&str> = values(&input)
            .into_iter()
            .filter(|(_, v)| matches!(v, Some(Val::Int(n)) if *n > i128::from(i64::MAX)))
            .map(|(f, _)| f)
            .collect();
        let text = toml::to_string(&input);
        prop_assert!(text.is_ok() || !too_big.is_empty(), "{:?} does not serialise", input);
        let Ok(text) = text else { return Ok(()) };
        match JobSpecInput::from_toml_str(&text) {
            Ok(back) => {
                prop_assert!(too_big.is_empty(), "{:?} accepted:\n{}", too_big, text);
                prop_assert_eq!(values(&back), values(&input), "{}", text);
            }
            Err(e) => {
                prop_assert!(too_big.contains(&e.field.as_str()), "{}\n{}", e, text);
            }
        }
    }
}

proptest! {
    #![proptest_config(config(1000))]

    /// Structured job files: known keys with values of every type and unknown keys, inline or as
    /// a TOML document with sections.
    #[test]
    fn structured_job_files(entries in toml_entries(), sections in any::<bool>()) {
        let text = if sections {
            let table: toml::Table = entries.iter().cloned().collect();
            toml::to_string(&table).expect("a table serialises")
        } else {
            inline_document(&entries)
        };
        check_entries(&entries, &text)?;
        check_parse(&text)?;
    }
}

proptest! {
    #![proptest_config(config(2000))]

    /// Random text, TOML-like or not.
    #[test]
    fn random_text(text in prop_oneof![toml_soup(), wild_string(), any::<String>()]) {
        check_parse(&text)?;
    }
}

proptest! {
    #![proptest_config(config(1000))]

    /// Random bytes through a file: invalid UTF-8 is an error naming the file; valid text gives
    /// what parsing the string gives, with the file named.
    #[test]
    fn random_files(bytes in prop_oneof![
        vec(any::<u8>(), 0..200),
        toml_soup().prop_map(String::into_bytes),
        (toml_soup(), vec(any::<u8>(), 1..4)).prop_map(|(s, b)| [s.into_bytes(), b].concat()),
    ]) {
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "segtrain-fuzz-{}-{}.toml",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, &bytes).expect("write a temp file");
        let got = JobSpecInput::from_file(&path);
        std::fs::remove_file(&path).expect("remove the temp file");
        let shown = path.display().to_string();
        match std::str::from_utf8(&bytes) {
            Err(_) => {
                let e = got.expect_err("invalid UTF-8 is rejected");
                prop_assert_eq!(&e.field, &shown);
                prop_assert!(e.message.starts_with("cannot read the job file"), "{}", e);
            }
            Ok(text) => {
                check_parse(text)?;
                match (JobSpecInput::from_toml_str(text), got) {
                    (Ok(a), Ok(b)) => prop_assert_eq!(values(&a), values(&b)),
                    (Err(a), Err(b)) => {
                        let field = if a.field == "job file" { shown.clone() } else { a.field };
                        prop_assert_eq!(b.field, field);
                        prop_assert_eq!(b.message, format!("{} (in {shown})", a.message));
                    }
                    (a, b) => prop_assert!(false, "string: {:?}, file: {:?}", a, b),
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(config(1500))]

    /// The printed template with one line changed.
    #[test]
    fn mutated_template(at in any::<Index>(), edit in edit()) {
        let template = template();
        let (lines, i) = apply(&template, at, &edit);
        let text = lines.join("\n") + "\n";
        check_parse(&text)?;

        // Edits whose outcome is known exactly.
        let original: Vec<&str> = template.lines().collect();
        let defaults = JobSpec::with_defaults("/data/cityscapes");
        let was_comment = original[i].starts_with('#') || original[i].is_empty();
        let resolved = JobSpecInput::from_toml_str(&text).and_then(JobSpecInput::resolve);
        match &edit {
            Edit::Delete | Edit::CommentOut | Edit::Duplicate if was_comment => {
                prop_assert_eq!(resolved, Ok(defaults));
            }
            Edit::Delete | Edit::CommentOut => {
                // A field line gone: its default, the template's value (but dataset_root has none).
                let field = original[i].split(" = ").next().unwrap_or_default();
                if field == "dataset_root" {
                    prop_assert_eq!(resolved.map_err(|e| e.field), Err(field.to_string()));
                } else {
                    prop_assert_eq!(resolved, Ok(defaults));
                }
            }
            Edit::Duplicate => {
                let field = original[i].split(" = ").next().unwrap_or_default();
                let e = JobSpecInput::from_toml_str(&text).expect_err("a duplicate key");
                prop_assert_eq!(e.field.as_str(), field, "{}", e);
                prop_assert!(e.message.contains("duplicate key"), "{}", e);
            }
            Edit::Uncomment if original[i].starts_with("# pretrained = ")
                || original[i].starts_with("# resume_from = ") => {
                let spec = resolved.expect("an uncommented example is valid");
                prop_assert!(spec.pretrained.is_some() || spec.resume_from.is_some());
            }
            Edit::SetValue(field, v) => {
                // Exactly the outcome of the same entries written plainly.
                let mut entries: Vec<(String, toml::Value)> =
                    toml::from_str::<toml::Table>(&template)
                        .expect("the template is TOML")
                        .into_iter()
                        .filter(|(k, _)| k != field)
                        .collect();
                entries.push((field.to_string(), v.clone()));
                check_entries(&entries, &text)?;
            }
            _ => {}
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Plain tests of the harness itself

#[test]
fn values_list_every_field_in_order() {
    let names: Vec<&str> = values(&JobSpecInput::default())
        .into_iter()
        .map(|(f, _)| f)
        .collect();
    assert_eq!(names, FIELDS);
}

#[test]
fn the_model_agrees_with_the_crate_on_the_defaults() {
    let input = JobSpecInput {
        dataset_root: Some("/data/cityscapes".to_string()),
        ..Default::default()
    };
    assert_eq!(
        input.clone().resolve(),
        Ok(JobSpec::with_defaults("/data/cityscapes"))
    );
    assert!(expected(&input, true).is_ok());
    assert_eq!(
        with_defaults_filled(&input),
        JobSpec::with_defaults("/data/cityscapes")
    );
    // And on the conditional default of sync_bn, both ways.
    for world_size in [1, 2, DEFAULT_WORLD_SIZE] {
        let input = JobSpecInput {
            world_size: Some(world_size),
            ..input.clone()
        };
        let got = input.clone().resolve().expect("valid");
        assert_eq!(got.sync_bn, world_size > 1);
        assert_eq!(with_defaults_filled(&input), got);
    }
}

#[test]
fn the_unmodified_template_parses_to_the_defaults() {
    let input = JobSpecInput::from_toml_str(&template()).expect("the template parses");
    assert_eq!(
        input.resolve(),
        Ok(JobSpec::with_defaults("/data/cityscapes"))
    );
}
