//! `segtrain.v1.ClusterService`: the cluster as users see it, and draining workers.

use super::{convert, paging, status_of};
use crate::store::Store;
use segtrain_proto::v1 as pb;
use tonic::{Request, Response, Status};
use uuid::Uuid;

fn worker_id(s: &str) -> Result<Uuid, Status> {
    Uuid::parse_str(s.trim()).map_err(|_| {
        Status::invalid_argument(format!(
            "worker_id: not a worker id (the UUID ListWorkers shows), got {s:?}"
        ))
    })
}

pub struct ClusterApi {
    store: Store,
}

impl ClusterApi {
    pub fn new(store: Store) -> ClusterApi {
        ClusterApi { store }
    }
}

#[tonic::async_trait]
impl pb::cluster_service_server::ClusterService for ClusterApi {
    async fn list_workers(
        &self,
        req: Request<pb::ListWorkersRequest>,
    ) -> Result<Response<pb::ListWorkersResponse>, Status> {
        let req = req.into_inner();
        let size = paging::size(req.page_size, paging::DEFAULT_LIST, paging::MAX_LIST)?;
        let after = paging::token::<Uuid>(&req.page_token, "ListWorkers")?;
        let mut workers = self
            .store
            .list_workers(after, size + 1)
            .await
            .map_err(status_of)?;
        let next_page_token = paging::next(&mut workers, size, |w| w.id);
        Ok(Response::new(pb::ListWorkersResponse {
            workers: workers.iter().map(convert::worker).collect(),
            next_page_token,
        }))
    }

    async fn drain_worker(
        &self,
        req: Request<pb::DrainWorkerRequest>,
    ) -> Result<Response<pb::DrainWorkerResponse>, Status> {
        let by = super::token_service::by(&req);
        let state = self
            .set_draining(&req.get_ref().worker_id, true, &by)
            .await?;
        Ok(Response::new(pb::DrainWorkerResponse { state }))
    }

    async fn undrain_worker(
        &self,
        req: Request<pb::UndrainWorkerRequest>,
    ) -> Result<Response<pb::UndrainWorkerResponse>, Status> {
        let by = super::token_service::by(&req);
        let state = self
            .set_draining(&req.get_ref().worker_id, false, &by)
            .await?;
        Ok(Response::new(pb::UndrainWorkerResponse { state }))
    }
}

impl ClusterApi {
    /// Drains (`drain`) or undrains a worker for `by`; its state after, on the wire.
    async fn set_draining(&self, worker: &str, drain: bool, by: &str) -> Result<i32, Status> {
        let id = worker_id(worker)?;
        let state = if drain {
            self.store.drain_worker(id).await
        } else {
            self.store.undrain_worker(id).await
        }
        .map_err(status_of)?;
        let action = if drain {
            "worker drained"
        } else {
            "worker undrained"
        };
        tracing::info!(target: "segtrain::audit", %action, worker = %id, state = %state, %by, "worker drain changed");
        Ok(state.to_proto() as i32)
    }
}
