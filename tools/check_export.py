"""Check that a `retrain export` .pth loads into the torchvision model with strict=True
and gives the logits retrain gives.

Dev-only (torch + torchvision venv, as for make_fixtures.py):

    retrain export --run RUN --out model.pth
    retrain forward --weights model.pth --input tests/fixtures/mbv2_w025_io.safetensors --output ours.safetensors
    python tools/check_export.py model.pth --arch mobilenet_v2 --width 0.25 \
        --input tests/fixtures/mbv2_w025_io.safetensors --ours ours.safetensors
"""

import argparse
import sys
from pathlib import Path

import torch
import torchvision
from safetensors.torch import load_file
from torchvision.models.resnet import BasicBlock, Bottleneck

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_fixtures import narrow_resnet  # noqa: E402


def build(arch: str, width: float, num_classes: int) -> torch.nn.Module:
    if arch == "mobilenet_v2":
        return torchvision.models.mobilenet_v2(width_mult=width, num_classes=num_classes)
    blocks = {"resnet18": (BasicBlock, [2, 2, 2, 2]), "resnet34": (BasicBlock, [3, 4, 6, 3]),
              "resnet50": (Bottleneck, [3, 4, 6, 3])}[arch]
    return narrow_resnet(*blocks, round(64 * width), num_classes)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("pth")
    ap.add_argument("--arch", required=True)
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--input", help="safetensors with an `input` batch")
    ap.add_argument("--ours", help="retrain forward output for the same input")
    args = ap.parse_args()
    sd = torch.load(args.pth, weights_only=True)
    head = "classifier.1.weight" if args.arch == "mobilenet_v2" else "fc.weight"
    model = build(args.arch, args.width, sd[head].shape[0])
    model.load_state_dict(sd, strict=True)
    model.eval()
    print(f"{args.pth}: {len(sd)} tensors load into {args.arch} with strict=True")
    if args.input and args.ours:
        x = load_file(args.input)["input"]
        with torch.no_grad():
            logits = model(x)
        diff = (logits - load_file(args.ours)["logits"]).abs().max().item()
        print(f"max |logits difference| = {diff:.2e}")
        assert diff < 1e-4, diff


if __name__ == "__main__":
    main()
