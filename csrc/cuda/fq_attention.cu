// maskaq::fq_attention on CUDA: attention with LSQ fake-quantized operands (student) or plain
// (teacher). The products run through cuBLAS in float32 whatever the input dtype (see bmm_fp32);
// everything between them is fused:
//   forward:  one pass quantizes q, k, v; one warp per logits row computes softmax(A·scale) and
//             fake-quantizes P in registers (quantize–softmax–quantize never leaves the row);
//   backward: one warp per row recomputes P and P̂, applies the STE mask, the softmax backward
//             and the LSQ sums of the P quantizer; one pass applies the STE masks of q, k, v and
//             their LSQ sums. Per-block partial sums are reduced by one small kernel, in a fixed
//             order, so the step / zero-point gradients are deterministic.
#include "common.cuh"
#include "checks.h"

#include <ATen/cuda/Exceptions.h>

namespace maskaq {
namespace cuda {
namespace {

constexpr const char* kOp = "fq_attention";
constexpr const char* kOpBackward = "fq_attention_backward";
enum Operand : int { kQ = 0, kK = 1, kP = 2, kV = 3 };

constexpr int kElementwiseThreads = 256;
constexpr int kRowThreads = 256;  // one warp per row: 8 rows per block
constexpr int kRowsPerBlock = kRowThreads / kWarpSize;

// ---------------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------------

// q̂, k̂, v̂ = FQ(q), FQ(k), FQ(v): the three tensors have one shape, so one grid-stride pass.
template <typename scalar_t>
__global__ void fake_quant_qkv_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                                      const scalar_t* __restrict__ v, scalar_t* __restrict__ q_hat,
                                      scalar_t* __restrict__ k_hat, scalar_t* __restrict__ v_hat, int64_t numel,
                                      const float* __restrict__ step, const float* __restrict__ zero_point,
                                      QuantRanges ranges) {
  const LsqQuantizer fq_q = LsqQuantizer::load(step, zero_point, ranges, kQ);
  const LsqQuantizer fq_k = LsqQuantizer::load(step, zero_point, ranges, kK);
  const LsqQuantizer fq_v = LsqQuantizer::load(step, zero_point, ranges, kV);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    q_hat[i] = static_cast<scalar_t>(fq_q.fake_quant(static_cast<float>(q[i])));
    k_hat[i] = static_cast<scalar_t>(fq_k.fake_quant(static_cast<float>(k[i])));
    v_hat[i] = static_cast<scalar_t>(fq_v.fake_quant(static_cast<float>(v[i])));
  }
}

// Row statistics of softmax(a·scale): the maximum and the sum of exponentials (one warp).
template <typename scalar_t>
__device__ __forceinline__ void softmax_row_stats(const scalar_t* row, int n, float scale, int lane,  // may alias the output
                                                  float& row_max, float& row_sum) {
  float m = -INFINITY;
  for (int j = lane; j < n; j += kWarpSize) m = fmaxf(m, static_cast<float>(row[j]) * scale);
  m = warp_max(m);
  float s = 0.f;
  for (int j = lane; j < n; j += kWarpSize) s += expf(static_cast<float>(row[j]) * scale - m);
  row_max = m;
  row_sum = warp_sum(s);
}

// P = softmax(A·scale) per row, then P̂ = FQ(P) (kQuant) — in registers, written once, in float32
// (a bf16 P̂ = level·α would keep 8 bits and leave the grid at 8-bit P).
// `probs` may alias `logits` (each lane reads element j before it writes element j).
template <bool kQuant>
__global__ void softmax_fake_quant_rows_kernel(const float* logits, float* probs, int64_t rows, int n,
                                               float scale, const float* __restrict__ step,
                                               const float* __restrict__ zero_point, QuantRanges ranges) {
  const int lane = threadIdx.x % kWarpSize;
  LsqQuantizer fq_p{};
  if (kQuant) fq_p = LsqQuantizer::load(step, zero_point, ranges, kP);
  const int64_t row_stride = static_cast<int64_t>(gridDim.x) * kRowsPerBlock;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarpSize; r < rows;
       r += row_stride) {
    const float* in = logits + r * n;
    float* out = probs + r * n;
    float row_max, row_sum;
    softmax_row_stats(in, n, scale, lane, row_max, row_sum);
    for (int j = lane; j < n; j += kWarpSize) {
      float p = __fdiv_rn(expf(in[j] * scale - row_max), row_sum);
      if (kQuant) p = fq_p.fake_quant(p);
      out[j] = p;
    }
  }
}

// Backward of one row, in place in float32: logits → P̂ (P in full precision), dP̂ → dA.
//   dP = STE(dP̂), dA = scale·P⊙(dP − Σ dP⊙P) + grad_logits (the latter in the input dtype).
// Each block writes its (∂α, ∂z) sums of the P quantizer to partials[2·block].
template <typename scalar_t, bool kQuant, bool kHasGradLogits>
__global__ void softmax_fake_quant_rows_backward_kernel(float* logits_to_probs, float* dprobs_to_dlogits,
                                                        const scalar_t* __restrict__ grad_logits, int64_t rows, int n,
                                                        float scale, const float* __restrict__ step,
                                                        const float* __restrict__ zero_point, QuantRanges ranges,
                                                        float* __restrict__ partials) {
  __shared__ float scratch[kWarpSize];
  const int lane = threadIdx.x % kWarpSize;
  LsqQuantizer fq_p{};
  if (kQuant) fq_p = LsqQuantizer::load(step, zero_point, ranges, kP);
  float grad_alpha = 0.f, grad_zero = 0.f;
  const int64_t row_stride = static_cast<int64_t>(gridDim.x) * kRowsPerBlock;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarpSize; r < rows;
       r += row_stride) {
    float* a = logits_to_probs + r * n;
    float* g = dprobs_to_dlogits + r * n;
    float row_max, row_sum;
    softmax_row_stats(a, n, scale, lane, row_max, row_sum);
    // Pass 1: Σ dP⊙P (and the LSQ sums of the P quantizer).
    float dot = 0.f;
    for (int j = lane; j < n; j += kWarpSize) {
      const float p = __fdiv_rn(expf(a[j] * scale - row_max), row_sum);
      float dp = g[j];
      if (kQuant) dp = fq_p.backward(p, dp, grad_alpha, grad_zero);
      dot += dp * p;
    }
    dot = warp_sum(dot);
    // Pass 2: write dA over dP̂ and P̂ over A (same lane, same j: reads precede writes).
    for (int j = lane; j < n; j += kWarpSize) {
      const float p = __fdiv_rn(expf(a[j] * scale - row_max), row_sum);
      float dp = g[j];
      float p_out = p;
      if (kQuant) {
        float unused_alpha = 0.f, unused_zero = 0.f;
        dp = fq_p.backward(p, dp, unused_alpha, unused_zero);
        p_out = fq_p.fake_quant(p);
      }
      float da = scale * p * (dp - dot);
      if (kHasGradLogits) da += static_cast<float>(grad_logits[r * n + j]);
      g[j] = da;
      a[j] = p_out;
    }
  }
  if (kQuant) {
    grad_alpha = block_sum(grad_alpha, scratch);
    grad_zero = block_sum(grad_zero, scratch);
    if (threadIdx.x == 0) {
      partials[2 * blockIdx.x] = grad_alpha;
      partials[2 * blockIdx.x + 1] = grad_zero;
    }
  }
}

// STE masks of q, k, v applied in place (dx̂ → dx) and their LSQ sums to partials[6·block]
// in the order (α_q, z_q, α_k, z_k, α_v, z_v).
template <typename scalar_t>
__global__ void fake_quant_qkv_backward_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                                               const scalar_t* __restrict__ v, scalar_t* __restrict__ dq,
                                               scalar_t* __restrict__ dk, scalar_t* __restrict__ dv, int64_t numel,
                                               const float* __restrict__ step, const float* __restrict__ zero_point,
                                               QuantRanges ranges, float* __restrict__ partials) {
  __shared__ float scratch[kWarpSize];
  const LsqQuantizer fq_q = LsqQuantizer::load(step, zero_point, ranges, kQ);
  const LsqQuantizer fq_k = LsqQuantizer::load(step, zero_point, ranges, kK);
  const LsqQuantizer fq_v = LsqQuantizer::load(step, zero_point, ranges, kV);
  float sums[6] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    dq[i] = static_cast<scalar_t>(fq_q.backward(static_cast<float>(q[i]), static_cast<float>(dq[i]), sums[0], sums[1]));
    dk[i] = static_cast<scalar_t>(fq_k.backward(static_cast<float>(k[i]), static_cast<float>(dk[i]), sums[2], sums[3]));
    dv[i] = static_cast<scalar_t>(fq_v.backward(static_cast<float>(v[i]), static_cast<float>(dv[i]), sums[4], sums[5]));
  }
#pragma unroll
  for (int s = 0; s < 6; ++s) {
    const float total = block_sum(sums[s], scratch);
    if (threadIdx.x == 0) partials[6 * blockIdx.x + s] = total;
  }
}

struct GradScales {  // g = 1 / sqrt(numel(x)·qmax) of each quantizer's step, order (q, k, p, v)
  float g[4];
};

// grad_step[i] = g_i·Σ ∂α partials, grad_zero_point[i] = Σ ∂z partials (unscaled, as the public
// code runs); one block, fixed order.
__global__ void finalize_lsq_grads_kernel(const float* __restrict__ qkv_partials, int qkv_blocks,
                                          const float* __restrict__ p_partials, int p_blocks, GradScales scales,
                                          float* __restrict__ grad_step, float* __restrict__ grad_zero_point) {
  __shared__ float scratch[kWarpSize];
  // (operand, partial array, stride, offset of ∂α) for each quantizer
  const int operands[4] = {kQ, kK, kV, kP};
  for (int o = 0; o < 4; ++o) {
    const int which = operands[o];
    const float* partials = which == kP ? p_partials : qkv_partials;
    const int blocks = which == kP ? p_blocks : qkv_blocks;
    const int width = which == kP ? 2 : 6;
    const int offset = which == kP ? 0 : (which == kQ ? 0 : (which == kK ? 2 : 4));
    float a = 0.f, z = 0.f;
    for (int b = threadIdx.x; b < blocks; b += blockDim.x) {
      a += partials[width * b + offset];
      z += partials[width * b + offset + 1];
    }
    a = block_sum(a, scratch);
    z = block_sum(z, scratch);
    if (threadIdx.x == 0) {
      grad_step[which] = scales.g[which] * a;
      grad_zero_point[which] = z;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------
const std::initializer_list<at::ScalarType> kCudaDtypes = {at::kFloat, at::kHalf, at::kBFloat16};

// C[b] = op(A[b])·op(B[b]) for contiguous float32 (batch, rows, cols) tensors, op = transpose
// where asked, as a float32 (batch, M, N) tensor. Products run in float32 for every input dtype
// because |q̂·k̂ᵀ| above 65504 overflows fp16, and they call cuBLAS with the PEDANTIC compute
// type because at::bmm follows the caller's TF32 setting (torch.backends.cuda.matmul) and, on
// the cuBLASLt path, ignores at::NoTF32Guard, while flipping the global flag races with other
// threads; PEDANTIC forbids TF32 and any other reduced precision whatever the handle's math mode.
// The handle is torch's (its stream and workspace); libcublas comes with libtorch_cuda.
at::Tensor bmm_fp32(const at::Tensor& a_in, bool trans_a, const at::Tensor& b_in, bool trans_b) {
  const at::Tensor a = a_in.to(at::kFloat).contiguous(), b = b_in.to(at::kFloat).contiguous();
  const int64_t batch = a.size(0);
  const int64_t M = trans_a ? a.size(2) : a.size(1), K = trans_a ? a.size(1) : a.size(2);
  const int64_t N = trans_b ? b.size(1) : b.size(2);
  MASKAQ_CHECK(b.size(0) == batch && (trans_b ? b.size(2) : b.size(1)) == K, "fq_attention: product shapes ",
              a.sizes(), " and ", b.sizes(), " do not match");
  at::Tensor c = at::empty({batch, M, N}, a.options());
  if (c.numel() == 0) return c;
  if (K == 0) return c.zero_();
  for (const int64_t extent : {batch, M, N, K}) check_int_fits(extent, "fq_attention", "a product's size");
  // Row-major C = op(A)·op(B) is column-major Cᵀ = op(B)ᵀ·op(A)ᵀ, and a row-major matrix read
  // column-major is its transpose: so B comes first and each keeps its own transpose flag.
  const float alpha = 1.f, beta = 0.f;
  const cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();
  TORCH_CUDABLAS_CHECK(cublasGemmStridedBatchedEx(
      handle, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, static_cast<int>(N),
      static_cast<int>(M), static_cast<int>(K), &alpha, b.data_ptr<float>(), CUDA_R_32F,
      static_cast<int>(b.size(2)), b.size(1) * b.size(2), a.data_ptr<float>(), CUDA_R_32F,
      static_cast<int>(a.size(2)), a.size(1) * a.size(2), &beta, c.data_ptr<float>(), CUDA_R_32F,
      static_cast<int>(N), M * N, static_cast<int>(batch), CUBLAS_COMPUTE_32F_PEDANTIC, CUBLAS_GEMM_DEFAULT));
  return c;
}

// The quantizer arguments as the kernels read them: float32 step / zero point on the device
// (never copied to the host: no sync per attention call; a step <= 0 gives inf/NaN, not a crash).
struct Quantization {
  bool enabled = false;
  bool has_zero_point = false;
  at::Tensor step;        // float32 (4,)
  at::Tensor zero_point;  // float32 (4,) or undefined (zero points 0, no gradient)
  QuantRanges ranges{};
  const float* step_ptr() const { return enabled ? step.data_ptr<float>() : nullptr; }
  const float* zero_point_ptr() const { return has_zero_point ? zero_point.data_ptr<float>() : nullptr; }
};

// Checks every argument (the CPU kernels' checks, same messages) and prepares the quantizers.
Quantization check_and_prepare(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const std::optional<at::Tensor>& step, const std::optional<at::Tensor>& zero_point,
                               at::IntArrayRef qmin, at::IntArrayRef qmax, double scale, const char* op) {
  checks::check_fq_attention_tensors(q, k, v, step, zero_point, qmin, qmax, scale, kCudaDtypes);
  MASKAQ_CHECK_VALUE(q.is_cuda(), op, ": q, k, v must be CUDA tensors here, got ", q.device());
  check_int_fits(q.size(2), op, "N");
  Quantization quant;
  quant.enabled = step.has_value() && step->defined();
  if (!quant.enabled) return quant;
  for (int i = 0; i < 4; ++i) {
    quant.ranges.lo[i] = static_cast<int>(qmin[i]);
    quant.ranges.hi[i] = static_cast<int>(qmax[i]);
  }
  quant.step = step->detach().to(at::kFloat).contiguous();
  quant.has_zero_point = zero_point.has_value() && zero_point->defined();
  if (quant.has_zero_point) quant.zero_point = zero_point->detach().to(at::kFloat).contiguous();
  return quant;
}

template <typename scalar_t>
void launch_fake_quant_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& q_hat,
                           at::Tensor& k_hat, at::Tensor& v_hat, const Quantization& quant, cudaStream_t stream) {
  const int64_t numel = q.numel();
  const int blocks = grid_for(numel, kElementwiseThreads);
  fake_quant_qkv_kernel<scalar_t><<<blocks, kElementwiseThreads, 0, stream>>>(
      q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), q_hat.data_ptr<scalar_t>(),
      k_hat.data_ptr<scalar_t>(), v_hat.data_ptr<scalar_t>(), numel, quant.step_ptr(), quant.zero_point_ptr(),
      quant.ranges);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// (q̂, k̂, v̂): fake-quantized copies, or q, k, v themselves in full precision.
std::tuple<at::Tensor, at::Tensor, at::Tensor> operands(const at::Tensor& q, const at::Tensor& k,
                                                        const at::Tensor& v, const Quantization& quant,
                                                        cudaStream_t stream) {
  if (!quant.enabled) return {q, k, v};
  at::Tensor q_hat = at::empty_like(q), k_hat = at::empty_like(k), v_hat = at::empty_like(v);
  MASKAQ_DISPATCH_FLOAT_TYPES(q.scalar_type(), "fq_attention_quant_qkv", [&] {
    launch_fake_quant_qkv<scalar_t>(q, k, v, q_hat, k_hat, v_hat, quant, stream);
  });
  return {q_hat, k_hat, v_hat};
}

std::tuple<at::Tensor, at::Tensor> fq_attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     const std::optional<at::Tensor>& step,
                                                     const std::optional<at::Tensor>& zero_point,
                                                     at::IntArrayRef qmin, at::IntArrayRef qmax, double scale,
                                                     bool return_logits) {
  const Quantization quant = check_and_prepare(q, k, v, step, zero_point, qmin, qmax, scale, kOp);
  // The guard comes after the checks: a CPU tensor here must be a clear error, not an assert.
  const c10::cuda::OptionalCUDAGuard guard(q.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), d = q.size(3);
  if (q.numel() == 0) {
    return {at::empty_like(q), return_logits ? at::empty({B, H, N, N}, q.options()) : at::empty({0}, q.options())};
  }
  at::Tensor q_op, k_op, v_op;
  std::tie(q_op, k_op, v_op) = operands(q, k, v, quant, stream);
  const int64_t BH = B * H;
  at::Tensor logits = bmm_fp32(q_op.view({BH, N, d}), false, k_op.view({BH, N, d}), true);  // q̂·k̂ᵀ, float32
  // Without return_logits the probabilities overwrite the logits: one N×N buffer, not two.
  at::Tensor probs = return_logits ? at::empty_like(logits) : logits;
  const int64_t rows = BH * N;
  const int blocks = grid_for(rows, kRowsPerBlock);
  if (quant.enabled) {
    softmax_fake_quant_rows_kernel<true><<<blocks, kRowThreads, 0, stream>>>(
        logits.data_ptr<float>(), probs.data_ptr<float>(), rows, static_cast<int>(N), static_cast<float>(scale),
        quant.step_ptr(), quant.zero_point_ptr(), quant.ranges);
  } else {
    softmax_fake_quant_rows_kernel<false><<<blocks, kRowThreads, 0, stream>>>(
        logits.data_ptr<float>(), probs.data_ptr<float>(), rows, static_cast<int>(N), static_cast<float>(scale),
        nullptr, nullptr, quant.ranges);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // P̂·v̂, returned in the input dtype as before (|out| <= max |v̂|, so no overflow).
  at::Tensor out = bmm_fp32(probs, false, v_op.view({BH, N, d}), false).to(q.scalar_type()).view({B, H, N, d});
  at::Tensor logits_out =
      return_logits ? logits.to(q.scalar_type()).view({B, H, N, N}) : at::empty({0}, q.options());
  return {out, logits_out};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fq_attention_backward_cuda(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_logits_opt, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& step,
    const std::optional<at::Tensor>& zero_point, at::IntArrayRef qmin, at::IntArrayRef qmax, double scale) {
  const Quantization quant = check_and_prepare(q, k, v, step, zero_point, qmin, qmax, scale, kOpBackward);
  checks::check_fq_attention_grads(grad_out, grad_logits_opt, q, kCudaDtypes);
  const c10::cuda::OptionalCUDAGuard guard(q.device());
  const bool has_grad_logits = grad_logits_opt.has_value() && grad_logits_opt->defined();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), d = q.size(3);

  // Outputs as maskaq.ops' fake kernel declares them: step / zero-point gradients in their
  // parameters' dtype, empty (0,) in q's options where there is no such parameter.
  const auto float_opts = q.options().dtype(at::kFloat);
  at::Tensor grad_step_f = at::zeros({quant.enabled ? 4 : 0}, float_opts);
  at::Tensor grad_zero_f = at::zeros({quant.enabled ? 4 : 0}, float_opts);
  const auto finish = [&](at::Tensor gq, at::Tensor gk, at::Tensor gv) {
    at::Tensor gstep = quant.enabled ? grad_step_f.to(step->scalar_type()) : at::empty({0}, q.options());
    at::Tensor gzero = quant.has_zero_point ? grad_zero_f.to(zero_point->scalar_type()) : at::empty({0}, q.options());
    return std::make_tuple(gq, gk, gv, gstep, gzero);
  };
  if (q.numel() == 0) return finish(at::zeros_like(q), at::zeros_like(k), at::zeros_like(v));

  at::Tensor q_op, k_op, v_op;
  std::tie(q_op, k_op, v_op) = operands(q, k, v, quant, stream);
  const int64_t BH = B * H;
  const at::Tensor q3 = q_op.view({BH, N, d}), k3 = k_op.view({BH, N, d}), v3 = v_op.view({BH, N, d});
  const at::Tensor grad_out3 = grad_out.view({BH, N, d});
  // Every product in float32 (see bmm_fp32); the N×N buffers stay float32 throughout.
  at::Tensor logits = bmm_fp32(q3, false, k3, true);         // A, becomes P̂
  at::Tensor dprobs = bmm_fp32(grad_out3, false, v3, true);  // dP̂, becomes dA

  const int64_t rows = BH * N;
  const int row_blocks = grid_for(rows, kRowsPerBlock);
  at::Tensor p_partials = at::empty({quant.enabled ? 2 * row_blocks : 0}, float_opts);
  MASKAQ_DISPATCH_FLOAT_TYPES(q.scalar_type(), "fq_attention_backward_softmax", [&] {
    const scalar_t* gl = has_grad_logits ? grad_logits_opt->data_ptr<scalar_t>() : nullptr;
    float* partials = quant.enabled ? p_partials.data_ptr<float>() : nullptr;
    const auto launch = [&](auto quant_tag, auto grad_logits_tag) {
      softmax_fake_quant_rows_backward_kernel<scalar_t, decltype(quant_tag)::value, decltype(grad_logits_tag)::value>
          <<<row_blocks, kRowThreads, 0, stream>>>(logits.data_ptr<float>(), dprobs.data_ptr<float>(), gl,
                                                   rows, static_cast<int>(N), static_cast<float>(scale),
                                                   quant.step_ptr(), quant.zero_point_ptr(), quant.ranges, partials);
    };
    if (quant.enabled && has_grad_logits) launch(std::true_type{}, std::true_type{});
    else if (quant.enabled) launch(std::true_type{}, std::false_type{});
    else if (has_grad_logits) launch(std::false_type{}, std::true_type{});
    else launch(std::false_type{}, std::false_type{});
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  // logits now holds P̂ and dprobs holds dA.
  // The gradients return to the input dtype, in which the STE pass below reads and writes them.
  const auto dtype = q.scalar_type();
  at::Tensor grad_v = bmm_fp32(logits, true, grad_out3, false).to(dtype);  // dv̂ = P̂ᵀ·dO
  at::Tensor grad_q = bmm_fp32(dprobs, false, k3, false).to(dtype);        // dq̂ = dA·k̂
  at::Tensor grad_k = bmm_fp32(dprobs, true, q3, false).to(dtype);         // dk̂ = dAᵀ·q̂

  if (quant.enabled) {
    const int64_t numel = q.numel();
    const int ew_blocks = grid_for(numel, kElementwiseThreads);
    at::Tensor qkv_partials = at::empty({6 * ew_blocks}, float_opts);
    MASKAQ_DISPATCH_FLOAT_TYPES(q.scalar_type(), "fq_attention_backward_ste", [&] {
      fake_quant_qkv_backward_kernel<scalar_t><<<ew_blocks, kElementwiseThreads, 0, stream>>>(
          q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), grad_q.data_ptr<scalar_t>(),
          grad_k.data_ptr<scalar_t>(), grad_v.data_ptr<scalar_t>(), numel, quant.step_ptr(),
          quant.zero_point_ptr(), quant.ranges, qkv_partials.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    GradScales scales{};
    const int64_t numel_of[4] = {numel, numel, rows * N, numel};
    for (int i = 0; i < 4; ++i) scales.g[i] = static_cast<float>(checks::lsq_grad_scale(numel_of[i], qmax[i]));
    finalize_lsq_grads_kernel<<<1, kElementwiseThreads, 0, stream>>>(
        qkv_partials.data_ptr<float>(), ew_blocks, p_partials.data_ptr<float>(), row_blocks, scales,
        grad_step_f.data_ptr<float>(), grad_zero_f.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return finish(grad_q.view({B, H, N, d}), grad_k.view({B, H, N, d}), grad_v.view({B, H, N, d}));
}

}  // namespace
}  // namespace cuda
}  // namespace maskaq

TORCH_LIBRARY_IMPL(maskaq, CUDA, m) {
  m.impl("fq_attention", &maskaq::cuda::fq_attention_cuda);
  m.impl("fq_attention_backward", &maskaq::cuda::fq_attention_backward_cuda);
}
