//! `segtrain-coordinator prune`: a dry run by default; `--apply` deletes the events and metric
//! points of jobs finished before `--older-than` (optionally archived first) and nothing else;
//! bad flags change nothing.

use segtrain_coordinator::state::JobState;
use segtrain_proto::v1 as pb;
use segtrain_tests::binaries;
use segtrain_tests::coordinator::{
    coordinator_command, events_until_end, metric_points, queued_spec,
};
use segtrain_tests::service::{walk, Service};
use segtrain_tests::sql::job_value;
use std::process::Command;
use uuid::Uuid;

/// (events, points) of a job.
async fn counts(env: &Service, id: &str) -> (i64, i64) {
    let pool = env.store.pool();
    let events = job_value(
        pool,
        "SELECT count(*) FROM job_events WHERE job_id = $1::uuid",
        id,
    );
    let points = job_value(
        pool,
        "SELECT count(*) FROM metrics WHERE job_id = $1::uuid",
        id,
    );
    (events.await, points.await)
}

/// A job that ran `points / 2` iterations of two metrics and ended in `end` (None: still
/// running) `days` days ago.
async fn job(env: &Service, name: &str, points: u64, end: Option<JobState>, days: i32) -> String {
    let id = env.coord.submit_spec(queued_spec(name, 1)).await;
    let uuid = Uuid::parse_str(&id).expect("uuid");
    let to_running = [JobState::Scheduled, JobState::Running];
    walk(&env.store, uuid, &to_running, "test").await;
    let values: Vec<(u64, String, f64)> = (1..=points / 2)
        .flat_map(|i| {
            [
                (i, "loss".to_string(), 1.0 / i as f64),
                (i, "lr".into(), 1e-4),
            ]
        })
        .collect();
    env.store
        .insert_metrics(uuid, 0, &values)
        .await
        .expect("metrics");
    if let Some(end) = end {
        walk(&env.store, uuid, &[end], "test").await;
    }
    sqlx::query(
        "UPDATE jobs SET created_at = now() - make_interval(days => $2 + 1),
                finished_at = CASE WHEN finished_at IS NULL THEN NULL
                                   ELSE now() - make_interval(days => $2) END
         WHERE id = $1",
    )
    .bind(uuid)
    .bind(days)
    .execute(env.store.pool())
    .await
    .expect("age the job");
    id
}

fn prune(env: &Service, args: &[&str]) -> std::process::Output {
    Command::new(binaries::path("segtrain-coordinator"))
        .args(["prune", "--database-url", &env.url])
        .args(args)
        .output()
        .expect("run segtrain-coordinator prune")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_is_a_dry_run_by_default_and_applies_only_to_old_finished_jobs() {
    let env = Service::start(&["--scheduler-interval-ms", "60000"]).await;
    let old = job(&env, "old", 40, Some(JobState::Succeeded), 100).await;
    let old_failed = job(&env, "old-failed", 10, Some(JobState::Failed), 95).await;
    let recent = job(&env, "recent", 40, Some(JobState::Succeeded), 10).await;
    let live = job(&env, "live", 40, None, 200).await;
    let ids = [&old, &old_failed, &recent, &live];
    let mut before = Vec::new();
    for id in ids {
        before.push(counts(&env, id).await);
    }
    let mut jobs = env.coord.jobs().await;
    let old_points = metric_points(&mut jobs, &old, &[], 0).await;
    assert_eq!(old_points.len(), 40);

    // Bad input: a clear error naming the flag, and nothing changes.
    for (args, says) in [
        (
            vec!["--older-than", "90x"],
            "--older-than: a duration such as 90d",
        ),
        (vec!["--older-than", "10m"], "at least 1h"),
        (
            vec!["--archive", "/tmp/x"],
            "--archive writes what --apply deletes",
        ),
    ] {
        let out = prune(&env, &args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} accepted");
        assert!(err.contains(says), "{args:?}: {err}");
    }
    // The dry run (the default, 90 days) names the two old finished jobs and deletes nothing.
    let out = coordinator_command(&["prune", "--database-url", &env.url]);
    assert!(out.starts_with("dry run: 2 finished job(s)"), "{out}");
    assert!(out.contains(&old) && out.contains(&old_failed), "{out}");
    assert!(!out.contains(&recent) && !out.contains(&live), "{out}");
    for (id, was) in ids.iter().zip(&before) {
        assert_eq!(counts(&env, id).await, *was, "a dry run changed {id}");
    }

    // --apply with an archive.
    let dir = tempfile::tempdir().expect("temp dir");
    let archive = dir.path().join("archive");
    let out = coordinator_command(&[
        "prune",
        "--database-url",
        &env.url,
        "--apply",
        "--archive",
        archive.to_str().expect("utf-8"),
        "--json",
    ]);
    let report: serde_json::Value = serde_json::from_str(&out).expect("JSON report");
    let deleted = (before[0].0 + before[1].0, before[0].1 + before[1].1);
    assert_eq!(report["deleted_events"], deleted.0, "{report}");
    assert_eq!(report["deleted_metrics"], deleted.1, "{report}");
    // The old jobs keep their row and get one note; their points are gone.
    for id in [&old, &old_failed] {
        assert_eq!(counts(&env, id).await, (1, 0), "{id}");
        let job = env.coord.get_job(id).await;
        assert!(matches!(
            job.state(),
            pb::JobState::Succeeded | pb::JobState::Failed
        ));
    }
    assert!(metric_points(&mut jobs, &old, &[], 0).await.is_empty());
    let mut watch = env.coord.watch(&old).await;
    let quiet = std::time::Duration::from_secs(10);
    let events = events_until_end(&mut watch, quiet, || env.coord.log_text()).await;
    assert_eq!(
        events.len(),
        1,
        "WatchJob of a pruned job: its note, then the end"
    );
    let Some(pb::job_event::Payload::Note(note)) = &events[0].payload else {
        panic!("{:?}", events[0]);
    };
    assert!(
        note.text.contains("pruned by segtrain-coordinator prune"),
        "{}",
        note.text
    );
    assert!(note.text.contains("archived in"), "{}", note.text);
    // The others are untouched.
    assert_eq!(counts(&env, &recent).await, before[2]);
    assert_eq!(counts(&env, &live).await, before[3]);
    // The archive holds every event and point that was deleted, as it was.
    let text = std::fs::read_to_string(archive.join(format!("{old}.jsonl"))).expect("archive");
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(lines[0]["job"]["id"], old.as_str());
    assert_eq!(lines.len() as i64, 1 + before[0].0 + before[0].1);
    let archived: Vec<(u64, String, f64)> = lines
        .iter()
        .filter_map(|l| l.get("metric"))
        .map(|m| {
            (
                m["iteration"].as_u64().expect("iteration"),
                m["name"].as_str().expect("name").to_string(),
                m["value"].as_f64().expect("value"),
            )
        })
        .collect();
    let served: Vec<(u64, String, f64)> = old_points
        .iter()
        .map(|p| (p.iteration, p.name.clone(), p.value))
        .collect();
    assert_eq!(archived, served);

    // Again: nothing left to prune.
    let out = coordinator_command(&["prune", "--database-url", &env.url, "--apply"]);
    assert!(out.starts_with("pruned 0 finished job(s)"), "{out}");
}
