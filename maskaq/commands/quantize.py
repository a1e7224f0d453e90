"""`maskaq quantize`: data-free quantization of a ViT from the command line: synthesize, calibrate,
distill (maskaq.pipeline), evaluate on --val, save the student, its report and an image grid.

    maskaq quantize --model vit_fmnist --wbits 4 --abits 4 --method maskaq --val fashion-mnist --out runs/w4a4

While it runs, OUT/checkpoint holds its checkpoints (maskaq.checkpoint: finished synthesis
batches, each round's images, and the synthesis batch in progress and the QAT state every --set
checkpoint_every_steps=N steps and checkpoint_every_seconds=T seconds). A killed run continues
with the same command plus --resume and ends with the student an uninterrupted run makes; a
finished run removes OUT/checkpoint.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from maskaq.commands.common import (_cli_error, add_model_arguments, dataset_for_cli, load_model_for_cli,
                                    method_and_overrides, resolve_device)
from maskaq.pipeline import METHODS, build_config, evaluate_model, run_pipeline
from maskaq.spec import describe_model
from maskaq.runtime import dist_info

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--wbits", type=int, default=4, help="weight bits (2-8)")
    parser.add_argument("--abits", type=int, default=4, help="activation bits (2-8)")
    parser.add_argument("--method", default="maskaq", help="one of " + ", ".join(METHODS))
    parser.add_argument("--val", default=None,
                        help="validation data: an ImageFolder directory, or 'fashion-mnist' (bundled test split)")
    parser.add_argument("--train", default=None,
                        help="real training images for --method real: ImageFolder or 'fashion-mnist'")
    parser.add_argument("--out", required=True, help="output directory (model, report.json, synthetic.png)")
    parser.add_argument("--preset", default="cpu",
                        help="quick (seconds, a smoke run), cpu (minutes on 2 cores: 64 images, 120 QAT steps, "
                             "L_hd weight 1), cpu-long (about 3x cpu) or paper (the public code's settings: "
                             "10k images, 200 epochs, L_hd weight 10)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random draw")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any setting, e.g. --set synth_iters=500 (repeatable)")
    parser.add_argument("--val-limit", type=int, default=None,
                        help="evaluate on the first N validation images only (smoke runs)")
    parser.add_argument("--batch-size", type=int, default=256, help="evaluation batch size")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run that stopped in OUT (killed, pre-empted) from OUT/checkpoint; "
                             "give the first run's arguments")


def run(args) -> int:
    from maskaq.commands.common import in_process_group
    return in_process_group(_run, args)


def _run(args) -> int:
    from maskaq.quant import save_quantized
    from maskaq.synthesis.io import save_image_grid, write_json

    record, overrides = method_and_overrides(args)
    device = resolve_device(args.device)
    model = load_model_for_cli(args.model, args.checkpoint, device, args.model_kwargs, args.pretrained,
                               args.pretrained_file)
    val = dataset_for_cli(args.val, model, "test")
    if record.images == "real":
        if args.train is None:
            raise _cli_error("--method real needs --train PATH (ImageFolder) or --train fashion-mnist")
        overrides["real_data"] = dataset_for_cli(args.train, model, "train")
    try:
        config = build_config(args.method, args.preset, **overrides)
    except (ValueError, TypeError) as exc:
        raise _cli_error(str(exc)) from None
    out = Path(args.out)
    rank, _ = dist_info()
    from maskaq.checkpoint import CheckpointMismatchError, CorruptCheckpointError
    from maskaq.distill.guard import QATDiverged
    try:
        result = run_pipeline(model, args.wbits, args.abits, method=args.method, seed=args.seed, config=config,
                              checkpoint_dir=out / "checkpoint", resume=args.resume)
    except (FileExistsError, CheckpointMismatchError, CorruptCheckpointError) as exc:
        raise _cli_error(str(exc)) from None
    except QATDiverged as exc:
        raise _cli_error(f"{exc}. The run up to its last save is in {out / 'checkpoint'} "
                         "(--resume continues it with the same settings)") from None
    report = dict(result.report, preset=args.preset, model=args.model, checkpoint=args.checkpoint)
    if val is not None:
        report["val"] = {"path": args.val, "limit": args.val_limit}
        report["val"]["quantized"] = evaluate_model(result.model, val, args.val_limit, args.batch_size)
        report["val"]["full_precision"] = evaluate_model(model, val, args.val_limit, args.batch_size)
    if rank == 0:
        spec = describe_model(model)
        out.mkdir(parents=True, exist_ok=True)
        save_quantized(result.model, out / "model")
        grid = save_image_grid(result.images.images, spec.mean, spec.std, out / "synthetic.png")
        report["files"] = {"model": str(out / "model"), "report": str(out / "report.json"), "grid": str(grid)}
        write_json(out / "report.json", report)
        from maskaq.checkpoint import RunCheckpoint
        RunCheckpoint(out / "checkpoint", {}).remove()  # the results are written: the checkpoints go
        line = f"{args.method} W{args.wbits}A{args.abits}: done in {report['seconds']:.0f}s"
        if val is not None:
            line += (f"; top-1 {report['val']['quantized']['top1']:.2f}% "
                     f"(full precision {report['val']['full_precision']['top1']:.2f}%)")
        print(line)
        print(f"wrote {out / 'model'}, {out / 'report.json'}, {grid}")
    return 0
