"""Why synthetic images help QAT or not: evidence on a bundled teacher (--teacher).

For each data source (maskaq, mimiq, psaq, gaussian, real) on the preset's settings:

1. each synthesis loss term's share of the image gradient (maskaq and mimiq; norms of the
   weighted terms' gradients with respect to x, at the first, middle and last step);
2. image statistics against real images (pixel mean and std, share of near-black pixels,
   total variation per pixel, all in pixel space [0, 1]);
3. the teacher's confidence (mean top-1 probability) and class balance (entropy of its
   predicted classes, in bits; log2(10) = 3.32 is perfectly balanced) on the images;
4. QAT on the images (the preset's QAT, the pipeline's calibration) while tracking the KD loss and
   top-1 agreement with the teacher on 1,000 held-out real test images, every few steps,
   next to the same numbers for the PTQ start point; and at the start of QAT, on one batch of
   the images, the QAT loss terms (KD, L_hd) and the share of the weighted L_hd in the norm of
   the gradient over Q's parameters (`--set hd_weight=...` changes λ);
5. where MaskAQ's alignment mask falls on real images: the share of background patches (mean
   pixel < 0.05) among the top-k patches of the teacher's CLS-row logits (mean over blocks and
   heads, as L_align; k = ratio·N' for the mask's ratios 0.5 → 0.1), against their share of all
   patches, per block, and with the CLS row's softmax probabilities instead of its logits.

    python benchmarks/diagnose_dfq.py --bits W3A3 --seed 0         # about 10 minutes on 1 core
    python benchmarks/diagnose_dfq.py --quick                      # smoke run
    python benchmarks/diagnose_dfq.py --sources                    # real images only (2, 3, 5): seconds

Prints tables and writes JSON (default benchmarks/results/diagnose_dfq_<bits>.json).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

try:
    import maskaq  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).resolve().parent / "results"
SOURCES = ["real", "gaussian", "psaq", "mimiq", "maskaq"]


def parse_args(argv=None):
    from maskaq.cli import HelpFormatter  # the docstring as written, only real defaults
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--bits", default="W3A3")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", default="cpu")
    p.add_argument("--sources", nargs="*", default=SOURCES)
    p.add_argument("--held-out", type=int, default=1000, help="real test images for the KD curve")
    p.add_argument("--every", type=int, default=20, help="KD curve: evaluate every N QAT steps")
    p.add_argument("--quick", action="store_true", help="quick preset, 200 held-out images")
    p.add_argument("--teacher", default="vit_fmnist", help="zoo model name (default: the bundled teacher)")
    p.add_argument("--teacher-dir", default=None, help="read TEACHER.json/.safetensors from this directory")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="pipeline overrides")
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def pixel_stats(images: torch.Tensor, mean, std) -> dict:
    pixels = images * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)
    tv = ((pixels[..., 1:, :] - pixels[..., :-1, :]).abs().mean() + (pixels[..., 1:] - pixels[..., :-1]).abs().mean()) / 2
    return {"pixel_mean": float(pixels.mean()), "pixel_std": float(pixels.std()),
            "near_black": float((pixels < 0.05).float().mean()), "tv_per_pixel": float(tv)}


@torch.no_grad()
def teacher_view(teacher, images: torch.Tensor, num_classes: int) -> dict:
    probs = torch.cat([teacher(images[i:i + 256]).softmax(-1) for i in range(0, len(images), 256)])
    counts = torch.bincount(probs.argmax(-1), minlength=num_classes).float()
    share = counts / counts.sum()
    balance = abs(float(-(share[share > 0] * share[share > 0].log2()).sum()))
    return {"teacher_confidence": float(probs.max(-1).values.mean()), "class_balance_bits": balance,
            "largest_class_share": float(share.max())}


@torch.no_grad()
def agreement(teacher, student, images: torch.Tensor, temperature: float) -> dict:
    t, q = teacher(images), student(images)
    kd = F.kl_div(F.log_softmax(q / temperature, -1), F.softmax(t / temperature, -1),
                  reduction="batchmean") * temperature ** 2
    return {"kd": float(kd), "agree": float((t.argmax(-1) == q.argmax(-1)).float().mean())}


def gradient_shares(synth, student, seed: int) -> list:
    """Norm of each weighted loss term's image gradient at the first, middle and last step."""
    cfg, spec = synth.config, synth.spec
    weights = {"ce": cfg.ce_weight, "tv": cfg.tv_weight, "ssim": cfg.ssim_weight,
               "entropy": cfg.entropy_weight, "align": cfg.align_weight}
    checkpoints = sorted({0, cfg.synth_iters // 2, cfg.synth_iters - 1})
    rows = []

    def probe(attempt, step, x):
        if step not in checkpoints:
            return
        g = torch.Generator().manual_seed(seed + step)
        xd = x.detach().clone().requires_grad_(True)
        labels = torch.randint(0, spec.num_classes, (xd.shape[0],), generator=g)
        with torch.enable_grad():
            terms = synth.losses(xd, xd, labels, student, step, g)
            norms = {}
            for name, value in terms.items():
                if name == "total":
                    continue
                (grad,) = torch.autograd.grad(weights[name] * value, xd, retain_graph=True, allow_unused=True)
                norms[name] = 0.0 if grad is None else float(grad.norm())
        total = sum(norms.values()) or 1.0
        rows.append({"step": step, **{f"{k}_share": v / total for k, v in norms.items()},
                     **{f"{k}_grad_norm": v for k, v in norms.items()}})

    synth.on_step = probe  # runs inside synthesize_batch, where T and Q are frozen
    return rows, synth


def qat_loss_terms(trainer, images: torch.Tensor) -> dict:
    """KD, L_hd and their gradients' norms over Q's trainable parameters, on one batch (no augmentation)."""
    student, weight = trainer.student, trainer.config.hd_weight
    params = [p for p in student.parameters() if p.requires_grad]
    was = student.training
    student.train()
    out = trainer.step_loss(images, student)
    student.train(was)

    def grad_norm(loss):
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        return float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None)))

    kd = grad_norm(out["kd"])
    hd = grad_norm(out["hd"]) if "hd" in out else 0.0
    return {"hd_weight": weight, "kd": out["kd"].item(), "hd": out["hd"].item() if "hd" in out else 0.0,
            "kd_grad_norm": kd, "hd_grad_norm": hd,
            "hd_grad_share": weight * hd / (kd + weight * hd) if kd + weight * hd > 0 else 0.0}


def mask_focus(teacher, images: torch.Tensor, spec) -> dict:
    """Where the alignment mask falls on ``images`` (real): background share of its top-k patches."""
    from maskaq.quant import capture_attention
    with torch.no_grad(), capture_attention(teacher, logits=True, outputs=False) as cap:
        teacher(images)
    cls = torch.stack(list(cap.logits))[:, :, :, 0]  # (L, B, H, N) CLS rows over every key
    p = spec.num_prefix_tokens
    logits = cls[..., p:]  # (L, B, H, N') over the patches
    probs = torch.softmax(cls * teacher.blocks[0].attn.head_dim ** -0.5, -1)[..., p:]
    per_block = logits.mean(2)  # (L, B, N'): each block's head-mean CLS logits
    pixels = images * torch.tensor(spec.std).view(1, -1, 1, 1) + torch.tensor(spec.mean).view(1, -1, 1, 1)
    background = F.avg_pool2d(pixels.mean(1, keepdim=True), spec.patch_size).flatten(1) < 0.05  # (B, N')
    n = logits.shape[-1]

    def share(score, ratio):
        k = max(1, int(n * ratio))
        return float(background.gather(1, score.topk(k, dim=1).indices).float().mean())

    ratios = (0.5, 0.3, 0.1)
    return {"background_share_all": float(background.float().mean()),
            "mask_logits": {str(r): share(per_block.mean(0), r) for r in ratios},
            "mask_probs": {str(r): share(probs.mean(dim=(0, 2)), r) for r in ratios},
            "per_block_logits_r0.1": [share(block, 0.1) for block in per_block],
            "cls_logit_background_minus_object": [
                float(block[background].mean() - block[~background].mean()) for block in per_block]}


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    from maskaq import methods, zoo
    from maskaq.data import fashion_mnist
    from maskaq.distill.trainer import QATTrainer
    from maskaq.commands.common import collect_overrides
    from maskaq.pipeline import _calibration_batch, _data_source, build_config
    from maskaq.quant import calibrate, quantize_model
    from maskaq.synthesis.baselines import gaussian_images
    from maskaq._files import write_json
    from maskaq.spec import describe_model

    preset = "quick" if args.quick else args.preset
    held_n = 200 if args.quick else args.held_out
    wbits, abits = (int(v) for v in args.bits.upper()[1:].split("A"))
    teacher = zoo.load(args.teacher, directory=args.teacher_dir)
    spec = describe_model(teacher)
    test, train = fashion_mnist("test"), fashion_mnist("train")
    held = torch.stack([test[i][0] for i in range(len(test) - held_n, len(test))])  # the last N test images
    extra = collect_overrides(args.set)
    results = {"teacher": args.teacher, "bits": args.bits, "seed": args.seed, "preset": preset, "overrides": extra,
               "held_out": held_n, "sources": {}}
    real_sample = torch.stack([train[i][0] for i in range(512)])
    results["real_images"] = {**pixel_stats(real_sample, spec.mean, spec.std),
                              **teacher_view(teacher, real_sample, spec.num_classes)}
    results["mask_focus_real"] = mask_focus(teacher, real_sample, spec)

    for source in args.sources:
        started = time.perf_counter()
        overrides = {**extra, "progress": False}
        if source == "real":
            overrides["real_data"] = train
        cfg = build_config(source, preset, **overrides)
        student = quantize_model(teacher, wbits, abits)
        in_loop = methods.get(source).student_in_loop(cfg.synthesis)
        if in_loop:  # Q is in the synthesis loop: it needs ranges before any image exists
            calibrate(student, gaussian_images(spec, cfg.pipeline.calib_images, args.seed).images,
                      init=cfg.pipeline.act_init)
        entry = {}
        if methods.get(source).images == "synthesis":
            from maskaq.synthesis.synthesizer import Synthesizer
            synth = Synthesizer(teacher, cfg.synthesis, progress=False)
            rows, synth = gradient_shares(synth, student if in_loop else None, args.seed)
            data = synth.synthesize(cfg.synthesis.num_images, args.seed, student=student if in_loop else None)
            entry["gradient_shares"] = rows
        else:
            data = _data_source(source, teacher, spec, cfg, args.seed)(student, 0)
        entry.update(pixel_stats(data.images, spec.mean, spec.std))
        entry.update(teacher_view(teacher, data.images, spec.num_classes))
        # QAT from the start the pipeline uses (its calibration source, calib_data), tracking KD
        # and agreement on held-out real images.
        batch, _ = _calibration_batch(cfg.pipeline.calib_data, data, spec, cfg.pipeline.calib_images, args.seed, source)
        calibrate(student, batch, init=cfg.pipeline.act_init)
        curve = [{"step": 0, **agreement(teacher, student, held, cfg.qat.kd_temperature)}]
        probe = QATTrainer(teacher, student, cfg.qat, seed=args.seed, progress=False, spec=spec)
        entry["qat_loss_terms"] = qat_loss_terms(probe, data.images[:cfg.qat.qat_batch_size])
        original = QATTrainer.step_loss
        counter = {"n": 0}

        def tracked(self, images, model, _orig=original, _curve=curve, _counter=counter):
            out = _orig(self, images, model)
            _counter["n"] += 1
            if _counter["n"] % args.every == 0:
                was = model.training
                model.eval()
                _curve.append({"step": _counter["n"], **agreement(teacher, model, held, cfg.qat.kd_temperature)})
                model.train(was)
            return out

        QATTrainer.step_loss = tracked
        try:
            qat_cfg = dataclasses.replace(cfg.qat, refresh_every=0)  # one set: the one measured above
            trainer = QATTrainer(teacher, student, qat_cfg, lambda s, r, d=data: d, seed=args.seed, progress=False)
            trainer.fit()
        finally:
            QATTrainer.step_loss = original
        curve.append({"step": counter["n"], **agreement(teacher, student, held, cfg.qat.kd_temperature)})
        entry["held_out_curve"] = curve
        entry["seconds"] = time.perf_counter() - started
        results["sources"][source] = entry
        print(f"{source}: {entry['seconds']:.0f}s", flush=True)

    print_tables(results)
    stem = f"diagnose_dfq_{args.bits.upper()}" if args.sources else "diagnose_dfq_real_only"
    stem += "" if args.teacher == "vit_fmnist" else f"_{args.teacher}"
    path = Path(args.json) if args.json else RESULTS / f"{stem}{'_quick' if args.quick else ''}.json"
    write_json(path, results)
    print(f"wrote {path}")
    return 0


def print_tables(results) -> None:
    m = results["mask_focus_real"]
    print(f"\nWhere MaskAQ's alignment mask falls on 512 real images: share of background patches among the "
          f"top-k (all patches: {m['background_share_all']:.2f})")
    print("| mask from the CLS row's | r = 0.5 | r = 0.3 | r = 0.1 |")
    print("|---|---|---|---|")
    for key, name in (("mask_logits", "logits, mean of blocks and heads (MaskAQ)"),
                      ("mask_probs", "softmax probabilities, mean of blocks and heads")):
        print(f"| {name} | " + " | ".join(f"{m[key][r]:.2f}" for r in ("0.5", "0.3", "0.1")) + " |")
    print("| per block, logits, r = 0.1 | " + ", ".join(f"{v:.2f}" for v in m["per_block_logits_r0.1"]) + " | | |")
    print("| per block, mean CLS logit on background minus on object | "
          + ", ".join(f"{v:+.2f}" for v in m["cls_logit_background_minus_object"]) + " | | |")
    if not results["sources"]:
        return
    print(f"\nImages (pixel space) and the teacher's view of them, {results['bits']} seed {results['seed']}, "
          f"preset {results['preset']}")
    print("| images | pixel mean | pixel std | near-black | TV/pixel | teacher conf. | class balance (bits) | largest class |")
    print("|---|---|---|---|---|---|---|---|")
    rows = [("real (train)", results["real_images"])] + list(results["sources"].items())
    for name, e in rows:
        print(f"| {name} | {e['pixel_mean']:.3f} | {e['pixel_std']:.3f} | {e['near_black']:.2f} | "
              f"{e['tv_per_pixel']:.3f} | {e['teacher_confidence']:.2f} | {e['class_balance_bits']:.2f} | "
              f"{e['largest_class_share']:.2f} |")
    print("\nShare of the image gradient per synthesis loss term (weighted terms)")
    print("| source | step | ce | tv | ssim | entropy | align |")
    print("|---|---|---|---|---|---|---|")
    for name, e in results["sources"].items():
        for r in e.get("gradient_shares", []):
            cells = " | ".join(f"{r.get(k + '_share', 0.0):.2f}" for k in ("ce", "tv", "ssim", "entropy", "align"))
            print(f"| {name} | {r['step']} | {cells} |")
    print("\nQAT loss terms at the start of QAT (one batch of the images): values and the weighted L_hd's share "
          "of the gradient norm over Q's parameters")
    print("| source | λ | KD | L_hd | ‖∇KD‖ | ‖∇L_hd‖ | λ·L_hd share of the gradient |")
    print("|---|---|---|---|---|---|---|")
    for name, e in results["sources"].items():
        t = e.get("qat_loss_terms")
        if t:
            print(f"| {name} | {t['hd_weight']:g} | {t['kd']:.4f} | {t['hd']:.4f} | {t['kd_grad_norm']:.3g} | "
                  f"{t['hd_grad_norm']:.3g} | {100 * t['hd_grad_share']:.0f}% |")
    print(f"\nKD loss / top-1 agreement with the teacher on {results['held_out']} held-out real images during QAT")
    print("| source | start (PTQ) | middle | end |")
    print("|---|---|---|---|")
    for name, e in results["sources"].items():
        c = e["held_out_curve"]
        mid = c[len(c) // 2]
        fmt = lambda p: f"{p['kd']:.3f} / {100 * p['agree']:.1f}%"  # noqa: E731
        print(f"| {name} | {fmt(c[0])} | {fmt(mid)} (step {mid['step']}) | {fmt(c[-1])} |")


if __name__ == "__main__":
    sys.exit(main())
