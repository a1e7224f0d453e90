// maskaq::int8_gemm_pack / maskaq::int8_gemm: an exact uint8 × int8 GEMM for x86 CPUs without VNNI.
//
// Why it exists: without VNNI, oneDNN and fbgemm multiply u8·s8 with vpmaddubsw, which adds each
// pair of adjacent products in int16 with saturation, so 8-bit weights against full 8-bit
// activations clip (255·127·2 > 32767). Here both operands are widened to int16 and multiplied
// with vpmaddwd, which adds each pair of int16 products in int32: every accumulator is exact.
// The price: vpmaddwd does 16 multiply-adds per instruction where vpmaddubsw does 32 (a float FMA
// 8), and what that costs depends on the core. On an AVX-512 Xeon running AVX2 code it runs at
// about FP32's speed; on an AVX2-only AMD EPYC (Zen 3), the CPUs this GEMM exists for, it keeps most
// of int8's speed-up over MKL's FP32 GEMM and runs near oneDNN's saturating int8 GEMM (measurements:
// docs/integer-inference.md#why-exact-w8a8-stays-behind-on-avx2).
//
// Layout. The weights W (N, K) are packed once (int8_gemm_pack) into panels of 16 output columns:
// panel p holds, for every pair of inputs (k, k+1), the 16 columns' (W[n][k], W[n][k+1]) as int16
// pairs, i.e. (ceil(N/16), ceil(K/2), 32) int16 with zeros past N and K. The activations are
// widened per task and input block into int16 rows, u − z, padded to whole pairs and to a whole
// number of kRows-row strips, each int32 of a row the int16 pair (u[m][k] − z, u[m][k+1] − z) (16
// bytes at a time on AVX2). The micro-kernel keeps a kRows × 16 int32 tile in 12 registers; per
// input pair it loads one panel row (2 vectors), broadcasts one pair from each of the strip's kRows
// rows and issues 2·kRows vpmaddwd + vpaddd (on the Zen 3 EPYC one thread runs DeiT-S's layers
// close to the ceiling of that core's vpmaddwd + vpaddd issue, benchmarks/cpu_peaks.c:
// docs/integer-inference.md#why-exact-w8a8-stays-behind-on-avx2). Inputs are blocked by kDepth so a
// panel block (16 KB) stays in L1 while every strip of the task's rows passes over it. With a scale
// (and bias), each tile is turned into float32 acc·scale + bias in place once its last input block
// is in, while it is still in L1.
//
// The same GEMM serves int8_attention's products (int16_gemm.h: int8 or uint8 activations with a
// zero point, weights packed from any strides with theirs, one thread).
//
// Dispatch follows ATen's CPU capability (ATEN_CPU_CAPABILITY=default selects the portable loop),
// so tests can run both code paths on one machine.
#include "checks.h"
#include "int16_gemm.h"

#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define MASKAQ_INT8_GEMM_AVX2 1
#endif

namespace maskaq {
namespace {

constexpr int64_t kCols = 16;     // output columns per weight panel (two 8-lane int32 vectors)
constexpr int64_t kRows = 6;      // activation rows per strip: 12 accumulators + 2 panel vectors + 1 broadcast
constexpr int64_t kDepth = 512;   // inputs per block (256 pairs): a panel block is 16 KB
constexpr int64_t kBlockRows = 16 * kRows;  // the most rows a row block has

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct Problem {
  const void* a;     // (M, K) activations, row stride lda: uint8, or int8 with a_signed
  bool a_signed;
  int64_t lda;
  int64_t M, K, N;
  int32_t zero_point;
  const int16_t* w;  // packed (panels, pairs, 32)
  int64_t pairs;     // ceil(K / 2)
  int32_t* out;      // (M, N), row stride ldo: the accumulators, or the float32 results in their place
  int64_t ldo;
  const float* scale;  // (N,), or null: return the accumulators
  const float* bias;   // (N,), or null (with scale: no bias)
};

// One row's inputs [0, count) as int16 x − z into dst, zeros from count to width (a whole number of
// pairs past K). In = uint8_t or int8_t.
template <typename In>
void widen_row_portable(const In* src, int64_t count, int32_t z, int16_t* dst, int64_t width) {
  for (int64_t k = 0; k < count; ++k) dst[k] = static_cast<int16_t>(static_cast<int32_t>(src[k]) - z);
  for (int64_t k = count; k < width; ++k) dst[k] = 0;
}

#if defined(MASKAQ_INT8_GEMM_AVX2)
template <typename In>
__attribute__((target("avx2"))) void widen_row_avx2(const In* src, int64_t count, int32_t z, int16_t* dst,
                                                    int64_t width) {
  const __m256i zv = _mm256_set1_epi16(static_cast<int16_t>(z));  // x − z fits int16 (checked by the callers)
  int64_t k = 0;
  for (; k + 16 <= count; k += 16) {
    const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + k));
    const __m256i w = std::is_signed<In>::value ? _mm256_cvtepi8_epi16(x) : _mm256_cvtepu8_epi16(x);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + k), _mm256_sub_epi16(w, zv));
  }
  widen_row_portable(src + k, count - k, z, dst + k, width - k);
}
#endif

// Rows [r0, r0 + rows) × inputs [k0, k0 + 2·npairs) of a − z as int16 rows of npairs pairs (int32), row
// after row; rows up to the next whole strip (kRows) are zero, as is an odd input past K.
template <typename In>
void widen_rows_typed(const Problem& p, const In* a, int64_t r0, int64_t rows, int64_t k0, int64_t npairs, int32_t* dst,
                      bool avx2) {
  const int64_t width = 2 * npairs, count = std::min(width, p.K - k0);
  const int64_t padded = ceil_div(rows, kRows) * kRows;
  for (int64_t r = 0; r < padded; ++r) {
    int16_t* row = reinterpret_cast<int16_t*>(dst + r * npairs);
    if (r >= rows) {
      std::memset(row, 0, sizeof(int16_t) * width);
      continue;
    }
    const In* src = a + (r0 + r) * p.lda + k0;
#if defined(MASKAQ_INT8_GEMM_AVX2)
    if (avx2) {
      widen_row_avx2(src, count, p.zero_point, row, width);
      continue;
    }
#endif
    widen_row_portable(src, count, p.zero_point, row, width);
  }
}

void widen_rows(const Problem& p, int64_t r0, int64_t rows, int64_t k0, int64_t npairs, int32_t* dst, bool avx2) {
  if (p.a_signed) return widen_rows_typed(p, static_cast<const int8_t*>(p.a), r0, rows, k0, npairs, dst, avx2);
  widen_rows_typed(p, static_cast<const uint8_t*>(p.a), r0, rows, k0, npairs, dst, avx2);
}

// A tile of the output: rows × cols valid entries at `c` (row stride ldc), `tile` the kRows × kCols
// accumulators. The first input block stores, later blocks add.
void store_tile(const int32_t* tile, int32_t* c, int64_t ldc, int64_t rows, int64_t cols, bool accumulate) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) c[i * ldc + j] = (accumulate ? c[i * ldc + j] : 0) + tile[i * kCols + j];
}

// y = float(acc)·scale + bias over a finished tile, written over its accumulators: the arithmetic of
// int8_linear_epilogue (two roundings; nothing in this file is built with FMA, so nothing contracts).
void dequantize_tile_portable(int32_t* c, int64_t ldc, int64_t rows, int64_t cols, const float* scale,
                              const float* bias) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) {
      float y = static_cast<float>(c[i * ldc + j]) * scale[j];
      y = y + (bias ? bias[j] : 0.0f);
      std::memcpy(c + i * ldc + j, &y, sizeof(y));
    }
}

// a: the strip's kRows rows of npairs int16 pairs, row stride lda (int32).
void tile_portable(const int32_t* a, int64_t lda, const int16_t* b, int64_t npairs, int32_t* tile) {
  std::memset(tile, 0, sizeof(int32_t) * kRows * kCols);
  for (int64_t j = 0; j < npairs; ++j) {
    for (int64_t i = 0; i < kRows; ++i) {
      const int32_t pair = a[i * lda + j];
      const int32_t lo = static_cast<int16_t>(pair & 0xffff), hi = static_cast<int16_t>(pair >> 16);
      for (int64_t n = 0; n < kCols; ++n)
        tile[i * kCols + n] += lo * b[j * 2 * kCols + 2 * n] + hi * b[j * 2 * kCols + 2 * n + 1];
    }
  }
}

#if defined(MASKAQ_INT8_GEMM_AVX2)
// The accumulators are named, not an array: GCC kept an array of __m256i partly on the stack.
#define MASKAQ_ROW(i)                                                  \
  {                                                                    \
    const __m256i ai = _mm256_set1_epi32(a##i[j]);                    \
    c##i##0 = _mm256_add_epi32(c##i##0, _mm256_madd_epi16(ai, b0));    \
    c##i##1 = _mm256_add_epi32(c##i##1, _mm256_madd_epi16(ai, b1));    \
  }

__attribute__((target("avx2"))) void tile_avx2(const int32_t* a, int64_t lda, const int16_t* b, int64_t npairs,
                                               int32_t* c, int64_t ldc, int64_t rows, int64_t cols, bool accumulate) {
  static_assert(kRows == 6, "tile_avx2 is written out for 6 rows");
  const int32_t *a0 = a, *a1 = a + lda, *a2 = a + 2 * lda, *a3 = a + 3 * lda, *a4 = a + 4 * lda, *a5 = a + 5 * lda;
  __m256i c00 = _mm256_setzero_si256(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00,
          c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  for (int64_t j = 0; j < npairs; ++j) {
    const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + j * 2 * kCols));
    const __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + j * 2 * kCols + kCols));
    MASKAQ_ROW(0) MASKAQ_ROW(1) MASKAQ_ROW(2) MASKAQ_ROW(3) MASKAQ_ROW(4) MASKAQ_ROW(5)
  }
  alignas(32) int32_t tile[kRows * kCols];
  const __m256i acc[kRows * 2] = {c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51};
  if (rows == kRows && cols == kCols) {
    for (int i = 0; i < kRows; ++i) {
      __m256i* dst = reinterpret_cast<__m256i*>(c + i * ldc);
      __m256i lo = acc[2 * i], hi = acc[2 * i + 1];
      if (accumulate) {
        lo = _mm256_add_epi32(lo, _mm256_loadu_si256(dst));
        hi = _mm256_add_epi32(hi, _mm256_loadu_si256(dst + 1));
      }
      _mm256_storeu_si256(dst, lo);
      _mm256_storeu_si256(dst + 1, hi);
    }
    return;
  }
  for (int i = 0; i < 2 * kRows; ++i) _mm256_store_si256(reinterpret_cast<__m256i*>(tile + 8 * i), acc[i]);
  store_tile(tile, c, ldc, rows, cols, accumulate);
}
#undef MASKAQ_ROW

__attribute__((target("avx2"))) void dequantize_tile_avx2(int32_t* c, int64_t ldc, int64_t rows, int64_t cols,
                                                          const float* scale, const float* bias) {
  if (cols != kCols) return dequantize_tile_portable(c, ldc, rows, cols, scale, bias);
  const __m256 s0 = _mm256_loadu_ps(scale), s1 = _mm256_loadu_ps(scale + 8);
  const __m256 b0 = bias ? _mm256_loadu_ps(bias) : _mm256_setzero_ps();
  const __m256 b1 = bias ? _mm256_loadu_ps(bias + 8) : _mm256_setzero_ps();
  for (int64_t i = 0; i < rows; ++i) {
    int32_t* row = c + i * ldc;
    const __m256 y0 = _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<__m256i*>(row))), s0), b0);
    const __m256 y1 = _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<__m256i*>(row + 8))), s1), b1);
    _mm256_storeu_ps(reinterpret_cast<float*>(row), y0);
    _mm256_storeu_ps(reinterpret_cast<float*>(row + 8), y1);
  }
}
#endif

// ATen's capability ("DEFAULT", "AVX2", "AVX512", ...), read once: it already checks the CPU and
// honours ATEN_CPU_CAPABILITY.
bool use_avx2() {
#if defined(MASKAQ_INT8_GEMM_AVX2)
  static const bool avx2 = [] {
    const std::string capability = at::get_cpu_capability();
    return capability.rfind("AVX", 0) == 0;  // ATen has no AVX level below AVX2
  }();
  return avx2;
#else
  return false;
#endif
}

// One task: output rows [r0, r0 + rows) × panels [p0, p1).
void run_block(const Problem& p, int64_t r0, int64_t rows, int64_t p0, int64_t p1, bool avx2,
               std::vector<int32_t>& strips) {
  const int64_t nstrips = ceil_div(rows, kRows);
  for (int64_t j0 = 0; j0 < p.pairs; j0 += kDepth / 2) {
    const int64_t npairs = std::min(kDepth / 2, p.pairs - j0);
    strips.resize(static_cast<size_t>(nstrips * kRows * npairs));
    widen_rows(p, r0, rows, 2 * j0, npairs, strips.data(), avx2);
    const bool accumulate = j0 > 0, finish = p.scale && j0 + kDepth / 2 >= p.pairs;
    for (int64_t panel = p0; panel < p1; ++panel) {
      const int16_t* b = p.w + (panel * p.pairs + j0) * 2 * kCols;
      const int64_t n0 = panel * kCols, cols = std::min(kCols, p.N - n0);
      for (int64_t s = 0; s < nstrips; ++s) {
        const int32_t* a = strips.data() + s * kRows * npairs;
        const int64_t m0 = r0 + s * kRows, srows = std::min(kRows, r0 + rows - m0);
        int32_t* c = p.out + m0 * p.ldo + n0;
        const float* bias = p.bias ? p.bias + n0 : nullptr;
#if defined(MASKAQ_INT8_GEMM_AVX2)
        if (avx2) {
          tile_avx2(a, npairs, b, npairs, c, p.ldo, srows, cols, accumulate);
          if (finish) dequantize_tile_avx2(c, p.ldo, srows, cols, p.scale + n0, bias);
          continue;
        }
#endif
        int32_t tile[kRows * kCols];
        tile_portable(a, npairs, b, npairs, tile);
        store_tile(tile, c, p.ldo, srows, cols, accumulate);
        if (finish) dequantize_tile_portable(c, p.ldo, srows, cols, p.scale + n0, bias);
      }
    }
  }
}

// Row blocks of equal height: a whole number of strips, at most kBlockRows rows. Returns
// (number of blocks, rows per block).
std::pair<int64_t, int64_t> row_blocks(int64_t M) {
  const int64_t blocks = ceil_div(M, kBlockRows);
  return {blocks, ceil_div(ceil_div(M, blocks), kRows) * kRows};
}

void pack_weights(const int8_t* w, int64_t N, int64_t K, int64_t ld_n, int64_t ld_k, int32_t zero_point,
                  int16_t* dst, int64_t panel_begin, int64_t panel_end) {
  const int64_t pairs = ceil_div(K, 2);
  for (int64_t panel = panel_begin; panel < panel_end; ++panel) {
    const int64_t n0 = panel * kCols, cols = std::min(kCols, N - n0);
    int16_t* out = dst + panel * pairs * 2 * kCols;
    for (int64_t k = 0; k < K; ++k) {
      const int8_t* src = w + n0 * ld_n + k * ld_k;
      int16_t* row = out + (k / 2) * 2 * kCols + k % 2;
      for (int64_t c = 0; c < cols; ++c) row[2 * c] = static_cast<int16_t>(src[c * ld_n] - zero_point);
    }
  }
}

at::Tensor int8_gemm_pack_cpu(const at::Tensor& weight) {
  checks::check_defined(weight, "weight");
  checks::check_dtype(weight, "weight", at::kChar);
  checks::check_dim(weight, "weight", 2, "(out_features, in_features)");
  MASKAQ_CHECK_VALUE(weight.device().is_cpu(), "int8_gemm_pack: weight must be a CPU tensor, got ", weight.device());
  const at::Tensor w = weight.contiguous();
  const int64_t N = w.size(0), K = w.size(1), panels = ceil_div(N, kCols), pairs = ceil_div(K, 2);
  at::Tensor packed = at::zeros({panels, pairs, 2 * kCols}, w.options().dtype(at::kShort));
  const int8_t* src = w.data_ptr<int8_t>();
  int16_t* dst = packed.data_ptr<int16_t>();
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) { pack_weights(src, N, K, K, 1, 0, dst, begin, end); });
  return packed;
}

void check_epilogue_vector(const c10::optional<at::Tensor>& t, const char* name, int64_t n) {
  if (!t.has_value()) return;
  checks::check_dtype(*t, name, at::kFloat);
  MASKAQ_CHECK_VALUE(t->device().is_cpu() && t->dim() == 1 && t->size(0) == n && t->is_contiguous(), name,
                    " must be a contiguous CPU tensor of shape (", n, "), got ", t->sizes(), " on ", t->device());
}

at::Tensor int8_gemm_cpu(const at::Tensor& input, int64_t input_zero_point, const at::Tensor& packed_weight,
                         int64_t out_features, const c10::optional<at::Tensor>& scale,
                         const c10::optional<at::Tensor>& bias) {
  checks::check_defined(input, "input");
  checks::check_defined(packed_weight, "packed_weight");
  checks::check_dtype(input, "input", at::kByte);
  checks::check_dtype(packed_weight, "packed_weight", at::kShort);
  checks::check_dim(input, "input", 2, "(M, in_features)");
  checks::check_dim(packed_weight, "packed_weight", 3, "(ceil(out_features/16), ceil(in_features/2), 32), from int8_gemm_pack");
  MASKAQ_CHECK_VALUE(input.device().is_cpu() && packed_weight.device().is_cpu(),
                    "int8_gemm runs on CPU tensors, got input on ", input.device(), " and packed_weight on ",
                    packed_weight.device());
  checks::check_contiguous(packed_weight, "packed_weight");
  const int64_t M = input.size(0), K = input.size(1), N = out_features;
  MASKAQ_CHECK_VALUE(N >= 0 && packed_weight.size(0) == ceil_div(N, kCols) && packed_weight.size(2) == 2 * kCols,
                    "packed_weight of shape ", packed_weight.sizes(), " does not hold ", N, " output features");
  MASKAQ_CHECK_VALUE(packed_weight.size(1) == ceil_div(K, 2), "packed_weight was packed for ",
                    2 * packed_weight.size(1) - 1, " or ", 2 * packed_weight.size(1), " input features, input has ", K);
  // u − z must be an int16, and every accumulator an int32: |acc| <= K·max|u − z|·128.
  const int64_t widest = std::max<int64_t>(std::abs(input_zero_point), std::abs(255 - input_zero_point));
  MASKAQ_CHECK_VALUE(widest <= 32767 && K * widest * 128 < (int64_t(1) << 31), "int8_gemm: input_zero_point ",
                    input_zero_point, " with ", K, " input features can overflow the int32 accumulators");
  MASKAQ_CHECK_VALUE(scale.has_value() || !bias.has_value(), "int8_gemm: bias needs a scale");
  check_epilogue_vector(scale, "scale", N);
  check_epilogue_vector(bias, "bias", N);
  const bool dequantize = scale.has_value();
  at::Tensor out = at::empty({M, N}, input.options().dtype(dequantize ? at::kFloat : at::kInt));
  if (M == 0 || N == 0) return out;
  if (K == 0) {  // no products: the accumulators are 0, y = 0·scale + bias
    out.zero_();
    if (dequantize) out.mul_(*scale);
    if (bias.has_value()) out.add_(*bias);
    return out;
  }
  const at::Tensor u = input.contiguous();
  const Problem p{u.data_ptr<uint8_t>(), false, K, M, K, N, static_cast<int32_t>(input_zero_point),
                  packed_weight.data_ptr<int16_t>(), ceil_div(K, 2),
                  static_cast<int32_t*>(out.data_ptr()), N,  // float32 results overwrite their accumulators
                  dequantize ? scale->data_ptr<float>() : nullptr,
                  bias.has_value() ? bias->data_ptr<float>() : nullptr};
  const bool avx2 = use_avx2();
  // The work is a grid of (row block, panel) units of equal size: row blocks of equal height (a
  // whole number of strips, at most kBlockRows), 16-column panels. Each thread takes an equal
  // contiguous range of units in row-block order, so it widens each of its row blocks once and the
  // threads stay balanced at batch 1 (197 rows: 3 blocks of 66) as at batch 8.
  const auto [blocks, block_rows] = row_blocks(M);
  const int64_t panels = ceil_div(N, kCols);
  at::parallel_for(0, blocks * panels, 1, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> strips;
    for (int64_t unit = begin; unit < end;) {
      const int64_t rb = unit / panels, p0 = unit % panels, p1 = std::min(panels, p0 + (end - unit));
      const int64_t r0 = rb * block_rows;
      if (r0 < M) run_block(p, r0, std::min(block_rows, M - r0), p0, p1, avx2, strips);
      unit += p1 - p0;
    }
  });
  return out;
}

}  // namespace

namespace int16_gemm {

int64_t packed_size(int64_t N, int64_t K) { return ceil_div(N, kCols) * ceil_div(K, 2) * 2 * kCols; }

void pack(const int8_t* w, int64_t N, int64_t K, int64_t ld_n, int64_t ld_k, int32_t zero_point, int16_t* dst) {
  pack_weights(w, N, K, ld_n, ld_k, zero_point, dst, 0, ceil_div(N, kCols));
}

void run_serial(const Gemm& g, std::vector<int32_t>& scratch) {
  if (g.M == 0 || g.N == 0) return;
  if (g.K == 0) {  // no products: y = 0·scale + bias
    for (int64_t m = 0; m < g.M; ++m)
      for (int64_t n = 0; n < g.N; ++n) g.out[m * g.ldo + n] = 0.0f * g.scale[n] + (g.bias ? g.bias[n] : 0.0f);
    return;
  }
  const Problem p{g.a, g.a_signed, g.lda, g.M, g.K, g.N, g.a_zero_point, g.w, ceil_div(g.K, 2),
                  reinterpret_cast<int32_t*>(g.out), g.ldo, g.scale, g.bias};
  const auto [blocks, block_rows] = row_blocks(g.M);
  for (int64_t rb = 0; rb < blocks; ++rb) {
    const int64_t r0 = rb * block_rows;
    if (r0 < g.M) run_block(p, r0, std::min(block_rows, g.M - r0), 0, ceil_div(g.N, kCols), use_avx2(), scratch);
  }
}

}  // namespace int16_gemm

TORCH_LIBRARY_IMPL(maskaq, CPU, m) {
  m.impl("int8_gemm_pack", &int8_gemm_pack_cpu);
  m.impl("int8_gemm", &int8_gemm_cpu);
}

}  // namespace maskaq
