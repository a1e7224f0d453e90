"""Latency of the FP, fake-quant and integer models against the usual alternatives.

Median latency (ms), throughput (images/s) and peak memory of random-init timm models (weights
do not change latency) for every implementation a user could deploy:

* CPU (``--threads`` threads, default 2): ``fp32`` eager, ``int_w8a8`` / ``int_w8a7`` / ``int_w4a8``
  (maskaq integer export; 7-bit activations never overflow the int16 pair sums of CPUs without
  VNNI, so ``int_w8a7`` runs on the int8 library there, where ``int_w8a8`` takes maskaq's exact
  int16 GEMM: on those CPUs it is the fast exact configuration), ``torch_dynamic_int8``
  (torch.ao.quantization.quantize_dynamic), ``ort_int8`` (onnxruntime.quantization.quantize_dynamic),
  ``ort_qdq`` (maskaq's W8A8 student as an ONNX QDQ graph, ``maskaq.export_onnx``, in ONNX
  Runtime); on request (``--impls``) also ``fakequant`` (maskaq W8A8 fake quant), ``ort_fp32`` and
  ``ort_qdq_u8`` (the QDQ graph with uint8 weights, ``export_onnx(weights="uint8")``: ONNX Runtime's
  U8U8 kernels, exact at W8A8 on CPUs without VNNI, where ``ort_qdq``'s U8S8 kernels clip).
  CPU records say which integer path the machine takes (``cpu_capability``, ``cpu_int8``: see
  ``maskaq.integer.cpu_integer_path``).
* CUDA (when available): ``fp16``, ``bf16`` eager, ``fp16_compile`` (torch.compile), ``int_w8a8``.

Timings of all implementations of one (model, batch) are interleaved in rounds, so a change of
load on a shared machine hits them alike: compare the ratios within one run, not absolute
numbers across runs. ``peak_mb`` = bytes of the stored weights (parameters, buffers, integer
weights, or the ONNX file) + the growth of the peak resident set (CPU, VmHWM reset before the
runs) or of the CUDA allocator's peak during the runs.

Used by ``maskaq bench`` and ``benchmarks/bench_inference.py``; the measuring half is
maskaq/integer/latency.py.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import tempfile
import time

import torch

from maskaq.integer.latency import (Unavailable, build_impl, create_model, input_shape, measure_memory_mb,
                                    sync_device, time_interleaved)

CPU_IMPLS = ("fp32", "fakequant", "int_w8a8", "int_w8a7", "int_w4a8", "torch_dynamic_int8", "ort_fp32", "ort_int8",
             "ort_qdq", "ort_qdq_u8")
# What a run measures without --impls: the integer models against what a user would otherwise
# deploy. fakequant and ort_fp32 are slow and informative only for development (--impls adds them);
# without them the default table took 6 min 40 s on 2 cores (one of them busy) instead of over 40;
# with int_w8a7 and ort_qdq_u8 added it took 8 min 5 s on the AVX2 EPYC.
DEFAULT_CPU_IMPLS = ("fp32", "int_w8a8", "int_w8a7", "int_w4a8", "torch_dynamic_int8", "ort_int8", "ort_qdq")
GPU_IMPLS = ("fp16", "bf16", "fp16_compile", "int_w8a8")
DEFAULT_MODELS = ("deit_small_patch16_224", "vit_base_patch16_224")
CPU_BATCHES = (1, 8, 32)
GPU_BATCHES = (1, 64, 256)
# The reference implementation of each device: speedups are relative to it.
BASELINE = {"cpu": "fp32", "cuda": "fp16"}


def _error(message: str) -> Exception:
    from maskaq.cli import CliError

    return CliError(message)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), help="timm model names")
    parser.add_argument("--batches", nargs="+", type=int, default=None,
                        help=f"batch sizes (default CPU {list(CPU_BATCHES)}, CUDA {list(GPU_BATCHES)})")
    parser.add_argument("--impls", nargs="+", default=None,
                        help=f"implementations (CPU: {', '.join(CPU_IMPLS)}, default {' '.join(DEFAULT_CPU_IMPLS)}; "
                             f"CUDA: {', '.join(GPU_IMPLS)})")
    parser.add_argument("--devices", nargs="+", default=None, choices=("cpu", "cuda"),
                        help="devices (default: cpu, and cuda when available)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch and ONNX Runtime)")
    parser.add_argument("--kernel", default="onednn", choices=("onednn", "fbgemm"),
                        help="int8 GEMM library of the maskaq integer models on CPU")
    parser.add_argument("--engine", default="x86", choices=("x86", "fbgemm", "onednn", "qnnpack"),
                        help="torch.backends.quantized.engine (used by torch_dynamic_int8)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per (model, batch)")
    parser.add_argument("--iters", type=int, default=None, help="timed calls per impl and round "
                        "(default: enough for ~0.3 s per round, at least 1)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per impl before the rounds")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: deit_small_patch16_224, batch 1, 1 round of 2 calls")
    parser.add_argument("--json", default=None, metavar="PATH",
                        help="write the records to this JSON file (an existing one is refused unless --overwrite)")
    parser.add_argument("--plot", default=None, metavar="PNG",
                        help="write a speedup-vs-FP plot (PNG; an existing one is refused unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace the --json and --plot files if they exist")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--omp-wait-policy", default="default", choices=("default", "PASSIVE", "ACTIVE", "inherit"),
                        help="OpenMP wait policy of torch's threads. default: libgomp's own, what a user "
                             "gets (threads spin a while after each parallel region, then sleep; ONNX "
                             "Runtime's threads spin likewise); PASSIVE: they sleep at once, so every "
                             "parallel region wakes them (costly for the integer models' many small ops); "
                             "ACTIVE: they never stop spinning (they take the cores of whatever runs "
                             "next); inherit: this process's environment. The benchmark re-runs itself "
                             "in a child process to apply it.")


def _resolve(args):
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    if "cuda" in devices and not torch.cuda.is_available():
        raise _error("--devices cuda given but CUDA is not available")
    if args.threads < 1:
        raise _error(f"--threads must be >= 1, got {args.threads}")
    if args.batches is not None and any(b < 1 for b in args.batches):
        raise _error(f"--batches must be positive, got {args.batches}")
    known = set(CPU_IMPLS) | set(GPU_IMPLS)
    if args.impls is not None:
        unknown = [i for i in args.impls if i not in known]
        if unknown:
            raise _error(f"unknown --impls {unknown}; choose from {sorted(known)}")
    models = args.models
    rounds, iters, warmup = args.rounds, args.iters, args.warmup
    if args.quick:
        models = args.models if args.models != list(DEFAULT_MODELS) else [DEFAULT_MODELS[0]]
        rounds, iters, warmup = 1, 2, 1
    return devices, models, rounds, iters, warmup


def _plan(device, args):
    impls = DEFAULT_CPU_IMPLS if device == "cpu" else GPU_IMPLS
    if args.impls is not None:
        impls = tuple(i for i in (CPU_IMPLS if device == "cpu" else GPU_IMPLS) if i in args.impls)
    batches = args.batches or (CPU_BATCHES if device == "cpu" else GPU_BATCHES)
    if args.quick and args.batches is None:
        batches = (1,)
    return impls, tuple(batches)


def _auto_iters(impls, x, device) -> int:
    """Calls per round so that the slowest impl takes ~0.3 s per round (1 to 20)."""
    slowest = 0.0
    for impl in impls:
        start = time.perf_counter()
        impl.fn(x)
        sync_device(device)
        slowest = max(slowest, time.perf_counter() - start)
    return int(min(20, max(1, math.ceil(0.3 / max(slowest, 1e-6)))))


def run_benchmark(args, log=print, table=None) -> list[dict]:
    """Every record of the run. ``table(records)`` gets the records of each (model, device, batch)
    as they are measured (default: ``log`` their table)."""
    table = table or (lambda group: log(format_table(group)))
    devices, models, rounds, iters, warmup = _resolve(args)
    torch.set_num_threads(args.threads)
    if args.engine not in torch.backends.quantized.supported_engines:
        raise _error(f"quantized engine {args.engine!r} not supported here "
                     f"({torch.backends.quantized.supported_engines})")
    torch.backends.quantized.engine = args.engine
    log(f"threads={args.threads} kernel={args.kernel} engine={args.engine} "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'default')} load average="
        f"{' '.join('%.1f' % v for v in os.getloadavg())} (timings on a loaded machine are noisy: "
        "compare ratios within this run)")
    from maskaq.integer.modules import cpu_integer_path

    path = cpu_integer_path()
    cpu_fields = {"cpu_capability": path["cpu_capability"], "cpu_int8": path[f"{args.kernel}_int8"]}
    log(f"CPU integer path: {cpu_fields['cpu_capability']}, {args.kernel} {cpu_fields['cpu_int8']}")
    records = []
    for model_name in models:
        try:
            model = create_model(model_name, args.seed)
        except ValueError as exc:
            raise _error(str(exc)) from None
        shape = input_shape(model)
        with tempfile.TemporaryDirectory(prefix="maskaq_bench_") as workdir:
            for device in devices:
                impl_names, batches = _plan(device, args)
                impls = []
                for name in impl_names:
                    try:
                        log(f"building {model_name} {device} {name} ...")
                        impls.append(build_impl(name, model, device, args, workdir))
                    except Unavailable as exc:
                        log(f"  skipped {name}: {exc}")
                for batch in batches:
                    generator = torch.Generator().manual_seed(args.seed + batch)
                    x = torch.randn((batch, *shape), generator=generator).to(device)
                    n = iters or _auto_iters(impls, x, device)
                    ms = time_interleaved(impls, x, device, rounds, n, warmup)
                    for impl in impls:
                        record = {
                            "model": model_name, "device": device, "batch": batch, "impl": impl.name,
                            **(cpu_fields if device == "cpu" else {}),
                            "ms": round(ms[impl.name], 3),
                            "img_per_s": round(batch * 1e3 / ms[impl.name], 2),
                            "peak_mb": round(measure_memory_mb(impl, x, device), 1),
                        }
                        records.append(record)
                    table([r for r in records if r["model"] == model_name
                           and r["device"] == device and r["batch"] == batch])
                    if getattr(args, "json", None):  # partial results survive an interrupted run
                        write_json(records, args.json)
                del impls
                gc.collect()
    return records


def speedups(records: list[dict]) -> dict[tuple, float]:
    """(model, device, batch, impl) -> baseline ms / impl ms."""
    base = {(r["model"], r["device"], r["batch"]): r["ms"] for r in records
            if r["impl"] == BASELINE.get(r["device"])}
    out = {}
    for r in records:
        key = (r["model"], r["device"], r["batch"])
        if key in base:
            out[key + (r["impl"],)] = base[key] / r["ms"]
    return out


def format_table(records: list[dict], header: bool = True) -> str:
    ratio = speedups(records)
    title = f"{'model':<24} {'dev':<4} {'batch':>5} {'impl':<19} {'ms':>9} {'img/s':>9} {'peak MB':>8} {'vs FP':>6}"
    lines = [title, "-" * len(title)] if header else []
    for r in records:
        s = ratio.get((r["model"], r["device"], r["batch"], r["impl"]))
        lines.append(f"{r['model']:<24} {r['device']:<4} {r['batch']:>5} {r['impl']:<19} {r['ms']:>9.2f} "
                     f"{r['img_per_s']:>9.1f} {r['peak_mb']:>8.1f} {('%.2fx' % s) if s else '-':>6}")
    return "\n".join(lines)


def write_json(records: list[dict], path: str) -> None:
    from maskaq._files import write_json as write_json_file
    write_json_file(path, records, indent=1)


def plot_speedups(records: list[dict], path: str) -> None:
    """Grouped bars: speedup vs the FP baseline per (model, device, batch), one bar per impl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratio = speedups(records)
    groups = sorted({k[:3] for k in ratio}, key=lambda k: (k[1], k[0], k[2]))
    impls = [i for i in CPU_IMPLS + GPU_IMPLS if any(k[3] == i for k in ratio)]
    impls = list(dict.fromkeys(impls))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(groups) * max(1, len(impls)) / 4), 4))
    width = 0.8 / max(1, len(impls))
    for j, impl in enumerate(impls):
        xs = [i + j * width for i, g in enumerate(groups) if g + (impl,) in ratio]
        ys = [ratio[g + (impl,)] for g in groups if g + (impl,) in ratio]
        ax.bar(xs, ys, width, label=impl)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))])
    ax.set_xticklabels([f"{m.split('_patch')[0]}\n{d} b{b}" for m, d, b in groups], fontsize=7)
    ax.set_ylabel("speedup vs FP (fp32 on CPU, fp16 on CUDA)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    from maskaq._files import atomic_write
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def _wanted_wait_policy(args):
    """The OMP_WAIT_POLICY the timed process needs: None (unset) for libgomp's default."""
    return None if args.omp_wait_policy == "default" else args.omp_wait_policy


def _needs_child(args) -> bool:
    return (args.omp_wait_policy != "inherit" and os.environ.get("OMP_WAIT_POLICY") != _wanted_wait_policy(args)
            and not os.environ.get("MASKAQ_BENCH_CHILD"))


def _run_in_child(args) -> int:
    """Re-run in a fresh interpreter: libgomp reads OMP_WAIT_POLICY only when it is loaded."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)  # maskaq importable there too
    env = dict(os.environ, MASKAQ_BENCH_CHILD="1", PYTHONPATH=path,
               MASKAQ_BENCH_ARGS=json.dumps(vars(args), default=lambda _: None))
    env.pop("OMP_WAIT_POLICY", None)
    if _wanted_wait_policy(args) is not None:
        env["OMP_WAIT_POLICY"] = _wanted_wait_policy(args)
    code = "import sys, torch; from maskaq.commands.bench import _child_main; sys.exit(_child_main())"
    return subprocess.run([sys.executable, "-c", code], env=env).returncode


def _child_main() -> int:
    values = json.loads(os.environ["MASKAQ_BENCH_ARGS"])
    values.pop("_run", None)
    try:
        return run(argparse.Namespace(**values))
    except KeyboardInterrupt:  # Ctrl-C reaches both processes: the parent says what runs it again
        return 130
    except Exception as exc:
        from maskaq.cli import CliError

        if not isinstance(exc, CliError):
            raise
        print(f"maskaq bench: error: {exc}", file=sys.stderr)
        return 2


def _quiet_third_parties():
    """Hide what ONNX Runtime's and torch's quantization tools say that a bench user cannot act on
    (ONNX Runtime's advice to pre-process the graph goes to the root logger as ``WARNING:root:``)."""
    import logging
    import warnings

    logging.getLogger().setLevel(logging.ERROR)
    for module in (r"onnxruntime(\.|$)", r"onnx(\.|$)", r"torch\.ao(\.|$)", r"torch\.onnx(\.|$)"):
        warnings.filterwarnings("ignore", module=module)


def run(args) -> int:
    from maskaq.commands.common import check_output_file

    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path is not None:
            check_output_file(path, getattr(args, "overwrite", False), flag)
    args._partial = args.json  # written after each measured group, so a stopped run leaves it behind
    if _needs_child(args):
        return _run_in_child(args)
    _quiet_third_parties()
    printed = []

    def table(group):  # one table on stdout, its rows added as they are measured
        print(format_table(group, header=not printed), flush=True)
        printed.append(len(group))

    records = run_benchmark(args, log=lambda m: print(m, file=sys.stderr, flush=True), table=table)
    if args.json:
        write_json(records, args.json)
        print(f"wrote {args.json}")
    if args.plot:
        plot_speedups(records, args.plot)
        print(f"wrote {args.plot}")
    return 0
