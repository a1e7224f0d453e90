"""ONNX export of a fake-quant student in QDQ form (QuantizeLinear / DequantizeLinear pairs).

ONNX Runtime and TensorRT read QDQ graphs natively and fuse each DequantizeLinear → op →
QuantizeLinear pattern into their own integer kernels. ``export_onnx`` puts a Q/DQ pair

* on the input of every quantized Linear and Conv (the LSQ grid, per tensor),
* on every quantized weight (int8, per output channel, axis 0),
* on the four operands of both attention products: q and k before q·kᵀ, P and v before P·v.

The values are the fake-quant student's (up to the float rounding of x/α at .5 ties):

* An activation grid [qmin, qmax] with zero point z becomes u = q − qmin in uint8 with zero point
  z − qmin, so 8-bit signed and unsigned grids both fill uint8. A grid of fewer than 8 bits is
  the same uint8 QuantizeLinear behind a Clip to the grid's range [(qmin − z)·α, (qmax − z)·α]:
  the integers stay the grid's 2^a levels, at a uint8 offset chosen so that the zero point fits
  too (a min–max grid whose zero point lies outside it). An 8-bit grid whose zero point lies
  outside it (softmax P, whose min–max grid starts above 0) has no uint8 zero point: the pair
  quantizes x − lo with zero point 0, and lo, the grid's lowest level, is added back (P) or folded
  into the next Linear's bias, so that ONNX Runtime still fuses DequantizeLinear → MatMul.
* Weights are stored on their grid (integer·step) and pass an int8 Q/DQ with the per-channel
  step, which gives them back exactly; 4-bit weights are int8 values in [-8, 7]. With
  ``weights="uint8"`` the pair is uint8 with zero point 128: the same integers, shifted. ONNX
  Runtime then multiplies uint8 by uint8 (its U8U8 kernels), which adds products in int32 on every
  x86 CPU. Its U8S8 kernels for int8 weights are faster, but on CPUs without VNNI (AVX2 only) they
  add pairs of products in int16 with saturation (ONNX Runtime's documented caveat), so 8-bit
  weights against full 8-bit activations are not exact there; narrower weights never overflow a pair.

The graph has a dynamic batch axis (or a fixed one with ``batch_size``) and opset 17.
"""
from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

__all__ = ["export_onnx", "OPSET", "WEIGHT_DTYPES", "pair_sum_overflow_layers"]

OPSET = 17
# The storage of the weights' Q/DQ pairs: (zero point, qmin, qmax) of the shifted integers.
WEIGHT_DTYPES = {"int8": (0, -128, 127), "uint8": (128, 0, 255)}


def uint8_zero_point(qmin: int, qmax: int, z: int) -> Optional[int]:
    """The uint8 zero point that holds the grid [qmin, qmax] with zero point z: the stored integer
    is s = q − z + zp, and zp and every s must lie in [0, 255]. None when no zp fits (an 8-bit
    grid whose zero point lies outside it)."""
    low, high = max(0, z - qmin), min(255, 255 - (qmax - z))
    return low if low <= high else None


class _QdqActivation(nn.Module):
    """An LSQ activation quantizer as Clip (sub-8-bit) + uint8 QuantizeLinear/DequantizeLinear."""

    initialized = True  # read by the attention forward, which calibrates uninitialized quantizers

    def __init__(self, quantizer, name: str):
        super().__init__()
        step = float(quantizer.step.detach())
        z = int(torch.round(quantizer.zero_point.detach()))
        qmin, qmax = quantizer.qmin, quantizer.qmax
        self.step = step
        self.lo, self.hi = (qmin - z) * step, (qmax - z) * step
        self.clip = qmax - qmin < 255
        self.zero_point = uint8_zero_point(qmin, qmax, z)
        self.shift = self.zero_point is None
        self.add_back = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.clip:
            x = torch.clamp(x, self.lo, self.hi)
        if self.shift:  # the grid's lowest level lo is added back here or folded into the next bias
            y = torch.fake_quantize_per_tensor_affine(x - self.lo, self.step, 0, 0, 255)
            return y + self.lo if self.add_back else y
        return torch.fake_quantize_per_tensor_affine(x, self.step, self.zero_point, 0, 255)


class _QdqWeight(nn.Module):
    """A weight quantizer as the on-grid weight behind a per-channel Q/DQ pair stored as ``dtype``
    (a key of WEIGHT_DTYPES)."""

    def __init__(self, quantizer, weight: torch.Tensor, dtype: str = "int8"):
        super().__init__()
        w_int, step = quantizer.integer_weight(weight.detach())
        shape = (-1,) + (1,) * (weight.dim() - 1)
        zero_point, self.qmin, self.qmax = WEIGHT_DTYPES[dtype]
        self.register_buffer("weight", w_int.float() * step.float().reshape(shape))
        self.register_buffer("step", step.float())
        self.register_buffer("zeros", torch.full((step.numel(),), zero_point, dtype=torch.int32))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:  # the float weight is not read
        return torch.fake_quantize_per_channel_affine(self.weight, self.step, self.zeros, 0, self.qmin, self.qmax)


def pair_sum_overflow_layers(qmodel: nn.Module) -> list:
    """Names of the quantized Linear/Conv layers whose int8 weights against their uint8 inputs can
    overflow an int16 pair sum (``pair_sums_overflow_int16``, as IntLinear decides it: in practice
    8-bit weights against a 256-level input grid), the layers that ONNX Runtime's U8S8 kernels clip
    on CPUs without VNNI unless exported with uint8 weights."""
    from maskaq.integer.cpu_gemm import pair_sums_overflow_int16
    from maskaq.quant.modules import QuantConv2d, QuantLinear

    def overflows(m) -> bool:
        w_int, _ = m.weight_quantizer.integer_weight(m.weight.detach())
        return pair_sums_overflow_int16(m.input_quantizer.qmax - m.input_quantizer.qmin, w_int)

    return [name for name, m in qmodel.named_modules()
            if isinstance(m, (QuantLinear, QuantConv2d)) and m.input_quantizer is not None and overflows(m)]


def _fold_lowest_level(module: nn.Module, name: str) -> None:
    """A shifted input grid (x̂ = DQ(u) + lo) of a Linear: fold W·lo into its bias, so that the
    DequantizeLinear feeds the MatMul directly. ONNX Runtime fuses DQ → MatMul ← DQ into an exact
    integer MatMul; a float Add in between makes it requantize the activation dynamically instead."""
    from maskaq.quant.modules import QuantLinear

    if not isinstance(module, QuantLinear):
        raise ValueError(f"cannot express the input quantizer at '{name}' in ONNX QDQ: its zero point lies "
                         "outside its 8-bit grid, which only a Linear can absorb")
    weight = module.weight_quantizer.weight
    shift = module.input_quantizer.lo * weight.sum(dim=1)
    with torch.no_grad():
        module.bias = nn.Parameter(shift if module.bias is None else module.bias.detach() + shift)
    module.input_quantizer.add_back = False


def _qdq_copy(qmodel: nn.Module, weights: str = "int8") -> nn.Module:
    from maskaq.quant.modules import QuantConv2d, QuantLinear, _AttentionQuantizers
    from maskaq.quant.quantizers import LsqActQuantizer

    model = copy.deepcopy(qmodel).float().cpu().eval()
    for name, module in list(model.named_modules()):
        if isinstance(module, (QuantLinear, QuantConv2d)):
            module.weight_quantizer = _QdqWeight(module.weight_quantizer, module.weight, weights)
            if module.input_quantizer is not None:
                module.input_quantizer = _QdqActivation(module.input_quantizer, f"{name}.input_quantizer")
                if module.input_quantizer.shift:
                    _fold_lowest_level(module, name)
        if isinstance(module, _AttentionQuantizers):
            for attr in ("q_quantizer", "k_quantizer", "p_quantizer", "v_quantizer"):
                setattr(module, attr, _QdqActivation(getattr(module, attr), f"{name}.{attr}"))
            module.capture_recorder = None
    leftover = [n for n, m in model.named_modules() if isinstance(m, LsqActQuantizer)]
    if leftover:
        raise ValueError(f"cannot express the quantizer at '{leftover[0]}' in ONNX: it sits outside a quantized "
                         "Linear, Conv2d or attention block")
    return model


def export_onnx(qmodel: nn.Module, path: Union[str, Path], batch_size: Optional[int] = None,
                weights: str = "int8") -> Path:
    """Write the fake-quant student ``qmodel`` as an ONNX QDQ graph to ``path`` (see the module doc).

    Input "x" (N, C, H, W) normalized like the model's input, output "logits". ``batch_size=None``
    makes the batch axis dynamic. ``weights`` stores the weight integers as "int8" (ONNX Runtime's
    fastest kernels) or "uint8" (zero point 128: exact in ONNX Runtime on CPUs without VNNI too, at
    8-bit weights and activations; see the module doc). The graph passes ``onnx.checker``. Raises
    TypeError/ValueError for a model that is not a calibrated student, naming the module the
    exporter cannot express, and for an unknown ``weights``.
    """
    from maskaq.quant.modules import plain_attention
    from maskaq.spec import describe_model

    from maskaq.quant.convert import check_calibrated_student
    check_calibrated_student(qmodel, "export_onnx")
    if batch_size is not None and int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1 or None (dynamic), got {batch_size}")
    if weights not in WEIGHT_DTYPES:
        raise ValueError(f"weights must be one of {', '.join(WEIGHT_DTYPES)}, got {weights!r}")
    model = _qdq_copy(qmodel, weights)
    spec = describe_model(model)
    example = torch.randn(int(batch_size or 1), spec.in_chans, *spec.image_size)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dynamic = None if batch_size is not None else {"x": {0: "batch"}, "logits": {0: "batch"}}
    tmp = path.with_name(path.name + ".tmp")
    try:
        with plain_attention(), warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            torch.onnx.export(model, (example,), str(tmp), input_names=["x"], output_names=["logits"],
                              dynamic_axes=dynamic, opset_version=OPSET, dynamo=False)
        import onnx

        from maskaq.quant.io import model_source
        graph = onnx.load(str(tmp))
        # the input's preparation and the architecture travel with the file (`maskaq eval x.onnx`)
        onnx.helper.set_model_props(graph, {"maskaq": json.dumps(model_source(qmodel))})
        onnx.save(graph, str(tmp))
        onnx.checker.check_model(str(tmp))
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
