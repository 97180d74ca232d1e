//! Writing result files so that a crash never leaves a half-written one: write a temporary
//! file beside the target, then rename it into place.

use std::io::Write;
use std::path::Path;

use anyhow::Context;

use crate::checkpoint::write::{NamedTensor, Values, safetensors_bytes};
use crate::error::Result;

/// Temporary files of [`write_atomic`] are named `.retrain-XXXXXX.tmp`, so that those a
/// kill left behind can be recognised and removed.
const TEMPORARY_PREFIX: &str = ".retrain-";

/// Is `path` a temporary file that [`write_atomic`] left behind?
pub fn is_temporary(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with(TEMPORARY_PREFIX) && n.ends_with(".tmp"))
}

/// A temporary file in `path`'s folder (removed when dropped), to rename over `path` once
/// it is complete.
pub fn temporary_beside(path: &Path) -> std::io::Result<tempfile::NamedTempFile> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    tempfile::Builder::new()
        .prefix(TEMPORARY_PREFIX)
        .suffix(".tmp")
        .tempfile_in(dir)
}

/// Write `bytes` to a temporary file beside `path`, flush it to disk, and rename it over
/// `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut tmp = temporary_beside(path).with_context(|| {
        format!(
            "{}: cannot create a temporary file beside it",
            path.display()
        )
    })?;
    tmp.write_all(bytes)
        .and_then(|_| tmp.as_file().sync_all())
        .with_context(|| format!("{}: cannot write", path.display()))?;
    tmp.persist(path).map_err(|e| {
        anyhow::anyhow!("{}: cannot rename into place: {}", path.display(), e.error)
    })?;
    Ok(())
}

/// Write named f32 tensors as a safetensors file.
pub fn write_safetensors(path: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)]) -> Result<()> {
    let named: Vec<NamedTensor> = tensors
        .iter()
        .map(|(name, shape, values)| NamedTensor {
            name: name.clone(),
            shape: shape.clone(),
            values: Values::F32(values.clone()),
        })
        .collect();
    let bytes = safetensors_bytes(&named).with_context(|| format!("{}", path.display()))?;
    write_atomic(path, &bytes)
}

/// Read `path` as JSON, naming the file in the error.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    Ok(serde_json::from_slice(&bytes).with_context(|| format!("{}: not valid", path.display()))?)
}

/// Write `value` to `path` as pretty-printed JSON, atomically (see [`write_atomic`]).
pub fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value)
        .with_context(|| format!("{}: cannot serialise", path.display()))?;
    text.push('\n');
    write_atomic(path, text.as_bytes())
}
