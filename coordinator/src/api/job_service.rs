//! `segtrain.v1.JobService`: submit, read, page, cancel and watch jobs.

use super::job_access::{caller_of, explain_waiting, listed_team, owner_of, visible_job};
use super::watch::{watch_job, Watchers};
use super::{convert, paging, parse_job_id, status_of};
use crate::auth::Caller;
use crate::state::JobState;
use crate::store::Store;
use crate::teams;
use segtrain_proto::job_spec::ProtoSpec;
use segtrain_proto::v1 as pb;
use segtrain_spec::JobSpec;
use std::pin::Pin;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use uuid::Uuid;

const DEFAULT_PAGE: u32 = 50;
const MAX_PAGE: u32 = 1000;
const DEFAULT_METRICS_LIMIT: u32 = 10_000;
const MAX_METRICS_LIMIT: u32 = 100_000;
const MAX_REASON_LEN: usize = 1024;
/// A state filter lists each state at most once, in practice; this bounds a repeated list.
const MAX_STATES: usize = 16;

pub struct JobApi {
    store: Store,
    watchers: Watchers,
}

impl JobApi {
    pub fn new(store: Store, watchers: Watchers) -> JobApi {
        JobApi { store, watchers }
    }
}

/// An idempotency key: empty (none) or 1-128 printable ASCII characters.
fn idempotency_key(k: &str) -> Result<Option<&str>, Status> {
    if k.is_empty() {
        return Ok(None);
    }
    if k.len() > 128 || !k.chars().all(|c| c.is_ascii_graphic()) {
        return Err(Status::invalid_argument(format!(
            "idempotency_key: must be 1-128 printable ASCII characters without spaces, got {} characters",
            k.chars().count()
        )));
    }
    Ok(Some(k))
}

fn page_size(n: u32) -> Result<u32, Status> {
    paging::size(n, DEFAULT_PAGE, MAX_PAGE)
}

fn job_states(states: &[i32]) -> Result<Vec<JobState>, Status> {
    if states.len() > MAX_STATES {
        return Err(Status::invalid_argument(format!(
            "states: at most {MAX_STATES} states, got {}",
            states.len()
        )));
    }
    states
        .iter()
        .map(|&s| {
            pb::JobState::try_from(s)
                .ok()
                .and_then(JobState::from_proto)
                .ok_or_else(|| {
                    let allowed: Vec<&str> = JobState::ALL.iter().map(|s| s.as_str()).collect();
                    Status::invalid_argument(format!(
                        "states: unknown job state {s}; allowed: {}",
                        allowed.join(", ")
                    ))
                })
        })
        .collect()
}

#[tonic::async_trait]
impl pb::job_service_server::JobService for JobApi {
    async fn submit_job(
        &self,
        req: Request<pb::SubmitJobRequest>,
    ) -> Result<Response<pb::SubmitJobResponse>, Status> {
        let caller = caller_of(&req);
        let req = req.into_inner();
        let key = idempotency_key(&req.idempotency_key)?;
        let spec = JobSpec::from_proto(&req.spec.unwrap_or_default())
            .map_err(|e| Status::invalid_argument(format!("spec.{e}")))?;
        let owner = owner_of(caller.as_ref());
        let limits = self
            .store
            .team_limits(owner.team)
            .await
            .map_err(status_of)?;
        teams::check_priority(owner.team, &limits, spec.priority)
            .and_then(|()| teams::check_paths(owner.team, &limits, &spec))
            .map_err(Status::invalid_argument)?;
        let (job, existing) = self
            .store
            .submit_job(&spec, key, owner)
            .await
            .map_err(status_of)?;
        if !existing {
            tracing::info!(target: "segtrain::audit", job = %job.id, attempt = job.attempt, name = %spec.name, world_size = spec.world_size, principal = %owner.principal, team = %owner.team, "job submitted");
        }
        // Also for an existing job: the warnings are about the spec, which is the same.
        let warnings = spec.warnings();
        if !existing && !warnings.is_empty() {
            tracing::info!(job = %job.id, ?warnings, "job submitted with warnings");
        }
        Ok(Response::new(pb::SubmitJobResponse {
            job: Some(convert::job(&job)),
            existing,
            warnings,
        }))
    }

    async fn get_job(&self, req: Request<pb::GetJobRequest>) -> Result<Response<pb::Job>, Status> {
        let id = parse_job_id("job_id", &req.get_ref().job_id)?;
        let job = visible_job(&self.store, id, caller_of(&req).as_ref()).await?;
        let mut jobs = [job];
        explain_waiting(&self.store, &mut jobs).await?;
        Ok(Response::new(convert::job(&jobs[0])))
    }

    async fn list_jobs(
        &self,
        req: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        let caller = caller_of(&req);
        let req = req.into_inner();
        let states = job_states(&req.states)?;
        let limit = page_size(req.page_size)?;
        let team = listed_team(caller.as_ref(), &req.team)?;
        let before = match req.page_token.as_str() {
            "" => None,
            t => Some(Uuid::parse_str(t).map_err(|_| {
                Status::invalid_argument(format!(
                    "page_token: not a token from a previous ListJobs response, got {t:?}"
                ))
            })?),
        };
        // One extra row tells whether another page exists.
        let mut jobs = self
            .store
            .list_jobs(&states, limit + 1, before, team.as_deref())
            .await
            .map_err(status_of)?;
        let more = jobs.len() > limit as usize;
        jobs.truncate(limit as usize);
        explain_waiting(&self.store, &mut jobs).await?;
        let next_page_token = match (more, jobs.last()) {
            (true, Some(last)) => last.id.to_string(),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListJobsResponse {
            jobs: jobs.iter().map(convert::job).collect(),
            next_page_token,
        }))
    }

    async fn cancel_job(
        &self,
        req: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::CancelJobResponse>, Status> {
        let caller = caller_of(&req);
        let req = req.into_inner();
        let id = parse_job_id("job_id", &req.job_id)?;
        if req.reason.len() > MAX_REASON_LEN {
            return Err(Status::invalid_argument(format!(
                "reason: at most {MAX_REASON_LEN} bytes, got {}",
                req.reason.len()
            )));
        }
        if let Some(why) = segtrain_proto::text::control_refusal(&req.reason, false) {
            return Err(Status::invalid_argument(format!("reason: {why}")));
        }
        let reason = if req.reason.is_empty() {
            "canceled by user"
        } else {
            req.reason.as_str()
        };
        visible_job(&self.store, id, caller.as_ref()).await?;
        let by = caller.as_ref().map(Caller::who);
        let job = self
            .store
            .cancel_job(id, reason, by.as_deref())
            .await
            .map_err(status_of)?;
        tracing::info!(target: "segtrain::audit", job = %id, attempt = job.attempt, state = %job.state, by = by.as_deref().unwrap_or("unauthenticated"), "job canceled");
        Ok(Response::new(pb::CancelJobResponse {
            job: Some(convert::job(&job)),
        }))
    }

    type WatchJobStream = Pin<Box<dyn Stream<Item = Result<pb::JobEvent, Status>> + Send>>;

    async fn watch_job(
        &self,
        req: Request<pb::WatchJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        let caller = req.extensions().get::<Caller>().cloned();
        let req = req.into_inner();
        let id = parse_job_id("job_id", &req.job_id)?;
        let after = i64::try_from(req.after_event_id).map_err(|_| {
            Status::invalid_argument(format!(
                "after_event_id: must be at most {}, got {}",
                i64::MAX,
                req.after_event_id
            ))
        })?;
        // Fail now, not inside the stream, when the job does not exist.
        visible_job(&self.store, id, caller.as_ref()).await?;
        // A place in the caller's quota, held by the stream until it ends.
        let slot = caller
            .map(|c| self.watchers.quota.acquire(c.token_id, &c.name))
            .transpose()?;
        let stream = watch_job(self.store.clone(), self.watchers.clone(), id, after, slot);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn list_checkpoints(
        &self,
        req: Request<pb::ListCheckpointsRequest>,
    ) -> Result<Response<pb::ListCheckpointsResponse>, Status> {
        let caller = caller_of(&req);
        let req = req.into_inner();
        let id = parse_job_id("job_id", &req.job_id)?;
        let size = paging::size(req.page_size, paging::DEFAULT_LIST, paging::MAX_LIST)?;
        let after = paging::token::<u64>(&req.page_token, "ListCheckpoints")?;
        visible_job(&self.store, id, caller.as_ref()).await?;
        let mut cps = self
            .store
            .list_checkpoints(id, req.include_deleted, after, size + 1)
            .await
            .map_err(status_of)?;
        let next_page_token = paging::next(&mut cps, size, |c| c.iteration);
        Ok(Response::new(pb::ListCheckpointsResponse {
            checkpoints: cps.iter().map(convert::checkpoint).collect(),
            next_page_token,
        }))
    }

    async fn list_attempts(
        &self,
        req: Request<pb::ListAttemptsRequest>,
    ) -> Result<Response<pb::ListAttemptsResponse>, Status> {
        let caller = caller_of(&req);
        let req = req.into_inner();
        let id = parse_job_id("job_id", &req.job_id)?;
        let size = paging::size(req.page_size, paging::DEFAULT_LIST, paging::MAX_LIST)?;
        let after = paging::token::<u32>(&req.page_token, "ListAttempts")?;
        visible_job(&self.store, id, caller.as_ref()).await?;
        let mut attempts = self
            .store
            .list_attempts(id, after.unwrap_or(0), size + 1)
            .await
            .map_err(status_of)?;
        let next_page_token = paging::next(&mut attempts, size, |a| a.attempt);
        Ok(Response::new(pb::ListAttemptsResponse {
            attempts: attempts.iter().map(convert::attempt).collect(),
            next_page_token,
        }))
    }

    async fn get_metrics(
        &self,
        req: Request<pb::GetMetricsRequest>,
    ) -> Result<Response<pb::GetMetricsResponse>, Status> {
        let caller = caller_of(&req);
        let req = req.into_inner();
        let id = parse_job_id("job_id", &req.job_id)?;
        if req.names.len() > 100 {
            return Err(Status::invalid_argument(format!(
                "names: at most 100 names, got {}",
                req.names.len()
            )));
        }
        if let Some(bad) = req
            .names
            .iter()
            .find(|n| n.is_empty() || n.len() > 64 || n.chars().any(char::is_control))
        {
            return Err(Status::invalid_argument(format!(
                "names: each name must be 1-64 bytes without control characters, got {bad:?}"
            )));
        }
        let limit = match req.limit {
            0 => DEFAULT_METRICS_LIMIT,
            1..=MAX_METRICS_LIMIT => req.limit,
            n => {
                return Err(Status::invalid_argument(format!(
                    "limit: must be 0 (default {DEFAULT_METRICS_LIMIT}) or 1..={MAX_METRICS_LIMIT}, got {n}"
                )))
            }
        };
        let since = req.since_iteration.min(i64::MAX as u64);
        visible_job(&self.store, id, caller.as_ref()).await?;
        let points = self
            .store
            .get_metrics(id, &req.names, since, limit)
            .await
            .map_err(status_of)?;
        Ok(Response::new(pb::GetMetricsResponse {
            points: points.iter().map(convert::metric).collect(),
        }))
    }
}
