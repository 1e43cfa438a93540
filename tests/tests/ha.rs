//! Several coordinators on one PostgreSQL (docs/operations.md, "Several coordinators"): both
//! serve at once, and when one is killed -9 under load the daemons, the CLI and a watcher carry
//! on through the other. Nothing is lost, failed, doubled or falsely expired.

use segtrain_proto::v1 as pb;
use segtrain_tests::binaries;
use segtrain_tests::coordinator::{queued_spec, CoordinatorProcess};
use segtrain_tests::daemon::{counting_trainer, DaemonProcess};
use segtrain_tests::pg::TempPostgres;
use segtrain_tests::sql::job_value;
use segtrain_tests::wait::poll_until;
use sqlx::PgPool;
use std::ffi::OsStr;
use std::process::{Command, Stdio};
use std::time::Duration;

const DAEMONS: usize = 6;
const JOBS: usize = 12;
const ITERATIONS: u32 = 40;
/// Metric names per iteration.
const NAMES: [&str; 3] = ["loss", "lr", "images_per_s"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_one_of_two_coordinators_under_load_loses_and_doubles_nothing() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let pg = TempPostgres::start().expect("PostgreSQL");
    let args = [
        "--lease-seconds",
        "6",
        "--scheduler-interval-ms",
        "200",
        "--restart-backoff-ms",
        "500",
    ];
    let a = CoordinatorProcess::start_with_args(&pg.url(), &args).await;
    let b = CoordinatorProcess::start_with_args(&pg.url(), &args).await;
    let pool = PgPool::connect(&pg.url()).await.expect("connect");
    let a_first = format!("{},{}", a.url(), b.url());
    let b_first = format!("{},{}", b.url(), a.url());
    // Killed half-way; its log is still read for failure messages.
    let a = std::cell::RefCell::new(a);

    // Half the daemons call A first, half B: both coordinators serve workers (and both schedule).
    let trainer = counting_trainer(tmp.path(), ITERATIONS, &NAMES, 0.1);
    let trainer_args = [OsStr::new("--trainer"), trainer.as_os_str()];
    let daemons: Vec<DaemonProcess> = (0..DAEMONS)
        .map(|i| {
            let list = if i % 2 == 0 { &a_first } else { &b_first };
            let work = tmp.path().join(format!("work-{i}"));
            DaemonProcess::start_full(list, &format!("cpu-{i}"), &work, 5, &[], &trainer_args)
        })
        .collect();
    let logs = || {
        let a = a.borrow().log_text();
        let mut s = format!("A:\n{a}\nB:\n{}\n", b.log_text());
        for (i, d) in daemons.iter().enumerate() {
            s += &format!("daemon {i}:\n{}\n", d.log_text());
        }
        s
    };
    let registered = || async {
        job_value::<i64>(&pool, "SELECT count(*) FROM workers WHERE $1 = $1", "").await
            == DAEMONS as i64
    };
    poll_until(
        Duration::from_secs(60),
        "every daemon registered",
        logs,
        registered,
    )
    .await;

    // Twelve jobs (two waves on six workers), half submitted through each coordinator.
    let mut ids = Vec::new();
    for i in 0..JOBS {
        let name = format!("ha-{i}");
        let id = if i % 2 == 0 {
            let via = a.borrow().url();
            submit_via(&via, spec(&name)).await
        } else {
            b.submit_spec(spec(&name)).await
        };
        ids.push(id);
    }
    // A watcher of the first job through A first: it must follow the job to its end.
    let watch_out = tmp.path().join("watch.out");
    let watch_err = tmp.path().join("watch.err");
    let mut watcher = Command::new(binaries::path("segtrain"))
        .args(["--coordinator", &a_first, "watch", &ids[0]])
        .stdout(std::fs::File::create(&watch_out).expect("watch out"))
        .stderr(std::fs::File::create(&watch_err).expect("watch err"))
        .stdin(Stdio::null())
        .spawn()
        .expect("segtrain watch");

    // Under load: the first wave is training and reporting.
    let training = || async {
        job_value::<i64>(
            &pool,
            "SELECT count(DISTINCT job_id) FROM metrics WHERE iteration >= 5 AND $1 = $1",
            "",
        )
        .await
            >= DAEMONS as i64 / 2
    };
    poll_until(
        Duration::from_secs(60),
        "the first wave trains",
        logs,
        training,
    )
    .await;
    a.borrow_mut().kill();

    // The CLI's one-shot commands find B (A is first in their list and refuses connections).
    binaries::run_ok(
        Command::new(binaries::path("segtrain")).args([
            "--coordinator",
            &a_first,
            "status",
            &ids[1],
        ]),
        "segtrain status through A,B with A dead",
    );

    let all_done = || async {
        job_value::<i64>(
            &pool,
            "SELECT count(*) FROM jobs WHERE state IN ('SUCCEEDED','FAILED','CANCELED') AND $1 = $1",
            "",
        )
        .await
            == JOBS as i64
    };
    poll_until(Duration::from_secs(180), "every job ends", logs, all_done).await;

    // No job lost or failed: each succeeded on its first attempt, without a restart.
    for id in &ids {
        let job = b.get_job(id).await;
        assert_eq!(job.state(), pb::JobState::Succeeded, "{id}: {}", job.reason);
        assert_eq!((job.attempt, job.restarts), (1, 0), "{id}: {}", job.reason);
    }
    // No false lease expiry: no worker and no rank was ever declared lost.
    let lost: i64 = job_value(
        &pool,
        "SELECT (SELECT count(*) FROM workers WHERE state = 'LOST')
              + (SELECT count(*) FROM attempt_ranks WHERE outcome <> 'SUCCEEDED')
              + (SELECT count(*) FROM attempts WHERE state <> 'SUCCEEDED') + 0 * length($1)",
        "",
    )
    .await;
    assert_eq!(
        lost,
        0,
        "a worker, rank or attempt did not end well:\n{}",
        logs()
    );
    // Every point stored once, and every metrics event once.
    for id in &ids {
        let points: i64 = job_value(
            &pool,
            "SELECT count(*) FROM metrics WHERE job_id = $1::uuid",
            id,
        )
        .await;
        assert_eq!(points, i64::from(ITERATIONS) * NAMES.len() as i64, "{id}");
        let (events, distinct): (i64, i64) = sqlx::query_as(
            "SELECT count(*), count(DISTINCT payload->>'iteration') FROM job_events
             WHERE job_id = $1::uuid AND kind = 'metrics'",
        )
        .bind(id)
        .fetch_one(&pool)
        .await
        .expect("events");
        assert_eq!(
            (events, distinct),
            (i64::from(ITERATIONS), i64::from(ITERATIONS)),
            "{id}"
        );
    }
    // The daemons that called A first moved to B.
    let moved = (0..DAEMONS)
        .step_by(2)
        .filter(|&i| daemons[i].log_text().contains("failing over"))
        .count();
    assert_eq!(moved, DAEMONS.div_ceil(2), "{}", logs());
    // The watcher resumed on B and saw the job to its end.
    let status = wait_exit(&mut watcher, Duration::from_secs(60));
    let printed = std::fs::read_to_string(&watch_out).unwrap_or_default();
    let said = std::fs::read_to_string(&watch_err).unwrap_or_default();
    assert_eq!(status, Some(0), "watch: {printed}\n{said}");
    assert!(printed.contains("SUCCEEDED"), "watch printed: {printed}");
}

/// SubmitJob through the coordinator at `url` (plaintext, no token); the job's id.
async fn submit_via(url: &str, spec: pb::JobSpec) -> String {
    let channel = tonic::transport::Endpoint::from_shared(url.to_string())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    pb::job_service_client::JobServiceClient::new(channel)
        .submit_job(pb::SubmitJobRequest {
            spec: Some(spec),
            ..Default::default()
        })
        .await
        .expect("submit")
        .into_inner()
        .job
        .expect("job")
        .id
}

/// A world-1 job for the stand-in trainer (which ignores it; the coordinator validates it).
fn spec(name: &str) -> pb::JobSpec {
    pb::JobSpec {
        dataset_root: Some("/data/none".into()),
        max_iters: Some(u64::from(ITERATIONS)),
        warmup_iters: Some(1),
        max_restarts: Some(0),
        ..queued_spec(name, 1)
    }
}

fn wait_exit(child: &mut std::process::Child, timeout: Duration) -> Option<i32> {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if let Ok(Some(s)) = child.try_wait() {
            return s.code();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    None
}
