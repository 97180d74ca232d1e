"""Run retrain's and PyTorch's benchmarks alternately, one process per measurement, and
print the BENCHMARKS.md table (ratios retrain / PyTorch; for head-only, PyTorch time /
retrain time). Dev-only.

    python tools/bench.py --threads 2 --repeats 3 > bench.md
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--retrain", default="target/release/retrain")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--archs", default="mobilenet_v2,resnet18")
    ap.add_argument("--workloads", default="inference,full,partial,head")
    ap.add_argument("--repeats", type=int, default=1)
    a = ap.parse_args()
    rows = []
    for arch in a.archs.split(","):
        for w in a.workloads.split(","):
            ours, theirs = [], []
            for _ in range(a.repeats):
                ours.append(run([a.retrain, "bench", "--arch", arch, "--workload", w, "--json"], a.threads))
                theirs.append(run([sys.executable, str(HERE / "bench_torch.py"), "--arch", arch,
                                   "--workload", w, "--threads", str(a.threads)], a.threads))
                print(json.dumps(ours[-1]), json.dumps(theirs[-1]), file=sys.stderr)
            med = lambda xs: sorted(xs)[len(xs) // 2]
            col = lambda rs, k: [r[k] for r in rs]
            mem = (med(col(ours, "peak_memory_mib")), med(col(theirs, "peak_memory_mib")))
            # Each repeat runs ours and PyTorch's back to back; the ratio is the median of
            # those paired ratios, which cancels most of the machine's drift.
            if w == "head":
                o, t = col(ours, "seconds"), col(theirs, "seconds")
                ratio = med([b / a for a, b in zip(o, t)])
                rows.append((arch, w, f"{med(o):.1f} s", f"{med(t):.1f} s", f"{ratio:.1f}x faster", *mem))
            else:
                o, t = col(ours, "images_per_second"), col(theirs, "images_per_second")
                ratio = med([a / b for a, b in zip(o, t)])
                rows.append((arch, w, f"{med(o):.1f} img/s", f"{med(t):.1f} img/s", f"{ratio:.2f}x", *mem))
    print("| model | workload | retrain | PyTorch | ratio | retrain peak MiB | PyTorch peak MiB |")
    print("|---|---|---|---|---|---|---|")
    for arch, w, o, t, r, mo, mt in rows:
        print(f"| {arch} | {w} | {o} | {t} | {r} | {mo:.0f} | {mt:.0f} |")


if __name__ == "__main__":
    main()
