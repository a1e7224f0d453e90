"""What every layer needs to know about a model (input shape, normalization, patch size, tokens, heads),
read from the model itself (never constants): `describe_model(model) -> ModelSpec`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch
from torch import nn

__all__ = ["ModelSpec", "describe_model"]


@dataclass(frozen=True)
class ModelSpec:
    in_chans: int
    image_size: Tuple[int, int]
    num_classes: int
    num_prefix_tokens: int  # leading tokens before the patches (CLS, dist, registers); 0 for Swin
    has_class_token: bool
    is_swin: bool
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    patch_size: Tuple[int, int] = (16, 16)

    @property
    def pixel_min(self) -> torch.Tensor:
        """(C,) lower bound of the normalized pixel range, (0 − μ)/σ."""
        return torch.tensor([-m / s for m, s in zip(self.mean, self.std)])

    @property
    def pixel_max(self) -> torch.Tensor:
        """(C,) upper bound of the normalized pixel range, (1 − μ)/σ."""
        return torch.tensor([(1 - m) / s for m, s in zip(self.mean, self.std)])

    def image_shape(self, batch: int) -> Tuple[int, int, int, int]:
        return (batch, self.in_chans, *self.image_size)


def _pair(v) -> Tuple[int, int]:
    if isinstance(v, (tuple, list)):
        return int(v[0]), int(v[-1])
    return int(v), int(v)


def _is_swin(model: nn.Module) -> bool:
    try:
        from timm.models.swin_transformer import WindowAttention
    except ImportError:  # pragma: no cover - timm always has Swin
        return False
    return any(isinstance(m, WindowAttention) or type(m).__name__ == "QuantWindowAttention"
               for m in model.modules())


def describe_model(model: nn.Module) -> ModelSpec:
    """Channels, image and patch size, classes, prefix tokens and normalization of a timm ViT/DeiT/Swin."""
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is None:
        raise TypeError(f"{type(model).__name__} has no patch_embed: maskaq supports timm "
                        "VisionTransformer / DeiT / Swin models")
    proj = getattr(patch_embed, "proj", None)
    in_chans = int(proj.in_channels) if proj is not None and hasattr(proj, "in_channels") else None
    cfg = dict(getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {})
    input_size = cfg.get("input_size")
    if getattr(patch_embed, "img_size", None) is not None:
        image_size = _pair(patch_embed.img_size)
    elif input_size is not None:
        image_size = _pair(input_size[1:])
    else:
        raise ValueError("cannot tell the model's input size: set model.pretrained_cfg['input_size']")
    if in_chans is None:
        in_chans = int(input_size[0]) if input_size is not None else 3
    num_classes = int(getattr(model, "num_classes", 0) or 0)
    if num_classes <= 0:
        raise ValueError("the model has no classifier head (num_classes == 0); synthesis needs class logits")
    swin = _is_swin(model)
    prefix = 0 if swin else int(getattr(model, "num_prefix_tokens", 1))
    has_cls = (not swin) and getattr(model, "cls_token", None) is not None
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    mean = tuple(float(m) for m in cfg.get("mean", IMAGENET_DEFAULT_MEAN))
    std = tuple(float(s) for s in cfg.get("std", IMAGENET_DEFAULT_STD))
    if len(mean) != in_chans:
        if len(mean) == 1:
            mean, std = mean * in_chans, std * in_chans
        elif in_chans == 1:
            mean, std = (sum(mean) / len(mean),), (sum(std) / len(std),)
        else:
            raise ValueError(f"pretrained_cfg mean has {len(mean)} entries for {in_chans} input channels")
    patch = getattr(patch_embed, "patch_size", None)
    if patch is None and proj is not None and hasattr(proj, "kernel_size"):
        patch = proj.kernel_size
    return ModelSpec(in_chans=in_chans, image_size=image_size, num_classes=num_classes,
                     num_prefix_tokens=prefix, has_class_token=has_cls, is_swin=swin, mean=mean, std=std,
                     patch_size=_pair(patch) if patch is not None else (16, 16))
