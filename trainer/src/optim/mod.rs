//! Optimisation: the recipe's learning-rate schedule and AdamW over flat parameter buffers.

pub mod adamw;
pub mod schedule;

pub use adamw::{FlatAdamW, ParamGroup};
pub use schedule::LrSchedule;
