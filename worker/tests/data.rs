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
use segtrain_trainer::data::sampler::DistributedSampler;
use segtrain_trainer::data::synth::{generate, write_png, SynthOptions, SYNTH_CLASSES};
use segtrain_trainer::data::{Batch, SamplerState};

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

#[test]
fn sampler_ranks_partition_each_epoch() {
    let (len, world) = (10, 3);
    for epoch in 0..4 {
        let mut all = Vec::new();
        let mut per_rank = Vec::new();
        for rank in 0..world {
            let s = DistributedSampler::new(len, rank, world, 42, true).unwrap();
            assert_eq!(s.per_rank_len(), 4);
            let idx = s.epoch_indices(epoch);
            assert_eq!(idx.len(), 4);
            per_rank.push(idx.clone());
            all.extend(idx);
        }
        // 12 slots: every index once plus 2 wrapped around (torch pads the same way).
        assert_eq!(all.len(), 12);
        let distinct: BTreeSet<usize> = all.iter().copied().collect();
        assert_eq!(distinct, (0..len).collect());
        // Interleaving the ranks gives back the padded permutation: its first 10 are distinct.
        let interleaved: Vec<usize> = (0..4)
            .flat_map(|i| (0..world).map(move |r| (r, i)))
            .map(|(r, i)| per_rank[r][i])
            .collect();
        let first: BTreeSet<usize> = interleaved[..len].iter().copied().collect();
        assert_eq!(first.len(), len);
        assert_eq!(interleaved[len..], interleaved[..2]);
    }
}

#[test]
fn sampler_epochs_differ_and_are_deterministic() {
    let a = DistributedSampler::new(50, 0, 1, 7, true).unwrap();
    let b = DistributedSampler::new(50, 0, 1, 7, true).unwrap();
    let c = DistributedSampler::new(50, 0, 1, 8, true).unwrap();
    assert_eq!(a.epoch_indices(0), b.epoch_indices(0));
    assert_ne!(a.epoch_indices(0), a.epoch_indices(1));
    assert_ne!(a.epoch_indices(0), c.epoch_indices(0));
    assert_ne!(a.epoch_indices(0), (0..50).collect::<Vec<_>>());
    // Iteration walks the epochs in order.
    let drawn: Vec<usize> = a.clone().take(100).map(|d| d.index).collect();
    assert_eq!(drawn[..50], a.epoch_indices(0)[..]);
    assert_eq!(drawn[50..], a.epoch_indices(1)[..]);
    // Without shuffle: dataset order, strided by rank.
    let s = DistributedSampler::new(7, 1, 2, 7, false).unwrap();
    assert_eq!(s.epoch_indices(3), vec![1, 3, 5, 0]);
}

#[test]
fn sampler_state_resumes_exactly() {
    let mut a = DistributedSampler::new(13, 1, 4, 99, true).unwrap();
    assert_eq!(a.per_rank_len(), 4);
    for _ in 0..6 {
        a.next_draw();
    }
    let saved = a.state();
    assert_eq!(
        saved,
        SamplerState {
            epoch: 1,
            position: 2
        }
    );
    let rest: Vec<_> = (0..20).map(|_| a.next_draw()).collect();
    let mut b = DistributedSampler::new(13, 1, 4, 99, true)
        .unwrap()
        .with_state(saved)
        .unwrap();
    let resumed: Vec<_> = (0..20).map(|_| b.next_draw()).collect();
    assert_eq!(rest, resumed);
    // The end of an epoch is the start of the next.
    let end = DistributedSampler::new(13, 1, 4, 99, true)
        .unwrap()
        .with_state(SamplerState {
            epoch: 2,
            position: 4,
        })
        .unwrap();
    assert_eq!(
        end.state(),
        SamplerState {
            epoch: 3,
            position: 0
        }
    );
    // A position this dataset cannot have is refused.
    let err = DistributedSampler::new(13, 1, 4, 99, true)
        .unwrap()
        .with_state(SamplerState {
            epoch: 0,
            position: 5,
        })
        .unwrap_err();
    assert!(err.to_string().contains("position 5"), "{err}");
    assert!(DistributedSampler::new(5, 2, 2, 0, true).is_err());
    assert!(DistributedSampler::new(0, 0, 1, 0, true).is_err());
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
    let sampler = DistributedSampler::new(samples.len(), 0, 1, 21, true)
        .unwrap()
        .with_state(state)
        .unwrap();
    TrainLoader::start(
        samples.to_vec(),
        sampler,
        AugmentConfig::recipe(32, 32),
        3,
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
    let sampler = DistributedSampler::new(samples.len() + 1, 0, 1, 0, true).unwrap();
    let err = TrainLoader::start(
        samples.clone(),
        sampler,
        AugmentConfig::recipe(8, 8),
        2,
        1,
        1,
        0,
    )
    .unwrap_err();
    assert!(err.to_string().contains("sampler covers 11"), "{err}");
    let sampler = DistributedSampler::new(samples.len(), 0, 1, 0, true).unwrap();
    assert!(TrainLoader::start(samples, sampler, AugmentConfig::recipe(8, 8), 0, 1, 1, 0).is_err());
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
