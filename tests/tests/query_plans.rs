//! The reads that grow with the tables stay on their indexes at scale: with 100,000 jobs in the
//! table and one job of about 1,000,000 metric points, ListJobs pages (with and without a state
//! filter, first and deep pages) and GetMetrics pages (all names or some, from the start and
//! from late on) read a page's worth of rows, never the table.
//!
//! The plans are PostgreSQL's generic plans (`plan_cache_mode = force_generic_plan`) of the very
//! texts the store runs (`store::list_jobs_sql`, `store::get_metrics_sql`): a prepared statement
//! switches to its generic plan after a few executions, and a catch-all filter such as
//! `cardinality($1) = 0 OR …` is what a generic plan cannot use an index for. The timings are
//! printed (a table, for bench/results.md), not asserted.

use segtrain_coordinator::store::{get_metrics_sql, list_jobs_sql};
use segtrain_proto::v1 as pb;
use segtrain_proto::v1::job_service_client::JobServiceClient;
use segtrain_tests::coordinator::queued_spec;
use segtrain_tests::service::Service;
use serde_json::Value;
use sqlx::pool::PoolConnection;
use sqlx::Postgres;
use std::time::{Duration, Instant};
use uuid::Uuid;

const JOBS: i64 = 100_000;
/// Attempt 1 logs iterations 1..=100,000, attempt 2 resumes at 90,000 and logs to 200,000.
const NAMES: [&str; 5] = ["loss", "lr", "grad_norm", "images_per_s", "data_wait_s"];
/// A sparse name: an evaluation every 1,000 iterations.
const SPARSE: &str = "miou";
const PAGE: i64 = 50;
const METRICS_PAGE: i64 = 10_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_jobs_and_get_metrics_read_a_page_not_the_table() {
    let env = Service::start(&["--scheduler-interval-ms", "60000"]).await;
    let mut jobs = JobServiceClient::new(env.coord.channel().await);
    let job = jobs
        .submit_job(pb::SubmitJobRequest {
            spec: Some(queued_spec("metrics-heavy", 1)),
            ..Default::default()
        })
        .await
        .expect("submit")
        .into_inner()
        .job
        .expect("job");
    let job_id = Uuid::parse_str(&job.id).expect("uuid");
    let pool = env.store.pool();
    let started = Instant::now();
    seed(pool, job_id).await;
    let seeded = started.elapsed();

    let mut conn = pool.acquire().await.expect("connection");
    sqlx::query("SET plan_cache_mode = force_generic_plan")
        .execute(&mut *conn)
        .await
        .expect("generic plans");
    // A deep page: the cursor 90,000 jobs down.
    let deep: Uuid =
        sqlx::query_scalar("SELECT id FROM jobs ORDER BY id DESC OFFSET 90000 LIMIT 1")
            .fetch_one(pool)
            .await
            .expect("a deep cursor");
    let max = Uuid::max();
    let (jobs_all, jobs_by_state) = (list_jobs_sql(false, false), list_jobs_sql(true, false));
    let (jobs_of_team, jobs_of_team_by_state) =
        (list_jobs_sql(false, true), list_jobs_sql(true, true));
    let (points_all, points_by_name) = (get_metrics_sql(false), get_metrics_sql(true));
    let m = METRICS_PAGE;
    // (what, query, its arguments, the rows a page of it may read at most). With states: a page
    // of each state on jobs_state_id_idx, then each of those rows by id. From 95,000: both
    // attempts' points where they overlap, one of each pair kept.
    #[rustfmt::skip] // a table: one case a line
    let cases: Vec<(&str, &str, String, i64)> = vec![
        ("ListJobs, first page", &jobs_all, format!("'{max}', {PAGE}"), PAGE),
        ("ListJobs, page 1,800", &jobs_all, format!("'{deep}', {PAGE}"), PAGE),
        ("ListJobs, state RUNNING", &jobs_by_state, format!("'{max}', {PAGE}, '{{RUNNING}}'"), 2 * PAGE),
        ("ListJobs, RUNNING deep", &jobs_by_state, format!("'{deep}', {PAGE}, '{{RUNNING}}'"), 2 * PAGE),
        ("ListJobs, QUEUED or RUNNING", &jobs_by_state, format!("'{max}', {PAGE}, '{{QUEUED,RUNNING}}'"), 4 * PAGE),
        ("ListJobs, one team", &jobs_of_team, format!("'{max}', {PAGE}, 'default'"), PAGE),
        ("ListJobs, one team deep", &jobs_of_team, format!("'{deep}', {PAGE}, 'default'"), PAGE),
        ("ListJobs, one team RUNNING", &jobs_of_team_by_state, format!("'{max}', {PAGE}, '{{RUNNING}}', 'default'"), 2 * PAGE),
        ("GetMetrics, from 0", points_all, format!("'{job_id}', 0, {m}"), m),
        ("GetMetrics, from 95,000", points_all, format!("'{job_id}', 95000, {m}"), 2 * m),
        ("GetMetrics, loss from 150,000", points_by_name, format!("'{job_id}', 150000, {m}, '{{loss}}'"), m),
        ("GetMetrics, miou (sparse)", points_by_name, format!("'{job_id}', 0, {m}, '{{{SPARSE}}}'"), 200),
        ("GetMetrics, loss and lr", points_by_name, format!("'{job_id}', 0, {m}, '{{loss,lr}}'"), 2 * m),
    ];
    let mut table = vec![format!(
        "seeded {JOBS} jobs and {} metric points in {seeded:.1?}",
        metric_rows(pool).await
    )];
    table.push("| query | plan | rows read | page accesses | PostgreSQL ms |".into());
    table.push("|---|---|---|---|---|".into());
    for (i, (what, sql, args, most)) in cases.iter().enumerate() {
        let plan = explain(&mut conn, i, sql, args).await;
        let scans = scans(&plan["Plan"]);
        assert!(
            scans.iter().all(|s| s.kind != "Seq Scan"),
            "{what}: a sequential scan in\n{plan:#}"
        );
        let read: f64 = scans.iter().map(|s| s.rows).sum();
        // The JOB_COLUMNS lookups of the current attempt find none here (attempt 0).
        assert!(
            read <= *most as f64,
            "{what}: read {read} rows, at most {most} expected:\n{plan:#}"
        );
        let kinds: Vec<String> = scans
            .iter()
            .map(|s| format!("{} {}", s.kind, s.index))
            .collect();
        // Page accesses bound what an index range scan steps over, which rows do not show.
        let top = &plan["Plan"];
        let pages = ["Shared Hit Blocks", "Shared Read Blocks"]
            .iter()
            .map(|k| top[*k].as_f64().unwrap_or(0.0))
            .sum::<f64>();
        // About one heap access per row, plus the index pages a job row's lookups descend.
        let per_row = if what.starts_with("ListJobs") {
            6.0
        } else {
            1.5
        };
        let page_bound = (*most as f64) * per_row + 100.0;
        assert!(
            pages <= page_bound,
            "{what}: {pages} page accesses, at most {page_bound} expected:\n{plan:#}"
        );
        table.push(format!(
            "| {what} | {} | {read} | {pages} | {:.2} |",
            kinds.join(", "),
            plan["Execution Time"].as_f64().unwrap_or(f64::NAN)
        ));
    }

    // The same reads through the API answer what they should.
    let (page, list_ms) = list_page(&mut jobs, vec![]).await;
    assert_eq!(page.jobs.len(), PAGE as usize);
    let ids: Vec<&str> = page.jobs.iter().map(|j| j.id.as_str()).collect();
    assert!(ids.windows(2).all(|w| w[0] > w[1]), "newest first");
    let (filtered, filtered_ms) = list_page(&mut jobs, vec![pb::JobState::Running]).await;
    assert!(filtered
        .jobs
        .iter()
        .all(|j| j.state() == pb::JobState::Running));
    assert_eq!(filtered.jobs.len(), PAGE as usize);
    let timed = Instant::now();
    let points = jobs
        .get_metrics(pb::GetMetricsRequest {
            job_id: job.id.clone(),
            since_iteration: 95_000,
            limit: METRICS_PAGE as u32,
            ..Default::default()
        })
        .await
        .expect("GetMetrics")
        .into_inner()
        .points;
    let metrics_ms = timed.elapsed();
    assert_eq!(points.len(), METRICS_PAGE as usize);
    // Where the attempts overlap, the newest attempt's point is the one.
    assert!(
        points.iter().all(|p| p.attempt == 2),
        "attempt 2 supersedes"
    );
    assert_eq!(points[0].iteration, 95_000);
    table.push(String::new());
    table.push("| call (gRPC, client-side) | ms |".into());
    table.push("|---|---|".into());
    for (what, d) in [
        ("ListJobs page of 50", list_ms),
        ("ListJobs RUNNING page of 50", filtered_ms),
        ("GetMetrics page of 10,000", metrics_ms),
    ] {
        table.push(format!("| {what} | {:.1} |", ms(d)));
    }
    eprintln!("{}", table.join("\n"));
}

/// The first ListJobs page of these states (all: none), and how long it took.
async fn list_page(
    jobs: &mut JobServiceClient<tonic::transport::Channel>,
    states: Vec<pb::JobState>,
) -> (pb::ListJobsResponse, Duration) {
    let timed = Instant::now();
    let page = jobs
        .list_jobs(pb::ListJobsRequest {
            states: states.into_iter().map(|s| s as i32).collect(),
            page_size: PAGE as u32,
            ..Default::default()
        })
        .await
        .expect("ListJobs")
        .into_inner();
    (page, timed.elapsed())
}

/// 99,999 more jobs (copies of the real one, mostly finished, a few hundred running or queued)
/// and the heavy job's points, then ANALYZE, as autovacuum would.
async fn seed(pool: &sqlx::PgPool, job: Uuid) {
    sqlx::query(
        "INSERT INTO jobs (id, name, spec, state, priority, world_size, max_restarts, created_at)
         SELECT gen_random_uuid(), name || '-' || i, spec,
                CASE WHEN i % 250 = 0 THEN 'RUNNING' WHEN i % 250 = 1 THEN 'QUEUED'
                     WHEN i % 50 = 2 THEN 'FAILED' ELSE 'SUCCEEDED' END,
                priority, world_size, max_restarts, now() - i * interval '1 second'
         FROM jobs, generate_series(1, $2 - 1) AS i WHERE id = $1",
    )
    .bind(job)
    .bind(JOBS)
    .execute(pool)
    .await
    .expect("seed jobs");
    sqlx::query(
        "INSERT INTO metrics (job_id, attempt, iteration, name, value)
         SELECT $1, a, i, n, random()
         FROM (VALUES (1, 1, 100000), (2, 90000, 200000)) AS r(a, lo, hi),
              generate_series(lo, hi) AS i, unnest($2::text[]) AS n",
    )
    .bind(job)
    .bind(&NAMES[..])
    .execute(pool)
    .await
    .expect("seed metrics");
    sqlx::query(
        "INSERT INTO metrics (job_id, attempt, iteration, name, value)
         SELECT $1, 2, i, $2, random() FROM generate_series(1000, 200000, 1000) AS i",
    )
    .bind(job)
    .bind(SPARSE)
    .execute(pool)
    .await
    .expect("seed the sparse metric");
    for table in ["jobs", "metrics"] {
        sqlx::query(&format!("ANALYZE {table}"))
            .execute(pool)
            .await
            .expect("analyze");
    }
}

async fn metric_rows(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM metrics")
        .fetch_one(pool)
        .await
        .expect("count")
}

/// `EXPLAIN (ANALYZE, FORMAT JSON)` of the prepared `sql` executed with `args`: the plan object.
async fn explain(conn: &mut PoolConnection<Postgres>, n: usize, sql: &str, args: &str) -> Value {
    sqlx::query(&format!("PREPARE q{n} AS {sql}"))
        .execute(&mut **conn)
        .await
        .unwrap_or_else(|e| panic!("PREPARE {sql}: {e}"));
    let plan: Value = sqlx::query_scalar(&format!(
        "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) EXECUTE q{n}({args})"
    ))
    .fetch_one(&mut **conn)
    .await
    .unwrap_or_else(|e| panic!("EXPLAIN {sql} ({args}): {e}"));
    plan[0].clone()
}

struct Scan {
    kind: String,
    index: String,
    /// Rows it read over all its loops.
    rows: f64,
}

/// Every node of the plan that reads a table or an index.
fn scans(node: &Value) -> Vec<Scan> {
    let mut out = Vec::new();
    let kind = node["Node Type"].as_str().unwrap_or_default();
    // Not a Function Scan: that is the unnest of an argument, no table.
    if kind.contains("Scan") && kind != "Bitmap Heap Scan" && kind != "Function Scan" {
        // What it produced and what it read and dropped (a filter that is not an index bound).
        let per_loop = [
            "Actual Rows",
            "Rows Removed by Filter",
            "Rows Removed by Index Recheck",
        ]
        .iter()
        .map(|k| node[*k].as_f64().unwrap_or(0.0))
        .sum::<f64>();
        let loops = node["Actual Loops"].as_f64().unwrap_or(1.0);
        out.push(Scan {
            kind: kind.to_string(),
            index: node["Index Name"]
                .as_str()
                .or(node["Relation Name"].as_str())
                .unwrap_or_default()
                .to_string(),
            rows: per_loop * loops,
        });
    }
    for child in node["Plans"].as_array().into_iter().flatten() {
        out.extend(scans(child));
    }
    out
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
