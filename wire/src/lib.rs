//! The contract between a worker daemon and the trainer processes it starts, shared by both
//! sides so that neither can drift from the other: [`line`], what a trainer prints on stdout
//! (`segtrain-worker train --json`) and the daemon reads; [`checkpoint_location`], where a run's
//! checkpoints go and what a restarted attempt may resume from.
//!
//! No tch, no gRPC: the daemon depends on this crate without linking libtorch.

pub mod checkpoint_location;
pub mod line;

pub use checkpoint_location::{CheckpointLocation, ResumeCandidate};
pub use line::*;
