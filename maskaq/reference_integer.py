"""The two integer-inference ops in plain PyTorch: the int8 GEMM epilogue and the integer attention
(no autograd). The ground truth of maskaq._C's integer kernels and their fallback; re-exported by
maskaq.reference, which holds the training ops.
"""
from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F

# The largest |qmin|, |qmax| of any quantizer grid the ops take (fq_attention's too).
MAX_QUANT_LEVEL = 1 << 16

__all__ = ["int8_linear_epilogue", "int8_attention", "qkv_int8_attention", "int8_gemm", "epilogue_out_dtype",
           "check_int8_linear_epilogue_args", "check_int8_attention_args", "check_qkv_int8_attention_args", "int8_shift",
           "ACTIVATIONS", "INT32_MAX"]

ACTIVATIONS = ("none", "gelu")
INT32_MAX = 2 ** 31 - 1


def _check_int(name: str, value) -> int:
    if not isinstance(value, bool):
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise TypeError(f"{name} must be an int, got {value!r}")


def _check_finite(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def epilogue_out_dtype(out_step: float, out_qmin: int, out_qmax: int) -> torch.dtype:
    """dtype of int8_linear_epilogue's result: float32 (out_step <= 0), uint8 when
    [out_qmin, out_qmax] ⊂ [0, 255], else int8 (the range must then lie in [-128, 127])."""
    if not out_step > 0:
        return torch.float32
    if not out_qmin < out_qmax:
        raise ValueError(f"out_qmin = {out_qmin} must be below out_qmax = {out_qmax}")
    if 0 <= out_qmin and out_qmax <= 255:
        return torch.uint8
    if -128 <= out_qmin and out_qmax <= 127:
        return torch.int8
    raise ValueError(f"[out_qmin, out_qmax] = [{out_qmin}, {out_qmax}] must fit uint8 [0, 255] or int8 "
                     "[-128, 127] (the requantized output is one byte)")


def check_int8_linear_epilogue_args(acc, scale, bias, activation, out_step, out_zero_point, out_qmin, out_qmax):
    """Validates int8_linear_epilogue's arguments (the kernels check the same); returns
    (activation, out_step, out_zero_point, out_qmin, out_qmax, out dtype) normalized."""
    if not isinstance(acc, torch.Tensor) or acc.dtype != torch.int32:
        raise TypeError(f"acc must be an int32 tensor (the int8 GEMM's accumulators), got "
                        f"{acc.dtype if isinstance(acc, torch.Tensor) else type(acc).__name__}")
    if acc.dim() != 2:
        raise ValueError(f"acc must be 2-D (M, N), got shape {tuple(acc.shape)}")
    for name, t in (("scale", scale), ("bias", bias)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32:
            raise TypeError(f"{name} must be a float32 tensor (N,), got "
                            f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
        if t.shape != (acc.shape[1],):
            raise ValueError(f"{name} must have shape (N,) = ({acc.shape[1]},) like acc's columns, got "
                             f"{tuple(t.shape)}")
        if t.device != acc.device:
            raise ValueError(f"{name} is on {t.device} but acc is on {acc.device}; move it with .to(acc.device)")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS} (\"gelu\" is erf GELU, as nn.GELU()), got "
                         f"{activation!r}")
    out_step = _check_finite("out_step", out_step)
    out_zero_point, out_qmin, out_qmax = (_check_int(n, x) for n, x in (
        ("out_zero_point", out_zero_point), ("out_qmin", out_qmin), ("out_qmax", out_qmax)))
    dtype = epilogue_out_dtype(out_step, out_qmin, out_qmax)
    if out_step > 0 and abs(out_zero_point) > MAX_QUANT_LEVEL:
        raise ValueError(f"out_zero_point must lie in [{-MAX_QUANT_LEVEL}, {MAX_QUANT_LEVEL}], got {out_zero_point}")
    return activation, out_step, out_zero_point, out_qmin, out_qmax, dtype


def _exact_div(x: torch.Tensor, step: float) -> torch.Tensor:
    """x / step in float32, correctly rounded on every device. (On CUDA, dividing by a Python
    number multiplies by its reciprocal, which can move a level at a tie; a device tensor divides.)"""
    return x / torch.tensor(step, dtype=torch.float32, device=x.device)


def _requantize(y: torch.Tensor, step: float, zero_point: int, qmin: int, qmax: int) -> torch.Tensor:
    """clamp(round(y / step) + zero_point, qmin, qmax) as a float tensor; NaN -> qmin. The inner
    clamp to [qmin − z − 1, qmax − z + 1] changes no result (it is how the kernels bound t)."""
    t = torch.nan_to_num(_exact_div(y, step), nan=float(qmin - zero_point - 1))
    t = t.clamp(qmin - zero_point - 1, qmax - zero_point + 1)
    return (torch.round(t) + zero_point).clamp(qmin, qmax)


def int8_linear_epilogue(acc, scale, bias, activation="none", out_step=0.0, out_zero_point=0, out_qmin=-128,
                         out_qmax=127):
    """The epilogue of an int8 GEMM; see :func:`maskaq.ops.int8_linear_epilogue`."""
    activation, out_step, zp, qmin, qmax, dtype = check_int8_linear_epilogue_args(
        acc, scale, bias, activation, out_step, out_zero_point, out_qmin, out_qmax)
    y = acc.float() * scale  # two roundings, as the kernels (no fused multiply-add)
    y = y + bias
    if activation == "gelu":
        y = F.gelu(y)
    if dtype == torch.float32:
        return y
    return _requantize(y, out_step, zp, qmin, qmax).to(dtype)


def int8_gemm(input, input_zero_point, weight, scale=None, bias=None):
    """:func:`maskaq.ops.int8_gemm` on unpacked int8 ``weight`` (N, K): the exact accumulators
    Σ_k (input[m, k] − input_zero_point)·weight[n, k] as int32 (computed in int64), or with
    ``scale`` their :func:`int8_linear_epilogue` (bias zero when None)."""
    acc = ((input.long() - int(input_zero_point)) @ weight.long().T).to(torch.int32)
    if scale is None:
        return acc
    return int8_linear_epilogue(acc, scale, torch.zeros_like(scale) if bias is None else bias)


def _int8_magnitude(zero_point: int) -> int:
    return max(abs(-128 - zero_point), abs(127 - zero_point))


def check_int8_attention_args(q, k, v, scale_qk, p_step, p_zero_point, p_qmin, p_qmax, q_zero_point=0,
                              k_zero_point=0, v_zero_point=0):
    """Validates int8_attention's arguments (the kernels check the same); returns them normalized
    as (scale_qk, p_step, p_zero_point, p_qmin, p_qmax, q_zero_point, k_zero_point, v_zero_point)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int8:
            raise TypeError(f"{name} must be an int8 tensor (B, H, N, d), got "
                            f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, H, N, d), got shape {tuple(t.shape)}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"q, k and v must have one shape (B, H, N, d), got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    B, H, N, d = q.shape
    if N < 1 or d < 1:
        raise ValueError(f"q, k, v need N >= 1 tokens and d >= 1 channels, got shape {tuple(q.shape)}")
    scale_qk = _check_finite("scale_qk", scale_qk)
    p_step = _check_finite("p_step", p_step)
    if not p_step > 0:
        raise ValueError(f"p_step must be positive, got {p_step}")
    ints = [_check_int(n, x) for n, x in (("p_zero_point", p_zero_point), ("p_qmin", p_qmin), ("p_qmax", p_qmax),
                                          ("q_zero_point", q_zero_point), ("k_zero_point", k_zero_point),
                                          ("v_zero_point", v_zero_point))]
    p_zero_point, p_qmin, p_qmax, zq, zk, zv = ints
    if not p_qmin < p_qmax:
        raise ValueError(f"p_qmin = {p_qmin} must be below p_qmax = {p_qmax}")
    if p_qmax - p_qmin > 255:
        raise ValueError(f"the P grid [p_qmin, p_qmax] = [{p_qmin}, {p_qmax}] is wider than 8 bits (at most "
                         "256 levels)")
    if any(abs(x) > MAX_QUANT_LEVEL for x in ints):
        raise ValueError(f"zero points and p_qmin/p_qmax must lie in [{-MAX_QUANT_LEVEL}, {MAX_QUANT_LEVEL}], "
                         f"got {ints}")
    score_bound = d * _int8_magnitude(zq) * _int8_magnitude(zk)
    if score_bound > INT32_MAX:
        raise ValueError(f"q·kᵀ could overflow int32: d·max|q − z_q|·max|k − z_k| = {score_bound} > 2^31 − 1")
    p_mag = max(abs(p_qmin - p_zero_point), abs(p_qmax - p_zero_point))
    out_bound = N * p_mag * _int8_magnitude(zv)
    if out_bound > INT32_MAX:
        raise ValueError(f"P·v could overflow int32: N·max|P_q − z_p|·max|v − z_v| = {out_bound} > 2^31 − 1 "
                         f"(N = {N} tokens)")
    return scale_qk, p_step, p_zero_point, p_qmin, p_qmax, zq, zk, zv


def int8_attention(q, k, v, scale_qk, p_step, p_zero_point, p_qmin, p_qmax, q_zero_point=0, k_zero_point=0,
                   v_zero_point=0):
    """Attention on integers; see :func:`maskaq.ops.int8_attention`. The products run in float64
    (exact for every allowed input), the softmax in float32 as the kernels."""
    scale_qk, p_step, zp, p_qmin, p_qmax, zq, zk, zv = check_int8_attention_args(
        q, k, v, scale_qk, p_step, p_zero_point, p_qmin, p_qmax, q_zero_point, k_zero_point, v_zero_point)
    scores = (q.double() - zq) @ (k.double() - zk).transpose(-2, -1)
    probs = torch.softmax(scores.float() * scale_qk, dim=-1)
    p_int = (torch.round(_exact_div(probs, p_step)) + zp).clamp(p_qmin, p_qmax) - zp
    return (p_int.double() @ (v.double() - zv)).float()


def int8_shift(lo: int, hi: int) -> int:
    """The offset o that stores the integers [lo, hi] (at most 256 of them) in int8: 0 where they fit,
    else lo + 128 (e.g. [-127, 128] -> 1); the products then read them with zero point −o."""
    return 0 if (lo >= -128 and hi <= 127) else lo + 128


def check_qkv_int8_attention_args(qkv, scale_qk, p_step, p_zero_point, p_qmin, p_qmax, lo, hi):
    """Validates qkv_int8_attention's arguments (the kernel checks the same); returns (the P arguments
    as check_int8_attention_args normalizes them, lo, hi, shifts) with lo/hi/shifts lists of 3 ints."""
    if not isinstance(qkv, torch.Tensor) or qkv.dtype != torch.float32:
        raise TypeError(f"qkv must be a float32 tensor (B, N, 3, H, d), got "
                        f"{qkv.dtype if isinstance(qkv, torch.Tensor) else type(qkv).__name__}")
    if qkv.dim() != 5:
        raise ValueError(f"qkv must be 5-D (B, N, 3, H, d) float32, got shape {tuple(qkv.shape)}")
    if qkv.shape[2] != 3:
        raise ValueError(f"qkv must be (B, N, 3, H, d) with 3 at dim 2 (q, k, v), got shape {tuple(qkv.shape)}")
    lo, hi = list(lo), list(hi)
    if len(lo) != 3 or len(hi) != 3:
        raise ValueError(f"lo and hi must hold 3 integers (q, k, v), got {len(lo)} and {len(hi)}")
    lo = [_check_int("lo", x) for x in lo]
    hi = [_check_int("hi", x) for x in hi]
    for a, b in zip(lo, hi):
        if a < -MAX_QUANT_LEVEL or b > MAX_QUANT_LEVEL:
            raise ValueError(f"lo and hi must lie in [{-MAX_QUANT_LEVEL}, {MAX_QUANT_LEVEL}], got {a} and {b}")
        if not (a < b and b - a <= 255):
            raise ValueError(f"each range [lo, hi] must hold 2 to 256 integers, got [{a}, {b}]")
    shifts = [int8_shift(a, b) for a, b in zip(lo, hi)]
    B, N, _, H, d = qkv.shape
    probe = qkv.new_empty((B, H, N, d), dtype=torch.int8, device="meta")  # shapes only, for the shared checks
    args = check_int8_attention_args(probe, probe, probe, scale_qk, p_step, p_zero_point, p_qmin, p_qmax,
                                     *(-o for o in shifts))
    return args[:5], lo, hi, shifts


def qkv_int8_attention(qkv, scale_qk, p_step, p_zero_point, p_qmin, p_qmax, lo, hi):
    """int8_attention straight from a folded qkv output; see :func:`maskaq.ops.qkv_int8_attention`."""
    p_args, lo, hi, shifts = check_qkv_int8_attention_args(qkv, scale_qk, p_step, p_zero_point, p_qmin, p_qmax,
                                                           lo, hi)
    B, N, _, H, d = qkv.shape
    operands = []
    for i in range(3):
        t = qkv[:, :, i].round().clamp(lo[i], hi[i]) - shifts[i]  # (B, N, H, d): exact integers in int8
        operands.append(t.permute(0, 2, 1, 3).to(torch.int8))
    out = int8_attention(*operands, *p_args, *(-o for o in shifts))
    return out.transpose(1, 2).reshape(B, N, H * d)
