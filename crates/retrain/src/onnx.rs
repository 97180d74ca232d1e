//! Export to ONNX for deployment. Each family writes its eval-mode graph (BatchNorm folded
//! into the convolutions) through a [`Graph`]; [`export_onnx`] adds the inputs and outputs
//! and the metadata a deployment reads: the preprocessing, the class names and where the
//! weights came from.
//!
//! The file is opset 17, IR version 8, with input `input` (`[batch, 3, height, width]`,
//! f32) and output `logits`; the batch size is dynamic, and so is the image size for the
//! convolutional families (`input_size` in the metadata is the one the weights were trained
//! at; a ViT's graph holds only for it).

use std::path::Path;

use crate::error::{Result, bail};
use crate::models::onnx_graph::{Graph, Value};
use crate::models::{Model, ModelSpec, PretrainedConfig, describe};
use crate::onnx_format::proto::{
    GraphProto, ModelProto, OperatorSetIdProto, StringStringEntryProto,
};
use crate::onnx_format::{
    Dim, IR_VERSION, MAX_MODEL_BYTES, OPSET, encode, move_to_external_data, value_info_f32,
};
use crate::output::write_atomic;
use crate::preprocess::Preprocess;
use crate::train::RunConfig;

/// What a deployment needs besides the graph, stored in the file's `metadata_props`.
#[derive(Debug, Clone)]
pub struct Deployment {
    /// The architecture, as [`crate::models::describe`] gives it.
    pub architecture: String,
    /// How inputs are prepared.
    pub preprocess: Preprocess,
    /// Class names in the order of the logits, where known.
    pub classes: Option<Vec<String>>,
    /// Where the weights came from (a run folder, a checkpoint, registered weights).
    pub source: String,
    /// Also output `probabilities` (softmax of the logits).
    pub with_softmax: bool,
    /// Write the weights to `FILE.data` beside the file (ONNX's external data); done
    /// anyway for models past protobuf's 2 GiB.
    pub external_data: bool,
}

impl Deployment {
    /// A trained run's: its classes and preprocessing, the run folder as the source.
    pub fn of_run(run: &Path, config: &RunConfig) -> Deployment {
        Deployment {
            architecture: describe(&config.model),
            preprocess: config.preprocess.clone(),
            classes: Some(config.classes.clone()),
            source: run.display().to_string(),
            with_softmax: false,
            external_data: false,
        }
    }

    /// Pretrained weights': their configuration (ImageNet's classes for 1000 outputs).
    pub fn of_weights(spec: &ModelSpec, config: PretrainedConfig, source: String) -> Deployment {
        Deployment {
            architecture: describe(spec),
            preprocess: config.preprocess,
            classes: config.class_names,
            source,
            with_softmax: false,
            external_data: false,
        }
    }

    fn metadata(&self) -> Vec<StringStringEntryProto> {
        let p = &self.preprocess;
        let mut entries = vec![
            ("architecture", self.architecture.clone()),
            ("input_size", p.input_size.to_string()),
            ("resize_size", p.resize_size.to_string()),
            (
                "interpolation",
                json(&p.interpolation).trim_matches('"').to_string(),
            ),
            ("mean", json(&p.mean)),
            ("std", json(&p.std)),
            ("source", self.source.clone()),
        ];
        if let Some(classes) = &self.classes {
            entries.push(("classes", json(classes)));
        }
        entries
            .into_iter()
            .map(|(key, value)| StringStringEntryProto {
                key: Some(key.into()),
                value: Some(value),
            })
            .collect()
    }
}

/// A metadata value as JSON text.
fn json<T: serde::Serialize + ?Sized>(value: &T) -> String {
    serde_json::to_string(value).expect("plain data serialises")
}

/// The eval-mode model as an ONNX model (BatchNorm folded).
pub fn onnx_model(model: &Model, deployment: &Deployment) -> Result<ModelProto> {
    let model = model.for_inference();
    let mut g = Graph::new(model.torch_namer(), deployment.preprocess.input_size);
    let logits = model.onnx(&mut g, &Value::input("input", 4))?;
    let logits = g.output(&logits, "logits");
    let classes = model.head().weight.dims()[1];
    let batch = || Dim::Named("batch".into());
    let mut outputs = vec![value_info_f32("logits", &[batch(), Dim::Fixed(classes)])];
    if deployment.with_softmax {
        let probabilities = g.softmax_last("", &logits);
        g.output(&probabilities, "probabilities");
        outputs.push(value_info_f32(
            "probabilities",
            &[batch(), Dim::Fixed(classes)],
        ));
    }
    let side = |name: &str| match g.fixed_size() {
        true => Dim::Fixed(deployment.preprocess.input_size),
        false => Dim::Named(name.into()),
    };
    let input_dims = [batch(), Dim::Fixed(3), side("height"), side("width")];
    let (nodes, initializers) = g.finish();
    let graph = GraphProto {
        name: Some(deployment.architecture.clone()),
        node: nodes,
        initializer: initializers,
        input: vec![value_info_f32("input", &input_dims)],
        output: outputs,
        ..Default::default()
    };
    Ok(ModelProto {
        ir_version: Some(IR_VERSION),
        opset_import: vec![OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(OPSET),
        }],
        producer_name: Some("retrain".into()),
        producer_version: Some(env!("CARGO_PKG_VERSION").into()),
        graph: Some(graph),
        metadata_props: deployment.metadata(),
        ..Default::default()
    })
}

/// Weights past this size go to external data: protobuf's limit less room for the graph.
const EXTERNAL_DATA_ABOVE: u64 = MAX_MODEL_BYTES - (64 << 20);

/// Write the model to `path` as ONNX, and its weights to `path.data` when they are external
/// (each file written to a temporary file, then renamed; the data first).
pub fn export_onnx(model: &Model, deployment: &Deployment, path: &Path) -> Result<()> {
    let mut proto = onnx_model(model, deployment)?;
    let weight_bytes: u64 = proto
        .graph
        .iter()
        .flat_map(|g| &g.initializer)
        .map(|t| t.raw_data.as_ref().map_or(0, |b| b.len() as u64))
        .sum();
    if deployment.external_data || weight_bytes > EXTERNAL_DATA_ABOVE {
        let Some(name) = path.file_name() else {
            bail!("{}: not a file name", path.display());
        };
        let location = format!("{}.data", name.to_string_lossy());
        let blob = move_to_external_data(&mut proto, &location);
        write_atomic(&path.with_file_name(&location), &blob)?;
    }
    write_atomic(path, &encode(&proto))
}
