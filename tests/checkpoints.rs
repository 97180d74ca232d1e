//! Reading checkpoints: containers, nesting, dtypes, strides, and untrusted input.

mod common;
use common::*;
use retrain::checkpoint;

#[test]
fn strided_tensors_are_read_in_logical_order() {
    let expected = read_safetensors(&fixture("strided_expected.safetensors"));
    for file in ["strided.pth", "strided_legacy.pth"] {
        let sd = checkpoint::read(&fixture(file), None).unwrap();
        for (name, (shape, values)) in &expected {
            let t = sd.get(name).unwrap_or_else(|| panic!("{file}: {name}"));
            assert_eq!(&t.shape, shape, "{file}: {name}");
            assert_eq!(&t.data, values, "{file}: {name} values");
        }
    }
}

#[test]
fn formats_are_recognised() {
    assert_eq!(
        checkpoint::read(&fixture("mbv2_w025.pth"), None)
            .unwrap()
            .format,
        checkpoint::Format::Zip
    );
    assert_eq!(
        checkpoint::read(&fixture("mbv2_w025_legacy.pth"), None)
            .unwrap()
            .format,
        checkpoint::Format::Legacy
    );
}

#[test]
fn inspect_json_lists_tensors_and_detects_architecture() {
    let out: serde_json::Value = serde_json::from_str(&retrain_ok([
        "inspect".as_ref(),
        fixture("resnet50_w8.pth").as_os_str(),
        "--json".as_ref(),
    ]))
    .unwrap();
    assert_eq!(out["format"], "zip");
    assert_eq!(out["architecture"], "resnet50");
    assert_eq!(
        out["head"]["tensors"],
        serde_json::json!(["fc.weight", "fc.bias"])
    );
    assert_eq!(out["head"]["num_classes"], 10);
    let tensors = out["tensors"].as_array().unwrap();
    let conv1 = tensors
        .iter()
        .find(|t| t["name"] == "conv1.weight")
        .unwrap();
    assert_eq!(conv1["dtype"], "float32");
    assert_eq!(conv1["shape"], serde_json::json!([8, 3, 7, 7]));
    let tracked = tensors
        .iter()
        .find(|t| t["name"] == "bn1.num_batches_tracked")
        .unwrap();
    assert_eq!(tracked["dtype"], "int64");
    let sd = checkpoint::read(&fixture("resnet50_w8.pth"), None).unwrap();
    assert_eq!(
        out["num_params"].as_u64().unwrap() as usize,
        sd.num_params()
    );
    assert_eq!(tensors.len(), sd.len());
}

/// `{"epoch", "state_dict": {"module.x": f16}}`: nesting found, prefix stripped, f16 widened.
#[test]
fn nested_half_precision_data_parallel_checkpoint_loads() {
    let sd = checkpoint::read(&fixture("mbv2_nested_f16.pth"), None).unwrap();
    assert!(
        sd.get("features.0.0.weight").is_some(),
        "module. prefix stripped"
    );
    assert_eq!(sd.get("features.0.0.weight").unwrap().dtype, "float16");
    let explicit = checkpoint::read(&fixture("mbv2_nested_f16.pth"), Some("state_dict")).unwrap();
    assert_eq!(explicit.len(), sd.len());

    let dir = tempdir();
    let out = dir.path().join("out.safetensors");
    retrain_ok([
        "forward".as_ref(),
        "--weights".as_ref(),
        fixture("mbv2_nested_f16.pth").as_os_str(),
        "--input".as_ref(),
        fixture("mbv2_w025_io.safetensors").as_os_str(),
        "--output".as_ref(),
        out.as_os_str(),
    ]);
    let got = &read_safetensors(&out)["logits"].1;
    let want = &read_safetensors(&fixture("mbv2_w025_io.safetensors"))["logits"].1;
    assert!(
        max_abs_diff(got, want) < 2e-2,
        "f16 weights give nearly the f32 logits"
    );
}

#[test]
fn safetensors_checkpoint_loads_like_the_pth() {
    let sd = checkpoint::read(&fixture("resnet18_w16.pth"), None).unwrap();
    let tensors: Vec<(String, Vec<usize>, Vec<f32>)> = sd
        .iter()
        .map(|(k, t)| (k.to_string(), t.shape.clone(), t.data.clone()))
        .collect();
    let dir = tempdir();
    let st = dir.path().join("resnet.safetensors");
    retrain::output::write_safetensors(&st, &tensors).unwrap();
    assert_eq!(
        checkpoint::read(&st, None).unwrap().format,
        checkpoint::Format::Safetensors
    );
    let out = dir.path().join("out.safetensors");
    retrain_ok([
        "forward".as_ref(),
        "--weights".as_ref(),
        st.as_os_str(),
        "--input".as_ref(),
        fixture("resnet18_w16_io.safetensors").as_os_str(),
        "--output".as_ref(),
        out.as_os_str(),
    ]);
    let got = &read_safetensors(&out)["logits"].1;
    let want = &read_safetensors(&fixture("resnet18_w16_io.safetensors"))["logits"].1;
    assert!(max_abs_diff(got, want) < 1e-4);
}

/// Every kind of bad file: one line on stderr naming the file, exit 1, no panic.
fn assert_rejected(path: &std::path::Path, what: &str) {
    let stderr = retrain_err(["inspect".as_ref(), path.as_os_str()]);
    assert!(
        stderr.contains(&path.display().to_string()),
        "{what}: names the file: {stderr}"
    );
    assert_eq!(
        stderr.trim().lines().count(),
        1,
        "{what}: one line: {stderr}"
    );
}

#[test]
fn bad_files_get_a_clear_error() {
    let dir = tempdir();
    let garbage = dir.path().join("garbage.pth");
    std::fs::write(&garbage, b"this is not a checkpoint at all, just text\n").unwrap();
    assert_rejected(&garbage, "garbage");

    let empty = dir.path().join("empty.pth");
    std::fs::write(&empty, b"").unwrap();
    assert_rejected(&empty, "empty");

    for name in ["mbv2_w025.pth", "mbv2_w025_legacy.pth"] {
        let bytes = std::fs::read(fixture(name)).unwrap();
        let truncated = dir.path().join(format!("truncated_{name}"));
        std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
        assert_rejected(&truncated, "truncated");
    }

    let not_ckpt = dir.path().join("notes.pth");
    {
        let mut zip = zip::ZipWriter::new(std::fs::File::create(&not_ckpt).unwrap());
        zip.start_file("notes/readme.txt", zip::write::SimpleFileOptions::default())
            .unwrap();
        std::io::Write::write_all(&mut zip, b"hello").unwrap();
        zip.finish().unwrap();
    }
    assert_rejected(&not_ckpt, "zip without data.pkl");

    let missing = dir.path().join("does_not_exist.pth");
    assert_rejected(&missing, "missing file");

    let bad_st = dir.path().join("bad.safetensors");
    std::fs::write(&bad_st, b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": broken}").unwrap();
    assert_rejected(&bad_st, "corrupt safetensors");
}

/// A pickle that would run `os.system` under Python's pickle is refused, never executed.
#[test]
fn pickle_with_a_forbidden_global_is_refused() {
    let stderr = retrain_err(["inspect".as_ref(), fixture("evil.pth").as_os_str()]);
    assert!(stderr.contains("evil.pth"), "{stderr}");
    assert!(stderr.contains("system"), "names the global: {stderr}");
}

/// Pickle opcodes (protocol 2) for crafting checkpoints by hand.
mod pickle {
    pub fn text(s: &str) -> Vec<u8> {
        let mut v = vec![b'X'];
        v.extend((s.len() as u32).to_le_bytes());
        v.extend(s.as_bytes());
        v
    }

    pub fn global(module: &str, name: &str) -> Vec<u8> {
        format!("c{module}\n{name}\n").into_bytes()
    }

    pub fn int(n: u32) -> Vec<u8> {
        let mut v = vec![b'J'];
        v.extend(n.to_le_bytes());
        v
    }

    /// `{"w": _rebuild_tensor_v2(storage "0" of `numel` floats, 0, shape, stride, False, hooks)}`
    /// with `hooks` the opcodes of the last argument.
    pub fn state_dict(numel: u32, shape: &[u32], stride: &[u32], hooks: &[u8]) -> Vec<u8> {
        let mut p = vec![0x80, 2, b'}', b'('];
        p.extend(text("w"));
        p.extend(global("torch._utils", "_rebuild_tensor_v2"));
        p.extend([b'(', b'(']);
        p.extend(text("storage"));
        p.extend(global("torch", "FloatStorage"));
        p.extend(text("0"));
        p.extend(text("cpu"));
        p.extend(int(numel));
        p.extend([b't', b'Q']);
        p.extend(int(0));
        for dims in [shape, stride] {
            p.push(b'(');
            for &d in dims {
                p.extend(int(d));
            }
            p.push(b't');
        }
        p.push(0x89);
        p.extend(hooks);
        p.extend([b't', b'R', b'u', b'.']);
        p
    }

    pub fn ordered_dict() -> Vec<u8> {
        let mut v = global("collections", "OrderedDict");
        v.extend([b')', b'R']);
        v
    }
}

/// A zip `.pth` holding `data.pkl` and the storages.
fn write_pth(path: &std::path::Path, data_pkl: &[u8], storages: &[(&str, Vec<u8>)]) {
    use std::io::Write;
    let mut zip = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    let stored =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file("archive/data.pkl", stored).unwrap();
    zip.write_all(data_pkl).unwrap();
    for (key, bytes) in storages {
        zip.start_file(format!("archive/data/{key}"), stored)
            .unwrap();
        zip.write_all(bytes).unwrap();
    }
    zip.start_file("archive/version", stored).unwrap();
    zip.write_all(b"3\n").unwrap();
    zip.finish().unwrap();
}

#[test]
fn a_crafted_checkpoint_of_the_right_form_loads() {
    // The control for the hostile variants below: the same construction, well formed.
    let dir = tempdir();
    let path = dir.path().join("ok.pth");
    let values: Vec<u8> = [1.5f32, -2.0, 3.25, 4.0, 5.0, 6.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    write_pth(
        &path,
        &pickle::state_dict(6, &[2, 3], &[3, 1], &pickle::ordered_dict()),
        &[("0", values)],
    );
    let sd = checkpoint::read(&path, None).unwrap();
    let w = sd.get("w").unwrap();
    assert_eq!(
        (w.shape.clone(), w.data.clone()),
        (vec![2, 3], vec![1.5, -2.0, 3.25, 4.0, 5.0, 6.0])
    );
}

#[test]
fn a_global_hidden_in_the_hooks_argument_is_refused() {
    let dir = tempdir();
    let path = dir.path().join("hooks.pth");
    let mut hooks = pickle::global("posix", "system");
    hooks.extend(pickle::text("echo owned"));
    hooks.extend([0x85, b'R']); // TUPLE1, REDUCE: posix.system("echo owned") as the hooks
    write_pth(
        &path,
        &pickle::state_dict(1, &[1], &[1], &hooks),
        &[("0", vec![0; 4])],
    );
    let stderr = retrain_err(["inspect".as_ref(), path.as_os_str()]);
    assert!(stderr.contains("'posix.system'"), "{stderr}");
    assert!(stderr.contains("weights_only"), "{stderr}");

    // A torch global that weights_only does not allow either.
    let mut hooks = pickle::global("torch", "load");
    hooks.extend([b')', b'R']);
    write_pth(
        &path,
        &pickle::state_dict(1, &[1], &[1], &hooks),
        &[("0", vec![0; 4])],
    );
    let stderr = retrain_err(["inspect".as_ref(), path.as_os_str()]);
    assert!(stderr.contains("'torch.load'"), "{stderr}");
}

#[test]
fn a_whole_pickled_module_is_refused_with_the_state_dict_hint() {
    let dir = tempdir();
    let path = dir.path().join("model.pth");
    let mut p = vec![0x80, 2];
    p.extend(pickle::global("torchvision.models.resnet", "ResNet"));
    p.extend([b')', 0x81, b'.']); // NEWOBJ of ResNet
    write_pth(&path, &p, &[]);
    let stderr = retrain_err(["inspect".as_ref(), path.as_os_str()]);
    assert!(stderr.contains("model.state_dict()"), "{stderr}");
}

#[test]
fn a_view_repeating_a_tiny_storage_is_refused_before_any_allocation() {
    // Four bytes of storage viewed with stride 0 as [100000, 10000]: 4 GB if materialised.
    let dir = tempdir();
    let path = dir.path().join("stride0.pth");
    let p = pickle::state_dict(1, &[100000, 10000], &[0, 0], &pickle::ordered_dict());
    write_pth(&path, &p, &[("0", vec![0; 4])]);
    for command in ["inspect", "forward"] {
        let mut args = vec![command.to_string()];
        if command == "forward" {
            args.extend(["--arch", "resnet18", "--weights"].map(String::from));
        }
        args.push(path.display().to_string());
        if command == "forward" {
            args.extend(["--input", "x", "--output", "y"].map(String::from));
        }
        let stderr = retrain_err(&args);
        assert!(
            stderr.contains("tensor 'w' of shape [100000, 10000]"),
            "{stderr}"
        );
    }
}

/// An exported Swin holds exactly the state dict torchvision's has, the buffers that
/// follow from the window size (the int64 relative-position index, V2's coordinate table)
/// included with the same values, so `load_state_dict(strict=True)` takes it.
#[test]
fn an_exported_swin_has_torchvisions_keys_buffers_and_values() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["swin_t_w16.pth", "swin_v2_t_w16.pth"] {
        let out = dir.path().join(name);
        retrain_ok([
            "export".as_ref(),
            "--weights".as_ref(),
            fixture(name).as_os_str(),
            "--out".as_ref(),
            out.as_os_str(),
        ]);
        let torch = checkpoint::read(&fixture(name), None).unwrap();
        let ours = checkpoint::read(&out, None).unwrap();
        let mut keys: Vec<&str> = ours.keys().collect();
        let mut want: Vec<&str> = torch.keys().collect();
        keys.sort();
        want.sort();
        assert_eq!(keys, want, "{name}");
        for (key, t) in torch.iter() {
            let u = ours.get(key).unwrap();
            assert_eq!((&t.dtype, &t.shape), (&u.dtype, &u.shape), "{key}");
            assert_eq!(t.data, u.data, "{key}");
        }
    }
}
