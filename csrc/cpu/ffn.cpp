// The transformer MLPs on the CPU, fused over token blocks:
//
//     mlp_gelu:   y = gelu_tanh(x W_fc^T + b_fc) W_proj^T + b_proj (+ residual)
//     mlp_swiglu: y = (silu(x W_gate^T) * (x W_up^T)) W_down^T (+ residual)
//
// Algorithm: tokens are processed in blocks whose intermediate activation (block x I) stays in the last-level cache
// (kBlockBytes; blocks are not made smaller than kMinBlockTokens, where the GEMMs start losing efficiency). Per
// block the first GEMM(s) write the pre-activation into a per-thread buffer, the activation is applied in place
// (vectorized, fp32 arithmetic), and the second GEMM reads it back from cache and writes the output rows, with the
// bias and residual folded into its accumulator. The GEMMs are ATen's (MKL / oneDNN). With at least one block per
// thread the blocks run in parallel, each on single-threaded GEMMs (small GEMMs split across threads waste most of
// their time synchronizing); otherwise one block with multithreaded GEMMs.
//
// bf16 / fp16 inputs on CPUs without native half-precision products run the block path in fp32 (half_gemm.h): the
// operands are widened once per call and the output rounded once.
//
// Up to kGemvMaxRows tokens (decoding) the GEMMs are matrix-vector products bound by reading the weights: those go
// through gemv.h instead (each weight byte read once at the memory's rate, the threads splitting the output rows),
// with the activation applied in fp32 to each thread's slice of the intermediate as soon as it is computed.
//
// Memory traffic: x, the weights (once per block, from L3 when they fit) and out; the N x I intermediate of the
// unfused form never goes to memory.
#include "cpu/gemv.h"
#include "cpu/half_gemm.h"
#include "cpu/ops.h"
#include "cpu/simd.h"

#include <ATen/Parallel.h>
#include <ATen/ops/add.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <type_traits>
#include <vector>

namespace fastlm_cpu {
namespace {

// Intermediate activation per block: a share of L3. While the whole intermediate fits in L3, one multithreaded GEMM
// over all tokens beats L2-sized blocks of single-threaded GEMMs (bench/dev/cpu_notes.md).
constexpr int64_t kBlockBytes = 8 * 1024 * 1024;
constexpr int64_t kMinBlockTokens = 64;      // below this the GEMMs lose efficiency

enum class Act { kGelu, kSwiGLU };

// gelu_tanh(x) = 0.5 x (1 + tanh(u)) = x / (1 + e^(-2u)),  u = sqrt(2/pi) (x + 0.044715 x^3)
inline vfloat gelu(vfloat x) {
  const vfloat u = vset1(0.7978845608028654f) * vfma(vset1(0.044715f) * x, x * x, x);
  return x / (vset1(1.0f) + vexp2(vset1(-2.0f * kLog2e) * u));
}

// silu(g) * u = g u / (1 + e^(-g))
inline vfloat swiglu(vfloat g, vfloat u) { return g * u / (vset1(1.0f) + vexp2(vset1(-kLog2e) * g)); }

// h <- act(h) (gelu) or h <- silu(h) * u (swiglu), rows x cols, row-major contiguous.
template <typename T>
void activation(Act act, T* h, const T* u, int64_t rows, int64_t cols) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1)), [&](int64_t begin, int64_t end) {
    float tmp[kW];
    for (int64_t r = begin; r < end; ++r) {
      T* hr = h + r * cols;
      const T* ur = u ? u + r * cols : nullptr;
      int64_t c = 0;
      for (; c + kW <= cols; c += kW) {
        const vfloat x = vload_cvt(hr + c);
        const vfloat y = act == Act::kGelu ? gelu(x) : swiglu(x, vload_cvt(ur + c));
        if constexpr (std::is_same_v<T, float>) {
          vstore(hr + c, y);
        } else {
          vstore(tmp, y);
          for (int i = 0; i < kW; ++i) hr[c + i] = from_float<T>(tmp[i]);
        }
      }
      if (c < cols) {  // tail: go through a padded buffer
        float xs[kW] = {}, us[kW] = {};
        for (int64_t i = c; i < cols; ++i) xs[i - c] = to_float(hr[i]), us[i - c] = ur ? to_float(ur[i]) : 0.0f;
        const vfloat y = act == Act::kGelu ? gelu(vload(xs)) : swiglu(vload(xs), vload(us));
        vstore(tmp, y);
        for (int64_t i = c; i < cols; ++i) hr[i] = from_float<T>(tmp[i - c]);
      }
    }
  });
}

void apply_activation(Act act, at::Tensor& h, const at::Tensor* u) {
  const int64_t rows = h.size(0), cols = h.size(1);
  with_float_type(h.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    activation<T>(act, h.data_ptr<T>(), u ? u->const_data_ptr<T>() : nullptr, rows, cols);
  });
}

void check_tensor(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu(), "fastlm::", op, " (CPU): ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "fastlm::", op, ": ", name, " must have x's dtype ",
              x.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dim, "fastlm::", op, ": ", name, " must be ", dim, "-D, got shape ", t.sizes());
}

void check_x(const char* op, const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), "fastlm::", op, " (CPU): x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() >= 1, "fastlm::", op, ": x must have at least 1 dim (..., d), got a 0-D tensor");
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, "fastlm::", op,
              ": dtype must be float32, bfloat16 or float16, got ", dt);
}

// Tokens of x (..., d): the product of the leading dims (reshape(-1, d) is ambiguous when d == 0).
int64_t token_count(const at::Tensor& x) {
  int64_t n = 1;
  for (int64_t i = 0; i + 1 < x.dim(); ++i) n *= x.size(i);
  return n;
}

// Checks the residual against the output shape and returns it as (N, d_out), or an undefined tensor.
at::Tensor residual_rows(const char* op, const std::optional<at::Tensor>& residual, const at::Tensor& x,
                         int64_t d_out) {
  if (!residual.has_value()) return {};
  const at::Tensor& r = *residual;
  check_tensor(op, "residual", r, x, x.dim());
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = d_out;
  TORCH_CHECK(r.sizes() == at::IntArrayRef(shape), "fastlm::", op, ": residual must have the output's shape ",
              at::IntArrayRef(shape), ", got ", r.sizes());
  return r.reshape({token_count(x), d_out});
}

int64_t block_tokens(int64_t n_tokens, int64_t inter, int64_t n_buffers, int64_t elem_size) {
  const int64_t t = kBlockBytes / std::max<int64_t>(1, inter * n_buffers * elem_size);
  return std::max<int64_t>(1, std::min(n_tokens, std::max(kMinBlockTokens, t)));
}

// Runs block(t0, rows, buffers) over the token blocks of size tb; buffers: n_buffers (tb, inter) tensors per thread.
template <typename F>
void for_blocks(int64_t n, int64_t tb, int64_t inter, int64_t n_buffers, const at::TensorOptions& opt, F&& block) {
  const int64_t n_blocks = (n + tb - 1) / tb;
  auto run = [&](int64_t begin, int64_t end) {
    // Worker threads do not inherit the caller's dispatch state: without this guard the ATen GEMMs below would go
    // through autograd (and reject their out= arguments) whenever an input requires grad.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    std::vector<at::Tensor> bufs;
    for (int64_t i = 0; i < n_buffers; ++i) bufs.push_back(at::empty({tb, inter}, opt));
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t t0 = blk * tb;
      block(t0, std::min(tb, n - t0), bufs);
    }
  };
  if (n_blocks >= at::get_num_threads() && n_blocks > 1)
    at::parallel_for(0, n_blocks, 1, run);  // the GEMMs inside run single-threaded
  else
    run(0, n_blocks);
}

// The second GEMM of a block: out = h W^T (+ bias) (+ residual).
void down_block(at::Tensor& out, const at::Tensor& h, const at::Tensor& w_t, const std::optional<at::Tensor>& bias,
                const at::Tensor& res) {
  if (res.defined()) {
    if (bias.has_value())
      at::add_out(out, res, *bias);
    else
      out.copy_(res);
    out.addmm_(h, w_t);
  } else if (bias.has_value()) {
    at::addmm_out(out, *bias, h, w_t);
  } else {
    at::mm_out(out, h, w_t);
  }
}

at::Tensor f32(const at::Tensor& t) { return t.to(at::kFloat); }

std::optional<at::Tensor> f32(const std::optional<at::Tensor>& t) {
  return t.has_value() ? std::optional<at::Tensor>(f32(*t)) : std::nullopt;
}

// The block path of a bf16 / fp16 call runs in fp32 where the CPU has no half-precision GEMM.
bool widen_for_gemm(const at::Tensor& x, int64_t n_tokens) {
  return n_tokens > kGemvMaxRows && x.scalar_type() != at::kFloat && !native_half_gemm(x.scalar_type());
}

bool rows_contiguous(std::initializer_list<const at::Tensor*> ws) {
  return std::all_of(ws.begin(), ws.end(), [](const at::Tensor* w) { return w->stride(1) == 1 || w->size(1) <= 1; });
}

// The decode-sized MLP (n <= kGemvMaxRows tokens): out = act(x W1^T + b1 [, x W_up^T]) W2^T + b2 + res, every
// product a matrix-vector product over the weight rows (gemv.h), the intermediate in fp32.
void small_mlp(Act act, const at::Tensor& x2, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
               const at::Tensor* w_up, const at::Tensor& w2, const std::optional<at::Tensor>& b2, const at::Tensor& res,
               at::Tensor& out) {
  const int64_t n = x2.size(0), d = x2.size(1), inter = w1.size(0), d_out = w2.size(0);
  const auto fp32 = x2.options().dtype(at::kFloat);
  const at::Tensor xf = x2.to(at::kFloat).contiguous();
  const at::Tensor b1f = b1.has_value() ? b1->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor h = at::empty({n, inter}, fp32), u = w_up ? at::empty({n, inter}, fp32) : at::Tensor();
  at::Tensor y = out.scalar_type() == at::kFloat ? out : at::empty({n, d_out}, fp32);
  float *hp = h.data_ptr<float>(), *up = w_up ? u.data_ptr<float>() : nullptr, *yp = y.data_ptr<float>();
  auto run = [&](auto tag) {
    using W = decltype(tag);
    for_row_ranges(inter, d, [&](int64_t n0, int64_t n1) {
      gemv_rows(xf.const_data_ptr<float>(), n, d, w1.const_data_ptr<W>(), w1.stride(0), n0, n1, hp, inter);
      if (w_up)
        gemv_rows(xf.const_data_ptr<float>(), n, d, w_up->const_data_ptr<W>(), w_up->stride(0), n0, n1, up, inter);
      for (int64_t t = 0; t < n; ++t) {
        float* ht = hp + t * inter;
        if (b1f.defined())
          for (int64_t c = n0; c < n1; ++c) ht[c] += b1f.const_data_ptr<float>()[c];
        activation<float>(act, ht + n0, w_up ? up + t * inter + n0 : nullptr, 1, n1 - n0);
      }
    });
    for_row_ranges(d_out, inter, [&](int64_t n0, int64_t n1) {
      gemv_rows(hp, n, inter, w2.const_data_ptr<W>(), w2.stride(0), n0, n1, yp, d_out);
    });
  };
  with_float_type(x2.scalar_type(), run);
  if (b2.has_value()) y.add_(*b2);
  if (res.defined()) y.add_(res);
  if (!y.is_same(out)) out.copy_(y);
}

}  // namespace

at::Tensor mlp_gelu(const at::Tensor& x, const at::Tensor& w_fc, const std::optional<at::Tensor>& b_fc,
                    const at::Tensor& w_proj, const std::optional<at::Tensor>& b_proj,
                    const std::optional<at::Tensor>& residual) {
  const char* op = "mlp_gelu";
  check_x(op, x);
  check_tensor(op, "w_fc", w_fc, x, 2);
  check_tensor(op, "w_proj", w_proj, x, 2);
  const int64_t d = x.size(-1), inter = w_fc.size(0), d_out = w_proj.size(0);
  TORCH_CHECK(w_fc.size(1) == d, "fastlm::mlp_gelu: w_fc must be (intermediate, d) = (", inter, ", ", d,
              ") for x's last dim ", d, ", got ", w_fc.sizes());
  TORCH_CHECK(w_proj.size(1) == inter, "fastlm::mlp_gelu: w_proj must be (d_out, intermediate) with intermediate = ",
              inter, " (w_fc's rows), got ", w_proj.sizes());
  if (b_fc.has_value()) {
    check_tensor(op, "b_fc", *b_fc, x, 1);
    TORCH_CHECK(b_fc->size(0) == inter, "fastlm::mlp_gelu: b_fc must have shape (", inter, ",), got ",
                b_fc->sizes());
  }
  if (b_proj.has_value()) {
    check_tensor(op, "b_proj", *b_proj, x, 1);
    TORCH_CHECK(b_proj->size(0) == d_out, "fastlm::mlp_gelu: b_proj must have shape (", d_out, ",), got ",
                b_proj->sizes());
  }
  const at::Tensor res = residual_rows(op, residual, x, d_out);
  if (widen_for_gemm(x, token_count(x)))
    return mlp_gelu(f32(x), f32(w_fc), f32(b_fc), f32(w_proj), f32(b_proj), f32(residual)).to(x.scalar_type());
  const at::Tensor x2 = x.reshape({token_count(x), d});
  const int64_t n = x2.size(0);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = d_out;
  at::Tensor out = at::empty({n, d_out}, x.options());
  if (n > 0 && d_out > 0 && n <= kGemvMaxRows && rows_contiguous({&w_fc, &w_proj})) {
    small_mlp(Act::kGelu, x2, w_fc, b_fc, nullptr, w_proj, b_proj, res, out);
  } else if (n > 0 && d_out > 0) {
    const at::Tensor w_fc_t = w_fc.t(), w_proj_t = w_proj.t();
    const int64_t tb = block_tokens(n, inter, 1, x.element_size());
    for_blocks(n, tb, inter, 1, x.options(), [&](int64_t t0, int64_t rows, std::vector<at::Tensor>& bufs) {
      const at::Tensor xb = x2.narrow(0, t0, rows);
      at::Tensor h = bufs[0].narrow(0, 0, rows);
      if (b_fc.has_value())
        at::addmm_out(h, *b_fc, xb, w_fc_t);
      else
        at::mm_out(h, xb, w_fc_t);
      apply_activation(Act::kGelu, h, nullptr);
      at::Tensor ob = out.narrow(0, t0, rows);
      down_block(ob, h, w_proj_t, b_proj, res.defined() ? res.narrow(0, t0, rows) : res);
    });
  }
  return out.view(out_shape);
}

at::Tensor mlp_swiglu(const at::Tensor& x, const at::Tensor& w_gate, const at::Tensor& w_up,
                      const at::Tensor& w_down, const std::optional<at::Tensor>& residual) {
  const char* op = "mlp_swiglu";
  check_x(op, x);
  check_tensor(op, "w_gate", w_gate, x, 2);
  check_tensor(op, "w_up", w_up, x, 2);
  check_tensor(op, "w_down", w_down, x, 2);
  const int64_t d = x.size(-1), inter = w_gate.size(0), d_out = w_down.size(0);
  TORCH_CHECK(w_gate.size(1) == d, "fastlm::mlp_swiglu: w_gate must be (intermediate, d) with d = ", d,
              " (x's last dim), got ", w_gate.sizes());
  TORCH_CHECK(w_up.sizes() == w_gate.sizes(), "fastlm::mlp_swiglu: w_up must have w_gate's shape ", w_gate.sizes(),
              ", got ", w_up.sizes());
  TORCH_CHECK(w_down.size(1) == inter, "fastlm::mlp_swiglu: w_down must be (d_out, intermediate) with intermediate = ",
              inter, " (w_gate's rows), got ", w_down.sizes());
  const at::Tensor res = residual_rows(op, residual, x, d_out);
  if (widen_for_gemm(x, token_count(x)))
    return mlp_swiglu(f32(x), f32(w_gate), f32(w_up), f32(w_down), f32(residual)).to(x.scalar_type());
  const at::Tensor x2 = x.reshape({token_count(x), d});
  const int64_t n = x2.size(0);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = d_out;
  at::Tensor out = at::empty({n, d_out}, x.options());
  if (n > 0 && d_out > 0 && n <= kGemvMaxRows && rows_contiguous({&w_gate, &w_up, &w_down})) {
    small_mlp(Act::kSwiGLU, x2, w_gate, std::nullopt, &w_up, w_down, std::nullopt, res, out);
  } else if (n > 0 && d_out > 0) {
    const at::Tensor w_gate_t = w_gate.t(), w_up_t = w_up.t(), w_down_t = w_down.t();
    const int64_t tb = block_tokens(n, inter, 2, x.element_size());
    for_blocks(n, tb, inter, 2, x.options(), [&](int64_t t0, int64_t rows, std::vector<at::Tensor>& bufs) {
      const at::Tensor xb = x2.narrow(0, t0, rows);
      at::Tensor g = bufs[0].narrow(0, 0, rows), u = bufs[1].narrow(0, 0, rows);
      at::mm_out(g, xb, w_gate_t);
      at::mm_out(u, xb, w_up_t);
      apply_activation(Act::kSwiGLU, g, &u);
      at::Tensor ob = out.narrow(0, t0, rows);
      down_block(ob, g, w_down_t, std::nullopt, res.defined() ? res.narrow(0, t0, rows) : res);
    });
  }
  return out.view(out_shape);
}

}  // namespace fastlm_cpu
