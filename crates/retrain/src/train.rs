//! `retrain train`: fine-tune a network on an image folder under a freezing regime, with the
//! usual machinery (augmentation, SGD/AdamW, LR schedules, progress bar, metrics, best and
//! last checkpoints, exact resume, Ctrl-C) and a freeze audit.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use burn::module::{Module, ParamId};
use burn::nn::loss::{CrossEntropyLoss, CrossEntropyLossConfig};
use burn::optim::{
    AdamWConfig, GradientsParams, ModuleOptimizer, SgdConfig, decay::WeightDecayConfig,
    momentum::MomentumConfig,
};
use burn::prelude::*;
use serde::{Deserialize, Serialize};

use crate::data::{self, ImageSet, Split, Transform};
pub use crate::error::{Interrupted, RunExists};
use crate::error::{Result, bail};
use crate::export::write_weights;
use crate::freeze::{self, FreezeSet, FrozenBn};
use crate::hub::WeightsRef;
use crate::job::Job;
use crate::load::{LoadOptions, LoadReport, load_pretrained, torch_tensors};
use crate::models::{Arch, Model, ModelSpec, PretrainedConfig, to_vec};
use crate::output::{read_json, write_atomic, write_json};
use crate::preprocess::Preprocess;
use crate::ranges;

/// The optimizer of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// SGD with momentum (PyTorch's semantics: no dampening, L2 weight decay).
    Sgd,
    /// AdamW (decoupled weight decay).
    Adamw,
}

impl OptimizerKind {
    /// Every value, for a command line's choices.
    pub const ALL: [OptimizerKind; 2] = [OptimizerKind::Sgd, OptimizerKind::Adamw];
}

/// The learning-rate schedule of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// Linear warmup, then cosine decay to zero.
    Cosine,
    /// Multiply by `--gamma` every `--step-size` epochs.
    Step,
    /// The same rate throughout.
    Constant,
}

impl Schedule {
    /// Every value, for a command line's choices.
    pub const ALL: [Schedule; 3] = [Schedule::Cosine, Schedule::Step, Schedule::Constant];
}

/// Every option of a run; written to `config.json` and read back on resume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainOptions {
    /// Architecture (detected from --weights when left out).
    pub arch: Option<Arch>,
    /// Pretrained checkpoint.
    pub weights: Option<PathBuf>,
    /// Train from random init (no weights).
    pub scratch: bool,
    /// Network width for --scratch: mobilenet_v2's multiplier, or a ResNet's base width / 64.
    pub width: Option<f64>,
    /// Dotted key of a nested state dict in the checkpoint.
    pub key: Option<String>,
    /// Image folder: one sub-folder per class, or `train/` and `val/` with those.
    pub data: Option<PathBuf>,
    /// What to freeze: `none`, `backbone`, module prefixes `a,b`, or a range `features.0-13`.
    pub freeze: String,
    /// Frozen BatchNorm layers: `eval` keeps their statistics fixed, `train` lets them move.
    pub frozen_bn: FrozenBn,
    /// Total epochs (on resume: the new total).
    pub epochs: usize,
    /// Images per optimisation step.
    pub batch_size: usize,
    /// Peak learning rate (default: 1e-3 for AdamW, 1e-2 for SGD).
    pub lr: Option<f64>,
    /// SGD or AdamW.
    pub optimizer: OptimizerKind,
    /// SGD momentum.
    pub momentum: f64,
    /// Nesterov momentum for SGD.
    pub nesterov: bool,
    /// Weight decay (decoupled for AdamW, L2 for SGD).
    pub weight_decay: f64,
    /// How the learning rate moves over the run.
    pub schedule: Schedule,
    /// Epochs of linear warmup (cosine schedule).
    pub warmup_epochs: usize,
    /// Step schedule: epochs between decays.
    pub step_size: usize,
    /// Step schedule: decay factor.
    pub gamma: f64,
    /// Learning-rate multiplier for the new head.
    pub head_lr_mult: f64,
    /// Layer-wise learning-rate decay (timm's `layer_decay`): each freeze group's rate is
    /// the head's times this per group of depth below it.
    #[serde(default)]
    pub layer_decay: Option<f64>,
    /// Train only the head until this epoch, then unfreeze to `--freeze` (fastai's fine_tune).
    pub unfreeze_at: Option<usize>,
    /// Label smoothing of the cross-entropy (0 = none).
    pub label_smoothing: f32,
    /// `auto` weights the loss by inverse class frequency.
    pub class_weights: Option<ClassWeights>,
    /// Smallest area fraction of RandomResizedCrop (torchvision: 0.08).
    pub crop_scale: f64,
    /// Square input side (default: the model's pretrained config).
    pub image_size: Option<usize>,
    /// Share of each class held out for validation (when `--data` has no `val/`).
    pub val_fraction: f64,
    /// Seeds the split, the data order, augmentation and the new head.
    pub seed: u64,
    /// Re-run the backbone every step even when it is wholly frozen.
    pub no_feature_cache: bool,
    /// Augmented views per image in the feature cache (the first is the eval view).
    pub cache_views: usize,
    /// Accept a checkpoint that does not match outside the head.
    pub allow_partial: bool,
}

impl Default for TrainOptions {
    /// The command line's defaults: AdamW, cosine schedule with one warmup epoch, 10 epochs
    /// of batch 32, nothing frozen.
    fn default() -> Self {
        Self {
            arch: None,
            weights: None,
            scratch: false,
            width: None,
            key: None,
            data: None,
            freeze: "none".into(),
            frozen_bn: FrozenBn::Eval,
            epochs: 10,
            batch_size: 32,
            lr: None,
            optimizer: OptimizerKind::Adamw,
            momentum: 0.9,
            nesterov: false,
            weight_decay: 1e-4,
            schedule: Schedule::Cosine,
            warmup_epochs: 1,
            step_size: 10,
            gamma: 0.1,
            head_lr_mult: 1.0,
            layer_decay: None,
            unfreeze_at: None,
            label_smoothing: 0.0,
            class_weights: None,
            crop_scale: 0.08,
            image_size: None,
            val_fraction: 0.1,
            seed: 0,
            no_feature_cache: false,
            cache_views: 1,
            allow_partial: false,
        }
    }
}

/// How to weight the loss per class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClassWeights {
    /// By inverse class frequency.
    Auto,
}

impl ClassWeights {
    /// Every value, for a command line's choices.
    pub const ALL: [ClassWeights; 1] = [ClassWeights::Auto];
}

/// One line of `metrics.jsonl` / `metrics.csv`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EpochMetrics {
    /// Epoch number, from 1.
    pub epoch: usize,
    /// Mean training loss per image (label smoothing and class weights included).
    pub train_loss: f64,
    /// Training top-1 accuracy on the epoch's augmented batches, as a fraction.
    pub train_acc: f64,
    /// Mean validation cross-entropy per image.
    pub val_loss: f64,
    /// Validation top-1 accuracy, as a fraction.
    pub val_top1: f64,
    /// Validation top-5 accuracy, as a fraction.
    pub val_top5: f64,
    /// Learning rate at the epoch's last step (before the head's multiplier).
    pub lr: f64,
    /// Wall-clock seconds of the epoch, validation included.
    pub epoch_seconds: f64,
    /// Training images per second, validation excluded.
    pub images_per_second: f64,
}

impl EpochMetrics {
    /// The one-line epoch summary printed after each epoch.
    fn line(&self, epochs: usize) -> String {
        format!(
            "epoch {:>3}/{epochs}  loss {:.4}  acc {:.3}  val_loss {:.4}  top1 {:.3}  top5 {:.3}  lr {:.2e}  {:.1}s  {:.1} img/s",
            self.epoch,
            self.train_loss,
            self.train_acc,
            self.val_loss,
            self.val_top1,
            self.val_top5,
            self.lr,
            self.epoch_seconds,
            self.images_per_second
        )
    }
}

/// `config.json`: the options, the model and its preprocessing, the classes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunConfig {
    /// The options the run was started with (epochs raised by any resume).
    pub options: TrainOptions,
    /// The network: architecture, variant and number of classes.
    pub model: ModelSpec,
    /// What a user of the trained weights needs to know (timm's `pretrained_cfg`).
    pub pretrained: PretrainedConfig,
    /// Input size, resizing and normalisation the network expects.
    pub preprocess: Preprocess,
    /// Class names, in the order of the head's outputs.
    pub classes: Vec<String>,
    /// SHA-256 of the pretrained checkpoint, so a comparison can tell it changed.
    #[serde(default)]
    pub weights_sha256: Option<String>,
}

impl RunConfig {
    /// A config read back from `file` that agrees with itself: as many classes as the
    /// network's head has outputs.
    pub fn check(&self, file: &Path) -> Result<()> {
        if self.classes.len() != self.model.num_classes {
            bail!(
                "{}: {} class names for a network with {} outputs",
                file.display(),
                self.classes.len(),
                self.model.num_classes
            );
        }
        Ok(())
    }
}

/// Progress that the `last` checkpoint carries besides weights and optimizer state. The
/// data order and augmentation are seeded by (seed, epoch), so the epoch is the RNG state.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RunState {
    epochs_done: usize,
    best_top1: f64,
    best_epoch: usize,
    history: Vec<EpochMetrics>,
    /// Checksums of the frozen tensors taken before the first epoch.
    frozen_checksums: BTreeMap<String, String>,
}

impl Default for RunState {
    fn default() -> Self {
        Self {
            epochs_done: 0,
            best_top1: -1.0,
            best_epoch: 0,
            history: Vec::new(),
            frozen_checksums: BTreeMap::new(),
        }
    }
}

impl RunState {
    /// Is the epoch just recorded the best so far? Best = highest val top-1, ties going to
    /// the lower val loss (small val sets tie often); without validation images, the last.
    fn is_best(&self, no_validation: bool) -> bool {
        let Some(latest) = self.history.last() else {
            return false;
        };
        if no_validation {
            return true;
        }
        let best_loss = self
            .history
            .get(self.best_epoch.wrapping_sub(1))
            .map_or(f64::INFINITY, |m| m.val_loss);
        latest.val_top1 > self.best_top1
            || (latest.val_top1 == self.best_top1 && latest.val_loss < best_loss)
    }
}

/// `summary.json` of a finished run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunSummary {
    /// Architecture name.
    pub architecture: String,
    /// The `--freeze` spec trained with.
    pub freeze: String,
    /// Whether it trained from random initialisation.
    pub scratch: bool,
    /// Epochs trained.
    pub epochs: usize,
    /// Validation top-1 of the best epoch, as a fraction.
    pub best_top1: f64,
    /// The best epoch, from 1, whose weights are `best.safetensors`.
    pub best_epoch: usize,
    /// What "best" means for this run: the highest validation top-1, or the last epoch
    /// when there were no validation images.
    #[serde(default)]
    pub best_means: String,
    /// Validation top-1 of the last epoch, as a fraction.
    pub final_top1: f64,
    /// Parameters the optimiser updated (under the final freeze).
    pub trainable_params: usize,
    /// Parameters held fixed (under the final freeze).
    pub frozen_params: usize,
    /// Tensors the freeze audit checked.
    pub frozen_tensors: usize,
    /// Whether every frozen tensor came out unchanged (a failed audit is an error).
    pub freeze_audit_passed: bool,
    /// Whether the last epochs trained the head alone, on cached backbone features.
    pub feature_cache: bool,
    /// With `--layer-decay`: each trainable freeze group's learning-rate scale (under the
    /// final freeze; frozen groups are absent).
    #[serde(default)]
    pub lr_scales: Vec<LrScale>,
    /// Training images that decoded.
    pub train_images: usize,
    /// Validation images that decoded.
    pub val_images: usize,
    /// Files that could not be decoded, with the reason.
    pub skipped_images: Vec<String>,
    /// Validation images whose content is also in train, as `val = train`.
    pub leaked_images: Vec<String>,
    /// Wall-clock seconds of this training process, setup included (a resume counts only itself).
    pub wall_seconds: f64,
    /// Training images per second, averaged over epochs.
    pub train_images_per_second: f64,
    /// Peak resident memory of the process (`VmHWM`), in MiB.
    pub peak_memory_mib: f64,
}

/// The files and folders of a run: what [`holds_run`] looks for and [`remove_run`] removes.
const RUN_FILES: [&str; 12] = [
    "config.json",
    "load_report.json",
    "split.json",
    "metrics.csv",
    "metrics.jsonl",
    "best.safetensors",
    "summary.json",
    "eval.json",
    "confusion.png",
    "last",
    "last.tmp",
    "last.old",
];

/// Does `dir` hold a run, or part of one?
pub fn holds_run(dir: &Path) -> bool {
    RUN_FILES.iter().any(|f| dir.join(f).exists())
}

/// Remove a run's files from `dir`, and nothing else that is there, to start over.
pub fn remove_run(dir: &Path) -> Result<()> {
    for name in RUN_FILES {
        let path = dir.join(name);
        let removed = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else if path.exists() {
            std::fs::remove_file(&path)
        } else {
            Ok(())
        };
        removed.with_context(|| format!("{}: cannot remove", path.display()))?;
    }
    remove_orphan_temporaries(dir);
    Ok(())
}

impl TrainOptions {
    /// The ranges that the command line enforces, for options built in code; an error names
    /// the flag.
    pub fn validate(&self) -> Result<()> {
        use ranges::*;
        let optional = |value: Option<f64>, check: Check<f64>| value.map_or(Ok(0.0), check);
        let checks: [(&str, Result<f64, String>); 16] = [
            (
                "batch-size",
                check_within(self.batch_size, BATCH_SIZES).map(|n| n as f64),
            ),
            ("epochs", check_at_least_one(self.epochs).map(|n| n as f64)),
            ("lr", optional(self.lr, check_positive)),
            ("momentum", check_fraction(self.momentum)),
            ("weight-decay", check_non_negative(self.weight_decay)),
            (
                "step-size",
                check_at_least_one(self.step_size).map(|n| n as f64),
            ),
            ("gamma", check_positive(self.gamma)),
            ("head-lr-mult", check_positive(self.head_lr_mult)),
            ("layer-decay", optional(self.layer_decay, check_share)),
            (
                "label-smoothing",
                check_fraction(self.label_smoothing as f64),
            ),
            ("crop-scale", check_share(self.crop_scale)),
            ("val-fraction", check_fraction(self.val_fraction)),
            (
                "cache-views",
                check_within(self.cache_views, CACHE_VIEWS).map(|n| n as f64),
            ),
            ("width", optional(self.width, check_width)),
            (
                "image-size",
                self.image_size
                    .map_or(Ok(0), check_image_size)
                    .map(|n| n as f64),
            ),
            (
                "unfreeze-at",
                self.unfreeze_at
                    .map_or(Ok(1), check_at_least_one)
                    .map(|n| n as f64),
            ),
        ];
        for (flag, result) in checks {
            result.map_err(|e| anyhow::anyhow!("--{flag}: {e}"))?;
        }
        Ok(())
    }

    fn data_dir(&self) -> anyhow::Result<&Path> {
        self.data.as_deref().context("--data DIR is required")
    }
}

/// What starting a run does with a run already in its folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    /// Refuse with [`RunExists`].
    Refuse,
    /// Remove its files, once everything about the new run has been checked.
    Replace,
}

/// Start a new run in `out` on a split of `options.data`.
pub fn train(
    options: &TrainOptions,
    out: &Path,
    existing: Existing,
    job: &Job,
) -> Result<RunSummary> {
    options.validate()?;
    if existing == Existing::Refuse && holds_run(out) {
        bail!(RunExists(out.display().to_string()));
    }
    let split = Split::make(options.data_dir()?, options.val_fraction, options.seed)?;
    train_on_split(options, out, split, existing, job)
}

/// [`train`] on a given split (a comparison gives every regime the same one). Everything
/// is checked and loaded before the first file is written.
pub fn train_on_split(
    options: &TrainOptions,
    out: &Path,
    split: Split,
    existing: Existing,
    job: &Job,
) -> Result<RunSummary> {
    let started = Instant::now();
    options.validate()?;
    if existing == Existing::Refuse && holds_run(out) {
        bail!(RunExists(out.display().to_string()));
    }
    for warning in &split.warnings {
        job.observer.warning(warning);
    }
    if split.classes.len() < 2 {
        bail!(
            "{}: only one class folder ({}); a classifier needs at least two",
            options.data_dir()?.display(),
            split.classes.join(", ")
        );
    }
    let device = job.device.clone().autodiff();
    // The seed also fixes the new head's initial weights.
    device.seed(options.seed);
    let Start {
        network,
        report,
        weights_sha256,
    } = build_model(options, split.classes.len(), &device, job)?;
    let session = Session::new(options.clone(), split, job, network)?;
    if holds_run(out) {
        remove_run(out)?;
        job.observer
            .notice(&format!("removed the run that was in {}", out.display()));
    }
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create", out.display()))?;
    write_json(&out.join("split.json"), &session.split)?;
    if let Some(report) = &report {
        job.observer.notice(&report.to_string());
        write_json(&out.join("load_report.json"), report)?;
    }
    let config = RunConfig {
        weights_sha256,
        ..session.config()
    };
    write_json(&out.join("config.json"), &config)?;
    let optimizers = Optimizers::new(options);
    Ok(session.run(out, RunState::default(), optimizers, started)?)
}

/// Continue the run in `out` from its last finished epoch with the settings in its
/// `config.json`; `epochs` (more than it has done) extends it.
pub fn resume(out: &Path, epochs: Option<usize>, job: &Job) -> Result<RunSummary> {
    let started = Instant::now();
    let config_path = out.join("config.json");
    let config: RunConfig = read_json(&config_path)?;
    config.check(&config_path)?;
    let mut options = config.options.clone();
    restore_last(out)?;
    let last = out.join("last");
    let state_path = last.join("state.json");
    if !state_path.exists() {
        bail!(
            "{}: missing, so there is nothing to resume (the run stopped before it finished an epoch); start over with --overwrite",
            state_path.display()
        );
    }
    let state: RunState = read_json(&state_path)?;
    if let Some(epochs) = epochs {
        if epochs < state.epochs_done {
            bail!(
                "--epochs {epochs}: the run has already trained {} epochs",
                state.epochs_done
            );
        }
        options.epochs = epochs;
    }
    // A run that finished its epochs but not its summary (killed in between) only finishes.
    if state.epochs_done >= options.epochs && out.join("summary.json").exists() {
        bail!(
            "{}: the run has finished its {} epochs; pass --epochs N to extend it",
            out.display(),
            state.epochs_done
        );
    }
    options
        .validate()
        .with_context(|| format!("{}", config_path.display()))?;
    let split_path = out.join("split.json");
    let split = read_json::<Split>(&split_path)?.check(&split_path)?;
    if split.classes != config.classes {
        bail!(
            "{}: its classes do not match those of config.json",
            split_path.display()
        );
    }
    remove_orphan_temporaries(out);
    let device = job.device.clone().autodiff();
    device.seed(options.seed);
    let model = config
        .model
        .build(&device)
        .try_load_file(last.join("model.bpk"))
        .map_err(|e| anyhow::anyhow!("{}: cannot load: {e}", last.join("model.bpk").display()))?;
    let network = Network {
        model,
        spec: config.model.clone(),
        pretrained: config.pretrained.clone(),
    };
    let session = Session::new(options.clone(), split, job, network)?;
    let optimizers = Optimizers::new(&options).load(&last)?;
    if options.epochs != config.options.epochs {
        let extended = RunConfig {
            options: options.clone(),
            ..config
        };
        write_json(&config_path, &extended)?;
    }
    job.observer.notice(&format!(
        "resuming {} after epoch {}",
        out.display(),
        state.epochs_done
    ));
    Ok(session.run(out, state, optimizers, started)?)
}

/// After a crash during the swap in [`save_last`], `last.old` is the checkpoint.
fn restore_last(out: &Path) -> anyhow::Result<()> {
    let (last, old) = (out.join("last"), out.join("last.old"));
    if !last.join("state.json").exists() && old.join("state.json").exists() {
        let _ = std::fs::remove_dir_all(&last);
        std::fs::rename(&old, &last)
            .with_context(|| format!("{}: cannot restore", old.display()))?;
    }
    Ok(())
}

/// Temporary files that a kill during an atomic write left behind.
fn remove_orphan_temporaries(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if crate::output::is_temporary(&entry.path()) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// A run about to train: options, network, preprocessing, split and decoded images, all
/// checked; nothing written yet.
struct Session<'a> {
    options: TrainOptions,
    job: Job<'a>,
    /// The job's device with autodiff, for training.
    device: Device,
    model: Model,
    spec: ModelSpec,
    pretrained: PretrainedConfig,
    preprocess: Preprocess,
    split: Split,
    train_set: Arc<ImageSet>,
    val_set: Arc<ImageSet>,
    final_set: FreezeSet,
    head_set: FreezeSet,
}

impl<'a> Session<'a> {
    fn new(
        options: TrainOptions,
        split: Split,
        job: &Job<'a>,
        network: Network,
    ) -> anyhow::Result<Self> {
        let Network {
            model,
            spec,
            pretrained,
        } = network;
        let data_dir = options.data_dir()?;
        let final_set = freeze::parse_spec(&options.freeze, &spec, &model)?;
        let head_set = freeze::parse_spec("backbone", &spec, &model)?;
        let mut preprocess = pretrained.preprocess.clone();
        if let Some(size) = options.image_size {
            let ratio = preprocess.resize_size as f64 / preprocess.input_size as f64;
            preprocess.input_size = size;
            preprocess.resize_size = (size as f64 * ratio).round() as usize;
        }
        // Images decoded once, presized to what the transforms need.
        let presize = preprocess.resize_size.max(preprocess.input_size);
        let train_set = ImageSet::load(data_dir, &split.train, presize);
        let val_set = ImageSet::load(data_dir, &split.val, presize);
        let changed: Vec<String> = train_set
            .changed
            .iter()
            .chain(&val_set.changed)
            .cloned()
            .collect();
        if !changed.is_empty() {
            bail!(
                "{}: {} image(s) of the split are missing or changed since it was made: {}",
                data_dir.display(),
                changed.len(),
                data::first_ten(&changed)
            );
        }
        let observer = job.observer;
        for warning in train_set.warnings.iter().chain(&val_set.warnings) {
            observer.warning(warning);
        }
        for skipped in train_set.skipped.iter().chain(&val_set.skipped) {
            observer.warning(&format!("skipping unreadable image {skipped}"));
        }
        for (label, name) in split.classes.iter().enumerate() {
            if !train_set.labels.contains(&label) {
                bail!("class '{name}' has no readable training images");
            }
        }
        if val_set.is_empty() {
            observer.warning(
                "no validation images (--val-fraction 0, or classes of one image); \"best\" will be the last epoch",
            );
        }
        for leak in &split.leaked {
            observer.warning(&format!("the same image is in train and val: {leak}"));
        }
        Ok(Self {
            options,
            job: job.clone(),
            device: job.device.clone().autodiff(),
            model,
            spec,
            pretrained,
            preprocess,
            split,
            train_set: Arc::new(train_set),
            val_set: Arc::new(val_set),
            final_set,
            head_set,
        })
    }

    fn config(&self) -> RunConfig {
        RunConfig {
            options: self.options.clone(),
            model: self.spec.clone(),
            pretrained: self.pretrained.clone(),
            preprocess: self.preprocess.clone(),
            classes: self.split.classes.clone(),
            weights_sha256: None,
        }
    }

    fn phase_set(&self, epoch: usize) -> &FreezeSet {
        match self.options.unfreeze_at {
            Some(at) if epoch < at => &self.head_set,
            _ => &self.final_set,
        }
    }

    /// Train from `state` to the last epoch, checkpointing each one, then audit the frozen
    /// tensors and write `summary.json`.
    fn run(
        self,
        out: &Path,
        mut state: RunState,
        mut optimizers: Optimizers,
        started: Instant,
    ) -> anyhow::Result<RunSummary> {
        let options = &self.options;
        let observer = self.job.observer;
        let (device, spec, preprocess) = (&self.device, &self.spec, &self.preprocess);
        let (train_set, val_set) = (&self.train_set, &self.val_set);
        let mut model = freeze::apply(
            self.model.clone(),
            self.phase_set(state.epochs_done),
            options.frozen_bn,
        );
        if state.epochs_done == 0 {
            state.frozen_checksums = freeze::checksums(&model, &self.final_set, options.frozen_bn);
        }
        let loss_weights = options
            .class_weights
            .map(|_| inverse_frequency(&train_set.labels, self.split.classes.len()));
        let smoothing = (options.label_smoothing > 0.0).then_some(options.label_smoothing);
        let criterion = CrossEntropyLossConfig::new()
            .with_smoothing(smoothing)
            .with_weights(loss_weights)
            .init(device);

        let mut cache: Option<FeatureCache> = None;
        let steps_per_epoch = train_set.len().div_ceil(options.batch_size).max(1);
        let head_ids = head_param_ids(&model);
        for epoch in state.epochs_done..options.epochs {
            let set = self.phase_set(epoch);
            if epoch > 0 && set != self.phase_set(epoch - 1) {
                observer.notice(&format!(
                    "epoch {}: unfreezing to --freeze {}",
                    epoch + 1,
                    options.freeze
                ));
                model = freeze::apply(model, set, options.frozen_bn);
                cache = None;
            }
            let use_cache = !options.no_feature_cache
                && options.frozen_bn == FrozenBn::Eval
                && set.is_whole_backbone(spec, &model);
            if use_cache && cache.is_none() {
                cache = Some(FeatureCache::build(
                    &model, train_set, val_set, preprocess, options, &self.job,
                )?);
            }
            let decay = options
                .layer_decay
                .map_or(Vec::new(), |d| layer_decay_groups(spec, &model, set, d));
            device.seed(options.seed.wrapping_add(epoch as u64));
            let epoch_start = Instant::now();
            let ctx = StepContext {
                options,
                epoch,
                steps_per_epoch,
                criterion: &criterion,
                head_ids: &head_ids,
                decay: &decay,
                device,
                job: &self.job,
            };
            let label = format!("epoch {}/{}", epoch + 1, options.epochs);
            observer.task_started(&label, train_set.len() as u64);
            let (new_model, train_loss, train_acc, lr) = match (&cache, use_cache) {
                (Some(c), true) => train_epoch_cached(model, &mut optimizers, c, &ctx)?,
                _ => train_epoch(model, &mut optimizers, train_set, preprocess, &ctx)?,
            };
            model = new_model;
            observer.task_finished();
            if self.job.cancellation.is_cancelled() {
                bail!(Interrupted(out.display().to_string()));
            }
            let train_seconds = epoch_start.elapsed().as_secs_f64();
            let (val_loss, val_top1, val_top5) = match (&cache, use_cache) {
                (Some(c), true) => evaluate_cached(&model, c, self.job.device)?,
                _ => evaluate(
                    &model,
                    val_set,
                    preprocess,
                    options.batch_size,
                    self.job.device,
                )?,
            };
            if !val_loss.is_finite() {
                bail!(
                    "the validation loss became {val_loss} at epoch {}; stopping (the last good checkpoint is kept). Try a lower --lr",
                    epoch + 1
                );
            }
            let metrics = EpochMetrics {
                epoch: epoch + 1,
                train_loss,
                train_acc,
                val_loss,
                val_top1,
                val_top5,
                lr,
                epoch_seconds: epoch_start.elapsed().as_secs_f64(),
                images_per_second: train_set.len() as f64 / train_seconds,
            };
            observer.line(&metrics.line(options.epochs));
            state.history.push(metrics);
            state.epochs_done = epoch + 1;
            if state.is_best(val_set.is_empty()) {
                state.best_top1 = val_top1;
                state.best_epoch = epoch + 1;
                write_weights(&out.join("best.safetensors"), &model)?;
            }
            write_metrics(out, &state.history)?;
            save_last(out, &model, &optimizers, &state)?;
        }
        self.finish(out, &model, &state, cache.is_some(), started)
    }

    /// The freeze audit and `summary.json`.
    fn finish(
        &self,
        out: &Path,
        model: &Model,
        state: &RunState,
        feature_cache: bool,
        started: Instant,
    ) -> anyhow::Result<RunSummary> {
        let options = &self.options;
        let after = freeze::checksums(model, &self.final_set, options.frozen_bn);
        let changed = freeze::audit(&state.frozen_checksums, &after);
        if !changed.is_empty() {
            bail!(
                "freeze audit FAILED: {} frozen tensor(s) changed during training, first: {}",
                changed.len(),
                changed[0]
            );
        }
        let (trainable, frozen) = param_counts(model, &self.final_set);
        let lr_scales = options.layer_decay.map_or(Vec::new(), |d| {
            let groups = layer_decay_groups(&self.spec, model, &self.final_set, d);
            groups.into_iter().map(|g| g.scale).collect()
        });
        let summary = RunSummary {
            architecture: self.spec.arch.to_string(),
            freeze: options.freeze.clone(),
            scratch: options.scratch,
            epochs: state.epochs_done,
            best_top1: state.best_top1,
            best_epoch: state.best_epoch,
            best_means: if self.val_set.is_empty() {
                "the last epoch (no validation images)".into()
            } else {
                "the highest validation top-1 (ties: the lower validation loss)".into()
            },
            final_top1: state.history.last().map_or(0.0, |m| m.val_top1),
            trainable_params: trainable,
            frozen_params: frozen,
            frozen_tensors: state.frozen_checksums.len(),
            freeze_audit_passed: true,
            feature_cache,
            lr_scales,
            train_images: self.train_set.len(),
            val_images: self.val_set.len(),
            skipped_images: self
                .train_set
                .skipped
                .iter()
                .chain(&self.val_set.skipped)
                .cloned()
                .collect(),
            leaked_images: self.split.leaked.clone(),
            wall_seconds: started.elapsed().as_secs_f64(),
            train_images_per_second: {
                let h = &state.history;
                h.iter().map(|m| m.images_per_second).sum::<f64>() / h.len().max(1) as f64
            },
            peak_memory_mib: peak_memory_mib(),
        };
        write_json(&out.join("summary.json"), &summary)?;
        self.job.observer.line(&format!(
            "best val top-1 {:.3} at epoch {}; frozen: {} tensors ({} params), trainable params {}; freeze audit passed; {} skipped images",
            summary.best_top1,
            summary.best_epoch,
            summary.frozen_tensors,
            summary.frozen_params,
            summary.trainable_params,
            summary.skipped_images.len()
        ));
        Ok(summary)
    }
}

/// A network to train with its spec and the configuration of its weights.
struct Network {
    model: Model,
    spec: ModelSpec,
    pretrained: PretrainedConfig,
}

/// A new run's network, built from scratch or loaded from the pretrained weights (with
/// the load report and the checkpoint's SHA-256).
struct Start {
    network: Network,
    report: Option<LoadReport>,
    weights_sha256: Option<String>,
}

fn build_model(
    options: &TrainOptions,
    num_classes: usize,
    device: &Device,
    job: &Job,
) -> anyhow::Result<Start> {
    if options.scratch || options.weights.is_none() {
        if !options.scratch {
            bail!("pass --weights FILE_OR_NAME, or --scratch to train from random init");
        }
        let arch = options.arch.context("--scratch needs --arch")?;
        let mut spec = ModelSpec::new(arch, num_classes);
        if let Some(width) = options.width {
            spec = spec.with_width(width);
        }
        return Ok(Start {
            network: Network {
                model: spec.build(device),
                pretrained: spec.pretrained_config(None),
                spec,
            },
            report: None,
            weights_sha256: None,
        });
    }
    let text = options.weights.as_deref().expect("checked above");
    let resolved = WeightsRef::parse(text).resolve(&job.hub, job.observer)?;
    let loaded = load_pretrained(
        &resolved.path,
        &LoadOptions {
            arch: options.arch,
            num_classes: Some(num_classes),
            key: options.key.clone(),
            allow_partial: options.allow_partial,
        },
        device,
    )?;
    Ok(Start {
        network: Network {
            pretrained: loaded.spec.pretrained_config(resolved.weights),
            model: loaded.model,
            spec: loaded.spec,
        },
        report: Some(loaded.report),
        weights_sha256: Some(resolved.sha256()?),
    })
}

/// A freeze group's learning-rate scale under `--layer-decay`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LrScale {
    /// The group's name (`block3`).
    pub group: String,
    /// Its learning rate over the run's.
    pub scale: f64,
}

/// The trainable parameters of one freeze group and their learning-rate scale.
struct DecayGroup {
    scale: LrScale,
    ids: Vec<ParamId>,
}

/// timm's layer-wise decay over the family's freeze groups: a group's depth is its place
/// from the stem, except that the groups after the last numbered one (`layer4`, `block11`;
/// then a final norm, `pre_logits`, the head) share the top depth, as timm gives
/// everything after the blocks the last layer id; the scale is `decay^(top - depth)`.
/// Groups without trainable parameters under `frozen` are left out.
fn layer_decay_groups(
    spec: &ModelSpec,
    model: &Model,
    frozen: &FreezeSet,
    decay: f64,
) -> Vec<DecayGroup> {
    let groups = spec.family.freeze_groups();
    let numbered = |name: &str| name.ends_with(|c: char| c.is_ascii_digit());
    let top = groups
        .iter()
        .rposition(|g| numbered(&g.name))
        .map_or(0, |i| i + 1);
    groups
        .iter()
        .enumerate()
        .filter_map(|(i, g)| {
            let ids = freeze::trainable_ids(model, &g.modules, frozen);
            let scale = decay.powi((top - i.min(top)) as i32);
            (!ids.is_empty()).then(|| DecayGroup {
                scale: LrScale {
                    group: g.name.clone(),
                    scale,
                },
                ids,
            })
        })
        .collect()
}

/// Two optimizers so the head can take a larger learning rate (`--head-lr-mult`).
struct Optimizers {
    head: ModuleOptimizer,
    body: ModuleOptimizer,
}

impl Optimizers {
    fn new(options: &TrainOptions) -> Self {
        let make = || match options.optimizer {
            OptimizerKind::Sgd => SgdConfig::new()
                .with_momentum(Some(
                    MomentumConfig::new()
                        .with_momentum(options.momentum)
                        .with_dampening(0.0)
                        .with_nesterov(options.nesterov),
                ))
                .with_weight_decay(
                    (options.weight_decay > 0.0)
                        .then(|| WeightDecayConfig::new(options.weight_decay as f32)),
                )
                .init(),
            OptimizerKind::Adamw => AdamWConfig::new()
                .with_epsilon(1e-8)
                .with_weight_decay(options.weight_decay as f32)
                .init(),
        };
        Self {
            head: make(),
            body: make(),
        }
    }

    fn load(self, dir: &Path) -> anyhow::Result<Self> {
        let err = |e| anyhow::anyhow!("{}: cannot load optimizer state: {e}", dir.display());
        Ok(Self {
            head: self.head.load(dir.join("optim_head.bpk")).map_err(err)?,
            body: self.body.load(dir.join("optim_body.bpk")).map_err(err)?,
        })
    }

    fn save(&self, dir: &Path) -> anyhow::Result<()> {
        let err = |e| anyhow::anyhow!("{}: cannot save optimizer state: {e}", dir.display());
        self.head.save(dir.join("optim_head.bpk")).map_err(err)?;
        self.body.save(dir.join("optim_body.bpk")).map_err(err)
    }

    /// One step: the head at `lr * head_mult`, each layer-decay group at its scale, the
    /// rest at `lr`. Every gradient is taken before any parameter moves.
    fn step(
        &mut self,
        model: Model,
        loss: Tensor<1>,
        head_ids: &[ParamId],
        decay: &[DecayGroup],
        (lr, head_mult): (f64, f64),
    ) -> Model {
        let mut grads = loss.backward();
        let head = GradientsParams::from_params(&mut grads, &model, head_ids);
        let decayed: Vec<(f64, GradientsParams)> = decay
            .iter()
            .filter(|g| g.scale.scale != 1.0)
            .map(|g| {
                let ids: Vec<ParamId> = g
                    .ids
                    .iter()
                    .filter(|id| !head_ids.contains(id))
                    .copied()
                    .collect();
                (
                    g.scale.scale,
                    GradientsParams::from_params(&mut grads, &model, &ids),
                )
            })
            .collect();
        let body = GradientsParams::from_grads(grads, &model);
        let mut model = self.head.step(lr * head_mult, model, head);
        for (scale, grads) in decayed {
            model = self.body.step(lr * scale, model, grads);
        }
        self.body.step(lr, model, body)
    }
}

fn head_param_ids(model: &Model) -> Vec<ParamId> {
    let linear = model.head();
    let mut ids = vec![linear.weight.id];
    ids.extend(linear.bias.as_ref().map(|b| b.id));
    ids
}

fn default_lr(options: &TrainOptions) -> f64 {
    options.lr.unwrap_or(match options.optimizer {
        OptimizerKind::Adamw => 1e-3,
        OptimizerKind::Sgd => 1e-2,
    })
}

/// Learning rate at `step` (0-based over the whole run).
fn learning_rate(options: &TrainOptions, step: usize, steps_per_epoch: usize) -> f64 {
    let base = default_lr(options);
    let epoch = step / steps_per_epoch.max(1);
    match options.schedule {
        Schedule::Constant => base,
        Schedule::Step => {
            base * options
                .gamma
                .powi((epoch / options.step_size.max(1)) as i32)
        }
        Schedule::Cosine => {
            let warmup =
                options.warmup_epochs.min(options.epochs.saturating_sub(1)) * steps_per_epoch;
            let total = options.epochs * steps_per_epoch;
            if step < warmup {
                base * (step + 1) as f64 / warmup as f64
            } else {
                let t = (step - warmup) as f64 / (total - warmup).max(1) as f64;
                base * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
            }
        }
    }
}

struct StepContext<'a> {
    options: &'a TrainOptions,
    epoch: usize,
    steps_per_epoch: usize,
    criterion: &'a CrossEntropyLoss,
    head_ids: &'a [ParamId],
    decay: &'a [DecayGroup],
    device: &'a Device,
    job: &'a Job<'a>,
}

impl StepContext<'_> {
    fn loss(&self, logits: Tensor<2>, labels: &[usize]) -> anyhow::Result<(Tensor<1>, f64, usize)> {
        let targets = Tensor::<1, Int>::from_data(
            TensorData::new(
                labels.iter().map(|&l| l as i64).collect::<Vec<_>>(),
                [labels.len()],
            ),
            self.device,
        );
        let correct = count_correct(&logits, labels)?;
        let loss = self.criterion.forward(logits, targets);
        let value: f64 = loss.clone().into_scalar::<f32>() as f64;
        if !value.is_finite() {
            bail!(
                "the loss became {value} at epoch {}; stopping (the last good checkpoint is kept). Try a lower --lr",
                self.epoch + 1
            );
        }
        Ok((loss, value, correct))
    }
}

/// Running totals of an epoch.
#[derive(Default)]
struct EpochTotals {
    loss_sum: f64,
    correct: usize,
    seen: usize,
    lr: f64,
}

impl EpochTotals {
    fn finish(self, model: Model) -> EpochResult {
        let seen = self.seen.max(1) as f64;
        Ok((
            model,
            self.loss_sum / seen,
            self.correct as f64 / seen,
            self.lr,
        ))
    }
}

impl StepContext<'_> {
    /// One optimisation step from a batch's logits (step `i` of the epoch).
    #[allow(clippy::too_many_arguments)]
    fn step(
        &self,
        model: Model,
        logits: Tensor<2>,
        labels: &[usize],
        i: usize,
        optimizers: &mut Optimizers,
        totals: &mut EpochTotals,
    ) -> anyhow::Result<Model> {
        let (loss, value, correct) = self.loss(logits, labels)?;
        let step = self.epoch * self.steps_per_epoch + i;
        totals.lr = learning_rate(self.options, step, self.steps_per_epoch);
        let mult = self.options.head_lr_mult;
        let model = optimizers.step(model, loss, self.head_ids, self.decay, (totals.lr, mult));
        totals.loss_sum += value * labels.len() as f64;
        totals.correct += correct;
        totals.seen += labels.len();
        self.job.observer.task_advanced(
            labels.len() as u64,
            &format!(
                "loss {:.4} acc {:.3}",
                totals.loss_sum / totals.seen as f64,
                totals.correct as f64 / totals.seen as f64
            ),
        );
        Ok(model)
    }
}

fn count_correct(logits: &Tensor<2>, labels: &[usize]) -> anyhow::Result<usize> {
    let values = to_vec(logits.clone())?;
    let classes = logits.dims()[1];
    Ok(values
        .chunks(classes)
        .zip(labels)
        .filter(|(row, label)| rank(row, **label) == 0)
        .count())
}

type EpochResult = anyhow::Result<(Model, f64, f64, f64)>;

fn train_epoch(
    mut model: Model,
    optimizers: &mut Optimizers,
    set: &Arc<ImageSet>,
    pre: &Preprocess,
    ctx: &StepContext,
) -> EpochResult {
    let opts = ctx.options;
    let mut order = data::epoch_order(set.len(), opts.seed, ctx.epoch);
    // Drop the last partial batch (timm's drop_last): a batch of one would give train-mode
    // BatchNorm a zero variance and wreck its statistics.
    if order.len() > opts.batch_size {
        order.truncate(order.len() / opts.batch_size * opts.batch_size);
    }
    let seed = opts.seed.wrapping_mul(31).wrapping_add(ctx.epoch as u64);
    let batches = data::batches(
        set.clone(),
        pre.clone(),
        order,
        opts.batch_size,
        Transform::Train {
            seed,
            min_scale: opts.crop_scale,
        },
    );
    let mut totals = EpochTotals::default();
    let size = pre.input_size;
    for (i, batch) in batches.enumerate() {
        if ctx.job.cancellation.is_cancelled() {
            break;
        }
        let batch = batch?;
        let n = batch.labels.len();
        let x = Tensor::<4>::from_data(
            TensorData::new(batch.pixels, [n, 3, size, size]),
            ctx.device,
        );
        let logits = model.forward(x);
        model = ctx.step(model, logits, &batch.labels, i, optimizers, &mut totals)?;
    }
    totals.finish(model)
}

/// Pooled backbone outputs computed once: `views` per training image (the first with the
/// eval transform, the rest augmented) and one per validation image.
struct FeatureCache {
    dim: usize,
    train: Vec<Vec<Vec<f32>>>,
    train_labels: Vec<usize>,
    val: Vec<Vec<f32>>,
    val_labels: Vec<usize>,
}

impl FeatureCache {
    fn build(
        model: &Model,
        train: &Arc<ImageSet>,
        val: &Arc<ImageSet>,
        pre: &Preprocess,
        options: &TrainOptions,
        job: &Job,
    ) -> anyhow::Result<Self> {
        let eval_model = model.for_inference();
        let views = options.cache_views.max(1);
        let observer = job.observer;
        observer.task_started(
            "caching features",
            ((train.len() * views) + val.len()) as u64,
        );
        let embed = |set: &Arc<ImageSet>, transform: Transform| -> anyhow::Result<Vec<Vec<f32>>> {
            let order: Vec<usize> = (0..set.len()).collect();
            let mut out = Vec::with_capacity(set.len());
            let size = pre.input_size;
            for batch in data::batches(
                set.clone(),
                pre.clone(),
                order,
                options.batch_size,
                transform,
            ) {
                let batch = batch?;
                let n = batch.labels.len();
                let x = Tensor::<4>::from_data(
                    TensorData::new(batch.pixels, [n, 3, size, size]),
                    job.device,
                );
                let e = to_vec(eval_model.embed(x))?;
                let d = e.len() / n;
                out.extend(e.chunks(d).map(<[f32]>::to_vec));
                observer.task_advanced(n as u64, "");
            }
            Ok(out)
        };
        let mut per_view = vec![embed(train, Transform::Eval)?];
        for v in 1..views {
            let seed = options.seed.wrapping_mul(7919).wrapping_add(v as u64);
            per_view.push(embed(
                train,
                Transform::Train {
                    seed,
                    min_scale: options.crop_scale,
                },
            )?);
        }
        let val_emb = embed(val, Transform::Eval)?;
        observer.task_finished();
        let dim = per_view[0].first().map_or(0, Vec::len);
        let train_views = (0..train.len())
            .map(|i| per_view.iter().map(|v| v[i].clone()).collect())
            .collect();
        Ok(Self {
            dim,
            train: train_views,
            train_labels: train.labels.clone(),
            val: val_emb,
            val_labels: val.labels.clone(),
        })
    }
}

fn train_epoch_cached(
    mut model: Model,
    optimizers: &mut Optimizers,
    cache: &FeatureCache,
    ctx: &StepContext,
) -> EpochResult {
    let opts = ctx.options;
    let order = data::epoch_order(cache.train.len(), opts.seed, ctx.epoch);
    let mut totals = EpochTotals::default();
    let views = cache.train.first().map_or(1, Vec::len);
    for (i, idx) in order.chunks(opts.batch_size).enumerate() {
        if ctx.job.cancellation.is_cancelled() {
            break;
        }
        let n = idx.len();
        let mut features = Vec::with_capacity(n * cache.dim);
        for &j in idx {
            // Cycle through the views epoch by epoch.
            features.extend_from_slice(&cache.train[j][(ctx.epoch + j) % views]);
        }
        let labels: Vec<usize> = idx.iter().map(|&j| cache.train_labels[j]).collect();
        let x = Tensor::<2>::from_data(TensorData::new(features, [n, cache.dim]), ctx.device);
        let logits = model.forward_head(x);
        model = ctx.step(model, logits, &labels, i, optimizers, &mut totals)?;
    }
    totals.finish(model)
}

/// Where `label` ranks in a row of logits: how many classes come before it, ties going to
/// the lower class index. Rank 0 is exactly "[`argmax`] is the label", so top-1 and the
/// confusion matrix always agree and constant logits are not all correct. A row with a
/// non-finite value ranks the label last.
pub fn rank(row: &[f32], label: usize) -> usize {
    if !row.iter().all(|v| v.is_finite()) {
        return row.len();
    }
    let x = row[label];
    row.iter()
        .enumerate()
        .filter(|&(j, &v)| v > x || (v == x && j < label))
        .count()
}

/// The predicted class: the first of the largest logits.
pub fn argmax(row: &[f32]) -> usize {
    row.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| {
            if v > bv { (i, v) } else { (bi, bv) }
        })
        .0
}

/// Summed cross-entropy, top-1 and top-5 counts of `logits` rows against `labels`.
pub fn score(logits: &[f32], labels: &[usize], classes: usize) -> (f64, usize, usize) {
    let (mut loss, mut top1, mut top5) = (0.0, 0, 0);
    for (row, &label) in logits.chunks(classes).zip(labels) {
        let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let lse = row.iter().map(|v| (v - max).exp()).sum::<f32>().ln() + max;
        loss += (lse - row[label]) as f64;
        let rank = rank(row, label);
        top1 += usize::from(rank == 0);
        top5 += usize::from(rank < 5);
    }
    (loss, top1, top5)
}

fn evaluate(
    model: &Model,
    set: &Arc<ImageSet>,
    pre: &Preprocess,
    batch_size: usize,
    device: &Device,
) -> anyhow::Result<(f64, f64, f64)> {
    let eval_model = model.for_inference();
    let order: Vec<usize> = (0..set.len()).collect();
    let (mut loss, mut top1, mut top5) = (0.0, 0, 0);
    let size = pre.input_size;
    for batch in data::batches(set.clone(), pre.clone(), order, batch_size, Transform::Eval) {
        let batch = batch?;
        let n = batch.labels.len();
        let x = Tensor::<4>::from_data(TensorData::new(batch.pixels, [n, 3, size, size]), device);
        let logits = to_vec(eval_model.forward(x))?;
        let (l, t1, t5) = score(&logits, &batch.labels, logits.len() / n);
        loss += l;
        top1 += t1;
        top5 += t5;
    }
    let n = set.len().max(1) as f64;
    Ok((loss / n, top1 as f64 / n, top5 as f64 / n))
}

fn evaluate_cached(
    model: &Model,
    cache: &FeatureCache,
    device: &Device,
) -> anyhow::Result<(f64, f64, f64)> {
    let eval_model = model.valid();
    let n = cache.val.len();
    if n == 0 {
        return Ok((0.0, 0.0, 0.0));
    }
    let x = Tensor::<2>::from_data(TensorData::new(cache.val.concat(), [n, cache.dim]), device);
    let logits = to_vec(eval_model.forward_head(x))?;
    let (loss, top1, top5) = score(&logits, &cache.val_labels, logits.len() / n);
    Ok((
        loss / n as f64,
        top1 as f64 / n as f64,
        top5 as f64 / n as f64,
    ))
}

fn inverse_frequency(labels: &[usize], classes: usize) -> Vec<f32> {
    let mut counts = vec![0usize; classes];
    for &l in labels {
        counts[l] += 1;
    }
    counts
        .iter()
        .map(|&c| labels.len() as f32 / (classes as f32 * c.max(1) as f32))
        .collect()
}

fn param_counts(model: &Model, frozen: &FreezeSet) -> (usize, usize) {
    torch_tensors(model)
        .iter()
        .filter(|(name, _, _)| !name.contains("running_"))
        .fold((0, 0), |(t, f), (name, shape, _)| {
            let n: usize = shape.iter().product();
            if frozen.contains(name) {
                (t, f + n)
            } else {
                (t + n, f)
            }
        })
}

fn write_metrics(out: &Path, history: &[EpochMetrics]) -> anyhow::Result<()> {
    let mut csv = String::from(
        "epoch,train_loss,train_acc,val_loss,val_top1,val_top5,lr,epoch_seconds,images_per_second\n",
    );
    let mut jsonl = String::new();
    for m in history {
        csv.push_str(&format!(
            "{},{},{},{},{},{},{},{},{}\n",
            m.epoch,
            m.train_loss,
            m.train_acc,
            m.val_loss,
            m.val_top1,
            m.val_top5,
            m.lr,
            m.epoch_seconds,
            m.images_per_second
        ));
        jsonl.push_str(&serde_json::to_string(m)?);
        jsonl.push('\n');
    }
    write_atomic(&out.join("metrics.csv"), csv.as_bytes())?;
    Ok(write_atomic(&out.join("metrics.jsonl"), jsonl.as_bytes())?)
}

/// Write `last/` beside the run as `last.tmp/`, then swap it in, so a crash leaves either
/// the previous or the new checkpoint whole.
fn save_last(
    out: &Path,
    model: &Model,
    optimizers: &Optimizers,
    state: &RunState,
) -> anyhow::Result<()> {
    let tmp = out.join("last.tmp");
    let last = out.join("last");
    let old = out.join("last.old");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
    model
        .valid()
        .save_file(tmp.join("model.bpk"))
        .map_err(|e| anyhow::anyhow!("{}: cannot save the model: {e}", tmp.display()))?;
    optimizers.save(&tmp)?;
    write_json(&tmp.join("state.json"), state)?;
    write_weights(&tmp.join("model.safetensors"), model)?;
    let _ = std::fs::remove_dir_all(&old);
    if last.exists() {
        std::fs::rename(&last, &old)
            .with_context(|| format!("{}: cannot rotate", last.display()))?;
    }
    std::fs::rename(&tmp, &last).with_context(|| format!("{}: cannot rename", last.display()))?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

/// Peak resident memory of this process (VmHWM), in MiB; 0 where /proc is unavailable.
pub fn peak_memory_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tie_is_not_a_correct_prediction() {
        // Constant logits: only the first class is "predicted", as in the confusion matrix.
        let row = [0.5f32; 4];
        assert_eq!(argmax(&row), 0);
        assert_eq!(rank(&row, 0), 0);
        assert_eq!(rank(&row, 3), 3);
        let (_, top1, top5) = score(&row.repeat(4), &[0, 1, 2, 3], 4);
        assert_eq!((top1, top5), (1, 4));
        // Otherwise the rank counts the larger logits, and NaN ranks last.
        assert_eq!(rank(&[0.1, 0.9, 0.3], 2), 1);
        assert_eq!(rank(&[0.1, f32::NAN, 0.3], 2), 3);
        assert_eq!(argmax(&[0.1, 0.9, 0.9]), 1);
    }
}
