// Attention forward on Hopper warpgroup tensor cores (wgmma, sm_90a), fp16/bf16, head dims 64 and 128.
//
// Grid (ceil(Sq / 128), H, B), two warpgroups of 128 threads; warpgroup w owns query rows 64 w .. 64 w + 63 of the
// block and each of its warps 16 of them. Q (128 rows) is copied to shared memory once; K and V tiles of 128 keys
// stream through two slots each, copied with cp.async into 128-byte swizzled tiles (wgmma.cuh) one iteration ahead
// of use. Per tile t and warpgroup: S_t = Q K_t^T as D / 16 wgmma m64n128k16 with both operands in shared memory,
// issued together with O += P_{t-1} V_{t-1} (8 wgmma m64nDk16, P from registers, V read transposed from shared
// memory); the online softmax of attention_tile.cuh (log2 domain) runs on S_t's fragments while the tensor cores
// still compute P_{t-1} V_{t-1}, and O is rescaled when that product is done (FlashAttention-3's overlap of softmax
// and GEMMs within a warpgroup). In the sm_90a SASS ptxas puts the wait for P V after the exponentials of the first
// of a thread's two rows (the packed P of tile t goes into the registers P V reads), so about half of the softmax
// runs beside the product. Masking, key-tile skipping, empty rows (O = 0, LSE = -inf) and the output write are
// those of the mma.sync kernel (attention.cu).
//
// The kernel body exists only in the sm_90a compilation; attention_fwd (attention.cu) launches it only when the
// extension was built for sm_90a (FASTLM_CUDA_SM90A) and the device is compute capability 9.x.
#include <cuda_runtime.h>

#include "cuda/attention_tile.cuh"
#include "cuda/launch_utils.cuh"
#include "cuda/launchers.h"
#include "cuda/wgmma.cuh"

namespace fastlm_cuda {
namespace {

constexpr int kBlockM = 128;  // query rows per block: two warpgroups of 64
constexpr int kBlockN = 128;  // keys per tile
constexpr int kThreads = 256;

template <int D>
struct Sm90Smem {
  static constexpr int kQ = kBlockM * D * 2;                 // bytes of the Q tile
  static constexpr int kKV = kBlockN * D * 2;                // bytes of one K (or V) tile
  static constexpr int kBytes = kQ + 4 * kKV;                // Q, two K and two V tiles
};

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1) attention_fwd_wgmma_kernel(const AttentionParams p) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  // swizzled tiles start 1024-byte aligned: the dynamic shared memory (no static shared memory here) is declared so
  extern __shared__ __align__(1024) unsigned char smem[];
  unsigned char* sq = smem;
  unsigned char* sk = sq + Sm90Smem<D>::kQ;
  unsigned char* sv = sk + 2 * Sm90Smem<D>::kKV;

  const int tid = threadIdx.x, lane = tid & 31, wg = tid >> 7, warp = (tid >> 5) & 3;
  const int m0 = blockIdx.x * kBlockM, h = blockIdx.y, b = blockIdx.z;
  const AttentionSlice<T> x(p, b, h);
  const int lo = x.band.lo(m0), hi = x.band.hi(m0, kBlockM);
  const int n_start = (lo / kBlockN) * kBlockN;

  WarpState<D> st;
  st.init();
  auto load_k = [&](int n0, int slot) {
    load_rows_sw128<T, kBlockN, D, kThreads>(sk + slot * Sm90Smem<D>::kKV, [&](int r) { return x.k_row(n0 + r); },
                                             x.k, tid);
  };
  auto load_v = [&](int n0, int slot) {
    load_rows_sw128<T, kBlockN, D, kThreads>(sv + slot * Sm90Smem<D>::kKV, [&](int r) { return x.v_row(n0 + r); },
                                             x.v, tid);
  };
  // O += P V of the tile in V slot `slot`, P packed in pa (its wgmmas are committed, not waited for). The writes to
  // O and pa are all made before its own wgmma.fence (it follows a branch, and ptxas would inject one anyway).
  uint32_t pa[kBlockN / 16][4];
  auto issue_pv = [&](int slot) {
    const unsigned char* vt = sv + slot * Sm90Smem<D>::kKV;
    fence_operands(st.o);
    fence_operands(pa);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk)  // k step kk: keys 16 kk .. 16 kk + 15, rows of the V tile
      Wgmma<T, D>::rs_mn(st.o, pa[kk], sw128_desc(vt + kk * 16 * 128, kBlockN * 128), 1);
    wgmma_commit();
  };
  load_rows_sw128<T, kBlockM, D, kThreads>(sq, [&](int r) { return x.q_row(m0 + r); }, x.q, tid);
  if (n_start < hi) load_k(n_start, 0);
  cp_async_commit();

  const float scale_log2 = p.softmax_scale * kLog2e;
  const int row0 = m0 + wg * 64 + warp * 16;  // first query row of this warp
  // Iteration t: S_t = Q K_t^T and O += P_{t-1} V_{t-1} are issued together; the softmax of S_t runs while the
  // tensor cores still work on P_{t-1} V_{t-1}, and O is rescaled once that is done. K_t sits in slot t % 2, V_t in
  // slot t % 2; K_{t+1} and V_t are copied during iteration t.
  int t = 0;
  for (int n0 = n_start; n0 < hi; n0 += kBlockN, ++t) {
    const int slot = t & 1;
    cp_async_wait<0>();  // K_t and V_{t-1}, the copies issued last iteration
    fence_proxy_async();
    // ... are visible to all, and every wgmma of iteration t - 1 is done (each warpgroup waited for all of its own):
    // K slot slot ^ 1 (K_{t-1}) and V slot slot (V_{t-2}) are free
    __syncthreads();

    // S = Q K^T: k step kk covers head-dim columns 16 kk .. 16 kk + 15 (64-column slab kk / 4, 32 bytes per step)
    const unsigned char* kt = sk + slot * Sm90Smem<D>::kKV;
    float s[kBlockN / 8][4] = {};  // (the first k step overwrites it: scale-d = 0)
    fence_operands(s);
    fence_operands(st.o);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const int slab = kk / 4, step = (kk % 4) * 32;
      Wgmma<T, kBlockN>::ss(s, sw128_desc(sq + slab * kBlockM * 128 + wg * 64 * 128 + step, 16),
                            sw128_desc(kt + slab * kBlockN * 128 + step, 16), kk > 0);
    }
    wgmma_commit();
    // the copies of K_{t+1} and V_t (into slots no wgmma of this iteration reads) are issued while S_t runs; placed
    // between the P V issue and its wait instead, they make ptxas serialize the wgmmas (advisory C7514)
    if (n0 + kBlockN < hi) load_k(n0 + kBlockN, slot ^ 1);
    load_v(n0, slot);
    cp_async_commit();
    if (t > 0) {
      issue_pv(slot ^ 1);
      wgmma_wait<1>();  // S_t is done, P_{t-1} V_{t-1} may still run
    } else {
      wgmma_wait<0>();
    }
    fence_operands(s);

    float alpha[2];  // O's rescale, applied once P_{t-1} V_{t-1} is done
    warp_softmax_scores<D, kBlockN>(s, st, scale_log2, x.band.needs_mask(n0, kBlockN, m0, kBlockM),
                                    [&](int r, int c) { return x.band.keeps(row0 + r, n0 + c); }, lane,
                                    [&](int row, float a) { alpha[row] = a; });
    wgmma_wait<0>();  // P_{t-1} V_{t-1}: pa is free, O complete up to tile t - 1
    fence_operands(st.o);
    st.rescale(alpha);
    // P's A fragments for k step kk (keys 16 kk .. 16 kk + 15), packed from S
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      pa[kk][0] = Mma<T>::pack(s[2 * kk][0], s[2 * kk][1]);
      pa[kk][1] = Mma<T>::pack(s[2 * kk][2], s[2 * kk][3]);
      pa[kk][2] = Mma<T>::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      pa[kk][3] = Mma<T>::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
    }
    fence_operands(pa);  // packed here, while the tensor cores are idle anyway, not sunk into the next issue
  }
  cp_async_wait<0>();  // V of the last tile (with no tile: Q, whose copies must not outlive the block)
  if (t > 0) {  // the last tile's P V
    fence_proxy_async();
    __syncthreads();
    issue_pv((t - 1) & 1);
    wgmma_wait<0>();
    fence_operands(st.o);
  }

  warp_store<T, D>(st, static_cast<T*>(p.out) + b * p.o_sb + h * p.o_sh, p.o_ss,
                   p.lse + (static_cast<int64_t>(b) * p.nheads + h) * p.seqlen_q, row0, p.seqlen_q, lane);
#else
  __trap();  // a binary without sm_90a code: the launcher never gets here, but never return garbage
#endif
}

template <typename T, int D>
Status launch(const AttentionParams& p, cudaStream_t stream) {
  const dim3 grid((p.seqlen_q + kBlockM - 1) / kBlockM, p.nheads, p.batch);
  return launch_kernel(attention_fwd_wgmma_kernel<T, D>, grid, kThreads, Sm90Smem<D>::kBytes, stream, p,
                       "attention_fwd (wgmma)");
}

}  // namespace

bool attention_wgmma_supported(int head_dim, std::string* why) {
  if (!sm90a_device(why)) return false;
  if (head_dim != 64 && head_dim != 128) {
    if (why) *why = "the wgmma kernel supports head dims 64 and 128; got " + std::to_string(head_dim);
    return false;
  }
  return true;
}

Status attention_fwd_wgmma(const AttentionParams& p, cudaStream_t stream) {
  std::string why;
  if (!attention_wgmma_supported(p.head_dim, &why))
    return Status::Error("attention_fwd: FASTLM_CUDA_KERNELS=wgmma, but " + why);
  const bool half = p.dtype == DType::kFloat16;
  if (p.head_dim == 64) return half ? launch<__half, 64>(p, stream) : launch<__nv_bfloat16, 64>(p, stream);
  return half ? launch<__half, 128>(p, stream) : launch<__nv_bfloat16, 128>(p, stream);
}

}  // namespace fastlm_cuda
