//! The training options as flags: clap's mirror of [`retrain::train::TrainOptions`], with
//! the library's defaults and range checks.

use std::path::PathBuf;

use clap::builder::{PossibleValuesParser, TypedValueParser};
use retrain::freeze::FrozenBn;
use retrain::models::Arch;
use retrain::ranges;
use retrain::train::{ClassWeights, OptimizerKind, Schedule, TrainOptions};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// A value parser for a library enum, offering the names it has in `config.json`.
pub fn choice<T>(all: &[T]) -> impl TypedValueParser<Value = T> + use<T>
where
    T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
{
    let names: Vec<String> = all
        .iter()
        .map(|v| match serde_json::to_value(v) {
            Ok(serde_json::Value::String(name)) => name,
            _ => unreachable!("choices serialise as names"),
        })
        .collect();
    PossibleValuesParser::new(names)
        .map(|name| serde_json::from_value(serde_json::Value::String(name)).expect("a listed name"))
}

/// `--arch`: a registered architecture name.
pub fn arch() -> impl TypedValueParser<Value = Arch> {
    let names: Vec<&str> = Arch::all().into_iter().map(Arch::name).collect();
    PossibleValuesParser::new(names).map(|name| Arch::named(&name).expect("a listed name"))
}

fn defaults() -> TrainOptions {
    TrainOptions::default()
}

/// Every flag of a training run (`train`, `compare`).
#[derive(clap::Args, Debug, Clone)]
pub struct TrainFlags {
    /// Architecture (detected from --weights when left out).
    #[arg(long, value_parser = arch())]
    pub arch: Option<Arch>,
    /// Pretrained weights: a checkpoint file, or a registered name (`resnet50.IMAGENET1K_V2`,
    /// `resnet50` for its default; `retrain weights` lists them).
    #[arg(long, conflicts_with = "scratch")]
    pub weights: Option<PathBuf>,
    /// Train from random init (no weights).
    #[arg(long)]
    pub scratch: bool,
    /// Network width for --scratch: mobilenet_v2's multiplier, or a ResNet's base width / 64.
    #[arg(long, value_parser = ranges::width)]
    pub width: Option<f64>,
    /// Dotted key of a nested state dict in the checkpoint.
    #[arg(long)]
    pub key: Option<String>,
    /// Image folder: one sub-folder per class, or `train/` and `val/` with those.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// What to freeze: `none`, `backbone`, module prefixes `a,b`, or a range `features.0-13`.
    #[arg(long, default_value_t = defaults().freeze)]
    pub freeze: String,
    /// Frozen BatchNorm layers: `eval` keeps their statistics fixed, `train` lets them move.
    #[arg(long, value_parser = choice(&FrozenBn::ALL), default_value = "eval")]
    pub frozen_bn: FrozenBn,
    /// Images per optimisation step.
    #[arg(long, default_value_t = defaults().batch_size, value_parser = ranges::batch_size)]
    pub batch_size: usize,
    /// Peak learning rate (default: 1e-3 for AdamW, 1e-2 for SGD).
    #[arg(long, value_parser = ranges::positive)]
    pub lr: Option<f64>,
    /// The optimizer.
    #[arg(long, value_parser = choice(&OptimizerKind::ALL), default_value = "adamw")]
    pub optimizer: OptimizerKind,
    /// SGD momentum.
    #[arg(long, default_value_t = defaults().momentum, value_parser = ranges::fraction)]
    pub momentum: f64,
    /// Nesterov momentum for SGD.
    #[arg(long)]
    pub nesterov: bool,
    /// Weight decay (decoupled for AdamW, L2 for SGD).
    #[arg(long, default_value_t = defaults().weight_decay, value_parser = ranges::non_negative)]
    pub weight_decay: f64,
    /// Learning-rate schedule: cosine (with linear warmup), step, constant.
    #[arg(long, value_parser = choice(&Schedule::ALL), default_value = "cosine")]
    pub schedule: Schedule,
    /// Epochs of linear warmup (cosine schedule).
    #[arg(long, default_value_t = defaults().warmup_epochs)]
    pub warmup_epochs: usize,
    /// Step schedule: epochs between decays.
    #[arg(long, default_value_t = defaults().step_size, value_parser = ranges::at_least_one)]
    pub step_size: usize,
    /// Step schedule: decay factor.
    #[arg(long, default_value_t = defaults().gamma, value_parser = ranges::positive)]
    pub gamma: f64,
    /// Learning-rate multiplier for the new head.
    #[arg(long, default_value_t = defaults().head_lr_mult, value_parser = ranges::positive)]
    pub head_lr_mult: f64,
    /// Layer-wise learning-rate decay in (0, 1] (timm's `layer_decay`, as ViTs are usually
    /// fine-tuned): each freeze group below the head trains at this times the rate of the
    /// group above it.
    #[arg(long, value_parser = ranges::share)]
    pub layer_decay: Option<f64>,
    /// Train only the head until this epoch, then unfreeze to `--freeze` (fastai's fine_tune).
    #[arg(long, value_parser = ranges::at_least_one)]
    pub unfreeze_at: Option<usize>,
    /// Label smoothing of the cross-entropy.
    #[arg(long, default_value_t = defaults().label_smoothing, value_parser = ranges::smoothing)]
    pub label_smoothing: f32,
    /// `auto` weights the loss by inverse class frequency.
    #[arg(long, value_parser = choice(&ClassWeights::ALL))]
    pub class_weights: Option<ClassWeights>,
    /// Smallest area fraction of RandomResizedCrop (torchvision: 0.08).
    #[arg(long, default_value_t = defaults().crop_scale, value_parser = ranges::share)]
    pub crop_scale: f64,
    /// Square input side (default: the weights' preprocessing).
    #[arg(long, value_parser = ranges::image_size)]
    pub image_size: Option<usize>,
    /// Share of each class held out for validation (when --data has no `val/`).
    #[arg(long, default_value_t = defaults().val_fraction, value_parser = ranges::fraction)]
    pub val_fraction: f64,
    /// Seeds the split, data order, augmentation and the new head.
    #[arg(long, default_value_t = defaults().seed)]
    pub seed: u64,
    /// Re-run the backbone every step even when it is wholly frozen.
    #[arg(long)]
    pub no_feature_cache: bool,
    /// Augmented views per image in the feature cache (the first is the eval view).
    #[arg(long, default_value_t = defaults().cache_views, value_parser = ranges::cache_views)]
    pub cache_views: usize,
    /// Accept a checkpoint that does not match outside the head.
    #[arg(long)]
    pub allow_partial: bool,
}

impl TrainFlags {
    /// The library's options for `epochs` epochs.
    pub fn options(self, epochs: usize) -> TrainOptions {
        TrainOptions {
            arch: self.arch,
            weights: self.weights,
            scratch: self.scratch,
            width: self.width,
            key: self.key,
            data: self.data,
            freeze: self.freeze,
            frozen_bn: self.frozen_bn,
            epochs,
            batch_size: self.batch_size,
            lr: self.lr,
            optimizer: self.optimizer,
            momentum: self.momentum,
            nesterov: self.nesterov,
            weight_decay: self.weight_decay,
            schedule: self.schedule,
            warmup_epochs: self.warmup_epochs,
            step_size: self.step_size,
            gamma: self.gamma,
            head_lr_mult: self.head_lr_mult,
            layer_decay: self.layer_decay,
            unfreeze_at: self.unfreeze_at,
            label_smoothing: self.label_smoothing,
            class_weights: self.class_weights,
            crop_scale: self.crop_scale,
            image_size: self.image_size,
            val_fraction: self.val_fraction,
            seed: self.seed,
            no_feature_cache: self.no_feature_cache,
            cache_views: self.cache_views,
            allow_partial: self.allow_partial,
        }
    }
}
