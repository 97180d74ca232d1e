"""Full-width parity: every torchvision architecture retrain registers, at its real width
and 224x224, random-initialised with calibrated BatchNorm statistics, run by PyTorch and by
`retrain forward`; prints the largest logit and embedding differences (relative to the
largest magnitude, as tests/parity.rs measures). Reduced fixtures can hide what only full
width shows (channel rounding, squeeze widths, group widths).

Dev-only (torch + torchvision venv, as for make_fixtures.py), after `cargo build --release`:

    python tools/check_full_width.py [ARCH ...]
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
    for prefix in ("mobilenet_v3", "mobilenet_v2", "efficientnet", "convnext"):
        if arch.startswith(prefix):
            return prefix
    return "resnet"


def check(arch: str, tmp: Path) -> tuple[float, float]:
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch)
    calibrate(model, 224, seed=0)
    ckpt, io, out = tmp / f"{arch}.pth", tmp / f"{arch}_io.safetensors", tmp / "out.safetensors"
    torch.save(model.state_dict(), ckpt)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = {"input": x, "logits": model(x), "embedding": embed(family(arch), model, x)}
    save_file(want, io)
    subprocess.run([RETRAIN, "forward", "--weights", ckpt, "--input", io, "--output", out],
                   check=True, capture_output=True)
    got = load_file(out)
    diffs = []
    for key in ("logits", "embedding"):
        scale = max(1.0, want[key].abs().max().item())
        diffs.append((got[key] - want[key]).abs().max().item() / scale)
    ckpt.unlink()
    return diffs[0], diffs[1]


def main():
    archs = sys.argv[1:] or TORCHVISION_ARCHS
    print(f"{'architecture':<20} {'logits':>10} {'embedding':>10}")
    with tempfile.TemporaryDirectory() as tmp:
        for arch in archs:
            logits, emb = check(arch, Path(tmp))
            flag = "" if max(logits, emb) <= 1e-4 else "  > 1e-4"
            print(f"{arch:<20} {logits:>10.2e} {emb:>10.2e}{flag}", flush=True)


if __name__ == "__main__":
    main()
