"""Error bounds of the kernels' float32 math against float64, for tolerances that hold on every CPU.

A tolerance read off one machine fails on the next (AVX2 and AVX-512 builds round differently, and
torch's own float32 GELU is another approximation): the tests compare the kernels with float64 and
allow what the kernels' documented error bounds allow, nothing more.
"""
import math

import torch

U32 = 2.0 ** -24  # float32 unit roundoff
# erf of the CPU kernels (csrc/cpu/float_math.h): Abramowitz & Stegun 7.1.26, 1.5e-7 from the formula,
# plus its float32 evaluation (t = 1/(1 + p·a), a degree-5 Horner chain, exp(−a²)): a few roundings of
# values below 1.
CPU_ERF_ABS_ERROR = 1.5e-7 + 8 * U32
# CUDA's erff: at most 2 ulp (CUDA C Programming Guide, mathematical functions), i.e. 2^-22 below 1.
CUDA_ERF_ABS_ERROR = 2.0 ** -22


def gelu_exact(y: torch.Tensor) -> torch.Tensor:
    """GELU of the float32 values ``y`` in float64."""
    y = y.double()
    return 0.5 * y * (1.0 + torch.special.erf(y * math.sqrt(0.5)))


def gelu_abs_bound(y: torch.Tensor, erf_abs_error: float) -> torch.Tensor:
    """|float32 GELU(y) − exact| for float32 inputs y, computed as y·½·(1 + erf(y·√½)): erf's error
    times ½|y|, the rounding of y·√½ carried through erf (slope ≤ 2/√π), and the roundings of the
    sum and the two products (each at most u of a value no larger than |y|)."""
    a = y.double().abs()
    through_erf = (2 / math.sqrt(math.pi)) * U32 * a * math.sqrt(0.5)
    return 0.5 * a * (erf_abs_error + through_erf) + 4 * U32 * a + 1e-45


def assert_requantized_match(got: torch.Tensor, exact: torch.Tensor, bound: torch.Tensor, step: float,
                             zero_point: int, qmin: int, qmax: int) -> None:
    """Requantized outputs equal clamp(round(exact/step) + z) wherever the exact value lies farther than
    ``bound`` (widened by the float32 division by the step) from a rounding tie; within it, either
    neighbouring level (no other) is right."""
    bound = bound + U32 * exact.abs()
    t = exact / step
    lo = torch.round((exact - bound) / step)
    hi = torch.round((exact + bound) / step)
    lo, hi = (lo + zero_point).clamp(qmin, qmax), (hi + zero_point).clamp(qmin, qmax)
    g = got.double()
    ok = (g >= lo) & (g <= hi) & (hi - lo <= 1)
    assert bool(ok.all()), (f"{int((~ok).sum())} levels off: got {g[~ok][:5].tolist()}, "
                            f"exact {(t[~ok][:5] + zero_point).tolist()}")
