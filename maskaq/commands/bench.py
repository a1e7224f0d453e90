"""Latency of the FP, fake-quant and integer models against the usual alternatives.

Median latency (ms), throughput (images/s) and peak memory of random-init timm models (weights
do not change latency) for every implementation a user could deploy:

* CPU (``--threads`` threads, default 2): ``fp32`` eager, ``int_w8a8`` / ``int_w4a8`` (maskaq
  integer export; ``int_w8a7`` on request: 7-bit activations never overflow the int16 pair sums of
  CPUs without VNNI, so it runs unsplit there), ``torch_dynamic_int8``
  (torch.ao.quantization.quantize_dynamic), ``ort_int8`` (onnxruntime.quantization.quantize_dynamic),
  ``ort_qdq`` (maskaq's W8A8 student as an ONNX QDQ graph, ``maskaq.export_onnx``, in ONNX
  Runtime); on request (``--impls``) also ``fakequant`` (maskaq W8A8 fake quant) and ``ort_fp32``.
  CPU records say which integer path the machine takes (``cpu_capability``, ``cpu_int8``: see
  ``maskaq.integer.cpu_integer_path``).
* CUDA (when available): ``fp16``, ``bf16`` eager, ``fp16_compile`` (torch.compile), ``int_w8a8``.

Timings of all implementations of one (model, batch) are interleaved in rounds, so a change of
load on a shared machine hits them alike: compare the ratios within one run, not absolute
numbers across runs. ``peak_mb`` = bytes of the stored weights (parameters, buffers, integer
weights, or the ONNX file) + the growth of the peak resident set (CPU, VmHWM reset before the
runs) or of the CUDA allocator's peak during the runs.

Used by ``maskaq bench`` and ``benchmarks/bench_inference.py``.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch

CPU_IMPLS = ("fp32", "fakequant", "int_w8a8", "int_w8a7", "int_w4a8", "torch_dynamic_int8", "ort_fp32", "ort_int8",
             "ort_qdq")
_INTEGER_BITS = {"int_w8a8": (8, 8), "int_w8a7": (8, 7), "int_w4a8": (4, 8)}  # impl -> (wbits, abits)
# What a run measures without --impls: the integer models against what a user would otherwise
# deploy. fakequant and ort_fp32 are slow and informative only for development (--impls adds them);
# without them the default table took 6 min 40 s on 2 cores (one of them busy) instead of over 40.
DEFAULT_CPU_IMPLS = ("fp32", "int_w8a8", "int_w4a8", "torch_dynamic_int8", "ort_int8", "ort_qdq")
GPU_IMPLS = ("fp16", "bf16", "fp16_compile", "int_w8a8")
DEFAULT_MODELS = ("deit_small_patch16_224", "vit_base_patch16_224")
CPU_BATCHES = (1, 8, 32)
GPU_BATCHES = (1, 64, 256)
# The reference implementation of each device: speedups are relative to it.
BASELINE = {"cpu": "fp32", "cuda": "fp16"}


class Unavailable(Exception):
    """An implementation that cannot run here (missing package, no device): skipped with a note."""


def _error(message: str) -> Exception:
    from maskaq.cli import CliError

    return CliError(message)


# ---------------------------------------------------------------------------------------------
# building the implementations
# ---------------------------------------------------------------------------------------------
def create_model(name: str, seed: int) -> torch.nn.Module:
    """Random-init timm model in eval mode (latency does not depend on the weight values)."""
    import timm

    torch.manual_seed(seed)
    try:
        model = timm.create_model(name, pretrained=False)
    except Exception as exc:  # timm raises RuntimeError for unknown names
        raise _error(f"unknown timm model {name!r} ({exc}); try deit_small_patch16_224") from exc
    return model.eval()


def _input_shape(model: torch.nn.Module) -> tuple[int, int, int]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = cfg.get("input_size")
    if size is None:
        patch = model.patch_embed
        size = (patch.proj.in_channels, *patch.img_size)
    return tuple(int(s) for s in size)


def calibration_images(model: torch.nn.Module, count: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((count, *_input_shape(model)), generator=generator)


def build_quantized(model: torch.nn.Module, wbits: int, abits: int, seed: int, calib: int = 4):
    """Fake-quant copy of ``model`` calibrated on random images (seeded)."""
    from maskaq.quant import calibrate, quantize_model

    qmodel = quantize_model(model, wbits, abits).eval()
    with torch.no_grad():
        calibrate(qmodel, calibration_images(model, calib, seed))
    return qmodel


def build_integer(model: torch.nn.Module, wbits: int, abits: int, seed: int, device: str,
                  kernel: str = "onednn"):
    from maskaq.integer.export import export_integer

    qmodel = build_quantized(model, wbits, abits, seed)
    return export_integer(qmodel.to(device), device=device, kernel=kernel)


def _module_bytes(module: torch.nn.Module) -> int:
    """Stored weight bytes, including the packed weights of torch's dynamic quantized Linear."""
    from maskaq.integer.modules import stored_bytes

    total = stored_bytes(module)
    for m in module.modules():
        packed = getattr(m, "_packed_params", None)
        if packed is not None and hasattr(m, "weight") and callable(m.weight):
            weight, bias = m.weight(), m.bias()
            total += weight.numel() * weight.element_size() + (0 if bias is None else bias.numel() * 4)
    return total


class Impl:
    """A callable model + the bytes of its stored weights."""

    def __init__(self, name, fn, weight_bytes, keep=None):
        self.name = name
        self.fn = fn
        self.weight_bytes = weight_bytes
        self.keep = keep  # objects that must outlive fn (sessions, temp dirs)


def _torch_impl(name, module, dtype=None):
    def fn(x):
        with torch.inference_mode():
            return module(x if dtype is None else x.to(dtype))

    return Impl(name, fn, _module_bytes(module), keep=module)


def _onnx_export(model: torch.nn.Module, path: str) -> None:
    """Export with a dynamic batch axis (legacy TorchScript exporter: fast, no extra deps)."""
    example = torch.randn((1, *_input_shape(model)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), path, input_names=["x"], output_names=["logits"],
                          dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
                          opset_version=17, dynamo=False)


def _ort_impl(name, model, threads, int8: bool, workdir: str):
    _import_ort()  # before the export: no ONNX Runtime, no work
    fp32_path = os.path.join(workdir, "model_fp32.onnx")
    if not os.path.exists(fp32_path):
        _onnx_export(model, fp32_path)
    path = fp32_path
    if int8:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        path = os.path.join(workdir, "model_int8.onnx")
        if not os.path.exists(path):
            quantize_dynamic(fp32_path, path, weight_type=QuantType.QInt8)
    return _ort_session_impl(name, path, threads)


def _ort_qdq_impl(name, model, seed, threads, workdir: str):
    """maskaq's W8A8 student exported as an ONNX QDQ graph (maskaq.export_onnx), run by ONNX Runtime."""
    _import_ort()
    from maskaq.integer.qdq import export_onnx

    path = os.path.join(workdir, "model_qdq_w8a8.onnx")
    if not os.path.exists(path):
        export_onnx(build_quantized(model, 8, 8, seed), path)
    return _ort_session_impl(name, path, threads)


def _import_ort():
    try:
        import onnxruntime
    except ImportError as exc:
        raise Unavailable("onnxruntime is not installed (pip install maskaq[bench])") from exc
    return onnxruntime


def _ort_session_impl(name, path, threads):
    ort = _import_ort()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    def fn(x):
        return session.run(None, {"x": x.numpy()})[0]

    return Impl(name, fn, os.path.getsize(path), keep=session)


def build_impl(name: str, model: torch.nn.Module, device: str, args, workdir: str) -> Impl:
    """One implementation of ``model`` on ``device``; raises Unavailable where it cannot run."""
    seed = args.seed
    if device == "cpu":
        if name == "fp32":
            return _torch_impl(name, model)
        if name == "fakequant":
            return _torch_impl(name, build_quantized(model, 8, 8, seed))
        if name in _INTEGER_BITS:
            return _torch_impl(name, build_integer(model, *_INTEGER_BITS[name], seed, device, args.kernel))
        if name == "torch_dynamic_int8":
            dyn = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
            return _torch_impl(name, dyn)
        if name in ("ort_fp32", "ort_int8"):
            return _ort_impl(name, model, args.threads, name == "ort_int8", workdir)
        if name == "ort_qdq":
            return _ort_qdq_impl(name, model, seed, args.threads, workdir)
        raise Unavailable(f"{name} is not a CPU implementation")
    # CUDA
    if name in ("fp16", "bf16"):
        dtype = torch.float16 if name == "fp16" else torch.bfloat16
        return _torch_impl(name, _copy_to(model, device, dtype), dtype)
    if name == "fp16_compile":
        module = _copy_to(model, device, torch.float16)
        compiled = torch.compile(module)
        impl = _torch_impl(name, compiled, torch.float16)
        impl.weight_bytes = _module_bytes(module)
        return impl
    if name in ("int_w8a8", "int_w4a8"):
        return _torch_impl(name, build_integer(model, 4 if name == "int_w4a8" else 8, 8, seed, device))
    raise Unavailable(f"{name} is not a CUDA implementation")


def _copy_to(model, device, dtype):
    import copy

    return copy.deepcopy(model).to(device=device, dtype=dtype).eval()


# ---------------------------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------------------------
def _rss_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset VmHWM (Linux >= 4.0); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def measure_memory_mb(impl: Impl, x: torch.Tensor, device: str) -> float:
    """Stored weights + the growth of the peak memory while running one batch."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        impl.fn(x)
        torch.cuda.synchronize()
        growth = torch.cuda.max_memory_allocated() - before
    else:
        if _reset_peak_rss():
            before = _rss_kb("VmRSS") or 0
            impl.fn(x)
            growth = max(0, (_rss_kb("VmHWM") or 0) - before) * 1024
        else:
            growth = float("nan")
    return (impl.weight_bytes + growth) / 2**20


def time_interleaved(impls: list[Impl], x: torch.Tensor, device: str, rounds: int, iters: int,
                     warmup: int) -> dict[str, float]:
    """Median ms per call of each impl; rounds alternate between impls so load drift hits all."""
    times = {impl.name: [] for impl in impls}
    for impl in impls:
        for _ in range(warmup):
            impl.fn(x)
    _sync(device)
    for _ in range(rounds):
        for impl in impls:
            if iters > 1:  # one call to settle caches after the other impl ran (moot for calls of ~0.3 s+)
                impl.fn(x)
                _sync(device)
            for _ in range(iters):
                start = time.perf_counter()
                impl.fn(x)
                _sync(device)
                times[impl.name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------
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
    parser.add_argument("--json", default=None, metavar="PATH", help="write the records to this JSON file")
    parser.add_argument("--plot", default=None, metavar="PNG", help="write a speedup-vs-FP plot (PNG)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--omp-wait-policy", default="PASSIVE", choices=("PASSIVE", "ACTIVE", "inherit"),
                        help="OpenMP wait policy of torch's threads; on a shared machine spinning threads "
                             "(ACTIVE, libgomp's default) make every torch timing many times slower. "
                             "The benchmark re-runs itself in a child process to apply it.")


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
        _sync(device)
        slowest = max(slowest, time.perf_counter() - start)
    return int(min(20, max(1, math.ceil(0.3 / max(slowest, 1e-6)))))


def run_benchmark(args, log=print) -> list[dict]:
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
        model = create_model(model_name, args.seed)
        shape = _input_shape(model)
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
                    log(format_table([r for r in records if r["model"] == model_name
                                      and r["device"] == device and r["batch"] == batch]))
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


def format_table(records: list[dict]) -> str:
    ratio = speedups(records)
    header = f"{'model':<24} {'dev':<4} {'batch':>5} {'impl':<19} {'ms':>9} {'img/s':>9} {'peak MB':>8} {'vs FP':>6}"
    lines = [header, "-" * len(header)]
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


def _needs_child(args) -> bool:
    return (args.omp_wait_policy != "inherit" and os.environ.get("OMP_WAIT_POLICY") != args.omp_wait_policy
            and not os.environ.get("MASKAQ_BENCH_CHILD"))


def _run_in_child(args) -> int:
    """Re-run in a fresh interpreter: libgomp reads OMP_WAIT_POLICY only when it is loaded."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)  # maskaq importable there too
    env = dict(os.environ, OMP_WAIT_POLICY=args.omp_wait_policy, MASKAQ_BENCH_CHILD="1", PYTHONPATH=path,
               MASKAQ_BENCH_ARGS=json.dumps(vars(args), default=lambda _: None))
    code = "import sys, torch; from maskaq.commands.bench import _child_main; sys.exit(_child_main())"
    return subprocess.run([sys.executable, "-c", code], env=env).returncode


def _child_main() -> int:
    values = json.loads(os.environ["MASKAQ_BENCH_ARGS"])
    values.pop("_run", None)
    try:
        return run(argparse.Namespace(**values))
    except Exception as exc:
        from maskaq.cli import CliError

        if not isinstance(exc, CliError):
            raise
        print(f"maskaq bench: error: {exc}", file=sys.stderr)
        return 2


def run(args) -> int:
    if _needs_child(args):
        return _run_in_child(args)
    records = run_benchmark(args, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(format_table(records))
    if args.json:
        write_json(records, args.json)
        print(f"wrote {args.json}")
    if args.plot:
        plot_speedups(records, args.plot)
        print(f"wrote {args.plot}")
    return 0
