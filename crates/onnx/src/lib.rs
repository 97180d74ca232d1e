//! ONNX model files: the protobuf messages of `onnx.proto`, small constructors for the
//! parts a graph is built from, and reading an untrusted `.onnx` file into a [`Summary`].
//!
//! The messages are prost's, generated once by `tools/onnx-proto` (protox, a protobuf
//! compiler in Rust) and checked in as [`proto`]: building needs no `protoc`. prost rather
//! than a crate that ships ONNX's messages: the ones on crates.io are unmaintained or pull
//! a whole runtime (tract), while prost is the protobuf crate the Rust ecosystem keeps up.

#![warn(missing_docs)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use prost::Message;
use serde::Serialize;

#[allow(missing_docs, clippy::all, clippy::pedantic)]
#[rustfmt::skip]
pub mod proto;

use proto::tensor_proto::{DataLocation, DataType};
use proto::tensor_shape_proto::{Dimension, dimension};
use proto::type_proto::{self, Tensor as TensorType};
use proto::{
    AttributeProto, ModelProto, NodeProto, StringStringEntryProto, TensorProto, TensorShapeProto,
    TypeProto, ValueInfoProto, attribute_proto::AttributeType,
};

/// The IR version written: 8, the one of opset 17 (ONNX 1.12).
pub const IR_VERSION: i64 = 8;
/// The default-domain operator set written.
pub const OPSET: i64 = 17;
/// Protobuf's limit on one message: larger models need external data.
pub const MAX_MODEL_BYTES: u64 = 2 << 30;

/// A bad `.onnx` file: the file and what is wrong with it, printed on one line.
#[derive(Debug, thiserror::Error)]
#[error("{}: {problem}", path.display())]
pub struct OnnxError {
    /// The file.
    pub path: PathBuf,
    /// What is wrong with it, as a phrase that follows the path.
    pub problem: String,
}

impl OnnxError {
    fn new(path: &Path, problem: impl Into<String>) -> Self {
        Self {
            path: path.to_path_buf(),
            problem: problem.into(),
        }
    }
}

/// Read and decode an `.onnx` file. Anything that is not a model (no graph, no IR
/// version) or that protobuf cannot decode is an error naming the file; decoding never
/// allocates more than the file holds and stops at nesting depth 100 (prost's limit).
pub fn read(path: &Path) -> Result<ModelProto, OnnxError> {
    let size = std::fs::metadata(path)
        .map_err(|e| OnnxError::new(path, e.to_string()))?
        .len();
    if size > MAX_MODEL_BYTES {
        return Err(OnnxError::new(
            path,
            format!("{size} bytes, over protobuf's 2 GiB limit for one model"),
        ));
    }
    let bytes = std::fs::read(path).map_err(|e| OnnxError::new(path, e.to_string()))?;
    let model = ModelProto::decode(bytes.as_slice())
        .map_err(|e| OnnxError::new(path, format!("not an ONNX model ({e})")))?;
    if model.ir_version.unwrap_or(0) <= 0 || model.graph.is_none() {
        return Err(OnnxError::new(
            path,
            "not an ONNX model (no IR version or no graph)",
        ));
    }
    Ok(model)
}

/// The model's protobuf bytes.
pub fn encode(model: &ModelProto) -> Vec<u8> {
    model.encode_to_vec()
}

/// Move the initializers' bytes out of the model into one blob, for a file `location` beside
/// the model (ONNX's external data, how models past 2 GiB are stored). Each tensor starts
/// at a multiple of 4096 bytes, so runtimes can map it in place; tensors smaller than that
/// stay inline.
pub fn move_to_external_data(model: &mut ModelProto, location: &str) -> Vec<u8> {
    const ALIGN: usize = 4096;
    let mut blob = Vec::new();
    let initializers = model
        .graph
        .iter_mut()
        .flat_map(|g| g.initializer.iter_mut());
    for tensor in initializers {
        if tensor.raw_data.as_ref().is_none_or(|b| b.len() < ALIGN) {
            continue;
        }
        let bytes = tensor.raw_data.take().unwrap_or_default();
        blob.resize(blob.len().next_multiple_of(ALIGN), 0);
        let entry = |key: &str, value: String| StringStringEntryProto {
            key: Some(key.into()),
            value: Some(value),
        };
        tensor.external_data = vec![
            entry("location", location.into()),
            entry("offset", blob.len().to_string()),
            entry("length", bytes.len().to_string()),
        ];
        tensor.data_location = Some(DataLocation::External as i32);
        blob.extend_from_slice(&bytes);
    }
    blob
}

/// An integer attribute.
pub fn attribute_int(name: &str, value: i64) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Int as i32),
        i: Some(value),
        ..Default::default()
    }
}

/// An attribute holding a list of integers.
pub fn attribute_ints(name: &str, values: &[i64]) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Ints as i32),
        ints: values.to_vec(),
        ..Default::default()
    }
}

/// A float attribute.
pub fn attribute_float(name: &str, value: f32) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Float as i32),
        f: Some(value),
        ..Default::default()
    }
}

/// An f32 tensor (little-endian `raw_data`, as every runtime reads fastest).
pub fn tensor_f32(name: &str, dims: &[usize], values: &[f32]) -> TensorProto {
    TensorProto {
        name: Some(name.into()),
        dims: dims.iter().map(|&d| d as i64).collect(),
        data_type: Some(DataType::Float as i32),
        raw_data: Some(values.iter().flat_map(|v| v.to_le_bytes()).collect()),
        ..Default::default()
    }
}

/// An int64 tensor (shapes, indices).
pub fn tensor_i64(name: &str, dims: &[usize], values: &[i64]) -> TensorProto {
    TensorProto {
        name: Some(name.into()),
        dims: dims.iter().map(|&d| d as i64).collect(),
        data_type: Some(DataType::Int64 as i32),
        raw_data: Some(values.iter().flat_map(|v| v.to_le_bytes()).collect()),
        ..Default::default()
    }
}

/// One dimension of a graph input or output.
#[derive(Debug, Clone, PartialEq)]
pub enum Dim {
    /// A fixed size.
    Fixed(usize),
    /// A size chosen at run time, by name (`batch`).
    Named(String),
}

/// A graph input or output: an f32 tensor of this shape.
pub fn value_info_f32(name: &str, dims: &[Dim]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| Dimension {
            value: Some(match d {
                Dim::Fixed(n) => dimension::Value::DimValue(*n as i64),
                Dim::Named(s) => dimension::Value::DimParam(s.clone()),
            }),
            ..Default::default()
        })
        .collect();
    ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(TensorType {
                elem_type: Some(DataType::Float as i32),
                shape: Some(TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A node of operator `op` (default domain).
pub fn node(
    op: &str,
    name: String,
    inputs: Vec<String>,
    outputs: Vec<String>,
    attributes: Vec<AttributeProto>,
) -> NodeProto {
    NodeProto {
        op_type: Some(op.into()),
        name: Some(name),
        input: inputs,
        output: outputs,
        attribute: attributes,
        ..Default::default()
    }
}

/// What `retrain inspect` shows of an ONNX model.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// The IR version.
    pub ir_version: i64,
    /// Operator sets imported, `(domain, version)`; the default domain is `""`.
    pub opsets: Vec<(String, i64)>,
    /// The program that wrote it, with its version.
    pub producer: String,
    /// The graph's name.
    pub graph: String,
    /// Inputs that are not initializers.
    pub inputs: Vec<Io>,
    /// Outputs.
    pub outputs: Vec<Io>,
    /// Number of nodes in the main graph.
    pub nodes: usize,
    /// How many nodes of each operator.
    pub operators: BTreeMap<String, usize>,
    /// Elements in all initializers (the parameters).
    pub parameters: u64,
    /// `metadata_props`, as written.
    pub metadata: BTreeMap<String, String>,
}

/// A graph input or output: name, element type and shape (named dimensions by name).
#[derive(Debug, Clone, Serialize)]
pub struct Io {
    /// The value's name.
    pub name: String,
    /// The element type (`FLOAT`), or `?` when not a tensor.
    pub elem_type: String,
    /// Each dimension: its size, its name, or `?`.
    pub shape: Vec<String>,
}

impl Summary {
    /// Summarise a decoded model.
    pub fn of(model: &ModelProto) -> Summary {
        let graph = model.graph.clone().unwrap_or_default();
        let initializers: Vec<&str> = graph.initializer.iter().map(|t| t.name()).collect();
        let mut operators = BTreeMap::new();
        for node in &graph.node {
            *operators.entry(node.op_type().to_string()).or_insert(0) += 1;
        }
        let parameters = graph
            .initializer
            .iter()
            .map(|t| {
                t.dims
                    .iter()
                    .fold(1u64, |n, &d| n.saturating_mul(d.max(0) as u64))
            })
            .fold(0u64, u64::saturating_add);
        Summary {
            ir_version: model.ir_version(),
            opsets: model
                .opset_import
                .iter()
                .map(|o| (o.domain().to_string(), o.version()))
                .collect(),
            producer: format!("{} {}", model.producer_name(), model.producer_version())
                .trim()
                .to_string(),
            graph: graph.name().to_string(),
            inputs: graph
                .input
                .iter()
                .filter(|v| !initializers.contains(&v.name()))
                .map(Io::of)
                .collect(),
            outputs: graph.output.iter().map(Io::of).collect(),
            nodes: graph.node.len(),
            operators,
            parameters,
            metadata: model
                .metadata_props
                .iter()
                .map(|p| (p.key().to_string(), p.value().to_string()))
                .collect(),
        }
    }
}

impl Io {
    fn of(value: &ValueInfoProto) -> Io {
        let tensor = match value.r#type.as_ref().and_then(|t| t.value.as_ref()) {
            Some(type_proto::Value::TensorType(t)) => Some(t),
            _ => None,
        };
        let elem_type = tensor
            .and_then(|t| DataType::try_from(t.elem_type()).ok())
            .map_or("?".to_string(), |d| d.as_str_name().to_string());
        let shape = tensor
            .and_then(|t| t.shape.as_ref())
            .map(|s| s.dim.iter().map(dimension_text).collect())
            .unwrap_or_default();
        Io {
            name: value.name().to_string(),
            elem_type,
            shape,
        }
    }
}

fn dimension_text(d: &Dimension) -> String {
    match &d.value {
        Some(dimension::Value::DimValue(n)) => n.to_string(),
        Some(dimension::Value::DimParam(p)) => p.clone(),
        None => "?".to_string(),
    }
}
