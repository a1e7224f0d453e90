// maskaq::lsq_fake_quant and its backward on CPU: LSQ fake quantization of an activation on a fixed
// per-tensor grid (a frozen student, as during synthesis), one pass over memory each way where the
// PyTorch composition makes six.
//
// Forward: x̂ = (round(clamp(x/α + round(z), qmin, qmax)) − round(z))·α. Backward (straight-through):
// dx = grad · [qmin ≤ x/α + round(z) ≤ qmax]. The arithmetic is that of maskaq.quant's composition,
// operation by operation (a true division by α, then the add, the clamp, round half to even, the
// subtraction and the product, no FMA), so the results are the same bits. The clamp comes before
// the rounding, so the rounding sees |t| ≤ 2^16 and float_math.h's round_small is exact; a NaN stays
// NaN through the clamp, as with torch.clamp, and gets no gradient.
#include "checks.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

#include "fp_contract_off_begin.h"  // every operation rounded on its own, as in the composition

#include "clones.h"
#include "float_math.h"
#include "vec8.h"

namespace maskaq {
namespace {

constexpr int64_t kGrain = 1 << 15;  // elements per parallel chunk

struct Grid {
  float step, zero, lo, hi;  // α, round(z), qmin, qmax
};

template <typename T>
inline T fake_quant_value(T x, T step, T zero, T lo, T hi) {
  T t = x / step + zero;
  t = t < lo ? lo : t;
  t = hi < t ? hi : t;
  return (fmath::round_small(t) - zero) * step;
}

template <typename T>
inline T straight_through(T g, T x, T step, T zero, T lo, T hi) {
  const T u = x / step + zero;
  return g * ((u >= lo && u <= hi) ? T(1) : T(0));
}

#if defined(MASKAQ_SIMD)
MASKAQ_CLONES void forward_float(const float* x, float* y, int64_t n, Grid g) {
  const int64_t nv = n - n % kLanes;
  const vf8 step = vsplat(g.step), zero = vsplat(g.zero), lo = vsplat(g.lo), hi = vsplat(g.hi);
  for (int64_t i = 0; i < nv; i += kLanes) {
    const vf8 t = vmin_keep(vmax_keep(vload(x + i) / step + zero, lo), hi);
    vstore(y + i, (vround_small(t) - zero) * step);
  }
  for (int64_t i = nv; i < n; ++i) y[i] = fake_quant_value(x[i], g.step, g.zero, g.lo, g.hi);
}

MASKAQ_CLONES void backward_float(const float* grad, const float* x, float* dx, int64_t n, Grid g) {
  const int64_t nv = n - n % kLanes;
  const vf8 step = vsplat(g.step), zero = vsplat(g.zero), lo = vsplat(g.lo), hi = vsplat(g.hi);
  const vf8 one = vsplat(1.0f), nil = vsplat(0.0f);
  for (int64_t i = 0; i < nv; i += kLanes) {
    const vf8 u = vload(x + i) / step + zero;
    vstore(dx + i, vload(grad + i) * vselect((u >= lo) & (u <= hi), one, nil));
  }
  for (int64_t i = nv; i < n; ++i) dx[i] = straight_through(grad[i], x[i], g.step, g.zero, g.lo, g.hi);
}
#else
void forward_float(const float* x, float* y, int64_t n, Grid g) {
  for (int64_t i = 0; i < n; ++i) y[i] = fake_quant_value(x[i], g.step, g.zero, g.lo, g.hi);
}
void backward_float(const float* grad, const float* x, float* dx, int64_t n, Grid g) {
  for (int64_t i = 0; i < n; ++i) dx[i] = straight_through(grad[i], x[i], g.step, g.zero, g.lo, g.hi);
}
#endif

// The grid as x's dtype sees it: α and round(z) read from their one-element tensors (torch.round
// rounds half to even, as nearbyint does under the default rounding mode).
template <typename T>
void read_grid(const at::Tensor& step, const at::Tensor& zero_point, T& s, T& z) {
  s = step.item<T>();
  z = std::nearbyint(zero_point.item<T>());
}

Grid float_grid(const at::Tensor& step, const at::Tensor& zero_point, int64_t qmin, int64_t qmax) {
  Grid g{};
  read_grid<float>(step, zero_point, g.step, g.zero);
  g.lo = static_cast<float>(qmin), g.hi = static_cast<float>(qmax);
  return g;
}

void check_args(const at::Tensor& x, const at::Tensor& step, const at::Tensor& zero_point, int64_t qmin,
                int64_t qmax, const char* op) {
  checks::check_defined(x, "x");
  checks::check_dtype_in(x, "x", {at::kFloat, at::kDouble});
  checks::check_contiguous(x, "x");
  MASKAQ_CHECK_VALUE(x.device().is_cpu(), op, " (CPU kernel): x must be a CPU tensor, got ", x.device());
  for (const auto* t : {&step, &zero_point}) {
    const char* name = t == &step ? "step" : "zero_point";
    checks::check_defined(*t, name);
    checks::check_dtype(*t, name, x.scalar_type());
    MASKAQ_CHECK_VALUE(t->numel() == 1 && t->device().is_cpu(), name,
                      " must be a one-element CPU tensor (a per-tensor grid), got shape ", t->sizes(), " on ",
                      t->device());
  }
  MASKAQ_CHECK_VALUE(qmin < qmax, "qmin = ", qmin, " must be below qmax = ", qmax);
  MASKAQ_CHECK_VALUE(qmin >= -checks::kMaxQuantLevel && qmax <= checks::kMaxQuantLevel, "qmin and qmax must lie in [",
                    -checks::kMaxQuantLevel, ", ", checks::kMaxQuantLevel, "], got ", qmin, " and ", qmax);
}

at::Tensor lsq_fake_quant_cpu(const at::Tensor& x, const at::Tensor& step, const at::Tensor& zero_point,
                              int64_t qmin, int64_t qmax) {
  check_args(x, step, zero_point, qmin, qmax, "lsq_fake_quant");
  at::Tensor y = at::empty_like(x);
  const int64_t n = x.numel();
  if (x.scalar_type() == at::kFloat) {
    const Grid g = float_grid(step, zero_point, qmin, qmax);
    const float* xp = x.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) { forward_float(xp + b, yp + b, e - b, g); });
  } else {
    double s, z;
    read_grid<double>(step, zero_point, s, z);
    const double* xp = x.data_ptr<double>();
    double* yp = y.data_ptr<double>();
    at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) yp[i] = fake_quant_value<double>(xp[i], s, z, qmin, qmax);
    });
  }
  return y;
}

at::Tensor lsq_fake_quant_backward_cpu(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& step,
                                       const at::Tensor& zero_point, int64_t qmin, int64_t qmax) {
  check_args(x, step, zero_point, qmin, qmax, "lsq_fake_quant_backward");
  checks::check_defined(grad, "grad");
  checks::check_dtype(grad, "grad", x.scalar_type());
  checks::check_contiguous(grad, "grad");
  MASKAQ_CHECK_VALUE(grad.sizes() == x.sizes() && grad.device() == x.device(), "grad must have x's shape ",
                    x.sizes(), " and device, got ", grad.sizes(), " on ", grad.device());
  at::Tensor dx = at::empty_like(x);
  const int64_t n = x.numel();
  if (x.scalar_type() == at::kFloat) {
    const Grid g = float_grid(step, zero_point, qmin, qmax);
    const float* gp = grad.data_ptr<float>();
    const float* xp = x.data_ptr<float>();
    float* dp = dx.data_ptr<float>();
    at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) { backward_float(gp + b, xp + b, dp + b, e - b, g); });
  } else {
    double s, z;
    read_grid<double>(step, zero_point, s, z);
    const double* gp = grad.data_ptr<double>();
    const double* xp = x.data_ptr<double>();
    double* dp = dx.data_ptr<double>();
    at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) dp[i] = straight_through<double>(gp[i], xp[i], s, z, qmin, qmax);
    });
  }
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(maskaq, CPU, m) {
  m.impl("lsq_fake_quant", &lsq_fake_quant_cpu);
  m.impl("lsq_fake_quant_backward", &lsq_fake_quant_backward_cpu);
}

}  // namespace maskaq

#include "fp_contract_off_end.h"
