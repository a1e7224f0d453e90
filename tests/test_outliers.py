"""add_channel_outliers: a function-preserving transform that gives any timm ViT/DeiT/Swin a pretrained
ViT's post-LayerNorm channel outliers, and the realistic teacher the zoo builds with it."""
import pytest
import torch
from torch import nn

from maskaq import zoo
from maskaq.quant.reparam import layernorm_linear_pairs as outlier_pairs
from maskaq.zoo.outliers import MAX_SCALE_OVER_RATIO, activation_statistics, add_channel_outliers


def _randomize_norms(model, seed=0):
    """LayerNorm gains and biases that are not timm's (1, 0) init, so that the transform's bias term and
    its choice of scale per channel are exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(torch.empty_like(m.weight).uniform_(0.3, 1.5, generator=g)
                               * torch.where(torch.rand(m.weight.shape, generator=g) < 0.2, -1.0, 1.0))
                m.bias.normal_(0, 0.3, generator=g)
            elif isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.normal_(0, 0.1, generator=g)
    return model


def _models():
    import timm
    from timm.models.vision_transformer import VisionTransformer

    vit = dict(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=32, depth=2, num_heads=2)
    torch.manual_seed(0)
    return {  # name: (model, input size)
        "vit_token": (VisionTransformer(**vit), (1, 28, 28)),
        "vit_avg_fc_norm": (VisionTransformer(**vit, global_pool="avg", fc_norm=True), (1, 28, 28)),
        "deit_distilled": (timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=32,
                                             depth=2, num_classes=5), (3, 32, 32)),
        "swin": (timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=56, window_size=7,
                                   depths=(1, 1, 1, 1), embed_dim=24, num_heads=(1, 1, 2, 2), num_classes=5),
                 (3, 56, 56)),
    }


@pytest.mark.parametrize("name", ["vit_token", "vit_avg_fc_norm", "deit_distilled", "swin"])
def test_the_transform_keeps_the_function_and_widens_the_chosen_channels(name):
    model, size = _models()[name]
    model = _randomize_norms(model).double().eval()
    x = torch.randn(3, *size, dtype=torch.float64)
    ratio = 10.0
    out = add_channel_outliers(model, ratio=ratio, fraction=0.1, seed=1)
    assert out is not model
    # float64 all through: the function is kept up to rounding (|logits| are O(1), rounding ~1e-16)
    torch.testing.assert_close(out(x), model(x), rtol=0, atol=1e-10)
    pairs, pairs_before = outlier_pairs(out), outlier_pairs(model)
    assert len(pairs) >= 2 * len([m for m in model.modules() if hasattr(m, "norm2")])
    recorded = out.pretrained_cfg["channel_outliers"]
    for (_, norm, lins), (_, norm0, lins0) in zip(pairs, pairs_before):
        lin, lin0 = lins[-1], lins0[-1]  # DeiT distilled's final norm feeds two heads: the second one
        idx = torch.tensor(recorded["channels"][str(norm.weight.numel())])
        assert len(idx) == max(1, round(0.1 * norm.weight.numel()))
        others = torch.ones(norm.weight.numel(), dtype=torch.bool)
        others[idx] = False
        assert torch.equal(norm.weight[others], norm0.weight[others]) and torch.equal(lin.weight[:, others], lin0.weight[:, others])
        target = ratio * norm0.weight.abs().median()
        scale = norm.weight[idx] / norm0.weight[idx]
        assert bool((scale >= 1).all()) and bool((scale <= ratio * MAX_SCALE_OVER_RATIO).all())
        widened = norm0.weight[idx].abs() < target
        torch.testing.assert_close(norm.weight[idx][widened].abs(), target.expand(int(widened.sum())))
        torch.testing.assert_close(norm.bias[idx], norm0.bias[idx] * scale)
        torch.testing.assert_close(lin.weight[:, idx], lin0.weight[:, idx] / scale)


def test_outlier_channels_are_the_same_in_every_block_and_follow_the_seed():
    model = _models()["vit_token"][0]
    a = add_channel_outliers(model, seed=0, fraction=0.1).pretrained_cfg["channel_outliers"]["channels"]
    b = add_channel_outliers(model, seed=0, fraction=0.1).pretrained_cfg["channel_outliers"]["channels"]
    c = add_channel_outliers(model, seed=5, fraction=0.1).pretrained_cfg["channel_outliers"]["channels"]
    assert a == b and a != c
    widened = add_channel_outliers(model, ratio=20.0, seed=0, fraction=0.1)
    moved = [torch.nonzero(n.weight != n0.weight).flatten().tolist()
             for (_, n, _), (_, n0, _) in zip(outlier_pairs(widened), outlier_pairs(model))]
    assert all(set(m) <= set(a["32"]) for m in moved) and any(m for m in moved)


def test_activation_statistics_measure_the_widened_channels():
    model = _randomize_norms(_models()["vit_token"][0]).eval()
    x = torch.randn(16, 1, 28, 28)
    plain = activation_statistics(model, x)
    wide = activation_statistics(add_channel_outliers(model, ratio=16.0, fraction=0.1), x)
    assert plain["channel_range_ratio"] < 4 and wide["channel_range_ratio"] > 8
    assert wide["outlier_channels"] >= 1 > plain["outlier_channels"] - 1e-9
    # what a function-preserving transform of the norms cannot change: attention and the residual stream
    for key in ("p_below_1_over_n", "p_max", "p_top5pct_mass", "residual_absmax_over_median",
                "ln_input_channel_range_ratio"):
        assert wide[key] == pytest.approx(plain[key], rel=1e-4), key
    assert 0 < plain["p_max"] <= 1 and 0 < plain["p_below_1_over_n"] < 1


def test_bad_arguments_are_refused():
    model = _models()["vit_token"][0]
    with pytest.raises(ValueError, match="ratio must be a finite number >= 1, got 0.5"):
        add_channel_outliers(model, ratio=0.5)
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\], got 0"):
        add_channel_outliers(model, fraction=0)
    with pytest.raises(ValueError, match="Sequential has no LayerNorm feeding a Linear"):
        add_channel_outliers(nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 2)))


@pytest.mark.skipif("vit_fmnist" not in zoo.available(), reason="bundled teacher missing")
def test_the_realistic_teacher_computes_the_bundled_function_with_published_outliers():
    from maskaq.data import fashion_mnist
    from maskaq.evaluation import evaluate_model

    assert "vit_fmnist_outliers" in zoo.available()
    plain, outliers = zoo.load("vit_fmnist"), zoo.load("vit_fmnist_outliers")
    assert outliers.pretrained_cfg["architecture"] == "vit_fmnist_outliers"
    assert outliers.pretrained_cfg["channel_outliers"]["ratio"] == 8.0
    test = fashion_mnist("test")
    top1 = [evaluate_model(m, test, progress=False)["top1"] for m in (plain, outliers)]
    assert abs(top1[0] - top1[1]) <= 0.05, top1
    x = test.images[:64]
    stats = activation_statistics(outliers, x)
    # zoo/vit_fmnist_outliers.json documents a widest-to-median post-LayerNorm channel range near 8
    assert 6 <= stats["channel_range_ratio"] <= 10 and stats["outlier_channels"] >= 2
    assert activation_statistics(plain, x)["channel_range_ratio"] < 3


# ------------------------------------------------------------------ the inverse: equalize_layernorm_channels
@pytest.mark.parametrize("name", ["vit_token", "deit_distilled", "swin"])
def test_equalizing_the_channels_keeps_the_function_and_narrows_the_outliers(name):
    from maskaq.quant.reparam import equalize_layernorm_channels
    model, size = _models()[name]
    wide = add_channel_outliers(_randomize_norms(model).double().eval(), ratio=16.0, fraction=0.1)
    x = torch.randn(4, *size, dtype=torch.float64)
    eq = equalize_layernorm_channels(wide, x, max_ratio=2.0)
    torch.testing.assert_close(eq(x), wide(x), rtol=0, atol=1e-10)
    assert eq.maskaq_equalized["channels"] > 0
    # on the images it measured, no channel is left wider than max_ratio times its LayerNorm's median
    seen = {}
    hooks = [lins[0].register_forward_pre_hook(lambda m, a, n=n: seen.__setitem__(n, a[0].reshape(-1, a[0].shape[-1])))
             for n, _, lins in outlier_pairs(eq)]
    eq(x)
    for h in hooks:
        h.remove()
    for n, act in seen.items():
        width = act.amax(0) - act.amin(0)
        assert width.max() <= 2.0 * width.median() * (1 + 1e-9), n


def test_equalizing_refuses_a_ratio_below_one():
    from maskaq.quant.reparam import equalize_layernorm_channels
    with pytest.raises(ValueError, match="max_ratio must be >= 1, got 0.5"):
        equalize_layernorm_channels(_models()["vit_token"][0], torch.randn(1, 1, 28, 28), max_ratio=0.5)


def test_an_equalized_student_saves_and_reloads_on_the_original_teacher(tmp_path):
    """maskaq+'s student is built on the equalized copy of the teacher; a user reloads it on the
    teacher they have: the saved state carries the folded LayerNorm and Linear weights."""
    from maskaq import pipeline
    from maskaq.quant import load_quantized, save_quantized

    teacher = add_channel_outliers(_randomize_norms(_models()["vit_token"][0]).eval(), ratio=16.0, fraction=0.1)
    teacher.pretrained_cfg.update(mean=(0.2860,), std=(0.3530,), input_size=(1, 28, 28), num_classes=10)
    qmodel = pipeline.quantize(teacher, 4, 4, method="maskaq+", preset="quick", seed=0, progress=False)
    assert qmodel.maskaq_report["config"]["pipeline"]["equalize_ln_ratio"] == 2.0
    norms = dict(teacher.named_modules())
    narrowed = [n for n, m in qmodel.named_modules()
                if isinstance(m, nn.LayerNorm) and not torch.equal(m.weight, norms[n].weight)]
    assert narrowed  # the student's LayerNorms are not the teacher's
    save_quantized(qmodel, tmp_path / "student")
    reloaded = load_quantized(tmp_path / "student", teacher)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(x), qmodel.eval()(x))


def test_equalizing_leaves_layernorms_of_mostly_constant_channels_alone():
    """A LayerNorm whose gain is zero on most channels has a zero median width: no channel can be
    compared with it, and dividing by it would put inf into the weights."""
    from maskaq.quant.reparam import equalize_layernorm_channels
    model = _randomize_norms(_models()["vit_token"][0]).eval()
    with torch.no_grad():
        model.blocks[0].norm1.weight[:20] = 0
        model.blocks[0].norm1.bias[:20] = 0
    x = torch.randn(4, 1, 28, 28)
    eq = equalize_layernorm_channels(model, x)
    assert torch.equal(eq.blocks[0].norm1.weight, model.blocks[0].norm1.weight)
    assert all(bool(torch.isfinite(p).all()) for p in eq.parameters())
    torch.testing.assert_close(eq(x), model(x), rtol=1e-4, atol=1e-4)
