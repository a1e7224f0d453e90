"""What the `maskaq` subcommands share: model and weight options, loading a model or a dataset
named on the command line (its images and classes checked before any work), output folders,
devices, bit widths and `--set` overrides, with one-line errors.

The options mean the same in every subcommand: --model (what to run), --checkpoint (its
weights), --data (images to evaluate on), --limit (how many of them), --device (cuda when
available), --eval-batch-size / --synth-batch-size, --out, --overwrite and --resume."""
from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from torch import nn

from maskaq import methods
from maskaq.cli import CliError, add_deprecated_alias
from maskaq.config import config_keys

__all__ = ["add_model_arguments", "add_weight_arguments", "add_architecture_arguments", "add_device_argument",
           "add_data_arguments", "add_run_dir_arguments", "add_deprecated_alias", "check_bits_cli",
           "collect_overrides", "dataset_for_cli", "load_model_for_cli", "load_args_model", "method_and_overrides",
           "model_kwargs_of", "parse_override", "resolve_device", "check_output_dir", "check_output_file", "check_run_dir",
           "in_process_group", "DEVICE_HELP"]

DEVICE_HELP = "cpu, cuda, cuda:1 ... (none given: cuda when available)"


def _cli_error(msg: str) -> CliError:
    return CliError(msg)


def in_process_group(body, args) -> int:
    """``body(args)``, under torchrun (WORLD_SIZE > 1 in the environment) inside one process group
    that every process joins first and leaves after."""
    from maskaq.runtime import end_distributed, init_distributed
    created = init_distributed()
    finished = False
    try:
        status = body(args)
        finished = True
        return status
    finally:
        end_distributed(created, finished)  # no waiting for the others after an exception


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


def add_architecture_arguments(parser: argparse.ArgumentParser) -> None:
    """--model-kwargs JSON and its usual keys as options of their own (--num-classes, --img-size, --in-chans)."""
    parser.add_argument("--model-kwargs", default=None, metavar="JSON",
                        help='timm.create_model options for a timm --model, e.g. \'{"num_classes": 10}\'')
    parser.add_argument("--num-classes", type=int, default=None, metavar="N",
                        help="timm models: classifier size (model kwarg num_classes)")
    parser.add_argument("--img-size", type=int, default=None, metavar="PX",
                        help="timm models: input resolution (model kwarg img_size)")
    parser.add_argument("--in-chans", type=int, default=None, metavar="C",
                        help="timm models: input channels (model kwarg in_chans)")


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help=DEVICE_HELP)


def add_model_arguments(parser: argparse.ArgumentParser, *, device: bool = True, required: bool = True,
                        model_help: str = "bundled zoo model (vit_fmnist) or a timm architecture name") -> None:
    """--model, its weights (add_weight_arguments), its architecture options
    (add_architecture_arguments) and (with ``device``) --device."""
    parser.add_argument("--model", required=required, help=model_help)
    add_weight_arguments(parser)
    add_architecture_arguments(parser)
    if device:
        add_device_argument(parser)


def add_data_arguments(parser: argparse.ArgumentParser, data_help: str) -> None:
    """--data, --limit, --eval-batch-size and --skip-bad-images: the images a model is evaluated on."""
    parser.add_argument("--data", default=None, metavar="DIR", help=data_help)
    parser.add_argument("--limit", type=int, default=None, metavar="N",
                        help="evaluate on the first N images of --data only (smoke runs)")
    parser.add_argument("--eval-batch-size", type=int, default=256, metavar="N", help="evaluation batch size")
    parser.add_argument("--skip-bad-images", action="store_true",
                        help="leave out (and count) the files of --data that are not readable images "
                             "instead of stopping before the run")


def add_run_dir_arguments(parser: argparse.ArgumentParser, out_help: str, *, default: Optional[str] = None,
                          overwrite_help: Optional[str] = None, resume_help: Optional[str] = None) -> None:
    """--out (required unless ``default``), --overwrite and --resume of a command that writes a run into a folder."""
    parser.add_argument("--out", required=default is None, default=default, metavar="DIR", help=out_help)
    parser.add_argument("--overwrite", action="store_true",
                        help=overwrite_help or "replace the finished (or stopped) run in OUT instead of refusing it")
    parser.add_argument("--resume", action="store_true",
                        help=resume_help or "continue the run that stopped in OUT (killed, pre-empted, interrupted); "
                                            "give the first run's arguments")


def model_kwargs_of(args) -> Dict[str, Any]:
    """timm.create_model options from --model-kwargs and --num-classes/--img-size/--in-chans."""
    kwargs = {}
    text = getattr(args, "model_kwargs", None)
    if text:
        try:
            kwargs = json.loads(text)
        except json.JSONDecodeError as exc:
            raise _cli_error(f"--model-kwargs is not valid JSON: {exc}") from None
        if not isinstance(kwargs, dict):
            raise _cli_error("--model-kwargs must be a JSON object, e.g. '{\"num_classes\": 10}'")
    for key in ("num_classes", "img_size", "in_chans"):
        value = getattr(args, key, None)
        if value is not None:
            if value < 1:
                raise _cli_error(f"--{key.replace('_', '-')} must be >= 1, got {value}")
            kwargs[key] = value
    return kwargs


def resolve_device(name: Optional[str]) -> torch.device:
    """--device: the named device, checked, or cuda when available and none is named."""
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
                       model_kwargs=None, pretrained: bool = False,
                       pretrained_file: Optional[str] = None) -> nn.Module:
    """The full-precision model ``name`` (``model_kwargs``: a dict or --model-kwargs JSON), with
    ``model.maskaq_source`` recording how it was built, so a student made from it can be loaded
    from its folder alone."""
    from maskaq import zoo
    from maskaq.quant.io import is_student

    if checkpoint is not None and is_student(checkpoint):
        raise _cli_error(f"--checkpoint {checkpoint} is a quantized student (written by `maskaq quantize`), not "
                         f"full-precision weights: evaluate it with `maskaq eval {checkpoint}`, or pass the "
                         "teacher's weights")
    if checkpoint is not None and Path(checkpoint).is_dir():
        raise _cli_error(f"--checkpoint {checkpoint} is a directory; pass a weights file (.safetensors, .pth)")
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise _cli_error(f"checkpoint {checkpoint} does not exist")
    kwargs = model_kwargs if isinstance(model_kwargs, dict) else model_kwargs_of(
        argparse.Namespace(model_kwargs=model_kwargs))
    try:
        model = zoo.create(name, checkpoint=checkpoint, pretrained=pretrained, pretrained_file=pretrained_file,
                           **kwargs)
    except (ValueError, OSError, TypeError) as exc:  # OSError: missing files, zoo.PretrainedUnavailable
        raise _cli_error(str(exc).splitlines()[0]) from None
    model.maskaq_source = {"name": name, "kwargs": dict(kwargs)}
    return model.to(device).eval()


def load_args_model(args, device: torch.device, name: Optional[str] = None) -> nn.Module:
    """load_model_for_cli with the model options of ``args`` (add_model_arguments)."""
    return load_model_for_cli(name or args.model, args.checkpoint, device, model_kwargs_of(args),
                              args.pretrained, args.pretrained_file)


FASHION_MNIST_NAMES = ("fashion-mnist", "fashion_mnist", "fmnist")


def dataset_for_cli(path: Optional[str], model: Optional[nn.Module], split: str = "test", *,
                    limit: Optional[int] = None, skip_bad_images: bool = False, flag: str = "--data",
                    num_classes: Optional[int] = None, fmnist_root: Optional[str] = None, **data_config):
    """'fashion-mnist' (or 'fmnist') -> the Fashion-MNIST split; else an ImageFolder directory
    prepared for ``model`` (or ``data_config``). Before any work: the images it will read (the first
    ``limit``) are opened, and its class count is held against the model's head (``num_classes``
    where no model is given)."""
    if path is None:
        return None
    if path.lower() in FASHION_MNIST_NAMES:
        from maskaq.data import FMNIST_CLASSES, fashion_mnist
        try:
            dataset = fashion_mnist(split, root=fmnist_root)
        except (FileNotFoundError, ValueError) as exc:
            raise _cli_error(str(exc).splitlines()[0]) from None
        _check_classes(len(FMNIST_CLASSES), path, model, num_classes, flag)
        return dataset
    if not Path(path).is_dir():
        raise _cli_error(f"{flag} {path} is not a directory (pass an ImageFolder directory or 'fashion-mnist')")
    from maskaq.data import image_folder
    try:
        dataset = image_folder(path, model, **data_config)  # timm's eval transform for the model's pretrained_cfg
    except (FileNotFoundError, ValueError) as exc:
        raise _cli_error(str(exc).splitlines()[0]) from None
    _check_images(dataset, path, limit, skip_bad_images, flag)
    _check_classes(len(dataset.classes), path, model, num_classes, flag)
    return dataset


def _check_images(dataset, path: str, limit: Optional[int], skip: bool, flag: str) -> None:
    """Open the images the run will read (headers only) so a bad file stops it now, not at its end."""
    from maskaq.data import image_problem

    samples = list(dataset.samples)
    wanted = len(samples) if limit is None else min(int(limit), len(samples))
    good, bad, scanned = [], [], 0
    for sample in samples:
        if len(good) >= wanted:
            break
        scanned += 1
        problem = image_problem(sample[0])
        if problem:
            bad.append((sample[0], problem))
        else:
            good.append(sample)
    if not bad:
        return
    more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
    if not skip:
        raise _cli_error(f"{bad[0][0]} in {flag} {path} is not a readable image: {bad[0][1]}{more}; remove it or "
                         "pass --skip-bad-images to leave such files out")
    kept = good + samples[scanned:]
    dataset.samples = dataset.imgs = kept
    dataset.targets = [target for _, target in kept]
    print(f"note: left out {len(bad)} unreadable files of {path} (e.g. {bad[0][0]}: {bad[0][1]})", file=sys.stderr)


def model_classes(model: Optional[nn.Module]) -> Optional[int]:
    """The number of outputs of ``model``'s classifier head, where it says."""
    if model is None:
        return None
    count = getattr(model, "num_classes", None)
    if count is None:
        count = (getattr(model, "pretrained_cfg", None) or {}).get("num_classes")
    return int(count) if count else None


def _check_classes(found: int, path: str, model, num_classes: Optional[int], flag: str) -> None:
    head = model_classes(model) if model is not None else num_classes
    if head is None or head == found:
        return
    if found > head:
        raise _cli_error(f"{flag} {path} has {found} classes but the model's head has {head} outputs, so "
                         f"labels {head} and up can never be right; pass a folder with one sub-folder per "
                         "output class, or a model with that many (--num-classes)")
    print(f"warning: {flag} {path} has {found} classes but the model's head has {head} outputs; class folder i "
          "(in sorted order) is scored as output i, so the accuracy means little unless the folders are the "
          "head's first classes (--num-classes sets a timm model's head)", file=sys.stderr)


def check_output_dir(path, flag: str = "--out") -> None:
    """Stop now when ``path`` cannot be made or written, not after the first hour of a run. Nothing
    is created: the nearest existing folder on the way is probed with a temporary file."""
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise _cli_error(f"{flag} {target} is a file, not a directory; choose another {flag}")
    probe = target
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise _cli_error(f"{flag} {target} cannot be created: {probe} is a file; choose another {flag}")
    try:
        fd, tmp = tempfile.mkstemp(dir=probe, prefix=".maskaq-write-test-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise _cli_error(f"{flag} {target} cannot be written ({exc.strerror or exc} in {probe}); choose "
                         f"another {flag} or make {probe} writable") from None


def check_run_dir(args, finished, checkpoint_dir: Path, *, extends: bool = False) -> None:
    """Refuse to overwrite a finished run without --overwrite, and --resume with nothing to resume.

    ``finished``: files a finished run leaves in ``args.out``; ``checkpoint_dir``: where a stopped
    run keeps its checkpoints (a folder, or one file); ``extends``: a finished run keeps its
    checkpoint and --resume trains it further (train-teacher's next stage), so that checkpoint
    does not make it a stopped run."""
    out = Path(args.out)
    if args.resume and args.overwrite:
        raise _cli_error("--resume continues the run in OUT and --overwrite replaces it: pass one of them")
    check_output_dir(out)
    stopped = checkpoint_dir.is_file() or (checkpoint_dir.is_dir() and any(checkpoint_dir.iterdir()))
    done = [p for p in finished if Path(p).exists()]
    if args.resume and not stopped:
        what = (f"{out} holds a finished run ({done[0]}) and no stopped one" if done
                else f"{out} holds no stopped run ({checkpoint_dir} is {'empty' if checkpoint_dir.is_dir() else 'missing'})")
        raise _cli_error(f"nothing to resume: {what}; run the command without --resume to start"
                         + (" a new one (with --overwrite to replace it)" if done else ""))
    if stopped and not (done and extends) and not args.resume and not args.overwrite:
        from maskaq.cli import continue_command
        raise _cli_error(f"{checkpoint_dir} holds a stopped run: `{continue_command(args)}` continues it, "
                         "--overwrite starts over")
    if done and not args.resume and not args.overwrite:
        raise _cli_error(f"{out} holds a finished run ({', '.join(str(p) for p in done)}); pass --overwrite to "
                         + ("replace it, --resume to train it further," if extends else "replace it,")
                         + " or choose another --out")


def check_output_file(path, overwrite: bool, flag: str) -> None:
    """Refuse, before any work, a file the user named for a result that exists (unless ``overwrite``)
    or cannot be written: a finished result is not replaced without being asked."""
    target = Path(path)
    if target.is_dir():
        raise _cli_error(f"{flag} {target} is a directory; name a file")
    if target.exists() and not overwrite:
        raise _cli_error(f"{flag} {target} exists; pass --overwrite to replace it, or choose another {flag}")
    check_output_dir(target.parent, flag)


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
