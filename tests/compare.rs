//! `compare`, `eval`, `export` and `predict --run` on a generated dataset.

mod common;
use std::path::Path;

use common::*;
use retrain::checkpoint;

fn compare_args<'a>(data: &'a Path, out: &'a Path, weights: &'a Path) -> Vec<&'a std::ffi::OsStr> {
    compare_args_at(data, out, weights, "32")
}

/// [`compare_args`] at another image size.
fn compare_args_at<'a>(
    data: &'a Path,
    out: &'a Path,
    weights: &'a Path,
    image_size: &'a str,
) -> Vec<&'a std::ffi::OsStr> {
    vec![
        "compare".as_ref(),
        "--weights".as_ref(),
        weights.as_os_str(),
        "--data".as_ref(),
        data.as_os_str(),
        "--out".as_ref(),
        out.as_os_str(),
        "--epochs".as_ref(),
        "2".as_ref(),
        "--image-size".as_ref(),
        image_size.as_ref(),
        "--batch-size".as_ref(),
        "16".as_ref(),
    ]
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(
        &std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
    .unwrap()
}

#[test]
fn compare_trains_every_regime_draws_the_figure_and_resumes() {
    let dir = tempdir();
    let data = toy(dir.path(), 16);
    let out = dir.path().join("cmp");
    let weights = fixture("resnet18_w16.pth");
    let stdout = retrain_ok(compare_args(&data, &out, &weights));
    assert!(stdout.contains("| regime |"), "{stdout}");

    let summary = json(&out.join("summary.json"));
    let regimes: Vec<&str> = summary["regimes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["regime"].as_str().unwrap())
        .collect();
    assert_eq!(regimes, ["head", "partial", "full", "scratch"]);
    for r in summary["regimes"].as_array().unwrap() {
        assert_eq!(r["freeze_audit_passed"], true);
        assert!(r["peak_memory_mib"].as_f64().unwrap() > 0.0);
        assert!(r["best_top1"].as_f64().unwrap() <= 1.0);
        let name = r["regime"].as_str().unwrap();
        assert_eq!(
            json(
                &out.join(name)
                    .join("metrics.jsonl")
                    .with_file_name("summary.json")
            )["epochs"],
            2
        );
        // Every regime trained on the same split.
        assert_eq!(
            json(&out.join(name).join("split.json")),
            json(&out.join("split.json")),
            "{name}"
        );
    }
    let head = &summary["regimes"][0];
    let full = &summary["regimes"][2];
    assert!(head["trainable_params"].as_u64() < full["trainable_params"].as_u64());
    assert_eq!(summary["regimes"][1]["freeze"], "conv1,bn1,layer1,layer2");
    assert!(
        json(&out.join("scratch/config.json"))["options"]["scratch"]
            .as_bool()
            .unwrap()
    );
    assert!(!summary["conclusion"].as_str().unwrap().is_empty());
    let md = std::fs::read_to_string(out.join("summary.md")).unwrap();
    assert!(md.contains("| head |") && md.contains("| scratch |") && md.contains("curves.png"));

    let png = image::open(out.join("curves.png")).expect("curves.png is an image");
    assert_eq!((png.width(), png.height()), (1200, 520));
    let svg = std::fs::read_to_string(out.join("curves.svg")).unwrap();
    assert!(svg.contains("<svg") && svg.contains("scratch (val)") && svg.contains("head (train)"));
    assert!(
        svg.contains("stroke-dasharray")
            || svg.matches("<line").count() + svg.matches("<polyline").count() > 8
    );

    // Run again: finished regimes are not retrained.
    let before = std::fs::metadata(out.join("full/best.safetensors"))
        .unwrap()
        .modified()
        .unwrap();
    let stdout = retrain_ok(compare_args(&data, &out, &weights));
    assert_eq!(
        stdout.matches("already trained, skipping").count(),
        4,
        "{stdout}"
    );
    assert_eq!(
        before,
        std::fs::metadata(out.join("full/best.safetensors"))
            .unwrap()
            .modified()
            .unwrap()
    );

    // An interrupted comparison (a regime without its summary) trains only that one.
    std::fs::remove_file(out.join("scratch/summary.json")).unwrap();
    let stdout = retrain_ok(compare_args(&data, &out, &weights));
    assert_eq!(
        stdout.matches("already trained, skipping").count(),
        3,
        "{stdout}"
    );
}

/// A newer family through `compare`: MobileNetV3's head regime trains only `classifier.3`
/// on cached features (its pretrained `classifier.0` frozen with the backbone), its partial
/// regime freezes the family's lower stages, and every freeze audit passes.
#[test]
fn compare_runs_a_mobilenet_v3_head_partial_and_full() {
    let dir = tempdir();
    let data = toy(dir.path(), 12);
    let out = dir.path().join("cmp");
    let weights = fixture("mbv3_small_w025.pth");
    let mut args = compare_args(&data, &out, &weights);
    args.extend([
        std::ffi::OsStr::new("--regimes"),
        "head,partial,full".as_ref(),
    ]);
    retrain_ok(args);
    let summary = json(&out.join("summary.json"));
    let regimes = summary["regimes"].as_array().unwrap();
    let names: Vec<&str> = regimes
        .iter()
        .map(|r| r["regime"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["head", "partial", "full"]);
    for r in regimes {
        assert_eq!(r["freeze_audit_passed"], true, "{}", r["regime"]);
    }
    assert_eq!(regimes[1]["freeze"], "features.0-8");
    let head_outputs = 3 * 256 + 3; // the toy set's three classes, from 256 features
    assert_eq!(regimes[0]["trainable_params"].as_u64(), Some(head_outputs));
    let head_run = json(&out.join("head/summary.json"));
    assert_eq!(head_run["feature_cache"], true, "{head_run}");
    let trainable = |r: &serde_json::Value| r["trainable_params"].as_u64().unwrap();
    assert!(trainable(&regimes[0]) < trainable(&regimes[1]));
    assert!(trainable(&regimes[1]) < trainable(&regimes[2]));
}

/// `compare` of head, partial and full on the toy set at `image_size`, every freeze audit
/// passed; returns the folder, the regimes' summaries and the full run exported to `.pth`.
fn compare_three_regimes(
    weights: &Path,
    image_size: &str,
) -> (
    tempfile::TempDir,
    Vec<serde_json::Value>,
    std::path::PathBuf,
) {
    let dir = tempdir();
    let data = toy(dir.path(), 12);
    let out = dir.path().join("cmp");
    let mut args = compare_args_at(&data, &out, weights, image_size);
    args.extend([
        std::ffi::OsStr::new("--regimes"),
        "head,partial,full".as_ref(),
    ]);
    retrain_ok(args);
    let summary = json(&out.join("summary.json"));
    let regimes = summary["regimes"].as_array().unwrap().clone();
    for r in &regimes {
        assert_eq!(r["freeze_audit_passed"], true, "{}", r["regime"]);
    }
    assert_eq!(json(&out.join("head/summary.json"))["feature_cache"], true);
    let exported = dir.path().join("full.pth");
    retrain_ok([
        "export".as_ref(),
        "--run".as_ref(),
        out.join("full").as_os_str(),
        "--out".as_ref(),
        exported.as_os_str(),
    ]);
    (dir, regimes, exported)
}

/// A ViT through `compare` at another image size than its position embeddings' (48 for
/// 32): the head regime trains `heads.head` on cached class tokens, partial freezes the
/// patch embedding and the first half of the blocks, and the full regime trains the stored
/// position embeddings through their resampling (same shape, new values).
#[test]
fn compare_runs_a_vit_at_another_image_size() {
    let weights = fixture("vit_w128.pth");
    let (_dir, regimes, exported) = compare_three_regimes(&weights, "48");
    assert_eq!(regimes[1]["freeze"], "stem,block0");
    assert_eq!(regimes[0]["trainable_params"].as_u64(), Some(3 * 128 + 3));
    let pos = |path: &Path| {
        let sd = checkpoint::read(path, None).unwrap();
        let t = sd.get("encoder.pos_embedding").unwrap();
        (t.shape.clone(), t.data.clone())
    };
    let (trained, pretrained) = (pos(&exported), pos(&weights));
    assert_eq!(trained.0, [1, 17, 128]);
    assert_ne!(
        trained.1, pretrained.1,
        "the position embeddings were trained"
    );
}

/// A Swin V2 through `compare` at 40x40, where every stage pads to whole windows and the
/// merging halves odd sides: partial freezes the patch embedding and the first two
/// stages, and the full regime trains V2's temperatures and position-bias MLP through the
/// window attention; the relative-position index stays what it was.
#[test]
fn compare_runs_a_swin_v2_at_an_odd_image_size() {
    let weights = fixture("swin_v2_t_w16.pth");
    let (_dir, regimes, exported) = compare_three_regimes(&weights, "40");
    assert_eq!(regimes[1]["freeze"], "features.0-4");
    assert_eq!(regimes[0]["trainable_params"].as_u64(), Some(3 * 128 + 3));
    let (trained, pretrained) = (
        checkpoint::read(&exported, None).unwrap(),
        checkpoint::read(&weights, None).unwrap(),
    );
    for name in [
        "features.1.1.attn.logit_scale",
        "features.7.1.attn.cpb_mlp.0.weight",
        "features.5.0.attn.qkv.weight",
    ] {
        let (a, b) = (trained.get(name).unwrap(), pretrained.get(name).unwrap());
        assert_eq!(a.shape, b.shape, "{name}");
        assert_ne!(a.data, b.data, "{name} was trained");
    }
    let index = "features.3.1.attn.relative_position_index";
    assert_eq!(
        trained.get(index).unwrap().data,
        pretrained.get(index).unwrap().data
    );
}

#[test]
fn regimes_can_be_chosen_with_a_custom_partial_spec() {
    let dir = tempdir();
    let data = toy(dir.path(), 16);
    let out = dir.path().join("cmp");
    let weights = fixture("mbv2_w025.pth");
    let mut args = compare_args(&data, &out, &weights);
    for a in ["--regimes", "head,partial:features.0-5"] {
        args.push(a.as_ref());
    }
    retrain_ok(args);
    let summary = json(&out.join("summary.json"));
    assert_eq!(summary["regimes"].as_array().unwrap().len(), 2);
    assert_eq!(summary["regimes"][1]["freeze"], "features.0-5");

    let stderr = retrain_err([
        "compare",
        "--weights",
        weights.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--regimes",
        "head,bogus",
    ]);
    assert!(stderr.contains("unknown regime 'bogus'"), "{stderr}");
}

/// Train once, then evaluate, predict and export the run.
#[test]
fn eval_predict_and_export_use_the_run() {
    let dir = tempdir();
    let data = toy(dir.path(), 16);
    let run = dir.path().join("run");
    retrain_ok([
        "train",
        "--weights",
        fixture("resnet18_w16.pth").to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
        "--image-size",
        "32",
        "--batch-size",
        "16",
        "--epochs",
        "6",
        "--lr",
        "2e-3",
        "--crop-scale",
        "0.5",
    ]);

    // eval on the run's validation split, and on a folder.
    let text = retrain_ok(["eval", "--run", run.to_str().unwrap()]);
    assert!(
        text.contains("confusion matrix") && text.contains("precision"),
        "{text}"
    );
    assert!(run.join("confusion.png").exists());
    let report: serde_json::Value = serde_json::from_str(&retrain_ok([
        "eval",
        "--run",
        run.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--json",
    ]))
    .unwrap();
    assert_eq!(report["num_images"], 48);
    let confusion = report["confusion"].as_array().unwrap();
    let total: u64 = confusion
        .iter()
        .flat_map(|r| r.as_array().unwrap())
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(total, 48);
    let diagonal: u64 = (0..3).map(|i| confusion[i][i].as_u64().unwrap()).sum();
    assert!((report["top1"].as_f64().unwrap() - diagonal as f64 / 48.0).abs() < 1e-9);
    assert_eq!(report["per_class"].as_array().unwrap().len(), 3);
    assert!(report["highest_loss"].as_array().unwrap().len() <= 10);

    // predict on a folder with the run's class names.
    let preds: serde_json::Value = serde_json::from_str(&retrain_ok([
        "predict",
        "--run",
        run.to_str().unwrap(),
        "--json",
        "--top-k",
        "2",
        data.join("red_disk").to_str().unwrap(),
    ]))
    .unwrap();
    let preds = preds.as_array().unwrap();
    assert_eq!(preds.len(), 16);
    let right = preds
        .iter()
        .filter(|p| p["top"][0]["label"] == "red_disk")
        .count();
    assert!(right >= 12, "{right} of 16 red disks recognised");

    // export: .pth (zip) and .safetensors, read back through our own loader.
    let pth = dir.path().join("model.pth");
    retrain_ok([
        "export",
        "--run",
        run.to_str().unwrap(),
        "--out",
        pth.to_str().unwrap(),
    ]);
    let st = dir.path().join("model.safetensors");
    retrain_ok([
        "export",
        "--run",
        run.to_str().unwrap(),
        "--out",
        st.to_str().unwrap(),
    ]);
    let a = checkpoint::read(&pth, None).unwrap();
    let b = checkpoint::read(&st, None).unwrap();
    assert_eq!(a.format, checkpoint::Format::Zip);
    assert_eq!(a.len(), b.len());
    for (name, t) in a.iter() {
        let u = b.get(name).unwrap();
        assert_eq!(
            (t.dtype, &t.shape, &t.data),
            (u.dtype, &u.shape, &u.data),
            "{name}"
        );
    }
    assert_eq!(a.get("fc.weight").unwrap().shape, vec![3, 128]);
    assert_eq!(
        a.get("layer1.0.bn1.num_batches_tracked").unwrap().dtype,
        "int64"
    );
    // The exported .pth is a checkpoint like any other: it loads and predicts.
    retrain_ok(["inspect", pth.to_str().unwrap()]);
    let stderr = retrain_err([
        "export",
        "--run",
        run.to_str().unwrap(),
        "--out",
        dir.path().join("m.txt").to_str().unwrap(),
    ]);
    assert!(stderr.contains(".pth, .safetensors or .onnx"), "{stderr}");

    // export to ONNX: the run's classes and preprocessing travel in the file.
    let onnx = dir.path().join("model.onnx");
    retrain_ok([
        "export",
        "--run",
        run.to_str().unwrap(),
        "--out",
        onnx.to_str().unwrap(),
        "--with-softmax",
    ]);
    let summary: serde_json::Value =
        serde_json::from_str(&retrain_ok(["inspect", onnx.to_str().unwrap(), "--json"])).unwrap();
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("config.json")).unwrap()).unwrap();
    let metadata = &summary["metadata"];
    let classes: serde_json::Value =
        serde_json::from_str(metadata["classes"].as_str().unwrap()).unwrap();
    assert_eq!(classes, config["classes"]);
    assert_eq!(metadata["input_size"], "32");
    assert_eq!(metadata["source"], run.to_str().unwrap());
    let outputs: Vec<&str> = summary["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["name"].as_str().unwrap())
        .collect();
    assert_eq!(outputs, ["logits", "probabilities"]);
    assert_eq!(
        summary["outputs"][0]["shape"],
        serde_json::json!(["batch", "3"])
    );
    assert_eq!(summary["opsets"], serde_json::json!([["", 17]]));
}
