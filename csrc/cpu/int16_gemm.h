// The exact int16 GEMM of int8_gemm.cpp as a serial building block for other CPU kernels
// (int8_attention's two products on AVX2-only CPUs): activations uint8 or int8 with a zero point,
// weights packed into int16 panels with their own zero point, float32 out = float(acc)·scale (+ bias).
#pragma once

#include <cstdint>
#include <vector>

namespace maskaq {
namespace int16_gemm {

// int16 elements of the packed weights of an (N, K) matrix.
int64_t packed_size(int64_t N, int64_t K);

// Packs W[n][k] = w[n·ld_n + k·ld_k] − zero_point (N outputs, K inputs; any strides) into dst,
// packed_size(N, K) int16 whose padding (past N and K) the caller has zeroed once.
void pack(const int8_t* w, int64_t N, int64_t K, int64_t ld_n, int64_t ld_k, int32_t zero_point, int16_t* dst);

// One GEMM on the calling thread: out[m·ldo + n] = float(Σ_k (a[m·lda + k] − a_zero_point)·W[n][k])·scale[n]
// (+ bias[n] when bias is not null), every accumulator exact in int32 (the caller bounds them). `a` is
// uint8 or, with a_signed, int8; `scratch` is reused between calls.
struct Gemm {
  const void* a;
  bool a_signed;
  int64_t lda, M, K;
  int32_t a_zero_point;
  const int16_t* w;  // pack(...) of (N, K)
  int64_t N;
  float* out;
  int64_t ldo;
  const float* scale;
  const float* bias;
};
void run_serial(const Gemm& g, std::vector<int32_t>& scratch);

}  // namespace int16_gemm
}  // namespace maskaq
