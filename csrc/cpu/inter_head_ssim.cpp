// maskaq::inter_head_ssim and its backward on CPU: MimiQ's inter-head SSIM loss of one block
// (docs/method.md#synthesis), per sample.
//
// For every query patch n and head h, the key map r = logits[b, h, P + n, P:] over the M = N − P
// patch keys is min-max normalized, x = (r − min r)/s with s = max r − min r + 1e-8, and every
// ordered pair of heads (self pairs included) is compared with global statistics:
//   SSIM = (2μ_i μ_j + c1)(2σ_ij + c2) / ((μ_i² + μ_j² + c1)(σ_i² + σ_j² + c2)).
// The normalization is affine, so only each map's mean, min, max and the head Gram of the centred
// maps, G = c·cᵀ/M, touch the logits: μ = (r̄ − min r)/s, σ_ij = G_ij/(s_i s_j). One
// at::parallel_for over the B·M query patches: each reads its H rows once into a per-thread
// buffer of centred values (double, so the sums are exact to the output's rounding), forms the
// H×H comparisons and writes one partial sum; a sample's partials are added in patch order, so
// the result does not depend on the thread count. The backward recomputes the statistics from the
// logits (nothing logits-sized is kept between the calls), differentiates the H×H arithmetic by
// hand, and writes the dense gradient once:
//   dr_h = Σ_h2 (dG + dGᵀ)[h, h2]·c_h2/M + dmean_h/M, plus dmin at the first minimum and dmax at
//   the first maximum (where torch.min/max send it); zero on the P prefix rows and columns.
// float32 and float64.
#include "checks.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "clones.h"

namespace maskaq {
namespace {

const std::initializer_list<at::ScalarType> kCpuDtypes = {at::kFloat, at::kDouble};

// Query patches per parallel chunk: each costs H rows of M keys.
constexpr int64_t kGrain = 16;
constexpr double kRangeEps = 1e-8;  // s = max − min + 1e-8, as the public code's min-max scaling

struct Shape {
  int64_t B, H, N, P, M;
};

Shape check_logits(const at::Tensor& logits, int64_t num_prefix_tokens) {
  const int64_t M = checks::check_attention_logits(logits, num_prefix_tokens, kCpuDtypes);
  return {logits.size(0), logits.size(1), logits.size(2), num_prefix_tokens, M};
}

// The first k with r[k] == v (n − 1 if none: a NaN row), 16 lanes compared at a time.
template <typename T>
MASKAQ_CLONES int64_t first_equal(const T* r, int64_t n, T v) {
  constexpr int64_t kChunk = 16;
  int64_t k = 0;
  for (; k + kChunk <= n; k += kChunk) {
    int hits = 0;
#pragma omp simd reduction(+ : hits)
    for (int64_t j = 0; j < kChunk; ++j) hits += r[k + j] == v;
    if (hits > 0) break;
  }
  for (; k < n; ++k) {
    if (r[k] == v) return k;
  }
  return n - 1;
}

// One key map r: ch = r − mean(r) in double, its mean, its minimum and maximum and the first
// index where each is taken (as torch.min/max).
template <typename T>
MASKAQ_CLONES void read_row(const T* r, int64_t n, double* ch, double* mean, double* lo, double* hi,
                            int64_t* lo_at, int64_t* hi_at) {
  double sum = 0;
  T vlo = r[0], vhi = r[0];
#pragma omp simd reduction(+ : sum) reduction(min : vlo) reduction(max : vhi)
  for (int64_t k = 0; k < n; ++k) {
    const T x = r[k];
    ch[k] = static_cast<double>(x);
    sum += ch[k];
    vlo = x < vlo ? x : vlo;
    vhi = x > vhi ? x : vhi;
  }
  const double m = sum / static_cast<double>(n);
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) ch[k] -= m;
  *mean = m, *lo = vlo, *hi = vhi;
  *lo_at = first_equal(r, n, vlo), *hi_at = first_equal(r, n, vhi);
}

// a += w·x
MASKAQ_CLONES void axpy(double* a, double w, const double* x, int64_t n) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) a[k] += w * x[k];
}

template <typename T>
MASKAQ_CLONES void store(T* dst, const double* src, int64_t n) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) dst[k] = static_cast<T>(src[k]);
}

MASKAQ_CLONES double dot(const double* a, const double* b, int64_t n) {
  double s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t k = 0; k < n; ++k) s += a[k] * b[k];
  return s;
}

// The statistics of one query patch's H key maps, and the gradients of the loss with respect to
// them (per-thread workspace).
struct Patch {
  Patch(int64_t H, int64_t M)
      : c(H * M), mean(H), lo(H), hi(H), s(H), mu(H), gram(H * H), lo_at(H), hi_at(H), d_mean(H),
        d_lo(H), d_hi(H), d_s(H), d_mu(H), d_var(H), d_cov(H * H) {}
  std::vector<double> c, mean, lo, hi, s, mu, gram;
  std::vector<int64_t> lo_at, hi_at;
  std::vector<double> d_mean, d_lo, d_hi, d_s, d_mu, d_var, d_cov;  // d_cov, then dG
};

template <typename T>
void load_patch(const T* logits, const Shape& sh, int64_t b, int64_t n, Patch& p) {
  const int64_t H = sh.H, M = sh.M;
  for (int64_t h = 0; h < H; ++h) {
    const T* r = logits + ((b * H + h) * sh.N + sh.P + n) * sh.N + sh.P;
    read_row(r, M, p.c.data() + h * M, &p.mean[h], &p.lo[h], &p.hi[h], &p.lo_at[h], &p.hi_at[h]);
    p.s[h] = p.hi[h] - p.lo[h] + kRangeEps;
    p.mu[h] = (p.mean[h] - p.lo[h]) / p.s[h];
  }
  for (int64_t i = 0; i < H; ++i) {
    for (int64_t j = i; j < H; ++j) {
      const double g = dot(p.c.data() + i * M, p.c.data() + j * M, M) / static_cast<double>(M);
      p.gram[i * H + j] = p.gram[j * H + i] = g;
    }
  }
}

// Σ over ordered head pairs of 1 − SSIM². With g != 0, also the gradient of g times that sum with
// respect to the patch's mean, min, max (d_mean, d_lo, d_hi) and Gram (d_cov, overwritten by dG).
double ssim_pairs(Patch& p, int64_t H, double c1, double c2, double g) {
  const bool grad = g != 0.0;
  if (grad) {
    std::fill(p.d_mu.begin(), p.d_mu.end(), 0.0);
    std::fill(p.d_var.begin(), p.d_var.end(), 0.0);
    std::fill(p.d_cov.begin(), p.d_cov.end(), 0.0);
  }
  double total = 0;
  for (int64_t i = 0; i < H; ++i) {
    const double var_i = p.gram[i * H + i] / (p.s[i] * p.s[i]);
    for (int64_t j = 0; j < H; ++j) {
      const double var_j = p.gram[j * H + j] / (p.s[j] * p.s[j]);
      const double cov = p.gram[i * H + j] / (p.s[i] * p.s[j]);
      const double a = 2 * p.mu[i] * p.mu[j] + c1, bv = 2 * cov + c2;
      const double d = p.mu[i] * p.mu[i] + p.mu[j] * p.mu[j] + c1, e = var_i + var_j + c2;
      const double ssim = a * bv / (d * e);
      total += 1.0 - ssim * ssim;
      if (!grad) continue;
      const double ds = -2.0 * ssim * g;
      const double da = ds * bv / (d * e), db = ds * a / (d * e);
      const double dd = -ds * ssim / d, de = -ds * ssim / e;
      p.d_mu[i] += 2 * p.mu[j] * da + 2 * p.mu[i] * dd;
      p.d_mu[j] += 2 * p.mu[i] * da + 2 * p.mu[j] * dd;
      p.d_cov[i * H + j] += 2 * db;
      p.d_var[i] += de;
      p.d_var[j] += de;
    }
  }
  if (!grad) return total;
  for (int64_t i = 0; i < H; ++i) p.d_cov[i * H + i] += p.d_var[i];
  for (int64_t i = 0; i < H; ++i) p.d_s[i] = -p.d_mu[i] * p.mu[i] / p.s[i];  // μ = (r̄ − min)/s
  for (int64_t i = 0; i < H; ++i) {
    for (int64_t j = 0; j < H; ++j) {  // σ_ij = G_ij/(s_i s_j)
      const double dc = p.d_cov[i * H + j], cov = p.gram[i * H + j] / (p.s[i] * p.s[j]);
      p.d_s[i] -= dc * cov / p.s[i];
      p.d_s[j] -= dc * cov / p.s[j];
      p.d_cov[i * H + j] = dc / (p.s[i] * p.s[j]);
    }
  }
  for (int64_t i = 0; i < H; ++i) {  // s = max − min + eps
    p.d_mean[i] = p.d_mu[i] / p.s[i];
    p.d_lo[i] = -p.d_mu[i] / p.s[i] - p.d_s[i];
    p.d_hi[i] = p.d_s[i];
  }
  return total;
}

template <typename T>
void forward_kernel(const at::Tensor& logits, const Shape& sh, double c1, double c2, at::Tensor& out) {
  const T* lp = logits.data_ptr<T>();
  std::vector<double> partial(static_cast<size_t>(sh.B * sh.M));
  at::parallel_for(0, sh.B * sh.M, kGrain, [&](int64_t begin, int64_t end) {
    Patch p(sh.H, sh.M);
    for (int64_t i = begin; i < end; ++i) {
      load_patch(lp, sh, i / sh.M, i % sh.M, p);
      partial[i] = ssim_pairs(p, sh.H, c1, c2, 0.0);
    }
  });
  T* op = out.data_ptr<T>();
  const double count = static_cast<double>(sh.M * sh.H * sh.H);
  for (int64_t b = 0; b < sh.B; ++b) {
    double sum = 0;
    for (int64_t n = 0; n < sh.M; ++n) sum += partial[b * sh.M + n];
    op[b] = static_cast<T>(sum / count);
  }
}

at::Tensor inter_head_ssim_cpu(const at::Tensor& logits, int64_t num_prefix_tokens, double c1, double c2) {
  const Shape sh = check_logits(logits, num_prefix_tokens);
  auto out = at::empty({sh.B}, logits.options());
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "inter_head_ssim_cpu", [&] {
    forward_kernel<scalar_t>(logits, sh, c1, c2, out);
  });
  return out;
}

template <typename T>
void backward_kernel(const at::Tensor& grad, const at::Tensor& logits, const Shape& sh, double c1,
                     double c2, at::Tensor& grad_logits) {
  const T* lp = logits.data_ptr<T>();
  const T* gp = grad.data_ptr<T>();
  T* out = grad_logits.data_ptr<T>();
  const int64_t H = sh.H, M = sh.M, N = sh.N, P = sh.P;
  const double inv_m = 1.0 / static_cast<double>(M);
  const double count = static_cast<double>(M * H * H);
  // The prefix query rows get no gradient.
  at::parallel_for(0, sh.B * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) std::fill_n(out + bh * N * N, P * N, T(0));
  });
  at::parallel_for(0, sh.B * M, kGrain, [&](int64_t begin, int64_t end) {
    Patch p(H, M);
    std::vector<double> sym(static_cast<size_t>(H * H)), acc(static_cast<size_t>(M));
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / M, n = i % M;
      load_patch(lp, sh, b, n, p);
      ssim_pairs(p, H, c1, c2, static_cast<double>(gp[b]) / count);
      for (int64_t h1 = 0; h1 < H; ++h1)
        for (int64_t h2 = 0; h2 < H; ++h2) sym[h1 * H + h2] = (p.d_cov[h1 * H + h2] + p.d_cov[h2 * H + h1]) * inv_m;
      for (int64_t h = 0; h < H; ++h) {
        double* a = acc.data();
        std::fill_n(a, M, p.d_mean[h] * inv_m);
        for (int64_t h2 = 0; h2 < H; ++h2) axpy(a, sym[h * H + h2], p.c.data() + h2 * M, M);
        a[p.lo_at[h]] += p.d_lo[h];
        a[p.hi_at[h]] += p.d_hi[h];
        T* row = out + ((b * H + h) * N + P + n) * N;
        std::fill_n(row, P, T(0));
        store(row + P, a, M);
      }
    }
  });
}

at::Tensor inter_head_ssim_backward_cpu(const at::Tensor& grad, const at::Tensor& logits,
                                        int64_t num_prefix_tokens, double c1, double c2) {
  const Shape sh = check_logits(logits, num_prefix_tokens);
  checks::check_input(grad, "grad", logits.device(), 1, "(B,)", {logits.scalar_type()});
  checks::check_size(grad, "grad", 0, sh.B, "the batch size of logits");
  auto grad_logits = at::empty(logits.sizes(), logits.options());
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "inter_head_ssim_backward_cpu", [&] {
    backward_kernel<scalar_t>(grad, logits, sh, c1, c2, grad_logits);
  });
  return grad_logits;
}

}  // namespace

TORCH_LIBRARY_IMPL(maskaq, CPU, m) {
  m.impl("inter_head_ssim", &inter_head_ssim_cpu);
  m.impl("inter_head_ssim_backward", &inter_head_ssim_backward_cpu);
}

}  // namespace maskaq
