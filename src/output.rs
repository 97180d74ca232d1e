//! Writing result files so that a crash never leaves a half-written one: write a temporary
//! file beside the target, then rename it into place.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use anyhow::Context;

pub fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("{}: cannot create a temporary file", dir.display()))?;
    tmp.write_all(bytes)
        .and_then(|_| tmp.as_file().sync_all())
        .with_context(|| format!("{}: cannot write", path.display()))?;
    tmp.persist(path).map_err(|e| {
        anyhow::anyhow!("{}: cannot rename into place: {}", path.display(), e.error)
    })?;
    Ok(())
}

/// Write named f32 tensors as a safetensors file.
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, Vec<usize>, Vec<f32>)],
) -> anyhow::Result<()> {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, data)| data.iter().flat_map(|v| v.to_le_bytes()).collect())
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, shape, _), b)| {
            let view =
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), b)
                    .expect("shape matches data");
            (name.clone(), view)
        })
        .collect();
    let serialized = safetensors::serialize(views, None::<HashMap<String, String>>)
        .with_context(|| format!("{}: cannot serialize", path.display()))?;
    write_atomic(path, &serialized)
}
