//! The NOTIFY bus: what the store's transactions announce (a job's new event, a worker's
//! change, an attempt's change), fanned out to every task of this coordinator that waits on it
//! (the scheduler, WatchJob streams, assignment streams, rendezvous waiters).
//!
//! A hint only: NOTIFYs are lost while the LISTEN connection reconnects, and a burst may lag a
//! slow receiver, so every waiter also wakes on a timer and always re-reads the tables.

use super::{Store, StoreError};
use std::time::Duration;
use tokio::sync::broadcast;
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
}

impl Bus {
    /// Starts the listener task; it reconnects by itself (waiters poll meanwhile).
    pub fn start(store: &Store) -> Bus {
        let (tx, _) = broadcast::channel(4096);
        let bus = Bus { tx: tx.clone() };
        // A side connection: LISTEN holds it for good, and must not take one of the RPCs'.
        let pool = store.side_pool().clone();
        tokio::spawn(async move {
            loop {
                if let Err(e) = listen(&pool, &tx).await {
                    tracing::warn!(error = %e, "the NOTIFY listener lost its connection; retrying");
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        bus
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Hint> {
        self.tx.subscribe()
    }
}

async fn listen(pool: &sqlx::PgPool, tx: &broadcast::Sender<Hint>) -> Result<(), sqlx::Error> {
    let mut listener = sqlx::postgres::PgListener::connect_with(pool).await?;
    listener
        .listen_all([
            EVENTS_CHANNEL,
            STATES_CHANNEL,
            WORKERS_CHANNEL,
            ATTEMPTS_CHANNEL,
        ])
        .await?;
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
        let _ = tx.send(hint); // no receivers: nobody waits
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
