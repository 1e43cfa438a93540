//! Architecture hyper-parameters of MiT-B0…B5 + the all-MLP head (reference/segformer.md §1.1).
//!
//! The released code and weights use mlp_ratio 4 in every stage and B3 depths [3, 4, 18, 3]; the
//! paper's Table 6 differs, and weights would not load with it.

use segtrain_spec::Variant;

#[derive(Debug, Clone, PartialEq)]
pub struct SegFormerConfig {
    /// Channels C1..C4 of the four stages.
    pub hidden_sizes: [i64; 4],
    /// Transformer blocks per stage.
    pub depths: [usize; 4],
    pub num_heads: [i64; 4],
    /// Spatial-reduction ratio per side (the conv kernel and stride before keys/values).
    pub sr_ratios: [i64; 4],
    pub mlp_ratio: i64,
    /// Channels D of the decode head.
    pub decoder_dim: i64,
    pub num_classes: i64,
    /// Stochastic depth rises linearly from 0 to this over all blocks.
    pub drop_path_rate: f64,
    /// Channel dropout before the classifier.
    pub head_dropout: f64,
    /// HuggingFace uses 1e-5 in every LayerNorm (the original used 1e-6 in some); we load HF
    /// weights and match HF logits, so 1e-5.
    pub layer_norm_eps: f64,
}

/// Patch-embedding conv per stage: (kernel, stride, padding).
pub const PATCH_EMBED: [(i64, i64, i64); 4] = [(7, 4, 3), (3, 2, 1), (3, 2, 1), (3, 2, 1)];

impl SegFormerConfig {
    pub fn variant(v: Variant, num_classes: i64) -> SegFormerConfig {
        let (hidden_sizes, depths, decoder_dim) = match v {
            Variant::B0 => ([32, 64, 160, 256], [2, 2, 2, 2], 256),
            Variant::B1 => ([64, 128, 320, 512], [2, 2, 2, 2], 256),
            Variant::B2 => ([64, 128, 320, 512], [3, 4, 6, 3], 768),
            Variant::B3 => ([64, 128, 320, 512], [3, 4, 18, 3], 768),
            Variant::B4 => ([64, 128, 320, 512], [3, 8, 27, 3], 768),
            Variant::B5 => ([64, 128, 320, 512], [3, 6, 40, 3], 768),
        };
        SegFormerConfig {
            hidden_sizes,
            depths,
            num_heads: [1, 2, 5, 8],
            sr_ratios: [8, 4, 2, 1],
            mlp_ratio: 4,
            decoder_dim,
            num_classes,
            drop_path_rate: 0.1,
            head_dropout: 0.1,
            layer_norm_eps: 1e-5,
        }
    }

    /// Drop-path probability of every block, in order across stages: linspace(0, rate, total).
    pub fn drop_path_rates(&self) -> Vec<f64> {
        let total: usize = self.depths.iter().sum();
        (0..total)
            .map(|i| {
                if total > 1 {
                    self.drop_path_rate * i as f64 / (total - 1) as f64
                } else {
                    0.0
                }
            })
            .collect()
    }

    /// The smallest input side: one pixel at the 1/32 stage.
    pub const MIN_SIZE: i64 = 32;

    /// (channels, height, width) of the four stage maps for an input of `h` x `w`, by the conv
    /// arithmetic of the patch embeddings (no forward pass needed).
    pub fn stage_shapes(&self, h: i64, w: i64) -> [(i64, i64, i64); 4] {
        let mut out = [(0, 0, 0); 4];
        let (mut h, mut w) = (h, w);
        for (s, &(k, stride, pad)) in PATCH_EMBED.iter().enumerate() {
            h = (h + 2 * pad - k) / stride + 1;
            w = (w + 2 * pad - k) / stride + 1;
            out[s] = (self.hidden_sizes[s], h, w);
        }
        out
    }
}
