//! Writing result files so that a crash never leaves a half-written one: write a temporary
//! file beside the target, then rename it into place.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use anyhow::Context;
use safetensors::Dtype;
use safetensors::tensor::TensorView;

use crate::load::torch_tensors;
use crate::models::Model;

/// Temporary files of [`write_atomic`] are named `.retrain-XXXXXX.tmp`, so that those a
/// kill left behind can be recognised and removed.
const TEMPORARY_PREFIX: &str = ".retrain-";

/// Is `path` a temporary file that [`write_atomic`] left behind?
pub fn is_temporary(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with(TEMPORARY_PREFIX) && n.ends_with(".tmp"))
}

/// Write `bytes` to a temporary file beside `path`, flush it to disk, and rename it over
/// `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(TEMPORARY_PREFIX)
        .suffix(".tmp")
        .tempfile_in(dir)
        .with_context(|| format!("{}: cannot create a temporary file", dir.display()))?;
    tmp.write_all(bytes)
        .and_then(|_| tmp.as_file().sync_all())
        .with_context(|| format!("{}: cannot write", path.display()))?;
    tmp.persist(path).map_err(|e| {
        anyhow::anyhow!("{}: cannot rename into place: {}", path.display(), e.error)
    })?;
    Ok(())
}

/// A tensor to write: name, dtype, shape, little-endian bytes.
type RawTensor = (String, Dtype, Vec<usize>, Vec<u8>);

fn serialize_safetensors(path: &Path, tensors: &[RawTensor]) -> anyhow::Result<Vec<u8>> {
    let views = tensors
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            TensorView::new(*dtype, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .with_context(|| format!("{}: tensor {name}", path.display()))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    safetensors::serialize(views, None::<HashMap<String, String>>)
        .with_context(|| format!("{}: cannot serialize", path.display()))
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Write named f32 tensors as a safetensors file.
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, Vec<usize>, Vec<f32>)],
) -> anyhow::Result<()> {
    let raw: Vec<RawTensor> = tensors
        .iter()
        .map(|(n, s, v)| (n.clone(), Dtype::F32, s.clone(), f32_bytes(v)))
        .collect();
    write_atomic(path, &serialize_safetensors(path, &raw)?)
}

/// A model's weights with PyTorch's names, layouts and buffers (including the int64
/// `num_batches_tracked` that `load_state_dict(strict=True)` expects), as safetensors.
pub fn write_weights(path: &Path, model: &Model) -> anyhow::Result<()> {
    let mut raw: Vec<RawTensor> = Vec::new();
    for (name, shape, values) in torch_tensors(model) {
        let tracked = name
            .strip_suffix("running_var")
            .map(|prefix| format!("{prefix}num_batches_tracked"));
        raw.push((name, Dtype::F32, shape, f32_bytes(&values)));
        if let Some(tracked) = tracked {
            raw.push((tracked, Dtype::I64, vec![], 0i64.to_le_bytes().to_vec()));
        }
    }
    write_atomic(path, &serialize_safetensors(path, &raw)?)
}

pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> anyhow::Result<T> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("{}: not valid", path.display()))
}

pub fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> anyhow::Result<()> {
    let mut text = serde_json::to_string_pretty(value)?;
    text.push('\n');
    write_atomic(path, text.as_bytes())
}
