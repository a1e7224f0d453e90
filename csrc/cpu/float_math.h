// Scalar float32 math of the integer-inference CPU kernels (int_epilogue.cpp, int8_attention.cpp),
// written with plain arithmetic and selects so that an 8-lane vector version (int_epilogue.cpp)
// can repeat it operation by operation: the vector lanes and the scalar tail give the same bits.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace maskaq {
namespace fmath {

// Round half to even for |x| <= 2^22: adding 1.5·2^23 pushes the fraction out of the mantissa
// under the default rounding mode. Matches torch.round (callers clamp first); unlike nearbyint it
// vectorizes on every x86-64.
constexpr float kRoundMagic = 12582912.0f;
inline float round_small(float x) { return (x + kRoundMagic) - kRoundMagic; }

// exp(x) for x in [-87, 0] (no range clamp: the callers' arguments are bounded), Cephes' expf
// polynomial as in fq_attention.cpp: about 1 ulp.
namespace exp_coef {
constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float c0 = 1.9875691500e-4f, c1 = 1.3981999507e-3f, c2 = 8.3334519073e-3f, c3 = 4.1665795894e-2f,
                c4 = 1.6666665459e-1f, c5 = 5.0000001201e-1f;
}  // namespace exp_coef

inline float exp_bounded(float x) {
  using namespace exp_coef;
  const float n = round_small(x * kLog2e);
  float r = x - n * kLn2Hi;
  r = r - n * kLn2Lo;
  float y = c0;
  y = y * r + c1;
  y = y * r + c2;
  y = y * r + c3;
  y = y * r + c4;
  y = y * r + c5;
  y = y * (r * r) + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float pow2;
  std::memcpy(&pow2, &bits, sizeof(pow2));
  return y * pow2;
}

// erf(x) to 3 ulp, two regimes fitted for this file (least squares on Chebyshev nodes against
// double erf/erfc, then checked in float32 over [-6, 6]):
//   |x| < 1:  erf = a·S(a²), S a degree-6 polynomial;
//   |x| >= 1: erf = 1 − exp(L(u)), L a degree-10 polynomial fitting log erfc(a) in
//             u = (min(a, 4) − 2.5)/1.5 ∈ [−1, 1] (erf rounds to 1 beyond 3.92).
// Both are evaluated and one selected (no branch), the sign restored by copysign.
namespace erf_coef {
constexpr float s0 = 1.12837911e+00f, s1 = -3.76126260e-01f, s2 = 1.12835824e-01f, s3 = -2.68536918e-02f,
                s4 = 5.18809911e-03f, s5 = -8.00818903e-04f, s6 = 7.84725926e-05f;
constexpr float l0 = -7.80681515e+00f, l1 = -8.02902126e+00f, l2 = -2.12376094e+00f, l3 = -3.66463102e-02f,
                l4 = 1.09629733e-02f, l5 = -3.19474330e-03f, l6 = 8.76392936e-04f, l7 = -2.21709401e-04f,
                l8 = 4.72842985e-05f, l9 = -2.53067174e-06f, l10 = -2.36706569e-06f;
constexpr float kMid = 2.5f, kInvHalf = 1.0f / 1.5f;
}  // namespace erf_coef

inline float erf_float(float x) {
  using namespace erf_coef;
  const float a = std::fabs(x);
  const float as = a < 1.0f ? a : 1.0f;  // the small regime's argument, kept finite everywhere
  const float s = as * as;
  float p = s6;
  p = p * s + s5;
  p = p * s + s4;
  p = p * s + s3;
  p = p * s + s2;
  p = p * s + s1;
  p = p * s + s0;
  const float small = as * p;
  float c = a > 1.0f ? a : 1.0f;
  c = c < 4.0f ? c : 4.0f;
  const float u = (c - kMid) * kInvHalf;
  float q = l10;
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
  const float large = 1.0f - exp_bounded(q);  // q ∈ [log erfc(4), log erfc(1)] ≈ [−17.9, −1.85]
  return std::copysign(a < 1.0f ? small : large, x);
}

// erf GELU in torch's order of operations: x·½·(1 + erf(x/√2)).
constexpr float kSqrtHalf = 0.70710678118654752440f;
inline float gelu(float x) { return x * 0.5f * (1.0f + erf_float(x * kSqrtHalf)); }

}  // namespace fmath
}  // namespace maskaq
