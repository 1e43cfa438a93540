//! What the coordinator asks of the database about itself: is it there, what do the tables hold
//! in sum (the Prometheus gauges), and closing the pools on shutdown.

use super::{Store, StoreError};
use std::time::Duration;

/// Counts over the whole cluster, for the gauges.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterCounts {
    /// (state, how many jobs).
    pub jobs: Vec<(String, i64)>,
    /// (state, how many workers).
    pub workers: Vec<(String, i64)>,
    /// Restarts of every job ever.
    pub restarts: i64,
}

impl Store {
    /// Jobs and workers by state, and all restarts.
    pub async fn cluster_counts(&self) -> Result<ClusterCounts, StoreError> {
        let jobs = sqlx::query_as("SELECT state, count(*) FROM jobs GROUP BY state")
            .fetch_all(&self.pool)
            .await?;
        let workers = sqlx::query_as("SELECT state, count(*) FROM workers GROUP BY state")
            .fetch_all(&self.pool)
            .await?;
        let restarts = sqlx::query_scalar("SELECT coalesce(sum(restarts), 0)::bigint FROM jobs")
            .fetch_one(&self.pool)
            .await?;
        Ok(ClusterCounts {
            jobs,
            workers,
            restarts,
        })
    }

    /// Whether PostgreSQL answers within `limit`, over a side connection (never behind RPCs
    /// waiting for the pool: a busy pool is not an outage).
    pub async fn answers(&self, limit: Duration) -> bool {
        let probe = tokio::time::timeout(limit, sqlx::query("SELECT 1").execute(&self.side));
        matches!(probe.await, Ok(Ok(_)))
    }

    /// Closes both pools (waits for the connections in use to be returned).
    pub async fn close(&self) {
        self.pool.close().await;
        self.side.close().await;
        self.token_pool.close().await;
    }
}
