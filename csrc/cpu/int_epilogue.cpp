// maskaq::int8_linear_epilogue on CPU: y = acc·scale + bias (+ erf GELU), returned as float32
// or requantized to uint8 / int8, in one pass over the int32 accumulators of an int8 GEMM.
//
// Rows are split with at::parallel_for. Each row runs 8 columns at a time in explicit 8-lane
// vectors (GCC/Clang vector extensions, built for AVX-512, AVX2 and baseline x86-64 and picked at
// load time, as in fq_attention.cpp: auto-vectorization gives up on the selects of erf and the
// requantizer under -ftrapping-math), the remaining columns in scalar code that performs the same
// operations, so every column gets the same bits. The arithmetic is the reference's, operation
// by operation: float(acc)·scale rounded, then + bias rounded (ISO C++ does not contract them into
// an FMA), an exact division by the step (not a multiplication by its reciprocal), round half to
// even. GELU's erf is float_math.h's (3 ulp; torch's own CPU GELU uses an approximation of
// similar accuracy), so a requantized GELU output may differ from the reference by one level
// where y/step lies within a few ulps of a tie.
#include "checks.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

// No floating-point contraction in this file's arithmetic: GCC contracts a·b + c into an FMA by
// default in C++ wherever the target has one (the AVX-512 clone below), which would round
// acc·scale + bias once instead of twice and break the bit-exact match with the reference.
// (Only the code below is affected; the torch headers above keep the command line's options.)
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
#elif defined(__clang__)
#pragma clang fp contract(off)
#endif

#include "float_math.h"
#include "vec8.h"

namespace maskaq {
namespace {

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
  using namespace fmath::erf_coef;
  const vi8 sign = (vi8)x & static_cast<int32_t>(0x80000000u);
  const vf8 a = (vf8)((vi8)x & 0x7fffffff);
  const vf8 one = vsplat(1.0f);
  const vi8 is_small = a < one;
  const vf8 as = vselect(is_small, a, one);
  const vf8 s = as * as;
  vf8 p = vsplat(s6);
  p = p * s + s5;
  p = p * s + s4;
  p = p * s + s3;
  p = p * s + s2;
  p = p * s + s1;
  p = p * s + s0;
  const vf8 small = as * p;
  vf8 c = vselect(a > one, a, one);
  const vf8 four = vsplat(4.0f);
  c = vselect(c < four, c, four);
  const vf8 u = (c - kMid) * kInvHalf;
  vf8 q = vsplat(l10);
  q = q * u + l9;
  q = q * u + l8;
  q = q * u + l7;
  q = q * u + l6;
  q = q * u + l5;
  q = q * u + l4;
  q = q * u + l3;
  q = q * u + l2;
  q = q * u + l1;
  q = q * u + l0;
  const vf8 large = 1.0f - vexp_bounded(q);
  return (vf8)((vi8)vselect(is_small, small, large) | sign);
}

MASKAQ_VINLINE vf8 vgelu(vf8 x) { return x * 0.5f * (1.0f + verf(x * fmath::kSqrtHalf)); }

MASKAQ_VINLINE vi8 vrequantize(vf8 y, const checks::Requant& rq) {
  const vf8 t_lo = vsplat(rq.t_lo), t_hi = vsplat(rq.t_hi), lo = vsplat(rq.lo), hi = vsplat(rq.hi);
  vf8 t = y / rq.step;
  t = vselect(t > t_lo, t, t_lo);
  t = vselect(t < t_hi, t, t_hi);
  vf8 u = vround_small(t) + rq.zero_point;
  u = vselect(u > lo, u, lo);
  u = vselect(u < hi, u, hi);
  return __builtin_convertvector(u, vi8);  // exact: integers in [lo, hi]
}

// One row of `cols` columns; `gelu` and `kind` are loop-invariant (the branches predict perfectly).
MASKAQ_CLONES void epilogue_row(const int32_t* acc, const float* scale, const float* bias, void* out,
                                         int64_t cols, bool gelu, OutKind kind, const checks::Requant& rq) {
  const int64_t nv = cols - cols % kLanes;
  for (int64_t j = 0; j < nv; j += kLanes) {
    vf8 y = __builtin_convertvector(vload<vi8>(acc + j), vf8) * vload<vf8>(scale + j);
    y = y + vload<vf8>(bias + j);
    if (gelu) y = vgelu(y);
    switch (kind) {
      case OutKind::kFloat:
        vstore(static_cast<float*>(out) + j, y);
        break;
      case OutKind::kUint8:
        vstore(static_cast<uint8_t*>(out) + j, __builtin_convertvector(vrequantize(y, rq), vu8));
        break;
      case OutKind::kInt8:
        vstore(static_cast<int8_t*>(out) + j, __builtin_convertvector(vrequantize(y, rq), vs8));
        break;
    }
  }
  for (int64_t j = nv; j < cols; ++j) store_scalar(out, j, epilogue_value(acc[j], scale[j], bias[j], gelu), kind, rq);
}
#else
void epilogue_row(const int32_t* acc, const float* scale, const float* bias, void* out, int64_t cols, bool gelu,
                  OutKind kind, const checks::Requant& rq) {
  for (int64_t j = 0; j < cols; ++j) store_scalar(out, j, epilogue_value(acc[j], scale[j], bias[j], gelu), kind, rq);
}
#endif  // MASKAQ_SIMD

}  // namespace
}  // namespace maskaq

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

namespace maskaq {
namespace {

at::Tensor int8_linear_epilogue_cpu(const at::Tensor& acc, const at::Tensor& scale, const at::Tensor& bias,
                                    c10::string_view activation, double out_step, int64_t out_zero_point,
                                    int64_t out_qmin, int64_t out_qmax) {
  const checks::EpilogueSpec spec = checks::check_int8_linear_epilogue(
      acc, scale, bias, activation, out_step, out_zero_point, out_qmin, out_qmax);
  TORCH_CHECK_VALUE(acc.device().is_cpu(), "int8_linear_epilogue (CPU kernel): acc must be a CPU tensor, got ",
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

}  // namespace

TORCH_LIBRARY_IMPL(maskaq, CPU, m) { m.impl("int8_linear_epilogue", &int8_linear_epilogue_cpu); }

}  // namespace maskaq
