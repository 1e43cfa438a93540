//! SegFormer in tch: the MiT encoder ([`mit`]) and the all-MLP decode head ([`head`]), with
//! parameter paths equal to HuggingFace `SegformerForSemanticSegmentation` state-dict keys, so HF
//! `model.safetensors` files load directly ([`weights`]).

pub mod config;
pub mod head;
pub mod mit;
pub mod weights;

pub use config::SegFormerConfig;

use head::DecodeHead;
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

    /// Turns off dropout and stochastic depth (train mode then differs from eval mode only by
    /// BatchNorm statistics): for equivalence tests.
    pub fn disable_stochastic(&mut self) {
        self.encoder.disable_drop_path();
        self.head.disable_dropout();
    }
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
