"""maskaq ops: the compiled CPU kernels against the plain-PyTorch references.

Forward and backward on random inputs (never zeros) over many shapes, all bit widths 2-8
signed and unsigned, gradcheck in float64, torch.library.opcheck, bad inputs, and a test
that fails when MASKAQ_REQUIRE_EXTENSION=1 and maskaq._C did not load.

Strict comparisons run in float64, where rounding a quantizer input across a .5 boundary
differently in the two implementations is practically impossible; float32 checks allow
the rare such flips (a few elements off by one quantization step).
"""
import math
import os
import re
import random

import pytest
import torch

from maskaq import _extension, ops
from maskaq import reference as ref

from _benchmarks import load_benchmark
from _bounds import assert_within, float32_level_unsure, fq_attention_f32_reference

HAS_EXT = _extension.loaded()
needs_ext = pytest.mark.skipif(not HAS_EXT, reason="maskaq._C is not built (reference fallback only)")
F64 = torch.float64

# Shapes (B, H, N, d) covering B 1..8, H 1..6, N in {5, 17, 50, 65, 197}, d in {8, 32, 64}.
ATTN_SHAPES = [
    (1, 1, 5, 8), (2, 3, 17, 32), (3, 2, 50, 64), (8, 6, 65, 8), (2, 4, 197, 64), (4, 5, 17, 64),
    (7, 1, 50, 32), (1, 6, 197, 8), (6, 3, 5, 32), (2, 2, 65, 64), (5, 1, 197, 32), (3, 6, 50, 8),
    (8, 2, 17, 8), (1, 3, 65, 32),
]
BIT_CASES = [(bits, signed) for bits in range(2, 9) for signed in (True, False)]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed, dtype=F64, scale=1.0, requires_grad=False):
    t = torch.randn(*shape, generator=gen(seed), dtype=dtype) * scale
    return t.requires_grad_(requires_grad)


def quant_range(bits, signed):
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)


def quant_params(q, k, v, bits, signed, seed):
    """LSQ steps initialized from the data (2·mean|x|/sqrt(qmax), docs/method.md#the-quantizer), jittered by
    a factor in [0.3, 3] so both the in-range and the clamped regime occur, and random
    zero points in [-3, 3]. float32 like the model's parameters."""
    rng = random.Random(seed)
    lo, hi = quant_range(bits, signed)
    n = q.shape[2]
    means = [q.abs().mean().item(), k.abs().mean().item(), 1.0 / n, v.abs().mean().item()]
    step = torch.tensor([2 * m / math.sqrt(hi) * rng.uniform(0.3, 3.0) for m in means], requires_grad=True)
    zp = torch.tensor([rng.uniform(-3, 3) for _ in range(4)], requires_grad=True)
    return dict(step=step, zero_point=zp, qmin=[lo] * 4, qmax=[hi] * 4)


def fq_grads(fn, q, k, v, kw, seed):
    out, logits = fn(q, k, v, return_logits=True, **kw)
    go = randn(*out.shape, seed=seed, dtype=out.dtype)
    gl = randn(*logits.shape, seed=seed + 1, dtype=out.dtype, scale=0.1)
    inputs = [q, k, v] + [t for t in (kw.get("step"), kw.get("zero_point")) if t is not None]
    grads = torch.autograd.grad([out, logits], inputs, [go, gl])
    return out, logits, grads


# --------------------------------------------------------------------------------------
# fq_attention


@needs_ext
@pytest.mark.parametrize("shape", ATTN_SHAPES)
def test_fq_attention_full_precision_matches_reference(shape):
    B, H, N, d = shape
    seed = sum(shape)
    q, k, v = (randn(*shape, seed=seed + i, requires_grad=True) for i in range(3))
    out, logits, grads = fq_grads(ops.fq_attention, q, k, v, {}, seed)
    out_r, logits_r, grads_r = fq_grads(ref.fq_attention, q, k, v, {}, seed)
    torch.testing.assert_close(out, out_r)
    torch.testing.assert_close(logits, logits_r)
    for g, g_r in zip(grads, grads_r):
        torch.testing.assert_close(g, g_r)


@needs_ext
@pytest.mark.parametrize("case", range(len(BIT_CASES)))
def test_fq_attention_quantized_matches_reference(case):
    bits, signed = BIT_CASES[case]
    shape = ATTN_SHAPES[case % len(ATTN_SHAPES)]
    seed = 100 + case
    q, k, v = (randn(*shape, seed=seed + i, requires_grad=True) for i in range(3))
    kw = quant_params(q, k, v, bits, signed, seed)
    out, logits, grads = fq_grads(ops.fq_attention, q, k, v, kw, seed)
    out_r, logits_r, grads_r = fq_grads(ref.fq_attention, q, k, v, kw, seed)
    torch.testing.assert_close(out, out_r)
    torch.testing.assert_close(logits, logits_r)
    names = ["q", "k", "v", "step", "zero_point"]
    for name, g, g_r in zip(names, grads, grads_r):
        # step / zero_point are float32 parameters: their gradients are float32 sums
        tol = dict(rtol=1e-4, atol=1e-6) if name in ("step", "zero_point") else {}
        torch.testing.assert_close(g, g_r, msg=lambda m, n=name: f"grad of {n}: {m}", **tol)
    # the inputs are quantized for real: the output differs from full precision
    assert not torch.allclose(out, ref.fq_attention(q, k, v)[0])


def hand_fq_attention(q, k, v, step, zero_point, qmin, qmax):
    """fq_attention written out with STE tricks and docs/method.md's LSQ scaling (#the-quantizer)
    as the public code runs: the step's gradient times 1/sqrt(numel·qmax), the zero point's unscaled."""
    def fq(x, i):
        g = 1.0 / math.sqrt(x.numel() * qmax[i])
        alpha = step[i] * g + (step[i] - step[i] * g).detach()
        z = zero_point[i] + (zero_point[i].round() - zero_point[i]).detach()
        u = torch.clamp(x / alpha + z, qmin[i], qmax[i])
        return (u + (u.round() - u).detach() - z) * alpha

    logits = fq(q, 0) @ fq(k, 1).transpose(-2, -1)
    p = torch.softmax(logits * q.shape[-1] ** -0.5, dim=-1)
    return fq(p, 2) @ fq(v, 3), logits


@pytest.mark.parametrize("impl", [pytest.param(ops.fq_attention, marks=needs_ext, id="op"),
                                  pytest.param(ref.fq_attention, id="reference")])
def test_fq_attention_lsq_gradients_are_scaled_as_the_public_code_runs(impl):
    shape = (2, 3, 17, 8)
    q, k, v = (randn(*shape, seed=20 + i, requires_grad=True) for i in range(3))
    kw = quant_params(q, k, v, 3, True, 5)
    with torch.no_grad():
        kw["step"].mul_(0.3)  # clamp a share of every operand: all four zero points get gradients
        kw["step"][2] = 0.01
    step64, zp64 = kw["step"].double(), kw["zero_point"].double()
    _, _, grads = fq_grads(impl, q, k, v, kw, 2)
    _, _, want = fq_grads(lambda q, k, v, return_logits, **_: hand_fq_attention(
        q, k, v, step64, zp64, kw["qmin"], kw["qmax"]), q, k, v, dict(kw, step=step64, zero_point=zp64), 2)
    assert (grads[4] != 0).all()
    torch.testing.assert_close(grads[3].double(), want[3], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grads[4].double(), want[4], rtol=1e-4, atol=1e-6)


@needs_ext
def test_fq_attention_quantized_clamps_and_zero_point_gradient():
    """Small steps clamp many values: the zero-point gradient is nonzero and matches."""
    shape = (2, 3, 17, 8)
    q, k, v = (randn(*shape, seed=i, requires_grad=True) for i in range(3))
    kw = quant_params(q, k, v, 3, True, 7)
    with torch.no_grad():
        kw["step"].mul_(0.2)
        kw["step"][2] = 0.005  # P > 0.035 clamps
    _, _, grads = fq_grads(ops.fq_attention, q, k, v, kw, 1)
    _, _, grads_r = fq_grads(ref.fq_attention, q, k, v, kw, 1)
    assert (grads[4] != 0).all()
    torch.testing.assert_close(grads[3], grads_r[3], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grads[4], grads_r[4], rtol=1e-4, atol=1e-6)


@needs_ext
@pytest.mark.parametrize("shape,bits", [((2, 3, 197, 64), 4), ((3, 2, 65, 32), 8), ((4, 1, 50, 8), 2)])
def test_fq_attention_float32(shape, bits):
    """The float32 kernels (8-lane vector bodies and scalar tails) against float64 within the error
    bounds of _bounds.fq_attention_f32_reference: every output and gradient, elementwise.

    q, k, v inputs within float32 rounding of a quantization tie or clamp bound move a quarter step
    away, so only P (whose float32 value depends on the CPU's exp) can take another level than in
    float64, and each such flip is in the bounds as the rows it moves. P's step is 1/N and its zero
    point −2, so P below 2/N clamps at qmin in every row, the tail of N mod 8 columns included."""
    N = shape[2]
    q32, k32, v32 = (randn(*shape, seed=i, dtype=torch.float32) for i in range(3))
    kw = quant_params(q32, k32, v32, bits, False, bits)
    with torch.no_grad():
        kw["step"][2], kw["zero_point"][2] = 1.0 / N, -2.0
    steps, zps = kw["step"].tolist(), [round(z) for z in kw["zero_point"].tolist()]
    q32, k32, v32 = (torch.where(float32_level_unsure(x, steps[i], zps[i], kw["qmin"][i], kw["qmax"][i]),
                                 x + steps[i] / 4, x).requires_grad_() for x, i in ((q32, 0), (k32, 1), (v32, 3)))
    out, logits, grads = fq_grads(ops.fq_attention, q32, k32, v32, kw, 3)
    go = randn(*out.shape, seed=3, dtype=torch.float32)  # as fq_grads draws them
    gl = randn(*logits.shape, seed=4, dtype=torch.float32, scale=0.1)
    want = fq_attention_f32_reference(q32, k32, v32, kw["step"], kw["zero_point"], kw["qmin"], kw["qmax"], go, gl)
    names = ["grad_q", "grad_k", "grad_v", "grad_step", "grad_zero_point"]
    for name, got in [("out", out), ("logits", logits), *zip(names, grads)]:
        assert_within(got, *want[name], what=name)
    # The test can see a wrong tail: the tail's terms of P's zero-point gradient sum to more than
    # twice its bound, so flipping their sign moves the kernel's result past the bound on any CPU.
    tail = want["p_zero_point_terms"][..., N - N % 8:].sum()
    assert abs(float(tail)) > float(want["grad_zero_point"][1][2])


def large_float16_attention_inputs():
    """fp16 q, k, v whose logits q·kᵀ all lie near 64·40² = 102400, beyond float16's 65504."""
    q, k = (randn(2, 3, 17, 64, seed=60 + i, dtype=torch.float32, scale=4.0) + 40.0 for i in range(2))
    v = randn(2, 3, 17, 64, seed=62, dtype=torch.float32)
    return [t.half().requires_grad_() for t in (q, k, v)]


def fake_or_plain(x, kw, i):
    return ref.fake_quantize(x, kw["step"][i], None, kw["qmin"][i], kw["qmax"][i]) if kw else x


@pytest.mark.parametrize("impl", [ops.fq_attention, ref.fq_attention], ids=["op", "reference"])
@pytest.mark.parametrize("quantized", [False, True], ids=["full", "quantized"])
def test_fq_attention_float16_logits_beyond_float16_range(impl, quantized):
    """float16 inputs compute the logits in float32 (the reference, and on the CPU the op's float32
    kernel on the upcast operands), so
    |q̂·k̂ᵀ| > 65504 gives finite outputs and gradients equal to float64 on the same inputs."""
    q, k, v = large_float16_attention_inputs()
    kw = {}
    if quantized:  # power-of-two steps: x / α is exact in float16, no level can flip against float64
        kw = dict(step=torch.tensor([0.5, 0.5, 1 / 256, 1 / 16], requires_grad=True),
                  qmin=[-128, -128, 0, -128], qmax=[127, 127, 255, 127])
    with torch.no_grad():
        logits_f32 = fake_or_plain(q, kw, 0).float() @ fake_or_plain(k, kw, 1).float().transpose(-2, -1)
    assert logits_f32.abs().min() > 65504
    out = impl(q, k, v, **kw)[0]
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    grads = torch.autograd.grad(out.float().square().sum(), [q, k, v])
    assert all(torch.isfinite(g).all() for g in grads)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out64 = ref.fq_attention(q64, k64, v64, **kw)[0]
    grads64 = torch.autograd.grad(out64.square().sum(), [q64, k64, v64])
    torch.testing.assert_close(out.double(), out64, rtol=1e-3, atol=1e-3)
    for g, g64 in zip(grads, grads64):
        torch.testing.assert_close(g.double(), g64, rtol=1e-2, atol=1e-2)


@needs_ext
def test_fq_attention_without_logits_and_default_scale():
    q, k, v = (randn(2, 3, 17, 32, seed=i) for i in range(3))
    out, logits = ops.fq_attention(q, k, v)
    assert logits is None
    torch.testing.assert_close(out, ref.fq_attention(q, k, v, scale=32 ** -0.5)[0])
    out2, _ = ops.fq_attention(q, k, v, scale=0.3)
    torch.testing.assert_close(out2, ref.fq_attention(q, k, v, scale=0.3)[0])
    assert not torch.allclose(out, out2)


@needs_ext
def test_fq_attention_gradient_without_logits_and_noncontiguous_inputs():
    """timm hands q, k, v as non-contiguous views of one qkv tensor, and out.sum() gives an
    expanded (stride-0) gradient: both must work."""
    base = randn(2, 17, 3, 4, 8, seed=5, requires_grad=True)
    q, k, v = base.permute(2, 0, 3, 1, 4).unbind(0)
    assert not q.is_contiguous()
    kw = quant_params(q, k, v, 4, True, 9)
    out = ops.fq_attention(q, k, v, **kw)[0]
    g = torch.autograd.grad(out.sum(), [base, kw["step"]])
    out_r = ref.fq_attention(q, k, v, **kw)[0]
    g_r = torch.autograd.grad(out_r.sum(), [base, kw["step"]])
    torch.testing.assert_close(out, out_r)
    torch.testing.assert_close(g[0], g_r[0])
    torch.testing.assert_close(g[1], g_r[1], rtol=1e-4, atol=1e-6)


@needs_ext
def test_fq_attention_step_gradient_independent_of_threads():
    shape = (4, 3, 17, 8)
    q, k, v = (randn(*shape, seed=i, dtype=torch.float32, requires_grad=True) for i in range(3))
    kw = quant_params(q, k, v, 4, True, 2)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(fq_grads(ops.fq_attention, q, k, v, kw, 4)[2])
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@needs_ext
def test_fq_attention_gradcheck_full_precision():
    q, k, v = (randn(1, 2, 5, 3, seed=i, requires_grad=True) for i in range(3))
    assert torch.autograd.gradcheck(lambda a, b, c: ops.fq_attention(a, b, c, return_logits=True), (q, k, v))


# --------------------------------------------------------------------------------------
# patch_similarity_entropy

ENTROPY_CASES = [
    # (B, H, N, num_prefix_tokens, num_rows)
    (1, 1, 5, 1, 64), (2, 3, 17, 1, 64), (3, 6, 50, 1, 7), (8, 2, 65, 1, 64), (4, 3, 197, 1, 64),
    (5, 4, 197, 2, 33), (2, 5, 17, 0, 64), (6, 1, 65, 0, 64), (7, 2, 50, 0, 200), (1, 6, 197, 0, 1),
]


@needs_ext
@pytest.mark.parametrize("case", ENTROPY_CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_patch_similarity_entropy_matches_reference(case, dtype):
    B, H, N, P, R = case
    logits = randn(B, H, N, N, seed=sum(case), dtype=dtype, scale=3.0, requires_grad=True)
    h = ops.patch_similarity_entropy(logits, num_prefix_tokens=P, num_rows=R, generator=gen(1))
    h_r = ref.patch_similarity_entropy(logits, num_prefix_tokens=P, num_rows=R, generator=gen(1))
    w = randn(B, seed=7, dtype=dtype)
    (g,) = torch.autograd.grad(h, logits, w)
    (g_r,) = torch.autograd.grad(h_r, logits, w)
    tol = {} if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5 * g_r.abs().max().item())
    torch.testing.assert_close(h, h_r, **tol)
    torch.testing.assert_close(g, g_r, **tol)
    assert h.shape == (B,) and h.dtype == dtype


@needs_ext
def test_patch_similarity_entropy_repeated_rows_and_tiny_norms():
    """A row picked twice gets both gradient contributions; a near-zero row (norm below
    the 1e-6 clamp) follows the reference too."""
    logits = randn(2, 3, 9, 9, seed=3, requires_grad=False)
    logits[1, :, 3, 1:] *= 1e-9
    logits.requires_grad_(True)
    row_index = torch.tensor([[0, 4, 4, 7, 0], [2, 2, 5, 1, 6]])
    h = ops.patch_similarity_entropy(logits, row_index=row_index)
    h_r = ref.patch_similarity_entropy(logits, row_index=row_index)
    torch.testing.assert_close(h, h_r)
    (g,), (g_r,) = torch.autograd.grad(h.sum(), logits), torch.autograd.grad(h_r.sum(), logits)
    torch.testing.assert_close(g, g_r)
    # only the picked rows of the patch block receive gradient
    assert g[:, :, 0].abs().sum() == 0 and g[:, :, :, 0].abs().sum() == 0


@needs_ext
@pytest.mark.parametrize("H", [1, 4])
def test_head_shared_gradients_add_up_like_dense_ones(H):
    """The CPU backward of the entropy and of the alignment writes one head and returns it
    expanded over the heads (stride 0); autograd adds it to the other gradients of the same
    tensor exactly as it adds the reference's dense gradient, in either order."""
    logits = randn(3, H, 11, 11, seed=H, dtype=torch.float32, requires_grad=True)
    row_index = torch.tensor([[0, 4, 4, 7], [2, 9, 5, 1], [3, 3, 8, 0]])
    w = randn(3, H, 11, 11, seed=9, dtype=torch.float32)
    alone = {}
    for fn in (ops.patch_similarity_entropy, ref.patch_similarity_entropy):
        h = fn(logits, row_index=row_index)
        (alone[fn],) = torch.autograd.grad(h.sum(), logits, retain_graph=True)
        assert alone[fn].shape == logits.shape
        for loss in (h.sum() + (logits * w).sum(), (logits * w).sum() + h.sum()):
            (g,) = torch.autograd.grad(loss, logits, retain_graph=True)
            assert torch.equal(g, alone[fn] + w)
    got, want = alone[ops.patch_similarity_entropy], alone[ref.patch_similarity_entropy]
    if H > 1:
        assert got.stride(1) == 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * want.abs().max().item())

    cls_t = randn(2, 3, H, 13, seed=4, dtype=torch.float32, requires_grad=True)
    cls_q = randn(2, 3, H, 13, seed=5, dtype=torch.float32, requires_grad=True)
    rand = torch.rand(3, 13, generator=gen(0))
    loss, _ = ops.masked_attention_align(cls_t, cls_q, ratio=0.5, rand=rand)
    g_t, g_q = torch.autograd.grad(loss, (cls_t, cls_q), retain_graph=True)
    if H > 1:
        assert g_t.stride(2) == 0 and g_q.stride(2) == 0
    assert torch.equal(g_t, -g_q)
    extra = randn(2, 3, H, 13, seed=6, dtype=torch.float32)
    (g,) = torch.autograd.grad(loss + (cls_q * extra).sum(), cls_q)
    assert torch.equal(g, g_q + extra)
    loss_r, _ = ref.masked_attention_align(cls_t, cls_q, ratio=0.5, rand=rand)
    torch.testing.assert_close(g_q, torch.autograd.grad(loss_r, cls_q)[0], rtol=1e-5, atol=1e-7)


@needs_ext
def test_patch_similarity_entropy_gradcheck():
    logits = randn(2, 2, 7, 7, seed=11, requires_grad=True)
    row_index = torch.tensor([[0, 3, 5, 3], [1, 2, 4, 0]])
    assert torch.autograd.gradcheck(lambda x: ops.patch_similarity_entropy(x, row_index=row_index), (logits,))


def test_patch_similarity_entropy_draws_repeat_with_the_generator():
    logits = randn(3, 2, 30, 30, seed=2)
    a = ops.patch_similarity_entropy(logits, num_rows=8, generator=gen(5))
    b = ops.patch_similarity_entropy(logits, num_rows=8, generator=gen(5))
    c = ops.patch_similarity_entropy(logits, num_rows=8, generator=gen(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    rows = ref.draw_row_index(3, 29, 8, generator=gen(5))
    assert rows.shape == (3, 8) and rows.min() >= 0 and rows.max() < 29
    assert all(len(set(r.tolist())) == 8 for r in rows)  # without replacement
    assert torch.equal(ref.draw_row_index(2, 5, 64), torch.arange(5).expand(2, 5))  # all rows when N' <= R


# --------------------------------------------------------------------------------------
# masked_attention_align

ALIGN_CASES = [
    # (L, B, H, M, ratio, keep)
    (1, 1, 1, 4, 0.5, 0.7), (12, 8, 3, 196, 0.5, 0.7), (4, 3, 6, 49, 0.1, 0.7), (6, 5, 2, 64, 0.33, 1.0),
    (2, 7, 4, 16, 1.0, 0.5), (3, 2, 5, 196, 0.01, 0.7), (5, 4, 1, 63, 0.27, 0.2),
]


@needs_ext
@pytest.mark.parametrize("case", ALIGN_CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_masked_attention_align_matches_reference(case, dtype):
    L, B, H, M, ratio, keep = case
    cls_t = randn(L, B, H, M, seed=sum(case[:4]), dtype=dtype, scale=2.0)
    cls_q = randn(L, B, H, M, seed=sum(case[:4]) + 1, dtype=dtype, scale=2.0, requires_grad=True)
    loss, mask = ops.masked_attention_align(cls_t, cls_q, ratio=ratio, keep=keep, seed=3)
    loss_r, mask_r = ref.masked_attention_align(cls_t, cls_q, ratio=ratio, keep=keep, seed=3)
    assert torch.equal(mask, mask_r)
    k, kept = ref.alignment_counts(M, ratio, keep)
    assert (mask.sum(1) == kept).all() and mask.dtype == dtype
    tol = {} if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, loss_r, **tol)
    (g,), (g_r,) = torch.autograd.grad(loss, cls_q), torch.autograd.grad(loss_r, cls_q)
    torch.testing.assert_close(g, g_r, **tol)


@pytest.mark.parametrize("impl", [pytest.param(ops.masked_attention_align, marks=needs_ext, id="op"),
                                  pytest.param(ref.masked_attention_align, id="reference")])
def test_masked_attention_align_keeps_round_half_to_even_of_the_top_k(impl):
    """The public code keeps round(0.7·k) keys with Python's round: 10 of 15, 24 of 35 (half to even)."""
    for M, ratio, kept in ((30, 0.5, 10), (70, 0.5, 24), (40, 0.5, 14), (49, 0.5, 17)):
        cls_t = randn(2, 3, 2, M, seed=M)
        _, mask = impl(cls_t, randn(2, 3, 2, M, seed=M + 1), ratio=ratio, keep=0.7, seed=0)
        assert (mask.sum(dim=1) == kept).all(), (M, mask.sum(dim=1))


@needs_ext
def test_masked_attention_align_mask_follows_the_teacher():
    """Kept keys are among the teacher's top-k; keep=1 keeps the whole top-k."""
    cls_t = randn(3, 4, 2, 40, seed=1)
    cls_q = randn(3, 4, 2, 40, seed=2)
    score = cls_t.mean(dim=(0, 2))
    top = torch.zeros_like(score).scatter_(1, score.topk(10, dim=1).indices, 1.0)
    _, full = ops.masked_attention_align(cls_t, cls_q, ratio=0.25, keep=1.0, seed=0)
    assert torch.equal(full, top)
    _, part = ops.masked_attention_align(cls_t, cls_q, ratio=0.25, keep=0.7, seed=0)
    assert ((part <= top).all() and (part.sum(1) == 7).all())
    _, other = ops.masked_attention_align(cls_t, cls_q, ratio=0.25, keep=0.7, seed=1)
    _, same = ops.masked_attention_align(cls_t, cls_q, ratio=0.25, keep=0.7, generator=gen(0))
    assert not torch.equal(part, other)
    assert torch.equal(part, same)  # seed s and a CPU generator seeded with s draw alike


def align_gradients_by_hand(cls_t, cls_q, mask):
    """∂loss/∂cls_t[l, b, h, i] = sign(mean_h t − mean_h q)·m[b, i] / (L·H·(Σ m + 1e-8)), and
    ∂loss/∂cls_q is its negative (the mask is piecewise constant in cls_t)."""
    L, _, H, _ = cls_t.shape
    diff = cls_t.detach().mean(dim=2, keepdim=True) - cls_q.detach().mean(dim=2, keepdim=True)
    g_t = (diff.sign() * mask[None, :, None, :] / (L * H * (mask.sum() + 1e-8))).expand_as(cls_t)
    return g_t, -g_t


ALIGN_IMPLS = [pytest.param(ops.masked_attention_align, marks=needs_ext, id="op"),
               pytest.param(ref.masked_attention_align, id="reference")]


@pytest.mark.parametrize("impl", ALIGN_IMPLS)
@pytest.mark.parametrize("shape", [(2, 3, 2, 6), (4, 2, 3, 17), (1, 5, 1, 9)])
def test_masked_attention_align_gradient_reaches_teacher_and_student(impl, shape):
    """The public code's L_align detaches neither side: both get the hand-derived gradient."""
    cls_t = randn(*shape, seed=4, requires_grad=True)
    cls_q = randn(*shape, seed=5, requires_grad=True)
    rand = torch.rand(shape[1], shape[3], generator=gen(0), dtype=F64)
    loss, mask = impl(cls_t, cls_q, ratio=0.5, rand=rand)
    g_t, g_q = torch.autograd.grad(2.5 * loss, (cls_t, cls_q))
    want_t, want_q = align_gradients_by_hand(cls_t, cls_q, mask)
    torch.testing.assert_close(g_t, 2.5 * want_t)
    torch.testing.assert_close(g_q, 2.5 * want_q)
    assert g_t.abs().sum() > 0 and not mask.requires_grad
    # gradcheck on each side and on both at once (the mask is fixed by rand and the teacher)
    assert torch.autograd.gradcheck(lambda t: impl(t, cls_q.detach(), ratio=0.5, rand=rand)[0], (cls_t,))
    assert torch.autograd.gradcheck(lambda q: impl(cls_t.detach(), q, ratio=0.5, rand=rand)[0], (cls_q,))
    assert torch.autograd.gradcheck(lambda t, q: impl(t, q, ratio=0.5, rand=rand)[0], (cls_t, cls_q))


@needs_ext
def test_masked_attention_align_teacher_gradient_matches_reference():
    cls_t = randn(3, 4, 2, 20, seed=6, dtype=torch.float32, requires_grad=True)
    cls_q = randn(3, 4, 2, 20, seed=7, dtype=torch.float32, requires_grad=True)
    loss, _ = ops.masked_attention_align(cls_t, cls_q, ratio=0.4, seed=2)
    loss_r, _ = ref.masked_attention_align(cls_t, cls_q, ratio=0.4, seed=2)
    for a, b in zip(torch.autograd.grad(loss, (cls_t, cls_q)), torch.autograd.grad(loss_r, (cls_t, cls_q))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------------------
# opcheck (schema, fake kernels, autograd registration, AOT dispatch)


@needs_ext
def test_opcheck_fq_attention():
    q, k, v = (randn(2, 2, 5, 4, seed=i, requires_grad=True) for i in range(3))
    kw = quant_params(q, k, v, 4, True, 0)
    step, zp = kw["step"], kw["zero_point"]
    op = torch.ops.maskaq.fq_attention.default
    torch.library.opcheck(op, (q, k, v, None, None, [], [], 0.5, True))
    torch.library.opcheck(op, (q, k, v, step, zp, kw["qmin"], kw["qmax"], 0.5, True))
    torch.library.opcheck(op, (q, k, v, step, None, kw["qmin"], kw["qmax"], 0.5, False))
    go, gl = randn(2, 2, 5, 4, seed=7), randn(2, 2, 5, 5, seed=8)
    bop = torch.ops.maskaq.fq_attention_backward.default
    d = [t.detach() for t in (q, k, v)]
    torch.library.opcheck(bop, (go, gl, *d, step.detach(), zp.detach(), kw["qmin"], kw["qmax"], 0.5))
    torch.library.opcheck(bop, (go, None, *d, None, None, [], [], 0.5))


@needs_ext
def test_opcheck_patch_similarity_entropy():
    logits = randn(2, 3, 7, 7, seed=1, requires_grad=True)
    rows = torch.tensor([[0, 2, 5], [1, 1, 3]])
    torch.library.opcheck(torch.ops.maskaq.patch_similarity_entropy.default, (logits, rows, 1))
    torch.library.opcheck(torch.ops.maskaq.patch_similarity_entropy_backward.default,
                          (randn(2, seed=3), logits.detach(), rows, 1))


@needs_ext
def test_opcheck_masked_attention_align():
    cls_t = randn(2, 3, 2, 8, seed=1)
    cls_q = randn(2, 3, 2, 8, seed=2, requires_grad=True)
    rand = torch.rand(3, 8, generator=gen(0), dtype=F64)
    torch.library.opcheck(torch.ops.maskaq.masked_attention_align.default, (cls_t, cls_q, rand, 0.5, 0.7))
    _, mask = ops.masked_attention_align(cls_t, cls_q, ratio=0.5, rand=rand)
    torch.library.opcheck(torch.ops.maskaq.masked_attention_align_backward.default,
                          (torch.tensor(1.5, dtype=F64), cls_t, cls_q.detach(), mask))


# --------------------------------------------------------------------------------------
# Bad input: an exception with a message, never a crash

BAD = (RuntimeError, ValueError, TypeError, IndexError)


@needs_ext
@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("d", [5, 64])
def test_fq_attention_reads_qkv_views_in_place_on_cpu(quantized, d):
    """The CPU kernel takes q, k, v as the strided views of a fused qkv projection (no copy) and
    gives the results, logits and gradients of contiguous copies: bit for bit when every row of
    the views starts 32-byte aligned (d = 64, as in every timm ViT), or when quantizing (the
    kernel then reads the views into its own buffers). Unquantized rows of odd length start at
    any float, and BLAS may then sum in another order: MKL on an AMD EPYC (Zen 3, AVX2) differs
    from the copies in the last bit there, so that case asks for float32 rounding only."""
    B, N, H = 2, 7, 3
    qkv = randn(B, N, 3, H, d, seed=4, dtype=torch.float32).permute(2, 0, 3, 1, 4)
    kw = dict(step=STEP, qmin=QMIN, qmax=QMAX) if quantized else {}
    views = [t.requires_grad_() for t in qkv.detach().clone().unbind(0)]
    assert not views[0].is_contiguous() and views[0].stride(-1) == 1
    copies = [t.detach().contiguous().requires_grad_() for t in views]
    grads = [randn(B, H, N, d, seed=7, dtype=torch.float32), randn(B, H, N, N, seed=8, dtype=torch.float32)]
    results = []
    for q, k, v in (views, copies):
        out, logits = torch.ops.maskaq.fq_attention(q, k, v, kw.get("step"), None, kw.get("qmin", []),
                                                    kw.get("qmax", []), d ** -0.5, True)
        results.append([out, logits, *torch.autograd.grad([out, logits], [q, k, v], grads)])
    for got, expected in zip(*results):
        if quantized or d % 8 == 0:
            assert torch.equal(got, expected)
        else:
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def _qkv(shape=(2, 2, 5, 4), dtype=torch.float32):
    return [randn(*shape, seed=i, dtype=dtype) for i in range(3)]


STEP = torch.tensor([0.1, 0.1, 0.05, 0.1])
QMIN, QMAX = [-8, -8, 0, -8], [7, 7, 15, 7]


def _fq_bad_cases():
    """name -> (error, the start of its message, the op's arguments)."""
    q, k, v = _qkv()
    positive = " must be positive and finite"
    return {
        "int dtype": (TypeError, "q must have dtype in {Float, Double}, got Long",
                      (q.long(), k.long(), v.long(), None, None, [], [], 0.5, False)),
        "half on cpu": (TypeError, "q must have dtype in {Float, Double}, got Half",
                        (q.half(), k.half(), v.half(), None, None, [], [], 0.5, False)),
        "mixed dtypes": (TypeError, "k (Double) must have the dtype of q (Float)",
                         (q, k.double(), v, None, None, [], [], 0.5, False)),
        "3-D": (ValueError, "q must be 4-D (B, H, N, d), got shape [2, 5, 4]",
                (q[0], k[0], v[0], None, None, [], [], 0.5, False)),
        "shape mismatch": (ValueError, "q, k and v must have one shape (B, H, N, d), got [2, 2, 5, 4], [2, 2, 4, 4]",
                           (q, k[:, :, :4], v, None, None, [], [], 0.5, False)),
        "non-contiguous": (ValueError, "q must have its last dim contiguous",
                           (q.transpose(2, 3), k.transpose(2, 3), v.transpose(2, 3), None, None, [], [], 0.5, False)),
        "step of 3": (ValueError, "step must be a 1-D tensor of 4 (q, k, p, v), got shape [3]",
                      (q, k, v, STEP[:3], None, QMIN, QMAX, 0.5, False)),
        "qmin of 3": (ValueError, "qmin and qmax must hold 4 integers (q, k, p, v), got 3 and 4",
                      (q, k, v, STEP, None, QMIN[:3], QMAX, 0.5, False)),
        "qmin >= qmax": (ValueError, "qmin[0] = 7 must be below qmax[0] = 7",
                         (q, k, v, STEP, None, [7, -8, 0, -8], QMAX, 0.5, False)),
        "zero step": (ValueError, "step[1] = 0" + positive,
                      (q, k, v, torch.tensor([0.1, 0.0, 0.05, 0.1]), None, QMIN, QMAX, 0.5, False)),
        "negative step": (ValueError, "step[1] = -1" + positive,
                          (q, k, v, torch.tensor([0.1, -1.0, 0.05, 0.1]), None, QMIN, QMAX, 0.5, False)),
        "nan step": (ValueError, "step[1] = nan" + positive,
                     (q, k, v, torch.tensor([0.1, float("nan"), 0.05, 0.1]), None, QMIN, QMAX, 0.5, False)),
        "zero_point without step": (ValueError, "zero_point was given without step",
                                    (q, k, v, None, torch.zeros(4), [], [], 0.5, False)),
        "2-D step": (ValueError, "step must be a 1-D tensor of 4 (q, k, p, v), got shape [2, 2]",
                     (q, k, v, STEP.view(2, 2), None, QMIN, QMAX, 0.5, False)),
        "int step": (TypeError, "step must be a floating tensor, got Long",
                     (q, k, v, torch.ones(4, dtype=torch.long), None, QMIN, QMAX, 0.5, False)),
        "inf scale": (ValueError, "scale must be finite, got inf", (q, k, v, None, None, [], [], float("inf"), False)),
    }


@needs_ext
@pytest.mark.parametrize("name", list(_fq_bad_cases()))
def test_fq_attention_rejects_bad_input(name):
    error, message, args = _fq_bad_cases()[name]
    with pytest.raises(error, match=re.escape(message)):
        torch.ops.maskaq.fq_attention(*args)


@needs_ext
def test_bad_input_message_is_the_message_alone():
    """A failed check raises with its message only (no C++ source location or backtrace), and the
    numbers in it are exact: std::to_chars, not a stream whose locale or runtime could differ."""
    q, k, v = _qkv()
    with pytest.raises(ValueError) as info:
        torch.ops.maskaq.fq_attention(q[0], k[0], v[0], None, None, [], [], 0.5, False)
    assert str(info.value) == "q must be 4-D (B, H, N, d), got shape [2, 5, 4]"
    step = torch.tensor([0.1, -0.123456789, 0.05, 0.1])
    with pytest.raises(ValueError) as info:
        torch.ops.maskaq.fq_attention(q, k, v, step, None, QMIN, QMAX, 0.5, False)
    number = re.match(r"step\[1\] = (\S+) must be positive", str(info.value)).group(1)
    assert float(number) == step[1].item()  # the float32 value read back exactly


@needs_ext
def test_fq_attention_backward_rejects_bad_grads():
    q, k, v = _qkv()
    bop = torch.ops.maskaq.fq_attention_backward
    with pytest.raises(BAD, match="grad_out"):
        bop(torch.ones(2, 2, 5, 3), None, q, k, v, None, None, [], [], 0.5)
    with pytest.raises(BAD, match="grad_logits"):
        bop(torch.ones(2, 2, 5, 4), torch.ones(2, 2, 5, 4), q, k, v, None, None, [], [], 0.5)
    with pytest.raises(BAD, match="contiguous"):
        bop(torch.ones(2, 2, 4, 5).transpose(2, 3), None, q, k, v, None, None, [], [], 0.5)


def test_fq_attention_python_errors_are_clear():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="qmin"):
        ops.fq_attention(q, k, v, step=STEP)
    with pytest.raises(ValueError, match="4 ints"):
        ops.fq_attention(q, k, v, step=STEP, qmin=[0, 0, 0], qmax=QMAX)
    with pytest.raises(ValueError, match="zero_point"):
        ops.fq_attention(q, k, v, zero_point=torch.zeros(4))
    with pytest.raises(ValueError, match="device"):  # devices checked without needing a GPU
        ops.fq_attention(q, k, v, step=STEP.to("meta"), qmin=QMIN, qmax=QMAX)
    with pytest.raises(TypeError, match=re.escape("q must be a torch.Tensor (B, H, N, d), got ndarray")):
        ops.fq_attention(q.numpy(), k, v)
    with pytest.raises(ValueError, match="shape"):
        ops.fq_attention(q, k[..., :3], v)


@needs_ext
def test_patch_similarity_entropy_rejects_bad_input():
    op = torch.ops.maskaq.patch_similarity_entropy
    logits = randn(2, 3, 7, 7, seed=0, dtype=torch.float32)
    rows = torch.tensor([[0, 1], [2, 3]])
    with pytest.raises(IndexError, match=r"\[0, 6\)"):
        op(logits, torch.tensor([[0, 6], [1, 2]]), 1)
    with pytest.raises(IndexError, match=re.escape("prefix tokens excluded), got range [-1, 2]")):
        op(logits, torch.tensor([[0, -1], [1, 2]]), 1)
    with pytest.raises(IndexError, match=re.escape("[0, 7) (rows")):  # with no prefix tokens, 6 is valid but 7 is not
        op(logits, torch.tensor([[0, 7], [1, 2]]), 0)
    op(logits, torch.tensor([[0, 6], [1, 2]]), 0)
    for bad, error, message in (
        ((logits, rows.int(), 1), TypeError, "row_index must have dtype Long, got Int"),
        ((logits, rows[:1], 1), ValueError, "row_index has size 1 in dim 0 but 2 was expected"),
        ((logits, rows.view(-1), 1), ValueError, "row_index must be 2-D (B, R), got shape [4]"),
        ((logits, rows, 7), ValueError, "num_prefix_tokens must lie in [0, N) with N = 7, got 7"),
        ((logits, rows, -1), ValueError, "num_prefix_tokens must lie in [0, N) with N = 7, got -1"),
        ((logits[..., :6].contiguous(), rows, 1), ValueError,
         "logits must be square attention logits (B, H, N, N), got shape [2, 3, 7, 6]"),
        ((logits.transpose(2, 3), rows, 1), ValueError, "logits must be contiguous"),
        ((logits.long(), rows, 1), TypeError, "logits must have dtype in {Float, Double}, got Long"),
        ((logits[0], rows, 1), ValueError, "logits must be 4-D (B, H, N, N), got shape [3, 7, 7]"),
        ((logits, rows[:, :0], 1), ValueError, "row_index must pick at least one row per sample, got shape [2, 0]"),
    ):
        with pytest.raises(error, match=re.escape(message)):
            op(*bad)
    bop = torch.ops.maskaq.patch_similarity_entropy_backward
    with pytest.raises(BAD, match="grad"):
        bop(torch.ones(3), logits, rows, 1)
    with pytest.raises(IndexError, match=re.escape("row_index values must lie in [0, 6) (rows")):
        bop(torch.ones(2), logits, torch.tensor([[0, 99], [1, 2]]), 1)


def test_patch_similarity_entropy_python_errors_are_clear():
    logits = randn(2, 3, 7, 7, seed=0)
    with pytest.raises(IndexError, match=re.escape("row_index values must lie in [0, 6) (rows of the patch block)")):
        ref.patch_similarity_entropy(logits, row_index=torch.tensor([[0, 6], [1, 2]]))
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        ops.patch_similarity_entropy(logits, num_prefix_tokens=7)
    with pytest.raises(ValueError, match="num_rows"):
        ops.patch_similarity_entropy(logits, num_rows=0)
    with pytest.raises(ValueError, match="square"):
        ops.patch_similarity_entropy(logits[..., :5])
    with pytest.raises(TypeError, match="int64"):
        ops.patch_similarity_entropy(logits, row_index=torch.zeros(2, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="device"):
        ops.patch_similarity_entropy(logits, row_index=torch.zeros(2, 3, dtype=torch.long, device="meta"))


@needs_ext
def test_masked_attention_align_rejects_bad_input():
    op = torch.ops.maskaq.masked_attention_align
    cls_t, cls_q = randn(2, 3, 2, 8, seed=0), randn(2, 3, 2, 8, seed=1)
    rand = torch.rand(3, 8, generator=gen(0))
    for bad, error, message in (
        ((cls_t, cls_q[:, :2], rand, 0.5, 0.7), ValueError, "cls_q must be contiguous"),
        ((cls_t, cls_q.float(), rand, 0.5, 0.7), TypeError, "cls_q (Float) must have the dtype of cls_t (Double)"),
        ((cls_t, cls_q, rand[:2], 0.5, 0.7), ValueError, "rand must have shape (B, M) = (3, 8), got [2, 8]"),
        ((cls_t, cls_q, rand.long(), 0.5, 0.7), TypeError, "rand must be a floating tensor of uniform [0, 1) draws"),
        ((cls_t, cls_q, rand, 0.0, 0.7), ValueError, "ratio (the top-k fraction) must lie in (0, 1], got 0"),
        ((cls_t, cls_q, rand, 1.5, 0.7), ValueError, "ratio (the top-k fraction) must lie in (0, 1], got 1.5"),
        ((cls_t, cls_q, rand, 0.5, 0.0), ValueError, "keep (the kept fraction of the top-k) must lie in (0, 1], got 0"),
        ((cls_t, cls_q, torch.full((3, 8), float("nan")), 0.5, 0.7), ValueError,
         "rand must hold finite uniform draws, got nan"),
        ((cls_t[0], cls_q[0], rand, 0.5, 0.7), ValueError, "cls_t must be 4-D (L, B, H, M), got shape [3, 2, 8]"),
        ((cls_t.transpose(0, 1), cls_q.transpose(0, 1), rand, 0.5, 0.7), ValueError, "cls_t must be contiguous"),
        ((cls_t.long(), cls_q.long(), rand, 0.5, 0.7), TypeError, "cls_t must have dtype in {Float, Double}, got Long"),
    ):
        with pytest.raises(error, match=re.escape(message)):
            op(*bad)
    bop = torch.ops.maskaq.masked_attention_align_backward
    mask = torch.ones(3, 8, dtype=F64)
    with pytest.raises(BAD, match="grad"):
        bop(torch.ones(2, dtype=F64), cls_t, cls_q, mask)
    with pytest.raises(BAD, match="mask"):
        bop(torch.tensor(1.0, dtype=F64), cls_t, cls_q, mask[:2])
    with pytest.raises(BAD, match="mask"):
        bop(torch.tensor(1.0, dtype=F64), cls_t, cls_q, mask.float())


def test_masked_attention_align_python_errors_are_clear():
    cls_t, cls_q = randn(2, 3, 2, 8, seed=0), randn(2, 3, 2, 8, seed=1)
    with pytest.raises(ValueError, match="ratio"):
        ops.masked_attention_align(cls_t, cls_q, ratio=0.0)
    with pytest.raises(ValueError, match="keep"):
        ops.masked_attention_align(cls_t, cls_q, ratio=0.5, keep=1.5)
    with pytest.raises(ValueError, match="generator or seed"):
        ops.masked_attention_align(cls_t, cls_q, ratio=0.5, seed=1, generator=gen(1))
    with pytest.raises(ValueError, match=r"\(B, M\)"):
        ops.masked_attention_align(cls_t, cls_q, ratio=0.5, rand=torch.rand(3, 7))


# --------------------------------------------------------------------------------------
# Fallback and the build


@pytest.mark.skipif(not HAS_EXT, reason="maskaq._C not built")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("quantized", [False, True], ids=["full", "quantized"])
def test_fq_attention_low_precision_runs_the_float32_kernel_on_cpu(dtype, quantized):
    """bfloat16 / float16 on the CPU (autocast's students): out, logits and the gradients are the
    float32 kernel's on the upcast operands, rounded once to the dtype, bit for bit."""
    q, k, v = (randn(2, 3, 13, 8, seed=i, dtype=dtype).requires_grad_() for i in range(3))
    kw = quant_params(q.float(), k.float(), v.float(), 4, True, 4) if quantized else {}
    out, logits = ops.fq_attention(q, k, v, return_logits=True, **kw)
    assert out.dtype == dtype and logits.dtype == dtype
    go = randn(*out.shape, seed=5, dtype=dtype)
    grads = torch.autograd.grad((out * go).sum() + logits.float().sum(), [q, k, v])
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    out32, logits32 = ops.fq_attention(q32, k32, v32, return_logits=True, **kw)
    grads32 = torch.autograd.grad((out32.to(dtype) * go).sum() + logits32.to(dtype).float().sum(), [q32, k32, v32])
    assert torch.equal(out, out32.to(dtype)) and torch.equal(logits, logits32.to(dtype))
    for g, g32 in zip(grads, grads32):
        assert g.dtype == dtype and torch.equal(g, g32.to(dtype))


def test_unsupported_dtype_falls_back_to_reference():
    """bfloat16 entropy on the CPU has no compiled kernel: the reference answers, with the same draws."""
    logits = randn(2, 2, 9, 9, seed=1, dtype=torch.bfloat16)
    h = ops.patch_similarity_entropy(logits, num_rows=4, generator=gen(0))
    assert torch.equal(h, ref.patch_similarity_entropy(logits, num_rows=4, generator=gen(0)))


def test_extension_built():
    """CI sets MASKAQ_REQUIRE_EXTENSION=1: then a missing maskaq._C fails here instead of
    being hidden by the reference fallback."""
    if os.environ.get("MASKAQ_REQUIRE_EXTENSION") == "1":
        assert HAS_EXT, f"maskaq._C did not load: {_extension.load_error()}"
    elif not HAS_EXT:
        pytest.skip(f"maskaq._C not built ({_extension.load_error()}); set MASKAQ_REQUIRE_EXTENSION=1 to fail")
    for name in ("fq_attention", "fq_attention_backward", "patch_similarity_entropy",
                 "patch_similarity_entropy_backward", "masked_attention_align",
                 "masked_attention_align_backward"):
        assert hasattr(torch.ops.maskaq, name), name
    q = randn(1, 1, 5, 8, seed=0, dtype=torch.float32)
    assert ops.uses_extension(q)


def test_fallback_without_extension_matches_reference(monkeypatch):
    """With maskaq._C missing the public functions answer with the reference."""
    monkeypatch.setattr(_extension, "loaded", lambda: False)
    q, k, v = (randn(2, 2, 9, 8, seed=i, requires_grad=True) for i in range(3))
    kw = quant_params(q, k, v, 4, True, 1)
    out, logits, grads = fq_grads(ops.fq_attention, q, k, v, kw, 2)
    out_r, logits_r, grads_r = fq_grads(ref.fq_attention, q, k, v, kw, 2)
    assert torch.equal(out, out_r) and all(torch.equal(a, b) for a, b in zip(grads, grads_r))
    logits = randn(2, 2, 9, 9, seed=3)
    assert torch.equal(ops.patch_similarity_entropy(logits, num_rows=4, generator=gen(0)),
                       ref.patch_similarity_entropy(logits, num_rows=4, generator=gen(0)))
    cls_t, cls_q = randn(2, 2, 2, 8, seed=4), randn(2, 2, 2, 8, seed=5)
    loss, mask = ops.masked_attention_align(cls_t, cls_q, ratio=0.5, seed=1)
    loss_r, mask_r = ref.masked_attention_align(cls_t, cls_q, ratio=0.5, seed=1)
    assert torch.equal(loss, loss_r) and torch.equal(mask, mask_r)


def test_loop_baselines_agree_where_no_draw_is_involved():
    """The per-sample loops of benchmarks/loop_baselines.py compute the same losses (they
    draw differently, so compare where nothing is drawn: all rows, keep = 1)."""
    loops = load_benchmark("loop_baselines")
    logits = randn(3, 2, 12, 12, seed=1, requires_grad=True)
    h_loop = loops.patch_similarity_entropy_loop(logits, num_rows=64)
    torch.testing.assert_close(h_loop, ops.patch_similarity_entropy(logits, num_rows=64))
    cls_t, cls_q = randn(4, 3, 2, 20, seed=2), randn(4, 3, 2, 20, seed=3, requires_grad=True)
    loss_loop, mask_loop = loops.masked_attention_align_loop(cls_t, cls_q, ratio=0.3, keep=1.0)
    loss, mask = ops.masked_attention_align(cls_t, cls_q, ratio=0.3, keep=1.0, seed=0)
    assert torch.equal(mask_loop, mask)
    torch.testing.assert_close(loss_loop, loss)
    _, mask_loop = loops.masked_attention_align_loop(cls_t, cls_q, ratio=0.3, keep=0.7, generator=gen(0))
    assert (mask_loop.sum(1) == 4).all() and (mask_loop <= mask).all()
    from maskaq.synthesis.losses import inter_head_ssim_loss
    blocks = [randn(2, 3, 17, 17, seed=4, requires_grad=True), randn(2, 3, 17, 17, seed=5)]
    ssim_loop = loops.inter_head_ssim_loss_loop(blocks, num_prefix_tokens=1)
    ssim = inter_head_ssim_loss(blocks, num_prefix_tokens=1)
    torch.testing.assert_close(ssim_loop, ssim, rtol=1e-4, atol=1e-6)
    g_loop, = torch.autograd.grad(ssim_loop, blocks[0])
    g, = torch.autograd.grad(ssim, blocks[0])
    torch.testing.assert_close(g_loop, g, rtol=1e-3, atol=1e-6)


# --------------------------------------------------------------------------------------------
# lsq_fake_quant: a frozen per-tensor grid in one pass each way (CPU)

def _lsq_inputs(shape, qmin, qmax, dtype, seed):
    """x spread past both ends of the grid, every 7th value on an exact x/α + round(z) = k + ½ tie,
    and a NaN (propagated forward, no gradient); a random step and a non-integer zero point."""
    g = gen(seed)
    step = (torch.rand(1, generator=g, dtype=torch.float64) * 0.1 + 0.01).to(dtype)
    zero_point = (torch.randn(1, generator=g, dtype=torch.float64) * 3).to(dtype)
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) * float(step) * (qmax - qmin) * 0.6
    flat = x.view(-1)
    flat[::7] = (torch.floor(flat[::7] / step) + 0.5) * step  # x/α on a tie (round(z) is an integer)
    if flat.numel() > 3:
        flat[1] = float("nan")
    return x, step, zero_point


@needs_ext
@pytest.mark.parametrize("shape", [(1,), (3, 5), (8, 197, 192), (2, 50, 17), (40001,)])
@pytest.mark.parametrize("grid", [(0, 15), (-8, 7), (0, 255), (-128, 127), (-4, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lsq_fake_quant_is_the_quantizers_composition_bit_for_bit(shape, grid, dtype):
    """Forward and straight-through backward give maskaq.quant's PyTorch composition (_LsqFakeQuant)
    bit for bit, ties, clamped values, signed zeros and NaN included."""
    from maskaq.quant.quantizers import _LsqFakeQuant

    qmin, qmax = grid
    x, step, zero_point = _lsq_inputs(shape, qmin, qmax, dtype, seed=sum(shape) + qmax)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1 = ops.lsq_fake_quant(x1, step, zero_point, qmin, qmax)
    y2 = _LsqFakeQuant.apply(x2, step, zero_point, qmin, qmax, 1.0)
    grad = torch.randn(shape, generator=gen(1), dtype=torch.float64).to(dtype)
    y1.backward(grad)
    y2.backward(grad)
    assert torch.equal(y1.isnan(), y2.isnan()) and torch.equal(y1.nan_to_num(), y2.nan_to_num())
    assert torch.equal(x1.grad, x2.grad) and torch.equal(x1.grad.signbit(), x2.grad.signbit())
    clamped = (x / step + torch.round(zero_point) < qmin) | (x / step + torch.round(zero_point) > qmax)
    if x.numel() >= 100:  # both sides of the straight-through mask are exercised
        assert clamped.any() and (~clamped).any()
    assert (x1.grad[clamped] == 0).all()


def test_lsq_fake_quant_reference_path_matches_the_kernel_values():
    """Without the kernel (CUDA, other dtypes) the wrapper runs the reference fake quant: the same values."""
    x, step, zero_point = _lsq_inputs((4, 33), 0, 15, torch.float32, seed=2)
    x = x.nan_to_num()
    expected = ref.fake_quantize(x, step, zero_point, 0, 15)
    assert torch.equal(ops.lsq_fake_quant(x.bfloat16().float(), step, zero_point, 0, 15),
                       ref.fake_quantize(x.bfloat16().float(), step, zero_point, 0, 15))
    assert torch.allclose(ops.lsq_fake_quant(x, step, zero_point, 0, 15), expected, rtol=0, atol=1e-6 * float(step))


@pytest.mark.parametrize("bad, error, message", [
    (dict(step=torch.ones(2)), ValueError, "one-element"),
    (dict(zero_point=torch.zeros(1, 1, 2)), ValueError, "one-element"),
    (dict(qmin=3, qmax=3), ValueError, "below"),
    (dict(x=torch.ones(3, dtype=torch.int32)), TypeError, "floating-point"),
    (dict(step=torch.ones(1, requires_grad=True)), ValueError, "no gradient"),
])
def test_lsq_fake_quant_bad_inputs(bad, error, message):
    args = dict(x=torch.randn(3), step=torch.ones(1), zero_point=torch.zeros(1), qmin=0, qmax=15)
    args.update(bad)
    with pytest.raises(error, match=message):
        ops.lsq_fake_quant(**args)


@needs_ext
def test_lsq_fake_quant_op_bad_inputs():
    x = torch.randn(4, 5)
    with pytest.raises(ValueError, match="contiguous"):
        torch.ops.maskaq.lsq_fake_quant(x.t(), torch.ones(1), torch.zeros(1), 0, 15)
    with pytest.raises(TypeError, match="step must have dtype"):
        torch.ops.maskaq.lsq_fake_quant(x, torch.ones(1, dtype=F64), torch.zeros(1), 0, 15)
    with pytest.raises(ValueError, match="one-element"):
        torch.ops.maskaq.lsq_fake_quant(x, torch.ones(2), torch.zeros(1), 0, 15)
    with pytest.raises(ValueError, match="grad must have x's shape"):
        torch.ops.maskaq.lsq_fake_quant_backward(torch.randn(5), x, torch.ones(1), torch.zeros(1), 0, 15)


@needs_ext
def test_opcheck_lsq_fake_quant():
    x = randn(3, 7, seed=1, requires_grad=True)
    step, zero_point = torch.full((1,), 0.05, dtype=x.dtype), torch.full((1,), 1.4, dtype=x.dtype)
    torch.library.opcheck(torch.ops.maskaq.lsq_fake_quant.default, (x, step, zero_point, -8, 7))
    torch.library.opcheck(torch.ops.maskaq.lsq_fake_quant_backward.default,
                          (randn(3, 7, seed=2), x.detach(), step, zero_point, -8, 7))


@needs_ext
def test_quantizer_takes_the_kernel_only_for_a_fixed_grid(monkeypatch):
    """maskaq.quant's activation quantizer runs the fused op when its grid gets no gradient (a frozen
    student) and its own autograd Function when the grid is being learned (QAT)."""
    from maskaq.quant import quantizers

    calls = []
    real = ops.lsq_fake_quant
    monkeypatch.setattr(ops, "lsq_fake_quant", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = randn(2, 9, seed=3, requires_grad=True)
    step = torch.full((1,), 0.1, requires_grad=True)
    zero_point = torch.zeros(1, requires_grad=True)
    learned = quantizers.lsq_fake_quant(x, step, zero_point, 0, 15)
    learned.sum().backward()
    assert not calls and step.grad is not None
    frozen = quantizers.lsq_fake_quant(x, step.detach(), zero_point.detach(), 0, 15)
    assert calls and torch.equal(frozen, learned)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_frozen_quantizer_of_low_precision_input_works_in_float32(dtype):
    """An autocast student's bf16 / fp16 activation quantizes on the float32 grid it is evaluated
    with (not on a step rounded to the dtype): x̂ is the float32 op's, rounded once to the dtype, and
    the gradient passes where the float32 x lies inside the grid."""
    from maskaq.quant import quantizers

    step, zero_point = torch.full((1,), 0.0371), torch.full((1,), 3.4)
    assert step.to(dtype).item() != step.item()  # a step the dtype cannot hold
    x = (randn(4, 33, seed=7) * 0.3).to(dtype).requires_grad_()
    y = quantizers.lsq_fake_quant(x, step, zero_point, 0, 15)
    x32 = x.detach().float().requires_grad_()
    y32 = ops.lsq_fake_quant(x32, step, zero_point, 0, 15)
    assert y.dtype == dtype and torch.equal(y, y32.to(dtype))
    g = randn(4, 33, seed=8).to(dtype)
    y.backward(g)
    y32.backward(g.float())
    assert torch.equal(x.grad, x32.grad.to(dtype))
    inside = (x32.detach() / step + zero_point.round() >= 0) & (x32.detach() / step + zero_point.round() <= 15)
    assert 0 < int(inside.sum()) < inside.numel()  # both regimes occur


# --------------------------------------------------------------------------------------
# inter_head_ssim

SSIM_SHAPES = [((2, 3, 11, 11), 1), ((3, 12, 17, 17), 0), ((1, 1, 9, 9), 2), ((2, 4, 40, 40), 1)]


def ssim_inputs(shape, seed, dtype):
    """Logits on a coarse grid of 9 values, so many key maps take their min and max more than once
    (the gradient goes to the first index, as for torch.min/max)."""
    return (randn(*shape, seed=seed) * 2).round().clamp(-4, 4).to(dtype).requires_grad_()


def ssim_double_noise(shape, prefix, w):
    """What double rounding leaves in a gradient element: its terms are the upstream gradient over
    the M·H² pairs times O(1) derivatives (logits of order 1 to 10), summed over a few hundred
    operations; 2^-45 of that covers them (it matters where the loss is flat, e.g. one head)."""
    M, H = shape[2] - prefix, shape[1]
    return 2.0 ** -45 * float(w.abs().max()) / (M * H * H)


@needs_ext
@pytest.mark.parametrize("shape,prefix", SSIM_SHAPES)
def test_inter_head_ssim_matches_reference_float64(shape, prefix):
    """Value and dense gradient against the reference's composition in float64, on ties."""
    x = ssim_inputs(shape, 0, F64)
    got, want = ops.inter_head_ssim(x, num_prefix_tokens=prefix), ref.inter_head_ssim(x, prefix)
    assert got.shape == (shape[0],)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    w = randn(shape[0], seed=10)
    (gx,) = torch.autograd.grad((got * w).sum(), x)
    (wx,) = torch.autograd.grad((want * w).sum(), x)
    torch.testing.assert_close(gx, wx, rtol=1e-9, atol=ssim_double_noise(shape, prefix, w))
    assert not gx[:, :, :prefix].any() and not gx[..., :prefix].any()


@needs_ext
@pytest.mark.parametrize("shape,prefix", SSIM_SHAPES)
def test_inter_head_ssim_float32_rounds_once(shape, prefix):
    """float32 logits: the kernel works in double and rounds each output once, so the value and
    every gradient element lie within half a float32 ulp (2^-24 relative) of float64 on the same
    inputs, plus double's own rounding (a few hundred 2^-53 of the largest gradient, far below)."""
    x = (randn(*shape, seed=1) * 3).float().requires_grad_()
    x64 = x.detach().double().requires_grad_()
    got, want = ops.inter_head_ssim(x, num_prefix_tokens=prefix), ref.inter_head_ssim(x64, prefix)
    assert got.dtype == torch.float32
    assert_within(got, want, want.abs() * 2.0 ** -24 + 1e-300, what="loss")
    w = randn(shape[0], seed=20).float().double()  # weights float32 holds exactly
    (gx,) = torch.autograd.grad((got * w.float()).sum(), x)
    (wx,) = torch.autograd.grad((want * w).sum(), x64)
    assert_within(gx, wx, wx.abs() * 2.0 ** -24 + ssim_double_noise(shape, prefix, w), what="grad")


@needs_ext
def test_ssim_loss_takes_the_kernel_on_cpu(monkeypatch):
    """L_ssim runs inter_head_ssim on the CPU, with the value and gradient of the composed path
    (float64, to rounding), and in recompute mode too."""
    from maskaq.synthesis import losses

    x = ssim_inputs((2, 3, 13, 13), 3, F64)
    calls = []
    real = ops.inter_head_ssim
    monkeypatch.setattr(ops, "inter_head_ssim", lambda *a, **k: calls.append(1) or real(*a, **k))
    fused = losses.inter_head_ssim_loss([x, x * 0.5], 1)
    (g_fused,) = torch.autograd.grad(fused, x)
    (g_recomputed,) = torch.autograd.grad(losses.inter_head_ssim_loss([x, x * 0.5], 1, recompute=True), x)
    assert len(calls) == 6  # two blocks, then two more, each run again in the backward (recompute)
    monkeypatch.setattr(ops, "uses_extension", lambda t: False)
    calls.clear()
    composed = losses.inter_head_ssim_loss([x, x * 0.5], 1)
    (g_composed,) = torch.autograd.grad(composed, x)
    assert not calls
    torch.testing.assert_close(fused, composed, rtol=1e-12, atol=0)
    torch.testing.assert_close(g_fused, g_composed, rtol=1e-9, atol=1e-12 * float(g_composed.abs().max()))
    assert torch.equal(g_fused, g_recomputed)


@needs_ext
def test_inter_head_ssim_rejects_bad_input():
    op, bop = torch.ops.maskaq.inter_head_ssim, torch.ops.maskaq.inter_head_ssim_backward
    logits = randn(2, 3, 7, 7, seed=0, dtype=torch.float32)
    for bad, error, message in (
        ((logits, 7, 1e-4, 9e-4), ValueError, "num_prefix_tokens must lie in [0, N) with N = 7, got 7"),
        ((logits[..., :6].contiguous(), 1, 1e-4, 9e-4), ValueError,
         "logits must be square attention logits (B, H, N, N), got shape [2, 3, 7, 6]"),
        ((logits.transpose(2, 3), 1, 1e-4, 9e-4), ValueError, "logits must be contiguous"),
        ((logits.long(), 1, 1e-4, 9e-4), TypeError, "logits must have dtype in {Float, Double}, got Long"),
        ((logits[0], 1, 1e-4, 9e-4), ValueError, "logits must be 4-D (B, H, N, N), got shape [3, 7, 7]"),
    ):
        with pytest.raises(error, match=re.escape(message)):
            op(*bad)
    for grad, error, message in (
        (torch.ones(3), ValueError, "grad has size 3 in dim 0 but 2 was expected (the batch size of logits)"),
        (torch.ones(2, dtype=F64), TypeError, "grad must have dtype in {Float}, got Double"),
        (torch.ones(2, 1), ValueError, "grad must be 1-D (B,), got shape [2, 1]"),
    ):
        with pytest.raises(error, match=re.escape(message)):
            bop(grad, logits, 1, 1e-4, 9e-4)
    with pytest.raises(ValueError, match=re.escape("num_prefix_tokens must lie in [0, N) with N = 7, got -1")):
        ops.inter_head_ssim(logits, num_prefix_tokens=-1)


@needs_ext
def test_opcheck_inter_head_ssim():
    logits = randn(2, 3, 7, 7, seed=1, requires_grad=True)
    torch.library.opcheck(torch.ops.maskaq.inter_head_ssim.default, (logits, 1, 1e-4, 9e-4))
    torch.library.opcheck(torch.ops.maskaq.inter_head_ssim_backward.default,
                          (randn(2, seed=2), logits.detach(), 1, 1e-4, 9e-4))
