// The integer-inference kernels on CPU (integer.cu is their CUDA twin):
//
// maskaq::int8_linear_epilogue: y = acc·scale + bias (+ erf GELU), returned as float32 or
// requantized to uint8 / int8, in one pass over the int32 accumulators of an int8 GEMM. Rows are
// split with at::parallel_for. Each row runs 8 columns at a time in explicit 8-lane vectors
// (vec8.h: GCC/Clang vector extensions, built for AVX-512, AVX2 and baseline x86-64 and picked at
// load time; auto-vectorization gives up on the selects of erf and the requantizer under
// -ftrapping-math), the remaining columns in scalar code that performs the same operations, so
// every column gets the same bits. The arithmetic is the reference's, operation by operation:
// float(acc)·scale rounded, then + bias rounded (no FMA: see below), an exact division by the
// step (not a multiplication by its reciprocal), round half to even. GELU's erf is float_math.h's
// (Abramowitz & Stegun's formula, as torch's own vectorized erf; GELU within 5e-7 of double
// precision), so a requantized GELU output may differ from the reference by one level where y/step
// lies that close to a tie.
//
// maskaq::int8_attention: attention on integer q, k, v and an integer P (IntAttention). Work is
// split over the B*H (batch, head) slices. On CPUs whose ATen capability is AVX2 (no AVX-512) the
// two products run on maskaq's exact int16 GEMM (int8_gemm.cpp), which does twice the multiply-adds
// per instruction of float32 FMA there and makes the whole op faster than BLAS would
// (docs/integer-inference.md#measurements-behind-the-smaller-cpu-choices). On CPUs with AVX512-VNNI
// they run on oneDNN's int8 GEMM (at::_int_mm), exact int32 accumulators at four times float32's
// multiply-adds per instruction, where a probe shows it exact (run_int8mm). Elsewhere they run
// through ATen's BLAS (at::mm_out) on the integers stored as floating point, which is exact while
// every partial sum stays below 2^24 in float32 (the usual ViT case: 8-bit operands, d <= 64,
// N <= 197); where the checked bounds of the sums say float32 could round, the slice runs in
// float64 (exact below 2^53). Either way the result is the exact int32 product. The softmax is ATen's own
// (at::_softmax_out) on the float32 logits, so the probabilities are the plain-PyTorch reference's
// bit for bit, and so are their integer levels (the epilogue's requantizer).
#include "checks.h"
#include "int16_gemm.h"

#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "fp_contract_off_begin.h"  // acc·scale + bias rounded twice, as the reference does

#include "float_math.h"
#include "vec8.h"

namespace maskaq {
namespace {

// =============================================================================================
// int8_linear_epilogue
// =============================================================================================
enum class OutKind : int { kFloat = 0, kUint8 = 1, kInt8 = 2 };

// The requantizer: clamp(round(y / step) + z, lo, hi), computed as
// clamp(round(clamp(y / step, lo − z − 1, hi − z + 1)) + z, lo, hi) (the same result; the inner
// clamp keeps round_small in range, and its comparisons send NaN to lo, the documented NaN -> qmin).
inline float requantize(float y, const checks::Requant& rq) {
  float t = y / rq.step;
  t = t > rq.t_lo ? t : rq.t_lo;
  t = t < rq.t_hi ? t : rq.t_hi;
  float u = fmath::round_small(t) + rq.zero_point;
  u = u > rq.lo ? u : rq.lo;
  return u < rq.hi ? u : rq.hi;
}

inline float epilogue_value(int32_t a, float s, float b, bool gelu) {
  float y = static_cast<float>(a) * s;
  y = y + b;
  return gelu ? fmath::gelu(y) : y;
}

inline void store_scalar(void* out, int64_t j, float y, OutKind kind, const checks::Requant& rq) {
  switch (kind) {
    case OutKind::kFloat:
      static_cast<float*>(out)[j] = y;
      break;
    case OutKind::kUint8:  // an integer in [lo, hi] ⊂ [0, 255]: the conversions are exact
      static_cast<uint8_t*>(out)[j] = static_cast<uint8_t>(static_cast<int32_t>(requantize(y, rq)));
      break;
    case OutKind::kInt8:
      static_cast<int8_t*>(out)[j] = static_cast<int8_t>(static_cast<int32_t>(requantize(y, rq)));
      break;
  }
}

#if defined(MASKAQ_SIMD)

// The lane-wise twins of float_math.h's erf_float / gelu (exp_bounded's is in vec8.h): same
// operations, same order.
MASKAQ_VINLINE vf8 verf(vf8 x) {
  using namespace fmath;
  const vi8 sign = (vi8)x & static_cast<int32_t>(0x80000000u);
  const vf8 a = (vf8)((vi8)x & 0x7fffffff);
  const vf8 t = 1.0f / (1.0f + kErfP * a);
  const vf8 poly = horner(t, kErfPoly) * t;
  const vf8 e = vexp_bounded(vmax_keep(-(a * a), vsplat(kExpFloor)));
  return (vf8)((vi8)(1.0f - poly * e) | sign);
}

MASKAQ_VINLINE vf8 vgelu(vf8 x) { return x * 0.5f * (1.0f + verf(x * fmath::kSqrtHalf)); }

// The levels of the quotient t = y / step, lane by lane: clamp, round, add the zero point, clamp;
// integers in [lo, hi] as floats.
MASKAQ_VINLINE vf8 vlevels_of_quotient(vf8 t, const checks::Requant& rq) {
  const vf8 t_lo = vsplat(rq.t_lo), t_hi = vsplat(rq.t_hi), lo = vsplat(rq.lo), hi = vsplat(rq.hi);
  t = vselect(t > t_lo, t, t_lo);
  t = vselect(t < t_hi, t, t_hi);
  vf8 u = vround_small(t) + rq.zero_point;
  u = vselect(u > lo, u, lo);
  return vselect(u < hi, u, hi);
}

// requantize lane by lane: the levels, integers in [lo, hi] as floats.
MASKAQ_VINLINE vf8 vrequantize_levels(vf8 y, const checks::Requant& rq) {
  return vlevels_of_quotient(y / rq.step, rq);
}

MASKAQ_VINLINE vi8 vrequantize(vf8 y, const checks::Requant& rq) {
  return __builtin_convertvector(vrequantize_levels(y, rq), vi8);  // exact: integers in [lo, hi]
}

// vrequantize for a grid of step 1, without the division: y / 1 is y exactly (NaN and signed zeros
// included), so the levels are vrequantize's.
MASKAQ_VINLINE vi8 vround_clamp(vf8 y, const checks::Requant& rq) {
  return __builtin_convertvector(vlevels_of_quotient(y, rq), vi8);
}

MASKAQ_VINLINE vf8 epilogue_vector(const int32_t* acc, const float* scale, const float* bias, bool gelu) {
  vf8 y = __builtin_convertvector(vload<vi8>(acc), vf8) * vload<vf8>(scale);
  y = y + vload<vf8>(bias);
  return gelu ? vgelu(y) : y;
}

MASKAQ_VINLINE void store_vector(void* out, int64_t j, vf8 y, OutKind kind, const checks::Requant& rq) {
  switch (kind) {
    case OutKind::kFloat:
      vstore(static_cast<float*>(out) + j, y);
      break;
    case OutKind::kUint8:
      vstore(static_cast<uint8_t*>(out) + j, vlow_bytes(vrequantize(y, rq)));
      break;
    case OutKind::kInt8:
      vstore(static_cast<int8_t*>(out) + j, vlow_bytes(vrequantize(y, rq)));  // two's complement bytes
      break;
  }
}

// One row of `cols` columns; `gelu` and `kind` are loop-invariant (the branches predict perfectly).
MASKAQ_CLONES void epilogue_row(const int32_t* acc, const float* scale, const float* bias, void* out,
                                int64_t cols, bool gelu, OutKind kind, const checks::Requant& rq) {
  const int64_t nv = cols - cols % kLanes;
  for (int64_t j = 0; j < nv; j += kLanes)
    store_vector(out, j, epilogue_vector(acc + j, scale + j, bias + j, gelu), kind, rq);
  for (int64_t j = nv; j < cols; ++j) store_scalar(out, j, epilogue_value(acc[j], scale[j], bias[j], gelu), kind, rq);
}
#else
void epilogue_row(const int32_t* acc, const float* scale, const float* bias, void* out, int64_t cols, bool gelu,
                  OutKind kind, const checks::Requant& rq) {
  for (int64_t j = 0; j < cols; ++j) store_scalar(out, j, epilogue_value(acc[j], scale[j], bias[j], gelu), kind, rq);
}
#endif  // MASKAQ_SIMD

at::Tensor int8_linear_epilogue_cpu(const at::Tensor& acc, const at::Tensor& scale, const at::Tensor& bias,
                                    c10::string_view activation, double out_step, int64_t out_zero_point,
                                    int64_t out_qmin, int64_t out_qmax) {
  const checks::EpilogueSpec spec = checks::check_int8_linear_epilogue(
      acc, scale, bias, activation, out_step, out_zero_point, out_qmin, out_qmax);
  MASKAQ_CHECK_VALUE(acc.device().is_cpu(), "int8_linear_epilogue (CPU kernel): acc must be a CPU tensor, got ",
                    acc.device());
  at::Tensor out = at::empty(acc.sizes(), acc.options().dtype(spec.out_dtype));
  if (acc.numel() == 0) return out;
  const checks::Requant rq = checks::requant_grid(spec);
  const OutKind kind = spec.out_dtype == at::kByte ? OutKind::kUint8
                       : spec.out_dtype == at::kChar ? OutKind::kInt8
                                                     : OutKind::kFloat;
  const bool gelu = spec.activation == checks::Activation::kGelu;
  const int64_t rows = acc.size(0), cols = acc.size(1);
  const int32_t* a = acc.data_ptr<int32_t>();
  const float* s = scale.data_ptr<float>();
  const float* b = bias.data_ptr<float>();
  char* o = static_cast<char*>(out.data_ptr());
  const int64_t row_bytes = cols * static_cast<int64_t>(out.element_size());
  // About 32K elements per task: enough work to amortize a thread wake-up.
  const int64_t grain = std::max<int64_t>(1, 32768 / cols);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) epilogue_row(a + r * cols, s, b, o + r * row_bytes, cols, gelu, kind, rq);
  });
  return out;
}

// =============================================================================================
// int8_attention
// =============================================================================================
constexpr int64_t kFloatExact = int64_t(1) << 24;  // integers below this add exactly in float32

// dst[i] = src[i] − zero_point as T (exact: small integers).
template <typename T>
inline void widen(const int8_t* src, T* dst, int64_t n, int64_t zero_point) {
  const T z = static_cast<T>(zero_point);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]) - z;
}

template <typename T>
inline void quantize_probs_scalar(const float* p, T* dst, int64_t n, const checks::Requant& pq) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(requantize(p[i], pq) - pq.zero_point);
}

#if defined(MASKAQ_SIMD)
// The float32 case 8 lanes at a time, the same operations (vrequantize_levels): the loop above
// stays scalar (its division and selects do not auto-vectorize under -ftrapping-math).
MASKAQ_CLONES void quantize_probs_float(const float* p, float* dst, int64_t n, const checks::Requant& pq) {
  const int64_t nv = n - n % kLanes;
  for (int64_t i = 0; i < nv; i += kLanes) vstore(dst + i, vrequantize_levels(vload(p + i), pq) - pq.zero_point);
  quantize_probs_scalar(p + nv, dst + nv, n - nv, pq);
}
#endif

// In place over one (N, N) block: probabilities p (float32) -> their integers P̃ = level − z (as T
// in `dst`), the requantizer's levels (P >= 0 and finite; its clamp keeps round_small in range).
template <typename T>
inline void quantize_probs(const float* p, T* dst, int64_t n, const checks::Requant& pq) {
#if defined(MASKAQ_SIMD)
  if constexpr (std::is_same<T, float>::value) return quantize_probs_float(p, dst, n, pq);
#endif
  quantize_probs_scalar(p, dst, n, pq);
}

// Requantized values as int8 level − offset: P's levels for the int8 GEMM (offset = qmin + 128 puts
// any 8-bit grid into int8), and q, k, v from qkv's output (step 1, zero point 0: clamp(round(x), lo,
// hi) − shift).
inline void requantize_s8_scalar(const float* src, int8_t* dst, int64_t n, const checks::Requant& rq, int32_t offset) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<int8_t>(static_cast<int32_t>(requantize(src[i], rq)) - offset);
}

#if defined(MASKAQ_SIMD)
// The bytes level − offset of n values, 8 lanes at a time (vround_clamp on a grid of step 1, else
// vrequantize) and the scalar requantizer on the tail; inlined into each instruction-set clone below.
template <bool kUnitStep>
MASKAQ_VINLINE void requantize_s8_lanes(const float* src, int8_t* dst, int64_t n, const checks::Requant& rq,
                                        int32_t offset) {
  const int64_t nv = n - n % kLanes;
  const vi8 o = vi8{} + offset;
  for (int64_t i = 0; i < nv; i += kLanes) {
    const vf8 y = vload(src + i);
    const vi8 levels = kUnitStep ? vround_clamp(y, rq) : vrequantize(y, rq);
    vstore(dst + i, (vs8)vlow_bytes(levels - o));
  }
  requantize_s8_scalar(src + nv, dst + nv, n - nv, rq, offset);
}

MASKAQ_CLONES void requantize_s8(const float* src, int8_t* dst, int64_t n, const checks::Requant& rq, int32_t offset) {
  requantize_s8_lanes<false>(src, dst, n, rq, offset);
}

// requantize_s8 on a grid of step 1 (q, k and v from the folded qkv output).
MASKAQ_CLONES void round_clamp_s8(const float* src, int8_t* dst, int64_t n, const checks::Requant& rq, int32_t offset) {
  requantize_s8_lanes<true>(src, dst, n, rq, offset);
}
#else
inline void requantize_s8(const float* src, int8_t* dst, int64_t n, const checks::Requant& rq, int32_t offset) {
  requantize_s8_scalar(src, dst, n, rq, offset);
}

inline void round_clamp_s8(const float* src, int8_t* dst, int64_t n, const checks::Requant& rq, int32_t offset) {
  requantize_s8_scalar(src, dst, n, rq, offset);
}
#endif

// P's levels as uint8 level − qmin (the int16 GEMM's activations, zero point z − qmin): the bytes of
// requantize_s8 with offset qmin (level − qmin ∈ [0, 255], stored modulo 256).
inline void quantize_probs_u8(const float* p, uint8_t* dst, int64_t n, const checks::Requant& pq) {
  requantize_s8(p, reinterpret_cast<int8_t*>(dst), n, pq, static_cast<int32_t>(pq.lo));
}

struct Args {
  int64_t slices, N, d;
  float scale_qk;
  checks::Requant pq;  // P's requantizer
  int64_t zq, zk, zv;
  int64_t H = 1;          // heads: slice s is (sample s / H, head s % H)
  bool token_major = false;  // O laid out (B, N, H·d), as proj reads it, instead of (B, H, N, d)
};

// Where slice s of O starts and the stride between its rows, in either layout of Args.
inline float* out_slice(float* op, int64_t s, const Args& a) {
  return a.token_major ? op + (s / a.H) * a.N * a.H * a.d + (s % a.H) * a.d : op + s * a.N * a.d;
}
inline int64_t out_stride(const Args& a) { return a.token_major ? a.H * a.d : a.d; }

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
        at::Tensor dst = at::from_blob(out_slice(op, s, a), {N, d}, {out_stride(a), 1}, fopts);
        at::mm_out(dst, scores, vt);  // O = P̃·ṽ, exact, straight into the output
      } else {
        at::mm_out(out_t, scores, vt);
        const double* src = out_t.data_ptr<double>();
        float* dst = out_slice(op, s, a);
        const int64_t ld = out_stride(a);
        for (int64_t i = 0; i < N; ++i) {
#pragma omp simd
          for (int64_t j = 0; j < d; ++j) dst[i * ld + j] = static_cast<float>(src[i * d + j]);
        }
      }
    }
  });
}

// Σ_j x[i, j] of the rows of an int8 (rows, cols) block.
inline void row_sums(const int8_t* x, int64_t rows, int64_t cols, uint32_t* out) {
  for (int64_t i = 0; i < rows; ++i) {
    int32_t s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < cols; ++j) s += x[i * cols + j];
    out[i] = static_cast<uint32_t>(s);
  }
}

// The same on ATen's int8 GEMM (at::_int_mm; on the CPU oneDNN's, exact int32 accumulators where the
// CPU adds u8·s8 pairs in int32: VNNI, AMX; see int_mm_exact), on the stored int8 values. The zero
// points come back as rank-one corrections:
//   S = Σ (q − z_q)(k − z_k) = q·kᵀ − z_k·Σq − z_q·Σk + d·z_q·z_k,
//   O = Σ (p + c)(v − z_v)   = p·v − z_v·Σp + c·Σv − c·z_v·N,  with P̃ = p + c, p = level − (qmin + 128).
// They are added modulo 2^32 (uint32): S and O fit int32 (check_int8_attention bounds them), so the
// wrapped sum is exactly their value whatever the terms.
void run_int8mm(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out, const Args& a) {
  const int64_t N = a.N, d = a.d;
  const auto fopts = q.options().dtype(at::kFloat), iopts = q.options().dtype(at::kInt);
  const int8_t* qp = q.data_ptr<int8_t>();
  const int8_t* kp = k.data_ptr<int8_t>();
  const int8_t* vp = v.data_ptr<int8_t>();
  float* op = out.data_ptr<float>();
  const int64_t offset = static_cast<int64_t>(a.pq.lo) + 128;
  const auto u32 = [](int64_t x) { return static_cast<uint32_t>(x); };  // two's complement, mod 2^32
  const uint32_t zq = u32(a.zq), zk = u32(a.zk), zv = u32(a.zv), c = u32(offset - static_cast<int64_t>(a.pq.zero_point));
  at::parallel_for(0, a.slices, 1, [&](int64_t begin, int64_t end) {
    at::Tensor scores = at::empty({N, N}, iopts), prod = at::empty({N, d}, iopts);
    at::Tensor logits = at::empty({N, N}, fopts), probs = at::empty({N, N}, fopts);
    at::Tensor levels = at::empty({N, N}, q.options());
    std::vector<uint32_t> row(N), col(std::max(N, d));
    const uint32_t* sp = reinterpret_cast<const uint32_t*>(scores.data_ptr<int32_t>());
    const uint32_t* pr = reinterpret_cast<const uint32_t*>(prod.data_ptr<int32_t>());
    float* lp = logits.data_ptr<float>();
    int8_t* lv = levels.data_ptr<int8_t>();
    const float scale = a.scale_qk;
    for (int64_t s = begin; s < end; ++s) {
      const int64_t off = s * N * d;
      // at::from_blob does not write through its pointer; the operands stay the caller's.
      const at::Tensor qs = at::from_blob(const_cast<int8_t*>(qp + off), {N, d}, q.options());
      const at::Tensor ks = at::from_blob(const_cast<int8_t*>(kp + off), {N, d}, q.options());
      const at::Tensor vs = at::from_blob(const_cast<int8_t*>(vp + off), {N, d}, q.options());
      at::_int_mm_out(scores, qs, ks.t());
      // row[i] = d·z_q·z_k − z_k·Σq_i, col[j] = −z_q·Σk_j (zero without zero points)
      std::fill(row.begin(), row.end(), 0u);
      std::fill(col.begin(), col.end(), 0u);
      if (a.zk != 0) {
        row_sums(qp + off, N, d, row.data());
        for (int64_t i = 0; i < N; ++i) row[i] = u32(d) * zq * zk - zk * row[i];
      }
      if (a.zq != 0) {
        row_sums(kp + off, N, d, col.data());
        for (int64_t j = 0; j < N; ++j) col[j] = 0u - zq * col[j];
      }
      for (int64_t i = 0; i < N; ++i) {
        const uint32_t* si = sp + i * N;
        float* li = lp + i * N;
        const uint32_t ri = row[i];
#pragma omp simd
        for (int64_t j = 0; j < N; ++j) li[j] = static_cast<float>(static_cast<int32_t>(si[j] + ri + col[j])) * scale;
      }
      at::_softmax_out(probs, logits, 1, false);
      requantize_s8(probs.data_ptr<float>(), lv, N * N, a.pq, static_cast<int32_t>(offset));
      at::_int_mm_out(prod, levels, vs);
      // row[i] = −z_v·Σp_i − c·z_v·N, col[j] = c·Σv_j
      std::fill(row.begin(), row.end(), 0u - c * zv * u32(N));
      if (a.zv != 0) {
        row_sums(lv, N, N, col.data());  // col as scratch for Σp
        for (int64_t i = 0; i < N; ++i) row[i] -= zv * col[i];
      }
      std::fill(col.begin(), col.end(), 0u);
      if (c != 0) {
        for (int64_t i = 0; i < N; ++i) {
          const int8_t* vi = vp + off + i * d;
#pragma omp simd
          for (int64_t j = 0; j < d; ++j) col[j] += u32(vi[j]);
        }
        for (int64_t j = 0; j < d; ++j) col[j] *= c;
      }
      float* dst = out_slice(op, s, a);
      for (int64_t i = 0; i < N; ++i) {
        const uint32_t* pi = pr + i * d;
        float* oi = dst + i * out_stride(a);
        const uint32_t ri = row[i];
#pragma omp simd
        for (int64_t j = 0; j < d; ++j) oi[j] = static_cast<float>(static_cast<int32_t>(pi[j] + ri + col[j]));
      }
    }
  });
}

// (The compiler's CPU check, not ATen's: ATen renamed its function between the torch versions maskaq
// supports.)
inline bool cpu_has_avx512_vnni() {
#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
  return __builtin_cpu_supports("avx512vnni");
#else
  return false;
#endif
}

// Whether at::_int_mm runs oneDNN's int8 GEMM with exact int32 accumulators here: only CPUs with
// AVX512-VNNI (without it ATen may take a scalar loop, and oneDNN multiplies u8·s8 with vpmaddubsw,
// which clips each pair sum to int16). Probed once on operands whose every pair overflows int16 (as
// maskaq.integer.cpu_gemm's probe), so library settings such as DNNL_MAX_CPU_ISA count; false where
// the op is missing or fails.
bool int_mm_exact() {
  static const bool exact = [] {
    if (!cpu_has_avx512_vnni()) return false;
    try {
      const int64_t m = 32, kk = 64, n = 16;
      const auto opts = at::TensorOptions().dtype(at::kChar);
      at::Tensor s = at::full({m, kk}, 127, opts);
      at::Tensor w = at::empty({n, kk}, opts);
      for (int64_t i = 0; i < n; ++i) w[i].fill_(i % 2 == 0 ? 127 : -128);
      const at::Tensor got = at::_int_mm(s, w.t());
      const int32_t* g = got.data_ptr<int32_t>();
      for (int64_t i = 0; i < m; ++i)
        for (int64_t j = 0; j < n; ++j)
          if (g[i * n + j] != 127 * kk * (j % 2 == 0 ? 127 : -128)) return false;
      return true;
    } catch (const std::exception&) {
      return false;
    }
  }();
  return exact;
}

// The same on maskaq's int16 GEMM (int16_gemm.h), for CPUs whose best float32 GEMM is AVX2's: q̃·k̃ᵀ
// and P̃·ṽ with exact int32 accumulators at twice the multiply-adds per instruction of float32 FMA.
// The logits come out of the GEMM's epilogue as float(S)·scale_qk, the reference's rounding.
void run_int16(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out, const Args& a) {
  const int64_t N = a.N, d = a.d;
  const auto fopts = q.options().dtype(at::kFloat);
  const int8_t* qp = q.data_ptr<int8_t>();
  const int8_t* kp = k.data_ptr<int8_t>();
  const int8_t* vp = v.data_ptr<int8_t>();
  float* op = out.data_ptr<float>();
  const int32_t p_lo = static_cast<int32_t>(a.pq.lo), p_zero = static_cast<int32_t>(a.pq.zero_point);
  at::parallel_for(0, a.slices, 1, [&](int64_t begin, int64_t end) {
    // Per-thread workspace; the packed weights' padding stays zero from here on.
    std::vector<int16_t> wk(int16_gemm::packed_size(N, d), 0), wv(int16_gemm::packed_size(d, N), 0);
    const std::vector<float> scale_qk(N, a.scale_qk), ones(d, 1.0f);
    std::vector<uint8_t> levels(N * N);
    std::vector<int32_t> scratch;
    at::Tensor logits = at::empty({N, N}, fopts), probs = at::empty({N, N}, fopts);
    for (int64_t s = begin; s < end; ++s) {
      const int64_t off = s * N * d;
      int16_gemm::pack(kp + off, N, d, d, 1, static_cast<int32_t>(a.zk), wk.data());  // k̃ as (N, d) weights
      int16_gemm::pack(vp + off, d, N, 1, d, static_cast<int32_t>(a.zv), wv.data());  // ṽᵀ as (d, N) weights
      // logits = float(q̃·k̃ᵀ)·scale_qk
      int16_gemm::run_serial({qp + off, true, d, N, d, static_cast<int32_t>(a.zq), wk.data(), N,
                              logits.data_ptr<float>(), N, scale_qk.data(), nullptr}, scratch);
      at::_softmax_out(probs, logits, 1, false);
      quantize_probs_u8(probs.data_ptr<float>(), levels.data(), N * N, a.pq);
      // O = P̃·ṽ, with P̃ = (level − qmin) − (z − qmin)
      int16_gemm::run_serial({levels.data(), false, N, N, N, p_zero - p_lo, wv.data(), d, out_slice(op, s, a), out_stride(a), ones.data(),
                              nullptr}, scratch);
    }
  });
}

// The int16 GEMM where ATen's float32 GEMM is AVX2's (on AVX-512 CPUs float32 FMA does as many
// multiply-adds per instruction), and where every operand x − z fits int16 (zero points may reach
// 2^16). Then no vpmaddwd pair sum overflows either (2·32767² < 2^31), and the accumulators are
// int32 by the spec's checked bounds.
bool use_int16_products(const checks::Int8AttentionSpec& spec, const Args& a) {
  static const bool avx2_only = at::get_cpu_capability() == std::string("AVX2");  // honours ATEN_CPU_CAPABILITY
  if (!avx2_only) return false;
  const int64_t p_mag = std::max(std::abs(spec.p_lo), std::abs(spec.p_hi));
  return std::max({p_mag, checks::int8_magnitude(a.zq), checks::int8_magnitude(a.zk), checks::int8_magnitude(a.zv)}) <=
         32767;
}

// ATen's int8 GEMM where it is exact (int_mm_exact) and its raw sums fit int32: |stored·stored| ≤ 2^14
// per product, over d or N terms. Both products sum over at least 2 terms: torch 2.4's CPU _int_mm
// returns uninitialized memory for an inner dimension of 1.
bool use_int8_products(const checks::Int8AttentionSpec& spec) {
  constexpr int64_t kTerms = (int64_t(1) << 31) / (int64_t(1) << 14);
  return spec.d >= 2 && spec.N >= 2 && spec.d < kTerms && spec.N < kTerms && int_mm_exact();
}

}  // namespace

// What runs int8_attention's two products on this CPU for the usual shapes (extension_info and
// maskaq.integer.cpu_gemm report it): "int16", "int8" or "float".
std::string int8_attention_products() {
  static const bool avx2_only = at::get_cpu_capability() == std::string("AVX2");
  if (avx2_only) return "int16";
  return int_mm_exact() ? "int8" : "float";
}

namespace {

// The two products and the softmax between them, on the path this CPU and these bounds allow.
void run_products(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                  const checks::Int8AttentionSpec& spec, const Args& a) {
  if (use_int16_products(spec, a)) {
    run_int16(q, k, v, out, a);
  } else if (use_int8_products(spec)) {
    run_int8mm(q, k, v, out, a);
  } else if (spec.score_bound < kFloatExact && spec.out_bound < kFloatExact) {
    run<float>(q, k, v, out, a);
  } else {
    run<double>(q, k, v, out, a);
  }
}

at::Tensor int8_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale_qk,
                              double p_step, int64_t p_zero_point, int64_t p_qmin, int64_t p_qmax,
                              int64_t q_zero_point, int64_t k_zero_point, int64_t v_zero_point) {
  const checks::Int8AttentionSpec spec = checks::check_int8_attention(
      q, k, v, scale_qk, p_step, p_zero_point, p_qmin, p_qmax, q_zero_point, k_zero_point, v_zero_point);
  MASKAQ_CHECK_VALUE(q.device().is_cpu(), "int8_attention (CPU kernel): q, k, v must be CPU tensors, got ",
                    q.device());
  at::Tensor out = at::empty(q.sizes(), q.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  Args a{};
  a.slices = spec.B * spec.H, a.N = spec.N, a.d = spec.d;
  a.scale_qk = static_cast<float>(scale_qk);
  a.pq = checks::requant_grid(p_step, p_zero_point, p_qmin, p_qmax);
  a.zq = q_zero_point, a.zk = k_zero_point, a.zv = v_zero_point;
  run_products(q, k, v, out, spec, a);
  return out;
}

at::Tensor qkv_int8_attention_cpu(const at::Tensor& qkv, double scale_qk, double p_step, int64_t p_zero_point,
                                  int64_t p_qmin, int64_t p_qmax, at::IntArrayRef lo, at::IntArrayRef hi) {
  const checks::QkvAttentionSpec qs =
      checks::check_qkv_int8_attention(qkv, scale_qk, p_step, p_zero_point, p_qmin, p_qmax, lo, hi);
  MASKAQ_CHECK_VALUE(qkv.device().is_cpu(), "qkv_int8_attention (CPU kernel): qkv must be a CPU tensor, got ",
                    qkv.device());
  const checks::Int8AttentionSpec& spec = qs.attention;
  const int64_t B = spec.B, N = spec.N, H = spec.H, d = spec.d;
  at::Tensor out = at::empty({B, N, H * d}, qkv.options());
  if (out.numel() == 0) return out;
  // q, k and v as int8 (3, B, H, N, d), clamp(round(x), lo, hi) − shift (the requantizer with step 1 and
  // zero point 0; round half to even, as torch.round), in one pass over qkv split over the threads
  at::Tensor packed = at::empty({3, B, H, N, d}, qkv.options().dtype(at::kChar));
  const float* src = qkv.data_ptr<float>();
  int8_t* dst = packed.data_ptr<int8_t>();
  const checks::Requant rq[3] = {checks::requant_grid(1.0, 0, qs.lo[0], qs.hi[0]),
                                 checks::requant_grid(1.0, 0, qs.lo[1], qs.hi[1]),
                                 checks::requant_grid(1.0, 0, qs.lo[2], qs.hi[2])};
  at::parallel_for(0, B * N, 16, [&](int64_t begin, int64_t end) {
    std::vector<int8_t> row(static_cast<size_t>(H * d));  // one token's q, k or v, all heads
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / N, n = r % N;
      for (int64_t i = 0; i < 3; ++i) {
        round_clamp_s8(src + (r * 3 + i) * H * d, row.data(), H * d, rq[i], static_cast<int32_t>(qs.shift[i]));
        for (int64_t h = 0; h < H; ++h)
          std::memcpy(dst + (((i * B + b) * H + h) * N + n) * d, row.data() + h * d, static_cast<size_t>(d));
      }
    }
  });
  Args a{};
  a.slices = B * H, a.N = N, a.d = d, a.H = H, a.token_major = true;
  a.scale_qk = static_cast<float>(scale_qk);
  a.pq = checks::requant_grid(p_step, p_zero_point, p_qmin, p_qmax);
  a.zq = -qs.shift[0], a.zk = -qs.shift[1], a.zv = -qs.shift[2];
  run_products(packed[0], packed[1], packed[2], out, spec, a);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(maskaq, CPU, m) {
  m.impl("int8_linear_epilogue", &int8_linear_epilogue_cpu);
  m.impl("int8_attention", &int8_attention_cpu);
  m.impl("qkv_int8_attention", &qkv_int8_attention_cpu);
}

}  // namespace maskaq

#include "fp_contract_off_end.h"
