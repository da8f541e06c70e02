// y = x W^T for the CPU linear layers, W in nn.Linear layout (N x K, fp32 / bf16 / fp16, element (n, k) at
// w[n * w_row + k * w_col]), x fp32 (M x K, row stride ldx).
//
// Algorithm: the output columns go in panels of kPanel = 2 vectors, and the panels in groups of up to kMaxGroup,
// split across the threads. For each group a thread packs its rows of W transposed, panel by panel (K x kPanel,
// fp32: half-precision weights are widened here, once per element), then walks down x kChunkRows rows at a time:
// for each 256-deep slice of the reduction (kDepth) it runs the register-blocked micro-kernel of tile.h (kRows x
// kPanel accumulators: kRows broadcasts of x and two panel vectors per k; with AVX-512 kWideRows x 2 kPanel over two
// adjacent panels where there are two: fewer loads per FMA) over every panel of the group, the first
// slice writing the tile and each later one adding its sums to it, and hands the rows x group tile to an epilogue
// (bias, activation, residual, rounding to the output dtype), which writes whole row segments of the output.
//
// bf16 on a CPU with AVX512-BF16 (bf16dot.h): x comes as bf16 words of pairs and W is packed as such words, the
// same loops on the dot-product micro-kernel (half the reduction steps, no widening), which takes two adjacent
// panels per call (kWideRows x 4 vectors: fewer loads per dot product); fp32 accumulation either way.
//
// Memory traffic: W read once; x once per group (the chunk's rows stay in L2 across the group's panels); the output
// written once by the epilogue, group-wide row segments at a time.
#pragma once

#include "cpu/amx.h"
#include "cpu/bf16dot.h"
#include "cpu/simd.h"
#include "cpu/tile.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <vector>

namespace fastlm_cpu {

constexpr int64_t kPanel = 2 * kW;         // output columns per packed panel (the micro-kernel's width)
constexpr int64_t kMaxGroup = 8;           // panels per thread task; the group's slice of W per depth step
                                           // (8 x kDepth x kPanel floats: 128 KB with AVX2) stays in L2
constexpr int64_t kChunkRows = 8 * kRows;  // rows of x per output tile: the tile and its x rows stay in L1 / L2
constexpr int64_t kDepth = 256;            // reduction depth per pass: separate partial sums keep the rounding
                                           // error of long dot products down; a panel's slice stays in L1

// Panels per group for `panels` panels on `threads` threads: the largest size (at most kMaxGroup) that leaves the
// busiest thread at most 1/16 more panels than single panels would. at::parallel_for hands each thread a
// contiguous run of ceil(groups / threads) groups, and only the last group can be short.
inline int64_t panel_group(int64_t panels, int64_t threads, int64_t max_group = kMaxGroup) {
  auto busiest = [&](int64_t g) {
    const int64_t groups = (panels + g - 1) / g;
    return std::min(panels, (groups + threads - 1) / threads * g);
  };
  for (int64_t g = std::min(max_group, panels); g > 1; --g)
    if (16 * busiest(g) <= 17 * busiest(1)) return g;
  return 1;
}

// packed[(p * K + k) * kPanel + j] = W[n0 + p * kPanel + j, k] for the np panels from column n0, widened to fp32
// (0 past column cols). Unit-stride rows go in kW x kW blocks transposed in registers (simd.h), the rest one
// element at a time: the packing is the GEMM's cost per weight element, which few rows of x do not amortize.
template <typename W>
void pack_panels(const W* w, int64_t w_row, int64_t w_col, int64_t n0, int64_t cols, int64_t np, int64_t K,
                 float* packed) {
  for (int64_t j0 = 0; j0 < np * kPanel; j0 += kW) {
    float* dst = packed + (j0 / kPanel) * K * kPanel + j0 % kPanel;
    int64_t k = 0;
    if (w_col == 1 && j0 + kW <= cols)
      for (; k + kW <= K; k += kW) transpose_block(w + (n0 + j0) * w_row + k, w_row, dst + k * kPanel, kPanel);
    for (int64_t j = j0; j < j0 + kW; ++j)
      for (int64_t kk = k; kk < K; ++kk)
        dst[kk * kPanel + j - j0] = j < cols ? to_float(w[(n0 + j) * w_row + kk * w_col]) : 0.0f;
  }
}

#if defined(FASTLM_BF16_DOT)
// pack_panels for the bf16 dot products: packed[(p * K2 + kk) * kPanel + j] = the word (W[n, 2 kk], W[n, 2 kk + 1])
// of column n = n0 + p * kPanel + j (K2 = ceil(K / 2); zero past column cols and past K).
inline void pack_panels(const c10::BFloat16* w, int64_t w_row, int64_t w_col, int64_t n0, int64_t cols, int64_t np,
                        int64_t K, uint32_t* packed) {
  const int64_t K2 = (K + 1) / 2;
  const auto* u = reinterpret_cast<const uint16_t*>(w);
  auto dst = [&](int64_t j) { return packed + (j / kPanel) * K2 * kPanel + j % kPanel; };  // column j's first word
  // unit-stride rows: whole 16 x 16 blocks of words (16 rows of W, 16 word columns) transposed in registers
  const int64_t j_vec = w_col == 1 ? std::min(cols, np * kPanel) / 16 * 16 : 0, kk_vec = K / 2 / 16 * 16;
  for (int64_t j = 0; j < j_vec; j += 16)
    for (int64_t kk = 0; kk < kk_vec; kk += 16) {
      __m512i r[16];
      for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(u + (n0 + j + i) * w_row + 2 * kk);
      transpose16(r);
      for (int i = 0; i < 16; ++i) _mm512_storeu_si512(dst(j) + (kk + i) * kPanel, r[i]);
    }
  // the rest one word at a time
  for (int64_t j = 0; j < np * kPanel; ++j) {
    const uint16_t* row = j < cols ? u + (n0 + j) * w_row : nullptr;  // (zero columns past cols)
    for (int64_t kk = j < j_vec ? kk_vec : 0; kk < K2; ++kk) {
      uint32_t word = 0;
      if (row) word = row[2 * kk * w_col] | (2 * kk + 1 < K ? uint32_t{row[(2 * kk + 1) * w_col]} << 16 : 0u);
      dst(j)[kk * kPanel] = word;
    }
  }
}
#endif

// A weight in nn.Linear layout: element (n, k) at p[n * row + k * col].
template <typename W>
struct Weight {
  const W* p;
  int64_t row, col;
};

// Computes x W^T tile by tile and calls epilogue(m0, rows, n0, cols, tile, ldt) for each, with
// tile[i * ldt + j] = y[m0 + i, n0 + j] for i < rows, j < cols; ldt is a multiple of kPanel and the tile is
// readable up to the next multiple of kPanel past cols, so epilogues may load whole vectors. x is fp32 (row stride
// ldx floats) or, for bf16 weights on the dot products (bf16dot.h), bf16 rows as words of pairs (ldx words a row,
// an odd K's last word zero padded).
//
// With nw = 2 weights of the same shape (SwiGLU's gate and up) both products come in one pass: their panels
// alternate in the packing, so a tile holds, for each panel q of its columns, ws[0]'s kPanel columns at
// [2 q kPanel, (2 q + 1) kPanel) and ws[1]'s same columns right after; n0 and cols still count output columns.
// The epilogue gets both products of an element while they are in L1 (a second pass would read the first product
// back from memory).
template <typename X, typename W, typename Epilogue>
void gemm_impl(int64_t M, int64_t N, int64_t K, const X* x, int64_t ldx, const Weight<W>* ws, int64_t nw,
               Epilogue&& epilogue) {
  constexpr bool words = std::is_same_v<X, uint32_t>;
  static_assert(std::is_same_v<X, float> || (words && kBf16Dot<W>), "gemm_nt: fp32 x, or words with bf16 W");
  constexpr int64_t per = words ? 2 : 1;  // reduction elements per x element
  const int64_t Kx = (K + per - 1) / per;  // x elements (and packed rows) a row
  const int64_t panels = (N + kPanel - 1) / kPanel;
  // groups of output panels (each nw packed panels: the packed slice per depth step stays the same size)
  const int64_t group = panel_group(panels, at::get_num_threads(), kMaxGroup / nw);
  const int64_t groups = (panels + group - 1) / group, ldt = group * nw * kPanel;
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    // (cache-line aligned: the micro-kernel loads whole vectors of the panels and stores whole vectors of the tile)
    std::vector<X, LineAligned<X>> packed(group * nw * Kx * kPanel);
    Floats tile(kChunkRows * ldt);
    const Floats ones(kRows, 1.0f);  // row scales that make a depth step add its sums to the tile's (C = 1 C + A B)
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t n0 = g * group * kPanel, cols = std::min(group * kPanel, N - n0), np = (cols + kPanel - 1) / kPanel;
      if (nw == 1) {
        pack_panels(ws[0].p, ws[0].row, ws[0].col, n0, cols, np, K, packed.data());
      } else {
        for (int64_t q = 0; q < np; ++q)
          for (int64_t u = 0; u < nw; ++u)
            pack_panels(ws[u].p, ws[u].row, ws[u].col, n0 + q * kPanel, std::min(kPanel, cols - q * kPanel), 1, K,
                        packed.data() + (q * nw + u) * Kx * kPanel);
      }
      for (int64_t m0 = 0; m0 < M; m0 += kChunkRows) {
        const int64_t rows = std::min(kChunkRows, M - m0);
        for (int64_t k0 = 0; k0 < std::max<int64_t>(K, 1); k0 += kDepth) {
          const int64_t depth = (std::min(kDepth, K - k0) + per - 1) / per, kx = k0 / per;  // in x elements
          const float* add = k0 == 0 ? nullptr : ones.data();  // the first step writes the tile, later ones add
          for (int64_t p = 0; p < np * nw;) {
            // two panels at a time where there are two (gemm_rows<4>, dot_rows<4>: AVX-512)
            const bool wide = (words || kW == 16) && p + 1 < np * nw;
            const int64_t step = wide ? kWideRows : kRows;
            for (int64_t i = 0; i < rows; i += step) {
              const int64_t r = std::min(step, rows - i);
              const X* b = packed.data() + (p * Kx + kx) * kPanel;
              float* c = tile.data() + i * ldt + p * kPanel;
#if defined(FASTLM_BF16_DOT)
              if constexpr (words) {
                const WordsA a{x + (m0 + i) * ldx + kx, ldx, 1};
                if (wide)
                  dot_rows<4>(r, a, b, kPanel, depth, c, ldt, add, Kx * kPanel);
                else
                  dot_rows<2>(r, a, b, kPanel, depth, c, ldt, add);
              } else
#endif
              {
                const MatA a{x + (m0 + i) * ldx + kx, ldx, 1};
                if constexpr (kW == 16) {
                  if (wide) {
                    gemm_rows<4, false>(r, a, b, kPanel, depth, c, ldt, add, Kx * kPanel);
                    continue;
                  }
                }
                gemm_rows<2, false>(r, a, b, kPanel, depth, c, ldt, add);
              }
            }
            p += wide ? 2 : 1;
          }
        }
        epilogue(m0, rows, n0, cols, tile.data(), ldt);
      }
    }
  });
}

template <typename X, typename W, typename Epilogue>
void gemm_nt(int64_t M, int64_t N, int64_t K, const X* x, int64_t ldx, const W* w, int64_t w_row, int64_t w_col,
             Epilogue&& epilogue) {
  const Weight<W> ws[1] = {{w, w_row, w_col}};
  gemm_impl(M, N, K, x, ldx, ws, 1, epilogue);
}

// Whether bf16 matrix products go to ATen's kernels (oneDNN) instead of fastlm's: the GEMMs of linear and the MLPs
// (rather than this file's) and, where fastlm's AMX kernel does not run (amx.h), the attention forward (its
// flash-attention kernel, where it computes the same masks: attention.cpp). Where the CPU has AMX-BF16, oneDNN runs
// them on the AMX tile units: GEMMs at 2.1-2.2 TFLOP/s on 2 threads of a Xeon against 0.19 for the AVX512-BF16 dot
// products here (bench/dev/cpu_notes.md). FASTLM_CPU_BF16: "auto" (default: ATen where the CPU has AMX-BF16),
// "aten" (the attention forward too) or "fastlm", read at each call.
enum class Bf16Engine { kAuto, kAten, kFastlm };
inline Bf16Engine bf16_engine() {
  const char* env = std::getenv("FASTLM_CPU_BF16");
  const std::string mode = env && *env ? env : "auto";
  TORCH_CHECK_VALUE(mode == "auto" || mode == "aten" || mode == "fastlm",
                    "FASTLM_CPU_BF16 must be auto, aten or fastlm, got '", mode, "'");
  return mode == "aten" ? Bf16Engine::kAten : mode == "fastlm" ? Bf16Engine::kFastlm : Bf16Engine::kAuto;
}
inline bool bf16_on_aten(Bf16Engine engine = bf16_engine()) {
  return engine == Bf16Engine::kAten || (engine == Bf16Engine::kAuto && cpu_has_amx_bf16());
}

// x W1^T and x W2^T in one pass (gemm_impl with two weights of the same shape).
template <typename X, typename W, typename Epilogue>
void gemm_nt2(int64_t M, int64_t N, int64_t K, const X* x, int64_t ldx, Weight<W> w1, Weight<W> w2,
              Epilogue&& epilogue) {
  const Weight<W> ws[2] = {w1, w2};
  gemm_impl(M, N, K, x, ldx, ws, 2, epilogue);
}

}  // namespace fastlm_cpu
