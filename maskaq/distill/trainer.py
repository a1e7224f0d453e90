"""QAT of the student Q by distillation from the teacher T on synthetic images.

Loss = KD(τ) + λ·L_hd on augmented synthetic images; SGD (Nesterov, momentum 0.9, weight
decay 0) with a cosine schedule to 1% of the learning rate over all steps, and no optimizer
step in the first `qat_warmup_epochs` epochs (the public code's warm-up: those epochs only
advance the schedule, so they are skipped without computing anything).

Periodic sample refreshing: the synthetic set is (re)generated at epochs 0, R, 2R, ... by
`data_source(student, round)`, which receives the *current* student, so MaskAQ synthesis
aligns T with the Q that is being trained (R = 0 or None: generate once).

torchrun: with a process group the student is wrapped in DistributedDataParallel and each
rank trains on its share of every epoch's batches (the synthetic set is the same on all ranks).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from maskaq.distill.losses import head_distillation_loss, kd_loss
from maskaq.distill.augment import QATAugment
from maskaq.distill.guard import MAX_BAD_BATCHES, QATDiverged, StepGuard
from maskaq.images import SyntheticSet
from maskaq.spec import ModelSpec, describe_model
from maskaq.runtime import SeedStream, batch_seed, dist_info, progress_bar

__all__ = ["QATConfig", "QATTrainer", "refresh_schedule"]


@dataclass
class QATConfig:
    """Every knob of QAT; defaults follow docs/method.md#hyperparameters (the public code's config and example)."""
    qat_epochs: int = 200  # on synthetic data (the public code: 100 on real data)
    qat_batch_size: int = 32
    qat_lr: float = 1e-3
    qat_momentum: float = 0.9
    qat_weight_decay: float = 0.0  # the public code's --wd default overrides its config's 1e-4
    qat_lr_min_factor: float = 0.01
    qat_warmup_epochs: int = 2  # epochs without an optimizer step (the schedule still advances)
    kd_temperature: float = 5.0  # --kl_temp as the public code runs (its config's 20 is never read)
    hd_weight: float = 10.0
    hd_top_fraction: float = 0.1
    hd_weight_high: float = 2.0
    hd_mask: bool = True
    refresh_every: Optional[int] = 30  # regenerate the set every R epochs; 0/None: never
    qat_augment: bool = True
    qat_steps_per_epoch: Optional[int] = None  # default: one pass over the synthetic set
    # False: the activation quantizers' steps and zero points keep their calibration and QAT
    # trains the weights only (docs/method.md#qat trains both).
    qat_train_act_quantizers: bool = True
    # The learning rate of the activation quantizers' steps, as a multiple of qat_lr (1: docs/method.md#qat,
    # one rate for all). LSQ scales a step's gradient by 1/sqrt(numel·qmax), which suits the public
    # code's ~60k optimizer steps; in a few hundred steps the grids do not move at all.
    qat_act_step_lr_scale: float = 1.0

    def validate(self) -> "QATConfig":
        if self.qat_epochs < 1 or self.qat_batch_size < 1:
            raise ValueError("qat_epochs and qat_batch_size must be >= 1")
        if self.qat_lr <= 0:
            raise ValueError(f"qat_lr must be > 0, got {self.qat_lr}")
        if self.refresh_every is not None and self.refresh_every < 0:
            raise ValueError(f"refresh_every must be >= 0 (0 = never), got {self.refresh_every}")
        if self.qat_steps_per_epoch is not None and self.qat_steps_per_epoch < 1:
            raise ValueError("qat_steps_per_epoch must be >= 1")
        if not 0 <= self.qat_warmup_epochs < self.qat_epochs:
            raise ValueError(f"qat_warmup_epochs must be in [0, qat_epochs), got {self.qat_warmup_epochs}")
        if self.kd_temperature <= 0:
            raise ValueError(f"kd_temperature must be > 0, got {self.kd_temperature}")
        if not self.qat_act_step_lr_scale > 0:
            raise ValueError(f"qat_act_step_lr_scale must be > 0, got {self.qat_act_step_lr_scale}")
        return self


def refresh_schedule(epochs: int, refresh_every: Optional[int]) -> List[int]:
    """Epochs at which the synthetic set is generated: 0, R, 2R, ... < epochs."""
    if not refresh_every:
        return [0]
    return list(range(0, epochs, int(refresh_every)))


class QATTrainer:
    def __init__(self, teacher: nn.Module, student: nn.Module, config: Optional[QATConfig] = None,
                 data_source: Optional[Callable[[nn.Module, int], SyntheticSet]] = None, *,
                 seed: int = 0, progress: Optional[bool] = None, spec: Optional[ModelSpec] = None):
        self.teacher = teacher.eval()
        self.student = student
        self.config = (config or QATConfig()).validate()
        self.data_source = data_source
        self.seed = int(seed)
        self.progress = progress
        self.spec = spec if spec is not None else describe_model(teacher)
        self.augment = QATAugment(self.spec.mean, self.spec.std) if self.config.qat_augment else None
        self.refresh_log: List[Dict] = []
        self.data: Optional[SyntheticSet] = None
        self._run: Optional[Dict] = None  # optimizer, schedule and counters, from the first round on
        # report()'s seconds count from here: the rounds' synthesis included
        self._started, self._cpu_started = time.perf_counter(), time.process_time()

    @property
    def device(self) -> torch.device:
        return next(self.teacher.parameters()).device

    def refresh_epochs(self) -> List[int]:
        return refresh_schedule(self.config.qat_epochs, self.config.refresh_every)

    def _steps_per_epoch(self, n_images: int) -> int:
        cfg = self.config
        return cfg.qat_steps_per_epoch or max(1, math.ceil(n_images / cfg.qat_batch_size))

    def _batches(self, epoch: int, steps: int):
        """Index batches of one epoch (reshuffled passes over the set): the global batches, of the
        configured size whatever the world size; each rank trains on its share of every one."""
        n, bs = len(self.data), self.config.qat_batch_size
        g = torch.Generator().manual_seed(batch_seed(self.seed, epoch, stream=SeedStream.QAT_SHUFFLE))
        passes = math.ceil(steps * bs / n) + 1
        order = torch.cat([torch.randperm(n, generator=g) for _ in range(passes)])
        for i in range(steps):
            yield order[i * bs:(i + 1) * bs]

    def step_loss(self, images: torch.Tensor, model: nn.Module) -> Dict[str, torch.Tensor]:
        from maskaq.quant import capture_attention
        cfg = self.config
        need_hd = cfg.hd_weight > 0
        with torch.no_grad():
            if need_hd:
                with capture_attention(self.teacher, logits=False, outputs=True) as cap_t:
                    logits_t = self.teacher(images)
            else:
                logits_t = self.teacher(images)
        if need_hd:
            with capture_attention(model, logits=False, outputs=True) as cap_q:
                logits_q = model(images)
        else:
            logits_q = model(images)
        out = {"kd": kd_loss(logits_q, logits_t, cfg.kd_temperature)}
        total = out["kd"]
        if need_hd:
            out["hd"] = head_distillation_loss(cap_t.outputs, cap_q.outputs, self.spec.num_prefix_tokens,
                                               top_fraction=cfg.hd_top_fraction, high=cfg.hd_weight_high,
                                               masked=cfg.hd_mask)
            total = total + cfg.hd_weight * out["hd"]
        out["total"] = total
        return out

    def _parameter_groups(self) -> List[Dict]:
        """SGD's parameter groups: the activation quantizers' steps at qat_lr·qat_act_step_lr_scale
        (when that is not 1), everything else that trains at qat_lr."""
        from maskaq.quant.quantizers import LsqActQuantizer
        cfg = self.config
        quantizers = [m for m in self.student.modules() if isinstance(m, LsqActQuantizer)]
        steps = {id(m.step) for m in quantizers}
        frozen = set() if cfg.qat_train_act_quantizers else {id(p) for m in quantizers for p in m.parameters()}
        trainable = [p for p in self.student.parameters() if p.requires_grad and id(p) not in frozen]
        if cfg.qat_act_step_lr_scale == 1.0:
            return [{"params": trainable, "lr": cfg.qat_lr}] if trainable else []
        groups = [{"params": [p for p in trainable if id(p) not in steps], "lr": cfg.qat_lr},
                  {"params": [p for p in trainable if id(p) in steps], "lr": cfg.qat_lr * cfg.qat_act_step_lr_scale}]
        return [g for g in groups if g["params"]]

    def rounds(self) -> List[range]:
        """The epochs of each synthesis round: round r trains epochs refresh_epochs[r] up to the next."""
        starts = self.refresh_epochs()
        return [range(a, b) for a, b in zip(starts, starts[1:] + [self.config.qat_epochs])]

    def fit(self) -> Dict:
        """Every round with the images of ``data_source(student, round)``; returns report()."""
        if self.data_source is None:
            raise ValueError("QATTrainer.fit needs data_source(student, round) -> SyntheticSet; "
                             "or call train_round(images, epochs) for each round yourself")
        for round_index, epochs in enumerate(self.rounds()):
            self.train_round(self.data_source(self.student, round_index), epochs)
        self.student.eval()
        return self.report()

    def _start(self, n_images: int) -> None:
        """Optimizer and schedule, made when the first round's images are known (the cosine spans the
        whole run with the steps per epoch of the first set)."""
        cfg = self.config
        world = dist_info()[1]
        groups = self._parameter_groups()
        if not groups:
            raise ValueError("the student has no trainable parameters")
        opt = torch.optim.SGD(groups, lr=cfg.qat_lr, momentum=cfg.qat_momentum,
                              weight_decay=cfg.qat_weight_decay, nesterov=True)
        if cfg.qat_batch_size % world:
            raise ValueError(f"qat_batch_size ({cfg.qat_batch_size}) must be a multiple of the number of "
                             f"processes ({world}): each trains on an equal share of every global batch")
        steps = self._steps_per_epoch(n_images)  # global batches per epoch, as in one process
        total_steps = steps * cfg.qat_epochs
        # The cosine starts at epoch 0; the warm-up epochs take no step but use up their share.
        offset = steps * cfg.qat_warmup_epochs
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: _cosine(s + offset, total_steps, cfg.qat_lr_min_factor))
        model = nn.parallel.DistributedDataParallel(self.student) if world > 1 else self.student
        self._guard = StepGuard(self.student, opt)
        # epoch / batch: where training stands (the next epoch, and the batches of it already done),
        # running / count: that epoch's loss sum so far; all of it is in state_dict()
        self._run = {"opt": opt, "sched": sched, "model": model, "step_no": 0, "optimizer_steps": 0,
                     "epoch_losses": [], "epoch": 0, "batch": 0, "running": 0.0, "count": 0,
                     "skipped_batches": 0, "bad_in_a_row": 0, "g_aug": torch.Generator(device=self.device)}

    def state_dict(self) -> Dict:
        """Everything a resumed run needs to continue bit-identically (with the student's own state)."""
        run = self._run
        if run is None:
            return {"started": False, "refresh_log": list(self.refresh_log)}
        return dict({k: run[k] for k in _RUN_COUNTERS}, epoch_losses=list(run["epoch_losses"]), started=True,
                    clamped_steps=self._guard.clamped,
                    opt=run["opt"].state_dict(), sched=run["sched"].state_dict(), refresh_log=list(self.refresh_log))

    def load_state_dict(self, state: Dict, n_images: int) -> None:
        """Restore state_dict()'s ``state``; ``n_images``: the size of the first round's set (it
        fixes the schedule, as it did in the run that saved the state)."""
        self.refresh_log = list(state["refresh_log"])
        if not state["started"]:
            return
        self._start(n_images)
        run = self._run
        run["opt"].load_state_dict(state["opt"])
        run["sched"].load_state_dict(state["sched"])
        for k in _RUN_COUNTERS:
            run[k] = state.get(k, 0)  # counters added later are 0 in an older checkpoint
        self._guard.clamped = state.get("clamped_steps", 0)
        run["epoch_losses"] = list(state["epoch_losses"])

    def train_round(self, data: SyntheticSet, epochs: range, on_step: Optional[Callable[[], None]] = None) -> None:
        """Train the student on ``data`` for ``epochs`` (a range of epoch numbers of the whole run).
        After load_state_dict, epochs and batches already done are skipped. ``on_step()`` is called
        after every optimizer step (the pipeline checkpoints from there)."""
        if self._run is None:
            self._start(len(data))
        self.data = data
        if not self.refresh_log or self.refresh_log[-1]["epoch"] != epochs.start:  # not a resumed round
            self.refresh_log.append({"epoch": epochs.start, "round": len(self.refresh_log),
                                     "num_images": len(data), "report": data.report})
        for epoch in epochs:
            if epoch >= self._run["epoch"]:
                self._train_epoch(epoch, on_step)

    def _global_batch(self, index: torch.Tensor, epoch: int) -> torch.Tensor:
        """The images of one global batch, augmented (the generator seeded by the step number)."""
        run = self._run
        run["g_aug"].manual_seed(batch_seed(self.seed, epoch, run["step_no"], stream=SeedStream.QAT_AUGMENT))
        if self.data.draw is not None:  # an endless stream: fresh images every batch
            images = self.data.draw(len(index), run["step_no"])
        else:
            images = self.data.images[index]
        images = images.to(self.device)
        return self.augment(images, run["g_aug"]) if self.augment is not None else images

    def _train_epoch(self, epoch: int, on_step: Optional[Callable[[], None]] = None) -> None:
        cfg, run = self.config, self._run
        rank, world = dist_info()
        steps = self._steps_per_epoch(len(self.data))
        if epoch < cfg.qat_warmup_epochs:
            # No optimizer step in the warm-up (public code): only the step counter (which
            # seeds the augmentation and places the schedule) moves on.
            run["step_no"] += steps
            run["epoch"], run["batch"] = epoch + 1, 0
            return
        self.student.train()
        with progress_bar(steps, f"QAT epoch {epoch + 1}/{cfg.qat_epochs}", self.progress) as bar:
            for i, index in enumerate(self._batches(epoch, steps)):
                if i < run["batch"]:  # done before the run was resumed
                    bar.update(1)
                    continue
                images = self._global_batch(index, epoch)
                # every rank makes (and augments) the whole global batch, then trains on its rows:
                # the images are those of a one-process run; DDP averages the rank gradients.
                images = images[rank::world]
                terms = self.step_loss(images, run["model"])
                loss = float(terms["total"].detach())
                run["opt"].zero_grad(set_to_none=True)
                if _all_ranks_finite(loss, world):
                    run["bad_in_a_row"] = 0
                    terms["total"].backward()
                    self._guard.before()
                    run["opt"].step()
                    self._guard.after()
                    run["optimizer_steps"] += 1
                    run["running"] += loss
                    run["count"] += 1
                    run["sched"].step()
                else:
                    self._skip_bad_batch(epoch, i, terms)
                run["step_no"] += 1
                run["batch"] = i + 1
                bar.update(1)
                if run["count"]:
                    bar.set_postfix(loss=f"{run['running'] / run['count']:.4f}")
                if on_step is not None:
                    on_step()
        run["epoch_losses"].append(run["running"] / max(run["count"], 1))
        run["epoch"], run["batch"], run["running"], run["count"] = epoch + 1, 0, 0.0, 0

    def _skip_bad_batch(self, epoch: int, index: int, terms: Dict[str, torch.Tensor]) -> None:
        """A batch whose loss is NaN or infinite trains nothing; too many in a row stop the run."""
        run = self._run
        run["skipped_batches"] += 1
        run["bad_in_a_row"] += 1
        if run["bad_in_a_row"] >= MAX_BAD_BATCHES:
            parts = ", ".join(f"{k} {float(v.detach()):.4g}" for k, v in terms.items())
            raise QATDiverged(
                f"QAT diverged: the loss was NaN or infinite for {run['bad_in_a_row']} batches in a row "
                f"(epoch {epoch + 1}, batch {index + 1}; {parts}); the student was not updated by them, and a "
                "run with a checkpoint directory keeps the last saved state. Try a lower qat_lr, or check the "
                "teacher's outputs on the images (an inf logit)")

    def report(self) -> Dict:
        run = self._run or {"step_no": 0, "optimizer_steps": 0, "epoch_losses": [], "skipped_batches": 0}
        return {
            "epochs": self.config.qat_epochs,
            "warmup_epochs": self.config.qat_warmup_epochs,  # epoch_losses starts after them
            "steps": run["step_no"],
            "optimizer_steps": run["optimizer_steps"],
            "skipped_batches": run["skipped_batches"],  # non-finite losses, not trained on
            "clamped_steps": self._guard.clamped if self._run else 0,  # LSQ step updates held at half
            "refresh_epochs": [r["epoch"] for r in self.refresh_log],
            "epoch_losses": run["epoch_losses"],
            "seconds": time.perf_counter() - self._started,
            "cpu_seconds": time.process_time() - self._cpu_started,
            "synthesis": [{k: v for k, v in r["report"].items()} for r in self.refresh_log],
        }


# The training position and loss counters of QATTrainer._run that state_dict() carries as they are.
_RUN_COUNTERS = ("step_no", "optimizer_steps", "epoch", "batch", "running", "count", "skipped_batches",
                 "bad_in_a_row")


def _all_ranks_finite(loss: float, world: int) -> bool:
    """Whether the loss is finite on every rank (all ranks skip a batch together, or none does: DDP's
    backward is collective)."""
    finite = math.isfinite(loss)
    if world > 1:
        import torch.distributed as dist
        flag = torch.tensor([1.0 if finite else 0.0])
        if dist.get_backend() == "nccl":
            flag = flag.cuda()
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        finite = bool(flag.item() > 0)
    return finite


def _cosine(step: int, total: int, min_factor: float) -> float:
    t = min(step / max(total, 1), 1.0)
    return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * t))
