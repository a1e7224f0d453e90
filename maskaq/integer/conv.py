"""IntConv2d: the patch embedding with integer weights."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from maskaq.integer.grid import ActGrid, _grid_buffer, integer_grid
from maskaq.integer.linear import IntLinear

__all__ = ["IntConv2d"]


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
