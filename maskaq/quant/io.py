"""Saving and loading a fake-quant student: weights in safetensors plus a JSON config.

    save_quantized(qmodel, "out/deit_s_w4a4")          # writes model.safetensors + quant_config.json
    qmodel = load_quantized("out/deit_s_w4a4", timm.create_model("deit_small_patch16_224"))

The JSON holds wbits, abits, the conversion options and a fingerprint of the architecture (the
model class and every state-dict name with its shape). Loading rebuilds the student from the given
full-precision model with the saved options and refuses, with a ValueError saying what differs,
a checkpoint made for another architecture. Files are written atomically (temporary file, then
os.replace) and, under torch.distributed, by rank 0 only.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Union

from torch import nn

from maskaq._files import save_tensors_and_json

from maskaq.quant.convert import is_quantized, quant_config, quantize_model

__all__ = ["save_quantized", "load_quantized", "WEIGHTS_NAME", "CONFIG_NAME"]

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


def load_quantized(directory: Union[str, os.PathLike], model: nn.Module) -> nn.Module:
    """Rebuild a saved student on ``model``'s architecture and load its weights.

    ``model``: the full-precision model of the same architecture (e.g. the teacher or
    timm.create_model(name)); it is left untouched and a new quantized model is returned. A model
    already converted with the same bits and options is filled in place and returned.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    directory = Path(directory)
    meta = _read_config(directory)
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
