//! Putting a checkpoint into a network: resolve the architecture, resize the head to the
//! requested classes, load everything else, and say exactly what happened.

use std::fmt;
use std::path::Path;

use anyhow::Context;
use burn::prelude::*;
use burn::store::{BurnToPyTorchAdapter, ModuleSnapshot, PyTorchToBurnAdapter, bridge};
use serde::{Deserialize, Serialize};

use crate::checkpoint::{self, StateDict};
use crate::error::{Result, bail};
use crate::models::{Arch, Model, ModelSpec, describe, detect};

/// A head tensor whose shape changed: re-initialised instead of loaded.
#[derive(Debug, Clone, Serialize)]
pub struct HeadChange {
    /// PyTorch name of the tensor (`fc.weight`).
    pub name: String,
    /// Shape in the checkpoint; `None` when the checkpoint has no head.
    pub old_shape: Option<Vec<usize>>,
    /// Shape the network needs.
    pub new_shape: Vec<usize>,
}

/// What a load did, tensor by tensor.
#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    /// Path of the checkpoint file.
    pub checkpoint: String,
    /// The container it came in.
    pub format: checkpoint::Format,
    /// The network it was loaded into, as [`describe`] names it.
    pub architecture: String,
    /// Outputs of the network's head.
    pub num_classes: usize,
    /// PyTorch names of the tensors loaded.
    pub loaded: Vec<String>,
    /// Elements over all loaded tensors.
    pub num_loaded_values: usize,
    /// Head tensors the checkpoint lacks or holds in another shape; re-initialised.
    pub head_reinitialized: Vec<HeadChange>,
    /// Model tensors the checkpoint lacks (outside the head); left at random init.
    pub missing: Vec<String>,
    /// Checkpoint tensors the model has no place for.
    pub unexpected: Vec<String>,
    /// Outside the head, present in both but with different shapes; left at random init.
    pub shape_mismatch: Vec<HeadChange>,
    /// Buffers PyTorch keeps and retrain does not load: `num_batches_tracked`, and those
    /// that follow from the architecture (Swin's relative-position index).
    pub ignored_buffers: Vec<String>,
    /// Loaded tensors holding NaN or infinite values.
    pub non_finite: Vec<NonFinite>,
}

/// A tensor with NaN or infinite values, and how many of each.
#[derive(Debug, Clone, Serialize)]
pub struct NonFinite {
    /// PyTorch name of the tensor.
    pub name: String,
    /// How many of its values are NaN.
    pub nan: usize,
    /// How many are infinite.
    pub infinite: usize,
}

impl NonFinite {
    fn count(name: &str, values: &[f32]) -> Option<Self> {
        let nan = values.iter().filter(|v| v.is_nan()).count();
        let infinite = values.iter().filter(|v| v.is_infinite()).count();
        (nan + infinite > 0).then(|| Self {
            name: name.to_string(),
            nan,
            infinite,
        })
    }
}

impl LoadReport {
    fn is_clean(&self) -> bool {
        self.missing.is_empty() && self.unexpected.is_empty() && self.shape_mismatch.is_empty()
    }

    /// An error naming the tensors with NaN or infinite values, if there are any: a network
    /// with them gives NaN for every input.
    pub fn refuse_non_finite(&self) -> Result<()> {
        let Some(first) = self.non_finite.first() else {
            return Ok(());
        };
        bail!(
            "{}: {} tensor(s) hold NaN or infinite values, first {} ({} NaN, {} infinite); pass --allow-non-finite to use them anyway",
            self.checkpoint,
            self.non_finite.len(),
            first.name,
            first.nan,
            first.infinite
        )
    }
}

fn shape_str(s: &Option<Vec<usize>>) -> String {
    match s {
        Some(s) => format!("{s:?}"),
        None => "absent".to_string(),
    }
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "Loaded {} ({}) into {} with {} classes",
            self.checkpoint, self.format, self.architecture, self.num_classes
        )?;
        writeln!(
            f,
            "  loaded:              {} tensors ({} values)",
            self.loaded.len(),
            self.num_loaded_values
        )?;
        let list = |f: &mut fmt::Formatter<'_>, label: &str, items: &[String]| {
            if items.is_empty() {
                writeln!(f, "  {label:<21}none")
            } else {
                writeln!(f, "  {label:<21}{}", items.join(", "))
            }
        };
        let changes = |c: &[HeadChange]| -> Vec<String> {
            c.iter()
                .map(|h| {
                    format!(
                        "{} {} -> {:?}",
                        h.name,
                        shape_str(&h.old_shape),
                        h.new_shape
                    )
                })
                .collect()
        };
        list(
            f,
            "head re-initialised:",
            &changes(&self.head_reinitialized),
        )?;
        list(f, "missing:", &self.missing)?;
        list(f, "unexpected:", &self.unexpected)?;
        list(f, "shape mismatch:", &changes(&self.shape_mismatch))?;
        let ignored = if self.ignored_buffers.is_empty() {
            "none".to_string()
        } else {
            let mut kinds: Vec<&str> = self
                .ignored_buffers
                .iter()
                .map(|n| n.rsplit('.').next().unwrap_or(n))
                .collect();
            kinds.sort_unstable();
            kinds.dedup();
            format!("{} ({})", self.ignored_buffers.len(), kinds.join(", "))
        };
        writeln!(f, "  {:<21}{ignored}", "ignored buffers:")?;
        let non_finite: Vec<String> = self
            .non_finite
            .iter()
            .map(|t| format!("{} ({} NaN, {} infinite)", t.name, t.nan, t.infinite))
            .collect();
        let non_finite = if non_finite.is_empty() {
            "none".to_string()
        } else {
            non_finite.join(", ")
        };
        write!(f, "  {:<21}{non_finite}", "non-finite values:")
    }
}

/// A network with its weights, its spec and the report of how they were loaded.
pub struct Loaded {
    /// The network with the checkpoint's weights.
    pub model: Model,
    /// What it is: architecture, variant and number of classes.
    pub spec: ModelSpec,
    /// What the load did.
    pub report: LoadReport,
}

/// Options of a load, as the CLI passes them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LoadOptions {
    /// Architecture the checkpoint must be; detected from its keys when `None`.
    pub arch: Option<Arch>,
    /// Outputs of the new head; `None` keeps the checkpoint's.
    pub num_classes: Option<usize>,
    /// Dotted path of a state dict nested in the checkpoint (`--key`).
    pub key: Option<String>,
    /// Accept missing, unexpected or mismatched tensors outside the head.
    pub allow_partial: bool,
}

/// Read a checkpoint and build the network it fits, with the head resized to
/// `options.num_classes`.
pub fn load_pretrained(path: &Path, options: &LoadOptions, device: &Device) -> Result<Loaded> {
    let sd = checkpoint::read(path, options.key.as_deref())?;
    let detected = detect(&sd);
    let mut spec = match (options.arch, &detected) {
        (Some(arch), Some(found)) if found.arch != arch => bail!(
            "{}: this checkpoint looks like {}, not {arch}; pass --arch {} or leave --arch out",
            path.display(),
            describe(found),
            found.arch
        ),
        (_, Some(found)) => found.clone(),
        (Some(arch), None) => ModelSpec::new(arch, 1000),
        (None, None) => bail!(
            "{}: cannot tell the architecture from the checkpoint's keys; pass --arch (one of {})",
            path.display(),
            Arch::all()
                .iter()
                .map(|a| a.name())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    if let Some(n) = options.num_classes {
        spec.num_classes = n;
    }
    let mut model = spec.build(device);
    let report = apply_state_dict(&mut model, &spec, &sd, options.allow_partial)?;
    Ok(Loaded {
        model,
        spec,
        report,
    })
}

/// The model's tensors as PyTorch names them, with PyTorch's shapes.
pub fn torch_tensors(model: &Model) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let torch_name = model.torch_namer();
    model
        .valid()
        .collect(None, Some(Box::new(BurnToPyTorchAdapter)), true)
        .into_iter()
        .map(|t| {
            let name = torch_name(&t.name);
            let data = bridge::into_data(t).expect("in-memory tensor");
            let shape = data.shape().to_vec();
            let values = data.try_into_vec_as::<f32>().expect("float tensor");
            (name, shape, values)
        })
        .collect()
}

/// Copy matching tensors from `sd` into `model`, re-initialising the head where its shape
/// differs. Errors on any other mismatch unless `allow_partial`, and always when the
/// checkpoint fits almost nothing.
pub fn apply_state_dict(
    model: &mut Model,
    spec: &ModelSpec,
    sd: &StateDict,
    allow_partial: bool,
) -> Result<LoadReport> {
    let head = spec.head_tensors();
    let torch_name = model.torch_namer();
    // (PyTorch's name, shape, the model's own path for applying).
    let expected: Vec<(String, Vec<usize>, String)> = model
        .collect(None, Some(Box::new(BurnToPyTorchAdapter)), true)
        .into_iter()
        .map(|t| (torch_name(&t.name), t.shape.to_vec(), t.name.clone()))
        .collect();
    let mut report = LoadReport {
        checkpoint: sd.path.display().to_string(),
        format: sd.format,
        architecture: describe(spec),
        num_classes: spec.num_classes,
        loaded: Vec::new(),
        num_loaded_values: 0,
        head_reinitialized: Vec::new(),
        missing: Vec::new(),
        unexpected: Vec::new(),
        shape_mismatch: Vec::new(),
        ignored_buffers: Vec::new(),
        non_finite: Vec::new(),
    };
    let mut packs = Vec::new();
    for (name, shape, path) in &expected {
        let is_head = head.contains(&name.as_str());
        match sd.get(name) {
            Some(t) if &t.shape == shape => {
                packs.push(bridge::from_data(
                    TensorData::new(t.data.clone(), t.shape.clone()),
                    path.clone(),
                    None,
                ));
                report.num_loaded_values += t.data.len();
                report.loaded.push(name.clone());
                report.non_finite.extend(NonFinite::count(name, &t.data));
            }
            found => {
                let change = HeadChange {
                    name: name.clone(),
                    old_shape: found.map(|t| t.shape.clone()),
                    new_shape: shape.clone(),
                };
                if is_head {
                    report.head_reinitialized.push(change);
                } else if found.is_some() {
                    report.shape_mismatch.push(change);
                } else {
                    report.missing.push(name.clone());
                }
            }
        }
    }
    let derived: Vec<String> = model
        .derived_buffers()
        .into_iter()
        .map(|b| b.name)
        .collect();
    for name in sd.keys() {
        if expected.iter().any(|(n, ..)| n == name) {
            continue;
        }
        if name.ends_with("num_batches_tracked") || derived.iter().any(|d| d == name) {
            report.ignored_buffers.push(name.to_string());
        } else {
            report.unexpected.push(name.to_string());
        }
    }

    if report.loaded.len() * 2 < expected.len() {
        let hint = match detect(sd) {
            Some(found) => format!("it looks like {}", describe(&found)),
            None => "its keys match no supported architecture".to_string(),
        };
        bail!(
            "{}: the checkpoint fits almost nothing in {} ({} of {} tensors); {hint}",
            sd.path.display(),
            report.architecture,
            report.loaded.len(),
            expected.len()
        );
    }
    if !report.is_clean() && !allow_partial {
        bail!(
            "{}: the checkpoint does not match {} outside the head \
             ({} missing, {} unexpected, {} with other shapes; first: {}); \
             pass --allow-partial to load it anyway",
            sd.path.display(),
            report.architecture,
            report.missing.len(),
            report.unexpected.len(),
            report.shape_mismatch.len(),
            report
                .missing
                .iter()
                .chain(&report.unexpected)
                .chain(report.shape_mismatch.iter().map(|c| &c.name))
                .next()
                .map(String::as_str)
                .unwrap_or("")
        );
    }

    let result = model.apply(packs, None, Some(Box::new(PyTorchToBurnAdapter)), true);
    if !result.errors.is_empty() || result.applied.len() != report.loaded.len() {
        bail!(
            "{}: applying the weights failed ({} of {} applied): {}",
            sd.path.display(),
            result.applied.len(),
            report.loaded.len(),
            result
                .errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
    Ok(report)
}

/// Read the tensor `name` of a safetensors file as NCHW f32 input.
pub fn read_input(path: &Path, name: Option<&str>) -> Result<(Vec<f32>, [usize; 4])> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| anyhow::anyhow!("{}: not a safetensors file: {e}", path.display()))?;
    let names = st.names();
    let name = match name {
        Some(n) => n.to_string(),
        None if names.len() == 1 => names[0].to_string(),
        None if names.contains(&"input") => "input".to_string(),
        None => bail!(
            "{}: holds several tensors ({}); choose one with --input-tensor",
            path.display(),
            names.join(", ")
        ),
    };
    let view = st
        .tensor(&name)
        .map_err(|e| anyhow::anyhow!("{}: tensor '{name}': {e}", path.display()))?;
    if view.dtype() != safetensors::Dtype::F32 {
        bail!(
            "{}: tensor '{name}' is {:?}, expected F32",
            path.display(),
            view.dtype()
        );
    }
    let dims: [usize; 4] = view.shape().try_into().map_err(|_| {
        anyhow::anyhow!(
            "{}: tensor '{name}' has shape {:?}, expected NCHW",
            path.display(),
            view.shape()
        )
    })?;
    if dims[1] != 3 {
        bail!(
            "{}: tensor '{name}' has {} channels, expected 3",
            path.display(),
            dims[1]
        );
    }
    let sizes = crate::ranges::IMAGE_SIZES;
    if !(1..=4096).contains(&dims[0]) || !sizes.contains(&dims[2]) || !sizes.contains(&dims[3]) {
        bail!(
            "{}: tensor '{name}' has shape {dims:?}: expected 1 to 4096 images of {} to {} pixels a side",
            path.display(),
            sizes.start(),
            sizes.end()
        );
    }
    let data: Vec<f32> = view
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    if let Some(bad) = NonFinite::count(&name, &data) {
        bail!(
            "{}: tensor '{name}' holds {} NaN and {} infinite values",
            path.display(),
            bad.nan,
            bad.infinite
        );
    }
    Ok((data, dims))
}
