//! The supported networks, one file per family, behind one small interface (like timm):
//! a pretrained config (preprocessing, head tensor names, feature dimension, class names),
//! `forward_features`, `forward_head`, and the named-module tree (see [`crate::modules`]).

pub mod batch_norm;
pub mod efficientnet_lite;
pub mod layers;
pub mod mobilenet_v2;
pub mod resnet;

use std::fmt;

use burn::module::Module;
use burn::prelude::*;
use serde::{Deserialize, Serialize};

use crate::checkpoint::StateDict;
use crate::preprocess::{Interpolation, Preprocess};
use efficientnet_lite::EfficientNetLite;
use mobilenet_v2::MobileNetV2;
use resnet::{BlockKind, ResNet, ResNetSpec};

/// An architecture name as users type it (`--arch`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Arch {
    #[serde(rename = "mobilenet_v2")]
    MobileNetV2,
    #[serde(rename = "resnet18")]
    ResNet18,
    #[serde(rename = "resnet34")]
    ResNet34,
    #[serde(rename = "resnet50")]
    ResNet50,
    #[serde(rename = "efficientnet_lite0")]
    EfficientNetLite0,
}

impl Arch {
    pub const ALL: [Arch; 5] = [
        Arch::MobileNetV2,
        Arch::ResNet18,
        Arch::ResNet34,
        Arch::ResNet50,
        Arch::EfficientNetLite0,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Arch::MobileNetV2 => "mobilenet_v2",
            Arch::ResNet18 => "resnet18",
            Arch::ResNet34 => "resnet34",
            Arch::ResNet50 => "resnet50",
            Arch::EfficientNetLite0 => "efficientnet_lite0",
        }
    }

    /// The standard (torchvision / package) family variant of this architecture.
    pub fn default_family(self) -> Family {
        match self {
            Arch::MobileNetV2 => Family::MobileNetV2 { width: 1.0 },
            Arch::ResNet18 => Family::ResNet(ResNetSpec {
                block: BlockKind::Basic,
                layers: [2, 2, 2, 2],
                width: 64,
            }),
            Arch::ResNet34 => Family::ResNet(ResNetSpec {
                block: BlockKind::Basic,
                layers: [3, 4, 6, 3],
                width: 64,
            }),
            Arch::ResNet50 => Family::ResNet(ResNetSpec {
                block: BlockKind::Bottleneck,
                layers: [3, 4, 6, 3],
                width: 64,
            }),
            Arch::EfficientNetLite0 => Family::EfficientNetLite0,
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What varies within a family: the width a checkpoint was made with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "family", rename_all = "snake_case")]
pub enum Family {
    MobileNetV2 { width: f64 },
    ResNet(ResNetSpec),
    EfficientNetLite0,
}

/// A buildable network: architecture, family and number of classes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    pub arch: Arch,
    pub family: Family,
    pub num_classes: usize,
}

/// timm's `pretrained_cfg`: what a user of the weights needs to know.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PretrainedConfig {
    pub architecture: Arch,
    pub preprocess: Preprocess,
    /// State-dict names of the classifier's tensors (replaced for a new class count).
    pub head: Vec<String>,
    /// Width of the pooled features that enter the head.
    pub feature_dim: usize,
    pub num_classes: usize,
    /// Class names, where known (ImageNet for 1000-class checkpoints).
    pub class_names: Option<Vec<String>>,
}

const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// The 1000 ImageNet class names in torchvision's order.
pub fn imagenet_classes() -> Vec<String> {
    include_str!("imagenet_classes.txt")
        .lines()
        .map(str::to_string)
        .collect()
}

impl ModelSpec {
    pub fn new(arch: Arch, num_classes: usize) -> Self {
        Self {
            arch,
            family: arch.default_family(),
            num_classes,
        }
    }

    /// The width as `--width` takes it: mobilenet_v2's multiplier, a ResNet's base width / 64.
    pub fn width(&self) -> Option<f64> {
        match &self.family {
            Family::MobileNetV2 { width } => Some(*width),
            Family::ResNet(r) => Some(r.width as f64 / 64.0),
            Family::EfficientNetLite0 => None,
        }
    }

    /// The same network at another width (no effect on EfficientNet-Lite0).
    pub fn with_width(mut self, width: f64) -> Self {
        match &mut self.family {
            Family::MobileNetV2 { width: w } => *w = width,
            Family::ResNet(r) => r.width = ((64.0 * width).round() as usize).max(1),
            Family::EfficientNetLite0 => {}
        }
        self
    }

    pub fn head_tensors(&self) -> [&'static str; 2] {
        match self.family {
            Family::MobileNetV2 { .. } => ["classifier.1.weight", "classifier.1.bias"],
            Family::ResNet(_) => ["fc.weight", "fc.bias"],
            Family::EfficientNetLite0 => ["_fc.weight", "_fc.bias"],
        }
    }

    pub fn feature_dim(&self) -> usize {
        match &self.family {
            Family::MobileNetV2 { width } => mobilenet_v2::feature_dim(*width),
            Family::ResNet(spec) => spec.feature_dim(),
            Family::EfficientNetLite0 => efficientnet_lite::FEATURE_DIM,
        }
    }

    pub fn pretrained_config(&self) -> PretrainedConfig {
        let preprocess = match self.family {
            // The Lite weights were trained on (pixel - 127) / 128 inputs.
            Family::EfficientNetLite0 => Preprocess {
                input_size: efficientnet_lite::IMAGE_SIZE,
                resize_size: 256,
                interpolation: Interpolation::Bilinear,
                mean: [127.0 / 255.0; 3],
                std: [128.0 / 255.0; 3],
            },
            _ => Preprocess {
                input_size: 224,
                resize_size: 256,
                interpolation: Interpolation::Bilinear,
                mean: IMAGENET_MEAN,
                std: IMAGENET_STD,
            },
        };
        PretrainedConfig {
            architecture: self.arch,
            preprocess,
            head: self.head_tensors().iter().map(|s| s.to_string()).collect(),
            feature_dim: self.feature_dim(),
            num_classes: self.num_classes,
            class_names: (self.num_classes == 1000).then(imagenet_classes),
        }
    }

    pub fn build(&self, device: &Device) -> Model {
        match &self.family {
            Family::MobileNetV2 { width } => {
                Model::MobileNetV2(MobileNetV2::new(*width, self.num_classes, device))
            }
            Family::ResNet(spec) => Model::ResNet(ResNet::new(spec, self.num_classes, device)),
            Family::EfficientNetLite0 => {
                Model::EfficientNetLite(EfficientNetLite::lite0(self.num_classes, device))
            }
        }
    }
}

/// Recognise a checkpoint's architecture from its keys and shapes.
pub fn detect(sd: &StateDict) -> Option<ModelSpec> {
    let shape0 = |key: &str| sd.get(key).and_then(|t| t.shape.first().copied());
    if sd.get("_conv_stem.weight").is_some() && sd.get("_blocks.0._depthwise_conv.weight").is_some()
    {
        return Some(ModelSpec {
            arch: Arch::EfficientNetLite0,
            family: Family::EfficientNetLite0,
            num_classes: shape0("_fc.weight").unwrap_or(1000),
        });
    }
    if sd.get("features.0.0.weight").is_some() && sd.get("features.1.conv.0.0.weight").is_some() {
        let width = mobilenet_v2::width_from_channels(shape0("features.17.conv.2.weight")?);
        return Some(ModelSpec {
            arch: Arch::MobileNetV2,
            family: Family::MobileNetV2 { width },
            num_classes: shape0("classifier.1.weight").unwrap_or(1000),
        });
    }
    if sd.get("conv1.weight").is_some() && sd.get("layer1.0.conv1.weight").is_some() {
        let block = if sd.get("layer1.0.conv3.weight").is_some() {
            BlockKind::Bottleneck
        } else {
            BlockKind::Basic
        };
        let mut layers = [0; 4];
        for (i, n) in layers.iter_mut().enumerate() {
            *n = (0..)
                .take_while(|j| {
                    sd.get(&format!("layer{}.{j}.conv1.weight", i + 1))
                        .is_some()
                })
                .count();
        }
        let spec = ResNetSpec {
            block,
            layers,
            width: shape0("conv1.weight")?,
        };
        let arch = match (block, layers) {
            (BlockKind::Basic, [2, 2, 2, 2]) => Arch::ResNet18,
            (BlockKind::Basic, [3, 4, 6, 3]) => Arch::ResNet34,
            (BlockKind::Bottleneck, [3, 4, 6, 3]) => Arch::ResNet50,
            _ => return None,
        };
        return Some(ModelSpec {
            arch,
            family: Family::ResNet(spec),
            num_classes: shape0("fc.weight").unwrap_or(1000),
        });
    }
    None
}

/// A tensor's values as f32, row-major.
pub fn to_vec<const D: usize>(t: Tensor<D>) -> anyhow::Result<Vec<f32>> {
    t.try_into_vec_as::<f32>()
        .map_err(|e| anyhow::anyhow!("reading a tensor back: {e:?}"))
}

/// Describe a detected spec for messages: `mobilenet_v2 (width 0.25)`.
pub fn describe(spec: &ModelSpec) -> String {
    match &spec.family {
        Family::MobileNetV2 { width } if *width != 1.0 => format!("{} (width {width})", spec.arch),
        Family::ResNet(r) if r.width != 64 => format!("{} (base width {})", spec.arch, r.width),
        _ => spec.arch.to_string(),
    }
}

/// Any supported network.
// A network is built once and moved rarely; boxing the variants buys nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum Model {
    MobileNetV2(MobileNetV2),
    ResNet(ResNet),
    EfficientNetLite(EfficientNetLite),
}

impl Model {
    /// An eval-mode copy for inference, BatchNorm folded into the convolutions. Not for
    /// training or saving: the BatchNorm layers of the copy are identities.
    pub fn for_inference(&self) -> Model {
        let mut model = self.valid();
        match &mut model {
            Model::MobileNetV2(m) => m.fold_batchnorm(),
            Model::ResNet(m) => m.fold_batchnorm(),
            Model::EfficientNetLite(m) => m.fold_batchnorm(),
        }
        model
    }

    /// The classifier's Linear layer (the head that `--num-classes` replaces).
    pub fn head(&self) -> &burn::nn::Linear {
        match self {
            Model::MobileNetV2(m) => m.head(),
            Model::ResNet(m) => &m.fc,
            Model::EfficientNetLite(m) => &m._fc,
        }
    }

    /// Feature maps before pooling, `[N, D, h, w]`.
    pub fn forward_features(&self, x: Tensor<4>) -> Tensor<4> {
        match self {
            Model::MobileNetV2(m) => m.forward_features(x),
            Model::ResNet(m) => m.forward_features(x),
            Model::EfficientNetLite(m) => m.forward_features(x),
        }
    }

    /// The pooled embedding `[N, D]` that enters the head.
    pub fn embed(&self, x: Tensor<4>) -> Tensor<2> {
        match self {
            Model::MobileNetV2(m) => m.embed(x),
            Model::ResNet(m) => m.embed(x),
            Model::EfficientNetLite(m) => m.embed(x),
        }
    }

    /// Classifier on pooled features: logits `[N, classes]`.
    pub fn forward_head(&self, pooled: Tensor<2>) -> Tensor<2> {
        match self {
            Model::MobileNetV2(m) => m.forward_head(pooled),
            Model::ResNet(m) => m.forward_head(pooled),
            Model::EfficientNetLite(m) => m.forward_head(pooled),
        }
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        self.forward_head(self.embed(x))
    }
}
