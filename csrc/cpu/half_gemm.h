// Whether a bf16 / fp16 GEMM should run in fp32 on this CPU.
//
// ATen's bf16 and fp16 GEMMs are fast only where the CPU multiplies those types natively (AVX512-BF16 / AMX-BF16,
// AVX512-FP16 / AMX-FP16). Elsewhere they run several times slower than an fp32 GEMM of the same shape (on an AVX2
// machine: ~18 vs ~90 GFLOP/s), so the kernels that call large GEMMs widen bf16 / fp16 operands to fp32 (exact),
// multiply in fp32 and round the result once: faster, and no less accurate than the native path.
#pragma once

#include <ATen/cpu/Utils.h>
#include <c10/core/ScalarType.h>

#include <string>

namespace fastlm_cpu {

inline bool native_half_gemm(at::ScalarType dtype) {
  static const auto caps = at::cpu::get_cpu_capabilities();
  auto has = [](const char* key) {
    const auto it = caps.find(key);
    return it != caps.end() && it->second.isBool() && it->second.toBool();
  };
  static const bool bf16 = has("avx512_bf16") || has("amx_bf16");
  static const bool fp16 = has("avx512_fp16") || has("amx_fp16");
  return dtype == at::kBFloat16 ? bf16 : (dtype == at::kHalf ? fp16 : true);
}

}  // namespace fastlm_cpu
