//! Running real `segtrain-worker train` processes from the multi-rank tests (`ddp.rs`,
//! `elastic.rs`): one rank or two over the TCP collective, their JSON events, synthetic data.

// Each test binary that includes this module uses its own part of it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

pub const EXE: &str = env!("CARGO_BIN_EXE_segtrain-worker");

/// Kills the child if the test fails half-way.
pub struct Guard(pub Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn s(p: &Path) -> String {
    p.to_str().expect("utf-8").to_string()
}

/// Runs `train --config CONFIG --checkpoint-dir DIR ARGS` that must fail before it trains: its
/// exit code and stderr (never a panic).
pub fn train_refused(config: &Path, checkpoint_dir: &Path, args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(EXE)
        .args(["train", "--config", &s(config)])
        .args(["--checkpoint-dir", &s(checkpoint_dir)])
        .args(args)
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("run segtrain-worker");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{args:?} should fail");
    assert!(!err.contains("panicked"), "{args:?}: {err}");
    (out.status.code(), err)
}

/// Starts `train --json` with stdout read line by line on a thread (sent through the channel)
/// and stderr in a file.
pub fn start(args: &[String], log: &Path) -> (Guard, mpsc::Receiver<String>) {
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
pub fn finish(
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

pub fn of<'a>(events: &'a [serde_json::Value], kind: &str) -> Vec<&'a serde_json::Value> {
    events.iter().filter(|e| e["event"] == kind).collect()
}

/// One rank with `args` (after `train --json`); its stderr goes to `log`. Returns its events.
pub fn one_rank(args: &[String], log: &Path) -> Vec<serde_json::Value> {
    let (g, rx) = start(args, log);
    finish(g, rx, log, Vec::new())
}

/// Ranks 0 and 1 of a world-2 job over TCP on the loopback: `args(rank, rendezvous)` gives each
/// rank's flags (the rendezvous flag's value is filled in: rank 0 listens on a free port, rank 1
/// connects to the address rank 0 reports). Stderr goes to `dir/rank<r>.log`. Returns both
/// ranks' events.
pub fn two_ranks(
    dir: &Path,
    args: impl Fn(usize, String) -> Vec<String>,
) -> (Vec<serde_json::Value>, Vec<serde_json::Value>) {
    let (log0, log1) = (dir.join("rank0.log"), dir.join("rank1.log"));
    let (g0, rx0) = start(&args(0, "tcp-listen:127.0.0.1:0".into()), &log0);
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
    let (g1, rx1) = start(&args(1, format!("tcp:{addr}")), &log1);
    let events0 = finish(g0, rx0, &log0, events0);
    let events1 = finish(g1, rx1, &log1, Vec::new());
    (events0, events1)
}

/// A synthetic dataset of `train` and `val` images of 64x64 in `dir/data`.
pub fn synth_data(dir: &Path, train: usize, val: usize) -> PathBuf {
    let data = dir.join("data");
    let out = Command::new(EXE)
        .args([
            "synth-data",
            "--out",
            &s(&data),
            "--train",
            &train.to_string(),
            "--val",
            &val.to_string(),
            "--size",
            "64x64",
        ])
        .output()
        .expect("synth-data");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "synth-data failed: {stderr}");
    data
}

pub fn is_buffer(name: &str) -> bool {
    name.contains("running_mean") || name.contains("running_var")
}
