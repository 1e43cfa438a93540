//! WatchJob: a job's event log as a live, resumable stream.
//!
//! Each watcher reads the log from its cursor, then sleeps until a NOTIFY says its job has a new
//! event (or a poll interval passes: notifications are only hints and are lost while the listener
//! reconnects), and reads again. The stream ends once the job is terminal and everything up to its
//! final event has been sent.

use super::{convert, status_of};
use crate::store::{Store, EVENTS_CHANNEL};
use segtrain_proto::v1 as pb;
use std::time::Duration;
use tokio::sync::broadcast;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use uuid::Uuid;

const BATCH: i64 = 500;

/// Fans the NOTIFYs of the events channel out to every watcher in this process.
#[derive(Clone)]
pub struct EventHub {
    tx: broadcast::Sender<Uuid>,
    /// Watchers re-read at least this often (`--poll-interval-ms`).
    poll: Duration,
}

impl EventHub {
    /// Starts the listener task. It reconnects by itself; watchers poll every `poll` meanwhile
    /// (and always: a NOTIFY is only a hint).
    pub fn start(store: &Store, poll: Duration) -> EventHub {
        let (tx, _) = broadcast::channel(1024);
        let hub = EventHub {
            tx: tx.clone(),
            poll,
        };
        // A side connection: LISTEN holds it for good, and must not take one of the RPCs'.
        let pool = store.side_pool().clone();
        tokio::spawn(async move {
            loop {
                match listen(&pool, &tx).await {
                    Ok(()) => return,
                    Err(e) => {
                        tracing::warn!(error = %e, "event listener lost its connection; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        });
        hub
    }

    fn subscribe(&self) -> broadcast::Receiver<Uuid> {
        self.tx.subscribe()
    }
}

async fn listen(pool: &sqlx::PgPool, tx: &broadcast::Sender<Uuid>) -> Result<(), sqlx::Error> {
    let mut listener = sqlx::postgres::PgListener::connect_with(pool).await?;
    listener.listen(EVENTS_CHANNEL).await?;
    loop {
        let n = listener.recv().await?;
        if let Ok(id) = Uuid::parse_str(n.payload()) {
            // No receivers is fine: nobody is watching.
            let _ = tx.send(id);
        }
    }
}

/// The stream of one job's events after `after`.
pub(crate) fn watch_job(
    store: Store,
    hub: EventHub,
    job: Uuid,
    after: i64,
) -> ReceiverStream<Result<pb::JobEvent, Status>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let mut wake = hub.subscribe();
    let poll = hub.poll;
    tokio::spawn(async move {
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
            wait_for(&mut wake, job, &tx, poll).await;
            if tx.is_closed() {
                return;
            }
        }
    });
    ReceiverStream::new(rx)
}

/// Sleeps until this job is notified, the poll interval passes, or the client leaves.
async fn wait_for<T>(
    wake: &mut broadcast::Receiver<Uuid>,
    job: Uuid,
    client: &tokio::sync::mpsc::Sender<T>,
    poll: Duration,
) {
    let deadline = tokio::time::sleep(poll);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = &mut deadline => return,
            _ = client.closed() => return,
            msg = wake.recv() => match msg {
                Ok(id) if id == job => return,
                Ok(_) => {}
                // Missed some notifications: re-read to be safe.
                Err(broadcast::error::RecvError::Lagged(_)) => return,
                Err(broadcast::error::RecvError::Closed) => {
                    tokio::time::sleep(poll).await;
                    return;
                }
            },
        }
    }
}
