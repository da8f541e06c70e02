// bf16 tile products on the AVX512-BF16 dot-product instruction (VDPBF16PS: 16 fp32 lanes, each += a[2i] b[2i] +
// a[2i + 1] b[2i + 1] over 32 bf16 products; twice the multiply-adds of an fp32 FMA per instruction, no widening).
// Compiled where the build target has AVX512-BF16 (FASTLM_BF16_DOT); elsewhere the kernels widen bf16 to fp32.
//
// Operands are in "pair" layout: a 32-bit word holds two bf16 values that are consecutive along the reduction
// (low half first). The product
//     C[M x N] = (row_scale ? diag(row_scale) * C : 0) + A[M x K] * B[K x N]      (K = 2 * K2)
// takes A as words A[i * a_row + p * a_col] = (A[i][2p], A[i][2p + 1]), broadcast one at a time, and B as rows of
// words B[p * ldb + n] = (B[2p][n], B[2p + 1][n]), N a multiple of 16, loaded as vectors: the fp32 tile product of
// tile.h with half the reduction steps. Products are exact in fp32 and summed in fp32 (bf16 denormals read as 0).
#pragma once

#include "cpu/simd.h"
#include "cpu/tile.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

// (every CPU with AVX512-BF16 has AVX512-BW, whose 16-bit unpacks and masked loads the decode kernel takes)
#if defined(__AVX512BF16__) && defined(__AVX512F__) && defined(__AVX512BW__)
#define FASTLM_BF16_DOT 1
#endif

namespace fastlm_cpu {

using Words = std::vector<uint32_t, LineAligned<uint32_t>>;

// Whether this build has the bf16 dot products.
constexpr bool bf16_dot_available() {
#if defined(FASTLM_BF16_DOT)
  return true;
#else
  return false;
#endif
}

// Whether kernels on T take the bf16 dot products.
template <typename T>
constexpr bool kBf16Dot = bf16_dot_available() && std::is_same_v<T, c10::BFloat16>;

// Rows of n bf16 values (row stride ld) as words of consecutive pairs, ldo words a row: row j's word p = elements
// 2p, 2p + 1; an odd n's last word and the words past (n + 1) / 2 are zero padded.
inline void pair_rows(const c10::BFloat16* src, int64_t ld, int64_t rows, int64_t n, uint32_t* dst, int64_t ldo) {
  for (int64_t j = 0; j < rows; ++j) {
    const auto* s = reinterpret_cast<const uint16_t*>(src + j * ld);
    uint32_t* d = dst + j * ldo;
    int64_t p = 0;
#if defined(FASTLM_BF16_DOT)
    for (; p + 16 <= ldo; p += 16) {  // 32 values a vector: the pairs are the row's own bytes, zero past n
      const int64_t left = std::max<int64_t>(0, std::min<int64_t>(32, n - 2 * p));
      const __mmask32 in = left == 32 ? ~__mmask32{0} : (__mmask32{1} << left) - 1;
      _mm512_storeu_si512(d + p, _mm512_maskz_loadu_epi16(in, s + 2 * p));
    }
#endif
    for (; 2 * p + 1 < n; ++p) d[p] = uint32_t{s[2 * p]} | uint32_t{s[2 * p + 1]} << 16;
    if (2 * p < n) {
      d[p] = s[2 * p];
      ++p;
    }
    for (; p < ldo; ++p) d[p] = 0;
  }
}

// A contiguous rows x n bf16 matrix as rows of (n + 1) / 2 words of pairs: the matrix itself, read as words, when
// n is even and it starts on a word boundary; else a zero-padded copy in buf (pair_rows).
inline const uint32_t* as_words(const c10::BFloat16* src, int64_t rows, int64_t n, Words& buf) {
  if (n % 2 == 0 && reinterpret_cast<uintptr_t>(src) % alignof(uint32_t) == 0)
    return reinterpret_cast<const uint32_t*>(src);
  buf.resize(rows * ((n + 1) / 2));
  pair_rows(src, n, rows, n, buf.data(), (n + 1) / 2);
  return buf.data();
}

#if defined(FASTLM_BF16_DOT)

// 16 bf16 values lo[i] and 16 more hi[i] as the 16 words (lo[i], hi[i]).
inline __m512i pair_words(__m256i lo, __m256i hi) {
  return _mm512_or_si512(_mm512_cvtepu16_epi32(lo), _mm512_slli_epi32(_mm512_cvtepu16_epi32(hi), 16));
}

inline __m256i load16(const uint16_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

// Rows 2m and 2m + 1 of an n x D bf16 matrix (row stride ld) interleaved, pair m at dst + m * ldo (ldo >= D, a
// multiple of 16, the words past D zero): the B operand of a product that reduces over the rows (P V over keys). An
// odd n's last pair takes a zero row.
inline void interleave_rows(const c10::BFloat16* src, int64_t ld, int64_t n, int64_t D, uint32_t* dst, int64_t ldo) {
  const int64_t full = D / 16 * 16;
  for (int64_t m = 0; 2 * m < n; ++m) {
    const auto* a = reinterpret_cast<const uint16_t*>(src + 2 * m * ld);
    const auto* b = 2 * m + 1 < n ? reinterpret_cast<const uint16_t*>(src + (2 * m + 1) * ld) : nullptr;
    uint32_t* d = dst + m * ldo;
    for (int64_t c = 0; c < full; c += 16)
      _mm512_storeu_si512(d + c, pair_words(load16(a + c), b ? load16(b + c) : _mm256_setzero_si256()));
    for (int64_t c = full; c < D; ++c) d[c] = uint32_t{a[c]} | (b ? uint32_t{b[c]} << 16 : 0u);
    for (int64_t c = D; c < ldo; ++c) d[c] = 0;
  }
}

// 2^x for x <= 126 by AVX-512's scalef, fewer instructions than simd.h's vexp2: x = n + f (n the nearest integer),
// 2^f = 1 + f q(f) with q of degree 4 fitted for the least maximal relative error on |f| <= 1/2 (1.04e-7 with these
// fp32 coefficients, against 1.3e-7 for the degree-5 Taylor polynomial it replaces), n put into the exponent by
// VSCALEFPS; 2^0 is exactly 1, and x below -160 (-inf included) gives exactly 0. NaN stays NaN (VMAXPS returns its
// second operand, x, for a NaN).
inline __m512 vexp2_scalef(__m512 x) {
  constexpr float kCoef[6] = {1.0f, 0.69314686f, 0.24022238f, 0.05550891f, 0.00967171f, 0.00132193f};
  x = _mm512_max_ps(_mm512_set1_ps(-160.0f), x);
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(kCoef[5]);
  for (int k = 4; k >= 0; --k) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kCoef[k]));
  return _mm512_scalef_ps(p, n);
}

// softmax_columns (tile.h) for a P V product on bf16: the same update of m, m_lo, l and alpha for the 16 rows stored
// as columns of s (score j of row `lane` at s[j * lds + lane], j < n), with P written rounded to bf16 (to nearest
// even) as the B operand of the P V product over keys instead of in place: key pairs interleaved into words, pair p
// at dst + p * ldd, an odd n's last pair with a zero row; 2^x by vexp2_scalef. With Masked, row `lane` sees scores
// lo[lane] <= j <= hi[lane] only (the others count as -inf). The maximum is taken of the scores themselves (their
// products by c > 0 are ordered as they are), and the exponents, the sum and the rounding are one pass. A lane's
// running maximum m moves only when the tile's exceeds it by more than kRescaleSlack (P then up to 2^kRescaleSlack,
// exact in bf16's range; l and the LSE are kept against the same m): after the first tiles its alpha is 1, and the
// caller skips rescaling the output accumulator (FlashAttention-4's conditional rescaling).
constexpr float kRescaleSlack = 8.0f;
// Kept: one pass, for a tile without masks whose lanes all have a finite running maximum below kExactExponentLimit:
// the exponents are taken against that maximum as it is and the tile's maximum is found in the same pass; returns
// false, with m, m_lo, l and alpha untouched, where it would move the maximum of a lane (or met a NaN score), and the
// caller then runs the two passes (whose results it gives, bit for bit, wherever it returns true).
template <bool Masked, bool Kept>
bool softmax_columns_bf16_impl(const float* s, int64_t lds, int64_t n, float c, float* m, float* m_lo, float* l,
                               float* alpha, uint32_t* dst, int64_t ldd, const int32_t* lo, const int32_t* hi) {
  static_assert(!(Masked && Kept), "one pass: tiles without masks only");
  const __m512i lo_j = Masked ? _mm512_loadu_si512(lo) : _mm512_setzero_si512();
  const __m512i hi_j = Masked ? _mm512_loadu_si512(hi) : _mm512_setzero_si512();
  auto visible = [&](int64_t j) -> __mmask16 {  // the lanes that see score j
    if constexpr (!Masked) return 0xFFFF;
    const __m512i vj = _mm512_set1_epi32(static_cast<int32_t>(j));
    return _mm512_cmp_epi32_mask(lo_j, vj, _MM_CMPINT_LE) & _mm512_cmp_epi32_mask(vj, hi_j, _MM_CMPINT_LE);
  };
  const __m512 vc = _mm512_set1_ps(c), m_old = _mm512_loadu_ps(m);
  __m512 vmax = _mm512_set1_ps(kNegInf);
  __mmask16 nan = _mm512_cmp_ps_mask(m_old, m_old, _CMP_UNORD_Q);
  for (int64_t j = 0; j < n && !Kept; ++j) {
    const __m512 sj = _mm512_loadu_ps(s + j * lds);
    const __mmask16 see = visible(j);
    vmax = _mm512_mask_max_ps(vmax, see, vmax, sj);
    nan |= _mm512_mask_cmp_ps_mask(see, sj, sj, _CMP_UNORD_Q);
  }
  // the lanes whose maximum moves to top, the tile's largest product (from -inf: any finite top)
  auto raised_to = [&](__m512 top) {
    return _mm512_cmp_ps_mask(top, _mm512_add_ps(m_old, _mm512_set1_ps(kRescaleSlack)), _CMP_GT_OQ);
  };
  const __m512 top = _mm512_mul_ps(vmax, vc);
  const __mmask16 raised = Kept ? 0 : raised_to(top);
  const __m512 m_new = _mm512_mask_blend_ps(nan, _mm512_mask_blend_ps(raised, m_old, top), _mm512_set1_ps(NAN));
  // lanes with no finite score so far subtract 0 instead of -inf (P = 0, alpha = 0, never NaN)
  const __mmask16 finite = _mm512_cmp_ps_mask(m_new, _mm512_set1_ps(kNegInf), _CMP_NEQ_UQ);
  const __m512 m_use = _mm512_maskz_mov_ps(finite, m_new), neg_m = _mm512_sub_ps(_mm512_setzero_ps(), m_use);
  const __m512 lo_new = _mm512_fmadd_ps(vmax, vc, _mm512_sub_ps(_mm512_setzero_ps(), top));  // vmax c - top, exact
  const __m512 m_lo_new = _mm512_maskz_mov_ps(finite, _mm512_mask_blend_ps(raised, _mm512_loadu_ps(m_lo), lo_new));
  const __mmask16 big = _mm512_cmp_ps_mask(_mm512_abs_ps(m_use), _mm512_set1_ps(kExactExponentLimit), _CMP_NLT_UQ);
  const bool exact = big == 0;  // (NaN lanes count as big: either way their x is NaN)
  const __m512i pairs = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                         21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  auto exp_of = [&](int64_t j) {
    const __m512 sj = _mm512_loadu_ps(s + j * lds);
    if constexpr (Kept) vmax = _mm512_max_ps(vmax, sj);  // (a NaN score shows in the sum)
    const __m512 e = vexp2_scalef(exact ? _mm512_sub_ps(_mm512_fmadd_ps(sj, vc, neg_m), m_lo_new)
                                        : _mm512_add_ps(_mm512_mul_ps(sj, vc), neg_m));
    return Masked ? _mm512_maskz_mov_ps(visible(j), e) : e;
  };
  __m512 sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 2) {
    const __m512 e0 = exp_of(j), e1 = j + 1 < n ? exp_of(j + 1) : _mm512_setzero_ps();
    sum = _mm512_add_ps(sum, _mm512_add_ps(e0, e1));
    const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(e1, e0);  // bf16 e0 in words 0-15, e1 in 16-31
    _mm512_storeu_si512(dst + j / 2 * ldd, _mm512_permutexvar_epi16(pairs, both));
  }
  if constexpr (Kept) {
    if (raised_to(_mm512_mul_ps(vmax, vc)) | _mm512_cmp_ps_mask(sum, sum, _CMP_UNORD_Q)) return false;
  }
  const vfloat a = vexp2(vfloat(m_old) - vfloat(m_use));
  vstore(alpha, a);
  _mm512_storeu_ps(l, _mm512_fmadd_ps(_mm512_loadu_ps(l), a, sum));
  _mm512_storeu_ps(m, m_new);
  _mm512_storeu_ps(m_lo, m_lo_new);
  return true;
}

// The lanes' key bounds lo, hi: both null where every lane sees every score. A tile without masks first tries the
// one pass (most tiles after a query block's first: the maximum rarely moves by more than kRescaleSlack).
inline void softmax_columns_bf16(const float* s, int64_t lds, int64_t n, float c, float* m, float* m_lo, float* l,
                                 float* alpha, uint32_t* dst, int64_t ldd, const int32_t* lo, const int32_t* hi) {
  if (lo) {
    softmax_columns_bf16_impl<true, false>(s, lds, n, c, m, m_lo, l, alpha, dst, ldd, lo, hi);
    return;
  }
  const __mmask16 settled = _mm512_cmp_ps_mask(_mm512_abs_ps(_mm512_loadu_ps(m)),
                                               _mm512_set1_ps(kExactExponentLimit), _CMP_LT_OQ);
  if (settled == 0xFFFF && softmax_columns_bf16_impl<false, true>(s, lds, n, c, m, m_lo, l, alpha, dst, ldd, lo, hi))
    return;
  softmax_columns_bf16_impl<false, false>(s, lds, n, c, m, m_lo, l, alpha, dst, ldd, lo, hi);
}

struct WordsA {
  const uint32_t* p;
  int64_t row, col;  // strides of the row index i and the pair index p, in words
};

// Never inlined, as tile.h's gemm_micro (inlined, its accumulators can end up in memory). B's vectors come in
// pairs: vectors 2u and 2u + 1 of row p at B + u * b_next + p * ldb (b_next: the offset of the next 2-vector panel
// of a packed weight, for NV = 4; unused for NV <= 2).
template <int R, int NV>
[[gnu::noinline]] void dot_micro(WordsA A, const uint32_t* __restrict B, int64_t ldb, int64_t b_next, int64_t K2,
                                 float* __restrict C, int64_t ldc, const float* __restrict row_scale) {
  __m512 acc[R][NV];
  for (int i = 0; i < R; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_setzero_ps();
  // (A may be bf16 storage read as words: an aliasing-safe view)
  typedef uint32_t word_alias __attribute__((may_alias));
  for (int64_t p = 0; p < K2; ++p) {
    __m512bh b[NV];
    for (int v = 0; v < NV; ++v) b[v] = (__m512bh)_mm512_loadu_si512(B + v / 2 * b_next + p * ldb + v % 2 * 16);
    const word_alias* a = reinterpret_cast<const word_alias*>(A.p) + p * A.col;
    for (int i = 0; i < R; ++i) {
      const __m512bh ai = (__m512bh)_mm512_set1_epi32(static_cast<int>(a[i * A.row]));
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], ai, b[v]);
    }
  }
  for (int i = 0; i < R; ++i)
    for (int v = 0; v < NV; ++v)
      vstore(C + i * ldc + v * 16,
             row_scale ? vfma(vset1(row_scale[i]), vload(C + i * ldc + v * 16), acc[i][v]) : acc[i][v]);
}

template <int NV>
inline void dot_rows(int64_t rows, WordsA A, const uint32_t* B, int64_t ldb, int64_t K2, float* C, int64_t ldc,
                     const float* row_scale, int64_t b_next = 0) {
  static_assert(NV == 1 || NV == 2 || NV == 4, "dot_rows: 1, 2 or 4 vectors of columns");
  auto micro = [&](auto r) {
    if constexpr (NV <= 2 || decltype(r)::value <= kWideRows)
      dot_micro<decltype(r)::value, NV>(A, B, ldb, b_next, K2, C, ldc, row_scale);
    else  // (no such micro-kernel: it would not fit the registers)
      TORCH_CHECK(false, "dot_rows<4>: at most ", kWideRows, " rows per call, got ", rows);
  };
  switch (rows) {
#define FASTLM_DOT_CASE(r) \
  case r:                  \
    return micro(std::integral_constant<int, r>{});
    FASTLM_DOT_CASE(1)
    FASTLM_DOT_CASE(2)
    FASTLM_DOT_CASE(3)
    FASTLM_DOT_CASE(4)
    FASTLM_DOT_CASE(5)
    FASTLM_DOT_CASE(6)
    FASTLM_DOT_CASE(7)
    FASTLM_DOT_CASE(8)
    FASTLM_DOT_CASE(9)
    FASTLM_DOT_CASE(10)
    FASTLM_DOT_CASE(11)
    FASTLM_DOT_CASE(12)
#undef FASTLM_DOT_CASE
    default:  // (the callers' row blocks: a larger one is a bug, never an output left unwritten)
      TORCH_CHECK(false, "dot_rows: 1 to 12 rows per call, got ", rows);
  }
}

// The whole M x N product (blocked as gemm_tile's).
inline void dot_tile(int64_t M, int64_t N, int64_t K2, WordsA A, const uint32_t* B, int64_t ldb, float* C,
                     int64_t ldc, const float* row_scale) {
  static_assert(kRows == 12 && kW == 16, "dot_tile: the AVX-512 register block");
  blocked_product(M, N, K2, A, B, ldb, C, ldc, row_scale,
                  [](auto nv, auto... args) { dot_rows<decltype(nv)::value>(args...); });
}

#endif  // FASTLM_BF16_DOT

}  // namespace fastlm_cpu
