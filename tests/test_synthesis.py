"""Synthesis: losses (hand-checked and against plain formulations), augmentations, the
synthesizer (loss goes down, seeds repeat, NaN recovery) and the baselines."""
import math
import warnings

import pytest
import torch

from maskaq.synthesis import losses as L
from maskaq.distill.augment import QATAugment
from maskaq.synthesis.augment import SynthesisAugment, patch_scaled_pixels, scaled_pixels
from maskaq.synthesis.baselines import PsaqConfig, PsaqSynthesizer, gaussian_images, real_images
from maskaq.spec import describe_model
from maskaq.synthesis.synthesizer import SynthesisConfig, Synthesizer


def tiny_vit(seed=0, **overrides):
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(seed)
    args = dict(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=24, depth=2, num_heads=3,
                mlp_ratio=2.0)
    args.update(overrides)
    model = VisionTransformer(**args)
    model.pretrained_cfg = dict(mean=(0.2860,), std=(0.3530,), input_size=(1, 28, 28), num_classes=10)
    return model.eval()


def tiny_student(teacher, bits=4, seed=0):
    from maskaq.quant import calibrate, quantize_model
    student = quantize_model(teacher, bits, bits)
    g = torch.Generator().manual_seed(seed)
    calibrate(student, torch.randn(8, 1, 28, 28, generator=g))
    return student


# ------------------------------------------------------------------------------------- L_tv
def test_total_variation_hand_checked():
    x = torch.tensor([[0.0, 1.0], [2.0, 3.0]]).view(1, 1, 2, 2)
    # Δw: (-1, -1) -> √2; Δh: (-2, -2) -> √8; diagonal 0-3 -> 3; anti-diagonal 2-1 -> 1.
    expected = math.sqrt(2) + math.sqrt(8) + (3 + 1) / math.sqrt(2)
    assert L.total_variation(x).item() == pytest.approx(expected, rel=1e-6)


def test_total_variation_matches_loop():
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    sums = [0.0, 0.0, 0.0, 0.0]
    for b in range(2):
        for c in range(3):
            for i in range(5):
                for j in range(6):
                    if j + 1 < 6:
                        sums[0] += (x[b, c, i, j] - x[b, c, i, j + 1]) ** 2
                    if i + 1 < 5:
                        sums[1] += (x[b, c, i, j] - x[b, c, i + 1, j]) ** 2
                    if i + 1 < 5 and j + 1 < 6:
                        sums[2] += (x[b, c, i, j] - x[b, c, i + 1, j + 1]) ** 2
                        sums[3] += (x[b, c, i + 1, j] - x[b, c, i, j + 1]) ** 2
    expected = math.sqrt(sums[0]) + math.sqrt(sums[1]) + (math.sqrt(sums[2]) + math.sqrt(sums[3])) / math.sqrt(2)
    assert L.total_variation(x).item() == pytest.approx(float(expected), rel=1e-10)


# ----------------------------------------------------------------------------------- L_ssim
def test_inter_head_ssim_hand_checked():
    # One query patch (plus CLS), two heads whose key maps are [0, 1] and [1, 0]: means 0.5,
    # variances 0.25, covariance −0.25, so SSIM = (−0.5 + C2)/(0.5 + C2) across heads, 1 with itself.
    logits = torch.zeros(1, 2, 3, 3)
    logits[0, 0, 1, 1:] = torch.tensor([0.0, 1.0])
    logits[0, 1, 1, 1:] = torch.tensor([1.0, 0.0])
    logits[0, 0, 2, 1:] = torch.tensor([0.0, 1.0])
    logits[0, 1, 2, 1:] = torch.tensor([0.0, 1.0])  # second query: identical heads -> loss 0
    block = L.inter_head_ssim_block(logits, num_prefix_tokens=1)
    s = (-0.5 + L.SSIM_C2) / (0.5 + L.SSIM_C2)
    assert block[0, 0].diagonal().abs().max().item() < 1e-6
    assert block[0, 0, 0, 1].item() == pytest.approx(1 - s * s, abs=1e-5)
    assert block[0, 1].abs().max().item() < 1e-5
    assert L.inter_head_ssim_loss([logits], 1).item() == pytest.approx(2 * (1 - s * s) / 8, abs=1e-5)


def _ssim_loop(blocks, p):
    """Plain per-query, per-head-pair formulation (like MimiQ's public code)."""
    total = []
    for a in blocks:
        B, H, N, _ = a.shape
        vals = []
        for b in range(B):
            for n in range(p, N):
                maps = a[b, :, n, p:]
                maps = maps - maps.min(dim=-1, keepdim=True).values
                maps = maps / (maps.max(dim=-1, keepdim=True).values + 1e-8)
                for i in range(H):
                    for j in range(H):
                        x, y = maps[i], maps[j]
                        mx, my = x.mean(), y.mean()
                        vx, vy = (x * x).mean() - mx * mx, (y * y).mean() - my * my
                        cxy = (x * y).mean() - mx * my
                        s = ((2 * mx * my + L.SSIM_C1) * (2 * cxy + L.SSIM_C2)) / (
                            (mx * mx + my * my + L.SSIM_C1) * (vx + vy + L.SSIM_C2))
                        vals.append(1 - s * s)
        total.append(torch.stack(vals).mean())
    return torch.stack(total).mean()


@pytest.mark.parametrize("prefix", [0, 1, 2])
def test_inter_head_ssim_matches_loop(prefix):
    g = torch.Generator().manual_seed(1)
    blocks = [torch.randn(2, 3, 6 + prefix, 6 + prefix, generator=g, dtype=torch.float64) for _ in range(2)]
    assert L.inter_head_ssim_loss(blocks, prefix).item() == pytest.approx(_ssim_loop(blocks, prefix).item(), rel=1e-9)


@pytest.mark.parametrize("prefix", [0, 1, 2])
def test_inter_head_ssim_hand_written_backward_matches_autograd_of_the_loop(prefix):
    """L_ssim's backward through the key maps is written out (_KeyMapStatistics): the same gradient
    as autograd through the plain loop, on every logit including the prefix rows and columns (0)."""
    g = torch.Generator().manual_seed(5)
    blocks = [torch.randn(2, 3, 7 + prefix, 7 + prefix, generator=g, dtype=torch.float64, requires_grad=True)
              for _ in range(2)]
    mine = torch.autograd.grad(L.inter_head_ssim_loss(blocks, prefix), blocks)
    plain = torch.autograd.grad(_ssim_loop(blocks, prefix), blocks)
    for a, b in zip(mine, plain):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-12)
        assert a[:, :, :prefix].abs().sum() == 0 and a[:, :, :, :prefix].abs().sum() == 0
    assert all(a.abs().sum() > 0 for a in mine)
    x = torch.randn(1, 2, 5 + prefix, 5 + prefix, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: L.inter_head_ssim_block(t, prefix), (x,))


# ------------------------------------------------------------------------------------ L_ent
def test_entropy_loss_hand_checked():
    # Every patch row identical -> every cosine similarity is 1 -> variance 0 (+1e-8).
    logits = torch.ones(2, 3, 5, 5)
    expected = -0.5 * math.log(2 * math.pi * math.e * 1e-8)
    assert L.entropy_loss([logits, logits], 1, 64).item() == pytest.approx(expected, rel=1e-4)


def test_entropy_loss_matches_plain_formula():
    g = torch.Generator().manual_seed(3)
    blocks = [torch.randn(3, 2, 10, 10, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    loss = L.entropy_loss(blocks, 1, num_rows=64)  # N' = 9 <= 64: all rows, no randomness
    hs = []
    for a in blocks:
        for b in range(3):
            m = a[b].mean(0)[1:, 1:]
            rows = m / m.norm(dim=1, keepdim=True).clamp_min(1e-6)
            gram = rows @ rows.T
            hs.append(0.5 * torch.log(2 * math.pi * math.e * (gram.var(unbiased=False) + 1e-8)))
    plain = -torch.stack(hs).mean()
    assert loss.item() == pytest.approx(plain.item(), rel=1e-9)
    g1 = torch.autograd.grad(loss, blocks)
    g2 = torch.autograd.grad(plain, blocks)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


def test_entropy_loss_row_sampling_is_seeded():
    blocks = [torch.randn(2, 2, 80, 80)]
    a = L.entropy_loss(blocks, 1, 16, generator=torch.Generator().manual_seed(5))
    b = L.entropy_loss(blocks, 1, 16, generator=torch.Generator().manual_seed(5))
    assert a.item() == b.item()


# ---------------------------------------------------------------------------------- L_align
def test_mask_ratio_schedule():
    assert L.mask_ratio(0, 100) == pytest.approx(0.5)
    assert L.mask_ratio(50, 100) == pytest.approx(0.3)
    assert L.mask_ratio(100, 100) == pytest.approx(0.1)


def test_alignment_loss_hand_checked():
    # Teacher and student CLS rows differ by exactly 0.5 everywhere: with all keys kept the
    # masked mean |difference| per block is Σ 0.5·m / Σ m = 0.5 (over the batch as a whole).
    t = [torch.randn(2, 3, 5, 5) for _ in range(3)]
    q = [a + 0.5 for a in t]
    loss, masks = L.alignment_loss(t, q, ratio=1.0, keep=1.0, num_prefix_tokens=1)
    assert loss.item() == pytest.approx(0.5, rel=1e-5)
    assert masks[0].shape == (2, 4) and masks[0].sum().item() == 8


def test_alignment_loss_matches_plain_formula():
    g = torch.Generator().manual_seed(7)
    t = [torch.randn(2, 3, 9, 9, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    q = [torch.randn(2, 3, 9, 9, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    loss, masks = L.alignment_loss(t, q, ratio=0.5, keep=0.7, num_prefix_tokens=1,
                                   generator=torch.Generator().manual_seed(11))
    mask = masks[0]
    # the mask: 2 of the top-4 keys of the block- and head-mean teacher CLS row, per sample
    c = torch.stack([a[:, :, 0, 1:] for a in t]).mean(dim=(0, 2))
    k = max(1, math.floor(8 * 0.5))
    for b in range(2):
        top = set(c[b].topk(k).indices.tolist())
        kept = set(mask[b].nonzero().flatten().tolist())
        assert kept <= top and len(kept) == max(1, round(0.7 * k))
    per_block = [((a[:, :, 0, 1:].mean(1) - b[:, :, 0, 1:].mean(1)).abs() * mask).sum() / (mask.sum() + 1e-8)
                 for a, b in zip(t, q)]
    plain = torch.stack(per_block).mean()
    assert loss.item() == pytest.approx(plain.item(), rel=1e-9)
    g1 = torch.autograd.grad(loss, q + t)
    g2 = torch.autograd.grad(plain, q + t)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)
    assert all(a.abs().sum() > 0 for a in g1[3:])  # the teacher's side gets its gradient too


def test_alignment_without_class_token_groups_blocks_by_shape():
    # Swin-like: no CLS, blocks of two shapes (two stages): query-mean rows, mean over blocks.
    t = [torch.randn(4, 2, 6, 6), torch.randn(4, 2, 6, 6), torch.randn(2, 4, 3, 3)]
    q = [a + 0.25 for a in t]
    loss, masks = L.alignment_loss(t, q, ratio=1.0, keep=1.0, num_prefix_tokens=0, has_class_token=False)
    assert loss.item() == pytest.approx(0.25, rel=1e-5)
    assert len(masks) == 2


def test_alignment_on_captured_rows_equals_alignment_on_full_maps_and_keeps_no_map():
    """A capture that keeps only the CLS rows (what the synthesizer gives Q) gives the loss and the
    image gradient of the full maps, and what it holds owns only the rows' memory."""
    from maskaq.quant import capture_attention
    teacher = tiny_vit(reg_tokens=1)
    student = tiny_student(teacher)
    x = torch.randn(3, 1, 28, 28, requires_grad=True)
    p = teacher.num_prefix_tokens

    def rows(a):
        return L.cls_rows(a, p, True).clone()

    results = []
    for reduce in (None, rows):
        with capture_attention(teacher, outputs=False) as cap_t, \
                capture_attention(student, outputs=False, reduce_logits=reduce) as cap_q:
            teacher(x)
            student(x)
        if reduce is None:
            loss, masks = L.alignment_loss(cap_t.logits, cap_q.logits, ratio=0.5, num_prefix_tokens=p,
                                           generator=torch.Generator().manual_seed(3))
        else:
            assert all(a.shape == (3, 3, 16) and a.untyped_storage().nbytes() == a.numel() * a.element_size()
                       for a in cap_q.logits)
            t_rows = [L.cls_rows(a, p, True) for a in cap_t.logits]
            loss, masks = L.alignment_loss_rows(t_rows, cap_q.logits, ratio=0.5,
                                                generator=torch.Generator().manual_seed(3))
        results.append((loss, masks[0], torch.autograd.grad(loss, x)[0]))
    (l1, m1, g1), (l2, m2, g2) = results
    assert torch.equal(m1, m2) and m1.sum() > 0
    torch.testing.assert_close(l2, l1, rtol=1e-6, atol=0)
    torch.testing.assert_close(g2, g1, rtol=1e-5, atol=1e-9)
    assert g1.abs().sum() > 0
    with pytest.raises(ValueError, match="teacher rows"):
        L.alignment_loss_rows([torch.randn(2, 3, 5)], [torch.randn(2, 3, 4)], ratio=0.5)
    with pytest.raises(ValueError, match="3-D"):
        L.alignment_loss_rows([torch.randn(2, 3, 5, 5)], [torch.randn(2, 3, 5, 5)], ratio=0.5)


# -------------------------------------------------------------------------------- PSAQ parts
def test_kde_entropy_matches_loop():
    g = torch.Generator().manual_seed(2)
    s = torch.rand(2, 30, generator=g, dtype=torch.float64)
    got = L.kde_entropy(s, bandwidth=0.05, num_points=10)
    lo, hi = s.min().item(), s.max().item()
    xs = [lo + (hi - lo) * i / 9 for i in range(10)]
    ents = []
    for b in range(2):
        f = []
        for x in xs:
            pdf = sum(math.exp(-(x - v) ** 2 / (2 * 0.05 ** 2)) for v in s[b].tolist()) / 30
            pdf = pdf / math.sqrt(2 * math.pi * 0.05 ** 2) + 1e-4
            f.append(-pdf * math.log(pdf))
        ents.append(sum((f[i] + f[i + 1]) / 2 * (xs[i + 1] - xs[i]) for i in range(9)))
    assert got.item() == pytest.approx(sum(ents) / 2, rel=1e-9)


def test_psaq_total_variation_hand_checked():
    x = torch.tensor([[0.0, 1.0], [2.0, 3.0]]).view(1, 1, 2, 2)
    assert L.psaq_total_variation(x).item() == pytest.approx(math.sqrt(2) + math.sqrt(8) + 3 + 1, rel=1e-6)


# ----------------------------------------------------------------------------- augmentations
def test_scaled_pixels():
    assert scaled_pixels(8, 224) == 8 and scaled_pixels(16, 224) == 16
    assert scaled_pixels(8, 28) == 1 and scaled_pixels(16, 28) == 2
    assert scaled_pixels(8, 448) == 16


def test_patch_scaled_jitter_is_half_a_patch_then_one():
    """The public code rolls by 8 then 16 px at 224 px with patch 16: half a patch, then one.
    At 28 px with patch 4 that is 2 then 4 px (scaling with the image would give 1 then 2)."""
    assert patch_scaled_pixels(8, 16) == 8 and patch_scaled_pixels(16, 16) == 16
    assert patch_scaled_pixels(8, 4) == 2 and patch_scaled_pixels(16, 4) == 4
    assert patch_scaled_pixels(8, 7) == 4 and patch_scaled_pixels(0, 4) == 0
    aug = SynthesisAugment(iters=10, patch_size=4)
    assert aug.jitter_at(0) == 2 and aug.jitter_at(9) == 4
    synth = Synthesizer(tiny_vit(), SynthesisConfig(synth_iters=2))
    assert synth.spec.patch_size == (7, 7)


def test_synthesis_augment_decays_noise_and_repeats():
    aug = SynthesisAugment(iters=10, patch_size=4, color_jitter=False, jitter=0.0)
    x = torch.zeros(2, 1, 28, 28)
    last = aug(x, 9, torch.Generator().manual_seed(0))  # decay factor 0 at the last step
    assert torch.allclose(last, x)
    aug = SynthesisAugment(iters=10, patch_size=2)
    a = aug(torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(1)), 0, torch.Generator().manual_seed(3))
    b = aug(torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(1)), 0, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert aug.jitter_at(0) == 1 and aug.jitter_at(9) == 2


@pytest.mark.parametrize("channels", [1, 3])
def test_qat_augment_shapes_and_seed(channels):
    mean, std = (0.5,) * channels, (0.25,) * channels
    aug = QATAugment(mean, std)
    x = torch.randn(6, channels, 28, 28)
    a = aug(x, torch.Generator().manual_seed(0))
    b = aug(x, torch.Generator().manual_seed(0))
    c = aug(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_qat_augment_identity_when_everything_off():
    aug = QATAugment((0.5,), (0.25,), crop=False, flip=False, jitter_p=0.0, grayscale_p=0.0, blur=False)
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(aug(x, torch.Generator().manual_seed(0)), x)


# ----------------------------------------------------------------------------- synthesizer
def test_describe_model_reads_the_model():
    spec = describe_model(tiny_vit())
    assert spec.in_chans == 1 and spec.image_size == (28, 28) and spec.num_classes == 10
    assert spec.num_prefix_tokens == 1 and spec.has_class_token and not spec.is_swin
    spec = describe_model(tiny_vit(reg_tokens=2, num_classes=7))
    assert spec.num_prefix_tokens == 3 and spec.num_classes == 7


def test_quick_synthesis_lowers_the_total_loss():
    teacher = tiny_vit()
    student = tiny_student(teacher)
    cfg = SynthesisConfig(num_images=8, synth_batch_size=8, synth_iters=30)
    x, y, info = Synthesizer(teacher, cfg, progress=False).synthesize_batch(seed=0, student=student)
    history = info["loss_history"]
    assert len(history) == 30
    assert sum(history[-5:]) / 5 < sum(history[:5]) / 5
    assert set(info["final_losses"]) == {"ce", "tv", "ssim", "entropy", "align", "total"}
    spec = describe_model(teacher)
    assert x.min() >= spec.pixel_min.min() - 1e-6 and x.max() <= spec.pixel_max.max() + 1e-6


def test_same_seed_same_images_and_student_untouched():
    teacher = tiny_vit()
    student = tiny_student(teacher)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    cfg = SynthesisConfig(num_images=6, synth_batch_size=4, synth_iters=3)
    synth = Synthesizer(teacher, cfg, progress=False)
    a = synth.synthesize(seed=5, student=student)
    b = synth.synthesize(seed=5, student=student)
    c = synth.synthesize(seed=6, student=student)
    assert a.images.shape == (6, 1, 28, 28) and a.labels.shape == (6,)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)
    for k, v in student.state_dict().items():  # Q is frozen during synthesis
        assert torch.equal(v, before[k]), k
    assert all(p.requires_grad for p in student.parameters())  # and its flags are restored


def test_cached_student_weights_give_the_same_images(monkeypatch):
    """Synthesis fake-quantizes the frozen student's weights once per batch: the images are bit for
    bit those of a student that quantizes them on every forward."""
    import contextlib

    from maskaq.synthesis import synthesizer

    teacher = tiny_vit()
    student = tiny_student(teacher)
    cfg = SynthesisConfig(num_images=4, synth_batch_size=4, synth_iters=3)
    cached = Synthesizer(teacher, cfg, progress=False).synthesize(seed=2, student=student)
    monkeypatch.setattr(synthesizer, "_cached_weights", lambda model: contextlib.nullcontext())
    uncached = Synthesizer(teacher, cfg, progress=False).synthesize(seed=2, student=student)
    assert torch.equal(cached.images, uncached.images)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_nan_batch_is_reseeded_retried_and_reported(precision):
    teacher = tiny_vit()
    poisoned = []

    def inject(attempt, step, x):
        if attempt == 0 and step == 1:
            x.data.fill_(float("nan"))
            poisoned.append((attempt, step))

    cfg = SynthesisConfig(num_images=4, synth_batch_size=4, synth_iters=3, use_alignment=False, precision=precision)
    with pytest.warns(RuntimeWarning, match="re-seeding"):
        out = Synthesizer(teacher, cfg, progress=False, on_step=inject).synthesize(seed=0)
    assert poisoned == [(0, 1)]
    assert out.report["nan_retries"] == 1 and out.report["failed_batches"] == []
    assert torch.isfinite(out.images).all() and len(out) == 4
    clean = Synthesizer(teacher, cfg, progress=False).synthesize(seed=0)
    assert not torch.equal(clean.images, out.images)  # the retry ran with another seed


def test_nan_retries_are_bounded():
    teacher = tiny_vit()

    def always(attempt, step, x):
        x.data.fill_(float("nan"))

    cfg = SynthesisConfig(num_images=4, synth_batch_size=4, synth_iters=2, use_alignment=False, max_nan_retries=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        synth = Synthesizer(teacher, cfg, progress=False, on_step=always)
        x, y, info = synth.synthesize_batch(seed=0)
        assert x is None and info["failed"] and info["nan_retries"] == 3
        with pytest.raises(RuntimeError, match="non-finite"):
            synth.synthesize(seed=0)


def test_synthesis_without_alignment_skips_the_student():
    teacher = tiny_vit()
    student = tiny_student(teacher)
    cfg = SynthesisConfig(num_images=4, synth_batch_size=4, synth_iters=2, use_entropy=False, use_alignment=False)
    x, y, info = Synthesizer(teacher, cfg, progress=False).synthesize_batch(seed=0, student=student)
    assert set(info["final_losses"]) == {"ce", "tv", "ssim", "total"}


def test_bad_synthesis_config_is_refused():
    with pytest.raises(ValueError, match="synth_iters"):
        SynthesisConfig(synth_iters=0).validate()
    with pytest.raises(ValueError, match="mask_keep"):
        SynthesisConfig(mask_keep=1.5).validate()


# -------------------------------------------------------------------------------- baselines
def test_gaussian_and_real_baselines():
    spec = describe_model(tiny_vit())
    a, b = gaussian_images(spec, 5, seed=1), gaussian_images(spec, 5, seed=1)
    assert a.images.shape == (5, 1, 28, 28) and torch.equal(a.images, b.images)
    assert int(a.labels.max()) < 10
    data = [(torch.full((1, 28, 28), float(i)), i % 10) for i in range(20)]
    r = real_images(data, 6, seed=0)
    assert r.images.shape == (6, 1, 28, 28)
    assert all(int(x[0, 0, 0]) % 10 == int(y) for x, y in zip(r.images, r.labels))
    with pytest.raises(ValueError, match="real"):
        real_images(None, 4)


def test_psaq_synthesis_runs_and_repeats():
    teacher = tiny_vit()
    cfg = SynthesisConfig(num_images=4, synth_batch_size=4)
    psaq = PsaqConfig(psaq_iters=3, psaq_rounds=2)
    a = PsaqSynthesizer(teacher, cfg, psaq, progress=False).synthesize(seed=0)
    b = PsaqSynthesizer(teacher, cfg, psaq, progress=False).synthesize(seed=0)
    assert torch.equal(a.images, b.images) and torch.isfinite(a.images).all()
    assert set(a.report["final_losses"]) == {"total", "ce", "entropy", "tv"}


def test_tv_target_option_adds_psaq_image_prior():
    """tv_target_weight > 0 adds w·|TV_psaq(x) − v·sqrt(numel / (32·3·224²))| to the synthesis loss."""
    teacher = tiny_vit()
    cfg = SynthesisConfig(synth_iters=2, tv_target_weight=0.05, tv_target=100.0, use_alignment=False)
    synth = Synthesizer(teacher, cfg)
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(4)
    terms = synth.losses(x, x, labels, None, 0, torch.Generator().manual_seed(1))
    target = 100.0 * (x.numel() / (32 * 3 * 224 * 224)) ** 0.5
    expected = (L.psaq_total_variation(x) - target).abs()
    torch.testing.assert_close(terms["tv_target"], expected)
    without = Synthesizer(teacher, SynthesisConfig(synth_iters=2, use_alignment=False)).losses(
        x, x, labels, None, 0, torch.Generator().manual_seed(1))
    assert "tv_target" not in without
    torch.testing.assert_close(terms["total"] - without["total"], 0.05 * expected)


def test_init_pixel_starts_from_a_canvas():
    """init_pixel=p, init_std=s: x0 = (p − μ)/σ + s·N(0, 1) (the same draw as MaskAQ's N(0, 1) init)."""
    teacher = tiny_vit()
    plain = Synthesizer(teacher, SynthesisConfig())
    canvas = Synthesizer(teacher, SynthesisConfig(init_pixel=0.0, init_std=0.2))
    x = plain._initial_images(64, torch.Generator().manual_seed(3))
    c = canvas._initial_images(64, torch.Generator().manual_seed(3))
    black = (0.0 - 0.2860) / 0.3530
    torch.testing.assert_close(c, black + 0.2 * x)
    assert abs(float(c.mean()) - black) < 0.02 and abs(float(c.std()) - 0.2) < 0.01
    with pytest.raises(ValueError, match="init_pixel"):
        SynthesisConfig(init_pixel=2.0).validate()
    with pytest.raises(ValueError, match="init_std"):
        SynthesisConfig(init_std=-1.0).validate()


@pytest.mark.parametrize("kind", ["maskaq", "psaq"])
def test_checkpointed_blocks_give_the_images_of_the_plain_passes(kind):
    """checkpoint_blocks recomputes T's and Q's block activations in the backward pass: the images
    (and so every loss and gradient on the way) are those of the plain passes, bit for bit on CPU."""
    from maskaq.quant import calibrate, quantize_model
    from maskaq.synthesis.baselines import PsaqConfig, PsaqSynthesizer
    teacher = tiny_vit()
    student = quantize_model(tiny_vit(), 4, 4).eval()
    calibrate(student, torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0)))
    images = []
    for checkpointing in (False, True):
        cfg = SynthesisConfig(num_images=4, synth_batch_size=2, synth_iters=4, checkpoint_blocks=checkpointing)
        if kind == "psaq":
            synth = PsaqSynthesizer(teacher, cfg, PsaqConfig(psaq_rounds=1, psaq_iters=4), progress=False)
            images.append(synth.synthesize(seed=3).images)
        else:
            images.append(Synthesizer(teacher, cfg, progress=False).synthesize(seed=3, student=student).images)
    assert torch.equal(images[0], images[1])


def test_checkpointed_blocks_record_each_block_once_and_restore_the_forwards():
    from maskaq.quant import capture_attention, checkpointed_blocks
    model = tiny_vit()
    forwards = [b.forward for b in model.blocks]
    x = torch.randn(2, 1, 28, 28, requires_grad=True)
    with checkpointed_blocks(model), capture_attention(model, logits=True, outputs=False) as cap:
        model(x).sum().backward()  # the backward recomputes every block's forward
        assert len(cap.logits) == len(model.blocks)
    checkpointed = x.grad.clone()
    x.grad = None
    with capture_attention(model, logits=True, outputs=False):  # the same attention, stored
        model(x).sum().backward()
    assert torch.equal(x.grad, checkpointed)
    assert [b.forward for b in model.blocks] == forwards and "forward" not in model.blocks[0].__dict__
    with pytest.raises(ValueError, match="no transformer blocks"):
        with checkpointed_blocks(torch.nn.Linear(2, 2)):
            pass


def test_inter_head_ssim_loss_recomputed_equals_stored():
    blocks = [torch.randn(2, 3, 10, 10, generator=torch.Generator().manual_seed(i), requires_grad=True)
              for i in range(3)]
    stored = L.inter_head_ssim_loss(blocks, 1)
    grads = torch.autograd.grad(stored, blocks)
    recomputed = L.inter_head_ssim_loss(blocks, 1, recompute=True)
    assert torch.equal(recomputed, stored)
    assert all(torch.equal(a, b) for a, b in zip(torch.autograd.grad(recomputed, blocks), grads))


def test_bf16_passes_keep_the_losses_and_the_image_gradient_of_fp32():
    """precision="bf16" runs T and Q under autocast; the losses stay float32. Against the float32
    passes (tiny ViT, Q in the loop): CE, L_ssim, L_ent within 1e-3 relative (bfloat16 keeps 8
    significant bits, and the losses average thousands of terms); L_align, a difference of two
    nearly equal sets of logits, within 2e-3 absolute; the image gradient at cosine > 0.999."""
    from maskaq.quant import calibrate, quantize_model
    from maskaq.runtime import frozen
    teacher = tiny_vit()
    student = quantize_model(tiny_vit(), 4, 4).eval()
    calibrate(student, torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0)))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 1, 28, 28, generator=g).requires_grad_()
    labels = torch.randint(0, 10, (4,), generator=g)
    results = {}
    for precision in ("fp32", "bf16"):
        synth = Synthesizer(teacher, SynthesisConfig(synth_iters=5, precision=precision), progress=False)
        with frozen(teacher, student):
            terms = synth.losses(x, x, labels, student, 0, torch.Generator().manual_seed(2))
            grad = torch.autograd.grad(terms["total"], x)[0]
        assert all(v.dtype == torch.float32 for v in terms.values())
        results[precision] = ({k: float(v.detach()) for k, v in terms.items()}, grad)
    (full, g32), (half, g16) = results["fp32"], results["bf16"]
    for k in ("ce", "ssim", "entropy"):
        assert abs(half[k] - full[k]) <= 1e-3 * abs(full[k]), (k, half[k], full[k])
    assert abs(half["align"] - full["align"]) <= 2e-3
    assert float(torch.nn.functional.cosine_similarity(g32.flatten(), g16.flatten(), dim=0)) > 0.999
    with pytest.raises(ValueError, match="precision"):
        SynthesisConfig(precision="fp16").validate()


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_bf16_only_on_a_cpu_with_native_bf16(monkeypatch, native):
    """precision="auto" (the default) resolves per device: bf16 on a CPU that multiplies bfloat16 in
    hardware, else fp32 (CUDA too, until bf16 synthesis is measured there); the images are those of the
    precision it resolves to, bit for bit, and the report says which ran."""
    import maskaq.synthesis.synthesizer as S
    monkeypatch.setattr(S, "cpu_has_native_bf16", lambda: native)
    want = "bf16" if native else "fp32"
    assert SynthesisConfig().precision == "auto"
    assert S.resolve_precision("auto", torch.device("cpu")) == want
    assert S.resolve_precision("auto", torch.device("cuda")) == "fp32"
    assert S.resolve_precision("fp32", "cpu") == "fp32" and S.resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ValueError, match=r"precision must be one of auto, fp32, bf16, got 'fp16'"):
        S.resolve_precision("fp16", "cpu")
    teacher = tiny_vit()
    sets = {p: Synthesizer(teacher, SynthesisConfig(num_images=2, synth_batch_size=2, synth_iters=3, precision=p,
                                                    use_alignment=False), progress=False).synthesize(seed=4)
            for p in ("auto", "fp32", "bf16")}
    assert sets["auto"].report["precision"] == want
    assert torch.equal(sets["auto"].images, sets[want].images)
    assert not torch.equal(sets["fp32"].images, sets["bf16"].images)  # the two precisions do differ
