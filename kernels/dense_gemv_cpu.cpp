// The float32 / bfloat16 linear layer (services/worker/models/packed_linear.py) for a decode step of one to a
// few requests: y = x W^T + b for x of at most MAX_ROWS rows. At one row a matmul only streams its weights, and
// oneDNN's kernels, blocked for batches, stream them at ~14 GB/s on the 2-core EPYC where a plain read reaches
// ~30; this kernel reads each weight byte once, in order, with the next blocks prefetched.
//
// The weight is packed once (gemv_pack) into blocks of 16 output rows, so that one 64-byte load holds the same
// k for 16 outputs and no horizontal sums are needed:
//   float32:  [n / 16][k][16]           one fused multiply-add per load, x[k] broadcast;
//   bfloat16: [n / 16][k / 2][16][2]    one AVX512-BF16 dot of pairs per load, x[k:k+2] broadcast (VNNI layout).
// n is padded to 16 and k (bfloat16) to 2 with zeros. Sums are float32 in another order than oneDNN's, so
// results differ by float rounding. Registered as torch.ops.tessera.{gemv_pack, gemv}.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t BLOCK = 16;    // outputs per packed block: one 512-bit vector of float32 sums
constexpr int64_t MAX_ROWS = 4;  // rows of x per call: 4 x 4 accumulators stay in registers
constexpr int64_t PREFETCH = 1024;  // bytes ahead in each block's stream

bool has_avx512_bf16() {
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bf16");
  return yes;
}

// Sums (+ bias) of NB blocks from block b0 stored as T, only the first n outputs of each row.
template <int ROWS, int NB, typename T>
__attribute__((target("avx512f"))) inline void store(__m512 (&acc)[ROWS][NB], int64_t b0, int64_t n,
                                                     const float* bias, T* out) {
  alignas(64) float lane[BLOCK];
  for (int r = 0; r < ROWS; ++r)
    for (int b = 0; b < NB; ++b) {
      _mm512_store_ps(lane, acc[r][b]);
      const int64_t first = (b0 + b) * BLOCK;
      for (int64_t j = 0; j < BLOCK && first + j < n; ++j)
        out[r * n + first + j] = static_cast<T>(bias != nullptr ? lane[j] + bias[first + j] : lane[j]);
    }
}

// NB blocks (up to 64 outputs) for ROWS rows: NB weight streams, ROWS x NB accumulators in registers.
template <int ROWS, int NB>
__attribute__((target("avx512f"))) void unit_f32(const float* x, int64_t k, const float* w, int64_t b0, int64_t n,
                                                 const float* bias, float* out) {
  __m512 acc[ROWS][NB];
  for (int r = 0; r < ROWS; ++r)
    for (int b = 0; b < NB; ++b) acc[r][b] = _mm512_setzero_ps();
  const int64_t stride = k * BLOCK;
  for (int64_t i = 0; i < k; ++i) {
    __m512 xv[ROWS];
    for (int r = 0; r < ROWS; ++r) xv[r] = _mm512_set1_ps(x[r * k + i]);
    for (int b = 0; b < NB; ++b) {
      const float* wb = w + b * stride + i * BLOCK;
      _mm_prefetch(reinterpret_cast<const char*>(wb) + PREFETCH, _MM_HINT_T0);
      const __m512 wv = _mm512_loadu_ps(wb);
      for (int r = 0; r < ROWS; ++r) acc[r][b] = _mm512_fmadd_ps(xv[r], wv, acc[r][b]);
    }
  }
  store<ROWS, NB>(acc, b0, n, bias, out);
}

template <int ROWS, int NB>
__attribute__((target("avx512f,avx512bf16"))) void unit_bf16(const uint32_t* x_pairs, int64_t pairs,
                                                              const uint16_t* w, int64_t b0, int64_t n,
                                                              const float* bias, at::BFloat16* out) {
  __m512 acc[ROWS][NB];
  for (int r = 0; r < ROWS; ++r)
    for (int b = 0; b < NB; ++b) acc[r][b] = _mm512_setzero_ps();
  const int64_t stride = pairs * BLOCK * 2;
  for (int64_t p = 0; p < pairs; ++p) {
    __m512bh xv[ROWS];
    for (int r = 0; r < ROWS; ++r) xv[r] = (__m512bh)_mm512_set1_epi32(x_pairs[r * pairs + p]);
    for (int b = 0; b < NB; ++b) {
      const uint16_t* wb = w + b * stride + p * BLOCK * 2;
      _mm_prefetch(reinterpret_cast<const char*>(wb) + PREFETCH, _MM_HINT_T0);
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(wb);
      for (int r = 0; r < ROWS; ++r) acc[r][b] = _mm512_dpbf16_ps(acc[r][b], xv[r], wv);
    }
  }
  store<ROWS, NB>(acc, b0, n, bias, out);
}

template <int ROWS, int NB>
void unit(bool bf16, const void* x, int64_t k, const at::Tensor& packed, int64_t b0, int64_t n, const float* bias,
          at::Tensor& out) {
  if (bf16) {
    const auto* w = reinterpret_cast<const uint16_t*>(packed.const_data_ptr<at::BFloat16>()) + b0 * packed.stride(0);
    unit_bf16<ROWS, NB>(static_cast<const uint32_t*>(x), (k + 1) / 2, w, b0, n, bias,
                        out.mutable_data_ptr<at::BFloat16>());
  } else {
    unit_f32<ROWS, NB>(static_cast<const float*>(x), k, packed.const_data_ptr<float>() + b0 * packed.stride(0), b0,
                       n, bias, out.mutable_data_ptr<float>());
  }
}

template <int ROWS>
void run_rows(const at::Tensor& x, const at::Tensor& packed, const float* bias, int64_t n, at::Tensor& out) {
  const int64_t k = x.size(1), total_blocks = packed.size(0);
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  // bfloat16 x as k/2 pairs (the last padded with a zero), each broadcast as one 32-bit value.
  const int64_t npairs = (k + 1) / 2;
  std::vector<uint32_t> pairs(bf16 ? ROWS * npairs : 0, 0);
  if (bf16) {
    const auto* xp = reinterpret_cast<const uint16_t*>(x.const_data_ptr<at::BFloat16>());
    for (int r = 0; r < ROWS; ++r) std::memcpy(pairs.data() + r * npairs, xp + r * k, k * 2);
  }
  const void* xs = bf16 ? static_cast<const void*>(pairs.data()) : static_cast<const void*>(x.const_data_ptr<float>());
  // Units of 4 blocks, taken in turn by whichever thread is free: on a machine also running the server's
  // threads, a thread that lost its core for a while leaves its share to the others instead of holding the
  // whole step up (at::parallel_for hands each thread a fixed part).
  const int64_t units = (total_blocks + 3) / 4;
  std::atomic<int64_t> next{0};
  const int threads = static_cast<int>(std::min<int64_t>(at::get_num_threads(), units));
#pragma omp parallel num_threads(threads) if (threads > 1 && !omp_in_parallel())
  {
    for (int64_t u = next++; u < units; u = next++) {
      const int64_t b0 = u * 4;
      switch (std::min<int64_t>(4, total_blocks - b0)) {
        case 4: unit<ROWS, 4>(bf16, xs, k, packed, b0, n, bias, out); break;
        case 3: unit<ROWS, 3>(bf16, xs, k, packed, b0, n, bias, out); break;
        case 2: unit<ROWS, 2>(bf16, xs, k, packed, b0, n, bias, out); break;
        default: unit<ROWS, 1>(bf16, xs, k, packed, b0, n, bias, out); break;
      }
    }
  }
}

// Whether this CPU runs gemv for the dtype (AVX-512 for float32, AVX512-BF16 for bfloat16).
bool gemv_available(c10::ScalarType dtype) {
  return dtype == at::kBFloat16 ? has_avx512_bf16() : dtype == at::kFloat && __builtin_cpu_supports("avx512f");
}

// weight [n, k] float32 or bfloat16 -> the packed blocks described above.
at::Tensor gemv_pack(const at::Tensor& weight) {
  TORCH_CHECK(weight.device().is_cpu() && weight.dim() == 2, "gemv_pack: weight [n, k] on the CPU");
  TORCH_CHECK(weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kBFloat16,
              "gemv_pack: a float32 or bfloat16 weight");
  const int64_t n = weight.size(0), k = weight.size(1), nblocks = (n + BLOCK - 1) / BLOCK;
  auto w = at::zeros({nblocks * BLOCK, k}, weight.options());
  w.slice(0, 0, n).copy_(weight);
  if (weight.scalar_type() == at::kFloat)  // [nb, 16, k] -> [nb, k, 16]
    return w.view({nblocks, BLOCK, k}).transpose(1, 2).contiguous();
  const int64_t kp = (k + 1) / 2 * 2;  // [nb, 16, k/2, 2] -> [nb, k/2, 16, 2]
  auto padded = at::zeros({nblocks * BLOCK, kp}, weight.options());
  padded.slice(1, 0, k).copy_(w);
  return padded.view({nblocks, BLOCK, kp / 2, 2}).transpose(1, 2).contiguous();
}

// x [m, k] (m <= 4) in the packed weight's dtype; bias [n] float32 or none. Returns [m, n] in x's dtype.
at::Tensor gemv(const at::Tensor& x, const at::Tensor& packed, const c10::optional<at::Tensor>& bias, int64_t n) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.size(0) >= 1 && x.size(0) <= MAX_ROWS,
              "gemv: x [m, k] with 1 <= m <= ", MAX_ROWS, " on the CPU");
  TORCH_CHECK(x.scalar_type() == packed.scalar_type(), "gemv: x and the packed weight of one dtype");
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  TORCH_CHECK(bf16 || x.scalar_type() == at::kFloat, "gemv: float32 or bfloat16");
  TORCH_CHECK(gemv_available(x.scalar_type()), "gemv: this CPU lacks ", bf16 ? "AVX512-BF16" : "AVX-512");
  TORCH_CHECK(bf16 ? (packed.dim() == 4 && packed.size(1) == (x.size(1) + 1) / 2)
                   : (packed.dim() == 3 && packed.size(1) == x.size(1)),
              "gemv: a weight packed by gemv_pack with k = ", x.size(1));
  TORCH_CHECK(n > (packed.size(0) - 1) * BLOCK && n <= packed.size(0) * BLOCK, "gemv: n = ", n,
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


}  // namespace

TORCH_LIBRARY_FRAGMENT(tessera, m) {
  m.def("gemv_pack(Tensor weight) -> Tensor");
  m.def("gemv(Tensor x, Tensor packed, Tensor? bias, int n) -> Tensor");
  m.def("gemv_available(ScalarType dtype) -> bool", &gemv_available);
  m.impl("gemv_pack", c10::DispatchKey::CPU, TORCH_FN(gemv_pack));
  m.impl("gemv", c10::DispatchKey::CPU, TORCH_FN(gemv));
}
