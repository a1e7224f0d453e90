"""Loading of the compiled extension maskaq._C, with a one-time warning when it is missing.

Without the extension every op falls back to its plain-PyTorch reference (maskaq.reference).
MASKAQ_REQUIRE_EXTENSION=1 turns a missing extension into an error (CI sets it, so the
fallback cannot hide a broken build).

The CUDA kernels run only on GPUs whose compute capability the build covers (SASS of the same
major version and a minor at or below the GPU's, or PTX at or below it, which the driver
JIT-compiles). On any other GPU the first CUDA call warns once and the ops use the reference,
where launching a kernel would fail with "no kernel image is available".
"""
import os
import re
import warnings

import torch  # noqa: F401  (loads libc10/libtorch, which maskaq._C links against)

__version__ = "0.1.0"

_module = None
_error = None


def _load():
    global _module, _error
    try:
        from maskaq import _C  # noqa: F401  (importing registers torch.ops.maskaq.*)

        _module = _C
    except ImportError as exc:  # a missing or broken build
        _error = exc
        if os.environ.get("MASKAQ_REQUIRE_EXTENSION") == "1":
            raise ImportError(f"maskaq._C failed to load and MASKAQ_REQUIRE_EXTENSION=1: {exc}") from exc
        warnings.warn(
            f"maskaq._C could not be loaded ({exc}); maskaq falls back to its plain-PyTorch "
            "reference ops, which are slower. Reinstall with `pip install --no-build-isolation -e .`.",
            RuntimeWarning,
            stacklevel=3,
        )


_load()


def loaded() -> bool:
    return _module is not None


def int8_attention_products() -> str:
    """What the loaded extension's CPU int8_attention runs its products on: "int16", "int8" or "float"."""
    return _module.int8_attention_products()


def load_error():
    return _error


def _built_cuda_archs():
    """(TORCH_CUDA_ARCH_LIST entries, SASS archs, PTX archs) of the build; SASS/PTX None where
    the build info predates them and the entries name archs by name (e.g. "Ampere")."""
    try:
        from maskaq import _build_info
    except ImportError:
        return [], None, None
    entries = [a for a in _build_info.CUDA_ARCHS.replace(",", ";").replace(" ", ";").split(";") if a]
    sass, ptx = getattr(_build_info, "CUDA_SASS", None), getattr(_build_info, "CUDA_PTX", None)
    if sass is None or ptx is None:
        sass, ptx = [], []
        for entry in entries:
            arch = entry.removesuffix("+PTX")
            if not re.fullmatch(r"\d+\.\d+[a-z]?", arch):
                return entries, None, None
            sass.append(arch)
            if entry.endswith("+PTX"):
                ptx.append(arch)
    return entries, list(sass), list(ptx)


def extension_info() -> dict:
    """What was built: {'loaded', 'with_cuda', 'cuda_archs' (TORCH_CUDA_ARCH_LIST entries, e.g.
    '12.0+PTX'), 'cuda_sass' and 'cuda_ptx' (the compute capabilities with a binary and with
    PTX, e.g. ['8.0', '9.0'] and ['9.0']), 'version', 'error'}."""
    entries, sass, ptx = _built_cuda_archs()
    with_cuda = bool(getattr(_module, "with_cuda", False))
    return {
        "loaded": loaded(),
        "with_cuda": with_cuda,
        "cuda_archs": entries if with_cuda else [],
        "cuda_sass": (sass or []) if with_cuda else [],
        "cuda_ptx": (ptx or []) if with_cuda else [],
        "version": __version__,
        "error": None if _error is None else str(_error),
    }


def _arch(text):
    major, minor, suffix = re.fullmatch(r"(\d+)\.(\d+)([a-z]?)", text).groups()
    return int(major), int(minor), suffix


def arch_runs_on(capability, sass, ptx) -> bool:
    """Whether code built as SASS archs ``sass`` and PTX archs ``ptx`` (e.g. "8.0", "9.0a") runs on
    a GPU of compute capability ``capability`` (major, minor).

    A binary runs on its own major version from its minor up (sm_80 on 8.6, sm_100 on 10.3); PTX
    is JIT-compiled for any GPU at or above its capability; family-specific code ("f") runs
    within its major version from its minor up, arch-specific code ("a") only on its exact
    capability."""
    major, minor = int(capability[0]), int(capability[1])

    def covers(text, jit):
        m, n, suffix = _arch(text)
        if suffix == "a":
            return (m, n) == (major, minor)
        if jit and not suffix:
            return (m, n) <= (major, minor)
        return m == major and n <= minor

    return any(covers(a, jit=False) for a in sass) or any(covers(a, jit=True) for a in ptx)


_cuda_runs = {}  # device index -> whether the CUDA kernels run there
_warned_cuda_arch = False


def cuda_kernels_run_on(device) -> bool:
    """Whether the extension's CUDA kernels run on ``device`` (a CUDA torch.device); checked once
    per device. Where they do not, warns once (raises with MASKAQ_REQUIRE_EXTENSION=1) and the
    ops use the reference."""
    import torch

    global _warned_cuda_arch
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index in _cuda_runs:
        return _cuda_runs[index]
    _, sass, ptx = _built_cuda_archs()
    capability = tuple(torch.cuda.get_device_capability(index))
    runs = sass is None or arch_runs_on(capability, sass, ptx)  # archs given by name: trust the build
    _cuda_runs[index] = runs
    if not runs:
        built = ", ".join([f"sm_{a}" for a in sass] + [f"PTX {a}" for a in ptx]) or "none"
        cap = f"{capability[0]}.{capability[1]}"
        message = (f"maskaq._C has no CUDA code for this GPU (cuda:{index}, compute capability {cap}; built: "
                   f"{built}). Rebuild for it with TORCH_CUDA_ARCH_LIST=\"{cap}\" pip install "
                   "--no-build-isolation -e .")
        if os.environ.get("MASKAQ_REQUIRE_EXTENSION") == "1":
            raise RuntimeError(message + " (MASKAQ_REQUIRE_EXTENSION=1 forbids the fallback)")
        if not _warned_cuda_arch:
            _warned_cuda_arch = True
            warnings.warn(message + " Until then maskaq runs its plain-PyTorch reference ops on it, which are slower.",
                          RuntimeWarning, stacklevel=3)
    return runs
