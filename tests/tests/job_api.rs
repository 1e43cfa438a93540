//! The job API through the real gRPC server (the `segtrain-coordinator` process) and a real
//! PostgreSQL: round trips, idempotency, validation, the state table, WatchJob, restarts.

use segtrain_coordinator::events::EventPayload;
use segtrain_coordinator::state::JobState;
use segtrain_coordinator::store::{Store, StoreError};
use segtrain_proto::v1 as pb;
use segtrain_proto::v1::job_service_client::JobServiceClient;
use segtrain_tests::coordinator::{
    describe_event, events_until_end, events_until_quiet, get_job, metric_points, queued_spec,
    watch_job,
};
use segtrain_tests::service::walk;
use segtrain_tests::service::Service;
use std::collections::BTreeMap;
use std::time::Duration;
use tonic::transport::Channel;
use tonic::Code;
use uuid::Uuid;

segtrain_tests::service_env!(Env);

impl Env {
    async fn start() -> Env {
        Env(Service::start(&[]).await)
    }

    async fn client(&self) -> JobServiceClient<Channel> {
        JobServiceClient::new(self.coord.channel().await)
    }

    async fn count(&self, table: &str) -> i64 {
        sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
            .fetch_one(self.store.pool())
            .await
            .expect("count rows")
    }
}

/// Every job here has two ranks (nothing runs them).
fn spec(name: &str) -> pb::JobSpec {
    queued_spec(name, 2)
}

async fn submit(
    c: &mut JobServiceClient<Channel>,
    s: pb::JobSpec,
    key: &str,
) -> pb::SubmitJobResponse {
    c.submit_job(pb::SubmitJobRequest {
        spec: Some(s),
        idempotency_key: key.into(),
    })
    .await
    .expect("submit succeeds")
    .into_inner()
}

fn id_of(j: &pb::Job) -> Uuid {
    Uuid::parse_str(&j.id).expect("job id is a uuid")
}

#[tokio::test]
async fn submit_get_list_cancel_round_trip() {
    let env = Env::start().await;
    let mut c = env.client().await;

    let resp = submit(&mut c, spec("first"), "").await;
    assert!(!resp.existing);
    let job = resp.job.expect("job");
    assert_eq!(job.state(), pb::JobState::Queued);
    // The echoed spec is fully resolved: defaults filled in.
    let echoed = job.spec.clone().expect("spec");
    assert_eq!(echoed.variant.as_deref(), Some("b0"));
    assert_eq!(echoed.num_classes, Some(19));
    assert_eq!(echoed.base_lr, Some(6e-5));
    assert_eq!(echoed.world_size, Some(2));

    let got = get_job(&mut c, &job.id).await;
    assert_eq!(got.id, job.id);
    assert_eq!(got.spec, job.spec);

    let second = submit(&mut c, spec("second"), "").await.job.expect("job");
    let list = c
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .expect("list")
        .into_inner();
    let ids: Vec<&str> = list.jobs.iter().map(|j| j.id.as_str()).collect();
    assert_eq!(
        ids,
        vec![second.id.as_str(), job.id.as_str()],
        "newest first"
    );
    assert!(list.next_page_token.is_empty());

    let canceled = env.coord.cancel(&job.id, "no longer needed").await;
    assert_eq!(
        canceled.state(),
        pb::JobState::Canceled,
        "a queued job is canceled at once"
    );
    assert_eq!(canceled.reason, "no longer needed");
    assert!(canceled.finished_at.is_some());

    // Cancel is idempotent on a canceled job.
    let again = env.coord.cancel(&job.id, "").await;
    assert_eq!(again.state(), pb::JobState::Canceled);
    assert_eq!(
        again.reason, "no longer needed",
        "the second cancel changes nothing"
    );

    // State filter.
    let queued = c
        .list_jobs(pb::ListJobsRequest {
            states: vec![pb::JobState::Queued as i32],
            ..Default::default()
        })
        .await
        .expect("list queued")
        .into_inner();
    assert_eq!(queued.jobs.len(), 1);
    assert_eq!(queued.jobs[0].id, second.id);

    // Unknown job and malformed id.
    let e = c
        .get_job(pb::GetJobRequest {
            job_id: Uuid::now_v7().to_string(),
        })
        .await
        .expect_err("unknown job");
    assert_eq!(e.code(), Code::NotFound);
    let e = c
        .get_job(pb::GetJobRequest {
            job_id: "not-a-uuid".into(),
        })
        .await
        .expect_err("bad id");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("job_id"), "{}", e.message());
}

#[tokio::test]
async fn list_pages_through_every_job_once() {
    let env = Env::start().await;
    let mut c = env.client().await;
    let mut created = Vec::new();
    for i in 0..7 {
        created.push(
            submit(&mut c, spec(&format!("job-{i}")), "")
                .await
                .job
                .expect("job")
                .id,
        );
    }
    created.reverse(); // newest first
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = c
            .list_jobs(pb::ListJobsRequest {
                states: vec![],
                page_size: 3,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .expect("page")
            .into_inner();
        assert!(page.jobs.len() <= 3);
        seen.extend(page.jobs.iter().map(|j| j.id.clone()));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen, created);

    for (req, field) in [
        (
            pb::ListJobsRequest {
                page_size: 1001,
                ..Default::default()
            },
            "page_size",
        ),
        (
            pb::ListJobsRequest {
                page_token: "garbage".into(),
                ..Default::default()
            },
            "page_token",
        ),
        (
            pb::ListJobsRequest {
                states: vec![42],
                ..Default::default()
            },
            "states",
        ),
    ] {
        let e = c.list_jobs(req).await.expect_err("bad list request");
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().starts_with(field), "{}", e.message());
    }
}

#[tokio::test]
async fn idempotent_resubmit_returns_the_same_job() {
    let env = Env::start().await;
    let mut c = env.client().await;
    let first = submit(&mut c, spec("idem"), "train-2026-11-26").await;
    assert!(!first.existing);
    let again = submit(&mut c, spec("idem"), "train-2026-11-26").await;
    assert!(again.existing);
    assert_eq!(
        again.job.as_ref().map(|j| &j.id),
        first.job.as_ref().map(|j| &j.id)
    );
    assert_eq!(env.count("jobs").await, 1);
    assert_eq!(
        env.count("job_events").await,
        1,
        "only the first submit wrote an event"
    );

    // Same key, different spec: refused, nothing written.
    let mut other = spec("idem");
    other.variant = Some("b2".into());
    let e = c
        .submit_job(pb::SubmitJobRequest {
            spec: Some(other),
            idempotency_key: "train-2026-11-26".into(),
        })
        .await
        .expect_err("conflicting reuse of the key");
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("idempotency_key"), "{}", e.message());
    assert_eq!(env.count("jobs").await, 1);

    // A different key makes a new job.
    let third = submit(&mut c, spec("idem"), "another-key").await;
    assert!(!third.existing);
    assert_eq!(env.count("jobs").await, 2);
}

#[tokio::test]
async fn a_full_run_without_pretrained_weights_is_accepted_with_a_warning_and_a_note() {
    let env = Env::start().await;
    let mut c = env.client().await;
    let full = pb::JobSpec {
        max_iters: Some(160_000),
        warmup_iters: None,
        ..spec("from-scratch")
    };
    let resp = submit(&mut c, full.clone(), "scratch-1").await;
    assert!(!resp.existing);
    assert_eq!(resp.warnings.len(), 1, "{:?}", resp.warnings);
    let warning = resp.warnings[0].clone();
    for needle in [
        "no pretrained weights",
        "random initialisation",
        "ImageNet-1k MiT",
        "spec.pretrained",
    ] {
        assert!(warning.contains(needle), "{needle:?} not in {warning:?}");
    }
    let job = resp.job.expect("job");
    assert_eq!(job.state(), pb::JobState::Queued, "accepted as usual");
    let id = id_of(&job);
    let payloads = |events: Vec<segtrain_coordinator::store::EventRecord>| -> Vec<EventPayload> {
        events.into_iter().map(|e| e.payload).collect()
    };
    let events = payloads(env.store.events_after(id, 0, 100).await.expect("events"));
    assert_eq!(
        events,
        vec![
            EventPayload::state_change(None, JobState::Queued, "submitted"),
            EventPayload::Note {
                text: warning.clone()
            },
        ]
    );

    // An idempotent resubmit warns again (same spec) but adds no second note.
    let again = submit(&mut c, full, "scratch-1").await;
    assert!(again.existing);
    assert_eq!(again.warnings, vec![warning.clone()]);
    assert_eq!(
        env.store
            .events_after(id, 0, 100)
            .await
            .expect("events")
            .len(),
        2
    );

    // WatchJob shows the note (after the job ends, the stream ends too).
    env.coord.cancel(&job.id, "enough").await;
    let mut stream = watch_job(&mut c, &job.id, 0).await;
    let seen: Vec<String> = collect(&mut stream)
        .await
        .iter()
        .map(describe_event)
        .collect();
    assert_eq!(
        seen,
        vec![
            "state JOB_STATE_QUEUED".to_string(),
            format!("note {warning}"),
            "state JOB_STATE_CANCELED".to_string(),
        ]
    );

    // With weights, or for a short run, there is nothing to warn about.
    for (name, s) in [
        (
            "pretrained",
            pb::JobSpec {
                max_iters: Some(160_000),
                warmup_iters: None,
                pretrained: Some("/weights/mit_b0.safetensors".into()),
                ..spec("pretrained")
            },
        ),
        ("short", spec("short")),
    ] {
        let resp = submit(&mut c, s, "").await;
        assert!(resp.warnings.is_empty(), "{name}: {:?}", resp.warnings);
        let id = id_of(&resp.job.expect("job"));
        let events = payloads(env.store.events_after(id, 0, 100).await.expect("events"));
        assert_eq!(
            events,
            vec![EventPayload::state_change(
                None,
                JobState::Queued,
                "submitted"
            )],
            "{name}"
        );
    }
}

#[tokio::test]
async fn invalid_specs_are_rejected_naming_the_field_and_write_nothing() {
    let env = Env::start().await;
    let mut c = env.client().await;
    type Edit = fn(&mut pb::JobSpec);
    let cases: Vec<(&str, Edit)> = vec![
        ("variant", |s| s.variant = Some("b9".into())),
        ("num_classes", |s| s.num_classes = Some(0)),
        ("num_classes", |s| s.num_classes = Some(255)),
        ("dataset_root", |s| s.dataset_root = None),
        ("dataset_root", |s| {
            s.dataset_root = Some("relative/path".into())
        }),
        ("crop_height", |s| s.crop_height = Some(100)),
        ("crop_width", |s| s.crop_width = Some(0)),
        ("world_size", |s| s.world_size = Some(0)),
        ("batch_per_gpu", |s| s.batch_per_gpu = Some(5000)),
        ("accumulate_steps", |s| s.accumulate_steps = Some(0)),
        ("max_iters", |s| s.max_iters = Some(0)),
        ("precision", |s| s.precision = Some("fp16".into())),
        ("base_lr", |s| s.base_lr = Some(f64::NAN)),
        ("base_lr", |s| s.base_lr = Some(-1e-4)),
        ("warmup_iters", |s| s.warmup_iters = Some(5000)),
        ("warmup_ratio", |s| s.warmup_ratio = Some(0.0)),
        ("poly_power", |s| s.poly_power = Some(f64::INFINITY)),
        ("weight_decay", |s| s.weight_decay = Some(2.0)),
        ("head_lr_mult", |s| s.head_lr_mult = Some(0.0)),
        ("log_interval", |s| s.log_interval = Some(0)),
        ("eval_mode", |s| s.eval_mode = Some("tiles".into())),
        ("eval_stride", |s| s.eval_stride = Some(2000)),
        ("max_restarts", |s| s.max_restarts = Some(101)),
        ("min_world_size", |s| s.min_world_size = Some(0)),
        ("min_world_size", |s| {
            s.world_size = Some(2);
            s.min_world_size = Some(3);
        }),
        // No world size in 3..4 divides 4 micro-batches.
        ("min_world_size", |s| {
            s.world_size = Some(4);
            s.min_world_size = Some(3);
        }),
        ("elastic_wait_seconds", |s| {
            s.elastic_wait_seconds = Some(100_000)
        }),
        ("keep_last", |s| s.keep_last = Some(0)),
        ("checkpoint_root", |s| {
            s.checkpoint_root = Some("s3://bucket/x".into())
        }),
        ("pretrained", |s| {
            s.pretrained = Some("weights.safetensors".into())
        }),
        ("name", |s| s.name = Some("has spaces".into())),
        ("priority", |s| s.priority = Some(5000)),
    ];
    let mut fields = std::collections::BTreeSet::new();
    for (field, edit) in &cases {
        let mut s = spec("bad");
        edit(&mut s);
        let e = c
            .submit_job(pb::SubmitJobRequest {
                spec: Some(s),
                idempotency_key: String::new(),
            })
            .await
            .expect_err("an invalid spec is refused");
        assert_eq!(e.code(), Code::InvalidArgument, "{field}: {}", e.message());
        assert!(
            e.message().starts_with(&format!("spec.{field}:")),
            "expected the message to name {field}: {}",
            e.message()
        );
        fields.insert(*field);
    }
    assert!(
        fields.len() >= 12,
        "distinct invalid fields: {}",
        fields.len()
    );

    let e = c
        .submit_job(pb::SubmitJobRequest {
            spec: Some(spec("ok")),
            idempotency_key: "with space".into(),
        })
        .await
        .expect_err("bad key");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().starts_with("idempotency_key"),
        "{}",
        e.message()
    );

    assert_eq!(env.count("jobs").await, 0, "no job row written");
    assert_eq!(env.count("job_events").await, 0, "no event row written");
}

/// Drives a job into `state` along legal edges only.
async fn job_in(store: &Store, state: JobState) -> Uuid {
    use segtrain_proto::job_spec::ProtoSpec;
    use JobState::*;
    let spec = segtrain_spec::JobSpec::from_proto(&spec("walk")).expect("valid spec");
    let owner = segtrain_coordinator::store::Owner {
        principal: "test",
        team: "default",
    };
    let (job, _) = store.submit_job(&spec, None, owner).await.expect("submit");
    let path: &[JobState] = match state {
        Queued => &[],
        Scheduled => &[Scheduled],
        Running => &[Scheduled, Running],
        Succeeded => &[Scheduled, Running, Succeeded],
        Failed => &[Scheduled, Failed],
        Canceled => &[Canceled],
        Restarting => &[Scheduled, Running, Restarting],
        Canceling => &[Scheduled, Canceling],
    };
    for &s in path {
        store
            .transition_job(job.id, s, "")
            .await
            .expect("legal step");
    }
    assert_eq!(store.get_job(job.id).await.expect("get").state, state);
    job.id
}

#[tokio::test]
async fn every_illegal_transition_is_refused_and_changes_nothing() {
    let env = Env::start().await;
    let store = &env.store;
    let (mut legal, mut illegal) = (0, 0);
    for &from in JobState::ALL {
        for &to in JobState::ALL {
            let id = job_in(store, from).await;
            let events_before = store.events_after(id, 0, 1000).await.expect("events").len();
            let result = store.transition_job(id, to, "test").await;
            let after = store.get_job(id).await.expect("get");
            let events_after = store.events_after(id, 0, 1000).await.expect("events");
            if from.check_transition(to).is_ok() {
                legal += 1;
                assert_eq!(result.expect("legal edge").state, to);
                assert_eq!(after.state, to);
                assert_eq!(events_after.len(), events_before + 1);
                let last = &events_after.last().expect("an event").payload;
                assert_eq!(last, &EventPayload::state_change(Some(from), to, "test"));
            } else {
                illegal += 1;
                assert!(
                    matches!(result, Err(StoreError::Illegal(_))),
                    "{from} -> {to} should be refused, got {result:?}"
                );
                assert_eq!(after.state, from, "{from} -> {to} changed the state");
                assert_eq!(
                    events_after.len(),
                    events_before,
                    "{from} -> {to} wrote an event"
                );
            }
        }
    }
    assert_eq!(legal + illegal, 64);
    // Spot checks that do not lean on the table itself.
    for (from, to) in [
        (JobState::Queued, JobState::Running),
        (JobState::Succeeded, JobState::Running),
        (JobState::Canceled, JobState::Queued),
        (JobState::Canceling, JobState::Running),
        (JobState::Failed, JobState::Restarting),
    ] {
        let id = job_in(store, from).await;
        assert!(matches!(
            store.transition_job(id, to, "").await,
            Err(StoreError::Illegal(_))
        ));
    }
    assert!(
        illegal > 40,
        "the table should forbid most edges ({illegal})"
    );

    // And through the API: a finished job cannot be canceled.
    let done = job_in(store, JobState::Succeeded).await;
    let e = env
        .client()
        .await
        .cancel_job(pb::CancelJobRequest {
            job_id: done.to_string(),
            reason: String::new(),
        })
        .await
        .expect_err("cancel of a succeeded job");
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert_eq!(
        store.get_job(done).await.expect("get").state,
        JobState::Succeeded
    );
}

/// Every event until the stream ends (the job is terminal), each within 20 s.
async fn collect(stream: &mut tonic::Streaming<pb::JobEvent>) -> Vec<pb::JobEvent> {
    events_until_end(stream, Duration::from_secs(20), String::new).await
}

#[tokio::test]
async fn watch_delivers_events_in_order_live_and_resumes_after_an_id() {
    let env = Env::start().await;
    let mut c = env.client().await;
    let job = submit(&mut c, spec("watched"), "").await.job.expect("job");
    let id = id_of(&job);

    // Start watching before anything happens, so later events must arrive live.
    let mut stream = watch_job(&mut c, &job.id, 0).await;
    let first = stream
        .message()
        .await
        .expect("stream ok")
        .expect("first event");
    assert_eq!(describe_event(&first), "state JOB_STATE_QUEUED");

    let store = env.store.clone();
    let writer = tokio::spawn(async move {
        walk(
            &store,
            id,
            &[JobState::Scheduled, JobState::Running],
            "placed",
        )
        .await;
        for it in [50u64, 100, 150] {
            tokio::time::sleep(Duration::from_millis(30)).await;
            let values = BTreeMap::from([("loss".to_string(), Some(1.0 / it as f64))]);
            store
                .append_event(
                    id,
                    1,
                    &EventPayload::Metrics {
                        iteration: it,
                        values,
                    },
                )
                .await
                .expect("metrics event");
        }
        store
            .append_event(
                id,
                1,
                &EventPayload::Note {
                    text: "almost".into(),
                },
            )
            .await
            .expect("note");
        store
            .transition_job(id, JobState::Succeeded, "")
            .await
            .expect("succeeded");
    });
    let rest = collect(&mut stream).await;
    writer.await.expect("writer task");

    let mut all = vec![first];
    all.extend(rest);
    let got: Vec<String> = all.iter().map(describe_event).collect();
    assert_eq!(
        got,
        [
            "state JOB_STATE_QUEUED",
            "state JOB_STATE_SCHEDULED",
            "state JOB_STATE_RUNNING",
            "metrics 50",
            "metrics 100",
            "metrics 150",
            "note almost",
            "state JOB_STATE_SUCCEEDED"
        ]
    );
    let ids: Vec<u64> = all.iter().map(|e| e.id).collect();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "ids strictly increase: {ids:?}"
    );
    assert!(all.iter().all(|e| e.job_id == job.id));

    // Resume after the third event: exactly the rest, then the stream ends (job is terminal).
    let mut resumed = watch_job(&mut c, &job.id, ids[2]).await;
    let again = collect(&mut resumed).await;
    assert_eq!(
        again.iter().map(|e| e.id).collect::<Vec<_>>(),
        ids[3..].to_vec()
    );

    // After the last id: nothing, and the stream ends.
    let mut tail = watch_job(&mut c, &job.id, *ids.last().expect("ids")).await;
    assert!(collect(&mut tail).await.is_empty());

    let e = c
        .watch_job(pb::WatchJobRequest {
            job_id: Uuid::now_v7().to_string(),
            after_event_id: 0,
        })
        .await
        .expect_err("watch of an unknown job");
    assert_eq!(e.code(), Code::NotFound);
}

#[tokio::test]
async fn a_coordinator_restart_keeps_every_job_and_event() {
    let mut env = Env::start().await;
    let mut c = env.client().await;
    let mut ids = Vec::new();
    for i in 0..4 {
        ids.push(
            submit(&mut c, spec(&format!("durable-{i}")), &format!("key-{i}"))
                .await
                .job
                .expect("job")
                .id,
        );
    }
    env.coord.cancel(&ids[1], "test").await;
    let running = Uuid::parse_str(&ids[2]).expect("uuid");
    walk(
        &env.store,
        running,
        &[JobState::Scheduled, JobState::Running],
        "",
    )
    .await;

    // Each job's events: QUEUED; QUEUED, CANCELED; QUEUED, SCHEDULED, RUNNING; QUEUED.
    const COUNTS: [usize; 4] = [1, 2, 3, 1];
    async fn snapshot(
        c: &mut JobServiceClient<Channel>,
        ids: &[String],
    ) -> (Vec<pb::Job>, Vec<Vec<pb::JobEvent>>) {
        let jobs = c
            .list_jobs(pb::ListJobsRequest::default())
            .await
            .expect("list")
            .into_inner()
            .jobs;
        let mut events = Vec::new();
        for (id, n) in ids.iter().zip(COUNTS) {
            // A non-terminal job's watch stays open: wait for the events it must have (each
            // within a bound), then check that nothing more comes.
            let mut s = watch_job(c, id, 0).await;
            let mut got = Vec::new();
            while got.len() < n {
                match tokio::time::timeout(Duration::from_secs(20), s.message()).await {
                    Ok(Ok(Some(ev))) => got.push(ev),
                    other => panic!("job {id}: {} of {n} events, then {other:?}", got.len()),
                }
            }
            got.extend(events_until_quiet(&mut s, Duration::from_millis(300)).await);
            events.push(got);
        }
        (jobs, events)
    }
    let before = snapshot(&mut c, &ids).await;
    assert_eq!(before.0.len(), 4);
    assert_eq!(
        before.1.iter().map(Vec::len).collect::<Vec<_>>(),
        COUNTS.to_vec()
    );

    env.coord.kill();
    env.coord.restart().await;
    let mut c = env.client().await;
    let after = snapshot(&mut c, &ids).await;
    assert_eq!(
        before, after,
        "jobs and events survive a kill -9 of the coordinator"
    );

    // Idempotency keys survive too.
    let again = submit(&mut c, spec("durable-0"), "key-0").await;
    assert!(again.existing);
    assert_eq!(again.job.expect("job").id, ids[0]);
    let _ = &env.url;
}

#[tokio::test]
async fn metrics_and_checkpoints_are_served_from_the_store() {
    let env = Env::start().await;
    let mut c = env.client().await;
    let job = submit(&mut c, spec("metrics"), "").await.job.expect("job");
    let id = id_of(&job);
    let points: Vec<(u64, String, f64)> = (1..=4)
        .flat_map(|i| {
            [
                (i * 50, "loss".to_string(), 2.0 / i as f64),
                (i * 50, "lr".to_string(), 1e-5 * i as f64),
            ]
        })
        .collect();
    assert_eq!(
        env.store
            .insert_metrics(id, 1, &points)
            .await
            .expect("insert"),
        8
    );
    // A replayed batch adds nothing.
    assert_eq!(
        env.store
            .insert_metrics(id, 1, &points)
            .await
            .expect("replay"),
        0
    );

    assert_eq!(metric_points(&mut c, &job.id, &[], 0).await.len(), 8);
    let loss = metric_points(&mut c, &job.id, &["loss"], 100).await;
    assert_eq!(
        loss.iter().map(|p| p.iteration).collect::<Vec<_>>(),
        vec![100, 150, 200]
    );
    assert!(loss.iter().all(|p| p.name == "loss"));
    let got = get_job(&mut c, &job.id).await;
    assert_eq!(
        (got.attempt, got.iteration, got.furthest_iteration),
        (0, 0, 200),
        "the job records the newest iteration any attempt reported; its progress is the current \
         attempt's (this one was never placed)"
    );

    let cps = c
        .list_checkpoints(pb::ListCheckpointsRequest {
            job_id: job.id.clone(),
            include_deleted: false,
            ..Default::default()
        })
        .await
        .expect("checkpoints")
        .into_inner();
    assert!(cps.checkpoints.is_empty());
    let e = c
        .get_metrics(pb::GetMetricsRequest {
            job_id: job.id.clone(),
            limit: 100_001,
            ..Default::default()
        })
        .await
        .expect_err("limit too large");
    assert_eq!(e.code(), Code::InvalidArgument);
}
