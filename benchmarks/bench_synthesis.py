"""Synthesis throughput: one MaskAQ step with the fused ops vs the public code's per-sample loops
vs the bare model passes.

For random-init timm models (teacher T and its W4A4 student Q), per step:
  fused       the maskaq step of maskaq.synthesis (T and Q forward + backward, every loss, the
              entropy and alignment through maskaq.ops)
  loop        the same step with the entropy and alignment losses in plain PyTorch with
              per-sample Python loops, as in the public code (benchmarks/loop_baselines.py)
  model_only  T and Q forward + backward with cross-entropy only: the floor for any step
              with this student (its fake-quant weights computed once, as synthesis does)
  float_pair  T and T forward + backward with cross-entropy only: two float passes of the same
              ViT, the limit at this precision (a student as cheap as its teacher)

CPU: deit_tiny_patch16_224 at batch 8 with 2 threads (`--cpu-models` adds others, e.g.
vit_base_patch16_224). GPU (when present): deit_small_patch16_224
and vit_base_patch16_224 at batch 128. Prints a table with ratios; `--json PATH` writes records
{"model", "device", "batch", "precision", "impl", "s_per_step"}; `--precision fp32 bf16` times both.

Targets: fused <= 1.1x model_only <= 1.15x float_pair; fused >= 2x faster than loop on CPU,
>= 3x on GPU.

`--memory`: the peak memory of one fused synthesis step (T and Q forward and backward, every
loss) per model (deit_small, vit_base, vit_large at 224, random weights). On the CPU each point
(batches 1, 2, 4, 8) runs in a subprocess of its own and reports its peak RSS growth over the
RSS it had before the step (models, images and optimizer state already built); on CUDA,
`max_memory_allocated` during the step at larger batches. A least-squares line through the
points gives the memory per image (its slope) and the largest batch whose step fits in 40 and
80 GB next to the weights of T and Q. Each model is measured without and with
`checkpoint_blocks` (activation checkpointing per transformer block; `--checkpointing`) and in
float32 and bf16 (`precision`, autocast for the T and Q passes; `--precision`). Records: {"model", "device", "impl", "precision",
"checkpointing", "batch", "peak_mb", "mb_per_image", "s_per_step"} with mb_per_image the
fitted slope of the series. A point whose predicted peak exceeds the memory this machine has
available is skipped and said so.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

try:
    import maskaq  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

IMPLS = ("fused", "loop", "model_only", "float_pair")
# wall: time.perf_counter (what the issue asks for). cpu: this process's CPU time
# (time.process_time), a steadier measure of the work on a machine shared with other jobs;
# use it with --threads 1 (with more threads it adds up the threads' time).
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = time.perf_counter


def loop_ops():
    """An `ops`-like namespace with the loop formulations of the entropy, alignment and SSIM losses."""
    import loop_baselines as lb
    return types.SimpleNamespace(patch_similarity_entropy=lb.patch_similarity_entropy_loop,
                                 masked_attention_align=lb.masked_attention_align_loop,
                                 inter_head_ssim_loss=lb.inter_head_ssim_loss_loop)


def build(model_name: str, batch: int, device: torch.device):
    import timm

    from maskaq.quant import calibrate, quantize_model
    torch.manual_seed(0)
    teacher = timm.create_model(model_name, pretrained=False).to(device).eval()
    student = quantize_model(teacher, 4, 4).to(device)
    calibrate(student, torch.randn(batch, 3, 224, 224, device=device))
    return teacher, student


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_synthesis(teacher, student, impl: str, batch: int, steps: int, warmup: int, device,
                   precision: str = "fp32") -> float:
    """Seconds per step of `impl` (median of per-step times after `warmup` steps); `precision` of the
    T and Q passes as SynthesisConfig.precision (bf16: autocast)."""
    from maskaq.synthesis.synthesizer import SynthesisConfig, Synthesizer
    total = warmup + steps
    if impl in ("model_only", "float_pair"):
        return _time_model_only(teacher, student if impl == "model_only" else teacher, batch, warmup, steps, device,
                                precision)
    ops = loop_ops() if impl == "loop" else None
    times = []
    last = [None]

    def on_step(attempt, step, x):
        _sync(device)
        now = clock()
        if last[0] is not None:
            times.append(now - last[0])
        last[0] = now

    cfg = SynthesisConfig(num_images=batch, synth_batch_size=batch, synth_iters=total + 1, precision=precision)
    synth = Synthesizer(teacher, cfg, ops=ops, progress=False, on_step=on_step)
    synth.synthesize_batch(seed=0, student=student)
    measured = sorted(times[warmup:])
    return measured[len(measured) // 2]


def _time_model_only(teacher, student, batch, warmup, steps, device, precision="fp32") -> float:
    import contextlib

    from maskaq.quant import cached_weights
    from maskaq.runtime import frozen
    from maskaq.synthesis.synthesizer import PRECISIONS
    x = torch.randn(batch, 3, 224, 224, device=device, requires_grad=True)
    y = torch.randint(0, teacher.num_classes, (batch,), device=device)
    opt = torch.optim.AdamW([x], lr=0.1)
    times = []
    with frozen(teacher, student), cached_weights(student):
        for i in range(warmup + steps):
            _sync(device)
            t0 = clock()
            opt.zero_grad(set_to_none=True)
            dtype = PRECISIONS[precision]
            with torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext():
                logits = teacher(x), student(x)
            loss = F.cross_entropy(logits[0].float(), y) + F.cross_entropy(logits[1].float(), y)
            loss.backward()
            opt.step()
            _sync(device)
            if i >= warmup:
                times.append(clock() - t0)
    times.sort()
    return times[len(times) // 2]


# --------------------------------------------------------------------------------------
# --memory

MEMORY_MODELS = ("deit_small_patch16_224", "vit_base_patch16_224", "vit_large_patch16_224")
CPU_MEMORY_BATCHES = (1, 2, 4, 8)
CUDA_MEMORY_BATCHES = (8, 16, 32, 64)
GPU_CAPACITIES_GB = (40, 80)
MB = 2 ** 20


def _rss_mb(field: str = "VmRSS") -> float:
    """This process's resident set now ("VmRSS") or its peak so far ("VmHWM"), in MB."""
    from maskaq.integer.latency import rss_kb
    return (rss_kb(field) or 0) / 1024


def _available_mb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return float("inf")


def measure_memory_point(model_name: str, batch: int, device: torch.device, checkpointing: bool = False,
                         precision: str = "fp32") -> dict:
    """Peak memory over the first two fused synthesis steps at `batch`, above what the process
    held before them (the first step is measured: after it the allocator keeps freed memory,
    which would hide a second step's growth on the CPU); the time of the second step."""
    from maskaq.synthesis.synthesizer import SynthesisConfig, Synthesizer
    teacher, student = build(model_name, batch, device)
    weights_mb = sum(t.numel() * t.element_size() for m in (teacher, student)
                     for t in list(m.parameters()) + list(m.buffers())) / MB
    marks = {}

    def on_step(attempt, step, x):
        _sync(device)
        marks[step] = time.perf_counter()

    cfg = SynthesisConfig(num_images=batch, synth_batch_size=batch, synth_iters=2, checkpoint_blocks=checkpointing,
                          precision=precision)
    synth = Synthesizer(teacher, cfg, progress=False, on_step=on_step)
    _sync(device)
    if device.type == "cpu":
        base, peak_before = _rss_mb(), _rss_mb("VmHWM")
    else:
        torch.cuda.reset_peak_memory_stats(device)
        base, peak_before = torch.cuda.memory_allocated(device) / MB, 0.0
    synth.synthesize_batch(seed=0, student=student)
    peak = _rss_mb("VmHWM") if device.type == "cpu" else torch.cuda.max_memory_allocated(device) / MB
    return {"model": model_name, "device": device.type, "impl": "fused", "precision": precision,
            "checkpointing": bool(checkpointing), "batch": batch, "peak_mb": peak - base, "s_per_step": marks[1] - marks[0],
            "weights_mb": weights_mb,
            # True when the process had peaked higher before the step (building the models): the
            # step's own peak is then at most peak_mb, not exactly it.
            "peak_hidden": bool(peak <= peak_before)}


def _memory_point_in_subprocess(model_name: str, batch: int, threads: int, checkpointing: bool,
                                precision: str) -> dict:
    """One CPU point in a fresh process, so that no earlier allocation hides its peak."""
    cmd = [sys.executable, __file__, "--memory-point", model_name, str(batch), "yes" if checkpointing else "no",
           precision, "--threads", str(threads)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"memory point {model_name} batch {batch} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def fit_line(xs, ys):
    """Least-squares (intercept, slope) of ys on xs."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx > 0 else 0.0
    return my - slope * mx, slope


def largest_batch(capacity_gb: float, intercept_mb: float, slope_mb: float, weights_mb: float) -> int:
    """The largest batch whose step (fitted line) plus the weights of T and Q fit in capacity_gb."""
    room = capacity_gb * 1024 - weights_mb - intercept_mb
    return max(0, int(room // slope_mb)) if slope_mb > 0 else 0


def run_memory(devices, models, threads: int, checkpointing=(False, True), precisions=("fp32",)) -> list:
    records = []
    for dev in devices:
        device = torch.device(dev)
        batches = CPU_MEMORY_BATCHES if device.type == "cpu" else CUDA_MEMORY_BATCHES
        for model_name, ckpt, precision in ((m, c, p) for m in models for p in precisions for c in checkpointing):
            series = []
            for batch in batches:
                if len(series) >= 2:  # skip a point the machine cannot hold
                    a, b = fit_line([r["batch"] for r in series], [r["peak_mb"] for r in series])
                    need = a + b * batch + series[-1]["weights_mb"] * 2
                    if need > 0.8 * _available_mb():
                        print(f"  {model_name} {dev} b{batch}: skipped (needs ~{need / 1024:.1f} GB, "
                              f"{_available_mb() / 1024:.1f} GB available)", flush=True)
                        continue
                if device.type == "cpu":
                    r = _memory_point_in_subprocess(model_name, batch, threads, ckpt, precision)
                else:
                    r = measure_memory_point(model_name, batch, device, ckpt, precision)
                    torch.cuda.empty_cache()
                series.append(r)
                print(f"  {model_name:<24s} {dev:<5s} {precision} {'ckpt ' if ckpt else ''}b{batch:<4d} peak {r['peak_mb']:9.1f} MB  "
                      f"{r['s_per_step']:7.2f} s/step", flush=True)
            intercept, slope = fit_line([r["batch"] for r in series], [r["peak_mb"] for r in series])
            for r in series:
                r["mb_per_image"] = slope
                r["fit_intercept_mb"] = intercept
            records += series
    return records


def print_memory_table(records) -> None:
    print()
    print("| model | device | precision | checkpointing | batch | peak MB | s/step |")
    print("|---|---|---|---|---|---|---|")
    for r in records:
        print(f"| {r['model']} | {r['device']} | {r['precision']} | {'yes' if r['checkpointing'] else 'no'} | "
              f"{r['batch']} | {r['peak_mb']:.0f} | {r['s_per_step']:.2f} |")
    print()
    caps = " | ".join(f"largest batch in {c} GB" for c in GPU_CAPACITIES_GB)
    print(f"| model | device | precision | checkpointing | MB per image (fit) | intercept MB | weights T+Q MB | {caps} |")
    print("|---|---|---|---|---|---|---|" + "---|" * len(GPU_CAPACITIES_GB))
    seen = set()
    for r in records:
        key = (r["model"], r["device"], r["precision"], r["checkpointing"])
        if key in seen:
            continue
        seen.add(key)
        fits = " | ".join(str(largest_batch(c, r["fit_intercept_mb"], r["mb_per_image"], r["weights_mb"]))
                          for c in GPU_CAPACITIES_GB)
        print(f"| {r['model']} | {r['device']} | {r['precision']} | {'yes' if r['checkpointing'] else 'no'} | "
              f"{r['mb_per_image']:.0f} | {r['fit_intercept_mb']:.0f} | {r['weights_mb']:.0f} | {fits} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cpu, and cuda too when present)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads")
    p.add_argument("--steps", type=int, default=5, help="timed steps per measurement (median)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=1,
                   help="time the implementations this many times in turn, each round after the other "
                        "(a slow spell of the machine then reaches all of them alike); s/step is the "
                        "median of the rounds' medians")
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    p.add_argument("--cpu-models", nargs="+", default=["deit_tiny_patch16_224"],
                   help="timm models timed on the CPU, at batch 8 (default: %(default)s)")
    p.add_argument("--json", default=None, help="write the records here")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                   help="wall time, or this process's CPU time (steadier on a shared machine; use --threads 1)")
    p.add_argument("--memory", action="store_true",
                   help="peak memory of one synthesis step per image instead of the timing table")
    p.add_argument("--models", nargs="+", default=list(MEMORY_MODELS), help="models for --memory")
    p.add_argument("--checkpointing", choices=("no", "yes", "both"), default="both",
                   help="--memory: without and/or with checkpoint_blocks (activation checkpointing per block)")
    p.add_argument("--precision", nargs="+", choices=("fp32", "bf16"), default=None,
                   help="precisions of the T and Q passes (SynthesisConfig.precision): of the timed steps "
                        "(default fp32) and of --memory's points (default fp32 and bf16)")
    p.add_argument("--memory-point", nargs=4, metavar=("MODEL", "BATCH", "CHECKPOINTING", "PRECISION"),
                   help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rounds < 1 or args.steps < 1 or args.warmup < 0:
        p.error("--rounds and --steps must be >= 1 and --warmup >= 0")
    if args.memory_point:  # one CPU point, in the subprocess run_memory started
        torch.set_num_threads(args.threads)
        record = measure_memory_point(args.memory_point[0], int(args.memory_point[1]), torch.device("cpu"),
                                      args.memory_point[2] == "yes", args.memory_point[3])
        print(json.dumps(record))
        return 0
    if args.memory:
        torch.set_num_threads(args.threads)
        devices = [args.device] if args.device else (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
        checkpointing = {"no": (False,), "yes": (True,), "both": (False, True)}[args.checkpointing]
        records = run_memory(devices, args.models, args.threads, checkpointing,
                             tuple(args.precision or ("fp32", "bf16")))
        print_memory_table(records)
        if args.json:
            from maskaq._files import write_json
            print(f"wrote {write_json(args.json, records)}")
        return 0
    global clock
    clock = CLOCKS[args.clock]
    torch.set_num_threads(args.threads)
    from maskaq import extension_info
    devices = [args.device] if args.device else (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    plan = []
    for dev in devices:
        if dev == "cpu":
            plan += [(name, 8, torch.device("cpu")) for name in args.cpu_models]
        else:
            plan += [("deit_small_patch16_224", 128, torch.device(dev)), ("vit_base_patch16_224", 128, torch.device(dev))]
    info = extension_info()
    print(f"maskaq extension loaded: {info['loaded']} (cuda {info['with_cuda']}); torch threads {args.threads}; "
          f"clock {args.clock}")
    records = []
    for model_name, batch, device in plan:
        teacher, student = build(model_name, batch, device)
        for precision in args.precision or ("fp32",):
            rounds = {impl: [] for impl in args.impls}
            for r in range(args.rounds):
                for impl in args.impls:
                    s = time_synthesis(teacher, student, impl, batch, args.steps, args.warmup, device, precision)
                    rounds[impl].append(s)
                    print(f"  {model_name:<24s} {device.type:<5s} b{batch:<4d} {precision} {impl:<11s} "
                          f"{s:8.4f} s/step" + (f"  (round {r + 1}/{args.rounds})" if args.rounds > 1 else ""),
                          flush=True)
            for impl, times in rounds.items():
                records.append({"model": model_name, "device": device.type, "batch": batch, "precision": precision,
                                "impl": impl, "s_per_step": statistics.median(times), "s_per_round": times})
        del teacher, student
    print()
    # "losses: loop / fused" compares the time the losses add on top of the bare model passes,
    # (loop − model_only) / (fused − model_only): what the fused ops change, without the model
    # passes that both pay.
    print("| model | device | batch | precision | impl | s/step | images·steps/s | vs model_only | vs float_pair "
          "| loop / fused | losses: loop / fused |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in records:
        same = {q["impl"]: q["s_per_step"] for q in records
                if (q["model"], q["device"], q["precision"]) == (r["model"], r["device"], r["precision"])}
        vs_model = f"{r['s_per_step'] / same['model_only']:.2f}x" if "model_only" in same else "—"
        vs_pair = f"{r['s_per_step'] / same['float_pair']:.2f}x" if "float_pair" in same else "—"
        is_fused = r["impl"] == "fused" and "loop" in same
        loop_fused = f"{same['loop'] / same['fused']:.2f}x" if is_fused else ""
        losses = ""
        if is_fused and "model_only" in same and same["fused"] > same["model_only"]:
            losses = f"{(same['loop'] - same['model_only']) / (same['fused'] - same['model_only']):.2f}x"
        print(f"| {r['model']} | {r['device']} | {r['batch']} | {r['precision']} | {r['impl']} | "
              f"{r['s_per_step']:.4f} | "
              f"{r['batch'] / r['s_per_step']:.1f} | {vs_model} | {vs_pair} | {loop_fused} | {losses} |")
    if args.json:
        from maskaq._files import write_json
        print(f"wrote {write_json(args.json, records)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
