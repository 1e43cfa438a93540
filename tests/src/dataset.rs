//! The synthetic Cityscapes-layout dataset that the end-to-end tests' real jobs train on.

use segtrain_proto::v1 as pb;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Writes `train` and `val` synthetic 64x64 images to `out` with `segtrain-worker synth-data`
/// (one place for what every real-trainer test needs first); panics with its stderr on failure.
pub fn synth_data(out: &Path, train: u32, val: u32) {
    let (train, val) = (train.to_string(), val.to_string());
    let args = [
        "synth-data",
        "--train",
        &train,
        "--val",
        &val,
        "--size",
        "64x64",
    ];
    let mut cmd = Command::new(crate::binaries::path("segtrain-worker"));
    cmd.args(args).arg("--out").arg(out);
    crate::binaries::run_ok(&mut cmd, "segtrain-worker synth-data");
}

/// A fresh temp dir with the synthetic dataset in its `data` folder, and that folder: how every
/// test that trains for real begins.
pub fn synth_dir(train: u32, val: u32) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().expect("temp dir");
    let data = tmp.path().join("data");
    synth_data(&data, train, val);
    (tmp, data)
}

/// A real job small enough to train in seconds on a CPU: the synthetic images at `data` at
/// 64x64, batch 1, one loader thread, a loss every iteration, whole-image eval; no eval and no
/// checkpoints unless the caller sets their intervals. The one shape the real-trainer tests run.
pub fn tiny_job(
    name: &str,
    data: &Path,
    checkpoints: &Path,
    world_size: u32,
    max_iters: u64,
) -> pb::JobSpec {
    pb::JobSpec {
        name: Some(name.into()),
        dataset_root: Some(data.display().to_string()),
        checkpoint_root: Some(checkpoints.display().to_string()),
        world_size: Some(world_size),
        batch_per_gpu: Some(1),
        crop_height: Some(64),
        crop_width: Some(64),
        max_iters: Some(max_iters),
        warmup_iters: Some(1),
        log_interval: Some(1),
        eval_interval: Some(0),
        checkpoint_interval: Some(0),
        eval_mode: Some("whole".into()),
        loader_threads: Some(1),
        ..Default::default()
    }
}
