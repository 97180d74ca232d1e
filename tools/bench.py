"""Run retrain's and PyTorch's benchmarks alternately, one process per measurement, and
print the BENCHMARKS.md table (ratios retrain / PyTorch; for head-only, PyTorch time /
retrain time). With `--baseline OLD`, a change's paired measurement instead: the two
retrain binaries alternately, the ratio new / old. Dev-only.

    python tools/bench.py --threads 2 --repeats 3 > bench.md
    python tools/bench.py --retrain /tmp/retrain-new --baseline /tmp/retrain-old --repeats 5 \
        --steps 6 --warmup 1 --archs mobilenet_v2 --workloads inference
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run(cmd, threads):
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


ANCHORS = {
    "inference": [("PyTorch eager", []), ("PyTorch channels_last", ["--layout", "channels_last"]),
                  ("ONNX Runtime", ["--engine", "onnxruntime"])],
    "full": [("PyTorch eager", []), ("PyTorch channels_last", ["--layout", "channels_last"])],
    # The naive loop, and the feature cache a PyTorch user who knows the trick writes.
    "head": [("PyTorch eager", []),
             ("PyTorch cached features", ["--head-mode", "cached", "--layout", "channels_last"])],
}
ANCHORS["partial"] = ANCHORS["full"]
COLUMNS = ["PyTorch eager", "PyTorch channels_last", "ONNX Runtime", "PyTorch cached features"]


def cpu_model():
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def med(xs):
    return sorted(xs)[len(xs) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--retrain", default="target/release/retrain")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--archs", default="mobilenet_v2,resnet18")
    ap.add_argument("--workloads", default="inference,full,partial,head")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--steps", type=int, help="timed steps per measurement (each tool's default)")
    ap.add_argument("--warmup", type=int, help="untimed steps first (each tool's default)")
    ap.add_argument("--baseline", help="an older retrain binary: measure --retrain against it")
    a = ap.parse_args()
    timing = [arg for flag, v in (("--steps", a.steps), ("--warmup", a.warmup)) if v is not None
              for arg in (flag, str(v))]
    if a.baseline:
        return paired(a, timing)
    rows = []
    for arch in a.archs.split(","):
        for w in a.workloads.split(","):
            anchors = ANCHORS[w]
            ours, theirs = [], {name: [] for name, _ in anchors}
            for _ in range(a.repeats):
                ours.append(run([a.retrain, "bench", "--arch", arch, "--workload", w, "--json", *timing],
                                a.threads))
                print(json.dumps(ours[-1]), file=sys.stderr)
                for name, extra in anchors:
                    theirs[name].append(run([sys.executable, str(HERE / "bench_torch.py"), "--arch", arch,
                                             "--workload", w, "--threads", str(a.threads), *timing, *extra],
                                            a.threads))
                    print(json.dumps(theirs[name][-1]), file=sys.stderr)
            rows.append(row(arch, w, ours, theirs))
    print(f"CPU: {cpu_model()}, {a.threads} threads, {a.repeats} pairs per cell\n")
    print("| model | workload | retrain | " + " | ".join(COLUMNS)
          + " | ratio to strongest | retrain peak MiB | strongest's peak MiB |")
    print("|---|---|---|" + "---|" * len(COLUMNS) + "---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


def paired(a, timing):
    """Each cell: the old and the new binary back to back, `--repeats` times; the ratio is
    the median of the pairs' new / old (for head-only, old time / new time)."""
    print(f"CPU: {cpu_model()}, {a.threads} threads, {a.repeats} pairs per cell\n")
    print("| model | workload | old | new | new / old |\n|---|---|---|---|---|")
    for arch in a.archs.split(","):
        for w in a.workloads.split(","):
            key = "seconds" if w == "head" else "images_per_second"
            old, new = [], []
            for _ in range(a.repeats):
                for binary, results in ((a.baseline, old), (a.retrain, new)):
                    cmd = [binary, "bench", "--arch", arch, "--workload", w, "--json", *timing]
                    results.append(run(cmd, a.threads)[key])
                print(f"{arch} {w}: old {old[-1]:.2f} new {new[-1]:.2f}", file=sys.stderr)
            pairs = [o / n if w == "head" else n / o for o, n in zip(old, new)]
            print(f"| {arch} | {w} | {med(old):.2f} | {med(new):.2f} | {med(pairs):.3f}x |")


def row(arch, w, ours, theirs):
    """One table row. Each repeat runs retrain and every anchor back to back; a ratio is the
    median of those paired ratios, which cancels most of the machine's drift. The strongest
    anchor is the one with the best median."""
    key = "seconds" if w == "head" else "images_per_second"
    unit = (lambda v: f"{v:.1f} s") if w == "head" else (lambda v: f"{v:.{1 if v >= 10 else 2}f} img/s")
    o = [r[key] for r in ours]
    medians = {name: med([r[key] for r in rs]) for name, rs in theirs.items()}
    best = (min if w == "head" else max)(medians, key=medians.get)
    t = [r[key] for r in theirs[best]]
    if w == "head":
        ratio = f"{med([b / a for a, b in zip(o, t)]):.1f}x faster ({best})"
    else:
        ratio = f"{med([a / b for a, b in zip(o, t)]):.2f}x ({best})"
    cells = [unit(medians[c]) if c in medians else "-" for c in COLUMNS]
    mem = (med([r["peak_memory_mib"] for r in ours]), med([r["peak_memory_mib"] for r in theirs[best]]))
    return [arch, w, unit(med(o)), *cells, ratio, f"{mem[0]:.0f}", f"{mem[1]:.0f}"]


if __name__ == "__main__":
    main()
