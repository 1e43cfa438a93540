//! The training loss (reference/segformer.md §4.5): logits upsampled bilinearly
//! (align_corners=false) to the label size, softmax cross-entropy, label 255 ignored.

use tch::{Kind, Reduction, Tensor};

pub const IGNORE: i64 = 255;

/// Mean cross-entropy over the labelled pixels (as HuggingFace; mmseg 0.x divided by all pixels).
/// A batch with no labelled pixel gives 0, not NaN, and nothing here reads back to the host.
pub fn segmentation_loss(logits: &Tensor, labels: &Tensor) -> Tensor {
    let (_, h, w) = labels.size3().expect("labels are (N, H, W)");
    let up = logits
        .to_kind(Kind::Float)
        .upsample_bilinear2d([h, w], false, None, None);
    let sum = up.cross_entropy_loss::<Tensor>(labels, None, Reduction::Sum, IGNORE, 0.0);
    let valid = labels.ne(IGNORE).sum(Kind::Float).clamp_min(1.0);
    sum / valid
}
