"""Losses of QAT by distillation (docs/method.md#qat).

    loss = KD(τ = 5) + λ·L_hd,   λ = 10

KD is the temperature-scaled KL divergence of the student's from the teacher's softmax.
L_hd (masked head distillation) compares the attention outputs O_l of T and Q with a
structural similarity over tokens, weighting the teacher's most active tokens twice.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

HD_C2 = 0.03 ** 2
HD_EPS = 1e-6

__all__ = ["kd_loss", "token_weights", "head_distillation_block", "head_distillation_loss"]


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 5.0) -> torch.Tensor:
    """KL(softmax(T/τ) ‖ softmax(Q/τ))·τ², averaged over the batch."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"kd_loss: student logits {tuple(student_logits.shape)} vs teacher "
                         f"{tuple(teacher_logits.shape)}")
    if temperature <= 0:
        raise ValueError(f"kd_loss: temperature must be > 0, got {temperature}")
    t = float(temperature)
    log_q = F.log_softmax(student_logits / t, dim=-1)
    p = F.softmax(teacher_logits.detach() / t, dim=-1)
    return F.kl_div(log_q, p, reduction="batchmean") * (t * t)


def token_weights(out_t: torch.Tensor, top_fraction: float = 0.1, high: float = 2.0, low: float = 1.0,
                  masked: bool = True) -> torch.Tensor:
    """(B, N) token weights from T's attention output (B, H, N, d) of one block.

    Importance = mean over heads and channels of |O^T|; the top max(1, round(N·fraction))
    tokens of each sample weigh `high`, the rest `low`. Unmasked: all tokens weigh 1.
    """
    b, _, n, _ = out_t.shape
    if not masked:
        return torch.ones(b, n, device=out_t.device, dtype=out_t.dtype)
    importance = out_t.detach().abs().mean(dim=(1, 3))  # (B, N)
    k = max(1, int(round(n * float(top_fraction))))
    weights = torch.full_like(importance, float(low))
    if k >= n:
        return weights.fill_(float(high))
    top = importance.topk(k, dim=1).indices
    return weights.scatter_(1, top, float(high))


def head_distillation_block(out_t: torch.Tensor, out_q: torch.Tensor, num_prefix_tokens: int = 1, *,
                            top_fraction: float = 0.1, high: float = 2.0, low: float = 1.0,
                            masked: bool = True) -> torch.Tensor:
    """SSIM over tokens of every (sample, head, channel) of one block: (B, H, d)."""
    if out_t.shape != out_q.shape or out_t.dim() != 4:
        raise ValueError(f"head distillation: teacher output {tuple(out_t.shape)} vs student "
                         f"{tuple(out_q.shape)}; both must be (B, H, N, d)")
    p = num_prefix_tokens
    t = out_t.detach()[:, :, p:].float()
    q = out_q[:, :, p:].float()
    w = token_weights(t, top_fraction, high, low, masked)[:, None, :, None]  # (B, 1, N', 1)
    w_sum = w.sum(dim=2)  # (B, 1, 1)
    mean_t = (t * w).sum(dim=2) / w_sum  # (B, H, d)
    mean_q = (q * w).sum(dim=2) / w_sum
    var_t = (t * t * w).sum(dim=2) / w_sum - mean_t * mean_t
    var_q = (q * q * w).sum(dim=2) / w_sum - mean_q * mean_q
    cov = (t * q * w).sum(dim=2) / w_sum - mean_t * mean_q
    return (2 * cov + HD_C2) / (var_t + var_q + HD_C2 + HD_EPS)


def head_distillation_loss(outputs_t: Sequence[torch.Tensor], outputs_q: Sequence[torch.Tensor],
                           num_prefix_tokens: int = 1, *, top_fraction: float = 0.1, high: float = 2.0,
                           low: float = 1.0, masked: bool = True) -> torch.Tensor:
    """L_hd = 1 − mean SSIM over blocks, samples, heads and channels (masked or not)."""
    if len(outputs_t) == 0 or len(outputs_t) != len(outputs_q):
        raise ValueError(f"head distillation: {len(outputs_t)} teacher vs {len(outputs_q)} student blocks")
    per_block = [head_distillation_block(t, q, num_prefix_tokens, top_fraction=top_fraction, high=high,
                                         low=low, masked=masked).mean()
                 for t, q in zip(outputs_t, outputs_q)]
    return 1.0 - torch.stack(per_block).mean()
