"""The data-free quantization methods: one record each (docs/method.md#baselines).

A method says where QAT's images come from (``images``), which settings it changes over the
preset (``settings``: keys of the pipeline's config sections), and so whether the student Q is in
the synthesis loop. The pipeline, ``maskaq synthesize``, the demo and the benchmarks read this
table; adding a method is one record here (plus its image source if it is a new kind).
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Mapping, Tuple

__all__ = ["Method", "METHODS", "get", "names", "did_you_mean", "IMAGE_SOURCES"]

# Where a method's images come from:
#   synthesis: maskaq.synthesis.Synthesizer (MaskAQ's losses, switched by the settings)
#   psaq:      maskaq.synthesis.PsaqSynthesizer
#   gaussian:  fresh N(0, 1) noise for every QAT batch
#   real:      real training images (the upper bound; needs data)
#   none:      no QAT at all (calibration only)
IMAGE_SOURCES = ("synthesis", "psaq", "gaussian", "real", "none")


@dataclass(frozen=True)
class Method:
    name: str
    images: str
    summary: str
    settings: Mapping[str, Any] = field(default_factory=dict)

    def student_in_loop(self, synthesis) -> bool:
        """Whether synthesis runs Q (MaskAQ's alignment term needs it), for a SynthesisConfig."""
        return self.images == "synthesis" and synthesis.use_alignment and synthesis.align_weight > 0

    @property
    def synthesizes(self) -> bool:
        """Whether `maskaq synthesize` can make this method's images (no data, and some images)."""
        return self.images in ("synthesis", "psaq", "gaussian")


_NO_REFRESH = {"refresh_every": 0}

# Table order (accuracy_dfq prints rows in this order).
METHODS: Dict[str, Method] = {m.name: m for m in (
    Method("ptq", "none", "the floor: min-max calibration on noise, no QAT", {**_NO_REFRESH, "act_init": "minmax"}),
    # the public code: fresh noise for every batch and unmasked L_hd
    Method("gaussian", "gaussian", "QAT on Gaussian noise", {**_NO_REFRESH, "hd_mask": False}),
    Method("maskaq", "synthesis", "MaskAQ as the paper and its public code run it"),
    # this package's variant (docs/method.md#baselines): MaskAQ from a dark, low-contrast canvas, with
    # Q's activation ranges calibrated on noise (as ptq's) instead of on the first synthetic images,
    # and its post-LayerNorm outlier channels narrowed before quantization (maskaq.quant.reparam)
    Method("maskaq+", "synthesis", "MaskAQ from a dark canvas, calibrated on noise, outlier channels "
           "equalized (this package's variant)",
           {"init_pixel": 0.0, "init_std": 0.2, "calib_data": "noise", "equalize_ln_ratio": 2.0}),
    Method("real", "real", "QAT on real training images (the upper bound)", _NO_REFRESH),
    Method("mimiq", "synthesis", "MimiQ: MaskAQ without L_ent, L_align, refreshing and the L_hd mask",
           {"use_entropy": False, "use_alignment": False, "refresh_every": 0, "hd_mask": False}),
    Method("psaq", "psaq", "PSAQ-ViT's patch-similarity synthesis", _NO_REFRESH),
    Method("maskaq-no-entropy", "synthesis", "MaskAQ without L_ent", {"use_entropy": False}),
    Method("maskaq-no-align", "synthesis", "MaskAQ without L_align (Q out of the loop)", {"use_alignment": False}),
    Method("maskaq-no-refresh", "synthesis", "MaskAQ without sample refreshing", _NO_REFRESH),
    Method("maskaq-no-hdmask", "synthesis", "MaskAQ with unmasked head distillation", {"hd_mask": False}),
)}
assert all(m.images in IMAGE_SOURCES for m in METHODS.values())


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest of ``choices``, or ''."""
    close = difflib.get_close_matches(str(name), list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def names(*, synthesizes: bool = False) -> Tuple[str, ...]:
    """Every method name in table order (only those `maskaq synthesize` can make with synthesizes=True)."""
    return tuple(n for n, m in METHODS.items() if m.synthesizes or not synthesizes)


def get(name: str, *, synthesizes: bool = False) -> Method:
    """The method called ``name``; ValueError naming the choices (and the closest) otherwise."""
    choices = names(synthesizes=synthesizes)
    if name not in choices:
        raise ValueError(f"unknown method {name!r}{did_you_mean(name, choices)}; choose one of {', '.join(choices)}")
    return METHODS[name]
