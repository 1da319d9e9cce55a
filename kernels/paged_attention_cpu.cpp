// Paged decode attention for the CPU: one query token per request, keys and values read in place from the
// paged KV cache (no gather copy). Portable loops (all query heads that share a KV head served by one pass over
// its keys), and an AVX-512 path for float32/bfloat16 with head_dim 64 or 128 that walks the context block by
// block, every head within a block, and keeps the queries and outputs of two heads sharing a KV head in registers
// (64 decodes of 260 tokens, bf16, cache-resident: ~1.6 ms a layer -> ~0.5 ms on the 2-core EPYC). A bf16 cache on
// a CPU with AVX512-BF16 is multiplied with VDPBF16PS, as stored (cache-resident 0.38 -> 0.31 ms a layer, Zen 4).
//
// Fewer requests than threads: long contexts are split across the threads and the parts combined (split_contexts).
//
// The cache holds the query's dtype, or int8 (--kv-cache-dtype int8): each row of head_dim int8 values followed by
// its float32 scale (4 bytes), value = int8 * scale; the kernel takes the scale out of each score and each value
// weight, so rows are read as bytes and widened in registers.
//
// Built on first use by kernels/paged_attention_cpu.py and registered as torch.ops.tessera.paged_decode_attention.
// Reference: the PyTorch backend's gather + scaled_dot_product_attention (services/worker/attention/torch_backend.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "vec_exp.h"

namespace {

// The scale of a cache row of head_dim elements: 1 but for int8 rows, whose float32 scale follows the values.
template <typename C>
inline float row_scale(const C* row, int64_t head_dim) {
  if constexpr (std::is_same_v<C, int8_t>) {
    float scale;
    std::memcpy(&scale, row + head_dim, sizeof scale);
    return scale;
  } else {
    return 1.f;
  }
}

// One work item: request r, all its heads. Each token's keys (then values) for every KV head sit together in
// the cache, so one pass reads them as one contiguous row; the `group` query heads of a KV head share it.
// Scores for the whole context fit in a small buffer (heads x context floats): softmax runs in plain passes.
template <typename T, typename C>
void attend_request(T* out, const T* q, const C* keys, const C* values, const int32_t* block_table, int64_t seq_len,
                    int64_t window, int64_t heads, int64_t group, int64_t head_dim, int64_t block_size,
                    int64_t block_stride, int64_t slot_stride, int64_t head_stride, float scale,
                    std::vector<float>& scores, std::vector<float>& query, std::vector<float>& acc) {
  const int64_t first = window > 0 ? std::max<int64_t>(0, seq_len - window) : 0;
  const int64_t length = seq_len - first;
  scores.resize(heads * length);
  query.resize(heads * head_dim);
  acc.assign(heads * head_dim, 0.f);
  for (int64_t i = 0; i < heads * head_dim; ++i) query[i] = static_cast<float>(q[i]) * scale;

  for (int64_t t = 0; t < length; ++t) {
    const int64_t position = first + t;
    const C* k = keys + block_table[position / block_size] * block_stride + (position % block_size) * slot_stride;
    for (int64_t h = 0; h < heads; ++h) {
      const C* kh = k + (h / group) * head_stride;
      const float* qh = query.data() + h * head_dim;
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int64_t d = 0; d < head_dim; ++d) s += qh[d] * static_cast<float>(kh[d]);
      scores[h * length + t] = s * row_scale(kh, head_dim);
    }
  }
  for (int64_t h = 0; h < heads; ++h) {
    float* sh = scores.data() + h * length;
    const float m = *std::max_element(sh, sh + length);
    for (int64_t t = 0; t < length; ++t) sh[t] -= m;
    if (tessera_vec::has_avx512()) {
      tessera_vec::exp_avx512(sh, sh, length);
    } else {
      for (int64_t t = 0; t < length; ++t) sh[t] = std::exp(sh[t]);
    }
    float sum = 0.f;
    for (int64_t t = 0; t < length; ++t) sum += sh[t];
    const float inv = 1.f / sum;
    for (int64_t t = 0; t < length; ++t) sh[t] *= inv;
  }
  for (int64_t t = 0; t < length; ++t) {
    const int64_t position = first + t;
    const C* v = values + block_table[position / block_size] * block_stride + (position % block_size) * slot_stride;
    for (int64_t h = 0; h < heads; ++h) {
      const C* vh = v + (h / group) * head_stride;
      const float p = scores[h * length + t] * row_scale(vh, head_dim);
      float* ah = acc.data() + h * head_dim;
#pragma omp simd
      for (int64_t d = 0; d < head_dim; ++d) ah[d] += p * static_cast<float>(vh[d]);
    }
  }
  for (int64_t i = 0; i < heads * head_dim; ++i) out[i] = static_cast<T>(acc[i]);
}

// The same with AVX-512 for head_dim = 16 * NV (64 and 128: NV = 4, 8), float32 or bfloat16: query heads in
// pairs where they share a KV head, their queries (then outputs) in registers for the whole context, so the value
// sums never go through memory and each key and value row is converted once for the pair; the scores of 16
// (head, token) dots come out of one transposing reduction, not a horizontal sum each.
__attribute__((target("avx512f"))) inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
__attribute__((target("avx512f"))) inline __m512 load16(const c10::BFloat16* p) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}
__attribute__((target("avx512f"))) inline __m512 load16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

// A cache row of 16 * NV elements as NV float vectors, in the kernel's lane order: natural for float32 and int8
// rows; bfloat16 rows as the (even, odd) elements of each 32-element chunk, two vectors from one load by a shift
// and a mask (a bfloat16 is a float's high half) instead of a widening load per 16. A dot product does not care
// about the order as long as both sides share it: the queries are loaded the same way and the value sums are put
// back in order at the end (natural_index).
template <typename C, int NV>
__attribute__((target("avx512f"))) inline void load_row(const C* p, __m512* v) {
  if constexpr (std::is_same_v<C, c10::BFloat16>) {
    static_assert(NV % 2 == 0, "bfloat16 rows load 32 elements at a time");
    const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
    for (int j = 0; j < NV / 2; ++j) {
      const __m512i bits = _mm512_loadu_si512(reinterpret_cast<const void*>(p + 32 * j));
      v[2 * j] = _mm512_castsi512_ps(_mm512_slli_epi32(bits, 16));
      v[2 * j + 1] = _mm512_castsi512_ps(_mm512_and_si512(bits, high));
    }
  } else {
    for (int j = 0; j < NV; ++j) v[j] = load16(p + 16 * j);
  }
}

// The element of a row that lane `lane` of load_row<C>'s vectors holds (the vectors taken as one array).
template <typename C>
inline int64_t natural_index(int64_t lane) {
  if constexpr (std::is_same_v<C, c10::BFloat16>) {
    const int64_t chunk = lane / 32, within = lane % 32;  // within < 16: the even elements
    return 32 * chunk + (within < 16 ? 2 * within : 2 * (within - 16) + 1);
  } else {
    return lane;
  }
}

// Lane i of the result = the sum of v[i]'s 16 lanes: four rounds of pairwise shuffles and adds (45 instructions
// for 16 sums where 16 horizontal sums take ~150).
__attribute__((target("avx512f"))) inline __m512 sum_each16(const __m512* v) {
  __m512 a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i)  // each 128-bit lane: v[2i] and v[2i+1] folded to two partial sums each
    a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // each 128-bit lane: v[4i..4i+3]'s sums over that lane
    const __m512d x = _mm512_castps_pd(a[2 * i]), y = _mm512_castps_pd(a[2 * i + 1]);
    b[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  for (int i = 0; i < 2; ++i)  // 128-bit lanes added in pairs
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

// Scores of P query heads (1 or 2) that share a KV head, from head h, against the tokens [t0, t1) of one block
// (k: the block's row of that KV head for token 0), 16 / P tokens at a time: each key row is loaded and converted
// once for all P, and the chunk's 16 dots are summed together (sum_each16).
template <typename T, typename C, int NV, int P>
__attribute__((target("avx512f"))) inline void score_block(const T* q, const C* k, int64_t t0, int64_t t1,
                                                           int64_t slot_stride, float scale, float* s,
                                                           int64_t length) {
  constexpr int64_t D = 16 * NV;
  constexpr int TOKENS = 16 / P;
  __m512 qv[P][NV];
  for (int p = 0; p < P; ++p) {
    if constexpr (std::is_same_v<C, c10::BFloat16>) {
      load_row<C, NV>(q + p * D, qv[p]);  // the cache's lane order (C is T here)
    } else {
      for (int j = 0; j < NV; ++j) qv[p][j] = load16(q + p * D + 16 * j);
    }
    for (int j = 0; j < NV; ++j) qv[p][j] = _mm512_mul_ps(qv[p][j], _mm512_set1_ps(scale));
  }
  for (int64_t t = t0; t < t1; t += TOKENS) {
    const int count = static_cast<int>(std::min<int64_t>(TOKENS, t1 - t));
    __m512 dot[16];
    alignas(64) float rows[16];  // the int8 rows' scales, in dot order
    for (int i = 0; i < 16; ++i) dot[i] = _mm512_setzero_ps();
    for (int u = 0; u < TOKENS; ++u) {
      if (u >= count) break;
      const C* kt = k + (t + u) * slot_stride;
      __m512 kv[NV];
      load_row<C, NV>(kt, kv);
      for (int j = 0; j < NV; ++j)
        for (int p = 0; p < P; ++p) dot[p * TOKENS + u] = _mm512_fmadd_ps(qv[p][j], kv[j], dot[p * TOKENS + u]);
      if constexpr (std::is_same_v<C, int8_t>)
        for (int p = 0; p < P; ++p) rows[p * TOKENS + u] = row_scale(kt, D);
    }
    __m512 sums = sum_each16(dot);
    if constexpr (std::is_same_v<C, int8_t>) {
      for (int i = 0; i < 16; ++i)
        if (i % TOKENS >= count) rows[i] = 0.f;  // lanes of no token: never stored
      sums = _mm512_mul_ps(sums, _mm512_load_ps(rows));
    }
    const __mmask16 valid = static_cast<__mmask16>((1u << count) - 1);
    for (int p = 0; p < P; ++p) {  // head p's scores are lanes [p * TOKENS, p * TOKENS + count)
      const __m512 lanes = p == 0 ? sums : _mm512_castsi512_ps(_mm512_alignr_epi32(
                                                _mm512_castps_si512(sums), _mm512_castps_si512(sums), TOKENS));
      _mm512_mask_storeu_ps(s + p * length + t - t0, valid, lanes);
    }
  }
}

// acc (P heads x D floats, in memory, in load_row<C>'s lane order) += the tokens [t0, t1) of one block's values
// weighted by their probabilities s (P rows, `length` apart): the P accumulators stay in registers for the block.
template <typename C, int NV, int P>
__attribute__((target("avx512f"))) inline void accumulate_block(float* acc, const C* v, int64_t t0, int64_t t1,
                                                                int64_t slot_stride, const float* s,
                                                                int64_t length) {
  constexpr int64_t D = 16 * NV;
  __m512 a[P][NV];
  for (int p = 0; p < P; ++p)
    for (int j = 0; j < NV; ++j) a[p][j] = _mm512_loadu_ps(acc + p * D + 16 * j);
  for (int64_t t = t0; t < t1; ++t) {
    const C* vt = v + t * slot_stride;
    const float row = row_scale(vt, D);
    __m512 weight[P];
    for (int p = 0; p < P; ++p) weight[p] = _mm512_set1_ps(s[p * length + t - t0] * row);
    __m512 vv[NV];
    load_row<C, NV>(vt, vv);
    for (int j = 0; j < NV; ++j)
      for (int p = 0; p < P; ++p) a[p][j] = _mm512_fmadd_ps(weight[p], vv[j], a[p][j]);
  }
  for (int p = 0; p < P; ++p)
    for (int j = 0; j < NV; ++j) _mm512_storeu_ps(acc + p * D + 16 * j, a[p][j]);
}

// With AVX512-BF16 a bfloat16 cache is multiplied as it is stored: VDPBF16PS adds two exact bf16 products to each
// float32 lane, so a key row needs no widening and half the multiply-adds (the step was bound by these
// instructions, not by memory: 64 decodes of 270 tokens at ~40 GB/s from cache on two Zen 4 cores). Scores: the
// pairs are adjacent elements of q and k, the scale applied to each sum. Values: the pairs are two tokens, their
// rows interleaved element by element, weighted by their probabilities rounded to bf16 (as PyTorch's bf16 SDPA
// rounds them before its value product); sums stay float32.
inline bool has_avx512_bf16() {
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512bf16");
  return yes;
}

// A span of lines to prefetch, issued a few per token from inside the loops that compute, so that the prefetches
// interleave with the arithmetic instead of coming in a burst per head: on Intel a software prefetch holds one of
// the core's few L1 fill buffers until its line arrives, and a burst of them stalled the loads behind it (64
// decodes of 260 tokens, bf16, cold, 2-core AMX Xeon: 0.71-0.78 -> 0.58-0.66 ms a layer; 10 % slower when the
// blocks sit in L2).
struct Ahead {
  const char* next = nullptr;
  const char* end = nullptr;
  int per = 0;  // lines per call of step()
  inline void step() {
    for (int i = 0; i < per && next < end; ++i, next += 64) _mm_prefetch(next, _MM_HINT_T1);
  }
  inline void rest() {
    for (; next < end; next += 64) _mm_prefetch(next, _MM_HINT_T1);
  }
};

template <int NV, int P>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) inline void score_block_bf16(
    const c10::BFloat16* q, const c10::BFloat16* k, int64_t t0, int64_t t1, int64_t slot_stride, float scale,
    float* s, int64_t length, Ahead& ahead) {
  constexpr int64_t D = 16 * NV;
  constexpr int TOKENS = 16 / P;
  __m512i qv[P][NV / 2];
  for (int p = 0; p < P; ++p)
    for (int j = 0; j < NV / 2; ++j) qv[p][j] = _mm512_loadu_si512(reinterpret_cast<const void*>(q + p * D + 32 * j));
  const __m512 scales = _mm512_set1_ps(scale);
  for (int64_t t = t0; t < t1; t += TOKENS) {
    const int count = static_cast<int>(std::min<int64_t>(TOKENS, t1 - t));
    __m512 dot[16];
    for (int i = 0; i < 16; ++i) dot[i] = _mm512_setzero_ps();
    for (int u = 0; u < TOKENS; ++u) {
      if (u >= count) break;
      const c10::BFloat16* kt = k + (t + u) * slot_stride;
      ahead.step();
      for (int j = 0; j < NV / 2; ++j) {
        const __m512i kv = _mm512_loadu_si512(reinterpret_cast<const void*>(kt + 32 * j));
        for (int p = 0; p < P; ++p)
          dot[p * TOKENS + u] = _mm512_dpbf16_ps(dot[p * TOKENS + u], (__m512bh)qv[p][j], (__m512bh)kv);
      }
    }
    const __m512 sums = _mm512_mul_ps(sum_each16(dot), scales);
    const __mmask16 valid = static_cast<__mmask16>((1u << count) - 1);
    for (int p = 0; p < P; ++p) {
      const __m512 lanes = p == 0 ? sums : _mm512_castsi512_ps(_mm512_alignr_epi32(
                                                _mm512_castps_si512(sums), _mm512_castps_si512(sums), TOKENS));
      _mm512_mask_storeu_ps(s + p * length + t - t0, valid, lanes);
    }
  }
}

// acc (P heads x D floats, in value_lane order) += tokens [t0, t1) of one block's values weighted by w (P rows of
// bf16 probabilities, `length` apart), two tokens per product; an odd last token pairs with itself at weight 0.
template <int NV, int P>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) inline void accumulate_block_bf16(
    float* acc, const c10::BFloat16* v, int64_t t0, int64_t t1, int64_t slot_stride, const uint16_t* w,
    int64_t length, Ahead& ahead) {
  constexpr int64_t D = 16 * NV;
  __m512 a[P][NV];
  for (int p = 0; p < P; ++p)
    for (int j = 0; j < NV; ++j) a[p][j] = _mm512_loadu_ps(acc + p * D + 16 * j);
  for (int64_t t = t0; t < t1; t += 2) {
    const bool pair = t + 1 < t1;
    ahead.step();
    const c10::BFloat16* v0 = v + t * slot_stride;
    const c10::BFloat16* v1 = pair ? v0 + slot_stride : v0;
    __m512i weight[P];
    for (int p = 0; p < P; ++p) {
      const uint16_t* wp = w + p * length + t - t0;
      weight[p] = _mm512_set1_epi32(static_cast<int>(wp[0] | (pair ? static_cast<uint32_t>(wp[1]) << 16 : 0u)));
    }
    for (int c = 0; c < NV / 2; ++c) {
      const __m512i x0 = _mm512_loadu_si512(reinterpret_cast<const void*>(v0 + 32 * c));
      const __m512i x1 = _mm512_loadu_si512(reinterpret_cast<const void*>(v1 + 32 * c));
      const __m512i lo = _mm512_unpacklo_epi16(x0, x1), hi = _mm512_unpackhi_epi16(x0, x1);
      for (int p = 0; p < P; ++p) {
        a[p][2 * c] = _mm512_dpbf16_ps(a[p][2 * c], (__m512bh)weight[p], (__m512bh)lo);
        a[p][2 * c + 1] = _mm512_dpbf16_ps(a[p][2 * c + 1], (__m512bh)weight[p], (__m512bh)hi);
      }
    }
  }
  for (int p = 0; p < P; ++p)
    for (int j = 0; j < NV; ++j) _mm512_storeu_ps(acc + p * D + 16 * j, a[p][j]);
}

// The element of a row that lane `lane` of accumulate_block_bf16's vectors holds: vectors 2c and 2c + 1 are chunk
// c's unpacked low and high quarters of each 128-bit lane (elements 8L..8L+3 and 8L+4..8L+7 of 128-bit lane L).
inline int64_t value_lane(int64_t lane) {
  const int64_t vector = lane / 16, within = lane % 16;
  return 32 * (vector / 2) + 8 * (within / 4) + 4 * (vector % 2) + within % 4;
}

// s[i] (float32) rounded to bf16 into w, for i < count.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) inline void round_to_bf16(const float* s, uint16_t* w,
                                                                                   int64_t count) {
  int64_t i = 0;
  for (; i + 16 <= count; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(w + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(s + i)));
  if (i < count) {
    const __mmask16 tail = static_cast<__mmask16>((1u << (count - i)) - 1);
    _mm256_mask_storeu_epi16(w + i, tail, (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(tail, s + i)));
  }
}

// Asks for the rows of tokens [t0, t1) of a block (all KV heads) ahead of their use, into L2: with L1 hints the few
// L1 miss buffers held the scattered blocks' reads to 11-15 GB/s (64 decodes of 260 tokens, bf16, cold, 2-core Zen
// 4), with L2 hints 18-24 GB/s. The rows are one span (slot_stride apart; a hint on a row's padding never faults).
template <typename T>
inline void prefetch_rows(const T* block, int64_t t0, int64_t t1, int64_t slot_stride) {
  const char* p = reinterpret_cast<const char*>(block + t0 * slot_stride);
  const int64_t bytes = (t1 - t0) * slot_stride * static_cast<int64_t>(sizeof(T));
  for (int64_t i = 0; i < bytes; i += 64) _mm_prefetch(p + i, _MM_HINT_T1);
}

// s[i] = exp(s[i] - max(s)) for i < count, in vectors (a scalar max and sum are each a dependent chain of `count`
// operations); returns the sum, and the max in *max.
__attribute__((target("avx512f"))) inline float exp_less_max(float* s, int64_t count, float* max) {
  const __mmask16 tail = static_cast<__mmask16>((1u << (count % 16)) - 1);
  const int64_t whole = count - count % 16;
  __m512 m = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t i = 0; i < whole; i += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(s + i));
  if (tail) m = _mm512_mask_max_ps(m, tail, m, _mm512_maskz_loadu_ps(tail, s + whole));
  *max = _mm512_reduce_max_ps(m);
  const __m512 top = _mm512_set1_ps(*max);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t i = 0; i < whole; i += 16) {
    const __m512 e = tessera_vec::exp16(_mm512_sub_ps(_mm512_loadu_ps(s + i), top));
    _mm512_storeu_ps(s + i, e);
    sum = _mm512_add_ps(sum, e);
  }
  if (tail) {
    const __m512 e = tessera_vec::exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, s + whole), top));
    _mm512_mask_storeu_ps(s + whole, tail, e);
    sum = _mm512_mask_add_ps(sum, tail, sum, e);
  }
  return _mm512_reduce_add_ps(sum);
}

constexpr int64_t kBlocksAhead = 2;  // how far ahead blocks are prefetched (1-3 measured alike, 4-6 slower)

// One request with AVX-512, block by block: a block holds each of its tokens' keys (then values) for every KV
// head as one contiguous row, so visiting every head within a block reads it once, front to back, while a block
// further on is prefetched, a share of it per head visited so the prefetches spread out. (One KV head at a time
// over the whole context read each scattered block once per KV head, in strides: bf16 at a third of the memory's
// bandwidth; 48 requests x 280 tokens, cold: 1.0 -> 0.58 ms a layer on the 2-core Zen 5.) The prefetches run
// along all the blocks the thread reads: past the last key block into the first value blocks, and past the last
// value block into the next request's first key blocks (`next`), so neither seam waits on memory.
// DP: bf16 dot products (a bfloat16 cache on a CPU with AVX512-BF16). Every instantiation carries that target so
// that it can inline the DP helpers; the others contain no such instruction and run on any AVX-512 CPU.
struct Context {  // where a request's tokens [first, seq_len) live
  const int32_t* block_table;
  int64_t first, seq_len;
};

template <typename T, typename C, int NV, int P, bool DP>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void attend_blocks_avx512(
    T* out, const T* q, const C* keys, const C* values, Context context, Context next, int64_t heads,
    int64_t group, int64_t block_size, int64_t block_stride, int64_t slot_stride, int64_t head_stride, float scale,
    float* s, float* acc, float* sums, uint16_t* w, float* partial) {
  constexpr int64_t D = 16 * NV;
  const int32_t* block_table = context.block_table;
  const int64_t first = context.first, seq_len = context.seq_len;
  const int64_t length = seq_len - first;
  const int64_t b0 = first / block_size, b1 = (seq_len + block_size - 1) / block_size, blocks = b1 - b0;
  auto span = [&](const Context& c, int64_t b, int64_t& t0, int64_t& t1) {
    t0 = std::max(c.first, b * block_size) - b * block_size;
    t1 = std::min(c.seq_len, (b + 1) * block_size) - b * block_size;
  };
  // Read i of the thread's sequence (keys, values, the next request's keys): its block and token span, or null.
  auto read = [&](int64_t i, int64_t& t0, int64_t& t1) -> const C* {
    const Context* c = &context;
    const C* cache = i < blocks ? keys : values;
    int64_t b = b0 + (i < blocks ? i : i - blocks);
    if (i >= 2 * blocks) {
      if (next.block_table == nullptr) return nullptr;
      c = &next, cache = keys, b = next.first / block_size + i - 2 * blocks;
      if (b * block_size >= next.seq_len) return nullptr;
    }
    span(*c, b, t0, t1);
    return cache + c->block_table[b] * block_stride;
  };
  for (int64_t i = 0; i < kBlocksAhead; ++i) {  // usually already asked for by the previous request
    int64_t t0, t1;
    if (const C* block = read(i, t0, t1)) prefetch_rows(block, t0, t1, slot_stride);
  }
  for (int pass = 0; pass < 2; ++pass) {  // keys, then values
    const C* cache = pass == 0 ? keys : values;
    int64_t t0, t1;
    for (int64_t b = b0; b < b1; ++b) {
      int64_t n0 = 0, n1 = 0;
      const C* ahead = read(pass * blocks + b - b0 + kBlocksAhead, n0, n1);
      span(context, b, t0, t1);
      const C* block = cache + block_table[b] * block_stride;
      const int64_t offset = b * block_size + t0 - first;  // of the block's first token in the scores
      for (int64_t h = 0; h < heads; h += P) {
        const C* kv = block + (h / group) * head_stride;
        const int64_t a0 = n0 + (n1 - n0) * h / heads, a1 = n0 + (n1 - n0) * (h + P) / heads;  // tokens ahead
        if constexpr (DP) {
          Ahead lines;
          if (ahead != nullptr) {
            lines.next = reinterpret_cast<const char*>(ahead + a0 * slot_stride);
            lines.end = reinterpret_cast<const char*>(ahead + a1 * slot_stride);
            const int64_t count = (lines.end - lines.next + 63) / 64, steps = pass == 0 ? t1 - t0 : (t1 - t0 + 1) / 2;
            lines.per = static_cast<int>((count + steps - 1) / steps);
          }
          if (pass == 0)
            score_block_bf16<NV, P>(q + h * D, kv, t0, t1, slot_stride, scale, s + h * length + offset, length, lines);
          else
            accumulate_block_bf16<NV, P>(acc + h * D, kv, t0, t1, slot_stride, w + h * length + offset, length, lines);
          lines.rest();
        } else {
          if (ahead != nullptr) prefetch_rows(ahead, a0, a1, slot_stride);
          if (pass == 0)
            score_block<T, C, NV, P>(q + h * D, kv, t0, t1, slot_stride, scale, s + h * length + offset, length);
          else
            accumulate_block<C, NV, P>(acc + h * D, kv, t0, t1, slot_stride, s + h * length + offset, length);
        }
      }
    }
    if (pass == 1) break;
    for (int64_t h = 0; h < heads; ++h) {
      sums[h] = exp_less_max(s + h * length, length, sums + heads + h);  // normalized at the end
      if constexpr (DP) round_to_bf16(s + h * length, w + h * length, length);
    }
    std::fill(acc, acc + heads * D, 0.f);
  }
  alignas(64) float lane[D];
  for (int64_t h = 0; h < heads; ++h) {
    const __m512 inv = _mm512_set1_ps(1.f / sums[h]);
    for (int j = 0; j < NV; ++j) _mm512_store_ps(lane + 16 * j, _mm512_mul_ps(_mm512_loadu_ps(acc + h * D + 16 * j), inv));
    if (partial != nullptr) {  // a part of the context (split_contexts): float32 output, its max and its sum
      float* ph = partial + h * (D + 2);
      for (int64_t d = 0; d < D; ++d) ph[DP ? value_lane(d) : natural_index<C>(d)] = lane[d];
      ph[D] = sums[heads + h], ph[D + 1] = sums[h];
      continue;
    }
    for (int64_t d = 0; d < D; ++d) out[h * D + (DP ? value_lane(d) : natural_index<C>(d))] = static_cast<T>(lane[d]);
  }
}

template <typename T, typename C, int NV>
void attend_request_avx512(T* out, const T* q, const C* keys, const C* values, Context context, Context next,
                           int64_t heads, int64_t group, int64_t block_size, int64_t block_stride,
                           int64_t slot_stride, int64_t head_stride, float scale, std::vector<float>& scores,
                           std::vector<float>& acc, std::vector<uint16_t>& weights, float* partial) {
  const int64_t length = context.seq_len - context.first;
  scores.resize(heads * length);
  acc.resize(heads * (16 * NV + 2));  // the value sums, then each head's softmax denominator, then its max
  constexpr bool bf16 = std::is_same_v<C, c10::BFloat16>;
  const bool dp = bf16 && has_avx512_bf16();
  if (dp) weights.resize(heads * length);
  const auto call = dp ? (group % 2 == 0 ? attend_blocks_avx512<T, C, NV, 2, bf16> : attend_blocks_avx512<T, C, NV, 1, bf16>)
                       : (group % 2 == 0 ? attend_blocks_avx512<T, C, NV, 2, false> : attend_blocks_avx512<T, C, NV, 1, false>);
  call(out, q, keys, values, context, next, heads, group, block_size, block_stride, slot_stride, head_stride, scale,
       scores.data(), acc.data(), acc.data() + heads * 16 * NV, dp ? weights.data() : nullptr, partial);
}

// Whether attend_request_avx512 serves this query dtype and head size on this CPU.
template <typename T>
bool vector_path(int64_t head_dim) {
  return (std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>) && (head_dim == 64 || head_dim == 128) &&
         tessera_vec::has_avx512();
}

// Fewer requests than threads (one stream, a few): each context is split into parts of at least MIN_PART tokens,
// one per thread, every part attended on its own (its own max and sum: flash-decoding's split of the keys) and the
// parts combined, out = sum_p l_p e^(m_p - m) o_p / sum_p l_p e^(m_p - m), so that one long context is read by every
// thread rather than by one (a 1,900-token context took 1.5 ms of a 3.4 ms bf16 token on one thread, 2-core Xeon).
// Returns false where no context is long enough to split.
constexpr int64_t MIN_PART = 256;

template <typename T, typename C>
bool split_contexts(const at::Tensor& q, const C* k_ptr, const C* v_ptr, const int32_t* table_ptr,
                    const int32_t* len_ptr, int64_t max_blocks, int64_t window, int64_t heads, int64_t group,
                    int64_t head_dim, int64_t block_size, int64_t block_stride, int64_t slot_stride,
                    int64_t head_stride, float scale, at::Tensor& out) {
  const int64_t n = q.size(0), threads = at::get_num_threads(), per_request = std::max<int64_t>(1, threads / n);
  const auto length_of = [&](int64_t r) { return window > 0 ? std::min<int64_t>(len_ptr[r], window) : len_ptr[r]; };
  bool any = false;  // checked first: this runs for every layer of every step of one stream
  if (per_request < 2) return false;
  for (int64_t r = 0; r < n && !any; ++r) any = length_of(r) >= 2 * MIN_PART;
  if (!any) return false;
  struct Part { int64_t request, first, end; };
  std::vector<Part> parts;
  std::vector<int64_t> starts(n + 1);  // request r's parts: [starts[r], starts[r + 1])
  for (int64_t r = 0; r < n; ++r) {
    const int64_t length = length_of(r), first = len_ptr[r] - length;
    const int64_t count = std::clamp<int64_t>(length / MIN_PART, 1, per_request);
    starts[r] = static_cast<int64_t>(parts.size());
    for (int64_t i = 0; i < count; ++i)
      parts.push_back({r, first + length * i / count, first + length * (i + 1) / count});
  }
  starts[n] = static_cast<int64_t>(parts.size());
  const int64_t stride = head_dim + 2;  // a part's output for one head, then its max and its sum
  std::vector<float> partial(parts.size() * heads * stride);
  const T* q_ptr = q.const_data_ptr<T>();
  at::parallel_for(0, static_cast<int64_t>(parts.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, acc;
    std::vector<uint16_t> weights;
    for (int64_t i = begin; i < end; ++i) {
      const Part& part = parts[i];
      const Context context{table_ptr + part.request * max_blocks, part.first, part.end};
      const auto call = head_dim == 64 ? attend_request_avx512<T, C, 4> : attend_request_avx512<T, C, 8>;
      call(nullptr, q_ptr + part.request * q.stride(0), k_ptr, v_ptr, context, Context{nullptr, 0, 0}, heads, group,
           block_size, block_stride, slot_stride, head_stride, scale, scores, acc, weights,
           partial.data() + i * heads * stride);
    }
  });
  T* out_ptr = out.mutable_data_ptr<T>();
  std::vector<float> sum(head_dim);
  for (int64_t r = 0; r < n; ++r)
    for (int64_t h = 0; h < heads; ++h) {
      float top = partial[(starts[r] * heads + h) * stride + head_dim];  // (no infinities under -ffast-math)
      for (int64_t i = starts[r] + 1; i < starts[r + 1]; ++i)
        top = std::max(top, partial[(i * heads + h) * stride + head_dim]);
      std::fill(sum.begin(), sum.end(), 0.f);
      float total = 0.f;
      for (int64_t i = starts[r]; i < starts[r + 1]; ++i) {
        const float* ph = partial.data() + (i * heads + h) * stride;
        const float weight = ph[head_dim + 1] * std::exp(ph[head_dim] - top);
        total += weight;
        for (int64_t d = 0; d < head_dim; ++d) sum[d] += weight * ph[d];
      }
      for (int64_t d = 0; d < head_dim; ++d) out_ptr[(r * heads + h) * head_dim + d] = static_cast<T>(sum[d] / total);
    }
  return true;
}

// Every request against caches of element type C (the queries' T, or int8_t).
template <typename T, typename C>
void attend_all(const at::Tensor& q, const at::Tensor& key_cache, const at::Tensor& value_cache,
                const at::Tensor& tables, const at::Tensor& lens, float scale, int64_t window, at::Tensor& out) {
  const int64_t n = q.size(0), heads = q.size(1), head_dim = q.size(2);
  const int64_t block_size = key_cache.size(1), group = heads / key_cache.size(2), max_blocks = tables.size(1);
  const T* q_ptr = q.const_data_ptr<T>();
  const C* k_ptr = static_cast<const C*>(key_cache.const_data_ptr());
  const C* v_ptr = static_cast<const C*>(value_cache.const_data_ptr());
  T* out_ptr = out.mutable_data_ptr<T>();
  const int32_t* table_ptr = tables.const_data_ptr<int32_t>();
  const int32_t* len_ptr = lens.const_data_ptr<int32_t>();
  const int64_t block_stride = key_cache.stride(0), slot_stride = key_cache.stride(1), head_stride = key_cache.stride(2);
  const int64_t q_stride = q.stride(0);  // tokens may sit apart (a view of the qkv projection)
  // Requests arrive sorted by context length, so contiguous ranges would load the threads unevenly: each
  // lane takes every lanes-th request instead.
  const int64_t lanes = std::min<int64_t>(at::get_num_threads(), n);
  const bool vector = vector_path<T>(head_dim);
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>) {
    if (vector && n < at::get_num_threads() && !at::in_parallel_region()) {
      if (split_contexts<T, C>(q, k_ptr, v_ptr, table_ptr, len_ptr, max_blocks, window, heads, group, head_dim,
                               block_size, block_stride, slot_stride, head_stride, scale, out))
        return;
    }
  }
  at::parallel_for(0, lanes, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, query, acc;  // per thread, reused across its requests
    std::vector<uint16_t> weights;
    for (int64_t lane = begin; lane < end; ++lane) {
      for (int64_t r = lane; r < n; r += lanes) {
        const int64_t offset = r * heads * head_dim, q_offset = r * q_stride;
        if constexpr (std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>) {
          if (vector) {
            auto context = [&](int64_t i) {
              return Context{table_ptr + i * max_blocks, window > 0 ? std::max<int64_t>(0, len_ptr[i] - window) : 0,
                             len_ptr[i]};
            };
            const Context next = r + lanes < n ? context(r + lanes) : Context{nullptr, 0, 0};
            const auto call = head_dim == 64 ? attend_request_avx512<T, C, 4> : attend_request_avx512<T, C, 8>;
            call(out_ptr + offset, q_ptr + q_offset, k_ptr, v_ptr, context(r), next, heads, group, block_size,
                 block_stride, slot_stride, head_stride, scale, scores, acc, weights, nullptr);
            continue;
          }
        }
        attend_request<T, C>(out_ptr + offset, q_ptr + q_offset, k_ptr, v_ptr, table_ptr + r * max_blocks, len_ptr[r],
                             window, heads, group, head_dim, block_size, block_stride, slot_stride, head_stride, scale,
                             scores, query, acc);
      }
    }
  });
}

// q [n, heads, head_dim]; key_cache / value_cache [num_blocks, block_size, kv_heads, head_dim] in q's dtype, or
// int8 [..., head_dim + 4] (each row's float32 scale after its values); block_tables [n, max_blocks] int32;
// seq_lens [n] int32 (the context including the query token); window: sliding window in tokens, 0 for none.
// Returns [n, heads, head_dim].
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& key_cache, const at::Tensor& value_cache,
                                  const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale,
                                  int64_t window) {
  TORCH_CHECK(q.device().is_cpu() && key_cache.device().is_cpu(), "paged_decode_attention: CPU tensors only");
  TORCH_CHECK(q.dim() == 3 && key_cache.dim() == 4 && value_cache.sizes() == key_cache.sizes(),
              "paged_decode_attention: q [n, heads, d] and caches [blocks, block_size, kv_heads, d]");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && seq_lens.scalar_type() == at::kInt,
              "paged_decode_attention: block_tables and seq_lens must be int32");
  TORCH_CHECK(key_cache.stride(3) == 1 && value_cache.stride(3) == 1 && key_cache.strides() == value_cache.strides(),
              "paged_decode_attention: the head dimension of the caches must be contiguous");
  const bool int8 = key_cache.scalar_type() == at::kChar;
  TORCH_CHECK(key_cache.scalar_type() == value_cache.scalar_type() && (int8 || q.scalar_type() == key_cache.scalar_type()),
              "paged_decode_attention: the caches must hold q's dtype, or int8");
  // Each token's heads must be contiguous, the tokens may be apart: q is usually a view of the qkv projection.
  const auto qc = q.stride(2) == 1 && q.stride(1) == q.size(2) ? q : q.contiguous();
  const auto tables = block_tables.contiguous();
  const auto lens = seq_lens.contiguous();
  const int64_t n = qc.size(0), heads = qc.size(1), head_dim = qc.size(2), kv_heads = key_cache.size(2);
  TORCH_CHECK(heads % kv_heads == 0 && key_cache.size(3) == head_dim + (int8 ? 4 : 0) && tables.size(0) == n &&
                  lens.size(0) == n,
              "paged_decode_attention: inconsistent shapes");
  TORCH_CHECK(!int8 || key_cache.stride(2) % 4 == 0, "paged_decode_attention: int8 rows must keep their scales aligned");
  auto out = at::empty({n, heads, head_dim}, qc.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qc.scalar_type(), "paged_decode_attention", [&] {
    if (int8)
      attend_all<scalar_t, int8_t>(qc, key_cache, value_cache, tables, lens, static_cast<float>(scale), window, out);
    else
      attend_all<scalar_t, scalar_t>(qc, key_cache, value_cache, tables, lens, static_cast<float>(scale), window, out);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tessera, m) {  // a fragment: int8_linear_cpu.cpp adds to the namespace
  m.def("paged_decode_attention(Tensor q, Tensor key_cache, Tensor value_cache, Tensor block_tables, "
        "Tensor seq_lens, float scale, int window) -> Tensor");
  m.impl("paged_decode_attention", c10::DispatchKey::CPU, TORCH_FN(paged_decode_attention));
}
