//! Spot VMs and elastic world size, end to end (issue 17): real PostgreSQL, the real
//! coordinator, real CPU worker daemons and their trainers.
//!
//! - A preempted worker (SIGTERM to its daemon, as systemd sends on a spot VM's ACPI soft-off,
//!   or the metadata server's `instance/preempted` turning TRUE, served here by a stand-in) costs
//!   one checkpoint of the current iteration and no restart: the attempt ends PREEMPTED, the job
//!   RESTARTING then SUCCEEDED with `restarts` unchanged and `preemptions` counted, nothing redone.
//! - An elastic job (`min_world_size = 1`) whose second worker dies continues at world 1 with
//!   accumulation 2, grows back to world 2 when the worker returns, and ends with the parameters
//!   of an uninterrupted world-2 run (dropout and drop path on, `sync_bn` off: see
//!   docs/data-parallel.md).

use segtrain_proto::v1 as pb;
use segtrain_tests::cluster::{state_changes, Cluster, DEFAULT_DAEMON};
use segtrain_tests::daemon::DaemonProcess;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The daemons' grace period: a preemption notice gives about 30 s; the tests give less.
const GRACE_S: u32 = 10;

/// A stand-in for GCP's metadata server: `GET /preempted/HOST` answers `TRUE` once the test
/// preempts HOST, `FALSE` before.
struct MetadataStandIn {
    port: u16,
    preempted: Arc<Mutex<BTreeSet<String>>>,
    reads: Arc<Mutex<BTreeMap<String, usize>>>,
}

impl MetadataStandIn {
    async fn start() -> MetadataStandIn {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the metadata stand-in");
        let port = listener.local_addr().expect("addr").port();
        let preempted: Arc<Mutex<BTreeSet<String>>> = Arc::default();
        let reads: Arc<Mutex<BTreeMap<String, usize>>> = Arc::default();
        let (p, r) = (preempted.clone(), reads.clone());
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let (p, r) = (p.clone(), r.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 2048];
                    let n = s.read(&mut buf).await.unwrap_or(0);
                    let req = String::from_utf8_lossy(&buf[..n]).to_string();
                    let path = req.split_whitespace().nth(1).unwrap_or("").to_string();
                    let host = path.trim_start_matches("/preempted/").to_string();
                    let flavor = req.contains("Metadata-Flavor: Google");
                    *r.lock().expect("reads").entry(host.clone()).or_default() += 1;
                    let body = if p.lock().expect("preempted").contains(&host) {
                        "TRUE"
                    } else {
                        "FALSE"
                    };
                    // The real server refuses requests without the header.
                    let reply = if flavor {
                        format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                            body.len()
                        )
                    } else {
                        "HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n".to_string()
                    };
                    let _ = s.write_all(reply.as_bytes()).await;
                });
            }
        });
        MetadataStandIn {
            port,
            preempted,
            reads,
        }
    }

    fn url(&self, host: &str) -> String {
        format!("http://127.0.0.1:{}/preempted/{host}", self.port)
    }

    fn set(&self, host: &str, preempted: bool) {
        let mut p = self.preempted.lock().expect("preempted");
        if preempted {
            p.insert(host.to_string());
        } else {
            p.remove(host);
        }
    }

    fn reads(&self, host: &str) -> usize {
        self.reads
            .lock()
            .expect("reads")
            .get(host)
            .copied()
            .unwrap_or(0)
    }
}

fn host(i: usize) -> String {
    format!("cpu-{}", (b'a' + i as u8) as char)
}

/// Starts (or restarts, as a new VM would) the daemon of `host(i)`, reading its preemption
/// flag from `standin` when given.
fn start_daemon(c: &Cluster, i: usize, standin: Option<&MetadataStandIn>) -> DaemonProcess {
    let h = host(i);
    let url = standin.map_or_else(String::new, |s| s.url(&h));
    let args: Vec<&std::ffi::OsStr> = vec!["--preemption-url".as_ref(), url.as_ref()];
    DaemonProcess::start_full(
        &c.coord.url(),
        &h,
        &c.tmp.path().join(format!("work-{h}")),
        GRACE_S,
        &[],
        &args,
    )
}

async fn wait_idle(c: &Cluster, n: usize) {
    c.wait_sql(
        "",
        &format!(
            "SELECT count(*) = {n} OR $1 = 'never' FROM workers
             WHERE state = 'IDLE' AND NOT leaving AND lease_until > now()"
        ),
        Duration::from_secs(60),
    )
    .await;
}

async fn attempts(c: &Cluster, id: &str) -> Vec<pb::Attempt> {
    c.coord
        .jobs()
        .await
        .list_attempts(pb::ListAttemptsRequest {
            job_id: id.into(),
            ..Default::default()
        })
        .await
        .expect("ListAttempts")
        .into_inner()
        .attempts
}

async fn wait_attempt(c: &Cluster, id: &str, attempt: u32, condition: &str) {
    let sql =
        format!("SELECT {condition} FROM attempts WHERE job_id = $1::uuid AND attempt = {attempt}");
    c.wait_sql(id, &sql, Duration::from_secs(180)).await;
}

/// The first and last loss iteration an attempt reported.
async fn attempt_iterations(c: &Cluster, id: &str, attempt: u32) -> (i64, i64) {
    sqlx::query_as(
        "SELECT coalesce(min(iteration), 0), coalesce(max(iteration), 0) FROM metrics
         WHERE job_id = $1::uuid AND attempt = $2 AND name = 'loss'",
    )
    .bind(id)
    .bind(attempt as i32)
    .fetch_one(&c.pool)
    .await
    .expect("metrics")
}

/// The checkpoints an attempt wrote because it was asked to stop: (iteration, state).
async fn on_stop_checkpoints(c: &Cluster, id: &str, attempt: u32) -> Vec<(i64, String)> {
    sqlx::query_as(
        "SELECT iteration, state FROM checkpoints
         WHERE job_id = $1::uuid AND attempt = $2 AND on_stop ORDER BY iteration",
    )
    .bind(id)
    .bind(attempt as i32)
    .fetch_all(&c.pool)
    .await
    .expect("checkpoints")
}

/// A preempted rank's attempt: the daemon exits within its grace period, rank 0 wrote a
/// COMPLETE checkpoint of the last iteration the attempt trained (marked on_stop), and the
/// attempt ended PREEMPTED. Returns that iteration.
async fn assert_preempted(
    c: &mut Cluster,
    id: &str,
    attempt: u32,
    daemon: usize,
    since: Instant,
) -> i64 {
    let status = c.daemons[daemon]
        .wait_exit(Duration::from_secs(u64::from(GRACE_S) + 15))
        .unwrap_or_else(|| panic!("the preempted daemon did not exit\n{}", c.logs()));
    let took = since.elapsed();
    assert!(status.success(), "{status:?}\n{}", c.logs());
    assert!(
        took < Duration::from_secs(u64::from(GRACE_S)),
        "the preempted daemon took {took:?}, more than its grace of {GRACE_S} s"
    );
    wait_attempt(c, id, attempt, "state = 'PREEMPTED'").await;
    let (_, last) = attempt_iterations(c, id, attempt).await;
    let stops = on_stop_checkpoints(c, id, attempt).await;
    assert_eq!(
        stops,
        [(last, "COMPLETE".to_string())],
        "one checkpoint of the last trained iteration\n{}",
        c.logs()
    );
    eprintln!(
        "attempt {attempt}: preempted, checkpoint of iteration {last}; daemon gone after {took:?}"
    );
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preempted_worker_costs_one_checkpoint_and_no_restart() {
    let _serial = SERIAL.lock().await;
    let standin = MetadataStandIn::start().await;
    let mut c = Cluster::start(0, 300, DEFAULT_DAEMON).await;
    for i in 0..2 {
        let d = start_daemon(&c, i, Some(&standin));
        c.daemons.push(d);
    }
    wait_idle(&c, 2).await;
    let max = 40;
    let id = c.coord.submit_spec(c.spec(2, max, 10)).await;

    // 1. SIGTERM to rank 1's daemon mid-run, as systemd sends it on a spot VM's soft-off.
    c.wait_iteration(&id, 6).await;
    let rank1 = c.daemon_of(&id, 1).await;
    let t = Instant::now();
    c.daemons[rank1].sigterm();
    let first = assert_preempted(&mut c, &id, 1, rank1, t).await;
    let job = c.coord.get_job(&id).await;
    assert_eq!((job.restarts, job.preemptions), (0, 1), "{}", c.logs());
    assert!(
        c.coord
            .list_workers()
            .await
            .values()
            .any(|w| w.host == host(rank1) && w.leaving),
        "the preempted worker is marked leaving"
    );
    // The VM comes back (a new daemon instance registers for it).
    c.daemons[rank1] = start_daemon(&c, rank1, Some(&standin));

    // 2. The metadata server's flag, this time on rank 0 (which writes the checkpoints).
    wait_attempt(&c, &id, 2, "state = 'RUNNING'").await;
    c.wait_iteration(&id, first as u64 + 4).await;
    let rank0 = c.daemon_of(&id, 0).await;
    assert!(standin.reads(&host(rank0)) > 0, "the daemon polls the flag");
    let t = Instant::now();
    standin.set(&host(rank0), true);
    let second = assert_preempted(&mut c, &id, 2, rank0, t).await;
    standin.set(&host(rank0), false);
    c.daemons[rank0] = start_daemon(&c, rank0, Some(&standin));

    let job = c.wait_terminal(&id, Duration::from_secs(300)).await;
    assert_eq!(job.state(), pb::JobState::Succeeded, "{}", c.logs());
    assert_eq!((job.restarts, job.preemptions, job.attempt), (0, 2, 3));
    let changes = state_changes(&c.coord.job_events(&id).await);
    let restarts: Vec<&String> = changes
        .iter()
        .filter(|(s, _)| *s == pb::JobState::Restarting)
        .map(|(_, r)| r)
        .collect();
    assert_eq!(restarts.len(), 2, "{changes:#?}");
    assert!(
        restarts[0].starts_with(&format!("preempted: {}", host(rank1))),
        "{restarts:?}"
    );
    assert!(
        restarts[1].starts_with(&format!("preempted: {}", host(rank0))),
        "{restarts:?}"
    );
    assert!(restarts
        .iter()
        .all(|r| r.contains("not counted against max_restarts")));

    // Each restart resumed from the preemption checkpoint: nothing trained twice.
    let a = attempts(&c, &id).await;
    let states: Vec<pb::AttemptState> = a.iter().map(|a| a.state()).collect();
    use pb::AttemptState as S;
    assert_eq!(states, [S::Preempted, S::Preempted, S::Succeeded]);
    assert_eq!(a[1].resumed_from_iteration, Some(first as u64));
    assert_eq!(a[2].resumed_from_iteration, Some(second as u64));
    assert!(a
        .iter()
        .all(|a| a.world_size == 2 && a.accumulate_steps == 1));
    for (attempt, resumed) in [(2, first), (3, second)] {
        let (from, _) = attempt_iterations(&c, &id, attempt).await;
        assert_eq!(from, resumed + 1, "attempt {attempt} redid iterations");
    }
    let events = c.coord.job_events(&id).await;
    c.assert_every_metric_once(&id, max, &events).await;
    c.no_trainer_left();

    // What a person sees: both counts, every attempt and the stop checkpoints.
    let status = segtrain(&c, &["status", &id]);
    for line in ["restarts    0 of 3", "preemptions 2"] {
        assert!(status.contains(line), "{line:?} in\n{status}");
    }
    let table = segtrain(&c, &["attempts", &id]);
    let rows: Vec<&str> = table.lines().skip(1).collect();
    assert_eq!(rows.len(), 3, "{table}");
    for (row, state) in rows.iter().zip(["PREEMPTED", "PREEMPTED", "SUCCEEDED"]) {
        assert!(row.split_whitespace().nth(1) == Some(state), "{table}");
    }
    assert!(
        rows[0].contains(&format!("preempted: {}", host(rank1))),
        "{table}"
    );
    // Retention treats them like any other (by iteration): with keep_last 3 they are deleted by
    // now, and listed with --all.
    let checkpoints = segtrain(&c, &["checkpoints", "--all", &id]);
    let stops = checkpoints.lines().filter(|l| l.contains(" stop ")).count();
    assert_eq!(stops, 2, "{checkpoints}");
}

/// Runs the `segtrain` CLI against the cluster's coordinator; its stdout.
fn segtrain(c: &Cluster, args: &[&str]) -> String {
    let out = std::process::Command::new(segtrain_tests::binaries::path("segtrain"))
        .args(args)
        .env("SEGTRAIN_COORDINATOR", c.coord.url())
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run segtrain");
    assert!(
        out.status.success(),
        "segtrain {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// (state, world size, accumulation) of each attempt.
fn attempt_sizes(attempts: &[pb::Attempt]) -> Vec<(pb::AttemptState, u32, u32)> {
    attempts
        .iter()
        .map(|a| (a.state(), a.world_size, a.accumulate_steps))
        .collect()
}

/// Every float tensor of a checkpoint's model file.
fn model_tensors(uri: &str) -> BTreeMap<String, Vec<f32>> {
    let path = std::path::Path::new(uri).join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    st.tensors()
        .into_iter()
        .filter(|(_, v)| v.dtype() == safetensors::Dtype::F32)
        .map(|(name, v)| {
            let data = v
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            (name, data)
        })
        .collect()
}

/// The largest difference between the final models of two jobs (every parameter and BatchNorm
/// statistic).
async fn max_difference(c: &Cluster, a: &str, b: &str, max_iters: u64) -> f32 {
    let final_uri = |id: &str| {
        let pool = c.pool.clone();
        let id = id.to_string();
        async move {
            sqlx::query_scalar::<_, String>(
                "SELECT uri FROM checkpoints WHERE job_id = $1::uuid AND iteration = $2
                 AND state = 'COMPLETE'",
            )
            .bind(id)
            .bind(max_iters as i64)
            .fetch_one(&pool)
            .await
            .expect("final checkpoint")
        }
    };
    let (ta, tb) = (
        model_tensors(&final_uri(a).await),
        model_tensors(&final_uri(b).await),
    );
    assert_eq!(ta.keys().collect::<Vec<_>>(), tb.keys().collect::<Vec<_>>());
    let mut worst = 0f32;
    for (name, x) in &ta {
        let y = &tb[name];
        assert_eq!(x.len(), y.len(), "{name}");
        for (u, v) in x.iter().zip(y) {
            worst = worst.max((u - v).abs());
        }
    }
    worst
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_elastic_job_shrinks_and_grows_back_on_the_trajectory_of_an_uninterrupted_run() {
    let _serial = SERIAL.lock().await;
    let mut c = Cluster::start(2, 300, DEFAULT_DAEMON).await;
    let max = 24;
    let base = c.spec(2, max, 4);
    let spec = |name: &str| pb::JobSpec {
        name: Some(name.into()),
        min_world_size: Some(1),
        elastic_wait_seconds: Some(2),
        // SyncBN normalises over the ranks' micro-batches together, which a smaller world
        // cannot reproduce; plain BatchNorm is exact at any split.
        sync_bn: Some(false),
        seed: Some(7),
        keep_last: Some(20),
        ..base.clone()
    };
    use pb::AttemptState as S;

    // The reference: uninterrupted, world 2.
    let reference = c.coord.submit_spec(spec("reference")).await;
    let job = c.wait_terminal(&reference, Duration::from_secs(300)).await;
    assert_eq!(job.state(), pb::JobState::Succeeded, "{}", c.logs());

    // Shrink: the second worker dies for good; the job goes on at world 1, accumulating 2.
    let shrink = c.coord.submit_spec(spec("shrink")).await;
    c.wait_checkpoint(&shrink, 4, "COMPLETE", 180).await;
    c.wait_iteration(&shrink, 6).await;
    let rank1 = c.daemon_of(&shrink, 1).await;
    c.daemons[rank1].kill();
    let job = c.wait_terminal(&shrink, Duration::from_secs(300)).await;
    assert_eq!(job.state(), pb::JobState::Succeeded, "{}", c.logs());
    assert_eq!(
        job.restarts, 1,
        "the lost worker is a failure; the shrink is not"
    );
    let a = attempts(&c, &shrink).await;
    let sizes = attempt_sizes(&a);
    assert!(
        matches!(
            sizes[..],
            [(S::Failed | S::Lost, 2, 1), (S::Succeeded, 1, 2)]
        ),
        "{sizes:?}"
    );
    assert!(a[1].reason.is_empty() || !a[1].reason.contains("FAILED"));
    let placed = state_changes(&c.coord.job_events(&shrink).await);
    assert!(
        placed.iter().any(|(s, r)| *s == pb::JobState::Scheduled
            && r.contains("elastic: world size 1 of 2, accumulate_steps 2")),
        "{placed:#?}"
    );
    let d = max_difference(&c, &reference, &shrink, max).await;
    eprintln!("shrink: largest difference from the uninterrupted run {d:e}");
    assert!(d <= 1e-5, "shrunk run differs by {d:e}");

    // Grow: the worker comes back while the job runs shrunk; at its next checkpoint (written at
    // once) the job returns to world 2.
    c.daemons[rank1] = start_daemon(&c, rank1, None);
    wait_idle(&c, 2).await;
    let grow = c.coord.submit_spec(spec("grow")).await;
    c.wait_checkpoint(&grow, 4, "COMPLETE", 180).await;
    c.wait_iteration(&grow, 6).await;
    let rank1 = c.daemon_of(&grow, 1).await;
    c.daemons[rank1].kill();
    wait_attempt(&c, &grow, 2, "state = 'RUNNING' AND world_size = 1").await;
    // The shrunk attempt trains three iterations of its own past where it resumed (its
    // `started` comes before its first step, so the job-wide iteration says nothing yet).
    c.wait_sql(
        &grow,
        "SELECT coalesce(max(m.iteration), 0) >= coalesce(max(a.resume_iter), 0) + 3
         FROM attempts a LEFT JOIN metrics m
           ON m.job_id = a.job_id AND m.attempt = a.attempt AND m.name = 'loss'
         WHERE a.job_id = $1::uuid AND a.attempt = 2",
        Duration::from_secs(180),
    )
    .await;
    c.daemons[rank1] = start_daemon(&c, rank1, None);
    let job = c.wait_terminal(&grow, Duration::from_secs(300)).await;
    assert_eq!(job.state(), pb::JobState::Succeeded, "{}", c.logs());
    assert_eq!((job.restarts, job.preemptions), (1, 0));
    let a = attempts(&c, &grow).await;
    let sizes = attempt_sizes(&a);
    assert!(
        matches!(
            sizes[..],
            [
                (S::Failed | S::Lost, 2, 1),
                (S::Resized, 1, 2),
                (S::Succeeded, 2, 1)
            ]
        ),
        "{sizes:?}"
    );
    // The resize restarted from the checkpoint it wrote on stopping.
    let (_, shrunk_to) = attempt_iterations(&c, &grow, 2).await;
    assert_eq!(
        on_stop_checkpoints(&c, &grow, 2).await,
        [(shrunk_to, "COMPLETE".to_string())]
    );
    assert_eq!(a[2].resumed_from_iteration, Some(shrunk_to as u64));
    let changes = state_changes(&c.coord.job_events(&grow).await);
    assert!(
        changes
            .iter()
            .any(|(s, r)| *s == pb::JobState::Restarting && r.starts_with("resize: ")),
        "{changes:#?}"
    );
    let d = max_difference(&c, &reference, &grow, max).await;
    eprintln!("grow: largest difference from the uninterrupted run {d:e}");
    assert!(d <= 1e-5, "grown run differs by {d:e}");
    let events = c.coord.job_events(&grow).await;
    c.assert_every_metric_once(&grow, max, &events).await;
    c.no_trainer_left();
}
