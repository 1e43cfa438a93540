//! Which daemon this is: one (host, GPU) must have one daemon, or a rank could run in two
//! trainers at once (cloned VM images sharing a hostname, two containers on one host, a copied
//! unit).
//!
//! Every daemon process makes a random instance id at its start and sends it with every request;
//! the coordinator lets one instance hold a (host, GPU) while its lease is live. A daemon that
//! crashed and is restarted at once must not wait for its old lease to expire, so it proves that
//! it succeeds the old instance: in its work dir it takes an exclusive `flock` on
//! `daemon-<gpu>.lock` (released by the kernel when a process dies, so holding it proves the
//! previous daemon of this work dir is gone) and reads `daemon-<gpu>.instance`, the id and the
//! instance secret that daemon recorded (the coordinator handed the secret to it; an id alone
//! proves nothing, see docs/security.md). It registers naming that id and showing that secret,
//! and records its own. The record is readable by the daemon's user only (mode 0600).
//!
//! Two daemons on one work dir and GPU: the second finds the lock taken and exits at once. Two
//! on separate work dirs: the second names no (or another) predecessor and the coordinator
//! refuses it while the first holds its lease. A cloned image that carries the work dir may
//! take over once; the original then finds itself replaced and exits (nothing runs twice).

use anyhow::{bail, Context};
use std::fs::OpenOptions;
use std::io::{Read, Seek, Write};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use uuid::Uuid;

/// This daemon's claim on its work dir and GPU; the lock is held until it is dropped (or the
/// process ends).
pub struct Instance {
    pub id: Uuid,
    /// The instance that ran on this work dir and GPU before (gone: we hold the lock), and the
    /// secret the coordinator had given it.
    pub previous: Option<Uuid>,
    pub previous_secret: Option<String>,
    /// The worker id the coordinator gave that instance (its undelivered events are that
    /// worker's).
    pub previous_worker: Option<String>,
    record: PathBuf,
    _lock: std::fs::File,
}

/// `cpu` or `gpu<N>`: what names this worker's files in the work dir.
pub fn label(gpu: Option<u32>) -> String {
    gpu.map_or_else(|| "cpu".to_string(), |g| format!("gpu{g}"))
}

/// Takes the work dir's lock for `gpu` (None: the CPU worker) and makes a new instance id.
pub fn claim(work_dir: &Path, gpu: Option<u32>) -> anyhow::Result<Instance> {
    std::fs::create_dir_all(work_dir)
        .with_context(|| format!("--work-dir: cannot create {}", work_dir.display()))?;
    let name = label(gpu);
    let lock_path = work_dir.join(format!("daemon-{name}.lock"));
    let mut lock = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&lock_path)
        .with_context(|| format!("--work-dir: cannot open {}", lock_path.display()))?;
    // SAFETY: flock on a descriptor we own; no memory is involved.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            let mut holder = String::new();
            let _ = lock.read_to_string(&mut holder);
            bail!(
                "another segtrain-worker daemon ({}) already uses the work dir {} for {}; \
                 give each daemon its own --work-dir (and --gpu), or stop the other one",
                match holder.trim() {
                    "" => "pid unknown".to_string(),
                    pid => format!("pid {pid}"),
                },
                work_dir.display(),
                if gpu.is_some() {
                    name.as_str()
                } else {
                    "the CPU worker"
                },
            );
        }
        return Err(err).with_context(|| format!("cannot lock {}", lock_path.display()));
    }
    lock.set_len(0)
        .and_then(|_| lock.rewind())
        .and_then(|_| write!(lock, "{}", std::process::id()))
        .with_context(|| format!("cannot write {}", lock_path.display()))?;
    let record = work_dir.join(format!("daemon-{name}.instance"));
    let text = std::fs::read_to_string(&record).unwrap_or_default();
    let mut lines = text.lines().map(str::trim);
    let previous = lines.next().and_then(|s| Uuid::parse_str(s).ok());
    let mut rest = || {
        lines
            .next()
            .filter(|s| previous.is_some() && !s.is_empty())
            .map(str::to_string)
    };
    let (previous_secret, previous_worker) = (rest(), rest());
    Ok(Instance {
        id: Uuid::now_v7(),
        previous,
        previous_secret,
        previous_worker,
        record,
        _lock: lock,
    })
}

impl Instance {
    /// Records this instance, the secret the coordinator gave it and its worker id, as the one
    /// a later daemon on this work dir succeeds (after the coordinator accepted it): written to
    /// a temporary file of mode 0600, synced, renamed.
    pub fn record(&self, secret: &str, worker_id: &str) -> anyhow::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        let tmp = self.record.with_extension("instance.tmp");
        let write = || -> std::io::Result<()> {
            let _ = std::fs::remove_file(&tmp);
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            writeln!(f, "{}\n{secret}\n{worker_id}", self.id)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &self.record)
        };
        write().with_context(|| format!("cannot write {}", self.record.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_daemon_per_work_dir_and_gpu_and_a_successor_knows_its_predecessor() {
        let dir = tempfile::tempdir().expect("temp dir");
        let first = claim(dir.path(), None).expect("first");
        assert_eq!(first.previous, None);
        // A second daemon for the CPU worker on this work dir is refused, naming the dir.
        let e = claim(dir.path(), None).err().expect("refused").to_string();
        assert!(e.contains("work dir") && e.contains("pid"), "{e}");
        // Another GPU on the same work dir is another worker.
        let gpu1 = claim(dir.path(), Some(1)).expect("gpu 1");
        first.record("s3cret", "w-1").expect("record");
        let id = first.id;
        drop(first);
        // Only the daemon's user may read the secret.
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("daemon-cpu.instance"))
            .expect("record")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // The next daemon (the first one is gone) succeeds it, with its secret.
        let next = claim(dir.path(), None).expect("next");
        assert_eq!(next.previous, Some(id));
        assert_eq!(next.previous_secret.as_deref(), Some("s3cret"));
        assert_eq!(next.previous_worker.as_deref(), Some("w-1"));
        assert_ne!(next.id, id);
        assert_eq!(gpu1.previous, None);
    }
}
