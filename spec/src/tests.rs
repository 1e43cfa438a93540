use clap::{CommandFactory, Parser};

use super::*;

const ROOT: &str = "dataset_root = \"/data/cityscapes\"\n";

/// A spec that differs from the defaults in every field, so that a round trip which drops or
/// mixes up a field cannot pass by accident.
fn unusual_spec() -> JobSpec {
    JobSpec {
        name: "city_b2-run.7".to_string(),
        priority: -17,
        variant: Variant::B2,
        num_classes: 150,
        pretrained: Some("gs://my-weights/mit/mit_b2.safetensors".to_string()),
        dataset_root: "/mnt/data/ade \"20k\"".to_string(),
        crop_height: 512,
        crop_width: 640,
        loader_threads: 12,
        world_size: 4,
        batch_per_gpu: 2,
        accumulate_steps: 3,
        max_iters: 80_000,
        precision: Precision::Bf16,
        seed: i64::MAX as u64,
        sync_bn: false,
        base_lr: 1.2345678901234567e-4,
        warmup_iters: 0,
        warmup_ratio: 0.1,
        poly_power: 0.9,
        weight_decay: 0.0,
        head_lr_mult: 1000.0,
        log_interval: 80_000,
        eval_interval: 0,
        checkpoint_interval: 8000,
        eval_mode: EvalMode::Whole,
        eval_crop: 512,
        eval_stride: 341,
        resume_from: Some("file:///var/ckpt/iter_4000".to_string()),
        max_restarts: 0,
        min_world_size: 2,
        elastic_wait_seconds: 86_400,
        keep_last: 1000,
        keep_best: false,
        checkpoint_root: "gs://ckpt-bucket".to_string(),
    }
}

fn resolve_toml(text: &str) -> Result<JobSpec, SpecError> {
    JobSpecInput::from_toml_str(text)?.resolve()
}

/// The recipe's values as a job file that sets every field (`pretrained` and `resume_from` are
/// the unset paths).
const RECIPE: &str = r#"
name = "segformer"
priority = 0
variant = "b0"
num_classes = 19
pretrained = ""
dataset_root = "/data/cityscapes"
crop_height = 1024
crop_width = 1024
loader_threads = 4
world_size = 8
batch_per_gpu = 1
accumulate_steps = 1
max_iters = 160000
precision = "fp32"
seed = 0
sync_bn = true
base_lr = 6e-5
warmup_iters = 1500
warmup_ratio = 1e-6
poly_power = 1.0
weight_decay = 0.01
head_lr_mult = 10.0
log_interval = 50
eval_interval = 16000
checkpoint_interval = 4000
eval_mode = "slide"
eval_crop = 1024
eval_stride = 768
resume_from = ""
max_restarts = 3
min_world_size = 8
elastic_wait_seconds = 60
keep_last = 3
keep_best = true
checkpoint_root = "/var/lib/segtrain/checkpoints"
"#;

#[test]
fn defaults_are_the_cityscapes_recipe() {
    let input = JobSpecInput {
        dataset_root: Some("/data/cityscapes".to_string()),
        ..Default::default()
    };
    let spec = input.resolve().expect("defaults are valid");
    // Equal only if every default is the recipe's.
    let expected = resolve_toml(RECIPE).expect("the recipe is a valid job file");
    // It names every field, so a new field's default is pinned here too.
    let keys: Vec<String> = toml::from_str::<toml::Table>(RECIPE)
        .expect("parses")
        .keys()
        .cloned()
        .collect();
    assert_eq!(keys.len(), FIELDS.len(), "{keys:?}");

    assert_eq!(spec, expected);
    assert_eq!(spec.global_batch(), 8);
}

#[test]
fn template_parses_to_the_defaults() {
    let text = template();
    let spec = resolve_toml(&text).expect("the template resolves");
    assert_eq!(spec, JobSpec::with_defaults("/data/cityscapes"));
    assert!(
        text.starts_with('#'),
        "the template starts with a header comment"
    );
}

#[test]
fn template_mentions_every_field() {
    let text = template();
    for field in FIELDS {
        let set = text.lines().any(|l| l.starts_with(&format!("{field} = ")));
        let commented = text
            .lines()
            .any(|l| l.starts_with(&format!("# {field} = ")));
        assert!(
            set || commented,
            "{field} missing from the template:\n{text}"
        );
    }
    // Optional paths with no default appear commented out; the required root is set.
    assert!(text.contains("# pretrained = \"/path/mit_b0.safetensors\"\n"));
    assert!(text.lines().any(|l| l.starts_with("# resume_from = ")));
    assert!(text.contains("\ndataset_root = \"/data/cityscapes\"\n"));
    assert!(text.contains("# Model variant: b0..b5"));
    assert!(text.contains("\nvariant = \"b0\"\n"));
    assert!(text.contains("\nbase_lr = 6e-5\n"), "{text}");
    assert!(
        text.lines().all(|l| l.len() <= 100),
        "lines wrap at 100 columns"
    );
    // Every field line is preceded by its comment.
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        if FIELDS.iter().any(|f| line.starts_with(&format!("{f} = "))) {
            assert!(
                i > 0 && lines[i - 1].starts_with("# "),
                "no comment above {line:?}"
            );
        }
    }
}

#[test]
fn fields_constant_matches_the_types() {
    // The documentation table lists the same fields in the same order.
    assert_eq!(template::documented_fields(), FIELDS);
    // The JSON form of a full spec has exactly these keys.
    let json = serde_json::to_value(unusual_spec()).expect("serialises");
    let mut keys: Vec<&str> = json
        .as_object()
        .expect("an object")
        .keys()
        .map(|k| k.as_str())
        .collect();
    let mut fields = FIELDS.to_vec();
    keys.sort_unstable();
    fields.sort_unstable();
    assert_eq!(keys, fields);
    // Serialising a full input writes the fields in declaration order.
    let toml_text = toml::to_string(&JobSpecInput::from(unusual_spec())).expect("serialises");
    let keys: Vec<&str> = toml_text
        .lines()
        .filter_map(|l| l.split(" = ").next())
        .collect();
    assert_eq!(keys, FIELDS);
}

#[test]
fn empty_paths_mean_none() {
    // In a job file; the same in a request: proto/tests/job_spec.rs.
    let spec =
        resolve_toml(&format!("{ROOT}pretrained = \"\"\nresume_from = \"\"\n")).expect("valid");
    assert_eq!((spec.pretrained, spec.resume_from), (None, None));
}

#[test]
fn toml_round_trip() {
    // Floats at the edges of what decimal text must carry exactly.
    let extreme = JobSpec {
        base_lr: 1.0 - f64::EPSILON / 2.0,
        warmup_ratio: 5e-324,
        poly_power: 9.999999999999998,
        weight_decay: 1e-300,
        head_lr_mult: 0.1 + 0.2,
        name: "x".repeat(128),
        checkpoint_root: "/with 'and' \"quotes\" \\ back slash and ü".to_string(),
        ..JobSpec::with_defaults("/d")
    };
    for spec in [
        JobSpec::with_defaults("/data/cityscapes"),
        unusual_spec(),
        extreme,
    ] {
        let text = spec.to_toml();
        assert_eq!(resolve_toml(&text), Ok(spec.clone()), "job file:\n{text}");
    }
    // Unset optional paths are left out rather than written empty.
    let text = JobSpec::with_defaults("/d").to_toml();
    assert!(
        !text.contains("pretrained") && !text.contains("resume_from"),
        "{text}"
    );
}

#[test]
fn json_round_trip() {
    let spec = unusual_spec();
    let json = serde_json::to_string(&spec).expect("serialises");
    assert!(
        json.contains("\"variant\":\"b2\"") && json.contains("\"precision\":\"bf16\""),
        "{json}"
    );
    assert!(json.contains("\"eval_mode\":\"whole\""), "{json}");
    let back: JobSpec = serde_json::from_str(&json).expect("parses");
    assert_eq!(back, spec);
}

#[test]
fn overlay_prefers_the_overlay() {
    let base = JobSpecInput {
        name: Some("from-file".to_string()),
        max_iters: Some(1000),
        dataset_root: Some("/data/a".to_string()),
        keep_best: Some(true),
        ..Default::default()
    };
    let over = JobSpecInput {
        max_iters: Some(2000),
        keep_best: Some(false),
        variant: Some("b5".to_string()),
        ..Default::default()
    };
    let merged = base.overlay(over);
    let expected = JobSpecInput {
        name: Some("from-file".to_string()),
        max_iters: Some(2000),
        dataset_root: Some("/data/a".to_string()),
        keep_best: Some(false),
        variant: Some("b5".to_string()),
        ..Default::default()
    };
    assert_eq!(merged, expected);

    // Every field of the overlay wins, and an empty overlay keeps every field.
    let full = JobSpecInput::from(unusual_spec());
    let defaults = JobSpecInput::from(JobSpec::with_defaults("/d"));
    assert_eq!(defaults.clone().overlay(full.clone()), full);
    assert_eq!(full.clone().overlay(JobSpecInput::default()), full);
    assert_eq!(JobSpecInput::default().overlay(defaults.clone()), defaults);
}

#[test]
fn invalid_specs_name_their_field() {
    let long_name = format!("name = \"{}\"\n", "a".repeat(129));
    let long_path = format!("resume_from = \"/{}\"\n", "p".repeat(4096));
    let cases: Vec<(String, &str)> = vec![
        // TOML level: unknown keys, wrong types, out-of-type-range integers.
        ("bogus = 1\n".into(), "bogus"),
        ("crop-height = 512\n".into(), "crop-height"),
        ("[model]\nvariant = \"b1\"\n".into(), "model"),
        ("crop_height = \"big\"\n".into(), "crop_height"),
        ("keep_best = \"yes\"\n".into(), "keep_best"),
        ("sync_bn = \"yes\"\n".into(), "sync_bn"),
        ("seed = -1\n".into(), "seed"),
        ("crop_width = 5000000000\n".into(), "crop_width"),
        ("base_lr = \"fast\"\n".into(), "base_lr"),
        // Value rules, in field order.
        ("name = \"has space\"\n".into(), "name"),
        ("name = \"\"\n".into(), "name"),
        (long_name, "name"),
        ("priority = 1001\n".into(), "priority"),
        ("priority = -1001\n".into(), "priority"),
        ("variant = \"b9\"\n".into(), "variant"),
        ("variant = \"B0\"\n".into(), "variant"),
        ("num_classes = 0\n".into(), "num_classes"),
        ("num_classes = 255\n".into(), "num_classes"),
        (
            "pretrained = \"http://example.com/w.safetensors\"\n".into(),
            "pretrained",
        ),
        (
            "pretrained = \"weights/mit_b0.safetensors\"\n".into(),
            "pretrained",
        ),
        ("crop_height = 100\n".into(), "crop_height"),
        ("crop_width = 8224\n".into(), "crop_width"),
        ("crop_width = 0\n".into(), "crop_width"),
        ("loader_threads = 0\n".into(), "loader_threads"),
        ("world_size = 1025\n".into(), "world_size"),
        ("batch_per_gpu = 0\n".into(), "batch_per_gpu"),
        ("accumulate_steps = 1025\n".into(), "accumulate_steps"),
        ("max_iters = 0\n".into(), "max_iters"),
        ("max_iters = 100000001\n".into(), "max_iters"),
        ("precision = \"fp16\"\n".into(), "precision"),
        (
            "seed = 9223372036854775807\nbase_lr = nan\n".into(),
            "base_lr",
        ),
        ("base_lr = nan\n".into(), "base_lr"),
        ("base_lr = inf\n".into(), "base_lr"),
        ("base_lr = 0.0\n".into(), "base_lr"),
        ("base_lr = 1.5\n".into(), "base_lr"),
        (
            "max_iters = 100\nwarmup_iters = 100\n".into(),
            "warmup_iters",
        ),
        ("warmup_ratio = 0.0\n".into(), "warmup_ratio"),
        ("poly_power = 10.5\n".into(), "poly_power"),
        ("weight_decay = -0.1\n".into(), "weight_decay"),
        ("weight_decay = -inf\n".into(), "weight_decay"),
        ("head_lr_mult = 1001\n".into(), "head_lr_mult"),
        ("log_interval = 0\n".into(), "log_interval"),
        ("log_interval = 100000001\n".into(), "log_interval"),
        ("eval_interval = 100000001\n".into(), "eval_interval"),
        (
            "checkpoint_interval = 200000000\n".into(),
            "checkpoint_interval",
        ),
        ("eval_mode = \"full\"\n".into(), "eval_mode"),
        ("eval_crop = 1000\n".into(), "eval_crop"),
        ("eval_stride = 1025\n".into(), "eval_stride"),
        ("eval_crop = 512\neval_stride = 768\n".into(), "eval_stride"),
        ("eval_stride = 0\n".into(), "eval_stride"),
        ("resume_from = \"s3://bucket/ckpt\"\n".into(), "resume_from"),
        ("resume_from = \"ckpt/iter_4000\"\n".into(), "resume_from"),
        (long_path, "resume_from"),
        ("max_restarts = 101\n".into(), "max_restarts"),
        ("min_world_size = 0\n".into(), "min_world_size"),
        (
            "world_size = 2\nmin_world_size = 3\n".into(),
            "min_world_size",
        ),
        (
            "world_size = 4\nmin_world_size = 3\n".into(),
            "min_world_size",
        ),
        (
            "elastic_wait_seconds = 86401\n".into(),
            "elastic_wait_seconds",
        ),
        ("keep_last = 0\n".into(), "keep_last"),
        ("keep_last = 1001\n".into(), "keep_last"),
        (
            "checkpoint_root = \"checkpoints\"\n".into(),
            "checkpoint_root",
        ),
        ("checkpoint_root = \"\"\n".into(), "checkpoint_root"),
        (
            "checkpoint_root = \"gs://ab/x\"\n".into(),
            "checkpoint_root",
        ),
        (
            "checkpoint_root = \"gs://My-Bucket/x\"\n".into(),
            "checkpoint_root",
        ),
        (
            "checkpoint_root = \"gs:///prefix\"\n".into(),
            "checkpoint_root",
        ),
        (
            "checkpoint_root = \"file://host/ckpt\"\n".into(),
            "checkpoint_root",
        ),
        (
            "checkpoint_root = \"s3://bucket/ckpt\"\n".into(),
            "checkpoint_root",
        ),
        (
            "checkpoint_root = \"/ckpt\\u0000x\"\n".into(),
            "checkpoint_root",
        ),
        // The first problem in field order wins, whichever stage finds it.
        ("priority = 5000\nvariant = \"b9\"\n".into(), "priority"),
        ("variant = \"b9\"\ncrop_height = 7\n".into(), "variant"),
        ("name = \"bad name\"\neval_mode = \"x\"\n".into(), "name"),
        ("eval_mode = \"x\"\nkeep_last = 0\n".into(), "eval_mode"),
    ];
    for (body, field) in &cases {
        let text = format!("{ROOT}{body}");
        let err = resolve_toml(&text).expect_err(&format!("accepted:\n{text}"));
        assert_eq!(err.field, *field, "for:\n{text}\ngot: {err}");
        assert!(!err.message.is_empty());
    }

    // Cases that need their own dataset_root line.
    let root_cases = [
        ("name = \"x\"\n", "dataset_root"),
        ("dataset_root = \"data/cityscapes\"\n", "dataset_root"),
        ("dataset_root = \"\"\n", "dataset_root"),
        (
            "dataset_root = \"gs://bucket/cityscapes\"\n",
            "dataset_root",
        ),
        ("dataset_root = \"/data\\u0000x\"\n", "dataset_root"),
        ("name = \"bad name\"\n", "name"), // no dataset_root either, but name comes first
        ("keep_last = 0\n", "dataset_root"),
    ];
    for (text, field) in root_cases {
        let err = resolve_toml(text).expect_err(&format!("accepted:\n{text}"));
        assert_eq!(err.field, field, "for:\n{text}\ngot: {err}");
    }
    assert!(cases.len() + root_cases.len() >= 20);
}

#[test]
fn error_messages_give_range_and_value() {
    let msg = |body: &str| {
        resolve_toml(&format!("{ROOT}{body}"))
            .unwrap_err()
            .to_string()
    };
    assert_eq!(
        msg("crop_height = 100"),
        "crop_height: must be a multiple of 32 in 32..=8192, got 100"
    );
    assert_eq!(
        msg("variant = \"b9\""),
        "variant: must be one of b0, b1, b2, b3, b4, b5, got \"b9\""
    );
    assert_eq!(
        msg("precision = \"fp16\""),
        "precision: must be one of fp32, bf16, got \"fp16\""
    );
    assert_eq!(
        msg("eval_mode = \"full\""),
        "eval_mode: must be one of slide, whole, got \"full\""
    );
    assert_eq!(
        msg("num_classes = 300"),
        "num_classes: must be in 1..=254, got 300"
    );
    assert_eq!(
        msg("warmup_iters = 160000"),
        "warmup_iters: must be in 0..=159999 (less than max_iters), got 160000"
    );
    assert_eq!(
        msg("eval_stride = 2000"),
        "eval_stride: must be in 1..=1024 (eval_crop), got 2000"
    );
    assert_eq!(msg("base_lr = 2.0"), "base_lr: must be in (0, 1], got 2");
    let nan = msg("base_lr = nan");
    assert!(nan.contains("finite") && nan.contains("NaN"), "{nan}");
    let inf = msg("head_lr_mult = inf");
    assert!(inf.contains("finite") && inf.contains("inf"), "{inf}");
    let s3 = msg("checkpoint_root = \"s3://b/x\"");
    for form in ["absolute path", "file:///", "gs://bucket", "s3://b/x"] {
        assert!(s3.contains(form), "{s3} should mention {form}");
    }
    let bucket = msg("checkpoint_root = \"gs://ab/x\"");
    assert!(
        bucket.contains("3..=63") && bucket.contains("\"ab\""),
        "{bucket}"
    );
    let missing = resolve_toml("").unwrap_err();
    assert_eq!(
        missing.to_string(),
        "dataset_root: required: the dataset root, an absolute path"
    );
}

#[test]
fn toml_errors_name_the_key() {
    let err = JobSpecInput::from_toml_str("crop_heigth = 512\nalso_bad = 1\n").unwrap_err();
    assert!(
        ["crop_heigth", "also_bad"].contains(&err.field.as_str()),
        "{err}"
    );
    let err = JobSpecInput::from_toml_str("crop_heigth = 512\n").unwrap_err();
    assert_eq!(err.field, "crop_heigth");
    assert!(err.message.contains("did you mean `crop_height`"), "{err}");
    // Nothing else is listed: the message does not mention other keys or problems.
    assert!(!err.message.contains("priority"), "{err}");

    let err = JobSpecInput::from_toml_str("max_iters = 1.5\n").unwrap_err();
    assert_eq!(err.field, "max_iters");
    assert!(
        err.message.contains("float") || err.message.contains("u64"),
        "{err}"
    );

    // Syntax errors give line and column, and name the field when they are in its value.
    let err = JobSpecInput::from_toml_str("name = \"a\"\nmax_iters = \n").unwrap_err();
    assert_eq!(err.field, "max_iters");
    assert!(err.message.contains("line 2"), "{err}");
    let err = JobSpecInput::from_toml_str("name = segformer\n").unwrap_err();
    assert_eq!(err.field, "name");
    let err = JobSpecInput::from_toml_str("seed = 9223372036854775808\n").unwrap_err();
    assert_eq!(err.field, "seed");
    let err = JobSpecInput::from_toml_str("name = \"a\"\n[[oops\n").unwrap_err();
    assert_eq!(err.field, "job file");
    assert!(err.message.starts_with("invalid TOML at line 2"), "{err}");
}

#[test]
fn unknown_key_hints_allow_two_edits() {
    let hint = |key: &str| {
        let err = JobSpecInput::from_toml_str(&format!("{key} = 1\n")).unwrap_err();
        assert_eq!(err.field, key);
        err.message.contains("did you mean `seed`")
    };
    assert!(hint("sed") && hint("se") && hint("seedxy") && hint("SEED-"));
    assert!(!hint("s") && !hint("seedxyz"));
    // A huge key gets no hint (and costs no edit distance: the fuzz test took seconds on these).
    let key = format!("\"{}\"", "k".repeat(100_000));
    let err = JobSpecInput::from_toml_str(&format!("{key} = 1\n")).unwrap_err();
    assert!(
        err.message.starts_with("unknown field ("),
        "{}",
        err.message
    );
}

/// Regression (found by `tests/fuzz.rs`): serde read a TOML date or time as its text, so an
/// unquoted `name = 1979-05-27` was accepted as the name "1979-05-27".
#[test]
fn toml_dates_and_times_are_not_strings() {
    for (text, field) in [
        ("name = 1979-05-27\n", "name"),
        ("dataset_root = 07:32:00\n", "dataset_root"),
        ("precision = 1979-05-27T07:32:00Z\n", "precision"),
        (
            "checkpoint_root = 1979-05-27T07:32:00.5-07:00\n",
            "checkpoint_root",
        ),
        ("seed = 1979-05-27\n", "seed"),
    ] {
        let err = JobSpecInput::from_toml_str(text).expect_err(text);
        assert_eq!(err.field, field, "{err}");
        assert!(err.message.contains("date/time"), "{err}");
    }
    let err = JobSpecInput::from_toml_str("name = 1979-05-27\n").unwrap_err();
    assert_eq!(
        err.to_string(),
        "name: invalid type: TOML date/time 1979-05-27; no field is a date or a time \
         (write \"1979-05-27\" if a string is meant)"
    );
    // Quoted, it is a string (and a valid name).
    let input = JobSpecInput::from_toml_str("name = \"1979-05-27\"\n").expect("parses");
    assert_eq!(input.name.as_deref(), Some("1979-05-27"));
}

#[test]
fn valid_locations_are_accepted() {
    for loc in [
        "/abs/path",
        "file:///abs/path",
        "gs://my-bucket",
        "gs://my-bucket/",
        "gs://my.bucket_1/some/prefix",
        "gs://abc/x",
    ] {
        let text = format!(
            "{ROOT}checkpoint_root = {loc:?}\npretrained = {loc:?}\nresume_from = {loc:?}\n"
        );
        let spec = resolve_toml(&text).unwrap_or_else(|e| panic!("{loc} rejected: {e}"));
        assert_eq!(spec.checkpoint_root, loc);
        assert_eq!(spec.pretrained.as_deref(), Some(loc));
    }
    // Integer-valued floats, bf16 and the boundaries of the ranges are fine.
    let text = format!(
        "{ROOT}base_lr = 1\nweight_decay = 0\nhead_lr_mult = 1000\nprecision = \"bf16\"\n\
         max_iters = 1\nwarmup_iters = 0\nlog_interval = 1\neval_interval = 1\ncheckpoint_interval = 0\neval_crop = 32\n\
         eval_stride = 32\ncrop_height = 8192\npriority = -1000\nname = \"{}\"\n",
        "x".repeat(128)
    );
    let spec = resolve_toml(&text).unwrap_or_else(|e| panic!("rejected: {e}"));
    assert_eq!(spec.base_lr, 1.0);
    assert_eq!(spec.precision, Precision::Bf16);
}

#[test]
fn validate_checks_a_directly_built_spec() {
    let mut spec = JobSpec::with_defaults("/d");
    assert_eq!(spec.validate(), Ok(()));
    spec.seed = u64::MAX;
    assert_eq!(spec.validate().unwrap_err().field, "seed");
    spec.seed = 0;
    spec.pretrained = Some(String::new());
    assert_eq!(spec.validate().unwrap_err().field, "pretrained");
    spec.pretrained = None;
    spec.dataset_root = String::new();
    assert_eq!(spec.validate().unwrap_err().field, "dataset_root");
}

#[test]
fn enums_parse_and_display() {
    for v in Variant::ALL {
        assert_eq!(v.to_string().parse::<Variant>(), Ok(*v));
    }
    assert_eq!("b4".parse::<Variant>(), Ok(Variant::B4));
    assert_eq!(Variant::B5.to_string(), "b5");
    assert_eq!("bf16".parse::<Precision>(), Ok(Precision::Bf16));
    assert_eq!("whole".parse::<EvalMode>(), Ok(EvalMode::Whole));
    assert_eq!("Slide".parse::<EvalMode>().unwrap_err().field, "eval_mode");
}

/// A command embedding the spec flags, as the CLI does.
#[derive(Parser, Debug)]
struct Cli {
    #[command(flatten)]
    spec: JobSpecInput,
}

#[test]
fn cli_flags() {
    let cli = Cli::try_parse_from([
        "segtrain",
        "--dataset-root",
        "/data/x",
        "--crop-height",
        "512",
        "--keep-best",
        "false",
        "--sync-bn",
        "false",
        "--variant",
        "b9",
        "--priority",
        "-5",
        "--base-lr",
        "1e-4",
    ])
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cli.spec.dataset_root.as_deref(), Some("/data/x"));
    assert_eq!(cli.spec.crop_height, Some(512));
    assert_eq!(cli.spec.keep_best, Some(false));
    assert_eq!(cli.spec.sync_bn, Some(false));
    assert_eq!(cli.spec.priority, Some(-5));
    assert_eq!(cli.spec.base_lr, Some(1e-4));
    assert_eq!(cli.spec.name, None);
    // A bad enum value gets through the parser and is reported by resolve, naming the field.
    assert_eq!(cli.spec.resolve().unwrap_err().field, "variant");

    assert!(Cli::try_parse_from(["segtrain", "--keep-best", "maybe"]).is_err());
    assert!(Cli::try_parse_from(["segtrain", "--sync-bn", "yes"]).is_err());
    assert!(Cli::try_parse_from(["segtrain", "--crop_height", "512"]).is_err());
}

#[test]
fn every_field_has_a_documented_flag() {
    let cmd = Cli::command();
    for field in FIELDS {
        let long = field.replace('_', "-");
        let arg = cmd
            .get_arguments()
            .find(|a| a.get_long() == Some(long.as_str()))
            .unwrap_or_else(|| panic!("no --{long}"));
        let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
        assert!(
            !help.is_empty() && !help.contains('\n'),
            "--{long}: {help:?}"
        );
        let has_default = !matches!(*field, "dataset_root" | "pretrained" | "resume_from");
        assert_eq!(help.contains("[default: "), has_default, "--{long}: {help}");
    }
    let help = |name: &str| {
        cmd.get_arguments()
            .find(|a| a.get_long() == Some(name))
            .and_then(|a| a.get_help())
            .map(|h| h.to_string())
            .unwrap_or_default()
    };
    assert!(
        help("crop-height").contains("32..=8192")
            && help("crop-height").ends_with("[default: 1024]")
    );
    assert!(
        help("variant").ends_with("[default: b0]"),
        "{}",
        help("variant")
    );
    assert!(
        help("base-lr").ends_with("[default: 6e-5]"),
        "{}",
        help("base-lr")
    );
    // The conditional default is stated as such, not as its value for the default 8 ranks.
    assert!(
        help("sync-bn").ends_with("[default: world_size > 1]"),
        "{}",
        help("sync-bn")
    );
    assert!(
        help("eval-interval").ends_with("[default: 16000]"),
        "{}",
        help("eval-interval")
    );
}

#[test]
fn from_file_reads_and_names_the_path() {
    let dir = std::env::temp_dir();
    let missing = dir.join(format!("segtrain-spec-missing-{}.toml", std::process::id()));
    let err = JobSpecInput::from_file(&missing).unwrap_err();
    assert_eq!(err.field, missing.display().to_string());
    assert!(err.to_string().contains(&missing.display().to_string()));

    let path = dir.join(format!("segtrain-spec-test-{}.toml", std::process::id()));
    std::fs::write(&path, format!("{ROOT}max_iters = 1234\n")).expect("write temp file");
    let read = JobSpecInput::from_file(&path);
    std::fs::write(&path, "max_iterz = 1\n").expect("write temp file");
    let bad = JobSpecInput::from_file(&path);
    std::fs::remove_file(&path).expect("remove temp file");

    let input = read.expect("reads");
    assert_eq!(input.max_iters, Some(1234));
    assert_eq!(input.dataset_root.as_deref(), Some("/data/cityscapes"));
    let bad = bad.unwrap_err();
    assert_eq!(bad.field, "max_iterz");
    assert!(bad.message.contains(&path.display().to_string()), "{bad}");
}

#[test]
fn sync_bn_defaults_to_on_for_more_than_one_rank() {
    let resolve = |body: &str| resolve_toml(&format!("{ROOT}{body}")).expect("valid");
    // Unset: world_size > 1, whichever way world_size is given (or left at its default of 8).
    assert!(!resolve("world_size = 1\n").sync_bn);
    assert!(resolve("world_size = 2\n").sync_bn);
    assert!(resolve("").sync_bn);
    // Given: kept, also where it changes nothing (one rank).
    assert!(!resolve("world_size = 8\nsync_bn = false\n").sync_bn);
    assert!(resolve("world_size = 1\nsync_bn = true\n").sync_bn);
    // The same through flags: unset stays unset until resolve (the proto: proto/tests/job_spec.rs).
    let input = JobSpecInput::from_toml_str(&format!("{ROOT}world_size = 1\n")).expect("parses");
    let flags = JobSpecInput {
        world_size: Some(2),
        ..Default::default()
    };
    assert!(input.overlay(flags).resolve().expect("valid").sync_bn);
    // The resolved value is explicit in a job file written from the spec.
    let one = resolve("world_size = 1\n");
    assert!(one.to_toml().contains("\nsync_bn = false\n"));

    // A value that is not a boolean is an error naming the field.
    let err = resolve_toml(&format!("{ROOT}sync_bn = \"yes\"\n")).unwrap_err();
    assert_eq!(err.field, "sync_bn", "{err}");
    let err = resolve_toml(&format!("{ROOT}sync_bn = 1\n")).unwrap_err();
    assert_eq!(err.field, "sync_bn", "{err}");
}

#[test]
fn specs_stored_before_sync_bn_read_as_plain_bn() {
    let mut json = serde_json::to_value(JobSpec::with_defaults("/d")).expect("serialises");
    json.as_object_mut()
        .expect("an object")
        .remove("sync_bn")
        .expect("the field is written");
    let old: JobSpec = serde_json::from_value(json).expect("an old spec still reads");
    assert!(!old.sync_bn, "the behaviour it was submitted with");
    assert_eq!(
        old,
        JobSpec {
            sync_bn: false,
            ..JobSpec::with_defaults("/d")
        }
    );
}

#[test]
fn warnings_flag_random_init_for_full_runs_only() {
    let full = JobSpec::with_defaults("/d");
    assert_eq!(full.pretrained, None);
    let w = full.warnings();
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(
        w[0].starts_with("no pretrained weights: training from random initialisation")
            && w[0].contains("ImageNet-1k MiT")
            && w[0].contains("spec.pretrained"),
        "{}",
        w[0]
    );
    // At the threshold it warns; below it (a smoke test) or with weights it does not.
    let at = JobSpec {
        max_iters: FULL_RUN_ITERS,
        ..full.clone()
    };
    assert_eq!(at.warnings(), w);
    let short = JobSpec {
        max_iters: FULL_RUN_ITERS - 1,
        ..full.clone()
    };
    assert!(short.warnings().is_empty());
    let pretrained = JobSpec {
        pretrained: Some("/w/mit_b0.safetensors".to_string()),
        ..full
    };
    assert!(pretrained.warnings().is_empty());
}

#[test]
fn elastic_world_sizes_keep_the_global_batch() {
    let spec = |text: &str| resolve_toml(&format!("{ROOT}{text}"));
    // Unset: never smaller than world_size.
    let rigid = spec("world_size = 4\n").expect("valid");
    assert_eq!(rigid.min_world_size, 4);
    assert_eq!(rigid.elastic_wait_seconds, 60);
    assert_eq!(rigid.elastic_world_sizes(), [4]);

    let s = spec("world_size = 4\naccumulate_steps = 3\nmin_world_size = 2\nsync_bn = false\n")
        .expect("valid");
    // 12 micro-batches: 4 x 3, 3 x 4 or 2 x 6.
    assert_eq!(s.elastic_world_sizes(), [4, 3, 2]);
    assert_eq!(s.accumulate_steps_at(3), Some(4));
    assert_eq!(s.accumulate_steps_at(2), Some(6));
    assert_eq!(s.accumulate_steps_at(5), None);
    assert!(
        !s.warnings().iter().any(|m| m.contains("sync_bn")),
        "{:?}",
        s.warnings()
    );

    // No world size in 3..4 divides 4 micro-batches: refused, naming the fields and the sizes
    // that would work.
    let e = spec("world_size = 4\nmin_world_size = 3\n").expect_err("impossible");
    assert_eq!(e.field, "min_world_size");
    for part in [
        "world_size 4",
        "accumulate_steps 1",
        "world sizes that do: 1, 2, 4",
    ] {
        assert!(e.message.contains(part), "{e}");
    }
    let e = spec("world_size = 2\nmin_world_size = 3\n").expect_err("above world_size");
    assert!(e.message.contains("1..=2 (world_size)"), "{e}");

    // SyncBN (the default for more than one rank) cannot continue the exact trajectory at a
    // smaller world size: allowed, with a warning.
    let w = spec("world_size = 2\nmin_world_size = 1\n").expect("valid");
    assert!(w.sync_bn);
    assert!(
        w.warnings()
            .iter()
            .any(|m| m.contains("sync_bn with min_world_size 1")),
        "{:?}",
        w.warnings()
    );
}
