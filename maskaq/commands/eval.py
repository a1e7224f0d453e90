"""`maskaq eval`: top-1/top-5 accuracy of models on the bundled Fashion-MNIST test split or on an
image folder. A MODEL is a bundled zoo name or a timm name (weights from --checkpoint or
--pretrained), or what maskaq wrote: a student folder (`maskaq quantize`'s OUT/model, or OUT), an
integer export (`maskaq export --format integer`) or an .onnx file (run by ONNX Runtime). The
saved ones record their architecture and input preparation, so one command compares them all:

    maskaq eval deit_tiny_patch16_224 runs/deit/model runs/deit/integer runs/deit/model.onnx --checkpoint deit.pth --data imgs

(--checkpoint and the architecture options belong to the named architectures, the saved models
carry their own; a student folder given as --checkpoint is loaded on the named architecture.)"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from maskaq.commands.common import (_cli_error, add_data_arguments, add_deprecated_alias, add_model_arguments,
                                    check_output_file, dataset_for_cli, load_args_model, resolve_device)
from maskaq.evaluation import evaluate

__all__ = ["add_arguments", "run"]


def add_arguments(parser) -> None:
    parser.add_argument("models", nargs="*", metavar="MODEL",
                        help="models to evaluate (none given: vit_fmnist): zoo or timm names, student folders, "
                             "integer exports, .onnx files")
    add_model_arguments(parser, required=False,
                        model_help="a model to evaluate, as MODEL (bundled zoo name, timm name, student folder, "
                                   "integer export or .onnx file)")
    add_data_arguments(parser, "ImageFolder validation directory, or 'fashion-mnist' (none given: the bundled "
                               "Fashion-MNIST test split, for a model that takes 28x28 gray images)")
    parser.add_argument("--fmnist-root", default=None, metavar="DIR",
                        help="read Fashion-MNIST idx files from DIR instead of the bundled copy")
    parser.add_argument("--split", choices=("test", "train"), default="test", help="Fashion-MNIST split")
    parser.add_argument("--seed", type=int, default=None,
                        help="with --limit: draw a random subset with this seed (default: the first N)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE",
                        help="also write the result as JSON to FILE (or stdout with no FILE); a list for "
                             "several models. An existing FILE is refused unless --overwrite")
    parser.add_argument("--overwrite", action="store_true", help="replace the --json FILE if it exists")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_deprecated_alias(parser, "--batch-size", "--eval-batch-size", type=int)


class OnnxModel(nn.Module):
    """An .onnx file as a module for `evaluate`: ONNX Runtime on the CPU, batches of any size (a
    graph with a fixed batch size gets its batches cut and the last one padded)."""

    def __init__(self, path: Path):
        super().__init__()
        try:
            import onnxruntime as ort
        except ImportError:
            raise _cli_error(f"{path}: evaluating an .onnx file needs onnxruntime (pip install onnxruntime)") from None
        options = ort.SessionOptions()
        options.log_severity_level = 3  # its warnings about graph rewrites say nothing to act on
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own classes for unreadable graphs
            raise _cli_error(f"{path} cannot be loaded by ONNX Runtime: {str(exc).splitlines()[0]}") from None
        first = self.session.get_inputs()[0]
        self.input_name = first.name
        self.fixed_batch = first.shape[0] if isinstance(first.shape[0], int) else None
        self.input_size = tuple(d if isinstance(d, int) else None for d in first.shape[1:])
        out = self.session.get_outputs()[0].shape
        self.num_classes = out[-1] if isinstance(out[-1], int) else None
        text = self.session.get_modelmeta().custom_metadata_map.get("maskaq")
        self.source = json.loads(text) if text else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().cpu().float().numpy()
        step = self.fixed_batch or len(x)
        outs = []
        for start in range(0, len(x), step):
            chunk = x[start:start + step]
            n = len(chunk)
            if n < step:
                import numpy as np
                chunk = np.concatenate([chunk, np.zeros((step - n, *chunk.shape[1:]), dtype=chunk.dtype)])
            outs.append(torch.from_numpy(self.session.run(None, {self.input_name: chunk})[0][:n]))
        return torch.cat(outs)


def _describe_quant(config: dict) -> str:
    return f"W{config.get('wbits', '?')}A{config.get('abits', '?')}" if config else ""


def _load(spec: str, args, device: torch.device):
    """(module, kind, device to run on) of one MODEL (--checkpoint applies to a named architecture only)."""
    from maskaq.integer.export import CONFIG_NAME as INTEGER_CONFIG
    from maskaq.quant.io import is_student, student_directory

    path = Path(spec)
    try:
        if spec.endswith(".onnx"):
            if not path.is_file():
                raise _cli_error(f"{spec} does not exist")
            return OnnxModel(path), "onnx", torch.device("cpu")
        if is_student(spec):
            from maskaq.quant import load_quantized
            student = load_quantized(student_directory(spec)).to(device).eval()
            return student, f"fake-quant {_describe_quant(student.maskaq_quant)}", device
        if (path / INTEGER_CONFIG).is_file():
            from maskaq.integer import load_integer
            imodel = load_integer(path, device=device)
            return imodel, f"integer {_describe_quant(imodel.maskaq_integer.get('quant'))}", device
        if path.exists():
            raise _cli_error(f"{spec} is neither a student folder (quant_config.json), an integer export "
                             "(integer.json) nor an .onnx file")
        checkpoint = args.checkpoint
        if checkpoint is not None and (is_student(checkpoint) or (Path(checkpoint) / INTEGER_CONFIG).is_file()):
            args_without = type(args)(**{**vars(args), "checkpoint": None})
            model = load_args_model(args_without, device, spec)
            if is_student(checkpoint):
                from maskaq.quant import load_quantized
                student = load_quantized(student_directory(checkpoint), model).to(device).eval()
                return student, f"fake-quant {_describe_quant(student.maskaq_quant)}", device
            from maskaq.integer import load_integer
            imodel = load_integer(checkpoint, model, device=device)
            return imodel, f"integer {_describe_quant(imodel.maskaq_integer.get('quant'))}", device
        return load_args_model(args, device, spec), "full precision", device
    except (ValueError, TypeError, OSError) as exc:
        raise _cli_error(str(exc).splitlines()[0]) from None


def _dataset(args, model):
    """The evaluation images prepared for ``model`` (an OnnxModel: as its file records)."""
    if isinstance(model, OnnxModel):
        source = model.source or {}
        config = dict(source.get("data_config") or {})
        if not config and None not in model.input_size:
            config["input_size"] = model.input_size
        input_size = tuple(config.get("input_size", (3, 224, 224)))
        extra = dict(model=None, num_classes=model.num_classes, **config)
    else:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        input_size = tuple(cfg.get("input_size", (3, 224, 224)))
        extra = dict(model=model)
    data = args.data
    if data is None:
        if input_size != (1, 28, 28):
            raise _cli_error(f"the model takes input {input_size}, Fashion-MNIST is (1, 28, 28): "
                             "pass --data DIR (an ImageFolder) or --img-size 28 --in-chans 1")
        data = "fashion-mnist"
    return dataset_for_cli(data, split=args.split, limit=args.limit, skip_bad_images=args.skip_bad_images,
                           fmnist_root=args.fmnist_root, **extra), data


def run(args) -> int:
    for flag, value in (("--limit", args.limit), ("--eval-batch-size", args.eval_batch_size)):
        if value is not None and value < 1:
            raise _cli_error(f"{flag} must be >= 1, got {value}")
    if args.json not in (None, "-"):
        check_output_file(args.json, args.overwrite, "--json")
    from torch.utils.data import DataLoader, Subset

    specs = list(args.models) + ([args.model] if args.model else [])
    specs = specs or ["vit_fmnist"]
    device = resolve_device(args.device)
    loaded = [(spec, *_load(spec, args, device)) for spec in specs]  # every model loads before any runs
    reports = []
    for spec, model, kind, run_on in loaded:
        dataset, source = _dataset(args, model)
        if source in ("fashion-mnist",):
            source = f"fashion-mnist/{args.split}"
        if args.limit is not None and args.limit < len(dataset):
            if args.seed is None:
                indices = range(args.limit)
            else:
                g = torch.Generator().manual_seed(args.seed)
                indices = torch.randperm(len(dataset), generator=g)[:args.limit].tolist()
            dataset = Subset(dataset, indices)
        loader = DataLoader(dataset, batch_size=args.eval_batch_size, shuffle=False, num_workers=args.workers)
        try:
            result = evaluate(model, loader, device=run_on, progress=not args.no_progress)
        except OSError as exc:  # an image that opened in the scan but does not decode
            raise _cli_error(f"{str(exc).splitlines()[0]} (while reading {source})") from None
        report = {"model": spec, "kind": kind.strip(), "checkpoint": args.checkpoint, "data": source,
                  "images": len(dataset), "top1": round(result["top1"], 3), "top5": round(result["top5"], 3)}
        reports.append(report)
        print(f"{spec} ({report['kind']}) on {source} ({len(dataset)} images): "
              f"top-1 {report['top1']:.2f}%  top-5 {report['top5']:.2f}%")
    result = reports[0] if len(reports) == 1 else reports
    if args.json == "-":
        print(json.dumps(result))
    elif args.json is not None:
        from maskaq._files import write_json
        write_json(args.json, result)
    return 0
