// maskaq._C: every op of the extension is declared here, once. Kernels live in
// csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu and register with TORCH_LIBRARY_IMPL;
// autograd and fake (meta) kernels are registered from Python (maskaq/ops.py).
#include <torch/extension.h>
#include <torch/library.h>

// fq_attention — attention with LSQ fake-quantized operands (MaskAQ student) or plain
// (teacher, step/zero_point = None). q, k, v: (B, H, N, d), contiguous, one dtype.
// step, zero_point: 1-D float32 tensors of 4 in the order (q, k, p, v); qmin/qmax: 4 ints.
// Returns (out (B, H, N, d), logits (B, H, N, N) = q̂·k̂ᵀ unscaled, or an empty tensor when
// return_logits is false). The backward recomputes the logits and probabilities.
//
// patch_similarity_entropy — logits (B, H, N, N), row_index (B, R) int64 in [0, N - P),
// P = num_prefix_tokens. Per sample: head mean, drop the P prefix rows/columns, take the R
// rows, L2-normalize them, cosine Gram (R, R), biased variance + 1e-8, h = ½·log(2πe·s²).
// Returns h, (B,) in the input dtype (float32 accumulation).
//
// masked_attention_align — cls_t, cls_q: (L, B, H, M) CLS-row logits of every block over the
// M patch keys; rand: (B, M) uniform [0, 1) used for the stochastic drop. k = max(1,
// floor(M·ratio)) top keys of c = mean_{l,h} cls_t per sample; of those, the
// max(1, round(keep·k)) (half to even) with the smallest rand are kept (mask). Loss = mean_l
// Σ_{b,i} |mean_h cls_t − mean_h cls_q|·m / (Σ m + 1e-8). Returns (loss 0-dim, mask (B, M)).
//
// inter_head_ssim — logits (B, H, N, N), P = num_prefix_tokens: per sample, the mean over the
// M = N − P query patches and the H×H ordered head pairs (self pairs included) of 1 − SSIM² of the
// min-max normalized key maps logits[b, h, P + n, P:], with global statistics and constants c1,
// c2 (MimiQ's inter-head loss; docs/method.md#synthesis). Returns (B,) in the logits dtype.
// inter_head_ssim_backward — grad (B,) -> the dense (B, H, N, N) gradient (zero on the prefix
// rows and columns; min and max send theirs to their first index). CPU only: elsewhere
// maskaq.synthesis.losses composes PyTorch ops.
//
// Integer inference (maskaq.integer; no autograd):
// lsq_fake_quant — x float32/float64 (any shape, contiguous), step and zero_point one-element tensors
// of x's dtype: x̂ = (round(clamp(x/step + round(z), qmin, qmax)) − round(z))·step, the LSQ fake quant
// of a fixed grid (no gradient for step or zero_point). lsq_fake_quant_backward — its straight-through
// gradient for x: grad · [qmin ≤ x/step + round(z) ≤ qmax]. CPU only (on CUDA maskaq.quant composes
// PyTorch ops).
//
// int8_linear_epilogue — acc (M, N) int32 (an int8 GEMM's accumulators), scale / bias (N,)
// float32: y = acc·scale + bias, then GELU (activation "gelu": erf GELU as nn.GELU(); "none").
// out_step <= 0: returns y, float32 (M, N). out_step > 0: returns the requantized
// u = clamp(round(y / out_step) + out_zero_point, out_qmin, out_qmax) (NaN -> out_qmin), uint8
// when [out_qmin, out_qmax] lies in [0, 255], else int8 (must lie in [-128, 127]).
//
// int8_attention — q, k, v (B, H, N, d) int8; their integers are x − x_zero_point (the zero
// points default to 0). S = q̃·k̃ᵀ (exact, int32), P = softmax(float(S)·scale_qk) in float32,
// P̃ = clamp(round(P / p_step) + p_zero_point, p_qmin, p_qmax) − p_zero_point (at most 256 levels),
// returns O = P̃·ṽ (exact integers, int32 range) as float32 (B, H, N, d). The steps of q, k, v and
// P are the caller's to fold (O·α_p·α_v is the attention output).
//
// qkv_int8_attention — int8_attention straight from a folded qkv projection: qkv (B, N, 3, H, d)
// float32 holds x/α of q, k and v; their integers are clamp(round(x/α), lo[i], hi[i]) (the range of
// q − z of each grid, at most 256 values). Returns O as float32 (B, N, H·d), the layout the output
// projection reads (CPU only: the rounding, packing and products in one op).
//
// int8_gemm_pack — weight (N, K) int8 -> the packed int16 panels int8_gemm reads (CPU only).
// int8_gemm — input (M, K) uint8, packed_weight from int8_gemm_pack: returns the exact int32
// accumulators Σ_k (input[m, k] − input_zero_point)·weight[n, k], (M, out_features), with no int16
// saturation on any x86 CPU (AVX2 or portable code; csrc/cpu/int8_gemm.cpp). With scale (and bias),
// (N,) float32, returns float32 acc·scale + bias instead (int8_linear_epilogue's arithmetic, applied
// to each finished tile). CPU only: on CUDA, IntLinear runs cuBLASLt's int8 GEMM.
TORCH_LIBRARY(maskaq, m) {
  m.def("fq_attention(Tensor q, Tensor k, Tensor v, Tensor? step, Tensor? zero_point, "
        "int[] qmin, int[] qmax, float scale, bool return_logits) -> (Tensor, Tensor)");
  m.def("fq_attention_backward(Tensor grad_out, Tensor? grad_logits, Tensor q, Tensor k, Tensor v, "
        "Tensor? step, Tensor? zero_point, int[] qmin, int[] qmax, float scale) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("lsq_fake_quant(Tensor x, Tensor step, Tensor zero_point, int qmin, int qmax) -> Tensor");
  m.def("lsq_fake_quant_backward(Tensor grad, Tensor x, Tensor step, Tensor zero_point, int qmin, int qmax) "
        "-> Tensor");
  m.def("patch_similarity_entropy(Tensor logits, Tensor row_index, int num_prefix_tokens) -> Tensor");
  m.def("patch_similarity_entropy_backward(Tensor grad, Tensor logits, Tensor row_index, "
        "int num_prefix_tokens) -> Tensor");
  m.def("masked_attention_align(Tensor cls_t, Tensor cls_q, Tensor rand, float ratio, float keep) "
        "-> (Tensor, Tensor)");
  m.def("masked_attention_align_backward(Tensor grad, Tensor cls_t, Tensor cls_q, Tensor mask) -> Tensor");
  m.def("inter_head_ssim(Tensor logits, int num_prefix_tokens, float c1, float c2) -> Tensor");
  m.def("inter_head_ssim_backward(Tensor grad, Tensor logits, int num_prefix_tokens, float c1, float c2) "
        "-> Tensor");
  m.def("int8_linear_epilogue(Tensor acc, Tensor scale, Tensor bias, str activation, float out_step, "
        "int out_zero_point, int out_qmin, int out_qmax) -> Tensor");
  m.def("int8_attention(Tensor q, Tensor k, Tensor v, float scale_qk, float p_step, int p_zero_point, "
        "int p_qmin, int p_qmax, int q_zero_point=0, int k_zero_point=0, int v_zero_point=0) -> Tensor");
  m.def("qkv_int8_attention(Tensor qkv, float scale_qk, float p_step, int p_zero_point, int p_qmin, int p_qmax, "
        "int[] lo, int[] hi) -> Tensor");
  m.def("int8_gemm_pack(Tensor weight) -> Tensor");
  m.def("int8_gemm(Tensor input, int input_zero_point, Tensor packed_weight, int out_features, "
        "Tensor? scale=None, Tensor? bias=None) -> Tensor");
}

namespace maskaq {
std::string int8_attention_products();  // csrc/cpu/integer.cpp
}  // namespace maskaq

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "maskaq kernels; the ops are torch.ops.maskaq.* (see maskaq/ops.py)";
  module.def("int8_attention_products", &maskaq::int8_attention_products,
             "What runs int8_attention's two products on this CPU: 'int16', 'int8' or 'float'");
#ifdef MASKAQ_WITH_CUDA
  module.attr("with_cuda") = true;
#else
  module.attr("with_cuda") = false;
#endif
}
