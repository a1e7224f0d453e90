// 8-lane float32 vectors (GCC/Clang vector extensions) shared by the CPU kernels' hot loops.
//
// Kernels that use them are built for AVX-512, AVX2 and baseline x86-64 and picked at load time
// (MASKAQ_CLONES = target_clones), so the extension runs on any x86-64 and uses what the CPU has.
// Auto-vectorization proved fragile for these loops (an exp loop stayed scalar once inlined), so
// they say what they mean. Without MASKAQ_SIMD (other compilers/architectures) the kernels keep
// their scalar loops.
//
// Everything here has internal linkage and is always inlined: called across target clones, a
// 32-byte vector argument would be passed differently by an AVX caller and a baseline callee, and
// a file may compile these helpers with its own floating-point options (integer.cpp turns
// FMA contraction off).
#pragma once

#include <cstdint>
#include <cstring>

#include "clones.h"
#include "float_math.h"

#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__aarch64__))
#define MASKAQ_SIMD 1
#if defined(__GNUC__) && !defined(__clang__)
// The vectors never cross a non-inlined call (see above), so GCC's note that their ABI differs
// with and without AVX does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
#define MASKAQ_VINLINE inline __attribute__((always_inline))

namespace maskaq {
namespace {

typedef float vf8 __attribute__((vector_size(32)));
typedef int32_t vi8 __attribute__((vector_size(32)));
typedef uint8_t vu8 __attribute__((vector_size(8)));
typedef int8_t vs8 __attribute__((vector_size(8)));
constexpr int64_t kLanes = 8;

// Unaligned loads and stores: vload(p) reads 8 floats, vload<vi8>(p) 8 int32.
template <typename V = vf8, typename T>
MASKAQ_VINLINE V vload(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename V, typename T>
MASKAQ_VINLINE void vstore(T* p, V v) {
  std::memcpy(p, &v, sizeof(v));
}
MASKAQ_VINLINE vf8 vsplat(float x) { return vf8{} + x; }
MASKAQ_VINLINE vf8 vselect(vi8 m, vf8 a, vf8 b) { return (vf8)((m & (vi8)a) | (~m & (vi8)b)); }
// std::max(t, lo) / std::min(t, hi) lane by lane (a NaN t stays NaN, like torch.clamp)
MASKAQ_VINLINE vf8 vmax_keep(vf8 t, vf8 lo) { return vselect(t < lo, lo, t); }
MASKAQ_VINLINE vf8 vmin_keep(vf8 t, vf8 hi) { return vselect(hi < t, hi, t); }

// Round half to even for |x| <= 2^22 (float_math.h's, lane by lane).
MASKAQ_VINLINE vf8 vround_small(vf8 x) { return fmath::round_small(x); }

// The low byte of each int32 lane (lanes known to fit a byte): 8 bytes. A byte shuffle, where
// __builtin_convertvector to an 8-byte vector was scalarized by GCC 12 (lane extracts and shifts).
typedef uint8_t vb32 __attribute__((vector_size(32)));
MASKAQ_VINLINE vu8 vlow_bytes(vi8 v) {
  const vb32 b = (vb32)v;
  return __builtin_shufflevector(b, b, 0, 4, 8, 12, 16, 20, 24, 28);
}

MASKAQ_VINLINE float hsum(vf8 v) {
  float s = 0;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}
MASKAQ_VINLINE float hmax(vf8 v) {
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = m < v[i] ? v[i] : m;
  return m;
}

// exp(x) for x in [-87, 0] without a range clamp (callers bound or clamp x): float_math.h's
// exp_bounded lane by lane.
MASKAQ_VINLINE vf8 vexp_bounded(vf8 x) {
  vf8 n;
  const vf8 y = fmath::exp_reduced(x, n);
  const vi8 bits = (__builtin_convertvector(n, vi8) + 127) << 23;
  return y * (vf8)bits;
}

}  // namespace
}  // namespace maskaq

#endif  // SIMD-capable compiler and architecture
