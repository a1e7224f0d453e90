"""Integer modules of an exported maskaq student.

Notation (the fake-quant student, maskaq.quant): an activation quantizer with step α, integer
zero point z = round(zero_point) and range [qmin, qmax] maps x to the integer
q = clamp(round(x/α + z), qmin, qmax) and the value x̂ = (q − z)·α. A weight quantizer stores
per-output-channel integers W_q in [-2^(b-1), 2^(b-1)-1] with steps s_w (zero point 0).

* ``IntLinear``: y = α·s_w·(X_q·W_qᵀ − z_x·ΣW_q) + b as one library call with prepacked
  per-channel int8 weights; the zero point is folded into the kernel's row-offset term and the
  dequantize + bias (+ GELU, + requantize) run in the kernel's epilogue.
  The LSQ grid maps exactly onto uint8: u = q − qmin ∈ [0, qmax − qmin] with zero point
  z − qmin, so signed [-128, 127] and unsigned [0, 255] 8-bit grids are both the full uint8
  range; grids of fewer than 8 bits clamp the float input to the grid's range first.
  - CPU, kernel "onednn" (default; measured faster than fbgemm on an AMX/AVX512-VNNI machine):
    ``onednn::qlinear_pointwise`` on uint8 activations produced by one vectorized
    ``quantize_per_tensor`` pass (its bytes read in place as uint8, no copy), float32 output.
  - CPU, kernel "fbgemm": ``quantized::linear_with_input_q_dq_qweight_dq_output_fp32`` (the float
    input is quantized inside the op).
  - CPUs without VNNI (AVX2-only x86, AVX512 before Cascade Lake): both libraries multiply u8·s8
    with ``vpmaddubsw``, which adds adjacent products into int16 with saturation, so 8-bit weights
    against 8-bit activations (255·127·2 > 32767) would give wrong accumulators. A probe GEMM
    (``cpu_int8_pairs_saturate``) detects this once per process; such layers then run maskaq's own
    GEMM (``maskaq.ops.int8_gemm``: both operands widened to int16, ``vpmaddwd`` adds each pair of
    products in int32; dequantize and bias on each finished tile): exact; the MLP runs unfused there.
    Where ATen's CPU capability is below AVX2 they run the library on split weights instead,
    W = 2·W_hi + W_lo (|W_hi| ≤ 64, W_lo ∈ {0, 1}) stacked in one GEMM of twice the width: exact,
    at twice the GEMM work, without the fused MLP epilogue. Layers whose operands cannot overflow
    a pair (weights of ≤ 7 bits, activations of ≤ 7 bits) run as on VNNI. ``cpu_integer_path()``
    says which path this machine takes, ``IntLinear.cpu_gemm`` which one a layer takes.
  - CUDA: cuBLASLt int8 GEMM (``torch._int_mm``) on int8 activations s = q − qmin − 128, then
    maskaq's fused epilogue kernel (``maskaq.ops.int8_linear_epilogue``: dequantize, bias,
    optional GELU and requantization in one pass over the int32 accumulators).
  - Weights of <= 4 bits are kept as int8 in memory (no x86 int4×int8 GEMM kernel exists in
    torch: the int8 kernel runs them), and packed two per byte by ``save_integer``.
* ``IntMlp``: fc1 → GELU → fc2 with GELU and the requantization to fc2's grid in fc1's epilogue
  (CPU: oneDNN's, fc1 writes uint8; CUDA: maskaq's, fc1 writes fc2's int8): no float hidden
  activation, no separate GELU or quantize pass.
* ``IntAttention``: timm ViT attention. qkv's epilogue is folded so that it directly yields
  q/α (per slice), so the integer q, k, v are one round + one clamp of its output; the two
  products run on those integers (float32 arithmetic, exact while the sums stay below 2^24 —
  true for 8-bit operands and head dims up to 64 with N ≤ 197; beyond that the error is one
  float rounding); the 1/(α_p·α_v) of the second product is folded into proj's input scale.
  On CPU with several threads, or where its products run on an integer GEMM, it runs
  ``maskaq.ops.int8_attention`` (below; when folded, ``maskaq.ops.qkv_int8_attention``, which also
  rounds and packs q, k, v from qkv's output and writes O in proj's layout), whose CPU kernel splits
  the (sample, head) slices over the threads and multiplies on oneDNN's int8 GEMM (CPUs with
  AVX512-VNNI), maskaq's int16 GEMM (AVX2) or float BLAS; otherwise it loops over the samples so that bmm reads q, k, v in place (no int8
  copies) and writes O in the layout proj reads (the same integers either way). On CUDA both products run on int8 tensor cores in one maskaq kernel
  (``maskaq.ops.int8_attention``: exact int32 products, the softmax and P's quantization between
  them); q, k, v whose centred grid does not fit int8 are passed shifted, with a zero point.
* Without the extension's CUDA kernels (``maskaq.extension_info()["with_cuda"]`` False) the CUDA
  path warns once and runs the plain-PyTorch epilogue and float32 attention products instead.
  The CUDA kernels are compiled in CI but have not yet run on a GPU (tests/test_int_ops.py holds
  their GPU tests).
* ``IntConv2d``: the patch embedding. Its input (the image) is full precision in the student, so
  it runs as a float convolution with the dequantized integer weights (exactly the fake-quant
  result); with a quantized input (abits set) it runs as patchify + IntLinear.

Where rounding of the integer path differs from the fake-quant path (the kernel multiplies by
1/α where the fake quant divides by α, and rounds round(x/α) + z where it rounds round(x/α + z);
both differ only when x/α lies within one float ulp of a .5 tie), one integer step differs.
"""
from __future__ import annotations

from torch import nn

from maskaq.integer.attention import IntAttention
from maskaq.integer.conv import IntConv2d
from maskaq.integer.cpu_gemm import DEFAULT_KERNEL, KERNELS, cpu_int8_pairs_saturate, cpu_integer_path
from maskaq.integer.grid import ActGrid, integer_grid
from maskaq.integer.linear import IntLinear, set_kernel
from maskaq.integer.mlp import IntMlp

__all__ = [
    "ActGrid",
    "IntLinear",
    "IntAttention",
    "IntConv2d",
    "integer_grid",
    "stored_bytes",
    "IntMlp",
    "KERNELS",
    "DEFAULT_KERNEL",
    "set_kernel",
    "cpu_int8_pairs_saturate",
    "cpu_integer_path",
]


def stored_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers (+ the prepacked int8 copies of IntLinear)."""
    total = sum(p.numel() * p.element_size() for p in module.parameters())
    total += sum(b.numel() * b.element_size() for b in module.buffers())
    total += sum(m.weight_int.numel() for m in module.modules() if isinstance(m, IntLinear))
    return total
