"""QAT by distillation: KD and masked head distillation (hand-checked and against plain loops),
periodic refreshing with the current student, and the pipeline's configuration."""
import math
import re

import pytest
import torch

from maskaq.distill.losses import head_distillation_block, head_distillation_loss, kd_loss, token_weights
from maskaq.distill.trainer import QATConfig, QATTrainer, refresh_schedule
from maskaq.synthesis.baselines import gaussian_images
from maskaq.spec import describe_model

from test_synthesis import tiny_student, tiny_vit


# ------------------------------------------------------------------------------------- KD
def test_kd_loss_hand_checked():
    t = torch.tensor([[0.0, 0.0]])
    assert kd_loss(t.clone(), t, 20.0).item() == pytest.approx(0.0, abs=1e-7)
    # Two classes, τ = 1: teacher (½, ½), student logits (log 3, 0) -> (¾, ¼).
    s = torch.tensor([[math.log(3.0), 0.0]])
    expected = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert kd_loss(s, t, 1.0).item() == pytest.approx(expected, rel=1e-6)
    # τ² scaling: with τ = 20 the same logits ×20 give the same divergence ×400.
    assert kd_loss(s * 20, t * 20, 20.0).item() == pytest.approx(400 * expected, rel=1e-5)


def test_kd_loss_matches_plain_formula_and_only_student_gets_gradient():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(4, 10, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 10, generator=g, dtype=torch.float64, requires_grad=True)
    p = (t / 20).softmax(-1)
    q = (s / 20).softmax(-1)
    plain = (p * (p.log() - q.log())).sum(-1).mean() * 400
    loss = kd_loss(s, t, 20.0)
    assert loss.item() == pytest.approx(plain.item(), rel=1e-10)
    loss.backward()
    assert s.grad is not None and t.grad is None
    with pytest.raises(ValueError, match=re.escape("kd_loss: student logits (4, 10) vs teacher (4, 5)")):
        kd_loss(s, t[:, :5])


# -------------------------------------------------------------------------- head distillation
def test_token_weights_top_fraction():
    out = torch.zeros(1, 2, 20, 3)
    out[0, :, 7] = 5.0
    out[0, :, 3] = -4.0  # |O| counts, not the sign
    w = token_weights(out, top_fraction=0.1)  # k = round(20·0.1) = 2
    assert w[0, 7] == 2 and w[0, 3] == 2 and w.sum() == 22
    assert torch.equal(token_weights(out, masked=False), torch.ones(1, 20))


def test_head_distillation_hand_checked():
    t = torch.randn(2, 3, 11, 4)
    # Identical outputs: ssim = (2σ² + C2)/(2σ² + C2 + 1e-6) ≈ 1 -> loss ≈ 0.
    assert head_distillation_loss([t], [t.clone()], 1).item() == pytest.approx(0.0, abs=1e-4)
    # Q = −T (perfect anti-correlation): ssim = (−2σ² + C2)/(2σ² + C2 + 1e-6) ≈ −1 -> loss ≈ 2.
    assert head_distillation_loss([t], [-t], 1).item() == pytest.approx(2.0, abs=1e-2)
    # A constant offset does not change covariances: loss ≈ 0 again.
    assert head_distillation_loss([t], [t + 3.0], 1).item() == pytest.approx(0.0, abs=1e-4)


def _hd_loop(outs_t, outs_q, p, masked):
    vals = []
    for t, q in zip(outs_t, outs_q):
        B, H, N, d = t.shape
        n = N - p
        k = max(1, round(n * 0.1))
        for b in range(B):
            imp = t[b, :, p:].abs().mean(dim=(0, 2))
            top = set(imp.topk(k).indices.tolist()) if masked else set()
            w = [2.0 if i in top else 1.0 for i in range(n)]
            ws = sum(w)
            for h in range(H):
                for c in range(d):
                    xt = t[b, h, p:, c]
                    xq = q[b, h, p:, c]
                    mt = sum(w[i] * xt[i] for i in range(n)) / ws
                    mq = sum(w[i] * xq[i] for i in range(n)) / ws
                    vt = sum(w[i] * xt[i] ** 2 for i in range(n)) / ws - mt ** 2
                    vq = sum(w[i] * xq[i] ** 2 for i in range(n)) / ws - mq ** 2
                    cv = sum(w[i] * xt[i] * xq[i] for i in range(n)) / ws - mt * mq
                    vals.append((2 * cv + 0.03 ** 2) / (vt + vq + 0.03 ** 2 + 1e-6))
    return 1 - torch.stack(vals).mean()


@pytest.mark.parametrize("masked", [True, False])
def test_head_distillation_matches_loop(masked):
    g = torch.Generator().manual_seed(4)
    outs_t = [torch.randn(2, 2, 12, 3, generator=g, dtype=torch.float64) for _ in range(2)]
    outs_q = [torch.randn(2, 2, 12, 3, generator=g, dtype=torch.float64) for _ in range(2)]
    got = head_distillation_loss(outs_t, outs_q, 1, masked=masked)
    assert got.item() == pytest.approx(_hd_loop(outs_t, outs_q, 1, masked).item(), rel=1e-5)


def test_head_distillation_shape_errors():
    with pytest.raises(ValueError, match=re.escape("teacher output (1, 2, 5, 3) vs student (1, 2, 6, 3)")):
        head_distillation_block(torch.randn(1, 2, 5, 3), torch.randn(1, 2, 6, 3))
    with pytest.raises(ValueError, match="1 teacher vs 0 student blocks"):
        head_distillation_loss([torch.randn(1, 2, 5, 3)], [])


# ------------------------------------------------------------------------------- refreshing
def test_refresh_schedule():
    assert refresh_schedule(100, 30) == [0, 30, 60, 90]
    assert refresh_schedule(10, 0) == [0] and refresh_schedule(10, None) == [0]
    assert refresh_schedule(5, 1) == [0, 1, 2, 3, 4]


def recording_source(teacher, calls):
    """A data source of 8 noise images per round that records the student it was given and its state."""
    spec = describe_model(teacher)

    def source(current, round_index):
        calls.append({"student": current, "round": round_index,
                      "state": {k: v.clone() for k, v in current.state_dict().items()}})
        return gaussian_images(spec, 8, seed=round_index)
    return source


def test_refreshing_happens_at_the_configured_epochs_with_the_current_student():
    teacher = tiny_vit()
    student = tiny_student(teacher)
    initial = {k: v.clone() for k, v in student.state_dict().items()}
    calls = []
    source = recording_source(teacher, calls)

    cfg = QATConfig(qat_epochs=5, qat_batch_size=4, refresh_every=2, qat_lr=0.05, qat_warmup_epochs=0)
    trainer = QATTrainer(teacher, student, cfg, source, seed=0, progress=False)
    report = trainer.fit()
    assert report["refresh_epochs"] == [0, 2, 4] and [c["round"] for c in calls] == [0, 1, 2]
    assert report["steps"] == 5 * 2
    assert all(c["student"] is student for c in calls)
    changed = lambda state: any(not torch.equal(state[k], initial[k]) for k in initial)  # noqa: E731
    assert not changed(calls[0]["state"])  # round 0: before any training
    assert changed(calls[1]["state"]) and changed(calls[2]["state"])  # later rounds: the trained Q
    assert any(not torch.equal(calls[1]["state"][k], calls[2]["state"][k]) for k in initial)
    for k, v in teacher.state_dict().items():
        assert torch.isfinite(v).all()


def test_qat_without_refresh_generates_once_and_is_seeded():
    teacher = tiny_vit()
    spec = describe_model(teacher)
    results = []
    for _ in range(2):
        student = tiny_student(teacher)
        calls = []
        cfg = QATConfig(qat_epochs=2, qat_batch_size=4, refresh_every=0, hd_weight=10.0, qat_warmup_epochs=0)
        trainer = QATTrainer(teacher, student, cfg,
                             lambda s, r: calls.append(r) or gaussian_images(spec, 8, seed=r), progress=False)
        rep = trainer.fit()
        assert calls == [0] and rep["refresh_epochs"] == [0]
        results.append(torch.cat([p.detach().flatten() for p in student.parameters()]))
    assert torch.equal(results[0], results[1])


def test_qat_warmup_epochs_take_no_optimizer_step():
    """The public code steps the optimizer only from epoch 2 on; the schedule runs from epoch 0."""
    teacher = tiny_vit()
    student = tiny_student(teacher)
    initial = {k: v.clone() for k, v in student.state_dict().items()}
    calls = []
    cfg = QATConfig(qat_epochs=4, qat_batch_size=4, refresh_every=1, qat_warmup_epochs=2)
    trainer = QATTrainer(teacher, student, cfg, recording_source(teacher, calls), seed=0, progress=False)
    report = trainer.fit()
    states = [c["state"] for c in calls]
    unchanged = lambda state: all(torch.equal(state[k], initial[k]) for k in initial)  # noqa: E731
    assert unchanged(states[0]) and unchanged(states[1]) and unchanged(states[2])  # epochs 0-2 start untrained
    assert not unchanged(states[3]) and not unchanged(student.state_dict())
    assert report["steps"] == 4 * 2 and report["optimizer_steps"] == 2 * 2
    assert len(report["epoch_losses"]) == 2


def test_qat_config_validation():
    with pytest.raises(ValueError, match="qat_epochs and qat_batch_size must be >= 1"):
        QATConfig(qat_epochs=0).validate()
    with pytest.raises(ValueError, match=re.escape("refresh_every must be >= 0 (0 = never), got -1")):
        QATConfig(refresh_every=-1).validate()
    with pytest.raises(ValueError, match="qat_warmup_epochs"):
        QATConfig(qat_epochs=2, qat_warmup_epochs=2).validate()
    with pytest.raises(ValueError, match="kd_temperature"):
        QATConfig(kd_temperature=0).validate()


# -------------------------------------------------------------------------------- pipeline
def test_build_config_presets_methods_and_unknown_keys():
    from maskaq.pipeline import build_config
    cfg = build_config("maskaq", "paper")
    assert cfg.synthesis.synth_iters == 2000 and cfg.synthesis.num_images == 10000
    # the public code as it runs: 200 epochs on synthetic data (7 refresh rounds), τ = 5, no weight
    # decay, no optimizer step in the first 2 epochs
    assert cfg.qat.qat_epochs == 200 and cfg.qat.refresh_every == 30 and cfg.qat.kd_temperature == 5
    assert cfg.qat.qat_weight_decay == 0 and cfg.qat.qat_warmup_epochs == 2
    assert len(refresh_schedule(cfg.qat.qat_epochs, cfg.qat.refresh_every)) == 7
    assert cfg.synthesis.align_weight == 0.1 and cfg.synthesis.tv_weight == 2.5e-5
    mimiq = build_config("mimiq", "quick")
    assert not mimiq.synthesis.use_entropy and not mimiq.synthesis.use_alignment
    assert mimiq.qat.refresh_every == 0 and not mimiq.qat.hd_mask
    assert build_config("maskaq-no-refresh", "cpu").qat.refresh_every == 0
    # maskaq+ is MaskAQ from a dark low-contrast canvas; maskaq itself starts from N(0, 1)
    plus, faithful = build_config("maskaq+", "cpu").synthesis, build_config("maskaq", "cpu").synthesis
    assert (plus.init_pixel, plus.init_std) == (0.0, 0.2) and faithful.init_pixel is None
    assert build_config("maskaq+", "cpu").pipeline.calib_data == "noise"
    assert plus.use_entropy and plus.use_alignment and build_config("maskaq+", "cpu").qat.refresh_every == 30
    assert build_config("maskaq", "quick", synth_iters=7).synthesis.synth_iters == 7
    with pytest.raises(TypeError, match="synth_iters"):
        build_config("maskaq", "quick", synth_iter=7)
    with pytest.raises(ValueError, match="unknown method"):
        build_config("maskq")
    with pytest.raises(ValueError, match="preset"):
        build_config("maskaq", "fast")
    assert build_config("maskaq", "paper").pipeline.act_init == "minmax"  # chosen by measurement
    assert build_config("maskaq", "cpu").qat.qat_lr == 1e-4 and build_config("maskaq", "paper").qat.qat_lr == 1e-3
    # λ of L_hd: the public 10 in paper, 1 in the CPU presets (measured, maskaq/config.py)
    assert build_config("maskaq", "paper").qat.hd_weight == 10.0
    assert build_config("maskaq", "cpu").qat.hd_weight == build_config("mimiq", "cpu-long").qat.hd_weight == 1.0
    with pytest.raises(ValueError, match="act_init"):
        build_config("gaussian", "quick", act_init="percentile")


def test_qat_step_loss_weighs_head_distillation_by_hd_weight():
    """total = KD + λ·L_hd for any λ, with L_hd computed (and nonzero) on the same batch."""
    teacher = tiny_vit()
    student = tiny_student(teacher)
    images = gaussian_images(describe_model(teacher), 4, seed=3).images
    losses = {w: QATTrainer(teacher, student, QATConfig(hd_weight=w), progress=False).step_loss(images, student)
              for w in (1.0, 10.0)}
    assert losses[1.0]["hd"].item() > 1e-3
    torch.testing.assert_close(losses[1.0]["hd"], losses[10.0]["hd"])
    for w, out in losses.items():
        torch.testing.assert_close(out["total"], out["kd"] + w * out["hd"])
    assert "hd" not in QATTrainer(teacher, student, QATConfig(hd_weight=0.0), progress=False).step_loss(images, student)


@pytest.mark.parametrize("act_init", ["lsq", "minmax"])
def test_pipeline_calibrates_with_the_chosen_activation_init(act_init):
    from maskaq.pipeline import run_pipeline
    from maskaq.quant.convert import activation_quantizers
    result = run_pipeline(tiny_vit(), 4, 4, method="gaussian", preset="quick", act_init=act_init, progress=False)
    quantizers = activation_quantizers(result.model)
    assert quantizers and all(q.init_method == act_init for q in quantizers)
    assert result.report["config"]["pipeline"]["act_init"] == act_init


def test_quantize_quick_uses_the_current_student_for_refresh(monkeypatch):
    from maskaq import pipeline
    from maskaq.synthesis.synthesizer import Synthesizer
    teacher = tiny_vit()
    seen = []
    original = Synthesizer.synthesize

    def spy(self, num_images=None, seed=0, student=None, desc="", **kwargs):
        seen.append(student)
        return original(self, num_images, seed, student, desc, **kwargs)

    monkeypatch.setattr(Synthesizer, "synthesize", spy)
    qmodel = pipeline.quantize(teacher, 4, 4, method="maskaq", preset="quick", seed=0, qat_epochs=3,
                               refresh_every=1, progress=False)
    assert len(seen) == 3 and all(s is qmodel for s in seen)
    report = qmodel.maskaq_report
    assert report["qat"]["refresh_epochs"] == [0, 1, 2] and report["nan_retries"] == 0
    x = torch.randn(2, 1, 28, 28)
    assert qmodel(x).shape == (2, 10)
    assert not any(type(m).__name__.startswith("Quant") for m in teacher.modules())  # teacher untouched


@pytest.mark.parametrize("method", ["mimiq", "psaq", "gaussian", "maskaq-no-align", "maskaq+"])
def test_quantize_quick_baselines(method):
    from maskaq import pipeline
    qmodel = pipeline.quantize(tiny_vit(), 4, 4, method=method, preset="quick", seed=1, progress=False)
    assert qmodel.maskaq_report["method"] == method
    # only maskaq and its ablations (but maskaq-no-refresh) regenerate their images
    expected = [0, 1] if method in ("maskaq-no-align", "maskaq+") else [0]
    assert qmodel.maskaq_report["qat"]["refresh_epochs"] == expected
    # the precision "auto" took for the synthesis passes (PSAQ's are always fp32; noise needs none)
    from maskaq.synthesis.synthesizer import resolve_precision
    expected = {"psaq": "fp32", "gaussian": None}.get(method, resolve_precision("auto", "cpu"))
    assert qmodel.maskaq_report["synthesis_precision"] == expected


def test_quantize_real_needs_data():
    from maskaq import pipeline
    with pytest.raises(ValueError, match="real_data"):
        pipeline.quantize(tiny_vit(), 4, 4, method="real", preset="quick")
    data = [(torch.randn(1, 28, 28), i % 10) for i in range(16)]
    qmodel = pipeline.quantize(tiny_vit(), 4, 4, method="real", preset="quick", real_data=data, progress=False)
    assert qmodel.maskaq_report["calibrated_on"] == "gaussian noise"  # the default calib_data
    qmodel = pipeline.quantize(tiny_vit(), 4, 4, method="real", preset="quick", real_data=data, progress=False,
                               calib_data="images")
    assert qmodel.maskaq_report["calibrated_on"] == "real images"


def test_calibration_data_default_is_noise_but_the_paper_preset_calibrates_on_the_images():
    from maskaq.pipeline import build_config
    assert build_config("maskaq", "cpu").pipeline.calib_data == "noise"
    assert build_config("psaq", "cpu-long").pipeline.calib_data == "noise"
    assert build_config("maskaq", "paper").pipeline.calib_data == "images"


def test_gaussian_baseline_is_an_endless_stream_of_fresh_noise(monkeypatch):
    """The public code draws new noise for every QAT batch, not a fixed set of num_images."""
    from maskaq.pipeline import build_config, run_pipeline
    from maskaq.synthesis.baselines import gaussian_stream
    seen = []
    original = QATTrainer.step_loss

    def spy(self, images, model):
        seen.append(images.detach().clone())
        return original(self, images, model)

    monkeypatch.setattr(QATTrainer, "step_loss", spy)
    result = run_pipeline(tiny_vit(), 4, 4, method="gaussian", preset="quick", qat_epochs=3, qat_augment=False,
                          progress=False)
    nominal = result.images.images  # the first draw: 8 images = 2 batches per epoch
    assert len(seen) == 3 * 2 and all(x.shape[0] == 4 for x in seen)
    flat = torch.cat(seen)
    assert len({tuple(x.flatten()[:8].tolist()) for x in flat}) == flat.shape[0]  # no image twice
    assert not any(torch.equal(x, y) for x in flat for y in nominal)
    assert not build_config("gaussian", "cpu").qat.hd_mask  # unmasked head distillation on noise
    # seeded: the same (seed, step) gives the same noise
    spec = describe_model(tiny_vit())
    a, b = gaussian_stream(spec, 8, seed=3), gaussian_stream(spec, 8, seed=3)
    assert torch.equal(a.draw(4, 5), b.draw(4, 5)) and not torch.equal(a.draw(4, 5), a.draw(4, 6))


def test_ptq_method_calibrates_min_max_on_noise_without_qat():
    from maskaq.pipeline import run_pipeline
    from maskaq.quant.convert import activation_quantizers
    teacher = tiny_vit()
    result = run_pipeline(teacher, 4, 4, method="ptq", preset="quick", seed=0, progress=False)
    report = result.report
    assert report["method"] == "ptq" and report["calibrated_on"] == "gaussian noise"
    assert report["qat"]["steps"] == 0 and report["qat"]["optimizer_steps"] == 0
    quantizers = activation_quantizers(result.model)
    assert quantizers and all(q.initialized and q.init_method == "minmax" for q in quantizers)
    # the student's weights are the teacher's (no QAT moved them)
    student_fc = dict(result.model.named_parameters())["head.weight"]
    torch.testing.assert_close(student_fc, teacher.head.weight)


def test_calibrate_lsq_pminmax_uses_min_max_for_softmax_outputs_only():
    from maskaq.quant import calibrate, quantize_model
    qmodel = quantize_model(tiny_vit(), 4, 4)
    calibrate(qmodel, torch.randn(4, 1, 28, 28), init="lsq_pminmax")
    inits = {name: m.init_method for name, m in qmodel.named_modules() if hasattr(m, "init_method")}
    assert inits and all((v == "minmax") == k.endswith("p_quantizer") for k, v in inits.items())
    with pytest.raises(ValueError, match="lsq_pminmax"):
        calibrate(qmodel, torch.randn(4, 1, 28, 28), init="percentile")


@pytest.mark.parametrize("calib_data,described", [("noise", "gaussian noise"), ("mixed", "gaussian noise + psaq images"),
                                                  ("images", "psaq images")])
def test_pipeline_calibration_data_option(calib_data, described):
    from maskaq.pipeline import build_config, run_pipeline
    result = run_pipeline(tiny_vit(), 3, 3, method="psaq", preset="quick", calib_data=calib_data, progress=False)
    assert result.report["calibrated_on"] == described
    with pytest.raises(ValueError, match="calib_data"):
        build_config("psaq", "quick", calib_data="real")


@pytest.mark.parametrize("method", ["maskaq", "psaq"])
def test_pipeline_describes_the_model_once_per_run(method, monkeypatch):
    from maskaq import pipeline, spec
    from maskaq.distill import trainer
    from maskaq.synthesis import synthesizer
    calls = []

    def counting(model):
        calls.append(model)
        return spec.describe_model(model)

    for module in (pipeline, trainer, synthesizer):
        monkeypatch.setattr(module, "describe_model", counting)
    pipeline.run_pipeline(tiny_vit(), 4, 4, method=method, preset="quick", progress=False)
    assert len(calls) == 1


@pytest.mark.parametrize("train_quantizers", [True, False])
def test_qat_can_keep_the_activation_grids_of_the_calibration(train_quantizers):
    from maskaq.quant.quantizers import LsqActQuantizer
    teacher = tiny_vit()
    student = tiny_student(teacher)
    grids = lambda: {n: (m.step.item(), m.zero_point.item()) for n, m in student.named_modules()  # noqa: E731
                     if isinstance(m, LsqActQuantizer)}
    weights = lambda: {n: p.detach().clone() for n, p in student.named_parameters() if n.endswith("weight")}  # noqa: E731
    grids0, weights0 = grids(), weights()
    cfg = QATConfig(qat_epochs=3, qat_batch_size=4, refresh_every=0, qat_lr=0.05, qat_warmup_epochs=0,
                    qat_train_act_quantizers=train_quantizers)
    QATTrainer(teacher, student, cfg, recording_source(teacher, []), seed=0, progress=False).fit()
    assert any(not torch.equal(w, weights0[n]) for n, w in weights().items())  # the weights train either way
    assert (grids() == grids0) is (not train_quantizers)


def test_rounds_driven_from_outside_train_as_fit_does():
    teacher = tiny_vit()
    students = [tiny_student(teacher) for _ in range(2)]
    students[1].load_state_dict(students[0].state_dict())
    cfg = QATConfig(qat_epochs=5, qat_batch_size=4, refresh_every=2, qat_lr=0.05, qat_warmup_epochs=1)
    source = recording_source(teacher, [])
    by_fit = QATTrainer(teacher, students[0], cfg, source, seed=3, progress=False).fit()
    trainer = QATTrainer(teacher, students[1], cfg, seed=3, progress=False)
    assert [list(r) for r in trainer.rounds()] == [[0, 1], [2, 3], [4]]
    for round_index, epochs in enumerate(trainer.rounds()):
        trainer.train_round(source(students[1], round_index), epochs)
    by_rounds = trainer.report()
    assert by_rounds["steps"] == by_fit["steps"] and by_rounds["refresh_epochs"] == by_fit["refresh_epochs"]
    for (name, a), b in zip(students[0].state_dict().items(), students[1].state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="data_source"):
        QATTrainer(teacher, students[0], cfg, seed=3).fit()


def test_the_activation_steps_learn_at_their_own_rate_and_nothing_else_changes():
    """qat_act_step_lr_scale multiplies the SGD rate of the activation quantizers' steps only: after
    the same steps on the same images, each step has moved that many times as far (the first step's
    update is linear in the rate) unless that would shrink it past half (maskaq.distill.guard), and
    the weights and zero points have moved exactly alike."""
    from maskaq.quant.quantizers import LsqActQuantizer
    teacher = tiny_vit()
    students = [tiny_student(teacher) for _ in range(2)]
    students[1].load_state_dict(students[0].state_dict())
    before = {k: v.clone() for k, v in students[0].state_dict().items()}
    for student, scale in zip(students, (1.0, 10.0)):
        cfg = QATConfig(qat_epochs=1, qat_batch_size=8, refresh_every=0, qat_lr=1.0, qat_warmup_epochs=0,
                        qat_act_step_lr_scale=scale)
        QATTrainer(teacher, student, cfg, recording_source(teacher, []), seed=0, progress=False).fit()
    steps = {f"{n}.step" for n, m in students[0].named_modules() if isinstance(m, LsqActQuantizer)}
    moved = 0
    for name, a in students[0].state_dict().items():
        b = students[1].state_dict()[name]
        if name in steps:
            da, db = (a - before[name]).item(), (b - before[name]).item()
            if abs(da) > 1e-5:  # far above float32's rounding of step + Δ
                moved += 1
                if before[name].item() + 10 * da >= 0.5 * before[name].item():
                    assert db == pytest.approx(10 * da, rel=1e-2), name
                else:  # ten times the update would have shrunk the step past half: the guard held it there
                    assert b.item() == pytest.approx(0.5 * before[name].item()), name
        else:
            assert torch.equal(a, b), name
    assert moved >= 2  # the rest move by less than float32 resolves at this rate (which is the point)
    with pytest.raises(ValueError, match="qat_act_step_lr_scale"):
        QATConfig(qat_act_step_lr_scale=0).validate()
