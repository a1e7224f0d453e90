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
