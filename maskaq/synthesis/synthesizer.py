"""MaskAQ synthesis: optimize noise into calibration images with the student Q in the loop.

One batch (docs/method.md#synthesis): x ~ N(0, 1) is the only optimized tensor;
every step rolls, offsets and colour-jitters it, runs T and (when aligning) Q on the result,
capturing the attention logits of every block, and takes an AdamW step on

    total = w_ssim·L_ssim + w_ce·L_ce + w_tv·L_tv(x) + w_align·L_align + w_ent·L_ent,

then clamps x per channel to the normalized pixel range. A batch that turns non-finite is
re-seeded and started over (at most `max_nan_retries` times) and counted in the report.

Randomness: every batch has its own seed derived from (seed, batch index, attempt), so a
batch's images do not depend on how many processes share the work (torchrun: rank r takes
batches r, r + W, ...; the images are gathered on every rank, rank 0 writes them).
"""
from __future__ import annotations

import contextlib
import functools
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from maskaq.images import SyntheticSet
from maskaq.runtime import batch_seed, dist_info, frozen, gather_batches, progress_bar
from maskaq.spec import ModelSpec, describe_model
from maskaq.synthesis import losses as L
from maskaq.synthesis.augment import SynthesisAugment

__all__ = ["SynthesisConfig", "Synthesizer", "NonFiniteError", "resolve_precision", "batch_seed",
           "frozen", "dist_info", "gather_batches", "progress_bar"]


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}  # the dtype of the T and Q passes (None: no autocast)
PRECISION_CHOICES = ("auto", *PRECISIONS)


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16, which every AMX-BF16 CPU has)."""
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)  # torch's own cpuinfo check
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:
        return False


def _check_precision(precision: str) -> None:
    if precision not in PRECISION_CHOICES:
        raise ValueError(f"precision must be one of {', '.join(PRECISION_CHOICES)}, got {precision!r}")


def resolve_precision(precision: str, device) -> str:
    """The precision ("fp32" or "bf16") that SynthesisConfig.precision means on ``device``.

    "auto" is bf16 on a CPU with native bfloat16 (AMX / AVX512-BF16), where it was measured faster
    at the same W4A4 accuracy (docs/results.md#synthesis-speed), and fp32 elsewhere: CPUs without it
    (bf16 would be emulated) and CUDA, where bf16 synthesis has no accuracy measurement yet.
    """
    _check_precision(precision)
    if precision != "auto":
        return precision
    return "bf16" if torch.device(device).type == "cpu" and cpu_has_native_bf16() else "fp32"


@dataclass
class SynthesisConfig:
    """Every knob of MaskAQ synthesis; defaults are the public code's (docs/method.md#hyperparameters)."""
    num_images: int = 10000
    synth_batch_size: int = 32
    synth_iters: int = 2000
    synth_lr: float = 0.1
    synth_betas: Tuple[float, float] = (0.9, 0.999)
    synth_weight_decay: float = 1e-6
    synth_lr_min: float = 1e-3
    jitter: float = 8.0  # roll limit in px at patch 16 for the first half (doubled after): half a patch, then one
    noise_std: float = 0.5  # per-sample per-channel offset, decays to 0 over the steps
    color_jitter: bool = True
    ce_weight: float = 1.0
    tv_weight: float = 2.5e-5
    # maskaq+ (this package's variant, not the paper's): PSAQ's image prior w·|TV(x) − v|, v the
    # PSAQ target 2750 for 32 × 3 × 224 × 224 scaled by sqrt(numel). 0 = off (MaskAQ).
    tv_target_weight: float = 0.0
    tv_target: float = 2750.0
    # maskaq+ image prior in the init: x0 = (init_pixel − μ)/σ + init_std·N(0, 1), in the model's
    # normalized input space (None: MaskAQ's x0 ~ N(0, 1)). init_pixel=0 starts from a dark canvas,
    # the background of Fashion-MNIST-like data.
    init_pixel: Optional[float] = None
    init_std: float = 1.0
    ssim_weight: float = 1.0
    entropy_weight: float = 1.0
    align_weight: float = 0.1
    mask_ratio_start: float = 0.5
    mask_ratio_end: float = 0.1
    mask_keep: float = 0.7
    entropy_rows: int = 64
    use_entropy: bool = True
    use_alignment: bool = True
    clamp: bool = True
    max_nan_retries: int = 3
    # Activation checkpointing per transformer block for the T and Q passes: their activations are
    # recomputed in the backward pass instead of kept (less memory per image, about one more
    # forward per step); the images are those without it.
    checkpoint_blocks: bool = False
    # Precision of the T and Q passes: "fp32", "bf16" (torch.autocast: their matmuls and activations
    # in bfloat16), or "auto": bf16 where the CPU has native bfloat16, else fp32 (resolve_precision).
    # The images, their AdamW state and every loss stay float32; the captured logits go to the fused
    # ops as bfloat16 where a kernel takes it (CUDA), else as float32.
    precision: str = "auto"

    def validate(self) -> "SynthesisConfig":
        for name in ("num_images", "synth_batch_size", "synth_iters", "entropy_rows"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.mask_keep <= 1:
            raise ValueError(f"mask_keep must be in (0, 1], got {self.mask_keep}")
        for name in ("mask_ratio_start", "mask_ratio_end"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        if self.init_std < 0:
            raise ValueError(f"init_std must be >= 0, got {self.init_std}")
        if self.init_pixel is not None and not 0 <= self.init_pixel <= 1:
            raise ValueError(f"init_pixel must be in [0, 1] (a pixel value) or None, got {self.init_pixel}")
        if self.max_nan_retries < 0:
            raise ValueError(f"max_nan_retries must be >= 0, got {self.max_nan_retries}")
        _check_precision(self.precision)
        return self


class NonFiniteError(RuntimeError):
    """The optimized batch (or its loss) became NaN/inf."""


def _cls_rows_copy(logits: torch.Tensor, num_prefix_tokens: int, has_class_token: bool) -> torch.Tensor:
    """The alignment's rows of one block's logits, as a copy: holding a view would keep the whole map."""
    return L.cls_rows(logits, num_prefix_tokens, has_class_token).clone()


def _capture(model: nn.Module, **kwargs):
    from maskaq.quant import capture_attention
    return capture_attention(model, **kwargs)


def _checkpointed_blocks(model: nn.Module):
    from maskaq.quant import checkpointed_blocks
    return checkpointed_blocks(model)


def _cached_weights(model: Optional[nn.Module]):
    from maskaq.quant import cached_weights
    return cached_weights(model)


class Synthesizer:
    """MaskAQ (and MimiQ, with entropy and alignment off) image synthesis for a teacher.

    `student` is the quantized model put in the loop for the masked attention alignment;
    pass the *current* student at every call (periodic refreshing). `ops` is the module that
    provides patch_similarity_entropy and masked_attention_align (default maskaq.ops), and
    optionally inter_head_ssim_loss (default maskaq.synthesis.losses.inter_head_ssim_loss).
    `on_step(attempt, step, x)` is called after every update (monitoring; tests inject faults).
    `spec`: the teacher's ModelSpec when the caller has it (described from the teacher otherwise).
    """

    def __init__(self, teacher: nn.Module, config: Optional[SynthesisConfig] = None, *,
                 ops=None, progress: Optional[bool] = None,
                 on_step: Optional[Callable[[int, int, torch.Tensor], None]] = None,
                 spec: Optional[ModelSpec] = None):
        self.teacher = teacher
        self.config = (config or SynthesisConfig()).validate()
        self.spec: ModelSpec = spec if spec is not None else describe_model(teacher)
        if ops is None:
            from maskaq import ops
        self.ops = ops
        self.progress = progress
        self.on_step = on_step

    @property
    def device(self) -> torch.device:
        return next(self.teacher.parameters()).device

    def passes_precision(self) -> str:
        """The precision of the T and Q passes on this device: config.precision with "auto" resolved."""
        return resolve_precision(self.config.precision, self.device)

    # ------------------------------------------------------------------------------ one step
    def losses(self, x: torch.Tensor, x_aug: torch.Tensor, labels: torch.Tensor,
               student: Optional[nn.Module], step: int, generator: torch.Generator) -> Dict[str, torch.Tensor]:
        """Forward T (and Q) on the augmented batch; every loss term of docs/method.md#synthesis."""
        cfg, spec = self.config, self.spec
        aligning = self._aligning(student)
        t_full = cfg.ssim_weight > 0 or (cfg.use_entropy and cfg.entropy_weight > 0)
        rows = functools.partial(_cls_rows_copy, num_prefix_tokens=spec.num_prefix_tokens,
                                 has_class_token=spec.has_class_token)
        out: Dict[str, torch.Tensor] = {}
        with contextlib.ExitStack() as stack:
            dtype = PRECISIONS[self.passes_precision()]
            if dtype is not None:
                stack.enter_context(torch.autocast(x_aug.device.type, dtype=dtype))
            if cfg.checkpoint_blocks:
                stack.enter_context(_checkpointed_blocks(self.teacher))
                if aligning:
                    stack.enter_context(_checkpointed_blocks(student))
            # Each capture keeps what the losses read: T's full maps for SSIM and the entropy, else
            # (and always for Q) only the rows the alignment compares.
            cap_t = (stack.enter_context(_capture(self.teacher, logits=True, outputs=False,
                                                  reduce_logits=None if t_full else rows))
                     if t_full or aligning else None)
            cap_q = (stack.enter_context(_capture(student, logits=True, outputs=False, reduce_logits=rows))
                     if aligning else None)
            logits_t = self.teacher(x_aug)
            if cap_q is not None:
                student(x_aug)
        t_blocks = [self._loss_input(a) for a in cap_t.logits] if cap_t is not None else None
        q_rows = [self._loss_input(a) for a in cap_q.logits] if cap_q is not None else None
        out["ce"] = F.cross_entropy(logits_t.float(), labels)
        out["tv"] = L.total_variation(x)
        if cfg.tv_target_weight > 0:
            target = cfg.tv_target * (x.numel() / (32 * 3 * 224 * 224)) ** 0.5
            out["tv_target"] = torch.abs(L.psaq_total_variation(x) - target)
        if cfg.ssim_weight > 0:
            ssim_loss = getattr(self.ops, "inter_head_ssim_loss", None)
            out["ssim"] = (ssim_loss(t_blocks, spec.num_prefix_tokens) if ssim_loss is not None else
                           L.inter_head_ssim_loss(t_blocks, spec.num_prefix_tokens, recompute=cfg.checkpoint_blocks))
        if cfg.use_entropy and cfg.entropy_weight > 0:
            out["entropy"] = L.entropy_loss(t_blocks, spec.num_prefix_tokens, cfg.entropy_rows,
                                            generator=generator, ops=self.ops)
        if cap_q is not None:
            ratio = L.mask_ratio(step, cfg.synth_iters, cfg.mask_ratio_start, cfg.mask_ratio_end)
            t_rows = ([L.cls_rows(a, spec.num_prefix_tokens, spec.has_class_token) for a in t_blocks]
                      if t_full else t_blocks)
            out["align"], _ = L.alignment_loss_rows(t_rows, q_rows, ratio=ratio, keep=cfg.mask_keep,
                                                    generator=generator, ops=self.ops)
        weights = {"ce": cfg.ce_weight, "tv": cfg.tv_weight, "ssim": cfg.ssim_weight,
                   "entropy": cfg.entropy_weight, "align": cfg.align_weight, "tv_target": cfg.tv_target_weight}
        out["total"] = sum(weights[k] * v for k, v in out.items())
        return out

    def _loss_input(self, logits: torch.Tensor) -> torch.Tensor:
        """Captured logits as the losses take them: float32, or a reduced precision that a fused
        kernel takes as it is (it accumulates in float32)."""
        if getattr(self.ops, "uses_extension", lambda t: False)(logits):
            return logits
        return L.full_precision(logits)

    def _aligning(self, student) -> bool:
        return student is not None and self.config.use_alignment and self.config.align_weight > 0

    # ----------------------------------------------------------------------------- one batch
    def _initial_images(self, batch: int, g: torch.Generator) -> torch.Tensor:
        cfg, spec, dev = self.config, self.spec, self.device
        x = torch.randn(spec.image_shape(batch), generator=g, device=dev)
        if cfg.init_pixel is None:
            return x
        mean = torch.tensor(spec.mean, device=dev).view(1, -1, 1, 1)
        std = torch.tensor(spec.std, device=dev).view(1, -1, 1, 1)
        return (cfg.init_pixel - mean) / std + cfg.init_std * x

    def _optimize(self, seed: int, batch: int, student, attempt: int, bar=None, progress=None):
        cfg, spec, dev = self.config, self.spec, self.device
        g = torch.Generator(device=dev)
        g.manual_seed(seed)
        x = self._initial_images(batch, g)
        labels = torch.randint(0, spec.num_classes, (batch,), generator=g, device=dev)
        x.requires_grad_(True)
        opt = torch.optim.AdamW([x], lr=cfg.synth_lr, betas=tuple(cfg.synth_betas), eps=1e-8,
                                weight_decay=cfg.synth_weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.synth_iters, eta_min=cfg.synth_lr_min)
        aug = SynthesisAugment(cfg.synth_iters, min(spec.patch_size), jitter=cfg.jitter,
                               noise_std=cfg.noise_std, color_jitter=cfg.color_jitter)

        def step_fn(step):
            opt.zero_grad(set_to_none=True)
            terms = self.losses(x, aug(x, step, g), labels, student, step, g)
            terms["total"].backward()
            opt.step()
            sched.step()
            return terms

        return self._run_steps(x, labels, g, opt, sched, step_fn, attempt, bar, progress)

    def _run_steps(self, x, labels, g, opt, sched, step_fn, attempt: int, bar=None, progress=None):
        """The step loop of every synthesis (MaskAQ's, PSAQ's): ``step_fn(step)`` makes one
        optimizer step on ``x`` and returns the loss terms; then x is clamped to the pixel range and
        checked for NaN. With ``progress`` (a BatchProgress) the loop starts from the state an
        earlier run saved of this attempt (images, optimizer, schedule, generator, step) and saves
        its own every few steps: a resumed batch ends with the images an uninterrupted one has.
        Returns (images, labels, loss history, final loss terms)."""
        cfg, dev = self.config, self.device
        lo = self.spec.pixel_min.to(dev).view(1, -1, 1, 1)
        hi = self.spec.pixel_max.to(dev).view(1, -1, 1, 1)
        history, last, start = [], {}, 0
        saved = progress.resume_state(attempt) if progress is not None else None
        if saved is not None:
            with torch.no_grad():
                x.copy_(saved["x"])
            opt.load_state_dict(saved["optimizer"])
            if sched is not None:
                sched.load_state_dict(saved["scheduler"])
            g.set_state(saved["generator"])
            history, start = list(saved["history"].to(dev).unbind()), int(saved["step"])
            if bar is not None:
                bar.update(start)

        def state():
            return {"x": x.detach().cpu(), "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict() if sched is not None else None,
                    "generator": g.get_state(), "history": torch.stack(history).cpu()}

        for step in range(start, cfg.synth_iters):
            terms = step_fn(step)
            with torch.no_grad():
                if cfg.clamp:
                    x.copy_(torch.maximum(torch.minimum(x, hi), lo))
            if self.on_step is not None:
                self.on_step(attempt, step, x)
            total = terms["total"].detach()
            history.append(total)
            if not (bool(torch.isfinite(total)) and bool(torch.isfinite(x).all())):
                raise NonFiniteError(f"non-finite batch at step {step}")
            last = terms
            if bar is not None:
                bar.update(1)
            if progress is not None and step + 1 < cfg.synth_iters:
                progress.save(step + 1, state)
        history = torch.stack(history).float().cpu().tolist()
        final = {k: float(v.detach()) for k, v in last.items()}
        return x.detach(), labels, history, final

    def synthesize_batch(self, seed: int = 0, batch_index: int = 0, student: Optional[nn.Module] = None,
                         batch_size: Optional[int] = None, bar=None, progress=None):
        """One batch with NaN recovery. Returns (images, labels, info) or (None, None, info).

        ``progress`` (a BatchProgress of a BatchStore): resume the batch from the state an earlier
        run saved of it, and save it every few steps."""
        cfg = self.config
        batch = int(batch_size or cfg.synth_batch_size)
        first = progress.attempt if progress is not None else 0
        info = {"batch_index": batch_index, "nan_retries": progress.nan_retries if progress is not None else 0,
                "failed": False}
        # The student is frozen for the whole batch: its fake-quant weights are computed once.
        with frozen(self.teacher, student), _cached_weights(student):
            for attempt in range(first, cfg.max_nan_retries + 1):
                s = batch_seed(seed, batch_index, attempt)
                if progress is not None:
                    progress.attempt, progress.nan_retries = attempt, info["nan_retries"]
                try:
                    x, y, history, final = self._optimize(s, batch, student, attempt, bar, progress)
                except NonFiniteError as exc:
                    info["nan_retries"] += 1
                    warnings.warn(f"synthesis batch {batch_index}: {exc}; re-seeding (attempt "
                                  f"{attempt + 1} of {cfg.max_nan_retries + 1})", RuntimeWarning, stacklevel=2)
                    continue
                info.update(seed=s, attempt=attempt, loss_history=history, final_losses=final)
                return x, y, info
        info["failed"] = True
        return None, None, info

    # ------------------------------------------------------------------------------ a dataset
    def synthesize(self, num_images: Optional[int] = None, seed: int = 0,
                   student: Optional[nn.Module] = None, desc: str = "synthesis", store=None) -> SyntheticSet:
        """`num_images` images (the last batch may be smaller), all ranks' batches gathered.

        `store` (a maskaq.synthesis.io.BatchStore): each finished batch is written there, and a
        batch already there is read instead of synthesized again (a killed run resumes; the images
        are those an uninterrupted run makes, since every batch's seed depends only on `seed` and
        its index)."""
        cfg = self.config
        n = int(num_images or cfg.num_images)
        bs = cfg.synth_batch_size
        sizes = [min(bs, n - start) for start in range(0, n, bs)]
        rank, world = dist_info()
        mine = [i for i in range(len(sizes)) if i % world == rank]
        started, cpu_started = time.perf_counter(), time.process_time()
        local, infos = [], []
        with progress_bar(sum(sizes[i] > 0 for i in mine) * cfg.synth_iters, desc, self.progress) as bar:
            for i in mine:
                done = store.load(i) if store is not None else None
                if done is not None:
                    x, y, info = done
                    if bar is not None:
                        bar.update(cfg.synth_iters)
                else:
                    x, y, info = self.synthesize_batch(seed, i, student, sizes[i], bar,
                                                       store.progress(i) if store is not None else None)
                    if store is not None:
                        store.save(i, x, y, info)
                infos.append(info)
                if x is not None:
                    local.append((i, x.cpu(), y.cpu()))
        batches = gather_batches(local, world)
        if not batches:
            raise RuntimeError(f"every synthesis batch turned non-finite even after {cfg.max_nan_retries} "
                               "re-seeded retries; lower synth_lr or check the model")
        report = {
            "num_images": sum(int(x.shape[0]) for _, x, _ in batches),
            "num_batches": len(sizes),
            "precision": self.passes_precision(),
            "nan_retries": sum(i["nan_retries"] for i in infos),
            "failed_batches": [i["batch_index"] for i in infos if i["failed"]],
            "seconds": time.perf_counter() - started,
            "cpu_seconds": time.process_time() - cpu_started,
            "first_loss": _mean([i["loss_history"][0] for i in infos if "loss_history" in i]),
            "final_losses": _mean_dicts([i["final_losses"] for i in infos if "final_losses" in i]),
        }
        if world > 1:
            report = _reduce_report(report, world)
        return SyntheticSet(torch.cat([x for _, x, _ in batches]), torch.cat([y for _, _, y in batches]), report)


def _mean(values: Sequence[float]) -> Optional[float]:
    return float(sum(values) / len(values)) if values else None


def _mean_dicts(dicts: Sequence[Dict[str, float]]) -> Dict[str, float]:
    if not dicts:
        return {}
    return {k: float(sum(d[k] for d in dicts) / len(dicts)) for k in dicts[0]}


def _reduce_report(report: Dict, world: int) -> Dict:
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, report)
    out = dict(report)
    out["nan_retries"] = sum(r["nan_retries"] for r in gathered)
    out["failed_batches"] = sorted(i for r in gathered for i in r["failed_batches"])
    out["seconds"] = max(r["seconds"] for r in gathered)
    return out
