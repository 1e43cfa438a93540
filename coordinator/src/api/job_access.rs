//! Who may see and act on which job: a client token its own team's jobs (another team's job is
//! NOT_FOUND, as a missing one: its existence is not told), an admin token every job, and, with
//! `--insecure-no-auth`, anyone every job. A job is its submitter's team's; its submitter is the
//! token's principal. docs/security.md, "Teams".

use super::status_of;
use crate::auth::{Caller, DEFAULT_TEAM};
use crate::state::JobState;
use crate::store::{JobRecord, Owner, Store, StoreError};
use tonic::{Request, Status};
use uuid::Uuid;

/// The verified caller of a request (`None` with `--insecure-no-auth`).
pub(super) fn caller_of<T>(req: &Request<T>) -> Option<Caller> {
    req.extensions().get::<Caller>().cloned()
}

/// Who a job the caller submits belongs to.
pub(super) fn owner_of(caller: Option<&Caller>) -> Owner<'_> {
    match caller {
        Some(c) => Owner {
            principal: &c.principal,
            team: &c.team,
        },
        None => Owner {
            principal: "",
            team: DEFAULT_TEAM,
        },
    }
}

/// Job `id`, if the caller may see it.
pub(super) async fn visible_job(
    store: &Store,
    id: Uuid,
    caller: Option<&Caller>,
) -> Result<JobRecord, Status> {
    let job = store.get_job(id).await.map_err(status_of)?;
    if caller.is_some_and(|c| !c.sees_team(&job.team)) {
        return Err(status_of(StoreError::NotFound {
            what: "job",
            id: id.to_string(),
        }));
    }
    Ok(job)
}

/// The team ListJobs reads: a client's own (naming another is refused), an admin's choice.
pub(super) fn listed_team(caller: Option<&Caller>, asked: &str) -> Result<Option<String>, Status> {
    let asked = (!asked.is_empty()).then(|| asked.to_string());
    match caller {
        Some(c) if !c.sees_team(asked.as_deref().unwrap_or(&c.team)) => {
            Err(Status::permission_denied(format!(
                "team: token {:?} lists team {}'s jobs only, not team {}'s",
                c.name,
                c.team,
                asked.unwrap_or_default()
            )))
        }
        Some(c) if asked.is_none() && !c.sees_team("") => Ok(Some(c.team.clone())),
        _ => Ok(asked),
    }
}

/// Queued jobs that wait for their team's GPUs say so in their reason.
pub(super) async fn explain_waiting(store: &Store, jobs: &mut [JobRecord]) -> Result<(), Status> {
    if !jobs.iter().any(|j| j.state == JobState::Queued) {
        return Ok(());
    }
    let teams = store.gpu_limited_teams().await.map_err(status_of)?;
    for j in jobs.iter_mut().filter(|j| j.state == JobState::Queued) {
        if let Some(t) = teams.get(&j.team) {
            let needs = j.spec.min_world_size;
            if let Some(why) = crate::teams::waiting_reason(&j.team, &t.limits, t.held_gpus, needs)
            {
                j.reason = why;
            }
        }
    }
    Ok(())
}
