// Allocation of the CPU operators' outputs.
//
// A large tensor comes from a fresh mmap (glibc serves requests above 32 MB that way, every time), so the kernel
// that first writes it takes a page fault per 4 KB page: for the 131 MB of logits of a 1024-token LM head (vocab
// 32000) those faults cost as much time as 20-25 % of the GEMM that fills it. Where the kernel offers transparent
// huge pages on request (/sys/kernel/mm/transparent_hugepage/enabled = madvise, a common default), asking for them
// makes that a fault per 2 MB. This only advises the kernel: contents, size and lifetime of the memory are as
// at::empty made them.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastlm_cpu {

constexpr uintptr_t kHugePage = uintptr_t(2) << 20;
constexpr int64_t kHugeOutputBytes = 8 * int64_t(kHugePage);  // outputs from this size on ask for huge pages

// at::empty(sizes, options), backed by transparent huge pages where the output is large and the system grants them.
inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (out.nbytes() >= size_t(kHugeOutputBytes)) {
    const uintptr_t p = reinterpret_cast<uintptr_t>(out.data_ptr());
    const uintptr_t begin = (p + kHugePage - 1) & ~(kHugePage - 1), end = (p + out.nbytes()) & ~(kHugePage - 1);
    if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);  // advice: may fail
  }
#endif
  return out;
}

}  // namespace fastlm_cpu
