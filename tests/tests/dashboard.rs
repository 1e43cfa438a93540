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

/// One HTTP/1.1 exchange on a plaintext loopback dashboard: (status, parsed JSON body).
async fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[&str],
    body: &str,
) -> (u16, serde_json::Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    s.write_all(req.as_bytes()).await.expect("send");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.expect("read");
    let text = String::from_utf8_lossy(&raw);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in {text}"));
    let json = text
        .split_once("\r\n\r\n")
        .and_then(|(_, b)| serde_json::from_str(b).ok())
        .unwrap_or(serde_json::Value::Null);
    (status, json)
}

#[tokio::test]
async fn the_http_api_validates_its_parameters_and_refuses_what_grpc_refuses() {
    let pg = TempPostgres::start().expect("PostgreSQL");
    let web = format!("127.0.0.1:{}", free_port());
    // Plaintext on loopback with tokens required (no --insecure-no-auth).
    let admin = segtrain_tests::coordinator::coordinator_command(&[
        "token",
        "create",
        "--database-url",
        &pg.url(),
        "--role",
        "admin",
        "--name",
        "t",
    ]);
    let admin = admin.trim();
    let coord =
        CoordinatorProcess::start_plaintext_with_auth(&pg.url(), &["--web-listen", &web]).await;
    let auth = format!("Authorization: Bearer {admin}");
    let with = [auth.as_str()];

    // A client that connects and sends nothing holds up no one else.
    let _silent = tokio::net::TcpStream::connect(&web).await.expect("connect");
    // The page itself needs no token.
    let (status, _) = http(&web, "GET", "/", &[], "").await;
    assert_eq!(status, 200);

    // Every API call does, with gRPC's words.
    let (status, body) = http(&web, "GET", "/api/v1/jobs", &[], "").await;
    assert_eq!(status, 401);
    assert_eq!(body["code"], "UNAUTHENTICATED");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("needs a client or admin token")),
        "{body}"
    );

    let cases: &[(&str, &str, u16, &str)] = &[
        (
            "GET",
            "/api/v1/jobs?state=bogus",
            400,
            "state: unknown state \"bogus\"; allowed: queued, scheduled",
        ),
        (
            "GET",
            "/api/v1/jobs?colour=red",
            400,
            "unknown query parameter \"colour\"; allowed: state, page_size, page_token",
        ),
        (
            "GET",
            "/api/v1/jobs?page_size=many",
            400,
            "page_size: must be a number 1..=1000, got \"many\"",
        ),
        (
            "GET",
            "/api/v1/jobs?page_size=5000",
            400,
            "page_size: must be 0 (default 50) or 1..=1000",
        ),
        ("GET", "/api/v1/jobs/not-a-job", 400, "job_id"),
        (
            "GET",
            "/api/v1/jobs/01a23d37-b3b8-7267-90e2-af4fa3e2eaf9",
            404,
            "not found",
        ),
        (
            "GET",
            "/api/v1/jobs/01a23d37-b3b8-7267-90e2-af4fa3e2eaf9/metrics?limit=0x10",
            400,
            "limit: must be a number",
        ),
        (
            "GET",
            "/api/v1/jobs/01a23d37-b3b8-7267-90e2-af4fa3e2eaf9/events?after_event_id=-1",
            400,
            "after_event_id",
        ),
        (
            "GET",
            "/api/v1/nothing",
            404,
            "no API route /api/v1/nothing",
        ),
    ];
    for (method, path, want, needle) in cases {
        let (status, body) = http(&web, method, path, &with, "").await;
        assert_eq!(status, *want, "{path}: {body}");
        assert!(
            body["message"].as_str().is_some_and(|m| m.contains(needle)),
            "{path}: {body}"
        );
    }

    // A stranger's cancel is refused before its body is read: headers promising a large body
    // that never comes get their 401 at once.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(&web).await.expect("connect");
        let head = format!(
            "POST /api/v1/jobs/01a23d37-b3b8-7267-90e2-af4fa3e2eaf9/cancel HTTP/1.1\r\nHost: {web}\r\n\
             Content-Type: application/json\r\nContent-Length: 1000000\r\n\r\n"
        );
        s.write_all(head.as_bytes()).await.expect("send");
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("an answer without the body, within 5 s")
            .expect("read");
        let text = String::from_utf8_lossy(&buf[..n]);
        assert!(text.starts_with("HTTP/1.1 401"), "{text}");
    }

    // Cancel: a JSON body only (a cross-site form cannot send one), and it changes nothing
    // when refused.
    let mut jobs = JobServiceClient::new(coord.channel_with_token(Some(admin)));
    let job = submit_job(
        &mut jobs,
        segtrain_tests::coordinator::queued_spec("api", 1),
    )
    .await;
    let cancel = format!("/api/v1/jobs/{}/cancel", job.id);
    let (status, body) = http(&web, "POST", &cancel, &with, "reason=x").await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("Content-Type: must be application/json")),
        "{body}"
    );
    let json_type = [auth.as_str(), "Content-Type: application/json"];
    let (status, body) = http(&web, "POST", &cancel, &json_type, "{\"reason\": 7}").await;
    assert_eq!(status, 400);
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("reason: must be a string")),
        "{body}"
    );
    assert_eq!(
        segtrain_tests::coordinator::get_job(&mut jobs, &job.id)
            .await
            .state(),
        pb::JobState::Queued
    );
    let (status, body) = http(
        &web,
        "POST",
        &cancel,
        &json_type,
        "{\"reason\": \"from curl\"}",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"], "CANCELED");
    assert_eq!(body["reason"], "from curl");
    // Canceling it again changes nothing, as in gRPC.
    let (status, body) = http(&web, "POST", &cancel, &json_type, "{}").await;
    assert_eq!(
        (status, &body["reason"]),
        (200, &serde_json::json!("from curl")),
        "{body}"
    );

    // A worker token is refused by ClusterService's rule, as HTTP 403.
    let worker = segtrain_tests::coordinator::coordinator_command(&[
        "token",
        "create",
        "--database-url",
        &pg.url(),
        "--role",
        "worker",
        "--name",
        "w",
    ]);
    let auth = format!("Authorization: Bearer {}", worker.trim());
    let (status, body) = http(&web, "GET", "/api/v1/workers", &[auth.as_str()], "").await;
    assert_eq!(
        (status, body["code"].as_str()),
        (403, Some("PERMISSION_DENIED")),
        "{body}"
    );
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("is a worker token")),
        "{body}"
    );
}

#[tokio::test]
async fn a_job_page_picks_its_stream_up_again_after_a_coordinator_restart() {
    use segtrain_proto::v1::worker_event::Payload;
    use segtrain_tests::coordinator::{queued_spec, FakeWorker};
    use tokio::io::AsyncBufReadExt;

    let pg = TempPostgres::start().expect("PostgreSQL");
    let web = format!("127.0.0.1:{}", free_port());
    let mut coord = CoordinatorProcess::start_with_args(
        &pg.url(),
        &["--web-listen", &web, "--lease-seconds", "300"],
    )
    .await;
    let mut w = FakeWorker::register(&coord, "host-a", 0).await;
    let mut jobs = JobServiceClient::new(coord.channel().await);
    let job = submit_job(&mut jobs, queued_spec("resume", 1)).await;
    let a = w.start().await;
    w.started(&a).await;
    let metrics = |w: &mut FakeWorker, it: u64| {
        w.event(
            &job.id,
            1,
            0,
            Payload::Metrics(pb::MetricsReport {
                iteration: it,
                values: [("loss".to_string(), 1.0 / it as f64)].into(),
            }),
        )
    };
    let first: Vec<_> = (1..=5).map(|i| metrics(&mut w, i * 10)).collect();
    w.report(first).await.expect("report");

    let mut node = tokio::process::Command::new("/usr/bin/node")
        .arg(repo().join("tests/web/resume.mjs"))
        .env("URL", format!("http://{web}"))
        .env("JOB", &job.id)
        .env("BEFORE", "5")
        .env("AFTER", "10")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run node");
    let mut lines = tokio::io::BufReader::new(node.stdout.take().expect("stdout")).lines();
    let ready = tokio::time::timeout(Duration::from_secs(120), lines.next_line())
        .await
        .expect("the page within 120 s")
        .expect("read")
        .expect("a line");
    assert!(ready.starts_with("ready"), "{ready}");

    // kill -9 and start again on the same ports; then five more points.
    coord.restart().await;
    let more: Vec<_> = (6..=10).map(|i| metrics(&mut w, i * 10)).collect();
    w.report(more).await.expect("report after the restart");

    let summary = tokio::time::timeout(Duration::from_secs(120), lines.next_line())
        .await
        .expect("the page caught up within 120 s")
        .expect("read")
        .expect("a summary line");
    let status = node.wait().await.expect("node");
    assert!(status.success(), "{summary}\n{}", coord.log_text());
    let v: serde_json::Value = serde_json::from_str(&summary).expect("json");
    // Every event of the log once: the resumed stream started after the last one it had.
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM job_events WHERE job_id = $1::uuid")
        .bind(&job.id)
        .fetch_one(&sqlx::PgPool::connect(&pg.url()).await.expect("db"))
        .await
        .expect("count");
    assert_eq!(v["events_after"], stored, "{summary}");
    assert_eq!(v["events_before"], stored - 5, "{summary}");
}
