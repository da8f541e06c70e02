// Softmax attention forward on the CPU, FlashAttention-2 style.
//
// Algorithm: a work item is (batch, kv head, share of the query blocks): all H / Hkv query heads of the kv head, and
// query blocks c, c + n, c + 2n, ... of kBlockQ queries (interleaved so that under a causal mask every share costs
// about the same). The thread first widens the kv head's keys and values to fp32 and packs them, contiguous, into
// its own panel (from the first key tile some query sees; kept for the next item of the same kv head). In the
// (batch, seqlen, heads, headdim) layout one head's rows are a page apart for a model-sized head count: read there
// for every query block, each row would cost a TLB miss and escape the hardware prefetchers (1.10-1.15x slower at
// seqlen 1024-2048, 16 heads of 64); packed once per item, they are read in order. Per query block, its queries are
// transposed (D x kBlockQ) and stay in L1 (the next block's query rows are prefetched into L2 while this one is
// computed) while the visible key tiles stream through:
//   S^T = K Q^T        a kBlockK x kBlockQ tile, keys as rows, so every softmax statistic below is lane-wise
//   online softmax     per query (column), in base 2 with the scale applied inside the exponent (tile.h): running
//                      max and sum, P = 2^(S c - max) in place of S
//   O = alpha O + P V  O (kBlockQ x D) in L1, alpha = 2^(old max - new max); the tile's P V is summed apart and
//                      added to alpha O once (tile.h), so O is not one serial sum over every key
// All arithmetic is fp32 with fp32 accumulation; bf16 inputs on a CPU with AVX512-BF16 take the dot products of
// bf16dot.h instead of being widened (K, Q^T and V as words of bf16 pairs, P rounded to bf16 for P V, the softmax
// writing it so: softmax_columns_bf16). On a CPU with AMX-BF16 (amx.h) both products run on the tile unit instead,
// per column of 16 queries (amx_key_tile): S^T = K Q^T (K's rows of pairs, Q^T's pairs), the softmax on the vector
// units, and O^T = alpha O^T + V^T P^T, the output kept transposed (Dv x kBlockQ) so that P^T, as the softmax leaves
// it, is the B operand and V^T (packed once per panel, 32 x 32 blocks transposed in registers) the A operand; the
// next column's S^T is issued before this column's softmax. Tiles
// entirely outside the causal/window mask are never touched, tiles entirely inside it are not masked, and the S x S
// score matrix never exists. Items are handed out through an atomic counter, which balances the threads. A kv head
// whose panel would exceed the thread's share of kPackBudget floats (on 2 threads 32768 keys of 64 floats; on 16
// threads or more 4096) is not packed: each key tile is widened (or packed as words) from the inputs when a query
// block needs it (1.10-1.15x slower at 1024-2048 keys, as fast from 16384 keys on, where the panel too comes from
// memory).
//
// Memory traffic: q read once, k and v once per work item (once per kv head when there are enough heads to keep the
// threads busy, else by each of its items: shares = 2 x threads / kv heads; unpacked, once per query block and query
// head), the panel once per query block and query head (from L2 for a few hundred keys), out and lse written once.
// Scratch per thread: a panel and a few tiles.
//
// FASTLM_CPU_BF16=aten (or auto with FASTLM_CPU_AMX=off on a CPU with AMX-BF16: gemm.h's bf16_on_aten) runs ATen's
// flash-attention kernel for bf16 instead, where it computes what this kernel does (no window; causal only for
// Sq == Sk; a positive scale). On 2 threads of a Xeon (16 heads of 64, seqlen 2048) this kernel's AMX path runs at
// 920-946 GFLOP/s non-causal and 772-796 causal against ATen's 508-550 and 390-457 (bench/dev/cpu_notes.md).
#include "cpu/amx.h"
#include "cpu/attention.h"
#include "cpu/bf16dot.h"
#include "cpu/gemm.h"
#include "cpu/ops.h"
#include "cpu/output.h"

#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/_scaled_dot_product_flash_attention_for_cpu.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <optional>
#include <vector>

namespace fastlm_cpu {
namespace {

// The inputs as the kernel reads them.
template <typename T>
struct Inputs {
  const T *q, *k, *v;
  Strides qs, ks, vs;
};

// Keys [j, j + n) of kv head hk of batch b widened to fp32: k into rows of D at kd, v into rows of Dv at vd.
template <typename T>
void widen_keys(const Problem& p, const Inputs<T>& in, int64_t b, int64_t hk, int64_t j, int64_t n, float* kd,
                float* vd) {
  widen_rows(in.k + in.ks.of(b, j, hk), in.ks.s, n, p.D, kd, p.D);
  widen_rows(in.v + in.vs.of(b, j, hk), in.vs.s, n, p.D, vd, p.Dv);
}

// Keys [k0, Sk) of one kv head, widened to fp32 rows: k in rows of D, v in rows of Dv (zero padded); for bf16 with
// the dot products (bf16dot.h) as words instead: k2 in rows of D2 = ceil(D / 2) words of pairs along the head dim,
// v2 as key pairs interleaved, rows of Dv words. All null: none, each key tile is then packed from the inputs when
// it is needed.
struct KeyPanel {
  const float *k, *v;
  const uint32_t *k2, *v2;
  int64_t k0;
};

// Words of a bf16 panel of n keys (k2 and v2; the fp32 panel takes n * (D + Dv) floats).
inline int64_t panel_words(const Problem& p, int64_t n) { return n * ((p.D + 1) / 2) + (n + 1) / 2 * p.Dv; }

// The AMX tile products (amx.h) read whole tiles: K^T's words of pairs along the head dim in rows of D2p (a whole
// number of 16-word tile rows, zero padded), and V transposed, kBlockK-key blocks of Dv rows of kBlockK bf16 values
// (the tile product's A operand: rows along the head dim, the key pairs along the reduction), keys past the end zero.
// A panel of n keys holds whole blocks of kBlockK keys: K's words (amx_k_words), then V^T's.
inline int64_t amx_row_words(const Problem& p) { return ((p.D + 1) / 2 + 15) / 16 * 16; }
inline int64_t amx_k_words(const Problem& p, int64_t n) {
  return (n + kBlockK - 1) / kBlockK * kBlockK * amx_row_words(p);
}
inline int64_t amx_panel_words(const Problem& p, int64_t n) {
  return amx_k_words(p, n) + (n + kBlockK - 1) / kBlockK * kBlockK * p.Dv / 2;
}

struct Scratch {
  Floats qt, s, o, m, m_lo, l, alpha, kt, vt;
  std::vector<int64_t> lo, hi;
  std::vector<int32_t> lo32, hi32;  // (bf16) lo and hi from the key tile's first key
  Floats panel;  // the kv head's KeyPanel, when it is packed
  Words qt2, pt2, kt2, panel2;  // the same as words, for the bf16 dot products (vt2 follows kt2)
  // panel_floats: the panel's size (floats or words), 0 for none; tile_words: a key tile's words, as words
  Scratch(const Problem& p, int64_t panel_floats, bool words, int64_t tile_words)
      : qt(words ? 0 : p.D * kBlockQ), s(kBlockK * kBlockQ), o(kBlockQ * p.Dv), m(kBlockQ), m_lo(kBlockQ),
        l(kBlockQ), alpha(kBlockQ), kt(panel_floats || words ? 0 : kBlockK * p.D),
        vt(panel_floats || words ? 0 : kBlockK * p.Dv), lo(kBlockQ), hi(kBlockQ), lo32(kBlockQ), hi32(kBlockQ),
        panel(words ? 0 : panel_floats),
        qt2(words ? amx_row_words(p) * kBlockQ : 0), pt2(words ? kBlockK / 2 * kBlockQ : 0),
        kt2(words && !panel_floats ? tile_words : 0), panel2(words ? panel_floats : 0) {}
};

#if defined(FASTLM_BF16_DOT)
// Rows t0 <= t < t0 + 16 of n bf16 values (row stride ld), values [v0, v0 + 32) read as 16 words of value pairs
// (values past n and rows from `rows` on as 0) and transposed in registers (simd.h): w[p] holds word p of each row.
inline void load_words_transposed(const uint16_t* src, int64_t ld, int64_t t0, int64_t rows, int64_t n, int64_t v0,
                                  __m512i w[16]) {
  const int64_t in = std::clamp<int64_t>(n - v0, 0, 32);
  const __mmask32 in_row = in == 32 ? ~__mmask32{0} : (__mmask32{1} << in) - 1;
  for (int64_t t = 0; t < 16; ++t)
    w[t] = t0 + t < rows ? _mm512_maskz_loadu_epi16(in_row, src + (t0 + t) * ld + v0) : _mm512_setzero_si512();
  transpose16(w);
}
#endif

#if defined(FASTLM_AMX)
// Up to 32 rows of n values (row stride ld; rows past `rows` and values past n read as 0), values [d0, d0 + 32)
// transposed: value d0 + e of row t at dst[e * ldd + t] for e < ne. Each 16 rows, read as words of value pairs, are
// transposed in registers, and the two halves of the words of both 16-row blocks are gathered into rows of 32 values
// (VPERMT2W).
inline void transpose32_bf16(const uint16_t* src, int64_t ld, int64_t rows, int64_t n, int64_t d0, int64_t ne,
                             uint16_t* dst, int64_t ldd) {
  __m512i a[16], b[16];  // a[p], b[p]: the words (value d0 + 2p, d0 + 2p + 1) of rows 0-15, 16-31
  load_words_transposed(src, ld, 0, rows, n, d0, a);
  load_words_transposed(src, ld, 16, rows, n, d0, b);
  // the low (even) and high (odd) halves of a's words, then of b's
  const __m512i ie = _mm512_set_epi16(62, 60, 58, 56, 54, 52, 50, 48, 46, 44, 42, 40, 38, 36, 34, 32, 30, 28, 26, 24,
                                      22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i io = _mm512_add_epi16(ie, _mm512_set1_epi16(1));
  for (int64_t e = 0; e < ne; ++e)
    _mm512_storeu_si512(dst + e * ldd, _mm512_permutex2var_epi16(a[e / 2], e % 2 ? io : ie, b[e / 2]));
}

// Keys [j, j + n) of kv head hk of batch b for the AMX tile products, into kw as amx_panel_words lays them out.
inline void pack_keys_amx(const Problem& p, const Inputs<c10::BFloat16>& in, int64_t b, int64_t hk, int64_t j,
                          int64_t n, uint32_t* kw) {
  const int64_t ldk = amx_row_words(p), np = (n + kBlockK - 1) / kBlockK * kBlockK;
  pair_rows(in.k + in.ks.of(b, j, hk), in.ks.s, n, p.D, kw, ldk);
  std::fill(kw + n * ldk, kw + amx_k_words(p, n), 0u);
  auto* vt = reinterpret_cast<uint16_t*>(kw + amx_k_words(p, n));
  const auto* v = reinterpret_cast<const uint16_t*>(in.v + in.vs.of(b, j, hk));
  for (int64_t t = 0; t < np; t += 32)  // 32 keys at a time, 32 rows of the head dim at a time
    for (int64_t d0 = 0; d0 < p.Dv; d0 += 32)
      transpose32_bf16(v + t * in.vs.s, in.vs.s, std::max<int64_t>(0, n - t), p.D, d0, std::min<int64_t>(32, p.Dv - d0),
                       vt + t / kBlockK * p.Dv * kBlockK + d0 * kBlockK + t % kBlockK, kBlockK);
}
#endif

// Packs keys [j, j + n) of kv head hk of batch b into k (fp32 rows or, for the dot products, words) and v; for the
// AMX tile products (Amx), into kw as amx_panel_words lays them out.
template <typename T, bool Amx>
void pack_keys(const Problem& p, const Inputs<T>& in, int64_t b, int64_t hk, int64_t j, int64_t n, float* kd,
               float* vd, uint32_t* kw) {
#if defined(FASTLM_BF16_DOT)
  if constexpr (kBf16Dot<T>) {
#if defined(FASTLM_AMX)
    if constexpr (Amx) return pack_keys_amx(p, in, b, hk, j, n, kw);
#endif
    const int64_t D2 = (p.D + 1) / 2;
    pair_rows(in.k + in.ks.of(b, j, hk), in.ks.s, n, p.D, kw, D2);
    interleave_rows(in.v + in.vs.of(b, j, hk), in.vs.s, n, p.D, kw + n * D2, p.Dv);
    return;
  }
#endif
  widen_keys(p, in, b, hk, j, n, kd, vd);
}

// kW columns of the n rows of O^T (row stride kBlockQ) times alpha[column]; nothing to do where every factor is 1 (a
// NaN one is not).
inline void scale_column(float* o, int64_t n, const float* alpha) {
  const vfloat a = vload(alpha);
  bool ones = true;
  for (int i = 0; i < kW; ++i) ones = ones && a[i] == 1.0f;
  if (ones) return;
  for (int64_t r = 0; r < n; ++r) vstore(o + r * kBlockQ, vload(o + r * kBlockQ) * a);
}

#if defined(FASTLM_AMX)
// Key tile [j0, j0 + nk) of a query block on the AMX tiles: S^T = K Q^T, the online softmax (P^T as bf16 pairs),
// O^T = alpha O^T + V^T P^T, one column of kW queries at a time (the next column's S^T is issued before this
// column's softmax; measured, the two units still take turns: bench/dev/cpu_notes.md).
// lo32, hi32: the queries' key bounds from the tile's first key, null where every query sees every key.
inline void amx_key_tile(const Problem& p, Scratch& sc, const uint32_t* kt2, const uint32_t* vt2, int64_t nk,
                         int64_t cols, const int32_t* lo32, const int32_t* hi32) {
  static_assert(kW == 16, "a column of queries is one tile wide");
  const int64_t ldk = amx_row_words(p), key_tiles = (nk + 15) / 16, chunks = (nk + 31) / 32;
  const TileOperand k{reinterpret_cast<const char*>(kt2), 16 * ldk * 4, 64, ldk * 4};
  const TileOperand qt{reinterpret_cast<const char*>(sc.qt2.data()), 16 * kBlockQ * 4, 64, kBlockQ * 4};
  const TileOperand vt{reinterpret_cast<const char*>(vt2), 16 * kBlockK * 2, 64, kBlockK * 2};
  const TileOperand pt{reinterpret_cast<const char*>(sc.pt2.data()), 16 * kBlockQ * 4, 64, kBlockQ * 4};
  float* s = sc.s.data();
  tile_column(key_tiles, ldk / 16, k, qt, 0, s, kBlockQ, false);
  for (int64_t g = 0; g < cols / kW; ++g) {
    if ((g + 1) * kW < cols) tile_column(key_tiles, ldk / 16, k, qt, g + 1, s, kBlockQ, false);
    const int64_t c0 = g * kW;
    softmax_columns_bf16(s + c0, kBlockQ, nk, p.scale.c, sc.m.data() + c0, sc.m_lo.data() + c0, sc.l.data() + c0,
                         sc.alpha.data() + c0, sc.pt2.data() + c0, kBlockQ, lo32 ? lo32 + c0 : nullptr,
                         hi32 ? hi32 + c0 : nullptr);
    for (int64_t j = (nk + 1) / 2; j < chunks * 16; ++j)  // the pairs past the last key, to the tile's end: 0
      std::fill_n(sc.pt2.data() + j * kBlockQ + c0, kW, 0u);
    scale_column(sc.o.data() + c0, p.Dv, sc.alpha.data() + c0);
    tile_column(p.Dv / 16, chunks, vt, pt, g, sc.o.data(), kBlockQ, true);
  }
}

// The output rows of a query block from O^T (Dv x kBlockQ): rows r < `rows` of D values at dst + r * ld, O^T's
// column r times inv[r], rounded to bf16 (to nearest even; VCVTNEPS2BF16 reads an fp32 denormal as 0). 16 x 16
// blocks transposed in registers (simd.h), written a 16-value row segment at a time.
inline void store_transposed(const Problem& p, const float* o, const float* inv, int64_t rows, c10::BFloat16* dst,
                             int64_t ld) {
  for (int64_t r0 = 0; r0 < rows; r0 += 16)
    for (int64_t d0 = 0; d0 < p.D; d0 += 16) {  // (d0 + 15 < Dv, r0 + 15 < kBlockQ: whole vectors)
      __m512i t[16];
      for (int e = 0; e < 16; ++e) t[e] = _mm512_loadu_si512(o + (d0 + e) * kBlockQ + r0);
      transpose16(t);
      const __mmask16 part = p.D - d0 >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (p.D - d0)) - 1);
      for (int64_t r = r0; r < std::min(rows, r0 + 16); ++r) {
        const __m512 x = _mm512_mul_ps(_mm512_castsi512_ps(t[r - r0]), _mm512_set1_ps(inv[r]));
        _mm256_mask_storeu_epi16(dst + r * ld + d0, part, (__m256i)_mm512_cvtneps_pbh(x));
      }
    }
}
#endif

// One query block of one head: out and lse of queries [qb * kBlockQ, ...). With Amx (bf16 only) the two tile
// products run on the AMX tiles, the output accumulated transposed (O^T = V^T P^T, Dv x kBlockQ: P^T is what the
// softmax leaves, and alpha scales its columns).
template <typename T, bool Amx>
void attend_block(const Problem& p, const Inputs<T>& in, const KeyPanel& kp, T* out, float* lse, int64_t b,
                  int64_t h, int64_t qb, Scratch& sc) {
  // a block cut short by the sequence's end computes its rows' scores in whole vectors only (cols)
  const int64_t i0 = qb * kBlockQ, rows = std::min(kBlockQ, p.Sq - i0), cols = (rows + kW - 1) / kW * kW;
  const T* q = in.q + in.qs.of(b, i0, h);
  constexpr bool words = kBf16Dot<T>;
  const int64_t D2 = (p.D + 1) / 2, ldk = amx_row_words(p);
#if defined(FASTLM_BF16_DOT)
  if constexpr (words) {  // Q^T as words qt2[pair][query]: the sign of the scale flips sign bits (exact), 0 zeroes
    // a query row's words are its own bytes: 16 x 16 blocks of words transposed in registers (simd.h); padding
    // queries, the value past an odd D and (Amx) the words past D2 read as 0
    const __m512i flip = _mm512_set1_epi32(p.scale.q_sign < 0 ? static_cast<int32_t>(0x80008000u) : 0);
    const __m512i keep = _mm512_set1_epi32(p.scale.q_sign == 0 ? 0 : -1);
    const int64_t words_per_row = Amx ? ldk : D2;
    for (int64_t r0 = 0; r0 < cols; r0 += 16)
      for (int64_t w0 = 0; w0 < words_per_row; w0 += 16) {
        __m512i t[16];
        load_words_transposed(reinterpret_cast<const uint16_t*>(q), in.qs.s, r0, rows, p.D, 2 * w0, t);
        for (int64_t e = 0; e < std::min<int64_t>(16, words_per_row - w0); ++e)
          _mm512_storeu_si512(sc.qt2.data() + (w0 + e) * kBlockQ + r0,
                              _mm512_and_si512(_mm512_xor_si512(t[e], flip), keep));
      }
  }
#endif
  // kW queries at a time: kW x kW blocks transposed in registers (simd.h), the rest (a ragged head dim, a block cut
  // short) an element at a time, a whole vector of qt written at a time; padding queries: scores 0, never written out
  for (int64_t r0 = 0; r0 < cols && !words; r0 += kW) {
    const T* rows_q[kW];
    const int64_t n = std::min<int64_t>(kW, rows - r0);
    for (int64_t r = 0; r < n; ++r) rows_q[r] = q + (r0 + r) * in.qs.s;
    int64_t d = 0;
    for (; n == kW && d + kW <= p.D; d += kW) {
      float* dst = sc.qt.data() + d * kBlockQ + r0;
      transpose_block(rows_q[0] + d, in.qs.s, dst, kBlockQ);
      if (p.scale.q_sign != 1.0f)
        for (int64_t e = 0; e < kW; ++e) vstore(dst + e * kBlockQ, vload(dst + e * kBlockQ) * p.scale.q_sign);
    }
    for (; d < p.D; ++d) {
      vfloat x{};
      for (int64_t r = 0; r < n; ++r) x[r] = to_float(rows_q[r][d]);
      vstore(sc.qt.data() + d * kBlockQ + r0, x * p.scale.q_sign);
    }
  }
  for (int64_t r = 0; r < rows; ++r) sc.lo[r] = p.lo(i0 + r), sc.hi[r] = p.hi(i0 + r);
  std::fill(sc.o.begin(), sc.o.begin() + (Amx ? p.Dv * kBlockQ : rows * p.Dv), 0.0f);
  std::fill(sc.m.begin(), sc.m.end(), kNegInf);
  std::fill(sc.m_lo.begin(), sc.m_lo.end(), 0.0f);
  std::fill(sc.l.begin(), sc.l.end(), 0.0f);
  const int64_t lo = sc.lo[0], hi = sc.hi[rows - 1];  // the union of the rows' key ranges
  for (int64_t j0 = lo / kBlockK * kBlockK; j0 <= hi && lo <= hi; j0 += kBlockK) {
    const int64_t nk = std::min(kBlockK, p.Sk - j0);
    const float *kt = sc.kt.data(), *vt = sc.vt.data();
    const uint32_t *kt2 = nullptr, *vt2 = nullptr;
    if (kp.k) {
      kt = kp.k + (j0 - kp.k0) * p.D, vt = kp.v + (j0 - kp.k0) * p.Dv;
    } else if (kp.k2 && Amx) {
      kt2 = kp.k2 + (j0 - kp.k0) * ldk, vt2 = kp.v2 + (j0 - kp.k0) * p.Dv / 2;
    } else if (kp.k2) {
      kt2 = kp.k2 + (j0 - kp.k0) * D2, vt2 = kp.v2 + (j0 - kp.k0) / 2 * p.Dv;
    } else {
      pack_keys<T, Amx>(p, in, b, h / p.G, j0, nk, sc.kt.data(), sc.vt.data(), sc.kt2.data());
      if constexpr (words) kt2 = sc.kt2.data(), vt2 = kt2 + (Amx ? amx_k_words(p, kBlockK) : nk * D2);
    }
    const bool inside = sc.lo[rows - 1] <= j0 && j0 + kBlockK - 1 <= sc.hi[0];
    const int32_t *lo32 = nullptr, *hi32 = nullptr;  // (bf16) the keys each query sees, from j0
    if (words && !inside) {
      for (int64_t r = 0; r < cols; ++r) {  // (padding queries: none)
        sc.lo32[r] = r < rows ? static_cast<int32_t>(std::clamp<int64_t>(sc.lo[r] - j0, 0, kBlockK)) : 1;
        sc.hi32[r] = r < rows ? static_cast<int32_t>(std::clamp<int64_t>(sc.hi[r] - j0, -1, kBlockK)) : 0;
      }
      lo32 = sc.lo32.data(), hi32 = sc.hi32.data();
    }
#if defined(FASTLM_AMX)
    if constexpr (Amx) {
      amx_key_tile(p, sc, kt2, vt2, nk, cols, lo32, hi32);
      continue;
    }
#endif
#if defined(FASTLM_BF16_DOT)
    if constexpr (words)
      dot_tile(nk, cols, D2, WordsA{kt2, D2, 1}, sc.qt2.data(), kBlockQ, sc.s.data(), kBlockQ, nullptr);
    else
#endif
      gemm_tile(nk, cols, p.D, MatA{kt, p.D, 1}, sc.qt.data(), kBlockQ, sc.s.data(), kBlockQ, nullptr);
    if (!words && !inside) {
      for (int64_t j = 0; j < nk; ++j) {
        float* srow = sc.s.data() + j * kBlockQ;
        for (int64_t r = 0; r < rows; ++r)
          if (j0 + j < sc.lo[r] || j0 + j > sc.hi[r]) srow[r] = kNegInf;
      }
    }
#if defined(FASTLM_BF16_DOT)
    if constexpr (words) {  // P rounded to bf16 (as FlashAttention rounds it for its P V), key pairs interleaved
      for (int64_t r = 0; r < cols; r += kW)
        softmax_columns_bf16(sc.s.data() + r, kBlockQ, nk, p.scale.c, sc.m.data() + r, sc.m_lo.data() + r,
                             sc.l.data() + r, sc.alpha.data() + r, sc.pt2.data() + r, kBlockQ,
                             lo32 ? lo32 + r : nullptr, hi32 ? hi32 + r : nullptr);
      dot_tile(rows, p.Dv, (nk + 1) / 2, WordsA{sc.pt2.data(), 1, kBlockQ}, vt2, p.Dv, sc.o.data(), p.Dv,
               sc.alpha.data());
      continue;
    }
#endif
    for (int64_t r = 0; r < cols; r += kW)
      softmax_columns(sc.s.data() + r, kBlockQ, nk, p.scale.c, sc.m.data() + r, sc.m_lo.data() + r,
                      sc.l.data() + r, sc.alpha.data() + r);
    gemm_tile(rows, p.Dv, nk, MatA{sc.s.data(), 1, kBlockQ}, vt, p.Dv, sc.o.data(), p.Dv, sc.alpha.data());
  }
#if defined(FASTLM_AMX)
  if constexpr (Amx) {  // (alpha, done with, holds 1 / l; rows without keys are written again below)
    for (int64_t r = 0; r < rows; ++r) sc.alpha[r] = 1.0f / sc.l[r];
    store_transposed(p, sc.o.data(), sc.alpha.data(), rows, out + ((b * p.Sq + i0) * p.H + h) * p.D, p.H * p.D);
  }
#endif
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = i0 + r;
    T* dst = out + ((b * p.Sq + i) * p.H + h) * p.D;
    float* lse_i = lse + (b * p.H + h) * p.Sq + i;
    if (sc.m[r] == kNegInf) {  // the query sees no key: out 0, lse -inf
      for (int64_t d = 0; d < p.D; ++d) dst[d] = from_float<T>(0.0f);
      *lse_i = kNegInf;
      continue;
    }
    if constexpr (!Amx) {
      const float* orow = sc.o.data() + r * p.Dv, inv = 1.0f / sc.l[r];
      for (int64_t d = 0; d < p.D; ++d) dst[d] = from_float<T>(orow[d] * inv);
    }
    // in double: m_lo is far below m's ulp, and l was summed with it taken out
    *lse_i = static_cast<float>((double{sc.m[r]} + sc.m_lo[r] + std::log2(double{sc.l[r]})) * 0.6931471805599453);
  }
}

template <typename T, bool Amx>
void attention_kernel(const Problem& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      at::Tensor& out, at::Tensor& lse) {
  const int64_t nqb = (p.Sq + kBlockQ - 1) / kBlockQ, n_kv = p.B * p.Hkv;
  const Inputs<T> in{static_cast<const T*>(q.const_data_ptr()), static_cast<const T*>(k.const_data_ptr()),
                     static_cast<const T*>(v.const_data_ptr()), strides_of(q), strides_of(k), strides_of(v)};
  T* out_p = out.data_ptr<T>();
  float* lse_p = lse.data_ptr<float>();
  const int64_t threads = at::get_num_threads();
  // the keys some query sees, whole tiles: lo() is monotone, and the last query sees the last key (right >= 0)
  const int64_t k0 = p.lo(0) / kBlockK * kBlockK, nk = p.Sk - k0;
  // each thread packs the kv head it works on, when that takes at most its share of kPackBudget (shared by at most 16
  // threads: 2 MB a thread at least, 2048 keys of 128 floats)
  const int64_t budget = kPackBudget / std::min<int64_t>(threads, 16);
  constexpr bool words = kBf16Dot<T>;
  const int64_t panel = nk * (p.D + p.Dv) > budget ? 0
                        : Amx                      ? amx_panel_words(p, nk)
                        : words                    ? panel_words(p, nk)
                                                   : nk * (p.D + p.Dv);
  // Shares per kv head: enough items to keep the threads busy.
  const int64_t shares = std::min(nqb, std::max<int64_t>(1, (2 * threads + n_kv - 1) / n_kv));
  const int64_t n_items = n_kv * shares;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min(threads, n_items), 1, [&](int64_t, int64_t) {
    Scratch sc(p, panel, words, Amx ? amx_panel_words(p, kBlockK) : panel_words(p, kBlockK));
#if defined(FASTLM_AMX)
    std::optional<TileScope> tiles;
    if constexpr (Amx) tiles.emplace();
#endif
    int64_t packed = -1;
    const int64_t D2 = (p.D + 1) / 2, v_off = Amx ? amx_k_words(p, nk) : nk * D2;
    for (int64_t w = next.fetch_add(1); w < n_items; w = next.fetch_add(1)) {
      const int64_t share = w % shares, bk = w / shares, b = bk / p.Hkv, hk = bk % p.Hkv;
      if (panel && bk != packed) {
        pack_keys<T, Amx>(p, in, b, hk, k0, nk, sc.panel.data(), sc.panel.data() + nk * p.D, sc.panel2.data());
        packed = bk;
      }
      KeyPanel kp{};
      if (panel && words)
        kp = KeyPanel{nullptr, nullptr, sc.panel2.data(), sc.panel2.data() + v_off, k0};
      else if (panel)
        kp = KeyPanel{sc.panel.data(), sc.panel.data() + nk * p.D, nullptr, nullptr, k0};
      for (int64_t qb = nqb - 1 - share; qb >= 0; qb -= shares) {
        for (int64_t g = 0; g < p.G; ++g) {
          // the next block's query rows, a row stride apart, come into L2 while this one is computed
          const int64_t next_qb = g + 1 < p.G ? qb : qb - shares, next_h = hk * p.G + (g + 1) % p.G;
          if (next_qb >= 0)
            for (int64_t i = next_qb * kBlockQ; i < std::min(p.Sq, (next_qb + 1) * kBlockQ); ++i)
              prefetch_row<2>(in.q + in.qs.of(b, i, next_h), p.D);
          attend_block<T, Amx>(p, in, kp, out_p, lse_p, b, hk * p.G + g, qb, sc);
        }
      }
    }
  });
}

}  // namespace

Problem attention_problem(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal,
                          double softmax_scale, int64_t window_left, int64_t window_right) {
  TORCH_CHECK(q.dim() == 4, "fastlm::", op, ": q must be 4-D (batch, seqlen_q, nheads, headdim), got shape ",
              q.sizes());
  TORCH_CHECK(k.dim() == 4, "fastlm::", op, ": k must be 4-D (batch, seqlen_k, nheads_kv, headdim), got shape ",
              k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), "fastlm::", op, ": v must have k's shape ", k.sizes(), ", got ",
              v.sizes());
  for (const auto* t : {&q, &k, &v}) {
    const char* name = t == &q ? "q" : (t == &k ? "k" : "v");
    TORCH_CHECK(t->device().is_cpu(), "fastlm::", op, " (CPU): ", name, " must be a CPU tensor, got ",
                t->device());
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), "fastlm::", op, ": ", name, " must have q's dtype ",
                q.scalar_type(), ", got ", t->scalar_type());
    TORCH_CHECK(t->size(3) <= 1 || t->stride(3) == 1 || t->numel() == 0, "fastlm::", op, ": ", name,
                " must have a contiguous last dim (stride 1), got strides ", t->strides());
  }
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "fastlm::", op, ": dtype must be float32, bfloat16 or float16, got ", dtype);
  const int64_t B = q.size(0), Sq = q.size(1), H = q.size(2), D = q.size(3);
  const int64_t Sk = k.size(1), Hkv = k.size(2);
  TORCH_CHECK(k.size(0) == B, "fastlm::", op, ": batch of k/v (", k.size(0), ") must equal batch of q (", B,
              ")");
  TORCH_CHECK(k.size(3) == D, "fastlm::", op, ": headdim of k/v (", k.size(3), ") must equal headdim of q (", D,
              ")");
  TORCH_CHECK(D >= 1, "fastlm::", op, ": headdim must be >= 1, got ", D);
  TORCH_CHECK(Hkv >= 1 && H % Hkv == 0, "fastlm::", op, ": nheads of q (", H,
              ") must be a multiple of nheads of k/v (", Hkv, ")");
  TORCH_CHECK(std::abs(softmax_scale) <= std::numeric_limits<float>::max(),  // (false for NaN)
              "fastlm::", op, ": softmax_scale must be finite in float32, got ", softmax_scale);
  TORCH_CHECK(window_left >= -1 && window_right >= -1,
              "fastlm::", op, ": window values must be >= -1 (-1 = unbounded), got (", window_left, ", ",
              window_right, ")");
  TORCH_CHECK(!causal || window_right <= 0, "fastlm::", op, ": causal means window_right = 0, got ",
              window_right);

  Problem p;
  p.scale = SoftmaxScale(softmax_scale);
  p.B = B, p.Sq = Sq, p.Sk = Sk, p.H = H, p.Hkv = Hkv, p.G = H / Hkv, p.D = D, p.Dv = (D + kW - 1) / kW * kW;
  // a bound of Sq + Sk or more reaches every key; clamping it keeps lo() / hi() from overflowing
  p.left = std::min(window_left, Sq + Sk), p.right = causal ? 0 : std::min(window_right, Sq + Sk);
  return p;
}

std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 bool causal, double softmax_scale, int64_t window_left,
                                                 int64_t window_right) {
  const Problem p = attention_problem("attention_fwd", q, k, v, causal, softmax_scale, window_left, window_right);
  const auto dtype = q.scalar_type();
  at::Tensor out = empty_output(q.sizes(), q.options());
  at::Tensor lse = at::empty({p.B, p.H, p.Sq}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  if (p.Sk == 0) {
    out.zero_();
    lse.fill_(-std::numeric_limits<float>::infinity());
    return {out, lse};
  }
  // bf16: this kernel on the AMX tiles where amx_enabled() (amx.h) unless FASTLM_CPU_BF16=aten; else, where
  // bf16_on_aten() (gemm.h), ATen's flash attention for the problems it computes as fastlm does: no window, causal
  // only for Sq == Sk (its mask is top-left aligned, the same as bottom-right only there), and a positive scale (with
  // a causal mask it gives NaN for a zero or negative one). (Below autograd: this is a kernel, its ATen calls record
  // no graph.)
  const bool bf16 = dtype == at::kBFloat16;  // (FASTLM_CPU_BF16 and FASTLM_CPU_AMX are checked on every bf16 call)
  const Bf16Engine engine = bf16 ? bf16_engine() : Bf16Engine::kFastlm;
  const bool amx = bf16 && amx_enabled() && engine != Bf16Engine::kAten;
  const bool aten = bf16 && !amx && bf16_on_aten(engine);
  if (aten && p.left < 0 && (p.right < 0 || (p.right == 0 && p.Sq == p.Sk)) && softmax_scale > 0) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [o, l] = at::_scaled_dot_product_flash_attention_for_cpu(q.transpose(1, 2), k.transpose(1, 2),
                                                                  v.transpose(1, 2), 0.0, p.right == 0, std::nullopt,
                                                                  softmax_scale);
    at::Tensor ot = o.transpose(1, 2);  // (its memory is (B, Sq, H, D) already; its LSE's is (B, Sq, H))
    return {ot.contiguous(), l.contiguous()};
  }
  with_float_type(dtype, [&](auto tag) {
    using T = decltype(tag);
#if defined(FASTLM_AMX)
    if constexpr (std::is_same_v<T, c10::BFloat16>)
      if (amx) return attention_kernel<T, true>(p, q, k, v, out, lse);
#endif
    attention_kernel<T, false>(p, q, k, v, out, lse);
  });
  return {out, lse};
}

}  // namespace fastlm_cpu
