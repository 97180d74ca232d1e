//! Image folders: discovery, the train/val split, decoding once into memory, and the
//! torchvision reference augmentation, batched in parallel ahead of the training loop.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, sync_channel};

use anyhow::{Context, bail};
use image::RgbImage;
use image::imageops::FilterType;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::preprocess::{Interpolation, Preprocess, decode, to_chw};

const IMAGE_EXTENSIONS: [&str; 7] = ["jpg", "jpeg", "png", "bmp", "webp", "gif", "jfif"];

/// One image of the split: path relative to the data folder, class index, content hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub path: String,
    pub label: usize,
    pub sha256: String,
}

/// The train/val split of a run, written to `split.json` and reused on resume and by every
/// regime of a comparison.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Split {
    pub classes: Vec<String>,
    pub train: Vec<Entry>,
    pub val: Vec<Entry>,
    /// Images whose content appears in both train and val.
    pub leaked: Vec<String>,
}

/// An image file by extension, not hidden.
pub fn is_image(path: &Path) -> bool {
    let hidden = path
        .file_name()
        .and_then(|n| n.to_str())
        .is_none_or(|n| n.starts_with('.'));
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    !hidden && ext.is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.as_str()))
}

/// Class folders of `dir`, sorted, and their image files (relative to `root`).
fn scan_classes(root: &Path, dir: &Path) -> anyhow::Result<BTreeMap<String, Vec<String>>> {
    let mut classes = BTreeMap::new();
    let entries = std::fs::read_dir(dir)
        .with_context(|| format!("{}: cannot read the data folder", dir.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("{}: cannot list", dir.display()))?;
        let name = entry.file_name().to_string_lossy().to_string();
        if name.starts_with('.') || !entry.path().is_dir() {
            continue;
        }
        let mut files = Vec::new();
        collect_images(&entry.path(), &mut files)?;
        let mut rel: Vec<String> = files
            .iter()
            .map(|f| {
                f.strip_prefix(root)
                    .unwrap_or(f)
                    .to_string_lossy()
                    .to_string()
            })
            .collect();
        rel.sort();
        classes.insert(name, rel);
    }
    if classes.is_empty() {
        bail!(
            "{}: no class folders (expected one sub-folder of images per class)",
            dir.display()
        );
    }
    Ok(classes)
}

/// Image files below `dir`, hidden files and folders skipped.
pub fn collect_images(dir: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    for entry in
        std::fs::read_dir(dir).with_context(|| format!("{}: cannot list", dir.display()))?
    {
        let path = entry?.path();
        let hidden = path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with('.'));
        if path.is_dir() && !hidden {
            collect_images(&path, out)?;
        } else if is_image(&path) {
            out.push(path);
        }
    }
    Ok(())
}

fn sha256_file(path: &Path) -> anyhow::Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    Ok(format!("{:x}", Sha256::digest(&bytes)))
}

fn entries(root: &Path, files: Vec<(String, usize)>) -> anyhow::Result<Vec<Entry>> {
    files
        .into_par_iter()
        .map(|(path, label)| {
            Ok(Entry {
                sha256: sha256_file(&root.join(&path))?,
                path,
                label,
            })
        })
        .collect()
}

impl Split {
    /// Use `dir/train` and `dir/val` when both exist; otherwise split `dir`'s class folders,
    /// stratified per class, `val_fraction` of each class (at least one image) to val.
    pub fn make(dir: &Path, val_fraction: f64, seed: u64) -> anyhow::Result<Split> {
        let (classes, train, val) = if dir.join("train").is_dir() && dir.join("val").is_dir() {
            let train = scan_classes(dir, &dir.join("train"))?;
            let val = scan_classes(dir, &dir.join("val"))?;
            let names: Vec<String> = train.keys().cloned().collect();
            if let Some(extra) = val.keys().find(|k| !train.contains_key(*k)) {
                bail!(
                    "{}: val has class '{extra}' that train lacks",
                    dir.display()
                );
            }
            let label = |m: BTreeMap<String, Vec<String>>| -> Vec<(String, usize)> {
                m.into_iter()
                    .flat_map(|(c, files)| {
                        let l = names.iter().position(|n| *n == c).expect("known class");
                        files.into_iter().map(move |f| (f, l))
                    })
                    .collect()
            };
            let (t, v) = (label(train), label(val));
            (names.clone(), t, v)
        } else {
            if !(0.0..1.0).contains(&val_fraction) {
                bail!("--val-fraction must be in [0, 1), got {val_fraction}");
            }
            let found = scan_classes(dir, dir)?;
            let names: Vec<String> = found.keys().cloned().collect();
            let mut rng = StdRng::seed_from_u64(seed);
            let (mut train, mut val) = (Vec::new(), Vec::new());
            for (label, (_, mut files)) in found.into_iter().enumerate() {
                files.shuffle(&mut rng);
                let n_val = if files.len() < 2 || val_fraction == 0.0 {
                    0
                } else {
                    ((files.len() as f64 * val_fraction).round() as usize).max(1)
                };
                for (i, f) in files.into_iter().enumerate() {
                    if i < n_val {
                        val.push((f, label));
                    } else {
                        train.push((f, label));
                    }
                }
            }
            (names, train, val)
        };
        let train = entries(dir, train)?;
        let val = entries(dir, val)?;
        for (label, name) in classes.iter().enumerate() {
            if !train.iter().any(|e| e.label == label) {
                bail!("{}: class '{name}' has no training images", dir.display());
            }
        }
        let train_hashes: HashMap<&str, &str> = train
            .iter()
            .map(|e| (e.sha256.as_str(), e.path.as_str()))
            .collect();
        let leaked = val
            .iter()
            .filter_map(|e| {
                train_hashes
                    .get(e.sha256.as_str())
                    .map(|t| format!("{} = {t}", e.path))
            })
            .collect();
        Ok(Split {
            classes,
            train,
            val,
            leaked,
        })
    }
}

/// Decoded images held in memory, downscaled once so the shorter side is at most `presize`
/// (fastai's "presizing"): later epochs and regimes never decode again.
pub struct ImageSet {
    pub images: Vec<Arc<RgbImage>>,
    pub labels: Vec<usize>,
    pub paths: Vec<String>,
    /// Files that could not be decoded, with the reason; skipped.
    pub skipped: Vec<String>,
}

impl ImageSet {
    pub fn load(root: &Path, entries: &[Entry], presize: usize) -> ImageSet {
        let decoded: Vec<Result<RgbImage, String>> = entries
            .par_iter()
            .map(|e| {
                decode(&root.join(&e.path))
                    .map(|img| shrink(img, presize))
                    .map_err(|err| format!("{err:#}"))
            })
            .collect();
        let mut set = ImageSet {
            images: Vec::new(),
            labels: Vec::new(),
            paths: Vec::new(),
            skipped: Vec::new(),
        };
        for (e, d) in entries.iter().zip(decoded) {
            match d {
                Ok(img) => {
                    set.images.push(Arc::new(img));
                    set.labels.push(e.label);
                    set.paths.push(e.path.clone());
                }
                Err(msg) => {
                    eprintln!("warning: skipping unreadable image {msg}");
                    set.skipped.push(msg);
                }
            }
        }
        set
    }

    pub fn len(&self) -> usize {
        self.images.len()
    }

    pub fn is_empty(&self) -> bool {
        self.images.is_empty()
    }
}

fn shrink(img: RgbImage, presize: usize) -> RgbImage {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let short = w.min(h);
    if short <= presize {
        return img;
    }
    let (nw, nh) = (w * presize / short, h * presize / short);
    // Pillow's resize, so that the eval transform of a presized image equals `predict`'s.
    crate::resample::resize(&img, nw as u32, nh as u32, Interpolation::Bilinear)
}

/// torchvision's `RandomResizedCrop(size, scale=(min_scale, 1), ratio=(3/4, 4/3))` followed
/// by `RandomHorizontalFlip()`.
pub fn random_resized_crop(
    img: &RgbImage,
    size: usize,
    min_scale: f64,
    rng: &mut impl Rng,
) -> RgbImage {
    let (w, h) = (img.width() as f64, img.height() as f64);
    let area = w * h;
    let (lo, hi) = ((3.0f64 / 4.0).ln(), (4.0f64 / 3.0).ln());
    let mut crop = None;
    for _ in 0..10 {
        let target = area * rng.random_range(min_scale.min(1.0)..=1.0);
        let aspect = rng.random_range(lo..hi).exp();
        let cw = (target * aspect).sqrt().round();
        let ch = (target / aspect).sqrt().round();
        if cw > 0.0 && ch > 0.0 && cw <= w && ch <= h {
            let x = rng.random_range(0..=(w - cw) as u32);
            let y = rng.random_range(0..=(h - ch) as u32);
            crop = Some((x, y, cw as u32, ch as u32));
            break;
        }
    }
    // Fallback: the largest centred crop within the ratio range.
    let (x, y, cw, ch) = crop.unwrap_or_else(|| {
        let ratio = w / h;
        let (cw, ch) = if ratio < 3.0 / 4.0 {
            (w, (w / (3.0 / 4.0)).round())
        } else if ratio > 4.0 / 3.0 {
            ((h * 4.0 / 3.0).round(), h)
        } else {
            (w, h)
        };
        (
            ((w - cw) / 2.0) as u32,
            ((h - ch) / 2.0) as u32,
            cw as u32,
            ch as u32,
        )
    });
    let view = image::imageops::crop_imm(img, x, y, cw, ch).to_image();
    let mut out = image::imageops::resize(&view, size as u32, size as u32, FilterType::Triangle);
    if rng.random_bool(0.5) {
        image::imageops::flip_horizontal_in_place(&mut out);
    }
    out
}

/// A batch ready for the network: NCHW values and labels; `indices` point into the set.
pub struct Batch {
    pub pixels: Vec<f32>,
    pub labels: Vec<usize>,
    pub indices: Vec<usize>,
}

/// How to turn a stored image into network input.
#[derive(Clone, Copy)]
pub enum Transform {
    /// Random resized crop (area fraction from `min_scale` to 1) and flip, seeded per image
    /// so that runs are reproducible.
    Train {
        seed: u64,
        min_scale: f64,
    },
    Eval,
}

fn make_batch(set: &ImageSet, pre: &Preprocess, idx: &[usize], transform: Transform) -> Batch {
    let size = pre.input_size;
    let chunks: Vec<Vec<f32>> = idx
        .par_iter()
        .map(|&i| match transform {
            Transform::Train { seed, min_scale } => {
                let mut rng =
                    StdRng::seed_from_u64(seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
                to_chw(
                    &random_resized_crop(&set.images[i], size, min_scale, &mut rng),
                    pre.mean,
                    pre.std,
                )
            }
            Transform::Eval => pre.eval(&set.images[i]),
        })
        .collect();
    Batch {
        pixels: chunks.concat(),
        labels: idx.iter().map(|&i| set.labels[i]).collect(),
        indices: idx.to_vec(),
    }
}

/// Batches of `order`, built on a background thread (images in parallel with rayon) up to
/// two batches ahead of the consumer, so that the network and not the loader sets the pace.
pub fn batches(
    set: Arc<ImageSet>,
    pre: Preprocess,
    order: Vec<usize>,
    batch_size: usize,
    transform: Transform,
) -> Receiver<Batch> {
    let (tx, rx) = sync_channel(2);
    std::thread::spawn(move || {
        for idx in order.chunks(batch_size) {
            if tx.send(make_batch(&set, &pre, idx, transform)).is_err() {
                return;
            }
        }
    });
    rx
}

/// The training order of an epoch: a shuffle seeded by run seed and epoch.
pub fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut StdRng::seed_from_u64(
        seed.wrapping_add(epoch as u64 * 1_000_003),
    ));
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_resized_crop_has_the_requested_size() {
        let img = RgbImage::from_fn(80, 50, |x, y| image::Rgb([x as u8, y as u8, 0]));
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..20 {
            let out = random_resized_crop(&img, 32, 0.08, &mut rng);
            assert_eq!((out.width(), out.height()), (32, 32));
        }
    }

    #[test]
    fn epoch_order_is_a_seeded_permutation() {
        let a = epoch_order(10, 7, 1);
        assert_eq!(a, epoch_order(10, 7, 1));
        assert_ne!(a, epoch_order(10, 7, 2));
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..10).collect::<Vec<_>>());
    }
}
