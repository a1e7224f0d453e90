"""IntLinear: a Linear on int8 weights and LSQ-quantized activations (CPU: oneDNN or fbgemm, or maskaq's
exact int16 GEMM where they would saturate; CUDA: cuBLASLt)."""
from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from maskaq import ops
from maskaq.integer.cpu_gemm import (DEFAULT_KERNEL, _check_kernel, cpu_int8_pairs_saturate, fbgemm_prepack,
                                     int16_gemm_available, pair_sums_overflow_int16, split_weights)
from maskaq.integer.device import _cuda_kernels
from maskaq.integer.grid import ActGrid, _grid_buffer, clamp_to_grid

__all__ = ["IntLinear", "set_kernel"]


_quantize_warned = False


def _quantize_per_tensor(x: torch.Tensor, step: float, zero_point: int) -> torch.Tensor:
    """torch.quantize_per_tensor to quint8. torch >= 2.10 warns once per process that quantized dtypes
    are deprecated: the first call hides that warning, later calls skip the cost of catching it."""
    global _quantize_warned
    if _quantize_warned:
        return torch.quantize_per_tensor(x, step, zero_point, torch.quint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qx = torch.quantize_per_tensor(x, step, zero_point, torch.quint8)
    _quantize_warned = True
    return qx


def _quantize_uint8(x2d: torch.Tensor, step: float, zero_point: int, grid: ActGrid) -> torch.Tensor:
    """uint8 u = q − qmin of a float input on ``grid`` (kernel step and zero point of u given)."""
    if 0 <= zero_point <= 255:  # one vectorized pass; the quint8 bytes are then read as uint8, no copy
        qx = _quantize_per_tensor(x2d, step, zero_point)
        # (Tensor.view(torch.uint8) on a quint8 tensor is not a real view and crashes; set_
        # on its storage is. int_repr() would copy.)
        u = torch.empty(0, dtype=torch.uint8).set_(qx.untyped_storage(), qx.storage_offset(), qx.shape, qx.stride())
        return clamp_to_grid(u, grid)
    return clamp_to_grid(torch.div(x2d, step).round_().add_(zero_point).clamp_(0, 255).to(torch.uint8), grid)


class _OnednnCall:
    """One layer's oneDNN GEMM with what it reads from the layer taken once: the kernel step and zero
    point of its uint8 input, its grid and the packed weights. A frozen model's layers are called
    with the same arguments every time, and at batch 1 reading them anew through the module (grid,
    folds, packing state, checks) cost more than any op but the GEMMs
    (docs/integer-inference.md#where-a-batch-1-call-goes). Made from, and valid for, one ``_packed``
    tuple of the layer: every change to the layer replaces that tuple."""

    __slots__ = ("packed", "input", "weights")

    def __init__(self, layer: "IntLinear", packed: tuple):
        self.packed = packed
        self.input = layer.input_spec()
        self.weights = packed[1:]  # packed weight, per-channel scales, zero points, bias

    def quantize(self, x2d: torch.Tensor) -> torch.Tensor:
        return _quantize_uint8(x2d, *self.input)

    def run(self, u: torch.Tensor, act: Optional[str] = None, out: Optional[tuple] = None) -> torch.Tensor:
        """The GEMM on u, with GELU (``act``) and the requantization to the grid ``out`` (the next
        layer's ``input_spec``) fused in its epilogue (see ``IntLinear.run_uint8``)."""
        post, algorithm = ("none", "") if act is None else ("gelu", "tanh" if act == "gelu_tanh" else "none")
        step, zero_point, _ = self.input
        if out is None:
            return torch.ops.onednn.qlinear_pointwise(u, step, zero_point, *self.weights, 1.0, 0, torch.float32,
                                                      post, [], algorithm)
        y = torch.ops.onednn.qlinear_pointwise(u, step, zero_point, *self.weights, out[0], out[1], None, post, [],
                                               algorithm)
        # oneDNN saturates the requantized output to [0, 255]: a narrower grid clamps the bytes after
        return clamp_to_grid(y, out[2])


def set_kernel(model: nn.Module, kernel: str) -> nn.Module:
    """Switch every IntLinear of ``model`` to the CPU library ``kernel`` ("onednn" or "fbgemm")."""
    _check_kernel(kernel)
    for m in model.modules():
        if isinstance(m, IntLinear):
            m.set_kernel(kernel)
    return model


class IntLinear(nn.Module):
    """Linear on int8 weights (per-channel scales) and LSQ-quantized activations; see module doc.

    Buffers (the saved state): ``weight_int`` (out, in) int8, ``weight_scale`` (out,) float32,
    ``bias`` (out,) float32 (zeros when the float layer had none), ``input_grid`` (5,) float64,
    and two folds set by the exporter: ``output_scale`` (the layer returns y·output_scale) and
    ``input_prescale`` (the caller passes x/input_prescale instead of x).
    ``kernel`` picks the CPU library: "onednn" (default) or "fbgemm" (see ``set_kernel``).
    """

    def __init__(self, in_features: int, out_features: int, wbits: int, grid: Optional[ActGrid],
                 kernel: str = DEFAULT_KERNEL):
        super().__init__()
        self.in_features, self.out_features, self.wbits = int(in_features), int(out_features), int(wbits)
        self.register_buffer("weight_int", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features))
        _grid_buffer(self, "input_grid", grid)
        self.register_buffer("output_scale", torch.ones(out_features))
        self.register_buffer("input_prescale", torch.ones((), dtype=torch.float64))
        self.quantized_input = grid is not None
        self.kernel = _check_kernel(kernel)
        self._grid = grid
        self._prescale = 1.0  # Python mirror of input_prescale (no tensor read per call)
        self._packed = None  # (kind, packed weights, ...), rebuilt lazily after any change
        self._onednn = None  # _OnednnCall of the current _packed (or None where another kernel runs)
        self._split = False  # set when packing for the CPU: the weights run as two halves

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_quant(cls, qlinear, kernel: str = DEFAULT_KERNEL) -> "IntLinear":
        grid = None if qlinear.input_quantizer is None else ActGrid.from_quantizer(qlinear.input_quantizer)
        module = cls(qlinear.in_features, qlinear.out_features, qlinear.wbits, grid, kernel)
        w_int, w_scale = qlinear.weight_quantizer.integer_weight(qlinear.weight.detach())
        module.to(qlinear.weight.device)
        module.weight_int.copy_(w_int)
        module.weight_scale.copy_(w_scale.float())
        if qlinear.bias is not None:
            module.bias.copy_(qlinear.bias.detach().float())
        return module

    @property
    def grid(self) -> Optional[ActGrid]:
        return self._grid

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._grid = ActGrid.from_tensor(self.input_grid) if self.quantized_input else None
        self._prescale = float(self.input_prescale)
        self._packed = None

    def _apply(self, fn, *args, **kwargs):
        self._packed = None  # device or dtype moves invalidate the packed weights
        return super()._apply(fn, *args, **kwargs)

    def set_kernel(self, kernel: str) -> None:
        self.kernel = _check_kernel(kernel)
        self._packed = None

    @torch.no_grad()
    def fold_output_scale(self, scale: torch.Tensor) -> None:
        """Make the layer return y·scale (per output channel), folded into the epilogue."""
        self.output_scale.mul_(scale.to(self.output_scale))
        self._packed = None

    @torch.no_grad()
    def fold_input_prescale(self, prescale: float) -> None:
        """The caller will pass x/prescale instead of x: fold prescale into the input step."""
        self.input_prescale.mul_(float(prescale))
        self._prescale = float(self.input_prescale)
        self._packed = None

    # -- effective epilogue constants ------------------------------------------------------------
    def _bias(self) -> torch.Tensor:
        return (self.bias.double() * self.output_scale.double()).float()

    def kernel_step(self) -> float:
        """The quantization step of the (prescaled) input the kernel sees: α / prescale."""
        return self._grid.step / self._prescale

    def kernel_zero_point(self) -> int:
        """Zero point of u = q − qmin (the uint8 the kernel reads): z − qmin."""
        return self._grid.zero_point - self._grid.qmin

    def input_spec(self) -> tuple:
        """(kernel step, kernel zero point, grid) of the uint8 input u this layer reads."""
        return self.kernel_step(), self.kernel_zero_point(), self._grid

    def _weight_scales(self) -> torch.Tensor:
        """Per-channel scales of the kernel's weights: s_w·output_scale·prescale (float64)
        (the kernel multiplies the accumulator by its input step α/prescale and these)."""
        return self.weight_scale.double() * self.output_scale.double() * self._prescale

    # -- CPU ---------------------------------------------------------------------------------
    def _pairs_overflow_int16(self) -> bool:
        """Whether two adjacent products u·w of this layer's operands can leave int16: the pair sums
        a saturating CPU kernel (see ``cpu_int8_pairs_saturate``) would clip."""
        return pair_sums_overflow_int16(self._grid.qmax - self._grid.qmin, self.weight_int)

    def _kernel_weights(self, split: bool):
        """(int8 weights, per-channel scales, bias) the CPU kernel packs. With ``split`` (this CPU's
        int8 GEMM saturates pair sums and this layer's operands can overflow them), the stacked
        halves of ``split_weights``: one GEMM over them gives exact accumulators, and with scales
        2·s and s the two halves of its output add up to the layer's result."""
        w_scales, bias = self._weight_scales(), self._bias()
        if not split:
            return self.weight_int, w_scales, bias
        scales, biases = torch.cat([2 * w_scales, w_scales]), torch.cat([bias, torch.zeros_like(bias)])
        return split_weights(self.weight_int), scales, biases

    def _pack_cpu(self):
        if not self.quantized_input:  # weight-only: float GEMM on the dequantized weights
            self._split = False
            w = (self.weight_int.double() * (self.weight_scale.double() * self.output_scale.double())[:, None])
            return ("float", w.float(), self._bias())
        saturates = self._pairs_overflow_int16() and cpu_int8_pairs_saturate(self.kernel)
        self._split = saturates and not int16_gemm_available()
        if saturates and not self._split:  # the library would clip pair sums: maskaq's exact GEMM
            scales = (self.kernel_step() * self._weight_scales()).float()
            return ("int16", ops.int8_gemm_pack(self.weight_int), scales, self._bias())
        weights, w_scales, bias = self._kernel_weights(self._split)
        if self.kernel == "onednn":
            packed = torch.ops.onednn.qlinear_prepack(weights, None)
            return ("onednn", packed, w_scales.float(), torch.zeros(weights.shape[0], dtype=torch.int32), bias)
        return ("fbgemm", fbgemm_prepack(weights, w_scales, bias))

    def _cpu_packed(self):
        if self._packed is None or self._packed[0] == "cuda":
            self._packed = self._pack_cpu()
        return self._packed

    def onednn_call(self) -> Optional[_OnednnCall]:
        """This layer's oneDNN GEMM with its arguments read once (``_OnednnCall``), where the layer
        runs oneDNN on unsplit weights (the CPU paths that fuse the epilogue); else None."""
        packed = self._cpu_packed()
        if packed[0] != "onednn" or self._split:
            return None
        if self._onednn is None or self._onednn.packed is not packed:
            self._onednn = _OnednnCall(self, packed)
        return self._onednn

    @property
    def cpu_gemm(self) -> str:
        """What runs this layer's GEMM on the CPU: "onednn" or "fbgemm" (the library of ``kernel``),
        "onednn-split" / "fbgemm-split" (the library on split weights, see ``_kernel_weights``),
        "int16" (maskaq's exact GEMM, ``maskaq.ops.int8_gemm``: where the library's int8 GEMM
        would clip this layer's pair sums and the CPU has AVX2) or "float" (weight-only layers)."""
        kind = self._cpu_packed()[0]
        return f"{kind}-split" if self._split else kind

    @property
    def splits_weights(self) -> bool:
        """True when the CPU kernel runs this layer's weights as two halves (see ``_kernel_weights``):
        exact, at twice the GEMM work, on CPUs whose int8 GEMM saturates and that lack AVX2."""
        self._cpu_packed()
        return self._split

    def fuses_epilogue(self, act: Optional[str]) -> bool:
        """Whether ``run_uint8`` can apply ``act`` (None, "gelu" or "gelu_tanh") and requantize in the
        GEMM's epilogue on this CPU: oneDNN's unsplit GEMM can. maskaq's int16 GEMM dequantizes in
        its tiles but fuses no GELU or requantization: fused into its tiles they made the GEMM slower
        than torch's GELU and a quantize pass after it
        (docs/integer-inference.md#why-exact-w8a8-stays-behind-on-avx2)."""
        return self._cpu_packed()[0] == "onednn" and not self._split

    def _join_halves(self, y: torch.Tensor) -> torch.Tensor:
        return y[:, :self.out_features] + y[:, self.out_features:] if self._split else y

    def quantize_input(self, x2d: torch.Tensor) -> torch.Tensor:
        """uint8 u = q − qmin of a float input (the kernel's activation operand)."""
        return _quantize_uint8(x2d, self.kernel_step(), self.kernel_zero_point(), self._grid)

    def run_uint8(self, u: torch.Tensor, act: Optional[str] = None, out: Optional["IntLinear"] = None):
        """The CPU GEMM on uint8 activations u (on this layer's grid), bias and an optional GELU
        ("gelu" or "gelu_tanh") fused in the epilogue; with ``out`` the result is requantized
        to ``out``'s input grid (uint8) in the same epilogue, else float32. Runs oneDNN or
        maskaq's int16 GEMM (see ``cpu_gemm``); ``fuses_epilogue`` says which epilogues it takes.
        The requantized output holds u = q − qmin of ``out``'s grid, any width up to 8 bits."""
        packed = self._cpu_packed()
        if packed[0] not in ("onednn", "int16"):
            raise RuntimeError(f"run_uint8 needs the onednn kernel or maskaq's int16 GEMM, this layer runs {self.cpu_gemm}")
        if (act is not None or out is not None) and not self.fuses_epilogue(act):
            raise RuntimeError(f"a layer on {self.cpu_gemm} cannot fuse the epilogue act={act!r}"
                               + (" with requantization" if out is not None else ""))
        if packed[0] == "int16":
            return self._run_int16(u)
        call = self.onednn_call()
        if call is None:  # split weights: float output only (fuses_epilogue is False for them)
            return self._join_halves(torch.ops.onednn.qlinear_pointwise(
                u, self.kernel_step(), self.kernel_zero_point(), *packed[1:], 1.0, 0, torch.float32, "none", [], ""))
        return call.run(u, act, None if out is None else out.input_spec())

    def _run_int16(self, u: torch.Tensor) -> torch.Tensor:
        """maskaq's exact GEMM (int32 accumulators of (u − z)·W) with y = acc·scale + bias (float32)
        applied to each finished tile."""
        _, packed, scales, bias = self._packed
        return ops.int8_gemm(u, self.kernel_zero_point(), packed, self.out_features, scales, bias)

    def _cpu_forward(self, x2d: torch.Tensor) -> torch.Tensor:
        call = self.onednn_call()
        if call is not None:
            return call.run(x2d if x2d.dtype == torch.uint8 else call.quantize(x2d))
        packed = self._cpu_packed()
        if packed[0] == "float":
            return F.linear(x2d, packed[1], packed[2])
        if packed[0] in ("onednn", "int16"):
            return self.run_uint8(x2d if x2d.dtype == torch.uint8 else self.quantize_input(x2d))
        if x2d.dtype == torch.uint8:
            raise RuntimeError("the fbgemm kernel takes float inputs")
        # fbgemm: the float input is quantized inside the op (u = round(x/step) + zp clamped to
        # [0, 255]); sub-8-bit grids clamp to the grid's range first.
        grid, step = self._grid, self.kernel_step()
        if not grid.full_uint8:
            x2d = x2d.clamp((grid.qmin - grid.zero_point) * step, (grid.qmax - grid.zero_point) * step)
        return self._join_halves(torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
            x2d, step, self.kernel_zero_point(), packed[1]))

    # -- CUDA --------------------------------------------------------------------------------
    def cuda_int8_grid(self) -> tuple:
        """(step, zero point, qmin, qmax) of the int8 activation s = q − qmin − 128 that the CUDA
        GEMM reads (on the prescaled input): its value is (s − zero point)·step. The signed [-128, 127]
        and unsigned [0, 255] 8-bit grids both fill int8 exactly; narrower grids use part of it."""
        grid = self._grid
        return self.kernel_step(), grid.zero_point - grid.qmin - 128, -128, grid.qmax - grid.qmin - 128

    def _cuda_pack(self):
        if self._packed is None or self._packed[0] != "cuda":
            grid = self._grid
            z_s = self.cuda_int8_grid()[1]
            # (in, out) column-major view of the (out, in) weights: the "TN" layout cuBLASLt's int8
            # GEMM wants (as torchao passes it).
            w_t = self.weight_int.t()
            colsum = self.weight_int.sum(dim=1, dtype=torch.int64).double()
            scale = grid.step * self.weight_scale.double() * self.output_scale.double()
            # y = acc·(α s_w) + (b − z_s·ΣW_q·α s_w): the zero point folded into the bias.
            bias = self.bias.double() * self.output_scale.double() - z_s * colsum * scale
            self._packed = ("cuda", w_t, scale.float(), bias.float())
        return self._packed

    def _cuda_int8_input(self, x2d: torch.Tensor) -> torch.Tensor:
        """The int8 s of ``cuda_int8_grid`` for a float, uint8 (u = q − qmin) or int8 (s itself) input."""
        if x2d.dtype == torch.int8:
            return x2d
        if x2d.dtype == torch.uint8:
            return (x2d.to(torch.int16) - 128).to(torch.int8)
        step, z_s, lo, hi = self.cuda_int8_grid()
        return torch.div(x2d.float(), step).round_().add_(z_s).clamp_(lo, hi).to(torch.int8)

    def _cuda_gemm(self, s: torch.Tensor) -> torch.Tensor:
        """int32 accumulators s·W_qᵀ (M, out) of the int8 activations s (M, in)."""
        w_t = self._cuda_pack()[1]
        m = s.shape[0]
        if s.device.type == "cpu" and cpu_int8_pairs_saturate("int_mm"):
            # The CUDA path run on a CPU (tests): torch._int_mm's CPU kernel clips pair sums here.
            return (s.double() @ w_t.double()).to(torch.int32)
        if self.in_features % 8 or self.out_features % 8:
            # torch._int_mm needs K, N multiples of 8: float GEMM, exact while |acc| < 2^24
            return (s.float() @ w_t.float()).to(torch.int32)
        if m <= 16 or m % 8:
            pad = max(24, m + (-m) % 8) - m  # torch._int_mm needs M > 16, a multiple of 8
            return torch._int_mm(F.pad(s, (0, 0, 0, pad)), w_t)[:m]
        return torch._int_mm(s.contiguous(), w_t)

    def _cuda_forward(self, x2d: torch.Tensor, activation: str = "none",
                      out: Optional["IntLinear"] = None) -> torch.Tensor:
        """cuBLASLt int8 GEMM + maskaq's fused epilogue. ``activation`` "gelu" applies erf GELU in the
        epilogue; with ``out`` the result is requantized to ``out``'s int8 input grid (int8, what
        ``out`` reads on CUDA), else float32."""
        if not self.quantized_input:  # weight-only: float GEMM on the dequantized weights
            w = self.weight_int.float() * (self.weight_scale * self.output_scale)[:, None]
            y = F.linear(x2d.float(), w, self._bias())
            y = F.gelu(y) if activation == "gelu" else y
            return out._cuda_int8_input(y) if out is not None else y
        acc = self._cuda_gemm(self._cuda_int8_input(x2d))
        _, _, scale, bias = self._cuda_pack()
        if _cuda_kernels(acc.device):
            requant = out.cuda_int8_grid() if out is not None else (0.0, 0, -128, 127)
            return ops.int8_linear_epilogue(acc, scale, bias, activation, *requant)
        # Fallback without the extension's CUDA kernels: the same epilogue as PyTorch ops.
        y = torch.addcmul(bias, acc.float(), scale)
        y = F.gelu(y) if activation == "gelu" else y
        return out._cuda_int8_input(y) if out is not None else y

    # -- forward -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Float (or, on this layer's grid, uint8) input of shape (..., in_features) -> float32."""
        shape = x.shape
        x2d = x.reshape(-1, self.in_features)
        if x2d.dtype not in (torch.float32, torch.uint8):
            x2d = x2d.float()
        if x2d.is_cuda:
            y = self._cuda_forward(x2d)
        elif x2d.device.type == "cpu":
            y = self._cpu_forward(x2d.contiguous())
        else:
            raise ValueError(f"IntLinear runs on CPU or CUDA tensors, got device {x2d.device}")
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, wbits={self.wbits}, "
                f"input={self._grid}, kernel={self.kernel}")
