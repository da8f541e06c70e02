// Host-side launch plumbing shared by the CUDA launchers: dynamic shared-memory reservation, the launch-error
// check, the choice between the sm_80 (mma.sync) and sm_90a (wgmma) kernels, and the dispatch over the head dims the
// attention kernels are compiled for.
#pragma once

#include <cuda_runtime.h>

#include <string>
#include <type_traits>

#include "cuda/launchers.h"

namespace fastlm_cuda {

// kernel<<<grid, threads, smem, stream>>>(args), `smem` bytes of dynamic shared memory reserved first (above the
// 48 KB default a kernel must opt in); a failure to reserve or to launch comes back as an error naming `what`.
template <typename Kernel, typename Args>
Status launch_kernel(Kernel kernel, dim3 grid, int threads, int smem, cudaStream_t stream, const Args& args,
                     const std::string& what) {
  if (smem > 0) {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) {
      cudaGetLastError();  // reported here, not left for the next launch check to find
      return Status::Error(what + ": cannot reserve " + std::to_string(smem) + " bytes of shared memory: " +
                           cudaGetErrorString(err));
    }
  }
  kernel<<<grid, threads, smem, stream>>>(args);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return Status::Error(what + ": launch failed: " + cudaGetErrorString(err));
  return Status::Ok();
}

// Whether the sm_90a (wgmma) kernels can run: the extension was built for sm_90a (FASTLM_CUDA_SM90A, set by setup.py)
// and the current device is compute capability 9.x. If not and why is given, *why says what is missing.
inline bool sm90a_device(std::string* why) {
#ifndef FASTLM_CUDA_SM90A
  if (why) *why = "the extension was built without sm_90a (FASTLM_CUDA_ARCHS has no 90a)";
  return false;
#else
  int dev = 0, major = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) {
    cudaGetLastError();  // clear the error: the caller falls back or reports
    if (why) *why = "cannot query the device's compute capability";
    return false;
  }
  if (major != 9) {
    if (why) *why = "wgmma needs a compute capability 9.x device (Hopper); this one is " + std::to_string(major) + ".x";
    return false;
  }
  return true;
#endif
}

// Whether a launcher runs its wgmma kernel: asked for (an error later where it cannot run), or auto on a device
// where it can.
inline bool use_wgmma(KernelFamily kernels, bool supported) {
  return kernels == KernelFamily::kWgmma || (kernels == KernelFamily::kAuto && supported);
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
    default: return head_dim_error(op, head_dim);
  }
}

}  // namespace fastlm_cuda
