//! `segtrain.v1.TeamService`: teams' limits (admin tokens only; [`crate::auth`] refuses the
//! rest). What the limits mean is [`crate::teams`].

use super::status_of;
use super::token_service::by;
use crate::auth::check_team_name;
use crate::store::{Store, TeamRecord};
use crate::teams::TeamLimits;
use segtrain_proto::v1 as pb;
use segtrain_spec::location::check_root;
use tonic::{Request, Response, Status};

pub struct TeamApi {
    store: Store,
}

impl TeamApi {
    pub fn new(store: Store) -> TeamApi {
        TeamApi { store }
    }
}

fn team(t: &TeamRecord) -> pb::Team {
    pb::Team {
        name: t.name.clone(),
        max_priority: t.limits.max_priority,
        max_gpus: t.limits.max_gpus,
        held_gpus: t.held_gpus,
        allowed_roots: t.limits.allowed_roots.clone(),
    }
}

/// The limits a SetTeam request sets, checked field by field.
fn limits(req: &pb::SetTeamRequest) -> Result<TeamLimits, Status> {
    check_team_name(&req.name).map_err(|m| Status::invalid_argument(format!("name: {m}")))?;
    if let Some(p) = req.max_priority.filter(|p| !(-1000..=1000).contains(p)) {
        return Err(Status::invalid_argument(format!(
            "max_priority: must be in -1000..=1000 (the range of spec.priority), got {p}"
        )));
    }
    if let Some(g) = req.max_gpus.filter(|g| !(1..=1_000_000).contains(g)) {
        return Err(Status::invalid_argument(format!(
            "max_gpus: must be in 1..=1000000 (unset for no limit), got {g}"
        )));
    }
    if req.allowed_roots.len() > 64 {
        return Err(Status::invalid_argument(format!(
            "allowed_roots: at most 64, got {}",
            req.allowed_roots.len()
        )));
    }
    for (i, r) in req.allowed_roots.iter().enumerate() {
        check_root(r).map_err(|m| Status::invalid_argument(format!("allowed_roots[{i}]: {m}")))?;
    }
    Ok(TeamLimits {
        max_priority: req.max_priority,
        max_gpus: req.max_gpus,
        allowed_roots: req.allowed_roots.clone(),
    })
}

#[tonic::async_trait]
impl pb::team_service_server::TeamService for TeamApi {
    async fn set_team(
        &self,
        req: Request<pb::SetTeamRequest>,
    ) -> Result<Response<pb::SetTeamResponse>, Status> {
        let who = by(&req);
        let limits = limits(req.get_ref())?;
        let t = self
            .store
            .set_team(&req.get_ref().name, limits)
            .await
            .map_err(status_of)?;
        tracing::info!(target: "segtrain::audit", team = %t.name, max_priority = ?t.limits.max_priority, max_gpus = ?t.limits.max_gpus, allowed_roots = ?t.limits.allowed_roots, by = %who, "team limits set");
        Ok(Response::new(pb::SetTeamResponse {
            team: Some(team(&t)),
        }))
    }

    async fn list_teams(
        &self,
        _req: Request<pb::ListTeamsRequest>,
    ) -> Result<Response<pb::ListTeamsResponse>, Status> {
        let teams = self.store.list_teams().await.map_err(status_of)?;
        Ok(Response::new(pb::ListTeamsResponse {
            teams: teams.iter().map(team).collect(),
        }))
    }
}
