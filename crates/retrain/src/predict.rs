//! Classifying image files with a trained run or pretrained weights: the model's own
//! preprocessing, batches decoded in parallel, top-k classes with their probabilities.

use std::path::{Path, PathBuf};

use burn::prelude::*;
use burn::tensor::activation::softmax;
use rayon::prelude::*;
use serde::Serialize;

use crate::error::Result;
use crate::evaluate::load_run;
use crate::models::{Model, PretrainedConfig, to_vec};
use crate::preprocess::Preprocess;

/// Images decoded and run through the network together.
const BATCH: usize = 16;

/// A network ready to classify: eval mode with BatchNorm folded, its preprocessing and its
/// class names.
pub struct Classifier {
    model: Model,
    preprocess: Preprocess,
    classes: Option<Vec<String>>,
    device: Device,
}

/// One of an image's most likely classes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TopClass {
    /// The class index (the head's output).
    pub index: usize,
    /// Its name (`class N` where the names are unknown).
    pub label: String,
    /// Softmax probability.
    pub prob: f32,
}

/// What became of one image.
#[derive(Debug)]
pub struct Prediction {
    /// The image file.
    pub image: PathBuf,
    /// Its top classes, most likely first, or why the file could not be classified.
    pub top: Result<Vec<TopClass>>,
    /// Something wrong with a file that still decoded (a truncated JPEG).
    pub warning: Option<String>,
}

impl Classifier {
    /// The best weights of the run in `run`, with its classes and preprocessing.
    pub fn from_run(run: &Path, device: &Device) -> Result<Self> {
        let (model, config) = load_run(run, device)?;
        Ok(Self {
            model: model.for_inference(),
            preprocess: config.preprocess,
            classes: Some(config.classes),
            device: device.clone(),
        })
    }

    /// A loaded network with the configuration of its weights
    /// ([`crate::models::ModelSpec::pretrained_config`]).
    pub fn new(model: &Model, config: PretrainedConfig, device: &Device) -> Self {
        Self {
            model: model.for_inference(),
            preprocess: config.preprocess,
            classes: config.class_names,
            device: device.clone(),
        }
    }

    /// The `top_k` most likely classes of each image, in the order given.
    pub fn classify(&self, images: &[PathBuf], top_k: usize) -> Result<Vec<Prediction>> {
        let mut out = Vec::with_capacity(images.len());
        for chunk in images.chunks(BATCH) {
            let decoded: Vec<_> = chunk.par_iter().map(|p| self.preprocess.load(p)).collect();
            let pixels: Vec<f32> = decoded
                .iter()
                .flatten()
                .flat_map(|(v, _)| v.iter().copied())
                .collect();
            let n = decoded.iter().filter(|d| d.is_ok()).count();
            let mut probs = self.probabilities(pixels, n)?.into_iter();
            for (image, result) in chunk.iter().zip(decoded) {
                let (top, warning) = match result {
                    Ok((_, warning)) => {
                        let row = probs.next().expect("one row per decoded image");
                        (Ok(self.top(&row, top_k)), warning)
                    }
                    Err(e) => (Err(e), None),
                };
                out.push(Prediction {
                    image: image.clone(),
                    top,
                    warning,
                });
            }
        }
        Ok(out)
    }

    /// Softmax rows of `n` preprocessed images.
    fn probabilities(&self, pixels: Vec<f32>, n: usize) -> anyhow::Result<Vec<Vec<f32>>> {
        if n == 0 {
            return Ok(Vec::new());
        }
        let size = self.preprocess.input_size;
        let x = Tensor::<4>::from_data(TensorData::new(pixels, [n, 3, size, size]), &self.device);
        let probs = to_vec(softmax(self.model.forward(x), 1))?;
        Ok(probs.chunks(probs.len() / n).map(<[f32]>::to_vec).collect())
    }

    fn top(&self, probs: &[f32], k: usize) -> Vec<TopClass> {
        let mut order: Vec<usize> = (0..probs.len()).collect();
        order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
        order
            .into_iter()
            .take(k)
            .map(|index| TopClass {
                index,
                label: self
                    .classes
                    .as_ref()
                    .and_then(|names| names.get(index).cloned())
                    .unwrap_or_else(|| format!("class {index}")),
                prob: probs[index],
            })
            .collect()
    }
}
