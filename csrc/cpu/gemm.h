// y = x W^T for the CPU linear layers, W in nn.Linear layout (N x K, fp32 / bf16 / fp16, element (n, k) at
// w[n * w_row + k * w_col]), x fp32 (M x K, row stride ldx).
//
// Algorithm: the output columns go in panels of kPanel = 2 vectors, split across the threads. For each panel a
// thread packs its kPanel rows of W transposed (K x kPanel, fp32: half-precision weights are widened here, once per
// element), then runs the register-blocked micro-kernel of tile.h (kRows x kPanel accumulators: kRows broadcasts of
// x and two panel vectors per k) down the rows of x, 256 deep at a time (kDepth) with the partial sums added, and
// hands the rows x kPanel result to an epilogue (bias, activation, residual, rounding to the output dtype). x goes
// in blocks of rows of at most kXBlockBytes, which stay in the last-level cache while every panel reads them.
//
// Memory traffic: W read once per block of x rows (once for up to 2048 rows at K = 512); x once per panel from
// cache; the output written once by the epilogue.
#pragma once

#include "cpu/simd.h"
#include "cpu/tile.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace fastlm_cpu {

constexpr int64_t kPanel = 2 * kW;               // output columns per packed panel
constexpr int64_t kXBlockBytes = 4 << 20;         // rows of x per pass: a block that stays in L3 across the panels
constexpr int64_t kDepth = 256;                  // reduction depth per pass: separate partial sums keep the rounding
                                                 // error of long dot products down; the panel slice stays in L1

// Computes x W^T block by block and calls epilogue(m0, rows, n0, cols, block, ldb) for each, with
// block[i * ldb + j] = y[m0 + i, n0 + j] for i < rows, j < cols (cols < kPanel only in the last panel).
template <typename W, typename Epilogue>
void gemm_nt(int64_t M, int64_t N, int64_t K, const float* x, int64_t ldx, const W* w, int64_t w_row, int64_t w_col,
             Epilogue&& epilogue) {
  const int64_t panels = (N + kPanel - 1) / kPanel;
  const int64_t mb = std::max<int64_t>(kRows, kXBlockBytes / (4 * std::max<int64_t>(K, 1)) / kRows * kRows);
  for (int64_t m0 = 0; m0 < M; m0 += mb) {
    const int64_t rows = std::min(mb, M - m0);
    at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
      std::vector<float> packed(K * kPanel), block(rows * kPanel), partial(K > kDepth ? rows * kPanel : 0);
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t n0 = p * kPanel, cols = std::min(kPanel, N - n0);
        for (int64_t j = 0; j < kPanel; ++j) {  // packed[k * kPanel + j] = W[n0 + j, k] (0 past the last row)
          const W* row = w + (n0 + j) * w_row;
          if (j < cols)
            for (int64_t k = 0; k < K; ++k) packed[k * kPanel + j] = to_float(row[k * w_col]);
          else
            for (int64_t k = 0; k < K; ++k) packed[k * kPanel + j] = 0.0f;
        }
        for (int64_t k0 = 0; k0 < std::max<int64_t>(K, 1); k0 += kDepth) {
          const int64_t depth = std::min(kDepth, K - k0);
          float* dst = k0 == 0 ? block.data() : partial.data();
          for (int64_t i = 0; i < rows; i += kRows)
            gemm_rows<2>(std::min<int64_t>(kRows, rows - i), MatA{x + (m0 + i) * ldx + k0, ldx, 1},
                         packed.data() + k0 * kPanel, kPanel, depth, dst + i * kPanel, kPanel, nullptr);
          if (k0 > 0)
            for (int64_t e = 0; e < rows * kPanel; e += kW)
              vstore(block.data() + e, vload(block.data() + e) + vload(dst + e));
        }
        epilogue(m0, rows, n0, cols, block.data(), kPanel);
      }
    });
  }
}

}  // namespace fastlm_cpu
