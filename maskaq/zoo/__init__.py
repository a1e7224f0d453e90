"""Model zoo: the bundled Fashion-MNIST teacher, and timm models from local checkpoints.

Nothing here downloads: `load("vit_fmnist")` reads the weights shipped in this directory and
`create(timm_name, checkpoint=path)` builds a timm architecture with pretrained=False and loads a
local .pth/.pt/.bin/.safetensors file. A bundled model may also be derived from another by a
function-preserving transform (NAME.json with ``derived_from``, no weights of its own):
``vit_fmnist_outliers`` is the bundled teacher with a pretrained ViT's channel outliers
(maskaq.zoo.outliers).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from maskaq.zoo.outliers import activation_statistics, add_channel_outliers

__all__ = ["ZOO_DIR", "available", "load", "weights_file", "create", "load_state_dict", "load_checkpoint",
           "add_channel_outliers", "activation_statistics"]

ZOO_DIR = Path(__file__).resolve().parent


def _derived_from(config_path: Path) -> Optional[str]:
    """The base model a zoo .json derives its model from, or None for a model with its own weights."""
    try:
        return json.loads(config_path.read_text()).get("derived_from")
    except (OSError, ValueError):
        return None


def available() -> list:
    """Names of the bundled models (those whose .json and .safetensors both ship, and those derived
    from one of them)."""
    own = {p.stem for p in ZOO_DIR.glob("*.json") if p.with_suffix(".safetensors").is_file()}
    derived = {p.stem for p in ZOO_DIR.glob("*.json") if p.stem not in own and _derived_from(p) in own}
    return sorted(own | derived)


def weights_file(name: str, directory=None) -> Path:
    """The weights of zoo model ``name``: NAME.safetensors in ``directory`` (default: the bundled zoo)."""
    return (ZOO_DIR if directory is None else Path(directory)) / f"{name}.safetensors"


def _read_config(name: str, directory: Path = ZOO_DIR) -> dict:
    config_path = Path(directory) / f"{name}.json"
    if Path(directory) == ZOO_DIR and name in available() and not config_path.with_suffix(".safetensors").is_file():
        return json.loads(config_path.read_text())  # derived from another bundled model
    if not config_path.is_file() or not config_path.with_suffix(".safetensors").is_file():
        if Path(directory) != ZOO_DIR:
            raise ValueError(f"no model {name!r} in {directory}: it needs {name}.json and {name}.safetensors "
                             "(what `maskaq train-teacher --export DIR --export-name NAME` writes)")
        known = ", ".join(available()) or "none (the checkpoint has not been trained/exported yet)"
        raise ValueError(f"unknown zoo model {name!r}; bundled models: {known}. For timm architectures "
                         "use maskaq.zoo.create(timm_name, checkpoint=path)")
    return json.loads(config_path.read_text())


def _set_pretrained_cfg(model: torch.nn.Module, cfg: dict) -> None:
    # timm convention: both attributes point at the same dict.
    model.pretrained_cfg = cfg
    model.default_cfg = cfg


def load(name: str = "vit_fmnist", device=None, directory=None) -> torch.nn.Module:
    """A bundled model: FP32, eval mode, `pretrained_cfg` with mean, std, input_size, num_classes.

    It expects input normalized with pretrained_cfg['mean'] / ['std'] (what maskaq.data gives).
    ``directory`` reads NAME.json + NAME.safetensors from elsewhere (a `train-teacher --export`).
    """
    from safetensors.torch import load_file
    from timm.models.vision_transformer import VisionTransformer

    directory = ZOO_DIR if directory is None else Path(directory)
    config = _read_config(name, directory)
    if config.get("derived_from"):
        model = add_channel_outliers(load(config["derived_from"]), inplace=True, **config["channel_outliers"])
        cfg = dict(model.pretrained_cfg)
        cfg.update(config.get("pretrained_cfg", {}), architecture=name)
        _set_pretrained_cfg(model, cfg)
        return model.to(device) if device is not None else model
    model = VisionTransformer(**config["model_args"])
    state = load_file(str(weights_file(name, directory)))
    _load_strict(model, state, f"{name}.safetensors")
    cfg = dict(config["pretrained_cfg"])
    cfg.setdefault("architecture", name)
    _set_pretrained_cfg(model, cfg)
    model.float().eval()
    return model.to(device) if device is not None else model


def load_checkpoint(path) -> dict:
    """Read a state dict from .safetensors or a torch file; unwraps {'model'|'state_dict'|...: sd}
    and strips DDP/compile prefixes ('module.', '_orig_mod.')."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # not a torch file, or pickled objects beyond tensors
            raise ValueError(f"could not read checkpoint {path} as a torch state dict "
                             f"(weights_only load): {exc}") from exc
    for key in ("model", "state_dict", "model_state_dict", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"checkpoint {path} does not hold a state dict of tensors "
                         "(nor one under 'model' or 'state_dict')")
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _load_strict(model: torch.nn.Module, state: dict, source: str) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                         for k in set(own) & set(state) if state[k].shape != own[k].shape)
    if missing or unexpected or wrong_shape:
        def few(items):
            return ", ".join(items[:5]) + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")
        parts = [f"missing keys: {few(missing)}" if missing else "",
                 f"unexpected keys: {few(unexpected)}" if unexpected else "",
                 f"shape mismatches: {few(wrong_shape)}" if wrong_shape else ""]
        raise ValueError(f"checkpoint {source} does not match the model architecture; "
                         + "; ".join(p for p in parts if p)
                         + ". Pass the model options the checkpoint was trained with (e.g. num_classes, img_size).")
    model.load_state_dict(state, strict=True)


def load_state_dict(model: torch.nn.Module, checkpoint) -> torch.nn.Module:
    """Load a local checkpoint into `model`, refusing any missing/unexpected/mis-shaped key."""
    _load_strict(model, load_checkpoint(checkpoint), str(checkpoint))
    return model


class PretrainedUnavailable(OSError):
    """timm could not load the pretrained weights (no network, no hub cache, no such weights)."""


def _pretrained_timm_model(name: str, pretrained_file: Optional[str], kwargs: dict) -> torch.nn.Module:
    import timm

    overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {})
    if pretrained_file is not None:
        if not Path(pretrained_file).is_file():
            raise FileNotFoundError(f"pretrained file {pretrained_file} does not exist")
        overlay["file"] = str(pretrained_file)
        if not str(pretrained_file).endswith(".npz"):
            # timm 1.0.29 hands a local file of a model it converts from JAX to that model's
            # npz loader whatever the file is; any other file is a state dict
            overlay.setdefault("custom_load", False)
    try:
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay or None, **kwargs)
    except (OSError, RuntimeError, ValueError) as exc:  # hub errors are OSErrors; timm raises RuntimeError
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise PretrainedUnavailable(
            f"cannot load timm's pretrained weights for {name} ({reason}); without network, fill the hub cache "
            "elsewhere and set HF_HUB_OFFLINE=1, or pass a local file: --pretrained-file FILE "
            "(timm's pretrained_cfg_overlay=dict(file=FILE)) or --checkpoint FILE") from exc


def create(name: str, checkpoint: Optional[str] = None, device=None, pretrained: bool = False,
           pretrained_file: Optional[str] = None, **kwargs) -> torch.nn.Module:
    """A bundled zoo model by name, or a timm architecture with optional weights. Extra kwargs go
    to timm.create_model (e.g. num_classes=10, img_size=32).

    Weights of a timm architecture: random (default), a local ``checkpoint``, or timm's pretrained
    weights (``pretrained=True``: loaded by timm itself, so the hub cache, ``HF_HUB_OFFLINE`` and
    ``pretrained_cfg_overlay`` work as in ``timm.create_model``; ``pretrained_file`` is
    ``pretrained_cfg_overlay=dict(file=...)``). Raises PretrainedUnavailable (an OSError) when timm
    cannot get them. A bundled model is pretrained already.

    Returns the model in eval mode with `pretrained_cfg` describing its input (input_size follows
    img_size/in_chans overrides; num_classes follows the model).
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty string, got {name!r}")
    if pretrained_file is not None:
        pretrained = True
    if pretrained and checkpoint is not None:
        raise ValueError("pass pretrained weights or a checkpoint, not both")
    if name in available():
        if kwargs:
            raise ValueError(f"zoo model {name!r} has a fixed architecture; unexpected options {sorted(kwargs)}")
        model = load(name)
        if checkpoint is not None:
            load_state_dict(model, checkpoint)
        return model.to(device) if device is not None else model

    import timm
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('.')[0][:12]}*")[:8]
        hint = f" Similar timm names: {', '.join(close)}." if close else ""
        raise ValueError(f"unknown model {name!r}: neither a bundled zoo model ({', '.join(available()) or 'none'}) "
                         f"nor a timm architecture.{hint}")
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")
    if pretrained:
        model = _pretrained_timm_model(name, pretrained_file, dict(kwargs))
    else:
        model = timm.create_model(name, pretrained=False, **kwargs)
    if checkpoint is not None:
        load_state_dict(model, checkpoint)
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    cfg["architecture"] = cfg.get("architecture", name)
    cfg["num_classes"] = getattr(model, "num_classes", cfg.get("num_classes"))
    cfg["input_size"] = _input_size_of(model, cfg.get("input_size", (3, 224, 224)))
    in_chans = cfg["input_size"][0]
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    for key, default in (("mean", IMAGENET_DEFAULT_MEAN), ("std", IMAGENET_DEFAULT_STD)):
        values = tuple(cfg.get(key, default))
        if len(values) != in_chans:  # e.g. in_chans=1 on an RGB default: average the channels
            values = (sum(values) / len(values),) * in_chans
        cfg[key] = values
    _set_pretrained_cfg(model, cfg)
    model.float().eval()
    return model.to(device) if device is not None else model


def _input_size_of(model: torch.nn.Module, fallback) -> tuple:
    """(C, H, W) the model was built for, following img_size/in_chans overrides."""
    patch_embed = getattr(model, "patch_embed", None)
    img_size = getattr(patch_embed, "img_size", None)
    proj = getattr(patch_embed, "proj", None)
    in_chans = getattr(proj, "in_channels", None) or fallback[0]
    if img_size is None:
        return tuple(fallback)
    if isinstance(img_size, int):
        img_size = (img_size, img_size)
    return (int(in_chans), int(img_size[0]), int(img_size[1]))
