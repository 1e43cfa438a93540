//! The segtrain worker: the per-GPU daemon ([`daemon`], tokio, never tch) and the SegFormer
//! trainer it runs as a child process ([`train`], with [`model`], [`data`], [`optim`],
//! [`collective`]); [`wire`] is the line format between the two.

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
pub mod wire;
