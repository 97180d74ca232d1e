//! torchvision's `mobilenet_v3_large` and `mobilenet_v3_small`, with their width
//! multiplier: hardswish, hard-sigmoid squeeze-excitation, BatchNorm eps 1e-3 / momentum
//! 0.01, and a two-Linear classifier whose first Linear is pretrained and kept.

use burn::module::Module;
use burn::nn::Linear;
use burn::prelude::*;
use serde::{Deserialize, Serialize};

use super::family::{Architecture, Detected, Family, FreezeGroup, head_outputs};
use super::layers::{
    Activation, ConvSpec, Layer, Norm, SqueezeExcitation, classifier_head, conv_bn_act, dropout,
    fold_sequential, global_avg_pool, hardswish, head, make_divisible, relu, reset_classifier_head,
    sequential, sequential_onnx,
};
use super::onnx_graph::{Graph, Value, child};
use super::weights::{Weights, torchvision};
use crate::checkpoint::StateDict;
use crate::error::Result;

/// The two sizes of the paper's Tables 1 and 2.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Size {
    /// `mobilenet_v3_large`.
    Large,
    /// `mobilenet_v3_small`.
    Small,
}

/// One inverted-residual row: (kernel, expanded channels, output channels,
/// squeeze-excitation, hardswish rather than ReLU, stride). The input channels are the
/// previous row's output (16 for the first).
type Row = (usize, usize, usize, bool, bool, usize);

const LARGE: [Row; 15] = [
    (3, 16, 16, false, false, 1),
    (3, 64, 24, false, false, 2),
    (3, 72, 24, false, false, 1),
    (5, 72, 40, true, false, 2),
    (5, 120, 40, true, false, 1),
    (5, 120, 40, true, false, 1),
    (3, 240, 80, false, true, 2),
    (3, 200, 80, false, true, 1),
    (3, 184, 80, false, true, 1),
    (3, 184, 80, false, true, 1),
    (3, 480, 112, true, true, 1),
    (3, 672, 112, true, true, 1),
    (5, 672, 160, true, true, 2),
    (5, 960, 160, true, true, 1),
    (5, 960, 160, true, true, 1),
];

const SMALL: [Row; 11] = [
    (3, 16, 16, true, false, 2),
    (3, 72, 24, false, false, 2),
    (3, 88, 24, false, false, 1),
    (5, 96, 40, true, true, 2),
    (5, 240, 40, true, true, 1),
    (5, 240, 40, true, true, 1),
    (5, 120, 48, true, true, 1),
    (5, 144, 48, true, true, 1),
    (5, 288, 96, true, true, 2),
    (5, 576, 96, true, true, 1),
    (5, 576, 96, true, true, 1),
];

const NORM: Norm = Norm::TF;

/// A MobileNetV3: its size and width multiplier (torchvision's `width_mult`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MobileNetV3Spec {
    /// Large or small.
    pub size: Size,
    /// Channels are this multiple of the paper's, rounded by [`make_divisible`].
    pub width: f64,
}

impl MobileNetV3Spec {
    fn rows(&self) -> &'static [Row] {
        match self.size {
            Size::Large => &LARGE,
            Size::Small => &SMALL,
        }
    }

    fn channels(&self, c: usize) -> usize {
        make_divisible(c as f64 * self.width, 8)
    }

    /// The penultimate width, `classifier.0`'s outputs, before scaling.
    fn base_last_channel(&self) -> usize {
        match self.size {
            Size::Large => 1280,
            Size::Small => 1024,
        }
    }

    /// `classifier.0`'s outputs: the features that enter the head.
    pub fn last_channel(&self) -> usize {
        self.channels(self.base_last_channel())
    }

    /// `features` indices where each stage starts: a stage begins at every stride-2 block.
    fn stage_starts(&self) -> Vec<usize> {
        let rows = self.rows();
        (0..rows.len())
            .filter(|&i| i == 0 || rows[i].5 == 2)
            .map(|i| i + 1)
            .collect()
    }
}

const LARGE_WEIGHTS: &[Weights] = &torchvision::v1_v2(
    "mobilenet_v3_large",
    (
        "https://download.pytorch.org/models/mobilenet_v3_large-8738ca79.pth",
        74.042,
    ),
    (
        "https://download.pytorch.org/models/mobilenet_v3_large-5c1a4163.pth",
        75.274,
    ),
);

const SMALL_WEIGHTS: &[Weights] = &torchvision::v1(
    "mobilenet_v3_small",
    "https://download.pytorch.org/models/mobilenet_v3_small-047dcff4.pth",
    67.668,
);

/// torchvision's MobileNetV3 `InvertedResidual`: 1x1 expansion (unless the widths agree),
/// depthwise conv, squeeze-excitation where the table says, 1x1 linear projection, and a
/// residual connection when the shape is kept.
#[derive(Module, Debug)]
pub struct InvertedResidual {
    block: Vec<Layer>,
    use_res_connect: bool,
}

impl InvertedResidual {
    fn new(cin: usize, row: Row, spec: &MobileNetV3Spec, device: &Device) -> Self {
        let (kernel, expanded, out, use_se, use_hs, stride) = row;
        let (expanded, out) = (spec.channels(expanded), spec.channels(out));
        let act = || if use_hs { hardswish() } else { relu() };
        let mut block = Vec::new();
        if expanded != cin {
            let expand = ConvSpec::new(cin, expanded, 1, 1);
            block.push(Layer::Conv2dNormActivation(conv_bn_act(
                expand,
                Some(act()),
                NORM,
                device,
            )));
        }
        let depthwise = ConvSpec::new(expanded, expanded, kernel, stride).groups(expanded);
        block.push(Layer::Conv2dNormActivation(conv_bn_act(
            depthwise,
            Some(act()),
            NORM,
            device,
        )));
        if use_se {
            block.push(Layer::SqueezeExcitation(SqueezeExcitation::new(
                expanded,
                make_divisible((expanded / 4) as f64, 8),
                Activation::relu_hardsigmoid(),
                device,
            )));
        }
        let project = ConvSpec::new(expanded, out, 1, 1);
        block.push(Layer::Conv2dNormActivation(conv_bn_act(
            project, None, NORM, device,
        )));
        Self {
            block,
            use_res_connect: stride == 1 && cin == out,
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let y = sequential(&self.block, x.clone());
        if self.use_res_connect { y + x } else { y }
    }

    fn onnx(&self, g: &mut Graph, scope: &str, x: &Value) -> Result<Value> {
        let y = sequential_onnx(&self.block, g, &child(scope, "block"), x)?;
        Ok(if self.use_res_connect {
            g.add(scope, &y, x)
        } else {
            y
        })
    }
}

/// One child of `features`; variants named after torchvision's classes.
#[allow(missing_docs)]
#[derive(Module, Debug)]
pub enum Feature {
    Conv2dNormActivation(Vec<Layer>),
    InvertedResidual(InvertedResidual),
}

/// torchvision's `MobileNetV3`, field for field.
#[derive(Module, Debug)]
pub struct MobileNetV3 {
    /// The stem, the inverted-residual blocks and the last 1x1 conv.
    pub features: Vec<Feature>,
    /// `Linear`, `Hardswish`, `Dropout(0.2)`, then the head `Linear` (`classifier.3`).
    pub classifier: Vec<Layer>,
}

impl MobileNetV3 {
    /// A network of this size and width with `num_classes` outputs.
    pub fn new(spec: &MobileNetV3Spec, num_classes: usize, device: &Device) -> Self {
        let mut cin = spec.channels(16);
        let stem = ConvSpec::new(3, cin, 3, 2);
        let mut features = vec![Feature::Conv2dNormActivation(conv_bn_act(
            stem,
            Some(hardswish()),
            NORM,
            device,
        ))];
        for &row in spec.rows() {
            features.push(Feature::InvertedResidual(InvertedResidual::new(
                cin, row, spec, device,
            )));
            cin = spec.channels(row.2);
        }
        let last_conv = 6 * cin;
        features.push(Feature::Conv2dNormActivation(conv_bn_act(
            ConvSpec::new(cin, last_conv, 1, 1),
            Some(hardswish()),
            NORM,
            device,
        )));
        let last = spec.last_channel();
        let classifier = vec![
            Layer::Linear(head(last_conv, last, device)),
            hardswish(),
            Layer::Dropout(dropout(0.2)),
            Layer::Linear(head(last, num_classes, device)),
        ];
        Self {
            features,
            classifier,
        }
    }
}

impl Family for MobileNetV3 {
    type Variant = MobileNetV3Spec;
    const TORCH_CLASS: &'static str = "MobileNetV3";
    const ARCHITECTURES: &'static [Architecture<MobileNetV3Spec>] = &[
        Architecture {
            name: "mobilenet_v3_large",
            variant: MobileNetV3Spec {
                size: Size::Large,
                width: 1.0,
            },
            weights: LARGE_WEIGHTS,
        },
        Architecture {
            name: "mobilenet_v3_small",
            variant: MobileNetV3Spec {
                size: Size::Small,
                width: 1.0,
            },
            weights: SMALL_WEIGHTS,
        },
    ];
    const HEAD: [&'static str; 2] = ["classifier.3.weight", "classifier.3.bias"];

    fn build(variant: &MobileNetV3Spec, num_classes: usize, device: &Device) -> Self {
        Self::new(variant, num_classes, device)
    }

    /// The size from the number of blocks, the width from `classifier.0`'s outputs.
    fn detect(sd: &StateDict) -> Option<Detected<MobileNetV3Spec>> {
        sd.get("features.1.block.0.0.weight")?;
        let penultimate = *sd.get("classifier.0.weight")?.shape.first()?;
        let blocks = (1..)
            .take_while(|i| sd.get(&format!("features.{i}.block.0.0.weight")).is_some())
            .count();
        let (arch, size) = match blocks {
            15 => ("mobilenet_v3_large", Size::Large),
            11 => ("mobilenet_v3_small", Size::Small),
            _ => return None,
        };
        let standard = MobileNetV3Spec { size, width: 1.0 };
        let width = penultimate as f64 / standard.base_last_channel() as f64;
        Some(Detected {
            arch,
            variant: MobileNetV3Spec { size, width },
            num_classes: head_outputs(sd, Self::HEAD[0]),
        })
    }

    fn feature_dim(variant: &MobileNetV3Spec) -> usize {
        variant.last_channel()
    }

    /// `features.0` is the stem; a stage starts at each stride-2 block; the last 1x1 conv
    /// is `conv_head`, the pretrained `classifier.0` is `pre_logits`, `classifier.3` the head.
    fn freeze_groups(variant: &MobileNetV3Spec) -> Vec<FreezeGroup> {
        let mut groups = vec![FreezeGroup::new("stem", &["features.0"])];
        let last = variant.rows().len() + 1;
        let mut starts = variant.stage_starts();
        starts.push(last);
        for (i, pair) in starts.windows(2).enumerate() {
            let blocks: Vec<String> = (pair[0]..pair[1])
                .map(|b| format!("features.{b}"))
                .collect();
            let blocks: Vec<&str> = blocks.iter().map(String::as_str).collect();
            groups.push(FreezeGroup::new(format!("stage{}", i + 1), &blocks));
        }
        groups.push(FreezeGroup::new(
            "conv_head",
            &[format!("features.{last}").as_str()],
        ));
        groups.push(FreezeGroup::new("pre_logits", &["classifier.0"]));
        groups.push(FreezeGroup::new("head", &["classifier.3"]));
        groups
    }

    /// The stem and every stage but the last.
    fn default_partial(variant: &MobileNetV3Spec) -> String {
        let starts = variant.stage_starts();
        format!("features.0-{}", starts[starts.len() - 1] - 1)
    }

    fn width(variant: &MobileNetV3Spec) -> Option<f64> {
        Some(variant.width)
    }

    fn with_width(variant: &MobileNetV3Spec, width: f64) -> MobileNetV3Spec {
        MobileNetV3Spec {
            width,
            ..variant.clone()
        }
    }

    fn distinction(variant: &MobileNetV3Spec) -> Option<String> {
        (variant.width != 1.0).then(|| format!("width {}", variant.width))
    }

    fn head(&self) -> &Linear {
        classifier_head(&self.classifier, 3)
    }

    fn reset_classifier(&mut self, num_classes: usize, device: &Device) {
        reset_classifier_head(&mut self.classifier, 3, num_classes, device);
    }

    fn forward_features(&self, x: Tensor<4>) -> Tensor<4> {
        self.features.iter().fold(x, |x, f| match f {
            Feature::Conv2dNormActivation(layers) => sequential(layers, x),
            Feature::InvertedResidual(block) => block.forward(x),
        })
    }

    /// Pooled features through the pretrained `classifier.0` and its hardswish: what
    /// enters the head, and what the feature cache keeps.
    fn embed(&self, x: Tensor<4>) -> Tensor<2> {
        let pooled = global_avg_pool(self.forward_features(x));
        self.classifier[..2]
            .iter()
            .fold(pooled, |x, l| l.forward_2d(x))
    }

    fn forward_head(&self, embedding: Tensor<2>) -> Tensor<2> {
        self.classifier[2..]
            .iter()
            .fold(embedding, |x, l| l.forward_2d(x))
    }

    fn fold_batchnorm(&mut self) {
        for f in &mut self.features {
            match f {
                Feature::Conv2dNormActivation(layers) => fold_sequential(layers),
                Feature::InvertedResidual(block) => fold_sequential(&mut block.block),
            }
        }
    }

    fn onnx(&self, g: &mut Graph, x: &Value) -> Result<Value> {
        let mut x = x.clone();
        for (i, f) in self.features.iter().enumerate() {
            let scope = format!("features.{i}");
            x = match f {
                Feature::Conv2dNormActivation(layers) => sequential_onnx(layers, g, &scope, &x)?,
                Feature::InvertedResidual(block) => block.onnx(g, &scope, &x)?,
            };
        }
        let pooled = g.global_avg_pool("avgpool", &x);
        sequential_onnx(&self.classifier, g, "classifier", &pooled)
    }
}
