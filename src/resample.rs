//! Pillow's resampling (`Image.resize` with BILINEAR or BICUBIC), reproduced bit for bit so
//! that eval-time preprocessing matches torchvision on PIL images. The `image` crate's filters
//! antialias the same way but compute in floating point and round once; Pillow runs two 8-bit
//! passes with 22-bit fixed-point weights, which moves pixels by a grey level here and there.

use image::{Rgb, RgbImage};

use crate::preprocess::Interpolation;

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

/// For each output pixel: first input pixel and fixed-point weights.
fn coefficients(in_size: usize, out_size: usize, interp: Interpolation) -> Vec<(usize, Vec<i32>)> {
    let (filter, support): (fn(f64) -> f64, f64) = match interp {
        Interpolation::Bilinear => (bilinear, 1.0),
        Interpolation::Bicubic => (bicubic, 2.0),
    };
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = support * filterscale;
    (0..out_size)
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

/// One pass along x (`horizontal`) or y, as Pillow's `ImagingResampleHorizontal/Vertical_8bpc`.
fn pass(
    img: &RgbImage,
    out_w: u32,
    out_h: u32,
    horizontal: bool,
    coeffs: &[(usize, Vec<i32>)],
) -> RgbImage {
    RgbImage::from_fn(out_w, out_h, |x, y| {
        let (start, weights) = &coeffs[if horizontal { x } else { y } as usize];
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
    let mut out = img.clone();
    if w != img.width() {
        out = pass(
            &out,
            w,
            img.height(),
            true,
            &coefficients(img.width() as usize, w as usize, interp),
        );
    }
    if h != img.height() {
        out = pass(
            &out,
            w,
            h,
            false,
            &coefficients(img.height() as usize, h as usize, interp),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_sum_to_one_in_fixed_point() {
        for (n_in, n_out) in [(500, 256), (256, 500), (7, 3)] {
            for (_, w) in coefficients(n_in, n_out, Interpolation::Bilinear) {
                let sum: i64 = w.iter().map(|&v| v as i64).sum();
                assert!(
                    (sum - (1 << PRECISION_BITS)).abs() <= w.len() as i64,
                    "{sum}"
                );
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
