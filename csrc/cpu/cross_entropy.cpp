// Cross-entropy over the rows of (N, V) logits on the CPU, and its gradient:
//
//     lse_i = log sum_j exp(x_ij)        loss_i = lse_i - x_i,t_i        (0 where t_i == ignore_index)
//     dx_ij = (exp(x_ij - lse_i) - [j == t_i]) * g_i                    (0 in ignored rows)
//
// Algorithm: rows in parallel, each by one thread in fp32 vectors (bf16/fp16 widened as loaded). Per row a max pass m,
// then s = sum 2^((x - m) log2(e)) (the difference first: it is exact near the max, where a scaled x minus a scaled
// m would leave the rounding error of m log2(e), huge for large logits), in blocks of kSumBlock elements whose
// partial sums are added to a running total, so no summation chain is longer than a few dozen terms;
// lse = m + log(s) and loss = (m - x_t) + log(s). Then, for a gradient, a pass that writes
// (2^((x - lse) log2(e)) - onehot) * g rounded once to the gradient's dtype, possibly over the logits themselves
// (the fused linear + cross-entropy's scratch chunk). NaN logits give NaN losses. A row of a 32k-50k vocabulary
// (128-200 KB fp32) stays in L2 between its passes.
//
// Memory traffic: forward reads the logits once from memory; the backward (lse given) reads them once and writes
// the gradient once (a row whose |lse| >= 16 is read twice more, from cache); the fused call reads once and writes
// once. Per row 8 bytes of loss and lse.
#include "cpu/layout.h"
#include "cpu/ops.h"
#include "cpu/output.h"
#include "cpu/simd.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <utility>

namespace fastlm_cpu {
namespace {

constexpr int64_t kSumBlock = 1024;     // elements per partial sum of the exponentials

template <typename T>
float row_max(const T* x, int64_t V) {
  vfloat acc[4] = {vset1(kNegInf), vset1(kNegInf), vset1(kNegInf), vset1(kNegInf)};
  row_fold(x, V, kNegInf, acc, [](vfloat a, vfloat v) { return vmax_nan(a, v); });
  const vfloat m = vmax_nan(vmax_nan(acc[0], acc[1]), vmax_nan(acc[2], acc[3]));
  for (int i = 0; i < kW; ++i)
    if (m[i] != m[i]) return m[i];  // a NaN logit: NaN max, lse and loss
  return hmax(m);
}

// The row's max m and log sum_j exp(x_j - m) (lse = m + that); m not finite (an inf or a NaN max, or an all -inf
// row): that m and a log-sum of 0, so lse and the loss come out inf or NaN as torch's do.
template <typename T>
std::pair<float, float> row_logsum(const T* x, int64_t V) {
  const float m = row_max(x, V);
  if (!std::isfinite(m)) return {m, 0.0f};
  const vfloat c = vset1(kLog2e), vm = vset1(m);
  vfloat total{};
  for (int64_t c0 = 0; c0 < V; c0 += kSumBlock) {
    vfloat acc[4] = {};
    row_fold(x + c0, std::min(kSumBlock, V - c0), kNegInf, acc,
             [&](vfloat a, vfloat v) { return a + vexp2((v - vm) * c); });
    total += (acc[0] + acc[1]) + (acc[2] + acc[3]);
  }
  return {m, std::log(hsum(total))};
}

// g[j] = (exp((x_j - m) - log_s) - [j == t]) * scale, rounded to G, with lse = m + log_s; g may alias x. t is a valid
// class index. Given m and log_s apart, the exponent is exact but for log_s's rounding, as in torch's softmax; from a
// stored lse (m = lse, log_s = 0) it carries lse's rounding, half an ulp of |lse|.
template <typename T, typename G>
void row_grad(const T* x, int64_t V, float m, float log_s, int64_t t, float scale, G* g) {
  const vfloat c = vset1(kLog2e), vm = vset1(m), vl = vset1(log_s), s = vset1(scale);
  const float xt = to_float(x[t]);  // read before an in-place pass overwrites it
  int64_t j = 0;
  for (; j + kW <= V; j += kW) vstore_cvt(g + j, vexp2(((vload_cvt(x + j) - vm) - vl) * c) * s);
  if (j < V) vstore_cvt_n(g + j, vexp2(((vload_cvt_n(x + j, V - j) - vm) - vl) * c) * s, V - j);
  const float pt = vexp2(((vset1(xt) - vm) - vl) * c)[0];
  g[t] = from_float<G>((pt - 1.0f) * scale);
}

// From a stored lse of at least this size the backward recomputes the row's max and log-sum (one more pass over the
// row, from cache): lse's rounding, up to |lse| 2^-25, would move every probability by as much, more than fp32
// torch's softmax errs (about 1e-7) from |lse| ~ 16 on.
constexpr float kRecomputeLse = 16.0f;

template <typename G>
void zero_row(G* g, int64_t V) {
  std::fill(g, g + V, from_float<G>(0.0f));
}

// Checks logits (N, V) and targets (N,) for `op` and returns the targets as int64 (every one in [0, V) or equal to
// ignore_index).
std::vector<int64_t> checked_targets(const char* op, const at::Tensor& logits, const at::Tensor& targets,
                                     int64_t ignore_index) {
  TORCH_CHECK(logits.dim() == 2, "fastlm::", op, ": logits must be 2-D (tokens, vocab), got shape ", logits.sizes());
  TORCH_CHECK(logits.device().is_cpu(), "fastlm::", op, " (CPU): logits must be a CPU tensor, got ",
              logits.device());
  const auto dtype = logits.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, "fastlm::", op,
              ": logits must be float32, bfloat16 or float16, got ", dtype);
  const int64_t N = logits.size(0), V = logits.size(1);
  TORCH_CHECK(V >= 1, "fastlm::", op, ": the vocabulary (logits' last dim) must be >= 1, got ", V);
  TORCH_CHECK(V == 1 || N == 0 || logits.stride(1) == 1, "fastlm::", op,
              ": logits must have a contiguous last dim (stride 1), got strides ", logits.strides());
  TORCH_CHECK(targets.device().is_cpu() && targets.dim() == 1 && targets.size(0) == N &&
                  (targets.scalar_type() == at::kLong || targets.scalar_type() == at::kInt),
              "fastlm::", op, ": targets must be a CPU int64 or int32 tensor of shape (", N, ",), got a ",
              targets.scalar_type(), " tensor of shape ", targets.sizes(), " on ", targets.device());
  const at::Tensor t64 = targets.to(at::kLong).contiguous();
  std::vector<int64_t> t(t64.const_data_ptr<int64_t>(), t64.const_data_ptr<int64_t>() + N);
  for (int64_t i = 0; i < N; ++i)
    TORCH_CHECK(t[i] == ignore_index || (t[i] >= 0 && t[i] < V), "fastlm::", op, ": targets must be in [0, ", V,
                ") or equal ignore_index (", ignore_index, "), got ", t[i], " at row ", i);
  return t;
}

at::Tensor checked_rows(const char* op, const char* name, const at::Tensor& v, int64_t N) {
  TORCH_CHECK(v.device().is_cpu() && v.dim() == 1 && v.size(0) == N && at::isFloatingType(v.scalar_type()),
              "fastlm::", op, ": ", name, " must be a floating-point CPU tensor of shape (", N, ",), got a ",
              v.scalar_type(), " tensor of shape ", v.sizes(), " on ", v.device());
  return v.to(at::kFloat).contiguous();
}

// The rows' loss and lse, and with grad (a tensor of logits' shape, possibly logits itself) the gradient scaled by
// scale[i] (all ones when null).
void run_rows(const at::Tensor& logits, const std::vector<int64_t>& t, int64_t ignore_index, const float* lse_in,
              float* loss, float* lse, at::Tensor* grad, const float* scale) {
  const int64_t N = logits.size(0), V = logits.size(1), ld = logits.stride(0);
  with_float_type(logits.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* x = logits.const_data_ptr<T>();
    T* g = grad ? grad->data_ptr<T>() : nullptr;
    const int64_t ldg = grad ? grad->stride(0) : 0;
    at::parallel_for(0, N, std::max<int64_t>(1, kGrainElems / V), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const T* row = x + i * ld;
        const bool valid = t[i] != ignore_index;
        float m = 0.0f, log_s = 0.0f;
        if (lse_in && !(std::abs(lse_in[i]) >= kRecomputeLse && g && valid)) {
          m = lse_in[i];
        } else {
          std::tie(m, log_s) = row_logsum(row, V);
        }
        if (!lse_in) {
          loss[i] = valid ? (m - to_float(row[t[i]])) + log_s : 0.0f;
          lse[i] = m + log_s;
        }
        if (g) {
          if (valid)
            row_grad(row, V, m, log_s, t[i], scale ? scale[i] : 1.0f, g + i * ldg);
          else
            zero_row(g + i * ldg, V);
        }
      }
    });
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd(const at::Tensor& logits, const at::Tensor& targets,
                                                     int64_t ignore_index) {
  const auto t = checked_targets("cross_entropy_fwd", logits, targets, ignore_index);
  const auto opts = logits.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({logits.size(0)}, opts), lse = at::empty({logits.size(0)}, opts);
  run_rows(logits, t, ignore_index, nullptr, loss.data_ptr<float>(), lse.data_ptr<float>(), nullptr, nullptr);
  return {loss, lse};
}

at::Tensor cross_entropy_bwd(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& targets,
                             const at::Tensor& lse, int64_t ignore_index) {
  const char* op = "cross_entropy_bwd";
  const auto t = checked_targets(op, logits, targets, ignore_index);
  const at::Tensor g = checked_rows(op, "grad_loss", grad_loss, logits.size(0));
  const at::Tensor l = checked_rows(op, "lse", lse, logits.size(0));
  at::Tensor grad = empty_output(logits.sizes(), logits.options());
  run_rows(logits, t, ignore_index, l.const_data_ptr<float>(), nullptr, nullptr, &grad, g.const_data_ptr<float>());
  return grad;
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_fused_(at::Tensor& logits, const at::Tensor& targets,
                                                        int64_t ignore_index,
                                                        const std::optional<at::Tensor>& grad_scale) {
  const char* op = "cross_entropy_fused_";
  const auto t = checked_targets(op, logits, targets, ignore_index);
  TORCH_CHECK(non_overlapping(logits), "fastlm::", op,
              ": logits are overwritten with the gradient, so their elements must not overlap (e.g. an expanded or "
              "unfolded tensor), got strides ", logits.strides());
  at::Tensor s;
  if (grad_scale.has_value()) s = checked_rows(op, "grad_scale", *grad_scale, logits.size(0));
  const auto opts = logits.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({logits.size(0)}, opts), lse = at::empty({logits.size(0)}, opts);
  run_rows(logits, t, ignore_index, nullptr, loss.data_ptr<float>(), lse.data_ptr<float>(), &logits,
           s.defined() ? s.const_data_ptr<float>() : nullptr);
  return {loss, lse};
}

}  // namespace fastlm_cpu
