//! The data pipeline: the labelId table, the Cityscapes reader and its errors, the synthetic
//! dataset, the augmentation's invariants, the sampler and the loader pool.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use segtrain_trainer::data::augment::{augment, AugmentConfig, Augmenter, PAD_RGB};
use segtrain_trainer::data::cityscapes::{
    check_headers, load, load_label, scan, Image, LabelKind, LabelMap, LABEL_TO_TRAIN,
};
use segtrain_trainer::data::error::DataError;
use segtrain_trainer::data::loader::{eval_samples, TrainLoader};
use segtrain_trainer::data::sampler::{BatchLayout, DistributedSampler, Draw};
use segtrain_trainer::data::synth::{generate, write_png, SynthOptions, SYNTH_CLASSES};
use segtrain_trainer::data::{Batch, SamplerState};
use segtrain_trainer::train::checkpoint;

fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

fn synth(dir: &Path, train: usize, val: usize, width: usize, height: usize, seed: u64) {
    generate(&SynthOptions {
        out: dir.to_path_buf(),
        train,
        val,
        width,
        height,
        seed,
    })
    .unwrap();
}

fn geometric(crop_h: usize, crop_w: usize, scale: (f64, f64)) -> AugmentConfig {
    AugmentConfig {
        crop_h,
        crop_w,
        scale_range: scale,
        cat_max_ratio: 1.0,
        flip_prob: 0.5,
        photometric: false,
    }
}

/// A `w` x `h` label map whose value at (x, y) is `f(x, y)`: the patterns the augment tests draw.
fn label_from(w: usize, h: usize, f: impl Fn(usize, usize) -> u8) -> LabelMap {
    let mut label = LabelMap::filled(w, h, 0);
    for y in 0..h {
        for x in 0..w {
            label.data[y * w + x] = f(x, y);
        }
    }
    label
}

fn values(l: &LabelMap) -> BTreeSet<u8> {
    l.data.iter().copied().collect()
}

// ---------------------------------------------------------------------------------------------
// labelId → trainId

#[test]
fn label_table_matches_cityscapes() {
    for (id, train) in [
        (7, 0),
        (8, 1),
        (11, 2),
        (12, 3),
        (13, 4),
        (17, 5),
        (19, 6),
        (20, 7),
        (21, 8),
        (22, 9),
        (23, 10),
        (24, 11),
        (25, 12),
        (26, 13),
        (27, 14),
        (28, 15),
        (31, 16),
        (32, 17),
        (33, 18),
    ] {
        assert_eq!(LABEL_TO_TRAIN[id], train, "labelId {id}");
    }
    for id in [
        0, 1, 2, 3, 4, 5, 6, 9, 10, 14, 15, 16, 18, 29, 30, 34, 45, 254, 255,
    ] {
        assert_eq!(LABEL_TO_TRAIN[id], 255, "labelId {id} must be ignored");
    }
    let train_ids: BTreeSet<u8> = LABEL_TO_TRAIN
        .iter()
        .copied()
        .filter(|&t| t != 255)
        .collect();
    assert_eq!(train_ids, (0..19).collect());
    assert_eq!(LABEL_TO_TRAIN.iter().filter(|&&t| t != 255).count(), 19);
}

// ---------------------------------------------------------------------------------------------
// Augmentation

#[test]
fn augment_output_size_and_label_values() {
    let cfg = AugmentConfig::recipe(40, 48);
    let mut r = rng(1);
    let mut aug = Augmenter::new(cfg).unwrap();
    for i in 0..150 {
        let (w, h) = (20 + (i * 7) % 70, 16 + (i * 13) % 60);
        // Blobs of 2 and 5 with some ignore.
        let label = label_from(w, h, |x, y| [2, 5, 5, 255][(x / 5 + y / 3 + i) % 4]);
        let image = Image::filled(w, h, [(i * 3) as u8, 90, 200]);
        let (img, lbl) = aug.augment(&image, &label, &mut r).unwrap();
        assert_eq!(
            (img.width, img.height, img.data.len()),
            (48, 40, 48 * 40 * 3)
        );
        assert_eq!((lbl.width, lbl.height, lbl.data.len()), (48, 40, 48 * 40));
        let vals = values(&lbl);
        assert!(
            vals.is_subset(&[2, 5, 255].into()),
            "draw {i}: labels {vals:?} not in the source's values"
        );
    }
}

#[test]
fn nearest_resize_creates_no_new_label_values() {
    // A fine pattern of 2 and 5: any interpolation would create 3 or 4 somewhere.
    let (w, h) = (37, 29);
    let label = label_from(w, h, |x, y| if (x + 2 * y) % 3 == 0 { 5 } else { 2 });
    let image = Image::filled(w, h, [10, 20, 30]);
    let cfg = geometric(64, 64, (0.5, 2.0));
    let mut r = rng(2);
    let mut seen = BTreeSet::new();
    for _ in 0..200 {
        let (_, lbl) = augment(&image, &label, &cfg, &mut r).unwrap();
        seen.extend(values(&lbl));
    }
    assert_eq!(seen, [2, 5, 255].into());
}

#[test]
fn padding_when_rescaled_image_is_smaller_than_crop() {
    let (w, h) = (20, 16);
    let image = Image::filled(w, h, [200, 10, 10]);
    let label = LabelMap::filled(w, h, 3);
    for (scale, (nw, nh)) in [(1.0, (20, 16)), (0.5, (10, 8)), (1.5, (30, 24))] {
        let cfg = AugmentConfig {
            photometric: false,
            ..geometric(64, 48, (scale, scale))
        };
        let (img, lbl) = augment(&image, &label, &cfg, &mut rng(3)).unwrap();
        for y in 0..64 {
            for x in 0..48 {
                let inside = x < nw && y < nh;
                let l = lbl.at(x, y);
                let p = img.pixel(x, y);
                if inside {
                    assert_eq!(l, 3, "scale {scale}: ({x},{y}) inside the image");
                    assert_eq!(p, [200, 10, 10], "scale {scale}: ({x},{y})");
                } else {
                    assert_eq!(l, 255, "scale {scale}: ({x},{y}) is padding");
                    assert_eq!(p, PAD_RGB, "scale {scale}: ({x},{y}) is padding");
                }
            }
        }
    }
}

#[test]
fn padded_image_normalises_to_about_zero() {
    use segtrain_trainer::data::cityscapes::{MEAN, STD};
    for c in 0..3 {
        let z = (PAD_RGB[c] as f64 - MEAN[c]) / STD[c];
        assert!(z.abs() < 0.01, "channel {c}: {z}");
    }
}

/// An image whose pixels encode their coordinates (R = x, G = y) and a label with a pattern.
fn coordinate_image(w: usize, h: usize) -> (Image, LabelMap) {
    let mut image = Image::filled(w, h, [0, 0, 0]);
    let mut label = LabelMap::filled(w, h, 0);
    for y in 0..h {
        for x in 0..w {
            let i = y * w + x;
            image.data[i * 3] = x as u8;
            image.data[i * 3 + 1] = y as u8;
            image.data[i * 3 + 2] = 77;
            label.data[i] = ((x * 7 + y * 3) % 19) as u8;
        }
    }
    (image, label)
}

#[test]
fn crop_and_flip_are_exact_and_aligned_at_scale_one() {
    let (w, h) = (90, 70);
    let (image, label) = coordinate_image(w, h);
    let cfg = geometric(32, 40, (1.0, 1.0));
    let mut r = rng(4);
    let mut flips = 0;
    let mut offsets = BTreeSet::new();
    for _ in 0..100 {
        let (img, lbl) = augment(&image, &label, &cfg, &mut r).unwrap();
        // Column order tells the flip: R increases left to right unless flipped.
        let flipped = img.pixel(0, 0)[0] > img.pixel(1, 0)[0];
        flips += flipped as usize;
        let [x_first, y0, _] = img.pixel(0, 0);
        let x0 = if flipped {
            x_first as usize - 39
        } else {
            x_first as usize
        };
        offsets.insert((x0, y0));
        for y in 0..32 {
            for x in 0..40 {
                let sx = if flipped { x0 + 39 - x } else { x0 + x };
                let sy = y0 as usize + y;
                assert_eq!(img.pixel(x, y), image.pixel(sx, sy), "image at ({x},{y})");
                assert_eq!(lbl.at(x, y), label.at(sx, sy), "label at ({x},{y})");
            }
        }
    }
    assert!((30..=70).contains(&flips), "{flips} flips in 100 draws");
    assert!(
        offsets.len() > 50,
        "crops should be spread: {}",
        offsets.len()
    );
}

#[test]
fn rescaled_image_and_label_stay_aligned() {
    // The label holds the source column (rows in the transposed run); the bilinear image's R (G)
    // holds the interpolated source coordinate. Aligned means they agree to within a pixel, for
    // every scale and with or without flip.
    let (w, h) = (120, 100);
    let (image, _) = coordinate_image(w, h);
    for axis in 0..2 {
        let label = label_from(w, h, |x, y| if axis == 0 { x as u8 } else { y as u8 });
        let cfg = geometric(48, 56, (0.5, 2.0));
        let mut r = rng(5 + axis as u64);
        for draw in 0..80 {
            let (img, lbl) = augment(&image, &label, &cfg, &mut r).unwrap();
            for y in 0..48 {
                for x in 0..56 {
                    let l = lbl.at(x, y);
                    if l == 255 {
                        continue;
                    }
                    let v = img.pixel(x, y)[axis];
                    assert!(
                        (v as i32 - l as i32).abs() <= 1,
                        "axis {axis} draw {draw} at ({x},{y}): image {v} label {l}"
                    );
                }
            }
        }
    }
}

#[test]
fn cat_max_ratio_prefers_balanced_crops() {
    // 90% class 0, a 10-column band of class 1 on the right. With 20x20 crops only offsets
    // x0 in 76..=80 pass (class 0 below 75%): 5 of 81 per draw, ~47% within 10 checks.
    let (w, h) = (100, 100);
    let label = label_from(w, h, |x, _| u8::from(x >= 90));
    let image = Image::filled(w, h, [1, 2, 3]);
    let passes = |ratio: f64, seed: u64| {
        let cfg = AugmentConfig {
            cat_max_ratio: ratio,
            flip_prob: 0.0,
            ..geometric(20, 20, (1.0, 1.0))
        };
        let mut r = rng(seed);
        let n = 400;
        let mut ok = 0;
        for _ in 0..n {
            let (_, lbl) = augment(&image, &label, &cfg, &mut r).unwrap();
            let ones = lbl.data.iter().filter(|&&v| v == 1).count();
            let zeros = lbl.data.len() - ones;
            if ones > 0 && (zeros.max(ones) as f64) < 0.75 * lbl.data.len() as f64 {
                ok += 1;
            }
        }
        ok as f64 / n as f64
    };
    let checked = passes(0.75, 6);
    let unchecked = passes(1.0, 6);
    assert!(
        checked > 0.35 && checked < 0.6,
        "checked pass rate {checked}"
    );
    assert!(unchecked < 0.15, "unchecked pass rate {unchecked}");

    // A label that can never pass still yields a crop (the 11th draw, unchecked).
    let single = LabelMap::filled(w, h, 4);
    let cfg = AugmentConfig::recipe(20, 20);
    let (img, lbl) = augment(&image, &single, &cfg, &mut rng(7)).unwrap();
    assert_eq!((img.width, img.height, lbl.data.len()), (20, 20, 400));
}

#[test]
fn photometric_changes_colours_only() {
    let (w, h) = (50, 40);
    let (image, label) = coordinate_image(w, h);
    let on = AugmentConfig {
        photometric: true,
        ..geometric(48, 64, (0.5, 2.0))
    };
    let off = AugmentConfig {
        photometric: false,
        ..on.clone()
    };
    let mut changed = 0;
    for seed in 0..60 {
        let (img_on, lbl_on) = augment(&image, &label, &on, &mut rng(seed)).unwrap();
        let (img_off, lbl_off) = augment(&image, &label, &off, &mut rng(seed)).unwrap();
        // Geometry is drawn before the photometric parameters: same crop, same labels.
        assert_eq!(lbl_on, lbl_off, "seed {seed}");
        changed += (img_on != img_off) as usize;
        for (i, &l) in lbl_on.data.iter().enumerate() {
            if l == 255 {
                assert_eq!(
                    &img_on.data[i * 3..i * 3 + 3],
                    &PAD_RGB,
                    "padding untouched"
                );
            }
        }
    }
    // Each of the four distortions is skipped with p 0.5: ~1/16 of draws are unchanged.
    assert!(changed > 45, "only {changed} of 60 draws changed colours");

    // Saturation and hue keep grey grey; brightness and contrast keep it grey too.
    let grey = Image::filled(w, h, [100, 100, 100]);
    let mut r = rng(8);
    for _ in 0..40 {
        let (img, lbl) = augment(&grey, &label, &on, &mut r).unwrap();
        for (px, &l) in img.data.chunks_exact(3).zip(&lbl.data) {
            if l != 255 {
                assert!(px[0] == px[1] && px[1] == px[2], "grey became {px:?}");
            }
        }
    }
}

#[test]
fn augment_rejects_inconsistent_inputs() {
    let image = Image::filled(10, 10, [0, 0, 0]);
    let label = LabelMap::filled(10, 9, 0);
    let err = augment(&image, &label, &AugmentConfig::recipe(8, 8), &mut rng(0)).unwrap_err();
    assert!(matches!(err, DataError::Config(_)), "{err}");
    let bad = AugmentConfig {
        crop_h: 0,
        ..AugmentConfig::recipe(8, 8)
    };
    assert!(Augmenter::new(bad).is_err());
}

// ---------------------------------------------------------------------------------------------
// Sampler

fn layout(rank: usize, world: usize, batch: usize, accumulate: usize) -> BatchLayout {
    BatchLayout {
        rank,
        world,
        batch_per_gpu: batch,
        accumulate_steps: accumulate,
    }
}

/// Draws per global micro-batch, in the order of the run.
type MicroBatches = Vec<Vec<Draw>>;

/// What every rank of `(world, accumulate)` (batch `batch`) draws in `iterations` steps from
/// `state`, as the trainer runs them: rank r at micro-step m fills global micro-batch
/// k = m·world + r of the step. Returns the micro-batches in global order (step, then k) and
/// each rank's state after every step.
fn run_layout(
    len: usize,
    (world, accumulate): (usize, usize),
    batch: usize,
    state: SamplerState,
    iterations: usize,
) -> (MicroBatches, Vec<Vec<SamplerState>>) {
    let mut ranks: Vec<DistributedSampler> = (0..world)
        .map(|r| {
            DistributedSampler::new(len, layout(r, world, batch, accumulate), 77, true)
                .unwrap()
                .with_state(state)
                .unwrap()
        })
        .collect();
    let per_step = world * accumulate;
    let mut micro = vec![Vec::new(); iterations * per_step];
    let mut states = vec![Vec::new(); world];
    for it in 0..iterations {
        for m in 0..accumulate {
            for (r, s) in ranks.iter_mut().enumerate() {
                let k = s.layout().micro_batch(m);
                assert_eq!(k, m * world + r);
                micro[it * per_step + k] = (0..batch).map(|_| s.next_draw()).collect();
            }
        }
        for (r, s) in ranks.iter().enumerate() {
            states[r].push(s.state());
        }
    }
    (micro, states)
}

#[test]
fn sampler_streams_the_epochs_permutations_without_padding() {
    let s = DistributedSampler::new(10, BatchLayout::single(3), 7, true).unwrap();
    let drawn: Vec<Draw> = s.clone().take(25).collect();
    let stream: Vec<usize> = (0..3).flat_map(|e| s.permutation(e)).collect();
    assert_eq!(
        drawn.iter().map(|d| d.index).collect::<Vec<_>>(),
        stream[..25]
    );
    // Every epoch is a permutation of the dataset; epochs and seeds differ; all is reproducible.
    for e in 0..3 {
        let p = s.permutation(e);
        assert_eq!(
            p.iter().copied().collect::<BTreeSet<_>>(),
            (0..10).collect()
        );
        assert_eq!(p, s.permutation(e));
    }
    assert_ne!(s.permutation(0), s.permutation(1));
    let other = DistributedSampler::new(10, BatchLayout::single(3), 8, true).unwrap();
    assert_ne!(s.permutation(0), other.permutation(0));
    assert_ne!(s.permutation(0), (0..10).collect::<Vec<_>>());
    // (epoch, global_position) walks the stream: unique within an epoch, 0..len.
    let at: Vec<(u64, u64)> = drawn.iter().map(|d| (d.epoch, d.global_position)).collect();
    let want: Vec<(u64, u64)> = (0..25u64).map(|i| (i / 10, i % 10)).collect();
    assert_eq!(at, want);
    // Without shuffle: the dataset order, every epoch, whatever the rank.
    let plain = DistributedSampler::new(7, layout(1, 2, 1, 1), 7, false).unwrap();
    assert_eq!(plain.permutation(3), (0..7).collect::<Vec<_>>());
    let drawn: Vec<usize> = plain.take(5).map(|d| d.index).collect();
    assert_eq!(
        drawn,
        vec![1, 3, 5, 0, 2],
        "rank 1 of 2: stream positions 1, 3, 5, 7, 9"
    );
}

#[test]
fn sampler_micro_batches_are_the_same_for_every_split_of_the_global_batch() {
    let batch = 2;
    // G = 4 or 8 images per step; the lengths put epoch boundaries inside batches, inside
    // micro-batches, and make one step span several epochs (len < G).
    for len in [1, 3, 5, 7, 8, 10, 13] {
        let micro_batches = 24; // of 2 images: 48 stream positions, several epochs
        let runs: Vec<((usize, usize), MicroBatches)> = [(2, 1), (1, 2), (4, 1), (1, 4), (2, 2)]
            .into_iter()
            .map(|(w, a)| {
                let (micro, _) = run_layout(
                    len,
                    (w, a),
                    batch,
                    SamplerState::default(),
                    micro_batches / (w * a),
                );
                ((w, a), micro)
            })
            .collect();
        let (_, reference) = &runs[0];
        assert_eq!(reference.len(), micro_batches);
        // The concatenation of the micro-batches is the stream, in order.
        let s = DistributedSampler::new(len, BatchLayout::single(1), 77, true).unwrap();
        let stream: Vec<usize> = (0..)
            .flat_map(|e| s.permutation(e))
            .take(micro_batches * batch)
            .collect();
        let flat: Vec<usize> = reference.iter().flatten().map(|d| d.index).collect();
        assert_eq!(
            flat, stream,
            "len {len}: the micro-batches concatenate to the stream"
        );
        for ((w, a), micro) in &runs[1..] {
            // Same images at the same stream positions (hence the same augmentation seeds), in
            // the same order, for every global micro-batch index.
            assert_eq!(micro, reference, "len {len}: world {w} x accumulate {a}");
            let sets = |m: &MicroBatches| -> Vec<BTreeSet<usize>> {
                m.iter()
                    .map(|b| b.iter().map(|d| d.index).collect())
                    .collect()
            };
            assert_eq!(sets(micro), sets(reference));
        }
        // And so the global batches of the same size are the same sets of images.
        let global = |m: &MicroBatches, per_step: usize| -> Vec<Vec<usize>> {
            m.chunks(per_step)
                .map(|c| c.iter().flatten().map(|d| d.index).collect())
                .collect()
        };
        assert_eq!(global(&runs[0].1, 2), global(&runs[1].1, 2), "G = 4");
        assert_eq!(global(&runs[2].1, 4), global(&runs[3].1, 4), "G = 8");
        assert_eq!(global(&runs[2].1, 4), global(&runs[4].1, 4), "G = 8");
    }
}

#[test]
fn sampler_state_is_the_stream_position_and_resumes_exactly_with_any_split() {
    let (len, batch) = (13, 2);
    // 3 steps of 4 images from the start: every rank holds the same state at each boundary.
    let (straight, states) = run_layout(len, (2, 1), batch, SamplerState::default(), 9);
    for s in &states {
        assert_eq!(s, &states[0], "every rank holds the same state");
    }
    let want: Vec<SamplerState> = (1..=9u64)
        .map(|i| SamplerState {
            epoch: 4 * i / 13,
            position: 4 * i % 13,
        })
        .collect();
    assert_eq!(
        states[0], want,
        "the global stream position after each step"
    );
    // Resume after step 4 (epoch 1, position 3), with the same or another split of G = 4.
    let saved = states[0][3];
    assert_eq!(
        saved,
        SamplerState {
            epoch: 1,
            position: 3
        }
    );
    for split in [(2, 1), (1, 2)] {
        let (resumed, _) = run_layout(len, split, batch, saved, 5 * 2 / (split.0 * split.1));
        assert_eq!(resumed, straight[8..], "resumed as {split:?}");
    }
    // In the middle of a step the state still names the step's start.
    let mut s = DistributedSampler::new(len, layout(0, 1, batch, 2), 77, true).unwrap();
    s.next_draw();
    s.next_draw();
    s.next_draw();
    assert_eq!(s.state(), SamplerState::default());
    s.next_draw();
    assert_eq!(
        s.state(),
        SamplerState {
            epoch: 0,
            position: 4
        }
    );
    // The end of an epoch is the start of the next.
    let end = DistributedSampler::new(len, layout(1, 2, batch, 1), 77, true)
        .unwrap()
        .with_state(SamplerState {
            epoch: 2,
            position: 13,
        })
        .unwrap();
    assert_eq!(
        end.state(),
        SamplerState {
            epoch: 3,
            position: 0
        }
    );
    // A position this dataset cannot have is refused, naming it.
    let err = DistributedSampler::new(len, layout(1, 2, batch, 1), 77, true)
        .unwrap()
        .with_state(SamplerState {
            epoch: 0,
            position: 14,
        })
        .unwrap_err();
    assert!(
        err.to_string().contains("position 14") && err.to_string().contains("13 samples"),
        "{err}"
    );
}

#[test]
fn sampler_layout_errors_name_the_field() {
    let cases = [
        (layout(2, 2, 1, 1), "rank 2 is not in 0..2"),
        (layout(0, 0, 1, 1), "rank 0 is not in 0..0"),
        (layout(0, 1, 0, 1), "batch_per_gpu must be at least 1"),
        (layout(0, 1, 1, 0), "accumulate_steps must be at least 1"),
        (layout(0, 2, usize::MAX, 2), "overflows"),
    ];
    for (l, needle) in cases {
        let err = DistributedSampler::new(5, l, 0, true).unwrap_err();
        assert!(err.to_string().contains(needle), "{l:?}: {err}");
    }
    let err = DistributedSampler::new(0, BatchLayout::single(1), 0, true).unwrap_err();
    assert!(err.to_string().contains("empty dataset"), "{err}");
}

#[test]
fn format_1_sampler_state_converts_to_the_global_stream_position() {
    // Rank r of 4 after 2 draws of epoch 3 in the padded, interleaved layout: the ranks had
    // consumed positions 0..8 of the epoch together.
    let old = SamplerState {
        epoch: 3,
        position: 2,
    };
    assert_eq!(
        SamplerState::from_per_rank(old, 4, 13),
        SamplerState {
            epoch: 3,
            position: 8
        }
    );
    // One rank: the old and the new states are the same thing.
    assert_eq!(SamplerState::from_per_rank(old, 1, 13), old);
    // Past the end only the padding is left: the next epoch's start.
    let past = SamplerState::from_per_rank(
        SamplerState {
            epoch: 3,
            position: 4,
        },
        4,
        13,
    );
    assert_eq!(
        past,
        SamplerState {
            epoch: 3,
            position: 13
        }
    );
    let s = DistributedSampler::new(13, layout(0, 4, 1, 1), 0, true)
        .unwrap()
        .with_state(past)
        .unwrap();
    assert_eq!(
        s.state(),
        SamplerState {
            epoch: 4,
            position: 0
        }
    );
}

/// A checkpoint written now is format 2; one of format 1 is still read, and its per-rank
/// sampler position comes back as the global stream position (with the manifest's world_size);
/// any other format is refused, naming the formats read.
#[test]
fn checkpoint_manifests_of_format_1_are_read_and_their_sampler_state_converted() {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = segtrain_spec::JobSpec::with_defaults("/d");
    spec.world_size = 4;
    let saved = checkpoint::save(
        dir.path(),
        checkpoint::Contents {
            iteration: 5,
            optimizer_steps: 5,
            sampler: SamplerState {
                epoch: 1,
                position: 7,
            },
            spec: &spec,
            metrics: Default::default(),
            best: None,
            optimizer_layout: Vec::new(),
            model: vec![("w".to_string(), tch::Tensor::from_slice(&[1f32, 2.0]))],
            optimizer: vec![("m".to_string(), tch::Tensor::from_slice(&[0f32]))],
        },
    )
    .unwrap();
    let m = checkpoint::read_manifest(&saved.dir).unwrap();
    assert_eq!(m.format, 2);
    assert_eq!(
        m.sampler_state(13),
        SamplerState {
            epoch: 1,
            position: 7
        },
        "format 2 is the global position already"
    );

    let path = saved.dir.join(checkpoint::MANIFEST_FILE);
    let rewrite = |format: u64, position: u64| {
        let mut json: serde_json::Value =
            serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        json["format"] = format.into();
        json["sampler"]["position"] = position.into();
        fs::write(&path, serde_json::to_vec(&json).unwrap()).unwrap();
    };
    rewrite(1, 2);
    let old = checkpoint::read_manifest(&saved.dir).unwrap();
    assert_eq!(old.format, 1);
    assert_eq!(
        old.sampler_state(13),
        SamplerState {
            epoch: 1,
            position: 8
        },
        "per-rank position 2 of 4 ranks"
    );
    assert_eq!(
        old.sampler_state(6),
        SamplerState {
            epoch: 1,
            position: 6
        },
        "at most the epoch's length"
    );
    checkpoint::load(&saved.dir).expect("a format-1 checkpoint loads");
    rewrite(3, 2);
    let err = checkpoint::read_manifest(&saved.dir).unwrap_err();
    assert!(
        err.to_string().contains("format 3") && err.to_string().contains("formats 1 to 2"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------------
// Synthetic dataset

fn files_under(root: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((
                    p.strip_prefix(root).unwrap().to_path_buf(),
                    fs::read(&p).unwrap(),
                ));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn synth_is_deterministic() {
    let (a, b, c) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    synth(a.path(), 5, 2, 64, 32, 11);
    synth(b.path(), 5, 2, 64, 32, 11);
    synth(c.path(), 5, 2, 64, 32, 12);
    let (fa, fb, fc) = (
        files_under(a.path()),
        files_under(b.path()),
        files_under(c.path()),
    );
    assert_eq!(fa.len(), 14);
    assert!(fa == fb, "same seed, different bytes");
    assert_eq!(
        fa.iter().map(|f| &f.0).collect::<Vec<_>>(),
        fc.iter().map(|f| &f.0).collect::<Vec<_>>()
    );
    assert!(fa != fc, "another seed should give other images");
}

#[test]
fn synth_layout_is_recognised_by_scan() {
    let dir = tempfile::tempdir().unwrap();
    let summary = generate(&SynthOptions {
        train: 7,
        val: 4,
        width: 48,
        height: 32,
        ..SynthOptions::new(dir.path())
    })
    .unwrap();
    assert_eq!(summary.files, 22);
    assert!(summary.train_cities.len() >= 3);
    // What `synth-data` prints reads as sentences, not a Rust struct.
    let text = summary.to_string();
    assert!(
        text.starts_with(&format!(
            "wrote 7 train and 4 val images of 48x32 to {} (22 files,",
            dir.path().display()
        )),
        "{text}"
    );
    assert!(
        text.contains("2 building") && !text.contains("SynthSummary"),
        "{text}"
    );
    let train = scan(dir.path(), "train").unwrap();
    let val = scan(dir.path(), "val").unwrap();
    assert_eq!((train.len(), val.len()), (7, 4));
    let cities: BTreeSet<String> = train
        .iter()
        .map(|s| {
            s.image
                .parent()
                .unwrap()
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    assert_eq!(cities.len(), 3);
    for s in &train {
        assert_eq!(s.label_kind, LabelKind::LabelIds);
        let name = s.image.file_name().unwrap().to_string_lossy().into_owned();
        // <city>_<seq:06>_<frame:06>_leftImg8bit.png
        let parts: Vec<&str> = name.split('_').collect();
        assert_eq!(parts.len(), 4, "{name}");
        assert!(parts[1].len() == 6 && parts[2].len() == 6, "{name}");
        assert_eq!(parts[3], "leftImg8bit.png");
        assert!(s.label.to_string_lossy().ends_with("_gtFine_labelIds.png"));
    }
    // scan's order is sorted by city, then by file.
    let mut sorted = train.clone();
    sorted.sort_by(|a, b| a.image.cmp(&b.image));
    assert_eq!(sorted, train);
}

#[test]
fn synth_labels_use_ignored_ids_and_the_table() {
    let dir = tempfile::tempdir().unwrap();
    synth(dir.path(), 6, 0, 64, 48, 3);
    let samples = scan(dir.path(), "train").unwrap();
    let allowed: BTreeSet<u8> = SYNTH_CLASSES
        .iter()
        .map(|c| c.train_id)
        .chain([255])
        .collect();
    let mut raw_ids = BTreeSet::new();
    let mut train_ids = BTreeSet::new();
    for s in &samples {
        let raw = load_label(&s.label, LabelKind::TrainIds);
        // Raw ids read back without mapping would fail the trainId check (ids > 18).
        assert!(matches!(raw, Err(DataError::LabelValue { .. })), "{raw:?}");
        let raw = image::open(&s.label).unwrap().into_luma8();
        raw_ids.extend(raw.as_raw().iter().copied());
        let (img, lbl) = load(s).unwrap();
        assert_eq!(
            (img.width, img.height, lbl.width, lbl.height),
            (64, 48, 64, 48)
        );
        train_ids.extend(values(&lbl));
    }
    assert!(
        raw_ids.contains(&0) && raw_ids.contains(&1),
        "raw ids {raw_ids:?}"
    );
    assert!(train_ids.contains(&255));
    assert!(train_ids.is_subset(&allowed), "{train_ids:?}");
    assert!(train_ids.len() >= 6, "{train_ids:?}");
}

// ---------------------------------------------------------------------------------------------
// Loader

fn loader_dataset() -> (
    tempfile::TempDir,
    Vec<segtrain_trainer::data::cityscapes::Sample>,
) {
    let dir = tempfile::tempdir().unwrap();
    synth(dir.path(), 10, 3, 64, 40, 5);
    let samples = scan(dir.path(), "train").unwrap();
    (dir, samples)
}

fn start(
    samples: &[segtrain_trainer::data::cityscapes::Sample],
    state: SamplerState,
    threads: usize,
) -> TrainLoader {
    start_with(samples, BatchLayout::single(3), state, threads)
}

fn start_with(
    samples: &[segtrain_trainer::data::cityscapes::Sample],
    layout: BatchLayout,
    state: SamplerState,
    threads: usize,
) -> TrainLoader {
    let sampler = DistributedSampler::new(samples.len(), layout, 21, true)
        .unwrap()
        .with_state(state)
        .unwrap();
    TrainLoader::start(
        samples.to_vec(),
        sampler,
        AugmentConfig::recipe(32, 32),
        threads,
        2,
        1234,
    )
    .unwrap()
}

fn take(loader: &mut TrainLoader, n: usize) -> Vec<Batch> {
    (0..n).map(|_| loader.next_batch().unwrap()).collect()
}

fn same(a: &Batch, b: &Batch) -> bool {
    a.images == b.images && a.labels == b.labels && a.next == b.next && a.n == b.n
}

#[test]
fn loader_is_independent_of_thread_count() {
    let (_dir, samples) = loader_dataset();
    let one = take(&mut start(&samples, SamplerState::default(), 1), 8);
    let four = take(&mut start(&samples, SamplerState::default(), 4), 8);
    for (i, (a, b)) in one.iter().zip(&four).enumerate() {
        assert!(same(a, b), "batch {i} differs between 1 and 4 threads");
        assert_eq!((a.n, a.height, a.width), (3, 32, 32));
        assert_eq!(a.images.len(), 3 * 32 * 32 * 3);
        assert_eq!(a.labels.len(), 3 * 32 * 32);
    }
    // The batches follow the sampler: 10 samples per epoch, 3 per batch.
    let nexts: Vec<(u64, u64)> = one
        .iter()
        .map(|b| (b.next.epoch, b.next.position))
        .collect();
    assert_eq!(
        nexts,
        vec![
            (0, 3),
            (0, 6),
            (0, 9),
            (1, 2),
            (1, 5),
            (1, 8),
            (2, 1),
            (2, 4)
        ]
    );
    // Different batches are different.
    assert!(one[0].images != one[1].images);
}

#[test]
fn loader_resumes_bit_for_bit() {
    let (_dir, samples) = loader_dataset();
    let straight = take(&mut start(&samples, SamplerState::default(), 3), 7);
    let saved = straight[2].next;
    let resumed = take(&mut start(&samples, saved, 2), 4);
    for (i, (a, b)) in straight[3..].iter().zip(&resumed).enumerate() {
        assert!(same(a, b), "resumed batch {i} differs");
    }
}

/// Micro-batch k of a step has the same pixels whichever rank draws it: 2 ranks x 1 micro-batch
/// of 2 give exactly the batches of 1 rank x 2 micro-batches (the augmentation is seeded by the
/// stream position), and both stand at the same state after every step.
#[test]
fn loader_batches_do_not_depend_on_the_world_size() {
    let (_dir, samples) = loader_dataset();
    let steps = 7; // 28 images of a 10-image set: epoch boundaries inside micro-batches
    let one = take(
        &mut start_with(&samples, layout(0, 1, 2, 2), SamplerState::default(), 2),
        2 * steps,
    );
    let ranks: Vec<Vec<Batch>> = (0..2)
        .map(|r| {
            take(
                &mut start_with(&samples, layout(r, 2, 2, 1), SamplerState::default(), 2),
                steps,
            )
        })
        .collect();
    for i in 0..steps {
        for (k, rank) in ranks.iter().enumerate() {
            let (a, b) = (&one[2 * i + k], &rank[i]);
            assert!(
                a.images == b.images && a.labels == b.labels,
                "step {i}, micro-batch {k}: 1 rank accumulating and rank {k} of 2 differ"
            );
            // After a step's last micro-batch: the next step's start, the same everywhere.
            assert_eq!(one[2 * i + 1].next, b.next, "step {i}");
        }
        // Within a step the state names the step's start.
        assert_eq!(
            one[2 * i].next,
            if i == 0 {
                SamplerState::default()
            } else {
                one[2 * i - 1].next
            }
        );
    }
    assert_eq!(
        one[2 * steps - 1].next,
        SamplerState {
            epoch: 2,
            position: 8
        }
    );
}

#[test]
fn loader_reports_a_corrupt_file_and_goes_on() {
    let (_dir, samples) = loader_dataset();
    let bad = samples[4].image.clone();
    fs::write(&bad, b"this is not a png").unwrap();
    let mut loader = start(&samples, SamplerState::default(), 3);
    let started = Instant::now();
    let mut errors = Vec::new();
    let mut ok = 0;
    // 4 batches cover epoch 0 (10 samples) and so sample 4 at least once.
    for _ in 0..4 {
        match loader.next_batch() {
            Ok(_) => ok += 1,
            Err(e) => errors.push(e.to_string()),
        }
    }
    assert!(!errors.is_empty(), "the corrupt file was never reported");
    for e in &errors {
        assert!(
            e.contains(&bad.display().to_string()),
            "error does not name the file: {e}"
        );
    }
    assert!(ok >= 1);
    assert!(started.elapsed() < Duration::from_secs(20));
}

#[test]
fn dropping_the_loader_stops_it_promptly() {
    let (_dir, samples) = loader_dataset();
    let mut loader = start(&samples, SamplerState::default(), 4);
    loader.next_batch().unwrap();
    let took = Instant::now();
    drop(loader);
    let took = took.elapsed();
    assert!(took < Duration::from_secs(2), "drop took {took:?}");
}

#[test]
fn loader_rejects_bad_parameters() {
    let (_dir, samples) = loader_dataset();
    let sampler =
        DistributedSampler::new(samples.len() + 1, BatchLayout::single(2), 0, true).unwrap();
    let err = TrainLoader::start(
        samples.clone(),
        sampler,
        AugmentConfig::recipe(8, 8),
        1,
        1,
        0,
    )
    .unwrap_err();
    assert!(err.to_string().contains("sampler covers 11"), "{err}");
    let sampler = DistributedSampler::new(samples.len(), BatchLayout::single(2), 0, true).unwrap();
    let err =
        TrainLoader::start(samples, sampler, AugmentConfig::recipe(8, 8), 0, 1, 0).unwrap_err();
    assert!(
        err.to_string().contains("threads must be at least 1"),
        "{err}"
    );
}

#[test]
fn eval_samples_are_full_images_in_order() {
    let (dir, _) = loader_dataset();
    let val = scan(dir.path(), "val").unwrap();
    let got: Vec<_> = eval_samples(&val).map(|r| r.unwrap()).collect();
    assert_eq!(got.len(), 3);
    for (e, s) in got.iter().zip(&val) {
        assert_eq!(e.path, s.image);
        assert_eq!((e.width, e.height), (64, 40));
        assert_eq!(e.image.len(), 64 * 40 * 3);
        let (img, lbl) = load(s).unwrap();
        assert_eq!(e.image, img.data);
        assert_eq!(e.label, lbl.data);
    }
    // Dropping it early does not hang.
    let mut it = eval_samples(&val);
    it.next();
    drop(it);
}

// ---------------------------------------------------------------------------------------------
// Malformed datasets: each error names its path.

fn assert_mentions(err: &DataError, parts: &[&Path]) {
    let msg = err.to_string();
    for p in parts {
        assert!(
            msg.contains(&p.display().to_string()),
            "'{msg}' does not name {}",
            p.display()
        );
    }
}

#[test]
fn missing_root_and_split() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("nope");
    let err = scan(&root, "train").unwrap_err();
    assert!(matches!(err, DataError::MissingRoot { .. }), "{err}");
    assert_mentions(&err, &[&root]);
    assert!(err.to_string().contains("leftImg8bit/<split>"), "{err}");

    synth(dir.path(), 2, 0, 32, 32, 0);
    fs::remove_dir_all(dir.path().join("leftImg8bit/val")).unwrap();
    let err = scan(dir.path(), "val").unwrap_err();
    assert!(matches!(err, DataError::MissingSplit { .. }), "{err}");
    assert_mentions(&err, &[&dir.path().join("leftImg8bit/val")]);

    fs::remove_dir_all(dir.path().join("gtFine/train")).unwrap();
    let err = scan(dir.path(), "train").unwrap_err();
    assert!(matches!(err, DataError::MissingSplit { .. }), "{err}");
    assert_mentions(&err, &[&dir.path().join("gtFine/train")]);

    // A split directory with cities but no images.
    fs::create_dir_all(dir.path().join("leftImg8bit/test/x")).unwrap();
    fs::create_dir_all(dir.path().join("gtFine/test")).unwrap();
    let err = scan(dir.path(), "test").unwrap_err();
    assert!(matches!(err, DataError::NoImages { .. }), "{err}");
    assert_mentions(&err, &[&dir.path().join("leftImg8bit/test")]);
}

#[test]
fn missing_label_names_image_and_both_candidates() {
    let dir = tempfile::tempdir().unwrap();
    synth(dir.path(), 4, 0, 32, 32, 0);
    let samples = scan(dir.path(), "train").unwrap();
    fs::remove_file(&samples[1].label).unwrap();
    let err = scan(dir.path(), "train").unwrap_err();
    let DataError::MissingLabel {
        image,
        train_ids,
        label_ids,
    } = &err
    else {
        panic!("expected MissingLabel, got {err}");
    };
    assert_eq!(image, &samples[1].image);
    assert_eq!(label_ids, &samples[1].label);
    assert!(train_ids
        .to_string_lossy()
        .ends_with("_gtFine_labelTrainIds.png"));
    assert!(err.to_string().starts_with("missing label for "), "{err}");
    assert_mentions(&err, &[image, train_ids, label_ids]);
}

#[test]
fn train_ids_are_preferred_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    synth(dir.path(), 2, 0, 32, 24, 0);
    let samples = scan(dir.path(), "train").unwrap();
    let tid = PathBuf::from(
        samples[0]
            .label
            .to_string_lossy()
            .replace("_gtFine_labelIds.png", "_gtFine_labelTrainIds.png"),
    );
    let mut data = vec![13u8; 32 * 24];
    data[5] = 255;
    write_png(&tid, 32, 24, png::ColorType::Grayscale, &data).unwrap();
    let rescanned = scan(dir.path(), "train").unwrap();
    assert_eq!(rescanned[0].label, tid);
    assert_eq!(rescanned[0].label_kind, LabelKind::TrainIds);
    assert_eq!(rescanned[1].label_kind, LabelKind::LabelIds);
    let (_, lbl) = load(&rescanned[0]).unwrap();
    assert_eq!(lbl.data, data, "trainIds are used as they are");

    data[7] = 40;
    write_png(&tid, 32, 24, png::ColorType::Grayscale, &data).unwrap();
    let err = load(&rescanned[0]).unwrap_err();
    assert!(
        matches!(err, DataError::LabelValue { value: 40, .. }),
        "{err}"
    );
    assert_mentions(&err, &[&tid]);
}

#[test]
fn unreadable_and_corrupt_files() {
    let dir = tempfile::tempdir().unwrap();
    synth(dir.path(), 3, 0, 32, 32, 0);
    let samples = scan(dir.path(), "train").unwrap();

    fs::write(&samples[0].image, b"\x89PNG\r\n\x1a\ngarbage").unwrap();
    let err = load(&samples[0]).unwrap_err();
    assert!(matches!(err, DataError::Decode { .. }), "{err}");
    assert_mentions(&err, &[&samples[0].image]);

    // A truncated label: valid header, missing data.
    let bytes = fs::read(&samples[1].label).unwrap();
    fs::write(&samples[1].label, &bytes[..bytes.len() / 2]).unwrap();
    let err = load(&samples[1]).unwrap_err();
    assert!(matches!(err, DataError::Decode { .. }), "{err}");
    assert_mentions(&err, &[&samples[1].label]);

    fs::remove_file(&samples[2].image).unwrap();
    let err = load(&samples[2]).unwrap_err();
    assert!(matches!(err, DataError::Io { .. }), "{err}");
    assert_mentions(&err, &[&samples[2].image]);
}

/// Two synthetic `w` x `h` training samples, the first one's label replaced by a PNG of
/// `label` (width, height, colour type, pixels): the bad-label cases.
fn with_bad_label(
    (w, h): (usize, usize),
    label: (usize, usize, png::ColorType, &[u8]),
) -> (
    tempfile::TempDir,
    Vec<segtrain_trainer::data::cityscapes::Sample>,
) {
    let dir = tempfile::tempdir().unwrap();
    synth(dir.path(), 2, 0, w, h, 0);
    let samples = scan(dir.path(), "train").unwrap();
    let (lw, lh, color, pixels) = label;
    write_png(&samples[0].label, lw, lh, color, pixels).unwrap();
    (dir, samples)
}

#[test]
fn size_mismatch_names_both_files_and_sizes() {
    let grey = (20, 16, png::ColorType::Grayscale, &[7u8; 20 * 16][..]);
    let (_dir, samples) = with_bad_label((40, 30), grey);
    for err in [
        load(&samples[0]).unwrap_err(),
        check_headers(&samples[0]).unwrap_err(),
    ] {
        assert!(matches!(err, DataError::SizeMismatch { .. }), "{err}");
        assert_mentions(&err, &[&samples[0].image, &samples[0].label]);
        let msg = err.to_string();
        assert!(msg.contains("40x30") && msg.contains("20x16"), "{msg}");
    }
    check_headers(&samples[1]).unwrap();
}

#[test]
fn rgb_label_is_refused() {
    let rgb = (16, 16, png::ColorType::Rgb, &[7u8; 16 * 16 * 3][..]);
    let (_dir, samples) = with_bad_label((16, 16), rgb);
    for err in [
        load(&samples[0]).unwrap_err(),
        check_headers(&samples[0]).unwrap_err(),
    ] {
        assert!(matches!(err, DataError::LabelFormat { .. }), "{err}");
        assert_mentions(&err, &[&samples[0].label]);
        assert!(err.to_string().contains("RGB 8-bit"), "{err}");
    }
}

/// The trainer's one-kernel normalisation equals (x - mean) / std per channel, NHWC u8 in,
/// NCHW f32 out.
#[test]
fn normalise_is_mean_std_per_channel_in_nchw() {
    use segtrain_trainer::data::cityscapes::{MEAN, STD};
    use tch::{Device, Kind, Tensor};
    let images = Tensor::randint(256, [2, 5, 7, 3], (Kind::Uint8, Device::Cpu));
    let x = segtrain_trainer::train::eval::normalise(&images);
    assert_eq!(x.size(), [2, 3, 5, 7]);
    assert_eq!(x.kind(), Kind::Float);
    for c in 0..3usize {
        let want = (images.select(3, c as i64).to_kind(Kind::Double) - MEAN[c]) / STD[c];
        let got = x.select(1, c as i64).to_kind(Kind::Double);
        let d = f64::try_from((got - want).abs().max()).expect("scalar");
        assert!(d < 1e-5, "channel {c}: {d}");
    }
}
