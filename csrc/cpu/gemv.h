// Matrix-vector products for the CPU kernels: y = x W^T for a few rows of x (decoding: one token per sequence),
// where the time is reading W once and ATen's GEMMs, built for large products, leave most of the memory bandwidth
// unused. Each thread streams a contiguous range of W rows front to back, one row at a time: a single sequential
// stream per thread is what the hardware prefetchers follow best (several rows read side by side measured 15-25%
// slower, bench/dev/cpu_notes.md). The rows of x (fp32, in L1) meet each W row, widened in registers, while it is
// in L1: every W byte is read from memory once per call.
#pragma once

#include "cpu/simd.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

namespace fastlm_cpu {

// Rows of x up to which the matrix-vector path is the faster one: at 9-16 rows it beat the packed GEMM of gemm.h by
// 1.1-2.3x (linear, MLPs, LM head; fp32 and bf16), and ATen's fp32 GEMM by 1.1-1.7x at 12 rows (at 16 rows the two
// are within 10 % either way); at 24 rows it and the packed GEMM are even.
constexpr int64_t kGemvMaxRows = 16;

// y[r * ldy] = x_r . w for the R rows x_r = x + r * K (fp32) and one row w of K elements (fp32, bf16 or fp16).
// kAcc vectors per x row keep at least eight independent FMA chains in flight.
template <int R, typename W>
inline void dot_row(const float* x, int64_t K, const W* w, float* y, int64_t ldy) {
  constexpr int kAcc = R >= 4 ? 2 : 8 / (2 * R);
  vfloat acc[R][kAcc] = {};
  int64_t c = 0;
  for (; c + kAcc * kW <= K; c += kAcc * kW)
    for (int u = 0; u < kAcc; ++u) {
      const vfloat wv = vload_cvt(w + c + u * kW);
      for (int r = 0; r < R; ++r) acc[r][u] = vfma(vload(x + r * K + c + u * kW), wv, acc[r][u]);
    }
  for (; c + kW <= K; c += kW) {
    const vfloat wv = vload_cvt(w + c);
    for (int r = 0; r < R; ++r) acc[r][0] = vfma(vload(x + r * K + c), wv, acc[r][0]);
  }
  for (int r = 0; r < R; ++r) {
    vfloat s = acc[r][0];
    for (int u = 1; u < kAcc; ++u) s += acc[r][u];
    float out = hsum(s);
    for (int64_t d = c; d < K; ++d) out += x[r * K + d] * to_float(w[d]);
    y[r * ldy] = out;
  }
}

// y[t * ldy + n] = x_t . W[n] for t < T and n in [n0, n1); x_t = x + t * K (fp32), W rows w + n * ldw (contiguous).
template <typename W>
void gemv_rows(const float* x, int64_t T, int64_t K, const W* w, int64_t ldw, int64_t n0, int64_t n1, float* y,
               int64_t ldy) {
  for (int64_t n = n0; n < n1; ++n) {
    const W* row = w + n * ldw;
    int64_t t = 0;
    for (; t + 4 <= T; t += 4) dot_row<4>(x + t * K, K, row, y + t * ldy + n, ldy);
    for (; t + 2 <= T; t += 2) dot_row<2>(x + t * K, K, row, y + t * ldy + n, ldy);
    if (t < T) dot_row<1>(x + t * K, K, row, y + t * ldy + n, ldy);
  }
}

// Runs fn(n0, n1) over output rows [0, N) in parallel, in contiguous ranges of at least ~64 KB of fp32 W (smaller
// pieces cost more in thread hand-off than they save).
template <typename F>
void for_row_ranges(int64_t N, int64_t K, F&& fn) {
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(K, 1));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) { fn(n0, n1); });
}

}  // namespace fastlm_cpu
