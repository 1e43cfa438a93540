//! Draining a worker through the real coordinator, a real PostgreSQL, fake daemons and the
//! `segtrain` CLI: a drained worker keeps the rank it runs, is given no new one (not even after
//! that rank ends, nor after its daemon re-registers), and takes work again once undrained; bad
//! requests name the field and change nothing.

use segtrain_proto::v1 as pb;
use segtrain_proto::v1::cluster_service_client::ClusterServiceClient;
use segtrain_tests::binaries;
use segtrain_tests::coordinator::{queued_spec, CoordinatorProcess, FakeWorker};
use segtrain_tests::pg::TempPostgres;
use std::process::{Command, Stdio};
use std::time::Duration;
use tonic::Code;

/// Longer than a few scheduler passes (`--scheduler-interval-ms 100`): a job that could be
/// placed has been placed by then.
const SETTLE: Duration = Duration::from_millis(1200);

/// DrainWorker (`drain`) or UndrainWorker for `worker_id`: the worker's state after the call.
/// One helper for the two calls, which take and answer the same fields.
async fn set_draining(
    coord: &CoordinatorProcess,
    worker_id: &str,
    drain: bool,
) -> Result<pb::WorkerState, tonic::Status> {
    let mut cluster = ClusterServiceClient::new(coord.channel().await);
    let worker_id = worker_id.to_string();
    let state = if drain {
        let req = pb::DrainWorkerRequest { worker_id };
        cluster.drain_worker(req).await?.into_inner().state()
    } else {
        let req = pb::UndrainWorkerRequest { worker_id };
        cluster.undrain_worker(req).await?.into_inner().state()
    };
    Ok(state)
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
    let first = coord.submit(queued_spec("first", 1)).await;
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
    let again = set_draining(&coord, &w.id, true).await;
    assert_eq!(again.expect("drain twice"), pb::WorkerState::Draining);

    // The rank ends; the worker stays DRAINING and the next job waits, even when the daemon
    // registers again.
    w.finished(&a.job_id, a.attempt, a.rank, pb::RankOutcome::Succeeded)
        .await;
    assert_eq!(
        coord.get_job(&first.id).await.state(),
        pb::JobState::Succeeded
    );
    assert_eq!(state_of(&coord, &w).await, pb::WorkerState::Draining);
    let second = coord.submit(queued_spec("second", 1)).await;
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
    let same = set_draining(&coord, &w.id, false).await;
    assert_eq!(same.expect("undrain a busy worker"), pb::WorkerState::Busy);
}

#[tokio::test]
async fn bad_drain_requests_name_what_is_wrong_and_change_nothing() {
    let pg = TempPostgres::start().expect("throwaway PostgreSQL");
    let coord = CoordinatorProcess::start(&pg.url()).await;
    let w = FakeWorker::register(&coord, "host-a", 0).await;

    let err = set_draining(&coord, "not-a-uuid", true).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().starts_with("worker_id: not a worker id"),
        "{}",
        err.message()
    );

    let unknown = "0196aaaa-0000-7000-8000-00000000ffff";
    let err = set_draining(&coord, unknown, false).await.unwrap_err();
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
