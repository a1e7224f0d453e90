"""Synthetic calibration images for data-free quantization: MaskAQ and the baselines."""
from maskaq.synthesis.baselines import PsaqConfig, PsaqSynthesizer, gaussian_images, real_images
from maskaq.spec import ModelSpec, describe_model
from maskaq.synthesis.synthesizer import SynthesisConfig, Synthesizer
# Re-exported because the images a Synthesizer makes come back in it; it lives in maskaq.images.
from maskaq.images import SyntheticSet

__all__ = ["SynthesisConfig", "SyntheticSet", "Synthesizer", "PsaqConfig", "PsaqSynthesizer",
           "gaussian_images", "real_images", "ModelSpec", "describe_model"]
