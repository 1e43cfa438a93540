//! The one learning-rate function (reference/segformer.md §4.2, the mmseg 1.x form):
//! linear warmup from `base * warmup_ratio` to `base` over `warmup_iters`, then poly decay with
//! `power` from `base` to 0 at `max_iters`. Closed form in the iteration, so resuming needs no
//! scheduler state and warmup and decay never overlap (pitfall 13: two stepped schedulers).

use segtrain_spec::JobSpec;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    pub base_lr: f64,
    pub warmup_iters: u64,
    pub warmup_ratio: f64,
    pub max_iters: u64,
    pub power: f64,
}

impl LrSchedule {
    pub fn from_spec(s: &JobSpec) -> LrSchedule {
        LrSchedule {
            base_lr: s.base_lr,
            warmup_iters: s.warmup_iters,
            warmup_ratio: s.warmup_ratio,
            max_iters: s.max_iters,
            power: s.poly_power,
        }
    }

    /// The multiplier of the base learning rate at 0-based iteration `it` (the lr used for the
    /// update that completes iteration it+1).
    pub fn factor(&self, it: u64) -> f64 {
        if it < self.warmup_iters {
            let t = it as f64 / self.warmup_iters as f64;
            self.warmup_ratio + (1.0 - self.warmup_ratio) * t
        } else {
            let span = (self.max_iters - self.warmup_iters) as f64;
            let done = (it - self.warmup_iters) as f64;
            (1.0 - done / span).max(0.0).powf(self.power)
        }
    }

    /// The encoder's learning rate at iteration `it`; a group with multiplier m gets m times it.
    pub fn lr(&self, it: u64) -> f64 {
        self.base_lr * self.factor(it)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recipe() -> LrSchedule {
        LrSchedule {
            base_lr: 6e-5,
            warmup_iters: 1500,
            warmup_ratio: 1e-6,
            max_iters: 160_000,
            power: 1.0,
        }
    }

    #[test]
    fn reference_test_vectors() {
        // reference/segformer.md §4.2, mmseg-1.x column (to the printed digits).
        let s = recipe();
        let cases = [
            (0, 6.0e-11),
            (750, 3.00000e-05),
            (1499, 5.99600e-05),
            (1500, 6.00000e-05),
            (80_000, 3.02839e-05),
            (159_999, 3.79e-10),
        ];
        for (it, want) in cases {
            let got = s.lr(it);
            let rel = ((got - want) / want).abs();
            assert!(rel < 2e-3, "iteration {it}: lr {got:e}, reference {want:e}");
        }
        // Exact closed forms at the anchors.
        assert_eq!(s.lr(0), 6e-5 * 1e-6);
        assert_eq!(s.lr(1500), 6e-5);
        assert!((s.lr(159_999) - 6e-5 / 158_500.0).abs() < 1e-20);
    }

    #[test]
    fn monotone_warmup_then_decay_and_never_negative() {
        let s = recipe();
        for it in 1..1500 {
            assert!(s.lr(it) > s.lr(it - 1));
        }
        for it in (1501..160_000).step_by(997) {
            assert!(s.lr(it) < s.lr(it - 1));
        }
        assert_eq!(s.lr(160_000), 0.0);
        assert_eq!(s.lr(170_000), 0.0);
    }

    #[test]
    fn no_warmup() {
        let s = LrSchedule {
            warmup_iters: 0,
            ..recipe()
        };
        assert_eq!(s.lr(0), 6e-5);
        assert!((s.lr(80_000) - 3e-5).abs() < 1e-18);
    }
}
