"""File writing shared by every part that saves: atomic replacement, rank 0 only under torchrun,
and checkpoint files that carry a checksum and the fingerprint of the run that wrote them."""
import hashlib
import io
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Optional

import torch


def is_rank0() -> bool:
    """True outside torch.distributed and on its rank 0: only that process writes files."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def atomic_write(path: Path, write) -> Path:
    """Call ``write(tmp_path)`` and move the result over ``path``, so a crash never leaves half a file.

    The temporary file is fsync'ed before the rename and the directory after it, so the new file
    survives a power loss too. The parent directory is created if needed. Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        # mkstemp makes the file 0600; a result file gets the mode any other tool would give it.
        os.chmod(tmp, 0o666 & ~_umask())
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync(path.parent)
    return path


def _umask() -> int:
    """The process umask (reading it means setting it, so it is set back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync(path) -> None:
    """Flush a file's or a directory's data to disk (best effort where the OS refuses a directory)."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if os.path.isdir(path) else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def _json_default(obj):
    import numpy as np

    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, tuple)):
        return list(obj)
    return repr(obj)


def write_json(path, obj, indent: int = 2) -> Path:
    """``obj`` as JSON (tensors, numpy scalars and paths converted), written atomically."""
    text = json.dumps(obj, indent=indent, default=_json_default) + "\n"
    return atomic_write_bytes(path, text.encode())


def save_tensors_and_json(directory, state: dict, meta: dict, weights_name: str, config_name: str, fmt: str) -> Path:
    """Write ``state`` (safetensors) and ``meta`` (JSON) into ``directory`` atomically, on rank 0 only."""
    from safetensors.torch import save_file

    directory = Path(directory)
    if not is_rank0():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / weights_name, lambda tmp: save_file(state, tmp, metadata={"format": fmt}))
    text = json.dumps(meta, indent=2) + "\n"
    atomic_write(directory / config_name, lambda tmp: Path(tmp).write_text(text))
    return directory


class CorruptCheckpointError(ValueError):
    """A checkpoint file that is truncated, damaged or not one of ours."""


class CheckpointMismatchError(ValueError):
    """A checkpoint written by a run with other settings than the one resuming from it."""


class SaveSchedule:
    """When a checkpoint is due: every ``every_steps`` steps, and at least every ``every_seconds``
    seconds since the last save (the QAT state and the synthesis batch in progress share it)."""

    def __init__(self, every_steps: int = 100, every_seconds: float = 300.0):
        self.every_steps = max(1, int(every_steps))
        self.every_seconds = float(every_seconds)
        self.last = time.monotonic()

    def due(self, step: int) -> bool:
        return step % self.every_steps == 0 or time.monotonic() - self.last >= self.every_seconds

    def saved(self) -> None:
        self.last = time.monotonic()


def save_checked(path, fingerprint: Dict, state: Dict[str, Any]) -> Path:
    """``state`` (torch.save) with the run's fingerprint, written atomically after a SHA-256 line."""
    buffer = io.BytesIO()
    torch.save({"fingerprint": fingerprint, "state": state}, buffer)
    payload = buffer.getvalue()
    return atomic_write_bytes(path, hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload)


def load_checked(path, fingerprint: Dict, remedy: str) -> Optional[Dict[str, Any]]:
    """The state save_checked wrote at ``path`` (None when there is no file). A damaged file is a
    CorruptCheckpointError that ends with ``remedy``; another run's, a CheckpointMismatchError."""
    path = Path(path)
    if not path.is_file():
        return None
    digest, _, payload = path.read_bytes().partition(b"\n")
    if hashlib.sha256(payload).hexdigest().encode() != digest:
        raise CorruptCheckpointError(f"checkpoint {path} fails its checksum (truncated or damaged); {remedy}")
    saved = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=False)
    check_fingerprint(path, saved.get("fingerprint", {}), fingerprint)
    return saved["state"]


def weights_digest(model) -> str:
    """SHA-256 of a model's state dict (names, dtypes, shapes and values): its identity in a checkpoint."""
    return tensors_digest({name: t.detach() for name, t in model.state_dict().items()})


def tensors_digest(tensors: Dict[str, torch.Tensor]) -> str:
    """SHA-256 of named tensors (names, dtypes, shapes and values), in the order of their names."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def jsonable(obj) -> Dict:
    """``obj`` as JSON would give it back (tuples as lists, tensors and paths converted): the form a
    fingerprint is compared in after a round trip through a checkpoint file."""
    return json.loads(json.dumps(obj, default=_json_default, sort_keys=True))


def check_fingerprint(path, theirs: Dict, ours: Dict) -> None:
    """Refuse a checkpoint ``path`` written by a run with another fingerprint, saying what differs."""
    if theirs != ours:
        raise CheckpointMismatchError(f"checkpoint {path} was written by a run with other settings "
                                      f"({_differences(theirs, ours)}); resume with the first run's "
                                      "arguments or use another directory")


def _differences(theirs: Dict, ours: Dict, prefix: str = "") -> str:
    keys = sorted(set(theirs) | set(ours))
    diffs = []
    for k in keys:
        a, b = theirs.get(k), ours.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            inner = _differences(a, b, f"{prefix}{k}.")
            if inner:
                diffs.append(inner)
        elif a != b:
            diffs.append(f"{prefix}{k}: {a!r} there, {b!r} now")
    return "; ".join(diffs)
