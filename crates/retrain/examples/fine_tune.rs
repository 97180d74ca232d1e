//! Fine-tune from Rust: load pretrained weights by name, freeze the backbone, train the
//! head on a folder of class folders, export the result to ONNX (`OUT_DIR/model.onnx`), and
//! classify images with it.
//!
//! ```sh
//! cargo run --release --example fine_tune -- resnet18.IMAGENET1K_V1 photos/ run/ photo.jpg
//! ```
//!
//! The weights may also be a checkpoint file; `retrain weights` lists the names.

use std::path::{Path, PathBuf};

use burn::prelude::Device;
use retrain::evaluate::load_run;
use retrain::job::Job;
use retrain::onnx::{Deployment, export_onnx};
use retrain::predict::{Classifier, Prediction};
use retrain::train::{Existing, TrainOptions, train};

/// Train the head of `weights` on `data` into `out` for a few epochs, export the best epoch
/// to ONNX, then classify `images` with it.
fn fine_tune(
    weights: &str,
    data: &Path,
    out: &Path,
    images: &[PathBuf],
) -> retrain::Result<Vec<Prediction>> {
    let device = Device::flex();
    let job = Job::quiet(&device);
    let options = TrainOptions {
        weights: Some(weights.into()),
        data: Some(data.to_path_buf()),
        freeze: "backbone".into(),
        epochs: 3,
        ..TrainOptions::default()
    };
    let summary = train(&options, out, Existing::Replace, &job)?;
    println!("best validation top-1: {:.3}", summary.best_top1);
    let (model, config) = load_run(out, &device)?;
    export_onnx(
        &model,
        &Deployment::of_run(out, &config),
        &out.join("model.onnx"),
    )?;
    Classifier::from_run(out, &device)?.classify(images, 3)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [weights, data, out, images @ ..] = args.as_slice() else {
        anyhow::bail!("usage: fine_tune WEIGHTS DATA_DIR OUT_DIR IMAGE...");
    };
    let images: Vec<PathBuf> = images.iter().map(PathBuf::from).collect();
    for prediction in fine_tune(weights, Path::new(data), Path::new(out), &images)? {
        println!("{}", prediction.image.display());
        for class in prediction.top? {
            println!("  {:>6.2}%  {}", class.prob * 100.0, class.label);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example on a fixture checkpoint and a procedural data set.
    #[test]
    fn fine_tunes_a_fixture_and_classifies_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("toy");
        retrain::synth::write_dataset(&data, retrain::synth::Kind::Toy, 6, 32, 0).unwrap();
        let weights =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/resnet18_w16.pth");
        let image = data.join("red_disk").join(
            std::fs::read_dir(data.join("red_disk"))
                .unwrap()
                .next()
                .unwrap()
                .unwrap()
                .file_name(),
        );
        let run = dir.path().join("run");
        let predictions = fine_tune(
            weights.to_str().unwrap(),
            &data,
            &run,
            std::slice::from_ref(&image),
        )
        .unwrap();
        assert_eq!(predictions.len(), 1);
        assert_eq!(predictions[0].image, image);
        let top = predictions[0].top.as_ref().unwrap();
        assert_eq!(top.len(), 3);
        let classes = ["blue_checker", "green_stripes", "red_disk"];
        assert!(classes.contains(&top[0].label.as_str()), "{top:?}");
        assert!(top[0].prob >= top[1].prob && top[1].prob >= top[2].prob);
        assert!(run.join("summary.json").exists());
        let onnx = retrain::onnx_format::read(&run.join("model.onnx")).unwrap();
        let summary = retrain::onnx_format::Summary::of(&onnx);
        assert_eq!(
            summary.metadata["classes"],
            serde_json::to_string(&classes).unwrap()
        );
    }
}
