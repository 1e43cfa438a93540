//! Nothing acknowledged is lost (docs/security.md, "Nothing acknowledged is lost"): a daemon
//! keeps its undelivered events on disk, so a checkpoint its trainer reported while the
//! coordinator could not be reached survives a kill -9 of the daemon, and the next attempt
//! resumes from it.

use segtrain_proto::v1 as pb;
use segtrain_tests::coordinator::CoordinatorProcess;
use segtrain_tests::daemon::{alive, DaemonProcess};
use segtrain_tests::dataset::{synth_dir, tiny_job};
use segtrain_tests::pg::TempPostgres;
use segtrain_tests::sql::{job_value, wait_until};
use segtrain_tests::wait::poll_until;
use std::path::Path;
use std::time::Duration;

/// The newest complete checkpoint (with its manifest) under an attempt's directory.
fn newest_on_disk(dir: &Path) -> Option<u64> {
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("manifest.json").exists())
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_prefix("ckpt-")?
                .parse::<u64>()
                .ok()
        })
        .max()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_reported_while_the_coordinator_was_away_survives_a_kill_9_of_its_daemon() {
    let (tmp, data) = synth_dir(8, 2);
    let pg = TempPostgres::start().expect("PostgreSQL");
    // A lease far longer than the coordinator's absence: the daemon must not fence itself.
    let coord = CoordinatorProcess::start_with_args(
        &pg.url(),
        &["--lease-seconds", "60", "--restart-backoff-ms", "300"],
    )
    .await;
    let pool = sqlx::PgPool::connect(&pg.url()).await.expect("db");
    let work = tmp.path().join("work");
    let mut daemon = DaemonProcess::start(&coord.url(), "cpu-a", &work);
    let ckpt_root = tmp.path().join("ckpt");
    let id = coord
        .submit_spec(pb::JobSpec {
            checkpoint_interval: Some(4),
            ..tiny_job("durable", &data, &ckpt_root, 1, 40)
        })
        .await;
    let logs = || format!("{}\n{}", coord.log_text(), daemon.log_text());
    let sql = "SELECT iteration >= 1 FROM jobs WHERE id = $1::uuid";
    wait_until(&pool, sql, &id, Duration::from_secs(180), "training", logs).await;

    // The coordinator stops answering; the trainer goes on and writes a checkpoint, whose
    // event waits in the daemon's outbox (and journal).
    coord.freeze();
    let attempt_dir = ckpt_root.join(&id).join("attempt-1");
    poll_until(
        Duration::from_secs(120),
        "a checkpoint on disk",
        || daemon.log_text(),
        || async { newest_on_disk(&attempt_dir).is_some() },
    )
    .await;
    let trainers = daemon.trainer_pids();
    daemon.kill();
    let written = newest_on_disk(&attempt_dir).expect("a checkpoint");
    poll_until(
        Duration::from_secs(10),
        "the trainer dies with its daemon",
        String::new,
        || async { trainers.iter().all(|p| !alive(*p)) },
    )
    .await;
    let stored: i64 = job_value(
        &pool,
        "SELECT count(*) FROM checkpoints WHERE job_id = $1::uuid",
        &id,
    )
    .await;
    assert_eq!(stored, 0, "the coordinator was away: nothing stored yet");

    // A new daemon on the same work dir, then the coordinator back.
    let daemon = DaemonProcess::start(&coord.url(), "cpu-a", &work);
    coord.thaw();
    let logs = || format!("{}\n{}", coord.log_text(), daemon.log_text());
    let sql = format!(
        "SELECT count(*) = 1 FROM checkpoints WHERE job_id = $1::uuid AND iteration = {written} \
         AND attempt = 1 AND state = 'COMPLETE'"
    );
    let what = "attempt 1's checkpoint is stored";
    wait_until(&pool, &sql, &id, Duration::from_secs(60), what, logs).await;
    let sql = "SELECT state IN ('SUCCEEDED','FAILED','CANCELED') FROM jobs WHERE id = $1::uuid";
    wait_until(
        &pool,
        sql,
        &id,
        Duration::from_secs(300),
        "the job ends",
        logs,
    )
    .await;
    let job = coord.get_job(&id).await;
    assert_eq!(
        job.state(),
        pb::JobState::Succeeded,
        "{}\n{}",
        job.reason,
        logs()
    );
    assert_eq!(job.attempt, 2, "{}", logs());
    assert_eq!(
        job.resumed_from_iteration,
        Some(written),
        "the next attempt resumes from the checkpoint the killed daemon had not delivered\n{}",
        logs()
    );
    assert!(
        daemon
            .log_text()
            .contains("delivering the previous daemon's undelivered events"),
        "{}",
        logs()
    );
}
