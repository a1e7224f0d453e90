"""Property-based tests (hypothesis) of every maskaq op against its plain-PyTorch reference.

Where tests/test_ops.py and tests/test_int_ops.py walk fixed lists of shapes, these draw them:
B, H and N from 1 (N including 2 and sizes that are no multiple of 8 or 16), d from 1 (odd ones
too), 0-5 prefix tokens, bits 2-8 signed and unsigned, and inputs laid out contiguously,
transposed, sliced with a stride, or as the permuted views of timm's fused qkv projection. The
kernels run in float64, where the two implementations cannot round a quantizer input to
different sides of a .5 boundary, so forward and backward are held to float64 tolerances.

Profiles: "ci" (the default; a fixed, derandomized set of examples that keeps this file well under
a minute) and "large" (`make fuzz`: MASKAQ_FUZZ_PROFILE=large, hundreds of random examples per op).
"""
from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from maskaq import _extension, ops
from maskaq import reference as ref

from _bounds import CPU_ERF_ABS_ERROR, assert_requantized_match, gelu_abs_bound, gelu_exact

settings.register_profile("ci", max_examples=20, deadline=None, derandomize=True, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("large", max_examples=400, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("MASKAQ_FUZZ_PROFILE", "ci"))

pytestmark = pytest.mark.skipif(not _extension.loaded(), reason="maskaq._C is not built (nothing to fuzz)")
F64 = torch.float64
LAYOUTS = ("contiguous", "transposed", "strided", "qkv_view")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _laid_out(values: torch.Tensor, layout: str, seed: int) -> torch.Tensor:
    """``values`` (B, H, N, d) as an equal tensor in the given memory layout."""
    B, H, N, d = values.shape
    if layout == "transposed":  # (B, H, d, N) storage, viewed back
        return values.transpose(2, 3).contiguous().transpose(2, 3)
    if layout == "strided":  # every other element of a wider tensor
        wide = torch.randn(B, H, N, 2 * d, generator=_gen(seed), dtype=values.dtype)
        wide[..., ::2] = values
        return wide[..., ::2]
    if layout == "qkv_view":  # timm: qkv (B, N, 3, H, d) permuted to (3, B, H, N, d), one of the three
        qkv = torch.randn(B, N, 3, H, d, generator=_gen(seed), dtype=values.dtype)
        qkv[:, :, 1] = values.permute(0, 2, 1, 3)
        return qkv.permute(2, 0, 3, 1, 4)[1]
    return values.clone()


def _qkv(shape, layout, seed):
    tensors = []
    for i in range(3):
        values = torch.randn(*shape, generator=_gen(seed + i), dtype=F64)
        tensors.append(_laid_out(values, layout, seed + 10 + i).requires_grad_())
    return tensors


def _quant_args(q, k, v, bits, signed, seed):
    """Steps from the data, jittered x[0.3, 3] (in-range and clamped regimes), zero points in [-3, 3]."""
    g = _gen(seed)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
    means = torch.tensor([q.abs().mean().item(), k.abs().mean().item(), 1.0 / q.shape[2], v.abs().mean().item()])
    jitter = 0.3 + 2.7 * torch.rand(4, generator=g)
    step = (2 * means / math.sqrt(hi) * jitter).clamp_min(1e-3).float().requires_grad_()
    zero_point = (torch.rand(4, generator=g) * 6 - 3).requires_grad_()
    return dict(step=step, zero_point=zero_point, qmin=[lo] * 4, qmax=[hi] * 4)


def _grads(fn, q, k, v, kw, seed):
    out, logits = fn(q, k, v, return_logits=True, **kw)
    g = _gen(seed)
    grad_out = torch.randn(out.shape, generator=g, dtype=out.dtype)
    grad_logits = 0.1 * torch.randn(logits.shape, generator=g, dtype=out.dtype)
    inputs = [q, k, v] + [t for t in (kw.get("step"), kw.get("zero_point")) if t is not None]
    return (out, logits) + torch.autograd.grad([out, logits], inputs, [grad_out, grad_logits])


@given(B=st.integers(1, 3), H=st.integers(1, 3), N=st.integers(1, 37), d=st.integers(1, 19),
       quantized=st.booleans(), bits=st.integers(2, 8), signed=st.booleans(), layout=st.sampled_from(LAYOUTS),
       seed=st.integers(0, 2 ** 20))
def test_fq_attention(B, H, N, d, quantized, bits, signed, layout, seed):
    q, k, v = _qkv((B, H, N, d), layout, seed)
    kw = _quant_args(q, k, v, bits, signed, seed) if quantized else {}
    got = _grads(ops.fq_attention, q, k, v, kw, seed)
    expected = _grads(ref.fq_attention, q, k, v, kw, seed)
    names = ["out", "logits", "grad q", "grad k", "grad v", "grad step", "grad zero_point"]
    for name, a, e in zip(names, got, expected):
        # the step / zero-point gradients are float32 sums over every element
        tol = dict(rtol=1e-4, atol=1e-5) if name in ("grad step", "grad zero_point") else {}
        torch.testing.assert_close(a, e, msg=lambda m, n=name: f"{n}: {m}", **tol)


@given(B=st.integers(1, 3), H=st.integers(1, 3), patches=st.integers(2, 40), prefix=st.integers(0, 5),
       rows=st.integers(1, 48), contiguous=st.booleans(), seed=st.integers(0, 2 ** 20))
def test_patch_similarity_entropy(B, H, patches, prefix, rows, contiguous, seed):
    N = patches + prefix
    values = 3 * torch.randn(B, H, N, N, generator=_gen(seed), dtype=F64)
    logits = (values if contiguous else values.transpose(2, 3).contiguous().transpose(2, 3)).requires_grad_()
    weights = torch.randn(B, generator=_gen(seed + 1), dtype=F64)
    results = []
    for impl in (ops.patch_similarity_entropy, ref.patch_similarity_entropy):
        h = impl(logits, num_prefix_tokens=prefix, num_rows=rows, generator=_gen(seed + 2))
        results.append((h,) + torch.autograd.grad(h, logits, weights))
    for name, a, e in zip(("h", "grad"), *results):
        torch.testing.assert_close(a, e, msg=lambda m, n=name: f"{n}: {m}")


@given(L=st.integers(1, 4), B=st.integers(1, 4), H=st.integers(1, 4), M=st.integers(1, 60),
       ratio=st.floats(0.05, 1.0), keep=st.floats(0.05, 1.0), seed=st.integers(0, 2 ** 20))
def test_masked_attention_align(L, B, H, M, ratio, keep, seed):
    cls_t = (2 * torch.randn(L, B, H, M, generator=_gen(seed), dtype=F64)).requires_grad_()
    cls_q = (2 * torch.randn(L, B, H, M, generator=_gen(seed + 1), dtype=F64)).requires_grad_()
    results = []
    for impl in (ops.masked_attention_align, ref.masked_attention_align):
        loss, mask = impl(cls_t, cls_q, ratio=ratio, keep=keep, seed=seed)
        results.append((loss, mask) + torch.autograd.grad(loss, (cls_t, cls_q)))
    _, kept = ref.alignment_counts(M, ratio, keep)
    assert (results[0][1].sum(dim=1) == kept).all()
    for name, a, e in zip(("loss", "mask", "grad cls_t", "grad cls_q"), *results):
        torch.testing.assert_close(a, e, msg=lambda m, n=name: f"{n}: {m}")


@given(M=st.integers(1, 40), N=st.integers(1, 40), activation=st.sampled_from(["none", "gelu"]),
       requant=st.booleans(), unsigned=st.booleans(), bits=st.integers(2, 8), transposed=st.booleans(),
       seed=st.integers(0, 2 ** 20))
def test_int8_linear_epilogue(M, N, activation, requant, unsigned, bits, transposed, seed):
    g = _gen(seed)
    acc = torch.randint(-(1 << 20), 1 << 20, (N, M) if transposed else (M, N), generator=g, dtype=torch.int32)
    acc = acc.t() if transposed else acc
    scale = (torch.rand(N, generator=g) + 0.5) * 8e-6
    bias = torch.randn(N, generator=g) * 2
    if requant:
        qmin, qmax = (0, 2 ** bits - 1) if unsigned else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        grid = (float(torch.rand((), generator=g)) * 0.2 + 0.01, int(torch.randint(qmin, qmax + 1, (), generator=g)),
                qmin, qmax)
    else:
        grid = (0.0, 0, -128, 127)
    got = ops.int8_linear_epilogue(acc, scale, bias, activation, *grid)
    expected = ref.int8_linear_epilogue(acc.contiguous(), scale, bias, activation, *grid)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    if activation == "none":
        assert torch.equal(got, expected)
    else:  # within GELU's error bound of float64 (tests/_bounds.py), as test_int_ops holds it
        y = acc.float() * scale + bias
        exact, bound = gelu_exact(y), gelu_abs_bound(y, CPU_ERF_ABS_ERROR)
        if got.dtype == torch.float32:
            assert bool(((got.double() - exact).abs() <= bound).all())
        else:
            assert_requantized_match(got, exact, bound, *grid)


@given(B=st.integers(1, 2), H=st.integers(1, 3), N=st.integers(1, 40), d=st.integers(1, 33),
       p_bits=st.integers(2, 8), zero_points=st.tuples(*[st.integers(-20, 20)] * 3), seed=st.integers(0, 2 ** 20))
def test_int8_attention(B, H, N, d, p_bits, zero_points, seed):
    g = _gen(seed)
    q, k, v = (torch.randint(-100, 100, (B, H, N, d), generator=g, dtype=torch.int8) for _ in range(3))
    scale_qk = 2.0 / max(math.sqrt(d) * 58.0 ** 2, 1.0)
    p_qmax = 2 ** p_bits - 1
    args = (scale_qk, 1.0 / p_qmax, 0, 0, p_qmax, *zero_points)
    got = ops.int8_attention(q, k, v, *args)
    assert torch.equal(got, ref.int8_attention(q, k, v, *args))


@given(M=st.integers(1, 40), K=st.integers(1, 1100), N=st.integers(1, 40), zero_point=st.integers(-300, 300),
       wbits=st.integers(2, 8), dequantize=st.booleans(), non_contiguous=st.booleans(), seed=st.integers(0, 2 ** 20))
def test_int8_gemm(M, K, N, zero_point, wbits, dequantize, non_contiguous, seed):
    """maskaq's exact CPU GEMM against the exact product (K over one and two 512-input blocks, odd K, partial
    tiles, any zero point, full-range uint8 activations, weights of 2-8 bits)."""
    g = _gen(seed)
    u = torch.randint(0, 256, (M, 2 * K) if non_contiguous else (M, K), dtype=torch.uint8, generator=g)
    u = u[:, ::2] if non_contiguous else u
    w = torch.randint(-(2 ** (wbits - 1)), 2 ** (wbits - 1), (N, K), dtype=torch.int8, generator=g)
    scale, bias = (torch.rand(N, generator=g) * 1e-3, torch.randn(N, generator=g)) if dequantize else (None, None)
    got = ops.int8_gemm(u, zero_point, ops.int8_gemm_pack(w), N, scale, bias)
    assert torch.equal(got, ref.int8_gemm(u, zero_point, w, scale, bias))


# ---------------------------------------------------------------------------------------------
# Bad input: a clear exception from both the op and its reference, never a crash or garbage


@pytest.mark.parametrize("wbits,abits", [(1, 4), (9, 4), (4, 1), (4, 9), (4.5, 4), (True, 4)])
def test_bits_outside_2_to_8_are_refused(wbits, abits):
    from _models import small_vit

    from maskaq.quant import quantize_model
    with pytest.raises((ValueError, TypeError), match="bits"):
        quantize_model(small_vit(depth=1), wbits, abits)



def _qkv32(shape=(1, 2, 5, 4)):
    return [torch.randn(*shape, generator=_gen(i)) for i in range(3)]


def _fq_bad(case):
    q, k, v = _qkv32()
    step, lo, hi = torch.full((4,), 0.1), [-4] * 4, [3] * 4
    return {
        "int dtype": lambda f: f(q.long(), k.long(), v.long()),
        "rank 3": lambda f: f(q[0], k[0], v[0]),
        "shape mismatch": lambda f: f(q, k[:, :, :3], v),
        "nan step": lambda f: f(q, k, v, step=torch.tensor([0.1, float("nan"), 0.1, 0.1]), qmin=lo, qmax=hi),
        "inf step": lambda f: f(q, k, v, step=torch.tensor([0.1, float("inf"), 0.1, 0.1]), qmin=lo, qmax=hi),
        "range too wide": lambda f: f(q, k, v, step=step, qmin=[-(ref.MAX_QUANT_LEVEL + 1)] * 4, qmax=hi),
        "qmax 0": lambda f: f(q, k, v, step=step, qmin=[-1] * 4, qmax=[0] * 4),
        "empty step": lambda f: f(q, k, v, step=torch.empty(0), qmin=lo, qmax=hi),
    }[case]


# The error and a fragment of its message for each bad input, the same from the op and the reference.
_FQ_BAD = {
    "int dtype": (TypeError, "q must be a floating tensor, got torch.int64"),
    "rank 3": (ValueError, r"q must be 4-D \(B, H, N, d\), got shape \(2, 5, 4\)"),
    "shape mismatch": (ValueError, r"q, k and v must have one shape \(B, H, N, d\), got \(1, 2, 5, 4\), "
                                   r"\(1, 2, 3, 4\)"),
    "nan step": (ValueError, r"step\[1\] = nan must be (positive and finite|finite and positive)"),
    "inf step": (ValueError, r"step\[1\] = inf must be (positive and finite|finite and positive)"),
    "range too wide": (ValueError, r"qmin/qmax\[0\] must lie in \[-65536, 65536\]"),
    "qmax 0": (ValueError, r"qmax\[0\] = 0 must be positive"),
    "empty step": (ValueError, r"step must be a 1-D tensor of 4 \(q, k, p, v\), got shape \(0,\)"),
}


@pytest.mark.parametrize("case,error,message", [(c, *m) for c, m in _FQ_BAD.items()], ids=list(_FQ_BAD))
@pytest.mark.parametrize("impl", [ops.fq_attention, ref.fq_attention], ids=["op", "reference"])
def test_fq_attention_bad_input(case, error, message, impl):
    with pytest.raises(error, match=message):
        _fq_bad(case)(impl)


@pytest.mark.parametrize("case", ["nan logits", "int dtype", "rank 3", "non-square", "prefix too large",
                                  "row out of range", "empty batch rows"])
@pytest.mark.parametrize("impl", [ops.patch_similarity_entropy, ref.patch_similarity_entropy], ids=["op", "reference"])
def test_patch_similarity_entropy_bad_input(case, impl):
    logits = torch.randn(2, 2, 9, 9, generator=_gen(0))
    call = {
        "nan logits": lambda: impl(logits.masked_fill(logits > 1.5, float("nan")), num_prefix_tokens=1),
        "int dtype": lambda: impl(logits.long(), num_prefix_tokens=1),
        "rank 3": lambda: impl(logits[0], num_prefix_tokens=1),
        "non-square": lambda: impl(logits[..., :8], num_prefix_tokens=1),
        "prefix too large": lambda: impl(logits, num_prefix_tokens=9),
        "row out of range": lambda: impl(logits, num_prefix_tokens=1, row_index=torch.full((2, 3), 8)),
        "empty batch rows": lambda: impl(logits, num_prefix_tokens=1, row_index=torch.zeros(2, 0, dtype=torch.long)),
    }[case]
    if case == "nan logits":  # NaN in, NaN out (the synthesizer's NaN recovery relies on it), never a crash
        assert torch.isnan(call()).any()
        return
    error, message = {
        "int dtype": (TypeError, "logits must be a floating tensor, got torch.int64"),
        "rank 3": (ValueError, r"logits must be 4-D \(B, H, N, N\), got shape \(2, 9, 9\)"),
        "non-square": (ValueError, r"logits must be square attention logits \(B, H, N, N\), got shape \(2, 2, 9, 8\)"),
        "prefix too large": (ValueError, r"num_prefix_tokens must lie in \[0, N\) with N = 9, got 9"),
        "row out of range": (IndexError, r"row_index values must lie in \[0, 8\) .*got range \[8, 8\]"),
        "empty batch rows": (ValueError, r"row_index must have shape \(B, R\) with B = 2, R >= 1, got \(2, 0\)"),
    }[case]
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize("case", ["inf rand", "int dtype", "shape mismatch", "rank 3", "ratio 0", "keep 2"])
@pytest.mark.parametrize("impl", [ops.masked_attention_align, ref.masked_attention_align], ids=["op", "reference"])
def test_masked_attention_align_bad_input(case, impl):
    t, q = torch.randn(2, 3, 2, 10, generator=_gen(0)), torch.randn(2, 3, 2, 10, generator=_gen(1))
    call = {
        "inf rand": lambda: impl(t, q, ratio=0.5, rand=torch.full((3, 10), float("inf"))),
        "int dtype": lambda: impl(t.long(), q.long(), ratio=0.5, seed=0),
        "shape mismatch": lambda: impl(t, q[..., :9], ratio=0.5, seed=0),
        "rank 3": lambda: impl(t[0], q[0], ratio=0.5, seed=0),
        "ratio 0": lambda: impl(t, q, ratio=0.0, seed=0),
        "keep 2": lambda: impl(t, q, ratio=0.5, keep=2.0, seed=0),
    }[case]
    error, message = {
        "inf rand": (ValueError, "rand must hold finite uniform draws, got inf"),
        "int dtype": (TypeError, "cls_t must be a floating tensor, got torch.int64"),
        "shape mismatch": (ValueError, r"cls_t and cls_q must have one shape \(L, B, H, M\), "
                                       r"got \(2, 3, 2, 10\) and \(2, 3, 2, 9\)"),
        "rank 3": (ValueError, r"cls_t must be 4-D \(L, B, H, M\), got shape \(3, 2, 10\)"),
        "ratio 0": (ValueError, r"ratio \(the top-k fraction\) must lie in \(0, 1\], got 0.0"),
        "keep 2": (ValueError, r"keep \(the kept fraction of the top-k\) must lie in \(0, 1\], got 2.0"),
    }[case]
    with pytest.raises(error, match=message):
        call()
