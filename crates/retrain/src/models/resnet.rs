//! torchvision's ResNet family: `resnet18`, `resnet34` (basic blocks), `resnet50`,
//! `resnet101` and `resnet152` (bottlenecks, stride on the 3x3 conv as in torchvision's
//! "v1.5"), and the same network with a grouped or wider 3x3: `resnext50_32x4d`,
//! `resnext101_32x8d`, `resnext101_64x4d`, `wide_resnet50_2`, `wide_resnet101_2`.

use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::nn::pool::MaxPool2dConfig;
use burn::nn::{Linear, PaddingConfig2d};

use super::batch_norm::BatchNorm;
use crate::kernels::{ConvActivation, conv2d, conv2d_activation};
use burn::prelude::*;
use burn::tensor::activation::relu;
use serde::{Deserialize, Serialize};

use super::family::{Architecture, Detected, Family, FreezeGroup, head_outputs};
use super::layers::{ConvSpec, Layer, fold_sequential, head, sequential, sequential_onnx};
use super::onnx_graph::{Graph, Value, child};
use super::weights::{Weights, torchvision};
use crate::checkpoint::StateDict;
use crate::error::Result;

/// torchvision's two residual blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BlockKind {
    /// Two 3x3 convolutions (ResNet-18/34).
    Basic,
    /// 1x1, 3x3, 1x1 with 4x expansion (ResNet-50 and deeper).
    Bottleneck,
}

impl BlockKind {
    /// Output channels per planes.
    pub fn expansion(self) -> usize {
        match self {
            BlockKind::Basic => 1,
            BlockKind::Bottleneck => 4,
        }
    }
}

/// A ResNet's shape: block type, blocks per stage, the stem width (64 in torchvision;
/// smaller widths keep the test fixtures small while using the same block types), and
/// torchvision's `groups` and `width_per_group` of the bottleneck's 3x3 convolution.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResNetSpec {
    /// The block type.
    pub block: BlockKind,
    /// Blocks in each of the four stages.
    pub layers: [usize; 4],
    /// Channels of the stem.
    pub width: usize,
    /// Groups of the bottleneck's 3x3 convolution (32 for `resnext50_32x4d`).
    #[serde(default = "one")]
    pub groups: usize,
    /// torchvision's `width_per_group` (`base_width`): 4 for `resnext50_32x4d`, 128 for
    /// `wide_resnet50_2`, 64 for a plain ResNet.
    #[serde(default = "sixty_four")]
    pub width_per_group: usize,
}

fn one() -> usize {
    1
}

fn sixty_four() -> usize {
    64
}

impl ResNetSpec {
    /// Channels of the last stage, which feeds the classifier.
    pub fn feature_dim(&self) -> usize {
        self.width * 8 * self.block.expansion()
    }

    /// Channels of the 3x3 convolution of a bottleneck with `planes` planes, as
    /// torchvision computes them: `int(planes * (width_per_group / 64)) * groups`.
    pub fn bottleneck_width(&self, planes: usize) -> usize {
        planes * self.width_per_group / 64 * self.groups
    }

    const fn standard(block: BlockKind, layers: [usize; 4]) -> Self {
        Self::grouped(block, layers, 1, 64)
    }

    const fn grouped(
        block: BlockKind,
        layers: [usize; 4],
        groups: usize,
        width_per_group: usize,
    ) -> Self {
        Self {
            block,
            layers,
            width: 64,
            groups,
            width_per_group,
        }
    }

    /// The same network with stem width `width`: ResNets and wide ResNets scale every
    /// layer; ResNeXts keep the channels per group and scale the number of groups.
    fn narrowed(&self, width: usize) -> Self {
        let ratio = width as f64 / self.width as f64;
        let (groups, width_per_group) = if self.groups == 1 {
            (1, self.width_per_group)
        } else {
            let per_group = self.bottleneck_width(self.width) / self.groups;
            let groups = ((self.groups as f64 * ratio).round() as usize).max(1);
            (groups, width_per_group(per_group, width))
        };
        Self {
            width,
            groups,
            width_per_group,
            ..self.clone()
        }
    }
}

/// The smallest `width_per_group` that gives `per_group` channels per group at stem width
/// `width` (exact for widths up to 64, torchvision's).
fn width_per_group(per_group: usize, width: usize) -> usize {
    (per_group * 64).div_ceil(width)
}

const RESNET18_WEIGHTS: &[Weights] = &torchvision::v1(
    "resnet18",
    "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    69.758,
);

const RESNET34_WEIGHTS: &[Weights] = &torchvision::v1(
    "resnet34",
    "https://download.pytorch.org/models/resnet34-b627a593.pth",
    73.314,
);

const RESNET50_WEIGHTS: &[Weights] = &torchvision::v1_v2(
    "resnet50",
    (
        "https://download.pytorch.org/models/resnet50-0676ba61.pth",
        76.130,
    ),
    (
        "https://download.pytorch.org/models/resnet50-11ad3fa6.pth",
        80.858,
    ),
);

const RESNET101_WEIGHTS: &[Weights] = &torchvision::v1_v2(
    "resnet101",
    (
        "https://download.pytorch.org/models/resnet101-63fe2227.pth",
        77.374,
    ),
    (
        "https://download.pytorch.org/models/resnet101-cd907fc2.pth",
        81.886,
    ),
);

const RESNET152_WEIGHTS: &[Weights] = &torchvision::v1_v2(
    "resnet152",
    (
        "https://download.pytorch.org/models/resnet152-394f9c45.pth",
        78.312,
    ),
    (
        "https://download.pytorch.org/models/resnet152-f82ba261.pth",
        82.284,
    ),
);

const RESNEXT50_32X4D_WEIGHTS: &[Weights] = &torchvision::v1_v2(
    "resnext50_32x4d",
    (
        "https://download.pytorch.org/models/resnext50_32x4d-7cdf4587.pth",
        77.618,
    ),
    (
        "https://download.pytorch.org/models/resnext50_32x4d-1a0047aa.pth",
        81.198,
    ),
);

const RESNEXT101_32X8D_WEIGHTS: &[Weights] = &torchvision::v1_v2(
    "resnext101_32x8d",
    (
        "https://download.pytorch.org/models/resnext101_32x8d-8ba56ff5.pth",
        79.312,
    ),
    (
        "https://download.pytorch.org/models/resnext101_32x8d-110c445d.pth",
        82.834,
    ),
);

/// Only one set, trained with the newer recipe (resize 232).
const RESNEXT101_64X4D_WEIGHTS: &[Weights] = &[torchvision::weights(
    "resnext101_64x4d",
    "IMAGENET1K_V1",
    "https://download.pytorch.org/models/resnext101_64x4d-173b62eb.pth",
    83.246,
    torchvision::preprocess(224, 232),
)
.default()];

const WIDE_RESNET50_2_WEIGHTS: &[Weights] = &torchvision::v1_v2(
    "wide_resnet50_2",
    (
        "https://download.pytorch.org/models/wide_resnet50_2-95faca4d.pth",
        78.468,
    ),
    (
        "https://download.pytorch.org/models/wide_resnet50_2-9ba9bcbe.pth",
        81.602,
    ),
);

const WIDE_RESNET101_2_WEIGHTS: &[Weights] = &torchvision::v1_v2(
    "wide_resnet101_2",
    (
        "https://download.pytorch.org/models/wide_resnet101_2-32ee1156.pth",
        78.848,
    ),
    (
        "https://download.pytorch.org/models/wide_resnet101_2-d733dc28.pth",
        82.510,
    ),
);

fn bn(channels: usize, device: &Device) -> BatchNorm {
    BatchNorm::new(channels, 1e-5, 0.1, device)
}

/// torchvision's shortcut projection: 1x1 conv with the block's stride, then BatchNorm.
fn downsample(cin: usize, cout: usize, stride: usize, device: &Device) -> Option<Vec<Layer>> {
    (stride != 1 || cin != cout).then(|| {
        vec![
            Layer::Conv2d(ConvSpec::new(cin, cout, 1, stride).init(device)),
            Layer::BatchNorm2d(bn(cout, device)),
        ]
    })
}

/// `relu(bn(conv(x)))`: one native op once `bn` is folded into `conv` (at inference), so
/// that the ReLU goes over each output block while it is in cache.
fn conv_bn_relu(conv: &Conv2d, bn: &BatchNorm, x: Tensor<4>) -> Tensor<4> {
    if bn.folded {
        conv2d_activation(conv, x, ConvActivation::Relu)
    } else {
        relu(bn.forward(conv2d(conv, x)))
    }
}

fn shortcut(downsample: &Option<Vec<Layer>>, x: Tensor<4>) -> Tensor<4> {
    match downsample {
        Some(layers) => sequential(layers, x),
        None => x,
    }
}

/// [`shortcut`] in an ONNX graph.
fn shortcut_onnx(
    downsample: &Option<Vec<Layer>>,
    g: &mut Graph,
    scope: &str,
    x: &Value,
) -> Result<Value> {
    match downsample {
        Some(layers) => sequential_onnx(layers, g, &child(scope, "downsample"), x),
        None => Ok(x.clone()),
    }
}

/// `conv -> bn` of a block, by field names, in an ONNX graph.
fn conv_bn_onnx(
    g: &mut Graph,
    scope: &str,
    (conv, bn): (&Conv2d, &BatchNorm),
    index: usize,
    x: &Value,
) -> Result<Value> {
    let y = g.conv2d(&child(scope, format!("conv{index}")), conv, x)?;
    g.batch_norm(&child(scope, format!("bn{index}")), bn, &y)
}

/// torchvision's `BasicBlock` (ResNet-18/34): two 3x3 convs and the shortcut.
#[derive(Module, Debug)]
pub struct BasicBlock {
    conv1: Conv2d,
    bn1: BatchNorm,
    conv2: Conv2d,
    bn2: BatchNorm,
    downsample: Option<Vec<Layer>>,
}

impl BasicBlock {
    fn new(cin: usize, planes: usize, stride: usize, device: &Device) -> Self {
        Self {
            conv1: ConvSpec::new(cin, planes, 3, stride).init(device),
            bn1: bn(planes, device),
            conv2: ConvSpec::new(planes, planes, 3, 1).init(device),
            bn2: bn(planes, device),
            downsample: downsample(cin, planes, stride, device),
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let identity = shortcut(&self.downsample, x.clone());
        let y = conv_bn_relu(&self.conv1, &self.bn1, x);
        let y = self.bn2.forward(conv2d(&self.conv2, y));
        relu(y + identity)
    }

    fn onnx(&self, g: &mut Graph, scope: &str, x: &Value) -> Result<Value> {
        let identity = shortcut_onnx(&self.downsample, g, scope, x)?;
        let relu = child(scope, "relu");
        let y = conv_bn_onnx(g, scope, (&self.conv1, &self.bn1), 1, x)?;
        let y = g.unary("Relu", &relu, &y);
        let y = conv_bn_onnx(g, scope, (&self.conv2, &self.bn2), 2, &y)?;
        let y = g.add(scope, &y, &identity);
        Ok(g.unary("Relu", &relu, &y))
    }
}

/// torchvision's `Bottleneck` (ResNet-50): 1x1 reduce, 3x3 (grouped in a ResNeXt), 1x1
/// expand to 4x planes, and the shortcut.
#[derive(Module, Debug)]
pub struct Bottleneck {
    conv1: Conv2d,
    bn1: BatchNorm,
    conv2: Conv2d,
    bn2: BatchNorm,
    conv3: Conv2d,
    bn3: BatchNorm,
    downsample: Option<Vec<Layer>>,
}

impl Bottleneck {
    fn new(cin: usize, planes: usize, stride: usize, spec: &ResNetSpec, device: &Device) -> Self {
        let cout = planes * 4;
        let width = spec.bottleneck_width(planes);
        Self {
            conv1: ConvSpec::new(cin, width, 1, 1).init(device),
            bn1: bn(width, device),
            conv2: ConvSpec::new(width, width, 3, stride)
                .groups(spec.groups)
                .init(device),
            bn2: bn(width, device),
            conv3: ConvSpec::new(width, cout, 1, 1).init(device),
            bn3: bn(cout, device),
            downsample: downsample(cin, cout, stride, device),
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let identity = shortcut(&self.downsample, x.clone());
        let y = conv_bn_relu(&self.conv1, &self.bn1, x);
        let y = conv_bn_relu(&self.conv2, &self.bn2, y);
        let y = self.bn3.forward(conv2d(&self.conv3, y));
        relu(y + identity)
    }

    fn onnx(&self, g: &mut Graph, scope: &str, x: &Value) -> Result<Value> {
        let identity = shortcut_onnx(&self.downsample, g, scope, x)?;
        let relu = child(scope, "relu");
        let y = conv_bn_onnx(g, scope, (&self.conv1, &self.bn1), 1, x)?;
        let y = g.unary("Relu", &relu, &y);
        let y = conv_bn_onnx(g, scope, (&self.conv2, &self.bn2), 2, &y)?;
        let y = g.unary("Relu", &relu, &y);
        let y = conv_bn_onnx(g, scope, (&self.conv3, &self.bn3), 3, &y)?;
        let y = g.add(scope, &y, &identity);
        Ok(g.unary("Relu", &relu, &y))
    }
}

/// A residual block; variants named after torchvision's classes.
#[allow(missing_docs)]
// A network is built once and moved rarely; boxing the variants buys nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum Block {
    BasicBlock(BasicBlock),
    Bottleneck(Bottleneck),
}

impl Block {
    fn new(spec: &ResNetSpec, cin: usize, planes: usize, stride: usize, device: &Device) -> Self {
        match spec.block {
            BlockKind::Basic => Block::BasicBlock(BasicBlock::new(cin, planes, stride, device)),
            BlockKind::Bottleneck => {
                Block::Bottleneck(Bottleneck::new(cin, planes, stride, spec, device))
            }
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        match self {
            Block::BasicBlock(b) => b.forward(x),
            Block::Bottleneck(b) => b.forward(x),
        }
    }

    fn onnx(&self, g: &mut Graph, scope: &str, x: &Value) -> Result<Value> {
        match self {
            Block::BasicBlock(b) => b.onnx(g, scope, x),
            Block::Bottleneck(b) => b.onnx(g, scope, x),
        }
    }
}

/// torchvision's `ResNet`, field for field.
#[derive(Module, Debug)]
pub struct ResNet {
    conv1: Conv2d,
    bn1: BatchNorm,
    maxpool: Layer,
    layer1: Vec<Block>,
    layer2: Vec<Block>,
    layer3: Vec<Block>,
    layer4: Vec<Block>,
    /// The classifier head, replaced for a new number of classes.
    pub fc: Linear,
}

impl ResNet {
    /// A network of this shape with `num_classes` outputs.
    pub fn new(spec: &ResNetSpec, num_classes: usize, device: &Device) -> Self {
        let w = spec.width;
        let mut cin = w;
        let mut stages: Vec<Vec<Block>> = Vec::new();
        for (i, &n) in spec.layers.iter().enumerate() {
            let planes = w << i;
            let stride = if i == 0 { 1 } else { 2 };
            let blocks = (0..n)
                .map(|j| {
                    let b = Block::new(spec, cin, planes, if j == 0 { stride } else { 1 }, device);
                    cin = planes * spec.block.expansion();
                    b
                })
                .collect();
            stages.push(blocks);
        }
        let [layer1, layer2, layer3, layer4]: [Vec<Block>; 4] =
            stages.try_into().expect("four stages");
        Self {
            conv1: ConvSpec::new(3, w, 7, 2).init(device),
            bn1: bn(w, device),
            maxpool: Layer::MaxPool2d(
                MaxPool2dConfig::new([3, 3])
                    .with_strides([2, 2])
                    .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                    .init(),
            ),
            layer1,
            layer2,
            layer3,
            layer4,
            fc: head(cin, num_classes, device),
        }
    }

    fn stages(&self) -> [&Vec<Block>; 4] {
        [&self.layer1, &self.layer2, &self.layer3, &self.layer4]
    }
}

impl Family for ResNet {
    type Variant = ResNetSpec;
    const TORCH_CLASS: &'static str = "ResNet";
    const ARCHITECTURES: &'static [Architecture<ResNetSpec>] = &[
        Architecture {
            name: "resnet18",
            variant: ResNetSpec::standard(BlockKind::Basic, [2, 2, 2, 2]),
            weights: RESNET18_WEIGHTS,
        },
        Architecture {
            name: "resnet34",
            variant: ResNetSpec::standard(BlockKind::Basic, [3, 4, 6, 3]),
            weights: RESNET34_WEIGHTS,
        },
        Architecture {
            name: "resnet50",
            variant: ResNetSpec::standard(BlockKind::Bottleneck, [3, 4, 6, 3]),
            weights: RESNET50_WEIGHTS,
        },
        Architecture {
            name: "resnet101",
            variant: ResNetSpec::standard(BlockKind::Bottleneck, [3, 4, 23, 3]),
            weights: RESNET101_WEIGHTS,
        },
        Architecture {
            name: "resnet152",
            variant: ResNetSpec::standard(BlockKind::Bottleneck, [3, 8, 36, 3]),
            weights: RESNET152_WEIGHTS,
        },
        Architecture {
            name: "resnext50_32x4d",
            variant: ResNetSpec::grouped(BlockKind::Bottleneck, [3, 4, 6, 3], 32, 4),
            weights: RESNEXT50_32X4D_WEIGHTS,
        },
        Architecture {
            name: "resnext101_32x8d",
            variant: ResNetSpec::grouped(BlockKind::Bottleneck, [3, 4, 23, 3], 32, 8),
            weights: RESNEXT101_32X8D_WEIGHTS,
        },
        Architecture {
            name: "resnext101_64x4d",
            variant: ResNetSpec::grouped(BlockKind::Bottleneck, [3, 4, 23, 3], 64, 4),
            weights: RESNEXT101_64X4D_WEIGHTS,
        },
        Architecture {
            name: "wide_resnet50_2",
            variant: ResNetSpec::grouped(BlockKind::Bottleneck, [3, 4, 6, 3], 1, 128),
            weights: WIDE_RESNET50_2_WEIGHTS,
        },
        Architecture {
            name: "wide_resnet101_2",
            variant: ResNetSpec::grouped(BlockKind::Bottleneck, [3, 4, 23, 3], 1, 128),
            weights: WIDE_RESNET101_2_WEIGHTS,
        },
    ];
    const HEAD: [&'static str; 2] = ["fc.weight", "fc.bias"];

    fn build(variant: &ResNetSpec, num_classes: usize, device: &Device) -> Self {
        Self::new(variant, num_classes, device)
    }

    /// The block type from `conv3`'s presence, the depths from the block counts, the
    /// width from the stem, groups and group width from the first 3x3; the architecture
    /// is the one that, at this stem width, has exactly this shape (a plain ResNet of the
    /// same depths if none has).
    fn detect(sd: &StateDict) -> Option<Detected<ResNetSpec>> {
        sd.get("layer1.0.conv1.weight")?;
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
        let width = *sd.get("conv1.weight")?.shape.first()?;
        let (groups, width_per_group) = match block {
            BlockKind::Basic => (1, 64),
            BlockKind::Bottleneck => {
                let conv2 = &sd.get("layer1.0.conv2.weight")?.shape;
                let (channels, per_group) = (*conv2.first()?, *conv2.get(1)?);
                let groups = channels / per_group.max(1);
                (groups, width_per_group(per_group, width))
            }
        };
        let variant = ResNetSpec {
            block,
            layers,
            width,
            groups,
            width_per_group,
        };
        let same_depths =
            |a: &&Architecture<ResNetSpec>| a.variant.block == block && a.variant.layers == layers;
        let arch = Self::ARCHITECTURES
            .iter()
            .filter(same_depths)
            .find(|a| a.variant.narrowed(width) == variant)
            .or_else(|| Self::ARCHITECTURES.iter().find(same_depths))?;
        Some(Detected {
            arch: arch.name,
            variant,
            num_classes: head_outputs(sd, Self::HEAD[0]),
        })
    }

    fn feature_dim(variant: &ResNetSpec) -> usize {
        variant.feature_dim()
    }

    fn freeze_groups(_variant: &ResNetSpec) -> Vec<FreezeGroup> {
        let mut groups = vec![FreezeGroup::new("stem", &["conv1", "bn1"])];
        for stage in ["layer1", "layer2", "layer3", "layer4"] {
            groups.push(FreezeGroup::new(stage, &[stage]));
        }
        groups.push(FreezeGroup::new("head", &["fc"]));
        groups
    }

    /// The stem and the first two stages.
    fn default_partial(_variant: &ResNetSpec) -> String {
        "conv1,bn1,layer1,layer2".into()
    }

    /// The base width / 64.
    fn width(variant: &ResNetSpec) -> Option<f64> {
        Some(variant.width as f64 / 64.0)
    }

    fn with_width(variant: &ResNetSpec, width: f64) -> ResNetSpec {
        variant.narrowed(((64.0 * width).round() as usize).max(1))
    }

    fn distinction(variant: &ResNetSpec) -> Option<String> {
        let groups = (variant.groups != 1).then(|| format!(", {} groups", variant.groups));
        (variant.width != 64)
            .then(|| format!("base width {}{}", variant.width, groups.unwrap_or_default()))
    }

    fn head(&self) -> &Linear {
        &self.fc
    }

    fn reset_classifier(&mut self, num_classes: usize, device: &Device) {
        self.fc = head(self.fc.weight.dims()[0], num_classes, device);
    }

    fn forward_features(&self, x: Tensor<4>) -> Tensor<4> {
        let x = self
            .maxpool
            .forward(conv_bn_relu(&self.conv1, &self.bn1, x));
        self.stages()
            .into_iter()
            .flatten()
            .fold(x, |x, block| block.forward(x))
    }

    fn forward_head(&self, pooled: Tensor<2>) -> Tensor<2> {
        self.fc.forward(pooled)
    }

    fn fold_batchnorm(&mut self) {
        self.bn1.fold_into(&mut self.conv1);
        let stages = [
            &mut self.layer1,
            &mut self.layer2,
            &mut self.layer3,
            &mut self.layer4,
        ];
        for block in stages.into_iter().flatten() {
            match block {
                Block::BasicBlock(b) => {
                    b.bn1.fold_into(&mut b.conv1);
                    b.bn2.fold_into(&mut b.conv2);
                    b.downsample.iter_mut().for_each(|d| fold_sequential(d));
                }
                Block::Bottleneck(b) => {
                    b.bn1.fold_into(&mut b.conv1);
                    b.bn2.fold_into(&mut b.conv2);
                    b.bn3.fold_into(&mut b.conv3);
                    b.downsample.iter_mut().for_each(|d| fold_sequential(d));
                }
            }
        }
    }

    fn onnx(&self, g: &mut Graph, x: &Value) -> Result<Value> {
        let x = g.conv2d("conv1", &self.conv1, x)?;
        let x = g.batch_norm("bn1", &self.bn1, &x)?;
        let x = g.unary("Relu", "relu", &x);
        let mut x = self.maxpool.onnx(g, "maxpool", &x)?;
        for (stage, blocks) in self.stages().into_iter().enumerate() {
            for (i, block) in blocks.iter().enumerate() {
                x = block.onnx(g, &format!("layer{}.{i}", stage + 1), &x)?;
            }
        }
        let pooled = g.global_avg_pool("avgpool", &x);
        g.linear("fc", &self.fc, &pooled)
    }
}
