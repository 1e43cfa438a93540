//! A full disk on a worker (docs/security.md, "Nothing acknowledged is lost"): a checkpoint
//! that cannot be written leaves no half-written directory behind, the failure is the worker's
//! (its daemon takes no new rank, so the job's restart is not spent on the same full disk
//! again), and the finished rank's work dir is removed. The disk is a 4 MiB tmpfs, which needs
//! root (or CAP_SYS_ADMIN); where the machine cannot mount one the test says so and skips.

use segtrain_proto::v1 as pb;
use segtrain_tests::coordinator::CoordinatorProcess;
use segtrain_tests::daemon::DaemonProcess;
use segtrain_tests::dataset::{synth_dir, tiny_job};
use segtrain_tests::pg::TempPostgres;
use segtrain_tests::sql::{job_value, wait_until};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// A small tmpfs, unmounted on drop.
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn mount(at: &Path) -> Result<SmallDisk, String> {
        std::fs::create_dir_all(at).map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
            .arg(at)
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        Ok(SmallDisk(at.to_path_buf()))
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Every entry under `dir`, recursively (relative names).
fn entries(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            out.push(p.strip_prefix(dir).unwrap_or(&p).display().to_string());
            if p.is_dir() {
                stack.push(p);
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_leaves_no_half_checkpoint_and_does_not_burn_the_jobs_restarts() {
    let (tmp, data) = synth_dir(8, 2);
    let disk = match SmallDisk::mount(&tmp.path().join("small")) {
        Ok(d) => d,
        Err(why) => {
            eprintln!("SKIPPED: this machine cannot mount a tmpfs (needs root): {why}");
            return;
        }
    };
    let pg = TempPostgres::start().expect("PostgreSQL");
    let coord = CoordinatorProcess::start_with_args(
        &pg.url(),
        &["--lease-seconds", "30", "--restart-backoff-ms", "200"],
    )
    .await;
    let pool = sqlx::PgPool::connect(&pg.url()).await.expect("db");
    let work = tmp.path().join("work");
    let daemon = DaemonProcess::start(&coord.url(), "cpu-a", &work);
    let ckpt_root = disk.0.join("ckpt");
    let id = coord
        .submit_spec(pb::JobSpec {
            checkpoint_interval: Some(2),
            max_restarts: Some(3),
            ..tiny_job("full-disk", &data, &ckpt_root, 1, 20)
        })
        .await;
    let logs = || format!("{}\n{}", coord.log_text(), daemon.log_text());

    // The first checkpoint does not fit: the rank fails as the worker's disk.
    let sql = "SELECT coalesce((SELECT state NOT IN ('RUNNING', 'PENDING', 'RENDEZVOUS')
               FROM attempts WHERE job_id = $1::uuid AND attempt = 1), false)";
    wait_until(
        &pool,
        sql,
        &id,
        Duration::from_secs(180),
        "attempt 1 ends",
        logs,
    )
    .await;
    let reason: String = job_value(
        &pool,
        "SELECT reason FROM attempt_ranks WHERE job_id = $1::uuid AND attempt = 1",
        &id,
    )
    .await;
    assert!(
        reason.contains("No space left on device"),
        "{reason}\n{}",
        logs()
    );
    // Nothing half-written is left on the small disk.
    let left = entries(&disk.0);
    assert!(
        left.iter().all(|e| !e.contains(".tmp")),
        "half-written checkpoints left: {left:?}"
    );
    // The worker takes no new rank: the job waits for another worker, its restarts not spent.
    let sql = "SELECT leaving FROM workers WHERE $1 = $1";
    wait_until(
        &pool,
        sql,
        "",
        Duration::from_secs(30),
        "the worker says it is leaving",
        logs,
    )
    .await;
    let sql = "SELECT state = 'QUEUED' AND restarts = 1 FROM jobs WHERE id = $1::uuid";
    wait_until(
        &pool,
        sql,
        &id,
        Duration::from_secs(30),
        "the job waits queued",
        logs,
    )
    .await;
    let job = coord.get_job(&id).await;
    assert_eq!((job.attempt, job.restarts), (1, 1), "{}", job.reason);
    coord.cancel(&id, "done").await;
    let notes = segtrain_tests::coordinator::notes(&coord.job_events(&id).await);
    assert!(
        notes
            .iter()
            .any(|n| n.contains("the disk is full") && n.contains("takes no new rank")),
        "{notes:?}"
    );
    // The finished rank's work dir is gone.
    let ranks: Vec<String> = entries(&work)
        .into_iter()
        .filter(|e| e.contains(&id))
        .collect();
    assert!(ranks.is_empty(), "{ranks:?}");
}
