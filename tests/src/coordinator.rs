//! The real `segtrain-coordinator` binary as a child process: start, wait until it serves,
//! kill -9, start again on the same port and database.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

pub struct CoordinatorProcess {
    database_url: String,
    port: u16,
    child: Option<Child>,
    log: PathBuf,
    _logdir: tempfile::TempDir,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port on 127.0.0.1")
}

impl CoordinatorProcess {
    /// Starts the coordinator on a free port and waits until its health service reports SERVING.
    pub async fn start(database_url: &str) -> CoordinatorProcess {
        let logdir = tempfile::tempdir().expect("temp dir for the coordinator log");
        let mut c = CoordinatorProcess {
            database_url: database_url.to_string(),
            port: free_port(),
            child: None,
            log: logdir.path().join("coordinator.log"),
            _logdir: logdir,
        };
        c.spawn().await;
        c
    }

    async fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open the coordinator log");
        let child = Command::new(crate::binaries::path("segtrain-coordinator"))
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--database-url")
            .arg(&self.database_url)
            .arg("--log-format")
            .arg("json")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn segtrain-coordinator");
        self.child = Some(child);
        self.wait_serving().await;
    }

    async fn wait_serving(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!(
                        "coordinator exited with {status}; log:\n{}",
                        self.log_text()
                    );
                }
            }
            if let Ok(ch) = Channel::from_shared(self.url())
                .expect("valid url")
                .connect()
                .await
            {
                let resp = HealthClient::new(ch)
                    .check(HealthCheckRequest {
                        service: "segtrain.v1.JobService".into(),
                    })
                    .await;
                if resp.is_ok_and(|r| r.get_ref().status == ServingStatus::Serving as i32) {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "coordinator not serving after 30 s; log:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// A connected channel.
    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.url())
            .expect("valid url")
            .connect()
            .await
            .expect("connect to the coordinator")
    }

    /// SIGKILL: no shutdown code runs, as in a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the coordinator again on the same port and database.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for CoordinatorProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
