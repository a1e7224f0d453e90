"""QAT that survives a real model: LSQ steps kept positive through any update, non-finite losses
skipped, and a run that keeps diverging stopped with one clear error."""
import math

import pytest
import torch

from maskaq.distill.guard import MAX_BAD_BATCHES, MIN_STEP_SHRINK, QATDiverged, StepGuard, lsq_step_parameters
from maskaq.distill.trainer import QATConfig, QATTrainer
from maskaq.quant.quantizers import LsqActQuantizer
from maskaq.synthesis.baselines import gaussian_images
from maskaq.spec import describe_model

from test_synthesis import tiny_student, tiny_vit


def noise_source(teacher, n=8):
    spec = describe_model(teacher)
    return lambda student, round_index: gaussian_images(spec, n, seed=round_index)


def test_a_student_whose_steps_are_driven_negative_trains_on():
    """At this rate SGD's first update carries activation steps (attention operands included) far
    below zero: the fused attention op would refuse them and the run would die. The guard holds
    each at half its value instead, and QAT goes on to the end."""
    teacher = tiny_vit()
    student = tiny_student(teacher)
    cfg = QATConfig(qat_epochs=3, qat_batch_size=4, refresh_every=0, qat_lr=0.05, qat_warmup_epochs=0,
                    qat_act_step_lr_scale=1e5)
    before = {n: m.step.item() for n, m in student.named_modules() if isinstance(m, LsqActQuantizer)}
    report = QATTrainer(teacher, student, cfg, noise_source(teacher), seed=0, progress=False).fit()
    assert report["optimizer_steps"] == 6 and report["clamped_steps"] > 0
    after = {n: m.step.item() for n, m in student.named_modules() if isinstance(m, LsqActQuantizer)}
    assert all(math.isfinite(s) and s > 0 for s in after.values()), after
    # the clamp is at most a halving per update: no step fell below (1/2)^updates of its start
    assert all(after[n] >= before[n] * MIN_STEP_SHRINK ** 6 for n in before)
    assert any(n.endswith(("q_quantizer", "k_quantizer", "p_quantizer", "v_quantizer")) for n in before)
    student(torch.randn(2, 1, 28, 28))  # the trained student runs


def test_step_guard_clamps_only_updates_that_shrink_a_step_past_half_and_drops_their_momentum():
    teacher = tiny_vit()
    student = tiny_student(teacher)
    steps = lsq_step_parameters(student)
    assert len(steps) == len([m for m in student.modules() if isinstance(m, LsqActQuantizer)])
    opt = torch.optim.SGD(steps, lr=1.0, momentum=0.9)
    guard = StepGuard(student, opt)
    start = [p.detach().clone() for p in steps]
    # step 0 is asked to go below zero, step 1 to shrink to 0.6 of its value, the rest to grow
    for i, p in enumerate(steps):
        p.grad = torch.full_like(p, 3.0 * start[i].item() if i == 0 else 0.4 * start[i].item() if i == 1
                                 else -0.1 * start[i].item())
    guard.before()
    opt.step()
    guard.after()
    assert steps[0].item() == pytest.approx(MIN_STEP_SHRINK * start[0].item())
    assert opt.state[steps[0]]["momentum_buffer"].item() == 0.0
    assert steps[1].item() == pytest.approx(0.6 * start[1].item())  # left to LSQ, bit for bit
    assert opt.state[steps[1]]["momentum_buffer"].item() != 0.0
    assert all(p.item() == pytest.approx(1.1 * s.item()) for p, s in zip(steps[2:], start[2:]))
    assert guard.clamped == 1


def test_step_guard_replaces_a_non_finite_step():
    teacher = tiny_vit()
    student = tiny_student(teacher)
    guard = StepGuard(student)
    step = guard.steps[0]
    old = step.item()
    guard.before()
    with torch.no_grad():
        step.fill_(float("nan"))
    guard.after()
    assert step.item() == pytest.approx(MIN_STEP_SHRINK * old)


def test_a_step_held_down_update_after_update_stops_at_the_floor():
    from maskaq.distill.guard import MIN_STEP
    teacher = tiny_vit()
    student = tiny_student(teacher)
    guard = StepGuard(student)
    step = guard.steps[0]
    for _ in range(200):  # 2^-200 of any step is far below the floor; 0 would kill the fused ops
        guard.before()
        with torch.no_grad():
            step.fill_(-1.0)
        guard.after()
    assert step.item() == pytest.approx(MIN_STEP) and step.item() > 0


def test_lsq_weight_steps_are_guarded_too():
    from maskaq.quant import calibrate, quantize_model
    teacher = tiny_vit()
    student = quantize_model(teacher, 4, 4, weight_method="lsq")
    calibrate(student, torch.randn(4, 1, 28, 28))
    steps = lsq_step_parameters(student)
    assert any(p.dim() == 1 and p.numel() > 1 for p in steps)  # per-channel weight steps
    cfg = QATConfig(qat_epochs=2, qat_batch_size=4, refresh_every=0, qat_lr=1e4, qat_warmup_epochs=0)
    QATTrainer(teacher, student, cfg, noise_source(teacher), seed=0, progress=False).fit()
    assert all(bool(torch.isfinite(p).all()) and bool((p > 0).all()) for p in steps)


def test_a_batch_with_a_non_finite_loss_is_skipped(monkeypatch):
    teacher = tiny_vit()
    student = tiny_student(teacher)
    cfg = QATConfig(qat_epochs=2, qat_batch_size=4, refresh_every=0, qat_lr=0.05, qat_warmup_epochs=0)
    trainer = QATTrainer(teacher, student, cfg, noise_source(teacher), seed=0, progress=False)
    real_step_loss, calls = trainer.step_loss, []

    def sometimes_nan(images, model):
        terms = real_step_loss(images, model)
        calls.append(1)
        if len(calls) == 2:
            terms["total"] = terms["total"] * float("nan")
        return terms
    monkeypatch.setattr(trainer, "step_loss", sometimes_nan)
    report = trainer.fit()
    assert report["steps"] == 4 and report["optimizer_steps"] == 3 and report["skipped_batches"] == 1
    assert all(math.isfinite(v) for v in report["epoch_losses"])
    assert all(bool(torch.isfinite(p).all()) for p in student.parameters())


def test_qat_that_keeps_diverging_stops_with_one_clear_error(monkeypatch):
    teacher = tiny_vit()
    student = tiny_student(teacher)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    cfg = QATConfig(qat_epochs=MAX_BAD_BATCHES + 2, qat_batch_size=8, refresh_every=0, qat_warmup_epochs=0)
    trainer = QATTrainer(teacher, student, cfg, noise_source(teacher), seed=0, progress=False)
    real_step_loss = trainer.step_loss

    def always_inf(images, model):
        terms = real_step_loss(images, model)
        terms["kd"] = terms["kd"] + float("inf")
        terms["total"] = terms["kd"]
        return terms
    monkeypatch.setattr(trainer, "step_loss", always_inf)
    with pytest.raises(QATDiverged, match=rf"NaN or infinite for {MAX_BAD_BATCHES} batches in a row \(epoch "
                                          rf"{MAX_BAD_BATCHES}, batch 1; kd inf, hd [0-9.e-]+, total inf\).*qat_lr"):
        trainer.fit()
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())  # never updated
