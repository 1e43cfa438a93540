//! What the API and scheduling tests start from: a throwaway PostgreSQL, the real coordinator
//! on it, and a store connection to look at (and, where a test must, arrange) its rows.

use crate::coordinator::CoordinatorProcess;
use crate::pg::TempPostgres;
use segtrain_coordinator::state::JobState;
use segtrain_coordinator::store::Store;
use uuid::Uuid;

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

/// Moves job `id` through `states` in order, as the scheduler and the daemons would (the store
/// checks every edge), each with `reason`.
pub async fn walk(store: &Store, id: Uuid, states: &[JobState], reason: &str) {
    for &to in states {
        store
            .transition_job(id, to, reason)
            .await
            .unwrap_or_else(|e| panic!("job {id} to {to}: {e}"));
    }
}

/// `service_env!(Env)`: a test file's own `struct Env(Service)` that derefs to the [`Service`],
/// so the file can add its helpers (`impl Env { ... }`) and still reach `env.coord`, `env.store`.
#[macro_export]
macro_rules! service_env {
    ($name:ident) => {
        /// The service under test, with this file's helpers on top.
        struct $name($crate::service::Service);

        impl std::ops::Deref for $name {
            type Target = $crate::service::Service;
            fn deref(&self) -> &$crate::service::Service {
                &self.0
            }
        }

        impl std::ops::DerefMut for $name {
            fn deref_mut(&mut self) -> &mut $crate::service::Service {
                &mut self.0
            }
        }
    };
}
