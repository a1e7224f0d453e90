"""`maskaq export`: a student saved by `maskaq quantize --out DIR` (DIR/model) as a deployable
file: an ONNX QDQ graph (``--format onnx``, ONNX Runtime / TensorRT) or maskaq's integer model
(``--format integer``, ``maskaq.load_integer``)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

FORMATS = ("onnx", "integer")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from maskaq.commands.common import add_model_arguments
    from maskaq.integer.qdq import WEIGHT_DTYPES

    add_model_arguments(parser, device=False,
                        model_help="the student's full-precision architecture: bundled zoo name or timm name")
    parser.add_argument("--student", required=True, metavar="DIR",
                        help="saved student: the model/ directory that `maskaq quantize --out OUT` writes")
    parser.add_argument("--format", default="onnx", choices=FORMATS,
                        help="onnx: QuantizeLinear/DequantizeLinear graph (opset 17) for ONNX Runtime or "
                             "TensorRT; integer: maskaq's integer model directory")
    parser.add_argument("--out", required=True, help="output .onnx file (onnx) or directory (integer)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="onnx: fixed batch size (none given: a dynamic batch axis)")
    parser.add_argument("--onnx-weights", default="int8", choices=tuple(WEIGHT_DTYPES),
                        help="onnx: how the weight integers are stored. int8: ONNX Runtime's fastest "
                             "kernels, which on x86 CPUs without VNNI (AVX2 only) clip 8-bit weights "
                             "against 8-bit activations; uint8 (zero point 128): exact on every CPU, slower")


def run(args) -> int:
    import torch

    from maskaq.cli import CliError
    from maskaq.commands.common import load_model_for_cli
    from maskaq.quant import load_quantized

    if not Path(args.student).is_dir():
        raise CliError(f"student directory {args.student} does not exist (pass OUT/model of `maskaq quantize`)")
    model = load_model_for_cli(args.model, args.checkpoint, torch.device("cpu"), args.model_kwargs,
                               args.pretrained, args.pretrained_file)
    try:
        student = load_quantized(args.student, model).eval()
        if args.format == "onnx":
            from maskaq.integer.qdq import export_onnx, pair_sum_overflow_layers

            path = export_onnx(student, args.out, batch_size=args.batch_size, weights=args.onnx_weights)
            clipped = pair_sum_overflow_layers(student) if args.onnx_weights == "int8" else []
            if clipped:
                print(f"note: {len(clipped)} layers have 8-bit weights and 8-bit inputs; ONNX Runtime's int8 "
                      "kernels clip them on x86 CPUs without VNNI (AVX2 only). --onnx-weights uint8 is exact "
                      "there, and slower.", file=sys.stderr)
        else:
            from maskaq.integer import export_integer, save_integer

            imodel = export_integer(student)
            path = save_integer(imodel, args.out)
            widened = int16_gemm_layers(imodel)
            if widened:
                print(f"note: this CPU adds int8 products in int16 pairs (no VNNI): {len(widened)} layers with 8-bit "
                      "weights and 8-bit inputs run on maskaq's exact int16 GEMM, about 15% slower than the library "
                      "on an AVX2 EPYC (DeiT-S, batch 8). A student quantized with --abits 7 runs them on oneDNN "
                      "(README, 'Which CPUs').", file=sys.stderr)
    except (ValueError, TypeError, OSError) as exc:
        raise CliError(str(exc).splitlines()[0]) from None
    print(f"wrote {path}")
    return 0


def int16_gemm_layers(imodel) -> list:
    """Names of the integer model's layers that run on maskaq's int16 GEMM on this CPU (``IntLinear.cpu_gemm``)."""
    from maskaq.integer import IntLinear

    return [name for name, m in imodel.named_modules() if isinstance(m, IntLinear) and m.cpu_gemm == "int16"]
