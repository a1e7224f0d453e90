"""Augmentations, batched and driven by an explicit torch.Generator so that results repeat.

- `SynthesisAugment`: what MaskAQ applies to the optimized batch at every synthesis step
  (random roll, decaying per-sample per-channel offset, colour jitter).
- `QATAugment`: what QAT applies to synthetic images (random resized crop, horizontal flip,
  colour jitter in pixel space, random grayscale, Gaussian blur), every image drawn on its own.

Pixel sizes are given at 224 px with patch 16 in METHOD.md. MaskAQ's roll is a share of a patch
(half a patch, then one), so `patch_scaled_pixels` scales it with the patch size; PSAQ's
jitter scales with the image size (`scaled_pixels`).
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F

__all__ = ["scaled_pixels", "patch_scaled_pixels", "random_roll", "SynthesisAugment", "QATAugment"]


def scaled_pixels(pixels_at_224: float, image_size: int) -> int:
    """A pixel distance given at 224 px, at `image_size` px (at least 1)."""
    return max(1, int(round(pixels_at_224 * image_size / 224.0)))


def patch_scaled_pixels(pixels_at_patch16: float, patch_size: int) -> int:
    """A pixel distance given for patch 16 (e.g. 8 px = half a patch), for `patch_size` (0 stays 0)."""
    if pixels_at_patch16 <= 0:
        return 0
    return max(1, int(round(pixels_at_patch16 * patch_size / 16.0)))


def _uniform(shape, low, high, generator, device, dtype=torch.float32):
    return torch.rand(shape, generator=generator, device=device, dtype=dtype) * (high - low) + low


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
            shift = _uniform((b, c, 1, 1), -1.0, 1.0, generator, x.device, x.dtype)
            scale = _uniform((b, c, 1, 1), -1.0, 1.0, generator, x.device, x.dtype).exp()
            out = (out - shift) / scale
        return out


# --------------------------------------------------------------------------------------- QAT
def _gaussian_kernels(sigmas: torch.Tensor, radius: int) -> torch.Tensor:
    t = torch.arange(-radius, radius + 1, device=sigmas.device, dtype=sigmas.dtype)
    k = torch.exp(-(t[None, :] ** 2) / (2 * sigmas[:, None] ** 2))
    return k / k.sum(dim=1, keepdim=True)  # (B, 2r+1)


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 3:
        w = torch.tensor([0.299, 0.587, 0.114], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return (x * w).sum(dim=1, keepdim=True).expand_as(x)
    return x.mean(dim=1, keepdim=True).expand_as(x)


def _rotate_hue(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Hue shift of RGB images as a rotation of the chroma plane of YIQ (angle in turns)."""
    yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
                       device=x.device, dtype=x.dtype)
    rgb = torch.linalg.inv(yiq)
    theta = angle * 2 * math.pi
    cos, sin = theta.cos(), theta.sin()
    b = x.shape[0]
    rot = torch.zeros(b, 3, 3, device=x.device, dtype=x.dtype)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
    m = rgb.unsqueeze(0) @ rot @ yiq.unsqueeze(0)  # (B, 3, 3)
    return torch.einsum("bij,bjhw->bihw", m, x)


class QATAugment:
    """The synthetic-image augmentations of QAT, per image, on normalized tensors.

    Random resized crop (scale 0.08–1, ratio 3/4–4/3) back to the input size, horizontal flip
    p 0.5, colour jitter (brightness, contrast, saturation 0.8, hue 0.2) with p 0.8 in pixel
    space, grayscale p 0.2, Gaussian blur with a kernel of ≈10% of the image (σ ∈ [0.1, 2]).
    Brightness, contrast and saturation are applied in a fixed order; hue only for 3 channels.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], *, crop: bool = True, flip: bool = True,
                 jitter: Tuple[float, float, float, float] = (0.8, 0.8, 0.8, 0.2), jitter_p: float = 0.8,
                 grayscale_p: float = 0.2, blur: bool = True, crop_scale=(0.08, 1.0),
                 crop_ratio=(3 / 4, 4 / 3)):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.crop, self.flip, self.blur = crop, flip, blur
        self.jitter, self.jitter_p, self.grayscale_p = jitter, jitter_p, grayscale_p
        self.crop_scale, self.crop_ratio = crop_scale, crop_ratio

    def _random_resized_crop(self, x, g):
        b, _, h, w = x.shape
        dev = x.device
        area = _uniform((b,), *self.crop_scale, g, dev)
        log_r = _uniform((b,), math.log(self.crop_ratio[0]), math.log(self.crop_ratio[1]), g, dev)
        ratio = log_r.exp()
        cw = torch.sqrt(area * ratio).clamp(max=1.0)  # crop size as a fraction of the image
        ch = torch.sqrt(area / ratio).clamp(max=1.0)
        cx = _uniform((b,), 0.0, 1.0, g, dev) * (1 - cw)  # left edge as a fraction
        cy = _uniform((b,), 0.0, 1.0, g, dev) * (1 - ch)
        theta = torch.zeros(b, 2, 3, device=dev, dtype=x.dtype)
        theta[:, 0, 0], theta[:, 1, 1] = cw, ch
        theta[:, 0, 2] = 2 * cx + cw - 1
        theta[:, 1, 2] = 2 * cy + ch - 1
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def _color_jitter(self, p, g):
        b, c = p.shape[:2]
        dev = p.device
        bri, con, sat, hue = self.jitter
        apply = (torch.rand((b, 1, 1, 1), generator=g, device=dev) < self.jitter_p).to(p.dtype)
        out = p
        if bri > 0:
            out = out * _uniform((b, 1, 1, 1), max(0.0, 1 - bri), 1 + bri, g, dev)
            out = out.clamp(0, 1)
        if con > 0:
            f = _uniform((b, 1, 1, 1), max(0.0, 1 - con), 1 + con, g, dev)
            m = _grayscale(out).mean(dim=(1, 2, 3), keepdim=True)
            out = (m + f * (out - m)).clamp(0, 1)
        if sat > 0 and c == 3:
            f = _uniform((b, 1, 1, 1), max(0.0, 1 - sat), 1 + sat, g, dev)
            gray = _grayscale(out)
            out = (gray + f * (out - gray)).clamp(0, 1)
        if hue > 0 and c == 3:
            out = _rotate_hue(out, _uniform((b,), -hue, hue, g, dev)).clamp(0, 1)
        return apply * out + (1 - apply) * p

    def _blur(self, x, g):
        b, c, h, w = x.shape
        radius = int(0.1 * min(h, w)) // 2
        if radius < 1:
            return x
        sig = _uniform((b,), 0.1, 2.0, g, x.device)
        k = _gaussian_kernels(sig, radius).to(x.dtype)  # (B, K)
        k = k.repeat_interleave(c, dim=0)  # one kernel per (image, channel)
        flat = x.reshape(1, b * c, h, w)
        flat = F.pad(flat, (radius, radius, radius, radius), mode="reflect")
        flat = F.conv2d(flat, k.view(b * c, 1, -1, 1), groups=b * c)
        flat = F.conv2d(flat, k.view(b * c, 1, 1, -1), groups=b * c)
        return flat.view(b, c, h, w)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        g = generator
        mean, std = self.mean.to(x.device, x.dtype), self.std.to(x.device, x.dtype)
        if self.crop:
            x = self._random_resized_crop(x, g)
        if self.flip:
            flip = torch.rand((x.shape[0], 1, 1, 1), generator=g, device=x.device) < 0.5
            x = torch.where(flip, x.flip(3), x)
        pixels = x * std + mean
        if self.jitter_p > 0 and any(v > 0 for v in self.jitter):
            pixels = self._color_jitter(pixels, g)
        if self.grayscale_p > 0:
            gray = torch.rand((x.shape[0], 1, 1, 1), generator=g, device=x.device) < self.grayscale_p
            pixels = torch.where(gray, _grayscale(pixels), pixels)
        x = (pixels - mean) / std
        if self.blur:
            x = self._blur(x, g)
        return x
