//! The `print(net)` / `named_modules()` view: every module with its PyTorch name, type,
//! parameters (PyTorch shapes) and counts.

use std::fmt::Write as _;

use burn::module::{Module, ModuleVisitor, Param};
use burn::prelude::*;
use serde::Serialize;

use crate::models::Model;

/// One parameter or buffer of a module, as `named_parameters()` / `named_buffers()` show it.
#[derive(Debug, Clone, Serialize)]
pub struct ParamInfo {
    /// Full PyTorch name (`features.0.1.weight`).
    pub name: String,
    /// Shape as PyTorch stores it (a `Linear` weight is `[out, in]`).
    pub shape: Vec<usize>,
    /// Number of elements.
    pub numel: usize,
    /// False for buffers (BatchNorm running statistics) and frozen parameters.
    pub trainable: bool,
    /// A buffer (`named_buffers()`), not a parameter.
    pub buffer: bool,
}

/// One module of the tree, as `named_modules()` lists it.
#[derive(Debug, Clone, Serialize)]
pub struct ModuleInfo {
    /// PyTorch module name; empty for the root.
    pub name: String,
    /// PyTorch class name (`Conv2d`, `BatchNorm2d`, `InvertedResidual`, ...).
    #[serde(rename = "type")]
    pub kind: String,
    /// Nesting depth: 0 for the root, 1 for its children, ...
    pub depth: usize,
    /// Parameters and buffers held directly by this module.
    pub params: Vec<ParamInfo>,
    /// Parameter count including submodules (buffers excluded, as `numel` over `parameters()`).
    pub num_params: usize,
}

/// Collects the module tree from burn's visitor callbacks. burn reports the *parent's* type
/// with each child it enters, and wraps enum payloads in a variant level that PyTorch names
/// lack, so the visitor keeps a stack and fixes both up.
struct TreeBuilder<'a> {
    modules: Vec<ModuleInfo>,
    /// Index into `modules`, or `None` for a level PyTorch does not name (enum variant).
    stack: Vec<Option<usize>>,
    is_frozen: &'a dyn Fn(&str) -> bool,
    /// The network's map from its paths to PyTorch's names.
    torch_name: fn(&str) -> String,
}

impl TreeBuilder<'_> {
    fn current(&self) -> usize {
        self.stack.iter().rev().find_map(|s| *s).unwrap_or(0)
    }
}

/// burn's type names where PyTorch's differ.
fn torch_type(burn_type: &str) -> &str {
    match burn_type {
        "BatchNorm" => "BatchNorm2d",
        "Relu" => "ReLU",
        "Relu6" => "ReLU6",
        other => other,
    }
}

/// PyTorch's name for a burn parameter field.
fn torch_param_name(kind: &str, field: &str) -> String {
    match (kind, field) {
        ("BatchNorm2d" | "LayerNorm" | "LayerNorm2d", "gamma") => "weight".to_string(),
        ("BatchNorm2d" | "LayerNorm" | "LayerNorm2d", "beta") => "bias".to_string(),
        _ => field.to_string(),
    }
}

impl ModuleVisitor for TreeBuilder<'_> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        let parent = self.current();
        let kind = &mut self.modules[parent].kind;
        if container_type.starts_with("Enum:") {
            // Enum variants are named after the PyTorch class they stand for.
            *kind = name.to_string();
            self.stack.push(None);
            return;
        }
        if kind.is_empty() {
            *kind = match container_type.strip_prefix("Struct:") {
                Some(t) => torch_type(t).to_string(),
                None => "Sequential".to_string(),
            };
        }
        let full = if self.modules[parent].name.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.modules[parent].name)
        };
        self.modules.push(ModuleInfo {
            name: full,
            kind: String::new(),
            depth: self.modules[parent].depth + 1,
            params: Vec::new(),
            num_params: 0,
        });
        self.stack.push(Some(self.modules.len() - 1));
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        // A field entered that held nothing (an absent `Option`, like a conv without bias)
        // is not a module.
        if let Some(Some(i)) = self.stack.pop()
            && i == self.modules.len() - 1
            && self.modules[i].kind.is_empty()
            && self.modules[i].params.is_empty()
        {
            self.modules.pop();
        }
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        // A parameter is entered like a module (its field name); fold it into its owner.
        let Some(Some(leaf)) = self.stack.last().copied() else {
            return;
        };
        let info = self.modules.remove(leaf);
        let field = info.name.rsplit('.').next().unwrap_or_default().to_string();
        *self.stack.last_mut().expect("leaf on stack") = None;
        let owner = self.current();
        let kind = self.modules[owner].kind.clone();
        let mut shape = param.lazy_shape().to_vec();
        if kind == "Linear" && field == "weight" {
            shape.reverse(); // burn stores [in, out], PyTorch [out, in]
        }
        let is_buffer = field.starts_with("running_");
        let name = format!(
            "{}{}",
            info.name.strip_suffix(&field).unwrap_or(&info.name),
            torch_param_name(&kind, &field)
        );
        let trainable = !is_buffer && !(self.is_frozen)(&(self.torch_name)(&name));
        self.modules[owner].params.push(ParamInfo {
            numel: shape.iter().product(),
            shape,
            name,
            trainable,
            buffer: is_buffer,
        });
    }

    fn visit_flag(&mut self, _flag: &Param<burn::module::Flag>) {
        // Training flags are not PyTorch modules or tensors.
        if let Some(Some(leaf)) = self.stack.last().copied() {
            self.modules.remove(leaf);
            *self.stack.last_mut().expect("flag on stack") = None;
        }
    }
}

/// Every module of `model` in PyTorch's `named_modules()` order.
pub fn named_modules(
    model: &Model,
    root: &str,
    is_frozen: &dyn Fn(&str) -> bool,
) -> Vec<ModuleInfo> {
    let mut builder = TreeBuilder {
        modules: vec![ModuleInfo {
            name: String::new(),
            kind: root.to_string(),
            depth: 0,
            params: Vec::new(),
            num_params: 0,
        }],
        stack: Vec::new(),
        is_frozen,
        torch_name: model.torch_namer(),
    };
    model.visit(&mut builder);
    let mut modules = builder.modules;
    modules[0].kind = root.to_string();
    let torch_name = model.torch_namer();
    for m in &mut modules {
        m.name = torch_name(&m.name);
        m.params
            .iter_mut()
            .for_each(|p| p.name = torch_name(&p.name));
    }
    for b in model.derived_buffers() {
        let owner = b.name.rsplit_once('.').map_or("", |(m, _)| m);
        if let Some(m) = modules.iter_mut().find(|m| m.name == owner) {
            m.params.push(ParamInfo {
                numel: b.shape.iter().product(),
                shape: b.shape,
                name: b.name,
                trainable: false,
                buffer: true,
            });
        }
    }
    // Parameter totals per subtree (buffers excluded, as PyTorch's parameters()).
    let own: Vec<usize> = modules
        .iter()
        .map(|m| m.params.iter().filter(|p| !p.buffer).map(|p| p.numel).sum())
        .collect();
    for i in 0..modules.len() {
        let prefix = format!("{}.", modules[i].name);
        let below: usize = modules
            .iter()
            .zip(&own)
            .filter(|(m, _)| modules[i].name.is_empty() || m.name.starts_with(&prefix))
            .map(|(_, n)| n)
            .sum();
        modules[i].num_params = if modules[i].name.is_empty() {
            own.iter().sum()
        } else {
            below + own[i]
        };
    }
    modules
}

/// The indented text view.
pub fn render(modules: &[ModuleInfo]) -> String {
    let mut out = String::new();
    let (total, trainable) = modules
        .iter()
        .flat_map(|m| &m.params)
        .filter(|p| !p.buffer)
        .fold((0, 0), |(t, tr), p| {
            (t + p.numel, tr + if p.trainable { p.numel } else { 0 })
        });
    for m in modules {
        let indent = "  ".repeat(m.depth);
        let name = if m.name.is_empty() { "(root)" } else { &m.name };
        let _ = writeln!(
            out,
            "{indent}{name}  {}  [{} params]",
            m.kind,
            group(m.num_params)
        );
        for p in &m.params {
            let flag = if p.buffer {
                "buffer"
            } else if p.trainable {
                "trainable"
            } else {
                "frozen"
            };
            let _ = writeln!(
                out,
                "{indent}    .{} {:?} {} {flag}",
                p.name.rsplit('.').next().unwrap_or(&p.name),
                p.shape,
                group(p.numel)
            );
        }
    }
    let _ = writeln!(
        out,
        "Total params: {}; trainable: {}; frozen: {}",
        group(total),
        group(trainable),
        group(total - trainable)
    );
    out
}

/// 1234567 -> "1,234,567".
pub fn group(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}
