//! Events on their way to the coordinator: numbered, kept until acknowledged, resent after
//! failures. The coordinator stores each sequence number once, so resending is always safe, and
//! nothing is lost while it is unreachable. With a [`Journal`] (the daemon's), every event is
//! on disk before it is sent and stays there until acknowledged, so a restarted daemon still
//! has what its predecessor had not delivered.

use crate::journal::Journal;
use segtrain_proto::v1 as pb;
use std::collections::VecDeque;
use std::path::Path;

#[derive(Default)]
pub struct Outbox {
    next_seq: u64,
    pending: VecDeque<pb::WorkerEvent>,
    journal: Option<Journal>,
}

impl Outbox {
    /// Numbering continues above `acked` (what the coordinator already stored for this worker).
    /// In memory only (tests and tools).
    pub fn new(acked: u64) -> Outbox {
        Outbox {
            next_seq: acked + 1,
            pending: VecDeque::new(),
            journal: None,
        }
    }

    /// The outbox kept in the journal `name` in `work_dir`, with the events it still holds
    /// (its predecessor's undelivered ones), numbered on after them.
    pub fn open(work_dir: &Path, name: &str) -> anyhow::Result<Outbox> {
        let (journal, events) = Journal::open(work_dir, name)?;
        let next_seq = events.iter().map(|e| e.seq).max().unwrap_or(0) + 1;
        Ok(Outbox {
            next_seq,
            pending: events.into(),
            journal: Some(journal),
        })
    }

    /// Writes what the outbox holds now to its journal (after a change other than a push or an
    /// acknowledgement).
    fn rewrite(&mut self) {
        if let Some(j) = &mut self.journal {
            if let Err(e) = j.rewrite(self.pending.make_contiguous()) {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "cannot rewrite the outbox journal"
                );
            }
        }
    }

    /// After a re-registration: drop what the coordinator already has and number above it.
    pub fn resync(&mut self, acked: u64) {
        self.ack(acked);
        self.next_seq = self.next_seq.max(acked + 1);
    }

    /// Numbers `ev`, writes it to the journal (synced) and queues it.
    pub fn push(&mut self, mut ev: pb::WorkerEvent) -> u64 {
        ev.seq = self.next_seq;
        self.next_seq += 1;
        if let Some(j) = &mut self.journal {
            // Not on disk (a full disk, say) is no reason not to send it.
            if let Err(e) = j.append(&ev) {
                tracing::warn!(error = %e, seq = ev.seq, "cannot write an event to the outbox journal; it is kept in memory only");
            }
        }
        self.pending.push_back(ev);
        self.next_seq - 1
    }

    /// Up to `max` of the oldest unacknowledged events.
    pub fn batch(&self, max: usize) -> Vec<pb::WorkerEvent> {
        self.pending.iter().take(max).cloned().collect()
    }

    pub fn ack(&mut self, acked: u64) {
        let before = self.pending.len();
        while self.pending.front().is_some_and(|e| e.seq <= acked) {
            self.pending.pop_front();
        }
        let gone = before - self.pending.len();
        if let (Some(j), true) = (&mut self.journal, gone > 0) {
            if let Err(e) = j.acked(gone, self.pending.make_contiguous()) {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "cannot shorten the outbox journal"
                );
            }
        }
    }

    /// Drops one event (the coordinator can never store it).
    pub fn remove(&mut self, seq: u64) {
        self.pending.retain(|e| e.seq != seq);
        self.rewrite();
    }

    /// Puts `payload` in the place (and under the number) of event `seq`: what replaces an
    /// event the coordinator refused arrives where it would have, before the events after it
    /// (a note after the job's end would not be recorded).
    pub fn replace(&mut self, seq: u64, payload: pb::worker_event::Payload) {
        if let Some(e) = self.pending.iter_mut().find(|e| e.seq == seq) {
            e.payload = Some(payload);
        }
        self.rewrite();
    }

    /// Drops the events of an attempt the coordinator refused as stale.
    pub fn drop_attempt(&mut self, job_id: &str, attempt: u32) {
        self.pending
            .retain(|e| !(e.job_id == job_id && e.attempt == attempt));
        self.rewrite();
    }

    /// Drops everything (what a predecessor left that can no longer be delivered).
    pub fn clear(&mut self) {
        self.pending.clear();
        self.rewrite();
    }

    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(job: &str, attempt: u32) -> pb::WorkerEvent {
        pb::WorkerEvent {
            job_id: job.into(),
            attempt,
            ..Default::default()
        }
    }

    #[test]
    fn numbers_batches_acks_and_drops() {
        let mut o = Outbox::new(10);
        assert_eq!(o.push(ev("a", 1)), 11);
        assert_eq!(o.push(ev("a", 1)), 12);
        assert_eq!(o.push(ev("b", 2)), 13);
        assert_eq!(
            o.batch(2).iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![11, 12]
        );
        o.ack(11);
        assert_eq!(
            o.batch(10).iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![12, 13]
        );
        o.drop_attempt("a", 1);
        assert_eq!(
            o.batch(10).iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![13]
        );
        o.push(ev("b", 2));
        o.replace(
            13,
            pb::worker_event::Payload::Note(pb::Note { text: "n".into() }),
        );
        assert!(matches!(
            o.batch(1)[0].payload,
            Some(pb::worker_event::Payload::Note(_))
        ));
        o.remove(14);
        assert_eq!(
            o.batch(10).iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![13]
        );
        o.resync(20);
        assert!(o.is_empty());
        assert_eq!(o.push(ev("b", 2)), 21);
    }
}
