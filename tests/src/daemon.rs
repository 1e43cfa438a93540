//! The real `segtrain-worker daemon` as a child process (a CPU worker), for end-to-end tests.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

pub struct DaemonProcess {
    child: Option<Child>,
    log: PathBuf,
}

/// What [`DaemonProcess::start_full`] takes, for [`DaemonProcess::start_wrapped`].
pub struct Launch<'a> {
    pub url: &'a str,
    pub host: &'a str,
    pub work_dir: &'a Path,
    pub grace_seconds: u32,
    pub env: &'a [(&'a str, &'a str)],
    pub args: &'a [&'a std::ffi::OsStr],
}

impl DaemonProcess {
    /// Starts a CPU worker daemon registering as `host` with the coordinator at `url`; trainer
    /// files and logs go under `work_dir`.
    pub fn start(url: &str, host: &str, work_dir: &Path) -> DaemonProcess {
        DaemonProcess::start_with_args(url, host, work_dir, &[])
    }

    /// [`start`](Self::start) with extra flags, e.g. `--ca PATH --token-file PATH` for a
    /// coordinator started with `CoordinatorProcess::start_secure`.
    pub fn start_with_args(
        url: &str,
        host: &str,
        work_dir: &Path,
        args: &[&std::ffi::OsStr],
    ) -> DaemonProcess {
        DaemonProcess::start_full(url, host, work_dir, 5, &[], args)
    }

    /// Like [`DaemonProcess::start`], with the stop grace period (seconds) and extra
    /// environment for the daemon and its trainers.
    pub fn start_with(
        url: &str,
        host: &str,
        work_dir: &Path,
        grace_seconds: u32,
        env: &[(&str, &str)],
    ) -> DaemonProcess {
        DaemonProcess::start_full(url, host, work_dir, grace_seconds, env, &[])
    }

    /// The most general start: grace period (seconds), extra environment and extra flags (e.g.
    /// `--trainer PATH` for a stand-in trainer, `--metrics-listen ADDR`).
    pub fn start_full(
        url: &str,
        host: &str,
        work_dir: &Path,
        grace_seconds: u32,
        env: &[(&str, &str)],
        args: &[&std::ffi::OsStr],
    ) -> DaemonProcess {
        let launch = Launch {
            url,
            host,
            work_dir,
            grace_seconds,
            env,
            args,
        };
        DaemonProcess::start_wrapped(&[], launch)
    }

    /// [`start_full`](Self::start_full) run through `wrapper` (e.g. `ip netns exec NS`, which
    /// execs the daemon: the pid stays the daemon's).
    pub fn start_wrapped(wrapper: &[&str], l: Launch<'_>) -> DaemonProcess {
        let work_dir = l.work_dir;
        std::fs::create_dir_all(work_dir).expect("daemon work dir");
        let log = work_dir.join("daemon.log");
        let err = std::fs::File::create(&log).expect("daemon log");
        let worker = crate::binaries::path("segtrain-worker");
        let mut cmd = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(&worker);
                c
            }
            None => Command::new(&worker),
        };
        let child = cmd
            .args([
                "daemon",
                "--cpu",
                "--coordinator",
                l.url,
                "--host",
                l.host,
                "--grace-seconds",
                &l.grace_seconds.to_string(),
                // Two CPU workers share this machine's cores.
                "--torch-threads",
                "1",
            ])
            .arg("--work-dir")
            .arg(work_dir)
            .args(["--log-json", "true"])
            .args(l.args)
            .env_remove("SEGTRAIN_TOKEN")
            .env("RUST_LOG", "info")
            .envs(l.env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .expect("spawn segtrain-worker daemon");
        DaemonProcess {
            child: Some(child),
            log,
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// The daemon's trainer processes (its live children).
    pub fn trainer_pids(&self) -> Vec<u32> {
        self.pid().map(children_of).unwrap_or_default()
    }

    /// SIGSTOP to the daemon and its trainers: they neither send nor answer anything, as if the
    /// host were cut off from the network (connections stay open but silent).
    pub fn freeze(&self) {
        self.signal_all(libc::SIGSTOP);
    }

    /// SIGCONT: the frozen host comes back.
    pub fn thaw(&self) {
        self.signal_all(libc::SIGCONT);
    }

    /// SIGTERM to the daemon alone, as systemd's stop (a spot VM's preemption) sends it.
    pub fn sigterm(&self) {
        if let Some(pid) = self.pid() {
            // SAFETY: signalling our own child by pid.
            unsafe {
                libc::kill(pid as i32, libc::SIGTERM);
            }
        }
    }

    fn signal_all(&self, sig: i32) {
        if let Some(pid) = self.pid() {
            for p in std::iter::once(pid).chain(children_of(pid)) {
                // SAFETY: signalling our own child and its children by pid.
                unsafe {
                    libc::kill(p as i32, sig);
                }
            }
        }
    }

    /// SIGKILL, as in a crash.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits up to `timeout` for the daemon to exit by itself; its exit status, or `None` while
    /// it still runs.
    pub fn wait_exit(&mut self, timeout: std::time::Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let c = self.child.as_mut()?;
            if let Ok(Some(status)) = c.try_wait() {
                self.child = None;
                return Some(status);
            }
            if std::time::Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

/// Writes an executable `/bin/sh` script to `path`: a stand-in for `segtrain-worker train`
/// (`segtrain-worker daemon --trainer PATH`). It gets the trainer's arguments and prints what
/// `body` prints on stdout, the daemon's wire format.
pub fn stand_in_trainer(path: &Path, body: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, format!("#!/bin/sh\n{body}\n")).expect("write the stand-in trainer");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
        .expect("make the stand-in trainer executable");
    path.to_path_buf()
}

/// A trainer stand-in that reports `started`, then the metrics `names` (each 1.0) every
/// `step_s` seconds for `iterations` iterations, and exits 0 (on SIGTERM at once, as the real
/// one does before its loop). Written as `dir/counting-trainer.sh`.
pub fn counting_trainer(dir: &Path, iterations: u32, names: &[&str], step_s: f32) -> PathBuf {
    let values = names
        .iter()
        .map(|n| format!("\\\"{n}\\\":1.0"))
        .collect::<Vec<_>>()
        .join(",");
    stand_in_trainer(
        &dir.join("counting-trainer.sh"),
        &format!(
            r#"echo '{{"event":"started","start_iteration":0,"max_iters":{iterations},"train_images":1,"val_images":0,"device":"cpu","resumed_from":null,"parameters":1}}'
i=1
while [ $i -le {iterations} ]; do
  sleep {step_s}
  echo "{{\"event\":\"metrics\",\"iteration\":$i,\"values\":{{{values}}}}}"
  i=$((i+1))
done"#
        ),
    )
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        if let Some(c) = &self.child {
            // SIGTERM lets the daemon stop its trainers; then make sure it is gone.
            // SAFETY: signalling our own child process by pid.
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
        }
        if let Some(mut c) = self.child.take() {
            for _ in 0..100 {
                if matches!(c.try_wait(), Ok(Some(_))) {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Live (not zombie) child processes of `pid`, from /proc.
pub fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        let Some(child) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: comm may hold spaces, so split after the last ')'.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let mut fields = rest.split_whitespace();
        let state = fields.next().unwrap_or("");
        let ppid = fields.next().and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(pid) && state != "Z" {
            out.push(child);
        }
    }
    out
}

/// A process's state letter from /proc (`S` sleeping, `R` running, `T` stopped, `Z` zombie),
/// if it exists.
pub fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// Whether a process is still alive (and not a zombie).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, r)| r.split_whitespace().next() != Some("Z"))
        })
        .unwrap_or(false)
}
