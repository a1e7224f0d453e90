// maskaq::patch_similarity_entropy and its backward on CPU.
//
// Fused per sample, in one at::parallel_for over the batch: the head mean of only the R
// picked rows of the patch block (prefix rows/columns skipped; R·H·N' of the B·H·N·N
// logits are read, prefetched ahead), L2 normalization, the Gram matrix (at::mm_out into a
// per-thread buffer, BLAS underneath), its biased variance and the Gaussian entropy
// h = ½·log(2πe·(s² + 1e-8)). The backward recomputes rows and Gram matrix (no state is
// kept between the calls), forms dG, dX = 2·dG·X (one more product) and the normalization
// backward. h depends on the logits only through their head mean, so every head gets the same
// gradient: the kernel writes it once per sample (zeros except the picked rows), (B, 1, N, N),
// and returns it expanded over the heads (stride 0), as autograd does for the backward of a sum.
// A consumer that needs it dense (autograd adding it to another gradient) reads B·N·N values
// instead of B·H·N·N.
#include "checks.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

// Simple loops below are auto-vectorized, and built per instruction set (clones.h).
#include "clones.h"

namespace maskaq {
namespace {

const std::initializer_list<at::ScalarType> kCpuDtypes = {at::kFloat, at::kDouble};

constexpr double kVarianceEps = 1e-8;  // added to s² (docs/method.md#synthesis)
constexpr double kNormEps = 1e-6;      // rows are divided by max(‖row‖, 1e-6), as F.normalize(eps=1e-6)
const double kLogTwoPiE = std::log(2.0 * M_PI * M_E);

// ---------------------------------------------------------------------------------------
// Row loops (float and double), vectorized.

template <typename T>
MASKAQ_CLONES void add_into(T* __restrict dst, const T* __restrict src, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) dst[j] += src[j];
}

// dst = a + b (the first two heads).
template <typename T>
MASKAQ_CLONES void add_pair(T* __restrict dst, const T* __restrict a, const T* __restrict b, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) dst[j] = a[j] + b[j];
}

// x *= factor in place; returns Σ x² of the result.
template <typename T>
MASKAQ_CLONES T scale_and_sum_squares(T* __restrict x, int64_t n, T factor) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) {
    x[j] *= factor;
    s += x[j] * x[j];
  }
  return s;
}

template <typename T>
MASKAQ_CLONES void scale_row(T* __restrict x, int64_t n, T factor) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) x[j] *= factor;
}

template <typename T>
MASKAQ_CLONES T dot(const T* __restrict a, const T* __restrict b, int64_t n) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) s += a[j] * b[j];
  return s;
}

// Σ x and Σ (x − mean)² of one row.
template <typename T>
MASKAQ_CLONES T sum_row(const T* __restrict x, int64_t n) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) s += x[j];
  return s;
}

template <typename T>
MASKAQ_CLONES T centered_squares(const T* __restrict x, int64_t n, T mean) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) s += (x[j] - mean) * (x[j] - mean);
  return s;
}

// dst = (dst − x·⟨x, dst⟩)·factor: the backward of y ↦ y/‖y‖ for a normalized x.
template <typename T>
MASKAQ_CLONES void project_out(T* __restrict d, const T* __restrict x, int64_t n, T dotp, T factor) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) d[j] = (d[j] - x[j] * dotp) * factor;
}

// g = (g − mean)·c over one row of the Gram matrix, in place.
template <typename T>
MASKAQ_CLONES void center_and_scale(T* __restrict g, int64_t n, T mean, T c) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) g[j] = (g[j] - mean) * c;
}

// ---------------------------------------------------------------------------------------

// Software prefetch of one row (n elements) in each of `heads` heads `stride` apart.
template <typename T>
inline void prefetch_heads(const T* row, int64_t heads, int64_t stride, int64_t n) {
#if defined(__GNUC__) || defined(__clang__)
  constexpr int64_t kLine = 64 / sizeof(T);
  for (int64_t h = 0; h < heads; ++h) {
    for (int64_t j = 0; j < n; j += kLine) __builtin_prefetch(row + h * stride + j, 0, 3);
  }
#endif
}

struct Sizes {
  int64_t B, H, N, P, Np, R;
};

Sizes sizes_of(const at::Tensor& logits, const at::Tensor& row_index, int64_t P, int64_t Np) {
  return {logits.size(0), logits.size(1), logits.size(2), P, Np, row_index.size(1)};
}

// Per-thread buffers for one sample: the normalized rows X (R, N'), their norms, the Gram
// matrix (R, R) and, in the backward, dX (R, N').
template <typename T>
struct Workspace {
  at::Tensor x, gram, dx;
  std::vector<T> norm;
  std::vector<int64_t> rows;  // the sample's picked rows in ascending order
  Workspace(const Sizes& s, const at::TensorOptions& opts, bool backward)
      : x(at::empty({s.R, s.Np}, opts)), gram(at::empty({s.R, s.R}, opts)),
        dx(backward ? at::empty({s.R, s.Np}, opts) : at::Tensor()), norm(s.R), rows(s.R) {}
};

// X (R, N'): the picked rows of the head mean of sample b, normalized; norm = ‖row‖ before.
template <typename T>
void gather_rows(const T* logits_b, const int64_t* rows, const Sizes& s, Workspace<T>& w) {
  const T inv_h = T(1) / static_cast<T>(s.H);
  T* x = w.x.template data_ptr<T>();
  auto row_start = [&](int64_t r) { return logits_b + (rows[r] + s.P) * s.N + s.P; };
  // The rows are scattered over the logits: fetch two rows ahead.
  for (int64_t r = 0; r < std::min<int64_t>(2, s.R); ++r) prefetch_heads(row_start(r), s.H, s.N * s.N, s.Np);
  for (int64_t r = 0; r < s.R; ++r) {
    if (r + 2 < s.R) prefetch_heads(row_start(r + 2), s.H, s.N * s.N, s.Np);
    T* xr = x + r * s.Np;
    const T* src = row_start(r);
    if (s.H > 1) {
      add_pair(xr, src, src + s.N * s.N, s.Np);
    } else {
      std::memcpy(xr, src, sizeof(T) * s.Np);
    }
    for (int64_t h = 2; h < s.H; ++h) add_into(xr, src + h * s.N * s.N, s.Np);
    const T nrm = std::sqrt(scale_and_sum_squares(xr, s.Np, inv_h));
    w.norm[r] = nrm;
    scale_row(xr, s.Np, T(1) / std::max(nrm, static_cast<T>(kNormEps)));
  }
}

// Mean and biased variance (+ eps) of the R x R entries of the Gram matrix, two-pass.
template <typename T>
std::pair<double, double> gram_moments(const T* g, int64_t R) {
  double sum = 0;
  for (int64_t r = 0; r < R; ++r) sum += sum_row(g + r * R, R);
  const double mean = sum / static_cast<double>(R * R);
  double sq = 0;
  for (int64_t r = 0; r < R; ++r) sq += centered_squares(g + r * R, R, static_cast<T>(mean));
  return {mean, sq / static_cast<double>(R * R) + kVarianceEps};
}

// Rows, Gram matrix (one BLAS product) and its moments of sample b.
template <typename T>
std::pair<double, double> sample_gram(const T* logits, const int64_t* row_index, int64_t b, const Sizes& s,
                                      Workspace<T>& w) {
  // Visiting the rows in ascending order reads memory forwards; the entropy and its
  // gradient do not depend on the order of the rows (the Gram matrix is only permuted).
  std::copy(row_index + b * s.R, row_index + (b + 1) * s.R, w.rows.begin());
  std::sort(w.rows.begin(), w.rows.end());
  gather_rows(logits + b * s.H * s.N * s.N, w.rows.data(), s, w);
  at::mm_out(w.gram, w.x, w.x.t());
  return gram_moments(w.gram.template data_ptr<T>(), s.R);
}

at::Tensor entropy_forward_cpu(const at::Tensor& logits, const at::Tensor& row_index,
                               int64_t num_prefix_tokens) {
  const int64_t Np = checks::check_entropy_inputs(logits, row_index, num_prefix_tokens, kCpuDtypes);
  checks::check_row_index_range(row_index, Np);
  const Sizes s = sizes_of(logits, row_index, num_prefix_tokens, Np);
  at::Tensor h = at::empty({s.B}, logits.options());
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "patch_similarity_entropy_cpu", [&] {
    const scalar_t* lp = logits.data_ptr<scalar_t>();
    const int64_t* ip = row_index.data_ptr<int64_t>();
    scalar_t* hp = h.data_ptr<scalar_t>();
    at::parallel_for(0, s.B, 1, [&](int64_t begin, int64_t end) {
      Workspace<scalar_t> w(s, logits.options(), false);
      for (int64_t b = begin; b < end; ++b) {
        const double var = sample_gram(lp, ip, b, s, w).second;
        hp[b] = static_cast<scalar_t>(0.5 * (kLogTwoPiE + std::log(var)));
      }
    });
  });
  return h;
}

// dh/dG = (G − mean) / (s²·R²); dX = (dG + dGᵀ)·X = 2·dG·X (G is symmetric); through the
// normalization dY = (dX − X·⟨X, dX⟩)/‖Y‖ (dX/eps where ‖Y‖ < eps); every head gets dY/H.
at::Tensor entropy_backward_cpu(const at::Tensor& grad, const at::Tensor& logits,
                                const at::Tensor& row_index, int64_t num_prefix_tokens) {
  const int64_t Np = checks::check_entropy_inputs(logits, row_index, num_prefix_tokens, kCpuDtypes);
  checks::check_entropy_grad(grad, logits);
  checks::check_row_index_range(row_index, Np);
  const Sizes s = sizes_of(logits, row_index, num_prefix_tokens, Np);
  at::Tensor grad_shared = at::empty({s.B, 1, s.N, s.N}, logits.options());
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "patch_similarity_entropy_backward_cpu", [&] {
    using T = scalar_t;
    const T* lp = logits.data_ptr<T>();
    const int64_t* ip = row_index.data_ptr<int64_t>();
    const T* gp = grad.data_ptr<T>();
    T* op = grad_shared.data_ptr<T>();
    const T inv_h = T(1) / static_cast<T>(s.H);
    at::parallel_for(0, s.B, 1, [&](int64_t begin, int64_t end) {
      Workspace<T> w(s, logits.options(), true);
      const T* x = w.x.template data_ptr<T>();
      T* g = w.gram.template data_ptr<T>();
      T* dx = w.dx.template data_ptr<T>();
      std::vector<int64_t> slot(Np);  // patch row -> its first pick in row_index[b], or -1
      for (int64_t b = begin; b < end; ++b) {
        const auto [mean, var] = sample_gram(lp, ip, b, s, w);
        const T c2 = static_cast<T>(2.0 * static_cast<double>(gp[b]) / (var * static_cast<double>(s.R * s.R)));
        for (int64_t r = 0; r < s.R; ++r) center_and_scale(g + r * s.R, s.R, static_cast<T>(mean), c2);
        at::mm_out(w.dx, w.gram, w.x);  // 2·dG·X
        // dY/H per picked row; a row picked twice sums into its first slot.
        std::fill(slot.begin(), slot.end(), int64_t(-1));
        const int64_t* rows = w.rows.data();
        for (int64_t r = 0; r < s.R; ++r) {
          const T* xr = x + r * Np;
          T* dr = dx + r * Np;
          const T nrm = w.norm[r];
          if (nrm >= static_cast<T>(kNormEps)) {
            project_out(dr, xr, Np, dot(xr, dr, Np), inv_h / nrm);
          } else {
            scale_row(dr, Np, inv_h / static_cast<T>(kNormEps));
          }
          int64_t& first = slot[rows[r]];
          if (first < 0) {
            first = r;
          } else {
            add_into(dx + first * Np, dr, Np);
          }
        }
        // Write the sample's gradient once: zeros, and dY/H in the picked rows.
        T* ob = op + b * s.N * s.N;
        std::memset(ob, 0, sizeof(T) * s.P * s.N);  // prefix rows
        for (int64_t i = 0; i < Np; ++i) {
          T* orow = ob + (i + s.P) * s.N;
          if (slot[i] < 0) {
            std::memset(orow, 0, sizeof(T) * s.N);
          } else {
            std::memset(orow, 0, sizeof(T) * s.P);  // prefix columns
            std::memcpy(orow + s.P, dx + slot[i] * Np, sizeof(T) * Np);
          }
        }
      }
    });
  });
  return grad_shared.expand({s.B, s.H, s.N, s.N});
}

}  // namespace

TORCH_LIBRARY_IMPL(maskaq, CPU, m) {
  m.impl("patch_similarity_entropy", &entropy_forward_cpu);
  m.impl("patch_similarity_entropy_backward", &entropy_backward_cpu);
}

}  // namespace maskaq
