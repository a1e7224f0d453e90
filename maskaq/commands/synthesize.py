"""Synthesize calibration images only (no QAT): tensors (safetensors), a PNG grid and a JSON report.

    maskaq synthesize --model vit_fmnist --method maskaq --wbits 4 --abits 4 --num-images 256 --out runs/images

MaskAQ puts a student quantized to --wbits/--abits (calibrated on noise) in the loop for the
masked attention alignment. With torchrun every rank synthesizes its share of the batches
(seeds depend only on --seed and the batch index) and rank 0 writes the files.

Every finished batch is checkpointed in OUT/batches (atomically, with a checksum and the run's
settings and teacher weights digest), and so is the batch in progress every --set
checkpoint_every_steps=N steps (default 100) or checkpoint_every_seconds=T (300): a run that was
killed or interrupted continues with the same arguments plus --resume (the message it stops with
spells the command out) and ends with the images an uninterrupted run makes. Without --resume a
directory holding such batches is refused, and so is one holding a finished run without
--overwrite; a damaged batch or one of a run with other settings is named in a one-line error
(exit 2). A finished run removes OUT/batches.

Synthesis runs the teacher and student passes in bfloat16 where the CPU multiplies it natively
(AMX or AVX512-BF16) and in float32 elsewhere, CUDA included: --set precision=auto, the default
(the report's precision says which ran); --set precision=fp32 or bf16 chooses one.
"""
from __future__ import annotations

import argparse
from pathlib import Path



def add_arguments(parser: argparse.ArgumentParser) -> None:
    from maskaq.commands.common import add_deprecated_alias, add_model_arguments, add_run_dir_arguments
    add_model_arguments(parser)
    from maskaq import methods
    parser.add_argument("--method", default="maskaq", help="one of " + ", ".join(methods.names(synthesizes=True)))
    parser.add_argument("--wbits", type=int, default=4, help="weight bits of the student in the loop (2-8)")
    parser.add_argument("--abits", type=int, default=4, help="activation bits of the student in the loop (2-8)")
    parser.add_argument("--num-images", type=int, default=None, help="number of images (none given: the preset's)")
    parser.add_argument("--synth-batch-size", type=int, default=None, metavar="N",
                        help="images optimized together (none given: the preset's)")
    parser.add_argument("--iters", type=int, default=None, help="optimization steps per batch (none given: the preset's)")
    parser.add_argument("--preset", default="cpu", help="quick, cpu, cpu-long or paper (the public code's sizes and steps)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random draw")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any synthesis setting, e.g. --set entropy_weight=0.5 (repeatable)")
    add_run_dir_arguments(parser, "output directory: images.safetensors, grid.png, report.json, and batches/ with "
                                  "every finished batch (checksummed) while the run lasts")
    add_deprecated_alias(parser, "--batch-size", "--synth-batch-size", type=int)


def run(args) -> int:
    from maskaq.commands.common import in_process_group
    return in_process_group(_run, args)


def _run(args) -> int:
    from maskaq.cli import CliError
    from maskaq.commands.common import check_run_dir, load_args_model, method_and_overrides, resolve_device
    from maskaq.pipeline import build_config
    from maskaq._files import CheckpointMismatchError, CorruptCheckpointError, write_json
    from maskaq.images import save_image_grid
    from maskaq.synthesis.io import save_synthetic_set
    from maskaq.spec import describe_model
    from maskaq.runtime import dist_info

    record, overrides = method_and_overrides(args, synthesizes=True)
    for flag, key in (("num_images", "num_images"), ("synth_batch_size", "synth_batch_size"), ("iters", "synth_iters")):
        value = getattr(args, flag)
        if value is not None:
            if value < 1:
                raise CliError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
            overrides[key] = value
    try:
        cfg = build_config(args.method, args.preset, **overrides)
    except (ValueError, TypeError) as exc:
        raise CliError(str(exc)) from None
    out = Path(args.out)
    check_run_dir(args, [out / "images.safetensors"], out / "batches")
    from maskaq.runtime import barrier
    barrier()  # every rank looked before any writes
    device = resolve_device(args.device)
    teacher = load_args_model(args, device)
    store = _batch_store(args, cfg, teacher)
    if args.overwrite:  # the stopped run it replaces would otherwise be read back
        store.remove()
    args._checkpoint_dir = store.directory  # from here on a stop says how to continue
    spec = describe_model(teacher)
    try:
        images = _make_images(args, cfg, record, teacher, spec, device, store)
    except (CorruptCheckpointError, CheckpointMismatchError) as exc:
        raise CliError(str(exc)) from None
    rank, _ = dist_info()
    if rank == 0:
        report = dict(images.report, method=args.method, model=args.model, seed=args.seed,
                      wbits=args.wbits, abits=args.abits, preset=args.preset, config=cfg.as_dict()["synthesis"])
        try:
            tensors = save_synthetic_set(images, out / "images.safetensors",
                                         {"method": args.method, "model": args.model, "seed": args.seed,
                                          "mean": list(spec.mean), "std": list(spec.std)})
            grid = save_image_grid(images.images, spec.mean, spec.std, out / "grid.png")
            write_json(out / "report.json", report)
        except OSError as exc:
            from maskaq.cli import continue_note
            raise CliError(f"{str(exc).splitlines()[0] or type(exc).__name__}; {continue_note(args)}") from None
        store.remove()  # the run is complete: its results replace the per-batch checkpoints
        print(f"{len(images)} {args.method} images in {images.report.get('seconds', 0.0):.1f}s "
              f"(NaN retries: {images.report.get('nan_retries', 0)}); wrote {tensors}, {grid}, {out / 'report.json'}")
    return 0


def _batch_store(args, cfg, teacher):
    """OUT/batches for this run, fingerprinted with everything that makes its images (the
    teacher's weights by their digest, so another model under the same name is refused)."""
    from maskaq._files import weights_digest
    from maskaq.synthesis.io import BatchStore
    fingerprint = {"model": args.model, "weights_sha256": weights_digest(teacher), "method": args.method,
                   "seed": args.seed, "wbits": args.wbits, "abits": args.abits,
                   "synthesis": cfg.as_dict()["synthesis"], "psaq": cfg.as_dict()["psaq"],
                   "calib_images": cfg.pipeline.calib_images, "act_init": cfg.pipeline.act_init}
    return BatchStore(Path(args.out) / "batches", fingerprint, cfg.pipeline.checkpoint_every_steps,
                      cfg.pipeline.checkpoint_every_seconds)


def _make_images(args, cfg, record, teacher, spec, device, store):
    from maskaq.synthesis.baselines import PsaqSynthesizer, gaussian_images
    from maskaq.synthesis.synthesizer import Synthesizer
    s = cfg.synthesis
    if record.images == "gaussian":
        images = gaussian_images(spec, s.num_images, args.seed)
    elif record.images == "psaq":
        images = PsaqSynthesizer(teacher, s, cfg.psaq).synthesize(s.num_images, args.seed, desc="psaq synthesis",
                                                                  store=store)
    else:
        student = None
        if record.student_in_loop(s):
            from maskaq.quant import calibrate, quantize_model
            student = quantize_model(teacher, args.wbits, args.abits).to(device)
            calibrate(student, gaussian_images(spec, cfg.pipeline.calib_images, args.seed, device=device).images,
                      init=cfg.pipeline.act_init)
        images = Synthesizer(teacher, s).synthesize(s.num_images, args.seed, student=student,
                                                    desc=f"{args.method} synthesis", store=store)
    return images
