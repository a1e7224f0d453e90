"""Integer modules of an exported maskaq student.

Notation (the fake-quant student, maskaq.quant): an activation quantizer with step α, integer
zero point z = round(zero_point) and range [qmin, qmax] maps x to the integer
q = clamp(round(x/α + z), qmin, qmax) and the value x̂ = (q − z)·α. A weight quantizer stores
per-output-channel integers W_q in [-2^(b-1), 2^(b-1)-1] with steps s_w (zero point 0).

* ``IntLinear``: y = α·s_w·(X_q·W_qᵀ − z_x·ΣW_q) + b as one library call with prepacked
  per-channel int8 weights; the zero point is folded into the kernel's row-offset term and the
  dequantize + bias (+ GELU, + requantize) run in the kernel's epilogue.
  The LSQ grid maps exactly onto uint8: u = q − qmin ∈ [0, qmax − qmin] with zero point
  z − qmin, so signed [-128, 127] and unsigned [0, 255] 8-bit grids are both the full uint8
  range; grids of fewer than 8 bits clamp the float input to the grid's range first.
  - CPU, kernel "onednn" (default, measured faster on this AVX512-VNNI machine):
    ``onednn::qlinear_pointwise`` on uint8 activations produced by one vectorized
    ``quantize_per_tensor`` pass (its bytes read in place as uint8, no copy), float32 output.
  - CPU, kernel "fbgemm": ``quantized::linear_with_input_q_dq_qweight_dq_output_fp32`` (the float
    input is quantized inside the op).
  - CPUs without VNNI (AVX2-only x86, AVX512 before Cascade Lake): both libraries multiply u8·s8
    with ``vpmaddubsw``, which adds adjacent products into int16 with saturation, so 8-bit weights
    against 8-bit activations (255·127·2 > 32767) would give wrong accumulators. A probe GEMM
    (``cpu_int8_pairs_saturate``) detects this once per process; such layers then run their
    weights as two halves W = 2·W_hi + W_lo (|W_hi| ≤ 64, W_lo ∈ {0, 1}) stacked in one GEMM of
    twice the width: exact, at twice the GEMM work, and without the fused MLP epilogue. Layers
    whose operands cannot overflow a pair (weights of ≤ 7 bits, activations of ≤ 7 bits) run as
    on VNNI. ``cpu_integer_path()`` says which path this machine takes.
  - CUDA: cuBLASLt int8 GEMM (``torch._int_mm``) on int8 activations s = q − qmin − 128, then
    maskaq's fused epilogue kernel (``maskaq.ops.int8_linear_epilogue``: dequantize, bias,
    optional GELU and requantization in one pass over the int32 accumulators).
  - Weights of <= 4 bits are kept as int8 in memory (no x86 int4×int8 GEMM kernel exists in
    torch: the int8 kernel runs them), and packed two per byte by ``save_integer``.
* ``IntMlp``: fc1 → GELU → fc2 with GELU and the requantization to fc2's grid in fc1's epilogue
  (CPU: oneDNN's, fc1 writes uint8; CUDA: maskaq's, fc1 writes fc2's int8): no float hidden
  activation, no separate GELU or quantize pass.
* ``IntAttention``: timm ViT attention. qkv's epilogue is folded so that it directly yields
  q/α (per slice), so the integer q, k, v are one round + one clamp of its output; the two
  products run on those integers (float32 arithmetic, exact while the sums stay below 2^24 —
  true for 8-bit operands and head dims up to 64 with N ≤ 197; beyond that the error is one
  float rounding); the 1/(α_p·α_v) of the second product is folded into proj's input scale.
  On CPU it loops over the samples so that bmm reads q, k, v in place (no permute copies) and
  writes O in the layout proj reads. On CUDA both products run on int8 tensor cores in one maskaq
  kernel (``maskaq.ops.int8_attention``: exact int32 products, the softmax and P's quantization
  between them); q, k, v whose centred grid does not fit int8 are passed shifted, with a zero point.
* Without the extension's CUDA kernels (``maskaq.extension_info()["with_cuda"]`` False) the CUDA
  path warns once and runs the plain-PyTorch epilogue and float32 attention products instead.
  The CUDA kernels are compiled in CI but have not yet run on a GPU (tests/test_int_ops.py holds
  their GPU tests).
* ``IntConv2d``: the patch embedding. Its input (the image) is full precision in the student, so
  it runs as a float convolution with the dequantized integer weights (exactly the fake-quant
  result); with a quantized input (abits set) it runs as patchify + IntLinear.

Where rounding of the integer path differs from the fake-quant path (the kernel multiplies by
1/α where the fake quant divides by α, and rounds round(x/α) + z where it rounds round(x/α + z);
both differ only when x/α lies within one float ulp of a .5 tie), one integer step differs.
"""
from __future__ import annotations

import functools
import math
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from maskaq import ops

__all__ = [
    "ActGrid",
    "IntLinear",
    "IntAttention",
    "IntConv2d",
    "integer_grid",
    "stored_bytes",
    "IntMlp",
    "KERNELS",
    "set_kernel",
    "cpu_int8_pairs_saturate",
    "cpu_integer_path",
]

# CPU GEMM libraries of IntLinear. "onednn": onednn::qlinear_pointwise on uint8 activations
# (fused GELU / requantization epilogues; measured faster here); "fbgemm": fbgemm's
# float-in/float-out quantized linear (quantizes its input inside the op).
KERNELS = ("onednn", "fbgemm")
DEFAULT_KERNEL = "onednn"
INT16_MAX = 32767


def _saturation_probe(gemm) -> bool:
    """Whether ``gemm(u, w)`` (uint8 (M, K) by int8 (N, K) -> float (M, N)) differs from the exact
    result on operands whose every adjacent pair of products overflows int16."""
    m, k, n = 32, 64, 16
    u = torch.full((m, k), 255, dtype=torch.uint8)
    w = torch.where(torch.arange(n)[:, None] % 2 == 0, 127, -128).expand(n, k).to(torch.int8).contiguous()
    exact = (255.0 * k) * w[:, 0].double()  # |acc| = 2,088,960 < 2^24: exact in a float32 output
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized dtypes are deprecated in torch >= 2.10
        return not torch.equal(gemm(u, w).double(), exact.expand(m, n))


def _onednn_gemm(u, w):
    n = w.shape[0]
    packed = torch.ops.onednn.qlinear_prepack(w, None)
    return torch.ops.onednn.qlinear_pointwise(u, 1.0, 0, packed, torch.ones(n), torch.zeros(n, dtype=torch.int32),
                                              None, 1.0, 0, torch.float32, "none", [], "")


def _fbgemm_gemm(u, w):
    n = w.shape[0]
    previous = torch.backends.quantized.engine
    try:
        torch.backends.quantized.engine = "x86"
        qw = torch._make_per_channel_quantized_tensor(w, torch.ones(n, dtype=torch.float64),
                                                      torch.zeros(n, dtype=torch.long), 0)
        packed = torch.ops.quantized.linear_prepack(qw, None)
    finally:
        torch.backends.quantized.engine = previous
    return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(u.float(), 1.0, 0, packed)


def _int_mm_gemm(u, w):
    s = (u.to(torch.int16) - 128).to(torch.int8)  # the int8 operand of the CUDA path: -128 everywhere
    return torch._int_mm(s, w.t()).double() + 128.0 * w.double().sum(1)


_GEMMS = {"onednn": _onednn_gemm, "fbgemm": _fbgemm_gemm, "int_mm": _int_mm_gemm}


@functools.lru_cache(maxsize=None)
def cpu_int8_pairs_saturate(kernel: str) -> bool:
    """Whether the CPU library ``kernel`` ("onednn", "fbgemm", or "int_mm" for ``torch._int_mm``)
    adds adjacent int8 products in int16 with saturation on this machine. x86 CPUs without VNNI
    (AVX2; AVX512 before Cascade Lake) multiply u8·s8 with ``vpmaddubsw``, which clips each pair
    sum u1·w1 + u2·w2 to [-32768, 32767] (255·127·2 does not fit); VNNI's ``vpdpbusd`` adds in
    int32. Measured once per process, not inferred from CPU flags, so that library settings
    (``DNNL_MAX_CPU_ISA``, ``FBGEMM_ENABLE_INSTRUCTIONS``) count."""
    if kernel not in _GEMMS:
        raise ValueError(f"unknown CPU int8 GEMM {kernel!r}; choose one of {', '.join(_GEMMS)}")
    return _saturation_probe(_GEMMS[kernel])


def cpu_integer_path() -> dict:
    """How this machine runs IntLinear on the CPU: ATen's CPU capability and, per kernel, whether
    its int8 GEMM saturates pair sums (then 8-bit weights against 8-bit activations run split)."""
    saturate = {kernel: cpu_int8_pairs_saturate(kernel) for kernel in KERNELS}
    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(),
            **{f"{kernel}_int8": "split-weights (int16 pair sums saturate)" if sat else "direct (int32 pair sums)"
               for kernel, sat in saturate.items()}}


_warned_no_cuda_kernels = False


def _cuda_kernels(device) -> bool:
    """Whether maskaq's CUDA integer kernels run on ``device``; warns once when the extension was
    built without them (the callers then fall back to plain PyTorch)."""
    global _warned_no_cuda_kernels
    if ops.integer_kernels_available(device):
        return True
    if not _warned_no_cuda_kernels:
        _warned_no_cuda_kernels = True
        warnings.warn("maskaq._C has no CUDA kernels (maskaq.extension_info()['with_cuda'] is False): on CUDA, "
                      "IntLinear runs its epilogue as plain PyTorch ops and IntAttention its products in float32. "
                      "Rebuild with a CUDA toolkit (MASKAQ_CUDA=1 pip install --no-build-isolation -e .) for the "
                      "fused int8 kernels.", RuntimeWarning, stacklevel=3)
    return False


@functools.lru_cache(maxsize=None)
def _has_int8_tensor_cores(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (7, 2)


def _check_kernel(kernel: str) -> str:
    if kernel not in KERNELS:
        raise ValueError(f"integer kernel must be one of {KERNELS}, got {kernel!r}")
    return kernel


def set_kernel(model: nn.Module, kernel: str) -> nn.Module:
    """Switch every IntLinear of ``model`` to the CPU library ``kernel`` ("onednn" or "fbgemm")."""
    _check_kernel(kernel)
    for m in model.modules():
        if isinstance(m, IntLinear):
            m.set_kernel(kernel)
    return model


class ActGrid:
    """The integer grid of one LSQ activation quantizer: step α, integer zero point z, [qmin, qmax]."""

    __slots__ = ("step", "zero_point", "qmin", "qmax", "bits")

    def __init__(self, step: float, zero_point: int, qmin: int, qmax: int, bits: int):
        if not (math.isfinite(step) and step > 0):
            raise ValueError(f"activation step must be a positive finite number, got {step}")
        if qmax - qmin > 255:
            raise ValueError(f"activation grids wider than 8 bits are not supported (qmin={qmin}, qmax={qmax})")
        self.step, self.zero_point, self.qmin, self.qmax, self.bits = float(step), int(zero_point), int(qmin), int(qmax), int(bits)

    @classmethod
    def from_quantizer(cls, quantizer) -> "ActGrid":
        if not quantizer.initialized:
            raise ValueError("activation quantizer is not calibrated; call maskaq.quant.calibrate(qmodel, images) "
                             "before export_integer")
        return cls(float(quantizer.step.detach()), int(torch.round(quantizer.zero_point.detach())),
                   quantizer.qmin, quantizer.qmax, quantizer.bits)

    def as_tensor(self) -> torch.Tensor:
        """[step, zero_point, qmin, qmax, bits] as float64 (exact for these values): the saved form."""
        return torch.tensor([self.step, self.zero_point, self.qmin, self.qmax, self.bits], dtype=torch.float64)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> "ActGrid":
        v = t.tolist()
        return cls(v[0], int(v[1]), int(v[2]), int(v[3]), int(v[4]))

    @property
    def full_uint8(self) -> bool:
        """True when u = q − qmin spans exactly [0, 255] (the kernel's own clamp is the grid's)."""
        return self.qmax - self.qmin == 255

    def __repr__(self):
        return f"ActGrid(step={self.step:.4g}, zero_point={self.zero_point}, range=[{self.qmin}, {self.qmax}])"


def integer_grid(x: torch.Tensor, grid: ActGrid) -> torch.Tensor:
    """(q − z) as float: the exact integers of the fake-quant value x̂ = (q − z)·α."""
    q = torch.div(x, grid.step).add_(grid.zero_point).round_().clamp_(grid.qmin, grid.qmax)
    return q.sub_(grid.zero_point)


def _grid_buffer(module: nn.Module, name: str, grid: Optional[ActGrid]) -> None:
    module.register_buffer(name, grid.as_tensor() if grid is not None else torch.zeros(5, dtype=torch.float64))


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

    def _weight_scales(self) -> torch.Tensor:
        """Per-channel scales of the kernel's weights: s_w·output_scale·prescale (float64)
        (the kernel multiplies the accumulator by its input step α/prescale and these)."""
        return self.weight_scale.double() * self.output_scale.double() * self._prescale

    # -- CPU ---------------------------------------------------------------------------------
    def _pairs_overflow_int16(self) -> bool:
        """Whether two adjacent products u·w of this layer's operands can leave int16: the pair sums
        a saturating CPU kernel (see ``cpu_int8_pairs_saturate``) would clip."""
        widest_u = self._grid.qmax - self._grid.qmin
        widest_w = int(self.weight_int.to(torch.int16).abs().max()) if self.weight_int.numel() else 0
        return 2 * widest_u * widest_w > INT16_MAX

    def _kernel_weights(self):
        """(int8 weights, per-channel scales, bias) the CPU kernel packs. Where this CPU's int8 GEMM
        saturates pair sums and this layer's operands can overflow them, W = 2·W_hi + W_lo with
        W_hi = floor(W/2) ∈ [-64, 63] and W_lo ∈ {0, 1}: both halves keep every pair sum within
        int16 (2·255·64 < 2^15), so one GEMM over the stacked halves gives exact accumulators and
        the two halves of its output add up to the layer's result (``_split``)."""
        w_scales, bias = self._weight_scales(), self._bias()
        self._split = self._pairs_overflow_int16() and cpu_int8_pairs_saturate(self.kernel)
        if not self._split:
            return self.weight_int, w_scales, bias
        w = self.weight_int.to(torch.int16)
        high = torch.div(w, 2, rounding_mode="floor")
        weights = torch.cat([high, w - 2 * high]).to(torch.int8)
        return weights, torch.cat([2 * w_scales, w_scales]), torch.cat([bias, torch.zeros_like(bias)])

    def _pack_cpu(self):
        self._split = False
        if not self.quantized_input:  # weight-only: float GEMM on the dequantized weights
            w = (self.weight_int.double() * (self.weight_scale.double() * self.output_scale.double())[:, None])
            return ("float", w.float(), self._bias())
        weights, w_scales, bias = self._kernel_weights()
        if self.kernel == "onednn":
            packed = torch.ops.onednn.qlinear_prepack(weights, None)
            return ("onednn", packed, w_scales.float(), torch.zeros(weights.shape[0], dtype=torch.int32), bias)
        # fbgemm: the packed weights keep the engine they were packed with.
        previous = torch.backends.quantized.engine
        try:
            torch.backends.quantized.engine = "x86"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # quantized dtypes are deprecated in torch >= 2.10
                qw = torch._make_per_channel_quantized_tensor(
                    weights, w_scales, torch.zeros(weights.shape[0], dtype=torch.long), 0)
                packed = torch.ops.quantized.linear_prepack(qw, bias)
        finally:
            torch.backends.quantized.engine = previous
        return ("fbgemm", packed)

    def _cpu_packed(self):
        kind = self.kernel if self.quantized_input else "float"
        if self._packed is None or self._packed[0] != kind:
            self._packed = self._pack_cpu()
        return self._packed

    @property
    def splits_weights(self) -> bool:
        """True when the CPU kernel runs this layer's weights as two halves (see ``_kernel_weights``):
        exact, at twice the GEMM work, on CPUs whose int8 GEMM saturates (no VNNI)."""
        self._cpu_packed()
        return self._split

    def _join_halves(self, y: torch.Tensor) -> torch.Tensor:
        return y[:, :self.out_features] + y[:, self.out_features:] if self._split else y

    def quantize_input(self, x2d: torch.Tensor) -> torch.Tensor:
        """uint8 u = q − qmin of a float input (the kernel's activation operand)."""
        grid = self._grid
        step, zp = self.kernel_step(), self.kernel_zero_point()
        if not grid.full_uint8:  # the uint8 clamp is wider than the grid: clamp to the grid first
            lo, hi = (grid.qmin - grid.zero_point) * step, (grid.qmax - grid.zero_point) * step
            x2d = x2d.clamp(lo, hi)
        if 0 <= zp <= 255:  # one vectorized pass; the quint8 bytes are then read as uint8, no copy
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # quantized dtypes are deprecated in torch >= 2.10
                qx = torch.quantize_per_tensor(x2d, step, zp, torch.quint8)
            # (Tensor.view(torch.uint8) on a quint8 tensor is not a real view and crashes; set_
            # on its storage is. int_repr() would copy.)
            return torch.empty(0, dtype=torch.uint8).set_(qx.untyped_storage(), qx.storage_offset(),
                                                          qx.shape, qx.stride())
        return torch.div(x2d, step).round_().add_(zp).clamp_(0, 255).to(torch.uint8)

    def run_uint8(self, u: torch.Tensor, act: Optional[str] = None, out: Optional["IntLinear"] = None):
        """oneDNN GEMM on uint8 activations u (on this layer's grid), bias and an optional GELU
        ("gelu" or "gelu_tanh") fused in the epilogue; with ``out`` the result is requantized
        to ``out``'s input grid (uint8) in the same epilogue, else float32."""
        packed = self._cpu_packed()
        if packed[0] != "onednn":
            raise RuntimeError("run_uint8 needs the onednn kernel")
        if self._split and (act is not None or out is not None):
            raise RuntimeError("a split-weight layer (see splits_weights) cannot fuse an epilogue")
        _, weight, w_scales, w_zeros, bias = packed
        post, algorithm = ("none", "") if act is None else ("gelu", "tanh" if act == "gelu_tanh" else "none")
        if out is None:
            out_scale, out_zp, dtype = 1.0, 0, torch.float32
        else:
            out_scale, out_zp, dtype = out.kernel_step(), out.kernel_zero_point(), None
        y = torch.ops.onednn.qlinear_pointwise(u, self.kernel_step(), self.kernel_zero_point(), weight, w_scales,
                                               w_zeros, bias, out_scale, out_zp, dtype, post, [], algorithm)
        return self._join_halves(y)

    def _cpu_forward(self, x2d: torch.Tensor) -> torch.Tensor:
        packed = self._cpu_packed()
        if packed[0] == "float":
            return F.linear(x2d, packed[1], packed[2])
        if packed[0] == "onednn":
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


class IntMlp(nn.Module):
    """timm Mlp (fc1 → GELU → fc2) with fc1's GELU and the requantization to fc2's input grid
    fused in fc1's oneDNN epilogue: fc1 emits uint8 on fc2's grid, so the 4·D-wide hidden
    activation is written once, as bytes, and never re-read as float (CPU, onednn kernel, 8-bit
    fc2 grid). Otherwise it runs fc1, the activation module and fc2 one after the other."""

    def __init__(self, fc1: IntLinear, fc2: IntLinear, act: nn.Module):
        super().__init__()
        self.fc1, self.act, self.fc2 = fc1, act, fc2
        approximate = getattr(act, "approximate", None)
        self.act_name = None if type(act) is not nn.GELU else ("gelu_tanh" if approximate == "tanh" else "gelu")

    def _fusable(self, x: torch.Tensor) -> bool:
        return (x.device.type == "cpu" and self.act_name is not None and self.fc1.kernel == "onednn"
                and self.fc2.kernel == "onednn" and self.fc1.quantized_input and self.fc2.quantized_input
                and self.fc2.grid.full_uint8 and not self.fc1.splits_weights)

    def _cuda_fusable(self, x: torch.Tensor) -> bool:
        # maskaq's epilogue has erf GELU only (not the tanh approximation)
        return (x.is_cuda and self.act_name == "gelu" and self.fc2.quantized_input
                and ops.integer_kernels_available(x.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cuda = self._cuda_fusable(x)
        if not (cuda or self._fusable(x)):
            return self.fc2(self.act(self.fc1(x)))
        shape = x.shape
        x2d = x.reshape(-1, shape[-1]).contiguous()
        if cuda:
            if x2d.dtype not in (torch.float32, torch.uint8):
                x2d = x2d.float()
            hidden = self.fc1._cuda_forward(x2d, activation="gelu", out=self.fc2)  # int8 on fc2's grid
            y = self.fc2._cuda_forward(hidden)
        else:
            if x2d.dtype != torch.float32:
                x2d = x2d.float()
            hidden = self.fc1.run_uint8(self.fc1.quantize_input(x2d), act=self.act_name, out=self.fc2)
            y = self.fc2.run_uint8(hidden)
        return y.reshape(*shape[:-1], self.fc2.out_features)


class IntConv2d(nn.Module):
    """Patch-embedding convolution with integer weights; see the module doc."""

    def __init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, wbits,
                 grid: Optional[ActGrid]):
        super().__init__()
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size, self.stride = tuple(kernel_size), tuple(stride)
        self.padding, self.dilation, self.groups = tuple(padding), tuple(dilation), int(groups)
        self.wbits = int(wbits)
        self.register_buffer("weight_int", torch.zeros(out_channels, in_channels // groups, *self.kernel_size,
                                                       dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_channels))
        self.register_buffer("bias", torch.zeros(out_channels))
        _grid_buffer(self, "input_grid", grid)
        self.quantized_input = grid is not None
        self._cache = None

    @classmethod
    def from_quant(cls, qconv) -> "IntConv2d":
        grid = None if qconv.input_quantizer is None else ActGrid.from_quantizer(qconv.input_quantizer)
        module = cls(qconv.in_channels, qconv.out_channels, qconv.kernel_size, qconv.stride, qconv.padding,
                     qconv.dilation, qconv.groups, qconv.wbits, grid).to(qconv.weight.device)
        w_int, w_scale = qconv.weight_quantizer.integer_weight(qconv.weight.detach())
        module.weight_int.copy_(w_int)
        module.weight_scale.copy_(w_scale.float())
        if qconv.bias is not None:
            module.bias.copy_(qconv.bias.detach().float())
        return module

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._cache = None

    def _apply(self, fn, *args, **kwargs):
        self._cache = None
        return super()._apply(fn, *args, **kwargs)

    def _is_patchify(self) -> bool:
        return (self.kernel_size == self.stride and self.padding == (0, 0) and self.dilation == (1, 1)
                and self.groups == 1)

    def _build(self, device):
        if self.quantized_input and self._is_patchify():
            linear = IntLinear(self.weight_int[0].numel(), self.out_channels, self.wbits,
                               ActGrid.from_tensor(self.input_grid)).to(device)
            linear.weight_int.copy_(self.weight_int.reshape(self.out_channels, -1))
            linear.weight_scale.copy_(self.weight_scale)
            linear.bias.copy_(self.bias)
            return ("linear", linear)
        w = self.weight_int.float() * self.weight_scale.view(-1, 1, 1, 1)
        return ("float", w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._cache is None or self._cache[-1] != x.device:
            self._cache = self._build(x.device) + (x.device,)
        kind = self._cache[0]
        if kind == "linear":
            B, C, H, W = x.shape
            kh, kw = self.kernel_size
            gh, gw = H // kh, W // kw
            patches = (x[:, :, : gh * kh, : gw * kw].reshape(B, C, gh, kh, gw, kw)
                       .permute(0, 2, 4, 1, 3, 5).reshape(B, gh * gw, C * kh * kw))
            y = self._cache[1](patches)
            return y.transpose(1, 2).reshape(B, self.out_channels, gh, gw)
        if self.quantized_input:  # a general convolution on a quantized input: exact float conv
            g = ActGrid.from_tensor(self.input_grid)
            x = integer_grid(x, g) * g.step
        return F.conv2d(x, self._cache[1], self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"wbits={self.wbits}, input={'float' if not self.quantized_input else ActGrid.from_tensor(self.input_grid)}")


class IntAttention(nn.Module):
    """timm ViT attention on integer q, k, P, v (see the module doc).

    ``folded`` (set when q_norm/k_norm/norm are Identity and there is no gate): qkv returns the
    scaled values (q/α_q, k/α_k, v/α_v) and proj takes O/(α_p·α_v); otherwise the float
    operations between the products run in float as in the student.
    """

    def __init__(self, num_heads: int, head_dim: int, scale: float, qkv: IntLinear, proj: IntLinear,
                 grids: tuple, q_norm=None, k_norm=None, norm=None, gate=None):
        super().__init__()
        self.num_heads, self.head_dim, self.scale = int(num_heads), int(head_dim), float(scale)
        self.attn_dim = self.num_heads * self.head_dim
        self.qkv, self.proj = qkv, proj
        self.q_norm = q_norm if q_norm is not None else nn.Identity()
        self.k_norm = k_norm if k_norm is not None else nn.Identity()
        self.norm = norm if norm is not None else nn.Identity()
        self.gate = gate
        self.register_buffer("grids", torch.stack([g.as_tensor() for g in grids]) if grids[0] is not None
                             else torch.zeros(4, 5, dtype=torch.float64))
        self.register_buffer("folded_flag", torch.tensor(False))
        self._grid_cache = None

    @classmethod
    def from_quant(cls, qattn, fold: bool = True, kernel: str = DEFAULT_KERNEL) -> "IntAttention":
        grids = tuple(ActGrid.from_quantizer(qz) for qz in qattn.attn_quantizers)
        gate = None if getattr(qattn, "gate", None) is None else IntLinear.from_quant(qattn.gate, kernel)
        module = cls(qattn.num_heads, qattn.head_dim, qattn.scale, IntLinear.from_quant(qattn.qkv, kernel),
                     IntLinear.from_quant(qattn.proj, kernel), grids, qattn.q_norm, qattn.k_norm, qattn.norm, gate)
        if fold and module.can_fold():
            module.fold()
        return module

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._grid_cache = None

    @property
    def attn_grids(self) -> tuple:
        if self._grid_cache is None:
            self._grid_cache = tuple(ActGrid.from_tensor(t) for t in self.grids.cpu())
        return self._grid_cache

    @property
    def folded(self) -> bool:
        return bool(self.folded_flag)

    def can_fold(self) -> bool:
        return (all(isinstance(m, nn.Identity) for m in (self.q_norm, self.k_norm, self.norm))
                and self.gate is None and self.qkv.quantized_input and self.proj.quantized_input)

    @torch.no_grad()
    def fold(self) -> None:
        """Fold 1/α_{q,k,v} into qkv's epilogue and α_p·α_v into proj's input step."""
        if self.folded:
            return
        gq, gk, gp, gv = self.attn_grids
        d = self.attn_dim
        scale = torch.cat([torch.full((d,), 1.0 / g.step, dtype=torch.float64) for g in (gq, gk, gv)])
        self.qkv.fold_output_scale(scale)
        self.proj.fold_input_prescale(gp.step * gv.step)
        self.folded_flag.fill_(True)

    @staticmethod
    def _uses_int8_kernel(x: torch.Tensor) -> bool:
        """CUDA with maskaq's kernels and int8 tensor cores (else the float32 products, with a warning)."""
        return x.is_cuda and _cuda_kernels(x.device) and _has_int8_tensor_cores(x.device.index or 0)

    def _kernel_products(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """O/(α_p·α_v) as (B, N, H·d) from float tensors q, k, v (B, H, N, d) holding the integers q − z
        (modified in place), by maskaq's int8_attention: both products exact in int32 (CUDA: on int8
        tensor cores), the softmax and P's quantization between them — the integers of the CPU path."""
        B, H, N, d = q.shape
        gq, gk, gp, gv = self.attn_grids
        q8, k8, v8, zq, zk, zv = _int8_operands((q, k, v), (gq, gk, gv))
        out = ops.int8_attention(q8, k8, v8, gq.step * gk.step * self.scale, gp.step, gp.zero_point, gp.qmin,
                                 gp.qmax, zq, zk, zv)
        return out.transpose(1, 2).reshape(B, N, self.attn_dim)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
        if attn_mask is not None or is_causal:
            raise ValueError("IntAttention does not support attn_mask / is_causal (classification ViTs do not use them)")
        B, N, _ = x.shape
        H, d = self.num_heads, self.head_dim
        gq, gk, gp, gv = self.attn_grids
        qkv = self.qkv(x).view(B, N, 3, H, d)
        if self.folded:
            # qkv already holds x/α per slice: one round and one clamp give (q − z) for q, k and v.
            qkv = qkv.round_()
            lo = [g.qmin - g.zero_point for g in (gq, gk, gv)]
            hi = [g.qmax - g.zero_point for g in (gq, gk, gv)]
            if len(set(lo)) == 1 and len(set(hi)) == 1:
                qkv.clamp_(lo[0], hi[0])
            else:  # one in-place scalar clamp per slice: a clamp with broadcast tensor bounds is ~5x slower
                for i in range(3):
                    qkv[:, :, i].clamp_(lo[i], hi[i])
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            q, k = self.q_norm(q), self.k_norm(k)
            q, k, v = integer_grid(q, gq), integer_grid(k, gk), integer_grid(v, gv)
        c = gq.step * gk.step * self.scale
        p_lo, p_hi = gp.qmin - gp.zero_point, gp.qmax - gp.zero_point
        if self._uses_int8_kernel(x):
            out = self._kernel_products(q, k, v)
        elif x.is_cuda:
            # Fallback: batched float products of the integers (exact, see module doc).
            logits = q @ k.transpose(-2, -1)
            p = torch.softmax(logits.mul_(c), dim=-1).div_(gp.step).round_().clamp_(p_lo, p_hi)
            out = (p @ v).transpose(1, 2).reshape(B, N, self.attn_dim)
        else:
            # O is written straight into the (B, N, H, d) layout proj reads (bmm takes a strided out=).
            out = torch.empty(B, N, H, d, dtype=qkv.dtype, device=qkv.device)
            # One sample at a time: bmm reads the strided q, k, v views of the qkv output directly
            # (the batched matmul would first copy them into contiguous (B, H, N, d) tensors).
            for b in range(B):
                logits = torch.bmm(q[b], k[b].transpose(-2, -1))  # integers: exact in float32 (module doc)
                probs = torch.softmax(logits.mul_(c), dim=-1)
                # round(P/α_p) clamped to [qmin − z, qmax − z]: (q − z) of P (round(P/α + z) − z but at ties)
                p = probs.div_(gp.step).round_().clamp_(p_lo, p_hi)
                torch.bmm(p, v[b], out=out[b].transpose(0, 1))  # integers times integers: O/(α_p·α_v)
            out = out.view(B, N, self.attn_dim)
        if not self.folded:
            out = self.norm(out * (gp.step * gv.step))
            if self.gate is not None:
                out = out * self.gate(x).sigmoid()
        return self.proj(out)


def _int8_operands(tensors: tuple, grids: tuple) -> tuple:
    """int8 copies (B, H, N, d), contiguous, of float tensors holding the integers q − z of their grids,
    and the zero points to pass to int8_attention. A centred grid [qmin − z, qmax − z] that does not
    fit int8 (e.g. [-127, 128] for z = -1) is stored shifted by o = qmin − z + 128, zero point −o.
    The tensors are modified in place when shifted (they are the caller's scratch)."""
    B, H, N, d = tensors[0].shape
    packed = torch.empty((len(tensors), B, H, N, d), dtype=torch.int8, device=tensors[0].device)
    zero_points = []
    for i, (t, g) in enumerate(zip(tensors, grids)):
        lo, hi = g.qmin - g.zero_point, g.qmax - g.zero_point
        shift = 0 if (lo >= -128 and hi <= 127) else lo + 128
        packed[i].copy_(t.sub_(shift) if shift else t)  # exact integers: the cast is exact
        zero_points.append(-shift)
    return (*packed.unbind(0), *zero_points)


def stored_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers (+ the prepacked int8 copies of IntLinear)."""
    total = sum(p.numel() * p.element_size() for p in module.parameters())
    total += sum(b.numel() * b.element_size() for b in module.buffers())
    total += sum(m.weight_int.numel() for m in module.modules() if isinstance(m, IntLinear))
    return total
