"""The integer-inference ops (maskaq.ops.int8_linear_epilogue, int8_attention, int8_gemm): the
compiled kernels against the plain-PyTorch reference on random (never zero) inputs, bad inputs,
opcheck, and their use by IntLinear / IntMlp / IntAttention.

On CPU the kernels follow the reference operation by operation: the epilogue without GELU and the
attention (same ATen softmax) match it bit for bit; with GELU the kernels are held to float64 within
their erf's documented error bound (tests/_bounds.py), which moves a requantized value by one level
only where the exact value lies that close to a tie.
The CUDA tests (skipped without a GPU) hold the GPU kernels to the same reference run on the CPU;
their exp / erf differ from the CPU's by ulps, so they allow a few probability levels to flip
(each flip moves one output row by one row of v) except in the cases built to be exact.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import maskaq
from maskaq import _extension, ops
from maskaq import reference as ref

from _bounds import (CAPABILITY_NAMES, CPU_ERF_ABS_ERROR, CUDA_ERF_ABS_ERROR, EPILOGUE_ROUNDINGS, U32,
                     assert_requantized_match, assert_within, gelu_abs_bound, gelu_exact, quant_linear_reference)

HAS_EXT = _extension.loaded()
needs_ext = pytest.mark.skipif(not HAS_EXT, reason="maskaq._C is not built (reference fallback only)")
HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def gen(seed):
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------
# int8_linear_epilogue

EPILOGUE_SHAPES = [(1, 1), (7, 3), (37, 45), (64, 128), (197, 36), (5, 1001)]
# (out_step, out_zero_point, out_qmin, out_qmax); out_step 0: float32 output
REQUANTS = [(0.0, 0, -128, 127), (0.05, 3, 0, 255), (0.05, -7, -128, 127), (0.2, 0, -8, 7), (0.1, 5, 0, 15),
            (0.03, 140, 0, 255)]


def epilogue_inputs(M, N, seed):
    """acc spread over ±2^20 (no zeros), scales and biases so that y spans about ±10 and the
    requantizers above both round inside their grid and clamp at either end."""
    g = gen(seed)
    acc = torch.randint(1, 1 << 20, (M, N), generator=g, dtype=torch.int32)
    acc = acc * torch.where(torch.rand(M, N, generator=g) < 0.5, -1, 1).int()
    scale = (torch.rand(N, generator=g) + 0.5) * 8e-6
    bias = torch.randn(N, generator=g) * 2 + 0.1
    return acc, scale, bias


def assert_epilogue_close(got, acc, scale, bias, activation, requant, erf_abs_error=CPU_ERF_ABS_ERROR):
    """Bit-exact without GELU (the kernels repeat the reference's operations); with it, within GELU's
    error bound of float64 (tests/_bounds.py), and requantized levels exact but at the ties that bound
    reaches."""
    expected = ref.int8_linear_epilogue(acc, scale, bias, activation, *requant)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    if activation == "none":
        assert torch.equal(got, expected)
        return
    y = acc.float() * scale + bias  # the float32 pre-activation, as the kernels compute it
    exact, bound = gelu_exact(y), gelu_abs_bound(y, erf_abs_error)
    if got.dtype == torch.float32:
        error = (got.double() - exact).abs()
        assert bool((error <= bound).all()), f"max error {error.max():.3g}, over the bound by {(error / bound).max():.3g}x"
    else:
        assert_requantized_match(got, exact, bound, *requant)


@needs_ext
@pytest.mark.parametrize("shape", EPILOGUE_SHAPES)
@pytest.mark.parametrize("requant", REQUANTS)
@pytest.mark.parametrize("activation", ["none", "gelu"])
def test_epilogue_matches_reference(shape, requant, activation):
    acc, scale, bias = epilogue_inputs(*shape, seed=shape[0] * 7 + shape[1])
    got = torch.ops.maskaq.int8_linear_epilogue(acc, scale, bias, activation, *requant)
    assert got.dtype == ref.epilogue_out_dtype(*[requant[i] for i in (0, 2, 3)])
    assert_epilogue_close(got, acc, scale, bias, activation, requant)
    if requant[0] > 0 and got.numel() >= 100:  # the grid is really exercised: clamping and interior levels
        lo, hi = requant[2], requant[3]
        assert got.max().item() == hi and ((got > lo) & (got < hi)).any()
        if activation == "none":  # (GELU's output is >= -0.17: the lower end needs no clamp)
            assert got.min().item() == lo


@needs_ext
def test_epilogue_values_by_hand():
    acc = torch.tensor([[10, -10, 3, 7]], dtype=torch.int32)
    scale = torch.tensor([0.5, 0.5, 0.25, 1.0])
    bias = torch.tensor([0.0, 1.0, -0.25, 0.5])
    y = ops.int8_linear_epilogue(acc, scale, bias)
    assert torch.equal(y, torch.tensor([[5.0, -4.0, 0.5, 7.5]]))
    g = ops.int8_linear_epilogue(acc, scale, bias, "gelu")
    torch.testing.assert_close(g, nn.GELU()(y))
    # round half to even: 0.5 -> 0, 7.5 -> 8; zero point 2; clamp to [0, 9]
    u = ops.int8_linear_epilogue(acc, scale, bias, "none", 1.0, 2, 0, 9)
    assert u.dtype == torch.uint8 and u.tolist() == [[7, 0, 2, 9]]
    s = ops.int8_linear_epilogue(acc, scale, bias, "none", 0.5, -1, -4, 3)
    assert s.dtype == torch.int8 and s.tolist() == [[3, -4, 0, 3]]


@needs_ext
def test_epilogue_nan_goes_to_qmin():
    acc, scale, bias = epilogue_inputs(3, 8, seed=1)
    bias[2] = float("nan")
    for fn in (torch.ops.maskaq.int8_linear_epilogue, ref.int8_linear_epilogue):
        u = fn(acc, scale, bias, "none", 0.05, 3, 0, 255)
        assert (u[:, 2] == 0).all()
        y = fn(acc, scale, bias, "none", 0.0, 0, 0, 255)
        assert torch.isnan(y[:, 2]).all() and torch.isfinite(y[:, 3]).all()


@needs_ext
def test_epilogue_thread_count_does_not_change_result():
    acc, scale, bias = epilogue_inputs(300, 200, seed=3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.int8_linear_epilogue(acc, scale, bias, "gelu", 0.05, 3, 0, 255)
        torch.set_num_threads(2)
        two = ops.int8_linear_epilogue(acc, scale, bias, "gelu", 0.05, 3, 0, 255)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def _epilogue_bad_calls():
    acc, scale, bias = epilogue_inputs(4, 8, seed=2)
    return [
        (TypeError, "acc must", (acc.float(), scale, bias, "none", 0.0, 0, 0, 255)),
        (TypeError, "scale must", (acc, scale.double(), bias, "none", 0.0, 0, 0, 255)),
        (ValueError, "bias", (acc, scale, bias[:5], "none", 0.0, 0, 0, 255)),
        (ValueError, "acc must be 2-D", (acc.view(-1), scale, bias, "none", 0.0, 0, 0, 255)),
        (ValueError, "activation", (acc, scale, bias, "relu", 0.0, 0, 0, 255)),
        (ValueError, "out_step", (acc, scale, bias, "none", float("nan"), 0, 0, 255)),
        (ValueError, "must fit uint8", (acc, scale, bias, "none", 0.1, 0, -1, 255)),
        (ValueError, "must fit uint8", (acc, scale, bias, "none", 0.1, 0, -129, 0)),
        (ValueError, "below", (acc, scale, bias, "none", 0.1, 0, 5, 5)),
    ]


@pytest.mark.parametrize("case", range(len(_epilogue_bad_calls())))
def test_epilogue_bad_inputs(case):
    error, message, args = _epilogue_bad_calls()[case]
    with pytest.raises(error, match=message):
        ops.int8_linear_epilogue(*args)
    if HAS_EXT:  # the compiled op checks the same (it is what torch.compile'd code calls)
        with pytest.raises(error, match=message.split()[0]):
            torch.ops.maskaq.int8_linear_epilogue(*args)


@needs_ext
def test_epilogue_rejects_non_contiguous_acc_in_the_op():
    acc, scale, bias = epilogue_inputs(8, 8, seed=4)
    with pytest.raises(ValueError, match="contiguous"):
        torch.ops.maskaq.int8_linear_epilogue(acc.t(), scale, bias, "none", 0.0, 0, 0, 255)
    # the wrapper makes it contiguous
    torch.testing.assert_close(ops.int8_linear_epilogue(acc.t(), scale, bias),
                               ref.int8_linear_epilogue(acc.t().contiguous(), scale, bias))


# --------------------------------------------------------------------------------------------
# int8_attention

ATTN_SHAPES = [(1, 1, 1, 1), (1, 1, 5, 8), (2, 3, 17, 24), (1, 2, 50, 64), (2, 1, 65, 40), (1, 2, 197, 64),
               (1, 1, 33, 17), (3, 2, 16, 16)]
# (p_qmin, p_qmax, p_zero_point, step factor); the step is factor / (levels − 1)
P_GRIDS = [(0, 255, 0, 1.0), (0, 15, 0, 0.5), (0, 255, -3, 0.2), (-128, 127, -128, 1.0), (0, 7, 2, 3.0)]
ZERO_POINTS = [(0, 0, 0), (-1, 2, -3), (100, -90, 60)]


def attention_inputs(shape, seed):
    """Random int8 q, k, v (never all zero) and a softmax scale that makes the probabilities
    neither uniform nor one-hot."""
    g = gen(seed)
    q, k, v = (torch.randint(-128, 128, shape, generator=g, dtype=torch.int8) for _ in range(3))
    d = shape[-1]
    spread = max(math.sqrt(d) * 74.0 ** 2, 1.0)  # std of q̃·k̃ for uniform int8 (std 74 each)
    scale_qk = 2.0 / spread
    return q, k, v, scale_qk


def p_grid_args(grid, N):
    p_qmin, p_qmax, p_zero_point, factor = grid
    p_step = factor / (p_qmax - p_qmin) * min(1.0, 8.0 / N) ** 0.5  # small N: large P, clamping occurs
    return p_step, p_zero_point, p_qmin, p_qmax


@needs_ext
@pytest.mark.parametrize("N,p_step", [(3, 2 / 87), (5, 2 / 15), (5, 2 / 95), (6, 1 / 87), (3, 2 / 135)])
def test_attention_divides_probabilities_at_half_levels(N, p_step):
    """Uniform rows (q = 0) give every probability the value P of softmax(0), and P / step lands
    within a unit in the last place of a half-integer, on the other side of it from P times the
    float reciprocal of the step (found by search; for N = 5 and step 2/15 the quotient is 1.5 and
    the product 1.4999999). The kernel's levels must be those of the quotient, as the reference's."""
    B, H, d = 2, 3, 8
    q = torch.zeros(B, H, N, d, dtype=torch.int8)
    k, v = (torch.randint(-128, 128, (B, H, N, d), generator=gen(N + i), dtype=torch.int8) for i in range(2))
    args = (0.01, p_step, 0, 0, 255, 0, 0, 0)
    got = torch.ops.maskaq.int8_attention(q, k, v, *args)
    expected = ref.int8_attention(q, k, v, *args)
    assert torch.equal(got, expected)
    p, step = torch.softmax(torch.zeros(N), 0)[0], torch.tensor(p_step, dtype=torch.float32)
    assert torch.round(p / step) != torch.round(p * (1 / step))  # the case the reciprocal gets wrong
    folded = torch.stack([q, k, v], dim=2).permute(0, 3, 2, 1, 4).float()  # the folded qkv (B, N, 3, H, d)
    args_qkv = (0.01, p_step, 0, 0, 255, [-128] * 3, [127] * 3)
    assert torch.equal(torch.ops.maskaq.qkv_int8_attention(folded.contiguous(), *args_qkv),
                       ref.qkv_int8_attention(folded.contiguous(), *args_qkv))


@needs_ext
@pytest.mark.parametrize("shape", ATTN_SHAPES)
@pytest.mark.parametrize("p_grid", P_GRIDS)
@pytest.mark.parametrize("zero_points", ZERO_POINTS)
def test_attention_matches_reference_exactly(shape, p_grid, zero_points):
    q, k, v, scale_qk = attention_inputs(shape, seed=sum(shape))
    args = (scale_qk, *p_grid_args(p_grid, shape[2]), *zero_points)
    got = torch.ops.maskaq.int8_attention(q, k, v, *args)
    expected = ref.int8_attention(q, k, v, *args)
    assert got.dtype == torch.float32 and got.shape == q.shape
    assert torch.equal(got, expected)
    assert torch.equal(got, got.round())  # integers


def _onednn_int8_exact() -> bool:
    """Whether oneDNN's int8 GEMM should add pairs in int32 here: the CPU has AVX512-VNNI and nothing
    limits oneDNN's ISA (as the forced-AVX2 run of this file does)."""
    import os

    if os.environ.get("DNNL_MAX_CPU_ISA") or os.environ.get("ONEDNN_MAX_CPU_ISA"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            return "avx512_vnni" in f.read().split()
    except OSError:
        return False


@needs_ext
@pytest.mark.parametrize("capability, int8_isa_limit, expected", [
    ("avx2", False, "int16"),
    ("default", False, "int8" if _onednn_int8_exact() else "float"),
    ("default", True, "float"),
])
def test_attention_product_paths_match_reference_exactly(capability, int8_isa_limit, expected):
    """Every CPU product path gives the reference's integers: maskaq's int16 GEMM where ATen's
    capability is AVX2 (forced here on any x86 CPU), oneDNN's int8 GEMM (torch._int_mm) on a CPU with
    AVX512-VNNI, and float BLAS where that GEMM would clip pair sums (oneDNN limited to AVX2 here)."""
    import os
    import subprocess
    import sys

    code = ("import torch, itertools, sys; sys.path.insert(0, %r)\n"
            "from test_int_ops import *\n"
            "from maskaq import _extension\n"
            "assert torch.backends.cpu.get_cpu_capability() in %r\n"
            "for shape, grid, zs in itertools.product([(1, 1, 1, 1), (2, 3, 17, 24), (1, 2, 197, 64), (1, 1, 33, 17)],\n"
            "                                         P_GRIDS, ZERO_POINTS):\n"
            "    q, k, v, s = attention_inputs(shape, seed=sum(shape))\n"
            "    args = (s, *p_grid_args(grid, shape[2]), *zs)\n"
            "    assert torch.equal(torch.ops.maskaq.int8_attention(q, k, v, *args), ref.int8_attention(q, k, v, *args))\n"
            "for shape, ranges in itertools.product([(1, 197, 6, 64), (2, 17, 3, 24)], QKV_RANGES):\n"
            "    qkv, args = qkv_inputs(*shape, seed=1), (0.001, 1 / 255, -3, 0, 255, *ranges)\n"
            "    assert torch.equal(torch.ops.maskaq.qkv_int8_attention(qkv, *args), ref.qkv_int8_attention(qkv, *args))\n"
            "print(_extension.int8_attention_products())\n"
            ) % (os.path.dirname(os.path.abspath(__file__)), CAPABILITY_NAMES[capability])
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    if int8_isa_limit:
        env.update(DNNL_MAX_CPU_ISA="AVX2", ONEDNN_MAX_CPU_ISA="AVX2")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split()[-1] == expected


@needs_ext
def test_attention_exact_integers_by_hand():
    """Uniform softmax (scale 0: P = 1/N, a level known in advance) and extreme operands with
    zero points: O = level·Σ_j ṽ_j exactly, computed in int64 here."""
    B, H, N, d = 2, 2, 37, 20
    v = torch.full((B, H, N, d), 127, dtype=torch.int8)
    v[..., ::2] = -128
    q = torch.randint(-128, 128, (B, H, N, d), generator=gen(0), dtype=torch.int8)
    k = torch.randint(-128, 128, (B, H, N, d), generator=gen(1), dtype=torch.int8)
    p_step = 1.0 / 255
    level = round((1.0 / N) / p_step)  # 1/N/p_step = 6.89...: no tie
    for zv in (0, 100, -77):
        out = ops.int8_attention(q, k, v, 0.0, p_step, 0, 0, 255, 5, -5, zv)
        expected = level * (v.long() - zv).sum(dim=2, keepdim=True).expand(B, H, N, d)
        assert torch.equal(out.long(), expected)


@needs_ext
def test_attention_one_hot_softmax_checks_scores_exactly():
    """A large scale makes P one-hot on each row's argmax (ties split evenly): O row i is
    level(1)·ṽ_argmax — a check of q̃·k̃ᵀ including the zero-point corrections."""
    B, H, N, d = 1, 3, 45, 24
    q, k, v, _ = attention_inputs((B, H, N, d), seed=11)
    zq, zk, zv = 27, -31, 9
    out = ops.int8_attention(q, k, v, 100.0, 1.0 / 255, 0, 0, 255, zq, zk, zv)
    scores = (q.long() - zq) @ (k.long() - zk).transpose(-2, -1)
    top = scores.max(dim=-1, keepdim=True).values
    winners = scores == top
    p_int = torch.round((1.0 / winners.sum(-1, keepdim=True).float()) / (1.0 / 255)) * winners
    expected = p_int.long() @ (v.long() - zv)
    assert torch.equal(out.long(), expected)


@needs_ext
def test_attention_large_sums_run_exactly():
    """Sums above 2^24, where float32 products would round: every P̃ clamps at 255 (a step far below
    1/N), every ṽ is large and of one sign, so O = 255·Σ_j ṽ_j ≈ 3.4e7; the CPU kernel must switch
    to float64 (the result is then the exact int32, rounded once to float32 on output)."""
    B, H, N, d = 1, 2, 600, 32
    q, k, _, scale_qk = attention_inputs((B, H, N, d), seed=5)
    v = torch.randint(100, 128, (B, H, N, d), generator=gen(6), dtype=torch.int8)
    zv = -100
    got = ops.int8_attention(q, k, v, scale_qk * 1e-3, 1.0 / (N * 255 * 4), 0, 0, 255, 0, 0, zv)
    exact = 255 * (v.long() - zv).sum(dim=2, keepdim=True).expand(B, H, N, d)
    assert exact.min().item() > 2 ** 24
    assert torch.equal(got, exact.float())
    assert torch.equal(got, ref.int8_attention(q, k, v, scale_qk * 1e-3, 1.0 / (N * 255 * 4), 0, 0, 255, 0, 0, zv))


def _attention_bad_calls():
    q, k, v, _ = attention_inputs((1, 2, 5, 8), seed=1)
    big = torch.zeros((1, 1, 70000, 1), dtype=torch.int8)
    ok = (0.1, 1 / 255, 0, 0, 255)
    return [
        (TypeError, "q must", (q.float(), k, v, *ok)),
        (TypeError, "v must", (q, k, v.to(torch.uint8), *ok)),
        (ValueError, "one shape", (q, k[:, :1], v, *ok)),
        (ValueError, "4-D", (q[0], k[0], v[0], *ok)),
        (ValueError, "p_step", (q, k, v, 0.1, 0.0, 0, 0, 255)),
        (ValueError, "scale_qk", (q, k, v, float("inf"), 1 / 255, 0, 0, 255)),
        (ValueError, "wider than 8 bits", (q, k, v, 0.1, 1 / 255, 0, 0, 256)),
        (ValueError, "below", (q, k, v, 0.1, 1 / 255, 0, 3, 3)),
        (ValueError, "overflow int32", (big, big, big, 0.1, 1 / 255, 0, 0, 255, 0, 0, 127)),
    ]


def _assert_both_reject(name, error, message, args):
    """The Python wrapper ops.<name> and, where built, the compiled op raise the same error."""
    with pytest.raises(error, match=message):
        getattr(ops, name)(*args)
    if HAS_EXT:
        with pytest.raises(error, match=message):
            getattr(torch.ops.maskaq, name)(*args)


@pytest.mark.parametrize("case", range(len(_attention_bad_calls())))
def test_attention_bad_inputs(case):
    _assert_both_reject("int8_attention", *_attention_bad_calls()[case])


@needs_ext
def test_attention_rejects_non_contiguous_in_the_op():
    q, k, v, s = attention_inputs((1, 2, 6, 8), seed=3)
    with pytest.raises(ValueError, match="contiguous"):
        torch.ops.maskaq.int8_attention(q.transpose(2, 3), k, v, s, 1 / 255, 0, 0, 255)


# --------------------------------------------------------------------------------------------
# qkv_int8_attention: int8_attention straight from a folded qkv output (CPU)

# (lo, hi) of q − z, k − z, v − z: int8 exactly, ranges that need a shift (z = -1, z = 60), narrow grids
QKV_RANGES = [([-128, -128, -128], [127, 127, 127]), ([-127, -128, -60], [128, 127, 195]), ([0, -8, -3], [15, 7, 4])]


def qkv_inputs(B, N, H, d, seed):
    """qkv (B, N, 3, H, d) as x/α: spread past every range so that rounding and both clamps occur, with
    exact .5 ties mixed in (round half to even must match torch.round)."""
    g = gen(seed)
    qkv = torch.randn((B, N, 3, H, d), generator=g) * 90
    ties = torch.rand(qkv.shape, generator=g) < 0.05
    return torch.where(ties, qkv.floor() + 0.5, qkv)


@needs_ext
@pytest.mark.parametrize("shape", [(1, 197, 6, 64), (2, 17, 3, 24), (1, 1, 1, 1), (3, 33, 2, 17), (2, 50, 1, 40)])
@pytest.mark.parametrize("ranges", QKV_RANGES)
@pytest.mark.parametrize("p_grid", P_GRIDS[:3])
def test_qkv_attention_matches_reference_exactly(shape, ranges, p_grid):
    B, N, H, d = shape
    qkv = qkv_inputs(*shape, seed=sum(shape))
    scale_qk = 2.0 / max(math.sqrt(d) * 74.0 ** 2, 1.0)
    args = (scale_qk, *p_grid_args(p_grid, N), *ranges)
    got = torch.ops.maskaq.qkv_int8_attention(qkv, *args)
    expected = ref.qkv_int8_attention(qkv, *args)
    assert got.shape == (B, N, H * d) and got.dtype == torch.float32
    assert torch.equal(got, expected)
    assert torch.equal(ops.qkv_int8_attention(qkv, *args), expected)


def test_qkv_attention_reference_is_int8_attention_of_the_rounded_operands():
    """The reference's own meaning, by hand: round, clamp, shift where the range leaves int8, then
    int8_attention with the shifts as zero points, heads and tokens swapped in the output."""
    B, N, H, d = 2, 9, 3, 8
    qkv = qkv_inputs(B, N, H, d, seed=3)
    lo, hi = QKV_RANGES[1]
    scale_qk, p = 0.01, (1 / 255, 0, 0, 255)
    ints = [qkv[:, :, i].round().clamp(lo[i], hi[i]).permute(0, 2, 1, 3) for i in range(3)]
    shifts = [1, 0, 68]  # [-127, 128] fits int8 shifted by 1, [-128, 127] as it is, [-60, 195] shifted by 68
    operands = [(t - o).to(torch.int8) for t, o in zip(ints, shifts)]
    expected = ref.int8_attention(*operands, scale_qk, *p, *(-o for o in shifts)).transpose(1, 2).reshape(B, N, H * d)
    assert torch.equal(ref.qkv_int8_attention(qkv, scale_qk, *p, lo, hi), expected)


def _qkv_bad_calls():
    qkv = qkv_inputs(1, 5, 2, 8, seed=1)
    ok = (0.1, 1 / 255, 0, 0, 255)
    r = QKV_RANGES[0]
    return [
        (TypeError, "qkv must", (qkv.double(), *ok, *r)),
        (ValueError, "3 at dim 2", (qkv[:, :, :2], *ok, *r)),
        (ValueError, "5-D", (qkv[0], *ok, *r)),
        (ValueError, "3 integers", (qkv, *ok, [0, 0], [1, 1])),
        (ValueError, "2 to 256 integers", (qkv, *ok, [0, 0, 0], [256, 1, 1])),
        (ValueError, "2 to 256 integers", (qkv, *ok, [5, 0, 0], [5, 1, 1])),
        (ValueError, "p_step", (qkv, 0.1, 0.0, 0, 0, 255, *r)),
        (ValueError, "wider than 8 bits", (qkv, 0.1, 1 / 255, 0, 0, 256, *r)),
    ]


@pytest.mark.parametrize("case", range(len(_qkv_bad_calls())))
def test_qkv_attention_bad_inputs(case):
    _assert_both_reject("qkv_int8_attention", *_qkv_bad_calls()[case])


@needs_ext
def test_qkv_attention_rejects_non_contiguous_in_the_op():
    qkv = qkv_inputs(2, 6, 2, 8, seed=4).transpose(0, 1)
    with pytest.raises(ValueError, match="contiguous"):
        torch.ops.maskaq.qkv_int8_attention(qkv, 0.1, 1 / 255, 0, 0, 255, *QKV_RANGES[0])


# --------------------------------------------------------------------------------------------
# int8_gemm: maskaq's exact uint8 x int8 GEMM for CPUs whose int8 libraries saturate pair sums

# (M, K, N): 1s, odd K (the padded pair), K over one and over two 512-input blocks, N not a
# multiple of the 16-column panel, M not a multiple of the 6-row strip nor of the 96-row task block
GEMM_SHAPES = [(1, 1, 1), (5, 3, 7), (6, 32, 16), (37, 64, 24), (13, 385, 17), (197, 384, 48), (100, 600, 33),
               (29, 1101, 40)]


def gemm_inputs(m, k, n, seed):
    g = gen(seed)
    return (torch.randint(0, 256, (m, k), dtype=torch.uint8, generator=g),
            torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g))


@needs_ext
@pytest.mark.parametrize("shape", GEMM_SHAPES)
@pytest.mark.parametrize("zero_point", [0, 128, 255, -3, 300])
def test_int8_gemm_matches_reference_exactly(shape, zero_point):
    u, w = gemm_inputs(*shape, seed=sum(shape))
    got = ops.int8_gemm(u, zero_point, ops.int8_gemm_pack(w), shape[2])
    assert got.dtype == torch.int32 and torch.equal(got, ref.int8_gemm(u, zero_point, w))


@needs_ext
@pytest.mark.parametrize("shape", GEMM_SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_int8_gemm_dequantized_equals_the_epilogue_bit_for_bit(shape, with_bias):
    """With scale (and bias) the GEMM returns int8_linear_epilogue's float32 of its accumulators,
    computed on each tile (partial tiles too: N, M not multiples of 16 and 6)."""
    u, w = gemm_inputs(*shape, seed=sum(shape) + 1)
    g = gen(shape[2])
    scale = torch.rand(shape[2], generator=g) * 1e-3 + 1e-5
    bias = torch.randn(shape[2], generator=g) if with_bias else None
    got = ops.int8_gemm(u, 131, ops.int8_gemm_pack(w), shape[2], scale, bias)
    acc = ref.int8_gemm(u, 131, w)
    expected = ops.int8_linear_epilogue(acc, scale, bias if with_bias else torch.zeros_like(scale))
    assert got.dtype == torch.float32 and torch.equal(got, expected)
    assert torch.equal(got, ref.int8_gemm(u, 131, w, scale, bias))


@needs_ext
def test_int8_gemm_extreme_operands_do_not_saturate():
    """255·(-128) and 255·127 in every pair: far outside int16, exact in the int32 pair sums."""
    u = torch.full((7, 40), 255, dtype=torch.uint8)
    w = torch.where(torch.arange(20)[:, None] % 2 == 0, 127, -128).expand(20, 40).to(torch.int8).contiguous()
    got = ops.int8_gemm(u, 0, ops.int8_gemm_pack(w), 20)
    assert torch.equal(got, (255 * 40 * w[:, 0].int()).expand(7, 20))


@needs_ext
def test_int8_gemm_thread_count_does_not_change_result():
    u, w = gemm_inputs(300, 384, 200, seed=11)
    packed = ops.int8_gemm_pack(w)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.int8_gemm(u, 77, packed, 200)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, ops.int8_gemm(u, 77, packed, 200))
    assert torch.equal(one, ref.int8_gemm(u, 77, w))


@needs_ext
def test_int8_gemm_portable_path_matches_reference():
    """ATEN_CPU_CAPABILITY=default selects the kernel's portable loop (CPUs below AVX2)."""
    import subprocess
    import sys

    code = ("import torch, maskaq; from maskaq import ops, reference as ref\n"
            f"assert torch.backends.cpu.get_cpu_capability() in {CAPABILITY_NAMES['default']!r}\n"
            "g = torch.Generator().manual_seed(0)\n"
            "for m, k, n in [(13, 385, 17), (100, 600, 33), (29, 1101, 40)]:\n"
            "    u = torch.randint(0, 256, (m, k), dtype=torch.uint8, generator=g)\n"
            "    w = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)\n"
            "    assert torch.equal(ops.int8_gemm(u, 129, ops.int8_gemm_pack(w), n), ref.int8_gemm(u, 129, w))\n"
            "    s, b = torch.rand(n, generator=g) * 1e-3, torch.randn(n, generator=g)\n"
            "    assert torch.equal(ops.int8_gemm(u, 129, ops.int8_gemm_pack(w), n, s, b), ref.int8_gemm(u, 129, w, s, b))\n")
    import os

    run = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, ATEN_CPU_CAPABILITY="default"),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]


def _gemm_bad_calls():
    u, w = gemm_inputs(5, 10, 7, seed=0)
    packed = lambda: ops.int8_gemm_pack(w)  # noqa: E731
    return [
        (TypeError, "weight must have dtype", lambda: ops.int8_gemm_pack(w.float())),
        (ValueError, "weight", lambda: ops.int8_gemm_pack(w[0])),
        (TypeError, "input must have dtype", lambda: ops.int8_gemm(u.to(torch.int8), 0, packed(), 7)),
        (ValueError, "input", lambda: ops.int8_gemm(u[0], 0, packed(), 7)),
        (ValueError, "does not hold 17 output features", lambda: ops.int8_gemm(u, 0, packed(), 17)),
        (ValueError, "input features, input has 12", lambda: ops.int8_gemm(torch.zeros(5, 12, dtype=torch.uint8), 0,
                                                                            packed(), 7)),
        (TypeError, "packed_weight must have dtype", lambda: ops.int8_gemm(u, 0, packed().int(), 7)),
        (ValueError, "overflow", lambda: ops.int8_gemm(u, 40000, packed(), 7)),
        (ValueError, "scale must be", lambda: ops.int8_gemm(u, 0, packed(), 7, torch.ones(6))),
        (TypeError, "bias must have dtype", lambda: ops.int8_gemm(u, 0, packed(), 7, torch.ones(7),
                                                                  torch.ones(7, dtype=torch.float64))),
        (ValueError, "bias needs a scale", lambda: ops.int8_gemm(u, 0, packed(), 7, None, torch.ones(7))),
    ]


@needs_ext
@pytest.mark.parametrize("case", range(len(_gemm_bad_calls())))
def test_int8_gemm_bad_inputs(case):
    error, match, call = _gemm_bad_calls()[case]
    with pytest.raises(error, match=match):
        call()


@needs_ext
def test_int8_gemm_empty_inputs():
    _, w = gemm_inputs(1, 10, 7, seed=0)
    packed = ops.int8_gemm_pack(w)
    assert ops.int8_gemm(torch.zeros(0, 10, dtype=torch.uint8), 0, packed, 7).shape == (0, 7)
    empty_k = ops.int8_gemm(torch.zeros(3, 0, dtype=torch.uint8), 0, ops.int8_gemm_pack(w[:, :0]), 7)
    assert torch.equal(empty_k, torch.zeros(3, 7, dtype=torch.int32))
    bias = torch.randn(7, generator=gen(1))
    empty_k = ops.int8_gemm(torch.zeros(3, 0, dtype=torch.uint8), 0, ops.int8_gemm_pack(w[:, :0]), 7, torch.ones(7), bias)
    assert torch.equal(empty_k, bias.expand(3, 7))


# --------------------------------------------------------------------------------------------
# opcheck: schema, fake kernels (torch.compile), AOT dispatch


@needs_ext
def test_opcheck_int_ops():
    utils = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    acc, scale, bias = epilogue_inputs(9, 12, seed=6)
    for args in ((acc, scale, bias, "gelu", 0.0, 0, 0, 255), (acc, scale, bias, "none", 0.05, 3, 0, 255),
                 (acc, scale, bias, "gelu", 0.05, -3, -128, 127)):
        torch.library.opcheck(torch.ops.maskaq.int8_linear_epilogue.default, args, test_utils=utils)
    q, k, v, s = attention_inputs((2, 2, 19, 8), seed=7)
    torch.library.opcheck(torch.ops.maskaq.int8_attention.default, (q, k, v, s, 1 / 255, 0, 0, 255, 1, -2, 3),
                          test_utils=utils)
    torch.library.opcheck(torch.ops.maskaq.int8_attention.default, (q, k, v, s, 1 / 15, 0, 0, 15),
                          test_utils=utils)
    torch.library.opcheck(torch.ops.maskaq.qkv_int8_attention.default,
                          (qkv_inputs(2, 19, 2, 8, seed=9), s, 1 / 255, 0, 0, 255, *QKV_RANGES[1]), test_utils=utils)
    u, w = gemm_inputs(9, 21, 18, seed=8)
    torch.library.opcheck(torch.ops.maskaq.int8_gemm_pack.default, (w,), test_utils=utils)
    torch.library.opcheck(torch.ops.maskaq.int8_gemm.default, (u, 100, ops.int8_gemm_pack(w), 18), test_utils=utils)
    torch.library.opcheck(torch.ops.maskaq.int8_gemm.default,
                          (u, 100, ops.int8_gemm_pack(w), 18, torch.rand(18), torch.randn(18)), test_utils=utils)


# --------------------------------------------------------------------------------------------
# The integer modules' CUDA code paths, run on CPU tensors (the Python logic around the kernels:
# grids, zero-point shifts, padding rules); the CUDA tests below run them on a GPU.


def _small_vit(seed=0, **kwargs):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    args = dict(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=48, depth=2, num_heads=3,
                mlp_ratio=2.0)
    args.update(kwargs)
    return VisionTransformer(**args).eval()


def _student(wbits, abits, seed=0, **kwargs):
    from maskaq.quant import calibrate, quantize_model

    qmodel = quantize_model(_small_vit(seed, **kwargs), wbits, abits).eval()
    with torch.no_grad():
        calibrate(qmodel, torch.randn(8, 1, 28, 28, generator=gen(seed + 1)))
    return qmodel


def _linear(n_in, n_out, abits, seed, signed=True):
    from maskaq.quant import QuantLinear

    torch.manual_seed(seed)
    layer = QuantLinear.from_float(nn.Linear(n_in, n_out), 8, abits)
    x = torch.randn(64, n_in) * 2 + (0.3 if signed else 3.0)
    layer.input_quantizer.init_from(x)
    return layer


@needs_ext
@pytest.mark.parametrize("n_in,n_out,m", [(96, 40, 300), (96, 40, 5), (96, 40, 21), (30, 12, 7)])
@pytest.mark.parametrize("abits,signed", [(8, True), (8, False), (4, True)])
def test_int_linear_cuda_path_on_cpu(n_in, n_out, m, abits, signed):
    """IntLinear's CUDA path (int8 s = q − qmin − 128, torch._int_mm with its padding rules or the
    float GEMM, the fused epilogue) and its CPU path both equal the float64 fake-quant layer within
    quant_linear_reference's bound: exact integer sums, the epilogue's float32 roundings, and one
    level (α·|w| of the column) where x/α + z lies within float32 rounding of a tie, which the two
    paths may round differently."""
    from maskaq.integer import IntLinear

    layer = _linear(n_in, n_out, abits, seed=n_in + m, signed=signed)
    integer = IntLinear.from_quant(layer)
    x = torch.randn(m, n_in, generator=gen(m)) * 2 + (0.3 if signed else 3.0)
    exact, bound = quant_linear_reference(layer, x)
    with torch.no_grad():
        cpu = integer(x)
        cuda_path = integer._cuda_forward(x)
        assert cuda_path.dtype == torch.float32
        # the same GEMM from uint8 input u = q − qmin (what the CPU quantizer produces)
        from_uint8 = integer._cuda_forward(integer.quantize_input(x))
    assert_within(cpu, exact, bound, "CPU path")
    # The CUDA path folds its int8 grid's zero point into the bias (y = acc·scale + b − z_s·ΣW·scale):
    # the epilogue's roundings are of |acc·scale| and that folded bias, up to 128·Σ|W|·scale each, not
    # of the output.
    _, w_t, scale, folded = integer._cuda_pack()
    epilogue = EPILOGUE_ROUNDINGS * U32 * (128 * w_t.double().abs().sum(0) * scale.double() + folded.double().abs())
    for name, got in (("CUDA path", cuda_path), ("CUDA path from uint8", from_uint8)):
        assert_within(got, exact, bound + epilogue, name)


@needs_ext
def test_int_mlp_cuda_fusion_on_cpu():
    """fc1 with GELU and the requantization to fc2's int8 grid in the epilogue, then fc2: as the
    unfused fc1 → GELU → fc2 (both on the CUDA code path)."""
    from maskaq.integer import export_integer
    from maskaq.integer.modules import IntMlp

    imodel = export_integer(_student(8, 8, seed=3))
    mlp = next(m for m in imodel.modules() if isinstance(m, IntMlp))
    x = torch.randn(2 * 50, mlp.fc1.in_features, generator=gen(4))
    with torch.no_grad():
        hidden = mlp.fc1._cuda_forward(x, activation="gelu", out=mlp.fc2)
        assert hidden.dtype == torch.int8
        fused = mlp.fc2._cuda_forward(hidden)
        unfused_hidden = mlp.fc2._cuda_int8_input(mlp.act(mlp.fc1._cuda_forward(x)))
        unfused = mlp.fc2._cuda_forward(unfused_hidden)
        cpu = mlp(x)
    diff = (hidden.int() - unfused_hidden.int()).abs()  # GELU's erf by an ulp, at ties only
    assert diff.max() <= 1 and diff.bool().float().mean() <= 1e-3
    torch.testing.assert_close(fused, unfused, rtol=1e-3, atol=1e-2 * unfused.abs().max().item())
    assert (fused - cpu).abs().mean() < 0.02 * cpu.abs().mean()


@needs_ext
@pytest.mark.parametrize("fold", [True, False])
@pytest.mark.parametrize("abits", [8, 4])
def test_int_attention_kernel_path_on_cpu(monkeypatch, fold, abits):
    """IntAttention with the int8_attention op (the CUDA branch, forced on CPU tensors) equals its
    CPU loop exactly: same integers, same softmax. Zero points are set so that the centred q, k, v
    grids do not fit int8 (the shifted operands with zero points are used)."""
    from maskaq.integer import IntAttention

    qmodel = _student(8, abits, seed=2)
    attn = qmodel.blocks[1].attn
    for i, quantizer in enumerate(attn.attn_quantizers):
        if i != 2:  # q, k, v: z = ∓3 moves the centred grid outside int8
            quantizer.zero_point.data.fill_(-3.0 if i % 2 else 3.0)
    integer = IntAttention.from_quant(attn, fold=fold)
    x = torch.randn(3, 50, 48, generator=gen(5))
    with torch.no_grad():  # both paths forced: with several threads the CPU itself takes the kernel
        monkeypatch.setattr(IntAttention, "_uses_int8_kernel", staticmethod(lambda x: False))
        loop = integer(x)
        monkeypatch.setattr(IntAttention, "_uses_int8_kernel", staticmethod(lambda x: True))
        kernel = integer(x)
    assert torch.equal(kernel, loop)


@needs_ext
def test_int_attention_cpu_path_follows_thread_count_and_gives_the_same_integers():
    """On the CPU IntAttention takes the int8_attention op with several threads or where its products run
    on an integer GEMM (int16 on AVX2, oneDNN int8 with VNNI), else its per-sample loop (measured faster
    each way); the two give the same output."""
    from maskaq.integer import IntAttention
    from maskaq.integer.cpu_gemm import ATTENTION_BLAS, attention_products_path

    integer = IntAttention.from_quant(_student(8, 8, seed=4).blocks[0].attn, fold=True)
    x = torch.randn(2, 50, 48, generator=gen(6))
    threads = torch.get_num_threads()
    outputs = {}
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            assert IntAttention._uses_int8_kernel(x) == (n > 1 or attention_products_path() != ATTENTION_BLAS)
            with torch.no_grad():
                outputs[n] = integer(x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outputs[1], outputs[2])


def test_missing_cuda_kernels_warn_once(monkeypatch):
    from maskaq.integer import device

    monkeypatch.setattr(device, "_warned_no_cuda_kernels", False)
    monkeypatch.setattr(device.ops, "integer_kernels_available", lambda device: False)
    with pytest.warns(RuntimeWarning, match="no CUDA kernels"):
        assert not device._cuda_kernels(torch.device("cuda"))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not device._cuda_kernels(torch.device("cuda"))


# --------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU; benchmarks/gpu_check.sh runs them)


def _require_cuda_kernels():
    info = maskaq.extension_info()
    assert info["loaded"] and info["with_cuda"], (
        f"a GPU is present but maskaq._C has no CUDA kernels ({info}); rebuild with MASKAQ_CUDA=1")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("shape", EPILOGUE_SHAPES)
@pytest.mark.parametrize("requant", REQUANTS)
@pytest.mark.parametrize("activation", ["none", "gelu"])
def test_cuda_epilogue_matches_reference(shape, requant, activation):
    _require_cuda_kernels()
    acc, scale, bias = epilogue_inputs(*shape, seed=shape[0] * 7 + shape[1])
    # contiguous inputs (the 4-wide vector path where N % 4 == 0) and offset scale / bias (scalar path)
    offset = torch.cat([torch.zeros(1), scale]).cuda()[1:], torch.cat([torch.zeros(1), bias]).cuda()[1:]
    for s, b in ((scale.cuda(), bias.cuda()), offset):
        got = torch.ops.maskaq.int8_linear_epilogue(acc.cuda(), s, b, activation, *requant).cpu()
        assert_epilogue_close(got, acc, scale, bias, activation, requant, CUDA_ERF_ABS_ERROR)


def assert_attention_close(got, expected, v, zv, max_rows_share=0.02, max_flips=3):
    """Equal but for a few rows where probability levels rounded the other way (one flip moves a
    row by one row of ṽ)."""
    assert got.shape == expected.shape and torch.equal(got, got.round())
    diff = (got.double() - expected.double()).abs()
    rows = diff.amax(dim=-1) > 0
    assert rows.sum().item() <= max(2, max_rows_share * rows.numel()), rows.float().mean()
    v_mag = (v.double() - zv).abs().max().item()
    assert diff.max().item() <= max_flips * v_mag


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("shape", ATTN_SHAPES + [(4, 6, 197, 64), (2, 2, 300, 96), (1, 1, 70, 128)])
@pytest.mark.parametrize("p_grid", P_GRIDS)
@pytest.mark.parametrize("zero_points", ZERO_POINTS)
def test_cuda_attention_matches_reference(shape, p_grid, zero_points):
    _require_cuda_kernels()
    q, k, v, scale_qk = attention_inputs(shape, seed=sum(shape))
    args = (scale_qk, *p_grid_args(p_grid, shape[2]), *zero_points)
    expected = ref.int8_attention(q, k, v, *args)
    got = torch.ops.maskaq.int8_attention(q.cuda(), k.cuda(), v.cuda(), *args).cpu()
    assert_attention_close(got, expected, v, zero_points[2])


@pytest.mark.cuda
@needs_cuda
def test_cuda_attention_exact_cases():
    """Uniform and one-hot softmax (no level can flip): the tensor-core products and every
    zero-point correction must be exact."""
    _require_cuda_kernels()
    for shape in [(2, 2, 37, 20), (1, 3, 45, 24), (1, 2, 130, 64), (1, 1, 9, 200)]:
        q, k, v, _ = attention_inputs(shape, seed=shape[2])
        for zs in [(0, 0, 0), (27, -31, 9), (-100, 100, 120)]:
            for args in ((0.0, 1.0 / 255, 0, 0, 255), (100.0, 1.0 / 255, 0, 0, 255), (100.0, 1 / 15, -3, 0, 15)):
                expected = ref.int8_attention(q, k, v, *args, *zs)
                got = torch.ops.maskaq.int8_attention(q.cuda(), k.cuda(), v.cuda(), *args, *zs).cpu()
                assert torch.equal(got, expected), (shape, zs, args)


@pytest.mark.cuda
@needs_cuda
def test_cuda_opcheck_and_bad_inputs():
    _require_cuda_kernels()
    utils = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    acc, scale, bias = (t.cuda() for t in epilogue_inputs(9, 12, seed=6))
    torch.library.opcheck(torch.ops.maskaq.int8_linear_epilogue.default,
                          (acc, scale, bias, "gelu", 0.05, 3, 0, 255), test_utils=utils)
    q, k, v, s = attention_inputs((2, 2, 19, 8), seed=7)
    q, k, v = q.cuda(), k.cuda(), v.cuda()
    torch.library.opcheck(torch.ops.maskaq.int8_attention.default, (q, k, v, s, 1 / 255, 0, 0, 255, 1, -2, 3),
                          test_utils=utils)
    with pytest.raises(ValueError, match="scale"):
        torch.ops.maskaq.int8_linear_epilogue(acc, scale.cpu(), bias, "none", 0.0, 0, 0, 255)
    with pytest.raises(ValueError, match="k is on cpu but must be on cuda"):
        torch.ops.maskaq.int8_attention(q, k.cpu(), v, s, 1 / 255, 0, 0, 255)
    torch.cuda.synchronize()  # the device is still usable


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("abits", [8, 4])
def test_cuda_int_modules_match_cpu(abits):
    """IntLinear (fused epilogue), IntMlp (GELU + requantization in fc1's epilogue) and
    IntAttention (int8 tensor cores) on CUDA against the same modules on the CPU."""
    from maskaq.integer import IntAttention, IntLinear, export_integer
    from maskaq.integer.modules import IntMlp

    _require_cuda_kernels()
    qmodel = _student(8, abits, seed=8)
    cpu_model = export_integer(qmodel)
    gpu_model = export_integer(qmodel, device="cuda")
    x = torch.randn(16, 1, 28, 28, generator=gen(9))
    with torch.no_grad():
        cpu, gpu = cpu_model(x), gpu_model(x.cuda()).cpu()
    assert (cpu.argmax(1) == gpu.argmax(1)).float().mean() >= 0.9
    assert (cpu - gpu).abs().mean() < 0.05 * cpu.abs().mean()
    tokens = torch.randn(4, 50, 48, generator=gen(10))
    for cls in (IntLinear, IntMlp, IntAttention):  # the first of each: blocks[0]'s qkv, mlp, attn
        c = next(m for m in cpu_model.modules() if isinstance(m, cls))
        g = next(m for m in gpu_model.modules() if isinstance(m, cls))
        with torch.no_grad():
            want, got = c(tokens), g(tokens.cuda()).cpu()
        close = torch.isclose(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
        assert close.float().mean() > 0.98, (cls.__name__, close.float().mean())
        assert (got - want).abs().mean() < 0.02 * want.abs().mean(), cls.__name__


@needs_ext
def test_bench_int8_gemm_checks_every_impl_and_writes_json(tmp_path, capsys):
    """benchmarks/bench_int8_gemm.py (timing not asserted): every implementation's accumulators are
    compared with the exact product; maskaq's int16 GEMM and split weights are exact on any CPU."""
    import json

    from _benchmarks import load_benchmark
    bench = load_benchmark("bench_int8_gemm")
    out = tmp_path / "gemm.json"
    assert bench.main(["--layers", "40x24", "--tokens", "7", "--batches", "1", "2", "--rounds", "1", "--calls", "1",
                       "--threads", "1", "--json", str(out)]) == 0
    records = json.loads(out.read_text())
    assert [(r["m"], r["impl"]) for r in records] == [(m, i) for m in (7, 14) for i in bench.IMPLS]
    for r in records:
        assert (r["k"], r["n"]) == (40, 24) and r["ms"] > 0 and r["vs_fp32"] > 0
        assert (r["exact"] is None) == (r["impl"] == "fp32")
        if r["impl"] in ("maskaq_int16", "onednn_split"):
            assert r["exact"] is True
    assert "maskaq_int16" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="2"):  # argparse's exit status for a bad argument
        bench.main(["--layers", "40by24"])
    assert "--layers takes KxN, got '40by24'" in capsys.readouterr().err
