"""Loading of the compiled extension maskaq._C, with a one-time warning when it is missing.

Without the extension every op falls back to its plain-PyTorch reference (maskaq.reference).
MASKAQ_REQUIRE_EXTENSION=1 turns a missing extension into an error (CI sets it, so the
fallback cannot hide a broken build).
"""
import os
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


def load_error():
    return _error


def extension_info() -> dict:
    """What was built: {'loaded', 'with_cuda', 'cuda_archs', 'version', 'error'}."""
    try:
        from maskaq import _build_info

        archs = [a for a in _build_info.CUDA_ARCHS.replace(",", ";").replace(" ", ";").split(";") if a]
    except ImportError:
        archs = []
    with_cuda = bool(getattr(_module, "with_cuda", False))
    return {
        "loaded": loaded(),
        "with_cuda": with_cuda,
        "cuda_archs": archs if with_cuda else [],
        "version": __version__,
        "error": None if _error is None else str(_error),
    }
