//! Reliability against operator mistakes and misbehaving trainers (issue 14), end to end: a real
//! PostgreSQL, the real coordinator and real worker daemons, with trainers that are either the
//! real one or a stand-in script (`segtrain-worker daemon --trainer PATH`) printing exactly the
//! lines a test needs.
//!
//! - One (host, GPU), one daemon: a second daemon for it is refused and exits; one that crashed
//!   and is restarted at once takes its place back; a daemon whose place was taken while it was
//!   frozen exits when it comes back.
//! - The event path: a NaN eval loss, an unknown event kind, a malformed line, a 10 MB line and
//!   an event the coordinator refuses never stall a job; every valid event is stored once and a
//!   note says what was dropped.
//! - Failure classes and settings: a dataset file vanishing mid-run is an infrastructure
//!   failure; `pretrained = "gs://..."` is fetched (or fails at once when the object is missing);
//!   the coordinator's stop grace reaches the trainer; WatchJob polls as often as
//!   `--poll-interval-ms` says; the database pool is a flag and the health probe never waits
//!   behind RPCs.
//!
//! The tests run one at a time: they share two cores, and some time leases.

use segtrain_proto::v1 as pb;
use segtrain_tests::binaries;
use segtrain_tests::coordinator::{notes, queued_spec, CoordinatorProcess};
use segtrain_tests::daemon::{alive, counting_trainer, stand_in_trainer, DaemonProcess};
use segtrain_tests::dataset::{synth_data, tiny_job};
use segtrain_tests::metrics::scrape_parsed;
use segtrain_tests::pg::TempPostgres;
use segtrain_tests::sql::{attempt_reason, job_value, rank_outcomes};
use segtrain_tests::wait::poll_until_ok;
use sqlx::PgPool;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// PostgreSQL, a coordinator and the daemons a test starts.
struct Env {
    tmp: tempfile::TempDir,
    _pg: TempPostgres,
    coord: CoordinatorProcess,
    pool: PgPool,
}

impl Env {
    async fn start(coordinator_args: &[&str]) -> Env {
        let tmp = tempfile::tempdir().expect("temp dir");
        let pg = TempPostgres::start().expect("PostgreSQL");
        let coord = CoordinatorProcess::start_with_args(&pg.url(), coordinator_args).await;
        let pool = PgPool::connect(&pg.url()).await.expect("connect");
        Env {
            tmp,
            _pg: pg,
            coord,
            pool,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    /// A CPU daemon for `host` with its work dir `work` (under the test's temp dir).
    fn daemon(&self, host: &str, work: &str, grace_s: u32, args: &[&OsStr]) -> DaemonProcess {
        DaemonProcess::start_full(
            &self.coord.url(),
            host,
            &self.path(work),
            grace_s,
            &[],
            args,
        )
    }

    /// Polls until `sql` (one boolean; `$1` is the job id as text) is true.
    async fn wait_sql(&self, job: &str, sql: &str, timeout: Duration, logs: &dyn Fn() -> String) {
        let query = || sqlx::query_scalar(sql).bind(job).fetch_one(&self.pool);
        let all_logs = || format!("coordinator:\n{}\n{}", self.coord.log_text(), logs());
        poll_until_ok(timeout, sql, all_logs, query).await;
    }

    /// Polls until `condition` holds on the job's row in `jobs`.
    async fn wait_job(&self, id: &str, condition: &str, secs: u64, logs: &dyn Fn() -> String) {
        let sql = format!("SELECT {condition} FROM jobs WHERE id = $1::uuid");
        self.wait_sql(id, &sql, Duration::from_secs(secs), logs)
            .await;
    }

    /// Polls until the job has stored a metric of `iteration` or later.
    async fn wait_metrics(&self, id: &str, iteration: u64, secs: u64, logs: &dyn Fn() -> String) {
        let sql = format!(
            "SELECT EXISTS (SELECT 1 FROM metrics WHERE job_id = $1::uuid AND iteration >= {iteration})"
        );
        self.wait_sql(id, &sql, Duration::from_secs(secs), logs)
            .await;
    }

    /// Polls until `condition` (over `workers`, no job) holds.
    async fn wait_workers(&self, condition: &str, secs: u64, logs: &dyn Fn() -> String) {
        let sql = format!("SELECT {condition} OR $1 = 'never' FROM workers");
        self.wait_sql("", &sql, Duration::from_secs(secs), logs)
            .await;
    }

    async fn wait_terminal(&self, id: &str, timeout: Duration, logs: &dyn Fn() -> String) {
        let terminal = "state IN ('SUCCEEDED','FAILED','CANCELED')";
        self.wait_job(id, terminal, timeout.as_secs(), logs).await;
    }

    async fn count(&self, sql: &str, job: &str) -> i64 {
        job_value(&self.pool, sql, job).await
    }
}

/// A world-1 job for stand-in trainers (which ignore it; the coordinator validates it).
fn stand_in_spec(name: &str) -> pb::JobSpec {
    pb::JobSpec {
        dataset_root: Some("/data/none".into()),
        max_iters: Some(4),
        warmup_iters: Some(1),
        max_restarts: Some(1),
        ..queued_spec(name, 1)
    }
}

/// The synthetic dataset and a small real job on it (world size 1, B0 at 64x64).
fn real_spec(env: &Env, name: &str, max_iters: u64) -> pb::JobSpec {
    let data = env.path("data");
    if !data.exists() {
        synth_data(&data, 4, 2);
    }
    pb::JobSpec {
        max_restarts: Some(2),
        ..tiny_job(name, &data, &env.path("checkpoints"), 1, max_iters)
    }
}

fn trainer_arg(path: &Path) -> [&OsStr; 2] {
    [OsStr::new("--trainer"), path.as_os_str()]
}

/// The rank directories (`<job>-a<attempt>-r<rank>`) a daemon made in its work dir: one per
/// trainer it ran.
fn trainer_dirs(work: &Path) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(work)
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().is_dir())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// The last non-empty line a process wrote to its log.
fn last_line(text: &str) -> String {
    text.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .to_string()
}

// ---- 1. One (host, GPU), one daemon, one trainer per rank -------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_daemon_for_one_host_and_gpu_is_refused_and_a_superseded_one_exits() {
    let _serial = SERIAL.lock().await;
    let env = Env::start(&["--lease-seconds", "3", "--scheduler-interval-ms", "200"]).await;
    let trainer = counting_trainer(env.tmp.path(), 3, &["loss"], 0.2);
    let t = trainer_arg(&trainer);
    let mut a = env.daemon("same-host", "work-a", 5, &t);
    let none = || String::new();
    env.wait_workers("count(*) FILTER (WHERE state = 'IDLE') = 1", 30, &none)
        .await;

    // A copy of the unit on another work dir (a cloned VM, a second container): refused by the
    // coordinator, one line naming the host, the GPU and since when the other holds it.
    let mut b = env.daemon("same-host", "work-b", 5, &t);
    let status = b.wait_exit(Duration::from_secs(20));
    let b_log = b.log_text();
    assert!(
        status.is_some_and(|s| !s.success()),
        "the second daemon must exit non-zero, got {status:?}\n{b_log}"
    );
    let line = last_line(&b_log);
    for needle in ["ALREADY_EXISTS", "same-host", "cpu", "since"] {
        assert!(line.contains(needle), "{needle:?} not in {line:?}");
    }
    // A copy on the same work dir: refused by the work dir's lock before it registers.
    let mut c = env.daemon("same-host", "work-a", 5, &t);
    let status = c.wait_exit(Duration::from_secs(20));
    let c_log = c.log_text();
    assert!(status.is_some_and(|s| !s.success()), "{c_log}");
    assert!(last_line(&c_log).contains("work dir"), "{c_log}");
    assert_eq!(
        env.count("SELECT count(*) FROM workers WHERE $1 = $1", "")
            .await,
        1
    );

    // A world-1 job runs in exactly one trainer.
    let id = env.coord.submit_spec(stand_in_spec("one-trainer")).await;
    let logs = || format!("daemon a:\n{}", a.log_text());
    env.wait_terminal(&id, Duration::from_secs(30), &logs).await;
    assert_eq!(
        env.coord.get_job(&id).await.state(),
        pb::JobState::Succeeded
    );
    assert_eq!(trainers_started(&a.log_text(), &id), 1);
    assert_eq!(trainers_started(&b_log, &id), 0);
    // Its work dir was removed once the rank had finished.
    assert!(trainer_dirs(&env.path("work-a")).is_empty());

    // A frozen daemon loses its place once its lease has expired; when it comes back it
    // finds another daemon there and exits rather than run a second trainer.
    a.freeze();
    env.wait_workers("state = 'LOST'", 20, &none).await;
    let b = env.daemon("same-host", "work-b", 5, &t);
    env.wait_workers("state = 'IDLE'", 20, &|| b.log_text())
        .await;
    a.thaw();
    let status = a.wait_exit(Duration::from_secs(20));
    let a_log = a.log_text();
    assert!(
        status.is_some_and(|s| !s.success()),
        "the superseded daemon must exit non-zero, got {status:?}\n{a_log}"
    );
    assert!(last_line(&a_log).contains("replaced"), "{a_log}");
    // The one that holds the place now runs the next job.
    let id = env.coord.submit_spec(stand_in_spec("after-takeover")).await;
    env.wait_terminal(&id, Duration::from_secs(30), &|| b.log_text())
        .await;
    assert_eq!(
        env.coord.get_job(&id).await.state(),
        pb::JobState::Succeeded
    );
    assert_eq!(trainers_started(&b.log_text(), &id), 1);
    assert!(trainer_dirs(&env.path("work-b")).is_empty());
}

/// How many trainers a daemon's log says it started for job `id`.
fn trainers_started(log: &str, id: &str) -> usize {
    log.lines()
        .filter(|l| l.contains("\"trainer started\"") && l.contains(id))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_killed_and_restarted_at_once_takes_its_place_back_before_its_lease_expires() {
    let _serial = SERIAL.lock().await;
    // A long lease: the restarted daemon must not wait for it.
    let env = Env::start(&[
        "--lease-seconds",
        "60",
        "--scheduler-interval-ms",
        "200",
        "--restart-backoff-ms",
        "200",
    ])
    .await;
    let trainer = counting_trainer(env.tmp.path(), 15, &["loss"], 0.2);
    let t = trainer_arg(&trainer);
    let mut a = env.daemon("restarted", "work", 5, &t);
    let id = env.coord.submit_spec(stand_in_spec("restart")).await;
    let logs = || a.log_text();
    env.wait_metrics(&id, 2, 30, &logs).await;
    a.kill();
    let restarted_at = Instant::now();
    let a = env.daemon("restarted", "work", 5, &t);
    let logs = || a.log_text();
    // The restarted daemon registers at once (its work dir proves it succeeds the killed one),
    // which ends the orphaned rank and restarts the job.
    env.wait_job(&id, "restarts = 1", 20, &logs).await;
    assert!(
        restarted_at.elapsed() < Duration::from_secs(20),
        "took {:?}",
        restarted_at.elapsed()
    );
    env.wait_terminal(&id, Duration::from_secs(60), &logs).await;
    let job = env.coord.get_job(&id).await;
    assert_eq!(job.state(), pb::JobState::Succeeded, "{}", a.log_text());
    assert_eq!((job.restarts, job.attempt), (1, 2));
    let reason = attempt_reason(&env.pool, &id, 1).await;
    assert!(
        reason.contains("re-registered without the trainer"),
        "{reason}"
    );
    assert_eq!(
        env.count("SELECT count(*) FROM workers WHERE $1 = $1", "")
            .await,
        1
    );
}

// ---- 2. The event path never stalls and never drops what it should keep ----------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_trainer_output_never_stalls_a_job_and_every_valid_event_is_stored_once() {
    let _serial = SERIAL.lock().await;
    let env = Env::start(&["--scheduler-interval-ms", "200"]).await;
    let long_name = "n".repeat(100);
    let huge = format!(
        r#"{{"event":"metrics","iteration":2,"values":{{"pad":1}},"junk":"{}"}}"#,
        "x".repeat(10 << 20)
    );
    let lines = [
        r#"{"event":"started","start_iteration":0,"max_iters":4,"train_images":1,"val_images":2,"device":"cpu","resumed_from":null,"parameters":1}"#.to_string(),
        r#"{"event":"metrics","iteration":1,"values":{"loss":1.5,"lr":0.001}}"#.to_string(),
        // A NaN eval loss as the trainer writes it (JSON has no NaN), and an absent class's IoU.
        r#"{"event":"eval","iteration":1,"miou":0.25,"aacc":0.5,"loss":null,"class_iou":[0.5,null,0.0],"images":2}"#.to_string(),
        r#"{"event":"eval","iteration":2,"miou":"NaN","aacc":0.5,"loss":"inf","class_iou":["NaN"],"images":2}"#.to_string(),
        r#"{"event":"bogus_kind","iteration":1}"#.to_string(),
        "this is not json {".to_string(),
        huge,
        r#"{"event":"metrics","iteration":2,"values":{"loss":1.25,"lr":0.0009}}"#.to_string(),
        // An event the coordinator can never accept (a metric name over 64 bytes).
        format!(r#"{{"event":"metrics","iteration":3,"values":{{"loss":1.1,"{long_name}":1}}}}"#),
        r#"{"event":"metrics","iteration":4,"values":{"loss":0.9}}"#.to_string(),
        r#"{"event":"finished","iteration":4,"best_miou":null,"best_iteration":null}"#.to_string(),
    ];
    let out = env.path("trainer-output.jsonl");
    std::fs::write(&out, lines.join("\n") + "\n").expect("write the trainer's output");
    let trainer = stand_in_trainer(
        &env.path("bad-output.sh"),
        &format!("cat '{}'", out.display()),
    );
    let port = segtrain_tests::coordinator::free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut args: Vec<&OsStr> = trainer_arg(&trainer).to_vec();
    args.extend([OsStr::new("--metrics-listen"), OsStr::new(&listen)]);
    let d = env.daemon("bad-output", "work", 5, &args);
    let id = env.coord.submit_spec(stand_in_spec("bad-output")).await;
    let logs = || d.log_text();
    env.wait_terminal(&id, Duration::from_secs(60), &logs).await;
    let job = env.coord.get_job(&id).await;
    assert_eq!(job.state(), pb::JobState::Succeeded, "{}", d.log_text());

    // Every valid loss once; the refused event's iteration has none.
    let losses: Vec<(i64, f64)> = sqlx::query_as(
        "SELECT iteration, value FROM metrics WHERE job_id = $1::uuid AND name = 'loss'
         ORDER BY iteration",
    )
    .bind(&id)
    .fetch_all(&env.pool)
    .await
    .expect("losses");
    assert_eq!(losses, [(1, 1.5), (2, 1.25), (4, 0.9)]);
    // Non-finite scores are stored as what they are.
    let val: Vec<(i64, String, f64)> = sqlx::query_as(
        "SELECT iteration, name, value FROM metrics WHERE job_id = $1::uuid
         AND name IN ('miou', 'val_loss') ORDER BY iteration, name",
    )
    .bind(&id)
    .fetch_all(&env.pool)
    .await
    .expect("eval points");
    assert_eq!(val.len(), 4, "{val:?}");
    assert_eq!((val[0].0, val[0].1.as_str(), val[0].2), (1, "miou", 0.25));
    assert!(val[1].2.is_nan(), "{val:?}");
    assert!(val[2].2.is_nan(), "{val:?}");
    assert_eq!(val[3].2, f64::INFINITY, "{val:?}");
    let events = env.coord.job_events(&id).await;
    let evals: Vec<&pb::EvalReport> = events
        .iter()
        .filter_map(|e| match &e.payload {
            Some(pb::job_event::Payload::Eval(v)) => Some(v),
            _ => None,
        })
        .collect();
    assert_eq!(evals.len(), 2);
    assert!(evals[0].loss.is_nan() && evals[0].class_iou[1].is_nan());
    assert_eq!(evals[0].class_iou[0], 0.5);
    // Notes say what was dropped, one each.
    let notes = notes(&events);
    for needle in [
        "unknown event kind \"bogus_kind\"",
        "not JSON",
        "longer than",
        "refused",
    ] {
        assert_eq!(
            notes.iter().filter(|n| n.contains(needle)).count(),
            1,
            "{needle:?} in {notes:#?}"
        );
    }
    assert!(
        notes.iter().any(|n| n.contains("iteration 3")),
        "{notes:#?}"
    );
    // And the daemon counted them.
    let m = scrape_parsed(port).await.expect("daemon metrics");
    let dropped = |reason: &str| {
        m.get(
            "segtrain_worker_trainer_lines_dropped_total",
            &[("reason", reason)],
        )
    };
    assert_eq!(dropped("unknown_kind"), Some(1.0));
    assert_eq!(dropped("malformed"), Some(1.0));
    assert_eq!(dropped("too_long"), Some(1.0));
    assert_eq!(
        m.get("segtrain_worker_events_refused_total", &[]),
        Some(1.0)
    );
}

// ---- 3. Failure classes and settings that mean what they say ---------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dataset_vanishing_for_a_moment_mid_run_is_an_infrastructure_failure() {
    let _serial = SERIAL.lock().await;
    let env = Env::start(&[
        "--scheduler-interval-ms",
        "200",
        "--restart-backoff-ms",
        "3000",
        "--lease-seconds",
        "10",
    ])
    .await;
    let spec = real_spec(&env, "vanishing", 200);
    let d = env.daemon("io", "work", 5, &[]);
    let logs = || d.log_text();
    let id = env.coord.submit_spec(spec).await;
    env.wait_metrics(&id, 3, 120, &logs).await;
    // As a gcsfuse mount does for a moment: the training images are gone, then back.
    let images = env.path("data/leftImg8bit/train");
    let away = env.path("data/leftImg8bit/train-away");
    std::fs::rename(&images, &away).expect("hide the images");
    env.wait_job(&id, "restarts = 1 OR state = 'FAILED'", 120, &logs)
        .await;
    std::fs::rename(&away, &images).expect("bring the images back");
    let job = env.coord.get_job(&id).await;
    assert_ne!(
        job.state(),
        pb::JobState::Failed,
        "a vanished file failed the job as deterministic: {}",
        job.reason
    );
    // The restart runs to the end (cancel it once it trains again: the point is the class).
    env.wait_job(&id, "attempt = 2 AND state = 'RUNNING'", 120, &logs)
        .await;
    let reason = attempt_reason(&env.pool, &id, 1).await;
    assert!(reason.contains("train"), "{reason}");
    let outcomes = rank_outcomes(&env.pool, &id, 1).await;
    assert_eq!(outcomes, ["FAILED_INFRA"]);
    env.coord.cancel(&id, "done").await;
    env.wait_terminal(&id, Duration::from_secs(60), &logs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pretrained_weights_on_gs_are_fetched_and_a_missing_object_fails_at_once() {
    let _serial = SERIAL.lock().await;
    let env = Env::start(&[
        "--scheduler-interval-ms",
        "200",
        "--restart-backoff-ms",
        "200",
    ])
    .await;
    // Weights with the model's key names: a one-iteration run's checkpoint.
    let spec = real_spec(&env, "weights", 1);
    let job_file = env.path("weights.toml");
    std::fs::write(
        &job_file,
        format!(
            "name = \"weights\"\ndataset_root = {:?}\nworld_size = 1\ncrop_height = 64\n\
             crop_width = 64\nmax_iters = 1\nwarmup_iters = 0\neval_interval = 0\n\
             loader_threads = 1\n",
            spec.dataset_root.clone().unwrap_or_default()
        ),
    )
    .expect("job file");
    let mut train = Command::new(binaries::path("segtrain-worker"));
    train
        .args(["train", "--device", "cpu", "--config"])
        .arg(&job_file)
        .arg("--checkpoint-dir")
        .arg(env.path("weights"))
        .env("OMP_NUM_THREADS", "1");
    binaries::run_ok(&mut train, "segtrain-worker train");
    let weights = std::fs::read(env.path("weights/ckpt-00000001/model.safetensors"))
        .expect("the checkpoint's model");
    let gcs = segtrain_tests::gcs::FakeGcs::start(
        [("weights/mit/b0.safetensors".to_string(), weights)].into(),
    );
    let vars = gcs.env();
    let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let d = DaemonProcess::start_full(&env.coord.url(), "gs", &env.path("work"), 5, &vars, &[]);
    let logs = || d.log_text();

    let id = env
        .coord
        .submit_spec(pb::JobSpec {
            pretrained: Some("gs://weights/mit/b0.safetensors".into()),
            ..real_spec(&env, "from-gs", 2)
        })
        .await;
    env.wait_terminal(&id, Duration::from_secs(120), &logs)
        .await;
    let job = env.coord.get_job(&id).await;
    assert_eq!(job.state(), pb::JobState::Succeeded, "{}", job.reason);
    assert_eq!(job.restarts, 0);
    assert!(gcs.served() >= 1, "the weights were never fetched");

    // A missing object: FAILED at once, naming the field and the URI; no restart spent.
    let id = env
        .coord
        .submit_spec(pb::JobSpec {
            pretrained: Some("gs://weights/mit/missing.safetensors".into()),
            ..real_spec(&env, "missing-weights", 2)
        })
        .await;
    env.wait_terminal(&id, Duration::from_secs(120), &logs)
        .await;
    let job = env.coord.get_job(&id).await;
    assert_eq!(job.state(), pb::JobState::Failed, "{}", job.reason);
    assert_eq!(job.restarts, 0, "{}", job.reason);
    for needle in [
        "pretrained",
        "gs://weights/mit/missing.safetensors",
        "not retried",
    ] {
        assert!(
            job.reason.contains(needle),
            "{needle:?} not in {}",
            job.reason
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coordinators_stop_grace_reaches_a_trainer_that_ignores_sigterm() {
    let _serial = SERIAL.lock().await;
    // The coordinator allows 2 s, the daemon would allow 60: the smaller one wins.
    let env = Env::start(&[
        "--stop-grace-seconds",
        "2",
        "--scheduler-interval-ms",
        "200",
    ])
    .await;
    let trainer = stand_in_trainer(
        &env.path("stubborn.sh"),
        r#"trap '' TERM
echo '{"event":"started","start_iteration":0,"max_iters":1,"train_images":1,"val_images":0,"device":"cpu","resumed_from":null,"parameters":1}'
while :; do sleep 0.1 > /dev/null; done"#,
    );
    let d = env.daemon("stubborn", "work", 60, &trainer_arg(&trainer));
    let id = env.coord.submit_spec(stand_in_spec("stubborn")).await;
    let logs = || d.log_text();
    env.wait_job(&id, "state = 'RUNNING'", 30, &logs).await;
    let pids = d.trainer_pids();
    assert_eq!(pids.len(), 1, "{pids:?}");
    env.coord.cancel(&id, "stop it").await;
    let canceled = Instant::now();
    std::thread::sleep(Duration::from_millis(1000));
    assert!(
        alive(pids[0]),
        "it ignores SIGTERM: killed only after the grace period"
    );
    while alive(pids[0]) {
        assert!(
            canceled.elapsed() < Duration::from_secs(15),
            "the trainer still runs {:?} after the cancel: the 2 s grace did not reach it\n{}",
            canceled.elapsed(),
            d.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    env.wait_terminal(&id, Duration::from_secs(30), &logs).await;
    assert_eq!(env.coord.get_job(&id).await.state(), pb::JobState::Canceled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_job_polls_as_often_as_the_poll_interval_says() {
    let _serial = SERIAL.lock().await;
    for (poll_ms, each_within, never_within) in
        [(100u64, Some(1000u64), None), (20_000, None, Some(4000u64))]
    {
        let env = Env::start(&["--poll-interval-ms", &poll_ms.to_string()]).await;
        let id = env.coord.submit_spec(stand_in_spec("watched")).await;
        let mut stream = env
            .coord
            .jobs()
            .await
            .watch_job(pb::WatchJobRequest {
                job_id: id.clone(),
                after_event_id: 0,
            })
            .await
            .expect("watch")
            .into_inner();
        let first = stream
            .message()
            .await
            .expect("first event")
            .expect("QUEUED");
        assert!(matches!(
            first.payload,
            Some(pb::job_event::Payload::StateChange(_))
        ));
        // Events written without a NOTIFY (as when the listener lost its connection): only
        // the poll finds them.
        for k in 0..3 {
            sqlx::query(
                "INSERT INTO job_events (job_id, attempt, kind, payload)
                 VALUES ($1::uuid, 0, 'note', jsonb_build_object('kind', 'note', 'text', $2::text))",
            )
            .bind(&id)
            .bind(format!("note {k}"))
            .execute(&env.pool)
            .await
            .expect("insert an event without NOTIFY");
            let wrote = Instant::now();
            if let Some(ms) = each_within {
                let ev = tokio::time::timeout(Duration::from_millis(ms), stream.message())
                    .await
                    .unwrap_or_else(|_| {
                        panic!("poll {poll_ms} ms: event {k} not delivered within {ms} ms")
                    })
                    .expect("stream")
                    .expect("an event");
                assert!(matches!(ev.payload, Some(pb::job_event::Payload::Note(_))));
            }
            if let Some(ms) = never_within {
                let got = tokio::time::timeout(Duration::from_millis(ms), stream.message()).await;
                assert!(
                    got.is_err(),
                    "poll {poll_ms} ms: event {k} delivered after {:?}, before any poll was due",
                    wrote.elapsed()
                );
                break;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_database_pool_is_not_an_unreachable_database_and_health_never_waits_for_it() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let _serial = SERIAL.lock().await;
    let env = Env::start(&[
        "--database-max-connections",
        "2",
        "--database-acquire-timeout-ms",
        "1000",
    ])
    .await;
    let id = env.coord.submit_spec(stand_in_spec("pool")).await;
    // Hold a lock that every GetJob waits for: the two pooled connections stay busy behind it
    // (whoever takes them: these calls or the scheduler), so some calls find none free.
    let mut blocker = env.pool.begin().await.expect("begin");
    sqlx::query("LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *blocker)
        .await
        .expect("lock");
    let mut calls = Vec::new();
    for _ in 0..4 {
        let mut client = env.coord.jobs().await;
        let job = id.clone();
        calls.push(tokio::spawn(async move {
            client
                .get_job(pb::GetJobRequest { job_id: job })
                .await
                .map(|r| r.into_inner().state())
        }));
    }
    // The health probe has its own connection: SERVING throughout, several probes later.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let mut health = HealthClient::new(env.coord.channel().await);
    let status = tokio::time::timeout(
        Duration::from_secs(2),
        health.check(HealthCheckRequest {
            service: String::new(),
        }),
    )
    .await
    .expect("health answers at once")
    .expect("health")
    .into_inner()
    .status();
    assert_eq!(status, ServingStatus::Serving);
    blocker.rollback().await.expect("release");
    let mut busy = 0;
    for call in calls {
        match call.await.expect("join") {
            Ok(state) => assert_eq!(state, pb::JobState::Queued),
            Err(e) => {
                busy += 1;
                assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
                assert!(e.message().contains("busy"), "{}", e.message());
                assert!(!e.message().contains("unreachable"), "{}", e.message());
            }
        }
    }
    assert!(busy >= 2, "4 calls, 2 connections: {busy} found none free");
    // Once the lock is gone, the same pool serves again.
    let job = env.coord.get_job(&id).await;
    assert_eq!(job.state(), pb::JobState::Queued);
}
