// Float32 math of the CPU kernels (exp for the softmax of fq_attention.cpp; exp, erf and GELU for
// the integer epilogue of integer.cpp), written with plain arithmetic and selects. The pieces that
// are templates (round_small, horner, exp_reduced) serve the scalar code and the 8-lane vectors of
// vec8.h alike, so a vector lane and the scalar tail run the same operations in the same order and
// give the same bits.
//
// Internal linkage and always inlined, as vec8.h: a file may compile these with its own
// floating-point options (integer.cpp turns FMA contraction off), and one file's copy must never
// stand in for another's.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

#if defined(__GNUC__) || defined(__clang__)
#define MASKAQ_MATH_INLINE inline __attribute__((always_inline))
#else
#define MASKAQ_MATH_INLINE inline
#endif
#if defined(__GNUC__) && !defined(__clang__)
// The templates below also take vec8.h's vectors; they are always inlined, so GCC's note that a
// vector's ABI differs with and without AVX does not apply (as in vec8.h).
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace maskaq {
namespace fmath {
namespace {

// Round half to even for |x| <= 2^22 (float) or 2^51 (double): adding 1.5·2^23 (1.5·2^52) pushes
// the fraction out of the mantissa under the default rounding mode. Matches torch.round (callers
// clamp first); unlike nearbyint it vectorizes on every x86-64.
template <typename T>
struct RoundMagic {  // float and the float vectors
  static constexpr float value = 12582912.0f;
};
template <>
struct RoundMagic<double> {
  static constexpr double value = 6755399441055744.0;
};

template <typename T>
MASKAQ_MATH_INLINE T round_small(T x) {
  return (x + RoundMagic<T>::value) - RoundMagic<T>::value;
}

// Horner's rule with the coefficients from the highest degree down: (c[0]·x + c[1])·x + … + c[N−1].
template <typename T, std::size_t N>
MASKAQ_MATH_INLINE T horner(T x, const float (&c)[N]) {
  T p = T{} + c[0];
  for (std::size_t i = 1; i < N; ++i) p = p * x + c[i];
  return p;
}

// exp(x) for x in [-87, 0] (no range clamp: the callers' arguments are bounded), Cephes' expf
// polynomial: about 1 ulp. exp(x) = 2^n·e^r with n = round(x·log2 e) and r = x − n·ln 2 (ln 2 in
// two parts, so r is exact); exp_reduced returns e^r and n, the caller scales by 2^n.
constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kExpPoly[] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                              4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

template <typename T>
MASKAQ_MATH_INLINE T exp_reduced(T x, T& n) {
  n = round_small(x * kLog2e);
  T r = x - n * kLn2Hi;
  r = r - n * kLn2Lo;
  return horner(r, kExpPoly) * (r * r) + r + 1.0f;
}

MASKAQ_MATH_INLINE float exp_bounded(float x) {
  float n;
  const float y = exp_reduced(x, n);
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float pow2;
  std::memcpy(&pow2, &bits, sizeof(pow2));
  return y * pow2;
}

// erf(x) by Abramowitz & Stegun 7.1.26, the formula of torch's own vectorized erf: for a = |x|,
// t = 1/(1 + p·a), erf = 1 − t·P(t)·exp(−a²) with P of degree 4, absolute error below 1.5e-7 (GELU:
// within 5e-7 of double precision over [−12, 12]). Its dependency chain is a third of a 3-ulp
// two-regime fit's (degree-6 and degree-10 polynomials and an exp, both evaluated), which made GELU
// latency-bound; this one takes about half its time
// (docs/integer-inference.md#measurements-behind-the-smaller-cpu-choices).
constexpr float kErfP = 0.3275911f;
constexpr float kErfPoly[] = {1.061405429f, -1.453152027f, 1.421413741f, -0.284496736f, 0.254829592f};
constexpr float kExpFloor = -87.33654f;  // exp underflows below; 2^-126 is as good as 0 here

MASKAQ_MATH_INLINE float erf_float(float x) {
  const float a = std::fabs(x);
  const float t = 1.0f / (1.0f + kErfP * a);
  const float poly = horner(t, kErfPoly) * t;
  const float e = exp_bounded(std::max(-(a * a), kExpFloor));
  return std::copysign(1.0f - poly * e, x);
}

// erf GELU in torch's order of operations: x·½·(1 + erf(x/√2)).
constexpr float kSqrtHalf = 0.70710678118654752440f;
MASKAQ_MATH_INLINE float gelu(float x) { return x * 0.5f * (1.0f + erf_float(x * kSqrtHalf)); }

}  // namespace
}  // namespace fmath
}  // namespace maskaq
