"""Checkpoints of a quantization run (maskaq.pipeline), so that a killed run resumes where it stopped.

A run's directory holds:
  state.pt             the QAT state (student, optimizer, schedule, counters, RNG), rewritten every
                       few steps and minutes: a SHA-256 line, then the torch.save payload;
  sets/batch_0000R     the images of round R once made (not for endless noise streams, which are
                       redrawn from their seed);
  round_R/batch_0000B  the finished synthesis batches of round R while it is made, and the batch
                       in progress (batch_0000B.partial.pt, every few steps and minutes).
Every file is written atomically (temp file, fsync, rename) and carries the run's fingerprint:
the method, bits, seed, settings and the teacher's weights digest. Resuming with other settings
or another model is refused with a message that says what differs (CheckpointMismatchError), a
damaged file is named (CorruptCheckpointError).
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from maskaq._files import (CheckpointMismatchError, CorruptCheckpointError, SaveSchedule, is_rank0, jsonable,
                           load_checked, save_checked, weights_digest)
from maskaq.runtime import barrier
from maskaq.synthesis.io import BatchStore

__all__ = ["RunCheckpoint", "CheckpointSaver", "open_run_checkpoint", "CheckpointMismatchError",
           "CorruptCheckpointError"]


class RunCheckpoint:
    def __init__(self, directory, fingerprint: Dict[str, Any], every_steps: int = 100, every_seconds: float = 300.0):
        self.directory = Path(directory)
        self.fingerprint = jsonable(fingerprint)
        self.every_steps, self.every_seconds = every_steps, every_seconds  # for the batches in progress
        self._sets = BatchStore(self.directory / "sets", self.fingerprint)

    @property
    def state_path(self) -> Path:
        return self.directory / "state.pt"

    def holds_a_run(self) -> bool:
        """True when the directory has anything of an earlier run in it."""
        return self.directory.is_dir() and any(self.directory.iterdir())

    def batch_store(self, round_index: int) -> BatchStore:
        """Where round ``round_index``'s synthesis keeps its finished batches."""
        return BatchStore(self.directory / f"round_{int(round_index)}", self.fingerprint, self.every_steps,
                          self.every_seconds)

    def save_round_images(self, round_index: int, images) -> None:
        """Rank 0 writes (every rank holds the gathered set)."""
        if not is_rank0():
            return
        if images.draw is None:  # an endless stream is redrawn from its seed instead
            self._sets.save(round_index, images.images, images.labels, {"report": images.report})
        self.batch_store(round_index).remove()  # the whole set replaces its batches

    def round_images(self, round_index: int):
        """The SyntheticSet of round ``round_index`` made before the run stopped, or None."""
        from maskaq.images import SyntheticSet
        done = self._sets.load(round_index)
        if done is None or done[0] is None:
            return None
        images, labels, info = done
        return SyntheticSet(images, labels, info.get("report", {}))

    def save(self, state: Dict[str, Any]) -> None:
        save_checked(self.state_path, self.fingerprint, state)

    def load(self) -> Optional[Dict[str, Any]]:
        """The last saved state, or None when no QAT state was saved yet (the run stopped in its
        first synthesis; its batches are picked up from batch_store)."""
        return load_checked(self.state_path, self.fingerprint, "delete it to restart from the last finished synthesis")

    def remove(self) -> None:
        """Delete the checkpoints (the run finished and its results are written); rank 0 only."""
        if is_rank0() and self.directory.is_dir():
            shutil.rmtree(self.directory)


def open_run_checkpoint(directory, resume: bool, method: str, wbits: int, abits: int, seed: int,
                        settings: Dict[str, Dict[str, Any]], teacher) -> Optional[RunCheckpoint]:
    """The run's RunCheckpoint (None without a directory), fingerprinted with the run's method, bits,
    seed, settings (as FullConfig.as_dict()) and teacher weights; an earlier run's directory needs
    ``resume``."""
    if directory is None:
        if resume:
            raise ValueError("resume=True needs the checkpoint_dir of the run to continue")
        return None
    settings = jsonable(settings)  # a copy: the keys below are dropped from it, not from the caller's
    every_steps = settings["pipeline"].get("checkpoint_every_steps", 100)
    every_seconds = settings["pipeline"].get("checkpoint_every_seconds", 300.0)
    for key in ("progress", "checkpoint_every_steps", "checkpoint_every_seconds"):  # do not change the result
        settings["pipeline"].pop(key, None)
    fingerprint = {"method": method, "wbits": int(wbits), "abits": int(abits), "seed": int(seed),
                   "settings": settings, "teacher_sha256": weights_digest(teacher)}
    ckpt = RunCheckpoint(directory, fingerprint, every_steps, every_seconds)
    earlier = ckpt.holds_a_run()
    barrier()  # every rank looked before any writes
    if earlier and not resume:
        raise FileExistsError(f"{ckpt.directory} holds the checkpoints of an earlier run; resume it (--resume, "
                              "resume=True, with its arguments) or choose another directory")
    return ckpt


class CheckpointSaver:
    """Writes a run's QAT state every N optimizer steps or T seconds, and at the end of each round
    (rank 0 only; nothing without a checkpoint)."""

    def __init__(self, ckpt: Optional[RunCheckpoint], every_steps: int, every_seconds: float, student, trainer):
        self.ckpt, self.student, self.trainer = ckpt, student, trainer
        self.schedule = SaveSchedule(every_steps, every_seconds)
        self.steps = 0
        self.round_index, self.calibrated_on, self.first_set_size = 0, None, None

    def maybe_save(self) -> None:
        self.steps += 1
        if self.schedule.due(self.steps):
            self.save(self.round_index)

    def save(self, round_index: int) -> None:
        """The state to resume at ``round_index`` (the current round mid-way, or the next one)."""
        if self.ckpt is None or not is_rank0():
            return
        self.ckpt.save({"round": round_index, "student": self.student.state_dict(),
                        "trainer": self.trainer.state_dict(), "calibrated_on": self.calibrated_on,
                        "first_set_size": self.first_set_size, "torch_rng": torch.get_rng_state()})
        self.schedule.saved()
