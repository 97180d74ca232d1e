//! torchvision's RegNet: `regnet_x_400mf` .. `regnet_x_32gf` and `regnet_y_400mf` ..
//! `regnet_y_128gf`. A stem, then four stages of residual bottlenecks whose 3x3 conv is
//! grouped (with squeeze-excitation in the Y models), BatchNorm and ReLU throughout.
//!
//! torchvision computes each model's stage widths from its RegNet parameters in float32; this
//! file lists the results (depths, widths and group widths per stage, as torchvision's
//! `BlockParams` gives them), which the full-size parameter-count test checks. torchvision
//! names the blocks `block1-0`, which no Rust field can be called: [`Family::torch_name`]
//! maps the paths.

use burn::module::Module;
use burn::nn::Linear;
use burn::prelude::*;
use burn::tensor::activation::relu;
use serde::{Deserialize, Serialize};

use super::family::{Architecture, Detected, Family, FreezeGroup, head_outputs};
use super::layers::{
    Activation, ConvSpec, Layer, Norm, SqueezeExcitation, conv_bn_act, fold_sequential, head,
    relu as relu_layer, sequential, sequential_onnx,
};
use super::onnx_graph::{Graph, Value, child};
use super::weights::{Weights, torchvision};
use crate::checkpoint::StateDict;
use crate::error::Result;
use crate::preprocess::{Interpolation, Preprocess};

/// A RegNet's stages, as torchvision's `BlockParams` resolves them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegNetSpec {
    /// Channels of the stem.
    pub stem: usize,
    /// Blocks in each stage.
    pub depths: [usize; 4],
    /// Output channels of each stage.
    pub widths: [usize; 4],
    /// Channels per group of each stage's 3x3 conv.
    pub group_widths: [usize; 4],
    /// Squeeze-excitation (ratio 0.25 of the block's input): the Y models.
    pub se: bool,
}

impl RegNetSpec {
    const fn new(
        depths: [usize; 4],
        widths: [usize; 4],
        group_widths: [usize; 4],
        se: bool,
    ) -> Self {
        Self {
            stem: 32,
            depths,
            widths,
            group_widths,
            se,
        }
    }
}

/// torchvision's `BottleneckTransform`: 1x1 (`a`), grouped 3x3 with the stride (`b`),
/// squeeze-excitation (`se`, Y only), 1x1 without activation (`c`).
#[derive(Module, Debug)]
pub struct BottleneckTransform {
    a: Layer,
    b: Layer,
    se: Option<SqueezeExcitation>,
    c: Layer,
}

/// torchvision's `ResBottleneckBlock`: the transform `f` plus the input, projected (`proj`)
/// where the shape changes, then ReLU.
#[derive(Module, Debug)]
pub struct ResBottleneckBlock {
    proj: Option<Layer>,
    f: BottleneckTransform,
}

impl ResBottleneckBlock {
    fn new(cin: usize, cout: usize, stride: usize, spec: (usize, bool), device: &Device) -> Self {
        let (group_width, se) = spec;
        let cna = |conv: ConvSpec, act: bool| {
            Layer::Conv2dNormActivation(conv_bn_act(
                conv,
                act.then(relu_layer),
                Norm::TORCH,
                device,
            ))
        };
        let groups = cout / group_width;
        let f = BottleneckTransform {
            a: cna(ConvSpec::new(cin, cout, 1, 1), true),
            b: cna(ConvSpec::new(cout, cout, 3, stride).groups(groups), true),
            se: se.then(|| {
                // Python's round, half to even.
                let squeeze = (0.25 * cin as f64).round_ties_even() as usize;
                SqueezeExcitation::new(cout, squeeze, Activation::relu_sigmoid(), device)
            }),
            c: cna(ConvSpec::new(cout, cout, 1, 1), false),
        };
        Self {
            proj: (cin != cout || stride != 1)
                .then(|| cna(ConvSpec::new(cin, cout, 1, stride), false)),
            f,
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let f = &self.f;
        let mut y = f.b.forward(f.a.forward(x.clone()));
        if let Some(se) = &f.se {
            y = se.forward(y);
        }
        let y = f.c.forward(y);
        let shortcut = match &self.proj {
            Some(proj) => proj.forward(x),
            None => x,
        };
        relu(shortcut + y)
    }

    fn onnx(&self, g: &mut Graph, scope: &str, x: &Value) -> Result<Value> {
        let (f, fs) = (&self.f, child(scope, "f"));
        let y = f.a.onnx(g, &child(&fs, "a"), x)?;
        let mut y = f.b.onnx(g, &child(&fs, "b"), &y)?;
        if let Some(se) = &f.se {
            y = se.onnx(g, &child(&fs, "se"), &y)?;
        }
        let y = f.c.onnx(g, &child(&fs, "c"), &y)?;
        let shortcut = match &self.proj {
            Some(proj) => proj.onnx(g, &child(scope, "proj"), x)?,
            None => x.clone(),
        };
        let sum = g.add(scope, &shortcut, &y);
        Ok(g.unary("Relu", &child(scope, "activation"), &sum))
    }

    fn fold_batchnorm(&mut self) {
        let f = &mut self.f;
        for layer in [&mut f.a, &mut f.b, &mut f.c]
            .into_iter()
            .chain(&mut self.proj)
        {
            fold_sequential(std::slice::from_mut(layer));
        }
    }
}

/// A stage; the variant names torchvision's class (`AnyStage`, a `Sequential`).
#[allow(missing_docs)]
#[derive(Module, Debug)]
pub enum Stage {
    AnyStage(Vec<ResBottleneckBlock>),
}

impl Stage {
    fn blocks(&self) -> &[ResBottleneckBlock] {
        match self {
            Stage::AnyStage(blocks) => blocks,
        }
    }

    fn blocks_mut(&mut self) -> &mut [ResBottleneckBlock] {
        match self {
            Stage::AnyStage(blocks) => blocks,
        }
    }
}

/// `trunk_output`'s four named stages.
#[derive(Module, Debug)]
pub struct Stages {
    block1: Stage,
    block2: Stage,
    block3: Stage,
    block4: Stage,
}

/// `trunk_output`, a `Sequential` of named stages in torchvision.
#[allow(missing_docs)]
#[derive(Module, Debug)]
pub enum Trunk {
    Sequential(Stages),
}

/// The stem; the variant names torchvision's class (a `Conv2dNormActivation`).
#[allow(missing_docs)]
#[derive(Module, Debug)]
pub enum Stem {
    SimpleStemIN(Vec<Layer>),
}

/// torchvision's `RegNet`, field for field.
#[derive(Module, Debug)]
pub struct RegNet {
    stem: Stem,
    trunk_output: Trunk,
    /// The classifier head, replaced for a new number of classes.
    pub fc: Linear,
}

impl RegNet {
    /// A network of this spec with `num_classes` outputs.
    pub fn new(spec: &RegNetSpec, num_classes: usize, device: &Device) -> Self {
        let stem = conv_bn_act(
            ConvSpec::new(3, spec.stem, 3, 2),
            Some(relu_layer()),
            Norm::TORCH,
            device,
        );
        let mut cin = spec.stem;
        let mut stages = Vec::new();
        for i in 0..4 {
            let cout = spec.widths[i];
            let blocks = (0..spec.depths[i])
                .map(|j| {
                    let (input, stride) = if j == 0 { (cin, 2) } else { (cout, 1) };
                    ResBottleneckBlock::new(
                        input,
                        cout,
                        stride,
                        (spec.group_widths[i], spec.se),
                        device,
                    )
                })
                .collect();
            stages.push(Stage::AnyStage(blocks));
            cin = cout;
        }
        let [block1, block2, block3, block4]: [Stage; 4] = stages.try_into().expect("four stages");
        Self {
            stem: Stem::SimpleStemIN(stem),
            trunk_output: Trunk::Sequential(Stages {
                block1,
                block2,
                block3,
                block4,
            }),
            fc: head(cin, num_classes, device),
        }
    }

    fn stages(&self) -> [&Stage; 4] {
        let Trunk::Sequential(s) = &self.trunk_output;
        [&s.block1, &s.block2, &s.block3, &s.block4]
    }
}

/// The SWAG weights' preset: resize to the crop size, bicubic.
const fn swag(size: usize) -> Preprocess {
    Preprocess::imagenet(size, size, Interpolation::Bicubic)
}

const Y_400MF: &[Weights] = &torchvision::v1_v2(
    "regnet_y_400mf",
    (
        "https://download.pytorch.org/models/regnet_y_400mf-c65dace8.pth",
        74.046,
    ),
    (
        "https://download.pytorch.org/models/regnet_y_400mf-e6988f5f.pth",
        75.804,
    ),
);

const Y_800MF: &[Weights] = &torchvision::v1_v2(
    "regnet_y_800mf",
    (
        "https://download.pytorch.org/models/regnet_y_800mf-1b27b58c.pth",
        76.420,
    ),
    (
        "https://download.pytorch.org/models/regnet_y_800mf-58fc7688.pth",
        78.828,
    ),
);

const Y_1_6GF: &[Weights] = &torchvision::v1_v2(
    "regnet_y_1_6gf",
    (
        "https://download.pytorch.org/models/regnet_y_1_6gf-b11a554e.pth",
        77.950,
    ),
    (
        "https://download.pytorch.org/models/regnet_y_1_6gf-0d7bc02a.pth",
        80.876,
    ),
);

const Y_3_2GF: &[Weights] = &torchvision::v1_v2(
    "regnet_y_3_2gf",
    (
        "https://download.pytorch.org/models/regnet_y_3_2gf-b5a9779c.pth",
        78.948,
    ),
    (
        "https://download.pytorch.org/models/regnet_y_3_2gf-9180c971.pth",
        81.982,
    ),
);

const Y_8GF: &[Weights] = &torchvision::v1_v2(
    "regnet_y_8gf",
    (
        "https://download.pytorch.org/models/regnet_y_8gf-d0d0e4a8.pth",
        80.032,
    ),
    (
        "https://download.pytorch.org/models/regnet_y_8gf-dc2b1b54.pth",
        82.828,
    ),
);

const Y_16GF: &[Weights] = &[
    torchvision::weights(
        "regnet_y_16gf",
        "IMAGENET1K_V1",
        "https://download.pytorch.org/models/regnet_y_16gf-9e6ed7dd.pth",
        80.424,
        torchvision::preprocess(224, 256),
    ),
    torchvision::weights(
        "regnet_y_16gf",
        "IMAGENET1K_V2",
        "https://download.pytorch.org/models/regnet_y_16gf-3e4a00f9.pth",
        82.886,
        torchvision::preprocess(224, 232),
    )
    .default(),
    torchvision::weights(
        "regnet_y_16gf",
        "IMAGENET1K_SWAG_E2E_V1",
        "https://download.pytorch.org/models/regnet_y_16gf_swag-43afe44d.pth",
        86.012,
        swag(384),
    ),
    torchvision::weights(
        "regnet_y_16gf",
        "IMAGENET1K_SWAG_LINEAR_V1",
        "https://download.pytorch.org/models/regnet_y_16gf_lc_swag-f3ec0043.pth",
        83.976,
        swag(224),
    ),
];

const Y_32GF: &[Weights] = &[
    torchvision::weights(
        "regnet_y_32gf",
        "IMAGENET1K_V1",
        "https://download.pytorch.org/models/regnet_y_32gf-4dee3f7a.pth",
        80.878,
        torchvision::preprocess(224, 256),
    ),
    torchvision::weights(
        "regnet_y_32gf",
        "IMAGENET1K_V2",
        "https://download.pytorch.org/models/regnet_y_32gf-8db6d4b5.pth",
        83.368,
        torchvision::preprocess(224, 232),
    )
    .default(),
    torchvision::weights(
        "regnet_y_32gf",
        "IMAGENET1K_SWAG_E2E_V1",
        "https://download.pytorch.org/models/regnet_y_32gf_swag-04fdfa75.pth",
        86.838,
        swag(384),
    ),
    torchvision::weights(
        "regnet_y_32gf",
        "IMAGENET1K_SWAG_LINEAR_V1",
        "https://download.pytorch.org/models/regnet_y_32gf_lc_swag-e1583746.pth",
        84.622,
        swag(224),
    ),
];

const Y_128GF: &[Weights] = &[
    torchvision::weights(
        "regnet_y_128gf",
        "IMAGENET1K_SWAG_E2E_V1",
        "https://download.pytorch.org/models/regnet_y_128gf_swag-c8ce3e52.pth",
        88.228,
        swag(384),
    )
    .default(),
    torchvision::weights(
        "regnet_y_128gf",
        "IMAGENET1K_SWAG_LINEAR_V1",
        "https://download.pytorch.org/models/regnet_y_128gf_lc_swag-cbe8ce12.pth",
        86.068,
        swag(224),
    ),
];

const X_400MF: &[Weights] = &torchvision::v1_v2(
    "regnet_x_400mf",
    (
        "https://download.pytorch.org/models/regnet_x_400mf-adf1edd5.pth",
        72.834,
    ),
    (
        "https://download.pytorch.org/models/regnet_x_400mf-62229a5f.pth",
        74.864,
    ),
);

const X_800MF: &[Weights] = &torchvision::v1_v2(
    "regnet_x_800mf",
    (
        "https://download.pytorch.org/models/regnet_x_800mf-ad17e45c.pth",
        75.212,
    ),
    (
        "https://download.pytorch.org/models/regnet_x_800mf-94a99ebd.pth",
        77.522,
    ),
);

const X_1_6GF: &[Weights] = &torchvision::v1_v2(
    "regnet_x_1_6gf",
    (
        "https://download.pytorch.org/models/regnet_x_1_6gf-e3633e7f.pth",
        77.040,
    ),
    (
        "https://download.pytorch.org/models/regnet_x_1_6gf-a12f2b72.pth",
        79.668,
    ),
);

const X_3_2GF: &[Weights] = &torchvision::v1_v2(
    "regnet_x_3_2gf",
    (
        "https://download.pytorch.org/models/regnet_x_3_2gf-f342aeae.pth",
        78.364,
    ),
    (
        "https://download.pytorch.org/models/regnet_x_3_2gf-7071aa85.pth",
        81.196,
    ),
);

const X_8GF: &[Weights] = &torchvision::v1_v2(
    "regnet_x_8gf",
    (
        "https://download.pytorch.org/models/regnet_x_8gf-03ceed89.pth",
        79.344,
    ),
    (
        "https://download.pytorch.org/models/regnet_x_8gf-2b70d774.pth",
        81.682,
    ),
);

const X_16GF: &[Weights] = &torchvision::v1_v2(
    "regnet_x_16gf",
    (
        "https://download.pytorch.org/models/regnet_x_16gf-2007eb11.pth",
        80.058,
    ),
    (
        "https://download.pytorch.org/models/regnet_x_16gf-ba3796d7.pth",
        82.716,
    ),
);

const X_32GF: &[Weights] = &torchvision::v1_v2(
    "regnet_x_32gf",
    (
        "https://download.pytorch.org/models/regnet_x_32gf-9d47f8d0.pth",
        80.622,
    ),
    (
        "https://download.pytorch.org/models/regnet_x_32gf-6eb8fdc6.pth",
        83.014,
    ),
);

/// One architecture: its name and weights, and (depths, widths, group widths, SE) as
/// torchvision's `BlockParams.from_init_params` resolves its RegNet parameters.
const fn regnet(
    name: &'static str,
    weights: &'static [Weights],
    (depths, widths, group_widths, se): ([usize; 4], [usize; 4], [usize; 4], bool),
) -> Architecture<RegNetSpec> {
    Architecture {
        name,
        variant: RegNetSpec::new(depths, widths, group_widths, se),
        weights,
    }
}

impl Family for RegNet {
    type Variant = RegNetSpec;
    const TORCH_CLASS: &'static str = "RegNet";
    const ARCHITECTURES: &'static [Architecture<RegNetSpec>] = &[
        regnet(
            "regnet_y_400mf",
            Y_400MF,
            ([1, 3, 6, 6], [48, 104, 208, 440], [8; 4], true),
        ),
        regnet(
            "regnet_y_800mf",
            Y_800MF,
            ([1, 3, 8, 2], [64, 144, 320, 784], [16; 4], true),
        ),
        regnet(
            "regnet_y_1_6gf",
            Y_1_6GF,
            ([2, 6, 17, 2], [48, 120, 336, 888], [24; 4], true),
        ),
        regnet(
            "regnet_y_3_2gf",
            Y_3_2GF,
            ([2, 5, 13, 1], [72, 216, 576, 1512], [24; 4], true),
        ),
        regnet(
            "regnet_y_8gf",
            Y_8GF,
            ([2, 4, 10, 1], [224, 448, 896, 2016], [56; 4], true),
        ),
        regnet(
            "regnet_y_16gf",
            Y_16GF,
            ([2, 4, 11, 1], [224, 448, 1232, 3024], [112; 4], true),
        ),
        regnet(
            "regnet_y_32gf",
            Y_32GF,
            ([2, 5, 12, 1], [232, 696, 1392, 3712], [232; 4], true),
        ),
        regnet(
            "regnet_y_128gf",
            Y_128GF,
            ([2, 7, 17, 1], [528, 1056, 2904, 7392], [264; 4], true),
        ),
        regnet(
            "regnet_x_400mf",
            X_400MF,
            ([1, 2, 7, 12], [32, 64, 160, 400], [16; 4], false),
        ),
        regnet(
            "regnet_x_800mf",
            X_800MF,
            ([1, 3, 7, 5], [64, 128, 288, 672], [16; 4], false),
        ),
        regnet(
            "regnet_x_1_6gf",
            X_1_6GF,
            ([2, 4, 10, 2], [72, 168, 408, 912], [24; 4], false),
        ),
        regnet(
            "regnet_x_3_2gf",
            X_3_2GF,
            ([2, 6, 15, 2], [96, 192, 432, 1008], [48; 4], false),
        ),
        regnet(
            "regnet_x_8gf",
            X_8GF,
            (
                [2, 5, 15, 1],
                [80, 240, 720, 1920],
                [80, 120, 120, 120],
                false,
            ),
        ),
        regnet(
            "regnet_x_16gf",
            X_16GF,
            ([2, 6, 13, 1], [256, 512, 896, 2048], [128; 4], false),
        ),
        regnet(
            "regnet_x_32gf",
            X_32GF,
            ([2, 7, 13, 1], [336, 672, 1344, 2520], [168; 4], false),
        ),
    ];
    const HEAD: [&'static str; 2] = ["fc.weight", "fc.bias"];

    fn build(variant: &RegNetSpec, num_classes: usize, device: &Device) -> Self {
        Self::new(variant, num_classes, device)
    }

    /// Everything from the shapes: depths from the block counts, widths from each stage's
    /// last conv, group widths from its 3x3, squeeze-excitation from its presence.
    fn detect(sd: &StateDict) -> Option<Detected<RegNetSpec>> {
        let block =
            |i: usize, j: usize, rest: &str| format!("trunk_output.block{i}.block{i}-{j}.f.{rest}");
        sd.get(&block(1, 0, "a.0.weight"))?;
        let mut variant = RegNetSpec {
            stem: *sd.get("stem.0.weight")?.shape.first()?,
            depths: [0; 4],
            widths: [0; 4],
            group_widths: [0; 4],
            se: sd.get(&block(1, 0, "se.fc1.weight")).is_some(),
        };
        for i in 0..4 {
            variant.depths[i] = (0..)
                .take_while(|&j| sd.get(&block(i + 1, j, "a.0.weight")).is_some())
                .count();
            variant.widths[i] = *sd.get(&block(i + 1, 0, "c.0.weight"))?.shape.first()?;
            variant.group_widths[i] = *sd.get(&block(i + 1, 0, "b.0.weight"))?.shape.get(1)?;
        }
        let same_depths = |a: &&Architecture<RegNetSpec>| {
            a.variant.depths == variant.depths && a.variant.se == variant.se
        };
        let arch = Self::ARCHITECTURES
            .iter()
            .find(|a| a.variant == variant)
            .or_else(|| Self::ARCHITECTURES.iter().find(same_depths))?;
        Some(Detected {
            arch: arch.name,
            variant,
            num_classes: head_outputs(sd, Self::HEAD[0]),
        })
    }

    fn feature_dim(variant: &RegNetSpec) -> usize {
        variant.widths[3]
    }

    fn freeze_groups(_variant: &RegNetSpec) -> Vec<FreezeGroup> {
        let mut groups = vec![FreezeGroup::new("stem", &["stem"])];
        for i in 1..=4 {
            groups.push(FreezeGroup::new(
                format!("stage{i}"),
                &[format!("trunk_output.block{i}").as_str()],
            ));
        }
        groups.push(FreezeGroup::new("head", &["fc"]));
        groups
    }

    /// The stem and the first two stages.
    fn default_partial(_variant: &RegNetSpec) -> String {
        "stem,trunk_output.block1,trunk_output.block2".into()
    }

    /// Narrowed: fewer channels per group, every width a multiple of its group width.
    fn with_width(variant: &RegNetSpec, width: f64) -> RegNetSpec {
        let scale = |c: usize| ((c as f64 * width).round() as usize).max(1);
        let mut narrow = variant.clone();
        narrow.stem = scale(variant.stem);
        for i in 0..4 {
            let group = scale(variant.group_widths[i]);
            narrow.group_widths[i] = group;
            narrow.widths[i] = (scale(variant.widths[i]).div_ceil(group)) * group;
        }
        narrow
    }

    fn distinction(variant: &RegNetSpec) -> Option<String> {
        let standard = Self::ARCHITECTURES.iter().any(|a| &a.variant == variant);
        (!standard).then(|| format!("widths {:?}", variant.widths))
    }

    /// `trunk_output.block1.0` is torchvision's `trunk_output.block1.block1-0`.
    fn torch_name(path: &str) -> String {
        let mut parts: Vec<String> = path.split('.').map(str::to_string).collect();
        if let [trunk, stage, index, ..] = parts.as_mut_slice()
            && trunk == "trunk_output"
            && index.bytes().all(|b| b.is_ascii_digit())
            && let Some(n) = stage.strip_prefix("block")
        {
            *index = format!("block{n}-{index}");
        }
        parts.join(".")
    }

    fn head(&self) -> &Linear {
        &self.fc
    }

    fn reset_classifier(&mut self, num_classes: usize, device: &Device) {
        self.fc = head(self.fc.weight.dims()[0], num_classes, device);
    }

    fn forward_features(&self, x: Tensor<4>) -> Tensor<4> {
        let Stem::SimpleStemIN(stem) = &self.stem;
        let x = sequential(stem, x);
        self.stages()
            .into_iter()
            .flat_map(Stage::blocks)
            .fold(x, |x, b| b.forward(x))
    }

    fn forward_head(&self, pooled: Tensor<2>) -> Tensor<2> {
        self.fc.forward(pooled)
    }

    fn fold_batchnorm(&mut self) {
        let Stem::SimpleStemIN(stem) = &mut self.stem;
        fold_sequential(stem);
        let Trunk::Sequential(s) = &mut self.trunk_output;
        for stage in [&mut s.block1, &mut s.block2, &mut s.block3, &mut s.block4] {
            stage
                .blocks_mut()
                .iter_mut()
                .for_each(ResBottleneckBlock::fold_batchnorm);
        }
    }

    fn onnx(&self, g: &mut Graph, x: &Value) -> Result<Value> {
        let Stem::SimpleStemIN(stem) = &self.stem;
        let mut x = sequential_onnx(stem, g, "stem", x)?;
        for (s, stage) in self.stages().into_iter().enumerate() {
            for (i, block) in stage.blocks().iter().enumerate() {
                x = block.onnx(g, &format!("trunk_output.block{}.{i}", s + 1), &x)?;
            }
        }
        let pooled = g.global_avg_pool("avgpool", &x);
        g.linear("fc", &self.fc, &pooled)
    }
}
