// Tile primitives shared by the attention and decode kernels: a register-blocked fp32 tile product and the
// online-softmax updates.
//
// The tile product:
//     C[M x N] = (row_scale ? diag(row_scale) * C : 0) + A[M x K] * B[K x N]
//
// A with any strides (element (i, k) at A[i * a_row + k * a_col], read as scalars), B a row-major panel
// (B[k * ldb + n], read as vectors), N a multiple of kW. The micro-kernel keeps a kRows x 2 block of vectors of C in
// registers and, per k, loads two vectors of B and broadcasts kRows elements of A: 2 * kRows FMAs per 2 + kRows
// loads, so it is FMA-bound while the B panel (K x 2 vectors) stays in L1 across the row blocks; with AVX-512 a
// kWideRows x 4 block where there are 4 vectors of columns (4 * kWideRows FMAs per 4 + kWideRows loads; its second
// pair of B vectors b_next after the first: the next packed panel of gemm.h, the next columns here). With HoldB the B
// vectors are held in registers, so that the FMAs take no memory operands (GCC otherwise folds the loads into some
// of the kernels, and re-loads B for every row): that makes the attention kernels ~5 % faster (fp32 forward, 16
// heads of 64, seqlen 256-2048) but the MLP GEMM of gemm.h ~25 % slower, which therefore leaves the choice to the
// compiler. The product is summed from zero and added to the scaled C by one FMA at the end: an accumulator built
// over many calls (the attention output over the key tiles) then sums K terms per call and one term per call, not
// all of them in one serial chain. The optional row scale is the online-softmax rescaling of that accumulator.
#pragma once

#include "cpu/simd.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

namespace fastlm_cpu {

// Rows per micro-kernel: 2 * kRows accumulators + 2 B vectors + 1 broadcast fit the register file
// (16 vector registers with AVX2, 32 with AVX-512).
constexpr int kRows = kW == 16 ? 12 : 6;

// Rows per micro-kernel with NV = 4 (AVX-512 only): 6 x 4 accumulators + 4 B vectors + 1 broadcast fit the 32
// registers. Per element of A it takes 10 loads for 24 FMAs (12 x 2: 14): ~10 % faster on a 64 x 64 x 64 tile, and
// ~8 % for the bf16 dot products (bench/dev/cpu_notes.md).
constexpr int kWideRows = 6;

struct MatA {
  const float* p;
  int64_t row, col;  // strides of the row index i and the reduction index k
};

// Never inlined: inlined into a large caller (gemm.h's loops), GCC has kept the accumulators of this array in
// memory, a store per FMA (2.7x slower); compiled alone they stay in registers.
template <int R, int NV, bool HoldB>
[[gnu::noinline]] void gemm_micro(MatA A, const float* __restrict B, int64_t ldb, int64_t b_next, int64_t K,
                                  float* __restrict C, int64_t ldc, const float* __restrict row_scale) {
  vfloat acc[R][NV] = {};
  for (int64_t k = 0; k < K; ++k) {
    vfloat b[NV];
    for (int v = 0; v < NV; ++v) {
      b[v] = vload(B + v / 2 * b_next + k * ldb + v % 2 * kW);
      if (HoldB) keep_in_register(b[v]);
    }
    const float* a = A.p + k * A.col;
    for (int i = 0; i < R; ++i) {
      const vfloat ai = vset1(a[i * A.row]);
      for (int v = 0; v < NV; ++v) acc[i][v] = vfma(ai, b[v], acc[i][v]);
    }
  }
  for (int i = 0; i < R; ++i)
    for (int v = 0; v < NV; ++v)
      vstore(C + i * ldc + v * kW,
             row_scale ? vfma(vset1(row_scale[i]), vload(C + i * ldc + v * kW), acc[i][v]) : acc[i][v]);
}

template <int NV, bool HoldB = true>
inline void gemm_rows(int64_t rows, MatA A, const float* B, int64_t ldb, int64_t K, float* C, int64_t ldc,
                      const float* row_scale, int64_t b_next = 0) {
  static_assert(NV == 1 || NV == 2 || (NV == 4 && kW == 16), "gemm_rows: 1 or 2 vectors of columns, or 4 (AVX-512)");
  auto micro = [&](auto r) {
    if constexpr (NV <= 2 || decltype(r)::value <= kWideRows)
      gemm_micro<decltype(r)::value, NV, HoldB>(A, B, ldb, b_next, K, C, ldc, row_scale);
    else  // (no such micro-kernel: it would not fit the registers)
      TORCH_CHECK(false, "gemm_rows<4>: at most ", kWideRows, " rows per call, got ", rows);
  };
  switch (rows) {
#define FASTLM_GEMM_CASE(r) \
  case r:                   \
    return micro(std::integral_constant<int, r>{});
    FASTLM_GEMM_CASE(1)
    FASTLM_GEMM_CASE(2)
    FASTLM_GEMM_CASE(3)
    FASTLM_GEMM_CASE(4)
    FASTLM_GEMM_CASE(5)
    FASTLM_GEMM_CASE(6)
#if FASTLM_VEC_BYTES == 64
    FASTLM_GEMM_CASE(7)
    FASTLM_GEMM_CASE(8)
    FASTLM_GEMM_CASE(9)
    FASTLM_GEMM_CASE(10)
    FASTLM_GEMM_CASE(11)
    FASTLM_GEMM_CASE(12)
#endif
#undef FASTLM_GEMM_CASE
    default:  // (the callers' row blocks: a larger one is a bug, never an output left unwritten)
      TORCH_CHECK(false, "gemm_rows: 1 to ", FASTLM_VEC_BYTES == 64 ? 12 : 6, " rows per call, got ", rows);
  }
}

// The whole M x N product by a register-blocked micro-kernel, rows<NV>(row count, A's rows, B, ldb, K, C, ldc, row
// scale[, b_next]): with AVX-512 first NV = 4 vectors of columns at a time (kWideRows rows per call, its second pair
// of B vectors b_next = 2 kW after the first), then NV = 2 (1 at a ragged end), kRows rows per call; column panels
// outermost, so that each B panel is reused by all row blocks. A (MatA or another {p, row, col}) and B as the
// micro-kernel takes them.
template <typename Mat, typename BT, typename Rows>
inline void blocked_product(int64_t M, int64_t N, int64_t K, Mat A, const BT* B, int64_t ldb, float* C, int64_t ldc,
                            const float* row_scale, Rows rows) {
  auto block = [&](auto nv, int64_t n, int64_t i, int64_t r, auto... b_next) {
    rows(nv, r, Mat{A.p + i * A.row, A.row, A.col}, B + n, ldb, K, C + i * ldc + n, ldc,
         row_scale ? row_scale + i : nullptr, b_next...);
  };
  int64_t n = 0;
  if constexpr (kW == 16)
    for (; n + 4 * kW <= N; n += 4 * kW)
      for (int64_t i = 0; i < M; i += kWideRows)
        block(std::integral_constant<int, 4>{}, n, i, std::min<int64_t>(kWideRows, M - i), int64_t{2 * kW});
  for (; n < N; n += 2 * kW)
    for (int64_t i = 0; i < M; i += kRows) {
      const int64_t r = std::min<int64_t>(kRows, M - i);
      if (n + 2 * kW <= N)
        block(std::integral_constant<int, 2>{}, n, i, r);
      else
        block(std::integral_constant<int, 1>{}, n, i, r);
    }
}

// The whole M x N fp32 product.
inline void gemm_tile(int64_t M, int64_t N, int64_t K, MatA A, const float* B, int64_t ldb, float* C, int64_t ldc,
                      const float* row_scale) {
  blocked_product(M, N, K, A, B, ldb, C, ldc, row_scale,
                  [](auto nv, auto... args) { gemm_rows<decltype(nv)::value>(args...); });
}

// Scores are kept unscaled (S = q.k, rounded exactly as a plain fp32 GEMM rounds them) and the scale c > 0
// (softmax_scale * log2(e)) is applied inside the exponent by an FMA, x = S * c - m: folding the scale into q
// instead would round every q element and roughly double the error of large logits.
struct SoftmaxScale {
  float q_sign = 1.0f;  // multiplies q when it is loaded: the sign of softmax_scale (0 for a zero scale), exact
  float c = kLog2e;     // |softmax_scale| * log2(e) > 0, so masked scores (-inf) stay -inf
  SoftmaxScale() = default;
  explicit SoftmaxScale(double softmax_scale)
      : q_sign(softmax_scale > 0 ? 1.0f : (softmax_scale < 0 ? -1.0f : 0.0f)),
        c(softmax_scale == 0 ? 1.0f : static_cast<float>(std::abs(softmax_scale) * 1.4426950408889634)) {}
};

// The exponents x = S c - m of the online softmax, m the running maximum of the rounded products S c. An FMA forms
// S c exactly, so x is exact but for m's rounding, which every score of a row shares and the normalization cancels
// (softmax_columns, the attention forward's, also takes the maximum's own residual S c - m out, so that its x is 0).
// From |m| >= 2^24 on that rounding (up to half an ulp of m) exceeds 1 and grows with m; from 2^31 on it can put the
// row's own maximum at 2^-128, which underflows. There x is formed from the rounded product, as m was, so the
// maximum's x is 0.
constexpr float kExactExponentLimit = 16777216.0f;  // 2^24

// Online softmax over one row of n (a multiple of kW) unscaled scores, in place: the row becomes
// P = 2^(S c - m_new) with m_new = max(m, max S c) (base 2); m and the running sum l are updated, and the returned
// factor 2^(m_old - m_new) rescales the row's output accumulator. A row with no finite score so far gets P = 0 and
// factor 1; a NaN score makes m, l and the factor NaN from then on.
inline float softmax_row(float* s, int64_t n, float c, float& m, float& l) {
  const vfloat vc = vset1(c);
  vfloat vm = vset1(kNegInf);
  vint nan{};
  for (int64_t i = 0; i < n; i += kW) {
    const vfloat x = vload(s + i) * vc;
    vm = vmax(vm, x), nan |= x != x;
  }
  float m_new = std::max(m, hmax(vm));
  for (int i = 0; i < kW; ++i)
    if (nan[i]) m_new = std::numeric_limits<float>::quiet_NaN();
  if (m_new == kNegInf) {
    std::fill(s, s + n, 0.0f);
    return 1.0f;
  }
  const vfloat neg_m = vset1(-m_new);
  const bool exact = std::abs(m_new) < kExactExponentLimit;
  vfloat vs{};
  for (int64_t i = 0; i < n; i += kW) {
    const vfloat e = vexp2(exact ? vfma(vload(s + i), vc, neg_m) : vload(s + i) * vc + neg_m);
    vstore(s + i, e);
    vs += e;
  }
  const float alpha = std::exp2(m - m_new);
  l = l * alpha + hsum(vs);
  m = m_new;
  return alpha;
}

// The same update for kW independent rows stored as columns: s[j * lds + lane] is score j of row `lane`, for
// j < n. Everything is lane-wise (no horizontal reductions); m, m_lo, l, alpha hold one value per lane.
// The running maximum is kept in two parts: m (the rounded product S c) and m_lo = S c - m of that score (exact, by
// an FMA), and the exponents are x = (S c - m) - m_lo, so the maximum's own x is exactly 0 and its P exactly 1. A
// query that sees a single key then gets exactly that key's value row as output, and its backward dP - delta
// cancels exactly (attention_bwd.cpp), as the reference's softmax of one element does.
inline void softmax_columns(float* s, int64_t lds, int64_t n, float c, float* m, float* m_lo, float* l,
                            float* alpha) {
  const vfloat vc = vset1(c);
  vfloat arg = vset1(kNegInf);  // the tile's maximum score: c > 0, so its product is the maximum product
  const vfloat m_old = vload(m);
  vint nan = m_old != m_old;  // lanes that met a NaN score: NaN from then on (vmax would drop it for a later score)
  for (int64_t j = 0; j < n; ++j) {
    const vfloat sj = vload(s + j * lds);
    arg = vmax(arg, sj), nan |= sj != sj;
  }
  const vfloat vm = arg * vc;
  const vfloat m_new = nan ? vset1(std::numeric_limits<float>::quiet_NaN()) : vmax(m_old, vm);
  // lanes with no finite score so far subtract 0 instead of -inf: their P is 2^-inf = 0 and alpha 2^-inf = 0
  // (their accumulator is still 0), never NaN
  const vint finite = m_new != vset1(kNegInf);
  const vfloat m_use = (vfloat)((vint)m_new & finite);
  const vfloat neg_m = -m_use;
  const vfloat lo = (vfloat)((vint)(vm > m_old ? vfma(arg, vc, -vm) : vload(m_lo)) & finite);
  bool exact = true;
  for (int i = 0; i < kW; ++i) exact = exact && !(std::abs(m_use[i]) >= kExactExponentLimit);  // (NaN lanes: NaN)
  vfloat vs{};
  for (int64_t j = 0; j < n; ++j) {
    const vfloat e = vexp2(exact ? vfma(vload(s + j * lds), vc, neg_m) - lo : vload(s + j * lds) * vc + neg_m);
    vstore(s + j * lds, e);
    vs += e;
  }
  const vfloat a = vexp2(m_old - m_use);
  vstore(alpha, a);
  vstore(l, vfma(vload(l), a, vs));
  vstore(m, m_new);
  vstore(m_lo, lo);
}

}  // namespace fastlm_cpu
