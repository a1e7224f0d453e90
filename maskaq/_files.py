"""File writing shared by every part that saves: atomic replacement, and rank 0 only under torchrun."""
import os
import tempfile
from pathlib import Path

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
    import json

    text = json.dumps(obj, indent=indent, default=_json_default) + "\n"
    return atomic_write_bytes(path, text.encode())


def save_tensors_and_json(directory, state: dict, meta: dict, weights_name: str, config_name: str, fmt: str) -> Path:
    """Write ``state`` (safetensors) and ``meta`` (JSON) into ``directory`` atomically, on rank 0 only."""
    import json

    from safetensors.torch import save_file

    directory = Path(directory)
    if not is_rank0():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / weights_name, lambda tmp: save_file(state, tmp, metadata={"format": fmt}))
    text = json.dumps(meta, indent=2) + "\n"
    atomic_write(directory / config_name, lambda tmp: Path(tmp).write_text(text))
    return directory
