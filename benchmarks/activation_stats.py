"""What a per-tensor quantizer faces in a ViT: the bundled teachers against published pretrained ViTs.

For each model, on 64 Fashion-MNIST test images (or --data, an ImageFolder, for a timm model with
--checkpoint), `maskaq.zoo.activation_statistics`: the post-LayerNorm channel ranges (the inputs of
qkv, fc1 and the head: what add_channel_outliers widens), the LayerNorm inputs (the residual
stream) and the softmax distribution. The published column gives the values reported for
pretrained DeiT/ViT/Swin on ImageNet, with their sources; several are read off figures (≈).

    python benchmarks/activation_stats.py
    python benchmarks/activation_stats.py --model deit_small_patch16_224 --checkpoint deit_s.pth --data val/
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

try:
    import maskaq  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).resolve().parent / "results"

# (statistic key, what it is, published value for pretrained ImageNet ViTs and its source)
ROWS = [
    ("channel_range_ratio", "post-LN channel range, widest / median",
     "≈8 (RepQ-ViT, post-LayerNorm figure: outlier channels reach ≈−23 where typical ones span ±2–3)"),
    ("outlier_channels", "post-LN channels wider than 5× the median",
     "≈5–6 of 384 (DeiT-S), ≈20 of 768 (DeiT-B): under 3 % (FQ-ViT Fig. 2, ≈)"),
    ("absmax_over_median", "post-LN max abs(x) / median abs(x)", "not published as such"),
    ("ln_input_channel_range_ratio", "LayerNorm input channel range, widest / median",
     "≈10 DeiT-S, ≈11 ViT-B, ≈19 DeiT-B, ≈20 Swin-T; some > 40 (FQ-ViT Fig. 2 and text)"),
    ("residual_absmax_over_median", "residual stream max abs(x) / median abs(x)",
     "hundreds in a few channels (FQ-ViT Fig. 2: Swin-B ≈650 against ±10)"),
    ("p_below_1_over_n", "softmax P below 1/N (uniform)",
     "≈0.85–0.9: most mass between 2e-4 and 1e-2 at N = 197 (FQ-ViT Fig. 3, ≈)"),
    ("p_max", "softmax: mean of each row's largest P", "a few values near 0.65–0.8 (FQ-ViT Fig. 3, RepQ-ViT)"),
    ("p_top5pct_mass", "softmax: mass of a row's top 5 % keys", "not published as such"),
]


def parse_args(argv=None):
    from maskaq.cli import HelpFormatter
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--models", nargs="+", default=["vit_fmnist", "vit_fmnist_outliers"],
                   help="zoo models to measure (default: the plain and the realistic bundled teacher)")
    p.add_argument("--model", default=None, help="a timm architecture instead (with --checkpoint and --data)")
    p.add_argument("--checkpoint", default=None, help="local weights of --model")
    p.add_argument("--data", default=None, help="ImageFolder of images for --model")
    p.add_argument("--images", type=int, default=64, help="how many images the statistics see")
    p.add_argument("--json", default=str(RESULTS / "activation_stats.json"))
    return p.parse_args(argv)


def images_for(model, args):
    from maskaq import data

    if args.data is None:
        if model.pretrained_cfg.get("dataset") != "Fashion-MNIST":
            raise SystemExit("--data DIR (an ImageFolder) is needed for a model not trained on Fashion-MNIST")
        dataset = data.fashion_mnist("test")
    else:
        dataset = data.image_folder(args.data, model)
    n = min(args.images, len(dataset))
    return torch.stack([dataset[i][0] for i in range(n)])


def main(argv=None) -> int:
    args = parse_args(argv)
    from maskaq import zoo
    from maskaq._files import write_json

    models = {}
    if args.model:
        models[args.model] = zoo.create(args.model, checkpoint=args.checkpoint)
    else:
        models = {name: zoo.load(name) for name in args.models}
    stats = {name: zoo.activation_statistics(m, images_for(m, args)) for name, m in models.items()}
    head = "| statistic | " + " | ".join(stats) + " | pretrained ViTs, published |"
    lines = [head, "|" + "---|" * (len(stats) + 2)]
    for key, text, published in ROWS:
        lines.append(f"| {text} | " + " | ".join(f"{s[key]:.3g}" for s in stats.values()) + f" | {published} |")
    table = "\n".join(lines)
    print(table)
    write_json(Path(args.json), {"images": args.images, "statistics": stats,
                                 "published": {key: published for key, _, published in ROWS},
                                 "transform": {n: m.pretrained_cfg.get("channel_outliers") for n, m in models.items()}})
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
