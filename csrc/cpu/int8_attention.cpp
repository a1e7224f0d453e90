// maskaq::int8_attention on CPU: attention on integer q, k, v and an integer P (IntAttention).
//
// Work is split over the B*H (batch, head) slices with at::parallel_for, as fq_attention. The two
// products run through ATen's BLAS (at::mm_out) on the integers stored as floating point, which is
// exact while every partial sum stays below 2^24 in float32 (the usual ViT case: 8-bit operands,
// d <= 64, N <= 197); where the checked bounds of the sums say float32 could round, the slice runs
// in float64 (exact below 2^53), so the result is the exact int32 product in every case. The
// softmax is ATen's own (at::_softmax_out) on the float32 logits, so the probabilities are the
// plain-PyTorch reference's bit for bit and so are their integer levels.
#include "checks.h"
#include "float_math.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

namespace maskaq {
namespace {

constexpr int64_t kFloatExact = int64_t(1) << 24;  // integers below this add exactly in float32

// dst[i] = src[i] − zero_point as T (exact: small integers).
template <typename T>
inline void widen(const int8_t* src, T* dst, int64_t n, int64_t zero_point) {
  const T z = static_cast<T>(zero_point);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]) - z;
}

struct PQuant {  // P̃ = clamp(round(P / step) + z, qmin, qmax) − z
  float step, zero_point, lo, hi, t_lo, t_hi;
};

// In place over one (N, N) block: probabilities p (float32) -> their integers P̃ (as T in `dst`).
template <typename T>
inline void quantize_probs(const float* p, T* dst, int64_t n, const PQuant& pq) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    float t = p[i] / pq.step;  // exact division, as torch.div
    // P >= 0 and finite; the clamp keeps round_small in its range (step may be tiny)
    t = t > pq.t_lo ? t : pq.t_lo;
    t = t < pq.t_hi ? t : pq.t_hi;
    float u = fmath::round_small(t) + pq.zero_point;
    u = u > pq.lo ? u : pq.lo;
    u = u < pq.hi ? u : pq.hi;
    dst[i] = static_cast<T>(u - pq.zero_point);
  }
}

struct Args {
  int64_t slices, N, d;
  float scale_qk;
  PQuant pq;
  int64_t zq, zk, zv;
};

// T: the type the products run in (float: exact by the bounds; double otherwise).
template <typename T>
void run(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out, const Args& a) {
  const int64_t N = a.N, d = a.d;
  const auto opts = q.options().dtype(std::is_same<T, float>::value ? at::kFloat : at::kDouble);
  const auto fopts = q.options().dtype(at::kFloat);
  const int8_t* qp = q.data_ptr<int8_t>();
  const int8_t* kp = k.data_ptr<int8_t>();
  const int8_t* vp = v.data_ptr<int8_t>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, a.slices, 1, [&](int64_t begin, int64_t end) {
    // Per-thread workspace.
    at::Tensor qt = at::empty({N, d}, opts), kt = at::empty({N, d}, opts), vt = at::empty({N, d}, opts);
    at::Tensor scores = at::empty({N, N}, opts);   // S, then P̃
    at::Tensor logits = std::is_same<T, float>::value ? scores : at::empty({N, N}, fopts);
    at::Tensor probs = at::empty({N, N}, fopts);
    at::Tensor out_t = std::is_same<T, float>::value ? at::Tensor() : at::empty({N, d}, opts);
    T* sp = scores.data_ptr<T>();
    float* lp = logits.data_ptr<float>();
    const float* pp = probs.data_ptr<float>();
    for (int64_t s = begin; s < end; ++s) {
      const int64_t off = s * N * d;
      widen(qp + off, qt.data_ptr<T>(), N * d, a.zq);
      widen(kp + off, kt.data_ptr<T>(), N * d, a.zk);
      widen(vp + off, vt.data_ptr<T>(), N * d, a.zv);
      at::mm_out(scores, qt, kt.t());  // S = q̃·k̃ᵀ, exact
      // logits = float(S)·scale_qk, rounded like the reference's S.float() * scale_qk
      const float c = a.scale_qk;
#pragma omp simd
      for (int64_t i = 0; i < N * N; ++i) lp[i] = static_cast<float>(sp[i]) * c;
      at::_softmax_out(probs, logits, 1, false);
      quantize_probs(pp, sp, N * N, a.pq);
      if constexpr (std::is_same<T, float>::value) {
        at::Tensor dst = at::from_blob(op + off, {N, d}, fopts);
        at::mm_out(dst, scores, vt);  // O = P̃·ṽ, exact, straight into the output
      } else {
        at::mm_out(out_t, scores, vt);
        const double* src = out_t.data_ptr<double>();
        float* dst = op + off;
#pragma omp simd
        for (int64_t i = 0; i < N * d; ++i) dst[i] = static_cast<float>(src[i]);
      }
    }
  });
}

at::Tensor int8_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale_qk,
                              double p_step, int64_t p_zero_point, int64_t p_qmin, int64_t p_qmax,
                              int64_t q_zero_point, int64_t k_zero_point, int64_t v_zero_point) {
  const checks::Int8AttentionSpec spec = checks::check_int8_attention(
      q, k, v, scale_qk, p_step, p_zero_point, p_qmin, p_qmax, q_zero_point, k_zero_point, v_zero_point);
  TORCH_CHECK_VALUE(q.device().is_cpu(), "int8_attention (CPU kernel): q, k, v must be CPU tensors, got ",
                    q.device());
  at::Tensor out = at::empty(q.sizes(), q.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  Args a{};
  a.slices = spec.B * spec.H, a.N = spec.N, a.d = spec.d;
  a.scale_qk = static_cast<float>(scale_qk);
  a.pq.step = static_cast<float>(p_step);
  a.pq.zero_point = static_cast<float>(p_zero_point);
  a.pq.lo = static_cast<float>(p_qmin);
  a.pq.hi = static_cast<float>(p_qmax);
  a.pq.t_lo = static_cast<float>(p_qmin - p_zero_point - 1);
  a.pq.t_hi = static_cast<float>(p_qmax - p_zero_point + 1);
  a.zq = q_zero_point, a.zk = k_zero_point, a.zv = v_zero_point;
  if (spec.score_bound < kFloatExact && spec.out_bound < kFloatExact) {
    run<float>(q, k, v, out, a);
  } else {
    run<double>(q, k, v, out, a);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(maskaq, CPU, m) { m.impl("int8_attention", &int8_attention_cpu); }

}  // namespace maskaq
