//! Graceful stop and failure classes of a trainer process.
//!
//! **Stop.** SIGTERM (what the worker daemon sends on cancel, and systemd on stop) or SIGINT
//! before the training loop has begun ends the process at once: there is nothing to save yet,
//! and a rank waiting in rendezvous must not hold its GPU. Once the loop runs, the signal only
//! sets [`STOP_REQUESTED`]; the loop checks it at iteration boundaries (agreed by all ranks
//! through one all-reduce, so every rank stops after the same iteration), rank 0 writes a
//! checkpoint unless it has just written one, and the process exits cleanly. A signal that
//! arrives while a checkpoint is being written lets the write finish first.
//!
//! **Failure classes.** The daemon reports a trainer that failed as FAILED_INFRA (worth a
//! restart: a lost peer, a collective timeout, a killed process) or FAILED_DETERMINISTIC (a
//! restart would fail the same way: a bad dataset, an unusable checkpoint or pretrained file,
//! CUDA out of memory, a NaN loss). [`is_deterministic`] decides from the error chain. A file
//! that cannot be read (EIO, a file vanishing for a moment on a gcsfuse mount, a timeout) is
//! infrastructure: the restart reads it again, and finds the dataset missing (deterministic,
//! from the scan at start) if it really is gone.

use crate::collective::CollectiveError;
use crate::data::error::DataError;
use std::sync::atomic::{AtomicBool, Ordering};

/// Set by SIGTERM/SIGINT once the training loop runs.
pub static STOP_REQUESTED: AtomicBool = AtomicBool::new(false);
/// Whether the loop has begun (before it, a stop signal exits at once).
static IN_LOOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop_signal(sig: libc::c_int) {
    if IN_LOOP.load(Ordering::SeqCst) {
        STOP_REQUESTED.store(true, Ordering::SeqCst);
    } else {
        // SAFETY: _exit is async-signal-safe. 128 + signal, as a shell reports it.
        unsafe { libc::_exit(128 + sig) };
    }
}

/// Installs the SIGTERM and SIGINT handlers of a trainer process.
pub fn install_signal_handlers() {
    // SAFETY: the handler only touches atomics and calls _exit.
    unsafe {
        libc::signal(
            libc::SIGTERM,
            on_stop_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
        libc::signal(
            libc::SIGINT,
            on_stop_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
    }
}

/// From now on a stop signal asks for a graceful stop instead of exiting.
pub fn entering_loop() {
    IN_LOOP.store(true, Ordering::SeqCst);
}

/// A failure a restart would repeat. Its message is the wrapped error's.
#[derive(Debug)]
pub struct Deterministic(pub anyhow::Error);

impl std::fmt::Display for Deterministic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#}", self.0)
    }
}

impl std::error::Error for Deterministic {}

/// Marks an error as deterministic.
pub fn deterministic(e: anyhow::Error) -> anyhow::Error {
    anyhow::Error::new(Deterministic(e))
}

/// Whether a trainer failure would repeat on a restart.
pub fn is_deterministic(e: &anyhow::Error) -> bool {
    for cause in e.chain() {
        if cause.downcast_ref::<CollectiveError>().is_some() {
            return false;
        }
        if cause.downcast_ref::<Deterministic>().is_some() {
            return true;
        }
        match cause.downcast_ref::<DataError>() {
            Some(DataError::Io { .. }) => return false,
            Some(_) => return true,
            None => {}
        }
    }
    is_out_of_memory(&format!("{e:#}"))
}

/// Whether a failure was a full disk (ENOSPC, or EDQUOT over a quota): the worker's disk, not the
/// job, so its daemon takes no new rank there (see `segtrain_wire::FailureClass::DiskFull`).
pub fn is_disk_full(e: &anyhow::Error) -> bool {
    let io = e.chain().filter_map(|c| c.downcast_ref::<std::io::Error>());
    let by_code = io
        .into_iter()
        .any(|io| matches!(io.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)));
    // Libraries that wrap an io::Error without exposing it as a source still print it.
    let m = format!("{e:#}");
    by_code || m.contains("No space left on device") || m.contains("Disk quota exceeded")
}

/// CUDA (and the CPU allocator) say so in their messages.
pub fn is_out_of_memory(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.contains("out of memory") || m.contains("cuda_error_out_of_memory")
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn a_full_disk_is_told_apart() {
        let full = anyhow::Error::new(std::io::Error::from_raw_os_error(libc::ENOSPC))
            .context("cannot write model.safetensors");
        assert!(is_disk_full(&full));
        let wrapped =
            anyhow::anyhow!("safetensors: IoError(No space left on device (os error 28))");
        assert!(is_disk_full(&wrapped));
        let other = anyhow::Error::new(std::io::Error::from_raw_os_error(libc::EACCES));
        assert!(!is_disk_full(&other));
    }

    #[test]
    fn classes() {
        let data: anyhow::Error = DataError::MissingSplit {
            dir: "/x".into(),
            split: "train".into(),
        }
        .into();
        assert!(is_deterministic(&data.context("scanning")));
        let marked = deterministic(anyhow::anyhow!("no usable checkpoint"));
        assert!(is_deterministic(&marked));
        let wrapped: anyhow::Result<()> = Err(marked);
        assert!(is_deterministic(
            &wrapped.context("resume").expect_err("an error")
        ));
        let vanished: anyhow::Error = DataError::Io {
            path: "/data/leftImg8bit/train/a.png".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        }
        .into();
        assert!(!is_deterministic(&vanished.context("loading a batch")));
        let decode: anyhow::Error = DataError::Decode {
            path: "/x.png".into(),
            message: "bad".into(),
        }
        .into();
        assert!(is_deterministic(&decode));
        let oom = anyhow::anyhow!("CUDA out of memory. Tried to allocate 2.00 GiB");
        assert!(is_deterministic(&oom));
        let peer: anyhow::Error = CollectiveError::Timeout {
            op: "all_reduce",
            peer: 1,
            timeout: std::time::Duration::from_secs(1),
        }
        .into();
        assert!(!is_deterministic(&peer));
        assert!(!is_deterministic(&anyhow::anyhow!("something else")));
        assert_eq!(
            format!(
                "{}",
                deterministic(anyhow::anyhow!("inner").context("outer"))
            ),
            "outer: inner"
        );
    }
}
