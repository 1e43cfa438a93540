//! Segmentation metrics from one dataset-level confusion matrix (reference/segformer.md §4.6):
//! per-class IoU = I / (pred + gt - I) over labelled pixels, mIoU = mean over the classes that
//! occur in the prediction or the label (a class absent from both is skipped, not counted as 0),
//! aAcc = correct / labelled pixels.

use tch::{Kind, Tensor};

#[derive(Debug, Clone, PartialEq)]
pub struct ConfusionMatrix {
    pub num_classes: usize,
    /// Row = label, column = prediction.
    pub counts: Vec<u64>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SegMetrics {
    pub miou: f64,
    pub aacc: f64,
    /// `None` for a class absent from both prediction and label.
    pub class_iou: Vec<Option<f64>>,
}

impl ConfusionMatrix {
    pub fn new(num_classes: usize) -> ConfusionMatrix {
        ConfusionMatrix {
            num_classes,
            counts: vec![0; num_classes * num_classes],
        }
    }

    pub fn add(&mut self, label: usize, pred: usize, n: u64) {
        self.counts[label * self.num_classes + pred] += n;
    }

    /// Counts (label, prediction) pairs of the labelled pixels of `pred` and `label` (same shape,
    /// any device) with one bincount; one small read-back.
    pub fn update(&mut self, pred: &Tensor, label: &Tensor) {
        let k = self.num_classes as i64;
        let label = label.to_kind(Kind::Int64).flatten(0, -1);
        let pred = pred.to_kind(Kind::Int64).flatten(0, -1);
        let valid = label.ge(0).logical_and(&label.lt(k));
        let idx = label.masked_select(&valid) * k + pred.masked_select(&valid);
        let bins = idx
            .bincount::<Tensor>(None, k * k)
            .to_device(tch::Device::Cpu);
        let bins: Vec<i64> = Vec::<i64>::try_from(bins).unwrap_or_default();
        for (c, b) in self.counts.iter_mut().zip(bins) {
            *c += b as u64;
        }
    }

    /// Adds another matrix (e.g. another rank's).
    pub fn merge(&mut self, other: &ConfusionMatrix) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
    }

    pub fn metrics(&self) -> SegMetrics {
        let k = self.num_classes;
        let mut class_iou = Vec::with_capacity(k);
        let (mut correct, mut total) = (0u64, 0u64);
        for c in 0..k {
            let tp = self.counts[c * k + c];
            let gt: u64 = self.counts[c * k..(c + 1) * k].iter().sum();
            let pred: u64 = (0..k).map(|r| self.counts[r * k + c]).sum();
            let union = gt + pred - tp;
            class_iou.push((union > 0).then(|| tp as f64 / union as f64));
            correct += tp;
            total += gt;
        }
        let present: Vec<f64> = class_iou.iter().flatten().copied().collect();
        SegMetrics {
            miou: if present.is_empty() {
                0.0
            } else {
                present.iter().sum::<f64>() / present.len() as f64
            },
            aacc: if total == 0 {
                0.0
            } else {
                correct as f64 / total as f64
            },
            class_iou,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_built_matrix() {
        // 3 classes; class 2 appears in neither labels nor predictions.
        let mut cm = ConfusionMatrix::new(3);
        cm.add(0, 0, 8); // label 0 predicted 0
        cm.add(0, 1, 2); // label 0 predicted 1
        cm.add(1, 1, 5);
        cm.add(1, 0, 1);
        let m = cm.metrics();
        // IoU0 = 8 / (10 + 9 - 8) = 8/11; IoU1 = 5 / (6 + 7 - 5) = 5/8; class 2 skipped.
        assert!((m.class_iou[0].expect("class 0") - 8.0 / 11.0).abs() < 1e-12);
        assert!((m.class_iou[1].expect("class 1") - 5.0 / 8.0).abs() < 1e-12);
        assert_eq!(m.class_iou[2], None, "absent from both: skipped, not 0");
        assert!((m.miou - (8.0 / 11.0 + 5.0 / 8.0) / 2.0).abs() < 1e-12);
        assert!((m.aacc - 13.0 / 16.0).abs() < 1e-12);
    }

    #[test]
    fn predicted_but_never_labelled_counts_as_zero() {
        let mut cm = ConfusionMatrix::new(2);
        cm.add(0, 0, 3);
        cm.add(0, 1, 1); // class 1 predicted, never in the labels: IoU 0, included
        let m = cm.metrics();
        assert_eq!(m.class_iou[1], Some(0.0));
        assert!((m.miou - (3.0 / 4.0) / 2.0).abs() < 1e-12);
    }

    #[test]
    fn update_counts_pairs_and_ignores_255() {
        let label = Tensor::from_slice(&[0i64, 0, 1, 255, 2, 1]).view([2, 3]);
        let pred = Tensor::from_slice(&[0i64, 1, 1, 2, 2, 0]).view([2, 3]);
        let mut cm = ConfusionMatrix::new(3);
        cm.update(&pred, &label);
        let mut want = ConfusionMatrix::new(3);
        want.add(0, 0, 1);
        want.add(0, 1, 1);
        want.add(1, 1, 1);
        want.add(2, 2, 1);
        want.add(1, 0, 1);
        assert_eq!(cm, want);
    }
}
