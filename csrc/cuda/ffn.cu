// Fused MLP GEMMs, fp16/bf16 in, fp32 accumulation: C = A B^T with A (M, K) and B (N, K) both K-contiguous
// (activations times nn.Linear weights), in three kernels of the same shape of work:
//   gemm_tn_kernel (mma.sync, sm_80+): block tile 128 x BN x 32, 8 warps (2 x 4, warp tile 64 x BN / 4), a 3-stage
//     cp.async pipeline, ldmatrix operand loads;
//   gemm_tn_wgmma_kernel (wgmma, sm_90a): block tile 128 x 128 x 64, warp-specialized: a producer warpgroup loads
//     the k tiles with TMA (tma.cuh) into a 4-slot ring of 128-byte swizzled tiles (wgmma.cuh), two consumer
//     warpgroups of 64 rows read them with m64n128k16 wgmma (both operands in shared memory), one k tile's wgmmas
//     in flight while the next one's are issued;
//     taken on Hopper (MlpParams::kernels auto or wgmma);
//   gemv_kernel (CUDA cores, any arch) for at most kGemvRows rows (a decode step's batch), where a 128-row tile
//     would leave the weights to ceil(N / BN) blocks (16 for a 2048-wide down projection), far too few SMs to
//     stream them at the memory's rate: one warp per output column pair, every SM busy;
// with the element-wise work fused into the epilogue so no intermediate takes an extra round trip through memory:
//   kBiasGelu:     h = gelu_tanh(x w_fc^T + b_fc)                 (first GEMM of the GPT-2 MLP)
//   kSwiglu:       h = silu(x w_gate^T) * (x w_up^T)             (dual GEMM: both weights share each A tile)
//   kBiasResidual: y = h w2^T + b2 + residual                     (second GEMM of either MLP)
// Memory traffic: x and the weights once per output tile row/column of blocks (gemv: the weights once, the <= 8
// rows of x once per warp, from the caches); h is written once (input dtype) and read by the second GEMM; nothing
// else is materialized.
#include <cuda_runtime.h>

#include <string>
#include <type_traits>

#include "cuda/ffn_layout.cuh"
#include "cuda/launch_utils.cuh"
#include "cuda/launchers.h"
#include "cuda/mma.cuh"
#include "cuda/tma.cuh"
#include "cuda/wgmma.cuh"

namespace fastlm_cuda {
namespace {

enum class Epilogue { kBiasGelu, kSwiglu, kBiasResidual };

constexpr int kStages = 3, kThreads = 256;  // (the tile shape and warp mapping: ffn_layout.cuh)

template <Epilogue E>
constexpr int block_n() { return E == Epilogue::kSwiglu ? 64 : 128; }  // the dual GEMM keeps two accumulators

template <Epilogue E>
constexpr int n_weights() { return E == Epilogue::kSwiglu ? 2 : 1; }

template <Epilogue E>
constexpr int gemm_smem_bytes() {
  return kStages * gemm_stage_rows(n_weights<E>(), block_n<E>()) * kGemmStride * 2;
}

struct GemmArgs {
  const void* a;    // (M, K)
  const void* b0;   // (N, K)
  const void* b1;   // (N, K), swiglu only
  const void* bias;       // (N) or null
  const void* residual;   // (M, N) or null
  void* c;                // (M, N)
  int64_t m, n, k;
};

__device__ __forceinline__ float gelu_tanh(float x) {
  const float u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
  return 0.5f * x * (1.f + tanhf(u));
}

// The output pair (row, col), (row, col + 1) (col even; n % 8 == 0, so col < n implies col + 1 < n): the epilogue
// applied to y (the first accumulator), u (the second, SwiGLU's up projection) and the bias pair b, then stored.
template <typename T, Epilogue E>
__device__ __forceinline__ void store_pair(const GemmArgs& p, int64_t row, int64_t col, float y0, float y1, float u0,
                                           float u1, float2 b) {
  if (E == Epilogue::kSwiglu) {
    y0 = y0 / (1.f + __expf(-y0)) * u0;
    y1 = y1 / (1.f + __expf(-y1)) * u1;
  } else if (E == Epilogue::kBiasGelu) {
    y0 = gelu_tanh(y0 + b.x);
    y1 = gelu_tanh(y1 + b.y);
  } else {
    y0 += b.x;
    y1 += b.y;
    if (p.residual) {
      const T* res = static_cast<const T*>(p.residual) + row * p.n + col;
      y0 += to_float(res[0]);
      y1 += to_float(res[1]);
    }
  }
  *reinterpret_cast<uint32_t*>(static_cast<T*>(p.c) + row * p.n + col) = Mma<T>::pack(y0, y1);
}

// The bias pair of columns col, col + 1 (zeros without a bias; SwiGLU has none).
template <typename T, Epilogue E>
__device__ __forceinline__ float2 bias_pair(const GemmArgs& p, int64_t col) {
  if (E == Epilogue::kSwiglu || !p.bias) return make_float2(0.f, 0.f);
  const T* bias = static_cast<const T*>(p.bias);
  return make_float2(to_float(bias[col]), to_float(bias[col + 1]));
}

// Copy a ROWS x 32 tile (rows row0.., columns k0..) of a K-contiguous matrix; out-of-range rows/chunks read 0.
template <typename T, int ROWS>
__device__ __forceinline__ void load_tile(T* smem, const T* g, int64_t rows, int64_t k, int64_t row0, int64_t k0,
                                          int tid) {
#pragma unroll
  for (int c = tid; c < ROWS * (kGemmBK / 8); c += kThreads) {
    const int r = c / (kGemmBK / 8), ch = c % (kGemmBK / 8);
    const bool ok = row0 + r < rows && k0 + ch * 8 < k;  // k % 8 == 0: a chunk is all in or all out
    const T* src = ok ? g + (row0 + r) * k + k0 + ch * 8 : g;
    cp_async_16(smem + r * kGemmStride + ch * 8, src, ok);
  }
}

template <typename T, Epilogue E>
__global__ void __launch_bounds__(kThreads) gemm_tn_kernel(const GemmArgs p) {
  constexpr int BN = block_n<E>();
  constexpr int NW = n_weights<E>();
  constexpr int MT = 4;           // 16-row tiles per warp (warp tile 64 x BN / 4: ffn_layout.cuh)
  constexpr int NT = BN / 32;     // 8-column tiles per warp
  constexpr int STAGE = gemm_stage_rows(NW, BN) * kGemmStride;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kGemmBM, n0 = static_cast<int64_t>(blockIdx.x) * BN;
  const T* A = static_cast<const T*>(p.a);
  const T* B[2] = {static_cast<const T*>(p.b0), static_cast<const T*>(NW == 2 ? p.b1 : p.b0)};
  const int k_tiles = static_cast<int>((p.k + kGemmBK - 1) / kGemmBK);

  auto load_stage = [&](int kt) {
    T* st = smem + (kt % kStages) * STAGE;
    load_tile<T, kGemmBM>(st, A, p.m, p.k, m0, static_cast<int64_t>(kt) * kGemmBK, tid);
#pragma unroll
    for (int w = 0; w < NW; ++w)
      load_tile<T, BN>(st + gemm_weight_row(w, BN) * kGemmStride, B[w], p.n, p.k, n0,
                       static_cast<int64_t>(kt) * kGemmBK, tid);
  };

  float acc[NW][MT][NT][4];
#pragma unroll
  for (int w = 0; w < NW; ++w)
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[w][i][j][e] = 0.f;

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < k_tiles) load_stage(s);
    cp_async_commit();
  }
  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // tile kt is visible to all, and everyone is done with the slot refilled below
    if (kt + kStages - 1 < k_tiles) load_stage(kt + kStages - 1);
    cp_async_commit();

    const T* st = smem + (kt % kStages) * STAGE;
    const T* sa = st + gemm_a_row(warp) * kGemmStride;
#pragma unroll
    for (int kk = 0; kk < kGemmBK / 16; ++kk) {
      uint32_t a[MT][4];
#pragma unroll
      for (int i = 0; i < MT; ++i)
        ldmatrix_x4(a[i], sa + ldsm_a(lane, i * 16, kk * 16, kGemmStride));
#pragma unroll
      for (int w = 0; w < NW; ++w) {
        const T* sb = st + gemm_b_row(warp, w, BN) * kGemmStride;
#pragma unroll
        for (int jp = 0; jp < NT / 2; ++jp) {
          uint32_t b[4];  // columns jp*16 + 0..7 -> b[0], b[1]; + 8..15 -> b[2], b[3]
          ldmatrix_x4(b, sb + ldsm_b(lane, jp * 16, kk * 16, kGemmStride));
#pragma unroll
          for (int i = 0; i < MT; ++i) {
            Mma<T>::run(acc[w][i][2 * jp], a[i], b[0], b[1]);
            Mma<T>::run(acc[w][i][2 * jp + 1], a[i], b[2], b[3]);
          }
        }
      }
    }
  }
  cp_async_wait<0>();

#pragma unroll
  for (int j = 0; j < NT; ++j) {
    const int64_t col = n0 + gemm_col(warp, j, lane, BN);
    if (col >= p.n) continue;
    const float2 b = bias_pair<T, E>(p, col);
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const int64_t row = m0 + gemm_row(warp, i, lane, hh);
        if (row >= p.m) continue;
        store_pair<T, E>(p, row, col, acc[0][i][j][2 * hh], acc[0][i][j][2 * hh + 1], acc[NW - 1][i][j][2 * hh],
                         acc[NW - 1][i][j][2 * hh + 1], b);
      }
  }
}

constexpr int kWgStages = 4;  // (the tile shape and mapping: ffn_layout.cuh)
constexpr int kWgThreads = 3 * 128;  // a producer warpgroup, two consumer warpgroups
using WgRing = TmaRing<kWgStages, 2 * 128>;

template <Epilogue E>
constexpr int wgmma_gemm_stage_bytes() { return (1 + n_weights<E>()) * kWgTile; }  // the A tile, then the B tiles
template <Epilogue E>
constexpr int wgmma_gemm_smem_bytes() {
  return kWgStages * wgmma_gemm_stage_bytes<E>() + static_cast<int>(sizeof(WgRing));
}

// The GEMM and the tensor maps of A (K, M) and of the weights (K, N), boxes of 64 x 128 (b1: SwiGLU only).
struct WgGemmArgs {
  GemmArgs p;
  CUtensorMap a, b0, b1;
};

// Warp-specialized like the Hopper attention (attention_sm90.cu): thread 0 of warpgroup 0 loads the k tiles with TMA
// into a ring of kWgStages slots (per slot a full and an empty mbarrier; partial tiles arrive zero-filled); the two
// consumer warpgroups each multiply 64 rows of the A tile with the B tiles. A consumer keeps one k tile's wgmmas in
// flight while it issues the next tile's (successive wgmmas on the same accumulators are ordered by the hardware),
// so it releases tile kt - 1's slot once tile kt's wgmmas are issued and kt - 1's are done.
template <typename T, Epilogue E>
__global__ void __launch_bounds__(kWgThreads, 1) gemm_tn_wgmma_kernel(const __grid_constant__ WgGemmArgs args) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int NW = n_weights<E>();
  constexpr int STAGE = wgmma_gemm_stage_bytes<E>();
  const GemmArgs& p = args.p;
  // swizzled tiles start 1024-byte aligned: the dynamic shared memory (no static shared memory here) is declared so
  extern __shared__ __align__(1024) unsigned char smem[];
  WgRing& ring = *reinterpret_cast<WgRing*>(smem + kWgStages * STAGE);

  const int tid = threadIdx.x, wg = tid >> 7;
  const int m0 = static_cast<int>(blockIdx.y) * kWgBM, n0 = static_cast<int>(blockIdx.x) * kWgBN;
  const int k_tiles = static_cast<int>((p.k + kWgBK - 1) / kWgBK);

  if (tid == 0) {
    ring.init();
    mbar_fence_init();
  }
  __syncthreads();  // the only block-wide barrier

  if (wg == 0) {  // producer
    setmaxnreg_dec<kProducerRegs>();
    if (tid == 0) {
      tma_prefetch_map(&args.a);
#pragma unroll
      for (int w = 0; w < NW; ++w) tma_prefetch_map(w == 0 ? &args.b0 : &args.b1);
      for (int kt = 0; kt < k_tiles; ++kt) {
        unsigned char* st = smem + (kt % kWgStages) * STAGE;
        uint64_t* full = ring.acquire(kt, STAGE);
        tma_load_4d(st, &args.a, kt * kWgBK, m0, 0, 0, full);
#pragma unroll
        for (int w = 0; w < NW; ++w)
          tma_load_4d(st + wg_gemm_b_tile(w), w == 0 ? &args.b0 : &args.b1, kt * kWgBK, n0, 0, 0, full);
      }
    }
    return;
  }
  setmaxnreg_inc<kConsumerRegs>();

  const int cw = wg - 1, lane = tid & 31, warp = (tid >> 5) & 3;
  float acc[NW][kWgBN / 8][4] = {};
  for (int kt = 0; kt < k_tiles; ++kt) {
    ring.wait(kt);
    // consumer cw: rows 64 cw .. of the A tile; k step kk: 16 elements = 32 bytes along the slab
    const unsigned char* st = smem + (kt % kWgStages) * STAGE;
#pragma unroll
    for (int w = 0; w < NW; ++w) fence_operands(acc[w]);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kWgBK / 16; ++kk) {
      const uint64_t desc_a = sw128_desc(st + sw128_k_step(kk, kWgBM, wg_gemm_a_row(cw)), kSw128KMajorLbo);
#pragma unroll
      for (int w = 0; w < NW; ++w)
        Wgmma<T, kWgBN>::ss(acc[w], desc_a, sw128_desc(st + wg_gemm_b_tile(w) + sw128_k_step(kk, kWgBN, 0),
                                                       kSw128KMajorLbo), 1);
    }
    wgmma_commit();
    wgmma_wait<1>();  // tile kt - 1's wgmmas are done, tile kt's run on
    if (kt > 0) ring.release(kt - 1);
  }
  wgmma_wait<0>();
#pragma unroll
  for (int w = 0; w < NW; ++w) fence_operands(acc[w]);

#pragma unroll
  for (int j = 0; j < kWgBN / 8; ++j) {
    const int64_t col = n0 + wg_gemm_col(j, lane);
    if (col >= p.n) continue;
    const float2 b = bias_pair<T, E>(p, col);
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const int64_t row = m0 + wg_gemm_row(cw, warp, lane, hh);
      if (row >= p.m) continue;
      store_pair<T, E>(p, row, col, acc[0][j][2 * hh], acc[0][j][2 * hh + 1], acc[NW - 1][j][2 * hh],
                       acc[NW - 1][j][2 * hh + 1], b);
    }
  }
#else
  __trap();  // a binary without sm_90a code: the launcher never gets here, but never return garbage
#endif
}

// ---- few rows: one warp per output column pair --------------------------------------------------------------------

// (kGemvRows, kGemvWarps, kGemvUnroll, kGemvStep and the mapping: ffn_layout.cuh)

// acc + the dot product of 8 packed elements of w and x.
template <typename T>
__device__ __forceinline__ float dot8(const uint4& w, const uint4& x, float acc) {
  const uint32_t* wp = reinterpret_cast<const uint32_t*>(&w);
  const uint32_t* xp = reinterpret_cast<const uint32_t*>(&x);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 a = Mma<T>::unpack(wp[i]), b = Mma<T>::unpack(xp[i]);
    acc = fmaf(a.x, b.x, acc);
    acc = fmaf(a.y, b.y, acc);
  }
  return acc;
}

// C[m, col..col + 1] for all m < p.m <= kGemvRows: warp w of block b owns the column pair col = 2 (b kGemvWarps + w).
// It streams its two rows of each weight front to back (lane l takes elements 8 l .. 8 l + 7 of every 256; the loads
// evict-first, the weights are read once), meets them with the rows of A (read through the caches: every warp
// shares them), sums across the warp and stores through the GEMMs' epilogue. k % 8 == 0 (checked by the launcher).
template <typename T, Epilogue E>
__global__ void __launch_bounds__(kGemvWarps * 32) gemv_kernel(const GemmArgs p) {
  constexpr int NW = n_weights<E>();
  const int lane = threadIdx.x & 31;
  const int64_t col = gemv_col(blockIdx.x, threadIdx.x >> 5);
  if (col >= p.n) return;  // a whole warp; n is even, so col + 1 < n as well
  const T* w[NW][2];
#pragma unroll
  for (int i = 0; i < NW; ++i)
#pragma unroll
    for (int r = 0; r < 2; ++r) w[i][r] = static_cast<const T*>(i == 0 ? p.b0 : p.b1) + (col + r) * p.k;
  const T* a = static_cast<const T*>(p.a);
  const int rows = static_cast<int>(p.m);

  float acc[NW][2][kGemvRows] = {};
  for (int64_t k0 = 0; k0 < p.k; k0 += kGemvStep * kGemvUnroll) {
    uint4 wv[kGemvUnroll][NW][2];
#pragma unroll
    for (int u = 0; u < kGemvUnroll; ++u) {
      const int64_t k = gemv_k(k0, u, lane);
#pragma unroll
      for (int i = 0; i < NW; ++i)
#pragma unroll
        for (int r = 0; r < 2; ++r)
          wv[u][i][r] = k < p.k ? __ldcs(reinterpret_cast<const uint4*>(w[i][r] + k)) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < kGemvUnroll; ++u) {
      const int64_t k = gemv_k(k0, u, lane);
      if (k >= p.k) break;
#pragma unroll
      for (int m = 0; m < kGemvRows; ++m) {
        if (m >= rows) break;
        const uint4 xv = __ldg(reinterpret_cast<const uint4*>(a + m * p.k + k));
#pragma unroll
        for (int i = 0; i < NW; ++i)
#pragma unroll
          for (int r = 0; r < 2; ++r) acc[i][r][m] = dot8<T>(wv[u][i][r], xv, acc[i][r][m]);
      }
    }
  }
  // every lane ends with every sum; lane m stores row m
  float y0 = 0.f, y1 = 0.f, u0 = 0.f, u1 = 0.f;
#pragma unroll
  for (int m = 0; m < kGemvRows; ++m) {
#pragma unroll
    for (int i = 0; i < NW; ++i)
#pragma unroll
      for (int r = 0; r < 2; ++r)
#pragma unroll
        for (int off = 16; off >= 1; off /= 2) acc[i][r][m] += __shfl_xor_sync(0xffffffffu, acc[i][r][m], off);
    if (m == lane) y0 = acc[0][0][m], y1 = acc[0][1][m], u0 = acc[NW - 1][0][m], u1 = acc[NW - 1][1][m];
  }
  if (lane < rows) store_pair<T, E>(p, lane, col, y0, y1, u0, u1, bias_pair<T, E>(p, col));
}

template <typename T, Epilogue E>
Status run_gemv(const GemmArgs& g, cudaStream_t stream, const char* what) {
  const int64_t blocks = (g.n / 2 + kGemvWarps - 1) / kGemvWarps;
  if (blocks > 2147483647LL) return Status::Error(std::string(what) + ": too many columns for one launch");
  return launch_kernel(gemv_kernel<T, E>, dim3(static_cast<unsigned>(blocks)), kGemvWarps * 32, 0, stream, g,
                       std::string(what) + " (gemv)");
}

// The grid of a GEMM of bm x bn output tiles, or an error naming `what` when it exceeds a launch's limits.
bool gemm_grid(const GemmArgs& g, int bm, int bn, dim3* grid, Status* error, const std::string& what) {
  const int64_t grid_n = (g.n + bn - 1) / bn, grid_m = (g.m + bm - 1) / bm;
  if (grid_m > 65535) {
    *error = Status::Error(what + ": too many rows for one launch (at most 65535 * " + std::to_string(bm) + "), got " +
                           std::to_string(g.m));
    return false;
  }
  if (grid_n > 2147483647LL) {
    *error = Status::Error(what + ": too many columns for one launch (at most 2^31 - 1 tiles of " +
                           std::to_string(bn) + "), got " + std::to_string(g.n));
    return false;
  }
  *grid = dim3(static_cast<unsigned>(grid_n), static_cast<unsigned>(grid_m));
  return true;
}

// The tensor maps of the wgmma GEMM (A and the weights as (K, rows) with 64 x 128 boxes); false with *why set when
// N or K pass the TMA's 32-bit coordinates or the driver refuses a map.
template <Epilogue E>
bool encode_gemm_maps(WgGemmArgs& a, DType dtype, std::string* why) {
  const GemmArgs& g = a.p;
  if (g.n > INT32_MAX - kWgBN || g.k > INT32_MAX - kWgBK) {
    *why = "TMA coordinates are 32-bit: N must stay below 2^31 - 128 and K below 2^31 - 64";
    return false;
  }
  const NamedTileMap act{&a.a, {g.a, g.k, g.m, 1, 1, g.k, 0, 0, kWgBM}, "the activations"};
  const NamedTileMap w0{&a.b0, {g.b0, g.k, g.n, 1, 1, g.k, 0, 0, kWgBN}, "the (first) weight"};
  const NamedTileMap w1{&a.b1, {g.b1, g.k, g.n, 1, 1, g.k, 0, 0, kWgBN}, "the second weight"};
  return n_weights<E>() == 2 ? encode_tile_maps({act, w0, w1}, dtype, why) : encode_tile_maps({act, w0}, dtype, why);
}

template <typename T, Epilogue E>
Status run_gemm(const GemmArgs& g, KernelFamily kernels, cudaStream_t stream, const char* what) {
  std::string why;
  const bool sm90 = sm90a_device(&why);
  if (kernels == KernelFamily::kWgmma && !sm90)
    return Status::Error(std::string(what) + ": FASTLM_CUDA_KERNELS=wgmma, but " + why);
  dim3 grid;
  Status error;
  if (use_wgmma(kernels, sm90)) {
    WgGemmArgs args{};
    args.p = g;
    if (encode_gemm_maps<E>(args, std::is_same<T, __half>::value ? DType::kFloat16 : DType::kBFloat16, &why)) {
      if (!gemm_grid(g, kWgBM, kWgBN, &grid, &error, std::string(what) + " (wgmma)")) return error;
      return launch_kernel(gemm_tn_wgmma_kernel<T, E>, grid, kWgThreads, wgmma_gemm_smem_bytes<E>(), stream, args,
                           std::string(what) + " (wgmma)");
    }
    if (kernels == KernelFamily::kWgmma)
      return Status::Error(std::string(what) + ": FASTLM_CUDA_KERNELS=wgmma, but " + why);
  }
  // the mma.sync kernel (also where the driver refuses a tensor map under auto)
  if (!gemm_grid(g, kGemmBM, block_n<E>(), &grid, &error, what)) return error;
  return launch_kernel(gemm_tn_kernel<T, E>, grid, kThreads, gemm_smem_bytes<E>(), stream, g, what);
}

Status check(const MlpParams& p, bool swiglu, const char* what) {
  if (p.dtype == DType::kFloat32)
    return Status::Error(std::string(what) + ": CUDA kernels take fp16/bf16 (tensor cores); got fp32");
  if (p.rows < 0 || p.d_model <= 0 || p.d_ff <= 0 || p.d_model % 8 != 0 || p.d_ff % 8 != 0)
    return Status::Error(std::string(what) + ": d_model and d_ff must be positive multiples of 8, got " +
                         std::to_string(p.d_model) + " and " + std::to_string(p.d_ff));
  if (p.rows == 0) return Status::Ok();  // no work (torch hands out null pointers for empty tensors)
  const void* ptrs[] = {p.x, p.w1, swiglu ? p.w1b : p.w1, p.w2, p.hidden, p.out};
  for (const void* ptr : ptrs)
    if (ptr == nullptr || reinterpret_cast<uintptr_t>(ptr) % 16 != 0)
      return Status::Error(std::string(what) +
                           ": activations, weights and outputs must be non-null and 16-byte aligned");
  return Status::Ok();
}

// The GEMM of epilogue E: gemv_kernel for at most kGemvRows rows, else the tensor-core kernel of the family.
template <typename T, Epilogue E>
Status run(const GemmArgs& g, KernelFamily kernels, cudaStream_t stream, const char* what) {
  return g.m <= kGemvRows ? run_gemv<T, E>(g, stream, what) : run_gemm<T, E>(g, kernels, stream, what);
}

template <typename T>
Status mlp(const MlpParams& p, bool swiglu, cudaStream_t stream) {
  const char* what = swiglu ? "mlp_swiglu" : "mlp_gelu";
  GemmArgs first{p.x, p.w1, p.w1b, p.b1, nullptr, p.hidden, p.rows, p.d_ff, p.d_model};
  Status s = swiglu ? run<T, Epilogue::kSwiglu>(first, p.kernels, stream, what)
                    : run<T, Epilogue::kBiasGelu>(first, p.kernels, stream, what);
  if (!s.ok()) return s;
  GemmArgs second{p.hidden, p.w2, nullptr, p.b2, p.residual, p.out, p.rows, p.d_model, p.d_ff};
  return run<T, Epilogue::kBiasResidual>(second, p.kernels, stream, what);
}

Status mlp_dispatch(const MlpParams& p, bool swiglu, cudaStream_t stream) {
  Status s = check(p, swiglu, swiglu ? "mlp_swiglu" : "mlp_gelu");
  if (!s.ok() || p.rows == 0) return s;
  return p.dtype == DType::kFloat16 ? mlp<__half>(p, swiglu, stream) : mlp<__nv_bfloat16>(p, swiglu, stream);
}

}  // namespace

Status mlp_gelu(const MlpParams& p, cudaStream_t stream) { return mlp_dispatch(p, false, stream); }
Status mlp_swiglu(const MlpParams& p, cudaStream_t stream) { return mlp_dispatch(p, true, stream); }

}  // namespace fastlm_cuda
