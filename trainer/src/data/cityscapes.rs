//! Cityscapes: the 19 training classes, their official colours, the labelId → trainId table,
//! and the reader for the on-disk layout (cityscapesScripts `labels.py` and README;
//! docs/recipe.md §3).
//!
//! The reader is two steps: [`scan`] lists a split's image/label pairs in a deterministic order
//! (cities sorted, files sorted) without decoding anything, and [`load`] decodes one pair into an
//! RGB [`Image`] and a trainId [`LabelMap`]. Label maps may be `_gtFine_labelTrainIds.png`
//! (what mmseg reads; preferred when present) or the raw `_gtFine_labelIds.png`, which is mapped
//! through [`LABEL_TO_TRAIN`] (the same result, docs/recipe.md §3).

use std::ffi::OsString;
use std::fs;
use std::io::Cursor;
use std::path::{Path, PathBuf};

pub use super::error::DataError;

/// The training classes in trainId order 0..18.
pub const CLASS_NAMES: [&str; 19] = segtrain_spec::CITYSCAPES_CLASSES;

/// RGB colour of each trainId.
pub const PALETTE: [[u8; 3]; 19] = [
    [128, 64, 128],
    [244, 35, 232],
    [70, 70, 70],
    [102, 102, 156],
    [190, 153, 153],
    [153, 153, 153],
    [250, 170, 30],
    [220, 220, 0],
    [107, 142, 35],
    [152, 251, 152],
    [70, 130, 180],
    [220, 20, 60],
    [255, 0, 0],
    [0, 0, 142],
    [0, 0, 70],
    [0, 60, 100],
    [0, 80, 100],
    [0, 0, 230],
    [119, 11, 32],
];

/// Colour of class `c`: the Cityscapes colour for 0..18, a fixed pseudo-random colour beyond
/// (models with more classes), black for ignore (255).
pub fn colour(c: u8) -> [u8; 3] {
    match c {
        255 => [0, 0, 0],
        c if (c as usize) < PALETTE.len() => PALETTE[c as usize],
        c => {
            let h = (c as u32).wrapping_mul(2_654_435_761);
            [(h >> 24) as u8, (h >> 16) as u8, (h >> 8) as u8]
        }
    }
}

/// ImageNet normalisation in 0..255 pixel units, RGB (the recipe's `img_norm_cfg`).
pub const MEAN: [f64; 3] = [123.675, 116.28, 103.53];
pub const STD: [f64; 3] = [58.395, 57.12, 57.375];

/// labelId → trainId (cityscapesScripts `labels.py`, ids 0..33). Every id that is not one of the
/// 19 training classes maps to 255 (ignore), and so does every value above 33 (some forks add
/// lane-line ids 34..45). 'license plate' has id −1, which a u8 label map cannot hold; json2labelImg
/// never paints it, so it needs no entry.
pub const LABEL_TO_TRAIN: [u8; 256] = {
    let mut t = [255u8; 256];
    let mut train_id = 0;
    while train_id < TRAIN_LABEL_IDS.len() {
        t[TRAIN_LABEL_IDS[train_id] as usize] = train_id as u8;
        train_id += 1;
    }
    t
};

/// The labelId of each trainId, in [`CLASS_NAMES`] order: road 7, sidewalk 8, building 11,
/// wall 12, fence 13, pole 17, traffic light 19, traffic sign 20, vegetation 21, terrain 22,
/// sky 23, person 24, rider 25, car 26, truck 27, bus 28, train 31, motorcycle 32, bicycle 33.
pub const TRAIN_LABEL_IDS: [u8; 19] = [
    7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33,
];

/// The label value that the loss and the metrics ignore.
pub const IGNORE: u8 = 255;

/// Number of training classes.
pub const NUM_CLASSES: usize = CLASS_NAMES.len();

/// File-name suffixes of the Cityscapes layout.
pub const IMAGE_SUFFIX: &str = "_leftImg8bit.png";
pub const TRAIN_IDS_SUFFIX: &str = "_gtFine_labelTrainIds.png";
pub const LABEL_IDS_SUFFIX: &str = "_gtFine_labelIds.png";

/// What the values of a label file are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LabelKind {
    /// Raw Cityscapes ids (0..33), mapped through [`LABEL_TO_TRAIN`] at load.
    LabelIds,
    /// trainIds 0..18 and 255, used as they are.
    TrainIds,
}

/// One image and its label file, as found by [`scan`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    pub image: PathBuf,
    pub label: PathBuf,
    pub label_kind: LabelKind,
}

/// An 8-bit RGB image: `data` is `height` rows of `width` pixels of 3 bytes (R, G, B), no row
/// padding, so `data.len() == width * height * 3`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

impl Image {
    /// An image of one colour.
    pub fn filled(width: usize, height: usize, rgb: [u8; 3]) -> Image {
        let mut data = Vec::with_capacity(width * height * 3);
        for _ in 0..width * height {
            data.extend_from_slice(&rgb);
        }
        Image {
            width,
            height,
            data,
        }
    }

    /// The pixel at column `x`, row `y`.
    pub fn pixel(&self, x: usize, y: usize) -> [u8; 3] {
        let i = (y * self.width + x) * 3;
        [self.data[i], self.data[i + 1], self.data[i + 2]]
    }
}

/// A label map of trainIds (0..18) and 255 (ignore): `height` rows of `width` bytes, so
/// `data.len() == width * height`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelMap {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

impl LabelMap {
    /// A label map of one value.
    pub fn filled(width: usize, height: usize, value: u8) -> LabelMap {
        LabelMap {
            width,
            height,
            data: vec![value; width * height],
        }
    }

    /// The value at column `x`, row `y`.
    pub fn at(&self, x: usize, y: usize) -> u8 {
        self.data[y * self.width + x]
    }
}

/// Lists the image/label pairs of one split:
/// `<root>/leftImg8bit/<split>/<city>/<name>_leftImg8bit.png`, each with
/// `<root>/gtFine/<split>/<city>/<name>_gtFine_labelTrainIds.png` if it exists, else
/// `<name>_gtFine_labelIds.png`. Cities and files are sorted by name, so the order (and with it
/// the sampler's permutation) is the same on every machine. Decodes nothing; see [`check_headers`]
/// for a cheap early check of sizes and label formats.
pub fn scan(root: &Path, split: &str) -> Result<Vec<Sample>, DataError> {
    if !root.is_dir() {
        return Err(DataError::MissingRoot {
            root: root.to_path_buf(),
        });
    }
    let image_dir = root.join("leftImg8bit").join(split);
    let label_dir = root.join("gtFine").join(split);
    for dir in [&image_dir, &label_dir] {
        if !dir.is_dir() {
            return Err(DataError::MissingSplit {
                dir: dir.clone(),
                split: split.to_string(),
            });
        }
    }
    let mut samples = Vec::new();
    for city in sorted_entries(&image_dir)? {
        let city_dir = image_dir.join(&city);
        if !city_dir.is_dir() {
            continue;
        }
        for name in sorted_entries(&city_dir)? {
            let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(IMAGE_SUFFIX)) else {
                continue;
            };
            let image = city_dir.join(&name);
            if !image.is_file() {
                continue;
            }
            let train_ids = label_dir
                .join(&city)
                .join(format!("{stem}{TRAIN_IDS_SUFFIX}"));
            let label_ids = label_dir
                .join(&city)
                .join(format!("{stem}{LABEL_IDS_SUFFIX}"));
            let (label, label_kind) = if train_ids.is_file() {
                (train_ids, LabelKind::TrainIds)
            } else if label_ids.is_file() {
                (label_ids, LabelKind::LabelIds)
            } else {
                return Err(DataError::MissingLabel {
                    image,
                    train_ids,
                    label_ids,
                });
            };
            samples.push(Sample {
                image,
                label,
                label_kind,
            });
        }
    }
    if samples.is_empty() {
        return Err(DataError::NoImages { dir: image_dir });
    }
    Ok(samples)
}

fn sorted_entries(dir: &Path) -> Result<Vec<OsString>, DataError> {
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| DataError::io(dir, e))? {
        names.push(entry.map_err(|e| DataError::io(dir, e))?.file_name());
    }
    names.sort();
    Ok(names)
}

/// Decodes one sample: the RGB image and its trainId label map (labelIds mapped through
/// [`LABEL_TO_TRAIN`]), checking that both have the same size.
pub fn load(sample: &Sample) -> Result<(Image, LabelMap), DataError> {
    let image = load_image(&sample.image)?;
    let label = load_label(&sample.label, sample.label_kind)?;
    if (image.width, image.height) != (label.width, label.height) {
        return Err(DataError::SizeMismatch {
            image: sample.image.clone(),
            image_w: image.width,
            image_h: image.height,
            label: sample.label.clone(),
            label_w: label.width,
            label_h: label.height,
        });
    }
    Ok((image, label))
}

/// Decodes an image file (PNG or JPEG, any colour type) to 8-bit RGB.
pub fn load_image(path: &Path) -> Result<Image, DataError> {
    // One read of the whole file: fewer syscalls than a BufReader, and the decoder runs from memory.
    let bytes = fs::read(path).map_err(|e| DataError::io(path, e))?;
    let decode_err = |message: String| DataError::Decode {
        path: path.to_path_buf(),
        message,
    };
    let decoded = image::ImageReader::new(Cursor::new(&bytes))
        .with_guessed_format()
        .map_err(|e| decode_err(e.to_string()))?
        .decode()
        .map_err(|e| decode_err(e.to_string()))?;
    // `into_rgb8` is free for the RGB8 PNGs of Cityscapes (no conversion, no copy).
    let rgb = decoded.into_rgb8();
    Ok(Image {
        width: rgb.width() as usize,
        height: rgb.height() as usize,
        data: rgb.into_raw(),
    })
}

/// Decodes a label PNG, which must be 8-bit single channel (grayscale), and returns trainIds:
/// `LabelIds` are mapped through [`LABEL_TO_TRAIN`]; `TrainIds` are checked to be 0..18 or 255
/// (an out-of-range class would otherwise crash the loss on the device, far from the cause).
pub fn load_label(path: &Path, kind: LabelKind) -> Result<LabelMap, DataError> {
    let bytes = fs::read(path).map_err(|e| DataError::io(path, e))?;
    let decode_err = |e: png::DecodingError| DataError::Decode {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let mut decoder = png::Decoder::new(Cursor::new(&bytes));
    // IDENTITY: keep the stored values (no palette expansion, no 16→8 bit stripping), so any
    // label file that is not plain 8-bit grayscale is caught below instead of silently converted.
    decoder.set_transformations(png::Transformations::IDENTITY);
    let mut reader = decoder.read_info().map_err(decode_err)?;
    let (color, depth) = {
        let info = reader.info();
        (info.color_type, info.bit_depth)
    };
    if color != png::ColorType::Grayscale || depth != png::BitDepth::Eight {
        return Err(DataError::LabelFormat {
            path: path.to_path_buf(),
            found: describe_png_format(color, depth),
        });
    }
    let size = reader
        .output_buffer_size()
        .ok_or_else(|| DataError::Decode {
            path: path.to_path_buf(),
            message: "image too large".to_string(),
        })?;
    let mut data = vec![0u8; size];
    let frame = reader.next_frame(&mut data).map_err(decode_err)?;
    let (width, height) = (frame.width as usize, frame.height as usize);
    // 8-bit grayscale rows are exactly `width` bytes, so the frame is the first width*height bytes.
    data.truncate(width * height);
    match kind {
        LabelKind::LabelIds => data
            .iter_mut()
            .for_each(|v| *v = LABEL_TO_TRAIN[*v as usize]),
        LabelKind::TrainIds => {
            let mut seen = [false; 256];
            data.iter().for_each(|&v| seen[v as usize] = true);
            if let Some(value) = (NUM_CLASSES..255).find(|&v| seen[v]) {
                return Err(DataError::LabelValue {
                    path: path.to_path_buf(),
                    value: value as u8,
                });
            }
        }
    }
    Ok(LabelMap {
        width,
        height,
        data,
    })
}

fn describe_png_format(color: png::ColorType, depth: png::BitDepth) -> String {
    let color = match color {
        png::ColorType::Grayscale => "grayscale",
        png::ColorType::Rgb => "RGB",
        png::ColorType::Indexed => "palette (indexed)",
        png::ColorType::GrayscaleAlpha => "grayscale+alpha",
        png::ColorType::Rgba => "RGBA",
    };
    format!("{color} {}-bit", depth as u8)
}

/// Reads only the headers of a sample's two files and checks what [`load`] would check about
/// them: both readable PNG/JPEG headers, equal sizes, an 8-bit grayscale label. Costs two small
/// reads per sample, so a trainer can run it over a whole split before the first iteration
/// instead of failing hours in. Does not detect corrupt pixel data.
pub fn check_headers(sample: &Sample) -> Result<(), DataError> {
    let path = &sample.image;
    let decode_err = |message: String| DataError::Decode {
        path: path.clone(),
        message,
    };
    let (image_w, image_h) = image::ImageReader::open(path)
        .map_err(|e| DataError::io(path, e))?
        .with_guessed_format()
        .map_err(|e| DataError::io(path, e))?
        .into_dimensions()
        .map_err(|e| decode_err(e.to_string()))?;
    let label_path = &sample.label;
    let file = fs::File::open(label_path).map_err(|e| DataError::io(label_path, e))?;
    let reader = png::Decoder::new(std::io::BufReader::new(file))
        .read_info()
        .map_err(|e| DataError::Decode {
            path: label_path.clone(),
            message: e.to_string(),
        })?;
    let info = reader.info();
    if info.color_type != png::ColorType::Grayscale || info.bit_depth != png::BitDepth::Eight {
        return Err(DataError::LabelFormat {
            path: label_path.clone(),
            found: describe_png_format(info.color_type, info.bit_depth),
        });
    }
    if (image_w, image_h) != (info.width, info.height) {
        return Err(DataError::SizeMismatch {
            image: path.clone(),
            image_w: image_w as usize,
            image_h: image_h as usize,
            label: label_path.clone(),
            label_w: info.width as usize,
            label_h: info.height as usize,
        });
    }
    Ok(())
}
