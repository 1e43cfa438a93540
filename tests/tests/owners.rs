//! Jobs have owners (docs/security.md, "Teams"): a token speaks for a principal in a team; a job
//! records who submitted it; a client sees and acts on its own team's jobs, an admin on all;
//! idempotency keys are each principal's; per-team limits on priority and GPUs held; tokens and
//! jobs from before teams keep working.

use segtrain_proto::v1 as pb;
use segtrain_proto::v1::job_service_client::JobServiceClient;
use segtrain_proto::v1::team_service_client::TeamServiceClient;
use segtrain_proto::v1::token_service_client::TokenServiceClient;
use segtrain_tests::coordinator::{
    coordinator_command, notes, queued_spec, CoordinatorProcess, FakeWorker,
};
use segtrain_tests::pg::TempPostgres;
use segtrain_tests::wait::poll_until;
use std::time::Duration;
use tonic::Code;

type Jobs = JobServiceClient<segtrain_proto::client::AuthChannel>;

/// A plaintext coordinator with tokens required, and its admin token.
async fn coordinator(pg: &TempPostgres, args: &[&str]) -> (CoordinatorProcess, String) {
    let admin = coordinator_command(&[
        "token",
        "create",
        "--database-url",
        &pg.url(),
        "--role",
        "admin",
        "--name",
        "ops",
    ]);
    let coord = CoordinatorProcess::start_plaintext_with_auth(&pg.url(), args).await;
    (coord, admin.trim().to_string())
}

/// A client token for `principal` in `team` (empty: the default team).
async fn client(coord: &CoordinatorProcess, admin: &str, principal: &str, team: &str) -> Jobs {
    let token = TokenServiceClient::new(coord.channel_with_token(Some(admin)))
        .create_token(pb::CreateTokenRequest {
            name: format!("{principal}-laptop"),
            role: pb::TokenRole::Client as i32,
            principal: principal.into(),
            team: team.into(),
            ..Default::default()
        })
        .await
        .expect("create a client token")
        .into_inner()
        .token;
    JobServiceClient::new(coord.channel_with_token(Some(&token)))
}

async fn submit(c: &mut Jobs, name: &str, key: &str) -> pb::SubmitJobResponse {
    c.submit_job(pb::SubmitJobRequest {
        spec: Some(queued_spec(name, 1)),
        idempotency_key: key.into(),
    })
    .await
    .expect("submit")
    .into_inner()
}

async fn listed(c: &mut Jobs, team: &str) -> Result<Vec<String>, tonic::Status> {
    let r = c
        .list_jobs(pb::ListJobsRequest {
            team: team.into(),
            ..Default::default()
        })
        .await?;
    let mut ids: Vec<String> = r.into_inner().jobs.into_iter().map(|j| j.id).collect();
    ids.sort();
    Ok(ids)
}

#[tokio::test]
async fn a_client_sees_and_acts_on_its_own_teams_jobs_only() {
    let pg = TempPostgres::start().expect("PostgreSQL");
    let (coord, admin) = coordinator(&pg, &[]).await;
    let mut alice = client(&coord, &admin, "alice", "vision").await;
    let mut bob = client(&coord, &admin, "bob", "vision").await;
    let mut carol = client(&coord, &admin, "carol", "audio").await;
    let mut ops = JobServiceClient::new(coord.channel_with_token(Some(&admin)));

    // The same idempotency key: one job per principal, not one for everyone.
    let a = submit(&mut alice, "a", "nightly").await;
    let c = submit(&mut carol, "c", "nightly").await;
    assert!(!c.existing, "carol's key found alice's job");
    let (a, c) = (a.job.expect("job"), c.job.expect("job"));
    assert_ne!(a.id, c.id);
    assert!(submit(&mut alice, "a", "nightly").await.existing);
    assert_eq!(
        (a.submitted_by.as_str(), a.team.as_str()),
        ("alice", "vision")
    );
    assert_eq!(
        (c.submitted_by.as_str(), c.team.as_str()),
        ("carol", "audio")
    );

    // Each team lists its own; an admin every team's, or one team's.
    let mut both = vec![a.id.clone(), c.id.clone()];
    both.sort();
    assert_eq!(
        listed(&mut bob, "").await.expect("list"),
        std::slice::from_ref(&a.id)
    );
    assert_eq!(
        listed(&mut carol, "").await.expect("list"),
        std::slice::from_ref(&c.id)
    );
    assert_eq!(listed(&mut ops, "").await.expect("list"), both);
    assert_eq!(
        listed(&mut ops, "audio").await.expect("list"),
        std::slice::from_ref(&c.id)
    );
    let e = listed(&mut carol, "vision")
        .await
        .expect_err("another team");
    assert_eq!(e.code(), Code::PermissionDenied, "{}", e.message());

    // Another team's job is not found, whatever the call; nothing changes.
    let id = || a.id.clone();
    let not_found = |r: Result<(), tonic::Status>, what: &str| {
        let e = r.expect_err(what);
        assert_eq!(e.code(), Code::NotFound, "{what}: {}", e.message());
        assert!(e.message().contains("not found"), "{what}: {}", e.message());
    };
    not_found(
        carol
            .get_job(pb::GetJobRequest { job_id: id() })
            .await
            .map(drop),
        "get",
    );
    not_found(
        carol
            .cancel_job(pb::CancelJobRequest {
                job_id: id(),
                reason: "mine now".into(),
            })
            .await
            .map(drop),
        "cancel",
    );
    not_found(
        carol
            .watch_job(pb::WatchJobRequest {
                job_id: id(),
                after_event_id: 0,
            })
            .await
            .map(drop),
        "watch",
    );
    not_found(
        carol
            .get_metrics(pb::GetMetricsRequest {
                job_id: id(),
                ..Default::default()
            })
            .await
            .map(drop),
        "metrics",
    );
    not_found(
        carol
            .list_attempts(pb::ListAttemptsRequest {
                job_id: id(),
                ..Default::default()
            })
            .await
            .map(drop),
        "attempts",
    );
    not_found(
        carol
            .list_checkpoints(pb::ListCheckpointsRequest {
                job_id: id(),
                include_deleted: true,
                ..Default::default()
            })
            .await
            .map(drop),
        "checkpoints",
    );
    let still = alice
        .get_job(pb::GetJobRequest { job_id: id() })
        .await
        .expect("alice's job")
        .into_inner();
    assert_eq!(still.state(), pb::JobState::Queued);

    // A teammate may cancel it; the job says who submitted and who canceled.
    let canceled = bob
        .cancel_job(pb::CancelJobRequest {
            job_id: id(),
            reason: "not tonight".into(),
        })
        .await
        .expect("a teammate cancels")
        .into_inner()
        .job
        .expect("job");
    assert_eq!(canceled.state(), pb::JobState::Canceled);
    let mut stream = segtrain_tests::coordinator::watch_job(&mut ops, &a.id, 0).await;
    let events =
        segtrain_tests::coordinator::events_until_quiet(&mut stream, Duration::from_secs(10)).await;
    let notes = notes(&events);
    assert!(
        notes
            .iter()
            .any(|n| n == "submitted by alice (team vision)")
            && notes
                .iter()
                .any(|n| n == "cancel asked by bob (team vision)"),
        "{notes:?}"
    );
    // The audit log names the principals.
    poll_until(
        Duration::from_secs(10),
        "the audit lines",
        || coord.log_text(),
        || async {
            let log = coord.log_text();
            log.contains("job submitted") && log.contains("alice") && log.contains("job canceled")
        },
    )
    .await;
}

#[tokio::test]
async fn a_team_over_its_limits_is_refused_or_waits_queued_saying_why() {
    let pg = TempPostgres::start().expect("PostgreSQL");
    let (coord, admin) = coordinator(
        &pg,
        &["--lease-seconds", "300", "--scheduler-interval-ms", "100"],
    )
    .await;
    let mut teams = TeamServiceClient::new(coord.channel_with_token(Some(&admin)));
    let set = teams
        .set_team(pb::SetTeamRequest {
            name: "vision".into(),
            max_priority: Some(10),
            max_gpus: Some(2),
            ..Default::default()
        })
        .await
        .expect("set limits")
        .into_inner()
        .team
        .expect("team");
    assert_eq!((set.max_priority, set.max_gpus), (Some(10), Some(2)));
    let e = teams
        .set_team(pb::SetTeamRequest {
            name: "no spaces".into(),
            ..Default::default()
        })
        .await
        .expect_err("a bad name");
    assert!(e.message().starts_with("name: "), "{}", e.message());
    let mut alice = client(&coord, &admin, "alice", "vision").await;
    let mut carol = client(&coord, &admin, "carol", "audio").await;

    // Above the team's highest priority: refused, naming the field and the limit.
    let e = alice
        .submit_job(pb::SubmitJobRequest {
            spec: Some(pb::JobSpec {
                priority: Some(50),
                ..queued_spec("urgent", 2)
            }),
            idempotency_key: String::new(),
        })
        .await
        .expect_err("priority over the limit");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message()
            .contains("spec.priority: team vision may submit at priority 10"),
        "{}",
        e.message()
    );

    // Workers for everyone: vision holds its 2, its next job waits, audio's is placed anyway.
    let worker = TokenServiceClient::new(coord.channel_with_token(Some(&admin)))
        .create_token(pb::CreateTokenRequest {
            name: "workers".into(),
            role: pb::TokenRole::Worker as i32,
            ..Default::default()
        })
        .await
        .expect("a worker token")
        .into_inner()
        .token;
    let mut ws = Vec::new();
    for gpu in 0..4 {
        ws.push(FakeWorker::register_with_token(&coord, &worker, "host-a", gpu).await);
    }
    let spec2 = |name: &str| pb::SubmitJobRequest {
        spec: Some(queued_spec(name, 2)),
        idempotency_key: String::new(),
    };
    let first = alice
        .submit_job(spec2("first"))
        .await
        .expect("first")
        .into_inner()
        .job
        .expect("job");
    let second = alice
        .submit_job(spec2("second"))
        .await
        .expect("second")
        .into_inner()
        .job
        .expect("job");
    let other = carol
        .submit_job(spec2("other"))
        .await
        .expect("other")
        .into_inner()
        .job
        .expect("job");
    let state = |c: &Jobs, id: &str| {
        let mut c = c.clone();
        let id = id.to_string();
        async move {
            c.get_job(pb::GetJobRequest { job_id: id })
                .await
                .expect("get")
                .into_inner()
        }
    };
    poll_until(
        Duration::from_secs(30),
        "vision's first and audio's job placed",
        || coord.log_text(),
        || async {
            state(&alice, &first.id).await.state() != pb::JobState::Queued
                && state(&carol, &other.id).await.state() != pb::JobState::Queued
        },
    )
    .await;
    let waiting = state(&alice, &second.id).await;
    assert_eq!(waiting.state(), pb::JobState::Queued);
    assert!(
        waiting
            .reason
            .contains("waiting for team vision's GPUs: it holds 2 of its 2 (max_gpus)"),
        "{}",
        waiting.reason
    );
    let listed = teams
        .list_teams(pb::ListTeamsRequest {})
        .await
        .expect("teams")
        .into_inner()
        .teams;
    let vision = listed
        .iter()
        .find(|t| t.name == "vision")
        .expect("vision listed");
    assert_eq!(vision.held_gpus, 2);
    assert!(listed
        .iter()
        .any(|t| t.name == "audio" && t.held_gpus == 2 && t.max_gpus.is_none()));

    // Once the first job's ranks end, the second is placed.
    for w in ws.iter_mut() {
        if let Some(pb::assignment_message::Kind::Start(a)) = w
            .try_message(Duration::from_secs(5))
            .await
            .and_then(|m| m.kind)
        {
            if a.job_id == first.id {
                w.started(&a).await;
                w.finished(&a.job_id, a.attempt, a.rank, pb::RankOutcome::Succeeded)
                    .await;
            }
        }
    }
    poll_until(
        Duration::from_secs(30),
        "vision's second job placed",
        || coord.log_text(),
        || async { state(&alice, &second.id).await.state() != pb::JobState::Queued },
    )
    .await;
}

#[tokio::test]
async fn tokens_and_jobs_from_before_teams_keep_working() {
    let pg = TempPostgres::start().expect("PostgreSQL");
    // The schema as the previous version left it, with a client token and a job of that time.
    let pool = sqlx::PgPool::connect(&pg.url()).await.expect("db");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../migrations");
    let mut before = sqlx::migrate::Migrator::new(dir).await.expect("migrations");
    let previous: Vec<_> = before
        .migrations
        .iter()
        .filter(|m| m.version < 20261207000010)
        .cloned()
        .collect();
    before.migrations = previous.into();
    before.run(&pool).await.expect("the previous schema");
    let token = format!("segtrain_{}", "A".repeat(43));
    let digest = {
        use sha2::Digest;
        sha2::Sha256::digest(token.as_bytes()).to_vec()
    };
    sqlx::query("INSERT INTO tokens (id, name, role, sha256) VALUES (gen_random_uuid(), 'old-ci', 'client', $1)")
        .bind(&digest)
        .execute(&pool)
        .await
        .expect("an old token");
    let job = uuid::Uuid::now_v7();
    let spec = {
        use segtrain_proto::job_spec::ProtoSpec;
        segtrain_spec::JobSpec::from_proto(&queued_spec("old", 1)).expect("a valid spec")
    };
    sqlx::query(
        "INSERT INTO jobs (id, name, spec, state, priority, world_size, max_restarts, idempotency_key)
         SELECT $1, 'old', $2, 'SUCCEEDED', 0, 1, 3, 'old-key'",
    )
    .bind(job)
    .bind(sqlx::types::Json(&spec))
    .execute(&pool)
    .await
    .expect("an old job");
    // This version migrates it: the token is in team "default" and sees the old job there.
    let (coord, _admin) = coordinator(&pg, &[]).await;
    let mut old = JobServiceClient::new(coord.channel_with_token(Some(&token)));
    assert_eq!(
        listed(&mut old, "").await.expect("the old token lists"),
        [job.to_string()]
    );
    let (by, team): (String, String) =
        sqlx::query_as("SELECT submitted_by, team FROM jobs WHERE id = $1")
            .bind(job)
            .fetch_one(&pool)
            .await
            .expect("owner columns");
    assert_eq!((by.as_str(), team.as_str()), ("", "default"));
    let (principal, token_team): (String, String) =
        sqlx::query_as("SELECT principal, team FROM tokens WHERE name = 'old-ci'")
            .fetch_one(&pool)
            .await
            .expect("token columns");
    assert_eq!(
        (principal.as_str(), token_team.as_str()),
        ("old-ci", "default")
    );
    // The old token still works and its new jobs are in the default team.
    let new = submit(&mut old, "after", "old-key").await;
    assert!(!new.existing, "the old job's key belongs to nobody now");
    let new = new.job.expect("job");
    assert_eq!(
        (new.submitted_by.as_str(), new.team.as_str()),
        ("old-ci", "default")
    );
}
