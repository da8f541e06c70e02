// y = x W^T (+ b) on the CPU, W in nn.Linear layout (out_features, in_features).
//
// For at most kGemvMaxRows rows of x (the projections and LM head of a decoding step) the product is a
// bandwidth-bound matrix-vector product: gemv.h streams W once at the memory's rate. Larger inputs go to the packed
// GEMM of gemm.h (on par with ATen's fp32 GEMM on the model's square-ish shapes, 2x on an LM head at a few dozen
// rows, bench/dev/cpu_notes.md), which also widens bf16 / fp16 weights to fp32 while packing them. x is widened to
// fp32 once (bf16 with AVX512-BF16: x and W stay bf16, on the dot products), accumulation is fp32 for every dtype,
// and the bias is added before the one rounding to x's dtype. bf16 GEMMs go to ATen's instead where the CPU has
// AMX-BF16 (gemm.h's bf16_on_aten), with the same arithmetic.
#include "cpu/gemm.h"
#include "cpu/gemv.h"
#include "cpu/ops.h"
#include "cpu/output.h"

#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/util/Exception.h>

#include <vector>

namespace fastlm_cpu {

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() >= 1, "fastlm::linear: x must have at least 1 dim (..., in_features), got a 0-D tensor");
  TORCH_CHECK(weight.dim() == 2, "fastlm::linear: weight must be 2-D (out_features, in_features), got shape ",
              weight.sizes());
  const int64_t K = x.size(-1), N = weight.size(0);
  TORCH_CHECK(weight.size(1) == K, "fastlm::linear: weight must be (out_features, ", K, ") for x's last dim ", K,
              ", got ", weight.sizes());
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "fastlm::linear: dtype must be float32, bfloat16 or float16, got ", dtype);
  for (const auto* t : {&x, &weight}) {
    const char* name = t == &x ? "x" : "weight";
    TORCH_CHECK(t->device().is_cpu(), "fastlm::linear (CPU): ", name, " must be a CPU tensor, got ", t->device());
    TORCH_CHECK(t->scalar_type() == dtype, "fastlm::linear: ", name, " must have x's dtype ", dtype, ", got ",
                t->scalar_type());
  }
  if (bias.has_value()) {
    TORCH_CHECK(bias->device().is_cpu() && bias->scalar_type() == dtype && bias->dim() == 1 && bias->size(0) == N,
                "fastlm::linear: bias must be a CPU ", dtype, " tensor of shape (", N, ",), got a ",
                bias->scalar_type(), " tensor of shape ", bias->sizes(), " on ", bias->device());
  }
  int64_t T = 1;
  for (int64_t i = 0; i + 1 < x.dim(); ++i) T *= x.size(i);
  const bool gemv = T <= kGemvMaxRows && (weight.stride(1) == 1 || K <= 1);
  const bool aten = dtype == at::kBFloat16 && bf16_on_aten();  // (gemm.h; checks FASTLM_CPU_BF16)

  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  at::Tensor out = empty_output(out_shape, x.options());
  if (out.numel() == 0) return out;
  if (K == 0) return bias.has_value() ? out.copy_(bias->expand(out_shape)) : out.zero_();
  const at::Tensor xb = x.reshape({T, K}).contiguous();
  if (aten && !gemv) {  // (fp32 accumulation, the bias, one rounding)
    at::AutoDispatchBelowADInplaceOrView below_autograd;    // (a kernel: its ATen calls record no graph)
    at::Tensor out2 = out.view({T, N});
    if (bias.has_value())
      at::addmm_out(out2, *bias, xb, weight.t());
    else
      at::mm_out(out2, xb, weight.t());
    return out;
  }
  const bool words = dtype == at::kBFloat16 && bf16_dot_available() && !gemv;  // (x stays bf16, as words)
  const at::Tensor xf = words ? at::Tensor() : xb.to(at::kFloat);
  const at::Tensor bf = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const float* bp = bf.defined() ? bf.const_data_ptr<float>() : nullptr;
  with_float_type(dtype, [&](auto tag) {
    using T_ = decltype(tag);
    const T_* w = weight.const_data_ptr<T_>();
    T_* op = out.data_ptr<T_>();
    if (gemv) {
      float* yp;
      at::Tensor y;
      if constexpr (std::is_same_v<T_, float>) {
        yp = op;
      } else {
        y = at::empty({T, N}, x.options().dtype(at::kFloat));
        yp = y.data_ptr<float>();
      }
      for_row_ranges(N, K, [&](int64_t n0, int64_t n1) {
        gemv_rows(xf.const_data_ptr<float>(), T, K, w, weight.stride(0), n0, n1, yp, N);
        for (int64_t t = 0; t < T; ++t)
          for (int64_t n = n0; n < n1; ++n) op[t * N + n] = from_float<T_>(yp[t * N + n] + (bp ? bp[n] : 0.0f));
      });
      return;
    }
    auto epilogue = [&](int64_t m0, int64_t rows, int64_t n0, int64_t cols, const float* tile, int64_t ldt) {
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t j = 0; j < cols; j += kW) {
          const int64_t len = std::min<int64_t>(kW, cols - j);
          vfloat y = vload(tile + i * ldt + j);
          if (bp) y += vload_cvt_n(bp + n0 + j, len);
          vstore_cvt_n(op + (m0 + i) * N + n0 + j, y, len);
        }
    };
    if constexpr (kBf16Dot<T_>) {  // x as words of bf16 pairs for the dot products
      const int64_t K2 = (K + 1) / 2;
      Words xw;
      gemm_nt(T, N, K, as_words(xb.const_data_ptr<T_>(), T, K, xw), K2, w, weight.stride(0), weight.stride(1),
              epilogue);
    } else {
      gemm_nt(T, N, K, xf.const_data_ptr<float>(), K, w, weight.stride(0), weight.stride(1), epilogue);
    }
  });
  return out;
}

}  // namespace fastlm_cpu
