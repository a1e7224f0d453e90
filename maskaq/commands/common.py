"""What the `maskaq` subcommands share: model and weight options, loading a model or a dataset
named on the command line, devices, bit widths and `--set` overrides, with one-line errors."""
from __future__ import annotations

import argparse
import ast
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from torch import nn

from maskaq import methods
from maskaq.cli import CliError
from maskaq.config import config_keys

__all__ = ["add_model_arguments", "add_weight_arguments", "check_bits_cli", "collect_overrides", "dataset_for_cli",
           "load_model_for_cli", "method_and_overrides", "parse_override", "resolve_device",
           "in_process_group"]


def _cli_error(msg: str) -> CliError:
    return CliError(msg)


def in_process_group(body, args) -> int:
    """``body(args)``, under torchrun (WORLD_SIZE > 1 in the environment) inside one process group
    that every process joins first and leaves after."""
    from maskaq.runtime import end_distributed, init_distributed
    created = init_distributed()
    try:
        return body(args)
    finally:
        end_distributed(created)


def parse_override(text: str):
    """KEY=VALUE with VALUE a Python literal (numbers, True/False, tuples), true/false/none in any
    case, or a bare string."""
    if "=" not in text:
        raise _cli_error(f"--set expects KEY=VALUE, got {text!r}")
    key, raw = text.split("=", 1)
    key = key.strip().replace("-", "_")
    words = {"true": True, "false": False, "none": None}
    if raw.strip().lower() in words:  # a bare "false" would otherwise be the (truthy) string
        return key, words[raw.strip().lower()]
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    return key, value


def add_weight_arguments(parser: argparse.ArgumentParser) -> None:
    """--checkpoint, --pretrained and --pretrained-file: where a timm model's weights come from."""
    parser.add_argument("--checkpoint", default=None, help="local weights for --model (.safetensors/.pth)")
    parser.add_argument("--pretrained", action="store_true",
                        help="timm's pretrained weights for a timm --model, loaded by timm (hub cache, "
                             "HF_HUB_OFFLINE and HF_HOME work as in timm.create_model)")
    parser.add_argument("--pretrained-file", default=None, metavar="FILE",
                        help="timm's pretrained weights from a local file (timm's "
                             "pretrained_cfg_overlay=dict(file=FILE); implies --pretrained)")


def add_model_arguments(parser: argparse.ArgumentParser, *, device: bool = True,
                        model_help: str = "bundled zoo model (vit_fmnist) or a timm architecture name") -> None:
    """--model, its weights (add_weight_arguments), --model-kwargs and (with ``device``) --device."""
    parser.add_argument("--model", required=True, help=model_help)
    add_weight_arguments(parser)
    parser.add_argument("--model-kwargs", default=None, metavar="JSON",
                        help='timm.create_model options for a timm --model, e.g. \'{"num_classes": 10}\'')
    if device:
        parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (none given: cuda when available)")


def resolve_device(name: Optional[str]) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise _cli_error(f"bad --device {name!r}: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise _cli_error(f"--device {name} asked for CUDA but no CUDA device is available")
    return dev


def load_model_for_cli(name: str, checkpoint: Optional[str], device: torch.device,
                       model_kwargs: Optional[str] = None, pretrained: bool = False,
                       pretrained_file: Optional[str] = None) -> nn.Module:
    import json

    from maskaq import zoo
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise _cli_error(f"checkpoint {checkpoint} does not exist")
    kwargs = {}
    if model_kwargs:
        try:
            kwargs = json.loads(model_kwargs)
        except json.JSONDecodeError as exc:
            raise _cli_error(f"--model-kwargs is not valid JSON: {exc}") from None
        if not isinstance(kwargs, dict):
            raise _cli_error("--model-kwargs must be a JSON object, e.g. '{\"num_classes\": 10}'")
    try:
        model = zoo.create(name, checkpoint=checkpoint, pretrained=pretrained, pretrained_file=pretrained_file,
                           **kwargs)
    except (ValueError, OSError, TypeError) as exc:  # OSError: missing files, zoo.PretrainedUnavailable
        raise _cli_error(str(exc).splitlines()[0]) from None
    return model.to(device).eval()


def dataset_for_cli(path: Optional[str], model: nn.Module, split: str = "test"):
    """'fashion-mnist' (or 'fmnist') -> the Fashion-MNIST split; else an ImageFolder directory."""
    if path is None:
        return None
    if path.lower() in ("fashion-mnist", "fashion_mnist", "fmnist"):
        from maskaq.data import fashion_mnist
        try:
            return fashion_mnist(split)
        except (FileNotFoundError, ValueError) as exc:
            raise _cli_error(str(exc).splitlines()[0]) from None
    if not Path(path).is_dir():
        raise _cli_error(f"dataset directory {path} does not exist (or pass 'fashion-mnist')")
    from maskaq.data import image_folder
    try:
        return image_folder(path, model)  # timm's eval transform for the model's pretrained_cfg
    except (FileNotFoundError, ValueError) as exc:
        raise _cli_error(str(exc).splitlines()[0]) from None


def check_bits_cli(wbits: int, abits: int) -> None:
    for name, bits in (("--wbits", wbits), ("--abits", abits)):
        if not 2 <= bits <= 8:
            raise _cli_error(f"{name} must be between 2 and 8, got {bits}")


def collect_overrides(items) -> Dict[str, Any]:
    overrides = dict(parse_override(text) for text in items)
    keys = config_keys()
    for k in overrides:
        if k not in keys or k == "real_data":
            raise _cli_error(f"unknown setting {k!r} in --set{methods.did_you_mean(k, keys)}; "
                             "see maskaq.config.config_keys()")
    return overrides


def method_and_overrides(args, *, synthesizes: bool = False):
    """(method record, --set overrides) of a run after checking --method, --preset and the bits."""
    from maskaq.config import PRESETS

    try:
        record = methods.get(args.method, synthesizes=synthesizes)
    except ValueError as exc:
        raise _cli_error(str(exc)) from None
    if args.preset not in PRESETS:
        raise _cli_error(f"unknown preset {args.preset!r}; choose one of {', '.join(PRESETS)}")
    check_bits_cli(args.wbits, args.abits)
    return record, collect_overrides(args.set)
