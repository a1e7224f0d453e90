"""IntAttention: timm ViT attention on the integer q, k, P, v of the fake-quant student."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from maskaq import ops
from maskaq.integer.cpu_gemm import DEFAULT_KERNEL
from maskaq.integer.device import _cuda_kernels, _has_int8_tensor_cores
from maskaq.integer.grid import ActGrid, integer_grid
from maskaq.integer.linear import IntLinear

__all__ = ["IntAttention"]


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
        """CUDA with maskaq's kernels and int8 tensor cores (else the float32 products, with a warning).
        CPU: maskaq's int8_attention op when more than one thread runs. It splits the B·H slices over
        the threads, where the per-sample loop below parallelizes each small bmm: DeiT-S at batch 8 on
        2 threads, the attention modules take 116 ms against 137; on one thread the loop, which needs
        no int8 copies of q, k and v, is about 8% faster. Both give the same integers."""
        if x.is_cuda:
            return _cuda_kernels(x.device) and _has_int8_tensor_cores(x.device.index or 0)
        return x.device.type == "cpu" and ops.integer_kernels_available(x.device) and torch.get_num_threads() > 1

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
