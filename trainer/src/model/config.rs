//! Architecture hyper-parameters of MiT-B0…B5 + the all-MLP head (docs/recipe.md §1.1).
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

    /// Multiply-accumulates of one forward pass for an `h` x `w` input (linear, conv and
    /// attention matmuls; norms, activations and upsampling left out), as (total, attention
    /// matmuls). The paper's "FLOPs" are these MACs; a FLOP count is twice them.
    pub fn forward_macs(&self, h: i64, w: i64) -> (f64, f64) {
        let (mut total, mut attention) = (0f64, 0f64);
        let shapes = self.stage_shapes(h, w);
        let mut c_in = 3f64;
        for (s, &(c, hs, ws)) in shapes.iter().enumerate() {
            let (k, _, _) = PATCH_EMBED[s];
            let c = c as f64;
            let n = (hs * ws) as f64;
            total += n * c * c_in * (k * k) as f64;
            let sr = self.sr_ratios[s];
            // Every block's attention first reduces the keys' sequence with an sr x sr conv.
            let (n_kv, reduction) = if sr > 1 {
                let (hk, wk) = ((hs - sr) / sr + 1, (ws - sr) / sr + 1);
                let n_kv = (hk * wk) as f64;
                (n_kv, n_kv * c * c * (sr * sr) as f64)
            } else {
                (n, 0.0)
            };
            let hidden = c * self.mlp_ratio as f64;
            let per_block_attention = 2.0 * n * n_kv * c; // QK^T and AV over all heads
            let per_block = reduction
                + n * c * c // query
                + 2.0 * n_kv * c * c // key, value
                + per_block_attention
                + n * c * c // output projection
                + n * c * hidden // fc1
                + n * hidden * 9.0 // depthwise 3x3
                + n * hidden * c; // fc2
            total += per_block * self.depths[s] as f64;
            attention += per_block_attention * self.depths[s] as f64;
            c_in = c;
        }
        // Decode head: a linear per stage to D, the 1x1 fuse of 4D at 1/4, the classifier.
        let d = self.decoder_dim as f64;
        let n4 = (shapes[0].1 * shapes[0].2) as f64;
        for &(c, hs, ws) in &shapes {
            total += (hs * ws) as f64 * c as f64 * d;
        }
        total += n4 * 4.0 * d * d + n4 * d * self.num_classes as f64;
        (total, attention)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A table computed by hand from the layer shapes: GMAC per 1024×1024 crop, total and the
    /// attention matmuls' share, for 19 classes.
    #[test]
    fn forward_macs_match_the_reference_table() {
        let table = [
            (Variant::B0, 43.8, 16.6),
            (Variant::B1, 86.3, 33.3),
            (Variant::B2, 289.5, 62.3),
            (Variant::B3, 380.1, 94.5),
            (Variant::B4, 477.5, 135.8),
            (Variant::B5, 561.0, 162.1),
        ];
        for (v, total, attention) in table {
            let (t, a) = SegFormerConfig::variant(v, 19).forward_macs(1024, 1024);
            assert!((t / 1e9 - total).abs() < 0.06, "{v:?}: {} GMAC", t / 1e9);
            assert!(
                (a / 1e9 - attention).abs() < 0.06,
                "{v:?}: {} GMAC",
                a / 1e9
            );
        }
        // The full Cityscapes image, against the same table's second column.
        let (t, _) = SegFormerConfig::variant(Variant::B3, 19).forward_macs(1024, 2048);
        assert!((t / 1e9 - 949.2).abs() < 0.1, "{} GMAC", t / 1e9);
    }
}
