"""Channel outliers like a pretrained ViT's, added to any timm ViT/DeiT/Swin without changing its function.

Pretrained ViTs are hard to quantize per tensor because a few channels of every post-LayerNorm
activation (the inputs of qkv, fc1 and the head) are many times wider than the rest, in the same
channels from block to block (docs/method.md#a-realistic-teacher). A model trained briefly on a
small dataset, like the bundled teacher, has none of that, so it cannot tell good calibration data
from bad. ``add_channel_outliers`` gives a model those outliers by a function-preserving transform:
for a LayerNorm whose output feeds a Linear directly, the chosen channels' gain and bias are
multiplied by s and the Linear's matching input columns divided by s. The float model computes the
same function (up to float rounding); a per-tensor activation quantizer of the Linear's input sees a
range s times wider. maskaq.quant.reparam.equalize_layernorm_channels (RepQ-ViT's scale
reparameterization) is its inverse, measured on images.

``activation_statistics`` measures what the transform changes (and what it cannot: the softmax
distribution and the residual stream are untouched) on a batch of images.
"""
from __future__ import annotations

import math
from typing import Dict, List

import torch
from torch import nn

from maskaq.quant.reparam import layernorm_linear_pairs

__all__ = ["add_channel_outliers", "activation_statistics", "DEFAULT_RATIO", "DEFAULT_FRACTION"]

# The chosen channels' LayerNorm gain becomes this many times the median |gain| of their LayerNorm.
DEFAULT_RATIO = 8.0
# The share of a LayerNorm's channels made outliers (at least one).
DEFAULT_FRACTION = 0.02
# The largest factor one channel is multiplied by (a gain near zero would otherwise ask for ~inf).
MAX_SCALE_OVER_RATIO = 8.0


@torch.no_grad()
def add_channel_outliers(model: nn.Module, ratio: float = DEFAULT_RATIO, fraction: float = DEFAULT_FRACTION,
                         seed: int = 0, inplace: bool = False) -> nn.Module:
    """Make a few channels of every post-LayerNorm activation ``ratio`` times wider, keeping the
    model's function (imitates a pretrained ViT's inter-channel variation; see the module docstring).

    ``fraction`` of each LayerNorm's channels (at least one) are chosen once, by ``seed``, and are the
    same in every LayerNorm of that width, as the outlier channels of real ViTs are. Their gain and
    bias are scaled by s = ratio·median|gain| / |gain_c| (at least 1: a channel is never narrowed),
    the next Linear's input columns by 1/s. Returns the model (a deep copy unless ``inplace``); its
    ``pretrained_cfg`` records the transform under ``channel_outliers``.
    """
    if not (isinstance(ratio, (int, float)) and math.isfinite(ratio) and ratio >= 1):
        raise ValueError(f"ratio must be a finite number >= 1, got {ratio!r}")
    if not (isinstance(fraction, (int, float)) and 0 < fraction <= 1):
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    if not inplace:
        import copy
        model = copy.deepcopy(model)
    pairs = layernorm_linear_pairs(model)
    if not pairs:
        raise ValueError(f"{type(model).__name__} has no LayerNorm feeding a Linear that add_channel_outliers "
                         "knows (timm VisionTransformer, DeiT and SwinTransformer blocks)")
    chosen: Dict[int, torch.Tensor] = {}
    for _, norm, linears in pairs:
        width = norm.weight.numel()
        if width not in chosen:
            g = torch.Generator().manual_seed(int(seed) * 1009 + width)
            count = max(1, round(fraction * width))
            chosen[width] = torch.randperm(width, generator=g)[:count].sort().values
        idx = chosen[width].to(norm.weight.device)
        gain = norm.weight.abs()
        target = ratio * gain.median()
        scale = (target / gain[idx].clamp_min(target / (ratio * MAX_SCALE_OVER_RATIO))).clamp_min(1.0)
        norm.weight[idx] *= scale
        norm.bias[idx] *= scale
        for linear in linears:
            linear.weight[:, idx] /= scale.to(linear.weight.dtype)
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    cfg["channel_outliers"] = {"ratio": float(ratio), "fraction": float(fraction), "seed": int(seed),
                               "channels": {str(w): idx.tolist() for w, idx in chosen.items()}}
    model.pretrained_cfg = cfg
    model.default_cfg = cfg
    return model


@torch.no_grad()
def activation_statistics(model: nn.Module, images: torch.Tensor) -> Dict[str, float]:
    """What a per-tensor quantizer of ``model`` faces on ``images`` (a batch, model-normalized).

    Post-LayerNorm inputs of every pair of ``maskaq.quant.reparam.layernorm_linear_pairs``, each channel's range
    (max - min over images and tokens): ``channel_range_ratio`` the widest over the median channel
    (median over the pairs, and ``..._max`` the largest), ``outlier_channels`` the mean count of
    channels wider than 5x the median, ``absmax_over_median`` max|x| over the median |x|.
    Softmax outputs P of every attention (timm's fused or eager attention), N keys:
    ``p_below_1_over_n`` the share of P under 1/N (uniform attention), ``p_max`` the mean of each
    row's largest probability, ``p_top5pct_mass`` the mass of a row's top 5 % of keys. Residual
    stream (the input of every block, which its first LayerNorm reads): ``residual_absmax_over_median``
    and ``ln_input_channel_range_ratio`` (widest over median channel range, median over blocks).
    Swin's softmax statistics leave out its relative position bias.
    """
    from maskaq.quant.capture import capture_attention

    model = model.eval()
    pairs = layernorm_linear_pairs(model)
    inputs: Dict[str, torch.Tensor] = {}
    handles = [lins[0].register_forward_pre_hook(lambda mod, args, name=name: inputs.__setitem__(name, args[0].detach()))
               for name, _, lins in pairs]
    blocks_in: List[torch.Tensor] = []
    blocks = [m for m in model.modules() if hasattr(m, "norm1") and hasattr(m, "attn")]
    handles += [b.register_forward_pre_hook(lambda mod, args: blocks_in.append(args[0].detach())) for b in blocks]
    try:
        with capture_attention(model, logits=True, outputs=False) as cap:
            model(images)
    finally:
        for h in handles:
            h.remove()
    ratios, counts, absmax = [], [], []
    for x in inputs.values():
        ranges, med = _channel_widths(x)
        ratios.append(float(ranges.max() / med))
        counts.append(float((ranges > 5 * med).sum()))
        absmax.append(_absmax_over_median(x))
    below, pmax, top = [], [], []
    for logits, scale in zip(cap.logits, _attention_scales(model)):
        p = torch.softmax(logits.float() * scale, dim=-1)
        n = p.shape[-1]
        below.append(float((p < 1.0 / n).float().mean()))
        pmax.append(float(p.amax(-1).mean()))
        k = max(1, round(0.05 * n))
        top.append(float(p.topk(k, dim=-1).values.sum(-1).mean()))
    resid = [_absmax_over_median(r) for r in blocks_in]
    ln_in = [float(ranges.max() / med) for ranges, med in map(_channel_widths, blocks_in)]

    def median(values):
        return float(torch.tensor(values).median()) if values else float("nan")

    return {
        "channel_range_ratio": median(ratios), "channel_range_ratio_max": max(ratios, default=float("nan")),
        "outlier_channels": sum(counts) / max(len(counts), 1), "absmax_over_median": median(absmax),
        "p_below_1_over_n": median(below), "p_max": median(pmax), "p_top5pct_mass": median(top),
        "residual_absmax_over_median": median(resid), "ln_input_channel_range_ratio": median(ln_in),
    }


def _channel_widths(x: torch.Tensor):
    """(each channel's max - min over all images and tokens, their median (at least 1e-12))."""
    flat = x.reshape(-1, x.shape[-1]).float()
    ranges = flat.amax(0) - flat.amin(0)
    return ranges, ranges.median().clamp_min(1e-12)


def _absmax_over_median(x: torch.Tensor) -> float:
    return float(x.abs().max() / x.abs().float().median().clamp_min(1e-12))


def _attention_scales(model: nn.Module) -> List[float]:
    """The logit scale of every attention module, in forward order (capture_attention's order)."""
    from timm.layers.attention import Attention
    from timm.models import swin_transformer as swin

    return [float(m.scale) for m in model.modules() if type(m) in (Attention, swin.WindowAttention)]
