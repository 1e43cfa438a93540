//! The trainer end to end through `segtrain-worker train`, on the synthetic Cityscapes-layout
//! dataset: exact resume across processes, learning, checkpoint retention and integrity.

use segtrain_trainer::data::cityscapes;
use segtrain_trainer::data::loader::eval_samples;
use segtrain_trainer::model::{weights, SegFormer, SegFormerConfig};
use segtrain_trainer::train::checkpoint;
use segtrain_trainer::train::eval::{accumulate, EvalConfig};
use std::path::{Path, PathBuf};
use std::process::Command;
use tch::{nn, Device};

fn worker(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_segtrain-worker"))
        .args(args)
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("run segtrain-worker")
}

fn ok(out: std::process::Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "failed: {err}");
    String::from_utf8_lossy(&out.stdout).into_owned() + &err
}

fn synth(dir: &Path, train: usize, val: usize, size: &str) {
    ok(worker(&[
        "synth-data",
        "--out",
        dir.to_str().expect("utf-8"),
        "--train",
        &train.to_string(),
        "--val",
        &val.to_string(),
        "--size",
        size,
        "--seed",
        "5",
    ]));
}

fn job_file(dir: &Path, body: &str) -> String {
    let path = dir.join("job.toml");
    std::fs::write(&path, body).expect("write job file");
    path.to_str().expect("utf-8").to_string()
}

/// A temp dir with synthetic data (`train`, `val` images of `size`) in `data` and a job file
/// on it: `name`, the dataset root, one rank at 64x64 crops, then `settings` (TOML lines).
/// Every training test starts from these.
fn synth_job(
    (train, val, size): (usize, usize, &str),
    name: &str,
    settings: &str,
) -> (tempfile::TempDir, PathBuf, String) {
    let tmp = tempfile::tempdir().expect("temp dir");
    let data = tmp.path().join("data");
    synth(&data, train, val, size);
    let body = format!(
        "name = \"{name}\"\ndataset_root = \"{}\"\nworld_size = 1\ncrop_height = 64\ncrop_width = 64\n\
         {settings}",
        data.display()
    );
    let config = job_file(tmp.path(), &body);
    (tmp, data, config)
}

/// `segtrain-worker train --config CONFIG --checkpoint-dir CKPTS EXTRA...`.
fn train(config: &str, ckpts: &Path, extra: &[&str]) -> std::process::Output {
    let ckpts = ckpts.to_str().expect("utf-8");
    let args = ["train", "--config", config, "--checkpoint-dir", ckpts];
    worker(&[&args[..], extra].concat())
}

/// Asserts that `out` failed and that its stderr names every one of `needles`.
fn assert_failed_naming(out: &std::process::Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    for needle in needles {
        assert!(err.contains(needle), "{needle}: {err}");
    }
}

fn file_digests(dir: &Path) -> Vec<(String, String)> {
    let m = checkpoint::read_manifest(dir).expect("manifest");
    m.files.into_iter().map(|f| (f.name, f.sha256)).collect()
}

#[test]
fn resume_continues_bit_for_bit_in_a_fresh_process() {
    let settings = "batch_per_gpu = 2\naccumulate_steps = 2\nmax_iters = 6\nwarmup_iters = 2\nlog_interval = 1\n\
         eval_interval = 3\ncheckpoint_interval = 3\neval_mode = \"whole\"\nloader_threads = 2\nseed = 11\n";
    let (tmp, _, config) = synth_job((8, 2, "128x64"), "resume", settings);
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    // N iterations straight.
    ok(train(&config, &a, &[]));
    // k iterations, stop; a fresh process resumes for N - k more.
    ok(train(&config, &b, &["--stop-at", "3"]));
    assert!(!b.join(checkpoint::dir_name(6)).exists());
    let k = b.join(checkpoint::dir_name(3));
    let log = ok(train(
        &config,
        &b,
        &["--resume-from", k.to_str().expect("utf-8")],
    ));
    assert!(log.contains("resumed from"), "{log}");

    let (fa, fb) = (
        file_digests(&a.join(checkpoint::dir_name(6))),
        file_digests(&b.join(checkpoint::dir_name(6))),
    );
    assert_eq!(
        fa, fb,
        "parameters and optimizer state identical bit for bit"
    );
    let (ma, mb) = (
        checkpoint::read_manifest(&a.join(checkpoint::dir_name(6))).expect("a"),
        checkpoint::read_manifest(&b.join(checkpoint::dir_name(6))).expect("b"),
    );
    assert_eq!(ma.sampler, mb.sampler);
    assert_eq!(ma.optimizer_steps, 6);
    assert_eq!(mb.optimizer_steps, 6);
    assert_eq!(
        ma.metrics.get("loss"),
        mb.metrics.get("loss"),
        "same last loss"
    );
    assert_eq!(
        ma.metrics.get("miou"),
        mb.metrics.get("miou"),
        "same evaluation"
    );
}

/// A world_size = 2 job runs standalone on one rank when it keeps the global batch
/// (`--accumulate-steps 2`), and resumes exactly from a checkpoint of format 1, whose per-rank
/// sampler position (2 draws on each of 2 ranks) is read as the global stream position 4.
#[test]
fn a_two_rank_job_runs_standalone_and_resumes_from_a_format_1_checkpoint() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let data = tmp.path().join("data");
    synth(&data, 7, 0, "64x64");
    let config = job_file(
        tmp.path(),
        &format!(
            "name = \"old\"\ndataset_root = \"{}\"\nworld_size = 2\ncrop_height = 64\n\
             crop_width = 64\nmax_iters = 4\nwarmup_iters = 1\nlog_interval = 1\n\
             eval_interval = 0\ncheckpoint_interval = 2\nloader_threads = 1\nsync_bn = false\n",
            data.display()
        ),
    );
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let one_rank = ["--device", "cpu", "--accumulate-steps", "2"];
    ok(train(&config, &a, &one_rank));
    ok(train(
        &config,
        &b,
        &[&one_rank[..], &["--stop-at", "2"]].concat(),
    ));
    let k = b.join(checkpoint::dir_name(2));
    let saved = checkpoint::read_manifest(&k).expect("manifest");
    assert_eq!(saved.format, 2);
    assert_eq!((saved.sampler.epoch, saved.sampler.position), (0, 4));
    // What the interleaved sampler of format 1 saved there: each rank's 2 draws.
    let path = k.join(checkpoint::MANIFEST_FILE);
    let mut json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("read")).expect("JSON");
    json["format"] = 1.into();
    json["sampler"]["position"] = 2.into();
    std::fs::write(&path, serde_json::to_vec(&json).expect("JSON")).expect("write");
    let k = k.to_str().expect("utf-8");
    ok(train(
        &config,
        &b,
        &[&one_rank[..], &["--resume-from", k]].concat(),
    ));
    assert_eq!(
        file_digests(&a.join(checkpoint::dir_name(4))),
        file_digests(&b.join(checkpoint::dir_name(4))),
        "resumed bit for bit"
    );
    let end = checkpoint::read_manifest(&b.join(checkpoint::dir_name(4))).expect("manifest");
    assert_eq!(end.format, 2, "written in the current format");
    assert_eq!((end.sampler.epoch, end.sampler.position), (1, 1));
}

#[test]
fn b0_learns_the_synthetic_set() {
    let settings = "batch_per_gpu = 8\nmax_iters = 100\nwarmup_iters = 10\nbase_lr = 0.001\nlog_interval = 25\n\
         eval_interval = 0\ncheckpoint_interval = 0\neval_mode = \"whole\"\nloader_threads = 2\nkeep_last = 1\n";
    let (tmp, data, config) = synth_job((32, 8, "128x64"), "learn", settings);
    let ckpts = tmp.path().join("ckpt");
    let log = ok(train(&config, &ckpts, &["--json"]));
    let events: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let eval = events
        .iter()
        .find(|e| e["event"] == "eval")
        .expect("a final evaluation");
    let miou = eval["miou"].as_f64().expect("miou");
    // 7 classes occur; chance is about 1/7.
    assert!(miou > 0.5, "val mIoU {miou} is not clearly above chance");
    let losses: Vec<f64> = events
        .iter()
        .filter(|e| e["event"] == "metrics")
        .filter_map(|e| e["values"]["loss"].as_f64())
        .collect();
    assert!(
        losses.len() >= 4 && losses.last() < losses.first(),
        "loss falls: {losses:?}"
    );

    // Pixel accuracy on the training images, from the final checkpoint.
    let dir = ckpts.join(checkpoint::dir_name(100));
    let ck = checkpoint::load(&dir).expect("final checkpoint verifies");
    let vs = nn::VarStore::new(Device::Cpu);
    let model = SegFormer::new(
        &vs.root(),
        SegFormerConfig::variant(segtrain_spec::Variant::B0, 19),
    );
    weights::load_tensors(&vs, ck.model, "final").expect("checkpoint loads strictly");
    let train = cityscapes::scan(&data, "train").expect("scan");
    let samples = eval_samples(&train).map(|s| s.map_err(anyhow::Error::from));
    let cfg = EvalConfig {
        mode: segtrain_spec::EvalMode::Whole,
        crop: 1024,
        stride: 768,
        precision: segtrain_spec::Precision::Fp32,
    };
    let r = accumulate(&model, samples, Device::Cpu, &cfg)
        .expect("evaluate")
        .result();
    assert_eq!(r.images, 32);
    assert!(
        r.metrics.aacc > 0.9,
        "train pixel accuracy {}",
        r.metrics.aacc
    );
}

#[test]
fn retention_keeps_the_last_k_and_the_best_and_a_corrupt_checkpoint_is_refused() {
    let settings = "batch_per_gpu = 1\nmax_iters = 6\nwarmup_iters = 1\nlog_interval = 3\neval_interval = 1\n\
         checkpoint_interval = 1\neval_mode = \"slide\"\neval_crop = 32\neval_stride = 16\nloader_threads = 1\n\
         keep_last = 2\nkeep_best = true\n";
    let (tmp, _, config) = synth_job((4, 2, "64x64"), "keep", settings);
    let ckpts = tmp.path().join("ckpt");
    ok(train(&config, &ckpts, &[]));
    let kept: Vec<u64> = checkpoint::list(&ckpts)
        .expect("list")
        .into_iter()
        .map(|(i, _)| i)
        .collect();
    let last = checkpoint::read_manifest(&ckpts.join(checkpoint::dir_name(6))).expect("manifest");
    let (_, best_it) = last.best.expect("a best evaluation");
    let mut want = vec![5, 6];
    if !want.contains(&best_it) {
        want.insert(0, best_it);
    }
    assert_eq!(
        kept, want,
        "the newest 2 plus the best (iteration {best_it})"
    );
    assert!(
        !std::fs::read_dir(&ckpts).expect("dir").any(|e| {
            e.map(|e| e.file_name().to_string_lossy().starts_with('.'))
                .unwrap_or(false)
        }),
        "no temporary directory left behind"
    );

    // Flip one byte of the weights: resume refuses it, naming the file.
    let dir = ckpts.join(checkpoint::dir_name(6));
    let model = dir.join(checkpoint::MODEL_FILE);
    let mut bytes = std::fs::read(&model).expect("read");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&model, bytes).expect("write");
    let out = train(
        &config,
        &ckpts,
        &["--resume-from", dir.to_str().expect("utf-8")],
    );
    assert_failed_naming(&out, &["corrupt", "model.safetensors"]);
}

#[test]
fn bad_jobs_fail_with_a_named_error() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let cases = [
        (
            "dataset_root = \"/nonexistent/cityscapes\"\nworld_size = 1\n",
            "/nonexistent/cityscapes",
        ),
        ("dataset_root = \"/d\"\n", "world_size"),
        (
            "dataset_root = \"/d\"\nworld_size = 1\ncrop_height = 65\n",
            "crop_height",
        ),
        (
            "dataset_root = \"/d\"\nworld_size = 1\nbogus = 1\n",
            "bogus",
        ),
    ];
    for (body, needle) in cases {
        let config = job_file(tmp.path(), body);
        let out = train(&config, Path::new("/tmp/unused"), &[]);
        assert_failed_naming(&out, &[needle]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "{body}: {err}");
    }
}
