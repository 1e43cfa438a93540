//! Training and evaluation data: the Cityscapes reader, a synthetic dataset in the same layout,
//! the augmentation recipe, the distributed sampler and the loader thread pool.
//!
//! Everything here works on `u8` pixels on the CPU: batches travel to the device as u8 and are
//! normalised there (4x less host-to-device traffic than f32).

pub mod augment;
pub mod cityscapes;
pub mod error;
pub mod loader;
pub mod sampler;
pub mod synth;

use serde::{Deserialize, Serialize};

/// Where the training stream stands: the epoch and the position within that epoch's permutation
/// of the first image of the next iteration (the same on every rank, for any world size; see
/// [`sampler`]). Part of every checkpoint, so a resumed run sees exactly the samples it would
/// have seen, whatever world size it resumes with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SamplerState {
    pub epoch: u64,
    pub position: u64,
}

/// One training micro-batch, augmented to the crop size.
#[derive(Debug, Clone)]
pub struct Batch {
    /// N x H x W x 3, RGB.
    pub images: Vec<u8>,
    /// N x H x W trainIds (0..num_classes-1) or 255 (ignore).
    pub labels: Vec<u8>,
    pub n: usize,
    pub height: usize,
    pub width: usize,
    /// The sampler state after this batch: the start of the iteration the next batch belongs
    /// to (what to save with a checkpoint taken after the last micro-batch of an iteration).
    pub next: SamplerState,
}

/// One evaluation image at full resolution, not augmented.
#[derive(Debug, Clone)]
pub struct EvalSample {
    /// H x W x 3, RGB.
    pub image: Vec<u8>,
    /// H x W trainIds or 255.
    pub label: Vec<u8>,
    pub height: usize,
    pub width: usize,
    /// The image file, for messages.
    pub path: std::path::PathBuf,
}
