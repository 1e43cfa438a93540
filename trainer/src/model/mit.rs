//! The Mix Transformer (MiT) encoder: four stages of overlapping patch embedding, efficient
//! self-attention with spatial reduction, and Mix-FFN (a depthwise 3x3 conv between two linears).
//!
//! Module paths equal HuggingFace's `segformer.encoder.*` state-dict keys.

use super::config::{SegFormerConfig, PATCH_EMBED};
use tch::nn::{self, Module};
use tch::Tensor;

/// Linear layers: N(0, 0.02), bias 0 (HF `_init_weights`; NVlabs uses a truncated normal).
fn linear(p: nn::Path, i: i64, o: i64) -> nn::Linear {
    nn::linear(
        p,
        i,
        o,
        nn::LinearConfig {
            ws_init: nn::Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            },
            bs_init: Some(nn::Init::Const(0.0)),
            bias: true,
        },
    )
}

/// Convolutions: N(0, sqrt(2 / fan_out)), bias 0 (NVlabs MiT init).
fn conv(p: nn::Path, i: i64, o: i64, k: i64, stride: i64, padding: i64, groups: i64) -> nn::Conv2D {
    let fan_out = (k * k * o / groups) as f64;
    nn::conv2d(
        p,
        i,
        o,
        k,
        nn::ConvConfig {
            stride,
            padding,
            groups,
            ws_init: nn::Init::Randn {
                mean: 0.0,
                stdev: (2.0 / fan_out).sqrt(),
            },
            bs_init: nn::Init::Const(0.0),
            ..Default::default()
        },
    )
}

fn layer_norm(p: nn::Path, c: i64, eps: f64) -> nn::LayerNorm {
    nn::layer_norm(
        p,
        vec![c],
        nn::LayerNormConfig {
            eps,
            ..Default::default()
        },
    )
}

/// (B, C, H, W) -> (B, H*W, C), row-major token order.
fn to_tokens(x: &Tensor) -> Tensor {
    x.flatten(2, -1).transpose(1, 2)
}

/// (B, H*W, C) -> (B, C, H, W).
fn to_map(x: &Tensor, h: i64, w: i64) -> Tensor {
    let (b, _, c) = x.size3().expect("tokens are (B, N, C)");
    x.transpose(1, 2).reshape([b, c, h, w])
}

/// `residual + branch`, with per-sample stochastic depth in training: each sample's branch is
/// dropped with probability `p` and a kept one scaled by 1/(1-p). One kernel (addcmul with a
/// (B, 1, 1) scale) instead of three passes over the activation.
fn add_drop_path(residual: &Tensor, branch: &Tensor, p: f64, train: bool) -> Tensor {
    if !train || p == 0.0 {
        return residual + branch;
    }
    let keep = 1.0 - p;
    let b = branch.size()[0];
    let scale =
        (Tensor::rand([b, 1, 1], (residual.kind(), residual.device())) + keep).floor() / keep;
    residual.addcmul(branch, &scale)
}

#[derive(Debug)]
struct OverlapPatchEmbed {
    proj: nn::Conv2D,
    layer_norm: nn::LayerNorm,
}

impl OverlapPatchEmbed {
    fn new(p: nn::Path, i: i64, o: i64, (k, s, pad): (i64, i64, i64), eps: f64) -> Self {
        OverlapPatchEmbed {
            proj: conv(&p / "proj", i, o, k, s, pad, 1),
            layer_norm: layer_norm(&p / "layer_norm", o, eps),
        }
    }

    /// Returns tokens and the output height and width.
    fn forward(&self, x: &Tensor) -> (Tensor, i64, i64) {
        let x = self.proj.forward(x);
        let (_, _, h, w) = x.size4().expect("NCHW");
        (self.layer_norm.forward(&to_tokens(&x)), h, w)
    }
}

/// Multi-head attention whose keys and values come from a spatially reduced sequence.
#[derive(Debug)]
struct EfficientSelfAttention {
    heads: i64,
    query: nn::Linear,
    key: nn::Linear,
    value: nn::Linear,
    /// The reduction conv and its norm; absent when sr = 1.
    sr: Option<(nn::Conv2D, nn::LayerNorm)>,
    dense: nn::Linear,
}

impl EfficientSelfAttention {
    fn new(p: nn::Path, c: i64, heads: i64, sr: i64, eps: f64) -> Self {
        let s = &p / "self";
        EfficientSelfAttention {
            heads,
            query: linear(&s / "query", c, c),
            key: linear(&s / "key", c, c),
            value: linear(&s / "value", c, c),
            sr: (sr > 1).then(|| {
                (
                    conv(&s / "sr", c, c, sr, sr, 0, 1),
                    layer_norm(&s / "layer_norm", c, eps),
                )
            }),
            dense: linear(&p / "output" / "dense", c, c),
        }
    }

    fn forward(&self, x: &Tensor, h: i64, w: i64) -> Tensor {
        let (b, n, c) = x.size3().expect("tokens are (B, N, C)");
        let d = c / self.heads;
        let split = |t: Tensor, len: i64| t.view([b, len, self.heads, d]).transpose(1, 2);
        let q = split(self.query.forward(x), n);
        let kv_src = match &self.sr {
            Some((conv, norm)) => norm.forward(&to_tokens(&conv.forward(&to_map(x, h, w)))),
            None => x.shallow_clone(),
        };
        let m = kv_src.size()[1];
        let k = split(self.key.forward(&kv_src), m);
        let v = split(self.value.forward(&kv_src), m);
        // Fused attention kernels (flash / memory-efficient) on GPU; scale = d^-0.5.
        let o = Tensor::scaled_dot_product_attention(
            &q,
            &k,
            &v,
            None::<Tensor>,
            0.0,
            false,
            None,
            false,
        );
        self.dense.forward(&o.transpose(1, 2).reshape([b, n, c]))
    }
}

/// Linear -> depthwise 3x3 conv -> GELU -> linear.
#[derive(Debug)]
struct MixFfn {
    dense1: nn::Linear,
    dwconv: nn::Conv2D,
    dense2: nn::Linear,
}

impl MixFfn {
    fn new(p: nn::Path, c: i64, hidden: i64) -> Self {
        MixFfn {
            dense1: linear(&p / "dense1", c, hidden),
            dwconv: conv(&p / "dwconv" / "dwconv", hidden, hidden, 3, 1, 1, hidden),
            dense2: linear(&p / "dense2", hidden, c),
        }
    }

    fn forward(&self, x: &Tensor, h: i64, w: i64) -> Tensor {
        let x = self.dense1.forward(x);
        let x = to_tokens(&self.dwconv.forward(&to_map(&x, h, w)));
        // Exact (erf) GELU, as nn.GELU.
        self.dense2.forward(&x.gelu("none"))
    }
}

#[derive(Debug)]
struct Block {
    layer_norm_1: nn::LayerNorm,
    attention: EfficientSelfAttention,
    layer_norm_2: nn::LayerNorm,
    mlp: MixFfn,
    drop_path: f64,
}

impl Block {
    fn forward_t(&self, x: &Tensor, h: i64, w: i64, train: bool) -> Tensor {
        let a = self.attention.forward(&self.layer_norm_1.forward(x), h, w);
        let x = add_drop_path(x, &a, self.drop_path, train);
        let m = self.mlp.forward(&self.layer_norm_2.forward(&x), h, w);
        add_drop_path(&x, &m, self.drop_path, train)
    }
}

#[derive(Debug)]
struct Stage {
    patch_embed: OverlapPatchEmbed,
    blocks: Vec<Block>,
    norm: nn::LayerNorm,
}

/// The MiT encoder; `forward_t` returns the four stage maps F1 (1/4) .. F4 (1/32), NCHW.
#[derive(Debug)]
pub struct MitEncoder {
    stages: Vec<Stage>,
    /// Copy each stage map to contiguous NCHW (the layout HF hands on) instead of leaving it a
    /// channels-last view of the tokens; for benchmarks comparing the two.
    contiguous_maps: bool,
}

impl MitEncoder {
    /// `p` is the `segformer.encoder` path.
    pub fn new(p: &nn::Path, cfg: &SegFormerConfig) -> MitEncoder {
        let rates = cfg.drop_path_rates();
        let eps = cfg.layer_norm_eps;
        let mut next_rate = rates.into_iter();
        let mut in_c = 3;
        let stages = (0..4)
            .map(|s| {
                let c = cfg.hidden_sizes[s];
                let patch_embed = OverlapPatchEmbed::new(
                    p / "patch_embeddings" / s,
                    in_c,
                    c,
                    PATCH_EMBED[s],
                    eps,
                );
                let blocks = (0..cfg.depths[s])
                    .map(|j| {
                        let bp = p / "block" / s / j;
                        Block {
                            layer_norm_1: layer_norm(&bp / "layer_norm_1", c, eps),
                            attention: EfficientSelfAttention::new(
                                &bp / "attention",
                                c,
                                cfg.num_heads[s],
                                cfg.sr_ratios[s],
                                eps,
                            ),
                            layer_norm_2: layer_norm(&bp / "layer_norm_2", c, eps),
                            mlp: MixFfn::new(&bp / "mlp", c, c * cfg.mlp_ratio),
                            drop_path: next_rate.next().unwrap_or(0.0),
                        }
                    })
                    .collect();
                in_c = c;
                Stage {
                    patch_embed,
                    blocks,
                    norm: layer_norm(p / "layer_norm" / s, c, eps),
                }
            })
            .collect();
        MitEncoder {
            stages,
            contiguous_maps: false,
        }
    }

    pub fn forward_t(&self, x: &Tensor, train: bool) -> Vec<Tensor> {
        let mut maps = Vec::with_capacity(4);
        let mut x = x.shallow_clone();
        for stage in &self.stages {
            let (mut t, h, w) = stage.patch_embed.forward(&x);
            for block in &stage.blocks {
                t = block.forward_t(&t, h, w, train);
            }
            let t = stage.norm.forward(&t);
            let (b, _, c) = t.size3().expect("tokens");
            // A channels-last view, no copy: the next patch embedding and the head's 1x1 convs
            // take it as is (NHWC is cuDNN's native layout for tensor cores), and a conv's
            // channels-last output turns back into tokens without a copy either.
            x = t.reshape([b, h, w, c]).permute([0, 3, 1, 2]);
            if self.contiguous_maps {
                x = x.contiguous();
            }
            maps.push(x.shallow_clone());
        }
        maps
    }

    pub fn set_contiguous_maps(&mut self, on: bool) {
        self.contiguous_maps = on;
    }

    /// Sets drop-path rates to 0 (for equivalence tests and evaluation-like training).
    pub fn disable_drop_path(&mut self) {
        for s in &mut self.stages {
            for b in &mut s.blocks {
                b.drop_path = 0.0;
            }
        }
    }
}
