"""MaskAQ end to end on the bundled Fashion-MNIST ViT teacher, no downloads.

The teacher is vit_fmnist_outliers: the bundled ViT with a pretrained ViT's post-LayerNorm channel
outliers (the same function, the hard case of a per-tensor 4-bit quantizer). Prints its
full-precision accuracy and the W4A4 accuracy of ptq (min-max calibration on noise, no
training), QAT on Gaussian noise, QAT on MaskAQ's synthetic images and, where the Fashion-MNIST
training split is installed, QAT on real images (the upper bound); writes the image grids and a
JSON summary to --out.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

DEMO_METHODS = ("ptq", "gaussian", "maskaq", "real")
MEANING = ("ptq: no data, no training; gaussian: QAT on noise; real: QAT on real images (the upper bound). "
           "The data decides here: MaskAQ's synthetic images should land between gaussian and real.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="cpu", help="cpu (minutes on 2 cores) or quick (seconds, smoke test)")
    parser.add_argument("--out", default="./maskaq-demo", metavar="DIR",
                        help="where the image grids and demo.json go; a DIR holding an earlier demo's demo.json "
                             "(the default one too) is refused unless --overwrite")
    parser.add_argument("--overwrite", action="store_true", help="replace the earlier demo in --out DIR")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random draw")
    parser.add_argument("--teacher", default="vit_fmnist_outliers",
                        help="zoo teacher: vit_fmnist_outliers (a pretrained ViT's channel outliers) or vit_fmnist "
                             "(the plain bundled teacher, on which every method lands within noise of ptq at W4A4)")
    parser.add_argument("--wbits", type=int, default=4, help=argparse.SUPPRESS)
    parser.add_argument("--abits", type=int, default=4, help=argparse.SUPPRESS)
    from maskaq.commands.common import DEVICE_HELP
    parser.add_argument("--device", default=None, help=DEVICE_HELP)
    # Smoke runs: evaluate on the first N test images only.
    parser.add_argument("--limit", type=int, default=None, help=argparse.SUPPRESS)


def run(args) -> int:
    import torch

    from maskaq import zoo
    from maskaq.cli import CliError
    from maskaq.commands.common import check_bits_cli, check_output_dir, resolve_device
    from maskaq.pipeline import evaluate_model, run_pipeline
    from maskaq._files import write_json
    from maskaq.images import save_image_grid
    from maskaq.spec import describe_model

    if args.preset not in ("cpu", "quick", "paper"):
        raise CliError(f"unknown preset {args.preset!r}; choose cpu or quick")
    check_bits_cli(args.wbits, args.abits)
    if args.limit is not None and args.limit < 1:
        raise CliError(f"--limit must be >= 1, got {args.limit}")
    out = Path(args.out)
    check_output_dir(out)
    if (out / "demo.json").exists() and not args.overwrite:
        raise CliError(f"{out} holds an earlier demo ({out / 'demo.json'}); pass --overwrite to replace it, "
                       "or choose another --out")
    device = resolve_device(args.device)
    try:
        teacher = zoo.load(args.teacher).to(device)
    except (ValueError, FileNotFoundError) as exc:
        raise CliError(f"the bundled teacher is missing ({str(exc).splitlines()[0]}); "
                       "train it with `maskaq train-teacher`") from None
    from maskaq.data import fashion_mnist
    test = fashion_mnist("test")
    try:
        train = fashion_mnist("train")
    except (FileNotFoundError, ValueError):
        train = None  # the real-data row needs the training split (apt-get install dataset-fashion-mnist)
    spec = describe_model(teacher)
    started = time.perf_counter()
    bits = f"W{args.wbits}A{args.abits}"
    print(f"maskaq demo: {args.teacher} on Fashion-MNIST, preset {args.preset}, {bits}, "
          f"{torch.get_num_threads()} threads, device {device}")
    fp = evaluate_model(teacher, test, args.limit, progress=None)
    print(f"  full precision          top-1 {fp['top1']:6.2f}%")
    results = {"teacher": args.teacher, "preset": args.preset, "seed": args.seed, "bits": bits, "limit": args.limit,
               "full_precision": fp, "methods": {}}
    for method in DEMO_METHODS:
        if method == "real" and train is None:
            print("  (real: skipped, the Fashion-MNIST training split is not installed)")
            continue
        t0 = time.perf_counter()
        extra = {"real_data": train} if method == "real" else {}
        result = run_pipeline(teacher, args.wbits, args.abits, method=method, preset=args.preset, seed=args.seed,
                              **extra)
        acc = evaluate_model(result.model, test, args.limit, progress=None)
        seconds = time.perf_counter() - t0
        grid = save_image_grid(result.images.images, spec.mean, spec.std, out / f"{method}_images.png")
        results["methods"][method] = {"accuracy": acc, "seconds": seconds, "grid": str(grid),
                                      "nan_retries": result.report["nan_retries"],
                                      "synthesis_seconds": result.report["synthesis_seconds"]}
        print(f"  {bits} {method:<17s} top-1 {acc['top1']:6.2f}%   ({seconds:.0f}s)")
    print(MEANING)
    results["seconds"] = time.perf_counter() - started
    write_json(out / "demo.json", results)
    print(f"synthetic image grids: {out / 'maskaq_images.png'} (MaskAQ), {out / 'gaussian_images.png'} (noise)")
    print(f"summary: {out / 'demo.json'}  (total {results['seconds']:.0f}s)")
    return 0
