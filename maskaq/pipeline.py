"""Data-free quantization of a ViT: synthesize calibration images, calibrate, distill.

From Python: `maskaq.pipeline.quantize(model, wbits=4, abits=4, method="maskaq", preset="cpu")`; from
the command line `maskaq quantize` (maskaq/commands/quantize.py).
Methods: maskaq, its ablations (maskaq-no-entropy, maskaq-no-align, maskaq-no-refresh,
maskaq-no-hdmask) and the baselines mimiq, psaq, gaussian, real — same quantizer, same QAT —
and ptq, the floor: min-max calibration on noise and no QAT.
Presets: quick (seconds, for tests), cpu (the bundled teacher on 2 CPU cores in minutes),
cpu-long (about 3× cpu), paper (the public code's settings as it runs). Every knob is an override (`--set key=value`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch
from torch import nn

from maskaq import methods
from maskaq.checkpoint import CheckpointSaver, open_run_checkpoint
# The settings and evaluation are re-exported: they were public here since the first release.
from maskaq.config import PRESETS, FullConfig, PipelineConfig, build_config, config_keys  # noqa: F401
from maskaq.evaluation import evaluate_model  # noqa: F401
from maskaq.distill.trainer import QATTrainer
from maskaq.images import SyntheticSet
from maskaq.synthesis.baselines import PsaqSynthesizer, gaussian_images, gaussian_stream, real_images
from maskaq.spec import describe_model
from maskaq.runtime import SeedStream, batch_seed, dist_info
from maskaq.synthesis.synthesizer import Synthesizer

__all__ = ["METHODS", "PRESETS", "PipelineConfig", "PipelineResult", "quantize", "run_pipeline",
           "build_config", "config_keys", "evaluate_model"]

METHODS = methods.names()  # the method registry, maskaq.methods


@dataclass
class PipelineResult:
    model: nn.Module
    report: Dict[str, Any]
    images: SyntheticSet  # the last synthetic set QAT trained on
    config: FullConfig


def _round_seed(seed: int, round_index: int) -> int:
    return batch_seed(seed, round_index, stream=SeedStream.ROUND) & 0x7FFFFFFF


def _data_source(method: str, teacher: nn.Module, spec, cfg: FullConfig, seed: int):
    """make_images(student, round) -> SyntheticSet, from the method's image source."""
    dev = next(teacher.parameters()).device
    s, progress = cfg.synthesis, cfg.pipeline.progress
    record = methods.get(method)
    if record.images == "gaussian":
        return lambda student, r, store=None: gaussian_stream(spec, s.num_images, _round_seed(seed, r), device=dev)
    if record.images == "real":
        return lambda student, r, store=None: real_images(cfg.pipeline.real_data, s.num_images, _round_seed(seed, r))
    if record.images == "psaq":
        synth = PsaqSynthesizer(teacher, s, cfg.psaq, progress=progress, spec=spec)
        return lambda student, r, store=None: synth.synthesize(s.num_images, _round_seed(seed, r),
                                                               desc="psaq synthesis", store=store)
    if record.images != "synthesis":
        raise ValueError(f"method {method!r} trains on no images")
    synth = Synthesizer(teacher, s, progress=progress, spec=spec)
    in_loop = record.student_in_loop(s)

    def source(student, r, store=None):
        return synth.synthesize(s.num_images, _round_seed(seed, r), student=student if in_loop else None,
                                desc=f"{method} synthesis (round {r})", store=store)
    return source


def _calibration_batch(kind: str, data: SyntheticSet, spec, n: int, seed: int, method: str):
    """(images, description) the round-0 calibration sees (PipelineConfig.calib_data)."""
    noise = gaussian_images(spec, n, seed).images
    if kind == "noise":
        return noise, "gaussian noise"
    if kind == "mixed":
        return torch.cat([noise, data.images[:n].cpu()]), f"gaussian noise + {method} images"
    return data.images[:n], f"{method} images"


def run_pipeline(model: nn.Module, wbits: int, abits: int, method: str = "maskaq", preset: str = "cpu",
                 seed: int = 0, config: Optional[FullConfig] = None, checkpoint_dir=None, resume: bool = False,
                 **overrides) -> PipelineResult:
    """Quantize `model` data-free; returns the model, a JSON-able report and the last image set.

    `checkpoint_dir`: the run checkpoints there (maskaq.checkpoint: the synthesis batches, each
    round's images, the QAT state every `checkpoint_every_steps` steps / `checkpoint_every_seconds`);
    with `resume=True` it continues from them and ends with the student an uninterrupted run
    makes. Without `resume` a directory holding an earlier run is refused (FileExistsError)."""
    from maskaq.quant import calibrate, quantize_model

    record = methods.get(method)
    cfg = config or build_config(method, preset, **overrides)
    if record.images == "real" and cfg.pipeline.real_data is None:
        raise ValueError("method 'real' needs real training images: pass real_data=<Dataset of (image, label)>")
    started, cpu_started = time.perf_counter(), time.process_time()
    teacher = model.eval()
    spec = describe_model(teacher)
    dev = next(teacher.parameters()).device
    n_calib = cfg.pipeline.calib_images
    base = teacher
    if cfg.pipeline.equalize_ln_ratio:  # the same function with narrower post-LayerNorm channels
        from maskaq.quant.reparam import equalize_layernorm_channels
        base = equalize_layernorm_channels(teacher, gaussian_images(spec, n_calib, seed, device=dev).images.to(dev),
                                           cfg.pipeline.equalize_ln_ratio)
    student = quantize_model(base, wbits, abits, first_last_8bit=cfg.pipeline.first_last_8bit,
                             weight_method=cfg.pipeline.weight_method)
    student.to(dev)
    calibrated_on = None
    if record.student_in_loop(cfg.synthesis):
        # Q is in the synthesis loop from round 0, so it needs ranges before any image exists:
        # initialize LSQ on noise (what the public code's first forward does), then re-init on
        # the first synthetic images below.
        calibrate(student, gaussian_images(spec, n_calib, seed, device=dev).images.to(dev),
                  init=cfg.pipeline.act_init)
        calibrated_on = "gaussian noise"
    if record.images == "none":  # ptq
        data = gaussian_images(spec, n_calib, seed, device=dev)
        calibrate(student, data.images.to(dev), init=cfg.pipeline.act_init)
        calibrated_on, qat_report, last_images = "gaussian noise", _no_qat_report(), data
    else:
        # docs/method.md's loop (#qat, periodic sample refreshing): each round makes images with the
        # current student, the first one calibrates the student's activation grids, and QAT trains
        # for the round's epochs.
        make_images = _data_source(method, teacher, spec, cfg, seed)
        trainer = QATTrainer(teacher, student, cfg.qat, seed=seed, progress=cfg.pipeline.progress, spec=spec)
        ckpt = open_run_checkpoint(checkpoint_dir, resume, method, wbits, abits, seed, cfg.as_dict(), teacher)
        state = ckpt.load() if ckpt is not None else None
        saver = CheckpointSaver(ckpt, cfg.pipeline.checkpoint_every_steps, cfg.pipeline.checkpoint_every_seconds,
                                student, trainer)
        if state is not None:  # everything up to the saved step is done, calibration included
            student.load_state_dict(state["student"])
            calibrated_on = state["calibrated_on"]
            torch.set_rng_state(state["torch_rng"])
            saver.first_set_size = state["first_set_size"]
            trainer.load_state_dict(state["trainer"], saver.first_set_size)
        rounds = trainer.rounds()
        start_round = state["round"] if state is not None else 0
        images = None
        for round_index in range(start_round, len(rounds)):
            images = ckpt.round_images(round_index) if ckpt is not None else None
            if images is None:
                images = make_images(student, round_index, store=ckpt.batch_store(round_index) if ckpt else None)
                if ckpt is not None:
                    ckpt.save_round_images(round_index, images)
            if round_index == 0 and state is None and (calibrated_on is None or cfg.pipeline.recalibrate):
                batch, calibrated_on = _calibration_batch(cfg.pipeline.calib_data, images, spec, n_calib, seed, method)
                calibrate(student, batch.to(dev), init=cfg.pipeline.act_init)
            if saver.first_set_size is None:
                saver.first_set_size = len(images)
            saver.round_index, saver.calibrated_on = round_index, calibrated_on
            trainer.train_round(images, rounds[round_index], on_step=saver.maybe_save if ckpt is not None else None)
            saver.save(round_index + 1)
        if images is None:  # resumed after the last round: its images for the result
            last = len(rounds) - 1
            images = (ckpt.round_images(last) if ckpt is not None else None) or make_images(student, last)
        student.eval()
        qat_report, last_images = trainer.report(), images
    report = _run_report(method, wbits, abits, preset if config is None else "custom", seed, dev, calibrated_on,
                         qat_report, started, cpu_started, cfg)
    student.maskaq_report = report
    return PipelineResult(student, report, last_images, cfg)


def _run_report(method, wbits, abits, preset, seed, dev, calibrated_on, qat_report, started, cpu_started,
                cfg: FullConfig) -> Dict[str, Any]:
    """The JSON-able report of one run (student.maskaq_report)."""
    _, world = dist_info()
    synth_reports = qat_report.get("synthesis", [])
    report = {
        "method": method, "wbits": int(wbits), "abits": int(abits), "preset": preset,
        "seed": int(seed), "device": str(dev), "world_size": world, "torch_threads": torch.get_num_threads(),
        "calibrated_on": calibrated_on,
        "nan_retries": sum(int(r.get("nan_retries", 0)) for r in synth_reports),
        "failed_batches": sum(len(r.get("failed_batches", [])) for r in synth_reports),
        "synthesis_seconds": sum(float(r.get("seconds", 0.0)) for r in synth_reports),
        # what precision "auto" took on this device (None where no MaskAQ synthesis ran)
        "synthesis_precision": next((r["precision"] for r in synth_reports if "precision" in r), None),
        "qat": qat_report,
        "seconds": time.perf_counter() - started,
        "cpu_seconds": time.process_time() - cpu_started,
        "synthesis_cpu_seconds": sum(float(r.get("cpu_seconds", 0.0)) for r in synth_reports),
        "config": cfg.as_dict(),
    }
    report["qat_seconds"] = qat_report["seconds"] - report["synthesis_seconds"]
    return report


def _no_qat_report() -> Dict[str, Any]:
    return {"epochs": 0, "warmup_epochs": 0, "steps": 0, "optimizer_steps": 0, "refresh_epochs": [],
            "epoch_losses": [], "seconds": 0.0, "cpu_seconds": 0.0, "synthesis": []}


def quantize(model: nn.Module, wbits: int, abits: int, method: str = "maskaq", preset: str = "cpu",
             seed: int = 0, **overrides) -> nn.Module:
    """Data-free quantization of a timm ViT/DeiT/Swin; returns the fake-quantized student.

    The teacher `model` is left untouched. `overrides` set any knob of docs/method.md#hyperparameters (see
    `maskaq.pipeline.config_keys()`), e.g. `synth_iters=500, qat_epochs=20`; method "real"
    needs `real_data=<Dataset>`. `checkpoint_dir=DIR` checkpoints the run and `resume=True`
    continues a stopped one (see run_pipeline). The run's report is at `qmodel.maskaq_report`.
    """
    return run_pipeline(model, wbits, abits, method=method, preset=preset, seed=seed, **overrides).model
