//! Segmentation metrics from one dataset-level confusion matrix (docs/recipe.md §4.6):
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
    /// any device) with one bincount; one small read-back. On a GPU masked_select and bincount
    /// each wait for the device: evaluation accumulates a [`DeviceConfusion`] instead.
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

/// A confusion matrix accumulated on the device: `k * k + 1` i64 counts, the extra last bin
/// collecting the pixels that are not counted (label outside 0..k, e.g. 255, or a prediction
/// outside 0..k). Each update is a fixed-size computation (no masked_select, no bincount: their
/// output size depends on the data, so they wait for the GPU), so evaluating an image never
/// synchronises the host with the device; [`DeviceConfusion::to_host`] reads the counts back once.
pub struct DeviceConfusion {
    num_classes: usize,
    /// (k * k + 1,) i64 on the device; bin `label * k + pred`, then the ignored-pixel bin.
    bins: Tensor,
}

impl DeviceConfusion {
    pub fn new(num_classes: usize, device: tch::Device) -> DeviceConfusion {
        let k = num_classes as i64;
        DeviceConfusion {
            num_classes,
            bins: Tensor::zeros([k * k + 1], (Kind::Int64, device)),
        }
    }

    pub fn device(&self) -> tch::Device {
        self.bins.device()
    }

    /// Adds the (label, prediction) pairs of `pred` and `label` (same number of elements, on this
    /// matrix's device; any integer kind): one `where` and one `index_add_` of ones, all on the
    /// device, nothing read back.
    pub fn update(&mut self, pred: &Tensor, label: &Tensor) {
        let k = self.num_classes as i64;
        let label = label.to_kind(Kind::Int64).flatten(0, -1);
        let pred = pred.to_kind(Kind::Int64).flatten(0, -1);
        let valid = label
            .ge(0)
            .logical_and(&label.lt(k))
            .logical_and(&pred.ge(0))
            .logical_and(&pred.lt(k));
        let idx = (label * k + pred).where_scalarother(&valid, k * k);
        let ones = idx.ones_like();
        let _ = self.bins.index_add_(0, &idx, &ones);
    }

    /// The counts on the host (one read-back), the ignored-pixel bin dropped; an error of the
    /// device work queued before it (e.g. a CUDA fault) is returned.
    pub fn try_to_host(&self) -> Result<ConfusionMatrix, tch::TchError> {
        let k = self.num_classes;
        let bins = Vec::<i64>::try_from(self.bins.f_to_device(tch::Device::Cpu)?)?;
        Ok(ConfusionMatrix {
            num_classes: k,
            counts: bins[..k * k].iter().map(|&b| b as u64).collect(),
        })
    }

    /// [`DeviceConfusion::try_to_host`], panicking on a device error.
    pub fn to_host(&self) -> ConfusionMatrix {
        self.try_to_host()
            .expect("reading the confusion matrix back from the device")
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

    /// A `k`-class matrix with one pixel in each (label, prediction) cell listed.
    fn counts(k: usize, cells: &[(usize, usize)]) -> ConfusionMatrix {
        let mut cm = ConfusionMatrix::new(k);
        for &(gt, pred) in cells {
            cm.add(gt, pred, 1);
        }
        cm
    }

    #[test]
    fn update_counts_pairs_and_ignores_255() {
        let label = Tensor::from_slice(&[0i64, 0, 1, 255, 2, 1]).view([2, 3]);
        let pred = Tensor::from_slice(&[0i64, 1, 1, 2, 2, 0]).view([2, 3]);
        let mut cm = ConfusionMatrix::new(3);
        cm.update(&pred, &label);
        assert_eq!(cm, counts(3, &[(0, 0), (0, 1), (1, 1), (2, 2), (1, 0)]));
    }

    /// The device accumulation (here on the CPU device; on CUDA in worker/tests/eval_device.rs)
    /// equals the per-image host path over several random images with ignored pixels.
    #[test]
    fn device_accumulation_equals_the_host_path() {
        tch::manual_seed(7);
        let cpu = tch::Device::Cpu;
        for k in [1usize, 3, 19] {
            let mut host = ConfusionMatrix::new(k);
            let mut dev = DeviceConfusion::new(k, cpu);
            for (i, (h, w)) in [(7, 9), (16, 16), (1, 33), (32, 5), (4, 4)]
                .into_iter()
                .enumerate()
            {
                let pred = Tensor::randint(k as i64, [1, h, w], (Kind::Int64, cpu));
                let mut label = Tensor::randint(k as i64, [1, h, w], (Kind::Int64, cpu));
                // About a quarter of the pixels ignored (255); one image entirely.
                let ignore = if i == 3 {
                    label.ones_like().to_kind(Kind::Bool)
                } else {
                    Tensor::rand([1, h, w], (Kind::Float, cpu)).lt(0.25)
                };
                let _ = label.masked_fill_(&ignore, 255);
                // Labels arrive as u8 in evaluation: feed both kinds.
                let label = if i % 2 == 0 {
                    label.to_kind(Kind::Uint8)
                } else {
                    label
                };
                host.update(&pred, &label);
                dev.update(&pred, &label);
            }
            let got = dev.to_host();
            assert_eq!(got, host, "{k} classes");
            assert!(got.counts.iter().sum::<u64>() > 0);
            assert_eq!(got.metrics(), host.metrics());
        }
    }

    #[test]
    fn device_update_counts_pairs_and_ignores_out_of_range() {
        let label = Tensor::from_slice(&[0i64, 0, 1, 255, 2, 1, -1, 3]).view([2, 4]);
        let pred = Tensor::from_slice(&[0i64, 1, 1, 2, 2, 0, 0, 0]).view([2, 4]);
        let mut cm = DeviceConfusion::new(3, tch::Device::Cpu);
        cm.update(&pred, &label);
        // A prediction outside 0..k is not counted either (the host path would misplace it).
        cm.update(
            &Tensor::from_slice(&[3i64, -1, 0]),
            &Tensor::from_slice(&[0i64, 1, 2]),
        );
        assert_eq!(
            cm.to_host(),
            counts(3, &[(0, 0), (0, 1), (1, 1), (2, 2), (1, 0), (2, 0)])
        );
        // The extra bin holds the 5 uncounted pixels.
        let extra = Vec::<i64>::try_from(cm.bins.to_device(tch::Device::Cpu)).expect("bins");
        assert_eq!(extra[9], 5);
    }
}
