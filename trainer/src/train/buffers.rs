//! The model's buffers (the decode head's BatchNorm running statistics): what a data-parallel
//! job keeps equal on every rank, and how gradient accumulation updates them.
//!
//! The rule (docs/data-parallel.md): the running statistics move once per optimizer step, by the
//! mean of what each micro-batch of that step would have moved them by, over every micro-batch
//! of every rank. So a world-size x accumulate_steps split of one global batch gives the same
//! statistics whatever the split, and every rank evaluates and saves one model:
//! * with SyncBN, every rank computes the same statistics from the same global sums;
//! * without it, each rank's statistics follow its own micro-batches, and [`Buffers::mean_over_ranks`]
//!   replaces them by their mean before every evaluation and checkpoint (an exponential moving
//!   average is linear, so this equals averaging at every step, at no cost per step).

use crate::collective::Collective;
use tch::{nn, Kind, Tensor};

/// Handles to a VarStore's buffers (its variables without gradients), in name order.
#[derive(Debug)]
pub struct Buffers {
    tensors: Vec<Tensor>,
}

impl Buffers {
    pub fn of(vs: &nn::VarStore) -> Buffers {
        let mut named: Vec<(String, Tensor)> = vs
            .variables()
            .into_iter()
            .filter(|(_, t)| !t.requires_grad())
            .collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        Buffers {
            tensors: named.into_iter().map(|(_, t)| t).collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Every buffer as one flat f32 tensor (a copy).
    pub fn flat(&self) -> Tensor {
        let parts: Vec<Tensor> = self
            .tensors
            .iter()
            .map(|t| t.to_kind(Kind::Float).reshape([-1]))
            .collect();
        Tensor::cat(&parts, 0)
    }

    /// Sets every buffer from a tensor laid out as [`Buffers::flat`].
    pub fn set_flat(&mut self, flat: &Tensor) {
        tch::no_grad(|| {
            let mut off = 0i64;
            for t in self.tensors.iter_mut() {
                let n = t.numel() as i64;
                t.copy_(&flat.narrow(0, off, n).view(t.size().as_slice()));
                off += n;
            }
        });
    }

    /// Every rank ends with `root`'s buffers.
    pub fn broadcast(&mut self, comm: &mut dyn Collective, root: usize) -> anyhow::Result<()> {
        if self.is_empty() {
            return Ok(());
        }
        let mut flat = self.flat();
        comm.broadcast(&mut flat, root)?;
        self.set_flat(&flat);
        Ok(())
    }

    /// Every rank ends with the mean of the ranks' buffers.
    pub fn mean_over_ranks(&mut self, comm: &mut dyn Collective) -> anyhow::Result<()> {
        if self.is_empty() {
            return Ok(());
        }
        let mut flat = self.flat();
        comm.all_reduce_mean(&mut flat)?;
        self.set_flat(&flat);
        Ok(())
    }
}

/// Gradient accumulation's side of the rule: every micro-batch of a step starts from the
/// buffers the step started with; the step ends with the mean of where they went.
#[derive(Debug)]
pub struct StepBuffers {
    start: Tensor,
    sum: Tensor,
    micro_batches: u32,
}

impl StepBuffers {
    /// Before the first micro-batch of a step.
    pub fn begin(buffers: &Buffers) -> StepBuffers {
        let start = buffers.flat();
        StepBuffers {
            sum: start.zeros_like(),
            start,
            micro_batches: 0,
        }
    }

    /// Before each micro-batch: back to the step's starting point (after the first).
    pub fn before(&mut self, buffers: &mut Buffers) {
        if self.micro_batches > 0 {
            buffers.set_flat(&self.start);
        }
    }

    /// After each micro-batch's forward pass.
    pub fn after(&mut self, buffers: &Buffers) {
        self.sum += buffers.flat();
        self.micro_batches += 1;
    }

    /// After the last micro-batch: the mean of the micro-batches' updates.
    pub fn end(self, buffers: &mut Buffers) {
        if self.micro_batches > 1 {
            buffers.set_flat(&(self.sum / f64::from(self.micro_batches)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::ModuleT;

    #[test]
    fn accumulated_micro_batches_move_the_statistics_by_their_mean() {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let bn = nn::batch_norm2d(vs.root() / "bn", 3, Default::default());
        let mut buffers = Buffers::of(&vs);
        let start = buffers.flat();
        let a = Tensor::randn([2, 3, 4, 4], (Kind::Float, tch::Device::Cpu));
        let b = Tensor::randn([2, 3, 4, 4], (Kind::Float, tch::Device::Cpu)) * 3.0 + 1.0;

        // Each micro-batch alone, from the same start.
        let moved = |x: &Tensor, buffers: &mut Buffers| {
            buffers.set_flat(&start);
            let _ = bn.forward_t(x, true);
            buffers.flat()
        };
        let (after_a, after_b) = (moved(&a, &mut buffers), moved(&b, &mut buffers));
        buffers.set_flat(&start);

        let mut step = StepBuffers::begin(&buffers);
        for x in [&a, &b] {
            step.before(&mut buffers);
            let _ = bn.forward_t(x, true);
            step.after(&buffers);
        }
        step.end(&mut buffers);
        let want = (after_a + after_b) / 2.0;
        let diff = f64::try_from((buffers.flat() - &want).abs().max()).expect("scalar");
        assert!(diff < 1e-6, "max diff {diff}");
        assert!(
            f64::try_from((want - start).abs().max()).expect("scalar") > 0.01,
            "the statistics moved"
        );
    }
}
