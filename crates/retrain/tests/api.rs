//! The library's typed errors: a program can tell the cases it handles apart.

use std::path::Path;

use burn::prelude::Device;
use retrain::job::Job;
use retrain::load::{LoadOptions, load_pretrained};
use retrain::train::{Existing, TrainOptions, train};

#[test]
fn errors_a_program_handles_have_their_own_variants() {
    let dir = tempfile::tempdir().unwrap();
    let device = Device::flex();
    let job = Job::quiet(&device);

    let garbage = dir.path().join("garbage.pth");
    std::fs::write(&garbage, b"not a checkpoint").unwrap();
    let err = load_pretrained(&garbage, &LoadOptions::default(), &device)
        .err()
        .unwrap();
    assert!(matches!(err, retrain::Error::Checkpoint(_)), "{err}");
    assert!(err.to_string().contains("garbage.pth"), "{err}");

    let data = dir.path().join("toy");
    retrain::synth::write_dataset(&data, retrain::synth::Kind::Toy, 4, 32, 0).unwrap();
    let options = TrainOptions {
        weights: Some(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/resnet18_w16.pth"),
        ),
        data: Some(data),
        freeze: "backbone".into(),
        epochs: 1,
        batch_size: 4,
        ..TrainOptions::default()
    };
    let run = dir.path().join("run");
    train(&options, &run, Existing::Refuse, &job).unwrap();
    let err = train(&options, &run, Existing::Refuse, &job).unwrap_err();
    assert!(matches!(err, retrain::Error::RunExists(_)), "{err}");

    let bad = TrainOptions {
        batch_size: 0,
        ..options
    };
    let err = train(&bad, &dir.path().join("other"), Existing::Refuse, &job).unwrap_err();
    assert!(matches!(err, retrain::Error::Other(_)), "{err}");
    assert!(err.to_string().contains("--batch-size"), "{err}");
}
