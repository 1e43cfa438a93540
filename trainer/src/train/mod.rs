//! One rank's training run and its parts. [`run::train`] is the loop; around it, in the order a
//! run meets them: [`options`] (what the run is told), [`rendezvous`] (meeting the other ranks),
//! [`resume`] (where it starts), [`step`] (one micro-batch: forward, loss, backward),
//! [`buffers`] (BatchNorm statistics across ranks), [`eval`] and [`metrics`] (mIoU),
//! [`checkpoint`] and [`remote`] (writing and reading checkpoints, on disk or in a bucket),
//! [`events`] and [`report`] (what the run says, to a person or to the daemon), [`stop`]
//! (signals and failure classes). The distributed service runs this same loop on every rank.

pub mod buffers;
pub mod checkpoint;
pub mod eval;
pub mod events;
pub mod loss;
pub mod metrics;
pub mod options;
pub mod remote;
pub mod rendezvous;
pub mod report;
pub mod resume;
pub mod run;
pub mod step;
pub mod stop;

pub use events::{EventSink, TrainEvent, TrainSummary};
pub use options::{Rendezvous, TrainOptions, NEVER_STOP};
pub use run::train;
pub use segtrain_wire::ResumeCandidate;
pub use step::{forward_backward, forward_loss};
