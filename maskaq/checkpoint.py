"""Checkpoints of a quantization run (maskaq.pipeline), so that a killed run resumes where it stopped.

A run's directory holds:
  state.pt             the QAT state (student, optimizer, schedule, counters, RNG), rewritten every
                       few steps and minutes: a SHA-256 line, then the torch.save payload;
  sets/batch_0000R     the images of round R once made (not for endless noise streams, which are
                       redrawn from their seed);
  round_R/batch_0000B  the finished synthesis batches of round R while it is made.
Every file is written atomically (temp file, fsync, rename) and carries the run's fingerprint:
the method, bits, seed, settings and the teacher's weights digest. Resuming with other settings
or another model is refused with a message that says what differs (CheckpointMismatchError), a
damaged file is named (CorruptCheckpointError).
"""
from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from maskaq._files import _json_default, atomic_write_bytes, is_rank0
from maskaq.synthesis.io import BatchStore, CheckpointMismatchError, CorruptCheckpointError, _differences

__all__ = ["RunCheckpoint", "CheckpointMismatchError", "CorruptCheckpointError"]


class RunCheckpoint:
    def __init__(self, directory, fingerprint: Dict[str, Any]):
        self.directory = Path(directory)
        self.fingerprint = json.loads(json.dumps(fingerprint, default=_json_default, sort_keys=True))
        self._sets = BatchStore(self.directory / "sets", self.fingerprint)

    @property
    def state_path(self) -> Path:
        return self.directory / "state.pt"

    def holds_a_run(self) -> bool:
        """True when the directory has anything of an earlier run in it."""
        return self.directory.is_dir() and any(self.directory.iterdir())

    def batch_store(self, round_index: int) -> BatchStore:
        """Where round ``round_index``'s synthesis keeps its finished batches."""
        return BatchStore(self.directory / f"round_{int(round_index)}", self.fingerprint)

    def save_round_images(self, round_index: int, images) -> None:
        """Rank 0 writes (every rank holds the gathered set)."""
        if not is_rank0():
            return
        if images.draw is None:  # an endless stream is redrawn from its seed instead
            self._sets.save(round_index, images.images, images.labels, {"report": images.report})
        self.batch_store(round_index).remove()  # the whole set replaces its batches

    def round_images(self, round_index: int):
        """The SyntheticSet of round ``round_index`` made before the run stopped, or None."""
        from maskaq.synthesis.synthesizer import SyntheticSet
        done = self._sets.load(round_index)
        if done is None or done[0] is None:
            return None
        images, labels, info = done
        return SyntheticSet(images, labels, info.get("report", {}))

    def save(self, state: Dict[str, Any]) -> None:
        buffer = io.BytesIO()
        torch.save({"fingerprint": self.fingerprint, "state": state}, buffer)
        payload = buffer.getvalue()
        atomic_write_bytes(self.state_path, hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload)

    def load(self) -> Optional[Dict[str, Any]]:
        """The last saved state, or None when no QAT state was saved yet (the run stopped in its
        first synthesis; its batches are picked up from batch_store)."""
        path = self.state_path
        if not path.is_file():
            return None
        data = path.read_bytes()
        digest, _, payload = data.partition(b"\n")
        if hashlib.sha256(payload).hexdigest().encode() != digest:
            raise CorruptCheckpointError(f"checkpoint {path} fails its checksum (truncated or damaged); "
                                         "delete it to restart from the last finished synthesis")
        saved = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=False)
        if saved.get("fingerprint") != self.fingerprint:
            raise CheckpointMismatchError(f"checkpoint {path} was written by a run with other settings "
                                          f"({_differences(saved.get('fingerprint', {}), self.fingerprint)}); "
                                          "resume with the first run's arguments or use another directory")
        return saved["state"]

    def remove(self) -> None:
        """Delete the checkpoints (the run finished and its results are written); rank 0 only."""
        if is_rank0() and self.directory.is_dir():
            shutil.rmtree(self.directory)
