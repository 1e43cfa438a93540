//! Fault tolerance, end to end (issue 6): real PostgreSQL, the real coordinator, real CPU worker
//! daemons with their child trainers, and faults injected from outside — kill -9 of a daemon,
//! of a trainer and of the coordinator, PostgreSQL stopped mid-run, a frozen (partitioned)
//! host, a corrupted checkpoint, cancels at every stage, a deterministic failure.
//!
//! Every test checks that the job ends as it must, and that nothing was lost or duplicated:
//! one loss per logged iteration through GetMetrics and in the event log.
//!
//! The tests run one at a time (they share two cores and time leases).

use segtrain_proto::v1 as pb;
use segtrain_tests::cluster::{kill9, state_changes, Cluster, DaemonOpts, DEFAULT_DAEMON, LEASE_S};
use segtrain_tests::coordinator::notes;
use segtrain_tests::daemon::{alive, DaemonProcess};
use segtrain_tests::sql::{attempt_reason, job_value, job_values, rank_outcomes};
use segtrain_tests::wait::poll_until;
use std::path::Path;
use std::time::{Duration, Instant};
use tonic::transport::Channel;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The restart scenario shared by the kill tests: a world-2 job, `fault` injected once the
/// checkpoint of iteration 10 is complete; the job must succeed after exactly one restart that
/// resumed from the newest complete checkpoint.
async fn one_restart_after(fault: impl FnOnce(&mut Cluster, usize)) {
    let _serial = SERIAL.lock().await;
    let mut c = Cluster::start(2, 300, DEFAULT_DAEMON).await;
    let max = 30;
    let id = c.coord.submit_spec(c.spec(2, max, 10)).await;
    c.wait_checkpoint(&id, 10, "COMPLETE", 180).await;
    let rank1 = c.daemon_of(&id, 1).await;
    fault(&mut c, rank1);
    // Where the failed attempt stood: the restart must resume from its newest checkpoint.
    let restarted = "restarts = 1 AND state IN ('RESTARTING','QUEUED','SCHEDULED','RUNNING')";
    c.wait_job(&id, restarted, 60).await;
    let (ckpt_iter, _) = c.latest_checkpoint(&id).await.expect("a checkpoint");
    if c.daemons[rank1].pid().is_none() {
        // The killed daemon comes back, as systemd's Restart=always would bring it.
        let host = "cpu-".to_string() + &((b'a' + rank1 as u8) as char).to_string();
        c.daemons[rank1] = DaemonProcess::start_with(
            &c.coord.url(),
            &host,
            &c.tmp.path().join(format!("work-{host}")),
            10,
            &[],
        );
    }
    let job = c.wait_terminal(&id, Duration::from_secs(300)).await;
    assert_eq!(job.state(), pb::JobState::Succeeded, "{}", c.logs());
    assert_eq!(job.restarts, 1);
    assert_eq!(job.attempt, 2);
    assert_eq!(job.resumed_from_iteration, Some(ckpt_iter as u64));
    let events = c.coord.job_events(&id).await;
    let changes = state_changes(&events);
    assert!(
        changes
            .iter()
            .any(|(s, r)| *s == pb::JobState::Restarting && r.contains("restart 1 of 3")),
        "{changes:#?}"
    );
    assert!(
        notes(&events)
            .iter()
            .any(|n| n.contains(&format!("resumed from iteration {ckpt_iter}"))),
        "{:#?}",
        notes(&events)
    );
    c.assert_every_metric_once(&id, max, &events).await;
    c.no_trainer_left();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_worker_daemon_restarts_the_job_from_its_last_checkpoint() {
    one_restart_after(|c, rank1| {
        let trainers = c.daemons[rank1].trainer_pids();
        assert_eq!(trainers.len(), 1, "one trainer under the daemon");
        c.daemons[rank1].kill();
        // The orphaned trainer dies with its daemon (PR_SET_PDEATHSIG).
        let deadline = Instant::now() + Duration::from_secs(10);
        while trainers.iter().any(|p| alive(*p)) {
            assert!(Instant::now() < deadline, "trainer outlived its daemon");
            std::thread::sleep(Duration::from_millis(50));
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_trainer_restarts_the_job_from_its_last_checkpoint() {
    one_restart_after(|c, rank1| {
        let trainers = c.daemons[rank1].trainer_pids();
        assert_eq!(trainers.len(), 1, "one trainer under the daemon");
        kill9(trainers[0]);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_worker_is_failed_within_its_lease_and_the_job_restarts_without_it() {
    let _serial = SERIAL.lock().await;
    let c = Cluster::start(
        3,
        300,
        DaemonOpts {
            grace_s: 3,
            env: &[],
        },
    )
    .await;
    let max = 30;
    let id = c.coord.submit_spec(c.spec(2, max, 10)).await;
    c.wait_checkpoint(&id, 10, "COMPLETE", 180).await;
    let cut = c.daemon_of(&id, 1).await;
    let peer = c.daemon_of(&id, 0).await;
    let peer_trainers = c.daemons[peer].trainer_pids();
    c.daemons[cut].freeze();
    let frozen_at = Instant::now();
    c.wait_first_attempt(&id, "state IN ('LOST','FAILED')", 3 * LEASE_S)
        .await;
    let detected = frozen_at.elapsed();
    // The other rank does not hang on its silent peer: its trainer is stopped (killed after
    // the grace period) well before any collective timeout.
    let deadline = Instant::now() + Duration::from_secs(30);
    while peer_trainers.iter().any(|p| alive(*p)) {
        assert!(
            Instant::now() < deadline,
            "the surviving rank's trainer still runs\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let job = c.wait_terminal(&id, Duration::from_secs(300)).await;
    assert_eq!(job.state(), pb::JobState::Succeeded, "{}", c.logs());
    assert_eq!(job.restarts, 1);
    assert!(
        detected <= Duration::from_secs(LEASE_S + 3),
        "lost after {detected:?}, lease {LEASE_S} s"
    );
    let lost_reason = attempt_reason(&c.pool, &id, 1).await;
    assert!(lost_reason.contains("LOST"), "{lost_reason}");
    // The second attempt ran on the two others.
    let hosts: Vec<String> = job_values(
        &c.pool,
        "SELECT w.host FROM attempt_ranks ar JOIN workers w ON w.id = ar.worker_id
         WHERE ar.job_id = $1::uuid AND ar.attempt = 2 ORDER BY ar.rank",
        &id,
    )
    .await;
    let cut_host = format!("cpu-{}", (b'a' + cut as u8) as char);
    assert!(!hosts.contains(&cut_host), "{hosts:?}");
    // The host comes back: its stale trainer is told to stop, and its late reports are refused.
    let stale = c.daemons[cut].trainer_pids();
    c.daemons[cut].thaw();
    let deadline = Instant::now() + Duration::from_secs(30);
    while stale.iter().any(|p| alive(*p)) {
        assert!(
            Instant::now() < deadline,
            "the stale trainer still runs\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let events = c.coord.job_events(&id).await;
    c.assert_every_metric_once(&id, max, &events).await;
    c.no_trainer_left();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_coordinator_mid_run_loses_and_duplicates_nothing() {
    let _serial = SERIAL.lock().await;
    let mut c = Cluster::start(2, 300, DEFAULT_DAEMON).await;
    let max = 30;
    let id = c.coord.submit_spec(c.spec(2, max, 10)).await;
    c.wait_iteration(&id, 5).await;
    let trainers: Vec<u32> = c.daemons.iter().flat_map(|d| d.trainer_pids()).collect();
    c.coord.kill();
    // Down for a while: the trainers keep training, the daemons keep their events.
    tokio::time::sleep(Duration::from_secs(3)).await;
    c.coord.restart().await;
    let job = c.wait_terminal(&id, Duration::from_secs(300)).await;
    assert_eq!(job.state(), pb::JobState::Succeeded, "{}", c.logs());
    assert_eq!(job.restarts, 0, "the trainers survived the coordinator");
    assert_eq!(job.attempt, 1);
    assert!(trainers.iter().all(|p| !alive(*p)));
    // Exactly one row per logged iteration (one attempt), and every metrics event once.
    let rows: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT iteration, count(*) FROM metrics WHERE job_id = $1::uuid AND name = 'loss'
         GROUP BY iteration ORDER BY iteration",
    )
    .bind(&id)
    .fetch_all(&c.pool)
    .await
    .expect("rows");
    assert_eq!(rows, (1..=max as i64).map(|i| (i, 1)).collect::<Vec<_>>());
    let events = c.coord.job_events(&id).await;
    c.assert_every_metric_once(&id, max, &events).await;
    c.no_trainer_left();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stopped_mid_run_loses_no_event_and_health_says_so() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let _serial = SERIAL.lock().await;
    let mut c = Cluster::start(2, 300, DEFAULT_DAEMON).await;
    let max = 30;
    let id = c.coord.submit_spec(c.spec(2, max, 10)).await;
    c.wait_iteration(&id, 5).await;
    let mut health = HealthClient::new(c.coord.channel().await);
    let status = |h: &mut HealthClient<Channel>| {
        let mut h = h.clone();
        async move {
            h.check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .map(|r| r.into_inner().status())
            .ok()
        }
    };
    assert_eq!(status(&mut health).await, Some(ServingStatus::Serving));
    c.pg.stop().expect("stop PostgreSQL");
    let stopped_at = Instant::now();
    let mut saw_not_serving = false;
    while stopped_at.elapsed() < Duration::from_secs(6) {
        if status(&mut health).await == Some(ServingStatus::NotServing) {
            saw_not_serving = true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    c.pg.start_again().expect("start PostgreSQL");
    assert!(
        saw_not_serving,
        "health never said NOT_SERVING\n{}",
        c.logs()
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while status(&mut health).await != Some(ServingStatus::Serving) {
        assert!(Instant::now() < deadline, "health never recovered");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let job = c.wait_terminal(&id, Duration::from_secs(300)).await;
    assert_eq!(job.state(), pb::JobState::Succeeded, "{}", c.logs());
    assert_eq!(
        job.restarts, 0,
        "an outage of the database is not a failure of the job"
    );
    let events = c.coord.job_events(&id).await;
    // Every logged iteration has its metrics event, once, and so does every checkpoint.
    let its: Vec<u64> = events
        .iter()
        .filter_map(|e| match &e.payload {
            Some(pb::job_event::Payload::Metrics(m)) => Some(m.iteration),
            _ => None,
        })
        .collect();
    assert_eq!(its, (1..=max).collect::<Vec<_>>());
    let ckpts: Vec<u64> = events
        .iter()
        .filter_map(|e| match &e.payload {
            Some(pb::job_event::Payload::Checkpoint(k)) => {
                k.checkpoint.as_ref().map(|k| k.iteration)
            }
            _ => None,
        })
        .collect();
    assert_eq!(ckpts, vec![10, 20, 30]);
    c.assert_every_metric_once(&id, max, &events).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_latest_checkpoint_is_skipped_and_the_previous_one_resumed() {
    let _serial = SERIAL.lock().await;
    // A long backoff leaves time to corrupt the checkpoint before the restart.
    let c = Cluster::start(1, 3000, DEFAULT_DAEMON).await;
    let max = 40;
    let id = c.coord.submit_spec(c.spec(1, max, 10)).await;
    c.wait_sql(
        &id,
        "SELECT count(*) >= 2 FROM checkpoints WHERE job_id = $1::uuid AND state = 'COMPLETE'",
        Duration::from_secs(180),
    )
    .await;
    let trainer = c.daemons[0].trainer_pids();
    assert_eq!(trainer.len(), 1);
    kill9(trainer[0]);
    c.wait_job(&id, "state = 'RESTARTING'", 30).await;
    let complete: Vec<(i64, String)> = sqlx::query_as(
        "SELECT iteration, uri FROM checkpoints WHERE job_id = $1::uuid AND state = 'COMPLETE'
         ORDER BY iteration DESC",
    )
    .bind(&id)
    .fetch_all(&c.pool)
    .await
    .expect("checkpoints");
    let (bad_iter, bad_uri) = complete[0].clone();
    let (good_iter, _) = complete[1].clone();
    // Flip bytes in the middle of the model file.
    let model = Path::new(&bad_uri).join("model.safetensors");
    let mut bytes = std::fs::read(&model).expect("model file");
    let mid = bytes.len() / 2;
    for b in &mut bytes[mid..mid + 64] {
        *b ^= 0xff;
    }
    std::fs::write(&model, &bytes).expect("corrupt");

    let job = c.wait_terminal(&id, Duration::from_secs(300)).await;
    assert_eq!(job.state(), pb::JobState::Succeeded, "{}", c.logs());
    assert_eq!(job.restarts, 1);
    assert_eq!(job.resumed_from_iteration, Some(good_iter as u64));
    let events = c.coord.job_events(&id).await;
    let notes = notes(&events);
    assert!(
        notes.iter().any(|n| n.contains(&format!(
            "checkpoint of iteration {bad_iter} ({bad_uri}) is unusable and marked CORRUPT"
        )) && n.contains("fell back to the previous complete checkpoint")
            && n.contains(&format!("resumed from iteration {good_iter}"))),
        "{notes:#?}"
    );
    c.assert_every_metric_once(&id, max, &events).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_during_rendezvous_ends_canceled_with_no_trainer_left() {
    let _serial = SERIAL.lock().await;
    // A lease long enough that the frozen daemon is still held when the job is canceled (with
    // the short one it could be declared lost first, and the job restart instead).
    let c = Cluster::start_with_lease(2, 300, DEFAULT_DAEMON, 10).await;
    // Rank 1's host is frozen before the job is placed: rank 0 waits in the rendezvous.
    c.daemons[1].freeze();
    let id = c.coord.submit_spec(c.spec(2, 30, 10)).await;
    c.wait_first_attempt(&id, "state = 'RENDEZVOUS'", 60).await;
    let rank0 = c.daemons[0].trainer_pids();
    assert_eq!(rank0.len(), 1, "rank 0 waits in the rendezvous");
    c.coord.cancel(&id, "test").await;
    // Rank 0 stops at once; the frozen rank's lease runs out, which counts as stopped.
    let job = c.wait_terminal(&id, Duration::from_secs(60)).await;
    assert_eq!(job.state(), pb::JobState::Canceled, "{}", c.logs());
    poll_until(
        Duration::from_secs(15),
        "rank 0's trainer exits",
        || c.logs(),
        || async { rank0.iter().all(|p| !alive(*p)) },
    )
    .await;
    c.daemons[1].thaw();
    tokio::time::sleep(Duration::from_secs(2)).await;
    c.no_trainer_left();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_during_training_checkpoints_gracefully_and_ends_canceled() {
    let _serial = SERIAL.lock().await;
    let c = Cluster::start(2, 300, DEFAULT_DAEMON).await;
    let id = c.coord.submit_spec(c.spec(2, 1000, 500)).await;
    c.wait_iteration(&id, 3).await;
    c.coord.cancel(&id, "test").await;
    let job = c.wait_terminal(&id, Duration::from_secs(60)).await;
    assert_eq!(job.state(), pb::JobState::Canceled, "{}", c.logs());
    c.no_trainer_left();
    // The trainers stopped together after one iteration and rank 0 saved it first.
    let (it, uri) = c
        .latest_checkpoint(&id)
        .await
        .expect("a checkpoint written on the way out");
    assert!((3..1000).contains(&it), "checkpoint at {it}");
    assert!(Path::new(&uri).join("manifest.json").exists());
    assert_eq!(job.attempt, 1);
    let outcomes = rank_outcomes(&c.pool, &id, 1).await;
    assert_eq!(outcomes, ["CANCELED", "CANCELED"]);
}

/// Cancel while rank 0 is writing a checkpoint (the write is slowed down by the fault hook).
/// With enough grace the write completes and the checkpoint is COMPLETE; when the grace runs
/// out first the trainer is killed mid-write and the checkpoint stays PENDING, never resumable.
async fn cancel_during_checkpoint_write(grace_s: u32) -> (Cluster, String) {
    let c = Cluster::start(
        1,
        300,
        DaemonOpts {
            grace_s,
            env: &[("SEGTRAIN_TEST_CHECKPOINT_DELAY_MS", "4000")],
        },
    )
    .await;
    let id = c.coord.submit_spec(c.spec(1, 1000, 5)).await;
    c.wait_checkpoint(&id, 5, "PENDING", 120).await;
    c.coord.cancel(&id, "test").await;
    let job = c.wait_terminal(&id, Duration::from_secs(60)).await;
    assert_eq!(job.state(), pb::JobState::Canceled, "{}", c.logs());
    c.no_trainer_left();
    (c, id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_during_a_checkpoint_write_finishes_the_write_within_the_grace() {
    let _serial = SERIAL.lock().await;
    let (c, id) = cancel_during_checkpoint_write(20).await;
    let state: String = job_value(
        &c.pool,
        "SELECT state FROM checkpoints WHERE job_id = $1::uuid AND iteration = 5",
        &id,
    )
    .await;
    assert_eq!(state, "COMPLETE");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_during_a_checkpoint_write_past_the_grace_leaves_it_pending() {
    let _serial = SERIAL.lock().await;
    let (c, id) = cancel_during_checkpoint_write(1).await;
    let (state, uri): (String, String) = sqlx::query_as(
        "SELECT state, uri FROM checkpoints WHERE job_id = $1::uuid AND iteration = 5",
    )
    .bind(&id)
    .fetch_one(&c.pool)
    .await
    .expect("checkpoint 5");
    assert_eq!(
        state, "PENDING",
        "a half-written checkpoint is never COMPLETE"
    );
    assert!(
        !Path::new(&uri).join("manifest.json").exists(),
        "nothing was renamed into place"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deterministic_failure_fails_the_job_at_once_and_infra_failures_stop_at_max_restarts() {
    let _serial = SERIAL.lock().await;
    let c = Cluster::start(1, 300, DEFAULT_DAEMON).await;
    // The dataset is not there: a restart would fail the same way.
    let mut spec = c.spec(1, 10, 5);
    spec.dataset_root = Some(c.tmp.path().join("no-such-data").display().to_string());
    let id = c.coord.submit_spec(spec).await;
    let job = c.wait_terminal(&id, Duration::from_secs(60)).await;
    assert_eq!(job.state(), pb::JobState::Failed);
    assert_eq!(job.restarts, 0);
    assert!(
        job.reason.contains("FAILED_DETERMINISTIC") && job.reason.contains("not retried"),
        "{}",
        job.reason
    );
    assert!(job.reason.contains("no-such-data"), "{}", job.reason);

    // No restarts allowed: a killed trainer fails the job, saying why.
    let mut spec = c.spec(1, 1000, 500);
    spec.max_restarts = Some(0);
    let id = c.coord.submit_spec(spec).await;
    c.wait_iteration(&id, 2).await;
    let trainer = c.daemons[0].trainer_pids();
    assert_eq!(trainer.len(), 1);
    kill9(trainer[0]);
    let job = c.wait_terminal(&id, Duration::from_secs(60)).await;
    assert_eq!(job.state(), pb::JobState::Failed);
    assert!(
        job.reason.contains("killed by signal 9") && job.reason.contains("no restarts left"),
        "{}",
        job.reason
    );
}
