//! torchvision's ResNet family: `resnet18`, `resnet34` (basic blocks) and `resnet50`
//! (bottlenecks, stride on the 3x3 conv as in torchvision's "v1.5").

use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::nn::pool::MaxPool2dConfig;
use burn::nn::{Linear, PaddingConfig2d};

use super::batch_norm::BatchNorm;
use crate::kernels::conv2d;
use burn::prelude::*;
use burn::tensor::activation::relu;
use serde::{Deserialize, Serialize};

use super::layers::{ConvSpec, Layer, fold_sequential, global_avg_pool, head, sequential};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BlockKind {
    Basic,
    Bottleneck,
}

impl BlockKind {
    pub fn expansion(self) -> usize {
        match self {
            BlockKind::Basic => 1,
            BlockKind::Bottleneck => 4,
        }
    }
}

/// A ResNet's shape: block type, blocks per stage, and the stem width (64 in torchvision;
/// smaller widths keep the test fixtures small while using the same block types).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResNetSpec {
    pub block: BlockKind,
    pub layers: [usize; 4],
    pub width: usize,
}

impl ResNetSpec {
    pub fn feature_dim(&self) -> usize {
        self.width * 8 * self.block.expansion()
    }
}

fn bn(channels: usize, device: &Device) -> BatchNorm {
    BatchNorm::new(channels, 1e-5, 0.1, device)
}

/// torchvision's shortcut projection: 1x1 conv with the block's stride, then BatchNorm.
fn downsample(cin: usize, cout: usize, stride: usize, device: &Device) -> Option<Vec<Layer>> {
    (stride != 1 || cin != cout).then(|| {
        vec![
            Layer::Conv2d(ConvSpec::new(cin, cout, 1, stride).init(device)),
            Layer::BatchNorm2d(bn(cout, device)),
        ]
    })
}

fn shortcut(downsample: &Option<Vec<Layer>>, x: Tensor<4>) -> Tensor<4> {
    match downsample {
        Some(layers) => sequential(layers, x),
        None => x,
    }
}

#[derive(Module, Debug)]
pub struct BasicBlock {
    conv1: Conv2d,
    bn1: BatchNorm,
    conv2: Conv2d,
    bn2: BatchNorm,
    downsample: Option<Vec<Layer>>,
}

impl BasicBlock {
    fn new(cin: usize, planes: usize, stride: usize, device: &Device) -> Self {
        Self {
            conv1: ConvSpec::new(cin, planes, 3, stride).init(device),
            bn1: bn(planes, device),
            conv2: ConvSpec::new(planes, planes, 3, 1).init(device),
            bn2: bn(planes, device),
            downsample: downsample(cin, planes, stride, device),
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let identity = shortcut(&self.downsample, x.clone());
        let y = relu(self.bn1.forward(conv2d(&self.conv1, x)));
        let y = self.bn2.forward(conv2d(&self.conv2, y));
        relu(y + identity)
    }
}

#[derive(Module, Debug)]
pub struct Bottleneck {
    conv1: Conv2d,
    bn1: BatchNorm,
    conv2: Conv2d,
    bn2: BatchNorm,
    conv3: Conv2d,
    bn3: BatchNorm,
    downsample: Option<Vec<Layer>>,
}

impl Bottleneck {
    fn new(cin: usize, planes: usize, stride: usize, device: &Device) -> Self {
        let cout = planes * 4;
        Self {
            conv1: ConvSpec::new(cin, planes, 1, 1).init(device),
            bn1: bn(planes, device),
            conv2: ConvSpec::new(planes, planes, 3, stride).init(device),
            bn2: bn(planes, device),
            conv3: ConvSpec::new(planes, cout, 1, 1).init(device),
            bn3: bn(cout, device),
            downsample: downsample(cin, cout, stride, device),
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let identity = shortcut(&self.downsample, x.clone());
        let y = relu(self.bn1.forward(conv2d(&self.conv1, x)));
        let y = relu(self.bn2.forward(conv2d(&self.conv2, y)));
        let y = self.bn3.forward(conv2d(&self.conv3, y));
        relu(y + identity)
    }
}

/// A residual block; variants named after torchvision's classes.
// A network is built once and moved rarely; boxing the variants buys nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum Block {
    BasicBlock(BasicBlock),
    Bottleneck(Bottleneck),
}

impl Block {
    fn new(kind: BlockKind, cin: usize, planes: usize, stride: usize, device: &Device) -> Self {
        match kind {
            BlockKind::Basic => Block::BasicBlock(BasicBlock::new(cin, planes, stride, device)),
            BlockKind::Bottleneck => {
                Block::Bottleneck(Bottleneck::new(cin, planes, stride, device))
            }
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        match self {
            Block::BasicBlock(b) => b.forward(x),
            Block::Bottleneck(b) => b.forward(x),
        }
    }
}

#[derive(Module, Debug)]
pub struct ResNet {
    conv1: Conv2d,
    bn1: BatchNorm,
    maxpool: Layer,
    layer1: Vec<Block>,
    layer2: Vec<Block>,
    layer3: Vec<Block>,
    layer4: Vec<Block>,
    pub fc: Linear,
}

impl ResNet {
    pub fn new(spec: &ResNetSpec, num_classes: usize, device: &Device) -> Self {
        let w = spec.width;
        let mut cin = w;
        let mut stages: Vec<Vec<Block>> = Vec::new();
        for (i, &n) in spec.layers.iter().enumerate() {
            let planes = w << i;
            let stride = if i == 0 { 1 } else { 2 };
            let blocks = (0..n)
                .map(|j| {
                    let b = Block::new(
                        spec.block,
                        cin,
                        planes,
                        if j == 0 { stride } else { 1 },
                        device,
                    );
                    cin = planes * spec.block.expansion();
                    b
                })
                .collect();
            stages.push(blocks);
        }
        let [layer1, layer2, layer3, layer4]: [Vec<Block>; 4] =
            stages.try_into().expect("four stages");
        Self {
            conv1: ConvSpec::new(3, w, 7, 2).init(device),
            bn1: bn(w, device),
            maxpool: Layer::MaxPool2d(
                MaxPool2dConfig::new([3, 3])
                    .with_strides([2, 2])
                    .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                    .init(),
            ),
            layer1,
            layer2,
            layer3,
            layer4,
            fc: head(cin, num_classes, device),
        }
    }

    /// Fold BatchNorm into the convolutions (inference only).
    pub fn fold_batchnorm(&mut self) {
        self.bn1.fold_into(&mut self.conv1);
        let stages = [
            &mut self.layer1,
            &mut self.layer2,
            &mut self.layer3,
            &mut self.layer4,
        ];
        for block in stages.into_iter().flatten() {
            match block {
                Block::BasicBlock(b) => {
                    b.bn1.fold_into(&mut b.conv1);
                    b.bn2.fold_into(&mut b.conv2);
                    b.downsample.iter_mut().for_each(|d| fold_sequential(d));
                }
                Block::Bottleneck(b) => {
                    b.bn1.fold_into(&mut b.conv1);
                    b.bn2.fold_into(&mut b.conv2);
                    b.bn3.fold_into(&mut b.conv3);
                    b.downsample.iter_mut().for_each(|d| fold_sequential(d));
                }
            }
        }
    }

    pub fn forward_features(&self, x: Tensor<4>) -> Tensor<4> {
        let x = self
            .maxpool
            .forward(relu(self.bn1.forward(conv2d(&self.conv1, x))));
        [&self.layer1, &self.layer2, &self.layer3, &self.layer4]
            .into_iter()
            .flatten()
            .fold(x, |x, block| block.forward(x))
    }

    pub fn forward_head(&self, pooled: Tensor<2>) -> Tensor<2> {
        self.fc.forward(pooled)
    }

    pub fn embed(&self, x: Tensor<4>) -> Tensor<2> {
        global_avg_pool(self.forward_features(x))
    }
}
