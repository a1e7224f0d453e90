"""CUDA kernels of maskaq._C against the plain-PyTorch reference (maskaq.reference).

Every test here needs a CUDA device and is skipped without one. Where a device exists, the
extension must have been built with its CUDA kernels: a missing kernel fails the tests
instead of silently testing the reference against itself.

The reference runs on the CPU in float32 on exactly the values the kernel saw (inputs cast
to the kernel dtype and back), so float32 kernels are held tightly and float16 / bfloat16
kernels by their rounding of the products and outputs (float accumulation inside). Fake
quantization makes rare exact disagreements legitimate: after a different summation order a
probability sitting on a rounding boundary can land on the neighbouring level, which moves the
output, dv and the P quantizer's LSQ sums by a known amount per flip; those comparisons allow
a few flips (FLIPS_ALLOWED) on top of the dtype's tolerance.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

import maskaq
from maskaq import ops, reference

# MASKAQ_TEST_DEVICE=cpu dry-runs this harness against the CPU kernels (float32/float64).
DEVICE = os.environ.get("MASKAQ_TEST_DEVICE", "cuda")
DTYPES = (torch.float32, torch.float16, torch.bfloat16) if DEVICE == "cuda" else (torch.float32, torch.float64)

cuda_only = pytest.mark.skipif(DEVICE != "cuda", reason="tests CUDA-specific behaviour")

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"),
]

# Per dtype: rel = bound on the relative norm error of a whole tensor; elem = elementwise
# tolerance relative to |expected| + the tensor's largest magnitude; share = fraction of
# elements allowed off the elementwise tolerance. float16/bfloat16 are held to their rounding
# of q̂, k̂ and of the products (float32 reference on the same inputs), which also moves some
# probabilities across a quantization level: hence the looser bounds.
TOLERANCES = {
    torch.float32: dict(rel=1e-4, elem=1e-4, share=1e-3),
    torch.float16: dict(rel=5e-2, elem=2e-2, share=5e-2),
    torch.bfloat16: dict(rel=1.5e-1, elem=6e-2, share=1e-1),
    torch.float64: dict(rel=1e-8, elem=1e-8, share=1e-3),
}
FLIPS_ALLOWED = 3  # probability levels that may round the other way after a different summation order


def _device_kernels_present() -> bool:
    info = maskaq.extension_info()
    return info["loaded"] and (DEVICE == "cpu" or info["with_cuda"])


@pytest.fixture(autouse=True)
def _cuda_kernels_built():
    """Fail (not skip) where a GPU exists but the CUDA kernels were not built or loaded."""
    info = maskaq.extension_info()
    assert _device_kernels_present(), (
        f"maskaq._C has no {DEVICE} kernels (extension_info: {info}); rebuild with MASKAQ_CUDA=1 "
        "pip install --no-build-isolation -e .")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _to_kernel(x: torch.Tensor, dtype) -> torch.Tensor:
    """x on the test device in the kernel dtype."""
    return x.to(DEVICE, dtype).contiguous()


def _as_reference_input(x: torch.Tensor) -> torch.Tensor:
    """What the reference sees: the kernel's input values, on the CPU in float32 (float64
    when the kernel itself runs in float64)."""
    ref_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.detach().to("cpu", ref_dtype).clone()


def _subnormal_half_spacing(dtype) -> float:
    """Largest rounding error of a value below the normal range of ``dtype``: half the
    spacing of its subnormals (2^-25 for float16; negligible for the others)."""
    info = torch.finfo(dtype)
    return info.smallest_normal * info.eps / 2


def assert_close(actual, expected, dtype, name, scale=1.0, slack=0.0, elem_slack=None):
    """Whole-tensor relative error (plus ``slack``: how far a few legitimate level flips can
    move its norm) and the share of elements off an elementwise tolerance (plus
    ``elem_slack``, what one flip can move one element; default ``slack``). Both also allow
    the rounding of an output below the dtype's normal range, where the error is absolute
    (float16 gradients of ~1e-6 carry ~2 % relative error from their rounding alone)."""
    tol = TOLERANCES[dtype]
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    subnormal_rounding = _subnormal_half_spacing(dtype)
    elem_slack = (slack if elem_slack is None else elem_slack) + subnormal_rounding
    slack = slack + subnormal_rounding * math.sqrt(e.numel())
    assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != reference {tuple(e.shape)}"
    assert torch.isfinite(a).all(), f"{name}: non-finite values in the kernel output"
    assert torch.isfinite(e).all(), f"{name}: non-finite values in the reference (test setup)"
    if e.numel() == 0:
        return
    magnitude = e.abs().max().item()
    err = (a - e).norm().item()
    ref_norm = e.norm().item()
    bound = tol["rel"] * scale * ref_norm + slack + 1e-30
    assert err <= bound, (f"{name}: error norm {err:.3e} > {bound:.3e} "
                          f"(relative {err / max(ref_norm, 1e-30):.3e}, slack {slack:.1e})")
    off = (a - e).abs() > tol["elem"] * scale * (e.abs() + magnitude) + elem_slack
    share = off.double().mean().item()
    assert share <= tol["share"], (
        f"{name}: {share:.2%} of elements off by more than {tol['elem'] * scale:.0e} relative; "
        f"worst {(a - e).abs().max().item():.3e} (largest magnitude {magnitude:.3e})")


# ------------------------------------------------------------------------------------------
# fq_attention

FQ_SHAPES = [(1, 1, 5, 8), (2, 3, 17, 32), (3, 2, 50, 64), (2, 3, 65, 8), (1, 2, 197, 64),
             (8, 6, 17, 32), (2, 1, 1, 8), (1, 2, 300, 16)]


def _ranges(bits: int, signed: bool):
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)


def _quant_args(q, k, v, bits: int, signed: bool, with_zero_point: bool, gen):
    """LSQ-initialized steps (2·mean|x|/sqrt(qmax)) and random zero points, so that both the
    in-range and the clamped branch of every quantizer are exercised."""
    lo, hi = _ranges(bits, signed)
    p_lo, p_hi = _ranges(bits, False)  # probabilities are non-negative
    N = q.shape[2]
    steps = [2 * x.abs().mean().item() / math.sqrt(hi) for x in (q, k)]
    steps.insert(2, 2 * (1.0 / N) / math.sqrt(p_hi))
    steps.append(2 * v.abs().mean().item() / math.sqrt(hi))
    step = torch.tensor(steps, dtype=torch.float32)
    zero_point = None
    if with_zero_point:
        centre = 0.0 if signed else hi / 2
        zero_point = torch.empty(4).uniform_(-1.5, 1.5, generator=gen) + centre
        zero_point[2] = torch.empty(()).uniform_(-0.6, 0.6, generator=gen)
    return step, zero_point, [lo, lo, p_lo, lo], [hi, hi, p_hi, hi]


def _fq_case(index: int):
    dtype = DTYPES[index % len(DTYPES)]
    shape = FQ_SHAPES[index % len(FQ_SHAPES)]
    bits = 2 + index % 7
    signed = index % 2 == 0
    with_zero_point = index % 4 != 3
    return dtype, shape, bits, signed, with_zero_point


FQ_CASES = [_fq_case(i) for i in range(24)]


def _fq_inputs(shape, seed):
    g = _gen(seed)
    q, k, v = (torch.randn(shape, generator=g) for _ in range(3))
    return q, k, v, g


def _run_fq(q, k, v, step, zero_point, qmin, qmax, grad_out, grad_logits, impl):
    """Forward and backward of one implementation; returns outputs and every gradient."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    params = [None if t is None else t.detach().clone().requires_grad_() for t in (step, zero_point)]
    out, logits = impl(*leaves, step=params[0], zero_point=params[1], qmin=qmin, qmax=qmax,
                       return_logits=grad_logits is not None)
    loss = (out * grad_out).sum()
    if grad_logits is not None:
        loss = loss + (logits * grad_logits).sum()
    loss.backward()
    grads = [t.grad for t in leaves] + [None if p is None else p.grad for p in params]
    return out, logits, grads


@pytest.mark.parametrize("dtype,shape,bits,signed,with_zero_point", FQ_CASES,
                         ids=[f"{str(c[0])[6:]}-{'x'.join(map(str, c[1]))}-{c[2]}b-{'s' if c[3] else 'u'}"
                              f"{'-z' if c[4] else ''}" for c in FQ_CASES])
@pytest.mark.parametrize("with_logits", [False, True])
def test_fq_attention_matches_reference(dtype, shape, bits, signed, with_zero_point, with_logits):
    q, k, v, g = _fq_inputs(shape, seed=bits * 1000 + shape[2])
    qk, kk, vk = (_to_kernel(t, dtype) for t in (q, k, v))
    qr, kr, vr = (_as_reference_input(t) for t in (qk, kk, vk))
    step, zero_point, qmin, qmax = _quant_args(qr, kr, vr, bits, signed, with_zero_point, g)
    if dtype == torch.float64:  # CPU dry run: parameters in the kernel dtype too
        step, zero_point = step.double(), None if zero_point is None else zero_point.double()
    B, H, N, d = shape
    grad_out_k = _to_kernel(torch.randn(shape, generator=g), dtype)
    grad_logits_k = _to_kernel(torch.randn(B, H, N, N, generator=g) * 0.1, dtype) if with_logits else None
    grad_out = _as_reference_input(grad_out_k)
    grad_logits = None if grad_logits_k is None else _as_reference_input(grad_logits_k)

    out_r, logits_r, grads_r = _run_fq(qr, kr, vr, step, zero_point, qmin, qmax, grad_out, grad_logits,
                                       reference.fq_attention)
    out_k, logits_k, grads_k = _run_fq(
        qk, kk, vk, step.to(DEVICE), None if zero_point is None else zero_point.to(DEVICE), qmin, qmax,
        grad_out_k, grad_logits_k, ops.fq_attention)

    assert out_k.dtype == dtype and out_k.device.type == DEVICE
    flips = _flip_slack(vr, step, zero_point, qmin, qmax, grad_out)
    assert_close(out_k, out_r, dtype, "out", slack=flips["out"], elem_slack=flips["out_elem"])
    if with_logits:
        assert_close(logits_k, logits_r, dtype, "logits")
    for name, gk, gr in zip(("grad q", "grad k"), grads_k[:2], grads_r[:2]):
        assert gk.dtype == dtype
        assert_close(gk, gr, dtype, name, scale=2.0)
    assert grads_k[2].dtype == dtype
    assert_close(grads_k[2], grads_r[2], dtype, "grad v", scale=2.0, slack=flips["dv"], elem_slack=flips["dv_elem"])
    assert_lsq_grads_close(grads_k[3], grads_r[3], grads_k[4], grads_r[4], dtype, flips)


def assert_lsq_grads_close(step_k, step_r, zero_k, zero_r, dtype, flips):
    """The LSQ gradients (sums over whole tensors), jointly: each within a tolerance relative
    to the largest of them, since a zero-point gradient that is 0 in exact arithmetic comes out
    of the reference's autograd as a round-off residual. Only the P quantizer (index 2) can see
    level flips; in float16/bfloat16 a share of all N² probabilities sits within rounding of a
    level boundary, so its two sums are held to 50% there (those of q, k, v stay tight)."""
    if zero_r is None:
        assert zero_k is None
        zero_k, zero_r = torch.zeros(4), torch.zeros(4)
    a = torch.cat([step_k.detach().cpu(), zero_k.detach().cpu()]).double()
    e = torch.cat([step_r.detach().cpu(), zero_r.detach().cpu()]).double()
    rel = torch.full((8,), 3 * TOLERANCES[dtype]["rel"], dtype=torch.float64)
    if dtype not in (torch.float32, torch.float64):
        rel[2] = rel[6] = 0.5
    slack = torch.zeros(8, dtype=torch.float64)
    slack[2], slack[6] = flips["step"], flips["zero_point"]
    allowed = rel * (e.abs() + e.abs().max()) + slack
    bad = (a - e).abs() > allowed
    assert not bad.any(), (f"LSQ gradients (step q, k, p, v, then zero point) differ: kernel {a.tolist()}, "
                           f"reference {e.tolist()}, allowed {allowed.tolist()}")


def _flip_slack(v, step, zero_point, qmin, qmax, grad_out):
    """How far FLIPS_ALLOWED probabilities rounded to the neighbouring level (a different
    summation order puts some P/α right on a rounding boundary) can move each compared result:
    one flip changes one P̂ entry by α_p."""
    with torch.no_grad():
        zp = None if zero_point is None else zero_point[3]
        v_hat = reference.fake_quantize(v, step[3], zp, qmin[3], qmax[3])
        dp_hat = grad_out @ v_hat.transpose(-2, -1)
        alpha_p = float(step[2])
        B, H, N, _ = v.shape
        g_p = reference.lsq_grad_scale(B * H * N * N, qmax[2])
        return {
            "out": FLIPS_ALLOWED * alpha_p * v_hat.norm(dim=-1).max().item(),
            "out_elem": alpha_p * v_hat.abs().max().item(),
            "dv": FLIPS_ALLOWED * alpha_p * grad_out.norm(dim=-1).max().item(),
            "dv_elem": alpha_p * grad_out.abs().max().item(),
            "step": FLIPS_ALLOWED * g_p * dp_hat.abs().max().item(),
            "zero_point": FLIPS_ALLOWED * alpha_p * dp_hat.abs().max().item(),  # not scaled
        }


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 3, 17, 32), (1, 2, 197, 64), (3, 1, 1, 8)])
def test_fq_attention_full_precision_matches_reference(dtype, shape):
    q, k, v, g = _fq_inputs(shape, seed=7 + shape[2])
    qk, kk, vk = (_to_kernel(t, dtype) for t in (q, k, v))
    qr, kr, vr = (_as_reference_input(t) for t in (qk, kk, vk))
    B, H, N, _ = shape
    grad_out_k = _to_kernel(torch.randn(shape, generator=g), dtype)
    grad_logits_k = _to_kernel(torch.randn(B, H, N, N, generator=g) * 0.1, dtype)
    out_r, logits_r, grads_r = _run_fq(qr, kr, vr, None, None, None, None, _as_reference_input(grad_out_k),
                                       _as_reference_input(grad_logits_k), reference.fq_attention)
    out_k, logits_k, grads_k = _run_fq(qk, kk, vk, None, None, None, None, grad_out_k, grad_logits_k,
                                       ops.fq_attention)
    assert_close(out_k, out_r, dtype, "out")
    assert_close(logits_k, logits_r, dtype, "logits")
    for name, gk, gr in zip(("grad q", "grad k", "grad v"), grads_k[:3], grads_r[:3]):
        assert_close(gk, gr, dtype, name, scale=2.0)


def test_fq_attention_backward_is_deterministic():
    """The LSQ sums are reduced in a fixed order: two runs agree bit for bit."""
    shape = (4, 3, 65, 32)
    q, k, v, g = _fq_inputs(shape, seed=11)
    qk, kk, vk = (_to_kernel(t, torch.float32) for t in (q, k, v))
    step, zero_point, qmin, qmax = _quant_args(q, k, v, 4, True, True, g)
    step, zero_point = step.to(DEVICE), zero_point.to(DEVICE)
    grad_out = _to_kernel(torch.randn(shape, generator=g), torch.float32)
    first = torch.ops.maskaq.fq_attention_backward(grad_out, None, qk, kk, vk, step, zero_point, qmin, qmax, 0.2)
    second = torch.ops.maskaq.fq_attention_backward(grad_out, None, qk, kk, vk, step, zero_point, qmin, qmax, 0.2)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@cuda_only
@pytest.mark.parametrize("quantized", [False, True], ids=["full", "quantized"])
def test_fq_attention_float16_logits_beyond_float16_range(quantized):
    """float16 q, k whose logits all lie near 64·40² = 102400 (beyond float16's 65504): the kernel
    computes q̂·k̂ᵀ in float32, so output and gradients are finite and equal float64 on the same
    inputs (power-of-two steps keep x / α exact in float16)."""
    g = _gen(41)
    shape = (2, 3, 65, 64)
    q, k = (torch.randn(shape, generator=g) * 4 + 40 for _ in range(2))
    v, grad_out = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    qk, kk, vk, gk = (_to_kernel(t, torch.float16) for t in (q, k, v, grad_out))
    step = qmin = qmax = None
    if quantized:
        step, qmin, qmax = torch.tensor([0.5, 0.5, 1 / 256, 1 / 16]), [-128, -128, 0, -128], [127, 127, 255, 127]
    out_k, _, grads_k = _run_fq(qk, kk, vk, None if step is None else step.to(DEVICE), None, qmin, qmax, gk, None,
                                ops.fq_attention)
    as64 = [t.detach().to("cpu", torch.float64) for t in (qk, kk, vk, gk)]
    out_r, _, grads_r = _run_fq(*as64[:3], None if step is None else step.double(), None, qmin, qmax, as64[3],
                                None, reference.fq_attention)
    assert out_k.dtype == torch.float16
    for name, a, e in [("out", out_k, out_r), *zip(("grad q", "grad k", "grad v"), grads_k[:3], grads_r[:3])]:
        a = a.detach().to("cpu", torch.float64)
        assert torch.isfinite(a).all(), f"{name}: non-finite values"
        torch.testing.assert_close(a, e, rtol=1e-2, atol=1e-2 * e.abs().max().item(), msg=name)


@cuda_only
def test_fq_attention_products_ignore_tf32():
    """float32 products stay float32 when the caller allows TF32 (about 5e-4 relative error per
    product, far above float32's): logits, output and dq against float64 on the same inputs."""
    shape = (2, 3, 65, 64)
    q, k, v, g = _fq_inputs(shape, seed=43)
    grad_out = torch.randn(shape, generator=g)
    qk, kk, vk, gk = (_to_kernel(t, torch.float32) for t in (q, k, v, grad_out))
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # TF32 allowed for cuBLAS float32 matmuls
    try:
        out_k, logits_k, grads_k = _run_fq(qk, kk, vk, None, None, None, None, gk, torch.zeros_like(gk[..., :1]),
                                           ops.fq_attention)
    finally:
        torch.set_float32_matmul_precision(before)
    as64 = [t.detach().to("cpu", torch.float64) for t in (qk, kk, vk, gk)]
    out_r, logits_r, grads_r = _run_fq(*as64[:3], None, None, None, None, as64[3],
                                       torch.zeros(shape[:3] + (1,), dtype=torch.float64), reference.fq_attention)
    for name, a, e in (("logits", logits_k, logits_r), ("out", out_k, out_r), ("grad q", grads_k[0], grads_r[0])):
        err = (a.detach().to("cpu", torch.float64) - e).abs().max().item()
        assert err <= 2e-5 * e.abs().max().item(), f"{name}: error {err:.2e} looks like TF32"


@cuda_only
def test_fq_attention_step_dtype_follows_parameters():
    """Gradients of float64 parameters come back in float64; absent parameters as empty."""
    shape = (1, 2, 17, 8)
    q, k, v, g = _fq_inputs(shape, seed=3)
    qk, kk, vk = (_to_kernel(t, torch.float16) for t in (q, k, v))
    step, zero_point, qmin, qmax = _quant_args(q, k, v, 4, True, True, g)
    grad_out = _to_kernel(torch.randn(shape, generator=g), torch.float16)
    outs = torch.ops.maskaq.fq_attention_backward(grad_out, None, qk, kk, vk, step.double().to(DEVICE), None,
                                                  qmin, qmax, 0.3)
    assert outs[3].dtype == torch.float64 and outs[3].shape == (4,)
    assert outs[4].numel() == 0
    fp = torch.ops.maskaq.fq_attention_backward(grad_out, None, qk, kk, vk, None, None, [], [], 0.3)
    assert fp[3].numel() == 0 and fp[4].numel() == 0


# ------------------------------------------------------------------------------------------
# patch_similarity_entropy


def _loss_scale(dtype) -> float:
    """The losses quantize nothing and compute in float32 from the same input values: in
    float16/bfloat16 only their output rounding remains, 10x below fq_attention's tolerance."""
    return 1.0 if dtype in (torch.float32, torch.float64) else 0.1

ENTROPY_CASES = [
    # (B, H, N, num_prefix_tokens, num_rows)
    (1, 1, 5, 1, 64), (2, 3, 17, 1, 64), (3, 2, 50, 0, 64), (4, 6, 65, 1, 64),
    (2, 3, 197, 1, 64), (8, 2, 17, 0, 8), (5, 4, 50, 2, 16), (1, 3, 197, 1, 200),
]


def _entropy_inputs(B, H, N, P, num_rows, seed):
    g = _gen(seed)
    logits = torch.randn(B, H, N, N, generator=g) * 3
    row_index = reference.draw_row_index(B, N - P, num_rows, generator=g)
    grad = torch.randn(B, generator=g)
    return logits, row_index, grad


def _run_entropy(logits, row_index, grad, P, impl):
    x = logits.detach().clone().requires_grad_()
    h = impl(x, num_prefix_tokens=P, row_index=row_index)
    (h * grad).sum().backward()
    return h, x.grad


def _check_entropy(dtype, logits, row_index, grad, P):
    lk = _to_kernel(logits, dtype)
    h_r, g_r = _run_entropy(_as_reference_input(lk), row_index, _as_reference_input(_to_kernel(grad, dtype)), P,
                            reference.patch_similarity_entropy)
    h_k, g_k = _run_entropy(lk, row_index.to(DEVICE), _to_kernel(grad, dtype), P, ops.patch_similarity_entropy)
    assert h_k.dtype == dtype and h_k.shape == h_r.shape
    assert g_k.dtype == dtype and g_k.shape == logits.shape
    scale = _loss_scale(dtype)
    assert_close(h_k, h_r, dtype, "h", scale=scale)
    assert_close(g_k, g_r, dtype, "grad logits", scale=3 * scale)
    untouched = g_r == 0  # rows that were not picked and the prefix columns get exactly 0
    assert (g_k.cpu()[untouched] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,H,N,P,num_rows", ENTROPY_CASES)
def test_patch_similarity_entropy_matches_reference(dtype, B, H, N, P, num_rows):
    logits, row_index, grad = _entropy_inputs(B, H, N, P, num_rows, seed=B * 100 + N)
    _check_entropy(dtype, logits, row_index, grad, P)


@pytest.mark.parametrize("dtype", DTYPES)
def test_patch_similarity_entropy_repeated_rows_add_up(dtype):
    """A row picked twice contributes twice to the gradient (scatter-add, as autograd does)."""
    B, H, N, P = 3, 2, 17, 1
    logits, _, grad = _entropy_inputs(B, H, N, P, 8, seed=5)
    row_index = torch.tensor([[0, 3, 3, 7, 0, 15], [1, 1, 1, 1, 2, 2], [5, 4, 3, 2, 1, 0]])
    _check_entropy(dtype, logits, row_index, grad, P)


# ------------------------------------------------------------------------------------------
# masked_attention_align

ALIGN_CASES = [
    # (L, B, H, M, ratio, keep)
    (1, 1, 1, 4, 0.5, 0.7), (2, 3, 2, 16, 0.5, 0.7), (12, 4, 3, 196, 0.5, 0.7),
    (4, 8, 6, 64, 0.1, 0.7), (3, 2, 4, 49, 1.0, 1.0), (6, 5, 3, 196, 0.3, 0.5), (2, 2, 2, 576, 0.25, 0.7),
]


def _align_inputs(L, B, H, M, seed):
    """Teacher logits whose block-and-head means are well separated (0.05 apart), so that the
    top-k cannot depend on the summation order; student logits near the teacher's."""
    g = _gen(seed)
    noise = torch.randn(L, B, H, M, generator=g)
    noise = noise - noise.mean(dim=(0, 2), keepdim=True)
    levels = torch.stack([torch.randperm(M, generator=g) for _ in range(B)]).float() * 0.05 - M * 0.025
    cls_t = levels[None, :, None, :] + noise
    cls_q = cls_t + 0.5 * torch.randn(L, B, H, M, generator=g)
    rand = reference.draw_keep_rand(B, M, generator=g)
    grad = torch.randn((), generator=g)
    return cls_t, cls_q, rand, grad


def _run_align(cls_t, cls_q, rand, grad, ratio, keep, impl):
    t = cls_t.detach().clone().requires_grad_()
    x = cls_q.detach().clone().requires_grad_()
    loss, mask = impl(t, x, ratio=ratio, keep=keep, rand=rand)
    (loss * grad).backward()
    torch.testing.assert_close(t.grad, -x.grad, rtol=0, atol=0)  # both sides, exact negatives
    return loss, mask, x.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L,B,H,M,ratio,keep", ALIGN_CASES)
def test_masked_attention_align_matches_reference(dtype, L, B, H, M, ratio, keep):
    cls_t, cls_q, rand, grad = _align_inputs(L, B, H, M, seed=L * 1000 + M)
    tk, qk = _to_kernel(cls_t, dtype), _to_kernel(cls_q, dtype)
    gk = _to_kernel(grad, dtype)
    loss_r, mask_r, g_r = _run_align(_as_reference_input(tk), _as_reference_input(qk), rand,
                                     _as_reference_input(gk), ratio, keep, reference.masked_attention_align)
    loss_k, mask_k, g_k = _run_align(tk, qk, rand.to(DEVICE), gk, ratio, keep, ops.masked_attention_align)
    assert mask_k.dtype == dtype and loss_k.dtype == dtype and loss_k.dim() == 0
    assert torch.equal(mask_k.cpu().float(), mask_r.float()), "the mask differs from the reference"
    k, kept = reference.alignment_counts(M, ratio, keep)
    assert (mask_k.sum(dim=1).cpu() == kept).all()
    scale = _loss_scale(dtype)
    assert_close(loss_k, loss_r, dtype, "loss", scale=scale)
    assert_close(g_k, g_r, dtype, "grad cls_q", scale=scale)


@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_attention_align_gradient_is_zero_at_exact_ties(dtype):
    """Where Σ_h t = Σ_h q exactly (|·| at its kink), the gradient is 0, as in the reference.
    Values on a 1/8 grid are exact in every dtype, and a key's heads rolled over each other
    keep its head sum exactly; a kernel that forms mean_h t − mean_h q can give ±1 ulp there
    instead (an FMA contraction did on CUDA, in float16 and bfloat16)."""
    L, B, H, M = 3, 4, 3, 64
    g = _gen(21)
    cls_t = torch.randint(-64, 65, (L, B, H, M), generator=g).float() / 8
    cls_q = cls_t + torch.randint(-8, 9, (L, B, H, M), generator=g).float() / 8
    tied = (torch.rand(L, B, 1, M, generator=g) < 0.5).expand(L, B, H, M)
    cls_q = torch.where(tied, cls_t.roll(1, dims=2), cls_q)
    rand = reference.draw_keep_rand(B, M, generator=g)
    tk, qk, gk = _to_kernel(cls_t, dtype), _to_kernel(cls_q, dtype), _to_kernel(torch.tensor(1.0), dtype)
    _, mask_r, g_r = _run_align(_as_reference_input(tk), _as_reference_input(qk), rand, _as_reference_input(gk),
                                0.5, 0.7, reference.masked_attention_align)
    _, mask_k, g_k = _run_align(tk, qk, rand.to(DEVICE), gk, 0.5, 0.7, ops.masked_attention_align)
    assert torch.equal(mask_k.cpu().float(), mask_r.float())
    kept_ties = tied & mask_r.bool()[None, :, None, :]
    assert kept_ties.sum() > 10  # the case under test occurs
    assert (g_k.cpu()[kept_ties] == 0).all(), "a tied key got a nonzero gradient"
    assert torch.equal(torch.sign(g_k.cpu().float()), torch.sign(g_r))


def test_masked_attention_align_is_reproducible_from_a_seed():
    cls_t, cls_q, _, _ = _align_inputs(3, 4, 2, 50, seed=9)
    tk, qk = _to_kernel(cls_t, torch.float32), _to_kernel(cls_q, torch.float32)
    a = ops.masked_attention_align(tk, qk, ratio=0.4, seed=123)
    b = ops.masked_attention_align(tk, qk, ratio=0.4, seed=123)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ------------------------------------------------------------------------------------------
# opcheck (schema, fake kernels, autograd registration, AOT dispatch) on the device


def _opcheck(op, args):
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration",
                                                "test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("quantized", [False, True])
def test_opcheck_fq_attention(quantized):
    shape = (2, 2, 9, 8)
    q, k, v, g = _fq_inputs(shape, seed=21)
    qk, kk, vk = (_to_kernel(t, torch.float32).requires_grad_() for t in (q, k, v))
    if quantized:
        step, zero_point, qmin, qmax = _quant_args(q, k, v, 4, True, True, g)
        step, zero_point = step.to(DEVICE).requires_grad_(), zero_point.to(DEVICE).requires_grad_()
    else:
        step = zero_point = None
        qmin = qmax = []
    _opcheck(torch.ops.maskaq.fq_attention.default, (qk, kk, vk, step, zero_point, qmin, qmax, 0.35, True))
    grad_out = _to_kernel(torch.randn(shape, generator=g), torch.float32)
    _opcheck(torch.ops.maskaq.fq_attention_backward.default,
             (grad_out, None, qk.detach(), kk.detach(), vk.detach(),
              None if step is None else step.detach(), None if zero_point is None else zero_point.detach(),
              qmin, qmax, 0.35))


def test_opcheck_patch_similarity_entropy():
    logits, row_index, grad = _entropy_inputs(3, 2, 17, 1, 8, seed=4)
    lk = _to_kernel(logits, torch.float32).requires_grad_()
    _opcheck(torch.ops.maskaq.patch_similarity_entropy.default, (lk, row_index.to(DEVICE), 1))
    _opcheck(torch.ops.maskaq.patch_similarity_entropy_backward.default,
             (_to_kernel(grad, torch.float32), lk.detach(), row_index.to(DEVICE), 1))


def test_opcheck_masked_attention_align():
    cls_t, cls_q, rand, grad = _align_inputs(3, 2, 2, 20, seed=8)
    tk, qk = _to_kernel(cls_t, torch.float32), _to_kernel(cls_q, torch.float32).requires_grad_()
    _opcheck(torch.ops.maskaq.masked_attention_align.default, (tk, qk, rand.to(DEVICE), 0.5, 0.7))
    _, mask = torch.ops.maskaq.masked_attention_align(tk, qk.detach(), rand.to(DEVICE), 0.5, 0.7)
    _opcheck(torch.ops.maskaq.masked_attention_align_backward.default,
             (_to_kernel(grad, torch.float32), tk, qk.detach(), mask))


# ------------------------------------------------------------------------------------------
# Bad input: an exception with a message, never a crash (the device stays usable)


def _small_qkv(dtype=torch.float32):
    q, k, v, _ = _fq_inputs((1, 2, 5, 8), seed=1)
    return tuple(_to_kernel(t, dtype) for t in (q, k, v))


@cuda_only
def test_bad_inputs_fq_attention():
    q, k, v = _small_qkv()
    with pytest.raises(ValueError, match="must be on"):
        torch.ops.maskaq.fq_attention(q, k.cpu(), v, None, None, [], [], 0.3, False)
    with pytest.raises(TypeError, match="dtype"):
        torch.ops.maskaq.fq_attention(q.double(), k.double(), v.double(), None, None, [], [], 0.3, False)
    with pytest.raises(TypeError, match="dtype"):
        torch.ops.maskaq.fq_attention(q, k.half(), v, None, None, [], [], 0.3, False)
    with pytest.raises(ValueError, match="contiguous"):
        torch.ops.maskaq.fq_attention(q.transpose(2, 3), k.transpose(2, 3), v.transpose(2, 3), None, None,
                                      [], [], 0.3, False)
    with pytest.raises(ValueError, match="one shape"):
        torch.ops.maskaq.fq_attention(q, k[:, :, :4].contiguous(), v, None, None, [], [], 0.3, False)
    step = torch.full((4,), 0.1)
    with pytest.raises(ValueError, match="step is on"):
        torch.ops.maskaq.fq_attention(q, k, v, step, None, [-8] * 4, [7] * 4, 0.3, False)
    with pytest.raises(ValueError, match="qmin"):
        torch.ops.maskaq.fq_attention(q, k, v, step.to(DEVICE), None, [-8] * 3, [7] * 3, 0.3, False)
    with pytest.raises(ValueError, match="must be below"):
        torch.ops.maskaq.fq_attention(q, k, v, step.to(DEVICE), None, [8] * 4, [7] * 4, 0.3, False)
    with pytest.raises(ValueError, match="1-D tensor of 4"):
        torch.ops.maskaq.fq_attention(q, k, v, torch.full((3,), 0.1, device=DEVICE), None, [-8] * 4, [7] * 4,
                                      0.3, False)
    grad_out = torch.randn(1, 2, 5, 4, device=DEVICE)
    with pytest.raises(ValueError, match="shape of q"):
        torch.ops.maskaq.fq_attention_backward(grad_out, None, q, k, v, None, None, [], [], 0.3)
    out, _ = torch.ops.maskaq.fq_attention(q, k, v, None, None, [], [], 0.3, False)  # still healthy
    assert torch.isfinite(out).all()


@cuda_only
def test_bad_inputs_patch_similarity_entropy():
    logits = torch.randn(2, 2, 9, 9, device=DEVICE)
    rows = torch.tensor([[0, 1], [2, 3]], device=DEVICE)
    with pytest.raises(IndexError, match="row_index values"):
        torch.ops.maskaq.patch_similarity_entropy(logits, torch.tensor([[0, 8], [1, 2]], device=DEVICE), 1)
    with pytest.raises(IndexError, match="row_index values"):
        torch.ops.maskaq.patch_similarity_entropy_backward(torch.ones(2, device=DEVICE), logits,
                                                           torch.tensor([[0, -1], [1, 2]], device=DEVICE), 1)
    with pytest.raises(TypeError, match="row_index"):
        torch.ops.maskaq.patch_similarity_entropy(logits, rows.int(), 1)
    with pytest.raises(ValueError, match="row_index is on"):
        torch.ops.maskaq.patch_similarity_entropy(logits, rows.cpu(), 1)
    with pytest.raises(ValueError, match="square"):
        torch.ops.maskaq.patch_similarity_entropy(logits[:, :, :8].contiguous(), rows, 1)
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        torch.ops.maskaq.patch_similarity_entropy(logits, rows, 9)
    with pytest.raises(TypeError, match="dtype"):
        torch.ops.maskaq.patch_similarity_entropy(logits.double(), rows, 1)
    h = torch.ops.maskaq.patch_similarity_entropy(logits, rows, 1)  # the device is still healthy
    assert torch.isfinite(h).all()


@cuda_only
def test_bad_inputs_masked_attention_align():
    cls_t, cls_q, rand, _ = _align_inputs(2, 2, 2, 10, seed=2)
    tk, qk, rk = (_to_kernel(t, torch.float32) for t in (cls_t, cls_q, rand))
    with pytest.raises(ValueError, match="must be on"):
        torch.ops.maskaq.masked_attention_align(tk, qk.cpu(), rk, 0.5, 0.7)
    with pytest.raises(ValueError, match="rand"):
        torch.ops.maskaq.masked_attention_align(tk, qk, rk[:, :5].contiguous(), 0.5, 0.7)
    with pytest.raises(ValueError, match="ratio"):
        torch.ops.maskaq.masked_attention_align(tk, qk, rk, 1.5, 0.7)
    with pytest.raises(ValueError, match="finite"):
        torch.ops.maskaq.masked_attention_align(tk, qk, torch.full_like(rk, float("nan")), 0.5, 0.7)
    with pytest.raises(TypeError, match="dtype"):
        torch.ops.maskaq.masked_attention_align(tk, qk.half(), rk, 0.5, 0.7)
    loss, mask = torch.ops.maskaq.masked_attention_align(tk, qk, rk, 0.5, 0.7)
    with pytest.raises(ValueError, match="mask"):
        torch.ops.maskaq.masked_attention_align_backward(torch.ones((), device=DEVICE), tk, qk, mask[:1])
    assert torch.isfinite(loss)
