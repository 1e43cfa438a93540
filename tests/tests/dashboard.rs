//! The web dashboard in a real browser: Debian's chromium driven by playwright-core
//! (tests/web/dashboard.mjs) against a TLS coordinator with tokens, two CPU daemons and a job
//! training. The script checks what the page shows (sign-in refusals, the job list, live
//! curves, per-class IoU, workers, cancel); this side checks the outcome in the database and
//! that the curve drawn holds every loss point GetMetrics serves.

use segtrain_proto::v1 as pb;
use segtrain_proto::v1::job_service_client::JobServiceClient;
use segtrain_tests::coordinator::{
    events_until_end, free_port, metric_points, submit_job, watch_job, CoordinatorProcess,
};
use segtrain_tests::daemon::DaemonProcess;
use segtrain_tests::dataset::{synth_dir, tiny_job};
use segtrain_tests::pg::TempPostgres;
use std::ffi::OsStr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_jobs_live_curves_workers_and_cancels_in_a_real_browser() {
    for need in ["/usr/bin/chromium", "/usr/bin/node"] {
        assert!(
            std::path::Path::new(need).exists(),
            "{need} is missing: `make setup` installs it"
        );
    }
    let script = repo().join("tests/web/dashboard.mjs");
    let (tmp, data) = synth_dir(8, 2);
    let pg = TempPostgres::start().expect("PostgreSQL");
    let web = format!("127.0.0.1:{}", free_port());
    let coord = CoordinatorProcess::start_secure(
        &pg.url(),
        &["--web-listen", &web, "--poll-interval-ms", "500"],
        false,
    )
    .await;
    let (worker, _) = coord.create_token(pb::TokenRole::Worker, "cpu-hosts").await;
    let (client, _) = coord.create_token(pb::TokenRole::Client, "browser").await;
    let worker_file = CoordinatorProcess::token_file(tmp.path(), "worker.token", &worker);
    let ca = coord.ca().expect("ca");
    let flags: Vec<std::ffi::OsString> = vec![
        "--ca".into(),
        ca.into(),
        "--token-file".into(),
        worker_file.into(),
    ];
    let flags: Vec<&OsStr> = flags.iter().map(|s| s.as_os_str()).collect();
    let daemons: Vec<DaemonProcess> = ["cpu-a", "cpu-b"]
        .iter()
        .map(|h| DaemonProcess::start_with_args(&coord.url(), h, &tmp.path().join(h), &flags))
        .collect();
    let logs = || {
        let mut s = format!("coordinator:\n{}\n", coord.log_text());
        for d in &daemons {
            s.push_str(&format!("daemon:\n{}\n", d.log_text()));
        }
        s
    };
    let mut jobs = JobServiceClient::new(coord.channel_with_token(Some(&client)));
    let checkpoints = tmp.path().join("ckpt");

    // A short job that has finished (for the comparison), then one that trains until canceled.
    let done = submit_job(&mut jobs, tiny_job("warm-up", &data, &checkpoints, 1, 6)).await;
    let mut w = watch_job(&mut jobs, &done.id, 0).await;
    events_until_end(&mut w, Duration::from_secs(300), logs).await;
    let job = submit_job(
        &mut jobs,
        pb::JobSpec {
            eval_interval: Some(5),
            checkpoint_interval: Some(10),
            keep_last: Some(2),
            ..tiny_job("b0-live", &data, &checkpoints, 2, 100_000)
        },
    )
    .await;

    let shots = match std::env::var_os("SEGTRAIN_SCREENSHOTS") {
        Some(dir) => PathBuf::from(dir),
        None => tmp.path().join("shots"),
    };
    std::fs::create_dir_all(&shots).expect("screenshot dir");
    let out = Command::new("/usr/bin/node")
        .arg(&script)
        .env("URL", format!("https://{web}"))
        .env("CLIENT_TOKEN", &client)
        .env("WORKER_TOKEN", &worker)
        .env("JOB", &job.id)
        .env("DONE_JOB", &done.id)
        .env("SHOTS", &shots)
        .output()
        .expect("run node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the browser script failed:\n{stdout}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        logs()
    );
    let summary: serde_json::Value = stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("no summary line:\n{stdout}"));

    // Canceled from the page, as the database has it.
    let after = segtrain_tests::coordinator::get_job(&mut jobs, &job.id).await;
    assert_eq!(after.state(), pb::JobState::Canceled, "{}", logs());
    // The curve drawn at the end holds every loss point GetMetrics serves (NaN ones are gaps).
    let loss = metric_points(&mut jobs, &job.id, &["loss"], 0).await;
    let finite = loss.iter().filter(|p| p.value.is_finite()).count();
    assert!(finite >= 2, "{loss:?}");
    assert_eq!(summary["loss_points_final"], finite, "{summary}");
    let miou = metric_points(&mut jobs, &job.id, &["miou"], 0).await;
    assert_eq!(
        summary["miou_points_final"],
        miou.iter().filter(|p| p.value.is_finite()).count(),
        "{summary}"
    );
    let grew = &summary["loss_points_growing"];
    assert!(grew[1].as_u64() > grew[0].as_u64(), "{summary}");
    for f in [
        "dashboard-jobs.png",
        "dashboard-job.png",
        "dashboard-workers.png",
    ] {
        let len = std::fs::metadata(shots.join(f))
            .map(|m| m.len())
            .unwrap_or(0);
        assert!(len > 10_000, "{f}: {len} bytes");
    }
}
