"""Fake-quant modules of the student: Linear, Conv2d, ViT attention, Swin window attention.

Attention products (docs/method.md#notation): A = FQ(q)·FQ(k)ᵀ, P = softmax(A·scale [+ bias]),
O = FQ(P)·FQ(v), with four per-tensor LSQ quantizers (q, k, p, v).

* ``QuantAttention`` (timm ``Attention``) runs through ``maskaq.ops.fq_attention`` with the four
  quantizers' steps and zero points stacked in the order (q, k, p, v).
* ``QuantWindowAttention`` (timm Swin ``WindowAttention``) adds the relative-position bias and the
  shifted-window mask to the scaled logits before the softmax. ``fq_attention`` has no bias input,
  so Swin takes a dedicated path (``attention_with_bias``: the same fake-quant maths written with
  ``lsq_fake_quant`` and plain matmuls). ViT attention falls back to that path too when it is
  called with an ``attn_mask`` or ``is_causal`` (classification ViTs never do).

The same two forward functions (``vit_attention_forward``, ``window_attention_forward``) serve the
student (quantizers given) and, through ``capture_attention``, the full-precision teacher
(quantizers None), so teacher and student logits are computed by one code path.
Captured logits are always q̂·k̂ᵀ: unscaled, without the Swin bias or mask (docs/method.md's A_l, #notation).
Attention dropout is not applied in these paths (DFQ students and teachers run with p = 0).
"""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from maskaq.quant.quantizers import LsqActQuantizer, WeightQuantizer, check_bits
from maskaq.runtime import world_size

__all__ = [
    "QuantLinear",
    "QuantConv2d",
    "cached_weights",
    "QuantAttention",
    "QuantWindowAttention",
    "attention_with_bias",
    "vit_attention_forward",
    "window_attention_forward",
]


def _ops():
    # Imported lazily: maskaq.ops loads the compiled extension (or warns and falls back).
    from maskaq import ops

    return ops


# -- linear layers ------------------------------------------------------------------------
class _CachedWeight:
    """The fake-quant weight of a QuantLinear / QuantConv2d, computed once while ``cached_weights``
    is active and reused as long as the weight and its quantizer's step are the same tensors at the
    same version (an optimizer step or a load_state_dict bumps the version and so recomputes it)."""

    def __init__(self):
        self.key, self.value = None, None

    @staticmethod
    def key_of(module) -> tuple:
        tensors = [module.weight] + [getattr(module.weight_quantizer, "step", None)]
        return tuple((id(t), t._version, t.dtype, t.device) for t in tensors if t is not None)

    def get(self, module) -> torch.Tensor:
        if module.weight.requires_grad and torch.is_grad_enabled():  # a trained weight needs its graph
            return module.weight_quantizer(module.weight)
        key = self.key_of(module)
        if key != self.key:
            with torch.no_grad():
                self.value = module.weight_quantizer(module.weight)
            self.key = self.key_of(module)  # a lazy LSQ init may have written the step
        return self.value


def _quantized_weight(module) -> torch.Tensor:
    cache = module.__dict__.get("_weight_cache")
    return module.weight_quantizer(module.weight) if cache is None else cache.get(module)


@contextlib.contextmanager
def cached_weights(model: nn.Module):
    """Within the block, every QuantLinear / QuantConv2d of ``model`` fake-quantizes its weight once
    and reuses it, for a student whose weights do not change (synthesis runs thousands of forward
    passes of a frozen student). The outputs are bit for bit those of the uncached forward; a weight
    or step changed in place, or replaced, is quantized again; weights that require a gradient (with
    grad mode on) are never cached. Nothing stays cached after the block."""
    modules = [m for m in model.modules() if isinstance(m, (QuantLinear, QuantConv2d))] if model is not None else []
    saved = [m.__dict__.get("_weight_cache") for m in modules]
    for m in modules:
        m.__dict__["_weight_cache"] = _CachedWeight()
    try:
        yield model
    finally:
        for m, old in zip(modules, saved):
            m.__dict__["_weight_cache"] = old


class QuantLinear(nn.Module):
    """Linear with a per-channel fake-quant weight and an LSQ fake-quant input.

    ``abits=None`` keeps the input in full precision (used nowhere by default for Linear, but
    kept symmetric with QuantConv2d). Parameters keep nn.Linear's names (weight, bias).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, wbits: int,
                 abits: Optional[int], weight_method: str = "minmax", device=None, dtype=None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.wbits = check_bits(wbits, "weight bits")
        self.abits = None if abits is None else check_bits(abits, "activation bits")
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.weight_quantizer = WeightQuantizer(self.wbits, weight_method, out_features)
        self.input_quantizer = None if self.abits is None else LsqActQuantizer(self.abits)

    @classmethod
    def from_float(cls, linear: nn.Linear, wbits: int, abits: Optional[int], weight_method: str = "minmax"):
        """Wrap ``linear``'s own Parameters (the caller has already deep-copied the model)."""
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, wbits=wbits,
                     abits=abits, weight_method=weight_method, device="meta")
        module.weight = linear.weight
        module.bias = linear.bias
        module.weight_quantizer.to(linear.weight.device)
        if module.input_quantizer is not None:
            module.input_quantizer.to(linear.weight.device)
        if weight_method == "lsq":
            module.weight_quantizer.init_from(linear.weight)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        return F.linear(x, _quantized_weight(self), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, wbits={self.wbits}, abits={self.abits}")


class QuantConv2d(nn.Module):
    """Conv2d with a per-output-channel fake-quant weight and an optional LSQ fake-quant input.

    The patch embedding gets ``abits=None``: its input is the image, kept in full precision.
    """

    def __init__(self, conv: nn.Conv2d, wbits: int, abits: Optional[int], weight_method: str = "minmax"):
        super().__init__()
        if conv.padding_mode != "zeros":
            raise ValueError(f"QuantConv2d supports padding_mode='zeros' only, got {conv.padding_mode!r}")
        if isinstance(conv.padding, str):
            raise ValueError("QuantConv2d needs numeric padding; got padding=" + repr(conv.padding))
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride = conv.kernel_size, conv.stride
        self.padding, self.dilation, self.groups = conv.padding, conv.dilation, conv.groups
        self.wbits = check_bits(wbits, "weight bits")
        self.abits = None if abits is None else check_bits(abits, "activation bits")
        self.weight = conv.weight
        self.bias = conv.bias
        self.weight_quantizer = WeightQuantizer(self.wbits, weight_method, conv.out_channels).to(conv.weight.device)
        self.input_quantizer = None if self.abits is None else LsqActQuantizer(self.abits).to(conv.weight.device)
        if weight_method == "lsq":
            self.weight_quantizer.init_from(conv.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        w = _quantized_weight(self)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, wbits={self.wbits}, abits={self.abits}")


# -- attention maths -----------------------------------------------------------------------
def attention_with_bias(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    bias: Optional[torch.Tensor] = None,
    window_mask: Optional[torch.Tensor] = None,
    quantizers: Optional[Sequence[LsqActQuantizer]] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(O, A): A = FQ(q)·FQ(k)ᵀ, P = softmax(A·scale + bias [+ window mask]), O = FQ(P)·FQ(v).

    ``bias`` broadcasts against (B, H, N, N); ``window_mask`` is Swin's (nW, N, N) 0/-100 mask of
    shifted windows, for B = batch·nW window rows ordered batch-major. ``quantizers`` is
    (q, k, p, v) or None for full precision. Each quantizer is applied in order, so during
    calibration P is initialized from probabilities computed with already-quantized q and k.
    """
    if quantizers is not None:
        q, k = quantizers[0](q), quantizers[1](k)
    logits = q @ k.transpose(-2, -1)
    scores = logits * scale
    if bias is not None:
        scores = scores + bias
    if window_mask is not None:
        num_windows, n = window_mask.shape[0], scores.shape[-1]
        scores = scores.view(-1, num_windows, scores.shape[1], n, n) + window_mask.unsqueeze(1).unsqueeze(0)
        scores = scores.view(-1, scores.shape[2], n, n)
    probs = scores.softmax(dim=-1)
    if quantizers is not None:
        probs, v = quantizers[2](probs), quantizers[3](v)
    return probs @ v, logits


def _fq_attention(q, k, v, scale, quantizers, want_logits):
    """ops.fq_attention with the quantizers' parameters stacked in (q, k, p, v) order."""
    ops = _ops()
    if quantizers is None:
        return ops.fq_attention(q, k, v, scale=scale, return_logits=want_logits)
    step = torch.stack([qz.step for qz in quantizers]).float()
    zero_point = torch.stack([qz.zero_point for qz in quantizers]).float()
    world = world_size()
    if world > 1 and step.requires_grad:
        # the op scales the step gradients by 1/sqrt(numel) of this rank's share; the one-process
        # run's scale is that of the whole global batch, sqrt(world) times smaller
        from maskaq.reference import _scale_grad
        step = _scale_grad(step, world ** -0.5)
    return ops.fq_attention(
        q, k, v, step=step, zero_point=zero_point,
        qmin=[qz.qmin for qz in quantizers], qmax=[qz.qmax for qz in quantizers],
        scale=scale, return_logits=want_logits,
    )


_PLAIN_ATTENTION = False  # set by plain_attention()


@contextlib.contextmanager
def plain_attention():
    """Inside, ViT attention runs its products as plain PyTorch ops (``attention_with_bias``)
    instead of the fused ``fq_attention`` op: what an exporter can trace (maskaq.integer.qdq)."""
    global _PLAIN_ATTENTION
    previous, _PLAIN_ATTENTION = _PLAIN_ATTENTION, True
    try:
        yield
    finally:
        _PLAIN_ATTENTION = previous


def _record(recorder, logits, out):
    if recorder is not None:
        recorder.record(logits, out)


def vit_attention_forward(module, x, attn_mask=None, is_causal=False, quantizers=None, recorder=None):
    """Forward of a timm ``Attention`` (its qkv, norms, gate, proj) with the products done by
    ``fq_attention`` (or ``attention_with_bias`` when a mask is given or quantizers are still
    being calibrated). Records (logits, outputs) into ``recorder`` when one is attached."""
    B, N, _ = x.shape
    gate = module.gate(x).sigmoid() if getattr(module, "gate", None) is not None else None
    qkv = module.qkv(x).reshape(B, N, 3, module.num_heads, module.head_dim).permute(2, 0, 3, 1, 4)
    if not qkv.is_cpu:  # the CUDA kernel reads contiguous q, k, v: one copy for the three
        qkv = qkv.contiguous()
    q, k, v = qkv.unbind(0)  # on the CPU, views the kernel reads in place
    q, k = module.q_norm(q), module.k_norm(k)
    needs_calibration = quantizers is not None and not all(qz.initialized for qz in quantizers)
    if attn_mask is not None or is_causal or needs_calibration or _PLAIN_ATTENTION:
        bias = None
        if attn_mask is not None or is_causal:
            from timm.layers.attention import resolve_self_attn_mask

            bias = resolve_self_attn_mask(N, q, attn_mask, is_causal)
        out, logits = attention_with_bias(q, k, v, module.scale, bias=bias, quantizers=quantizers)
    else:
        want_logits = recorder is not None and recorder.want_logits
        out, logits = _fq_attention(q, k, v, module.scale, quantizers, want_logits)
    _record(recorder, logits, out)
    x = out.transpose(1, 2).reshape(B, N, module.attn_dim)
    x = module.norm(x)
    if gate is not None:
        x = x * gate
    return module.proj_drop(module.proj(x))


def _relative_position_bias(module) -> torch.Tensor:
    """Swin's (1, H, N, N) relative-position bias, gathered from the learned table."""
    n = module.window_area
    bias = module.relative_position_bias_table[module.relative_position_index.view(-1)].view(n, n, -1)
    return bias.permute(2, 0, 1).unsqueeze(0)


def window_attention_forward(module, x, mask=None, quantizers=None, recorder=None):
    """Forward of a timm Swin ``WindowAttention`` through ``attention_with_bias``."""
    B_, N, _ = x.shape
    qkv = module.qkv(x).reshape(B_, N, 3, module.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    out, logits = attention_with_bias(
        q, k, v, module.scale, bias=_relative_position_bias(module), window_mask=mask, quantizers=quantizers
    )
    _record(recorder, logits, out)
    x = out.transpose(1, 2).reshape(B_, N, -1)
    return module.proj_drop(module.proj(x))


# -- attention modules ---------------------------------------------------------------------
class _AttentionQuantizers(nn.Module):
    """Holds the four per-tensor LSQ quantizers of an attention block, in (q, k, p, v) order."""

    def _make_quantizers(self, abits: int) -> None:
        self.q_quantizer = LsqActQuantizer(abits)
        self.k_quantizer = LsqActQuantizer(abits)
        self.p_quantizer = LsqActQuantizer(abits)
        self.v_quantizer = LsqActQuantizer(abits)
        self.capture_recorder = None  # set by capture_attention while it is active

    @property
    def attn_quantizers(self) -> tuple[LsqActQuantizer, ...]:
        return (self.q_quantizer, self.k_quantizer, self.p_quantizer, self.v_quantizer)


class QuantAttention(_AttentionQuantizers):
    """Fake-quant replacement of timm ``Attention`` (qk_norm, scale_norm and gate respected)."""

    def __init__(self, attn: nn.Module, wbits: int, abits: int, weight_method: str = "minmax"):
        super().__init__()
        self.num_heads, self.head_dim = attn.num_heads, attn.head_dim
        self.attn_dim = getattr(attn, "attn_dim", attn.num_heads * attn.head_dim)
        self.scale = attn.scale
        self.qkv = QuantLinear.from_float(attn.qkv, wbits, abits, weight_method)
        self.q_norm, self.k_norm, self.norm = attn.q_norm, attn.k_norm, attn.norm
        gate = getattr(attn, "gate", None)
        self.gate = None if gate is None else QuantLinear.from_float(gate, wbits, abits, weight_method)
        self.attn_drop = attn.attn_drop
        self.proj = QuantLinear.from_float(attn.proj, wbits, abits, weight_method)
        self.proj_drop = attn.proj_drop
        self._make_quantizers(abits)
        self.to(attn.qkv.weight.device)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
        return vit_attention_forward(self, x, attn_mask, is_causal, self.attn_quantizers, self.capture_recorder)


class QuantWindowAttention(_AttentionQuantizers):
    """Fake-quant replacement of timm Swin ``WindowAttention`` (relative-position bias and
    shifted-window mask added to the scaled logits; see the module docstring for why it does not
    use fq_attention)."""

    def __init__(self, attn: nn.Module, wbits: int, abits: int, weight_method: str = "minmax"):
        super().__init__()
        self.dim, self.num_heads = attn.dim, attn.num_heads
        self.window_size, self.window_area = attn.window_size, attn.window_area
        self.scale = attn.scale
        self.relative_position_bias_table = attn.relative_position_bias_table
        self.register_buffer("relative_position_index", attn.relative_position_index, persistent=False)
        self.qkv = QuantLinear.from_float(attn.qkv, wbits, abits, weight_method)
        self.attn_drop = attn.attn_drop
        self.proj = QuantLinear.from_float(attn.proj, wbits, abits, weight_method)
        self.proj_drop = attn.proj_drop
        self._make_quantizers(abits)
        self.to(attn.qkv.weight.device)

    def init_non_persistent_buffers(self) -> None:
        from timm.models.swin_transformer import get_relative_position_index

        self.relative_position_index = get_relative_position_index(
            *self.window_size, device=self.relative_position_index.device)

    def set_window_size(self, window_size) -> None:
        raise NotImplementedError("a quantized Swin cannot change its window size; call set_input_size on the "
                                  "full-precision model, then quantize_model it")

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return window_attention_forward(self, x, mask, self.attn_quantizers, self.capture_recorder)
