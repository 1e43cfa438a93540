//! Nobody without a valid token can slow the service down (docs/security.md, "Strangers"): a
//! TLS coordinator with tokens, a real CPU daemon training a real job, and meanwhile a flood of
//! requests with made-up tokens (half of the minted shape, half not) and as many WatchJob
//! streams as the per-token quota allows on several tokens. No heartbeat may be refused, no lease
//! may expire, the job must succeed on its first attempt, and every watcher must see its end.
//! The load held is printed (bench/results.md keeps a copy).

use segtrain_proto::v1 as pb;
use segtrain_proto::v1::job_service_client::JobServiceClient;
use segtrain_tests::coordinator::{free_port, submit_job, CoordinatorProcess};
use segtrain_tests::daemon::DaemonProcess;
use segtrain_tests::dataset::{synth_dir, tiny_job};
use segtrain_tests::metrics::scrape_parsed;
use segtrain_tests::pg::TempPostgres;
use segtrain_tests::wait::poll_until;
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::Code;

/// Flood connections, and requests in flight on each.
const CHANNELS: usize = 16;
const IN_FLIGHT: usize = 128;
/// WatchJob streams one token may hold (the coordinator's flag), and tokens that hold them.
const WATCH_QUOTA: usize = 8;
const WATCH_TOKENS: usize = 3;

/// A made-up token: the minted shape (it costs a lookup) or not (refused without one).
fn made_up(n: u64) -> String {
    const URL_SAFE: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    if n.is_multiple_of(2) {
        // 43 base64url characters, different for every n.
        let mut x = n ^ u64::from(std::process::id()) << 40;
        let body: String = (0..43)
            .map(|i| {
                let c = URL_SAFE[((x >> (i % 10 * 6)) & 63) as usize] as char;
                if i % 10 == 9 {
                    x = x.rotate_left(7) ^ 0x9e37_79b9_7f4a_7c15;
                }
                c
            })
            .collect();
        format!("segtrain_{body}")
    } else {
        format!("nonsense-{n}")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_strangers_and_watchers_does_not_touch_the_workers() {
    let (tmp, data) = synth_dir(8, 2);
    let pg = TempPostgres::start().expect("PostgreSQL");
    let metrics_port = free_port();
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let quota = WATCH_QUOTA.to_string();
    // A short lease (heartbeats every 2 s) and a short wait for a database connection: a
    // heartbeat slowed by the flood shows as a refusal, an expiry as a lost worker.
    let coord = CoordinatorProcess::start_secure(
        &pg.url(),
        &[
            "--lease-seconds",
            "6",
            "--database-acquire-timeout-ms",
            "1000",
            "--max-watch-streams-per-token",
            &quota,
            "--metrics-listen",
            &metrics_addr,
        ],
        false,
    )
    .await;
    let (worker, _) = coord.create_token(pb::TokenRole::Worker, "workers").await;
    let token_file = CoordinatorProcess::token_file(tmp.path(), "worker.token", &worker);
    let daemon_port = free_port();
    let daemon_metrics = format!("127.0.0.1:{daemon_port}");
    let ca = coord.ca().expect("ca");
    let args: Vec<&OsStr> = vec![
        OsStr::new("--ca"),
        ca.as_os_str(),
        OsStr::new("--token-file"),
        token_file.as_os_str(),
        OsStr::new("--metrics-listen"),
        OsStr::new(&daemon_metrics),
    ];
    let daemon =
        DaemonProcess::start_with_args(&coord.url(), "cpu-a", &tmp.path().join("a"), &args);
    let logs = || {
        format!(
            "coordinator:\n{}\ndaemon:\n{}",
            coord.log_text(),
            daemon.log_text()
        )
    };

    // The job, and its watchers: each token fills its quota; one more is refused.
    let mut watchers = Vec::new();
    for t in 0..WATCH_TOKENS {
        let (client, _) = coord
            .create_token(pb::TokenRole::Client, &format!("watcher-{t}"))
            .await;
        watchers.push(JobServiceClient::new(
            coord.channel_with_token(Some(&client)),
        ));
    }
    let job = submit_job(
        &mut watchers[0],
        tiny_job("under-flood", &data, &tmp.path().join("ckpt"), 1, 40),
    )
    .await;
    let mut streams = Vec::new();
    for c in &mut watchers {
        for _ in 0..WATCH_QUOTA {
            let s = c
                .watch_job(pb::WatchJobRequest {
                    job_id: job.id.clone(),
                    after_event_id: 0,
                })
                .await
                .expect("a watcher within the quota")
                .into_inner();
            streams.push(s);
        }
    }
    let over = watchers[0]
        .watch_job(pb::WatchJobRequest {
            job_id: job.id.clone(),
            after_event_id: 0,
        })
        .await
        .expect_err("one stream over the quota");
    assert_eq!(over.code(), Code::ResourceExhausted, "{}", over.message());
    assert!(
        over.message().contains("--max-watch-streams-per-token"),
        "{}",
        over.message()
    );
    // Each watcher reads to the end: the job's last event is its SUCCEEDED state change.
    let ended = Arc::new(AtomicU64::new(0));
    let readers: Vec<_> = streams
        .into_iter()
        .map(|mut s| {
            let ended = ended.clone();
            tokio::spawn(async move {
                let mut last = None;
                while let Ok(Some(ev)) = s.message().await {
                    last = Some(ev);
                }
                let done = last.is_some_and(|ev| {
                    matches!(ev.payload, Some(pb::job_event::Payload::StateChange(ref c))
                        if c.to == pb::JobState::Succeeded as i32)
                });
                if done {
                    ended.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();

    // The flood, until the job ends.
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let codes: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let started = Instant::now();
    let mut flooders = Vec::new();
    for c in 0..CHANNELS {
        let channel = coord.channel_with_token(None);
        for i in 0..IN_FLIGHT {
            let (channel, stop, sent, codes) =
                (channel.clone(), stop.clone(), sent.clone(), codes.clone());
            flooders.push(tokio::spawn(async move {
                let mut client = JobServiceClient::new(channel);
                let mut n = ((c * IN_FLIGHT + i) as u64) << 32;
                while !stop.load(Ordering::SeqCst) {
                    n += 1;
                    let mut req = tonic::Request::new(pb::ListJobsRequest::default());
                    let value = format!("Bearer {}", made_up(n));
                    if let Ok(v) = value.parse() {
                        req.metadata_mut().insert("authorization", v);
                    }
                    let code = match client.list_jobs(req).await {
                        Ok(_) => "OK".to_string(),
                        Err(e) => format!("{:?}", e.code()),
                    };
                    sent.fetch_add(1, Ordering::Relaxed);
                    if let Ok(mut m) = codes.lock() {
                        *m.entry(code).or_default() += 1;
                    }
                }
            }));
        }
    }
    // A legitimate client polls the job meanwhile: every refusal it gets is counted.
    let legit_refused = AtomicU64::new(0);
    let ended_state = || async {
        let req = pb::GetJobRequest {
            job_id: job.id.clone(),
        };
        match watchers[1].clone().get_job(req).await {
            Ok(j) => !matches!(
                j.into_inner().state(),
                pb::JobState::Queued | pb::JobState::Scheduled | pb::JobState::Running
            ),
            Err(e) => {
                legit_refused.fetch_add(1, Ordering::SeqCst);
                eprintln!("a legitimate GetJob was refused: {e}");
                false
            }
        }
    };
    poll_until(Duration::from_secs(600), "the job ends", logs, ended_state).await;
    let flood_s = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::SeqCst);
    for f in flooders {
        let _ = f.await;
    }
    for r in readers {
        let _ = tokio::time::timeout(Duration::from_secs(30), r).await;
    }

    // What the flood held, for the test's output and bench/results.md.
    let sent = sent.load(Ordering::SeqCst);
    let codes = codes.lock().map(|m| m.clone()).unwrap_or_default();
    let coordinator = scrape_parsed(metrics_port)
        .await
        .expect("coordinator metrics");
    let checks = |a: &str| {
        coordinator
            .get("segtrain_token_checks_total", &[("answer", a)])
            .unwrap_or(f64::NAN)
    };
    let daemon_page = scrape_parsed(daemon_port).await.expect("daemon metrics");
    let failures = daemon_page
        .get("segtrain_worker_heartbeat_failures_total", &[])
        .unwrap_or(f64::NAN);
    println!(
        "flood: {sent} requests with made-up tokens in {flood_s:.1} s ({:.0}/s, {} in flight on \
         {CHANNELS} TLS connections), answers {codes:?}; {} WatchJob streams on {WATCH_TOKENS} \
         tokens, {} saw the end; token checks: shape {}, database {}, cache {}, stale {}, \
         failed {}; daemon heartbeat failures {failures}, legitimate GetJob refused {}",
        sent as f64 / flood_s,
        CHANNELS * IN_FLIGHT,
        WATCH_QUOTA * WATCH_TOKENS,
        ended.load(Ordering::SeqCst),
        checks("shape"),
        checks("database"),
        checks("cache"),
        checks("stale"),
        checks("failed"),
        legit_refused.load(Ordering::SeqCst),
    );

    let end = segtrain_tests::coordinator::get_job(&mut watchers[2], &job.id).await;
    assert_eq!(end.state(), pb::JobState::Succeeded, "{}", logs());
    assert_eq!((end.attempt, end.restarts), (1, 0), "{}", logs());
    assert!(sent >= 1000, "the flood sent only {sent} requests");
    assert_eq!(
        codes.get("OK"),
        None,
        "a made-up token was accepted: {codes:?}"
    );
    assert_eq!(
        failures,
        0.0,
        "heartbeats refused under the flood:\n{}",
        logs()
    );
    assert_eq!(
        legit_refused.load(Ordering::SeqCst),
        0,
        "a valid client was refused"
    );
    assert!(!coord.log_text().contains("lease expired"), "{}", logs());
    assert_eq!(
        ended.load(Ordering::SeqCst) as usize,
        WATCH_QUOTA * WATCH_TOKENS,
        "every watcher sees the job end"
    );
    // Half the flood never reached the database.
    assert!(
        checks("shape") >= (sent / 2) as f64 * 0.9,
        "{coordinator:?}"
    );
    let workers = segtrain_proto::v1::cluster_service_client::ClusterServiceClient::new(
        coord.channel_with_token(coord.admin_token()),
    )
    .list_workers(pb::ListWorkersRequest::default())
    .await
    .expect("workers")
    .into_inner()
    .workers;
    assert!(
        workers.iter().all(|w| w.state() == pb::WorkerState::Idle),
        "{workers:?}"
    );
}
