//! Image decoding and the eval transform of torchvision's reference recipe: resize the
//! shorter side, center crop, normalize. Resizing reproduces Pillow's (see [`crate::resample`]).

use std::path::Path;

use std::io::Cursor;

use anyhow::Context;
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, Limits, RgbImage};

use crate::error::{Result, bail};
pub use crate::resample::Interpolation;
use crate::resample::resize_window;
use serde::{Deserialize, Serialize};

/// How a model wants its input prepared (timm's pretrained config, the image part).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Preprocess {
    /// Side of the square input the network sees.
    pub input_size: usize,
    /// Shorter side before the center crop (`input_size / crop_pct`).
    pub resize_size: usize,
    /// The resize filter.
    pub interpolation: Interpolation,
    /// Per-channel mean on the [0, 1] scale.
    pub mean: [f32; 3],
    /// Per-channel standard deviation on the [0, 1] scale.
    pub std: [f32; 3],
}

impl Preprocess {
    /// torchvision's original ImageNet recipe: resize 256, crop 224, bilinear, ImageNet
    /// mean and std.
    pub const IMAGENET: Preprocess = Preprocess::imagenet(224, 256, Interpolation::Bilinear);

    /// ImageNet mean and std with the given sizes and filter.
    pub const fn imagenet(
        input_size: usize,
        resize_size: usize,
        interpolation: Interpolation,
    ) -> Preprocess {
        Preprocess {
            input_size,
            resize_size,
            interpolation,
            mean: [0.485, 0.456, 0.406],
            std: [0.229, 0.224, 0.225],
        }
    }

    /// The same recipe for another input size, the resize scaled with it (256 for 224
    /// becomes 128 for 112).
    pub fn for_input_size(&self, input_size: usize) -> Preprocess {
        let resize = self.resize_size as f64 * input_size as f64 / self.input_size as f64;
        Preprocess {
            input_size,
            resize_size: (resize.round() as usize).max(input_size),
            ..self.clone()
        }
    }
}

/// Pillow's decompression-bomb limit (twice `Image.MAX_IMAGE_PIXELS`): above it Pillow
/// refuses to open an image, and so do we, from the header, before decoding.
pub const MAX_PIXELS: u64 = 178_956_970;

/// Image files larger than this are refused before reading.
const MAX_FILE_BYTES: u64 = 1 << 30;

/// A decoded image and, for a file that decoded but is damaged, what is wrong with it.
pub struct Decoded {
    /// The pixels as 8-bit RGB, EXIF orientation applied.
    pub image: RgbImage,
    /// What is wrong with a file that decoded but is damaged (a truncated JPEG).
    pub warning: Option<String>,
}

/// The bytes of an image file: only a regular file (a FIFO named `x.png` would block the
/// reader forever) and at most 1 GiB.
pub fn read_image_file(path: &Path) -> Result<Vec<u8>> {
    let meta = std::fs::metadata(path).with_context(|| format!("{}", path.display()))?;
    if !meta.is_file() {
        bail!("{}: not a regular file", path.display());
    }
    if meta.len() > MAX_FILE_BYTES {
        bail!(
            "{}: {} bytes is too large for an image",
            path.display(),
            meta.len()
        );
    }
    Ok(std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?)
}

/// Decode an image file to RGB, applying its EXIF orientation. Grayscale, palette, alpha
/// and 16-bit images become 8-bit RGB; an animated GIF gives its first frame.
pub fn decode(path: &Path) -> Result<Decoded> {
    decode_bytes(path, &read_image_file(path)?)
}

/// [`decode`] of bytes already read from `path` (named in messages).
pub fn decode_bytes(path: &Path, bytes: &[u8]) -> Result<Decoded> {
    let fail = |e: &dyn std::fmt::Display| anyhow::anyhow!("{}: {e}", path.display());
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| fail(&e))?;
    let mut limits = Limits::default();
    limits.max_alloc = Some(4 * MAX_PIXELS);
    reader.limits(limits);
    let format = reader.format();
    let mut decoder = reader.into_decoder().map_err(|e| fail(&e))?;
    let (w, h) = decoder.dimensions();
    if w == 0 || h == 0 {
        bail!("{}: the image has no pixels ({w}x{h})", path.display());
    }
    if w as u64 * h as u64 > MAX_PIXELS {
        bail!(
            "{}: {w}x{h} is {} pixels, above the limit of {MAX_PIXELS}",
            path.display(),
            w as u64 * h as u64
        );
    }
    let orientation = decoder.orientation().map_err(|e| fail(&e))?;
    let mut img = DynamicImage::from_decoder(decoder).map_err(|e| fail(&e))?;
    img.apply_orientation(orientation);
    let warning = (format == Some(ImageFormat::Jpeg) && !jpeg_is_complete(bytes)).then(|| {
        format!(
            "{}: truncated JPEG (no end-of-image marker); the missing part decodes as grey",
            path.display()
        )
    });
    Ok(Decoded {
        image: img.into_rgb8(),
        warning,
    })
}

/// Does a JPEG stream have its end-of-image marker after its first scan? (`FF D9` cannot
/// occur inside entropy-coded data, where every `FF` byte is followed by `00`.)
fn jpeg_is_complete(bytes: &[u8]) -> bool {
    let scan = bytes.windows(2).position(|w| w == [0xFF, 0xDA]);
    scan.is_some_and(|start| bytes[start..].windows(2).any(|w| w == [0xFF, 0xD9]))
}

/// torchvision's `Resize(size)` with an int: the shorter side becomes `size`, the longer
/// is scaled and truncated.
fn shorter_side_size(img: &RgbImage, size: usize) -> (usize, usize) {
    let (w, h) = (img.width() as usize, img.height() as usize);
    if w <= h {
        (size, size * h / w)
    } else {
        (size * w / h, size)
    }
}

/// torchvision's `CenterCrop` of a `(w, h)` image: the offsets, rounded half to even like
/// Python's `round`.
fn center_crop_offsets((w, h): (usize, usize), size: usize) -> (u32, u32) {
    let off = |full: usize| (((full as f64 - size as f64) / 2.0).round_ties_even()).max(0.0);
    (off(w) as u32, off(h) as u32)
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
    /// The eval transform: resize, center crop, normalize; returns CHW values. Only the
    /// cropped window is resized, so a long thin image never makes a huge intermediate.
    pub fn eval(&self, img: &RgbImage) -> Vec<f32> {
        let size = self.input_size;
        let (w, h) = shorter_side_size(img, self.resize_size.max(size));
        let (left, top) = center_crop_offsets((w, h), size);
        let window = (left, top, size as u32, size as u32);
        let cropped = if (w, h) == (img.width() as usize, img.height() as usize) {
            image::imageops::crop_imm(img, left, top, size as u32, size as u32).to_image()
        } else {
            resize_window(img, (w as u32, h as u32), window, self.interpolation)
        };
        to_chw(&cropped, self.mean, self.std)
    }

    /// Bilinear, no normalisation: the transform's geometry alone, for tests.
    #[cfg(test)]
    pub fn plain(input_size: usize, resize_size: usize) -> Self {
        Self {
            input_size,
            resize_size,
            interpolation: Interpolation::Bilinear,
            mean: [0.0; 3],
            std: [1.0; 3],
        }
    }

    /// Decode and transform one file; the warning of a damaged file that still decoded.
    pub fn load(&self, path: &Path) -> Result<(Vec<f32>, Option<String>)> {
        let decoded = decode(path)?;
        Ok((self.eval(&decoded.image), decoded.warning))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resize_keeps_aspect_and_crop_centers() {
        let img = RgbImage::from_fn(300, 200, |x, _| image::Rgb([(x % 256) as u8, 0, 0]));
        assert_eq!(shorter_side_size(&img, 100), (150, 100));
        assert_eq!(center_crop_offsets((300, 200), 100), (100, 50));
        let pre = Preprocess::plain(100, 200);
        let v = pre.eval(&img);
        assert_eq!(v.len(), 3 * 100 * 100);
        assert_eq!(v[0], 100.0 / 255.0);
    }

    #[test]
    fn a_long_thin_image_resizes_only_its_window() {
        let img = RgbImage::from_fn(1, 60000, |_, y| image::Rgb([(y % 256) as u8, 0, 0]));
        let pre = Preprocess::plain(224, 256);
        assert_eq!(pre.eval(&img).len(), 3 * 224 * 224);
    }

    #[test]
    fn truncated_jpeg_is_detected() {
        let full = [0xFF, 0xD8, 0xFF, 0xDA, 1, 2, 0xFF, 0x00, 0xFF, 0xD9];
        assert!(jpeg_is_complete(&full));
        assert!(!jpeg_is_complete(&full[..7]));
        // An end marker before the scan (an EXIF thumbnail's) does not count.
        assert!(!jpeg_is_complete(&[0xFF, 0xD8, 0xFF, 0xD9, 0xFF, 0xDA, 1]));
    }

    #[test]
    fn normalizes_to_chw() {
        let img = RgbImage::from_pixel(2, 1, image::Rgb([255, 0, 51]));
        let v = to_chw(&img, [0.0, 0.0, 0.0], [1.0, 1.0, 0.5]);
        assert_eq!(v, vec![1.0, 1.0, 0.0, 0.0, 0.4, 0.4]);
    }
}
