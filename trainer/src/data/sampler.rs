//! The distributed sampler: which dataset index each rank trains on next, like PyTorch's
//! `DistributedSampler` (drop_last = false) iterated forever.
//!
//! Each epoch has one permutation of `0..len`, seeded by `seed + epoch` only (never by the rank),
//! so every rank computes the same permutation. It is padded by wrapping around to a multiple of
//! `world`, and rank `r` takes positions `r, r + world, r + 2·world, ...`: the ranks partition the
//! padded epoch. After its last index of an epoch a rank moves on to the next epoch. The state
//! (epoch, position within the rank's share) is all there is to resume exactly.
//!
//! The permutation is a Fisher–Yates shuffle driven by ChaCha8 (not torch's `randperm`), so the
//! order differs from PyTorch's for the same seed, but has the same properties.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::error::DataError;
use super::SamplerState;

/// One index handed out by the sampler, with where it stands in its epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Draw {
    /// The dataset index.
    pub index: usize,
    pub epoch: u64,
    /// Position within this rank's share of the epoch (0..per_rank_len).
    pub position: u64,
    /// Position within the whole padded epoch (position · world + rank): unique across ranks,
    /// so it can seed per-sample randomness without two ranks drawing the same augmentation.
    pub global_position: u64,
}

#[derive(Debug, Clone)]
pub struct DistributedSampler {
    len: usize,
    rank: usize,
    world: usize,
    seed: u64,
    shuffle: bool,
    state: SamplerState,
    /// The padded index list of `perm_epoch` (all ranks).
    perm: Vec<usize>,
    perm_epoch: Option<u64>,
}

impl DistributedSampler {
    /// A sampler over `len` samples for `rank` of `world`, at epoch 0, position 0. `shuffle =
    /// false` keeps the dataset order (still padded and split across ranks).
    pub fn new(
        len: usize,
        rank: usize,
        world: usize,
        seed: u64,
        shuffle: bool,
    ) -> Result<DistributedSampler, DataError> {
        if world == 0 || rank >= world {
            return Err(DataError::Config(format!(
                "sampler rank {rank} is not in 0..{world}"
            )));
        }
        if len == 0 {
            return Err(DataError::Config(
                "cannot sample from an empty dataset".to_string(),
            ));
        }
        Ok(DistributedSampler {
            len,
            rank,
            world,
            seed,
            shuffle,
            state: SamplerState::default(),
            perm: Vec::new(),
            perm_epoch: None,
        })
    }

    /// Continues from a saved state (see [`DistributedSampler::set_state`]).
    pub fn with_state(mut self, state: SamplerState) -> Result<DistributedSampler, DataError> {
        self.set_state(state)?;
        Ok(self)
    }

    /// Moves to `state`, as saved by [`DistributedSampler::state`] (or `Batch::next`). A position
    /// equal to the per-rank length means the next epoch's start; a larger one cannot come from
    /// this dataset and rank layout and is an error.
    pub fn set_state(&mut self, state: SamplerState) -> Result<(), DataError> {
        let per_rank = self.per_rank_len() as u64;
        if state.position > per_rank {
            return Err(DataError::Config(format!(
                "sampler state (epoch {}, position {}) is past the {per_rank} samples per rank \
                 of this dataset ({} samples, {} ranks); was it saved for another dataset?",
                state.epoch, state.position, self.len, self.world
            )));
        }
        self.state = if state.position == per_rank {
            SamplerState {
                epoch: state.epoch + 1,
                position: 0,
            }
        } else {
            state
        };
        Ok(())
    }

    /// Where the sampler stands: the next [`DistributedSampler::next_draw`] hands out position
    /// `position` of epoch `epoch`.
    pub fn state(&self) -> SamplerState {
        self.state
    }

    /// Samples per rank per epoch: ceil(len / world).
    pub fn per_rank_len(&self) -> usize {
        self.len.div_ceil(self.world)
    }

    /// The dataset length.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Never true: an empty dataset is rejected by [`DistributedSampler::new`].
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world(&self) -> usize {
        self.world
    }

    /// The next index; the sampler never runs out (epochs follow one another).
    pub fn next_draw(&mut self) -> Draw {
        let SamplerState { epoch, position } = self.state;
        self.ensure_epoch(epoch);
        let global_position = position * self.world as u64 + self.rank as u64;
        let index = self.perm[global_position as usize];
        self.state = if position + 1 == self.per_rank_len() as u64 {
            SamplerState {
                epoch: epoch + 1,
                position: 0,
            }
        } else {
            SamplerState {
                epoch,
                position: position + 1,
            }
        };
        Draw {
            index,
            epoch,
            position,
            global_position,
        }
    }

    /// This rank's indices for a whole epoch, in order (does not move the sampler).
    pub fn epoch_indices(&self, epoch: u64) -> Vec<usize> {
        let perm = self.padded_permutation(epoch);
        perm.into_iter()
            .skip(self.rank)
            .step_by(self.world)
            .collect()
    }

    fn ensure_epoch(&mut self, epoch: u64) {
        if self.perm_epoch != Some(epoch) {
            self.perm = self.padded_permutation(epoch);
            self.perm_epoch = Some(epoch);
        }
    }

    /// The epoch's permutation (identical on every rank), padded by wrapping around to
    /// per_rank_len · world entries like torch's sampler.
    fn padded_permutation(&self, epoch: u64) -> Vec<usize> {
        let mut perm: Vec<usize> = (0..self.len).collect();
        if self.shuffle {
            let mut rng = ChaCha8Rng::seed_from_u64(self.seed.wrapping_add(epoch));
            perm.shuffle(&mut rng);
        }
        let total = self.per_rank_len() * self.world;
        let mut i = 0;
        while perm.len() < total {
            perm.push(perm[i]);
            i += 1;
        }
        perm
    }
}

impl Iterator for DistributedSampler {
    type Item = Draw;

    fn next(&mut self) -> Option<Draw> {
        Some(self.next_draw())
    }
}
