//! Draining a worker through the real coordinator, a real PostgreSQL, fake daemons and the
//! `segtrain` CLI: a drained worker keeps the rank it runs, is given no new one (not even after
//! that rank ends, nor after its daemon re-registers), and takes work again once undrained; bad
//! requests name the field and change nothing.

use segtrain_proto::v1 as pb;
use segtrain_proto::v1::cluster_service_client::ClusterServiceClient;
use segtrain_tests::binaries;
use segtrain_tests::coordinator::{CoordinatorProcess, FakeWorker};
use segtrain_tests::pg::TempPostgres;
use std::process::{Command, Stdio};
use std::time::Duration;
use tonic::transport::Channel;
use tonic::Code;

/// Longer than a few scheduler passes (`--scheduler-interval-ms 100`): a job that could be
/// placed has been placed by then.
const SETTLE: Duration = Duration::from_millis(1200);

fn spec(name: &str) -> pb::JobSpec {
    pb::JobSpec {
        name: Some(name.into()),
        dataset_root: Some("/data/cityscapes".into()),
        world_size: Some(1),
        max_iters: Some(1000),
        warmup_iters: Some(10),
        ..Default::default()
    }
}

async fn cluster(coord: &CoordinatorProcess) -> ClusterServiceClient<Channel> {
    ClusterServiceClient::new(coord.channel().await)
}

async fn state_of(coord: &CoordinatorProcess, w: &FakeWorker) -> pb::WorkerState {
    coord.list_workers().await[&w.id].state()
}

/// `segtrain ARGS` against `coord`: (exit success, stdout, stderr).
fn segtrain(coord: &CoordinatorProcess, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(binaries::path("segtrain"))
        .args(args)
        .env("SEGTRAIN_COORDINATOR", coord.url())
        .stdin(Stdio::null())
        .output()
        .expect("run segtrain");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn a_drained_worker_finishes_its_rank_and_takes_no_new_one_until_undrained() {
    let pg = TempPostgres::start().expect("throwaway PostgreSQL");
    let coord = CoordinatorProcess::start_with_args(
        &pg.url(),
        &["--lease-seconds", "300", "--scheduler-interval-ms", "100"],
    )
    .await;
    let mut w = FakeWorker::register(&coord, "cpu-a", -1).await;

    // A running rank is not disturbed by the drain.
    let first = coord.submit(spec("first")).await;
    let a = w.start().await;
    w.started(&a).await;
    let (ok, stdout, stderr) = segtrain(&coord, &["drain", "cpu-a:cpu"]);
    assert!(ok, "segtrain drain: {stderr}");
    assert!(
        stdout.starts_with("worker cpu-a:cpu is DRAINING: it is given no new rank"),
        "{stdout}"
    );
    assert_eq!(state_of(&coord, &w).await, pb::WorkerState::Draining);
    let running = vec![pb::AttemptRank {
        job_id: a.job_id.clone(),
        attempt: a.attempt,
        rank: a.rank,
    }];
    assert!(w.heartbeat(running.clone()).await.stop.is_empty());
    assert!(
        w.try_message(SETTLE).await.is_none(),
        "no stop for a drained worker's rank"
    );
    // Draining again changes nothing.
    let again = cluster(&coord)
        .await
        .drain_worker(pb::DrainWorkerRequest {
            worker_id: w.id.clone(),
        })
        .await
        .expect("drain twice")
        .into_inner();
    assert_eq!(again.state(), pb::WorkerState::Draining);

    // The rank ends; the worker stays DRAINING and the next job waits, even when the daemon
    // registers again.
    w.finished(&a.job_id, a.attempt, a.rank, pb::RankOutcome::Succeeded)
        .await;
    assert_eq!(
        coord.get_job(&first.id).await.state(),
        pb::JobState::Succeeded
    );
    assert_eq!(state_of(&coord, &w).await, pb::WorkerState::Draining);
    let second = coord.submit(spec("second")).await;
    let mut w = w.restarted(&coord).await;
    assert!(
        w.try_message(SETTLE).await.is_none(),
        "a drained worker is given nothing"
    );
    assert_eq!(state_of(&coord, &w).await, pb::WorkerState::Draining);
    assert_eq!(
        coord.get_job(&second.id).await.state(),
        pb::JobState::Queued
    );

    // Undrained, it takes the queued job.
    let (ok, stdout, stderr) = segtrain(&coord, &["undrain", &w.id]);
    assert!(ok, "segtrain undrain: {stderr}");
    assert!(stdout.starts_with("worker cpu-a:cpu is IDLE"), "{stdout}");
    let b = w.start().await;
    assert_eq!(b.job_id, second.id);
    assert_eq!(state_of(&coord, &w).await, pb::WorkerState::Busy);

    // Undraining a busy worker that is not draining changes nothing.
    let same = cluster(&coord)
        .await
        .undrain_worker(pb::UndrainWorkerRequest {
            worker_id: w.id.clone(),
        })
        .await
        .expect("undrain a busy worker")
        .into_inner();
    assert_eq!(same.state(), pb::WorkerState::Busy);
}

#[tokio::test]
async fn bad_drain_requests_name_what_is_wrong_and_change_nothing() {
    let pg = TempPostgres::start().expect("throwaway PostgreSQL");
    let coord = CoordinatorProcess::start(&pg.url()).await;
    let w = FakeWorker::register(&coord, "host-a", 0).await;

    let err = cluster(&coord)
        .await
        .drain_worker(pb::DrainWorkerRequest {
            worker_id: "not-a-uuid".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().starts_with("worker_id: not a worker id"),
        "{}",
        err.message()
    );

    let unknown = "0196aaaa-0000-7000-8000-00000000ffff";
    let err = cluster(&coord)
        .await
        .undrain_worker(pb::UndrainWorkerRequest {
            worker_id: unknown.into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains(unknown), "{}", err.message());

    let (ok, _, stderr) = segtrain(&coord, &["drain", "host-b:7"]);
    assert!(!ok);
    assert!(
        stderr.contains("worker: no worker \"host-b:7\" is registered")
            && stderr.contains("one of: host-a:0"),
        "{stderr}"
    );
    assert_eq!(state_of(&coord, &w).await, pb::WorkerState::Idle);
}
