"""Fake-quant students of timm ViT / DeiT / Swin (docs/method.md#the-quantizer).

    qmodel = quantize_model(teacher, wbits=4, abits=4)   # deep copy; teacher untouched
    calibrate(qmodel, images)                           # LSQ init from one batch, no_grad
    with capture_attention(qmodel) as cap:              # per-block logits and outputs
        qmodel(images)
    save_quantized(qmodel, "out/w4a4"); load_quantized("out/w4a4", teacher)
"""
from maskaq.quant.capture import AttentionCapture, capture_attention, checkpointed_blocks
from maskaq.quant.convert import activation_quantizers, calibrate, is_quantized, quant_config, quantize_model
from maskaq.quant.io import load_quantized, save_quantized
from maskaq.quant.modules import QuantAttention, QuantConv2d, QuantLinear, QuantWindowAttention, cached_weights
from maskaq.quant.quantizers import LsqActQuantizer, WeightQuantizer, check_bits, lsq_fake_quant

__all__ = [
    "quantize_model",
    "calibrate",
    "capture_attention",
    "checkpointed_blocks",
    "cached_weights",
    "AttentionCapture",
    "save_quantized",
    "load_quantized",
    "is_quantized",
    "quant_config",
    "activation_quantizers",
    "QuantLinear",
    "QuantConv2d",
    "QuantAttention",
    "QuantWindowAttention",
    "LsqActQuantizer",
    "WeightQuantizer",
    "check_bits",
    "lsq_fake_quant",
]
