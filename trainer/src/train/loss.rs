//! The training loss (docs/recipe.md §4.5): logits upsampled bilinearly
//! (align_corners=false) to the label size, softmax cross-entropy, label 255 ignored.

use tch::{Kind, Reduction, Tensor};

pub const IGNORE: i64 = 255;

/// The mean over the batch's images of each image's mean cross-entropy over its labelled pixels
/// (for one image, HuggingFace's loss). Per image, so that a global batch's gradient does not
/// depend on how it is split into ranks and micro-batches (docs/data-parallel.md). An image with
/// no labelled pixel adds 0, not NaN, and nothing here reads back to the host.
pub fn segmentation_loss(logits: &Tensor, labels: &Tensor) -> Tensor {
    let (_, h, w) = labels.size3().expect("labels are (N, H, W)");
    let up = logits
        .to_kind(Kind::Float)
        .upsample_bilinear2d([h, w], false, None, None);
    // Ignored pixels contribute 0.
    let per_pixel = up.cross_entropy_loss::<Tensor>(labels, None, Reduction::None, IGNORE, 0.0);
    let dims: &[i64] = &[1, 2];
    let sums = per_pixel.sum_dim_intlist(dims, false, Kind::Float);
    let valid = labels
        .ne(IGNORE)
        .sum_dim_intlist(dims, false, Kind::Float)
        .clamp_min(1.0);
    (sums / valid).mean(Kind::Float)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_loss_is_the_mean_of_its_images_losses() {
        let opts = (Kind::Float, tch::Device::Cpu);
        let logits = Tensor::randn([2, 4, 8, 8], opts);
        let labels = Tensor::randint(4, [2, 8, 8], (Kind::Int64, tch::Device::Cpu));
        // Image 1 mostly ignored, image 0 not at all: a batch-wide pixel mean would differ.
        let _ = labels.get(1).narrow(0, 0, 6).fill_(IGNORE);
        let one = |i: i64| {
            f64::try_from(segmentation_loss(
                &logits.narrow(0, i, 1),
                &labels.narrow(0, i, 1),
            ))
            .expect("scalar")
        };
        let both = f64::try_from(segmentation_loss(&logits, &labels)).expect("scalar");
        assert!(
            (both - (one(0) + one(1)) / 2.0).abs() < 1e-6,
            "{both} vs {} {}",
            one(0),
            one(1)
        );
        // All ignored: 0, not NaN.
        let none = labels.full_like(IGNORE);
        assert_eq!(
            f64::try_from(segmentation_loss(&logits, &none)).expect("scalar"),
            0.0
        );
    }
}
