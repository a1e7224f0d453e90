"""The integer grid of an LSQ activation quantizer, as the integer modules store it."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

__all__ = ["ActGrid", "clamp_to_grid", "integer_grid"]


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


def clamp_to_grid(u: torch.Tensor, grid: ActGrid) -> torch.Tensor:
    """uint8 u = q − qmin (saturated to [0, 255]) clamped in place to ``grid``'s [0, qmax − qmin]: the
    integer clamp of the fake-quant reference, on bytes. Clamping the float input first would cost a
    float pass and a copy (docs/integer-inference.md#measurements-behind-the-smaller-cpu-choices)."""
    return u if grid.full_uint8 else u.clamp_(max=grid.qmax - grid.qmin)


def _grid_buffer(module: nn.Module, name: str, grid: Optional[ActGrid]) -> None:
    module.register_buffer(name, grid.as_tensor() if grid is not None else torch.zeros(5, dtype=torch.float64))
