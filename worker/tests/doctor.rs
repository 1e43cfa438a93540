//! The worker binary loads the wheel's libtorch (the link set-up of build.rs and
//! .cargo/config.toml) and reports it.

use std::process::Command;

#[test]
fn doctor_reports_the_linked_libtorch() {
    let out = Command::new(env!("CARGO_BIN_EXE_segtrain-worker"))
        .args(["doctor", "--json"])
        .output()
        .expect("run segtrain-worker doctor");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "doctor failed: {stderr}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("doctor --json is JSON");
    let lib = v["libtorch_lib"].as_str().expect("libtorch_lib is known");
    assert!(
        std::path::Path::new(lib).join("libtorch_cuda.so").exists(),
        "the binary was linked against the CUDA wheel's torch/lib: {lib}"
    );
    assert!(v["cpu_threads"].as_i64().is_some_and(|n| n >= 1));
    assert_eq!(v["torch_version"], "2.11.0", "the pinned wheel");
    // NCCL is the wheel's own copy, loadable (and versioned) even without a GPU.
    let nccl = v["nccl_library"].as_str().expect("NCCL library found");
    assert!(nccl.ends_with("nvidia/nccl/lib/libnccl.so.2"), "{nccl}");
    assert!(
        v["nccl_version"]
            .as_str()
            .is_some_and(|s| s.starts_with("2.")),
        "{}",
        v["nccl_error"]
    );
    // The same binary serves GPU hosts: on this one the answer must be consistent.
    let cuda = v["cuda_available"].as_bool().expect("bool");
    let gpus = v["gpus"].as_array().expect("gpus list");
    assert_eq!(cuda, !gpus.is_empty());
}

#[test]
fn the_binary_keeps_libtorch_cuda_linked() {
    // --as-needed would drop libtorch_cuda.so (nothing in libtch calls it) and CUDA would silently
    // vanish on GPU hosts; build.rs links with --no-as-needed -ltorch to keep it.
    let out = Command::new("readelf")
        .args(["-d", env!("CARGO_BIN_EXE_segtrain-worker")])
        .output()
        .expect("readelf (binutils)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("[libtorch.so]"),
        "libtorch.so not NEEDED:\n{text}"
    );
    assert!(
        text.contains("RUNPATH") || text.contains("RPATH"),
        "no rpath:\n{text}"
    );
}
