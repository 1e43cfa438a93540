//! `segtrain.v1.ClusterService`: the cluster as users see it.

use super::{convert, status_of};
use crate::store::Store;
use segtrain_proto::v1 as pb;
use tonic::{Request, Response, Status};

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
        _req: Request<pb::ListWorkersRequest>,
    ) -> Result<Response<pb::ListWorkersResponse>, Status> {
        let workers = self.store.list_workers().await.map_err(status_of)?;
        Ok(Response::new(pb::ListWorkersResponse {
            workers: workers.iter().map(convert::worker).collect(),
        }))
    }
}
