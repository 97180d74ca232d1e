//! torchvision's EfficientNet family: `efficientnet_b0` .. `efficientnet_b7` (MBConv blocks
//! with SiLU and squeeze-excitation, scaled in width and depth) and `efficientnet_v2_s`,
//! `_m`, `_l` (FusedMBConv in the early stages). Residual branches use stochastic depth,
//! rising linearly to 0.2 over the blocks, as torchvision trains them.

use burn::module::Module;
use burn::nn::Linear;
use burn::prelude::*;
use serde::{Deserialize, Serialize};

use super::family::{Architecture, Detected, Family, FreezeGroup, head_outputs};
use super::layers::{
    Activation, ConvSpec, Layer, Norm, SqueezeExcitation, StochasticDepth, classifier_head,
    conv_bn_act, dropout, fold_sequential, head, make_divisible, reset_classifier_head, sequential,
    sequential_onnx, silu,
};
use super::onnx_graph::{Graph, Value, child};
use super::weights::{Weights, torchvision};
use crate::checkpoint::StateDict;
use crate::error::Result;
use crate::preprocess::{Interpolation, Preprocess};

/// Which of torchvision's stage tables a network is built from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Table {
    /// EfficientNet-B0's, scaled for B1 to B7.
    B,
    /// EfficientNetV2-S.
    V2S,
    /// EfficientNetV2-M.
    V2M,
    /// EfficientNetV2-L.
    V2L,
}

/// One stage, torchvision's `MBConvConfig` / `FusedMBConvConfig` arguments (channels
/// before the width multiplier, blocks before the depth multiplier).
#[derive(Debug, Clone, Copy)]
struct Stage {
    /// FusedMBConv (one full convolution in place of expansion and depthwise).
    fused: bool,
    /// Expansion ratio.
    expand: usize,
    kernel: usize,
    /// Stride of the first block.
    stride: usize,
    cin: usize,
    cout: usize,
    blocks: usize,
}

impl Stage {
    /// The same row as a FusedMBConv stage.
    const fn fused(self) -> Self {
        Self {
            fused: true,
            ..self
        }
    }
}

/// An MBConv stage row, in torchvision's argument order.
const fn mb(
    expand: usize,
    kernel: usize,
    stride: usize,
    cin: usize,
    cout: usize,
    blocks: usize,
) -> Stage {
    Stage {
        fused: false,
        expand,
        kernel,
        stride,
        cin,
        cout,
        blocks,
    }
}

const B: &[Stage] = &[
    mb(1, 3, 1, 32, 16, 1),
    mb(6, 3, 2, 16, 24, 2),
    mb(6, 5, 2, 24, 40, 2),
    mb(6, 3, 2, 40, 80, 3),
    mb(6, 5, 1, 80, 112, 3),
    mb(6, 5, 2, 112, 192, 4),
    mb(6, 3, 1, 192, 320, 1),
];

const V2_S: &[Stage] = &[
    mb(1, 3, 1, 24, 24, 2).fused(),
    mb(4, 3, 2, 24, 48, 4).fused(),
    mb(4, 3, 2, 48, 64, 4).fused(),
    mb(4, 3, 2, 64, 128, 6),
    mb(6, 3, 1, 128, 160, 9),
    mb(6, 3, 2, 160, 256, 15),
];

const V2_M: &[Stage] = &[
    mb(1, 3, 1, 24, 24, 3).fused(),
    mb(4, 3, 2, 24, 48, 5).fused(),
    mb(4, 3, 2, 48, 80, 5).fused(),
    mb(4, 3, 2, 80, 160, 7),
    mb(6, 3, 1, 160, 176, 14),
    mb(6, 3, 2, 176, 304, 18),
    mb(6, 3, 1, 304, 512, 5),
];

const V2_L: &[Stage] = &[
    mb(1, 3, 1, 32, 32, 4).fused(),
    mb(4, 3, 2, 32, 64, 7).fused(),
    mb(4, 3, 2, 64, 96, 7).fused(),
    mb(4, 3, 2, 96, 192, 10),
    mb(6, 3, 1, 192, 224, 19),
    mb(6, 3, 2, 224, 384, 25),
    mb(6, 3, 1, 384, 640, 7),
];

/// Stochastic depth of the last block (torchvision's `stochastic_depth_prob`).
const STOCHASTIC_DEPTH: f64 = 0.2;

/// An EfficientNet: its table, width and depth multipliers, BatchNorm settings and
/// classifier dropout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EfficientNetSpec {
    /// The stage table.
    pub table: Table,
    /// Channel multiplier (`width_mult`); channels rounded by [`make_divisible`].
    pub width: f64,
    /// Block-count multiplier (`depth_mult`); counts rounded up.
    pub depth: f64,
    /// BatchNorm `eps` (1e-3 for B5-B7 and V2, PyTorch's 1e-5 otherwise).
    pub norm_eps: f64,
    /// BatchNorm momentum (0.01 for B5-B7).
    pub norm_momentum: f64,
    /// Dropout before the head.
    pub dropout: f64,
}

impl EfficientNetSpec {
    const fn new(table: Table, width: f64, depth: f64, norm: Norm, dropout: f64) -> Self {
        Self {
            table,
            width,
            depth,
            norm_eps: norm.eps,
            norm_momentum: norm.momentum,
            dropout,
        }
    }

    fn stages(&self) -> &'static [Stage] {
        match self.table {
            Table::B => B,
            Table::V2S => V2_S,
            Table::V2M => V2_M,
            Table::V2L => V2_L,
        }
    }

    fn norm(&self) -> Norm {
        Norm {
            eps: self.norm_eps,
            momentum: self.norm_momentum,
        }
    }

    fn channels(&self, c: usize) -> usize {
        make_divisible(c as f64 * self.width, 8)
    }

    /// Blocks in each stage.
    pub fn stage_blocks(&self) -> Vec<usize> {
        self.stages()
            .iter()
            .map(|s| (s.blocks as f64 * self.depth).ceil() as usize)
            .collect()
    }

    /// Output channels of the last stage before scaling.
    fn base_last_stage_channels(&self) -> usize {
        self.stages()[self.stages().len() - 1].cout
    }

    /// Output channels of the last stage.
    fn last_stage_channels(&self) -> usize {
        self.channels(self.base_last_stage_channels())
    }

    /// Channels of the last 1x1 conv, which feed the head: 4x the last stage for B, 1280
    /// (scaled by the width) for V2.
    pub fn feature_dim(&self) -> usize {
        match self.table {
            Table::B => 4 * self.last_stage_channels(),
            _ => self.channels(1280),
        }
    }
}

/// torchvision's `MBConv` and `FusedMBConv` (the same fields; the [`Block`] variant says
/// which): the residual branch `block`, and its stochastic depth.
#[derive(Module, Debug)]
pub struct Residual {
    block: Vec<Layer>,
    stochastic_depth: StochasticDepth,
    use_res_connect: bool,
}

impl Residual {
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let y = sequential(&self.block, x.clone());
        if self.use_res_connect {
            self.stochastic_depth.forward(y) + x
        } else {
            y
        }
    }

    /// The block in an ONNX graph (stochastic depth is the identity in eval).
    fn onnx(&self, g: &mut Graph, scope: &str, x: &Value) -> Result<Value> {
        let y = sequential_onnx(&self.block, g, &child(scope, "block"), x)?;
        Ok(if self.use_res_connect {
            g.add(scope, &y, x)
        } else {
            y
        })
    }
}

/// A block of a stage; variants named after torchvision's classes.
#[allow(missing_docs)]
#[derive(Module, Debug)]
pub enum Block {
    MBConv(Residual),
    FusedMBConv(Residual),
}

impl Block {
    /// torchvision's block for one stage row, given its input channels and stride.
    fn new(
        row: &Stage,
        cin: usize,
        stride: usize,
        drop_prob: f64,
        spec: &EfficientNetSpec,
        device: &Device,
    ) -> Self {
        let Stage {
            fused,
            expand,
            kernel,
            cout,
            ..
        } = *row;
        let norm = spec.norm();
        let expanded = make_divisible((cin * expand) as f64, 8);
        let cna = |conv: ConvSpec, act: bool| {
            Layer::Conv2dNormActivation(conv_bn_act(conv, act.then(silu), norm, device))
        };
        let mut block = Vec::new();
        if fused {
            if expanded != cin {
                block.push(cna(ConvSpec::new(cin, expanded, kernel, stride), true));
                block.push(cna(ConvSpec::new(expanded, cout, 1, 1), false));
            } else {
                block.push(cna(ConvSpec::new(cin, cout, kernel, stride), true));
            }
        } else {
            if expanded != cin {
                block.push(cna(ConvSpec::new(cin, expanded, 1, 1), true));
            }
            let depthwise = ConvSpec::new(expanded, expanded, kernel, stride).groups(expanded);
            block.push(cna(depthwise, true));
            block.push(Layer::SqueezeExcitation(SqueezeExcitation::new(
                expanded,
                (cin / 4).max(1),
                Activation::silu_sigmoid(),
                device,
            )));
            block.push(cna(ConvSpec::new(expanded, cout, 1, 1), false));
        }
        let residual = Residual {
            block,
            stochastic_depth: StochasticDepth::new(drop_prob),
            use_res_connect: stride == 1 && cin == cout,
        };
        if fused {
            Block::FusedMBConv(residual)
        } else {
            Block::MBConv(residual)
        }
    }

    fn residual(&self) -> &Residual {
        match self {
            Block::MBConv(r) | Block::FusedMBConv(r) => r,
        }
    }

    fn residual_mut(&mut self) -> &mut Residual {
        match self {
            Block::MBConv(r) | Block::FusedMBConv(r) => r,
        }
    }
}

/// One child of `features`: the stem and the last 1x1 conv, or a stage of blocks.
#[allow(missing_docs)]
#[derive(Module, Debug)]
pub enum Feature {
    Conv2dNormActivation(Vec<Layer>),
    Sequential(Vec<Block>),
}

/// torchvision's `EfficientNet`, field for field.
#[derive(Module, Debug)]
pub struct EfficientNet {
    /// The stem, one `Sequential` per stage, and the last 1x1 conv.
    pub features: Vec<Feature>,
    /// `Dropout` then the head `Linear` (`classifier.1`).
    pub classifier: Vec<Layer>,
}

impl EfficientNet {
    /// A network of this spec with `num_classes` outputs.
    pub fn new(spec: &EfficientNetSpec, num_classes: usize, device: &Device) -> Self {
        let norm = spec.norm();
        let stages = spec.stages();
        let counts = spec.stage_blocks();
        let total: usize = counts.iter().sum();
        let mut cin = spec.channels(stages[0].cin);
        let stem = ConvSpec::new(3, cin, 3, 2);
        let mut features = vec![Feature::Conv2dNormActivation(conv_bn_act(
            stem,
            Some(silu()),
            norm,
            device,
        ))];
        let mut block_id = 0;
        for (row, &n) in stages.iter().zip(&counts) {
            let row = Stage {
                cout: spec.channels(row.cout),
                ..*row
            };
            let mut stage = Vec::new();
            for i in 0..n {
                let stride = if i == 0 { row.stride } else { 1 };
                let drop_prob = STOCHASTIC_DEPTH * block_id as f64 / total as f64;
                stage.push(Block::new(&row, cin, stride, drop_prob, spec, device));
                cin = row.cout;
                block_id += 1;
            }
            features.push(Feature::Sequential(stage));
        }
        let last = spec.feature_dim();
        features.push(Feature::Conv2dNormActivation(conv_bn_act(
            ConvSpec::new(cin, last, 1, 1),
            Some(silu()),
            norm,
            device,
        )));
        Self {
            features,
            classifier: vec![
                Layer::Dropout(dropout(spec.dropout)),
                Layer::Linear(head(last, num_classes, device)),
            ],
        }
    }
}

/// torchvision's `ImageClassification` preset with an explicit interpolation.
const fn preset(crop: usize, resize: usize, interpolation: Interpolation) -> Preprocess {
    Preprocess::imagenet(crop, resize, interpolation)
}

const BICUBIC: Interpolation = Interpolation::Bicubic;
const BILINEAR: Interpolation = Interpolation::Bilinear;

/// EfficientNet weights: torchvision's one `IMAGENET1K_V1` per model (and B1's V2).
const fn v1(arch: &'static str, url: &'static str, acc1: f64, pre: Preprocess) -> [Weights; 1] {
    [torchvision::weights(arch, "IMAGENET1K_V1", url, acc1, pre).default()]
}

const B0_WEIGHTS: &[Weights] = &v1(
    "efficientnet_b0",
    "https://download.pytorch.org/models/efficientnet_b0_rwightman-7f5810bc.pth",
    77.692,
    preset(224, 256, BICUBIC),
);
const B1_WEIGHTS: &[Weights] = &[
    torchvision::weights(
        "efficientnet_b1",
        "IMAGENET1K_V1",
        "https://download.pytorch.org/models/efficientnet_b1_rwightman-bac287d4.pth",
        78.642,
        preset(240, 256, BICUBIC),
    ),
    torchvision::weights(
        "efficientnet_b1",
        "IMAGENET1K_V2",
        "https://download.pytorch.org/models/efficientnet_b1-c27df63c.pth",
        79.838,
        preset(240, 255, BILINEAR),
    )
    .default(),
];
const B2_WEIGHTS: &[Weights] = &v1(
    "efficientnet_b2",
    "https://download.pytorch.org/models/efficientnet_b2_rwightman-c35c1473.pth",
    80.608,
    preset(288, 288, BICUBIC),
);
const B3_WEIGHTS: &[Weights] = &v1(
    "efficientnet_b3",
    "https://download.pytorch.org/models/efficientnet_b3_rwightman-b3899882.pth",
    82.008,
    preset(300, 320, BICUBIC),
);
const B4_WEIGHTS: &[Weights] = &v1(
    "efficientnet_b4",
    "https://download.pytorch.org/models/efficientnet_b4_rwightman-23ab8bcd.pth",
    83.384,
    preset(380, 384, BICUBIC),
);
const B5_WEIGHTS: &[Weights] = &v1(
    "efficientnet_b5",
    "https://download.pytorch.org/models/efficientnet_b5_lukemelas-1a07897c.pth",
    83.444,
    preset(456, 456, BICUBIC),
);
const B6_WEIGHTS: &[Weights] = &v1(
    "efficientnet_b6",
    "https://download.pytorch.org/models/efficientnet_b6_lukemelas-24a108a5.pth",
    84.008,
    preset(528, 528, BICUBIC),
);
const B7_WEIGHTS: &[Weights] = &v1(
    "efficientnet_b7",
    "https://download.pytorch.org/models/efficientnet_b7_lukemelas-c5b4e57e.pth",
    84.122,
    preset(600, 600, BICUBIC),
);
const V2_S_WEIGHTS: &[Weights] = &v1(
    "efficientnet_v2_s",
    "https://download.pytorch.org/models/efficientnet_v2_s-dd5fe13b.pth",
    84.228,
    preset(384, 384, BILINEAR),
);
const V2_M_WEIGHTS: &[Weights] = &v1(
    "efficientnet_v2_m",
    "https://download.pytorch.org/models/efficientnet_v2_m-dc08266a.pth",
    85.112,
    preset(480, 480, BILINEAR),
);
/// V2-L's weights were trained on inputs scaled to [-1, 1].
const V2_L_WEIGHTS: &[Weights] = &v1(
    "efficientnet_v2_l",
    "https://download.pytorch.org/models/efficientnet_v2_l-59c71312.pth",
    85.808,
    Preprocess {
        mean: [0.5; 3],
        std: [0.5; 3],
        ..preset(480, 480, BICUBIC)
    },
);

/// BatchNorm of V2: eps 1e-3 with PyTorch's momentum.
const V2_NORM: Norm = Norm {
    eps: 1e-3,
    momentum: 0.1,
};

const fn arch(
    name: &'static str,
    variant: EfficientNetSpec,
    weights: &'static [Weights],
) -> Architecture<EfficientNetSpec> {
    Architecture {
        name,
        variant,
        weights,
    }
}

impl Family for EfficientNet {
    type Variant = EfficientNetSpec;
    const TORCH_CLASS: &'static str = "EfficientNet";
    const ARCHITECTURES: &'static [Architecture<EfficientNetSpec>] = {
        use EfficientNetSpec as S;
        use Table::{B, V2L, V2M, V2S};
        const T: Norm = Norm::TORCH;
        &[
            arch("efficientnet_b0", S::new(B, 1.0, 1.0, T, 0.2), B0_WEIGHTS),
            arch("efficientnet_b1", S::new(B, 1.0, 1.1, T, 0.2), B1_WEIGHTS),
            arch("efficientnet_b2", S::new(B, 1.1, 1.2, T, 0.3), B2_WEIGHTS),
            arch("efficientnet_b3", S::new(B, 1.2, 1.4, T, 0.3), B3_WEIGHTS),
            arch("efficientnet_b4", S::new(B, 1.4, 1.8, T, 0.4), B4_WEIGHTS),
            arch(
                "efficientnet_b5",
                S::new(B, 1.6, 2.2, Norm::TF, 0.4),
                B5_WEIGHTS,
            ),
            arch(
                "efficientnet_b6",
                S::new(B, 1.8, 2.6, Norm::TF, 0.5),
                B6_WEIGHTS,
            ),
            arch(
                "efficientnet_b7",
                S::new(B, 2.0, 3.1, Norm::TF, 0.5),
                B7_WEIGHTS,
            ),
            arch(
                "efficientnet_v2_s",
                S::new(V2S, 1.0, 1.0, V2_NORM, 0.2),
                V2_S_WEIGHTS,
            ),
            arch(
                "efficientnet_v2_m",
                S::new(V2M, 1.0, 1.0, V2_NORM, 0.3),
                V2_M_WEIGHTS,
            ),
            arch(
                "efficientnet_v2_l",
                S::new(V2L, 1.0, 1.0, V2_NORM, 0.4),
                V2_L_WEIGHTS,
            ),
        ]
    };
    const HEAD: [&'static str; 2] = ["classifier.1.weight", "classifier.1.bias"];

    fn build(variant: &EfficientNetSpec, num_classes: usize, device: &Device) -> Self {
        Self::new(variant, num_classes, device)
    }

    /// The blocks per stage tell the tables and depths apart, the last stage's channels
    /// the width; of two architectures with the same depths (B1 and B2), the one of that
    /// width.
    fn detect(sd: &StateDict) -> Option<Detected<EfficientNetSpec>> {
        sd.get("features.1.0.block.0.0.weight")?;
        sd.get("classifier.1.weight")?;
        let counts: Vec<usize> = (1..)
            .map(|s| {
                (0..)
                    .take_while(|b| {
                        sd.get(&format!("features.{s}.{b}.block.0.0.weight"))
                            .is_some()
                    })
                    .count()
            })
            .take_while(|&n| n > 0)
            .collect();
        let same_depths = |a: &&Architecture<EfficientNetSpec>| a.variant.stage_blocks() == counts;
        let first = Self::ARCHITECTURES.iter().find(same_depths)?;
        let head_conv = sd.get(&format!("features.{}.0.weight", counts.len() + 1))?;
        let last_stage = *head_conv.shape.get(1)?;
        let width = last_stage as f64 / first.variant.base_last_stage_channels() as f64;
        let arch = Self::ARCHITECTURES
            .iter()
            .filter(same_depths)
            .find(|a| a.variant.width == width)
            .unwrap_or(first);
        Some(Detected {
            arch: arch.name,
            variant: EfficientNetSpec {
                width,
                ..arch.variant.clone()
            },
            num_classes: head_outputs(sd, Self::HEAD[0]),
        })
    }

    fn feature_dim(variant: &EfficientNetSpec) -> usize {
        variant.feature_dim()
    }

    /// `features.0` is the stem, each stage is `features.N`, the last 1x1 conv is
    /// `conv_head`.
    fn freeze_groups(variant: &EfficientNetSpec) -> Vec<FreezeGroup> {
        let stages = variant.stages().len();
        let mut groups = vec![FreezeGroup::new("stem", &["features.0"])];
        for s in 1..=stages {
            groups.push(FreezeGroup::new(
                format!("stage{s}"),
                &[format!("features.{s}").as_str()],
            ));
        }
        groups.push(FreezeGroup::new(
            "conv_head",
            &[format!("features.{}", stages + 1).as_str()],
        ));
        groups.push(FreezeGroup::new("head", &["classifier"]));
        groups
    }

    /// The stem and the first half of the stages, and one more.
    fn default_partial(variant: &EfficientNetSpec) -> String {
        format!("features.0-{}", variant.stages().len() / 2 + 1)
    }

    fn width(variant: &EfficientNetSpec) -> Option<f64> {
        Some(variant.width)
    }

    fn with_width(variant: &EfficientNetSpec, width: f64) -> EfficientNetSpec {
        EfficientNetSpec {
            width,
            ..variant.clone()
        }
    }

    fn distinction(variant: &EfficientNetSpec) -> Option<String> {
        let standard = Self::ARCHITECTURES.iter().any(|a| {
            let v = &a.variant;
            (v.table, v.depth, v.width) == (variant.table, variant.depth, variant.width)
        });
        (!standard).then(|| format!("width {}", variant.width))
    }

    fn head(&self) -> &Linear {
        classifier_head(&self.classifier, 1)
    }

    fn reset_classifier(&mut self, num_classes: usize, device: &Device) {
        reset_classifier_head(&mut self.classifier, 1, num_classes, device);
    }

    fn forward_features(&self, x: Tensor<4>) -> Tensor<4> {
        self.features.iter().fold(x, |x, f| match f {
            Feature::Conv2dNormActivation(layers) => sequential(layers, x),
            Feature::Sequential(blocks) => blocks.iter().fold(x, |x, b| b.residual().forward(x)),
        })
    }

    fn forward_head(&self, pooled: Tensor<2>) -> Tensor<2> {
        self.classifier.iter().fold(pooled, |x, l| l.forward_2d(x))
    }

    fn fold_batchnorm(&mut self) {
        for f in &mut self.features {
            match f {
                Feature::Conv2dNormActivation(layers) => fold_sequential(layers),
                Feature::Sequential(blocks) => blocks
                    .iter_mut()
                    .for_each(|b| fold_sequential(&mut b.residual_mut().block)),
            }
        }
    }

    fn onnx(&self, g: &mut Graph, x: &Value) -> Result<Value> {
        let mut x = x.clone();
        for (i, f) in self.features.iter().enumerate() {
            let scope = format!("features.{i}");
            x = match f {
                Feature::Conv2dNormActivation(layers) => sequential_onnx(layers, g, &scope, &x)?,
                Feature::Sequential(blocks) => {
                    for (j, block) in blocks.iter().enumerate() {
                        x = block.residual().onnx(g, &child(&scope, j), &x)?;
                    }
                    x
                }
            };
        }
        let pooled = g.global_avg_pool("avgpool", &x);
        sequential_onnx(&self.classifier, g, "classifier", &pooled)
    }
}
