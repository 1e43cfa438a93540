//! Latency samples and counters shared by the generator's tasks.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Samples of one latency, in milliseconds.
#[derive(Default)]
pub struct Latency(Mutex<Vec<f64>>);

impl Latency {
    pub fn record(&self, d: Duration) {
        self.record_ms(d.as_secs_f64() * 1e3);
    }

    pub fn record_ms(&self, ms: f64) {
        if let Ok(mut v) = self.0.lock() {
            v.push(ms);
        }
    }

    /// (p50, p99) in ms; NaN with no samples.
    pub fn p50_p99(&self) -> (f64, f64) {
        let mut v = self.0.lock().map(|v| v.clone()).unwrap_or_default();
        if v.is_empty() {
            return (f64::NAN, f64::NAN);
        }
        v.sort_by(|a, b| a.total_cmp(b));
        let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
        (at(0.50), at(0.99))
    }

    pub fn count(&self) -> usize {
        self.0.lock().map(|v| v.len()).unwrap_or(0)
    }
}

/// Everything one run measures.
#[derive(Default)]
pub struct Stats {
    pub heartbeat: Latency,
    pub report_events: Latency,
    pub submit_to_running: Latency,
    pub watch_delay: Latency,
    pub metric_points: AtomicU64,
    pub errors: AtomicU64,
    /// The first error of each kind, for the report.
    pub first_errors: Mutex<Vec<String>>,
    /// Assignment starts received (rank 0s), with when.
    pub placements: Mutex<Vec<std::time::Instant>>,
}

impl Stats {
    pub fn error(&self, what: &str, e: &tonic::Status) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut f) = self.first_errors.lock() {
            if f.len() < 10 {
                f.push(format!("{what}: {:?} {}", e.code(), e.message()));
            }
        }
    }
}
