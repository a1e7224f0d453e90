// maskaq::patch_similarity_entropy on CUDA: the Gaussian differential entropy of the cosine
// similarities of R picked rows of the head-mean patch logits, per sample, and its backward.
//
// Forward, three launches, no B·H·N·N pass (only the R picked rows of every head are read):
//   1. gather_rows:     one block per (sample, picked row): head mean of that row over the
//                       patch columns, its norm, the L2-normalized row → workspace (B, R, N').
//   2. gram_row_stats:  one block per (sample, row i): G_ij = x_i·x_j for all j, then the row's
//                       mean and sum of squared deviations (exact two-pass over R values).
//   3. finalize:        one warp per sample merges the R row statistics (Chan's parallel
//                       variance, in double) → s² = Var(G) + 1e-8, h = ½·log(2πe·s²).
// Backward: 1–3 again (recompute; no saved state), then
//   4. backward_rows:   one block per (sample, row i): G_i· again, dX_i = 2c·Σ_j (G_ij − μ)·x_j,
//                       c = grad/(s²·R²), through the normalization and the 1/H of the mean;
//   5. scatter_rows:    writes every picked row's gradient to all H heads of dlogits (rows picked
//                       twice are summed by their first occurrence; everything else stays 0).
// Row indices are validated without a separate pass: the gather clamps them (no access out of
// bounds, ever) and raises a flag; the op reads the flag once at the end and raises IndexError
// with the CPU kernel's message.
#include "common.cuh"
#include "checks.h"

namespace maskaq {
namespace cuda {
namespace {

const std::initializer_list<at::ScalarType> kCudaDtypes = {at::kFloat, at::kHalf, at::kBFloat16};
constexpr float kNormEps = 1e-6f;    // rows are divided by max(‖row‖, 1e-6) (reference.NORM_EPS)
constexpr double kVarianceEps = 1e-8;  // added to s²
constexpr double kLogTwoPiE = 2.8378770664093454836;  // log(2πe) = 1 + log(2π)
constexpr int kThreads = 128;
constexpr int kMaxRows = 8192;       // R floats of dynamic shared memory per block

struct RowStats {  // statistics of one Gram row over its R entries
  float mean;
  float m2;  // Σ (G_ij − mean)²
};

struct Moments {  // per sample: mean of G and s² = Var(G) + eps
  float mean;
  float var;
};

// ---------------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------------

// rows[b, r, :] = normalize(mean_h logits[b, h, P + row_index[b, r], P:]); norms[b, r] = ‖mean row‖.
template <typename scalar_t>
__global__ void gather_rows_kernel(const scalar_t* __restrict__ logits, const int64_t* __restrict__ row_index,
                                   int H, int N, int P, int R, int num_patches, float* __restrict__ rows,
                                   float* __restrict__ norms, int* __restrict__ bad_index) {
  __shared__ float scratch[kWarpSize];
  const int64_t br = blockIdx.x;  // b·R + r
  const int64_t b = br / R;
  int64_t idx = row_index[br];
  if (idx < 0 || idx >= num_patches) {  // reported by the host after the launch; read a valid row meanwhile
    if (threadIdx.x == 0) *bad_index = 1;
    idx = 0;
  }
  const float inv_h = 1.f / static_cast<float>(H);
  const int64_t head_stride = static_cast<int64_t>(N) * N;
  const scalar_t* src = logits + b * H * head_stride + (P + idx) * N + P;
  float* out = rows + br * num_patches;
  float sum_sq = 0.f;
  for (int j = threadIdx.x; j < num_patches; j += blockDim.x) {
    float s = 0.f;
    for (int h = 0; h < H; ++h) s += static_cast<float>(src[h * head_stride + j]);
    const float x = s * inv_h;
    out[j] = x;
    sum_sq += x * x;
  }
  const float norm = sqrtf(block_sum(sum_sq, scratch));
  const float inv = 1.f / fmaxf(norm, kNormEps);
  for (int j = threadIdx.x; j < num_patches; j += blockDim.x) out[j] *= inv;  // this thread's own writes
  if (threadIdx.x == 0) norms[br] = norm;
}

// g[j] = G_ij = x_i·x_j for j < R, one warp per j (x_i stays in L1). Ends with __syncthreads.
__device__ __forceinline__ void gram_row(const float* __restrict__ rows_b, int i, int R, int num_patches,
                                         float* g) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int num_warps = blockDim.x / kWarpSize;
  const float* xi = rows_b + static_cast<int64_t>(i) * num_patches;
  for (int j = warp; j < R; j += num_warps) {
    const float* xj = rows_b + static_cast<int64_t>(j) * num_patches;
    float dot = 0.f;
    for (int k = lane; k < num_patches; k += kWarpSize) dot += xi[k] * xj[k];
    dot = warp_sum(dot);
    if (lane == 0) g[j] = dot;
  }
  __syncthreads();
}

__global__ void gram_row_stats_kernel(const float* __restrict__ rows, int R, int num_patches,
                                      RowStats* __restrict__ stats) {
  extern __shared__ float g[];  // R floats
  __shared__ float scratch[kWarpSize];
  const int64_t bi = blockIdx.x;
  const int64_t b = bi / R;
  const int i = static_cast<int>(bi % R);
  gram_row(rows + b * R * num_patches, i, R, num_patches, g);
  float s = 0.f;
  for (int j = threadIdx.x; j < R; j += blockDim.x) s += g[j];
  const float mean = block_sum(s, scratch) / static_cast<float>(R);
  float sq = 0.f;
  for (int j = threadIdx.x; j < R; j += blockDim.x) {
    const float c = g[j] - mean;
    sq += c * c;
  }
  const float m2 = block_sum(sq, scratch);
  if (threadIdx.x == 0) stats[bi] = RowStats{mean, m2};
}

// Chan et al.'s merge of two (count, mean, M2) summaries.
__device__ __forceinline__ void merge_moments(double& n, double& mean, double& m2, double n_b, double mean_b,
                                              double m2_b) {
  if (n_b == 0.0) return;
  const double total = n + n_b;
  const double delta = mean_b - mean;
  mean += delta * (n_b / total);
  m2 += m2_b + delta * delta * (n * n_b / total);
  n = total;
}

// One warp per sample: merge the R row summaries → h (optional) and the moments (optional).
template <typename scalar_t>
__global__ void finalize_kernel(const RowStats* __restrict__ stats, int B, int R, scalar_t* __restrict__ h,
                                Moments* __restrict__ moments) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t b = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarpSize) + threadIdx.x / kWarpSize;
  if (b >= B) return;  // whole warps leave together
  double n = 0.0, mean = 0.0, m2 = 0.0;
  for (int r = lane; r < R; r += kWarpSize) {
    const RowStats s = stats[b * R + r];
    merge_moments(n, mean, m2, static_cast<double>(R), s.mean, s.m2);
  }
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
    const double n_o = __shfl_down_sync(0xffffffffu, n, offset);
    const double mean_o = __shfl_down_sync(0xffffffffu, mean, offset);
    const double m2_o = __shfl_down_sync(0xffffffffu, m2, offset);
    merge_moments(n, mean, m2, n_o, mean_o, m2_o);
  }
  if (lane == 0) {
    const double var = m2 / (static_cast<double>(R) * static_cast<double>(R)) + kVarianceEps;
    if (h != nullptr) h[b] = static_cast<scalar_t>(0.5 * (kLogTwoPiE + log(var)));
    if (moments != nullptr) moments[b] = Moments{static_cast<float>(mean), static_cast<float>(var)};
  }
}

// drows[b, i, :] = ∂h/∂(head-mean row i)·grad[b], the 1/H of the head mean included.
//   dG_ij = grad·(G_ij − μ)/(s²·R²); dX_i = 2·Σ_j dG_ij·x_j (G symmetric);
//   through x = y/max(‖y‖, eps): dY = (dX − x·⟨x, dX⟩)/‖y‖, or dX/eps where ‖y‖ < eps.
template <typename scalar_t>
__global__ void backward_rows_kernel(const float* __restrict__ rows, const float* __restrict__ norms,
                                     const Moments* __restrict__ moments, const scalar_t* __restrict__ grad, int R,
                                     int num_patches, float inv_h, float* __restrict__ drows) {
  extern __shared__ float w[];  // R floats: G_ij − μ
  __shared__ float scratch[kWarpSize];
  const int64_t bi = blockIdx.x;
  const int64_t b = bi / R;
  const int i = static_cast<int>(bi % R);
  const float* rows_b = rows + b * R * num_patches;
  gram_row(rows_b, i, R, num_patches, w);
  const Moments mom = moments[b];
  for (int j = threadIdx.x; j < R; j += blockDim.x) w[j] -= mom.mean;
  __syncthreads();
  const float coef = 2.f * static_cast<float>(grad[b]) / (mom.var * static_cast<float>(R) * static_cast<float>(R));
  const float* xi = rows_b + static_cast<int64_t>(i) * num_patches;
  float* out = drows + bi * num_patches;
  float dot = 0.f;
  for (int k = threadIdx.x; k < num_patches; k += blockDim.x) {
    float acc = 0.f;
    for (int j = 0; j < R; ++j) acc += w[j] * rows_b[static_cast<int64_t>(j) * num_patches + k];
    const float dx = coef * acc;
    out[k] = dx;
    dot += xi[k] * dx;
  }
  dot = block_sum(dot, scratch);
  const float norm = norms[bi];
  if (norm >= kNormEps) {
    const float s = inv_h / norm;
    for (int k = threadIdx.x; k < num_patches; k += blockDim.x) out[k] = (out[k] - xi[k] * dot) * s;
  } else {
    const float s = inv_h / kNormEps;
    for (int k = threadIdx.x; k < num_patches; k += blockDim.x) out[k] *= s;
  }
}

// grad_logits[b, h, P + row, P:] = Σ over the picks r of that row of drows[b, r, :], for every
// head; the first pick of a row writes it, later duplicates return.
template <typename scalar_t>
__global__ void scatter_rows_kernel(const float* __restrict__ drows, const int64_t* __restrict__ row_index, int H,
                                    int N, int P, int R, int num_patches, scalar_t* __restrict__ grad_logits) {
  __shared__ int later_duplicate, earlier_duplicate;
  const int64_t br = blockIdx.x;
  const int64_t b = br / R;
  const int r = static_cast<int>(br % R);
  const int64_t* idx_b = row_index + b * R;
  const int64_t idx = idx_b[r];
  if (idx < 0 || idx >= num_patches) return;  // invalid input: the op raises after the launch
  if (threadIdx.x == 0) later_duplicate = earlier_duplicate = 0;
  __syncthreads();
  for (int o = threadIdx.x; o < R; o += blockDim.x) {
    if (o != r && idx_b[o] == idx) {
      if (o < r) earlier_duplicate = 1;  // benign race: every writer stores 1
      else later_duplicate = 1;
    }
  }
  __syncthreads();
  if (earlier_duplicate) return;
  const int64_t head_stride = static_cast<int64_t>(N) * N;
  scalar_t* dst = grad_logits + b * H * head_stride + (P + idx) * N + P;
  for (int k = threadIdx.x; k < num_patches; k += blockDim.x) {
    float s = drows[br * num_patches + k];
    if (later_duplicate) {
      for (int o = r + 1; o < R; ++o) {
        if (idx_b[o] == idx) s += drows[(b * R + o) * num_patches + k];
      }
    }
    const scalar_t v = static_cast<scalar_t>(s);
    for (int h = 0; h < H; ++h) dst[h * head_stride + k] = v;
  }
}

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------
struct Problem {
  int64_t B, H, N, P, R, num_patches;
};

Problem check_inputs(const at::Tensor& logits, const at::Tensor& row_index, int64_t num_prefix_tokens,
                     const char* op) {
  const int64_t num_patches = checks::check_entropy_inputs(logits, row_index, num_prefix_tokens, kCudaDtypes);
  MASKAQ_CHECK_VALUE(logits.is_cuda(), op, ": logits must be a CUDA tensor here, got ", logits.device());
  const Problem pb{logits.size(0), logits.size(1), logits.size(2), num_prefix_tokens, row_index.size(1),
                   num_patches};
  MASKAQ_CHECK_VALUE(pb.R <= kMaxRows, op, ": at most ", kMaxRows, " rows per sample on CUDA, got R = ", pb.R);
  check_int_fits(pb.N, op, "N");
  check_int_fits(pb.H, op, "H");
  check_int_fits(pb.B * pb.R, op, "B·R");
  return pb;
}

// Launches 1–3: normalized rows (B, R, N') and norms (B, R) into the workspaces, then h and/or
// the moments. Returns the bad-index flag (int32 on the device).
template <typename scalar_t>
at::Tensor launch_forward(const at::Tensor& logits, const at::Tensor& row_index, const Problem& pb, at::Tensor& rows,
                          at::Tensor& norms, scalar_t* h, Moments* moments, cudaStream_t stream) {
  const auto opts = logits.options();
  at::Tensor bad_index = at::zeros({1}, opts.dtype(at::kInt));
  rows = at::empty({pb.B, pb.R, pb.num_patches}, opts.dtype(at::kFloat));
  norms = at::empty({pb.B, pb.R}, opts.dtype(at::kFloat));
  at::Tensor stats = at::empty({pb.B * pb.R, static_cast<int64_t>(sizeof(RowStats) / sizeof(float))},
                               opts.dtype(at::kFloat));
  const int blocks = static_cast<int>(pb.B * pb.R);
  gather_rows_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
      logits.data_ptr<scalar_t>(), row_index.data_ptr<int64_t>(), static_cast<int>(pb.H), static_cast<int>(pb.N),
      static_cast<int>(pb.P), static_cast<int>(pb.R), static_cast<int>(pb.num_patches), rows.data_ptr<float>(),
      norms.data_ptr<float>(), bad_index.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  auto* row_stats = reinterpret_cast<RowStats*>(stats.data_ptr<float>());
  gram_row_stats_kernel<<<blocks, kThreads, pb.R * sizeof(float), stream>>>(
      rows.data_ptr<float>(), static_cast<int>(pb.R), static_cast<int>(pb.num_patches), row_stats);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  constexpr int kSamplesPerBlock = kThreads / kWarpSize;
  finalize_kernel<scalar_t><<<static_cast<int>(ceil_div(pb.B, kSamplesPerBlock)), kThreads, 0, stream>>>(
      row_stats, static_cast<int>(pb.B), static_cast<int>(pb.R), h, moments);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return bad_index;
}

// One device→host read of the flag; on a bad index, the CPU kernels' IndexError.
void raise_if_bad_index(const at::Tensor& bad_index, const at::Tensor& row_index, int64_t num_patches) {
  if (bad_index.item<int>() != 0) {
    checks::check_row_index_range(row_index, num_patches);  // throws with the range found
    MASKAQ_CHECK_INDEX(false, "row_index values must lie in [0, ", num_patches, ")");
  }
}

at::Tensor patch_similarity_entropy_cuda(const at::Tensor& logits, const at::Tensor& row_index,
                                         int64_t num_prefix_tokens) {
  const Problem pb = check_inputs(logits, row_index, num_prefix_tokens, "patch_similarity_entropy");
  // The guard comes after the checks: a CPU tensor here must be a clear error, not an assert.
  const c10::cuda::OptionalCUDAGuard guard(logits.device());
  at::Tensor h = at::empty({pb.B}, logits.options());
  if (pb.B == 0) return h;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  at::Tensor rows, norms, bad_index;
  MASKAQ_DISPATCH_FLOAT_TYPES(logits.scalar_type(), "patch_similarity_entropy_cuda", [&] {
    bad_index = launch_forward<scalar_t>(logits, row_index, pb, rows, norms, h.data_ptr<scalar_t>(), nullptr, stream);
  });
  raise_if_bad_index(bad_index, row_index, pb.num_patches);
  return h;
}

at::Tensor patch_similarity_entropy_backward_cuda(const at::Tensor& grad, const at::Tensor& logits,
                                                  const at::Tensor& row_index, int64_t num_prefix_tokens) {
  const Problem pb = check_inputs(logits, row_index, num_prefix_tokens, "patch_similarity_entropy_backward");
  checks::check_entropy_grad(grad, logits);
  const c10::cuda::OptionalCUDAGuard guard(logits.device());
  // Zero everywhere but the picked rows' patch columns, which the scatter overwrites.
  at::Tensor grad_logits = at::zeros_like(logits, at::MemoryFormat::Contiguous);
  if (pb.B == 0) return grad_logits;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto float_opts = logits.options().dtype(at::kFloat);
  at::Tensor moments = at::empty({pb.B, static_cast<int64_t>(sizeof(Moments) / sizeof(float))}, float_opts);
  at::Tensor drows = at::empty({pb.B, pb.R, pb.num_patches}, float_opts);
  at::Tensor rows, norms, bad_index;
  MASKAQ_DISPATCH_FLOAT_TYPES(logits.scalar_type(), "patch_similarity_entropy_backward_cuda", [&] {
    auto* mom = reinterpret_cast<Moments*>(moments.data_ptr<float>());
    bad_index = launch_forward<scalar_t>(logits, row_index, pb, rows, norms, nullptr, mom, stream);
    const int blocks = static_cast<int>(pb.B * pb.R);
    backward_rows_kernel<scalar_t><<<blocks, kThreads, pb.R * sizeof(float), stream>>>(
        rows.data_ptr<float>(), norms.data_ptr<float>(), mom, grad.data_ptr<scalar_t>(), static_cast<int>(pb.R),
        static_cast<int>(pb.num_patches), 1.f / static_cast<float>(pb.H), drows.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    scatter_rows_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        drows.data_ptr<float>(), row_index.data_ptr<int64_t>(), static_cast<int>(pb.H), static_cast<int>(pb.N),
        static_cast<int>(pb.P), static_cast<int>(pb.R), static_cast<int>(pb.num_patches),
        grad_logits.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  raise_if_bad_index(bad_index, row_index, pb.num_patches);
  return grad_logits;
}

}  // namespace
}  // namespace cuda
}  // namespace maskaq

TORCH_LIBRARY_IMPL(maskaq, CUDA, m) {
  m.impl("patch_similarity_entropy", &maskaq::cuda::patch_similarity_entropy_cuda);
  m.impl("patch_similarity_entropy_backward", &maskaq::cuda::patch_similarity_entropy_backward_cuda);
}
