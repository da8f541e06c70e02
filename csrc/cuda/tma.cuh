// Hopper (sm_90a) asynchronous copies for warp-specialized kernels: shared-memory mbarriers (arrive, expected
// transaction bytes, phase-parity waits), TMA tile loads (cp.async.bulk.tensor) that complete on an mbarrier,
// setmaxnreg to move registers from a producer warpgroup to the consumer warpgroups, and on the host the encoding of
// the tensor maps the loads read (through the driver's cuTensorMapEncodeTiled, looked up at run time, so the
// extension does not link libcuda).
//
// A TMA load with CU_TENSOR_MAP_SWIZZLE_128B and a 64-element (128-byte) inner box writes box row r at r * 128 and
// its 16-byte chunk j at chunk position j ^ (r % 8) of a 1024-byte aligned destination: the sw128 slab of wgmma.cuh.
// Elements outside the tensor (rows past a sequence end, columns past a head dim of 32 or 96) are written as zeros
// without reading memory, and still count towards the bytes the barrier expects.
#pragma once

#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>
#include <string>

#include "cuda/launchers.h"
#include "cuda/mma.cuh"

namespace fastlm_cuda {

// ---- device side (the bodies exist only in sm_90a code; the kernels that call them are guarded the same way) ----

__device__ __forceinline__ void mbar_init(uint64_t* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count) : "memory");
}
// Make initialized barriers visible to the async proxy (the TMA unit) and, after a block barrier, to all threads.
__device__ __forceinline__ void mbar_fence_init() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_addr(bar)) : "memory");
}
// The producer's arrival that also announces `bytes` of TMA writes the current phase must wait for.
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(bytes)
               : "memory");
}
// Wait until the barrier's phase with parity `parity` has completed (the k-th completion has parity k & 1).
__device__ __forceinline__ void mbar_wait(uint64_t* bar, int parity) {
  uint32_t done;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(smem_addr(bar)), "r"(parity)
        : "memory");
  } while (!done);
}

// The box of a 4-D tensor map at element coordinates (c0, c1, c2, c3) into shared memory at dst; completion
// (the box's bytes) is signalled on bar.
__device__ __forceinline__ void tma_load_4d(void* dst, const CUtensorMap* map, int c0, int c1, int c2, int c3,
                                            uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5, %6}],"
      " [%2];\n" ::"r"(smem_addr(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(smem_addr(bar)), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
      : "memory");
}
__device__ __forceinline__ void tma_prefetch_map(const CUtensorMap* map) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}

// Per-thread register budget of the executing warpgroup (all its threads execute it). The kernel needs
// __launch_bounds__(threads, 1) so that ptxas knows the count at entry (otherwise it ignores these, advisory C7508).
template <int N>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <int N>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}

// The warp-specialized kernels' register split: a producer warpgroup keeps kProducerRegs per thread and gives the
// rest to two consumer warpgroups (setmaxnreg), within the SM's 65536 for a 384-thread block.
constexpr int kProducerRegs = 24, kConsumerRegs = 240;
static_assert(128 * kProducerRegs + 2 * 128 * kConsumerRegs <= 65536, "register file over-subscribed");

// A ring of STAGES shared-memory slots that one producer thread fills with TMA loads and CONSUMERS threads read.
// Per slot a "full" mbarrier (the producer's arrival with the expected bytes, completed when the TMA writes land)
// and an "empty" one (one arrival per consumer thread once it is done with the slot). Tile t uses slot t % STAGES
// for the u-th time, u = t / STAGES: its fill completes the full barrier's u-th phase (parity u & 1), and from the
// second use on the producer first waits for the (u - 1)-th release (parity (u - 1) & 1).
template <int STAGES, int CONSUMERS>
struct TmaRing {
  uint64_t full[STAGES], empty[STAGES];

  __device__ __forceinline__ void init() {  // one thread, before the block's barrier (see mbar_fence_init)
    for (int i = 0; i < STAGES; ++i) {
      mbar_init(&full[i], 1);
      mbar_init(&empty[i], CONSUMERS);
    }
  }
  // Producer: wait until tile t's slot is free and announce `bytes` of loads; returns the barrier they complete on.
  __device__ __forceinline__ uint64_t* acquire(int t, uint32_t bytes) {
    const int slot = t % STAGES;
    if (t >= STAGES) mbar_wait(&empty[slot], ((t / STAGES) & 1) ^ 1);
    mbar_arrive_expect_tx(&full[slot], bytes);
    return &full[slot];
  }
  // Consumer: wait until tile t has landed; release it when this thread's reads of it are complete.
  __device__ __forceinline__ void wait(int t) { mbar_wait(&full[t % STAGES], (t / STAGES) & 1); }
  __device__ __forceinline__ void release(int t) { mbar_arrive(&empty[t % STAGES]); }
};

// Named barrier ID (1 .. 15; 0 is __syncthreads') completed by THREADS threads (a multiple of 32): wait at it, or
// arrive without waiting. Every thread of a warp executes the same one.
template <int ID, int THREADS>
__device__ __forceinline__ void named_bar_sync() {
  asm volatile("bar.sync %0, %1;\n" ::"n"(ID), "n"(THREADS) : "memory");
}
template <int ID, int THREADS>
__device__ __forceinline__ void named_bar_arrive() {
  asm volatile("bar.arrive %0, %1;\n" ::"n"(ID), "n"(THREADS) : "memory");
}

// ---- host side ----

// A 16-bit tensor of rows of `cols` elements addressed as (col, row, head, batch) with element strides (row_stride,
// head_stride, batch_stride), loaded in boxes of 64 columns x box_rows rows into sw128 slabs. Strides and the base
// must be 16-byte aligned (the launchers check it). A size-1 dim's stride is never used to address (torch leaves
// any value there, the bindings pass 0); it is given as if that dim were packed on top of the one inside it. False
// with *why set when the driver refuses.
struct TileMapSpec {
  const void* base;
  int64_t cols, rows, heads, batch;
  int64_t row_stride, head_stride, batch_stride;
  int box_rows;
};

// The tensor map's geometry for a spec: dims (cols, rows, heads, batch), the byte strides of dims 1..3, the box.
// Host code only: tests/cuda_layout_test.cu prints it for the emulation's TMA loads (bench/dev/mma_layout_emu.py).
struct TileMapLayout {
  cuuint64_t dims[4];
  cuuint64_t strides[3];
  cuuint32_t box[4];
};

inline TileMapLayout tile_map_layout(const TileMapSpec& s) {
  TileMapLayout m{{static_cast<cuuint64_t>(s.cols), static_cast<cuuint64_t>(s.rows), static_cast<cuuint64_t>(s.heads),
                   static_cast<cuuint64_t>(s.batch)},
                  {},
                  {64, static_cast<cuuint32_t>(s.box_rows), 1, 1}};
  m.strides[0] = static_cast<cuuint64_t>(s.rows == 1 ? s.cols * 2 : s.row_stride * 2);
  m.strides[1] = s.heads == 1 ? m.strides[0] * m.dims[1] : static_cast<cuuint64_t>(s.head_stride * 2);
  m.strides[2] = s.batch == 1 ? m.strides[1] * m.dims[2] : static_cast<cuuint64_t>(s.batch_stride * 2);
  return m;
}

inline bool encode_tile_map(CUtensorMap* map, const TileMapSpec& s, DType dtype, std::string* why) {
  static const PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found;
#if CUDART_VERSION >= 12050
    const cudaError_t err = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault,
                                                             &found);
#else  // (the versioned lookup is CUDA 12.5+; 13.0 deprecates the plain one)
    const cudaError_t err = cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &fn, cudaEnableDefault, &found);
#endif
    if (err != cudaSuccess || found != cudaDriverEntryPointSuccess) {
      cudaGetLastError();
      fn = nullptr;
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  if (!encode) {
    *why = "the CUDA driver does not provide cuTensorMapEncodeTiled";
    return false;
  }
  const TileMapLayout m = tile_map_layout(s);
  const cuuint32_t unit[4] = {1, 1, 1, 1};
  const CUresult r = encode(map, dtype == DType::kFloat16 ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16
                                                          : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
                            4, const_cast<void*>(s.base), m.dims, m.strides, m.box, unit, CU_TENSOR_MAP_INTERLEAVE_NONE,
                            CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) {
    *why = "cuTensorMapEncodeTiled failed with CUresult " + std::to_string(static_cast<int>(r));
    return false;
  }
  return true;
}

// A tensor map to encode and the name an error gives it.
struct NamedTileMap {
  CUtensorMap* map;
  TileMapSpec spec;
  const char* name;
};

// encode_tile_map for each; false with *why = "tensor map of NAME: ..." for the first one the driver refuses.
inline bool encode_tile_maps(std::initializer_list<NamedTileMap> maps, DType dtype, std::string* why) {
  for (const NamedTileMap& m : maps) {
    if (!encode_tile_map(m.map, m.spec, dtype, why)) {
      *why = std::string("tensor map of ") + m.name + ": " + *why;
      return false;
    }
  }
  return true;
}

}  // namespace fastlm_cuda
