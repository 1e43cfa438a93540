//! Prometheus metrics of the coordinator, served as text exposition (format 0.0.4) on
//! `GET /metrics` over plain HTTP when `--metrics-listen ADDR` is given.
//!
//! Two kinds of values:
//! - **Read from PostgreSQL** by [`refresh_loop`] every `--metrics-refresh-ms` (jobs and workers by
//!   state, queue length, restarts): every coordinator sharing a database reports the same values
//!   (aggregate them with `max`, not `sum`). A scrape never touches the database: while PostgreSQL
//!   does not answer it gets the last values read and `segtrain_database_up 0`.
//! - **Observed by this process** where things happen (scheduling and rendezvous latency, events
//!   ingested, ingest lag): each coordinator counts what it did itself (aggregate with `sum`).
//!
//! The collectors live in one process-wide [`Metrics`] ([`global`]), so the scheduler and the
//! worker API record into it without being handed a handle.

use crate::state::{JobState, WorkerState};
use crate::store::{ClusterCounts, Store};
use prometheus::{
    Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use std::sync::LazyLock;
use std::time::{Duration, SystemTime};

/// The kinds of daemon events (`WorkerEvent` payloads) counted by
/// `segtrain_events_ingested_total{kind}`; each is exported from the start, at 0.
pub const EVENT_KINDS: &[&str] = &[
    "started",
    "metrics",
    "eval",
    "checkpoint_pending",
    "checkpoint",
    "checkpoints_deleted",
    "resumed",
    "note",
    "finished",
];

/// Every collector the coordinator exports.
pub struct Metrics {
    registry: Registry,
    /// `segtrain_jobs{state}`: jobs in each state (every state, 0 included).
    pub jobs: IntGaugeVec,
    /// `segtrain_queue_length`: QUEUED jobs.
    pub queue_length: IntGauge,
    /// `segtrain_workers{state}`: workers in each state.
    pub workers: IntGaugeVec,
    /// `segtrain_job_restarts_total`: restarts of all jobs (the sum of `jobs.restarts`).
    pub restarts: IntCounter,
    /// `segtrain_database_up`: 1 when the last read of PostgreSQL succeeded.
    pub database_up: IntGauge,
    /// `segtrain_metrics_refreshed_timestamp_seconds`: when the values from PostgreSQL were read.
    pub refreshed: Gauge,
    /// `segtrain_scheduling_latency_seconds`: from QUEUED (submitted, or queued again after a
    /// restart's backoff) to placed on workers.
    pub scheduling_latency: Histogram,
    /// `segtrain_rendezvous_latency_seconds`: from placed to every rank's trainer started.
    pub rendezvous_latency: Histogram,
    /// `segtrain_events_ingested_total{kind}`: daemon events stored (a resent event once).
    pub events_ingested: IntCounterVec,
    /// `segtrain_ingest_lag_seconds`: from an event's time on its daemon to its commit here.
    pub ingest_lag: Histogram,
    /// `segtrain_token_checks_total{answer}`: bearer tokens checked by this coordinator, by
    /// where the answer came from (see [`TOKEN_CHECK_ANSWERS`]).
    pub token_checks: IntCounterVec,
}

/// Where a token check's answer came from: `shape` (refused without I/O: not a token this
/// coordinator could have made), `cache`, `database`, `stale` (a valid verdict past its cache
/// period, used because the lookup failed), `failed` (the lookup failed and nothing was cached).
pub const TOKEN_CHECK_ANSWERS: &[&str] = &["shape", "cache", "database", "stale", "failed"];

/// The process's collectors.
pub fn global() -> &'static Metrics {
    static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);
    &METRICS
}

fn histogram(name: &str, help: &str, buckets: &[f64]) -> Histogram {
    // Names, help and buckets are constants: only a programming error fails here, and the
    // unit test below builds every collector.
    Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
        .unwrap_or_else(|e| panic!("histogram {name}: {e}"))
}

impl Metrics {
    fn new() -> Metrics {
        let m = Metrics {
            registry: Registry::new(),
            jobs: IntGaugeVec::new(
                Opts::new("segtrain_jobs", "Jobs in each state (read from PostgreSQL)."),
                &["state"],
            )
            .unwrap_or_else(|e| panic!("segtrain_jobs: {e}")),
            queue_length: IntGauge::new(
                "segtrain_queue_length",
                "Jobs waiting to be placed (QUEUED; read from PostgreSQL).",
            )
            .unwrap_or_else(|e| panic!("segtrain_queue_length: {e}")),
            workers: IntGaugeVec::new(
                Opts::new(
                    "segtrain_workers",
                    "Workers in each state (read from PostgreSQL).",
                ),
                &["state"],
            )
            .unwrap_or_else(|e| panic!("segtrain_workers: {e}")),
            restarts: IntCounter::new(
                "segtrain_job_restarts_total",
                "Restarts of all jobs after infrastructure failures (the sum over jobs, read from PostgreSQL).",
            )
            .unwrap_or_else(|e| panic!("segtrain_job_restarts_total: {e}")),
            database_up: IntGauge::new(
                "segtrain_database_up",
                "1 when the last read of PostgreSQL for these metrics succeeded, else 0 (values from PostgreSQL are then the last ones read).",
            )
            .unwrap_or_else(|e| panic!("segtrain_database_up: {e}")),
            refreshed: Gauge::new(
                "segtrain_metrics_refreshed_timestamp_seconds",
                "Unix time of the last successful read of PostgreSQL for these metrics.",
            )
            .unwrap_or_else(|e| panic!("segtrain_metrics_refreshed_timestamp_seconds: {e}")),
            scheduling_latency: histogram(
                "segtrain_scheduling_latency_seconds",
                "Seconds from a job entering QUEUED (submitted, or queued again after a restart) to its placement on workers, by this coordinator.",
                &[
                    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
                    14400.0,
                ],
            ),
            rendezvous_latency: histogram(
                "segtrain_rendezvous_latency_seconds",
                "Seconds from an attempt's placement to every rank's trainer started.",
                &[
                    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0,
                ],
            ),
            events_ingested: IntCounterVec::new(
                Opts::new(
                    "segtrain_events_ingested_total",
                    "Events from worker daemons stored by this coordinator, by kind (a resent event counts once).",
                ),
                &["kind"],
            )
            .unwrap_or_else(|e| panic!("segtrain_events_ingested_total: {e}")),
            ingest_lag: histogram(
                "segtrain_ingest_lag_seconds",
                "Seconds from an event's time on its worker daemon to its commit by this coordinator (includes clock skew between the hosts; negative values count as 0).",
                &[
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    300.0,
                ],
            ),
            token_checks: IntCounterVec::new(
                Opts::new(
                    "segtrain_token_checks_total",
                    "Bearer tokens checked by this coordinator, by where the answer came from: shape (refused without I/O), cache, database, stale (a valid verdict past its cache period while the lookup failed), failed.",
                ),
                &["answer"],
            )
            .unwrap_or_else(|e| panic!("segtrain_token_checks_total: {e}")),
        };
        for s in JobState::ALL {
            m.jobs.with_label_values(&[s.as_str()]).set(0);
        }
        for s in WorkerState::ALL {
            m.workers.with_label_values(&[s.as_str()]).set(0);
        }
        for k in EVENT_KINDS {
            m.events_ingested.with_label_values(&[*k]).inc_by(0);
        }
        for a in TOKEN_CHECK_ANSWERS {
            m.token_checks.with_label_values(&[*a]).inc_by(0);
        }
        let info = IntGaugeVec::new(
            Opts::new("segtrain_coordinator_info", "This coordinator's version."),
            &["version"],
        )
        .unwrap_or_else(|e| panic!("segtrain_coordinator_info: {e}"));
        info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(info),
            Box::new(m.jobs.clone()),
            Box::new(m.queue_length.clone()),
            Box::new(m.workers.clone()),
            Box::new(m.restarts.clone()),
            Box::new(m.database_up.clone()),
            Box::new(m.refreshed.clone()),
            Box::new(m.scheduling_latency.clone()),
            Box::new(m.rendezvous_latency.clone()),
            Box::new(m.events_ingested.clone()),
            Box::new(m.ingest_lag.clone()),
            Box::new(m.token_checks.clone()),
        ];
        for c in collectors {
            if let Err(e) = m.registry.register(c) {
                panic!("registering a coordinator metric: {e}");
            }
        }
        m
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_else(|e| format!("# metrics could not be encoded: {e}\n"))
    }

    /// Counts one stored daemon event and how late it arrived (`sent`: its time on the daemon).
    pub fn ingested(&self, kind: &str, sent: Option<SystemTime>, stored: SystemTime) {
        self.events_ingested.with_label_values(&[kind]).inc();
        if let Some(sent) = sent {
            let lag = stored.duration_since(sent).unwrap_or(Duration::ZERO);
            self.ingest_lag.observe(lag.as_secs_f64());
        }
    }
}

impl Metrics {
    fn apply(&self, s: &ClusterCounts) {
        // Every state is set, so one that emptied since the last read goes back to 0.
        for state in JobState::ALL {
            let n = s
                .jobs
                .iter()
                .find(|(name, _)| name == state.as_str())
                .map_or(0, |(_, n)| *n);
            self.jobs.with_label_values(&[state.as_str()]).set(n);
            if *state == JobState::Queued {
                self.queue_length.set(n);
            }
        }
        for state in WorkerState::ALL {
            let n = s
                .workers
                .iter()
                .find(|(name, _)| name == state.as_str())
                .map_or(0, |(_, n)| *n);
            self.workers.with_label_values(&[state.as_str()]).set(n);
        }
        // A counter only goes up: add what PostgreSQL has beyond what was exported.
        let have = self.restarts.get();
        let total = u64::try_from(s.restarts).unwrap_or(0);
        if total > have {
            self.restarts.inc_by(total - have);
        }
        self.database_up.set(1);
        self.refreshed.set(
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
        );
    }
}

/// Reads the gauges from PostgreSQL every `every`, each read bounded by a timeout; a failed read
/// keeps the last values and sets `segtrain_database_up` to 0.
pub async fn refresh_loop(store: Store, every: Duration) {
    let m = global();
    let limit = every.clamp(Duration::from_secs(1), Duration::from_secs(5));
    let mut up = true;
    loop {
        match tokio::time::timeout(limit, store.cluster_counts()).await {
            Ok(Ok(s)) => {
                m.apply(&s);
                up = true;
            }
            failed => {
                m.database_up.set(0);
                if up {
                    let error = match failed {
                        Ok(Err(e)) => e.to_string(),
                        _ => format!("no answer within {} ms", limit.as_millis()),
                    };
                    tracing::warn!(%error, "cannot read metrics from PostgreSQL; serving the last values");
                }
                up = false;
            }
        }
        tokio::time::sleep(every).await;
    }
}

/// Serves `GET /metrics` (plain HTTP/1.1) on `listener` until the task is aborted.
pub async fn serve(listener: tokio::net::TcpListener) {
    let render = std::sync::Arc::new(|| global().render());
    segtrain_telemetry::metrics_http::serve(listener, "segtrain coordinator", render).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_state_and_kind_is_exported_from_the_start() {
        let text = Metrics::new().render();
        for s in JobState::ALL {
            assert!(
                text.contains(&format!("segtrain_jobs{{state=\"{}\"}} 0", s.as_str())),
                "{text}"
            );
        }
        for s in WorkerState::ALL {
            assert!(text.contains(&format!("segtrain_workers{{state=\"{}\"}} 0", s.as_str())));
        }
        for k in EVENT_KINDS {
            assert!(text.contains(&format!("segtrain_events_ingested_total{{kind=\"{k}\"}} 0")));
        }
        for name in [
            "segtrain_queue_length 0",
            "segtrain_job_restarts_total 0",
            "segtrain_database_up 0",
            "# TYPE segtrain_scheduling_latency_seconds histogram",
            "# TYPE segtrain_rendezvous_latency_seconds histogram",
            "# TYPE segtrain_ingest_lag_seconds histogram",
        ] {
            assert!(text.contains(name), "{name} missing:\n{text}");
        }
    }

    #[test]
    fn a_snapshot_sets_every_state_and_restarts_only_grow() {
        let m = Metrics::new();
        let snap = |jobs: &[(&str, i64)], restarts| ClusterCounts {
            jobs: jobs.iter().map(|(s, n)| (s.to_string(), *n)).collect(),
            workers: vec![("IDLE".into(), 2)],
            restarts,
        };
        m.apply(&snap(&[("QUEUED", 3), ("RUNNING", 1)], 4));
        assert_eq!(m.queue_length.get(), 3);
        assert_eq!(m.jobs.with_label_values(&["RUNNING"]).get(), 1);
        assert_eq!(m.workers.with_label_values(&["IDLE"]).get(), 2);
        assert_eq!(m.restarts.get(), 4);
        assert_eq!(m.database_up.get(), 1);
        m.apply(&snap(&[("SUCCEEDED", 4)], 2));
        assert_eq!(m.queue_length.get(), 0);
        assert_eq!(m.jobs.with_label_values(&["RUNNING"]).get(), 0);
        assert_eq!(m.jobs.with_label_values(&["SUCCEEDED"]).get(), 4);
        assert_eq!(m.restarts.get(), 4);
    }

    #[test]
    fn lag_is_never_negative() {
        let m = Metrics::new();
        let now = SystemTime::now();
        m.ingested("metrics", Some(now + Duration::from_secs(5)), now);
        m.ingested("metrics", Some(now - Duration::from_millis(250)), now);
        m.ingested("note", None, now);
        assert_eq!(m.events_ingested.with_label_values(&["metrics"]).get(), 2);
        assert_eq!(m.ingest_lag.get_sample_count(), 2);
        assert!((m.ingest_lag.get_sample_sum() - 0.25).abs() < 1e-6);
    }
}
