//! The supported networks, one file per family, each implementing [`Family`] (timm's
//! surface), and the registry that lists them. Adding a family is a new file and one line
//! in the `registry!` invocation below.

pub mod batch_norm;
pub mod convnext;
pub mod efficientnet;
pub mod efficientnet_lite;
pub mod family;
pub mod layers;
pub mod mobilenet_v2;
pub mod mobilenet_v3;
pub mod onnx_graph;
pub mod regnet;
pub mod resnet;
pub mod swin;
pub mod vit;
pub mod weights;

use std::fmt;

use burn::module::Module;
use burn::nn::Linear;
use burn::prelude::*;
use serde::{Deserialize, Serialize};

pub use family::{Architecture, Detected, Family, FreezeGroup};

use crate::checkpoint::StateDict;
use crate::checkpoint::write::NamedTensor;
use crate::error::Result;
use crate::preprocess::Preprocess;
use onnx_graph::{Graph, Value};
use weights::Weights;

/// Generates, from one line per family, the [`Model`] enum of networks, the [`Variant`]
/// enum of their variants, and the dispatch from both to the family's [`Family`] impl.
macro_rules! registry {
    ($($name:ident => $family:ty),+ $(,)?) => {
        /// Any supported network.
        // A network is built once and moved rarely; boxing the variants buys nothing.
        #[allow(clippy::large_enum_variant)]
        #[derive(Module, Debug)]
        pub enum Model {
            $(
                #[allow(missing_docs)]
                $name($family),
            )+
        }

        /// A family and its variant: what `config.json` records to rebuild a network.
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        #[serde(tag = "family", rename_all = "snake_case")]
        pub enum Variant {
            $(
                #[allow(missing_docs)]
                $name(<$family as Family>::Variant),
            )+
        }

        /// Every registered architecture, family by family in registry order.
        pub fn architectures() -> Vec<ArchInfo> {
            let mut all = Vec::new();
            $(
                for a in <$family as Family>::ARCHITECTURES {
                    all.push(ArchInfo {
                        name: a.name,
                        variant: Variant::$name(a.variant.clone()),
                        weights: a.weights,
                        torch_class: <$family as Family>::TORCH_CLASS,
                    });
                }
            )+
            all
        }

        /// Recognise a checkpoint's architecture from its keys and shapes.
        pub fn detect(sd: &StateDict) -> Option<ModelSpec> {
            $(
                if let Some(d) = <$family as Family>::detect(sd) {
                    return Some(ModelSpec {
                        arch: Arch::named(d.arch)?,
                        family: Variant::$name(d.variant),
                        num_classes: d.num_classes,
                    });
                }
            )+
            None
        }

        impl Variant {
            /// A new network of this variant.
            pub fn build(&self, num_classes: usize, device: &Device) -> Model {
                match self {
                    $(Variant::$name(v) => Model::$name(<$family>::build(v, num_classes, device)),)+
                }
            }

            /// The PyTorch class of the root module.
            pub fn torch_class(&self) -> &'static str {
                match self {
                    $(Variant::$name(_) => <$family as Family>::TORCH_CLASS,)+
                }
            }

            /// State-dict names of the classifier's weight and bias.
            pub fn head_tensors(&self) -> [&'static str; 2] {
                match self {
                    $(Variant::$name(_) => <$family as Family>::HEAD,)+
                }
            }

            /// Width of the pooled features that enter the head.
            pub fn feature_dim(&self) -> usize {
                match self {
                    $(Variant::$name(v) => <$family>::feature_dim(v),)+
                }
            }

            /// The family's named module groups, input to output.
            pub fn freeze_groups(&self) -> Vec<FreezeGroup> {
                match self {
                    $(Variant::$name(v) => <$family>::freeze_groups(v),)+
                }
            }

            /// The `--freeze` spec of `compare`'s `partial` regime.
            pub fn default_partial(&self) -> String {
                match self {
                    $(Variant::$name(v) => <$family>::default_partial(v),)+
                }
            }

            /// The image size the network is made for, where it has one.
            pub fn image_size(&self) -> Option<usize> {
                match self {
                    $(Variant::$name(v) => <$family>::image_size(v),)+
                }
            }

            /// The width as `--width` takes it.
            pub fn width(&self) -> Option<f64> {
                match self {
                    $(Variant::$name(v) => <$family>::width(v),)+
                }
            }

            /// The same variant at another width.
            pub fn with_width(&self, width: f64) -> Variant {
                match self {
                    $(Variant::$name(v) => Variant::$name(<$family>::with_width(v, width)),)+
                }
            }

            /// What sets it apart from its architecture's standard variant.
            pub fn distinction(&self) -> Option<String> {
                match self {
                    $(Variant::$name(v) => <$family>::distinction(v),)+
                }
            }
        }

        impl Model {
            /// Maps a burn path of this network to PyTorch's name for it (see
            /// [`Family::torch_name`]); a plain function, for visitors that consume the model.
            pub fn torch_namer(&self) -> fn(&str) -> String {
                match self {
                    $(Model::$name(_) => <$family as Family>::torch_name,)+
                }
            }

            /// The classifier's Linear layer (the head that `--num-classes` replaces).
            pub fn head(&self) -> &Linear {
                match self {
                    $(Model::$name(m) => m.head(),)+
                }
            }

            /// Replace the head by a new one with `num_classes` outputs (timm's
            /// `reset_classifier`).
            pub fn reset_classifier(&mut self, num_classes: usize, device: &Device) {
                match self {
                    $(Model::$name(m) => m.reset_classifier(num_classes, device),)+
                }
            }

            /// Feature maps before pooling, `[N, D, h, w]`.
            pub fn forward_features(&self, x: Tensor<4>) -> Tensor<4> {
                match self {
                    $(Model::$name(m) => m.forward_features(x),)+
                }
            }

            /// The pooled embedding `[N, D]` that enters the head.
            pub fn embed(&self, x: Tensor<4>) -> Tensor<2> {
                match self {
                    $(Model::$name(m) => m.embed(x),)+
                }
            }

            /// Classifier on pooled features: logits `[N, classes]`.
            pub fn forward_head(&self, pooled: Tensor<2>) -> Tensor<2> {
                match self {
                    $(Model::$name(m) => m.forward_head(pooled),)+
                }
            }

            fn fold_batchnorm(&mut self) {
                match self {
                    $(Model::$name(m) => m.fold_batchnorm(),)+
                }
            }

            /// The buffers that follow from the architecture (see [`Family::derived_buffers`]).
            pub fn derived_buffers(&self) -> Vec<NamedTensor> {
                match self {
                    $(Model::$name(m) => m.derived_buffers(),)+
                }
            }

            /// The eval-mode network in an ONNX graph: the logits of `x` (see
            /// [`Family::onnx`]; [`crate::onnx::export_onnx`] folds BatchNorm first).
            pub fn onnx(&self, g: &mut Graph, x: &Value) -> Result<Value> {
                match self {
                    $(Model::$name(m) => m.onnx(g, x),)+
                }
            }
        }
    };
}

registry! {
    MobileNetV2 => mobilenet_v2::MobileNetV2,
    ResNet => resnet::ResNet,
    MobileNetV3 => mobilenet_v3::MobileNetV3,
    EfficientNet => efficientnet::EfficientNet,
    ConvNeXt => convnext::ConvNeXt,
    RegNet => regnet::RegNet,
    VisionTransformer => vit::VisionTransformer,
    SwinTransformer => swin::SwinTransformer,
    EfficientNetLite => efficientnet_lite::EfficientNetLite,
}

impl Model {
    /// An eval-mode copy for inference, BatchNorm folded into the convolutions. Not for
    /// training or saving: the BatchNorm layers of the copy are identities.
    pub fn for_inference(&self) -> Model {
        let mut model = self.valid();
        model.fold_batchnorm();
        model
    }

    /// Eval-mode logits `[N, classes]` of an NCHW batch.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        self.forward_head(self.embed(x))
    }
}

/// A registered architecture: its name, standard variant, weights and PyTorch class.
#[derive(Debug, Clone)]
pub struct ArchInfo {
    /// The name users type (`resnet50`).
    pub name: &'static str,
    /// Its standard variant.
    pub variant: Variant,
    /// Its registered weights, torchvision's `DEFAULT` first.
    pub weights: &'static [Weights],
    /// The PyTorch class of its root module.
    pub torch_class: &'static str,
}

/// A registered architecture's name (`--arch`); only names in the registry exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Arch(&'static str);

impl Arch {
    /// The registered architecture called `name`.
    pub fn named(name: &str) -> Option<Arch> {
        architectures()
            .into_iter()
            .find(|a| a.name == name)
            .map(|a| Arch(a.name))
    }

    /// Every registered architecture.
    pub fn all() -> Vec<Arch> {
        architectures().into_iter().map(|a| Arch(a.name)).collect()
    }

    /// Its name.
    pub fn name(self) -> &'static str {
        self.0
    }

    /// Its registry entry.
    pub fn info(self) -> ArchInfo {
        architectures()
            .into_iter()
            .find(|a| a.name == self.0)
            .expect("an Arch is registered")
    }

    /// Its pretrained weights, `DEFAULT` first.
    pub fn weights(self) -> &'static [Weights] {
        self.info().weights
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl std::str::FromStr for Arch {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, String> {
        Arch::named(name).ok_or_else(|| {
            let known: Vec<&str> = Arch::all().into_iter().map(Arch::name).collect();
            format!("unknown architecture '{name}'; known: {}", known.join(", "))
        })
    }
}

impl Serialize for Arch {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.0)
    }
}

impl<'de> Deserialize<'de> for Arch {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        name.parse().map_err(serde::de::Error::custom)
    }
}

/// A buildable network: architecture, family variant and number of classes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    /// The architecture.
    pub arch: Arch,
    /// Its family and the variant (width, depths) it is built with.
    pub family: Variant,
    /// Outputs of the head.
    pub num_classes: usize,
}

/// timm's `pretrained_cfg`: what a user of the weights needs to know.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PretrainedConfig {
    /// The architecture.
    pub architecture: Arch,
    /// The weights' `ARCH.TAG` name, when they are registered ones.
    #[serde(default)]
    pub weights: Option<String>,
    /// How inputs are prepared for these weights.
    pub preprocess: Preprocess,
    /// State-dict names of the classifier's tensors (replaced for a new class count).
    pub head: Vec<String>,
    /// Width of the pooled features that enter the head.
    pub feature_dim: usize,
    /// Outputs of the head.
    pub num_classes: usize,
    /// Class names, where known (ImageNet for 1000-class checkpoints).
    pub class_names: Option<Vec<String>>,
}

/// The 1000 ImageNet class names in torchvision's order.
pub fn imagenet_classes() -> Vec<String> {
    include_str!("imagenet_classes.txt")
        .lines()
        .map(str::to_string)
        .collect()
}

impl ModelSpec {
    /// The standard variant of `arch` with `num_classes` outputs.
    pub fn new(arch: Arch, num_classes: usize) -> Self {
        Self {
            arch,
            family: arch.info().variant,
            num_classes,
        }
    }

    /// The width as `--width` takes it: mobilenet_v2's multiplier, a ResNet's base width / 64.
    pub fn width(&self) -> Option<f64> {
        self.family.width()
    }

    /// The same network at another width (no effect on families without one).
    pub fn with_width(mut self, width: f64) -> Self {
        self.family = self.family.with_width(width);
        self
    }

    /// State-dict names of the classifier's weight and bias.
    pub fn head_tensors(&self) -> [&'static str; 2] {
        self.family.head_tensors()
    }

    /// Width of the pooled features that enter the head.
    pub fn feature_dim(&self) -> usize {
        self.family.feature_dim()
    }

    /// The configuration of `weights` (or, for weights that are not registered, of the
    /// architecture's first registered weights: torchvision's recipe for its family).
    pub fn pretrained_config(&self, weights: Option<&Weights>) -> PretrainedConfig {
        let mut preprocess = weights
            .or(self.arch.weights().first())
            .map_or(Preprocess::IMAGENET, |w| w.preprocess.clone());
        if let (None, Some(size)) = (weights, self.family.image_size()) {
            preprocess = preprocess.for_input_size(size);
        }
        PretrainedConfig {
            architecture: self.arch,
            weights: weights.map(|w| w.name()),
            preprocess,
            head: self.head_tensors().iter().map(|s| s.to_string()).collect(),
            feature_dim: self.feature_dim(),
            num_classes: self.num_classes,
            class_names: (self.num_classes == 1000).then(imagenet_classes),
        }
    }

    /// A new network of this spec.
    pub fn build(&self, device: &Device) -> Model {
        self.family.build(self.num_classes, device)
    }

    /// The PyTorch class of the root module, for the module view.
    pub fn torch_class(&self) -> &'static str {
        self.family.torch_class()
    }
}

/// A tensor's values as f32, row-major.
pub fn to_vec<const D: usize>(t: Tensor<D>) -> Result<Vec<f32>> {
    Ok(t.try_into_vec_as::<f32>()
        .map_err(|e| anyhow::anyhow!("reading a tensor back: {e:?}"))?)
}

/// Describe a spec for messages: `mobilenet_v2 (width 0.25)`.
pub fn describe(spec: &ModelSpec) -> String {
    match spec.family.distinction() {
        Some(d) => format!("{} ({d})", spec.arch),
        None => spec.arch.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::freeze::parse_spec;
    use crate::modules::named_modules;

    /// Every registered architecture builds, runs, resets its head, and describes its
    /// freeze groups, head and default partial in names its module tree has (at a quarter
    /// width where the family has one: the names are the same, the test much faster).
    #[test]
    fn every_registered_architecture_meets_the_family_interface() {
        let device = Device::flex();
        for arch in Arch::all() {
            let spec = ModelSpec::new(arch, 5).with_width(0.25);
            assert_eq!(arch.name().parse::<Arch>(), Ok(arch));
            assert!(arch.weights().iter().filter(|w| w.is_default).count() == 1);
            let mut model = spec.build(&device);
            let x = Tensor::<4>::zeros([1, 3, 64, 64], &device);
            assert_eq!(model.forward(x.clone()).dims(), [1, 5], "{arch}");
            assert_eq!(model.embed(x.clone()).dims(), [1, spec.feature_dim()]);
            model.reset_classifier(3, &device);
            assert_eq!(model.forward(x).dims(), [1, 3], "{arch}: reset_classifier");

            let modules = named_modules(&model, spec.torch_class(), &|_| false);
            assert_eq!(modules[0].kind, spec.torch_class());
            let names: Vec<&str> = modules.iter().map(|m| m.name.as_str()).collect();
            let tensors: Vec<String> = modules
                .iter()
                .flat_map(|m| m.params.iter().map(|p| p.name.clone()))
                .collect();
            for head in spec.head_tensors() {
                assert!(tensors.iter().any(|t| t == head), "{arch}: {head}");
            }
            let groups = spec.family.freeze_groups();
            for module in groups.iter().flat_map(|g| &g.modules) {
                assert!(
                    names.contains(&module.as_str()) || tensors.contains(module),
                    "{arch}: group module {module}"
                );
            }
            let covered = |t: &String| {
                groups
                    .iter()
                    .flat_map(|g| &g.modules)
                    .any(|m| t == m || t.starts_with(&format!("{m}.")))
            };
            assert!(
                tensors.iter().all(covered),
                "{arch}: the groups cover every tensor"
            );
            assert_eq!(groups.last().map(|g| g.name.as_str()), Some("head"));
            let partial = parse_spec("partial", &spec, &model).unwrap();
            let stem = parse_spec("stem", &spec, &model).unwrap();
            assert!(!stem.prefixes.is_empty() && stem.prefixes.len() < partial.prefixes.len());
        }
    }

    /// A state dict written from any registered network (narrowed where the family has a
    /// width) is recognised as that network again. Where narrowing makes two architectures
    /// identical (EfficientNet-B1 and B2 differ only in width), the one detected must write
    /// the same tensors, and at full width the architecture itself is detected.
    #[test]
    fn every_architecture_is_detected_from_its_own_state_dict() {
        let device = Device::flex();
        let dir = tempfile::tempdir().unwrap();
        let state_dict = |spec: &ModelSpec| {
            let path = dir.path().join(format!("{}.pth", spec.arch));
            crate::export::export(&spec.build(&device), &path).unwrap();
            crate::checkpoint::read(&path, None).unwrap()
        };
        let layout = |sd: &StateDict| -> Vec<(String, Vec<usize>)> {
            let mut l: Vec<_> = sd
                .iter()
                .map(|(k, t)| (k.to_string(), t.shape.clone()))
                .collect();
            l.sort();
            l
        };
        for arch in Arch::all() {
            let spec = ModelSpec::new(arch, 7).with_width(0.125);
            let sd = state_dict(&spec);
            let found = detect(&sd).unwrap_or_else(|| panic!("{arch} not detected"));
            if found != spec {
                assert_eq!(
                    layout(&state_dict(&found)),
                    layout(&sd),
                    "{arch}: {found:?}"
                );
                let full = ModelSpec::new(arch, 7);
                assert_eq!(
                    detect(&state_dict(&full)),
                    Some(full),
                    "{arch} at full width"
                );
            }
        }
    }

    #[test]
    fn an_unknown_architecture_lists_the_known_ones() {
        let err = "resnet51".parse::<Arch>().unwrap_err();
        assert!(err.contains("resnet51") && err.contains("known: mobilenet_v2, resnet18"));
        assert!(serde_json::from_str::<Arch>("\"resnet51\"").is_err());
        let spec = ModelSpec::new(Arch::named("mobilenet_v2").unwrap(), 10).with_width(0.5);
        let json = serde_json::to_string(&spec).unwrap();
        assert!(
            json.contains(r#""family":{"family":"mobile_net_v2","width":0.5}"#),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<ModelSpec>(&json).unwrap(), spec);
        assert_eq!(describe(&spec), "mobilenet_v2 (width 0.5)");
    }
}
