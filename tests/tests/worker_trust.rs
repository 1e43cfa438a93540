//! Trust between workers (docs/security.md, "Workers"): a worker token cannot take over another
//! daemon's GPU, a token bound to a host acts only for that host, and a checkpoint lies in its
//! own job's directory. Each test plays an attacker with an outside gRPC client against the real
//! coordinator (and, where it matters, a real daemon).

use segtrain_proto::refusal;
use segtrain_proto::v1 as pb;
use segtrain_proto::v1::token_service_client::TokenServiceClient;
use segtrain_proto::v1::worker_service_client::WorkerServiceClient;
use segtrain_tests::coordinator::{
    checkpoint_uri, new_instance, queued_spec, CoordinatorProcess, FakeWorker,
};
use segtrain_tests::daemon::{alive, counting_trainer, DaemonProcess};
use segtrain_tests::pg::TempPostgres;
use segtrain_tests::service::Service;
use segtrain_tests::wait::poll_until;
use std::ffi::OsStr;
use std::time::Duration;
use tonic::Code;

/// The holder's instance id, as the WORKER_HELD refusal names it ("... (instance ID, held ...").
fn holder_named_in(message: &str) -> String {
    let after = message
        .split("(instance ")
        .nth(1)
        .unwrap_or_else(|| panic!("no instance named in {message:?}"));
    after.chars().take(36).collect()
}

fn register(host: &str, instance: &str) -> pb::RegisterRequest {
    pb::RegisterRequest {
        host: host.into(),
        gpu_index: -1,
        gpu_name: "cpu".into(),
        instance_id: instance.into(),
        ..Default::default()
    }
}

/// Refused as it must be: `code`, and the segtrain reason `reason` when given. The message
/// never carries `secret`.
fn refused<T: std::fmt::Debug>(
    r: Result<tonic::Response<T>, tonic::Status>,
    code: Code,
    reason: Option<&str>,
    secret: &str,
    what: &str,
) -> String {
    let e = r.expect_err(what);
    assert_eq!(e.code(), code, "{what}: {}", e.message());
    if let Some(reason) = reason {
        assert_eq!(
            refusal::reason(&e).as_deref(),
            Some(reason),
            "{what}: {e:?}"
        );
    }
    assert!(
        secret.is_empty() || !e.message().contains(secret),
        "{what} echoed the secret"
    );
    e.message().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_token_cannot_take_over_a_live_daemons_worker() {
    let pg = TempPostgres::start().expect("PostgreSQL");
    let coord = CoordinatorProcess::start_secure(&pg.url(), &[], false).await;
    let (worker, _) = coord.create_token(pb::TokenRole::Worker, "workers").await;
    let (client, _) = coord.create_token(pb::TokenRole::Client, "users").await;
    let tmp = tempfile::tempdir().expect("temp dir");
    let token_file = CoordinatorProcess::token_file(tmp.path(), "worker.token", &worker);
    let trainer = counting_trainer(tmp.path(), 40, &["loss"], 0.25);
    let ca = coord.ca().expect("ca");
    let work_dir = tmp.path().join("work");
    let args: Vec<&OsStr> = vec![
        OsStr::new("--ca"),
        ca.as_os_str(),
        OsStr::new("--token-file"),
        token_file.as_os_str(),
        OsStr::new("--trainer"),
        trainer.as_os_str(),
    ];
    let daemon = DaemonProcess::start_with_args(&coord.url(), "gpu-host", &work_dir, &args);
    let db = sqlx::PgPool::connect(&pg.url()).await.expect("db");
    let logs = || format!("{}\n{}", coord.log_text(), daemon.log_text());

    // The real daemon holds its worker and runs a job.
    let mut jobs = segtrain_proto::v1::job_service_client::JobServiceClient::new(
        coord.channel_with_token(Some(&client)),
    );
    let job = segtrain_tests::coordinator::submit_job(&mut jobs, queued_spec("victim", 1)).await;
    let state = || async {
        segtrain_tests::coordinator::get_job(&mut jobs.clone(), &job.id)
            .await
            .state()
    };
    poll_until(Duration::from_secs(60), "the job runs", logs, || async {
        state().await == pb::JobState::Running
    })
    .await;
    let record = std::fs::read_to_string(work_dir.join("daemon-cpu.instance")).expect("record");
    let mut lines = record.lines();
    let (holder, secret) = (
        lines.next().expect("id").to_string(),
        lines.next().unwrap_or("no secret recorded").to_string(),
    );

    // The impostor: a worker token of its own, the daemon's host and GPU.
    let mut impostor = WorkerServiceClient::new(coord.channel_with_token(Some(&worker)));
    let held = refused(
        impostor
            .register(register("gpu-host", &new_instance()))
            .await,
        Code::AlreadyExists,
        Some(refusal::WORKER_HELD),
        &secret,
        "a second daemon",
    );
    assert_eq!(holder_named_in(&held), holder, "{held}");
    // Naming the holder as its predecessor, or as itself, proves nothing without its secret.
    let successor = pb::RegisterRequest {
        previous_instance_id: holder.clone(),
        ..register("gpu-host", &new_instance())
    };
    refused(
        impostor.register(successor.clone()).await,
        Code::AlreadyExists,
        Some(refusal::WORKER_HELD),
        &secret,
        "a successor without the secret",
    );
    refused(
        impostor
            .register(pb::RegisterRequest {
                previous_instance_secret: "guessed".into(),
                ..successor
            })
            .await,
        Code::AlreadyExists,
        Some(refusal::WORKER_HELD),
        &secret,
        "a successor with a wrong secret",
    );
    refused(
        impostor.register(register("gpu-host", &holder)).await,
        Code::AlreadyExists,
        Some(refusal::WORKER_HELD),
        &secret,
        "the holder's id as its own",
    );
    // Acting as the holder: every call refused, none of its assignments handed out.
    let worker_id: String = sqlx::query_scalar("SELECT id::text FROM workers")
        .fetch_one(&db)
        .await
        .expect("worker id");
    let wrong = "not-the-secret".to_string();
    refused(
        impostor
            .heartbeat(pb::HeartbeatRequest {
                worker_id: worker_id.clone(),
                instance_id: holder.clone(),
                instance_secret: wrong.clone(),
                ..Default::default()
            })
            .await,
        Code::PermissionDenied,
        Some(refusal::INSTANCE_SECRET),
        &secret,
        "a heartbeat as the holder",
    );
    refused(
        impostor
            .await_assignment(pb::AwaitAssignmentRequest {
                worker_id: worker_id.clone(),
                instance_id: holder.clone(),
                instance_secret: wrong.clone(),
            })
            .await,
        Code::PermissionDenied,
        Some(refusal::INSTANCE_SECRET),
        &secret,
        "the holder's assignment stream",
    );
    let finished = pb::WorkerEvent {
        seq: 1_000_000,
        job_id: job.id.clone(),
        attempt: 1,
        rank: 0,
        time: None,
        payload: Some(pb::worker_event::Payload::Finished(pb::RankFinished {
            outcome: pb::RankOutcome::Succeeded as i32,
            reason: "the impostor says so".into(),
        })),
    };
    refused(
        impostor
            .report_events(pb::ReportEventsRequest {
                worker_id: worker_id.clone(),
                events: vec![finished],
                instance_id: holder.clone(),
                instance_secret: wrong,
            })
            .await,
        Code::PermissionDenied,
        Some(refusal::INSTANCE_SECRET),
        &secret,
        "a `finished` as the holder",
    );

    // The real daemon goes on: its job succeeds through it, and it still holds the worker.
    poll_until(
        Duration::from_secs(120),
        "the job succeeds",
        logs,
        || async { state().await == pb::JobState::Succeeded },
    )
    .await;
    let end = segtrain_tests::coordinator::get_job(&mut jobs, &job.id).await;
    assert!(!end.reason.contains("impostor"), "{}", end.reason);
    assert!(daemon.pid().is_some_and(alive), "{}", logs());
    let (now_held_by, digest): (String, Vec<u8>) =
        sqlx::query_as("SELECT instance_id::text, instance_secret_sha256 FROM workers")
            .fetch_one(&db)
            .await
            .expect("holder");
    assert_eq!(now_held_by, holder);
    // Only the secret's digest is stored, and the secret is in no log.
    assert_eq!(digest.len(), 32);
    assert!(!logs().contains(&secret), "a log holds the instance secret");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(work_dir.join("daemon-cpu.instance"))
        .expect("record")
        .permissions()
        .mode();
    assert_eq!(
        mode & 0o077,
        0,
        "the record is readable by others: {mode:o}"
    );
}

/// Creates a token through TokenService; the refusal when it is refused.
async fn create_token(
    coord: &CoordinatorProcess,
    role: pb::TokenRole,
    host: &str,
) -> Result<String, tonic::Status> {
    TokenServiceClient::new(coord.channel_with_token(coord.admin_token()))
        .create_token(pb::CreateTokenRequest {
            name: format!("{}-{host}", role.as_str_name()),
            role: role as i32,
            host: host.into(),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().token)
}

#[tokio::test]
async fn a_host_bound_worker_token_acts_only_for_its_host() {
    let pg = TempPostgres::start().expect("PostgreSQL");
    let coord = CoordinatorProcess::start_secure(&pg.url(), &[], false).await;
    let bound = create_token(&coord, pb::TokenRole::Worker, "host-a")
        .await
        .expect("a worker token bound to host-a");
    let unbound = create_token(&coord, pb::TokenRole::Worker, "")
        .await
        .expect("an unbound worker token");
    let e = create_token(&coord, pb::TokenRole::Client, "host-a")
        .await
        .expect_err("a client token bound to a host");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().starts_with("host: only a worker token"),
        "{}",
        e.message()
    );

    let mut a = WorkerServiceClient::new(coord.channel_with_token(Some(&bound)));
    // Its own host, any GPU.
    for gpu in [0, 1] {
        a.register(pb::RegisterRequest {
            gpu_index: gpu,
            ..register("host-a", &new_instance())
        })
        .await
        .expect("its own host");
    }
    let e = refused(
        a.register(register("host-b", &new_instance())).await,
        Code::PermissionDenied,
        None,
        "",
        "another host",
    );
    assert!(
        e.contains("bound to host \"host-a\"") && e.contains("host-b:cpu"),
        "{e}"
    );
    // An unbound token registers any host (a small cluster's choice).
    let mut b = WorkerServiceClient::new(coord.channel_with_token(Some(&unbound)));
    let reg = b
        .register(register("host-b", &new_instance()))
        .await
        .expect("an unbound token")
        .into_inner();
    // The bound token cannot act for host-b's worker, even with its instance and secret.
    let instance: String =
        sqlx::query_scalar("SELECT instance_id::text FROM workers WHERE host = 'host-b'")
            .fetch_one(&sqlx::PgPool::connect(&pg.url()).await.expect("db"))
            .await
            .expect("instance");
    let beat = pb::HeartbeatRequest {
        worker_id: reg.worker_id.clone(),
        instance_id: instance,
        instance_secret: reg.instance_secret.clone(),
        ..Default::default()
    };
    let e = refused(
        a.heartbeat(beat.clone()).await,
        Code::PermissionDenied,
        None,
        &reg.instance_secret,
        "a bound token for another host's worker",
    );
    assert!(e.contains("bound to host \"host-a\""), "{e}");
    b.heartbeat(beat).await.expect("its own daemon heartbeats");

    // The binding is listed (the CLI's table and JSON show it too).
    let listed = TokenServiceClient::new(coord.channel_with_token(coord.admin_token()))
        .list_tokens(pb::ListTokensRequest::default())
        .await
        .expect("list")
        .into_inner()
        .tokens;
    let hosts: Vec<&str> = listed.iter().map(|t| t.host.as_str()).collect();
    assert!(
        hosts.contains(&"host-a") && hosts.contains(&""),
        "{hosts:?}"
    );
    // The coordinator's own `token create --host` binds too, and refuses a bad host.
    let out = segtrain_tests::coordinator::coordinator_command(&[
        "token",
        "create",
        "--database-url",
        &pg.url(),
        "--role",
        "worker",
        "--name",
        "w",
        "--host",
        "host-c",
        "--json",
    ]);
    assert!(out.contains("\"host\":\"host-c\""), "{out}");
}

segtrain_tests::service_env!(Env);

#[tokio::test]
async fn a_checkpoint_outside_its_jobs_directory_is_refused_and_never_offered() {
    use pb::worker_event::Payload;
    let env = Env(Service::start(&["--lease-seconds", "300", "--restart-backoff-ms", "100"]).await);
    let mut w = FakeWorker::register(&env.coord, "host-a", 0).await;
    let job = env.coord.submit(queued_spec("scoped", 1)).await;
    let a = w.start().await;
    w.started(&a).await;
    let checkpoint = |iteration: u64, uri: &str| {
        Payload::Checkpoint(pb::CheckpointReport {
            checkpoint: Some(pb::Checkpoint {
                iteration,
                uri: uri.into(),
                bytes: 10,
                sha256: "ab".repeat(32),
                ..Default::default()
            }),
        })
    };
    let mine = checkpoint_uri(&job.id, 1, "iter_00000010");
    let elsewhere = [
        "/tmp/planted/iter_00000020".to_string(),
        checkpoint_uri(&job.id, 2, "iter_00000020"),
        checkpoint_uri("another-job", 1, "iter_00000020"),
        format!("{mine}/../../../../../../tmp/planted"),
        "gs://attacker/iter_00000020".to_string(),
    ];
    for uri in &elsewhere {
        let ev = w.event(&job.id, 1, 0, checkpoint(20, uri));
        let e = w.report(vec![ev]).await.expect_err("outside");
        assert_eq!(e.code(), Code::InvalidArgument, "{uri}: {}", e.message());
        assert!(
            e.message().starts_with("checkpoint.uri:")
                && e.message().contains(&format!("{}/attempt-1", job.id)),
            "{}",
            e.message()
        );
        w.seq -= 1; // nothing was stored: the number is free again
    }
    let pending = Payload::CheckpointPending(pb::CheckpointPending {
        iteration: 20,
        uri: "/tmp/planted".into(),
    });
    let ev = w.event(&job.id, 1, 0, pending);
    let e = w.report(vec![ev]).await.expect_err("pending outside");
    assert!(
        e.message().starts_with("checkpoint_pending.uri:"),
        "{}",
        e.message()
    );
    w.seq -= 1;
    let ev = w.event(&job.id, 1, 0, checkpoint(10, &mine));
    w.report(vec![ev]).await.expect("its own directory");
    let stored: Vec<String> = sqlx::query_scalar("SELECT uri FROM checkpoints ORDER BY iteration")
        .fetch_all(env.store.pool())
        .await
        .expect("checkpoints");
    assert_eq!(stored, std::slice::from_ref(&mine));

    // A row outside, stored before the rule existed, is never offered to the next attempt.
    sqlx::query(
        "INSERT INTO checkpoints (job_id, attempt, iteration, uri, sha256, state)
         VALUES ($1::uuid, 1, 30, '/tmp/planted/iter_00000030', 'cd', 'COMPLETE')",
    )
    .bind(&job.id)
    .execute(env.store.pool())
    .await
    .expect("a planted row");
    w.finished(&job.id, 1, 0, pb::RankOutcome::FailedInfra)
        .await;
    let b = w.start().await;
    assert_eq!(b.attempt, 2);
    assert_eq!(b.resume_from, mine);
    let offered: Vec<&str> = b.resume_candidates.iter().map(|c| c.uri.as_str()).collect();
    assert_eq!(offered, [mine.as_str()]);
    // Resuming from anywhere but the job's own directory (or its resume_from) is refused.
    w.started(&b).await;
    let resumed = Payload::Resumed(pb::Resumed {
        iteration: 30,
        uri: "/tmp/planted/iter_00000030".into(),
        skipped: vec![],
    });
    let ev = w.event(&job.id, 2, 0, resumed);
    let e = w.report(vec![ev]).await.expect_err("resumed outside");
    assert!(e.message().starts_with("resumed.uri:"), "{}", e.message());
}
