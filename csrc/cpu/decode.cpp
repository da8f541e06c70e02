// Decode attention on the CPU: a few new queries per sequence against its KV cache (Flash-Decoding).
//
// Algorithm: the valid part of each sequence's cache is split into chunks; a work item is (batch, chunk) and walks
// the chunk's blocks of kBlockK keys. Decoding is bound by the bandwidth of reading the cache, so the loops follow
// the cache's memory order: a cache row (one key) holds every kv head, and each step takes kKeys consecutive rows
// and runs through them head by head, so every row is read front to back exactly once while the hardware
// prefetchers stream the kKeys rows in parallel (visiting one head's rows a row stride apart instead touches a new
// page per key and defeats them); rows shorter than a 4 KB page are taken about a page apart, so that each page too
// is read front to back (chunk_step). A kv head's rows serve all G = H / Hkv query heads and all Sq queries
// (M = G * Sq rows), so every K and V byte is read once. Per block: scores by vector dot products, kKeys keys and up
// to four query rows at a time; the online softmax of tile.h in base 2 per row; O += P V, again kKeys value rows and
// up to four rows of O per pass, so O is loaded and stored once per kKeys keys. fp16 caches (bf16 ones without
// AVX512-BF16) are widened in registers as they are loaded; with it, bf16 caches go through its dot products. Rows are
// requested into L2 kAhead rows before their use: the hardware prefetchers alone leave the loads waiting on memory
// between the blocks' arithmetic (fp32, 16k keys: 56-67% of the copy bandwidth instead of 80-89%). Each chunk leaves
// its unnormalized output, running max and sum; a combine pass merges the chunks of each row and writes out.
//
// Memory traffic: each valid K and V row read once (the bandwidth bound of decoding), q read and out written once;
// the partial results (chunks x M x D floats per kv head) are small next to the cache.
#include "cpu/bf16dot.h"
#include "cpu/layout.h"
#include "cpu/ops.h"
#include "cpu/simd.h"
#include "cpu/tile.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace fastlm_cpu {
namespace {

constexpr int64_t kKeys = 4;  // cache rows streamed together: the rows of one dot_rows / axpy_rows call

// The scores' dot products (dot_rows4 below takes four query rows): R (1 or 2) fp32 vectors q_r = q + r * ldq against
// kKeys cache rows k[i] of length D (fp32, bf16 or fp16, widened in registers): s[r * lds + i] = q_r . k[i]. Eight
// named accumulators (arrays of vectors end up on the stack): with two q rows every k vector loaded feeds both, with
// one the even and odd vectors go to separate sets, so there are always eight independent FMA chains.
template <int R, typename T>
inline void dot_rows(const float* q, int64_t ldq, const T* const* k, int64_t D, float* s, int64_t lds) {
  static_assert(kKeys == 4 && (R == 1 || R == 2), "dot_rows: four k rows, one or two q rows");
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
      for (int i = 0; i < kKeys; ++i) s[r * lds + i] += q[r * ldq + d] * to_float(k[i][d]);
}

// The scores of four q rows (q + r * ldq) against kKeys cache rows: sixteen accumulators, each k and q vector loaded
// feeds four FMAs (half a load per FMA, against three quarters for two rows).
template <typename T>
inline void dot_rows4(const float* q, int64_t ldq, const T* const* k, int64_t D, float* s, int64_t lds) {
  static_assert(kKeys == 4, "dot_rows4: four k rows");
  const int64_t full = D / kW * kW;
  const float *q1 = q + ldq, *q2 = q + 2 * ldq, *q3 = q + 3 * ldq;
  vfloat a00{}, a01{}, a02{}, a03{}, a10{}, a11{}, a12{}, a13{};
  vfloat a20{}, a21{}, a22{}, a23{}, a30{}, a31{}, a32{}, a33{};
  for (int64_t c = 0; c < full; c += kW) {
    const vfloat k0 = vload_cvt(k[0] + c), k1 = vload_cvt(k[1] + c), k2 = vload_cvt(k[2] + c),
                 k3 = vload_cvt(k[3] + c);
    vfloat x = vload(q + c);
    keep_in_register(x);
    a00 = vfma(x, k0, a00), a01 = vfma(x, k1, a01), a02 = vfma(x, k2, a02), a03 = vfma(x, k3, a03);
    x = vload(q1 + c);
    keep_in_register(x);
    a10 = vfma(x, k0, a10), a11 = vfma(x, k1, a11), a12 = vfma(x, k2, a12), a13 = vfma(x, k3, a13);
    x = vload(q2 + c);
    keep_in_register(x);
    a20 = vfma(x, k0, a20), a21 = vfma(x, k1, a21), a22 = vfma(x, k2, a22), a23 = vfma(x, k3, a23);
    x = vload(q3 + c);
    keep_in_register(x);
    a30 = vfma(x, k0, a30), a31 = vfma(x, k1, a31), a32 = vfma(x, k2, a32), a33 = vfma(x, k3, a33);
  }
  hsum4(a00, a01, a02, a03, s);
  hsum4(a10, a11, a12, a13, s + lds);
  hsum4(a20, a21, a22, a23, s + 2 * lds);
  hsum4(a30, a31, a32, a33, s + 3 * lds);
  for (int r = 0; r < 4; ++r)
    for (int64_t d = full; d < D; ++d)
      for (int i = 0; i < kKeys; ++i) s[r * lds + i] += q[r * ldq + d] * to_float(k[i][d]);
}

// bf16 caches on the AVX512-BF16 dot products (bf16dot.h; kBf16Dot<T>): rows are taken in segments of kSeg elements
// (16 pair words, one vector), a row's last segment loaded under a mask. Scores: the query rows as pair words against
// the key rows read as they lie. P V: P rounded to bf16 as words of consecutive block entries, against the value rows
// of a pass paired by unpacking (rows 0 and 1, rows 2 and 3), which takes each segment's elements in the order of
// seg_lane: the output rows of a chunk keep that order until the combine.
constexpr int64_t kSeg = 32;

// Where element e (0 <= e < kSeg) of a segment sits in the output rows: unpacking 16-bit elements pairs the low four
// of each 128-bit lane (eight elements) into the first 16 floats, the high four into the last 16.
constexpr int64_t seg_lane(int64_t e) { return (e % 8 < 4 ? 0 : 16) + e / 8 * 4 + e % 4; }

#if defined(FASTLM_BF16_DOT)
inline __m512i load_seg(const c10::BFloat16* p, int64_t n) {  // min(n, kSeg) elements, zeros past them
  return n >= kSeg ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi16((__mmask32)((uint64_t{1} << n) - 1), p);
}

// s[r * lds + i] = q_r . k[i] for R query rows as pair words (qw + r * ldw, zero past D) and kKeys bf16 key rows.
template <int R>
inline void dot_rows_bf16(const uint32_t* qw, int64_t ldw, const c10::BFloat16* const* k, int64_t D, float* s,
                          int64_t lds) {
  __m512 acc[R][kKeys];
  for (auto& row : acc)
    for (auto& a : row) a = _mm512_setzero_ps();
  for (int64_t c = 0; c < D; c += kSeg) {
    __m512bh kv[kKeys];
    for (int i = 0; i < kKeys; ++i) kv[i] = (__m512bh)load_seg(k[i] + c, D - c);
    for (int r = 0; r < R; ++r) {
      const __m512bh x = (__m512bh)_mm512_loadu_si512(qw + r * ldw + c / 2);
      for (int i = 0; i < kKeys; ++i) acc[r][i] = _mm512_dpbf16_ps(acc[r][i], x, kv[i]);
    }
  }
  for (int r = 0; r < R; ++r) hsum4(acc[r][0], acc[r][1], acc[r][2], acc[r][3], s + r * lds);
}

// o_r += sum_i p_r[i] v[i] for R output rows (o + r * ldo, in seg_lane order) over kKeys bf16 value rows, p_r the
// words (p_r[0], p_r[1]), (p_r[2], p_r[3]) at pw + r * ldp.
template <int R>
inline void axpy_rows_bf16(const uint32_t* pw, int64_t ldp, const c10::BFloat16* const* v, int64_t D, float* o,
                           int64_t ldo) {
  static_assert(kKeys == 4, "axpy_rows_bf16: two pairs of value rows");
  __m512bh p01[R], p23[R];
  for (int r = 0; r < R; ++r) {
    p01[r] = (__m512bh)_mm512_set1_epi32(static_cast<int>(pw[r * ldp]));
    p23[r] = (__m512bh)_mm512_set1_epi32(static_cast<int>(pw[r * ldp + 1]));
  }
  for (int64_t c = 0; c < D; c += kSeg) {
    const __m512i v0 = load_seg(v[0] + c, D - c), v1 = load_seg(v[1] + c, D - c);
    const __m512i v2 = load_seg(v[2] + c, D - c), v3 = load_seg(v[3] + c, D - c);
    const __m512bh w01lo = (__m512bh)_mm512_unpacklo_epi16(v0, v1), w01hi = (__m512bh)_mm512_unpackhi_epi16(v0, v1);
    const __m512bh w23lo = (__m512bh)_mm512_unpacklo_epi16(v2, v3), w23hi = (__m512bh)_mm512_unpackhi_epi16(v2, v3);
    for (int r = 0; r < R; ++r) {
      float* out = o + r * ldo + c;
      __m512 lo = _mm512_loadu_ps(out), hi = _mm512_loadu_ps(out + 16);
      lo = _mm512_dpbf16_ps(_mm512_dpbf16_ps(lo, p01[r], w01lo), p23[r], w23lo);
      hi = _mm512_dpbf16_ps(_mm512_dpbf16_ps(hi, p01[r], w01hi), p23[r], w23hi);
      _mm512_storeu_ps(out, lo);
      _mm512_storeu_ps(out + 16, hi);
    }
  }
}
#endif

constexpr int64_t kBlockK = 64;     // keys per softmax block; a multiple of kW and of kKeys
constexpr int64_t kPage = 4096;     // bytes the hardware prefetchers stream within
constexpr int64_t kMinChunk = 256;  // keys per work item at least (amortizes the per-item set-up)
constexpr int64_t kAhead = kBlockK / 2;  // software prefetch distance in cache rows (into L2)

struct Problem {
  // M = G * Sq rows per kv head; Dv: D padded to whole vectors (to whole kSeg segments on the bf16 dot products)
  int64_t B, Sq, H, Hkv, G, M, D, Dv;
  int64_t chunk, n_chunks;
  int64_t interleave;  // r: consecutive cache rows that share a 4 KB page (1 when a row fills a page or more)
  int64_t window_left;  // a query at position i sees keys i - window_left .. i; -1: from 0
  SoftmaxScale scale;
};

// Per-thread state of a work item, for all kv heads: query rows (fp32, zero padded to Dv) and the scores of one
// block, cache-line aligned (read and written as whole vectors); row (hk, r) is at index hk * M + r.
struct Scratch {
  Floats q, s;
  Words qw, pw;  // the bf16 dot products' query rows (Dv / 2 words a row) and rounded P (kBlockK / 2 words a row)
  Scratch(const Problem& p, bool words)
      : q(p.Hkv * p.M * p.Dv), s(p.Hkv * p.M * kBlockK), qw(words ? p.Hkv * p.M * p.Dv / 2 : 0),
        pw(words ? p.Hkv * p.M * kBlockK / 2 : 0) {}
};

// o_r[0..D) += sum_i p_r[i] v[i] for R output rows (o + r * ldo, probabilities p + r * ldp) over kKeys value rows;
// every value vector loaded feeds R rows.
template <int R, typename T>
inline void axpy_rows(const float* p, int64_t ldp, const T* const* v, int64_t D, float* o, int64_t ldo) {
  const int64_t full = D / kW * kW;
  vfloat pv[R][kKeys];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < kKeys; ++i) pv[r][i] = vset1(p[r * ldp + i]);
  for (int64_t c = 0; c < full; c += kW) {
    vfloat vv[kKeys];
    for (int i = 0; i < kKeys; ++i) vv[i] = vload_cvt(v[i] + c);
    for (int r = 0; r < R; ++r) {
      vfloat acc = vload(o + r * ldo + c);
      for (int i = 0; i < kKeys; ++i) acc = vfma(pv[r][i], vv[i], acc);
      vstore(o + r * ldo + c, acc);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int64_t d = full; d < D; ++d)
      for (int i = 0; i < kKeys; ++i) o[r * ldo + d] += p[r * ldp + i] * to_float(v[i][d]);
}

// Pointers to head hk of block rows j, j + r, ..., j + (kKeys - 1) r; rows past the block's nb repeat row nb - 1
// (their scores are masked, so they contribute nothing) to keep every read inside the cache.
template <typename T>
inline void block_rows(const T* base, Strides st, int64_t hk, int64_t j, int64_t r, int64_t nb, const T** rows) {
  for (int64_t i = 0; i < kKeys; ++i) rows[i] = base + st.of(0, std::min(j + i * r, nb - 1), hk);
}

// Asks for the cache lines of head hk in rows j, j + r, ..., j + (kKeys - 1) r (those below n_rows) ahead of use.
template <typename T>
inline void prefetch_rows(const T* base, Strides st, int64_t hk, int64_t j, int64_t r, int64_t n_rows, int64_t D) {
  for (int64_t i = j; i < std::min(j + kKeys * r, n_rows); i += r) prefetch_row<2>(base + st.of(0, i, hk), D);
}

// Start of a chunk: the query rows of every kv head (fp32, sign of the scale applied) into sc.q, and as pair words
// into sc.qw where it is used (bf16 queries times a sign are bf16: the words hold them exactly); the chunk's
// unnormalized outputs po (Hkv x M x Dv), running maxima pm and sums pl (Hkv x M) reset.
template <typename T>
void chunk_init(const Problem& p, const T* q, Strides qs, int64_t b, Scratch& sc, float* po, float* pm, float* pl) {
  for (int64_t row = 0; row < p.Hkv * p.M; ++row) {
    const int64_t hk = row / p.M, r = row % p.M, g = r / p.Sq, i = r % p.Sq;
    const T* src = q + qs.of(b, i, hk * p.G + g);
    float* dst = sc.q.data() + row * p.Dv;
    for (int64_t d = 0; d < p.D; ++d) dst[d] = to_float(src[d]) * p.scale.q_sign;
    for (int64_t d = p.D; d < p.Dv; ++d) dst[d] = 0.0f;
    if (!sc.qw.empty()) {
      auto top = [](float x) { uint32_t w; std::memcpy(&w, &x, 4); return w >> 16; };
      for (int64_t w = 0; w < p.Dv / 2; ++w)
        sc.qw[row * p.Dv / 2 + w] = top(dst[2 * w]) | top(dst[2 * w + 1]) << 16;
    }
    pm[row] = kNegInf;
    pl[row] = 0.0f;
  }
  std::fill(po, po + p.Hkv * p.M * p.Dv, 0.0f);
}

// Keys [j0, j0 + nb) of sequence b (valid length n), every kv head. k and v point at the block's first row.
//
// Walk order: a group of kKeys * r keys (r = p.interleave rows per page) is taken in r passes, pass t over keys
// j + t, j + t + r, ..., so that the kKeys rows of a pass lie about a page apart and each page is read front to
// back, head by head, one pass after another, as when rows fill a page (kKeys consecutive rows of a shared page are
// read in interleaved pieces, which the prefetchers follow worse: 1.1-1.4x slower for 1-2 KB rows). Scores are stored
// pass by pass: block entry j + t kKeys + i holds key j + t + i r; the softmax does not care about the order and P V
// reads them back the same way.
template <typename T>
void chunk_step(const Problem& p, const T* k, const T* v, Strides ks, Strides vs, int64_t n, int64_t j0, int64_t nb,
                float* po, float* pm, float* pl, Scratch& sc) {
  // a block cut short (a sequence's last) takes rows in order: its passes would repeat row nb - 1 for the rest
  const int64_t rows = p.Hkv * p.M, r = nb == kBlockK ? p.interleave : 1, group = kKeys * r;
  // The passes of the walk: f(hk, first, at) for every kv head of pass (j, t), whose rows are first, first + r, ...
  // and whose scores sit at block entries at .. at + kKeys - 1.
  auto for_each_pass = [&](auto f) {
    for (int64_t j = 0; j < nb; j += group)
      for (int64_t t = 0; t < r; ++t)
        for (int64_t hk = 0; hk < p.Hkv; ++hk) f(hk, j + t, j + t * kKeys);
  };
  // Scores (entries of keys past nb are masked below)
  for_each_pass([&](int64_t hk, int64_t first, int64_t at) {
    const T* kr[kKeys];
    block_rows(k, ks, hk, first, r, nb, kr);
    if (first + kAhead < nb)  // the K rows ahead, near the block's end the first V rows
      prefetch_rows(k, ks, hk, first + kAhead, r, nb, p.D);
    else
      prefetch_rows(v, vs, hk, first + kAhead - nb, r, nb, p.D);
    const int64_t end = (hk + 1) * p.M;
    int64_t row = hk * p.M;
    float* s = sc.s.data() + at;
    if constexpr (kBf16Dot<T>) {
#if defined(FASTLM_BF16_DOT)
      const int64_t ldw = p.Dv / 2;
      const uint32_t* qw = sc.qw.data();
      for (; row + 4 <= end; row += 4) dot_rows_bf16<4>(qw + row * ldw, ldw, kr, p.D, s + row * kBlockK, kBlockK);
      for (; row < end; ++row) dot_rows_bf16<1>(qw + row * ldw, ldw, kr, p.D, s + row * kBlockK, kBlockK);
#endif
    } else {
      for (; row + 4 <= end; row += 4) dot_rows4(sc.q.data() + row * p.Dv, p.Dv, kr, p.D, s + row * kBlockK, kBlockK);
      for (; row + 2 <= end; row += 2)
        dot_rows<2>(sc.q.data() + row * p.Dv, p.Dv, kr, p.D, s + row * kBlockK, kBlockK);
      if (row < end) dot_rows<1>(sc.q.data() + row * p.Dv, p.Dv, kr, p.D, s + row * kBlockK, kBlockK);
    }
  });
  for (int64_t row = 0; row < rows; ++row) {
    // query i sits at position n - Sq + i and sees keys [first, visible) of the block: up to it, and with a window
    // from window_left before it
    const int64_t pos = n - p.Sq + row % p.Sq - j0;
    const int64_t visible = std::clamp<int64_t>(pos + 1, 0, nb);
    const int64_t first = p.window_left < 0 ? 0 : std::clamp<int64_t>(pos - p.window_left, 0, nb);
    float* sr = sc.s.data() + row * kBlockK;
    if (r == 1) {
      std::fill(sr, sr + first, kNegInf);
      std::fill(sr + visible, sr + kBlockK, kNegInf);
    } else if (visible < kBlockK || first > 0) {
      for (int64_t e = 0; e < kBlockK; ++e) {  // entry e = j + t kKeys + i holds key j + t + i r
        const int64_t key = e / group * group + e % kKeys * r + e % group / kKeys;
        if (key >= visible || key < first) sr[e] = kNegInf;
      }
    }
    const float alpha = softmax_row(sr, kBlockK, p.scale.c, pm[row], pl[row]);
    if (alpha != 1.0f) {
      float* o = po + row * p.Dv;
      for (int64_t d = 0; d < p.Dv; d += kW) vstore(o + d, vset1(alpha) * vload(o + d));
    }
#if defined(FASTLM_BF16_DOT)
    if constexpr (kBf16Dot<T>) {  // P rounded to bf16 for the P V products (the sums l above are of the fp32 P)
      uint32_t* pw = sc.pw.data() + row * (kBlockK / 2);
      for (int64_t e = 0; e < kBlockK; e += 32)
        _mm512_storeu_si512(pw + e / 2, (__m512i)_mm512_cvtne2ps_pbh(vload(sr + e + 16), vload(sr + e)));
    }
#endif
  }
  // O += P V (masked entries have P = 0)
  for_each_pass([&](int64_t hk, int64_t first, int64_t at) {
    const T* vr[kKeys];
    block_rows(v, vs, hk, first, r, nb, vr);
    // the V rows ahead, near the block's end the first K rows of the next block
    const bool in_v = first + kAhead < nb;
    prefetch_rows(in_v ? v : k, in_v ? vs : ks, hk, first + kAhead, r, n - j0, p.D);
    const int64_t end = (hk + 1) * p.M;
    int64_t row = hk * p.M;
    if constexpr (kBf16Dot<T>) {
#if defined(FASTLM_BF16_DOT)
      constexpr int64_t ldp = kBlockK / 2;
      const uint32_t* pw = sc.pw.data() + at / 2;
      for (; row + 4 <= end; row += 4) axpy_rows_bf16<4>(pw + row * ldp, ldp, vr, p.D, po + row * p.Dv, p.Dv);
      for (; row < end; ++row) axpy_rows_bf16<1>(pw + row * ldp, ldp, vr, p.D, po + row * p.Dv, p.Dv);
#endif
    } else {
      const float* s = sc.s.data() + at;
      for (; row + 4 <= end; row += 4) axpy_rows<4>(s + row * kBlockK, kBlockK, vr, p.D, po + row * p.Dv, p.Dv);
      for (; row + 2 <= end; row += 2) axpy_rows<2>(s + row * kBlockK, kBlockK, vr, p.D, po + row * p.Dv, p.Dv);
      if (row < end) axpy_rows<1>(s + row * kBlockK, kBlockK, vr, p.D, po + row * p.Dv, p.Dv);
    }
  });
}

// lens[b]: the valid length of sequence b; firsts[b]: the first key any of its queries sees.
template <typename T>
void decode_kernel(const Problem& p, const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc,
                   const std::vector<int64_t>& lens, const std::vector<int64_t>& firsts, at::Tensor& out) {
  const int64_t n_items = p.B * p.Hkv * p.n_chunks;
  at::Tensor part_o = at::empty({n_items * p.M * p.Dv}, q.options().dtype(at::kFloat));
  at::Tensor part_ml = at::empty({n_items * p.M * 2}, q.options().dtype(at::kFloat));
  float* po = part_o.data_ptr<float>();
  float* pm = part_ml.data_ptr<float>();
  float* pl = pm + n_items * p.M;
  const Strides qs = strides_of(q), ks = strides_of(kc), vs = strides_of(vc);
  const T* qp = q.const_data_ptr<T>();
  const T* kp = kc.const_data_ptr<T>();
  const T* vp = vc.const_data_ptr<T>();

  // A work item is (sequence, chunk) over all kv heads; its partial results are rows [w * rows, (w + 1) * rows).
  const int64_t rows = p.Hkv * p.M;
  const int64_t n_work = p.B * p.n_chunks;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), n_work), 1, [&](int64_t, int64_t) {
    Scratch sc(p, kBf16Dot<T>);
    for (int64_t w = next.fetch_add(1); w < n_work; w = next.fetch_add(1)) {
      const int64_t c = w % p.n_chunks, b = w / p.n_chunks, n = lens[b];
      const int64_t j_begin = std::min(firsts[b] + c * p.chunk, n), j_end = std::min(j_begin + p.chunk, n);
      float *o = po + w * rows * p.Dv, *m = pm + w * rows, *l = pl + w * rows;
      // the chunk's first K rows (chunk_step asks for each later one kAhead rows before its use)
      for (int64_t j = 0; j < kAhead; j += kKeys)
        for (int64_t hk = 0; hk < p.Hkv; ++hk)
          prefetch_rows(kp + ks.of(b, j_begin, 0), ks, hk, j, 1, j_end - j_begin, p.D);
      chunk_init<T>(p, qp, qs, b, sc, o, m, l);
      for (int64_t j0 = j_begin; j0 < j_end; j0 += kBlockK)
        chunk_step<T>(p, kp + ks.of(b, j0, 0), vp + vs.of(b, j0, 0), ks, vs, n, j0,
                      std::min(kBlockK, j_end - j0), o, m, l, sc);
    }
  });

  // Combine: out_r = sum_c 2^(m_c - m) o_c / sum_c 2^(m_c - m) l_c with m = max_c m_c.
  T* optr = out.data_ptr<T>();
  at::parallel_for(0, p.B * p.Hkv * p.M, 16, [&](int64_t begin, int64_t end) {
    Floats acc(p.Dv);
    for (int64_t w = begin; w < end; ++w) {
      const int64_t r = w % p.M, bh = w / p.M, b = bh / p.Hkv, hk = bh % p.Hkv;
      const int64_t g = r / p.Sq, i = r % p.Sq;
      T* dst = optr + ((b * p.Sq + i) * p.H + hk * p.G + g) * p.D;
      auto part = [&](int64_t c) { return (b * p.n_chunks + c) * rows + hk * p.M + r; };  // partial-result row
      float m = kNegInf;
      for (int64_t c = 0; c < p.n_chunks; ++c) {
        const float mc = pm[part(c)];
        if (mc > m || mc != mc) m = mc;  // a NaN maximum sticks
      }
      if (m == kNegInf) {  // the query sees no key
        for (int64_t d = 0; d < p.D; ++d) dst[d] = from_float<T>(0.0f);
        continue;
      }
      std::fill(acc.begin(), acc.end(), 0.0f);
      float l = 0.0f;
      for (int64_t c = 0; c < p.n_chunks; ++c) {
        const float mc = pm[part(c)];
        if (mc == kNegInf) continue;  // a chunk without visible keys
        const float f = std::exp2(mc - m);
        l += f * pl[part(c)];
        const float* oc = po + part(c) * p.Dv;
        for (int64_t d = 0; d < p.Dv; d += kW)
          vstore(acc.data() + d, vfma(vset1(f), vload(oc + d), vload(acc.data() + d)));
      }
      const float inv = 1.0f / l;
      if constexpr (kBf16Dot<T>) {  // the bf16 dot products' rows hold each segment in seg_lane order
        for (int64_t d = 0; d < p.D; ++d) dst[d] = from_float<T>(acc[d / kSeg * kSeg + seg_lane(d % kSeg)] * inv);
      } else {
        for (int64_t d = 0; d < p.D; ++d) dst[d] = from_float<T>(acc[d] * inv);
      }
    }
  });
}

}  // namespace

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& cache_seqlens, double softmax_scale, int64_t window_left) {
  TORCH_CHECK(q.dim() == 4, "fastlm::decode_attention: q must be 4-D (batch, seqlen_q, nheads, headdim), got shape ",
              q.sizes());
  TORCH_CHECK(k_cache.dim() == 4,
              "fastlm::decode_attention: k_cache must be 4-D (batch, max_seqlen, nheads_kv, headdim), got shape ",
              k_cache.sizes());
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), "fastlm::decode_attention: v_cache must have k_cache's shape ",
              k_cache.sizes(), ", got ", v_cache.sizes());
  for (const auto* t : {&q, &k_cache, &v_cache}) {
    const char* name = t == &q ? "q" : (t == &k_cache ? "k_cache" : "v_cache");
    TORCH_CHECK(t->device().is_cpu(), "fastlm::decode_attention (CPU): ", name, " must be a CPU tensor, got ",
                t->device());
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), "fastlm::decode_attention: ", name, " must have q's dtype ",
                q.scalar_type(), ", got ", t->scalar_type());
    TORCH_CHECK(t->size(3) <= 1 || t->stride(3) == 1 || t->numel() == 0, "fastlm::decode_attention: ", name,
                " must have a contiguous last dim (stride 1), got strides ", t->strides());
  }
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "fastlm::decode_attention: dtype must be float32, bfloat16 or float16, got ", dtype);
  const int64_t B = q.size(0), Sq = q.size(1), H = q.size(2), D = q.size(3);
  const int64_t S_max = k_cache.size(1), Hkv = k_cache.size(2);
  TORCH_CHECK(k_cache.size(0) == B, "fastlm::decode_attention: batch of the caches (", k_cache.size(0),
              ") must equal batch of q (", B, ")");
  TORCH_CHECK(k_cache.size(3) == D, "fastlm::decode_attention: headdim of the caches (", k_cache.size(3),
              ") must equal headdim of q (", D, ")");
  TORCH_CHECK(D >= 1, "fastlm::decode_attention: headdim must be >= 1, got ", D);
  TORCH_CHECK(Hkv >= 1 && H % Hkv == 0, "fastlm::decode_attention: nheads of q (", H,
              ") must be a multiple of nheads of the caches (", Hkv, ")");
  TORCH_CHECK(cache_seqlens.device().is_cpu(), "fastlm::decode_attention (CPU): cache_seqlens must be a CPU tensor, "
              "got ", cache_seqlens.device());
  TORCH_CHECK(cache_seqlens.scalar_type() == at::kInt || cache_seqlens.scalar_type() == at::kLong,
              "fastlm::decode_attention: cache_seqlens must be int32 or int64, got ", cache_seqlens.scalar_type());
  TORCH_CHECK(cache_seqlens.dim() == 1 && cache_seqlens.size(0) == B,
              "fastlm::decode_attention: cache_seqlens must have shape (batch,) = (", B, ",), got ",
              cache_seqlens.sizes());
  TORCH_CHECK(std::abs(softmax_scale) <= std::numeric_limits<float>::max(),  // (false for NaN)
              "fastlm::decode_attention: softmax_scale must be finite in float32, got ", softmax_scale);
  TORCH_CHECK(window_left >= -1, "fastlm::decode_attention: window_left must be >= -1 (-1: no window), got ",
              window_left);
  // a window reaching past the cache's start from any position is no window (and keeps the position arithmetic
  // from overflowing: window_left may be up to 2^63 - 1)
  if (window_left >= k_cache.size(1)) window_left = -1;

  at::Tensor out = at::empty({B, Sq, H, D}, q.options());
  if (out.numel() == 0) return out;

  // Lengths are clamped into [0, S_max], as the GPU kernels do (they cannot check without a host sync). With a
  // window only the keys from the first query's window start on are read.
  std::vector<int64_t> lens(B), firsts(B);
  int64_t max_len = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t at_b = b * cache_seqlens.stride(0);
    const int64_t n = cache_seqlens.scalar_type() == at::kInt ? cache_seqlens.const_data_ptr<int32_t>()[at_b]
                                                              : cache_seqlens.const_data_ptr<int64_t>()[at_b];
    lens[b] = std::clamp<int64_t>(n, 0, S_max);
    firsts[b] = window_left < 0 ? 0 : std::clamp<int64_t>(lens[b] - Sq - window_left, 0, lens[b]);
    max_len = std::max(max_len, lens[b] - firsts[b]);
  }

  Problem p;
  p.scale = SoftmaxScale(softmax_scale);
  p.window_left = window_left;
  p.B = B, p.Sq = Sq, p.H = H, p.Hkv = Hkv, p.G = H / Hkv, p.M = p.G * Sq, p.D = D;
  p.Dv = (D + kW - 1) / kW * kW;
  // Enough chunks to keep every thread busy (about 4 work items per thread), none shorter than kMinChunk keys.
  const int64_t want = std::max<int64_t>(1, (4 * at::get_num_threads() + B - 1) / B);
  p.chunk = std::max(kMinChunk, (max_len + want - 1) / want);
  p.chunk = (p.chunk + kBlockK - 1) / kBlockK * kBlockK;
  p.n_chunks = std::max<int64_t>(1, (max_len + p.chunk - 1) / p.chunk);
  // Rows that hold every kv head side by side (the (B, S, Hkv, D) cache) and are shorter than a page share pages;
  // kKeys * interleave stays a power of two dividing kBlockK
  static_assert((kBlockK & (kBlockK - 1)) == 0 && kBlockK % (2 * kKeys) == 0, "kBlockK: a power of two, >= 2 kKeys");
  p.interleave = 1;
  const int64_t row_bytes = std::max(k_cache.stride(1) * k_cache.element_size(),
                                     v_cache.stride(1) * v_cache.element_size());
  if (k_cache.stride(2) * Hkv <= k_cache.stride(1) && v_cache.stride(2) * Hkv <= v_cache.stride(1))
    while (2 * p.interleave * row_bytes <= kPage && 2 * p.interleave * kKeys <= kBlockK) p.interleave *= 2;

  with_float_type(dtype, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (kBf16Dot<T>) p.Dv = (D + kSeg - 1) / kSeg * kSeg;  // whole segments of the bf16 dot products
    decode_kernel<T>(p, q, k_cache, v_cache, lens, firsts, out);
  });
  return out;
}

}  // namespace fastlm_cpu
