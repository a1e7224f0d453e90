"""The CPU int8 GEMM libraries IntLinear runs on, and whether this machine's clip pair sums to int16."""
from __future__ import annotations

import functools
import warnings

import torch

__all__ = ["KERNELS", "DEFAULT_KERNEL", "INT16_MAX", "pair_sums_overflow_int16", "cpu_int8_pairs_saturate",
           "int16_gemm_available", "cpu_integer_path", "onednn_gemm", "split_weights"]

# CPU GEMM libraries of IntLinear. "onednn": onednn::qlinear_pointwise on uint8 activations
# (fused GELU / requantization epilogues; measured faster here); "fbgemm": fbgemm's
# float-in/float-out quantized linear (quantizes its input inside the op).
KERNELS = ("onednn", "fbgemm")
DEFAULT_KERNEL = "onednn"
INT16_MAX = 32767


def pair_sums_overflow_int16(widest_input: int, weight_int: torch.Tensor) -> bool:
    """Whether two adjacent products u·w, |u| <= widest_input and w from the integer weights
    ``weight_int``, can leave int16: the pair sums a saturating int8 GEMM (vpmaddubsw, without
    VNNI) clips."""
    widest_weight = int(weight_int.to(torch.int16).abs().max()) if weight_int.numel() else 0
    return 2 * widest_input * widest_weight > INT16_MAX


def _saturation_probe(gemm) -> bool:
    """Whether ``gemm(u, w)`` (uint8 (M, K) by int8 (N, K) -> float (M, N)) differs from the exact
    result on operands whose every adjacent pair of products overflows int16."""
    m, k, n = 32, 64, 16
    u = torch.full((m, k), 255, dtype=torch.uint8)
    w = torch.where(torch.arange(n)[:, None] % 2 == 0, 127, -128).expand(n, k).to(torch.int8).contiguous()
    exact = (255.0 * k) * w[:, 0].double()  # |acc| = 2,088,960 < 2^24: exact in a float32 output
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized dtypes are deprecated in torch >= 2.10
        return not torch.equal(gemm(u, w).double(), exact.expand(m, n))


def onednn_gemm(w: torch.Tensor, zero_point: int = 0):
    """oneDNN's int8 GEMM on the int8 weights ``w`` (N, K), packed once: returns the call that maps
    uint8 activations u (M, K) to float32 Σ_k (u − zero_point)·w (scales 1, no bias)."""
    n = w.shape[0]
    packed = torch.ops.onednn.qlinear_prepack(w, None)
    scales, zeros = torch.ones(n), torch.zeros(n, dtype=torch.int32)
    return lambda u: torch.ops.onednn.qlinear_pointwise(u, 1.0, zero_point, packed, scales, zeros, None, 1.0, 0,
                                                        torch.float32, "none", [], "")


def _onednn_gemm(u, w):
    return onednn_gemm(w)(u)


def split_weights(w: torch.Tensor) -> torch.Tensor:
    """W (N, K) int8 as the stacked halves [W_hi; W_lo] (2N, K) int8 with W = 2·W_hi + W_lo,
    W_hi = floor(W/2) ∈ [-64, 63] and W_lo ∈ {0, 1}: both halves keep every pair sum u1·w1 + u2·w2
    of uint8 activations within int16 (2·255·64 < 2^15), so a GEMM that saturates pair sums is
    exact on them, and the two halves of its output add up (2·y_hi + y_lo) to the product with W."""
    w16 = w.to(torch.int16)
    high = torch.div(w16, 2, rounding_mode="floor")
    return torch.cat([high, w16 - 2 * high]).to(torch.int8)


def fbgemm_prepack(weights: torch.Tensor, scales: torch.Tensor, bias=None):
    """fbgemm's packed int8 weights (per-channel ``scales``, zero points 0, optional float bias).
    Packed under the "x86" engine, which the packed weights keep whatever the engine is later."""
    n = weights.shape[0]
    previous = torch.backends.quantized.engine
    try:
        torch.backends.quantized.engine = "x86"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # quantized dtypes are deprecated in torch >= 2.10
            qw = torch._make_per_channel_quantized_tensor(weights, scales, torch.zeros(n, dtype=torch.long), 0)
            return torch.ops.quantized.linear_prepack(qw, bias)
    finally:
        torch.backends.quantized.engine = previous


def _fbgemm_gemm(u, w):
    packed = fbgemm_prepack(w, torch.ones(w.shape[0], dtype=torch.float64))
    return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(u.float(), 1.0, 0, packed)


def _int_mm_gemm(u, w):
    s = (u.to(torch.int16) - 128).to(torch.int8)  # the int8 operand of the CUDA path: -128 everywhere
    return torch._int_mm(s, w.t()).double() + 128.0 * w.double().sum(1)


_GEMMS = {"onednn": _onednn_gemm, "fbgemm": _fbgemm_gemm, "int_mm": _int_mm_gemm}


@functools.lru_cache(maxsize=None)
def cpu_int8_pairs_saturate(kernel: str) -> bool:
    """Whether the CPU library ``kernel`` ("onednn", "fbgemm", or "int_mm" for ``torch._int_mm``)
    adds adjacent int8 products in int16 with saturation on this machine. x86 CPUs without VNNI
    (AVX2; AVX512 before Cascade Lake) multiply u8·s8 with ``vpmaddubsw``, which clips each pair
    sum u1·w1 + u2·w2 to [-32768, 32767] (255·127·2 does not fit); VNNI's ``vpdpbusd`` adds in
    int32. Measured once per process, not inferred from CPU flags, so that library settings
    (``DNNL_MAX_CPU_ISA``, ``FBGEMM_ENABLE_INSTRUCTIONS``) count."""
    if kernel not in _GEMMS:
        raise ValueError(f"unknown CPU int8 GEMM {kernel!r}; choose one of {', '.join(_GEMMS)}")
    return _saturation_probe(_GEMMS[kernel])


def int16_gemm_available() -> bool:
    """Whether maskaq's own exact int8 GEMM (``maskaq.ops.int8_gemm``: int16 operands, int32 pair
    sums) runs vectorized here: the extension is loaded and ATen's CPU capability is AVX2 or above
    (it honours ``ATEN_CPU_CAPABILITY``, as the kernel's dispatch does)."""
    from maskaq import _extension

    # ATen's levels are DEFAULT, AVX2, AVX512 (and non-x86 ones): none is below AVX2 and named AVX
    return _extension.loaded() and torch.backends.cpu.get_cpu_capability().startswith("AVX")


# What IntLinear does with 8-bit weights against 8-bit activations, per kernel (cpu_integer_path).
PATH_DIRECT = "direct (int32 pair sums)"
PATH_INT16 = "maskaq int16 GEMM where pairs would saturate (the library adds pairs in int16)"
PATH_SPLIT = "split-weights where pairs would saturate (the library adds pairs in int16; no AVX2 for maskaq's GEMM)"


# What runs IntAttention's two integer products on the CPU (cpu_integer_path); all are exact.
ATTENTION_INT16 = "maskaq int16 GEMM (ATen's capability is AVX2)"
ATTENTION_INT8 = "oneDNN int8 GEMM (torch._int_mm; VNNI adds pairs in int32)"
ATTENTION_BLAS = "float32 BLAS on the integers (float64 where a sum could round)"
_ATTENTION_PATHS = {"int16": ATTENTION_INT16, "int8": ATTENTION_INT8, "float": ATTENTION_BLAS}


@functools.lru_cache(maxsize=None)
def attention_products_path() -> str:
    """What maskaq's int8_attention runs q̃·k̃ᵀ and P̃·ṽ on, as its CPU kernel decides: its int16 GEMM
    where ATen's capability is exactly AVX2 (with AVX-512, float32 FMA does as many multiply-adds per
    instruction); oneDNN's int8 GEMM through torch._int_mm where the CPU has AVX512-VNNI and that
    GEMM is exact (probed once, like ``cpu_int8_pairs_saturate``); else float32 BLAS, as
    IntAttention's per-sample loop and the plain-PyTorch reference do."""
    from maskaq import _extension

    if not _extension.loaded():
        return ATTENTION_BLAS
    return _ATTENTION_PATHS[_extension.int8_attention_products()]


def cpu_integer_path() -> dict:
    """How this machine runs the integer model on the CPU: ATen's CPU capability; per kernel, what
    runs the layers whose pair sums overflow int16 (8-bit weights against 8-bit activations): the
    library itself where it adds pairs in int32 (VNNI), else maskaq's int16 GEMM (AVX2), else the
    library on split weights; and what runs the attention products."""
    def path(kernel):
        if not cpu_int8_pairs_saturate(kernel):
            return PATH_DIRECT
        return PATH_INT16 if int16_gemm_available() else PATH_SPLIT

    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(),
            **{f"{kernel}_int8": path(kernel) for kernel in KERNELS},
            "attention_products": attention_products_path()}


def _check_kernel(kernel: str) -> str:
    if kernel not in KERNELS:
        raise ValueError(f"integer kernel must be one of {KERNELS}, got {kernel!r}")
    return kernel
