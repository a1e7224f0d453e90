"""The maskaq ops in plain, vectorized PyTorch: the three training ops, written from docs/method.md
(#the-quantizer, #synthesis), and (from maskaq/reference_integer.py) the two integer-inference ops
(int8 GEMM epilogue, integer attention).

These are the ground truth the compiled kernels (``maskaq._C``, used through
:mod:`maskaq.ops`) are tested against, and the fallback when the extension is missing.
Autograd provides the backward; the fake-quant rounding uses straight-through estimators
and the LSQ step gradients are scaled by ``g = 1 / sqrt(numel(x) * qmax)`` (zero points: unscaled).

The random draws (rows of the entropy, the stochastic drop of the alignment mask) are made
by :func:`draw_row_index` and :func:`draw_keep_rand`, shared with :mod:`maskaq.ops`, so the
extension and the reference see the same randomness for the same generator or seed.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from maskaq.reference_integer import MAX_QUANT_LEVEL

__all__ = [
    "fq_attention",
    "patch_similarity_entropy",
    "masked_attention_align",
    "fake_quantize",
    "lsq_grad_scale",
    "draw_row_index",
    "draw_keep_rand",
    "alignment_mask",
    "int8_linear_epilogue",
    "int8_attention",
    "qkv_int8_attention",
    "int8_gemm",
]

VARIANCE_EPS = 1e-8  # added to the Gram variance before the log
NORM_EPS = 1e-6  # rows are divided by max(||row||, NORM_EPS), as F.normalize(eps=1e-6) in the public code
MASK_EPS = 1e-8  # Σ m + MASK_EPS in the alignment denominator
LOG_TWO_PI_E = math.log(2.0 * math.pi * math.e)


# --------------------------------------------------------------------------------------
# Fake quantization


def lsq_grad_scale(numel: int, qmax: int) -> float:
    """LSQ gradient scale of the step: 1 / sqrt(numel(x) * qmax), as the public code runs
    (docs/method.md#the-quantizer); the zero point's gradient is not scaled."""
    return 1.0 / math.sqrt(numel * qmax) if numel > 0 else 0.0


def _scale_grad(x: torch.Tensor, g: float) -> torch.Tensor:
    """x in the forward, g * grad in the backward (the value stays bit-exact x)."""
    return x.detach() + (x - x.detach()) * g


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) in the forward (half to even, as torch.round; bit-exact, since x − x.detach() is
    exactly 0), identity in the backward."""
    return torch.round(x).detach() + (x - x.detach())


def fake_quantize(x, step, zero_point, qmin: int, qmax: int, grad_scale: float | None = None):
    """LSQ fake quantization x̂ = (round(clamp(x/α + round(z), qmin, qmax)) − round(z))·α.

    Straight-through estimators on both roundings; the gradient of ``step`` (α) is scaled by
    ``grad_scale`` (default: :func:`lsq_grad_scale`), that of ``zero_point`` (z, or None for
    0) is not.
    """
    if grad_scale is None:
        grad_scale = lsq_grad_scale(x.numel(), qmax)
    alpha = _scale_grad(step, grad_scale)
    z = _round_ste(zero_point) if zero_point is not None else 0.0
    t = x / alpha + z
    # Clamp with the gradient passed on the closed range [qmin, qmax], as the kernels and the
    # module quantizer do (torch.clamp passes none at the bounds themselves).
    inside = (t >= qmin) & (t <= qmax)
    t = torch.where(inside, t, t.detach().clamp(qmin, qmax))
    return (_round_ste(t) - z) * alpha


# --------------------------------------------------------------------------------------
# Argument checks shared by the reference and maskaq.ops (same errors on both paths)


def _check_float_4d(name: str, t, layout: str):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {layout}, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
    if t.dim() != 4:
        raise ValueError(f"{name} must be 4-D {layout}, got shape {tuple(t.shape)}")


def _int_list(name: str, values) -> list[int]:
    if values is None or isinstance(values, (str, bytes)) or not isinstance(values, Sequence | torch.Tensor):
        raise ValueError(f"{name} must be a sequence of 4 ints (q, k, p, v) when step is given, got {values!r}")
    out = [int(v) for v in (values.tolist() if isinstance(values, torch.Tensor) else values)]
    if len(out) != 4:
        raise ValueError(f"{name} must hold 4 ints (q, k, p, v), got {len(out)}: {out}")
    return out


def _check_steps_usable(step: torch.Tensor) -> None:
    bad = ~(torch.isfinite(step) & (step > 0))
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"step[{i}] = {float(step[i])} must be finite and positive (q, k, p, v steps)")


def check_fq_attention_args(q, k, v, step, zero_point, qmin, qmax, scale):
    """Validates the arguments of fq_attention; returns (qmin, qmax, scale) normalized."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_float_4d(name, t, "(B, H, N, d)")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"q, k and v must have one shape (B, H, N, d), got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[2] < 1 or q.shape[3] < 1:
        raise ValueError(f"q, k, v need N >= 1 tokens and d >= 1 channels, got shape {tuple(q.shape)}")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    if step is None:
        if zero_point is not None:
            raise ValueError("zero_point was given without step; full-precision attention takes "
                             "neither, quantized attention needs step")
        return [], [], scale
    for name, t in (("step", step), ("zero_point", zero_point)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating torch.Tensor of 4 (q, k, p, v), got {t!r}")
        if t.shape != (4,):
            raise ValueError(f"{name} must be a 1-D tensor of 4 (q, k, p, v), got shape {tuple(t.shape)}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; move it with .to(q.device)")
    qmin, qmax = _int_list("qmin", qmin), _int_list("qmax", qmax)
    for i, (lo, hi) in enumerate(zip(qmin, qmax)):
        if not lo < hi:
            raise ValueError(f"qmin[{i}] = {lo} must be below qmax[{i}] = {hi}")
        if hi <= 0:
            raise ValueError(f"qmax[{i}] = {hi} must be positive (the LSQ gradient scale divides by sqrt(qmax))")
        if lo < -MAX_QUANT_LEVEL or hi > MAX_QUANT_LEVEL:
            raise ValueError(f"qmin/qmax[{i}] must lie in [{-MAX_QUANT_LEVEL}, {MAX_QUANT_LEVEL}]")
    return qmin, qmax, scale


# --------------------------------------------------------------------------------------
# fq_attention


def fq_attention(q, k, v, *, step=None, zero_point=None, qmin=None, qmax=None, scale=None,
                 return_logits=False):
    """Attention with LSQ fake-quantized operands; see :func:`maskaq.ops.fq_attention`.

    Returns ``(out, logits)``: out = FQ(P)·FQ(v) with P = softmax(logits·scale) and
    logits = FQ(q)·FQ(k)ᵀ (unscaled), or ``(out, None)`` without ``return_logits``.
    ``step=None`` is full precision (no quantizer).
    """
    qmin, qmax, scale = check_fq_attention_args(q, k, v, step, zero_point, qmin, qmax, scale)
    quant = step is not None
    if quant and step.device.type == "cpu":  # as the CPU kernel (a CUDA check would sync per call)
        _check_steps_usable(step)

    def fq(x, i):
        z = zero_point[i] if zero_point is not None else None
        return fake_quantize(x, step[i], z, qmin[i], qmax[i])

    qh, kh = (fq(q, 0), fq(k, 1)) if quant else (q, k)
    # Products, softmax and P̂ in float32 (float64 stays float64), as the CUDA kernel computes
    # them: |q̂·k̂ᵀ| above 65504 would overflow float16 into inf and a NaN row. Autocast is off
    # here because it would cast the products back to float16 / bfloat16.
    compute = torch.promote_types(q.dtype, torch.float32)
    with torch.autocast(q.device.type, enabled=False):
        logits = qh.to(compute) @ kh.to(compute).transpose(-2, -1)
        p = torch.softmax(logits * scale, dim=-1)
        if quant:
            p, v = fq(p, 2), fq(v, 3)
        out = (p @ v.to(compute)).to(q.dtype)
    return out, (logits.to(q.dtype) if return_logits else None)


# --------------------------------------------------------------------------------------
# Patch-similarity entropy


def _generator_device(generator, device):
    return generator.device if generator is not None else torch.device(device)


def draw_row_index(batch: int, num_patches: int, num_rows: int, *, generator=None, device="cpu"):
    """(batch, R) int64 row indices into the patch block, R = min(num_rows, num_patches):
    a random subset of rows per sample (without replacement), or all rows in order when
    num_patches <= num_rows. Drawn on the generator's device, returned on ``device``."""
    if num_rows < 1:
        raise ValueError(f"num_rows must be >= 1, got {num_rows}")
    if num_patches <= num_rows:
        return torch.arange(num_patches, device=device).expand(batch, -1).contiguous()
    keys = torch.rand(batch, num_patches, generator=generator, device=_generator_device(generator, device))
    # the num_rows smallest keys: a uniform subset (its order is irrelevant to the entropy)
    rows = keys.topk(num_rows, dim=1, largest=False, sorted=False).indices
    return rows.to(device).contiguous()


# MimiQ's SSIM constants (docs/method.md#synthesis)
SSIM_C1 = 0.01 ** 2
SSIM_C2 = 0.03 ** 2


def check_ssim_args(logits, num_prefix_tokens):
    """Validates the arguments of inter_head_ssim."""
    check_entropy_args(logits, num_prefix_tokens, 1, None)


def key_map_statistics(logits, num_prefix_tokens=1):
    """Per query patch and head, statistics of the key map r = logits[b, h, P + n, P:] (M keys):
    ``(gram, mean, lo, hi)`` with gram (B, M, H, H) the head Gram of the centred maps
    Σ_k (r_h1 − r̄_h1)(r_h2 − r̄_h2)/M, and mean, min and max (B, M, H)."""
    p = int(num_prefix_tokens)
    keys = logits[:, :, p:, p:].transpose(1, 2)  # (B, M, H, M): query n, head h, key k
    mean = keys.mean(dim=-1)
    centred = keys - mean.unsqueeze(-1)
    gram = centred @ centred.transpose(-1, -2) / keys.shape[-1]
    return gram, mean, keys.min(dim=-1).values, keys.max(dim=-1).values


def ssim_from_statistics(gram, mean, lo, hi, c1=SSIM_C1, c2=SSIM_C2):
    """1 − SSIM² of every ordered pair of min-max normalized key maps, (B, M, H, H), from their
    statistics (``key_map_statistics``): x = (r − min r)/s, s = max r − min r + 1e-8, is affine
    in r, so μ = (r̄ − min r)/s and σ_ij = G_ij/(s_i s_j)."""
    s = hi - lo + 1e-8
    mu = (mean - lo) / s
    cov = gram / (s.unsqueeze(-1) * s.unsqueeze(-2))
    var = cov.diagonal(dim1=-2, dim2=-1)
    mu_sq = mu * mu
    ssim = ((2 * mu.unsqueeze(-1) * mu.unsqueeze(-2) + c1) * (2 * cov + c2)) / (
        (mu_sq.unsqueeze(-1) + mu_sq.unsqueeze(-2) + c1) * (var.unsqueeze(-1) + var.unsqueeze(-2) + c2))
    return 1.0 - ssim * ssim


def inter_head_ssim(logits, num_prefix_tokens=1, c1=SSIM_C1, c2=SSIM_C2):
    """MimiQ's inter-head SSIM loss of one block, per sample: the mean over query patches and
    ordered head pairs of 1 − SSIM² of the min-max normalized key maps, (B,)."""
    check_ssim_args(logits, num_prefix_tokens)
    return ssim_from_statistics(*key_map_statistics(logits, num_prefix_tokens), c1, c2).mean(dim=(1, 2, 3))


def check_entropy_args(logits, num_prefix_tokens, num_rows, row_index):
    """Validates the arguments of patch_similarity_entropy; returns the patch count N'."""
    _check_float_4d("logits", logits, "(B, H, N, N)")
    B, H, N, N2 = logits.shape
    if N != N2:
        raise ValueError(f"logits must be square attention logits (B, H, N, N), got shape {tuple(logits.shape)}")
    if H < 1:
        raise ValueError(f"logits need at least one head, got shape {tuple(logits.shape)}")
    if not 0 <= int(num_prefix_tokens) < N:
        raise ValueError(f"num_prefix_tokens must lie in [0, N) with N = {N}, got {num_prefix_tokens}")
    if row_index is None:
        if int(num_rows) < 1:
            raise ValueError(f"num_rows must be >= 1, got {num_rows}")
    else:
        if not isinstance(row_index, torch.Tensor) or row_index.dtype != torch.int64:
            raise TypeError(f"row_index must be an int64 tensor (B, R), got {getattr(row_index, 'dtype', row_index)}")
        if row_index.dim() != 2 or row_index.shape[0] != B or row_index.shape[1] < 1:
            raise ValueError(f"row_index must have shape (B, R) with B = {B}, R >= 1, got {tuple(row_index.shape)}")
        if row_index.device != logits.device:
            raise ValueError(f"row_index is on {row_index.device} but logits on {logits.device}; "
                             "move it with .to(logits.device)")
    return N - int(num_prefix_tokens)


def patch_similarity_entropy(logits, *, num_prefix_tokens=1, num_rows=64, generator=None, row_index=None):
    """Gaussian differential entropy of patch similarity, per sample; see
    :func:`maskaq.ops.patch_similarity_entropy`. Returns h, shape (B,)."""
    num_patches = check_entropy_args(logits, num_prefix_tokens, num_rows, row_index)
    P = int(num_prefix_tokens)
    B = logits.shape[0]
    if row_index is None:
        row_index = draw_row_index(B, num_patches, int(num_rows), generator=generator, device=logits.device)
    elif row_index.numel() and (row_index.min() < 0 or row_index.max() >= num_patches):
        raise IndexError(f"row_index values must lie in [0, {num_patches}) (rows of the patch block), "
                         f"got range [{int(row_index.min())}, {int(row_index.max())}]")
    patches = logits.mean(dim=1)[:, P:, P:]  # (B, N', N') head mean without the prefix tokens
    rows = patches.gather(1, row_index[..., None].expand(-1, -1, num_patches))  # (B, R, N')
    rows = F.normalize(rows, p=2, dim=-1, eps=NORM_EPS)
    gram = rows @ rows.transpose(1, 2)  # cosine similarities (B, R, R)
    var = gram.flatten(1).var(dim=1, unbiased=False) + VARIANCE_EPS
    return 0.5 * (LOG_TWO_PI_E + torch.log(var))


# --------------------------------------------------------------------------------------
# Masked attention alignment


def draw_keep_rand(batch: int, num_keys: int, *, generator=None, seed=None, device="cpu"):
    """(batch, num_keys) float32 uniform [0, 1) draws for the stochastic drop, from
    ``generator``, else a generator on ``device`` seeded with ``seed``, else the global RNG."""
    if generator is not None and seed is not None:
        raise ValueError("pass either generator or seed, not both")
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(int(seed))
    r = torch.rand(batch, num_keys, generator=generator, device=_generator_device(generator, device))
    return r.to(device)


def alignment_counts(num_keys: int, ratio: float, keep: float) -> tuple[int, int]:
    """(k, kept): k = max(1, floor(M·ratio)) top keys, of which max(1, round(keep·k)) are kept
    (round half to even, as Python's round() in the public code: 10 of 15 at keep 0.7)."""
    k = min(num_keys, max(1, math.floor(num_keys * ratio)))
    return k, min(k, max(1, round(keep * k)))


def alignment_mask(score, rand, ratio: float, keep: float):
    """Binary mask (B, M) in score's dtype: the top-k keys of ``score`` per sample, of which
    the ones with the smallest ``rand`` are kept. Ties go to the lower index (stable sorts)."""
    B, M = score.shape
    k, kept = alignment_counts(M, ratio, keep)
    top = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :k]
    key = torch.full((B, M), math.inf, dtype=torch.float64, device=score.device)
    key.scatter_(1, top, rand.to(torch.float64).gather(1, top))
    survivors = torch.sort(key, dim=1, stable=True).indices[:, :kept]
    return torch.zeros_like(score).scatter_(1, survivors, 1.0)


def check_align_args(cls_t, cls_q, ratio, keep, rand):
    _check_float_4d("cls_t", cls_t, "(L, B, H, M)")
    _check_float_4d("cls_q", cls_q, "(L, B, H, M)")
    if cls_t.shape != cls_q.shape:
        raise ValueError(f"cls_t and cls_q must have one shape (L, B, H, M), got {tuple(cls_t.shape)} "
                         f"and {tuple(cls_q.shape)}")
    if cls_t.dtype != cls_q.dtype:
        raise TypeError(f"cls_t and cls_q must have one dtype, got {cls_t.dtype} and {cls_q.dtype}")
    L, B, H, M = cls_t.shape
    if L < 1 or H < 1 or M < 1:
        raise ValueError(f"cls_t needs L >= 1 blocks, H >= 1 heads, M >= 1 keys, got {tuple(cls_t.shape)}")
    if not 0 < float(ratio) <= 1:
        raise ValueError(f"ratio (the top-k fraction) must lie in (0, 1], got {ratio}")
    if not 0 < float(keep) <= 1:
        raise ValueError(f"keep (the kept fraction of the top-k) must lie in (0, 1], got {keep}")
    if rand is not None:
        if not isinstance(rand, torch.Tensor) or not rand.is_floating_point():
            raise TypeError(f"rand must be a floating tensor (B, M) of uniform draws, got {rand!r}")
        if rand.shape != (B, M):
            raise ValueError(f"rand must have shape (B, M) = ({B}, {M}), got {tuple(rand.shape)}")
        if rand.device != cls_t.device:
            raise ValueError(f"rand is on {rand.device} but cls_t on {cls_t.device}; move it with .to(cls_t.device)")
        if rand.device.type == "cpu" and not torch.isfinite(rand).all():  # as the kernels (no CUDA sync here)
            raise ValueError(f"rand must hold finite uniform draws, got {rand[~torch.isfinite(rand)][0].item()}")


def masked_attention_align(cls_t, cls_q, *, ratio, keep=0.7, generator=None, seed=None, rand=None):
    """Masked attention alignment loss; see :func:`maskaq.ops.masked_attention_align`.
    Returns ``(loss, mask)``; the gradient flows to both ``cls_t`` and ``cls_q`` (the mask is a
    constant), as in the public code."""
    check_align_args(cls_t, cls_q, ratio, keep, rand)
    L, B, H, M = cls_t.shape
    if rand is None:
        rand = draw_keep_rand(B, M, generator=generator, seed=seed, device=cls_t.device)
    with torch.no_grad():
        mask = alignment_mask(cls_t.detach().mean(dim=(0, 2)), rand, float(ratio), float(keep))
    diff = cls_t.mean(dim=2) - cls_q.mean(dim=2)  # (L, B, M)
    per_block = (diff.abs() * mask).sum(dim=(1, 2)) / (mask.sum() + MASK_EPS)
    return per_block.mean(), mask


# The integer-inference references live in maskaq/reference_integer.py; they are part of this
# module's namespace too (maskaq.reference.int8_attention, ...).
from maskaq.reference_integer import (  # noqa: E402,F401
    ACTIVATIONS,
    INT32_MAX,
    check_int8_attention_args,
    check_int8_linear_epilogue_args,
    check_qkv_int8_attention_args,
    epilogue_out_dtype,
    int8_attention,
    int8_gemm,
    int8_linear_epilogue,
    qkv_int8_attention,
)
