//! The outbox on disk (`outbox-<gpu>.journal` in the work dir): every event is appended and
//! synced before it is sent, and the journal is rewritten without the acknowledged ones. A
//! daemon restarted after a crash (or a kill -9, or the host's power) reads it back and sends
//! those events first, so an event its trainer reported (a checkpoint the next attempt must
//! resume from) is never lost with the daemon's memory.
//!
//! A record is `len: u32 LE | fnv1a64(payload): u64 LE | payload` (a protobuf `WorkerEvent`).
//! Only the last record can be torn by a crash (each append is synced before the next); reading
//! stops at the first record that is short or does not match its checksum, and the journal is
//! rewritten without it.

use anyhow::Context;
use prost::Message;
use segtrain_proto::v1 as pb;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// Largest record read back (the coordinator takes 4 MiB requests; one event is far smaller).
const MAX_RECORD: usize = 4 << 20;

/// Acknowledged records the file may hold before it is rewritten.
const COMPACT_AFTER: usize = 256;

pub struct Journal {
    path: PathBuf,
    file: File,
    /// Records in the file that are acknowledged (gone from the outbox) but not yet rewritten.
    stale: usize,
}

fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn record(ev: &pb::WorkerEvent) -> Vec<u8> {
    let payload = ev.encode_to_vec();
    let mut out = Vec::with_capacity(payload.len() + 12);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&fnv1a64(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

/// The whole records at the start of `bytes` (a torn or corrupt tail is left out).
fn decode(bytes: &[u8]) -> Vec<pb::WorkerEvent> {
    let mut events = Vec::new();
    let mut rest = bytes;
    while rest.len() >= 12 {
        let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let mut sum = [0u8; 8];
        sum.copy_from_slice(&rest[4..12]);
        if len > MAX_RECORD || rest.len() < 12 + len {
            break;
        }
        let payload = &rest[12..12 + len];
        if fnv1a64(payload) != u64::from_le_bytes(sum) {
            break;
        }
        match pb::WorkerEvent::decode(payload) {
            Ok(ev) if ev.seq > 0 => events.push(ev),
            _ => break,
        }
        rest = &rest[12 + len..];
    }
    events
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

impl Journal {
    /// Opens (or creates) the journal `name` in `work_dir`; returns it and the events it holds,
    /// oldest first.
    pub fn open(work_dir: &Path, name: &str) -> anyhow::Result<(Journal, Vec<pb::WorkerEvent>)> {
        let path = work_dir.join(name);
        let mut bytes = Vec::new();
        match File::open(&path) {
            Ok(mut f) => {
                f.read_to_end(&mut bytes)
                    .with_context(|| format!("cannot read {}", path.display()))?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("cannot open {}", path.display())),
        }
        let events = decode(&bytes);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        let mut j = Journal {
            path,
            file,
            stale: 0,
        };
        // Drop a torn tail now, so that appends follow the last whole record.
        if events.iter().map(|e| record(e).len()).sum::<usize>() != bytes.len() {
            j.rewrite(&events)?;
        }
        Ok((j, events))
    }

    /// Appends one event and syncs it.
    pub fn append(&mut self, ev: &pb::WorkerEvent) -> std::io::Result<()> {
        self.file.write_all(&record(ev))?;
        self.file.sync_data()
    }

    /// `acked` records left the outbox; `pending` is what it still holds. An empty outbox
    /// empties the file; otherwise it is rewritten once enough acknowledged records piled up.
    pub fn acked(&mut self, acked: usize, pending: &[pb::WorkerEvent]) -> anyhow::Result<()> {
        self.stale += acked;
        if pending.is_empty() {
            self.file
                .set_len(0)
                .and_then(|()| self.file.sync_data())
                .with_context(|| format!("cannot empty {}", self.path.display()))?;
            self.stale = 0;
        } else if self.stale >= COMPACT_AFTER {
            self.rewrite(pending)?;
        }
        Ok(())
    }

    /// Replaces the file with exactly `pending` (temporary file, sync, rename, sync the dir).
    pub fn rewrite(&mut self, pending: &[pb::WorkerEvent]) -> anyhow::Result<()> {
        let tmp = self.path.with_extension("journal.tmp");
        let write = || -> std::io::Result<File> {
            let mut f = File::create(&tmp)?;
            for ev in pending {
                f.write_all(&record(ev))?;
            }
            f.sync_all()?;
            std::fs::rename(&tmp, &self.path)?;
            if let Some(dir) = self.path.parent() {
                sync_dir(dir)?;
            }
            OpenOptions::new().append(true).open(&self.path)
        };
        self.file = write().with_context(|| format!("cannot rewrite {}", self.path.display()))?;
        self.stale = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(seq: u64) -> pb::WorkerEvent {
        pb::WorkerEvent {
            seq,
            job_id: "job".into(),
            attempt: 1,
            payload: Some(pb::worker_event::Payload::Note(pb::Note {
                text: format!("event {seq}"),
            })),
            ..Default::default()
        }
    }

    #[test]
    fn events_survive_a_restart_and_a_torn_tail_is_dropped() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (mut j, loaded) = Journal::open(dir.path(), "o.journal").expect("open");
        assert!(loaded.is_empty());
        for s in 1..=3 {
            j.append(&ev(s)).expect("append");
        }
        drop(j);
        let (mut j, loaded) = Journal::open(dir.path(), "o.journal").expect("reopen");
        assert_eq!(loaded.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2, 3]);
        // Acknowledged up to 2: what is left is 3, and a fourth follows it.
        j.acked(2, &[ev(3)]).expect("ack");
        j.rewrite(&[ev(3)]).expect("compact");
        j.append(&ev(4)).expect("append");
        drop(j);
        // A crash mid-append: half a record at the end.
        let path = dir.path().join("o.journal");
        let mut bytes = std::fs::read(&path).expect("read");
        let torn = record(&ev(5));
        bytes.extend_from_slice(&torn[..torn.len() / 2]);
        std::fs::write(&path, &bytes).expect("tear");
        let (mut j, loaded) = Journal::open(dir.path(), "o.journal").expect("reopen torn");
        assert_eq!(loaded.iter().map(|e| e.seq).collect::<Vec<_>>(), [3, 4]);
        j.append(&ev(6)).expect("append after the tear");
        drop(j);
        let (mut j, loaded) = Journal::open(dir.path(), "o.journal").expect("reopen");
        assert_eq!(loaded.iter().map(|e| e.seq).collect::<Vec<_>>(), [3, 4, 6]);
        // Everything acknowledged: an empty file.
        j.acked(3, &[]).expect("ack all");
        assert_eq!(std::fs::metadata(&path).expect("meta").len(), 0);
        // A flipped byte inside a record stops the read there.
        let mut j2 = j;
        j2.append(&ev(7)).expect("append");
        j2.append(&ev(8)).expect("append");
        drop(j2);
        let mut bytes = std::fs::read(&path).expect("read");
        let second = record(&ev(7)).len() + 14;
        bytes[second] ^= 0xff;
        std::fs::write(&path, &bytes).expect("corrupt");
        let (_, loaded) = Journal::open(dir.path(), "o.journal").expect("reopen");
        assert_eq!(loaded.iter().map(|e| e.seq).collect::<Vec<_>>(), [7]);
    }
}
