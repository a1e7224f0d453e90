"""The public maskaq ops: fused C++/CUDA kernels (``torch.ops.maskaq.*``) with autograd.

Each function validates its arguments, draws its randomness (from the given generator or
seed; the compiled ops themselves are deterministic) and calls the kernel. Where the
extension cannot run the call (not built, or a device/dtype it has no kernel for: the CPU
kernels take float32/float64, the CUDA kernels float32/float16/bfloat16) the plain-PyTorch
reference in :mod:`maskaq.reference` computes the same result (the loader warns once when
the extension is missing, or when a GPU's compute capability has no code in the build).

Fake (meta) kernels are registered for every op, so they trace under torch.compile, and
autograd for lsq_fake_quant and the three training ops (their backward calls the ``*_backward`` ops). The
integer-inference ops (:func:`int8_linear_epilogue`, :func:`int8_attention`, :func:`qkv_int8_attention`,
:func:`int8_gemm`) have no autograd.
"""
from __future__ import annotations

import torch

from maskaq import _extension, reference
from maskaq.reference import (
    check_align_args,
    check_entropy_args,
    check_fq_attention_args,
    check_int8_attention_args,
    check_int8_linear_epilogue_args,
    check_qkv_int8_attention_args,
    draw_keep_rand,
    draw_row_index,
    epilogue_out_dtype,
)

__all__ = ["fq_attention", "lsq_fake_quant", "patch_similarity_entropy", "inter_head_ssim",
           "masked_attention_align",
           "int8_linear_epilogue", "int8_attention", "qkv_int8_attention", "int8_gemm_pack", "int8_gemm",
           "uses_extension", "integer_kernels_available"]

_KERNEL_DTYPES = {
    "cpu": (torch.float32, torch.float64),
    "cuda": (torch.float32, torch.float16, torch.bfloat16),
}
# dtypes the CPU kernels take widened to float32 (the CUDA kernels read them as they are)
_CPU_UPCAST = (torch.bfloat16, torch.float16)


def widened_for_cpu(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a CPU kernel takes it: bfloat16 / float16 widened to float32 (exact), else as it is."""
    return t.float() if t.dtype in _CPU_UPCAST else t


def uses_extension(t: torch.Tensor) -> bool:
    """Whether a call with inputs like ``t`` runs the compiled kernel (else the reference)."""
    if not _extension.loaded():
        return False
    kind = t.device.type
    if kind == "cuda" and not _cuda_kernels(t.device):
        return False
    return t.dtype in _KERNEL_DTYPES.get(kind, ())


def _cuda_kernels(device) -> bool:
    """The extension has CUDA kernels and they run on this GPU's compute capability."""
    return _extension.extension_info()["with_cuda"] and _extension.cuda_kernels_run_on(torch.device(device))


def integer_kernels_available(device) -> bool:
    """Whether int8_linear_epilogue / int8_attention run compiled kernels on ``device`` (CPU: the
    extension is loaded; CUDA: it was also built with CUDA kernels for this GPU), else the reference."""
    if not _extension.loaded():
        return False
    kind = torch.device(device).type
    return kind == "cpu" or (kind == "cuda" and _cuda_kernels(device))


# --------------------------------------------------------------------------------------
# Public functions


def fq_attention(q, k, v, *, step=None, zero_point=None, qmin=None, qmax=None, scale=None,
                 return_logits=False):
    """Attention with LSQ fake-quantized operands (MaskAQ student) or in full precision.

    Args:
        q, k, v: (B, H, N, d) tensors of one dtype. On the CPU they are read where they lie when
            each row of d values is contiguous (the q, k, v views of timm's fused qkv projection
            need no copy); otherwise, and on CUDA, they are made contiguous here. bfloat16 and
            float16 run the float32 CPU kernel on upcast copies; out and logits come back in
            the input dtype.
        step: None for full precision (the teacher), else a 1-D tensor of 4 LSQ steps α in
            the order (q, k, p, v); receives LSQ gradients scaled by 1/sqrt(numel·qmax).
        zero_point: optional 1-D tensor of 4 LSQ zero points z (same order), learnable
            (gradient not scaled, as the public code runs).
        qmin, qmax: sequences of 4 ints, the integer range of each quantizer (needed with step).
        scale: softmax scale, default d ** -0.5.
        return_logits: also return the unscaled logits q̂·k̂ᵀ, (B, H, N, N).

    Fake quant: x̂ = (round(clamp(x/α + round(z), qmin, qmax)) − round(z))·α with
    straight-through rounding. out = P̂·v̂ with P = softmax(logits·scale).

    Returns:
        (out (B, H, N, d), logits or None).
    """
    qmin, qmax, scale = check_fq_attention_args(q, k, v, step, zero_point, qmin, qmax, scale)
    if q.dtype in _CPU_UPCAST and q.device.type == "cpu" and _extension.loaded():
        # bf16 / fp16 (autocast) on the CPU: the float32 kernel on the upcast operands, which is
        # what the reference computes after its fake quant (products, softmax and P̂ in float32)
        out, logits = fq_attention(q.float(), k.float(), v.float(), step=step, zero_point=zero_point,
                                   qmin=qmin or None, qmax=qmax or None, scale=scale,
                                   return_logits=return_logits)
        return out.to(q.dtype), (logits.to(q.dtype) if return_logits else None)
    if not uses_extension(q):
        return reference.fq_attention(q, k, v, step=step, zero_point=zero_point, qmin=qmin or None,
                                      qmax=qmax or None, scale=scale, return_logits=return_logits)
    q, k, v = (_attention_operand(t) for t in (q, k, v))
    out, logits = torch.ops.maskaq.fq_attention(q, k, v, step, zero_point, qmin, qmax, scale, bool(return_logits))
    return out, (logits if return_logits else None)


def lsq_fake_quant(x, step, zero_point, qmin, qmax):
    """LSQ fake quantization of ``x`` on a fixed per-tensor grid (a frozen student's activation):
    x̂ = (round(clamp(x/α + round(z), qmin, qmax)) − round(z))·α, one pass forward and one backward
    on the CPU (the same bits as maskaq.quant's composition of PyTorch ops, which makes six each way).

    Args:
        x: float32 or float64 tensor (CUDA and other dtypes run the reference).
        step, zero_point: one-element tensors α and z (cast to x's dtype). They get no gradient:
            a grid being learned (QAT) goes through :func:`maskaq.quant.lsq_fake_quant`.
        qmin, qmax: the integer range.

    The gradient of x is the straight-through one: grad where qmin ≤ x/α + round(z) ≤ qmax, else 0.
    Raises ValueError where step or zero_point requires grad while grad mode is on.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"x must be a floating-point tensor, got {got}")
    for name, t in (("step", step), ("zero_point", zero_point)):
        if not isinstance(t, torch.Tensor) or t.numel() != 1:
            raise ValueError(f"{name} must be a one-element tensor (a per-tensor grid), got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if torch.is_grad_enabled() and (step.requires_grad or zero_point.requires_grad):
        raise ValueError("lsq_fake_quant gives step and zero_point no gradient; for a grid being learned "
                         "use maskaq.quant.lsq_fake_quant")
    qmin, qmax = int(qmin), int(qmax)
    if not qmin < qmax:
        raise ValueError(f"qmin = {qmin} must be below qmax = {qmax}")
    if x.device.type != "cpu" or not uses_extension(x):
        return reference.fake_quantize(x, step.to(x.dtype), zero_point.to(x.dtype), qmin, qmax)
    return torch.ops.maskaq.lsq_fake_quant(x.contiguous(), step.detach().to(x.dtype).reshape(1),
                                           zero_point.detach().to(x.dtype).reshape(1), qmin, qmax)


def _attention_operand(t):
    """q, k or v as the kernel reads it: the CPU kernel takes any strides but a contiguous last dim."""
    if t.device.type == "cpu" and (t.stride(-1) == 1 or t.shape[-1] <= 1):
        return t
    return t.contiguous()


def patch_similarity_entropy(logits, *, num_prefix_tokens=1, num_rows=64, generator=None, row_index=None):
    """Gaussian differential entropy of patch similarity, per sample (MaskAQ's L_ent = −h.mean()).

    Per sample: the head mean of ``logits`` without the ``num_prefix_tokens`` prefix rows and
    columns (N' x N'), ``num_rows`` rows picked at random (all if N' <= num_rows), each
    L2-normalized; G = their cosine Gram matrix; h = ½·log(2πe·(Var(G) + 1e-8)) with the
    biased variance over all entries of G.

    Args:
        logits: (B, H, N, N) unscaled attention logits (Swin: window logits (B·nW, H, N, N)
            with ``num_prefix_tokens=0``).
        num_prefix_tokens: CLS / distillation / register tokens in front of the patches.
        num_rows: rows of the patch block sampled per sample.
        generator: torch.Generator for the row draw (any device).
        row_index: explicit (B, R) int64 rows in [0, N - num_prefix_tokens) instead of a draw.

    Returns:
        h, shape (B,), in the dtype of ``logits``. h depends on ``logits`` only through their
        head mean, so its gradient is the same for every head; the CPU kernel returns it as one
        head's values expanded over the heads (stride 0), as autograd does for a sum.
    """
    num_patches = check_entropy_args(logits, num_prefix_tokens, num_rows, row_index)
    if row_index is None:
        row_index = draw_row_index(logits.shape[0], num_patches, int(num_rows), generator=generator,
                                   device=logits.device)
    if not uses_extension(logits):
        return reference.patch_similarity_entropy(logits, num_prefix_tokens=num_prefix_tokens,
                                                  row_index=row_index)
    return torch.ops.maskaq.patch_similarity_entropy(logits.contiguous(), row_index.contiguous(),
                                                     int(num_prefix_tokens))


def inter_head_ssim(logits, *, num_prefix_tokens=1, c1=reference.SSIM_C1, c2=reference.SSIM_C2):
    """MimiQ's inter-head SSIM loss of one block, per sample (L_ssim is the mean over blocks of its
    mean; docs/method.md#synthesis).

    For every query patch, each head's key map r = logits[b, h, P + n, P:] over the M patch keys
    is min-max normalized, x = (r − min r)/(max r − min r + 1e-8); every ordered pair of heads (self
    pairs included) is compared with global statistics, SSIM = (2μ_i μ_j + c1)(2σ_ij + c2) /
    ((μ_i² + μ_j² + c1)(σ_i² + σ_j² + c2)), and the result is the mean of 1 − SSIM².

    Args:
        logits: (B, H, N, N) attention logits.
        num_prefix_tokens: CLS / distillation / register tokens P in front of the patches.
        c1, c2: the SSIM constants (MimiQ's 0.01² and 0.03²).

    Returns:
        (B,) in the dtype of ``logits``. On the CPU one fused pass each way (sums in double; the
        backward recomputes the statistics from the logits instead of keeping logits-sized
        copies); elsewhere the reference's composition.
    """
    reference.check_ssim_args(logits, num_prefix_tokens)
    if logits.device.type != "cpu" or not uses_extension(logits):
        return reference.inter_head_ssim(logits, num_prefix_tokens, c1, c2)
    return torch.ops.maskaq.inter_head_ssim(logits.contiguous(), int(num_prefix_tokens), float(c1), float(c2))


def masked_attention_align(cls_t, cls_q, *, ratio, keep=0.7, generator=None, seed=None, rand=None):
    """Masked attention alignment (MaskAQ's L_align) of student CLS-row logits to the teacher's.

    The mask comes from the teacher: c = mean over blocks and heads of ``cls_t`` (B, M);
    the k = max(1, floor(M·ratio)) top keys of c per sample, of which the
    max(1, round(keep·k)) (half to even) with the smallest uniform draw survive (stochastic drop).
    loss = mean over blocks l of Σ_{b,i} |mean_h cls_t[l] − mean_h cls_q[l]|·m / (Σ m + 1e-8).

    Args:
        cls_t, cls_q: (L, B, H, M) CLS-row logits A_l[:, :, 0, P:] of every block, stacked,
            of the teacher and the student. The gradient flows to both (docs/method.md#synthesis:
            the public code detaches neither side; only the mask is a constant). The two are exact
            negatives of each other, so the backward kernel computes the student's once.
        ratio: the top-k fraction r in (0, 1] (MaskAQ anneals 0.5 -> 0.1).
        keep: the kept fraction of the top-k (0.7).
        generator / seed: randomness of the drop (a seed makes a generator on the inputs' device).
        rand: explicit (B, M) uniform [0, 1) draws instead.

    Returns:
        (loss 0-dim, mask (B, M) of 0/1 in the inputs' dtype). The gradient is the same for
        every head; the CPU kernel returns it expanded over the heads (stride 0).
    """
    check_align_args(cls_t, cls_q, ratio, keep, rand)
    if rand is None:
        rand = draw_keep_rand(cls_t.shape[1], cls_t.shape[3], generator=generator, seed=seed,
                              device=cls_t.device)
    if not uses_extension(cls_t):
        return reference.masked_attention_align(cls_t, cls_q, ratio=ratio, keep=keep, rand=rand)
    return torch.ops.maskaq.masked_attention_align(cls_t.contiguous(), cls_q.contiguous(),
                                                   rand.contiguous(), float(ratio), float(keep))


def int8_linear_epilogue(acc, scale, bias, activation="none", out_step=0.0, out_zero_point=0, out_qmin=-128,
                         out_qmax=127):
    """The epilogue of an int8 GEMM in one pass: dequantize, bias, optional GELU, optional requantize.

    Args:
        acc: (M, N) int32 accumulators (e.g. ``torch._int_mm``'s output); made contiguous here.
        scale, bias: (N,) float32, per output channel.
        activation: "none" or "gelu" (erf GELU, as ``nn.GELU()``).
        out_step: <= 0 returns float32 y = act(acc·scale + bias); > 0 requantizes y to
            u = clamp(round(y / out_step) + out_zero_point, out_qmin, out_qmax) (exact division,
            round half to even, NaN -> out_qmin).
        out_zero_point, out_qmin, out_qmax: the output grid (with out_step > 0). The result is
            uint8 when [out_qmin, out_qmax] lies in [0, 255], else int8 (it must lie in [-128, 127]).

    Returns:
        (M, N) float32, uint8 or int8.
    """
    activation, out_step, zp, qmin, qmax, _ = check_int8_linear_epilogue_args(
        acc, scale, bias, activation, out_step, out_zero_point, out_qmin, out_qmax)
    if not integer_kernels_available(acc.device):
        return reference.int8_linear_epilogue(acc, scale, bias, activation, out_step, zp, qmin, qmax)
    return torch.ops.maskaq.int8_linear_epilogue(acc.contiguous(), scale.contiguous(), bias.contiguous(),
                                                 activation, out_step, zp, qmin, qmax)


def int8_attention(q, k, v, scale_qk, p_step, p_zero_point, p_qmin, p_qmax, q_zero_point=0, k_zero_point=0,
                   v_zero_point=0):
    """Attention on integer operands, as maskaq.integer.IntAttention runs it (inference only).

    Args:
        q, k, v: (B, H, N, d) int8 (made contiguous here). The integers of the products are
            q − q_zero_point, k − k_zero_point, v − v_zero_point (zero points default to 0), so
            grids that do not fit int8 once centred (e.g. [-127, 128]) are passed shifted.
        scale_qk: the softmax scale of the integer logits (α_q·α_k·d^-½ for IntAttention).
        p_step, p_zero_point, p_qmin, p_qmax: P's grid (at most 256 levels).

    S = q̃·k̃ᵀ exactly (int32; on CUDA on int8 tensor cores), P = softmax(float(S)·scale_qk) in
    float32, P̃ = clamp(round(P / p_step) + p_zero_point, p_qmin, p_qmax) − p_zero_point,
    O = P̃·ṽ exactly (int32).

    Returns:
        O as float32 (B, H, N, d); the caller folds the remaining scale α_p·α_v.
    """
    args = check_int8_attention_args(q, k, v, scale_qk, p_step, p_zero_point, p_qmin, p_qmax, q_zero_point,
                                     k_zero_point, v_zero_point)
    if not integer_kernels_available(q.device):
        return reference.int8_attention(q, k, v, *args)
    return torch.ops.maskaq.int8_attention(q.contiguous(), k.contiguous(), v.contiguous(), *args)


def qkv_int8_attention(qkv, scale_qk, p_step, p_zero_point, p_qmin, p_qmax, lo, hi):
    """:func:`int8_attention` straight from the output of a folded qkv projection (IntAttention on
    the CPU): the rounding, clamping and packing of q, k, v and both products in one op.

    Args:
        qkv: (B, N, 3, H, d) float32, contiguous: x/α of q, k and v (each slice divided by its step).
        scale_qk, p_step, p_zero_point, p_qmin, p_qmax: as for :func:`int8_attention`.
        lo, hi: 3 ints each, the range of the integers q − z_q, k − z_k, v − z_v (qmin − z, qmax − z
            of each grid; at most 256 values).

    The integers are clamp(round(x/α), lo, hi) (round half to even, as torch.round); each range is
    stored in int8 shifted where it does not fit (see :func:`maskaq.reference.int8_shift`).

    Returns:
        O as float32 (B, N, H·d), the layout the output projection reads (int8_attention's O with
        heads and tokens swapped).
    """
    check_qkv_int8_attention_args(qkv, scale_qk, p_step, p_zero_point, p_qmin, p_qmax, lo, hi)
    if qkv.device.type != "cpu" or not integer_kernels_available(qkv.device):
        return reference.qkv_int8_attention(qkv, scale_qk, p_step, p_zero_point, p_qmin, p_qmax, lo, hi)
    return torch.ops.maskaq.qkv_int8_attention(qkv.contiguous(), float(scale_qk), float(p_step), int(p_zero_point),
                                               int(p_qmin), int(p_qmax), [int(x) for x in lo], [int(x) for x in hi])


def int8_gemm_pack(weight):
    """Packs int8 weights (out_features, in_features) for :func:`int8_gemm` (CPU, extension only)."""
    _require_extension("int8_gemm_pack")
    return torch.ops.maskaq.int8_gemm_pack(weight)


def int8_gemm(input, input_zero_point, packed_weight, out_features, scale=None, bias=None):
    """Exact uint8 × int8 GEMM on the CPU, for x86 CPUs whose int8 libraries saturate (no VNNI).

    Args:
        input: (M, in_features) uint8 activations u.
        input_zero_point: int z; the GEMM multiplies u − z (an int16: |u − z| <= 32767).
        packed_weight: :func:`int8_gemm_pack` of the int8 weights W (out_features, in_features).
        out_features: N, the rows of W.
        scale, bias: optional (N,) float32. With ``scale`` the GEMM returns float32
            acc·scale + bias (bias optional), as :func:`int8_linear_epilogue` would from the
            accumulators, computed on each finished tile instead of in a second pass.

    Returns:
        (M, N) int32 accumulators acc = Σ_k (u[m, k] − z)·W[n, k], exact (the operands are multiplied
        as int16 with int32 pair sums, AVX2's ``vpmaddwd``; a portable loop where ATen's CPU
        capability is below AVX2), or float32 with ``scale``. Raises ValueError where the
        accumulators could overflow int32.
    """
    _require_extension("int8_gemm")
    return torch.ops.maskaq.int8_gemm(input, int(input_zero_point), packed_weight, int(out_features), scale, bias)


def _require_extension(name):
    if not _extension.loaded():
        raise RuntimeError(f"{name} needs the compiled extension maskaq._C, which is not loaded; reinstall with "
                           "`pip install --no-build-isolation -e .`")


# --------------------------------------------------------------------------------------
# Fake kernels and autograd (only when the compiled ops exist)


def _fq_attention_fake(q, k, v, step, zero_point, qmin, qmax, scale, return_logits):
    B, H, N, _ = q.shape
    logits = q.new_empty((B, H, N, N)) if return_logits else q.new_empty((0,))
    return q.new_empty(q.shape), logits


def _fq_attention_backward_fake(grad_out, grad_logits, q, k, v, step, zero_point, qmin, qmax, scale):
    gstep = step.new_empty((4,)) if step is not None else q.new_empty((0,))
    gzp = zero_point.new_empty((4,)) if (step is not None and zero_point is not None) else q.new_empty((0,))
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), gstep, gzp


def _entropy_fake(logits, row_index, num_prefix_tokens):
    return logits.new_empty((logits.shape[0],))


def _head_shared_fake(like, head_dim):
    """An empty gradient shaped like ``like``: on the CPU one head's worth expanded over the heads
    (stride 0 in ``head_dim``), as the CPU kernels return it; dense elsewhere."""
    if like.device.type != "cpu":
        return like.new_empty(like.shape)
    shape = list(like.shape)
    shape[head_dim] = 1
    return like.new_empty(shape).expand(like.shape)


def _entropy_backward_fake(grad, logits, row_index, num_prefix_tokens):
    return _head_shared_fake(logits, 1)


def _align_fake(cls_t, cls_q, rand, ratio, keep):
    return cls_t.new_empty(()), cls_t.new_empty((cls_t.shape[1], cls_t.shape[3]))


def _align_backward_fake(grad, cls_t, cls_q, mask):
    return _head_shared_fake(cls_q, 2)


def _int8_linear_epilogue_fake(acc, scale, bias, activation, out_step, out_zero_point, out_qmin, out_qmax):
    return acc.new_empty(acc.shape, dtype=epilogue_out_dtype(out_step, out_qmin, out_qmax))


def _int8_attention_fake(q, k, v, scale_qk, p_step, p_zero_point, p_qmin, p_qmax, q_zero_point=0,
                         k_zero_point=0, v_zero_point=0):
    return q.new_empty(q.shape, dtype=torch.float32)


def _qkv_int8_attention_fake(qkv, scale_qk, p_step, p_zero_point, p_qmin, p_qmax, lo, hi):
    B, N, _, H, d = qkv.shape
    return qkv.new_empty((B, N, H * d), dtype=torch.float32)


def _int8_gemm_pack_fake(weight):
    return weight.new_empty((-(-weight.shape[0] // 16), -(-weight.shape[1] // 2), 32), dtype=torch.int16)


def _int8_gemm_fake(input, input_zero_point, packed_weight, out_features, scale=None, bias=None):
    return input.new_empty((input.shape[0], out_features), dtype=torch.int32 if scale is None else torch.float32)


def _fq_attention_setup(ctx, inputs, output):
    q, k, v, step, zero_point, qmin, qmax, scale, _ = inputs
    ctx.save_for_backward(q, k, v, step, zero_point)
    ctx.qmin, ctx.qmax, ctx.scale = qmin, qmax, scale


def _fq_attention_backward(ctx, grad_out, grad_logits):
    q, k, v, step, zero_point = ctx.saved_tensors
    grad_out = torch.zeros_like(q) if grad_out is None else grad_out.contiguous()
    if grad_logits is not None and grad_logits.numel() == 0:  # logits were not returned
        grad_logits = None
    if grad_logits is not None:
        grad_logits = grad_logits.contiguous()
    gq, gk, gv, gstep, gzp = torch.ops.maskaq.fq_attention_backward(
        grad_out, grad_logits, q, k, v, step, zero_point, ctx.qmin, ctx.qmax, ctx.scale)
    return (gq, gk, gv, gstep if step is not None else None,
            gzp if (step is not None and zero_point is not None) else None, None, None, None, None)


def _lsq_setup(ctx, inputs, output):
    x, step, zero_point, qmin, qmax = inputs
    ctx.save_for_backward(x, step, zero_point)
    ctx.qrange = (qmin, qmax)


def _lsq_backward(ctx, grad):
    x, step, zero_point = ctx.saved_tensors
    grad_x = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.ops.maskaq.lsq_fake_quant_backward(grad.contiguous(), x, step, zero_point, *ctx.qrange)
    return grad_x, None, None, None, None


def _lsq_fake(x, step, zero_point, qmin, qmax):
    return torch.empty_like(x)


def _lsq_backward_fake(grad, x, step, zero_point, qmin, qmax):
    return torch.empty_like(x)


def _entropy_setup(ctx, inputs, output):
    logits, row_index, num_prefix_tokens = inputs
    ctx.save_for_backward(logits, row_index)
    ctx.num_prefix_tokens = num_prefix_tokens


def _entropy_backward(ctx, grad):
    logits, row_index = ctx.saved_tensors
    grad_logits = torch.ops.maskaq.patch_similarity_entropy_backward(
        grad.contiguous(), logits, row_index, ctx.num_prefix_tokens)
    return grad_logits, None, None


def _ssim_fake(logits, num_prefix_tokens, c1, c2):
    return logits.new_empty((logits.shape[0],))


def _ssim_backward_fake(grad, logits, num_prefix_tokens, c1, c2):
    return torch.empty_like(logits)


def _ssim_setup(ctx, inputs, output):
    logits, num_prefix_tokens, c1, c2 = inputs
    ctx.save_for_backward(logits)
    ctx.args = (num_prefix_tokens, c1, c2)


def _ssim_backward(ctx, grad):
    (logits,) = ctx.saved_tensors
    return torch.ops.maskaq.inter_head_ssim_backward(grad.contiguous(), logits, *ctx.args), None, None, None


def _align_setup(ctx, inputs, output):
    cls_t, cls_q, _, _, _ = inputs
    ctx.save_for_backward(cls_t, cls_q, output[1])
    ctx.mark_non_differentiable(output[1])


def _align_backward(ctx, grad_loss, grad_mask):
    cls_t, cls_q, mask = ctx.saved_tensors
    if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
        return None, None, None, None, None
    grad_q = torch.ops.maskaq.masked_attention_align_backward(grad_loss.contiguous(), cls_t, cls_q, mask)
    # |mean_h t − mean_h q| is odd in (t − q) and the mask is piecewise constant in t, so the
    # teacher's gradient is exactly the negative of the student's.
    grad_t = None
    if ctx.needs_input_grad[0]:  # a head-shared gradient (stride 0 over the heads) stays shared
        grad_t = grad_q.narrow(2, 0, 1).neg().expand_as(grad_q) if grad_q.stride(2) == 0 else -grad_q
    return grad_t, grad_q if ctx.needs_input_grad[1] else None, None, None, None


def _register():
    lib = "maskaq::"
    for name, fake in (
        ("fq_attention", _fq_attention_fake),
        ("fq_attention_backward", _fq_attention_backward_fake),
        ("lsq_fake_quant", _lsq_fake),
        ("lsq_fake_quant_backward", _lsq_backward_fake),
        ("patch_similarity_entropy", _entropy_fake),
        ("patch_similarity_entropy_backward", _entropy_backward_fake),
        ("inter_head_ssim", _ssim_fake),
        ("inter_head_ssim_backward", _ssim_backward_fake),
        ("masked_attention_align", _align_fake),
        ("masked_attention_align_backward", _align_backward_fake),
        ("int8_linear_epilogue", _int8_linear_epilogue_fake),
        ("int8_attention", _int8_attention_fake),
        ("qkv_int8_attention", _qkv_int8_attention_fake),
        ("int8_gemm_pack", _int8_gemm_pack_fake),
        ("int8_gemm", _int8_gemm_fake),
    ):
        torch.library.register_fake(lib + name, fake)
    torch.library.register_autograd(lib + "fq_attention", _fq_attention_backward, setup_context=_fq_attention_setup)
    torch.library.register_autograd(lib + "lsq_fake_quant", _lsq_backward, setup_context=_lsq_setup)
    torch.library.register_autograd(lib + "patch_similarity_entropy", _entropy_backward,
                                    setup_context=_entropy_setup)
    torch.library.register_autograd(lib + "masked_attention_align", _align_backward, setup_context=_align_setup)
    torch.library.register_autograd(lib + "inter_head_ssim", _ssim_backward, setup_context=_ssim_setup)


if _extension.loaded():
    _register()
