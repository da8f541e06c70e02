// Softmax attention backward on the CPU, FlashAttention-2 style: dQ, dK, dV by recomputing the probabilities from
// the forward's log-sum-exp, never materializing an S x S matrix.
//
// With s_ij = scale * q_i . k_j, P_ij = exp(s_ij - lse_i), delta_i = sum_d dO_id O_id - dlse_i (dlse: an optional
// gradient arriving at lse itself, since d lse_i / d s_ij = P_ij):
//     dV = P^T dO,   dP = dO V^T,   dS = P * (dP - delta),   dQ = scale * dS K,   dK = scale * dS^T Q.
//
// Algorithm: first K and V, Q and dO are widened to fp32 and packed head-major in one pass over the rows
// (for_rows_of_heads: one head's rows are a page apart in the (batch, seqlen, heads, headdim) layout), and delta is
// computed for every query row; problems larger than kPackBudget floats go in chunks of kv heads. Then a work item is
// (batch, kv head): the thread keeps fp32 dK, dV accumulators (Sk x Dv), and for each query head of the GQA group and
// each block of kBlockQ queries it transposes Q and dO and streams the visible key tiles (the forward's mask
// geometry: tiles outside the causal/window mask are skipped, tiles inside it are not masked):
//   S^T = K Q^T,  P^T = 2^(S^T c - lse log2 e)     keys as rows, so the per-query statistics are lane-wise
//   dV += P^T dO,  dP^T = V dO^T,  dS^T = scale P^T (dP^T - delta)
//   dK += dS^T Q,  dQ += dS K                       dQ of the block is complete after its last tile
// Owning a whole kv head makes the item the only writer of its dK/dV (summed over the group's heads) and of the dQ of
// its query heads: no atomics, no partial buffers. With fewer kv heads than threads (batch 1, GQA) the work is split
// in two passes instead: dK/dV by (batch, kv head, key chunk), then dQ by (batch, head, share of the query blocks),
// each recomputing P and dP (7 tile products per tile pair instead of 5, all threads busy). All arithmetic is fp32;
// outputs are rounded once.
//
// Memory traffic: q, k, v, dO and out read once (packing), the packed K/V once per item and the packed Q/dO once per
// pass and item; dQ, dK, dV written once. Scratch: the packed operands of one chunk, and per thread dK, dV of one kv
// head in fp32 plus a few tiles.
#include "cpu/attention.h"
#include "cpu/ops.h"
#include "cpu/output.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <cmath>
#include <limits>
#include <memory>
#include <vector>

namespace fastlm_cpu {
namespace {

constexpr float kPosInf = std::numeric_limits<float>::infinity();

// Calls fn(f, s) for the heads f0 <= f < f1 (f = batch * nheads + head) and rows lo <= s < hi of a (batch, seqlen,
// nheads, ...) tensor, on the threads: each task takes a tile of rows and visits every head of a row before the next.
// In that layout one head's rows are far apart (a page apart for 16 heads of 64 floats), so visiting one head at a
// time would miss the TLB on every row.
template <typename F>
void for_rows_of_heads(int64_t f0, int64_t f1, int64_t lo, int64_t hi, F&& fn) {
  constexpr int64_t kTileRows = 16;
  if (f1 <= f0 || hi <= lo) return;
  at::parallel_for(0, (hi - lo + kTileRows - 1) / kTileRows, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t s = lo + t0 * kTileRows; s < std::min(hi, lo + t1 * kTileRows); ++s)
      for (int64_t f = f0; f < f1; ++f) fn(f, s);
  });
}

struct Scratch {
  Floats dk, dv;           // the item's kv head, Sk x Dv
  Floats q, qt, d_o, dot;  // the query block: Q, dO (kBlockQ x Dv) and transposed (D x kBlockQ)
  Floats p, ds, dq;        // P^T, dP^T then dS^T (kBlockK x kBlockQ); dQ of the block (kBlockQ x Dv)
  Floats lse2, delta, ones;
  std::vector<int64_t> lo, hi;
  explicit Scratch(const Problem& p)
      : dk(p.Sk * p.Dv), dv(p.Sk * p.Dv), q(kBlockQ * p.Dv), qt(p.D * kBlockQ), d_o(kBlockQ * p.Dv),
        dot(p.D * kBlockQ), p(kBlockK * kBlockQ), ds(kBlockK * kBlockQ), dq(kBlockQ * p.Dv), lse2(kBlockQ),
        delta(kBlockQ), ones(std::max(kBlockQ, kBlockK), 1.0f), lo(kBlockQ), hi(kBlockQ) {}
};

struct Tensors {
  const void *q, *k, *v, *out, *dout;
  const float* lse;   // (B, H, Sq) contiguous
  const float* dlse;  // the same layout, or null
  Strides qs, ks, vs, os, dos;
  void *dq, *dk, *dv;  // contiguous, q's / k's shape
};

// The packed operands of the kv heads bk in [bk0, ...) (bk = batch * Hkv + kv head), rows of Dv floats: K and V of
// kv head bk at k / v + (bk - bk0) * Sk * Dv; Q and dO of query head f = batch * H + head (f / G = bk) at
// q / d_o + (f - bk0 G) * Sq * Dv; delta of query i of head f at delta[(f - bk0 G) * Sq + i].
struct Packed {
  float *k, *v, *q, *d_o, *delta;
  int64_t bk0;
  int64_t head(const Problem& p, int64_t b, int64_t h) const { return b * p.H + h - bk0 * p.G; }
  const float* k_head(const Problem& p, int64_t b, int64_t hk) const {
    return k + (b * p.Hkv + hk - bk0) * p.Sk * p.Dv;
  }
  const float* v_head(const Problem& p, int64_t b, int64_t hk) const {
    return v + (b * p.Hkv + hk - bk0) * p.Sk * p.Dv;
  }
};

// Loads query block qb of head h (Q and dO both ways, lse in base 2, delta, key ranges) as `cols` (rows rounded up
// to whole vectors) queries; padding rows get zeros and lse2 = +inf, so their P is exactly 0.
void load_queries(const Problem& p, const Tensors& t, const Packed& pk, int64_t b, int64_t h, int64_t i0,
                  int64_t rows, int64_t cols, Scratch& sc) {
  const int64_t f = pk.head(p, b, h);
  std::copy_n(pk.q + (f * p.Sq + i0) * p.Dv, rows * p.Dv, sc.q.begin());
  std::copy_n(pk.d_o + (f * p.Sq + i0) * p.Dv, rows * p.Dv, sc.d_o.begin());
  std::fill(sc.q.begin() + rows * p.Dv, sc.q.begin() + cols * p.Dv, 0.0f);
  std::fill(sc.d_o.begin() + rows * p.Dv, sc.d_o.begin() + cols * p.Dv, 0.0f);
  for (int64_t d = 0; d < p.D; ++d)  // row by row of the transposes: their stores are contiguous
    for (int64_t r = 0; r < cols; ++r) {
      sc.qt[d * kBlockQ + r] = sc.q[r * p.Dv + d];
      sc.dot[d * kBlockQ + r] = sc.d_o[r * p.Dv + d];
    }
  for (int64_t r = 0; r < cols; ++r) {
    sc.lse2[r] = kPosInf, sc.delta[r] = 0.0f;
    if (r >= rows) continue;
    const int64_t i = i0 + r;
    const float lse = t.lse[(b * p.H + h) * p.Sq + i];
    sc.lse2[r] = lse == kNegInf ? kPosInf : lse * kLog2e;  // a query without keys: P = 0
    sc.delta[r] = pk.delta[f * p.Sq + i];
    sc.lo[r] = p.lo(i), sc.hi[r] = p.hi(i);
  }
}

// Which gradients a pass computes: both (one pass per kv head), or dK/dV and dQ in separate passes (when there are
// too few kv heads to keep the threads busy, each pass splits a different axis).
enum class Grads { kAll, kKV, kQ };

// One query block of head h against the visible key tiles in [k_lo, k_hi) (multiples of kBlockK) of the item's
// packed K/V.
template <typename T>
void block_bwd(const Problem& p, const Tensors& t, const Packed& pk, int64_t b, int64_t h, int64_t qb, int64_t k_lo,
               int64_t k_hi, Grads grads, float scale, Scratch& sc) {
  // a block cut short by the sequence's end works on its rows rounded up to whole vectors (cols)
  const int64_t i0 = qb * kBlockQ, rows = std::min(kBlockQ, p.Sq - i0), cols = (rows + kW - 1) / kW * kW;
  load_queries(p, t, pk, b, h, i0, rows, cols, sc);
  std::fill(sc.dq.begin(), sc.dq.begin() + rows * p.Dv, 0.0f);
  const vfloat c2 = vset1(scale * kLog2e), vscale = vset1(scale);
  const int64_t lo = std::max(sc.lo[0], k_lo), hi = std::min(sc.hi[rows - 1], k_hi - 1);  // keys the rows may see
  for (int64_t j0 = lo / kBlockK * kBlockK; j0 <= hi && lo <= hi; j0 += kBlockK) {
    const int64_t nk = std::min(kBlockK, p.Sk - j0);
    const float* kt = pk.k_head(p, b, h / p.G) + j0 * p.Dv;
    const float* vt = pk.v_head(p, b, h / p.G) + j0 * p.Dv;
    // P^T = 2^(S^T c - lse2), zero outside the mask
    gemm_tile(nk, cols, p.D, MatA{kt, p.Dv, 1}, sc.qt.data(), kBlockQ, sc.p.data(), kBlockQ, nullptr);
    for (int64_t j = 0; j < nk; ++j) {
      float* pj = sc.p.data() + j * kBlockQ;
      for (int64_t r = 0; r < cols; r += kW)
        vstore(pj + r, vexp2(vfma(vload(pj + r), c2, -vload(sc.lse2.data() + r))));
    }
    const bool inside = sc.lo[rows - 1] <= j0 && j0 + kBlockK - 1 <= sc.hi[0];
    if (!inside) {
      for (int64_t j = 0; j < nk; ++j)
        for (int64_t r = 0; r < rows; ++r)
          if (j0 + j < sc.lo[r] || j0 + j > sc.hi[r]) sc.p[j * kBlockQ + r] = 0.0f;
    }
    // dV += P^T dO;  dP^T = V dO^T;  dS^T = scale P^T (dP^T - delta)
    if (grads != Grads::kQ)
      gemm_tile(nk, p.Dv, cols, MatA{sc.p.data(), kBlockQ, 1}, sc.d_o.data(), p.Dv, sc.dv.data() + j0 * p.Dv,
                p.Dv, sc.ones.data());
    gemm_tile(nk, cols, p.D, MatA{vt, p.Dv, 1}, sc.dot.data(), kBlockQ, sc.ds.data(), kBlockQ, nullptr);
    for (int64_t j = 0; j < nk; ++j) {
      float* dsj = sc.ds.data() + j * kBlockQ;
      const float* pj = sc.p.data() + j * kBlockQ;
      for (int64_t r = 0; r < cols; r += kW)
        vstore(dsj + r, vscale * vload(pj + r) * (vload(dsj + r) - vload(sc.delta.data() + r)));
    }
    // dK += dS^T Q;  dQ += dS K  (dS read transposed)
    if (grads != Grads::kQ)
      gemm_tile(nk, p.Dv, cols, MatA{sc.ds.data(), kBlockQ, 1}, sc.q.data(), p.Dv, sc.dk.data() + j0 * p.Dv,
                p.Dv, sc.ones.data());
    if (grads != Grads::kKV)
      gemm_tile(rows, p.Dv, nk, MatA{sc.ds.data(), 1, kBlockQ}, kt, p.Dv, sc.dq.data(), p.Dv, sc.ones.data());
  }
  if (grads == Grads::kKV) return;
  T* dq = static_cast<T*>(t.dq);
  for (int64_t r = 0; r < rows; ++r) {
    T* dst = dq + ((b * p.Sq + i0 + r) * p.H + h) * p.D;
    for (int64_t d = 0; d < p.D; ++d) dst[d] = from_float<T>(sc.dq[r * p.Dv + d]);
  }
}

// Runs item(w, scratch) for w in [0, n) on the threads, handing items out through an atomic counter.
template <typename F>
void for_items(const Problem& p, int64_t n, F&& item) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), n), 1, [&](int64_t, int64_t) {
    Scratch sc(p);
    for (int64_t w = next.fetch_add(1); w < n; w = next.fetch_add(1)) item(w, sc);
  });
}

template <typename T>
void attention_bwd_kernel(const Problem& p, const Tensors& t, float scale) {
  const int64_t nqb = (p.Sq + kBlockQ - 1) / kBlockQ, nkb = p.n_ktiles(), n_kv = p.B * p.Hkv;
  const int64_t threads = at::get_num_threads();
  const int64_t per_kv = 2 * (p.Sk + p.G * p.Sq) * p.Dv + p.G * p.Sq;  // packed floats of one kv head
  const int64_t chunk = std::min(n_kv, std::max<int64_t>(1, kPackBudget / per_kv));
  std::unique_ptr<float[]> buffer(new float[chunk * per_kv]);
  for (int64_t bk0 = 0; bk0 < n_kv; bk0 += chunk) {
    const int64_t n = std::min(chunk, n_kv - bk0), f0 = bk0 * p.G, f1 = (bk0 + n) * p.G;
    Packed pk{buffer.get(), nullptr, nullptr, nullptr, nullptr, bk0};
    pk.v = pk.k + n * p.Sk * p.Dv, pk.q = pk.v + n * p.Sk * p.Dv;
    pk.d_o = pk.q + (f1 - f0) * p.Sq * p.Dv, pk.delta = pk.d_o + (f1 - f0) * p.Sq * p.Dv;
    // one pass over the rows, key row s and query row s side by side: K, V, Q, dO packed, and
    // delta_i = dO_i . O_i - dlse_i
    for_rows_of_heads(bk0, bk0 + n, 0, std::max(p.Sq, p.Sk), [&](int64_t bk, int64_t s) {
      const int64_t b = bk / p.Hkv, hk = bk % p.Hkv;
      if (s < p.Sk) {
        const int64_t row = (bk - bk0) * p.Sk + s;
        widen_rows(static_cast<const T*>(t.k) + t.ks.of(b, s, hk), t.ks.s, 1, p.D, pk.k + row * p.Dv, p.Dv);
        widen_rows(static_cast<const T*>(t.v) + t.vs.of(b, s, hk), t.vs.s, 1, p.D, pk.v + row * p.Dv, p.Dv);
      }
      if (s >= p.Sq) return;
      for (int64_t f = bk * p.G; f < (bk + 1) * p.G; ++f) {
        const int64_t h = f % p.H, row = (f - f0) * p.Sq + s;
        widen_rows(static_cast<const T*>(t.q) + t.qs.of(b, s, h), t.qs.s, 1, p.D, pk.q + row * p.Dv, p.Dv);
        float* d_o = pk.d_o + row * p.Dv;
        widen_rows(static_cast<const T*>(t.dout) + t.dos.of(b, s, h), t.dos.s, 1, p.D, d_o, p.Dv);
        const T* o = static_cast<const T*>(t.out) + t.os.of(b, s, h);
        // one FMA chain over d, as the tile product forms dP = dO V^T: where O is exactly a value row (a query
        // that sees one key, tile.h softmax_columns), dP - delta is exactly 0 for that key
        float delta = 0.0f;
        for (int64_t d = 0; d < p.D; ++d) delta = sfma(d_o[d], to_float(o[d]), delta);
        pk.delta[row] = t.dlse ? delta - t.dlse[f * p.Sq + s] : delta;
      }
    });
    // Enough key chunks (dK/dV pass) and query chunks (dQ pass) to give every thread ~2 items; one chunk each, a
    // single pass computing everything, when the kv heads alone do.
    const int64_t want = n >= threads ? 1 : (2 * threads + n - 1) / n;
    const int64_t tiles_per_chunk = (nkb + want - 1) / want;
    const int64_t k_chunks = (nkb + tiles_per_chunk - 1) / tiles_per_chunk;  // none empty
    const int64_t k_chunk = tiles_per_chunk * kBlockK;                        // keys per chunk
    const Grads kv_pass = k_chunks == 1 ? Grads::kAll : Grads::kKV;
    // dK, dV (and dQ in the single pass): item (batch, kv head, key chunk)
    for_items(p, n * k_chunks, [&](int64_t w, Scratch& sc) {
      const int64_t c = w % k_chunks, bk = bk0 + w / k_chunks, b = bk / p.Hkv, hk = bk % p.Hkv;
      const int64_t k_lo = c * k_chunk, k_hi = std::min(p.Sk, k_lo + k_chunk);
      std::fill(sc.dk.begin() + k_lo * p.Dv, sc.dk.begin() + k_hi * p.Dv, 0.0f);
      std::fill(sc.dv.begin() + k_lo * p.Dv, sc.dv.begin() + k_hi * p.Dv, 0.0f);
      for (int64_t g = 0; g < p.G; ++g)
        for (int64_t qb = 0; qb < nqb; ++qb)
          block_bwd<T>(p, t, pk, b, hk * p.G + g, qb, k_lo, k_hi, kv_pass, scale, sc);
      for (int64_t j = k_lo; j < k_hi; ++j) {
        T* dk = static_cast<T*>(t.dk) + ((b * p.Sk + j) * p.Hkv + hk) * p.D;
        T* dv = static_cast<T*>(t.dv) + ((b * p.Sk + j) * p.Hkv + hk) * p.D;
        for (int64_t d = 0; d < p.D; ++d) {
          dk[d] = from_float<T>(sc.dk[j * p.Dv + d]);
          dv[d] = from_float<T>(sc.dv[j * p.Dv + d]);
        }
      }
    });
    if (kv_pass == Grads::kAll) continue;
    // dQ: item (batch, head, share of the query blocks), interleaved so causal shares cost about the same
    const int64_t n_heads = f1 - f0, q_shares = std::min(nqb, (2 * threads + n_heads - 1) / n_heads);
    for_items(p, n_heads * q_shares, [&](int64_t w, Scratch& sc) {
      const int64_t share = w % q_shares, f = f0 + w / q_shares, b = f / p.H, h = f % p.H;
      for (int64_t qb = share; qb < nqb; qb += q_shares)
        block_bwd<T>(p, t, pk, b, h, qb, 0, nkb * kBlockK, Grads::kQ, scale, sc);
    });
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(const at::Tensor& dout, const at::Tensor& q,
                                                             const at::Tensor& k, const at::Tensor& v,
                                                             const at::Tensor& out, const at::Tensor& lse,
                                                             const std::optional<at::Tensor>& dlse, bool causal,
                                                             double softmax_scale, int64_t window_left,
                                                             int64_t window_right) {
  const char* op = "attention_bwd";
  const Problem p = attention_problem(op, q, k, v, causal, softmax_scale, window_left, window_right);
  for (const auto* t : {&dout, &out}) {
    const char* name = t == &dout ? "dout" : "out";
    TORCH_CHECK(t->sizes() == q.sizes(), "fastlm::attention_bwd: ", name, " must have q's shape ", q.sizes(),
                ", got ", t->sizes());
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == q.scalar_type(), "fastlm::attention_bwd (CPU): ", name,
                " must be a CPU tensor of q's dtype ", q.scalar_type(), ", got ", t->scalar_type(), " on ",
                t->device());
  }
  for (const at::Tensor* t : {&lse, dlse.has_value() ? &*dlse : nullptr}) {
    if (!t) continue;
    const char* name = t == &lse ? "lse" : "dlse";
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->dim() == 3 && t->size(0) == p.B &&
                    t->size(1) == p.H && t->size(2) == p.Sq,
                "fastlm::attention_bwd: ", name, " must be a float32 CPU tensor of shape (", p.B, ", ", p.H, ", ",
                p.Sq, "), got a ", t->scalar_type(), " tensor of shape ", t->sizes(), " on ", t->device());
  }
  // the kernel reads rows with unit stride along the head dim
  const at::Tensor dout_c = dout.size(3) <= 1 || dout.stride(3) == 1 ? dout : dout.contiguous();
  const at::Tensor out_c = out.size(3) <= 1 || out.stride(3) == 1 ? out : out.contiguous();
  const at::Tensor lse_c = lse.contiguous();
  const at::Tensor dlse_c = dlse.has_value() ? dlse->contiguous() : at::Tensor();
  at::Tensor dq = empty_output(q.sizes(), q.options());
  at::Tensor dk = empty_output(k.sizes(), k.options()), dv = empty_output(v.sizes(), v.options());
  if (dq.numel() == 0 || p.Sk == 0) return {dq.zero_(), dk.zero_(), dv.zero_()};
  const Tensors t{q.const_data_ptr(), k.const_data_ptr(), v.const_data_ptr(), out_c.const_data_ptr(),
                  dout_c.const_data_ptr(), lse_c.const_data_ptr<float>(),
                  dlse_c.defined() ? dlse_c.const_data_ptr<float>() : nullptr, strides_of(q), strides_of(k),
                  strides_of(v), strides_of(out_c), strides_of(dout_c), dq.data_ptr(), dk.data_ptr(), dv.data_ptr()};
  const float scale = static_cast<float>(softmax_scale);
  with_float_type(q.scalar_type(), [&](auto tag) { attention_bwd_kernel<decltype(tag)>(p, t, scale); });
  return {dq, dk, dv};
}

}  // namespace fastlm_cpu
