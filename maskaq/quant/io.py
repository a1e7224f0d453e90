"""Saving and loading a fake-quant student: weights in safetensors plus a JSON config.

    save_quantized(qmodel, "out/deit_s_w4a4")          # writes model.safetensors + quant_config.json
    qmodel = load_quantized("out/deit_s_w4a4", timm.create_model("deit_small_patch16_224"))
    qmodel = load_quantized("out/deit_s_w4a4")          # the architecture from the saved record

The JSON holds wbits, abits, the conversion options, a fingerprint of the architecture (the
model class and every state-dict name with its shape) and how to build the architecture again
(``model_source``: the zoo or timm name and its options, and the input's data config), so the
folder alone is enough to load it. Loading rebuilds the student from the given
full-precision model with the saved options and refuses, with a ValueError saying what differs,
a checkpoint made for another architecture. Files are written atomically (temporary file, then
os.replace) and, under torch.distributed, by rank 0 only.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional, Union

from torch import nn

from maskaq._files import save_tensors_and_json

from maskaq.quant.convert import is_quantized, quant_config, quantize_model

__all__ = ["save_quantized", "load_quantized", "model_source", "model_from_source", "student_directory",
           "is_student", "WEIGHTS_NAME", "CONFIG_NAME"]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "quant_config.json"
FORMAT = "maskaq.quantized"
FORMAT_VERSION = 1


def _class_name(model: nn.Module) -> str:
    cls = type(model)
    return f"{cls.__module__}.{cls.__qualname__}"


def _shapes(state: dict) -> dict[str, list[int]]:
    return {name: list(t.shape) for name, t in state.items()}


def _fingerprint(class_name: str, shapes: dict[str, list[int]]) -> str:
    text = json.dumps([class_name, sorted(shapes.items())], separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


# Keys of a model's pretrained_cfg that decide how its input images are prepared.
_DATA_CONFIG_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


def model_source(model: nn.Module) -> Optional[dict]:
    """How to build ``model``'s architecture again: {"name", "kwargs", "data_config"}, or None.

    The name and options come from ``model.maskaq_source`` where whoever built the model recorded
    them (the command line does), else from its pretrained_cfg: the architecture name, with the
    head size and input size of a timm model (a bundled zoo model takes no options)."""
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    recorded = getattr(model, "maskaq_source", None)
    data_config = {k: list(cfg[k]) if isinstance(cfg[k], tuple) else cfg[k] for k in _DATA_CONFIG_KEYS if cfg.get(k) is not None}
    if recorded:
        return {"name": recorded["name"], "kwargs": dict(recorded.get("kwargs") or {}), "data_config": data_config}
    name = cfg.get("architecture")
    if not name:
        return None
    from maskaq import zoo

    kwargs = {}
    if name not in zoo.available():
        size = cfg.get("input_size")
        if getattr(model, "num_classes", None) is not None:
            kwargs["num_classes"] = int(model.num_classes)
        if size is not None and len(size) == 3:
            kwargs.update(in_chans=int(size[0]), img_size=[int(size[1]), int(size[2])])
    return {"name": name, "kwargs": kwargs, "data_config": data_config}


def model_from_source(source: Optional[dict], where) -> nn.Module:
    """The full-precision architecture a saved model records (``model_source``), random weights."""
    if not source or not source.get("name"):
        raise ValueError(f"{where} does not record which model it was made from (written by an older maskaq); "
                         "pass the full-precision model it was saved from")
    from maskaq import zoo

    kwargs = dict(source.get("kwargs") or {})
    try:
        model = zoo.create(source["name"], **kwargs)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{where} records model {source['name']!r}, which cannot be built here: "
                         f"{str(exc).splitlines()[0]}") from None
    model.maskaq_source = {"name": source["name"], "kwargs": kwargs}  # what it is made from is saved again
    return model


def student_directory(path: Union[str, os.PathLike]) -> Path:
    """The student folder ``path`` names: the folder itself, the folder of its model.safetensors or
    quant_config.json, or the model/ folder inside a `maskaq quantize --out` directory."""
    path = Path(path)
    if path.is_file() and path.name in (WEIGHTS_NAME, CONFIG_NAME):
        return path.parent
    if path.is_dir() and not (path / CONFIG_NAME).is_file() and (path / "model" / CONFIG_NAME).is_file():
        return path / "model"
    return path


def is_student(path: Union[str, os.PathLike]) -> bool:
    """True when ``path`` names a student saved by save_quantized (see student_directory)."""
    return (student_directory(path) / CONFIG_NAME).is_file()


def save_quantized(qmodel: nn.Module, directory: Union[str, os.PathLike]) -> Path:
    """Write ``qmodel`` (made by quantize_model, calibrated) to ``directory``; returns the directory."""

    config = quant_config(qmodel)
    state = {name: t.detach().cpu().contiguous() for name, t in qmodel.state_dict().items()}
    shapes = _shapes(state)
    class_name = _class_name(qmodel)
    pretrained = getattr(qmodel, "pretrained_cfg", None) or {}
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "wbits": config["wbits"],
        "abits": config["abits"],
        "options": {"first_last_8bit": config["first_last_8bit"], "weight_method": config["weight_method"]},
        "architecture": {
            "class": class_name,
            "timm_name": pretrained.get("architecture"),
            "fingerprint": _fingerprint(class_name, shapes),
            "num_tensors": len(shapes),
        },
        "model": model_source(qmodel),
    }
    return save_tensors_and_json(directory, state, meta, WEIGHTS_NAME, CONFIG_NAME, FORMAT)


def _read_config(directory: Path) -> dict:
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: load_quantized needs a directory written by save_quantized")
    try:
        meta = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config_path} is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{config_path} is not a maskaq quantized-model config (format != {FORMAT!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{config_path} has format_version {meta.get('format_version')}; "
                         f"this maskaq reads version {FORMAT_VERSION}")
    return meta


def _describe_mismatch(saved: dict[str, list[int]], wanted: dict[str, list[int]]) -> str:
    missing = sorted(set(wanted) - set(saved))
    unexpected = sorted(set(saved) - set(wanted))
    reshaped = [n for n in sorted(set(saved) & set(wanted)) if saved[n] != wanted[n]]
    parts = []
    if reshaped:
        n = reshaped[0]
        parts.append(f"{len(reshaped)} tensors differ in shape (e.g. {n}: checkpoint {tuple(saved[n])} vs "
                     f"model {tuple(wanted[n])})")
    if missing:
        parts.append(f"{len(missing)} tensors of the model are not in the checkpoint (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} checkpoint tensors have no place in the model (e.g. {unexpected[0]})")
    return "; ".join(parts)


def load_quantized(directory: Union[str, os.PathLike], model: Optional[nn.Module] = None) -> nn.Module:
    """Rebuild a saved student on ``model``'s architecture and load its weights.

    ``directory``: the folder save_quantized wrote, its model.safetensors, or the `maskaq quantize
    --out` directory holding it in model/. ``model``: the full-precision model of the same
    architecture (e.g. the teacher or timm.create_model(name)); it is left untouched and a new
    quantized model is returned. A model already converted with the same bits and options is
    filled in place and returned. Without ``model`` the architecture the folder records is built
    (every weight of a student is in its file, so none are needed from elsewhere).
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    directory = student_directory(directory)
    meta = _read_config(directory)
    if model is None:
        model = model_from_source(meta.get("model"), directory)
    options = meta.get("options", {})
    saved_class = meta["architecture"]["class"]
    if is_quantized(model):
        have = quant_config(model)
        want = {"wbits": meta["wbits"], "abits": meta["abits"], **options}
        if have != want:
            raise ValueError(f"the given quantized model has config {have} but the checkpoint was saved "
                             f"with {want}; pass the full-precision model instead")
        qmodel = model
    else:
        qmodel = quantize_model(model, meta["wbits"], meta["abits"], **options)
    wanted = _shapes(qmodel.state_dict())
    class_name = _class_name(qmodel)
    if _fingerprint(class_name, wanted) != meta["architecture"]["fingerprint"]:
        with safe_open(str(directory / WEIGHTS_NAME), framework="pt") as f:
            saved = {name: list(f.get_slice(name).get_shape()) for name in f.keys()}
        detail = _describe_mismatch(saved, wanted)
        if class_name != saved_class:
            detail = f"checkpoint is a {saved_class}, model is a {class_name}" + (f"; {detail}" if detail else "")
        raise ValueError(
            f"checkpoint {directory} does not match this model's architecture "
            f"(saved from {meta['architecture'].get('timm_name') or saved_class}): {detail or 'fingerprint differs'}. "
            "Pass the same architecture (model name, image size, patch size, num_classes) it was saved from."
        )
    device = next(qmodel.parameters()).device
    state = load_file(str(directory / WEIGHTS_NAME), device=str(device))
    qmodel.load_state_dict(state, strict=True)
    return qmodel
