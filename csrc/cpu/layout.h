// Element offsets in the (batch, seqlen, heads, headdim) tensors the CPU attention kernels read: q, k, v, and the KV
// caches, with any strides but a contiguous head dim.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

namespace fastlm_cpu {

struct Strides {
  int64_t b, s, h;
  int64_t of(int64_t bi, int64_t si, int64_t hi) const { return bi * b + si * s + hi * h; }  // of (bi, si, hi, 0)
};

inline Strides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

// Whether no two elements of t share memory, by its strides: with the dims of more than one element ordered by
// stride, each stride passes the span of the dims before it. (ATen's has_internal_overlap answers "too hard" for any
// layout that is not dense, e.g. a slice of a larger buffer; this test takes every layout whose dims nest.)
inline bool non_overlapping(const at::Tensor& t) {
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size) of the dims with size > 1
  for (int64_t i = 0; i < t.dim(); ++i)
    if (t.size(i) > 1) dims.emplace_back(t.stride(i), t.size(i));
  std::sort(dims.begin(), dims.end());
  int64_t span = 0;  // the largest offset the dims so far reach
  for (const auto& [stride, size] : dims) {
    if (stride <= span) return false;
    span += (size - 1) * stride;
  }
  return true;
}

}  // namespace fastlm_cpu
