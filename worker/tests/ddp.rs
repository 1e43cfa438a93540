//! Data-parallel training end to end on the CPU through the real TCP collective: two
//! `segtrain-worker train` processes (world 2, batch 1 each) must train the same model as one
//! process that accumulates two micro-batches of 1 (world 1, accumulate_steps 2).
//!
//! Why they must agree: the sampler gives rank r the positions r, r + 2, ... of the same
//! permutation, and the loader seeds each sample's augmentation by its global position, so the
//! two ranks see exactly the two micro-batches the single process sees; with dropout and drop
//! path off (--no-dropout), the averaged gradient is the accumulated one.
//!
//! Only trainable parameters are compared: BatchNorm running statistics are per rank (DDP without
//! SyncBN: each rank updates them from its own micro-batch, the single process from both), and
//! only rank 0's are saved.

use segtrain_worker::train::checkpoint;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use tch::Tensor;

const EXE: &str = env!("CARGO_BIN_EXE_segtrain-worker");

/// Kills the child if the test fails half-way.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn s(p: &Path) -> String {
    p.to_str().expect("utf-8").to_string()
}

fn config(dir: &Path, data: &Path, world: u32, accumulate: u32) -> String {
    let path = dir.join(format!("job-w{world}.toml"));
    std::fs::write(
        &path,
        format!(
            "name = \"ddp\"\ndataset_root = \"{}\"\nworld_size = {world}\ncrop_height = 64\n\
             crop_width = 64\nbatch_per_gpu = 1\naccumulate_steps = {accumulate}\nmax_iters = 4\n\
             warmup_iters = 2\nbase_lr = 0.001\nlog_interval = 1\neval_interval = 2\n\
             checkpoint_interval = 0\nkeep_best = false\neval_mode = \"whole\"\nloader_threads = 1\n\
             seed = 17\n",
            data.display()
        ),
    )
    .expect("write job file");
    s(&path)
}

/// Starts `train --json` with stdout read line by line on a thread (sent through the channel)
/// and stderr in a file.
fn start(args: &[String], log: &Path) -> (Guard, mpsc::Receiver<String>) {
    let mut child = Command::new(EXE)
        .arg("train")
        .arg("--json")
        .args(args)
        .env_remove("RUST_BACKTRACE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).expect("log file"))
        .spawn()
        .expect("start segtrain-worker train");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (Guard(child), rx)
}

/// Waits for the child; returns its JSON events (the lines not yet taken from `rx`).
fn finish(
    mut g: Guard,
    rx: mpsc::Receiver<String>,
    log: &Path,
    mut events: Vec<serde_json::Value>,
) -> Vec<serde_json::Value> {
    let status = g.0.wait().expect("wait");
    let err = std::fs::read_to_string(log).unwrap_or_default();
    assert!(status.success(), "{} failed: {err}", log.display());
    events.extend(rx.iter().filter_map(|l| serde_json::from_str(&l).ok()));
    events
}

fn of<'a>(events: &'a [serde_json::Value], kind: &str) -> Vec<&'a serde_json::Value> {
    events.iter().filter(|e| e["event"] == kind).collect()
}

fn checkpoint_dirs(root: &Path) -> Vec<PathBuf> {
    match std::fs::read_dir(root) {
        Ok(rd) => rd.map(|e| e.expect("entry").path()).collect(),
        Err(_) => Vec::new(),
    }
}

fn is_trainable(name: &str) -> bool {
    !(name.contains("running_mean")
        || name.contains("running_var")
        || name.contains("num_batches_tracked"))
}

#[test]
fn two_cpu_ranks_train_the_same_model_as_one_rank_accumulating_two_micro_batches() {
    let started = Instant::now();
    let tmp = tempfile::tempdir().expect("temp dir");
    let data = tmp.path().join("data");
    let out = Command::new(EXE)
        .args([
            "synth-data",
            "--out",
            &s(&data),
            "--train",
            "8",
            "--val",
            "2",
            "--size",
            "64x64",
        ])
        .output()
        .expect("synth-data");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Two ranks through the TCP collective.
    let c2 = config(tmp.path(), &data, 2, 1);
    let (ck0, ck1) = (tmp.path().join("ck-rank0"), tmp.path().join("ck-rank1"));
    let common = |rank: usize, ck: &Path, rv: String| -> Vec<String> {
        [
            "--config",
            &c2,
            "--device",
            "cpu",
            "--no-dropout",
            "--world",
            "2",
            "--rank",
            &rank.to_string(),
            "--rendezvous",
            &rv,
            "--rendezvous-token",
            "4242",
            "--rendezvous-timeout",
            "300",
            "--checkpoint-dir",
            &s(ck),
        ]
        .iter()
        .map(|a| a.to_string())
        .collect()
    };
    let (log0, log1) = (tmp.path().join("rank0.log"), tmp.path().join("rank1.log"));
    let (g0, rx0) = start(&common(0, &ck0, "tcp-listen:127.0.0.1:0".into()), &log0);
    // Rank 0 reports where it listens before it waits for anyone.
    let mut events0 = Vec::new();
    let addr = loop {
        let line = rx0
            .recv_timeout(Duration::from_secs(120))
            .unwrap_or_else(|e| {
                panic!(
                    "no rendezvous event from rank 0 ({e}): {}",
                    std::fs::read_to_string(&log0).unwrap_or_default()
                )
            });
        let ev: serde_json::Value = serde_json::from_str(&line).expect("JSON event");
        if ev["event"] == "rendezvous" {
            assert!(ev.get("nccl_unique_id").is_none(), "{ev}");
            let a = ev["tcp_address"].as_str().expect("tcp_address").to_string();
            events0.push(ev);
            break a;
        }
        events0.push(ev);
    };
    assert!(
        addr.starts_with("127.0.0.1:") && !addr.ends_with(":0"),
        "the port actually bound: {addr}"
    );
    let (g1, rx1) = start(&common(1, &ck1, format!("tcp:{addr}")), &log1);
    let events0 = finish(g0, rx0, &log0, events0);
    let events1 = finish(g1, rx1, &log1, Vec::new());

    // One rank, two micro-batches per step.
    let c1 = config(tmp.path(), &data, 1, 2);
    let ck_single = tmp.path().join("ck-single");
    let log_single = tmp.path().join("single.log");
    let (g, rx) = start(
        &[
            "--config",
            &c1,
            "--device",
            "cpu",
            "--no-dropout",
            "--checkpoint-dir",
            &s(&ck_single),
        ]
        .map(String::from),
        &log_single,
    );
    let events_single = finish(g, rx, &log_single, Vec::new());

    // Only rank 0 reports and writes checkpoints.
    let dirs0 = checkpoint_dirs(&ck0);
    assert_eq!(
        dirs0,
        vec![ck0.join(checkpoint::dir_name(4))],
        "rank 0 wrote exactly the final checkpoint"
    );
    assert!(
        checkpoint_dirs(&ck1).is_empty(),
        "rank 1 wrote nothing: {:?}",
        checkpoint_dirs(&ck1)
    );
    assert_eq!(of(&events0, "rendezvous").len(), 1);
    assert_eq!(of(&events0, "checkpoint").len(), 1);
    assert_eq!(of(&events0, "metrics").len(), 4);
    for kind in ["rendezvous", "metrics", "eval", "checkpoint"] {
        assert!(
            of(&events1, kind).is_empty(),
            "rank 1 reports no {kind}: {events1:?}"
        );
    }
    assert_eq!(of(&events1, "finished").len(), 1, "{events1:?}");
    // Rank 1 prints its own speed (for its daemon's gauges, never stored with the job).
    let own = of(&events1, "rank_metrics");
    assert_eq!(own.len(), 4, "{events1:?}");
    assert!(own
        .iter()
        .all(|e| e["values"]["step_ms"].as_f64() > Some(0.0)));
    assert!(of(&events0, "rank_metrics").is_empty());
    // The evaluation covered both ranks' shards (one val image each).
    let evals = of(&events0, "eval");
    assert_eq!(evals.len(), 2, "at iterations 2 and 4");
    for e in &evals {
        assert_eq!(e["images"], 2, "both shards counted: {e}");
    }

    // The parameters, after 4 optimizer steps in both runs.
    for ck in [&ck0, &ck_single] {
        let m = checkpoint::read_manifest(&ck.join(checkpoint::dir_name(4))).expect("manifest");
        assert_eq!(m.optimizer_steps, 4);
    }
    let read = |dir: &Path| {
        Tensor::read_safetensors(
            dir.join(checkpoint::dir_name(4))
                .join(checkpoint::MODEL_FILE),
        )
        .expect("model.safetensors")
    };
    let (m2, m1) = (read(&ck0), read(&ck_single));
    let m1: std::collections::BTreeMap<String, Tensor> = m1.into_iter().collect();
    assert_eq!(m2.len(), m1.len(), "same tensors");
    let (mut max_diff, mut max_name, mut compared, mut skipped) = (0f64, String::new(), 0, 0);
    for (name, a) in &m2 {
        let b = m1.get(name).unwrap_or_else(|| panic!("{name} missing"));
        assert_eq!(a.size(), b.size(), "{name}");
        if !is_trainable(name) {
            skipped += 1;
            continue;
        }
        compared += a.numel();
        let d = f64::try_from((a - b).abs().max()).expect("scalar");
        if d > max_diff {
            (max_diff, max_name) = (d, name.clone());
        }
    }
    assert!(
        compared > 3_000_000,
        "all B0 parameters compared: {compared}"
    );
    assert!(skipped > 0, "BatchNorm statistics exist and were left out");
    eprintln!(
        "DDP equivalence: max abs diff {max_diff:e} ({max_name}) over {compared} parameters; \
         {skipped} BatchNorm statistics tensors skipped; {:?}",
        started.elapsed()
    );
    assert!(
        max_diff <= 1e-5,
        "2 ranks x batch 1 vs 1 rank x 2 micro-batches: max abs diff {max_diff:e} at {max_name}"
    );

    // The logged loss is averaged over the ranks, as the single process averages its
    // micro-batches.
    let losses = |evs: &[serde_json::Value]| -> Vec<f64> {
        of(evs, "metrics")
            .iter()
            .map(|e| e["values"]["loss"].as_f64().expect("loss"))
            .collect()
    };
    let (l2, l1) = (losses(&events0), losses(&events_single));
    assert_eq!(l2.len(), l1.len());
    for (a, b) in l2.iter().zip(&l1) {
        assert!(
            (a - b).abs() <= 1e-5 * b.abs().max(1.0),
            "loss per step: 2 ranks {l2:?}, 1 rank {l1:?}"
        );
    }
}

#[test]
fn bad_distributed_flags_fail_with_a_named_error() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let config = tmp.path().join("job.toml");
    std::fs::write(&config, "dataset_root = \"/d\"\nworld_size = 2\n").expect("job file");
    let cases: &[(&[&str], &str)] = &[
        (&[], "standalone training runs one rank"),
        (&["--world", "3"], "--world 3"),
        (&["--world", "2", "--rank", "2"], "--rank 2"),
        (&["--world", "2"], "--rendezvous"),
        (&["--world", "2", "--rendezvous", "mpi"], "--rendezvous"),
        (&["--world", "2", "--rendezvous", "nccl:AAAA"], "128 bytes"),
        (
            &[
                "--world",
                "2",
                "--rank",
                "1",
                "--rendezvous",
                "tcp-listen:127.0.0.1:0",
            ],
            "rank 1 cannot use rendezvous tcp-listen",
        ),
        (
            &[
                "--world",
                "2",
                "--rendezvous",
                "nccl-create",
                "--device",
                "cpu",
            ],
            "NCCL needs a CUDA device",
        ),
        (
            &[
                "--world",
                "2",
                "--rank",
                "1",
                "--rendezvous",
                "tcp:127.0.0.1:1",
                "--rendezvous-timeout",
                "1",
            ],
            "could not reach rank 0",
        ),
    ];
    for (args, needle) in cases {
        let out = Command::new(EXE)
            .args(["train", "--config", &s(&config), "--checkpoint-dir"])
            .arg(tmp.path().join("ck"))
            .args(*args)
            .env_remove("RUST_BACKTRACE")
            .output()
            .expect("run segtrain-worker");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(
            err.contains(needle),
            "{args:?}: expected {needle:?} in: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
}
