"""IntBlock: a timm ViT block on integer attention and MLP, with its residual adds in their last GEMMs."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from maskaq.integer.attention import IntAttention
from maskaq.integer.mlp import IntMlp

__all__ = ["IntBlock", "wrap_blocks"]

_IDENTITIES = ("ls1", "drop_path1", "ls2", "drop_path2")


class IntBlock(nn.Module):
    """timm's pre-norm ViT ``Block`` (x + attn(norm1(x)), then x + mlp(norm2(x))) without layer scale
    or stochastic depth, on an IntAttention and an IntMlp. Each branch takes the residual and adds it
    in its last GEMM (proj, fc2), in oneDNN's epilogue on the CPU: the floats of the separate add,
    without its pass over the activations and its call. Its children keep the block's names (the
    identities included), so its state dict is the block's and ``save_integer`` writes the same file.
    """

    def __init__(self, block: nn.Module):
        super().__init__()
        self.norm1, self.attn, self.norm2, self.mlp = block.norm1, block.attn, block.norm2, block.mlp
        for name in _IDENTITIES:
            setattr(self, name, getattr(block, name))

    @staticmethod
    def wraps(block: nn.Module) -> bool:
        """Whether ``block`` is a timm ``Block`` that IntBlock runs the same: integer attention and MLP,
        no layer scale, no stochastic depth."""
        from timm.models.vision_transformer import Block

        return (type(block) is Block and isinstance(block.attn, IntAttention) and isinstance(block.mlp, IntMlp)
                and all(type(getattr(block, name)) is nn.Identity for name in _IDENTITIES))

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
        x = self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal, residual=x)
        return self.mlp(self.norm2(x), residual=x)


def wrap_blocks(module: nn.Module) -> None:
    """Replace, in place, every block of ``module`` that ``IntBlock.wraps`` by its IntBlock."""
    for name, child in list(module.named_children()):
        if IntBlock.wraps(child):
            setattr(module, name, IntBlock(child))
        else:
            wrap_blocks(child)
