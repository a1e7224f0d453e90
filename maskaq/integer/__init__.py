"""Integer inference: export a calibrated fake-quant student to integer kernels (CPU: fbgemm /
oneDNN int8 GEMMs through torch's quantized ops; CUDA: torch._int_mm), save/load it, and
benchmark it (maskaq/integer/latency.py; ``maskaq bench``, maskaq/commands/bench.py)."""
from maskaq.integer.export import export_integer, is_integer, load_integer, save_integer
from maskaq.integer.modules import (KERNELS, ActGrid, IntAttention, IntConv2d, IntLinear, IntMlp, cpu_integer_path,
                                    set_kernel)

__all__ = ["export_integer", "save_integer", "load_integer", "is_integer", "IntLinear", "IntAttention",
           "IntConv2d", "IntMlp", "ActGrid", "KERNELS", "set_kernel", "cpu_integer_path"]
