//! The one learning-rate function (docs/recipe.md §4.2, the mmseg 1.x form):
//! linear warmup from `base * warmup_ratio` to `base` over `warmup_iters`, then poly decay with
//! `power` from `base` to 0 at `max_iters`. Closed form in the iteration, so resuming needs no
//! scheduler state and warmup and decay never overlap (docs/recipe.md §5.1: two stepped schedulers).

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
    ///
    /// Warmup: `ratio + (1 - ratio) * it / warmup`. Decay: `((max - it) / (max - warmup))^power`,
    /// the remaining fraction taken from the integers, so the base of the power is in (0, 1] for
    /// every training iteration (never negative, never 0/0) and the last iteration's factor is
    /// exactly `(1 / (max - warmup))^power`. From `max_iters` on the factor is the floor, 0. The
    /// result is never below 0 and never NaN, whatever the fields hold.
    pub fn factor(&self, it: u64) -> f64 {
        let f = if it >= self.max_iters {
            0.0
        } else if it < self.warmup_iters {
            let t = it as f64 / self.warmup_iters as f64;
            self.warmup_ratio + (1.0 - self.warmup_ratio) * t
        } else {
            // warmup_iters <= it < max_iters: both differences are positive, remaining <= span.
            let span = (self.max_iters - self.warmup_iters) as f64;
            let remaining = (self.max_iters - it) as f64;
            (remaining / span).powf(self.power)
        };
        // The floor (mmseg's PolyLR eta_min = 0); `max` also maps a NaN (a NaN field) to it.
        f.max(0.0)
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
        // docs/recipe.md §4.2, mmseg-1.x column (to the printed digits).
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

    /// The first and the last training iteration's lr, exactly, from the closed form:
    /// first = base * ratio (warmup at t = 0), or base without warmup; last (it = max - 1) =
    /// base * (1 / (max - warmup))^power. Every iteration's lr is >= the floor 0 and finite, the
    /// last one > 0, and from max_iters on it is the floor.
    #[test]
    fn first_and_last_iteration_exact_and_never_below_the_floor() {
        let with = |warmup_iters: u64, max_iters: u64, power: f64| LrSchedule {
            warmup_iters,
            max_iters,
            power,
            ..recipe()
        };
        // (schedule, first lr, last lr), the expected values written as the closed form.
        let cases: Vec<(LrSchedule, f64, f64)> = vec![
            // The recipe: 6e-5 * 1e-6 at it 0; 6e-5 * (1 / 158500)^1 at it 159999.
            (recipe(), 6e-5 * 1e-6, 6e-5 * (1.0 / 158_500.0)),
            (
                with(1500, 160_000, 0.9),
                6e-5 * 1e-6,
                6e-5 * (1.0f64 / 158_500.0).powf(0.9),
            ),
            (
                with(1500, 160_000, 2.0),
                6e-5 * 1e-6,
                6e-5 * (1.0f64 / 158_500.0).powf(2.0),
            ),
            // No warmup: the first iteration is the top of the decay, (max / max)^p = 1.
            (with(0, 1000, 1.0), 6e-5, 6e-5 * (1.0 / 1000.0)),
            (with(0, 1000, 0.9), 6e-5, 6e-5 * (1.0f64 / 1000.0).powf(0.9)),
            // One decay iteration: it = warmup is also the last, factor (1 / 1)^p = 1.
            (with(10, 11, 1.0), 6e-5 * 1e-6, 6e-5),
            (with(10, 11, 2.0), 6e-5 * 1e-6, 6e-5),
            // A single iteration without warmup.
            (with(0, 1, 0.9), 6e-5, 6e-5),
        ];
        for (s, first, last) in cases {
            assert_eq!(s.lr(0), first, "{s:?}: first iteration");
            assert_eq!(s.lr(s.max_iters - 1), last, "{s:?}: last iteration");
            assert!(
                s.lr(s.max_iters - 1) > 0.0,
                "{s:?}: last iteration positive"
            );
            let step = (s.max_iters / 5000).max(1) as usize;
            for it in (0..s.max_iters).step_by(step).chain([s.max_iters - 1]) {
                let lr = s.lr(it);
                assert!(
                    lr.is_finite() && lr > 0.0,
                    "{s:?}: iteration {it}: lr {lr:e}"
                );
            }
            for it in [s.max_iters, s.max_iters + 1, s.max_iters + 10_000] {
                assert_eq!(s.lr(it), 0.0, "{s:?}: iteration {it} past the end");
            }
        }
    }

    /// Schedules the spec validation rejects still give no negative or NaN lr: a warmup that
    /// reaches (or passes) max_iters, power 0, and out-of-range fields.
    #[test]
    fn degenerate_schedules_stay_at_or_above_the_floor() {
        let cases = [
            LrSchedule {
                warmup_iters: 100,
                max_iters: 100,
                ..recipe()
            },
            LrSchedule {
                warmup_iters: 200,
                max_iters: 100,
                ..recipe()
            },
            LrSchedule {
                power: 0.0,
                ..recipe()
            },
            LrSchedule {
                warmup_ratio: -1.0,
                ..recipe()
            },
            LrSchedule {
                power: f64::NAN,
                ..recipe()
            },
            LrSchedule {
                max_iters: 0,
                warmup_iters: 0,
                ..recipe()
            },
        ];
        for s in cases {
            for it in (0..200).chain([1499, 1500, 80_000, 159_999, 160_000, 200_000]) {
                let lr = s.lr(it);
                assert!(
                    lr >= 0.0 && lr.is_finite(),
                    "{s:?}: iteration {it}: lr {lr}"
                );
            }
            assert_eq!(
                s.lr(s.max_iters.max(s.warmup_iters)),
                0.0,
                "{s:?}: past the end"
            );
        }
        // warmup_iters == max_iters: all of training is warmup, its last step is positive.
        let s = LrSchedule {
            warmup_iters: 100,
            max_iters: 100,
            ..recipe()
        };
        assert_eq!(s.lr(99), 6e-5 * (1e-6 + (1.0 - 1e-6) * (99.0 / 100.0)));
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
