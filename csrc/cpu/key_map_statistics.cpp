// maskaq::key_map_statistics and its backward on CPU: the logits-sized part of the inter-head
// SSIM loss (maskaq/synthesis/losses.py).
//
// For every query patch n and head h, the key map r = logits[b, h, P + n, P:] (M = N − P keys):
// its mean, minimum and maximum (with the first index where each is taken), and the head Gram of
// the centred maps, G[h1, h2] = Σ_k (r_h1 − r̄_h1)(r_h2 − r̄_h2) / M. One at::parallel_for over the
// B·M query patches: each reads its H rows once into a per-thread buffer of centred values
// (double, so the Gram and the backward are exact to the output's rounding), and writes H·H + 5·H
// numbers. The backward recomputes the centred rows from the logits (no logits-sized state is
// kept between the calls, where the composition of PyTorch ops saves a contiguous copy of them)
// and writes the dense gradient once:
//   dr_h = Σ_h2 (dG + dGᵀ)[h, h2]·c_h2 / M + dmean_h / M, plus dmin at the minimum and dmax at
//   the maximum; zero on the P prefix rows and columns.
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

struct Shape {
  int64_t B, H, N, P, M;
};

Shape check_logits(const at::Tensor& logits, int64_t num_prefix_tokens) {
  checks::check_input(logits, "logits", logits.device(), 4, "(B, H, N, N)", kCpuDtypes);
  MASKAQ_CHECK_VALUE(logits.size(2) == logits.size(3), "logits must be square attention logits "
                     "(B, H, N, N), got shape ", checks::shape_of(logits));
  MASKAQ_CHECK_VALUE(logits.size(1) >= 1, "logits need at least one head, got shape ",
                     checks::shape_of(logits));
  MASKAQ_CHECK_VALUE(num_prefix_tokens >= 0 && num_prefix_tokens < logits.size(2),
                     "num_prefix_tokens must lie in [0, N) with N = ", logits.size(2), ", got ",
                     num_prefix_tokens);
  return {logits.size(0), logits.size(1), logits.size(2), num_prefix_tokens,
          logits.size(2) - num_prefix_tokens};
}

// The centred rows of query patch (b, n) into c (H × M, double); returns each row's mean in mean.
template <typename T>
MASKAQ_CLONES void centre_rows(const T* logits, const Shape& s, int64_t b, int64_t n, double* c,
                               double* mean) {
  for (int64_t h = 0; h < s.H; ++h) {
    const T* r = logits + ((b * s.H + h) * s.N + s.P + n) * s.N + s.P;
    double* ch = c + h * s.M;
    double sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t k = 0; k < s.M; ++k) {
      ch[k] = static_cast<double>(r[k]);
      sum += ch[k];
    }
    const double m = sum / static_cast<double>(s.M);
#pragma omp simd
    for (int64_t k = 0; k < s.M; ++k) ch[k] -= m;
    mean[h] = m;
  }
}

// The minimum and maximum of a row and the first index where each is taken (as torch.min/max).
template <typename T>
MASKAQ_CLONES void extremes(const T* r, int64_t n, T* lo, T* hi, int64_t* lo_at, int64_t* hi_at) {
  T vlo = r[0], vhi = r[0];
#pragma omp simd reduction(min : vlo) reduction(max : vhi)
  for (int64_t k = 0; k < n; ++k) {
    vlo = r[k] < vlo ? r[k] : vlo;
    vhi = r[k] > vhi ? r[k] : vhi;
  }
  int64_t ilo = 0, ihi = 0;  // (bounded: a NaN row matches no value)
  while (ilo + 1 < n && r[ilo] != vlo) ++ilo;
  while (ihi + 1 < n && r[ihi] != vhi) ++ihi;
  *lo = vlo, *hi = vhi, *lo_at = ilo, *hi_at = ihi;
}

MASKAQ_CLONES double dot(const double* a, const double* b, int64_t n) {
  double s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t k = 0; k < n; ++k) s += a[k] * b[k];
  return s;
}

template <typename T>
void forward_kernel(const at::Tensor& logits, const Shape& s, at::Tensor& gram, at::Tensor& mean,
                    at::Tensor& lo, at::Tensor& hi, at::Tensor& lo_at, at::Tensor& hi_at) {
  const T* lp = logits.data_ptr<T>();
  T* gp = gram.data_ptr<T>();
  T *mp = mean.data_ptr<T>(), *lop = lo.data_ptr<T>(), *hip = hi.data_ptr<T>();
  int64_t *lap = lo_at.data_ptr<int64_t>(), *hap = hi_at.data_ptr<int64_t>();
  const int64_t H = s.H, M = s.M;
  at::parallel_for(0, s.B * M, kGrain, [&](int64_t begin, int64_t end) {
    std::vector<double> c(static_cast<size_t>(H * M)), m(static_cast<size_t>(H));
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / M, n = i % M;
      for (int64_t h = 0; h < H; ++h) {
        const T* r = lp + ((b * H + h) * s.N + s.P + n) * s.N + s.P;
        extremes(r, M, lop + i * H + h, hip + i * H + h, lap + i * H + h, hap + i * H + h);
      }
      centre_rows(lp, s, b, n, c.data(), m.data());
      for (int64_t h1 = 0; h1 < H; ++h1) {
        mp[i * H + h1] = static_cast<T>(m[h1]);
        for (int64_t h2 = h1; h2 < H; ++h2) {
          const T g = static_cast<T>(dot(c.data() + h1 * M, c.data() + h2 * M, M) / static_cast<double>(M));
          gp[(i * H + h1) * H + h2] = g;
          gp[(i * H + h2) * H + h1] = g;
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> key_map_statistics_cpu(
    const at::Tensor& logits, int64_t num_prefix_tokens) {
  const Shape s = check_logits(logits, num_prefix_tokens);
  auto gram = at::empty({s.B, s.M, s.H, s.H}, logits.options());
  auto mean = at::empty({s.B, s.M, s.H}, logits.options());
  auto lo = at::empty_like(mean), hi = at::empty_like(mean);
  auto lo_at = at::empty({s.B, s.M, s.H}, logits.options().dtype(at::kLong));
  auto hi_at = at::empty_like(lo_at);
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "key_map_statistics_cpu", [&] {
    forward_kernel<scalar_t>(logits, s, gram, mean, lo, hi, lo_at, hi_at);
  });
  return {gram, mean, lo, hi, lo_at, hi_at};
}

template <typename T>
void backward_kernel(const at::Tensor& d_gram, const at::Tensor& d_mean, const at::Tensor& d_lo,
                     const at::Tensor& d_hi, const at::Tensor& logits, const at::Tensor& lo_at,
                     const at::Tensor& hi_at, const Shape& s, at::Tensor& grad) {
  const T* lp = logits.data_ptr<T>();
  const T *dg = d_gram.data_ptr<T>(), *dm = d_mean.data_ptr<T>();
  const T *dlo = d_lo.data_ptr<T>(), *dhi = d_hi.data_ptr<T>();
  const int64_t *lap = lo_at.data_ptr<int64_t>(), *hap = hi_at.data_ptr<int64_t>();
  T* gp = grad.data_ptr<T>();
  const int64_t H = s.H, M = s.M, N = s.N, P = s.P;
  const double inv_m = 1.0 / static_cast<double>(M);
  // The prefix query rows get no gradient.
  at::parallel_for(0, s.B * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) std::fill_n(gp + bh * N * N, P * N, T(0));
  });
  at::parallel_for(0, s.B * M, kGrain, [&](int64_t begin, int64_t end) {
    std::vector<double> c(static_cast<size_t>(H * M)), m(static_cast<size_t>(H)),
        sym(static_cast<size_t>(H * H)), acc(static_cast<size_t>(M));
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / M, n = i % M;
      centre_rows(lp, s, b, n, c.data(), m.data());
      const T* dgi = dg + i * H * H;
      for (int64_t h1 = 0; h1 < H; ++h1)
        for (int64_t h2 = 0; h2 < H; ++h2)
          sym[h1 * H + h2] = (static_cast<double>(dgi[h1 * H + h2]) + static_cast<double>(dgi[h2 * H + h1])) * inv_m;
      for (int64_t h = 0; h < H; ++h) {
        double* a = acc.data();
        const double base = static_cast<double>(dm[i * H + h]) * inv_m;
        std::fill_n(a, M, base);
        for (int64_t h2 = 0; h2 < H; ++h2) {
          const double w = sym[h * H + h2];
          const double* ch = c.data() + h2 * M;
#pragma omp simd
          for (int64_t k = 0; k < M; ++k) a[k] += w * ch[k];
        }
        a[lap[i * H + h]] += static_cast<double>(dlo[i * H + h]);
        a[hap[i * H + h]] += static_cast<double>(dhi[i * H + h]);
        T* row = gp + ((b * H + h) * N + P + n) * N;
        std::fill_n(row, P, T(0));
#pragma omp simd
        for (int64_t k = 0; k < M; ++k) row[P + k] = static_cast<T>(a[k]);
      }
    }
  });
}

at::Tensor key_map_statistics_backward_cpu(const at::Tensor& d_gram, const at::Tensor& d_mean,
                                           const at::Tensor& d_lo, const at::Tensor& d_hi,
                                           const at::Tensor& logits, const at::Tensor& lo_at,
                                           const at::Tensor& hi_at, int64_t num_prefix_tokens) {
  const Shape s = check_logits(logits, num_prefix_tokens);
  const auto device = logits.device();
  const auto dtype = logits.scalar_type();
  checks::check_input(d_gram, "d_gram", device, 4, "(B, N - P, H, H)", {dtype});
  for (int64_t dim = 0; dim < 4; ++dim) {
    const int64_t want[4] = {s.B, s.M, s.H, s.H};
    checks::check_size(d_gram, "d_gram", dim, want[dim], "(B, N - P, H, H) of logits");
  }
  const std::pair<const at::Tensor*, const char*> stats[] = {
      {&d_mean, "d_mean"}, {&d_lo, "d_lo"}, {&d_hi, "d_hi"}, {&lo_at, "lo_at"}, {&hi_at, "hi_at"}};
  for (const auto& [t, name] : stats) {
    const bool index = t == &lo_at || t == &hi_at;
    checks::check_defined(*t, name);
    checks::check_device(*t, name, device);
    if (index) {
      checks::check_dtype(*t, name, at::kLong);
    } else {
      checks::check_dtype(*t, name, dtype);
    }
    checks::check_dim(*t, name, 3, "(B, N - P, H)");
    checks::check_contiguous(*t, name);
    const int64_t want[3] = {s.B, s.M, s.H};
    for (int64_t dim = 0; dim < 3; ++dim) checks::check_size(*t, name, dim, want[dim], "(B, N - P, H) of logits");
  }
  for (const auto& [t, name] : {std::make_pair(&lo_at, "lo_at"), std::make_pair(&hi_at, "hi_at")}) {
    if (t->numel() == 0) continue;
    const auto mm = at::aminmax(*t);
    const int64_t lo = std::get<0>(mm).item<int64_t>(), hi = std::get<1>(mm).item<int64_t>();
    MASKAQ_CHECK_INDEX(lo >= 0 && hi < s.M, name, " values must lie in [0, ", s.M,
                       ") (keys of the patch block), got range [", lo, ", ", hi, "]");
  }
  auto grad = at::empty(logits.sizes(), logits.options());
  AT_DISPATCH_FLOATING_TYPES(dtype, "key_map_statistics_backward_cpu", [&] {
    backward_kernel<scalar_t>(d_gram, d_mean, d_lo, d_hi, logits, lo_at, hi_at, s, grad);
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(maskaq, CPU, m) {
  m.impl("key_map_statistics", &key_map_statistics_cpu);
  m.impl("key_map_statistics_backward", &key_map_statistics_backward_cpu);
}

}  // namespace maskaq
