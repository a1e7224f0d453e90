"""`maskaq quantize`: data-free quantization of a ViT from the command line: synthesize, calibrate,
distill (maskaq.pipeline), save the student, evaluate it on --data, write its report and an image grid.

    maskaq quantize --model vit_fmnist --wbits 4 --abits 4 --method maskaq --data fashion-mnist --out runs/w4a4
    maskaq eval runs/w4a4/model --data fashion-mnist

Before any work the inputs are checked: OUT can be written and holds no finished run (--overwrite
replaces one), the checkpoint fits the model, every image of --data opens and its class count
fits the model's head. While it runs, OUT/checkpoint holds its checkpoints (maskaq.checkpoint:
finished synthesis batches, each round's images, and the synthesis batch in progress and the QAT
state every --set checkpoint_every_steps=N steps and checkpoint_every_seconds=T seconds). A run
that was killed or interrupted continues with the same command plus --resume (the message it
stops with spells it out) and ends with the student an uninterrupted run makes; a finished run
removes OUT/checkpoint.

Synthesis runs the teacher and student passes in bfloat16 where the CPU multiplies it natively
(AMX or AVX512-BF16) and in float32 elsewhere, CUDA included: --set precision=auto, the default
(the report's synthesis_precision says which ran); --set precision=fp32 or bf16 chooses one.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from maskaq.commands.common import (_cli_error, add_data_arguments, add_deprecated_alias, add_model_arguments,
                                    add_run_dir_arguments, check_run_dir, dataset_for_cli, load_args_model,
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
    add_data_arguments(parser, "images to evaluate the student and the model on: an ImageFolder directory, or "
                               "'fashion-mnist' (bundled test split)")
    parser.add_argument("--train", default=None,
                        help="real training images for --method real: ImageFolder or 'fashion-mnist'")
    add_run_dir_arguments(parser, "output directory: model/ (the student), report.json, synthetic.png")
    parser.add_argument("--preset", default="cpu",
                        help="quick (seconds, a smoke run), cpu (minutes on 2 cores: 64 images, 120 QAT steps, "
                             "L_hd weight 1), cpu-long (about 3x cpu) or paper (the public code's settings: "
                             "10k images, 200 epochs, L_hd weight 10)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random draw")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any setting, e.g. --set synth_iters=500 (repeatable)")
    add_deprecated_alias(parser, "--val", "--data")
    add_deprecated_alias(parser, "--val-limit", "--limit", type=int)
    add_deprecated_alias(parser, "--batch-size", "--eval-batch-size", type=int)


def run(args) -> int:
    from maskaq.commands.common import in_process_group
    return in_process_group(_run, args)


def _run(args) -> int:
    from maskaq.quant import save_quantized
    from maskaq.quant.io import CONFIG_NAME
    from maskaq._files import write_json
    from maskaq.images import save_image_grid

    record, overrides = method_and_overrides(args)
    for flag, value in (("--limit", args.limit), ("--eval-batch-size", args.eval_batch_size)):
        if value is not None and value < 1:
            raise _cli_error(f"{flag} must be >= 1, got {value}")
    out = Path(args.out)
    checkpoint_dir = out / "checkpoint"
    check_run_dir(args, [out / "model" / CONFIG_NAME, out / "report.json"], checkpoint_dir)
    device = resolve_device(args.device)
    model = load_args_model(args, device)
    val = dataset_for_cli(args.data, model, "test", limit=args.limit, skip_bad_images=args.skip_bad_images)
    if record.images == "real":
        if args.train is None:
            raise _cli_error("--method real needs --train PATH (ImageFolder) or --train fashion-mnist")
        overrides["real_data"] = dataset_for_cli(args.train, model, "train", skip_bad_images=args.skip_bad_images,
                                                 flag="--train")
    try:
        config = build_config(args.method, args.preset, **overrides)
    except (ValueError, TypeError) as exc:
        raise _cli_error(str(exc)) from None
    rank, _ = dist_info()
    from maskaq.checkpoint import CheckpointMismatchError, CorruptCheckpointError, RunCheckpoint
    from maskaq.distill.guard import QATDiverged
    if args.overwrite:  # the stopped run it replaces would otherwise be refused, or resumed
        RunCheckpoint(checkpoint_dir, {}).remove()
    args._checkpoint_dir = checkpoint_dir  # from here on a stop says how to continue
    try:
        result = run_pipeline(model, args.wbits, args.abits, method=args.method, seed=args.seed, config=config,
                              checkpoint_dir=checkpoint_dir, resume=args.resume)
    except (FileExistsError, CheckpointMismatchError, CorruptCheckpointError) as exc:
        raise _cli_error(str(exc)) from None
    except QATDiverged as exc:
        raise _cli_error(f"{exc}. The run up to its last save is in {checkpoint_dir} "
                         "(--resume continues it with the same settings)") from None
    report = dict(result.report, preset=args.preset, model=args.model, checkpoint=args.checkpoint)
    try:
        # the student first: an evaluation that fails cannot take it with it
        if rank == 0:
            spec = describe_model(model)
            out.mkdir(parents=True, exist_ok=True)
            save_quantized(result.model, out / "model")
            grid = save_image_grid(result.images.images, spec.mean, spec.std, out / "synthetic.png")
        if val is not None:
            report["val"] = {"path": args.data, "limit": args.limit}
            report["val"]["quantized"] = evaluate_model(result.model, val, args.limit, args.eval_batch_size)
            report["val"]["full_precision"] = evaluate_model(model, val, args.limit, args.eval_batch_size)
        if rank == 0:
            report["files"] = {"model": str(out / "model"), "report": str(out / "report.json"), "grid": str(grid)}
            write_json(out / "report.json", report)
    except (OSError, ValueError) as exc:  # PIL's UnidentifiedImageError is an OSError
        from maskaq.cli import continue_note
        raise _cli_error(f"{str(exc).splitlines()[0] or type(exc).__name__}; {continue_note(args)}") from None
    if rank == 0:
        RunCheckpoint(checkpoint_dir, {}).remove()  # the results are written: the checkpoints go
        line = f"{args.method} W{args.wbits}A{args.abits}: done in {report['seconds']:.0f}s"
        if val is not None:
            line += (f"; top-1 {report['val']['quantized']['top1']:.2f}% "
                     f"(full precision {report['val']['full_precision']['top1']:.2f}%)")
        print(line)
        print(f"wrote {out / 'model'}, {out / 'report.json'}, {grid}")
        print(f"evaluate it with: maskaq eval {out / 'model'}" + (f" --data {args.data}" if args.data else ""))
    return 0
