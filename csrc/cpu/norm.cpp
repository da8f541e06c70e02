// LayerNorm and RMSNorm over the last dim on the CPU, alone or fused with the residual add:
//
//     h = x + residual                                         (rounded to x's dtype, as the unfused add rounds)
//     y = (h - mean(h)) / sqrt(mean((h - mean(h))^2) + eps) * weight + bias         LayerNorm
//     y = h / sqrt(mean(h^2) + eps) * weight                                         RMSNorm
//
// Algorithm: rows in parallel, each row by one thread in fp32 vectors (simd.h) for every dtype, its tail through
// a padded vector. With a residual a first pass writes h, and the statistics are taken from the rounded h, so that
// y is the norm of the h returned. The statistics pass reads the row from L1: the sum of squares for RMSNorm; the
// mean, then the sum of squared deviations from it for LayerNorm (the one-pass E[h^2] - E[h]^2 cancels
// catastrophically in rows whose mean dwarfs their spread). The output pass normalizes, scales and shifts with
// one rounding to x's dtype.
//
// Memory traffic: x (and the residual) read once, y (and h) written once; weight and bias come from cache after the
// first row.
#include "cpu/ops.h"
#include "cpu/output.h"
#include "cpu/simd.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>

namespace fastlm_cpu {
namespace {

// x and residual: rows of d elements at their row strides; y and h contiguous. bias may be null, and so may
// residual, h then not written.
template <typename T, typename W>
void norm_rows(const T* x, int64_t x_stride, const T* residual, int64_t res_stride, const W* weight, const W* bias,
               T* y, T* h, int64_t rows, int64_t d, float eps, bool is_rms) {
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrainElems / d), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* hr = x + r * x_stride;
      if (residual) {
        const T* rr = residual + r * res_stride;
        T* out = h + r * d;
        int64_t c = 0;
        for (; c + kW <= d; c += kW) vstore_cvt(out + c, vload_cvt(hr + c) + vload_cvt(rr + c));
        if (c < d) vstore_cvt_n(out + c, vload_cvt_n(hr + c, d - c) + vload_cvt_n(rr + c, d - c), d - c);
        hr = out;
      }
      float mean = 0.0f, var;  // RMSNorm: mean 0, and the mean square as the variance about it
      if (is_rms) {
        var = row_sum(hr, d, 0.0f, [](vfloat acc, vfloat v) { return vfma(v, v, acc); }) / d;
      } else {
        mean = row_sum(hr, d, 0.0f, [](vfloat acc, vfloat v) { return acc + v; }) / d;
        const vfloat m = vset1(mean);
        var = row_sum(hr, d, mean, [m](vfloat acc, vfloat v) { return vfma(v - m, v - m, acc); }) / d;
      }
      // y = ((h - mean) * rstd) * weight + bias: the reference's order of operations, the last two fused (without a
      // bias, + 0 leaves the rounded product)
      const vfloat m = vset1(mean), rstd = vset1(1.0f / std::sqrt(var + eps));
      T* yr = y + r * d;
      int64_t c = 0;
      for (; c + kW <= d; c += kW) {
        const vfloat b = bias ? vload_cvt(bias + c) : vfloat{};
        vstore_cvt(yr + c, vfma((vload_cvt(hr + c) - m) * rstd, vload_cvt(weight + c), b));
      }
      if (c < d) {
        const int64_t n = d - c;
        const vfloat b = bias ? vload_cvt_n(bias + c, n) : vfloat{};
        vstore_cvt_n(yr + c, vfma((vload_cvt_n(hr + c, n) - m) * rstd, vload_cvt_n(weight + c, n), b), n);
      }
    }
  });
}

void check_float(const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), "fastlm::norm_fwd (CPU): ", name, " must be a CPU tensor, got ", t.device());
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, "fastlm::norm_fwd: ", name,
              " must be float32, bfloat16 or float16, got ", dt);
}

// t (..., d) as an (N, d) matrix with a contiguous last dim: a view when the leading dims collapse into one row
// stride (a slice of a wider tensor, say), else a contiguous copy.
at::Tensor as_rows(const at::Tensor& t) {
  int64_t n = 1;
  for (int64_t i = 0; i + 1 < t.dim(); ++i) n *= t.size(i);
  return (t.stride(-1) == 1 ? t : t.contiguous()).reshape({n, t.size(-1)});
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> norm_fwd(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                            const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                            double eps, bool is_rms) {
  TORCH_CHECK(x.dim() >= 1, "fastlm::norm_fwd: x must have at least 1 dim (..., d), got a 0-D tensor");
  check_float("x", x);
  const int64_t d = x.size(-1);
  if (residual.has_value()) {
    check_float("residual", *residual);
    TORCH_CHECK(residual->scalar_type() == x.scalar_type(), "fastlm::norm_fwd: residual must have x's dtype ",
                x.scalar_type(), ", got ", residual->scalar_type());
    TORCH_CHECK(residual->sizes() == x.sizes(), "fastlm::norm_fwd: residual must have x's shape ", x.sizes(),
                ", got ", residual->sizes());
  }
  check_float("weight", weight);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == d, "fastlm::norm_fwd: weight must have shape (", d,
              ",) for x's last dim ", d, ", got ", weight.sizes());
  if (bias.has_value()) {
    check_float("bias", *bias);
    TORCH_CHECK(bias->scalar_type() == weight.scalar_type(), "fastlm::norm_fwd: bias must have weight's dtype ",
                weight.scalar_type(), ", got ", bias->scalar_type());
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == d, "fastlm::norm_fwd: bias must have shape (", d,
                ",) for x's last dim ", d, ", got ", bias->sizes());
  }
  TORCH_CHECK(eps >= 0, "fastlm::norm_fwd: eps must be a non-negative number, got ", eps);

  at::Tensor y = empty_output(x.sizes(), x.options());
  at::Tensor h = residual.has_value() ? empty_output(x.sizes(), x.options()) : at::empty({0}, x.options());
  if (y.numel() == 0) return {y, h};
  const at::Tensor x2 = as_rows(x);
  const at::Tensor r2 = residual.has_value() ? as_rows(*residual) : at::Tensor();
  const at::Tensor w = weight.contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  with_float_type(x.scalar_type(), [&](auto x_tag) {
    using T = decltype(x_tag);
    with_float_type(w.scalar_type(), [&](auto w_tag) {
      using W = decltype(w_tag);
      norm_rows<T, W>(x2.const_data_ptr<T>(), x2.stride(0), r2.defined() ? r2.const_data_ptr<T>() : nullptr,
                      r2.defined() ? r2.stride(0) : 0, w.const_data_ptr<W>(),
                      b.defined() ? b.const_data_ptr<W>() : nullptr, y.data_ptr<T>(),
                      h.numel() ? h.data_ptr<T>() : nullptr, x2.size(0), d, static_cast<float>(eps), is_rms);
    });
  });
  return {y, h};
}

}  // namespace fastlm_cpu
