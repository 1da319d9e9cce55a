// Causal attention of a prompt chunk over the paged KV cache on the CPU, float32 or bfloat16: the queries
// [q_len, heads, D] of one request at positions seq_len - q_len .. seq_len - 1 against the keys and values of
// positions 0 .. seq_len - 1 read from its blocks (the chunk's own are written there first), an optional sliding
// window. PyTorch's SDPA for the CPU ran the bench model's bf16 prompts at ~70 GFLOP/s on two Zen 4 cores (~35
// on one, a sixth of what its bf16 dot products do); it also needs the context gathered into a copy.
//
// Flash-attention style, per KV head: its keys repacked once into [16-token step][word][16 tokens] and its
// values into rows of D words, bf16 as what VDPBF16PS multiplies (two products a lane: key pairs, value rows
// interleaved by token pair), float32 for fused multiply-adds; then every query row of the heads sharing it, 16
// positions at a time, walks the context 16 keys a step with an online softmax, its output in registers. Scores
// and sums in float32; bf16 probabilities are rounded to bf16 for the value products, as PyTorch's bf16 SDPA
// does; an int8 cache's rows are dequantized as they are repacked. Registered as
// torch.ops.tessera.{paged_prefill_attention, prompt_attention}, for CPUs with AVX512-BF16 (Zen 4/5, Sapphire
// Rapids on); other CPUs and head sizes (32, 64 and 128 run here) keep the PyTorch path
// (services/worker/attention/torch_backend.py), which is also the reference.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "vec_exp.h"

namespace {

constexpr int64_t STEP = 16;  // keys per step: one vector of scores
constexpr int64_t QBLOCK = 16;  // query positions per pass over the context

bool prefill_available() {
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512bf16");
  return yes;
}

// Where a token's row of one KV head sits in a cache plane [blocks, block_size, kv_heads, row] of C: T itself,
// or int8 (rows of head_dim values and their float32 scale: attention/int8_kv.py).
template <typename C>
struct Plane {
  const C* base;
  const int32_t* table;
  int64_t block_size, block_stride, slot_stride, head_stride;
  const C* row(int64_t token, int64_t head) const {
    return base + table[token / block_size] * block_stride + (token % block_size) * slot_stride + head * head_stride;
  }
};

// A cached row as D values of T: copied, or an int8 row dequantized as int8_kv.dequantize does (value * scale in
// float32, then rounded to T).
template <typename T, typename C, int D>
inline void load_row(const C* row, T* out) {
  if constexpr (std::is_same_v<C, int8_t>) {
    float scale;
    std::memcpy(&scale, row + D, sizeof scale);
    for (int d = 0; d < D; ++d) out[d] = static_cast<T>(static_cast<float>(row[d]) * scale);
  } else {
    std::memcpy(out, row, D * sizeof(T));
  }
}

// 32-bit words of a key row: bf16 pairs (what one dot-product lane takes) or floats.
template <typename T, int D>
constexpr int key_words() { return std::is_same_v<T, float> ? D : D / 2; }
// Rows of D words a step of values takes: bf16 token pairs, or float tokens.
template <typename T>
constexpr int value_rows() { return std::is_same_v<T, float> ? STEP : STEP / 2; }

// Keys [first, end) of one head -> kp[step][word][16 tokens], zeros past `end`; values -> vp[step][row][D]:
// float32 rows as they are, bf16 by token pair (token 2u in each word's low half, 2u + 1 in its high half).
template <typename T, typename C, int D>
void repack(const Plane<C>& keys, const Plane<C>& values, int64_t head, int64_t first, int64_t end, uint32_t* kp,
            uint32_t* vp) {
  constexpr int KW = key_words<T, D>(), VR = value_rows<T>();
  const int64_t steps = (end - first + STEP - 1) / STEP;
  std::memset(kp, 0, steps * KW * STEP * sizeof(uint32_t));
  std::memset(vp, 0, steps * VR * D * sizeof(uint32_t));
  for (int64_t t = first; t < end; ++t) {
    const int64_t i = t - first, step = i / STEP, lane = i % STEP;
    T row[D];
    load_row<T, C, D>(keys.row(t, head), row);
    uint32_t words[KW];
    std::memcpy(words, row, sizeof words);
    uint32_t* k = kp + step * KW * STEP + lane;
    for (int w = 0; w < KW; ++w) k[w * STEP] = words[w];
    load_row<T, C, D>(values.row(t, head), row);
    if constexpr (std::is_same_v<T, float>) {
      std::memcpy(vp + i * D, row, D * sizeof(float));
    } else {
      uint32_t* out = vp + (i / 2) * D;
      const int shift = (i % 2) * 16;
      const auto* bits = reinterpret_cast<const uint16_t*>(row);
      for (int d = 0; d < D; ++d) out[d] |= static_cast<uint32_t>(bits[d]) << shift;
    }
  }
}

// R query rows (q[r]: a row's key_words words) against one step of keys: s[r] = q_r . k for its 16 tokens.
template <typename T, int D, int R>
__attribute__((target("avx512f,avx512bf16,avx512bw"))) inline void scores_step(const uint32_t* const* q,
                                                                                const uint32_t* kp, __m512* s) {
  constexpr int KW = key_words<T, D>();
  __m512 even[R], odd[R];  // two chains per row: the dot products' latency, not their throughput, would bind
  for (int r = 0; r < R; ++r) even[r] = odd[r] = _mm512_setzero_ps();
  for (int w = 0; w < KW; w += 2) {
    const __m512i k0 = _mm512_loadu_si512(kp + w * STEP), k1 = _mm512_loadu_si512(kp + (w + 1) * STEP);
    for (int r = 0; r < R; ++r) {
      const __m512i q0 = _mm512_set1_epi32(static_cast<int>(q[r][w])), q1 = _mm512_set1_epi32(static_cast<int>(q[r][w + 1]));
      if constexpr (std::is_same_v<T, float>) {
        even[r] = _mm512_fmadd_ps(_mm512_castsi512_ps(q0), _mm512_castsi512_ps(k0), even[r]);
        odd[r] = _mm512_fmadd_ps(_mm512_castsi512_ps(q1), _mm512_castsi512_ps(k1), odd[r]);
      } else {
        even[r] = _mm512_dpbf16_ps(even[r], (__m512bh)q0, (__m512bh)k0);
        odd[r] = _mm512_dpbf16_ps(odd[r], (__m512bh)q1, (__m512bh)k1);
      }
    }
  }
  for (int r = 0; r < R; ++r) s[r] = _mm512_add_ps(even[r], odd[r]);
}

// Query rows [i0, i1) (positions base + i) of the heads h0 .. h0 + group - 1 that share a KV head, over its
// repacked context from `first`: R rows at a time, each walking the context with its running max, sum and output
// in registers; out rows written in T.
template <typename T, int D>
__attribute__((target("avx512f,avx512bf16,avx512bw"))) void attend_block(
    const T* q, int64_t q_stride, T* out, int64_t out_stride, int64_t h0, int64_t group,
    int64_t i0, int64_t i1, int64_t base, int64_t first, int64_t window, float scale, const uint32_t* kp,
    const uint32_t* vp) {
  constexpr int R = D <= 64 ? 4 : 2;  // rows at once: their accumulators stay in registers
  const int64_t rows = (i1 - i0) * group;
  const int64_t last = base + i1 - 1;  // the latest position: the context this block needs ends there
  const int64_t lo = window > 0 ? std::max(first, base + i0 - window + 1) : first;
  const int64_t step_lo = (lo - first) / STEP, step_hi = (last - first) / STEP;
  for (int64_t r0 = 0; r0 < rows; r0 += R) {
    const uint32_t* qr[R];
    int64_t pos[R];
    for (int r = 0; r < R; ++r) {
      const int64_t row = std::min(r0 + r, rows - 1);  // a short last group repeats its last row (not stored)
      const int64_t i = i0 + row / group, h = h0 + row % group;
      qr[r] = reinterpret_cast<const uint32_t*>(q + i * q_stride + h * D);
      pos[r] = base + i;
    }
    __m512 o[R][D / 16];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < D / 16; ++c) o[r][c] = _mm512_setzero_ps();
    float m[R], l[R];
    for (int r = 0; r < R; ++r) m[r] = -std::numeric_limits<float>::infinity(), l[r] = 0.f;
    for (int64_t step = step_lo; step <= step_hi; ++step) {
      __m512 s[R];
      scores_step<T, D, R>(qr, kp + step * key_words<T, D>() * STEP, s);
      const __m512i tokens = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(first + step * STEP)),
                                              _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
      alignas(64) uint32_t probs[R][value_rows<T>()];  // float32, or bf16 pairs
      for (int r = 0; r < R; ++r) {
        // Causal (a key at or before the row's position) and within the window.
        __mmask16 valid = _mm512_cmple_epi32_mask(tokens, _mm512_set1_epi32(static_cast<int>(pos[r])));
        if (window > 0)
          valid &= _mm512_cmpgt_epi32_mask(tokens, _mm512_set1_epi32(static_cast<int>(pos[r] - window)));
        const __m512 x = _mm512_mul_ps(s[r], _mm512_set1_ps(scale));
        const float step_max = valid ? _mm512_mask_reduce_max_ps(valid, x) : -std::numeric_limits<float>::infinity();
        const float top = std::max(m[r], step_max);
        if (top == -std::numeric_limits<float>::infinity()) {  // nothing visible yet for this row
          std::memset(probs[r], 0, sizeof probs[r]);
          continue;
        }
        const __m512 p = _mm512_maskz_mov_ps(valid, tessera_vec::exp16(_mm512_sub_ps(x, _mm512_set1_ps(top))));
        const float correction = m[r] == -std::numeric_limits<float>::infinity() ? 0.f : std::exp(m[r] - top);
        l[r] = l[r] * correction + _mm512_reduce_add_ps(p);
        m[r] = top;
        for (int c = 0; c < D / 16; ++c) o[r][c] = _mm512_mul_ps(o[r][c], _mm512_set1_ps(correction));
        if constexpr (std::is_same_v<T, float>)
          _mm512_store_ps(reinterpret_cast<float*>(probs[r]), p);
        else  // rounded to bf16 for the value products, as PyTorch's bf16 SDPA does; two tokens a word
          _mm256_store_si256(reinterpret_cast<__m256i*>(probs[r]), (__m256i)_mm512_cvtneps_pbh(p));
      }
      const uint32_t* v = vp + step * value_rows<T>() * D;
      for (int u = 0; u < value_rows<T>(); ++u) {
        __m512i vv[D / 16];
        for (int c = 0; c < D / 16; ++c) vv[c] = _mm512_loadu_si512(v + u * D + c * 16);
        for (int r = 0; r < R; ++r) {
          const __m512i w = _mm512_set1_epi32(static_cast<int>(probs[r][u]));
          for (int c = 0; c < D / 16; ++c) {
            if constexpr (std::is_same_v<T, float>)
              o[r][c] = _mm512_fmadd_ps(_mm512_castsi512_ps(w), _mm512_castsi512_ps(vv[c]), o[r][c]);
            else
              o[r][c] = _mm512_dpbf16_ps(o[r][c], (__m512bh)w, (__m512bh)vv[c]);
          }
        }
      }
    }
    for (int r = 0; r < R && r0 + r < rows; ++r) {
      const int64_t row = r0 + r, i = i0 + row / group, h = h0 + row % group;
      const __m512 inv = _mm512_set1_ps(1.f / l[r]);
      T* dst = out + i * out_stride + h * D;
      for (int c = 0; c < D / 16; ++c) {
        const __m512 value = _mm512_mul_ps(o[r][c], inv);
        if constexpr (std::is_same_v<T, float>)
          _mm512_storeu_ps(dst + c * 16, value);
        else
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + c * 16), (__m256i)_mm512_cvtneps_pbh(value));
      }
    }
  }
}

template <typename T, typename C, int D>
void attend_prompt(const at::Tensor& q, const Plane<C>& keys, const Plane<C>& values, int64_t seq_len,
                   int64_t kv_heads, int64_t window, float scale, at::Tensor& out) {
  const int64_t q_len = q.size(0), heads = q.size(1), group = heads / kv_heads, base = seq_len - q_len;
  const int64_t first = window > 0 ? std::max<int64_t>(0, base - window + 1) : 0;  // the earliest key anyone sees
  const int64_t blocks = (q_len + QBLOCK - 1) / QBLOCK;
  // Work items: a KV head and every chunks-th query block of it (interleaved: later blocks see more keys). Each
  // item repacks the context its blocks need, so more chunks than threads only where heads are few.
  const int64_t threads = at::get_num_threads();
  const int64_t chunks = std::min(blocks, std::max<int64_t>(1, (2 * threads + kv_heads - 1) / kv_heads));
  const T* qp = q.const_data_ptr<T>();
  T* op = out.mutable_data_ptr<T>();
  at::parallel_for(0, kv_heads * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> kp, vp;  // per thread, reused across its items
    for (int64_t item = begin; item < end; ++item) {
      const int64_t g = item / chunks, chunk = item % chunks;
      int64_t last_block = chunk;
      for (int64_t b = chunk; b < blocks; b += chunks) last_block = b;
      const int64_t context_end = base + std::min(q_len, (last_block + 1) * QBLOCK);
      const int64_t steps = (context_end - first + STEP - 1) / STEP;
      kp.resize(steps * key_words<T, D>() * STEP);
      vp.resize(steps * value_rows<T>() * D);
      repack<T, C, D>(keys, values, g, first, context_end, kp.data(), vp.data());
      for (int64_t b = chunk; b < blocks; b += chunks)
        attend_block<T, D>(qp, q.stride(0), op, out.stride(0), g * group, group, b * QBLOCK,
                           std::min(q_len, (b + 1) * QBLOCK), base, first, window, scale, kp.data(), vp.data());
    }
  });
}

// kv_heads from the cache's shape [blocks, block_size, kv_heads, row], the element type C from its dtype.
template <typename T, typename C>
void attend_prompt_of(const at::Tensor& q, const at::Tensor& key_cache, const at::Tensor& value_cache,
                      const int32_t* table, int64_t seq_len, int64_t window, float scale, at::Tensor& out) {
  auto plane = [&](const at::Tensor& cache) {
    return Plane<C>{static_cast<const C*>(cache.const_data_ptr()), table, cache.size(1), cache.stride(0),
                    cache.stride(1), cache.stride(2)};
  };
  const int64_t D = q.size(2);
  const auto call = D == 32 ? attend_prompt<T, C, 32> : D == 64 ? attend_prompt<T, C, 64> : attend_prompt<T, C, 128>;
  call(q, plane(key_cache), plane(value_cache), seq_len, key_cache.size(2), window, scale, out);
}

// The checks both entry points make of the CPU and of q; returns q with each row's heads contiguous (rows may
// stay strided: a view of the qkv projection).
at::Tensor checked_queries(const at::Tensor& q, const char* op) {
  TORCH_CHECK(prefill_available(), op, ": this CPU lacks AVX512-BF16");
  TORCH_CHECK(q.device().is_cpu() && q.dim() == 3 &&
                  (q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kFloat),
              op, ": float32 or bfloat16 q [q_len, heads, head_dim] on the CPU");
  const int64_t D = q.size(2);
  TORCH_CHECK(D == 32 || D == 64 || D == 128, op, ": head_dim 32, 64 or 128, not ", D);
  return q.stride(2) == 1 && q.stride(1) == D ? q : q.contiguous();
}

// q [q_len, heads, D] float32 or bfloat16 (rows may be strided, each row's heads contiguous); key_cache /
// value_cache [blocks, block_size, kv_heads, D] of q's dtype, or int8 [..., D + 4] (attention/int8_kv.py),
// holding the context, this chunk's rows included; block_table [>= ceil(seq_len / block_size)] int32; seq_len:
// the context including the chunk; window: 0 for none. D 32, 64 or 128. Returns [q_len, heads, D].
at::Tensor paged_prefill_attention(const at::Tensor& q, const at::Tensor& key_cache, const at::Tensor& value_cache,
                                   const at::Tensor& block_table, int64_t seq_len, double scale, int64_t window) {
  const auto qc = checked_queries(q, "paged_prefill_attention");
  const bool bf16 = q.scalar_type() == at::kBFloat16;
  const int64_t q_len = q.size(0), heads = q.size(1), D = q.size(2);
  const bool int8 = key_cache.scalar_type() == at::kChar;
  TORCH_CHECK(key_cache.dim() == 4 && value_cache.sizes() == key_cache.sizes() &&
                  key_cache.strides() == value_cache.strides() &&
                  (int8 || key_cache.scalar_type() == q.scalar_type()) &&
                  value_cache.scalar_type() == key_cache.scalar_type() && key_cache.size(3) == D + (int8 ? 4 : 0) &&
                  key_cache.stride(3) == 1 && key_cache.stride(2) == key_cache.size(3),
              "paged_prefill_attention: caches [blocks, block_size, kv_heads, head_dim] of q's dtype, or int8 "
              "[..., head_dim + 4], rows contiguous");
  const int64_t kv_heads = key_cache.size(2), block_size = key_cache.size(1);
  TORCH_CHECK(heads % kv_heads == 0, "paged_prefill_attention: heads a multiple of the KV heads");
  TORCH_CHECK(q_len >= 1 && seq_len >= q_len, "paged_prefill_attention: 1 <= q_len <= seq_len");
  const auto table = block_table.contiguous();
  TORCH_CHECK(table.scalar_type() == at::kInt && table.dim() == 1 &&
                  table.numel() >= (seq_len + block_size - 1) / block_size,
              "paged_prefill_attention: an int32 block table covering seq_len");
  const int32_t* tp = table.const_data_ptr<int32_t>();
  for (int64_t b = 0; b < (seq_len + block_size - 1) / block_size; ++b)
    TORCH_CHECK(tp[b] >= 0 && tp[b] < key_cache.size(0), "paged_prefill_attention: block ", tp[b], " outside the cache");
  auto out = at::empty({q_len, heads, D}, q.options());
  const float s = static_cast<float>(scale);
  if (bf16 && int8)
    attend_prompt_of<c10::BFloat16, int8_t>(qc, key_cache, value_cache, tp, seq_len, window, s, out);
  else if (bf16)
    attend_prompt_of<c10::BFloat16, c10::BFloat16>(qc, key_cache, value_cache, tp, seq_len, window, s, out);
  else if (int8)
    attend_prompt_of<float, int8_t>(qc, key_cache, value_cache, tp, seq_len, window, s, out);
  else
    attend_prompt_of<float, float>(qc, key_cache, value_cache, tp, seq_len, window, s, out);
  return out;
}

// A whole prompt against its own keys and values as computed (k, v [q_len, kv_heads, D] of q's dtype, rows
// may be strided, each row's heads contiguous), not as cached: what an int8 cache would round. The same kernel,
// the tensors read as one block.
at::Tensor prompt_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                            int64_t window) {
  const auto qc = checked_queries(q, "prompt_attention");
  const bool bf16 = q.scalar_type() == at::kBFloat16;
  const int64_t q_len = q.size(0), heads = q.size(1), D = q.size(2);
  TORCH_CHECK(k.dim() == 3 && v.sizes() == k.sizes() && k.size(0) == q_len && k.size(2) == D &&
                  k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type() && heads % k.size(1) == 0,
              "prompt_attention: k and v [q_len, kv_heads, head_dim] of q's dtype, heads a multiple of kv_heads");
  const auto kc = k.stride(2) == 1 && k.stride(1) == D ? k : k.contiguous();
  const auto vc = v.stride(2) == 1 && v.stride(1) == D ? v : v.contiguous();
  // One block of q_len tokens: [1, q_len, kv_heads, D] views, their token stride the rows'.
  auto block = [&](const at::Tensor& x) { return x.as_strided({1, q_len, x.size(1), D}, {0, x.stride(0), D, 1}); };
  const int32_t zero = 0;
  auto out = at::empty({q_len, heads, D}, q.options());
  const float s = static_cast<float>(scale);
  if (bf16)
    attend_prompt_of<c10::BFloat16, c10::BFloat16>(qc, block(kc), block(vc), &zero, q_len, window, s, out);
  else
    attend_prompt_of<float, float>(qc, block(kc), block(vc), &zero, q_len, window, s, out);
  return out;
}

bool paged_prefill_available() { return prefill_available(); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(tessera, m) {
  m.def("paged_prefill_attention(Tensor q, Tensor key_cache, Tensor value_cache, Tensor block_table, int seq_len, "
        "float scale, int window) -> Tensor");
  m.impl("paged_prefill_attention", c10::DispatchKey::CPU, TORCH_FN(paged_prefill_attention));
  m.def("prompt_attention(Tensor q, Tensor k, Tensor v, float scale, int window) -> Tensor");
  m.impl("prompt_attention", c10::DispatchKey::CPU, TORCH_FN(prompt_attention));
  m.def("paged_prefill_available() -> bool", &paged_prefill_available);
}
