"""The data sources MaskAQ is compared with, behind the same interface as MaskAQ synthesis.

- `real`: real training images (the upper bound).
- `gaussian`: x ~ N(0, 1), no optimization; QAT draws fresh noise for every batch (an endless
  stream, as the public code), `gaussian_stream`.
- `psaq`: PSAQ-ViT (ECCV 2022): maximize the KDE-estimated entropy of patch similarity on
  the head-mean attention outputs of T; Adam(0.2, (0.5, 0.9)), 2 × 500 steps with warm-up +
  cosine, jitter 15 then 30 px at 224 (scaled), random flips, CE + 0.05·|TV − v|.
- `mimiq`: MaskAQ synthesis without L_ent and L_align (Q not in the loop).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, replace
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from maskaq.images import SyntheticSet
from maskaq.runtime import SeedStream, batch_seed
from maskaq.spec import ModelSpec
from maskaq.synthesis import losses as L
from maskaq.synthesis.augment import scaled_pixels
from maskaq.synthesis.synthesizer import SynthesisConfig, Synthesizer

__all__ = ["PsaqConfig", "PsaqSynthesizer", "gaussian_images", "gaussian_stream", "real_images"]


def gaussian_images(spec: ModelSpec, num_images: int, seed: int = 0, device=None) -> SyntheticSet:
    """Pure N(0, 1) noise in the model's input shape with uniform random labels."""
    g = torch.Generator(device=device or "cpu")
    g.manual_seed(batch_seed(seed, 0, stream=SeedStream.GAUSSIAN_SET))
    x = torch.randn(spec.image_shape(num_images), generator=g, device=device)
    y = torch.randint(0, spec.num_classes, (num_images,), generator=g, device=device)
    return SyntheticSet(x.cpu(), y.cpu(), {"num_images": num_images, "nan_retries": 0, "failed_batches": []})


def gaussian_stream(spec: ModelSpec, num_images: int, seed: int = 0, device=None) -> SyntheticSet:
    """Endless N(0, 1) noise: fresh images for every QAT batch, seeded by (seed, step).

    `images` holds a first draw of `num_images` (calibration, previews, the epoch size).
    """
    first = gaussian_images(spec, num_images, seed, device)

    def draw(batch_size: int, step: int) -> torch.Tensor:
        g = torch.Generator(device=device or "cpu")
        g.manual_seed(batch_seed(seed, step, stream=SeedStream.GAUSSIAN_STREAM))
        return torch.randn(spec.image_shape(batch_size), generator=g, device=device)

    first.draw = draw
    first.report["stream"] = True
    return first


def real_images(dataset, num_images: int, seed: int = 0) -> SyntheticSet:
    """A seeded random subset of `num_images` items of a (image, label) dataset."""
    if dataset is None:
        raise ValueError("method 'real' needs real training images: pass real_data=<Dataset> "
                         "(or --train PATH on the command line)")
    n = len(dataset)
    if n == 0:
        raise ValueError("the real-data dataset is empty")
    g = torch.Generator().manual_seed(batch_seed(seed, 0, stream=SeedStream.REAL_SUBSET))
    index = torch.randperm(n, generator=g)[:min(num_images, n)].tolist()
    items = [dataset[i] for i in index]
    x = torch.stack([torch.as_tensor(item[0], dtype=torch.float32) for item in items])
    y = torch.tensor([int(item[1]) for item in items])
    return SyntheticSet(x, y, {"num_images": len(index), "nan_retries": 0, "failed_batches": []})


@dataclass
class PsaqConfig:
    """PSAQ-ViT's synthesis knobs (public code defaults)."""
    psaq_lr: float = 0.2
    psaq_betas: Tuple[float, float] = (0.5, 0.9)
    psaq_rounds: int = 2
    psaq_iters: int = 500  # per round
    psaq_jitter: Tuple[float, float] = (15.0, 30.0)  # px at 224 per round (last value repeats)
    psaq_warmup_frac: float = 0.2  # 100 of 500 steps of linear warm-up before the cosine
    psaq_tv_weight: float = 0.05
    psaq_tv_target: Tuple[float, float] = (2500.0, 3000.0)  # for 32 × 3 × 224 × 224; scaled by √numel
    kde_bandwidth: float = 0.01
    kde_points: int = 10
    psaq_flip: bool = True

    def validate(self) -> "PsaqConfig":
        if self.psaq_rounds < 1 or self.psaq_iters < 1:
            raise ValueError("psaq_rounds and psaq_iters must be >= 1")
        return self


class PsaqSynthesizer(Synthesizer):
    """PSAQ-ViT synthesis (teacher only) with MaskAQ's seeding and NaN recovery."""

    def __init__(self, teacher: nn.Module, config: Optional[SynthesisConfig] = None,
                 psaq: Optional[PsaqConfig] = None, **kwargs):
        super().__init__(teacher, config, **kwargs)
        self.psaq = (psaq or PsaqConfig()).validate()
        # The progress bar counts steps: one batch is rounds × iters of them.
        self.config = replace(self.config, synth_iters=self.psaq.psaq_rounds * self.psaq.psaq_iters)

    def passes_precision(self) -> str:
        return "fp32"  # PSAQ's teacher passes run without autocast, whatever config.precision says

    def _lr_at(self, step: int) -> float:
        p = self.psaq
        warm = max(1, int(round(p.psaq_warmup_frac * p.psaq_iters)))
        if step < warm:
            return p.psaq_lr * (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(p.psaq_iters - warm, 1))) * p.psaq_lr

    def _optimize(self, seed: int, batch: int, student, attempt: int, bar=None, progress=None):
        p, spec, dev = self.psaq, self.spec, self.device
        from maskaq.quant import capture_attention, checkpointed_blocks
        g = torch.Generator(device=dev)
        g.manual_seed(seed)
        x = torch.randn(spec.image_shape(batch), generator=g, device=dev)
        labels = torch.randint(0, spec.num_classes, (batch,), generator=g, device=dev)
        x.requires_grad_(True)
        opt = torch.optim.Adam([x], lr=p.psaq_lr, betas=tuple(p.psaq_betas), eps=1e-8)
        numel_ratio = x.numel() / (32 * 3 * 224 * 224)
        lo_t, hi_t = p.psaq_tv_target
        u = float(torch.rand((), generator=g, device=dev))
        tv_target = (lo_t + (hi_t - lo_t) * u) * math.sqrt(numel_ratio)

        def step_fn(step):  # round r, step it of psaq_iters: the schedule and the jitter restart per round
            r, it = divmod(step, p.psaq_iters)
            lim = scaled_pixels(p.psaq_jitter[min(r, len(p.psaq_jitter) - 1)], min(spec.image_size))
            for group in opt.param_groups:
                group["lr"] = self._lr_at(it)
            # PSAQ rolls both axes by the same offset.
            off = int(torch.randint(-lim, lim + 1, (1,), generator=g, device=dev))
            x_jit = torch.roll(x, shifts=(off, off), dims=(2, 3))
            if p.psaq_flip and float(torch.rand((), generator=g, device=dev)) > 0.5:
                x_jit = torch.flip(x_jit, dims=(3,))
            opt.zero_grad(set_to_none=True)
            with contextlib.ExitStack() as stack:
                if self.config.checkpoint_blocks:
                    stack.enter_context(checkpointed_blocks(self.teacher))
                cap = stack.enter_context(capture_attention(self.teacher, logits=False, outputs=True))
                logits = self.teacher(x_jit)
            ce = F.cross_entropy(logits, labels)
            ent = L.psaq_entropy_loss(cap.outputs, spec.num_prefix_tokens,
                                      bandwidth=p.kde_bandwidth, num_points=p.kde_points)
            tv = torch.abs(L.psaq_total_variation(x_jit) - tv_target)
            total = ent + ce + p.psaq_tv_weight * tv
            total.backward()
            opt.step()
            return {"total": total, "ce": ce, "entropy": ent, "tv": tv}

        return self._run_steps(x, labels, g, opt, None, step_fn, attempt, bar, progress)
