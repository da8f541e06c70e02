// Attention forward on Hopper warpgroup tensor cores (wgmma, sm_90a), fp16/bf16, head dims 32, 64, 96, 128, 256.
//
// Warp-specialized, FlashAttention-3 style. Grid (ceil(Sq / 128), H, B), three warpgroups of 128 threads: warpgroup
// 0 is the producer, 1 and 2 the consumers; consumer c owns query rows 64 c .. 64 c + 63 of the block and each of
// its warps 16 of them. One producer thread loads Q once and the K and V tiles of kBlockN keys (128; 64 for head
// dim 256, so that two slots of each fit in shared memory) with TMA (tma.cuh) into 128-byte swizzled slabs
// (wgmma.cuh), K and V each through a ring of kStages slots; per slot a "full" mbarrier (the TMA bytes have landed)
// and an "empty" one (all 256 consumer threads are done reading it). The producer gives most of its registers to
// the consumers (setmaxnreg: 24 / 240 per thread). The consumer warpgroups take turns issuing their GEMMs
// (ping-pong, through two named barriers), so one's softmax runs while the other's GEMMs keep the tensor cores busy.
//
// Head dims that are not a multiple of 64 (32, 96) are stored padded to whole 64-column slabs: TMA writes the
// columns past D as zeros (no global memory is read for them). S = Q K^T reads only the D real columns; P V runs over
// the padded width (the swizzled MN-major V operand is read in whole 64-column blocks), whose extra output columns
// are zero and never stored.
//
// Per tile t and consumer warpgroup: S_t = Q K_t^T as D / 16 wgmma m64nBk16 (B = kBlockN) with both operands in
// shared memory, issued together with O += P_{t-1} V_{t-1} (wgmma m64nNk16 over the padded width, N <= 128, P from
// registers, V read transposed from shared memory); the online softmax of attention_tile.cuh (log2 domain) runs on
// S_t's fragments while the tensor cores still compute P_{t-1} V_{t-1}, and O is rescaled when that product is done
// (FlashAttention-3's overlap of softmax and GEMMs within a warpgroup). K_t's slot is released as soon as S_t is
// done, V_{t-1}'s when P_{t-1} V_{t-1} is. Masking, key-tile skipping, empty rows (O = 0, LSE = -inf) and the output
// write are those of the mma.sync kernel (attention.cu); rows past the sequence ends arrive as zeros from TMA.
//
// The kernel body exists only in the sm_90a compilation; attention_fwd (attention.cu) launches it only when the
// extension was built for sm_90a (FASTLM_CUDA_SM90A) and the device is compute capability 9.x, and falls back to the
// mma.sync kernel (with FASTLM_CUDA_KERNELS=wgmma: fails with the reason) where the driver refuses a tensor map.
#include <cuda_runtime.h>

#include <string>

#include "cuda/attention_tile.cuh"
#include "cuda/launch_utils.cuh"
#include "cuda/launchers.h"
#include "cuda/tma.cuh"
#include "cuda/wgmma.cuh"

namespace fastlm_cuda {
namespace {

constexpr int kBlockM = 128;  // query rows per block: two consumer warpgroups of 64
constexpr int kThreads = 3 * 128;  // a producer warpgroup, two consumer warpgroups
constexpr int kStages = 2;          // K (and V) slots
using Ring = TmaRing<kStages, 2 * 128>;

struct Barriers {
  uint64_t q_full;
  Ring k, v;
};

// Tile shapes (attention_tile.cuh) and shared-memory layout for head dim D.
template <int D>
struct Sm90Tile : Sm90Shape<D> {
  using Sm90Shape<D>::kDo;
  using Sm90Shape<D>::kBlockN;
  static constexpr int kQ = kBlockM * kDo * 2;                // bytes of the Q tile
  static constexpr int kKV = kBlockN * kDo * 2;               // bytes of one K (or V) tile
  static constexpr int kBarriers = kQ + 2 * kStages * kKV;    // Q, the K slots, the V slots, then the barriers
  static constexpr int kBytes = kBarriers + static_cast<int>(sizeof(Barriers));
  static_assert(kBytes <= 227 * 1024, "shared memory of a Hopper block");
};

// The kernel's parameters: the problem and the tensor maps of q, k and v as (D, seqlen, heads, batch), boxes of 64
// columns x 128 rows (tensor maps must live in kernel parameter space: __grid_constant__).
struct Sm90Args {
  AttentionParams p;
  CUtensorMap q, k, v;
};

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1) attention_fwd_wgmma_kernel(const __grid_constant__ Sm90Args args) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Tile = Sm90Tile<D>;
  constexpr int kBlockN = Tile::kBlockN, kDo = Tile::kDo, kPvN = Tile::kPvN;
  const AttentionParams& p = args.p;
  // swizzled slabs start 1024-byte aligned: the dynamic shared memory (no static shared memory here) is declared so
  extern __shared__ __align__(1024) unsigned char smem[];
  unsigned char* sq = smem;
  unsigned char* sk = sq + Tile::kQ;
  unsigned char* sv = sk + kStages * Tile::kKV;
  Barriers& bar = *reinterpret_cast<Barriers*>(smem + Tile::kBarriers);

  const int tid = threadIdx.x, wg = tid >> 7;
  const int m0 = blockIdx.x * kBlockM, h = blockIdx.y, b = blockIdx.z;
  const KeyBand band = KeyBand::of(p);
  const int lo = band.lo(m0), hi = band.hi(m0, kBlockM);
  const int n_start = (lo / kBlockN) * kBlockN;
  const int n_tiles = n_start < hi ? (hi - n_start + kBlockN - 1) / kBlockN : 0;

  if (tid == 0) {
    mbar_init(&bar.q_full, 1);
    bar.k.init();
    bar.v.init();
    mbar_fence_init();
  }
  __syncthreads();  // the only block-wide barrier: from here on the warpgroups meet at the mbarriers (and the two
                    // consumer warpgroups at their turn barriers)

  if (wg == 0) {  // producer
    setmaxnreg_dec<kProducerRegs>();
    if (tid == 0 && n_tiles > 0) {  // (a block whose rows see no key loads nothing, not even Q)
      const int hk = h / (p.nheads / p.nheads_kv);
      tma_prefetch_map(&args.q);
      tma_prefetch_map(&args.k);
      tma_prefetch_map(&args.v);
      mbar_arrive_expect_tx(&bar.q_full, Tile::kQ);
#pragma unroll
      for (int c = 0; c < Tile::kSlabs; ++c)
        tma_load_4d(sq + sw128_slab(c, kBlockM), &args.q, 64 * c, m0, h, b, &bar.q_full);
      for (int t = 0; t < n_tiles; ++t) {
        const int slot = t % kStages, n0 = n_start + t * kBlockN;
        uint64_t* k_full = bar.k.acquire(t, Tile::kKV);
#pragma unroll
        for (int c = 0; c < Tile::kSlabs; ++c)
          tma_load_4d(sk + slot * Tile::kKV + sw128_slab(c, kBlockN), &args.k, 64 * c, n0, hk, b, k_full);
        uint64_t* v_full = bar.v.acquire(t, Tile::kKV);
#pragma unroll
        for (int c = 0; c < Tile::kSlabs; ++c)
          tma_load_4d(sv + slot * Tile::kKV + sw128_slab(c, kBlockN), &args.v, 64 * c, n0, hk, b, v_full);
      }
    }
    return;
  }
  setmaxnreg_inc<kConsumerRegs>();

  const int cw = wg - 1, warp = (tid >> 5) & 3, lane = tid & 31;
  WarpState<kDo> st;  // (columns D .. kDo - 1 stay zero: V is zero there)
  st.init();
  // O += P V of the tile in V slot `slot`, P packed in pa (its wgmmas are committed, not waited for). The writes to
  // O and pa are all made before its own wgmma.fence (it follows a branch, and ptxas would inject one anyway). Per k
  // step kDo / kPvN wgmmas, part j on O's columns (and V's slabs) j kPvN ..
  uint32_t pa[kBlockN / 16][4];
  auto issue_pv = [&](int slot) {
    const unsigned char* vt = sv + slot * Tile::kKV;
    fence_operands(st.o);
    fence_operands(pa);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk)  // k step kk: keys 16 kk .. 16 kk + 15, rows of the V tile
#pragma unroll
      for (int j = 0; j < kDo / kPvN; ++j)
        Wgmma<T, kPvN>::rs_mn(*reinterpret_cast<float(*)[kPvN / 8][4]>(&st.o[j * kPvN / 8]), pa[kk],
                              sw128_desc(vt + sw128_mn_step(kk, kBlockN, j * kPvN), sw128_mn_lbo(kBlockN)), 1);
    wgmma_commit();
  };

  const float scale_log2 = p.softmax_scale * kLog2e;
  const int row0 = m0 + cw * 64 + warp * 16;  // first query row of this warp
  if (n_tiles > 0) mbar_wait(&bar.q_full, 0);
  // Ping-pong: the two consumer warpgroups take turns issuing their GEMMs, so that the tensor cores work on one's
  // while the other runs its softmax. Warpgroup 0's turn is named barrier 1, warpgroup 1's barrier 2: a warpgroup
  // waits for its turn before issuing (warpgroup 0 not for its first) and hands the turn over once its S is done
  // (its P V still running); warpgroup 0 takes the hand-over of warpgroup 1's last turn after the loop. A
  // barrier's arrivals and waits alternate: a warpgroup hands over again only after its next turn came, which
  // needs the other to have passed its own wait.
  auto take_turn = [&] { cw == 0 ? named_bar_sync<1, 256>() : named_bar_sync<2, 256>(); };
  auto hand_over = [&] { cw == 0 ? named_bar_arrive<2, 256>() : named_bar_arrive<1, 256>(); };
  // Iteration t: S_t = Q K_t^T and O += P_{t-1} V_{t-1} are issued together; the softmax of S_t runs while the
  // tensor cores still work on P_{t-1} V_{t-1}, and O is rescaled once that is done.
  for (int t = 0; t < n_tiles; ++t) {
    const int n0 = n_start + t * kBlockN, slot = t % kStages, prev = (t + kStages - 1) % kStages;
    bar.k.wait(t);
    // V_{t-1} (loaded before K_t) is awaited here too, so nothing waits between the two issues
    if (t > 0) bar.v.wait(t - 1);
    if (cw == 1 || t > 0) take_turn();

    // S = Q K^T: k step kk covers head-dim columns 16 kk .. 16 kk + 15 (64-column slab kk / 4, 32 bytes per step)
    const unsigned char* kt = sk + slot * Tile::kKV;
    float s[kBlockN / 8][4] = {};  // (the first k step overwrites it: scale-d = 0)
    fence_operands(s);
    fence_operands(st.o);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk)
      Wgmma<T, kBlockN>::ss(s, sw128_desc(sq + sw128_k_step(kk, kBlockM, cw * 64), kSw128KMajorLbo),
                            sw128_desc(kt + sw128_k_step(kk, kBlockN, 0), kSw128KMajorLbo), kk > 0);
    wgmma_commit();
    if (t > 0) issue_pv(prev);
    if (t > 0) {
      wgmma_wait<1>();  // S_t is done, P_{t-1} V_{t-1} may still run
    } else {
      wgmma_wait<0>();
    }
    hand_over();  // (between the issues and the wait it makes ptxas serialize the wgmmas: advisory C7514)
    bar.k.release(t);  // this thread's part of S_t is done: K_t's slot may be refilled
    fence_operands(s);

    float alpha[2];  // O's rescale, applied once P_{t-1} V_{t-1} is done
    warp_softmax_scores<kDo, kBlockN>(s, st, scale_log2, band.needs_mask(n0, kBlockN, m0, kBlockM),
                                    [&](int r, int c) { return band.keeps(row0 + r, n0 + c); }, lane,
                                    [&](int row, float a) { alpha[row] = a; });
    wgmma_wait<0>();  // P_{t-1} V_{t-1}: pa is free, O complete up to tile t - 1
    if (t > 0) bar.v.release(t - 1);
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
  if (cw == 0 && n_tiles > 0) take_turn();  // warpgroup 1's last hand-over
  if (n_tiles > 0) {  // the last tile's P V
    const int last = n_tiles - 1;
    bar.v.wait(last);
    issue_pv(last % kStages);
    wgmma_wait<0>();
    fence_operands(st.o);
  }

  warp_store<T, D>(st, static_cast<T*>(p.out) + b * p.o_sb + h * p.o_sh, p.o_ss,
                   p.lse + (static_cast<int64_t>(b) * p.nheads + h) * p.seqlen_q, row0, p.seqlen_q, lane);
#else
  __trap();  // a binary without sm_90a code: the launcher never gets here, but never return garbage
#endif
}

// The tensor maps of q, k and v (boxes of kBlockM query rows, kBlockN key rows); false with *why set when the driver
// refuses one (e.g. a stride-0 expanded dim).
bool encode_maps(Sm90Args& a, int block_n, std::string* why) {
  const AttentionParams& p = a.p;
  return encode_tile_maps(
      {{&a.q, {p.q, p.head_dim, p.seqlen_q, p.nheads, p.batch, p.q_ss, p.q_sh, p.q_sb, kBlockM}, "q"},
       {&a.k, {p.k, p.head_dim, p.seqlen_k, p.nheads_kv, p.batch, p.k_ss, p.k_sh, p.k_sb, block_n}, "k"},
       {&a.v, {p.v, p.head_dim, p.seqlen_k, p.nheads_kv, p.batch, p.v_ss, p.v_sh, p.v_sb, block_n}, "v"}},
      p.dtype, why);
}

template <int D>
Status launch(const AttentionParams& p, cudaStream_t stream) {
  Sm90Args args{};
  args.p = p;
  std::string why;
  if (p.seqlen_k > 0 && !encode_maps(args, Sm90Tile<D>::kBlockN, &why)) {
    if (p.kernels == KernelFamily::kWgmma) return Status::Error("attention_fwd: FASTLM_CUDA_KERNELS=wgmma, but " + why);
    return attention_fwd_mma(p, stream);
  }
  const dim3 grid((p.seqlen_q + kBlockM - 1) / kBlockM, p.nheads, p.batch);
  const auto kernel = p.dtype == DType::kFloat16 ? attention_fwd_wgmma_kernel<__half, D>
                                                 : attention_fwd_wgmma_kernel<__nv_bfloat16, D>;
  return launch_kernel(kernel, grid, kThreads, Sm90Tile<D>::kBytes, stream, args, "attention_fwd (wgmma)");
}

}  // namespace

bool attention_wgmma_supported(int head_dim, std::string* why) {
  if (!sm90a_device(why)) return false;
  if (!compiled_head_dim(head_dim)) {
    if (why) *why = std::string("the wgmma kernel supports head dims ") + kCompiledHeadDims + "; got " +
                    std::to_string(head_dim);
    return false;
  }
  return true;
}

Status attention_fwd_wgmma(const AttentionParams& p, cudaStream_t stream) {
  std::string why;
  if (!attention_wgmma_supported(p.head_dim, &why))
    return Status::Error("attention_fwd: FASTLM_CUDA_KERNELS=wgmma, but " + why);
  return dispatch_head_dim(p.head_dim, "attention_fwd (wgmma)",
                           [&](auto d) { return launch<decltype(d)::value>(p, stream); });
}

}  // namespace fastlm_cuda
