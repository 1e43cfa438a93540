//! Synchronised BatchNorm (SyncBN) for the decode head, as mmseg's SegFormer configs train it:
//! in training, the batch statistics are those of the global micro-batch (every rank's images),
//! and the backward pass is the exact gradient of the ranks' mean loss through them.
//!
//! Forward, per channel, with N the global element count (ranks x images x H x W):
//! `A = sum over ranks of sum(x)` (one all-reduce), `mean = A / N`,
//! `B = sum over ranks of sum((x - mean)^2)` (a second all-reduce: two passes, as accurate as
//! PyTorch's own statistics), `var = B / N`, `y = (x - mean) / sqrt(var + eps) * w + b`;
//! the running statistics take `mean` and the unbiased `var * N / (N - 1)`, as PyTorch's SyncBN.
//!
//! Backward: tch has no custom autograd functions, so `A` and `B` enter the graph as leaves and
//! the missing cross-rank terms are added explicitly ([`SyncBnTape::backward`]). With
//! `G_A = sum over ranks of dL_r/dA` and `G_B` likewise, the gradient of the mean loss reaches
//! this rank's `x` through `A` and `B` as that of `<G_A, sum(x)> + <G_B, sum((x - mean)^2)>`
//! (with `mean` held fixed; the term through `mean` in `B` sums to zero over ranks, since
//! `sum(x - mean) = 0` globally). So one short backward from the loss to the two leaves (the
//! classifier, ReLU and the normalisation only), one all-reduce of `(G_A, G_B)`, then the real
//! backward of `loss + <G_A, sum(x)> + <G_B, sum((x - mean)^2)>`. The data-parallel gradient
//! mean over ranks then divides by the world size, as it does for every other gradient.

use tch::{nn, Kind, Tensor};

/// Adds a tensor up over every rank, in place (the collective's all-reduce sum). Every rank must
/// call it the same number of times with tensors of the same length.
pub type GlobalSum<'a> = dyn FnMut(&mut Tensor) -> anyhow::Result<()> + 'a;

/// What the backward pass of one SyncBN forward needs.
#[derive(Debug)]
pub struct SyncBnTape {
    /// Leaves holding the global per-channel `sum(x)` and `sum((x - mean)^2)`.
    sum: Tensor,
    sq: Tensor,
    /// This rank's contributions to them, attached to its graph.
    local_sum: Tensor,
    local_sq: Tensor,
}

/// Training-mode SyncBN of `bn` on NCHW `x`, with `eps` and `momentum` as PyTorch's. Updates
/// `bn`'s running statistics.
pub fn forward(
    bn: &nn::BatchNorm,
    x: &Tensor,
    eps: f64,
    momentum: f64,
    global_sum: &mut GlobalSum,
) -> anyhow::Result<(Tensor, SyncBnTape)> {
    let (n, c, h, w) = x.size4()?;
    let xf = x.to_kind(Kind::Float);
    let dims: &[i64] = &[0, 2, 3];
    let per_channel = |t: &Tensor| t.view([1, c, 1, 1]);

    // Pass 1: the global sum and element count (one all-reduce of C + 1 values).
    let local_sum = xf.sum_dim_intlist(dims, false, Kind::Float);
    let count = Tensor::full([1], (n * h * w) as f64, (Kind::Float, x.device()));
    let mut first = Tensor::cat(&[local_sum.detach(), count], 0);
    global_sum(&mut first)?;
    let total = first.narrow(0, c, 1);
    let sum = first.narrow(0, 0, c).copy().set_requires_grad(true);
    let mean = &sum / &total;

    // Pass 2: the global sum of squared deviations from the global mean.
    let centred = &xf - per_channel(&mean);
    let local_sq = (&centred * &centred).sum_dim_intlist(dims, false, Kind::Float);
    let mut second = local_sq.detach().copy();
    global_sum(&mut second)?;
    let sq = second.set_requires_grad(true);
    let var = &sq / &total;

    // One full-size kernel: y = shift + centred * scale, with per-channel scale = w / std.
    let inv_std = (&var + eps).rsqrt();
    let scale = match &bn.ws {
        Some(ws) => inv_std * ws,
        None => inv_std,
    };
    let y = match &bn.bs {
        Some(bs) => per_channel(bs).addcmul(&centred, &per_channel(&scale)),
        None => centred * per_channel(&scale),
    };
    tch::no_grad(|| {
        let unbiased = var.detach() * &total / (&total - 1.0).clamp_min(1.0);
        let mut rm = bn.running_mean.shallow_clone();
        let mut rv = bn.running_var.shallow_clone();
        let new_mean = &rm * (1.0 - momentum) + mean.detach() * momentum;
        let new_var = &rv * (1.0 - momentum) + unbiased * momentum;
        rm.copy_(&new_mean);
        rv.copy_(&new_var);
    });
    let tape = SyncBnTape {
        sum,
        sq,
        local_sum,
        local_sq,
    };
    Ok((y.to_kind(x.kind()), tape))
}

impl SyncBnTape {
    /// The backward pass of this rank's `loss` (a scalar) with the exact SyncBN gradient: every
    /// rank calls it, once per forward, in the same order.
    pub fn backward(self, loss: &Tensor, global_sum: &mut GlobalSum) -> anyhow::Result<()> {
        let grads = Tensor::f_run_backward(&[loss], &[&self.sum, &self.sq], true, false)?;
        let mut g = Tensor::cat(&[&grads[0], &grads[1]], 0);
        global_sum(&mut g)?;
        let c = self.sum.numel() as i64;
        let (g_sum, g_sq) = (g.narrow(0, 0, c), g.narrow(0, c, c));
        let cross =
            (g_sum * &self.local_sum).sum(Kind::Float) + (g_sq * &self.local_sq).sum(Kind::Float);
        (loss + cross).f_backward()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::ModuleT;
    use tch::Device;

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        f64::try_from((a - b).abs().max()).expect("scalar")
    }

    /// One rank: SyncBN is plain training-mode BatchNorm, forward, running statistics and
    /// gradients (to the input and to the affine parameters).
    #[test]
    fn on_one_rank_it_is_batch_norm() {
        let opts = (tch::Kind::Float, Device::Cpu);
        let x0 = Tensor::randn([2, 3, 5, 4], opts) * 2.0 + 0.5;
        let weight = Tensor::randn([2, 3, 5, 4], opts);
        let run = |sync: bool| {
            let vs = nn::VarStore::new(Device::Cpu);
            let bn = nn::batch_norm2d(
                vs.root() / "bn",
                3,
                nn::BatchNormConfig {
                    ws_init: nn::Init::Const(1.5),
                    bs_init: nn::Init::Const(0.25),
                    ..Default::default()
                },
            );
            let x = x0.copy().set_requires_grad(true);
            let mut none = |_: &mut Tensor| -> anyhow::Result<()> { Ok(()) };
            let (y, tape) = if sync {
                let (y, t) = forward(&bn, &x, 1e-5, 0.1, &mut none).expect("forward");
                (y, Some(t))
            } else {
                (bn.forward_t(&x, true), None)
            };
            let loss = (&y * &weight).sum(tch::Kind::Float) + y.square().sum(tch::Kind::Float);
            match tape {
                Some(t) => t.backward(&loss, &mut none).expect("backward"),
                None => loss.backward(),
            }
            let ws = bn.ws.as_ref().expect("affine");
            (
                y.detach(),
                x.grad(),
                ws.grad(),
                bn.running_mean.copy(),
                bn.running_var.copy(),
            )
        };
        let (a, b) = (run(false), run(true));
        assert!(
            max_diff(&a.0, &b.0) < 1e-5,
            "forward {}",
            max_diff(&a.0, &b.0)
        );
        assert!(
            max_diff(&a.1, &b.1) < 1e-4,
            "input gradient {}",
            max_diff(&a.1, &b.1)
        );
        assert!(
            max_diff(&a.2, &b.2) < 1e-4,
            "weight gradient {}",
            max_diff(&a.2, &b.2)
        );
        assert!(
            max_diff(&a.3, &b.3) < 1e-6,
            "running mean {}",
            max_diff(&a.3, &b.3)
        );
        assert!(
            max_diff(&a.4, &b.4) < 1e-6,
            "running var {}",
            max_diff(&a.4, &b.4)
        );
        assert!(f64::try_from(a.1.abs().max()).expect("scalar") > 1e-3);
    }
}
