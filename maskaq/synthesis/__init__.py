"""Synthetic calibration images for data-free quantization: MaskAQ and the baselines."""
from maskaq.synthesis.baselines import PsaqConfig, PsaqSynthesizer, gaussian_images, real_images
from maskaq.spec import ModelSpec, describe_model
from maskaq.synthesis.synthesizer import SynthesisConfig, SyntheticSet, Synthesizer

__all__ = ["SynthesisConfig", "SyntheticSet", "Synthesizer", "PsaqConfig", "PsaqSynthesizer",
           "gaussian_images", "real_images", "ModelSpec", "describe_model"]
