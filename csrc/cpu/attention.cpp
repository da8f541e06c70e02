// Softmax attention forward on the CPU, FlashAttention-2 style.
//
// Algorithm: K and V are first packed once per call into fp32 tiles of kBlockK keys (K transposed to D x kBlockK
// so that the score tile is a plain row-major product, V row-major with the head dim padded to whole vectors);
// bf16/fp16 inputs are converted there, so all arithmetic is fp32. Each work item is (batch, head, block of
// kBlockQ queries): its queries stay in L1/L2 while the key tiles that the causal/window mask leaves visible
// stream through: S = Q K^T, online softmax in base 2 with the scale applied in the exponent (tile.h: running row
// max and sum, P = 2^(S c - max) in place of S, the output rescaled by 2^(old max - new max) as it is loaded),
// O += P V. Tiles
// entirely outside the mask are never touched, tiles entirely inside it are not masked. The S x S score matrix is
// never formed. Work items are handed out heaviest first (late query blocks see the most keys under a causal mask)
// through an atomic counter, which balances the threads.
//
// Memory traffic: q, k, v are read once (k and v through the packed copies, one read of each per query block and
// head), out and lse written once; per thread a few tiles of scratch.
#include "cpu/ops.h"
#include "cpu/simd.h"
#include "cpu/tile.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>

namespace fastlm_cpu {
namespace {

constexpr int64_t kBlockQ = 64;  // queries per work item
constexpr int64_t kBlockK = 64;  // keys per tile; a multiple of 2 * kW

struct Problem {
  int64_t B, Sq, Sk, H, Hkv, D, Dv;  // Dv: head dim padded to whole vectors
  int64_t left, right;               // window, -1 = unbounded
  SoftmaxScale scale;
  int64_t n_ktiles() const { return (Sk + kBlockK - 1) / kBlockK; }
  // The keys query i may see, [lo(i), hi(i)] clipped to [0, Sk - 1]; both are non-decreasing in i.
  int64_t lo(int64_t i) const { return left < 0 ? 0 : std::max<int64_t>(0, i + Sk - Sq - left); }
  int64_t hi(int64_t i) const { return right < 0 ? Sk - 1 : std::min<int64_t>(Sk - 1, i + Sk - Sq + right); }
};

struct Strides {
  int64_t b, s, h;
};

// K (one batch, one kv head) -> kt[tile][d][key in tile]; V -> vp[key][Dv]; padding zero.
template <typename T>
void pack_kv(const Problem& p, const T* k, Strides ks, const T* v, Strides vs, float* kt, float* vp) {
  const int64_t nt = p.n_ktiles();
  at::parallel_for(0, p.B * p.Hkv * nt, 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      const int64_t t = w % nt, bh = w / nt, b = bh / p.Hkv, hk = bh % p.Hkv;
      float* ktile = kt + (bh * nt + t) * p.D * kBlockK;
      float* vtile = vp + (bh * nt + t) * kBlockK * p.Dv;
      for (int64_t jj = 0; jj < kBlockK; ++jj) {
        const int64_t j = t * kBlockK + jj;
        float* vrow = vtile + jj * p.Dv;
        if (j < p.Sk) {
          const T* krow = k + b * ks.b + j * ks.s + hk * ks.h;
          const T* vsrc = v + b * vs.b + j * vs.s + hk * vs.h;
          for (int64_t d = 0; d < p.D; ++d) ktile[d * kBlockK + jj] = to_float(krow[d]);
          for (int64_t d = 0; d < p.D; ++d) vrow[d] = to_float(vsrc[d]);
        } else {
          for (int64_t d = 0; d < p.D; ++d) ktile[d * kBlockK + jj] = 0.0f;
          for (int64_t d = 0; d < p.D; ++d) vrow[d] = 0.0f;
        }
        for (int64_t d = p.D; d < p.Dv; ++d) vrow[d] = 0.0f;
      }
    }
  });
}

struct Scratch {
  std::vector<float> q, s, o, m, l, alpha;
  explicit Scratch(const Problem& p)
      : q(kBlockQ * p.D), s(kBlockQ * kBlockK), o(kBlockQ * p.Dv), m(kBlockQ), l(kBlockQ), alpha(kBlockQ) {}
};

// Masks one score tile (only where the tile straddles the mask boundary) and applies the online softmax to its rows.
void softmax_tile(const Problem& p, int64_t i0, int64_t rows, int64_t j0, Scratch& sc) {
  const bool inside = p.lo(i0 + rows - 1) <= j0 && j0 + kBlockK - 1 <= p.hi(i0);
  for (int64_t r = 0; r < rows; ++r) {
    float* srow = sc.s.data() + r * kBlockK;
    if (!inside) {
      const int64_t a = std::clamp<int64_t>(p.lo(i0 + r) - j0, 0, kBlockK);
      const int64_t e = std::clamp<int64_t>(p.hi(i0 + r) - j0 + 1, a, kBlockK);
      std::fill(srow, srow + a, kNegInf);
      std::fill(srow + e, srow + kBlockK, kNegInf);
    }
    sc.alpha[r] = softmax_row(srow, kBlockK, p.scale.c, sc.m[r], sc.l[r]);
  }
}

template <typename T>
void attend_block(const Problem& p, const T* q, Strides qs, const float* kt, const float* vp, T* out, float* lse,
                  int64_t b, int64_t h, int64_t qb, Scratch& sc) {
  const int64_t i0 = qb * kBlockQ, rows = std::min(kBlockQ, p.Sq - i0);
  const int64_t bh_kv = b * p.Hkv + h / (p.H / p.Hkv), nt = p.n_ktiles();
  for (int64_t r = 0; r < rows; ++r) {
    const T* src = q + b * qs.b + (i0 + r) * qs.s + h * qs.h;
    for (int64_t d = 0; d < p.D; ++d) sc.q[r * p.D + d] = to_float(src[d]) * p.scale.q_sign;
  }
  std::fill(sc.o.begin(), sc.o.end(), 0.0f);
  std::fill(sc.m.begin(), sc.m.end(), kNegInf);
  std::fill(sc.l.begin(), sc.l.end(), 0.0f);
  const int64_t lo = p.lo(i0), hi = p.hi(i0 + rows - 1);
  if (lo <= hi) {
    for (int64_t t = lo / kBlockK; t <= hi / kBlockK; ++t) {
      const int64_t j0 = t * kBlockK, nk = std::min(kBlockK, p.Sk - j0);
      const float* ktile = kt + (bh_kv * nt + t) * p.D * kBlockK;
      const float* vtile = vp + (bh_kv * nt + t) * kBlockK * p.Dv;
      gemm_tile(rows, kBlockK, p.D, sc.q.data(), p.D, ktile, kBlockK, sc.s.data(), kBlockK, nullptr);
      softmax_tile(p, i0, rows, j0, sc);
      gemm_tile(rows, p.Dv, nk, sc.s.data(), kBlockK, vtile, p.Dv, sc.o.data(), p.Dv, sc.alpha.data());
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = i0 + r;
    T* dst = out + ((b * p.Sq + i) * p.H + h) * p.D;
    const float* orow = sc.o.data() + r * p.Dv;
    if (sc.m[r] == kNegInf) {  // the row sees no key: out 0, lse -inf
      for (int64_t d = 0; d < p.D; ++d) dst[d] = from_float<T>(0.0f);
      lse[(b * p.H + h) * p.Sq + i] = kNegInf;
      continue;
    }
    const float inv = 1.0f / sc.l[r];
    for (int64_t d = 0; d < p.D; ++d) dst[d] = from_float<T>(orow[d] * inv);
    lse[(b * p.H + h) * p.Sq + i] = (sc.m[r] + std::log2(sc.l[r])) * kLn2;
  }
}

template <typename T>
void attention_kernel(const Problem& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      at::Tensor& out, at::Tensor& lse) {
  const int64_t nt = p.n_ktiles();
  at::Tensor kt = at::empty({p.B * p.Hkv * nt * p.D * kBlockK}, q.options().dtype(at::kFloat));
  at::Tensor vp = at::empty({p.B * p.Hkv * nt * kBlockK * p.Dv}, q.options().dtype(at::kFloat));
  const Strides qs{q.stride(0), q.stride(1), q.stride(2)};
  const Strides ks{k.stride(0), k.stride(1), k.stride(2)};
  const Strides vs{v.stride(0), v.stride(1), v.stride(2)};
  pack_kv<T>(p, k.const_data_ptr<T>(), ks, v.const_data_ptr<T>(), vs, kt.data_ptr<float>(), vp.data_ptr<float>());

  const int64_t nqb = (p.Sq + kBlockQ - 1) / kBlockQ, n_bh = p.B * p.H, n_work = nqb * n_bh;
  const T* qptr = q.const_data_ptr<T>();
  const float* ktp = kt.const_data_ptr<float>();
  const float* vpp = vp.const_data_ptr<float>();
  T* optr = out.data_ptr<T>();
  float* lptr = lse.data_ptr<float>();
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), n_work), 1, [&](int64_t, int64_t) {
    Scratch sc(p);
    for (int64_t w = next.fetch_add(1); w < n_work; w = next.fetch_add(1)) {
      const int64_t qb = nqb - 1 - w / n_bh, bh = w % n_bh;  // last query blocks (most keys) first
      attend_block<T>(p, qptr, qs, ktp, vpp, optr, lptr, bh / p.H, bh % p.H, qb, sc);
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
