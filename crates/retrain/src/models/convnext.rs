//! torchvision's ConvNeXt: `convnext_tiny`, `_small`, `_base`, `_large`. Blocks of a 7x7
//! depthwise conv, LayerNorm over channels, a 4x MLP with exact (erf) GELU, and layer scale,
//! with stochastic depth rising linearly over the blocks; `classifier` is LayerNorm2d,
//! Flatten and the head Linear (`classifier.2`), whose LayerNorm is pretrained and kept.

use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::nn::activation::Gelu;
use burn::prelude::*;
use serde::{Deserialize, Serialize};

use super::family::{Architecture, Detected, Family, FreezeGroup, head_outputs};
use super::layers::{
    ConvSpec, Flatten, Layer, Permute, StochasticDepth, classifier_head, global_avg_pool, head,
    layer_norm, linear, reset_classifier_head, sequential, sequential_onnx,
};
use super::onnx_graph::{Graph, Value, child};
use super::weights::{Weights, torchvision};
use crate::checkpoint::StateDict;
use crate::error::Result;

/// Every LayerNorm's eps.
const EPS: f64 = 1e-6;
/// Initial layer scale.
const LAYER_SCALE: f64 = 1e-6;

/// A ConvNeXt: blocks per stage, the first stage's channels (doubled at each later stage),
/// and the stochastic depth of the last block.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConvNeXtSpec {
    /// Blocks in each of the four stages.
    pub depths: [usize; 4],
    /// Channels of the first stage.
    pub width: usize,
    /// torchvision's `stochastic_depth_prob`.
    pub stochastic_depth: f64,
}

impl ConvNeXtSpec {
    const fn new(depths: [usize; 4], width: usize, stochastic_depth: f64) -> Self {
        Self {
            depths,
            width,
            stochastic_depth,
        }
    }

    /// Channels of the last stage, which feed the head.
    pub fn feature_dim(&self) -> usize {
        self.width * 8
    }
}

/// torchvision's `CNBlock`: the residual branch `block` (7x7 depthwise conv, NHWC
/// LayerNorm, Linear to 4x, GELU, Linear back), scaled per channel by `layer_scale`.
#[derive(Module, Debug)]
pub struct CNBlock {
    block: Vec<Layer>,
    layer_scale: Param<Tensor<3>>,
    stochastic_depth: StochasticDepth,
}

impl CNBlock {
    fn new(dim: usize, drop_prob: f64, device: &Device) -> Self {
        let depthwise = ConvSpec::new(dim, dim, 7, 1).groups(dim).bias();
        let block = vec![
            Layer::Conv2d(depthwise.init(device)),
            Layer::Permute(Permute { dims: [0, 2, 3, 1] }),
            Layer::LayerNorm(layer_norm(dim, EPS, device)),
            Layer::Linear(linear(dim, 4 * dim, 0.02, device)),
            Layer::GELU(Gelu::new()),
            Layer::Linear(linear(4 * dim, dim, 0.02, device)),
            Layer::Permute(Permute { dims: [0, 3, 1, 2] }),
        ];
        Self {
            block,
            layer_scale: Param::from_tensor(Tensor::full([dim, 1, 1], LAYER_SCALE, device)),
            stochastic_depth: StochasticDepth::new(drop_prob),
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let [dim, ..] = self.layer_scale.dims();
        let scale = self.layer_scale.val().reshape([1, dim, 1, 1]);
        let y = sequential(&self.block, x.clone()) * scale;
        self.stochastic_depth.forward(y) + x
    }

    /// The block in an ONNX graph (stochastic depth is the identity in eval).
    fn onnx(&self, g: &mut Graph, scope: &str, x: &Value) -> Result<Value> {
        let y = sequential_onnx(&self.block, g, &child(scope, "block"), x)?;
        let y = g.scale(scope, "layer_scale", self.layer_scale.val(), &y)?;
        Ok(g.add(scope, &y, x))
    }
}

/// One child of `features`: the stem (`Conv2dNormActivation`) or a downsampling
/// (`Sequential` of LayerNorm2d and a 2x2 conv) as a [`Layer`], or a stage of blocks.
#[allow(missing_docs)]
// A network is built once and moved rarely; boxing the variants buys nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum Feature {
    Layer(Layer),
    Sequential(Vec<CNBlock>),
}

/// torchvision's `ConvNeXt`, field for field.
#[derive(Module, Debug)]
pub struct ConvNeXt {
    /// Stem, then each stage followed by its downsampling (LayerNorm2d, 2x2 conv).
    pub features: Vec<Feature>,
    /// `LayerNorm2d`, `Flatten`, then the head `Linear` (`classifier.2`).
    pub classifier: Vec<Layer>,
}

impl ConvNeXt {
    /// A network of this spec with `num_classes` outputs.
    pub fn new(spec: &ConvNeXtSpec, num_classes: usize, device: &Device) -> Self {
        let stem = ConvSpec::new(3, spec.width, 4, 4).padding([0; 4]).bias();
        let mut features = vec![Feature::Layer(Layer::Conv2dNormActivation(vec![
            Layer::Conv2d(stem.init(device)),
            Layer::LayerNorm2d(layer_norm(spec.width, EPS, device)),
        ]))];
        let total: usize = spec.depths.iter().sum();
        let mut block_id = 0;
        for (i, &n) in spec.depths.iter().enumerate() {
            let dim = spec.width << i;
            let blocks = (0..n)
                .map(|_| {
                    let prob = spec.stochastic_depth * block_id as f64 / (total as f64 - 1.0);
                    block_id += 1;
                    CNBlock::new(dim, prob, device)
                })
                .collect();
            features.push(Feature::Sequential(blocks));
            if i < 3 {
                let down = ConvSpec::new(dim, 2 * dim, 2, 2).padding([0; 4]).bias();
                features.push(Feature::Layer(Layer::Sequential(vec![
                    Layer::LayerNorm2d(layer_norm(dim, EPS, device)),
                    Layer::Conv2d(down.init(device)),
                ])));
            }
        }
        let last = spec.feature_dim();
        Self {
            features,
            classifier: vec![
                Layer::LayerNorm2d(layer_norm(last, EPS, device)),
                Layer::Flatten(Flatten),
                Layer::Linear(head(last, num_classes, device)),
            ],
        }
    }
}

const TINY_WEIGHTS: &[Weights] = &[torchvision::weights(
    "convnext_tiny",
    "IMAGENET1K_V1",
    "https://download.pytorch.org/models/convnext_tiny-983f1562.pth",
    82.520,
    torchvision::preprocess(224, 236),
)
.default()];
const SMALL_WEIGHTS: &[Weights] = &[torchvision::weights(
    "convnext_small",
    "IMAGENET1K_V1",
    "https://download.pytorch.org/models/convnext_small-0c510722.pth",
    83.616,
    torchvision::preprocess(224, 230),
)
.default()];
const BASE_WEIGHTS: &[Weights] = &[torchvision::weights(
    "convnext_base",
    "IMAGENET1K_V1",
    "https://download.pytorch.org/models/convnext_base-6075fbad.pth",
    84.062,
    torchvision::preprocess(224, 232),
)
.default()];
const LARGE_WEIGHTS: &[Weights] = &[torchvision::weights(
    "convnext_large",
    "IMAGENET1K_V1",
    "https://download.pytorch.org/models/convnext_large-ea097f82.pth",
    84.414,
    torchvision::preprocess(224, 232),
)
.default()];

impl Family for ConvNeXt {
    type Variant = ConvNeXtSpec;
    const TORCH_CLASS: &'static str = "ConvNeXt";
    const ARCHITECTURES: &'static [Architecture<ConvNeXtSpec>] = &[
        Architecture {
            name: "convnext_tiny",
            variant: ConvNeXtSpec::new([3, 3, 9, 3], 96, 0.1),
            weights: TINY_WEIGHTS,
        },
        Architecture {
            name: "convnext_small",
            variant: ConvNeXtSpec::new([3, 3, 27, 3], 96, 0.4),
            weights: SMALL_WEIGHTS,
        },
        Architecture {
            name: "convnext_base",
            variant: ConvNeXtSpec::new([3, 3, 27, 3], 128, 0.5),
            weights: BASE_WEIGHTS,
        },
        Architecture {
            name: "convnext_large",
            variant: ConvNeXtSpec::new([3, 3, 27, 3], 192, 0.5),
            weights: LARGE_WEIGHTS,
        },
    ];
    const HEAD: [&'static str; 2] = ["classifier.2.weight", "classifier.2.bias"];

    fn build(variant: &ConvNeXtSpec, num_classes: usize, device: &Device) -> Self {
        Self::new(variant, num_classes, device)
    }

    /// The depths from the blocks per stage, the width from the stem; of architectures
    /// with the same depths, the one of that width.
    fn detect(sd: &StateDict) -> Option<Detected<ConvNeXtSpec>> {
        sd.get("features.1.0.layer_scale")?;
        let width = *sd.get("features.0.0.weight")?.shape.first()?;
        let mut depths = [0; 4];
        for (i, n) in depths.iter_mut().enumerate() {
            *n = (0..)
                .take_while(|b| {
                    let stage = 2 * i + 1;
                    sd.get(&format!("features.{stage}.{b}.layer_scale"))
                        .is_some()
                })
                .count();
        }
        let same_depths = |a: &&Architecture<ConvNeXtSpec>| a.variant.depths == depths;
        let arch = Self::ARCHITECTURES
            .iter()
            .filter(same_depths)
            .find(|a| a.variant.width == width)
            .or_else(|| Self::ARCHITECTURES.iter().find(same_depths))?;
        Some(Detected {
            arch: arch.name,
            variant: ConvNeXtSpec {
                width,
                ..arch.variant.clone()
            },
            num_classes: head_outputs(sd, Self::HEAD[0]),
        })
    }

    fn feature_dim(variant: &ConvNeXtSpec) -> usize {
        variant.feature_dim()
    }

    /// The stem; each stage with the downsampling that ends it; the classifier's
    /// LayerNorm (`pre_logits`); the head.
    fn freeze_groups(_variant: &ConvNeXtSpec) -> Vec<FreezeGroup> {
        let mut groups = vec![FreezeGroup::new("stem", &["features.0"])];
        for stage in 0..4 {
            let blocks = format!("features.{}", 2 * stage + 1);
            let down = format!("features.{}", 2 * stage + 2);
            let modules: &[&str] = if stage < 3 {
                &[&blocks, &down]
            } else {
                &[&blocks]
            };
            groups.push(FreezeGroup::new(format!("stage{}", stage + 1), modules));
        }
        groups.push(FreezeGroup::new("pre_logits", &["classifier.0"]));
        groups.push(FreezeGroup::new("head", &["classifier.2"]));
        groups
    }

    /// The stem and the first two stages with their downsampling.
    fn default_partial(_variant: &ConvNeXtSpec) -> String {
        "features.0-4".into()
    }

    /// Channels scaled by `width` (the family has no multiplier of its own; this narrows
    /// it for small experiments).
    fn with_width(variant: &ConvNeXtSpec, width: f64) -> ConvNeXtSpec {
        ConvNeXtSpec {
            width: ((variant.width as f64 * width).round() as usize).max(1),
            ..variant.clone()
        }
    }

    fn distinction(variant: &ConvNeXtSpec) -> Option<String> {
        let standard = Self::ARCHITECTURES
            .iter()
            .any(|a| a.variant.depths == variant.depths && a.variant.width == variant.width);
        (!standard).then(|| format!("width {}", variant.width))
    }

    fn head(&self) -> &Linear {
        classifier_head(&self.classifier, 2)
    }

    fn reset_classifier(&mut self, num_classes: usize, device: &Device) {
        reset_classifier_head(&mut self.classifier, 2, num_classes, device);
    }

    fn forward_features(&self, x: Tensor<4>) -> Tensor<4> {
        self.features.iter().fold(x, |x, f| match f {
            Feature::Layer(layer) => layer.forward(x),
            Feature::Sequential(blocks) => blocks.iter().fold(x, |x, b| b.forward(x)),
        })
    }

    /// Pooled features through the pretrained `classifier.0` LayerNorm: what enters the
    /// head, and what the feature cache keeps.
    fn embed(&self, x: Tensor<4>) -> Tensor<2> {
        let pooled = global_avg_pool(self.forward_features(x));
        self.classifier[..2]
            .iter()
            .fold(pooled, |x, l| l.forward_2d(x))
    }

    fn forward_head(&self, embedding: Tensor<2>) -> Tensor<2> {
        self.classifier[2].forward_2d(embedding)
    }

    /// No BatchNorm to fold.
    fn fold_batchnorm(&mut self) {}

    fn onnx(&self, g: &mut Graph, x: &Value) -> Result<Value> {
        let mut x = x.clone();
        for (i, f) in self.features.iter().enumerate() {
            let scope = format!("features.{i}");
            x = match f {
                Feature::Layer(layer) => layer.onnx(g, &scope, &x)?,
                Feature::Sequential(blocks) => {
                    for (j, block) in blocks.iter().enumerate() {
                        x = block.onnx(g, &child(&scope, j), &x)?;
                    }
                    x
                }
            };
        }
        let pooled = g.global_avg_pool("avgpool", &x);
        sequential_onnx(&self.classifier, g, "classifier", &pooled)
    }
}
