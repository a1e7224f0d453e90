// The integer-inference ops on CUDA (maskaq.integer), in one file because every .cu costs minutes
// of build time:
//   int8_linear_epilogue — the epilogue of torch._int_mm (cuBLASLt int8 GEMM): one vectorized,
//       grid-stride pass over the int32 accumulators: y = acc·scale + bias, erf GELU, and either a
//       float32 store or the requantization to uint8 / int8 (the next layer's grid).
//   int8_attention — S = q̃·k̃ᵀ and O = P̃·ṽ on int8 tensor cores (WMMA 16x16x16, int32
//       accumulators), the softmax and P's quantization in between, one CTA per (batch·head,
//       block of 64 query rows).
// The arithmetic follows the plain-PyTorch reference operation by operation (explicitly rounded
// __fmul_rn / __fadd_rn / __fdiv_rn, since --use_fast_math would otherwise contract products into
// FMAs and divide approximately), so the requantized outputs match it exactly up to erf / exp
// implementation differences of an ulp.
#include "common.cuh"
#include "checks.h"

#include <mma.h>

#include <cstdint>
#include <type_traits>

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 720
#define MASKAQ_INT8_MMA 1  // int8 WMMA (integer tensor cores) exists from sm_72 on
#endif

namespace maskaq {
namespace cuda {
namespace {

// =============================================================================================
// int8_linear_epilogue
// =============================================================================================
constexpr const char* kEpilogueOp = "int8_linear_epilogue";
constexpr int kEpilogueThreads = 256;

// The requantizer: clamp(round(y / step) + z, lo, hi), computed as
// clamp(rint(clamp(y / step, lo − z − 1, hi − z + 1)) + z, lo, hi) (same result; fmaxf sends NaN to
// the lower bound, the documented NaN -> qmin).
template <bool kGelu>
__device__ __forceinline__ float epilogue_value(int32_t a, float s, float b) {
  float y = __fadd_rn(__fmul_rn(static_cast<float>(a), s), b);
  if (kGelu) {
    // erf GELU in torch's order: x·½·(1 + erf(x/√2)) (erff is not affected by --use_fast_math).
    constexpr float kAlpha = 0.70710678118654752440f;
    y = __fmul_rn(__fmul_rn(y, 0.5f), __fadd_rn(1.0f, erff(__fmul_rn(y, kAlpha))));
  }
  return y;
}

__device__ __forceinline__ float requantize(float y, const checks::Requant& rq) {
  const float t = fminf(fmaxf(__fdiv_rn(y, rq.step), rq.t_lo), rq.t_hi);
  return fminf(fmaxf(__fadd_rn(rintf(t), rq.zero_point), rq.lo), rq.hi);
}

template <typename out_t>
__device__ __forceinline__ out_t epilogue_store_value(float y, const checks::Requant& rq) {
  if constexpr (std::is_same<out_t, float>::value) {
    return y;
  } else {
    return static_cast<out_t>(__float2int_rn(requantize(y, rq)));  // an integer in [lo, hi]
  }
}

template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

// kVec consecutive elements per thread and step (kVec = 4: 16-byte loads of acc / scale / bias and
// one 16- or 4-byte store; the host picks it only when N % 4 == 0 and every pointer is aligned, so
// a pack never crosses a row).
template <bool kGelu, typename out_t, int kVec>
__global__ void __launch_bounds__(kEpilogueThreads)
    int8_linear_epilogue_kernel(const int32_t* __restrict__ acc, const float* __restrict__ scale,
                                const float* __restrict__ bias, out_t* __restrict__ out, int64_t packs,
                                int64_t cols, checks::Requant rq) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < packs; i += stride) {
    const int64_t e = i * kVec;
    const int64_t col = e % cols;
    const Pack<int32_t, kVec> a = *reinterpret_cast<const Pack<int32_t, kVec>*>(acc + e);
    const Pack<float, kVec> s = *reinterpret_cast<const Pack<float, kVec>*>(scale + col);
    const Pack<float, kVec> b = *reinterpret_cast<const Pack<float, kVec>*>(bias + col);
    Pack<out_t, kVec> o;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      o.v[j] = epilogue_store_value<out_t>(epilogue_value<kGelu>(a.v[j], s.v[j], b.v[j]), rq);
    }
    *reinterpret_cast<Pack<out_t, kVec>*>(out + e) = o;
  }
}

inline bool aligned_to(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

template <bool kGelu, typename out_t>
void launch_epilogue(const at::Tensor& acc, const at::Tensor& scale, const at::Tensor& bias, at::Tensor& out,
                     const checks::Requant& rq, cudaStream_t stream) {
  const int64_t numel = acc.numel(), cols = acc.size(1);
  const int32_t* a = acc.data_ptr<int32_t>();
  const float* s = scale.data_ptr<float>();
  const float* b = bias.data_ptr<float>();
  out_t* o = out.data_ptr<out_t>();
  const bool vec4 = cols % 4 == 0 && aligned_to(a, 16) && aligned_to(s, 16) && aligned_to(b, 16) &&
                    aligned_to(o, 4 * sizeof(out_t));
  if (vec4) {
    const int64_t packs = numel / 4;
    int8_linear_epilogue_kernel<kGelu, out_t, 4>
        <<<grid_for(packs, kEpilogueThreads), kEpilogueThreads, 0, stream>>>(a, s, b, o, packs, cols, rq);
  } else {
    int8_linear_epilogue_kernel<kGelu, out_t, 1>
        <<<grid_for(numel, kEpilogueThreads), kEpilogueThreads, 0, stream>>>(a, s, b, o, numel, cols, rq);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename out_t>
void launch_epilogue_act(bool gelu, const at::Tensor& acc, const at::Tensor& scale, const at::Tensor& bias,
                         at::Tensor& out, const checks::Requant& rq, cudaStream_t stream) {
  if (gelu) {
    launch_epilogue<true, out_t>(acc, scale, bias, out, rq, stream);
  } else {
    launch_epilogue<false, out_t>(acc, scale, bias, out, rq, stream);
  }
}

at::Tensor int8_linear_epilogue_cuda(const at::Tensor& acc, const at::Tensor& scale, const at::Tensor& bias,
                                     c10::string_view activation, double out_step, int64_t out_zero_point,
                                     int64_t out_qmin, int64_t out_qmax) {
  const checks::EpilogueSpec spec = checks::check_int8_linear_epilogue(
      acc, scale, bias, activation, out_step, out_zero_point, out_qmin, out_qmax);
  MASKAQ_CHECK_VALUE(acc.is_cuda(), kEpilogueOp, ": acc must be a CUDA tensor here, got ", acc.device());
  const c10::cuda::OptionalCUDAGuard guard(acc.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  at::Tensor out = at::empty(acc.sizes(), acc.options().dtype(spec.out_dtype));
  if (acc.numel() == 0) return out;
  const checks::Requant rq = checks::requant_grid(spec);
  const bool gelu = spec.activation == checks::Activation::kGelu;
  switch (spec.out_dtype) {
    case at::kByte:
      launch_epilogue_act<uint8_t>(gelu, acc, scale, bias, out, rq, stream);
      break;
    case at::kChar:
      launch_epilogue_act<int8_t>(gelu, acc, scale, bias, out, rq, stream);
      break;
    default:
      launch_epilogue_act<float>(gelu, acc, scale, bias, out, rq, stream);
  }
  return out;
}

// =============================================================================================
// int8_attention
// =============================================================================================
// Per CTA: one (batch, head) slice and kBlockRows = 64 query rows, 16 per warp. Two passes over
// the keys in blocks of kBlockKeys = 32:
//   pass 1: S = q·kᵀ on tensor cores, the row maxima and sums of exp for the softmax (online);
//   pass 2: S again, P = exp(x − max)/sum, its integer level P̃ (shifted to int8), O += P̃·v on
//           tensor cores.
// Recomputing S (cheap on int8 tensor cores) keeps shared memory independent of N.
//
// Zero points. The tensor cores multiply the int8 values as stored; the integers of the
// products are q̃ = q − z_q, k̃ = k − z_k, ṽ = v − z_v and P̃ = P8 + c (P8 ∈ [−128, 127] the shifted
// level, c = 0 when P̃ already fits int8). Expanding the sums (zero-padded entries contribute 0):
//   S_ij = Σ_t q_it k_jt − z_k Σ_t q_it − z_q Σ_t k_jt + d·z_q·z_k
//   O_it = Σ_j P8_ij v_jt − z_v Σ_j P8_ij + c Σ_j v_jt − N·c·z_v
// The row / column sums come from the int8 tiles in shared memory. The corrections are added in
// uint32 (wrap-around, no UB): the checked bounds guarantee the true results fit int32, so the
// wrapped sums are exact.
//
// Shared memory holds every int8 operand as 16-column "panels" ([column / 16][row][16]), so each
// 16x16 WMMA tile is one contiguous 256-byte block: 32-byte aligned as load_matrix_sync requires,
// whatever d (a row-major tile at column 16 of an int8 matrix would be only 16-byte aligned).
// d and N that are not multiples of 16 are zero-padded in the panels; the padded keys are left
// out of the softmax.
constexpr const char* kAttentionOp = "int8_attention";
constexpr int kTile = 16;  // WMMA m = n = k = 16
constexpr int kAttnWarps = 4;
constexpr int kAttnThreads = kAttnWarps * kWarpSize;
constexpr int kBlockRows = kAttnWarps * kTile;  // query rows per CTA
constexpr int kBlockKeys = 32;                  // keys per step
constexpr int kKeyTiles = kBlockKeys / kTile;
constexpr int kScoreLd = kBlockKeys + 4;  // int32 row stride of the score scratch (fewer bank conflicts)
constexpr int kPanel = kTile * kTile;     // bytes of one int8 tile

struct AttnParams {
  const int8_t* q;
  const int8_t* k;
  const int8_t* v;
  float* out;
  int N, d, chunks;  // chunks = ceil(d / 16), the padded head dim is 16·chunks
  bool vec16;        // d % 16 == 0 and 16-byte aligned rows: one 16-byte load per panel row
  float scale_qk;
  checks::Requant pq;  // P's requantizer
  int p_shift;         // subtracted from P̃ so that it fits int8 (0 when it already does)
  int zq, zk, zv;
};

// Byte offsets of the shared-memory sections (each 128-byte aligned), the same on host and device.
struct AttnSmem {
  int q, k, v, scores, probs, out, qsum, ksum, vsum, total;
};

__host__ __device__ inline int align128(int x) { return (x + 127) / 128 * 128; }

__host__ __device__ inline AttnSmem attn_smem_layout(int chunks) {
  const int dp = chunks * kTile;
  AttnSmem s{};
  int at = 0;
  s.q = at, at += align128(kBlockRows * dp);                                // int8 panels
  s.k = at, at += align128(kBlockKeys * dp);                                // int8 panels
  s.v = at, at += align128(kBlockKeys * dp);                                // int8 panels
  s.scores = at, at += align128(kAttnWarps * kTile * kScoreLd * 4);         // int32, per warp
  s.probs = at, at += align128(kAttnWarps * kKeyTiles * kPanel);            // int8 panels, per warp
  s.out = at, at += align128(kAttnWarps * kTile * dp * 4);                  // int32, per warp
  s.qsum = at, at += align128(kBlockRows * 4);
  s.ksum = at, at += align128(kBlockKeys * 4);
  s.vsum = at, at += align128(dp * 4);
  s.total = at;
  return s;
}

// exp(x) for x <= 0 to about 1 ulp (Cephes' expf polynomial, as the CPU kernels): --use_fast_math
// turns expf into __expf, whose error grows with |x| and would move more probabilities across a
// quantization level than necessary.
__device__ __forceinline__ float exp_nonpositive(float x) {
  x = fmaxf(x, -87.33654f);  // below, exp underflows; 2^-126 is as good as 0 here
  const float n = rintf(x * 1.44269504088896341f);
  float r = fmaf(n, -0.693359375f, x);
  r = fmaf(n, 2.12194440e-4f, r);
  float y = 1.9875691500e-4f;
  y = fmaf(y, r, 1.3981999507e-3f);
  y = fmaf(y, r, 8.3334519073e-3f);
  y = fmaf(y, r, 4.1665795894e-2f);
  y = fmaf(y, r, 1.6666665459e-1f);
  y = fmaf(y, r, 5.0000001201e-1f);
  y = fmaf(y, r * r, r + 1.0f);
  return y * __int_as_float((static_cast<int>(n) + 127) << 23);
}

// Rows [row0, row0 + rows) of one (N, d) int8 matrix into panels dst[c][r][16], zero-padded.
__device__ __forceinline__ void load_panels(int8_t* __restrict__ dst, const int8_t* __restrict__ src, int row0,
                                            int rows, const AttnParams& p) {
  if (p.vec16) {
    const int total = rows * p.chunks;
    for (int i = threadIdx.x; i < total; i += blockDim.x) {
      const int r = i / p.chunks, c = i - r * p.chunks;  // consecutive threads: consecutive 16 bytes
      int4 val = make_int4(0, 0, 0, 0);
      if (row0 + r < p.N) val = *reinterpret_cast<const int4*>(src + static_cast<int64_t>(row0 + r) * p.d + c * kTile);
      *reinterpret_cast<int4*>(dst + (c * rows + r) * kTile) = val;
    }
  } else {
    const int dp = p.chunks * kTile;
    const int total = rows * dp;
    for (int i = threadIdx.x; i < total; i += blockDim.x) {
      const int r = i / dp, col = i - r * dp;
      int8_t val = 0;
      if (row0 + r < p.N && col < p.d) val = src[static_cast<int64_t>(row0 + r) * p.d + col];
      dst[((col / kTile) * rows + r) * kTile + col % kTile] = val;
    }
  }
}

// Σ over the head dim of row r of a panel matrix with `rows` rows.
__device__ __forceinline__ int panel_row_sum(const int8_t* panels, int r, int rows, int chunks) {
  int s = 0;
  for (int c = 0; c < chunks; ++c) {
    const int8_t* row = panels + (c * rows + r) * kTile;
#pragma unroll
    for (int i = 0; i < kTile; ++i) s += row[i];
  }
  return s;
}

#if defined(MASKAQ_INT8_MMA)
using namespace nvcuda;

// The warp's 16 x kBlockKeys block of q·kᵀ (raw int8 values) into its score scratch.
__device__ __forceinline__ void warp_scores(const int8_t* qs, const int8_t* ks, int* scores, int warp, int chunks) {
  wmma::fragment<wmma::accumulator, kTile, kTile, kTile, int> acc[kKeyTiles];
#pragma unroll
  for (int t = 0; t < kKeyTiles; ++t) wmma::fill_fragment(acc[t], 0);
  for (int c = 0; c < chunks; ++c) {
    wmma::fragment<wmma::matrix_a, kTile, kTile, kTile, signed char, wmma::row_major> a;
    wmma::load_matrix_sync(a, reinterpret_cast<const signed char*>(qs + (c * kBlockRows + warp * kTile) * kTile), kTile);
#pragma unroll
    for (int t = 0; t < kKeyTiles; ++t) {
      // kᵀ as a column-major (d x keys) matrix: the key panel read column by column.
      wmma::fragment<wmma::matrix_b, kTile, kTile, kTile, signed char, wmma::col_major> b;
      wmma::load_matrix_sync(b, reinterpret_cast<const signed char*>(ks + (c * kBlockKeys + t * kTile) * kTile), kTile);
      wmma::mma_sync(acc[t], a, b, acc[t]);
    }
  }
#pragma unroll
  for (int t = 0; t < kKeyTiles; ++t) wmma::store_matrix_sync(scores + t * kTile, acc[t], kScoreLd, wmma::mem_row_major);
}
#endif

__global__ void __launch_bounds__(kAttnThreads) int8_attention_kernel(AttnParams p) {
#if defined(MASKAQ_INT8_MMA)
  extern __shared__ __align__(128) unsigned char smem[];
  const AttnSmem lay = attn_smem_layout(p.chunks);
  int8_t* qs = reinterpret_cast<int8_t*>(smem + lay.q);
  int8_t* ks = reinterpret_cast<int8_t*>(smem + lay.k);
  int8_t* vs = reinterpret_cast<int8_t*>(smem + lay.v);
  int* qsum = reinterpret_cast<int*>(smem + lay.qsum);
  int* ksum = reinterpret_cast<int*>(smem + lay.ksum);
  int* vsum = reinterpret_cast<int*>(smem + lay.vsum);
  const int dp = p.chunks * kTile;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  int* scores = reinterpret_cast<int*>(smem + lay.scores) + warp * kTile * kScoreLd;
  int8_t* probs = reinterpret_cast<int8_t*>(smem + lay.probs) + warp * kKeyTiles * kPanel;
  int* acc_out = reinterpret_cast<int*>(smem + lay.out) + warp * kTile * dp;

  const int64_t slice = static_cast<int64_t>(blockIdx.x) * p.N * p.d;
  const int8_t* qg = p.q + slice;
  const int8_t* kg = p.k + slice;
  const int8_t* vg = p.v + slice;
  const int row0 = blockIdx.y * kBlockRows;

  load_panels(qs, qg, row0, kBlockRows, p);
  for (int c = threadIdx.x; c < dp; c += blockDim.x) vsum[c] = 0;
  __syncthreads();
  if (threadIdx.x < kBlockRows) qsum[threadIdx.x] = panel_row_sum(qs, threadIdx.x, kBlockRows, p.chunks);
  // (qsum is read after the next __syncthreads)

  // Each lane pair owns one of the warp's 16 rows; lane h = lane & 1 takes keys [16h, 16h + 16) of
  // every key block.
  const int r = lane >> 1, half = lane & 1;
  const uint32_t zq = static_cast<uint32_t>(p.zq), zk = static_cast<uint32_t>(p.zk);
  const uint32_t dzz = static_cast<uint32_t>(p.d) * zq * zk;
  const int num_blocks = (p.N + kBlockKeys - 1) / kBlockKeys;

  // The logit x = float(S)·scale_qk of key column `col` (0..kBlockKeys) of the current block.
  const auto logit = [&](int col, uint32_t row_term) {
    const uint32_t s = static_cast<uint32_t>(scores[r * kScoreLd + col]) + row_term -
                       zq * static_cast<uint32_t>(ksum[col]);
    return __fmul_rn(static_cast<float>(static_cast<int32_t>(s)), p.scale_qk);
  };

  // ---- pass 1: row maximum m and Σ exp(x − m), online per lane, then merged per pair ----
  float m = -INFINITY, l = 0.f;
  for (int kb = 0; kb < num_blocks; ++kb) {
    const int key0 = kb * kBlockKeys;
    __syncthreads();  // the previous block's readers are done with ks / ksum
    load_panels(ks, kg, key0, kBlockKeys, p);
    __syncthreads();
    if (threadIdx.x < kBlockKeys) ksum[threadIdx.x] = panel_row_sum(ks, threadIdx.x, kBlockKeys, p.chunks);
    warp_scores(qs, ks, scores, warp, p.chunks);
    __syncthreads();  // ksum and the scores are visible
    const uint32_t row_term = dzz - zk * static_cast<uint32_t>(qsum[warp * kTile + r]);
    float x[kTile];
    float block_max = -INFINITY;
#pragma unroll
    for (int i = 0; i < kTile; ++i) {
      const int col = half * kTile + i;
      x[i] = key0 + col < p.N ? logit(col, row_term) : -INFINITY;
      block_max = fmaxf(block_max, x[i]);
    }
    if (block_max > -INFINITY) {
      const float m_new = fmaxf(m, block_max);
      float sum = m > -INFINITY ? l * exp_nonpositive(m - m_new) : 0.f;
#pragma unroll
      for (int i = 0; i < kTile; ++i) {
        if (key0 + half * kTile + i < p.N) sum += exp_nonpositive(x[i] - m_new);
      }
      l = sum, m = m_new;
    }
  }
  {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, 1), l2 = __shfl_xor_sync(0xffffffffu, l, 1);
    const float mt = fmaxf(m, m2);  // finite: key 0 is in every row's first half
    l = (m > -INFINITY ? l * exp_nonpositive(m - mt) : 0.f) + (m2 > -INFINITY ? l2 * exp_nonpositive(m2 - mt) : 0.f);
    m = mt;
  }

  // ---- pass 2: P, its shifted level P8, O += P8·v ----
  for (int i = lane; i < kTile * dp; i += kWarpSize) acc_out[i] = 0;
  int p8_sum = 0;  // Σ_j P8 over this lane's keys
  for (int kb = 0; kb < num_blocks; ++kb) {
    const int key0 = kb * kBlockKeys;
    __syncthreads();
    load_panels(ks, kg, key0, kBlockKeys, p);
    load_panels(vs, vg, key0, kBlockKeys, p);
    __syncthreads();
    if (threadIdx.x < kBlockKeys) ksum[threadIdx.x] = panel_row_sum(ks, threadIdx.x, kBlockKeys, p.chunks);
    for (int c = threadIdx.x; c < dp; c += blockDim.x) {  // column sums of v (padded keys are 0)
      const int8_t* col = vs + (c / kTile) * kBlockKeys * kTile + c % kTile;
      int s = 0;
#pragma unroll 8
      for (int j = 0; j < kBlockKeys; ++j) s += col[j * kTile];
      vsum[c] += s;
    }
    warp_scores(qs, ks, scores, warp, p.chunks);
    __syncthreads();
    const uint32_t row_term = dzz - zk * static_cast<uint32_t>(qsum[warp * kTile + r]);
#pragma unroll
    for (int i = 0; i < kTile; ++i) {
      const int col = half * kTile + i;
      int p8 = 0;
      if (key0 + col < p.N) {
        const float prob = __fdiv_rn(exp_nonpositive(logit(col, row_term) - m), l);
        p8 = __float2int_rn(__fsub_rn(requantize(prob, p.pq), p.pq.zero_point)) - p.p_shift;
        p8_sum += p8;
      }
      probs[half * kPanel + r * kTile + i] = static_cast<int8_t>(p8);
    }
    __syncwarp();
    for (int t = 0; t < p.chunks; ++t) {
      wmma::fragment<wmma::accumulator, kTile, kTile, kTile, int> acc;
      wmma::load_matrix_sync(acc, acc_out + t * kTile, dp, wmma::mem_row_major);
#pragma unroll
      for (int kt = 0; kt < kKeyTiles; ++kt) {
        wmma::fragment<wmma::matrix_a, kTile, kTile, kTile, signed char, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, kTile, kTile, kTile, signed char, wmma::row_major> b;
        wmma::load_matrix_sync(a, reinterpret_cast<const signed char*>(probs + kt * kPanel), kTile);
        wmma::load_matrix_sync(b, reinterpret_cast<const signed char*>(vs + (t * kBlockKeys + kt * kTile) * kTile), kTile);
        wmma::mma_sync(acc, a, b, acc);
      }
      wmma::store_matrix_sync(acc_out + t * kTile, acc, dp, wmma::mem_row_major);
    }
  }
  __syncthreads();  // vsum complete; this warp's accumulators stored

  // ---- O = accumulators + corrections, written row by row (coalesced) ----
  const int p8_row = p8_sum + __shfl_xor_sync(0xffffffffu, p8_sum, 1);
  const uint32_t zv = static_cast<uint32_t>(p.zv), shift = static_cast<uint32_t>(p.p_shift);
  const uint32_t const_term = 0u - static_cast<uint32_t>(p.N) * shift * zv;
  float* out = p.out + slice;
  for (int rr = 0; rr < kTile; ++rr) {
    const uint32_t row_p8 = static_cast<uint32_t>(__shfl_sync(0xffffffffu, p8_row, 2 * rr));
    const int row = row0 + warp * kTile + rr;
    if (row >= p.N) continue;  // uniform across the warp
    const uint32_t row_term = const_term - zv * row_p8;
    for (int c = lane; c < p.d; c += kWarpSize) {
      const uint32_t o = static_cast<uint32_t>(acc_out[rr * dp + c]) + row_term + shift * static_cast<uint32_t>(vsum[c]);
      out[static_cast<int64_t>(row) * p.d + c] = static_cast<float>(static_cast<int32_t>(o));
    }
  }
#elif defined(__CUDA_ARCH__)
  __trap();  // built for a GPU without int8 tensor cores; the host refuses to launch there
#endif
}

at::Tensor int8_attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale_qk,
                               double p_step, int64_t p_zero_point, int64_t p_qmin, int64_t p_qmax,
                               int64_t q_zero_point, int64_t k_zero_point, int64_t v_zero_point) {
  const checks::Int8AttentionSpec spec = checks::check_int8_attention(
      q, k, v, scale_qk, p_step, p_zero_point, p_qmin, p_qmax, q_zero_point, k_zero_point, v_zero_point);
  MASKAQ_CHECK_VALUE(q.is_cuda(), kAttentionOp, ": q, k, v must be CUDA tensors here, got ", q.device());
  const c10::cuda::OptionalCUDAGuard guard(q.device());
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  MASKAQ_CHECK(prop->major * 10 + prop->minor >= 72, kAttentionOp, ": needs int8 tensor cores (compute "
              "capability 7.2 or newer), but ", prop->name, " is ", prop->major, ".", prop->minor,
              "; use the CPU op or maskaq.reference.int8_attention");
  at::Tensor out = at::empty(q.sizes(), q.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;

  const int64_t slices = spec.B * spec.H;
  check_int_fits(slices, kAttentionOp, "B·H");
  check_int_fits(spec.N, kAttentionOp, "N");
  check_int_fits(spec.d, kAttentionOp, "d");
  const int64_t row_blocks = ceil_div(spec.N, kBlockRows);
  MASKAQ_CHECK_VALUE(row_blocks <= 65535, kAttentionOp, ": N = ", spec.N, " tokens is too many for the kernel's grid");
  AttnParams p{};
  p.q = q.data_ptr<int8_t>(), p.k = k.data_ptr<int8_t>(), p.v = v.data_ptr<int8_t>();
  p.out = out.data_ptr<float>();
  p.N = static_cast<int>(spec.N), p.d = static_cast<int>(spec.d);
  p.chunks = static_cast<int>(ceil_div(spec.d, kTile));
  p.vec16 = spec.d % kTile == 0 && aligned_to(p.q, 16) && aligned_to(p.k, 16) && aligned_to(p.v, 16);
  p.scale_qk = static_cast<float>(scale_qk);
  p.pq = checks::requant_grid(p_step, p_zero_point, p_qmin, p_qmax);
  // P̃ ∈ [p_lo, p_hi] (width <= 255, checked): shift it into int8 when it does not fit as is.
  p.p_shift = (spec.p_lo >= -128 && spec.p_hi <= 127) ? 0 : static_cast<int>(spec.p_lo + 128);
  p.zq = static_cast<int>(q_zero_point), p.zk = static_cast<int>(k_zero_point), p.zv = static_cast<int>(v_zero_point);

  const int smem = attn_smem_layout(p.chunks).total;
  MASKAQ_CHECK_VALUE(static_cast<size_t>(smem) <= prop->sharedMemPerBlockOptin, kAttentionOp, ": head dim d = ",
                    spec.d, " needs ", smem, " bytes of shared memory per block, more than ", prop->name,
                    " offers (", prop->sharedMemPerBlockOptin, ")");
  if (smem > 48 * 1024) {  // above 48 KiB a kernel must opt in
    C10_CUDA_CHECK(cudaFuncSetAttribute(int8_attention_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  }
  const dim3 grid(static_cast<unsigned>(slices), static_cast<unsigned>(row_blocks));
  int8_attention_kernel<<<grid, kAttnThreads, smem, at::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace maskaq

TORCH_LIBRARY_IMPL(maskaq, CUDA, m) {
  m.impl("int8_linear_epilogue", &maskaq::cuda::int8_linear_epilogue_cuda);
  m.impl("int8_attention", &maskaq::cuda::int8_attention_cuda);
}
