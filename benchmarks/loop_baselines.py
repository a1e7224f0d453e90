"""Per-sample Python-loop formulations of MaskAQ's two synthesis losses.

They follow the structure of the public MaskAQ code (hfutqian/MaskAQ,
hydra_image_gen_ssim_att_map.py: a Python loop over samples with one randperm, normalize,
Gram and variance each for the entropy; a loop over samples for the top-k mask, another
with a randperm for the stochastic drop, and a loop over blocks for the masked L1; MimiQ's
inter-head SSIM as a loop over blocks and head pairs on the materialized, min-max normalized
key maps),
written here from that description for benchmarks/bench_ops.py and bench_synthesis.py.
Same inputs and outputs as maskaq.ops (the random draws differ: randperm per sample).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOG_TWO_PI_E = math.log(2.0 * math.pi * math.e)


def patch_similarity_entropy_loop(logits, *, num_prefix_tokens=1, num_rows=64, generator=None):
    """h (B,) like maskaq.ops.patch_similarity_entropy, one sample at a time."""
    P = num_prefix_tokens
    head_mean = logits.mean(dim=1)[:, P:, P:]
    values = []
    for b in range(head_mean.shape[0]):
        vecs = head_mean[b]
        n = vecs.shape[0]
        if n > num_rows:
            idx = torch.randperm(n, generator=generator, device=generator.device if generator else vecs.device)
            vecs = vecs[idx[:num_rows].to(vecs.device)]
        vecs = F.normalize(vecs, p=2, dim=-1, eps=1e-6)
        sims = vecs @ vecs.t()
        var = torch.var(sims.reshape(-1), unbiased=False) + 1e-8
        values.append(0.5 * (LOG_TWO_PI_E + torch.log(var)))
    return torch.stack(values)


def inter_head_ssim_loss_loop(blocks, num_prefix_tokens=1):
    """L_ssim like maskaq.synthesis.losses.inter_head_ssim_loss, one block and head pair at a time."""
    from maskaq.synthesis.losses import SSIM_C1, SSIM_C2
    P = num_prefix_tokens
    per_block = []
    for logits in blocks:
        maps = logits[:, :, P:, P:].transpose(1, 2)  # (B, N', H, N'): the H key maps of each query
        lo = maps.amin(dim=-1, keepdim=True)
        maps = (maps - lo) / (maps.amax(dim=-1, keepdim=True) - lo + 1e-8)
        H = maps.shape[2]
        terms = []
        for i in range(H):
            for j in range(H):
                x, y = maps[:, :, i], maps[:, :, j]
                mx, my = x.mean(dim=-1), y.mean(dim=-1)
                vx = ((x - mx[..., None]) ** 2).mean(dim=-1)
                vy = ((y - my[..., None]) ** 2).mean(dim=-1)
                cov = ((x - mx[..., None]) * (y - my[..., None])).mean(dim=-1)
                ssim = ((2 * mx * my + SSIM_C1) * (2 * cov + SSIM_C2)) / (
                    (mx ** 2 + my ** 2 + SSIM_C1) * (vx + vy + SSIM_C2))
                terms.append(1 - ssim ** 2)
        per_block.append(torch.stack(terms).mean())
    return torch.stack(per_block).mean()


def masked_attention_align_loop(cls_t, cls_q, *, ratio, keep=0.7, generator=None):
    """(loss, mask) like maskaq.ops.masked_attention_align, with per-sample and per-block loops."""
    L, B, H, M = cls_t.shape
    cls_t = cls_t.detach()
    with torch.no_grad():
        combined = cls_t.mean(dim=(0, 2))  # (B, M)
        masks = []
        for b in range(B):  # top-k per sample
            k = max(1, int(M * ratio))
            top = torch.topk(combined[b], k).indices
            m = torch.zeros_like(combined[b])
            m[top] = 1.0
            masks.append(m)
        mask = torch.stack(masks)
        for b in range(B):  # stochastic drop per sample
            sel = torch.nonzero(mask[b] > 0.5).squeeze(-1)
            kept = min(sel.numel(), max(1, int(math.floor(keep * sel.numel() + 0.5))))
            if kept == sel.numel():
                continue
            perm = torch.randperm(sel.numel(), generator=generator,
                                  device=generator.device if generator else sel.device).to(sel.device)
            mask[b, sel] = 0.0
            mask[b, sel[perm[:kept]]] = 1.0
    total = 0.0
    for l in range(L):  # masked L1 per block
        diff = torch.abs(cls_t[l].mean(dim=1) - cls_q[l].mean(dim=1)) * mask
        total = total + diff.sum() / (mask.sum() + 1e-8)
    return total / L, mask
