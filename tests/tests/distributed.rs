//! Distributed training as a service, end to end: PostgreSQL, the coordinator, two CPU worker
//! daemons (separate processes, each running its trainer as a child process, averaging
//! gradients over the TCP collective) and a world-size-2 job.

use segtrain_proto::v1 as pb;
use segtrain_proto::v1::job_service_client::JobServiceClient;
use segtrain_tests::coordinator::{events_until_end, watch_job, CoordinatorProcess};
use segtrain_tests::daemon::DaemonProcess;
use segtrain_tests::dataset::{synth_dir, tiny_job};
use segtrain_tests::pg::TempPostgres;
use sha2::{Digest, Sha256};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_world_size_two_job_trains_to_success_with_every_metric_once() {
    let (tmp, data) = synth_dir(8, 2);

    let pg = TempPostgres::start().expect("PostgreSQL");
    let coord = CoordinatorProcess::start(&pg.url()).await;
    let _a = DaemonProcess::start(&coord.url(), "cpu-a", &tmp.path().join("work-a"));
    let _b = DaemonProcess::start(&coord.url(), "cpu-b", &tmp.path().join("work-b"));

    let ckpt_root = tmp.path().join("checkpoints");
    let spec = pb::JobSpec {
        eval_interval: Some(3),
        checkpoint_interval: Some(3),
        ..tiny_job("ddp-e2e", &data, &ckpt_root, 2, 6)
    };
    let mut jobs = JobServiceClient::new(coord.channel().await);
    let job = coord.get_job(&coord.submit_spec(spec).await).await;

    // Watch from the first event until the stream ends (the job is terminal).
    let mut stream = watch_job(&mut jobs, &job.id, 0).await;
    let logs = || {
        format!(
            "coordinator log:\n{}\ndaemon a:\n{}\ndaemon b:\n{}",
            coord.log_text(),
            _a.log_text(),
            _b.log_text()
        )
    };
    let events = events_until_end(&mut stream, Duration::from_secs(300), logs).await;
    let done = coord.get_job(&job.id).await;
    assert_eq!(
        done.state(),
        pb::JobState::Succeeded,
        "reason: {}\nevents: {events:#?}\ndaemon a:\n{}\ndaemon b:\n{}",
        done.reason,
        _a.log_text(),
        _b.log_text()
    );

    // The watcher saw the losses in iteration order, each iteration once.
    use pb::job_event::Payload;
    let iters: Vec<u64> = events
        .iter()
        .filter_map(|e| match &e.payload {
            Some(Payload::Metrics(m)) if m.values.contains_key("loss") => Some(m.iteration),
            _ => None,
        })
        .collect();
    assert_eq!(iters, vec![1, 2, 3, 4, 5, 6]);

    // PostgreSQL: one loss row per logged iteration, no duplicates.
    let pool = sqlx::PgPool::connect(&pg.url()).await.expect("connect");
    let rows: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT iteration, count(*) FROM metrics WHERE job_id = $1::uuid AND name = 'loss' GROUP BY iteration ORDER BY iteration",
    )
    .bind(&job.id)
    .fetch_all(&pool)
    .await
    .expect("metrics rows");
    assert_eq!(rows, (1..=6).map(|i| (i, 1)).collect::<Vec<_>>());

    // Checkpoint rows match the files: size and sha256 of the manifest (which holds every
    // file's digest).
    let cps: Vec<(i64, String, i64, String)> = sqlx::query_as(
        "SELECT iteration, uri, bytes, sha256 FROM checkpoints WHERE job_id = $1::uuid ORDER BY iteration",
    )
    .bind(&job.id)
    .fetch_all(&pool)
    .await
    .expect("checkpoint rows");
    assert_eq!(cps.iter().map(|c| c.0).collect::<Vec<_>>(), vec![3, 6]);
    for (it, uri, bytes, sha) in &cps {
        let dir = std::path::Path::new(uri);
        let manifest = std::fs::read(dir.join("manifest.json")).expect("manifest on disk");
        let digest: String = Sha256::digest(&manifest)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(&digest, sha, "checkpoint {it}: sha256");
        let mut total = manifest.len() as i64;
        for f in ["model.safetensors", "optimizer.safetensors"] {
            total += std::fs::metadata(dir.join(f))
                .expect("checkpoint file")
                .len() as i64;
        }
        assert_eq!(&total, bytes, "checkpoint {it}: bytes");
    }
}
