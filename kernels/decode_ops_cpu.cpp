// The small per-layer ops of a Llama step on the CPU, each one pass instead of several PyTorch ops: the residual
// add + RMSNorm, the rotary embedding (q and k in place) and SiLU(gate) * up; and the greedy argmax. A decode step of one request is
// ~100 such ops, each a dispatch and a parallel region of its own for a few kilobytes of work, which cost about
// as much as the layer's matmuls stream; here each is one call.
//
// And decode_layer: a whole decoder layer for a decode step of one to four requests, these ops, the GEMV
// (dense_gemv_cpu.cpp) or the int8 layer (int8_linear_cpu.cpp) and the paged attention (paged_attention_cpu.cpp)
// called from C++, so that a layer costs
// one call from Python instead of ~40 (measured: ~0.2 ms of Python a layer on the 2-core EPYC, more than its
// weights take to stream).
//
// Every step rounds where the PyTorch code in models/llama.py and models/rope.py rounds (to the activations' dtype
// after each op), so bfloat16 results match it to the last bit but for the float sums' order (RMSNorm's mean)
// and exp's last float bits (SiLU; vec_exp.h). Built without -ffast-math and with -ffp-contract=off: a fused multiply-add
// would skip a rounding the PyTorch code makes. Registered as torch.ops.tessera.{add_rms_norm, rotary_, silu_mul,
// argmax_rows, write_kv_, decode_layer}, and DecodeModel, the whole decode step, as torch.classes.tessera.DecodeModel.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/BFloat16.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <immintrin.h>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "vec_exp.h"

namespace {

// One value rounded to T the way a PyTorch op producing a T tensor rounds its float result.
template <typename T>
inline float round_to(float v) {
  return static_cast<float>(static_cast<T>(v));
}

constexpr int64_t LANES = 16;  // partial sums, so that the compiler keeps the sum of squares in vector lanes

// 16 values at a time with AVX-512, rounding exactly as the scalar loops (and PyTorch) do: the compiler cannot
// vectorize c10::BFloat16's conversions (a NaN branch apiece), which left SiLU * up at ~0.5 ns a value on two
// threads, more than its bytes take to stream. Widening bf16 is a shift; narrowing rounds to nearest even, NaN
// to 0x7FC0, as c10 does.
__attribute__((target("avx512f"))) inline __m512 widen16(const float* x) { return _mm512_loadu_ps(x); }
__attribute__((target("avx512f"))) inline __m512 widen16(const c10::BFloat16* x) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

// The bf16 bit patterns of 16 floats, in the low half of each 32-bit lane.
__attribute__((target("avx512f"))) inline __m512i bf16_bits16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
  return _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
}

// round_to<T> of 16 floats.
template <typename T>
__attribute__((target("avx512f"))) inline __m512 round16(__m512 v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    return _mm512_castsi512_ps(_mm512_slli_epi32(bf16_bits16(v), 16));
  }
}

__attribute__((target("avx512f"))) inline void store16(float* x, __m512 v) { _mm512_storeu_ps(x, v); }
__attribute__((target("avx512f"))) inline void store16(c10::BFloat16* x, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(x), _mm512_cvtepi32_epi16(bf16_bits16(v)));
}

// float32 and bfloat16 (the dispatch macros also instantiate double, which the ops refuse).
template <typename T>
constexpr bool VECTOR16 = std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>;

// One row of add_rms_norm (see add_rms_norm_rows), its first dim / 16 * 16 values 16 at a time; returns the
// partial sums of squares lane by lane, in the scalar loop's order; with a residual rr, of the sums, which go to sr.
template <typename T>
__attribute__((target("avx512f"))) inline void sum_squares16(const T* xr, const T* rr, T* sr, int64_t full,
                                                             float* partial) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < full; i += 16) {
    __m512 v = widen16(xr + i);
    if (rr != nullptr) {
      v = round16<T>(_mm512_add_ps(v, widen16(rr + i)));
      store16(sr + i, v);
    }
    acc = _mm512_add_ps(acc, _mm512_mul_ps(v, v));
  }
  _mm512_storeu_ps(partial, acc);
}

template <typename T>
__attribute__((target("avx512f"))) inline void scale16(const T* xr, const T* weight, T* o, int64_t full, float inv) {
  const __m512 s = _mm512_set1_ps(inv);
  for (int64_t j = 0; j < full; j += 16)
    store16(o + j, _mm512_mul_ps(widen16(weight + j), round16<T>(_mm512_mul_ps(widen16(xr + j), s))));
}

template <typename T>
void add_rms_norm_rows(const T* x, const T* residual, const T* weight, T* out, T* sum, int64_t rows, int64_t dim,
                       float eps) {
  const bool vector = tessera_vec::has_avx512();
  const int64_t full = dim / LANES * LANES;  // the rest, scalar
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * dim;
      T* sr = sum + r * dim;
      const T* rr = residual != nullptr ? residual + r * dim : nullptr;
      float partial[LANES] = {};
      int64_t i = 0;
      if constexpr (VECTOR16<T>) {
        if (vector) {
          sum_squares16(xr, rr, sr, full, partial);
          i = full;
        }
      }
      if (rr != nullptr) {  // x + residual, rounded to T: the residual stream the next layer adds to
        for (int64_t j = i; j < dim; ++j) sr[j] = static_cast<T>(static_cast<float>(xr[j]) + static_cast<float>(rr[j]));
        xr = sr;
      }
      for (; i + LANES <= dim; i += LANES)
        for (int64_t l = 0; l < LANES; ++l) partial[l] += static_cast<float>(xr[i + l]) * static_cast<float>(xr[i + l]);
      float squares = 0.f;
      for (int64_t l = 0; l < LANES; ++l) squares += partial[l];
      for (; i < dim; ++i) squares += static_cast<float>(xr[i]) * static_cast<float>(xr[i]);
      const float inv = 1.0f / std::sqrt(squares / static_cast<float>(dim) + eps);
      T* o = out + r * dim;
      // (x * rsqrt(mean + eps)) in float, cast to T, then times the weight in T: the order transformers uses.
      int64_t j = 0;
      if constexpr (VECTOR16<T>) {
        if (vector) {
          scale16(xr, weight, o, full, inv);
          j = full;
        }
      }
      for (; j < dim; ++j)
        o[j] = static_cast<T>(static_cast<float>(weight[j]) * round_to<T>(static_cast<float>(xr[j]) * inv));
    }
  });
}

// x [rows, dim], residual [rows, dim] or none, weight [dim], all one dtype (float32 or bfloat16). Returns
// (RMSNorm(x + residual), x + residual); with no residual, (RMSNorm(x), an empty tensor): the caller keeps x
// (an op's output may not alias its input).
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                                                const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && weight.dim() == 1 && weight.size(0) == x.size(1),
              "add_rms_norm: x [rows, dim] and weight [dim] on the CPU");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "add_rms_norm: float32 or bfloat16, one dtype for x and weight");
  const bool has_residual = residual.has_value() && residual->defined();
  if (has_residual)
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type(),
                "add_rms_norm: residual shaped and typed like x");
  const auto xc = x.contiguous(), wc = weight.contiguous();
  const auto rc = has_residual ? residual->contiguous() : at::Tensor();
  auto out = at::empty_like(xc);
  auto sum = has_residual ? at::empty_like(xc) : at::empty({0}, xc.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "add_rms_norm", [&] {
    add_rms_norm_rows<scalar_t>(xc.const_data_ptr<scalar_t>(),
                                has_residual ? rc.const_data_ptr<scalar_t>() : nullptr,
                                wc.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                                has_residual ? sum.mutable_data_ptr<scalar_t>() : nullptr, xc.size(0), xc.size(1),
                                static_cast<float>(eps));
  });
  return {out, sum};
}

// One head [head_dim] in place, "rotate half": (x1 c - x2 s, x2 c + x1 s), cos/sin cast to T first and every
// product and sum rounded to T, as apply_rotary's PyTorch ops do.
template <typename T>
inline void rotate_head(T* x, const float* cos, const float* sin, int64_t half) {
  for (int64_t i = 0; i < half; ++i) {
    const float c = round_to<T>(cos[i]), s = round_to<T>(sin[i]);
    const float x1 = static_cast<float>(x[i]), x2 = static_cast<float>(x[half + i]);
    x[i] = static_cast<T>(round_to<T>(x1 * c) - round_to<T>(x2 * s));
    x[half + i] = static_cast<T>(round_to<T>(x2 * c) + round_to<T>(x1 * s));
  }
}

// q [tokens, heads, head_dim] and k [tokens, kv_heads, head_dim] (strided views of the qkv output, the last dim
// contiguous) rotated in place by positions [tokens] (int64) looked up in cos_sin_cache [max_len, head_dim]
// (float32: cos in the first half, sin in the second); the signature of kernels/rotary.py's Triton kernel.
void rotary_(at::Tensor q, at::Tensor k, const at::Tensor& positions, const at::Tensor& cos_sin_cache) {
  TORCH_CHECK(q.device().is_cpu() && q.dim() == 3 && k.dim() == 3 && q.size(0) == k.size(0) &&
                  q.size(2) == k.size(2) && q.stride(2) == 1 && k.stride(2) == 1,
              "rotary_: q [tokens, heads, head_dim] and k [tokens, kv_heads, head_dim] with contiguous heads");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() &&
                  (q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16),
              "rotary_: q and k float32 or bfloat16");
  TORCH_CHECK(cos_sin_cache.scalar_type() == at::kFloat && cos_sin_cache.dim() == 2 &&
                  cos_sin_cache.size(1) == q.size(2) && positions.scalar_type() == at::kLong &&
                  positions.numel() == q.size(0),
              "rotary_: float32 cos_sin_cache [max_len, head_dim] and int64 positions [tokens]");
  const auto table = cos_sin_cache.contiguous();
  const auto pos = positions.contiguous();
  const int64_t tokens = q.size(0), heads = q.size(1), kv_heads = k.size(1), half = q.size(2) / 2;
  const int64_t max_len = table.size(0);
  const int64_t* pp = pos.const_data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t)
    TORCH_CHECK(pp[t] >= 0 && pp[t] < max_len, "rotary_: position ", pp[t], " outside the table of ", max_len);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "rotary_", [&] {
    scalar_t* qp = q.mutable_data_ptr<scalar_t>();
    scalar_t* kp = k.mutable_data_ptr<scalar_t>();
    const float* cs = table.const_data_ptr<float>();
    at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const float* cos = cs + pp[t] * table.size(1);
        for (int64_t h = 0; h < heads; ++h) rotate_head(qp + t * q.stride(0) + h * q.stride(1), cos, cos + half, half);
        for (int64_t h = 0; h < kv_heads; ++h)
          rotate_head(kp + t * k.stride(0) + h * k.stride(1), cos, cos + half, half);
      }
    });
  });
}

// out[i] = SiLU(gate[i]) * up[i] for i < count (a multiple of 16), SiLU = x / (1 + exp(-x)) rounded to T first.
template <typename T>
__attribute__((target("avx512f"))) inline void silu_mul16(const T* gate, const T* up, T* out, int64_t count) {
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int64_t i = 0; i < count; i += 16) {
    const __m512 x = widen16(gate + i);
    const __m512 e = tessera_vec::exp16(_mm512_sub_ps(_mm512_setzero_ps(), x));
    const __m512 silu = round16<T>(_mm512_div_ps(x, _mm512_add_ps(one, e)));
    store16(out + i, _mm512_mul_ps(silu, widen16(up + i)));
  }
}

// gate_up [rows, 2 * inter] (gate, then up) -> SiLU(gate) * up [rows, inter]; SiLU rounded to the dtype before
// the product, as F.silu(gate) * up rounds.
at::Tensor silu_mul(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.device().is_cpu() && gate_up.dim() == 2 && gate_up.size(1) % 2 == 0,
              "silu_mul: gate_up [rows, 2 * inter] on the CPU");
  TORCH_CHECK(gate_up.scalar_type() == at::kFloat || gate_up.scalar_type() == at::kBFloat16,
              "silu_mul: float32 or bfloat16");
  const auto g = gate_up.contiguous();
  const int64_t rows = g.size(0), inter = g.size(1) / 2;
  auto out = at::empty({rows, inter}, g.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, g.scalar_type(), "silu_mul", [&] {
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      constexpr int64_t CHUNK = 256;
      float neg[CHUNK], e[CHUNK];  // -gate, then exp(-gate): 16 at a time where AVX-512 runs
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* gate = gp + r * 2 * inter;
        const scalar_t* up = gate + inter;
        int64_t done = 0;
        if constexpr (VECTOR16<scalar_t>) {
          if (tessera_vec::has_avx512()) {
            done = inter / 16 * 16;
            silu_mul16(gate, up, op + r * inter, done);
          }
        }
        for (int64_t i0 = done; i0 < inter; i0 += CHUNK) {
          const int64_t len = std::min(CHUNK, inter - i0);
          for (int64_t i = 0; i < len; ++i) neg[i] = -static_cast<float>(gate[i0 + i]);
          if (tessera_vec::has_avx512()) {
            tessera_vec::exp_avx512(neg, e, len);
          } else {
            for (int64_t i = 0; i < len; ++i) e[i] = std::exp(neg[i]);
          }
          for (int64_t i = 0; i < len; ++i) {
            const float silu = round_to<scalar_t>(-neg[i] / (1.0f + e[i]));
            op[r * inter + i0 + i] = static_cast<scalar_t>(silu * static_cast<float>(up[i0 + i]));
          }
        }
      }
    });
  });
  return out;
}

// The first index of a row's largest value (torch.argmax's answer; a NaN counts as the largest), 16 values a
// step with AVX-512: a greedy step's pick over the vocabulary, which PyTorch's CPU argmax does one value at a time
// (~2 ms for 64 rows of 32000 on the 2-core EPYC). bf16 logits are read as they are (widening is exact, so the
// pick is the one their float32 copy would give, without the copy: ~0.3 ms a step of 64 rows).
template <typename T>
__attribute__((target("avx512f"))) int64_t argmax_avx512(const T* x, int64_t count) {
  __m512 best = _mm512_set1_ps(-INFINITY);
  int64_t i = 0;
  for (; i + 16 <= count; i += 16) {
    const __m512 v = widen16(x + i);
    if (_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q) != 0) return -1;  // a NaN: the caller's scalar loop finds it
    best = _mm512_max_ps(best, v);
  }
  float m = _mm512_reduce_max_ps(best);
  for (int64_t j = i; j < count; ++j) {
    const float v = static_cast<float>(x[j]);
    if (std::isnan(v)) return -1;
    m = std::max(m, v);
  }
  const __m512 target = _mm512_set1_ps(m);
  for (i = 0; i + 16 <= count; i += 16) {
    const __mmask16 hit = _mm512_cmp_ps_mask(widen16(x + i), target, _CMP_EQ_OQ);
    if (hit != 0) return i + __builtin_ctz(hit);
  }
  for (; i < count; ++i)
    if (static_cast<float>(x[i]) == m) return i;
  return 0;  // a row of -inf only: the first, as torch.argmax
}

template <typename T>
int64_t argmax_plain(const T* x, int64_t count) {
  int64_t best = 0;
  for (int64_t i = 0; i < count; ++i) {
    if (std::isnan(static_cast<float>(x[i]))) return i;
    if (static_cast<float>(x[i]) > static_cast<float>(x[best])) best = i;
  }
  return best;
}

// logits: float32 or bfloat16 [rows, vocab], each row contiguous (rows may sit apart: a narrowed padded head).
at::Tensor argmax_rows(const at::Tensor& logits) {
  TORCH_CHECK(logits.device().is_cpu() && logits.dim() == 2 &&
                  (logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kBFloat16) && logits.size(1) > 0,
              "argmax_rows: float32 or bfloat16 logits [rows, vocab] on the CPU");
  const auto x = logits.stride(1) == 1 ? logits : logits.contiguous();
  const int64_t rows = x.size(0), vocab = x.size(1), stride = x.stride(0);
  auto out = at::empty({rows}, x.options().dtype(at::kLong));
  int64_t* op = out.mutable_data_ptr<int64_t>();
  auto pick = [&](auto* xp) {
    at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const auto* row = xp + r * stride;
        const int64_t i = tessera_vec::has_avx512() ? argmax_avx512(row, vocab) : -1;
        op[r] = i >= 0 ? i : argmax_plain(row, vocab);
      }
    });
  };
  if (x.scalar_type() == at::kBFloat16)
    pick(x.const_data_ptr<c10::BFloat16>());
  else
    pick(x.const_data_ptr<float>());
  return out;
}

at::Tensor gemv(const at::Tensor& x, const at::Tensor& packed, const c10::optional<at::Tensor>& bias, int64_t n) {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("tessera::gemv", "").typed<
      at::Tensor(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&, int64_t)>();
  return op.call(x, packed, bias, n);
}

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& key_cache, const at::Tensor& value_cache,
                                  const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale,
                                  int64_t window) {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("tessera::paged_decode_attention", "").typed<
      at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                 double, int64_t)>();
  return op.call(q, key_cache, value_cache, block_tables, seq_lens, scale, window);
}

at::Tensor int8_linear_rows(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& weight_scale,
                            const at::Tensor& weight_sums, const c10::optional<at::Tensor>& bias) {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("tessera::int8_linear_rows", "").typed<
      at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                 const c10::optional<at::Tensor>&)>();
  return op.call(x, weight, weight_scale, weight_sums, bias);
}

// A token's keys (or values), heads x head_dim, as int8 rows with their float32 scales
// (services/worker/attention/int8_kv.py: absmax / 127, then each value / scale rounded to nearest even).
template <typename T>
void quantize_heads(const T* x, int64_t heads, int64_t head_dim, int8_t* rows) {
  for (int64_t h = 0; h < heads; ++h, x += head_dim, rows += head_dim + 4) {
    float amax = 0.f;
    for (int64_t d = 0; d < head_dim; ++d) amax = std::max(amax, std::fabs(static_cast<float>(x[d])));
    const float scale = amax / 127.f, divisor = std::max(scale, std::numeric_limits<float>::min());
    for (int64_t d = 0; d < head_dim; ++d)
      rows[d] = static_cast<int8_t>(std::clamp(std::nearbyint(static_cast<float>(x[d]) / divisor), -127.f, 127.f));
    std::memcpy(rows + head_dim, &scale, sizeof scale);
  }
}

// k, v [n, kv_heads, head_dim] (rows may be strided, heads contiguous) into their slots of kv_cache [2, blocks,
// block_size, kv_heads, head_dim] of their dtype, or int8 [..., head_dim + 4] rows quantized (quantize_heads):
// attention_backend.write_kv in one pass, instead of its ~10 PyTorch ops a layer for an int8 cache.
void write_kv_(const at::Tensor& k, const at::Tensor& v, const at::Tensor& kv_cache, const at::Tensor& slot_mapping) {
  const bool int8 = kv_cache.scalar_type() == at::kChar;
  TORCH_CHECK(k.dim() == 3 && v.sizes() == k.sizes() && k.stride(2) == 1 && v.stride(2) == 1 &&
                  k.stride(1) == k.size(2) && v.stride(1) == v.size(2) && v.scalar_type() == k.scalar_type() &&
                  (k.scalar_type() == at::kFloat || k.scalar_type() == at::kBFloat16),
              "write_kv_: k and v [n, kv_heads, head_dim] float32 or bfloat16, each row's heads contiguous");
  const int64_t n = k.size(0), heads = k.size(1), head_dim = k.size(2);
  TORCH_CHECK(kv_cache.dim() == 5 && kv_cache.is_contiguous() && kv_cache.size(0) == 2 && kv_cache.size(3) == heads &&
                  kv_cache.size(4) == head_dim + (int8 ? 4 : 0) && (int8 || kv_cache.scalar_type() == k.scalar_type()),
              "write_kv_: a contiguous kv_cache [2, blocks, block_size, kv_heads, head_dim] of k's dtype, or int8 "
              "[..., head_dim + 4]");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.numel() == n,
              "write_kv_: int64 slot_mapping [n]");
  const auto slots_t = slot_mapping.contiguous();
  const int64_t slots = kv_cache.size(1) * kv_cache.size(2);
  const int64_t* slot = slots_t.const_data_ptr<int64_t>();
  for (int64_t r = 0; r < n; ++r)
    TORCH_CHECK(slot[r] >= 0 && slot[r] < slots, "write_kv_: slot ", slot[r], " outside the cache's ", slots);
  const int64_t elem = k.element_size();
  const int64_t bytes = int8 ? heads * (head_dim + 4) : heads * head_dim * elem;  // a slot's, one plane
  auto* planes = static_cast<char*>(kv_cache.data_ptr());
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      for (int plane = 0; plane < 2; ++plane) {
        const at::Tensor& x = plane == 0 ? k : v;
        const char* from = static_cast<const char*>(x.const_data_ptr()) + r * x.stride(0) * elem;
        char* to = planes + (plane * slots + slot[r]) * bytes;
        if (!int8)
          std::memcpy(to, from, bytes);
        else if (k.scalar_type() == at::kBFloat16)
          quantize_heads(reinterpret_cast<const at::BFloat16*>(from), heads, head_dim, reinterpret_cast<int8_t*>(to));
        else
          quantize_heads(reinterpret_cast<const float*>(from), heads, head_dim, reinterpret_cast<int8_t*>(to));
      }
  });
}

// Projection i of the layer (qkv, o, gate_up, down) with n outputs: weights holds one gemv-packed tensor per
// projection, or three (int8 values, scales, row sums: int8_linear_cpu.cpp) for an int8 layer.
at::Tensor project(int64_t i, const at::Tensor& x, at::TensorList weights,
                   const c10::List<c10::optional<at::Tensor>>& biases, int64_t n) {
  if (weights.size() == 4) return gemv(x, weights[i], biases.get(i), n);
  return int8_linear_rows(x, weights[3 * i], weights[3 * i + 1], weights[3 * i + 2], biases.get(i));
}

// One decoder layer (models/llama.py's DecoderLayer.forward) for n <= 4 decode rows, one token of one request
// each: x, residual [n, hidden] -> (the MLP's output, x + residual + attention), the residual stream the next
// layer adds to; no residual before the first layer. weights: the qkv, o, gate_up and down projections (see
// project); biases: theirs (float32) or none; kv_cache [2, blocks, block_size, kv_heads, head_dim].
std::tuple<at::Tensor, at::Tensor> decode_layer(
    const at::Tensor& x, const c10::optional<at::Tensor>& residual, const at::Tensor& positions,
    const at::Tensor& cos_sin_cache, const at::Tensor& input_norm, const at::Tensor& post_norm, double eps,
    at::TensorList weights, const c10::List<c10::optional<at::Tensor>>& biases, int64_t num_heads,
    int64_t num_kv_heads, int64_t head_dim, int64_t intermediate, const at::Tensor& kv_cache,
    const at::Tensor& block_tables, const at::Tensor& seq_lens, const at::Tensor& slot_mapping, double scale,
    int64_t window) {
  TORCH_CHECK((weights.size() == 4 || weights.size() == 12) && biases.size() == 4,
              "decode_layer: 4 projections (qkv, o, gate_up, down), 1 or 3 tensors each, and their biases");
  const bool int8 = kv_cache.scalar_type() == at::kChar;
  TORCH_CHECK(x.dim() == 2 && slot_mapping.scalar_type() == at::kLong && slot_mapping.numel() == x.size(0) &&
                  kv_cache.dim() == 5 && kv_cache.is_contiguous() && kv_cache.size(3) == num_kv_heads &&
                  kv_cache.size(4) == head_dim + (int8 ? 4 : 0) && (int8 || kv_cache.scalar_type() == x.scalar_type()),
              "decode_layer: x [n, hidden], int64 slot_mapping [n], a contiguous kv_cache [2, blocks, block_size, "
              "kv_heads, head_dim] of x's dtype, or int8 [..., head_dim + 4]");
  const int64_t n = x.size(0), hidden = x.size(1), q_size = num_heads * head_dim, kv_size = num_kv_heads * head_dim;
  auto [h, stream] = add_rms_norm(x, residual, input_norm, eps);
  if (!residual.has_value() || !residual->defined()) stream = x;

  const auto qkv = project(0, h, weights, biases, q_size + 2 * kv_size);
  auto q = qkv.narrow(1, 0, q_size).view({n, num_heads, head_dim});
  auto k = qkv.narrow(1, q_size, kv_size).view({n, num_kv_heads, head_dim});
  rotary_(q, k, positions, cos_sin_cache);
  // This token's key and value into its slot of the paged cache.
  write_kv_(k, qkv.narrow(1, q_size + kv_size, kv_size).view({n, num_kv_heads, head_dim}), kv_cache, slot_mapping);
  const auto attention = paged_decode_attention(q, kv_cache[0], kv_cache[1], block_tables, seq_lens, scale, window);
  const auto o = project(1, attention.view({n, q_size}), weights, biases, hidden);
  auto [h2, stream2] = add_rms_norm(o, stream, post_norm, eps);
  const auto act = silu_mul(project(2, h2, weights, biases, 2 * intermediate));
  return {project(3, act, weights, biases, hidden), stream2};
}

// A whole decode step of one to four requests, one token each: the tokens' embedding rows, every decoder layer
// (decode_layer), the final norm and the LM head, to float32 logits. The model's tensors are handed over once
// (add_layer, set_head: models/fused_ops.py's native_decoder); a step is then one call with its five tensors,
// where the layer-by-layer path made a dozen calls from Python, each converting some twenty arguments (~0.2 ms a
// token on the 2-core EPYC Zen 4, about a tenth of a bfloat16 token). Each op is the one the Python path runs,
// in the same order, so the logits are bit for bit the same.
class DecodeModel : public torch::CustomClassHolder {
 public:
  DecodeModel(at::Tensor embedding, at::Tensor cos_sin_cache)
      : embedding_(std::move(embedding)), cos_sin_cache_(std::move(cos_sin_cache)) {
    TORCH_CHECK(embedding_.dim() == 2 && cos_sin_cache_.scalar_type() == at::kFloat,
                "DecodeModel: an embedding table [vocab, hidden] and a float32 cos_sin_cache");
  }

  void add_layer(at::Tensor input_norm, at::Tensor post_norm, double eps, std::vector<at::Tensor> weights,
                 c10::List<c10::optional<at::Tensor>> biases, int64_t num_heads, int64_t num_kv_heads,
                 int64_t head_dim, int64_t intermediate, at::Tensor kv_cache, double scale, int64_t window) {
    TORCH_CHECK((weights.size() == 4 || weights.size() == 12) && biases.size() == 4,
                "DecodeModel.add_layer: 4 projections, 1 or 3 tensors each, and their 4 biases");
    layers_.push_back(Layer{std::move(input_norm), std::move(post_norm), eps, std::move(weights), std::move(biases),
                            num_heads, num_kv_heads, head_dim, intermediate, std::move(kv_cache), scale, window});
  }

  // weights: the LM head's gemv-packed tensor, or its three int8 ones; n: its outputs.
  void set_head(at::Tensor norm, double eps, std::vector<at::Tensor> weights, c10::optional<at::Tensor> bias,
                int64_t n) {
    TORCH_CHECK(weights.size() == 1 || weights.size() == 3, "DecodeModel.set_head: 1 or 3 weight tensors");
    norm_ = std::move(norm), norm_eps_ = eps, head_ = std::move(weights), head_bias_ = std::move(bias), head_n_ = n;
  }

  // input_ids, positions, slot_mapping int64 [n]; block_tables int32 [n, blocks]; seq_lens int32 [n] ->
  // float32 logits [n, the head's outputs].
  at::Tensor step(const at::Tensor& input_ids, const at::Tensor& positions, const at::Tensor& block_tables,
                  const at::Tensor& seq_lens, const at::Tensor& slot_mapping) {
    return logits(input_ids, positions, block_tables, seq_lens, slot_mapping).to(at::kFloat);
  }

  // step's argmax over the first `vocab` logits of each row (argmax_rows): a greedy step's token ids, int64 [n].
  at::Tensor greedy_step(const at::Tensor& input_ids, const at::Tensor& positions, const at::Tensor& block_tables,
                         const at::Tensor& seq_lens, const at::Tensor& slot_mapping, int64_t vocab) {
    const auto all = logits(input_ids, positions, block_tables, seq_lens, slot_mapping);
    TORCH_CHECK(vocab > 0 && vocab <= all.size(1), "DecodeModel.greedy_step: vocab within the head's outputs");
    return argmax_rows(all.narrow(1, 0, vocab));
  }

 private:
  // The step's logits in the activations' dtype.
  at::Tensor logits(const at::Tensor& input_ids, const at::Tensor& positions, const at::Tensor& block_tables,
                    const at::Tensor& seq_lens, const at::Tensor& slot_mapping) {
    TORCH_CHECK(!layers_.empty() && norm_.defined(), "DecodeModel.step: add_layer and set_head first");
    at::Tensor x = at::index_select(embedding_, 0, input_ids);
    c10::optional<at::Tensor> residual;
    for (const Layer& l : layers_) {
      auto [out, stream] = decode_layer(x, residual, positions, cos_sin_cache_, l.input_norm, l.post_norm, l.eps,
                                        l.weights, l.biases, l.num_heads, l.num_kv_heads, l.head_dim,
                                        l.intermediate, l.kv_cache, block_tables, seq_lens, slot_mapping, l.scale,
                                        l.window);
      x = std::move(out);
      residual = std::move(stream);
    }
    const auto h = std::get<0>(add_rms_norm(x, residual, norm_, norm_eps_));
    return head_.size() == 1 ? gemv(h, head_[0], head_bias_, head_n_)
                             : int8_linear_rows(h, head_[0], head_[1], head_[2], head_bias_);
  }

  struct Layer {
    at::Tensor input_norm, post_norm;
    double eps;
    std::vector<at::Tensor> weights;
    c10::List<c10::optional<at::Tensor>> biases;
    int64_t num_heads, num_kv_heads, head_dim, intermediate;
    at::Tensor kv_cache;
    double scale;
    int64_t window;
  };
  at::Tensor embedding_, cos_sin_cache_, norm_;
  double norm_eps_ = 0;
  std::vector<at::Tensor> head_;
  c10::optional<at::Tensor> head_bias_;
  int64_t head_n_ = 0;
  std::vector<Layer> layers_;
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(tessera, m) {
  m.def("add_rms_norm(Tensor x, Tensor? residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("rotary_(Tensor(a!) q, Tensor(b!) k, Tensor positions, Tensor cos_sin_cache) -> ()");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
  m.impl("add_rms_norm", c10::DispatchKey::CPU, TORCH_FN(add_rms_norm));
  m.impl("rotary_", c10::DispatchKey::CPU, TORCH_FN(rotary_));
  m.impl("silu_mul", c10::DispatchKey::CPU, TORCH_FN(silu_mul));
  m.def("write_kv_(Tensor k, Tensor v, Tensor(a!) kv_cache, Tensor slot_mapping) -> ()");
  m.impl("write_kv_", c10::DispatchKey::CPU, TORCH_FN(write_kv_));
  m.def("argmax_rows(Tensor logits) -> Tensor");
  m.impl("argmax_rows", c10::DispatchKey::CPU, TORCH_FN(argmax_rows));
  m.def("decode_layer(Tensor x, Tensor? residual, Tensor positions, Tensor cos_sin_cache, Tensor input_norm, "
        "Tensor post_norm, float eps, Tensor[] weights, Tensor?[] biases, int num_heads, int num_kv_heads, "
        "int head_dim, int intermediate, Tensor(a!) kv_cache, Tensor block_tables, Tensor seq_lens, "
        "Tensor slot_mapping, float scale, int window) -> (Tensor, Tensor)");
  m.impl("decode_layer", c10::DispatchKey::CPU, TORCH_FN(decode_layer));
  m.class_<DecodeModel>("DecodeModel")
      .def(torch::init<at::Tensor, at::Tensor>())
      .def("add_layer", &DecodeModel::add_layer)
      .def("set_head", &DecodeModel::set_head)
      .def("step", &DecodeModel::step)
      .def("greedy_step", &DecodeModel::greedy_step);
}
