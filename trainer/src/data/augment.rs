//! The training augmentation of the SegFormer Cityscapes recipe (docs/recipe.md §4.4),
//! on u8 RGB images and trainId label maps, in the recipe's order:
//!
//! 1. random rescale by r ~ U[0.5, 2.0) of the image's own size, keeping the aspect ratio
//!    (image bilinear, label nearest);
//! 2. random crop to `crop_h` x `crop_w` with `cat_max_ratio` (at most 10 checks; the 11th draw is
//!    used unchecked); a rescaled image smaller than the crop gives a smaller crop on that side;
//! 3. horizontal flip with probability `flip_prob`;
//! 4. photometric distortion (brightness, contrast, saturation, hue; clipped to 0..255 at every
//!    step), on RGB instead of the recipe's BGR, which is the same operation (docs/recipe.md §5.2);
//! 5. pad to the crop size at the bottom and right: the label with 255, the image with
//!    [`PAD_RGB`], the per-channel mean rounded to u8.
//!
//! Normalisation is not done here: batches travel to the device as u8 and are normalised there.
//! The recipe pads *after* normalisation with 0; padding the u8 image with the mean gives
//! (mean_u8 − mean)/std ≈ 0 after normalisation (at most 0.5/57 ≈ 0.009 off), so the device sees
//! what the recipe's network sees. The padded pixels are ignored by the loss anyway (label 255).
//!
//! Efficiency: the crop is chosen first (on the label, through nearest-neighbour index tables of
//! the rescaled geometry) and only the chosen crop of the image is resampled (fast_image_resize
//! with a source crop box, which gives the same pixels as rescaling the whole image and then
//! cropping: same scale, same filter taps, clamped at the real image borders). At r = 2 this
//! resamples 1024x1024 pixels instead of 4096x2048. Flip and photometric work in place on the
//! crop; brightness and contrast are 256-entry lookup tables.

use fast_image_resize as fir;
use rand::Rng;

use super::cityscapes::{Image, LabelMap, IGNORE, MEAN};
use super::error::DataError;

/// Image padding value: the normalisation mean rounded to u8 (123.675, 116.28, 103.53 →
/// 124, 116, 104), so padded pixels normalise to ≈ 0 like the recipe's `pad_val=0`.
pub const PAD_RGB: [u8; 3] = [
    (MEAN[0] + 0.5) as u8,
    (MEAN[1] + 0.5) as u8,
    (MEAN[2] + 0.5) as u8,
];

/// Parameters of [`augment`]. [`AugmentConfig::recipe`] gives the reference values.
#[derive(Debug, Clone, PartialEq)]
pub struct AugmentConfig {
    /// Output height and width: every output is exactly this size.
    pub crop_h: usize,
    pub crop_w: usize,
    /// Rescale ratio range [lo, hi) relative to the image's own size. For Cityscapes' 2048x1024
    /// images, (0.5, 2.0) is exactly the recipe's `img_scale=(2048,1024), ratio_range=(0.5,2.0)`
    /// (mmseg rescales to the scale times r, keeping the aspect ratio; for an image that already
    /// has the reference scale that is the image's own size times r). For other image sizes this
    /// rescales relative to the image itself rather than to 2048x1024. lo == hi: fixed ratio.
    pub scale_range: (f64, f64),
    /// A crop is accepted when its label has more than one non-ignored class and the largest
    /// covers less than this fraction of the non-ignored pixels. 1.0 (or more) disables the check.
    pub cat_max_ratio: f64,
    /// Probability of a horizontal flip.
    pub flip_prob: f64,
    /// Whether to apply the photometric distortion.
    pub photometric: bool,
}

impl AugmentConfig {
    /// The reference recipe at the given crop size: scale (0.5, 2.0), cat_max_ratio 0.75, flip
    /// 0.5, photometric distortion on.
    pub fn recipe(crop_h: usize, crop_w: usize) -> AugmentConfig {
        AugmentConfig {
            crop_h,
            crop_w,
            scale_range: (0.5, 2.0),
            cat_max_ratio: 0.75,
            flip_prob: 0.5,
            photometric: true,
        }
    }

    /// Checks the fields (positive crop, 0 < lo ≤ hi, probabilities in [0, 1]).
    pub fn validate(&self) -> Result<(), DataError> {
        let (lo, hi) = self.scale_range;
        let err = |m: String| Err(DataError::Config(m));
        if self.crop_h == 0 || self.crop_w == 0 {
            return err(format!(
                "crop size must be positive, got {}x{}",
                self.crop_w, self.crop_h
            ));
        }
        if !(lo > 0.0 && lo <= hi && hi.is_finite()) {
            return err(format!(
                "scale range must satisfy 0 < lo <= hi, got ({lo}, {hi})"
            ));
        }
        if !(0.0..=1.0).contains(&self.flip_prob) {
            return err(format!(
                "flip probability must be in [0, 1], got {}",
                self.flip_prob
            ));
        }
        if self.cat_max_ratio.is_nan() || self.cat_max_ratio <= 0.0 {
            return err(format!(
                "cat_max_ratio must be positive, got {}",
                self.cat_max_ratio
            ));
        }
        Ok(())
    }
}

impl Default for AugmentConfig {
    fn default() -> Self {
        AugmentConfig::recipe(1024, 1024)
    }
}

/// Augments one sample with a one-off [`Augmenter`]. Loops should keep an [`Augmenter`], which
/// reuses its resizer and scratch buffers.
pub fn augment<R: Rng + ?Sized>(
    image: &Image,
    label: &LabelMap,
    cfg: &AugmentConfig,
    rng: &mut R,
) -> Result<(Image, LabelMap), DataError> {
    Augmenter::new(cfg.clone())?.augment(image, label, rng)
}

/// The augmentation with its reusable state (resizer, scratch buffers, index tables). One per
/// thread.
pub struct Augmenter {
    cfg: AugmentConfig,
    resizer: fir::Resizer,
    scratch: Vec<u8>,
    // Nearest-neighbour source column/row of every column/row of the rescaled image.
    col_tab: Vec<usize>,
    row_tab: Vec<usize>,
}

impl std::fmt::Debug for Augmenter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Augmenter").field("cfg", &self.cfg).finish()
    }
}

/// Where the crop of one draw lies in the rescaled image.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    src_w: usize,
    src_h: usize,
    new_w: usize,
    new_h: usize,
    x0: usize,
    y0: usize,
    cw: usize,
    ch: usize,
}

impl Augmenter {
    pub fn new(cfg: AugmentConfig) -> Result<Augmenter, DataError> {
        cfg.validate()?;
        Ok(Augmenter {
            cfg,
            resizer: fir::Resizer::new(),
            scratch: Vec::new(),
            col_tab: Vec::new(),
            row_tab: Vec::new(),
        })
    }

    pub fn config(&self) -> &AugmentConfig {
        &self.cfg
    }

    /// Augments into new buffers of exactly `crop_h` x `crop_w`.
    pub fn augment<R: Rng + ?Sized>(
        &mut self,
        image: &Image,
        label: &LabelMap,
        rng: &mut R,
    ) -> Result<(Image, LabelMap), DataError> {
        let (h, w) = (self.cfg.crop_h, self.cfg.crop_w);
        let mut out_image = vec![0u8; h * w * 3];
        let mut out_label = vec![0u8; h * w];
        self.augment_into(image, label, rng, &mut out_image, &mut out_label)?;
        Ok((
            Image {
                width: w,
                height: h,
                data: out_image,
            },
            LabelMap {
                width: w,
                height: h,
                data: out_label,
            },
        ))
    }

    /// Augments into caller-provided buffers: `out_image` of `crop_h * crop_w * 3` bytes (RGB HWC)
    /// and `out_label` of `crop_h * crop_w` bytes; every byte of both is written. The random draws
    /// come from `rng` in a fixed order (ratio, crop offsets, flip, photometric parameters), so
    /// the same rng state gives the same output, and the geometry does not depend on whether
    /// the photometric distortion is on.
    pub fn augment_into<R: Rng + ?Sized>(
        &mut self,
        image: &Image,
        label: &LabelMap,
        rng: &mut R,
        out_image: &mut [u8],
        out_label: &mut [u8],
    ) -> Result<(), DataError> {
        let (crop_h, crop_w) = (self.cfg.crop_h, self.cfg.crop_w);
        check_inputs(image, label, crop_h, crop_w, out_image, out_label)?;
        let (w, h) = (image.width, image.height);

        // 1. Rescale ratio and the rescaled size (rounded, at least 1).
        let (lo, hi) = self.cfg.scale_range;
        let r = if lo < hi {
            rng.random_range(lo..hi)
        } else {
            lo
        };
        let new_w = ((w as f64 * r).round() as usize).max(1);
        let new_h = ((h as f64 * r).round() as usize).max(1);
        nearest_table(&mut self.col_tab, w, new_w);
        nearest_table(&mut self.row_tab, h, new_h);

        // 2. Crop, checked against cat_max_ratio like mmseg's RandomCrop: draw, check up to 10
        // times, redraw after each failure; the draw after the 10th failure is used as it is.
        let cw = crop_w.min(new_w);
        let ch = crop_h.min(new_h);
        let mut g = Geometry {
            src_w: w,
            src_h: h,
            new_w,
            new_h,
            x0: 0,
            y0: 0,
            cw,
            ch,
        };
        draw_offsets(&mut g, rng);
        if self.cfg.cat_max_ratio < 1.0 {
            for _ in 0..10 {
                if self.crop_is_balanced(label, &g) {
                    break;
                }
                draw_offsets(&mut g, rng);
            }
        }

        // 3. Flip, 4. photometric parameters (drawn now, applied below).
        let flip = rng.random_bool(self.cfg.flip_prob);
        let photo = if self.cfg.photometric {
            Photometric::draw(rng)
        } else {
            Photometric::none()
        };

        // Label: nearest-neighbour sampling of the crop straight into the output, flipped on the
        // fly; then the padding.
        for i in 0..crop_h {
            let out_row = &mut out_label[i * crop_w..(i + 1) * crop_w];
            if i >= ch {
                out_row.fill(IGNORE);
                continue;
            }
            let src_row = &label.data[self.row_tab[g.y0 + i] * w..][..w];
            let cols = &self.col_tab[g.x0..g.x0 + cw];
            let (dst, pad) = out_row.split_at_mut(cw);
            if flip {
                for (d, &c) in dst.iter_mut().zip(cols.iter().rev()) {
                    *d = src_row[c];
                }
            } else {
                for (d, &c) in dst.iter_mut().zip(cols) {
                    *d = src_row[c];
                }
            }
            pad.fill(IGNORE);
        }

        // Image: resample only the crop. When the crop is as wide as the output (always for
        // Cityscapes at 1024 crops: the rescaled width is ≥ 1024) its rows are the first ch rows
        // of the output and we work in place; otherwise in scratch, copied row by row.
        let in_place = cw == crop_w;
        let region_len = ch * cw * 3;
        if !in_place {
            self.scratch.resize(region_len, 0);
        }
        {
            let region: &mut [u8] = if in_place {
                &mut out_image[..region_len]
            } else {
                &mut self.scratch[..region_len]
            };
            resample_crop(&mut self.resizer, image, &g, region)?;
            if flip {
                for row in region.chunks_exact_mut(cw * 3) {
                    row.as_chunks_mut::<3>().0.reverse();
                }
            }
            photo.apply(region);
        }
        if in_place {
            fill_pixels(&mut out_image[region_len..], PAD_RGB);
        } else {
            for i in 0..crop_h {
                let out_row = &mut out_image[i * crop_w * 3..(i + 1) * crop_w * 3];
                if i < ch {
                    out_row[..cw * 3].copy_from_slice(&self.scratch[i * cw * 3..(i + 1) * cw * 3]);
                    fill_pixels(&mut out_row[cw * 3..], PAD_RGB);
                } else {
                    fill_pixels(out_row, PAD_RGB);
                }
            }
        }
        Ok(())
    }

    /// mmseg's cat_max_ratio test on the rescaled label's crop: more than one non-ignored class,
    /// and the largest below `cat_max_ratio` of the non-ignored pixels.
    fn crop_is_balanced(&self, label: &LabelMap, g: &Geometry) -> bool {
        let mut hist = [0u32; 256];
        let cols = &self.col_tab[g.x0..g.x0 + g.cw];
        for &sy in &self.row_tab[g.y0..g.y0 + g.ch] {
            let src_row = &label.data[sy * g.src_w..][..g.src_w];
            for &c in cols {
                hist[src_row[c] as usize] += 1;
            }
        }
        hist[IGNORE as usize] = 0;
        let total: u64 = hist.iter().map(|&n| n as u64).sum();
        let classes = hist.iter().filter(|&&n| n > 0).count();
        let largest = hist.iter().copied().max().unwrap_or(0) as u64;
        classes > 1 && (largest as f64) < self.cfg.cat_max_ratio * total as f64
    }
}

fn check_inputs(
    image: &Image,
    label: &LabelMap,
    crop_h: usize,
    crop_w: usize,
    out_image: &[u8],
    out_label: &[u8],
) -> Result<(), DataError> {
    let bad = |m: String| Err(DataError::Config(m));
    if image.width == 0
        || image.height == 0
        || image.width > u32::MAX as usize
        || image.height > u32::MAX as usize
    {
        return bad(format!(
            "cannot augment an image of size {}x{}",
            image.width, image.height
        ));
    }
    if image.data.len() != image.width * image.height * 3 {
        return bad(format!(
            "image buffer holds {} bytes, expected {}x{}x3",
            image.data.len(),
            image.width,
            image.height
        ));
    }
    if (label.width, label.height) != (image.width, image.height)
        || label.data.len() != label.width * label.height
    {
        return bad(format!(
            "label {}x{} ({} bytes) does not match image {}x{}",
            label.width,
            label.height,
            label.data.len(),
            image.width,
            image.height
        ));
    }
    if out_image.len() != crop_h * crop_w * 3 || out_label.len() != crop_h * crop_w {
        return bad(format!(
            "output buffers hold {} and {} bytes, expected {} and {} for a {crop_w}x{crop_h} crop",
            out_image.len(),
            out_label.len(),
            crop_h * crop_w * 3,
            crop_h * crop_w
        ));
    }
    Ok(())
}

/// Source index of every destination index for a nearest-neighbour rescale from `src` to `dst`
/// samples, pixel centres aligned (the mapping fast_image_resize's `Nearest` uses), so the label
/// lines up with the bilinear image and only source values appear.
fn nearest_table(tab: &mut Vec<usize>, src: usize, dst: usize) {
    let scale = src as f64 / dst as f64;
    tab.clear();
    tab.extend((0..dst).map(|i| (((i as f64 + 0.5) * scale) as usize).min(src - 1)));
}

/// Uniform integer offsets in [0, new − crop] (height first, like mmseg).
fn draw_offsets<R: Rng + ?Sized>(g: &mut Geometry, rng: &mut R) {
    g.y0 = rng.random_range(0..=g.new_h - g.ch);
    g.x0 = rng.random_range(0..=g.new_w - g.cw);
}

/// Bilinear resample of the crop `g` of the rescaled image into `region` (ch x cw x 3).
fn resample_crop(
    resizer: &mut fir::Resizer,
    image: &Image,
    g: &Geometry,
    region: &mut [u8],
) -> Result<(), DataError> {
    let fir_err = |e: &dyn std::fmt::Display| DataError::Config(format!("resize: {e}"));
    let src = fir::images::ImageRef::new(
        g.src_w as u32,
        g.src_h as u32,
        &image.data,
        fir::PixelType::U8x3,
    )
    .map_err(|e| fir_err(&e))?;
    let mut dst =
        fir::images::Image::from_slice_u8(g.cw as u32, g.ch as u32, region, fir::PixelType::U8x3)
            .map_err(|e| fir_err(&e))?;
    // The crop box in source coordinates; the right/bottom edge is clamped against rounding so
    // that fast_image_resize never sees a box past the image.
    let (sx, sy) = (
        g.src_w as f64 / g.new_w as f64,
        g.src_h as f64 / g.new_h as f64,
    );
    let left = g.x0 as f64 * sx;
    let top = g.y0 as f64 * sy;
    let right = ((g.x0 + g.cw) as f64 * sx).min(g.src_w as f64);
    let bottom = ((g.y0 + g.ch) as f64 * sy).min(g.src_h as f64);
    let options = fir::ResizeOptions::new()
        .resize_alg(fir::ResizeAlg::Convolution(fir::FilterType::Bilinear))
        .crop(left, top, right - left, bottom - top);
    resizer
        .resize(&src, &mut dst, &options)
        .map_err(|e| fir_err(&e))
}

fn fill_pixels(buf: &mut [u8], rgb: [u8; 3]) {
    for px in buf.as_chunks_mut::<3>().0 {
        *px = rgb;
    }
}

/// The drawn parameters of mmseg's PhotoMetricDistortion for one sample.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Photometric {
    brightness: Option<f32>,
    /// mode == 1 in mmseg: contrast before saturation/hue; otherwise after.
    contrast_first: bool,
    contrast: Option<f32>,
    saturation: Option<f32>,
    hue: Option<i32>,
}

impl Photometric {
    fn none() -> Photometric {
        Photometric {
            brightness: None,
            contrast_first: false,
            contrast: None,
            saturation: None,
            hue: None,
        }
    }

    /// Draws in mmseg's order: brightness, mode, saturation, hue; contrast is drawn where it is
    /// applied (before saturation when mode == 1, after hue when mode == 0).
    fn draw<R: Rng + ?Sized>(rng: &mut R) -> Photometric {
        let brightness = rng
            .random_bool(0.5)
            .then(|| rng.random_range(-32.0f32..32.0));
        let contrast_first = rng.random_bool(0.5);
        let mut contrast = None;
        if contrast_first && rng.random_bool(0.5) {
            contrast = Some(rng.random_range(0.5f32..1.5));
        }
        let saturation = rng.random_bool(0.5).then(|| rng.random_range(0.5f32..1.5));
        let hue = rng.random_bool(0.5).then(|| rng.random_range(-18i32..18));
        if !contrast_first && rng.random_bool(0.5) {
            contrast = Some(rng.random_range(0.5f32..1.5));
        }
        Photometric {
            brightness,
            contrast_first,
            contrast,
            saturation,
            hue,
        }
    }

    /// Applies the distortion in place to RGB pixels. Brightness and contrast are per-value
    /// functions (x·α + β, clipped, truncated like numpy's astype(uint8)), so everything before
    /// the HSV step folds into one lookup table and everything after into another. When both
    /// saturation and hue apply they share one RGB→HSV→RGB round trip (mmseg converts twice; the
    /// only difference is the rounding of the intermediate RGB).
    fn apply(&self, pixels: &mut [u8]) {
        let mut pre = IDENTITY_LUT;
        let mut post = IDENTITY_LUT;
        if let Some(delta) = self.brightness {
            compose(&mut pre, |x| x + delta);
        }
        if let Some(alpha) = self.contrast {
            let target = if self.contrast_first {
                &mut pre
            } else {
                &mut post
            };
            compose(target, |x| x * alpha);
        }
        if self.saturation.is_none() && self.hue.is_none() {
            let lut: [u8; 256] = std::array::from_fn(|i| post[pre[i] as usize]);
            if lut != IDENTITY_LUT {
                pixels.iter_mut().for_each(|v| *v = lut[*v as usize]);
            }
            return;
        }
        // Saturation scaling (clipped, truncated) and the hue shift (mod 180) as tables too.
        let sat_lut: [u8; 256] = match self.saturation {
            Some(alpha) => std::array::from_fn(|x| (x as f32 * alpha).clamp(0.0, 255.0) as u8),
            None => IDENTITY_LUT,
        };
        let shift = self.hue.unwrap_or(0);
        let hue_lut: [u8; 180] = std::array::from_fn(|x| (x as i32 + shift).rem_euclid(180) as u8);
        for px in pixels.as_chunks_mut::<3>().0 {
            let [r, g, b] = *px;
            let (h, s, v) = rgb_to_hsv(pre[r as usize], pre[g as usize], pre[b as usize]);
            let [r, g, b] = hsv_to_rgb(hue_lut[h as usize], sat_lut[s as usize], v);
            *px = [post[r as usize], post[g as usize], post[b as usize]];
        }
    }
}

const IDENTITY_LUT: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = i as u8;
        i += 1;
    }
    t
};

/// lut ← f ∘ lut, with f clipped to 0..255 and truncated (numpy `clip(...).astype(uint8)`).
fn compose(lut: &mut [u8; 256], f: impl Fn(f32) -> f32) {
    for v in lut.iter_mut() {
        *v = f(*v as f32).clamp(0.0, 255.0) as u8;
    }
}

// OpenCV's 8-bit RGB→HSV (`RGB2HSV_b`, hue range 180): fixed-point with 12 fractional bits.
const HSV_SHIFT: i32 = 12;
const SDIV: [i32; 256] = {
    let mut t = [0i32; 256];
    let mut i = 1;
    while i < 256 {
        // round((255 << 12) / i); never exactly .5 for i < 256, so half-up equals OpenCV's cvRound
        t[i] = ((255 << HSV_SHIFT) + (i as i32) / 2) / i as i32;
        i += 1;
    }
    t
};
const HDIV180: [i32; 256] = {
    let mut t = [0i32; 256];
    let mut i = 1;
    while i < 256 {
        // round((180 << 12) / (6 i))
        let d = 6 * i as i32;
        t[i] = ((180 << HSV_SHIFT) + d / 2) / d;
        i += 1;
    }
    t
};

/// OpenCV `COLOR_RGB2HSV` for u8: H in 0..180, S and V in 0..255.
#[inline]
fn rgb_to_hsv(r: u8, g: u8, b: u8) -> (u8, u8, u8) {
    let (r, g, b) = (r as i32, g as i32, b as i32);
    let v = r.max(g).max(b);
    let vmin = r.min(g).min(b);
    let diff = v - vmin;
    let vr = if v == r { -1 } else { 0 };
    let vg = if v == g { -1 } else { 0 };
    let s = (diff * SDIV[v as usize] + (1 << (HSV_SHIFT - 1))) >> HSV_SHIFT;
    let mut h = (vr & (g - b)) + (!vr & ((vg & (b - r + 2 * diff)) + (!vg & (r - g + 4 * diff))));
    h = (h * HDIV180[diff as usize] + (1 << (HSV_SHIFT - 1))) >> HSV_SHIFT;
    if h < 0 {
        h += 180;
    }
    (h as u8, s as u8, v as u8)
}

/// OpenCV `COLOR_HSV2RGB` for u8, in exact integer arithmetic: with sector = h / 30 and
/// f = (h mod 30) / 30, the channels are v, v(1 − s), v(1 − s·f), v(1 − s(1 − f)) (s, v in
/// 0..1), rounded. OpenCV evaluates the same expressions in f32 (`HSV2RGB_b`); results can differ
/// by one level only where f32 rounding lands on the other side of a .5. Integers avoid four
/// float roundings per pixel (libm calls on baseline x86_64), which made this 5x slower.
#[inline]
fn hsv_to_rgb(h: u8, s: u8, v: u8) -> [u8; 3] {
    if s == 0 {
        return [v, v, v];
    }
    const D: u32 = 255 * 30;
    let (s, v, f) = (s as u32, v as u32, (h % 30) as u32);
    let scaled = |k: u32| ((v * (D - s * k) + D / 2) / D) as u8;
    let (vv, p, q, t) = (v as u8, scaled(30), scaled(f), scaled(30 - f));
    match h / 30 {
        0 => [vv, t, p],
        1 => [q, vv, p],
        2 => [p, vv, t],
        3 => [p, q, vv],
        4 => [t, p, vv],
        _ => [vv, p, q],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hsv_round_trip_is_close() {
        // OpenCV's u8 HSV keeps hue in 2-degree steps (and its fixed-point division rounds), so the
        // round trip of a saturated bright colour can be ~5 levels off, like cv2.
        for r in (0..=255).step_by(15) {
            for g in (0..=255).step_by(17) {
                for b in (0..=255).step_by(13) {
                    let (h, s, v) = rgb_to_hsv(r as u8, g as u8, b as u8);
                    assert!(h < 180);
                    let back = hsv_to_rgb(h, s, v);
                    for (x, y) in [r, g, b].into_iter().zip(back) {
                        assert!(
                            (x - y as i32).abs() <= 6,
                            "{r},{g},{b} -> {h},{s},{v} -> {back:?}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn opencv_hsv_values() {
        // cv2.cvtColor(np.uint8([[[r,g,b]]]), cv2.COLOR_RGB2HSV)
        assert_eq!(rgb_to_hsv(255, 0, 0), (0, 255, 255));
        assert_eq!(rgb_to_hsv(0, 255, 0), (60, 255, 255));
        assert_eq!(rgb_to_hsv(0, 0, 255), (120, 255, 255));
        assert_eq!(rgb_to_hsv(128, 64, 128), (150, 128, 128));
        assert_eq!(hsv_to_rgb(120, 255, 255), [0, 0, 255]);
    }

    #[test]
    fn pad_is_rounded_mean() {
        assert_eq!(PAD_RGB, [124, 116, 104]);
    }
}
