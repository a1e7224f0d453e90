"""Conversion of a timm ViT / DeiT / Swin into a fake-quant student, and its calibration.

Policy (docs/method.md#the-quantizer): every Linear (qkv, proj, fc1, fc2, head, Swin's patch
merging) and the patch-embedding Conv2d get fake-quant weights and inputs; both attention products
quantize both operands. The patch-embedding input is the image and stays full precision. With
``first_last_8bit=True`` the patch embedding's weights and the classifier head(s) (weights and
input) use 8 bits whatever ``wbits`` / ``abits`` are.
"""
from __future__ import annotations

import copy
from typing import Callable, Iterable, Optional, Union

import torch
from torch import nn

from maskaq.quant.modules import QuantAttention, QuantConv2d, QuantLinear, QuantWindowAttention
from maskaq.quant.quantizers import WEIGHT_METHODS, LsqActQuantizer, WeightQuantizer, check_bits

__all__ = ["quantize_model", "calibrate", "is_quantized", "quant_config", "activation_quantizers",
           "check_calibrated_student", "NotAStudentError", "CALIBRATION_INITS"]

# Activation-step inits calibrate() offers: LSQ's (docs/method.md#the-quantizer), min-max, the
# clipped min-max range of least squared error, and the LSQ / least-error inits with min-max for the
# softmax outputs P only (clipping P's peaks costs more than its rounding saves).
CALIBRATION_INITS = ("minmax", "lsq", "lsq_pminmax", "mse", "mse_pminmax")

QUANT_MODULES = (QuantLinear, QuantConv2d, QuantAttention, QuantWindowAttention, LsqActQuantizer, WeightQuantizer)


def _supported_types():
    """(exact types, isinstance types) that may appear inside a model quantize_model converts.

    Blocks and attention are matched by exact type: a subclass may compute attention its own way
    (timm's ParallelScalingBlock, EvaAttention, ...), which this conversion would get wrong.
    """
    from timm.layers import Mlp, PatchDropout, PatchEmbed
    from timm.layers.adaptive_avgmax_pool import FastAdaptiveAvgPool, SelectAdaptivePool2d
    from timm.layers.attention import Attention
    from timm.layers.classifier import ClassifierHead
    from timm.layers.drop import DropPath
    from timm.layers.layer_scale import LayerScale as LayersLayerScale
    from timm.models import swin_transformer as swin
    from timm.models import vision_transformer as vit

    exact = {
        Attention, swin.WindowAttention, vit.Block, vit.ResPostBlock, PatchEmbed, Mlp,
        swin.SwinTransformerStage, swin.SwinTransformerBlock, swin.PatchMerging,
        ClassifierHead, SelectAdaptivePool2d, FastAdaptiveAvgPool, DropPath,
        LayersLayerScale, PatchDropout,
        nn.Linear, nn.Conv2d, nn.Sequential, nn.ModuleList, nn.Identity, nn.Flatten,
    }
    instances = (
        vit.VisionTransformer, swin.SwinTransformer,  # roots (DeiT distilled subclasses ViT)
        nn.LayerNorm, nn.GroupNorm, getattr(nn, "RMSNorm", nn.LayerNorm),
        nn.Dropout, nn.GELU, nn.ReLU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Softmax, nn.Hardswish,
        nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    )
    return exact, instances


def _check_supported(model: nn.Module) -> None:
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_model needs an nn.Module, got {type(model).__name__}")
    if any(isinstance(m, QUANT_MODULES) for m in model.modules()):
        raise ValueError("this model is already quantized; pass the full-precision model to quantize_model")
    if not isinstance(model, (VisionTransformer, SwinTransformer)):
        raise ValueError(
            f"unsupported model type {type(model).__name__}: quantize_model converts timm "
            "VisionTransformer (ViT, DeiT, DeiT distilled, register tokens) and SwinTransformer models"
        )
    exact, instances = _supported_types()
    bad = [(name, type(m)) for name, m in model.named_modules()
           if type(m) not in exact and not isinstance(m, instances)]
    if bad:
        name, cls = bad[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise ValueError(
            f"unsupported module {cls.__module__}.{cls.__qualname__} at '{name or '<root>'}'{more} in "
            f"{type(model).__name__}: quantize_model knows timm's standard ViT/DeiT/Swin layers only "
            "(Attention, WindowAttention, Mlp, Linear, Conv2d, norms, activations)"
        )


def _classifier_names(model: nn.Module) -> set[str]:
    heads = model.get_classifier() if hasattr(model, "get_classifier") else ()
    heads = heads if isinstance(heads, (tuple, list)) else (heads,)
    ids = {id(h) for h in heads if isinstance(h, nn.Linear)}
    return {name for name, m in model.named_modules() if id(m) in ids}


def _patch_embed_names(model: nn.Module) -> set[str]:
    return {name for name, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and name.startswith("patch_embed")}


def _replace(module: nn.Module, prefix: str, plan: dict) -> None:
    from timm.layers.attention import Attention
    from timm.models.swin_transformer import WindowAttention

    wbits, abits, method = plan["wbits"], plan["abits"], plan["weight_method"]
    for name, child in list(module.named_children()):
        full = f"{prefix}{name}"
        if type(child) is Attention:
            new = QuantAttention(child, wbits, abits, method)
        elif type(child) is WindowAttention:
            new = QuantWindowAttention(child, wbits, abits, method)
        elif type(child) is nn.Linear:
            if full in plan["heads"]:
                new = QuantLinear.from_float(child, plan["head_wbits"], plan["head_abits"], method)
            else:
                new = QuantLinear.from_float(child, wbits, abits, method)
        elif type(child) is nn.Conv2d:
            if full in plan["patch_embed"]:
                # The image enters here: it stays full precision (abits=None).
                new = QuantConv2d(child, plan["embed_wbits"], None, method)
            else:
                new = QuantConv2d(child, wbits, abits, method)
        else:
            _replace(child, full + ".", plan)
            continue
        setattr(module, name, new)


def quantize_model(model: nn.Module, wbits: int, abits: int, *, first_last_8bit: bool = False,
                   weight_method: str = "minmax") -> nn.Module:
    """A fake-quant deep copy of a timm ViT/DeiT/Swin (the input model is left untouched).

    wbits / abits: integers 2..8 for weights / activations. ``first_last_8bit`` keeps the patch
    embedding weights and the classifier head(s) at 8 bits. ``weight_method``: "minmax"
    (per-channel symmetric, docs/method.md#the-quantizer) or "lsq" (learnable per-channel step).
    The student's activation quantizers must be initialized with ``calibrate`` before use.
    All student parameters require grad (ready for QAT) even if the teacher was frozen.
    """
    wbits = check_bits(wbits, "wbits")
    abits = check_bits(abits, "abits")
    if weight_method not in WEIGHT_METHODS:
        raise ValueError(f"weight_method must be one of {WEIGHT_METHODS}, got {weight_method!r}")
    if not isinstance(first_last_8bit, bool):
        raise ValueError(f"first_last_8bit must be True or False, got {first_last_8bit!r}")
    _check_supported(model)
    plan = {
        "wbits": wbits, "abits": abits, "weight_method": weight_method,
        "heads": _classifier_names(model), "patch_embed": _patch_embed_names(model),
        "head_wbits": 8 if first_last_8bit else wbits, "head_abits": 8 if first_last_8bit else abits,
        "embed_wbits": 8 if first_last_8bit else wbits,
    }
    qmodel = copy.deepcopy(model)
    _replace(qmodel, "", plan)
    qmodel.requires_grad_(True)
    qmodel.maskaq_quant = {"wbits": wbits, "abits": abits, "first_last_8bit": first_last_8bit,
                           "weight_method": weight_method}
    return qmodel


def is_quantized(model: nn.Module) -> bool:
    return hasattr(model, "maskaq_quant") and any(isinstance(m, LsqActQuantizer) for m in model.modules())


def quant_config(model: nn.Module) -> dict:
    """{'wbits', 'abits', 'first_last_8bit', 'weight_method'} of a model made by quantize_model."""
    config = getattr(model, "maskaq_quant", None)
    if config is None:
        raise ValueError(f"{type(model).__name__} is not a maskaq quantized model (made by quantize_model)")
    return dict(config)


def activation_quantizers(model: nn.Module) -> list[LsqActQuantizer]:
    return [m for m in model.modules() if isinstance(m, LsqActQuantizer)]


class NotAStudentError(TypeError, ValueError):
    """A model without quantizers where a fake-quant student is needed. Both a TypeError and a
    ValueError: export_onnx raised the one and export_integer the other before they shared
    check_calibrated_student."""


def check_calibrated_student(qmodel: nn.Module, user: str, max_bits: int = 8) -> list:
    """The checks an exporter needs before it reads a student's grids: a fake-quant student
    (NotAStudentError), every activation quantizer calibrated, with a finite positive step, and
    activations and weights of at most ``max_bits`` (ValueError). Returns its (name, activation
    quantizer) pairs. ``user`` names the caller in the messages."""
    if not isinstance(qmodel, nn.Module):
        raise TypeError(f"{user} needs an nn.Module, got {type(qmodel).__name__}")
    quantizers = [(n, m) for n, m in qmodel.named_modules() if isinstance(m, LsqActQuantizer)]
    if not quantizers:
        raise NotAStudentError(f"{user} needs a fake-quant student: {type(qmodel).__name__} has no quantizers; make "
                               "one with maskaq.quant.quantize_model(model, wbits, abits) and calibrate it first")
    missing = [n for n, q in quantizers if not q.initialized]
    if missing:
        raise ValueError(f"{len(missing)} activation quantizers are not calibrated (first: '{missing[0]}'); "
                         f"call maskaq.quant.calibrate(qmodel, images) before {user}")
    for name, q in quantizers:
        step = q.step.detach()
        if q.bits > max_bits or not torch.isfinite(step).all() or float(step) <= 0:
            raise ValueError(f"activation quantizer '{name}' has an unusable step {float(step):g} or bits {q.bits}; "
                             f"{user} needs a positive finite step and <= {max_bits} bits")
    for name, m in qmodel.named_modules():
        if isinstance(m, (QuantLinear, QuantConv2d)) and m.wbits > max_bits:
            raise ValueError(f"'{name}' has {m.wbits}-bit weights; {user} supports <= {max_bits} bits")
    return quantizers


def _first_batch(batches) -> torch.Tensor:
    if isinstance(batches, torch.Tensor):
        first = batches
    else:
        try:
            first = next(iter(batches))
        except TypeError:
            raise TypeError(f"calibrate needs a tensor of images or an iterable of batches, "
                            f"got {type(batches).__name__}") from None
        except StopIteration:
            raise ValueError("calibrate got an empty iterable of batches") from None
        if isinstance(first, (tuple, list)):  # (images, labels) from a DataLoader
            first = first[0]
    if not isinstance(first, torch.Tensor) or first.dim() != 4:
        shape = tuple(first.shape) if isinstance(first, torch.Tensor) else type(first).__name__
        raise ValueError(f"calibrate needs images shaped (B, C, H, W), got {shape}")
    if not first.is_floating_point():
        raise ValueError(f"calibrate needs float images (normalized like the teacher's input), got {first.dtype}")
    return first


def calibrate(qmodel: nn.Module, batches: Union[torch.Tensor, Iterable], init: str = "minmax",
              only: Optional[Callable[[str], bool]] = None) -> nn.Module:
    """Initialize every activation quantizer of ``qmodel`` under no_grad (with ``only``, those whose
    module name it accepts; the others keep their grids).

    ``init``: "minmax" (the default: each grid spans the observed range), "lsq" (LSQ's
    α = 2·mean|x|/sqrt(qmax), docs/method.md#the-quantizer, which clips large activations such as
    softmax peaks) or "lsq_pminmax" (LSQ, but min-max for the attention probabilities P), "mse"
    (each grid spans the clipped range c·[min, max] of least squared error on the batch) or
    "mse_pminmax" (mse, but min-max for P). Min-max was chosen by measurement: LSQ's init clips and
    costs accuracy even at W8A8 (docs/method.md#where-the-defaults-differ-from-the-public-code-and-why).
    On real images use mse_pminmax for 3-bit activations (level with min-max down to 4 bits, better
    at 3); on Gaussian noise min-max is better, as noise's ranges are not the data's and fitting them
    tightly clips the real activations (docs/results.md#calibration-alone-and-the-calibration-source).

    ``batches``: one tensor of images (B, C, H, W), or an iterable of tensors or of
    (images, labels) pairs (a DataLoader). LSQ initializes from the first tensor each quantizer
    sees, so only the first batch is used; make it the calibration set you want (32–64 images
    are plenty). Calling calibrate again re-initializes from the new batch. Quantizers are
    initialized in forward order, so each one sees activations computed by an already-quantized
    model upstream. Returns ``qmodel``.
    """
    quantizers = activation_quantizers(qmodel)
    if not quantizers:
        raise ValueError(f"{type(qmodel).__name__} has no activation quantizers; pass a model made by quantize_model")
    chosen = {name: q for name, q in qmodel.named_modules()
              if isinstance(q, LsqActQuantizer) and (only is None or only(name))}
    if not chosen:
        raise ValueError("`only` accepts none of the model's activation quantizers")
    images = _first_batch(batches)
    param = next(qmodel.parameters())
    images = images.to(device=param.device)
    was_training = qmodel.training
    qmodel.eval()
    if init not in CALIBRATION_INITS:
        raise ValueError(f"unknown activation init {init!r}; choose one of {', '.join(CALIBRATION_INITS)}")
    for name, quantizer in chosen.items():
        if init in ("lsq_pminmax", "mse_pminmax"):
            quantizer.init_method = "minmax" if name.endswith("p_quantizer") else init.split("_")[0]
        else:
            quantizer.init_method = init
        quantizer._initialized = False
        quantizer.initialized_flag.fill_(False)
        quantizer.calibrating = True
    try:
        with torch.no_grad():
            qmodel(images)
    finally:
        for quantizer in chosen.values():
            quantizer.calibrating = False
        qmodel.train(was_training)
    missed = [name for name, m in chosen.items() if not m.initialized]
    if missed:
        raise RuntimeError(f"{len(missed)} activation quantizers saw no input during calibration "
                           f"(first: {missed[0]}); the model's forward skips them")
    _sync_from_rank0(list(chosen.values()))
    return qmodel


def _sync_from_rank0(quantizers: list[LsqActQuantizer]) -> None:
    """Under torch.distributed every rank takes rank 0's calibration, so the replicas agree even
    when each rank calibrated on its own images (the sign decision included)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    # One float tensor (step, zero point, signed) per quantizer: a single broadcast, any backend.
    packed = torch.stack([torch.stack([q.step.detach().float(), q.zero_point.detach().float(),
                                       q.signed_flag.float()]) for q in quantizers])
    dist.broadcast(packed, src=0)
    with torch.no_grad():
        for quantizer, (step, zero_point, signed) in zip(quantizers, packed):
            quantizer.step.copy_(step)
            quantizer.zero_point.copy_(zero_point)
            quantizer.signed_flag.fill_(bool(signed > 0.5))
            quantizer._signed = bool(signed > 0.5)
