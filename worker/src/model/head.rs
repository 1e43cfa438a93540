//! The all-MLP decode head: per-stage linear to D, upsample to 1/4, concat c4..c1, 1x1 fuse
//! without bias, BatchNorm, ReLU, dropout, classifier. Paths equal HF's `decode_head.*` keys.

use super::config::SegFormerConfig;
use tch::nn::{self, Module, ModuleT};
use tch::Tensor;

#[derive(Debug)]
pub struct DecodeHead {
    linear_c: Vec<nn::Linear>,
    linear_fuse: nn::Conv2D,
    batch_norm: nn::BatchNorm,
    classifier: nn::Conv2D,
    dropout: f64,
}

impl DecodeHead {
    /// `p` is the `decode_head` path.
    pub fn new(p: &nn::Path, cfg: &SegFormerConfig) -> DecodeHead {
        let d = cfg.decoder_dim;
        let linear_c = (0..4)
            .map(|s| {
                nn::linear(
                    p / "linear_c" / s / "proj",
                    cfg.hidden_sizes[s],
                    d,
                    Default::default(),
                )
            })
            .collect();
        let linear_fuse = nn::conv2d(
            p / "linear_fuse",
            4 * d,
            d,
            1,
            nn::ConvConfig {
                bias: false, // BatchNorm follows
                ws_init: nn::Init::Kaiming {
                    dist: nn::init::NormalOrUniform::Normal,
                    fan: nn::init::FanInOut::FanOut,
                    non_linearity: nn::init::NonLinearity::ReLU,
                },
                ..Default::default()
            },
        );
        let batch_norm = nn::batch_norm2d(
            p / "batch_norm",
            d,
            nn::BatchNormConfig {
                ws_init: nn::Init::Const(1.0), // tch's default is Uniform(0, 1)
                bs_init: nn::Init::Const(0.0),
                eps: 1e-5,
                momentum: 0.1,
                ..Default::default()
            },
        );
        let classifier = nn::conv2d(p / "classifier", d, cfg.num_classes, 1, Default::default());
        DecodeHead {
            linear_c,
            linear_fuse,
            batch_norm,
            classifier,
            dropout: cfg.head_dropout,
        }
    }

    /// Stage maps F1..F4 -> logits at the size of F1 (1/4 of the input).
    pub fn forward_t(&self, maps: &[Tensor], train: bool) -> Tensor {
        let (_, _, h1, w1) = maps[0].size4().expect("NCHW stage map");
        let mut projected: Vec<Tensor> = maps
            .iter()
            .zip(&self.linear_c)
            .map(|(f, linear)| {
                let (b, _, h, w) = f.size4().expect("NCHW stage map");
                let t = linear.forward(&f.flatten(2, -1).transpose(1, 2));
                let t = t.transpose(1, 2).reshape([b, -1, h, w]);
                if (h, w) == (h1, w1) {
                    t
                } else {
                    t.upsample_bilinear2d([h1, w1], false, None, None)
                }
            })
            .collect();
        projected.reverse(); // concat order c4, c3, c2, c1
        let x = self.linear_fuse.forward(&Tensor::cat(&projected, 1));
        let x = self.batch_norm.forward_t(&x, train).relu();
        // Channel dropout (Dropout2d), as the original head.
        let x = x.feature_dropout(self.dropout, train);
        self.classifier.forward(&x)
    }

    pub fn disable_dropout(&mut self) {
        self.dropout = 0.0;
    }
}
