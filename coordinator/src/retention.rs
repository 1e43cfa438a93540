//! `segtrain-coordinator prune`: the events and metric points of jobs that finished long ago are
//! deleted (dry run unless `--apply`), optionally archived first, so the two tables that grow
//! with every iteration do not grow for ever (docs/operations.md, "Retention").

use crate::store::{JobHistory, Prunable, Store};
use anyhow::Context;
use chrono::{DateTime, Utc};
use std::io::Write;
use std::path::{Path, PathBuf};

/// `--older-than`: a whole number of days, hours or minutes (`90d`, `12h`, `30m`), at least an
/// hour (a smaller age is more likely a typo than a wish).
pub fn parse_age(s: &str) -> Result<chrono::Duration, String> {
    let bad = || {
        format!(
            "--older-than: a duration such as 90d, 12h or 30m (d: days, h: hours, m: minutes), \
             at least 1h, got {s:?}"
        )
    };
    let s = s.trim();
    let unit = s.chars().last().ok_or_else(bad)?;
    let n: i64 = s[..s.len() - unit.len_utf8()].parse().map_err(|_| bad())?;
    let age = match unit {
        'd' if n <= 36_500 => chrono::Duration::days(n),
        'h' if n <= 876_000 => chrono::Duration::hours(n),
        'm' if n <= 52_560_000 => chrono::Duration::minutes(n),
        _ => return Err(bad()),
    };
    if age < chrono::Duration::hours(1) {
        return Err(bad());
    }
    Ok(age)
}

pub struct PruneOptions {
    pub older_than: chrono::Duration,
    /// Delete; without it, only say what would be deleted.
    pub apply: bool,
    /// Write each job's events and points to `DIR/<job id>.jsonl` before deleting them.
    pub archive: Option<PathBuf>,
}

/// What a run found, and with `apply`, deleted.
pub struct PruneReport {
    pub before: DateTime<Utc>,
    pub applied: bool,
    pub jobs: Vec<Prunable>,
    /// With `apply`: (events, points) deleted in all.
    pub deleted: (u64, u64),
}

pub async fn prune(store: &Store, opts: &PruneOptions) -> anyhow::Result<PruneReport> {
    let before = Utc::now() - opts.older_than;
    let jobs = store.prunable_jobs(before).await?;
    let mut deleted = (0, 0);
    if opts.apply {
        if let Some(dir) = &opts.archive {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("--archive {}: cannot create it", dir.display()))?;
        }
        let note = match &opts.archive {
            Some(dir) => format!(
                "events and metric points before {} pruned by segtrain-coordinator prune; archived in {}",
                before.format("%Y-%m-%d %H:%M UTC"),
                dir.display()
            ),
            None => format!(
                "events and metric points before {} pruned by segtrain-coordinator prune",
                before.format("%Y-%m-%d %H:%M UTC")
            ),
        };
        for job in &jobs {
            if let Some(dir) = &opts.archive {
                let history = store.job_history(job.job_id).await?;
                archive(dir, job, &history)?;
            }
            if let Some((e, m)) = store.prune_job(job.job_id, before, &note).await? {
                deleted.0 += e;
                deleted.1 += m;
            }
        }
    }
    Ok(PruneReport {
        before,
        applied: opts.apply,
        jobs,
        deleted,
    })
}

/// Writes `DIR/<job>.jsonl` (a `job` line, then one line per event and per point) through a
/// temporary file, fsynced and renamed, so an archive that exists is whole.
fn archive(dir: &Path, job: &Prunable, h: &JobHistory) -> anyhow::Result<()> {
    let path = dir.join(format!("{}.jsonl", job.job_id));
    let tmp = dir.join(format!(".{}.jsonl.tmp", job.job_id));
    let write = || -> std::io::Result<()> {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        let head = serde_json::json!({"job": {
            "id": job.job_id.to_string(), "name": job.name, "state": job.state,
            "finished_at": job.finished_at.to_rfc3339(),
        }});
        writeln!(f, "{head}")?;
        for (id, attempt, kind, payload, at) in &h.events {
            let line = serde_json::json!({"event": {
                "id": id, "attempt": attempt, "kind": kind, "payload": payload,
                "created_at": at.to_rfc3339(),
            }});
            writeln!(f, "{line}")?;
        }
        for (attempt, iteration, name, value) in &h.metrics {
            // JSON has no NaN or infinity: those are written as strings.
            let value = if value.is_finite() {
                serde_json::json!(value)
            } else {
                serde_json::json!(value.to_string())
            };
            let line = serde_json::json!({"metric": {
                "attempt": attempt, "iteration": iteration, "name": name, "value": value,
            }});
            writeln!(f, "{line}")?;
        }
        let f = f.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)
    };
    write().with_context(|| format!("--archive: cannot write {}", path.display()))
}

impl PruneReport {
    /// For people: the totals, then a line per job.
    pub fn text(&self) -> String {
        let events: i64 = self.jobs.iter().map(|j| j.events).sum();
        let metrics: i64 = self.jobs.iter().map(|j| j.metrics).sum();
        let before = self.before.format("%Y-%m-%d %H:%M UTC");
        let mut out = if self.applied {
            format!(
                "pruned {} finished job(s) that ended before {before}: {} events and {} metric points deleted\n",
                self.jobs.len(),
                self.deleted.0,
                self.deleted.1
            )
        } else {
            format!(
                "dry run: {} finished job(s) ended before {before}, holding {events} events and \
                 {metrics} metric points; nothing deleted (run again with --apply to delete them, \
                 --archive DIR to keep a copy)\n",
                self.jobs.len()
            )
        };
        for j in &self.jobs {
            out += &format!(
                "  {}  {:<24} {:<9} ended {}  {} events  {} points\n",
                j.job_id,
                j.name,
                j.state,
                j.finished_at.format("%Y-%m-%d"),
                j.events,
                j.metrics
            );
        }
        out
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "before": self.before.to_rfc3339(),
            "applied": self.applied,
            "deleted_events": self.deleted.0,
            "deleted_metrics": self.deleted.1,
            "jobs": self.jobs.iter().map(|j| serde_json::json!({
                "id": j.job_id.to_string(), "name": j.name, "state": j.state,
                "finished_at": j.finished_at.to_rfc3339(), "events": j.events, "metrics": j.metrics,
            })).collect::<Vec<_>>(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::parse_age;

    #[test]
    fn ages_are_days_hours_or_minutes_of_at_least_an_hour() {
        assert_eq!(parse_age("90d"), Ok(chrono::Duration::days(90)));
        assert_eq!(parse_age("12h"), Ok(chrono::Duration::hours(12)));
        assert_eq!(parse_age("60m"), Ok(chrono::Duration::hours(1)));
        for bad in [
            "",
            "d",
            "90",
            "90x",
            "-1d",
            "30m",
            "0d",
            "1.5d",
            "999999999d",
            "9d9",
        ] {
            let e = parse_age(bad).expect_err(bad);
            assert!(
                e.starts_with("--older-than:") && e.contains("90d"),
                "{bad}: {e}"
            );
        }
    }
}
