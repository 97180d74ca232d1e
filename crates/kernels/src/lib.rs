//! Native CPU kernels for the operations that dominate training, plugged into burn through
//! its backend-extension mechanism with hand-written backward passes.
//!
//! [`Kernels`] is a backend extension: burn routes a call to the implementation for the
//! tensor's backend, `Flex` for plain CPU tensors and `Autodiff<Flex>` while training,
//! where the backward pass is registered by hand. Models call [`conv2d`], [`relu6`],
//! [`max_pool2d`], [`batch_norm_train`] and [`batch_norm_eval`]; on any other device (wgpu)
//! those fall back to burn's own operations. Every kernel is checked against burn's generic
//! implementation, forward and gradients, in this module's tests.

#![warn(missing_docs)]

mod attention;
mod cpu;

use burn::backend::TensorMetadata;
use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, unary};
use burn::backend::flex::FlexTensor;
use burn::backend::ops::{ActivationOps, BoolTensorOps, ConvOptions, FloatTensorOps, ModuleOps};
use burn::backend::tensor::FloatTensor;
use burn::backend::{
    Autodiff, AutodiffBackend, Backend, Dispatch, DispatchDevice, ExtensionType, Flex,
    backend_extension,
};
use burn::nn::PaddingConfig2d;
use burn::nn::conv::Conv2d;
use burn::nn::pool::MaxPool2d;
use burn::prelude::*;
use burn::tensor::{BoolStore, DType};

use attention::AttentionShape;
use cpu::ConvGeometry;

/// Operations with native CPU kernels (see the module documentation).
#[backend_extension(Flex, Autodiff)]
pub trait Kernels: Backend {
    /// A bias-free 2-D convolution: native forward and backward, dense and grouped ones one
    /// group at a time (burn-flex's own forward for depthwise convolutions, and burn's
    /// generic code for what the native geometry rejects).
    fn conv2d_native(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        options: ConvOptions<2>,
    ) -> FloatTensor<Self>;

    /// The same with a bias (the inference-time convolutions with BatchNorm folded in).
    fn conv2d_native_bias(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        options: ConvOptions<2>,
    ) -> FloatTensor<Self>;

    /// The same followed by `activation`, applied to each output plane or image as soon as
    /// it is written, while it is still in cache (on autodiff: the two ops in turn).
    fn conv2d_native_bias_activation(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        options: ConvOptions<2>,
        activation: ConvActivation,
    ) -> FloatTensor<Self>;

    /// `min(max(x, 0), 6)` in one pass; its backward needs only the output.
    fn relu6_native(x: FloatTensor<Self>) -> FloatTensor<Self>;

    /// An [`Activation`] in one vectorised pass over f32 (the public functions route other
    /// dtypes to burn); its backward needs the input.
    fn activation_native(x: FloatTensor<Self>, op: Activation) -> FloatTensor<Self>;

    /// Max pooling without the index tensor burn-flex computes even at inference.
    fn max_pool2d_native(
        x: FloatTensor<Self>,
        kernel: [usize; 2],
        stride: [usize; 2],
        padding: [(usize, usize); 2],
    ) -> FloatTensor<Self>;

    /// `y = x * scale[c] + shift[c]` over channel dimension 1: eval-mode BatchNorm in one
    /// pass once its statistics are folded into `scale` and `shift`.
    fn channel_affine_native(
        x: FloatTensor<Self>,
        scale: FloatTensor<Self>,
        shift: FloatTensor<Self>,
    ) -> FloatTensor<Self>;

    /// LayerNorm over the last dimension (f32 only: [`layer_norm`] routes other dtypes to
    /// burn's composition); its backward keeps each row's mean and inverse deviation.
    fn layer_norm_native(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
    ) -> FloatTensor<Self>;

    /// `softmax(q k^T * scale + bias) v` over the last two dimensions of `[batch, heads,
    /// seq, dim]` f32 tensors, `bias` `[groups, seq, seq]` added to problem `i` (of the
    /// `batch * heads`) as matrix `i % groups` ([`attention`] routes other dtypes to burn);
    /// in blocks of queries, the backward recomputing the probabilities instead of keeping
    /// them.
    fn attention_native(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        scale: f32,
    ) -> FloatTensor<Self>;

    /// Train-mode BatchNorm: normalise with the batch statistics and return them.
    fn batch_norm_train_native(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
    ) -> BatchNormStats<Self>;
}

/// The output of [`Kernels::batch_norm_train_native`]: the normalised input and the batch
/// mean and biased variance per channel (the latter two outside the autodiff graph).
/// burn's own `BatchNormTrain` has the same fields but cannot cross the extension's
/// dispatch boundary, which needs `ExtensionType`.
#[derive(ExtensionType)]
pub struct BatchNormStats<B: Backend> {
    /// The normalised input, scaled by `gamma` and shifted by `beta`, shaped like `x`.
    pub output: FloatTensor<B>,
    /// Batch mean per channel, shape `[C]`.
    pub mean: FloatTensor<B>,
    /// Biased batch variance per channel, shape `[C]`.
    pub variance: FloatTensor<B>,
}

/// A contiguous f32 copy of a flex tensor's data (no copy when it already is), or `None`
/// for other dtypes, which take burn's generic path.
fn f32_view(t: &FlexTensor) -> Option<FlexTensor> {
    (t.dtype() == DType::F32).then(|| t.to_contiguous())
}

/// An f32 tensor that owns its whole buffer, contiguous from offset 0, so it can be
/// written in place: the tensor itself when it already is, otherwise a copy.
fn into_owned_f32(t: FlexTensor) -> FlexTensor {
    let owned =
        t.is_unique() && t.layout().is_dense_unique_storage() && t.layout().start_offset() == 0;
    if owned {
        t
    } else {
        flex_tensor(slice(&t.to_contiguous()).to_vec(), t.shape().to_vec())
    }
}

fn slice(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>().expect("a contiguous f32 tensor")
}

fn dims4(t: &FlexTensor) -> [usize; 4] {
    let shape = t.shape();
    [shape[0], shape[1], shape[2], shape[3]]
}

fn flex_tensor(data: Vec<f32>, shape: Vec<usize>) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(data, shape))
}

/// Native geometry and contiguous f32 operands, when the kernels cover this convolution.
fn native_operands(
    x: &FlexTensor,
    weight: &FlexTensor,
    options: &ConvOptions<2>,
) -> Option<(ConvGeometry, FlexTensor, FlexTensor)> {
    let geometry = ConvGeometry::new(dims4(x), dims4(weight), options)?;
    Some((geometry, f32_view(x)?, f32_view(weight)?))
}

impl Kernels for Flex {
    fn conv2d_native(x: FlexTensor, weight: FlexTensor, options: ConvOptions<2>) -> FlexTensor {
        conv_forward(x, weight, None, options, None)
    }

    fn conv2d_native_bias(
        x: FlexTensor,
        weight: FlexTensor,
        bias: FlexTensor,
        options: ConvOptions<2>,
    ) -> FlexTensor {
        conv_forward(x, weight, Some(bias), options, None)
    }

    fn conv2d_native_bias_activation(
        x: FlexTensor,
        weight: FlexTensor,
        bias: FlexTensor,
        options: ConvOptions<2>,
        activation: ConvActivation,
    ) -> FlexTensor {
        conv_forward(x, weight, Some(bias), options, Some(activation.chunk()))
    }

    fn relu6_native(x: FlexTensor) -> FlexTensor {
        if x.dtype() != DType::F32 {
            return Flex::float_clamp(x, 0f32.into(), 6f32.into());
        }
        let mut y = into_owned_f32(x);
        let len = y.layout().num_elements();
        cpu::relu6_in_place(&mut y.storage_mut::<f32>()[..len]);
        y
    }

    fn activation_native(x: FlexTensor, op: Activation) -> FlexTensor {
        let mut y = into_owned_f32(x);
        let len = y.layout().num_elements();
        op.forward_in_place(&mut y.storage_mut::<f32>()[..len]);
        y
    }

    fn max_pool2d_native(
        x: FlexTensor,
        kernel: [usize; 2],
        stride: [usize; 2],
        padding: [(usize, usize); 2],
    ) -> FlexTensor {
        let native = ConvGeometry::pool(dims4(&x), kernel, stride, padding).zip(f32_view(&x));
        match native {
            Some((g, x)) => flex_tensor(
                cpu::max_pool_forward(&g, slice(&x)),
                g.output_shape().to_vec(),
            ),
            // Windows larger than the padded input, or other dtypes: burn-flex's kernel.
            None => {
                let padding = [padding[0].0, padding[1].0];
                Flex::max_pool2d(x, kernel, stride, padding, [1, 1], false)
            }
        }
    }

    fn channel_affine_native(x: FlexTensor, scale: FlexTensor, shift: FlexTensor) -> FlexTensor {
        let native = f32_view(&scale)
            .zip(f32_view(&shift))
            .filter(|_| x.dtype() == DType::F32);
        let Some((scale, shift)) = native else {
            let mut per_channel = vec![1; x.shape().num_dims()];
            per_channel[1] = x.shape()[1];
            let scale = Flex::float_reshape(scale, per_channel.clone().into());
            let shift = Flex::float_reshape(shift, per_channel.into());
            return Flex::float_add(Flex::float_mul(x, scale), shift);
        };
        let layout = cpu::ChannelLayout::new(&x.shape());
        let mut y = into_owned_f32(x);
        let len = y.layout().num_elements();
        let out = &mut y.storage_mut::<f32>()[..len];
        cpu::scale_shift_in_place(&layout, out, slice(&scale), slice(&shift));
        y
    }

    fn layer_norm_native(
        x: FlexTensor,
        gamma: FlexTensor,
        beta: FlexTensor,
        epsilon: f64,
    ) -> FlexTensor {
        layer_norm_forward(&x, &gamma, &beta, epsilon).0
    }

    fn attention_native(
        q: FlexTensor,
        k: FlexTensor,
        v: FlexTensor,
        bias: FlexTensor,
        scale: f32,
    ) -> FlexTensor {
        attention_forward([&q, &k, &v, &bias], scale).0
    }

    fn batch_norm_train_native(
        x: FlexTensor,
        gamma: FlexTensor,
        beta: FlexTensor,
        epsilon: f64,
    ) -> BatchNormStats<Self> {
        let native = f32_view(&x).zip(f32_view(&gamma)).zip(f32_view(&beta));
        let Some(((x, gamma), beta)) = native else {
            let out = Flex::batch_norm_train(x, gamma, beta, epsilon);
            return BatchNormStats {
                output: out.output,
                mean: out.mean,
                variance: out.variance,
            };
        };
        let layout = cpu::ChannelLayout::new(&x.shape());
        let (mean, variance) = cpu::batch_norm_stats(&layout, slice(&x));
        let (gamma, beta) = (slice(&gamma), slice(&beta));
        let (scale, shift): (Vec<f32>, Vec<f32>) = (0..layout.channels)
            .map(|c| {
                let scale = gamma[c] / (variance[c] as f64 + epsilon).sqrt() as f32;
                (scale, beta[c] - mean[c] * scale)
            })
            .unzip();
        let mut y = slice(&x).to_vec();
        cpu::scale_shift_in_place(&layout, &mut y, &scale, &shift);
        let channels = vec![layout.channels];
        BatchNormStats {
            output: flex_tensor(y, x.shape().to_vec()),
            mean: flex_tensor(mean, channels.clone()),
            variance: flex_tensor(variance, channels),
        }
    }
}

/// Forward convolution: dense ones as im2col + gemm straight into NCHW (or Winograd),
/// depthwise ones by register-blocked direct loops.
fn conv_forward(
    x: FlexTensor,
    weight: FlexTensor,
    bias: Option<FlexTensor>,
    options: ConvOptions<2>,
    activation: cpu::OutputActivation,
) -> FlexTensor {
    let bias_f32 = match &bias {
        Some(b) => f32_view(b).map(Some),
        None => Some(None),
    };
    match native_operands(&x, &weight, &options).zip(bias_f32) {
        Some(((g, x, w), b)) => {
            let (x, w, b) = (slice(&x), slice(&w), b.as_ref().map(slice));
            let y = if g.depthwise {
                cpu::depthwise_forward(&g, x, w, b, activation)
            } else {
                cpu::dense_forward(&g, x, w, b, activation)
            };
            flex_tensor(y, g.output_shape().to_vec())
        }
        _ => {
            let y = Flex::conv2d(x, weight, bias, options);
            match activation {
                Some(activation) => {
                    let mut y = into_owned_f32(y);
                    let len = y.layout().num_elements();
                    activation(&mut y.storage_mut::<f32>()[..len]);
                    y
                }
                None => y,
            }
        }
    }
}

/// Input gradient of a convolution, native where [`ConvGeometry`] covers it.
fn conv_input_grad(
    x_shape: [usize; 4],
    weight: &FlexTensor,
    grad: FlexTensor,
    options: &ConvOptions<2>,
) -> FlexTensor {
    let native = ConvGeometry::new(x_shape, dims4(weight), options)
        .zip(f32_view(weight))
        .zip(f32_view(&grad));
    match native {
        Some(((g, w), dy)) => {
            let dx = if g.depthwise {
                cpu::depthwise_backward_input(&g, slice(&w), slice(&dy))
            } else {
                cpu::dense_backward_input(&g, slice(&w), slice(&dy))
            };
            flex_tensor(dx, x_shape.to_vec())
        }
        None => {
            let x = FlexTensor::zeros(x_shape.to_vec().into(), weight.dtype());
            Flex::conv2d_x_backward(x, weight.clone(), grad, options.clone())
        }
    }
}

/// Weight gradient of a convolution, native where [`ConvGeometry`] covers it.
fn conv_weight_grad(
    x: FlexTensor,
    weight: &FlexTensor,
    grad: &FlexTensor,
    options: &ConvOptions<2>,
) -> FlexTensor {
    match native_operands(&x, weight, options).zip(f32_view(grad)) {
        Some(((g, x, _), dy)) => {
            let dw = if g.depthwise {
                cpu::depthwise_backward_weight(&g, slice(&x), slice(&dy))
            } else {
                cpu::dense_backward_weight(&g, slice(&x), slice(&dy))
            };
            flex_tensor(dw, weight.shape().to_vec())
        }
        None => Flex::conv2d_weight_backward(x, weight.clone(), grad.clone(), options.clone()),
    }
}

#[derive(Debug)]
struct Conv2dBackward;

/// What the backward pass keeps: the input (for the weight gradient) and the weight (for
/// the input gradient).
#[derive(Debug, Clone)]
struct Conv2dState {
    x: FlexTensor,
    weight: FlexTensor,
    options: ConvOptions<2>,
}

impl Backward<Flex, 2> for Conv2dBackward {
    type State = Conv2dState;

    fn backward(self, ops: Ops<Conv2dState, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_weight] = ops.parents;
        let grad = grads.consume::<Flex>(&ops.node);
        let state = ops.state;
        let x_shape = dims4(&state.x);
        if let Some(node) = node_weight {
            let dw = conv_weight_grad(state.x, &state.weight, &grad, &state.options);
            grads.register::<Flex>(node.id, dw);
        }
        if let Some(node) = node_x {
            let dx = conv_input_grad(x_shape, &state.weight, grad, &state.options);
            grads.register::<Flex>(node.id, dx);
        }
    }
}

/// The activations a folded inference convolution can apply to its output as it writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvActivation {
    /// `max(x, 0)`.
    Relu,
    /// `min(max(x, 0), 6)`.
    Relu6,
    /// One of the [`Activation`]s.
    Native(Activation),
}

impl ConvActivation {
    /// The activation over one slice, on the calling thread.
    fn chunk(self) -> fn(&mut [f32]) {
        match self {
            ConvActivation::Relu => cpu::relu_chunk,
            ConvActivation::Relu6 => cpu::relu6_chunk,
            ConvActivation::Native(Activation::Silu) => cpu::silu_chunk,
            ConvActivation::Native(Activation::Gelu) => cpu::gelu_chunk,
            ConvActivation::Native(Activation::Hardswish) => cpu::hardswish_chunk,
        }
    }

    /// The activation as its own op (through its native kernel where there is one).
    pub fn apply<const D: usize>(self, x: Tensor<D>) -> Tensor<D> {
        match self {
            ConvActivation::Relu => burn::tensor::activation::relu(x),
            ConvActivation::Relu6 => relu6(x),
            ConvActivation::Native(Activation::Silu) => silu(x),
            ConvActivation::Native(Activation::Gelu) => gelu(x),
            ConvActivation::Native(Activation::Hardswish) => hardswish(x),
        }
    }
}

/// The elementwise activations with native kernels: one pass forward, and a backward from
/// the input alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `x * sigmoid(x)`.
    Silu,
    /// Exact GELU, `x * (1 + erf(x / sqrt 2)) / 2`.
    Gelu,
    /// `x * relu6(x + 3) / 6`.
    Hardswish,
}

impl Activation {
    fn forward_in_place(self, x: &mut [f32]) {
        match self {
            Activation::Silu => cpu::silu_in_place(x),
            Activation::Gelu => cpu::gelu_in_place(x),
            Activation::Hardswish => cpu::hardswish_in_place(x),
        }
    }

    /// Multiplies the derivative at `input` into `grad`.
    fn backward_in_place(self, input: &[f32], grad: &mut [f32]) {
        match self {
            Activation::Silu => cpu::silu_backward_in_place(input, grad),
            Activation::Gelu => cpu::gelu_backward_in_place(input, grad),
            Activation::Hardswish => cpu::hardswish_backward_in_place(input, grad),
        }
    }
}

#[derive(Debug)]
struct ActivationBackward(Activation);

impl Backward<Flex, 1> for ActivationBackward {
    type State = FlexTensor;

    fn backward(self, ops: Ops<FlexTensor, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        unary::<Flex, _>(ops.parents, ops.node, grads, |grad| {
            let input = f32_view(&ops.state).expect("f32, as the forward was");
            let mut dx = into_owned_f32(grad);
            let len = dx.layout().num_elements();
            self.0
                .backward_in_place(slice(&input), &mut dx.storage_mut::<f32>()[..len]);
            dx
        });
    }
}

#[derive(Debug)]
struct Relu6Backward;

impl Backward<Flex, 1> for Relu6Backward {
    type State = FlexTensor;

    fn backward(self, ops: Ops<FlexTensor, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let output = ops.state;
        unary::<Flex, _>(ops.parents, ops.node, grads, |grad| {
            match f32_view(&output) {
                Some(y) if grad.dtype() == DType::F32 => {
                    let mut dx = into_owned_f32(grad);
                    let len = dx.layout().num_elements();
                    cpu::relu6_backward_in_place(slice(&y), &mut dx.storage_mut::<f32>()[..len]);
                    dx
                }
                _ => {
                    let inside =
                        Flex::float_lower_elem(output.clone(), 6f32.into(), BoolStore::Native);
                    let positive = Flex::float_greater_elem(output, 0f32.into(), BoolStore::Native);
                    let keep = Flex::bool_and(inside, positive);
                    Flex::float_mask_fill(grad, Flex::bool_not(keep), 0f32.into())
                }
            }
        });
    }
}

#[derive(Debug)]
struct MaxPoolBackward;

#[derive(Debug, Clone)]
struct MaxPoolState {
    x: FlexTensor,
    kernel: [usize; 2],
    stride: [usize; 2],
    padding: [(usize, usize); 2],
}

impl Backward<Flex, 1> for MaxPoolBackward {
    type State = MaxPoolState;

    fn backward(self, ops: Ops<MaxPoolState, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let MaxPoolState {
            x,
            kernel,
            stride,
            padding,
        } = ops.state;
        unary::<Flex, _>(ops.parents, ops.node, grads, |grad| {
            let x_shape = dims4(&x);
            let g =
                ConvGeometry::pool(x_shape, kernel, stride, padding).expect("checked in forward");
            let (x, dy) = (f32_view(&x).expect("f32"), f32_view(&grad).expect("f32"));
            flex_tensor(
                cpu::max_pool_backward(&g, slice(&x), slice(&dy)),
                x_shape.to_vec(),
            )
        });
    }
}

#[derive(Debug)]
struct ChannelAffineBackward;

impl Backward<Flex, 3> for ChannelAffineBackward {
    /// The input (for the scale's gradient) and the scale (for the input's).
    type State = (FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_scale, node_shift] = ops.parents;
        let grad = into_owned_f32(grads.consume::<Flex>(&ops.node));
        let (x, scale) = ops.state;
        let (x, scale) = (f32_view(&x).expect("f32"), f32_view(&scale).expect("f32"));
        let layout = cpu::ChannelLayout::new(&x.shape());
        let channels = vec![layout.channels];
        if node_scale.is_some() || node_shift.is_some() {
            let (dshift, dscale) = cpu::channel_affine_sums(&layout, slice(&x), slice(&grad));
            if let Some(node) = node_scale {
                grads.register::<Flex>(node.id, flex_tensor(dscale, channels.clone()));
            }
            if let Some(node) = node_shift {
                grads.register::<Flex>(node.id, flex_tensor(dshift, channels.clone()));
            }
        }
        if let Some(node) = node_x {
            let mut dx = grad;
            let len = dx.layout().num_elements();
            let zeros = vec![0f32; layout.channels];
            let out = &mut dx.storage_mut::<f32>()[..len];
            cpu::scale_shift_in_place(&layout, out, slice(&scale), &zeros);
            grads.register::<Flex>(node.id, dx);
        }
    }
}

/// The LayerNorm of f32 operands: the output, and each row's mean and inverse deviation.
fn layer_norm_forward(
    x: &FlexTensor,
    gamma: &FlexTensor,
    beta: &FlexTensor,
    epsilon: f64,
) -> (FlexTensor, FlexTensor, FlexTensor) {
    let [x, gamma, beta] =
        [x, gamma, beta].map(|t| f32_view(t).expect("f32, as layer_norm checks"));
    let (y, mean, rstd) = cpu::layer_norm_forward(slice(&x), slice(&gamma), slice(&beta), epsilon);
    let rows = vec![mean.len()];
    (
        flex_tensor(y, x.shape().to_vec()),
        flex_tensor(mean, rows.clone()),
        flex_tensor(rstd, rows),
    )
}

/// A normalisation's gradients, for those of its parents (input, scale, shift) that take
/// one.
fn register_norm_grads(
    grads: &mut Gradients,
    [x, gamma, beta]: [Option<NodeId>; 3],
    dx: FlexTensor,
    dgamma: Vec<f32>,
    dbeta: Vec<f32>,
) {
    let width = vec![dgamma.len()];
    if let Some(id) = gamma {
        grads.register::<Flex>(id, flex_tensor(dgamma, width.clone()));
    }
    if let Some(id) = beta {
        grads.register::<Flex>(id, flex_tensor(dbeta, width));
    }
    if let Some(id) = x {
        grads.register::<Flex>(id, dx);
    }
}

#[derive(Debug)]
struct LayerNormBackward;

#[derive(Debug, Clone)]
struct LayerNormState {
    x: FlexTensor,
    gamma: FlexTensor,
    mean: FlexTensor,
    rstd: FlexTensor,
}

impl Backward<Flex, 3> for LayerNormBackward {
    type State = LayerNormState;

    fn backward(self, ops: Ops<LayerNormState, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_gamma, node_beta] = ops.parents;
        let LayerNormState {
            x,
            gamma,
            mean,
            rstd,
        } = ops.state;
        let mut dx = into_owned_f32(grads.consume::<Flex>(&ops.node));
        let len = dx.layout().num_elements();
        let (dgamma, dbeta) = cpu::layer_norm_backward_in_place(
            slice(&x),
            slice(&gamma),
            slice(&mean),
            slice(&rstd),
            &mut dx.storage_mut::<f32>()[..len],
        );
        let ids = [node_x, node_gamma, node_beta].map(|n| n.map(|n| n.id));
        register_norm_grads(grads, ids, dx, dgamma, dbeta);
    }
}

/// The shapes of `[batch, heads, seq, dim]` operands with a `[groups, seq, seq]` bias.
fn attention_shape(q: &FlexTensor, bias: &FlexTensor, scale: f32) -> AttentionShape {
    let [batch, heads, seq, dim] = dims4(q);
    AttentionShape {
        heads: batch * heads,
        seq,
        dim,
        scale,
        groups: bias.shape()[0],
    }
}

/// Attention of f32 operands `[q, k, v, bias]`: the output, and what its backward keeps
/// (the contiguous operands and each row's log-sum-exp).
fn attention_forward(operands: [&FlexTensor; 4], scale: f32) -> (FlexTensor, AttentionState) {
    let [q, k, v, bias] = operands.map(|t| f32_view(t).expect("f32, as attention checks"));
    let shape = attention_shape(&q, &bias, scale);
    let (out, lse) =
        attention::attention_forward(shape, slice(&q), slice(&k), slice(&v), slice(&bias));
    let out = flex_tensor(out, q.shape().to_vec());
    let lse = flex_tensor(lse, vec![shape.heads * shape.seq]);
    let state = AttentionState {
        q,
        k,
        v,
        bias,
        out: out.clone(),
        lse,
        scale,
    };
    (out, state)
}

#[derive(Debug)]
struct AttentionBackward;

#[derive(Debug, Clone)]
struct AttentionState {
    q: FlexTensor,
    k: FlexTensor,
    v: FlexTensor,
    bias: FlexTensor,
    out: FlexTensor,
    lse: FlexTensor,
    scale: f32,
}

impl Backward<Flex, 4> for AttentionBackward {
    type State = AttentionState;

    fn backward(self, ops: Ops<AttentionState, 4>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = f32_view(&grads.consume::<Flex>(&ops.node)).expect("f32");
        let t = ops.state;
        let shape = attention_shape(&t.q, &t.bias, t.scale);
        let [node_q, node_k, node_v, node_bias] = ops.parents;
        let saved = attention::AttentionSaved {
            q: slice(&t.q),
            k: slice(&t.k),
            v: slice(&t.v),
            bias: slice(&t.bias),
            out: slice(&t.out),
            lse: slice(&t.lse),
            grad: slice(&grad),
        };
        let g = attention::attention_backward(shape, &saved, node_bias.is_some());
        let dims = t.q.shape().to_vec();
        for (node, g) in [node_q, node_k, node_v].into_iter().zip([g.dq, g.dk, g.dv]) {
            if let Some(node) = node {
                grads.register::<Flex>(node.id, flex_tensor(g, dims.clone()));
            }
        }
        if let (Some(node), Some(dbias)) = (node_bias, g.dbias) {
            grads.register::<Flex>(node.id, flex_tensor(dbias, t.bias.shape().to_vec()));
        }
    }
}

#[derive(Debug)]
struct BatchNormBackward;

#[derive(Debug, Clone)]
struct BatchNormState {
    x: FlexTensor,
    gamma: FlexTensor,
    mean: FlexTensor,
    variance: FlexTensor,
    epsilon: f64,
}

impl Backward<Flex, 3> for BatchNormBackward {
    type State = BatchNormState;

    fn backward(self, ops: Ops<BatchNormState, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_gamma, node_beta] = ops.parents;
        let grad = grads.consume::<Flex>(&ops.node);
        let BatchNormState {
            x,
            gamma,
            mean,
            variance,
            epsilon,
        } = ops.state;
        let native = f32_view(&x)
            .zip(f32_view(&gamma))
            .filter(|_| grad.dtype() == DType::F32);
        let Some((x, gamma)) = native else {
            let out = Flex::batch_norm_train_backward(x, gamma, mean, variance, epsilon, grad);
            for (node, g) in [
                (node_x, out.x_grad),
                (node_gamma, out.gamma_grad),
                (node_beta, out.beta_grad),
            ] {
                if let Some(node) = node {
                    grads.register::<Flex>(node.id, g);
                }
            }
            return;
        };
        let layout = cpu::ChannelLayout::new(&x.shape());
        let inv_std: Vec<f32> = slice(&f32_view(&variance).expect("f32 statistics"))
            .iter()
            .map(|&v| 1.0 / (v as f64 + epsilon).sqrt() as f32)
            .collect();
        let mean = f32_view(&mean).expect("f32 statistics");
        let mut dx = into_owned_f32(grad);
        let len = dx.layout().num_elements();
        let (dgamma, dbeta) = cpu::batch_norm_backward_in_place(
            &layout,
            slice(&x),
            slice(&gamma),
            slice(&mean),
            &inv_std,
            &mut dx.storage_mut::<f32>()[..len],
        );
        let ids = [node_x, node_gamma, node_beta].map(|n| n.map(|n| n.id));
        register_norm_grads(grads, ids, dx, dgamma, dbeta);
    }
}

impl<C: CheckpointStrategy> Kernels for Autodiff<Flex, C> {
    fn channel_affine_native(
        x: FloatTensor<Self>,
        scale: FloatTensor<Self>,
        shift: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let all_f32 = [&x, &scale, &shift]
            .iter()
            .all(|t| t.primitive().dtype() == DType::F32);
        if !all_f32 {
            let mut per_channel = vec![1; x.shape().num_dims()];
            per_channel[1] = x.shape()[1];
            let scale = Self::float_reshape(scale, per_channel.clone().into());
            let shift = Self::float_reshape(shift, per_channel.into());
            return Self::float_add(Self::float_mul(x, scale), shift);
        }
        let prepared = ChannelAffineBackward
            .prepare::<C>([x.node(), scale.node(), shift.node()])
            .compute_bound()
            .stateful();
        let (x, scale, shift) = (
            x.into_primitive(),
            scale.into_primitive(),
            shift.into_primitive(),
        );
        match prepared {
            OpsKind::Tracked(prep) => {
                let y = Flex::channel_affine_native(x.clone(), scale.clone(), shift);
                prep.finish((x, scale), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(Flex::channel_affine_native(x, scale, shift)),
        }
    }

    fn max_pool2d_native(
        x: FloatTensor<Self>,
        kernel: [usize; 2],
        stride: [usize; 2],
        padding: [(usize, usize); 2],
    ) -> FloatTensor<Self> {
        let native = ConvGeometry::pool(dims4(x.primitive()), kernel, stride, padding).is_some()
            && x.primitive().dtype() == DType::F32;
        if !native {
            let padding = [padding[0].0, padding[1].0];
            return Self::max_pool2d(x, kernel, stride, padding, [1, 1], false);
        }
        match MaxPoolBackward
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let x = x.into_primitive();
                let y = Flex::max_pool2d_native(x.clone(), kernel, stride, padding);
                prep.finish(
                    MaxPoolState {
                        x,
                        kernel,
                        stride,
                        padding,
                    },
                    y,
                )
            }
            OpsKind::UnTracked(prep) => prep.finish(Flex::max_pool2d_native(
                x.into_primitive(),
                kernel,
                stride,
                padding,
            )),
        }
    }

    fn batch_norm_train_native(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
    ) -> BatchNormStats<Self> {
        let prepared = BatchNormBackward
            .prepare::<C>([x.node(), gamma.node(), beta.node()])
            .compute_bound()
            .stateful();
        let (x, gamma) = (x.into_primitive(), gamma.into_primitive());
        let out =
            Flex::batch_norm_train_native(x.clone(), gamma.clone(), beta.into_primitive(), epsilon);
        let output = match prepared {
            OpsKind::Tracked(prep) => {
                let state = BatchNormState {
                    x,
                    gamma,
                    mean: out.mean.clone(),
                    variance: out.variance.clone(),
                    epsilon,
                };
                prep.finish(state, out.output)
            }
            OpsKind::UnTracked(prep) => prep.finish(out.output),
        };
        BatchNormStats {
            output,
            mean: Self::from_inner(out.mean),
            variance: Self::from_inner(out.variance),
        }
    }

    fn layer_norm_native(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
    ) -> FloatTensor<Self> {
        let prepared = LayerNormBackward
            .prepare::<C>([x.node(), gamma.node(), beta.node()])
            .compute_bound()
            .stateful();
        let [x, gamma, beta] = [x, gamma, beta].map(|t| t.into_primitive());
        let (y, mean, rstd) = layer_norm_forward(&x, &gamma, &beta, epsilon);
        match prepared {
            OpsKind::Tracked(prep) => {
                let (x, gamma) = (f32_view(&x).expect("f32"), f32_view(&gamma).expect("f32"));
                prep.finish(
                    LayerNormState {
                        x,
                        gamma,
                        mean,
                        rstd,
                    },
                    y,
                )
            }
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }

    fn attention_native(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        scale: f32,
    ) -> FloatTensor<Self> {
        let prepared = AttentionBackward
            .prepare::<C>([q.node(), k.node(), v.node(), bias.node()])
            .compute_bound()
            .stateful();
        let [q, k, v, bias] = [q, k, v, bias].map(|t| t.into_primitive());
        let (y, state) = attention_forward([&q, &k, &v, &bias], scale);
        match prepared {
            OpsKind::Tracked(prep) => prep.finish(state, y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }

    /// Differentiated as the bias-free convolution plus burn's own broadcast addition.
    fn conv2d_native_bias(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        options: ConvOptions<2>,
    ) -> FloatTensor<Self> {
        let channels = bias.shape()[0];
        let y = Self::conv2d_native(x, weight, options);
        Self::float_add(y, Self::float_reshape(bias, [1, channels, 1, 1].into()))
    }

    fn conv2d_native_bias_activation(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        options: ConvOptions<2>,
        activation: ConvActivation,
    ) -> FloatTensor<Self> {
        let y = Self::conv2d_native_bias(x, weight, bias, options);
        match activation {
            ConvActivation::Relu => Self::relu(y),
            ConvActivation::Relu6 => Self::relu6_native(y),
            ConvActivation::Native(op) => Self::activation_native(y, op),
        }
    }

    fn conv2d_native(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        options: ConvOptions<2>,
    ) -> FloatTensor<Self> {
        match Conv2dBackward
            .prepare::<C>([x.node(), weight.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (x, weight) = (x.into_primitive(), weight.into_primitive());
                let y = conv_forward(x.clone(), weight.clone(), None, options.clone(), None);
                let state = Conv2dState { x, weight, options };
                prep.finish(state, y)
            }
            OpsKind::UnTracked(prep) => prep.finish(conv_forward(
                x.into_primitive(),
                weight.into_primitive(),
                None,
                options,
                None,
            )),
        }
    }

    fn relu6_native(x: FloatTensor<Self>) -> FloatTensor<Self> {
        match Relu6Backward
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let y = Flex::relu6_native(x.into_primitive());
                prep.finish(y.clone(), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(Flex::relu6_native(x.into_primitive())),
        }
    }

    fn activation_native(x: FloatTensor<Self>, op: Activation) -> FloatTensor<Self> {
        match ActivationBackward(op)
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let input = x.into_primitive();
                let y = Flex::activation_native(input.clone(), op);
                prep.finish(input, y)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(Flex::activation_native(x.into_primitive(), op))
            }
        }
    }
}

/// Keep freed tensor memory in the process for the next allocation.
///
/// burn-flex allocates every activation and gradient afresh and frees it a moment later.
/// glibc serves blocks that large with a fresh `mmap` (page faults and zeroing on first
/// touch, a TLB shootdown across threads on `munmap`) or trims its heap after the free;
/// either way each training step re-faults hundreds of MiB. Serving everything from the
/// heap and never trimming it made a MobileNetV2 step 1.4x faster and inference 1.5x
/// (BENCHMARKS.md). The peak stays the same: the memory is reused, not grown.
pub fn retain_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes glibc's allocation policy; it is called before any
    // other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// Whether tensors on this device run on burn-flex, where the native kernels apply.
fn on_flex(device: &Device) -> bool {
    matches!(
        device.as_dispatch().clone().inner(),
        DispatchDevice::Flex(_)
    )
}

/// `activation(conv.forward(x))`, on the CPU in one native op when `conv` has a bias (as a
/// convolution with BatchNorm folded into it does): each output image or plane gets the
/// activation as soon as it is written, one pass over the activations from memory fewer.
pub fn conv2d_activation(conv: &Conv2d, x: Tensor<4>, activation: ConvActivation) -> Tensor<4> {
    let native = native_options(conv, &x).zip(conv.bias.as_ref());
    let Some((options, bias)) = native.filter(|_| x.dtype() == DType::F32) else {
        return activation.apply(conv2d(conv, x));
    };
    let (x, weight) = (x.into_dispatch(), conv.weight.val().into_dispatch());
    let bias = bias.val().into_dispatch();
    Tensor::from_dispatch(<Dispatch as Kernels>::conv2d_native_bias_activation(
        x, weight, bias, options, activation,
    ))
}

/// `conv.forward(x)` through the native kernels on the CPU.
pub fn conv2d(conv: &Conv2d, x: Tensor<4>) -> Tensor<4> {
    let Some(options) = native_options(conv, &x) else {
        return conv.forward(x);
    };
    let bias = conv.bias.as_ref().map(|b| b.val());
    conv2d_flex(x, conv.weight.val(), bias, options)
}

/// `conv`'s options for the native kernels: `None` off the CPU, or for padding burn
/// resolves itself (`Same`, `Valid`).
fn native_options(conv: &Conv2d, x: &Tensor<4>) -> Option<ConvOptions<2>> {
    let PaddingConfig2d::Explicit(top, left, bottom, right) = conv.padding else {
        return None;
    };
    on_flex(&x.device()).then(|| {
        ConvOptions::new_with_padding(
            conv.stride,
            [(top, bottom), (left, right)],
            conv.dilation,
            conv.groups,
        )
    })
}

/// A convolution of tensors on a flex device through [`Kernels`].
fn conv2d_flex(
    x: Tensor<4>,
    weight: Tensor<4>,
    bias: Option<Tensor<1>>,
    options: ConvOptions<2>,
) -> Tensor<4> {
    let (x, weight) = (x.into_dispatch(), weight.into_dispatch());
    Tensor::from_dispatch(match bias {
        Some(bias) => {
            <Dispatch as Kernels>::conv2d_native_bias(x, weight, bias.into_dispatch(), options)
        }
        None => <Dispatch as Kernels>::conv2d_native(x, weight, options),
    })
}

/// `pool.forward(x)` through the native kernel on the CPU.
pub fn max_pool2d(pool: &MaxPool2d, x: Tensor<4>) -> Tensor<4> {
    let PaddingConfig2d::Explicit(top, left, bottom, right) = pool.padding else {
        return pool.forward(x);
    };
    if !on_flex(&x.device()) || pool.dilation != [1, 1] || pool.ceil_mode {
        return pool.forward(x);
    }
    let padding = [(top, bottom), (left, right)];
    let y = <Dispatch as Kernels>::max_pool2d_native(
        x.into_dispatch(),
        pool.kernel_size,
        pool.stride,
        padding,
    );
    Tensor::from_dispatch(y)
}

/// Train-mode BatchNorm through the native kernels on the CPU: `(output, batch mean,
/// biased batch variance)`, the statistics detached.
pub fn batch_norm_train<const D: usize>(
    x: Tensor<D>,
    gamma: Tensor<1>,
    beta: Tensor<1>,
    epsilon: f64,
) -> (Tensor<D>, Tensor<1>, Tensor<1>) {
    if !on_flex(&x.device()) {
        let out = burn::tensor::module::batch_norm_train(x, gamma, beta, epsilon);
        return (out.output, out.mean, out.variance);
    }
    let out = <Dispatch as Kernels>::batch_norm_train_native(
        x.into_dispatch(),
        gamma.into_dispatch(),
        beta.into_dispatch(),
        epsilon,
    );
    (
        Tensor::from_dispatch(out.output),
        Tensor::from_dispatch(out.mean),
        Tensor::from_dispatch(out.variance),
    )
}

/// Eval-mode BatchNorm in one pass on the CPU: the statistics become a per-channel scale
/// and shift (small tensors, differentiated by burn), applied by the native kernel.
pub fn batch_norm_eval<const D: usize>(
    x: Tensor<D>,
    gamma: Tensor<1>,
    beta: Tensor<1>,
    mean: Tensor<1>,
    variance: Tensor<1>,
    epsilon: f64,
) -> Tensor<D> {
    if !on_flex(&x.device()) {
        return burn::tensor::module::batch_norm(x, gamma, beta, mean, variance, epsilon);
    }
    let scale = gamma / variance.add_scalar(epsilon).sqrt();
    let shift = beta - mean * scale.clone();
    let y = <Dispatch as Kernels>::channel_affine_native(
        x.into_dispatch(),
        scale.into_dispatch(),
        shift.into_dispatch(),
    );
    Tensor::from_dispatch(y)
}

/// LayerNorm over the last dimension through the native kernel on the CPU (f32): one pass
/// for the statistics and one for the output, where burn's composition makes six, each
/// with its own autodiff node and saved tensor.
pub fn layer_norm<const D: usize>(
    x: Tensor<D>,
    gamma: Tensor<1>,
    beta: Tensor<1>,
    epsilon: f64,
) -> Tensor<D> {
    if !on_flex(&x.device()) || x.dtype() != DType::F32 {
        return burn::tensor::module::layer_norm(x, gamma, Some(beta), epsilon);
    }
    let y = <Dispatch as Kernels>::layer_norm_native(
        x.into_dispatch(),
        gamma.into_dispatch(),
        beta.into_dispatch(),
        epsilon,
    );
    Tensor::from_dispatch(y)
}

/// `softmax(q k^T * scale + bias) v` over `[batch, heads, seq, dim]`, where `bias`
/// `[groups, seq, seq]` is added to problem `i` of the `batch * heads` as matrix
/// `i % groups` (for a Swin: per window and head); through the native blocked kernel on the
/// CPU (f32), burn's matmuls and softmax otherwise.
pub fn attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    bias: Option<Tensor<3>>,
    scale: f32,
) -> Tensor<4> {
    let [batch, heads, seq, _] = q.dims();
    let bias = bias.unwrap_or_else(|| Tensor::zeros([1, seq, seq], &q.device()));
    if !on_flex(&q.device()) || q.dtype() != DType::F32 {
        let [groups, ..] = bias.dims();
        let scores = q.matmul(k.swap_dims(2, 3)).mul_scalar(scale);
        let scores = scores.reshape([batch * heads / groups, groups, seq, seq]) + bias.unsqueeze();
        let scores = scores.reshape([batch, heads, seq, seq]);
        return burn::tensor::activation::softmax(scores, 3).matmul(v);
    }
    let y = <Dispatch as Kernels>::attention_native(
        q.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        bias.into_dispatch(),
        scale,
    );
    Tensor::from_dispatch(y)
}

/// ReLU6 through the native kernel on the CPU.
pub fn relu6<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    if !on_flex(&x.device()) {
        return burn::tensor::activation::relu6(x);
    }
    Tensor::from_dispatch(<Dispatch as Kernels>::relu6_native(x.into_dispatch()))
}

/// `op` through its native kernel on the CPU for f32, `generic` (burn's) otherwise.
fn activation<const D: usize>(
    x: Tensor<D>,
    op: Activation,
    generic: fn(Tensor<D>) -> Tensor<D>,
) -> Tensor<D> {
    if !on_flex(&x.device()) || x.dtype() != DType::F32 {
        return generic(x);
    }
    Tensor::from_dispatch(<Dispatch as Kernels>::activation_native(
        x.into_dispatch(),
        op,
    ))
}

/// SiLU (swish) through the native kernel on the CPU: burn-flex's generic sigmoid calls a
/// scalar `expf` per element, which profiles at half of EfficientNet's inference time.
pub fn silu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    activation(x, Activation::Silu, burn::tensor::activation::silu)
}

/// Exact GELU through the native kernel on the CPU: burn-flex's generic one calls a scalar
/// `erff` per element, 13% of ConvNeXt-Tiny's inference time.
pub fn gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    activation(x, Activation::Gelu, burn::tensor::activation::gelu)
}

/// Hardswish through the native kernel on the CPU: burn's is four elementwise passes, each
/// with its own autodiff node (MobileNetV3 runs it on most feature maps).
pub fn hardswish<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    activation(
        x,
        Activation::Hardswish,
        burn::tensor::activation::hard_swish,
    )
}

#[cfg(test)]
mod tests {
    //! Gradient checks: each native kernel against burn's generic implementation, forward
    //! and both gradients, on random inputs of odd sizes.

    use super::*;
    use burn::tensor::Distribution;
    use burn::tensor::module::conv2d as generic_conv2d;

    /// `max |a - b| <= 1e-4 * max(1, max |b|)`.
    fn assert_close(what: &str, ours: Tensor<4>, reference: Tensor<4>) {
        assert_eq!(ours.dims(), reference.dims(), "{what}: shape");
        let scale = reference.clone().abs().max().into_scalar::<f32>().max(1.0);
        let diff = (ours - reference).abs().max().into_scalar::<f32>();
        assert!(
            diff <= 1e-4 * scale,
            "{what}: max diff {diff} (scale {scale})"
        );
    }

    /// One convolution to check: name, input shape, output channels, kernel size, stride
    /// and padding as (top, bottom, left, right).
    type Case = (&'static str, [usize; 4], usize, usize, usize, [usize; 4]);

    /// Checks one case split into `groups`; it is depthwise when every channel is a group.
    fn check(groups: usize, (name, x_shape, cout, kernel, stride, padding): Case) {
        let device = Device::flex().autodiff();
        let cin = x_shape[1];
        let depthwise = groups == cin && cout == cin;
        let w_shape = [cout, cin / groups, kernel, kernel];
        let [t, b, l, r] = padding;
        let options = ConvOptions::new_with_padding([stride; 2], [(t, b), (l, r)], [1, 1], groups);
        let geometry = ConvGeometry::new(x_shape, w_shape, &options).expect("a native case");
        assert_eq!(geometry.depthwise, depthwise, "{name}");

        let normal = Distribution::Normal(0.0, 1.0);
        let x = Tensor::<4>::random(x_shape, normal, &device);
        let w = Tensor::<4>::random(w_shape, normal, &device);
        let run = |native: bool| {
            let (x, w) = (x.clone().require_grad(), w.clone().require_grad());
            let y = if native {
                conv2d_flex(x.clone(), w.clone(), None, options.clone())
            } else {
                generic_conv2d(x.clone(), w.clone(), None, options.clone())
            };
            // A fixed random weighting so every output element gets its own gradient.
            let seed_grad = Tensor::<4>::ones(y.dims(), &device).cumsum(3).sin();
            let grads = (y.clone() * seed_grad).sum().backward();
            (y, x.grad(&grads).unwrap(), w.grad(&grads).unwrap())
        };
        let (y, dx, dw) = run(true);
        let (y_ref, dx_ref, dw_ref) = run(false);
        // With a bias, outside autodiff: the folded convolutions of inference.
        let bias = Tensor::<1>::random([cout], normal, &Device::flex());
        let (x_plain, w_plain) = (x.clone().inner(), w.clone().inner());
        let with_bias = |conv: fn(_, _, _, _) -> _| {
            conv(
                x_plain.clone(),
                w_plain.clone(),
                Some(bias.clone()),
                options.clone(),
            )
        };
        let reference = with_bias(generic_conv2d);
        assert_close(
            &format!("{name} forward with bias"),
            with_bias(conv2d_flex),
            reference.clone(),
        );
        let activations = [
            (
                ConvActivation::Relu,
                burn::tensor::activation::relu as fn(_) -> _,
            ),
            (ConvActivation::Relu6, burn::tensor::activation::relu6),
            (
                ConvActivation::Native(Activation::Silu),
                burn::tensor::activation::silu,
            ),
            (
                ConvActivation::Native(Activation::Gelu),
                burn::tensor::activation::gelu,
            ),
            (
                ConvActivation::Native(Activation::Hardswish),
                burn::tensor::activation::hard_swish,
            ),
        ];
        for (activation, generic) in activations {
            let fused = <Dispatch as Kernels>::conv2d_native_bias_activation(
                x_plain.clone().into_dispatch(),
                w_plain.clone().into_dispatch(),
                bias.clone().into_dispatch(),
                options.clone(),
                activation,
            );
            assert_close(
                &format!("{name} forward with bias and {activation:?}"),
                Tensor::from_dispatch(fused),
                generic(reference.clone()),
            );
        }
        assert_close(&format!("{} forward", name), y, y_ref);
        assert_close(&format!("{} input grad", name), dx, dx_ref);
        assert_close(&format!("{} weight grad", name), dw, dw_ref);
    }

    #[test]
    fn depthwise_kernels_match_generic() {
        let cases = [
            ("3x3 s1", [3, 5, 7, 9], 3, 1, [1, 1, 1, 1]),
            ("3x3 s2", [2, 5, 9, 7], 3, 2, [1, 1, 1, 1]),
            ("5x5 s1", [2, 3, 11, 6], 5, 1, [2, 2, 2, 2]),
            ("5x5 s2 SAME", [2, 3, 11, 10], 5, 2, [1, 2, 1, 2]),
            ("3x3 s2 unpadded", [1, 4, 8, 5], 3, 2, [0, 0, 0, 0]),
        ];
        for (name, x, kernel, stride, padding) in cases {
            check(x[1], (name, x, x[1], kernel, stride, padding));
        }
    }

    #[test]
    fn dense_kernels_match_generic() {
        let cases = [
            (
                "1x1 s1 pointwise, small planes",
                [3, 6, 5, 7],
                10,
                1,
                1,
                [0, 0, 0, 0],
            ),
            // Planes the direct kernel takes: whole tiles, a partial one, a padded strip.
            ("1x1 s1 pointwise", [2, 7, 12, 13], 13, 1, 1, [0, 0, 0, 0]),
            // One image, in blocks of columns over the threads.
            (
                "1x1 s1 pointwise, wide",
                [1, 300, 12, 13],
                7,
                1,
                1,
                [0, 0, 0, 0],
            ),
            ("1x1 s2 downsample", [2, 6, 9, 7], 4, 1, 2, [0, 0, 0, 0]),
            ("3x3 s2 stem", [2, 3, 13, 11], 8, 3, 2, [1, 1, 1, 1]),
            ("3x3 s2 SAME stem", [2, 3, 12, 10], 5, 3, 2, [0, 1, 0, 1]),
            ("3x3 s1 Winograd", [2, 4, 7, 5], 6, 3, 1, [1, 1, 1, 1]),
            (
                "3x3 s1 Winograd unpadded",
                [3, 5, 8, 9],
                7,
                3,
                1,
                [0, 0, 0, 0],
            ),
            (
                "3x3 s1 Winograd SAME-style",
                [1, 6, 6, 5],
                3,
                3,
                1,
                [0, 2, 1, 1],
            ),
            (
                "3x3 s1 Winograd wide",
                [2, 33, 6, 7],
                17,
                3,
                1,
                [1, 1, 1, 1],
            ),
            // More tiles and input channels than the transforms' lanes, and a remainder.
            (
                "3x3 s1 Winograd, many tiles",
                [2, 17, 19, 18],
                6,
                3,
                1,
                [1, 1, 1, 1],
            ),
            ("7x7 s2", [1, 3, 15, 17], 4, 7, 2, [3, 3, 3, 3]),
        ];
        for case in cases {
            check(1, case);
        }
    }

    /// Grouped convolutions (ResNeXt's and RegNet's 3x3, a grouped 1x1, a depthwise one
    /// with a channel multiplier) go through the dense kernels one group at a time.
    #[test]
    fn grouped_kernels_match_generic() {
        let cases = [
            (4, ("3x3 s1 4 groups", [2, 8, 7, 6], 12, 3, 1, [1, 1, 1, 1])),
            (3, ("3x3 s2 3 groups", [3, 9, 9, 7], 6, 3, 2, [1, 1, 1, 1])),
            (2, ("1x1 s1 2 groups", [2, 6, 5, 4], 4, 1, 1, [0, 0, 0, 0])),
            (
                5,
                ("3x3 s1 x2 multiplier", [2, 5, 6, 5], 10, 3, 1, [1, 1, 1, 1]),
            ),
        ];
        for (groups, case) in cases {
            check(groups, case);
        }
    }

    fn check_batch_norm<const D: usize>(shape: [usize; D]) {
        let device = Device::flex().autodiff();
        let channels = shape[1];
        // An offset mean and a non-unit spread, as real activations have.
        let x = Tensor::<D>::random(shape, Distribution::Normal(3.0, 2.0), &device);
        let gamma = Tensor::<1>::random([channels], Distribution::Normal(1.0, 0.5), &device);
        let beta = Tensor::<1>::random([channels], Distribution::Normal(0.0, 1.0), &device);
        let run = |native: bool| {
            let (x, gamma, beta) = (
                x.clone().require_grad(),
                gamma.clone().require_grad(),
                beta.clone().require_grad(),
            );
            let (y, mean, var) = if native {
                batch_norm_train(x.clone(), gamma.clone(), beta.clone(), 1e-5)
            } else {
                let out = burn::tensor::module::batch_norm_train(
                    x.clone(),
                    gamma.clone(),
                    beta.clone(),
                    1e-5,
                );
                (out.output, out.mean, out.variance)
            };
            let seed_grad = Tensor::<D>::ones(y.dims(), &device).cumsum(D - 1).sin();
            let grads = (y.clone() * seed_grad).sum().backward();
            let flat = |t: Tensor<D>| t.reshape([1, 1, 1, -1]);
            let vec4 = |t: Tensor<1>| t.reshape([1, 1, 1, -1]);
            [
                flat(y),
                vec4(mean),
                vec4(var),
                flat(x.grad(&grads).unwrap()),
                vec4(gamma.grad(&grads).unwrap()),
                vec4(beta.grad(&grads).unwrap()),
            ]
        };
        let names = [
            "output",
            "mean",
            "variance",
            "input grad",
            "gamma grad",
            "beta grad",
        ];
        for ((name, ours), reference) in names.iter().zip(run(true)).zip(run(false)) {
            assert_close(&format!("batch norm {shape:?} {name}"), ours, reference);
        }
    }

    #[test]
    fn batch_norm_kernels_match_generic() {
        check_batch_norm([3, 5, 7, 9]);
        check_batch_norm([2, 4, 1, 1]);
        check_batch_norm([6, 3]);
    }

    #[test]
    fn max_pool_kernels_match_generic() {
        use burn::nn::pool::MaxPool2dConfig;
        let device = Device::flex().autodiff();
        let cases = [
            ([2, 3, 11, 9], 3, 2, 1),
            ([1, 2, 8, 7], 2, 2, 0),
            ([2, 2, 7, 10], 3, 1, 1),
        ];
        for (shape, kernel, stride, pad) in cases {
            let pool = MaxPool2dConfig::new([kernel; 2])
                .with_strides([stride; 2])
                .with_padding(PaddingConfig2d::Explicit(pad, pad, pad, pad))
                .init();
            let x = Tensor::<4>::random(shape, Distribution::Normal(0.0, 1.0), &device);
            let run = |native: bool| {
                let x = x.clone().require_grad();
                let y = if native {
                    max_pool2d(&pool, x.clone())
                } else {
                    pool.forward(x.clone())
                };
                let seed_grad = Tensor::<4>::ones(y.dims(), &device).cumsum(3).sin();
                let grads = (y.clone() * seed_grad).sum().backward();
                (y, x.grad(&grads).unwrap())
            };
            let ((y, dx), (y_ref, dx_ref)) = (run(true), run(false));
            assert_close(&format!("max pool {shape:?} forward"), y, y_ref);
            assert_close(&format!("max pool {shape:?} input grad"), dx, dx_ref);
        }
    }

    /// A normalisation's output and its input, scale and shift gradients, native against
    /// burn's (`norm(native, x, gamma, beta)`), with random scales and shifts of `width`.
    fn check_normalisation(
        name: &str,
        x: Tensor<4>,
        width: usize,
        norm: impl Fn(bool, Tensor<4>, Tensor<1>, Tensor<1>) -> Tensor<4>,
    ) {
        let device = x.device();
        let normal = |mean, std| Distribution::Normal(mean, std);
        let gamma = Tensor::<1>::random([width], normal(1.0, 0.5), &device);
        let beta = Tensor::<1>::random([width], normal(0.0, 1.0), &device);
        let run = |native: bool| {
            let (x, gamma, beta) = (
                x.clone().require_grad(),
                gamma.clone().require_grad(),
                beta.clone().require_grad(),
            );
            let y = norm(native, x.clone(), gamma.clone(), beta.clone());
            let seed_grad = Tensor::<4>::ones(y.dims(), &device).cumsum(3).sin();
            let grads = (y.clone() * seed_grad).sum().backward();
            let as4 = |t: Tensor<1>| t.reshape([1, 1, 1, -1]);
            [
                y,
                x.grad(&grads).unwrap(),
                as4(gamma.grad(&grads).unwrap()),
                as4(beta.grad(&grads).unwrap()),
            ]
        };
        let names = ["output", "input grad", "gamma grad", "beta grad"];
        for ((part, ours), reference) in names.iter().zip(run(true)).zip(run(false)) {
            assert_close(&format!("{name} {part}"), ours, reference);
        }
    }

    #[test]
    fn eval_batch_norm_matches_generic() {
        let device = Device::flex().autodiff();
        let normal = |mean, std| Distribution::Normal(mean, std);
        let x = Tensor::<4>::random([3, 4, 5, 7], normal(1.0, 2.0), &device);
        let mean = Tensor::<1>::random([4], normal(1.0, 1.0), &device);
        let variance = Tensor::<1>::random([4], normal(0.0, 1.0), &device)
            .abs()
            .add_scalar(0.1);
        check_normalisation("eval batch norm", x, 4, |native, x, gamma, beta| {
            let (mean, variance) = (mean.clone(), variance.clone());
            if native {
                batch_norm_eval(x, gamma, beta, mean, variance, 1e-5)
            } else {
                burn::tensor::module::batch_norm(x, gamma, beta, mean, variance, 1e-5)
            }
        });
    }

    /// LayerNorm over the last dimension against burn's composition, on a permuted
    /// (strided) input whose rows are neither a multiple of the work block nor of the
    /// vector width.
    #[test]
    fn layer_norm_matches_generic() {
        let device = Device::flex().autodiff();
        let x = Tensor::<4>::random([3, 21, 5, 7], Distribution::Normal(1.0, 2.0), &device);
        check_normalisation("layer norm", x, 21, |native, x, gamma, beta| {
            let nhwc = x.permute([0, 2, 3, 1]);
            if native {
                layer_norm(nhwc, gamma, beta, 1e-6)
            } else {
                burn::tensor::module::layer_norm(nhwc, gamma, Some(beta), 1e-6)
            }
        });
    }

    /// Blocked attention against burn's matmuls and softmax: output and the gradients of
    /// queries, keys, values and a per-head bias, with a sequence longer than one block and
    /// not a multiple of it, on strided (transposed) operands as a model passes them.
    #[test]
    fn attention_matches_generic() {
        let device = Device::flex().autodiff();
        let normal = Distribution::Normal(0.0, 1.0);
        let random = |seed, shape: [usize; 4]| {
            device.seed(seed);
            Tensor::<4>::random(shape, normal, &device)
        };
        let (q, k, v) = (
            random(1, [2, 70, 3, 8]),
            random(2, [2, 70, 3, 8]),
            random(3, [2, 70, 3, 8]),
        );
        let bias = random(4, [1, 3, 70, 70]);
        let run = |native: bool| {
            let [q, k, v, bias] = [&q, &k, &v, &bias].map(|t| t.clone().require_grad());
            let heads = |t: &Tensor<4>| t.clone().swap_dims(1, 2);
            let (qh, kh, vh) = (heads(&q), heads(&k), heads(&v));
            let scale = 8f32.powf(-0.5);
            let y = if native {
                attention(qh, kh, vh, Some(bias.clone().reshape([3, 70, 70])), scale)
            } else {
                let scores = qh.matmul(kh.swap_dims(2, 3)).mul_scalar(scale) + bias.clone();
                burn::tensor::activation::softmax(scores, 3).matmul(vh)
            };
            let seed_grad = Tensor::<4>::ones(y.dims(), &device).cumsum(3).sin();
            let grads = (y.clone() * seed_grad).sum().backward();
            [
                y,
                q.grad(&grads).unwrap(),
                k.grad(&grads).unwrap(),
                v.grad(&grads).unwrap(),
                bias.grad(&grads).unwrap(),
            ]
        };
        let names = [
            "output",
            "query grad",
            "key grad",
            "value grad",
            "bias grad",
        ];
        for ((name, ours), reference) in names.iter().zip(run(true)).zip(run(false)) {
            assert_close(&format!("attention {name}"), ours, reference);
        }
    }

    /// An elementwise kernel's output and input gradient against burn's generic
    /// implementation, over the whole range its approximations clamp (large magnitudes
    /// included), to `1e-6` relative.
    fn check_elementwise(
        name: &str,
        native: fn(Tensor<1>) -> Tensor<1>,
        generic: fn(Tensor<1>) -> Tensor<1>,
    ) {
        let device = Device::flex().autodiff();
        let run = |f: fn(Tensor<1>) -> Tensor<1>| {
            let v: Vec<f32> = (0..2001).map(|i| (i as f32 - 1000.0) * 0.013).collect();
            let mut v = v;
            v.extend([-100.0, -88.5, -20.0, 20.0, 88.5, 100.0, 0.0, -0.0]);
            let n = v.len();
            let x = Tensor::<1>::from_floats(v.as_slice(), &device).require_grad();
            let y = f(x.clone());
            let w = Tensor::<1>::from_floats(
                (0..n)
                    .map(|i| (i as f32 * 0.7).cos())
                    .collect::<Vec<_>>()
                    .as_slice(),
                &device,
            );
            let grads = (y.clone() * w).sum().backward();
            let dx: Vec<f32> = x.grad(&grads).unwrap().into_data().try_to_vec().unwrap();
            let y: Vec<f32> = y.into_data().try_to_vec().unwrap();
            (y, dx)
        };
        let (ours, reference) = (run(native), run(generic));
        for (a, b) in ours.0.iter().zip(&reference.0) {
            assert!(
                (a - b).abs() <= 1e-6 * b.abs().max(1.0),
                "{name} {a} vs {b}"
            );
        }
        for (a, b) in ours.1.iter().zip(&reference.1) {
            assert!(
                (a - b).abs() <= 1e-6 * b.abs().max(1.0),
                "{name} grad {a} vs {b}"
            );
        }
    }

    #[test]
    fn silu_matches_the_generic_implementation() {
        check_elementwise("silu", silu, burn::tensor::activation::silu);
    }

    /// SiLU runs in blocks of sixteen with the tail padded: a value's result is the same
    /// bit for bit wherever a slice is cut (threads cut tensors differently), forward and
    /// backward.
    #[test]
    fn silu_does_not_depend_on_where_a_slice_is_cut() {
        let x: Vec<f32> = (0..101).map(|i| (i as f32 * 0.37).sin() * 9.0).collect();
        let grad: Vec<f32> = (0..101).map(|i| (i as f32 * 0.11).cos()).collect();
        let cuts = [0, 7, 40, 101];
        let (mut whole, mut pieces) = (x.clone(), x.clone());
        cpu::silu_chunk(&mut whole);
        for cut in cuts.windows(2) {
            cpu::silu_chunk(&mut pieces[cut[0]..cut[1]]);
        }
        assert_eq!(whole, pieces);
        let (mut whole, mut pieces) = (grad.clone(), grad.clone());
        cpu::silu_grad_chunk(&x, &mut whole);
        for cut in cuts.windows(2) {
            let range = cut[0]..cut[1];
            cpu::silu_grad_chunk(&x[range.clone()], &mut pieces[range]);
        }
        assert_eq!(whole, pieces);
    }

    #[test]
    fn gelu_matches_the_generic_implementation() {
        check_elementwise("gelu", gelu, burn::tensor::activation::gelu);
    }

    /// Including the kinks at -3 and 3, where PyTorch's gradient is -0.5 and 1.5 (the
    /// middle piece's, closed at both ends).
    #[test]
    fn hardswish_matches_the_generic_implementation_and_pytorchs_kinks() {
        check_elementwise("hardswish", hardswish, burn::tensor::activation::hard_swish);
        let device = Device::flex().autodiff();
        let x = Tensor::<1>::from_floats([-4.0, -3.0, 0.0, 3.0, 4.0], &device).require_grad();
        let grads = hardswish(x.clone()).sum().backward();
        let dx: Vec<f32> = x.grad(&grads).unwrap().into_data().try_to_vec().unwrap();
        assert_eq!(dx, [0.0, -0.5, 0.5, 1.5, 1.0]);
    }

    /// The ReLU a convolution applies as it writes its output: PyTorch's, NaN included.
    #[test]
    fn fused_relu_keeps_nan_as_pytorch() {
        let mut x = [f32::NAN, -2.5, -0.0, 0.0, 3.25];
        cpu::relu_chunk(&mut x);
        assert!(x[0].is_nan());
        assert_eq!(x[1..], [0.0, 0.0, 0.0, 3.25]);
    }

    #[test]
    fn relu6_matches_pytorch_hardtanh() {
        let device = Device::flex().autodiff();
        let values = [-3.0f32, -0.0, 0.0, 0.5, 5.9, 6.0, 7.5, 2.0, -1.0];
        let x = Tensor::<1>::from_floats(values, &device).require_grad();
        let y = relu6(x.clone());
        let grads = (y.clone() * Tensor::arange(1..10, &device).float())
            .sum()
            .backward();
        let dx: Vec<f32> = x
            .grad(&grads)
            .unwrap()
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        let y: Vec<f32> = y.into_data().try_to_vec::<f32>().unwrap();
        assert_eq!(y, [0.0, 0.0, 0.0, 0.5, 5.9, 6.0, 6.0, 2.0, 0.0]);
        // torch.nn.functional.relu6 backward: zero at and beyond both edges.
        assert_eq!(dx, [0.0, 0.0, 0.0, 4.0, 5.0, 0.0, 0.0, 8.0, 0.0]);
    }
    /// Every gradient of a few convolutions, a train-mode BatchNorm, a LayerNorm and an
    /// attention, as bits, computed
    /// in a rayon pool of `threads` threads.
    fn gradient_bits(threads: usize) -> Vec<Vec<u32>> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("a thread pool");
        pool.install(|| {
            let device = Device::flex().autodiff();
            let values = |shape: [usize; 4], phase: f32| {
                let n: usize = shape.iter().product();
                let v: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37 + phase).sin()).collect();
                Tensor::<4>::from_data(TensorData::new(v, shape), &device).require_grad()
            };
            let bits = |t: Tensor<4>| -> Vec<u32> {
                let v: Vec<f32> = t.into_data().try_to_vec().unwrap();
                v.iter().map(|x| x.to_bits()).collect()
            };
            let mut out = Vec::new();
            // im2col (3x3 stride 2), pointwise, Winograd, depthwise and grouped, batch 9
            // on planes large enough for the direct pointwise kernel, and batch 2 (fewer
            // images than some of the thread counts).
            let convs = [
                (6, 3, 2, 1),
                (6, 1, 1, 1),
                (6, 3, 1, 1),
                (5, 3, 1, 5),
                (10, 3, 1, 5),
            ];
            let batches = convs.iter().map(|&c| (9, c)).chain([(2, (6, 1, 1, 1))]);
            for (batch, (cout, kernel, stride, groups)) in batches {
                let x = values([batch, 5, 12, 11], 0.1);
                let w = values([cout, 5 / groups, kernel, kernel], 0.7);
                let pad = kernel / 2;
                let options = ConvOptions::new([stride; 2], [pad; 2], [1, 1], groups);
                let y = conv2d_flex(x.clone(), w.clone(), None, options);
                let grads = (y.clone() * y).sum().backward();
                out.push(bits(x.grad(&grads).unwrap()));
                out.push(bits(w.grad(&grads).unwrap()));
            }
            let x = values([9, 5, 7, 6], 0.3);
            let gamma = Tensor::<1>::ones([5], &device).require_grad();
            let beta = Tensor::<1>::zeros([5], &device).require_grad();
            let y = batch_norm_train(x.clone(), gamma.clone(), beta.clone(), 1e-5).0;
            let grads = (y.clone() * y.clone().sin()).sum().backward();
            out.push(bits(x.grad(&grads).unwrap()));
            out.push(bits(gamma.grad(&grads).unwrap().reshape([1, 1, 1, -1])));
            let gamma = Tensor::<1>::ones([6], &device).require_grad();
            let beta = Tensor::<1>::zeros([6], &device).require_grad();
            let y = layer_norm(x.clone(), gamma.clone(), beta.clone(), 1e-5);
            let grads = (y.clone() * y.sin()).sum().backward();
            out.push(bits(x.grad(&grads).unwrap()));
            out.push(bits(gamma.grad(&grads).unwrap().reshape([1, 1, 1, -1])));
            out.push(bits(beta.grad(&grads).unwrap().reshape([1, 1, 1, -1])));
            let (q, k, v) = (
                values([2, 3, 70, 8], 0.2),
                values([2, 3, 70, 8], 0.5),
                values([2, 3, 70, 8], 0.9),
            );
            let bias = values([1, 3, 70, 70], 0.4);
            let y = attention(
                q.clone(),
                k.clone(),
                v.clone(),
                Some(bias.clone().reshape([3, 70, 70])),
                0.35,
            );
            let grads = (y.clone() * y).sum().backward();
            for t in [q, k, v, bias] {
                out.push(bits(t.grad(&grads).unwrap()));
            }
            out
        })
    }

    #[test]
    fn gradients_are_bit_identical_on_any_number_of_threads() {
        let one = gradient_bits(1);
        for threads in [2, 3, 7] {
            assert!(
                gradient_bits(threads) == one,
                "{threads} threads differ from 1"
            );
        }
    }
}
