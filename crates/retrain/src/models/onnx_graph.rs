//! The ONNX graph writer the families use: each writes its eval-mode network through a
//! [`Graph`], in a method next to its forward pass ([`super::Family::onnx`]);
//! [`crate::onnx`] makes the file.

use std::collections::BTreeMap;

use burn::nn::Linear;
use burn::nn::conv::Conv2d;
use burn::nn::pool::MaxPool2d;
use burn::prelude::*;

use super::batch_norm::BatchNorm;
use super::layers::LayerNorm;
use super::to_vec;
use crate::error::{Result, bail};
use crate::onnx_format::proto::{AttributeProto, NodeProto, TensorProto};
use crate::onnx_format::{
    attribute_float, attribute_int, attribute_ints, node, tensor_f32, tensor_i64,
};

/// A value in the graph being written: its name and its rank (which decides, for example,
/// whether a Linear is a `Gemm` or a `MatMul`).
#[derive(Debug, Clone)]
pub struct Value {
    name: String,
    rank: usize,
}

impl Value {
    /// A graph input of this rank.
    pub fn input(name: &str, rank: usize) -> Value {
        Value {
            name: name.into(),
            rank,
        }
    }

    /// Its rank.
    pub fn rank(&self) -> usize {
        self.rank
    }
}

/// An ONNX graph under construction: the nodes in order, the initializers (weights under
/// PyTorch's names), and the scalar constants shared between nodes.
pub struct Graph {
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    scalars: BTreeMap<u32, Value>,
    torch_name: fn(&str) -> String,
    image_size: usize,
    fixed_size: bool,
}

/// Sizes as ONNX's int64 attributes.
fn ints(values: &[usize]) -> Vec<i64> {
    values.iter().map(|&n| n as i64).collect()
}

/// ONNX's `pads` (begin then end of each axis: top, left, bottom, right), for the explicit
/// padding every family uses.
fn pads(scope: &str, padding: &burn::nn::PaddingConfig2d) -> Result<Vec<i64>> {
    let burn::nn::PaddingConfig2d::Explicit(top, left, bottom, right) = *padding else {
        bail!("{scope}: only explicit padding is exported");
    };
    Ok(ints(&[top, left, bottom, right]))
}

/// `scope.child`, or `child` at the root.
pub fn child(scope: &str, child: impl std::fmt::Display) -> String {
    if scope.is_empty() {
        child.to_string()
    } else {
        format!("{scope}.{child}")
    }
}

impl Graph {
    /// An empty graph whose names go through `torch_name` (see
    /// [`crate::models::Family::torch_name`]), for inputs of `image_size` (which only
    /// networks with position embeddings depend on).
    pub fn new(torch_name: fn(&str) -> String, image_size: usize) -> Self {
        Self {
            nodes: Vec::new(),
            initializers: Vec::new(),
            scalars: BTreeMap::new(),
            torch_name,
            image_size,
            fixed_size: false,
        }
    }

    /// The side of the square input the graph is for; asking makes that size part of the
    /// graph ([`Self::fixed_size`]).
    pub fn image_size(&mut self) -> usize {
        self.fixed_size = true;
        self.image_size
    }

    /// Whether the graph holds only for inputs of [`Self::image_size`].
    pub fn fixed_size(&self) -> bool {
        self.fixed_size
    }

    /// A node of `op` in module `scope`, with one output of rank `rank`.
    fn op(
        &mut self,
        op: &str,
        scope: &str,
        inputs: &[&Value],
        attributes: Vec<AttributeProto>,
        rank: usize,
    ) -> Value {
        let name = format!("/{}/{op}_{}", (self.torch_name)(scope), self.nodes.len());
        let inputs = inputs.iter().map(|v| v.name.clone()).collect();
        self.nodes.push(node(
            op,
            name.clone(),
            inputs,
            vec![name.clone()],
            attributes,
        ));
        Value { name, rank }
    }

    /// A weight tensor, named `scope.field` as PyTorch names it.
    pub fn weight<const D: usize>(
        &mut self,
        scope: &str,
        field: &str,
        t: Tensor<D>,
    ) -> Result<Value> {
        let name = (self.torch_name)(&child(scope, field));
        let dims = t.dims();
        self.initializers
            .push(tensor_f32(&name, &dims, &to_vec(t)?));
        Ok(Value { name, rank: D })
    }

    /// An int64 initializer (a shape, an index), named after the node count.
    fn int64(&mut self, dims: &[usize], values: &[i64]) -> Value {
        let name = format!("int64_{}_{}", self.nodes.len(), self.initializers.len());
        self.initializers.push(tensor_i64(&name, dims, values));
        Value {
            name,
            rank: dims.len(),
        }
    }

    /// The scalar `value` as a shared initializer.
    pub fn scalar(&mut self, value: f32) -> Value {
        if let Some(v) = self.scalars.get(&value.to_bits()) {
            return v.clone();
        }
        let name = format!("const_{value}");
        self.initializers.push(tensor_f32(&name, &[], &[value]));
        let v = Value { name, rank: 0 };
        self.scalars.insert(value.to_bits(), v.clone());
        v
    }

    /// `Conv2d` with its bias (folded BatchNorm included).
    pub fn conv2d(&mut self, scope: &str, conv: &Conv2d, x: &Value) -> Result<Value> {
        let [_, _, kh, kw] = conv.weight.dims();
        let attributes = vec![
            attribute_ints("kernel_shape", &ints(&[kh, kw])),
            attribute_ints("strides", &ints(&conv.stride)),
            attribute_ints("pads", &pads(scope, &conv.padding)?),
            attribute_ints("dilations", &ints(&conv.dilation)),
            attribute_int("group", conv.groups as i64),
        ];
        let weight = self.weight(scope, "weight", conv.weight.val())?;
        let mut inputs = vec![x, &weight];
        let bias = match &conv.bias {
            Some(b) => Some(self.weight(scope, "bias", b.val())?),
            None => None,
        };
        inputs.extend(bias.as_ref());
        Ok(self.op("Conv", scope, &inputs, attributes, 4))
    }

    /// `nn.Linear` on the last dimension: `Gemm` on a batch of vectors, `MatMul` + `Add`
    /// on higher ranks (burn stores the weight as `[in, out]`, which is what both take).
    pub fn linear(&mut self, scope: &str, linear: &Linear, x: &Value) -> Result<Value> {
        let weight = self.weight(scope, "weight", linear.weight.val())?;
        let bias = match &linear.bias {
            Some(b) => Some(self.weight(scope, "bias", b.val())?),
            None => None,
        };
        if x.rank == 2 {
            let mut inputs = vec![x, &weight];
            inputs.extend(bias.as_ref());
            return Ok(self.op("Gemm", scope, &inputs, vec![], 2));
        }
        let y = self.op("MatMul", scope, &[x, &weight], vec![], x.rank);
        Ok(match bias {
            Some(b) => self.op("Add", scope, &[&y, &b], vec![], x.rank),
            None => y,
        })
    }

    /// BatchNorm: nothing once folded into the convolution before it.
    pub fn batch_norm(&mut self, scope: &str, bn: &BatchNorm, x: &Value) -> Result<Value> {
        if bn.folded {
            return Ok(x.clone());
        }
        let scale = self.weight(scope, "weight", bn.gamma.val())?;
        let shift = self.weight(scope, "bias", bn.beta.val())?;
        let mean = self.weight(scope, "running_mean", bn.running_mean.value())?;
        let var = self.weight(scope, "running_var", bn.running_var.value())?;
        let eps = vec![attribute_float("epsilon", bn.epsilon as f32)];
        Ok(self.op(
            "BatchNormalization",
            scope,
            &[x, &scale, &shift, &mean, &var],
            eps,
            x.rank,
        ))
    }

    /// `nn.LayerNorm` over the last dimension.
    pub fn layer_norm(&mut self, scope: &str, norm: &LayerNorm, x: &Value) -> Result<Value> {
        let scale = self.weight(scope, "weight", norm.gamma.val())?;
        let shift = self.weight(scope, "bias", norm.beta.val())?;
        let attributes = vec![
            attribute_int("axis", -1),
            attribute_float("epsilon", norm.epsilon as f32),
        ];
        Ok(self.op(
            "LayerNormalization",
            scope,
            &[x, &scale, &shift],
            attributes,
            x.rank,
        ))
    }

    /// A per-channel scale `[C, 1, 1]` on an NCHW value (ConvNeXt's layer scale).
    pub fn scale(
        &mut self,
        scope: &str,
        field: &str,
        scale: Tensor<3>,
        x: &Value,
    ) -> Result<Value> {
        let s = self.weight(scope, field, scale)?;
        Ok(self.op("Mul", scope, &[x, &s], vec![], x.rank))
    }

    /// An elementwise operator of one input, shape kept.
    pub fn unary(&mut self, op: &str, scope: &str, x: &Value) -> Value {
        self.op(op, scope, &[x], vec![], x.rank)
    }

    /// `a + b`.
    pub fn add(&mut self, scope: &str, a: &Value, b: &Value) -> Value {
        self.op("Add", scope, &[a, b], vec![], a.rank.max(b.rank))
    }

    /// `a * b`, broadcasting.
    pub fn mul(&mut self, scope: &str, a: &Value, b: &Value) -> Value {
        self.op("Mul", scope, &[a, b], vec![], a.rank.max(b.rank))
    }

    /// `nn.ReLU6`: `Clip` between 0 and 6.
    pub fn relu6(&mut self, scope: &str, x: &Value) -> Value {
        let (low, high) = (self.scalar(0.0), self.scalar(6.0));
        self.op("Clip", scope, &[x, &low, &high], vec![], x.rank)
    }

    /// `nn.Hardsigmoid`-style gate `clip(alpha * x + beta, 0, 1)`.
    pub fn hard_sigmoid(&mut self, scope: &str, alpha: f64, beta: f64, x: &Value) -> Value {
        let attributes = vec![
            attribute_float("alpha", alpha as f32),
            attribute_float("beta", beta as f32),
        ];
        self.op("HardSigmoid", scope, &[x], attributes, x.rank)
    }

    /// `nn.SiLU`: `x * sigmoid(x)` (opset 17 has no `Swish`).
    pub fn silu(&mut self, scope: &str, x: &Value) -> Value {
        let gate = self.unary("Sigmoid", scope, x);
        self.mul(scope, x, &gate)
    }

    /// `nn.GELU()` (exact): `x * 0.5 * (1 + erf(x / sqrt 2))`, written with `Erf` since
    /// `Gelu` arrives only in opset 20.
    pub fn gelu(&mut self, scope: &str, x: &Value) -> Value {
        let root2 = self.scalar(std::f32::consts::SQRT_2);
        let (one, half) = (self.scalar(1.0), self.scalar(0.5));
        let scaled = self.op("Div", scope, &[x, &root2], vec![], x.rank);
        let erf = self.unary("Erf", scope, &scaled);
        let shifted = self.add(scope, &erf, &one);
        let y = self.mul(scope, x, &shifted);
        self.mul(scope, &y, &half)
    }

    /// `a @ b`, broadcasting over the leading dimensions.
    pub fn matmul(&mut self, scope: &str, a: &Value, b: &Value) -> Value {
        self.op("MatMul", scope, &[a, b], vec![], a.rank.max(b.rank))
    }

    /// `x.reshape(shape)`, where 0 keeps a dimension and -1 takes the rest (ONNX's rules).
    pub fn reshape(&mut self, scope: &str, x: &Value, shape: &[i64]) -> Value {
        let shape_value = self.int64(&[shape.len()], shape);
        self.op("Reshape", scope, &[x, &shape_value], vec![], shape.len())
    }

    /// The last dimension cut into `N` equal parts.
    pub fn split_last<const N: usize>(&mut self, scope: &str, x: &Value) -> [Value; N] {
        let name = format!("/{}/Split_{}", (self.torch_name)(scope), self.nodes.len());
        let outputs: [String; N] = std::array::from_fn(|i| format!("{name}:{i}"));
        let attributes = vec![attribute_int("axis", -1)];
        self.nodes.push(node(
            "Split",
            name,
            vec![x.name.clone()],
            outputs.to_vec(),
            attributes,
        ));
        outputs.map(|name| Value { name, rank: x.rank })
    }

    /// A `[N, S, 3 D]` query/key/value projection cut into `heads` heads: the queries and
    /// values `[N, heads, S, D / heads]`, the keys transposed, `[N, heads, D / heads, S]`,
    /// ready for `q @ k`.
    pub fn attention_heads(&mut self, scope: &str, qkv: &Value, heads: usize) -> [Value; 3] {
        let [q, k, v] = self.split_last::<3>(scope, qkv);
        let mut per_head = |t: &Value, perm: [usize; 4]| {
            let t = self.reshape(scope, t, &[0, 0, heads as i64, -1]);
            self.transpose(scope, &perm, &t)
        };
        [
            per_head(&q, [0, 2, 1, 3]),
            per_head(&k, [0, 2, 3, 1]),
            per_head(&v, [0, 2, 1, 3]),
        ]
    }

    /// The inverse for an attention's output: `[N, heads, S, D / heads]` to `[N, S, D]`.
    pub fn merge_heads(&mut self, scope: &str, y: &Value, dim: usize) -> Value {
        let y = self.transpose(scope, &[0, 2, 1, 3], y);
        self.reshape(scope, &y, &[0, 0, dim as i64])
    }

    /// Softmax over the last dimension.
    pub fn softmax_last(&mut self, scope: &str, x: &Value) -> Value {
        self.op(
            "Softmax",
            scope,
            &[x],
            vec![attribute_int("axis", -1)],
            x.rank,
        )
    }

    /// `x` (`[1, ...]`) repeated along a first dimension as long as `like`'s.
    pub fn expand_batch(&mut self, scope: &str, x: &Value, like: &Value) -> Value {
        let shape = self.op("Shape", scope, &[like], vec![], 1);
        let (start, end) = (self.int64(&[1], &[0]), self.int64(&[1], &[1]));
        let batch = self.op("Slice", scope, &[&shape, &start, &end], vec![], 1);
        let rest = self.op("Shape", scope, &[x], vec![], 1);
        let (one, rank) = (self.int64(&[1], &[1]), self.int64(&[1], &[x.rank as i64]));
        let rest = self.op("Slice", scope, &[&rest, &one, &rank], vec![], 1);
        let target = self.concat(scope, &[&batch, &rest], 0);
        self.op("Expand", scope, &[x, &target], vec![], x.rank)
    }

    /// Values joined along `axis`.
    pub fn concat(&mut self, scope: &str, values: &[&Value], axis: i64) -> Value {
        let attributes = vec![attribute_int("axis", axis)];
        self.op("Concat", scope, values, attributes, values[0].rank)
    }

    /// Index `index` of dimension `axis` (which goes away).
    pub fn gather(&mut self, scope: &str, x: &Value, axis: i64, index: i64) -> Value {
        let index = self.int64(&[], &[index]);
        let attributes = vec![attribute_int("axis", axis)];
        self.op("Gather", scope, &[x, &index], attributes, x.rank - 1)
    }

    /// `x` with `pads[axis]` zeros after the end of each axis.
    pub fn pad_end(&mut self, scope: &str, x: &Value, pads: &[usize]) -> Value {
        if pads.iter().all(|&p| p == 0) {
            return x.clone();
        }
        let mut all = vec![0; pads.len()];
        all.extend(ints(pads));
        let pads = self.int64(&[all.len()], &all);
        self.op("Pad", scope, &[x, &pads], vec![], x.rank)
    }

    /// The first `lens[i]` positions of each axis `axes[i]`.
    pub fn crop(&mut self, scope: &str, x: &Value, axes: &[usize], lens: &[usize]) -> Value {
        let starts = self.int64(&[axes.len()], &vec![0; axes.len()]);
        let ends = self.int64(&[lens.len()], &ints(lens));
        let axes = self.int64(&[axes.len()], &ints(axes));
        self.op("Slice", scope, &[x, &starts, &ends, &axes], vec![], x.rank)
    }

    /// `torch.roll(x, -shift, axis)` for an axis of length `len`: position `shift` moves
    /// to the front.
    pub fn roll_left(
        &mut self,
        scope: &str,
        x: &Value,
        axis: usize,
        shift: usize,
        len: usize,
    ) -> Value {
        let shift = shift % len;
        if shift == 0 {
            return x.clone();
        }
        let mut slice = |start: usize, end: usize| {
            let starts = self.int64(&[1], &[start as i64]);
            let ends = self.int64(&[1], &[end as i64]);
            let axes = self.int64(&[1], &[axis as i64]);
            self.op("Slice", scope, &[x, &starts, &ends, &axes], vec![], x.rank)
        };
        let (tail, head) = (slice(shift, len), slice(0, shift));
        self.concat(scope, &[&tail, &head], axis as i64)
    }

    /// `x` over its L2 norm along `axis`, the norm at least 1e-12 (`F.normalize`).
    pub fn l2_normalize(&mut self, scope: &str, x: &Value, axis: i64) -> Value {
        let attributes = vec![
            attribute_ints("axes", &[axis]),
            attribute_int("keepdims", 1),
        ];
        let norm = self.op("ReduceL2", scope, &[x], attributes, x.rank);
        let eps = self.scalar(1e-12);
        let norm = self.op("Max", scope, &[&norm, &eps], vec![], x.rank);
        self.op("Div", scope, &[x, &norm], vec![], x.rank)
    }

    /// Dimensions reordered (`Tensor.permute`).
    pub fn transpose(&mut self, scope: &str, perm: &[usize], x: &Value) -> Value {
        let attributes = vec![attribute_ints("perm", &ints(perm))];
        self.op("Transpose", scope, &[x], attributes, x.rank)
    }

    /// Mean over height and width, kept as `[N, C, 1, 1]` (squeeze-excitation's pool).
    pub fn spatial_mean(&mut self, scope: &str, x: &Value) -> Value {
        self.op("GlobalAveragePool", scope, &[x], vec![], 4)
    }

    /// Global average pooling to `[N, C]`, as [`crate::models::layers::global_avg_pool`].
    pub fn global_avg_pool(&mut self, scope: &str, x: &Value) -> Value {
        let pooled = self.spatial_mean(scope, x);
        self.flatten(scope, &pooled)
    }

    /// `nn.Flatten(1)`: `[N, ...]` to `[N, rest]`.
    pub fn flatten(&mut self, scope: &str, x: &Value) -> Value {
        if x.rank == 2 {
            return x.clone();
        }
        self.op("Flatten", scope, &[x], vec![attribute_int("axis", 1)], 2)
    }

    /// `nn.MaxPool2d`.
    pub fn max_pool2d(&mut self, scope: &str, pool: &MaxPool2d, x: &Value) -> Result<Value> {
        let attributes = vec![
            attribute_ints("kernel_shape", &ints(&pool.kernel_size)),
            attribute_ints("strides", &ints(&pool.stride)),
            attribute_ints("pads", &pads(scope, &pool.padding)?),
            attribute_ints("dilations", &ints(&pool.dilation)),
            attribute_int("ceil_mode", pool.ceil_mode as i64),
        ];
        Ok(self.op("MaxPool", scope, &[x], attributes, 4))
    }

    /// The nodes in order and the initializers.
    pub fn finish(self) -> (Vec<NodeProto>, Vec<TensorProto>) {
        (self.nodes, self.initializers)
    }

    /// Name `value` `name` (renaming the output of the node that produced it): a graph
    /// output.
    pub fn output(&mut self, value: &Value, name: &str) -> Value {
        for n in self.nodes.iter_mut().rev() {
            for output in &mut n.output {
                if *output == value.name {
                    *output = name.to_string();
                }
            }
        }
        Value {
            name: name.to_string(),
            rank: value.rank,
        }
    }
}
