//! Writing weights for PyTorch: `.safetensors`, or `.pth` in the zip container that
//! `torch.load(weights_only=True)` reads. No crate writes PyTorch's pickle, so this module
//! emits the few opcodes a state dict needs (an `OrderedDict` of `_rebuild_tensor_v2`
//! calls on persistent storages), the same stream `torch.save(model.state_dict())` makes.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, bail};
use zip::write::SimpleFileOptions;

use crate::load::torch_tensors;
use crate::models::Model;
use crate::output::{write_atomic, write_weights};

/// Element type of an exported tensor.
enum Values {
    F32(Vec<f32>),
    I64(Vec<i64>),
}

impl Values {
    fn storage_class(&self) -> &'static str {
        match self {
            Values::F32(_) => "FloatStorage",
            Values::I64(_) => "LongStorage",
        }
    }

    fn len(&self) -> usize {
        match self {
            Values::F32(v) => v.len(),
            Values::I64(v) => v.len(),
        }
    }

    fn bytes(&self) -> Vec<u8> {
        match self {
            Values::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Values::I64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }
}

/// Pickle protocol 2 opcodes used below.
mod op {
    pub const PROTO: u8 = 0x80;
    pub const GLOBAL: u8 = b'c';
    pub const EMPTY_TUPLE: u8 = b')';
    pub const REDUCE: u8 = b'R';
    pub const MARK: u8 = b'(';
    pub const BINUNICODE: u8 = b'X';
    pub const BINPERSID: u8 = b'Q';
    pub const BININT: u8 = b'J';
    pub const TUPLE: u8 = b't';
    pub const NEWFALSE: u8 = 0x89;
    pub const SETITEMS: u8 = b'u';
    pub const STOP: u8 = b'.';
}

struct Pickler(Vec<u8>);

impl Pickler {
    fn global(&mut self, module: &str, name: &str) {
        self.0.push(op::GLOBAL);
        self.0
            .extend_from_slice(format!("{module}\n{name}\n").as_bytes());
    }

    fn string(&mut self, s: &str) {
        self.0.push(op::BINUNICODE);
        self.0.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.0.extend_from_slice(s.as_bytes());
    }

    fn int(&mut self, v: usize) -> anyhow::Result<()> {
        let v = i32::try_from(v).context("a dimension too large for this writer")?;
        self.0.push(op::BININT);
        self.0.extend_from_slice(&v.to_le_bytes());
        Ok(())
    }

    fn int_tuple(&mut self, values: &[usize]) -> anyhow::Result<()> {
        self.0.push(op::MARK);
        for &v in values {
            self.int(v)?;
        }
        self.0.push(op::TUPLE);
        Ok(())
    }

    fn ordered_dict(&mut self) {
        self.global("collections", "OrderedDict");
        self.0.push(op::EMPTY_TUPLE);
        self.0.push(op::REDUCE);
    }

    /// `torch._utils._rebuild_tensor_v2(storage, 0, size, stride, False, OrderedDict())`
    /// with the storage as persistent id `('storage', torch.XStorage, key, 'cpu', numel)`.
    fn tensor(&mut self, key: &str, values: &Values, shape: &[usize]) -> anyhow::Result<()> {
        self.global("torch._utils", "_rebuild_tensor_v2");
        self.0.push(op::MARK);
        self.0.push(op::MARK);
        self.string("storage");
        self.global("torch", values.storage_class());
        self.string(key);
        self.string("cpu");
        self.int(values.len())?;
        self.0.push(op::TUPLE);
        self.0.push(op::BINPERSID);
        self.int(0)?;
        self.int_tuple(shape)?;
        let mut strides = vec![1usize; shape.len()];
        for i in (0..shape.len().saturating_sub(1)).rev() {
            strides[i] = strides[i + 1] * shape[i + 1];
        }
        self.int_tuple(&strides)?;
        self.0.push(op::NEWFALSE);
        self.ordered_dict();
        self.0.push(op::TUPLE);
        self.0.push(op::REDUCE);
        Ok(())
    }
}

/// The model's state dict as PyTorch orders and names it, `num_batches_tracked` included.
fn state_dict(model: &Model) -> Vec<(String, Vec<usize>, Values)> {
    let mut out = Vec::new();
    for (name, shape, values) in torch_tensors(model) {
        let tracked = name
            .strip_suffix("running_var")
            .map(|p| format!("{p}num_batches_tracked"));
        out.push((name, shape, Values::F32(values)));
        if let Some(t) = tracked {
            out.push((t, vec![], Values::I64(vec![0])));
        }
    }
    out
}

/// Serialise a `.pth` zip archive in memory.
fn pth_bytes(model: &Model) -> anyhow::Result<Vec<u8>> {
    let tensors = state_dict(model);
    let mut p = Pickler(vec![op::PROTO, 2]);
    p.ordered_dict();
    p.0.push(op::MARK);
    for (i, (name, shape, values)) in tensors.iter().enumerate() {
        p.string(name);
        p.tensor(&i.to_string(), values, shape)?;
    }
    p.0.push(op::SETITEMS);
    p.0.push(op::STOP);

    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    // PyTorch stores entries uncompressed and 64-byte aligned so it can map them.
    let stored = SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .with_alignment(64);
    let mut entry = |name: &str, bytes: &[u8]| -> anyhow::Result<()> {
        zip.start_file(format!("archive/{name}"), stored)?;
        zip.write_all(bytes)?;
        Ok(())
    };
    entry("data.pkl", &p.0)?;
    entry("byteorder", b"little")?;
    for (i, (_, _, values)) in tensors.iter().enumerate() {
        entry(&format!("data/{i}"), &values.bytes())?;
    }
    entry("version", b"3\n")?;
    Ok(zip.finish()?.into_inner())
}

/// Write the model's weights to `path`: `.pth` (zip) or `.safetensors`, by extension.
pub fn export(model: &Model, path: &Path) -> anyhow::Result<()> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("pth" | "pt") => write_atomic(path, &pth_bytes(model)?),
        Some("safetensors") => write_weights(path, model),
        _ => bail!(
            "{}: choose the format by extension: .pth or .safetensors",
            path.display()
        ),
    }
}
