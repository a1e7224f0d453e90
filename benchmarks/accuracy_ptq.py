"""Post-training quantization baselines of the MaskAQ quantizer on the bundled teacher.

FP, then W8A8, W6A6, W4A8, W4A4, W3A3 of ``maskaq.quant.quantize_model`` with the LSQ
initialization of docs/method.md#the-quantizer from one calibration batch of
  * real: Fashion-MNIST training images (a random subset, drawn with --seed), and
  * noise: Gaussian noise x ~ N(0, 1) in the normalized input space (no optimization),
evaluated on the Fashion-MNIST test split (10k images, bundled). No training happens: these rows
are what calibration alone gives; synthesis and QAT start from them.

    python benchmarks/accuracy_ptq.py                       # markdown table
    python benchmarks/accuracy_ptq.py --json out/ptq.json   # and JSON
    python benchmarks/accuracy_ptq.py --repeats 3           # mean ± std over 3 calibration draws
    python benchmarks/accuracy_ptq.py --random-init --limit 512   # smoke test without the checkpoint

Target: W8A8 with real calibration within 0.5 pt of FP top-1.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

try:
    import maskaq  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT_SETTINGS = "8/8,6/6,4/8,4/4,3/3"


def parse_settings(text: str) -> list[tuple[int, int]]:
    """"8/8,4/4" -> [(8, 8), (4, 4)] (W/A bits)."""
    from maskaq.quant.quantizers import check_bits

    settings = []
    for item in text.split(","):
        try:
            w, a = item.strip().split("/")
            settings.append((check_bits(int(w), "wbits"), check_bits(int(a), "abits")))
        except ValueError as exc:
            raise SystemExit(f"bad --settings item {item!r}: expected W/A with bits 2..8 ({exc})") from None
    return settings


def build_teacher(args) -> torch.nn.Module:
    if args.random_init:
        from timm.models.vision_transformer import VisionTransformer

        from maskaq.data import FMNIST_MEAN, FMNIST_STD
        from maskaq.commands.train_teacher import DEFAULT_MODEL_ARGS

        torch.manual_seed(args.seed)
        model = VisionTransformer(**DEFAULT_MODEL_ARGS).eval()
        model.pretrained_cfg = {"mean": FMNIST_MEAN, "std": FMNIST_STD, "input_size": (1, 28, 28),
                                "num_classes": 10, "architecture": "random-init"}
        return model
    from maskaq import zoo

    try:
        return zoo.load(args.model)
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"cannot load the teacher {args.model!r}: {exc} "
                         "(train it with `maskaq train-teacher`, or pass --random-init for a smoke test)") from None


def real_calibration(n: int, seed: int, root) -> torch.Tensor:
    from maskaq.data import fashion_mnist

    train = fashion_mnist("train", root=root)
    gen = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(train), generator=gen)[:n].tolist()
    return torch.stack([train[i][0] for i in index])


def noise_calibration(n: int, seed: int, input_size) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((n,) + tuple(input_size), generator=gen)


def test_loader(limit, batch_size: int):
    from torch.utils.data import DataLoader, Subset

    from maskaq.data import fashion_mnist

    test = fashion_mnist("test")
    if limit is not None and limit < len(test):
        test = Subset(test, range(limit))
    return DataLoader(test, batch_size=batch_size, shuffle=False), len(test)


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1)
    return mean, var ** 0.5


def markdown_table(rows: list[dict], fp_top1: float) -> str:
    repeats = max(len(r["top1_per_seed"]) for r in rows)
    spread = " (± std over seeds)" if repeats > 1 else ""
    lines = [f"| setting | calibration | top-1 %{spread} | Δ top-1 vs FP (pt) | top-5 % | calib s | eval s |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        delta = "" if r["setting"] == "FP" else f"{r['top1'] - fp_top1:+.2f}"
        top1 = f"{r['top1']:.2f}" + (f" ± {r['top1_std']:.2f}" if len(r["top1_per_seed"]) > 1 else "")
        lines.append(f"| {r['setting']} | {r['calibration']} | {top1} | {delta} | {r['top5']:.2f} | "
                     f"{r['calib_s']:.1f} | {r['eval_s']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_fmnist", help="bundled zoo model (default vit_fmnist)")
    parser.add_argument("--settings", default=DEFAULT_SETTINGS, help=f"W/A bit pairs (default {DEFAULT_SETTINGS})")
    parser.add_argument("--calib-images", type=int, default=64, help="calibration batch size (default 64)")
    parser.add_argument("--sources", default="real,noise", help="calibration sources: real, noise (default both)")
    parser.add_argument("--first-last-8bit", action="store_true", help="patch embedding and head at 8 bits")
    parser.add_argument("--weight-method", default="minmax", choices=("minmax", "lsq"))
    parser.add_argument("--act-init", default="minmax",
                        choices=("minmax", "lsq", "lsq_pminmax", "mse", "mse_pminmax"),
                        help="activation quantizer init: minmax (PTQ), lsq (the QAT start point of "
                             "docs/method.md#the-quantizer), lsq_pminmax (LSQ, min-max for P), mse (the "
                             "clipped min-max range of least squared error) or mse_pminmax (mse, min-max for P)")
    parser.add_argument("--seed", type=int, default=0, help="first calibration seed (subset / noise)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="calibrate with seeds seed..seed+R-1 and report mean ± std (default 1)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate on the first N test images only")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--fmnist-root", default=None, help="directory with the Fashion-MNIST train idx files")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--random-init", action="store_true", help="random teacher (smoke test without checkpoint)")
    parser.add_argument("--json", default=None, metavar="FILE", help="write the results as JSON to FILE")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.calib_images < 1 or args.repeats < 1:
        raise SystemExit("--calib-images and --repeats must be >= 1")
    sources = [s.strip() for s in args.sources.split(",") if s.strip()]
    if not sources or any(s not in ("real", "noise") for s in sources):
        raise SystemExit(f"--sources takes real and/or noise, got {args.sources!r}")
    settings = parse_settings(args.settings)

    import maskaq
    from maskaq.evaluation import evaluate
    from maskaq.quant import calibrate, quantize_model

    device = torch.device(args.device)
    teacher = build_teacher(args).to(device)
    input_size = tuple(teacher.pretrained_cfg.get("input_size", (1, 28, 28)))
    loader, num_test = test_loader(args.limit, args.batch_size)
    seeds = list(range(args.seed, args.seed + args.repeats))
    calib = {}
    for seed in seeds:
        if "real" in sources:
            try:
                calib["real", seed] = real_calibration(args.calib_images, seed, args.fmnist_root)
            except FileNotFoundError as exc:
                raise SystemExit(f"real calibration needs the Fashion-MNIST train split: {exc}") from None
        if "noise" in sources:
            calib["noise", seed] = noise_calibration(args.calib_images, seed, input_size)

    progress = not args.no_progress
    t0 = time.perf_counter()
    fp = evaluate(teacher, loader, device=device, progress=progress)
    rows = [{"setting": "FP", "wbits": 32, "abits": 32, "calibration": "-", "top1": fp["top1"], "top1_std": 0.0,
             "top5": fp["top5"], "top1_per_seed": [fp["top1"]], "calib_s": 0.0, "eval_s": time.perf_counter() - t0}]
    print(f"FP: top-1 {fp['top1']:.2f}%", file=sys.stderr, flush=True)
    for wbits, abits in settings:
        for source in sources:
            top1, top5, calib_s, eval_s = [], [], 0.0, 0.0
            for seed in seeds:
                t0 = time.perf_counter()
                qmodel = quantize_model(teacher, wbits, abits, first_last_8bit=args.first_last_8bit,
                                        weight_method=args.weight_method)
                calibrate(qmodel, calib[source, seed].to(device), init=args.act_init)
                t1 = time.perf_counter()
                result = evaluate(qmodel, loader, device=device, progress=progress)
                calib_s, eval_s = calib_s + t1 - t0, eval_s + time.perf_counter() - t1
                top1.append(result["top1"])
                top5.append(result["top5"])
            mean1, std1 = _mean_std(top1)
            rows.append({"setting": f"W{wbits}A{abits}", "wbits": wbits, "abits": abits, "calibration": source,
                         "top1": mean1, "top1_std": std1, "top5": _mean_std(top5)[0], "top1_per_seed": top1,
                         "calib_s": calib_s / len(seeds), "eval_s": eval_s / len(seeds)})
            print(f"W{wbits}A{abits} {source}: top-1 {mean1:.2f}%", file=sys.stderr, flush=True)

    table = markdown_table(rows, fp["top1"])
    w8a8_real = next((r for r in rows if r["setting"] == "W8A8" and r["calibration"] == "real"), None)
    seed_text = f"seed {args.seed}" if args.repeats == 1 else f"seeds {seeds[0]}..{seeds[-1]}"
    print(f"\nPTQ on {teacher.pretrained_cfg.get('architecture', args.model)}, {num_test} test images, "
          f"{args.calib_images} calibration images ({seed_text}), weights {args.weight_method}"
          f"{', first/last 8-bit' if args.first_last_8bit else ''}, device {device}\n")
    print(table)
    target = None
    if w8a8_real is not None:
        delta = w8a8_real["top1"] - fp["top1"]
        target = {"w8a8_real_delta_pt": delta, "met": delta >= -0.5}
        print(f"\nW8A8, real calibration: {delta:+.2f} pt top-1 vs FP (target: no worse than -0.5 pt: "
              f"{'met' if target['met'] else 'NOT met'})")
    if args.json:
        report = {
            "benchmark": "accuracy_ptq", "model": args.model, "random_init": args.random_init,
            "test_images": num_test, "calib_images": args.calib_images, "seeds": seeds,
            "weight_method": args.weight_method, "first_last_8bit": args.first_last_8bit,
            "device": str(device), "torch": torch.__version__, "python": platform.python_version(),
            "extension": maskaq.extension_info(), "rows": rows, "target": target,
        }
        from maskaq._files import write_json
        print(f"wrote {write_json(args.json, report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
