"""maskaq: data-free quantization of Vision Transformers (MaskAQ) with fused C++/CUDA kernels.

    import maskaq
    teacher = maskaq.zoo.load("vit_fmnist_outliers")
    qmodel = maskaq.quantize(teacher, wbits=4, abits=4, method="maskaq")   # synthesize + distill
    maskaq.evaluate(qmodel, maskaq.data.fashion_mnist("test"))             # {"top1": ..., "top5": ...}
    imodel = maskaq.export_integer(qmodel)                                   # integer kernels
"""
import importlib

from maskaq._extension import __version__, extension_info
from maskaq import ops, reference
from maskaq.ops import fq_attention, masked_attention_align, patch_similarity_entropy
from maskaq.evaluation import evaluate

# Public names served lazily (they pull in timm): name -> module that defines it.
_LAZY = {
    "quantize_model": "maskaq.quant",
    "calibrate": "maskaq.quant",
    "capture_attention": "maskaq.quant",
    "save_quantized": "maskaq.quant",
    "load_quantized": "maskaq.quant",
    "quantize": "maskaq.pipeline",
    "Synthesizer": "maskaq.synthesis",
    "SynthesisConfig": "maskaq.synthesis",
    "QATTrainer": "maskaq.distill",
    "QATConfig": "maskaq.distill",
    "export_integer": "maskaq.integer",
    "save_integer": "maskaq.integer",
    "load_integer": "maskaq.integer",
    "export_onnx": "maskaq.integer.qdq",
}
_SUBPACKAGES = ("data", "zoo", "quant", "synthesis", "distill", "integer", "pipeline")


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif name in _SUBPACKAGES:
        value = importlib.import_module(f"maskaq.{name}")
    else:
        raise AttributeError(f"module 'maskaq' has no attribute {name!r}")
    globals()[name] = value
    return value


__all__ = ["__version__", "extension_info", "ops", "reference", "fq_attention", "patch_similarity_entropy",
           "masked_attention_align", "evaluate", *_LAZY, *_SUBPACKAGES]
