// Decode attention over a KV cache (Flash-Decoding) on mma.sync (sm_80+), fp16/bf16, head dims 32/64/96/128/256.
//
// The rows of one (sequence b, kv head) are the GROUP = H / Hkv query heads times the Sq new queries: they share
// every K/V byte, so they are computed together as one 16-row mma tile (more rows: more row tiles, grid z). The
// valid cache length (read on the device; the grid depends on S_max only, so the launch can be graph-captured) is
// cut into num_splits chunks of whole 16-key tiles; with a sliding window only the keys from the first query's window
// start on are. Each *warp* owns one split: it streams its chunk through a
// private two-stage cp.async pipeline in shared memory (no block-wide barriers), runs the FlashAttention-2 steps
// of attention_tile.cuh and writes its partial (m, l, unnormalized o) to the workspace. The combine kernel merges
// the splits of each output row:  out = sum_s 2^(m_s - M) o_s / sum_s 2^(m_s - M) l_s,  M = max_s m_s.
//
// Memory traffic: K and V of the valid cache once per kv head (times the row tiles, 1 unless GROUP * Sq > 16),
// plus num_splits * (D + 2) fp32 per output row written once and read once.
#include <cuda_runtime.h>

#include <algorithm>
#include <string>

#include "cuda/attention_tile.cuh"
#include "cuda/launch_utils.cuh"
#include "cuda/launchers.h"

namespace fastlm_cuda {
namespace {

constexpr int kTileKeys = 16;

template <int D>
constexpr int decode_warps() { return D <= 128 ? 4 : 2; }  // 5 tiles of 16 x (D + 8) per warp in shared memory

template <int D>
constexpr int decode_smem_bytes() { return decode_warps<D>() * 5 * kTileKeys * TileShape<D>::kStride * 2; }

template <typename T, int D>
__global__ void __launch_bounds__(decode_warps<D>() * 32) decode_split_kernel(const DecodeParams p) {
  constexpr int WARPS = decode_warps<D>();
  constexpr int S = TileShape<D>::kStride;
  constexpr int TILE = kTileKeys * S;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int split = blockIdx.y * WARPS + warp;
  if (split >= p.num_splits) return;  // warps never synchronize with each other
  T* sq = reinterpret_cast<T*>(smem_raw) + warp * 5 * TILE;
  T* sk = sq + TILE;      // two buffers
  T* sv = sk + 2 * TILE;  // two buffers

  const int b = blockIdx.x / p.nheads_kv, hk = blockIdx.x % p.nheads_kv;
  const int group = p.nheads / p.nheads_kv, sq_len = p.seqlen_q;
  const int n_rows = group * sq_len;
  const int row_base = blockIdx.z * 16;
  int64_t len = p.seqlens_int64 ? static_cast<const int64_t*>(p.cache_seqlens)[b]
                                : static_cast<const int32_t*>(p.cache_seqlens)[b];
  const int seqlen = static_cast<int>(min(max(len, int64_t(0)), int64_t(p.max_seqlen)));
  // query i sits at position first_pos + i and sees keys (pos - window_left ..) pos; no key before `start` is seen
  const int first_pos = seqlen - sq_len, wl = p.window_left;
  const int start = wl >= 0 ? min(max(first_pos - wl, 0), seqlen) : 0;
  // balance the keys from start on over the splits in whole tiles
  const int tiles_per_split = ((seqlen - start + kTileKeys - 1) / kTileKeys + p.num_splits - 1) / p.num_splits;
  const int lo = start + split * tiles_per_split * kTileKeys;
  const int hi = min(lo + tiles_per_split * kTileKeys, seqlen);

  const T* q = static_cast<const T*>(p.q) + b * p.q_sb;
  const T* k = static_cast<const T*>(p.k) + b * p.k_sb + hk * p.k_sh;
  const T* v = static_cast<const T*>(p.v) + b * p.v_sb + hk * p.v_sh;
  // tile row r = query (row_base + r) / group of head hk * group + (row_base + r) % group
  load_rows_async<T, 16, D, 32>(sq, [&](int r) -> const T* {
    const int idx = row_base + r;
    if (idx >= n_rows) return nullptr;
    return q + (idx / group) * p.q_ss + (hk * group + idx % group) * p.q_sh;
  }, q, lane);
  auto load_kv = [&](int n0, int buf) {
    load_rows_async<T, kTileKeys, D, 32>(
        sk + buf * TILE, [&](int r) { return n0 + r < hi ? k + (n0 + r) * p.k_ss : nullptr; }, k, lane);
    load_rows_async<T, kTileKeys, D, 32>(
        sv + buf * TILE, [&](int r) { return n0 + r < hi ? v + (n0 + r) * p.v_ss : nullptr; }, v, lane);
  };
  if (lo < hi) load_kv(lo, 0);
  cp_async_commit();

  WarpState<D> st;
  st.init();
  const float scale_log2 = p.softmax_scale * kLog2e;
  int buf = 0;
  for (int n0 = lo; n0 < hi; n0 += kTileKeys, buf ^= 1) {
    if (n0 + kTileKeys < hi) load_kv(n0 + kTileKeys, buf ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncwarp();

    float s[kTileKeys / 8][4];
    warp_qk<T, D, kTileKeys>(s, sq, sk + buf * TILE, lane);
    const bool need_mask = n0 + kTileKeys > hi || n0 + kTileKeys - 1 > first_pos ||
                           (wl >= 0 && n0 < first_pos + sq_len - 1 - wl);
    warp_softmax<D, kTileKeys>(s, st, scale_log2, need_mask, [&](int r, int c) {
      const int j = n0 + c, pos = first_pos + (row_base + r) / group;
      return j < hi && j <= pos && (wl < 0 || j >= pos - wl);
    }, lane);
    warp_pv<T, D, kTileKeys>(st, s, sv + buf * TILE, lane);
    __syncwarp();  // the next iteration overwrites the buffer read here
  }
  cp_async_wait<0>();

  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int idx = row_base + g + 8 * hh;
    const float l = quad_sum(st.l[hh]);
    if (idx >= n_rows) continue;
    const int qi = idx / group, head = hk * group + idx % group;
    const int64_t mid = ((static_cast<int64_t>(b) * sq_len + qi) * p.nheads + head) * p.num_splits + split;
    float* o = p.workspace + mid * D;
#pragma unroll
    for (int j = 0; j < D / 8; ++j)
      *reinterpret_cast<float2*>(o + j * 8 + 2 * t) = make_float2(st.o[j][2 * hh], st.o[j][2 * hh + 1]);
    if (t == 0) {
      // workspace = [o: rows x splits x D][(m, l): rows x splits x 2]
      float* ml = p.workspace + static_cast<int64_t>(p.batch) * sq_len * p.nheads * p.num_splits * D + 2 * mid;
      ml[0] = st.m[hh];
      ml[1] = l;
    }
  }
}

// One warp per output row (b, i, h); lane holds columns lane + 32 c. Splits merged online.
template <typename T, int D>
__global__ void __launch_bounds__(128) decode_combine_kernel(const DecodeParams p) {
  const int64_t n_rows = static_cast<int64_t>(p.batch) * p.seqlen_q * p.nheads;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * 4 + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= n_rows) return;
  const float* o_all = p.workspace;
  const float* ml = p.workspace + n_rows * p.num_splits * D;
  float m = -INFINITY, l = 0.f, acc[D / 32];
#pragma unroll
  for (int c = 0; c < D / 32; ++c) acc[c] = 0.f;
  for (int s = 0; s < p.num_splits; ++s) {
    const int64_t mid = row * p.num_splits + s;
    const float m_s = ml[2 * mid], l_s = ml[2 * mid + 1];
    const float m_new = fmaxf(m, m_s);
    const float m_safe = m_new == -INFINITY ? 0.f : m_new;  // no key in any split so far
    const float alpha = exp2f(m - m_safe), w = exp2f(m_s - m_safe);
    l = l * alpha + w * l_s;
#pragma unroll
    for (int c = 0; c < D / 32; ++c) acc[c] = acc[c] * alpha + w * o_all[mid * D + lane + 32 * c];
    m = m_new;
  }
  const float inv = l > 0.f ? 1.f / l : 0.f;  // a query with no key: 0
  T* out = static_cast<T*>(p.out) + row * D;  // out is contiguous (B, Sq, H, D): row = (b * Sq + i) * H + h
#pragma unroll
  for (int c = 0; c < D / 32; ++c) out[lane + 32 * c] = from_float<T>(acc[c] * inv);
}

template <typename T, int D>
Status launch(const DecodeParams& p, cudaStream_t stream) {
  constexpr int warps = decode_warps<D>();
  const int64_t rows_per_kv_head = static_cast<int64_t>(p.nheads / p.nheads_kv) * p.seqlen_q;
  if (rows_per_kv_head > 65535 * 16)
    return Status::Error("decode_attention: nheads / nheads_kv * seqlen_q must be <= 65535 * 16 query rows per kv "
                         "head, got " + std::to_string(rows_per_kv_head));
  const int row_tiles = static_cast<int>((rows_per_kv_head + 15) / 16);
  const dim3 grid(p.batch * p.nheads_kv, (p.num_splits + warps - 1) / warps, row_tiles);
  const Status s = launch_kernel(decode_split_kernel<T, D>, grid, warps * 32, decode_smem_bytes<D>(), stream, p,
                                 "decode_attention (split kernel)");
  if (!s.ok()) return s;
  const int64_t n_rows = static_cast<int64_t>(p.batch) * p.seqlen_q * p.nheads;
  return launch_kernel(decode_combine_kernel<T, D>, dim3(static_cast<unsigned>((n_rows + 3) / 4)), 128, 0, stream, p,
                       "decode_attention (combine kernel)");
}

template <typename T>
Status launch_any_head_dim(const DecodeParams& p, cudaStream_t stream) {
  return dispatch_head_dim(p.head_dim, "decode_attention",
                           [&](auto d) { return launch<T, decltype(d)::value>(p, stream); });
}

int sm_count() {
  int dev = 0, n = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n <= 0)
    return 132;
  return n;
}

}  // namespace

int decode_num_splits(int batch, int seqlen_q, int nheads, int nheads_kv, int max_seqlen) {
  // ~16 warps per SM (4 blocks of 4), each split >= 4 tiles; depends on shapes only, never on the lengths
  const int64_t row_tiles = (static_cast<int64_t>(nheads / std::max(nheads_kv, 1)) * seqlen_q + 15) / 16;
  const int64_t programs = std::max<int64_t>(1, static_cast<int64_t>(batch) * nheads_kv * row_tiles);
  const int64_t target = (16LL * sm_count() + programs - 1) / programs;
  const int64_t max_useful = std::max<int64_t>(1, (max_seqlen + 4 * kTileKeys - 1) / (4 * kTileKeys));
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({target, max_useful, 1024})));
}

int64_t decode_workspace_floats(int batch, int seqlen_q, int nheads, int num_splits, int head_dim) {
  return static_cast<int64_t>(batch) * seqlen_q * nheads * num_splits * (head_dim + 2);
}

Status decode_attention(const DecodeParams& params, cudaStream_t stream) {
  DecodeParams p = params;
  if (p.dtype == DType::kFloat32)
    return Status::Error("decode_attention: CUDA kernels take fp16/bf16 (tensor cores); got fp32");
  if (p.batch < 0 || p.seqlen_q < 0 || p.max_seqlen < 0 || p.nheads <= 0 || p.nheads_kv <= 0 ||
      p.nheads % p.nheads_kv != 0 || p.num_splits <= 0)
    return Status::Error("decode_attention: bad sizes (nheads must be a positive multiple of nheads_kv, "
                         "num_splits >= 1)");
  if (!compiled_head_dim(p.head_dim)) return head_dim_error("decode_attention", p.head_dim);
  if (p.window_left < -1)
    return Status::Error("decode_attention: window_left must be >= -1 (-1: no window), got " +
                         std::to_string(p.window_left));
  if (p.num_splits > 65535) return Status::Error("decode_attention: num_splits must be <= 65535");
  if (static_cast<int64_t>(p.batch) * p.nheads_kv > 2147483647LL)
    return Status::Error("decode_attention: batch * nheads_kv must be < 2^31");
  if (p.batch == 0 || p.seqlen_q == 0) return Status::Ok();
  // (an empty cache, max_seqlen 0, may come with null k / v: torch's pointer for a zero-size tensor)
  if (!p.q || !p.cache_seqlens || !p.out || !p.workspace || (p.max_seqlen > 0 && (!p.k || !p.v)))
    return Status::Error("decode_attention: q, k_cache, v_cache, cache_seqlens, out and the workspace must be set");
  if (p.window_left >= p.max_seqlen) p.window_left = -1;  // reaches every key: none (keeps positions in int range)
  const int64_t strides[] = {p.q_sb, p.q_ss, p.q_sh, p.k_sb, p.k_ss, p.k_sh, p.v_sb, p.v_ss, p.v_sh};
  for (int64_t s : strides)
    if (s % 8 != 0) return Status::Error("decode_attention: every stride must be a multiple of 8 elements (16 bytes)");
  for (const void* ptr : {p.q, p.k, p.v, static_cast<const void*>(p.workspace)})
    if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0)
      return Status::Error("decode_attention: q, k_cache, v_cache and the workspace must be 16-byte aligned");
  return p.dtype == DType::kFloat16 ? launch_any_head_dim<__half>(p, stream)
                                    : launch_any_head_dim<__nv_bfloat16>(p, stream);
}

}  // namespace fastlm_cuda
