// Shared device helpers of the maskaq CUDA kernels: warp/block reductions, the LSQ fake
// quantizer, launch sizing and the argument checks every CUDA op runs before it touches memory.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "errors.h"

#include <algorithm>
#include <cstdint>
#include <string>

namespace maskaq {
namespace cuda {

// The kernels' dtypes (float accumulation inside); no double instantiations to compile.
#define MASKAQ_DISPATCH_FLOAT_TYPES(TYPE, NAME, ...)                                             \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                      \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)                   \
                                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

constexpr int kWarpSize = 32;
constexpr int kMaxThreads = 1024;  // block reductions keep one slot per warp: at most 32 warps

// ---------------------------------------------------------------------------------------------
// Reductions. Every thread of the block must call block_sum; the result reaches all of them.
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// `scratch` holds kWarpSize floats of shared memory; it may be reused right after the call.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int num_warps = (blockDim.x + kWarpSize - 1) / kWarpSize;
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = (lane < num_warps) ? scratch[lane] : 0.f;
  v = warp_sum(v);  // every warp reduces the per-warp sums: no second broadcast needed
  __syncthreads();  // scratch free again for the caller
  return v;
}

// ---------------------------------------------------------------------------------------------
// LSQ fake quantizer: x̂ = (round(clamp(x/α + round(z), qmin, qmax)) − round(z))·α, STE on both
// roundings. The division uses __fdiv_rn so that --use_fast_math cannot move a level relative to
// the CPU kernels and the plain-PyTorch reference (which divide exactly).
// ---------------------------------------------------------------------------------------------
struct QuantRanges {  // integer grid of each of the four quantizers, order (q, k, p, v)
  int lo[4];
  int hi[4];
};

struct LsqQuantizer {
  float alpha;  // step α
  float zr;     // round(z)
  float lo;
  float hi;

  __device__ __forceinline__ static LsqQuantizer load(const float* __restrict__ step, const float* __restrict__ zero_point,
                                                      const QuantRanges& ranges, int which) {
    LsqQuantizer quant;
    quant.alpha = step[which];
    // rintf: round half to even, like torch.round; no zero-point tensor means z = 0.
    quant.zr = zero_point != nullptr ? rintf(zero_point[which]) : 0.f;
    quant.lo = static_cast<float>(ranges.lo[which]);
    quant.hi = static_cast<float>(ranges.hi[which]);
    return quant;
  }

  // x/α (exact division) — also the α-gradient term.
  __device__ __forceinline__ float scaled(float x) const { return __fdiv_rn(x, alpha); }
  // u = x/α + round(z), the level before clamping.
  __device__ __forceinline__ float level_of_scaled(float xs) const { return __fadd_rn(xs, zr); }
  // The STE passes the gradient where qmin <= u <= qmax (torch.clamp's gradient is inclusive).
  __device__ __forceinline__ bool in_range(float u) const { return u >= lo && u <= hi; }
  // round(clamp(u)) − round(z); comparisons keep NaN as NaN like torch.clamp.
  __device__ __forceinline__ float integer_of_level(float u) const {
    const float c = u < lo ? lo : (u > hi ? hi : u);
    return __fsub_rn(rintf(c), zr);
  }
  __device__ __forceinline__ float fake_quant(float x) const {
    return __fmul_rn(integer_of_level(level_of_scaled(scaled(x))), alpha);
  }

  // Backward of one element: returns ∂L/∂x and adds the (unscaled) ∂L/∂α, ∂L/∂z terms.
  //   inside:  ∂x̂/∂x = 1, ∂x̂/∂α = (round(u) − round(z)) − x/α, ∂x̂/∂z = 0
  //   clamped: ∂x̂/∂x = 0, ∂x̂/∂α = clamp(u) − round(z),         ∂x̂/∂z = −α
  __device__ __forceinline__ float backward(float x, float grad_hat, float& grad_alpha, float& grad_zero) const {
    const float xs = scaled(x);
    const float u = level_of_scaled(xs);
    const float integer = integer_of_level(u);
    if (in_range(u)) {
      grad_alpha += grad_hat * (integer - xs);
      return grad_hat;
    }
    grad_alpha += grad_hat * integer;
    grad_zero -= grad_hat * alpha;
    return 0.f;
  }
};

// ---------------------------------------------------------------------------------------------
// Launch sizing
// ---------------------------------------------------------------------------------------------
inline int num_sms() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Grid of a grid-stride loop over `work` items handled `per_block` at a time: enough blocks to
// fill the GPU, few enough that per-block partial sums stay small.
inline int grid_for(int64_t work, int64_t per_block, int blocks_per_sm = 8) {
  const int64_t cap = static_cast<int64_t>(num_sms()) * blocks_per_sm;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(ceil_div(work, per_block), cap)));
}

// ---------------------------------------------------------------------------------------------
// Argument checks (host). They run before any kernel reads memory.
// ---------------------------------------------------------------------------------------------
inline bool is_kernel_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

inline void check_cuda_float(const at::Tensor& t, const char* op, const char* name) {
  MASKAQ_CHECK_VALUE(t.defined(), op, ": ", name, " is undefined");
  MASKAQ_CHECK_VALUE(t.is_cuda(), op, ": ", name, " must be a CUDA tensor (this is the CUDA kernel), got ", t.device());
  MASKAQ_CHECK_TYPE(is_kernel_float(t.scalar_type()), op, ": ", name,
                   " must be float32, float16 or bfloat16 on CUDA, got ", t.scalar_type());
  MASKAQ_CHECK_VALUE(t.is_contiguous(), op, ": ", name, " must be contiguous; call .contiguous() first");
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name,
                              const char* ref_name) {
  MASKAQ_CHECK_VALUE(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name, " is on ",
                    ref.device(), "; move all inputs to one device");
}

inline void check_same_dtype(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name,
                             const char* ref_name) {
  MASKAQ_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(), " but ",
                   ref_name, " has ", ref.scalar_type(), "; use one dtype");
}

inline void check_shape(const at::Tensor& t, at::IntArrayRef expected, const char* op, const char* name) {
  MASKAQ_CHECK_VALUE(t.sizes() == expected, op, ": ", name, " must have shape ", expected, ", got ", t.sizes());
}

inline void check_int_fits(int64_t v, const char* op, const char* what) {
  MASKAQ_CHECK_VALUE(v >= 0 && v <= INT32_MAX, op, ": ", what, " = ", v, " is too large for the CUDA kernel");
}

}  // namespace cuda
}  // namespace maskaq
