//! What the API and scheduling tests start from: a throwaway PostgreSQL, the real coordinator
//! on it, and a store connection to look at (and, where a test must, arrange) its rows.

use crate::coordinator::CoordinatorProcess;
use crate::pg::TempPostgres;
use segtrain_coordinator::store::Store;

pub struct Service {
    /// Dropped last: the cluster goes away with the test.
    pub pg: TempPostgres,
    /// The database URL the coordinator uses.
    pub url: String,
    pub coord: CoordinatorProcess,
    pub store: Store,
}

impl Service {
    /// Starts PostgreSQL and the coordinator (plaintext, no tokens, on 127.0.0.1) with
    /// `coordinator_args`, and connects a store.
    pub async fn start(coordinator_args: &[&str]) -> Service {
        let pg = TempPostgres::start().expect("throwaway PostgreSQL");
        let url = pg.url();
        let coord = CoordinatorProcess::start_with_args(&url, coordinator_args).await;
        let store = Store::connect(&url).await.expect("store connects");
        Service {
            pg,
            url,
            coord,
            store,
        }
    }
}
