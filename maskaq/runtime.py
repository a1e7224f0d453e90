"""What every long-running part of maskaq shares at run time: seeds, random draws, processes,
progress bars.

Seeds: every random draw takes its seed from `batch_seed(seed, index, attempt, stream)`, a
well-mixed function of the user's seed and the position of the draw, so that results do not
depend on how many processes share the work. Each kind of draw has its own named stream.
"""
from __future__ import annotations

import contextlib
import os
from datetime import timedelta
from typing import List, Optional, Tuple

import numpy as np
import torch
from torch import nn

__all__ = ["SeedStream", "batch_seed", "uniform", "frozen", "dist_info", "gather_batches", "progress_bar"]


class SeedStream:
    """The `stream` argument of batch_seed for each kind of random draw (values fixed: they make
    today's images and runs repeat)."""
    SYNTHESIS_BATCH = 0  # one synthesis batch attempt (MaskAQ, MimiQ, PSAQ)
    GAUSSIAN_SET = 1  # a fixed set of Gaussian noise images
    REAL_SUBSET = 2  # which real training images QAT uses
    ROUND = 3  # the seed of one refresh round's image set
    QAT_SHUFFLE = 7  # the order of the images in one QAT epoch
    QAT_AUGMENT = 11  # QAT's augmentation of one step
    GAUSSIAN_STREAM = 13  # fresh Gaussian noise for one QAT step


def batch_seed(seed: int, batch_index: int, attempt: int = 0, stream: int = SeedStream.SYNTHESIS_BATCH) -> int:
    """A well-mixed 63-bit seed for one batch attempt (independent of rank and world size)."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(batch_index), int(attempt), int(stream)])
    return int(state.generate_state(1, dtype=np.uint64)[0]) & ((1 << 63) - 1)  # a Python int: numpy < 2 has no uint64 & int


def uniform(shape, low, high, generator, device, dtype=torch.float32):
    """U(low, high) of ``shape`` drawn from ``generator``."""
    return torch.rand(shape, generator=generator, device=device, dtype=dtype) * (high - low) + low


@contextlib.contextmanager
def frozen(*models: Optional[nn.Module]):
    """Eval mode and no parameter gradients for the models; restores both on exit."""
    saved = []
    for m in models:
        if m is None:
            continue
        saved.append((m, m.training, [(p, p.requires_grad) for p in m.parameters()]))
        m.eval()
        for p in m.parameters():
            p.requires_grad_(False)
    try:
        yield
    finally:
        for m, training, flags in saved:
            m.train(training)
            for p, flag in flags:
                p.requires_grad_(flag)


def dist_info() -> Tuple[int, int]:
    """(rank, world_size) of the default process group, (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def init_distributed() -> bool:
    """Join the process group that torchrun describes in the environment (WORLD_SIZE > 1): NCCL on
    CUDA machines, gloo otherwise. Returns True when this call created the group (the caller then
    ends it with end_distributed). A collective waits at most MASKAQ_DIST_TIMEOUT_S seconds (default
    1800) for a rank, so a rank that died cannot hang the others forever; torchrun itself stops
    the job when one of its processes fails."""
    dist = torch.distributed
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = timedelta(seconds=float(os.environ.get("MASKAQ_DIST_TIMEOUT_S", "1800")))
    dist.init_process_group(backend, timeout=timeout)
    return True


def end_distributed(created: bool, finished: bool = True) -> None:
    """Leave the process group this process created. After a finished run every rank first waits for
    the others: rank 0 hosts the group's store, and a rank still tearing down its side of the group
    after rank 0 is gone can block at exit."""
    if created and torch.distributed.is_initialized():
        if finished:
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (a no-op in one process)."""
    if dist_info()[1] > 1:
        torch.distributed.barrier()


def world_size() -> int:
    """Processes in the default group (1 without one)."""
    return dist_info()[1]


def gather_batches(local: List[Tuple[int, torch.Tensor, torch.Tensor]], world_size: int):
    """All ranks' (batch_index, images, labels) in batch order (all-gather when distributed)."""
    if world_size > 1:
        gathered = [None] * world_size
        torch.distributed.all_gather_object(gathered, [(i, x.cpu(), y.cpu()) for i, x, y in local])
        local = [item for part in gathered for item in part]
    return sorted(local, key=lambda item: item[0])


def progress_bar(total: int, desc: str, enabled: Optional[bool] = None):
    from tqdm.auto import tqdm
    rank, _ = dist_info()
    disable = (rank != 0) if enabled is None else (not enabled or rank != 0)
    # disable=None lets tqdm switch itself off when stderr is not a terminal.
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, disable=None if not disable else True)
