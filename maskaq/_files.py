"""File writing shared by every part that saves: atomic replacement, and rank 0 only under torchrun."""
import os
import tempfile
from pathlib import Path

import torch


def is_rank0() -> bool:
    """True outside torch.distributed and on its rank 0: only that process writes files."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` and move the result over ``path``, so a crash never leaves half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
