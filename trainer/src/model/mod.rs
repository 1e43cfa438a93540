//! SegFormer in tch: the MiT encoder ([`mit`]) and the all-MLP decode head ([`head`]), with
//! parameter paths equal to HuggingFace `SegformerForSemanticSegmentation` state-dict keys, so HF
//! `model.safetensors` files load directly ([`weights`]).

pub mod config;
pub mod head;
pub mod mit;
pub mod sync_bn;
pub mod weights;

pub use config::SegFormerConfig;

use head::DecodeHead;
pub use head::HeadMode;
use mit::MitEncoder;
use tch::{nn, Tensor};

/// Key prefix of the encoder's parameters.
pub const ENCODER_PREFIX: &str = "segformer.encoder.";
/// Key prefix of the decode head's parameters.
pub const HEAD_PREFIX: &str = "decode_head.";

#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("input must be a float tensor (N, 3, H, W) with H, W >= 32; got {kind:?} of shape {shape:?}")]
    Shape { shape: Vec<i64>, kind: tch::Kind },
}

#[derive(Debug)]
pub struct SegFormer {
    pub config: SegFormerConfig,
    encoder: MitEncoder,
    head: DecodeHead,
}

impl SegFormer {
    /// Creates every parameter under `root` (normally `vs.root()`).
    pub fn new(root: &nn::Path, config: SegFormerConfig) -> SegFormer {
        let encoder = MitEncoder::new(&(root / "segformer" / "encoder"), &config);
        let head = DecodeHead::new(&(root / "decode_head"), &config);
        SegFormer {
            config,
            encoder,
            head,
        }
    }

    /// Checks what the forward pass cannot: rank, channels, kind, minimum size.
    pub fn check_input(x: &Tensor) -> Result<(), InputError> {
        let shape = x.size();
        let ok = shape.len() == 4
            && shape[1] == 3
            && shape[2] >= SegFormerConfig::MIN_SIZE
            && shape[3] >= SegFormerConfig::MIN_SIZE
            && x.is_floating_point();
        if ok {
            Ok(())
        } else {
            Err(InputError::Shape {
                shape,
                kind: x.kind(),
            })
        }
    }

    /// The four encoder stage maps, 1/4 .. 1/32 of the input.
    pub fn features(&self, x: &Tensor, train: bool) -> Vec<Tensor> {
        self.encoder.forward_t(x, train)
    }

    /// Logits at 1/4 of the input size: (N, num_classes, H/4, W/4).
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let maps = self.encoder.forward_t(x, train);
        self.head.forward_t(&maps, train)
    }

    /// Training-mode logits with SyncBN in the head: batch statistics over every rank's batch
    /// through `global_sum`; pass the tape to [`sync_bn::SyncBnTape::backward`].
    pub fn forward_sync(
        &self,
        x: &Tensor,
        global_sum: &mut sync_bn::GlobalSum,
    ) -> anyhow::Result<(Tensor, sync_bn::SyncBnTape)> {
        let maps = self.encoder.forward_t(x, true);
        self.head.forward_sync(&maps, global_sum)
    }

    /// How the head computes its fused map (the default is the fast one; both are the same
    /// function).
    pub fn set_head_mode(&mut self, mode: HeadMode) {
        self.head.set_mode(mode);
    }

    /// Whether the encoder copies its stage maps to contiguous NCHW (default: channels-last views).
    pub fn set_contiguous_maps(&mut self, on: bool) {
        self.encoder.set_contiguous_maps(on);
    }

    /// Turns off dropout and stochastic depth (train mode then differs from eval mode only by
    /// BatchNorm statistics): for equivalence tests.
    pub fn disable_stochastic(&mut self) {
        self.encoder.disable_drop_path();
        self.head.disable_dropout();
    }
}

/// Whether the training loss does not depend on the parameter `name` at all: its gradient is zero
/// in exact arithmetic, so what autograd computes for it is rounding noise, which AdamW's
/// normalisation would turn into full-size random steps (different on every batch layout, so
/// that no two runs could agree). The trainer zeroes these gradients; weight decay still
/// applies. They are:
/// * the attention key biases: `q . (k + b)` shifts every logit of a query by the same `q . b`,
///   which the softmax ignores;
/// * the head's per-stage projection biases and the last stage's LayerNorm bias (stage 4 feeds
///   only the head): each shifts the fused map by a per-channel constant, which the head's
///   training-mode BatchNorm subtracts again.
pub fn is_loss_invariant(name: &str) -> bool {
    (name.starts_with(ENCODER_PREFIX) && name.ends_with(".attention.self.key.bias"))
        || name == "segformer.encoder.layer_norm.3.bias"
        || (name.starts_with("decode_head.linear_c.") && name.ends_with(".proj.bias"))
}

/// Parameter counts of a model's VarStore: (encoder, head), trainable parameters only (BatchNorm
/// running statistics are buffers, not parameters).
pub fn parameter_counts(vs: &nn::VarStore) -> (i64, i64) {
    let mut encoder = 0;
    let mut head = 0;
    for (name, t) in vs.variables() {
        if !t.requires_grad() {
            continue;
        }
        let n: i64 = t.size().iter().product();
        if name.starts_with(ENCODER_PREFIX) {
            encoder += n;
        } else if name.starts_with(HEAD_PREFIX) {
            head += n;
        }
    }
    (encoder, head)
}

/// What `segtrain-worker model-info` prints.
#[derive(Debug, serde::Serialize)]
pub struct ModelInfo {
    pub variant: String,
    pub num_classes: i64,
    pub parameters: i64,
    pub encoder_parameters: i64,
    pub head_parameters: i64,
    pub input: [i64; 2],
    /// (channels, height, width) of the stage maps F1..F4.
    pub stages: Vec<[i64; 3]>,
    /// (classes, height, width) of the logits.
    pub logits: [i64; 3],
}

/// Builds the model on the CPU (so counts come from the real parameters) and computes the shapes
/// an `h` x `w` input gives.
pub fn info(variant: segtrain_spec::Variant, num_classes: i64, h: i64, w: i64) -> ModelInfo {
    let vs = nn::VarStore::new(tch::Device::Cpu);
    let model = SegFormer::new(&vs.root(), SegFormerConfig::variant(variant, num_classes));
    let (encoder, head) = parameter_counts(&vs);
    let stages: Vec<[i64; 3]> = model
        .config
        .stage_shapes(h, w)
        .iter()
        .map(|&(c, h, w)| [c, h, w])
        .collect();
    ModelInfo {
        variant: variant.to_string(),
        num_classes,
        parameters: encoder + head,
        encoder_parameters: encoder,
        head_parameters: head,
        input: [h, w],
        logits: [num_classes, stages[0][1], stages[0][2]],
        stages,
    }
}

impl std::fmt::Display for ModelInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "SegFormer-{} ({} classes)",
            self.variant.to_uppercase(),
            self.num_classes
        )?;
        writeln!(f, "parameters  {:>12}", group(self.parameters))?;
        writeln!(f, "  encoder   {:>12}", group(self.encoder_parameters))?;
        writeln!(f, "  head      {:>12}", group(self.head_parameters))?;
        writeln!(f, "input       3 x {} x {}", self.input[0], self.input[1])?;
        for (i, [c, h, w]) in self.stages.iter().enumerate() {
            writeln!(f, "stage {}     {c} x {h} x {w}  (1/{})", i + 1, 4 << i)?;
        }
        write!(
            f,
            "logits      {} x {} x {}",
            self.logits[0], self.logits[1], self.logits[2]
        )
    }
}

/// 3719027 -> "3,719,027".
fn group(n: i64) -> String {
    let s = n.abs().to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    if n < 0 {
        format!("-{out}")
    } else {
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    /// The parameters named loss-invariant get a gradient that is rounding noise (zero to 1e-6
    /// of the others'), and they are exactly the ones the rule names.
    #[test]
    fn loss_invariant_parameters_have_no_gradient_to_speak_of() {
        tch::manual_seed(1);
        let vs = nn::VarStore::new(Device::Cpu);
        let mut model = SegFormer::new(
            &vs.root(),
            SegFormerConfig::variant(segtrain_spec::Variant::B0, 5),
        );
        model.disable_stochastic();
        let x = Tensor::randn([2, 3, 64, 64], (Kind::Float, Device::Cpu));
        let labels = Tensor::randint(5, [2, 16, 16], (Kind::Int64, Device::Cpu));
        let loss = crate::train::loss::segmentation_loss(&model.forward_t(&x, true), &labels);
        loss.backward();
        let (mut invariant, mut largest_other) = (Vec::new(), 0f64);
        for (name, t) in vs.variables() {
            if !t.requires_grad() {
                continue;
            }
            let g = f64::try_from(t.grad().abs().max()).expect("scalar");
            if is_loss_invariant(&name) {
                invariant.push((name, g));
            } else {
                largest_other = largest_other.max(g);
            }
        }
        // 8 key biases (B0: 2 blocks x 4 stages), 4 projection biases, 1 LayerNorm bias.
        assert_eq!(invariant.len(), 13, "{invariant:?}");
        for (name, g) in &invariant {
            assert!(
                *g <= 1e-6 * largest_other,
                "{name}: gradient {g:e} (largest other {largest_other:e})"
            );
        }
    }
}
