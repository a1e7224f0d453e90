"""Fake quantizers of the MaskAQ student (docs/method.md#the-quantizer).

Two kinds:

* ``LsqActQuantizer`` — per-tensor activation quantizer with a learnable step α and a
  learnable zero point z (LSQ). Signed range [-2^(a-1), 2^(a-1)-1] when the first
  calibration tensor has min < 1e-5, else unsigned [0, 2^a-1]. Init α = 2·mean|x|/sqrt(qmax),
  z = 0.1·(min x − α·qmax). Forward
  x̂ = (round(clamp(x/α + round(z), qmin, qmax)) − round(z))·α, straight-through on both
  roundings; the gradient of α is scaled by g = 1/sqrt(numel(x)·qmax), that of z is not (the
  public code as it runs: its 0.01 factor reaches only the classifier head's input, and the
  zero point's scaled copy is overwritten before use;
  docs/method.md#where-the-defaults-differ-from-the-public-code-and-why).
* ``WeightQuantizer`` — per-output-channel symmetric quantizer of a weight tensor:
  ``"minmax"`` (step = 2·max|w|/(2^w − 1) of each output channel, recomputed every forward, no
  parameters) or ``"lsq"`` (a learnable per-channel step initialized to the same min/max value).
  Integers lie in [-2^(w-1), 2^(w-1)-1]: all 2^w levels, as the public code (a grid of
  ±(2^(w-1)-1) wastes one level: 7 instead of 8 at 3 bits). The zero point is exactly 0, and
  the integers fit int8 for the integer kernels.

An activation quantizer that was never calibrated raises a RuntimeError in forward: running a
student whose steps still hold placeholder values would give silently wrong numbers.
``maskaq.quant.calibrate`` switches quantizers to calibration mode, where the first tensor each
one sees initializes it; later calibration tensors leave it unchanged (LSQ keeps its init).
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from maskaq.reference import lsq_grad_scale  # the one g of docs/method.md#the-quantizer, shared with the reference
from maskaq.runtime import world_size

__all__ = [
    "LSQ_GRAD_SCALE",
    "MIN_BITS",
    "MAX_BITS",
    "check_bits",
    "act_range",
    "lsq_grad_scale",
    "lsq_fake_quant",
    "symmetric_weight_step",
    "symmetric_weight_integers",
    "LsqActQuantizer",
    "WeightQuantizer",
]

MIN_BITS = 2
MAX_BITS = 8
# The constant of docs/method.md's step-gradient scale g = 1 / sqrt(numel(x)·qmax) (#the-quantizer),
# as the public code runs; maskaq::fq_attention uses the same value, so linear inputs and attention
# operands learn at the same rate. (With the 0.01 its flags read, the steps barely move in a short QAT.)
LSQ_GRAD_SCALE = 1.0
SIGNED_THRESHOLD = 1e-5
WEIGHT_METHODS = ("minmax", "lsq")


INIT_METHODS = ("lsq", "minmax", "mse")
# mse init: the min-max range shrunk by each of these factors (1 down to 0.01, 5 % apart: ViT
# activations can have outliers 50x their bulk), the one with the least squared quantization error
# wins; searched on at most MSE_SEARCH_ELEMENTS evenly strided values.
MSE_CLIP_FACTORS = tuple(0.95 ** i for i in range(90))
MSE_SEARCH_ELEMENTS = 1 << 20


def check_bits(bits, what: str = "bits") -> int:
    """Return ``bits`` as an int if it is an integer in [2, 8]; raise ValueError otherwise.

    bool is refused even though it is an int subclass: ``True`` as a bit width is a bug.
    """
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral):
        raise ValueError(
            f"{what} must be an integer between {MIN_BITS} and {MAX_BITS}, got {bits!r} "
            f"({type(bits).__name__}); pass e.g. {what}=4"
        )
    bits = int(bits)
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(
            f"{what} must be between {MIN_BITS} and {MAX_BITS}, got {bits}; "
            "1-bit and >8-bit fake quantization are not supported (use the FP model for >8 bits)"
        )
    return bits


def act_range(bits: int, signed: bool) -> tuple[int, int]:
    """(qmin, qmax) of an activation quantizer."""
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _sum_to_shape(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum a broadcast gradient back to the shape of the parameter it belongs to."""
    if grad.shape == shape:
        return grad
    lead = grad.dim() - len(shape)
    grad = grad.sum(dim=tuple(range(lead))) if lead > 0 else grad
    dims = tuple(i for i, s in enumerate(shape) if s == 1 and grad.shape[i] != 1)
    if dims:
        grad = grad.sum(dim=dims, keepdim=True)
    return grad.reshape(shape)


class _LsqFakeQuant(torch.autograd.Function):
    """x̂ = (round(clamp(x/α + round(z), qmin, qmax)) − round(z))·α with LSQ gradients.

    A custom Function rather than a chain of differentiable ops so that the backward keeps only
    x, α and z (the chained version keeps four x-sized intermediates per quantizer).
    Gradients (STE on both roundings, u = x/α + round(z), inside = qmin ≤ u ≤ qmax):
      dx̂/dx = inside;  dx̂/dα = round(clamp(u)) − round(z) − inside·x/α;  dx̂/dz = −α·(1 − inside);
    the α gradient is multiplied by g, the z gradient is not.
    """

    @staticmethod
    def forward(ctx, x, step, zero_point, qmin, qmax, grad_scale):
        z_int = torch.round(zero_point)
        q = torch.clamp(x / step + z_int, qmin, qmax).round_()
        ctx.save_for_backward(x, step, zero_point)
        ctx.qrange = (qmin, qmax)
        ctx.grad_scale = grad_scale
        return (q - z_int) * step

    @staticmethod
    def backward(ctx, grad_out):
        x, step, zero_point = ctx.saved_tensors
        qmin, qmax = ctx.qrange
        z_int = torch.round(zero_point)
        x_over_step = x / step
        u = x_over_step + z_int
        inside = (u >= qmin) & (u <= qmax)
        grad_x = grad_y = grad_z = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out * inside
        if ctx.needs_input_grad[1]:
            d_step = torch.clamp(u, qmin, qmax).round_() - z_int - torch.where(inside, x_over_step, 0.0)
            grad_y = _sum_to_shape(grad_out * d_step, step.shape) * ctx.grad_scale
        if ctx.needs_input_grad[2]:
            d_zero = torch.where(inside, 0.0, -step)
            grad_z = _sum_to_shape(grad_out * d_zero, zero_point.shape)
        return grad_x, grad_y, grad_z, None, None, None


def lsq_fake_quant(
    x: torch.Tensor,
    step: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    grad_scale: float | None = None,
) -> torch.Tensor:
    """LSQ fake quantization of ``x`` (step and zero_point broadcast against x).

    ``grad_scale`` (of the step's gradient) defaults to docs/method.md's g = 1/sqrt(numel(x)·qmax)
    (#the-quantizer); the zero point's gradient is not scaled.
    """
    if (step.numel() == 1 and zero_point.numel() == 1 and x.device.type == "cpu"
            and not (torch.is_grad_enabled() and (step.requires_grad or zero_point.requires_grad))):
        from maskaq import ops  # a fixed per-tensor grid (a frozen student): one fused pass each way
        # bf16 / fp16 (autocast) quantize in float32 on the float32 grid, as the student is evaluated,
        # instead of on a step rounded to 8 bits; x̂ = level·α comes back in x's dtype
        wide = ops.widened_for_cpu(x)
        if ops.uses_extension(wide):
            return ops.lsq_fake_quant(wide, step, zero_point, qmin, qmax).to(x.dtype)
    step = step.to(x.dtype)
    zero_point = zero_point.to(x.dtype)
    if grad_scale is None:
        # Under DDP x is this rank's share of the global batch: g is that of the whole batch, as in
        # a one-process run, so that N processes train like one.
        grad_scale = LSQ_GRAD_SCALE * lsq_grad_scale(x.numel() * world_size(), qmax)
    return _LsqFakeQuant.apply(x, step, zero_point, int(qmin), int(qmax), float(grad_scale))


def _least_error_clip(x: torch.Tensor, qmin: int, qmax: int) -> float:
    """The factor c of MSE_CLIP_FACTORS whose grid over c·[min x, max x] quantizes x with the least
    squared error (the mse init)."""
    flat = x.reshape(-1)
    if flat.numel() > MSE_SEARCH_ELEMENTS:
        flat = flat[:: -(-flat.numel() // MSE_SEARCH_ELEMENTS)]
    x_min, x_max = x.min(), x.max()
    best, best_error = 1.0, math.inf
    for factor in MSE_CLIP_FACTORS:
        lo, hi = x_min * factor, x_max * factor
        step = ((hi - lo) / (qmax - qmin)).clamp_min(1e-8)
        z_int = torch.round(qmin - lo / step)  # as the quantizer's forward rounds it
        q = torch.clamp(flat / step + z_int, qmin, qmax).round_()
        error = ((q - z_int) * step - flat).square().sum().item()
        if error < best_error:
            best, best_error = factor, error
    return best


def _weight_absmax(weight: torch.Tensor) -> torch.Tensor:
    reduce_dims = tuple(range(1, weight.dim()))
    absmax = weight.detach().abs().amax(dim=reduce_dims, keepdim=True) if reduce_dims else weight.detach().abs()
    # A channel of zeros would give step 0 and a division by zero; any positive step maps it to 0.
    return absmax.clamp_min(1e-12)


def symmetric_weight_step(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-output-channel step 2·max|w|/(2^bits − 1) (the public code's full grid), shaped to
    broadcast against ``weight``."""
    return 2.0 * _weight_absmax(weight) / (2 ** bits - 1)


def symmetric_weight_integers(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(integers in [-2^(bits-1), 2^(bits-1)-1] as floats, per-channel step) of a min/max weight grid.

    The integers are round(w·(2^bits − 1)/(2·max|w|)), multiplied by the inverse step as the public
    code does: the extreme weights sit at ±(2^(bits-1) − ½), so the most negative rounds (half to
    even) to −2^(bits-1) and the most positive clamps to 2^(bits-1) − 1, bit-exactly.
    """
    absmax = _weight_absmax(weight)
    levels = 2 ** bits - 1
    w_int = torch.clamp(torch.round(weight.detach() * (levels / (2.0 * absmax))), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return w_int, 2.0 * absmax / levels


class LsqActQuantizer(nn.Module):
    """Per-tensor LSQ activation quantizer with learnable step and zero point (docs/method.md#the-quantizer).

    Attributes: ``step`` and ``zero_point`` (0-dim Parameters), ``bits``, ``signed``,
    ``initialized``, ``qmin``, ``qmax``. ``signed`` and ``initialized`` are persistent buffers
    so that a saved student reloads exactly.
    """

    def __init__(self, bits: int):
        super().__init__()
        self.bits = check_bits(bits, "activation bits")
        self.step = nn.Parameter(torch.tensor(1.0))
        self.zero_point = nn.Parameter(torch.tensor(0.0))
        self.register_buffer("signed_flag", torch.tensor(False))
        self.init_method = "lsq"  # set by calibrate(); see init_from
        self.register_buffer("initialized_flag", torch.tensor(False))
        # Python mirrors of the two flags: forward needs qmin/qmax as ints and must not read a
        # CUDA buffer (a device sync) on every call.
        self._signed = False
        self._initialized = False
        self.calibrating = False

    # -- state ---------------------------------------------------------------------------
    @property
    def signed(self) -> bool:
        return self._signed

    @property
    def initialized(self) -> bool:
        return self._initialized

    @property
    def qmin(self) -> int:
        return act_range(self.bits, self._signed)[0]

    @property
    def qmax(self) -> int:
        return act_range(self.bits, self._signed)[1]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._signed = bool(self.signed_flag.item())
        self._initialized = bool(self.initialized_flag.item())

    @torch.no_grad()
    def init_from(self, x: torch.Tensor, method: str = "lsq") -> None:
        """Init from a calibration tensor. Sign: signed iff min x < 1e-5.

        ``lsq`` (docs/method.md#the-quantizer, the start of QAT): α = 2·mean|x|/sqrt(qmax), z = 0.1·(min x − α·qmax).
        That grid clips large activations (e.g. softmax peaks above ~0.45 at 8 bits), which QAT
        then learns away; ``minmax`` (for post-training quantization without QAT) spans
        [min x, max x] instead: α = (max − min)/(qmax − qmin), z = qmin − min/α; ``mse`` spans
        c·[min x, max x] with the clip factor c ∈ [0.01, 1] that minimizes Σ (x̂ − x)² on x, so a
        few outliers do not take the levels of the bulk (which matters at 3–4 bits).
        """
        if method not in INIT_METHODS:
            raise ValueError(f"unknown activation init {method!r}; choose one of {', '.join(INIT_METHODS)}")
        if x.numel() == 0:
            raise ValueError("cannot calibrate an activation quantizer on an empty tensor")
        x = x.detach().float()
        x_min = x.min()
        if not torch.isfinite(x_min) or not torch.isfinite(x.abs().max()):
            raise ValueError("calibration tensor holds NaN or Inf values; check the calibration batch")
        signed = bool(x_min < SIGNED_THRESHOLD)
        qmax = act_range(self.bits, signed)[1]
        # An all-zero tensor would give α = 0 and a division by zero; any small positive step works.
        if method in ("minmax", "mse"):
            qmin = act_range(self.bits, signed)[0]
            factor = _least_error_clip(x, qmin, qmax) if method == "mse" else 1.0
            lo, hi = x_min * factor, x.max() * factor
            step = ((hi - lo) / (qmax - qmin)).clamp_min(1e-8)
            zero_point = qmin - lo / step
        else:
            step = (2.0 * x.abs().mean() / math.sqrt(qmax)).clamp_min(1e-8)
            zero_point = 0.1 * (x_min - step * qmax)
        self.step.copy_(step)
        self.zero_point.copy_(zero_point)
        self.signed_flag.fill_(signed)
        self.initialized_flag.fill_(True)
        self._signed = signed
        self._initialized = True

    def ensure_ready(self, x: torch.Tensor) -> None:
        """Initialize from ``x`` in calibration mode; refuse to run uncalibrated otherwise."""
        if self._initialized:
            return
        if self.calibrating:
            self.init_from(x, self.init_method)
            return
        raise RuntimeError(
            "activation quantizer used before calibration: call maskaq.quant.calibrate(qmodel, images) "
            "on a few real or synthetic images first (or load a saved student with load_quantized)"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.ensure_ready(x)
        return lsq_fake_quant(x, self.step, self.zero_point, self.qmin, self.qmax)

    def extra_repr(self) -> str:
        if not self._initialized:
            return f"bits={self.bits}, uncalibrated"
        return (
            f"bits={self.bits}, signed={self._signed}, step={self.step.item():.4g}, "
            f"zero_point={self.zero_point.item():.3g}"
        )


class WeightQuantizer(nn.Module):
    """Per-output-channel symmetric weight fake quantizer (dim 0 of the weight is the channel).

    ``method="minmax"``: step = 2·max|w|/(2^w − 1) per channel, recomputed from the current weight in
    every forward (it follows the weights during QAT); gradient to w is straight-through.
    ``method="lsq"``: a learnable per-channel step, initialized with the min/max step on the
    first forward (or by ``init_from``), LSQ gradient scale 1/sqrt(numel(w)·qmax).
    """

    def __init__(self, bits: int, method: str = "minmax", out_channels: int | None = None):
        super().__init__()
        self.bits = check_bits(bits, "weight bits")
        if method not in WEIGHT_METHODS:
            raise ValueError(f"weight method must be one of {WEIGHT_METHODS}, got {method!r}")
        self.method = method
        if method == "lsq":
            if out_channels is None:
                raise ValueError("WeightQuantizer(method='lsq') needs out_channels")
            self.step = nn.Parameter(torch.ones(out_channels))
            self.register_buffer("initialized_flag", torch.tensor(False))
            self._initialized = False

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.method == "lsq":
            self._initialized = bool(self.initialized_flag.item())

    @torch.no_grad()
    def init_from(self, weight: torch.Tensor) -> None:
        if self.method == "lsq":
            self.step.copy_(symmetric_weight_step(weight, self.bits).reshape(-1))
            self.initialized_flag.fill_(True)
            self._initialized = True

    def scale(self, weight: torch.Tensor) -> torch.Tensor:
        """The per-channel step, shaped (C_out, 1, ...) to broadcast against ``weight``."""
        if self.method == "minmax":
            return symmetric_weight_step(weight, self.bits)
        return self.step.detach().reshape((-1,) + (1,) * (weight.dim() - 1))

    def integer_weight(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(integers as int8, per-channel step (C_out,)) of the quantized weight (for export)."""
        if self.method == "minmax":
            w_int, step = symmetric_weight_integers(weight, self.bits)
        else:
            step = self.scale(weight)
            w_int = torch.clamp(torch.round(weight.detach() / step), self.qmin, self.qmax)
        return w_int.to(torch.int8), step.reshape(-1)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.method == "minmax":
            w_int, step = symmetric_weight_integers(weight, self.bits)
            w_q = w_int * step
            # Straight-through: forward the quantized value, backward the identity (the step
            # depends on max|w| but is treated as a constant, as min/max quantizers do).
            return weight + (w_q - weight).detach()
        if not self._initialized:
            self.init_from(weight)
        step = self.step.reshape((-1,) + (1,) * (weight.dim() - 1))
        zero = torch.zeros((), dtype=weight.dtype, device=weight.device)
        g = LSQ_GRAD_SCALE * lsq_grad_scale(weight.numel(), self.qmax)
        return lsq_fake_quant(weight, step, zero, self.qmin, self.qmax, g)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, method={self.method}, per_channel=True, symmetric=True"
