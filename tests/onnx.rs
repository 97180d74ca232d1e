//! ONNX export: every family's exported graph, run by tract (a pure-Rust ONNX runtime),
//! gives retrain's own logits at batch 1 and 3; a trained run exports with its classes and
//! preprocessing, which `inspect` reads back; bad `.onnx` files are refused cleanly.
//! tools/check_onnx.py runs the same files with ONNX Runtime against PyTorch's logits.

mod common;
use common::*;

use std::path::Path;

use tract_onnx::prelude::*;

/// The fixtures of every family (tools/make_fixtures.py), with their inputs.
const FIXTURES: [(&str, &str); 13] = [
    ("mbv2_w025.pth", "mbv2_w025_io.safetensors"),
    ("resnet18_w16.pth", "resnet18_w16_io.safetensors"),
    ("resnet50_w8.pth", "resnet50_w8_io.safetensors"),
    ("resnext50_w8.pth", "resnext50_w8_io.safetensors"),
    ("mbv3_large_w025.pth", "mbv3_large_w025_io.safetensors"),
    ("mbv3_small_w025.pth", "mbv3_small_w025_io.safetensors"),
    ("effnet_b0_w025.pth", "effnet_b0_w025_io.safetensors"),
    ("effnet_v2_s_w0125.pth", "effnet_v2_s_w0125_io.safetensors"),
    ("convnext_tiny_w8.pth", "convnext_tiny_w8_io.safetensors"),
    (
        "regnet_y_400mf_w025.pth",
        "regnet_y_400mf_w025_io.safetensors",
    ),
    ("vit_w128.pth", "vit_w128_io.safetensors"),
    ("swin_t_w16.pth", "swin_t_w16_io.safetensors"),
    ("swin_v2_t_w16.pth", "swin_v2_t_w16_io.safetensors"),
];

/// Run an ONNX file with tract on an NCHW batch; returns the named outputs in order.
fn run_tract(model: &Path, shape: &[usize], input: &[f32]) -> Vec<(Vec<usize>, Vec<f32>)> {
    let runnable = tract_onnx::onnx()
        .model_for_path(model)
        .and_then(|m| m.with_input_fact(0, f32::fact(shape).into()))
        .and_then(|m| m.into_optimized())
        .and_then(|m| m.into_runnable())
        .unwrap_or_else(|e| panic!("tract cannot run {}: {e:?}", model.display()));
    let x = Tensor::from_shape(shape, input).expect("input tensor");
    let outputs = runnable.run(tvec!(x.into())).expect("tract run");
    outputs
        .iter()
        .map(|t| {
            let view = t.to_plain_array_view::<f32>().expect("f32 output");
            (view.shape().to_vec(), view.iter().copied().collect())
        })
        .collect()
}

/// Rows `picks` of a row-major `[N, ...]` tensor of `row`-sized rows.
fn rows(values: &[f32], row: usize, picks: &[usize]) -> Vec<f32> {
    picks
        .iter()
        .flat_map(|&i| values[i * row..(i + 1) * row].iter().copied())
        .collect()
}

/// Export `weights` to ONNX for the fixture's input size and compare tract's logits with
/// `retrain forward`'s on the fixture input: the first sample alone, then three samples.
fn check_family(weights: &Path, io: &Path) {
    let dir = tempdir();
    let model = dir.path().join("model.onnx");
    let ours = dir.path().join("ours.safetensors");
    let (shape, input) = &read_safetensors(io)["input"];
    retrain_ok([
        "export".as_ref(),
        "--weights".as_ref(),
        weights.as_os_str(),
        "--out".as_ref(),
        model.as_os_str(),
        "--image-size".as_ref(),
        shape[2].to_string().as_ref(),
    ]);
    retrain_ok([
        "forward".as_ref(),
        "--weights".as_ref(),
        weights.as_os_str(),
        "--input".as_ref(),
        io.as_os_str(),
        "--input-tensor".as_ref(),
        "input".as_ref(),
        "--output".as_ref(),
        ours.as_os_str(),
    ]);
    let (logit_shape, logits) = &read_safetensors(&ours)["logits"];
    let (pixels, classes) = (shape[1..].iter().product::<usize>(), logit_shape[1]);
    let scale = logits.iter().fold(1.0f32, |m, v| m.max(v.abs()));
    let second = 1.min(shape[0] - 1);
    for picks in [&[0][..], &[0, second, 0]] {
        let mut batch_shape = shape.clone();
        batch_shape[0] = picks.len();
        let outputs = run_tract(&model, &batch_shape, &rows(input, pixels, picks));
        let (got_shape, got) = &outputs[0];
        assert_eq!(got_shape, &[picks.len(), classes], "{}", weights.display());
        let diff = max_abs_diff(got, &rows(logits, classes, picks));
        assert!(
            diff <= 1e-4 * scale,
            "{}: batch {}: tract differs by {diff} (scale {scale})",
            weights.display(),
            picks.len()
        );
    }
}

#[test]
fn every_family_exports_to_onnx_that_tract_runs_to_the_same_logits() {
    for (weights, io) in FIXTURES {
        check_family(&fixture(weights), &fixture(io));
    }
}

#[test]
fn the_real_efficientnet_lite0_exports_to_the_same_logits() {
    if let Some(lite0) = lite0_checkpoint() {
        check_family(&lite0, &fixture("lite0_io.safetensors"));
    }
}

/// `inspect` of files that are not ONNX models, or hostile ones: a clean error naming the
/// file, never a panic or a stack overflow.
#[test]
fn bad_onnx_files_are_refused_by_name() {
    use retrain::onnx_format::proto::{AttributeProto, GraphProto, ModelProto, NodeProto};
    let dir = tempdir();
    let good = dir.path().join("good.onnx");
    retrain_ok([
        "export",
        "--weights",
        fixture("mbv2_w025.pth").to_str().unwrap(),
        "--out",
        good.to_str().unwrap(),
    ]);
    let bytes = std::fs::read(&good).unwrap();
    // A graph nested 200 deep through node attributes (prost stops at 100).
    let mut graph = GraphProto::default();
    for _ in 0..200 {
        let attribute = AttributeProto {
            g: Some(graph),
            ..Default::default()
        };
        let node = NodeProto {
            attribute: vec![attribute],
            ..Default::default()
        };
        graph = GraphProto {
            node: vec![node],
            ..Default::default()
        };
    }
    let nested = ModelProto {
        ir_version: Some(8),
        graph: Some(graph),
        ..Default::default()
    };
    let cases: [(&str, Vec<u8>); 5] = [
        ("empty", vec![]),
        ("truncated", bytes[..bytes.len() / 2].to_vec()),
        (
            "random",
            (0..4096u32)
                .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
                .collect(),
        ),
        (
            "checkpoint",
            std::fs::read(fixture("mbv2_w025.pth")).unwrap(),
        ),
        ("nested", retrain::onnx_format::encode(&nested)),
    ];
    for (name, contents) in cases {
        let path = dir.path().join(format!("{name}.onnx"));
        std::fs::write(&path, contents).unwrap();
        let stderr = retrain_err(["inspect", path.to_str().unwrap()]);
        assert!(
            stderr.contains(path.to_str().unwrap()) && stderr.contains("not an ONNX model"),
            "{name}: {stderr}"
        );
    }
    let text = retrain_ok(["inspect", good.to_str().unwrap()]);
    assert!(
        text.contains("IR version 8, opset 17") && text.contains("Conv"),
        "{text}"
    );
}

/// `--with-softmax` adds `probabilities`, and only to an ONNX file.
#[test]
fn with_softmax_adds_probabilities_and_only_to_onnx() {
    let dir = tempdir();
    let weights = fixture("resnet18_w16.pth");
    let model = dir.path().join("m.onnx");
    retrain_ok([
        "export".as_ref(),
        "--weights".as_ref(),
        weights.as_os_str(),
        "--out".as_ref(),
        model.as_os_str(),
        "--with-softmax".as_ref(),
    ]);
    let (shape, input) = &read_safetensors(&fixture("resnet18_w16_io.safetensors"))["input"];
    let outputs = run_tract(&model, shape, input);
    let (logits, probabilities) = (&outputs[0].1, &outputs[1].1);
    let classes = outputs[0].0[1];
    for (z, p) in logits.chunks(classes).zip(probabilities.chunks(classes)) {
        let top = z.iter().fold(f32::MIN, |m, &v| m.max(v));
        let sum: f32 = z.iter().map(|v| (v - top).exp()).sum();
        for (zi, pi) in z.iter().zip(p) {
            assert!((pi - (zi - top).exp() / sum).abs() < 1e-6);
        }
    }
    let stderr = retrain_err([
        "export".as_ref(),
        "--weights".as_ref(),
        weights.as_os_str(),
        "--out".as_ref(),
        dir.path().join("m.pth").as_os_str(),
        "--with-softmax".as_ref(),
    ]);
    assert!(stderr.contains("--with-softmax"), "{stderr}");
}

/// `--external-data` puts the weights in `FILE.data` beside a small graph file; tract
/// reads the pair to the same logits as the single file.
#[test]
fn external_data_holds_the_weights_beside_the_graph() {
    let dir = tempdir();
    let weights = fixture("resnet18_w16.pth");
    let inline = dir.path().join("inline.onnx");
    let external = dir.path().join("external.onnx");
    for (out, extra) in [(&inline, None), (&external, Some("--external-data"))] {
        let mut args = vec![
            "export".as_ref(),
            "--weights".as_ref(),
            weights.as_os_str(),
            "--out".as_ref(),
            out.as_os_str(),
        ];
        args.extend(extra.map(std::ffi::OsStr::new));
        retrain_ok(args);
    }
    let size = |p: &Path| std::fs::metadata(p).unwrap().len();
    let data = dir.path().join("external.onnx.data");
    assert!(size(&external) < 64 << 10, "{} bytes", size(&external));
    assert!(size(&data) >= size(&inline) - size(&external));
    let (shape, input) = &read_safetensors(&fixture("resnet18_w16_io.safetensors"))["input"];
    assert_eq!(
        run_tract(&external, shape, input),
        run_tract(&inline, shape, input)
    );
}
