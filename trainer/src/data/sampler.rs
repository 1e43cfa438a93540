//! The distributed sampler: which dataset index each rank trains on next, laid out so that the
//! global batches do not depend on how many ranks share them.
//!
//! **The stream.** Each epoch has one permutation of `0..len`, seeded by `seed + epoch` only
//! (never by the rank or the world size), and the epochs' permutations are concatenated into one
//! endless stream (no padding: an epoch boundary may fall inside a batch).
//!
//! **The layout** ([`BatchLayout`]). With `G = world · accumulate_steps · batch_per_gpu` images
//! per optimizer step, every step takes the next `G` positions of the stream (global batch `i`
//! of a fresh run is `[i·G, (i+1)·G)`). Within it, micro-batch `k` is the `k`-th run of
//! `b = batch_per_gpu` positions, and rank `r` at micro-step `m` takes micro-batch
//! `k = m·world + r`. So the images of every micro-batch, in order, are the same for any split
//! of the same global batch: 2 ranks × 1 micro-batch and 1 rank × 2 micro-batches see
//! micro-batches 0 and 1 alike, which keeps the BatchNorm batch statistics and the per-image
//! losses (and so the step) independent of the world size (docs/data-parallel.md, "Elastic
//! world size").
//!
//! **The state** ([`SamplerState`]) is the stream position (epoch, position within the epoch)
//! of the first image of the iteration the next draw belongs to: the same on every rank and for
//! every world size at an iteration boundary, which is where checkpoints are taken. It is all
//! there is to resume exactly, also with another world size and accumulation.
//!
//! The permutation is a Fisher–Yates shuffle driven by ChaCha8 (not torch's `randperm`), so the
//! order differs from PyTorch's for the same seed, but has the same properties.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::error::DataError;
use super::SamplerState;

/// How one global batch is split, and which part is this rank's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLayout {
    /// This rank, in `0..world`.
    pub rank: usize,
    /// Ranks training together.
    pub world: usize,
    /// Images per micro-batch (the spec's `batch_per_gpu`).
    pub batch_per_gpu: usize,
    /// Micro-batches per rank per optimizer step (this attempt's accumulation).
    pub accumulate_steps: usize,
}

impl BatchLayout {
    /// One rank taking whole batches of `batch_per_gpu` (no accumulation).
    pub fn single(batch_per_gpu: usize) -> BatchLayout {
        BatchLayout {
            rank: 0,
            world: 1,
            batch_per_gpu,
            accumulate_steps: 1,
        }
    }

    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), DataError> {
        if self.world == 0 || self.rank >= self.world {
            return Err(DataError::Config(format!(
                "sampler rank {} is not in 0..{} (the world size)",
                self.rank, self.world
            )));
        }
        for (name, v) in [
            ("batch_per_gpu", self.batch_per_gpu),
            ("accumulate_steps", self.accumulate_steps),
        ] {
            if v == 0 {
                return Err(DataError::Config(format!(
                    "sampler {name} must be at least 1, got 0"
                )));
            }
        }
        if self
            .world
            .checked_mul(self.batch_per_gpu)
            .and_then(|n| n.checked_mul(self.accumulate_steps))
            .is_none()
        {
            return Err(DataError::Config(format!(
                "sampler global batch world {} x batch_per_gpu {} x accumulate_steps {} overflows",
                self.world, self.batch_per_gpu, self.accumulate_steps
            )));
        }
        Ok(())
    }

    /// Images per optimizer step over all ranks: `world · accumulate_steps · batch_per_gpu`.
    pub fn global_batch(&self) -> usize {
        self.world * self.accumulate_steps * self.batch_per_gpu
    }

    /// Images this rank draws per optimizer step.
    pub fn per_rank(&self) -> usize {
        self.accumulate_steps * self.batch_per_gpu
    }

    /// The global micro-batch index (within its step) of this rank's micro-step `m`.
    pub fn micro_batch(&self, m: usize) -> usize {
        m * self.world + self.rank
    }
}

/// One index handed out by the sampler, with where it stands in the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Draw {
    /// The dataset index.
    pub index: usize,
    pub epoch: u64,
    /// Position within the epoch's permutation (0..len): the same for any world size and unique
    /// within the epoch, so (epoch, global_position) can seed per-sample randomness without two
    /// micro-batches drawing the same augmentation.
    pub global_position: u64,
}

#[derive(Debug, Clone)]
pub struct DistributedSampler {
    len: usize,
    layout: BatchLayout,
    seed: u64,
    shuffle: bool,
    /// The stream position of the current iteration's first image.
    state: SamplerState,
    /// Draws this rank has made in the current iteration (0..layout.per_rank()).
    drawn: usize,
    /// The permutation of `perm_epoch`.
    perm: Vec<usize>,
    perm_epoch: Option<u64>,
}

impl DistributedSampler {
    /// A sampler over `len` samples for `layout`, at the start of epoch 0. `shuffle = false`
    /// keeps the dataset order in every epoch.
    pub fn new(
        len: usize,
        layout: BatchLayout,
        seed: u64,
        shuffle: bool,
    ) -> Result<DistributedSampler, DataError> {
        layout.validate()?;
        if len == 0 {
            return Err(DataError::Config(
                "cannot sample from an empty dataset".to_string(),
            ));
        }
        Ok(DistributedSampler {
            len,
            layout,
            seed,
            shuffle,
            state: SamplerState::default(),
            drawn: 0,
            perm: Vec::new(),
            perm_epoch: None,
        })
    }

    /// Continues from a saved state (see [`DistributedSampler::set_state`]).
    pub fn with_state(mut self, state: SamplerState) -> Result<DistributedSampler, DataError> {
        self.set_state(state)?;
        Ok(self)
    }

    /// Moves to the start of the iteration whose first image is at `state` (as saved by
    /// [`DistributedSampler::state`] at an iteration boundary, by any world size). A position
    /// equal to the dataset length means the next epoch's start; a larger one cannot come from
    /// this dataset and is an error.
    pub fn set_state(&mut self, state: SamplerState) -> Result<(), DataError> {
        let len = self.len as u64;
        if state.position > len {
            return Err(DataError::Config(format!(
                "sampler state (epoch {}, position {}) is past the end of an epoch of this \
                 dataset (positions 0..={len}, {len} samples); was it saved for another dataset?",
                state.epoch, state.position
            )));
        }
        self.state = advance(state, 0, len);
        self.drawn = 0;
        Ok(())
    }

    /// The stream position of the first image of the iteration the next draw belongs to. Exact
    /// to resume from at an iteration boundary (where it is the same on every rank); in the
    /// middle of an iteration it still names that iteration's start.
    pub fn state(&self) -> SamplerState {
        self.state
    }

    pub fn layout(&self) -> BatchLayout {
        self.layout
    }

    /// The dataset length.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Never true: an empty dataset is rejected by [`DistributedSampler::new`].
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The next index of this rank; the sampler never runs out (epochs follow one another).
    pub fn next_draw(&mut self) -> Draw {
        let b = self.layout.batch_per_gpu;
        let (m, slot) = (self.drawn / b, self.drawn % b);
        let offset = self.layout.micro_batch(m) * b + slot;
        let len = self.len as u64;
        let at = advance(self.state, offset as u64, len);
        self.ensure_epoch(at.epoch);
        let index = self.perm[at.position as usize];
        self.drawn += 1;
        if self.drawn == self.layout.per_rank() {
            self.state = advance(self.state, self.layout.global_batch() as u64, len);
            self.drawn = 0;
        }
        Draw {
            index,
            epoch: at.epoch,
            global_position: at.position,
        }
    }

    /// The epoch's permutation of the dataset indices: the stream of that epoch, the same on
    /// every rank and for every layout (does not move the sampler).
    pub fn permutation(&self, epoch: u64) -> Vec<usize> {
        let mut perm: Vec<usize> = (0..self.len).collect();
        if self.shuffle {
            let mut rng = ChaCha8Rng::seed_from_u64(self.seed.wrapping_add(epoch));
            perm.shuffle(&mut rng);
        }
        perm
    }

    fn ensure_epoch(&mut self, epoch: u64) {
        if self.perm_epoch != Some(epoch) {
            self.perm = self.permutation(epoch);
            self.perm_epoch = Some(epoch);
        }
    }
}

/// The stream position `n` images after `from`, in epochs of `len` (normalised: position < len).
fn advance(from: SamplerState, n: u64, len: u64) -> SamplerState {
    let total = from.position + n;
    SamplerState {
        epoch: from.epoch + total / len,
        position: total % len,
    }
}

impl SamplerState {
    /// The global stream position of a per-rank state of the padded, interleaved sampler that
    /// checkpoints of format 1 saved: rank `r` of `world` took positions `r, r + world, ...` of
    /// each epoch, so after `p` draws each the ranks had consumed the first `p · world` positions
    /// of epoch `e` together (at most `len`: the rest was the padding). Resuming there skips no
    /// image and repeats none; it is not the batch the old layout would have drawn next.
    pub fn from_per_rank(per_rank: SamplerState, world: u32, len: usize) -> SamplerState {
        SamplerState {
            epoch: per_rank.epoch,
            position: per_rank
                .position
                .saturating_mul(u64::from(world))
                .min(len as u64),
        }
    }
}

impl Iterator for DistributedSampler {
    type Item = Draw;

    fn next(&mut self) -> Option<Draw> {
        Some(self.next_draw())
    }
}
