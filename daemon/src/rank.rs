//! One rank on this worker: its rendezvous, its child trainer, the trainer's output, how it is
//! stopped and how it ended.

use super::lines::{Line, LineReader};
use super::metrics::Phase;
use super::trainer_process::{self, AttemptRank, Parsed};
use super::{stop_grace, Shared, StopRequest};
use segtrain_proto::job_spec::ProtoSpec;
use segtrain_proto::v1 as pb;
use segtrain_wire::{preview, LineError, MAX_LINE_BYTES};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::BufReader;
use tokio::sync::oneshot;
use tonic::Code;

/// Unreadable lines of one trainer that get a note each; later ones are only counted and
/// logged (a trainer that prints garbage every step must not flood the job's events).
const NOTED_LINES: u32 = 10;

/// Runs one rank: rendezvous, the child trainer, its events, its end.
pub(crate) async fn run_rank(
    shared: Arc<Shared>,
    a: pb::Assignment,
    mut stop_rx: oneshot::Receiver<StopRequest>,
) {
    let key = AttemptRank::of(&a);
    shared.metrics.set_phase(&key, Phase::Starting);
    let finish = |outcome: pb::RankOutcome, reason: String| {
        let name = outcome.as_str_name().trim_start_matches("RANK_OUTCOME_");
        tracing::info!(job = %key.job_id, attempt = key.attempt, rank = key.rank, outcome = name, reason = %reason, "trainer finished");
        shared.metrics.finished(&key, name);
        shared.emit(
            &key,
            pb::worker_event::Payload::Finished(pb::RankFinished {
                outcome: outcome as i32,
                reason: super::wire_text(&reason),
            }),
        );
        if let Ok(mut r) = shared.running.lock() {
            r.remove(&key);
        }
        shared.fence.ended(&key.to_string());
    };
    let stopped_reason =
        |r: Result<StopRequest, _>| r.map_or_else(|_| "stopped".into(), |s| s.reason);
    let spec = match segtrain_spec::JobSpec::from_proto(&a.spec.clone().unwrap_or_default()) {
        Ok(s) => s,
        Err(e) => {
            return finish(
                pb::RankOutcome::FailedDeterministic,
                format!("invalid spec: {e}"),
            )
        }
    };

    // Ranks > 0 wait for rank 0's endpoint (or a stop).
    let mut endpoint = None;
    if a.rank > 0 && a.world_size > 1 {
        loop {
            let req = pb::AwaitRendezvousRequest {
                worker_id: shared.worker_id(),
                job_id: a.job_id.clone(),
                attempt: a.attempt,
                timeout_seconds: 30,
                instance_id: shared.instance_id(),
                instance_secret: shared.instance_secret(),
            };
            let mut client = shared.client();
            tokio::select! {
                r = &mut stop_rx => return finish(pb::RankOutcome::Canceled, stopped_reason(r)),
                r = client.await_rendezvous(req) => match r {
                    Ok(r) => { endpoint = r.into_inner().endpoint; break; }
                    Err(e) if shared.fatal_refusal(&e) => {
                        return finish(pb::RankOutcome::Canceled, e.message().to_string())
                    }
                    Err(e) if matches!(e.code(), Code::DeadlineExceeded | Code::Unavailable | Code::Unknown) => continue,
                    Err(e) => return finish(pb::RankOutcome::FailedInfra, format!("rendezvous: {}", e.message())),
                }
            }
        }
    }

    let work_dir = shared
        .cfg
        .work_dir
        .join(rank_dir_name(shared.cfg.gpu, &key));
    let launch = trainer_process::Launch {
        exe: &shared.cfg.exe,
        assignment: &a,
        spec: &spec,
        work_dir: &work_dir,
        gpu: shared.cfg.gpu,
        rendezvous: endpoint,
        advertise_host: &shared.cfg.advertise_host,
        torch_threads: shared.cfg.torch_threads,
    };
    let (mut child, log) = match trainer_process::spawn(&launch) {
        Ok(c) => c,
        Err(e) => return finish(pb::RankOutcome::FailedInfra, format!("{e:#}")),
    };
    tracing::info!(job = %key.job_id, attempt = key.attempt, rank = key.rank, pid = child.id(), "trainer started");
    if let Some(pid) = child.id() {
        shared.fence.started(&key.to_string(), pid);
    }
    let Some(stdout) = child.stdout.take() else {
        return finish(pb::RankOutcome::FailedInfra, "trainer has no stdout".into());
    };
    let mut lines = LineReader::new(BufReader::new(stdout), MAX_LINE_BYTES);
    let mut stopped: Option<StopRequest> = None;
    let mut ended: Option<(bool, u64)> = None;
    let mut failed: Option<(bool, String)> = None;
    let mut stdout_open = true;
    let mut noted = 0u32;
    loop {
        tokio::select! {
            line = lines.next_line(), if stdout_open => match line {
                Ok(Some(line)) => {
                    let parsed = match line {
                        Line::Text(l) => trainer_process::parse_line(&l, &key.job_id, key.attempt)
                            .map_err(|e| (e, preview(&l, 200))),
                        Line::TooLong(n) => Err((LineError::TooLong(n), String::new())),
                        Line::NotUtf8 => Err((LineError::NotUtf8, String::new())),
                    };
                    match parsed {
                        Ok(Parsed::Ended { finished, iteration }) => ended = Some((finished, iteration)),
                        Ok(p) => handle(&shared, &key, p, &mut failed, stopped.is_some()).await,
                        Err((e, text)) => {
                            unreadable(&shared, &key, &e, &text, &mut noted);
                        }
                    }
                }
                _ => stdout_open = false,
            },
            r = &mut stop_rx, if stopped.is_none() => {
                let request = r.unwrap_or_else(|_| StopRequest {
                    reason: "stopped".to_string(),
                    grace: None,
                    preemption: false,
                });
                let grace = request.grace.or_else(|| shared.coordinator_grace());
                stopped = Some(request);
                shared.metrics.set_phase(&key, Phase::Stopping);
                terminate(&mut child, stop_grace(shared.cfg.grace, grace)).await;
            }
            status = child.wait(), if !stdout_open => {
                let (outcome, reason) = outcome_of(stopped.take(), ended, failed.take(), status, &log);
                remove_work_dir(&work_dir);
                return finish(outcome, reason);
            }
        }
    }
}

/// One line the trainer printed, understood.
async fn handle(
    shared: &Shared,
    key: &AttemptRank,
    p: Parsed,
    failed: &mut Option<(bool, String)>,
    stopping: bool,
) {
    match p {
        Parsed::Event(p) => {
            match &p {
                pb::worker_event::Payload::Started(_) if !stopping => {
                    shared.metrics.set_phase(key, Phase::Running)
                }
                pb::worker_event::Payload::Metrics(m) => {
                    shared.metrics.observe(m.iteration, &m.values);
                    let v = |k: &str| m.values.get(k).copied().unwrap_or(f64::NAN);
                    tracing::info!(job = %key.job_id, attempt = key.attempt, rank = key.rank, iteration = m.iteration, loss = v("loss"), lr = v("lr"), images_per_s = v("images_per_s"), step_ms = v("step_ms"), data_wait_ms = v("data_wait_ms"), "progress");
                }
                _ => {}
            }
            shared.emit(key, p)
        }
        Parsed::Local { iteration, values } => shared.metrics.observe(iteration, &values),
        Parsed::Checkpoint { complete, deleted } => {
            shared.emit(key, complete);
            if let Some(d) = deleted {
                shared.emit(key, d);
            }
        }
        Parsed::Failed {
            deterministic,
            disk_full,
            reason,
        } => {
            if disk_full {
                shared.disk_full(key, &reason);
                // Said before the rank's end is reported, so its restart is not placed here.
                let _ = tokio::time::timeout(Duration::from_secs(5), super::beat(shared)).await;
            }
            *failed = Some((deterministic, reason))
        }
        Parsed::Rendezvous(ep) => publish(shared, key, ep).await,
        Parsed::Collective { backend, detail } => {
            tracing::info!(job = %key.job_id, attempt = key.attempt, rank = key.rank, backend, detail, "collective ready")
        }
        Parsed::Ended { .. } => {}
    }
}

/// A line that could not be read: counted, logged, and (the first few) noted on the job.
fn unreadable(shared: &Shared, key: &AttemptRank, e: &LineError, text: &str, noted: &mut u32) {
    shared
        .metrics
        .lines_dropped
        .with_label_values(&[e.reason()])
        .inc();
    tracing::warn!(job = %key.job_id, attempt = key.attempt, rank = key.rank, error = %e, line = %text, "unreadable trainer output; dropped");
    *noted += 1;
    let line = if text.is_empty() {
        String::new()
    } else {
        format!(": {text}")
    };
    if *noted <= NOTED_LINES {
        shared.note(
            key,
            &format!(
                "the trainer of rank {} printed {e}; the daemon dropped that line{line}",
                key.rank
            ),
        );
    }
    if *noted == NOTED_LINES {
        shared.note(
            key,
            &format!(
                "further unreadable lines of rank {} are counted \
                 (segtrain_worker_trainer_lines_dropped_total) and logged by its daemon, not noted",
                key.rank
            ),
        );
    }
}

/// How a trainer ended: finished (even if a stop came too late to matter), stopped on this
/// daemon's request (PREEMPTED when its host is going away, else CANCELED, whatever its exit
/// status), stopped with its peers on another rank's request (CANCELED: the attempt decides),
/// failed as the trainer classified it, or killed (an infrastructure failure: OOM killer,
/// operator, crash).
pub(crate) fn outcome_of(
    stopped: Option<StopRequest>,
    ended: Option<(bool, u64)>,
    failed: Option<(bool, String)>,
    status: std::io::Result<std::process::ExitStatus>,
    log: &std::path::Path,
) -> (pb::RankOutcome, String) {
    use std::os::unix::process::ExitStatusExt;
    let clean_exit = status.as_ref().is_ok_and(|s| s.success());
    match (stopped, failed, status) {
        (_, None, Ok(s)) if s.success() && matches!(ended, Some((true, _))) => {
            (pb::RankOutcome::Succeeded, String::new())
        }
        (Some(s), _, _) if s.preemption => (pb::RankOutcome::Preempted, s.reason),
        (Some(s), _, _) => (pb::RankOutcome::Canceled, s.reason),
        (None, None, Ok(_)) if clean_exit && matches!(ended, Some((false, _))) => {
            let iteration = ended.map_or(0, |(_, i)| i);
            (
                pb::RankOutcome::Canceled,
                format!(
                    "stopped with its peers after iteration {iteration}, on another rank's request"
                ),
            )
        }
        (None, _, Ok(s)) if s.success() => (pb::RankOutcome::Succeeded, String::new()),
        (None, Some((true, reason)), Ok(_)) => (pb::RankOutcome::FailedDeterministic, reason),
        (None, Some((false, reason)), Ok(_)) => (pb::RankOutcome::FailedInfra, reason),
        (None, None, Ok(s)) => match s.signal() {
            Some(sig) => (
                pb::RankOutcome::FailedInfra,
                format!("the trainer was killed by signal {sig}"),
            ),
            None => (
                pb::RankOutcome::FailedInfra,
                format!(
                    "the trainer exited with {s}: {}",
                    trainer_process::log_tail(log, 3)
                ),
            ),
        },
        (None, _, Err(e)) => (
            pb::RankOutcome::FailedInfra,
            format!("cannot wait for the trainer: {e}"),
        ),
    }
}

/// Removes a finished rank's work dir (its job file, its trainer's log, a checkpoint's staging
/// copy): what the rank's end needed from it is read by now.
pub(crate) fn remove_work_dir(dir: &std::path::Path) {
    if let Err(e) = std::fs::remove_dir_all(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot remove a finished rank's work dir");
        }
    }
}

/// A rank's work dir name: `<cpu|gpuN>-<job id>-a<attempt>-r<rank>` (the worker's label
/// first: daemons of several GPUs may share a work dir).
pub(crate) fn rank_dir_name(gpu: Option<u32>, key: &AttemptRank) -> String {
    let label = crate::instance::label(gpu);
    format!("{label}-{}-a{}-r{}", key.job_id, key.attempt, key.rank)
}

/// Whether a work dir entry is a rank dir of the worker `gpu` (see [`rank_dir_name`]).
pub(crate) fn is_rank_dir(gpu: Option<u32>, name: &str) -> bool {
    let label = crate::instance::label(gpu);
    let Some(name) = name.strip_prefix(&format!("{label}-")) else {
        return false;
    };
    let Some((job, rest)) = name.split_at_checked(36) else {
        return false;
    };
    uuid::Uuid::parse_str(job).is_ok()
        && rest
            .strip_prefix("-a")
            .and_then(|r| r.split_once("-r"))
            .is_some_and(|(a, r)| a.parse::<u32>().is_ok() && r.parse::<u32>().is_ok())
}

/// SIGTERM, then SIGKILL after the grace period (a trainer paused by the fence is continued
/// first, so that it can exit).
async fn terminate(child: &mut tokio::process::Child, grace: Duration) {
    if let Some(pid) = child.id() {
        // SAFETY: signalling our own child process by its pid.
        unsafe {
            libc::kill(pid as i32, libc::SIGTERM);
        }
        crate::fence::Fence::release(pid);
    }
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        let _ = child.kill().await;
    }
}

/// Publishes rank 0's endpoint, retrying while the coordinator is unreachable.
async fn publish(shared: &Shared, key: &AttemptRank, ep: pb::publish_rendezvous_request::Endpoint) {
    for _ in 0..60 {
        let req = pb::PublishRendezvousRequest {
            worker_id: shared.worker_id(),
            job_id: key.job_id.clone(),
            attempt: key.attempt,
            endpoint: Some(ep.clone()),
            instance_id: shared.instance_id(),
            instance_secret: shared.instance_secret(),
        };
        match shared.client().publish_rendezvous(req).await {
            Ok(_) => {
                tracing::info!(job = %key.job_id, attempt = key.attempt, rank = key.rank, "rendezvous published");
                return;
            }
            Err(e) if shared.fatal_refusal(&e) => return,
            Err(e) if e.code() == Code::Unavailable => {
                tokio::time::sleep(Duration::from_secs(1)).await
            }
            Err(e) => {
                tracing::warn!(job = %key.job_id, attempt = key.attempt, rank = key.rank, error = %e.message(), "cannot publish the rendezvous");
                return;
            }
        }
    }
}
