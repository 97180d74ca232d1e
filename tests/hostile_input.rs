//! Images and weights that are damaged, huge, strange or hostile: each gets a clear message
//! naming the file, never a panic, an abort or a hang.

mod common;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use common::*;

/// CRC-32 (IEEE) of `bytes`, for PNG chunks.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A real 4x4 PNG whose header is rewritten to claim `w` x `h` pixels (CRC fixed up).
fn png_claiming(w: u32, h: u32) -> Vec<u8> {
    let mut png = Vec::new();
    image::RgbImage::from_pixel(4, 4, image::Rgb([200, 10, 10]))
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    // Signature (8), IHDR length (4), "IHDR", width, height, ..., CRC over type and data.
    png[16..20].copy_from_slice(&w.to_be_bytes());
    png[20..24].copy_from_slice(&h.to_be_bytes());
    let crc = crc32(&png[12..29]);
    png[29..33].copy_from_slice(&crc.to_be_bytes());
    png
}

/// The test photo with its frame header rewritten to claim `w` x `h` pixels.
fn jpeg_claiming(w: u16, h: u16) -> Vec<u8> {
    let mut jpeg = std::fs::read(data("photos/rocket.jpg")).unwrap();
    let sof = jpeg
        .windows(2)
        .position(|m| m[0] == 0xFF && (0xC0..=0xC2).contains(&m[1]))
        .expect("a frame header");
    jpeg[sof + 5..sof + 7].copy_from_slice(&h.to_be_bytes());
    jpeg[sof + 7..sof + 9].copy_from_slice(&w.to_be_bytes());
    jpeg
}

/// Run `retrain ARGS`, killed after `limit` (so a hang fails the test instead of the CI).
fn retrain_within(args: &[&str], limit: Duration) -> Output {
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_retrain"))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run retrain");
    let pid = child.id();
    let start = Instant::now();
    let watchdog = std::thread::spawn(move || {
        while start.elapsed() < limit {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status();
    });
    let out = child.wait_with_output().expect("wait for retrain");
    assert!(start.elapsed() < limit, "retrain {args:?} hung");
    drop(watchdog);
    out
}

fn predict(images: &[&Path]) -> Output {
    let weights = fixture("resnet18_w16.pth");
    let mut args = vec!["predict", "--weights", weights.to_str().unwrap()];
    args.extend(images.iter().map(|p| p.to_str().unwrap()));
    retrain_within(&args, Duration::from_secs(60))
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

#[test]
fn predict_names_each_bad_image_and_classifies_the_rest() {
    let dir = tempdir();
    let bomb_png = dir.path().join("bomb.png");
    std::fs::write(&bomb_png, png_claiming(100_000, 100_000)).unwrap();
    let bomb_jpg = dir.path().join("bomb.jpg");
    std::fs::write(&bomb_jpg, jpeg_claiming(65_500, 65_500)).unwrap();
    let fifo = dir.path().join("x.png");
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let good = data("photos/coffee.png");

    let out = predict(&[&bomb_png, &bomb_jpg, &fifo, &good]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        err.contains("bomb.png: 100000x100000 is 10000000000 pixels, above the limit"),
        "{err}"
    );
    assert!(err.contains("bomb.jpg: 65500x65500"), "{err}");
    assert!(err.contains("x.png: not a regular file"), "{err}");
    assert!(err.contains("3 of 4 image(s) could not be read"), "{err}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("coffee.png"),
        "the good image is still classified: {stdout}"
    );
}

#[test]
fn a_long_thin_image_and_a_truncated_jpeg_are_classified() {
    let dir = tempdir();
    let thin = dir.path().join("thin.png");
    image::RgbImage::from_fn(1, 60_000, |_, y| image::Rgb([(y % 251) as u8, 9, 99]))
        .save(&thin)
        .unwrap();
    let half = dir.path().join("half.jpg");
    let jpeg = std::fs::read(data("photos/rocket.jpg")).unwrap();
    std::fs::write(&half, &jpeg[..jpeg.len() / 2]).unwrap();
    let out = predict(&[&thin, &half]);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("half.jpg: truncated JPEG"), "{err}");
    assert!(!err.contains("thin.png"), "{err}");
}

/// One epoch of the ResNet-18 fixture on `data`, every image in training.
fn one_epoch(data: &Path, run: &Path) -> Vec<String> {
    let weights = fixture("resnet18_w16.pth");
    [
        "train",
        "--weights",
        weights.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
        "--image-size",
        "32",
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--val-fraction",
        "0",
    ]
    .map(String::from)
    .to_vec()
}

#[test]
fn train_skips_bad_files_follows_no_loop_and_never_hangs() {
    let dir = tempdir();
    let data = toy(dir.path(), 6);
    let red = data.join("red_disk");
    std::fs::write(red.join("bomb.png"), png_claiming(100_000, 100_000)).unwrap();
    std::fs::write(red.join("bomb.jpg"), jpeg_claiming(65_500, 65_500)).unwrap();
    assert!(
        std::process::Command::new("mkfifo")
            .arg(red.join("x.png"))
            .status()
            .unwrap()
            .success()
    );
    // A symbolic link from a class folder back to the data folder: a loop.
    std::os::unix::fs::symlink(&data, red.join("loop")).unwrap();
    let run = dir.path().join("run");
    let args = one_epoch(&data, &run);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = retrain_within(&args, Duration::from_secs(120));
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("x.png: not a regular file"), "{err}");
    assert!(err.contains("(a directory loop); not followed"), "{err}");
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("summary.json")).unwrap()).unwrap();
    // 18 real images; the two bombs are skipped and named, the loop adds nothing.
    assert_eq!(summary["train_images"], 18, "{summary}");
    let skipped: Vec<&str> = summary["skipped_images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    assert_eq!(skipped.len(), 2, "{skipped:?}");
    assert!(
        skipped
            .iter()
            .any(|s| s.contains("bomb.png") && s.contains("above the limit"))
    );
}

#[test]
fn non_utf8_file_names_work() {
    use std::os::unix::ffi::OsStrExt;
    let dir = tempdir();
    let data = toy(dir.path(), 6);
    let class = data.join("red_disk");
    let first = class.read_dir().unwrap().next().unwrap().unwrap().path();
    let odd = class.join(std::ffi::OsStr::from_bytes(b"caf\xe9.png"));
    std::fs::rename(&first, &odd).unwrap();
    let run = dir.path().join("run");
    retrain_ok(one_epoch(&data, &run));
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["train_images"], 18);
    assert!(
        summary["skipped_images"].as_array().unwrap().is_empty(),
        "{summary}"
    );
    // The split keeps the name's bytes, and resume reads it back.
    let split = std::fs::read_to_string(run.join("split.json")).unwrap();
    assert!(split.contains("233,"), "the byte 0xe9 as a number: {split}");
    retrain_ok(["train", "--resume", run.to_str().unwrap(), "--epochs", "2"]);
}

/// The ResNet-18 fixture as safetensors with one NaN and one infinity in `layer1.0.conv1`.
fn poisoned(dir: &Path) -> PathBuf {
    let sd = retrain::checkpoint::read(&fixture("resnet18_w16.pth"), None).unwrap();
    let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = sd
        .iter()
        .filter(|(_, t)| t.is_float())
        .map(|(name, t)| {
            let mut values = t.data.clone();
            if name == "layer1.0.conv1.weight" {
                values[3] = f32::NAN;
                values[5] = f32::INFINITY;
            }
            let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            (name.to_string(), t.shape.clone(), bytes)
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, s, b)| {
            let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                .unwrap();
            (n.clone(), view)
        })
        .collect();
    let path = dir.join("poisoned.safetensors");
    safetensors::serialize_to_file(views, None, &path).unwrap();
    path
}

#[test]
fn non_finite_weights_are_named_and_refused_unless_allowed() {
    let dir = tempdir();
    let weights = poisoned(dir.path());
    let report = dir.path().join("report.json");
    let image = data("photos/coffee.png");
    let args = |extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = [
            "predict",
            "--weights",
            weights.to_str().unwrap(),
            "--load-report",
        ]
        .map(String::from)
        .to_vec();
        a.push(report.display().to_string());
        a.extend(extra.iter().map(|s| s.to_string()));
        a.push(image.display().to_string());
        a
    };
    let err = retrain_err(args(&[]));
    assert!(
        err.contains("layer1.0.conv1.weight (1 NaN, 1 infinite)"),
        "{err}"
    );
    assert!(err.contains("--allow-non-finite"), "{err}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(report["non_finite"][0]["name"], "layer1.0.conv1.weight");
    assert_eq!(report["non_finite"][0]["nan"], 1);
    retrain_ok(args(&["--allow-non-finite"]));
}

#[test]
fn forward_refuses_empty_or_non_finite_input() {
    let dir = tempdir();
    let weights = fixture("resnet18_w16.pth");
    for (name, shape, value) in [
        ("empty", vec![0usize, 3, 32, 32], 0.0f32),
        ("tiny", vec![1, 3, 2, 2], 0.0),
        ("nan", vec![1, 3, 32, 32], f32::NAN),
    ] {
        let n: usize = shape.iter().product();
        let bytes: Vec<u8> = vec![value; n]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let view =
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape, &bytes).unwrap();
        let input = dir.path().join(format!("{name}.safetensors"));
        safetensors::serialize_to_file([("input", view)], None, &input).unwrap();
        let err = retrain_err([
            "forward",
            "--weights",
            weights.to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
            "--output",
            dir.path().join("out.safetensors").to_str().unwrap(),
        ]);
        assert!(
            err.contains(&format!("{name}.safetensors")),
            "{name}: {err}"
        );
    }
}
