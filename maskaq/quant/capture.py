"""Recording every block's attention logits and outputs during a forward (teacher or student).

    with capture_attention(model) as cap:
        logits = model(x)
    cap.logits[l]   # (B, H, N, N) unscaled q̂·k̂ᵀ of block l (Swin: (B·nW, H, N, N) per window)
    cap.outputs[l]  # (B, H, N, d) attention output P̂·v̂ before proj
    cap.num_prefix_tokens  # CLS (+ distillation / register) tokens at the start; 0 for Swin

The tensors are the ones the attention computes (no clone, no detach), so gradients of a loss on
them flow back to the model's parameters and to the input image. A student's quant attention
modules record through an attached recorder. A plain timm teacher has its ``Attention`` /
``WindowAttention`` forwards swapped, while inside the block, for the same functions the student
uses with the quantizers switched off (ViT: ``maskaq.ops.fq_attention`` in full-precision mode);
the original forwards are restored on exit, also when the body raises.

Each forward inside the block appends one entry per attention block; ``cap.clear()`` empties the
lists (e.g. between the teacher and student passes when sharing one ``cap`` is not wanted).

``checkpointed_blocks(model)`` runs every transformer block under activation checkpointing (its
activations are recomputed in the backward pass instead of kept); captures record the first
forward only, so the recomputed logits are not stored a second time.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from maskaq.quant.modules import (
    QuantAttention,
    QuantWindowAttention,
    vit_attention_forward,
    window_attention_forward,
)

__all__ = ["AttentionCapture", "capture_attention", "checkpointed_blocks"]

_recomputing = 0  # > 0 while checkpointed blocks recompute their forward in a backward pass


class AttentionCapture:
    """What ``capture_attention`` yields: per-block lists in forward order.

    ``logits`` / ``outputs`` are None when that kind of tensor was not requested.
    """

    def __init__(self, want_logits: bool, want_outputs: bool, num_prefix_tokens: int,
                 reduce_logits: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
        self.want_logits = want_logits
        self.reduce_logits = reduce_logits
        self.want_outputs = want_outputs
        self.num_prefix_tokens = num_prefix_tokens
        self.logits: Optional[list[torch.Tensor]] = [] if want_logits else None
        self.outputs: Optional[list[torch.Tensor]] = [] if want_outputs else None

    def record(self, logits: Optional[torch.Tensor], outputs: torch.Tensor) -> None:
        if _recomputing:  # the block's first forward was recorded; its recomputation is not
            return
        if self.want_logits:
            self.logits.append(logits if self.reduce_logits is None else self.reduce_logits(logits))
        if self.want_outputs:
            self.outputs.append(outputs)

    def clear(self) -> None:
        if self.want_logits:
            self.logits.clear()
        if self.want_outputs:
            self.outputs.clear()

    def __len__(self) -> int:
        return len(self.logits if self.want_logits else self.outputs)

    def __repr__(self) -> str:
        return (f"AttentionCapture(blocks={len(self)}, logits={self.want_logits}, "
                f"outputs={self.want_outputs}, num_prefix_tokens={self.num_prefix_tokens})")


def _timm_attention_classes():
    from timm.layers.attention import Attention
    from timm.models.swin_transformer import WindowAttention

    return Attention, WindowAttention


def _unwrap(model: nn.Module) -> nn.Module:
    # DistributedDataParallel / DataParallel keep the real model in .module.
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def _teacher_forward(module: nn.Module, recorder: AttentionCapture, windowed: bool):
    if windowed:
        def forward(x, mask=None):
            return window_attention_forward(module, x, mask, None, recorder)
    else:
        def forward(x, attn_mask=None, is_causal=False):
            return vit_attention_forward(module, x, attn_mask, is_causal, None, recorder)
    forward.maskaq_capture = recorder
    return forward


@contextlib.contextmanager
def capture_attention(model: nn.Module, logits: bool = True, outputs: bool = True,
                      reduce_logits: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> Iterator[AttentionCapture]:
    """Context manager recording every attention block of ``model`` (see the module docstring).

    ``reduce_logits`` records ``reduce_logits(logits)`` instead of the (B, H, N, N) logits, so that a
    loss that reads only part of them (the alignment reads the CLS row) does not keep every block's
    full map alive until the backward pass. It should return a new tensor, not a view of its input:
    a view keeps the whole map's memory."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"capture_attention needs an nn.Module, got {type(model).__name__}")
    if not (logits or outputs):
        raise ValueError("capture_attention: ask for logits, outputs or both")
    Attention, WindowAttention = _timm_attention_classes()
    root = _unwrap(model)
    quant_modules, fp_modules = [], []
    for module in root.modules():
        if isinstance(module, (QuantAttention, QuantWindowAttention)):
            quant_modules.append(module)
        elif type(module) in (Attention, WindowAttention):
            fp_modules.append(module)
    if not quant_modules and not fp_modules:
        raise ValueError(
            f"capture_attention found no timm Attention / WindowAttention or maskaq quant attention in "
            f"{type(root).__name__}; it supports timm VisionTransformer and SwinTransformer models"
        )
    busy = [m for m in quant_modules if m.capture_recorder is not None] + [
        m for m in fp_modules if hasattr(m.__dict__.get("forward"), "maskaq_capture")]
    if busy:
        raise RuntimeError("capture_attention is already active on this model (nested captures of one "
                           "model are not supported; reuse the outer capture)")
    windowed = any(isinstance(m, (QuantWindowAttention, WindowAttention)) for m in quant_modules + fp_modules)
    num_prefix = 0 if windowed else int(getattr(root, "num_prefix_tokens", 1))
    cap = AttentionCapture(logits, outputs, num_prefix, reduce_logits)
    # A forward someone set on the instance before us is put back on exit (_set_forward).
    previous = {id(m): m.__dict__.get("forward") for m in fp_modules}
    try:
        for module in quant_modules:
            module.capture_recorder = cap
        for module in fp_modules:
            module.forward = _teacher_forward(module, cap, isinstance(module, WindowAttention))
        yield cap
    finally:
        for module in quant_modules:
            module.capture_recorder = None
        for module in fp_modules:
            _set_forward(module, previous[id(module)])


def _set_forward(module: nn.Module, forward) -> None:
    """Put ``forward`` on the instance, or with None remove the instance's own so that the class's
    forward shows through again."""
    if forward is None:
        module.__dict__.pop("forward", None)
    else:
        module.forward = forward


@contextlib.contextmanager
def checkpointed_blocks(model: nn.Module) -> Iterator[None]:
    """Inside, every transformer block of ``model`` (timm ViT ``blocks``, Swin ``layers[i].blocks``;
    teacher or student) runs under activation checkpointing (torch.utils.checkpoint, non-reentrant):
    its activations are recomputed in the backward pass instead of stored, which trades about one
    more forward for most of the activation memory. Results and gradients are those without it.
    The blocks' forwards are restored on exit, also when the body raises."""
    blocks = _transformer_blocks(_unwrap(model))
    if not blocks:
        raise ValueError(f"checkpointed_blocks found no transformer blocks in {type(model).__name__}; it "
                         "supports timm VisionTransformer (.blocks) and SwinTransformer (.layers[i].blocks)")
    previous = {id(b): b.__dict__.get("forward") for b in blocks}
    try:
        for block in blocks:
            block.forward = _checkpointed(block, block.forward)
        yield
    finally:
        for block in blocks:
            _set_forward(block, previous[id(block)])


def _transformer_blocks(root: nn.Module) -> list:
    if isinstance(getattr(root, "blocks", None), nn.Module):
        return list(root.blocks)
    layers = getattr(root, "layers", None)
    if isinstance(layers, nn.Module):
        return [b for layer in layers for b in getattr(layer, "blocks", [])]
    return []


def _attention_state(block: nn.Module) -> list:
    """How ``block``'s attention modules run now: (module, instance forward or None, recorder)."""
    kinds = (QuantAttention, QuantWindowAttention, *_timm_attention_classes())
    return [(m, m.__dict__.get("forward"), getattr(m, "capture_recorder", None)) for m in block.modules()
            if isinstance(m, kinds)]


def _set_attention_state(state: list) -> None:
    for module, forward, recorder in state:
        _set_forward(module, forward)
        if isinstance(module, (QuantAttention, QuantWindowAttention)):
            module.capture_recorder = recorder


@contextlib.contextmanager
def _recomputation(block: nn.Module, state: list) -> Iterator[None]:
    """The backward pass recomputes ``block`` after the capture that was on may have ended: run it
    with the attention forwards of its first pass (so it saves the same tensors), recording nothing."""
    global _recomputing
    now = _attention_state(block)
    _set_attention_state(state)
    _recomputing += 1
    try:
        yield
    finally:
        _recomputing -= 1
        _set_attention_state(now)


def _checkpointed(block: nn.Module, forward):
    from torch.utils.checkpoint import checkpoint

    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        state = _attention_state(block)
        return checkpoint(forward, *args, use_reentrant=False,
                          context_fn=lambda: (contextlib.nullcontext(), _recomputation(block, state)), **kwargs)
    return run
