// maskaq::fq_attention and maskaq::fq_attention_backward on CPU.
//
// Work is split over the B*H (batch, head) slices with at::parallel_for; every slice runs
// its two (forward) or five (backward: the logits are recomputed) matrix products through
// ATen (at::mm_out into preallocated buffers and output slices, BLAS underneath) and fuses
// everything between them into row-wise loops that stay in L1: fake-quant of q/k/v,
// softmax of the scaled logits followed by fake-quant of P, and in the backward the
// STE/LSQ gradient of P's quantizer, the softmax backward and the logits gradient in one
// pass per row. LSQ sums are kept per slice and added in slice order, so the step and
// zero-point gradients do not depend on the thread count.
// float32 and float64 (float64 serves gradcheck).
#include "checks.h"
#include "float_math.h"
#include "vec8.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace maskaq {
namespace {

const std::initializer_list<at::ScalarType> kCpuDtypes = {at::kFloat, at::kDouble};

// ---------------------------------------------------------------------------------------
// Scalar helpers written so the compiler vectorizes the loops that call them.

using fmath::round_small;  // round half to even, as torch.round on the clamped quantizer inputs

// exp(x) for x <= 0 (softmax after subtracting the row max). float: float_math.h's Cephes expf
// polynomial (about 1 ulp), in plain arithmetic so the loop vectorizes; double: libm.
inline float exp_nonpositive(float x) {
  return fmath::exp_bounded(std::max(x, -87.33654f));  // below, exp underflows; 2^-126 is as good as 0 here
}

inline double exp_nonpositive(double x) { return std::exp(x); }

// One LSQ quantizer: x̂ = (round(clamp(x/α + round(z), lo, hi)) − round(z))·α.
template <typename T>
struct Quantizer {
  T alpha, zr, lo, hi;
};

template <typename T>
Quantizer<T> make_quantizer(const checks::QuantSpec& spec, int which) {
  Quantizer<T> f;
  f.alpha = static_cast<T>(spec.step[which]);
  f.zr = static_cast<T>(std::nearbyint(spec.zero_point[which]));
  f.lo = static_cast<T>(spec.qmin[which]);
  f.hi = static_cast<T>(spec.qmax[which]);
  return f;
}

template <typename T>
inline void fake_quant(const T* x, T* y, int64_t n, const Quantizer<T>& f) {
  const T a = f.alpha, z = f.zr, lo = f.lo, hi = f.hi;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const T t = x[i] / a + z;
    const T c = std::min(std::max(t, lo), hi);
    y[i] = (round_small(c) - z) * a;
  }
}

// In place on g (dL/dx̂ -> dL/dx, straight through inside the clamp range) and adds the
// unscaled LSQ sums Σ dL/dx̂·dx̂/dα and Σ dL/dx̂·dx̂/dz to *sum_alpha / *sum_zp.
// With STE on both roundings: inside the range dx̂/dα = round(t) − round(z) − x/α and
// dx̂/dz = 0; outside dx̂/dα = clamp(t) − round(z) and dx̂/dz = −α (t = x/α + round(z)).
template <typename T>
inline void fake_quant_backward(const T* x, T* g, int64_t n, const Quantizer<T>& f,
                                double* sum_alpha, double* sum_zp) {
  const T a = f.alpha, z = f.zr, lo = f.lo, hi = f.hi;
  T sa = 0, sz = 0;
#pragma omp simd reduction(+ : sa, sz)
  for (int64_t i = 0; i < n; ++i) {
    const T xs = x[i] / a;
    const T t = xs + z;
    const bool inside = (t >= lo) && (t <= hi);
    const T r = round_small(std::min(std::max(t, lo), hi)) - z;
    const T gy = g[i];
    sa += gy * (inside ? r - xs : r);
    sz += inside ? T(0) : -gy * a;
    g[i] = inside ? gy : T(0);
  }
  *sum_alpha += sa;
  *sum_zp += sz;
}

// p = softmax(a·scale) over one row of n.
template <typename T>
inline void softmax_row(const T* a, T* p, int64_t n, T scale) {
  T m = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = std::max(m, a[j] * scale);
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) {
    const T e = exp_nonpositive(a[j] * scale - m);
    p[j] = e;
    s += e;
  }
  const T inv = T(1) / s;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) p[j] *= inv;
}

// g (in: dL/dP, out: dL/dA) for one row: softmax backward, times scale, plus dL/dA from
// the returned logits when given.
template <typename T>
inline void softmax_backward_row(const T* p, T* g, const T* grad_logits, int64_t n, T scale) {
  T dot = 0;
#pragma omp simd reduction(+ : dot)
  for (int64_t j = 0; j < n; ++j) dot += g[j] * p[j];
  if (grad_logits != nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) g[j] = p[j] * (g[j] - dot) * scale + grad_logits[j];
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) g[j] = p[j] * (g[j] - dot) * scale;
  }
}

// ---------------------------------------------------------------------------------------
// float32 row kernels with explicit 8-lane vectors (vec8.h: built for AVX-512, AVX2 and
// baseline x86-64, picked at load time). Other compilers/architectures use the scalar
// templates above.
#if defined(MASKAQ_SIMD)

// Lane-wise exp_nonpositive (same polynomial and clamp as the scalar one).
MASKAQ_VINLINE vf8 vexp_nonpositive(vf8 x) { return vexp_bounded(vmax_keep(x, vsplat(-87.33654f))); }

MASKAQ_CLONES void softmax_row_f32(const float* a, float* p, int64_t n, float scale) {
  const int64_t nv = n - n % kLanes;
  float m = -std::numeric_limits<float>::infinity();
  if (nv > 0) {
    vf8 mv = vload(a) * scale;
    for (int64_t j = kLanes; j < nv; j += kLanes) {
      const vf8 x = vload(a + j) * scale;
      mv = vselect(mv < x, x, mv);
    }
    m = hmax(mv);
  }
  for (int64_t j = nv; j < n; ++j) m = std::max(m, a[j] * scale);
  vf8 sv = vf8{};
  for (int64_t j = 0; j < nv; j += kLanes) {
    const vf8 e = vexp_nonpositive(vload(a + j) * scale - m);
    vstore(p + j, e);
    sv += e;
  }
  float s = hsum(sv);
  for (int64_t j = nv; j < n; ++j) {
    const float e = exp_nonpositive(a[j] * scale - m);
    p[j] = e;
    s += e;
  }
  const float inv = 1.0f / s;
  for (int64_t j = 0; j < nv; j += kLanes) vstore(p + j, vload(p + j) * inv);
  for (int64_t j = nv; j < n; ++j) p[j] *= inv;
}

MASKAQ_CLONES void fake_quant_f32(const float* x, float* y, int64_t n, float a, float z, float lo,
                                  float hi) {
  const int64_t nv = n - n % kLanes;
  const vf8 av = vsplat(a), zv = vsplat(z), lov = vsplat(lo), hiv = vsplat(hi);
  for (int64_t i = 0; i < nv; i += kLanes) {
    const vf8 t = vload(x + i) / av + zv;
    const vf8 c = vmin_keep(vmax_keep(t, lov), hiv);
    vstore(y + i, (vround_small(c) - zv) * av);
  }
  for (int64_t i = nv; i < n; ++i) {
    const float t = x[i] / a + z;
    y[i] = (round_small(std::min(std::max(t, lo), hi)) - z) * a;
  }
}

MASKAQ_CLONES void fake_quant_backward_f32(const float* x, float* g, int64_t n, float a, float z,
                                           float lo, float hi, double* sum_alpha, double* sum_zp) {
  const int64_t nv = n - n % kLanes;
  const vf8 av = vsplat(a), zv = vsplat(z), lov = vsplat(lo), hiv = vsplat(hi), zero = vf8{};
  vf8 sa = vf8{}, sz = vf8{};
  for (int64_t i = 0; i < nv; i += kLanes) {
    const vf8 xs = vload(x + i) / av;
    const vf8 t = xs + zv;
    const vi8 inside = (t >= lov) & (t <= hiv);
    const vf8 r = vround_small(vmin_keep(vmax_keep(t, lov), hiv)) - zv;
    const vf8 gy = vload(g + i);
    sa += gy * vselect(inside, r - xs, r);
    sz += vselect(inside, zero, -gy * av);
    vstore(g + i, vselect(inside, gy, zero));
  }
  float tsa = hsum(sa), tsz = hsum(sz);
  for (int64_t i = nv; i < n; ++i) {
    const float xs = x[i] / a;
    const float t = xs + z;
    const bool inside = (t >= lo) & (t <= hi);
    const float r = round_small(std::min(std::max(t, lo), hi)) - z;
    const float gy = g[i];
    tsa += gy * (inside ? r - xs : r);
    tsz += inside ? 0.0f : -gy * a;
    g[i] = inside ? gy : 0.0f;
  }
  *sum_alpha += tsa;
  *sum_zp += tsz;
}

MASKAQ_CLONES void softmax_backward_row_f32(const float* p, float* g, const float* grad_logits,
                                            int64_t n, float scale) {
  const int64_t nv = n - n % kLanes;
  vf8 dv = vf8{};
  for (int64_t j = 0; j < nv; j += kLanes) dv += vload(g + j) * vload(p + j);
  float dot = hsum(dv);
  for (int64_t j = nv; j < n; ++j) dot += g[j] * p[j];
  for (int64_t j = 0; j < nv; j += kLanes) {
    vf8 r = vload(p + j) * (vload(g + j) - dot) * scale;
    if (grad_logits != nullptr) r += vload(grad_logits + j);
    vstore(g + j, r);
  }
  for (int64_t j = nv; j < n; ++j) {
    g[j] = p[j] * (g[j] - dot) * scale + (grad_logits != nullptr ? grad_logits[j] : 0.0f);
  }
}

template <>
inline void fake_quant<float>(const float* x, float* y, int64_t n, const Quantizer<float>& f) {
  fake_quant_f32(x, y, n, f.alpha, f.zr, f.lo, f.hi);
}
template <>
inline void fake_quant_backward<float>(const float* x, float* g, int64_t n, const Quantizer<float>& f,
                                       double* sum_alpha, double* sum_zp) {
  fake_quant_backward_f32(x, g, n, f.alpha, f.zr, f.lo, f.hi, sum_alpha, sum_zp);
}
template <>
inline void softmax_row<float>(const float* a, float* p, int64_t n, float scale) {
  softmax_row_f32(a, p, n, scale);
}
template <>
inline void softmax_backward_row<float>(const float* p, float* g, const float* grad_logits, int64_t n,
                                        float scale) {
  softmax_backward_row_f32(p, g, grad_logits, n, scale);
}
#endif  // MASKAQ_SIMD

// Row-wise fake_quant_backward over a (rows, cols) slice, accumulating in double.
template <typename T>
inline void fake_quant_backward_rows(const T* x, int64_t x_row_stride, T* g, int64_t rows, int64_t cols,
                                     const Quantizer<T>& f, double* sums) {
  for (int64_t i = 0; i < rows; ++i) {
    fake_quant_backward(x + i * x_row_stride, g + i * cols, cols, f, &sums[0], &sums[1]);
  }
}

// A non-owning 2-D tensor over a slice, for at::mm_out.
template <typename T>
inline at::Tensor wrap(const T* ptr, int64_t rows, int64_t cols, const at::TensorOptions& opts) {
  return at::from_blob(const_cast<T*>(ptr), {rows, cols}, opts);
}

struct Problem {
  int64_t B, H, N, d;
  double scale;
  checks::QuantSpec spec;

  // Elements seen by quantizer i (q, k, P, v): P is (B, H, N, N), the others (B, H, N, d).
  int64_t operand_numel(int i) const { return B * H * N * (i == 2 ? N : d); }
};

// What both passes read: the four quantizers (q, k, P, v; left default without quantization), the
// softmax scale, and q, k, v where they lie: any strides for B, H and N (the views of a fused qkv
// projection need no copy), rows of d contiguous values.
template <typename T>
struct SliceInputs {
  SliceInputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Problem& pb)
      : quant(pb.spec.enabled), scale(static_cast<T>(pb.scale)), opts(q.options()), H(pb.H) {
    const at::Tensor* qkv[3] = {&q, &k, &v};
    for (int i = 0; i < 3; ++i) {
      data[i] = qkv[i]->data_ptr<T>();
      stride_b[i] = qkv[i]->stride(0), stride_h[i] = qkv[i]->stride(1), stride_n[i] = qkv[i]->stride(2);
    }
    if (quant) for (int i = 0; i < 4; ++i) fq[i] = make_quantizer<T>(pb.spec, i);
  }

  // The first row of operand i (0: q, 1: k, 2: v) of slice s = b·H + h; its rows are row_stride(i) apart.
  const T* slice(int i, int64_t s) const { return data[i] + (s / H) * stride_b[i] + (s % H) * stride_h[i]; }
  int64_t row_stride(int i) const { return stride_n[i]; }

  bool quant;
  T scale;
  at::TensorOptions opts;
  int64_t H;
  const T* data[3];
  int64_t stride_b[3], stride_h[3], stride_n[3];
  Quantizer<T> fq[4];
};

// The q, k, v operands of one (batch, head) slice as 2-D (N, d) tensors: fake-quantized copies in
// per-thread buffers when quantizing, else views of the inputs.
template <typename T>
class SliceOperands {
 public:
  SliceOperands(bool quant, int64_t N, int64_t d, const at::TensorOptions& opts)
      : quant_(quant), N_(N), d_(d), opts_(opts) {
    if (quant_) qh_ = at::empty({N, d}, opts), kh_ = at::empty({N, d}, opts), vh_ = at::empty({N, d}, opts);
  }

  // Slice s (= b·H + h) of the inputs.
  void load(const SliceInputs<T>& in, int64_t s) {
    if (quant_) {
      quantize_rows(in.slice(0, s), in.row_stride(0), qh_, in.fq[0]);
      quantize_rows(in.slice(1, s), in.row_stride(1), kh_, in.fq[1]);
      quantize_rows(in.slice(2, s), in.row_stride(2), vh_, in.fq[3]);
      q = qh_, k = kh_, v = vh_;
    } else {  // views in place: BLAS reads rows row_stride apart
      q = wrap_rows(in.slice(0, s), in.row_stride(0));
      k = wrap_rows(in.slice(1, s), in.row_stride(1));
      v = wrap_rows(in.slice(2, s), in.row_stride(2));
    }
  }

  at::Tensor q, k, v;

 private:
  void quantize_rows(const T* src, int64_t row_stride, at::Tensor& dst, const Quantizer<T>& f) const {
    T* out = dst.data_ptr<T>();
    if (row_stride == d_) {
      fake_quant(src, out, N_ * d_, f);
    } else {
      for (int64_t i = 0; i < N_; ++i) fake_quant(src + i * row_stride, out + i * d_, d_, f);
    }
  }

  at::Tensor wrap_rows(const T* src, int64_t row_stride) const {
    return at::from_blob(const_cast<T*>(src), {N_, d_}, {row_stride, 1}, opts_);
  }

  bool quant_;
  int64_t N_, d_;
  at::TensorOptions opts_;
  at::Tensor qh_, kh_, vh_;
};

// ---------------------------------------------------------------------------------------
// Forward

template <typename T>
void forward_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                    at::Tensor* logits, const Problem& pb) {
  const int64_t N = pb.N, d = pb.d, slices = pb.B * pb.H;
  const SliceInputs<T> in(q, k, v, pb);
  T* op = out.data_ptr<T>();
  T* lp = logits != nullptr ? logits->data_ptr<T>() : nullptr;

  at::parallel_for(0, slices, 1, [&](int64_t begin, int64_t end) {
    // Per-thread workspace: quantized operands and one N x N block (logits, then P).
    SliceOperands<T> x(in.quant, N, d, in.opts);
    at::Tensor pbuf = at::empty({N, N}, in.opts);
    at::Tensor abuf = lp != nullptr ? at::Tensor() : pbuf;  // without returned logits, P overwrites A
    T* pptr = pbuf.data_ptr<T>();
    for (int64_t s = begin; s < end; ++s) {
      const int64_t off = s * N * d;
      x.load(in, s);
      at::Tensor a2 = lp != nullptr ? wrap(lp + s * N * N, N, N, in.opts) : abuf;
      at::mm_out(a2, x.q, x.k.t());
      const T* ap = a2.data_ptr<T>();
      for (int64_t i = 0; i < N; ++i) {
        softmax_row(ap + i * N, pptr + i * N, N, in.scale);
        if (in.quant) fake_quant(pptr + i * N, pptr + i * N, N, in.fq[2]);
      }
      at::Tensor o2 = wrap(op + off, N, d, in.opts);
      at::mm_out(o2, pbuf, x.v);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> fq_attention_cpu(const at::Tensor& q, const at::Tensor& k,
                                                    const at::Tensor& v,
                                                    const c10::optional<at::Tensor>& step,
                                                    const c10::optional<at::Tensor>& zero_point,
                                                    at::IntArrayRef qmin, at::IntArrayRef qmax,
                                                    double scale, bool return_logits) {
  const auto shape = checks::check_fq_attention_tensors(q, k, v, step, zero_point, qmin, qmax, scale,
                                                        kCpuDtypes, /*strided=*/true);
  Problem pb{shape[0], shape[1], shape[2], shape[3], scale,
             checks::read_quant_spec(step, zero_point, qmin, qmax)};
  at::Tensor out = at::empty_like(q, at::MemoryFormat::Contiguous);
  at::Tensor logits = return_logits ? at::empty({pb.B, pb.H, pb.N, pb.N}, q.options())
                                    : at::empty({0}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "fq_attention_cpu", [&] {
    forward_kernel<scalar_t>(q, k, v, out, return_logits ? &logits : nullptr, pb);
  });
  return {out, logits};
}

// ---------------------------------------------------------------------------------------
// Backward: recomputes A and P per slice, then
//   dP̂ = dO·v̂ᵀ, dv̂ = P̂ᵀ·dO, dA = scale·P∘(dP − rowsum(dP∘P)) + dA_returned,
//   dq̂ = dA·k̂, dk̂ = dAᵀ·q̂, and the STE/LSQ steps through the four quantizers.

template <typename T>
void backward_kernel(const at::Tensor& grad_out, const T* grad_logits, const at::Tensor& q,
                     const at::Tensor& k, const at::Tensor& v, at::Tensor& gq, at::Tensor& gk,
                     at::Tensor& gv, std::vector<double>& sums, const Problem& pb) {
  const int64_t N = pb.N, d = pb.d, slices = pb.B * pb.H;
  const SliceInputs<T> in(q, k, v, pb);
  const T* gop = grad_out.data_ptr<T>();
  T* gqp = gq.data_ptr<T>();
  T* gkp = gk.data_ptr<T>();
  T* gvp = gv.data_ptr<T>();

  at::parallel_for(0, slices, 1, [&](int64_t begin, int64_t end) {
    SliceOperands<T> x(in.quant, N, d, in.opts);
    at::Tensor pbuf = at::empty({N, N}, in.opts);                        // A, then P
    at::Tensor phbuf = in.quant ? at::empty({N, N}, in.opts) : pbuf;     // P̂
    at::Tensor gbuf = at::empty({N, N}, in.opts);                        // dP̂ -> dP -> dA
    T* pptr = pbuf.data_ptr<T>();
    T* phptr = phbuf.data_ptr<T>();
    T* gptr = gbuf.data_ptr<T>();
    for (int64_t s = begin; s < end; ++s) {
      const int64_t off = s * N * d;
      double* acc = &sums[s * 8];  // (α, z) sums of the q, k, p, v quantizers
      x.load(in, s);
      at::mm_out(pbuf, x.q, x.k.t());
      for (int64_t i = 0; i < N; ++i) {
        softmax_row(pptr + i * N, pptr + i * N, N, in.scale);
        if (in.quant) fake_quant(pptr + i * N, phptr + i * N, N, in.fq[2]);
      }
      at::Tensor go2 = wrap(gop + off, N, d, in.opts);
      at::Tensor gv2 = wrap(gvp + off, N, d, in.opts);
      at::mm_out(gbuf, go2, x.v.t());     // dP̂
      at::mm_out(gv2, phbuf.t(), go2);   // dv̂
      const T* gl = grad_logits != nullptr ? grad_logits + s * N * N : nullptr;
      for (int64_t i = 0; i < N; ++i) {
        if (in.quant) fake_quant_backward(pptr + i * N, gptr + i * N, N, in.fq[2], &acc[4], &acc[5]);
        softmax_backward_row(pptr + i * N, gptr + i * N, gl != nullptr ? gl + i * N : nullptr, N,
                             in.scale);
      }
      at::Tensor gq2 = wrap(gqp + off, N, d, in.opts);
      at::Tensor gk2 = wrap(gkp + off, N, d, in.opts);
      at::mm_out(gq2, gbuf, x.k);        // dq̂
      at::mm_out(gk2, gbuf.t(), x.q);    // dk̂
      if (in.quant) {
        fake_quant_backward_rows(in.slice(0, s), in.row_stride(0), gqp + off, N, d, in.fq[0], &acc[0]);
        fake_quant_backward_rows(in.slice(1, s), in.row_stride(1), gkp + off, N, d, in.fq[1], &acc[2]);
        fake_quant_backward_rows(in.slice(2, s), in.row_stride(2), gvp + off, N, d, in.fq[3], &acc[6]);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fq_attention_backward_cpu(
    const at::Tensor& grad_out, const c10::optional<at::Tensor>& grad_logits, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& step,
    const c10::optional<at::Tensor>& zero_point, at::IntArrayRef qmin, at::IntArrayRef qmax,
    double scale) {
  const auto shape = checks::check_fq_attention_tensors(q, k, v, step, zero_point, qmin, qmax, scale,
                                                        kCpuDtypes, /*strided=*/true);
  checks::check_fq_attention_grads(grad_out, grad_logits, q, kCpuDtypes);
  Problem pb{shape[0], shape[1], shape[2], shape[3], scale,
             checks::read_quant_spec(step, zero_point, qmin, qmax)};
  at::Tensor gq = at::empty_like(q, at::MemoryFormat::Contiguous);
  at::Tensor gk = at::empty_like(k, at::MemoryFormat::Contiguous);
  at::Tensor gv = at::empty_like(v, at::MemoryFormat::Contiguous);
  const int64_t slices = pb.B * pb.H;
  std::vector<double> sums(static_cast<size_t>(slices) * 8, 0.0);
  const bool has_gl = grad_logits.has_value() && grad_logits->defined();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "fq_attention_backward_cpu", [&] {
    backward_kernel<scalar_t>(grad_out, has_gl ? grad_logits->data_ptr<scalar_t>() : nullptr, q, k, v,
                              gq, gk, gv, sums, pb);
  });

  at::Tensor gstep = at::empty({0}, q.options());
  at::Tensor gzp = at::empty({0}, q.options());
  if (pb.spec.enabled) {
    // Slice partials summed in slice order: the result does not depend on the thread count.
    double total[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t s = 0; s < slices; ++s)
      for (int j = 0; j < 8; ++j) total[j] += sums[s * 8 + j];
    auto ga = at::empty({4}, at::TensorOptions().dtype(at::kDouble));
    auto gz = at::empty({4}, at::TensorOptions().dtype(at::kDouble));
    for (int i = 0; i < 4; ++i) {
      const double g = checks::lsq_grad_scale(pb.operand_numel(i), pb.spec.qmax[i]);
      ga.data_ptr<double>()[i] = total[2 * i] * g;  // the zero point's gradient is not scaled
      gz.data_ptr<double>()[i] = total[2 * i + 1];
    }
    gstep = ga.to(step->scalar_type());
    if (pb.spec.has_zero_point) gzp = gz.to(zero_point->scalar_type());
  }
  return {gq, gk, gv, gstep, gzp};
}

}  // namespace

TORCH_LIBRARY_IMPL(maskaq, CPU, m) {
  m.impl("fq_attention", &fq_attention_cpu);
  m.impl("fq_attention_backward", &fq_attention_backward_cpu);
}

}  // namespace maskaq
