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


# exp in the softmaxes: at most 2 ulp (4·u relative) — Cephes' expf polynomial of float_math.h
# (about 1 ulp, used by fq_attention.cpp) and ATen's vectorized exp (Sleef u10 / exp_u20) behind
# at::_softmax_out and torch.softmax, which the integer attention uses.
EXP_REL_ERROR = 4 * U32
# The float32 epilogue of an integer GEMM, y = acc·(α·s_w) + b: acc is an exact integer below 2^24;
# α and s_w rounded to float32 and multiplied (3 roundings), times acc (1), the stored bias b·scale
# rounded (1) and the sum (1): 6 roundings relative to |acc·α·s_w| + |b|.
EPILOGUE_ROUNDINGS = 6


def dot_abs_bound(n: int, sum_abs: torch.Tensor) -> torch.Tensor:
    """A float32 sum of n products in any order: |error| ≤ γ_n · Σ|terms| (Higham, Thm 3.1),
    γ_n = n·u/(1 − n·u); the order-independent bound for BLAS and SIMD reductions."""
    return (n * U32 / (1 - n * U32)) * sum_abs


def near_tie(t: torch.Tensor, slack: torch.Tensor, lo: float = -math.inf, hi: float = math.inf) -> torch.Tensor:
    """Where round(t) may flip to a neighbouring level: a .5 tie lies within ``slack`` of t (float64)
    and both levels around it are inside [lo, hi] (the clamp decides otherwise)."""
    tie = torch.floor(t) + 0.5
    return ((t - tie).abs() <= slack) & (tie - 0.5 >= lo) & (tie + 0.5 <= hi)


def softmax_rel_bound(logits: torch.Tensor, logits_abs_error: torch.Tensor) -> torch.Tensor:
    """Relative error bound of float32 softmax(L) over the last dim, from float64 logits L whose float32
    values are off by at most ``logits_abs_error``: e_i = exp(L_i − m) carries its argument's error
    (|ΔL_i| + |Δm| plus the subtraction's rounding) and exp's 2 ulp; the sum of n of them γ_n and its
    largest term error; the normalization one rounding."""
    n = logits.shape[-1]
    m = logits.amax(-1, keepdim=True)
    m_err = logits_abs_error.amax(-1, keepdim=True)
    arg = logits_abs_error + m_err + U32 * (logits - m).abs()
    rel_e = torch.expm1(arg) + EXP_REL_ERROR * torch.exp(arg)
    return rel_e + rel_e.amax(-1, keepdim=True) + (n + 2) * U32


def quant_linear_reference(layer, x: torch.Tensor, output_scale=None):
    """(exact output, bound) of a QuantLinear on float32 input x, for an integer kernel on the same x:
    the fake-quant arithmetic in float64 on the float32 fake-quant weights ŵ (each within u of w_int·s_w,
    so u·Σ|x̂ŵ|), the epilogue's EPILOGUE_ROUNDINGS, and one level (α·|ŵ| of that column) wherever
    x/α + z lies within the float32 rounding of the kernel's x/α (4u of |x/α| + |z|: a prescale, a
    division and the zero point) of a tie."""
    q = layer.input_quantizer
    alpha, z = float(q.step.detach()), round(float(q.zero_point.detach()))
    x64 = x.detach().double().reshape(-1, layer.in_features)
    t = x64 / alpha + z
    levels = torch.round(t).clamp(q.qmin, q.qmax) - z
    flips = near_tie(t, 4 * U32 * ((x64 / alpha).abs() + abs(z) + 1), q.qmin, q.qmax).double()
    with torch.no_grad():
        w = layer.weight_quantizer(layer.weight).double()
    b = layer.bias.detach().double() if layer.bias is not None else torch.zeros(layer.out_features, dtype=torch.float64)
    s = torch.ones(layer.out_features, dtype=torch.float64) if output_scale is None else output_scale.double()
    w, b = w * s[:, None], b * s
    acc = (levels * alpha) @ w.T
    y = acc + b
    bound = (U32 * ((levels.abs() * alpha) @ w.abs().T) + EPILOGUE_ROUNDINGS * U32 * (acc.abs() + b.abs())
             + (1 + EPILOGUE_ROUNDINGS * U32) * alpha * (flips @ w.abs().T) + 1e-30)
    shape = (*x.shape[:-1], layer.out_features)
    return y.reshape(shape), bound.reshape(shape)


def assert_within(got: torch.Tensor, exact: torch.Tensor, bound: torch.Tensor, what: str = "") -> None:
    """|got − exact| ≤ bound elementwise, with the worst elements in the message."""
    err = (got.double() - exact).abs()
    bad = err > bound
    assert not bool(bad.any()), (f"{what}: {int(bad.sum())} of {bad.numel()} elements off, worst ratio "
                                 f"{float((err / bound).max()):.3g}, errors {err[bad][:4].tolist()} bounds {bound[bad][:4].tolist()}")


def quant_conv_reference(conv, x: torch.Tensor):
    """(exact output, bound) of a QuantConv2d on float32 input x, for the integer module on the same x:
    float64 fake quant, a float32 sum of the window's products and the bias (dot_abs_bound), the
    weights' u of rounding, and one level wherever x/α + z lies within 4u of a tie (as for linears)."""
    import torch.nn.functional as F

    kw = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups)
    with torch.no_grad():
        w = conv.weight_quantizer(conv.weight).double()
    b = conv.bias.detach().double() if conv.bias is not None else None
    x64 = x.detach().double()
    flips = torch.zeros_like(x64)
    alpha = 0.0
    q = conv.input_quantizer
    if q is not None:
        alpha, z = float(q.step.detach()), round(float(q.zero_point.detach()))
        t = x64 / alpha + z
        flips = near_tie(t, 4 * U32 * ((x64 / alpha).abs() + abs(z) + 1), q.qmin, q.qmax).double()
        x64 = (torch.round(t).clamp(q.qmin, q.qmax) - z) * alpha
    y = F.conv2d(x64, w, b, **kw)
    n = w[0].numel() + 1
    sum_abs = F.conv2d(x64.abs(), w.abs(), None if b is None else b.abs(), **kw)
    bound = (dot_abs_bound(n, sum_abs) + EPILOGUE_ROUNDINGS * U32 * sum_abs
             + (1 + EPILOGUE_ROUNDINGS * U32) * alpha * F.conv2d(flips, w.abs(), None, **kw) + 1e-30)
    return y, bound
