// The int8 linear layer (services/worker/models/int8_linear.py) for a few rows at a time: a decode step of one
// to a few requests. oneDNN's int8 GEMM (torch._int_mm) is built for big batches; for one row it streams the
// weights at a fraction of the memory bandwidth, and the layer's activation quantization and rescaling cost a
// dozen small PyTorch ops more. Here one pass quantizes the rows, reads each weight row once for all of them
// and writes the rescaled result: the same arithmetic in the same order, so the output is bit for bit the one
// of the PyTorch path (integer sums are exact; every float step is the same IEEE operation).
//
// Built by kernels/paged_attention_cpu.py without -ffast-math (the divisions must stay divisions), registered as
// torch.ops.tessera.int8_linear_rows.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#include "step_team.h"

namespace {

// sum_i q[i] * w[i] over k int8s, exactly, three ways. With AVX512-VNNI: vpdpbusd multiplies unsigned by signed
// bytes, so q is shifted to u = q + 128 (made once per row of x) and 128 * sum(w) is taken back off (the
// layer keeps each weight row's sum). Else AVX512-BW: bytes widened to int16, vpmaddwd; else the same on AVX2.
// Else plain C++.
__attribute__((target("avx512f,avx512bw,avx512vnni"))) int32_t dot_vnni(const uint8_t* u, const int8_t* w,
                                                                         int64_t k, int32_t w_sum) {
  __m512i acc = _mm512_setzero_si512();
  int64_t i = 0;
  for (; i + 64 <= k; i += 64)
    acc = _mm512_dpbusd_epi32(acc, _mm512_loadu_si512(u + i), _mm512_loadu_si512(w + i));
  int32_t total = _mm512_reduce_add_epi32(acc);
  for (; i < k; ++i) total += static_cast<int32_t>(u[i]) * static_cast<int32_t>(w[i]);
  return total - 128 * w_sum;
}

__attribute__((target("avx512f,avx512bw"))) int32_t dot_avx512bw(const int8_t* q, const int8_t* w, int64_t k) {
  __m512i acc = _mm512_setzero_si512();
  int64_t i = 0;
  for (; i + 32 <= k; i += 32) {
    const __m512i a = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + i)));
    const __m512i b = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + i)));
    acc = _mm512_add_epi32(acc, _mm512_madd_epi16(a, b));
  }
  int32_t total = _mm512_reduce_add_epi32(acc);
  for (; i < k; ++i) total += static_cast<int32_t>(q[i]) * static_cast<int32_t>(w[i]);
  return total;
}

// The sum of a vector's eight int32 lanes.
__attribute__((target("avx2"))) inline int32_t hsum8(__m256i v) {
  const __m128i half = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  const __m128i quarter = _mm_add_epi32(half, _mm_shuffle_epi32(half, 0x4E));
  return _mm_cvtsi128_si32(_mm_add_epi32(quarter, _mm_shuffle_epi32(quarter, 0xB1)));
}

__attribute__((target("avx2"))) int32_t dot_avx2(const int8_t* q, const int8_t* w, int64_t k) {
  __m256i acc = _mm256_setzero_si256();
  int64_t i = 0;
  for (; i + 16 <= k; i += 16) {
    const __m256i a = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + i)));
    const __m256i b = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + i)));
    acc = _mm256_add_epi32(acc, _mm256_madd_epi16(a, b));
  }
  int32_t total = hsum8(acc);
  for (; i < k; ++i) total += static_cast<int32_t>(q[i]) * static_cast<int32_t>(w[i]);
  return total;
}

// AVX2, many rows (a batch or a prefill on a CPU whose oneDNN has no fast int8 GEMM): the int32 sums of
// rows [r0, r1) of x against weight rows [j0, j1), x pre-widened to int16. Two rows of x by four weight rows of
// sums stay in registers, so each 16-value load of either serves four or two products instead of one.

__attribute__((target("avx2"))) void sums_avx2(const int16_t* x16, const int8_t* q, const int8_t* w, int64_t k,
                                               int64_t n, int64_t r0, int64_t r1, int64_t j0, int64_t j1,
                                               int32_t* sums) {
  const int64_t body = k / 16 * 16;
  int64_t j = j0;
  for (; j + 4 <= j1; j += 4) {
    int64_t r = r0;
    for (; r + 2 <= r1; r += 2) {
      __m256i acc[2][4];
      for (int a = 0; a < 2; ++a)
        for (int c = 0; c < 4; ++c) acc[a][c] = _mm256_setzero_si256();
      for (int64_t i = 0; i < body; i += 16) {
        const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x16 + r * k + i));
        const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x16 + (r + 1) * k + i));
        for (int c = 0; c < 4; ++c) {
          const __m256i wc =
              _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + (j + c) * k + i)));
          acc[0][c] = _mm256_add_epi32(acc[0][c], _mm256_madd_epi16(x0, wc));
          acc[1][c] = _mm256_add_epi32(acc[1][c], _mm256_madd_epi16(x1, wc));
        }
      }
      for (int a = 0; a < 2; ++a)
        for (int c = 0; c < 4; ++c) {
          int32_t total = hsum8(acc[a][c]);
          for (int64_t i = body; i < k; ++i)
            total += static_cast<int32_t>(q[(r + a) * k + i]) * static_cast<int32_t>(w[(j + c) * k + i]);
          sums[(r + a) * n + j + c] = total;
        }
    }
    for (; r < r1; ++r)
      for (int c = 0; c < 4; ++c) sums[r * n + j + c] = dot_avx2(q + r * k, w + (j + c) * k, k);
  }
  for (; j < j1; ++j)
    for (int64_t r = r0; r < r1; ++r) sums[r * n + j] = dot_avx2(q + r * k, w + j * k, k);
}

int32_t dot_plain(const int8_t* q, const int8_t* w, int64_t k) {
  int32_t total = 0;
  for (int64_t i = 0; i < k; ++i) total += static_cast<int32_t>(q[i]) * static_cast<int32_t>(w[i]);
  return total;
}

enum class Dot { vnni, avx512bw, avx2, plain };

// The best this CPU runs; TESSERA_INT8_DOT=avx512bw, avx2 or plain picks a lesser one (the tests check each).
Dot best_dot() {
  static const Dot dot = [] {
    const char* forced = std::getenv("TESSERA_INT8_DOT");
    const bool avx2 = __builtin_cpu_supports("avx2"), bw = __builtin_cpu_supports("avx512bw"),
               vnni = bw && __builtin_cpu_supports("avx512vnni");
    const auto is = [&](const char* name) { return forced != nullptr && std::strcmp(forced, name) == 0; };
    if (is("plain")) return Dot::plain;
    if (is("avx2") && avx2) return Dot::avx2;
    if (is("avx512bw") && bw) return Dot::avx512bw;
    return vnni ? Dot::vnni : bw ? Dot::avx512bw : avx2 ? Dot::avx2 : Dot::plain;
  }();
  return dot;
}

// Which dot int8_linear_rows uses here: vnni, avx512bw, avx2 or plain.
std::string int8_dot() {
  switch (best_dot()) {
    case Dot::vnni: return "vnni";
    case Dot::avx512bw: return "avx512bw";
    case Dot::avx2: return "avx2";
    default: return "plain";
  }
}

// Rows [r0, r1) of x [rows, k] quantized as quantize_rows does: scale = amax|x| / 127 (1 for an all-zero row),
// values = round(x / scale) (half to even, like torch.round) clamped to +-127. The vector path does the same
// IEEE operations per element (a true division, not a reciprocal), so both give quantize_rows' bytes.
__attribute__((target("avx512f,avx512bw,avx512vl"))) void quantize_rows_avx512(const float* x, int64_t k, int64_t r0,
                                                                       int64_t r1, int8_t* q, float* scale) {
  const __m512 limit = _mm512_set1_ps(127.f), low = _mm512_set1_ps(-127.f);
  for (int64_t r = r0; r < r1; ++r) {
    const float* xr = x + r * k;
    __m512 m = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= k; i += 16) m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(xr + i)));
    float amax = _mm512_reduce_max_ps(m);
    for (; i < k; ++i) amax = std::max(amax, std::fabs(xr[i]));
    const float s = amax / 127.0f;
    scale[r] = s > 0.f ? s : 1.0f;
    const __m512 by = _mm512_set1_ps(scale[r]);
    for (i = 0; i < k; i += 16) {
      const __mmask16 lanes = k - i >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (k - i)) - 1);
      __m512 v = _mm512_roundscale_ps(_mm512_div_ps(_mm512_maskz_loadu_ps(lanes, xr + i), by),
                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      v = _mm512_min_ps(limit, _mm512_max_ps(low, v));
      _mm_mask_storeu_epi8(q + r * k + i, lanes, _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(v)));
    }
  }
}

void quantize_rows_into(const float* x, int64_t rows, int64_t k, int8_t* q, float* scale) {
  static const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                             __builtin_cpu_supports("avx512vl");
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    if (avx512) return quantize_rows_avx512(x, k, begin, end, q, scale);
    for (int64_t r = begin; r < end; ++r) {
      float amax = 0.f;
      for (int64_t i = 0; i < k; ++i) amax = std::max(amax, std::fabs(x[r * k + i]));
      const float s = amax / 127.0f;
      scale[r] = s > 0.f ? s : 1.0f;
      for (int64_t i = 0; i < k; ++i) {
        const float v = std::nearbyint(x[r * k + i] / scale[r]);
        q[r * k + i] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, v)));
      }
    }
  });
}

// The batched layer's ends around oneDNN's int8 GEMM (torch._int_mm), each one pass instead of a chain of small
// PyTorch ops (~2/3 of the layer's time at 64 rows): x [rows, k] -> (values [padded, k] int8, zero rows past
// `rows`; scale [rows, 1] float32), as quantize_rows gives them.
std::tuple<at::Tensor, at::Tensor> int8_quantize_rows(const at::Tensor& x, int64_t padded) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && padded >= x.size(0), "int8_quantize_rows: x [rows, k] on the CPU");
  const int64_t rows = x.size(0), k = x.size(1);
  const auto xf = x.to(at::kFloat).contiguous();
  auto values = at::empty({padded, k}, x.options().dtype(at::kChar));
  auto scale = at::empty({rows, 1}, x.options().dtype(at::kFloat));
  quantize_rows_into(xf.const_data_ptr<float>(), rows, k, values.mutable_data_ptr<int8_t>(),
                     scale.mutable_data_ptr<float>());
  if (padded > rows) values.narrow(0, rows, padded - rows).zero_();
  return {values, scale};
}

// One output: the PyTorch path's operations in its order, (acc * s_x) * s_w + b.
inline float rescaled(int32_t acc, float x_scale, float weight_scale, const float* bias, int64_t j) {
  float y = static_cast<float>(acc) * x_scale;
  y = y * weight_scale;
  return bias != nullptr ? y + bias[j] : y;
}

// rescaled() in x's dtype, for the first rows of acc [>= rows, n] int32 (x_scale [rows, 1], weight_scale [1, n]
// float32, bias [n] float32 or none).
template <typename T>
void rescale_rows(const int32_t* acc, const float* xs, const float* ws, const float* bias, int64_t rows, int64_t n,
                  T* out) {
  at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      for (int64_t j = 0; j < n; ++j) out[r * n + j] = static_cast<T>(rescaled(acc[r * n + j], xs[r], ws[j], bias, j));
  });
}

at::Tensor int8_rescale(const at::Tensor& acc, const at::Tensor& x_scale, const at::Tensor& weight_scale,
                        const c10::optional<at::Tensor>& bias, at::ScalarType dtype) {
  const int64_t rows = x_scale.size(0), n = acc.size(1);
  TORCH_CHECK(acc.scalar_type() == at::kInt && acc.dim() == 2 && acc.size(0) >= rows && weight_scale.numel() == n &&
                  x_scale.scalar_type() == at::kFloat && weight_scale.scalar_type() == at::kFloat,
              "int8_rescale: int32 sums [>= rows, n], float32 scales [rows, 1] and [1, n]");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "int8_rescale: float32 or bfloat16 out");
  const auto a = acc.contiguous(), xs = x_scale.contiguous(), ws = weight_scale.contiguous();
  at::Tensor bc;
  const float* b = nullptr;
  if (bias.has_value() && bias->defined()) {
    bc = bias->to(at::kFloat).contiguous();
    b = bc.const_data_ptr<float>();
  }
  auto out = at::empty({rows, n}, acc.options().dtype(dtype));
  if (dtype == at::kFloat)
    rescale_rows(a.const_data_ptr<int32_t>(), xs.const_data_ptr<float>(), ws.const_data_ptr<float>(), b, rows, n,
                 out.mutable_data_ptr<float>());
  else
    rescale_rows(a.const_data_ptr<int32_t>(), xs.const_data_ptr<float>(), ws.const_data_ptr<float>(), b, rows, n,
                 out.mutable_data_ptr<at::BFloat16>());
  return out;
}

// x [m, k] (float32 or bfloat16), weight [n, k] int8, weight_scale [n] float32, weight_sums [n] int32 (each
// row's sum), bias [n] float32 or none. Returns [m, n] in x's dtype: round(x / s_x) . w * s_x * s_w + b, with
// s_x = max|x| / 127 per row.
at::Tensor int8_linear_rows(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& weight_scale,
                            const at::Tensor& weight_sums, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && weight.dim() == 2 && weight.size(1) == x.size(1),
              "int8_linear_rows: x [m, k] and weight [n, k] on the CPU");
  TORCH_CHECK(weight.scalar_type() == at::kChar && weight_scale.scalar_type() == at::kFloat &&
                  weight_scale.numel() == weight.size(0),
              "int8_linear_rows: an int8 weight and one float32 scale per output row");
  TORCH_CHECK(weight_sums.scalar_type() == at::kInt && weight_sums.numel() == weight.size(0),
              "int8_linear_rows: one int32 sum per weight row");
  const int64_t rows = x.size(0), k = x.size(1), n = weight.size(0);
  const auto xf = x.to(at::kFloat).contiguous();
  const auto w = weight.contiguous();
  const auto ws = weight_scale.contiguous();
  const float* b = nullptr;
  at::Tensor bc;
  if (bias.has_value() && bias->defined()) {
    bc = bias->to(at::kFloat).contiguous();
    b = bc.const_data_ptr<float>();
  }

  const auto sums = weight_sums.contiguous();
  std::vector<int8_t> q(rows * k);
  std::vector<float> scale(rows);
  quantize_rows_into(xf.const_data_ptr<float>(), rows, k, q.data(), scale.data());

  const Dot dot = best_dot();
  std::vector<uint8_t> u(dot == Dot::vnni ? rows * k : 0);
  for (size_t i = 0; i < u.size(); ++i) u[i] = static_cast<uint8_t>(static_cast<int32_t>(q[i]) + 128);
  const int32_t* sp = sums.const_data_ptr<int32_t>();

  auto out = at::empty({rows, n}, xf.options());
  float* op = out.mutable_data_ptr<float>();
  const int8_t* wp = w.const_data_ptr<int8_t>();
  const float* wsp = ws.const_data_ptr<float>();
  const auto rescale = [&](int32_t acc, int64_t r, int64_t j) { op[r * n + j] = rescaled(acc, scale[r], wsp[j], b, j); };
  if (dot == Dot::avx2 && rows > 4) {
    // Many rows on AVX2: blocked sums, x in tiles of 64 rows that stay in L2 while a thread's share of the
    // weight rows passes them, each tile rescaled as soon as its sums are in.
    std::vector<int16_t> x16(q.begin(), q.end());
    std::vector<int32_t> blocked(rows * n);
    at::parallel_for(0, (n + 3) / 4, 4, [&](int64_t begin, int64_t end) {
      const int64_t j0 = 4 * begin, j1 = std::min<int64_t>(n, 4 * end);
      for (int64_t r0 = 0; r0 < rows; r0 += 64) {
        const int64_t r1 = std::min<int64_t>(rows, r0 + 64);
        sums_avx2(x16.data(), q.data(), wp, k, n, r0, r1, j0, j1, blocked.data());
        for (int64_t r = r0; r < r1; ++r)
          for (int64_t j = j0; j < j1; ++j) rescale(blocked[r * n + j], r, j);
      }
    });
  } else {
    // Each weight row is read once, for every row of x, while it is in cache; units of 16 rows, each thread's
    // share one sequential stream (step_team.h).
    tessera_team::for_each_unit(static_cast<int>(at::get_num_threads()), (n + 15) / 16, [&](int64_t unit) {
      for (int64_t j = 16 * unit; j < std::min<int64_t>(n, 16 * unit + 16); ++j) {
        const int8_t* wj = wp + j * k;
        for (int64_t r = 0; r < rows; ++r) {
          rescale(dot == Dot::vnni       ? dot_vnni(u.data() + r * k, wj, k, sp[j])
                  : dot == Dot::avx512bw ? dot_avx512bw(q.data() + r * k, wj, k)
                  : dot == Dot::avx2     ? dot_avx2(q.data() + r * k, wj, k)
                                         : dot_plain(q.data() + r * k, wj, k),
                  r, j);
        }
      }
    });
  }
  return x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tessera, m) {
  m.def("int8_linear_rows(Tensor x, Tensor weight, Tensor weight_scale, Tensor weight_sums, Tensor? bias) -> Tensor");
  m.impl("int8_linear_rows", c10::DispatchKey::CPU, TORCH_FN(int8_linear_rows));
  m.def("int8_dot() -> str", &int8_dot);
  m.def("int8_quantize_rows(Tensor x, int padded) -> (Tensor, Tensor)");
  m.impl("int8_quantize_rows", c10::DispatchKey::CPU, TORCH_FN(int8_quantize_rows));
  m.def("int8_rescale(Tensor acc, Tensor x_scale, Tensor weight_scale, Tensor? bias, ScalarType dtype) -> Tensor");
  m.impl("int8_rescale", c10::DispatchKey::CPU, TORCH_FN(int8_rescale));
}
