//! `segtrain-worker bench` on the CPU: it runs the trainer's step and reports consistent numbers
//! (the GPU rows come from `bench/compare.py` on a GPU machine).

use segtrain_spec::Variant;
use segtrain_trainer::model::SegFormerConfig;
use std::process::Command;

fn bench(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_segtrain-worker"))
        .arg("bench")
        .args(args)
        .output()
        .expect("run segtrain-worker bench")
}

/// A short fp32 B0 run on the CPU (batch 2, 64x64, 2 timed iterations after 1 warm-up) with
/// `extra` flags, as JSON; panics with its stderr unless it succeeds. Both tests time this run.
fn small_cpu_bench(extra: &[&str]) -> serde_json::Value {
    let small =
        "--variant b0 --batch 2 --crop 64 --iters 2 --warmup 1 --device cpu --precision fp32";
    let mut args: Vec<&str> = small.split(' ').collect();
    args.extend_from_slice(extra);
    args.push("--json");
    let out = bench(&args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    serde_json::from_slice(&out.stdout).expect("one JSON object on stdout")
}

#[test]
fn bench_times_training_steps_and_counts_flops_from_the_model() {
    let r = small_cpu_bench(&[]);
    let ms = r["ms_per_iter_median"].as_f64().expect("ms");
    assert!(ms > 0.0);
    assert!(r["ms_per_iter_min"].as_f64().expect("min") <= ms);
    let ips = r["images_per_s"].as_f64().expect("images/s");
    assert!((ips - 2000.0 / ms).abs() < 1e-6 * ips.max(1.0));
    let (macs, _) = SegFormerConfig::variant(Variant::B0, 19).forward_macs(64, 64);
    let gflop = r["forward_gflop_per_image"].as_f64().expect("gflop");
    assert!((gflop - 2.0 * macs / 1e9).abs() < 1e-9);
    let tflops = r["tflops"].as_f64().expect("tflops");
    assert!((tflops - 3.0 * 2.0 * macs * 2.0 / (ms / 1e3) / 1e12).abs() < 1e-9 * tflops.max(1.0));
    assert_eq!(r["peak_memory_bytes"], 0, "no GPU memory on the CPU");

    let bad = bench(&["--crop", "100", "--device", "cpu"]);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("--crop") && err.contains("multiple of 32"),
        "{err}"
    );
}

/// The A/B switches and the per-phase breakdown are reported, and `--profile` writes a Chrome
/// trace and names the operators that take the time (on the CPU: convolutions among them).
#[test]
fn bench_reports_ab_switches_breakdown_and_a_profile() {
    let dir = tempfile::tempdir().expect("temp dir");
    let trace = dir.path().join("trace.json");
    let r = small_cpu_bench(&[
        "--head",
        "concat",
        "--contiguous-maps",
        "--breakdown",
        "--profile",
        trace.to_str().expect("utf-8 path"),
    ]);
    assert_eq!(r["head"], "concat");
    assert_eq!(r["contiguous_maps"], true);
    for phase in ["forward_ms", "backward_ms", "optimizer_ms"] {
        assert!(
            r["breakdown"][phase].as_f64().expect(phase) > 0.0,
            "{phase}"
        );
    }
    let rows = r["profile"].as_array().expect("profile rows");
    assert!(!rows.is_empty() && rows.len() <= 30);
    assert!(
        rows.iter().any(|p| p["name"]
            .as_str()
            .is_some_and(|n| n.contains("convolution"))),
        "{rows:?}"
    );
    let ms: Vec<f64> = rows
        .iter()
        .map(|p| p["ms_per_step"].as_f64().expect("ms"))
        .collect();
    assert!(
        ms.windows(2).all(|w| w[0] >= w[1]),
        "sorted by time: {ms:?}"
    );
    let chrome: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&trace).expect("trace written")).expect("JSON");
    assert!(
        chrome["traceEvents"]
            .as_array()
            .is_some_and(|e| !e.is_empty()),
        "a Chrome trace with events"
    );
}

/// `bench checkpoint` times the trainer's own checkpoint writer: one row per variant with the
/// model's parameter count and the size of a real checkpoint (model, both AdamW moments and the
/// manifest), and it leaves nothing behind in the directory it was given.
#[test]
fn bench_checkpoint_times_the_checkpoint_writer() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = bench(&[
        "checkpoint",
        "--variants",
        "b0",
        "--reps",
        "2",
        "--dir",
        dir.path().to_str().expect("utf-8 path"),
        "--json",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON array");
    let rows = rows.as_array().expect("rows");
    assert_eq!(rows.len(), 1);
    let r = &rows[0];
    assert_eq!(r["variant"], "b0");
    assert_eq!(r["reps"], 2);
    let params = r["parameters"].as_u64().expect("parameters");
    let info = segtrain_trainer::model::info(Variant::B0, 19, 64, 64);
    assert_eq!(
        params, info.parameters as u64,
        "the model's parameter count"
    );
    // 4 bytes per parameter in the model file and in each moment, plus headers, the BatchNorm
    // statistics and the manifest.
    let bytes = r["bytes"].as_u64().expect("bytes");
    assert!(
        bytes > 12 * params && bytes < 12 * params + 4_000_000,
        "{bytes} bytes for {params} parameters"
    );
    let (median, min) = (
        r["seconds_median"].as_f64().expect("median"),
        r["seconds_min"].as_f64().expect("min"),
    );
    assert!(min > 0.0 && min <= median, "{min} {median}");
    let mbps = r["mb_per_s"].as_f64().expect("MB/s");
    assert!((mbps - bytes as f64 / median / 1e6).abs() < 1e-6 * mbps);
    assert_eq!(
        std::fs::read_dir(dir.path()).expect("dir").count(),
        0,
        "nothing left behind"
    );

    let bad = bench(&["checkpoint", "--variants", "b9"]);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("--variants") && err.contains("one of b0"),
        "{err}"
    );
}
