//! Prometheus metrics of one worker daemon, served as text exposition (format 0.0.4) on
//! `GET /metrics` over plain HTTP when `segtrain-worker daemon --metrics-listen ADDR` is given.
//!
//! Everything is in memory: the trainer's phase, what it runs (an info gauge labelled with job,
//! attempt and rank), its speed and memory from its `metrics` / `rank_metrics` JSON events, the
//! outbox backlog and failed calls to the coordinator. A scrape never waits on the coordinator.

use super::trainer_process::AttemptRank;
use prometheus::{
    Gauge, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};
use std::collections::HashMap;

use std::sync::Mutex;

/// Where one trainer is in its life (no trainer at all: idle).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// Being stopped (SIGTERM sent; SIGKILL after the grace period).
    Stopping,
    /// Assigned: waiting for the rendezvous, or started but not yet training.
    Starting,
    /// The trainer reported `started`.
    Running,
}

/// The values of `segtrain_worker_trainer_state{state}`, in this order.
pub const STATES: &[&str] = &["idle", "starting", "running", "stopping"];

impl Phase {
    fn label(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::Running => "running",
            Phase::Stopping => "stopping",
        }
    }
}

/// Every collector a daemon exports.
pub struct DaemonMetrics {
    registry: Registry,
    trainer_state: IntGaugeVec,
    trainer_info: IntGaugeVec,
    step_ms: Gauge,
    images_per_s: Gauge,
    data_wait_ms: Gauge,
    iteration: Gauge,
    gpu_mem: Gauge,
    gpu_mem_peak: Gauge,
    gpu_mem_reserved: Gauge,
    outbox: IntGauge,
    /// `segtrain_worker_heartbeat_failures_total`.
    pub heartbeat_failures: IntCounter,
    /// `segtrain_worker_report_failures_total`: ReportEvents calls that failed (kept for resend).
    pub report_failures: IntCounter,
    /// `segtrain_worker_events_acked_total`: events the coordinator acknowledged.
    pub events_acked: IntCounter,
    /// `segtrain_worker_events_refused_total`: events the coordinator can never store (refused
    /// for themselves, not for a stale attempt), dropped with a note on the job.
    pub events_refused: IntCounter,
    /// `segtrain_worker_trainer_lines_dropped_total{reason}`: trainer output lines not read.
    pub lines_dropped: IntCounterVec,
    trainer_exits: IntCounterVec,
    trainers: Mutex<HashMap<AttemptRank, Phase>>,
}

fn gauge(name: &str, help: &str) -> Gauge {
    Gauge::new(name, help).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn counter(name: &str, help: &str) -> IntCounter {
    IntCounter::new(name, help).unwrap_or_else(|e| panic!("{name}: {e}"))
}

impl DaemonMetrics {
    /// `host` and `gpu` (`None`: CPU) label `segtrain_worker_info`.
    pub fn new(host: &str, gpu: Option<u32>) -> DaemonMetrics {
        // Names, help texts and label names are constants: only a programming error panics
        // here, and the unit tests build every collector.
        let vec = |name: &str, help: &str, labels: &[&str]| {
            IntGaugeVec::new(Opts::new(name, help), labels)
                .unwrap_or_else(|e| panic!("{name}: {e}"))
        };
        let m = DaemonMetrics {
            registry: Registry::new(),
            trainer_state: vec(
                "segtrain_worker_trainer_state",
                "1 for this daemon's trainer state (idle, starting, running, stopping), 0 for the others.",
                &["state"],
            ),
            trainer_info: vec(
                "segtrain_worker_trainer_info",
                "1 for each trainer this daemon runs, labelled with its job, attempt and rank.",
                &["job", "attempt", "rank"],
            ),
            step_ms: gauge(
                "segtrain_worker_step_time_ms",
                "Milliseconds per optimizer step over the trainer's last log interval (0 when idle).",
            ),
            images_per_s: gauge(
                "segtrain_worker_images_per_second",
                "Training images per second over all ranks in the trainer's last log interval (0 when idle).",
            ),
            data_wait_ms: gauge(
                "segtrain_worker_data_wait_ms",
                "Milliseconds per step the trainer waited for the data loader in its last log interval (0 when idle).",
            ),
            iteration: gauge(
                "segtrain_worker_iteration",
                "The trainer's last reported iteration (0 when idle).",
            ),
            gpu_mem: gauge(
                "segtrain_worker_gpu_memory_bytes",
                "GPU memory held by the trainer's tensors (CUDA caching allocator; 0 on CPU or when idle).",
            ),
            gpu_mem_peak: gauge(
                "segtrain_worker_gpu_memory_peak_bytes",
                "The most GPU memory the trainer's tensors held since it started (0 on CPU or when idle).",
            ),
            gpu_mem_reserved: gauge(
                "segtrain_worker_gpu_memory_reserved_bytes",
                "GPU memory the trainer's caching allocator holds from the driver (0 on CPU or when idle).",
            ),
            outbox: IntGauge::new(
                "segtrain_worker_outbox_events",
                "Events waiting in the outbox for the coordinator's acknowledgement.",
            )
            .unwrap_or_else(|e| panic!("segtrain_worker_outbox_events: {e}")),
            heartbeat_failures: counter(
                "segtrain_worker_heartbeat_failures_total",
                "Heartbeats the coordinator did not accept (unreachable, or this worker unknown).",
            ),
            report_failures: counter(
                "segtrain_worker_report_failures_total",
                "ReportEvents calls that failed; their events stay in the outbox and are sent again.",
            ),
            events_acked: counter(
                "segtrain_worker_events_acked_total",
                "Events the coordinator acknowledged.",
            ),
            events_refused: counter(
                "segtrain_worker_events_refused_total",
                "Events the coordinator refused for themselves (not a stale attempt); dropped, with a note on the job.",
            ),
            lines_dropped: IntCounterVec::new(
                Opts::new(
                    "segtrain_worker_trainer_lines_dropped_total",
                    "Trainer output lines the daemon could not read, by reason (malformed, unknown_kind, too_long).",
                ),
                &["reason"],
            )
            .unwrap_or_else(|e| panic!("segtrain_worker_trainer_lines_dropped_total: {e}")),
            trainer_exits: IntCounterVec::new(
                Opts::new(
                    "segtrain_worker_trainer_exits_total",
                    "Trainers that ended, by outcome.",
                ),
                &["outcome"],
            )
            .unwrap_or_else(|e| panic!("segtrain_worker_trainer_exits_total: {e}")),
            trainers: Mutex::new(HashMap::new()),
        };
        let info = vec(
            "segtrain_worker_info",
            "This daemon: its host, GPU index (\"cpu\" for a CPU worker) and version.",
            &["host", "gpu", "version"],
        );
        let gpu = gpu.map_or_else(|| "cpu".to_string(), |g| g.to_string());
        info.with_label_values(&[host, gpu.as_str(), env!("CARGO_PKG_VERSION")])
            .set(1);
        for s in STATES {
            m.trainer_state.with_label_values(&[*s]).set(0);
        }
        m.trainer_state.with_label_values(&["idle"]).set(1);
        for o in [
            "SUCCEEDED",
            "FAILED_INFRA",
            "FAILED_DETERMINISTIC",
            "CANCELED",
        ] {
            m.trainer_exits.with_label_values(&[o]).inc_by(0);
        }
        for r in ["malformed", "unknown_kind", "too_long"] {
            m.lines_dropped.with_label_values(&[r]).inc_by(0);
        }
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(info),
            Box::new(m.trainer_state.clone()),
            Box::new(m.trainer_info.clone()),
            Box::new(m.step_ms.clone()),
            Box::new(m.images_per_s.clone()),
            Box::new(m.data_wait_ms.clone()),
            Box::new(m.iteration.clone()),
            Box::new(m.gpu_mem.clone()),
            Box::new(m.gpu_mem_peak.clone()),
            Box::new(m.gpu_mem_reserved.clone()),
            Box::new(m.outbox.clone()),
            Box::new(m.heartbeat_failures.clone()),
            Box::new(m.report_failures.clone()),
            Box::new(m.events_acked.clone()),
            Box::new(m.events_refused.clone()),
            Box::new(m.lines_dropped.clone()),
            Box::new(m.trainer_exits.clone()),
        ];
        for c in collectors {
            if let Err(e) = m.registry.register(c) {
                panic!("registering a daemon metric: {e}");
            }
        }
        m
    }

    fn info_labels(key: &AttemptRank) -> [String; 3] {
        [
            key.job_id.clone(),
            key.attempt.to_string(),
            key.rank.to_string(),
        ]
    }

    /// A trainer of this daemon entered `phase` (its first call: it was assigned).
    pub fn set_phase(&self, key: &AttemptRank, phase: Phase) {
        if let Ok(mut t) = self.trainers.lock() {
            t.insert(key.clone(), phase);
        }
        let labels = Self::info_labels(key);
        let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
        self.trainer_info.with_label_values(&labels).set(1);
        self.update_state();
    }

    /// A trainer ended with `outcome` (e.g. "SUCCEEDED").
    pub fn finished(&self, key: &AttemptRank, outcome: &str) {
        let idle = self
            .trainers
            .lock()
            .map(|mut t| {
                t.remove(key);
                t.is_empty()
            })
            .unwrap_or(false);
        let labels = Self::info_labels(key);
        let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
        let _ = self.trainer_info.remove_label_values(&labels);
        self.trainer_exits.with_label_values(&[outcome]).inc();
        if idle {
            for g in [
                &self.step_ms,
                &self.images_per_s,
                &self.data_wait_ms,
                &self.iteration,
                &self.gpu_mem,
                &self.gpu_mem_peak,
                &self.gpu_mem_reserved,
            ] {
                g.set(0.0);
            }
        }
        self.update_state();
    }

    /// The values of a trainer's `metrics` (rank 0) or `rank_metrics` event.
    pub fn observe(&self, iteration: u64, values: &HashMap<String, f64>) {
        self.iteration.set(iteration as f64);
        let set = |g: &Gauge, name: &str| {
            if let Some(v) = values.get(name).filter(|v| v.is_finite()) {
                g.set(*v);
            }
        };
        set(&self.step_ms, "step_ms");
        set(&self.images_per_s, "images_per_s");
        set(&self.data_wait_ms, "data_wait_ms");
        set(&self.gpu_mem, "gpu_mem_bytes");
        set(&self.gpu_mem_peak, "gpu_mem_peak_bytes");
        set(&self.gpu_mem_reserved, "gpu_mem_reserved_bytes");
    }

    /// One state is 1: running if any trainer runs, else starting, else stopping, else idle.
    /// The four labels are written under the trainers' lock, which [`render`](Self::render)
    /// also takes, so a scrape never sees them half written (none or two at 1).
    fn update_state(&self) {
        let Ok(trainers) = self.trainers.lock() else {
            return;
        };
        let current = trainers
            .values()
            .copied()
            .max()
            .map_or("idle", Phase::label);
        for s in STATES {
            self.trainer_state
                .with_label_values(&[*s])
                .set(i64::from(*s == current));
        }
    }

    /// The text exposition, with the outbox backlog as of now.
    pub fn render(&self, outbox_len: usize) -> String {
        self.outbox
            .set(i64::try_from(outbox_len).unwrap_or(i64::MAX));
        let families = {
            let _state = self.trainers.lock();
            self.registry.gather()
        };
        TextEncoder::new()
            .encode_to_string(&families)
            .unwrap_or_else(|e| format!("# metrics could not be encoded: {e}\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(rank: u32) -> AttemptRank {
        AttemptRank {
            job_id: "0196aaaa-0000-7000-8000-000000000001".into(),
            attempt: 2,
            rank,
        }
    }

    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn a_trainer_goes_starting_running_stopping_then_idle() {
        let m = DaemonMetrics::new("host-a", None);
        let state = |m: &DaemonMetrics| {
            let text = m.render(0);
            STATES
                .iter()
                .filter(|s| {
                    value(
                        &text,
                        &format!("segtrain_worker_trainer_state{{state=\"{s}\"}}"),
                    ) == Some(1.0)
                })
                .copied()
                .collect::<Vec<_>>()
        };
        assert_eq!(state(&m), ["idle"]);
        assert!(m.render(0).contains(&format!(
            "segtrain_worker_info{{gpu=\"cpu\",host=\"host-a\",version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )));
        m.set_phase(&key(1), Phase::Starting);
        assert_eq!(state(&m), ["starting"]);
        let info = "segtrain_worker_trainer_info{attempt=\"2\",job=\"0196aaaa-0000-7000-8000-000000000001\",rank=\"1\"}";
        assert_eq!(value(&m.render(0), info), Some(1.0));
        m.set_phase(&key(1), Phase::Running);
        m.observe(
            7,
            &HashMap::from([
                ("step_ms".to_string(), 120.5),
                ("images_per_s".to_string(), 16.0),
                ("data_wait_ms".to_string(), 3.0),
                ("loss".to_string(), 1.0),
                ("gpu_mem_bytes".to_string(), f64::NAN),
            ]),
        );
        let text = m.render(5);
        assert_eq!(state(&m), ["running"]);
        assert_eq!(value(&text, "segtrain_worker_step_time_ms"), Some(120.5));
        assert_eq!(
            value(&text, "segtrain_worker_images_per_second"),
            Some(16.0)
        );
        assert_eq!(value(&text, "segtrain_worker_data_wait_ms"), Some(3.0));
        assert_eq!(value(&text, "segtrain_worker_iteration"), Some(7.0));
        assert_eq!(value(&text, "segtrain_worker_gpu_memory_bytes"), Some(0.0));
        assert_eq!(value(&text, "segtrain_worker_outbox_events"), Some(5.0));
        m.set_phase(&key(1), Phase::Stopping);
        assert_eq!(state(&m), ["stopping"]);
        m.finished(&key(1), "CANCELED");
        let text = m.render(0);
        assert_eq!(state(&m), ["idle"]);
        assert_eq!(value(&text, info), None, "the info series is gone");
        assert_eq!(value(&text, "segtrain_worker_step_time_ms"), Some(0.0));
        assert_eq!(
            value(
                &text,
                "segtrain_worker_trainer_exits_total{outcome=\"CANCELED\"}"
            ),
            Some(1.0)
        );
    }

    #[test]
    fn running_wins_over_a_stale_trainer_stopping() {
        let m = DaemonMetrics::new("h", Some(3));
        m.set_phase(&key(0), Phase::Stopping);
        m.set_phase(&key(1), Phase::Running);
        let text = m.render(0);
        assert_eq!(
            value(&text, "segtrain_worker_trainer_state{state=\"running\"}"),
            Some(1.0)
        );
        assert_eq!(
            value(&text, "segtrain_worker_trainer_state{state=\"stopping\"}"),
            Some(0.0)
        );
        m.finished(&key(0), "CANCELED");
        m.observe(1, &HashMap::from([("step_ms".to_string(), 9.0)]));
        assert_eq!(
            value(&m.render(0), "segtrain_worker_step_time_ms"),
            Some(9.0),
            "another trainer still runs: its values stay"
        );
    }
}
