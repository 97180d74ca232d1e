"""Full-width parity: every torchvision architecture retrain registers, at its real width
and 224x224, random-initialised with calibrated BatchNorm statistics, run by PyTorch and by
`retrain forward`; prints the largest logit and embedding differences (relative to the
largest magnitude, as tests/parity.rs measures). Reduced fixtures can hide what only full
width shows (channel rounding, squeeze widths, group widths).

Deep random networks with calibrated statistics amplify float32 rounding (PyTorch's own
float32 ResNet-152 is about 5e-4 away from its float64 result), so each row also gives both
float32 results' distance from PyTorch in float64: retrain is at parity when its error is of
the order of PyTorch's own.

With `--onnx`, each network is instead exported with `retrain export` and run by ONNX
Runtime (needs `onnxruntime` in the venv); the rows give ONNX Runtime's logits against
PyTorch's and against `retrain forward`'s (models past 2 GiB go through external data).

Dev-only (torch + torchvision venv, as for make_fixtures.py), after `cargo build --release`:

    python tools/check_full_width.py [--onnx] [ARCH ...]
"""

import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torchvision
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_fixtures import TORCHVISION_ARCHS, calibrate, embed  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RETRAIN = ROOT / "target" / "release" / "retrain"


def family(arch: str) -> str:
    for prefix in ("mobilenet_v3", "mobilenet_v2", "efficientnet", "convnext", "regnet", "vit", "swin"):
        if arch.startswith(prefix):
            return prefix
    return "resnet"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / max(1.0, b.abs().max().item())).item()


def run_pytorch(arch: str, tmp: Path):
    """A calibrated random network, its checkpoint, and PyTorch's float32 outputs."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch)
    calibrate(model, 224, seed=0)
    if family(arch) == "vit":  # torchvision zeroes the head, which would hide the logits
        with torch.no_grad():
            model.heads.head.weight.normal_(std=0.02)
            model.class_token.normal_(std=0.5)
    ckpt, io, out = tmp / f"{arch}.pth", tmp / f"{arch}_io.safetensors", tmp / "out.safetensors"
    torch.save(model.state_dict(), ckpt)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = {"input": x, "logits": model(x), "embedding": embed(family(arch), model, x)}
    save_file(want, io)
    subprocess.run([RETRAIN, "forward", "--weights", ckpt, "--input", io, "--output", out],
                   check=True, capture_output=True)
    return model, ckpt, x, want, load_file(out)


def check_onnx(arch: str, tmp: Path) -> tuple:
    import onnxruntime as ort

    _, ckpt, x, want, ours = run_pytorch(arch, tmp)
    onnx_path = tmp / f"{arch}.onnx"
    subprocess.run([RETRAIN, "export", "--weights", ckpt, "--out", onnx_path, "--image-size", "224"],
                   check=True, capture_output=True)
    ckpt.unlink()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"input": x.numpy()})
    for f in tmp.glob(f"{arch}.onnx*"):
        f.unlink()
    logits = torch.from_numpy(logits)
    return rel(logits, want["logits"]), rel(logits, ours["logits"])


def check(arch: str, tmp: Path) -> dict:
    model, ckpt, x, want, got = run_pytorch(arch, tmp)
    ckpt.unlink()
    model = model.double()
    with torch.no_grad():
        exact = {"logits": model(x.double()), "embedding": embed(family(arch), model, x.double())}
    return {key: (rel(got[key], want[key]), rel(got[key], exact[key]), rel(want[key], exact[key]))
            for key in ("logits", "embedding")}


def main():
    args = sys.argv[1:]
    onnx = "--onnx" in args
    archs = [a for a in args if a != "--onnx"] or TORCHVISION_ARCHS
    if onnx:
        print(f"{'architecture':<20} {'ORT vs PyTorch':>15} {'ORT vs retrain':>15}")
        with tempfile.TemporaryDirectory() as tmp:
            for arch in archs:
                vs_torch, vs_ours = check_onnx(arch, Path(tmp))
                print(f"{arch:<20} {vs_torch:>15.2e} {vs_ours:>15.2e}", flush=True)
        return
    print(f"{'':<20} {'retrain vs PyTorch f32':^23} {'retrain vs f64':^23} {'PyTorch f32 vs f64':^23}")
    print(f"{'architecture':<20}" + " {:>11} {:>11}".format("logits", "embedding") * 3)
    with tempfile.TemporaryDirectory() as tmp:
        for arch in archs:
            d = check(arch, Path(tmp))
            cells = [d[k][i] for i in range(3) for k in ("logits", "embedding")]
            ours, torch_own = max(cells[2:4]), max(cells[4:6])
            flag = "" if max(cells[:2]) <= 1e-4 or ours <= 4 * torch_own else "  CHECK"
            print(f"{arch:<20}" + "".join(f" {c:>11.2e}" for c in cells) + flag, flush=True)


if __name__ == "__main__":
    main()
