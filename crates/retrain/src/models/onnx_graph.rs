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
use crate::onnx_format::{attribute_float, attribute_int, attribute_ints, node, tensor_f32};

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
    /// [`crate::models::Family::torch_name`]).
    pub fn new(torch_name: fn(&str) -> String) -> Self {
        Self {
            nodes: Vec::new(),
            initializers: Vec::new(),
            scalars: BTreeMap::new(),
            torch_name,
        }
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
    fn weight<const D: usize>(&mut self, scope: &str, field: &str, t: Tensor<D>) -> Result<Value> {
        let name = (self.torch_name)(&child(scope, field));
        let dims = t.dims();
        self.initializers
            .push(tensor_f32(&name, &dims, &to_vec(t)?));
        Ok(Value { name, rank: D })
    }

    /// The scalar `value` as a shared initializer.
    fn scalar(&mut self, value: f32) -> Value {
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
        let burn::nn::PaddingConfig2d::Explicit(top, left, bottom, right) = conv.padding else {
            bail!("{scope}: only explicit padding is exported");
        };
        let [_, _, kh, kw] = conv.weight.dims();
        let ints = |v: &[usize]| v.iter().map(|&n| n as i64).collect::<Vec<_>>();
        let attributes = vec![
            attribute_ints("kernel_shape", &ints(&[kh, kw])),
            attribute_ints("strides", &ints(&conv.stride)),
            attribute_ints("pads", &ints(&[top, left, bottom, right])),
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

    /// Dimensions reordered (`Tensor.permute`).
    pub fn transpose(&mut self, scope: &str, perm: [usize; 4], x: &Value) -> Value {
        let perm: Vec<i64> = perm.iter().map(|&p| p as i64).collect();
        let attributes = vec![attribute_ints("perm", &perm)];
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
        let burn::nn::PaddingConfig2d::Explicit(top, left, bottom, right) = pool.padding else {
            bail!("{scope}: only explicit padding is exported");
        };
        let ints = |v: &[usize]| v.iter().map(|&n| n as i64).collect::<Vec<_>>();
        let attributes = vec![
            attribute_ints("kernel_shape", &ints(&pool.kernel_size)),
            attribute_ints("strides", &ints(&pool.stride)),
            attribute_ints("pads", &ints(&[top, left, bottom, right])),
            attribute_ints("dilations", &ints(&pool.dilation)),
            attribute_int("ceil_mode", pool.ceil_mode as i64),
        ];
        Ok(self.op("MaxPool", scope, &[x], attributes, 4))
    }

    /// Softmax over dimension 1 of `[N, classes]`.
    pub fn softmax(&mut self, x: &Value) -> Value {
        self.op("Softmax", "", &[x], vec![attribute_int("axis", 1)], 2)
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
