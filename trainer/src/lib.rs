//! The segtrain training core: the SegFormer model ([`model`]), the Cityscapes data pipeline
//! ([`data`]), AdamW and the LR schedule ([`optim`]), the collectives for data parallelism
//! ([`collective`]: TCP on CPUs, NCCL on GPUs), and the training loop with evaluation and
//! checkpoints ([`train`]); [`command`] is its command line (`train` and the tools).
//!
//! It knows nothing of gRPC or the database: a trainer reports through stdout lines
//! (`segtrain-wire`), and the worker daemon relays them. `tests/tests/architecture.rs` keeps it
//! that way.

pub mod bench;
pub mod collective;
pub mod command;
pub mod data;
pub mod doctor;
pub mod model;
pub mod optim;
pub mod predict;
pub mod seed;
pub mod torch_ext;
pub mod train;
