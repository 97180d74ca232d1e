//! Pillow's resampling (`Image.resize` with BILINEAR or BICUBIC), reproduced bit for bit so
//! that eval-time preprocessing matches torchvision on PIL images. The `image` crate's filters
//! antialias the same way but compute in floating point and round once; Pillow runs two 8-bit
//! passes with 22-bit fixed-point weights, which moves pixels by a grey level here and there.

use image::{Rgb, RgbImage};
use serde::{Deserialize, Serialize};

/// Resampling filter for resizing, named as in torchvision / Pillow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Interpolation {
    /// Pillow's BILINEAR (triangle filter, antialiased when shrinking).
    Bilinear,
    /// Pillow's BICUBIC (a = -0.5).
    Bicubic,
}

/// Fixed-point precision of the 8-bit weights (Pillow's `PRECISION_BITS`).
const PRECISION_BITS: u32 = 32 - 8 - 2;

fn bilinear(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 { 1.0 - x } else { 0.0 }
}

fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// For each output pixel of `window`: first input pixel and fixed-point weights.
fn coefficients(
    in_size: usize,
    out_size: usize,
    window: std::ops::Range<usize>,
    interp: Interpolation,
) -> Vec<(usize, Vec<i32>)> {
    let (filter, support): (fn(f64) -> f64, f64) = match interp {
        Interpolation::Bilinear => (bilinear, 1.0),
        Interpolation::Bicubic => (bicubic, 2.0),
    };
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = support * filterscale;
    window
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let weights: Vec<f64> = (xmin..xmax)
                .map(|x| filter((x as f64 - center + 0.5) / filterscale))
                .collect();
            let total: f64 = weights.iter().sum();
            let fixed = weights
                .iter()
                .map(|w| {
                    let w = if total != 0.0 { w / total } else { *w };
                    let v = w * (1u32 << PRECISION_BITS) as f64;
                    (if v < 0.0 { v - 0.5 } else { v + 0.5 }) as i32
                })
                .collect();
            (xmin, fixed)
        })
        .collect()
}

fn clip8(v: i64) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// One pass along x (`horizontal`) or y, as Pillow's `ImagingResampleHorizontal/Vertical_8bpc`;
/// `offset` is the first input pixel of `img` along the pass (rows or columns before it
/// were never needed).
fn pass(
    img: &RgbImage,
    out_w: u32,
    out_h: u32,
    horizontal: bool,
    coeffs: &[(usize, Vec<i32>)],
    offset: usize,
) -> RgbImage {
    RgbImage::from_fn(out_w, out_h, |x, y| {
        let (start, weights) = &coeffs[if horizontal { x } else { y } as usize];
        let start = start - offset;
        let mut acc = [1i64 << (PRECISION_BITS - 1); 3];
        for (i, &w) in weights.iter().enumerate() {
            let p = if horizontal {
                img.get_pixel((start + i) as u32, y)
            } else {
                img.get_pixel(x, (start + i) as u32)
            };
            for c in 0..3 {
                acc[c] += p[c] as i64 * w as i64;
            }
        }
        Rgb(acc.map(clip8))
    })
}

/// Resize `img` to `w` x `h` as Pillow does: horizontal pass, then vertical.
pub fn resize(img: &RgbImage, w: u32, h: u32, interp: Interpolation) -> RgbImage {
    resize_window(img, (w, h), (0, 0, w, h), interp)
}

/// The `(left, top, width, height)` window of `img` resized to `size`, computed without
/// the rest: bit for bit the same pixels as resizing the whole image and cropping, with
/// intermediates no larger than the window needs (a 1 x 60000 strip resized to a shorter
/// side of 256 would otherwise be 15 million pixels long).
pub fn resize_window(
    img: &RgbImage,
    (w, h): (u32, u32),
    (left, top, cw, ch): (u32, u32, u32, u32),
    interp: Interpolation,
) -> RgbImage {
    let (cols, rows) = (
        left as usize..(left + cw) as usize,
        top as usize..(top + ch) as usize,
    );
    // The vertical pass first decides which source rows the window needs.
    let (rows_needed, v_coeffs) = if h != img.height() {
        let c = coefficients(img.height() as usize, h as usize, rows, interp);
        let first = c.iter().map(|(s, _)| *s).min().unwrap_or(0);
        let last = c.iter().map(|(s, w)| s + w.len()).max().unwrap_or(first);
        (first..last, Some(c))
    } else {
        (rows, None)
    };
    let band = image::imageops::crop_imm(
        img,
        0,
        rows_needed.start as u32,
        img.width(),
        rows_needed.len() as u32,
    )
    .to_image();
    let band = if w != img.width() {
        let c = coefficients(img.width() as usize, w as usize, cols, interp);
        pass(&band, cw, band.height(), true, &c, 0)
    } else {
        image::imageops::crop_imm(&band, left, 0, cw, band.height()).to_image()
    };
    match v_coeffs {
        Some(c) => pass(&band, cw, ch, false, &c, rows_needed.start),
        None => band,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_sum_to_one_in_fixed_point() {
        for (n_in, n_out) in [(500, 256), (256, 500), (7, 3)] {
            for (_, w) in coefficients(n_in, n_out, 0..n_out, Interpolation::Bilinear) {
                let sum: i64 = w.iter().map(|&v| v as i64).sum();
                assert!(
                    (sum - (1 << PRECISION_BITS)).abs() <= w.len() as i64,
                    "{sum}"
                );
            }
        }
    }

    #[test]
    fn a_window_equals_the_crop_of_the_whole() {
        let img = RgbImage::from_fn(41, 29, |x, y| {
            Rgb([(x * 6) as u8, (y * 8) as u8, (x * y) as u8])
        });
        for (w, h) in [(23, 17), (60, 29), (41, 50), (90, 70)] {
            for interp in [Interpolation::Bilinear, Interpolation::Bicubic] {
                let whole = resize(&img, w, h, interp);
                let (left, top, cw, ch) = (w / 3, h / 4, w / 2, h / 2);
                let crop = image::imageops::crop_imm(&whole, left, top, cw, ch).to_image();
                let window = resize_window(&img, (w, h), (left, top, cw, ch), interp);
                assert!(crop == window, "{w}x{h} {interp:?}");
            }
        }
    }

    #[test]
    fn a_flat_image_stays_flat() {
        let img = RgbImage::from_pixel(37, 23, Rgb([10, 128, 250]));
        let out = resize(&img, 16, 9, Interpolation::Bicubic);
        assert!(out.pixels().all(|p| *p == Rgb([10, 128, 250])));
    }
}
