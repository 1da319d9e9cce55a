// The float32 / bfloat16 linear layer (services/worker/models/packed_linear.py) for a decode step of one to a
// few requests: y = x W^T + b for x of at most MAX_ROWS rows. At one row a matmul only streams its weights, and
// oneDNN's kernels, blocked for batches, stream them at ~14 GB/s on the 2-core EPYC where a plain read reaches
// ~30-40; this kernel reads each thread's share of the weight as one sequential stream, prefetched ahead.
//
// The weight is packed once (gemv_pack) into units of 64 output rows, so that one 64-byte load holds the same k
// for 16 outputs (no horizontal sums) and a unit's four such loads per k are adjacent:
//   float32:  [n / 64][k][64]           a fused multiply-add per load, x[k] broadcast;
//   bfloat16: [n / 64][k / 2][64][2]    an AVX512-BF16 dot of pairs per load, x[k:k+2] broadcast (VNNI layout).
// n is padded to 64 and k (bfloat16) to 2 with zeros. CPUs without AVX-512 (AVX2 + FMA) read the same layout
// eight outputs a vector. Sums are float32 in another order than oneDNN's, so
// results differ by float rounding. Registered as torch.ops.tessera.{gemv_pack, gemv}.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include "step_team.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

constexpr int64_t LANES = 16;    // outputs per 512-bit vector of float32 sums
constexpr int64_t UNIT = 64;     // outputs per packed unit: four vectors, one 256-byte row of the unit per k
constexpr int64_t MAX_ROWS = 4;  // rows of x per call: 4 x 4 accumulators stay in registers
constexpr int64_t PREFETCH = 8192;  // bytes ahead in the stream: 32 steps of k

// TESSERA_GEMV=avx2 takes the AVX2 path on an AVX-512 CPU too (the tests check it there).
bool avx2_forced() {
  static const char* forced = std::getenv("TESSERA_GEMV");
  static const bool yes = forced != nullptr && std::strcmp(forced, "avx2") == 0;
  return yes;
}

bool has_avx512_bf16() {
  static const bool yes =
      !avx2_forced() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bf16");
  return yes;
}

// Sums (+ bias) of unit u stored, only the first n outputs of each row; vector stores, as the scalar rounding of
// 64 outputs took as long as a tenth of the unit's weights take to stream.
inline __attribute__((target("avx512f"))) __mmask16 lanes_below(int64_t first, int64_t n) {
  const int64_t left = n - first;
  return left >= LANES ? static_cast<__mmask16>(0xFFFF) : left <= 0 ? 0 : static_cast<__mmask16>((1u << left) - 1);
}

template <int ROWS>
__attribute__((target("avx512f"))) inline void store(__m512 (&acc)[ROWS][4], int64_t u, int64_t n,
                                                     const float* bias, float* out) {
  for (int b = 0; b < 4; ++b) {
    const int64_t first = u * UNIT + b * LANES;
    const __mmask16 m = lanes_below(first, n);
    const __m512 add = bias != nullptr ? _mm512_maskz_loadu_ps(m, bias + first) : _mm512_setzero_ps();
    for (int r = 0; r < ROWS; ++r) _mm512_mask_storeu_ps(out + r * n + first, m, _mm512_add_ps(acc[r][b], add));
  }
}

// bfloat16 outputs rounded to nearest even, as at::BFloat16 rounds.
template <int ROWS>
__attribute__((target("avx512f,avx512bf16,avx512bw,avx512vl"))) inline void store(
    __m512 (&acc)[ROWS][4], int64_t u, int64_t n, const float* bias, at::BFloat16* out) {
  for (int b = 0; b < 4; ++b) {
    const int64_t first = u * UNIT + b * LANES;
    const __mmask16 m = lanes_below(first, n);
    const __m512 add = bias != nullptr ? _mm512_maskz_loadu_ps(m, bias + first) : _mm512_setzero_ps();
    for (int r = 0; r < ROWS; ++r) {
      const __m256i v = (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(acc[r][b], add));
      _mm256_mask_storeu_epi16(out + r * n + first, m, v);
    }
  }
}

// Prefetches the four cache lines PREFETCH bytes past step (256 bytes) p, into L2: prefetches into L1 are held
// up by its few miss buffers (33 GEMVs of a bf16 token on the 2-core Zen 4: 24 GB/s with L1 hints 2 KB ahead,
// 29-34 GB/s with L2 hints 8 KB ahead, alternating in one process).
inline void prefetch_step(const void* step) {
  const char* ahead = static_cast<const char*>(step) + PREFETCH;
  for (int line = 0; line < 4; ++line) _mm_prefetch(ahead + 64 * line, _MM_HINT_T1);
}

template <int ROWS>
__attribute__((target("avx512f"))) void unit_f32(const float* x, int64_t k, const float* w, int64_t u, int64_t n,
                                                 const float* bias, float* out) {
  __m512 acc[ROWS][4];
  for (int r = 0; r < ROWS; ++r)
    for (int b = 0; b < 4; ++b) acc[r][b] = _mm512_setzero_ps();
  for (int64_t i = 0; i < k; ++i) {
    const float* step = w + i * UNIT;
    prefetch_step(step);
    __m512 xv[ROWS];
    for (int r = 0; r < ROWS; ++r) xv[r] = _mm512_set1_ps(x[r * k + i]);
    for (int b = 0; b < 4; ++b) {
      const __m512 wv = _mm512_loadu_ps(step + b * LANES);
      for (int r = 0; r < ROWS; ++r) acc[r][b] = _mm512_fmadd_ps(xv[r], wv, acc[r][b]);
    }
  }
  store<ROWS>(acc, u, n, bias, out);
}

template <int ROWS>
__attribute__((target("avx512f,avx512bf16,avx512bw,avx512vl"))) void unit_bf16(const uint32_t* x_pairs, int64_t pairs,
                                                              const uint16_t* w, int64_t u, int64_t n,
                                                              const float* bias, at::BFloat16* out) {
  __m512 acc[ROWS][4];
  for (int r = 0; r < ROWS; ++r)
    for (int b = 0; b < 4; ++b) acc[r][b] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    const uint16_t* step = w + p * UNIT * 2;
    prefetch_step(step);
    __m512bh xv[ROWS];
    for (int r = 0; r < ROWS; ++r) xv[r] = (__m512bh)_mm512_set1_epi32(x_pairs[r * pairs + p]);
    for (int b = 0; b < 4; ++b) {
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(step + b * LANES * 2);
      for (int r = 0; r < ROWS; ++r) acc[r][b] = _mm512_dpbf16_ps(acc[r][b], xv[r], wv);
    }
  }
  store<ROWS>(acc, u, n, bias, out);
}

// AVX2 + FMA (CPUs without AVX-512): the same packed layout read as 256-bit halves, eight outputs a vector, so a
// unit is eight vectors of sums a row (rows beyond one spill some of them to the stack, which L1 absorbs: the
// stream, not the arithmetic, still sets the pace). bfloat16 pairs are widened with a shift and a mask.
inline __attribute__((target("avx2"))) __m256i lanes_below8(int64_t first, int64_t n) {
  const int64_t left = std::max<int64_t>(std::min<int64_t>(n - first, 8), 0);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(left)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// float32 sums -> bfloat16 rounded to nearest even (NaN stays a quiet NaN), as at::BFloat16 rounds.
inline __attribute__((target("avx2"))) __m128i to_bf16(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), nan);
  const __m256i packed = _mm256_packus_epi32(rounded, rounded);  // per 128-bit lane: 4 values, twice
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0x08));
}

// BLOCKS vectors of eight sums a row, for the outputs from `start` on; out points at row 0 of [ROWS, n].
template <int ROWS, int BLOCKS, typename Out>
__attribute__((target("avx2,fma"))) inline void store8(__m256 (&acc)[ROWS][BLOCKS], int64_t start, int64_t n,
                                                       const float* bias, Out* out) {
  for (int b = 0; b < BLOCKS; ++b) {
    const int64_t first = start + b * 8;
    if (first >= n) return;
    const __m256i m = lanes_below8(first, n);
    const __m256 add = bias != nullptr ? _mm256_maskload_ps(bias + first, m) : _mm256_setzero_ps();
    for (int r = 0; r < ROWS; ++r) {
      const __m256 v = _mm256_add_ps(acc[r][b], add);
      if constexpr (std::is_same_v<Out, float>) {
        _mm256_maskstore_ps(out + r * n + first, m, v);
      } else if (n - first >= 8) {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + r * n + first), to_bf16(v));
      } else {  // the last few outputs of a row
        alignas(16) uint16_t lanes[8];
        _mm_store_si128(reinterpret_cast<__m128i*>(lanes), to_bf16(v));
        std::memcpy(out + r * n + first, lanes, (n - first) * 2);
      }
    }
  }
}

template <int ROWS>
__attribute__((target("avx2,fma"))) void unit_f32_avx2(const float* x, int64_t k, const float* w, int64_t u, int64_t n,
                                                       const float* bias, float* out) {
  __m256 acc[ROWS][8];
  for (int r = 0; r < ROWS; ++r)
    for (int b = 0; b < 8; ++b) acc[r][b] = _mm256_setzero_ps();
  for (int64_t i = 0; i < k; ++i) {
    const float* step = w + i * UNIT;
    prefetch_step(step);
    __m256 xv[ROWS];
    for (int r = 0; r < ROWS; ++r) xv[r] = _mm256_broadcast_ss(x + r * k + i);
    for (int b = 0; b < 8; ++b) {
      const __m256 wv = _mm256_loadu_ps(step + b * 8);
      for (int r = 0; r < ROWS; ++r) acc[r][b] = _mm256_fmadd_ps(xv[r], wv, acc[r][b]);
    }
  }
  store8<ROWS, 8>(acc, u * UNIT, n, bias, out);
}

// x_pairs here holds x as float32, k padded to even: the pair's two values are x[2p] and x[2p + 1].
template <int ROWS>
__attribute__((target("avx2,fma"))) void unit_bf16_avx2(const float* x, int64_t pairs, const uint16_t* w, int64_t u,
                                                        int64_t n, const float* bias, at::BFloat16* out) {
  __m256 acc[ROWS][8];
  for (int r = 0; r < ROWS; ++r)
    for (int b = 0; b < 8; ++b) acc[r][b] = _mm256_setzero_ps();
  const __m256i high = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (int64_t p = 0; p < pairs; ++p) {
    const uint16_t* step = w + p * UNIT * 2;
    prefetch_step(step);
    __m256 x0[ROWS], x1[ROWS];
    for (int r = 0; r < ROWS; ++r) {
      x0[r] = _mm256_broadcast_ss(x + r * pairs * 2 + 2 * p);
      x1[r] = _mm256_broadcast_ss(x + r * pairs * 2 + 2 * p + 1);
    }
    for (int b = 0; b < 8; ++b) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(step + b * 16));
      const __m256 even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)), odd = _mm256_castsi256_ps(_mm256_and_si256(v, high));
      for (int r = 0; r < ROWS; ++r) acc[r][b] = _mm256_fmadd_ps(x1[r], odd, _mm256_fmadd_ps(x0[r], even, acc[r][b]));
    }
  }
  store8<ROWS, 8>(acc, u * UNIT, n, bias, out);
}

bool has_avx512f() {
  static const bool yes = !avx2_forced() && __builtin_cpu_supports("avx512f");
  return yes;
}

bool has_avx2_fma() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}

// x: float32 rows, bfloat16 pairs (AVX512-BF16) or bfloat16 widened to float32 (AVX2), as run_rows prepares it.
template <int ROWS>
void unit(bool bf16, const void* x, int64_t k, const at::Tensor& packed, int64_t u, int64_t n, const float* bias,
          at::Tensor& out) {
  if (bf16) {
    const auto* w = reinterpret_cast<const uint16_t*>(packed.const_data_ptr<at::BFloat16>()) + u * packed.stride(0);
    auto* y = out.mutable_data_ptr<at::BFloat16>();
    if (has_avx512_bf16()) {
      unit_bf16<ROWS>(static_cast<const uint32_t*>(x), (k + 1) / 2, w, u, n, bias, y);
    } else {
      unit_bf16_avx2<ROWS>(static_cast<const float*>(x), (k + 1) / 2, w, u, n, bias, y);
    }
  } else {
    const float* w = packed.const_data_ptr<float>() + u * packed.stride(0);
    auto* y = out.mutable_data_ptr<float>();
    if (has_avx512f()) {
      unit_f32<ROWS>(static_cast<const float*>(x), k, w, u, n, bias, y);
    } else {
      unit_f32_avx2<ROWS>(static_cast<const float*>(x), k, w, u, n, bias, y);
    }
  }
}

template <int ROWS>
void run_rows(const at::Tensor& x, const at::Tensor& packed, const float* bias, int64_t n, at::Tensor& out) {
  const int64_t k = x.size(1), units = packed.size(0);
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  // bfloat16 x as k/2 pairs (the last padded with a zero), each broadcast as one 32-bit value; without
  // AVX512-BF16 the same pairs widened to float32.
  const int64_t npairs = (k + 1) / 2;
  const bool widen = bf16 && !has_avx512_bf16();
  std::vector<uint32_t> pairs(bf16 ? ROWS * npairs * (widen ? 2 : 1) : 0, 0);
  if (bf16) {
    const auto* xp = reinterpret_cast<const uint16_t*>(x.const_data_ptr<at::BFloat16>());
    for (int r = 0; r < ROWS; ++r) {
      if (widen) {  // a bfloat16 is a float32's upper half
        for (int64_t i = 0; i < k; ++i) pairs[r * npairs * 2 + i] = static_cast<uint32_t>(xp[r * k + i]) << 16;
      } else {
        std::memcpy(pairs.data() + r * npairs, xp + r * k, k * 2);
      }
    }
  }
  const void* xs = bf16 ? static_cast<const void*>(pairs.data()) : static_cast<const void*>(x.const_data_ptr<float>());
  tessera_team::for_each_unit(static_cast<int>(at::get_num_threads()), units,
                              [&](int64_t u) { unit<ROWS>(bf16, xs, k, packed, u, n, bias, out); });
}

// The path gemv takes for the dtype on this CPU: avx512 (AVX512-BF16 for bfloat16), else avx2 (with FMA), or none.
std::string gemv_isa(c10::ScalarType dtype) {
  if (dtype != at::kFloat && dtype != at::kBFloat16) return "none";
  if (dtype == at::kBFloat16 ? has_avx512_bf16() : has_avx512f()) return "avx512";
  return has_avx2_fma() ? "avx2" : "none";
}

bool gemv_available(c10::ScalarType dtype) { return gemv_isa(dtype) != "none"; }

// weight [n, k] float32 or bfloat16 -> the packed blocks described above.
at::Tensor gemv_pack(const at::Tensor& weight) {
  TORCH_CHECK(weight.device().is_cpu() && weight.dim() == 2, "gemv_pack: weight [n, k] on the CPU");
  TORCH_CHECK(weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kBFloat16,
              "gemv_pack: a float32 or bfloat16 weight");
  const int64_t n = weight.size(0), k = weight.size(1), units = (n + UNIT - 1) / UNIT;
  if (weight.scalar_type() == at::kFloat) {  // [units, 64, k] -> [units, k, 64]
    auto w = at::zeros({units * UNIT, k}, weight.options());
    w.slice(0, 0, n).copy_(weight);
    return w.view({units, UNIT, k}).transpose(1, 2).contiguous();
  }
  const int64_t kp = (k + 1) / 2 * 2;  // [units, 64, k/2, 2] -> [units, k/2, 64, 2]
  auto w = at::zeros({units * UNIT, kp}, weight.options());
  w.slice(0, 0, n).slice(1, 0, k).copy_(weight);
  return w.view({units, UNIT, kp / 2, 2}).transpose(1, 2).contiguous();
}

// x [m, k] (m <= 4) in the packed weight's dtype; bias [n] float32 or none. Returns [m, n] in x's dtype.
at::Tensor gemv(const at::Tensor& x, const at::Tensor& packed, const c10::optional<at::Tensor>& bias, int64_t n) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.size(0) >= 1 && x.size(0) <= MAX_ROWS,
              "gemv: x [m, k] with 1 <= m <= ", MAX_ROWS, " on the CPU");
  TORCH_CHECK(x.scalar_type() == packed.scalar_type(), "gemv: x and the packed weight of one dtype");
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  TORCH_CHECK(bf16 || x.scalar_type() == at::kFloat, "gemv: float32 or bfloat16");
  TORCH_CHECK(gemv_available(x.scalar_type()), "gemv: this CPU lacks AVX2 with FMA");
  TORCH_CHECK(bf16 ? (packed.dim() == 4 && packed.size(1) == (x.size(1) + 1) / 2)
                   : (packed.dim() == 3 && packed.size(1) == x.size(1)),
              "gemv: a weight packed by gemv_pack with k = ", x.size(1));
  TORCH_CHECK(n > (packed.size(0) - 1) * UNIT && n <= packed.size(0) * UNIT, "gemv: n = ", n,
              " does not fit the packed blocks");
  const auto xc = x.contiguous();
  at::Tensor bc;
  const float* b = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == n, "gemv: a bias of n values");
    bc = bias->to(at::kFloat).contiguous();
    b = bc.const_data_ptr<float>();
  }
  auto out = at::empty({x.size(0), n}, x.options());
  switch (x.size(0)) {
    case 1: run_rows<1>(xc, packed, b, n, out); break;
    case 2: run_rows<2>(xc, packed, b, n, out); break;
    case 3: run_rows<3>(xc, packed, b, n, out); break;
    default: run_rows<4>(xc, packed, b, n, out); break;
  }
  return out;
}


// Many rows of bfloat16 where oneDNN cannot run bfloat16 (AVX2 + FMA CPUs, no AVX-512), on the same packed
// weight, so a bf16 model keeps one copy of its weights: PyTorch's own bf16 matmul ran a batch-64 decode step
// ~4x slower than float32 on oneDNN. Past a few rows the work is arithmetic, not the stream: each strip of 16
// outputs is widened once to float32 ([k][16], contiguous: the packed unit's 256-byte rows read as strips mapped
// onto a sixteenth of L1's sets) and multiplied against six rows of x at a time, 6 x 2 vectors of sums that each
// take one fused multiply-add per k (15 of the 16 registers).
constexpr int64_t STRIP = 16;     // outputs per strip: two vectors
constexpr int64_t TILE_ROWS = 6;  // rows of x per pass over a strip

// The strip of outputs [start, start + 16) of a packed unit (w: its first pair), as float32 [kp][16].
__attribute__((target("avx2"))) void widen_strip(const uint16_t* w, int64_t pairs, float* strip) {
  const __m256i high = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (int64_t p = 0; p < pairs; ++p) {
    const uint16_t* step = w + p * UNIT * 2;
    for (int half = 0; half < 2; ++half) {  // outputs 0-7, then 8-15: eight (k, k + 1) pairs a vector
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(step + half * 16));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(strip + 2 * p * STRIP + half * 8), _mm256_slli_epi32(v, 16));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(strip + (2 * p + 1) * STRIP + half * 8), _mm256_and_si256(v, high));
    }
  }
}

// The rows unrolled by a fold over R = 0..ROWS-1: with only constant indices the compiler keeps the sums in
// registers (indexed by loop counters, even unrolled ones, they stayed in memory: a store after every FMA).
template <int ROWS, size_t... R>
__attribute__((target("avx2,fma"))) void strip_rows_avx2(const float* x, int64_t kp, const float* strip, int64_t start,
                                                         int64_t n, const float* bias, at::BFloat16* out,
                                                         std::index_sequence<R...>) {
  __m256 acc[ROWS][2];
  ((acc[R][0] = acc[R][1] = _mm256_setzero_ps()), ...);
  for (int64_t i = 0; i < kp; ++i) {
    const __m256 w0 = _mm256_loadu_ps(strip + i * STRIP), w1 = _mm256_loadu_ps(strip + i * STRIP + 8);
    ((acc[R][0] = _mm256_fmadd_ps(_mm256_broadcast_ss(x + R * kp + i), w0, acc[R][0]),
      acc[R][1] = _mm256_fmadd_ps(_mm256_broadcast_ss(x + R * kp + i), w1, acc[R][1])), ...);
  }
  __m256 sums[ROWS][2];  // store8 indexes its sums by loop counters: acc itself would then live in memory
  ((sums[R][0] = acc[R][0], sums[R][1] = acc[R][1]), ...);
  store8<ROWS, 2>(sums, start, n, bias, out);
}

template <int ROWS>
void strip_rows(const float* x, int64_t kp, const float* strip, int64_t start, int64_t n, const float* bias,
                at::BFloat16* out) {
  strip_rows_avx2<ROWS>(x, kp, strip, start, n, bias, out, std::make_index_sequence<ROWS>{});
}

bool bf16_matmul_available() { return has_avx2_fma(); }

// x [m, k] bfloat16, any m; the packed bfloat16 weight; bias [n] float32 or none. Returns [m, n] bfloat16.
at::Tensor bf16_matmul(const at::Tensor& x, const at::Tensor& packed, const c10::optional<at::Tensor>& bias, int64_t n) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.scalar_type() == at::kBFloat16 &&
                  packed.scalar_type() == at::kBFloat16,
              "bf16_matmul: x [m, k] and the packed weight bfloat16 on the CPU");
  TORCH_CHECK(bf16_matmul_available(), "bf16_matmul: this CPU lacks AVX2 with FMA");
  TORCH_CHECK(packed.dim() == 4 && packed.size(1) == (x.size(1) + 1) / 2,
              "bf16_matmul: a weight packed by gemv_pack with k = ", x.size(1));
  TORCH_CHECK(n > (packed.size(0) - 1) * UNIT && n <= packed.size(0) * UNIT, "bf16_matmul: n = ", n,
              " does not fit the packed blocks");
  const int64_t m = x.size(0), k = x.size(1), kp = packed.size(1) * 2;
  auto x32 = at::zeros({m, kp}, x.options().dtype(at::kFloat));  // widened once; k padded to the pairs
  x32.slice(1, 0, k).copy_(x);
  at::Tensor bc;
  const float* b = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == n, "bf16_matmul: a bias of n values");
    bc = bias->to(at::kFloat).contiguous();
    b = bc.const_data_ptr<float>();
  }
  auto out = at::empty({m, n}, x.options());
  const float* xs = x32.const_data_ptr<float>();
  const auto* w = reinterpret_cast<const uint16_t*>(packed.const_data_ptr<at::BFloat16>());
  auto* y = out.mutable_data_ptr<at::BFloat16>();
  const int64_t strips = (n + STRIP - 1) / STRIP, per_unit = UNIT / STRIP;
  at::parallel_for(0, strips, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> strip(kp * STRIP);
    for (int64_t s = begin; s < end; ++s) {
      widen_strip(w + (s / per_unit) * packed.stride(0) + (s % per_unit) * STRIP * 2, kp / 2, strip.data());
      for (int64_t r = 0; r < m; r += TILE_ROWS) {
        const float* xr = xs + r * kp;
        at::BFloat16* yr = y + r * n;
        switch (std::min<int64_t>(m - r, TILE_ROWS)) {
          case 1: strip_rows<1>(xr, kp, strip.data(), s * STRIP, n, b, yr); break;
          case 2: strip_rows<2>(xr, kp, strip.data(), s * STRIP, n, b, yr); break;
          case 3: strip_rows<3>(xr, kp, strip.data(), s * STRIP, n, b, yr); break;
          case 4: strip_rows<4>(xr, kp, strip.data(), s * STRIP, n, b, yr); break;
          case 5: strip_rows<5>(xr, kp, strip.data(), s * STRIP, n, b, yr); break;
          default: strip_rows<6>(xr, kp, strip.data(), s * STRIP, n, b, yr); break;
        }
      }
    }
  });
  return out;
}


}  // namespace

TORCH_LIBRARY_FRAGMENT(tessera, m) {
  m.def("gemv_pack(Tensor weight) -> Tensor");
  m.def("gemv(Tensor x, Tensor packed, Tensor? bias, int n) -> Tensor");
  m.def("gemv_available(ScalarType dtype) -> bool", &gemv_available);
  m.def("gemv_isa(ScalarType dtype) -> str", &gemv_isa);
  m.impl("gemv_pack", c10::DispatchKey::CPU, TORCH_FN(gemv_pack));
  m.impl("gemv", c10::DispatchKey::CPU, TORCH_FN(gemv));
  m.def("bf16_matmul(Tensor x, Tensor packed, Tensor? bias, int n) -> Tensor");
  m.def("bf16_matmul_available() -> bool", &bf16_matmul_available);
  m.impl("bf16_matmul", c10::DispatchKey::CPU, TORCH_FN(bf16_matmul));
}
