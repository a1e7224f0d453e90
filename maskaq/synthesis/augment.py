"""Synthesis augmentation, batched and driven by an explicit torch.Generator so that results repeat.

`SynthesisAugment`: what MaskAQ applies to the optimized batch at every synthesis step (random
roll, decaying per-sample per-channel offset, colour jitter). QAT's augmentation is
maskaq.distill.augment.QATAugment.

Pixel sizes are given at 224 px with patch 16 in docs/method.md#synthesis. MaskAQ's roll is a share
of a patch (half a patch, then one), so `patch_scaled_pixels` scales it with the patch size; PSAQ's
jitter scales with the image size (`scaled_pixels`).
"""
from __future__ import annotations

import torch

from maskaq.runtime import uniform

__all__ = ["scaled_pixels", "patch_scaled_pixels", "random_roll", "SynthesisAugment"]


def scaled_pixels(pixels_at_224: float, image_size: int) -> int:
    """A pixel distance given at 224 px, at `image_size` px (at least 1)."""
    return max(1, int(round(pixels_at_224 * image_size / 224.0)))


def patch_scaled_pixels(pixels_at_patch16: float, patch_size: int) -> int:
    """A pixel distance given for patch 16 (e.g. 8 px = half a patch), for `patch_size` (0 stays 0)."""
    if pixels_at_patch16 <= 0:
        return 0
    return max(1, int(round(pixels_at_patch16 * patch_size / 16.0)))


def _randint(low: int, high: int, generator: torch.Generator) -> int:
    """Integer in [low, high] from the generator (drawn on the generator's device)."""
    return int(torch.randint(low, high + 1, (1,), generator=generator, device=generator.device).item())


def random_roll(x: torch.Tensor, limit: int, generator: torch.Generator) -> torch.Tensor:
    """Roll the batch by one random offset in [-limit, limit] on each spatial axis."""
    dy, dx = _randint(-limit, limit, generator), _randint(-limit, limit, generator)
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


class SynthesisAugment:
    """Roll + decaying Gaussian offset + colour jitter, redrawn every step (MaskAQ synthesis).

    The roll limit is `jitter` px at patch 16 (8: half a patch) for the first half of the steps
    and twice that after, scaled to `patch_size` (the public code's 8 and 16 px at 224/16). The offset is N(0, noise_std) per sample and channel, times (iters − 1 − step)/iters so it
    fades out over the run; the colour jitter shifts by U(−1, 1) and scales by exp(U(−1, 1)).
    """

    def __init__(self, iters: int, patch_size: int, *, jitter: float = 8.0, noise_std: float = 0.5,
                 color_jitter: bool = True):
        self.iters = int(iters)
        self.jitter_first = patch_scaled_pixels(jitter, patch_size)
        self.jitter_second = patch_scaled_pixels(2 * jitter, patch_size)
        self.noise_std = float(noise_std)
        self.color_jitter = bool(color_jitter)

    def jitter_at(self, step: int) -> int:
        return self.jitter_first if step < self.iters / 2 else self.jitter_second

    def __call__(self, x: torch.Tensor, step: int, generator: torch.Generator) -> torch.Tensor:
        b, c = x.shape[:2]
        limit = self.jitter_at(step)
        out = random_roll(x, limit, generator) if limit > 0 else x
        if self.noise_std > 0:
            decay = max(self.iters - 1 - step, 0) / self.iters
            offset = torch.randn((b, c, 1, 1), generator=generator, device=x.device, dtype=x.dtype)
            out = out + offset * (self.noise_std * decay)
        if self.color_jitter:
            shift = uniform((b, c, 1, 1), -1.0, 1.0, generator, x.device, x.dtype)
            scale = uniform((b, c, 1, 1), -1.0, 1.0, generator, x.device, x.dtype).exp()
            out = (out - shift) / scale
        return out


# --------------------------------------------------------------------------------------- QAT
