// Decode attention on the CPU: a few new queries per sequence against its KV cache (Flash-Decoding).
//
// Algorithm: the valid part of each sequence's cache is split into chunks; a work item is (batch, chunk) and walks
// the chunk's blocks of kBlockK keys in memory order, visiting every kv head per block. A kv head's step processes
// all G = H / Hkv query heads and all Sq queries together (M = G * Sq rows), so every K and V byte is read once:
// scores by vector dot products (four keys at a time for instruction-level parallelism), the online softmax of
// tile.h in base 2, and O += P V by the register-blocked tile product, which reads the V rows straight from an
// fp32 cache (bf16/fp16 rows, and rows whose head dim is not a whole number of vectors, are widened into an L1
// buffer first). Each chunk leaves its unnormalized output, running max and sum; a combine pass merges the chunks
// of each row and writes out.
//
// Memory traffic: each valid K and V row read once (the bandwidth bound of decoding), q read and out written once;
// the partial results (chunks x M x D floats per kv head) are small next to the cache.
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

constexpr int64_t kBlockK = 64;     // keys per block; a multiple of kW
constexpr int64_t kMinChunk = 256;  // keys per work item at least (amortizes the per-item set-up)

struct Problem {
  int64_t B, Sq, H, Hkv, G, M, D, Dv;  // M = G * Sq rows per kv head; Dv: D padded to whole vectors
  int64_t chunk, n_chunks;
  SoftmaxScale scale;
};

struct Strides {
  int64_t b, s, h;
};

// Rows [j, j + n) of a cache as fp32 rows of length >= D: straight from an fp32 cache when its rows are whole
// vectors, else widened (and zero padded to Dv) into buf.
template <typename T>
const float* cache_rows(const Problem& p, const T* src, int64_t row_stride, int64_t n, float* buf, int64_t& ld) {
  if constexpr (std::is_same_v<T, float>) {
    if (p.D % kW == 0) {
      ld = row_stride;
      return src;
    }
  }
  ld = p.Dv;
  const int64_t full = p.D / kW * kW;
  for (int64_t j = 0; j < n; ++j) {
    const T* s = src + j * row_stride;
    float* d = buf + j * p.Dv;
    for (int64_t c = 0; c < full; c += kW) vstore(d + c, vload_cvt(s + c));
    for (int64_t c = full; c < p.D; ++c) d[c] = to_float(s[c]);
    for (int64_t c = p.D; c < p.Dv; ++c) d[c] = 0.0f;
  }
  return buf;
}

struct Scratch {
  std::vector<float> q, s, kbuf, vbuf, alpha;  // q: the M query rows of every kv head
  explicit Scratch(const Problem& p)
      : q(p.Hkv * p.M * p.Dv), s(p.M * kBlockK), kbuf(kBlockK * p.Dv), vbuf(kBlockK * p.Dv), alpha(p.M) {}
};

// S[r][jj] = q_r . k_jj for nb keys (rows of k with leading dimension ldk).
void block_scores(const Problem& p, const float* q, const float* k, int64_t ldk, int64_t nb, float* s) {
  for (int64_t r = 0; r < p.M; ++r) {
    const float* qr = q + r * p.Dv;
    float* sr = s + r * kBlockK;
    int64_t j = 0;
    for (; j + 4 <= nb; j += 4) {
      const float* k0 = k + j * ldk;
      vfloat a0{}, a1{}, a2{}, a3{};
      for (int64_t c = 0; c < p.Dv; c += kW) {
        const vfloat qv = vload(qr + c);
        a0 = vfma(qv, vload(k0 + c), a0);
        a1 = vfma(qv, vload(k0 + ldk + c), a1);
        a2 = vfma(qv, vload(k0 + 2 * ldk + c), a2);
        a3 = vfma(qv, vload(k0 + 3 * ldk + c), a3);
      }
      hsum4(a0, a1, a2, a3, sr + j);
    }
    for (; j < nb; ++j) {
      vfloat a{};
      for (int64_t c = 0; c < p.Dv; c += kW) a = vfma(vload(qr + c), vload(k + j * ldk + c), a);
      sr[j] = hsum(a);
    }
  }
}

// Start of a chunk of kv head hk: its query rows (fp32, sign of the scale applied) into qh, the chunk's unnormalized
// output po (M x Dv), running max pm and sum pl reset.
template <typename T>
void chunk_init(const Problem& p, const T* q, Strides qs, int64_t b, int64_t hk, float* qh, float* po, float* pm,
                float* pl) {
  for (int64_t r = 0; r < p.M; ++r) {
    const int64_t g = r / p.Sq, i = r % p.Sq;
    const T* src = q + b * qs.b + i * qs.s + (hk * p.G + g) * qs.h;
    float* dst = qh + r * p.Dv;
    for (int64_t d = 0; d < p.D; ++d) dst[d] = to_float(src[d]) * p.scale.q_sign;
    for (int64_t d = p.D; d < p.Dv; ++d) dst[d] = 0.0f;
    pm[r] = kNegInf;
    pl[r] = 0.0f;
  }
  std::fill(po, po + p.M * p.Dv, 0.0f);
}

// Keys [j0, j0 + nb) of sequence b (valid length n) for kv head hk.
template <typename T>
void chunk_step(const Problem& p, const T* kc, Strides ks, const T* vc, Strides vs, int64_t b, int64_t hk, int64_t n,
                int64_t j0, int64_t nb, const float* qh, float* po, float* pm, float* pl, Scratch& sc) {
  int64_t ldk, ldv;
  const float* k = cache_rows<T>(p, kc + b * ks.b + j0 * ks.s + hk * ks.h, ks.s, nb, sc.kbuf.data(), ldk);
  block_scores(p, qh, k, ldk, nb, sc.s.data());
  for (int64_t r = 0; r < p.M; ++r) {
    // query i sits at position n - Sq + i and sees keys up to it; columns past nb are padding
    const int64_t visible = std::clamp<int64_t>(n - p.Sq + r % p.Sq + 1 - j0, 0, nb);
    float* sr = sc.s.data() + r * kBlockK;
    std::fill(sr + visible, sr + kBlockK, kNegInf);
    sc.alpha[r] = softmax_row(sr, kBlockK, p.scale.c, pm[r], pl[r]);
  }
  const float* v = cache_rows<T>(p, vc + b * vs.b + j0 * vs.s + hk * vs.h, vs.s, nb, sc.vbuf.data(), ldv);
  gemm_tile(p.M, p.Dv, nb, MatA{sc.s.data(), kBlockK, 1}, v, ldv, po, p.Dv, sc.alpha.data());
}

template <typename T>
void decode_kernel(const Problem& p, const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc,
                   const std::vector<int64_t>& lens, at::Tensor& out) {
  const int64_t n_items = p.B * p.Hkv * p.n_chunks;
  at::Tensor part_o = at::empty({n_items * p.M * p.Dv}, q.options().dtype(at::kFloat));
  at::Tensor part_ml = at::empty({n_items * p.M * 2}, q.options().dtype(at::kFloat));
  float* po = part_o.data_ptr<float>();
  float* pm = part_ml.data_ptr<float>();
  float* pl = pm + n_items * p.M;
  const Strides qs{q.stride(0), q.stride(1), q.stride(2)};
  const Strides ks{kc.stride(0), kc.stride(1), kc.stride(2)};
  const Strides vs{vc.stride(0), vc.stride(1), vc.stride(2)};
  const T* qp = q.const_data_ptr<T>();
  const T* kp = kc.const_data_ptr<T>();
  const T* vp = vc.const_data_ptr<T>();

  // A work item is (sequence, chunk) over all kv heads: per key block the heads are visited in turn, so the
  // cache is swept in memory order (a cache row holds all heads) rather than one head's rows a row stride apart.
  const int64_t n_work = p.B * p.n_chunks;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), n_work), 1, [&](int64_t, int64_t) {
    Scratch sc(p);
    for (int64_t w = next.fetch_add(1); w < n_work; w = next.fetch_add(1)) {
      const int64_t c = w % p.n_chunks, b = w / p.n_chunks, n = lens[b];
      const int64_t j_begin = std::min(c * p.chunk, n), j_end = std::min(j_begin + p.chunk, n);
      auto item = [&](int64_t hk) { return (b * p.Hkv + hk) * p.n_chunks + c; };  // partial-result slot
      for (int64_t hk = 0; hk < p.Hkv; ++hk)
        chunk_init<T>(p, qp, qs, b, hk, sc.q.data() + hk * p.M * p.Dv, po + item(hk) * p.M * p.Dv,
                      pm + item(hk) * p.M, pl + item(hk) * p.M);
      for (int64_t j0 = j_begin; j0 < j_end; j0 += kBlockK)
        for (int64_t hk = 0; hk < p.Hkv; ++hk)
          chunk_step<T>(p, kp, ks, vp, vs, b, hk, n, j0, std::min(kBlockK, j_end - j0),
                        sc.q.data() + hk * p.M * p.Dv, po + item(hk) * p.M * p.Dv, pm + item(hk) * p.M,
                        pl + item(hk) * p.M, sc);
    }
  });

  // Combine: out_r = sum_c 2^(m_c - m) o_c / sum_c 2^(m_c - m) l_c with m = max_c m_c.
  T* optr = out.data_ptr<T>();
  at::parallel_for(0, p.B * p.Hkv * p.M, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(p.Dv);
    for (int64_t w = begin; w < end; ++w) {
      const int64_t r = w % p.M, bh = w / p.M, b = bh / p.Hkv, hk = bh % p.Hkv;
      const int64_t g = r / p.Sq, i = r % p.Sq;
      T* dst = optr + ((b * p.Sq + i) * p.H + hk * p.G + g) * p.D;
      const int64_t base = bh * p.n_chunks;
      float m = kNegInf;
      for (int64_t c = 0; c < p.n_chunks; ++c) m = std::max(m, pm[(base + c) * p.M + r]);
      if (m == kNegInf) {  // the query sees no key
        for (int64_t d = 0; d < p.D; ++d) dst[d] = from_float<T>(0.0f);
        continue;
      }
      std::fill(acc.begin(), acc.end(), 0.0f);
      float l = 0.0f;
      for (int64_t c = 0; c < p.n_chunks; ++c) {
        const float mc = pm[(base + c) * p.M + r];
        if (mc == kNegInf) continue;  // a chunk without visible keys
        const float f = std::exp2(mc - m);
        l += f * pl[(base + c) * p.M + r];
        const float* oc = po + ((base + c) * p.M + r) * p.Dv;
        for (int64_t d = 0; d < p.Dv; d += kW)
          vstore(acc.data() + d, vfma(vset1(f), vload(oc + d), vload(acc.data() + d)));
      }
      const float inv = 1.0f / l;
      for (int64_t d = 0; d < p.D; ++d) dst[d] = from_float<T>(acc[d] * inv);
    }
  });
}

}  // namespace

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& cache_seqlens, double softmax_scale) {
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
    TORCH_CHECK(t->size(3) <= 1 || t->stride(3) == 1, "fastlm::decode_attention: ", name,
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
  TORCH_CHECK(std::isfinite(softmax_scale), "fastlm::decode_attention: softmax_scale must be finite, got ",
              softmax_scale);

  at::Tensor out = at::empty({B, Sq, H, D}, q.options());
  if (out.numel() == 0) return out;

  // Lengths are clamped into [0, S_max], as the GPU kernels do (they cannot check without a host sync).
  std::vector<int64_t> lens(B);
  int64_t max_len = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t at_b = b * cache_seqlens.stride(0);
    const int64_t n = cache_seqlens.scalar_type() == at::kInt ? cache_seqlens.const_data_ptr<int32_t>()[at_b]
                                                              : cache_seqlens.const_data_ptr<int64_t>()[at_b];
    lens[b] = std::clamp<int64_t>(n, 0, S_max);
    max_len = std::max(max_len, lens[b]);
  }

  Problem p;
  p.scale = SoftmaxScale(softmax_scale);
  p.B = B, p.Sq = Sq, p.H = H, p.Hkv = Hkv, p.G = H / Hkv, p.M = p.G * Sq, p.D = D;
  p.Dv = (D + kW - 1) / kW * kW;
  // Enough chunks to keep every thread busy (about 4 work items per thread), none shorter than kMinChunk keys.
  const int64_t want = std::max<int64_t>(1, (4 * at::get_num_threads() + B - 1) / B);
  p.chunk = std::max(kMinChunk, (max_len + want - 1) / want);
  p.chunk = (p.chunk + kBlockK - 1) / kBlockK * kBlockK;
  p.n_chunks = std::max<int64_t>(1, (max_len + p.chunk - 1) / p.chunk);

  switch (dtype) {
    case at::kFloat:
      decode_kernel<float>(p, q, k_cache, v_cache, lens, out);
      break;
    case at::kBFloat16:
      decode_kernel<c10::BFloat16>(p, q, k_cache, v_cache, lens, out);
      break;
    default:
      decode_kernel<c10::Half>(p, q, k_cache, v_cache, lens, out);
      break;
  }
  return out;
}

}  // namespace fastlm_cpu
