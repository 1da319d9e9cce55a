// exp for 16 floats at once with AVX-512, for the native CPU kernels' softmax and SiLU: libm's expf is a scalar
// call (~5 ns), and a decode step of 64 requests takes hundreds of thousands of them. exp(x) = 2^n * e^r with
// n = round(x / ln 2) and r = x - n ln 2 (ln 2 split in two for precision), e^r by its Taylor polynomial to r^7
// (|r| <= ln 2 / 2: within 2 ulp of expf), 2^n applied by scalef, which also gives 0 and inf out of range.
// Included by the kernels that use it; kernels/paged_attention_cpu.py rebuilds them when it changes.
#pragma once

#include <immintrin.h>

namespace tessera_vec {

__attribute__((target("avx512f"))) inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.7f)), _mm512_set1_ps(-103.9f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.f / 5040);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 720));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// dst[i] = exp(src[i]) for i < count, 16 at a time (masked for the tail).
__attribute__((target("avx512f"))) inline void exp_avx512(const float* src, float* dst, long count) {
  long i = 0;
  for (; i + 16 <= count; i += 16) _mm512_storeu_ps(dst + i, exp16(_mm512_loadu_ps(src + i)));
  if (i < count) {
    const __mmask16 tail = static_cast<__mmask16>((1u << (count - i)) - 1);
    _mm512_mask_storeu_ps(dst + i, tail, exp16(_mm512_maskz_loadu_ps(tail, src + i)));
  }
}

inline bool has_avx512() {
  static const bool yes = __builtin_cpu_supports("avx512f");
  return yes;
}

}  // namespace tessera_vec
