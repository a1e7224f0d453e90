"""The settings of one data-free quantization run: defaults, presets, methods' settings, overrides.

`build_config(method, preset, **overrides)` layers them (defaults <- preset <- method <- overrides)
into one FullConfig of four sections (synthesis, psaq, qat, pipeline); `config_keys()` lists every
key a user can override (`--set key=value` on the command line).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Dict, Optional

from maskaq import methods
from maskaq.distill.trainer import QATConfig
from maskaq.synthesis.baselines import PsaqConfig
from maskaq.synthesis.synthesizer import SynthesisConfig

__all__ = ["PRESETS", "PipelineConfig", "FullConfig", "build_config", "config_keys"]


@dataclass
class PipelineConfig:
    """Settings of the pipeline itself (synthesis, PSAQ and QAT have their own dataclasses)."""
    first_last_8bit: bool = False
    weight_method: str = "minmax"
    calib_images: int = 32  # LSQ init from this many images of the (first) synthetic set
    # Activation-step init, chosen by measurement (bundled teacher, W4A4 maskaq, seed 0): min-max
    # 86.14%, docs/method.md's LSQ init (#the-quantizer) 78.75% (its grid tops out far below the
    # softmax peaks). Also "lsq" and "lsq_pminmax" (LSQ with min-max for P).
    act_init: str = "minmax"
    recalibrate: bool = True  # maskaq: re-init LSQ on round-0 images (Q was first initialized on noise)
    # What the round-0 calibration sees: "images" (the method's own, as the public code's first QAT
    # batch; preset paper), "noise" (Gaussian noise) or "mixed" (both in one batch: min-max spans the
    # union). Noise by measurement (preset cpu, seeds 0-2, benchmarks/results/accuracy_dfq_noisecal.md):
    # at W3A3 real-data QAT 77.65 -> 80.33 %, psaq 76.69 -> 78.90, maskaq 76.76 -> 77.21; at W4A4 every
    # method gains or holds. Min-max on 32 images of a method's own set spans their outliers, which
    # costs the 3-bit grids more than noise's ranges do.
    calib_data: str = "noise"
    real_data: Any = None  # Dataset of (image, label) for method "real"
    # > 0: before quantizing, narrow every post-LayerNorm channel wider than this many times its
    # LayerNorm's median (ranges measured on the calibration noise) and fold the change into the
    # weights (maskaq.quant.reparam, RepQ-ViT's reparameterization); 0: off, as the public code.
    equalize_ln_ratio: float = 0.0
    progress: Optional[bool] = None  # tqdm bars (None: only on a terminal)
    # With a checkpoint directory: the QAT state is saved every this many optimizer steps and at
    # least every this many seconds (and at the end of every round).
    checkpoint_every_steps: int = 100
    checkpoint_every_seconds: float = 300.0


_SECTIONS = {"synthesis": SynthesisConfig, "psaq": PsaqConfig, "qat": QATConfig, "pipeline": PipelineConfig}


def config_keys() -> Dict[str, str]:
    """Every override key -> its section."""
    keys = {}
    for section, cls in _SECTIONS.items():
        for f in fields(cls):
            assert f.name not in keys, f"duplicate config key {f.name}"
            keys[f.name] = section
    return keys


# Preset values over the defaults (= paper). `cpu` is sized for the bundled Fashion-MNIST teacher
# on 2 CPU cores, and is what benchmarks/accuracy_dfq.py measures: W4A4 maskaq = 2 synthesis
# rounds × 1 batch of 64 × 150 steps + 120 QAT steps, ≈ 4.5 minutes on one core (shared with
# another job); psaq runs 2 rounds × 100 steps.
PRESETS: Dict[str, Dict[str, Any]] = {
    "paper": {"calib_data": "images"},  # the public code calibrates on its first QAT batch
    # qat_lr 1e-4: with 64 images and 116 optimizer steps the public 1e-3 overfits the synthetic set
    # (W3A3 seed 0: gaussian 71.88% -> 78.94%, maskaq 71.38% -> 75.83% at 1e-4).
    # hd_weight 1: at λ = 10 the L_hd term is ~94 % of the QAT loss and ~72 % of its gradient
    # (W3A3, MaskAQ's images; benchmarks/diagnose_dfq.py), and on 64 synthetic images it fits T's
    # attention outputs on images unlike any real one. W3A3, seeds 0-2, minus ptq on the
    # same seed: maskaq −2.44 (λ 10), −0.07 (λ 3, seed 0), +0.79 (λ 1), −0.44 (λ 0); gaussian
    # −1.70, +0.16, +0.12 (λ 10, 1, 0); real-data QAT +0.68, +0.60, +0.18. At W4A4 λ 1 costs
    # little (maskaq seed 0: +0.40 at λ 10, +0.30 at λ 1).
    "cpu": dict(num_images=64, synth_batch_size=64, synth_iters=150, psaq_iters=100,
                qat_epochs=60, qat_batch_size=32, qat_lr=1e-4, refresh_every=30, calib_images=32, hd_weight=1.0),
    # cpu-long: 4x cpu's synthesis and 2x its QAT (2 batches of 64 images, 300 synthesis steps,
    # 2 rounds, 240 QAT steps): one W3A3 maskaq run takes 14 minutes on one core.
    "cpu-long": dict(num_images=128, synth_batch_size=64, synth_iters=300, psaq_iters=200,
                     qat_epochs=60, qat_batch_size=32, qat_lr=1e-4, refresh_every=30, calib_images=32,
                     hd_weight=1.0),
    "quick": dict(num_images=8, synth_batch_size=4, synth_iters=3, psaq_iters=2, psaq_rounds=2,
                  qat_epochs=2, qat_batch_size=4, qat_warmup_epochs=0, refresh_every=1, calib_images=4),
}

@dataclass
class FullConfig:
    synthesis: SynthesisConfig
    psaq: PsaqConfig
    qat: QATConfig
    pipeline: PipelineConfig

    def as_dict(self) -> Dict[str, Any]:
        out = {}
        for name in _SECTIONS:
            section = asdict(getattr(self, name))
            section.pop("real_data", None)
            out[name] = section
        return out


def build_config(method: str = "maskaq", preset: str = "cpu", **overrides) -> FullConfig:
    """The settings of one run: defaults ← preset ← method ← overrides (unknown keys refused)."""
    record = methods.get(method)
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    keys = config_keys()
    unknown = sorted(k for k in overrides if k not in keys)
    if unknown:
        hints = [f"{k!r}{methods.did_you_mean(k, keys)}" for k in unknown]
        raise TypeError(f"unknown option(s) {', '.join(hints)}; valid options: {', '.join(sorted(keys))}")
    values = dict(PRESETS[preset])
    values.update(record.settings)
    values.update(overrides)
    parts = {name: {} for name in _SECTIONS}
    for k, v in values.items():
        parts[keys[k]][k] = v
    synthesis = SynthesisConfig(**parts["synthesis"]).validate()
    psaq = PsaqConfig(**parts["psaq"]).validate()
    qat = QATConfig(**parts["qat"]).validate()
    pipeline = PipelineConfig(**parts["pipeline"])
    if pipeline.calib_data not in ("images", "noise", "mixed"):
        raise ValueError(f"calib_data must be images, noise or mixed, got {pipeline.calib_data!r}")
    if not pipeline.equalize_ln_ratio == 0 and not pipeline.equalize_ln_ratio >= 1:
        raise ValueError(f"equalize_ln_ratio must be 0 (off) or >= 1, got {pipeline.equalize_ln_ratio!r}")
    if pipeline.calib_images < 1:
        raise ValueError(f"calib_images must be >= 1, got {pipeline.calib_images}")
    from maskaq.quant.convert import CALIBRATION_INITS
    if pipeline.act_init not in CALIBRATION_INITS:
        raise ValueError(f"act_init must be one of {', '.join(CALIBRATION_INITS)}, got {pipeline.act_init!r}")
    return FullConfig(synthesis, psaq, qat, pipeline)
