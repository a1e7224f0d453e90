"""Which quantizers cost the accuracy of a low-bit student: one group at a time at 8 bits.

The student is `ptq`'s (min-max activation ranges from `--calib-images` Gaussian-noise images, no
QAT). For each group of quantizers (the weights of every qkv, proj, fc1, fc2, head and the patch
embedding; the inputs of those layers; the attention operands q and k, the softmax output P, and v)
the same student is made again with that group at 8 bits and everything else at the low bit
width, and its top-1 on the Fashion-MNIST test split is set against the all-low-bit student's.
A group that gains much is where the low-bit error lives; QAT can only help there if it moves
those grids or weights (on the plain bundled teacher at W4A4, P's grid alone is about half the gap to FP).

    python benchmarks/sensitivity_ptq.py                      # W4A4 and W3A3, ~5 minutes a width on 1 core
    python benchmarks/sensitivity_ptq.py --bits W3A3 --seeds 0 1 2 --limit 2000
    python benchmarks/sensitivity_ptq.py --p-grids            # also: other PTQ grids for P alone

Prints a table and writes JSON (default benchmarks/results/sensitivity_ptq.json).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

try:
    import maskaq  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy_dfq import parse_bits  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
_ATTENTION_OPERANDS = {"q_quantizer": "attention q, k", "k_quantizer": "attention q, k",
                       "p_quantizer": "attention P (softmax)", "v_quantizer": "attention v"}


def parse_args(argv=None):
    from maskaq.cli import HelpFormatter
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--bits", nargs="+", default=["W4A4", "W3A3"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="noise draws for the calibration")
    p.add_argument("--calib-images", type=int, default=32, help="noise images for min-max (preset cpu's)")
    p.add_argument("--limit", type=int, default=None, help="evaluate on the first N test images")
    p.add_argument("--teacher", default="vit_fmnist")
    p.add_argument("--p-grids", action="store_true",
                   help="also the student with other grids for P (least-squares clip, LSQ init, fixed [0, c])")
    p.add_argument("--json", default=str(RESULTS / "sensitivity_ptq.json"))
    return p.parse_args(argv)


def quantizer_group(name: str) -> str:
    """'weights of fc1', 'input of qkv', 'attention P (softmax)', ... for a quantizer's module path."""
    parts = name.split(".")
    leaf, layer = parts[-1], parts[-2] if len(parts) > 1 else ""
    if leaf in _ATTENTION_OPERANDS:
        return _ATTENTION_OPERANDS[leaf]
    if "patch_embed" in parts:
        layer = "patch_embed"
    kind = "weights of" if leaf == "weight_quantizer" else "input of"
    return f"{kind} {layer}"


def _quantizers(student):
    from maskaq.quant import LsqActQuantizer, WeightQuantizer
    return [(n, m) for n, m in student.named_modules() if isinstance(m, (LsqActQuantizer, WeightQuantizer))]


def ptq_student(teacher, wbits, abits, calib, high_group=None):
    """`ptq`'s student, with the quantizers of `high_group` at 8 bits (before calibration)."""
    from maskaq.quant import calibrate, quantize_model
    student = quantize_model(teacher, wbits, abits)
    for name, quantizer in _quantizers(student):
        if quantizer_group(name) == high_group:
            quantizer.bits = 8  # weights: the step follows bits at every forward; activations: calibrated next
    return calibrate(student, calib).eval()


P_GRIDS = ("mse", "lsq", "fixed 0.5", "fixed 1")


def with_p_grid(student, calib, grid):
    """Re-make the P quantizers' grids of a calibrated student: "mse"/"lsq" from `calib` with that
    init (the rest keep theirs), "fixed c" spans [0, c]."""
    p_quantizers = [m for n, m in student.named_modules() if n.endswith("p_quantizer")]
    if grid.startswith("fixed"):
        top = float(grid.split()[1])
        with torch.no_grad():
            for q in p_quantizers:
                q.step.fill_(top / (q.qmax - q.qmin))
                q.zero_point.fill_(float(q.qmin))
        return student
    from maskaq.quant import calibrate
    return calibrate(student, calib, init=grid, only=lambda name: name.endswith("p_quantizer"))


def main(argv=None) -> int:
    args = parse_args(argv)
    from maskaq import zoo
    from maskaq.data import fashion_mnist
    from maskaq.evaluation import evaluate_model
    from maskaq.spec import describe_model
    from maskaq.synthesis.baselines import gaussian_images

    torch.manual_seed(0)
    teacher = zoo.create(args.teacher).eval()
    spec = describe_model(teacher)
    test = fashion_mnist("test")

    def top1(model):
        with torch.no_grad():
            return evaluate_model(model, test, limit=args.limit, progress=False)["top1"]

    fp = top1(teacher)
    out = {"teacher": args.teacher, "fp_top1": fp, "limit": args.limit, "calib_images": args.calib_images,
           "seeds": args.seeds, "bits": {}}
    for bits in args.bits:
        wbits, abits = parse_bits(bits)
        groups = sorted({quantizer_group(n) for n, _ in _quantizers(ptq_student(
            teacher, wbits, abits, gaussian_images(spec, 2, 0).images))})
        rows = {g: [] for g in [None] + groups}
        for seed in args.seeds:
            calib = gaussian_images(spec, args.calib_images, seed).images
            for group in rows:
                rows[group].append(top1(ptq_student(teacher, wbits, abits, calib, group)))
                print(f"{bits} seed {seed} {group or 'all at ' + bits}: {rows[group][-1]:.2f}", file=sys.stderr, flush=True)
        if args.p_grids:
            for grid in P_GRIDS:
                rows[f"P grid: {grid}"] = []
                for seed in args.seeds:
                    calib = gaussian_images(spec, args.calib_images, seed).images
                    rows[f"P grid: {grid}"].append(top1(with_p_grid(ptq_student(teacher, wbits, abits, calib), calib, grid)))
        base = statistics.mean(rows[None])
        out["bits"][bits] = {"all_low": base, "groups": {g: statistics.mean(v) for g, v in rows.items() if g},
                             "per_seed": {g or "all_low": v for g, v in rows.items()}}
        print(f"\n{bits}: FP {fp:.2f}, every quantizer at {bits} {base:.2f} (gap {fp - base:.2f} pt); "
              f"one group at 8 bits, mean of seeds {args.seeds}:\n")
        print("| group at 8 bits | top-1 | gain | share of the gap |\n|---|---|---|---|")
        for g in sorted(groups, key=lambda g: -statistics.mean(rows[g])) + [g for g in rows if g and g.startswith("P grid")]:
            gain = statistics.mean(rows[g]) - base
            print(f"| {g} | {statistics.mean(rows[g]):.2f} | {gain:+.2f} | {gain / max(fp - base, 1e-9):.0%} |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1))
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
