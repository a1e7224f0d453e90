"""Integer export (maskaq.integer): integer kernels against the fake-quant modules, export round
trip, fidelity on the bundled teacher, bad inputs, and the benchmark's non-timing parts."""
import json
import math
import re

import pytest
import torch
from torch import nn

from maskaq.integer import IntAttention, IntLinear, IntMlp, export_integer, load_integer, save_integer, set_kernel
from maskaq.integer.export import pack_int4, unpack_int4
from maskaq.integer.grid import integer_grid
from maskaq.quant import QuantConv2d, QuantLinear, calibrate, quantize_model
from _bounds import (CAPABILITY_NAMES, EPILOGUE_ROUNDINGS, U32, assert_within, near_tie, quant_conv_reference,
                     quant_linear_reference, softmax_rel_bound)
from _models import small_vit

KERNELS = ["onednn", "fbgemm"]


def _student(wbits, abits, seed=0, **kwargs):
    model = small_vit(seed, **kwargs)
    qmodel = quantize_model(model, wbits, abits).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        calibrate(qmodel, torch.randn(8, 1, 28, 28, generator=g))
    return model, qmodel


def _exported_w8a8(seed):
    """(fake-quant student, its integer export) of a calibrated W8A8 small ViT."""
    _, qmodel = _student(8, 8, seed=seed)
    return qmodel, export_integer(qmodel)


def _assert_linears_match(qmodel, imodel, x):
    """Every IntLinear (and IntConv2d) of ``imodel`` on the input its fake-quant module saw in ``qmodel(x)``, within
    the integer GEMM's bound against float64 fake quant (tests/_bounds.py), folds included."""
    inputs, hooks = {}, []
    for name, m in qmodel.named_modules():
        if isinstance(m, QuantConv2d) or (isinstance(m, QuantLinear) and m.input_quantizer is not None):
            hooks.append(m.register_forward_pre_hook(lambda mod, args, name=name: inputs.__setitem__(name, args[0].detach())))
    try:
        with torch.no_grad():
            qmodel(x)
    finally:
        for h in hooks:
            h.remove()
    assert inputs
    for name, xin in inputs.items():
        integer = imodel.get_submodule(name)
        if isinstance(qmodel.get_submodule(name), QuantConv2d):
            with torch.no_grad():
                got = integer(xin)
            assert_within(got, *quant_conv_reference(qmodel.get_submodule(name), xin), name)
            continue
        assert isinstance(integer, IntLinear), name
        with torch.no_grad():
            got = integer(xin / float(integer.input_prescale))
        exact, bound = quant_linear_reference(qmodel.get_submodule(name), xin, integer.output_scale)
        assert_within(got, exact, bound, name)


def _exact_linear(wbits, abits, signed, zero_point, bias, seed=0):
    """A QuantLinear whose arithmetic is exact in float32: power-of-two weight steps, a power-of-two
    input step, an integer zero point and a bias on a coarse binary grid (or none)."""
    g = torch.Generator().manual_seed(seed)
    n_in, n_out = 64, 24
    layer = QuantLinear(n_in, n_out, bias=bias, wbits=wbits, abits=abits)
    qmax_w = 2 ** (wbits - 1) - 1
    w_int = torch.randint(-qmax_w, qmax_w + 1, (n_out, n_in), generator=g).float()
    # max|w| = (2^w − 1)/2 · 2^-k, so the min/max step 2·max|w|/(2^w − 1) is exactly 2^-k; that
    # weight itself rounds (half to even) to -2^(w-1) on odd rows, the level only the full grid
    # has, and to 2^(w-1), clamped to qmax, on even rows
    w_int[:, 0] = (qmax_w + 0.5) * (1 - 2 * (torch.arange(n_out) % 2))
    shifts = torch.randint(4, 8, (n_out, 1), generator=g).float()
    with torch.no_grad():
        layer.weight.copy_(w_int * 2.0 ** -shifts)
        if bias:
            layer.bias.copy_(torch.randint(-64, 64, (n_out,), generator=g).float() / 8)
        quantizer = layer.input_quantizer
        quantizer.init_from(torch.randn(16, n_in) - (0 if signed else -10))
        quantizer.step.fill_(2.0 ** -3)
        quantizer.zero_point.fill_(float(zero_point))
    assert quantizer.signed == signed
    return layer


def _random_input(layer, n, g, spread=1.5):
    q = layer.input_quantizer
    step, z = float(q.step.detach()), round(float(q.zero_point.detach()))
    lo, hi = (q.qmin - z) * step, (q.qmax - z) * step
    centre, half = (lo + hi) / 2, (hi - lo) / 2
    return centre + half * spread * (2 * torch.rand(n, layer.in_features, generator=g) - 1)  # also outside the range


# -- IntLinear ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("wbits,abits,signed,zero_point,bias", [
    (8, 8, True, 0, True), (8, 8, True, -3, False), (8, 8, False, 0, True), (8, 8, False, -5, True),
    (4, 8, True, 2, True), (4, 4, True, -1, True), (4, 4, False, 3, False), (8, 6, False, -20, True),
])
def test_int_linear_equals_fake_quant_exactly(kernel, wbits, abits, signed, zero_point, bias):
    layer = _exact_linear(wbits, abits, signed, zero_point, bias)
    integer = IntLinear.from_quant(layer, kernel)
    g = torch.Generator().manual_seed(3)
    x = _random_input(layer, 37, g)
    x = torch.round(x * 2 ** 10) / 2 ** 10 + 2.0 ** -12  # x/α never lies on a .5 tie
    with torch.no_grad():
        expected = layer(x)
        got = integer(x)
    assert torch.equal(got, expected), (got - expected).abs().max()


def test_cached_onednn_call_follows_every_change_of_the_layer():
    """A layer reads its grid and weights once into its oneDNN call; folding a scale into it, a new
    state dict, another kernel and a device move must all take effect on the next call."""
    layer = _exact_linear(8, 8, True, -3, True)
    integer = IntLinear.from_quant(layer, "onednn")
    x = _random_input(layer, 37, torch.Generator().manual_seed(4))
    x = torch.round(x * 2 ** 10) / 2 ** 10 + 2.0 ** -12  # no .5 ties
    with torch.no_grad():
        expected = layer(x)
        assert torch.equal(integer(x), expected)
        first = integer.onednn_call()
        if integer.cpu_gemm == "onednn":  # (CPUs whose oneDNN clips these pair sums run maskaq's GEMM)
            assert first is not None and integer.onednn_call() is first  # read once, reused
        else:
            assert first is None
        integer.fold_output_scale(torch.full((integer.out_features,), 2.0, dtype=torch.float64))
        assert torch.equal(integer(x), 2 * expected)
        integer.fold_input_prescale(4.0)  # the caller now passes x/4
        assert torch.equal(integer(x / 4), 2 * expected)
        fresh = IntLinear.from_quant(layer, "onednn")
        fresh.load_state_dict(integer.state_dict())
        assert torch.equal(fresh(x / 4), 2 * expected)
        integer.load_state_dict(IntLinear.from_quant(layer, "onednn").state_dict())
        assert torch.equal(integer(x), expected)
        integer.set_kernel("fbgemm")
        assert integer.onednn_call() is None and torch.equal(integer(x), expected)
        integer.set_kernel("onednn")
        before = integer.onednn_call()
        integer.to(torch.float32)  # a move repacks
        assert before is None or integer.onednn_call() is not before
        assert torch.equal(integer(x), expected)


@pytest.mark.parametrize("kernel", KERNELS)
def test_int_linear_accumulates_exact_integers(kernel):
    """Full 8-bit ranges on both operands (u8 up to 255 times s8 -128 and 127): no int16 saturation."""
    layer = _exact_linear(8, 8, False, 0, False)
    negative = torch.rand(layer.weight.shape) < 0.5
    with torch.no_grad():  # ±127.5·2^-7: step exactly 2^-7, integers -128 and 127
        layer.weight.copy_(torch.where(negative, -1.0, 1.0) * 127.5 * 2.0 ** -7)
    integer = IntLinear.from_quant(layer, kernel)
    x = torch.full((5, layer.in_features), 255 * 2.0 ** -3)  # u = 255 everywhere
    x[1] = 0.0
    w_int = torch.where(negative, -128.0, 127.0)
    expected = (torch.round(x / 2.0 ** -3).double() @ w_int.double().T) * 2.0 ** -3 * 2.0 ** -7
    with torch.no_grad():
        got = integer(x)
    assert torch.equal(got.double(), expected)


@pytest.fixture(params=["int16", "split"])
def saturating_cpu(request, monkeypatch):
    """Pretend this CPU's int8 GEMMs clip pair sums to int16 (as without VNNI), with AVX2 ("int16":
    maskaq's exact GEMM takes the overflowing layers) or without ("split": the library runs them on
    split weights). Both paths then run on any machine, and their exactness is checked."""
    from maskaq.integer import linear

    monkeypatch.setattr(linear, "cpu_int8_pairs_saturate", lambda kernel: True)
    if request.param == "split":
        monkeypatch.setattr(linear, "int16_gemm_available", lambda: False)
    elif not linear.int16_gemm_available():
        pytest.skip("maskaq's int16 GEMM needs the extension and an AVX2 CPU")
    return request.param


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("wbits,abits,overflows", [(8, 8, True), (4, 8, False), (8, 7, False), (8, 4, False)])
def test_saturating_cpu_reroutes_only_overflowing_layers_and_stays_exact(saturating_cpu, kernel, wbits, abits,
                                                                        overflows):
    """On a saturating CPU only the layers with 2·max u·max|w| > 32767 (8-bit weights against 8-bit
    activations) leave the library's direct path, for maskaq's int16 GEMM or split weights, and
    stay exact, on float and on uint8 inputs; neither fuses an activation in its epilogue."""
    layer = _exact_linear(wbits, abits, False, -5 if abits == 8 else 0, True)
    integer = IntLinear.from_quant(layer, kernel)
    rerouted = "int16" if saturating_cpu == "int16" else f"{kernel}-split"
    assert integer.cpu_gemm == (rerouted if overflows else kernel)
    assert integer.splits_weights == (overflows and saturating_cpu == "split")
    g = torch.Generator().manual_seed(4)
    x = torch.round(_random_input(layer, 29, g) * 2 ** 10) / 2 ** 10 + 2.0 ** -12
    with torch.no_grad():
        assert torch.equal(integer(x), layer(x))
    if not overflows:
        return
    assert not integer.fuses_epilogue("gelu")
    if kernel == "onednn" or saturating_cpu == "int16":  # the GEMMs that take uint8 inputs
        u = integer.quantize_input(x)
        with torch.no_grad():
            assert torch.equal(integer(u), layer(x))
        with pytest.raises(RuntimeError, match="cannot fuse"):
            integer.run_uint8(u, act="gelu")


def test_split_halves_recombine_to_the_weights(monkeypatch):
    from maskaq.integer import linear

    monkeypatch.setattr(linear, "cpu_int8_pairs_saturate", lambda kernel: True)
    monkeypatch.setattr(linear, "int16_gemm_available", lambda: False)
    layer = _exact_linear(8, 8, True, 0, True)
    integer = IntLinear.from_quant(layer)
    assert integer.splits_weights
    weights, scales, bias = integer._kernel_weights(split=True)
    high, low = weights[:24].to(torch.int16), weights[24:].to(torch.int16)
    assert int(high.min()) >= -64 and int(high.max()) <= 63 and set(low.unique().tolist()) <= {0, 1}
    assert torch.equal(2 * high + low, integer.weight_int.to(torch.int16))
    assert torch.equal(scales[:24], 2 * scales[24:]) and not bias[24:].any()


@pytest.mark.parametrize("route", ["int16", "split"])
def test_int_mlp_on_saturating_cpu_matches_fake_quant(monkeypatch, route):
    """A W8A8 MLP on a saturating CPU, on maskaq's int16 GEMM or on split weights: unfused, exact."""
    from maskaq.integer import linear

    monkeypatch.setattr(linear, "cpu_int8_pairs_saturate", lambda kernel: True)
    if route == "split":
        monkeypatch.setattr(linear, "int16_gemm_available", lambda: False)
    elif not linear.int16_gemm_available():
        pytest.skip("maskaq's int16 GEMM needs the extension and an AVX2 CPU")
    qmodel, imodel = _exported_w8a8(seed=3)
    mlp = imodel.blocks[0].mlp
    x = torch.randn(2, 50, 48, generator=torch.Generator().manual_seed(0))
    assert not mlp._fusable(x)
    assert {mlp.fc1.cpu_gemm, mlp.fc2.cpu_gemm} == {"int16" if route == "int16" else "onednn-split"}
    with torch.no_grad():
        got, fake = mlp(x), qmodel.blocks[0].mlp(x)
        # the unfused path applies GELU in place on fc1's output: the same numbers as the module
        assert torch.equal(got, mlp.fc2(mlp.act(mlp.fc1(x))))
        for act in (nn.GELU(approximate="tanh"), nn.ReLU()):
            other = IntMlp(mlp.fc1, mlp.fc2, act)
            assert torch.equal(other(x), mlp.fc2(act(mlp.fc1(x))))
    close = torch.isclose(got, fake, rtol=1e-4, atol=1e-4 * fake.abs().max().item())
    assert close.float().mean() > 0.99


def test_integer_path_is_recorded():
    from maskaq.integer import cpu_integer_path

    path = cpu_integer_path()
    assert path["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert set(path) == {"cpu_capability", "onednn_int8", "fbgemm_int8", "attention_products"}
    from maskaq.integer.cpu_gemm import cpu_int8_pairs_saturate, int16_gemm_available

    int16_attention = int16_gemm_available() and path["cpu_capability"] == "AVX2"
    assert ("int16" in path["attention_products"]) == int16_attention
    if "int8" in path["attention_products"]:  # oneDNN's int8 GEMM only where it adds pairs in int32
        assert not cpu_int8_pairs_saturate("int_mm")
    _, qmodel = _student(8, 8)
    assert export_integer(qmodel).maskaq_integer["cpu_path"] == path


# ATen's vector widths from the narrowest up; a machine can run the kernels at its own and every one below
_CAPABILITIES = ("default", "avx2", "avx512")


@pytest.mark.slow
@pytest.mark.parametrize("capability", ["avx2", "default"])
def test_integer_tests_pass_on_forced_avx2_path(capability):
    """Whatever x86 CPU this runs on, run the integer and op tests again with ATen limited to a
    narrower vector width (AVX2; no vectorization at all) and the int8 libraries to AVX2 (no VNNI):
    the saturation probe must see it, and every exactness claim and error bound must hold there too,
    so that a test written on one kind of CPU cannot fail on the other. Only the CPU path's libraries
    (oneDNN, fbgemm) honour the ISA limits: torch._int_mm picks its CPU kernel by the CPU's own flags
    (oneDNN's, which then clips, where it reports VNNI; an exact loop on a real AVX2-only EPYC), and
    IntLinear measures that case on its own."""
    import os
    import subprocess
    import sys

    native = torch.backends.cpu.get_cpu_capability().lower()
    if native not in _CAPABILITIES or _CAPABILITIES.index(capability) >= _CAPABILITIES.index(native):
        pytest.skip(f"ATen's capability here is {native}: {capability} is not narrower")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability, DNNL_MAX_CPU_ISA="AVX2", ONEDNN_MAX_CPU_ISA="AVX2",
               FBGEMM_ENABLE_INSTRUCTIONS="AVX2", OMP_NUM_THREADS="1")
    probe = subprocess.run([sys.executable, "-c", "import torch; from maskaq.integer import modules as m; "
                            "print(all(m.cpu_int8_pairs_saturate(k) for k in m.KERNELS), "
                            "torch.backends.cpu.get_cpu_capability())"],
                           env=env, capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0, probe.stderr
    saturate, reached = probe.stdout.split(maxsplit=1)
    assert saturate == "True" and reached.strip() in CAPABILITY_NAMES[capability], \
        f"forcing {capability} did not reach ATen or the int8 GEMM libraries: {probe.stdout}"
    here = os.path.dirname(os.path.abspath(__file__))
    tests = [os.path.join(here, name) for name in ("test_integer.py", "test_int_ops.py", "test_ops.py")]
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests,
                          "-k", "not forced_avx2 and not fidelity"],
                         env=env, capture_output=True, text=True, timeout=1500, cwd=os.path.dirname(here))
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("wbits,abits", [(8, 8), (4, 8), (4, 4)])
def test_int_linear_matches_calibrated_fake_quant(kernel, wbits, abits):
    """General steps: the integer path differs from fake quant in float64 only by float rounding, and
    where x/α falls within its float32 rounding of a tie, by one step of that element."""
    torch.manual_seed(0)
    layer = QuantLinear.from_float(nn.Linear(96, 40), wbits, abits)
    x = torch.randn(300, 96) * 2 + 0.3
    layer.input_quantizer.init_from(x)
    integer = IntLinear.from_quant(layer, kernel)
    with torch.no_grad():
        got = integer(x)
    exact, bound = quant_linear_reference(layer, x)
    assert_within(got, exact, bound, f"{kernel} W{wbits}A{abits}")


def test_int_linear_weight_only_and_uint8_input():
    torch.manual_seed(1)
    float_input = QuantLinear.from_float(nn.Linear(16, 8), 8, None)
    integer = IntLinear.from_quant(float_input)
    x = torch.randn(4, 16)
    with torch.no_grad():
        torch.testing.assert_close(integer(x), float_input(x), rtol=1e-5, atol=1e-6)
    layer = QuantLinear.from_float(nn.Linear(16, 8), 8, 8)
    layer.input_quantizer.init_from(x)
    integer = IntLinear.from_quant(layer)
    u = integer.quantize_input(x)
    assert u.dtype == torch.uint8
    with torch.no_grad():
        torch.testing.assert_close(integer(u), integer(x))


# -- attention and MLP ---------------------------------------------------------------------------
@pytest.mark.parametrize("abits", [8, 4])
@pytest.mark.parametrize("fold", [True, False])
def test_int_attention_matches_fake_quant_attention(abits, fold):
    _, qmodel = _student(8, abits, seed=2)
    attn = qmodel.blocks[1].attn
    x = torch.randn(3, 50, 48, generator=torch.Generator().manual_seed(5))
    integer = IntAttention.from_quant(attn, fold=fold)
    assert integer.folded == fold
    seen = {}
    hooks = [integer.qkv.register_forward_hook(lambda m, a, out: seen.__setitem__("qkv", out.clone())),
             integer.proj.register_forward_hook(lambda m, a, out: seen.update(o=a[0].clone(), proj=out))]
    with torch.no_grad():
        expected, got = attn(x), integer(x)
    for h in hooks:
        h.remove()
    assert torch.equal(got, seen["proj"])
    # the three stages on the integer path's own inputs, each within its bound against float64:
    # qkv (an integer GEMM; folded, it returns x/α per slice)
    exact, bound = quant_linear_reference(attn.qkv, x, integer.qkv.output_scale)
    assert_within(seen["qkv"], exact, bound, "qkv")
    # the products: q·k and P·v exact in integers, the float32 softmax within softmax_rel_bound, so a
    # level of P flips (by one) only where P/α_p lies that close to a tie, moving O by |v| of its row
    gq, gk, gp, gv = integer.attn_grids
    qkv = seen["qkv"].view(3, 50, 3, 3, 16).permute(2, 0, 3, 1, 4).double()
    levels = [torch.round(t).clamp(g.qmin - g.zero_point, g.qmax - g.zero_point) if fold else integer_grid(t.float(), g).double()
              for t, g in zip(qkv, (gq, gk, gv))]
    logits = levels[0] @ levels[1].transpose(-2, -1) * (gq.step * gk.step * integer.scale)
    p = torch.softmax(logits, -1)
    t = p / gp.step
    slack = t * (softmax_rel_bound(logits, 2 * U32 * logits.abs()) + U32)
    flips = near_tie(t, slack, gp.qmin - gp.zero_point, gp.qmax - gp.zero_point).double()
    o = torch.round(t).clamp(gp.qmin - gp.zero_point, gp.qmax - gp.zero_point) @ levels[2]
    o_bound = flips @ levels[2].abs()
    o, o_bound = (z.transpose(1, 2).reshape(3, 50, 48) for z in (o, o_bound))
    o_scale = 1.0 if fold else gp.step * gv.step  # unfolded, proj's input is O·float32(α_p·α_v), 2 roundings
    assert_within(seen["o"], o * o_scale, (o_bound + 2 * U32 * o.abs()) * o_scale, "P·v")
    # proj (folded, its input holds O/(α_p·α_v) and its step is divided by the same)
    proj_in = seen["o"] * float(integer.proj.input_prescale)
    exact, bound = quant_linear_reference(attn.proj, proj_in)
    assert_within(got, exact, bound, "proj")
    # end to end, a flipped level above can move an output by more than one step: the logits of the
    # fake-quant attention and the integer one are compared stage by stage above, here only loosely
    assert torch.isclose(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item()).float().mean() > 0.99


@pytest.mark.parametrize("wbits,abits", [(8, 8), (8, 7), (4, 4)])
def test_int_mlp_fused_equals_unfused_path(wbits, abits):
    _, qmodel = _student(wbits, abits, seed=3)
    imodel = export_integer(qmodel)
    mlp = imodel.blocks[0].mlp
    assert isinstance(mlp, IntMlp)
    # 3x the calibration spread: some of fc1's outputs leave fc2's grid, so the fused requantization's clamp is used
    x = 3 * torch.randn(2, 50, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fused = mlp(x)
        unfused = mlp.fc2(mlp.act(mlp.fc1(x)))
    # fused unless this CPU's int8 library would clip fc1's pair sums (no VNNI: see IntLinear.cpu_gemm)
    assert mlp._fusable(x) == (mlp.fc1.cpu_gemm == "onednn")
    # both paths are fc2's integer GEMM on fc2's levels of fc1's GELU: bit-equal where those levels
    # agree, and a level can flip only by one (the two GELUs round differently near a tie), which
    # moves an output by α·|ŵ| of that column
    x2d = x.reshape(-1, 48)
    with torch.no_grad():
        u_unfused = mlp.fc2.quantize_input(mlp.act(mlp.fc1(x2d))).double()
        u_fused = (mlp.fc1.run_uint8(mlp.fc1.quantize_input(x2d), act=mlp.act_name, out=mlp.fc2).double()
                   if mlp._fusable(x) else u_unfused)
        w2 = qmodel.blocks[0].mlp.fc2.weight_quantizer(qmodel.blocks[0].mlp.fc2.weight).double()
    flips = (u_fused - u_unfused).abs()
    assert flips.max() <= 1
    same = (flips == 0).all(1).reshape(fused.shape[:-1])
    assert torch.equal(fused[same], unfused[same])
    shift = mlp.fc2.grid.step * (flips @ w2.abs().T).reshape(fused.shape)
    assert_within(fused, unfused.double(), shift * (1 + 1e-6) + EPILOGUE_ROUNDINGS * U32 * unfused.abs().double(), "fused")
    exact, bound = quant_linear_reference(qmodel.blocks[0].mlp.fc1, x)
    assert_within(mlp.fc1(x), exact, bound, "fc1")
    if mlp._fusable(x):  # the hidden bytes are u = q − qmin of fc2's grid, clamped to it
        grid = mlp.fc2.grid
        with torch.no_grad():
            y = mlp.fc1(x.reshape(-1, 48))
            hidden = mlp.fc1.run_uint8(mlp.fc1.quantize_input(x.reshape(-1, 48)), act=mlp.act_name, out=mlp.fc2)
        reference = integer_grid(mlp.act(y), grid) + (grid.zero_point - grid.qmin)
        assert (reference == grid.qmax - grid.qmin).any()  # the clamp is reached
        close = (hidden.float() - reference).abs() <= 1  # oneDNN's GELU and rounding: off by one at most
        assert close.all() and (hidden.float() == reference).float().mean() > 0.99


# -- whole model -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("wbits,abits", [(8, 8), (4, 8), (4, 4)])
def test_export_matches_fake_quant_model(kernel, wbits, abits):
    _, qmodel = _student(wbits, abits, seed=4)
    imodel = export_integer(qmodel, kernel=kernel)
    x = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        expected, got = qmodel(x), imodel(x)
    assert not any(isinstance(m, QuantLinear) for m in imodel.modules())
    # each integer layer on its fake-quant input, within its error bound: a level flip at a tie can
    # carry through the model, so the end-to-end logits are only checked for the predicted class
    _assert_linears_match(qmodel, imodel, x)
    assert (got.argmax(1) == expected.argmax(1)).float().mean() >= 0.9
    # the student is untouched and still runs
    assert any(isinstance(m, QuantLinear) for m in qmodel.modules())


def test_save_load_round_trip_packs_4bit_weights(tmp_path):
    model, qmodel = _student(4, 8, seed=5)
    imodel = export_integer(qmodel)
    save_integer(imodel, tmp_path / "int")
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "int" / "integer.safetensors"))
    packed = [k for k in saved if k.endswith(".weight_int4")]
    assert packed and not any(k.endswith(".weight_int") for k in saved)
    assert saved[packed[0]].dtype == torch.uint8
    meta = json.loads((tmp_path / "int" / "integer.json").read_text())
    assert meta["quant"]["wbits"] == 4
    loaded = load_integer(tmp_path / "int", small_vit(seed=99))  # weights of the FP model unused
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x), imodel(x))
    for name, buf in imodel.state_dict().items():
        assert torch.equal(buf, loaded.state_dict()[name]), name


def test_load_rejects_other_architecture(tmp_path):
    _, qmodel = _student(8, 8, seed=6)
    save_integer(export_integer(qmodel), tmp_path / "int")
    with pytest.raises(ValueError, match="match"):
        load_integer(tmp_path / "int", small_vit(embed_dim=96))
    with pytest.raises(ValueError, match="match|no module"):
        load_integer(tmp_path / "int", small_vit(depth=2))
    with pytest.raises(FileNotFoundError, match="integer.json not found: load_integer needs a directory written by"):
        load_integer(tmp_path / "missing", small_vit())


def test_pack_int4_round_trip():
    w = torch.randint(-8, 8, (5, 7), dtype=torch.int8)
    packed = pack_int4(w)
    assert packed.shape == (5, 4) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed, 7), w)
    with pytest.raises(ValueError, match=re.escape("pack_int4 takes values in [-8, 7]")):
        pack_int4(torch.full((2, 2), 9, dtype=torch.int8))


def test_set_kernel_switches_and_keeps_results():
    qmodel, imodel = _exported_w8a8(seed=7)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        a = imodel(x)
        b = set_kernel(imodel, "fbgemm")(x)
    assert all(m.kernel == "fbgemm" for m in imodel.modules() if isinstance(m, IntLinear))
    assert (a.argmax(1) == b.argmax(1)).all()
    with pytest.raises(ValueError, match="kernel"):
        set_kernel(imodel, "int4")


# -- bad inputs --------------------------------------------------------------------------------------
def test_export_rejects_uncalibrated_and_non_students():
    model = small_vit()
    qmodel = quantize_model(model, 8, 8)
    with pytest.raises(ValueError, match="calibrat"):
        export_integer(qmodel)
    with pytest.raises(ValueError, match="quantize_model"):
        export_integer(model)
    with pytest.raises(TypeError, match="export_integer needs an nn.Module, got str"):
        export_integer("deit_small_patch16_224")
    _, calibrated = _student(8, 8)
    with pytest.raises(ValueError, match="kernel"):
        export_integer(calibrated, kernel="cublas")
    with pytest.raises(ValueError, match="already"):
        export_integer(export_integer(calibrated))
    with torch.no_grad():
        calibrated.blocks[0].mlp.fc2.input_quantizer.step.fill_(-0.1)  # e.g. a diverged QAT run
    with pytest.raises(ValueError, match="step"):
        export_integer(calibrated)


def test_export_rejects_swin():
    import timm

    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=56, window_size=7,
                             embed_dim=24, depths=(1, 1), num_heads=(1, 2), num_classes=4).eval()
    qmodel = quantize_model(swin, 8, 8)
    with torch.no_grad():
        calibrate(qmodel, torch.randn(2, 3, 56, 56))
    with pytest.raises(ValueError, match="Swin"):
        export_integer(qmodel)


def test_int_attention_rejects_masks():
    _, qmodel = _student(8, 8)
    attn = IntAttention.from_quant(qmodel.blocks[0].attn)
    with pytest.raises(ValueError, match="attn_mask"):
        attn(torch.randn(1, 50, 48), attn_mask=torch.zeros(50, 50))


# -- fidelity on the bundled teacher -------------------------------------------------------------------
def _teacher(name="vit_fmnist"):
    from maskaq import zoo

    try:
        return zoo.load(name)
    except (FileNotFoundError, ValueError, OSError) as exc:
        pytest.skip(f"bundled teacher not available ({exc})")


@pytest.mark.parametrize("teacher_name, equalize", [("vit_fmnist", False), ("vit_fmnist_outliers", False),
                                                    ("vit_fmnist_outliers", True)])
@pytest.mark.parametrize("wbits", [8, 4])
def test_fidelity_on_bundled_teacher_subset(wbits, teacher_name, equalize):
    """Also on the teacher with a pretrained ViT's outlier channels, and on its equalized student
    (maskaq+'s: maskaq.quant.reparam folds into the float weights, the export stays per tensor)."""
    from maskaq.data import fashion_mnist
    from maskaq.quant.reparam import equalize_layernorm_channels

    teacher = _teacher(teacher_name)
    data = fashion_mnist("test")
    calib = torch.stack([data[i][0] for i in range(9000, 9032)])
    images = torch.stack([data[i][0] for i in range(300)])
    if equalize:
        teacher = equalize_layernorm_channels(teacher, calib, max_ratio=2.0)
        assert teacher.maskaq_equalized["channels"] > 0
    qmodel = quantize_model(teacher, wbits, 8).eval()
    with torch.no_grad():
        calibrate(qmodel, calib)
        imodel = export_integer(qmodel)
        fake, integer = qmodel(images), imodel(images)
    agreement = (fake.argmax(1) == integer.argmax(1)).float().mean().item()
    assert agreement >= 0.99, agreement  # 99.5% is checked on the full test set by the script
    assert (fake - integer).abs().mean() < 0.02 * fake.abs().mean()


# -- benchmark helpers (no timing assertions) -----------------------------------------------------------
def test_bench_table_json_and_plot(tmp_path):
    from maskaq.commands import bench

    records = [
        {"model": "m", "device": "cpu", "batch": 8, "impl": "fp32", "ms": 100.0, "img_per_s": 80.0, "peak_mb": 90.0},
        {"model": "m", "device": "cpu", "batch": 8, "impl": "int_w8a8", "ms": 50.0, "img_per_s": 160.0, "peak_mb": 40.0},
    ]
    assert bench.speedups(records)[("m", "cpu", 8, "int_w8a8")] == pytest.approx(2.0)
    table = bench.format_table(records)
    assert "int_w8a8" in table and "2.00x" in table
    bench.write_json(records, str(tmp_path / "r.json"))
    assert json.loads((tmp_path / "r.json").read_text()) == records
    bench.plot_speedups(records, str(tmp_path / "r.png"))
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_rejects_bad_options():
    import argparse

    from maskaq.commands import bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    for argv in (["--impls", "fp64"], ["--batches", "0"], ["--threads", "0"]):
        args = parser.parse_args(argv)
        with pytest.raises(Exception, match="impls|batches|threads"):
            bench._resolve(args)


def test_bench_wait_policy_default_is_libgomps_own(monkeypatch):
    """--omp-wait-policy default (the default) times torch as a user runs it: a set OMP_WAIT_POLICY is
    removed in the child process; PASSIVE / ACTIVE set it; inherit keeps the environment."""
    import argparse
    import subprocess

    from maskaq.commands import bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    assert parser.parse_args([]).omp_wait_policy == "default"
    monkeypatch.delenv("MASKAQ_BENCH_CHILD", raising=False)
    seen = {}
    monkeypatch.setattr(subprocess, "run", lambda cmd, env: seen.update(env=env) or argparse.Namespace(returncode=0))
    for env_policy, flag, child, policy in ((None, "default", False, None), ("PASSIVE", "default", True, None),
                                            ("PASSIVE", "PASSIVE", False, None), (None, "ACTIVE", True, "ACTIVE"),
                                            ("PASSIVE", "inherit", False, None)):
        if env_policy is None:
            monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
        else:
            monkeypatch.setenv("OMP_WAIT_POLICY", env_policy)
        args = parser.parse_args(["--omp-wait-policy", flag])
        assert bench._needs_child(args) == child, (env_policy, flag)
        if child:
            seen.clear()
            assert bench._run_in_child(args) == 0
            assert seen["env"].get("OMP_WAIT_POLICY") == policy and seen["env"]["MASKAQ_BENCH_CHILD"] == "1"


def test_bench_builds_and_runs_integer_impl():
    """The integer impl builds from a timm name and returns logits (timing not asserted)."""
    import argparse

    from maskaq.commands import bench

    model = small_vit()
    args = argparse.Namespace(seed=0, threads=1, kernel="onednn")
    impl = bench.build_impl("int_w8a8", model, "cpu", args, workdir=None)
    x = torch.randn(2, 1, 28, 28)
    out = impl.fn(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    assert impl.weight_bytes > 0
    assert math.isfinite(bench.measure_memory_mb(impl, x, "cpu"))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_int_model_matches_cpu_int_model():
    qmodel, imodel = _exported_w8a8(seed=8)
    x = torch.randn(32, 1, 28, 28)
    with torch.no_grad():
        cpu = imodel(x)
        gpu = export_integer(qmodel, device="cuda")(x.cuda()).cpu()
    assert (cpu.argmax(1) == gpu.argmax(1)).float().mean() >= 0.95
    assert (cpu - gpu).abs().mean() < 0.05 * cpu.abs().mean()
