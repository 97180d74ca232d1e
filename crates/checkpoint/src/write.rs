//! Writing state dicts: `.safetensors`, or `.pth` in the zip container that
//! `torch.load(weights_only=True)` reads. No crate writes PyTorch's pickle, so this module
//! emits the few opcodes a state dict needs (an `OrderedDict` of `_rebuild_tensor_v2`
//! calls on persistent storages), the same stream `torch.save(model.state_dict())` makes.

use std::collections::HashMap;
use std::io::Write;

use safetensors::Dtype;
use safetensors::tensor::TensorView;
use zip::write::SimpleFileOptions;

/// Why a state dict could not be serialised.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// A dimension or element count beyond what the pickle writer encodes (i32).
    #[error("a dimension of {0} is too large for the .pth writer")]
    TooLarge(usize),
    /// The zip container failed.
    #[error("zip: {0}")]
    Zip(#[from] zip::result::ZipError),
    /// Writing into the in-memory archive failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// safetensors refused a tensor (shape and byte count disagree).
    #[error("tensor {name}: {message}")]
    Safetensors {
        /// The tensor's name.
        name: String,
        /// safetensors' message.
        message: String,
    },
}

/// One named tensor of a state dict, in row-major order.
pub struct NamedTensor {
    /// The state-dict key (`layer1.0.conv1.weight`).
    pub name: String,
    /// Its shape (empty for a scalar).
    pub shape: Vec<usize>,
    /// Its values.
    pub values: Values,
}

/// Element type of an exported tensor.
pub enum Values {
    /// Parameters and float buffers.
    F32(Vec<f32>),
    /// Integer buffers (`num_batches_tracked`).
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

    fn int(&mut self, v: usize) -> Result<(), WriteError> {
        let v = i32::try_from(v).map_err(|_| WriteError::TooLarge(v))?;
        self.0.push(op::BININT);
        self.0.extend_from_slice(&v.to_le_bytes());
        Ok(())
    }

    fn int_tuple(&mut self, values: &[usize]) -> Result<(), WriteError> {
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
    fn tensor(&mut self, key: &str, values: &Values, shape: &[usize]) -> Result<(), WriteError> {
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

/// Serialise tensors as a `.pth` zip archive in memory, in the given order.
pub fn pth_bytes(tensors: &[NamedTensor]) -> Result<Vec<u8>, WriteError> {
    let mut p = Pickler(vec![op::PROTO, 2]);
    p.ordered_dict();
    p.0.push(op::MARK);
    for (i, t) in tensors.iter().enumerate() {
        p.string(&t.name);
        p.tensor(&i.to_string(), &t.values, &t.shape)?;
    }
    p.0.push(op::SETITEMS);
    p.0.push(op::STOP);

    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    // PyTorch stores entries uncompressed and 64-byte aligned so it can map them.
    let stored = SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .with_alignment(64);
    let mut entry = |name: &str, bytes: &[u8]| -> Result<(), WriteError> {
        zip.start_file(format!("archive/{name}"), stored)?;
        zip.write_all(bytes)?;
        Ok(())
    };
    entry("data.pkl", &p.0)?;
    entry("byteorder", b"little")?;
    for (i, t) in tensors.iter().enumerate() {
        entry(&format!("data/{i}"), &t.values.bytes())?;
    }
    entry("version", b"3\n")?;
    Ok(zip.finish()?.into_inner())
}

/// Serialise tensors as a `.safetensors` file in memory.
pub fn safetensors_bytes(tensors: &[NamedTensor]) -> Result<Vec<u8>, WriteError> {
    let bytes: Vec<Vec<u8>> = tensors.iter().map(|t| t.values.bytes()).collect();
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|(t, b)| {
            let dtype = match t.values {
                Values::F32(_) => Dtype::F32,
                Values::I64(_) => Dtype::I64,
            };
            TensorView::new(dtype, t.shape.clone(), b)
                .map(|v| (t.name.clone(), v))
                .map_err(|e| WriteError::Safetensors {
                    name: t.name.clone(),
                    message: e.to_string(),
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    safetensors::serialize(views, None::<HashMap<String, String>>).map_err(|e| {
        WriteError::Safetensors {
            name: "(file)".into(),
            message: e.to_string(),
        }
    })
}
