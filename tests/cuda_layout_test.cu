// The layout arithmetic of csrc/cuda/ as the kernels compute it, printed on the host: mma.cuh's ldmatrix rows of the
// lanes, wgmma.cuh's sw128 tile offsets and matrix descriptors, the wgmma attention kernel's tile shapes
// (attention_tile.cuh's Sm90Shape), the geometry of tma.cuh's tensor maps, and ffn.cu's work mappings
// (ffn_layout.cuh: the mma.sync and wgmma GEMMs' shared-memory rows and output elements, the CUDA-core GEMV).
// tests/test_cuda_ext.py::test_tensor_core_layout_is_the_kernels
// builds it with nvcc (host code only: no GPU needed) and compares every line with the formulas of
// bench/dev/mma_layout_emu.py, whose emulation of the PTX operand layouts checks them against matrix products.
//
// One line per value: a name, its integer arguments, "=", the value.
#include <cinttypes>
#include <cstdio>

#include "cuda/attention_tile.cuh"
#include "cuda/ffn_layout.cuh"
#include "cuda/tma.cuh"
#include "cuda/wgmma.cuh"

using namespace fastlm_cuda;

template <int D>
void print_shape() {
  using S = Sm90Shape<D>;
  std::printf("sm90_tile %d = %d %d %d %d\n", D, S::kSlabs, S::kDo, S::kBlockN, S::kPvN);
}

void print_tile_map(const TileMapSpec& s) {
  const TileMapLayout m = tile_map_layout(s);
  std::printf("tile_map %lld %lld %lld %lld %lld %lld %lld %d =", static_cast<long long>(s.cols),
              static_cast<long long>(s.rows), static_cast<long long>(s.heads), static_cast<long long>(s.batch),
              static_cast<long long>(s.row_stride), static_cast<long long>(s.head_stride),
              static_cast<long long>(s.batch_stride), s.box_rows);
  for (cuuint64_t d : m.dims) std::printf(" %llu", static_cast<unsigned long long>(d));
  for (cuuint64_t st : m.strides) std::printf(" %llu", static_cast<unsigned long long>(st));
  for (cuuint32_t b : m.box) std::printf(" %u", static_cast<unsigned>(b));
  std::printf("\n");
}

void print_gemm_mappings() {
  std::printf("gemm_shape = %d %d %d\n", kGemmBM, kGemmBK, kGemmStride);
  for (int bn : {64, 128}) {
    for (int nw : {1, 2}) std::printf("gemm_stage_rows %d %d = %d\n", nw, bn, gemm_stage_rows(nw, bn));
    for (int w : {0, 1}) std::printf("gemm_weight_row %d %d = %d\n", w, bn, gemm_weight_row(w, bn));
  }
  for (int warp = 0; warp < 8; ++warp) {
    std::printf("gemm_a_row %d = %d\n", warp, gemm_a_row(warp));
    for (int bn : {64, 128}) {
      for (int w : {0, 1}) std::printf("gemm_b_row %d %d %d = %d\n", warp, w, bn, gemm_b_row(warp, w, bn));
      for (int j = 0; j < bn / 32; ++j)
        for (int lane : {0, 6, 31})
          std::printf("gemm_col %d %d %d %d = %d\n", warp, j, lane, bn, gemm_col(warp, j, lane, bn));
    }
    for (int i = 0; i < 4; ++i)
      for (int lane : {0, 6, 31})
        for (int hh : {0, 1})
          std::printf("gemm_row %d %d %d %d = %d\n", warp, i, lane, hh, gemm_row(warp, i, lane, hh));
  }
  std::printf("wg_gemm_shape = %d %d %d %d\n", kWgBM, kWgBN, kWgBK, kWgTile);
  for (int w : {0, 1}) std::printf("wg_gemm_b_tile %d = %d\n", w, wg_gemm_b_tile(w));
  for (int cw : {0, 1}) {
    std::printf("wg_gemm_a_row %d = %d\n", cw, wg_gemm_a_row(cw));
    for (int warp = 0; warp < 4; ++warp)
      for (int lane : {0, 6, 31})
        for (int hh : {0, 1})
          std::printf("wg_gemm_row %d %d %d %d = %d\n", cw, warp, lane, hh, wg_gemm_row(cw, warp, lane, hh));
  }
  for (int j : {0, 1, 15})
    for (int lane : {0, 6, 31}) std::printf("wg_gemm_col %d %d = %d\n", j, lane, wg_gemm_col(j, lane));
}

int main() {
  print_shape<32>();
  print_shape<64>();
  print_shape<96>();
  print_shape<128>();
  print_shape<256>();
  for (int rows : {64, 128}) {
    std::printf("mn_lbo %d = %u\n", rows, sw128_mn_lbo(rows));
    for (int c = 0; c < 4; ++c) std::printf("slab %d %d = %u\n", c, rows, sw128_slab(c, rows));
    for (int kk = 0; kk < 16; ++kk)
      for (int r0 : {0, 64}) std::printf("k_step %d %d %d = %u\n", kk, rows, r0, sw128_k_step(kk, rows, r0));
    for (int kk = 0; kk < rows / 16; ++kk)
      for (int c0 : {0, 64, 128, 192})
        std::printf("mn_step %d %d %d = %u\n", kk, rows, c0, sw128_mn_step(kk, rows, c0));
  }
  std::printf("k_major_lbo = %u\n", kSw128KMajorLbo);
  // attention's q (batch, seqlen, heads, D) and a k stored as (batch, heads, seqlen, D); the GEMMs' (K, rows)
  // operands; size-1 dims, whose strides torch leaves arbitrary (the bindings pass 0)
  print_tile_map({nullptr, 96, 200, 4, 2, 4 * 96, 96, 200 * 4 * 96, 128});
  print_tile_map({nullptr, 128, 333, 2, 2, 128, 333 * 128, 2 * 333 * 128, 64});
  print_tile_map({nullptr, 1000, 300, 1, 1, 1000, 0, 0, 128});
  print_tile_map({nullptr, 64, 1, 8, 3, 0, 64, 512, 128});
  print_tile_map({nullptr, 64, 5, 1, 3, 64, 0, 999, 128});
  print_gemm_mappings();
  std::printf("gemv_shape = %d %d %d %d\n", kGemvRows, kGemvWarps, kGemvUnroll, kGemvStep);
  for (int64_t block : {0, 1, 7})
    for (int warp = 0; warp < kGemvWarps; ++warp)
      std::printf("gemv_col %lld %d = %lld\n", static_cast<long long>(block), warp,
                  static_cast<long long>(gemv_col(block, warp)));
  for (int64_t k0 : {0, kGemvStep * kGemvUnroll, 3 * kGemvStep * kGemvUnroll})
    for (int u = 0; u < kGemvUnroll; ++u)
      for (int lane : {0, 1, 17, 31})
        std::printf("gemv_k %lld %d %d = %lld\n", static_cast<long long>(k0), u, lane,
                    static_cast<long long>(gemv_k(k0, u, lane)));
  for (int stride : {40, 136})  // (the mma.sync GEMM's k tile of 32 + 8; attention's head dim 128 + 8)
    for (int row0 : {0, 16})
      for (int col0 : {0, 16})
        for (int lane = 0; lane < 32; ++lane) {
          std::printf("ldsm_a %d %d %d %d = %d\n", lane, row0, col0, stride, ldsm_a(lane, row0, col0, stride));
          std::printf("ldsm_b %d %d %d %d = %d\n", lane, row0, col0, stride, ldsm_b(lane, row0, col0, stride));
          std::printf("ldsm_b_trans %d %d %d %d = %d\n", lane, row0, col0, stride,
                      ldsm_b_trans(lane, row0, col0, stride));
        }
  // addresses on swizzle-pattern rows (1024-byte multiples plus whole k steps), also past the 18 address bits the
  // descriptor keeps
  for (uint32_t addr : {0u, 32u, 96u, 1024u, 16384u + 64u, 0x3FC00u, 0x40000u + 2048u, 0xFFFFFC20u})
    for (uint32_t lbo : {16u, 8192u, 16384u})
      std::printf("desc %u %u = %" PRIu64 "\n", addr, lbo, sw128_desc_bits(addr, lbo));
  return 0;
}
