//! Run folders under misuse: an existing run is never mixed with new settings, resume takes
//! its own settings, stale comparisons are refused, broken run files are named, and the
//! numbers eval reports are the right ones.

mod common;
use std::path::{Path, PathBuf};

use common::*;

/// `train` on the ResNet-18 fixture at 32x32, plus `extra` (1 epoch unless it says).
fn train_args(data: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "train",
        "--weights",
        fixture("resnet18_w16.pth").to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--image-size",
        "32",
        "--batch-size",
        "8",
    ]
    .map(String::from)
    .to_vec();
    if !extra.contains(&"--epochs") {
        args.extend(["--epochs".to_string(), "1".to_string()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn write_json(path: &Path, value: &serde_json::Value) {
    std::fs::write(path, serde_json::to_vec_pretty(value).unwrap()).unwrap();
}

/// A toy dataset and one finished run on it.
fn trained(dir: &Path) -> (PathBuf, PathBuf) {
    let data = toy(dir, 8);
    let run = dir.join("run");
    retrain_ok(train_args(&data, &run, &[]));
    (data, run)
}

/// Every file of a run folder and its bytes, to prove nothing changed.
fn snapshot(run: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files = Vec::new();
    let mut stack = vec![run.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let bytes = std::fs::read(&path).unwrap();
                files.push((path, bytes));
            }
        }
    }
    files.sort();
    files
}

#[test]
fn train_into_an_existing_run_is_an_error_that_changes_nothing() {
    let dir = tempdir();
    let (data, run) = trained(dir.path());
    let before = snapshot(&run);
    for extra in [
        &["--lr", "0.5"][..],
        &["--arch", "resnet34", "--allow-partial"][..],
    ] {
        let stderr = retrain_err(train_args(&data, &run, extra));
        assert!(stderr.contains("already holds a run"), "{stderr}");
        assert!(
            stderr.contains(&format!("--resume {}", run.display())),
            "{stderr}"
        );
        assert!(stderr.contains("--overwrite"), "{stderr}");
        assert!(snapshot(&run) == before, "the run folder changed");
    }
    // --overwrite starts over with the new settings.
    retrain_ok(train_args(&data, &run, &["--overwrite", "--lr", "0.5"]));
    assert_eq!(json(&run.join("config.json"))["options"]["lr"], 0.5);
}

#[test]
fn resume_takes_the_runs_own_settings_and_refuses_others() {
    let dir = tempdir();
    let (_, run) = trained(dir.path());
    let before = snapshot(&run);
    let resume = |extra: &[&str]| {
        let mut args = vec!["train", "--resume", run.to_str().unwrap()];
        args.extend(extra);
        retrain(&args)
    };
    let out = resume(&["--lr", "0.1", "--epochs", "2"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--lr cannot be given with --resume"),
        "{stderr}"
    );
    assert!(snapshot(&run) == before, "the run folder changed");

    // A finished run says how to extend it; --epochs extends it.
    let out = resume(&[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("pass --epochs N to extend it"));
    assert!(resume(&["--epochs", "2"]).status.success());
    assert_eq!(json(&run.join("summary.json"))["epochs"], 2);
    assert_eq!(json(&run.join("config.json"))["options"]["epochs"], 2);
}

#[test]
fn resume_without_a_checkpoint_is_an_error_and_keeps_best() {
    let dir = tempdir();
    let (_, run) = trained(dir.path());
    std::fs::remove_dir_all(run.join("last")).unwrap();
    let best = std::fs::read(run.join("best.safetensors")).unwrap();
    let metrics = std::fs::read(run.join("metrics.csv")).unwrap();
    let stderr = retrain_err(["train", "--resume", run.to_str().unwrap(), "--epochs", "3"]);
    assert!(stderr.contains("last/state.json: missing"), "{stderr}");
    assert_eq!(std::fs::read(run.join("best.safetensors")).unwrap(), best);
    assert_eq!(std::fs::read(run.join("metrics.csv")).unwrap(), metrics);
}

#[test]
fn resume_removes_temporary_files_a_kill_left_behind() {
    let dir = tempdir();
    let (_, run) = trained(dir.path());
    let orphan = run.join(".retrain-AbCdEf.tmp");
    std::fs::write(&orphan, b"half a checkpoint").unwrap();
    retrain_ok(["train", "--resume", run.to_str().unwrap(), "--epochs", "2"]);
    assert!(!orphan.exists());
}

#[test]
fn broken_run_files_are_named() {
    let dir = tempdir();
    let (_, run) = trained(dir.path());
    let eval = |run: &Path| retrain_err(["eval", "--run", run.to_str().unwrap()]);

    // config.json with more class names than the network has outputs.
    let broken = dir.path().join("classes");
    copy_dir(&run, &broken);
    let mut config = json(&broken.join("config.json"));
    config["classes"]
        .as_array_mut()
        .unwrap()
        .push("extra".into());
    write_json(&broken.join("config.json"), &config);
    let stderr = eval(&broken);
    assert!(
        stderr.contains("config.json: 4 class names for a network with 3 outputs"),
        "{stderr}"
    );

    // config.json that is not JSON.
    let garbled = dir.path().join("garbled");
    copy_dir(&run, &garbled);
    std::fs::write(garbled.join("config.json"), b"{ not json").unwrap();
    assert!(eval(&garbled).contains("config.json: not valid"));

    // split.json with a label past the classes, and one with a path out of the data folder.
    for (name, edit) in [
        ("label", ("label", serde_json::json!(7))),
        ("path", ("path", serde_json::json!("../../etc/passwd"))),
    ] {
        let broken = dir.path().join(name);
        copy_dir(&run, &broken);
        let mut split = json(&broken.join("split.json"));
        split["val"][0][edit.0] = edit.1;
        write_json(&broken.join("split.json"), &split);
        let stderr = eval(&broken);
        assert!(stderr.contains("split.json"), "{name}: {stderr}");
    }

    // best.safetensors whose head does not fit config.json.
    let head = dir.path().join("head");
    copy_dir(&run, &head);
    std::fs::copy(fixture("resnet18_w16.pth"), head.join("best.safetensors")).unwrap();
    let stderr = eval(&head);
    assert!(stderr.contains("best.safetensors"), "{stderr}");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let target = to.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_dir(&path, &target);
        } else {
            std::fs::copy(&path, &target).unwrap();
        }
    }
}

fn compare_args(data: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "compare",
        "--weights",
        fixture("resnet18_w16.pth").to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--regimes",
        "head",
        "--epochs",
        "1",
        "--image-size",
        "32",
        "--batch-size",
        "8",
    ]
    .map(String::from)
    .to_vec();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

#[test]
fn compare_reuses_a_regime_only_with_the_same_settings_data_and_weights() {
    let dir = tempdir();
    let data = toy(dir.path(), 8);
    let out = dir.path().join("cmp");
    retrain_ok(compare_args(&data, &out, &[]));
    let stdout = retrain_ok(compare_args(&data, &out, &[]));
    assert!(stdout.contains("already trained, skipping"), "{stdout}");

    for extra in [
        &["--lr", "0.01"][..],
        &["--seed", "5"],
        &["--crop-scale", "0.5"],
    ] {
        let stderr = retrain_err(compare_args(&data, &out, extra));
        assert!(
            stderr.contains(extra[0]) || stderr.contains("split differently"),
            "{stderr}"
        );
        assert!(stderr.contains("--retrain"), "{stderr}");
    }
    // Other weights with the same path are told apart by their content.
    let weights = dir.path().join("w.pth");
    std::fs::copy(fixture("resnet18_w16.pth"), &weights).unwrap();
    let with_weights = |args: Vec<String>| -> Vec<String> {
        let at = args.iter().position(|a| a == "--weights").unwrap();
        let mut args = args;
        args[at + 1] = weights.display().to_string();
        args
    };
    let other = dir.path().join("cmp2");
    retrain_ok(with_weights(compare_args(&data, &other, &[])));
    std::fs::copy(fixture("resnet18_w16_legacy.pth"), &weights).unwrap();
    let stderr = retrain_err(with_weights(compare_args(&data, &other, &[])));
    assert!(stderr.contains("the checkpoint's content"), "{stderr}");

    // A changed image is named; --retrain trains again on the data as it is.
    let image = data
        .join("red_disk")
        .read_dir()
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    std::fs::write(
        &image,
        std::fs::read(fixture("../data/photos/coffee.png")).unwrap(),
    )
    .unwrap();
    let stderr = retrain_err(compare_args(&data, &out, &[]));
    let name = image.file_name().unwrap().to_str().unwrap();
    assert!(
        stderr.contains(name) && stderr.contains("changed"),
        "{stderr}"
    );
    let stdout = retrain_ok(compare_args(&data, &out, &["--retrain"]));
    assert!(!stdout.contains("already trained"), "{stdout}");
}

#[test]
fn eval_on_a_train_val_folder_scores_val() {
    let dir = tempdir();
    let (_, run) = trained(dir.path());
    // A train/ + val/ layout where only val/ has the photos of one class.
    let layout = dir.path().join("layout");
    let toy = toy(&dir.path().join("more"), 4);
    for split in ["train", "val"] {
        for class in ["blue_checker", "green_stripes", "red_disk"] {
            copy_dir(&toy.join(class), &layout.join(split).join(class));
        }
    }
    std::fs::remove_file(
        layout
            .join("val/red_disk")
            .read_dir()
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path(),
    )
    .unwrap();
    let report: serde_json::Value = serde_json::from_str(&retrain_ok([
        "eval",
        "--run",
        run.to_str().unwrap(),
        "--data",
        layout.to_str().unwrap(),
        "--json",
    ]))
    .unwrap();
    assert_eq!(report["num_images"], 11, "val/ holds 4 + 4 + 3 images");
    assert!(report["folder"].as_str().unwrap().ends_with("val"));
}

#[test]
fn without_validation_images_best_is_the_last_epoch_and_says_so() {
    let dir = tempdir();
    let data = toy(dir.path(), 8);
    let run = dir.path().join("run");
    let out = retrain(train_args(
        &data,
        &run,
        &["--val-fraction", "0", "--epochs", "2"],
    ));
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no validation images"), "{stderr}");
    let summary = json(&run.join("summary.json"));
    assert_eq!(summary["best_epoch"], 2);
    assert!(
        summary["best_means"]
            .as_str()
            .unwrap()
            .contains("last epoch")
    );
    let best = std::fs::read(run.join("best.safetensors")).unwrap();
    assert_eq!(
        best,
        std::fs::read(run.join("last/model.safetensors")).unwrap()
    );
}

#[test]
fn a_single_class_is_an_error() {
    let dir = tempdir();
    let data = toy(dir.path(), 4);
    for class in ["blue_checker", "green_stripes"] {
        std::fs::remove_dir_all(data.join(class)).unwrap();
    }
    let run = dir.path().join("run");
    let stderr = retrain_err(train_args(&data, &run, &[]));
    assert!(
        stderr.contains("only one class folder (red_disk)"),
        "{stderr}"
    );
    assert!(!run.exists(), "nothing is written");
}

#[test]
fn out_of_range_options_exit_2_naming_the_flag() {
    let dir = tempdir();
    let data = toy(dir.path(), 2);
    let run = dir.path().join("run");
    let cases: &[&[&str]] = &[
        &["--batch-size", "0"],
        &["--epochs", "0"],
        &["--lr=-1"],
        &["--lr", "NaN"],
        &["--label-smoothing", "1.5"],
        &["--label-smoothing", "NaN"],
        &["--crop-scale", "2"],
        &["--crop-scale", "NaN"],
        &["--image-size", "0"],
        &["--image-size", "100000"],
        &["--width", "0"],
        &["--width", "64"],
        &["--momentum", "NaN"],
        &["--val-fraction", "1"],
        &["--step-size", "0"],
        &["--weight-decay=-1"],
        &["--cache-views", "0"],
    ];
    for case in cases {
        let out = retrain(train_args(&data, &run, case));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{case:?}: {stderr}");
        let flag = case[0].split('=').next().unwrap();
        assert!(stderr.contains(flag), "{case:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{case:?}: {stderr}");
    }
    assert!(!run.exists());
    for args in [
        &["eval", "--run", "x", "--batch-size", "0"][..],
        &["predict", "--weights", "x", "--top-k", "0", "y.png"],
        &["bench", "--workload", "inference", "--batch-size", "100000"],
        &["bench", "--workload", "inference", "--steps", "0"],
        &["modules", "--arch", "resnet18", "--num-classes", "0"],
    ] {
        let out = retrain(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
    }
}
