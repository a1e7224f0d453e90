"""Losses of image synthesis (docs/method.md#synthesis).

Every function takes the tensors the attention capture hands out (lists with one entry per
block) and returns a scalar to minimize. The two losses that dominate the cost, the
patch-similarity entropy and the masked attention alignment, run through the fused ops in
`maskaq.ops`; the others are cheap, batched plain PyTorch.

Prefix tokens (CLS, distillation, register tokens) are `num_prefix_tokens` leading tokens;
they are dropped wherever docs/method.md#synthesis says "without the prefix rows and columns". Swin
window attention has none.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from maskaq.reference import SSIM_C1, SSIM_C2, ssim_from_statistics

__all__ = [
    "total_variation", "inter_head_ssim_loss", "inter_head_ssim_block", "entropy_loss",
    "cls_rows", "alignment_loss", "alignment_loss_rows", "mask_ratio", "psaq_total_variation", "kde_entropy",
    "psaq_entropy_loss", "full_precision", "SSIM_C1", "SSIM_C2",
]


def _check_blocks(name: str, blocks: Sequence[torch.Tensor], ndim: int = 4) -> None:
    if len(blocks) == 0:
        raise ValueError(f"{name}: got no attention blocks; did the capture see any attention layer?")
    for i, t in enumerate(blocks):
        if not isinstance(t, torch.Tensor) or t.dim() != ndim:
            raise ValueError(f"{name}: block {i} must be a {ndim}-D tensor, got "
                             f"{getattr(t, 'shape', type(t))}")


# ----------------------------------------------------------------------------------------- L_tv
def total_variation(x: torch.Tensor) -> torch.Tensor:
    """‖Δ_h x‖ + ‖Δ_w x‖ + (‖Δ_diag x‖ + ‖Δ_antidiag x‖)/√2, Frobenius norms over the batch."""
    if x.dim() != 4:
        raise ValueError(f"total_variation expects images (B, C, H, W), got {tuple(x.shape)}")
    d_w = x[:, :, :, :-1] - x[:, :, :, 1:]
    d_h = x[:, :, :-1, :] - x[:, :, 1:, :]
    d_anti = x[:, :, 1:, :-1] - x[:, :, :-1, 1:]
    d_diag = x[:, :, :-1, :-1] - x[:, :, 1:, 1:]
    return (torch.linalg.vector_norm(d_w) + torch.linalg.vector_norm(d_h)
            + (torch.linalg.vector_norm(d_diag) + torch.linalg.vector_norm(d_anti)) / math.sqrt(2.0))


def full_precision(t: torch.Tensor) -> torch.Tensor:
    """``t`` as it is in float32 or float64; a reduced-precision tensor (bf16, fp16) widened to float32."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


# -------------------------------------------------------------------------------------- L_ssim
class _KeyMapStatistics(torch.autograd.Function):
    """The logits-sized part of L_ssim: per query patch and head, the key map's mean, minimum and
    maximum, and the head Gram of the centred maps, G = c·cᵀ/N'. Its backward is written out, so
    the gradient reaches the logits as one write into one zero tensor: autograd's own would zero
    and copy the full map once per slice (rows, then columns) and scatter min and max separately.

    Backward, with c = r − mean(r) per row: dr = (dG + dGᵀ)·c/N' (the centring adds nothing, as
    every row of c sums to 0) + dmean/N' + dmin at the minimum + dmax at the maximum (the first
    one where several are equal)."""

    @staticmethod
    def forward(ctx, logits, num_prefix_tokens):
        p = num_prefix_tokens
        keys = logits[:, :, p:, p:].transpose(1, 2)  # (B, N', H, N'): query n, head h, key k
        n = keys.shape[-1]
        mean = keys.mean(dim=-1)
        lo, lo_at = keys.min(dim=-1)
        hi, hi_at = keys.max(dim=-1)
        centred = (keys - mean.unsqueeze(-1)).contiguous()
        gram = torch.matmul(centred, centred.transpose(-1, -2)) / n  # (B, N', H, H)
        ctx.save_for_backward(centred, lo_at, hi_at)
        ctx.num_prefix_tokens, ctx.logits_shape = p, logits.shape
        return gram, mean, lo, hi

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_gram, d_mean, d_lo, d_hi):
        centred, lo_at, hi_at = ctx.saved_tensors
        n = centred.shape[-1]
        if d_gram is not None:
            d_keys = torch.matmul(d_gram + d_gram.transpose(-1, -2), centred).div_(n)
        else:  # (only when nothing downstream reads the Gram)
            d_keys = torch.zeros_like(centred)
        if d_mean is not None:
            d_keys.add_(d_mean.unsqueeze(-1) / n)
        if d_lo is not None:
            d_keys.scatter_add_(-1, lo_at.unsqueeze(-1), d_lo.unsqueeze(-1))
        if d_hi is not None:
            d_keys.scatter_add_(-1, hi_at.unsqueeze(-1), d_hi.unsqueeze(-1))
        p = ctx.num_prefix_tokens
        grad = centred.new_zeros(ctx.logits_shape)
        grad[:, :, p:, p:] = d_keys.transpose(1, 2)
        return grad, None


def inter_head_ssim_block(logits: torch.Tensor, num_prefix_tokens: int = 1) -> torch.Tensor:
    """1 − SSIM² between every pair of heads (self pairs included, like the public code), one block.

    logits (B, H, N, N). For every query patch the H key maps are min–max normalized to
    [0, 1] and compared with global statistics (the map is not windowed, so the reshape to the
    patch grid does not change the result and is skipped). Returns (B, N', H, H).

    Min–max normalization x = (r − min r)/s, s = max r − min r + 1e-8, is affine, so the
    statistics of x follow from those of the raw rows r: mean (r̄ − min r)/s, covariance
    cov(r_i, r_j)/(s_i s_j). Only those per-row statistics and the head Gram touch the
    logits-sized maps (``_KeyMapStatistics``); the rest is arithmetic on (B, N', H, H).
    ``inter_head_ssim_loss`` runs all of it as one op on the CPU (``maskaq.ops.inter_head_ssim``).
    """
    gram, mean, lo, hi = _KeyMapStatistics.apply(logits, int(num_prefix_tokens))
    return ssim_from_statistics(gram, mean, lo, hi, SSIM_C1, SSIM_C2)


def inter_head_ssim_loss(blocks: Sequence[torch.Tensor], num_prefix_tokens: int = 1, *,
                         recompute: bool = False) -> torch.Tensor:
    """L_ssim = mean over blocks of mean(1 − SSIM²) between heads (MimiQ's inter-head loss).

    ``recompute``: keep none of a block's intermediate tensors for the backward pass (several
    logits-sized ones) but recompute them from the logits there (torch.utils.checkpoint); the
    same value and gradient for less memory."""
    _check_blocks("inter_head_ssim_loss", blocks)

    from maskaq import ops

    def block_loss(a):  # bf16 loses the statistics SSIM compares
        a = full_precision(a)
        if a.device.type == "cpu" and ops.uses_extension(a):  # one fused pass each way
            return ops.inter_head_ssim(a, num_prefix_tokens=num_prefix_tokens).mean()
        return inter_head_ssim_block(a, num_prefix_tokens).mean()

    if recompute and torch.is_grad_enabled():
        from torch.utils.checkpoint import checkpoint
        return torch.stack([checkpoint(block_loss, a, use_reentrant=False) for a in blocks]).mean()
    return torch.stack([block_loss(a) for a in blocks]).mean()


# --------------------------------------------------------------------------------------- L_ent
def entropy_loss(blocks: Sequence[torch.Tensor], num_prefix_tokens: int = 1, num_rows: int = 64,
                 generator: Optional[torch.Generator] = None, ops=None) -> torch.Tensor:
    """L_ent = −mean over blocks and samples of the patch-similarity differential entropy."""
    _check_blocks("entropy_loss", blocks)
    if ops is None:
        from maskaq import ops
    hs = [ops.patch_similarity_entropy(a, num_prefix_tokens=num_prefix_tokens, num_rows=num_rows,
                                       generator=generator) for a in blocks]
    return -torch.stack([h.mean() for h in hs]).mean()


# ------------------------------------------------------------------------------------- L_align
def mask_ratio(step: int, iters: int, start: float = 0.5, end: float = 0.1) -> float:
    """r = start·(1−t) + end·t with t = step/iters (the decaying share of masked patches)."""
    t = step / max(iters, 1)
    return max(start * (1.0 - t) + end * t, min(start, end))


def cls_rows(logits: torch.Tensor, num_prefix_tokens: int, has_class_token: bool) -> torch.Tensor:
    """The query row to align, over the patch keys: (B, H, M).

    With a class token it is the CLS row A[:, :, 0, P:]. Models without one (Swin windows,
    global-pool ViTs) have no CLS query; the mean over the patch queries stands in for it,
    which is the attention a pooled read-out sees.
    """
    p = num_prefix_tokens
    if has_class_token:
        return logits[:, :, 0, p:]
    return logits[:, :, p:, p:].mean(dim=2)


def alignment_loss(teacher_blocks: Sequence[torch.Tensor], student_blocks: Sequence[torch.Tensor], *,
                   ratio: float, keep: float = 0.7, num_prefix_tokens: int = 1,
                   has_class_token: bool = True, generator: Optional[torch.Generator] = None,
                   ops=None) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """Masked attention alignment of T's and Q's CLS-row logits.

    The gradient flows through both sides to the image, as in the public code (docs/method.md#synthesis);
    detach the teacher's blocks before the call to align Q to a fixed T instead.

    Blocks of equal shape share one mask (all of a ViT; each Swin stage); groups are weighted
    by their number of blocks so the result is the mean over blocks. Returns (loss, masks).
    """
    _check_blocks("alignment_loss (teacher)", teacher_blocks)
    _check_blocks("alignment_loss (student)", student_blocks)
    for t, q in zip(teacher_blocks, student_blocks):
        if t.shape != q.shape:
            raise ValueError(f"alignment_loss: teacher block {tuple(t.shape)} vs student {tuple(q.shape)}")
    rows = [[cls_rows(a, num_prefix_tokens, has_class_token) for a in blocks]
            for blocks in (teacher_blocks, student_blocks)]
    return alignment_loss_rows(*rows, ratio=ratio, keep=keep, generator=generator, ops=ops)


def alignment_loss_rows(teacher_rows: Sequence[torch.Tensor], student_rows: Sequence[torch.Tensor], *,
                        ratio: float, keep: float = 0.7, generator: Optional[torch.Generator] = None,
                        ops=None) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """``alignment_loss`` on the rows it aligns, ``cls_rows`` of every block ((B, H, M) each): what a
    capture that keeps only those rows (``capture_attention(..., reduce_logits=...)``) records."""
    _check_blocks("alignment_loss (teacher rows)", teacher_rows, ndim=3)
    _check_blocks("alignment_loss (student rows)", student_rows, ndim=3)
    if len(teacher_rows) != len(student_rows):
        raise ValueError(f"alignment_loss: teacher has {len(teacher_rows)} blocks, student "
                         f"{len(student_rows)}; quantize the same model you synthesize for")
    if ops is None:
        from maskaq import ops
    groups = {}
    for t, q in zip(teacher_rows, student_rows):
        if t.shape != q.shape:
            raise ValueError(f"alignment_loss: teacher rows {tuple(t.shape)} vs student {tuple(q.shape)}")
        groups.setdefault(tuple(t.shape), []).append((t, q))
    total, masks, count = 0.0, [], 0
    for pairs in groups.values():
        cls_t = torch.stack([t for t, _ in pairs])
        cls_q = torch.stack([q for _, q in pairs])
        loss, mask = ops.masked_attention_align(cls_t, cls_q, ratio=ratio, keep=keep, generator=generator)
        total = total + loss * len(pairs)
        count += len(pairs)
        masks.append(mask)
    return total / count, masks


# ------------------------------------------------------------------------------------ PSAQ-ViT
def psaq_total_variation(x: torch.Tensor) -> torch.Tensor:
    """PSAQ-ViT's image prior: the four difference norms summed without the √2 of L_tv."""
    d_w = x[:, :, :, :-1] - x[:, :, :, 1:]
    d_h = x[:, :, :-1, :] - x[:, :, 1:, :]
    d_anti = x[:, :, 1:, :-1] - x[:, :, :-1, 1:]
    d_diag = x[:, :, :-1, :-1] - x[:, :, 1:, 1:]
    return sum(torch.linalg.vector_norm(d) for d in (d_w, d_h, d_anti, d_diag))


def kde_entropy(samples: torch.Tensor, *, bandwidth: float = 0.01, num_points: int = 10) -> torch.Tensor:
    """Differential entropy of each row of `samples` (B, S) by a Gaussian KDE (batch mean).

    The density is evaluated at `num_points` points evenly spaced between the batch minimum
    and maximum (held constant, as in PSAQ-ViT), and −p·log p integrated by the trapezoid rule.
    """
    if samples.dim() != 2:
        raise ValueError(f"kde_entropy expects (B, S) samples, got {tuple(samples.shape)}")
    lo, hi = samples.detach().min(), samples.detach().max()
    grid = torch.linspace(0.0, 1.0, num_points, device=samples.device, dtype=samples.dtype)
    grid = (lo + (hi - lo) * grid).expand(samples.shape[0], num_points)
    var = bandwidth * bandwidth
    diff = grid.unsqueeze(-1) - samples.unsqueeze(1)  # (B, points, S)
    pdf = torch.exp(-diff * diff / (2 * var)).mean(dim=-1) / math.sqrt(2 * math.pi * var)
    pdf = pdf + 1e-4
    return torch.trapezoid(-pdf * torch.log(pdf), grid, dim=-1).mean()


def psaq_entropy_loss(outputs: Sequence[torch.Tensor], num_prefix_tokens: int = 1, *,
                      bandwidth: float = 0.01, num_points: int = 10) -> torch.Tensor:
    """−Σ over blocks of the KDE entropy of patch cosine similarities (head-mean of O_l)."""
    _check_blocks("psaq_entropy_loss", outputs)
    total = 0.0
    for o in outputs:
        feats = o.mean(dim=1)[:, num_prefix_tokens:]  # (B, N', d)
        feats = F.normalize(feats, dim=-1, eps=1e-8)
        sims = feats @ feats.transpose(1, 2)
        total = total - kde_entropy(sims.flatten(1), bandwidth=bandwidth, num_points=num_points)
    return total
