//! The outbox on its way to the coordinator, and what each refusal means. Events go in order,
//! one (job, attempt) run per ReportEvents call. A refusal is one of:
//!
//! - transient (UNAVAILABLE, a timeout, ...): keep everything, retry with backoff;
//! - a stale attempt (FAILED_PRECONDITION with the STALE_ATTEMPT reason): drop that attempt's
//!   events, nobody else's;
//! - this daemon replaced (WORKER_SUPERSEDED), or not proven (INSTANCE_SECRET): stop;
//! - an event the coordinator can never store (INVALID_ARGUMENT, OUT_OF_RANGE, a
//!   FAILED_PRECONDITION without a reason): the batch is narrowed to one event at a time until
//!   the refused one is found; that one is skipped, counted, logged and replaced by a note on the
//!   job (in its place, so it arrives before the job ends), and the rest flow. A refused
//!   `finished` is sent again without its reason, so a job never waits for a rank that has
//!   ended.

use super::Shared;
use segtrain_proto::refusal;
use segtrain_proto::v1 as pb;
use std::sync::Arc;
use std::time::Duration;
use tonic::{Code, Status};

/// What the daemon does about a refused ReportEvents call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Keep the events and send them again later.
    Retry,
    /// The coordinator does not know this worker: register, then send again.
    Register,
    /// The attempt is over: drop its events.
    StaleAttempt,
    /// Another daemon instance holds this worker: stop.
    Superseded,
    /// Something in the batch can never be stored.
    Permanent,
}

pub fn refusal_of(e: &Status) -> Refusal {
    match (e.code(), refusal::reason(e).as_deref()) {
        (_, Some(refusal::WORKER_SUPERSEDED | refusal::WORKER_HELD | refusal::INSTANCE_SECRET)) => {
            Refusal::Superseded
        }
        (Code::FailedPrecondition, Some(refusal::STALE_ATTEMPT)) => Refusal::StaleAttempt,
        (Code::NotFound, _) => Refusal::Register,
        (Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange, _) => {
            Refusal::Permanent
        }
        _ => Refusal::Retry,
    }
}

/// Which kind of event, for logs and notes.
fn kind(e: &pb::WorkerEvent) -> String {
    use pb::worker_event::Payload;
    match &e.payload {
        Some(Payload::Started(_)) => "started".into(),
        Some(Payload::Metrics(m)) => format!("metrics event of iteration {}", m.iteration),
        Some(Payload::Eval(v)) => format!("eval event of iteration {}", v.iteration),
        Some(Payload::Checkpoint(c)) => format!(
            "checkpoint event of iteration {}",
            c.checkpoint.as_ref().map_or(0, |c| c.iteration)
        ),
        Some(Payload::CheckpointPending(c)) => {
            format!("checkpoint_pending event of iteration {}", c.iteration)
        }
        Some(Payload::CheckpointsDeleted(_)) => "checkpoints_deleted event".into(),
        Some(Payload::Resumed(r)) => format!("resumed event of iteration {}", r.iteration),
        Some(Payload::Note(_)) => "note".into(),
        Some(Payload::Finished(_)) => "finished event".into(),
        None => "empty event".into(),
    }
}

/// Skips one event the coordinator can never store; says so on the job, in its place.
fn skip(shared: &Shared, ev: &pb::WorkerEvent, e: &Status) {
    use pb::worker_event::Payload;
    shared.metrics.events_refused.inc();
    let what = kind(ev);
    tracing::warn!(job = %ev.job_id, attempt = ev.attempt, rank = ev.rank, seq = ev.seq, event = %what, error = %e.message(), "the coordinator refused an event; dropped it, keeping the others");
    let note = |text: String| {
        Payload::Note(pb::Note {
            text: super::wire_text(&text),
        })
    };
    let instead = match &ev.payload {
        // A note about a refused note could be refused the same way: only logged.
        Some(Payload::Note(_)) => None,
        // The rank's end must arrive, or the job waits for it for ever: again, without the
        // reason (the likeliest culprit). An empty reason refused is not sent a third time.
        Some(Payload::Finished(f)) if !f.reason.is_empty() => {
            Some(Payload::Finished(pb::RankFinished {
                outcome: f.outcome,
                reason: String::new(),
            }))
        }
        _ => Some(note(format!(
            "the coordinator refused the {what} of rank {} and it was dropped ({}); the events after it were kept",
            ev.rank,
            e.message()
        ))),
    };
    if let Ok(mut o) = shared.outbox.lock() {
        match instead {
            Some(p) => o.replace(ev.seq, p),
            None => o.remove(ev.seq),
        }
    }
}

/// Who a batch is sent as: this daemon, or (its leftovers) the instance it succeeds.
#[derive(Debug, Clone)]
pub(crate) struct Sender {
    pub worker_id: String,
    pub instance_id: String,
    pub instance_secret: String,
}

/// What sending the next batch did.
enum Sent {
    /// The outbox is empty.
    Empty,
    /// Acknowledged, or handled here (a stale attempt dropped, a refused event skipped).
    Done,
    /// Refused in a way the caller must act on (retry later, register, stop).
    Refused(Refusal, Status),
}

/// Sends the next run of the outbox (one job and attempt, so that a stale attempt's events can
/// be dropped without losing anyone else's) as `who`. `narrow_until`: while set, one event at a
/// time up to that sequence number (a batch was refused for one of its events; find it).
async fn send_next(shared: &Shared, who: &Sender, narrow_until: &mut Option<u64>) -> Sent {
    let batch: Vec<pb::WorkerEvent> = shared
        .outbox
        .lock()
        .map(|o| o.batch(256))
        .unwrap_or_default();
    let Some(first) = batch.first() else {
        return Sent::Empty;
    };
    let (job, attempt, first_seq) = (first.job_id.clone(), first.attempt, first.seq);
    let mut events: Vec<pb::WorkerEvent> = batch
        .into_iter()
        .take_while(|e| e.job_id == job && e.attempt == attempt)
        .collect();
    match *narrow_until {
        Some(until) if first_seq <= until => events.truncate(1),
        _ => *narrow_until = None,
    }
    let req = pb::ReportEventsRequest {
        worker_id: who.worker_id.clone(),
        events: events.clone(),
        instance_id: who.instance_id.clone(),
        instance_secret: who.instance_secret.clone(),
    };
    let e = match shared.client().report_events(req).await {
        Ok(r) => {
            if let Ok(mut o) = shared.outbox.lock() {
                let before = o.len();
                o.ack(r.into_inner().acked_seq);
                shared
                    .metrics
                    .events_acked
                    .inc_by(before.saturating_sub(o.len()) as u64);
            }
            return Sent::Done;
        }
        Err(e) => e,
    };
    match refusal_of(&e) {
        Refusal::StaleAttempt => {
            tracing::warn!(job = %job, attempt, error = %e.message(), "events of a stale attempt dropped");
            if let Ok(mut o) = shared.outbox.lock() {
                o.drop_attempt(&job, attempt);
            }
        }
        Refusal::Permanent if events.len() > 1 => *narrow_until = events.last().map(|l| l.seq),
        Refusal::Permanent => {
            if let Some(ev) = events.first() {
                skip(shared, ev, &e);
            }
        }
        r => return Sent::Refused(r, e),
    }
    Sent::Done
}

/// Sends the outbox in order, as this daemon, until it must stop.
pub(crate) async fn flush_loop(shared: Arc<Shared>) {
    let mut backoff = Duration::from_millis(200);
    let mut narrow_until: Option<u64> = None;
    loop {
        match send_next(&shared, &shared.sender(), &mut narrow_until).await {
            Sent::Empty => {
                let wake = shared.wake_flush.notified();
                let _ = tokio::time::timeout(Duration::from_secs(1), wake).await;
            }
            Sent::Done => backoff = Duration::from_millis(200),
            Sent::Refused(Refusal::Superseded, e) => {
                shared.fail(e.message().to_string());
                return;
            }
            Sent::Refused(Refusal::Register, _) => {
                if shared.register().await.is_err() {
                    return;
                }
            }
            Sent::Refused(_, e) => {
                shared.metrics.report_failures.inc();
                let pending = shared.outbox.lock().map(|o| o.len()).unwrap_or(0);
                tracing::warn!(error = %e.message(), pending, "cannot report events yet; keeping them");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Delivers what the predecessor (`who`) left in the outbox journal, as that instance, before
/// this daemon registers (which would end the predecessor's ranks): a checkpoint its trainer
/// reported just before the crash is stored before the job restarts. Retries while the
/// coordinator is away; drops the leftovers, saying so, when the predecessor no longer holds
/// the worker (its events can never be stored).
pub(crate) async fn deliver_leftovers(shared: &Shared, who: Sender) {
    let mut backoff = Duration::from_millis(200);
    let mut narrow_until: Option<u64> = None;
    loop {
        match send_next(shared, &who, &mut narrow_until).await {
            Sent::Empty => return,
            Sent::Done => backoff = Duration::from_millis(200),
            Sent::Refused(Refusal::Superseded | Refusal::Register, e) => {
                let left = shared.outbox.lock().map(|o| o.len()).unwrap_or(0);
                tracing::warn!(error = %e.message(), events = left, "the previous daemon's undelivered events cannot be stored any more; dropped");
                if let Ok(mut o) = shared.outbox.lock() {
                    o.clear();
                }
                return;
            }
            Sent::Refused(_, e) => {
                tracing::warn!(error = %e.message(), "cannot deliver the previous daemon's events yet; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_stale_attempt_drops_the_attempt_and_other_refusals_skip_one_event() {
        let stale = refusal::status(
            Code::FailedPrecondition,
            "stale attempt: job x is at attempt 2, got 1",
            refusal::STALE_ATTEMPT,
        );
        assert_eq!(refusal_of(&stale), Refusal::StaleAttempt);
        // The same code without the reason (a conflict, an illegal transition): one event.
        for one_event in [
            Status::failed_precondition("rank 1 is not assigned"),
            Status::invalid_argument("events[3].metrics.values: name"),
            Status::out_of_range("message too large"),
        ] {
            assert_eq!(refusal_of(&one_event), Refusal::Permanent, "{one_event:?}");
        }
        let superseded = refusal::status(
            Code::FailedPrecondition,
            "replaced",
            refusal::WORKER_SUPERSEDED,
        );
        assert_eq!(refusal_of(&superseded), Refusal::Superseded);
        assert_eq!(
            refusal_of(&Status::not_found("worker x not found")),
            Refusal::Register
        );
        for transient in [
            Status::unavailable("database unreachable"),
            Status::internal("boom"),
            Status::deadline_exceeded("slow"),
            Status::resource_exhausted("busy"),
            Status::unauthenticated("token"),
        ] {
            assert_eq!(refusal_of(&transient), Refusal::Retry, "{transient:?}");
        }
    }
}
