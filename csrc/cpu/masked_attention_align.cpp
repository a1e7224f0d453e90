// maskaq::masked_attention_align and its backward on CPU.
//
// One pass over the teacher and student CLS-row logits per sample (at::parallel_for over
// the batch): the head sums give |mean_h cls_t − mean_h cls_q| for every block and the
// block-and-head score of the teacher; then the top-k of the score, the stochastic drop
// (the keep-k smallest draws among the top-k; both selections O(M) with nth_element) and
// the masked L1 sums, all while the sample's rows are in cache. Ties break towards the
// lower key index in both selections, as in the reference (stable sorts), so the mask is
// deterministic.
#include "checks.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

// Simple loops below are auto-vectorized, and built per instruction set (clones.h).
#include "clones.h"

namespace maskaq {
namespace {

const std::initializer_list<at::ScalarType> kCpuDtypes = {at::kFloat, at::kDouble};
constexpr double kMaskEps = 1e-8;  // Σ m + 1e-8 in the denominator (docs/method.md#synthesis)

// diff += t − q and score += t over one (M) row of one head.
template <typename T>
MASKAQ_CLONES void accumulate_head(T* __restrict diff, T* __restrict score, const T* __restrict t,
                                   const T* __restrict q, int64_t M) {
#pragma omp simd
  for (int64_t i = 0; i < M; ++i) {
    diff[i] += t[i] - q[i];
    score[i] += t[i];
  }
}

// diff = Σ_h (t − q) over the H heads of one (block, sample): H·(mean_h t − mean_h q).
template <typename T>
MASKAQ_CLONES void head_difference(T* __restrict diff, const T* __restrict t, const T* __restrict q,
                                   int64_t H, int64_t M) {
#pragma omp simd
  for (int64_t i = 0; i < M; ++i) diff[i] = t[i] - q[i];
  for (int64_t h = 1; h < H; ++h) {
    const T* th = t + h * M;
    const T* qh = q + h * M;
#pragma omp simd
    for (int64_t i = 0; i < M; ++i) diff[i] += th[i] - qh[i];
  }
}

std::tuple<at::Tensor, at::Tensor> align_forward_cpu(const at::Tensor& cls_t, const at::Tensor& cls_q,
                                                     const at::Tensor& rand, double ratio, double keep) {
  const auto shape = checks::check_align_inputs(cls_t, cls_q, rand, ratio, keep, kCpuDtypes);
  const int64_t L = shape[0], B = shape[1], H = shape[2], M = shape[3];
  const int64_t top_k = checks::align_top_k(M, ratio);
  const int64_t keep_k = checks::align_keep_k(top_k, keep);
  const at::Tensor rnd = rand.to(at::kDouble).contiguous();  // (B, M), a few KB
  {
    const double* rp = rnd.data_ptr<double>();
    for (int64_t e = 0; e < rnd.numel(); ++e) {
      MASKAQ_CHECK_VALUE(std::isfinite(rp[e]), "rand must hold finite uniform draws, got ", rp[e]);
    }
  }
  at::Tensor mask = at::zeros({B, M}, cls_t.options());
  at::Tensor loss = at::empty({}, cls_t.options());
  std::vector<double> partial(static_cast<size_t>(B), 0.0);
  AT_DISPATCH_FLOATING_TYPES(cls_t.scalar_type(), "masked_attention_align_cpu", [&] {
    using T = scalar_t;
    const T* tp = cls_t.data_ptr<T>();
    const T* qp = cls_q.data_ptr<T>();
    const double* rp = rnd.data_ptr<double>();
    T* mp = mask.data_ptr<T>();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> score(M), absdiff(static_cast<size_t>(L * M));
      std::vector<int64_t> order(M);
      for (int64_t b = begin; b < end; ++b) {
        // One pass over both sides: per block |Σ_h (t − q)| and the teacher score Σ_{l,h} t.
        std::fill(score.begin(), score.end(), T(0));
        for (int64_t l = 0; l < L; ++l) {
          T* ad = absdiff.data() + l * M;
          std::fill(ad, ad + M, T(0));
          const int64_t off = (l * B + b) * H * M;
          for (int64_t h = 0; h < H; ++h) accumulate_head(ad, score.data(), tp + off + h * M, qp + off + h * M, M);
          for (int64_t i = 0; i < M; ++i) ad[i] = std::abs(ad[i]);
        }
        // NaN ranks highest, as in torch.sort; keeps the comparators strict weak orders.
        for (auto& c : score) c = std::isnan(c) ? std::numeric_limits<T>::infinity() : c;
        // The top-k keys of the teacher score (ties: lower index first) ...
        std::iota(order.begin(), order.end(), 0);
        auto by_score = [&](int64_t a, int64_t c) { return score[a] > score[c] || (score[a] == score[c] && a < c); };
        if (top_k < M) std::nth_element(order.begin(), order.begin() + top_k, order.end(), by_score);
        // ... of which the keep_k with the smallest draws survive the stochastic drop.
        const double* rb = rp + b * M;
        auto by_draw = [&](int64_t a, int64_t c) { return rb[a] < rb[c] || (rb[a] == rb[c] && a < c); };
        if (keep_k < top_k) std::nth_element(order.begin(), order.begin() + keep_k, order.begin() + top_k, by_draw);
        double total = 0;
        for (int64_t e = 0; e < keep_k; ++e) {
          const int64_t i = order[e];
          mp[b * M + i] = T(1);
          for (int64_t l = 0; l < L; ++l) total += absdiff[l * M + i];
        }
        partial[b] = total;
      }
    });
    // Σ over samples in sample order (independent of the thread count); the sums above are
    // over heads, hence the 1/H.
    double total = 0;
    for (int64_t b = 0; b < B; ++b) total += partial[b];
    const double mask_sum = static_cast<double>(B * keep_k);
    loss.fill_(total / static_cast<double>(H) / (mask_sum + kMaskEps) / static_cast<double>(L));
  });
  return {loss, mask};
}

// d loss / d cls_q[l, b, h, i] = −grad · sign(mean_h t − mean_h q) · m[b, i] / (L·H·(Σ m + 1e-8)), the
// same for every head: written once per (block, sample), (L, B, 1, M), and returned expanded over
// the heads (stride 0), as autograd does for the backward of a sum.
at::Tensor align_backward_cpu(const at::Tensor& grad, const at::Tensor& cls_t, const at::Tensor& cls_q,
                              const at::Tensor& mask) {
  checks::check_align_backward_inputs(grad, cls_t, cls_q, mask, kCpuDtypes);
  const int64_t L = cls_t.size(0), B = cls_t.size(1), H = cls_t.size(2), M = cls_t.size(3);
  at::Tensor grad_shared = at::empty({L, B, 1, M}, cls_q.options());
  AT_DISPATCH_FLOATING_TYPES(cls_t.scalar_type(), "masked_attention_align_backward_cpu", [&] {
    using T = scalar_t;
    const T* mp = mask.data_ptr<T>();
    double mask_sum = 0;
    for (int64_t e = 0; e < B * M; ++e) mask_sum += static_cast<double>(mp[e]);
    const double g = static_cast<double>(grad.item<T>());
    const T coef = static_cast<T>(g / (static_cast<double>(L * H) * (mask_sum + kMaskEps)));
    const T* tp = cls_t.data_ptr<T>();
    const T* qp = cls_q.data_ptr<T>();
    T* op = grad_shared.data_ptr<T>();
    at::parallel_for(0, L * B, 1, [&](int64_t begin, int64_t end) {
      for (int64_t lb = begin; lb < end; ++lb) {
        T* w = op + lb * M;
        head_difference(w, tp + lb * H * M, qp + lb * H * M, H, M);
        const T* mb = mp + (lb % B) * M;
        for (int64_t i = 0; i < M; ++i) {
          const T sgn = static_cast<T>((w[i] > 0) - (w[i] < 0));
          w[i] = -sgn * mb[i] * coef;
        }
      }
    });
  });
  return grad_shared.expand({L, B, H, M});
}

}  // namespace

TORCH_LIBRARY_IMPL(maskaq, CPU, m) {
  m.impl("masked_attention_align", &align_forward_cpu);
  m.impl("masked_attention_align_backward", &align_backward_cpu);
}

}  // namespace maskaq
