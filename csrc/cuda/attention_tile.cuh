// Warp-level FlashAttention-2 steps shared by the attention kernels: prefill on mma.sync (attention.cu) and on
// wgmma (attention_sm90.cu), decode (decode.cu); the keys each query row sees (KeyBand, both prefill kernels) and
// the mma.sync kernel's row pointers of a block's Q, K and V (AttentionSlice).
//
// A warp owns 16 query rows. The mma.sync kernels compute S = Q K^T per key tile here (Q and K from shared memory
// through ldmatrix); every kernel updates the online softmax here in the log2 domain (exp2 with log2(e) folded into
// the scale) on accumulators in the m16n8 C layout (the wgmma m64nN layout is that, per warp); the mma.sync kernels
// accumulate O += P V here with P taken straight from the S accumulators (see mma.cuh) and V through ldmatrix.trans.
// Their shared-memory tiles are rows of D elements with a row stride of D + 8: the 16-byte pad puts the 8 rows an
// ldmatrix phase reads into 8 different bank groups, so no swizzle is needed and any D % 16 == 0 works (the wgmma
// kernel uses the 128-byte swizzled tiles of wgmma.cuh instead).
#pragma once

#include <cstdint>

#include "cuda/launchers.h"
#include "cuda/mma.cuh"

namespace fastlm_cuda {

constexpr float kLog2e = 1.4426950408889634f;  // scores are scaled by softmax_scale * log2(e) and exponentiated by exp2

template <int D>
struct TileShape {
  static_assert(D % 32 == 0, "head dim must be a multiple of 32");
  static constexpr int kStride = D + 8;  // elements per shared-memory row
};

// The wgmma kernel's (attention_sm90.cu) tile shape for head dim D, in 64-column slabs of wgmma.cuh's swizzled tiles.
// Host code too: tests/cuda_layout_test.cu prints it for the tensor-core emulation (bench/dev/mma_layout_emu.py).
template <int D>
struct Sm90Shape {
  static_assert(D % 32 == 0 && D <= 256, "head dim: a multiple of 32, at most 256");
  static constexpr int kSlabs = (D + 63) / 64;        // 64-column slabs of a Q, K or V row
  static constexpr int kDo = 64 * kSlabs;             // padded width: O's accumulator columns
  static constexpr int kBlockN = D > 128 ? 64 : 128;  // keys per tile
  static constexpr int kPvN = kDo < 128 ? kDo : 128;  // N of one P V wgmma (kDo / kPvN of them per k step)
  static_assert(kDo % kPvN == 0 && kPvN % 64 == 0, "P V: whole wgmmas over whole 64-column slabs");
};

// copy_rows_async into a padded tile (row stride D + 8 elements).
template <typename T, int ROWS, int D, int NTHREADS, typename RowPtr>
__device__ __forceinline__ void load_rows_async(T* smem, RowPtr row_ptr, const T* base, int tid) {
  copy_rows_async<T, ROWS, D, NTHREADS>([&](int r, int ch) { return smem + r * TileShape<D>::kStride + ch * 8; },
                                        row_ptr, base, tid);
}

// The keys the query rows may see: query i sits at key position i + off, off = seqlen_k - seqlen_q (bottom-right
// alignment), and sees keys [pos - wl, pos + wr] below seqlen_k (wl, wr = -1: unbounded; causal is wr = 0).
struct KeyBand {
  int sk_len, off, wl, wr;

  // [lo(m0), hi(m0, rows)): the keys any of the query rows m0 .. m0 + rows - 1 may see
  __device__ __forceinline__ int lo(int m0) const { return wl >= 0 ? max(0, m0 + off - wl) : 0; }
  __device__ __forceinline__ int hi(int m0, int rows) const {
    return wr >= 0 ? min(sk_len, m0 + rows - 1 + off + wr + 1) : sk_len;
  }
  // whether the keys n0 .. n0 + bn - 1 cross the end of the keys or a band edge of one of those rows
  __device__ __forceinline__ bool needs_mask(int n0, int bn, int m0, int rows) const {
    return n0 + bn > sk_len || (wr >= 0 && n0 + bn - 1 > m0 + off + wr) || (wl >= 0 && n0 < m0 + rows - 1 + off - wl);
  }
  __device__ __forceinline__ static KeyBand of(const AttentionParams& p) {
    return {p.seqlen_k, p.seqlen_k - p.seqlen_q, p.window_left, p.window_right};
  }
  __device__ __forceinline__ bool keeps(int row, int key) const {
    const int pos = row + off;
    return key < sk_len && (wl < 0 || key >= pos - wl) && (wr < 0 || key <= pos + wr);
  }
};

// The (batch b, head h) slice of an attention problem that one block works on: row pointers of Q, K and V (nullptr
// past the sequence ends, rows the tile loaders zero-fill) and the keys the query rows may see.
template <typename T>
struct AttentionSlice {
  const T* q;
  const T* k;
  const T* v;
  int64_t q_ss, k_ss, v_ss;
  int seqlen_q, seqlen_k;
  KeyBand band;

  __device__ __forceinline__ AttentionSlice(const AttentionParams& p, int b, int h)
      : q(static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh),
        k(static_cast<const T*>(p.k) + b * p.k_sb + h / (p.nheads / p.nheads_kv) * p.k_sh),
        v(static_cast<const T*>(p.v) + b * p.v_sb + h / (p.nheads / p.nheads_kv) * p.v_sh),
        q_ss(p.q_ss), k_ss(p.k_ss), v_ss(p.v_ss), seqlen_q(p.seqlen_q), seqlen_k(p.seqlen_k),
        band(KeyBand::of(p)) {}
  __device__ __forceinline__ const T* q_row(int r) const { return r < seqlen_q ? q + r * q_ss : nullptr; }
  __device__ __forceinline__ const T* k_row(int n) const { return n < seqlen_k ? k + n * k_ss : nullptr; }
  __device__ __forceinline__ const T* v_row(int n) const { return n < seqlen_k ? v + n * v_ss : nullptr; }
};

// Online-softmax state of one warp's 16 rows: this lane holds rows g = lane / 4 and g + 8.
template <int D>
struct WarpState {
  float m[2];          // running max of the scaled scores, log2 domain (-inf: no key yet)
  float l[2];          // running sum of exp2(score - m) over this lane's columns (quad-reduced at the end)
  float o[D / 8][4];   // unnormalized output, C-fragment layout over D / 8 column tiles

  __device__ __forceinline__ void init() {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      m[h] = -INFINITY;
      l[h] = 0.f;
    }
#pragma unroll
    for (int j = 0; j < D / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[j][e] = 0.f;
  }
  // o rows g + 8 h *= a (this lane's row h of the two)
  __device__ __forceinline__ void rescale_row(int h, float a) {
#pragma unroll
    for (int j = 0; j < D / 8; ++j) {
      o[j][2 * h] *= a;
      o[j][2 * h + 1] *= a;
    }
  }
  __device__ __forceinline__ void rescale(const float (&alpha)[2]) {
    rescale_row(0, alpha[0]);
    rescale_row(1, alpha[1]);
  }
};

// s = Q K^T for the warp's 16 rows (q: row 0 of them) and NKEYS keys (k: row 0 of them).
template <typename T, int D, int NKEYS>
__device__ __forceinline__ void warp_qk(float (&s)[NKEYS / 8][4], const T* q, const T* k, int lane) {
  constexpr int S = TileShape<D>::kStride;
#pragma unroll
  for (int j = 0; j < NKEYS / 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) s[j][e] = 0.f;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t a[4];
    ldmatrix_x4(a, q + ldsm_a(lane, 0, kk * 16, S));
#pragma unroll
    for (int jp = 0; jp < NKEYS / 16; ++jp) {
      uint32_t b[4];  // keys jp*16 + 0..7 -> b[0], b[1]; keys jp*16 + 8..15 -> b[2], b[3]
      ldmatrix_x4(b, k + ldsm_b(lane, jp * 16, kk * 16, S));
      Mma<T>::run(s[2 * jp], a, b[0], b[1]);
      Mma<T>::run(s[2 * jp + 1], a, b[2], b[3]);
    }
  }
}

// Scale, mask, and fold the tile's scores into the running max and sum; s becomes P = exp2(score - m), and
// on_alpha(h, alpha) gets, per row h of the lane's two, the factor the output accumulated so far must be scaled by.
// keep(row, key) (row 0..15 of the warp, key 0..NKEYS-1 of the tile) is consulted only when need_mask.
template <int D, int NKEYS, typename Keep, typename OnAlpha>
__device__ __forceinline__ void warp_softmax_scores(float (&s)[NKEYS / 8][4], WarpState<D>& st, float scale_log2,
                                                    bool need_mask, Keep keep, int lane, OnAlpha on_alpha) {
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float mx = -INFINITY;
#pragma unroll
    for (int j = 0; j < NKEYS / 8; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float x = s[j][2 * h + e] * scale_log2;
        if (need_mask && !keep(g + 8 * h, j * 8 + 2 * t + e)) x = -INFINITY;
        s[j][2 * h + e] = x;
        mx = fmaxf(mx, x);
      }
    const float m_new = fmaxf(st.m[h], quad_max(mx));
    const float m_safe = m_new == -INFINITY ? 0.f : m_new;  // no key yet: exp2(-inf - 0) = 0, never NaN
    const float alpha = exp2f(st.m[h] - m_safe);
    float sum = 0.f;
#pragma unroll
    for (int j = 0; j < NKEYS / 8; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const float pv = exp2f(s[j][2 * h + e] - m_safe);
        s[j][2 * h + e] = pv;
        sum += pv;
      }
    st.l[h] = st.l[h] * alpha + sum;
    st.m[h] = m_new;
    on_alpha(h, alpha);
  }
}

// warp_softmax_scores with the output rescaled right away.
template <int D, int NKEYS, typename Keep>
__device__ __forceinline__ void warp_softmax(float (&s)[NKEYS / 8][4], WarpState<D>& st, float scale_log2,
                                             bool need_mask, Keep keep, int lane) {
  warp_softmax_scores<D, NKEYS>(s, st, scale_log2, need_mask, keep, lane,
                                [&](int row, float alpha) { st.rescale_row(row, alpha); });
}

// o += P V for the warp's 16 rows; v: row 0 of the tile's NKEYS keys.
template <typename T, int D, int NKEYS>
__device__ __forceinline__ void warp_pv(WarpState<D>& st, const float (&p)[NKEYS / 8][4], const T* v, int lane) {
  constexpr int S = TileShape<D>::kStride;
#pragma unroll
  for (int kk = 0; kk < NKEYS / 16; ++kk) {
    uint32_t a[4];
    a[0] = Mma<T>::pack(p[2 * kk][0], p[2 * kk][1]);
    a[1] = Mma<T>::pack(p[2 * kk][2], p[2 * kk][3]);
    a[2] = Mma<T>::pack(p[2 * kk + 1][0], p[2 * kk + 1][1]);
    a[3] = Mma<T>::pack(p[2 * kk + 1][2], p[2 * kk + 1][3]);
#pragma unroll
    for (int dp = 0; dp < D / 16; ++dp) {
      uint32_t b[4];  // columns dp*16 + 0..7 -> b[0], b[1]; dp*16 + 8..15 -> b[2], b[3]
      ldmatrix_x4_trans(b, v + ldsm_b_trans(lane, kk * 16, dp * 16, S));
      Mma<T>::run(st.o[2 * dp], a, b[0], b[1]);
      Mma<T>::run(st.o[2 * dp + 1], a, b[2], b[3]);
    }
  }
}

// Write the warp's 16 rows (row0 first; rows >= sq_len skipped) of O = o / l to out (row r at out + r * o_ss) and
// LSE = m ln 2 + ln l to lse[r]. A row that saw no key gets O = 0 and LSE = -inf. O's first D of its DS columns are
// written (DS > D: an accumulator padded past the head dim).
template <typename T, int D, int DS>
__device__ __forceinline__ void warp_store(const WarpState<DS>& st, T* out, int64_t o_ss, float* lse, int row0,
                                           int sq_len, int lane) {
  static_assert(D % 8 == 0 && D <= DS, "warp_store: D columns of a DS-column accumulator");
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int row = row0 + g + 8 * hh;
    const float l = quad_sum(st.l[hh]);
    if (row >= sq_len) continue;
    const float inv = l > 0.f ? 1.f / l : 0.f;
    T* orow = out + row * o_ss;
#pragma unroll
    for (int j = 0; j < D / 8; ++j) {
      const uint32_t packed = Mma<T>::pack(st.o[j][2 * hh] * inv, st.o[j][2 * hh + 1] * inv);
      *reinterpret_cast<uint32_t*>(orow + j * 8 + 2 * t) = packed;
    }
    if (t == 0) lse[row] = l > 0.f ? st.m[hh] * 0.6931471805599453f + logf(l) : -INFINITY;
  }
}

}  // namespace fastlm_cuda
