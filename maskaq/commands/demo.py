"""MaskAQ end to end on the bundled Fashion-MNIST ViT teacher, no downloads.

Prints the teacher's full-precision accuracy and the W4A4 accuracy after data-free QAT on
Gaussian noise (the baseline) and on MaskAQ's synthetic images, and writes the synthetic
image grids and a JSON summary to --out.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

DEMO_METHODS = ("gaussian", "maskaq")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="cpu", help="cpu (minutes on 2 cores) or quick (seconds, smoke test)")
    parser.add_argument("--out", default="./maskaq-demo", help="where the image grids and demo.json go")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random draw")
    parser.add_argument("--wbits", type=int, default=4, help=argparse.SUPPRESS)
    parser.add_argument("--abits", type=int, default=4, help=argparse.SUPPRESS)
    parser.add_argument("--device", default=None, help="cpu or cuda (none given: cuda when available)")
    # Smoke runs: evaluate on the first N test images only.
    parser.add_argument("--limit", type=int, default=None, help=argparse.SUPPRESS)


def run(args) -> int:
    import torch

    from maskaq import zoo
    from maskaq.cli import CliError
    from maskaq.commands.common import check_bits_cli, resolve_device
    from maskaq.pipeline import evaluate_model, run_pipeline
    from maskaq.synthesis.io import save_image_grid, write_json
    from maskaq.spec import describe_model

    if args.preset not in ("cpu", "quick", "paper"):
        raise CliError(f"unknown preset {args.preset!r}; choose cpu or quick")
    check_bits_cli(args.wbits, args.abits)
    if args.limit is not None and args.limit < 1:
        raise CliError(f"--limit must be >= 1, got {args.limit}")
    device = resolve_device(args.device)
    try:
        teacher = zoo.load("vit_fmnist").to(device)
    except (ValueError, FileNotFoundError) as exc:
        raise CliError(f"the bundled teacher is missing ({str(exc).splitlines()[0]}); "
                       "train it with `maskaq train-teacher`") from None
    from maskaq.data import fashion_mnist
    test = fashion_mnist("test")
    spec = describe_model(teacher)
    out = Path(args.out)
    started = time.perf_counter()
    bits = f"W{args.wbits}A{args.abits}"
    print(f"maskaq demo: bundled ViT teacher on Fashion-MNIST, preset {args.preset}, {bits}, "
          f"{torch.get_num_threads()} threads, device {device}")
    fp = evaluate_model(teacher, test, args.limit, progress=None)
    print(f"  full precision          top-1 {fp['top1']:6.2f}%")
    results = {"preset": args.preset, "seed": args.seed, "bits": bits, "limit": args.limit,
               "full_precision": fp, "methods": {}}
    for method in DEMO_METHODS:
        t0 = time.perf_counter()
        result = run_pipeline(teacher, args.wbits, args.abits, method=method, preset=args.preset, seed=args.seed)
        acc = evaluate_model(result.model, test, args.limit, progress=None)
        seconds = time.perf_counter() - t0
        grid = save_image_grid(result.images.images, spec.mean, spec.std, out / f"{method}_images.png")
        results["methods"][method] = {"accuracy": acc, "seconds": seconds, "grid": str(grid),
                                      "nan_retries": result.report["nan_retries"],
                                      "synthesis_seconds": result.report["synthesis_seconds"]}
        print(f"  {bits} {method:<17s} top-1 {acc['top1']:6.2f}%   ({seconds:.0f}s)")
    results["seconds"] = time.perf_counter() - started
    write_json(out / "demo.json", results)
    print(f"synthetic image grids: {out / 'maskaq_images.png'} (MaskAQ), {out / 'gaussian_images.png'} (noise)")
    print(f"summary: {out / 'demo.json'}  (total {results['seconds']:.0f}s)")
    return 0
