//! The worker API through the real coordinator process and a real PostgreSQL, with the daemons
//! played by plain tonic clients (`FakeWorker`): registration and heartbeats, the assignment
//! stream, rendezvous, event ingestion (exactly once per sequence number), fencing of stale
//! attempts, cancel, and field validation.

use segtrain_coordinator::state::JobState;
use segtrain_proto::v1 as pb;
use segtrain_proto::v1::job_service_client::JobServiceClient;
use segtrain_proto::v1::worker_event::Payload;
use segtrain_proto::v1::worker_service_client::WorkerServiceClient;
use segtrain_tests::coordinator::{
    assert_code, describe_event, events_until_end, metric_points, queued_spec, FakeWorker,
};
use segtrain_tests::service::walk;
use segtrain_tests::service::Service;
use std::collections::HashMap;
use std::time::Duration;
use tonic::transport::Channel;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use uuid::Uuid;

segtrain_tests::service_env!(Env);

impl Env {
    async fn start() -> Env {
        // A long lease: these tests do not heartbeat in the background. A long restart backoff:
        // a job that restarts stays RESTARTING while a test looks.
        Env(Service::start(&["--lease-seconds", "300", "--restart-backoff-ms", "600000"]).await)
    }

    async fn jobs(&self) -> JobServiceClient<Channel> {
        JobServiceClient::new(self.coord.channel().await)
    }

    async fn workers(&self) -> WorkerServiceClient<Channel> {
        WorkerServiceClient::new(self.coord.channel().await)
    }

    async fn worker(&self, host: &str, gpu: i32) -> FakeWorker {
        FakeWorker::register(&self.coord, host, gpu).await
    }

    async fn count(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sql)
            .fetch_one(self.store.pool())
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    async fn submit(&self, name: &str, world_size: u32) -> pb::Job {
        self.coord.submit(queued_spec(name, world_size)).await
    }

    async fn job(&self, id: &str) -> pb::Job {
        self.coord.get_job(id).await
    }

    async fn list_workers(&self) -> HashMap<String, pb::Worker> {
        self.coord.list_workers().await
    }
}

/// Orders the two workers' starts by rank.
async fn starts(a: &mut FakeWorker, b: &mut FakeWorker) -> (pb::Assignment, pb::Assignment) {
    let (sa, sb) = (a.start().await, b.start().await);
    assert_eq!(sa.job_id, sb.job_id);
    assert_ne!(sa.rank, sb.rank, "distinct ranks");
    (sa, sb)
}

fn metrics(iteration: u64, loss: f64) -> Payload {
    Payload::Metrics(pb::MetricsReport {
        iteration,
        values: HashMap::from([("loss".to_string(), loss), ("lr".to_string(), 1e-5)]),
    })
}

/// The machine-readable reason of a refusal (google.rpc.ErrorInfo), if it has one.
fn reason(e: &tonic::Status) -> Option<String> {
    use tonic_types::StatusExt;
    e.get_details_error_info().map(|i| i.reason)
}

/// A stale-attempt refusal: FAILED_PRECONDITION with the STALE_ATTEMPT reason, the only one
/// that tells a daemon to drop the attempt's events.
fn assert_stale(r: Result<impl std::fmt::Debug, tonic::Status>, needle: &str) {
    let e = r.expect_err("the call must fail");
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    assert!(e.message().contains(needle), "{needle:?}: {}", e.message());
    assert_eq!(reason(&e).as_deref(), Some("STALE_ATTEMPT"), "{e:?}");
}

#[tokio::test]
async fn happy_path_through_the_worker_api() {
    let env = Env::start().await;
    let mut w0 = env.worker("host-a", 0).await;
    let mut w1 = env.worker("host-a", 1).await;
    let job = env.submit("happy", 2).await;
    let mut watch = env.coord.watch(&job.id).await;

    // Both workers get their rank of attempt 1 with the resolved spec.
    let (s0, s1) = starts(&mut w0, &mut w1).await;
    let (mut r0, mut r1, a0, a1) = if s0.rank == 0 {
        (w0, w1, s0, s1)
    } else {
        (w1, w0, s1, s0)
    };
    for a in [&a0, &a1] {
        assert_eq!(a.job_id, job.id);
        assert_eq!(a.attempt, 1);
        assert_eq!(a.world_size, 2);
        assert_eq!(a.resume_from, "", "a first attempt starts fresh");
        assert_eq!(a.resume_iteration, 0);
        let spec = a.spec.as_ref().expect("spec");
        assert_eq!(spec.variant.as_deref(), Some("b0"), "resolved spec");
        assert_eq!(spec.world_size, Some(2));
    }
    assert_eq!((a0.rank, a1.rank), (0, 1));
    // Ranks follow (host, GPU) order.
    assert_eq!((r0.gpu_index, r1.gpu_index), (0, 1));
    assert_eq!(env.job(&job.id).await.state(), pb::JobState::Scheduled);

    // ListWorkers shows the assignment.
    let ws = env.list_workers().await;
    for (w, rank) in [(&r0, 0), (&r1, 1)] {
        let w = &ws[&w.id];
        assert_eq!(w.state(), pb::WorkerState::Busy);
        assert_eq!(
            (w.job_id.as_str(), w.attempt, w.rank),
            (job.id.as_str(), 1, rank)
        );
    }

    // Rendezvous: rank 1 waits; rank 0 publishes; rank 1 gets it.
    let mut c1 = r1.client.clone();
    let (rid1, jid, inst1) = (r1.id.clone(), job.id.clone(), r1.instance.clone());
    let secret1 = r1.secret.clone();
    let waiter = tokio::spawn(async move {
        c1.await_rendezvous(pb::AwaitRendezvousRequest {
            worker_id: rid1,
            job_id: jid,
            attempt: 1,
            timeout_seconds: 30,
            instance_id: inst1,
            instance_secret: secret1,
        })
        .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiter.is_finished(), "rank 1 waits for rank 0");
    let publish = |w: &FakeWorker, attempt: u32, addr: &str| pb::PublishRendezvousRequest {
        worker_id: w.id.clone(),
        job_id: job.id.clone(),
        attempt,
        endpoint: Some(pb::publish_rendezvous_request::Endpoint::TcpAddress(
            addr.into(),
        )),
        instance_id: w.instance.clone(),
        instance_secret: w.secret.clone(),
    };
    r0.client
        .publish_rendezvous(publish(&r0, 1, "10.0.0.1:29500"))
        .await
        .expect("rank 0 publishes");
    let got = waiter
        .await
        .expect("waiter task")
        .expect("rank 1 gets the endpoint")
        .into_inner();
    assert_eq!(
        got.endpoint,
        Some(pb::await_rendezvous_response::Endpoint::TcpAddress(
            "10.0.0.1:29500".into()
        ))
    );
    // Idempotent for the same value; another value, or another rank, is refused.
    r0.client
        .publish_rendezvous(publish(&r0, 1, "10.0.0.1:29500"))
        .await
        .expect("same endpoint again");
    assert_code(
        r0.client
            .publish_rendezvous(publish(&r0, 1, "10.0.0.1:29501"))
            .await,
        Code::FailedPrecondition,
        "different",
    );
    assert_code(
        r1.client
            .publish_rendezvous(publish(&r1, 1, "10.0.0.2:29500"))
            .await,
        Code::FailedPrecondition,
        "rank 0",
    );
    let attempt_state = |env: &Env| {
        let pool = env.store.pool().clone();
        let id = Uuid::parse_str(&job.id).unwrap();
        async move {
            sqlx::query_scalar::<_, String>(
                "SELECT state FROM attempts WHERE job_id = $1 AND attempt = 1",
            )
            .bind(id)
            .fetch_one(&pool)
            .await
            .expect("attempt row")
        }
    };
    assert_eq!(attempt_state(&env).await, "RENDEZVOUS");

    // Both ranks started: the job runs.
    r0.started(&a0).await;
    assert_eq!(env.job(&job.id).await.state(), pb::JobState::Scheduled);
    r1.started(&a1).await;
    assert_eq!(env.job(&job.id).await.state(), pb::JobState::Running);
    assert_eq!(attempt_state(&env).await, "RUNNING");

    // Rank 0 reports metrics and a checkpoint in one batch.
    let evs = vec![
        r0.event(&job.id, 1, 0, metrics(50, 2.5)),
        r0.event(&job.id, 1, 0, metrics(100, 1.5)),
        r0.event(
            &job.id,
            1,
            0,
            Payload::Checkpoint(pb::CheckpointReport {
                checkpoint: Some(pb::Checkpoint {
                    iteration: 100,
                    uri: format!(
                        "file://{}",
                        segtrain_tests::coordinator::checkpoint_uri(&job.id, 1, "ckpt-100")
                    ),
                    bytes: 12345,
                    sha256: "ab".repeat(32),
                    metrics: HashMap::from([("loss".to_string(), 1.5)]),
                    ..Default::default()
                }),
            }),
        ),
    ];
    let acked = r0.report(evs).await.expect("report").acked_seq;
    assert_eq!(acked, r0.seq);
    let id = Uuid::parse_str(&job.id).unwrap();
    assert_eq!(
        env.count(&format!(
            "SELECT count(*) FROM metrics WHERE job_id = '{id}'"
        ))
        .await,
        4
    );
    let cps = env
        .jobs()
        .await
        .list_checkpoints(pb::ListCheckpointsRequest {
            job_id: job.id.clone(),
            include_deleted: false,
            ..Default::default()
        })
        .await
        .expect("list checkpoints")
        .into_inner()
        .checkpoints;
    assert_eq!(cps.len(), 1);
    assert_eq!(cps[0].iteration, 100);
    assert_eq!(
        cps[0].uri,
        format!(
            "file://{}",
            segtrain_tests::coordinator::checkpoint_uri(&job.id, 1, "ckpt-100")
        )
    );
    assert_eq!(cps[0].bytes, 12345);
    assert_eq!(cps[0].state(), pb::CheckpointState::Complete);
    assert_eq!(cps[0].metrics.get("loss"), Some(&1.5));
    let points = metric_points(&mut env.jobs().await, &job.id, &["loss"], 0).await;
    assert_eq!(
        points
            .iter()
            .map(|p| (p.iteration, p.value))
            .collect::<Vec<_>>(),
        vec![(50, 2.5), (100, 1.5)]
    );
    assert_eq!(env.job(&job.id).await.iteration, 100);

    // Both finish: the job succeeds and the workers are free again.
    r0.finished(&job.id, 1, 0, pb::RankOutcome::Succeeded).await;
    assert_eq!(env.job(&job.id).await.state(), pb::JobState::Running);
    r1.finished(&job.id, 1, 1, pb::RankOutcome::Succeeded).await;
    let done = env.job(&job.id).await;
    assert_eq!(done.state(), pb::JobState::Succeeded);
    assert!(done.finished_at.is_some());
    assert_eq!(attempt_state(&env).await, "SUCCEEDED");
    let ws = env.list_workers().await;
    for w in [&r0, &r1] {
        let w = &ws[&w.id];
        assert_eq!(w.state(), pb::WorkerState::Idle);
        assert_eq!(w.job_id, "");
    }

    // WatchJob saw all of it, in order, and ended.
    let got = events_until_end(&mut watch, Duration::from_secs(20), String::new).await;
    assert_eq!(
        got.iter().map(describe_event).collect::<Vec<_>>(),
        [
            "state JOB_STATE_QUEUED",
            "state JOB_STATE_SCHEDULED",
            "state JOB_STATE_RUNNING",
            "metrics 50",
            "metrics 100",
            "checkpoint 100",
            "state JOB_STATE_SUCCEEDED",
        ]
    );
    assert!(got.windows(2).all(|w| w[0].id < w[1].id));
    assert!(got[1..].iter().all(|e| e.attempt == 1));

    // A re-registration keeps the id and returns the acknowledged sequence.
    let again = env
        .workers()
        .await
        .register(pb::RegisterRequest {
            host: r0.host.clone(),
            gpu_index: r0.gpu_index,
            instance_id: r0.instance.clone(),
            instance_secret: r0.secret.clone(),
            ..Default::default()
        })
        .await
        .expect("re-register")
        .into_inner();
    assert_eq!(again.worker_id, r0.id);
    assert_eq!(again.acked_seq, r0.seq);
    assert_eq!(again.lease_seconds, 300);
}

#[tokio::test]
async fn cancel_of_a_running_job_stops_every_rank() {
    let env = Env::start().await;
    let mut w0 = env.worker("host-a", 0).await;
    let mut w1 = env.worker("host-a", 1).await;
    let job = env.submit("cancel-me", 2).await;
    let (a0, a1) = (w0.start().await, w1.start().await);
    w0.started(&a0).await;
    w1.started(&a1).await;
    assert_eq!(env.job(&job.id).await.state(), pb::JobState::Running);

    let canceled = env.coord.cancel(&job.id, "user says stop").await;
    assert_eq!(canceled.state(), pb::JobState::Canceling);

    // Both get `stop` on their stream, and again in their heartbeat.
    for (w, a) in [(&mut w0, &a0), (&mut w1, &a1)] {
        let stop = w.stop().await;
        assert_eq!(
            (stop.job_id.as_str(), stop.attempt, stop.rank),
            (job.id.as_str(), 1, a.rank)
        );
        assert_eq!(stop.reason, "user says stop");
        assert_eq!(stop.grace_seconds, 30);
        let running = pb::AttemptRank {
            job_id: a.job_id.clone(),
            attempt: a.attempt,
            rank: a.rank,
        };
        let hb = w.heartbeat(vec![running.clone()]).await;
        assert_eq!(hb.stop, vec![running]);
    }

    // The job ends CANCELED once the last rank has stopped.
    w0.finished(&job.id, 1, a0.rank, pb::RankOutcome::Canceled)
        .await;
    assert_eq!(env.job(&job.id).await.state(), pb::JobState::Canceling);
    let ws = env.list_workers().await;
    assert_eq!(ws[&w0.id].state(), pb::WorkerState::Idle);
    assert_eq!(ws[&w1.id].state(), pb::WorkerState::Busy);
    w1.finished(&job.id, 1, a1.rank, pb::RankOutcome::Canceled)
        .await;
    let done = env.job(&job.id).await;
    assert_eq!(done.state(), pb::JobState::Canceled);
    assert_eq!(done.reason, "user says stop");
    let ws = env.list_workers().await;
    assert!(ws.values().all(|w| w.state() == pb::WorkerState::Idle));
    let id = Uuid::parse_str(&job.id).unwrap();
    assert_eq!(
        env.count(&format!(
            "SELECT count(*) FROM attempts WHERE job_id = '{id}' AND state = 'CANCELED'"
        ))
        .await,
        1
    );
}

#[tokio::test]
async fn a_failed_rank_fails_the_job_and_stops_the_others() {
    let env = Env::start().await;
    let mut w0 = env.worker("host-a", 0).await;
    let mut w1 = env.worker("host-a", 1).await;
    let job = env.submit("fails", 2).await;
    let (a0, a1) = (w0.start().await, w1.start().await);
    w0.started(&a0).await;
    w1.started(&a1).await;
    let ev = w1.event(
        &job.id,
        1,
        a1.rank,
        Payload::Finished(pb::RankFinished {
            outcome: pb::RankOutcome::FailedDeterministic as i32,
            reason: "CUDA out of memory".into(),
        }),
    );
    w1.report(vec![ev]).await.expect("report failure");
    let failed = env.job(&job.id).await;
    assert_eq!(failed.state(), pb::JobState::Failed);
    assert!(
        failed.reason.contains("CUDA out of memory"),
        "{}",
        failed.reason
    );
    // The other rank is told to stop; its worker is free once it reports.
    let stop = w0.stop().await;
    assert_eq!((stop.attempt, stop.rank), (1, a0.rank));
    assert_eq!(
        env.list_workers().await[&w1.id].state(),
        pb::WorkerState::Idle
    );
    assert_eq!(
        env.list_workers().await[&w0.id].state(),
        pb::WorkerState::Busy
    );
    w0.finished(&job.id, 1, a0.rank, pb::RankOutcome::Canceled)
        .await;
    assert_eq!(
        env.list_workers().await[&w0.id].state(),
        pb::WorkerState::Idle
    );
    assert_eq!(env.job(&job.id).await.state(), pb::JobState::Failed);
}

#[tokio::test]
async fn stale_attempts_are_refused_and_write_nothing() {
    let env = Env::start().await;
    let mut old0 = env.worker("host-a", 0).await;
    let mut old1 = env.worker("host-a", 1).await;
    let job = env.submit("fenced", 2).await;
    let id = Uuid::parse_str(&job.id).unwrap();
    let (a0, a1) = (old0.start().await, old1.start().await);
    old0.started(&a0).await;
    old1.started(&a1).await;

    // What a restart does (restart policy comes later): RUNNING → RESTARTING → QUEUED; the
    // scheduler places attempt 2 on two new workers while attempt 1's workers are still busy.
    walk(
        &env.store,
        id,
        &[JobState::Restarting, JobState::Queued],
        "test restart",
    )
    .await;
    let mut new0 = env.worker("host-b", 0).await;
    let mut new1 = env.worker("host-b", 1).await;
    let (b0, b1) = (new0.start().await, new1.start().await);
    assert_eq!((b0.attempt, b1.attempt), (2, 2));
    assert_eq!(env.job(&job.id).await.attempt, 2);
    // The old ranks are told to stop.
    for w in [&mut old0, &mut old1] {
        let stop = w.stop().await;
        assert_eq!(stop.attempt, 1);
        assert!(stop.reason.contains("stale attempt"), "{}", stop.reason);
    }

    let metrics_before = env.count("SELECT count(*) FROM metrics").await;
    let events_before = env.count("SELECT count(*) FROM job_events").await;
    let acked_before = env
        .count("SELECT sum(acked_seq)::bigint FROM workers")
        .await;

    // ReportEvents with the old attempt: refused, naming job and attempts.
    let ev = old0.event(&job.id, 1, a0.rank, metrics(50, 1.0));
    assert_stale(
        old0.report(vec![ev]).await,
        &format!("stale attempt: job {} is at attempt 2, got 1", job.id),
    );
    // Attempt 0 (never valid) and a future attempt too.
    for attempt in [0, 3] {
        let ev = new0.event(&job.id, attempt, b0.rank, metrics(50, 1.0));
        assert_stale(new0.report(vec![ev]).await, "stale attempt");
    }
    // One stale event refuses the whole batch, valid events included.
    let good = new0.event(&job.id, 2, b0.rank, metrics(50, 1.0));
    let stale = new0.event(&job.id, 1, b0.rank, metrics(60, 1.0));
    assert_stale(new0.report(vec![good, stale]).await, "got 1");
    // A rank of the current attempt that belongs to another worker: a conflict, not a stale
    // attempt (no STALE_ATTEMPT reason, so a daemon drops only this event, never the rest of
    // the attempt's).
    let other = new0.event(&job.id, 2, b1.rank, metrics(50, 1.0));
    let e = new0.report(vec![other]).await.expect_err("not assigned");
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    assert!(e.message().contains("not assigned"), "{}", e.message());
    assert_ne!(reason(&e).as_deref(), Some("STALE_ATTEMPT"), "{e:?}");
    // An unknown job.
    let unknown = new0.event(&Uuid::now_v7().to_string(), 1, 0, metrics(50, 1.0));
    assert_stale(new0.report(vec![unknown]).await, "does not exist");

    // PublishRendezvous with the old attempt, from the old and from the new rank 0.
    let (rank0_old, rank0_new) = (
        if a0.rank == 0 { &mut old0 } else { &mut old1 },
        if b0.rank == 0 {
            (new0.id.clone(), new0.instance.clone(), new0.secret.clone())
        } else {
            (new1.id.clone(), new1.instance.clone(), new1.secret.clone())
        },
    );
    let publish = |(worker, instance, secret): &(String, String, String), attempt: u32| {
        pb::PublishRendezvousRequest {
            worker_id: worker.clone(),
            job_id: job.id.clone(),
            attempt,
            endpoint: Some(pb::publish_rendezvous_request::Endpoint::NcclUniqueId(
                vec![7; 128],
            )),
            instance_id: instance.clone(),
            instance_secret: secret.clone(),
        }
    };
    let old = (
        rank0_old.id.clone(),
        rank0_old.instance.clone(),
        rank0_old.secret.clone(),
    );
    assert_stale(
        rank0_old.client.publish_rendezvous(publish(&old, 1)).await,
        "stale attempt: job",
    );
    let mut client = env.workers().await;
    assert_stale(
        client.publish_rendezvous(publish(&rank0_new, 1)).await,
        "is at attempt 2, got 1",
    );
    assert_stale(
        client
            .await_rendezvous(pb::AwaitRendezvousRequest {
                worker_id: rank0_new.0.clone(),
                job_id: job.id.clone(),
                attempt: 1,
                timeout_seconds: 1,
                instance_id: rank0_new.1.clone(),
                instance_secret: rank0_new.2.clone(),
            })
            .await,
        "stale attempt",
    );

    // Nothing was written by any refused call.
    assert_eq!(
        env.count("SELECT count(*) FROM metrics").await,
        metrics_before
    );
    assert_eq!(
        env.count("SELECT count(*) FROM job_events").await,
        events_before
    );
    assert_eq!(
        env.count("SELECT sum(acked_seq)::bigint FROM workers")
            .await,
        acked_before
    );
    assert_eq!(
        env.count(&format!(
            "SELECT count(*) FROM attempts WHERE job_id = '{id}' AND rendezvous IS NOT NULL"
        ))
        .await,
        0
    );

    // The current attempt works, and the heartbeat tells the old workers to stop.
    client
        .publish_rendezvous(publish(&rank0_new, 2))
        .await
        .expect("current attempt publishes");
    let running = pb::AttemptRank {
        job_id: job.id.clone(),
        attempt: 1,
        rank: a0.rank,
    };
    assert_eq!(
        old0.heartbeat(vec![running.clone()]).await.stop,
        vec![running]
    );
    let ok = new0.event(&job.id, 2, b0.rank, metrics(50, 1.0));
    new0.report(vec![ok])
        .await
        .expect("current attempt reports");

    // The old daemons stop their trainers; `finished` of a stale attempt is refused like any
    // other event, so the next heartbeat without the trainer is what frees them.
    let fin = old1.event(
        &job.id,
        1,
        a1.rank,
        Payload::Finished(pb::RankFinished {
            outcome: pb::RankOutcome::Canceled as i32,
            reason: String::new(),
        }),
    );
    assert_stale(old1.report(vec![fin]).await, "stale");
    assert_eq!(
        env.list_workers().await[&old1.id].state(),
        pb::WorkerState::Busy
    );
    for w in [&mut old0, &mut old1] {
        assert!(w.heartbeat(vec![]).await.stop.is_empty());
    }
    let ws = env.list_workers().await;
    assert_eq!(ws[&old0.id].state(), pb::WorkerState::Idle);
    assert_eq!(ws[&old1.id].state(), pb::WorkerState::Idle);
    assert_eq!(
        env.count(&format!(
            "SELECT count(*) FROM attempts WHERE job_id = '{id}' AND attempt = 1 AND state = 'CANCELED'"
        ))
        .await,
        1
    );
    assert_eq!(env.job(&job.id).await.state(), pb::JobState::Scheduled);
}

#[tokio::test]
async fn a_second_assignment_stream_of_a_worker_ends_the_first() {
    let env = Env::start().await;
    let mut w = env.worker("host-a", 0).await;
    let mut first = w.take_stream().expect("the first stream");
    w.open_stream().await;
    // The older stream ends (a half-open connection, or a second daemon process with the same
    // worker id: either way only one stream may carry starts).
    match tokio::time::timeout(Duration::from_secs(10), first.message()).await {
        Ok(Ok(None)) | Ok(Err(_)) => {}
        Ok(Ok(Some(m))) => panic!("the first stream got {m:?}"),
        Err(_) => panic!("the first stream is still open after a second one was opened"),
    }
    let job = env.submit("one-stream", 1).await;
    let a = w.start().await;
    assert_eq!(a.job_id, job.id);
}

#[tokio::test]
async fn non_finite_scores_are_stored_as_what_they_are() {
    let env = Env::start().await;
    let mut w = env.worker("host-a", 0).await;
    let job = env.submit("nan", 1).await;
    let a = w.start().await;
    w.started(&a).await;
    let eval = w.event(
        &job.id,
        a.attempt,
        0,
        Payload::Eval(pb::EvalReport {
            iteration: 10,
            miou: f64::NAN,
            aacc: 0.5,
            loss: f64::INFINITY,
            class_iou: vec![0.25, f64::NAN],
        }),
    );
    let m = w.event(
        &job.id,
        a.attempt,
        0,
        Payload::Metrics(pb::MetricsReport {
            iteration: 10,
            values: HashMap::from([("loss".to_string(), f64::NAN)]),
        }),
    );
    w.report(vec![eval, m])
        .await
        .expect("non-finite values are accepted");
    let points: Vec<(String, f64)> =
        sqlx::query_as("SELECT name, value FROM metrics WHERE job_id = $1::uuid ORDER BY name")
            .bind(&job.id)
            .fetch_all(env.store.pool())
            .await
            .expect("points");
    let names: Vec<&str> = points.iter().map(|(n, _)| n.as_str()).collect();
    // Per-class IoU is named by index unless the classes are Cityscapes' 19.
    assert_eq!(
        names,
        [
            "aacc",
            "class_iou/0",
            "class_iou/1",
            "loss",
            "miou",
            "val_loss"
        ]
    );
    assert_eq!(points[1].1, 0.25);
    assert!(points[2].1.is_nan() && points[3].1.is_nan() && points[4].1.is_nan());
    assert_eq!(points[5].1, f64::INFINITY);
    // The event log (JSON) holds null for them; WatchJob sends NaN.
    let payload: serde_json::Value = sqlx::query_scalar(
        "SELECT payload FROM job_events WHERE job_id = $1::uuid AND kind = 'eval'",
    )
    .bind(&job.id)
    .fetch_one(env.store.pool())
    .await
    .expect("eval event");
    assert_eq!(payload["miou"], serde_json::Value::Null, "{payload}");
    assert_eq!(payload["loss"], serde_json::Value::Null, "{payload}");
    assert_eq!(payload["class_iou"], serde_json::json!([0.25, null]));
    let metrics_payload: serde_json::Value = sqlx::query_scalar(
        "SELECT payload FROM job_events WHERE job_id = $1::uuid AND kind = 'metrics'",
    )
    .bind(&job.id)
    .fetch_one(env.store.pool())
    .await
    .expect("metrics event");
    // Each point is stored once: the metrics event names its iteration, and WatchJob reads the
    // values back from the points, without the evaluation's points of the same iteration.
    assert_eq!(
        metrics_payload,
        serde_json::json!({"kind": "metrics", "iteration": 10})
    );
    let mut watch = env.coord.watch(&job.id).await;
    let delivered = loop {
        let ev = tokio::time::timeout(Duration::from_secs(10), watch.message())
            .await
            .expect("the metrics event within 10 s")
            .expect("watch")
            .expect("an open watch");
        if let Some(pb::job_event::Payload::Metrics(m)) = ev.payload {
            break m;
        }
    };
    assert_eq!(delivered.iteration, 10);
    assert_eq!(
        delivered.values.keys().collect::<Vec<_>>(),
        ["loss"],
        "{delivered:?}"
    );
    assert!(delivered.values["loss"].is_nan());
}

#[tokio::test]
async fn a_resent_batch_is_stored_once() {
    let env = Env::start().await;
    let mut w = env.worker("solo", 0).await;
    let job = env.submit("resend", 1).await;
    let a = w.start().await;
    let id = Uuid::parse_str(&job.id).unwrap();
    let batch = vec![
        w.event(&job.id, 1, 0, Payload::Started(pb::RankStarted {})),
        w.event(&job.id, 1, 0, metrics(50, 2.0)),
        w.event(&job.id, 1, 0, metrics(100, 1.0)),
    ];
    assert_eq!(w.report(batch.clone()).await.expect("first").acked_seq, 3);
    assert_eq!(env.job(&job.id).await.state(), pb::JobState::Running);
    let metric_rows = format!("SELECT count(*) FROM metrics WHERE job_id = '{id}'");
    let metric_events =
        format!("SELECT count(*) FROM job_events WHERE job_id = '{id}' AND kind = 'metrics'");
    let all_events = format!("SELECT count(*) FROM job_events WHERE job_id = '{id}'");
    assert_eq!(env.count(&metric_rows).await, 4);
    assert_eq!(env.count(&metric_events).await, 2);
    let events = env.count(&all_events).await;

    // The acknowledgement was lost: the daemon resends the same batch.
    assert_eq!(w.report(batch.clone()).await.expect("resend").acked_seq, 3);
    assert_eq!(env.count(&metric_rows).await, 4);
    assert_eq!(env.count(&all_events).await, events);
    assert_eq!(env.job(&job.id).await.state(), pb::JobState::Running);

    // A batch overlapping the acknowledged part stores only the new events.
    let mut overlap = vec![batch[2].clone()];
    overlap.push(w.event(&job.id, 1, 0, metrics(150, 0.5)));
    assert_eq!(w.report(overlap).await.expect("overlap").acked_seq, 4);
    assert_eq!(env.count(&metric_rows).await, 6);
    assert_eq!(env.count(&metric_events).await, 3);

    // The same points under a new number (a daemon that lost its outbox state) stay single.
    let dup = w.event(&job.id, 1, 0, metrics(150, 0.5));
    assert_eq!(w.report(vec![dup]).await.expect("dup").acked_seq, 5);
    assert_eq!(env.count(&metric_rows).await, 6);
    assert_eq!(env.count(&metric_events).await, 3);

    // The acknowledged sequence survives a re-registration (and a coordinator restart).
    let again = env
        .workers()
        .await
        .register(pb::RegisterRequest {
            host: "solo".into(),
            gpu_index: 0,
            running: vec![pb::AttemptRank {
                job_id: a.job_id.clone(),
                attempt: 1,
                rank: 0,
            }],
            instance_id: w.instance.clone(),
            instance_secret: w.secret.clone(),
            ..Default::default()
        })
        .await
        .expect("re-register")
        .into_inner();
    assert_eq!(again.acked_seq, 5);
    assert_eq!(again.worker_id, w.id);
    assert_eq!(
        env.list_workers().await[&w.id].state(),
        pb::WorkerState::Busy
    );
}

#[tokio::test]
async fn a_restarted_daemon_gets_unstarted_work_again_and_fails_lost_trainers() {
    let env = Env::start().await;
    let mut w0 = env.worker("host-a", 0).await;
    let mut w1 = env.worker("host-a", 1).await;
    let job = env.submit("restarts", 2).await;
    let (a0, a1) = (w0.start().await, w1.start().await);

    // A reconnect re-sends the start of a rank not yet started.
    w0.open_stream().await;
    let again = w0.start().await;
    assert_eq!(
        (again.job_id.as_str(), again.rank),
        (a0.job_id.as_str(), a0.rank)
    );
    // A daemon restart (register without that trainer) keeps an unstarted rank, too.
    let mut w0b = w0.restarted(&env.coord).await;
    assert_eq!(w0b.id, w0.id);
    assert_eq!(w0b.start().await.rank, a0.rank);
    assert_eq!(
        env.list_workers().await[&w0.id].state(),
        pb::WorkerState::Busy
    );

    // A started rank whose trainer vanished with its daemon fails the attempt (an
    // infrastructure failure: the job restarts).
    w1.started(&a1).await;
    let _w1b = w1.restarted(&env.coord).await;
    let failed = env.job(&job.id).await;
    assert_eq!(failed.state(), pb::JobState::Restarting);
    assert_eq!(failed.restarts, 1);
    assert!(failed.reason.contains("re-registered"), "{}", failed.reason);
    assert_eq!(
        env.list_workers().await[&w1.id].state(),
        pb::WorkerState::Idle
    );
    // Rank 0 is told to stop.
    let stop = w0b.stop().await;
    assert_eq!(stop.rank, a0.rank);
}

#[tokio::test]
async fn invalid_fields_are_rejected_naming_the_field() {
    let env = Env::start().await;
    // Served on the same port, and reported SERVING.
    let health = HealthClient::new(env.coord.channel().await)
        .check(HealthCheckRequest {
            service: "segtrain.v1.WorkerService".into(),
        })
        .await
        .expect("health check")
        .into_inner();
    assert_eq!(health.status, ServingStatus::Serving as i32);
    let mut c = env.workers().await;
    let inst = segtrain_tests::coordinator::new_instance();
    let reg = |host: &str, gpu: i32| pb::RegisterRequest {
        host: host.into(),
        gpu_index: gpu,
        gpu_name: "H100".into(),
        gpu_memory_bytes: 80 << 30,
        running: vec![],
        instance_id: inst.clone(),
        ..Default::default()
    };
    let long = "h".repeat(256);
    let cases: Vec<(pb::RegisterRequest, &str)> = vec![
        (reg("", 0), "host"),
        (reg(&long, 0), "host"),
        (reg("two words", 0), "host"),
        (reg("h\n", 0), "host"),
        (reg("h", -2), "gpu_index"),
        (reg("h", 1024), "gpu_index"),
        (
            pb::RegisterRequest {
                gpu_name: "g".repeat(256),
                ..reg("h", 0)
            },
            "gpu_name",
        ),
        (
            pb::RegisterRequest {
                gpu_memory_bytes: u64::MAX,
                ..reg("h", 0)
            },
            "gpu_memory_bytes",
        ),
        (
            pb::RegisterRequest {
                running: vec![pb::AttemptRank {
                    job_id: "nope".into(),
                    attempt: 1,
                    rank: 0,
                }],
                ..reg("h", 0)
            },
            "running[0].job_id",
        ),
        (
            pb::RegisterRequest {
                running: vec![pb::AttemptRank {
                    job_id: Uuid::now_v7().to_string(),
                    attempt: 0,
                    rank: 0,
                }],
                ..reg("h", 0)
            },
            "running[0].attempt",
        ),
    ];
    for (req, field) in cases {
        let e = c.register(req.clone()).await.expect_err("invalid register");
        assert_eq!(e.code(), Code::InvalidArgument, "{req:?}: {}", e.message());
        assert!(e.message().starts_with(field), "{field}: {}", e.message());
    }
    assert_eq!(env.count("SELECT count(*) FROM workers").await, 0);
    // The edges of the ranges are fine.
    c.register(reg(&"h".repeat(255), -1))
        .await
        .expect("255 chars, CPU");
    let w = c
        .register(reg("h", 1023))
        .await
        .expect("gpu 1023")
        .into_inner();
    assert_eq!(w.lease_seconds, 300);

    // Heartbeat and AwaitAssignment: malformed and unknown ids.
    assert_code(
        c.heartbeat(pb::HeartbeatRequest {
            worker_id: "x".into(),
            running: vec![],
            instance_id: inst.clone(),
            leaving: false,
            instance_secret: w.instance_secret.clone(),
        })
        .await,
        Code::InvalidArgument,
        "worker_id",
    );
    assert_code(
        c.heartbeat(pb::HeartbeatRequest {
            worker_id: Uuid::now_v7().to_string(),
            running: vec![],
            instance_id: inst.clone(),
            leaving: false,
            instance_secret: w.instance_secret.clone(),
        })
        .await,
        Code::NotFound,
        "register again",
    );
    let hb = c
        .heartbeat(pb::HeartbeatRequest {
            worker_id: w.worker_id.clone(),
            running: vec![],
            instance_id: inst.clone(),
            leaving: false,
            instance_secret: w.instance_secret.clone(),
        })
        .await
        .expect("heartbeat")
        .into_inner();
    assert!(hb.lease_until.expect("lease").seconds > 0);
    assert_code(
        c.await_assignment(pb::AwaitAssignmentRequest {
            worker_id: Uuid::now_v7().to_string(),
            instance_id: inst.clone(),
            instance_secret: w.instance_secret.clone(),
        })
        .await,
        Code::NotFound,
        "not found",
    );

    // ReportEvents: every event field.
    let job = env.submit("validation", 1).await;
    let ev = |seq: u64, payload: Option<Payload>| pb::WorkerEvent {
        seq,
        job_id: job.id.clone(),
        attempt: 1,
        rank: 0,
        time: None,
        payload,
    };
    let started = Some(Payload::Started(pb::RankStarted {}));
    let bad_events: Vec<(pb::WorkerEvent, &str)> = vec![
        (ev(0, started.clone()), "events[0].seq"),
        (
            pb::WorkerEvent {
                job_id: "nope".into(),
                ..ev(1, started.clone())
            },
            "events[0].job_id",
        ),
        (
            pb::WorkerEvent {
                rank: 5000,
                ..ev(1, started.clone())
            },
            "events[0].rank",
        ),
        (ev(1, None), "events[0].payload"),
        (
            ev(
                1,
                Some(Payload::Metrics(pb::MetricsReport {
                    iteration: 1,
                    values: HashMap::from([(String::new(), 1.0)]),
                })),
            ),
            "events[0].metrics.values",
        ),
        (
            ev(
                1,
                Some(Payload::Metrics(pb::MetricsReport {
                    iteration: 1,
                    values: HashMap::from([("miou".to_string(), 0.5)]),
                })),
            ),
            "events[0].metrics.values: \"miou\" is an evaluation score",
        ),
        (
            ev(
                1,
                Some(Payload::Metrics(pb::MetricsReport {
                    iteration: u64::MAX,
                    values: HashMap::new(),
                })),
            ),
            "events[0].metrics.iteration",
        ),
        (
            ev(
                1,
                Some(Payload::Checkpoint(pb::CheckpointReport {
                    checkpoint: None,
                })),
            ),
            "events[0].checkpoint",
        ),
        (
            ev(
                1,
                Some(Payload::Checkpoint(pb::CheckpointReport {
                    checkpoint: Some(pb::Checkpoint {
                        iteration: 1,
                        uri: "file:///c".into(),
                        sha256: "xyz".into(),
                        ..Default::default()
                    }),
                })),
            ),
            "events[0].checkpoint.sha256",
        ),
        (
            ev(
                1,
                Some(Payload::Checkpoint(pb::CheckpointReport {
                    checkpoint: Some(pb::Checkpoint {
                        iteration: 1,
                        ..Default::default()
                    }),
                })),
            ),
            "events[0].checkpoint.uri",
        ),
        (
            ev(
                1,
                Some(Payload::Finished(pb::RankFinished {
                    outcome: 0,
                    reason: String::new(),
                })),
            ),
            "events[0].finished.outcome",
        ),
        (
            ev(
                1,
                Some(Payload::Finished(pb::RankFinished {
                    outcome: 99,
                    reason: String::new(),
                })),
            ),
            "events[0].finished.outcome",
        ),
        (
            // LOST is decided by the coordinator, never reported.
            ev(
                1,
                Some(Payload::Finished(pb::RankFinished {
                    outcome: pb::RankOutcome::Lost as i32,
                    reason: String::new(),
                })),
            ),
            "events[0].finished.outcome: LOST is the coordinator's to decide",
        ),
        (
            ev(
                1,
                Some(Payload::Note(pb::Note {
                    text: String::new(),
                })),
            ),
            "events[0].note.text",
        ),
        (
            ev(
                1,
                Some(Payload::Note(pb::Note {
                    text: "a\0b".into(),
                })),
            ),
            "events[0].note.text",
        ),
    ];
    for (e, field) in bad_events {
        let r = c
            .report_events(pb::ReportEventsRequest {
                worker_id: w.worker_id.clone(),
                events: vec![e.clone()],
                instance_id: inst.clone(),
                instance_secret: w.instance_secret.clone(),
            })
            .await;
        let err = r.expect_err("invalid event");
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "{e:?}: {}",
            err.message()
        );
        assert!(
            err.message().starts_with(field),
            "{field}: {}",
            err.message()
        );
    }
    // The second event is the bad one: its index is named.
    let err = c
        .report_events(pb::ReportEventsRequest {
            worker_id: w.worker_id.clone(),
            events: vec![ev(1, started.clone()), ev(2, None)],
            instance_id: inst.clone(),
            instance_secret: w.instance_secret.clone(),
        })
        .await
        .expect_err("second event invalid");
    assert!(
        err.message().starts_with("events[1].payload"),
        "{}",
        err.message()
    );
    assert_code(
        c.report_events(pb::ReportEventsRequest {
            worker_id: "x".into(),
            events: vec![],
            instance_id: inst.clone(),
            instance_secret: w.instance_secret.clone(),
        })
        .await,
        Code::InvalidArgument,
        "worker_id",
    );
    assert_code(
        c.report_events(pb::ReportEventsRequest {
            worker_id: Uuid::now_v7().to_string(),
            events: vec![ev(1, started.clone())],
            instance_id: inst.clone(),
            instance_secret: w.instance_secret.clone(),
        })
        .await,
        Code::NotFound,
        "worker",
    );

    // Rendezvous fields.
    let publish = |endpoint| pb::PublishRendezvousRequest {
        worker_id: w.worker_id.clone(),
        job_id: job.id.clone(),
        attempt: 1,
        endpoint,
        instance_id: inst.clone(),
        instance_secret: w.instance_secret.clone(),
    };
    use pb::publish_rendezvous_request::Endpoint;
    for (req, field) in [
        (publish(None), "endpoint"),
        (
            publish(Some(Endpoint::NcclUniqueId(vec![1; 5]))),
            "nccl_unique_id",
        ),
        (
            publish(Some(Endpoint::TcpAddress("nope".into()))),
            "tcp_address",
        ),
        (
            publish(Some(Endpoint::TcpAddress("h:0".into()))),
            "tcp_address",
        ),
        (
            publish(Some(Endpoint::TcpAddress("h:99999".into()))),
            "tcp_address",
        ),
        (
            pb::PublishRendezvousRequest {
                job_id: "nope".into(),
                ..publish(Some(Endpoint::TcpAddress("h:1".into())))
            },
            "job_id",
        ),
        (
            pb::PublishRendezvousRequest {
                worker_id: "nope".into(),
                ..publish(Some(Endpoint::TcpAddress("h:1".into())))
            },
            "worker_id",
        ),
    ] {
        let e = c
            .publish_rendezvous(req)
            .await
            .expect_err("invalid publish");
        assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
        assert!(e.message().starts_with(field), "{field}: {}", e.message());
    }
    for t in [0, 601] {
        assert_code(
            c.await_rendezvous(pb::AwaitRendezvousRequest {
                worker_id: w.worker_id.clone(),
                job_id: job.id.clone(),
                attempt: 1,
                timeout_seconds: t,
                instance_id: inst.clone(),
                instance_secret: w.instance_secret.clone(),
            })
            .await,
            Code::InvalidArgument,
            "timeout_seconds",
        );
    }
    assert_eq!(
        env.count("SELECT count(*) FROM job_events WHERE kind <> 'state_change'")
            .await,
        0
    );
    assert_eq!(env.count("SELECT max(acked_seq) FROM workers").await, 0);
}

#[tokio::test]
async fn await_rendezvous_times_out_with_deadline_exceeded() {
    let env = Env::start().await;
    let mut w0 = env.worker("host-a", 0).await;
    let mut w1 = env.worker("host-a", 1).await;
    let job = env.submit("slow-rank0", 2).await;
    let (a0, a1) = (w0.start().await, w1.start().await);
    let waiter = if a0.rank == 1 { &w0 } else { &w1 };
    let _ = a1;
    let t = std::time::Instant::now();
    assert_code(
        env.workers()
            .await
            .await_rendezvous(pb::AwaitRendezvousRequest {
                worker_id: waiter.id.clone(),
                job_id: job.id.clone(),
                attempt: 1,
                timeout_seconds: 1,
                instance_id: waiter.instance.clone(),
                instance_secret: waiter.secret.clone(),
            })
            .await,
        Code::DeadlineExceeded,
        "did not publish",
    );
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
}

#[tokio::test]
async fn cancel_before_any_rank_started_ends_once_the_daemons_drop_it() {
    let env = Env::start().await;
    let mut w0 = env.worker("host-a", 0).await;
    let mut w1 = env.worker("host-a", 1).await;
    let job = env.submit("never-started", 2).await;
    let (a0, a1) = (w0.start().await, w1.start().await);
    assert_eq!(env.job(&job.id).await.state(), pb::JobState::Scheduled);
    env.jobs()
        .await
        .cancel_job(pb::CancelJobRequest {
            job_id: job.id.clone(),
            reason: String::new(),
        })
        .await
        .expect("cancel");
    assert_eq!(env.job(&job.id).await.state(), pb::JobState::Canceling);
    // The stop names the rank, so a daemon that never started the trainer can answer it.
    let (s0, s1) = (w0.stop().await, w1.stop().await);
    assert_eq!((s0.rank, s1.rank), (a0.rank, a1.rank));
    assert_eq!(s0.reason, "canceled by user");
    // One daemon reports the rank finished, the other simply no longer lists it.
    w0.finished(&job.id, 1, a0.rank, pb::RankOutcome::Canceled)
        .await;
    assert_eq!(env.job(&job.id).await.state(), pb::JobState::Canceling);
    assert!(w1.heartbeat(vec![]).await.stop.is_empty());
    assert_eq!(env.job(&job.id).await.state(), pb::JobState::Canceled);
    let ws = env.list_workers().await;
    assert!(ws.values().all(|w| w.state() == pb::WorkerState::Idle));
}
