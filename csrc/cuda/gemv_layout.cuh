// The work mapping of ffn.cu's CUDA-core GEMV (gemv_kernel, at most kGemvRows rows of A): warp w of block b owns
// the output column pair gemv_col(b, w), gemv_col(b, w) + 1 and streams those two weight rows front to back, lane l
// taking the 8 elements from gemv_k(k0, u, l) in unrolled step u of each block of kGemvStep * kGemvUnroll elements.
// Host code too: tests/cuda_layout_test.cu prints it for the emulation (bench/dev/mma_layout_emu.py's check_gemv).
#pragma once

#include <cstdint>

namespace fastlm_cuda {

constexpr int kGemvRows = 8;         // rows of A up to which the MLPs take gemv_kernel
constexpr int kGemvWarps = 4;        // warps per block
constexpr int kGemvUnroll = 4;       // 16-byte loads per weight row in flight per lane
constexpr int kGemvStep = 32 * 8;    // elements one warp-wide 16-byte load covers

__host__ __device__ constexpr int64_t gemv_col(int64_t block, int warp) { return 2 * (block * kGemvWarps + warp); }
__host__ __device__ constexpr int64_t gemv_k(int64_t k0, int u, int lane) { return k0 + u * kGemvStep + lane * 8; }

}  // namespace fastlm_cuda
