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
//
// Backward (norm_bwd), from the saved h (x without a residual), with n = (h - mean(h)) * rstd the normalized row and
// g = dy * weight, in fp32:
//     dh_total = rstd (g - n mean(g n) - mean(g)) + dh         (no mean(g) for RMSNorm; dh: the gradient of h itself)
//     dweight  = sum over rows of dy n,   dbias = sum over rows of dy
// One pass over the rows in blocks of whole rows: per row the statistics again (the forward's formulas), then the two
// row means, then dx, each row from L1; per block partial dweight / dbias in fp32, then summed over the blocks (the
// blocks depend on the shape only, not on the thread count).
// Memory traffic: h, dy (and dh) read once, dx written once; partial sums of at most kMaxBlocks x d floats.
#include "cpu/ops.h"
#include "cpu/output.h"
#include "cpu/simd.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <utility>

namespace fastlm_cpu {
namespace {

// mean(h) and rstd = 1 / sqrt(var + eps) of a row; RMSNorm: mean 0, and the mean square as the variance about it
template <typename T>
inline std::pair<float, float> row_stats(const T* h, int64_t d, float eps, bool is_rms) {
  float mean = 0.0f, var;
  if (is_rms) {
    var = row_sum(h, d, 0.0f, [](vfloat acc, vfloat v) { return vfma(v, v, acc); }) / d;
  } else {
    mean = row_sum(h, d, 0.0f, [](vfloat acc, vfloat v) { return acc + v; }) / d;
    const vfloat m = vset1(mean);
    var = row_sum(h, d, mean, [m](vfloat acc, vfloat v) { return vfma(v - m, v - m, acc); }) / d;
  }
  return {mean, 1.0f / std::sqrt(var + eps)};
}

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
      const auto [mean, rstd_s] = row_stats(hr, d, eps, is_rms);
      // y = ((h - mean) * rstd) * weight + bias: the reference's order of operations, the last two fused (without a
      // bias, + 0 leaves the rounded product)
      const vfloat m = vset1(mean), rstd = vset1(rstd_s);
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

constexpr int64_t kMaxBlocks = 256;  // row blocks of the backward, each with its partial dweight / dbias

// dy, h, dh (may be null): rows of d elements at their row strides; dx contiguous; pw, pb (pb may be null): the
// partial sums, n_blocks x d floats.
template <typename T, typename W>
void norm_bwd_rows(const T* dy, int64_t dy_stride, const T* h, int64_t h_stride, const T* dh, int64_t dh_stride,
                   const W* weight, T* dx, float* pw, float* pb, int64_t rows, int64_t d, int64_t block, float eps,
                   bool is_rms) {
  const int64_t n_blocks = (rows + block - 1) / block;
  at::parallel_for(0, n_blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      float* dw = pw + blk * d;
      float* db = pb ? pb + blk * d : nullptr;
      std::fill(dw, dw + d, 0.0f);
      if (db) std::fill(db, db + d, 0.0f);
      for (int64_t r = blk * block; r < std::min(rows, (blk + 1) * block); ++r) {
        const T* hr = h + r * h_stride;
        const T* gr = dy + r * dy_stride;
        const auto [mean, rstd_s] = row_stats(hr, d, eps, is_rms);
        const vfloat m = vset1(mean), rstd = vset1(rstd_s);
        // the row's means of g n and g (tail lanes load 0: their g is 0)
        vfloat sgn{}, sg{};
        for (int64_t c = 0; c < d; c += kW) {
          const int64_t k = std::min<int64_t>(kW, d - c);
          const vfloat n = (vload_cvt_n(hr + c, k) - m) * rstd, g = vload_cvt_n(gr + c, k) * vload_cvt_n(weight + c, k);
          sgn = vfma(g, n, sgn), sg = sg + g;
        }
        const vfloat c1 = vset1(hsum(sgn) / d), c2 = vset1(is_rms ? 0.0f : hsum(sg) / d);
        T* out = dx + r * d;
        const T* dhr = dh ? dh + r * dh_stride : nullptr;
        for (int64_t c = 0; c < d; c += kW) {
          const int64_t k = std::min<int64_t>(kW, d - c);
          const vfloat n = (vload_cvt_n(hr + c, k) - m) * rstd, y = vload_cvt_n(gr + c, k);
          const vfloat g = y * vload_cvt_n(weight + c, k);
          vfloat v = (g - n * c1 - c2) * rstd;
          if (dhr) v = v + vload_cvt_n(dhr + c, k);
          vstore_cvt_n(out + c, v, k);
          vstore_cvt_n(dw + c, vfma(y, n, vload_cvt_n(dw + c, k)), k);
          if (db) vstore_cvt_n(db + c, vload_cvt_n(db + c, k) + y, k);
        }
      }
    }
  });
}

void check_float(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), "fastlm::", op, " (CPU): ", name, " must be a CPU tensor, got ", t.device());
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, "fastlm::", op, ": ", name,
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
  check_float("norm_fwd", "x", x);
  const int64_t d = x.size(-1);
  if (residual.has_value()) {
    check_float("norm_fwd", "residual", *residual);
    TORCH_CHECK(residual->scalar_type() == x.scalar_type(), "fastlm::norm_fwd: residual must have x's dtype ",
                x.scalar_type(), ", got ", residual->scalar_type());
    TORCH_CHECK(residual->sizes() == x.sizes(), "fastlm::norm_fwd: residual must have x's shape ", x.sizes(),
                ", got ", residual->sizes());
  }
  check_float("norm_fwd", "weight", weight);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == d, "fastlm::norm_fwd: weight must have shape (", d,
              ",) for x's last dim ", d, ", got ", weight.sizes());
  if (bias.has_value()) {
    check_float("norm_fwd", "bias", *bias);
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_bwd(const at::Tensor& dy, const at::Tensor& h,
                                                         const at::Tensor& weight, const std::optional<at::Tensor>& dh,
                                                         double eps, bool is_rms, bool has_bias) {
  const char* op = "norm_bwd";
  TORCH_CHECK(h.dim() >= 1, "fastlm::norm_bwd: h must have at least 1 dim (..., d), got a 0-D tensor");
  check_float(op, "h", h);
  for (const at::Tensor* t : {&dy, dh.has_value() ? &*dh : nullptr}) {
    if (!t) continue;
    const char* name = t == &dy ? "dy" : "dh";
    check_float(op, name, *t);
    TORCH_CHECK(t->scalar_type() == h.scalar_type() && t->sizes() == h.sizes(), "fastlm::norm_bwd: ", name,
                " must have h's dtype ", h.scalar_type(), " and shape ", h.sizes(), ", got ", t->scalar_type(), " ",
                t->sizes());
  }
  check_float(op, "weight", weight);
  const int64_t d = h.size(-1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == d, "fastlm::norm_bwd: weight must have shape (", d,
              ",) for h's last dim ", d, ", got ", weight.sizes());
  TORCH_CHECK(eps >= 0, "fastlm::norm_bwd: eps must be a non-negative number, got ", eps);

  at::Tensor dx = empty_output(h.sizes(), h.options());
  const at::Tensor h2 = as_rows(h), dy2 = as_rows(dy), dh2 = dh.has_value() ? as_rows(*dh) : at::Tensor();
  const int64_t rows = h2.size(0);
  // blocks of whole rows, at least kGrainElems elements each where there are enough rows, at most kMaxBlocks
  const int64_t block =
      std::max((rows + kMaxBlocks - 1) / kMaxBlocks, std::max<int64_t>(1, kGrainElems / std::max<int64_t>(d, 1)));
  const int64_t n_blocks = rows == 0 || d == 0 ? 0 : (rows + block - 1) / block;
  at::Tensor partial = at::empty({has_bias ? 2 : 1, n_blocks, d}, h.options().dtype(at::kFloat));
  float* pw = partial.data_ptr<float>();
  float* pb = has_bias ? pw + n_blocks * d : nullptr;
  const at::Tensor w = weight.contiguous();
  if (n_blocks > 0) {
    with_float_type(h.scalar_type(), [&](auto x_tag) {
      using T = decltype(x_tag);
      with_float_type(w.scalar_type(), [&](auto w_tag) {
        using W = decltype(w_tag);
        norm_bwd_rows<T, W>(dy2.const_data_ptr<T>(), dy2.stride(0), h2.const_data_ptr<T>(), h2.stride(0),
                            dh2.defined() ? dh2.const_data_ptr<T>() : nullptr, dh2.defined() ? dh2.stride(0) : 0,
                            w.const_data_ptr<W>(), dx.data_ptr<T>(), pw, pb, rows, d, block,
                            static_cast<float>(eps), is_rms);
      });
    });
  }
  // dweight, dbias: the sums of the blocks' partial sums, rounded once to weight's dtype
  auto total = [&](int64_t i) { return partial[i].sum(0).to(weight.scalar_type()); };  // (new tensors: no aliases)
  return {dx, total(0), has_bias ? total(1) : at::empty({0}, weight.options())};
}

}  // namespace fastlm_cpu
