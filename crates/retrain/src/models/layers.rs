//! Building blocks shared by the model files.
//!
//! Models mirror PyTorch's module tree field for field, so that burn's module paths *are*
//! the PyTorch state-dict keys: a torch `nn.Sequential` becomes a `Vec<Layer>` (its
//! children are numbered the same way), a named child becomes a struct field of the same
//! name. Only BatchNorm's `weight`/`bias` (burn: `gamma`/`beta`) and Linear's transposed
//! weight differ, and burn-store's PyTorch adapters translate exactly those.

use burn::module::{Flag, Module, Param};
use burn::nn::activation::{HardSigmoid, HardSigmoidConfig, HardSwish, Relu6, SiLU, Sigmoid};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::pool::MaxPool2d;
use burn::nn::{
    Dropout, DropoutConfig, Gelu, Initializer, Linear, LinearConfig, PaddingConfig2d, Relu,
};
use burn::tensor::Distribution;

use super::batch_norm::BatchNorm;
use super::onnx_graph::{Graph, Value, child};
use crate::error::Result;
use crate::kernels;
use burn::prelude::*;

/// One child of a PyTorch `nn.Sequential`.
/// Variants are named after the PyTorch classes, which the module view shows.
// A network is built once and moved rarely; boxing the variants buys nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
#[allow(missing_docs)]
pub enum Layer {
    Conv2d(Conv2d),
    BatchNorm2d(BatchNorm),
    ReLU(Relu),
    ReLU6(Relu6),
    Hardswish(HardSwish),
    SiLU(SiLU),
    GELU(Gelu),
    LayerNorm(LayerNorm),
    LayerNorm2d(LayerNorm),
    Permute(Permute),
    Flatten(Flatten),
    MaxPool2d(MaxPool2d),
    Dropout(Dropout),
    Linear(Linear),
    Sequential(Vec<Layer>),
    Conv2dNormActivation(Vec<Layer>),
    SqueezeExcitation(SqueezeExcitation),
}

impl Layer {
    /// Run the layer on a 4-D input: NCHW, or NHWC between two `Permute`s (where `Linear`
    /// and `LayerNorm` act on the last dimension, as in PyTorch). `Flatten` panics: it
    /// belongs to a classifier, see [`Self::forward_2d`].
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        match self {
            Layer::Conv2d(m) => kernels::conv2d(m, x),
            Layer::BatchNorm2d(m) => m.forward(x),
            Layer::ReLU(m) => m.forward(x),
            Layer::ReLU6(_) => kernels::relu6(x),
            Layer::Hardswish(_) => kernels::hardswish(x),
            Layer::SiLU(_) => kernels::silu(x),
            Layer::GELU(_) => kernels::gelu(x),
            Layer::LayerNorm(m) => m.forward(x),
            Layer::LayerNorm2d(m) => m.forward(x.permute([0, 2, 3, 1])).permute([0, 3, 1, 2]),
            Layer::Permute(p) => x.permute(p.dims),
            Layer::Linear(m) => m.forward(x),
            Layer::MaxPool2d(m) => kernels::max_pool2d(m, x),
            Layer::Dropout(m) => m.forward(x),
            Layer::Sequential(layers) | Layer::Conv2dNormActivation(layers) => {
                sequential(layers, x)
            }
            Layer::SqueezeExcitation(m) => m.forward(x),
            Layer::Flatten(_) => panic!("Flatten belongs to a classifier's 2-D input"),
        }
    }

    /// The activation this layer is, as a convolution can apply it to its output.
    fn conv_activation(&self) -> Option<kernels::ConvActivation> {
        use kernels::{Activation, ConvActivation};
        Some(match self {
            Layer::ReLU(_) => ConvActivation::Relu,
            Layer::ReLU6(_) => ConvActivation::Relu6,
            Layer::SiLU(_) => ConvActivation::Native(Activation::Silu),
            Layer::Hardswish(_) => ConvActivation::Native(Activation::Hardswish),
            Layer::GELU(_) => ConvActivation::Native(Activation::Gelu),
            _ => return None,
        })
    }

    /// Forward for the classifier part, on pooled features.
    pub fn forward_2d(&self, x: Tensor<2>) -> Tensor<2> {
        match self {
            Layer::Linear(m) => m.forward(x),
            Layer::Dropout(m) => m.forward(x),
            Layer::ReLU(m) => m.forward(x),
            Layer::ReLU6(_) => kernels::relu6(x),
            Layer::Hardswish(_) => kernels::hardswish(x),
            // On pooled `[N, C]` features a LayerNorm2d normalises over C, as on `[N, C, 1, 1]`.
            Layer::LayerNorm(m) | Layer::LayerNorm2d(m) => m.forward(x),
            Layer::Flatten(_) => x,
            other => panic!("{other:?} takes a 4-D input"),
        }
    }

    /// Write the layer into an ONNX graph, as [`Self::forward`] (or, on a 2-D value,
    /// [`Self::forward_2d`]) computes it in eval mode.
    pub fn onnx(&self, g: &mut Graph, scope: &str, x: &Value) -> Result<Value> {
        Ok(match self {
            Layer::Conv2d(m) => g.conv2d(scope, m, x)?,
            Layer::BatchNorm2d(m) => g.batch_norm(scope, m, x)?,
            Layer::ReLU(_) => g.unary("Relu", scope, x),
            Layer::ReLU6(_) => g.relu6(scope, x),
            Layer::Hardswish(_) => g.unary("HardSwish", scope, x),
            Layer::SiLU(_) => g.silu(scope, x),
            // Every GELU here is the exact one (`Gelu::new()`), as torchvision's.
            Layer::GELU(_) => g.gelu(scope, x),
            Layer::LayerNorm(m) => g.layer_norm(scope, m, x)?,
            Layer::LayerNorm2d(m) if x.rank() == 4 => {
                let nhwc = g.transpose(scope, &[0, 2, 3, 1], x);
                let y = g.layer_norm(scope, m, &nhwc)?;
                g.transpose(scope, &[0, 3, 1, 2], &y)
            }
            Layer::LayerNorm2d(m) => g.layer_norm(scope, m, x)?,
            Layer::Permute(p) => g.transpose(scope, &p.dims, x),
            Layer::Flatten(_) => g.flatten(scope, x),
            Layer::Linear(m) => g.linear(scope, m, x)?,
            Layer::MaxPool2d(m) => g.max_pool2d(scope, m, x)?,
            Layer::Dropout(_) => x.clone(),
            Layer::Sequential(layers) | Layer::Conv2dNormActivation(layers) => {
                sequential_onnx(layers, g, scope, x)?
            }
            Layer::SqueezeExcitation(m) => m.onnx(g, scope, x)?,
        })
    }
}

/// Write `layers` into an ONNX graph in order; children are numbered as in PyTorch.
pub fn sequential_onnx(layers: &[Layer], g: &mut Graph, scope: &str, x: &Value) -> Result<Value> {
    let mut x = x.clone();
    for (i, layer) in layers.iter().enumerate() {
        x = layer.onnx(g, &child(scope, i), &x)?;
    }
    Ok(x)
}

/// Fold every `Conv2d` directly followed by a `BatchNorm2d` (nested sequences included).
pub fn fold_sequential(layers: &mut [Layer]) {
    for i in 0..layers.len() {
        if let Layer::Sequential(inner) | Layer::Conv2dNormActivation(inner) = &mut layers[i] {
            fold_sequential(inner);
        }
        if let [Layer::Conv2d(conv), Layer::BatchNorm2d(bn), ..] = &mut layers[i..] {
            bn.fold_into(conv);
        }
    }
}

/// Run `layers` in order, as `nn.Sequential.forward` does. A convolution with its
/// BatchNorm folded in (at inference) runs as one op with the activation after it.
pub fn sequential(layers: &[Layer], mut x: Tensor<4>) -> Tensor<4> {
    let mut rest = layers;
    while let Some((layer, tail)) = rest.split_first() {
        if let [Layer::Conv2d(conv), Layer::BatchNorm2d(bn), after, ..] = rest
            && bn.folded
            && let Some(activation) = after.conv_activation()
        {
            x = kernels::conv2d_activation(conv, x, activation);
            rest = &rest[3..];
            continue;
        }
        x = layer.forward(x);
        rest = tail;
    }
    x
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

    /// With a bias (zero-initialised, as torchvision initialises conv biases).
    pub fn bias(mut self) -> Self {
        self.bias = true;
        self
    }

    /// Build the conv, initialised as torchvision initialises its convolutions.
    pub fn init(self, device: &Device) -> Conv2d {
        let [t, l, b, r] = self.padding;
        let mut conv = Conv2dConfig::new([self.cin, self.cout], [self.kernel, self.kernel])
            .with_stride([self.stride, self.stride])
            .with_groups(self.groups)
            .with_padding(PaddingConfig2d::Explicit(t, l, b, r))
            .with_bias(self.bias)
            .with_initializer(conv_init())
            .init(device);
        conv.bias = conv
            .bias
            .map(|b| Param::from_tensor(Tensor::zeros(b.dims(), device)));
        conv
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

/// The head Linear at `classifier[index]` (a torchvision `classifier` Sequential).
pub fn classifier_head(classifier: &[Layer], index: usize) -> &Linear {
    match &classifier[index] {
        Layer::Linear(linear) => linear,
        other => unreachable!("classifier.{index} is Linear, found {other:?}"),
    }
}

/// Replace the head Linear at `classifier[index]` by a new one with `num_classes` outputs.
pub fn reset_classifier_head(
    classifier: &mut [Layer],
    index: usize,
    num_classes: usize,
    device: &Device,
) {
    let features = classifier_head(classifier, index).weight.dims()[0];
    classifier[index] = Layer::Linear(head(features, num_classes, device));
}

/// Dropout that zeroes with probability `prob` (`nn.Dropout(p)`).
pub fn dropout(prob: f64) -> Dropout {
    DropoutConfig::new(prob).init()
}

/// BatchNorm's `eps` and `momentum`, as a family's `norm_layer` sets them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Norm {
    /// Added to the variance.
    pub eps: f64,
    /// PyTorch's running-average momentum.
    pub momentum: f64,
}

impl Norm {
    /// `nn.BatchNorm2d`'s defaults.
    pub const TORCH: Norm = Norm {
        eps: 1e-5,
        momentum: 0.1,
    };
    /// TensorFlow's (eps 1e-3, decay 0.99), which ports of TF-trained networks keep.
    pub const TF: Norm = Norm {
        eps: 1e-3,
        momentum: 0.01,
    };

    /// A BatchNorm over `channels` channels.
    pub fn layer(self, channels: usize, device: &Device) -> BatchNorm {
        BatchNorm::new(channels, self.eps, self.momentum, device)
    }
}

/// `conv -> bn [-> activation]` as torchvision's `Conv2dNormActivation` (children 0, 1, 2).
pub fn conv_bn_act(spec: ConvSpec, act: Option<Layer>, norm: Norm, device: &Device) -> Vec<Layer> {
    let mut layers = vec![
        Layer::Conv2d(spec.init(device)),
        Layer::BatchNorm2d(norm.layer(spec.cout, device)),
    ];
    layers.extend(act);
    layers
}

/// torchvision's `_make_divisible`: round to a multiple of `divisor`, never below it and
/// never more than 10% down.
pub fn make_divisible(v: f64, divisor: usize) -> usize {
    let d = divisor as f64;
    let mut new_v = (((v + d / 2.0) as usize) / divisor * divisor).max(divisor);
    if (new_v as f64) < 0.9 * v {
        new_v += divisor;
    }
    new_v
}

/// `nn.ReLU` as a [`Layer`].
pub fn relu() -> Layer {
    Layer::ReLU(Relu::new())
}

/// `nn.ReLU6` as a [`Layer`].
pub fn relu6() -> Layer {
    Layer::ReLU6(Relu6::new())
}

/// `nn.Hardswish` as a [`Layer`].
pub fn hardswish() -> Layer {
    Layer::Hardswish(HardSwish::new())
}

/// `nn.SiLU` (swish) as a [`Layer`].
pub fn silu() -> Layer {
    Layer::SiLU(SiLU::new())
}

/// `torchvision.ops.Permute`: reorders the dimensions (NCHW <-> NHWC).
#[derive(Module, Debug)]
pub struct Permute {
    /// The new order, as `Tensor.permute` takes it.
    pub dims: [usize; 4],
}

/// `nn.Flatten(1)` before a classifier's Linear.
#[derive(Module, Debug)]
pub struct Flatten;

/// `nn.LayerNorm` over the last dimension (ConvNeXt's `LayerNorm2d` is the same module
/// applied over channels). burn's `LayerNorm` keeps `epsilon` private, which an export
/// needs; this one has the same type name and fields, so burn-store maps it the same way.
#[derive(Module, Debug)]
pub struct LayerNorm {
    /// Scale per feature (PyTorch's `weight`).
    pub gamma: Param<Tensor<1>>,
    /// Shift per feature (PyTorch's `bias`).
    pub beta: Param<Tensor<1>>,
    /// Added to the variance (PyTorch's `eps`).
    pub epsilon: f64,
}

impl LayerNorm {
    /// Normalise over the last dimension (the native kernel on the CPU).
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        kernels::layer_norm(x, self.gamma.val(), self.beta.val(), self.epsilon)
    }
}

/// A LayerNorm over `features` with this `eps`, initialised as PyTorch's (scale 1, shift 0).
pub fn layer_norm(features: usize, eps: f64, device: &Device) -> LayerNorm {
    LayerNorm {
        gamma: Initializer::Ones.init([features], device),
        beta: Initializer::Zeros.init([features], device),
        epsilon: eps,
    }
}

/// A Linear initialised with normal(0, `std`) weights and zero bias.
pub fn linear(features: usize, outputs: usize, std: f64, device: &Device) -> Linear {
    LinearConfig::new(features, outputs)
        .with_initializer(Initializer::Normal { mean: 0.0, std })
        .init(device)
}

/// torchvision's `SqueezeExcitation`: global average pool, 1x1 conv down, activation, 1x1
/// conv up, a gate activation, and the input scaled channel by channel by the gate.
#[derive(Module, Debug)]
pub struct SqueezeExcitation {
    fc1: Conv2d,
    fc2: Conv2d,
    activation: Activation,
    scale_activation: Activation,
}

/// The activations inside a [`SqueezeExcitation`] (a [`Layer`] there would make the type
/// recursive); variants named after the PyTorch classes.
#[derive(Module, Debug)]
#[allow(missing_docs)]
pub enum Activation {
    ReLU(Relu),
    SiLU(SiLU),
    Sigmoid(Sigmoid),
    Hardsigmoid(HardSigmoid),
}

impl Activation {
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        match self {
            Activation::ReLU(m) => m.forward(x),
            Activation::SiLU(_) => kernels::silu(x),
            Activation::Sigmoid(m) => m.forward(x),
            Activation::Hardsigmoid(m) => m.forward(x),
        }
    }

    fn onnx(&self, g: &mut Graph, scope: &str, x: &Value) -> Value {
        match self {
            Activation::ReLU(_) => g.unary("Relu", scope, x),
            Activation::SiLU(_) => g.silu(scope, x),
            Activation::Sigmoid(_) => g.unary("Sigmoid", scope, x),
            Activation::Hardsigmoid(m) => g.hard_sigmoid(scope, m.alpha, m.beta, x),
        }
    }

    /// torchvision's MobileNetV3 gate: ReLU inside, `nn.Hardsigmoid` as the gate.
    pub fn relu_hardsigmoid() -> (Activation, Activation) {
        (
            Activation::ReLU(Relu::new()),
            Activation::Hardsigmoid(
                HardSigmoidConfig::new()
                    .with_alpha(1.0 / 6.0)
                    .with_beta(0.5)
                    .init(),
            ),
        )
    }

    /// torchvision's default (RegNet's): ReLU inside, sigmoid as the gate.
    pub fn relu_sigmoid() -> (Activation, Activation) {
        (
            Activation::ReLU(Relu::new()),
            Activation::Sigmoid(Sigmoid::new()),
        )
    }

    /// torchvision's EfficientNet gate: SiLU inside, sigmoid as the gate.
    pub fn silu_sigmoid() -> (Activation, Activation) {
        (
            Activation::SiLU(SiLU::new()),
            Activation::Sigmoid(Sigmoid::new()),
        )
    }
}

impl SqueezeExcitation {
    /// A block over `channels` channels squeezed to `squeeze`, with the (inner, gate)
    /// activations.
    pub fn new(
        channels: usize,
        squeeze: usize,
        (activation, scale_activation): (Activation, Activation),
        device: &Device,
    ) -> Self {
        Self {
            fc1: ConvSpec::new(channels, squeeze, 1, 1).bias().init(device),
            fc2: ConvSpec::new(squeeze, channels, 1, 1).bias().init(device),
            activation,
            scale_activation,
        }
    }

    /// `x` scaled channel by channel by its gate.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let scale = x.clone().mean_dim(3).mean_dim(2);
        let scale = self.activation.forward(kernels::conv2d(&self.fc1, scale));
        let scale = self
            .scale_activation
            .forward(kernels::conv2d(&self.fc2, scale));
        x * scale
    }

    /// The block in an ONNX graph.
    pub fn onnx(&self, g: &mut Graph, scope: &str, x: &Value) -> Result<Value> {
        let scale = g.spatial_mean(scope, x);
        let scale = g.conv2d(&child(scope, "fc1"), &self.fc1, &scale)?;
        let scale = self.activation.onnx(g, &child(scope, "activation"), &scale);
        let scale = g.conv2d(&child(scope, "fc2"), &self.fc2, &scale)?;
        let scale = self
            .scale_activation
            .onnx(g, &child(scope, "scale_activation"), &scale);
        Ok(g.mul(scope, x, &scale))
    }
}

/// torchvision's `StochasticDepth` in `"row"` mode: while training, each sample's residual
/// branch is dropped with probability `prob` and the kept ones scaled by `1 / (1 - prob)`.
/// The mask comes from the device's seeded generator, so runs stay reproducible.
#[derive(Module, Debug)]
pub struct StochasticDepth {
    /// Probability of dropping a sample's branch.
    pub prob: f64,
    /// Off for eval and frozen layers.
    pub training: Param<Flag>,
}

impl StochasticDepth {
    /// Drop with probability `prob`.
    pub fn new(prob: f64) -> Self {
        Self {
            prob,
            training: Param::from_bool(true),
        }
    }

    /// The branch `x`, masked per sample while training.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        if !self.training.is_enabled() || !x.device().is_autodiff() || self.prob == 0.0 {
            return x;
        }
        let keep = 1.0 - self.prob;
        let [n, ..] = x.dims();
        let mask = Tensor::<4>::random([n, 1, 1, 1], Distribution::Bernoulli(keep), &x.device());
        x * mask.div_scalar(keep)
    }
}

/// Global average pooling to `[N, C]`.
pub fn global_avg_pool(x: Tensor<4>) -> Tensor<2> {
    let [n, c, h, w] = x.dims();
    x.reshape([n, c, h * w]).mean_dim(2).reshape([n, c])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// While training, whole samples are dropped or scaled by `1 / (1 - p)`, the same ones
    /// for the same seed; in eval the branch passes unchanged.
    #[test]
    fn stochastic_depth_drops_whole_samples_reproducibly_and_only_in_training() {
        let device = Device::flex().autodiff();
        let depth = StochasticDepth::new(0.5);
        let x = Tensor::<4>::ones([64, 2, 3, 3], &device);
        let masked = |seed| {
            device.seed(seed);
            crate::models::to_vec(depth.forward(x.clone())).unwrap()
        };
        let a = masked(7);
        assert_eq!(a, masked(7), "same seed, same mask");
        assert_ne!(a, masked(8), "another seed, another mask");
        let per_sample: Vec<&[f32]> = a.chunks(18).collect();
        assert!(per_sample.iter().all(|s| s.iter().all(|&v| v == s[0])));
        assert!(per_sample.iter().all(|s| s[0] == 0.0 || s[0] == 2.0));
        let dropped = per_sample.iter().filter(|s| s[0] == 0.0).count();
        assert!((16..=48).contains(&dropped), "{dropped} of 64 dropped");
        let eval = Tensor::<4>::ones([4, 2, 3, 3], &Device::flex());
        assert!(
            crate::models::to_vec(depth.forward(eval))
                .unwrap()
                .iter()
                .all(|&v| v == 1.0)
        );
    }
}
