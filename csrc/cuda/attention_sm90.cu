// Attention forward on Hopper warpgroup tensor cores (wgmma, sm_90a), fp16/bf16, head dims 64 and 128.
//
// Grid (ceil(Sq / 128), H, B), two warpgroups of 128 threads; warpgroup w owns query rows 64 w .. 64 w + 63 of the
// block and each of its warps 16 of them. Q (128 rows) is copied to shared memory once; K and V tiles of 128 keys
// stream through a two-stage cp.async pipeline into 128-byte swizzled tiles (wgmma.cuh): tile t + 1's copies are
// issued once tile t's S GEMM is, and are in flight while tile t is used. Per tile and warpgroup: S = Q K^T as
// D / 16 wgmma m64n128k16 with both operands in shared memory, the online softmax of attention_tile.cuh on the S
// fragments (log2 domain), then O += P V as 8 wgmma m64nDk16 with P from registers (packed straight from S) and V
// read transposed from shared memory. Masking, key-tile skipping, empty rows (O = 0, LSE = -inf) and the output
// write are those of the mma.sync kernel (attention.cu).
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

  auto load_kv = [&](int n0, int buf) {
    load_rows_sw128<T, kBlockN, D, kThreads>(sk + buf * Sm90Smem<D>::kKV, [&](int r) { return x.k_row(n0 + r); },
                                             x.k, tid);
    load_rows_sw128<T, kBlockN, D, kThreads>(sv + buf * Sm90Smem<D>::kKV, [&](int r) { return x.v_row(n0 + r); },
                                             x.v, tid);
  };
  load_rows_sw128<T, kBlockM, D, kThreads>(sq, [&](int r) { return x.q_row(m0 + r); }, x.q, tid);
  if (n_start < hi) load_kv(n_start, 0);
  cp_async_commit();

  WarpState<D> st;
  st.init();
  const float scale_log2 = p.softmax_scale * kLog2e;
  const int row0 = m0 + wg * 64 + warp * 16;  // first query row of this warp
  int buf = 0;
  for (int n0 = n_start; n0 < hi; n0 += kBlockN, buf ^= 1) {
    cp_async_wait<0>();  // this tile, the only copy in flight
    fence_proxy_async();
    __syncthreads();  // it is visible to all, and every wgmma of the previous tile is done with buffer buf ^ 1

    // S = Q K^T: k step kk covers head-dim columns 16 kk .. 16 kk + 15 (64-column slab kk / 4, 32 bytes per step)
    const unsigned char* kt = sk + buf * Sm90Smem<D>::kKV;
    float s[kBlockN / 8][4] = {};  // (the first k step overwrites it: scale-d = 0)
    fence_operands(s);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const int slab = kk / 4, step = (kk % 4) * 32;
      Wgmma<T, kBlockN>::ss(s, sw128_desc(sq + slab * kBlockM * 128 + wg * 64 * 128 + step, 16),
                            sw128_desc(kt + slab * kBlockN * 128 + step, 16), kk > 0);
    }
    wgmma_commit();
    if (n0 + kBlockN < hi) load_kv(n0 + kBlockN, buf ^ 1);  // the next tile's copies overlap the S GEMM
    cp_async_commit();
    wgmma_wait<0>();
    fence_operands(s);

    warp_softmax<D, kBlockN>(s, st, scale_log2, x.band.needs_mask(n0, kBlockN, m0, kBlockM),
                             [&](int r, int c) { return x.band.keeps(row0 + r, n0 + c); }, lane);

    // O += P V: k step kk covers keys 16 kk .. 16 kk + 15 (rows of the V tile); P's A fragment is packed from S
    const unsigned char* vt = sv + buf * Sm90Smem<D>::kKV;
    uint32_t pa[kBlockN / 16][4];
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      pa[kk][0] = Mma<T>::pack(s[2 * kk][0], s[2 * kk][1]);
      pa[kk][1] = Mma<T>::pack(s[2 * kk][2], s[2 * kk][3]);
      pa[kk][2] = Mma<T>::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      pa[kk][3] = Mma<T>::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
    }
    fence_operands(st.o);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk)
      Wgmma<T, D>::rs_mn(st.o, pa[kk], sw128_desc(vt + kk * 16 * 128, kBlockN * 128), 1);
    wgmma_commit();
    wgmma_wait<0>();
    fence_operands(st.o);
  }
  cp_async_wait<0>();

  warp_store<T, D>(st, static_cast<T*>(p.out) + b * p.o_sb + h * p.o_sh, p.o_ss,
                   p.lse + (static_cast<int64_t>(b) * p.nheads + h) * p.seqlen_q, row0, p.seqlen_q, lane);
#else
  __trap();  // a binary without sm_90a code: the launcher never gets here, but never return garbage
#endif
}

template <typename T, int D>
Status launch(const AttentionParams& p, cudaStream_t stream) {
  constexpr int smem = Sm90Smem<D>::kBytes;
  auto kernel = attention_fwd_wgmma_kernel<T, D>;
  Status s = reserve_smem(kernel, smem, "attention_fwd (wgmma)");
  if (!s.ok()) return s;
  const dim3 grid((p.seqlen_q + kBlockM - 1) / kBlockM, p.nheads, p.batch);
  kernel<<<grid, kThreads, smem, stream>>>(p);
  return launch_status("attention_fwd (wgmma)");
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
