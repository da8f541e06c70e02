// Element offsets in the (batch, seqlen, heads, headdim) tensors the CPU attention kernels read: q, k, v, and the KV
// caches, with any strides but a contiguous head dim.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace fastlm_cpu {

struct Strides {
  int64_t b, s, h;
  int64_t of(int64_t bi, int64_t si, int64_t hi) const { return bi * b + si * s + hi * h; }  // of (bi, si, hi, 0)
};

inline Strides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

}  // namespace fastlm_cpu
