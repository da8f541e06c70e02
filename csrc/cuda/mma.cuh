// Warp-level tensor-core building blocks shared by the attention, decode and FFN kernels (sm_80+):
// cp.async 16-byte copies with zero fill, ldmatrix (plain and transposed) and mma.sync m16n8k16 with fp32
// accumulation for fp16 and bf16 operands.
//
// Fragment layouts of mma.m16n8k16 (lane = 4 * g + t):
//   A (16x16, row-major): a0 = (row g, cols 2t..2t+1), a1 = (row g+8, same), a2 = (row g, cols 2t+8..), a3 = (g+8, ..)
//   B (16x8, "col"):      b0 = (k 2t..2t+1, col g),    b1 = (k 2t+8..2t+9, col g)
//   C (16x8, fp32):       c0,c1 = (row g, cols 2t, 2t+1), c2,c3 = (row g+8, cols 2t, 2t+1)
// The C fragment of S = Q K^T over 16 keys is therefore the A fragment of P for P V without any data movement.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

namespace fastlm_cuda {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy; when !pred the destination is filled with zeros (no global read happens).
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool pred) {
  const int src_bytes = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem), "r"(src_bytes));
}
// Copy ROWS rows of D elements (16-byte chunks, NTHREADS threads; thread tid takes chunks tid, tid + NTHREADS, ...)
// into a shared tile with cp.async: chunk ch of row r goes to dst(r, ch), a shared address, and comes from
// row_ptr(r) + 8 ch. Rows where row_ptr returns nullptr are zero-filled and read nothing (`base`, any valid global
// address, stands in as the source).
template <typename T, int ROWS, int D, int NTHREADS, typename Dst, typename RowPtr>
__device__ __forceinline__ void copy_rows_async(Dst dst, RowPtr row_ptr, const T* base, int tid) {
  constexpr int kChunks = D / 8;
#pragma unroll
  for (int c = tid; c < ROWS * kChunks; c += NTHREADS) {
    const int r = c / kChunks, ch = c % kChunks;
    const T* src = row_ptr(r);
    cp_async_16(dst(r, ch), src ? src + ch * 8 : base, src != nullptr);
  }
}
// (memory clobbers: the compiler moves no shared-memory read above a wait, nor any access across a commit)
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem)));
}

// The row each lane hands to ldmatrix_x4 (lane 8 i + r: row r of 8 x 8 matrix i, register i), as an element offset
// in a row-major shared-memory tile of row stride `stride`, for the m16n8k16 operands at (row0, col0). Host code too:
// tests/cuda_layout_test.cu prints them for the tensor-core emulation (bench/dev/mma_layout_emu.py).
// A, 16 rows x 16 k: matrices (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15).
__host__ __device__ constexpr int ldsm_a(int lane, int row0, int col0, int stride) {
  return (row0 + (lane & 15)) * stride + col0 + (lane >> 4) * 8;
}
// B of two n8 tiles stored n-major (rows n, columns k, as K for Q K^T): matrices (n 0-7, k 0-7), (n 0-7, k 8-15),
// (n 8-15, k 0-7), (n 8-15, k 8-15): registers 0, 1 are the first tile's b0, b1, registers 2, 3 the second's.
__host__ __device__ constexpr int ldsm_b(int lane, int row0, int col0, int stride) {
  return (row0 + (lane & 7) + ((lane >> 4) << 3)) * stride + col0 + ((lane >> 3) & 1) * 8;
}
// B of two n8 tiles stored k-major (rows k, columns n, as V for P V), through ldmatrix_x4_trans: matrices
// (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15), (k 8-15, n 8-15), registers as for ldsm_b.
__host__ __device__ constexpr int ldsm_b_trans(int lane, int row0, int col0, int stride) {
  return (row0 + (lane & 7) + ((lane >> 3) & 1) * 8) * stride + col0 + (lane >> 4) * 8;
}

template <typename T>
struct Mma;

template <>
struct Mma<__half> {
  __device__ __forceinline__ static void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  __device__ __forceinline__ static float2 unpack(uint32_t v) {
    return __half22float2(*reinterpret_cast<__half2*>(&v));
  }
};

template <>
struct Mma<__nv_bfloat16> {
  __device__ __forceinline__ static void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  __device__ __forceinline__ static float2 unpack(uint32_t v) {
    return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&v));
  }
};

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// max / sum over the 4 lanes of a quad (the lanes that share a row of a C fragment)
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

}  // namespace fastlm_cuda
