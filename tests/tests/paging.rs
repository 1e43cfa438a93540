//! ListWorkers, ListCheckpoints and ListAttempts are paged like ListJobs (docs/service.md): a
//! page size (0: 1000), a token naming the last item of the previous page, every item once and
//! in order across pages, and bad sizes or tokens refused naming the field.

use segtrain_proto::v1 as pb;
use segtrain_proto::v1::cluster_service_client::ClusterServiceClient;
use segtrain_proto::v1::job_service_client::JobServiceClient;
use segtrain_tests::coordinator::{checkpoint_uri, queued_spec, FakeWorker};
use segtrain_tests::service::Service;
use tonic::Code;

#[tokio::test]
async fn the_list_calls_page_every_item_once_in_order() {
    let env = Service::start(&[
        "--lease-seconds",
        "300",
        "--scheduler-interval-ms",
        "100",
        "--restart-backoff-ms",
        "50",
    ])
    .await;
    let mut ws = Vec::new();
    for gpu in 0..5 {
        ws.push(FakeWorker::register(&env.coord, "host-p", gpu).await);
    }
    let mut cluster = ClusterServiceClient::new(env.coord.channel_with_token(None));
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let r = cluster
            .list_workers(pb::ListWorkersRequest {
                page_size: 2,
                page_token: token,
            })
            .await
            .expect("a page")
            .into_inner();
        pages += 1;
        assert!(r.workers.len() <= 2);
        seen.extend(r.workers.into_iter().map(|w| w.gpu_index));
        if r.next_page_token.is_empty() {
            break;
        }
        token = r.next_page_token;
    }
    assert_eq!((seen, pages), (vec![0, 1, 2, 3, 4], 3));
    for (req, field) in [
        (
            pb::ListWorkersRequest {
                page_size: 10_001,
                ..Default::default()
            },
            "page_size: must be 0 (default 1000) or 1..=10000",
        ),
        (
            pb::ListWorkersRequest {
                page_token: "not-a-worker".into(),
                ..Default::default()
            },
            "page_token: not a token from a previous ListWorkers response",
        ),
    ] {
        let e = cluster.list_workers(req).await.expect_err("refused");
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().starts_with(field), "{}", e.message());
    }

    // A job with three attempts and five checkpoints.
    let job = env.coord.submit(queued_spec("paged", 1)).await;
    for attempt in 1..=3u32 {
        let a = loop {
            // The job lands on any idle worker: take the start wherever it comes.
            let mut found = None;
            for (i, w) in ws.iter_mut().enumerate() {
                if let Some(pb::AssignmentMessage {
                    kind: Some(pb::assignment_message::Kind::Start(a)),
                }) = w.try_message(std::time::Duration::from_millis(200)).await
                {
                    found = Some((i, a));
                    break;
                }
            }
            if let Some(f) = found {
                break f;
            }
        };
        let (i, a) = a;
        assert_eq!(a.attempt, attempt);
        let w = &mut ws[i];
        w.started(&a).await;
        if attempt == 3 {
            let evs: Vec<_> = (1..=5u64)
                .map(|k| {
                    w.event(
                        &job.id,
                        3,
                        0,
                        pb::worker_event::Payload::Checkpoint(pb::CheckpointReport {
                            checkpoint: Some(pb::Checkpoint {
                                iteration: k * 10,
                                uri: checkpoint_uri(&job.id, 3, &format!("ckpt-{k}")),
                                sha256: "ab".repeat(32),
                                bytes: 1,
                                ..Default::default()
                            }),
                        }),
                    )
                })
                .collect();
            w.report(evs).await.expect("checkpoints");
        } else {
            w.finished(&job.id, attempt, 0, pb::RankOutcome::FailedInfra)
                .await;
        }
    }
    let mut jobs = JobServiceClient::new(env.coord.channel_with_token(None));
    let mut iterations = Vec::new();
    let mut token = String::new();
    loop {
        let r = jobs
            .list_checkpoints(pb::ListCheckpointsRequest {
                job_id: job.id.clone(),
                include_deleted: false,
                page_size: 2,
                page_token: token,
            })
            .await
            .expect("a page")
            .into_inner();
        iterations.extend(r.checkpoints.iter().map(|c| c.iteration));
        if r.next_page_token.is_empty() {
            break;
        }
        token = r.next_page_token;
    }
    assert_eq!(iterations, [10, 20, 30, 40, 50]);
    let mut attempts = Vec::new();
    let mut token = String::new();
    loop {
        let r = jobs
            .list_attempts(pb::ListAttemptsRequest {
                job_id: job.id.clone(),
                page_size: 1,
                page_token: token,
            })
            .await
            .expect("a page")
            .into_inner();
        attempts.extend(r.attempts.iter().map(|a| a.attempt));
        if r.next_page_token.is_empty() {
            break;
        }
        token = r.next_page_token;
    }
    assert_eq!(attempts, [1, 2, 3]);
    let e = jobs
        .list_attempts(pb::ListAttemptsRequest {
            job_id: job.id.clone(),
            page_token: "-1".into(),
            ..Default::default()
        })
        .await
        .expect_err("a bad token");
    assert!(e.message().starts_with("page_token: "), "{}", e.message());
}
