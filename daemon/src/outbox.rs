//! Events on their way to the coordinator: numbered, kept until acknowledged, resent after
//! failures. The coordinator stores each sequence number once, so resending is always safe, and
//! nothing is lost while it is unreachable (only this daemon's memory bounds the backlog).

use segtrain_proto::v1 as pb;
use std::collections::VecDeque;

#[derive(Debug, Default)]
pub struct Outbox {
    next_seq: u64,
    pending: VecDeque<pb::WorkerEvent>,
}

impl Outbox {
    /// Numbering continues above `acked` (what the coordinator already stored for this worker).
    pub fn new(acked: u64) -> Outbox {
        Outbox {
            next_seq: acked + 1,
            pending: VecDeque::new(),
        }
    }

    /// After a re-registration: drop what the coordinator already has and number above it.
    pub fn resync(&mut self, acked: u64) {
        self.ack(acked);
        self.next_seq = self.next_seq.max(acked + 1);
    }

    pub fn push(&mut self, mut ev: pb::WorkerEvent) -> u64 {
        ev.seq = self.next_seq;
        self.next_seq += 1;
        self.pending.push_back(ev);
        self.next_seq - 1
    }

    /// Up to `max` of the oldest unacknowledged events.
    pub fn batch(&self, max: usize) -> Vec<pb::WorkerEvent> {
        self.pending.iter().take(max).cloned().collect()
    }

    pub fn ack(&mut self, acked: u64) {
        while self.pending.front().is_some_and(|e| e.seq <= acked) {
            self.pending.pop_front();
        }
    }

    /// Drops one event (the coordinator can never store it).
    pub fn remove(&mut self, seq: u64) {
        self.pending.retain(|e| e.seq != seq);
    }

    /// Puts `payload` in the place (and under the number) of event `seq`: what replaces an
    /// event the coordinator refused arrives where it would have, before the events after it
    /// (a note after the job's end would not be recorded).
    pub fn replace(&mut self, seq: u64, payload: pb::worker_event::Payload) {
        if let Some(e) = self.pending.iter_mut().find(|e| e.seq == seq) {
            e.payload = Some(payload);
        }
    }

    /// Drops the events of an attempt the coordinator refused as stale.
    pub fn drop_attempt(&mut self, job_id: &str, attempt: u32) {
        self.pending
            .retain(|e| !(e.job_id == job_id && e.attempt == attempt));
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
