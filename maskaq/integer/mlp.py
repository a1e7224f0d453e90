"""IntMlp: fc1 → GELU → fc2 with the GELU and fc2's requantization in fc1's epilogue."""
from __future__ import annotations

import torch
from torch import nn

from maskaq import ops
from maskaq.integer.linear import IntLinear

__all__ = ["IntMlp"]


class IntMlp(nn.Module):
    """timm Mlp (fc1 → GELU → fc2) with fc1's GELU and the requantization to fc2's input grid
    fused in fc1's epilogue: fc1 emits uint8 on fc2's grid, so the 4·D-wide hidden activation is
    written once, as bytes, and never re-read as float (CPU: oneDNN's epilogue, any fc2 grid up to
    8 bits; CUDA: maskaq's). Otherwise (e.g. layers on maskaq's int16 GEMM, see ``IntLinear.cpu_gemm``) it
    runs fc1, the activation module and fc2 one after the other."""

    def __init__(self, fc1: IntLinear, fc2: IntLinear, act: nn.Module):
        super().__init__()
        self.fc1, self.act, self.fc2 = fc1, act, fc2
        approximate = getattr(act, "approximate", None)
        self.act_name = None if type(act) is not nn.GELU else ("gelu_tanh" if approximate == "tanh" else "gelu")

    def _fusable(self, x: torch.Tensor) -> bool:
        return (x.device.type == "cpu" and self.act_name is not None and self.fc1.quantized_input
                and self.fc2.quantized_input and self.fc1.fuses_epilogue(self.act_name)
                and self.fc2.cpu_gemm in ("onednn", "int16"))

    def _cuda_fusable(self, x: torch.Tensor) -> bool:
        # maskaq's epilogue has erf GELU only (not the tanh approximation)
        return (x.is_cuda and self.act_name == "gelu" and self.fc2.quantized_input
                and ops.integer_kernels_available(x.device))

    def _activation(self, y: torch.Tensor) -> torch.Tensor:
        """The activation on fc1's output y, a fresh tensor of this call: GELU in place (no second
        4·D-wide float tensor: docs/integer-inference.md#measurements-behind-the-smaller-cpu-choices),
        any other activation module as it is."""
        if self.act_name is None or y.requires_grad:
            return self.act(y)
        return torch.ops.aten.gelu_(y, approximate="tanh" if self.act_name == "gelu_tanh" else "none")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.dtype == torch.float32 and self.act_name is not None:
            # both layers on oneDNN: the fused path below with their arguments read once
            c1, c2 = self.fc1.onednn_call(), self.fc2.onednn_call()
            if c1 is not None and c2 is not None:
                shape = x.shape
                hidden = c1.run(c1.quantize(x.reshape(-1, shape[-1]).contiguous()), self.act_name, c2.input)
                return c2.run(hidden).reshape(*shape[:-1], self.fc2.out_features)
        cuda = self._cuda_fusable(x)
        if not (cuda or self._fusable(x)):
            return self.fc2(self._activation(self.fc1(x)))
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
