//! `segtrain-loadgen`: measures a coordinator (and its PostgreSQL) under a simulated cluster,
//! through the same gRPC API real daemons and clients use: H hosts x G GPUs of simulated worker
//! daemons (`sim`), M jobs of mixed world sizes, W WatchJob clients. It prints one table
//! (`report`) and appends it, with the date and the machine, to a results file.
//!
//! A benchmark, not a test: it asserts nothing; `tests/tests/loadgen.rs` runs a small one.

mod report;
mod sim;
mod stats;

use clap::Parser;
use segtrain_proto::client::{self as conn, AuthChannel, BearerToken, ClientTls};
use segtrain_proto::v1 as pb;
use segtrain_proto::v1::job_service_client::JobServiceClient;
use sim::{SimWorker, Workload};
use stats::Stats;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Parser, Debug)]
#[command(
    name = "segtrain-loadgen",
    about = "Load generator for the segtrain coordinator"
)]
struct Args {
    /// The coordinator (http://host:port, or https:// with --ca).
    #[arg(
        long,
        env = "SEGTRAIN_COORDINATOR",
        default_value = "http://127.0.0.1:50051"
    )]
    coordinator: String,
    /// The CA of an https:// coordinator.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// A file holding an admin token (it registers workers and submits jobs); none for a
    /// coordinator started with --insecure-no-auth.
    #[arg(long, env = "SEGTRAIN_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Simulated hosts.
    #[arg(long, default_value_t = 128)]
    hosts: u32,
    /// Simulated GPUs per host (one daemon each).
    #[arg(long, default_value_t = 8)]
    gpus_per_host: u32,
    /// Jobs to submit.
    #[arg(long, default_value_t = 1000)]
    jobs: u32,
    /// World sizes, used in turn.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    world_sizes: Vec<u32>,
    /// Iterations per job.
    #[arg(long, default_value_t = 20)]
    max_iters: u64,
    /// Simulated step time, ms.
    #[arg(long, default_value_t = 100)]
    step_ms: u64,
    /// Metrics every K iterations (5 names each, plus --extra-metrics).
    #[arg(long, default_value_t = 1)]
    metrics_every: u64,
    /// More names in each metrics report (`extra_0` ...), to load ingest apart from placement
    /// (a report holds at most 256 values).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=251))]
    extra_metrics: u32,
    /// Checkpoints every this many iterations.
    #[arg(long, default_value_t = 10)]
    checkpoint_every: u64,
    /// WatchJob clients.
    #[arg(long, default_value_t = 16)]
    watchers: u32,
    /// gRPC channels the simulated daemons share (HTTP/2 multiplexes the rest); at least one
    /// per 128 simulated daemons, whatever this says.
    #[arg(long, default_value_t = 16)]
    channels: usize,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 1800)]
    timeout_s: u64,
    /// Append the table to this file.
    #[arg(long)]
    results: Option<PathBuf>,
    /// A label for the results file (e.g. "standard 1,024").
    #[arg(long, default_value = "")]
    label: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.world_sizes.is_empty() || args.world_sizes.contains(&0) {
        anyhow::bail!("--world-sizes: give sizes of at least 1, e.g. 1,2,4,8");
    }
    if args.metrics_every == 0 || args.checkpoint_every == 0 {
        anyhow::bail!("--metrics-every and --checkpoint-every: must be at least 1");
    }
    let tls = ClientTls {
        ca: args.ca.clone(),
        cert: None,
        key: None,
    };
    let token = BearerToken::from_file_or_env(args.token_file.as_deref())?;
    // A coordinator takes at most --max-streams-per-connection (default 256) streams on one
    // connection, and each simulated daemon holds one: at least one channel per 128 daemons.
    let daemons = (args.hosts as usize) * (args.gpus_per_host as usize);
    let channels: Vec<AuthChannel> = (0..args.channels.max(daemons.div_ceil(128)).max(1))
        .map(|_| conn::connect_lazy(&args.coordinator, &tls, token.clone()))
        .collect::<Result<_, _>>()?;
    let stats = Arc::new(Stats::default());
    let submitted: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let work = Workload {
        step: Duration::from_millis(args.step_ms),
        metrics_every: args.metrics_every,
        checkpoint_every: args.checkpoint_every,
        names: sim::METRIC_NAMES
            .iter()
            .map(|n| n.to_string())
            .chain((0..args.extra_metrics).map(|i| format!("extra_{i}")))
            .collect(),
    };

    // The cluster: register every simulated daemon (a few hundred at a time), then start
    // their heartbeats and assignment streams.
    let started = Instant::now();
    let mut workers = Vec::new();
    for h in 0..args.hosts {
        for g in 0..args.gpus_per_host {
            let c = channels[workers.len() % channels.len()].clone();
            workers.push(SimWorker::new(
                format!("sim-{h:05}"),
                g as i32,
                c,
                stats.clone(),
                work.clone(),
                submitted.clone(),
            ));
        }
    }
    let mut lease = Duration::from_secs(15);
    for chunk in workers.chunks(256) {
        let regs = chunk.iter().map(|w| {
            let w = w.clone();
            async move { w.register().await }
        });
        for r in futures_join(regs).await {
            lease = r?;
        }
    }
    for w in &workers {
        tokio::spawn(w.clone().heartbeat_loop(lease));
        tokio::spawn(w.clone().assignment_loop());
    }
    eprintln!(
        "{} simulated GPUs registered in {:.1} s (lease {} s)",
        workers.len(),
        started.elapsed().as_secs_f64(),
        lease.as_secs()
    );

    // Watchers, then the jobs.
    let mut jobs = JobServiceClient::new(channels[0].clone());
    let run_start = Instant::now();
    // Submitted 32 at a time, as many clients would: one at a time the generator, not the
    // coordinator, would set the pace.
    let mut ids = Vec::new();
    let mut inflight = tokio::task::JoinSet::new();
    for i in 0..args.jobs {
        let world = args.world_sizes[i as usize % args.world_sizes.len()];
        let spec = pb::JobSpec {
            name: Some(format!("load-{i}")),
            dataset_root: Some("/sim/cityscapes".into()),
            world_size: Some(world),
            max_iters: Some(args.max_iters),
            warmup_iters: Some(0),
            log_interval: Some(args.metrics_every),
            checkpoint_interval: Some(args.checkpoint_every),
            eval_interval: Some(0),
            checkpoint_root: Some("/sim/checkpoints".into()),
            ..Default::default()
        };
        if inflight.len() >= 32 {
            if let Some(Ok(Some(id))) = inflight.join_next().await {
                ids.push(id);
            }
        }
        let channel = channels[i as usize % channels.len()].clone();
        let (submitted, stats) = (submitted.clone(), stats.clone());
        let watched = i < args.watchers;
        inflight.spawn(async move {
            let t = Instant::now();
            let r = JobServiceClient::new(channel.clone())
                .submit_job(pb::SubmitJobRequest {
                    spec: Some(spec),
                    idempotency_key: String::new(),
                })
                .await;
            match r {
                Ok(r) => {
                    let id = r.into_inner().job.map(|j| j.id).unwrap_or_default();
                    if let Ok(mut s) = submitted.lock() {
                        s.insert(id.clone(), t);
                    }
                    if watched {
                        tokio::spawn(watch(channel, id.clone(), stats));
                    }
                    Some(id)
                }
                Err(e) => {
                    stats.error("SubmitJob", &e);
                    None
                }
            }
        });
    }
    while let Some(r) = inflight.join_next().await {
        if let Ok(Some(id)) = r {
            ids.push(id);
        }
    }

    // Until every job has ended (or the timeout).
    let deadline = Instant::now() + Duration::from_secs(args.timeout_s);
    let outcome = loop {
        let counts = count_states(&mut jobs).await;
        let done = matches!(counts, Ok((_, 0, _)));
        if done || Instant::now() > deadline {
            break counts.map(|(ok, open, bad)| (ok, bad + open));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let wall = run_start.elapsed();
    let lost = pb::cluster_service_client::ClusterServiceClient::new(channels[0].clone())
        .list_workers(pb::ListWorkersRequest::default())
        .await
        .map(|r| {
            r.into_inner()
                .workers
                .iter()
                .filter(|w| w.state() == pb::WorkerState::Lost)
                .count()
        })
        .map_err(|e| format!("ListWorkers failed: {}", e.message()));
    let table = report::Report {
        workers: workers.len(),
        jobs: ids.len(),
        outcome,
        wall,
        false_lease_expiries: lost,
        stats: &stats,
    }
    .render();
    println!("{table}");
    if let Ok(errors) = stats.first_errors.lock() {
        for e in errors.iter() {
            eprintln!("error: {e}");
        }
    }
    if let Some(path) = &args.results {
        report::append(path, &args.label, &args_line(&args), &table)?;
        eprintln!("appended to {}", path.display());
    }
    Ok(())
}

fn args_line(a: &Args) -> String {
    format!(
        "--hosts {} --gpus-per-host {} --jobs {} --world-sizes {} --max-iters {} --step-ms {} \
         --metrics-every {} --extra-metrics {} --checkpoint-every {} --watchers {}",
        a.hosts,
        a.gpus_per_host,
        a.jobs,
        a.world_sizes
            .iter()
            .map(|w| w.to_string())
            .collect::<Vec<_>>()
            .join(","),
        a.max_iters,
        a.step_ms,
        a.metrics_every,
        a.extra_metrics,
        a.checkpoint_every,
        a.watchers
    )
}

/// Runs futures concurrently on this task (no extra crate): spawn each, then join in order.
async fn futures_join<F, T>(futs: impl Iterator<Item = F>) -> Vec<T>
where
    F: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        if let Ok(v) = h.await {
            out.push(v);
        }
    }
    out
}

/// (succeeded, still open, ended otherwise) over every job, by paging ListJobs.
async fn count_states(
    jobs: &mut JobServiceClient<AuthChannel>,
) -> Result<(usize, usize, usize), String> {
    let (mut ok, mut open, mut bad) = (0, 0, 0);
    let mut token = String::new();
    loop {
        let r = jobs
            .list_jobs(pb::ListJobsRequest {
                states: vec![],
                page_size: 1000,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .map_err(|e| format!("ListJobs failed: {}", e.message()))?;
        let r = r.into_inner();
        for j in &r.jobs {
            match j.state() {
                pb::JobState::Succeeded => ok += 1,
                pb::JobState::Failed | pb::JobState::Canceled => bad += 1,
                _ => open += 1,
            }
        }
        if r.next_page_token.is_empty() {
            return Ok((ok, open, bad));
        }
        token = r.next_page_token;
    }
}

/// One WatchJob client: the delay from each live event's server time to its arrival here.
async fn watch(channel: AuthChannel, job_id: String, stats: Arc<Stats>) {
    let mut c = JobServiceClient::new(channel);
    let Ok(stream) = c
        .watch_job(pb::WatchJobRequest {
            job_id,
            after_event_id: 0,
        })
        .await
    else {
        return;
    };
    let mut stream = stream.into_inner();
    let opened = chrono::Utc::now();
    while let Ok(Some(ev)) = stream.message().await {
        let Some(t) = ev.time else { continue };
        let Some(sent) = chrono::DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32) else {
            continue;
        };
        // Replayed history says nothing about live delivery.
        if sent >= opened {
            let ms = (chrono::Utc::now() - sent).num_microseconds().unwrap_or(0) as f64 / 1e3;
            stats.watch_delay.record_ms(ms.max(0.0));
        }
    }
}
