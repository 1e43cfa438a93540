//! Store records to protobuf messages.

use crate::store::{
    AttemptRank, AttemptRecord, CheckpointRecord, EventRecord, JobRecord, MetricPoint,
    RankAssignment, RendezvousEndpoint, WorkerRecord,
};
use chrono::{DateTime, Utc};
use segtrain_proto::job_spec::ProtoSpec;
use segtrain_proto::v1 as pb;
use segtrain_proto::Timestamp;

pub(crate) fn timestamp(t: DateTime<Utc>) -> Timestamp {
    Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

pub(crate) fn job(j: &JobRecord) -> pb::Job {
    pb::Job {
        id: j.id.to_string(),
        spec: Some(j.spec.to_proto()),
        state: j.state.to_proto() as i32,
        attempt: j.attempt,
        restarts: j.restarts,
        preemptions: j.preemptions,
        attempt_world_size: j.attempt_world_size,
        attempt_accumulate_steps: j.attempt_accumulate_steps,
        idempotency_key: j.idempotency_key.clone().unwrap_or_default(),
        reason: j.reason.clone(),
        created_at: Some(timestamp(j.created_at)),
        updated_at: Some(timestamp(j.updated_at)),
        finished_at: j.finished_at.map(timestamp),
        iteration: j.iteration,
        furthest_iteration: j.furthest_iteration,
        resumed_from_iteration: j.resumed_from_iteration,
        submitted_by: j.submitted_by.clone(),
        team: j.team.clone(),
    }
}

pub(crate) fn event(e: &EventRecord) -> pb::JobEvent {
    let job_id = e.job_id.to_string();
    pb::JobEvent {
        id: e.id as u64,
        payload: Some(e.payload.to_proto(&job_id, e.attempt)),
        job_id,
        attempt: e.attempt,
        time: Some(timestamp(e.created_at)),
    }
}

pub(crate) fn checkpoint(c: &CheckpointRecord) -> pb::Checkpoint {
    let state = match c.state.as_str() {
        "PENDING" => pb::CheckpointState::Pending,
        "COMPLETE" => pb::CheckpointState::Complete,
        "DELETED" => pb::CheckpointState::Deleted,
        "CORRUPT" => pb::CheckpointState::Corrupt,
        _ => pb::CheckpointState::Unspecified,
    };
    pb::Checkpoint {
        job_id: c.job_id.to_string(),
        attempt: c.attempt,
        iteration: c.iteration,
        uri: c.uri.clone(),
        bytes: c.bytes,
        sha256: c.sha256.clone(),
        state: state as i32,
        metrics: c.metrics.clone().into_iter().collect(),
        created_at: Some(timestamp(c.created_at)),
        on_stop: c.on_stop,
    }
}

pub(crate) fn attempt(a: &AttemptRecord) -> pb::Attempt {
    pb::Attempt {
        attempt: a.attempt,
        state: a.state.to_proto() as i32,
        world_size: a.world_size,
        accumulate_steps: a.accumulate_steps,
        reason: a.reason.clone(),
        resumed_from_iteration: a.resumed_from_iteration,
        workers: a.workers.clone(),
        created_at: Some(timestamp(a.created_at)),
        finished_at: a.finished_at.map(timestamp),
    }
}

pub(crate) fn metric(m: &MetricPoint) -> pb::MetricPoint {
    pb::MetricPoint {
        attempt: m.attempt,
        iteration: m.iteration,
        name: m.name.clone(),
        value: m.value,
    }
}

pub(crate) fn worker(w: &WorkerRecord) -> pb::Worker {
    let (job_id, attempt, rank) = match w.assignment {
        Some((j, a, r)) => (j.to_string(), a, r),
        None => (String::new(), 0, 0),
    };
    pb::Worker {
        id: w.id.to_string(),
        host: w.host.clone(),
        gpu_index: w.gpu_index,
        gpu_name: w.gpu_name.clone(),
        gpu_memory_bytes: w.gpu_memory_bytes,
        state: w.state.to_proto() as i32,
        job_id,
        attempt,
        rank,
        last_heartbeat: Some(timestamp(w.last_heartbeat)),
        lease_until: Some(timestamp(w.lease_until)),
        leaving: w.leaving,
    }
}

pub(crate) fn attempt_rank(r: &AttemptRank) -> pb::AttemptRank {
    pb::AttemptRank {
        job_id: r.job_id.to_string(),
        attempt: r.attempt,
        rank: r.rank,
    }
}

/// A `start`: the resolved spec, the rank, and where to resume from (empty: start fresh).
pub(crate) fn assignment(a: &RankAssignment) -> pb::Assignment {
    pb::Assignment {
        job_id: a.job_id.to_string(),
        attempt: a.attempt,
        rank: a.rank,
        world_size: a.world_size,
        accumulate_steps: a.accumulate_steps,
        spec: Some(a.spec.to_proto()),
        resume_from: a.resume_uri.clone().unwrap_or_default(),
        resume_iteration: a.resume_iteration,
        resume_candidates: a
            .resume_candidates
            .iter()
            .map(|c| pb::ResumeCandidate {
                uri: c.uri.clone(),
                iteration: c.iteration,
                sha256: c.sha256.clone(),
            })
            .collect(),
    }
}

pub(crate) fn stop_assignment(
    a: &RankAssignment,
    grace_seconds: u32,
    reason: String,
) -> pb::StopAssignment {
    pb::StopAssignment {
        job_id: a.job_id.to_string(),
        attempt: a.attempt,
        grace_seconds,
        reason,
        rank: a.rank,
    }
}

pub(crate) fn rendezvous(e: RendezvousEndpoint) -> pb::await_rendezvous_response::Endpoint {
    use pb::await_rendezvous_response::Endpoint;
    match e {
        RendezvousEndpoint::Nccl(b) => Endpoint::NcclUniqueId(b),
        RendezvousEndpoint::Tcp(a) => Endpoint::TcpAddress(a),
    }
}
