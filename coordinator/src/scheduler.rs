//! The scheduler: gang placement of queued jobs onto idle workers (ARCHITECTURE.md, "The path of a job"), and the
//! lease reaper.
//!
//! One tokio task per coordinator. Each pass first declares workers whose lease expired LOST
//! (their attempts fail and the other ranks are told to stop), then places queued jobs:
//!
//! - **Order**: priority (higher first), then submission order.
//! - **Strict FIFO**: when the head of the queue does not fit, nothing behind it is placed, even
//!   a job that would fit. This keeps a large job from starving behind a stream of small ones
//!   (no backfilling); the price is idle workers while the head waits for capacity. Canceling the
//!   head, or submitting something with a higher priority, changes the head.
//! - **Gang**: a job of world size N gets N idle workers with a live lease at once, or none;
//!   an elastic job (`min_world_size < world_size`) that has waited `elastic_wait_seconds` gets
//!   fewer, and grows back once nothing is queued and enough workers are idle
//!   (`store/elastic.rs`). A worker whose daemon said it is leaving gets nothing.
//! - **Fewest hosts**: hosts with the most idle workers are used first; ranks are numbered in
//!   (host, GPU index) order.
//!
//! The placement itself ([`crate::store::Store::schedule_queue`]) is one transaction per
//! [`crate::store::PLACEMENTS_PER_TRANSACTION`] jobs under an advisory lock, on the idle workers
//! the pass read once, booking only workers still free (a raced booking re-reads them), so two
//! coordinators (or two passes) never book a worker twice. Passes run on a short timer and whenever a NOTIFY hint
//! says a job changed state or a worker changed (submit, cancel, register, a rank finishing;
//! not metrics); hints are only hints, the timer covers lost ones.

use crate::store::bus::{self, Bus, Hint};
use crate::store::{Candidate, QueueEnd, Store};
use std::collections::BTreeMap;
use std::time::Duration;
use uuid::Uuid;

/// How the scheduler runs.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// A pass runs at least this often (hints wake it sooner).
    pub interval: Duration,
}

impl Default for SchedulerConfig {
    fn default() -> SchedulerConfig {
        SchedulerConfig {
            interval: Duration::from_secs(1),
        }
    }
}

/// Starts the scheduler task. `lease` is the workers' lease: after this coordinator has been
/// unable to hear heartbeats for that long (at start, or after losing the database), every lease
/// is first extended by it, so daemons get a chance to renew before anyone is declared lost.
pub fn start(
    store: Store,
    bus: &Bus,
    cfg: SchedulerConfig,
    lease: Duration,
) -> tokio::task::JoinHandle<()> {
    let mut wake = bus.subscribe();
    tokio::spawn(async move {
        let mut last_ok: Option<tokio::time::Instant> = None;
        loop {
            let deaf = last_ok.is_none_or(|t| t.elapsed() > lease);
            let result = async {
                if deaf {
                    let n = store.extend_leases(lease).await?;
                    tracing::info!(
                        workers = n,
                        "leases extended after a period without heartbeats"
                    );
                }
                pass(&store).await
            }
            .await;
            match result {
                Ok(_) => last_ok = Some(tokio::time::Instant::now()),
                Err(e) => tracing::warn!(error = %e, "scheduling pass failed; retrying"),
            }
            let until = tokio::time::Instant::now() + cfg.interval;
            bus::wait(&mut wake, until, |h| {
                // Not every event: a metrics report changes nothing a placement reads.
                matches!(h, Hint::JobState(_) | Hint::Worker(_))
            })
            .await;
            // Fold a burst of hints (a batch of events, a gang of workers) into one pass.
            tokio::time::sleep(Duration::from_millis(20)).await;
            while wake.try_recv().is_ok() {}
        }
    })
}

/// One pass: reap expired leases, queue again the restarting jobs whose backoff is over, then
/// place queued jobs until the head does not fit. Returns how many jobs were placed.
pub async fn pass(store: &Store) -> Result<usize, crate::store::StoreError> {
    store.reap_expired_workers().await?;
    store.requeue_restarting().await?;
    let mut placed = 0;
    let mut idle = store.idle_workers().await?;
    let mut rereads = 0;
    loop {
        let (jobs, end) = match store.schedule_queue(&mut idle, place).await {
            Ok(r) => r,
            // A worker read as idle was taken meanwhile: read them again (a few times a pass;
            // another coordinator placing at the same moment is the usual cause).
            Err(crate::store::StoreError::Conflict(why)) if rereads < 3 => {
                tracing::debug!(%why, "placement raced; reading the idle workers again");
                rereads += 1;
                idle = store.idle_workers().await?;
                continue;
            }
            Err(e) => return Err(e),
        };
        for p in &jobs {
            crate::metrics::global()
                .scheduling_latency
                .observe(p.queued_for.as_secs_f64());
            tracing::info!(job = %p.job_id, attempt = p.attempt, world_size = p.workers.len(), queued_ms = p.queued_for.as_millis() as u64, "job scheduled");
        }
        placed += jobs.len();
        match end {
            QueueEnd::More => {}
            QueueEnd::Blocked {
                job_id,
                world_size,
                idle,
            } => {
                tracing::debug!(job = %job_id, world_size, idle, "head of the queue waits for workers");
                return Ok(placed);
            }
            QueueEnd::Empty => {
                // Nothing waits: shrunk elastic jobs may take the idle workers back.
                for job_id in store.grow_shrunk_jobs().await? {
                    tracing::info!(job = %job_id, "elastic job grows back to its world size");
                }
                return Ok(placed);
            }
        }
    }
}

/// Gang placement: `n` of the idle `workers`, or `None` when fewer are idle. Hosts with the most
/// idle workers are taken first (ties by host name), so the job spans as few hosts as possible;
/// within the last host the lowest GPU indices are taken. The result is in rank order: by host
/// name, then GPU index.
pub fn place(workers: &[Candidate], n: usize) -> Option<Vec<Uuid>> {
    if n == 0 || workers.len() < n {
        return None;
    }
    let mut by_host: BTreeMap<&str, Vec<&Candidate>> = BTreeMap::new();
    for w in workers {
        by_host.entry(w.host.as_str()).or_default().push(w);
    }
    let mut hosts: Vec<(&str, Vec<&Candidate>)> = by_host.into_iter().collect();
    // Most idle first; the sort is stable, so equal hosts stay in name order.
    hosts.sort_by_key(|h| std::cmp::Reverse(h.1.len()));
    let mut chosen: Vec<&Candidate> = Vec::with_capacity(n);
    for (_, mut ws) in hosts {
        ws.sort_by_key(|w| w.gpu_index);
        let take = (n - chosen.len()).min(ws.len());
        chosen.extend(ws.into_iter().take(take));
        if chosen.len() == n {
            break;
        }
    }
    chosen.sort_by(|a, b| (&a.host, a.gpu_index).cmp(&(&b.host, b.gpu_index)));
    Some(chosen.into_iter().map(|w| w.id).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cands(spec: &[(&str, i32)]) -> Vec<Candidate> {
        spec.iter()
            .enumerate()
            .map(|(i, (h, g))| Candidate {
                id: Uuid::from_u128(i as u128 + 1),
                host: h.to_string(),
                gpu_index: *g,
            })
            .collect()
    }

    fn names(ws: &[Candidate], ids: &[Uuid]) -> Vec<String> {
        ids.iter()
            .map(|id| {
                let w = ws.iter().find(|w| w.id == *id).expect("chosen from input");
                crate::store::worker_name(&w.host, w.gpu_index)
            })
            .collect()
    }

    #[test]
    fn all_or_none() {
        let ws = cands(&[("a", 0), ("a", 1)]);
        assert_eq!(place(&ws, 3), None);
        assert_eq!(place(&ws, 0), None);
        assert_eq!(place(&ws, 2).map(|v| v.len()), Some(2));
    }

    #[test]
    fn fewest_hosts_first() {
        let ws = cands(&[("a", 0), ("b", 0), ("b", 1), ("b", 2), ("c", 0), ("c", 1)]);
        assert_eq!(names(&ws, &place(&ws, 3).unwrap()), ["b:0", "b:1", "b:2"]);
        assert_eq!(
            names(&ws, &place(&ws, 4).unwrap()),
            ["b:0", "b:1", "b:2", "c:0"]
        );
        assert_eq!(names(&ws, &place(&ws, 2).unwrap()), ["b:0", "b:1"]);
        assert_eq!(names(&ws, &place(&ws, 6).unwrap()).len(), 6);
    }

    #[test]
    fn ranks_in_host_then_gpu_order_and_distinct() {
        let ws = cands(&[("z", 3), ("z", 1), ("y", 7), ("y", 0), ("z", 2)]);
        let got = place(&ws, 5).unwrap();
        assert_eq!(names(&ws, &got), ["y:0", "y:7", "z:1", "z:2", "z:3"]);
        let mut ids = got.clone();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 5);
    }
}
