//! Using a trained run: load it, evaluate it (metrics, confusion matrix, hardest images),
//! and classify new images with its classes and preprocessing.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use burn::prelude::*;
use serde::Serialize;

use crate::checkpoint;
use crate::data::{self, Entry, ImageSet, Split, Transform};
use crate::error::{Result, bail};
use crate::load::apply_state_dict;
use crate::models::Model;
use crate::output::read_json;
use crate::train::RunConfig;

/// A run's network with its best weights (the last epoch's when the run had no
/// validation images), checked against the run's `config.json`.
pub fn load_run(run: &Path, device: &Device) -> Result<(Model, RunConfig)> {
    let config_path = run.join("config.json");
    if !config_path.exists() {
        bail!("{}: not a run folder (no config.json)", run.display());
    }
    let config: RunConfig = read_json(&config_path)?;
    config.check(&config_path)?;
    let weights = run.join("best.safetensors");
    if !weights.exists() {
        bail!(
            "{}: missing (the run has not finished an epoch)",
            weights.display()
        );
    }
    let sd = checkpoint::read(&weights, None)?;
    let mut model = config.model.build(device);
    let report = apply_state_dict(&mut model, &config.model, &sd, false).with_context(|| {
        format!(
            "{}: does not fit the network of config.json",
            weights.display()
        )
    })?;
    if let Some(head) = report.head_reinitialized.first() {
        bail!(
            "{}: its head {} has shape {:?}, but config.json's network needs {:?}",
            weights.display(),
            head.name,
            head.old_shape,
            head.new_shape
        );
    }
    report.refuse_non_finite()?;
    Ok((model, config))
}

/// Precision and recall of one class.
#[derive(Debug, Clone, Serialize)]
pub struct ClassMetrics {
    /// Class name.
    pub class: String,
    /// Share of the images predicted as this class that are of it (0 when none are).
    pub precision: f64,
    /// Share of this class's images predicted as it (0 when it has none).
    pub recall: f64,
    /// Images of this class evaluated.
    pub support: usize,
}

/// One off-diagonal cell of the confusion matrix: a mistake and how often it was made.
#[derive(Debug, Clone, Serialize)]
pub struct Confusion {
    /// Class the images are of.
    pub true_class: String,
    /// Class they were taken for.
    pub predicted: String,
    /// How many images.
    pub count: usize,
}

/// One image with its loss, for the list of hardest images.
#[derive(Debug, Clone, Serialize)]
pub struct HardImage {
    /// Path relative to [`EvalReport::folder`].
    pub image: String,
    /// Class it is of.
    pub true_class: String,
    /// Class the network predicted (the top-1).
    pub predicted: String,
    /// Its cross-entropy (no label smoothing, no class weights).
    pub loss: f64,
}

/// The results of `retrain evaluate`, saved as the run's `eval.json` ([`render`] prints them).
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    /// The folder the images came from.
    pub folder: String,
    /// Images evaluated (those that decoded).
    pub num_images: usize,
    /// Top-1 accuracy, as a fraction.
    pub top1: f64,
    /// Top-5 accuracy, as a fraction.
    pub top5: f64,
    /// Mean cross-entropy per image.
    pub loss: f64,
    /// Precision and recall per class, in class order.
    pub per_class: Vec<ClassMetrics>,
    /// Rows: true class; columns: predicted class.
    pub confusion: Vec<Vec<usize>>,
    /// The ten commonest mistakes, commonest first.
    pub most_confused: Vec<Confusion>,
    /// The ten images of highest loss, highest first.
    pub highest_loss: Vec<HardImage>,
    /// Files that could not be decoded, with the reason.
    pub skipped_images: Vec<String>,
}

/// The images to evaluate and where they are: `data`'s class folders (its `val/` when it
/// has `train/` and `val/`), or the run's validation split.
fn eval_entries(
    config: &RunConfig,
    run: &Path,
    data: Option<&Path>,
) -> anyhow::Result<(PathBuf, Vec<Entry>)> {
    match data {
        Some(dir) => {
            let dir = if dir.join("train").is_dir() && dir.join("val").is_dir() {
                dir.join("val")
            } else {
                dir.to_path_buf()
            };
            let split = Split::make(&dir, 0.0, 0)?;
            let mut entries = Vec::new();
            for e in split.train {
                let name = &split.classes[e.label];
                let label = config
                    .classes
                    .iter()
                    .position(|c| c == name)
                    .with_context(|| {
                        format!(
                            "{}: class '{name}' is not one of the run's classes ({})",
                            dir.display(),
                            config.classes.join(", ")
                        )
                    })?;
                entries.push(Entry { label, ..e });
            }
            Ok((dir, entries))
        }
        None => {
            let split_path = run.join("split.json");
            let split = read_json::<Split>(&split_path)?.check(&split_path)?;
            if split.classes != config.classes {
                bail!(
                    "{}: its classes do not match those of config.json",
                    split_path.display()
                );
            }
            let dir = config
                .options
                .data
                .clone()
                .context("the run does not record its data folder; pass --data")?;
            if split.val.is_empty() {
                bail!(
                    "{}: the run has no validation images; pass --data",
                    run.display()
                );
            }
            Ok((dir, split.val))
        }
    }
}

/// Evaluate the run in `run` with its best weights on `data`'s class folders (its `val/`
/// when it has `train/` and `val/`) or, without `data`, on the run's validation split.
pub fn evaluate_run(
    run: &Path,
    data: Option<&Path>,
    batch_size: usize,
    device: &Device,
) -> Result<EvalReport> {
    let (model, config) = load_run(run, device)?;
    let model = model.for_inference();
    let (root, entries) = eval_entries(&config, run, data)?;
    let pre = config.preprocess.clone();
    let set = ImageSet::load(&root, &entries, pre.resize_size.max(pre.input_size));
    if !set.changed.is_empty() {
        bail!(
            "{}: {} image(s) are missing or changed since the split was made: {}",
            root.display(),
            set.changed.len(),
            crate::data::first_ten(&set.changed)
        );
    }
    if set.is_empty() {
        bail!("{}: no readable images to evaluate", root.display());
    }
    let set = Arc::new(set);
    let k = config.classes.len();
    let mut confusion = vec![vec![0usize; k]; k];
    let (mut loss_sum, mut top1, mut top5) = (0.0, 0, 0);
    let mut hard = Vec::new();
    let order: Vec<usize> = (0..set.len()).collect();
    let size = pre.input_size;
    for batch in data::batches(set.clone(), pre.clone(), order, batch_size, Transform::Eval) {
        let batch = batch?;
        let n = batch.labels.len();
        let x = Tensor::<4>::from_data(TensorData::new(batch.pixels, [n, 3, size, size]), device);
        let logits = crate::models::to_vec(model.forward(x))?;
        for ((row, &label), &i) in logits.chunks(k).zip(&batch.labels).zip(&batch.indices) {
            let (loss, t1, t5) = crate::train::score(row, &[label], k);
            let pred = crate::train::argmax(row);
            confusion[label][pred] += 1;
            loss_sum += loss;
            top1 += t1;
            top5 += t5;
            hard.push(HardImage {
                image: set.paths[i].display().to_string(),
                true_class: config.classes[label].clone(),
                predicted: config.classes[pred].clone(),
                loss,
            });
        }
    }
    let n = set.len().max(1) as f64;
    let per_class = (0..k)
        .map(|c| {
            let tp = confusion[c][c] as f64;
            let predicted: usize = confusion.iter().map(|row| row[c]).sum();
            let support: usize = confusion[c].iter().sum();
            ClassMetrics {
                class: config.classes[c].clone(),
                precision: if predicted > 0 {
                    tp / predicted as f64
                } else {
                    0.0
                },
                recall: if support > 0 {
                    tp / support as f64
                } else {
                    0.0
                },
                support,
            }
        })
        .collect();
    let mut most_confused: Vec<Confusion> = (0..k)
        .flat_map(|t| (0..k).map(move |p| (t, p)))
        .filter(|&(t, p)| t != p && confusion[t][p] > 0)
        .map(|(t, p)| Confusion {
            true_class: config.classes[t].clone(),
            predicted: config.classes[p].clone(),
            count: confusion[t][p],
        })
        .collect();
    most_confused.sort_by_key(|c| std::cmp::Reverse(c.count));
    most_confused.truncate(10);
    hard.sort_by(|a, b| b.loss.total_cmp(&a.loss));
    hard.truncate(10);
    Ok(EvalReport {
        folder: root.display().to_string(),
        num_images: set.len(),
        top1: top1 as f64 / n,
        top5: top5 as f64 / n,
        loss: loss_sum / n,
        per_class,
        confusion,
        most_confused,
        highest_loss: hard,
        skipped_images: set.skipped.clone(),
    })
}

/// The report as text, confusion matrix included.
pub fn render(report: &EvalReport, classes: &[String]) -> String {
    let mut out = format!(
        "{} images of {}: top-1 {:.2}%, top-5 {:.2}%, loss {:.4}\n\nper class:\n",
        report.num_images,
        report.folder,
        report.top1 * 100.0,
        report.top5 * 100.0,
        report.loss
    );
    let width = classes.iter().map(String::len).max().unwrap_or(5).max(5);
    for m in &report.per_class {
        out.push_str(&format!(
            "  {:<width$}  precision {:>6.2}%  recall {:>6.2}%  ({} images)\n",
            m.class,
            m.precision * 100.0,
            m.recall * 100.0,
            m.support
        ));
    }
    out.push_str("\nconfusion matrix (rows: true, columns: predicted):\n");
    out.push_str(&format!("  {:<width$}", ""));
    for i in 0..classes.len() {
        out.push_str(&format!(" {i:>5}"));
    }
    out.push('\n');
    for (i, row) in report.confusion.iter().enumerate() {
        out.push_str(&format!("  {:<width$}", format!("{i} {}", classes[i])));
        for c in row {
            out.push_str(&format!(" {c:>5}"));
        }
        out.push('\n');
    }
    if !report.most_confused.is_empty() {
        out.push_str("\nmost confused:\n");
        for c in report.most_confused.iter().take(5) {
            out.push_str(&format!(
                "  {} -> {}: {}\n",
                c.true_class, c.predicted, c.count
            ));
        }
    }
    out.push_str("\nhighest loss:\n");
    for h in report.highest_loss.iter().take(5) {
        out.push_str(&format!(
            "  {:.3}  {} (true {}, predicted {})\n",
            h.loss, h.image, h.true_class, h.predicted
        ));
    }
    out
}

/// Image files named on the command line, folders walked (sorted); what the walks passed
/// over (directory loops, files that are not regular) comes second.
pub fn expand_images(paths: &[PathBuf]) -> Result<(Vec<PathBuf>, Vec<String>)> {
    let (mut out, mut warnings) = (Vec::new(), Vec::new());
    for p in paths {
        if p.is_dir() {
            let found = data::Found::walk(p)?;
            out.extend(found.files);
            warnings.extend(found.warnings);
        } else {
            out.push(p.clone());
        }
    }
    Ok((out, warnings))
}
