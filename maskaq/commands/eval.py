"""`maskaq eval`: top-1/top-5 accuracy of a model (bundled zoo name, or timm name with a checkpoint
or timm's pretrained weights) on the bundled Fashion-MNIST test split or on an image folder."""
from __future__ import annotations

import json

import torch

from maskaq.commands.common import _cli_error, add_weight_arguments
from maskaq.evaluation import evaluate

__all__ = ["add_arguments", "run"]


def add_arguments(parser) -> None:
    parser.add_argument("model", nargs="?", default="vit_fmnist",
                        help="bundled zoo name (e.g. vit_fmnist) or a timm architecture name")
    add_weight_arguments(parser)
    parser.add_argument("--num-classes", type=int, default=None, help="timm models: classifier size")
    parser.add_argument("--img-size", type=int, default=None, help="timm models: input resolution")
    parser.add_argument("--in-chans", type=int, default=None, help="timm models: input channels")
    parser.add_argument("--data", default=None, metavar="DIR",
                        help="ImageFolder validation directory (default: bundled Fashion-MNIST test split)")
    parser.add_argument("--fmnist-root", default=None, metavar="DIR",
                        help="read Fashion-MNIST idx files from DIR instead of the bundled copy")
    parser.add_argument("--split", choices=("test", "train"), default="test", help="Fashion-MNIST split")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="evaluate only N images")
    parser.add_argument("--seed", type=int, default=None,
                        help="with --limit: draw a random subset with this seed (default: the first N)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE",
                        help="also write the result as JSON to FILE (or stdout with no FILE)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _build_model(args):
    from maskaq import zoo
    timm_kwargs = {k: v for k, v in (("num_classes", args.num_classes), ("img_size", args.img_size),
                                       ("in_chans", args.in_chans)) if v is not None}
    try:
        return zoo.create(args.model, checkpoint=args.checkpoint, pretrained=args.pretrained,
                          pretrained_file=args.pretrained_file, **timm_kwargs)
    except (ValueError, OSError, TypeError) as exc:  # OSError: missing files, zoo.PretrainedUnavailable
        raise _cli_error(str(exc)) from None


def _build_dataset(args, model):
    from maskaq import data
    cfg = getattr(model, "pretrained_cfg", None) or {}
    input_size = tuple(cfg.get("input_size", (3, 224, 224)))
    try:
        if args.data is not None:
            return data.image_folder(args.data, model)  # timm's eval transform for the model's cfg
        if input_size != (1, 28, 28):
            raise _cli_error(f"model {args.model} takes input {input_size}, Fashion-MNIST is (1, 28, 28): "
                             "pass --data DIR (an ImageFolder) or --img-size 28 --in-chans 1")
        return data.fashion_mnist(args.split, root=args.fmnist_root)
    except (FileNotFoundError, ValueError) as exc:
        raise _cli_error(str(exc)) from None


def run(args) -> int:
    if args.limit is not None and args.limit < 1:
        raise _cli_error(f"--limit must be >= 1, got {args.limit}")
    if args.batch_size < 1:
        raise _cli_error(f"--batch-size must be >= 1, got {args.batch_size}")
    from torch.utils.data import DataLoader, Subset

    model = _build_model(args)
    dataset = _build_dataset(args, model)
    if args.limit is not None and args.limit < len(dataset):
        if args.seed is None:
            indices = range(args.limit)
        else:
            g = torch.Generator().manual_seed(args.seed)
            indices = torch.randperm(len(dataset), generator=g)[:args.limit].tolist()
        dataset = Subset(dataset, indices)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.workers)
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        raise _cli_error(f"bad --device {args.device!r}: {exc}") from None
    result = evaluate(model, loader, device=device, progress=not args.no_progress)
    source = args.data if args.data is not None else f"fashion-mnist/{args.split}"
    report = {"model": args.model, "checkpoint": args.checkpoint, "data": source, "images": len(dataset),
              "top1": round(result["top1"], 3), "top5": round(result["top5"], 3)}
    print(f"{args.model} on {source} ({len(dataset)} images): "
          f"top-1 {report['top1']:.2f}%  top-5 {report['top5']:.2f}%")
    if args.json == "-":
        print(json.dumps(report))
    elif args.json is not None:
        from maskaq._files import write_json
        write_json(args.json, report)
    return 0

