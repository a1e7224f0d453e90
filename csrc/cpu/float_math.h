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

// erf(x) to 3 ulp, two regimes fitted for this file (least squares on Chebyshev nodes against
// double erf/erfc, then checked in float32 over [-6, 6]):
//   |x| < 1:  erf = a·S(a²), S a degree-6 polynomial (kErfSmall);
//   |x| >= 1: erf = 1 − exp(L(u)), L a degree-10 polynomial (kErfLogTail) fitting log erfc(a) in
//             u = (min(a, 4) − 2.5)/1.5 ∈ [−1, 1] (erf rounds to 1 beyond 3.92).
// Both are evaluated and one selected (no branch), the sign restored by copysign.
constexpr float kErfSmall[] = {7.84725926e-05f, -8.00818903e-04f, 5.18809911e-03f, -2.68536918e-02f,
                               1.12835824e-01f, -3.76126260e-01f, 1.12837911e+00f};
constexpr float kErfLogTail[] = {-2.36706569e-06f, -2.53067174e-06f, 4.72842985e-05f, -2.21709401e-04f,
                                 8.76392936e-04f,  -3.19474330e-03f, 1.09629733e-02f, -3.66463102e-02f,
                                 -2.12376094e+00f, -8.02902126e+00f, -7.80681515e+00f};
constexpr float kErfMid = 2.5f, kErfInvHalfWidth = 1.0f / 1.5f;

MASKAQ_MATH_INLINE float erf_float(float x) {
  const float a = std::fabs(x);
  const float as = a < 1.0f ? a : 1.0f;  // the small regime's argument, kept finite everywhere
  const float small = as * horner(as * as, kErfSmall);
  float c = a > 1.0f ? a : 1.0f;
  c = c < 4.0f ? c : 4.0f;
  const float u = (c - kErfMid) * kErfInvHalfWidth;
  // L(u) ∈ [log erfc(4), log erfc(1)] ≈ [−17.9, −1.85]: inside exp_bounded's range
  const float large = 1.0f - exp_bounded(horner(u, kErfLogTail));
  return std::copysign(a < 1.0f ? small : large, x);
}

// erf GELU in torch's order of operations: x·½·(1 + erf(x/√2)).
constexpr float kSqrtHalf = 0.70710678118654752440f;
MASKAQ_MATH_INLINE float gelu(float x) { return x * 0.5f * (1.0f + erf_float(x * kSqrtHalf)); }

}  // namespace
}  // namespace fmath
}  // namespace maskaq
