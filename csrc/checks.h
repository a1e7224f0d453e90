// Input validation shared by the CPU and CUDA kernels of maskaq._C.
//
// Every op checks its arguments here before it touches memory, so bad input is a Python
// exception (ValueError / TypeError / IndexError via MASKAQ_CHECK_*, errors.h) and never a crash.
// Plain C++/ATen only: this header is included from .cpp and .cu files alike. The
// allowed dtypes are a parameter because they differ per backend.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "errors.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <string>

#include <c10/util/string_view.h>

namespace maskaq {
namespace checks {

inline std::string dtype_list(std::initializer_list<at::ScalarType> dtypes) {
  std::string s;
  for (auto t : dtypes) {
    if (!s.empty()) s += ", ";
    s += c10::toString(t);
  }
  return s;
}

inline std::string shape_of(const at::Tensor& t) { return errors::message(t.sizes()); }

inline void check_defined(const at::Tensor& t, const char* name) {
  MASKAQ_CHECK_VALUE(t.defined(), name, " must be a tensor, got None");
}

inline void check_dtype_in(const at::Tensor& t, const char* name,
                           std::initializer_list<at::ScalarType> dtypes) {
  for (auto d : dtypes) {
    if (t.scalar_type() == d) return;
  }
  MASKAQ_CHECK_TYPE(false, name, " must have dtype in {", dtype_list(dtypes), "}, got ",
                   t.scalar_type(), "; convert it with .to(dtype)");
}

inline void check_dtype(const at::Tensor& t, const char* name, at::ScalarType dtype) {
  MASKAQ_CHECK_TYPE(t.scalar_type() == dtype, name, " must have dtype ", dtype, ", got ",
                   t.scalar_type());
}

inline void check_same_dtype(const at::Tensor& t, const char* name, const at::Tensor& ref,
                             const char* ref_name) {
  MASKAQ_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), name, " (", t.scalar_type(),
                   ") must have the dtype of ", ref_name, " (", ref.scalar_type(), ")");
}

inline void check_device(const at::Tensor& t, const char* name, const at::Device& device) {
  MASKAQ_CHECK_VALUE(t.device() == device, name, " is on ", t.device(), " but must be on ", device,
                    " like the other inputs; move it with .to(device)");
}

inline void check_dim(const at::Tensor& t, const char* name, int64_t dim, const char* layout) {
  MASKAQ_CHECK_VALUE(t.dim() == dim, name, " must be ", dim, "-D ", layout, ", got shape ",
                    shape_of(t));
}

inline void check_contiguous(const at::Tensor& t, const char* name) {
  MASKAQ_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous (shape ", shape_of(t),
                    ", strides ", t.strides(), "); call .contiguous() first");
}

inline void check_size(const at::Tensor& t, const char* name, int64_t dim, int64_t expected,
                       const char* what) {
  MASKAQ_CHECK_VALUE(t.size(dim) == expected, name, " has size ", t.size(dim), " in dim ", dim,
                    " but ", expected, " was expected (", what, "); shape ", shape_of(t));
}

// Each row of the last dim stored contiguously (stride 1); the other dims may have any strides,
// as in the q, k, v views of a fused qkv projection.
inline void check_rows_contiguous(const at::Tensor& t, const char* name) {
  MASKAQ_CHECK_VALUE(t.size(-1) <= 1 || t.stride(-1) == 1, name, " must have its last dim contiguous (shape ",
                    shape_of(t), ", strides ", t.strides(), "); call .contiguous() first");
}

// A floating tensor on `device`, `ndim`-D, with a dtype from `dtypes`; contiguous, or with
// `rows_only` only its last dim contiguous (check_rows_contiguous).
inline void check_input(const at::Tensor& t, const char* name, const at::Device& device,
                        int64_t ndim, const char* layout,
                        std::initializer_list<at::ScalarType> dtypes, bool rows_only = false) {
  check_defined(t, name);
  check_device(t, name, device);
  check_dtype_in(t, name, dtypes);
  check_dim(t, name, ndim, layout);
  if (rows_only) {
    check_rows_contiguous(t, name);
  } else {
    check_contiguous(t, name);
  }
}

// ---------------------------------------------------------------------------------------
// fq_attention

// The quantizer settings of one fq_attention call, validated and read to the host.
// Order of the four quantizers: q, k, p (probabilities), v.
struct QuantSpec {
  bool enabled = false;          // false: full-precision attention
  bool has_zero_point = false;   // false: zero points are 0 and receive no gradient
  std::array<double, 4> step{};  // alpha > 0
  std::array<double, 4> zero_point{};
  std::array<int64_t, 4> qmin{};
  std::array<int64_t, 4> qmax{};
};

// The range of qmin/qmax that the kernels' exact rounding supports (far beyond 8 bits).
constexpr int64_t kMaxQuantLevel = 1 << 16;

// q, k and v share one shape (B, H, N, d) with N >= 1 tokens and d >= 1 channels.
inline void check_one_attention_shape(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  MASKAQ_CHECK_VALUE(k.sizes() == q.sizes() && v.sizes() == q.sizes(),
                    "q, k and v must have one shape (B, H, N, d), got ", shape_of(q), ", ",
                    shape_of(k), ", ", shape_of(v));
  MASKAQ_CHECK_VALUE(q.size(2) >= 1 && q.size(3) >= 1, "q, k, v need N >= 1 tokens and d >= 1 "
                    "channels, got shape ", shape_of(q));
}

// Checks q, k, v (B, H, N, d) and the optional quantizer arguments; returns (B, H, N, d).
// `strided`: q, k, v may be strided views with contiguous rows (the CPU kernel reads them in
// place); else they must be contiguous.
inline std::array<int64_t, 4> check_fq_attention_tensors(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& step,
    const c10::optional<at::Tensor>& zero_point, at::IntArrayRef qmin, at::IntArrayRef qmax,
    double scale, std::initializer_list<at::ScalarType> dtypes, bool strided = false) {
  check_defined(q, "q");
  const auto device = q.device();
  check_input(q, "q", device, 4, "(B, H, N, d)", dtypes, strided);
  check_input(k, "k", device, 4, "(B, H, N, d)", dtypes, strided);
  check_input(v, "v", device, 4, "(B, H, N, d)", dtypes, strided);
  check_same_dtype(k, "k", q, "q");
  check_same_dtype(v, "v", q, "q");
  check_one_attention_shape(q, k, v);
  MASKAQ_CHECK_VALUE(std::isfinite(scale), "scale must be finite, got ", scale);
  const bool quantized = step.has_value() && step->defined();
  const bool has_zp = zero_point.has_value() && zero_point->defined();
  if (!quantized) {
    MASKAQ_CHECK_VALUE(!has_zp, "zero_point was given without step; full-precision attention "
                      "takes neither, quantized attention needs step");
  } else {
    MASKAQ_CHECK_VALUE(qmin.size() == 4 && qmax.size() == 4,
                      "qmin and qmax must hold 4 integers (q, k, p, v), got ", qmin.size(), " and ",
                      qmax.size());
    for (int i = 0; i < 4; ++i) {
      MASKAQ_CHECK_VALUE(qmin[i] < qmax[i], "qmin[", i, "] = ", qmin[i], " must be below qmax[", i,
                        "] = ", qmax[i]);
      MASKAQ_CHECK_VALUE(qmax[i] > 0, "qmax[", i, "] = ", qmax[i], " must be positive (the LSQ "
                        "gradient scale divides by sqrt(qmax))");
      MASKAQ_CHECK_VALUE(qmin[i] >= -kMaxQuantLevel && qmax[i] <= kMaxQuantLevel, "qmin/qmax[", i,
                        "] must lie in [", -kMaxQuantLevel, ", ", kMaxQuantLevel, "]");
    }
    const auto& s = *step;
    check_device(s, "step", device);
    MASKAQ_CHECK_TYPE(at::isFloatingType(s.scalar_type()), "step must be a floating tensor, got ",
                     s.scalar_type());
    MASKAQ_CHECK_VALUE(s.dim() == 1 && s.size(0) == 4, "step must be a 1-D tensor of 4 (q, k, p, v), "
                      "got shape ", shape_of(s));
    check_contiguous(s, "step");
    if (has_zp) {
      const auto& z = *zero_point;
      check_device(z, "zero_point", device);
      MASKAQ_CHECK_TYPE(at::isFloatingType(z.scalar_type()), "zero_point must be a floating tensor, "
                       "got ", z.scalar_type());
      MASKAQ_CHECK_VALUE(z.dim() == 1 && z.size(0) == 4, "zero_point must be a 1-D tensor of 4 "
                        "(q, k, p, v), got shape ", shape_of(z));
      check_contiguous(z, "zero_point");
    }
  }
  return {q.size(0), q.size(1), q.size(2), q.size(3)};
}

// Reads step / zero_point to the host (4 values each; a device->host copy on CUDA) and
// checks every step is positive and finite.
inline QuantSpec read_quant_spec(const c10::optional<at::Tensor>& step,
                                 const c10::optional<at::Tensor>& zero_point, at::IntArrayRef qmin,
                                 at::IntArrayRef qmax) {
  QuantSpec spec;
  spec.enabled = step.has_value() && step->defined();
  if (!spec.enabled) return spec;
  const auto s = step->detach().to(at::kCPU, at::kDouble).contiguous();
  const double* sp = s.data_ptr<double>();
  for (int i = 0; i < 4; ++i) {
    MASKAQ_CHECK_VALUE(std::isfinite(sp[i]) && sp[i] > 0, "step[", i, "] = ", sp[i],
                      " must be positive and finite (LSQ steps are initialized to 2*mean|x|/sqrt(qmax))");
    spec.step[i] = sp[i];
    spec.qmin[i] = qmin[i];
    spec.qmax[i] = qmax[i];
  }
  spec.has_zero_point = zero_point.has_value() && zero_point->defined();
  if (spec.has_zero_point) {
    const auto z = zero_point->detach().to(at::kCPU, at::kDouble).contiguous();
    const double* zp = z.data_ptr<double>();
    for (int i = 0; i < 4; ++i) {
      MASKAQ_CHECK_VALUE(std::isfinite(zp[i]), "zero_point[", i, "] = ", zp[i], " must be finite");
      spec.zero_point[i] = zp[i];
    }
  }
  return spec;
}

// LSQ step-gradient scale of docs/method.md#the-quantizer, as the public code runs: g = 1 / sqrt(numel(x) * qmax).
// The zero point's gradient is not scaled.
inline double lsq_grad_scale(int64_t numel, int64_t qmax) {
  return numel > 0 ? 1.0 / std::sqrt(static_cast<double>(numel) * static_cast<double>(qmax)) : 0.0;
}

// grad_out (B, H, N, d) and the optional grad_logits (B, H, N, N) of fq_attention_backward.
inline void check_fq_attention_grads(const at::Tensor& grad_out,
                                     const c10::optional<at::Tensor>& grad_logits, const at::Tensor& q,
                                     std::initializer_list<at::ScalarType> dtypes) {
  check_input(grad_out, "grad_out", q.device(), 4, "(B, H, N, d)", dtypes);
  check_same_dtype(grad_out, "grad_out", q, "q");
  MASKAQ_CHECK_VALUE(grad_out.sizes() == q.sizes(), "grad_out must have the shape of q ",
                    shape_of(q), ", got ", shape_of(grad_out));
  if (grad_logits.has_value() && grad_logits->defined()) {
    const auto& g = *grad_logits;
    check_input(g, "grad_logits", q.device(), 4, "(B, H, N, N)", dtypes);
    check_same_dtype(g, "grad_logits", q, "q");
    MASKAQ_CHECK_VALUE(g.size(0) == q.size(0) && g.size(1) == q.size(1) && g.size(2) == q.size(2) &&
                      g.size(3) == q.size(2), "grad_logits must have shape (B, H, N, N) = (",
                      q.size(0), ", ", q.size(1), ", ", q.size(2), ", ", q.size(2), "), got ",
                      shape_of(g));
  }
}

// ---------------------------------------------------------------------------------------
// patch_similarity_entropy

// logits (B, H, N, N), row_index (B, R) int64; returns N' = N - P (the patch count).
// Index values are checked by check_row_index_range.
// Square attention logits (B, H, N, N) with at least one head, and 0 <= num_prefix_tokens < N.
// Returns the patch count N − num_prefix_tokens.
inline int64_t check_attention_logits(const at::Tensor& logits, int64_t num_prefix_tokens,
                                      std::initializer_list<at::ScalarType> dtypes) {
  check_input(logits, "logits", logits.device(), 4, "(B, H, N, N)", dtypes);
  MASKAQ_CHECK_VALUE(logits.size(2) == logits.size(3), "logits must be square attention logits "
                    "(B, H, N, N), got shape ", shape_of(logits));
  MASKAQ_CHECK_VALUE(logits.size(1) >= 1, "logits need at least one head, got shape ",
                    shape_of(logits));
  MASKAQ_CHECK_VALUE(num_prefix_tokens >= 0 && num_prefix_tokens < logits.size(2),
                    "num_prefix_tokens must lie in [0, N) with N = ", logits.size(2), ", got ",
                    num_prefix_tokens);
  return logits.size(2) - num_prefix_tokens;
}

inline int64_t check_entropy_inputs(const at::Tensor& logits, const at::Tensor& row_index,
                                    int64_t num_prefix_tokens,
                                    std::initializer_list<at::ScalarType> dtypes) {
  const int64_t num_patches = check_attention_logits(logits, num_prefix_tokens, dtypes);
  check_defined(row_index, "row_index");
  check_device(row_index, "row_index", logits.device());
  check_dtype(row_index, "row_index", at::kLong);
  check_dim(row_index, "row_index", 2, "(B, R)");
  check_contiguous(row_index, "row_index");
  check_size(row_index, "row_index", 0, logits.size(0), "the batch size of logits");
  MASKAQ_CHECK_VALUE(row_index.size(1) >= 1, "row_index must pick at least one row per sample, "
                    "got shape ", shape_of(row_index));
  return num_patches;
}

// Every row index lies in [0, num_patches); reads the indices (a sync on CUDA).
inline void check_row_index_range(const at::Tensor& row_index, int64_t num_patches) {
  if (row_index.numel() == 0) return;
  int64_t lo, hi;
  if (row_index.device().is_cpu()) {
    const int64_t* p = row_index.data_ptr<int64_t>();
    lo = hi = p[0];
    for (int64_t i = 1; i < row_index.numel(); ++i) {
      lo = p[i] < lo ? p[i] : lo;
      hi = p[i] > hi ? p[i] : hi;
    }
  } else {
    auto mm = at::aminmax(row_index);
    lo = std::get<0>(mm).item<int64_t>();
    hi = std::get<1>(mm).item<int64_t>();
  }
  MASKAQ_CHECK_INDEX(lo >= 0 && hi < num_patches, "row_index values must lie in [0, ", num_patches,
                    ") (rows of the patch block, prefix tokens excluded), got range [", lo, ", ",
                    hi, "]");
}

inline void check_entropy_grad(const at::Tensor& grad, const at::Tensor& logits) {
  check_input(grad, "grad", logits.device(), 1, "(B,)", {logits.scalar_type()});
  check_size(grad, "grad", 0, logits.size(0), "the batch size of logits");
}

// ---------------------------------------------------------------------------------------
// masked_attention_align

// cls_t and cls_q: the CLS rows (L, B, H, M) of T and Q, one device, dtype and shape.
// Returns their device.
inline c10::Device check_cls_pair(const at::Tensor& cls_t, const at::Tensor& cls_q,
                                  std::initializer_list<at::ScalarType> dtypes) {
  check_defined(cls_t, "cls_t");
  const auto device = cls_t.device();
  check_input(cls_t, "cls_t", device, 4, "(L, B, H, M)", dtypes);
  check_input(cls_q, "cls_q", device, 4, "(L, B, H, M)", dtypes);
  check_same_dtype(cls_q, "cls_q", cls_t, "cls_t");
  MASKAQ_CHECK_VALUE(cls_q.sizes() == cls_t.sizes(), "cls_t and cls_q must have one shape "
                    "(L, B, H, M), got ", shape_of(cls_t), " and ", shape_of(cls_q));
  MASKAQ_CHECK_VALUE(cls_t.size(0) >= 1 && cls_t.size(2) >= 1 && cls_t.size(3) >= 1,
                    "cls_t needs L >= 1 blocks, H >= 1 heads and M >= 1 keys, got shape ",
                    shape_of(cls_t));
  return device;
}

// cls_t, cls_q (L, B, H, M), rand (B, M); returns (L, B, H, M).
inline std::array<int64_t, 4> check_align_inputs(const at::Tensor& cls_t, const at::Tensor& cls_q,
                                                 const at::Tensor& rand, double ratio, double keep,
                                                 std::initializer_list<at::ScalarType> dtypes) {
  const auto device = check_cls_pair(cls_t, cls_q, dtypes);
  check_defined(rand, "rand");
  check_device(rand, "rand", device);
  MASKAQ_CHECK_TYPE(at::isFloatingType(rand.scalar_type()), "rand must be a floating tensor of "
                   "uniform [0, 1) draws, got ", rand.scalar_type());
  check_dim(rand, "rand", 2, "(B, M)");
  check_contiguous(rand, "rand");
  MASKAQ_CHECK_VALUE(rand.size(0) == cls_t.size(1) && rand.size(1) == cls_t.size(3),
                    "rand must have shape (B, M) = (", cls_t.size(1), ", ", cls_t.size(3),
                    "), got ", shape_of(rand));
  MASKAQ_CHECK_VALUE(ratio > 0 && ratio <= 1, "ratio (the top-k fraction) must lie in (0, 1], got ",
                    ratio);
  MASKAQ_CHECK_VALUE(keep > 0 && keep <= 1, "keep (the kept fraction of the top-k) must lie in "
                    "(0, 1], got ", keep);
  return {cls_t.size(0), cls_t.size(1), cls_t.size(2), cls_t.size(3)};
}

// k = max(1, floor(M * ratio)) top keys, of which max(1, round(keep * k)) are kept.
inline int64_t align_top_k(int64_t num_keys, double ratio) {
  const auto k = static_cast<int64_t>(std::floor(static_cast<double>(num_keys) * ratio));
  return k < 1 ? 1 : (k > num_keys ? num_keys : k);
}

// round(keep·k) half to even (std::nearbyint in the default rounding mode), as Python's round()
// in the public code: 10 of k = 15 at keep 0.7, not 11.
inline int64_t align_keep_k(int64_t top_k, double keep) {
  const auto k = static_cast<int64_t>(std::nearbyint(keep * static_cast<double>(top_k)));
  return k < 1 ? 1 : (k > top_k ? top_k : k);
}

inline void check_align_backward_inputs(const at::Tensor& grad, const at::Tensor& cls_t,
                                        const at::Tensor& cls_q, const at::Tensor& mask,
                                        std::initializer_list<at::ScalarType> dtypes) {
  const auto device = check_cls_pair(cls_t, cls_q, dtypes);
  check_defined(grad, "grad");
  check_device(grad, "grad", device);
  check_same_dtype(grad, "grad", cls_t, "cls_t");
  MASKAQ_CHECK_VALUE(grad.numel() == 1, "grad must hold one value (the loss is a scalar), got shape ",
                    shape_of(grad));
  check_input(mask, "mask", device, 2, "(B, M)", {cls_t.scalar_type()});
  MASKAQ_CHECK_VALUE(mask.size(0) == cls_t.size(1) && mask.size(1) == cls_t.size(3),
                    "mask must have shape (B, M) = (", cls_t.size(1), ", ", cls_t.size(3), "), got ",
                    shape_of(mask));
}

// ---------------------------------------------------------------------------------------
// int8_linear_epilogue

enum class Activation : int { kNone = 0, kGelu = 1 };

// The epilogue's parameters, validated: activation, and the requantization (when out_step > 0).
struct EpilogueSpec {
  Activation activation = Activation::kNone;
  bool requantize = false;
  at::ScalarType out_dtype = at::kFloat;  // kFloat, kByte (uint8) or kChar (int8)
  double step = 0;
  int64_t zero_point = 0, qmin = 0, qmax = 0;
};

// The output grid of the epilogue as the kernels use it, in float. t_lo / t_hi clamp y/step one
// level beyond the grid before rounding, so the rounding never sees values out of int range.
struct Requant {
  float step, zero_point, lo, hi, t_lo, t_hi;
};

inline Requant requant_grid(double step, int64_t zero_point, int64_t qmin, int64_t qmax) {
  return Requant{static_cast<float>(step),
                 static_cast<float>(zero_point),
                 static_cast<float>(qmin),
                 static_cast<float>(qmax),
                 static_cast<float>(qmin - zero_point - 1),
                 static_cast<float>(qmax - zero_point + 1)};
}

inline Requant requant_grid(const EpilogueSpec& spec) {
  if (!spec.requantize) return Requant{1.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  return requant_grid(spec.step, spec.zero_point, spec.qmin, spec.qmax);
}

// acc (M, N) int32, scale / bias (N,) float32, one device. Returns the parsed parameters.
inline EpilogueSpec check_int8_linear_epilogue(const at::Tensor& acc, const at::Tensor& scale,
                                               const at::Tensor& bias, c10::string_view activation,
                                               double out_step, int64_t out_zero_point,
                                               int64_t out_qmin, int64_t out_qmax) {
  check_defined(acc, "acc");
  const auto device = acc.device();
  check_dtype(acc, "acc", at::kInt);
  check_dim(acc, "acc", 2, "(M, N) int32 GEMM accumulators");
  check_contiguous(acc, "acc");
  for (const auto* entry : {&scale, &bias}) {
    const char* name = entry == &scale ? "scale" : "bias";
    check_defined(*entry, name);
    check_device(*entry, name, device);
    check_dtype(*entry, name, at::kFloat);
    check_dim(*entry, name, 1, "(N,) per output channel");
    check_contiguous(*entry, name);
    check_size(*entry, name, 0, acc.size(1), "N, the columns of acc");
  }
  EpilogueSpec spec;
  if (activation == "none") {
    spec.activation = Activation::kNone;
  } else if (activation == "gelu") {
    spec.activation = Activation::kGelu;
  } else {
    MASKAQ_CHECK_VALUE(false, "activation must be \"none\" or \"gelu\" (erf GELU, as nn.GELU()), got \"",
                      std::string(activation.data(), activation.size()), "\"");
  }
  MASKAQ_CHECK_VALUE(std::isfinite(out_step), "out_step must be finite (> 0 requantizes, <= 0 returns "
                    "float32), got ", out_step);
  if (!(out_step > 0)) return spec;
  spec.requantize = true;
  spec.step = out_step;
  spec.zero_point = out_zero_point;
  spec.qmin = out_qmin;
  spec.qmax = out_qmax;
  MASKAQ_CHECK_VALUE(out_qmin < out_qmax, "out_qmin = ", out_qmin, " must be below out_qmax = ", out_qmax);
  MASKAQ_CHECK_VALUE(out_zero_point >= -kMaxQuantLevel && out_zero_point <= kMaxQuantLevel,
                    "out_zero_point must lie in [", -kMaxQuantLevel, ", ", kMaxQuantLevel, "], got ",
                    out_zero_point);
  if (out_qmin >= 0 && out_qmax <= 255) {
    spec.out_dtype = at::kByte;
  } else if (out_qmin >= -128 && out_qmax <= 127) {
    spec.out_dtype = at::kChar;
  } else {
    MASKAQ_CHECK_VALUE(false, "[out_qmin, out_qmax] = [", out_qmin, ", ", out_qmax, "] must fit uint8 "
                      "[0, 255] or int8 [-128, 127] (the requantized output is one byte)");
  }
  return spec;
}

// ---------------------------------------------------------------------------------------
// int8_attention

// The parameters of one int8_attention call, validated.
struct Int8AttentionSpec {
  int64_t B = 0, H = 0, N = 0, d = 0;
  int64_t p_lo = 0, p_hi = 0;  // range of the P integers P_q − p_zero_point
  // Largest |integer| of the products' sums, bounded from the ranges: d·max|q̃|·max|k̃| and
  // N·max|P̃|·max|ṽ|; both fit int32 (checked), and float32 arithmetic is exact below 2^24.
  int64_t score_bound = 0, out_bound = 0;
};

inline Int8AttentionSpec check_int8_attention_grids(int64_t B, int64_t H, int64_t N, int64_t d, double scale_qk,
                                                    double p_step, int64_t p_zero_point, int64_t p_qmin,
                                                    int64_t p_qmax, int64_t q_zero_point, int64_t k_zero_point,
                                                    int64_t v_zero_point);

// Largest |x − zero_point| over the int8 values x.
inline int64_t int8_magnitude(int64_t zero_point) {
  const int64_t a = -128 - zero_point, b = 127 - zero_point;
  return std::max(a < 0 ? -a : a, b < 0 ? -b : b);
}

inline Int8AttentionSpec check_int8_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                              double scale_qk, double p_step, int64_t p_zero_point,
                                              int64_t p_qmin, int64_t p_qmax, int64_t q_zero_point,
                                              int64_t k_zero_point, int64_t v_zero_point) {
  check_defined(q, "q");
  const auto device = q.device();
  for (const auto* entry : {&q, &k, &v}) {
    const char* name = entry == &q ? "q" : (entry == &k ? "k" : "v");
    check_defined(*entry, name);
    check_device(*entry, name, device);
    check_dtype(*entry, name, at::kChar);
    check_dim(*entry, name, 4, "(B, H, N, d) int8");
    check_contiguous(*entry, name);
  }
  check_one_attention_shape(q, k, v);
  return check_int8_attention_grids(q.size(0), q.size(1), q.size(2), q.size(3), scale_qk, p_step, p_zero_point,
                                    p_qmin, p_qmax, q_zero_point, k_zero_point, v_zero_point);
}

// The scalar arguments of int8_attention (and qkv_int8_attention) for operands of shape (B, H, N, d).
inline Int8AttentionSpec check_int8_attention_grids(int64_t B, int64_t H, int64_t N, int64_t d, double scale_qk,
                                                    double p_step, int64_t p_zero_point, int64_t p_qmin,
                                                    int64_t p_qmax, int64_t q_zero_point, int64_t k_zero_point,
                                                    int64_t v_zero_point) {
  MASKAQ_CHECK_VALUE(std::isfinite(scale_qk), "scale_qk must be finite, got ", scale_qk);
  MASKAQ_CHECK_VALUE(std::isfinite(p_step) && p_step > 0, "p_step must be positive and finite, got ",
                    p_step);
  MASKAQ_CHECK_VALUE(p_qmin < p_qmax, "p_qmin = ", p_qmin, " must be below p_qmax = ", p_qmax);
  // 8-bit probabilities at most: the CUDA kernel shifts them into int8 for the tensor cores.
  MASKAQ_CHECK_VALUE(p_qmax - p_qmin <= 255, "the P grid [p_qmin, p_qmax] = [", p_qmin, ", ", p_qmax,
                    "] is wider than 8 bits (at most 256 levels)");
  const int64_t zps[4] = {p_zero_point, q_zero_point, k_zero_point, v_zero_point};
  const int64_t ends[2] = {p_qmin, p_qmax};
  for (int64_t z : zps) {
    MASKAQ_CHECK_VALUE(z >= -kMaxQuantLevel && z <= kMaxQuantLevel, "zero points must lie in [",
                      -kMaxQuantLevel, ", ", kMaxQuantLevel, "], got ", z);
  }
  for (int64_t e : ends) {
    MASKAQ_CHECK_VALUE(e >= -kMaxQuantLevel && e <= kMaxQuantLevel, "p_qmin/p_qmax must lie in [",
                      -kMaxQuantLevel, ", ", kMaxQuantLevel, "], got ", e);
  }
  Int8AttentionSpec spec;
  spec.B = B, spec.H = H, spec.N = N, spec.d = d;
  spec.p_lo = p_qmin - p_zero_point;
  spec.p_hi = p_qmax - p_zero_point;
  const int64_t p_mag = std::max(spec.p_lo < 0 ? -spec.p_lo : spec.p_lo, spec.p_hi < 0 ? -spec.p_hi : spec.p_hi);
  // Bounds in double: the products of int64 factors below cannot overflow it meaningfully.
  const double score_bound = static_cast<double>(spec.d) * int8_magnitude(q_zero_point) * int8_magnitude(k_zero_point);
  const double out_bound = static_cast<double>(spec.N) * p_mag * int8_magnitude(v_zero_point);
  MASKAQ_CHECK_VALUE(score_bound <= INT32_MAX, "q·kᵀ could overflow int32: d·max|q − z_q|·max|k − z_k| = ",
                    score_bound, " > 2^31 − 1 (head dim ", spec.d, ", zero points ", q_zero_point, ", ",
                    k_zero_point, ")");
  MASKAQ_CHECK_VALUE(out_bound <= INT32_MAX, "P·v could overflow int32: N·max|P_q − z_p|·max|v − z_v| = ",
                    out_bound, " > 2^31 − 1 (N = ", spec.N, " tokens)");
  spec.score_bound = static_cast<int64_t>(score_bound);
  spec.out_bound = static_cast<int64_t>(out_bound);
  return spec;
}

// ---------------------------------------------------------------------------------------
// qkv_int8_attention

// The offset o that stores the integers [lo, hi] (at most 256 of them) in int8: 0 where they fit,
// else lo + 128; the products then read them with zero point −o (IntAttention's _int8_shift).
inline int64_t int8_shift(int64_t lo, int64_t hi) { return (lo >= -128 && hi <= 127) ? 0 : lo + 128; }

struct QkvAttentionSpec {
  Int8AttentionSpec attention;
  std::array<int64_t, 3> lo{}, hi{}, shift{};
};

// qkv (B, N, 3, H, d) float32, contiguous; lo/hi: the integer range of q − z_q, k − z_k, v − z_v.
inline QkvAttentionSpec check_qkv_int8_attention(const at::Tensor& qkv, double scale_qk, double p_step,
                                                 int64_t p_zero_point, int64_t p_qmin, int64_t p_qmax,
                                                 at::IntArrayRef lo, at::IntArrayRef hi) {
  check_defined(qkv, "qkv");
  check_dtype(qkv, "qkv", at::kFloat);
  check_dim(qkv, "qkv", 5, "(B, N, 3, H, d) float32");
  MASKAQ_CHECK_VALUE(qkv.size(2) == 3, "qkv must be (B, N, 3, H, d) with 3 at dim 2 (q, k, v), got ",
                    qkv.sizes());
  check_contiguous(qkv, "qkv");
  MASKAQ_CHECK_VALUE(lo.size() == 3 && hi.size() == 3, "lo and hi must hold 3 integers (q, k, v), got ", lo.size(),
                    " and ", hi.size());
  QkvAttentionSpec spec;
  for (int i = 0; i < 3; ++i) {
    MASKAQ_CHECK_VALUE(lo[i] >= -kMaxQuantLevel && hi[i] <= kMaxQuantLevel, "lo and hi must lie in [",
                      -kMaxQuantLevel, ", ", kMaxQuantLevel, "], got ", lo[i], " and ", hi[i]);
    MASKAQ_CHECK_VALUE(lo[i] < hi[i] && hi[i] - lo[i] <= 255, "each range [lo, hi] must hold 2 to 256 integers, got [",
                      lo[i], ", ", hi[i], "]");
    spec.lo[i] = lo[i], spec.hi[i] = hi[i], spec.shift[i] = int8_shift(lo[i], hi[i]);
  }
  spec.attention = check_int8_attention_grids(qkv.size(0), qkv.size(3), qkv.size(1), qkv.size(4), scale_qk, p_step,
                                              p_zero_point, p_qmin, p_qmax, -spec.shift[0], -spec.shift[1],
                                              -spec.shift[2]);
  return spec;
}

}  // namespace checks
}  // namespace maskaq
