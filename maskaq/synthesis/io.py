"""Writing synthetic sets: tensors (safetensors), a PNG grid, JSON — atomically, rank 0 only."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np
import torch

from maskaq._files import _json_default, atomic_write_bytes, write_json

__all__ = ["atomic_write_bytes", "write_json", "save_image_grid", "save_synthetic_set", "load_synthetic_set"]




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


def save_synthetic_set(synthetic, path, metadata: Optional[Dict] = None) -> Path:
    """images + labels as safetensors (metadata: string values)."""
    from safetensors.torch import save
    meta = {k: json.dumps(v, default=_json_default) for k, v in (metadata or {}).items()}
    data = save({"images": synthetic.images.contiguous().cpu(), "labels": synthetic.labels.contiguous().cpu()},
                metadata=meta)
    return atomic_write_bytes(path, data)


def load_synthetic_set(path):
    from safetensors.torch import load_file
    from maskaq.synthesis.synthesizer import SyntheticSet
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"synthetic set {path} does not exist")
    tensors = load_file(str(path))
    return SyntheticSet(tensors["images"], tensors["labels"], {})
