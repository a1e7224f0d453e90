"""Train the bundled Fashion-MNIST ViT teacher (timm VisionTransformer) on the CPU.

The learning-rate schedule (linear warmup, then cosine) runs on a progress value that is the
larger of the fraction of epochs done and the fraction of the time budget spent, so training
always anneals fully and ends inside --time-budget-min even on a slow or shared machine.
A checkpoint is written atomically after every epoch; --resume continues from it.
Launch with torchrun for several processes: rank 0 evaluates and writes all files.

On a shared CPU, start it with OMP_WAIT_POLICY=PASSIVE: OpenMP's default busy-waiting burns CPU time
that other jobs on the cores need (docs/results.md#training-the-teacher-on-a-shared-cpu).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from maskaq._files import atomic_write, atomic_write_bytes

DEFAULT_MODEL_ARGS = dict(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=96,
                          depth=6, num_heads=3, mlp_ratio=2.0, global_pool="token")
CHECKPOINT_NAME = "checkpoint.pth"
LOG_NAME = "log.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from maskaq.commands.common import DEVICE_HELP, add_deprecated_alias, add_run_dir_arguments
    add_run_dir_arguments(
        parser, "run directory (checkpoint.pth, log.json)", default="runs/teacher",
        overwrite_help="replace the finished (or stopped) run in OUT and an earlier export in --export DIR "
                       "instead of refusing them (with --resume: the export only)",
        resume_help="continue the run in OUT from OUT/checkpoint.pth: one that stopped, or a finished one "
                    "for more --epochs (see --restart-schedule)")
    parser.add_argument("--root", default=None, help="directory with the Fashion-MNIST idx(.gz) files "
                        "(default: /usr/share/datasets/fashion-mnist)")
    parser.add_argument("--epochs", type=int, default=30, help="upper bound on epochs")
    parser.add_argument("--time-budget-min", type=float, default=70.0,
                        help="wall-clock budget in minutes; the schedule anneals to finish inside it (0: none)")
    parser.add_argument("--train-batch-size", dest="batch_size", type=int, default=64, metavar="N",
                        help="global batch size (small batches: more updates per CPU-second, which a ViT needs)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--min-lr", type=float, default=1e-5)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--warmup", type=float, default=0.05, help="warmup as a fraction of training progress")
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--crop-padding", type=int, default=0, help="random-crop padding in pixels (0: off; try 2 for long runs)")
    parser.add_argument("--no-flip", action="store_true", help="disable random horizontal flips")
    parser.add_argument("--embed-dim", type=int, default=DEFAULT_MODEL_ARGS["embed_dim"])
    parser.add_argument("--depth", type=int, default=DEFAULT_MODEL_ARGS["depth"])
    parser.add_argument("--num-heads", type=int, default=DEFAULT_MODEL_ARGS["num_heads"])
    parser.add_argument("--mlp-ratio", type=float, default=DEFAULT_MODEL_ARGS["mlp_ratio"])
    parser.add_argument("--patch-size", type=int, default=DEFAULT_MODEL_ARGS["patch_size"])
    parser.add_argument("--reg-tokens", type=int, default=0,
                        help="register tokens after the CLS token (timm reg_tokens; 'ViTs need registers')")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads per process")
    parser.add_argument("--device", default=None, help=DEVICE_HELP)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--restart-schedule", action="store_true",
                        help="with --resume: keep weights and optimizer state but start a fresh warmup + "
                             "cosine over --epochs / --time-budget-min (a second stage) instead of continuing")
    parser.add_argument("--export", default=None, metavar="DIR",
                        help="after training, write vit_fmnist.safetensors + vit_fmnist.json into DIR (an earlier "
                             "export of that name there is refused before training unless --overwrite)")
    parser.add_argument("--export-name", default="vit_fmnist")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_deprecated_alias(parser, "--batch-size", "--train-batch-size", type=int)


def _cli_error(msg: str):
    from maskaq.cli import CliError
    return CliError(msg)


def validate_args(args) -> None:
    if args.epochs < 1:
        raise _cli_error(f"--epochs must be >= 1, got {args.epochs}")
    if args.batch_size < 1:
        raise _cli_error(f"--train-batch-size must be >= 1, got {args.batch_size}")
    if args.time_budget_min < 0:
        raise _cli_error(f"--time-budget-min must be >= 0, got {args.time_budget_min}")
    if not 0 <= args.warmup < 1:
        raise _cli_error(f"--warmup must be in [0, 1), got {args.warmup}")
    if args.patch_size < 1 or 28 % args.patch_size:
        raise _cli_error(f"--patch-size must divide 28, got {args.patch_size}")
    if args.restart_schedule and not args.resume:
        raise _cli_error("--restart-schedule only makes sense with --resume")
    if args.embed_dim % args.num_heads:
        raise _cli_error(f"--embed-dim {args.embed_dim} must be divisible by --num-heads {args.num_heads}")
    if args.reg_tokens < 0:
        raise _cli_error(f"--reg-tokens must be >= 0, got {args.reg_tokens}")


def _finished(log_path: Path) -> bool:
    """A run that got to its end: its log has the summary written after the last epoch (a stopped
    run's log and checkpoint have none)."""
    try:
        return "summary" in json.loads(log_path.read_text())
    except (OSError, ValueError):
        return False


def check_outputs(args, out: Path, ckpt_path: Path) -> None:
    """Before any training: a finished or stopped run in OUT and an earlier export are kept unless
    --overwrite, and --resume needs a checkpoint to continue."""
    from maskaq.commands.common import check_output_dir, check_output_file, check_run_dir

    # with --resume the run is continued, so an --overwrite beside it can only be meant for the export
    run_args = argparse.Namespace(**{**vars(args), "overwrite": False}) if args.resume and args.export else args
    check_run_dir(run_args, [out / LOG_NAME] if _finished(out / LOG_NAME) else [], ckpt_path, extends=True)
    if args.export:
        check_output_dir(args.export, "--export")
        exports = [Path(args.export) / f"{args.export_name}{ext}" for ext in (".safetensors", ".json")]
        for path in exports:
            check_output_file(path, args.overwrite, "--export")
        # the export is written at the end, so the command that continues a stopped run still replaces it
        args._keep_overwrite = args.overwrite and any(path.exists() for path in exports)


def model_args_from(args) -> dict:
    model_args = dict(DEFAULT_MODEL_ARGS, embed_dim=args.embed_dim, depth=args.depth, num_heads=args.num_heads,
                      mlp_ratio=args.mlp_ratio, patch_size=args.patch_size)
    if args.reg_tokens:  # absent when 0, so the bundled teacher's config and checkpoints keep their keys
        model_args["reg_tokens"] = args.reg_tokens
    return model_args


def build_model(model_args: dict) -> torch.nn.Module:
    from timm.models.vision_transformer import VisionTransformer
    return VisionTransformer(**model_args)


def lr_at(progress: float, args) -> float:
    """Linear warmup to args.lr, then cosine down to args.min_lr, on progress in [0, 1]."""
    if progress < args.warmup:
        return args.lr * max(progress / args.warmup, 1e-3)
    t = min(1.0, (progress - args.warmup) / max(1e-8, 1.0 - args.warmup))
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1.0 + math.cos(math.pi * t))


def augment(images: torch.Tensor, padding: int, flip: bool, generator: torch.Generator,
            fill: float) -> torch.Tensor:
    """Per-sample random crop (zero-padded in pixel space => `fill` after normalization) and flip."""
    b, c, h, w = images.shape
    if padding > 0:
        padded = F.pad(images, (padding,) * 4, value=fill)
        oy = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
        ox = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
        rows = (oy[:, None] + torch.arange(h))[:, None, :, None]  # (B, 1, H, 1)
        cols = (ox[:, None] + torch.arange(w))[:, None, None, :]  # (B, 1, 1, W)
        images = padded[torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]
    if flip:
        do_flip = torch.rand(b, generator=generator) < 0.5
        images = torch.where(do_flip[:, None, None, None], images.flip(-1), images)
    return images


@torch.no_grad()
def test_accuracy(model, images, labels, device, batch_size=1000) -> float:
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, images.shape[0], batch_size):
        logits = model(images[start:start + batch_size].to(device))
        correct += (logits.argmax(-1).cpu() == labels[start:start + batch_size]).sum().item()
    model.train(was_training)
    return 100.0 * correct / images.shape[0]


def _atomic_torch_save(obj, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def _atomic_write_text(text: str, path: Path) -> None:
    atomic_write_bytes(path, text.encode())


def _plain_args(args) -> dict:
    """The JSON-friendly command-line options (drops the CLI's private `_run` callback etc.)."""
    return {k: v for k, v in vars(args).items() if not k.startswith("_")}


def _distributed():
    """(rank, world_size), initializing torch.distributed when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo" if not torch.cuda.is_available() else "nccl")
    rank = torch.distributed.get_rank() if world > 1 else 0
    return rank, world


_STAGE_KEYS = ("epochs", "time_budget_min", "batch_size", "lr", "min_lr", "warmup", "weight_decay",
               "label_smoothing", "crop_padding", "no_flip", "threads", "seed")


def training_summary(log: dict, world_size: int = 1) -> dict:
    """Epochs, minutes, final/best test top-1, and the options of every stage (first run and each
    --resume) so a multi-stage run is described truthfully."""
    last = log["epochs"][-1]
    runs = [{"from_epoch": 0, "args": log["args"]}] + [
        {"from_epoch": r["epoch"], "args": r["args"]} for r in log.get("resumed", [])]
    stages = []
    for r in runs:
        stage = {"from_epoch": r["from_epoch"], "restart_schedule": bool(r["args"].get("restart_schedule"))}
        stage.update({k: r["args"].get(k) for k in _STAGE_KEYS})
        stages.append(stage)
    return {"epochs": last["epoch"], "partial_last_epoch": last["partial_epoch"], "steps": last["steps"],
            "minutes": last["minutes"], "test_top1": last["test_top1"],
            "best_test_top1": max(e["test_top1"] for e in log["epochs"]),
            "test_top1_per_epoch": [e["test_top1"] for e in log["epochs"]],
            "world_size": world_size, "stages": stages}


def export_teacher(model, model_args: dict, summary: dict, directory, name: str = "vit_fmnist"):
    """Write name.safetensors (fp32 weights) and name.json (timm args, pretrained_cfg, training)."""
    from safetensors.torch import save_file
    from maskaq.data import FMNIST_MEAN, FMNIST_STD, FMNIST_CLASSES

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    weights = directory / f"{name}.safetensors"

    def write_weights(tmp):
        save_file(state, tmp, metadata={"format": "pt"})
        os.chmod(tmp, 0o644)  # the temporary file is 0600; the weights ship in the package

    atomic_write(weights, write_weights)
    config = {
        "architecture": name,
        "model_class": "timm.models.vision_transformer.VisionTransformer",
        "model_args": model_args,
        "pretrained_cfg": {
            "mean": list(FMNIST_MEAN), "std": list(FMNIST_STD),
            "input_size": [model_args["in_chans"], model_args["img_size"], model_args["img_size"]],
            "num_classes": model_args["num_classes"], "interpolation": "bilinear", "crop_pct": 1.0,
            "label_names": list(FMNIST_CLASSES), "dataset": "Fashion-MNIST",
        },
        "training": summary,
    }
    _atomic_write_text(json.dumps(config, indent=2) + "\n", directory / f"{name}.json")
    return weights


def run(args) -> int:
    validate_args(args)
    from maskaq.data import fashion_mnist

    torch.set_num_threads(args.threads)
    rank, world = _distributed()
    from maskaq.commands.common import resolve_device
    device = resolve_device(args.device)
    if device.type == "cuda" and device.index is None and world > 1:  # one GPU per process under torchrun
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
    out = Path(args.out)
    ckpt_path = out / CHECKPOINT_NAME
    check_outputs(args, out, ckpt_path)
    if world > 1:
        torch.distributed.barrier()  # every rank looked before rank 0 removes or writes anything
    if rank == 0:
        if args.overwrite and not args.resume:  # else a stop before the first epoch would leave the old run to resume
            for path in (ckpt_path, out / LOG_NAME):
                path.unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
    args._checkpoint_dir = ckpt_path  # from here on a stop says how to continue
    try:
        train_set = fashion_mnist("train", root=args.root)
        test_set = fashion_mnist("test", root=args.root)
    except FileNotFoundError as exc:
        raise _cli_error(str(exc)) from None

    model_args = model_args_from(args)
    torch.manual_seed(args.seed)
    model = build_model(model_args).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    generator = torch.Generator().manual_seed(args.seed + 1000 * rank)
    log = {"model_args": model_args, "args": _plain_args(args), "epochs": []}
    start_epoch, step, elapsed_before = 0, 0, 0.0
    # The schedule's own clock: equal to the run's clock unless --restart-schedule starts a new stage.
    schedule_step0, schedule_elapsed_before = 0, 0.0

    if args.resume:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if ckpt["model_args"] != model_args:
            raise _cli_error(f"checkpoint model {ckpt['model_args']} differs from the requested {model_args}")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        generator.set_state(ckpt["generator"])
        start_epoch, step, elapsed_before = ckpt["epoch"], ckpt["step"], ckpt["elapsed_s"]
        schedule_step0 = ckpt.get("schedule_step0", 0)
        schedule_elapsed_before = ckpt.get("schedule_elapsed_s", elapsed_before)
        if args.restart_schedule:
            schedule_step0, schedule_elapsed_before = step, 0.0
        log = ckpt["log"]
        log.setdefault("resumed", []).append({"epoch": start_epoch, "args": _plain_args(args)})

    train_model = model
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(model)

    n = len(train_set)
    local_batch = max(1, args.batch_size // world)
    steps_per_epoch = n // args.batch_size
    total_steps = steps_per_epoch * (args.epochs - (start_epoch if args.restart_schedule else 0))
    budget_s = args.time_budget_min * 60.0
    fill = (0.0 - train_set.mean[0]) / train_set.std[0]
    t0 = time.time() - elapsed_before
    schedule_t0 = time.time() - schedule_elapsed_before

    def progress() -> float:
        p = (step - schedule_step0) / max(1, total_steps)
        if budget_s > 0:
            p = max(p, (time.time() - schedule_t0) / budget_s)
        if world > 1:  # every rank follows rank 0's clock, so all stop at the same step
            p_tensor = torch.tensor([p], dtype=torch.float64, device=device if device.type == "cuda" else "cpu")
            torch.distributed.broadcast(p_tensor, src=0)
            p = float(p_tensor.item())
        return p

    from tqdm import tqdm
    done = progress() >= 1.0
    epoch = start_epoch
    while epoch < args.epochs and not done:
        model.train()
        # Same permutation on every rank (seeded by epoch); each rank takes its slice of a batch.
        order = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed * 100003 + epoch))
        loss_sum, seen = 0.0, 0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}", disable=args.no_progress or rank != 0,
                   leave=False, dynamic_ncols=True)
        for i in bar:
            p = progress()
            if p >= 1.0:
                done = True
                break
            lr = lr_at(p, args)
            for group in optimizer.param_groups:
                group["lr"] = lr
            idx = order[i * args.batch_size:(i + 1) * args.batch_size][rank * local_batch:(rank + 1) * local_batch]
            x = augment(train_set.images[idx], args.crop_padding, not args.no_flip, generator, fill).to(device)
            y = train_set.labels[idx].to(device)
            loss = F.cross_entropy(train_model(x), y, label_smoothing=args.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            loss_sum += loss.item() * len(idx)
            seen += len(idx)
            if i % 10 == 0:
                bar.set_postfix(loss=f"{loss_sum / seen:.3f}", lr=f"{lr:.2e}")
        bar.close()
        if seen == 0:
            break
        epoch += 1
        done = done or progress() >= 1.0
        if rank == 0:
            acc = test_accuracy(model, test_set.images, test_set.labels, device)
            entry = {"epoch": epoch, "steps": step, "train_loss": round(loss_sum / seen, 4),
                     "test_top1": round(acc, 2), "lr": lr, "minutes": round((time.time() - t0) / 60, 2),
                     "partial_epoch": seen < steps_per_epoch * local_batch}
            log["epochs"].append(entry)
            print(json.dumps(entry), flush=True)
            _atomic_torch_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                "generator": generator.get_state(), "epoch": epoch, "step": step,
                                "elapsed_s": time.time() - t0, "schedule_step0": schedule_step0,
                                "schedule_elapsed_s": time.time() - schedule_t0,
                                "model_args": model_args, "log": log}, ckpt_path)
            _atomic_write_text(json.dumps(log, indent=2) + "\n", out / LOG_NAME)

    if rank == 0 and log["epochs"]:
        summary = training_summary(log, world)
        log["summary"] = summary
        _atomic_write_text(json.dumps(log, indent=2) + "\n", out / LOG_NAME)
        print("summary: " + json.dumps(summary), flush=True)
        if args.export:
            path = export_teacher(model, model_args, summary, args.export, args.export_name)
            print(f"exported {path}", flush=True)
    if world > 1:
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    import sys
    _parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(_parser)
    sys.exit(run(_parser.parse_args()))
