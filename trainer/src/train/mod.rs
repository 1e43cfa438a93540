//! The single-process training loop and its parts: loss, metrics, evaluation, checkpoints.
//! The distributed service runs this same loop on every rank.

pub mod buffers;
pub mod checkpoint;
pub mod eval;
pub mod loss;
pub mod metrics;
pub mod remote;
pub mod report;
pub mod stop;
pub mod trainer;

pub use trainer::{train, EventSink, ResumeCandidate, TrainEvent, TrainOptions, TrainSummary};
