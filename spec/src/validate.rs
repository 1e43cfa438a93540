//! The rules of a valid spec, checked field by field in declaration order. Only the spec itself is
//! checked, never the file system: the coordinator cannot see the workers' disks.

use std::fmt::Display;

use crate::{JobSpec, SpecError};

/// Longest path or URI accepted (PATH_MAX on Linux).
const MAX_PATH_BYTES: usize = 4096;

/// Longest run, and longest interval, in iterations.
const MAX_ITERS: u64 = 100_000_000;

/// What a checkpoint or weights location may look like, for error messages.
const LOCATION_FORMS: &str =
    "an absolute path (/...), file:///absolute/path or gs://bucket[/prefix]";

pub(crate) fn validate(s: &JobSpec) -> Result<(), SpecError> {
    name("name", &s.name)?;
    in_range("priority", s.priority, -1000, 1000)?;
    // variant, precision and eval_mode are typed: any value they hold is valid.
    in_range("num_classes", s.num_classes, 1, 254)?;
    if let Some(p) = &s.pretrained {
        location("pretrained", p)?;
    }

    absolute_path("dataset_root", &s.dataset_root)?;
    crop("crop_height", s.crop_height)?;
    crop("crop_width", s.crop_width)?;
    in_range("loader_threads", s.loader_threads, 1, 256)?;

    in_range("world_size", s.world_size, 1, 1024)?;
    in_range("batch_per_gpu", s.batch_per_gpu, 1, 1024)?;
    in_range("accumulate_steps", s.accumulate_steps, 1, 1024)?;
    in_range("max_iters", s.max_iters, 1, MAX_ITERS)?;
    // TOML integers are signed 64-bit (and so is torch's seed): a larger seed could not be
    // written to a job file.
    if s.seed > i64::MAX as u64 {
        return Err(SpecError::new(
            "seed",
            format!(
                "must be in 0..={} (a signed 64-bit integer), got {}",
                i64::MAX,
                s.seed
            ),
        ));
    }

    float_in("base_lr", s.base_lr, Lower::Open(0.0), 1.0)?;
    // max_iters >= 1 here, so the subtraction cannot underflow.
    in_range_because(
        "warmup_iters",
        s.warmup_iters,
        0,
        s.max_iters - 1,
        "less than max_iters",
    )?;
    float_in("warmup_ratio", s.warmup_ratio, Lower::Open(0.0), 1.0)?;
    float_in("poly_power", s.poly_power, Lower::Open(0.0), 10.0)?;
    float_in("weight_decay", s.weight_decay, Lower::Closed(0.0), 1.0)?;
    float_in("head_lr_mult", s.head_lr_mult, Lower::Open(0.0), 1000.0)?;

    // An interval longer than the run is not a mistake: it means "only at the end" (the final
    // iteration always logs, evaluates and checkpoints).
    in_range("log_interval", s.log_interval, 1, MAX_ITERS)?;
    in_range_because(
        "eval_interval",
        s.eval_interval,
        0,
        MAX_ITERS,
        "0: only at the end",
    )?;
    in_range_because(
        "checkpoint_interval",
        s.checkpoint_interval,
        0,
        MAX_ITERS,
        "0: only at the end",
    )?;
    crop("eval_crop", s.eval_crop)?;
    in_range_because("eval_stride", s.eval_stride, 1, s.eval_crop, "eval_crop")?;

    if let Some(r) = &s.resume_from {
        location("resume_from", r)?;
    }
    in_range("max_restarts", s.max_restarts, 0, 100)?;
    elastic(s)?;
    in_range("elastic_wait_seconds", s.elastic_wait_seconds, 0, 86_400)?;
    in_range("keep_last", s.keep_last, 1, 1000)?;
    location("checkpoint_root", &s.checkpoint_root)?;
    Ok(())
}

/// `min_world_size` in 1..=world_size, and, when it allows a smaller world, at least one
/// smaller world size keeps the global batch (w ranks x batch_per_gpu x a whole accumulation).
fn elastic(s: &JobSpec) -> Result<(), SpecError> {
    in_range_because(
        "min_world_size",
        s.min_world_size,
        1,
        s.world_size,
        "world_size",
    )?;
    if s.min_world_size == s.world_size {
        return Ok(());
    }
    let sizes = s.elastic_world_sizes();
    if sizes.len() > 1 {
        return Ok(());
    }
    let micro_batches = u64::from(s.world_size) * u64::from(s.accumulate_steps);
    let divisors: Vec<String> = (1..=s.world_size)
        .filter(|w| micro_batches.is_multiple_of(u64::from(*w)))
        .map(|w| w.to_string())
        .collect();
    Err(SpecError::new(
        "min_world_size",
        format!(
            "got {0}, but no world size in {0}..{1} keeps the global batch: it must divide \
             world_size {1} x accumulate_steps {2} = {micro_batches} micro-batches of \
             batch_per_gpu images; world sizes that do: {3}",
            s.min_world_size,
            s.world_size,
            s.accumulate_steps,
            divisors.join(", ")
        ),
    ))
}

fn in_range<T: PartialOrd + Display>(field: &str, v: T, lo: T, hi: T) -> Result<(), SpecError> {
    within(field, v, lo, hi, String::new())
}

/// A range whose upper end comes from another field, named in `why` (e.g. "max_iters").
fn in_range_because<T: PartialOrd + Display>(
    field: &str,
    v: T,
    lo: T,
    hi: T,
    why: &str,
) -> Result<(), SpecError> {
    within(field, v, lo, hi, format!(" ({why})"))
}

fn within<T: PartialOrd + Display>(
    field: &str,
    v: T,
    lo: T,
    hi: T,
    why: String,
) -> Result<(), SpecError> {
    if lo <= v && v <= hi {
        Ok(())
    } else {
        Err(SpecError::new(
            field,
            format!("must be in {lo}..={hi}{why}, got {v}"),
        ))
    }
}

/// Crop sizes: the encoder downsamples by 32, so sizes must divide evenly.
fn crop(field: &str, v: u32) -> Result<(), SpecError> {
    if (32..=8192).contains(&v) && v.is_multiple_of(32) {
        Ok(())
    } else {
        Err(SpecError::new(
            field,
            format!("must be a multiple of 32 in 32..=8192, got {v}"),
        ))
    }
}

#[derive(Clone, Copy)]
enum Lower {
    Open(f64),
    Closed(f64),
}

/// A finite float in `(lo, hi]` or `[lo, hi]`.
fn float_in(field: &str, v: f64, lo: Lower, hi: f64) -> Result<(), SpecError> {
    let (above_lo, range) = match lo {
        Lower::Open(lo) => (v > lo, format!("({lo}, {hi}]")),
        Lower::Closed(lo) => (v >= lo, format!("[{lo}, {hi}]")),
    };
    if !v.is_finite() {
        Err(SpecError::new(
            field,
            format!(
                "must be a finite number in {range}, got {v} (NaN and infinities are not allowed)"
            ),
        ))
    } else if above_lo && v <= hi {
        Ok(())
    } else {
        Err(SpecError::new(
            field,
            format!("must be in {range}, got {v}"),
        ))
    }
}

fn name(field: &str, v: &str) -> Result<(), SpecError> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    let chars = v.chars().count();
    if (1..=128).contains(&chars) && v.chars().all(allowed) {
        Ok(())
    } else if chars > 128 {
        Err(SpecError::new(
            field,
            format!("must be 1..=128 characters from [A-Za-z0-9._-], got {chars} characters"),
        ))
    } else {
        Err(SpecError::new(
            field,
            format!("must be 1..=128 characters from [A-Za-z0-9._-], got {v:?}"),
        ))
    }
}

/// Checks shared by every path and URI: not empty, not too long, no NUL.
fn path_basics(field: &str, v: &str, what: &str) -> Result<(), SpecError> {
    if v.is_empty() {
        return Err(SpecError::new(field, format!("must be {what}, got \"\"")));
    }
    if v.len() > MAX_PATH_BYTES {
        return Err(SpecError::new(
            field,
            format!(
                "must be at most {MAX_PATH_BYTES} bytes, got {} bytes",
                v.len()
            ),
        ));
    }
    if v.contains('\0') {
        return Err(SpecError::new(
            field,
            format!("must not contain NUL bytes, got {v:?}"),
        ));
    }
    if v.chars().any(char::is_control) {
        return Err(SpecError::new(
            field,
            format!("must not contain control characters, got {v:?}"),
        ));
    }
    // A path says where it is: `/data/../etc` would escape any root it is checked against.
    if crate::location::has_dot_dot(v) {
        return Err(SpecError::new(
            field,
            format!("must not contain `..` segments, got {v:?}"),
        ));
    }
    Ok(())
}

/// A local absolute path (the dataset: read by the trainers from their own disks).
fn absolute_path(field: &str, v: &str) -> Result<(), SpecError> {
    let what = "a non-empty absolute path (starting with /)";
    path_basics(field, v, what)?;
    if v.starts_with('/') {
        Ok(())
    } else {
        Err(SpecError::new(field, format!("must be {what}, got {v:?}")))
    }
}

/// A path or URI for weights and checkpoints: `/abs`, `file:///abs` or `gs://bucket[/prefix]`.
fn location(field: &str, v: &str) -> Result<(), SpecError> {
    path_basics(field, v, LOCATION_FORMS)?;
    if v.starts_with('/') {
        return Ok(());
    }
    if let Some(path) = v.strip_prefix("file://") {
        // file:///abs has an empty host; file://host/... is not a local path.
        if path.starts_with('/') {
            return Ok(());
        }
    } else if let Some(rest) = v.strip_prefix("gs://") {
        let bucket = rest.split('/').next().unwrap_or_default();
        let bucket_ok = (3..=63).contains(&bucket.len())
            && bucket.chars().all(|c| {
                c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-')
            });
        if bucket_ok {
            return Ok(());
        }
        return Err(SpecError::new(
            field,
            format!(
                "must be {LOCATION_FORMS}, where a bucket is 3..=63 characters from [a-z0-9._-]; \
                 got bucket {bucket:?} in {v:?}"
            ),
        ));
    }
    Err(SpecError::new(
        field,
        format!("must be {LOCATION_FORMS}, got {v:?}"),
    ))
}
