"""Fidelity of the integer export: does the integer model predict what the fake-quant model does?

With --target onnx the same for the ONNX QDQ export (maskaq.export_onnx) run in ONNX Runtime.

For each bit setting (default W8A8 and W4A8) the bundled teacher (maskaq.zoo.load('vit_fmnist'), or
--teacher vit_fmnist_outliers: the same function with a pretrained ViT's channel outliers) is quantized with maskaq.quant.quantize_model, calibrated on --calib images, exported with
maskaq.integer.export_integer, and both models are run on the Fashion-MNIST test split.
Reports the top-1 agreement (target >= 99.5%), the max and mean absolute logit difference, and
both models' top-1 accuracy. --random uses a random-init ViT of the teacher's shape on random
images instead (when the teacher checkpoint is not there).

    python benchmarks/fidelity_integer.py [--bits 8,8 4,8] [--limit N] [--target onnx [--onnx-weights uint8]]
        [--teacher vit_fmnist_outliers] [--json out.json]
"""
import argparse
from collections import Counter
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402


def _teacher_and_data(args):
    """(model, test images, labels or None, calibration images)."""
    g = torch.Generator().manual_seed(args.seed)
    if args.random:
        from timm.models.vision_transformer import VisionTransformer

        torch.manual_seed(args.seed)
        model = VisionTransformer(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=48, depth=3,
                                  num_heads=3, mlp_ratio=2.0).eval()
        n = args.limit or 2000
        return model, torch.randn(n, 1, 28, 28, generator=g), None, torch.randn(args.calib, 1, 28, 28, generator=g)
    from maskaq import zoo
    from maskaq.data import fashion_mnist

    try:
        model = zoo.load(args.teacher)
    except (FileNotFoundError, ValueError) as exc:
        sys.exit(f"fidelity_integer.py: the bundled teacher is not available ({exc}); "
                 "train it (maskaq train-teacher) or pass --random")
    test = fashion_mnist("test")
    n = min(len(test), args.limit or len(test))
    images = torch.stack([test[i][0] for i in range(n)])
    labels = torch.tensor([int(test[i][1]) for i in range(n)])
    try:  # calibrate on training images when the train split is installed, else on other test images
        source = fashion_mnist("train")
        where = "train"
    except (FileNotFoundError, OSError, ValueError):
        source, where = test, "test"
    index = torch.randperm(len(source), generator=g)[: args.calib]
    calib = torch.stack([source[int(i)][0] for i in index])
    print(f"calibration: {args.calib} {where} images; evaluation: {n} test images", file=sys.stderr)
    return model, images, labels, calib


@torch.no_grad()
def _logits(model, images, batch, desc):
    return torch.cat([model(images[i:i + batch]) for i in tqdm(range(0, len(images), batch), desc=desc, leave=False)])


def _onnx_model(qmodel, weights="int8"):
    """The student as an ONNX QDQ graph in ONNX Runtime (CPU provider), called like a module."""
    import tempfile

    import onnxruntime as ort

    from maskaq.integer.qdq import export_onnx

    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(qmodel, f"{tmp}/student.onnx", weights=weights)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(None, {"x": x.numpy()})[0])


@torch.no_grad()
def measure(model, images, labels, calib, wbits, abits, batch, kernel, target="integer", onnx_weights="int8"):
    from maskaq.integer import IntLinear, export_integer
    from maskaq.quant import calibrate, quantize_model

    qmodel = quantize_model(model, wbits, abits).eval()
    calibrate(qmodel, calib)
    imodel = export_integer(qmodel, kernel=kernel)
    linears = [m for m in imodel.modules() if isinstance(m, IntLinear) and m.quantized_input]
    gemms = Counter(m.cpu_gemm for m in linears)  # which GEMM runs each quantized-input layer here
    start = time.perf_counter()
    fake = _logits(qmodel, images, batch, f"W{wbits}A{abits} fake-quant")
    exported = _onnx_model(qmodel, onnx_weights) if target == "onnx" else imodel
    integer = _logits(exported, images, batch, f"W{wbits}A{abits} {target}")
    diff = (fake - integer).abs()
    record = {
        "bits": f"W{wbits}A{abits}", "target": target,
        "kernel": kernel if target == "integer" else f"onnxruntime, {onnx_weights} weights",
        "images": len(images),
        "cpu_capability": imodel.maskaq_integer["cpu_path"]["cpu_capability"],
        "cpu_int8": imodel.maskaq_integer["cpu_path"][f"{kernel}_int8"],
        # what runs the GEMMs: maskaq's path for the integer model, ONNX Runtime's own for onnx
        "cpu_gemms": (", ".join(f"{name} {count}/{len(linears)}" for name, count in sorted(gemms.items()))
                      if target == "integer" else f"ort {onnx_weights}w"),
        "agreement_pct": round(100.0 * (fake.argmax(1) == integer.argmax(1)).float().mean().item(), 3),
        "max_abs_logit_diff": diff.max().item(), "mean_abs_logit_diff": diff.mean().item(),
        "mean_abs_logit": fake.abs().mean().item(), "seconds": round(time.perf_counter() - start, 1),
    }
    if labels is not None:
        record["top1_fakequant"] = round(100.0 * (fake.argmax(1) == labels).float().mean().item(), 2)
        record["top1_integer"] = round(100.0 * (integer.argmax(1) == labels).float().mean().item(), 2)
    return record


def main(argv=None) -> int:
    from maskaq.integer.qdq import WEIGHT_DTYPES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", nargs="+", default=["8,8", "4,8"], help="wbits,abits pairs")
    parser.add_argument("--limit", type=int, default=None, help="evaluate on the first N test images")
    parser.add_argument("--calib", type=int, default=64, help="calibration images")
    parser.add_argument("--batch", type=int, default=250)
    parser.add_argument("--kernel", default="onednn", choices=("onednn", "fbgemm"))
    parser.add_argument("--random", action="store_true", help="random-init model and images (no teacher)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--teacher", default="vit_fmnist", help="zoo teacher (vit_fmnist or vit_fmnist_outliers)")
    parser.add_argument("--target", default="integer", choices=("integer", "onnx"),
                        help="integer: maskaq's integer model; onnx: the ONNX QDQ export in ONNX Runtime")
    parser.add_argument("--onnx-weights", default="int8", choices=tuple(WEIGHT_DTYPES),
                        help="onnx: weights stored as int8 (ONNX Runtime's U8S8 kernels, which clip pair "
                             "sums on CPUs without VNNI) or uint8 (its U8U8 kernels, exact)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    try:
        pairs = [tuple(int(v) for v in b.split(",")) for b in args.bits]
        if any(len(p) != 2 for p in pairs):
            raise ValueError
    except ValueError:
        parser.error(f"--bits takes wbits,abits pairs like 8,8; got {args.bits}")
    model, images, labels, calib = _teacher_and_data(args)
    records = [measure(model, images, labels, calib, w, a, args.batch, args.kernel, args.target, args.onnx_weights)
               for w, a in pairs]
    header = f"{'bits':<6} {'ISA':<7} {'GEMMs':<14} {'images':>6} {'agree %':>8} {'max |dlogit|':>13} {'mean |dlogit|':>14} {'mean |logit|':>13}"
    if labels is not None:
        header += f" {'top1 FQ':>8} {'top1 int':>8}"
    print(header)
    print("-" * len(header))
    for r in records:
        line = (f"{r['bits']:<6} {r['cpu_capability']:<7} {r['cpu_gemms']:<14} {r['images']:>6} {r['agreement_pct']:>8.2f} {r['max_abs_logit_diff']:>13.4g} "
                f"{r['mean_abs_logit_diff']:>14.4g} {r['mean_abs_logit']:>13.4g}")
        if labels is not None:
            line += f" {r['top1_fakequant']:>8.2f} {r['top1_integer']:>8.2f}"
        print(line)
    if args.json:
        from maskaq._files import write_json
        write_json(args.json, records, indent=1)
        print(f"wrote {args.json}")
    return 0 if all(r["agreement_pct"] >= 99.5 for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
