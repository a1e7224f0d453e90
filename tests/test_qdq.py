"""ONNX QDQ export (maskaq.export_onnx, `maskaq export`): graph structure, ONNX Runtime against the
fake-quant student, dynamic and fixed batch, and refusals."""
import pytest
import torch

from _models import small_vit

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def _student(wbits, abits, seed=0, model=None):
    from maskaq.quant import calibrate, quantize_model

    model = model if model is not None else small_vit(seed)
    qmodel = quantize_model(model, wbits, abits).eval()
    shape = (8, *model.patch_embed.proj.weight.shape[1:2], *model.patch_embed.img_size)
    with torch.no_grad():
        calibrate(qmodel, torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1)))
    return qmodel


def _run(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"x": x.numpy()})[0])


def _qdq_count(model, kind):
    return sum(node.op_type == kind for node in model.graph.node)


def _weight_zero_points(graph) -> list:
    """The zero points of the weights' QuantizeLinear nodes (on the stored on-grid weights), as numpy arrays."""
    from onnx import numpy_helper

    constants = {t.name: numpy_helper.to_array(t) for t in graph.graph.initializer}
    aliases = {node.output[0]: node.input[0] for node in graph.graph.node if node.op_type == "Identity"}

    def constant(name):  # the exporter shares equal constants through Identity nodes
        while name not in constants:
            name = aliases[name]
        return constants[name]

    return [constant(node.input[2]) for node in graph.graph.node
            if node.op_type == "QuantizeLinear" and node.input[0].endswith("weight_quantizer.weight")]


@pytest.mark.parametrize("wbits,abits,weights", [(8, 8, "int8"), (4, 8, "int8"), (4, 4, "int8"), (3, 3, "int8"),
                                                 (8, 8, "uint8"), (4, 4, "uint8")])
def test_onnx_qdq_matches_fake_quant(tmp_path, wbits, abits, weights):
    """ORT on the QDQ graph gives the fake-quant student's logits (up to x/α ties), sub-8-bit
    grids included; a Q/DQ pair on every quantized input, weight and attention operand; weights
    stored as int8 (zero point 0) or uint8 (zero point 128)."""
    import numpy as np

    import maskaq
    from maskaq.quant.modules import QuantConv2d, QuantLinear, _AttentionQuantizers

    from maskaq.integer.cpu_gemm import cpu_int8_pairs_saturate

    if wbits == 8 and abits == 8 and weights == "int8" and cpu_int8_pairs_saturate("onednn"):
        # Without VNNI, ONNX Runtime's U8S8 kernels clip adjacent pair sums to int16 (its documented
        # caveat, as oneDNN's and fbgemm's do): 8-bit weights against 8-bit activations are not
        # exact there. W4A8 and narrower never overflow a pair and are checked on every CPU, and so
        # are uint8 weights, which ONNX Runtime multiplies in its U8U8 kernels (int32 pair sums).
        pytest.skip("ONNX Runtime's int8 GEMMs saturate pair sums on this CPU (no VNNI)")
    qmodel = _student(wbits, abits)
    path = maskaq.export_onnx(qmodel, tmp_path / "student.onnx", weights=weights)
    graph = onnx.load(str(path))
    zero_points = _weight_zero_points(graph)
    assert zero_points and all(z.dtype == np.dtype(weights) and (z == (128 if weights == "uint8" else 0)).all()
                               for z in zero_points)
    linears = [m for m in qmodel.modules() if isinstance(m, (QuantLinear, QuantConv2d))]
    expected = (len(linears) + sum(m.input_quantizer is not None for m in linears)
                + 4 * sum(isinstance(m, _AttentionQuantizers) for m in qmodel.modules()))
    assert _qdq_count(graph, "QuantizeLinear") == expected == _qdq_count(graph, "DequantizeLinear")
    if abits < 8:
        assert _qdq_count(graph, "Clip") >= 1  # the grid's range in front of the uint8 pair
    x = torch.randn(37, 1, 28, 28, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        fake = qmodel(x)
    got = _run(path, x)
    scale = fake.abs().max().item()
    # ONNX Runtime computes the same integer products, so a sample's logits differ only by the float
    # rounding of the dequantize steps (a few ulps of the largest logit; 1e-5 leaves 10x) unless a
    # value x/α that lies within that rounding of a .5 tie rounds to the other level upstream. Such
    # ties are rare (at most 1 of these 37 samples in any case here); one flipped level moves that
    # sample's logits by about a step of the layers after it (at most 3.4 % of the largest logit here).
    row_error = (got - fake).abs().amax(1)
    flipped = row_error > 1e-5 * scale
    assert int(flipped.sum()) <= 3, f"{int(flipped.sum())} of 37 samples differ beyond float rounding"
    assert row_error.max() < 0.1 * scale


def test_onnx_batch_axis_dynamic_or_fixed(tmp_path):
    import maskaq

    qmodel = _student(8, 8, seed=2)
    dynamic = maskaq.export_onnx(qmodel, tmp_path / "dynamic.onnx")
    fixed = maskaq.export_onnx(qmodel, tmp_path / "fixed.onnx", batch_size=3)
    for n in (1, 5):
        assert _run(dynamic, torch.randn(n, 1, 28, 28)).shape == (n, 10)
    dims = onnx.load(str(fixed)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [3, 1, 28, 28]
    # ONNX Runtime's own check of the fixed batch axis (it raises its own exception type)
    with pytest.raises(Exception, match=r"Got invalid dimensions for input: x for the following indices\s+index: 0 Got: 2"):
        _run(fixed, torch.randn(2, 1, 28, 28))
    with pytest.raises(ValueError, match="batch_size"):
        maskaq.export_onnx(qmodel, tmp_path / "bad.onnx", batch_size=0)


def test_uint8_zero_point_fits_grid_and_zero_point():
    from maskaq.integer.qdq import uint8_zero_point

    assert uint8_zero_point(-128, 127, 0) == 128 and uint8_zero_point(0, 255, 7) == 7
    assert uint8_zero_point(-8, 7, -11) == 0  # z below the 4-bit grid: s = q + 11 in [3, 18]
    assert uint8_zero_point(0, 15, 20) == 20  # z above the grid: s = q in [0, 15], zero point 20
    assert uint8_zero_point(0, 15, 300) is None  # every level would be stored below 0
    assert uint8_zero_point(0, 255, -2) is None and uint8_zero_point(-128, 127, 130) is None


def test_onnx_zero_point_outside_the_grid(tmp_path):
    """A min–max grid that does not contain 0 (all inputs positive) has z < qmin: a 4-bit grid sits
    at a uint8 offset with the zero point at 0; an 8-bit one is shifted (and still exact in ORT)."""
    import maskaq

    qmodel = _student(8, 4, seed=3)
    quantizer = qmodel.blocks[0].mlp.fc2.input_quantizer
    with torch.no_grad():
        quantizer.zero_point.fill_(float(quantizer.qmin - 3))
    path = maskaq.export_onnx(qmodel, tmp_path / "offset.onnx")
    x = torch.randn(9, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fake = qmodel(x)
    assert (_run(path, x) - fake).abs().max() < 1e-3 * fake.abs().max()
    # 8 bits: no uint8 zero point holds it; the grid's lowest level goes into fc2's bias
    # (4-bit weights: no pair of products can overflow int16 on any CPU)
    wide = _student(4, 8, seed=3)
    with torch.no_grad():
        wide.blocks[0].mlp.fc2.input_quantizer.zero_point.fill_(-140.0)
        fake = wide(x)
    path = maskaq.export_onnx(wide, tmp_path / "wide.onnx")
    assert (_run(path, x) - fake).abs().max() < 1e-3 * fake.abs().max()


def test_onnx_export_refuses_what_it_cannot_express(tmp_path):
    import maskaq
    from maskaq.quant import quantize_model

    with pytest.raises(TypeError, match="fake-quant student"):
        maskaq.export_onnx(small_vit(0), tmp_path / "fp.onnx")
    with pytest.raises(ValueError, match="not calibrated"):
        maskaq.export_onnx(quantize_model(small_vit(0), 4, 4), tmp_path / "raw.onnx")
    from maskaq.quant import calibrate
    broken = calibrate(quantize_model(small_vit(0), 4, 4), torch.randn(4, 1, 28, 28))
    with torch.no_grad():
        broken.blocks[0].attn.qkv.input_quantizer.step.fill_(0.0)
    for export in (lambda m: maskaq.export_onnx(m, tmp_path / "broken.onnx"), maskaq.export_integer):
        with pytest.raises(ValueError, match="unusable step"):  # one check for both exporters
            export(broken)
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_onnx_uint8_weights_give_the_int8_graph_logits(tmp_path):
    """The uint8 weights hold the int8 weights' integers shifted by 128: where neither clips (W4A8),
    ONNX Runtime returns the same logits for both up to float rounding."""
    import maskaq

    qmodel = _student(4, 8, seed=3)
    x = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    signed = _run(maskaq.export_onnx(qmodel, tmp_path / "s8.onnx"), x)
    unsigned = _run(maskaq.export_onnx(qmodel, tmp_path / "u8.onnx", weights="uint8"), x)
    torch.testing.assert_close(unsigned, signed, rtol=1e-5, atol=1e-5 * signed.abs().max().item())
    with pytest.raises(ValueError, match="weights must be one of int8, uint8"):
        maskaq.export_onnx(qmodel, tmp_path / "x.onnx", weights="int4")


def test_cli_export_notes_the_layers_int8_weights_clip_without_vnni(tmp_path, capsys):
    from maskaq.cli import main
    from maskaq.integer.qdq import pair_sum_overflow_layers
    from maskaq.quant import save_quantized
    from maskaq import zoo

    teacher = zoo.load("vit_fmnist")
    qmodel = _student(8, 8, model=teacher)
    layers = pair_sum_overflow_layers(qmodel)
    assert layers and "head" in layers and pair_sum_overflow_layers(_student(4, 8, model=teacher)) == []
    save_quantized(qmodel, tmp_path / "model")
    argv = ["export", "--model", "vit_fmnist", "--student", str(tmp_path / "model"), "--out", str(tmp_path / "s.onnx")]
    assert main(argv) == 0
    assert f"note: {len(layers)} layers have 8-bit weights and 8-bit inputs" in capsys.readouterr().err
    assert main(argv + ["--onnx-weights", "uint8"]) == 0
    assert "note:" not in capsys.readouterr().err


def test_cli_export_integer_notes_the_int16_layers_of_a_saturating_cpu(tmp_path, capsys, monkeypatch):
    """`maskaq export --format integer` says when W8A8 layers run on maskaq's int16 GEMM (a CPU without
    VNNI), and not for W8A7, whose pairs never overflow."""
    from maskaq.cli import main
    from maskaq.integer import linear
    from maskaq.quant import save_quantized
    from maskaq import zoo

    if not linear.int16_gemm_available():
        pytest.skip("maskaq's int16 GEMM needs the extension and an AVX2 CPU")
    monkeypatch.setattr(linear, "cpu_int8_pairs_saturate", lambda kernel: True)  # any CPU acts as an AVX2-only one
    teacher = zoo.load("vit_fmnist")
    for abits, noted in ((8, True), (7, False)):
        save_quantized(_student(8, abits, model=teacher), tmp_path / f"a{abits}")
        assert main(["export", "--model", "vit_fmnist", "--student", str(tmp_path / f"a{abits}"), "--format", "integer",
                     "--out", str(tmp_path / f"int{abits}")]) == 0
        err = capsys.readouterr().err
        assert ("run on maskaq's exact int16 GEMM" in err) == noted, err


def test_cli_export_onnx_and_integer(tmp_path):
    from maskaq.cli import main
    from maskaq.quant import save_quantized
    from maskaq import zoo

    teacher = zoo.load("vit_fmnist")
    qmodel = _student(4, 8, model=teacher)
    save_quantized(qmodel, tmp_path / "model")
    out = tmp_path / "student.onnx"
    assert main(["export", "--model", "vit_fmnist", "--student", str(tmp_path / "model"), "--out", str(out)]) == 0
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        fake = qmodel(x)
    assert (_run(out, x).argmax(1) == fake.argmax(1)).all()
    assert main(["export", "--model", "vit_fmnist", "--student", str(tmp_path / "model"), "--onnx-weights", "uint8",
                 "--out", str(out)]) == 0
    assert (_run(out, x).argmax(1) == fake.argmax(1)).all()
    assert _weight_zero_points(onnx.load(str(out)))[0].dtype.name == "uint8"
    assert main(["export", "--model", "vit_fmnist", "--student", str(tmp_path / "model"), "--format", "integer",
                 "--out", str(tmp_path / "int")]) == 0
    assert main(["export", "--model", "vit_fmnist", "--student", str(tmp_path / "none"), "--out", str(out)]) == 2


@pytest.mark.parametrize("impl", ["ort_qdq", "ort_qdq_u8"])
def test_bench_ort_qdq_impls_run_their_weight_storage(tmp_path, impl):
    """`maskaq bench` runs the W8A8 QDQ graph with int8 (ort_qdq) or uint8 (ort_qdq_u8) weights."""
    import argparse

    from maskaq.commands import bench

    args = argparse.Namespace(seed=0, threads=1, kernel="onednn")
    built = bench.build_impl(impl, small_vit(), "cpu", args, workdir=str(tmp_path))
    out = built.fn(torch.randn(2, 1, 28, 28))
    assert out.shape == (2, 10) and torch.isfinite(torch.from_numpy(out)).all()
    expected = "uint8" if impl == "ort_qdq_u8" else "int8"
    (path,) = tmp_path.glob("*.onnx")
    assert expected in path.name and _weight_zero_points(onnx.load(str(path)))[0].dtype.name == expected
