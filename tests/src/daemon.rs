//! The real `segtrain-worker daemon` as a child process (a CPU worker), for end-to-end tests.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

pub struct DaemonProcess {
    child: Option<Child>,
    log: PathBuf,
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
        std::fs::create_dir_all(work_dir).expect("daemon work dir");
        let log = work_dir.join("daemon.log");
        let err = std::fs::File::create(&log).expect("daemon log");
        let child = Command::new(crate::binaries::path("segtrain-worker"))
            .args([
                "daemon",
                "--cpu",
                "--coordinator",
                url,
                "--host",
                host,
                "--grace-seconds",
                "5",
                // Two CPU workers share this machine's cores.
                "--torch-threads",
                "1",
            ])
            .arg("--work-dir")
            .arg(work_dir)
            .args(["--log-json", "true"])
            .args(args)
            .env_remove("SEGTRAIN_TOKEN")
            .env("RUST_LOG", "info")
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
