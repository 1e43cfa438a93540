//! AdamW over flat fp32 buffers (tch's optimizer cannot save its
//! state, and the fused kernels are not bound; the C++ shim binds the one we use).
//!
//! Every trainable parameter is re-pointed into one flat buffer, ordered by group, so that each
//! group is one contiguous slice, and every parameter's `.grad` is set to the matching view of a
//! second flat buffer, so autograd accumulates straight into it: the gradients are one buffer to
//! all-reduce with no per-step concatenation, and zeroing them is one kernel. A step is one
//! launch of torch's fused AdamW kernel per group (three in all). The moments `m` and `v` are
//! flat buffers of the same layout, which makes the state trivial to checkpoint.
//!
//! Groups follow the recipe (docs/recipe.md §4.1, mmcv custom_keys, first match wins:
//! "head" before "norm"): every decode-head parameter gets lr x head_lr_mult and weight decay;
//! encoder norm weights and biases get weight decay 0; everything else, biases included, gets lr
//! and weight decay.

use tch::{nn, Kind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ParamGroup {
    /// Encoder weights and biases (not norms): lr, weight decay.
    Encoder,
    /// Encoder norm weights and biases: lr, no weight decay.
    EncoderNorm,
    /// Decode head: lr x head_lr_mult, weight decay.
    Head,
}

impl ParamGroup {
    pub fn of(name: &str) -> ParamGroup {
        if name.starts_with(crate::model::HEAD_PREFIX) {
            ParamGroup::Head
        } else if name.contains("norm") {
            ParamGroup::EncoderNorm
        } else {
            ParamGroup::Encoder
        }
    }

    const ORDER: [ParamGroup; 3] = [
        ParamGroup::Encoder,
        ParamGroup::EncoderNorm,
        ParamGroup::Head,
    ];
}

/// Hyper-parameters of the update.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub head_lr_mult: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            head_lr_mult: 10.0,
        }
    }
}

/// One parameter's place in the flat buffer.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Slot {
    pub name: String,
    pub shape: Vec<i64>,
    pub offset: i64,
    pub group: ParamGroup,
}

#[derive(Debug, thiserror::Error)]
pub enum OptimError {
    #[error("optimizer state does not match the model: {0}")]
    Layout(String),
    /// Only a libtorch without the fused kernel for this device could say this.
    #[error("the fused AdamW kernel failed: {0}")]
    Kernel(String),
}

pub struct FlatAdamW {
    pub config: AdamWConfig,
    /// Parameters in buffer order.
    slots: Vec<Slot>,
    /// The parameters themselves: every variable is a view into this.
    params: Tensor,
    /// The gradients, same layout: every variable's `.grad` is a view into this.
    grads: Tensor,
    m: Tensor,
    v: Tensor,
    /// The update's number as the fused kernel reads it: a float on the parameters' device,
    /// filled from `step` before each update (a fill, not a host-to-device copy).
    step_tensor: Tensor,
    /// (offset, len) of each group's slice, in `ParamGroup::ORDER`.
    groups: Vec<(ParamGroup, i64, i64)>,
    /// Updates applied so far (Adam's t).
    step: u64,
}

impl FlatAdamW {
    /// Moves every trainable variable of `vs` into one flat fp32 buffer on its device, and its
    /// gradient into another.
    pub fn new(vs: &nn::VarStore, config: AdamWConfig) -> FlatAdamW {
        let mut named: Vec<(String, Tensor)> = vs
            .variables()
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .collect();
        // Deterministic layout: by group, then by name.
        named.sort_by(|a, b| {
            let ga = ParamGroup::ORDER
                .iter()
                .position(|g| *g == ParamGroup::of(&a.0));
            let gb = ParamGroup::ORDER
                .iter()
                .position(|g| *g == ParamGroup::of(&b.0));
            ga.cmp(&gb).then_with(|| a.0.cmp(&b.0))
        });
        let total: i64 = named.iter().map(|(_, t)| t.numel() as i64).sum();
        let device = vs.device();
        let params = Tensor::zeros([total], (Kind::Float, device));
        let grads = Tensor::zeros([total], (Kind::Float, device));
        let mut slots = Vec::with_capacity(named.len());
        let mut offset = 0i64;
        tch::no_grad(|| {
            for (name, mut var) in named {
                let n = var.numel() as i64;
                let shape = var.size();
                let mut view = params.narrow(0, offset, n).view(shape.as_slice());
                view.copy_(&var);
                // The variable now shares storage with the flat buffer (Apex/DeepSpeed style).
                var.set_data(&view);
                let grad = grads.narrow(0, offset, n).view(shape.as_slice());
                if let Err(e) = crate::torch_ext::set_grad(&mut var, &grad) {
                    // Same shape, kind and device by construction.
                    unreachable!("{name}: {e}");
                }
                slots.push(Slot {
                    group: ParamGroup::of(&name),
                    name,
                    shape,
                    offset,
                });
                offset += n;
            }
        });
        let groups = ParamGroup::ORDER
            .iter()
            .filter_map(|g| {
                let members: Vec<&Slot> = slots.iter().filter(|s| s.group == *g).collect();
                let first = members.first()?;
                let len: i64 = members
                    .iter()
                    .map(|s| s.shape.iter().product::<i64>())
                    .sum();
                Some((*g, first.offset, len))
            })
            .collect();
        FlatAdamW {
            config,
            slots,
            m: params.zeros_like(),
            v: params.zeros_like(),
            step_tensor: Tensor::zeros([], (Kind::Float, device)),
            grads,
            params,
            groups,
            step: 0,
        }
    }

    pub fn slots(&self) -> &[Slot] {
        &self.slots
    }

    pub fn steps(&self) -> u64 {
        self.step
    }

    pub fn num_params(&self) -> i64 {
        self.params.numel() as i64
    }

    /// The flat parameter buffer (the model's parameters are views into it).
    pub fn params(&self) -> &Tensor {
        &self.params
    }

    /// The gradients as one flat buffer in the parameter layout: the buffer autograd accumulates
    /// into (a handle to it, not a copy), to all-reduce in place and pass to [`step`](Self::step).
    pub fn flat_grad(&self) -> Tensor {
        self.grads.shallow_clone()
    }

    /// Zeroes every gradient (one kernel over the flat buffer; the views stay in place).
    pub fn zero_grad(&mut self) {
        tch::no_grad(|| {
            let _ = self.grads.zero_();
        });
    }

    /// One AdamW update with the flat gradient `grad` and encoder learning rate `lr`, exactly
    /// as torch.optim.AdamW (decoupled decay, bias-corrected moments), through its fused kernel.
    /// A `grad` of another size or device is refused and nothing changes.
    pub fn step(&mut self, grad: &Tensor, lr: f64) -> Result<(), OptimError> {
        if grad.size() != self.params.size()
            || grad.device() != self.params.device()
            || grad.kind() != Kind::Float
        {
            return Err(OptimError::Layout(format!(
                "the gradient is {:?} {:?} on {:?}; the parameters need Float {:?} on {:?}",
                grad.kind(),
                grad.size(),
                grad.device(),
                self.params.size(),
                self.params.device()
            )));
        }
        self.step += 1;
        let c = self.config;
        tch::no_grad(|| -> Result<(), OptimError> {
            let _ = self.step_tensor.fill_(self.step as f64);
            for &(group, off, len) in &self.groups {
                let (glr, wd) = match group {
                    ParamGroup::Encoder => (lr, c.weight_decay),
                    ParamGroup::EncoderNorm => (lr, 0.0),
                    ParamGroup::Head => (lr * c.head_lr_mult, c.weight_decay),
                };
                let h = crate::torch_ext::AdamWStep {
                    lr: glr,
                    beta1: c.beta1,
                    beta2: c.beta2,
                    weight_decay: wd,
                    eps: c.eps,
                };
                let mut p = self.params.narrow(0, off, len);
                let mut m = self.m.narrow(0, off, len);
                let mut v = self.v.narrow(0, off, len);
                let g = grad.narrow(0, off, len);
                crate::torch_ext::fused_adamw(&mut p, &g, &mut m, &mut v, &self.step_tensor, h)
                    .map_err(OptimError::Kernel)?;
            }
            Ok(())
        })
    }

    /// The state to checkpoint: the moments (the parameters themselves are saved as the model).
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        vec![
            ("m".to_string(), self.m.shallow_clone()),
            ("v".to_string(), self.v.shallow_clone()),
        ]
    }

    /// Restores moments and step count saved by [`state_tensors`](Self::state_tensors), after
    /// checking they have this model's layout.
    pub fn load_state(
        &mut self,
        tensors: &[(String, Tensor)],
        step: u64,
    ) -> Result<(), OptimError> {
        let get = |name: &str| {
            tensors
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, t)| t)
                .ok_or_else(|| OptimError::Layout(format!("no tensor {name:?}")))
        };
        let (m, v) = (get("m")?, get("v")?);
        for (name, t) in [("m", m), ("v", v)] {
            if t.size() != self.m.size() {
                return Err(OptimError::Layout(format!(
                    "{name} has shape {:?}, the model needs {:?}",
                    t.size(),
                    self.m.size()
                )));
            }
        }
        tch::no_grad(|| {
            self.m.copy_(m);
            self.v.copy_(v);
        });
        self.step = step;
        Ok(())
    }
}
