"""Synthetic sets on disk (safetensors, atomically, rank 0 only) and the per-batch checkpoints a
synthesis run resumes from (BatchStore)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch

from maskaq._files import (CorruptCheckpointError, SaveSchedule, _json_default, atomic_write_bytes, check_fingerprint,
                           jsonable, load_checked, save_checked, tensors_digest)
from maskaq.images import SyntheticSet

__all__ = ["save_synthetic_set", "load_synthetic_set", "BatchStore", "BatchProgress"]


def save_synthetic_set(synthetic, path, metadata: Optional[Dict] = None) -> Path:
    """images + labels as safetensors (metadata: string values)."""
    from safetensors.torch import save
    meta = {k: json.dumps(v, default=_json_default) for k, v in (metadata or {}).items()}
    data = save({"images": synthetic.images.contiguous().cpu(), "labels": synthetic.labels.contiguous().cpu()},
                metadata=meta)
    return atomic_write_bytes(path, data)


def load_synthetic_set(path):
    from safetensors.torch import load_file
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"synthetic set {path} does not exist")
    tensors = load_file(str(path))
    return SyntheticSet(tensors["images"], tensors["labels"], {})


class BatchStore:
    """The batches of a synthesis run, so that a killed run resumes where it stopped.

    ``directory/batch_00007.safetensors`` holds finished batch 7's images and labels, its info
    (seed, attempts, losses) and the run's ``fingerprint`` (a JSON-able dict of everything that
    makes the images: model, method, seed, settings), written atomically with a SHA-256 of the
    tensors. ``directory/batch_00007.partial.pt`` holds the batch while it is optimized (images,
    optimizer, schedule, step, generator), rewritten every ``every_steps`` steps and at least every
    ``every_seconds`` seconds (BatchProgress), and removed once the batch is finished. A file whose
    checksum fails is a CorruptCheckpointError naming it; a file of another run (other fingerprint)
    is a CheckpointMismatchError saying which settings differ. Nothing is ever overwritten with a
    different batch.
    """

    def __init__(self, directory, fingerprint: Dict, every_steps: int = 100, every_seconds: float = 300.0):
        self.directory = Path(directory)
        self.fingerprint = jsonable(fingerprint)
        self.every_steps, self.every_seconds = every_steps, every_seconds  # each batch's SaveSchedule

    def path(self, batch_index: int) -> Path:
        return self.directory / f"batch_{int(batch_index):05d}.safetensors"

    def progress_path(self, batch_index: int) -> Path:
        return self.directory / f"batch_{int(batch_index):05d}.partial.pt"

    def remove(self) -> None:
        """Delete the batch files and the directory (once the run's results are written)."""
        for index in self.finished():
            self.path(index).unlink(missing_ok=True)
        for index in self.in_progress():
            self.progress_path(index).unlink(missing_ok=True)
        if self.directory.is_dir() and not any(self.directory.iterdir()):
            self.directory.rmdir()

    def finished(self) -> list:
        """Indices of the batches on disk (not yet verified)."""
        if not self.directory.is_dir():
            return []
        return sorted(int(p.stem.split("_")[1]) for p in self.directory.glob("batch_*.safetensors"))

    def in_progress(self) -> list:
        """Indices of the batches with a state in progress on disk."""
        if not self.directory.is_dir():
            return []
        return sorted(int(p.name.split("_")[1].split(".")[0]) for p in self.directory.glob("batch_*.partial.pt"))

    def save(self, batch_index: int, images, labels, info: Dict) -> Path:
        """A finished batch; its state in progress is no longer needed."""
        from safetensors.torch import save
        tensors = {"images": _cpu_or_empty(images), "labels": _cpu_or_empty(labels, torch.long)}
        meta = {"fingerprint": json.dumps(self.fingerprint, sort_keys=True),
                "info": json.dumps(info, default=_json_default), "sha256": tensors_digest(tensors)}
        path = atomic_write_bytes(self.path(batch_index), save(tensors, metadata=meta))
        self.progress_path(batch_index).unlink(missing_ok=True)
        return path

    def load(self, batch_index: int):
        """(images, labels, info) of a finished batch, or None when it is not on disk. Failed
        batches (every retry non-finite) come back with images and labels None."""
        from safetensors import safe_open
        path = self.path(batch_index)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # safetensors raises its own types for a truncated header or body
            raise CorruptCheckpointError(f"checkpoint {path} is damaged ({exc}); delete it to redo that "
                                         "batch") from None
        if meta.get("sha256") != tensors_digest(tensors):
            raise CorruptCheckpointError(f"checkpoint {path} fails its checksum; delete it to redo that batch")
        check_fingerprint(path, json.loads(meta.get("fingerprint", "{}")), self.fingerprint)
        info = json.loads(meta.get("info", "{}"))
        if info.get("failed"):
            return None, None, info
        return tensors["images"], tensors["labels"], info

    def progress(self, batch_index: int) -> "BatchProgress":
        """Batch ``batch_index`` in progress: what an earlier run saved of it, and saving it now."""
        return BatchProgress(self, batch_index)


class BatchProgress:
    """One batch while it is optimized: the state an earlier run saved of it (``saved``, or None), and
    ``save(step, state)`` that writes the state every ``every_steps`` steps or ``every_seconds``.

    The synthesizer sets ``attempt`` and ``nan_retries`` (NaN recovery re-seeds a batch) before
    each attempt; a saved state resumes only the attempt that wrote it."""

    def __init__(self, store: BatchStore, batch_index: int):
        self.store, self.batch_index = store, int(batch_index)
        self.saved = load_checked(store.progress_path(batch_index), store.fingerprint,
                                  "delete it to redo that batch from its start")
        self.attempt = self.saved["attempt"] if self.saved is not None else 0
        self.nan_retries = self.saved["nan_retries"] if self.saved is not None else 0
        self._schedule = SaveSchedule(store.every_steps, store.every_seconds)

    def resume_state(self, attempt: int) -> Optional[Dict[str, Any]]:
        saved = self.saved
        return saved if saved is not None and saved["attempt"] == attempt else None

    def save(self, step: int, state: Callable[[], Dict[str, Any]]) -> bool:
        """Write ``state()`` (the batch about to run step ``step``) when it is due; True if written."""
        if not self._schedule.due(step):
            return False
        payload = dict(state(), step=int(step), attempt=self.attempt, nan_retries=self.nan_retries)
        save_checked(self.store.progress_path(self.batch_index), self.store.fingerprint, payload)
        self._schedule.saved()
        return True


def _cpu_or_empty(t, dtype=torch.float32):
    return torch.empty(0, dtype=dtype) if t is None else t.detach().contiguous().cpu()
