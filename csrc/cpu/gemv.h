// Matrix-vector products for the CPU kernels: y = x W^T for a few rows of x (decoding: one token per sequence),
// where the time is reading W once and ATen's GEMMs, built for large products, leave most of the memory bandwidth
// unused. W rows are streamed four at a time front to back (dot_rows.h), every W byte read once per call; the rows
// of x (fp32, in cache) go through in pairs; the output rows are split across the threads in contiguous ranges.
#pragma once

#include "cpu/dot_rows.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

namespace fastlm_cpu {

constexpr int64_t kGemvMaxRows = 8;  // rows of x up to which the matrix-vector path beats ATen's GEMM

constexpr int64_t kGemvPrefetch = 16;  // W rows ahead of use that are asked for

// y[t * ldy + n] = x_t . W[n] for t < T and n in [n0, n1) (n0 a multiple of kDotRows); x_t = x + t * K (fp32),
// W rows w + n * ldw (N rows of K elements, contiguous).
template <typename W>
void gemv_rows(const float* x, int64_t T, int64_t K, const W* w, int64_t ldw, int64_t N, int64_t n0, int64_t n1,
               float* y, int64_t ldy) {
  for (int64_t n = n0; n < n1; n += kDotRows) {
    const W* rows[kDotRows];
    for (int i = 0; i < kDotRows; ++i) rows[i] = w + std::min<int64_t>(n + i, N - 1) * ldw;  // tail repeats the last
    const int64_t valid = std::min<int64_t>(kDotRows, N - n);
    for (int64_t i = n + kGemvPrefetch; i < std::min(n + kGemvPrefetch + kDotRows, n1); ++i) {
      const char* r = reinterpret_cast<const char*>(w + i * ldw);
      for (int64_t off = 0; off < K * int64_t(sizeof(W)); off += 64) __builtin_prefetch(r + off);
    }
    float s[2 * kDotRows];
    for (int64_t t = 0; t < T; t += 2) {
      const int64_t pair = std::min<int64_t>(2, T - t);
      if (pair == 2)
        dot_rows<2>(x + t * K, K, rows, K, s, kDotRows);
      else
        dot_rows<1>(x + t * K, K, rows, K, s, kDotRows);
      for (int64_t r = 0; r < pair; ++r)
        for (int64_t i = 0; i < valid; ++i) y[(t + r) * ldy + n + i] = s[r * kDotRows + i];
    }
  }
}

// Runs fn(n0, n1) over output rows [0, N) in parallel, in ranges aligned to kDotRows of at least ~64 KB of fp32 W
// (smaller pieces cost more in thread hand-off than they save).
template <typename F>
void for_row_ranges(int64_t N, int64_t K, F&& fn) {
  const int64_t groups = (N + kDotRows - 1) / kDotRows;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / (kDotRows * std::max<int64_t>(K, 1)));
  at::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) {
    fn(g0 * kDotRows, std::min(N, g1 * kDotRows));
  });
}

}  // namespace fastlm_cpu
