//! A synthetic dataset in exactly the Cityscapes layout, for tests, demos and benchmarks without
//! the real data: `leftImg8bit/{train,val}/<city>/<city>_<seq:06>_<frame:06>_leftImg8bit.png`
//! (RGB) and `gtFine/{train,val}/<city>/<same stem>_gtFine_labelIds.png` (8-bit grayscale raw
//! labelIds, so loading goes through the labelId → trainId table like real gtFine files).
//!
//! Each image is a street-like scene: sky, a skyline of buildings with window grids, a sidewalk
//! band and the road, with trees (vegetation), cars and people on top. Each class has its own
//! Cityscapes palette colour plus per-pixel noise and a texture (windows, gradients, foliage
//! noise), so the class follows from the local colour and texture and a small SegFormer-B0 learns
//! it in a few hundred iterations. Ignored regions exercise the 255 path: an 'unlabeled' (id 0)
//! border on the left, top and right, an 'ego vehicle' (id 1) strip at the bottom and sometimes a
//! 'static' (id 4) box.
//!
//! Output is deterministic: an image depends only on (seed, split, index), files are PNG-encoded
//! with fixed settings, and generation is spread over threads without affecting the bytes.

use crate::seed::splitmix64 as mix;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::cityscapes::{IMAGE_SUFFIX, LABEL_IDS_SUFFIX, LABEL_TO_TRAIN};
use super::error::DataError;

/// What to generate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SynthOptions {
    /// Dataset root (created if missing; existing files of the same names are overwritten).
    pub out: PathBuf,
    /// Number of train and val images.
    pub train: usize,
    pub val: usize,
    /// Image size in pixels (at least 16x16).
    pub width: usize,
    pub height: usize,
    pub seed: u64,
}

impl SynthOptions {
    /// The CLI defaults: 256x128 images, 200 train, 40 val, seed 0.
    pub fn new(out: impl Into<PathBuf>) -> SynthOptions {
        SynthOptions {
            out: out.into(),
            train: 200,
            val: 40,
            width: 256,
            height: 128,
            seed: 0,
        }
    }
}

/// One class that appears in the synthetic data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SynthClass {
    pub label_id: u8,
    pub train_id: u8,
    pub name: &'static str,
}

/// What [`generate`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SynthSummary {
    /// The dataset root (`--out`), in the Cityscapes layout.
    pub root: PathBuf,
    /// Images written per split.
    pub train: usize,
    pub val: usize,
    /// Every image's size, pixels.
    pub width: usize,
    pub height: usize,
    /// The city directories of each split.
    pub train_cities: Vec<String>,
    pub val_cities: Vec<String>,
    /// The training classes that appear (7 of the 19).
    pub classes: Vec<SynthClass>,
    /// The labelIds written that map to 255 (ignore).
    pub ignored_label_ids: Vec<u8>,
    /// Files written and their total size.
    pub files: usize,
    pub bytes: u64,
}

impl std::fmt::Display for SynthSummary {
    /// What `synth-data` prints: what was written where, for people.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "wrote {} train and {} val images of {}x{} to {} ({} files, {:.1} MB)",
            self.train,
            self.val,
            self.width,
            self.height,
            self.root.display(),
            self.files,
            self.bytes as f64 / 1e6
        )?;
        writeln!(f, "  train cities: {}", self.train_cities.join(", "))?;
        writeln!(f, "  val cities:   {}", self.val_cities.join(", "))?;
        let classes: Vec<String> = self
            .classes
            .iter()
            .map(|c| format!("{} {}", c.train_id, c.name))
            .collect();
        writeln!(f, "  classes (trainId name): {}", classes.join(", "))?;
        let ignored: Vec<String> = self.ignored_label_ids.iter().map(u8::to_string).collect();
        writeln!(
            f,
            "  labelIds read as 255 (ignored): {}",
            ignored.join(", ")
        )
    }
}

/// The classes the synthetic scenes use.
pub const SYNTH_CLASSES: [SynthClass; 7] = [
    SynthClass {
        label_id: 7,
        train_id: 0,
        name: "road",
    },
    SynthClass {
        label_id: 8,
        train_id: 1,
        name: "sidewalk",
    },
    SynthClass {
        label_id: 11,
        train_id: 2,
        name: "building",
    },
    SynthClass {
        label_id: 21,
        train_id: 8,
        name: "vegetation",
    },
    SynthClass {
        label_id: 23,
        train_id: 10,
        name: "sky",
    },
    SynthClass {
        label_id: 24,
        train_id: 11,
        name: "person",
    },
    SynthClass {
        label_id: 26,
        train_id: 13,
        name: "car",
    },
];

/// 'unlabeled', 'ego vehicle', 'static': all map to 255.
pub const SYNTH_IGNORED_IDS: [u8; 3] = [0, 1, 4];

pub const TRAIN_CITIES: [&str; 3] = ["aachen", "bochum", "bremen"];
pub const VAL_CITIES: [&str; 3] = ["frankfurt", "lindau", "munster"];

/// Writes the dataset described by `opts` and returns what it wrote.
pub fn generate(opts: &SynthOptions) -> Result<SynthSummary, DataError> {
    if opts.width < 16 || opts.height < 16 || opts.width > 16384 || opts.height > 16384 {
        return Err(DataError::Config(format!(
            "synthetic image size must be between 16x16 and 16384x16384, got {}x{}",
            opts.width, opts.height
        )));
    }
    if opts.train == 0 {
        return Err(DataError::Config(
            "the synthetic train split needs at least one image".into(),
        ));
    }
    // Every (split, city) directory exists even when a city gets no image, so `scan` finds both
    // splits.
    let mut jobs = Vec::with_capacity(opts.train + opts.val);
    for (split, count, cities) in [
        ("train", opts.train, &TRAIN_CITIES),
        ("val", opts.val, &VAL_CITIES),
    ] {
        for city in cities {
            for kind in ["leftImg8bit", "gtFine"] {
                let dir = opts.out.join(kind).join(split).join(city);
                fs::create_dir_all(&dir).map_err(|e| DataError::io(&dir, e))?;
            }
        }
        for index in 0..count {
            jobs.push((split, index, cities[index % cities.len()]));
        }
    }

    // Images are independent, so generate them on all cores; each one's bytes depend only on
    // (seed, split, index).
    let next = AtomicUsize::new(0);
    let totals = Mutex::new((0usize, 0u64));
    let first_error: Mutex<Option<(usize, DataError)>> = Mutex::new(None);
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(jobs.len())
        .max(1);
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(&(split, index, city)) = jobs.get(i) else {
                    return;
                };
                match write_one(opts, split, index, city) {
                    Ok(bytes) => {
                        let mut t = totals.lock().unwrap_or_else(|e| e.into_inner());
                        t.0 += 2;
                        t.1 += bytes;
                    }
                    Err(e) => {
                        let mut slot = first_error.lock().unwrap_or_else(|e| e.into_inner());
                        if slot.as_ref().is_none_or(|(j, _)| i < *j) {
                            *slot = Some((i, e));
                        }
                        return;
                    }
                }
            });
        }
    });
    if let Some((_, e)) = first_error.into_inner().unwrap_or_else(|e| e.into_inner()) {
        return Err(e);
    }
    let (files, bytes) = totals.into_inner().unwrap_or_else(|e| e.into_inner());
    Ok(SynthSummary {
        root: opts.out.clone(),
        train: opts.train,
        val: opts.val,
        width: opts.width,
        height: opts.height,
        train_cities: TRAIN_CITIES.iter().map(|s| s.to_string()).collect(),
        val_cities: VAL_CITIES.iter().map(|s| s.to_string()).collect(),
        classes: SYNTH_CLASSES.to_vec(),
        ignored_label_ids: SYNTH_IGNORED_IDS.to_vec(),
        files,
        bytes,
    })
}

/// Renders and writes one image/label pair; returns the bytes written.
fn write_one(opts: &SynthOptions, split: &str, index: usize, city: &str) -> Result<u64, DataError> {
    let split_id = if split == "train" { 0 } else { 1 };
    let seed = mix(mix(mix(opts.seed) ^ split_id) ^ index as u64);
    let (rgb, ids) = render(opts.width, opts.height, seed);
    let stem = format!("{city}_{:06}_{:06}", index / 3, 19);
    // <root>/<leftImg8bit|gtFine>/<split>/<city>/<stem><suffix>, as Cityscapes names them.
    let path = |tree: &str, suffix: &str| {
        opts.out
            .join(tree)
            .join(split)
            .join(city)
            .join(format!("{stem}{suffix}"))
    };
    let (w, h) = (opts.width, opts.height);
    let image = write_png(
        &path("leftImg8bit", IMAGE_SUFFIX),
        w,
        h,
        png::ColorType::Rgb,
        &rgb,
    )?;
    let label = path("gtFine", LABEL_IDS_SUFFIX);
    Ok(image + write_png(&label, w, h, png::ColorType::Grayscale, &ids)?)
}

/// Encodes an 8-bit PNG with fixed settings (same bytes for the same pixels).
pub fn write_png(
    path: &Path,
    width: usize,
    height: usize,
    color: png::ColorType,
    data: &[u8],
) -> Result<u64, DataError> {
    let enc_err = |e: png::EncodingError| DataError::Encode {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let mut bytes = Vec::with_capacity(data.len() / 2 + 1024);
    {
        let mut encoder = png::Encoder::new(&mut bytes, width as u32, height as u32);
        encoder.set_color(color);
        encoder.set_depth(png::BitDepth::Eight);
        encoder.set_compression(png::Compression::Fast);
        let mut writer = encoder.write_header().map_err(enc_err)?;
        writer.write_image_data(data).map_err(enc_err)?;
        writer.finish().map_err(enc_err)?;
    }
    fs::write(path, &bytes).map_err(|e| DataError::io(path, e))?;
    Ok(bytes.len() as u64)
}

/// U[lo, hi), or lo when the range is empty (tiny images), instead of panicking.
fn uniform(rng: &mut ChaCha8Rng, lo: f64, hi: f64) -> f64 {
    if lo < hi {
        rng.random_range(lo..hi)
    } else {
        lo
    }
}

// Materials: what a pixel is made of. Each has a labelId and a colour rule.
const SKY: u8 = 0;
const BUILDING: u8 = 1;
const WINDOW: u8 = 2;
const SIDEWALK: u8 = 3;
const ROAD: u8 = 4;
const TREE: u8 = 5;
const PERSON: u8 = 6;
const CAR: u8 = 7;
const CAR_WINDOW: u8 = 8;
const STATIC: u8 = 9;
const EGO: u8 = 10;
const BORDER: u8 = 11;

/// labelId of each material.
const MATERIAL_ID: [u8; 12] = [23, 11, 11, 8, 7, 21, 24, 26, 26, 4, 1, 0];
/// Base colour and noise amplitude of each material (Cityscapes palette for the classes).
const MATERIAL_COLOUR: [([i32; 3], i32); 12] = [
    ([70, 130, 180], 6),  // sky (plus a gradient)
    ([70, 70, 70], 10),   // building
    ([40, 45, 60], 8),    // window
    ([244, 35, 232], 12), // sidewalk
    ([128, 64, 128], 12), // road
    ([107, 142, 35], 40), // vegetation: strong foliage noise
    ([220, 20, 60], 14),  // person
    ([0, 0, 142], 12),    // car
    ([0, 0, 80], 8),      // car window
    ([150, 120, 90], 10), // static
    ([35, 35, 45], 8),    // ego vehicle
    ([0, 0, 0], 4),       // rectification border
];

/// Draws one scene: returns RGB pixels and labelIds.
fn render(w: usize, h: usize, seed: u64) -> (Vec<u8>, Vec<u8>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (wf, hf) = (w as f64, h as f64);
    let mut mat = vec![ROAD; w * h];

    // Background bands. The skyline: blocks of random width, each with its own roof height.
    let horizon = (hf * rng.random_range(0.45..0.55)) as usize;
    let sidewalk_end = horizon + ((hf * rng.random_range(0.06..0.12)) as usize).max(1);
    let ego_start = h - ((hf * rng.random_range(0.06..0.10)) as usize).max(1);
    let cell = (h / 40).max(2);
    let mut x = 0;
    while x < w {
        let block_w = ((wf * rng.random_range(0.08..0.2)) as usize).max(2);
        let roof = (hf * rng.random_range(0.08..0.35)) as usize;
        for xx in x..(x + block_w).min(w) {
            for y in 0..horizon {
                mat[y * w + xx] = if y < roof {
                    SKY
                } else if (xx / cell) % 3 == 1 && (y / cell) % 3 == 1 {
                    WINDOW
                } else {
                    BUILDING
                };
            }
        }
        x += block_w;
    }
    for y in horizon..sidewalk_end.min(h) {
        mat[y * w..(y + 1) * w].fill(SIDEWALK);
    }

    // Trees around the skyline.
    for _ in 0..rng.random_range(1..=3) {
        let cx = rng.random_range(0.0..wf);
        let cy = hf * rng.random_range(0.2..0.45);
        let ry = hf * rng.random_range(0.08..0.15);
        let rx = ry * rng.random_range(0.8..1.5);
        fill_ellipse(&mut mat, w, h, cx, cy, rx, ry, TREE);
    }
    // People standing on the sidewalk.
    for _ in 0..rng.random_range(1..=3) {
        let ph = hf * rng.random_range(0.12..0.2);
        let pw = ph * 0.3;
        let cx = rng.random_range(0.0..wf);
        let feet = sidewalk_end as f64 - hf * 0.01;
        fill_ellipse(
            &mut mat,
            w,
            h,
            cx,
            feet - ph / 2.0,
            pw / 2.0,
            ph / 2.0,
            PERSON,
        );
    }
    // Cars on the road, with windows in their upper part.
    for _ in 0..rng.random_range(1..=3) {
        let cw = wf * rng.random_range(0.1..0.2);
        let ch = (cw * 0.45).min(hf * 0.3);
        let x0 = rng.random_range(-cw * 0.3..wf - cw * 0.7);
        let bottom = uniform(&mut rng, sidewalk_end as f64 + ch * 0.6, ego_start as f64);
        let y0 = bottom - ch;
        fill_rect(&mut mat, w, h, x0, y0, cw, ch, CAR);
        fill_rect(
            &mut mat,
            w,
            h,
            x0 + cw * 0.15,
            y0 + ch * 0.1,
            cw * 0.7,
            ch * 0.3,
            CAR_WINDOW,
        );
    }
    // Sometimes a 'static' object (ignored) on the sidewalk.
    if rng.random_bool(0.5) {
        let bw = wf * rng.random_range(0.03..0.06);
        let bh = hf * rng.random_range(0.05..0.1);
        let x0 = rng.random_range(0.0..wf - bw);
        fill_rect(&mut mat, w, h, x0, sidewalk_end as f64 - bh, bw, bh, STATIC);
    }
    // Ego vehicle strip and the rectification border (top, left, right), painted last.
    for y in ego_start..h {
        mat[y * w..(y + 1) * w].fill(EGO);
    }
    let border = ((w.min(h) as f64 * 0.02).round() as usize).max(1);
    for y in 0..h {
        for x in 0..w {
            if y < border || x < border || x >= w - border {
                mat[y * w + x] = BORDER;
            }
        }
    }

    // Colours: the material's colour, a per-image lighting offset, a sky gradient, per-pixel
    // luminance noise and a little chroma noise, from a counter-based hash (cheap and
    // order-independent).
    let light = rng.random_range(-15..=15);
    let noise_seed = rng.random::<u64>();
    let mut rgb = vec![0u8; w * h * 3];
    let mut ids = vec![0u8; w * h];
    for y in 0..h {
        let sky_lift = (40 * y / h.max(1)) as i32;
        for x in 0..w {
            let i = y * w + x;
            let m = mat[i];
            ids[i] = MATERIAL_ID[m as usize];
            let (base, amp) = MATERIAL_COLOUR[m as usize];
            let n = mix(noise_seed ^ (i as u64));
            let lum = ((n & 0xFF) as i32 - 128) * amp / 128;
            let lift = if m == SKY { sky_lift } else { 0 };
            for (c, &b) in base.iter().enumerate() {
                let chroma = (((n >> (8 + 8 * c)) & 0x7) as i32) - 3;
                let v = b + light + lift + lum + chroma;
                rgb[i * 3 + c] = v.clamp(0, 255) as u8;
            }
        }
    }
    debug_assert!(ids
        .iter()
        .all(|&id| id == 0 || id == 1 || id == 4 || LABEL_TO_TRAIN[id as usize] != 255));
    (rgb, ids)
}

#[allow(clippy::too_many_arguments)]
fn fill_ellipse(mat: &mut [u8], w: usize, h: usize, cx: f64, cy: f64, rx: f64, ry: f64, m: u8) {
    let (rx, ry) = (rx.max(0.5), ry.max(0.5));
    let y0 = (cy - ry).floor().max(0.0) as usize;
    let y1 = ((cy + ry).ceil().max(0.0) as usize).min(h);
    let x0 = (cx - rx).floor().max(0.0) as usize;
    let x1 = ((cx + rx).ceil().max(0.0) as usize).min(w);
    for y in y0..y1 {
        let dy = (y as f64 + 0.5 - cy) / ry;
        for x in x0..x1 {
            let dx = (x as f64 + 0.5 - cx) / rx;
            if dx * dx + dy * dy <= 1.0 {
                mat[y * w + x] = m;
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn fill_rect(mat: &mut [u8], w: usize, h: usize, x: f64, y: f64, rw: f64, rh: f64, m: u8) {
    let x0 = x.round().max(0.0) as usize;
    let y0 = y.round().max(0.0) as usize;
    let x1 = ((x + rw).round().max(0.0) as usize).min(w);
    let y1 = ((y + rh).round().max(0.0) as usize).min(h);
    for yy in y0..y1 {
        for xx in x0..x1.max(x0) {
            mat[yy * w + xx] = m;
        }
    }
}
