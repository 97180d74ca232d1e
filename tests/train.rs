//! `retrain train` on generated datasets: every regime, the freeze audit, frozen BatchNorm
//! statistics, exact resume, determinism, bad images and bad specs.

mod common;
use std::path::Path;

use common::*;
use retrain::checkpoint;

/// `train` on a fixture checkpoint at 32x32, plus `extra`.
fn train_args(weights: &str, data: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "train".into(),
        "--weights".into(),
        fixture(weights).display().to_string(),
        "--data".into(),
        data.display().to_string(),
        "--out".into(),
        out.display().to_string(),
        "--image-size".into(),
        "32".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// A successful run with batch 16 and milder crops; returns stdout.
fn train(data: &Path, out: &Path, weights: &str, extra: &[&str]) -> String {
    let mut all = vec!["--batch-size", "16", "--crop-scale", "0.5"];
    all.extend(extra);
    retrain_ok(train_args(weights, data, out, &all))
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(
        &std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
    .unwrap()
}

fn best_top1(run: &Path) -> f64 {
    json(&run.join("summary.json"))["best_top1"]
        .as_f64()
        .unwrap()
}

#[test]
fn full_fine_tune_learns_and_writes_the_run_folder() {
    let dir = tempdir();
    let data = toy(dir.path(), 30);
    let run = dir.path().join("run");
    let stdout = train(
        &data,
        &run,
        "resnet18_w16.pth",
        &["--freeze", "none", "--epochs", "3"],
    );
    assert!(stdout.contains("epoch   3/3"), "{stdout}");
    assert!(best_top1(&run) >= 0.9, "val top-1 {}", best_top1(&run));
    for f in [
        "config.json",
        "load_report.json",
        "split.json",
        "metrics.csv",
        "metrics.jsonl",
        "best.safetensors",
        "summary.json",
        "last/model.bpk",
        "last/state.json",
    ] {
        assert!(run.join(f).exists(), "{f}");
    }
    let csv = std::fs::read_to_string(run.join("metrics.csv")).unwrap();
    assert_eq!(csv.lines().count(), 4, "header + 3 epochs");
    assert!(csv.starts_with(
        "epoch,train_loss,train_acc,val_loss,val_top1,val_top5,lr,epoch_seconds,images_per_second"
    ));
    let config = json(&run.join("config.json"));
    assert_eq!(
        config["classes"],
        serde_json::json!(["blue_checker", "green_stripes", "red_disk"])
    );
    assert_eq!(config["preprocess"]["input_size"], 32);
    let split = json(&run.join("split.json"));
    assert_eq!(
        split["train"].as_array().unwrap().len() + split["val"].as_array().unwrap().len(),
        90
    );
    assert_eq!(split["train"][0]["sha256"].as_str().unwrap().len(), 64);

    // best.safetensors has PyTorch names and buffers, and loads back with 3 classes.
    let best = checkpoint::read(&run.join("best.safetensors"), None).unwrap();
    assert_eq!(best.get("fc.weight").unwrap().shape, vec![3, 128]);
    assert_eq!(best.get("bn1.num_batches_tracked").unwrap().dtype, "int64");
    let report = json(&run.join("load_report.json"));
    assert_eq!(report["head_reinitialized"].as_array().unwrap().len(), 2);
}

#[test]
fn head_only_with_and_without_feature_cache_reach_the_same_accuracy() {
    let dir = tempdir();
    let data = toy(dir.path(), 30);
    let args = ["--freeze", "backbone", "--epochs", "8", "--lr", "1e-2"];
    let cached = dir.path().join("cached");
    train(&data, &cached, "resnet18_w16.pth", &args);
    let naive = dir.path().join("naive");
    let mut naive_args = args.to_vec();
    naive_args.push("--no-feature-cache");
    train(&data, &naive, "resnet18_w16.pth", &naive_args);
    let (a, b) = (
        json(&cached.join("summary.json")),
        json(&naive.join("summary.json")),
    );
    assert_eq!(a["feature_cache"], true);
    assert_eq!(b["feature_cache"], false);
    assert!(a["best_top1"].as_f64().unwrap() >= 0.85, "{a}");
    assert!((a["best_top1"].as_f64().unwrap() - b["best_top1"].as_f64().unwrap()).abs() <= 0.15);
    assert_eq!(a["trainable_params"], 128 * 3 + 3);
    assert_eq!(a["freeze_audit_passed"], true);

    // Augmented views in the cache train the head too.
    let views = dir.path().join("views");
    let mut view_args = args.to_vec();
    view_args.extend(["--cache-views", "3"]);
    train(&data, &views, "resnet18_w16.pth", &view_args);
    let v = json(&views.join("summary.json"));
    assert!(v["best_top1"].as_f64().unwrap() >= 0.85, "{v}");
}

/// Frozen tensors, BatchNorm statistics included, come out bit-identical to the checkpoint;
/// with `--frozen-bn train` the statistics move but the weights do not.
#[test]
fn partial_freeze_keeps_weights_and_batchnorm_statistics_bit_identical() {
    let dir = tempdir();
    let data = toy(dir.path(), 20);
    let original = checkpoint::read(&fixture("mbv2_w025.pth"), None).unwrap();
    let frozen = |k: &str| {
        k.strip_prefix("features.")
            .and_then(|r| r.split('.').next()?.parse::<usize>().ok())
            .is_some_and(|i| i <= 13)
            && !k.ends_with("num_batches_tracked")
    };

    let run = dir.path().join("eval_bn");
    train(
        &data,
        &run,
        "mbv2_w025.pth",
        &["--freeze", "features.0-13", "--epochs", "2", "--lr", "1e-2"],
    );
    let trained = checkpoint::read(&run.join("last/model.safetensors"), None).unwrap();
    let mut checked = 0;
    for (name, t) in original.iter().filter(|(k, _)| frozen(k)) {
        assert_eq!(trained.get(name).unwrap().data, t.data, "{name} changed");
        checked += 1;
    }
    assert!(checked > 100, "checked {checked} frozen tensors");
    let moved = trained.get("features.16.conv.2.weight").unwrap().data
        != original.get("features.16.conv.2.weight").unwrap().data;
    assert!(moved, "unfrozen layers train");
    assert_eq!(json(&run.join("summary.json"))["frozen_tensors"], checked);

    let run = dir.path().join("train_bn");
    train(
        &data,
        &run,
        "mbv2_w025.pth",
        &[
            "--freeze",
            "features.0-13",
            "--frozen-bn",
            "train",
            "--epochs",
            "1",
        ],
    );
    let trained = checkpoint::read(&run.join("last/model.safetensors"), None).unwrap();
    let stat = "features.2.conv.0.1.running_mean";
    assert_ne!(
        trained.get(stat).unwrap().data,
        original.get(stat).unwrap().data,
        "stats move"
    );
    let w = "features.2.conv.0.0.weight";
    assert_eq!(
        trained.get(w).unwrap().data,
        original.get(w).unwrap().data,
        "weights stay"
    );
}

/// The audit compares checksums of frozen tensors; it flags a tensor that did change.
#[test]
fn freeze_audit_catches_a_tensor_that_was_not_really_frozen() {
    use burn::prelude::*;
    use retrain::freeze::{self, FreezeSet, FrozenBn};
    use retrain::models::{Arch, ModelSpec};

    let device = Device::flex().autodiff();
    let spec = ModelSpec::new(Arch::named("resnet18").unwrap(), 3);
    let model = spec.build(&device);
    let set = freeze::parse_spec("layer1", &spec, &model).unwrap();
    let before = freeze::checksums(&model, &set, FrozenBn::Eval);
    assert!(before.keys().any(|k| k == "layer1.0.conv1.weight"));

    // One training step with the freeze applied, and one with it forgotten.
    let step = |model: retrain::models::Model| {
        use burn::optim::{GradientsParams, SgdConfig};
        let x = Tensor::<4>::ones([2, 3, 32, 32], &device);
        let loss = model.forward(x).sum();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        SgdConfig::new().init().step(0.1, model, grads)
    };
    let frozen = step(freeze::apply(model.clone(), &set, FrozenBn::Eval));
    assert!(freeze::audit(&before, &freeze::checksums(&frozen, &set, FrozenBn::Eval)).is_empty());
    let leaky = step(freeze::apply(
        spec.build(&device),
        &FreezeSet::none(),
        FrozenBn::Eval,
    ));
    let changed = freeze::audit(&before, &freeze::checksums(&leaky, &set, FrozenBn::Eval));
    assert!(
        changed.iter().any(|k| k.starts_with("layer1.")),
        "{changed:?}"
    );
}

/// 2 epochs, then a resume for 2 more, equal 4 epochs straight: weights bit for bit and
/// the same metrics. Also shows that the same seed gives the same run.
#[test]
fn resume_continues_exactly() {
    let dir = tempdir();
    let data = toy(dir.path(), 20);
    let args = [
        "--freeze",
        "features.0-10",
        "--optimizer",
        "sgd",
        "--lr",
        "0.01",
        "--schedule",
        "constant",
    ];
    let straight = dir.path().join("straight");
    let mut a = args.to_vec();
    a.extend(["--epochs", "4"]);
    train(&data, &straight, "mbv2_w025.pth", &a);
    let resumed = dir.path().join("resumed");
    let mut b = args.to_vec();
    b.extend(["--epochs", "2"]);
    train(&data, &resumed, "mbv2_w025.pth", &b);
    retrain_ok([
        "train".as_ref(),
        "--resume".as_ref(),
        resumed.as_os_str(),
        "--epochs".as_ref(),
        "4".as_ref(),
    ]);

    let w = |run: &Path| std::fs::read(run.join("last/model.safetensors")).unwrap();
    assert!(w(&straight) == w(&resumed), "weights differ after resume");
    let metrics = |run: &Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let (ms, mr) = (metrics(&straight), metrics(&resumed));
    assert_eq!(ms.len(), 4);
    assert_eq!(mr.len(), 4);
    for (s, r) in ms.iter().zip(&mr) {
        for key in ["train_loss", "train_acc", "val_loss", "val_top1", "lr"] {
            let (x, y) = (s[key].as_f64().unwrap(), r[key].as_f64().unwrap());
            assert!(
                (x - y).abs() < 1e-9,
                "epoch {} {key}: {x} vs {y}",
                s["epoch"]
            );
        }
    }
    assert_eq!(
        json(&straight.join("split.json")),
        json(&resumed.join("split.json"))
    );
}

/// RegNet's PyTorch names (`trunk_output.block1.block1-0...`) differ from its module paths:
/// freezing the family's partial set by those names keeps exactly those tensors, BatchNorm
/// statistics included, bit-identical, and the rest trains.
#[test]
fn regnet_partial_freeze_follows_pytorch_names() {
    let dir = tempdir();
    let data = toy(dir.path(), 12);
    let original = checkpoint::read(&fixture("regnet_y_400mf_w025.pth"), None).unwrap();
    let run = dir.path().join("run");
    train(
        &data,
        &run,
        "regnet_y_400mf_w025.pth",
        &["--freeze", "partial", "--epochs", "1", "--lr", "1e-2"],
    );
    let trained = checkpoint::read(&run.join("last/model.safetensors"), None).unwrap();
    let frozen = |k: &str| {
        ["stem.", "trunk_output.block1.", "trunk_output.block2."]
            .iter()
            .any(|p| k.starts_with(p))
            && !k.ends_with("num_batches_tracked")
    };
    let mut checked = 0;
    for (name, t) in original.iter() {
        let after = &trained.get(name).unwrap_or_else(|| panic!("{name}")).data;
        if frozen(name) {
            assert_eq!(after, &t.data, "{name} changed");
            checked += 1;
        }
    }
    assert!(checked > 50, "checked {checked} frozen tensors");
    let moved = "trunk_output.block4.block4-5.f.c.0.weight";
    assert_ne!(
        trained.get(moved).unwrap().data,
        original.get(moved).unwrap().data
    );
    assert_eq!(json(&run.join("summary.json"))["frozen_tensors"], checked);
}

/// The same seed gives the same weights bit for bit on 1, 2 and 3 threads: every parallel
/// reduction combines its partial sums in a fixed order.
#[test]
fn runs_are_bit_identical_on_any_number_of_threads() {
    check_bit_identical_on_any_number_of_threads("resnet18_w16.pth", &["1", "2", "3"]);
}

/// Also where stochastic depth drops residual branches at random (EfficientNet): the masks
/// come from the seeded generator.
#[test]
fn stochastic_depth_runs_are_bit_identical_on_any_number_of_threads() {
    check_bit_identical_on_any_number_of_threads("effnet_b0_w025.pth", &["1", "2"]);
}

fn check_bit_identical_on_any_number_of_threads(weights: &str, thread_counts: &[&str]) {
    let dir = tempdir();
    let data = toy(dir.path(), 24);
    let run = |threads: &str| {
        let out = dir.path().join(format!("threads{threads}"));
        let args = train_args(
            weights,
            &data,
            &out,
            &["--batch-size", "24", "--epochs", "2", "--freeze", "none"],
        );
        let status = std::process::Command::new(env!("CARGO_BIN_EXE_retrain"))
            .args(&args)
            .env("RAYON_NUM_THREADS", threads)
            .output()
            .expect("run retrain");
        assert!(
            status.status.success(),
            "{}",
            String::from_utf8_lossy(&status.stderr)
        );
        std::fs::read(out.join("last/model.safetensors")).unwrap()
    };
    let one = run(thread_counts[0]);
    for threads in &thread_counts[1..] {
        assert!(run(threads) == one, "{threads} threads differ from 1");
    }
}

#[test]
fn two_phase_unfreeze_trains_head_first_then_the_rest() {
    let dir = tempdir();
    let data = toy(dir.path(), 20);
    let run = dir.path().join("run");
    let out = retrain(train_args(
        "resnet18_w16.pth",
        &data,
        &run,
        &[
            "--batch-size",
            "16",
            "--freeze",
            "layer1",
            "--unfreeze-at",
            "1",
            "--epochs",
            "2",
            "--head-lr-mult",
            "10",
            "--label-smoothing",
            "0.1",
            "--class-weights",
            "auto",
            "--optimizer",
            "sgd",
            "--nesterov",
            "--schedule",
            "step",
        ],
    ));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("unfreezing"));
    let summary = json(&run.join("summary.json"));
    assert_eq!(summary["freeze_audit_passed"], true);
    assert_eq!(summary["epochs"], 2);
}

#[test]
fn unreadable_images_are_skipped_and_named() {
    let dir = tempdir();
    let data = toy(dir.path(), 12);
    std::fs::write(
        data.join("red_disk/broken.jpg"),
        b"\xff\xd8\xff\xe0 not really a jpeg",
    )
    .unwrap();
    std::fs::write(data.join("red_disk/notes.txt"), b"ignored").unwrap();
    std::fs::write(data.join("red_disk/.hidden.png"), b"ignored").unwrap();
    let run = dir.path().join("run");
    let out = retrain(train_args(
        "resnet18_w16.pth",
        &data,
        &run,
        &["--epochs", "1", "--val-fraction", "0"],
    ));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("broken.jpg"));
    let skipped = json(&run.join("summary.json"))["skipped_images"].clone();
    assert_eq!(skipped.as_array().unwrap().len(), 1, "{skipped}");
    assert!(skipped[0].as_str().unwrap().contains("broken.jpg"));

    // A class whose images are all unreadable is an error.
    let bad = dir.path().join("bad");
    std::fs::create_dir_all(bad.join("a")).unwrap();
    std::fs::create_dir_all(bad.join("b")).unwrap();
    std::fs::copy(data.join("red_disk/0000.png"), bad.join("a/x.png")).unwrap();
    std::fs::write(bad.join("b/y.png"), b"garbage").unwrap();
    let stderr = retrain_err(train_args(
        "resnet18_w16.pth",
        &bad,
        &dir.path().join("r2"),
        &["--epochs", "1"],
    ));
    assert!(stderr.contains("class 'b'"), "{stderr}");
}

/// A diverging run stops with a clear message and never saves a non-finite checkpoint.
#[test]
fn a_non_finite_loss_stops_the_run() {
    let dir = tempdir();
    let data = toy(dir.path(), 10);
    let run = dir.path().join("run");
    let stderr = retrain_err(train_args(
        "resnet18_w16.pth",
        &data,
        &run,
        &[
            "--batch-size",
            "8",
            "--epochs",
            "3",
            "--optimizer",
            "sgd",
            "--lr",
            "1e8",
            "--schedule",
            "constant",
        ],
    ));
    assert!(
        stderr.contains("became") && stderr.contains("Try a lower --lr"),
        "{stderr}"
    );
    if let Ok(text) = std::fs::read_to_string(run.join("metrics.jsonl")) {
        for line in text.lines() {
            let m: serde_json::Value = serde_json::from_str(line).unwrap();
            assert!(m["val_loss"].as_f64().is_some_and(f64::is_finite), "{line}");
        }
    }
}

#[test]
fn bad_freeze_spec_lists_the_valid_names() {
    let dir = tempdir();
    let data = toy(dir.path(), 4);
    let cases = [
        ("encoder.3", "top-level modules: features, classifier"),
        ("features.20-30", "goes past the last module, features.18"),
        (
            "features.0-18446744073709551615",
            "goes past the last module, features.18",
        ),
    ];
    for (spec, message) in cases {
        let stderr = retrain_err(train_args(
            "mbv2_w025.pth",
            &data,
            &dir.path().join("r"),
            &["--freeze", spec, "--epochs", "1"],
        ));
        assert!(stderr.contains(message), "{stderr}");
        assert!(
            !dir.path().join("r").exists(),
            "nothing is written for a bad spec"
        );
    }
}

/// Ctrl-C stops the run with exit code 130, keeping the last finished epoch, and the run
/// resumes from there.
#[test]
fn ctrl_c_keeps_the_last_checkpoint_and_the_run_resumes() {
    use std::io::BufRead;
    let dir = tempdir();
    let data = toy(dir.path(), 20);
    let run = dir.path().join("run");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_retrain"))
        .args(train_args(
            "mbv2_w025.pth",
            &data,
            &run,
            &[
                "--batch-size",
                "4",
                "--epochs",
                "200",
                "--schedule",
                "constant",
            ],
        ))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    assert!(first.starts_with("epoch   1/200"), "{first}");
    std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    let state = json(&run.join("last/state.json"));
    let done = state["epochs_done"].as_u64().unwrap();
    assert!((1..200).contains(&done), "{state}");
    assert!(!run.join("last.tmp").exists(), "no half-written checkpoint");

    let out = retrain([
        "train",
        "--resume",
        run.to_str().unwrap(),
        "--epochs",
        &(done + 1).to_string(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(json(&run.join("summary.json"))["epochs"], done + 1);
}

/// `--layer-decay 0.5` on a two-block ViT with the stem frozen: each group's learning rate
/// is the head's halved per depth below it (timm's `layer_decay`; the final norm shares the
/// head's), the frozen stem is absent, and the first SGD step moves each group by exactly
/// that fraction of what it moves without decay.
#[test]
fn layer_decay_scales_each_groups_learning_rate() {
    let dir = tempdir();
    let data = toy(dir.path(), 8);
    let common = [
        "--freeze",
        "stem",
        "--optimizer",
        "sgd",
        "--schedule",
        "constant",
        "--epochs",
        "1",
        "--batch-size",
        "64",
        "--lr",
        "0.5",
    ];
    let (plain, decayed) = (dir.path().join("plain"), dir.path().join("decayed"));
    retrain_ok(train_args("vit_w128.pth", &data, &plain, &common));
    let mut with_decay = common.to_vec();
    with_decay.extend(["--layer-decay", "0.5"]);
    retrain_ok(train_args("vit_w128.pth", &data, &decayed, &with_decay));

    let scales = &json(&decayed.join("summary.json"))["lr_scales"];
    let expected = serde_json::json!([
        {"group": "block0", "scale": 0.25},
        {"group": "block1", "scale": 0.5},
        {"group": "norm", "scale": 1.0},
        {"group": "head", "scale": 1.0},
    ]);
    assert_eq!(scales, &expected);
    assert_eq!(
        json(&plain.join("summary.json"))["lr_scales"],
        serde_json::json!([])
    );

    let original = checkpoint::read(&fixture("vit_w128.pth"), None).unwrap();
    let weights = |run: &Path| checkpoint::read(&run.join("last/model.safetensors"), None).unwrap();
    let (a, b) = (weights(&plain), weights(&decayed));
    let moved = |sd: &checkpoint::StateDict, prefix: &str| -> f64 {
        sd.iter()
            .filter(|(name, _)| name.starts_with(prefix))
            .map(|(name, t)| {
                let start = original.get(name).map(|o| o.data.clone());
                let start = start.unwrap_or_else(|| vec![0.0; t.data.len()]);
                t.data
                    .iter()
                    .zip(&start)
                    .map(|(x, y)| f64::from((x - y).abs()))
                    .sum::<f64>()
            })
            .sum()
    };
    for (prefix, scale) in [
        ("encoder.layers.encoder_layer_0.", 0.25),
        ("encoder.layers.encoder_layer_1.", 0.5),
        ("encoder.ln.", 1.0),
    ] {
        let ratio = moved(&b, prefix) / moved(&a, prefix);
        assert!(
            (ratio - scale).abs() < 1e-3 * scale,
            "{prefix}: moved {ratio} as far, not {scale}"
        );
    }
    assert_eq!(moved(&b, "conv_proj."), 0.0, "the frozen stem stays");
}
