"""What keeps a QAT run alive on a real model: LSQ steps that stay positive, and non-finite losses.

A pretrained ViT has post-LayerNorm channels many times wider than the rest. Their clipped values
give an LSQ step a gradient large enough that one SGD update (with momentum) carries the step past
zero, and a grid with a negative step is no grid: the fused ops refuse it and the run dies. LSQ's
dynamics are kept as they are wherever an update leaves a step above half its previous value
(every update of a short QAT on a plain model); where it would not, the step is clamped to half of
it and the momentum that drove it there is dropped, so a step can still shrink geometrically when
its gradients keep asking for it, but never reaches zero or a non-finite value. A positive
parametrization (log-step) would change the updates of every step, not only the failing ones.

A loss that is NaN or infinite (an inf logit, a diverged batch) is not back-propagated: the batch
is skipped, and after ``MAX_BAD_BATCHES`` in a row the run stops with ``QATDiverged``, whose
message says where; the last checkpoint holds the student before the first bad batch.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn

__all__ = ["MIN_STEP", "MIN_STEP_SHRINK", "MAX_BAD_BATCHES", "QATDiverged", "StepGuard", "lsq_step_parameters"]

# An optimizer update may shrink an LSQ step to no less than this fraction of its value before it,
# and never below MIN_STEP (the floor of the steps' initialization: many halvings reach 0 otherwise).
MIN_STEP_SHRINK = 0.5
MIN_STEP = 1e-8
# Consecutive batches with a non-finite loss after which QAT stops instead of skipping on.
MAX_BAD_BATCHES = 10


class QATDiverged(FloatingPointError):
    """QAT's loss stayed NaN or infinite for MAX_BAD_BATCHES batches in a row."""


def lsq_step_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The learnable LSQ steps of a student: every activation quantizer's (attention operands
    included) and every LSQ weight quantizer's per-channel steps."""
    from maskaq.quant.quantizers import LsqActQuantizer, WeightQuantizer

    steps = []
    for m in model.modules():
        if isinstance(m, LsqActQuantizer) or (isinstance(m, WeightQuantizer) and m.method == "lsq"):
            if m.step.requires_grad:
                steps.append(m.step)
    return steps


class StepGuard:
    """Call ``before()`` ahead of ``optimizer.step()`` and ``after()`` once it is done.

    ``clamped`` counts the step elements clamped so far (the run's report carries it).
    """

    def __init__(self, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None):
        self.steps = lsq_step_parameters(model)
        self.optimizer = optimizer
        self.clamped = 0
        self._previous: List[torch.Tensor] = []

    @torch.no_grad()
    def before(self) -> None:
        self._previous = [p.detach().clone() for p in self.steps]

    @torch.no_grad()
    def after(self) -> None:
        if not self._previous:
            return
        bad_total = None
        for p, old in zip(self.steps, self._previous):
            floor = (old * MIN_STEP_SHRINK).clamp_min(MIN_STEP)
            bad = ~(p >= floor) | ~torch.isfinite(p)  # NaN compares false: caught by the first test
            p.copy_(torch.where(bad, floor, p))
            state = self.optimizer.state.get(p) if self.optimizer is not None else None
            buf = state.get("momentum_buffer") if state else None
            if buf is not None:
                buf.masked_fill_(bad, 0.0)
            count = bad.sum()
            bad_total = count if bad_total is None else bad_total + count
        self._previous = []
        if bad_total is not None:
            self.clamped += int(bad_total)
