"""maskaq: data-free quantization of Vision Transformers (MaskAQ) with fused C++/CUDA kernels."""
from maskaq._extension import __version__, extension_info
from maskaq import ops, reference

__all__ = ["__version__", "extension_info", "ops", "reference"]
