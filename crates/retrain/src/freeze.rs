//! Freezing: which tensors a `--freeze` spec names, applying it to a network (no gradient,
//! and BatchNorm in eval mode with its statistics fixed), and the audit that proves frozen
//! tensors came out bit-identical.

use std::collections::BTreeMap;

use burn::module::{Flag, Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::prelude::*;
use burn::store::{BurnToPyTorchAdapter, ModuleSnapshot, bridge};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Result, bail};
use crate::models::{Model, ModelSpec};
use crate::modules::named_modules;

/// What frozen BatchNorm layers do in training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FrozenBn {
    /// Normalise with the running statistics and never update them (default).
    Eval,
    /// Keep updating the running statistics, like PyTorch's `requires_grad=False` alone
    /// (fastai's `train_bn`); the affine parameters stay frozen.
    Train,
}

impl FrozenBn {
    /// Every value, for a command line's choices.
    pub const ALL: [FrozenBn; 2] = [FrozenBn::Eval, FrozenBn::Train];
}

/// A resolved freeze spec: module-name prefixes whose tensors are frozen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FreezeSet {
    /// The spec as given.
    pub spec: String,
    /// Module-name prefixes it resolved to.
    pub prefixes: Vec<String>,
}

impl FreezeSet {
    /// Nothing frozen.
    pub fn none() -> Self {
        Self {
            spec: "none".into(),
            prefixes: Vec::new(),
        }
    }

    /// Is the tensor or module `name` (PyTorch naming) frozen?
    pub fn contains(&self, name: &str) -> bool {
        self.prefixes
            .iter()
            .any(|p| name == p || name.starts_with(&format!("{p}.")))
    }

    /// Does it freeze every tensor outside the head?
    pub fn is_whole_backbone(&self, spec: &ModelSpec, model: &Model) -> bool {
        let head = head_modules(spec);
        model_tensor_names(model)
            .iter()
            .filter(|n| !head.iter().any(|h| n.starts_with(&format!("{h}."))))
            .all(|n| self.contains(n))
    }
}

fn head_modules(spec: &ModelSpec) -> Vec<String> {
    spec.head_tensors()
        .iter()
        .map(|t| t.rsplit_once('.').map_or(*t, |(m, _)| m).to_string())
        .collect()
}

fn model_tensor_names(model: &Model) -> Vec<String> {
    let torch_name = model.torch_namer();
    model
        .collect(None, Some(Box::new(BurnToPyTorchAdapter)), true)
        .into_iter()
        .map(|t| torch_name(&t.name))
        .collect()
}

/// Parse `--freeze`: `none`, `backbone` (all but the head), `partial` (the family's lower
/// part, as `compare` freezes it), or a comma list of the family's group names (`stem`,
/// `layer1`, `stage3`; see [`crate::models::Variant::freeze_groups`]), module-name prefixes
/// (`features.0,features.1`) and index ranges in a sequential container (`features.0-13`).
pub fn parse_spec(spec: &str, model_spec: &ModelSpec, model: &Model) -> Result<FreezeSet> {
    let groups = model_spec.family.freeze_groups();
    let partial;
    let spec_text = match spec.trim() {
        "partial" => {
            partial = model_spec.family.default_partial();
            partial.as_str()
        }
        other => other,
    };
    let modules = named_modules(model, "", &|_| false);
    let names: Vec<&str> = modules.iter().map(|m| m.name.as_str()).collect();
    let prefixes = match spec_text {
        "none" | "" => Vec::new(),
        "backbone" => {
            // Every module that holds tensors, except the head; the root module's own
            // tensors (a ViT's class token) by name.
            let head = head_modules(model_spec);
            modules
                .iter()
                .filter(|m| !m.params.is_empty() && !head.contains(&m.name))
                .flat_map(|m| match m.name.is_empty() {
                    true => m.params.iter().map(|p| p.name.clone()).collect(),
                    false => vec![m.name.clone()],
                })
                .collect()
        }
        list => {
            let mut out = Vec::new();
            for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                if let Some(group) = groups.iter().find(|g| g.name == item) {
                    out.extend(group.modules.iter().cloned());
                    continue;
                }
                for prefix in expand_range(item, &names)? {
                    if !names.contains(&prefix.as_str()) {
                        let top: Vec<&str> = modules
                            .iter()
                            .filter(|m| m.depth == 1)
                            .map(|m| m.name.as_str())
                            .collect();
                        let group_names: Vec<&str> =
                            groups.iter().map(|g| g.name.as_str()).collect();
                        bail!(
                            "--freeze: '{prefix}' names no module of {}; top-level modules: {}; groups: {}",
                            model_spec.arch,
                            top.join(", "),
                            group_names.join(", ")
                        );
                    }
                    out.push(prefix);
                }
            }
            out
        }
    };
    Ok(FreezeSet {
        spec: spec.to_string(),
        prefixes,
    })
}

/// `features.0-13` -> `features.0`, ..., `features.13`; anything else is itself. A range
/// must end at a module that exists (`names`), so its size is bounded by the model's.
fn expand_range(item: &str, names: &[&str]) -> anyhow::Result<Vec<String>> {
    let (base, last) = match item.rsplit_once('.') {
        Some((b, l)) => (format!("{b}."), l),
        None => (String::new(), item),
    };
    let Some((a, b)) = last.split_once('-') else {
        return Ok(vec![item.to_string()]);
    };
    let (Ok(a), Ok(b)) = (a.parse::<usize>(), b.parse::<usize>()) else {
        bail!("--freeze: '{item}' is not a range like features.0-13");
    };
    if a > b {
        bail!("--freeze: empty range '{item}'");
    }
    let last_index = names
        .iter()
        .filter_map(|n| n.strip_prefix(base.as_str())?.parse::<usize>().ok())
        .max();
    match last_index {
        Some(end) if b <= end => Ok((a..=b).map(|i| format!("{base}{i}")).collect()),
        Some(end) => bail!("--freeze: '{item}' goes past the last module, {base}{end}"),
        None => bail!("--freeze: '{item}': no numbered modules under '{base}'"),
    }
}

/// Sets gradients and BatchNorm/Dropout training flags by module path.
struct Freezer<'a> {
    path: TorchPath,
    set: &'a FreezeSet,
    frozen_bn: FrozenBn,
}

/// Where a module visitor is, by PyTorch name: burn's path with the enum levels (absent
/// from PyTorch's names) left out, mapped by the network's [`Model::torch_namer`].
struct TorchPath {
    segments: Vec<Option<String>>,
    torch_name: fn(&str) -> String,
}

impl TorchPath {
    fn new(model: &Model) -> Self {
        Self {
            segments: Vec::new(),
            torch_name: model.torch_namer(),
        }
    }

    fn enter(&mut self, name: &str, container_type: &str) {
        self.segments
            .push((!container_type.starts_with("Enum:")).then(|| name.to_string()));
    }

    fn exit(&mut self) {
        self.segments.pop();
    }

    /// PyTorch's name for the current path.
    fn name(&self) -> String {
        let path: Vec<&str> = self.segments.iter().flatten().map(String::as_str).collect();
        (self.torch_name)(&path.join("."))
    }
}

impl Freezer<'_> {
    fn frozen(&self) -> bool {
        self.set.contains(&self.path.name())
    }
}

impl ModuleMapper for Freezer<'_> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.enter(name, container_type);
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.exit();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        param.set_require_grad(!self.frozen())
    }

    fn map_flag(&mut self, flag: Param<Flag>) -> Param<Flag> {
        flag.with_value(!self.frozen() || self.frozen_bn == FrozenBn::Train)
    }
}

/// The ids of the parameters that `modules` covers (module-name prefixes or tensor names,
/// as a [`crate::models::FreezeGroup`] lists them) and `frozen` leaves trainable.
pub fn trainable_ids(model: &Model, modules: &[String], frozen: &FreezeSet) -> Vec<ParamId> {
    let mut collector = IdCollector {
        path: TorchPath::new(model),
        under: FreezeSet {
            spec: String::new(),
            prefixes: modules.to_vec(),
        },
        frozen,
        ids: Vec::new(),
    };
    model.visit(&mut collector);
    collector.ids
}

/// Collects parameter ids by PyTorch name (see [`trainable_ids`]).
struct IdCollector<'a> {
    path: TorchPath,
    under: FreezeSet,
    frozen: &'a FreezeSet,
    ids: Vec<ParamId>,
}

impl ModuleVisitor for IdCollector<'_> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.enter(name, container_type);
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.exit();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let name = self.path.name();
        if self.under.contains(&name) && !self.frozen.contains(&name) {
            self.ids.push(param.id);
        }
    }
}

/// Freeze what `set` names and make everything else trainable.
pub fn apply(model: Model, set: &FreezeSet, frozen_bn: FrozenBn) -> Model {
    let path = TorchPath::new(&model);
    model.map(&mut Freezer {
        path,
        set,
        frozen_bn,
    })
}

/// SHA-256 of every frozen tensor (parameters, and BatchNorm statistics unless they are
/// allowed to move), by PyTorch name.
pub fn checksums(model: &Model, set: &FreezeSet, frozen_bn: FrozenBn) -> BTreeMap<String, String> {
    let torch_name = model.torch_namer();
    model
        .valid()
        .collect(None, Some(Box::new(BurnToPyTorchAdapter)), true)
        .into_iter()
        .map(|t| (torch_name(&t.name), t))
        .filter(|(name, _)| set.contains(name))
        .filter(|(name, _)| frozen_bn == FrozenBn::Eval || !name.contains("running_"))
        .map(|(name, t)| {
            let data = bridge::into_data(t).expect("in-memory tensor");
            (name, format!("{:x}", Sha256::digest(data.as_bytes())))
        })
        .collect()
}

/// Names of tensors whose checksum changed.
pub fn audit(before: &BTreeMap<String, String>, after: &BTreeMap<String, String>) -> Vec<String> {
    before
        .iter()
        .filter(|(k, v)| after.get(*k) != Some(*v))
        .map(|(k, _)| k.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_expand_to_indices() {
        let names = [
            "features",
            "features.0",
            "features.1",
            "features.2",
            "features.3",
            "features.4",
        ];
        assert_eq!(
            expand_range("features.2-4", &names).unwrap(),
            ["features.2", "features.3", "features.4"]
        );
        assert_eq!(expand_range("layer1", &names).unwrap(), ["layer1"]);
        assert!(expand_range("features.4-2", &names).is_err());
        let huge = expand_range("features.0-18446744073709551615", &names).unwrap_err();
        assert!(
            huge.to_string()
                .contains("past the last module, features.4"),
            "{huge}"
        );
        assert!(expand_range("blocks.0-3", &names).is_err());
    }

    #[test]
    fn prefixes_match_whole_path_segments() {
        let set = FreezeSet {
            spec: "features.1".into(),
            prefixes: vec!["features.1".into()],
        };
        assert!(set.contains("features.1.conv.0.0.weight"));
        assert!(!set.contains("features.10.conv.0.0.weight"));
    }
}
