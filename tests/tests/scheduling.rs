//! The scheduler through the real coordinator process and a real PostgreSQL, with fake daemons
//! (`FakeWorker`): gang placement all or none, no worker shared by two jobs, jobs waiting for
//! capacity, priority order with strict FIFO, fewest hosts, lease expiry, and two coordinators
//! scheduling from the same database.

use segtrain_proto::v1 as pb;
use segtrain_proto::v1::job_service_client::JobServiceClient;
use segtrain_tests::coordinator::{queued_spec, submit_job, CoordinatorProcess, FakeWorker};
use segtrain_tests::service::Service;
use std::collections::{HashMap, HashSet};
use std::time::Duration;
use tonic::transport::Channel;

/// Longer than a few scheduler passes (`--scheduler-interval-ms 100`): long enough for a job that
/// could be placed to have been placed.
const SETTLE: Duration = Duration::from_millis(1200);

segtrain_tests::service_env!(Env);

impl Env {
    async fn start() -> Env {
        Env::start_with("--lease-seconds 300 --scheduler-interval-ms 100").await
    }

    /// A coordinator with these flags (`--name value ...`, split on spaces).
    async fn start_with(flags: &str) -> Env {
        let args: Vec<&str> = flags.split_whitespace().collect();
        Env(Service::start(&args).await)
    }

    async fn jobs(&self) -> JobServiceClient<Channel> {
        JobServiceClient::new(self.coord.channel().await)
    }

    async fn worker(&self, host: &str, gpu: i32) -> FakeWorker {
        FakeWorker::register(&self.coord, host, gpu).await
    }

    async fn submit(&self, name: &str, world_size: u32, priority: i32) -> pb::Job {
        self.coord.submit(spec(name, world_size, priority)).await
    }

    async fn state(&self, job: &pb::Job) -> pb::JobState {
        self.coord.get_job(&job.id).await.state()
    }

    async fn list_workers(&self) -> HashMap<String, pb::Worker> {
        self.coord.list_workers().await
    }

    /// Waits (20 s at most) until exactly `n` workers hold a rank of `job`; their ids.
    async fn holders_of(&self, job: &pb::Job, n: usize) -> HashSet<String> {
        let holders = || async {
            self.list_workers()
                .await
                .into_values()
                .filter(|w| w.job_id == job.id)
                .map(|w| w.id)
                .collect::<HashSet<String>>()
        };
        segtrain_tests::wait::poll_until(
            Duration::from_secs(20),
            &format!("{n} workers hold job {}", job.id),
            || self.coord.log_text(),
            || async { holders().await.len() == n },
        )
        .await;
        holders().await
    }

    /// No worker holds two unfinished ranks, and no worker is BUSY without one (or IDLE with one).
    async fn assert_no_sharing(&self) {
        let shared: Vec<(uuid::Uuid, i64)> = sqlx::query_as(
            "SELECT worker_id, count(*) FROM attempt_ranks WHERE finished_at IS NULL
             GROUP BY worker_id HAVING count(*) > 1",
        )
        .fetch_all(self.store.pool())
        .await
        .expect("query");
        assert!(shared.is_empty(), "workers booked twice: {shared:?}");
        let inconsistent: Vec<(uuid::Uuid, String)> = sqlx::query_as(
            "SELECT w.id, w.state FROM workers w
             WHERE (w.state = 'BUSY') <> EXISTS (SELECT 1 FROM attempt_ranks ar
                                                WHERE ar.worker_id = w.id AND ar.finished_at IS NULL)
               AND w.state IN ('IDLE','BUSY')",
        )
        .fetch_all(self.store.pool())
        .await
        .expect("query");
        assert!(inconsistent.is_empty(), "state vs ranks: {inconsistent:?}");
    }
}

/// A small job of `world_size` ranks at `priority` (nothing runs it: the fakes only report).
fn spec(name: &str, world_size: u32, priority: i32) -> pb::JobSpec {
    pb::JobSpec {
        priority: Some(priority),
        ..queued_spec(name, world_size)
    }
}

/// A metrics report of `iteration` (one loss point).
fn metrics(iteration: u64) -> pb::worker_event::Payload {
    pb::worker_event::Payload::Metrics(pb::MetricsReport {
        iteration,
        values: [("loss".to_string(), 1.0)].into(),
    })
}

/// Runs an assignment to success: started, then finished SUCCEEDED.
async fn complete(w: &mut FakeWorker, a: &pb::Assignment) {
    w.started(a).await;
    w.finished(&a.job_id, a.attempt, a.rank, pb::RankOutcome::Succeeded)
        .await;
}

#[tokio::test]
async fn gang_placement_is_all_or_none() {
    let env = Env::start().await;
    let job = env.submit("three", 3, 0).await;
    let mut w0 = env.worker("host-a", 0).await;
    let mut w1 = env.worker("host-a", 1).await;
    // Two workers cannot run a world-size-3 job: nothing happens.
    assert!(w0.try_message(SETTLE).await.is_none());
    assert!(w1.try_message(Duration::from_millis(10)).await.is_none());
    assert_eq!(env.state(&job).await, pb::JobState::Queued);
    let ws = env.list_workers().await;
    assert!(ws.values().all(|w| w.state() == pb::WorkerState::Idle));
    assert_eq!(
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM attempts")
            .fetch_one(env.store.pool())
            .await
            .unwrap(),
        0
    );

    // A third registration starts it on three distinct workers, ranks 0..3.
    let mut w2 = env.worker("host-b", 0).await;
    let mut ranks = Vec::new();
    for w in [&mut w0, &mut w1, &mut w2] {
        let a = w.start().await;
        assert_eq!(
            (a.job_id.as_str(), a.attempt, a.world_size),
            (job.id.as_str(), 1, 3)
        );
        ranks.push(a.rank);
    }
    ranks.sort();
    assert_eq!(ranks, [0, 1, 2]);
    assert_eq!(env.state(&job).await, pb::JobState::Scheduled);
    let ws = env.list_workers().await;
    let holders: HashSet<&str> = ws
        .values()
        .filter(|w| w.job_id == job.id)
        .map(|w| w.id.as_str())
        .collect();
    assert_eq!(holders.len(), 3);
    assert!(ws.values().all(|w| w.state() == pb::WorkerState::Busy));
    env.assert_no_sharing().await;
}

#[tokio::test]
async fn two_jobs_never_share_a_worker() {
    let env = Env::start().await;
    let first = env.submit("first", 2, 0).await;
    let second = env.submit("second", 2, 0).await;
    let mut ws = [
        env.worker("host-a", 0).await,
        env.worker("host-a", 1).await,
        env.worker("host-a", 2).await,
    ];
    // Exactly two workers get the first job (placed in the scheduler's time: wait for it);
    // the third stays idle.
    let holders = env.holders_of(&first, 2).await;
    let mut got: Vec<(usize, pb::Assignment)> = Vec::new();
    for (i, w) in ws.iter_mut().enumerate() {
        if holders.contains(&w.id) {
            got.push((i, w.start().await));
        }
    }
    assert!(got.iter().all(|(_, a)| a.job_id == first.id));
    assert_eq!(env.state(&first).await, pb::JobState::Scheduled);
    assert_eq!(env.state(&second).await, pb::JobState::Queued);
    env.assert_no_sharing().await;
    let idle = (0..3).find(|i| got.iter().all(|(j, _)| j != i)).unwrap();
    assert!(ws[idle].try_message(SETTLE).await.is_none());
    assert_eq!(
        env.list_workers().await[&ws[idle].id].state(),
        pb::WorkerState::Idle
    );

    // The second starts once the first has finished, on two of the three workers.
    for (i, a) in &got {
        complete(&mut ws[*i], a).await;
    }
    assert_eq!(env.state(&first).await, pb::JobState::Succeeded);
    let holders = env.holders_of(&second, 2).await;
    for w in ws.iter_mut().filter(|w| holders.contains(&w.id)) {
        assert_eq!(w.start().await.job_id, second.id);
    }
    assert_eq!(env.state(&second).await, pb::JobState::Scheduled);
    env.assert_no_sharing().await;
}

#[tokio::test]
async fn a_job_waits_queued_until_enough_workers_register() {
    let env = Env::start().await;
    let job = env.submit("patient", 2, 0).await;
    tokio::time::sleep(SETTLE).await;
    assert_eq!(env.state(&job).await, pb::JobState::Queued);
    let mut w0 = env.worker("host-a", 0).await;
    assert!(w0.try_message(SETTLE).await.is_none());
    assert_eq!(env.state(&job).await, pb::JobState::Queued);
    let mut w1 = env.worker("host-b", 0).await;
    let (a0, a1) = (w0.start().await, w1.start().await);
    assert_eq!(a0.job_id, job.id);
    assert_eq!(a1.job_id, job.id);
    assert_eq!(env.state(&job).await, pb::JobState::Scheduled);
}

#[tokio::test]
async fn priority_then_submission_order_with_strict_fifo() {
    let env = Env::start().await;
    // Queued before any worker exists, so the order is decided by the queue alone.
    let a = env.submit("a-p0", 1, 0).await;
    let b = env.submit("b-p5", 1, 5).await;
    let c = env.submit("c-p5", 1, 5).await;
    let d = env.submit("d-minus1", 1, -1).await;
    let mut w = env.worker("solo", 0).await;
    let mut order = Vec::new();
    for _ in 0..4 {
        let s = w.start().await;
        order.push(s.job_id.clone());
        complete(&mut w, &s).await;
    }
    assert_eq!(order, [b.id, c.id, a.id, d.id]);

    // Strict FIFO: a head that does not fit blocks the queue; the small job behind it waits.
    let big = env.submit("big-p10", 2, 10).await;
    let small = env.submit("small-p0", 1, 0).await;
    assert!(
        w.try_message(SETTLE).await.is_none(),
        "nothing jumps the head"
    );
    assert_eq!(env.state(&big).await, pb::JobState::Queued);
    assert_eq!(env.state(&small).await, pb::JobState::Queued);
    let mut w2 = env.worker("solo", 1).await;
    let (s1, s2) = (w.start().await, w2.start().await);
    assert_eq!(
        (s1.job_id.as_str(), s2.job_id.as_str()),
        (big.id.as_str(), big.id.as_str())
    );
    assert_eq!(env.state(&small).await, pb::JobState::Queued);
    // Cancelling nothing else: once the big job is done the small one runs.
    complete(&mut w, &s1).await;
    complete(&mut w2, &s2).await;
    let next = tokio::select! {
        a = w.start() => a,
        a = w2.start() => a,
    };
    assert_eq!(next.job_id, small.id);
}

#[tokio::test]
async fn placement_spans_the_fewest_hosts() {
    let env = Env::start().await;
    let mut small = env.worker("h-small", 0).await;
    let mut big = [
        env.worker("h-big", 0).await,
        env.worker("h-big", 1).await,
        env.worker("h-big", 2).await,
    ];
    let mut mid = [env.worker("h-mid", 0).await, env.worker("h-mid", 1).await];
    let job = env.submit("three", 3, 0).await;
    for (i, w) in big.iter_mut().enumerate() {
        let a = w.start().await;
        assert_eq!(a.job_id, job.id);
        assert_eq!(a.rank, i as u32, "ranks in GPU order");
    }
    assert!(small
        .try_message(Duration::from_millis(300))
        .await
        .is_none());
    // The next world-size-3 job needs two hosts: the two-GPU host, then the single one.
    let job2 = env.submit("three-again", 3, 0).await;
    let mut ranks = HashMap::new();
    for w in mid.iter_mut().chain(std::iter::once(&mut small)) {
        let a = w.start().await;
        assert_eq!(a.job_id, job2.id);
        ranks.insert((w.host.clone(), w.gpu_index), a.rank);
    }
    // Ranks in (host, GPU) order: h-mid:0, h-mid:1, h-small:0.
    assert_eq!(ranks[&("h-mid".to_string(), 0)], 0);
    assert_eq!(ranks[&("h-mid".to_string(), 1)], 1);
    assert_eq!(ranks[&("h-small".to_string(), 0)], 2);
    env.assert_no_sharing().await;
}

#[tokio::test]
async fn an_expired_lease_fails_the_attempt_restarts_the_job_and_stops_the_other_ranks() {
    // A long backoff keeps the job RESTARTING for the rest of the test.
    let env = Env::start_with(
        "--lease-seconds 2 --scheduler-interval-ms 100 --restart-backoff-ms 600000",
    )
    .await;
    let mut alive = env.worker("host-a", 0).await;
    let mut silent = env.worker("host-a", 1).await;
    // Only one of them heartbeats, listing its trainer once it runs one.
    let mut hb = alive.client.clone();
    let alive_id = alive.id.clone();
    let alive_instance = alive.instance.clone();
    let alive_secret = alive.secret.clone();
    let running_here = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let listed = running_here.clone();
    let beat = tokio::spawn(async move {
        loop {
            let running = listed.lock().map(|r| r.clone()).unwrap_or_default();
            let _ = hb
                .heartbeat(pb::HeartbeatRequest {
                    worker_id: alive_id.clone(),
                    running,
                    instance_id: alive_instance.clone(),
                    leaving: false,
                    instance_secret: alive_secret.clone(),
                })
                .await;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });
    let job = env.submit("fragile", 2, 0).await;
    let (a, s) = (alive.start().await, silent.start().await);
    running_here.lock().unwrap().push(pb::AttemptRank {
        job_id: a.job_id.clone(),
        attempt: a.attempt,
        rank: a.rank,
    });
    alive.started(&a).await;
    silent.started(&s).await;
    assert_eq!(env.state(&job).await, pb::JobState::Running);

    // The silent worker's lease runs out: it is LOST, the attempt too, the job RESTARTING (an
    // infrastructure failure, restarts left), the other rank stopped.
    let stop = alive.stop().await;
    assert_eq!((stop.job_id.as_str(), stop.rank), (job.id.as_str(), a.rank));
    assert!(stop.reason.contains("lost"), "{}", stop.reason);
    let got = env.coord.get_job(&job.id).await;
    assert_eq!(got.state(), pb::JobState::Restarting);
    assert_eq!(got.restarts, 1);
    assert!(got.reason.contains("lost"), "{}", got.reason);
    assert!(got.reason.contains("restart 1 of 3"), "{}", got.reason);
    let ws = env.list_workers().await;
    assert_eq!(ws[&silent.id].state(), pb::WorkerState::Lost);
    assert_eq!(ws[&silent.id].job_id, "");
    assert_eq!(ws[&alive.id].state(), pb::WorkerState::Busy);

    // The surviving rank stops (its heartbeat no longer lists the trainer): free again.
    beat.abort();
    let hb = alive.heartbeat(vec![]).await;
    assert!(hb.stop.is_empty());
    assert_eq!(
        env.list_workers().await[&alive.id].state(),
        pb::WorkerState::Idle
    );

    // The lost worker comes back with a heartbeat; its stale trainer is told to stop.
    let running = pb::AttemptRank {
        job_id: job.id.clone(),
        attempt: 1,
        rank: s.rank,
    };
    let hb = silent.heartbeat(vec![running.clone()]).await;
    assert_eq!(hb.stop, vec![running]);
    assert_eq!(
        env.list_workers().await[&silent.id].state(),
        pb::WorkerState::Idle
    );

    // Cancel wins over the pending restart: CANCELED at once, never queued again.
    let canceled = env.coord.cancel(&job.id, "enough").await;
    assert_eq!(canceled.state(), pb::JobState::Canceled);
    assert!(alive
        .try_message(Duration::from_millis(500))
        .await
        .is_none());
    assert_eq!(env.state(&job).await, pb::JobState::Canceled);
}

#[tokio::test]
async fn a_restarting_job_is_queued_again_after_its_backoff_and_resumes() {
    let env =
        Env::start_with("--lease-seconds 300 --scheduler-interval-ms 50 --restart-backoff-ms 300")
            .await;
    let mut w = env.worker("host-r", 0).await;
    let job = env.submit("flaky", 1, 0).await;
    let a = w.start().await;
    assert_eq!(a.attempt, 1);
    w.started(&a).await;
    // A checkpoint completes, then the trainer crashes (an infrastructure failure).
    let sha = "ab".repeat(32);
    let uri = segtrain_tests::coordinator::checkpoint_uri(&job.id, 1, "ckpt-00000040");
    let ckpt = w.event(
        &job.id,
        1,
        0,
        pb::worker_event::Payload::Checkpoint(pb::CheckpointReport {
            checkpoint: Some(pb::Checkpoint {
                iteration: 40,
                uri: uri.clone(),
                sha256: sha.clone(),
                bytes: 10,
                ..Default::default()
            }),
        }),
    );
    let past = w.event(&job.id, 1, 0, metrics(55));
    w.report(vec![ckpt, past])
        .await
        .expect("checkpoint and metrics stored");
    w.finished(&job.id, 1, 0, pb::RankOutcome::FailedInfra)
        .await;
    // RESTARTING, then QUEUED after the backoff, then attempt 2 resuming from iteration 40.
    let b = w.start().await;
    assert_eq!((b.attempt, b.resume_iteration), (2, 40));
    assert_eq!(b.resume_from, uri);
    assert_eq!(b.resume_candidates.len(), 1);
    assert_eq!(b.resume_candidates[0].sha256, sha);
    let got = env.coord.get_job(&job.id).await;
    assert_eq!(got.restarts, 1);
    assert!(got.reason.contains("restart 1 of 3"), "{}", got.reason);
    // Progress is attempt 2's: nothing before it reports, its resume point once it resumed;
    // how far attempt 1 got stays as furthest_iteration.
    assert_eq!((got.iteration, got.furthest_iteration), (0, 55));
    w.started(&b).await;
    let resumed = w.event(
        &job.id,
        2,
        0,
        pb::worker_event::Payload::Resumed(pb::Resumed {
            iteration: 40,
            uri: uri.clone(),
            skipped: Vec::new(),
        }),
    );
    w.report(vec![resumed]).await.expect("resumed stored");
    let got = env.coord.get_job(&job.id).await;
    assert_eq!((got.iteration, got.furthest_iteration), (40, 55));
    let now = w.event(&job.id, 2, 0, metrics(45));
    w.report(vec![now]).await.expect("metrics stored");
    let got = env.coord.get_job(&job.id).await;
    assert_eq!((got.iteration, got.furthest_iteration), (45, 55));
    // A deterministic failure of the new attempt is not retried.
    w.finished(&job.id, 2, 0, pb::RankOutcome::FailedDeterministic)
        .await;
    assert_eq!(env.state(&job).await, pb::JobState::Failed);
    let got = env.coord.get_job(&job.id).await;
    assert_eq!(got.restarts, 1);
    assert!(got.reason.contains("not retried"), "{}", got.reason);
}

#[tokio::test]
async fn two_coordinators_never_double_book_a_worker() {
    let env = Env::start_with("--lease-seconds 300 --scheduler-interval-ms 20").await;
    let other = CoordinatorProcess::start_with_args(
        &env.url,
        &["--lease-seconds", "300", "--scheduler-interval-ms", "20"],
    )
    .await;
    // Six workers, half registered through each coordinator, each completing whatever it gets.
    let mut handles = Vec::new();
    for i in 0..6 {
        let coord = if i % 2 == 0 { &env.coord } else { &other };
        let mut w = FakeWorker::register(coord, &format!("host-{}", i / 3), i % 3).await;
        handles.push(tokio::spawn(async move {
            let mut done = 0;
            while let Some(m) = w.try_message(Duration::from_secs(5)).await {
                if let Some(pb::assignment_message::Kind::Start(a)) = m.kind {
                    w.started(&a).await;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    w.finished(&a.job_id, a.attempt, a.rank, pb::RankOutcome::Succeeded)
                        .await;
                    done += 1;
                }
            }
            done
        }));
    }
    // Jobs of mixed sizes submitted through both coordinators.
    let mut c1 = env.jobs().await;
    let mut c2 = JobServiceClient::new(other.channel().await);
    let mut jobs = Vec::new();
    for i in 0..12 {
        let ws = [2, 1, 3][i % 3];
        let c = if i % 2 == 0 { &mut c1 } else { &mut c2 };
        jobs.push(submit_job(c, spec(&format!("job-{i}"), ws, 0)).await);
    }
    // Watch the invariant while everything runs to completion.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        env.assert_no_sharing().await;
        let mut all_done = true;
        for j in &jobs {
            if env.state(j).await != pb::JobState::Succeeded {
                all_done = false;
            }
        }
        if all_done {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "jobs did not all finish; coordinator log:\n{}",
            env.coord.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ranks: i64 = sqlx::query_scalar("SELECT count(*) FROM attempt_ranks")
        .fetch_one(env.store.pool())
        .await
        .unwrap();
    assert_eq!(
        ranks,
        (2 + 1 + 3) * 4,
        "one attempt per job, one rank per GPU"
    );
    let attempts: i64 = sqlx::query_scalar("SELECT count(*) FROM attempts WHERE attempt = 1")
        .fetch_one(env.store.pool())
        .await
        .unwrap();
    assert_eq!(attempts, 12);
    let mut total = 0;
    for h in handles {
        total += h.await.expect("worker task");
    }
    assert_eq!(total, 24);
}

#[tokio::test]
async fn a_coordinator_restart_neither_loses_assignments_nor_reaps_silent_workers() {
    // A lease short enough to lapse while the coordinator is down, long enough that the checks
    // after the restart (a few RPCs on a loaded machine) finish before the renewed one does.
    let mut env = Env::start_with("--lease-seconds 4 --scheduler-interval-ms 100").await;
    let mut w0 = env.worker("host-a", 0).await;
    let mut w1 = env.worker("host-a", 1).await;
    let job = env.submit("survivor", 2, 0).await;
    let (a0, a1) = (w0.start().await, w1.start().await);
    w0.started(&a0).await;

    // The coordinator is down for longer than a lease: nobody could heartbeat meanwhile.
    env.coord.kill();
    tokio::time::sleep(Duration::from_secs(5)).await;
    env.coord.restart().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(env.state(&job).await, pb::JobState::Scheduled);
    let ws = env.list_workers().await;
    assert!(
        ws.values().all(|w| w.state() == pb::WorkerState::Busy),
        "{ws:?}"
    );

    // The daemons reconnect: the rank that had not started gets its start again.
    for w in [&mut w0, &mut w1] {
        w.client = segtrain_proto::v1::worker_service_client::WorkerServiceClient::new(
            env.coord.channel_with_token(None),
        );
        w.heartbeat(vec![]).await;
        w.open_stream().await;
    }
    let again = w1.start().await;
    assert_eq!(
        (again.job_id.as_str(), again.rank),
        (a1.job_id.as_str(), a1.rank)
    );
    assert!(w0.try_message(Duration::from_millis(300)).await.is_none());
    w1.started(&again).await;
    assert_eq!(env.state(&job).await, pb::JobState::Running);
}

/// What people read names a CPU worker `host:cpu`, not by its GPU index -1.
#[tokio::test]
async fn a_cpu_worker_is_named_cpu_in_the_placement_event() {
    let env = Env::start().await;
    let job = env.submit("on-cpu", 1, 0).await;
    let mut w = env.worker("cpu-a", -1).await;
    w.start().await;
    let mut stream = env.coord.watch(&job.id).await;
    let placed = loop {
        let ev = tokio::time::timeout(Duration::from_secs(30), stream.message())
            .await
            .expect("the placement event within 30 s")
            .expect("watch stream")
            .expect("the stream stays open");
        let text = format!("{:?}", ev.payload);
        if text.contains("placed on") {
            break text;
        }
    };
    assert!(placed.contains("placed on 1 worker: cpu-a:cpu"), "{placed}");
}
