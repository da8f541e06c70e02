// The work mappings of ffn.cu's three kernels: which shared-memory rows each warp multiplies and which output
// elements each lane stores. Host code too: tests/cuda_layout_test.cu prints them for the tensor-core emulation
// (bench/dev/mma_layout_emu.py: check_gemm, check_gemm_wgmma, check_gemv), which drives its emulated ldmatrix, mma
// and wgmma with them and compares the stored output with plain matrix products.
//
// An accumulator pair (row, col), (row, col + 1) of a lane is always the m16n8 C fragment's: rows lane / 4 and
// lane / 4 + 8 (half hh = 0, 1) of a 16-row tile, columns 2 (lane % 4) and + 1 of an 8-column tile.
#pragma once

#include <cstdint>

namespace fastlm_cuda {

// ---- mma.sync GEMM (gemm_tn_kernel): a block computes a kGemmBM x bn tile of C = A B^T ----
// bn = 128, or 64 for SwiGLU's dual GEMM (two weights share each A tile and keep two accumulators). A pipeline stage
// holds kGemmBK columns of the A tile's kGemmBM rows, then of each weight's bn rows, kGemmStride elements per row.
constexpr int kGemmBM = 128, kGemmBK = 32;
constexpr int kGemmStride = kGemmBK + 8;  // 80-byte rows: the 8 rows of an ldmatrix phase fall in 8 bank groups

__host__ __device__ constexpr int gemm_stage_rows(int n_weights, int bn) { return kGemmBM + n_weights * bn; }
__host__ __device__ constexpr int gemm_weight_row(int w, int bn) { return kGemmBM + w * bn; }  // weight w's first row
// The 8 warps tile the block as 2 (M) x 4 (N), 64 x bn / 4 each: a warp's first row of A, and of weight w, in a stage.
__host__ __device__ constexpr int gemm_a_row(int warp) { return (warp >> 2) * 64; }
__host__ __device__ constexpr int gemm_b_row(int warp, int w, int bn) {
  return gemm_weight_row(w, bn) + (warp & 3) * (bn / 4);
}
// The block-tile row and column of half hh of the lane's accumulators of 16-row tile i and 8-column tile j.
__host__ __device__ constexpr int gemm_row(int warp, int i, int lane, int hh) {
  return gemm_a_row(warp) + i * 16 + (lane >> 2) + 8 * hh;
}
__host__ __device__ constexpr int gemm_col(int warp, int j, int lane, int bn) {
  return (warp & 3) * (bn / 4) + j * 8 + 2 * (lane & 3);
}

// ---- wgmma GEMM (gemm_tn_wgmma_kernel): a block computes a kWgBM x kWgBN tile ----
// A stage holds the A tile, then each weight's tile, every one 128 rows of kWgBK elements: one sw128 slab
// (wgmma.cuh), kWgTile bytes. Consumer warpgroup cw multiplies rows 64 cw .. 64 cw + 63 of the A tile.
constexpr int kWgBM = 128, kWgBN = 128, kWgBK = 64;
constexpr int kWgTile = kWgBM * kWgBK * 2;
static_assert(kWgBM == kWgBN && kWgBK * 2 == 128, "A and B tiles share one shape, a row is one 128-byte slab");

__host__ __device__ constexpr int wg_gemm_b_tile(int w) { return (1 + w) * kWgTile; }  // byte offset of weight w's
__host__ __device__ constexpr int wg_gemm_a_row(int cw) { return cw * 64; }
// The block-tile row of half hh of the lane's accumulators in warp `warp` (0..3) of consumer cw; the column of its
// 8-column tile j.
__host__ __device__ constexpr int wg_gemm_row(int cw, int warp, int lane, int hh) {
  return wg_gemm_a_row(cw) + warp * 16 + (lane >> 2) + 8 * hh;
}
__host__ __device__ constexpr int wg_gemm_col(int j, int lane) { return j * 8 + 2 * (lane & 3); }

// ---- CUDA-core GEMV (gemv_kernel, at most kGemvRows rows of A) ----
// Warp w of block b owns the output column pair gemv_col(b, w), gemv_col(b, w) + 1 and streams those two weight rows
// front to back, lane l taking the 8 elements from gemv_k(k0, u, l) in unrolled step u of each block of
// kGemvStep * kGemvUnroll elements.
constexpr int kGemvRows = 8;         // rows of A up to which the MLPs take gemv_kernel
constexpr int kGemvWarps = 4;        // warps per block
constexpr int kGemvUnroll = 4;       // 16-byte loads per weight row in flight per lane
constexpr int kGemvStep = 32 * 8;    // elements one warp-wide 16-byte load covers

__host__ __device__ constexpr int64_t gemv_col(int64_t block, int warp) { return 2 * (block * kGemvWarps + warp); }
__host__ __device__ constexpr int64_t gemv_k(int64_t k0, int u, int lane) { return k0 + u * kGemvStep + lane * 8; }

}  // namespace fastlm_cuda
