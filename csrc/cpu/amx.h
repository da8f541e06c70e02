// bf16 tile products on the AMX tile unit (Intel Xeon from Sapphire Rapids on: AMX-TILE + AMX-BF16).
//
// The unit holds 8 tile registers of up to 16 rows x 64 bytes. TDPBF16PS adds to an fp32 tile C (16 x 16) the
// product of a bf16 tile A (16 rows x 32 values along the reduction) and a tile B of 16 rows of 16 words, each word
// a pair of bf16 values consecutive along the reduction (the "pair" layout of bf16dot.h): 8192 multiply-adds per
// instruction, 16x a VDPBF16PS, products exact and summed in fp32 (bf16 denormals read as 0). Every tile here is
// 16 x 64 bytes: C in tmm0-3, A in tmm4-5, B in tmm6: a strip of 4 C tiles down a column takes 5 tile loads per 4
// products (tile_column).
//
// Compiled where the build target has AMX-BF16 (FASTLM_AMX, with -march=native on such a CPU); used where the
// Linux kernel also grants the process the tile state (arch_prctl ARCH_REQ_XCOMP_PERM), unless FASTLM_CPU_AMX=off.
#pragma once

#include "cpu/bf16dot.h"

#include <c10/util/Exception.h>
#include <cpuinfo.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#if defined(FASTLM_BF16_DOT) && defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__)
#define FASTLM_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace fastlm_cpu {

// Whether the CPU has AMX-BF16 (cpuinfo, asked once).
inline bool cpu_has_amx_bf16() {
  static const bool has = cpuinfo_initialize() && cpuinfo_has_x86_amx_bf16();
  return has;
}

// Whether fastlm's AMX kernels run now: built with them, the CPU has AMX-BF16, the kernel granted the tile state
// (asked once per process), and FASTLM_CPU_AMX ("auto", the default, or "off"; read at each call) allows them.
inline bool amx_enabled() {
  const char* env = std::getenv("FASTLM_CPU_AMX");
  const std::string mode = env && *env ? env : "auto";
  TORCH_CHECK_VALUE(mode == "auto" || mode == "off", "FASTLM_CPU_AMX must be auto or off, got '", mode, "'");
#if defined(FASTLM_AMX)
  constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;  // (asm/prctl.h; not in every libc's headers)
  static const bool granted = cpu_has_amx_bf16() && syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  return mode == "auto" && granted;
#else
  return false;
#endif
}

#if defined(FASTLM_AMX)

// The tile configuration for the lifetime of the object, on the calling thread (tile state is per thread).
class TileScope {
 public:
  TileScope() {
    struct alignas(64) Config {
      uint8_t palette, start_row, reserved[14];
      uint16_t colsb[16];
      uint8_t rows[16];
    } config;
    static_assert(sizeof(Config) == 64, "the LDTILECFG memory operand is 64 bytes");
    std::memset(&config, 0, sizeof config);
    config.palette = 1;
    for (int t = 0; t < 8; ++t) config.colsb[t] = 64, config.rows[t] = 16;
    _tile_loadconfig(&config);
  }
  ~TileScope() { _tile_release(); }
  TileScope(const TileScope&) = delete;
  TileScope& operator=(const TileScope&) = delete;
};

// A tile operand: tile (i, k) starts at p + i * i_step + k * k_step bytes, its 16 rows `stride` bytes apart.
struct TileOperand {
  const char* p;
  int64_t i_step, k_step, stride;
  const void* at(int64_t i, int64_t k) const { return p + i * i_step + k * k_step; }
};

// The MI (1 to 4) C tiles (i, j) ... (i + MI - 1, j): loaded from C (accumulate) or zeroed, the kt products of the
// reduction added (B's tile loaded once per step, A's into tmm4 and tmm5 in turn), stored.
template <int MI>
inline void tile_strip(int64_t i, int64_t j, int64_t kt, const TileOperand& A, const TileOperand& B, float* C,
                       int64_t ldc, bool accumulate) {
  const int64_t cs = ldc * 4;
  float* c = C + i * 16 * ldc + j * 16;
  if (accumulate) {
    _tile_loadd(0, c, cs);
    if constexpr (MI > 1) _tile_loadd(1, c + 16 * ldc, cs);
    if constexpr (MI > 2) _tile_loadd(2, c + 32 * ldc, cs);
    if constexpr (MI > 3) _tile_loadd(3, c + 48 * ldc, cs);
  } else {
    _tile_zero(0);
    if constexpr (MI > 1) _tile_zero(1);
    if constexpr (MI > 2) _tile_zero(2);
    if constexpr (MI > 3) _tile_zero(3);
  }
  for (int64_t k = 0; k < kt; ++k) {
    _tile_loadd(6, B.at(k, j), B.stride);
    _tile_loadd(4, A.at(i, k), A.stride);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (MI > 1) {
      _tile_loadd(5, A.at(i + 1, k), A.stride);
      _tile_dpbf16ps(1, 5, 6);
    }
    if constexpr (MI > 2) {
      _tile_loadd(4, A.at(i + 2, k), A.stride);
      _tile_dpbf16ps(2, 4, 6);
    }
    if constexpr (MI > 3) {
      _tile_loadd(5, A.at(i + 3, k), A.stride);
      _tile_dpbf16ps(3, 5, 6);
    }
  }
  _tile_stored(0, c, cs);
  if constexpr (MI > 1) _tile_stored(1, c + 16 * ldc, cs);
  if constexpr (MI > 2) _tile_stored(2, c + 32 * ldc, cs);
  if constexpr (MI > 3) _tile_stored(3, c + 48 * ldc, cs);
}

// Column j of C's tiles: C(i, j) = (accumulate ? C(i, j) : 0) + sum over k < kt of A(i, k) B(k, j) for i < mt
// (fp32 C, row stride ldc floats, tile (i, j) at C + 16 (i ldc + j)), 4 tiles at a time. Needs a TileScope on the
// thread.
inline void tile_column(int64_t mt, int64_t kt, const TileOperand& A, const TileOperand& B, int64_t j, float* C,
                        int64_t ldc, bool accumulate) {
  for (int64_t i = 0; i < mt; i += 4) {
    switch (std::min<int64_t>(4, mt - i)) {
      case 4:
        tile_strip<4>(i, j, kt, A, B, C, ldc, accumulate);
        break;
      case 3:
        tile_strip<3>(i, j, kt, A, B, C, ldc, accumulate);
        break;
      case 2:
        tile_strip<2>(i, j, kt, A, B, C, ldc, accumulate);
        break;
      default:
        tile_strip<1>(i, j, kt, A, B, C, ldc, accumulate);
    }
  }
}

#endif  // FASTLM_AMX

}  // namespace fastlm_cpu
