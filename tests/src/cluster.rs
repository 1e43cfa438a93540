//! A test cluster: a temporary PostgreSQL, the real coordinator with short leases and backoffs,
//! and N real CPU worker daemons (`cpu-a`, `cpu-b`, ...) on synthetic data; with the waits and
//! checks the end-to-end fault tests share (`tests/tests/faults.rs`, `elastic.rs`).

use crate::coordinator::{metric_points, CoordinatorProcess};
use crate::daemon::DaemonProcess;
use crate::dataset::{synth_dir, tiny_job};
use crate::pg::TempPostgres;
use crate::wait::poll_until_ok;
use segtrain_proto::v1 as pb;
use sqlx::PgPool;
use std::path::PathBuf;
use std::time::Duration;

/// Lease of the test coordinators: short, so lost workers are found quickly.
pub const LEASE_S: u64 = 4;

pub struct Cluster {
    pub tmp: tempfile::TempDir,
    pub pg: TempPostgres,
    pub coord: CoordinatorProcess,
    pub daemons: Vec<DaemonProcess>,
    pub pool: PgPool,
}

pub struct DaemonOpts<'a> {
    pub grace_s: u32,
    pub env: &'a [(&'a str, &'a str)],
}

pub const DEFAULT_DAEMON: DaemonOpts<'static> = DaemonOpts {
    grace_s: 10,
    env: &[],
};

impl Cluster {
    pub async fn start(daemons: usize, backoff_ms: u64, d: DaemonOpts<'_>) -> Cluster {
        Cluster::start_with_lease(daemons, backoff_ms, d, LEASE_S).await
    }

    /// [`start`](Self::start) with another lease than [`LEASE_S`] (seconds): for a test whose
    /// frozen daemon must keep its lease until the test has acted.
    pub async fn start_with_lease(
        daemons: usize,
        backoff_ms: u64,
        d: DaemonOpts<'_>,
        lease_s: u64,
    ) -> Cluster {
        let (tmp, _) = synth_dir(8, 2);
        let pg = TempPostgres::start().expect("PostgreSQL");
        let lease = lease_s.to_string();
        let backoff = backoff_ms.to_string();
        let coord = CoordinatorProcess::start_with_args(
            &pg.url(),
            &[
                "--lease-seconds",
                &lease,
                "--restart-backoff-ms",
                &backoff,
                "--scheduler-interval-ms",
                "200",
                "--poll-interval-ms",
                "500",
            ],
        )
        .await;
        let daemons = (0..daemons)
            .map(|i| {
                let host = format!("cpu-{}", (b'a' + i as u8) as char);
                DaemonProcess::start_with(
                    &coord.url(),
                    &host,
                    &tmp.path().join(format!("work-{host}")),
                    d.grace_s,
                    d.env,
                )
            })
            .collect();
        let pool = PgPool::connect(&pg.url()).await.expect("connect");
        let c = Cluster {
            tmp,
            pg,
            coord,
            daemons,
            pool,
        };
        // Every daemon has registered before a test injects anything.
        let n = c.daemons.len();
        c.wait_sql(
            "",
            &format!("SELECT count(*) = {n} OR $1 = 'never' FROM workers WHERE state = 'IDLE'"),
            Duration::from_secs(60),
        )
        .await;
        c
    }

    pub fn data(&self) -> PathBuf {
        self.tmp.path().join("data")
    }

    pub fn checkpoints(&self) -> PathBuf {
        self.tmp.path().join("checkpoints")
    }

    pub fn spec(&self, world: u32, max_iters: u64, checkpoint_interval: u64) -> pb::JobSpec {
        pb::JobSpec {
            checkpoint_interval: Some(checkpoint_interval),
            keep_last: Some(3),
            ..tiny_job(
                "faults",
                &self.data(),
                &self.checkpoints(),
                world,
                max_iters,
            )
        }
    }

    pub fn logs(&self) -> String {
        let mut s = format!("coordinator:\n{}\n", self.coord.log_text());
        for (i, d) in self.daemons.iter().enumerate() {
            s.push_str(&format!("daemon {i}:\n{}\n", d.log_text()));
        }
        s
    }

    /// Polls the database until `sql` (one boolean, `$1` = the job id) is true.
    pub async fn wait_sql(&self, job: &str, sql: &str, timeout: Duration) {
        let query = || sqlx::query_scalar(sql).bind(job).fetch_one(&self.pool);
        poll_until_ok(timeout, sql, || self.logs(), query).await;
    }

    /// Polls until `condition` holds on the job's row in `jobs`.
    pub async fn wait_job(&self, id: &str, condition: &str, secs: u64) {
        let sql = format!("SELECT {condition} FROM jobs WHERE id = $1::uuid");
        self.wait_sql(id, &sql, Duration::from_secs(secs)).await;
    }

    /// Polls until `condition` holds on the job's first attempt in `attempts`.
    pub async fn wait_first_attempt(&self, id: &str, condition: &str, secs: u64) {
        let sql =
            format!("SELECT {condition} FROM attempts WHERE job_id = $1::uuid AND attempt = 1");
        self.wait_sql(id, &sql, Duration::from_secs(secs)).await;
    }

    /// Polls until the job's checkpoint of `iteration` is in `state` (COMPLETE, PENDING).
    pub async fn wait_checkpoint(&self, id: &str, iteration: u64, state: &str, secs: u64) {
        let sql = format!(
            "SELECT EXISTS (SELECT 1 FROM checkpoints WHERE job_id = $1::uuid
                            AND iteration = {iteration} AND state = '{state}')"
        );
        self.wait_sql(id, &sql, Duration::from_secs(secs)).await;
    }

    /// Waits for a terminal state and returns the job.
    pub async fn wait_terminal(&self, id: &str, timeout: Duration) -> pb::Job {
        let terminal = "state IN ('SUCCEEDED','FAILED','CANCELED')";
        self.wait_job(id, terminal, timeout.as_secs()).await;
        self.coord.get_job(id).await
    }

    /// The newest loss iteration stored for the job.
    pub async fn wait_iteration(&self, id: &str, iteration: u64) {
        self.wait_sql(
            id,
            &format!(
                "SELECT coalesce(max(iteration), 0) >= {iteration} FROM metrics
                 WHERE job_id = $1::uuid AND name = 'loss'"
            ),
            Duration::from_secs(180),
        )
        .await;
    }

    /// The newest COMPLETE checkpoint (iteration, uri).
    pub async fn latest_checkpoint(&self, id: &str) -> Option<(i64, String)> {
        sqlx::query_as(
            "SELECT iteration, uri FROM checkpoints WHERE job_id = $1::uuid AND state = 'COMPLETE'
             ORDER BY iteration DESC LIMIT 1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .expect("checkpoints")
    }

    /// The daemon (by index) holding `rank` of the job's current attempt.
    pub async fn daemon_of(&self, job: &str, rank: i32) -> usize {
        let host: String = sqlx::query_scalar(
            "SELECT w.host FROM attempt_ranks ar JOIN jobs j ON j.id = ar.job_id
             AND j.attempt = ar.attempt JOIN workers w ON w.id = ar.worker_id
             WHERE ar.job_id = $1::uuid AND ar.rank = $2",
        )
        .bind(job)
        .bind(rank)
        .fetch_one(&self.pool)
        .await
        .expect("rank holder");
        (host.as_bytes()[4] - b'a') as usize
    }

    /// One loss per iteration 1..=max through GetMetrics, one stored row per (attempt,
    /// iteration), and the loss events of the last attempt cover every iteration after its
    /// resume point exactly once.
    pub async fn assert_every_metric_once(&self, id: &str, max: u64, events: &[pb::JobEvent]) {
        let points = metric_points(&mut self.coord.jobs().await, id, &["loss"], 0).await;
        let iters: Vec<u64> = points.iter().map(|p| p.iteration).collect();
        assert_eq!(iters, (1..=max).collect::<Vec<_>>(), "{}", self.logs());
        let dup: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM (SELECT attempt, iteration FROM metrics
             WHERE job_id = $1::uuid AND name = 'loss' GROUP BY 1, 2 HAVING count(*) > 1) d",
        )
        .bind(id)
        .fetch_one(&self.pool)
        .await
        .expect("dups");
        assert_eq!(dup, 0);
        // The event log: per attempt, each logged iteration at most once, in order.
        use pb::job_event::Payload;
        let mut by_attempt: std::collections::BTreeMap<u32, Vec<u64>> = Default::default();
        for e in events {
            if let Some(Payload::Metrics(m)) = &e.payload {
                if m.values.contains_key("loss") {
                    by_attempt.entry(e.attempt).or_default().push(m.iteration);
                }
            }
        }
        for (attempt, its) in &by_attempt {
            let mut sorted = its.clone();
            sorted.dedup();
            assert_eq!(
                &sorted, its,
                "attempt {attempt}: duplicated or out of order"
            );
        }
        let last = by_attempt.values().last().expect("some metrics events");
        assert_eq!(last.last(), Some(&max));
    }

    pub fn no_trainer_left(&self) {
        for (i, d) in self.daemons.iter().enumerate() {
            let left = d.trainer_pids();
            assert!(
                left.is_empty(),
                "daemon {i} still runs trainers {left:?}\n{}",
                self.logs()
            );
        }
    }
}

pub fn state_changes(events: &[pb::JobEvent]) -> Vec<(pb::JobState, String)> {
    events
        .iter()
        .filter_map(|e| match &e.payload {
            Some(pb::job_event::Payload::StateChange(s)) => Some((s.to(), s.reason.clone())),
            _ => None,
        })
        .collect()
}

pub fn kill9(pid: u32) {
    // SAFETY: signalling a test-owned process by pid.
    unsafe {
        libc::kill(pid as i32, libc::SIGKILL);
    }
}
