//! Collectives for data-parallel training: one trait, three backends.
//!
//! * [`Single`]: world 1, every operation a no-op (the single-rank path pays nothing).
//! * [`tcp::TcpCollective`]: pure Rust over `std::net::TcpStream`, a star through rank 0, for
//!   CPU ranks (tests, CPU-only hosts). Tensors on CUDA are copied to the host and back.
//! * [`nccl::NcclCollective`]: NCCL loaded at run time from the torch wheel's `libnccl.so.2`,
//!   on the device pointers of contiguous CUDA tensors, on the legacy NULL stream.
//!
//! Every rank must call the same operations in the same order with tensors of the same dtype and
//! length. Every blocking operation is bounded by a [`Timeouts`]: a dead or stale peer is an
//! error naming the peer and the operation, never a hang.

pub mod nccl;
pub mod tcp;

use std::time::Duration;
use tch::{Kind, Tensor};

/// How long a rank waits before it gives up on its peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Rendezvous: binding, connecting, the handshake, communicator init.
    pub setup: Duration,
    /// One collective operation (the slowest rank's step, evaluation shard or checkpoint write
    /// must fit in it).
    pub step: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            setup: Duration::from_secs(60),
            step: Duration::from_secs(300),
        }
    }
}

/// Why a collective operation failed. `peer` is the rank at the other end (for the star
/// backend, rank 0 from the others' side); `op` the operation.
#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    #[error("{op}: rank {peer} did not answer within {timeout:?}")]
    Timeout {
        op: &'static str,
        peer: usize,
        timeout: Duration,
    },
    // The I/O error is part of the message (not a `source`), so that it shows wherever the
    // error is printed, once.
    #[error("{op}: the connection to rank {peer} was closed (the peer died or gave up): {cause}")]
    Closed {
        op: &'static str,
        peer: usize,
        cause: std::io::Error,
    },
    #[error("{op}: I/O error with rank {peer}: {cause}")]
    Io {
        op: &'static str,
        peer: usize,
        cause: std::io::Error,
    },
    #[error("{op}: rank {peer}: {message}")]
    Protocol {
        op: &'static str,
        peer: usize,
        message: String,
    },
    #[error("rendezvous: {message}")]
    Rendezvous { message: String },
    #[error("{op}: {message}")]
    Tensor { op: &'static str, message: String },
    #[error("nccl {op} on rank {rank}: {message}")]
    Nccl {
        op: &'static str,
        rank: usize,
        message: String,
    },
    #[error("{op}: this communicator failed earlier ({reason}); start a new attempt")]
    Poisoned { op: &'static str, reason: String },
}

impl CollectiveError {
    /// Classifies an I/O error with `peer` during `op`.
    pub(crate) fn io(op: &'static str, peer: usize, timeout: Duration, e: std::io::Error) -> Self {
        use std::io::ErrorKind::*;
        match e.kind() {
            WouldBlock | TimedOut => CollectiveError::Timeout { op, peer, timeout },
            UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe | NotConnected => {
                CollectiveError::Closed { op, peer, cause: e }
            }
            _ => CollectiveError::Io { op, peer, cause: e },
        }
    }
}

/// Collective operations of one rank. Object safe; `Send` so the training thread can own it.
pub trait Collective: Send {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// In place: every rank ends with the element-wise mean over ranks (f32, contiguous).
    fn all_reduce_mean(&mut self, t: &mut Tensor) -> Result<(), CollectiveError>;
    /// In place: every rank ends with the element-wise sum over ranks (f32, f64 or i64,
    /// contiguous).
    fn all_reduce_sum(&mut self, t: &mut Tensor) -> Result<(), CollectiveError>;
    /// In place: every rank ends with `root`'s values (contiguous).
    fn broadcast(&mut self, t: &mut Tensor, root: usize) -> Result<(), CollectiveError>;
    /// Returns once every rank has called it.
    fn barrier(&mut self) -> Result<(), CollectiveError>;
}

/// World 1: every operation leaves the tensor as it is.
#[derive(Debug, Default, Clone, Copy)]
pub struct Single;

impl Collective for Single {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn all_reduce_mean(&mut self, t: &mut Tensor) -> Result<(), CollectiveError> {
        check_kind("all_reduce_mean", t, &[Kind::Float])
    }
    fn all_reduce_sum(&mut self, t: &mut Tensor) -> Result<(), CollectiveError> {
        check_kind("all_reduce_sum", t, SUM_KINDS)
    }
    fn broadcast(&mut self, _t: &mut Tensor, root: usize) -> Result<(), CollectiveError> {
        check_root("broadcast", root, 1)
    }
    fn barrier(&mut self) -> Result<(), CollectiveError> {
        Ok(())
    }
}

/// The dtypes `all_reduce_sum` takes.
pub(crate) const SUM_KINDS: &[Kind] = &[Kind::Float, Kind::Double, Kind::Int64];

pub(crate) fn check_kind(
    op: &'static str,
    t: &Tensor,
    kinds: &[Kind],
) -> Result<(), CollectiveError> {
    if !t.defined() {
        return Err(CollectiveError::Tensor {
            op,
            message: "undefined tensor".to_string(),
        });
    }
    let kind = t.kind();
    if !kinds.contains(&kind) {
        return Err(CollectiveError::Tensor {
            op,
            message: format!("dtype {kind:?} is not supported (supported: {kinds:?})"),
        });
    }
    if !t.is_contiguous() {
        return Err(CollectiveError::Tensor {
            op,
            message: format!("the tensor (shape {:?}) is not contiguous", t.size()),
        });
    }
    Ok(())
}

pub(crate) fn check_root(
    op: &'static str,
    root: usize,
    world: usize,
) -> Result<(), CollectiveError> {
    if root >= world {
        return Err(CollectiveError::Tensor {
            op,
            message: format!("root {root} is not a rank of a world of {world}"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_leaves_tensors_alone_and_checks_them() {
        let mut s = Single;
        let mut t = Tensor::from_slice(&[1.0f32, 2.0, 3.0]);
        s.all_reduce_mean(&mut t).expect("mean");
        s.all_reduce_sum(&mut t).expect("sum");
        s.broadcast(&mut t, 0).expect("broadcast");
        s.barrier().expect("barrier");
        assert_eq!(Vec::<f32>::try_from(&t).expect("f32"), vec![1.0, 2.0, 3.0]);
        let mut i = Tensor::from_slice(&[1i32]);
        assert!(s.all_reduce_sum(&mut i).is_err(), "i32 is not a sum dtype");
        assert!(s.broadcast(&mut t, 1).is_err(), "root 1 of world 1");
        let mut nc = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0])
            .view([2, 2])
            .tr();
        assert!(s.all_reduce_mean(&mut nc).is_err(), "not contiguous");
    }
}
