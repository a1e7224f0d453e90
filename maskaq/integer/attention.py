"""IntAttention: timm ViT attention on the integer q, k, P, v of the fake-quant student."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import nn

from maskaq import ops
from maskaq.integer.cpu_gemm import ATTENTION_BLAS, DEFAULT_KERNEL, attention_products_path
from maskaq.integer.device import _cuda_kernels, _has_int8_tensor_cores
from maskaq.integer.grid import ActGrid, integer_grid
from maskaq.integer.linear import IntLinear
from maskaq.reference_integer import int8_shift

__all__ = ["IntAttention"]


class _KernelPlan(NamedTuple):
    """IntAttention's kernel arguments from its grids: the ranges [lo, hi] of the integers q − z, k − z,
    v − z; their int8 shifts (``int8_shift``) and the ranges after the shift; int8_attention's scale and
    P-grid arguments; the shifts as a (1, 1, 3, 1, 1) tensor to subtract from qkv (None when all are 0)."""
    lo: list
    hi: list
    shifts: list
    shifted_lo: list
    shifted_hi: list
    args: tuple
    shift: Optional[torch.Tensor]


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
        self._folded = False  # Python mirror of folded_flag (no tensor read per call)
        self._grid_cache = None
        self._plan_cache = None

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
        self._folded = bool(self.folded_flag)
        self._grid_cache = None
        self._plan_cache = None

    def _apply(self, fn, *args, **kwargs):
        self._plan_cache = None  # its shift tensor follows the module's device
        return super()._apply(fn, *args, **kwargs)

    @property
    def attn_grids(self) -> tuple:
        if self._grid_cache is None:
            self._grid_cache = tuple(ActGrid.from_tensor(t) for t in self.grids.cpu())
        return self._grid_cache

    @property
    def folded(self) -> bool:
        return self._folded

    def _kernel_plan(self) -> _KernelPlan:
        """What the kernel paths need from the grids, computed once (``_KernelPlan``)."""
        if self._plan_cache is None:
            gq, gk, gp, gv = self.attn_grids
            lo = [g.qmin - g.zero_point for g in (gq, gk, gv)]
            hi = [g.qmax - g.zero_point for g in (gq, gk, gv)]
            shifts = [int8_shift(a, b) for a, b in zip(lo, hi)]
            args = (gq.step * gk.step * self.scale, gp.step, gp.zero_point, gp.qmin, gp.qmax)
            shift = torch.tensor(shifts, dtype=torch.float32, device=self.grids.device).view(1, 1, 3, 1, 1)
            self._plan_cache = _KernelPlan(lo, hi, shifts, [a - o for a, o in zip(lo, shifts)],
                                           [b - o for b, o in zip(hi, shifts)], args, shift if any(shifts) else None)
        return self._plan_cache

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
        self._folded = True

    @staticmethod
    def _uses_int8_kernel(x: torch.Tensor) -> bool:
        """CUDA with maskaq's kernels and int8 tensor cores (else the float32 products, with a warning).
        CPU: maskaq's int8_attention op when more than one thread runs, or when the op's products run on
        an integer GEMM (maskaq's int16 one where ATen's capability is AVX2, oneDNN's int8 one with
        VNNI). The op splits the B·H slices over the threads, where the per-sample loop below
        parallelizes each small bmm; on one thread the loop needs no int8 copies of q, k and v, and
        where the products run on BLAS it was the faster of the two
        (docs/integer-inference.md#measurements-behind-the-smaller-cpu-choices). Both give the same
        integers."""
        if x.is_cuda:
            return _cuda_kernels(x.device) and _has_int8_tensor_cores(x.device.index or 0)
        return (x.device.type == "cpu" and ops.integer_kernels_available(x.device)
                and (torch.get_num_threads() > 1 or attention_products_path() != ATTENTION_BLAS))

    def _kernel_products(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """O/(α_p·α_v) as (B, N, H·d) from float tensors q, k, v (B, H, N, d) holding the integers q − z
        (modified in place), by maskaq's int8_attention: both products exact in int32 (CUDA: on int8
        tensor cores), the softmax and P's quantization between them — the integers of the CPU path."""
        gq, gk, _, gv = self.attn_grids
        return self._int8_attention(*_int8_operands((q, k, v), (gq, gk, gv)))

    def _folded_kernel_products(self, qkv: torch.Tensor) -> torch.Tensor:
        """``_kernel_products`` straight from the folded qkv output (B, N, 3, H, d), which holds x/α
        per slice (modified in place): round, shift each slice into int8 (``_int8_shift``), clamp,
        and one cast-copy into the int8 operands. At 8 bits that is 4 passes over qkv where rounding
        and clamping it, then shifting and packing q, k and v one by one, took 10
        (docs/integer-inference.md#measurements-behind-the-smaller-cpu-choices)."""
        B, N, _, H, d = qkv.shape
        plan = self._kernel_plan()
        qkv.round_()
        if plan.shift is not None:
            qkv.sub_(plan.shift if plan.shift.device == qkv.device else plan.shift.to(qkv.device))
        _clamp_slices(qkv, plan.shifted_lo, plan.shifted_hi)
        packed = torch.empty((3, B, H, N, d), dtype=torch.int8, device=qkv.device)
        packed.copy_(qkv.permute(2, 0, 3, 1, 4))  # exact integers in [-128, 127]: the cast is exact
        return self._int8_attention(*packed.unbind(0), *(-o for o in plan.shifts))

    def _int8_attention(self, q8, k8, v8, zq: int, zk: int, zv: int) -> torch.Tensor:
        """maskaq's int8_attention on int8 operands (B, H, N, d) whose integers are x − z_x, as (B, N, H·d).
        Called where ``_uses_int8_kernel`` holds, so the compiled op runs (it validates its arguments)."""
        B, H, N, d = q8.shape
        out = torch.ops.maskaq.int8_attention(q8, k8, v8, *self._kernel_plan().args, zq, zk, zv)
        return out.transpose(1, 2).reshape(B, N, self.attn_dim)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
        if attn_mask is not None or is_causal:
            raise ValueError("IntAttention does not support attn_mask / is_causal (classification ViTs do not use them)")
        B, N, _ = x.shape
        H, d = self.num_heads, self.head_dim
        qkv = self.qkv(x).view(B, N, 3, H, d)
        if self._folded and self._uses_int8_kernel(x):
            if x.device.type == "cpu":
                # rounding, clamping, packing and both products in one op, O in proj's layout
                plan = self._kernel_plan()
                return self.proj(torch.ops.maskaq.qkv_int8_attention(qkv, *plan.args, plan.lo, plan.hi))
            return self.proj(self._folded_kernel_products(qkv))
        gq, gk, gp, gv = self.attn_grids
        if self.folded:
            # qkv already holds x/α per slice: one round and one clamp give (q − z) for q, k and v.
            qkv = qkv.round_()
            _clamp_slices(qkv, [g.qmin - g.zero_point for g in (gq, gk, gv)],
                          [g.qmax - g.zero_point for g in (gq, gk, gv)])
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


def _clamp_slices(qkv: torch.Tensor, lo: list, hi: list) -> None:
    """Clamp each slice i of qkv (B, N, 3, H, d) to [lo[i], hi[i]] in place: one clamp when the bounds
    agree, else one in-place scalar clamp per slice (a clamp with broadcast tensor bounds is slower:
    docs/integer-inference.md#measurements-behind-the-smaller-cpu-choices)."""
    if len(set(lo)) == 1 and len(set(hi)) == 1:
        qkv.clamp_(lo[0], hi[0])
    else:
        for i in range(3):
            qkv[:, :, i].clamp_(lo[i], hi[i])


def _int8_shift(grid) -> int:
    """``int8_shift`` of the centred integers [qmin − z, qmax − z] of ``grid`` (e.g. 1 for [-127, 128],
    z = -1); int8_attention then reads them with zero point −o."""
    return int8_shift(grid.qmin - grid.zero_point, grid.qmax - grid.zero_point)


def _int8_operands(tensors: tuple, grids: tuple) -> tuple:
    """int8 copies (B, H, N, d), contiguous, of float tensors holding the integers q − z of their grids,
    and the zero points to pass to int8_attention (see ``_int8_shift``). The tensors are modified in
    place when shifted (they are the caller's scratch)."""
    B, H, N, d = tensors[0].shape
    packed = torch.empty((len(tensors), B, H, N, d), dtype=torch.int8, device=tensors[0].device)
    zero_points = []
    for i, (t, g) in enumerate(zip(tensors, grids)):
        shift = _int8_shift(g)
        packed[i].copy_(t.sub_(shift) if shift else t)  # exact integers: the cast is exact
        zero_points.append(-shift)
    return (*packed.unbind(0), *zero_points)
