//! torchvision's `mobilenet_v2`, with its width multiplier.

use burn::module::Module;
use burn::nn::Linear;
use burn::prelude::*;

use super::batch_norm::BatchNorm;
use super::layers::{ConvSpec, Layer, conv_bn_act, dropout, global_avg_pool, head, relu6};
use super::layers::{fold_sequential, sequential};

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

/// torchvision's `_make_divisible`: round to a multiple of 8, never more than 10% down.
pub fn make_divisible(v: f64, divisor: usize) -> usize {
    let d = divisor as f64;
    let mut new_v = (((v + d / 2.0) as usize) / divisor * divisor).max(divisor);
    if (new_v as f64) < 0.9 * v {
        new_v += divisor;
    }
    new_v
}

/// Channels of the last feature layer, which feeds the classifier.
pub fn feature_dim(width: f64) -> usize {
    make_divisible(1280.0 * width.max(1.0), 8)
}

/// The width multiplier a state dict was made with, read from its last block's output.
pub fn width_from_channels(last_block_out: usize) -> f64 {
    last_block_out as f64 / 320.0
}

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
                relu6(),
                device,
            )));
        }
        let depthwise = ConvSpec::new(hidden, hidden, 3, stride).groups(hidden);
        conv.push(Layer::Sequential(conv_bn_act(depthwise, relu6(), device)));
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
}

#[derive(Module, Debug)]
pub enum Feature {
    Conv2dNormActivation(Vec<Layer>),
    InvertedResidual(InvertedResidual),
}

#[derive(Module, Debug)]
pub struct MobileNetV2 {
    pub features: Vec<Feature>,
    pub classifier: Vec<Layer>,
}

impl MobileNetV2 {
    pub fn new(width: f64, num_classes: usize, device: &Device) -> Self {
        let mut cin = make_divisible(32.0 * width, 8);
        let mut features = vec![Feature::Conv2dNormActivation(conv_bn_act(
            ConvSpec::new(3, cin, 3, 2),
            relu6(),
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
            relu6(),
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

    pub fn forward_features(&self, x: Tensor<4>) -> Tensor<4> {
        self.features.iter().fold(x, |x, f| match f {
            Feature::Conv2dNormActivation(layers) => sequential(layers, x),
            Feature::InvertedResidual(block) => block.forward(x),
        })
    }

    /// Fold BatchNorm into the convolutions (inference only).
    pub fn fold_batchnorm(&mut self) {
        for f in &mut self.features {
            match f {
                Feature::Conv2dNormActivation(layers) => fold_sequential(layers),
                Feature::InvertedResidual(block) => fold_sequential(&mut block.conv),
            }
        }
    }

    /// The classifier's Linear layer (`classifier.1`).
    pub fn head(&self) -> &Linear {
        match &self.classifier[1] {
            Layer::Linear(linear) => linear,
            other => unreachable!("classifier.1 is Linear, found {other:?}"),
        }
    }

    pub fn forward_head(&self, pooled: Tensor<2>) -> Tensor<2> {
        self.classifier.iter().fold(pooled, |x, l| l.forward_2d(x))
    }

    pub fn embed(&self, x: Tensor<4>) -> Tensor<2> {
        global_avg_pool(self.forward_features(x))
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
