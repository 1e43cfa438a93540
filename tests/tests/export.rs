//! `segtrain export`: every point GetMetrics serves, through every page, into TensorBoard event
//! files (read back with the PyPI `tensorboard` package's reader), CSV and JSON.

use segtrain_proto::v1 as pb;
use segtrain_proto::v1::worker_event::Payload;
use segtrain_tests::binaries::{self, run_ok};
use segtrain_tests::coordinator::{metric_points, queued_spec, FakeWorker};
use segtrain_tests::service::Service;
use std::collections::HashMap;
use std::process::Command;

/// (attempt, iteration, name, value)
type Point = (u32, u64, String, f64);

fn same(a: f64, b: f64) -> bool {
    a == b || (a.is_nan() && b.is_nan())
}

fn segtrain(coord: &str, args: &[&str]) -> std::process::Output {
    run_ok(
        Command::new(binaries::path("segtrain"))
            .args(["--coordinator", coord])
            .args(args),
        &format!("segtrain {}", args.join(" ")),
    )
}

fn metrics(iteration: u64, values: &[(&str, f64)]) -> Payload {
    Payload::Metrics(pb::MetricsReport {
        iteration,
        values: values.iter().map(|(n, v)| (n.to_string(), *v)).collect(),
    })
}

#[tokio::test]
async fn every_point_goes_to_tensorboard_csv_and_json_as_get_metrics_serves_it() {
    let env = Service::start(&["--lease-seconds", "300", "--restart-backoff-ms", "0"]).await;
    let mut w = FakeWorker::register(&env.coord, "host-a", 0).await;
    let job = env.coord.submit(queued_spec("export", 1)).await;

    // Attempt 1: two metrics reports and an evaluation of Cityscapes' 19 classes (one absent
    // from the val set), then the rank fails.
    let a = w.start().await;
    w.started(&a).await;
    let mut class_iou: Vec<f64> = (0..19).map(|i| i as f64 / 20.0).collect();
    class_iou[16] = f64::NAN;
    let events = vec![
        w.event(&job.id, 1, 0, metrics(10, &[("loss", 2.5), ("lr", 1e-4)])),
        w.event(
            &job.id,
            1,
            0,
            metrics(20, &[("loss", f64::NAN), ("lr", 2e-4)]),
        ),
        w.event(
            &job.id,
            1,
            0,
            Payload::Eval(pb::EvalReport {
                iteration: 20,
                miou: 0.4,
                aacc: 0.8,
                loss: f64::INFINITY,
                class_iou,
            }),
        ),
    ];
    w.report(events).await.expect("attempt 1 events");
    w.finished(&job.id, 1, 0, pb::RankOutcome::FailedInfra)
        .await;

    // Attempt 2 resumes from iteration 10: its point at 20 replaces attempt 1's.
    let b = w.start().await;
    assert_eq!(b.attempt, 2);
    w.started(&b).await;
    let events = vec![
        w.event(&job.id, 2, 0, metrics(20, &[("loss", 1.5), ("lr", 2e-4)])),
        w.event(&job.id, 2, 0, metrics(30, &[("loss", 1.25), ("lr", 3e-4)])),
    ];
    w.report(events).await.expect("attempt 2 events");
    // More than two GetMetrics pages of 100,000, 7 names an iteration, so that pages end inside
    // an iteration.
    sqlx::query(
        "INSERT INTO metrics (job_id, attempt, iteration, name, value)
         SELECT $1::uuid, 2, 1000 + i, 'm' || n, i * 0.5 + n
         FROM generate_series(0, 33332) AS i, generate_series(0, 6) AS n",
    )
    .bind(&job.id)
    .execute(env.store.pool())
    .await
    .expect("seed points");

    // What GetMetrics serves: one point per (iteration, name), the newest attempt's.
    let want: Vec<Point> = sqlx::query_as::<_, (i32, i64, String, f64)>(
        "SELECT DISTINCT ON (iteration, name) attempt, iteration, name, value FROM metrics
         WHERE job_id = $1::uuid ORDER BY iteration, name, attempt DESC",
    )
    .bind(&job.id)
    .fetch_all(env.store.pool())
    .await
    .expect("points")
    .into_iter()
    .map(|(a, i, n, v)| (a as u32, i as u64, n, v))
    .collect();
    assert_eq!(want.len(), 4 + 3 + 19 + 2 + 233_331, "the seeded points");
    let mut jobs = env.coord.jobs().await;
    let first_page = metric_points(&mut jobs, &job.id, &[], 0).await;
    assert_eq!(first_page.len(), 10_000);
    for (p, w) in first_page.iter().zip(&want) {
        assert!(
            (p.attempt, p.iteration, &p.name) == (w.0, w.1, &w.2) && same(p.value, w.3),
            "GetMetrics served {p:?} where {w:?} was expected"
        );
    }
    let at = |it: u64, name: &str| {
        want.iter()
            .find(|p| p.1 == it && p.2 == name)
            .unwrap_or_else(|| panic!("no point {name} at {it}"))
    };
    assert_eq!(at(20, "loss").0, 2, "attempt 2's loss at 20");
    assert_eq!(at(20, "miou").0, 1, "attempt 1's evaluation stays");
    assert_eq!(at(20, "class_iou/road").3, 0.0);
    assert_eq!(at(20, "class_iou/bicycle").3, 0.9);
    assert!(at(20, "class_iou/train").3.is_nan());

    let coord = env.coord.url();
    let dir = tempfile::tempdir().expect("temp dir");

    // CSV.
    let csv_path = dir.path().join("points.csv");
    segtrain(
        &coord,
        &[
            "export",
            "csv",
            &job.id,
            "-o",
            csv_path.to_str().expect("utf-8"),
        ],
    );
    let csv = std::fs::read_to_string(&csv_path).expect("csv");
    let mut lines = csv.lines();
    assert_eq!(lines.next(), Some("attempt,iteration,name,value"));
    let got: Vec<Point> = lines
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            assert_eq!(f.len(), 4, "{l}");
            (
                f[0].parse().expect("attempt"),
                f[1].parse().expect("iteration"),
                f[2].to_string(),
                f[3].parse().unwrap_or_else(|e| panic!("{l}: {e}")),
            )
        })
        .collect();
    assert_points("csv", &got, &want, |v| v);

    // JSON (non-finite values are null), to standard output.
    let out = segtrain(&coord, &["export", "json", &job.id]);
    let doc: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).expect("json array");
    let got: Vec<Point> = doc
        .iter()
        .map(|p| {
            (
                p["attempt"].as_u64().expect("attempt") as u32,
                p["iteration"].as_u64().expect("iteration"),
                p["name"].as_str().expect("name").to_string(),
                p["value"].as_f64().unwrap_or(f64::NAN),
            )
        })
        .collect();
    let nan_if_infinite = |v: f64| if v.is_finite() { v } else { f64::NAN };
    assert_points("json", &got, &want, nan_if_infinite);

    // TensorBoard, read back by TensorBoard's own loader: scalars are 32-bit floats.
    let tb = dir.path().join("runs/export");
    let out = segtrain(
        &coord,
        &[
            "--json",
            "export",
            "tensorboard",
            &job.id,
            tb.to_str().expect("utf-8"),
        ],
    );
    let said: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(said["points"], want.len());
    let read = run_ok(
        Command::new(binaries::venv_python())
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/python/read_tensorboard.py"
            ))
            .arg(&tb),
        "read_tensorboard.py",
    );
    let text = String::from_utf8(read.stdout).expect("utf-8");
    let by_attempt: HashMap<(u64, String), u32> =
        want.iter().map(|p| ((p.1, p.2.clone()), p.0)).collect();
    let got: Vec<Point> = text
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            let (it, name): (u64, String) = (f[1].parse().expect("step"), f[0].to_string());
            let attempt = by_attempt.get(&(it, name.clone())).copied().unwrap_or(0);
            (
                attempt,
                it,
                name,
                f[2].parse().unwrap_or_else(|e| panic!("{l}: {e}")),
            )
        })
        .collect();
    assert_points("tensorboard", &got, &want, |v| v as f32 as f64);

    // A job that does not exist: the CLI's error names it, and nothing is written.
    let missing = uuid::Uuid::now_v7().to_string();
    let empty = dir.path().join("none");
    let out = Command::new(binaries::path("segtrain"))
        .args(["--coordinator", &coord, "export", "tensorboard", &missing])
        .arg(&empty)
        .output()
        .expect("run segtrain");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&missing) && err.contains("not found"), "{err}");
    assert!(!empty.exists(), "nothing is written for a missing job");
}

/// `got` has exactly `want`'s points in its order, each value as `as_written` stores it.
fn assert_points(what: &str, got: &[Point], want: &[Point], as_written: impl Fn(f64) -> f64) {
    assert_eq!(got.len(), want.len(), "{what}: number of points");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g.0, g.1, &g.2) == (w.0, w.1, &w.2) && same(g.3, as_written(w.3)),
            "{what}: point {i} is {g:?}, GetMetrics serves {w:?}"
        );
    }
}
