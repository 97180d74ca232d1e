//! torchvision's Swin Transformer: `swin_t`, `swin_s`, `swin_b` and the V2 ones
//! `swin_v2_t`, `swin_v2_s`, `swin_v2_b`. Patches of 4x4 are embedded (`features.0`), then
//! four stages of blocks attend within windows of the NHWC map, every second block with the
//! windows shifted by half a window (and a mask keeping apart what the shift brought
//! together); a patch merging halves the map between stages. Attention carries a relative
//! position bias: a learned table in V1, a small MLP over log-spaced coordinates in V2,
//! which also uses cosine attention, post-norm blocks, and the merging's norm after its
//! reduction. Maps that are not whole windows are padded, so any image size works.

use burn::module::{Module, Param};
use burn::nn::{Gelu, Initializer, Linear, LinearConfig, Relu};
use burn::prelude::*;
use burn::tensor::activation::sigmoid;
use serde::{Deserialize, Serialize};

use super::family::{Architecture, Detected, Family, FreezeGroup, head_outputs};
use super::layers::{
    ConvSpec, Layer, LayerNorm, Permute, StochasticDepth, dropout, head, layer_norm, linear,
    sequential, sequential_onnx,
};
use super::onnx_graph::{Graph, Value, child};
use super::weights::{Weights, torchvision};
use crate::checkpoint::StateDict;
use crate::checkpoint::write::{NamedTensor, Values};
use crate::error::Result;
use crate::kernels;
use crate::preprocess::{Interpolation, Preprocess};

/// Every LayerNorm's eps.
const EPS: f64 = 1e-5;
/// What the shifted-window mask adds to the scores of token pairs it keeps apart.
const MASKED: f32 = -100.0;
/// Width of V2's position-bias MLP.
const CPB_HIDDEN: usize = 512;

/// A Swin Transformer: its version, patch size, width, blocks and heads per stage, window
/// side, and the stochastic depth of the last block.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SwinSpec {
    /// Swin V2 (cosine attention, position-bias MLP, post-norm blocks).
    pub v2: bool,
    /// Side of the square patches embedded by `features.0`.
    pub patch_size: usize,
    /// Channels of the first stage (doubled at each later one).
    pub embed_dim: usize,
    /// Blocks in each stage.
    pub depths: [usize; 4],
    /// Attention heads in each stage.
    pub num_heads: [usize; 4],
    /// Side of the square attention windows.
    pub window_size: usize,
    /// torchvision's `stochastic_depth_prob`.
    pub stochastic_depth: f64,
}

impl SwinSpec {
    const fn new(
        v2: bool,
        embed_dim: usize,
        depths: [usize; 4],
        num_heads: [usize; 4],
        stochastic_depth: f64,
    ) -> Self {
        Self {
            v2,
            patch_size: 4,
            embed_dim,
            depths,
            num_heads,
            window_size: if v2 { 8 } else { 7 },
            stochastic_depth,
        }
    }

    /// Channels of the last stage, which feed the head.
    pub fn feature_dim(&self) -> usize {
        self.embed_dim << 3
    }
}

/// `torch.roll(x, -shift, dim)`: the element at `shift` moves to the front.
fn roll_left<const D: usize>(x: Tensor<D>, shift: usize, dim: usize) -> Tensor<D> {
    let n = x.dims()[dim];
    let shift = shift % n;
    if shift == 0 {
        return x;
    }
    Tensor::cat(
        vec![
            x.clone().narrow(dim, shift, n - shift),
            x.narrow(dim, 0, shift),
        ],
        dim,
    )
}

/// `x` padded with zeros at the end of `dim` to length `to`.
fn pad_end(x: Tensor<4>, dim: usize, to: usize) -> Tensor<4> {
    let mut dims = x.dims();
    if dims[dim] == to {
        return x;
    }
    dims[dim] = to - dims[dim];
    let zeros = Tensor::zeros(dims, &x.device());
    Tensor::cat(vec![x, zeros], dim)
}

/// Where one block's windows fall on an `h` x `w` map: the map padded to whole windows,
/// and the shift per axis (none along an axis one window covers, as torchvision does).
#[derive(Debug, Clone, Copy)]
struct Windows {
    size: usize,
    map: [usize; 2],
    padded: [usize; 2],
    shift: [usize; 2],
}

impl Windows {
    fn new(size: usize, shift: usize, map: [usize; 2]) -> Self {
        let padded = map.map(|m| m.div_ceil(size) * size);
        Self {
            size,
            map,
            padded,
            shift: padded.map(|p| if size >= p { 0 } else { shift }),
        }
    }

    fn shifted(&self) -> bool {
        self.shift.iter().any(|&s| s > 0)
    }

    /// Windows per image.
    fn count(&self) -> usize {
        self.padded.iter().map(|p| p / self.size).product()
    }

    /// Tokens per window.
    fn tokens(&self) -> usize {
        self.size * self.size
    }

    /// The `[windows, N, N]` mask of a shifted block (0 within a region, [`MASKED`] across
    /// regions the cyclic shift put side by side).
    fn mask(&self) -> Vec<f32> {
        let region = |i: usize, axis: usize| {
            let (p, s) = (self.padded[axis], self.shift[axis]);
            if s == 0 {
                0
            } else {
                usize::from(i >= p - self.size) + usize::from(i >= p - s)
            }
        };
        let (ws, n) = (self.size, self.tokens());
        let per_row = self.padded[1] / ws;
        let mut mask = Vec::with_capacity(self.count() * n * n);
        for win in 0..self.count() {
            let (wy, wx) = (win / per_row * ws, win % per_row * ws);
            let label = |t: usize| region(wy + t / ws, 0) * 3 + region(wx + t % ws, 1);
            for a in 0..n {
                mask.extend((0..n).map(|b| if label(a) == label(b) { 0.0 } else { MASKED }));
            }
        }
        mask
    }

    /// The NHWC map `[N, h, w, C]` padded to whole windows, rolled by the shift, and cut
    /// into windows of tokens `[N * windows, tokens, C]`.
    fn partition(&self, x: Tensor<4>) -> Tensor<3> {
        let ([ph, pw], [sy, sx], ws) = (self.padded, self.shift, self.size);
        let x = pad_end(pad_end(x, 1, ph), 2, pw);
        let x = roll_left(roll_left(x, sy, 1), sx, 2);
        let [n, _, _, c] = x.dims();
        x.reshape([n, ph / ws, ws, pw / ws, ws, c])
            .permute([0, 1, 3, 2, 4, 5])
            .reshape([n * self.count(), ws * ws, c])
    }

    /// The inverse of [`Self::partition`]: the windows of `n` maps put back, rolled back
    /// and cropped.
    fn reverse(&self, x: Tensor<3>, n: usize) -> Tensor<4> {
        let [_, _, c] = x.dims();
        let ([ph, pw], [sy, sx], ws) = (self.padded, self.shift, self.size);
        let x = x
            .reshape([n, ph / ws, pw / ws, ws, ws, c])
            .permute([0, 1, 3, 2, 4, 5])
            .reshape([n, ph, pw, c]);
        let x = roll_left(roll_left(x, ph - sy, 1), pw - sx, 2);
        x.narrow(1, 0, self.map[0]).narrow(2, 0, self.map[1])
    }

    /// [`Self::partition`] in an ONNX graph, for `c` channels.
    fn partition_onnx(&self, g: &mut Graph, scope: &str, x: &Value, c: usize) -> Value {
        let ([ph, pw], [sy, sx], ws) = (self.padded, self.shift, self.size);
        let x = g.pad_end(scope, x, &[0, ph - self.map[0], pw - self.map[1], 0]);
        let x = g.roll_left(scope, &x, 1, sy, ph);
        let x = g.roll_left(scope, &x, 2, sx, pw);
        let grid = [ph / ws, ws, pw / ws, ws, c].map(|d| d as i64);
        let x = g.reshape(scope, &x, &[&[-1], &grid[..]].concat());
        let x = g.transpose(scope, &[0, 1, 3, 2, 4, 5], &x);
        g.reshape(scope, &x, &[-1, self.tokens() as i64, c as i64])
    }

    /// [`Self::reverse`] in an ONNX graph.
    fn reverse_onnx(&self, g: &mut Graph, scope: &str, x: &Value, c: usize) -> Value {
        let ([ph, pw], [sy, sx], ws) = (self.padded, self.shift, self.size);
        let grid = [ph / ws, pw / ws, ws, ws, c].map(|d| d as i64);
        let x = g.reshape(scope, x, &[&[-1], &grid[..]].concat());
        let x = g.transpose(scope, &[0, 1, 3, 2, 4, 5], &x);
        let x = g.reshape(scope, &x, &[-1, ph as i64, pw as i64, c as i64]);
        let x = g.roll_left(scope, &x, 1, ph - sy, ph);
        let x = g.roll_left(scope, &x, 2, pw - sx, pw);
        if self.padded == self.map {
            x
        } else {
            g.crop(scope, &x, &[1, 2], &self.map)
        }
    }
}

/// For each token pair `(a, b)` of a window, the row of the relative-position table for
/// their offset.
fn relative_position_index(window: usize) -> Vec<i64> {
    let side = 2 * window - 1;
    let n = window * window;
    let mut index = Vec::with_capacity(n * n);
    for a in 0..n {
        for b in 0..n {
            let dy = a / window + window - 1 - b / window;
            let dx = a % window + window - 1 - b % window;
            index.push((dy * side + dx) as i64);
        }
    }
    index
}

/// V2's input to the position-bias MLP: each offset scaled to [-8, 8] and log-spaced,
/// `[2w - 1, 2w - 1, 2]` (in float32, as torchvision computes it).
fn relative_coords_table(window: usize) -> Vec<f32> {
    let span = (window - 1) as f32;
    let coord = |d: i64| {
        let v = d as f32 / span * 8.0;
        v.signum() * (v.abs() + 1.0).log2() / 3.0
    };
    let w = window as i64;
    let mut table = Vec::new();
    for dy in -(w - 1)..w {
        for dx in -(w - 1)..w {
            table.extend([coord(dy), coord(dx)]);
        }
    }
    table
}

/// torchvision's `ShiftedWindowAttention` (V1: a learned bias table) and
/// `ShiftedWindowAttentionV2` (cosine attention with a learned temperature, the bias from
/// `cpb_mlp`); the fields a version lacks are absent.
#[derive(Module, Debug)]
pub struct WindowAttention {
    qkv: Linear,
    proj: Linear,
    relative_position_bias_table: Option<Param<Tensor<2>>>,
    logit_scale: Option<Param<Tensor<3>>>,
    cpb_mlp: Option<Vec<Layer>>,
    window_size: usize,
    shift_size: usize,
    num_heads: usize,
}

/// The attention of a block; the variant names its PyTorch class.
#[allow(missing_docs)]
#[derive(Module, Debug)]
pub enum Attention {
    ShiftedWindowAttention(WindowAttention),
    ShiftedWindowAttentionV2(WindowAttention),
}

impl Attention {
    fn inner(&self) -> &WindowAttention {
        match self {
            Attention::ShiftedWindowAttention(a) | Attention::ShiftedWindowAttentionV2(a) => a,
        }
    }
}

/// What one block is built from: its width, heads, window, shift (0 or half a window),
/// and version.
#[derive(Debug, Clone, Copy)]
struct BlockSpec {
    dim: usize,
    heads: usize,
    window: usize,
    shift: usize,
    v2: bool,
}

impl WindowAttention {
    fn new(spec: BlockSpec, device: &Device) -> Self {
        let BlockSpec {
            dim,
            heads,
            window,
            shift,
            v2,
        } = spec;
        let side = 2 * window - 1;
        let table = Initializer::Normal {
            mean: 0.0,
            std: 0.02,
        };
        let cpb_mlp = vec![
            Layer::Linear(linear(2, CPB_HIDDEN, 0.02, device)),
            Layer::ReLU(Relu::new()),
            Layer::Linear(
                LinearConfig::new(CPB_HIDDEN, heads)
                    .with_bias(false)
                    .with_initializer(table.clone())
                    .init(device),
            ),
        ];
        Self {
            qkv: linear(dim, 3 * dim, 0.02, device),
            proj: linear(dim, dim, 0.02, device),
            relative_position_bias_table: (!v2).then(|| table.init([side * side, heads], device)),
            logit_scale: v2
                .then(|| Param::from_tensor(Tensor::full([heads, 1, 1], 10f32.ln(), device))),
            cpb_mlp: v2.then_some(cpb_mlp),
            window_size: window,
            shift_size: shift,
            num_heads: heads,
        }
    }

    fn windows(&self, map: [usize; 2]) -> Windows {
        Windows::new(self.window_size, self.shift_size, map)
    }

    /// The relative position bias `[heads, N, N]`.
    fn position_bias(&self, device: &Device) -> Tensor<3> {
        let w = self.window_size;
        let (side, n) = (2 * w - 1, w * w);
        let index = Tensor::<1, Int>::from_data(
            TensorData::new(relative_position_index(w), [n * n]),
            device,
        );
        let (table, v2) = match (&self.relative_position_bias_table, &self.cpb_mlp) {
            (Some(table), _) => (table.val(), false),
            (None, Some(mlp)) => {
                let coords = Tensor::<4>::from_data(
                    TensorData::new(relative_coords_table(w), [1, side, side, 2]),
                    device,
                );
                let table = sequential(mlp, coords).reshape([side * side, self.num_heads]);
                (table, true)
            }
            (None, None) => unreachable!("built with a table or an MLP"),
        };
        let bias = table
            .select(0, index)
            .reshape([n, n, self.num_heads])
            .permute([2, 0, 1]);
        if v2 {
            sigmoid(bias).mul_scalar(16.0)
        } else {
            bias
        }
    }

    /// What the scores of each window get added: the position bias, and the shift mask
    /// where the windows are shifted, `[windows or 1, heads, N, N]`.
    fn score_bias(&self, windows: &Windows, device: &Device) -> Tensor<4> {
        let bias = self.position_bias(device).unsqueeze::<4>();
        if !windows.shifted() {
            return bias;
        }
        let n = windows.tokens();
        let mask = Tensor::<3>::from_data(
            TensorData::new(windows.mask(), [windows.count(), n, n]),
            device,
        );
        bias + mask.unsqueeze_dim(1)
    }

    /// The query/key/value projection; V2 leaves out the key's bias.
    fn qkv(&self, x: Tensor<3>) -> Tensor<3> {
        match (&self.logit_scale, self.qkv_bias()) {
            (Some(_), Some(bias)) => {
                x.matmul(self.qkv.weight.val().unsqueeze()) + bias.unsqueeze::<3>()
            }
            _ => self.qkv.forward(x),
        }
    }

    /// Attention of `[N * windows, tokens, C]`: scaled dot products (V1) or cosines times
    /// a temperature (V2), plus `bias` (`[windows or 1, heads, N, N]`), by the native
    /// blocked kernel on the CPU.
    fn attend(&self, x: Tensor<3>, bias: Tensor<4>) -> Tensor<3> {
        let [bw, n, c] = x.dims();
        let (heads, dh) = (self.num_heads, c / self.num_heads);
        let qkv = self.qkv(x);
        let split = |i: usize| {
            qkv.clone()
                .narrow(2, i * c, c)
                .reshape([bw, n, heads, dh])
                .swap_dims(1, 2)
        };
        let (q, k, v) = (split(0), split(1), split(2));
        let (q, k, scale) = match &self.logit_scale {
            None => (q, k, (dh as f32).powf(-0.5)),
            Some(scale) => {
                let scale = scale.val().clamp_max(100f32.ln()).exp().unsqueeze::<4>();
                (l2_normalize(q) * scale, l2_normalize(k), 1.0)
            }
        };
        let [windows, ..] = bias.dims();
        let bias = bias.reshape([windows * heads, n, n]);
        let y = kernels::attention(q, k, v, Some(bias), scale);
        self.proj.forward(y.swap_dims(1, 2).reshape([bw, n, c]))
    }

    /// Shifted-window attention of an NHWC map, same shape out.
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let [n, h, w, _] = x.dims();
        let windows = self.windows([h, w]);
        let bias = self.score_bias(&windows, &x.device());
        let y = self.attend(windows.partition(x), bias);
        windows.reverse(y, n)
    }

    /// The attention in an ONNX graph, for an NHWC value of map size `map`; the position
    /// bias and mask become constants.
    fn onnx(&self, g: &mut Graph, scope: &str, x: &Value, map: [usize; 2]) -> Result<Value> {
        let windows = self.windows(map);
        let c = self.proj.weight.dims()[0];
        let x = windows.partition_onnx(g, scope, x, c);
        let y = self.attend_onnx(g, scope, &x, &windows)?;
        Ok(windows.reverse_onnx(g, scope, &y, c))
    }

    /// [`Self::attend`] in an ONNX graph, on windows of tokens.
    fn attend_onnx(
        &self,
        g: &mut Graph,
        scope: &str,
        x: &Value,
        windows: &Windows,
    ) -> Result<Value> {
        let c = self.proj.weight.dims()[0];
        let (heads, n) = (self.num_heads, windows.tokens());
        let dh = c / heads;
        let mut qkv = self.qkv.clone();
        qkv.bias = self.qkv_bias().map(Param::from_tensor);
        let qkv = g.linear(&child(scope, "qkv"), &qkv, x)?;
        let [q, k, v] = g.attention_heads(scope, &qkv, heads);
        let scores = match &self.logit_scale {
            None => {
                let scale = g.scalar((dh as f64).powf(-0.5) as f32);
                let q = g.mul(scope, &q, &scale);
                g.matmul(scope, &q, &k)
            }
            Some(scale) => {
                let q = g.l2_normalize(scope, &q, -1);
                let k = g.l2_normalize(scope, &k, -2);
                let scores = g.matmul(scope, &q, &k);
                let scale = scale.val().clamp_max(100f32.ln()).exp();
                let scale = g.weight(scope, "logit_scale_exp", scale)?;
                g.mul(scope, &scores, &scale)
            }
        };
        let bias = self.score_bias(windows, &self.proj.weight.device());
        let [count, ..] = bias.dims();
        let bias = g.weight(scope, "score_bias", bias)?;
        let (heads, n) = (heads as i64, n as i64);
        let scores = g.reshape(scope, &scores, &[-1, count as i64, heads, n, n]);
        let scores = g.add(scope, &scores, &bias);
        let scores = g.reshape(scope, &scores, &[-1, heads, n, n]);
        let weights = g.softmax_last(scope, &scores);
        let y = g.matmul(scope, &weights, &v);
        let y = g.merge_heads(scope, &y, c);
        g.linear(&child(scope, "proj"), &self.proj, &y)
    }

    /// The bias the query/key/value projection adds (V2's without the key part).
    fn qkv_bias(&self) -> Option<Tensor<1>> {
        let bias = self.qkv.bias.as_ref()?.val();
        if self.logit_scale.is_none() {
            return Some(bias);
        }
        let dim = bias.dims()[0] / 3;
        let zeros = Tensor::zeros([dim], &bias.device());
        let (query, value) = (bias.clone().narrow(0, 0, dim), bias.narrow(0, 2 * dim, dim));
        Some(Tensor::cat(vec![query, zeros, value], 0))
    }

    /// The buffers PyTorch keeps, all derived from the window size.
    fn buffers(&self, scope: &str) -> Vec<NamedTensor> {
        let w = self.window_size;
        let mut out = Vec::new();
        if self.cpb_mlp.is_some() {
            let side = 2 * w - 1;
            out.push(NamedTensor {
                name: child(scope, "relative_coords_table"),
                shape: vec![1, side, side, 2],
                values: Values::F32(relative_coords_table(w)),
            });
        }
        out.push(NamedTensor {
            name: child(scope, "relative_position_index"),
            shape: vec![w.pow(4)],
            values: Values::I64(relative_position_index(w)),
        });
        out
    }
}

/// `x` over its last dimension's L2 norm (at least 1e-12), as `F.normalize`. The floor
/// is taken on the squared norm, before the square root: a zero vector (a padded token's
/// key, V2 having no key bias) would otherwise send 0 / 0 back through the root.
fn l2_normalize(x: Tensor<4>) -> Tensor<4> {
    let norm = (x.clone() * x.clone()).sum_dim(3).clamp_min(1e-24).sqrt();
    x / norm
}

/// The MLP of a block; the variant names torchvision's class (`MLP`: Linear, GELU,
/// Dropout, Linear, Dropout).
#[allow(missing_docs)]
#[derive(Module, Debug)]
pub enum Mlp {
    MLP(Vec<Layer>),
}

/// A block's layers: attention and MLP, each with a LayerNorm and a residual.
#[derive(Module, Debug)]
pub struct SwinBlock {
    norm1: LayerNorm,
    attn: Attention,
    stochastic_depth: StochasticDepth,
    norm2: LayerNorm,
    mlp: Mlp,
}

/// A block; the variant names its PyTorch class: `SwinTransformerBlock` normalises before
/// each branch, `SwinTransformerBlockV2` after.
#[allow(missing_docs)]
#[derive(Module, Debug)]
pub enum Block {
    SwinTransformerBlock(SwinBlock),
    SwinTransformerBlockV2(SwinBlock),
}

impl SwinBlock {
    fn new(spec: BlockSpec, drop: f64, device: &Device) -> Self {
        let (dim, attn) = (spec.dim, WindowAttention::new(spec, device));
        Self {
            norm1: layer_norm(dim, EPS, device),
            attn: if spec.v2 {
                Attention::ShiftedWindowAttentionV2(attn)
            } else {
                Attention::ShiftedWindowAttention(attn)
            },
            stochastic_depth: StochasticDepth::new(drop),
            norm2: layer_norm(dim, EPS, device),
            mlp: Mlp::MLP(vec![
                Layer::Linear(linear(dim, 4 * dim, 0.02, device)),
                Layer::GELU(Gelu::new()),
                Layer::Dropout(dropout(0.0)),
                Layer::Linear(linear(4 * dim, dim, 0.02, device)),
                Layer::Dropout(dropout(0.0)),
            ]),
        }
    }

    fn mlp(&self) -> &[Layer] {
        let Mlp::MLP(layers) = &self.mlp;
        layers
    }
}

impl Block {
    fn layers(&self) -> (&SwinBlock, bool) {
        match self {
            Block::SwinTransformerBlock(b) => (b, false),
            Block::SwinTransformerBlockV2(b) => (b, true),
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let (b, post_norm) = self.layers();
        let attn = b.attn.inner();
        let depth = &b.stochastic_depth;
        if post_norm {
            let x = x.clone() + depth.forward(b.norm1.forward(attn.forward(x)));
            x.clone() + depth.forward(b.norm2.forward(sequential(b.mlp(), x)))
        } else {
            let x = x.clone() + depth.forward(attn.forward(b.norm1.forward(x)));
            x.clone() + depth.forward(sequential(b.mlp(), b.norm2.forward(x)))
        }
    }

    fn onnx(&self, g: &mut Graph, scope: &str, x: &Value, map: [usize; 2]) -> Result<Value> {
        let (b, post_norm) = self.layers();
        let attn = b.attn.inner();
        let (norm1, norm2, mlp) = (
            child(scope, "norm1"),
            child(scope, "norm2"),
            child(scope, "mlp"),
        );
        let attn_scope = child(scope, "attn");
        let y = if post_norm {
            let y = attn.onnx(g, &attn_scope, x, map)?;
            g.layer_norm(&norm1, &b.norm1, &y)?
        } else {
            let y = g.layer_norm(&norm1, &b.norm1, x)?;
            attn.onnx(g, &attn_scope, &y, map)?
        };
        let x = g.add(scope, x, &y);
        let y = if post_norm {
            let y = sequential_onnx(b.mlp(), g, &mlp, &x)?;
            g.layer_norm(&norm2, &b.norm2, &y)?
        } else {
            let y = g.layer_norm(&norm2, &b.norm2, &x)?;
            sequential_onnx(b.mlp(), g, &mlp, &y)?
        };
        Ok(g.add(scope, &x, &y))
    }
}

/// torchvision's `PatchMerging` (norm, then reduction) and `PatchMergingV2` (reduction,
/// then norm): each 2x2 neighbourhood's tokens side by side, reduced to twice the width.
#[derive(Module, Debug)]
pub struct Merging {
    reduction: Linear,
    norm: LayerNorm,
}

impl Merging {
    fn new(dim: usize, v2: bool, device: &Device) -> Self {
        let reduction = LinearConfig::new(4 * dim, 2 * dim)
            .with_bias(false)
            .with_initializer(Initializer::Normal {
                mean: 0.0,
                std: 0.02,
            })
            .init(device);
        let norm_width = if v2 { 2 * dim } else { 4 * dim };
        Self {
            reduction,
            norm: layer_norm(norm_width, EPS, device),
        }
    }

    /// `[N, H, W, C]` to `[N, H/2, W/2, 4C]` (odd sides padded), the tokens in
    /// torchvision's order: (0,0), (1,0), (0,1), (1,1).
    fn gather(x: Tensor<4>) -> Tensor<4> {
        let [_, h, w, _] = x.dims();
        let x = pad_end(pad_end(x, 1, h.div_ceil(2) * 2), 2, w.div_ceil(2) * 2);
        let [n, h, w, c] = x.dims();
        x.reshape([n, h / 2, 2, w / 2, 2, c])
            .permute([0, 1, 3, 4, 2, 5])
            .reshape([n, h / 2, w / 2, 4 * c])
    }

    fn gather_onnx(g: &mut Graph, scope: &str, x: &Value, [h, w]: [usize; 2], c: usize) -> Value {
        let (h2, w2) = (h.div_ceil(2), w.div_ceil(2));
        let x = g.pad_end(scope, x, &[0, 2 * h2 - h, 2 * w2 - w, 0]);
        let x = g.reshape(scope, &x, &[-1, h2 as i64, 2, w2 as i64, 2, c as i64]);
        let x = g.transpose(scope, &[0, 1, 3, 4, 2, 5], &x);
        g.reshape(scope, &x, &[-1, h2 as i64, w2 as i64, 4 * c as i64])
    }
}

/// One child of `features`: the patch embedding (a `Sequential` of conv, permute and
/// LayerNorm) as a [`Layer`], a stage of blocks, or a patch merging (the variant names
/// its PyTorch class).
#[allow(missing_docs)]
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum Feature {
    Layer(Layer),
    Sequential(Vec<Block>),
    PatchMerging(Merging),
    PatchMergingV2(Merging),
}

/// torchvision's `SwinTransformer`, field for field (`permute`, `avgpool` and `flatten`
/// hold nothing and are written as code).
#[derive(Module, Debug)]
pub struct SwinTransformer {
    features: Vec<Feature>,
    norm: LayerNorm,
    head: Linear,
    patch_size: usize,
}

impl SwinTransformer {
    /// A network of this spec with `num_classes` outputs, initialised as torchvision's
    /// (truncated normals drawn as plain normals).
    pub fn new(spec: &SwinSpec, num_classes: usize, device: &Device) -> Self {
        let (c, p) = (spec.embed_dim, spec.patch_size);
        let mut features = vec![Feature::Layer(Layer::Sequential(vec![
            Layer::Conv2d(
                ConvSpec::new(3, c, p, p)
                    .padding([0; 4])
                    .bias()
                    .init(device),
            ),
            Layer::Permute(Permute { dims: [0, 2, 3, 1] }),
            Layer::LayerNorm(layer_norm(c, EPS, device)),
        ]))];
        let total: usize = spec.depths.iter().sum();
        let mut block_id = 0;
        for (stage, (&depth, &heads)) in spec.depths.iter().zip(&spec.num_heads).enumerate() {
            let dim = c << stage;
            let blocks = (0..depth)
                .map(|i| {
                    let drop =
                        spec.stochastic_depth * block_id as f64 / (total as f64 - 1.0).max(1.0);
                    block_id += 1;
                    let block = BlockSpec {
                        dim,
                        heads,
                        window: spec.window_size,
                        shift: if i % 2 == 0 { 0 } else { spec.window_size / 2 },
                        v2: spec.v2,
                    };
                    let b = SwinBlock::new(block, drop, device);
                    if spec.v2 {
                        Block::SwinTransformerBlockV2(b)
                    } else {
                        Block::SwinTransformerBlock(b)
                    }
                })
                .collect();
            features.push(Feature::Sequential(blocks));
            if stage < 3 {
                let merging = Merging::new(dim, spec.v2, device);
                features.push(if spec.v2 {
                    Feature::PatchMergingV2(merging)
                } else {
                    Feature::PatchMerging(merging)
                });
            }
        }
        let last = spec.feature_dim();
        Self {
            features,
            norm: layer_norm(last, EPS, device),
            head: head(last, num_classes, device),
            patch_size: p,
        }
    }

    /// The stages' blocks with their `features` index.
    fn stages(&self) -> impl Iterator<Item = (usize, &[Block])> {
        self.features
            .iter()
            .enumerate()
            .filter_map(|(i, f)| match f {
                Feature::Sequential(blocks) => Some((i, blocks.as_slice())),
                _ => None,
            })
    }
}

const fn bicubic(input_size: usize, resize_size: usize) -> Preprocess {
    Preprocess::imagenet(input_size, resize_size, Interpolation::Bicubic)
}

const T_WEIGHTS: &[Weights] = &[torchvision::weights(
    "swin_t",
    "IMAGENET1K_V1",
    "https://download.pytorch.org/models/swin_t-704ceda3.pth",
    81.474,
    bicubic(224, 232),
)
.default()];
const S_WEIGHTS: &[Weights] = &[torchvision::weights(
    "swin_s",
    "IMAGENET1K_V1",
    "https://download.pytorch.org/models/swin_s-5e29d889.pth",
    83.196,
    bicubic(224, 246),
)
.default()];
const B_WEIGHTS: &[Weights] = &[torchvision::weights(
    "swin_b",
    "IMAGENET1K_V1",
    "https://download.pytorch.org/models/swin_b-68c6b09e.pth",
    83.582,
    bicubic(224, 238),
)
.default()];
const V2_T_WEIGHTS: &[Weights] = &[torchvision::weights(
    "swin_v2_t",
    "IMAGENET1K_V1",
    "https://download.pytorch.org/models/swin_v2_t-b137f0e2.pth",
    82.072,
    bicubic(256, 260),
)
.default()];
const V2_S_WEIGHTS: &[Weights] = &[torchvision::weights(
    "swin_v2_s",
    "IMAGENET1K_V1",
    "https://download.pytorch.org/models/swin_v2_s-637d8ceb.pth",
    83.712,
    bicubic(256, 260),
)
.default()];
const V2_B_WEIGHTS: &[Weights] = &[torchvision::weights(
    "swin_v2_b",
    "IMAGENET1K_V1",
    "https://download.pytorch.org/models/swin_v2_b-781e5279.pth",
    84.112,
    bicubic(256, 272),
)
.default()];

const TINY: [usize; 4] = [2, 2, 6, 2];
const DEEP: [usize; 4] = [2, 2, 18, 2];
const HEADS_96: [usize; 4] = [3, 6, 12, 24];
const HEADS_128: [usize; 4] = [4, 8, 16, 32];

/// The first block's attention, whose tensors tell the version and window apart.
const FIRST_ATTN: &str = "features.1.0.attn";

impl Family for SwinTransformer {
    type Variant = SwinSpec;
    const TORCH_CLASS: &'static str = "SwinTransformer";
    const ARCHITECTURES: &'static [Architecture<SwinSpec>] = &[
        Architecture {
            name: "swin_t",
            variant: SwinSpec::new(false, 96, TINY, HEADS_96, 0.2),
            weights: T_WEIGHTS,
        },
        Architecture {
            name: "swin_s",
            variant: SwinSpec::new(false, 96, DEEP, HEADS_96, 0.3),
            weights: S_WEIGHTS,
        },
        Architecture {
            name: "swin_b",
            variant: SwinSpec::new(false, 128, DEEP, HEADS_128, 0.5),
            weights: B_WEIGHTS,
        },
        Architecture {
            name: "swin_v2_t",
            variant: SwinSpec::new(true, 96, TINY, HEADS_96, 0.2),
            weights: V2_T_WEIGHTS,
        },
        Architecture {
            name: "swin_v2_s",
            variant: SwinSpec::new(true, 96, DEEP, HEADS_96, 0.3),
            weights: V2_S_WEIGHTS,
        },
        Architecture {
            name: "swin_v2_b",
            variant: SwinSpec::new(true, 128, DEEP, HEADS_128, 0.5),
            weights: V2_B_WEIGHTS,
        },
    ];
    const HEAD: [&'static str; 2] = ["head.weight", "head.bias"];

    fn build(variant: &SwinSpec, num_classes: usize, device: &Device) -> Self {
        Self::new(variant, num_classes, device)
    }

    /// The version from the first attention's tensors (a bias table or a temperature),
    /// patch size and width from the patch embedding, blocks by count, heads from each
    /// stage's table or temperature, the window from the table or the buffers; the
    /// stochastic depth is the architecture's of the same version, depths and width.
    fn detect(sd: &StateDict) -> Option<Detected<SwinSpec>> {
        let v1_table = sd.get(&format!("{FIRST_ATTN}.relative_position_bias_table"));
        let v2 = sd.get(&format!("{FIRST_ATTN}.logit_scale")).is_some();
        if v1_table.is_none() && !v2 {
            return None;
        }
        let conv = &sd.get("features.0.0.weight")?.shape;
        let (embed_dim, patch_size) = (*conv.first()?, *conv.get(2)?);
        let mut depths = [0; 4];
        let mut num_heads = [0; 4];
        for stage in 0..4 {
            let block = |b: usize| format!("features.{}.{b}", 2 * stage + 1);
            depths[stage] = (0..)
                .take_while(|&b| sd.get(&format!("{}.norm1.weight", block(b))).is_some())
                .count();
            let heads = if v2 {
                sd.get(&format!("{}.attn.logit_scale", block(0)))?
                    .shape
                    .first()
                    .copied()
            } else {
                let table = sd.get(&format!("{}.attn.relative_position_bias_table", block(0)))?;
                table.shape.get(1).copied()
            };
            num_heads[stage] = heads?;
        }
        let window_size = match v1_table {
            Some(table) => ((*table.shape.first()? as f64).sqrt() as usize).div_ceil(2),
            None => match sd.get(&format!("{FIRST_ATTN}.relative_position_index")) {
                Some(index) => (*index.shape.first()? as f64).sqrt().sqrt().round() as usize,
                None => 8,
            },
        };
        let archs = Self::ARCHITECTURES.iter().filter(|a| a.variant.v2 == v2);
        let arch = archs
            .clone()
            .find(|a| a.variant.depths == depths && a.variant.embed_dim == embed_dim)
            .or_else(|| archs.clone().find(|a| a.variant.depths == depths))
            .or_else(|| archs.clone().next())?;
        Some(Detected {
            arch: arch.name,
            variant: SwinSpec {
                v2,
                patch_size,
                embed_dim,
                depths,
                num_heads,
                window_size,
                stochastic_depth: arch.variant.stochastic_depth,
            },
            num_classes: head_outputs(sd, Self::HEAD[0]),
        })
    }

    fn feature_dim(variant: &SwinSpec) -> usize {
        variant.feature_dim()
    }

    /// The patch embedding (`stem`), each block (`block0`... over all stages), each patch
    /// merging (`merge1`..`merge3`, after the stage it reduces), the final LayerNorm
    /// (`norm`), the head.
    fn freeze_groups(variant: &SwinSpec) -> Vec<FreezeGroup> {
        let mut groups = vec![FreezeGroup::new("stem", &["features.0"])];
        let mut block = 0;
        for (stage, &depth) in variant.depths.iter().enumerate() {
            for j in 0..depth {
                let module = format!("features.{}.{j}", 2 * stage + 1);
                groups.push(FreezeGroup::new(format!("block{block}"), &[&module]));
                block += 1;
            }
            if stage < 3 {
                let module = format!("features.{}", 2 * stage + 2);
                groups.push(FreezeGroup::new(format!("merge{}", stage + 1), &[&module]));
            }
        }
        groups.push(FreezeGroup::new("norm", &["norm"]));
        groups.push(FreezeGroup::new("head", &["head"]));
        groups
    }

    /// The patch embedding and the first two stages with their patch mergings.
    fn default_partial(_variant: &SwinSpec) -> String {
        "features.0-4".into()
    }

    /// Narrowed: fewer heads of the same width in every stage (for small experiments;
    /// the family has no multiplier of its own).
    fn with_width(variant: &SwinSpec, width: f64) -> SwinSpec {
        let head_dim = variant.embed_dim / variant.num_heads[0];
        let first = ((variant.num_heads[0] as f64 * width).round() as usize).max(1);
        SwinSpec {
            embed_dim: first * head_dim,
            num_heads: std::array::from_fn(|i| first << i),
            ..variant.clone()
        }
    }

    fn distinction(variant: &SwinSpec) -> Option<String> {
        let standard = Self::ARCHITECTURES.iter().any(|a| {
            SwinSpec {
                stochastic_depth: a.variant.stochastic_depth,
                ..variant.clone()
            } == a.variant
        });
        (!standard).then(|| {
            format!(
                "width {}, depths {:?}, heads {:?}, window {}",
                variant.embed_dim, variant.depths, variant.num_heads, variant.window_size
            )
        })
    }

    fn head(&self) -> &Linear {
        &self.head
    }

    fn reset_classifier(&mut self, num_classes: usize, device: &Device) {
        let features = self.head.weight.dims()[0];
        self.head = head(features, num_classes, device);
    }

    /// The last stage after the final LayerNorm, as NCHW `[N, C, h, w]`.
    fn forward_features(&self, x: Tensor<4>) -> Tensor<4> {
        let x = self.features.iter().fold(x, |x, f| match f {
            Feature::Layer(layer) => layer.forward(x),
            Feature::Sequential(blocks) => blocks.iter().fold(x, |x, b| b.forward(x)),
            Feature::PatchMerging(m) => m.reduction.forward(m.norm.forward(Merging::gather(x))),
            Feature::PatchMergingV2(m) => m.norm.forward(m.reduction.forward(Merging::gather(x))),
        });
        self.norm.forward(x).permute([0, 3, 1, 2])
    }

    fn forward_head(&self, pooled: Tensor<2>) -> Tensor<2> {
        self.head.forward(pooled)
    }

    /// No BatchNorm to fold.
    fn fold_batchnorm(&mut self) {}

    fn derived_buffers(&self) -> Vec<NamedTensor> {
        self.stages()
            .flat_map(|(i, blocks)| {
                blocks.iter().enumerate().flat_map(move |(j, b)| {
                    b.layers()
                        .0
                        .attn
                        .inner()
                        .buffers(&format!("features.{i}.{j}.attn"))
                })
            })
            .collect()
    }

    /// The windows depend on the map size, so the graph is for the image size it is
    /// written for.
    fn onnx(&self, g: &mut Graph, x: &Value) -> Result<Value> {
        let size = g.image_size();
        let mut x = x.clone();
        let mut map = [size, size];
        for (i, f) in self.features.iter().enumerate() {
            let scope = format!("features.{i}");
            x = match f {
                Feature::Layer(layer) => {
                    map = map.map(|m| m / self.patch_size);
                    layer.onnx(g, &scope, &x)?
                }
                Feature::Sequential(blocks) => {
                    for (j, block) in blocks.iter().enumerate() {
                        x = block.onnx(g, &child(&scope, j), &x, map)?;
                    }
                    x
                }
                Feature::PatchMerging(m) | Feature::PatchMergingV2(m) => {
                    let c = m.reduction.weight.dims()[0] / 4;
                    let merged = Merging::gather_onnx(g, &scope, &x, map, c);
                    map = map.map(|m| m.div_ceil(2));
                    let (norm, reduction) = (child(&scope, "norm"), child(&scope, "reduction"));
                    if matches!(f, Feature::PatchMerging(_)) {
                        let y = g.layer_norm(&norm, &m.norm, &merged)?;
                        g.linear(&reduction, &m.reduction, &y)?
                    } else {
                        let y = g.linear(&reduction, &m.reduction, &merged)?;
                        g.layer_norm(&norm, &m.norm, &y)?
                    }
                }
            };
        }
        let x = g.layer_norm("norm", &self.norm, &x)?;
        let x = g.transpose("permute", &[0, 3, 1, 2], &x);
        let pooled = g.global_avg_pool("avgpool", &x);
        g.linear("head", &self.head, &pooled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// torchvision's mask for a 14x14 map in 7x7 windows shifted by 3: the first window
    /// is one region, the last mixes four; pairs within a region are kept.
    #[test]
    fn shift_mask_separates_the_regions_the_roll_joins() {
        let windows = Windows::new(7, 3, [14, 14]);
        assert_eq!((windows.count(), windows.shift), (4, [3, 3]));
        let mask = windows.mask();
        let n = 49;
        let window = |w: usize| &mask[w * n * n..(w + 1) * n * n];
        assert!(window(0).iter().all(|&v| v == 0.0));
        let last = window(3);
        // Token 0 (top-left, region (1,1)) and token 48 (bottom-right, region (2,2)).
        assert_eq!(last[48], MASKED);
        assert_eq!(last[1], 0.0, "neighbours in one region");
        let kept = last.iter().filter(|&&v| v == 0.0).count();
        assert_eq!(
            kept,
            16 * 16 + 2 * 12 * 12 + 9 * 9,
            "four regions of 16, 12, 12, 9"
        );
    }

    /// A map one window covers is not shifted along that axis, and odd sides pad up.
    #[test]
    fn windows_pad_to_whole_windows_and_skip_shifts_one_window_covers() {
        let windows = Windows::new(7, 3, [7, 10]);
        assert_eq!((windows.padded, windows.shift), ([7, 14], [0, 3]));
        let mask = windows.mask();
        // Only the columns are split: row position does not matter.
        assert_eq!(mask[0], 0.0);
    }

    /// Offsets index the table row-major from (-(w-1), -(w-1)); a token with itself is
    /// the centre row.
    #[test]
    fn relative_position_index_is_torchvisions() {
        let index = relative_position_index(3);
        let centre = 2 * 5 + 2;
        assert!((0..9).all(|t| index[t * 9 + t] == centre));
        assert_eq!(index[8], 0, "token 0 to token 8: offset (-2, -2)");
        assert_eq!(*index.iter().max().unwrap(), 24);
    }

    /// Rolling left then right by the rest of the length is the identity.
    #[test]
    fn roll_left_moves_the_shift_to_the_front() {
        let device = Device::flex();
        let x = Tensor::<1>::from_data(
            TensorData::new((0..5).map(|v| v as f32).collect(), [5]),
            &device,
        );
        let rolled = roll_left(x.clone(), 2, 0);
        assert_eq!(
            crate::models::to_vec(rolled.clone()).unwrap(),
            [2.0, 3.0, 4.0, 0.0, 1.0]
        );
        let back = roll_left(rolled, 3, 0);
        assert_eq!(
            crate::models::to_vec(back).unwrap(),
            crate::models::to_vec(x).unwrap()
        );
    }
}
