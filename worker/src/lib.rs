//! The segtrain worker: the per-GPU daemon and the SegFormer trainer it runs.
//!
//! This crate is a skeleton for now: [`doctor`] reports what libtorch this binary loaded and
//! what devices it sees. The trainer (model, data, optimizer, checkpoints) and the daemon arrive
//! with the issues that build them.

pub mod bench;
pub mod collective;
pub mod daemon;
pub mod data;
pub mod doctor;
pub mod model;
pub mod optim;
pub mod predict;
pub mod torch_ext;
pub mod train;
