// The vector dot-product block shared by the bandwidth-bound CPU kernels (decode attention's scores, the
// small-batch linear): a few fp32 vectors against four rows streamed from memory, each row loaded once.
#pragma once

#include "cpu/simd.h"

#include <cstdint>

namespace fastlm_cpu {

constexpr int kDotRows = 4;  // rows of k per call

// Dot products of R (1 or 2) fp32 vectors q_r = q + r * ldq with kDotRows rows k[i] of length D (fp32, bf16 or
// fp16, widened in registers): s[r * lds + i] = q_r . k[i]. Eight named accumulators (arrays of vectors end up on
// the stack): with two q rows every k vector loaded feeds both, with one the even and odd vectors go to separate
// sets, so there are always eight independent FMA chains.
template <int R, typename T>
inline void dot_rows(const float* q, int64_t ldq, const T* const* k, int64_t D, float* s, int64_t lds) {
  static_assert(kDotRows == 4 && (R == 1 || R == 2), "dot_rows: four k rows, one or two q rows");
  const int64_t full = D / kW * kW;
  const float* q1 = R == 2 ? q + ldq : q;     // second accumulator set: the second row, or the odd vectors
  const int64_t c1 = R == 2 ? 0 : kW, step = R == 2 ? kW : 2 * kW;
  vfloat a0{}, a1{}, a2{}, a3{}, b0{}, b1{}, b2{}, b3{};
  int64_t c = 0;
  for (; c + c1 + kW <= full; c += step) {
    vfloat qa = vload(q + c), qb = vload(q1 + c + c1);
    keep_in_register(qa), keep_in_register(qb);
    a0 = vfma(qa, vload_cvt(k[0] + c), a0), b0 = vfma(qb, vload_cvt(k[0] + c + c1), b0);
    a1 = vfma(qa, vload_cvt(k[1] + c), a1), b1 = vfma(qb, vload_cvt(k[1] + c + c1), b1);
    a2 = vfma(qa, vload_cvt(k[2] + c), a2), b2 = vfma(qb, vload_cvt(k[2] + c + c1), b2);
    a3 = vfma(qa, vload_cvt(k[3] + c), a3), b3 = vfma(qb, vload_cvt(k[3] + c + c1), b3);
  }
  if (R == 1 && c < full) {  // an odd number of whole vectors
    const vfloat qa = vload(q + c);
    a0 = vfma(qa, vload_cvt(k[0] + c), a0), a1 = vfma(qa, vload_cvt(k[1] + c), a1);
    a2 = vfma(qa, vload_cvt(k[2] + c), a2), a3 = vfma(qa, vload_cvt(k[3] + c), a3);
  }
  if (R == 1) {
    hsum4(a0 + b0, a1 + b1, a2 + b2, a3 + b3, s);
  } else {
    hsum4(a0, a1, a2, a3, s);
    hsum4(b0, b1, b2, b3, s + lds);
  }
  for (int r = 0; r < R; ++r)
    for (int64_t d = full; d < D; ++d)
      for (int i = 0; i < kDotRows; ++i) s[r * lds + i] += q[r * ldq + d] * to_float(k[i][d]);
}

}  // namespace fastlm_cpu
