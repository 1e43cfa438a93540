//! One simulated GPU daemon: registers, heartbeats at a third of its lease, holds an assignment
//! stream, and for every rank it is given does what a real daemon's trainer would report —
//! rendezvous, `started`, metrics every few iterations, checkpoints (pending, then complete), an
//! evaluation and `finished` — with a fixed step time instead of training.

use crate::stats::Stats;
use segtrain_proto::client::AuthChannel;
use segtrain_proto::v1 as pb;
use segtrain_proto::v1::worker_service_client::WorkerServiceClient;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What every simulated trainer does.
#[derive(Debug, Clone)]
pub struct Workload {
    pub step: Duration,
    /// Metrics every this many iterations (rank 0), as `log_interval`.
    pub metrics_every: u64,
    pub checkpoint_every: u64,
    /// The names of each metrics report: the five a real trainer logs, then as many more as
    /// `--extra-metrics` asks for (a heavier report, to measure ingest on its own).
    pub names: Vec<String>,
}

/// The metric names a real trainer reports each log interval.
pub const METRIC_NAMES: [&str; 5] = ["loss", "lr", "images_per_s", "data_wait_ms", "step_ms"];

pub struct SimWorker {
    pub host: String,
    pub gpu: i32,
    channel: AuthChannel,
    stats: Arc<Stats>,
    work: Workload,
    id: Mutex<String>,
    instance: String,
    /// The secret the coordinator gave this instance at Register.
    secret: Mutex<String>,
    seq: AtomicU64,
    running: Mutex<HashMap<(String, u32, u32), ()>>,
    /// When each job was submitted (filled by the job submitter), for submit→RUNNING.
    submitted: Arc<Mutex<HashMap<String, Instant>>>,
}

fn client(c: &AuthChannel) -> WorkerServiceClient<AuthChannel> {
    WorkerServiceClient::new(c.clone())
}

impl SimWorker {
    pub fn new(
        host: String,
        gpu: i32,
        channel: AuthChannel,
        stats: Arc<Stats>,
        work: Workload,
        submitted: Arc<Mutex<HashMap<String, Instant>>>,
    ) -> Arc<SimWorker> {
        Arc::new(SimWorker {
            host,
            gpu,
            channel,
            stats,
            work,
            id: Mutex::new(String::new()),
            instance: uuid::Uuid::now_v7().to_string(),
            secret: Mutex::new(String::new()),
            seq: AtomicU64::new(0),
            running: Mutex::new(HashMap::new()),
            submitted,
        })
    }

    fn id(&self) -> String {
        self.id.lock().map(|i| i.clone()).unwrap_or_default()
    }

    fn secret(&self) -> String {
        self.secret.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Registers; returns the lease.
    pub async fn register(&self) -> anyhow::Result<Duration> {
        let r = client(&self.channel)
            .register(pb::RegisterRequest {
                host: self.host.clone(),
                gpu_index: self.gpu,
                gpu_name: "simulated".into(),
                gpu_memory_bytes: 141 << 30,
                running: vec![],
                instance_id: self.instance.clone(),
                previous_instance_id: String::new(),
                instance_secret: self.secret(),
                previous_instance_secret: String::new(),
            })
            .await
            .map_err(|e| anyhow::anyhow!("register {}:{}: {}", self.host, self.gpu, e.message()))?
            .into_inner();
        self.seq.store(r.acked_seq, Ordering::SeqCst);
        if let Ok(mut id) = self.id.lock() {
            *id = r.worker_id;
        }
        if let Ok(mut s) = self.secret.lock() {
            if !r.instance_secret.is_empty() {
                *s = r.instance_secret;
            }
        }
        Ok(Duration::from_secs(u64::from(r.lease_seconds.max(1))))
    }

    /// Heartbeats at a third of the lease until the process ends.
    pub async fn heartbeat_loop(self: Arc<Self>, lease: Duration) {
        let every = lease / 3;
        // Spread the workers over the interval, as daemons started at different times are.
        let offset = (self.gpu.unsigned_abs() as u64 * 7919 + self.host.len() as u64 * 104_729)
            % every.as_millis().max(1) as u64;
        tokio::time::sleep(Duration::from_millis(offset)).await;
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            let running: Vec<pb::AttemptRank> = self
                .running
                .lock()
                .map(|r| {
                    r.keys()
                        .map(|(job_id, attempt, rank)| pb::AttemptRank {
                            job_id: job_id.clone(),
                            attempt: *attempt,
                            rank: *rank,
                        })
                        .collect()
                })
                .unwrap_or_default();
            let t = Instant::now();
            match client(&self.channel)
                .heartbeat(pb::HeartbeatRequest {
                    worker_id: self.id(),
                    running,
                    instance_id: self.instance.clone(),
                    instance_secret: self.secret(),
                    leaving: false,
                })
                .await
            {
                Ok(_) => self.stats.heartbeat.record(t.elapsed()),
                Err(e) => self.stats.error("Heartbeat", &e),
            }
        }
    }

    /// Holds the assignment stream; runs each rank it is given.
    pub async fn assignment_loop(self: Arc<Self>) {
        loop {
            let stream = client(&self.channel)
                .await_assignment(pb::AwaitAssignmentRequest {
                    worker_id: self.id(),
                    instance_id: self.instance.clone(),
                    instance_secret: self.secret(),
                })
                .await;
            let mut stream = match stream {
                Ok(s) => s.into_inner(),
                Err(e) => {
                    self.stats.error("AwaitAssignment", &e);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            while let Ok(Some(msg)) = stream.message().await {
                if let Some(pb::assignment_message::Kind::Start(a)) = msg.kind {
                    let key = (a.job_id.clone(), a.attempt, a.rank);
                    let new = self
                        .running
                        .lock()
                        .map(|mut r| r.insert(key, ()).is_none())
                        .unwrap_or(false);
                    if new {
                        if a.rank == 0 {
                            if let Ok(mut p) = self.stats.placements.lock() {
                                p.push(Instant::now());
                            }
                        }
                        tokio::spawn(self.clone().run_rank(a));
                    }
                }
            }
        }
    }

    fn event(&self, a: &pb::Assignment, payload: pb::worker_event::Payload) -> pb::WorkerEvent {
        pb::WorkerEvent {
            seq: self.seq.fetch_add(1, Ordering::SeqCst) + 1,
            job_id: a.job_id.clone(),
            attempt: a.attempt,
            rank: a.rank,
            time: Some(prost_types::Timestamp::from(std::time::SystemTime::now())),
            payload: Some(payload),
        }
    }

    /// Sends events, retrying while the coordinator is unavailable.
    async fn report(&self, events: Vec<pb::WorkerEvent>) -> bool {
        for _ in 0..20 {
            let t = Instant::now();
            match client(&self.channel)
                .report_events(pb::ReportEventsRequest {
                    worker_id: self.id(),
                    events: events.clone(),
                    instance_id: self.instance.clone(),
                    instance_secret: self.secret(),
                })
                .await
            {
                Ok(_) => {
                    self.stats.report_events.record(t.elapsed());
                    return true;
                }
                Err(e) if e.code() == tonic::Code::Unavailable => {
                    tokio::time::sleep(Duration::from_millis(200)).await
                }
                Err(e) => {
                    self.stats.error("ReportEvents", &e);
                    return false;
                }
            }
        }
        false
    }

    async fn run_rank(self: Arc<Self>, a: pb::Assignment) {
        use pb::worker_event::Payload;
        let key = (a.job_id.clone(), a.attempt, a.rank);
        if a.world_size > 1 {
            let mut c = client(&self.channel);
            let r = if a.rank == 0 {
                c.publish_rendezvous(pb::PublishRendezvousRequest {
                    worker_id: self.id(),
                    job_id: a.job_id.clone(),
                    attempt: a.attempt,
                    endpoint: Some(pb::publish_rendezvous_request::Endpoint::TcpAddress(
                        format!("{}:29500", self.host),
                    )),
                    instance_id: self.instance.clone(),
                    instance_secret: self.secret(),
                })
                .await
                .map(|_| ())
            } else {
                c.await_rendezvous(pb::AwaitRendezvousRequest {
                    worker_id: self.id(),
                    job_id: a.job_id.clone(),
                    attempt: a.attempt,
                    timeout_seconds: 120,
                    instance_id: self.instance.clone(),
                    instance_secret: self.secret(),
                })
                .await
                .map(|_| ())
            };
            if let Err(e) = r {
                self.stats.error("rendezvous", &e);
            }
        }
        self.report(vec![self.event(&a, Payload::Started(pb::RankStarted {}))])
            .await;
        if a.rank == 0 && a.attempt == 1 {
            let submitted = self
                .submitted
                .lock()
                .ok()
                .and_then(|s| s.get(&a.job_id).copied());
            if let Some(t) = submitted {
                self.stats.submit_to_running.record(t.elapsed());
            }
        }
        let max = a.spec.as_ref().and_then(|s| s.max_iters).unwrap_or(100);
        for it in 1..=max {
            tokio::time::sleep(self.work.step).await;
            if a.rank != 0 {
                continue;
            }
            let mut events = Vec::new();
            if it % self.work.metrics_every == 0 || it == max {
                let values = self
                    .work
                    .names
                    .iter()
                    .enumerate()
                    .map(|(i, n)| (n.clone(), 1.0 / (it as f64 + i as f64)))
                    .collect();
                events.push(self.event(
                    &a,
                    Payload::Metrics(pb::MetricsReport {
                        iteration: it,
                        values,
                    }),
                ));
            }
            if it % self.work.checkpoint_every == 0 || it == max {
                // In the job's own directory below its checkpoint_root, as a trainer writes.
                let root = a.spec.as_ref().and_then(|s| s.checkpoint_root.clone());
                let uri = format!(
                    "{}/{}/attempt-{}/ckpt-{it:08}",
                    root.unwrap_or_default(),
                    a.job_id,
                    a.attempt
                );
                events.push(self.event(
                    &a,
                    Payload::CheckpointPending(pb::CheckpointPending {
                        iteration: it,
                        uri: uri.clone(),
                    }),
                ));
                events.push(self.event(
                    &a,
                    Payload::Checkpoint(pb::CheckpointReport {
                        checkpoint: Some(pb::Checkpoint {
                            job_id: a.job_id.clone(),
                            attempt: a.attempt,
                            iteration: it,
                            uri,
                            bytes: 44_691_535,
                            sha256: "0".repeat(64),
                            state: pb::CheckpointState::Complete as i32,
                            ..Default::default()
                        }),
                    }),
                ));
            }
            if it == max {
                events.push(self.event(
                    &a,
                    Payload::Eval(pb::EvalReport {
                        iteration: it,
                        miou: 0.5,
                        aacc: 0.9,
                        loss: 0.3,
                        class_iou: vec![0.5; 19],
                    }),
                ));
            }
            if !events.is_empty() {
                let points = events
                    .iter()
                    .filter(|e| matches!(e.payload, Some(Payload::Metrics(_))))
                    .count()
                    * self.work.names.len();
                if self.report(events).await {
                    self.stats
                        .metric_points
                        .fetch_add(points as u64, Ordering::Relaxed);
                }
            }
        }
        self.report(vec![self.event(
            &a,
            Payload::Finished(pb::RankFinished {
                outcome: pb::RankOutcome::Succeeded as i32,
                reason: String::new(),
            }),
        )])
        .await;
        if let Ok(mut r) = self.running.lock() {
            r.remove(&key);
        }
    }
}
