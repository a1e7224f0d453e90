"""LayerNorm -> Linear pairs, and the reparameterization that narrows their outlier channels.

A pretrained ViT's post-LayerNorm activations have a few channels many times wider than the rest
(docs/method.md#a-realistic-teacher), and one per-tensor grid over them leaves the other channels a
level or two at 4 bits. ``equalize_layernorm_channels`` measures each channel's range on a few images
and, for every channel wider than ``max_ratio`` times the median, divides it (LayerNorm gain and bias)
by r = width / (max_ratio·median) after moving its centre onto the median centre, and folds both into
the next Linear (columns times r, the shift into its bias). The model computes the same function and
its per-tensor quantizers see channels of similar width: RepQ-ViT's scale reparameterization, folded
into the float weights before quantization, so the integer export stays per tensor.
"""
from __future__ import annotations

import copy
from typing import Dict, List, Tuple

import torch
from torch import nn

__all__ = ["layernorm_linear_pairs", "equalize_layernorm_channels"]


def layernorm_linear_pairs(model: nn.Module) -> List[Tuple[str, nn.LayerNorm, List[nn.Linear]]]:
    """(name, LayerNorm, the Linears that read its output) wherever a LayerNorm's output is a Linear's
    input, up to a channel-wise pooling: norm1 -> attn.qkv and norm2 -> mlp.fc1 in every pre-norm block
    (ViT, DeiT, Swin), Swin's patch merging norm -> reduction, and the final norm -> the classifier
    head(s) (DeiT distilled: head and head_dist)."""
    from timm.models import swin_transformer as swin
    from timm.models import vision_transformer as vit

    pairs = []
    for name, m in model.named_modules():
        if type(m) in (vit.Block, swin.SwinTransformerBlock):
            pairs.append((f"{name}.norm1", m.norm1, [m.attn.qkv]))
            if isinstance(getattr(m.mlp, "fc1", None), nn.Linear):
                pairs.append((f"{name}.norm2", m.norm2, [m.mlp.fc1]))
        elif type(m) is swin.PatchMerging:
            pairs.append((f"{name}.norm", m.norm, [m.reduction]))
    if isinstance(model, vit.VisionTransformer) and isinstance(model.head, nn.Linear):
        heads = [model.head] + ([model.head_dist] if isinstance(getattr(model, "head_dist", None), nn.Linear) else [])
        if model.global_pool in ("token", "avg", ""):
            norm = model.norm if isinstance(model.fc_norm, nn.Identity) else model.fc_norm
            pairs.append(("norm" if norm is model.norm else "fc_norm", norm, heads))
    elif isinstance(model, swin.SwinTransformer) and isinstance(getattr(model.head, "fc", None), nn.Linear):
        pairs.append(("norm", model.norm, [model.head.fc]))
    return [(n, norm, lins) for n, norm, lins in pairs
            if isinstance(norm, nn.LayerNorm) and norm.elementwise_affine and norm.bias is not None
            and all(isinstance(lin, nn.Linear) and lin.in_features == norm.weight.numel() for lin in lins)]


def _pads_after_norm(model: nn.Module, name: str) -> bool:
    """Whether zeros may join the LayerNorm's output before its Linear: a Swin block pads its window
    attention's input to a multiple of the window (timm 1.0.29 lets the padded tokens into the
    attention unmasked), and a scaled zero stays zero where a shifted one would not."""
    from timm.models import swin_transformer as swin

    block, _, attr = name.rpartition(".")
    return attr == "norm1" and isinstance(model.get_submodule(block) if block else model, swin.SwinTransformerBlock)


@torch.no_grad()
def channel_ranges(model: nn.Module, images: torch.Tensor, pairs) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """{pair name: (per-channel min, per-channel max)} of each LayerNorm's output on ``images``."""
    seen: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(name):
        def record(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            x = x if x.dtype == torch.float64 else x.float()
            lo, hi = x.amin(0), x.amax(0)
            if name in seen:  # a module called more than once (never in timm's models, but be safe)
                lo, hi = torch.minimum(lo, seen[name][0]), torch.maximum(hi, seen[name][1])
            seen[name] = (lo, hi)
        return record
    handles = [lins[0].register_forward_pre_hook(hook(name)) for name, _, lins in pairs]
    try:
        model.eval()(images)
    finally:
        for h in handles:
            h.remove()
    return seen


@torch.no_grad()
def equalize_layernorm_channels(model: nn.Module, images: torch.Tensor, max_ratio: float = 2.0,
                                inplace: bool = False) -> nn.Module:
    """Narrow every post-LayerNorm channel wider than ``max_ratio`` times its LayerNorm's median channel
    range (measured on ``images``), keeping the model's function (see the module docstring).

    Returns the model (a deep copy unless ``inplace``); ``model.maskaq_equalized`` says how many
    channels of how many LayerNorms were narrowed.
    """
    if not max_ratio >= 1:
        raise ValueError(f"max_ratio must be >= 1, got {max_ratio!r}")
    if not inplace:
        model = copy.deepcopy(model)
    pairs = layernorm_linear_pairs(model)
    ranges = channel_ranges(model, images, pairs)
    narrowed = 0
    for name, norm, linears in pairs:
        if name not in ranges:
            continue
        lo, hi = (t.to(norm.weight.device) for t in ranges[name])
        width, centre = hi - lo, (hi + lo) / 2
        limit = max_ratio * width.median()
        if not bool(torch.isfinite(width).all()) or not limit > 0:
            continue  # most channels constant (zero-width) or a non-finite range: nothing to compare with
        wide = width > limit
        if not bool(wide.any()):
            continue
        r = torch.where(wide, width / limit, torch.ones_like(width))
        shift = torch.where(wide, centre - centre.median(), torch.zeros_like(centre))
        if any(linear.bias is None for linear in linears) or _pads_after_norm(model, name):
            # nowhere to fold it (the state dict keeps its keys), or zeros padded in after the norm
            # would move with it: scale only
            shift = torch.zeros_like(shift)
        for linear in linears:  # W·x = (W·diag(r))·((x − shift)/r) + W·shift
            if linear.bias is not None:
                linear.bias += linear.weight @ shift.to(linear.weight.dtype)
            linear.weight *= r.to(linear.weight.dtype)
        norm.weight /= r
        norm.bias -= shift
        norm.bias /= r
        narrowed += int(wide.sum())
    model.maskaq_equalized = {"channels": narrowed, "layernorms": len(pairs), "max_ratio": float(max_ratio)}
    return model
