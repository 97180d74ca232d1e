//! Image folders: discovery, the train/val split, decoding once into memory, and the
//! torchvision reference augmentation, batched in parallel ahead of the training loop.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, sync_channel};

use anyhow::Context;
use image::RgbImage;
use image::imageops::FilterType;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Result, bail};
use crate::preprocess::{Interpolation, Preprocess, decode_bytes, to_chw};

const IMAGE_EXTENSIONS: [&str; 7] = ["jpg", "jpeg", "png", "bmp", "webp", "gif", "jfif"];

/// One image of the split: path relative to the data folder, class index, content hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Path relative to the data folder.
    #[serde(with = "os_path")]
    pub path: PathBuf,
    /// Class index into [`Split::classes`].
    pub label: usize,
    /// SHA-256 of the file's bytes, in hex, to tell when it changes.
    pub sha256: String,
}

/// The train/val split of a run, written to `split.json` and reused on resume and by every
/// regime of a comparison.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Split {
    /// Class names (the folder names), sorted; a label is an index into them.
    pub classes: Vec<String>,
    /// Training images.
    pub train: Vec<Entry>,
    /// Validation images.
    pub val: Vec<Entry>,
    /// Images whose content appears in both train and val.
    pub leaked: Vec<String>,
    /// What the walk passed over (directory loops, files that are not regular files).
    #[serde(skip)]
    pub warnings: Vec<String>,
}

/// Paths in JSON: a string when the name is UTF-8, else its bytes, so that every file name
/// the system allows (as `OsStr`) round-trips.
mod os_path {
    use std::path::{Path, PathBuf};

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    #[serde(untagged)]
    enum Repr {
        Text(String),
        Bytes(Vec<u8>),
    }

    pub fn serialize<S: Serializer>(path: &Path, s: S) -> Result<S::Ok, S::Error> {
        match path.to_str() {
            Some(text) => Repr::Text(text.to_string()),
            None => Repr::Bytes(bytes(path)),
        }
        .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<PathBuf, D::Error> {
        Ok(match Repr::deserialize(d)? {
            Repr::Text(text) => PathBuf::from(text),
            Repr::Bytes(b) => from_bytes(b),
        })
    }

    #[cfg(unix)]
    fn bytes(path: &Path) -> Vec<u8> {
        std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str()).to_vec()
    }

    #[cfg(unix)]
    fn from_bytes(b: Vec<u8>) -> PathBuf {
        <std::ffi::OsString as std::os::unix::ffi::OsStringExt>::from_vec(b).into()
    }

    #[cfg(not(unix))]
    fn bytes(path: &Path) -> Vec<u8> {
        path.to_string_lossy().into_owned().into_bytes()
    }

    #[cfg(not(unix))]
    fn from_bytes(b: Vec<u8>) -> PathBuf {
        String::from_utf8_lossy(&b).into_owned().into()
    }
}

/// An image file by extension, not hidden.
pub fn is_image(path: &Path) -> bool {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    !is_hidden(path) && ext.is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.as_str()))
}

fn is_hidden(path: &Path) -> bool {
    path.file_name()
        .is_none_or(|n| n.as_encoded_bytes().starts_with(b"."))
}

/// Image files found below a folder, and what was passed over and why.
#[derive(Debug, Default)]
pub struct Found {
    /// Image files, sorted, as paths below the walked folder.
    pub files: Vec<PathBuf>,
    /// What was passed over and why, one line each.
    pub warnings: Vec<String>,
}

impl Found {
    /// Walk `dir`, each directory once: a symbolic link back to a folder already walked
    /// (a loop) is reported and not followed, and only regular files are taken.
    pub fn walk(dir: &Path) -> Result<Found> {
        let mut found = Found::default();
        found.enter(dir, &mut HashSet::new())?;
        found.files.sort();
        Ok(found)
    }

    /// The canonical path of `dir`, the identity of a directory however it is reached.
    fn identity(dir: &Path) -> anyhow::Result<PathBuf> {
        dir.canonicalize()
            .with_context(|| format!("{}: cannot open", dir.display()))
    }

    fn enter(&mut self, dir: &Path, visited: &mut HashSet<PathBuf>) -> anyhow::Result<()> {
        let real = Self::identity(dir)?;
        if !visited.insert(real.clone()) {
            self.warnings.push(format!(
                "{}: leads back to {} (a directory loop); not followed",
                dir.display(),
                real.display()
            ));
            return Ok(());
        }
        self.list(dir, visited)
    }

    /// The images in `dir` and, through [`Self::enter`], below it.
    fn list(&mut self, dir: &Path, visited: &mut HashSet<PathBuf>) -> anyhow::Result<()> {
        let entries =
            std::fs::read_dir(dir).with_context(|| format!("{}: cannot list", dir.display()))?;
        for entry in entries {
            let path = entry
                .with_context(|| format!("{}: cannot list", dir.display()))?
                .path();
            if is_hidden(&path) {
                continue;
            }
            match std::fs::metadata(&path) {
                Ok(meta) if meta.is_dir() => self.enter(&path, visited)?,
                Ok(meta) if meta.is_file() && is_image(&path) => self.files.push(path),
                Ok(_) if is_image(&path) => self
                    .warnings
                    .push(format!("{}: not a regular file; skipped", path.display())),
                Ok(_) => {}
                Err(e) => self
                    .warnings
                    .push(format!("{}: {e}; skipped", path.display())),
            }
        }
        Ok(())
    }
}

/// Class folders of `dir`, sorted, with their image files relative to `root`.
type ClassFiles = BTreeMap<String, Vec<PathBuf>>;

/// The class folders of `dir` and their images (relative to `root`), each directory
/// visited once over all classes: the data folder and the class folders are known before
/// the walk, so a link from one class into another or back up is a loop, not more images.
fn scan_classes(root: &Path, dir: &Path, warnings: &mut Vec<String>) -> anyhow::Result<ClassFiles> {
    let mut class_dirs = Vec::new();
    let entries = std::fs::read_dir(dir)
        .with_context(|| format!("{}: cannot read the data folder", dir.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("{}: cannot list", dir.display()))?;
        let path = entry.path();
        if !is_hidden(&path) && path.is_dir() {
            class_dirs.push((entry.file_name().to_string_lossy().to_string(), path));
        }
    }
    if class_dirs.is_empty() {
        bail!(
            "{}: no class folders (expected one sub-folder of images per class)",
            dir.display()
        );
    }
    let mut visited = HashSet::new();
    for known in [root, dir]
        .into_iter()
        .chain(class_dirs.iter().map(|(_, p)| p.as_path()))
    {
        visited.insert(Found::identity(known)?);
    }
    let mut classes = BTreeMap::new();
    for (name, path) in class_dirs {
        let mut found = Found::default();
        found.list(&path, &mut visited)?;
        warnings.extend(found.warnings);
        let mut rel: Vec<PathBuf> = found
            .files
            .into_iter()
            .map(|f| f.strip_prefix(root).map(Path::to_path_buf).unwrap_or(f))
            .collect();
        rel.sort();
        classes.insert(name, rel);
    }
    Ok(classes)
}

fn sha256_hex(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

fn entries(root: &Path, files: Vec<(PathBuf, usize)>) -> anyhow::Result<Vec<Entry>> {
    files
        .into_par_iter()
        .map(|(path, label)| {
            let full = root.join(&path);
            let bytes =
                std::fs::read(&full).with_context(|| format!("{}: cannot read", full.display()))?;
            Ok(Entry {
                sha256: sha256_hex(&bytes),
                path,
                label,
            })
        })
        .collect()
}

impl Split {
    /// Use `dir/train` and `dir/val` when both exist; otherwise split `dir`'s class folders,
    /// stratified per class, `val_fraction` of each class (at least one image) to val.
    pub fn make(dir: &Path, val_fraction: f64, seed: u64) -> Result<Split> {
        let mut warnings = Vec::new();
        let (classes, train, val) = if dir.join("train").is_dir() && dir.join("val").is_dir() {
            let train = scan_classes(dir, &dir.join("train"), &mut warnings)?;
            let val = scan_classes(dir, &dir.join("val"), &mut warnings)?;
            let names: Vec<String> = train.keys().cloned().collect();
            if let Some(extra) = val.keys().find(|k| !train.contains_key(*k)) {
                bail!(
                    "{}: val has class '{extra}' that train lacks",
                    dir.display()
                );
            }
            let label = |m: ClassFiles| -> Vec<(PathBuf, usize)> {
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
            crate::ranges::check_fraction(val_fraction)
                .map_err(|e| anyhow::anyhow!("--val-fraction: {e}"))?;
            let found = scan_classes(dir, dir, &mut warnings)?;
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
        let train_hashes: HashMap<&str, &Path> = train
            .iter()
            .map(|e| (e.sha256.as_str(), e.path.as_path()))
            .collect();
        let leaked = val
            .iter()
            .filter_map(|e| {
                train_hashes
                    .get(e.sha256.as_str())
                    .map(|t| format!("{} = {}", e.path.display(), t.display()))
            })
            .collect();
        Ok(Split {
            classes,
            train,
            val,
            leaked,
            warnings,
        })
    }

    /// A split read back from `file`: every path relative and inside the data folder, every
    /// label one of its classes.
    pub fn check(self, file: &Path) -> Result<Split> {
        if self.classes.is_empty() {
            bail!("{}: no classes", file.display());
        }
        for e in self.train.iter().chain(&self.val) {
            let inside = e
                .path
                .components()
                .all(|c| matches!(c, std::path::Component::Normal(_)));
            if !inside || e.path.as_os_str().is_empty() {
                bail!(
                    "{}: the path '{}' leaves the data folder",
                    file.display(),
                    e.path.display()
                );
            }
            if e.label >= self.classes.len() {
                bail!(
                    "{}: '{}' has label {} but there are {} classes",
                    file.display(),
                    e.path.display(),
                    e.label,
                    self.classes.len()
                );
            }
        }
        Ok(self)
    }

    /// How `other` (made from the data folder now) differs from this split: classes, and
    /// files added, missing or changed; empty when they are the same.
    pub fn differences(&self, other: &Split) -> Vec<String> {
        let mut out = Vec::new();
        if self.classes != other.classes {
            out.push(format!(
                "classes {:?} are now {:?}",
                self.classes, other.classes
            ));
        }
        let index = |s: &Split| -> BTreeMap<PathBuf, String> {
            s.train
                .iter()
                .chain(&s.val)
                .map(|e| (e.path.clone(), e.sha256.clone()))
                .collect()
        };
        let (old, new) = (index(self), index(other));
        for (path, hash) in &old {
            match new.get(path) {
                None => out.push(format!("{}: missing", path.display())),
                Some(h) if h != hash => out.push(format!("{}: changed", path.display())),
                _ => {}
            }
        }
        for path in new.keys().filter(|p| !old.contains_key(*p)) {
            out.push(format!("{}: new", path.display()));
        }
        if out.is_empty() && (self.train != other.train || self.val != other.val) {
            out.push("the same files, split differently (--val-fraction or --seed)".into());
        }
        out
    }
}

/// `items` on one line, the first ten of them and how many more.
pub fn first_ten(items: &[String]) -> String {
    let mut text = items
        .iter()
        .take(10)
        .cloned()
        .collect::<Vec<_>>()
        .join("; ");
    if items.len() > 10 {
        text.push_str(&format!("; and {} more", items.len() - 10));
    }
    text
}

/// Decoded images held in memory, downscaled once so the shorter side is at most `presize`
/// (fastai's "presizing"): later epochs and regimes never decode again.
pub struct ImageSet {
    /// Decoded images, presized.
    pub images: Vec<Arc<RgbImage>>,
    /// Class index of each image.
    pub labels: Vec<usize>,
    /// Path of each image, relative to the data folder.
    pub paths: Vec<PathBuf>,
    /// Files that could not be decoded, with the reason; skipped.
    pub skipped: Vec<String>,
    /// Files that are missing or whose content no longer matches the split's hash.
    pub changed: Vec<String>,
    /// Files that decoded but are damaged (a truncated JPEG), with what is wrong.
    pub warnings: Vec<String>,
}

/// One file of an [`ImageSet`] as read and decoded.
enum Loaded {
    Image(RgbImage, Option<String>),
    Unreadable(String),
    Changed(String),
}

impl ImageSet {
    /// Read, check against the split's hash, decode and presize every entry, in parallel.
    pub fn load(root: &Path, entries: &[Entry], presize: usize) -> ImageSet {
        let loaded: Vec<Loaded> = entries
            .par_iter()
            .map(|e| load_one(root, e, presize))
            .collect();
        let mut set = ImageSet {
            images: Vec::new(),
            labels: Vec::new(),
            paths: Vec::new(),
            skipped: Vec::new(),
            changed: Vec::new(),
            warnings: Vec::new(),
        };
        for (e, d) in entries.iter().zip(loaded) {
            match d {
                Loaded::Image(img, warning) => {
                    set.images.push(Arc::new(img));
                    set.labels.push(e.label);
                    set.paths.push(e.path.clone());
                    set.warnings.extend(warning);
                }
                Loaded::Unreadable(msg) => set.skipped.push(msg),
                Loaded::Changed(msg) => set.changed.push(msg),
            }
        }
        set
    }

    /// The number of images held (those that decoded).
    pub fn len(&self) -> usize {
        self.images.len()
    }

    /// Whether it holds no images.
    pub fn is_empty(&self) -> bool {
        self.images.is_empty()
    }
}

fn load_one(root: &Path, e: &Entry, presize: usize) -> Loaded {
    let path = root.join(&e.path);
    let bytes = match crate::preprocess::read_image_file(&path) {
        Ok(b) => b,
        Err(err) => return Loaded::Changed(format!("{err:#}")),
    };
    if sha256_hex(&bytes) != e.sha256 {
        return Loaded::Changed(format!("{}: content changed", path.display()));
    }
    match decode_bytes(&path, &bytes) {
        Ok(d) => Loaded::Image(shrink(d.image, presize), d.warning),
        Err(err) => Loaded::Unreadable(format!("{err:#}")),
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
    /// Normalised values, `[N, 3, input_size, input_size]` row-major.
    pub pixels: Vec<f32>,
    /// Class index of each image.
    pub labels: Vec<usize>,
    /// Index of each image in the [`ImageSet`].
    pub indices: Vec<usize>,
}

/// How to turn a stored image into network input.
#[derive(Clone, Copy)]
pub enum Transform {
    /// Random resized crop (area fraction from `min_scale` to 1) and flip, seeded per image
    /// so that runs are reproducible.
    Train {
        /// Seed of the augmentation, mixed with each image's index.
        seed: u64,
        /// Smallest area fraction of the crop (torchvision's `scale[0]`).
        min_scale: f64,
    },
    /// The model's eval transform (resize, centre crop), as in [`Preprocess::eval`].
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
) -> Batches {
    let (tx, rx) = sync_channel(2);
    let loader = std::thread::spawn(move || {
        for idx in order.chunks(batch_size.max(1)) {
            if tx.send(make_batch(&set, &pre, idx, transform)).is_err() {
                return;
            }
        }
    });
    Batches {
        rx,
        loader: Some(loader),
    }
}

/// The batches of [`batches`] in order; a failure of the loader thread ends them with an
/// error instead of a silently short epoch.
pub struct Batches {
    rx: Receiver<Batch>,
    loader: Option<std::thread::JoinHandle<()>>,
}

impl Iterator for Batches {
    type Item = anyhow::Result<Batch>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Ok(batch) = self.rx.recv() {
            return Some(Ok(batch));
        }
        let panic = self.loader.take()?.join().err()?;
        let message = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "no message".into());
        Some(Err(anyhow::anyhow!("the batch loader failed: {message}")))
    }
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
    fn a_failing_loader_ends_the_batches_with_its_error() {
        let set = Arc::new(ImageSet {
            images: vec![Arc::new(RgbImage::new(40, 40))],
            labels: vec![0],
            paths: vec![PathBuf::from("a.png")],
            skipped: Vec::new(),
            changed: Vec::new(),
            warnings: Vec::new(),
        });
        let pre = Preprocess::plain(32, 36);
        // Index 7 is past the set: the loader thread panics on the second batch.
        let mut batches = batches(set, pre, vec![0, 7], 1, Transform::Eval);
        assert!(batches.next().unwrap().is_ok());
        let Some(Err(err)) = batches.next() else {
            panic!("the second batch should be the loader's error");
        };
        let err = err.to_string();
        assert!(err.contains("the batch loader failed"), "{err}");
        assert!(batches.next().is_none());
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
