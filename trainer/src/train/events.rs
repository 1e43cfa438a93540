//! What the training loop reports ([`TrainEvent`], in order) and to whom ([`EventSink`]).

use crate::train::checkpoint::Saved;
use crate::train::eval::EvalResult;
pub use segtrain_wire::{CollectiveReady, RunStart};
use std::collections::BTreeMap;

/// What the loop reports, in order.
#[derive(Debug, Clone)]
pub enum TrainEvent {
    /// Rank 0's rendezvous endpoint, as soon as it exists (before waiting for the others): the
    /// worker daemon publishes it through the coordinator to the other ranks.
    Rendezvous {
        tcp_address: Option<String>,
        nccl_unique_id: Option<Vec<u8>>,
    },
    Collective(CollectiveReady),
    Started(RunStart),
    /// Averages since the previous report: loss, lr, images_per_s, data_wait_ms, step_ms; on
    /// CUDA also this rank's GPU memory now, at its peak and reserved (gpu_mem_bytes,
    /// gpu_mem_peak_bytes, gpu_mem_reserved_bytes). Rank 0's: the job's metrics.
    Metrics {
        iteration: u64,
        values: BTreeMap<String, f64>,
    },
    /// The same values on ranks other than 0 (their own step time, data wait and memory): for
    /// their worker daemon's gauges, never stored with the job.
    RankMetrics {
        iteration: u64,
        values: BTreeMap<String, f64>,
    },
    Eval {
        iteration: u64,
        result: EvalResult,
    },
    /// The run resumed from `uri` (at `iteration`); `skipped` are newer candidates that were
    /// unusable: (iteration, location, why).
    Resumed {
        iteration: u64,
        uri: String,
        skipped: Vec<(u64, String, String)>,
    },
    /// Rank 0 starts writing the checkpoint of `iteration` to `uri` (a path or a gs:// URI).
    CheckpointPending {
        iteration: u64,
        uri: String,
    },
    /// Asked to stop: every rank stopped after `iteration` (checkpointed by rank 0).
    Stopped {
        iteration: u64,
    },
    /// A checkpoint is durable at `uri` (the local directory, or its object-store copy);
    /// retention deleted `deleted`.
    Checkpoint {
        saved: Saved,
        uri: String,
        metrics: BTreeMap<String, f64>,
        deleted: Vec<String>,
        /// Written because the run was asked to stop, not on `checkpoint_interval`.
        on_stop: bool,
    },
    Finished {
        iteration: u64,
        best: Option<(f64, u64)>,
    },
}

pub trait EventSink {
    fn event(&mut self, ev: &TrainEvent);
}

impl<F: FnMut(&TrainEvent)> EventSink for F {
    fn event(&mut self, ev: &TrainEvent) {
        self(ev)
    }
}

#[derive(Debug, Clone)]
pub struct TrainSummary {
    pub iteration: u64,
    /// The run stopped early because it was asked to (a checkpoint of `iteration` exists).
    pub stopped: bool,
    pub last_checkpoint: Option<Saved>,
    pub best: Option<(f64, u64)>,
    pub last_eval: Option<EvalResult>,
}
