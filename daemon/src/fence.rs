//! Self-fencing: a daemon cut off from the coordinator pauses its trainers before its lease
//! could run out, so that no trainer of this worker acts (writes a checkpoint, deletes one,
//! reports) once the coordinator may have given its ranks to another worker.
//!
//! The coordinator's lease runs from when it handled a heartbeat, which is after the daemon sent
//! it: so from the send time of the last accepted heartbeat, `lease - margin` is safely before
//! any expiry ([`deadline`]). At that point every trainer gets SIGSTOP (paused, not killed: a
//! coordinator that was only restarting, or a short network cut, costs nothing). When a heartbeat
//! is accepted again they get SIGCONT, and that heartbeat's answer stops the ranks the
//! coordinator no longer wants (their stop sends SIGCONT first, so they can exit).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long after the last accepted heartbeat was sent the trainers are paused: the lease less a
/// margin of a quarter of it (at least 1 s, at most half the lease).
pub fn deadline(lease: Duration) -> Duration {
    let margin = (lease / 4).max(Duration::from_secs(1)).min(lease / 2);
    lease.saturating_sub(margin)
}

/// The fence of one daemon: when a heartbeat was last accepted, and which trainers it paused.
pub struct Fence {
    last_accepted: Mutex<Instant>,
    /// Trainer pids by (job, attempt, rank), as the rank tasks register them.
    pids: Mutex<HashMap<String, u32>>,
    /// Paused now (with when it happened, for the log).
    paused: Mutex<Option<Instant>>,
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: signalling a trainer process this daemon started, by its pid.
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

impl Default for Fence {
    fn default() -> Fence {
        Fence {
            last_accepted: Mutex::new(Instant::now()),
            pids: Mutex::new(HashMap::new()),
            paused: Mutex::new(None),
        }
    }
}

impl Fence {
    /// A trainer started (`key`: its job/attempt/rank).
    pub fn started(&self, key: &str, pid: u32) {
        if let Ok(mut p) = self.pids.lock() {
            p.insert(key.to_string(), pid);
        }
    }

    /// A trainer ended.
    pub fn ended(&self, key: &str) {
        if let Ok(mut p) = self.pids.lock() {
            p.remove(key);
        }
    }

    /// A trainer about to be stopped: it must run to handle the stop.
    pub fn release(pid: u32) {
        signal(pid, libc::SIGCONT);
    }

    /// A heartbeat sent at `sent` was accepted: the lease is good again; paused trainers go on.
    /// Returns for how long they had been paused, if they had been.
    pub fn accepted(&self, sent: Instant) -> Option<Duration> {
        if let Ok(mut last) = self.last_accepted.lock() {
            *last = (*last).max(sent);
        }
        let was = self.paused.lock().ok().and_then(|mut p| p.take())?;
        for pid in self.pids() {
            signal(pid, libc::SIGCONT);
        }
        Some(was.elapsed())
    }

    /// Pauses every trainer when no heartbeat was accepted within [`deadline`] of `lease`;
    /// returns how long it has been silent when it did so now.
    pub fn check(&self, lease: Duration) -> Option<Duration> {
        let silent = self.last_accepted.lock().ok()?.elapsed();
        let pids = self.pids();
        if silent < deadline(lease) || pids.is_empty() {
            return None;
        }
        let mut paused = self.paused.lock().ok()?;
        if paused.is_some() {
            return None;
        }
        for pid in pids {
            signal(pid, libc::SIGSTOP);
        }
        *paused = Some(Instant::now());
        Some(silent)
    }

    fn pids(&self) -> Vec<u32> {
        self.pids
            .lock()
            .map(|p| p.values().copied().collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fence_falls_before_the_lease() {
        let s = Duration::from_secs;
        assert_eq!(deadline(s(15)), Duration::from_millis(11_250));
        assert_eq!(deadline(s(4)), s(3));
        assert_eq!(deadline(s(2)), s(1));
        assert!(deadline(Duration::from_millis(500)) <= Duration::from_millis(250));
    }

    #[test]
    fn a_silent_daemon_pauses_its_trainers_and_an_accepted_heartbeat_continues_them() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("a stand-in trainer");
        let state = |pid: u32| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    s.rsplit_once(')')
                        .map(|(_, r)| r.trim_start()[..1].to_string())
                })
                .unwrap_or_default()
        };
        let wait_for = |pid: u32, want: &str| {
            let until = Instant::now() + Duration::from_secs(5);
            while state(pid) != want && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(10));
            }
            state(pid)
        };
        let f = Fence::default();
        f.started("job/1/0", child.id());
        // Within the lease: nothing. Past the deadline (a lease of 0 s): paused, once.
        assert_eq!(f.check(Duration::from_secs(3600)), None);
        assert!(f.check(Duration::ZERO).is_some());
        assert_eq!(f.check(Duration::ZERO), None);
        assert_eq!(wait_for(child.id(), "T"), "T");
        // A heartbeat accepted: it goes on.
        assert!(f.accepted(Instant::now()).is_some());
        assert_eq!(wait_for(child.id(), "S"), "S");
        assert_eq!(f.accepted(Instant::now()), None);
        let _ = child.kill();
        let _ = child.wait();
    }
}
