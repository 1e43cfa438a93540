//! The paged list calls, read to their last page: `segtrain workers`, `attempts`,
//! `checkpoints` (and `drain`'s lookup) show everything, however many pages it takes.

use segtrain_proto::client::AuthChannel;
use segtrain_proto::v1 as pb;
use segtrain_proto::v1::cluster_service_client::ClusterServiceClient;
use segtrain_proto::v1::job_service_client::JobServiceClient;
use tonic::Status;

/// Every worker, by host and GPU.
pub async fn workers(c: &mut ClusterServiceClient<AuthChannel>) -> Result<Vec<pb::Worker>, Status> {
    let mut all = Vec::new();
    let mut page_token = String::new();
    loop {
        let req = pb::ListWorkersRequest {
            page_size: 0,
            page_token,
        };
        let r = c.list_workers(req).await?.into_inner();
        all.extend(r.workers);
        if r.next_page_token.is_empty() {
            return Ok(all);
        }
        page_token = r.next_page_token;
    }
}

/// Every attempt of a job, oldest first.
pub async fn attempts(
    c: &mut JobServiceClient<AuthChannel>,
    job_id: &str,
) -> Result<Vec<pb::Attempt>, Status> {
    let mut all = Vec::new();
    let mut page_token = String::new();
    loop {
        let req = pb::ListAttemptsRequest {
            job_id: job_id.to_string(),
            page_size: 0,
            page_token,
        };
        let r = c.list_attempts(req).await?.into_inner();
        all.extend(r.attempts);
        if r.next_page_token.is_empty() {
            return Ok(all);
        }
        page_token = r.next_page_token;
    }
}

/// Every checkpoint of a job (the deleted ones too with `include_deleted`), oldest first.
pub async fn checkpoints(
    c: &mut JobServiceClient<AuthChannel>,
    job_id: &str,
    include_deleted: bool,
) -> Result<Vec<pb::Checkpoint>, Status> {
    let mut all = Vec::new();
    let mut page_token = String::new();
    loop {
        let req = pb::ListCheckpointsRequest {
            job_id: job_id.to_string(),
            include_deleted,
            page_size: 0,
            page_token,
        };
        let r = c.list_checkpoints(req).await?.into_inner();
        all.extend(r.checkpoints);
        if r.next_page_token.is_empty() {
            return Ok(all);
        }
        page_token = r.next_page_token;
    }
}
