//! One trainer child process: `segtrain-worker train --json ...` for one rank of one attempt.
//! Its stdout is a stream of [`segtrain_wire::TrainerLine`]s that become `segtrain.v1.WorkerEvent`s;
//! a crash or hang of the child never takes the daemon down.

use base64::Engine;
use segtrain_proto::v1 as pb;
use segtrain_wire::checkpoint_location::{self, CheckpointLocation};
use segtrain_wire::{self as wire, FailureClass, LineError, ResumeCandidate, TrainerLine};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use tokio::process::{Child, Command};

/// One rank of one attempt of a job (`segtrain.v1.AttemptRank`; `attempt_ranks` in the store).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AttemptRank {
    pub job_id: String,
    pub attempt: u32,
    pub rank: u32,
}

impl std::fmt::Display for AttemptRank {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.job_id, self.attempt, self.rank)
    }
}

impl AttemptRank {
    pub fn of(a: &pb::Assignment) -> AttemptRank {
        AttemptRank {
            job_id: a.job_id.clone(),
            attempt: a.attempt,
            rank: a.rank,
        }
    }

    pub fn to_proto(&self) -> pb::AttemptRank {
        pb::AttemptRank {
            job_id: self.job_id.clone(),
            attempt: self.attempt,
            rank: self.rank,
        }
    }

    /// The token peers of this attempt share, so a stale peer cannot join a new attempt.
    pub fn token(&self) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in self.job_id.bytes().chain(self.attempt.to_le_bytes()) {
            h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
        h >> 1 // fits an i64 for the CLI
    }
}

/// What the trainer said, translated.
#[derive(Debug)]
pub enum Parsed {
    Event(pb::worker_event::Payload),
    /// A checkpoint that completed, and the old ones retention deleted with it.
    Checkpoint {
        complete: pb::worker_event::Payload,
        deleted: Option<pb::worker_event::Payload>,
    },
    Rendezvous(pb::publish_rendezvous_request::Endpoint),
    /// The trainer's last word before a failing exit: whether a restart would repeat it, and
    /// whether this worker's disk is full.
    Failed {
        deterministic: bool,
        disk_full: bool,
        reason: String,
    },
    /// A rank's own metrics (`rank_metrics`, ranks other than 0): for this daemon's gauges only.
    Local {
        iteration: u64,
        values: HashMap<String, f64>,
    },
    /// The trainer's collective backend is up: logged by the daemon.
    Collective {
        backend: String,
        detail: String,
    },
    /// The trainer's run is over: it finished `max_iters`, or it stopped (on its own rank's or
    /// a peer's request) after `iteration` with a checkpoint. With the exit status this decides
    /// the rank's outcome.
    Ended {
        finished: bool,
        iteration: u64,
    },
}

fn values(v: &wire::Values) -> HashMap<String, f64> {
    v.iter().map(|(k, x)| (k.clone(), x.0)).collect()
}

/// Parses one stdout line of `train --json` (see [`segtrain_wire::line`]).
pub fn parse_line(line: &str, job_id: &str, attempt: u32) -> Result<Parsed, LineError> {
    use pb::worker_event::Payload;
    Ok(match TrainerLine::parse(line)? {
        TrainerLine::Started(_) => Parsed::Event(Payload::Started(pb::RankStarted {})),
        TrainerLine::Metrics {
            iteration,
            values: v,
        } => Parsed::Event(Payload::Metrics(pb::MetricsReport {
            iteration,
            values: values(&v),
        })),
        TrainerLine::RankMetrics {
            iteration,
            values: v,
        } => Parsed::Local {
            iteration,
            values: values(&v),
        },
        TrainerLine::Eval {
            iteration,
            miou,
            aacc,
            loss,
            class_iou,
            ..
        } => Parsed::Event(Payload::Eval(pb::EvalReport {
            iteration,
            miou: miou.0,
            aacc: aacc.0,
            loss: loss.0,
            class_iou: class_iou.iter().map(|x| x.0).collect(),
        })),
        TrainerLine::CheckpointPending { iteration, uri } => {
            Parsed::Event(Payload::CheckpointPending(pb::CheckpointPending {
                iteration,
                uri,
            }))
        }
        TrainerLine::Resumed {
            iteration,
            uri,
            skipped,
        } => Parsed::Event(Payload::Resumed(pb::Resumed {
            iteration,
            uri,
            skipped: skipped
                .into_iter()
                .map(|s| pb::SkippedCheckpoint {
                    iteration: s.iteration,
                    uri: s.uri,
                    reason: s.reason,
                })
                .collect(),
        })),
        TrainerLine::Failed { class, reason } => Parsed::Failed {
            deterministic: class == FailureClass::Deterministic,
            disk_full: class == FailureClass::DiskFull,
            reason,
        },
        TrainerLine::Checkpoint {
            iteration,
            uri,
            bytes,
            sha256,
            metrics,
            deleted,
            on_stop,
        } => Parsed::Checkpoint {
            deleted: (!deleted.is_empty()).then_some(Payload::CheckpointsDeleted(
                pb::CheckpointsDeleted { uris: deleted },
            )),
            complete: Payload::Checkpoint(pb::CheckpointReport {
                checkpoint: Some(pb::Checkpoint {
                    job_id: job_id.to_string(),
                    attempt,
                    iteration,
                    uri,
                    bytes,
                    sha256,
                    state: pb::CheckpointState::Complete as i32,
                    metrics: values(&metrics),
                    created_at: None,
                    on_stop,
                }),
            }),
        },
        TrainerLine::Rendezvous {
            tcp_address,
            nccl_unique_id,
        } => match (tcp_address, nccl_unique_id) {
            (Some(addr), _) => {
                Parsed::Rendezvous(pb::publish_rendezvous_request::Endpoint::TcpAddress(addr))
            }
            (None, Some(id)) => {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(&id)
                    .map_err(|e| LineError::Malformed {
                        kind: "rendezvous".into(),
                        error: format!("nccl_unique_id is not base64: {e}"),
                    })?;
                Parsed::Rendezvous(pb::publish_rendezvous_request::Endpoint::NcclUniqueId(
                    bytes,
                ))
            }
            (None, None) => {
                return Err(LineError::Malformed {
                    kind: "rendezvous".into(),
                    error: "no tcp_address nor nccl_unique_id".into(),
                })
            }
        },
        TrainerLine::Collective(c) => Parsed::Collective {
            backend: c.backend,
            detail: c.detail,
        },
        TrainerLine::Stopped { iteration } => Parsed::Ended {
            finished: false,
            iteration,
        },
        TrainerLine::Finished { iteration, .. } => Parsed::Ended {
            finished: true,
            iteration,
        },
    })
}

/// How a trainer is started.
pub struct Launch<'a> {
    pub exe: &'a Path,
    pub assignment: &'a pb::Assignment,
    pub spec: &'a segtrain_spec::JobSpec,
    pub work_dir: &'a Path,
    /// None: CPU.
    pub gpu: Option<u32>,
    /// For ranks > 0: the endpoint rank 0 published.
    pub rendezvous: Option<pb::await_rendezvous_response::Endpoint>,
    /// Host other ranks can reach rank 0's TCP listener on.
    pub advertise_host: &'a str,
    pub torch_threads: Option<u32>,
}

/// Writes the job file and starts the child. Its stderr goes to `<work_dir>/trainer.log`.
pub fn spawn(l: &Launch<'_>) -> anyhow::Result<(Child, PathBuf)> {
    use anyhow::Context;
    let a = l.assignment;
    let key = AttemptRank::of(a);
    std::fs::create_dir_all(l.work_dir)
        .with_context(|| format!("cannot create {}", l.work_dir.display()))?;
    let config = l.work_dir.join("job.toml");
    std::fs::write(&config, l.spec.to_toml())
        .with_context(|| format!("cannot write {}", config.display()))?;
    let log = l.work_dir.join("trainer.log");
    let stderr =
        std::fs::File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
    // One directory per attempt: a stale trainer of an earlier attempt (a partitioned worker
    // that has not noticed yet) can never overwrite or delete the current attempt's files.
    let (checkpoint_dir, checkpoint_uri) = match checkpoint_location::locate(
        &l.spec.checkpoint_root,
        &checkpoint_location::attempt_subdir(&a.job_id, a.attempt),
    )? {
        CheckpointLocation::Local(dir) => (dir, None),
        CheckpointLocation::Remote(uri) => (l.work_dir.join("staging"), Some(uri)),
    };

    let rendezvous = rendezvous_arg(
        l.rendezvous.as_ref(),
        a.rank,
        a.world_size,
        l.gpu,
        l.advertise_host,
    )?;
    let mut cmd = Command::new(l.exe);
    cmd.arg("train")
        .arg("--config")
        .arg(&config)
        .arg("--json")
        .arg("--rank")
        .arg(a.rank.to_string())
        .arg("--world")
        .arg(a.world_size.to_string())
        // The attempt's accumulation, when an elastic job runs shrunk (more than the spec's).
        .args(
            (a.accumulate_steps > 0 && a.accumulate_steps != l.spec.accumulate_steps)
                .then(|| {
                    [
                        "--accumulate-steps".to_string(),
                        a.accumulate_steps.to_string(),
                    ]
                })
                .into_iter()
                .flatten(),
        )
        .arg("--rendezvous")
        .arg(&rendezvous)
        .arg("--rendezvous-token")
        .arg(key.token().to_string())
        .arg("--checkpoint-dir")
        .arg(&checkpoint_dir)
        .args(
            checkpoint_uri
                .iter()
                .flat_map(|u| ["--checkpoint-uri", u.as_str()]),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .kill_on_drop(true);
    if let Some(n) = l.torch_threads {
        // libtorch's intra-op pool reads these at start.
        cmd.env("OMP_NUM_THREADS", n.to_string())
            .env("MKL_NUM_THREADS", n.to_string());
    }
    if !a.resume_candidates.is_empty() {
        let candidates: Vec<ResumeCandidate> = a
            .resume_candidates
            .iter()
            .map(|c| ResumeCandidate {
                uri: c.uri.clone(),
                iteration: c.iteration,
                sha256: c.sha256.clone(),
            })
            .collect();
        let file = l.work_dir.join("resume.json");
        std::fs::write(&file, serde_json::to_vec_pretty(&candidates)?)
            .with_context(|| format!("cannot write {}", file.display()))?;
        cmd.arg("--resume-candidates").arg(&file);
    } else if !a.resume_from.is_empty() {
        cmd.arg("--resume-from").arg(&a.resume_from);
    }
    // The trainer dies with the daemon (even on kill -9 of the daemon): a trainer nobody
    // supervises would hold its GPU and keep writing checkpoints for an attempt that is over.
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    match l.gpu {
        // One process per GPU: the trainer always sees its GPU as device 0.
        Some(g) => {
            cmd.env("CUDA_VISIBLE_DEVICES", g.to_string())
                .arg("--device")
                .arg("cuda");
        }
        None => {
            cmd.arg("--device").arg("cpu");
        }
    }
    let child = cmd
        .spawn()
        .with_context(|| format!("cannot start {}", l.exe.display()))?;
    Ok((child, log))
}

/// The last lines of a trainer's log: the reason of a failure.
pub fn log_tail(log: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let all: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    all[all.len().saturating_sub(lines)..].join(" | ")
}

/// The trainer's `--rendezvous`. GPU ranks always meet over NCCL, a world of 1 too (a
/// communicator of one rank: the collectives are skipped, but NCCL is loaded and initialised
/// exactly as for a bigger world, so a host whose NCCL is broken fails on its first job, not on
/// its first multi-GPU one). CPU ranks use the TCP collective, and a CPU world of 1 none.
fn rendezvous_arg(
    endpoint: Option<&pb::await_rendezvous_response::Endpoint>,
    rank: u32,
    world: u32,
    gpu: Option<u32>,
    advertise_host: &str,
) -> anyhow::Result<String> {
    use pb::await_rendezvous_response::Endpoint;
    Ok(match (endpoint, rank, gpu) {
        (_, 0, Some(_)) => "nccl-create".to_string(),
        (_, _, None) if world == 1 => "single".to_string(),
        (None, 0, None) => format!("tcp-listen:{advertise_host}:0"),
        (Some(Endpoint::TcpAddress(addr)), _, _) => format!("tcp:{addr}"),
        (Some(Endpoint::NcclUniqueId(id)), _, _) => {
            format!(
                "nccl:{}",
                base64::engine::general_purpose::STANDARD.encode(id)
            )
        }
        (None, _, _) => anyhow::bail!("rank {rank} needs rank 0's rendezvous endpoint"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_ranks_meet_over_nccl_even_alone_and_cpu_ranks_over_tcp() {
        use pb::await_rendezvous_response::Endpoint;
        let r = |e: Option<&Endpoint>, rank, world, gpu| {
            rendezvous_arg(e, rank, world, gpu, "10.0.0.9")
        };
        assert_eq!(r(None, 0, 1, Some(0)).expect("gpu alone"), "nccl-create");
        assert_eq!(r(None, 0, 4, Some(3)).expect("gpu rank 0"), "nccl-create");
        assert_eq!(r(None, 0, 1, None).expect("cpu alone"), "single");
        assert_eq!(
            r(None, 0, 2, None).expect("cpu rank 0"),
            "tcp-listen:10.0.0.9:0"
        );
        let tcp = Endpoint::TcpAddress("10.0.0.1:4000".into());
        assert_eq!(
            r(Some(&tcp), 1, 2, None).expect("cpu rank 1"),
            "tcp:10.0.0.1:4000"
        );
        let id = Endpoint::NcclUniqueId(vec![1, 2, 3]);
        assert_eq!(
            r(Some(&id), 1, 2, Some(1)).expect("gpu rank 1"),
            "nccl:AQID"
        );
        let err = r(None, 1, 2, Some(1)).expect_err("no endpoint");
        assert!(err.to_string().contains("rank 1"), "{err}");
    }

    #[test]
    fn parses_every_event_kind() {
        let p = |l: &str| parse_line(l, "job", 2).expect("parses");
        assert!(matches!(
            p(
                r#"{"event":"started","start_iteration":0,"max_iters":9,"train_images":1,"val_images":1,"device":"cpu","parameters":5}"#
            ),
            Parsed::Event(pb::worker_event::Payload::Started(_))
        ));
        match p(r#"{"event":"metrics","iteration":50,"values":{"loss":0.5,"lr":null}}"#) {
            Parsed::Event(pb::worker_event::Payload::Metrics(m)) => {
                assert_eq!(m.iteration, 50);
                assert_eq!(m.values["loss"], 0.5);
                assert!(m.values["lr"].is_nan());
            }
            other => panic!("{other:?}"),
        }
        match p(
            r#"{"event":"checkpoint","iteration":100,"uri":"/c/ckpt-00000100","bytes":7,"sha256":"ab","metrics":{"miou":0.5},"deleted":["/c/ckpt-00000050"]}"#,
        ) {
            Parsed::Checkpoint {
                complete: pb::worker_event::Payload::Checkpoint(c),
                deleted: Some(pb::worker_event::Payload::CheckpointsDeleted(d)),
            } => {
                let c = c.checkpoint.expect("checkpoint");
                assert_eq!((c.iteration, c.bytes, c.attempt), (100, 7, 2));
                assert_eq!(c.uri, "/c/ckpt-00000100");
                assert_eq!(d.uris, ["/c/ckpt-00000050"]);
            }
            other => panic!("{other:?}"),
        }
        match p(r#"{"event":"checkpoint_pending","iteration":100,"uri":"/c/ckpt-00000100"}"#) {
            Parsed::Event(pb::worker_event::Payload::CheckpointPending(c)) => {
                assert_eq!((c.iteration, c.uri.as_str()), (100, "/c/ckpt-00000100"))
            }
            other => panic!("{other:?}"),
        }
        match p(
            r#"{"event":"resumed","iteration":40,"uri":"/c/a","skipped":[{"iteration":60,"uri":"/c/b","reason":"bad"}]}"#,
        ) {
            Parsed::Event(pb::worker_event::Payload::Resumed(r)) => {
                assert_eq!((r.iteration, r.uri.as_str()), (40, "/c/a"));
                assert_eq!(r.skipped.len(), 1);
                assert_eq!(
                    (r.skipped[0].iteration, r.skipped[0].reason.as_str()),
                    (60, "bad")
                );
            }
            other => panic!("{other:?}"),
        }
        match p(r#"{"event":"failed","class":"deterministic","reason":"no data"}"#) {
            Parsed::Failed {
                deterministic: true,
                disk_full: false,
                reason,
            } => assert_eq!(reason, "no data"),
            other => panic!("{other:?}"),
        }
        match p(r#"{"event":"rendezvous","tcp_address":"10.0.0.1:4000"}"#) {
            Parsed::Rendezvous(pb::publish_rendezvous_request::Endpoint::TcpAddress(a)) => {
                assert_eq!(a, "10.0.0.1:4000")
            }
            other => panic!("{other:?}"),
        }
        match p(r#"{"event":"rank_metrics","iteration":5,"values":{"step_ms":12.5}}"#) {
            Parsed::Local { iteration, values } => {
                assert_eq!((iteration, values["step_ms"]), (5, 12.5))
            }
            other => panic!("{other:?}"),
        }
        match p(r#"{"event":"collective","backend":"nccl","detail":"NCCL 2.28.9"}"#) {
            Parsed::Collective { backend, detail } => {
                assert_eq!((backend.as_str(), detail.as_str()), ("nccl", "NCCL 2.28.9"))
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            p(r#"{"event":"finished","iteration":5}"#),
            Parsed::Ended {
                finished: true,
                iteration: 5
            }
        ));
        assert!(matches!(
            p(r#"{"event":"stopped","iteration":5}"#),
            Parsed::Ended {
                finished: false,
                iteration: 5
            }
        ));
        assert!(matches!(
            parse_line("not json", "job", 1),
            Err(LineError::NotJson(_))
        ));
        assert!(matches!(
            parse_line(r#"{"event":"rendezvous"}"#, "job", 1),
            Err(LineError::Malformed { .. })
        ));
        assert!(matches!(
            parse_line(r#"{"event":"rendezvous","nccl_unique_id":"%%"}"#, "job", 1),
            Err(LineError::Malformed { .. })
        ));
    }

    #[test]
    fn tokens_differ_per_attempt() {
        let k = |a| AttemptRank {
            job_id: "j".into(),
            attempt: a,
            rank: 0,
        };
        assert_ne!(k(1).token(), k(2).token());
        assert_eq!(k(1).token(), k(1).token());
        assert!(k(1).token() <= i64::MAX as u64);
    }
}
