//! The interface every family of networks implements (timm's model surface): its
//! architectures and their weights, building, recognising a state dict, the head, the
//! forward passes, freeze groups, and BatchNorm folding.

use std::fmt::Debug;

use burn::module::Module;
use burn::nn::Linear;
use burn::prelude::*;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::layers::global_avg_pool;
use super::onnx_graph::{Graph, Value};
use super::weights::Weights;
use crate::checkpoint::StateDict;
use crate::checkpoint::write::NamedTensor;
use crate::error::Result;

/// One family of networks, implemented by the network type itself (a burn module whose
/// parameter paths are PyTorch's state-dict keys). Register it with one line in
/// [`crate::models`]' registry.
pub trait Family: Module + Debug + Sized {
    /// What varies between the family's members and checkpoints (depths, widths); stored
    /// in a run's `config.json`.
    type Variant: Clone + Debug + PartialEq + Serialize + DeserializeOwned + 'static;

    /// The PyTorch class of the root module (`ResNet`), for the module view.
    const TORCH_CLASS: &'static str;

    /// The architectures of this family with their torchvision names and weights.
    const ARCHITECTURES: &'static [Architecture<Self::Variant>];

    /// State-dict names of the classifier's weight and bias, replaced for a new class count.
    const HEAD: [&'static str; 2];

    /// A randomly initialised network (PyTorch's initialisation schemes).
    fn build(variant: &Self::Variant, num_classes: usize, device: &Device) -> Self;

    /// Recognise a state dict of this family, telling its variants apart by shapes and
    /// key counts.
    fn detect(sd: &StateDict) -> Option<Detected<Self::Variant>>;

    /// Width of the pooled features that enter the head.
    fn feature_dim(variant: &Self::Variant) -> usize;

    /// Named groups of modules from input to output (timm's `group_matcher`): the stem,
    /// each stage, the head. `--freeze` takes their names.
    fn freeze_groups(variant: &Self::Variant) -> Vec<FreezeGroup>;

    /// What `compare`'s `partial` regime freezes: a `--freeze` spec of the lower part.
    fn default_partial(variant: &Self::Variant) -> String;

    /// The image size the network is made for, for families whose parameters depend on it
    /// (a ViT's position embeddings); unregistered weights are prepared for it.
    fn image_size(_variant: &Self::Variant) -> Option<usize> {
        None
    }

    /// The width as `--width` takes it, for families that have one.
    fn width(_variant: &Self::Variant) -> Option<f64> {
        None
    }

    /// The same network at another width (unchanged where the family has none).
    fn with_width(variant: &Self::Variant, _width: f64) -> Self::Variant {
        variant.clone()
    }

    /// What sets this variant apart from its architecture's standard one, for messages
    /// (`width 0.25`), or `None`.
    fn distinction(_variant: &Self::Variant) -> Option<String> {
        None
    }

    /// PyTorch's name for the parameter or module at burn path `path`, where the module
    /// tree has names no Rust field can have (RegNet's `block1-0`); the path itself for most
    /// families.
    fn torch_name(path: &str) -> String {
        path.to_string()
    }

    /// The classifier's Linear layer.
    fn head(&self) -> &Linear;

    /// Replace the classifier's Linear layer by a new one with `num_classes` outputs.
    fn reset_classifier(&mut self, num_classes: usize, device: &Device);

    /// Feature maps before pooling, `[N, D, h, w]`.
    fn forward_features(&self, x: Tensor<4>) -> Tensor<4>;

    /// The classifier on pooled features: logits `[N, classes]`.
    fn forward_head(&self, pooled: Tensor<2>) -> Tensor<2>;

    /// The pooled embedding `[N, D]` that enters the head.
    fn embed(&self, x: Tensor<4>) -> Tensor<2> {
        global_avg_pool(self.forward_features(x))
    }

    /// Fold BatchNorm into the preceding convolutions, for inference only (the BatchNorm
    /// layers become identities).
    fn fold_batchnorm(&mut self);

    /// Buffers PyTorch keeps that follow from the architecture alone (Swin's
    /// relative-position index): not loaded, but listed in the module view and written on
    /// export, so that `load_state_dict(strict=True)` finds them. Names are PyTorch's.
    fn derived_buffers(&self) -> Vec<NamedTensor> {
        Vec::new()
    }

    /// Write the eval-mode network into an ONNX graph, as its forward pass computes it:
    /// the logits of `x`. Module names are burn paths (as for [`Self::torch_name`]).
    fn onnx(&self, g: &mut Graph, x: &Value) -> Result<Value>;
}

/// One architecture of a family, as torchvision names it.
#[derive(Debug)]
pub struct Architecture<V: 'static> {
    /// The name users type (`resnet50`).
    pub name: &'static str,
    /// Its standard variant.
    pub variant: V,
    /// Its registered pretrained weights, torchvision's `DEFAULT` first.
    pub weights: &'static [Weights],
}

/// What [`Family::detect`] recognised.
#[derive(Debug, Clone)]
pub struct Detected<V> {
    /// The architecture's name.
    pub arch: &'static str,
    /// The variant the checkpoint was made with.
    pub variant: V,
    /// Outputs of the checkpoint's head.
    pub num_classes: usize,
}

/// A named group of modules (`stem`, `layer1`, `head`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FreezeGroup {
    /// The group's name, as `--freeze` takes it.
    pub name: String,
    /// Module-name prefixes it covers.
    pub modules: Vec<String>,
}

impl FreezeGroup {
    /// A group of the given modules.
    pub fn new(name: impl Into<String>, modules: &[&str]) -> Self {
        Self {
            name: name.into(),
            modules: modules.iter().map(|m| m.to_string()).collect(),
        }
    }
}

/// Outputs of a state dict's head tensor (its first dimension), or ImageNet's 1000.
pub fn head_outputs(sd: &StateDict, head_weight: &str) -> usize {
    sd.get(head_weight)
        .and_then(|t| t.shape.first().copied())
        .unwrap_or(1000)
}
