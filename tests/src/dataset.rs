//! The synthetic Cityscapes-layout dataset that the end-to-end tests' real jobs train on.

use std::path::Path;
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
