"""The CPU int8 GEMMs an integer ViT layer can run on, against FP32, on the layer shapes of DeiT-S and ViT-B.

    python benchmarks/bench_int8_gemm.py                        # DeiT-S and ViT-B layers, batches 1 and 8
    ATEN_CPU_CAPABILITY=avx2 DNNL_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \\
        python benchmarks/bench_int8_gemm.py --json avx2.json  # an AVX2-only CPU, on a newer one

Implementations, all on 8-bit weights against full 8-bit (uint8) activations, the case that
overflows int16 pair sums:
  fp32           F.linear on float32 (MKL)
  maskaq_int16   maskaq.ops.int8_gemm: int16 operands, int32 pair sums (exact on every CPU)
  onednn         onednn::qlinear_pointwise (exact with VNNI, int16-saturating without)
  onednn_split   the same on split weights W = 2·W_hi + W_lo, twice as wide (exact on every CPU)
Each call's accumulators are checked against the exact product of the same random operands
("exact" column). Timings of one shape are interleaved across implementations, best of each
round's calls, median over rounds: compare the ratios of one run (the machine may be shared).
Prints a table; --json writes records {"layer", "m", "k", "n", "threads", "impl", "ms", "gmacs",
"vs_fp32", "exact", "cpu_capability"}.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from maskaq import ops  # noqa: E402
from maskaq.integer.cpu_gemm import onednn_gemm, split_weights  # noqa: E402

# (model, layer) -> (in_features, out_features)
LAYERS = {
    "deit_s": {"qkv": (384, 1152), "proj": (384, 384), "fc1": (384, 1536), "fc2": (1536, 384)},
    "vit_b": {"qkv": (768, 2304), "proj": (768, 768), "fc1": (768, 3072), "fc2": (3072, 768)},
}
IMPLS = ("fp32", "maskaq_int16", "onednn", "onednn_split")
TOKENS = 197  # a 224-pixel ViT/DeiT with patch 16 and a CLS token


def _calls(u, w, zero_point):
    """impl -> (call, the map of its result to float64 accumulators; None for fp32, which has none)."""
    n = w.shape[0]
    x, wf = u.float(), w.float()
    packed = ops.int8_gemm_pack(w)
    direct, split = onednn_gemm(w, zero_point), onednn_gemm(split_weights(w), zero_point)
    return {
        "fp32": (lambda: torch.nn.functional.linear(x, wf), None),
        "maskaq_int16": (lambda: ops.int8_gemm(u, zero_point, packed, n), lambda y: y.double()),
        "onednn": (lambda: direct(u), lambda y: y.double()),
        "onednn_split": (lambda: split(u), lambda y: 2 * y[:, :n].double() + y[:, n:].double()),
    }


def _best_ms(call, calls_per_round):
    best = float("inf")
    for _ in range(calls_per_round):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def measure(layer, m, k, n, impls, rounds, calls_per_round, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randint(0, 256, (m, k), dtype=torch.uint8, generator=g)
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    zero_point = 128
    exact = ((u.double() - zero_point) @ w.double().T)
    calls = _calls(u, w, zero_point)
    records = {}
    for impl in impls:
        call, to_acc = calls[impl]
        result = call()  # also the warm-up
        records[impl] = {"exact": None if to_acc is None else bool(torch.equal(to_acc(result), exact)), "ms": []}
    for _ in range(rounds):
        for impl in impls:
            records[impl]["ms"].append(_best_ms(calls[impl][0], calls_per_round))
    out = []
    fp32_ms = statistics.median(records["fp32"]["ms"]) if "fp32" in records else None
    for impl in impls:
        ms = statistics.median(records[impl]["ms"])
        out.append({"layer": layer, "m": m, "k": k, "n": n, "threads": torch.get_num_threads(), "impl": impl,
                    "ms": round(ms, 3), "gmacs": round(m * k * n / ms / 1e6, 1),
                    "vs_fp32": None if fp32_ms is None else round(fp32_ms / ms, 2), "exact": records[impl]["exact"],
                    "cpu_capability": torch.backends.cpu.get_cpu_capability()})
    return out


def format_table(records) -> str:
    lines = [f"{'layer':<12} {'M':>5} {'K':>5} {'N':>5} {'impl':<13} {'ms':>8} {'GMAC/s':>7} {'vs fp32':>8} exact",
             "-" * 72]
    for r in records:
        exact = "-" if r["exact"] is None else ("yes" if r["exact"] else "NO")
        ratio = "" if r["vs_fp32"] is None else f"{r['vs_fp32']:.2f}x"
        lines.append(f"{r['layer']:<12} {r['m']:>5} {r['k']:>5} {r['n']:>5} {r['impl']:<13} {r['ms']:>8.2f} "
                     f"{r['gmacs']:>7.1f} {ratio:>8} {exact}")
    return "\n".join(lines)


def main(argv=None) -> int:
    from maskaq.cli import HelpFormatter  # the docstring as written, only real defaults
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(LAYERS), choices=list(LAYERS))
    parser.add_argument("--layers", nargs="+", default=None,
                        help="extra layers as KxN (in x out features), run instead of --models")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8], help="images per call (M = batch x tokens)")
    parser.add_argument("--tokens", type=int, default=TOKENS, help="tokens per image")
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=3, help="timed calls per implementation and round (best kept)")
    parser.add_argument("--json", default=None, help="write the records here")
    args = parser.parse_args(argv)
    if not ops.uses_extension(torch.zeros(1)):
        parser.error("needs the compiled extension maskaq._C (maskaq.ops.int8_gemm)")
    if args.threads < 1 or args.rounds < 1 or args.calls < 1 or args.tokens < 1 or min(args.batches) < 1:
        parser.error("--threads, --rounds, --calls, --tokens and --batches must be positive")
    if "fp32" not in args.impls:
        args.impls = ["fp32"] + args.impls  # the reference of every ratio
    shapes = []
    if args.layers:
        for spec in args.layers:
            try:
                k, n = (int(v) for v in spec.lower().split("x"))
            except ValueError:
                parser.error(f"--layers takes KxN, got {spec!r}")
            shapes.append((spec, k, n))
    else:
        shapes = [(f"{model}.{name}", k, n) for model in args.models for name, (k, n) in LAYERS[model].items()]
    torch.set_num_threads(args.threads)
    records = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized dtypes are deprecated in torch >= 2.10
        for batch in args.batches:
            for layer, k, n in shapes:
                records += measure(layer, batch * args.tokens, k, n, args.impls, args.rounds, args.calls)
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {args.threads} threads")
    print(format_table(records))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(records, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
