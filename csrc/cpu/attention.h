// What the CPU attention forward (attention.cpp) and backward (attention_bwd.cpp) share: tile sizes, the problem
// description with its mask geometry, the argument checks, and the widening of K/V rows into fp32 tiles.
#pragma once

#include "cpu/layout.h"
#include "cpu/simd.h"
#include "cpu/tile.h"

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>

namespace fastlm_cpu {

constexpr int64_t kBlockQ = 64;  // queries per block; a multiple of kW
constexpr int64_t kBlockK = 64;  // keys per tile

struct Problem {
  int64_t B, Sq, Sk, H, Hkv, G, D, Dv;  // G = H / Hkv; Dv: head dim padded to whole vectors
  int64_t left, right;                  // window, -1 = unbounded
  SoftmaxScale scale;
  int64_t n_ktiles() const { return (Sk + kBlockK - 1) / kBlockK; }
  // The keys query i may see, [lo(i), hi(i)] clipped to [0, Sk - 1]; both are non-decreasing in i.
  int64_t lo(int64_t i) const { return left < 0 ? 0 : std::max<int64_t>(0, i + Sk - Sq - left); }
  int64_t hi(int64_t i) const { return right < 0 ? Sk - 1 : std::min<int64_t>(Sk - 1, i + Sk - Sq + right); }
};

// Checks q (B, Sq, H, D), k and v (B, Sk, Hkv, D) and the options, with errors that name ``op``, and returns the
// problem they describe (causal sets the right window to 0).
Problem attention_problem(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal,
                          double softmax_scale, int64_t window_left, int64_t window_right);

// n rows of length D (row stride ld) widened to fp32 rows of length ldo, zero padded. Rows a page or more apart are
// not streamed by the hardware prefetchers, so each is asked for a few rows ahead.
template <typename T>
inline void widen_rows(const T* src, int64_t ld, int64_t n, int64_t D, float* dst, int64_t ldo) {
  constexpr int64_t kAhead = 8;
  const int64_t full = D / kW * kW;
  for (int64_t j = 0; j < n; ++j) {
    if (j + kAhead < n) prefetch_row(src + (j + kAhead) * ld, D);
    const T* s = src + j * ld;
    float* d = dst + j * ldo;
    for (int64_t c = 0; c < full; c += kW) vstore(d + c, vload_cvt(s + c));
    for (int64_t c = full; c < D; ++c) d[c] = to_float(s[c]);
    for (int64_t c = D; c < ldo; ++c) d[c] = 0.0f;
  }
}

// Floats of packed operands a kernel holds at most (32 MB, a few times the last-level cache), unless one kv head needs
// more: the backward packs larger problems in chunks of kv heads. The forward packs per thread, one kv head at a
// time, sharing the budget among at most 16 threads (so with more it holds up to 2 MB a thread), and reads a kv head
// that exceeds a thread's share unpacked.
constexpr int64_t kPackBudget = int64_t{8} << 20;

}  // namespace fastlm_cpu
