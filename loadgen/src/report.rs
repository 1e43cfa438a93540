//! The generator's table, and appending it to a results file with the date and the machine.

use crate::stats::Stats;
use segtrain_telemetry::host;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

pub struct Report<'a> {
    pub workers: usize,
    pub jobs: usize,
    /// (succeeded, not), or why they could not be counted.
    pub outcome: Result<(usize, usize), String>,
    pub wall: Duration,
    pub false_lease_expiries: Result<usize, String>,
    pub stats: &'a Stats,
}

fn ms(v: (f64, f64)) -> String {
    format!("{:.1} / {:.1}", v.0, v.1)
}

impl Report<'_> {
    pub fn render(&self) -> String {
        let s = self.stats;
        let secs = self.wall.as_secs_f64().max(1e-9);
        let placements = s.placements.lock().map(|p| p.clone()).unwrap_or_default();
        let placement_rate = match (placements.iter().min(), placements.iter().max()) {
            (Some(a), Some(b)) if placements.len() > 1 => {
                (placements.len() - 1) as f64 / (*b - *a).as_secs_f64().max(1e-9)
            }
            _ => f64::NAN,
        };
        let rows = [
            ("simulated GPUs (workers)", self.workers.to_string()),
            (
                "jobs (succeeded / not)",
                match &self.outcome {
                    Ok((ok, not)) => format!("{} ({ok} / {not})", self.jobs),
                    Err(e) => format!("{} (unknown: {e})", self.jobs),
                },
            ),
            ("wall time, s", format!("{secs:.1}")),
            ("placements/s", format!("{placement_rate:.1}")),
            (
                "submit -> RUNNING p50 / p99, ms",
                ms(s.submit_to_running.p50_p99()),
            ),
            (
                "Heartbeat p50 / p99, ms",
                format!(
                    "{} ({} calls)",
                    ms(s.heartbeat.p50_p99()),
                    s.heartbeat.count()
                ),
            ),
            (
                "ReportEvents p50 / p99, ms",
                format!(
                    "{} ({} calls)",
                    ms(s.report_events.p50_p99()),
                    s.report_events.count()
                ),
            ),
            (
                "metric points ingested/s",
                format!(
                    "{:.0}",
                    s.metric_points.load(Ordering::Relaxed) as f64 / secs
                ),
            ),
            (
                "WatchJob event -> client p50 / p99, ms",
                ms(s.watch_delay.p50_p99()),
            ),
            (
                "false lease expiries",
                match &self.false_lease_expiries {
                    Ok(n) => n.to_string(),
                    Err(e) => format!("unknown: {e}"),
                },
            ),
            ("errors", s.errors.load(Ordering::Relaxed).to_string()),
        ];
        let mut out = String::from("| measure | value |\n|---|---|\n");
        for (k, v) in rows {
            out.push_str(&format!("| {k} | {v} |\n"));
        }
        out
    }
}

/// This machine in one line: CPU model and cores.
fn machine() -> String {
    format!("{}, {} cores", host::cpu_model(), host::cores())
}

/// Appends the table under a heading with the date, the machine, the label and the flags.
pub fn append(path: &Path, label: &str, flags: &str, table: &str) -> anyhow::Result<()> {
    use anyhow::Context;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    writeln!(
        f,
        "\n### segtrain-loadgen {label} ({}, {})\n\n`{flags}`; coordinator, PostgreSQL and the \
         generator on this one machine.\n\n{table}",
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC"),
        machine()
    )
    .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}
