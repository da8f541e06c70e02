// y = x W^T (+ b) on the CPU, W in nn.Linear layout (out_features, in_features).
//
// For at most kGemvMaxRows rows of x (the projections and LM head of a decoding step) the product is a
// bandwidth-bound matrix-vector product: gemv.h streams W once at the memory's rate, x is widened to fp32 once, and
// accumulation is fp32 for every dtype. Larger inputs, and weights whose rows are not contiguous, go to ATen's GEMM,
// which is compute-bound there and good at it (in fp32 for bf16 / fp16 on CPUs without native half-precision
// products: half_gemm.h; the weight is widened in slices of rows, so a large LM head never needs a full fp32 copy).
#include "cpu/gemv.h"
#include "cpu/half_gemm.h"
#include "cpu/ops.h"

#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/mm.h>
#include <c10/util/Exception.h>

#include <vector>

namespace fastlm_cpu {

constexpr int64_t kWidenFloats = int64_t{1} << 22;  // fp32 weight elements widened at a time (16 MB)

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
  if (!gemv && native_half_gemm(dtype)) return at::linear(x, weight, bias);

  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  at::Tensor out = at::empty(out_shape, x.options());
  if (out.numel() == 0) return out;
  if (K == 0) return bias.has_value() ? out.copy_(bias->expand(out_shape)) : out.zero_();
  const at::Tensor xf = x.reshape({T, K}).to(at::kFloat).contiguous();
  if (!gemv) {  // a half-precision GEMM in fp32, widening the weight a slice of rows at a time (a bounded copy)
    const int64_t rows = std::max<int64_t>(64, kWidenFloats / K);
    for (int64_t n0 = 0; n0 < N; n0 += rows) {
      const int64_t nn = std::min(rows, N - n0);
      const at::Tensor w = weight.narrow(0, n0, nn).to(at::kFloat);
      const at::Tensor y = bias.has_value() ? at::addmm(bias->narrow(0, n0, nn).to(at::kFloat), xf, w.t())
                                            : at::mm(xf, w.t());
      out.view({T, N}).narrow(1, n0, nn).copy_(y);
    }
    return out;
  }
  at::Tensor y = dtype == at::kFloat ? out.view({T, N}) : at::empty({T, N}, x.options().dtype(at::kFloat));
  float* yp = y.data_ptr<float>();
  with_float_type(dtype, [&](auto tag) {
    const auto* w = weight.const_data_ptr<decltype(tag)>();
    for_row_ranges(N, K, [&](int64_t n0, int64_t n1) {
      gemv_rows(xf.const_data_ptr<float>(), T, K, w, weight.stride(0), n0, n1, yp, N);
    });
  });
  if (bias.has_value()) y.add_(*bias);
  if (dtype != at::kFloat) out.view({T, N}).copy_(y);
  return out;
}

}  // namespace fastlm_cpu
