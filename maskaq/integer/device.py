"""Which of maskaq's integer kernels a CUDA device runs (else the plain-PyTorch fallbacks)."""
from __future__ import annotations

import functools
import warnings

import torch

from maskaq import ops

_warned_no_cuda_kernels = False


def _cuda_kernels(device) -> bool:
    """Whether maskaq's CUDA integer kernels run on ``device``; warns once when the extension was
    built without them (the callers then fall back to plain PyTorch)."""
    global _warned_no_cuda_kernels
    if ops.integer_kernels_available(device):
        return True
    if not _warned_no_cuda_kernels:
        _warned_no_cuda_kernels = True
        warnings.warn("maskaq._C has no CUDA kernels (maskaq.extension_info()['with_cuda'] is False): on CUDA, "
                      "IntLinear runs its epilogue as plain PyTorch ops and IntAttention its products in float32. "
                      "Rebuild with a CUDA toolkit (MASKAQ_CUDA=1 pip install --no-build-isolation -e .) for the "
                      "fused int8 kernels.", RuntimeWarning, stacklevel=3)
    return False


@functools.lru_cache(maxsize=None)
def _has_int8_tensor_cores(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (7, 2)
