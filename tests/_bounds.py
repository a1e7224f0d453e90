"""Error bounds of the kernels' float32 math against float64, for tolerances that hold on every CPU.

A tolerance read off one machine fails on the next (AVX2 and AVX-512 builds round differently, and
torch's own float32 GELU is another approximation): the tests compare the kernels with float64 and
allow what the kernels' documented error bounds allow, nothing more.
"""
import math

import torch

U32 = 2.0 ** -24  # float32 unit roundoff
UINT8_SHIFT = 256  # the largest zero point a kernel adds on the uint8 grid (255), plus the tie itself
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
    x/α + z lies within the float32 rounding of the kernel's x/α + z of a tie: 4u of |x/α| + 256 (a
    prescale, a division, and the addition of the kernel's zero point, which a library may apply on
    the uint8 grid, up to 255, before it rounds: fbgemm does so in torch 2.4 and 2.11, not in 2.14)."""
    q = layer.input_quantizer
    alpha, z = float(q.step.detach()), round(float(q.zero_point.detach()))
    x64 = x.detach().double().reshape(-1, layer.in_features)
    t = x64 / alpha + z
    levels = torch.round(t).clamp(q.qmin, q.qmax) - z
    flips = near_tie(t, 4 * U32 * ((x64 / alpha).abs() + UINT8_SHIFT), q.qmin, q.qmax).double()
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
        flips = near_tie(t, 4 * U32 * ((x64 / alpha).abs() + UINT8_SHIFT), q.qmin, q.qmax).double()
        x64 = (torch.round(t).clamp(q.qmin, q.qmax) - z) * alpha
    y = F.conv2d(x64, w, b, **kw)
    n = w[0].numel() + 1
    sum_abs = F.conv2d(x64.abs(), w.abs(), None if b is None else b.abs(), **kw)
    bound = (dot_abs_bound(n, sum_abs) + EPILOGUE_ROUNDINGS * U32 * sum_abs
             + (1 + EPILOGUE_ROUNDINGS * U32) * alpha * F.conv2d(flips, w.abs(), None, **kw) + 1e-30)
    return y, bound


def float32_level_unsure(x: torch.Tensor, step: float, zero_point: float, qmin: int, qmax: int) -> torch.Tensor:
    """Where a float32 quantizer t = x/α + z (x float32) may round or clamp otherwise than in float64:
    t lies within its float32 error (a division and an addition: 4u of |x/α| + |z| + 1) of a .5 tie
    or of qmin / qmax (the clamp decides the STE gradient)."""
    xs = x.detach().double() / step
    t = xs + zero_point
    slack = 4 * U32 * (xs.abs() + abs(zero_point) + 1)
    return near_tie(t, slack, qmin, qmax) | ((t - qmin).abs() <= slack) | ((t - qmax).abs() <= slack)


def _gamma(n: int) -> float:
    """(1 + u)^n − 1: n float32 roundings in a row, relative (Higham's γ_n to first order)."""
    return math.expm1(n * math.log1p(U32))


def fq_attention_f32_reference(q, k, v, step, zero_point, qmin, qmax, grad_out, grad_logits):
    """Exact values (float64) and elementwise bounds for the float32 CPU fq_attention, forward and
    backward, on float32 inputs whose q, k, v quantizer inputs lie farther than their float32 error
    (4u of |x/α| + |z| + 1) from a rounding tie and from qmin/qmax, so the kernel picks the same
    q, k, v levels and clamp decisions as float64 (the caller moves such inputs away first).

    The bounds: every float32 product, sum, division and fake-quant multiply is one rounding, and a
    value built from n of them in any order is within γ_n of the same expression on absolute values
    (γ_{d+2} for the logits; P within softmax_rel_bound of the exact softmax, exp's 2 ulp included,
    and ρ = its maximum enters the backward twice, as P and as the P in rowsum(dP∘P)). P is the one
    quantizer input the kernel computes itself: where P/α_p + z lies within P's error of a .5 tie
    its level may flip, which moves P̂ by α_p and out's row by α_p·|v̂|, dv̂ by α_p·|dO| and the
    step sum by |dP̂|; where it lies that close to qmin or qmax the clamp decision may flip, which
    moves dA's row by scale·|dP̂|·P (through the softmax backward), the zero point's sum by α_p·|dP̂|
    and the step sum by |dP̂|·(|P/α_p| + 1). The step and zero-point gradients are per-row float32
    sums (γ_{n+3}) added in float64 and rounded to float32 once.

    Returns {name: (exact, bound)} for out, logits, grad_q, grad_k, grad_v, grad_step and
    grad_zero_point, and "p_zero_point_terms": the exact terms −α_p·dP̂ of P's zero-point gradient.
    """
    from maskaq import reference as ref

    f64 = torch.float64
    B, H, N, d = q.shape
    scale = d ** -0.5
    alpha = step.detach().to(f64)
    z = torch.round(zero_point.detach().to(f64))
    go, gl = grad_out.to(f64), grad_logits.to(f64)

    # exact values: the reference in float64 on the same float32 inputs and parameters
    q64, k64, v64 = (t.detach().to(f64).requires_grad_() for t in (q, k, v))
    s64, z64 = alpha.clone().requires_grad_(), zero_point.detach().to(f64).requires_grad_()
    out, logits = ref.fq_attention(q64, k64, v64, step=s64, zero_point=z64, qmin=qmin, qmax=qmax,
                                   return_logits=True)
    exact = torch.autograd.grad([out, logits], [q64, k64, v64, s64, z64], [go, gl])

    def quantizer(x, i):
        xs = x / alpha[i]
        t = xs + z[i]
        inside = (t >= qmin[i]) & (t <= qmax[i])
        r = torch.round(t.clamp(qmin[i], qmax[i])) - z[i]
        return xs, t, inside, r

    parts = [quantizer(x.detach().to(f64), i) for i, x in ((0, q), (1, k), (3, v))]
    for x, name, i in ((q, "q", 0), (k, "k", 1), (v, "v", 3)):
        unsure = float32_level_unsure(x, float(alpha[i]), float(z[i]), qmin[i], qmax[i])
        assert not bool(unsure.any()), f"{name} lies within float32 rounding of a tie or a clamp bound"
    qh, kh, vh = (p[3] * alpha[i] for p, i in zip(parts, (0, 1, 3)))
    aq, ak, av = qh.abs(), kh.abs(), vh.abs()

    # forward: logits, softmax, P's quantizer
    L = qh @ kh.transpose(-2, -1)
    e_L = _gamma(d + 2) * (aq @ ak.transpose(-2, -1))
    a = L * scale
    a_err = _gamma(2) * a.abs() + (1 + _gamma(2)) * scale * e_L  # scale rounded to float32, one product
    assert float((a - a.amax(-1, keepdim=True)).min()) > -87.0, "exp would hit the kernel's underflow clamp"
    rho_el = softmax_rel_bound(a, a_err)
    rho = float(rho_el.max())
    P = torch.softmax(a, -1)
    xs_p, t_p, inside_p, r_p = quantizer(P, 2)
    slack_p = (rho_el + 2 * U32) * xs_p + 4 * U32 * (xs_p + abs(float(z[2])) + 1)
    tie = near_tie(t_p, slack_p, qmin[2], qmax[2]).to(f64)
    edge = (((t_p - qmin[2]).abs() <= slack_p) | ((t_p - qmax[2]).abs() <= slack_p)).to(f64)
    ph = r_p * alpha[2]
    ph_max = ph.abs() + alpha[2] * tie
    e_out = _gamma(N + 2) * (ph_max @ av) + alpha[2] * (tie @ av)

    # backward: dP̂ = dO·v̂ᵀ, dA = scale·P∘(dP − rowsum(dP∘P)) + dA_returned, dq̂ = dA·k̂, dk̂ = dAᵀ·q̂, dv̂ = P̂ᵀ·dO
    gy_p = go @ vh.transpose(-2, -1)
    gy_abs = go.abs() @ av.transpose(-2, -1)
    e_gy_p = _gamma(d + 1) * gy_abs
    gy_max = gy_abs * (1 + _gamma(d + 1))
    dp = gy_p * inside_p
    dA = scale * P * (dp - (dp * P).sum(-1, keepdim=True)) + gl
    A_abs = scale * P * (gy_max + (gy_max * P).sum(-1, keepdim=True)) + gl.abs()
    flip = edge * gy_max * P
    dA_flip = (1 + rho) ** 2 * (1 + _gamma(d + N + 6)) * scale * (flip + P * flip.sum(-1, keepdim=True))
    c = (1 + rho) ** 2 * (1 + _gamma(d + 2 * N + 8)) - 1
    gy_q, gy_k, gy_v = dA @ kh, dA.transpose(-2, -1) @ qh, ph.transpose(-2, -1) @ go
    e_q = c * (A_abs @ ak) + (1 + c) * (dA_flip @ ak)
    e_k = c * (A_abs.transpose(-2, -1) @ aq) + (1 + c) * (dA_flip.transpose(-2, -1) @ aq)
    e_v = _gamma(N + 2) * (ph_max.transpose(-2, -1) @ go.abs()) + alpha[2] * (tie.transpose(-2, -1) @ go.abs())

    def sums_bound(i, gy, e, xs, inside, r, n, eps_xs, tie=None, edge=None):
        """Bounds of the step and zero-point gradients of quantizer i from its per-element terms."""
        g_abs = gy.abs() + e
        terms = g_abs * (r.abs() + xs.abs())
        total = gy.numel()
        sa = ((e * (r.abs() + xs.abs())).sum() + (g_abs * xs.abs() * eps_xs).sum()
              + (_gamma(n + 3) + total * 2.0 ** -52) * terms.sum())
        out_abs = g_abs * ~inside
        sz = alpha[i] * ((e * ~inside).sum() + (_gamma(n + 2) + total * 2.0 ** -52) * out_abs.sum())
        if tie is not None:
            sa = sa + (g_abs * tie).sum() + (g_abs * (xs.abs() + 1) * edge).sum()
            sz = sz + alpha[i] * (g_abs * edge).sum()
        return ref.lsq_grad_scale(total, qmax[i]) * sa, sz

    (xs_q, _, in_q, r_q), (xs_k, _, in_k, r_k), (xs_v, _, in_v, r_v) = parts
    bounds = [sums_bound(0, gy_q, e_q, xs_q, in_q, r_q, d, U32),
              sums_bound(1, gy_k, e_k, xs_k, in_k, r_k, d, U32),
              sums_bound(2, gy_p, e_gy_p, xs_p, inside_p, r_p, N, rho_el * (1 + U32) + U32, tie, edge),
              sums_bound(3, gy_v, e_v, xs_v, in_v, r_v, d, U32)]
    b_step = torch.stack([b[0] for b in bounds])
    b_zp = torch.stack([b[1] for b in bounds])
    b_step = b_step + U32 * (exact[3].abs() + b_step)  # the float32 result
    b_zp = b_zp + U32 * (exact[4].abs() + b_zp)
    tiny = 1e-30
    return {
        "out": (out.detach(), e_out + tiny),
        "logits": (logits.detach(), e_L + tiny),
        "grad_q": (exact[0], e_q * in_q + tiny),
        "grad_k": (exact[1], e_k * in_k + tiny),
        "grad_v": (exact[2], e_v * in_v + tiny),
        "grad_step": (exact[3], b_step + tiny),
        "grad_zero_point": (exact[4], b_zp + tiny),
        "p_zero_point_terms": -alpha[2] * gy_p * ~inside_p,
    }


# What torch.backends.cpu.get_cpu_capability() reports when a test forces ATEN_CPU_CAPABILITY (the
# kernels' ISA decides which error bound applies); torch 2.4 calls the baseline "NO AVX".
CAPABILITY_NAMES = {"default": ("DEFAULT", "NO AVX"), "avx2": ("AVX2",), "avx512": ("AVX512",)}
