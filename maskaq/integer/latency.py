"""Latency measurement of FP, fake-quant and integer models (what `maskaq bench` and
benchmarks/bench_inference.py run): building each implementation a user could deploy (eager
torch, maskaq's integer export, torch dynamic int8, ONNX Runtime FP32 / int8 / maskaq's QDQ graph,
CUDA fp16 / bf16 / torch.compile), interleaved timing and peak memory. The command line, the plan
of a run and the printing are in maskaq/commands/bench.py.
"""
from __future__ import annotations

import gc
import os
import statistics
import time
import warnings

import torch

# impl -> (wbits, abits) of maskaq's integer implementations on the CPU
_INTEGER_BITS = {"int_w8a8": (8, 8), "int_w8a7": (8, 7), "int_w4a8": (4, 8)}


class Unavailable(Exception):
    """An implementation that cannot run here (missing package, no device): skipped with a note."""


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
        raise ValueError(f"unknown timm model {name!r} ({exc}); try deit_small_patch16_224") from exc
    return model.eval()


def input_shape(model: torch.nn.Module) -> tuple[int, int, int]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = cfg.get("input_size")
    if size is None:
        patch = model.patch_embed
        size = (patch.proj.in_channels, *patch.img_size)
    return tuple(int(s) for s in size)


def calibration_images(model: torch.nn.Module, count: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((count, *input_shape(model)), generator=generator)


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
    example = torch.randn((1, *input_shape(model)))
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


def _ort_qdq_impl(name, model, seed, threads, workdir: str, weights: str = "int8"):
    """maskaq's W8A8 student exported as an ONNX QDQ graph (maskaq.export_onnx, weights stored as
    ``weights``), run by ONNX Runtime."""
    _import_ort()
    from maskaq.integer.qdq import export_onnx

    path = os.path.join(workdir, f"model_qdq_w8a8_{weights}.onnx")
    if not os.path.exists(path):
        export_onnx(build_quantized(model, 8, 8, seed), path, weights=weights)
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
    # ONNX Runtime keeps its default: threads that spin after a run. That slows a torch call right
    # after it in isolation, but in the interleaved rounds here turning spinning off left the torch
    # rows unchanged and cost ONNX Runtime time (docs/results.md#timing-runtimes-side-by-side).
    try:
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's own exception types live in its compiled module
        if "NOT_IMPLEMENTED" not in str(exc):
            raise
        reason = str(exc).split("NOT_IMPLEMENTED :", 1)[-1].strip().splitlines()[0]
        hint = ("; ConvInteger on int8 weights, which its int8 quantization emits for the patch embedding, needs "
                "onnxruntime >= 1.24") if "ConvInteger" in reason else ""
        raise Unavailable(f"onnxruntime {ort.__version__} cannot run this graph ({reason}){hint}") from exc

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
        if name in ("ort_qdq", "ort_qdq_u8"):
            return _ort_qdq_impl(name, model, seed, args.threads, workdir, "uint8" if name == "ort_qdq_u8" else "int8")
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
def rss_kb(field: str) -> int | None:
    """A memory field of /proc/self/status in KiB ("VmRSS": now, "VmHWM": the peak), None where absent."""
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


def sync_device(device):
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
            before = rss_kb("VmRSS") or 0
            impl.fn(x)
            growth = max(0, (rss_kb("VmHWM") or 0) - before) * 1024
        else:
            growth = float("nan")
    return (impl.weight_bytes + growth) / 2**20


_RUNTIME_PAUSE_S = 0.05


def time_interleaved(impls: list[Impl], x: torch.Tensor, device: str, rounds: int, iters: int,
                     warmup: int) -> dict[str, float]:
    """Median ms per call of each impl; rounds alternate between impls so load drift hits all."""
    times = {impl.name: [] for impl in impls}
    for impl in impls:
        for _ in range(warmup):
            impl.fn(x)
    sync_device(device)
    for _ in range(rounds):
        for impl in impls:
            # Spinning threads of the runtime that ran before (libgomp's and ONNX Runtime's both spin
            # a while after their work) would take this impl's cores and slow its calls
            # (docs/results.md#timing-runtimes-side-by-side).
            time.sleep(_RUNTIME_PAUSE_S)
            if iters > 1:  # one call to settle caches after the other impl ran (moot for calls of ~0.3 s+)
                impl.fn(x)
                sync_device(device)
            for _ in range(iters):
                start = time.perf_counter()
                impl.fn(x)
                sync_device(device)
                times[impl.name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------
