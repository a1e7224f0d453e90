"""`maskaq export`: a student saved by `maskaq quantize --out DIR` (DIR/model) as a deployable
file: an ONNX QDQ graph (``--format onnx``, ONNX Runtime / TensorRT) or maskaq's integer model
(``--format integer``, ``maskaq.load_integer``). The student records its architecture, so the
folder is all it needs; both exports record it too, and `maskaq eval` takes each of them.

    maskaq export runs/w4a4/model --format onnx --out runs/w4a4/model.onnx
    maskaq export runs/w4a4/model --format integer --out runs/w4a4/integer
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

FORMATS = ("onnx", "integer")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from maskaq.commands.common import add_deprecated_alias, add_model_arguments
    from maskaq.integer.qdq import WEIGHT_DTYPES

    # no default: an absent STUDENT must not overwrite the deprecated --student's value
    parser.add_argument("student", nargs="?", default=argparse.SUPPRESS, metavar="STUDENT",
                        help="saved student: the model/ directory that `maskaq quantize --out OUT` writes (or OUT)")
    add_model_arguments(parser, device=False, required=False,
                        model_help="the student (as STUDENT), or the student's full-precision architecture: "
                                   "bundled zoo name or timm name (none given: the one the student records)")
    parser.add_argument("--format", default="onnx", choices=FORMATS,
                        help="onnx: QuantizeLinear/DequantizeLinear graph (opset 17) for ONNX Runtime or "
                             "TensorRT; integer: maskaq's integer model directory")
    parser.add_argument("--out", required=True, help="output .onnx file (onnx) or directory (integer)")
    parser.add_argument("--onnx-batch-size", type=int, default=None, metavar="N",
                        help="onnx: fixed batch size (none given: a dynamic batch axis)")
    parser.add_argument("--onnx-weights", default="int8", choices=tuple(WEIGHT_DTYPES),
                        help="onnx: how the weight integers are stored. int8: ONNX Runtime's fastest "
                             "kernels, which on x86 CPUs without VNNI (AVX2 only) clip 8-bit weights "
                             "against 8-bit activations; uint8 (zero point 128): exact on every CPU, slower")
    add_deprecated_alias(parser, "--student", "STUDENT (the first argument)", dest="student")
    add_deprecated_alias(parser, "--batch-size", "--onnx-batch-size", type=int)


def _student_and_architecture(args):
    """(student folder, architecture name or None) from STUDENT and --model."""
    from maskaq.cli import CliError
    from maskaq.quant.io import is_student, student_directory

    student, name = getattr(args, "student", None), args.model
    if name is not None and is_student(name):
        if student is not None:
            raise CliError(f"two students given ({student} and --model {name}); pass one")
        student, name = name, None
    if student is None:
        raise CliError("pass the student to export: `maskaq export OUT/model --out FILE` (OUT of `maskaq quantize`)")
    if not is_student(student):
        what = "does not exist" if not Path(student).exists() else "holds no quant_config.json"
        raise CliError(f"student directory {student} {what} (pass OUT/model of `maskaq quantize`)")
    return student_directory(student), name


def _check_out(args) -> None:
    """--out can be written (the file named is replaced, as a compiler's -o is)."""
    from maskaq.cli import CliError
    from maskaq.commands.common import check_output_dir

    out = Path(args.out)
    if args.format == "integer":
        check_output_dir(out)
        return
    if out.is_dir():
        raise CliError(f"--out {out} is a directory; --format onnx writes a file, e.g. {out / 'model.onnx'}")
    check_output_dir(out.parent)


def run(args) -> int:
    import torch

    from maskaq.cli import CliError
    from maskaq.commands.common import load_args_model
    from maskaq.quant import load_quantized

    student_dir, name = _student_and_architecture(args)
    if args.onnx_batch_size is not None and args.onnx_batch_size < 1:
        raise CliError(f"--onnx-batch-size must be >= 1, got {args.onnx_batch_size}")
    _check_out(args)
    model = load_args_model(args, torch.device("cpu"), name) if name is not None else None
    try:
        student = load_quantized(student_dir, model).eval()
        if args.format == "onnx":
            from maskaq.integer.qdq import export_onnx, pair_sum_overflow_layers

            path = export_onnx(student, args.out, batch_size=args.onnx_batch_size, weights=args.onnx_weights)
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
                      "(docs/integer-inference.md, 'On AVX2-only CPUs, use W8A7').", file=sys.stderr)
    except (ValueError, TypeError, OSError) as exc:
        raise CliError(str(exc).splitlines()[0]) from None
    print(f"wrote {path}")
    print(f"evaluate it with: maskaq eval {path}")
    return 0


def int16_gemm_layers(imodel) -> list:
    """Names of the integer model's layers that run on maskaq's int16 GEMM on this CPU (``IntLinear.cpu_gemm``)."""
    from maskaq.integer import IntLinear

    return [name for name, m in imodel.named_modules() if isinstance(m, IntLinear) and m.cpu_gemm == "int16"]
