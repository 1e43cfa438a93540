//! WatchJob: a job's event log as a live, resumable stream.
//!
//! Each watcher reads the log from its cursor, then sleeps until a NOTIFY says its job has a new
//! event (or a poll interval passes: notifications are only hints and are lost while the listener
//! reconnects), and reads again. The stream ends once the job is terminal and everything up to its
//! final event has been sent.

use super::{convert, status_of};
use crate::limits::{WatchQuota, WatchSlot};
use crate::store::bus::{Bus, Hint, Interest};
use crate::store::Store;
use segtrain_proto::v1 as pb;
use std::time::Duration;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use uuid::Uuid;

const BATCH: i64 = 500;

/// What a WatchJob stream needs: the NOTIFY bus, how often it re-reads without a hint
/// (`--poll-interval-ms`), and the per-token quota of open streams (shared by gRPC and the
/// dashboard).
#[derive(Clone)]
pub struct Watchers {
    pub bus: Bus,
    pub poll: Duration,
    pub quota: WatchQuota,
}

/// The stream of one job's events after `after`; it holds `slot` (its place in the caller's
/// quota) until it ends.
pub(crate) fn watch_job(
    store: Store,
    watchers: Watchers,
    job: Uuid,
    after: i64,
    slot: Option<WatchSlot>,
) -> ReceiverStream<Result<pb::JobEvent, Status>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let wake = watchers.bus.interest([Hint::Job(job)]);
    let poll = watchers.poll;
    tokio::spawn(async move {
        let _slot = slot;
        let mut cursor = after;
        loop {
            let events = match store.events_after(job, cursor, BATCH).await {
                Ok(e) => e,
                Err(e) => {
                    let _ = tx.send(Err(status_of(e))).await;
                    return;
                }
            };
            for e in &events {
                if tx.send(Ok(convert::event(e))).await.is_err() {
                    return; // the client went away
                }
                cursor = e.id;
            }
            if events.len() as i64 == BATCH {
                continue;
            }
            // The terminal state change is written with its event in one transaction, so once the
            // job reads as terminal, one more read finds every remaining event.
            match store.get_job(job).await {
                Ok(j) if j.state.is_terminal() => {
                    if let Ok(rest) = store.events_after(job, cursor, i64::MAX).await {
                        for e in &rest {
                            if tx.send(Ok(convert::event(e))).await.is_err() {
                                return;
                            }
                        }
                    }
                    return;
                }
                Ok(_) => {}
                Err(e) => {
                    let _ = tx.send(Err(status_of(e))).await;
                    return;
                }
            }
            wait_for(&wake, &tx, poll).await;
            if tx.is_closed() {
                return;
            }
        }
    });
    ReceiverStream::new(rx)
}

/// Sleeps until this job is notified, the poll interval passes, or the client leaves.
async fn wait_for<T>(wake: &Interest, client: &tokio::sync::mpsc::Sender<T>, poll: Duration) {
    let until = tokio::time::Instant::now() + poll;
    tokio::select! {
        _ = client.closed() => {}
        _ = wake.wait(until) => {}
    }
}
