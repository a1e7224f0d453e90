"""QAT's augmentation of synthetic images, batched and driven by an explicit torch.Generator:
random resized crop, horizontal flip, colour jitter in pixel space, random grayscale, Gaussian
blur, every image drawn on its own (docs/method.md#qat)."""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F

from maskaq.runtime import uniform

__all__ = ["QATAugment"]


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
        area = uniform((b,), *self.crop_scale, g, dev)
        log_r = uniform((b,), math.log(self.crop_ratio[0]), math.log(self.crop_ratio[1]), g, dev)
        ratio = log_r.exp()
        cw = torch.sqrt(area * ratio).clamp(max=1.0)  # crop size as a fraction of the image
        ch = torch.sqrt(area / ratio).clamp(max=1.0)
        cx = uniform((b,), 0.0, 1.0, g, dev) * (1 - cw)  # left edge as a fraction
        cy = uniform((b,), 0.0, 1.0, g, dev) * (1 - ch)
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
            out = out * uniform((b, 1, 1, 1), max(0.0, 1 - bri), 1 + bri, g, dev)
            out = out.clamp(0, 1)
        if con > 0:
            f = uniform((b, 1, 1, 1), max(0.0, 1 - con), 1 + con, g, dev)
            m = _grayscale(out).mean(dim=(1, 2, 3), keepdim=True)
            out = (m + f * (out - m)).clamp(0, 1)
        if sat > 0 and c == 3:
            f = uniform((b, 1, 1, 1), max(0.0, 1 - sat), 1 + sat, g, dev)
            gray = _grayscale(out)
            out = (gray + f * (out - gray)).clamp(0, 1)
        if hue > 0 and c == 3:
            out = _rotate_hue(out, uniform((b,), -hue, hue, g, dev)).clamp(0, 1)
        return apply * out + (1 - apply) * p

    def _blur(self, x, g):
        b, c, h, w = x.shape
        radius = int(0.1 * min(h, w)) // 2
        if radius < 1:
            return x
        sig = uniform((b,), 0.1, 2.0, g, x.device)
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
