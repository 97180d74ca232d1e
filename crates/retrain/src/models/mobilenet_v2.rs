//! torchvision's `mobilenet_v2`, with its width multiplier.

use burn::module::Module;
use burn::nn::Linear;
use burn::prelude::*;
use serde::{Deserialize, Serialize};

use super::batch_norm::BatchNorm;
use super::family::{Architecture, Detected, Family, FreezeGroup, head_outputs};
use super::layers::{
    ConvSpec, Layer, Norm, classifier_head, conv_bn_act, dropout, head, make_divisible, relu6,
    reset_classifier_head,
};
use super::layers::{fold_sequential, sequential, sequential_onnx};
use super::onnx_graph::{Graph, Value, child};
use super::weights::{Weights, torchvision};
use crate::checkpoint::StateDict;
use crate::error::Result;

/// (expansion t, output channels c, repeats n, first stride s), torchvision's table.
const SETTINGS: [(usize, usize, usize, usize); 7] = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
];

/// Channels of the last feature layer, which feeds the classifier.
pub fn feature_dim(width: f64) -> usize {
    make_divisible(1280.0 * width.max(1.0), 8)
}

/// The width multiplier a state dict was made with, read from its last block's output.
pub fn width_from_channels(last_block_out: usize) -> f64 {
    last_block_out as f64 / 320.0
}

/// A MobileNetV2's width multiplier (torchvision's `width_mult`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Width {
    /// Channels are this multiple of the standard ones, rounded by [`make_divisible`].
    pub width: f64,
}

const WEIGHTS: &[Weights] = &torchvision::v1_v2(
    "mobilenet_v2",
    (
        "https://download.pytorch.org/models/mobilenet_v2-b0353104.pth",
        71.878,
    ),
    (
        "https://download.pytorch.org/models/mobilenet_v2-7ebf99e0.pth",
        72.154,
    ),
);

/// torchvision's `InvertedResidual`: 1x1 expansion (unless the ratio is 1), 3x3 depthwise,
/// 1x1 linear projection, with a residual connection when the shape is kept.
#[derive(Module, Debug)]
pub struct InvertedResidual {
    conv: Vec<Layer>,
    use_res_connect: bool,
}

impl InvertedResidual {
    fn new(cin: usize, cout: usize, stride: usize, expand: usize, device: &Device) -> Self {
        let hidden = cin * expand;
        let mut conv = Vec::new();
        if expand != 1 {
            conv.push(Layer::Sequential(conv_bn_act(
                ConvSpec::new(cin, hidden, 1, 1),
                Some(relu6()),
                Norm::TORCH,
                device,
            )));
        }
        let depthwise = ConvSpec::new(hidden, hidden, 3, stride).groups(hidden);
        conv.push(Layer::Sequential(conv_bn_act(
            depthwise,
            Some(relu6()),
            Norm::TORCH,
            device,
        )));
        conv.push(Layer::Conv2d(
            ConvSpec::new(hidden, cout, 1, 1).init(device),
        ));
        conv.push(Layer::BatchNorm2d(BatchNorm::new(cout, 1e-5, 0.1, device)));
        Self {
            conv,
            use_res_connect: stride == 1 && cin == cout,
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let y = sequential(&self.conv, x.clone());
        if self.use_res_connect { x + y } else { y }
    }

    fn onnx(&self, g: &mut Graph, scope: &str, x: &Value) -> Result<Value> {
        let y = sequential_onnx(&self.conv, g, &child(scope, "conv"), x)?;
        Ok(if self.use_res_connect {
            g.add(scope, x, &y)
        } else {
            y
        })
    }
}

/// One child of `features`: the stem and last 1x1 conv are `Conv2dNormActivation`s, the
/// rest inverted-residual blocks; variants named after torchvision's classes.
#[allow(missing_docs)]
#[derive(Module, Debug)]
pub enum Feature {
    Conv2dNormActivation(Vec<Layer>),
    InvertedResidual(InvertedResidual),
}

/// torchvision's `MobileNetV2`, field for field.
#[derive(Module, Debug)]
pub struct MobileNetV2 {
    /// The backbone, `features.0` to `features.18`.
    pub features: Vec<Feature>,
    /// `Dropout(0.2)` then the `Linear` head (`classifier.1`).
    pub classifier: Vec<Layer>,
}

impl MobileNetV2 {
    /// A network of this width with `num_classes` outputs.
    pub fn new(width: f64, num_classes: usize, device: &Device) -> Self {
        let mut cin = make_divisible(32.0 * width, 8);
        let mut features = vec![Feature::Conv2dNormActivation(conv_bn_act(
            ConvSpec::new(3, cin, 3, 2),
            Some(relu6()),
            Norm::TORCH,
            device,
        ))];
        for (t, c, n, s) in SETTINGS {
            let cout = make_divisible(c as f64 * width, 8);
            for i in 0..n {
                let stride = if i == 0 { s } else { 1 };
                features.push(Feature::InvertedResidual(InvertedResidual::new(
                    cin, cout, stride, t, device,
                )));
                cin = cout;
            }
        }
        let last = feature_dim(width);
        features.push(Feature::Conv2dNormActivation(conv_bn_act(
            ConvSpec::new(cin, last, 1, 1),
            Some(relu6()),
            Norm::TORCH,
            device,
        )));
        let classifier = vec![
            Layer::Dropout(dropout(0.2)),
            Layer::Linear(head(last, num_classes, device)),
        ];
        Self {
            features,
            classifier,
        }
    }
}

impl Family for MobileNetV2 {
    type Variant = Width;
    const TORCH_CLASS: &'static str = "MobileNetV2";
    const ARCHITECTURES: &'static [Architecture<Width>] = &[Architecture {
        name: "mobilenet_v2",
        variant: Width { width: 1.0 },
        weights: WEIGHTS,
    }];
    const HEAD: [&'static str; 2] = ["classifier.1.weight", "classifier.1.bias"];

    fn build(variant: &Width, num_classes: usize, device: &Device) -> Self {
        Self::new(variant.width, num_classes, device)
    }

    fn detect(sd: &StateDict) -> Option<Detected<Width>> {
        sd.get("features.1.conv.0.0.weight")?;
        let last = sd
            .get("features.17.conv.2.weight")?
            .shape
            .first()
            .copied()?;
        Some(Detected {
            arch: "mobilenet_v2",
            variant: Width {
                width: width_from_channels(last),
            },
            num_classes: head_outputs(sd, Self::HEAD[0]),
        })
    }

    fn feature_dim(variant: &Width) -> usize {
        feature_dim(variant.width)
    }

    /// `features.0` is the stem; the inverted-residual blocks form the seven stages of
    /// torchvision's table; `features.18` is the last 1x1 convolution.
    fn freeze_groups(_variant: &Width) -> Vec<FreezeGroup> {
        let mut groups = vec![FreezeGroup::new("stem", &["features.0"])];
        let mut first = 1;
        for (i, (_, _, repeats, _)) in SETTINGS.iter().enumerate() {
            let blocks: Vec<String> = (first..first + repeats)
                .map(|b| format!("features.{b}"))
                .collect();
            let blocks: Vec<&str> = blocks.iter().map(String::as_str).collect();
            groups.push(FreezeGroup::new(format!("stage{}", i + 1), &blocks));
            first += repeats;
        }
        groups.push(FreezeGroup::new(
            "conv_head",
            &[format!("features.{first}").as_str()],
        ));
        groups.push(FreezeGroup::new("head", &["classifier"]));
        groups
    }

    /// The stem and the first five stages (torchvision's `features.0-13`).
    fn default_partial(_variant: &Width) -> String {
        "features.0-13".into()
    }

    fn width(variant: &Width) -> Option<f64> {
        Some(variant.width)
    }

    fn with_width(_variant: &Width, width: f64) -> Width {
        Width { width }
    }

    fn distinction(variant: &Width) -> Option<String> {
        (variant.width != 1.0).then(|| format!("width {}", variant.width))
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
            Feature::InvertedResidual(block) => block.forward(x),
        })
    }

    fn forward_head(&self, pooled: Tensor<2>) -> Tensor<2> {
        self.classifier.iter().fold(pooled, |x, l| l.forward_2d(x))
    }

    fn fold_batchnorm(&mut self) {
        for f in &mut self.features {
            match f {
                Feature::Conv2dNormActivation(layers) => fold_sequential(layers),
                Feature::InvertedResidual(block) => fold_sequential(&mut block.conv),
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
        let pooled = g.global_avg_pool("", &x);
        sequential_onnx(&self.classifier, g, "classifier", &pooled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn make_divisible_matches_torchvision() {
        assert_eq!(make_divisible(32.0 * 0.25, 8), 8);
        assert_eq!(make_divisible(24.0 * 0.25, 8), 8);
        assert_eq!(make_divisible(16.0 * 0.35, 8), 8);
        assert_eq!(make_divisible(96.0 * 0.75, 8), 72);
        assert_eq!(feature_dim(1.4), 1792);
    }
}
