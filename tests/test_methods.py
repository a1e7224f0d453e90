"""The method registry (maskaq.methods): one record per method, read by the pipeline and the CLI."""
import pytest
import torch

from maskaq import methods
from maskaq.pipeline import build_config, config_keys

from _benchmarks import load_benchmark


def test_every_method_builds_with_its_settings():
    keys = config_keys()
    for name, record in methods.METHODS.items():
        assert set(record.settings) <= set(keys), name
        cfg = build_config(name, "quick")
        sections = {k: getattr(getattr(cfg, keys[k]), k) for k in record.settings}
        assert sections == dict(record.settings), name


def test_student_in_the_loop_only_where_the_alignment_needs_it():
    in_loop = {n for n, m in methods.METHODS.items() if m.student_in_loop(build_config(n, "quick").synthesis)}
    assert in_loop == {"maskaq", "maskaq+", "maskaq-no-entropy", "maskaq-no-refresh", "maskaq-no-hdmask"}
    assert not methods.get("maskaq").student_in_loop(build_config("maskaq", "quick", align_weight=0.0).synthesis)


def test_lookup_suggests_and_filters():
    assert methods.get("mimiq").images == "synthesis" and methods.get("psaq").images == "psaq"
    with pytest.raises(ValueError, match="did you mean 'maskaq'"):
        methods.get("maskq")
    assert "real" in methods.names() and "ptq" in methods.names()
    assert not {"real", "ptq"} & set(methods.names(synthesizes=True))
    with pytest.raises(ValueError, match="unknown method 'real'"):
        methods.get("real", synthesizes=True)
    assert methods.did_you_mean("zzz", ["maskaq"]) == ""


def test_accuracy_table_pairs_differences_by_seed():
    """accuracy_dfq's 'minus ptq' table subtracts ptq's top-1 of the same seed (runs listed in any
    order, seeds ptq lacks left out), so a shift shared by every method of a seed cancels."""
    bench = load_benchmark("accuracy_dfq")
    runs = [{"method": "ptq", "bits": "W3A3", "seed": s, "top1": t} for s, t in ((0, 80.0), (1, 78.0), (2, 82.0))]
    runs += [{"method": "maskaq", "bits": "W3A3", "seed": s, "top1": t}
             for s, t in ((2, 82.5), (0, 80.4), (1, 78.3), (7, 10.0))]
    agg = bench.aggregate(runs, ["ptq", "maskaq"], ["W3A3"], fp=88.0)
    mean, se, n = bench.paired_differences(agg)["W3A3"]["maskaq"]
    diffs = [0.4, 0.3, 0.5]
    sd = (sum((d - 0.4) ** 2 for d in diffs) / 2) ** 0.5
    assert n == 3 and mean == pytest.approx(0.4) and se == pytest.approx(sd / 3 ** 0.5)
    assert "ptq" not in bench.paired_differences(agg)["W3A3"]
    # the unpaired std is large (seed spread), the paired error small
    assert agg["table"]["W3A3"]["maskaq"]["std"] > 10 * se
    assert "+0.40 ± 0.06 (3)" in bench.markdown(agg, ["ptq", "maskaq"], ["W3A3"], {"preset": "cpu", "overrides": {}})


def test_accuracy_table_keeps_the_methods_and_bit_widths_already_run():
    """A run of one new column (or method) republishes the table with every checkpointed run in it,
    in registry order, not just the methods and bit widths that run asked for."""
    bench = load_benchmark("accuracy_dfq")
    runs = [{"method": "psaq", "bits": "W3A3", "seed": 0, "top1": 79.0},
            {"method": "ptq", "bits": "W3A3", "seed": 0, "top1": 78.0}]
    rows, columns = bench.table_axes(runs, ["maskaq"], ["W4A4"])
    assert columns == ["W4A4", "W3A3"]
    assert set(rows) == {"ptq", "maskaq", "psaq"} and rows == [m for m in bench.ALL_METHODS if m in rows]


def test_sensitivity_puts_exactly_one_group_at_8_bits():
    """sensitivity_ptq names each quantizer's group, and its student has that group (and only it)
    at 8 bits after calibration, the rest at the low bit width."""
    from maskaq.quant import LsqActQuantizer, WeightQuantizer
    from maskaq.spec import describe_model
    from maskaq.synthesis.baselines import gaussian_images
    from _models import small_vit
    bench = load_benchmark("sensitivity_ptq")
    assert bench.quantizer_group("blocks.2.attn.p_quantizer") == "attention P (softmax)"
    assert bench.quantizer_group("blocks.0.attn.qkv.input_quantizer") == "input of qkv"
    assert bench.quantizer_group("patch_embed.proj.weight_quantizer") == "weights of patch_embed"
    assert bench.quantizer_group("head.weight_quantizer") == "weights of head"
    teacher = small_vit()
    calib = gaussian_images(describe_model(teacher), 4, 0).images
    for group in ("attention P (softmax)", "weights of fc1"):
        student = bench.ptq_student(teacher, 3, 3, calib, group)
        quantizers = [(n, m) for n, m in student.named_modules() if isinstance(m, (LsqActQuantizer, WeightQuantizer))]
        high = {n for n, m in quantizers if m.bits == 8}
        assert high and high == {n for n, _ in quantizers if bench.quantizer_group(n) == group}
        assert all(m.bits == 3 for n, m in quantizers if n not in high)
        p = [m for n, m in quantizers if n.endswith("p_quantizer")][0]
        assert p.qmax - p.qmin == (255 if group.startswith("attention P") else 7)


def test_accuracy_table_says_which_cpus_its_runs_came_from():
    """Low-bit top-1 moves with the CPU's float rounding, so the table names the CPUs of its runs
    and warns when they are more than one."""
    bench = load_benchmark("accuracy_dfq")
    assert "ATen" in bench.cpu_description()
    one = [{"method": "ptq", "bits": "W4A4", "seed": s, "top1": 86.0, "cpu": "X, ATen AVX2"} for s in range(2)]
    assert bench.cpus_line(one) == "CPU: X, ATen AVX2: 2 runs."
    mixed = one + [{"method": "ptq", "bits": "W4A4", "seed": 2, "top1": 86.3}]
    assert "Runs from 2 CPUs" in bench.cpus_line(mixed) and "not recorded: 1 runs" in bench.cpus_line(mixed)
    agg = bench.aggregate(mixed, ["ptq"], ["W4A4"], fp=88.0)
    assert "Runs from 2 CPUs" in bench.markdown(agg, ["ptq"], ["W4A4"], {"preset": "cpu", "overrides": {}})


def test_sensitivity_p_grids_span_what_they_say():
    """--p-grids: "fixed c" puts all of P's levels on [0, c]; "mse" re-calibrates P alone."""
    from maskaq.spec import describe_model
    from maskaq.synthesis.baselines import gaussian_images
    from _models import small_vit
    bench = load_benchmark("sensitivity_ptq")
    teacher = small_vit()
    calib = gaussian_images(describe_model(teacher), 4, 0).images
    student = bench.with_p_grid(bench.ptq_student(teacher, 4, 4, calib), calib, "fixed 0.5")
    p = [m for n, m in student.named_modules() if n.endswith("p_quantizer")][0]
    levels = torch.arange(p.qmin, p.qmax + 1, dtype=torch.float32)
    grid = (levels - p.zero_point.detach().round()) * p.step.detach()
    assert grid.min().item() == pytest.approx(0.0, abs=1e-7) and grid.max().item() == pytest.approx(0.5)
    before = bench.ptq_student(teacher, 4, 4, calib)
    after = bench.with_p_grid(bench.ptq_student(teacher, 4, 4, calib), calib, "mse")
    steps = lambda m: {n: q.step.item() for n, q in m.named_modules() if hasattr(q, "zero_point")}  # noqa: E731
    b, a = steps(before), steps(after)
    assert any(a[n] != b[n] for n in a if n.endswith("p_quantizer"))
    assert all(a[n] == b[n] for n in a if not n.endswith("p_quantizer"))
