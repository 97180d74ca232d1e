//! Writing a network's weights for PyTorch: its state dict with torchvision's names and
//! buffers, serialised by [`crate::checkpoint::write`].

use std::path::Path;

use anyhow::Context;

use crate::checkpoint::write::safetensors_bytes;
use crate::checkpoint::write::{NamedTensor, Values, pth_bytes};
use crate::error::{Result, bail};
use crate::load::torch_tensors;
use crate::models::Model;
use crate::output::write_atomic;

/// The model's state dict as PyTorch names it, `num_batches_tracked` and the buffers that
/// follow from the architecture included (which `load_state_dict(strict=True)` expects).
pub fn state_dict(model: &Model) -> Vec<NamedTensor> {
    let mut out = Vec::new();
    for (name, shape, values) in torch_tensors(model) {
        let tracked = name
            .strip_suffix("running_var")
            .map(|p| format!("{p}num_batches_tracked"));
        out.push(NamedTensor {
            name,
            shape,
            values: Values::F32(values),
        });
        if let Some(name) = tracked {
            out.push(NamedTensor {
                name,
                shape: vec![],
                values: Values::I64(vec![0]),
            });
        }
    }
    out.extend(model.derived_buffers());
    out
}

/// Write the model's weights to `path`: `.pth` (zip) or `.safetensors`, by extension (ONNX
/// is [`crate::onnx::export_onnx`]).
pub fn export(model: &Model, path: &Path) -> Result<()> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("pth" | "pt") => {
            let bytes =
                pth_bytes(&state_dict(model)).with_context(|| path.display().to_string())?;
            Ok(write_atomic(path, &bytes)?)
        }
        Some("safetensors") => write_weights(path, model),
        Some("onnx") => bail!(
            "{}: an ONNX file carries its preprocessing and classes: write it with onnx::export_onnx",
            path.display()
        ),
        _ => bail!(
            "{}: choose the format by extension: .pth, .safetensors or .onnx",
            path.display()
        ),
    }
}

/// A model's weights with PyTorch's names, layouts and buffers, as safetensors.
pub fn write_weights(path: &Path, model: &Model) -> Result<()> {
    let bytes =
        safetensors_bytes(&state_dict(model)).with_context(|| format!("{}", path.display()))?;
    write_atomic(path, &bytes)
}
