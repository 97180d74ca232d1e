//! Image decoding and the eval transform of torchvision's reference recipe: resize the
//! shorter side, center crop, normalize. Resizing reproduces Pillow's (see [`crate::resample`]).

use std::path::Path;

use image::{DynamicImage, ImageDecoder, ImageReader, RgbImage};
use serde::{Deserialize, Serialize};

/// Resampling filter for resizing, named as in torchvision / Pillow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Interpolation {
    Bilinear,
    Bicubic,
}

/// How a model wants its input prepared (timm's pretrained config, the image part).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Preprocess {
    /// Side of the square input the network sees.
    pub input_size: usize,
    /// Shorter side before the center crop (`input_size / crop_pct`).
    pub resize_size: usize,
    pub interpolation: Interpolation,
    /// Per-channel mean and std on the [0, 1] scale.
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

/// Decode an image file to RGB, applying its EXIF orientation. Grayscale, palette, alpha
/// and 16-bit images become 8-bit RGB; an animated GIF gives its first frame.
pub fn decode(path: &Path) -> anyhow::Result<RgbImage> {
    let fail = |e: &dyn std::fmt::Display| anyhow::anyhow!("{}: {e}", path.display());
    let reader = ImageReader::open(path)
        .map_err(|e| fail(&e))?
        .with_guessed_format()
        .map_err(|e| fail(&e))?;
    let mut decoder = reader.into_decoder().map_err(|e| fail(&e))?;
    let orientation = decoder.orientation().map_err(|e| fail(&e))?;
    let mut img = DynamicImage::from_decoder(decoder).map_err(|e| fail(&e))?;
    img.apply_orientation(orientation);
    Ok(img.into_rgb8())
}

/// torchvision's `Resize(size)` with an int: the shorter side becomes `size`, the longer
/// is scaled and truncated.
fn resize_shorter(img: &RgbImage, size: usize, interp: Interpolation) -> RgbImage {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let (nw, nh) = if w <= h {
        (size, size * h / w)
    } else {
        (size * w / h, size)
    };
    if (nw, nh) == (w, h) {
        return img.clone();
    }
    crate::resample::resize(img, nw as u32, nh as u32, interp)
}

/// torchvision's `CenterCrop`: offsets rounded half to even like Python's `round`.
fn center_crop(img: &RgbImage, size: usize) -> RgbImage {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let off = |full: usize| (((full as f64 - size as f64) / 2.0).round_ties_even()).max(0.0);
    let (left, top) = (off(w) as u32, off(h) as u32);
    image::imageops::crop_imm(img, left, top, size as u32, size as u32).to_image()
}

/// Normalize an RGB image into CHW f32 values.
pub fn to_chw(img: &RgbImage, mean: [f32; 3], std: [f32; 3]) -> Vec<f32> {
    let plane = (img.width() * img.height()) as usize;
    let mut out = vec![0.0f32; 3 * plane];
    for (i, px) in img.pixels().enumerate() {
        for c in 0..3 {
            out[c * plane + i] = (px[c] as f32 / 255.0 - mean[c]) / std[c];
        }
    }
    out
}

impl Preprocess {
    /// The eval transform: resize, center crop, normalize; returns CHW values.
    pub fn eval(&self, img: &RgbImage) -> Vec<f32> {
        let resized = resize_shorter(img, self.resize_size, self.interpolation);
        let cropped = center_crop(&resized, self.input_size);
        to_chw(&cropped, self.mean, self.std)
    }

    /// Decode and transform one file.
    pub fn load(&self, path: &Path) -> anyhow::Result<Vec<f32>> {
        Ok(self.eval(&decode(path)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resize_keeps_aspect_and_crop_centers() {
        let img = RgbImage::from_fn(300, 200, |x, _| image::Rgb([(x % 256) as u8, 0, 0]));
        let r = resize_shorter(&img, 100, Interpolation::Bilinear);
        assert_eq!((r.width(), r.height()), (150, 100));
        let c = center_crop(&img, 100);
        assert_eq!((c.width(), c.height()), (100, 100));
        assert_eq!(c.get_pixel(0, 0)[0], 100);
    }

    #[test]
    fn normalizes_to_chw() {
        let img = RgbImage::from_pixel(2, 1, image::Rgb([255, 0, 51]));
        let v = to_chw(&img, [0.0, 0.0, 0.0], [1.0, 1.0, 0.5]);
        assert_eq!(v, vec![1.0, 1.0, 0.0, 0.0, 0.4, 0.4]);
    }
}
