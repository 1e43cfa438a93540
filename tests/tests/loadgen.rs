//! A small run of the load generator (`segtrain-loadgen`, the coordinator's benchmark) against
//! the real coordinator and PostgreSQL: every simulated job succeeds, nothing errs, no lease
//! expires falsely, and the table reports what it measured. The standard sizes are
//! `make bench-coordinator` (bench/results.md), not a test.

use segtrain_tests::coordinator::CoordinatorProcess;
use segtrain_tests::pg::TempPostgres;
use std::process::Command;

/// The value column of the table row whose measure starts with `name`.
fn row<'a>(table: &'a str, name: &str) -> &'a str {
    table
        .lines()
        .find(|l| l.starts_with(&format!("| {name}")))
        .and_then(|l| l.split('|').nth(2))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no row {name:?} in\n{table}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_simulated_cluster_runs_every_job_to_success() {
    let pg = TempPostgres::start().expect("PostgreSQL");
    let coord = CoordinatorProcess::start(&pg.url()).await;
    let tmp = tempfile::tempdir().expect("tmp");
    let results = tmp.path().join("results.md");
    let out = tokio::task::spawn_blocking({
        let (url, results) = (coord.url(), results.clone());
        move || {
            Command::new(segtrain_tests::binaries::path("segtrain-loadgen"))
                .args([
                    "--coordinator",
                    &url,
                    "--hosts",
                    "4",
                    "--gpus-per-host",
                    "4",
                ])
                .args([
                    "--jobs",
                    "24",
                    "--world-sizes",
                    "1,2,4,8",
                    "--max-iters",
                    "10",
                ])
                .args(["--step-ms", "20", "--watchers", "4", "--timeout-s", "120"])
                .args(["--label", "smoke", "--results"])
                .arg(&results)
                .output()
                .expect("run segtrain-loadgen")
        }
    })
    .await
    .expect("join");
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}\n{}", coord.log_text());
    assert_eq!(row(&table, "simulated GPUs"), "16", "{table}");
    assert_eq!(row(&table, "jobs"), "24 (24 / 0)", "{table}\n{err}");
    assert_eq!(row(&table, "errors"), "0", "{table}\n{err}");
    assert_eq!(row(&table, "false lease expiries"), "0", "{table}");
    // 24 jobs x 10 iterations x 5 names, all ingested.
    let heartbeats = row(&table, "Heartbeat");
    assert!(heartbeats.contains("calls"), "{table}");
    let watch = row(&table, "WatchJob");
    assert!(
        !watch.contains("NaN"),
        "the watchers saw live events: {table}"
    );
    let appended = std::fs::read_to_string(&results).expect("results file");
    assert!(
        appended.contains("### segtrain-loadgen smoke"),
        "{appended}"
    );
    assert!(
        appended.contains(&table.trim_end().to_string()),
        "{appended}"
    );
}
