//! Procedural image datasets for the demo and the tests: each class is a shape or texture
//! drawn at a random position, scale, angle and colour over a noisy background. Two disjoint
//! class sets share low-level structure (edges, strokes, textures), so features learned on
//! the `source` set transfer to the `target` set.

use std::f32::consts::PI;
use std::path::Path;

use anyhow::Context;
use image::{Rgb, RgbImage};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

use crate::error::Result;

/// Which class set to draw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Six shape classes for pretraining: cross, disk, frame, ring, triangle, waves.
    Source,
    /// Four texture classes to transfer to: checker, dots, grid, stripes.
    Target,
    /// An easy set for smoke tests: three classes that differ in colour as well as in shape
    /// or texture (red disk, green stripes, blue checker on grey).
    Toy,
}

impl Kind {
    /// Every kind, for a command line's choices.
    pub const ALL: [Kind; 3] = [Kind::Source, Kind::Target, Kind::Toy];

    /// The class folder names this kind draws.
    pub fn classes(self) -> &'static [&'static str] {
        match self {
            Kind::Source => &["cross", "disk", "frame", "ring", "triangle", "waves"],
            Kind::Target => &["checker", "dots", "grid", "stripes"],
            Kind::Toy => &["blue_checker", "green_stripes", "red_disk"],
        }
    }
}

/// Is the point (u, v), in shape coordinates (centred, rotated, unit scale), inside class `c`?
/// Shapes are bounded; textures fill the image, so any crop of them still shows the class.
fn inside(class: &str, u: f32, v: f32, freq: f32) -> bool {
    let r = (u * u + v * v).sqrt();
    match class {
        "disk" => r < 1.0,
        "ring" => (0.65..1.0).contains(&r),
        "cross" => (u.abs() < 0.25 && v.abs() < 1.0) || (v.abs() < 0.25 && u.abs() < 1.0),
        "grid" => (u * freq).rem_euclid(1.0) < 0.25 || (v * freq).rem_euclid(1.0) < 0.25,
        "triangle" => v > -0.6 && v < 1.0 && u.abs() < (1.0 - v) * 0.6,
        "stripes" => (u * freq).rem_euclid(1.0) < 0.5,
        "checker" => ((u * freq).floor() as i32 + (v * freq).floor() as i32).rem_euclid(2) == 0,
        "dots" => {
            let (a, b) = (
                (u * freq).rem_euclid(1.0) - 0.5,
                (v * freq).rem_euclid(1.0) - 0.5,
            );
            a * a + b * b < 0.08
        }
        "waves" => r < 1.2 && ((u * freq * PI).sin() * 0.3 - v * 2.0).rem_euclid(1.0) < 0.4,
        "frame" => u.abs().max(v.abs()) < 1.0 && u.abs().max(v.abs()) > 0.7,
        other => unreachable!("unknown synthetic class {other}"),
    }
}

/// Draw one image of `class`.
pub fn draw(class: &str, size: u32, rng: &mut impl Rng) -> RgbImage {
    let s = size as f32;
    let mut bg: [f32; 3] = std::array::from_fn(|_| rng.random_range(0.0..255.0));
    let mut fg: [f32; 3] = std::array::from_fn(|_| rng.random_range(0.0..255.0));
    // Toy classes carry their colour in their name: `red_disk` is a red disk on grey.
    let (class, tint) = match class.split_once('_') {
        Some((colour, shape)) => (shape, Some(colour)),
        None => (class, None),
    };
    if let Some(colour) = tint {
        let grey = rng.random_range(90.0..170.0);
        bg = [grey; 3];
        let (hi, lo) = (rng.random_range(190.0..255.0), rng.random_range(0.0..60.0));
        fg = match colour {
            "red" => [hi, lo, lo],
            "green" => [lo, hi, lo],
            _ => [lo, lo, hi],
        };
    }
    // Keep enough contrast between shape and background.
    if fg.iter().zip(&bg).map(|(a, b)| (a - b).abs()).sum::<f32>() < 150.0 {
        fg = bg.map(|c| 255.0 - c);
    }
    let (cx, cy) = (
        rng.random_range(0.35..0.65) * s,
        rng.random_range(0.35..0.65) * s,
    );
    let scale = rng.random_range(0.22..0.38) * s;
    let angle = rng.random_range(0.0..PI);
    // Textures coarse enough to survive a 64-pixel input and its random crops.
    let freq = rng.random_range(1.2..2.2);
    let (sin, cos) = angle.sin_cos();
    let noise = rng.random_range(5.0..20.0);
    let mut img = RgbImage::new(size, size);
    for (x, y, px) in img.enumerate_pixels_mut() {
        let (dx, dy) = ((x as f32 - cx) / scale, (y as f32 - cy) / scale);
        let (u, v) = (cos * dx + sin * dy, -sin * dx + cos * dy);
        let base = if inside(class, u, v, freq) { fg } else { bg };
        let n = rng.random_range(-noise..noise);
        *px = Rgb(base.map(|c| (c + n).clamp(0.0, 255.0) as u8));
    }
    img
}

/// Write `per_class` PNG images per class of `kind` into `out/CLASS/NNNN.png`.
pub fn write_dataset(out: &Path, kind: Kind, per_class: usize, size: u32, seed: u64) -> Result<()> {
    for (c, class) in kind.classes().iter().enumerate() {
        let dir = out.join(class);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("{}: cannot create", dir.display()))?;
        (0..per_class).into_par_iter().try_for_each(|i| {
            let mut rng = StdRng::seed_from_u64(seed ^ ((c as u64) << 32) ^ i as u64);
            let path = dir.join(format!("{i:04}.png"));
            draw(class, size, &mut rng)
                .save(&path)
                .with_context(|| format!("{}: cannot write", path.display()))
        })?;
    }
    Ok(())
}
