"""Inference latency of maskaq integer models against FP32, fake quant, torch dynamic int8 and
ONNX Runtime (CPU), and FP16/BF16/torch.compile (CUDA, when available).

    python benchmarks/bench_inference.py                       # full CPU table (+ CUDA if present)
    python benchmarks/bench_inference.py --quick               # smoke run
    python benchmarks/bench_inference.py --models deit_small_patch16_224 --batches 8 \\
        --impls fp32 int_w8a8 ort_int8 --json out/bench.json --plot out/bench.png

Same code and options as `maskaq bench` (maskaq/commands/bench.py). Prints a table; --json writes
records {"model", "device", "batch", "impl", "ms", "img_per_s", "peak_mb"}; --plot a PNG of the
speedup vs FP. Timings of one (model, batch) are interleaved across implementations: compare the
ratios of one run (the machine may be shared).
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402,F401  (loads libc10 & co. before maskaq's extension needs them)

from maskaq.cli import CliError  # noqa: E402
from maskaq.commands import bench  # noqa: E402


def main(argv=None) -> int:
    from maskaq.cli import HelpFormatter  # the docstring as written, only real defaults
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    bench.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.json is None and args.plot is None and not args.quick:
        # the script's own record, rewritten on every run (a file the user names is refused unless --overwrite)
        args.json, args.plot, args.overwrite = "bench_inference.json", "bench_inference.png", True
    elif not args.quick:
        args.json = args.json or "bench_inference.json"
        args.plot = args.plot or "bench_inference.png"
    try:
        return bench.run(args)
    except CliError as exc:  # bad options: one line, status 2
        print(f"bench_inference.py: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
