"""Forward+backward time of the four maskaq training ops and forward time of the two
integer-inference ops: compiled extension vs plain-PyTorch reference (and, for the two losses,
the per-sample loop of the public code).

Shapes: DeiT-Tiny (B 32, H 3, N 197, d 64) and DeiT-Small (B 32, H 6, N 197, d 64);
the alignment loss takes the CLS rows of L = 12 blocks, (12, 32, H, 196).
  fq_attention     quantized student attention, 4-bit LSQ on q, k, P, v (step and zero
                   point learnable), logits returned; backward to q, k, v, steps, zero points
                   from random output and logits gradients.
  fq_attention_fp  the teacher's full-precision mode, logits returned; backward to q, k, v.
  patch_similarity_entropy  64 random rows per sample; backward to the logits.
  inter_head_ssim  one block's L_ssim; backward to the logits. Also "composed": the statistics
                   with a written-out backward, what the loss runs where the kernel does not.
  masked_attention_align    ratio 0.5, keep 0.7; backward to the student rows.
  int8_linear_epilogue      forward only: fc1's epilogue, int32 (B·N, 4·H·d) -> GELU -> uint8.
  int8_attention            forward only: int8 q, k, v (B, H, N, d), 8-bit P, zero points.

Prints a table and, with --json PATH, writes records
{"op", "device", "shape", "impl", "ms", "speedup_vs_reference"} (impl: extension,
reference, loop; speedup = reference ms / this ms). Every time is the median of --repeats
timed runs after --warmup runs; the alternatives take turns within each repeat, so compare
ratios (absolute times move with the load of the machine).

    python benchmarks/bench_ops.py --threads 2 --json out/bench_ops.json
"""
from __future__ import annotations

import argparse
import gc
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

import maskaq  # noqa: E402
from maskaq import ops, reference  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loop_baselines  # noqa: E402

SHAPES = {"deit_tiny": (32, 3, 197, 64), "deit_small": (32, 6, 197, 64)}
NUM_BLOCKS = 12
ABITS = 4


# --------------------------------------------------------------------------------------
# One fwd+bwd step per op and implementation. Each builder returns a closure.


def _op(op_name, impl):
    """The op `op_name` as `impl`: the extension, its plain-PyTorch reference or the per-sample loop."""
    if impl == "loop":
        return getattr(loop_baselines, f"{op_name}_loop")
    return getattr(ops if impl == "extension" else reference, op_name)


def fq_attention_step(impl, dims, device, quantized, gen):
    B, H, N, d = dims
    fn = _op("fq_attention", impl)
    q, k, v = (torch.randn(B, H, N, d, generator=gen, device=device).requires_grad_() for _ in range(3))
    inputs = [q, k, v]
    kw = {}
    if quantized:
        lo, hi = -(2 ** (ABITS - 1)), 2 ** (ABITS - 1) - 1
        p_hi = 2 ** ABITS - 1
        means = [q.abs().mean().item(), k.abs().mean().item(), 1.0 / N, v.abs().mean().item()]
        qmaxes = [hi, hi, p_hi, hi]
        step = torch.tensor([2 * m / math.sqrt(h) for m, h in zip(means, qmaxes)], device=device,
                            requires_grad=True)
        zero_point = torch.tensor([0.3, -0.4, 0.2, 0.1], device=device, requires_grad=True)
        kw = dict(step=step, zero_point=zero_point, qmin=[lo, lo, 0, lo], qmax=qmaxes)
        inputs += [step, zero_point]
    grad_out = torch.randn(B, H, N, d, generator=gen, device=device)
    grad_logits = torch.randn(B, H, N, N, generator=gen, device=device) * 1e-3

    def step_fn():
        out, logits = fn(q, k, v, return_logits=True, **kw)
        torch.autograd.grad([out, logits], inputs, [grad_out, grad_logits])

    return step_fn


def entropy_step(impl, dims, device, gen):
    B, H, N, _ = dims
    logits = (torch.randn(B, H, N, N, generator=gen, device=device) * 3).requires_grad_()
    draw = torch.Generator(device=device).manual_seed(0)
    fn = _op("patch_similarity_entropy", impl)

    def step_fn():
        h = fn(logits, num_prefix_tokens=1, num_rows=64, generator=draw)
        torch.autograd.grad(-h.mean(), logits)

    return step_fn


def ssim_step(impl, dims, device, gen):
    B, H, N, _ = dims
    logits = (torch.randn(B, H, N, N, generator=gen, device=device) * 3).requires_grad_()
    if impl == "loop":
        def fn(a):
            return loop_baselines.inter_head_ssim_loss_loop([a], num_prefix_tokens=1)
    elif impl == "composed":  # what L_ssim runs where the kernel does not (statistics with a written-out backward)
        from maskaq.synthesis.losses import inter_head_ssim_block

        def fn(a):
            return inter_head_ssim_block(a, 1).mean()
    else:
        op = _op("inter_head_ssim", impl)

        def fn(a):
            return op(a, num_prefix_tokens=1).mean()

    return lambda: torch.autograd.grad(fn(logits), logits)


def align_step(impl, dims, device, gen):
    B, H, N, _ = dims
    M = N - 1
    cls_t = torch.randn(NUM_BLOCKS, B, H, M, generator=gen, device=device)
    cls_q = torch.randn(NUM_BLOCKS, B, H, M, generator=gen, device=device).requires_grad_()
    draw = torch.Generator(device=device).manual_seed(0)
    fn = _op("masked_attention_align", impl)

    def step_fn():
        loss, _ = fn(cls_t, cls_q, ratio=0.5, keep=0.7, generator=draw)
        torch.autograd.grad(loss, cls_q)

    return step_fn


def epilogue_step(impl, dims, device, gen):
    B, H, N, d = dims
    M, C = B * N, 4 * H * d  # fc1 of the block: (tokens, 4·embed)
    acc = torch.randint(-(1 << 20), 1 << 20, (M, C), generator=gen, device=device, dtype=torch.int32)
    scale = torch.rand(C, generator=gen, device=device) * 1e-5
    bias = torch.randn(C, generator=gen, device=device)
    fn = _op("int8_linear_epilogue", impl)
    return lambda: fn(acc, scale, bias, "gelu", 0.05, 3, 0, 255)


def int8_attention_step(impl, dims, device, gen):
    q, k, v = (torch.randint(-128, 128, dims, generator=gen, device=device, dtype=torch.int8) for _ in range(3))
    scale_qk = 2.0 / (math.sqrt(dims[3]) * 74.0 ** 2)
    fn = _op("int8_attention", impl)
    return lambda: fn(q, k, v, scale_qk, 1.0 / 255, 0, 0, 255, 1, -2, 3)


OPS = {
    # op name -> (builder(impl, dims, device, gen), impls, shape label of the op's input)
    "fq_attention": (lambda i, s, dev, g: fq_attention_step(i, s, dev, True, g), ("extension", "reference"),
                     lambda s: "B{}xH{}xN{}xd{}".format(*s)),
    "fq_attention_fp": (lambda i, s, dev, g: fq_attention_step(i, s, dev, False, g), ("extension", "reference"),
                        lambda s: "B{}xH{}xN{}xd{}".format(*s)),
    "patch_similarity_entropy": (entropy_step, ("extension", "reference", "loop"),
                                 lambda s: "B{0}xH{1}xN{2}xN{2}".format(*s)),
    "inter_head_ssim": (ssim_step, ("extension", "reference", "composed", "loop"),
                        lambda s: "B{0}xH{1}xN{2}xN{2}".format(*s)),
    "masked_attention_align": (align_step, ("extension", "reference", "loop"),
                               lambda s: f"L{NUM_BLOCKS}xB{s[0]}xH{s[1]}xM{s[2] - 1}"),
    "int8_linear_epilogue": (epilogue_step, ("extension", "reference"),
                             lambda s: f"M{s[0] * s[2]}xN{4 * s[1] * s[3]}"),
    "int8_attention": (int8_attention_step, ("extension", "reference"), lambda s: "B{}xH{}xN{}xd{}".format(*s)),
}


def time_interleaved(step_fns, device, warmup, repeats):
    """Median ms per implementation. The implementations take turns within every repeat,
    so load from other processes hits them alike and the ratios stay meaningful."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for fn in step_fns.values():
        for _ in range(warmup):
            fn()
    sync()
    times = {name: [] for name in step_fns}
    gc.collect()
    gc.disable()  # as timeit does: a full collection of torch's heap would land in one run
    try:
        for _ in range(repeats):
            for name, fn in step_fns.items():
                t0 = time.perf_counter()
                fn()
                sync()
                times[name].append((time.perf_counter() - t0) * 1e3)
    finally:
        gc.enable()
    return {name: statistics.median(ts) for name, ts in times.items()}


def run(args):
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_ops: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    info = maskaq.extension_info()
    ext_ok = info["loaded"] and (device.type == "cpu" or info["with_cuda"])
    if not ext_ok:
        print(f"bench_ops: the extension cannot run on {device.type} ({info}); timing the others only",
              file=sys.stderr)
    print(f"device {device.type}, {args.threads} threads, median of {args.repeats} fwd+bwd runs; "
          f"torch {torch.__version__}, maskaq {info['version']}")
    print_header()
    records = []
    for op_name in args.ops:
        builder, impls, label = OPS[op_name]
        for shape_name in args.shapes:
            dims = SHAPES[shape_name]
            step_fns = {}
            for impl in impls:
                if impl == "extension" and not ext_ok:
                    continue
                gen = torch.Generator(device=device).manual_seed(0)
                step_fns[impl] = builder(impl, dims, device, gen)
            row = time_interleaved(step_fns, device, args.warmup, args.repeats)
            del step_fns
            ref_ms = row.get("reference")
            for impl, ms in row.items():
                records.append({
                    "op": op_name,
                    "device": device.type,
                    "shape": f"{shape_name}:{label(dims)}",
                    "impl": impl,
                    "ms": round(ms, 4),
                    "speedup_vs_reference": round(ref_ms / ms, 3) if ref_ms else None,
                })
            print_rows(records[-len(row):])
    if args.json:
        from maskaq._files import write_json
        print(f"wrote {write_json(args.json, records, indent=1)}")
    return 0


WIDTHS = (24, 36, 9, 9, 6)


def format_cells(cells):
    return "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, WIDTHS)))


def print_header():
    print(format_cells(("op", "shape", "impl", "ms", "x ref")))
    print("-" * (sum(WIDTHS) + 2 * (len(WIDTHS) - 1)))


def print_rows(rows):
    for r in rows:
        cells = [r["op"], r["shape"], r["impl"], f"{r['ms']:.2f}",
                 f"{r['speedup_vs_reference']:.2f}" if r["speedup_vs_reference"] else "-"]
        print(format_cells(cells), flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=2, help="intra-op CPU threads (default 2)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--ops", nargs="+", choices=list(OPS), default=list(OPS))
    p.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    p.add_argument("--json", metavar="PATH", help="write the records as a JSON list")
    args = p.parse_args(argv)
    if args.threads < 1 or args.warmup < 0 or args.repeats < 1:
        p.error("--threads and --repeats must be >= 1, --warmup >= 0")
    return args


if __name__ == "__main__":
    sys.exit(run(parse_args()))
