//! Building blocks shared by the model files.
//!
//! Models mirror PyTorch's module tree field for field, so that burn's module paths *are*
//! the PyTorch state-dict keys: a torch `nn.Sequential` becomes a `Vec<Layer>` (its
//! children are numbered the same way), a named child becomes a struct field of the same
//! name. Only BatchNorm's `weight`/`bias` (burn: `gamma`/`beta`) and Linear's transposed
//! weight differ, and burn-store's PyTorch adapters translate exactly those.

use burn::module::Module;
use burn::nn::activation::Relu6;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::pool::MaxPool2d;
use burn::nn::{Dropout, DropoutConfig, Initializer, Linear, LinearConfig, PaddingConfig2d, Relu};

use super::batch_norm::BatchNorm;
use crate::kernels;
use burn::prelude::*;

/// One child of a PyTorch `nn.Sequential`.
/// Variants are named after the PyTorch classes, which the module view shows.
#[derive(Module, Debug)]
#[allow(missing_docs)]
pub enum Layer {
    Conv2d(Conv2d),
    BatchNorm2d(BatchNorm),
    ReLU(Relu),
    ReLU6(Relu6),
    MaxPool2d(MaxPool2d),
    Dropout(Dropout),
    Linear(Linear),
    Sequential(Vec<Layer>),
}

impl Layer {
    /// Run the layer on an NCHW input. A `Linear` panics: it takes pooled features,
    /// see [`Self::forward_2d`].
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        match self {
            Layer::Conv2d(m) => kernels::conv2d(m, x),
            Layer::BatchNorm2d(m) => m.forward(x),
            Layer::ReLU(m) => m.forward(x),
            Layer::ReLU6(_) => kernels::relu6(x),
            Layer::MaxPool2d(m) => kernels::max_pool2d(m, x),
            Layer::Dropout(m) => m.forward(x),
            Layer::Sequential(layers) => sequential(layers, x),
            Layer::Linear(_) => panic!("a Linear layer takes a 2-D input"),
        }
    }

    /// Forward for the classifier part, on pooled features.
    pub fn forward_2d(&self, x: Tensor<2>) -> Tensor<2> {
        match self {
            Layer::Linear(m) => m.forward(x),
            Layer::Dropout(m) => m.forward(x),
            Layer::ReLU(m) => m.forward(x),
            Layer::ReLU6(_) => kernels::relu6(x),
            other => panic!("{other:?} takes a 4-D input"),
        }
    }
}

/// Fold every `Conv2d` directly followed by a `BatchNorm2d` (nested sequences included).
pub fn fold_sequential(layers: &mut [Layer]) {
    for i in 0..layers.len() {
        if let Layer::Sequential(inner) = &mut layers[i] {
            fold_sequential(inner);
        }
        if let [Layer::Conv2d(conv), Layer::BatchNorm2d(bn), ..] = &mut layers[i..] {
            bn.fold_into(conv);
        }
    }
}

/// Run `layers` in order, as `nn.Sequential.forward` does.
pub fn sequential(layers: &[Layer], x: Tensor<4>) -> Tensor<4> {
    layers.iter().fold(x, |x, layer| layer.forward(x))
}

/// Kaiming-normal with fan_out, as torchvision initialises its convolutions.
fn conv_init() -> Initializer {
    Initializer::KaimingNormal {
        gain: std::f64::consts::SQRT_2,
        fan_out_only: true,
    }
}

/// Convolution parameters, in PyTorch's argument order.
#[derive(Debug, Clone, Copy)]
pub struct ConvSpec {
    /// Input channels (`in_channels`).
    pub cin: usize,
    /// Output channels (`out_channels`).
    pub cout: usize,
    /// Side of the square kernel (`kernel_size`).
    pub kernel: usize,
    /// Stride in both directions.
    pub stride: usize,
    /// Channel groups: 1 for a dense conv, `cin` for a depthwise one.
    pub groups: usize,
    /// (top, left, bottom, right); asymmetric for TensorFlow 'SAME' padding.
    pub padding: [usize; 4],
    /// Whether the conv has a bias.
    pub bias: bool,
}

impl ConvSpec {
    /// A bias-free conv with PyTorch's symmetric `(kernel - 1) / 2` padding.
    pub fn new(cin: usize, cout: usize, kernel: usize, stride: usize) -> Self {
        let p = (kernel - 1) / 2;
        Self {
            cin,
            cout,
            kernel,
            stride,
            groups: 1,
            padding: [p; 4],
            bias: false,
        }
    }

    /// With `groups` channel groups (`cin` for a depthwise conv).
    pub fn groups(mut self, groups: usize) -> Self {
        self.groups = groups;
        self
    }

    /// With explicit (top, left, bottom, right) padding.
    pub fn padding(mut self, padding: [usize; 4]) -> Self {
        self.padding = padding;
        self
    }

    /// Build the conv, initialised as torchvision initialises its convolutions.
    pub fn init(self, device: &Device) -> Conv2d {
        let [t, l, b, r] = self.padding;
        Conv2dConfig::new([self.cin, self.cout], [self.kernel, self.kernel])
            .with_stride([self.stride, self.stride])
            .with_groups(self.groups)
            .with_padding(PaddingConfig2d::Explicit(t, l, b, r))
            .with_bias(self.bias)
            .with_initializer(conv_init())
            .init(device)
    }
}

/// A freshly initialised classifier: small normal weights, zero bias (as torchvision's
/// MobileNetV2 and timm's heads), so a new head starts near uniform predictions.
pub fn head(features: usize, classes: usize, device: &Device) -> Linear {
    LinearConfig::new(features, classes)
        .with_initializer(Initializer::Normal {
            mean: 0.0,
            std: 0.01,
        })
        .init(device)
}

/// Dropout that zeroes with probability `prob` (`nn.Dropout(p)`).
pub fn dropout(prob: f64) -> Dropout {
    DropoutConfig::new(prob).init()
}

/// `conv -> bn -> activation` as torchvision's `Conv2dNormActivation` (children 0, 1, 2).
pub fn conv_bn_act(spec: ConvSpec, act: Layer, device: &Device) -> Vec<Layer> {
    vec![
        Layer::Conv2d(spec.init(device)),
        Layer::BatchNorm2d(BatchNorm::new(spec.cout, 1e-5, 0.1, device)),
        act,
    ]
}

/// `nn.ReLU6` as a [`Layer`].
pub fn relu6() -> Layer {
    Layer::ReLU6(Relu6::new())
}

/// Global average pooling to `[N, C]`.
pub fn global_avg_pool(x: Tensor<4>) -> Tensor<2> {
    let [n, c, h, w] = x.dims();
    x.reshape([n, c, h * w]).mean_dim(2).reshape([n, c])
}
