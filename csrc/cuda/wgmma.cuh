// Hopper (sm_90a) warpgroup tensor-core building blocks: wgmma.mma_async with fp32 accumulation for fp16 / bf16
// operands, shared-memory matrix descriptors for the 128-byte swizzled layout, and the fences wgmma needs.
//
// Shared-memory tiles ("sw128 tiles") hold ROWS rows of a multiple of 64 16-bit elements. The row is cut into
// 64-element (128-byte) column blocks; block b is a contiguous ROWS x 128-byte slab at b * ROWS * 128, row r at
// r * 128 in it, and the 16-byte chunk j of a row is stored at chunk position j ^ (r % 8). The hardware applies the
// same XOR to address bits [4, 7) from bits [7, 10), so a slab must start 1024-byte aligned. A TMA load of a
// 64-element-wide box with the 128-byte swizzle writes exactly such a slab (tma.cuh). One layout serves both operand
// majors:
//   K-major (A = Q rows, B = K rows: the reduction dim is contiguous): 8-row core groups are SBO = 1024 bytes
//     apart; the 16-element k step kk starts at slab kk / 4, byte (kk % 4) * 32 of the first row; LBO is unused.
//   MN-major (B = V rows for P V: the output dim is contiguous, "transposed" B): k step kk (keys 16 kk ..) starts
//     at row 16 kk; the two 8-key groups are SBO = 1024 bytes apart, the 64-column blocks LBO = ROWS * 128 apart.
//
// Accumulators use the m64nN fp32 fragment layout: warp w of the warpgroup holds rows 16 w .. 16 w + 15 and
// d[j][e] = (row 16 w + g + 8 (e / 2), column 8 j + 2 t + e % 2) with lane = 4 g + t: per warp, exactly the
// mma.sync m16n8 C layout over N / 8 column tiles, so the warp-level softmax of attention_tile.cuh applies as is,
// and the register A operand of wgmma (per warp the mma.sync m16n8k16 A layout) is packed from it as in warp_pv.
#pragma once

#include <cstdint>

#include "cuda/mma.cuh"

namespace fastlm_cuda {

// Byte offsets in an sw128 tile of `rows` rows (see above). Host code too: tests/cuda_layout_test.cu prints them for
// the tensor-core emulation (bench/dev/mma_layout_emu.py), which checks them against plain matrix products.
// Column slab c (columns 64 c .. 64 c + 63): where a TMA box of those columns lands.
__host__ __device__ constexpr uint32_t sw128_slab(int c, int rows) { return static_cast<uint32_t>(c * rows * 128); }
// K-major k step kk (columns 16 kk .. 16 kk + 15) of the operand rows row0 .. (a multiple of 8).
__host__ __device__ constexpr uint32_t sw128_k_step(int kk, int rows, int row0) {
  return sw128_slab(kk / 4, rows) + static_cast<uint32_t>(row0 * 128 + (kk % 4) * 32);
}
// MN-major k step kk (rows 16 kk .. 16 kk + 15) of the output columns col0 .. (a multiple of 64).
__host__ __device__ constexpr uint32_t sw128_mn_step(int kk, int rows, int col0) {
  return sw128_slab(col0 / 64, rows) + static_cast<uint32_t>(kk * 16 * 128);
}
// The MN-major column-block stride (LBO); 16 for K-major operands, where it is unused.
__host__ __device__ constexpr uint32_t sw128_mn_lbo(int rows) { return static_cast<uint32_t>(rows * 128); }
constexpr uint32_t kSw128KMajorLbo = 16;
// Matrix descriptor of a 128-byte swizzled operand at shared-memory byte address `addr`.
__host__ __device__ constexpr uint64_t sw128_desc_bits(uint32_t addr, uint32_t lbo_bytes) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (static_cast<uint64_t>(lbo_bytes >> 4) << 16) |
         (static_cast<uint64_t>(1024 >> 4) << 32) | (1ull << 62);
}
// The same for the operand starting at `smem`.
__device__ __forceinline__ uint64_t sw128_desc(const void* smem, uint32_t lbo_bytes) {
  return sw128_desc_bits(smem_addr(smem), lbo_bytes);
}

// Order register writes (accumulators, A fragments) before the wgmma that reads them.
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// Keep the compiler from moving reads or writes of accumulators (float) and register A fragments (uint32_t) across
// the wgmma issue / wait points: the register math around a wgmma is otherwise free to drift past its fences.
__device__ __forceinline__ void fence_operand(float& x) { asm volatile("" : "+f"(x)::"memory"); }
__device__ __forceinline__ void fence_operand(uint32_t& x) { asm volatile("" : "+r"(x)::"memory"); }
template <typename E, int NT>
__device__ __forceinline__ void fence_operands(E (&d)[NT][4]) {
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) fence_operand(d[j][e]);
}

#define FASTLM_ACC4(d, j) "+f"(d[j][0]), "+f"(d[j][1]), "+f"(d[j][2]), "+f"(d[j][3])
#define FASTLM_ACC_N64(d)                                                                                      \
  FASTLM_ACC4(d, 0), FASTLM_ACC4(d, 1), FASTLM_ACC4(d, 2), FASTLM_ACC4(d, 3), FASTLM_ACC4(d, 4), FASTLM_ACC4(d, 5), \
      FASTLM_ACC4(d, 6), FASTLM_ACC4(d, 7)
#define FASTLM_ACC_N128(d)                                                                                         \
  FASTLM_ACC_N64(d), FASTLM_ACC4(d, 8), FASTLM_ACC4(d, 9), FASTLM_ACC4(d, 10), FASTLM_ACC4(d, 11), FASTLM_ACC4(d, 12), \
      FASTLM_ACC4(d, 13), FASTLM_ACC4(d, 14), FASTLM_ACC4(d, 15)
#define FASTLM_D_N64                                                                  \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"          \
  " %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define FASTLM_D_N128                                                                 \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"          \
  " %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31," \
  " %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47," \
  " %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"

// d (+)= A B, A and B from shared memory, both K-major; scale_d = 0 overwrites d. The operand numbers after the
// accumulators: A, B, SCALE (N / 2, N / 2 + 1, N / 2 + 2).
#define FASTLM_WGMMA_SS(N, TY, A, B, SCALE)                                                                       \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " SCALE ", 0;\n"                                                \
               "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TY "." TY " " FASTLM_D_N##N ", " A ", " B        \
               ", p, 1, 1, 0, 0;\n}\n"                                                                            \
               : FASTLM_ACC_N##N(d)                                                                              \
               : "l"(desc_a), "l"(desc_b), "r"(scale_d))
// d (+)= A B, A from registers (per warp the m16n8k16 A fragment), B from shared memory MN-major (transposed).
#define FASTLM_WGMMA_RS(N, TY, A0, B, SCALE)                                                                      \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " SCALE ", 0;\n"                                                \
               "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TY "." TY " " FASTLM_D_N##N ", " A0 ", " B       \
               ", p, 1, 1, 1;\n}\n"                                                                             \
               : FASTLM_ACC_N##N(d)                                                                              \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(scale_d))

template <typename T, int N>
struct Wgmma;

#define FASTLM_DEFINE_WGMMA(T, TY, N, A, B, SCALE, A0, RB, RSCALE)                                                \
  template <>                                                                                                    \
  struct Wgmma<T, N> {                                                                                           \
    __device__ __forceinline__ static void ss(float (&d)[N / 8][4], uint64_t desc_a, uint64_t desc_b,            \
                                              int scale_d) {                                                     \
      FASTLM_WGMMA_SS(N, TY, A, B, SCALE);                                                                       \
    }                                                                                                            \
    __device__ __forceinline__ static void rs_mn(float (&d)[N / 8][4], const uint32_t (&a)[4], uint64_t desc_b,  \
                                                 int scale_d) {                                                  \
      FASTLM_WGMMA_RS(N, TY, A0, RB, RSCALE);                                                                    \
    }                                                                                                            \
  };

FASTLM_DEFINE_WGMMA(__half, "f16", 64, "%32", "%33", "%34", "{%32, %33, %34, %35}", "%36", "%37")
FASTLM_DEFINE_WGMMA(__nv_bfloat16, "bf16", 64, "%32", "%33", "%34", "{%32, %33, %34, %35}", "%36", "%37")
FASTLM_DEFINE_WGMMA(__half, "f16", 128, "%64", "%65", "%66", "{%64, %65, %66, %67}", "%68", "%69")
FASTLM_DEFINE_WGMMA(__nv_bfloat16, "bf16", 128, "%64", "%65", "%66", "{%64, %65, %66, %67}", "%68", "%69")

#undef FASTLM_DEFINE_WGMMA
#undef FASTLM_WGMMA_RS
#undef FASTLM_WGMMA_SS
#undef FASTLM_D_N128
#undef FASTLM_D_N64
#undef FASTLM_ACC_N128
#undef FASTLM_ACC_N64
#undef FASTLM_ACC4

}  // namespace fastlm_cuda
