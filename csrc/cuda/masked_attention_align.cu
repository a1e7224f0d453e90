// maskaq::masked_attention_align on CUDA: the masked L1 alignment of the student's CLS-row
// logits to the teacher's over the teacher's most-attended keys, and its backward.
//
// Forward, two launches:
//   1. one block per sample, everything in shared memory: the teacher score c_i = Σ_{l,h} t
//      (the CPU kernel's; it ranks keys as the reference's mean over (l, h) does), the
//      block-level top-k by rank (i is in the top-k when fewer than k keys score higher, ties to
//      the lower index: the stable sort of the reference), the stochastic drop by rank of the
//      uniform draws among the top-k (the keep_k smallest survive, ties to the lower index), the
//      mask row, and Σ_l Σ_i |Σ_h (t − q)|·m_i for the sample;
//   2. one block sums the per-sample partials in a fixed order and divides by H → loss
//      (deterministic).
// Backward: one block sums the mask → coef = grad/(L·H·(Σm + 1e-8)); one block per (block l,
// sample) writes −coef·sign(Σ_h (t − q))·m_i to every head of cls_q's gradient.
// The difference is summed per head, t − q, never as mean_h t − mean_h q: that form contracts
// to an FMA under nvcc (Σt·(1/H) − Σq·(1/H) with one product unrounded), which is 1 ulp away
// from 0 where Σ_h t = Σ_h q exactly, and flipped the sign of such ties (seen on an H200 in
// float16 and bfloat16, where exact ties are common). The CPU kernel sums the same way.
// Non-finite draws are flagged by the kernel and raised (ValueError, as on CPU) after one read.
#include "common.cuh"
#include "checks.h"

namespace maskaq {
namespace cuda {
namespace {

const std::initializer_list<at::ScalarType> kCudaDtypes = {at::kFloat, at::kHalf, at::kBFloat16};
constexpr double kMaskEps = 1e-8;  // Σ m + 1e-8 in the denominator
constexpr int kThreads = 256;

// Shared memory of the forward kernel per key: its draw (double), score (float), two flags.
constexpr int64_t kSharedBytesPerKey = sizeof(double) + sizeof(float) + 2;

// Σ_h cls[l, b, h, i] ((L, B, H, M) layout).
template <typename scalar_t>
__device__ __forceinline__ float head_sum(const scalar_t* __restrict__ cls, int64_t lb, int H, int M, int i) {
  const scalar_t* p = cls + lb * H * M + i;
  float s = 0.f;
  for (int h = 0; h < H; ++h) s += static_cast<float>(p[static_cast<int64_t>(h) * M]);
  return s;
}

// Σ_h (t − q) at [l, b, :, i] = H·(mean_h t − mean_h q), with no product to contract: exactly 0
// at an exact tie.
template <typename scalar_t>
__device__ __forceinline__ float head_difference(const scalar_t* __restrict__ cls_t,
                                                 const scalar_t* __restrict__ cls_q, int64_t lb, int H, int M,
                                                 int i) {
  const int64_t base = lb * H * M + i;
  float s = 0.f;
  for (int h = 0; h < H; ++h) {
    const int64_t e = base + static_cast<int64_t>(h) * M;
    s += static_cast<float>(cls_t[e]) - static_cast<float>(cls_q[e]);
  }
  return s;
}

// ---------------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------------
template <typename scalar_t>
__global__ void align_forward_kernel(const scalar_t* __restrict__ cls_t, const scalar_t* __restrict__ cls_q,
                                     const double* __restrict__ rand, int L, int B, int H, int M, int top_k,
                                     int keep_k, scalar_t* __restrict__ mask, float* __restrict__ partial,
                                     int* __restrict__ bad_rand) {
  extern __shared__ double shared[];
  double* draw = shared;                                            // M
  float* score = reinterpret_cast<float*>(draw + M);                // M
  unsigned char* in_top = reinterpret_cast<unsigned char*>(score + M);  // M
  unsigned char* kept = in_top + M;                                 // M
  __shared__ float scratch[kWarpSize];
  const int b = blockIdx.x;

  for (int i = threadIdx.x; i < M; i += blockDim.x) {
    float c = 0.f;
    for (int l = 0; l < L; ++l) c += head_sum(cls_t, static_cast<int64_t>(l) * B + b, H, M, i);
    score[i] = isnan(c) ? INFINITY : c;  // NaN ranks highest, as in torch.sort (and the CPU kernel)
    double r = rand[static_cast<int64_t>(b) * M + i];
    if (!isfinite(r)) {
      *bad_rand = 1;  // raised by the host; rank it last meanwhile
      r = INFINITY;
    }
    draw[i] = r;
  }
  __syncthreads();
  // Block-level top-k: i is in the top-k iff fewer than k keys rank before it.
  for (int i = threadIdx.x; i < M; i += blockDim.x) {
    const float ci = score[i];
    int rank = 0;
    for (int j = 0; j < M; ++j) rank += (score[j] > ci) || (score[j] == ci && j < i);
    in_top[i] = rank < top_k;
  }
  __syncthreads();
  // Stochastic drop: of the top-k, the keep_k with the smallest draw survive.
  for (int i = threadIdx.x; i < M; i += blockDim.x) {
    bool keep = false;
    if (in_top[i]) {
      const double ri = draw[i];
      int rank = 0;
      for (int j = 0; j < M; ++j) rank += in_top[j] && ((draw[j] < ri) || (draw[j] == ri && j < i));
      keep = rank < keep_k;
    }
    kept[i] = keep;
    mask[static_cast<int64_t>(b) * M + i] = static_cast<scalar_t>(keep ? 1.f : 0.f);
  }
  __syncthreads();
  // Σ over blocks l and kept keys i of |Σ_h (t − q)| (the 1/H is applied once, at the end).
  float sum = 0.f;
  const int64_t work = static_cast<int64_t>(L) * M;
  for (int64_t e = threadIdx.x; e < work; e += blockDim.x) {
    const int i = static_cast<int>(e % M);
    if (!kept[i]) continue;
    const int64_t lb = (e / M) * B + b;
    sum += fabsf(head_difference(cls_t, cls_q, lb, H, M, i));
  }
  sum = block_sum(sum, scratch);
  if (threadIdx.x == 0) partial[b] = sum;
}

// loss = Σ_b partial_b / H / (Σ m + 1e-8) / L, Σ m = B·keep_k; one block, fixed order.
template <typename scalar_t>
__global__ void align_finalize_kernel(const float* __restrict__ partial, int B, int L, int H, double mask_sum,
                                      scalar_t* __restrict__ loss) {
  __shared__ float scratch[kWarpSize];
  float s = 0.f;
  for (int b = threadIdx.x; b < B; b += blockDim.x) s += partial[b];
  s = block_sum(s, scratch);
  if (threadIdx.x == 0) *loss = static_cast<scalar_t>(static_cast<double>(s) / H / (mask_sum + kMaskEps) / L);
}

// coef = grad / (L·H·(Σ mask + 1e-8)); one block.
template <typename scalar_t>
__global__ void align_backward_coef_kernel(const scalar_t* __restrict__ mask, int64_t numel,
                                           const scalar_t* __restrict__ grad, int L, int H, float* __restrict__ coef) {
  __shared__ float scratch[kWarpSize];
  float s = 0.f;
  for (int64_t e = threadIdx.x; e < numel; e += blockDim.x) s += static_cast<float>(mask[e]);
  s = block_sum(s, scratch);
  if (threadIdx.x == 0) {
    const double denom = static_cast<double>(L) * H * (static_cast<double>(s) + kMaskEps);
    *coef = static_cast<float>(static_cast<double>(static_cast<float>(*grad)) / denom);
  }
}

// grad_q[l, b, h, i] = −coef·sign(Σ_h (t − q))·m[b, i]; one block per (l, b).
template <typename scalar_t>
__global__ void align_backward_kernel(const scalar_t* __restrict__ cls_t, const scalar_t* __restrict__ cls_q,
                                      const scalar_t* __restrict__ mask, const float* __restrict__ coef, int B,
                                      int H, int M, scalar_t* __restrict__ grad_q) {
  const int64_t lb = blockIdx.x;
  const int b = static_cast<int>(lb % B);
  const float c = *coef;
  scalar_t* out = grad_q + lb * H * M;
  for (int i = threadIdx.x; i < M; i += blockDim.x) {
    const float m = static_cast<float>(mask[static_cast<int64_t>(b) * M + i]);
    float w = 0.f;
    if (m != 0.f) {
      const float diff = head_difference(cls_t, cls_q, lb, H, M, i);
      const float sgn = static_cast<float>((diff > 0.f) - (diff < 0.f));
      w = -sgn * m * c;
    }
    const scalar_t v = static_cast<scalar_t>(w);
    for (int h = 0; h < H; ++h) out[static_cast<int64_t>(h) * M + i] = v;
  }
}

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------

// Dynamic shared memory of the forward kernel; above 48 KiB it must be opted into.
template <typename scalar_t>
size_t forward_shared_bytes(int64_t M) {
  const int64_t bytes = M * kSharedBytesPerKey;
  const int64_t limit = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin) -
                        static_cast<int64_t>(kWarpSize * sizeof(float));
  MASKAQ_CHECK_VALUE(bytes <= limit, "masked_attention_align: M = ", M, " keys need ", bytes,
                    " bytes of shared memory per block, more than this GPU offers (", limit, ")");
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(align_forward_kernel<scalar_t>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(bytes)));
  }
  return static_cast<size_t>(bytes);
}

std::tuple<at::Tensor, at::Tensor> masked_attention_align_cuda(const at::Tensor& cls_t, const at::Tensor& cls_q,
                                                               const at::Tensor& rand, double ratio, double keep) {
  const auto shape = checks::check_align_inputs(cls_t, cls_q, rand, ratio, keep, kCudaDtypes);
  MASKAQ_CHECK_VALUE(cls_t.is_cuda(), "masked_attention_align: cls_t must be a CUDA tensor here, got ",
                    cls_t.device());
  // The guard comes after the checks: a CPU tensor here must be a clear error, not an assert.
  const c10::cuda::OptionalCUDAGuard guard(cls_t.device());
  const int64_t L = shape[0], B = shape[1], H = shape[2], M = shape[3];
  for (const int64_t v : {L, B, H, M}) check_int_fits(v, "masked_attention_align", "a dimension of cls_t");
  const int64_t top_k = checks::align_top_k(M, ratio);
  const int64_t keep_k = checks::align_keep_k(top_k, keep);
  at::Tensor mask = at::empty({B, M}, cls_t.options());
  at::Tensor loss = at::empty({}, cls_t.options());
  if (B == 0) {
    loss.fill_(0);
    return {loss, mask};
  }
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor draws = rand.to(at::kDouble).contiguous();  // exact for every floating dtype
  at::Tensor partial = at::empty({B}, cls_t.options().dtype(at::kFloat));
  at::Tensor bad_rand = at::zeros({1}, cls_t.options().dtype(at::kInt));
  MASKAQ_DISPATCH_FLOAT_TYPES(cls_t.scalar_type(), "masked_attention_align_cuda", [&] {
    const size_t shared_bytes = forward_shared_bytes<scalar_t>(M);
    align_forward_kernel<scalar_t><<<static_cast<int>(B), kThreads, shared_bytes, stream>>>(
        cls_t.data_ptr<scalar_t>(), cls_q.data_ptr<scalar_t>(), draws.data_ptr<double>(), static_cast<int>(L),
        static_cast<int>(B), static_cast<int>(H), static_cast<int>(M), static_cast<int>(top_k),
        static_cast<int>(keep_k), mask.data_ptr<scalar_t>(), partial.data_ptr<float>(), bad_rand.data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    align_finalize_kernel<scalar_t><<<1, kThreads, 0, stream>>>(partial.data_ptr<float>(), static_cast<int>(B),
                                                                 static_cast<int>(L), static_cast<int>(H),
                                                                 static_cast<double>(B * keep_k),
                                                                 loss.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (bad_rand.item<int>() != 0) {  // one read per call (the loss is computed once per synthesis step)
    const at::Tensor finite = at::isfinite(draws);
    const double first_bad = draws.masked_select(finite.logical_not()).flatten()[0].item<double>();
    MASKAQ_CHECK_VALUE(false, "rand must hold finite uniform draws, got ", first_bad);
  }
  return {loss, mask};
}

at::Tensor masked_attention_align_backward_cuda(const at::Tensor& grad, const at::Tensor& cls_t,
                                                const at::Tensor& cls_q, const at::Tensor& mask) {
  checks::check_align_backward_inputs(grad, cls_t, cls_q, mask, kCudaDtypes);
  MASKAQ_CHECK_VALUE(cls_t.is_cuda(), "masked_attention_align_backward: cls_t must be a CUDA tensor here, got ",
                    cls_t.device());
  const c10::cuda::OptionalCUDAGuard guard(cls_t.device());
  const int64_t L = cls_t.size(0), B = cls_t.size(1), H = cls_t.size(2), M = cls_t.size(3);
  for (const int64_t v : {L, B, H, M}) check_int_fits(v, "masked_attention_align_backward", "a dimension of cls_t");
  at::Tensor grad_q = at::empty_like(cls_q, at::MemoryFormat::Contiguous);
  if (cls_q.numel() == 0) return grad_q;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  at::Tensor coef = at::empty({1}, cls_t.options().dtype(at::kFloat));
  MASKAQ_DISPATCH_FLOAT_TYPES(cls_t.scalar_type(), "masked_attention_align_backward_cuda", [&] {
    align_backward_coef_kernel<scalar_t><<<1, kThreads, 0, stream>>>(
        mask.data_ptr<scalar_t>(), mask.numel(), grad.data_ptr<scalar_t>(), static_cast<int>(L),
        static_cast<int>(H), coef.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    align_backward_kernel<scalar_t><<<static_cast<int>(L * B), kThreads, 0, stream>>>(
        cls_t.data_ptr<scalar_t>(), cls_q.data_ptr<scalar_t>(), mask.data_ptr<scalar_t>(), coef.data_ptr<float>(),
        static_cast<int>(B), static_cast<int>(H), static_cast<int>(M), grad_q.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_q;
}

}  // namespace
}  // namespace cuda
}  // namespace maskaq

TORCH_LIBRARY_IMPL(maskaq, CUDA, m) {
  m.impl("masked_attention_align", &maskaq::cuda::masked_attention_align_cuda);
  m.impl("masked_attention_align_backward", &maskaq::cuda::masked_attention_align_backward_cuda);
}
