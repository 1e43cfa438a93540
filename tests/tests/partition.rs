//! A real network partition (not a frozen process): daemon B runs in its own network namespace,
//! joined to the coordinator's by a veth pair, and the test cuts that link mid-run and heals it.
//! Loopback-range addresses only (127.77.N.1 and .2 on the veth), so nothing outside this
//! machine is reachable or disturbed. Needs root (or CAP_NET_ADMIN) and `ip` (iproute2); where
//! the machine cannot make a namespace the test says so and skips.
//!
//! What must hold: within the lease the attempt fails and the world-2 job restarts on the rest
//! (the reachable worker and a spare) from its checkpoint; the rank on the reachable side is
//! stopped instead of waiting in its collective for the silent peer; the cut-off daemon pauses
//! its trainer (self-fencing) before the coordinator declares its lease expired; after healing,
//! that stale trainer ends and its reports are refused (its rank stays LOST), and the daemon is
//! a free worker again; every metric is stored once; and no retention deleted a checkpoint of
//! another attempt: every checkpoint listed COMPLETE is on disk, attempt 1's among them.

use segtrain_proto::v1 as pb;
use segtrain_tests::coordinator::{metric_points, CoordinatorProcess};
use segtrain_tests::daemon::{DaemonProcess, Launch};
use segtrain_tests::dataset::{synth_dir, tiny_job};
use segtrain_tests::pg::TempPostgres;
use segtrain_tests::sql::{job_value, rank_outcomes, wait_until};
use segtrain_tests::wait::poll_until;
use sqlx::PgPool;
use std::ffi::OsStr;
use std::process::Command;
use std::time::{Duration, Instant};

const LEASE_S: u64 = 4;
const MAX_ITERS: u64 = 30;

/// A network namespace with a veth pair to this one; deleted (with the pair) on drop.
struct TestNet {
    ns: String,
    /// This side of the pair (the namespace's side is `<ns>b`).
    outer: String,
    /// The address on this side and the namespace's.
    outer_ip: String,
    inner_ip: String,
}

impl TestNet {
    /// Makes the namespace and the link, or says why it cannot.
    fn create() -> Result<TestNet, String> {
        let n = std::process::id() % 250;
        let ns = format!("segt{}", std::process::id());
        let net = TestNet {
            outer: format!("{ns}a"),
            outer_ip: format!("127.77.{n}.1"),
            inner_ip: format!("127.77.{n}.2"),
            ns,
        };
        let inner = format!("{}b", net.ns);
        let (ns, outer) = (net.ns.as_str(), net.outer.as_str());
        let (oip, iip) = (&net.outer_ip, &net.inner_ip);
        // A loopback-range address is "local" to the kernel unless the interface may route it
        // (route_localnet) and a host route in the local table says where it lives.
        let steps: Vec<Vec<String>> = [
            format!("ip netns add {ns}"),
            format!("ip link add {outer} type veth peer name {inner}"),
            format!("ip link set {inner} netns {ns}"),
            format!("ip addr add {oip}/30 dev {outer}"),
            format!("ip link set {outer} up"),
            format!("sysctl -qw net.ipv4.conf.{outer}.route_localnet=1"),
            format!("ip route add {iip}/32 dev {outer} table local"),
            format!("ip -n {ns} link set lo up"),
            format!("ip -n {ns} addr add {iip}/30 dev {inner}"),
            format!("ip -n {ns} link set {inner} up"),
            format!("ip netns exec {ns} sysctl -qw net.ipv4.conf.{inner}.route_localnet=1"),
            format!("ip -n {ns} route add {oip}/32 dev {inner} table local"),
        ]
        .iter()
        .map(|s| s.split(' ').map(String::from).collect())
        .collect();
        for step in steps {
            run(&step)?;
        }
        Ok(net)
    }

    /// Cuts the link both ways: each side's route to the other becomes a blackhole, so packets
    /// go nowhere and open connections fall silent (no reset). Not `ip link set down`: that
    /// flushes the routes, and a loopback-range address without its route is delivered locally,
    /// where the reset it meets would tell both sides at once. (No netem: this kernel may not
    /// have it.)
    fn cut(&self) {
        self.route(&self.inner_ip, "blackhole", &[]);
        self.route(&self.outer_ip, "blackhole", &["ip", "-n", &self.ns]);
    }

    fn heal(&self) {
        self.route(&self.inner_ip, &format!("dev {}", self.outer), &[]);
        let inner = format!("dev {}b", self.ns);
        self.route(&self.outer_ip, &inner, &["ip", "-n", &self.ns]);
    }

    /// `ip route replace` of the host route to `to` in the local table, here or (`ip -n NS`)
    /// in the namespace.
    fn route(&self, to: &str, how: &str, ip: &[&str]) {
        let mut argv: Vec<String> = if ip.is_empty() {
            vec!["ip".into()]
        } else {
            ip.iter().map(|s| s.to_string()).collect()
        };
        let spec = match how.strip_prefix("dev ") {
            Some(dev) => format!("route replace {to}/32 dev {dev} table local"),
            None => format!("route replace {how} {to}/32 table local"),
        };
        argv.extend(spec.split(' ').map(String::from));
        run(&argv).expect("ip route replace");
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
        let _ = Command::new("ip")
            .args(["link", "del", &self.outer])
            .status();
    }
}

fn run(argv: &[String]) -> Result<(), String> {
    let out = Command::new(&argv[0])
        .args(&argv[1..])
        .output()
        .map_err(|e| format!("{}: {e}", argv.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}: {}",
            argv.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_cut_off_mid_run_fails_its_attempt_within_the_lease_and_rejoins_after_healing() {
    let net = match TestNet::create() {
        Ok(n) => n,
        Err(why) => {
            eprintln!(
                "SKIPPED: this machine cannot make a network namespace with a veth pair \
                 (needs root or CAP_NET_ADMIN and iproute2): {why}"
            );
            return;
        }
    };
    let (tmp, data) = synth_dir(8, 2);
    let pg = TempPostgres::start().expect("PostgreSQL");
    let lease = LEASE_S.to_string();
    let coord = CoordinatorProcess::start_on(
        &pg.url(),
        &net.outer_ip,
        &[
            "--lease-seconds",
            &lease,
            "--restart-backoff-ms",
            "300",
            "--scheduler-interval-ms",
            "200",
        ],
    )
    .await;
    let pool = PgPool::connect(&pg.url()).await.expect("connect");
    // The collective would wait 120 s for a silent peer: longer than the test's partition, so
    // what ends the reachable rank is the coordinator's stop, not its own timeout.
    let env = [("SEGTRAIN_COLLECTIVE_TIMEOUT", "120")];
    let outer = [OsStr::new("--advertise-host"), OsStr::new(&net.outer_ip)];
    let inner = [OsStr::new("--advertise-host"), OsStr::new(&net.inner_ip)];
    let a = DaemonProcess::start_full(
        &coord.url(),
        "cpu-a",
        &tmp.path().join("work-a"),
        3,
        &env,
        &outer,
    );
    let b_work = tmp.path().join("work-b");
    let b = DaemonProcess::start_wrapped(
        &["ip", "netns", "exec", &net.ns],
        Launch {
            url: &coord.url(),
            host: "cpu-b",
            work_dir: &b_work,
            grace_seconds: 3,
            env: &env,
            args: &inner,
        },
    );
    let c_work = tmp.path().join("work-c");
    let c = std::cell::OnceCell::new();
    let logs = || {
        let c = c.get().map(DaemonProcess::log_text).unwrap_or_default();
        format!(
            "coordinator:\n{}\ndaemon a:\n{}\ndaemon b:\n{}\ndaemon c:\n{c}",
            coord.log_text(),
            a.log_text(),
            b.log_text()
        )
    };
    let idle = |n: i64| {
        let pool = &pool;
        move || async move {
            job_value::<i64>(
                pool,
                "SELECT count(*) FROM workers WHERE state = 'IDLE' AND $1 = $1",
                "",
            )
            .await
                == n
        }
    };
    poll_until(Duration::from_secs(60), "a and b registered", logs, idle(2)).await;

    // One checkpoint kept per attempt: a retention across attempts would delete attempt 1's.
    let spec = pb::JobSpec {
        checkpoint_interval: Some(10),
        keep_last: Some(1),
        max_restarts: Some(3),
        ..tiny_job(
            "partition",
            &data,
            &tmp.path().join("checkpoints"),
            2,
            MAX_ITERS,
        )
    };
    let id = coord.submit_spec(spec).await;
    let checkpointed = || async {
        job_value::<i64>(
            &pool,
            "SELECT count(*) FROM checkpoints WHERE job_id = $1::uuid AND state = 'COMPLETE'",
            &id,
        )
        .await
            >= 1
    };
    poll_until(Duration::from_secs(180), "a checkpoint", logs, checkpointed).await;
    // Attempt 1 runs on a and b; c, the spare, comes now (so it cannot have been chosen).
    let _ = c.set(DaemonProcess::start_full(
        &coord.url(),
        "cpu-c",
        &c_work,
        3,
        &env,
        &outer,
    ));
    poll_until(Duration::from_secs(60), "c registered", logs, idle(1)).await;
    assert!(!a.trainer_pids().is_empty(), "daemon a runs a rank");
    let stale = b.trainer_pids();
    assert!(!stale.is_empty(), "daemon b runs a rank");

    net.cut();
    let cut_at = Instant::now();
    let sql =
        "SELECT state IN ('FAILED', 'LOST') FROM attempts WHERE job_id = $1::uuid AND attempt = 1";
    wait_until(
        &pool,
        sql,
        &id,
        Duration::from_secs(30),
        "attempt 1 fails",
        logs,
    )
    .await;
    let detected = cut_at.elapsed();
    assert!(
        detected <= Duration::from_secs(LEASE_S + 3),
        "attempt 1 failed {detected:?} after the cut; the lease is {LEASE_S} s"
    );
    // The job restarts on the rest (a and c); attempt 1's rank on a was stopped rather than left
    // waiting in its collective for the silent peer.
    let sql = "SELECT attempt = 2 AND state = 'RUNNING' AND EXISTS (SELECT 1 FROM metrics m
                   WHERE m.job_id = jobs.id AND m.attempt = 2) FROM jobs WHERE id = $1::uuid";
    let what = "attempt 2 trains on a and c";
    wait_until(&pool, sql, &id, Duration::from_secs(120), what, logs).await;
    let hosts: Vec<String> = segtrain_tests::sql::job_values(
        &pool,
        "SELECT w.host FROM attempt_ranks ar JOIN workers w ON w.id = ar.worker_id
         WHERE ar.job_id = $1::uuid AND ar.attempt = 2 ORDER BY w.host",
        &id,
    )
    .await;
    assert_eq!(hosts, ["cpu-a", "cpu-c"]);
    // b, cut off, knows nothing yet: its attempt-1 trainer is still there, paused by its own
    // daemon before the coordinator could declare the lease expired.
    assert!(stale.iter().all(|p| segtrain_tests::daemon::alive(*p)));
    assert!(
        stale
            .iter()
            .all(|p| segtrain_tests::daemon::process_state(*p) == Some('T')),
        "b's trainer is not paused\n{}",
        logs()
    );
    let fenced = first_time(&b.log_text(), "self-fenced").expect("b fenced itself");
    let lost = first_time(&coord.log_text(), "worker lease expired; declared lost")
        .expect("the coordinator declared b lost");
    assert!(fenced < lost, "fenced at {fenced}, lease expired at {lost}");

    net.heal();
    // The stale trainer is stopped, and what b reports of it is refused (attempt 1 is not the
    // job's attempt any more): its rank stays LOST.
    let gone = || async { stale.iter().all(|p| !segtrain_tests::daemon::alive(*p)) };
    poll_until(
        Duration::from_secs(30),
        "b's stale trainer ends",
        logs,
        gone,
    )
    .await;
    let refused = || async { b.log_text().contains("events of a stale attempt dropped") };
    poll_until(
        Duration::from_secs(30),
        "b's stale reports refused",
        logs,
        refused,
    )
    .await;
    let sql = "SELECT state IN ('SUCCEEDED','FAILED','CANCELED') FROM jobs WHERE id = $1::uuid";
    wait_until(
        &pool,
        sql,
        &id,
        Duration::from_secs(300),
        "the job ends",
        logs,
    )
    .await;
    let job = coord.get_job(&id).await;
    assert_eq!(
        job.state(),
        pb::JobState::Succeeded,
        "{}\n{}",
        job.reason,
        logs()
    );
    assert_eq!((job.attempt, job.restarts), (2, 1), "{}", job.reason);
    assert!(
        job.resumed_from_iteration.is_some(),
        "resumed from a checkpoint"
    );
    let outcomes = rank_outcomes(&pool, &id, 1).await;
    assert_eq!(outcomes[1], "LOST", "attempt 1's ranks: {outcomes:?}");
    // b is back and free for work.
    poll_until(Duration::from_secs(30), "all three idle", logs, idle(3)).await;
    // No retention deleted another attempt's checkpoint: everything listed COMPLETE is on disk,
    // attempt 1's last one too (a later attempt resumed from it).
    let complete: Vec<(i32, String)> = sqlx::query_as(
        "SELECT attempt, uri FROM checkpoints WHERE job_id = $1::uuid AND state = 'COMPLETE'",
    )
    .bind(&id)
    .fetch_all(&pool)
    .await
    .expect("checkpoints");
    assert!(complete.iter().any(|(a, _)| *a == 1), "{complete:?}");
    for (_, uri) in &complete {
        let manifest =
            std::path::Path::new(uri.trim_start_matches("file://")).join("manifest.json");
        assert!(manifest.exists(), "{uri} is listed COMPLETE but gone");
    }
    // Every iteration's loss once through GetMetrics, and no (attempt, iteration) twice.
    let mut jobs = coord.jobs().await;
    let points = metric_points(&mut jobs, &id, &["loss"], 0).await;
    let iterations: Vec<u64> = points.iter().map(|p| p.iteration).collect();
    assert_eq!(
        iterations,
        (1..=MAX_ITERS).collect::<Vec<_>>(),
        "{}",
        logs()
    );
    let doubled: i64 = job_value(
        &pool,
        "SELECT count(*) FROM (SELECT attempt, iteration FROM metrics WHERE job_id = $1::uuid
         AND name = 'loss' GROUP BY 1, 2 HAVING count(*) > 1) d",
        &id,
    )
    .await;
    assert_eq!(doubled, 0);
}

/// The timestamp of the first JSON log line whose message starts with `message`.
fn first_time(log: &str, message: &str) -> Option<String> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| {
            v["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with(message))
        })
        .and_then(|v| v["timestamp"].as_str().map(str::to_string))
}
