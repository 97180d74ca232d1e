//! torchvision's Vision Transformer: `vit_b_16`, `vit_b_32`, `vit_l_16`, `vit_l_32`,
//! `vit_h_14`. Patches of the image are projected by a strided convolution (`conv_proj`),
//! a class token is prepended and position embeddings added, then pre-norm encoder blocks
//! (multi-head self-attention, an MLP with exact GELU) and a final LayerNorm; the head reads
//! the class token. The position embeddings are for one image size (224, or 384-518 for
//! the SWAG weights); other sizes get them resampled, bicubic with aligned corners, as
//! torchvision's `interpolate_embeddings` does.

use burn::module::{Module, Param};
use burn::nn::conv::Conv2d;
use burn::nn::{Dropout, Gelu, Initializer, Linear, LinearConfig};
use burn::prelude::*;
use serde::{Deserialize, Serialize};

use super::family::{Architecture, Detected, Family, FreezeGroup, head_outputs};
use super::layers::{
    ConvSpec, Layer, LayerNorm, dropout, head, layer_norm, sequential, sequential_onnx,
};
use super::onnx_graph::{Graph, Value, child};
use super::weights::{Weights, torchvision};
use crate::checkpoint::StateDict;
use crate::error::Result;
use crate::kernels;
use crate::preprocess::{Interpolation, Preprocess};

/// Every LayerNorm's eps.
const EPS: f64 = 1e-6;

/// What sets the architectures apart, and the image size the position embeddings are for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ViTSpec {
    /// Side of the square patches.
    pub patch_size: usize,
    /// Encoder blocks.
    pub num_layers: usize,
    /// Attention heads per block.
    pub num_heads: usize,
    /// Width of the tokens.
    pub hidden_dim: usize,
    /// Width inside each block's MLP.
    pub mlp_dim: usize,
    /// The image side the position embeddings are for.
    pub image_size: usize,
}

impl ViTSpec {
    const fn new(
        patch_size: usize,
        num_layers: usize,
        num_heads: usize,
        hidden_dim: usize,
        mlp_dim: usize,
    ) -> Self {
        Self {
            patch_size,
            num_layers,
            num_heads,
            hidden_dim,
            mlp_dim,
            image_size: 224,
        }
    }

    /// Tokens per side of the patch grid.
    fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }
}

/// `nn.MultiheadAttention` (batch first, no masks): the query, key and value projections
/// in one `[3 D, D]` matrix as PyTorch keeps it, then `out_proj`.
#[derive(Module, Debug)]
pub struct MultiheadAttention {
    in_proj_weight: Param<Tensor<2>>,
    in_proj_bias: Param<Tensor<1>>,
    out_proj: OutProj,
    num_heads: usize,
}

/// The output projection; the variant names PyTorch's class for it.
#[allow(missing_docs)]
#[derive(Module, Debug)]
pub enum OutProj {
    NonDynamicallyQuantizableLinear(Linear),
}

impl MultiheadAttention {
    fn new(dim: usize, num_heads: usize, device: &Device) -> Self {
        let xavier = Initializer::XavierUniform { gain: 1.0 };
        Self {
            in_proj_weight: xavier.init_with([3 * dim, dim], Some(dim), Some(3 * dim), device),
            in_proj_bias: Initializer::Zeros.init([3 * dim], device),
            out_proj: OutProj::NonDynamicallyQuantizableLinear(zero_bias(
                LinearConfig::new(dim, dim).init(device),
                device,
            )),
            num_heads,
        }
    }

    fn out_proj(&self) -> &Linear {
        let OutProj::NonDynamicallyQuantizableLinear(linear) = &self.out_proj;
        linear
    }

    /// Self-attention of `[N, S, D]` tokens: `softmax(Q K^T / sqrt(d)) V` per head, by the
    /// native blocked kernel on the CPU.
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [n, s, d] = x.dims();
        let (heads, dh) = (self.num_heads, d / self.num_heads);
        let qkv = x
            .reshape([n * s, d])
            .matmul(self.in_proj_weight.val().transpose())
            .add(self.in_proj_bias.val().unsqueeze::<2>());
        let split = |i: usize| {
            qkv.clone()
                .narrow(1, i * d, d)
                .reshape([n, s, heads, dh])
                .swap_dims(1, 2)
        };
        let (q, k, v) = (split(0), split(1), split(2));
        let y = kernels::attention(q, k, v, None, (dh as f32).powf(-0.5));
        self.out_proj()
            .forward(y.swap_dims(1, 2).reshape([n, s, d]))
    }

    fn onnx(&self, g: &mut Graph, scope: &str, x: &Value) -> Result<Value> {
        let d = self.in_proj_bias.dims()[0] / 3;
        let (heads, dh) = (self.num_heads, d / self.num_heads);
        let weight = self.in_proj_weight.val().transpose();
        let w = g.weight(scope, "in_proj_weight", weight)?;
        let b = g.weight(scope, "in_proj_bias", self.in_proj_bias.val())?;
        let qkv = g.matmul(scope, x, &w);
        let qkv = g.add(scope, &qkv, &b);
        let [q, k, v] = g.attention_heads(scope, &qkv, heads);
        let scores = g.matmul(scope, &q, &k);
        let scale = g.scalar((1.0 / (dh as f64).sqrt()) as f32);
        let scores = g.mul(scope, &scores, &scale);
        let weights = g.softmax_last(scope, &scores);
        let y = g.matmul(scope, &weights, &v);
        let y = g.merge_heads(scope, &y, d);
        g.linear(&child(scope, "out_proj"), self.out_proj(), &y)
    }
}

/// `linear` with its bias set to zero (`nn.MultiheadAttention` zeroes `out_proj.bias`).
fn zero_bias(mut linear: Linear, device: &Device) -> Linear {
    linear.bias = linear
        .bias
        .map(|b| Param::from_tensor(Tensor::zeros(b.dims(), device)));
    linear
}

/// The MLP of a block; the variant names torchvision's class (`MLPBlock`, a Sequential of
/// Linear, GELU, Dropout, Linear, Dropout).
#[allow(missing_docs)]
#[derive(Module, Debug)]
pub enum Mlp {
    MLPBlock(Vec<Layer>),
}

/// torchvision's `EncoderBlock`: pre-norm self-attention and MLP, each with a residual.
#[derive(Module, Debug)]
pub struct EncoderBlock {
    ln_1: LayerNorm,
    self_attention: MultiheadAttention,
    dropout: Dropout,
    ln_2: LayerNorm,
    mlp: Mlp,
}

impl EncoderBlock {
    fn new(spec: &ViTSpec, device: &Device) -> Self {
        let (d, m) = (spec.hidden_dim, spec.mlp_dim);
        let mlp_linear = |cin: usize, cout: usize| {
            let mut linear = LinearConfig::new(cin, cout)
                .with_initializer(Initializer::XavierUniform { gain: 1.0 })
                .init(device);
            linear.bias = Some(
                Initializer::Normal {
                    mean: 0.0,
                    std: 1e-6,
                }
                .init([cout], device),
            );
            Layer::Linear(linear)
        };
        Self {
            ln_1: layer_norm(d, EPS, device),
            self_attention: MultiheadAttention::new(d, spec.num_heads, device),
            dropout: dropout(0.0),
            ln_2: layer_norm(d, EPS, device),
            mlp: Mlp::MLPBlock(vec![
                mlp_linear(d, m),
                Layer::GELU(Gelu::new()),
                Layer::Dropout(dropout(0.0)),
                mlp_linear(m, d),
                Layer::Dropout(dropout(0.0)),
            ]),
        }
    }

    fn mlp(&self) -> &[Layer] {
        let Mlp::MLPBlock(layers) = &self.mlp;
        layers
    }

    fn forward(&self, input: Tensor<3>) -> Tensor<3> {
        let x = self
            .self_attention
            .forward(self.ln_1.forward(input.clone()));
        let x = self.dropout.forward(x) + input;
        // The Sequential's layers act on the last dimension; [N, 1, S, D] is their 4-D form.
        let y = sequential(self.mlp(), self.ln_2.forward(x.clone()).unsqueeze_dim(1));
        x + y.squeeze_dim(1)
    }

    fn onnx(&self, g: &mut Graph, scope: &str, input: &Value) -> Result<Value> {
        let x = g.layer_norm(&child(scope, "ln_1"), &self.ln_1, input)?;
        let x = self
            .self_attention
            .onnx(g, &child(scope, "self_attention"), &x)?;
        let x = g.add(scope, &x, input);
        let y = g.layer_norm(&child(scope, "ln_2"), &self.ln_2, &x)?;
        let y = sequential_onnx(self.mlp(), g, &child(scope, "mlp"), &y)?;
        Ok(g.add(scope, &x, &y))
    }
}

/// `encoder.layers`, a Sequential of `encoder_layer_N` in torchvision.
#[allow(missing_docs)]
#[derive(Module, Debug)]
pub enum Layers {
    Sequential(Vec<EncoderBlock>),
}

/// torchvision's `Encoder`: position embeddings, the blocks, the final LayerNorm.
#[derive(Module, Debug)]
pub struct Encoder {
    pos_embedding: Param<Tensor<3>>,
    dropout: Dropout,
    layers: Layers,
    ln: LayerNorm,
}

impl Encoder {
    fn blocks(&self) -> &[EncoderBlock] {
        let Layers::Sequential(blocks) = &self.layers;
        blocks
    }
}

/// `heads`, a Sequential holding the `head` Linear.
#[derive(Module, Debug)]
pub struct HeadLayers {
    head: Linear,
}

/// `heads`; the variant names its PyTorch class.
#[allow(missing_docs)]
#[derive(Module, Debug)]
pub enum Heads {
    Sequential(HeadLayers),
}

/// torchvision's `VisionTransformer`, field for field.
#[derive(Module, Debug)]
pub struct VisionTransformer {
    conv_proj: Conv2d,
    class_token: Param<Tensor<3>>,
    encoder: Encoder,
    heads: Heads,
    patch_size: usize,
}

impl VisionTransformer {
    /// A network of this spec with `num_classes` outputs, initialised as torchvision's
    /// (zero head; truncated normals drawn as plain normals).
    pub fn new(spec: &ViTSpec, num_classes: usize, device: &Device) -> Self {
        let (d, p) = (spec.hidden_dim, spec.patch_size);
        let mut conv_proj = ConvSpec::new(3, d, p, p)
            .padding([0; 4])
            .bias()
            .init(device);
        let fan_in = 3 * p * p;
        conv_proj.weight = Initializer::Normal {
            mean: 0.0,
            std: (1.0 / fan_in as f64).sqrt(),
        }
        .init([d, 3, p, p], device);
        let seq = spec.grid() * spec.grid() + 1;
        let blocks = (0..spec.num_layers)
            .map(|_| EncoderBlock::new(spec, device))
            .collect();
        let head = LinearConfig::new(d, num_classes)
            .with_initializer(Initializer::Zeros)
            .init(device);
        Self {
            conv_proj,
            class_token: Initializer::Zeros.init([1, 1, d], device),
            encoder: Encoder {
                pos_embedding: Initializer::Normal {
                    mean: 0.0,
                    std: 0.02,
                }
                .init([1, seq, d], device),
                dropout: dropout(0.0),
                layers: Layers::Sequential(blocks),
                ln: layer_norm(d, EPS, device),
            },
            heads: Heads::Sequential(HeadLayers { head }),
            patch_size: p,
        }
    }

    fn head_linear(&self) -> &Linear {
        let Heads::Sequential(h) = &self.heads;
        &h.head
    }

    /// The position embeddings for a `grid` x `grid` patch grid: the stored ones, or those
    /// resampled (bicubic, aligned corners) as a fixed linear map, so that gradients reach
    /// the stored ones when training at another size.
    fn pos_embedding(&self, grid: usize) -> Tensor<3> {
        let pos = self.encoder.pos_embedding.val();
        let [_, seq, d] = pos.dims();
        let stored = ((seq - 1) as f64).sqrt() as usize;
        if stored == grid {
            return pos;
        }
        let device = pos.device();
        let token = pos.clone().narrow(1, 0, 1);
        let image = pos
            .narrow(1, 1, seq - 1)
            .reshape([stored, stored, d])
            .permute([2, 0, 1]);
        let m = Tensor::<2>::from_data(
            TensorData::new(bicubic_matrix(stored, grid), [grid, stored]),
            &device,
        );
        let rows = m.clone().unsqueeze::<3>().expand([d, grid, stored]);
        let cols = m.transpose().unsqueeze::<3>().expand([d, stored, grid]);
        let resampled = rows.matmul(image).matmul(cols);
        let resampled = resampled.permute([1, 2, 0]).reshape([1, grid * grid, d]);
        Tensor::cat(vec![token, resampled], 1)
    }

    /// The encoder's output tokens `[N, 1 + h w, D]`, normalised.
    fn tokens(&self, x: Tensor<4>) -> Tensor<3> {
        let x = kernels::conv2d(&self.conv_proj, x);
        let [n, d, h, w] = x.dims();
        let patches = x.reshape([n, d, h * w]).swap_dims(1, 2);
        let class = self.class_token.val().expand([n, 1, d]);
        let grid = h; // square inputs, as torchvision requires
        let x = Tensor::cat(vec![class, patches], 1) + self.pos_embedding(grid);
        let x = self.encoder.dropout.forward(x);
        let x = self
            .encoder
            .blocks()
            .iter()
            .fold(x, |x, block| block.forward(x));
        self.encoder.ln.forward(x)
    }
}

/// The `[out, in]` matrix of PyTorch's 1-D bicubic resampling with `align_corners=True`
/// (cubic convolution, A = -0.75, border samples repeated).
fn bicubic_matrix(inp: usize, out: usize) -> Vec<f32> {
    const A: f64 = -0.75;
    let cubic1 = |t: f64| ((A + 2.0) * t - (A + 3.0)) * t * t + 1.0;
    let cubic2 = |t: f64| ((A * t - 5.0 * A) * t + 8.0 * A) * t - 4.0 * A;
    let mut m = vec![0f32; out * inp];
    for i in 0..out {
        let x = if out > 1 {
            i as f64 * (inp - 1) as f64 / (out - 1) as f64
        } else {
            0.0
        };
        let base = x.floor();
        let t = x - base;
        let weights = [cubic2(t + 1.0), cubic1(t), cubic1(1.0 - t), cubic2(2.0 - t)];
        for (k, w) in weights.into_iter().enumerate() {
            let j = (base as i64 + k as i64 - 1).clamp(0, inp as i64 - 1) as usize;
            m[i * inp + j] += w as f32;
        }
    }
    m
}

const fn swag(size: usize) -> Preprocess {
    Preprocess::imagenet(size, size, Interpolation::Bicubic)
}

const B_16_WEIGHTS: &[Weights] = &[
    torchvision::weights(
        "vit_b_16",
        "IMAGENET1K_V1",
        "https://download.pytorch.org/models/vit_b_16-c867db91.pth",
        81.072,
        torchvision::preprocess(224, 256),
    )
    .default(),
    torchvision::weights(
        "vit_b_16",
        "IMAGENET1K_SWAG_E2E_V1",
        "https://download.pytorch.org/models/vit_b_16_swag-9ac1b537.pth",
        85.304,
        swag(384),
    ),
    torchvision::weights(
        "vit_b_16",
        "IMAGENET1K_SWAG_LINEAR_V1",
        "https://download.pytorch.org/models/vit_b_16_lc_swag-4e70ced5.pth",
        81.886,
        swag(224),
    ),
];

const B_32_WEIGHTS: &[Weights] = &[torchvision::weights(
    "vit_b_32",
    "IMAGENET1K_V1",
    "https://download.pytorch.org/models/vit_b_32-d86f8d99.pth",
    75.912,
    torchvision::preprocess(224, 256),
)
.default()];

const L_16_WEIGHTS: &[Weights] = &[
    torchvision::weights(
        "vit_l_16",
        "IMAGENET1K_V1",
        "https://download.pytorch.org/models/vit_l_16-852ce7e3.pth",
        79.662,
        torchvision::preprocess(224, 242),
    )
    .default(),
    torchvision::weights(
        "vit_l_16",
        "IMAGENET1K_SWAG_E2E_V1",
        "https://download.pytorch.org/models/vit_l_16_swag-4f3808c9.pth",
        88.064,
        swag(512),
    ),
    torchvision::weights(
        "vit_l_16",
        "IMAGENET1K_SWAG_LINEAR_V1",
        "https://download.pytorch.org/models/vit_l_16_lc_swag-4d563306.pth",
        85.146,
        swag(224),
    ),
];

const L_32_WEIGHTS: &[Weights] = &[torchvision::weights(
    "vit_l_32",
    "IMAGENET1K_V1",
    "https://download.pytorch.org/models/vit_l_32-c7638314.pth",
    76.972,
    torchvision::preprocess(224, 256),
)
.default()];

const H_14_WEIGHTS: &[Weights] = &[
    torchvision::weights(
        "vit_h_14",
        "IMAGENET1K_SWAG_E2E_V1",
        "https://download.pytorch.org/models/vit_h_14_swag-80465313.pth",
        88.552,
        swag(518),
    )
    .default(),
    torchvision::weights(
        "vit_h_14",
        "IMAGENET1K_SWAG_LINEAR_V1",
        "https://download.pytorch.org/models/vit_h_14_lc_swag-c1eb923e.pth",
        85.708,
        swag(224),
    ),
];

/// `encoder.layers.N` (burn's path) is `encoder.layers.encoder_layer_N` in PyTorch.
const LAYERS: &str = "encoder.layers.";

impl Family for VisionTransformer {
    type Variant = ViTSpec;
    const TORCH_CLASS: &'static str = "VisionTransformer";
    const ARCHITECTURES: &'static [Architecture<ViTSpec>] = &[
        Architecture {
            name: "vit_b_16",
            variant: ViTSpec::new(16, 12, 12, 768, 3072),
            weights: B_16_WEIGHTS,
        },
        Architecture {
            name: "vit_b_32",
            variant: ViTSpec::new(32, 12, 12, 768, 3072),
            weights: B_32_WEIGHTS,
        },
        Architecture {
            name: "vit_l_16",
            variant: ViTSpec::new(16, 24, 16, 1024, 4096),
            weights: L_16_WEIGHTS,
        },
        Architecture {
            name: "vit_l_32",
            variant: ViTSpec::new(32, 24, 16, 1024, 4096),
            weights: L_32_WEIGHTS,
        },
        Architecture {
            name: "vit_h_14",
            variant: ViTSpec::new(14, 32, 16, 1280, 5120),
            weights: H_14_WEIGHTS,
        },
    ];
    const HEAD: [&'static str; 2] = ["heads.head.weight", "heads.head.bias"];

    fn build(variant: &ViTSpec, num_classes: usize, device: &Device) -> Self {
        Self::new(variant, num_classes, device)
    }

    /// Patch size and width from `conv_proj`, blocks by count, MLP width from the first
    /// block, image size from the position embeddings. The head count is not in the
    /// shapes: the architecture's where the rest matches one, else 64-wide heads (those of
    /// ViT-B and ViT-L).
    fn detect(sd: &StateDict) -> Option<Detected<ViTSpec>> {
        sd.get("class_token")?;
        let conv = &sd.get("conv_proj.weight")?.shape;
        let (hidden_dim, patch_size) = (*conv.first()?, *conv.get(2)?);
        let seq = *sd.get("encoder.pos_embedding")?.shape.get(1)?;
        let grid = (seq.saturating_sub(1) as f64).sqrt() as usize;
        let num_layers = (0..)
            .take_while(|i| {
                sd.get(&format!("{LAYERS}encoder_layer_{i}.ln_1.weight"))
                    .is_some()
            })
            .count();
        let mlp = &sd
            .get(&format!("{LAYERS}encoder_layer_0.mlp.0.weight"))?
            .shape;
        let mut variant = ViTSpec {
            patch_size,
            num_layers,
            num_heads: (hidden_dim / 64).max(1),
            hidden_dim,
            mlp_dim: *mlp.first()?,
            image_size: grid * patch_size,
        };
        let same_shapes = |a: &&Architecture<ViTSpec>| {
            ViTSpec {
                num_heads: a.variant.num_heads,
                image_size: a.variant.image_size,
                ..variant.clone()
            } == a.variant
        };
        let arch = match Self::ARCHITECTURES.iter().find(same_shapes) {
            Some(arch) => {
                variant.num_heads = arch.variant.num_heads;
                arch
            }
            // A narrowed one: the architecture of that patch size and depth, if any.
            None => {
                let patch = |a: &&Architecture<ViTSpec>| a.variant.patch_size == patch_size;
                let archs = Self::ARCHITECTURES.iter();
                archs
                    .clone()
                    .filter(patch)
                    .find(|a| a.variant.num_layers == num_layers)
                    .or_else(|| archs.clone().find(patch))
                    .unwrap_or(&Self::ARCHITECTURES[0])
            }
        };
        Some(Detected {
            arch: arch.name,
            variant,
            num_classes: head_outputs(sd, Self::HEAD[0]),
        })
    }

    fn image_size(variant: &ViTSpec) -> Option<usize> {
        Some(variant.image_size)
    }

    fn feature_dim(variant: &ViTSpec) -> usize {
        variant.hidden_dim
    }

    /// The patch embedding with class token and position embeddings (`stem`), each block
    /// (`block0`...), the final LayerNorm (`norm`), the head.
    fn freeze_groups(variant: &ViTSpec) -> Vec<FreezeGroup> {
        let mut groups = vec![FreezeGroup::new(
            "stem",
            &["conv_proj", "class_token", "encoder.pos_embedding"],
        )];
        for i in 0..variant.num_layers {
            let block = format!("{LAYERS}encoder_layer_{i}");
            groups.push(FreezeGroup::new(format!("block{i}"), &[&block]));
        }
        groups.push(FreezeGroup::new("norm", &["encoder.ln"]));
        groups.push(FreezeGroup::new("head", &["heads.head"]));
        groups
    }

    /// The stem and the first half of the blocks.
    fn default_partial(variant: &ViTSpec) -> String {
        let half = (variant.num_layers / 2).max(1);
        let blocks = (0..half).map(|i| format!("block{i}"));
        std::iter::once("stem".to_string())
            .chain(blocks)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Narrowed: fewer and narrower heads, the same depth (for small experiments; the
    /// family has no multiplier of its own).
    fn with_width(variant: &ViTSpec, width: f64) -> ViTSpec {
        let heads = ((variant.num_heads as f64 * width).round() as usize).max(1);
        let head_dim = variant.hidden_dim / variant.num_heads;
        ViTSpec {
            num_heads: heads,
            hidden_dim: heads * head_dim,
            mlp_dim: heads * head_dim * variant.mlp_dim / variant.hidden_dim,
            ..variant.clone()
        }
    }

    fn distinction(variant: &ViTSpec) -> Option<String> {
        let standard = Self::ARCHITECTURES.iter().any(|a| {
            ViTSpec {
                image_size: 224,
                ..variant.clone()
            } == a.variant
        });
        match (standard, variant.image_size) {
            (true, 224) => None,
            (true, size) => Some(format!("position embeddings for {size}x{size}")),
            (false, _) => Some(format!(
                "{} blocks of width {}, {} heads",
                variant.num_layers, variant.hidden_dim, variant.num_heads
            )),
        }
    }

    fn torch_name(path: &str) -> String {
        match path.strip_prefix(LAYERS) {
            Some(rest) if rest.starts_with(|c: char| c.is_ascii_digit()) => {
                format!("{LAYERS}encoder_layer_{rest}")
            }
            _ => path.to_string(),
        }
    }

    fn head(&self) -> &Linear {
        self.head_linear()
    }

    fn reset_classifier(&mut self, num_classes: usize, device: &Device) {
        let features = self.head_linear().weight.dims()[0];
        self.heads = Heads::Sequential(HeadLayers {
            head: head(features, num_classes, device),
        });
    }

    /// The patch tokens after the final LayerNorm as a feature map `[N, D, h, w]`.
    fn forward_features(&self, x: Tensor<4>) -> Tensor<4> {
        let [_, _, h, w] = x.dims();
        let (gh, gw) = (h / self.patch_size, w / self.patch_size);
        let tokens = self.tokens(x);
        let [n, s, d] = tokens.dims();
        tokens
            .narrow(1, 1, s - 1)
            .swap_dims(1, 2)
            .reshape([n, d, gh, gw])
    }

    /// The class token after the final LayerNorm: what enters the head.
    fn embed(&self, x: Tensor<4>) -> Tensor<2> {
        let tokens = self.tokens(x);
        let [n, _, d] = tokens.dims();
        tokens.narrow(1, 0, 1).reshape([n, d])
    }

    fn forward_head(&self, embedding: Tensor<2>) -> Tensor<2> {
        self.head_linear().forward(embedding)
    }

    /// No BatchNorm to fold.
    fn fold_batchnorm(&mut self) {}

    /// The position embeddings are resampled for the graph's image size, which is then
    /// fixed.
    fn onnx(&self, g: &mut Graph, x: &Value) -> Result<Value> {
        let x = g.conv2d("conv_proj", &self.conv_proj, x)?;
        let d = self.head_linear().weight.dims()[0];
        let x = g.reshape("", &x, &[0, d as i64, -1]);
        let patches = g.transpose("", &[0, 2, 1], &x);
        let class = g.weight("", "class_token", self.class_token.val())?;
        let class = g.expand_batch("", &class, &patches);
        let tokens = g.concat("", &[&class, &patches], 1);
        let grid = g.image_size() / self.patch_size;
        let pos = g.weight("encoder", "pos_embedding", self.pos_embedding(grid))?;
        let mut x = g.add("encoder", &tokens, &pos);
        for (i, block) in self.encoder.blocks().iter().enumerate() {
            x = block.onnx(g, &format!("{LAYERS}{i}"), &x)?;
        }
        let x = g.layer_norm("encoder.ln", &self.encoder.ln, &x)?;
        let class = g.gather("", &x, 1, 0);
        g.linear("heads.head", self.head_linear(), &class)
    }
}

#[cfg(test)]
mod tests {
    use super::bicubic_matrix;

    /// Rows sum to one, the corners are kept (aligned corners), and the same size is the
    /// identity.
    #[test]
    fn bicubic_matrix_keeps_corners_and_sums_to_one() {
        let m = bicubic_matrix(14, 24);
        for row in m.chunks(14) {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        }
        assert_eq!(m[0], 1.0);
        assert_eq!(m[23 * 14 + 13], 1.0);
        let same = bicubic_matrix(5, 5);
        for i in 0..5 {
            for j in 0..5 {
                assert_eq!(same[i * 5 + j], f32::from(u8::from(i == j)));
            }
        }
    }
}
