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
// max(1, floor(keep·k + 0.5)) with the smallest rand are kept (mask). Loss = mean_l
// Σ_{b,i} |mean_h cls_t − mean_h cls_q|·m / (Σ m + 1e-8). Returns (loss 0-dim, mask (B, M)).
TORCH_LIBRARY(maskaq, m) {
  m.def("fq_attention(Tensor q, Tensor k, Tensor v, Tensor? step, Tensor? zero_point, "
        "int[] qmin, int[] qmax, float scale, bool return_logits) -> (Tensor, Tensor)");
  m.def("fq_attention_backward(Tensor grad_out, Tensor? grad_logits, Tensor q, Tensor k, Tensor v, "
        "Tensor? step, Tensor? zero_point, int[] qmin, int[] qmax, float scale) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("patch_similarity_entropy(Tensor logits, Tensor row_index, int num_prefix_tokens) -> Tensor");
  m.def("patch_similarity_entropy_backward(Tensor grad, Tensor logits, Tensor row_index, "
        "int num_prefix_tokens) -> Tensor");
  m.def("masked_attention_align(Tensor cls_t, Tensor cls_q, Tensor rand, float ratio, float keep) "
        "-> (Tensor, Tensor)");
  m.def("masked_attention_align_backward(Tensor grad, Tensor cls_t, Tensor cls_q, Tensor mask) -> Tensor");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "maskaq kernels; the ops are torch.ops.maskaq.* (see maskaq/ops.py)";
#ifdef MASKAQ_WITH_CUDA
  module.attr("with_cuda") = true;
#else
  module.attr("with_cuda") = false;
#endif
}
