"""Quantizers, quantized timm models, attention capture and save/load (maskaq.quant)."""
import math
from pathlib import Path

import pytest
import timm
import torch

from maskaq import reference
from maskaq.quant import (
    LsqActQuantizer,
    QuantAttention,
    QuantConv2d,
    QuantLinear,
    QuantWindowAttention,
    WeightQuantizer,
    calibrate,
    capture_attention,
    load_quantized,
    lsq_fake_quant,
    quantize_model,
    save_quantized,
)
from maskaq.quant.modules import attention_with_bias
from _models import small_vit

BAD_BITS = [0, 1, 9, 33, 4.5, True, "4", None, -3]


def _vit(seed=0, **kwargs):
    torch.manual_seed(seed)
    args = dict(img_size=32, pretrained=False)
    args.update(kwargs)
    return timm.create_model(args.pop("name", "vit_tiny_patch16_224"), **args).eval()


# -- quantizer maths -------------------------------------------------------------------------
def _composed_lsq(x, step, zero_point, qmin, qmax, g):
    """LSQ fake quant written with differentiable ops and the usual STE tricks (ground truth)."""
    def round_ste(t):
        return (t.round() - t).detach() + t

    def scale_grad(t):
        return (t - t * g).detach() + t * g

    step = scale_grad(step)  # the zero point's gradient is not scaled (docs/method.md#the-quantizer)
    z = round_ste(zero_point)
    return (round_ste(torch.clamp(x / step + z, qmin, qmax)) - z) * step


@pytest.mark.parametrize("fake_quant", [lsq_fake_quant, reference.fake_quantize], ids=["module", "reference"])
def test_lsq_fake_quant_forward_and_gradients_by_hand(fake_quant):
    # 3-bit signed range [-4, 3], step 0.25, zero point 0.6 (rounds to 1).
    x = torch.tensor([-1.0, -0.26, 0.0, 0.24, 0.5, 3.0, -2.0], requires_grad=True)
    step = torch.tensor(0.25, requires_grad=True)
    zero = torch.tensor(0.6, requires_grad=True)
    y = fake_quant(x, step, zero, -4, 3)
    # u = x/0.25 + 1 = [-3, -0.04, 1, 1.96, 3, 13, -7] -> clamp, round, -1, *0.25
    expected = torch.tensor([-1.0, -0.25, 0.0, 0.25, 0.5, 0.5, -1.25])
    torch.testing.assert_close(y, expected)
    y.sum().backward()
    # STE: gradient to x only where qmin <= u <= qmax (both ends inclusive).
    torch.testing.assert_close(x.grad, torch.tensor([1.0, 1, 1, 1, 1, 0, 0]))
    g = 1.0 / math.sqrt(7 * 3)  # the step's gradient scale, as the public code runs
    # d/dstep: round(u) - u inside (0, .04, 0, .04, 0), clamp bound - round(z) outside (3-1, -4-1).
    torch.testing.assert_close(step.grad, torch.tensor((0.04 + 0.04 + 2.0 - 5.0) * g), atol=1e-7, rtol=1e-5)
    # d/dz: 0 inside, -step outside (two elements), not scaled.
    torch.testing.assert_close(zero.grad, torch.tensor(-0.5))


@pytest.mark.parametrize("shape,step_shape", [((3, 5, 7), ()), ((6, 4, 3, 3), (6, 1, 1, 1))])
def test_lsq_fake_quant_matches_composed_autograd(shape, step_shape):
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(shape, generator=gen) * 2).requires_grad_()
    step = (torch.rand(step_shape, generator=gen) * 0.2 + 0.05).requires_grad_()
    zero = (torch.randn(step_shape, generator=gen) * 3).requires_grad_()
    grad_out = torch.randn(shape, generator=gen)
    outs = []
    for fn in (lsq_fake_quant, _composed_lsq):
        xs, ss, zs = (t.detach().clone().requires_grad_() for t in (x, step, zero))
        y = fn(xs, ss, zs, -8, 7, 0.37) if fn is lsq_fake_quant else fn(xs, ss, zs, -8, 7, 0.37)
        y.backward(grad_out)
        outs.append((y.detach(), xs.grad, ss.grad, zs.grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert outs[0][2].abs().sum() > 0 and outs[0][3].abs().sum() > 0


def test_act_quantizer_init_signed_and_unsigned():
    unsigned = LsqActQuantizer(4)
    unsigned.calibrating = True
    x = torch.tensor([0.5, 1.0, 1.5, 2.0])
    unsigned(x)
    alpha = 2 * 1.25 / math.sqrt(15)
    assert not unsigned.signed and (unsigned.qmin, unsigned.qmax) == (0, 15)
    assert unsigned.step.item() == pytest.approx(alpha, rel=1e-6)
    assert unsigned.zero_point.item() == pytest.approx(0.1 * (0.5 - alpha * 15), rel=1e-6)

    signed = LsqActQuantizer(4)
    signed.calibrating = True
    x = torch.tensor([-1.0, 0.5, 3.0, 0.0])  # min < 1e-5 -> signed [-8, 7]
    signed(x)
    alpha = 2 * 1.125 / math.sqrt(7)
    assert signed.signed and (signed.qmin, signed.qmax) == (-8, 7)
    assert signed.step.item() == pytest.approx(alpha, rel=1e-6)
    assert signed.zero_point.item() == pytest.approx(0.1 * (-1.0 - alpha * 7), rel=1e-6)
    assert signed.initialized

    # A later tensor does not re-initialize (LSQ keeps its init).
    signed(torch.full((4,), 100.0))
    assert signed.step.item() == pytest.approx(alpha, rel=1e-6)


def test_uncalibrated_quantizer_refuses_to_run():
    with pytest.raises(RuntimeError, match="calibrate"):
        LsqActQuantizer(8)(torch.randn(3))


def test_weight_quantizer_minmax_by_hand_and_ste():
    w = torch.tensor([[0.5, -1.0, 0.26], [2.0, 0.1, -0.7]], requires_grad=True)
    # All 2^3 levels [-4, 3], as the public code: steps 2·max|w|/7 = 2/7 and 4/7 per output channel.
    wq = WeightQuantizer(3, "minmax")
    assert (wq.qmin, wq.qmax) == (-4, 3)
    y = wq(w)
    # -1.0/(2/7) = -3.5 rounds (half to even) to -4, a level a ±3 grid lacks; 2.0/(4/7) = 3.5 -> 4 clamps to 3
    expected = torch.tensor([[4 / 7, -8 / 7, 2 / 7], [12 / 7, 0.0, -4 / 7]])
    torch.testing.assert_close(y, expected)
    grad = torch.randn(2, 3)
    y.backward(grad)
    torch.testing.assert_close(w.grad, grad)  # straight-through
    ints, steps = wq.integer_weight(w)
    assert ints.dtype == torch.int8 and ints.tolist() == [[2, -4, 1], [3, 0, -1]]
    torch.testing.assert_close(steps, torch.tensor([2 / 7, 4 / 7]))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_weight_quantizer_uses_all_levels(bits):
    """2^bits distinct integers on a weight that spans its range (the restricted ±(2^(b-1)-1)
    grid would give 2^bits - 1), and less error than that grid."""
    w = torch.linspace(-1, 1, 1001).reshape(1, -1)
    ints, step = WeightQuantizer(bits).integer_weight(w)
    assert len(ints.unique()) == 2 ** bits
    assert ints.min() == -(2 ** (bits - 1)) and ints.max() == 2 ** (bits - 1) - 1
    restricted = 2 ** (bits - 1) - 1
    w_restricted = torch.clamp(torch.round(w / (1 / restricted)), -restricted, restricted) / restricted
    assert (WeightQuantizer(bits)(w) - w).pow(2).sum() < (w_restricted - w).pow(2).sum()


def test_weight_quantizer_lsq_learns_per_channel_step():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(4, 6, generator=gen, requires_grad=True)
    wq = WeightQuantizer(4, "lsq", out_channels=4)
    y = wq(w)
    step = WeightQuantizer(4, "minmax").scale(w)  # min/max init, all 16 levels
    torch.testing.assert_close(y, torch.clamp(torch.round(w / step), -8, 7) * step)
    y.pow(2).sum().backward()
    assert wq.step.grad.shape == (4,) and wq.step.grad.abs().sum() > 0


@pytest.mark.parametrize("bits", BAD_BITS)
def test_bad_bits_raise_value_error(bits):
    with pytest.raises(ValueError, match="bits"):
        LsqActQuantizer(bits)
    with pytest.raises(ValueError, match="bits"):
        WeightQuantizer(bits)
    model = small_vit(depth=1)
    with pytest.raises(ValueError, match="wbits"):
        quantize_model(model, bits, 4)
    with pytest.raises(ValueError, match="abits"):
        quantize_model(model, 4, bits)


# -- attention paths agree -------------------------------------------------------------------
def test_fq_attention_path_matches_dedicated_path():
    """QuantAttention's fused op and the plain path Swin uses compute the same values and grads."""
    from maskaq import ops

    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, 10, 8, generator=gen) for _ in range(3))
    quantizers = [LsqActQuantizer(4) for _ in range(4)]
    for qz in quantizers:
        qz.calibrating = True
    attention_with_bias(q, k, v, 8 ** -0.5, quantizers=quantizers)  # initializes in order
    results = []
    for use_op in (True, False):
        qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
        for qz in quantizers:
            qz.zero_grad()
        if use_op:
            out, logits = ops.fq_attention(
                qs, ks, vs, step=torch.stack([qz.step for qz in quantizers]),
                zero_point=torch.stack([qz.zero_point for qz in quantizers]),
                qmin=[qz.qmin for qz in quantizers], qmax=[qz.qmax for qz in quantizers],
                scale=8 ** -0.5, return_logits=True)
        else:
            out, logits = attention_with_bias(qs, ks, vs, 8 ** -0.5, quantizers=quantizers)
        (out.pow(2).sum() + logits.sin().sum()).backward()
        grads = [t.grad for t in (qs, ks, vs)] + [qz.step.grad.clone() for qz in quantizers]
        results.append([out.detach(), logits.detach()] + grads)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


# -- conversion ------------------------------------------------------------------------------
CONVERT_CASES = [
    ("vit_tiny_patch16_224", dict(img_size=32), 1),
    ("deit_tiny_distilled_patch16_224", dict(img_size=32), 2),
    ("swin_tiny_patch4_window7_224", dict(img_size=32, window_size=2), 0),
]


@pytest.mark.parametrize("name,kwargs,prefix", CONVERT_CASES)
def test_convert_forward_backward_and_capture(name, kwargs, prefix):
    teacher = _vit(name=name, **kwargs)
    before = {n: t.clone() for n, t in teacher.state_dict().items()}
    qmodel = quantize_model(teacher, 4, 4)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    calibrate(qmodel, x)

    # Teacher untouched; every Linear/Conv/attention of the student replaced.
    assert all(torch.equal(before[n], t) for n, t in teacher.state_dict().items())
    assert not any(isinstance(m, (QuantLinear, QuantAttention)) for m in teacher.modules())
    assert not any(type(m) in (torch.nn.Linear, torch.nn.Conv2d) for m in qmodel.modules())
    attn_type = QuantWindowAttention if prefix == 0 else QuantAttention
    num_blocks = sum(isinstance(m, attn_type) for m in qmodel.modules())
    assert num_blocks == 12
    assert qmodel.patch_embed.proj.input_quantizer is None  # the image stays full precision

    qmodel.train()
    out = qmodel(x)
    out = out[0] if isinstance(out, tuple) else out
    out.logsumexp(-1).sum().backward()
    block = next(m for m in qmodel.modules() if isinstance(m, attn_type))
    assert block.qkv.weight.grad.abs().sum() > 0
    for qz in block.attn_quantizers:
        assert qz.step.grad is not None and torch.isfinite(qz.step.grad)
    assert sum(qz.step.grad.abs().item() for qz in block.attn_quantizers) > 0

    # Capture on teacher and student: one entry per block, (B, H, N, N) logits, (B, H, N, d) outputs.
    for model in (teacher, qmodel.eval()):
        xin = x.clone().requires_grad_()
        with capture_attention(model) as cap:
            model(xin)
        assert len(cap.logits) == len(cap.outputs) == num_blocks
        assert cap.num_prefix_tokens == prefix
        b0 = next(m for m in model.modules() if type(m).__name__.endswith("Attention"))
        first_logits, first_out = cap.logits[0], cap.outputs[0]
        n = first_logits.shape[-1]
        if prefix == 0:
            assert n == b0.window_area and first_logits.shape[0] == 2 * (32 // 4 // 2) ** 2
        else:
            assert n == (32 // 16) ** 2 + prefix and first_logits.shape[0] == 2
        assert first_logits.shape == (first_logits.shape[0], b0.num_heads, n, n)
        assert first_out.shape[:3] == first_logits.shape[:3]
        # Gradients reach the input through the captured logits alone.
        sum(a.pow(2).mean() for a in cap.logits).backward()
        assert xin.grad is not None and xin.grad.abs().sum() > 0


@pytest.mark.parametrize("name,kwargs", [(c[0], c[1]) for c in CONVERT_CASES])
def test_teacher_capture_path_matches_timm(name, kwargs):
    """The teacher's patched attention (fq_attention / bias path) reproduces timm's forward,
    including Swin's relative-position bias and shifted-window mask; forwards are restored."""
    teacher = _vit(name=name, **kwargs)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = teacher(x)
        with capture_attention(teacher, outputs=False) as cap:
            captured = teacher(x)
        assert cap.outputs is None and len(cap.logits) == 12
        after = teacher(x)
    torch.testing.assert_close(captured, reference, atol=1e-4, rtol=1e-4)
    assert all("forward" not in m.__dict__ for m in teacher.modules())
    torch.testing.assert_close(after, reference)


def test_capture_restores_on_exception_and_refuses_nesting():
    teacher = small_vit()
    qmodel = calibrate(quantize_model(teacher, 8, 8), torch.randn(2, 1, 28, 28))
    for model in (teacher, qmodel):
        with pytest.raises(KeyError, match="boom"):
            with capture_attention(model):
                raise KeyError("boom")
        assert all("forward" not in m.__dict__ for m in model.modules())
        assert all(getattr(m, "capture_recorder", None) is None for m in model.modules())
        with capture_attention(model):
            with pytest.raises(RuntimeError, match="already active"):
                with capture_attention(model):
                    pass
    with pytest.raises(ValueError, match="no timm Attention"):
        with capture_attention(torch.nn.Linear(3, 3)):
            pass


def test_register_tokens_and_qk_norm():
    teacher = _vit(name="vit_small_patch16_224", reg_tokens=4, qk_norm=True, depth=2)
    qmodel = calibrate(quantize_model(teacher, 6, 6), torch.randn(2, 3, 32, 32))
    with capture_attention(qmodel) as cap:
        qmodel(torch.randn(2, 3, 32, 32))
    assert cap.num_prefix_tokens == 5 and cap.logits[0].shape[-1] == 4 + 5
    assert isinstance(qmodel.blocks[0].attn.q_norm, torch.nn.LayerNorm)


def test_first_last_layer_policy():
    teacher = _vit(name="deit_tiny_distilled_patch16_224", depth=1)
    plain = quantize_model(teacher, 4, 4)
    assert plain.patch_embed.proj.wbits == 4 and plain.head.wbits == 4 and plain.head.abits == 4
    fl8 = quantize_model(teacher, 4, 4, first_last_8bit=True)
    assert isinstance(fl8.patch_embed.proj, QuantConv2d)
    assert fl8.patch_embed.proj.wbits == 8 and fl8.patch_embed.proj.input_quantizer is None
    for head in (fl8.head, fl8.head_dist):
        assert head.wbits == 8 and head.input_quantizer.bits == 8
    assert fl8.blocks[0].attn.qkv.wbits == 4 and fl8.blocks[0].attn.p_quantizer.bits == 4


def test_eight_bit_student_tracks_teacher_and_low_bits_degrade():
    """The output error follows the grids' step: each bit halves it, so two bits fewer make it about
    4 times larger (uniform rounding noise, step/√12 per quantizer, adds up over the layers); at 8 bits
    it is a small fraction of the output (it gives 0.5 % here; 2 % allows four times that)."""
    teacher = small_vit(depth=4)
    gen = torch.Generator().manual_seed(0)
    calib, test = torch.randn(32, 1, 28, 28, generator=gen), torch.randn(64, 1, 28, 28, generator=gen)
    with torch.no_grad():
        ref = teacher(test)
    errors = {}
    for bits in (8, 6, 4):
        qmodel = calibrate(quantize_model(teacher, bits, bits), calib)
        with torch.no_grad():
            out = qmodel(test)
        errors[bits] = ((out - ref).norm() / ref.norm()).item()
    assert errors[8] < 0.02, errors
    for bits in (6, 4):
        assert 2.5 < errors[bits] / errors[bits + 2] < 6.5, errors


def _bundled_teacher():
    zoo = pytest.importorskip("maskaq.zoo")
    if not (Path(zoo.__file__).parent / "vit_fmnist.safetensors").exists():
        pytest.skip("bundled teacher checkpoint maskaq/zoo/vit_fmnist.safetensors not present")
    return zoo.load("vit_fmnist")


def test_eight_bit_student_tracks_bundled_teacher():
    teacher = _bundled_teacher()
    from maskaq.data import fashion_mnist

    data = fashion_mnist("test")
    images = torch.stack([data[i][0] for i in range(0, 1024, 2)])
    calib, test = images[:64], images[64:]
    qmodel = calibrate(quantize_model(teacher, 8, 8), calib, init="minmax")
    with torch.no_grad():
        agree = (qmodel(test).argmax(-1) == teacher(test).argmax(-1)).float().mean().item()
    assert agree >= 0.97, agree


def test_minmax_init_spans_the_calibration_range():
    quantizer = LsqActQuantizer(8)
    quantizer.init_from(torch.tensor([-1.0, 0.0, 3.0]), method="minmax")
    assert quantizer.signed
    assert quantizer.step.item() == pytest.approx(4.0 / 255.0)
    assert quantizer.zero_point.item() == pytest.approx(-128.0 + 255.0 / 4.0)
    x = torch.tensor([-1.0, 3.0])
    assert torch.allclose(quantizer(x), x, atol=quantizer.step.item())
    with pytest.raises(ValueError, match="unknown activation init"):
        quantizer.init_from(x, method="percentile")


def _quantization_error(quantizer, x):
    with torch.no_grad():
        return (quantizer(x) - x).square().sum().item()


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_mse_init_clips_outliers_and_never_loses_to_minmax(bits):
    g = torch.Generator().manual_seed(3)
    bulk = torch.randn(4000, generator=g)
    with_outliers = torch.cat([bulk, torch.tensor([40.0, -25.0])])
    for x in (bulk, with_outliers):
        mse, minmax = LsqActQuantizer(bits), LsqActQuantizer(bits)
        mse.init_from(x, method="mse")
        minmax.init_from(x, method="minmax")
        assert mse.signed == minmax.signed
        assert mse.step.item() <= minmax.step.item() + 1e-9  # a clipped range, never a wider one
        assert _quantization_error(mse, x) <= _quantization_error(minmax, x) * (1 + 1e-6)
    # Two outliers at 40 and -25 would take most of the levels: the search clips them, and the bulk
    # is quantized far better.
    mse.init_from(with_outliers, method="mse")
    minmax.init_from(with_outliers, method="minmax")
    with torch.no_grad():
        bulk_errors = [(q(with_outliers)[:4000] - bulk).square().sum().item() for q in (mse, minmax)]
    if bits <= 4:
        assert bulk_errors[0] < 0.25 * bulk_errors[1]


def test_mse_init_searches_a_strided_sample_of_large_tensors(monkeypatch):
    from maskaq.quant import quantizers
    monkeypatch.setattr(quantizers, "MSE_SEARCH_ELEMENTS", 1000)
    x = torch.randn(50, 200, generator=torch.Generator().manual_seed(4)) * torch.linspace(0.1, 3, 200)
    sampled, full = LsqActQuantizer(4), LsqActQuantizer(4)
    sampled.init_from(x, method="mse")
    monkeypatch.setattr(quantizers, "MSE_SEARCH_ELEMENTS", 1 << 20)
    full.init_from(x, method="mse")
    assert sampled.step.item() == pytest.approx(full.step.item(), rel=0.1)


@pytest.mark.parametrize("init", ["mse", "mse_pminmax"])
def test_calibrate_with_mse_init(init):
    teacher = small_vit(depth=1)
    images = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(5))
    qmodel = calibrate(quantize_model(teacher, 4, 4), images, init=init)
    quantizer = qmodel.blocks[0].attn.qkv.input_quantizer
    assert quantizer.initialized and quantizer.init_method == "mse"
    p_inits = {m.init_method for n, m in qmodel.named_modules() if n.endswith("p_quantizer")}
    assert p_inits == ({"mse"} if init == "mse" else {"minmax"})
    assert torch.isfinite(qmodel(images)).all()


# -- calibration, save/load, bad input --------------------------------------------------------
def test_calibrate_accepts_loader_batches_and_rejects_bad_input():
    teacher = small_vit(depth=1)
    qmodel = quantize_model(teacher, 8, 8)
    images = torch.randn(4, 1, 28, 28)
    loader = [(images, torch.zeros(4)), (images * 5, torch.zeros(4))]
    calibrate(qmodel, loader)
    step = qmodel.blocks[0].attn.qkv.input_quantizer.step.item()
    calibrate(qmodel, images)  # re-calibration from the same first batch gives the same init
    assert qmodel.blocks[0].attn.qkv.input_quantizer.step.item() == pytest.approx(step)
    with pytest.raises(ValueError, match="empty"):
        calibrate(qmodel, [])
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        calibrate(qmodel, torch.randn(1, 28, 28))
    with pytest.raises(ValueError, match="float"):
        calibrate(qmodel, torch.zeros(2, 1, 28, 28, dtype=torch.uint8))
    with pytest.raises(ValueError, match="quantize_model"):
        calibrate(teacher, images)


def test_unsupported_models_name_the_module():
    with pytest.raises(ValueError, match="Sequential"):
        quantize_model(torch.nn.Sequential(torch.nn.Linear(2, 2)), 4, 4)
    with pytest.raises(ValueError, match="Eva"):
        quantize_model(timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=28, depth=1), 4, 4)
    with pytest.raises(ValueError, match="AttentionPoolLatent"):
        quantize_model(_vit(global_pool="map", depth=1), 4, 4)
    qmodel = quantize_model(small_vit(depth=1), 4, 4)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(qmodel, 4, 4)
    with pytest.raises(ValueError, match="weight_method"):
        quantize_model(small_vit(depth=1), 4, 4, weight_method="kmeans")


def test_save_load_round_trip_and_mismatch(tmp_path):
    teacher = small_vit(depth=2)
    images = torch.randn(4, 1, 28, 28)
    qmodel = calibrate(quantize_model(teacher, 4, 6, first_last_8bit=True, weight_method="lsq"), images)
    with torch.no_grad():  # make the learnable parameters differ from a fresh conversion
        qmodel.blocks[0].attn.p_quantizer.step.mul_(1.3)
        qmodel.blocks[1].mlp.fc1.weight_quantizer.step.mul_(0.9)
    save_quantized(qmodel, tmp_path / "w4a6")
    assert sorted(p.name for p in (tmp_path / "w4a6").iterdir()) == ["model.safetensors", "quant_config.json"]

    loaded = load_quantized(tmp_path / "w4a6", small_vit(depth=2, seed=5))
    assert loaded.maskaq_quant == qmodel.maskaq_quant
    for a, b in zip(qmodel.modules(), loaded.modules()):
        if isinstance(a, LsqActQuantizer):
            assert (a.signed, a.initialized, a.qmax) == (b.signed, b.initialized, b.qmax)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), qmodel(images))

    with pytest.raises(ValueError, match="does not match"):
        load_quantized(tmp_path / "w4a6", small_vit(depth=3))
    with pytest.raises(ValueError, match="shape"):
        load_quantized(tmp_path / "w4a6", small_vit(depth=2, num_classes=7))
    with pytest.raises(ValueError, match="config"):
        load_quantized(tmp_path / "w4a6", quantize_model(teacher, 8, 8))
    with pytest.raises(FileNotFoundError, match="save_quantized"):
        load_quantized(tmp_path / "nowhere", teacher)
    with pytest.raises(ValueError, match="not a maskaq quantized model"):
        save_quantized(teacher, tmp_path / "fp")


# -- cached fake-quant weights (a frozen student) ------------------------------------------------
def _count_weight_quantizations(model, monkeypatch):
    from maskaq.quant.quantizers import WeightQuantizer

    calls = []
    forward = WeightQuantizer.forward
    monkeypatch.setattr(WeightQuantizer, "forward", lambda self, w: calls.append(self) or forward(self, w))
    return calls


@pytest.mark.parametrize("weight_method", ["minmax", "lsq"])
def test_cached_weights_give_the_uncached_outputs_and_quantize_once(weight_method, monkeypatch):
    from maskaq.quant import cached_weights

    qmodel = quantize_model(small_vit(depth=2), 4, 4, weight_method=weight_method)
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    calibrate(qmodel, x)
    qmodel.requires_grad_(False)
    n_weights = sum(isinstance(m, (QuantLinear, QuantConv2d)) for m in qmodel.modules())
    plain = qmodel(x)
    calls = _count_weight_quantizations(qmodel, monkeypatch)
    with cached_weights(qmodel):
        first, second = qmodel(x), qmodel(x * 0.5)
    assert torch.equal(first, plain)
    assert len(calls) == n_weights  # once per layer, not per forward
    with torch.no_grad():
        assert torch.equal(second, qmodel(x * 0.5))
    calls.clear()
    qmodel(x)
    assert len(calls) == n_weights  # nothing stays cached after the block


def test_cached_weights_follow_changed_or_reloaded_weights():
    """A weight changed in place (an optimizer step), a reloaded state (resume) or a new step is
    quantized again inside the block; a weight that needs its gradient is never cached."""
    from maskaq.quant import cached_weights

    qmodel = quantize_model(small_vit(depth=1), 4, 4, weight_method="lsq")
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    calibrate(qmodel, x)
    state = {k: v.clone() for k, v in qmodel.state_dict().items()}
    qmodel.requires_grad_(False)
    fc = next(m for m in qmodel.modules() if isinstance(m, QuantLinear))
    with cached_weights(qmodel):
        before = qmodel(x)
        fc.weight.mul_(1.5)
        changed = qmodel(x)
        fc.weight_quantizer.step.mul_(0.5)
        new_step = qmodel(x)
        qmodel.load_state_dict(state)
        reloaded = qmodel(x)
    assert not torch.equal(changed, before) and not torch.equal(new_step, changed)
    assert torch.equal(reloaded, before)
    fc.weight.mul_(1.5)
    assert torch.equal(qmodel(x), changed)
    fc.weight.div_(1.5)
    qmodel.requires_grad_(True)
    with cached_weights(qmodel):
        qmodel(x).sum().backward()
    assert fc.weight.grad is not None and fc.weight_quantizer.step.grad is not None
