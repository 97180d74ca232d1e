//! Eval-mode logits and embeddings match PyTorch's, for every model family and both `.pth`
//! containers. The fixtures come from tools/make_fixtures.py (random-init networks with
//! calibrated BatchNorm statistics, and the real EfficientNet-Lite0 weights).

mod common;
use common::*;

fn check_forward(weights: &std::path::Path, io: &str, tol: f32) {
    let dir = tempdir();
    let out = dir.path().join("out.safetensors");
    retrain_ok([
        "forward".as_ref(),
        "--weights".as_ref(),
        weights.as_os_str(),
        "--input".as_ref(),
        fixture(io).as_os_str(),
        "--output".as_ref(),
        out.as_os_str(),
    ]);
    let ours = read_safetensors(&out);
    let torch = read_safetensors(&fixture(io));
    for name in ["logits", "embedding"] {
        let (shape, got) = &ours[name];
        let (want_shape, want) = &torch[name];
        assert_eq!(shape, want_shape, "{name} shape");
        let scale = want.iter().fold(1.0f32, |m, v| m.max(v.abs()));
        let diff = max_abs_diff(got, want);
        assert!(
            diff <= tol * scale,
            "{name}: max diff {diff} (scale {scale}) for {}",
            weights.display()
        );
    }
}

#[test]
fn mobilenet_v2_zip_matches_pytorch() {
    check_forward(&fixture("mbv2_w025.pth"), "mbv2_w025_io.safetensors", 1e-4);
}

#[test]
fn mobilenet_v2_legacy_matches_pytorch() {
    check_forward(
        &fixture("mbv2_w025_legacy.pth"),
        "mbv2_w025_io.safetensors",
        1e-4,
    );
}

#[test]
fn resnet18_zip_matches_pytorch() {
    check_forward(
        &fixture("resnet18_w16.pth"),
        "resnet18_w16_io.safetensors",
        1e-4,
    );
}

#[test]
fn resnet18_legacy_matches_pytorch() {
    check_forward(
        &fixture("resnet18_w16_legacy.pth"),
        "resnet18_w16_io.safetensors",
        1e-4,
    );
}

#[test]
fn resnet50_bottleneck_zip_matches_pytorch() {
    check_forward(
        &fixture("resnet50_w8.pth"),
        "resnet50_w8_io.safetensors",
        1e-4,
    );
}

#[test]
fn resnet50_bottleneck_legacy_matches_pytorch() {
    check_forward(
        &fixture("resnet50_w8_legacy.pth"),
        "resnet50_w8_io.safetensors",
        1e-4,
    );
}

#[test]
fn resnext_grouped_bottleneck_matches_pytorch() {
    check_forward(
        &fixture("resnext50_w8.pth"),
        "resnext50_w8_io.safetensors",
        1e-4,
    );
}

#[test]
fn mobilenet_v3_large_matches_pytorch() {
    check_forward(
        &fixture("mbv3_large_w025.pth"),
        "mbv3_large_w025_io.safetensors",
        1e-4,
    );
}

#[test]
fn mobilenet_v3_small_matches_pytorch() {
    check_forward(
        &fixture("mbv3_small_w025.pth"),
        "mbv3_small_w025_io.safetensors",
        1e-4,
    );
}

#[test]
fn efficientnet_b0_matches_pytorch() {
    check_forward(
        &fixture("effnet_b0_w025.pth"),
        "effnet_b0_w025_io.safetensors",
        1e-4,
    );
}

#[test]
fn efficientnet_v2_fused_blocks_match_pytorch() {
    check_forward(
        &fixture("effnet_v2_s_w0125.pth"),
        "effnet_v2_s_w0125_io.safetensors",
        1e-4,
    );
}

#[test]
fn convnext_matches_pytorch() {
    check_forward(
        &fixture("convnext_tiny_w8.pth"),
        "convnext_tiny_w8_io.safetensors",
        1e-4,
    );
}

#[test]
fn regnet_y_matches_pytorch() {
    check_forward(
        &fixture("regnet_y_400mf_w025.pth"),
        "regnet_y_400mf_w025_io.safetensors",
        1e-4,
    );
}

#[test]
fn efficientnet_lite0_real_weights_match_pytorch() {
    if let Some(ckpt) = lite0_checkpoint() {
        check_forward(&ckpt, "lite0_io.safetensors", 1e-4);
    }
}

/// `predict` on real photos gives the package's own top-1 classes and probabilities. Resizing
/// reproduces Pillow's, so PNG photos match closely; a JPEG is decoded by a different decoder
/// than Pillow's libjpeg, hence its looser tolerance.
#[test]
fn efficientnet_lite0_predicts_real_photos_like_pytorch() {
    let Some(ckpt) = lite0_checkpoint() else {
        return;
    };
    let expected: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture("lite0_photos_expected.json")).unwrap())
            .unwrap();
    let mut args = vec![
        "predict".into(),
        "--weights".into(),
        ckpt.into_os_string(),
        "--json".into(),
        "--top-k".into(),
        "3".into(),
    ];
    for e in expected.as_array().unwrap() {
        args.push(
            data("photos")
                .join(e["image"].as_str().unwrap())
                .into_os_string(),
        );
    }
    let got: serde_json::Value = serde_json::from_str(&retrain_ok(args)).unwrap();
    for (g, e) in got
        .as_array()
        .unwrap()
        .iter()
        .zip(expected.as_array().unwrap())
    {
        let (g0, e0) = (&g["top"][0], &e["top"][0]);
        assert_eq!(g0["index"], e0["index"], "top-1 of {}", e["image"]);
        let (gp, ep) = (g0["prob"].as_f64().unwrap(), e0["prob"].as_f64().unwrap());
        let tol = if e["image"].as_str().unwrap().ends_with(".png") {
            1e-4
        } else {
            0.02
        };
        assert!((gp - ep).abs() < tol, "{}: prob {gp} vs {ep}", e["image"]);
        assert!(
            g0["label"].as_str().unwrap().len() > 2,
            "ImageNet label present"
        );
    }
}

#[test]
fn vit_matches_pytorch() {
    check_forward(&fixture("vit_w128.pth"), "vit_w128_io.safetensors", 1e-4);
}

/// At 48x48 the position embeddings (made for 32x32) are resampled as torchvision's
/// `interpolate_embeddings` does.
#[test]
fn vit_at_another_image_size_matches_pytorch_interpolate_embeddings() {
    check_forward(&fixture("vit_w128.pth"), "vit_w128_io48.safetensors", 1e-4);
}

/// At 56x56 the maps pad to whole windows, shift, and merge from an odd side.
#[test]
fn swin_matches_pytorch() {
    check_forward(
        &fixture("swin_t_w16.pth"),
        "swin_t_w16_io.safetensors",
        1e-4,
    );
}

/// V2: cosine attention, the position-bias MLP, post-norm blocks.
#[test]
fn swin_v2_matches_pytorch() {
    check_forward(
        &fixture("swin_v2_t_w16.pth"),
        "swin_v2_t_w16_io.safetensors",
        1e-4,
    );
}

/// The same weights at 64x64, where no map needs padding.
#[test]
fn swin_at_another_image_size_matches_pytorch() {
    check_forward(
        &fixture("swin_t_w16.pth"),
        "swin_t_w16_io64.safetensors",
        1e-4,
    );
}
