//! Head replacement, the load report, architecture detection and the module view.

mod common;
use common::*;
use retrain::checkpoint;

fn report_for(args: &[&std::ffi::OsStr]) -> serde_json::Value {
    let dir = tempdir();
    let report = dir.path().join("report.json");
    let mut all: Vec<&std::ffi::OsStr> = args.to_vec();
    all.extend(["--load-report".as_ref(), report.as_os_str()]);
    retrain_ok(all);
    serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap()
}

#[test]
fn head_is_reinitialised_for_new_classes_and_everything_else_loads() {
    let r = report_for(&[
        "modules".as_ref(),
        "--weights".as_ref(),
        fixture("mbv2_w025.pth").as_os_str(),
        "--num-classes".as_ref(),
        "3".as_ref(),
    ]);
    let head = r["head_reinitialized"].as_array().unwrap();
    assert_eq!(head.len(), 2);
    assert_eq!(head[0]["name"], "classifier.1.weight");
    assert_eq!(head[0]["old_shape"], serde_json::json!([10, 1280]));
    assert_eq!(head[0]["new_shape"], serde_json::json!([3, 1280]));
    let sd = checkpoint::read(&fixture("mbv2_w025.pth"), None).unwrap();
    let tracked = sd
        .keys()
        .filter(|k| k.ends_with("num_batches_tracked"))
        .count();
    assert_eq!(
        r["loaded"].as_array().unwrap().len(),
        sd.len() - tracked - 2
    );
    assert_eq!(r["ignored_buffers"].as_array().unwrap().len(), tracked);
    assert!(r["missing"].as_array().unwrap().is_empty());
    assert!(r["unexpected"].as_array().unwrap().is_empty());
    assert_eq!(r["architecture"], "mobilenet_v2 (width 0.25)");
}

#[test]
fn resnet_head_fc_is_found_from_the_config() {
    let r = report_for(&[
        "modules".as_ref(),
        "--arch".as_ref(),
        "resnet18".as_ref(),
        "--weights".as_ref(),
        fixture("resnet18_w16.pth").as_os_str(),
        "--num-classes".as_ref(),
        "5".as_ref(),
    ]);
    let names: Vec<&str> = r["head_reinitialized"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["fc.weight", "fc.bias"]);
}

#[test]
fn wrong_arch_says_what_the_checkpoint_looks_like() {
    let stderr = retrain_err([
        "modules".as_ref(),
        "--arch".as_ref(),
        "resnet18".as_ref(),
        "--weights".as_ref(),
        fixture("mbv2_w025.pth").as_os_str(),
    ]);
    assert!(stderr.contains("looks like mobilenet_v2"), "{stderr}");
}

/// Rewrite a fixture's state dict as safetensors after `edit`.
fn edited(
    dir: &tempfile::TempDir,
    edit: impl FnOnce(&mut Vec<(String, Vec<usize>, Vec<f32>)>),
) -> std::path::PathBuf {
    let sd = checkpoint::read(&fixture("mbv2_w025.pth"), None).unwrap();
    let mut tensors: Vec<_> = sd
        .iter()
        .map(|(k, t)| (k.to_string(), t.shape.clone(), t.data.clone()))
        .collect();
    edit(&mut tensors);
    let path = dir.path().join("edited.safetensors");
    retrain::output::write_safetensors(&path, &tensors).unwrap();
    path
}

#[test]
fn mismatch_outside_the_head_is_an_error_unless_allow_partial() {
    let dir = tempdir();
    let path = edited(&dir, |t| {
        t.retain(|(k, _, _)| k != "features.3.conv.1.0.weight");
        t.push(("extra.weight".into(), vec![2], vec![0.0, 1.0]));
    });
    let stderr = retrain_err(["modules".as_ref(), "--weights".as_ref(), path.as_os_str()]);
    assert!(stderr.contains("--allow-partial"), "{stderr}");
    assert!(stderr.contains("1 missing, 1 unexpected"), "{stderr}");

    let r = report_for(&[
        "modules".as_ref(),
        "--weights".as_ref(),
        path.as_os_str(),
        "--allow-partial".as_ref(),
    ]);
    assert_eq!(
        r["missing"],
        serde_json::json!(["features.3.conv.1.0.weight"])
    );
    assert_eq!(r["unexpected"], serde_json::json!(["extra.weight"]));
}

#[test]
fn a_checkpoint_that_fits_almost_nothing_is_refused() {
    let dir = tempdir();
    let path = edited(&dir, |t| t.retain(|(k, _, _)| k.starts_with("features.0.")));
    let stderr = retrain_err([
        "modules".as_ref(),
        "--arch".as_ref(),
        "mobilenet_v2".as_ref(),
        "--weights".as_ref(),
        path.as_os_str(),
        "--allow-partial".as_ref(),
    ]);
    assert!(stderr.contains("fits almost nothing"), "{stderr}");
}

/// Our module tree has PyTorch's names, types and parameter shapes (modules without
/// parameters that torchvision creates, like ResNet's shared `relu`, are not required).
fn check_module_view(weights: &str, torch_json: &str) {
    let ours: serde_json::Value = serde_json::from_str(&retrain_ok([
        "modules".as_ref(),
        "--weights".as_ref(),
        fixture(weights).as_os_str(),
        "--json".as_ref(),
    ]))
    .unwrap();
    let torch: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture(torch_json)).unwrap()).unwrap();
    let ours = ours.as_array().unwrap();
    for t in torch.as_array().unwrap() {
        let params = t["params"].as_object().unwrap();
        let found = ours.iter().find(|m| m["name"] == t["name"]);
        if params.is_empty() && found.is_none() {
            continue;
        }
        let m = found.unwrap_or_else(|| panic!("module {} missing", t["name"]));
        for (pname, shape) in params {
            let full = if t["name"] == "" {
                pname.clone()
            } else {
                format!("{}.{pname}", t["name"].as_str().unwrap())
            };
            let p = m["params"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["name"] == full.as_str());
            let p = p.unwrap_or_else(|| panic!("param {full} missing"));
            assert_eq!(&p["shape"], shape, "{full}");
        }
        if t["type"] != "Conv2dNormActivation" && t["type"] != "ReLU" {
            assert_eq!(m["type"], t["type"], "type of {}", t["name"]);
        }
    }
    let with_params = |v: &Vec<serde_json::Value>| {
        v.iter()
            .filter(|m| !m["params"].as_array().is_none_or(|p| p.is_empty()))
            .count()
    };
    let torch_with = torch
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| !m["params"].as_object().unwrap().is_empty())
        .count();
    assert_eq!(
        with_params(ours),
        torch_with,
        "same modules hold parameters"
    );
}

#[test]
fn module_view_matches_torch_named_modules_mobilenet() {
    check_module_view("mbv2_w025.pth", "mbv2_w025_modules.json");
}

#[test]
fn module_view_matches_torch_named_modules_resnet() {
    check_module_view("resnet18_w16.pth", "resnet18_w16_modules.json");
}

#[test]
fn module_view_matches_torch_named_modules_mobilenet_v3() {
    check_module_view("mbv3_large_w025.pth", "mbv3_large_w025_modules.json");
}

#[test]
fn module_view_matches_torch_named_modules_efficientnet() {
    check_module_view("effnet_b0_w025.pth", "effnet_b0_w025_modules.json");
}

#[test]
fn module_view_matches_torch_named_modules_convnext() {
    check_module_view("convnext_tiny_w8.pth", "convnext_tiny_w8_modules.json");
}

/// RegNet's blocks are `block1-0` in PyTorch: the view, like loading, uses those names.
#[test]
fn module_view_matches_torch_named_modules_regnet() {
    check_module_view(
        "regnet_y_400mf_w025.pth",
        "regnet_y_400mf_w025_modules.json",
    );
}

/// ViT's blocks are `encoder_layer_N` in PyTorch; attention's projection is a plain
/// parameter beside `out_proj`, and the class token one on the root module.
#[test]
fn module_view_matches_torch_named_modules_vit() {
    check_module_view("vit_w128.pth", "vit_w128_modules.json");
}

/// Swin's window attention holds its relative-position index (and in V2 the coordinate
/// table) as buffers; V2's classes carry a `V2` suffix.
#[test]
fn module_view_matches_torch_named_modules_swin() {
    check_module_view("swin_t_w16.pth", "swin_t_w16_modules.json");
    check_module_view("swin_v2_t_w16.pth", "swin_v2_t_w16_modules.json");
}

#[test]
fn modules_view_previews_a_freeze_spec() {
    let list: serde_json::Value = serde_json::from_str(&retrain_ok([
        "modules",
        "--arch",
        "mobilenet_v2",
        "--freeze",
        "features.0-13",
        "--json",
    ]))
    .unwrap();
    let param = |name: &str| -> serde_json::Value {
        list.as_array()
            .unwrap()
            .iter()
            .flat_map(|m| m["params"].as_array().unwrap().clone())
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("{name}"))
    };
    assert_eq!(param("features.13.conv.1.0.weight")["trainable"], false);
    assert_eq!(param("features.14.conv.1.0.weight")["trainable"], true);
    assert_eq!(param("classifier.1.weight")["trainable"], true);
    let text = retrain_ok(["modules", "--arch", "mobilenet_v2", "--freeze", "backbone"]);
    assert!(
        text.contains("trainable: 1,281,000"),
        "only the head: {}",
        text.lines().last().unwrap()
    );
}

#[test]
fn modules_text_view_shows_totals() {
    let text = retrain_ok(["modules", "--arch", "resnet18"]);
    assert!(text.contains("layer4.1.conv2  Conv2d"), "{text}");
    assert!(
        text.contains("Total params: 11,689,512"),
        "torchvision resnet18 count"
    );
}
