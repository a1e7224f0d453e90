// Input validation shared by the CPU and CUDA kernels of maskaq._C.
//
// Every op checks its arguments here before it touches memory, so bad input is a Python
// exception (ValueError / TypeError / IndexError via TORCH_CHECK_*) and never a crash.
// Plain C++/ATen only: this header is included from .cpp and .cu files alike. The
// allowed dtypes are a parameter because they differ per backend.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <sstream>
#include <string>

namespace maskaq {
namespace checks {

inline std::string dtype_list(std::initializer_list<at::ScalarType> dtypes) {
  std::ostringstream os;
  bool first = true;
  for (auto t : dtypes) {
    os << (first ? "" : ", ") << c10::toString(t);
    first = false;
  }
  return os.str();
}

inline std::string shape_of(const at::Tensor& t) {
  std::ostringstream os;
  os << t.sizes();
  return os.str();
}

inline void check_defined(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.defined(), name, " must be a tensor, got None");
}

inline void check_dtype_in(const at::Tensor& t, const char* name,
                           std::initializer_list<at::ScalarType> dtypes) {
  for (auto d : dtypes) {
    if (t.scalar_type() == d) return;
  }
  TORCH_CHECK_TYPE(false, name, " must have dtype in {", dtype_list(dtypes), "}, got ",
                   t.scalar_type(), "; convert it with .to(dtype)");
}

inline void check_dtype(const at::Tensor& t, const char* name, at::ScalarType dtype) {
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, name, " must have dtype ", dtype, ", got ",
                   t.scalar_type());
}

inline void check_same_dtype(const at::Tensor& t, const char* name, const at::Tensor& ref,
                             const char* ref_name) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), name, " (", t.scalar_type(),
                   ") must have the dtype of ", ref_name, " (", ref.scalar_type(), ")");
}

inline void check_device(const at::Tensor& t, const char* name, const at::Device& device) {
  TORCH_CHECK_VALUE(t.device() == device, name, " is on ", t.device(), " but must be on ", device,
                    " like the other inputs; move it with .to(device)");
}

inline void check_dim(const at::Tensor& t, const char* name, int64_t dim, const char* layout) {
  TORCH_CHECK_VALUE(t.dim() == dim, name, " must be ", dim, "-D ", layout, ", got shape ",
                    shape_of(t));
}

inline void check_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous (shape ", shape_of(t),
                    ", strides ", t.strides(), "); call .contiguous() first");
}

inline void check_size(const at::Tensor& t, const char* name, int64_t dim, int64_t expected,
                       const char* what) {
  TORCH_CHECK_VALUE(t.size(dim) == expected, name, " has size ", t.size(dim), " in dim ", dim,
                    " but ", expected, " was expected (", what, "); shape ", shape_of(t));
}

// A floating tensor on `device`, `ndim`-D, contiguous, with a dtype from `dtypes`.
inline void check_input(const at::Tensor& t, const char* name, const at::Device& device,
                        int64_t ndim, const char* layout,
                        std::initializer_list<at::ScalarType> dtypes) {
  check_defined(t, name);
  check_device(t, name, device);
  check_dtype_in(t, name, dtypes);
  check_dim(t, name, ndim, layout);
  check_contiguous(t, name);
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

// Checks q, k, v (B, H, N, d) and the optional quantizer arguments; returns (B, H, N, d).
inline std::array<int64_t, 4> check_fq_attention_tensors(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& step,
    const c10::optional<at::Tensor>& zero_point, at::IntArrayRef qmin, at::IntArrayRef qmax,
    double scale, std::initializer_list<at::ScalarType> dtypes) {
  check_defined(q, "q");
  const auto device = q.device();
  check_input(q, "q", device, 4, "(B, H, N, d)", dtypes);
  check_input(k, "k", device, 4, "(B, H, N, d)", dtypes);
  check_input(v, "v", device, 4, "(B, H, N, d)", dtypes);
  check_same_dtype(k, "k", q, "q");
  check_same_dtype(v, "v", q, "q");
  TORCH_CHECK_VALUE(k.sizes() == q.sizes() && v.sizes() == q.sizes(),
                    "q, k and v must have one shape (B, H, N, d), got ", shape_of(q), ", ",
                    shape_of(k), ", ", shape_of(v));
  TORCH_CHECK_VALUE(q.size(2) >= 1 && q.size(3) >= 1, "q, k, v need N >= 1 tokens and d >= 1 "
                    "channels, got shape ", shape_of(q));
  TORCH_CHECK_VALUE(std::isfinite(scale), "scale must be finite, got ", scale);
  const bool quantized = step.has_value() && step->defined();
  const bool has_zp = zero_point.has_value() && zero_point->defined();
  if (!quantized) {
    TORCH_CHECK_VALUE(!has_zp, "zero_point was given without step; full-precision attention "
                      "takes neither, quantized attention needs step");
  } else {
    TORCH_CHECK_VALUE(qmin.size() == 4 && qmax.size() == 4,
                      "qmin and qmax must hold 4 integers (q, k, p, v), got ", qmin.size(), " and ",
                      qmax.size());
    for (int i = 0; i < 4; ++i) {
      TORCH_CHECK_VALUE(qmin[i] < qmax[i], "qmin[", i, "] = ", qmin[i], " must be below qmax[", i,
                        "] = ", qmax[i]);
      TORCH_CHECK_VALUE(qmax[i] > 0, "qmax[", i, "] = ", qmax[i], " must be positive (the LSQ "
                        "gradient scale divides by sqrt(qmax))");
      TORCH_CHECK_VALUE(qmin[i] >= -kMaxQuantLevel && qmax[i] <= kMaxQuantLevel, "qmin/qmax[", i,
                        "] must lie in [", -kMaxQuantLevel, ", ", kMaxQuantLevel, "]");
    }
    const auto& s = *step;
    check_device(s, "step", device);
    TORCH_CHECK_TYPE(at::isFloatingType(s.scalar_type()), "step must be a floating tensor, got ",
                     s.scalar_type());
    TORCH_CHECK_VALUE(s.dim() == 1 && s.size(0) == 4, "step must be a 1-D tensor of 4 (q, k, p, v), "
                      "got shape ", shape_of(s));
    check_contiguous(s, "step");
    if (has_zp) {
      const auto& z = *zero_point;
      check_device(z, "zero_point", device);
      TORCH_CHECK_TYPE(at::isFloatingType(z.scalar_type()), "zero_point must be a floating tensor, "
                       "got ", z.scalar_type());
      TORCH_CHECK_VALUE(z.dim() == 1 && z.size(0) == 4, "zero_point must be a 1-D tensor of 4 "
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
    TORCH_CHECK_VALUE(std::isfinite(sp[i]) && sp[i] > 0, "step[", i, "] = ", sp[i],
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
      TORCH_CHECK_VALUE(std::isfinite(zp[i]), "zero_point[", i, "] = ", zp[i], " must be finite");
      spec.zero_point[i] = zp[i];
    }
  }
  return spec;
}

// LSQ gradient scale of METHOD.md: g = 0.01 / sqrt(numel(x) * qmax).
inline double lsq_grad_scale(int64_t numel, int64_t qmax) {
  return numel > 0 ? 0.01 / std::sqrt(static_cast<double>(numel) * static_cast<double>(qmax)) : 0.0;
}

// grad_out (B, H, N, d) and the optional grad_logits (B, H, N, N) of fq_attention_backward.
inline void check_fq_attention_grads(const at::Tensor& grad_out,
                                     const c10::optional<at::Tensor>& grad_logits, const at::Tensor& q,
                                     std::initializer_list<at::ScalarType> dtypes) {
  check_input(grad_out, "grad_out", q.device(), 4, "(B, H, N, d)", dtypes);
  check_same_dtype(grad_out, "grad_out", q, "q");
  TORCH_CHECK_VALUE(grad_out.sizes() == q.sizes(), "grad_out must have the shape of q ",
                    shape_of(q), ", got ", shape_of(grad_out));
  if (grad_logits.has_value() && grad_logits->defined()) {
    const auto& g = *grad_logits;
    check_input(g, "grad_logits", q.device(), 4, "(B, H, N, N)", dtypes);
    check_same_dtype(g, "grad_logits", q, "q");
    TORCH_CHECK_VALUE(g.size(0) == q.size(0) && g.size(1) == q.size(1) && g.size(2) == q.size(2) &&
                      g.size(3) == q.size(2), "grad_logits must have shape (B, H, N, N) = (",
                      q.size(0), ", ", q.size(1), ", ", q.size(2), ", ", q.size(2), "), got ",
                      shape_of(g));
  }
}

// ---------------------------------------------------------------------------------------
// patch_similarity_entropy

// logits (B, H, N, N), row_index (B, R) int64; returns N' = N - P (the patch count).
// Index values are checked by check_row_index_range.
inline int64_t check_entropy_inputs(const at::Tensor& logits, const at::Tensor& row_index,
                                    int64_t num_prefix_tokens,
                                    std::initializer_list<at::ScalarType> dtypes) {
  check_defined(logits, "logits");
  check_input(logits, "logits", logits.device(), 4, "(B, H, N, N)", dtypes);
  TORCH_CHECK_VALUE(logits.size(2) == logits.size(3), "logits must be square attention logits "
                    "(B, H, N, N), got shape ", shape_of(logits));
  TORCH_CHECK_VALUE(logits.size(1) >= 1, "logits need at least one head, got shape ",
                    shape_of(logits));
  TORCH_CHECK_VALUE(num_prefix_tokens >= 0 && num_prefix_tokens < logits.size(2),
                    "num_prefix_tokens must lie in [0, N) with N = ", logits.size(2), ", got ",
                    num_prefix_tokens);
  check_defined(row_index, "row_index");
  check_device(row_index, "row_index", logits.device());
  check_dtype(row_index, "row_index", at::kLong);
  check_dim(row_index, "row_index", 2, "(B, R)");
  check_contiguous(row_index, "row_index");
  check_size(row_index, "row_index", 0, logits.size(0), "the batch size of logits");
  TORCH_CHECK_VALUE(row_index.size(1) >= 1, "row_index must pick at least one row per sample, "
                    "got shape ", shape_of(row_index));
  return logits.size(2) - num_prefix_tokens;
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
  TORCH_CHECK_INDEX(lo >= 0 && hi < num_patches, "row_index values must lie in [0, ", num_patches,
                    ") (rows of the patch block, prefix tokens excluded), got range [", lo, ", ",
                    hi, "]");
}

inline void check_entropy_grad(const at::Tensor& grad, const at::Tensor& logits) {
  check_input(grad, "grad", logits.device(), 1, "(B,)", {logits.scalar_type()});
  check_size(grad, "grad", 0, logits.size(0), "the batch size of logits");
}

// ---------------------------------------------------------------------------------------
// masked_attention_align

// cls_t, cls_q (L, B, H, M), rand (B, M); returns (L, B, H, M).
inline std::array<int64_t, 4> check_align_inputs(const at::Tensor& cls_t, const at::Tensor& cls_q,
                                                 const at::Tensor& rand, double ratio, double keep,
                                                 std::initializer_list<at::ScalarType> dtypes) {
  check_defined(cls_t, "cls_t");
  const auto device = cls_t.device();
  check_input(cls_t, "cls_t", device, 4, "(L, B, H, M)", dtypes);
  check_input(cls_q, "cls_q", device, 4, "(L, B, H, M)", dtypes);
  check_same_dtype(cls_q, "cls_q", cls_t, "cls_t");
  TORCH_CHECK_VALUE(cls_q.sizes() == cls_t.sizes(), "cls_t and cls_q must have one shape "
                    "(L, B, H, M), got ", shape_of(cls_t), " and ", shape_of(cls_q));
  TORCH_CHECK_VALUE(cls_t.size(0) >= 1 && cls_t.size(2) >= 1 && cls_t.size(3) >= 1,
                    "cls_t needs L >= 1 blocks, H >= 1 heads and M >= 1 keys, got shape ",
                    shape_of(cls_t));
  check_defined(rand, "rand");
  check_device(rand, "rand", device);
  TORCH_CHECK_TYPE(at::isFloatingType(rand.scalar_type()), "rand must be a floating tensor of "
                   "uniform [0, 1) draws, got ", rand.scalar_type());
  check_dim(rand, "rand", 2, "(B, M)");
  check_contiguous(rand, "rand");
  TORCH_CHECK_VALUE(rand.size(0) == cls_t.size(1) && rand.size(1) == cls_t.size(3),
                    "rand must have shape (B, M) = (", cls_t.size(1), ", ", cls_t.size(3),
                    "), got ", shape_of(rand));
  TORCH_CHECK_VALUE(ratio > 0 && ratio <= 1, "ratio (the top-k fraction) must lie in (0, 1], got ",
                    ratio);
  TORCH_CHECK_VALUE(keep > 0 && keep <= 1, "keep (the kept fraction of the top-k) must lie in "
                    "(0, 1], got ", keep);
  return {cls_t.size(0), cls_t.size(1), cls_t.size(2), cls_t.size(3)};
}

// k = max(1, floor(M * ratio)) top keys, of which max(1, floor(keep * k + 0.5)) are kept.
inline int64_t align_top_k(int64_t num_keys, double ratio) {
  const auto k = static_cast<int64_t>(std::floor(static_cast<double>(num_keys) * ratio));
  return k < 1 ? 1 : (k > num_keys ? num_keys : k);
}

inline int64_t align_keep_k(int64_t top_k, double keep) {
  const auto k = static_cast<int64_t>(std::floor(keep * static_cast<double>(top_k) + 0.5));
  return k < 1 ? 1 : (k > top_k ? top_k : k);
}

inline void check_align_backward_inputs(const at::Tensor& grad, const at::Tensor& cls_t,
                                        const at::Tensor& cls_q, const at::Tensor& mask,
                                        std::initializer_list<at::ScalarType> dtypes) {
  check_defined(cls_t, "cls_t");
  const auto device = cls_t.device();
  check_input(cls_t, "cls_t", device, 4, "(L, B, H, M)", dtypes);
  check_input(cls_q, "cls_q", device, 4, "(L, B, H, M)", dtypes);
  check_same_dtype(cls_q, "cls_q", cls_t, "cls_t");
  TORCH_CHECK_VALUE(cls_q.sizes() == cls_t.sizes(), "cls_t and cls_q must have one shape "
                    "(L, B, H, M), got ", shape_of(cls_t), " and ", shape_of(cls_q));
  TORCH_CHECK_VALUE(cls_t.size(0) >= 1 && cls_t.size(2) >= 1 && cls_t.size(3) >= 1,
                    "cls_t needs L >= 1 blocks, H >= 1 heads and M >= 1 keys, got shape ",
                    shape_of(cls_t));
  check_defined(grad, "grad");
  check_device(grad, "grad", device);
  check_same_dtype(grad, "grad", cls_t, "cls_t");
  TORCH_CHECK_VALUE(grad.numel() == 1, "grad must hold one value (the loss is a scalar), got shape ",
                    shape_of(grad));
  check_input(mask, "mask", device, 2, "(B, M)", {cls_t.scalar_type()});
  TORCH_CHECK_VALUE(mask.size(0) == cls_t.size(1) && mask.size(1) == cls_t.size(3),
                    "mask must have shape (B, M) = (", cls_t.size(1), ", ", cls_t.size(3), "), got ",
                    shape_of(mask));
}

}  // namespace checks
}  // namespace maskaq
