// Softmax attention forward on the CPU, FlashAttention-2 style.
//
// Algorithm: a work item is (batch, head, block of kBlockQ queries). Its queries are packed transposed (D x kBlockQ,
// fp32) and stay in L1 while the key tiles that the causal/window mask leaves visible stream through:
//   S^T = K Q^T        a kBlockK x kBlockQ tile, keys as rows: K is read in place (as broadcast scalars), so no
//                      transposed copy of K is ever made, and every softmax statistic below is lane-wise
//   online softmax     per query (column), in base 2 with the scale applied inside the exponent (tile.h): running
//                      max and sum, P = 2^(S c - max) in place of S
//   O = alpha O + P V  O (kBlockQ x D) in L1, alpha = 2^(old max - new max) applied as O is loaded; V read in place
// fp32 inputs are read where they lie (V through a copy only when D is not a whole number of vectors); bf16/fp16
// K/V tiles are widened into a per-thread buffer, so all arithmetic is fp32 with fp32 accumulation. Tiles entirely
// outside the mask are never touched, tiles entirely inside it are not masked, and the S x S score matrix never
// exists. Work items are handed out heaviest first (under a causal mask the last query blocks see the most keys)
// through an atomic counter, which balances the threads. No large scratch is allocated (fresh pages are expensive).
//
// Memory traffic: per work item, q block read once, each visible K/V tile read once (from L2/L3 after the first
// query block of a head), out and lse written once.
#include "cpu/ops.h"
#include "cpu/simd.h"
#include "cpu/tile.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <type_traits>
#include <vector>

namespace fastlm_cpu {
namespace {

constexpr int64_t kBlockQ = 64;  // queries per work item; a multiple of 2 * kW
constexpr int64_t kBlockK = 64;  // keys per tile

struct Problem {
  int64_t B, Sq, Sk, H, Hkv, D, Dv;  // Dv: head dim padded to whole vectors
  int64_t left, right;               // window, -1 = unbounded
  SoftmaxScale scale;
  // The keys query i may see, [lo(i), hi(i)] clipped to [0, Sk - 1]; both are non-decreasing in i.
  int64_t lo(int64_t i) const { return left < 0 ? 0 : std::max<int64_t>(0, i + Sk - Sq - left); }
  int64_t hi(int64_t i) const { return right < 0 ? Sk - 1 : std::min<int64_t>(Sk - 1, i + Sk - Sq + right); }
};

struct Strides {
  int64_t b, s, h;
};

struct Scratch {
  std::vector<float> qt, s, o, m, l, alpha, kbuf, vbuf;
  std::vector<int64_t> lo, hi;
  explicit Scratch(const Problem& p)
      : qt(p.D * kBlockQ), s(kBlockK * kBlockQ), o(kBlockQ * p.Dv), m(kBlockQ), l(kBlockQ), alpha(kBlockQ),
        kbuf(kBlockK * p.D), vbuf(kBlockK * p.Dv), lo(kBlockQ), hi(kBlockQ) {}
};

// n rows of length D (row stride ld) widened to fp32 rows of length ldo, zero padded.
template <typename T>
void widen_rows(const T* src, int64_t ld, int64_t n, int64_t D, float* dst, int64_t ldo) {
  const int64_t full = D / kW * kW;
  for (int64_t j = 0; j < n; ++j) {
    const T* s = src + j * ld;
    float* d = dst + j * ldo;
    for (int64_t c = 0; c < full; c += kW) vstore(d + c, vload_cvt(s + c));
    for (int64_t c = full; c < D; ++c) d[c] = to_float(s[c]);
    for (int64_t c = D; c < ldo; ++c) d[c] = 0.0f;
  }
}

template <typename T>
void attend_block(const Problem& p, const T* q, Strides qs, const T* k, Strides ks, const T* v, Strides vs, T* out,
                  float* lse, int64_t b, int64_t h, int64_t qb, Scratch& sc) {
  const int64_t i0 = qb * kBlockQ, rows = std::min(kBlockQ, p.Sq - i0);
  const int64_t hk = h / (p.H / p.Hkv);
  for (int64_t r = 0; r < kBlockQ; ++r) {
    if (r < rows) {
      const T* src = q + b * qs.b + (i0 + r) * qs.s + h * qs.h;
      for (int64_t d = 0; d < p.D; ++d) sc.qt[d * kBlockQ + r] = to_float(src[d]) * p.scale.q_sign;
      sc.lo[r] = p.lo(i0 + r), sc.hi[r] = p.hi(i0 + r);
    } else {  // padding queries: scores 0, never written out
      for (int64_t d = 0; d < p.D; ++d) sc.qt[d * kBlockQ + r] = 0.0f;
      sc.lo[r] = 0, sc.hi[r] = p.Sk - 1;
    }
  }
  std::fill(sc.o.begin(), sc.o.end(), 0.0f);
  std::fill(sc.m.begin(), sc.m.end(), kNegInf);
  std::fill(sc.l.begin(), sc.l.end(), 0.0f);
  const int64_t lo = sc.lo[0], hi = sc.hi[rows - 1];  // the union of the rows' key ranges
  const T* kbh = k + b * ks.b + hk * ks.h;
  const T* vbh = v + b * vs.b + hk * vs.h;
  for (int64_t j0 = lo / kBlockK * kBlockK; j0 <= hi && lo <= hi; j0 += kBlockK) {
    const int64_t nk = std::min(kBlockK, p.Sk - j0);
    MatA kt{sc.kbuf.data(), p.D, 1};
    if constexpr (std::is_same_v<T, float>)
      kt = MatA{kbh + j0 * ks.s, ks.s, 1};
    else
      widen_rows(kbh + j0 * ks.s, ks.s, nk, p.D, sc.kbuf.data(), p.D);
    gemm_tile(nk, kBlockQ, p.D, kt, sc.qt.data(), kBlockQ, sc.s.data(), kBlockQ, nullptr);

    const bool inside = sc.lo[rows - 1] <= j0 && j0 + kBlockK - 1 <= sc.hi[0];
    if (!inside) {
      for (int64_t j = 0; j < nk; ++j) {
        float* srow = sc.s.data() + j * kBlockQ;
        for (int64_t r = 0; r < rows; ++r)
          if (j0 + j < sc.lo[r] || j0 + j > sc.hi[r]) srow[r] = kNegInf;
      }
    }
    for (int64_t r = 0; r < kBlockQ; r += kW)
      softmax_columns(sc.s.data() + r, kBlockQ, nk, p.scale.c, sc.m.data() + r, sc.l.data() + r,
                      sc.alpha.data() + r);

    const float* vt = sc.vbuf.data();
    int64_t ldv = p.Dv;
    if (std::is_same_v<T, float> && p.D == p.Dv) {
      vt = reinterpret_cast<const float*>(vbh + j0 * vs.s), ldv = vs.s;
    } else {
      widen_rows(vbh + j0 * vs.s, vs.s, nk, p.D, sc.vbuf.data(), p.Dv);
    }
    gemm_tile(rows, p.Dv, nk, MatA{sc.s.data(), 1, kBlockQ}, vt, ldv, sc.o.data(), p.Dv, sc.alpha.data());
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = i0 + r;
    T* dst = out + ((b * p.Sq + i) * p.H + h) * p.D;
    float* lse_i = lse + (b * p.H + h) * p.Sq + i;
    if (sc.m[r] == kNegInf) {  // the query sees no key: out 0, lse -inf
      for (int64_t d = 0; d < p.D; ++d) dst[d] = from_float<T>(0.0f);
      *lse_i = kNegInf;
      continue;
    }
    const float* orow = sc.o.data() + r * p.Dv;
    const float inv = 1.0f / sc.l[r];
    for (int64_t d = 0; d < p.D; ++d) dst[d] = from_float<T>(orow[d] * inv);
    *lse_i = (sc.m[r] + std::log2(sc.l[r])) * kLn2;
  }
}

template <typename T>
void attention_kernel(const Problem& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      at::Tensor& out, at::Tensor& lse) {
  const Strides qs{q.stride(0), q.stride(1), q.stride(2)};
  const Strides ks{k.stride(0), k.stride(1), k.stride(2)};
  const Strides vs{v.stride(0), v.stride(1), v.stride(2)};
  const T* qp = q.const_data_ptr<T>();
  const T* kp = k.const_data_ptr<T>();
  const T* vp = v.const_data_ptr<T>();
  T* op = out.data_ptr<T>();
  float* lp = lse.data_ptr<float>();
  const int64_t nqb = (p.Sq + kBlockQ - 1) / kBlockQ, n_bh = p.B * p.H, n_work = nqb * n_bh;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), n_work), 1, [&](int64_t, int64_t) {
    Scratch sc(p);
    for (int64_t w = next.fetch_add(1); w < n_work; w = next.fetch_add(1)) {
      const int64_t qb = nqb - 1 - w / n_bh, bh = w % n_bh;  // last query blocks (most keys) first
      attend_block<T>(p, qp, qs, kp, ks, vp, vs, op, lp, bh / p.H, bh % p.H, qb, sc);
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 bool causal, double softmax_scale, int64_t window_left,
                                                 int64_t window_right) {
  TORCH_CHECK(q.dim() == 4, "fastlm::attention_fwd: q must be 4-D (batch, seqlen_q, nheads, headdim), got shape ",
              q.sizes());
  TORCH_CHECK(k.dim() == 4, "fastlm::attention_fwd: k must be 4-D (batch, seqlen_k, nheads_kv, headdim), got shape ",
              k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), "fastlm::attention_fwd: v must have k's shape ", k.sizes(), ", got ",
              v.sizes());
  for (const auto* t : {&q, &k, &v}) {
    const char* name = t == &q ? "q" : (t == &k ? "k" : "v");
    TORCH_CHECK(t->device().is_cpu(), "fastlm::attention_fwd (CPU): ", name, " must be a CPU tensor, got ",
                t->device());
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), "fastlm::attention_fwd: ", name, " must have q's dtype ",
                q.scalar_type(), ", got ", t->scalar_type());
    TORCH_CHECK(t->size(3) <= 1 || t->stride(3) == 1, "fastlm::attention_fwd: ", name,
                " must have a contiguous last dim (stride 1), got strides ", t->strides());
  }
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "fastlm::attention_fwd: dtype must be float32, bfloat16 or float16, got ", dtype);
  const int64_t B = q.size(0), Sq = q.size(1), H = q.size(2), D = q.size(3);
  const int64_t Sk = k.size(1), Hkv = k.size(2);
  TORCH_CHECK(k.size(0) == B, "fastlm::attention_fwd: batch of k/v (", k.size(0), ") must equal batch of q (", B,
              ")");
  TORCH_CHECK(k.size(3) == D, "fastlm::attention_fwd: headdim of k/v (", k.size(3), ") must equal headdim of q (", D,
              ")");
  TORCH_CHECK(D >= 1, "fastlm::attention_fwd: headdim must be >= 1, got ", D);
  TORCH_CHECK(Hkv >= 1 && H % Hkv == 0, "fastlm::attention_fwd: nheads of q (", H,
              ") must be a multiple of nheads of k/v (", Hkv, ")");
  TORCH_CHECK(std::isfinite(softmax_scale), "fastlm::attention_fwd: softmax_scale must be finite, got ",
              softmax_scale);
  TORCH_CHECK(window_left >= -1 && window_right >= -1,
              "fastlm::attention_fwd: window values must be >= -1 (-1 = unbounded), got (", window_left, ", ",
              window_right, ")");
  TORCH_CHECK(!causal || window_right <= 0, "fastlm::attention_fwd: causal means window_right = 0, got ",
              window_right);

  at::Tensor out = at::empty({B, Sq, H, D}, q.options());
  at::Tensor lse = at::empty({B, H, Sq}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};

  Problem p;
  p.scale = SoftmaxScale(softmax_scale);
  p.B = B, p.Sq = Sq, p.Sk = Sk, p.H = H, p.Hkv = Hkv, p.D = D, p.Dv = (D + kW - 1) / kW * kW;
  p.left = window_left, p.right = causal ? 0 : window_right;
  if (Sk == 0) {
    out.zero_();
    lse.fill_(-std::numeric_limits<float>::infinity());
    return {out, lse};
  }
  switch (dtype) {
    case at::kFloat:
      attention_kernel<float>(p, q, k, v, out, lse);
      break;
    case at::kBFloat16:
      attention_kernel<c10::BFloat16>(p, q, k, v, out, lse);
      break;
    default:
      attention_kernel<c10::Half>(p, q, k, v, out, lse);
      break;
  }
  return {out, lse};
}

}  // namespace fastlm_cpu
