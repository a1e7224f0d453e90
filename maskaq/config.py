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
    # Activation-step init: min-max, not the public code's LSQ init, whose grid tops out far below the
    # softmax peaks (measured: docs/method.md#where-the-defaults-differ-from-the-public-code-and-why).
    act_init: str = "minmax"
    recalibrate: bool = True  # maskaq: re-init LSQ on round-0 images (Q was first initialized on noise)
    # What the round-0 calibration sees: "images" (the method's own, as the public code's first QAT
    # batch; preset paper), "noise" (Gaussian noise) or "mixed" (both in one batch: min-max spans the
    # union). Noise: min-max on a method's own images spans their outliers, which costs the low-bit
    # grids more (measured: docs/method.md#where-the-defaults-differ-from-the-public-code-and-why).
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


# Preset values over the defaults (= paper). `cpu` is sized for the bundled Fashion-MNIST teachers
# on 2 CPU cores, and is what benchmarks/accuracy_dfq.py measures: W4A4 maskaq = 2 synthesis
# rounds × 1 batch of 64 × 150 steps + 120 QAT steps, a few minutes on one core.
PRESETS: Dict[str, Dict[str, Any]] = {
    "paper": {"calib_data": "images"},  # the public code calibrates on its first QAT batch
    # qat_lr 1e-4: with 64 images and ~120 steps the public 1e-3 overfits the synthetic set; hd_weight
    # 1: at λ = 10 L_hd is most of the QAT gradient and fits T's attention on images unlike any real
    # one (both measured: docs/method.md#where-the-defaults-differ-from-the-public-code-and-why).
    "cpu": dict(num_images=64, synth_batch_size=64, synth_iters=150, psaq_iters=100,
                qat_epochs=60, qat_batch_size=32, qat_lr=1e-4, refresh_every=30, calib_images=32, hd_weight=1.0),
    # cpu-long: 4x cpu's synthesis and 2x its QAT (2 batches of 64 images, 300 synthesis steps,
    # 2 rounds, 240 QAT steps).
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
