//! Monitoring, end to end: the coordinator's and two CPU worker daemons' `/metrics` pages are
//! scraped while a world-size-2 job is queued, runs and succeeds. The gauges must move (jobs
//! QUEUED → RUNNING → SUCCEEDED, workers BUSY then IDLE, trainers running then idle with a step
//! time and a throughput), the counters and histograms must count what happened, every page must
//! be valid text exposition, a scrape must still answer while PostgreSQL is down, and the JSON log
//! lines about a job must carry its job, attempt and rank.

use segtrain_proto::v1 as pb;
use segtrain_tests::coordinator::{free_port, CoordinatorProcess};
use segtrain_tests::daemon::DaemonProcess;
use segtrain_tests::dataset::{synth_dir, tiny_job};
use segtrain_tests::metrics::{scrape_parsed, Exposition};
use segtrain_tests::pg::TempPostgres;
use std::ffi::OsStr;
use std::time::{Duration, Instant};

const JOB_STATES: &[&str] = &[
    "QUEUED",
    "SCHEDULED",
    "RUNNING",
    "SUCCEEDED",
    "FAILED",
    "CANCELED",
    "RESTARTING",
    "CANCELING",
];

fn jobs(e: &Exposition, state: &str) -> f64 {
    e.get("segtrain_jobs", &[("state", state)])
        .unwrap_or_else(|| panic!("segtrain_jobs{{state={state}}} missing"))
}

fn workers(e: &Exposition, state: &str) -> f64 {
    e.get("segtrain_workers", &[("state", state)])
        .unwrap_or_else(|| panic!("segtrain_workers{{state={state}}} missing"))
}

fn ingested(e: &Exposition, kind: &str) -> f64 {
    e.get("segtrain_events_ingested_total", &[("kind", kind)])
        .unwrap_or_else(|| panic!("segtrain_events_ingested_total{{kind={kind}}} missing"))
}

fn trainer_state(e: &Exposition) -> Vec<String> {
    e.series("segtrain_worker_trainer_state")
        .iter()
        .filter(|s| s.value == 1.0)
        .filter_map(|s| s.labels.get("state").cloned())
        .collect()
}

/// Scrapes `port` until `cond` holds (or panics after `limit`, with the last page and `ctx`).
async fn wait_for(
    port: u16,
    limit: Duration,
    what: &str,
    ctx: impl Fn() -> String,
    cond: impl Fn(&Exposition) -> bool,
) -> Exposition {
    let deadline = Instant::now() + limit;
    loop {
        let last = match scrape_parsed(port).await {
            Ok(e) if cond(&e) => return e,
            Ok(e) => format!("{e:#?}"),
            Err(e) => e,
        };
        assert!(
            Instant::now() < deadline,
            "{what}: not within {limit:?}; last scrape: {last}\n{}",
            ctx()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Scrapes the coordinator on `port` until `segtrain_database_up` is `up` (1 or 0), for at
/// most `secs`: how the test follows PostgreSQL going away and coming back.
async fn wait_database(
    port: u16,
    up: f64,
    secs: u64,
    what: &str,
    ctx: impl Fn() -> String,
) -> Exposition {
    let limit = Duration::from_secs(secs);
    wait_for(port, limit, what, ctx, |e| {
        e.get("segtrain_database_up", &[]) == Some(up)
    })
    .await
}

/// The JSON log lines (tracing-subscriber's format: the event's fields under "fields").
fn json_lines(log: &str) -> Vec<serde_json::Value> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .collect()
}

fn message(l: &serde_json::Value) -> &str {
    l["fields"]["message"].as_str().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_a_job_from_queued_to_succeeded_on_coordinator_and_daemons() {
    let (tmp, data) = synth_dir(8, 2);

    let mut pg = TempPostgres::start().expect("PostgreSQL");
    let cport = free_port();
    let caddr = format!("127.0.0.1:{cport}");
    let coord = CoordinatorProcess::start_with_args(
        &pg.url(),
        &["--metrics-listen", &caddr, "--metrics-refresh-ms", "200"],
    )
    .await;
    let ctx = || format!("coordinator log:\n{}", coord.log_text());

    // Before anything: every job and worker state is exported, at 0; the database is up.
    let first = wait_database(cport, 1.0, 30, "database up", ctx).await;
    for s in JOB_STATES {
        assert_eq!(jobs(&first, s), 0.0, "{s}");
    }
    for s in ["IDLE", "BUSY", "LOST", "DRAINING"] {
        assert_eq!(workers(&first, s), 0.0, "{s}");
    }
    assert_eq!(first.get("segtrain_queue_length", &[]), Some(0.0));
    assert_eq!(first.get("segtrain_job_restarts_total", &[]), Some(0.0));
    assert_eq!(ingested(&first, "metrics"), 0.0);
    assert_eq!(
        first.types["segtrain_scheduling_latency_seconds"],
        "histogram"
    );

    // Submitted before any worker exists, the job waits QUEUED.
    let spec = pb::JobSpec {
        eval_interval: Some(6),
        checkpoint_interval: Some(6),
        ..tiny_job(
            "monitoring-e2e",
            &data,
            &tmp.path().join("checkpoints"),
            2,
            12,
        )
    };
    let job = coord.get_job(&coord.submit_spec(spec).await).await;
    let queued_at = Instant::now();
    wait_for(cport, Duration::from_secs(30), "job QUEUED", ctx, |e| {
        jobs(e, "QUEUED") == 1.0 && e.get("segtrain_queue_length", &[]) == Some(1.0)
    })
    .await;
    // Let it wait a little, so that the scheduling latency is visibly more than 0.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let (pa, pb_) = (free_port(), free_port());
    let (aa, ab) = (format!("127.0.0.1:{pa}"), format!("127.0.0.1:{pb_}"));
    let a = DaemonProcess::start_with_args(
        &coord.url(),
        "cpu-a",
        &tmp.path().join("work-a"),
        &[OsStr::new("--metrics-listen"), OsStr::new(&aa)],
    );
    let b = DaemonProcess::start_with_args(
        &coord.url(),
        "cpu-b",
        &tmp.path().join("work-b"),
        &[OsStr::new("--metrics-listen"), OsStr::new(&ab)],
    );
    let all_logs = || {
        format!(
            "coordinator log:\n{}\ndaemon a:\n{}\ndaemon b:\n{}",
            coord.log_text(),
            a.log_text(),
            b.log_text()
        )
    };

    // Scrape everything until the job is over, recording what was seen.
    let mut seen_running_job = false;
    let mut seen_busy = 0.0f64;
    let mut daemon_running = [false, false];
    let mut daemon_step_ms = [0.0f64, 0.0];
    let mut daemon_images = [0.0f64, 0.0];
    let mut daemon_ranks: Vec<(String, String, String)> = Vec::new();
    let mut metrics_ingested = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let c = scrape_parsed(cport).await.expect("coordinator scrape");
        seen_running_job |= jobs(&c, "RUNNING") == 1.0;
        seen_busy = seen_busy.max(workers(&c, "BUSY"));
        metrics_ingested.push(ingested(&c, "metrics"));
        for (i, port) in [pa, pb_].into_iter().enumerate() {
            // A daemon answers once it has bound its port; until then, skip it.
            let Ok(d) = scrape_parsed(port).await else {
                continue;
            };
            let state = trainer_state(&d);
            assert_eq!(state.len(), 1, "exactly one trainer state is 1: {d:#?}");
            if state[0] == "running" {
                daemon_running[i] = true;
                daemon_step_ms[i] = daemon_step_ms[i]
                    .max(d.get("segtrain_worker_step_time_ms", &[]).unwrap_or(0.0));
                daemon_images[i] = daemon_images[i].max(
                    d.get("segtrain_worker_images_per_second", &[])
                        .unwrap_or(0.0),
                );
            }
            for s in d.series("segtrain_worker_trainer_info") {
                let l = |k: &str| s.labels.get(k).cloned().unwrap_or_default();
                let t = (l("job"), l("attempt"), l("rank"));
                if !daemon_ranks.contains(&t) {
                    daemon_ranks.push(t);
                }
            }
            assert!(d.get("segtrain_worker_outbox_events", &[]).is_some());
            assert!(d
                .get("segtrain_worker_heartbeat_failures_total", &[])
                .is_some());
        }
        if jobs(&c, "SUCCEEDED") == 1.0 {
            break;
        }
        assert!(jobs(&c, "FAILED") == 0.0, "the job failed\n{}", all_logs());
        assert!(
            Instant::now() < deadline,
            "the job did not succeed within 5 minutes\n{}",
            all_logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    assert!(seen_running_job, "RUNNING never seen\n{}", all_logs());
    assert_eq!(seen_busy, 2.0, "both workers BUSY at some point");
    assert_eq!(daemon_running, [true, true], "both trainers seen running");
    for i in 0..2 {
        assert!(
            daemon_step_ms[i] > 0.0 && daemon_images[i] > 0.0,
            "daemon {i}: step time {} ms, {} images/s\n{}",
            daemon_step_ms[i],
            daemon_images[i],
            all_logs()
        );
    }
    daemon_ranks.sort();
    assert_eq!(
        daemon_ranks,
        vec![
            (job.id.clone(), "1".to_string(), "0".to_string()),
            (job.id.clone(), "1".to_string(), "1".to_string()),
        ],
        "the info gauge names the job, attempt and rank of each trainer"
    );
    assert!(
        metrics_ingested.windows(2).all(|w| w[1] >= w[0]),
        "a counter never goes down: {metrics_ingested:?}"
    );

    // Afterwards: the job counts as SUCCEEDED only, both workers IDLE again, trainers idle.
    let end = wait_for(
        cport,
        Duration::from_secs(30),
        "workers idle",
        all_logs,
        |e| workers(e, "IDLE") == 2.0 && workers(e, "BUSY") == 0.0,
    )
    .await;
    for s in JOB_STATES {
        let want = if *s == "SUCCEEDED" { 1.0 } else { 0.0 };
        assert_eq!(jobs(&end, s), want, "{s}");
    }
    assert_eq!(end.get("segtrain_queue_length", &[]), Some(0.0));
    assert_eq!(end.get("segtrain_job_restarts_total", &[]), Some(0.0));
    // One placement, after at least the time we watched it queued.
    assert_eq!(
        end.get("segtrain_scheduling_latency_seconds_count", &[]),
        Some(1.0)
    );
    let waited = end
        .get("segtrain_scheduling_latency_seconds_sum", &[])
        .unwrap_or(0.0);
    assert!(
        waited >= 0.5 && waited <= queued_at.elapsed().as_secs_f64() + 1.0,
        "scheduling latency {waited} s"
    );
    assert_eq!(
        end.get("segtrain_rendezvous_latency_seconds_count", &[]),
        Some(1.0)
    );
    assert!(
        end.get("segtrain_rendezvous_latency_seconds_sum", &[])
            .unwrap_or(0.0)
            > 0.0
    );
    // Every logged iteration of rank 0 once (12), both ranks' start and end, two checkpoints.
    assert_eq!(ingested(&end, "metrics"), 12.0);
    assert_eq!(ingested(&end, "started"), 2.0);
    assert_eq!(ingested(&end, "finished"), 2.0);
    assert_eq!(ingested(&end, "eval"), 2.0);
    assert_eq!(ingested(&end, "checkpoint"), 2.0);
    let events: f64 = end
        .series("segtrain_events_ingested_total")
        .iter()
        .map(|s| s.value)
        .sum();
    assert_eq!(
        end.get("segtrain_ingest_lag_seconds_count", &[]),
        Some(events),
        "one lag observation per stored event"
    );
    for port in [pa, pb_] {
        let d = wait_for(
            port,
            Duration::from_secs(30),
            "trainer idle",
            all_logs,
            |d| trainer_state(d) == ["idle"],
        )
        .await;
        assert!(d.series("segtrain_worker_trainer_info").is_empty());
        assert_eq!(d.get("segtrain_worker_step_time_ms", &[]), Some(0.0));
        assert_eq!(d.get("segtrain_worker_gpu_memory_bytes", &[]), Some(0.0));
        assert_eq!(
            d.get(
                "segtrain_worker_trainer_exits_total",
                &[("outcome", "SUCCEEDED")]
            ),
            Some(1.0)
        );
        assert!(
            d.get("segtrain_worker_events_acked_total", &[])
                .unwrap_or(0.0)
                >= 2.0
        );
    }
    let outboxes = wait_for(
        pa,
        Duration::from_secs(30),
        "outbox drained",
        all_logs,
        |d| d.get("segtrain_worker_outbox_events", &[]) == Some(0.0),
    )
    .await;
    assert_eq!(
        outboxes.get("segtrain_worker_heartbeat_failures_total", &[]),
        Some(0.0)
    );

    // Logs: every coordinator line about a job names its attempt; rank lines name the rank.
    let clog = json_lines(&coord.log_text());
    assert!(!clog.is_empty(), "the coordinator logs JSON");
    let about_job: Vec<&serde_json::Value> = clog
        .iter()
        .filter(|l| l["fields"]["job"].is_string())
        .collect();
    for l in &about_job {
        assert!(l["fields"]["attempt"].is_u64(), "no attempt: {l}");
        if message(l).starts_with("rank ") {
            assert!(l["fields"]["rank"].is_u64(), "no rank: {l}");
        }
    }
    for (msg, n) in [
        ("job submitted", 1),
        ("job scheduled", 1),
        ("rank started", 2),
        ("all ranks started", 1),
        ("rank finished", 2),
    ] {
        let found = about_job
            .iter()
            .filter(|l| message(l) == msg && l["fields"]["job"] == job.id.as_str())
            .count();
        assert_eq!(found, n, "coordinator lines {msg:?} for the job\n{}", ctx());
    }
    // Daemons: every line about a job names attempt and rank (the outbox's stale-attempt line
    // is about a batch, not a rank).
    for d in [&a, &b] {
        let dlog = json_lines(&d.log_text());
        let mine: Vec<&serde_json::Value> = dlog
            .iter()
            .filter(|l| l["fields"]["job"] == job.id.as_str())
            .collect();
        assert!(
            mine.iter().any(|l| message(l) == "trainer started")
                && mine.iter().any(|l| message(l) == "trainer finished"),
            "daemon lines about the job: {mine:#?}"
        );
        for l in mine {
            assert!(l["fields"]["attempt"] == 1, "no attempt: {l}");
            if message(l) != "events of a stale attempt dropped" {
                assert!(l["fields"]["rank"].is_u64(), "no rank: {l}");
            }
        }
    }
    // Rank 0's daemon logs the progress of every log interval, loss and speed included.
    let progress: Vec<serde_json::Value> = [&a, &b]
        .iter()
        .flat_map(|d| json_lines(&d.log_text()))
        .filter(|l| l["fields"]["job"] == job.id.as_str() && message(l) == "progress")
        .collect();
    assert!(!progress.is_empty(), "no progress lines");
    for l in &progress {
        let f = &l["fields"];
        assert!(f["rank"] == 0 && f["iteration"].is_u64(), "{l}");
        for k in ["loss", "lr", "images_per_s", "step_ms", "data_wait_ms"] {
            assert!(f[k].is_f64(), "{k} in {l}");
        }
    }

    // PostgreSQL away: a scrape still answers, with the last values and database_up 0.
    pg.stop().expect("stop PostgreSQL");
    let down = wait_database(cport, 0.0, 30, "database down", ctx).await;
    assert_eq!(jobs(&down, "SUCCEEDED"), 1.0, "the last values stay");
    assert_eq!(workers(&down, "IDLE"), 2.0);
    pg.start_again().expect("start PostgreSQL again");
    wait_database(cport, 1.0, 60, "database up again", ctx).await;
}
