//! Checkpoint files: PyTorch `.pth` (zip and legacy containers) and `.safetensors`,
//! read into a flat [`StateDict`] of f32 tensors keyed by PyTorch names.
//!
//! Reading a checkpoint never executes code: `.pth` pickles are interpreted by the
//! `pytorch-reader` crate, which only understands the calls PyTorch uses to rebuild tensors
//! and honours stored strides and storage offsets. Before it runs, [`crate::pickle_scan`]
//! refuses any pickle that names a global outside the allowlist of
//! `torch.load(weights_only=True)`. [`mod@write`] serialises state dicts the other way.

#![warn(missing_docs)]

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use pytorch_reader::{DType, FileFormat, PickleValue, PytorchReader};

pub mod pickle_scan;
pub mod write;

/// A bad checkpoint: the file and what is wrong with it, printed on one line.
#[derive(Debug, thiserror::Error)]
#[error("{}: {problem}", path.display())]
pub struct CheckpointError {
    /// The checkpoint file.
    pub path: PathBuf,
    /// What is wrong with it, as a phrase that follows the path.
    pub problem: String,
}

impl CheckpointError {
    /// An error about the file at `path`.
    pub fn new(path: &Path, problem: impl Into<String>) -> Self {
        Self {
            path: path.to_path_buf(),
            problem: problem.into(),
        }
    }
}

/// The container a checkpoint came in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// `torch.save` since PyTorch 1.6: a zip archive with `data.pkl` and one entry per storage.
    Zip,
    /// `torch.save(..., _use_new_zipfile_serialization=False)` and PyTorch before 1.6.
    Legacy,
    /// A `.safetensors` file: a JSON header, then the raw tensor bytes.
    Safetensors,
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Zip => "zip",
            Format::Legacy => "legacy",
            Format::Safetensors => "safetensors",
        })
    }
}

/// One tensor of a checkpoint, converted to f32 in logical row-major order.
#[derive(Debug, Clone)]
pub struct StoredTensor {
    /// The dtype as stored (`float32`, `float16`, `int64`, ...), for reports.
    pub dtype: &'static str,
    /// Dimensions, outermost first, as `tensor.shape` in PyTorch.
    pub shape: Vec<usize>,
    /// The elements in row-major order; empty when read by [`read_layout`].
    pub data: Vec<f32>,
}

impl StoredTensor {
    /// The number of elements, the product of the shape (`numel()`).
    pub fn num_elements(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether the stored dtype is floating point (parameters and float buffers, not
    /// integer buffers such as `num_batches_tracked`).
    pub fn is_float(&self) -> bool {
        self.dtype.starts_with("float") || self.dtype == "bfloat16"
    }
}

/// A flat state dict: PyTorch key -> tensor, ordered like `state_dict()` keys read naturally
/// (`features.2` before `features.10`).
#[derive(Debug, Clone)]
pub struct StateDict {
    /// The container the file came in.
    pub format: Format,
    /// The file it was read from.
    pub path: PathBuf,
    /// The tensors by PyTorch key, any nesting key and `module.` prefix removed.
    pub tensors: BTreeMap<NaturalKey, StoredTensor>,
}

/// A key that sorts numeric path components as numbers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NaturalKey(pub String);

impl Ord for NaturalKey {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        let a = self.0.split('.');
        let b = other.0.split('.');
        for (x, y) in a.zip(b) {
            let ord = match (x.parse::<u64>(), y.parse::<u64>()) {
                (Ok(m), Ok(n)) => m.cmp(&n),
                _ => x.cmp(y),
            };
            if ord.is_ne() {
                return ord;
            }
        }
        self.0.split('.').count().cmp(&other.0.split('.').count())
    }
}

impl PartialOrd for NaturalKey {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl StateDict {
    /// The tensor stored under the PyTorch key `key`.
    pub fn get(&self, key: &str) -> Option<&StoredTensor> {
        self.tensors.get(&NaturalKey(key.to_string()))
    }

    /// The PyTorch keys in natural order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(|k| k.0.as_str())
    }

    /// Keys and tensors in natural order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &StoredTensor)> {
        self.tensors.iter().map(|(k, v)| (k.0.as_str(), v))
    }

    /// The number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether it holds no tensors (never true of one returned by [`read`]).
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Total number of elements over floating-point tensors (parameters and float buffers).
    pub fn num_params(&self) -> usize {
        self.tensors
            .values()
            .filter(|t| t.is_float())
            .map(StoredTensor::num_elements)
            .sum()
    }
}

/// Keys under which training scripts commonly nest the weights.
const NESTING_KEYS: [&str; 4] = ["state_dict", "model_state_dict", "model", "net"];

/// Read a checkpoint. `key` selects a nested state dict by dotted path (`--key`); without it
/// a state dict nested under `state_dict`, `model_state_dict`, `model` or `net` is found automatically. A `module.`
/// prefix on every key (DataParallel) is stripped.
pub fn read(path: &Path, key: Option<&str>) -> Result<StateDict, CheckpointError> {
    read_with(path, key, true)
}

/// [`read`] without the tensor data: names, dtypes and shapes only (every `data` is
/// empty), so that listing a checkpoint allocates nothing for its tensors.
pub fn read_layout(path: &Path, key: Option<&str>) -> Result<StateDict, CheckpointError> {
    read_with(path, key, false)
}

fn read_with(
    path: &Path,
    key: Option<&str>,
    with_data: bool,
) -> Result<StateDict, CheckpointError> {
    let mut head = [0u8; 512];
    let n = File::open(path)
        .and_then(|mut f| read_up_to(&mut f, &mut head))
        .map_err(|e| CheckpointError::new(path, format!("cannot read file: {e}")))?;
    if n == 0 {
        return Err(CheckpointError::new(path, "file is empty"));
    }
    let (format, mut tensors) = if looks_like_safetensors(&head[..n]) {
        (Format::Safetensors, read_safetensors(path, with_data)?)
    } else {
        read_pth(path, container(path, &head[..n])?, key, with_data)?
    };
    if format == Format::Safetensors
        && let Some(key) = key
    {
        tensors = select_prefix(path, tensors, key)?;
    }
    if !tensors.is_empty() && tensors.keys().all(|k| k.0.starts_with("module.")) {
        tensors = tensors
            .into_iter()
            .map(|(k, v)| (NaturalKey(k.0["module.".len()..].to_string()), v))
            .collect();
    }
    if tensors.is_empty() {
        return Err(CheckpointError::new(path, "holds no tensors"));
    }
    Ok(StateDict {
        format,
        path: path.to_path_buf(),
        tensors,
    })
}

fn read_up_to(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        let n = f.read(&mut buf[filled..])?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    Ok(filled)
}

/// A safetensors file starts with a little-endian u64 header length, then a JSON object.
fn looks_like_safetensors(head: &[u8]) -> bool {
    head.len() > 8 && head[8] == b'{'
}

fn read_safetensors(
    path: &Path,
    with_data: bool,
) -> Result<BTreeMap<NaturalKey, StoredTensor>, CheckpointError> {
    let bytes = std::fs::read(path)
        .map_err(|e| CheckpointError::new(path, format!("cannot read file: {e}")))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| CheckpointError::new(path, format!("not a valid safetensors file: {e}")))?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        use safetensors::Dtype as S;
        let dtype = match view.dtype() {
            S::F32 => DType::F32,
            S::F16 => DType::F16,
            S::BF16 => DType::BF16,
            S::F64 => DType::F64,
            S::I64 => DType::I64,
            S::I32 => DType::I32,
            S::I16 => DType::I16,
            S::I8 => DType::I8,
            S::U8 => DType::U8,
            S::BOOL => DType::Bool,
            other => {
                return Err(CheckpointError::new(
                    path,
                    format!("tensor '{name}' has unsupported dtype {other:?}"),
                ));
            }
        };
        let tensor = StoredTensor {
            dtype: dtype_name(dtype),
            shape: view.shape().to_vec(),
            data: if with_data {
                to_f32(dtype, view.data())
            } else {
                Vec::new()
            },
        };
        out.insert(NaturalKey(name), tensor);
    }
    Ok(out)
}

/// The container of a `.pth` file, told from its first bytes as `pytorch-reader` does.
fn container(path: &Path, head: &[u8]) -> Result<Format, CheckpointError> {
    if head.starts_with(b"PK\x03\x04") || head.starts_with(b"PK\x05\x06") {
        Ok(Format::Zip)
    } else if head.get(257..262) == Some(b"ustar") {
        Err(CheckpointError::new(
            path,
            "pre-0.1.10 TAR checkpoints are not supported; re-save it with torch.save",
        ))
    } else if head.first() == Some(&0x80) {
        Ok(Format::Legacy)
    } else {
        Err(CheckpointError::new(
            path,
            "not a PyTorch checkpoint (neither a zip archive nor a pickle) nor a safetensors file",
        ))
    }
}

/// Apply the `weights_only` policy to every pickle of the file before anything else
/// reads it: `data.pkl` of a zip (every candidate root), or the five pickles that open a
/// legacy file.
fn check_pickles(path: &Path, format: Format) -> Result<(), CheckpointError> {
    let refuse = |e: pickle_scan::PickleError| CheckpointError::new(path, e.to_string());
    let io = |e: &dyn fmt::Display| CheckpointError::new(path, format!("cannot read: {e}"));
    let file = File::open(path).map_err(|e| io(&e))?;
    if format == Format::Legacy {
        let mut reader = std::io::BufReader::new(file);
        return pickle_scan::scan_stream(&mut reader, 5).map_err(refuse);
    }
    let mut archive = zip::ZipArchive::new(file)
        .map_err(|e| CheckpointError::new(path, format!("not a readable zip archive ({e})")))?;
    let pickles: Vec<usize> = (0..archive.len())
        .filter(|&i| {
            archive.name_for_index(i).is_some_and(|n| {
                n.strip_suffix("data.pkl")
                    .is_some_and(|root| root.is_empty() || root.ends_with('/'))
            })
        })
        .collect();
    if pickles.is_empty() {
        return Err(CheckpointError::new(
            path,
            "the zip archive has no data.pkl",
        ));
    }
    for index in pickles {
        // Raw: torch writes pickles uncompressed and may leave their CRC out
        // (`set_crc32_options(False)`); pytorch-reader checks it where there is one.
        let entry = archive.by_index_raw(index).map_err(|e| io(&e))?;
        if entry.compression() != zip::CompressionMethod::Stored {
            return Err(CheckpointError::new(
                path,
                "a compressed data.pkl (torch never writes one)",
            ));
        }
        let name = entry.name().to_string();
        if entry.size() > pickle_scan::MAX_PICKLE_BYTES {
            return Err(CheckpointError::new(path, format!("{name} is too large")));
        }
        let mut bytes = Vec::new();
        entry
            .take(pickle_scan::MAX_PICKLE_BYTES)
            .read_to_end(&mut bytes)
            .map_err(|e| io(&e))?;
        pickle_scan::scan(&bytes).map_err(refuse)?;
    }
    Ok(())
}

/// How many bytes of tensor elements a file may make, in all and per tensor: a view can
/// repeat its storage (stride 0, overlapping strides), which PyTorch allows, but a few
/// bytes declaring a [100000, 10000] view of one value must not become 4 GB.
struct Budget {
    per_tensor: u64,
    left: u64,
}

impl Budget {
    fn for_file(path: &Path) -> Result<Self, CheckpointError> {
        let len = std::fs::metadata(path)
            .map_err(|e| CheckpointError::new(path, format!("cannot read file: {e}")))?
            .len();
        Ok(Self {
            per_tensor: len.saturating_add(1 << 20),
            left: len.saturating_mul(4).saturating_add(64 << 20),
        })
    }

    fn take(
        &mut self,
        path: &Path,
        name: &str,
        shape: &[usize],
        dtype: DType,
    ) -> Result<(), CheckpointError> {
        let bytes = shape
            .iter()
            .try_fold(dtype.size() as u64, |acc, &d| acc.checked_mul(d as u64))
            .unwrap_or(u64::MAX);
        if bytes > self.per_tensor || bytes > self.left {
            return Err(CheckpointError::new(
                path,
                format!(
                    "tensor '{name}' of shape {shape:?} would take {bytes} bytes, more than the file could hold (a view repeating its storage?)"
                ),
            ));
        }
        self.left -= bytes;
        Ok(())
    }
}

fn read_pth(
    path: &Path,
    format: Format,
    key: Option<&str>,
    with_data: bool,
) -> Result<(Format, BTreeMap<NaturalKey, StoredTensor>), CheckpointError> {
    check_pickles(path, format)?;
    let pth_error = |e: pytorch_reader::PytorchError| {
        CheckpointError::new(path, format!("not a readable PyTorch checkpoint ({e})"))
    };
    let tree = PytorchReader::read_pickle_data(path, None).map_err(pth_error)?;
    let prefix = match key {
        Some(k) => Some(k.to_string()),
        None => nested_state_dict_key(&tree).map(str::to_string),
    };
    let reader = PytorchReader::new(path).map_err(pth_error)?;
    if reader.metadata().format_type == FileFormat::Pickle {
        return Err(CheckpointError::new(
            path,
            "a plain pickle without tensor storages, not a PyTorch checkpoint",
        ));
    }
    let mut budget = Budget::for_file(path)?;
    let mut tensors = BTreeMap::new();
    let mut all: Vec<_> = reader.into_tensors().into_iter().collect();
    all.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, tensor) in all {
        budget.take(path, &name, tensor.shape(), tensor.dtype())?;
        let data = if with_data {
            let bytes = tensor.read().map_err(|e| {
                CheckpointError::new(path, format!("cannot read tensor '{name}': {e}"))
            })?;
            to_f32(tensor.dtype(), &bytes)
        } else {
            Vec::new()
        };
        let stored = StoredTensor {
            dtype: dtype_name(tensor.dtype()),
            shape: tensor.shape().to_vec(),
            data,
        };
        tensors.insert(NaturalKey(name), stored);
    }
    let tensors = match prefix {
        Some(p) => select_prefix(path, tensors, &p)?,
        None => tensors,
    };
    Ok((format, tensors))
}

/// Keep only tensors under `prefix.` and strip it.
fn select_prefix(
    path: &Path,
    tensors: BTreeMap<NaturalKey, StoredTensor>,
    prefix: &str,
) -> Result<BTreeMap<NaturalKey, StoredTensor>, CheckpointError> {
    let dotted = format!("{prefix}.");
    let selected: BTreeMap<_, _> = tensors
        .into_iter()
        .filter_map(|(k, v)| {
            k.0.strip_prefix(&dotted)
                .map(|rest| (NaturalKey(rest.to_string()), v))
        })
        .collect();
    if selected.is_empty() {
        return Err(CheckpointError::new(
            path,
            format!("no tensors under the key '{prefix}'"),
        ));
    }
    Ok(selected)
}

/// The key of a state dict nested in a training checkpoint (`{"state_dict": {...}, ...}`).
fn nested_state_dict_key(tree: &PickleValue) -> Option<&'static str> {
    let PickleValue::Dict(root) = tree else {
        return None;
    };
    NESTING_KEYS
        .into_iter()
        .find(|k| matches!(root.get(*k), Some(PickleValue::Dict(_))))
}

fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F64 => "float64",
        DType::F32 => "float32",
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        DType::I64 => "int64",
        DType::I32 => "int32",
        DType::I16 => "int16",
        DType::I8 => "int8",
        DType::U64 => "uint64",
        DType::U32 => "uint32",
        DType::U16 => "uint16",
        DType::U8 => "uint8",
        DType::Bool => "bool",
    }
}

/// Convert little-endian element bytes to f32.
fn to_f32(dtype: DType, bytes: &[u8]) -> Vec<f32> {
    fn each<const N: usize>(bytes: &[u8], f: impl Fn([u8; N]) -> f32) -> Vec<f32> {
        bytes
            .chunks_exact(N)
            .map(|c| f(c.try_into().expect("chunk of N bytes")))
            .collect()
    }
    match dtype {
        DType::F32 => each(bytes, f32::from_le_bytes),
        DType::F64 => each(bytes, |b| f64::from_le_bytes(b) as f32),
        DType::F16 => each(bytes, |b| half::f16::from_le_bytes(b).to_f32()),
        DType::BF16 => each(bytes, |b| half::bf16::from_le_bytes(b).to_f32()),
        DType::I64 => each(bytes, |b| i64::from_le_bytes(b) as f32),
        DType::U64 => each(bytes, |b| u64::from_le_bytes(b) as f32),
        DType::I32 => each(bytes, |b| i32::from_le_bytes(b) as f32),
        DType::U32 => each(bytes, |b| u32::from_le_bytes(b) as f32),
        DType::I16 => each(bytes, |b| i16::from_le_bytes(b) as f32),
        DType::U16 => each(bytes, |b| u16::from_le_bytes(b) as f32),
        DType::I8 => each(bytes, |b: [u8; 1]| b[0] as i8 as f32),
        DType::U8 | DType::Bool => each(bytes, |b: [u8; 1]| b[0] as f32),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn natural_key_orders_numbers_numerically() {
        let mut keys: Vec<NaturalKey> = ["features.10.weight", "features.2.weight", "fc.bias"]
            .iter()
            .map(|s| NaturalKey(s.to_string()))
            .collect();
        keys.sort();
        let names: Vec<&str> = keys.iter().map(|k| k.0.as_str()).collect();
        assert_eq!(
            names,
            ["fc.bias", "features.2.weight", "features.10.weight"]
        );
    }

    #[test]
    fn converts_half_precision_and_ints() {
        let h = half::f16::from_f32(1.5).to_le_bytes();
        assert_eq!(to_f32(DType::F16, &h), vec![1.5]);
        let b = half::bf16::from_f32(-2.0).to_le_bytes();
        assert_eq!(to_f32(DType::BF16, &b), vec![-2.0]);
        assert_eq!(to_f32(DType::I64, &7i64.to_le_bytes()), vec![7.0]);
    }
}
