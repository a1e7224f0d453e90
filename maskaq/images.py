"""Image sets as the pipeline hands them from an image source to QAT, and a PNG preview of them.

SyntheticSet lives outside maskaq.synthesis because real and Gaussian images travel in it too, and
the trainer that consumes it should not depend on the code that makes the images.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

import numpy as np
import torch

from maskaq._files import atomic_write_bytes

__all__ = ["SyntheticSet", "save_image_grid"]


@dataclass
class SyntheticSet:
    """Images (N, C, H, W) normalized like the model's input, labels (N,), and a report.

    `draw`, when set, makes the set an endless stream: QAT asks it for fresh images for every
    training batch, `draw(batch_size, step) -> images`, and `images` is only the set's first
    draw (what calibration and previews see, and what sizes an epoch).
    """
    images: torch.Tensor
    labels: torch.Tensor
    report: Dict = field(default_factory=dict)
    draw: Optional[Callable[[int, int], torch.Tensor]] = None

    def __len__(self) -> int:
        return int(self.images.shape[0])


def save_image_grid(images: torch.Tensor, mean: Sequence[float], std: Sequence[float], path,
                    nrow: Optional[int] = None, max_images: int = 64, scale: int = 0) -> Path:
    """A PNG grid of normalized images (denormalized with mean/std, clipped to [0, 1]).

    `scale` enlarges small images (nearest neighbour); 0 picks one so tiles are ≥ 64 px.
    """
    from PIL import Image

    x = images[:max_images].detach().float().cpu()
    if x.dim() != 4 or x.shape[0] == 0:
        raise ValueError(f"save_image_grid needs images (B, C, H, W) with B > 0, got {tuple(x.shape)}")
    c = x.shape[1]
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    x = (x * s + m).clamp(0, 1)
    b, _, h, w = x.shape
    if scale <= 0:
        scale = max(1, math.ceil(64 / max(h, w)))
    if scale > 1:
        x = x.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
        h, w = h * scale, w * scale
    nrow = nrow or int(math.ceil(math.sqrt(b)))
    rows = int(math.ceil(b / nrow))
    pad = 2
    grid = torch.ones(c, rows * (h + pad) + pad, nrow * (w + pad) + pad)
    for i in range(b):
        r, col = divmod(i, nrow)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = x[i]
    arr = (grid.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    image = Image.fromarray(arr[:, :, 0] if c == 1 else arr[:, :, :3], mode="L" if c == 1 else "RGB")
    import io
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())
