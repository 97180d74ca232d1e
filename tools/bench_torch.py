"""PyTorch side of `retrain bench`: the same workloads, measured the same way, printed as
the same JSON. Dev-only (torch + torchvision venv; onnx, onnxscript and onnxruntime for
`--engine onnxruntime`). Threads are pinned to the count given (retrain's rayon pool uses
the same number: RAYON_NUM_THREADS).

    python tools/bench_torch.py --arch mobilenet_v2 --workload full --threads 2
    python tools/bench_torch.py --arch resnet18 --workload full --layout channels_last
    python tools/bench_torch.py --arch resnet18 --workload inference --engine onnxruntime
    python tools/bench_torch.py --arch mobilenet_v2 --workload inference --engine onnxruntime --profile
    python tools/bench_torch.py --arch resnet18 --workload head --head-mode cached --layout channels_last

The anchors an informed user runs: `--layout channels_last` (model and input in NHWC
memory, `inference_mode` for inference), and ONNX Runtime on the model exported by
`torch.onnx.export` (opset 17, all graph optimisations, intra-op threads as given); for
head-only training, the backbone's features cached once (`--head-mode cached`) instead of
the naive loop's backbone forward every step.
"""

import argparse
import json
import resource
import statistics
import sys
import time

import torch
import torch.nn.functional as F
import torchvision

# retrain's default partial freeze for each architecture (its family's `default_partial`).
PARTIAL = {
    "mobilenet_v2": "features.0-13",
    "resnet18": "conv1,bn1,layer1,layer2",
    "efficientnet_b0": "features.0-4",
    "mobilenet_v3_large": "features.0-12",
    "convnext_tiny": "features.0-4",
    "vit_b_16": ",".join(["conv_proj", "class_token", "encoder.pos_embedding"]
                         + [f"encoder.layers.encoder_layer_{i}" for i in range(6)]),
}
HEAD = {"mobilenet_v2": "classifier", "efficientnet_b0": "classifier.1",
        "mobilenet_v3_large": "classifier.3", "convnext_tiny": "classifier.2",
        "vit_b_16": "heads.head"}


def frozen_prefixes(arch):
    out = []
    for item in PARTIAL[arch].split(","):
        base, _, last = item.rpartition(".")
        if "-" in last:
            a, b = map(int, last.split("-"))
            out += [f"{base}.{i}" for i in range(a, b + 1)]
        else:
            out.append(item)
    return out


def freeze(model, prefixes):
    """Frozen like retrain freezes: no grad (prefixes name modules or, like a ViT's class
    token, parameters), and BatchNorm in eval mode (fixed statistics)."""
    covered = lambda name: any(name == p or name.startswith(p + ".") for p in prefixes)
    for name, p in model.named_parameters():
        if covered(name):
            p.requires_grad_(False)
    for name, m in model.named_modules():
        if covered(name) and isinstance(m, torch.nn.BatchNorm2d):
            m.eval()


def timed(warmup, steps, fn):
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def onnxruntime_inference(model, x, threads, warmup, steps, profile=False):
    """Seconds per batch of ONNX Runtime's CPU execution provider on the exported model.
    With `profile`, ONNX Runtime's own profiler also runs and the time per kind of node
    (1x1, 3x3 or depthwise convolution, other op types) goes to stderr."""
    import tempfile

    import onnxruntime as ort
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/model.onnx"
        torch.onnx.export(model, (x,), path, opset_version=17, input_names=["input"],
                          output_names=["logits"], dynamo=True, external_data=False)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if profile:
            options.enable_profiling = True
            options.profile_file_prefix = f"{tmp}/profile"
            options.optimized_model_filepath = f"{tmp}/optimized.onnx"
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        feed = {"input": x.numpy()}
        t = timed(warmup, steps, lambda: session.run(None, feed))
        if profile:
            print_node_profile(session.end_profiling(), f"{tmp}/optimized.onnx", warmup + steps)
        return t


def print_node_profile(trace, optimized, runs):
    """Milliseconds per run of each kind of node in ONNX Runtime's profile `trace`, the
    convolutions told apart by kernel and group from the optimised model."""
    import collections

    import onnx
    graph = onnx.load(optimized).graph
    shapes = {i.name: list(i.dims) for i in graph.initializer}
    kinds = {}
    for node in graph.node:
        kind = node.op_type
        weight = shapes.get(node.input[1]) if node.op_type == "Conv" and len(node.input) > 1 else None
        if weight:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            kind = "depthwise conv" if attrs.get("group", 1) > 1 else f"conv {weight[2]}x{weight[3]}"
            if attrs.get("strides", [1, 1])[0] > 1:
                kind += " stride 2"
        kinds[node.name + "_kernel_time"] = kind
    totals = collections.Counter()
    for event in json.load(open(trace)):
        if event.get("cat") == "Node" and event["name"] in kinds:
            totals[kinds[event["name"]]] += event["dur"] / 1000 / runs
    all_ms = sum(totals.values())
    for kind, ms in totals.most_common():
        print(f"{kind:24s} {ms:8.1f} ms/run {100 * ms / all_ms:5.1f}%", file=sys.stderr)


def cached_head_training(model, arch, x, y, batch_size, images=512, epochs=10):
    """Seconds to train the head as a PyTorch user who knows the trick does, and as retrain
    does: the backbone's pooled features computed once per image (eval mode, no grad), then
    the head module (its frozen layers included, as retrain's `forward_head`) trained on
    them for `epochs`, only the `HEAD` parameters trainable."""
    trainable = HEAD.get(arch, "fc")
    name = trainable.split(".")[0]
    head = getattr(model, name)
    setattr(model, name, torch.nn.Identity())
    for param_name, p in head.named_parameters():
        p.requires_grad_(f"{name}.{param_name}".startswith(trainable))
    start = time.perf_counter()
    model.eval()
    with torch.no_grad():
        features = torch.cat([model(torch.randn_like(x)) for _ in range(images // batch_size)])
    head.train()
    opt = torch.optim.SGD([p for p in head.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    for _ in range(epochs):
        for chunk in features.split(batch_size):
            opt.zero_grad()
            F.cross_entropy(head(chunk), y[:len(chunk)]).backward()
            opt.step()
    return time.perf_counter() - start


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="mobilenet_v2")
    ap.add_argument("--workload", choices=["inference", "full", "partial", "head"], required=True)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layout", choices=["nchw", "channels_last"], default="nchw")
    ap.add_argument("--engine", choices=["pytorch", "onnxruntime"], default="pytorch")
    ap.add_argument("--head-mode", choices=["naive", "cached"], default="naive",
                    help="head workload: the backbone every step, or its features cached once")
    ap.add_argument("--profile", action="store_true",
                    help="onnxruntime inference: ONNX Runtime's time per kind of node, to stderr")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = getattr(torchvision.models, a.arch)(num_classes=1000)
    x = torch.randn(a.batch_size, 3, a.image_size, a.image_size)
    y = torch.arange(a.batch_size) % 1000
    if a.layout == "channels_last":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    ips = seconds = None
    if a.workload == "inference" and a.engine == "onnxruntime":
        model.eval()
        t = onnxruntime_inference(model, x, a.threads, a.warmup, a.steps, a.profile)
        ips = a.batch_size / statistics.median(t)
    elif a.workload == "inference":
        model.eval()
        with torch.inference_mode():
            t = timed(a.warmup, a.steps, lambda: model(x))
        ips = a.batch_size / statistics.median(t)
    elif a.workload in ("full", "partial"):
        model.train()
        if a.workload == "partial":
            freeze(model, frozen_prefixes(a.arch))
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)

        def step():
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()

        t = timed(a.warmup, a.steps, step)
        ips = a.batch_size / statistics.median(t)
    elif a.head_mode == "cached":
        seconds = cached_head_training(model, a.arch, x, y, a.batch_size)
    else:
        # The naive loop: backbone forward every step, parameters frozen with requires_grad=False.
        head = HEAD.get(a.arch, "fc")
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith(head))
        model.train()
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
        start = time.perf_counter()
        for _ in range(10):
            for _ in range(512 // a.batch_size):
                opt.zero_grad()
                F.cross_entropy(model(torch.randn_like(x)), y).backward()
                opt.step()
        seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({
        "engine": a.engine, "layout": a.layout, "arch": a.arch, "workload": a.workload, "batch_size": a.batch_size,
        "image_size": a.image_size, "threads": a.threads, "images_per_second": ips,
        "seconds": seconds, "peak_memory_mib": peak, "version": torch.__version__ if a.engine == "pytorch" else __import__("onnxruntime").__version__,
    }))


if __name__ == "__main__":
    main()
