#!/usr/bin/env python3
"""Export every parity fixture (and the real EfficientNet-Lite0 weights) to ONNX with
`retrain export`, run each file with ONNX Runtime on the fixture's input, and compare with
the logits PyTorch produced for it (tests/fixtures/*_io.safetensors, made by
make_fixtures.py). Also checks each file with onnx.checker (full shape inference) and runs
it at batch 1 and 3 as well as the fixture's own batch.

Dev-only: needs the venv of make_fixtures.py plus `onnx` and `onnxruntime`.

    python tools/check_onnx.py [--retrain target/release/retrain] [--lite0 .cache/efficientnet-lite0-57934424.pth]
"""

import argparse
import pathlib
import subprocess
import sys
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
from safetensors.numpy import load_file

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"

# (weights, inputs and PyTorch's outputs)
CASES = [
    ("mbv2_w025.pth", "mbv2_w025_io.safetensors"),
    ("resnet18_w16.pth", "resnet18_w16_io.safetensors"),
    ("resnet50_w8.pth", "resnet50_w8_io.safetensors"),
    ("resnext50_w8.pth", "resnext50_w8_io.safetensors"),
    ("mbv3_large_w025.pth", "mbv3_large_w025_io.safetensors"),
    ("mbv3_small_w025.pth", "mbv3_small_w025_io.safetensors"),
    ("effnet_b0_w025.pth", "effnet_b0_w025_io.safetensors"),
    ("effnet_v2_s_w0125.pth", "effnet_v2_s_w0125_io.safetensors"),
    ("convnext_tiny_w8.pth", "convnext_tiny_w8_io.safetensors"),
    ("regnet_y_400mf_w025.pth", "regnet_y_400mf_w025_io.safetensors"),
    ("vit_w128.pth", "vit_w128_io.safetensors"),
    ("swin_t_w16.pth", "swin_t_w16_io.safetensors"),
    ("swin_v2_t_w16.pth", "swin_v2_t_w16_io.safetensors"),
]


def relative_diff(got, want):
    return float(np.abs(got - want).max() / max(1.0, float(np.abs(want).max())))


def check(retrain, weights, io, out_dir, extra=()):
    """Export for the fixture's input size (ViT and Swin graphs hold for one size)."""
    onnx_path = out_dir / (weights.stem + "".join(extra) + ".onnx")
    tensors = load_file(str(io))
    size = str(tensors["input"].shape[2])
    subprocess.run(
        [retrain, "export", "--weights", str(weights), "--out", str(onnx_path), "--with-softmax",
         "--image-size", size, *extra],
        check=True,
        capture_output=True,
    )
    # The checker takes the path so that it finds external data.
    onnx.checker.check_model(str(onnx_path), full_check=True)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    x, want = tensors["input"], tensors["logits"]
    diffs = []
    for batch in (x, x[:1], np.concatenate([x, x, x])[:3]):
        n = batch.shape[0]
        expected = np.concatenate([want, want, want])[:n]
        logits, probabilities = session.run(["logits", "probabilities"], {"input": batch})
        diffs.append(relative_diff(logits, expected))
        assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    return max(diffs), onnx_path.stat().st_size


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--retrain", default=str(ROOT / "target" / "release" / "retrain"))
    parser.add_argument("--lite0", default=str(ROOT / ".cache" / "efficientnet-lite0-57934424.pth"))
    args = parser.parse_args()
    cases = [(FIXTURES / w, FIXTURES / io, ()) for w, io in CASES]
    # One with its weights in external data (how models past 2 GiB are written).
    cases.append((FIXTURES / "resnet50_w8.pth", FIXTURES / "resnet50_w8_io.safetensors", ("--external-data",)))
    lite0 = pathlib.Path(args.lite0)
    if lite0.exists():
        cases.append((lite0, FIXTURES / "lite0_io.safetensors", ()))
    else:
        print(f"note: {lite0} not found; the real Lite0 weights are not checked", file=sys.stderr)
    print(f"onnxruntime {ort.__version__}, onnx {onnx.__version__}")
    print(f"{'weights':<36} {'max |ORT - torch| / scale':>26} {'file bytes':>12}")
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for weights, io, extra in cases:
            diff, size = check(args.retrain, weights, io, pathlib.Path(tmp), extra)
            worst = max(worst, diff)
            print(f"{weights.name + ' '.join(('',) + extra):<36} {diff:>26.2e} {size:>12}")
    print(f"worst: {worst:.2e}")
    sys.exit(0 if worst <= 1e-4 else 1)


if __name__ == "__main__":
    main()
