// Allocation of the CPU operators' outputs.
//
// A large tensor comes from a fresh mmap (glibc serves requests above 32 MB that way, every time), so the kernel
// that first writes it takes a page fault per 4 KB page: for the 131 MB of logits of a 1024-token LM head (vocab
// 32000) those faults cost as much time as 20-25 % of the GEMM that fills it. With FASTLM_CPU_HUGE_PAGES=on, and
// where the kernel offers transparent huge pages on request (/sys/kernel/mm/transparent_hugepage/enabled = madvise,
// a common default), outputs from 16 MB on ask for them: a fault per 2 MB. That is off by default: in a VM whose
// host takes freed guest memory back (free page reporting), each fresh huge page waits on the host, and a training
// step that frees and reallocates hundreds of MB per step ran 1.5x slower with it (bench/dev/cpu_notes.md). This
// only advises the kernel: contents, size and lifetime of the memory are as at::empty made them.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <c10/util/Exception.h>

#include <cstdint>
#include <cstdlib>
#include <string>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastlm_cpu {

constexpr uintptr_t kHugePage = uintptr_t(2) << 20;
constexpr int64_t kHugeOutputBytes = 8 * int64_t(kHugePage);  // outputs from this size on ask for huge pages

// FASTLM_CPU_HUGE_PAGES: "off" (the default) or "on", read at each call.
inline bool huge_outputs() {
  const char* env = std::getenv("FASTLM_CPU_HUGE_PAGES");
  const std::string mode = env && *env ? env : "off";
  TORCH_CHECK_VALUE(mode == "off" || mode == "on", "FASTLM_CPU_HUGE_PAGES must be off or on, got '", mode, "'");
  return mode == "on";
}

// at::empty(sizes, options); with huge_outputs(), backed by transparent huge pages where the output is large and the
// system grants them.
inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (out.nbytes() >= size_t(kHugeOutputBytes) && huge_outputs()) {
    const uintptr_t p = reinterpret_cast<uintptr_t>(out.data_ptr());
    const uintptr_t begin = (p + kHugePage - 1) & ~(kHugePage - 1), end = (p + out.nbytes()) & ~(kHugePage - 1);
    if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);  // advice: may fail
  }
#endif
  return out;
}

}  // namespace fastlm_cpu
