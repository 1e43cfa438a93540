//! Paths and text a user controls (docs/security.md, "Paths and text"): a spec's paths are held
//! to the roots an operator allows its team and may not climb out with `..`; control characters
//! are refused in what clients and workers send (a NUL is INVALID_ARGUMENT, not INTERNAL); and
//! the CLI prints nothing raw that could drive a terminal.

use segtrain_proto::v1 as pb;
use segtrain_proto::v1::job_service_client::JobServiceClient;
use segtrain_proto::v1::team_service_client::TeamServiceClient;
use segtrain_proto::v1::token_service_client::TokenServiceClient;
use segtrain_tests::binaries;
use segtrain_tests::coordinator::{queued_spec, CoordinatorProcess, FakeWorker};
use segtrain_tests::pg::TempPostgres;
use std::process::Command;
use tonic::Code;

type Jobs = JobServiceClient<segtrain_proto::client::AuthChannel>;

async fn token(coord: &CoordinatorProcess, role: pb::TokenRole, name: &str, team: &str) -> String {
    TokenServiceClient::new(coord.channel_with_token(coord.admin_token()))
        .create_token(pb::CreateTokenRequest {
            name: name.into(),
            role: role as i32,
            team: team.into(),
            ..Default::default()
        })
        .await
        .expect("create a token")
        .into_inner()
        .token
}

async fn refused(c: &mut Jobs, spec: pb::JobSpec) -> tonic::Status {
    c.submit_job(pb::SubmitJobRequest {
        spec: Some(spec),
        idempotency_key: String::new(),
    })
    .await
    .expect_err("refused")
}

#[tokio::test]
async fn a_spec_is_held_to_its_teams_roots_and_cannot_climb_out() {
    let pg = TempPostgres::start().expect("PostgreSQL");
    let coord = CoordinatorProcess::start_secure(&pg.url(), &[], false).await;
    let mut teams = TeamServiceClient::new(coord.channel_with_token(coord.admin_token()));
    let roots = vec!["/data/vision".to_string(), "gs://vision-ckpt".to_string()];
    teams
        .set_team(pb::SetTeamRequest {
            name: "vision".into(),
            allowed_roots: roots.clone(),
            ..Default::default()
        })
        .await
        .expect("set roots");
    let e = teams
        .set_team(pb::SetTeamRequest {
            name: "vision".into(),
            allowed_roots: vec!["/data".into(), "relative/root".into()],
            ..Default::default()
        })
        .await
        .expect_err("a relative root");
    assert!(
        e.message().starts_with("allowed_roots[1]: "),
        "{}",
        e.message()
    );
    let alice = token(&coord, pb::TokenRole::Client, "alice", "vision").await;
    let mut alice = JobServiceClient::new(coord.channel_with_token(Some(&alice)));

    let inside = pb::JobSpec {
        dataset_root: Some("/data/vision/cityscapes".into()),
        checkpoint_root: Some("gs://vision-ckpt/runs".into()),
        ..queued_spec("scoped", 1)
    };
    let cases = [
        (
            pb::JobSpec {
                dataset_root: Some("/data/audio/clips".into()),
                ..inside.clone()
            },
            "spec.dataset_root: \"/data/audio/clips\" is outside the roots team vision may use: \
             /data/vision, gs://vision-ckpt",
        ),
        (
            pb::JobSpec {
                checkpoint_root: None, // the default, /var/lib/segtrain/checkpoints
                ..inside.clone()
            },
            "spec.checkpoint_root: \"/var/lib/segtrain/checkpoints\" is outside",
        ),
        (
            pb::JobSpec {
                pretrained: Some("gs://someone-else/mit_b0.safetensors".into()),
                ..inside.clone()
            },
            "spec.pretrained: ",
        ),
        (
            pb::JobSpec {
                resume_from: Some("/tmp/planted/iter_100".into()),
                ..inside.clone()
            },
            "spec.resume_from: ",
        ),
        (
            pb::JobSpec {
                dataset_root: Some("/data/vision/../audio".into()),
                ..inside.clone()
            },
            "spec.dataset_root: must not contain `..` segments",
        ),
        (
            pb::JobSpec {
                checkpoint_root: Some("gs://vision-ckpt/../../x".into()),
                ..inside.clone()
            },
            "spec.checkpoint_root: must not contain `..` segments",
        ),
    ];
    for (spec, needle) in cases {
        let e = refused(&mut alice, spec).await;
        assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
        assert!(
            e.message().starts_with(needle),
            "{}\nwanted {needle}",
            e.message()
        );
    }
    // Nothing was created; the spec within the roots is.
    let n = |c: &mut Jobs| {
        let mut c = c.clone();
        async move {
            c.list_jobs(pb::ListJobsRequest::default())
                .await
                .expect("list")
                .into_inner()
                .jobs
                .len()
        }
    };
    assert_eq!(n(&mut alice).await, 0);
    alice
        .submit_job(pb::SubmitJobRequest {
            spec: Some(inside),
            idempotency_key: String::new(),
        })
        .await
        .expect("within the roots");
    assert_eq!(n(&mut alice).await, 1);
}

#[tokio::test]
async fn control_characters_are_refused_and_never_reach_a_terminal() {
    let pg = TempPostgres::start().expect("PostgreSQL");
    let coord = CoordinatorProcess::start_secure(&pg.url(), &[], false).await;
    let client = token(&coord, pb::TokenRole::Client, "c", "").await;
    let mut jobs = JobServiceClient::new(coord.channel_with_token(Some(&client)));
    let job = jobs
        .submit_job(pb::SubmitJobRequest {
            spec: Some(queued_spec("text", 1)),
            idempotency_key: String::new(),
        })
        .await
        .expect("submit")
        .into_inner()
        .job
        .expect("job");

    // A cancel reason: a NUL (which PostgreSQL cannot store) and an ESC sequence are both
    // INVALID_ARGUMENT naming the field, and the job is not canceled.
    for reason in ["\0", "clear \u{1b}[2J screen", "line\nfeed"] {
        let e = jobs
            .cancel_job(pb::CancelJobRequest {
                job_id: job.id.clone(),
                reason: reason.into(),
            })
            .await
            .expect_err("a control character");
        assert_eq!(
            e.code(),
            Code::InvalidArgument,
            "{reason:?}: {}",
            e.message()
        );
        assert!(
            e.message()
                .starts_with("reason: must not contain control characters"),
            "{}",
            e.message()
        );
    }
    let now = jobs
        .get_job(pb::GetJobRequest {
            job_id: job.id.clone(),
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(now.state(), pb::JobState::Queued);
    // A path in a spec.
    let e = jobs
        .submit_job(pb::SubmitJobRequest {
            spec: Some(pb::JobSpec {
                dataset_root: Some("/data/\u{1b}]0;owned\u{7}".into()),
                ..queued_spec("esc", 1)
            }),
            idempotency_key: String::new(),
        })
        .await
        .expect_err("a control character in a path");
    assert!(
        e.message()
            .starts_with("spec.dataset_root: must not contain control characters"),
        "{}",
        e.message()
    );

    // A worker's note: line feeds and tabs pass, an ESC does not.
    let worker = token(&coord, pb::TokenRole::Worker, "w", "").await;
    let mut w = FakeWorker::register_with_token(&coord, &worker, "host-a", 0).await;
    let a = w.start().await;
    w.started(&a).await;
    let note = |text: &str| pb::worker_event::Payload::Note(pb::Note { text: text.into() });
    let ev = w.event(&job.id, 1, 0, note("Traceback:\n\tline 1"));
    w.report(vec![ev]).await.expect("a multi-line note");
    let ev = w.event(&job.id, 1, 0, note("\u{1b}[31mred"));
    let e = w.report(vec![ev]).await.expect_err("an ESC in a note");
    assert!(
        e.message().starts_with(
            "events[0].note.text: must not contain control characters other than line feed and tab"
        ),
        "{}",
        e.message()
    );
    w.seq -= 1;

    // What the CLI prints of a reason stored before these rules (by an older version, or by
    // hand): escaped, never raw.
    let pool = sqlx::PgPool::connect(&pg.url()).await.expect("db");
    sqlx::query("UPDATE jobs SET reason = $2 WHERE id = $1::uuid")
        .bind(&job.id)
        .bind("boom\u{1b}[2J\u{9b}31m")
        .execute(&pool)
        .await
        .expect("an old reason");
    let tmp = tempfile::tempdir().expect("temp dir");
    let token_file = CoordinatorProcess::token_file(tmp.path(), "c.token", &client);
    let cli = |args: &[&str]| {
        let out = Command::new(binaries::path("segtrain"))
            .arg("--coordinator")
            .arg(coord.url())
            .arg("--ca")
            .arg(coord.ca().expect("ca"))
            .arg("--token-file")
            .arg(&token_file)
            .args(args)
            .env_remove("SEGTRAIN_TOKEN")
            .output()
            .expect("run segtrain");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    };
    for args in [
        &["status", job.id.as_str()][..],
        &["--json", "status", job.id.as_str()],
    ] {
        let out = cli(args);
        let text = String::from_utf8_lossy(&out);
        assert!(
            !text.contains('\u{1b}') && !text.contains('\u{9b}'),
            "{args:?} printed a raw control character: {text:?}"
        );
        assert!(text.contains("boom"), "{args:?}: {text}");
    }
    let text = String::from_utf8_lossy(&cli(&["status", &job.id])).into_owned();
    assert!(text.contains("boom\\u{1b}[2J\\u{9b}31m"), "{text}");
    let json: serde_json::Value =
        serde_json::from_slice(&cli(&["--json", "status", &job.id])).expect("valid JSON");
    assert_eq!(json["reason"], "boom\u{1b}[2J\u{9b}31m", "{json}");
}
