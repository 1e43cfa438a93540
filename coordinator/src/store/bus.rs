//! The NOTIFY bus: what the store's transactions announce (a job's new event, a worker's
//! change, an attempt's change), fanned out to the tasks of this coordinator that wait on it.
//! The scheduler hears every hint ([`Bus::subscribe`]); a stream hears only the hints it
//! registered for ([`Bus::interest`]): with 10,000 assignment streams, a placement must wake the
//! few it concerns, not all of them.
//!
//! A hint only: NOTIFYs are lost while the LISTEN connection reconnects (every interest is woken
//! once it is back), and a burst may lag the scheduler, so every waiter also wakes on a timer
//! and always re-reads the tables.

use super::{Store, StoreError};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::sync::{broadcast, Notify};
use tokio::time::Instant;
use uuid::Uuid;

/// The channel that carries a job id whenever that job gets a new event.
pub const EVENTS_CHANNEL: &str = "segtrain_job_events";
/// The channel that carries a job id whenever that job changes state (a subset of
/// [`EVENTS_CHANNEL`]: what the scheduler and the assignment streams need, without the metrics).
pub const STATES_CHANNEL: &str = "segtrain_job_states";
/// The channel that carries a worker id whenever that worker registers, gets an assignment or
/// becomes free again.
pub const WORKERS_CHANNEL: &str = "segtrain_workers";
/// The channel that carries a job id whenever one of its attempts changes state or gets its
/// rendezvous endpoint.
pub const ATTEMPTS_CHANNEL: &str = "segtrain_attempts";

/// One NOTIFY, by channel: something about this job / worker changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Hint {
    /// A job got a new event ([`EVENTS_CHANNEL`]).
    Job(Uuid),
    /// A job changed state ([`STATES_CHANNEL`]; it also got a `Job` hint).
    JobState(Uuid),
    /// A worker registered, got an assignment or became free ([`WORKERS_CHANNEL`]).
    Worker(Uuid),
    /// An attempt of this job changed state or got its rendezvous ([`ATTEMPTS_CHANNEL`]).
    Attempt(Uuid),
}

/// The bus of one coordinator process: one LISTEN connection for every channel.
#[derive(Clone)]
pub struct Bus {
    tx: broadcast::Sender<Hint>,
    /// Who waits for which hint (dead waiters are dropped as they are met).
    keyed: Arc<Mutex<HashMap<Hint, Vec<Weak<Notify>>>>>,
}

impl Bus {
    /// Starts the listener task; it reconnects by itself (waiters poll meanwhile).
    pub fn start(store: &Store) -> Bus {
        let bus = Bus::new();
        let task = bus.clone();
        // A side connection: LISTEN holds it for good, and must not take one of the RPCs'.
        let pool = store.side_pool().clone();
        tokio::spawn(async move {
            loop {
                if let Err(e) = listen(&pool, &task).await {
                    tracing::warn!(error = %e, "the NOTIFY listener lost its connection; retrying");
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        bus
    }

    fn new() -> Bus {
        let (tx, _) = broadcast::channel(4096);
        Bus {
            tx,
            keyed: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Every hint (the scheduler's view).
    pub fn subscribe(&self) -> broadcast::Receiver<Hint> {
        self.tx.subscribe()
    }

    /// A waiter that only these hints wake ([`Interest::set`] changes them).
    pub fn interest(&self, hints: impl IntoIterator<Item = Hint>) -> Interest {
        let mut i = Interest {
            bus: self.clone(),
            notify: Arc::new(Notify::new()),
            hints: Vec::new(),
        };
        i.set(hints);
        i
    }

    fn deliver(&self, hint: Hint) {
        let _ = self.tx.send(hint); // no receivers: nobody waits
        let Ok(mut keyed) = self.keyed.lock() else {
            return;
        };
        if let Some(waiters) = keyed.get_mut(&hint) {
            waiters.retain(|w| match w.upgrade() {
                Some(n) => {
                    n.notify_one();
                    true
                }
                None => false,
            });
            if waiters.is_empty() {
                keyed.remove(&hint);
            }
        }
    }

    /// After the listener reconnected: hints may have been lost, so every waiter re-reads.
    fn wake_everyone(&self) {
        if let Ok(keyed) = self.keyed.lock() {
            for n in keyed.values().flatten().filter_map(Weak::upgrade) {
                n.notify_one();
            }
        }
    }
}

/// What one stream waits for. A hint that arrives while the stream is busy is kept (one
/// permit), so the next [`Interest::wait`] returns at once: none is lost between a read and
/// the wait that follows it.
pub struct Interest {
    bus: Bus,
    notify: Arc<Notify>,
    hints: Vec<Hint>,
}

impl Interest {
    /// Waits for these hints from now on (instead of the previous ones).
    pub fn set(&mut self, hints: impl IntoIterator<Item = Hint>) {
        let mut hints: Vec<Hint> = hints.into_iter().collect();
        hints.sort();
        hints.dedup();
        if hints == self.hints {
            return;
        }
        self.unregister();
        if let Ok(mut keyed) = self.bus.keyed.lock() {
            for h in &hints {
                keyed
                    .entry(*h)
                    .or_default()
                    .push(Arc::downgrade(&self.notify));
            }
        }
        self.hints = hints;
    }

    /// Sleeps until one of its hints arrives (or arrived since the last wait), or `until`.
    pub async fn wait(&self, until: Instant) {
        tokio::select! {
            _ = self.notify.notified() => {}
            _ = tokio::time::sleep_until(until) => {}
        }
    }

    fn unregister(&mut self) {
        let Ok(mut keyed) = self.bus.keyed.lock() else {
            return;
        };
        let me = Arc::as_ptr(&self.notify);
        for h in &self.hints {
            if let Some(waiters) = keyed.get_mut(h) {
                waiters.retain(|w| w.as_ptr() != me);
                if waiters.is_empty() {
                    keyed.remove(h);
                }
            }
        }
    }
}

impl Drop for Interest {
    fn drop(&mut self) {
        self.unregister();
    }
}

async fn listen(pool: &sqlx::PgPool, bus: &Bus) -> Result<(), sqlx::Error> {
    let mut listener = sqlx::postgres::PgListener::connect_with(pool).await?;
    listener
        .listen_all([
            EVENTS_CHANNEL,
            STATES_CHANNEL,
            WORKERS_CHANNEL,
            ATTEMPTS_CHANNEL,
        ])
        .await?;
    // Listening again: what was announced while nobody listened is lost.
    bus.wake_everyone();
    loop {
        let n = listener.recv().await?;
        let Ok(id) = Uuid::parse_str(n.payload()) else {
            continue;
        };
        let hint = match n.channel() {
            EVENTS_CHANNEL => Hint::Job(id),
            STATES_CHANNEL => Hint::JobState(id),
            WORKERS_CHANNEL => Hint::Worker(id),
            ATTEMPTS_CHANNEL => Hint::Attempt(id),
            _ => continue,
        };
        bus.deliver(hint);
    }
}

/// Sleeps until `until`, or until a hint that `wanted` accepts arrives, or hints were lost (the
/// receiver lagged: the caller re-reads to be safe).
pub async fn wait(
    wake: &mut broadcast::Receiver<Hint>,
    until: Instant,
    wanted: impl Fn(Hint) -> bool,
) {
    let deadline = tokio::time::sleep_until(until);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = &mut deadline => return,
            msg = wake.recv() => match msg {
                Ok(h) if wanted(h) => return,
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(_)) => return,
                Err(broadcast::error::RecvError::Closed) => {
                    (&mut deadline).await;
                    return;
                }
            },
        }
    }
}

/// `pg_notify` inside a transaction: delivered at commit (so a waiter woken by it finds the
/// rows), folded with identical ones.
pub(super) async fn notify(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    channel: &str,
    id: Uuid,
) -> Result<(), StoreError> {
    notify_each(tx, channel, &[id]).await
}

/// [`notify`] for each id, in one statement (a placement wakes every worker it booked).
pub(super) async fn notify_each(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    channel: &str,
    ids: &[Uuid],
) -> Result<(), StoreError> {
    sqlx::query("SELECT pg_notify($1, id::text) FROM unnest($2::uuid[]) AS id")
        .bind(channel)
        .bind(ids)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn soon() -> Instant {
        Instant::now() + Duration::from_millis(200)
    }

    #[tokio::test]
    async fn an_interest_wakes_for_its_hints_only_and_keeps_one_that_came_early() {
        let bus = Bus::new();
        let (job, other) = (Uuid::now_v7(), Uuid::now_v7());
        let mut i = bus.interest([Hint::JobState(job)]);
        // Another job's, or another kind for this job: no wake.
        bus.deliver(Hint::JobState(other));
        bus.deliver(Hint::Job(job));
        let t = Instant::now();
        i.wait(soon()).await;
        assert!(
            t.elapsed() >= Duration::from_millis(190),
            "woken by a hint it did not want"
        );
        // Its own, sent before it waits: the wait returns at once.
        bus.deliver(Hint::JobState(job));
        let t = Instant::now();
        i.wait(Instant::now() + Duration::from_secs(5)).await;
        assert!(t.elapsed() < Duration::from_secs(1));
        // After set, the old hint no longer wakes it and the new one does.
        i.set([Hint::Worker(other)]);
        bus.deliver(Hint::JobState(job));
        let t = Instant::now();
        i.wait(soon()).await;
        assert!(t.elapsed() >= Duration::from_millis(190));
        bus.deliver(Hint::Worker(other));
        let t = Instant::now();
        i.wait(Instant::now() + Duration::from_secs(5)).await;
        assert!(t.elapsed() < Duration::from_secs(1));
        // A reconnect wakes everyone; a dropped interest leaves nothing registered.
        bus.wake_everyone();
        let t = Instant::now();
        i.wait(Instant::now() + Duration::from_secs(5)).await;
        assert!(t.elapsed() < Duration::from_secs(1));
        drop(i);
        assert!(bus.keyed.lock().map(|k| k.is_empty()).unwrap_or(false));
    }
}
