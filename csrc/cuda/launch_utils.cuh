// Host-side launch plumbing shared by the CUDA launchers: dynamic shared-memory reservation, the launch-error
// check, and the dispatch over the head dims the attention kernels are compiled for.
#pragma once

#include <cuda_runtime.h>

#include <string>
#include <type_traits>

#include "cuda/launchers.h"

namespace fastlm_cuda {

// Allow `kernel` `bytes` of dynamic shared memory (above the 48 KB default a kernel must opt in).
template <typename Kernel>
Status reserve_smem(Kernel kernel, int bytes, const std::string& what) {
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err != cudaSuccess)
    return Status::Error(what + ": cannot reserve " + std::to_string(bytes) + " bytes of shared memory: " +
                         cudaGetErrorString(err));
  return Status::Ok();
}

// The error of the launch just made, if any.
inline Status launch_status(const std::string& what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return Status::Error(what + ": launch failed: " + cudaGetErrorString(err));
  return Status::Ok();
}

// launch(std::integral_constant<int, D>{}) for head_dim == D, D one of the compiled head dims.
template <typename Launch>
Status dispatch_head_dim(int head_dim, const char* op, Launch launch) {
  switch (head_dim) {
    case 32: return launch(std::integral_constant<int, 32>{});
    case 64: return launch(std::integral_constant<int, 64>{});
    case 96: return launch(std::integral_constant<int, 96>{});
    case 128: return launch(std::integral_constant<int, 128>{});
    case 256: return launch(std::integral_constant<int, 256>{});
    default:
      return Status::Error(std::string(op) + ": CUDA kernels support head dims 32, 64, 96, 128, 256; got " +
                           std::to_string(head_dim));
  }
}

}  // namespace fastlm_cuda
