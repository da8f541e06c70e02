// Attention forward, FlashAttention-2 on mma.sync (sm_80+), fp16/bf16, head dims 32/64/96/128/256.
//
// Grid (ceil(Sq / 64), H, B), 4 warps; each warp owns 16 of the block's 64 query rows. The Q tile is copied to shared
// memory once; K and V tiles of BLOCK_N keys stream through a two-stage cp.async pipeline (tile t + 1 is in flight
// while tile t is used). Per tile: S = Q K^T, online softmax in the log2 domain, O += P V (attention_tile.cuh).
// Only key tiles that intersect the rows' causal / sliding-window band are visited; element masks are applied only
// to tiles that cross a band edge or the end of the keys. One write of O (and of the fp32 LSE) at the end.
//
// Memory traffic per (batch, head): Q and O once, K and V once per 64-row query block (within the band).
//
// attention_fwd checks the problem and picks the kernel: the wgmma kernel of attention_sm90.cu where it can run
// (Hopper, AttentionParams::kernels auto or wgmma), this one otherwise.
#include <cuda_runtime.h>

#include <algorithm>
#include <string>

#include "cuda/attention_tile.cuh"
#include "cuda/launch_utils.cuh"
#include "cuda/launchers.h"

namespace fastlm_cuda {
namespace {

constexpr int kBlockM = 64;
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;

template <int D>
constexpr int attention_block_n() { return D <= 128 ? 64 : 32; }

template <int D>
constexpr int attention_smem_bytes() {
  return (kBlockM + 4 * attention_block_n<D>()) * TileShape<D>::kStride * 2;  // Q + double-buffered K and V
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attention_fwd_mma_kernel(const AttentionParams p) {
  constexpr int BN = attention_block_n<D>();
  constexpr int S = TileShape<D>::kStride;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sq = reinterpret_cast<T*>(smem_raw);
  T* sk = sq + kBlockM * S;
  T* sv = sk + 2 * BN * S;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int m0 = blockIdx.x * kBlockM, h = blockIdx.y, b = blockIdx.z;
  const AttentionSlice<T> x(p, b, h);
  const int lo = x.band.lo(m0), hi = x.band.hi(m0, kBlockM);
  const int n_start = (lo / BN) * BN;

  auto load_kv = [&](int n0, int buf) {
    load_rows_async<T, BN, D, kThreads>(sk + buf * BN * S, [&](int r) { return x.k_row(n0 + r); }, x.k, tid);
    load_rows_async<T, BN, D, kThreads>(sv + buf * BN * S, [&](int r) { return x.v_row(n0 + r); }, x.v, tid);
  };
  load_rows_async<T, kBlockM, D, kThreads>(sq, [&](int r) { return x.q_row(m0 + r); }, x.q, tid);
  if (n_start < hi) load_kv(n_start, 0);
  cp_async_commit();

  WarpState<D> st;
  st.init();
  const float scale_log2 = p.softmax_scale * kLog2e;
  const int row0 = m0 + warp * 16;  // first query row of this warp
  int buf = 0;
  for (int n0 = n_start; n0 < hi; n0 += BN, buf ^= 1) {
    if (n0 + BN < hi) load_kv(n0 + BN, buf ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();

    float s[BN / 8][4];
    warp_qk<T, D, BN>(s, sq + warp * 16 * S, sk + buf * BN * S, lane);
    warp_softmax<D, BN>(s, st, scale_log2, x.band.needs_mask(n0, BN, m0, kBlockM),
                        [&](int r, int c) { return x.band.keeps(row0 + r, n0 + c); }, lane);
    warp_pv<T, D, BN>(st, s, sv + buf * BN * S, lane);
    __syncthreads();  // the next iteration overwrites the buffer read here
  }
  cp_async_wait<0>();

  warp_store<T, D>(st, static_cast<T*>(p.out) + b * p.o_sb + h * p.o_sh, p.o_ss,
                   p.lse + (static_cast<int64_t>(b) * p.nheads + h) * p.seqlen_q, row0, p.seqlen_q, lane);
}

template <typename T, int D>
Status launch(const AttentionParams& p, cudaStream_t stream) {
  const dim3 grid((p.seqlen_q + kBlockM - 1) / kBlockM, p.nheads, p.batch);
  return launch_kernel(attention_fwd_mma_kernel<T, D>, grid, kThreads, attention_smem_bytes<D>(), stream, p,
                       "attention_fwd");
}

template <typename T>
Status launch_any_head_dim(const AttentionParams& p, cudaStream_t stream) {
  return dispatch_head_dim(p.head_dim, "attention_fwd",
                           [&](auto d) { return launch<T, decltype(d)::value>(p, stream); });
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

}  // namespace

Status attention_fwd(const AttentionParams& params, cudaStream_t stream) {
  AttentionParams p = params;
  if (p.dtype == DType::kFloat32)
    return Status::Error("attention_fwd: CUDA kernels take fp16/bf16 (tensor cores); got fp32");
  if (p.batch < 0 || p.seqlen_q < 0 || p.seqlen_k < 0 || p.nheads <= 0 || p.nheads_kv <= 0 ||
      p.nheads % p.nheads_kv != 0)
    return Status::Error("attention_fwd: bad sizes (nheads must be a positive multiple of nheads_kv)");
  if (!compiled_head_dim(p.head_dim)) return head_dim_error("attention_fwd", p.head_dim);
  if (p.batch == 0 || p.seqlen_q == 0) return Status::Ok();
  if (p.nheads > 65535 || p.batch > 65535) return Status::Error("attention_fwd: batch and nheads must be <= 65535");
  if (static_cast<int64_t>(p.seqlen_q) + p.seqlen_k > (int64_t{1} << 30))
    return Status::Error("attention_fwd: seqlen_q + seqlen_k must be <= 2^30 (the kernels' positions are int)");
  if (p.window_left < -1 || p.window_right < -1) return Status::Error("attention_fwd: window values must be >= -1");
  // a window reaching past every key is unbounded in effect (left seqlen_k, right seqlen_q reach every key from
  // any query position): clamped so that the kernels' position arithmetic stays in int
  p.window_left = std::min(p.window_left, p.seqlen_k);
  p.window_right = std::min(p.window_right, p.seqlen_q);
  if (!p.q || !p.out || !p.lse || (p.seqlen_k > 0 && (!p.k || !p.v)))
    return Status::Error("attention_fwd: q, k, v, out and lse must be set");
  const int64_t strides[] = {p.q_sb, p.q_ss, p.q_sh, p.k_sb, p.k_ss, p.k_sh,
                             p.v_sb, p.v_ss, p.v_sh, p.o_sb, p.o_ss, p.o_sh};
  for (int64_t s : strides)
    if (s % 8 != 0) return Status::Error("attention_fwd: every stride must be a multiple of 8 elements (16 bytes)");
  if (!aligned16(p.q) || !aligned16(p.k) || !aligned16(p.v) || !aligned16(p.out))
    return Status::Error("attention_fwd: q, k, v and out must be 16-byte aligned");
  if (use_wgmma(p.kernels, attention_wgmma_supported(p.head_dim, nullptr))) return attention_fwd_wgmma(p, stream);
  return attention_fwd_mma(p, stream);
}

Status attention_fwd_mma(const AttentionParams& p, cudaStream_t stream) {
  return p.dtype == DType::kFloat16 ? launch_any_head_dim<__half>(p, stream)
                                    : launch_any_head_dim<__nv_bfloat16>(p, stream);
}

}  // namespace fastlm_cuda
