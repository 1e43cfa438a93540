//! Cityscapes facts: the 19 training classes and their official colours
//! (cityscapesScripts `labels.py`; reference/segformer.md §3).

/// The training classes in trainId order 0..18.
pub const CLASS_NAMES: [&str; 19] = [
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
];

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
