// The transformer MLPs on the CPU, fused over token blocks:
//
//     mlp_gelu:   y = gelu_tanh(x W_fc^T + b_fc) W_proj^T + b_proj (+ residual)
//     mlp_swiglu: y = (silu(x W_gate^T) * (x W_up^T)) W_down^T (+ residual)
//
// Algorithm: tokens are processed in blocks whose fp32 intermediate activation (block x I) stays in the last-level
// cache (kBlockBytes). Per block, the first product runs on the packed GEMM of gemm.h (all threads, split by output
// panels) and its epilogue adds b_fc and applies the GELU; for SwiGLU the gate and up products run as one pass
// (gemm_nt2: both products of a column panel side by side in the tile) whose epilogue computes silu(gate) * up, so
// neither product exists as a tensor. The second product reads the
// intermediate back from cache and its epilogue adds the bias and the residual and rounds once to x's dtype. bf16 /
// fp16 weights are widened to fp32 as gemm.h packs them; x once per call; all arithmetic is fp32. On a CPU with
// AVX512-BF16, bf16 MLPs run both products on its dot products instead (gemm.h), with the intermediate rounded to
// bf16 between them; on one with AMX-BF16 on ATen's GEMMs (oneDNN's AMX tiles, gemm.h's bf16_on_aten), per
// block the products in bf16 and the activation, bias and residual in fp32 between them (aten_block_mlp).
//
// Up to kGemvMaxRows tokens (decoding) the products are matrix-vector products bound by reading the weights: those
// go through gemv.h instead (each weight byte read once at the memory's rate, the threads splitting the output rows),
// with the activation applied in fp32 to each thread's slice of the intermediate as soon as it is computed.
//
// Memory traffic: x, the weights (once per block) and out; the N x I intermediate of the unfused form never goes to
// memory.
#include "cpu/gemm.h"
#include "cpu/gemv.h"
#include "cpu/ops.h"
#include "cpu/output.h"
#include "cpu/simd.h"

#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <vector>

namespace fastlm_cpu {
namespace {

// fp32 intermediate activation per block: a share of L3 (bench/dev/cpu_notes.md).
constexpr int64_t kBlockBytes = 8 * 1024 * 1024;
constexpr int64_t kMinBlockTokens = 64;      // below this the GEMMs lose efficiency

enum class Act { kGelu, kSwiGLU };

// gelu_tanh(x) = 0.5 x (1 + tanh(u)) = x sigmoid(2u),  u = sqrt(2/pi) (x + 0.044715 x^3)
inline vfloat gelu(vfloat x) {
  const vfloat u = vset1(0.7978845608028654f) * vfma(vset1(0.044715f) * x, x * x, x);
  return x * vlogistic2(vset1(-2.0f * kLog2e) * u);
}

// silu(g) * u = (g sigmoid(g)) u
inline vfloat swiglu(vfloat g, vfloat u) { return g * vlogistic2(vset1(-kLog2e) * g) * u; }

// h[0..n) <- act(h) (gelu) or silu(h) * u (swiglu), computed in fp32 (T: fp32, or bf16 rounded once).
template <typename T>
void activate(Act act, T* h, const T* u, int64_t n) {
  for (int64_t c = 0; c < n; c += kW) {
    const int64_t len = std::min<int64_t>(kW, n - c);
    const vfloat x = vload_cvt_n(h + c, len);
    vstore_cvt_n(h + c, act == Act::kGelu ? gelu(x) : swiglu(x, vload_cvt_n(u + c, len)), len);
  }
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
  return (r.stride(-1) == 1 ? r : r.contiguous()).reshape({token_count(x), d_out});  // rows with unit stride
}

// Tokens per block for n tokens and an intermediate width inter: a block's 4-byte-per-element intermediate fits
// kBlockBytes (block_mlp: fp32; aten_block_mlp: SwiGLU's two bf16 products), at least kMinBlockTokens.
int64_t block_tokens(int64_t n, int64_t inter) {
  return std::max<int64_t>(1, std::min(n, std::max(kMinBlockTokens, kBlockBytes / (4 * std::max<int64_t>(inter, 1)))));
}

// The block path: out = act(x W1^T + b1 [, x W_up^T]) W2^T + b2 + res for any number of tokens; x2 (n, d), res
// (n, d_out) or undefined, out (n, d_out) contiguous.
void block_mlp(Act act, const at::Tensor& x2, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
               const at::Tensor* w_up, const at::Tensor& w2, const std::optional<at::Tensor>& b2, const at::Tensor& res,
               at::Tensor& out) {
  const int64_t n = x2.size(0), d = x2.size(1), inter = w1.size(0), d_out = w2.size(0);
  const auto fp32 = x2.options().dtype(at::kFloat);
  const bool words = x2.scalar_type() == at::kBFloat16 && bf16_dot_available();
  const at::Tensor xf = words ? at::Tensor() : x2.to(at::kFloat).contiguous();
  // the biases, fp32, padded with zeros to whole panels so that the epilogues read whole vectors
  auto padded = [&](const std::optional<at::Tensor>& b, int64_t len) {
    at::Tensor p = at::zeros({(len + kPanel - 1) / kPanel * kPanel}, fp32);
    if (b.has_value()) p.narrow(0, 0, len).copy_(*b);
    return p;
  };
  const at::Tensor b1f = padded(b1, inter), b2f = padded(b2, d_out);
  const int64_t tb = block_tokens(n, inter);
  at::Tensor h = at::empty({words ? 0 : tb, inter}, fp32);  // the fp32 activation (words: hw below)
  float* hp = h.data_ptr<float>();
  const float *pb1 = b1f.const_data_ptr<float>(), *pb2 = b2f.const_data_ptr<float>();
  // bf16 on the dot products (bf16dot.h): x and the activation h as bf16 words of pairs (h rounded to bf16, as a bf16
  // model's MLP rounds it, with an odd width's pad column 0)
  const int64_t d2 = (d + 1) / 2, i2 = (inter + 1) / 2;
  Words xbuf, hw(words ? tb * i2 : 0, 0u);
  const uint32_t* xw = nullptr;  // x's rows as words (as_words)
  auto* hb = reinterpret_cast<c10::BFloat16*>(hw.data());  // hw's rows as 2 * i2 bf16 values
  with_float_type(x2.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    T* op = out.data_ptr<T>();
    const T* rp = res.defined() ? res.const_data_ptr<T>() : nullptr;
    const int64_t ldr = res.defined() ? res.stride(0) : 0;
    constexpr bool dot = kBf16Dot<T>;
    const at::Tensor xc = dot ? x2.contiguous() : at::Tensor();
    if constexpr (dot) xw = as_words(xc.const_data_ptr<T>(), n, d, xbuf);
    for (int64_t t0 = 0; t0 < n; t0 += tb) {
      const int64_t rows = std::min(tb, n - t0);
      // a GEMM over x's rows of this block, or over h's
      auto over_x = [&](const at::Tensor& w, auto&& epilogue) {
        if constexpr (dot)
          gemm_nt(rows, w.size(0), d, xw + t0 * d2, d2, w.const_data_ptr<T>(), w.stride(0), w.stride(1),
                  epilogue);
        else
          gemm_nt(rows, w.size(0), d, xf.const_data_ptr<float>() + t0 * d, d, w.const_data_ptr<T>(), w.stride(0),
                  w.stride(1), epilogue);
      };
      // both products of SwiGLU's gate and up weights in one pass (gemm.h: each panel's two tiles side by side)
      auto over_x2 = [&](const at::Tensor& wa, const at::Tensor& wb, auto&& epilogue) {
        const Weight<T> a{wa.const_data_ptr<T>(), wa.stride(0), wa.stride(1)};
        const Weight<T> b{wb.const_data_ptr<T>(), wb.stride(0), wb.stride(1)};
        if constexpr (dot)
          gemm_nt2(rows, wa.size(0), d, xw + t0 * d2, d2, a, b, epilogue);
        else
          gemm_nt2(rows, wa.size(0), d, xf.const_data_ptr<float>() + t0 * d, d, a, b, epilogue);
      };
      auto over_h = [&](const at::Tensor& w, auto&& epilogue) {
        if constexpr (dot)
          gemm_nt(rows, w.size(0), inter, hw.data(), i2, w.const_data_ptr<T>(), w.stride(0), w.stride(1), epilogue);
        else
          gemm_nt(rows, w.size(0), inter, hp, inter, w.const_data_ptr<T>(), w.stride(0), w.stride(1), epilogue);
      };
      // the activation of row i, columns [c, c + len)
      auto put_h = [&](int64_t i, int64_t c, vfloat y, int64_t len) {
        if constexpr (dot)
          vstore_cvt_n(hb + i * 2 * i2 + c, y, len);
        else
          vstore_cvt_n(hp + i * inter + c, y, len);
      };
      if (w_up)  // h = silu(x W1^T + b1) * (x W_up^T)
        over_x2(w1, *w_up, [&](int64_t m0, int64_t r, int64_t n0, int64_t cols, const float* tile, int64_t ldt) {
          for (int64_t i = 0; i < r; ++i)
            for (int64_t v = 0; v < cols; v += kW) {
              const float* g = tile + i * ldt + v / kPanel * 2 * kPanel + v % kPanel;  // the up product: kPanel on
              const vfloat y = swiglu(vload(g) + vload(pb1 + n0 + v), vload(g + kPanel));
              put_h(m0 + i, n0 + v, y, std::min<int64_t>(kW, cols - v));
            }
        });
      else  // h = gelu(x W1^T + b1)
        over_x(w1, [&](int64_t m0, int64_t r, int64_t n0, int64_t cols, const float* tile, int64_t ldt) {
          for (int64_t i = 0; i < r; ++i)
            for (int64_t v = 0; v < cols; v += kW) {
              const vfloat y = vload(tile + i * ldt + v) + vload(pb1 + n0 + v);
              put_h(m0 + i, n0 + v, gelu(y), std::min<int64_t>(kW, cols - v));
            }
        });
      // out = h W2^T + b2 (+ res), rounded once
      over_h(w2, [&](int64_t m0, int64_t r, int64_t n0, int64_t cols, const float* tile, int64_t ldt) {
        for (int64_t i = 0; i < r; ++i) {
          const int64_t row = t0 + m0 + i;
          for (int64_t v = 0; v < cols; v += kW) {
            const int64_t len = std::min<int64_t>(kW, cols - v);
            vfloat y = vload(tile + i * ldt + v) + vload(pb2 + n0 + v);
            if (rp) y += vload_cvt_n(rp + row * ldr + n0 + v, len);
            vstore_cvt_n(op + row * d_out + n0 + v, y, len);
          }
        }
      });
    }
  });
}

// block_mlp on ATen's GEMMs, for bf16 where bf16_on_aten() (gemm.h): per block of tokens each product in
// bf16 (fp32 accumulation, b_fc included, one rounding: a bf16 F.linear's arithmetic), the activation in fp32 on the
// rounded products and rounded once, the second product's bias and the residual added in fp32 before the last
// rounding. The block's two (SwiGLU) bf16 products take the room of block_mlp's fp32 intermediate.
void aten_block_mlp(Act act, const at::Tensor& x2, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
                    const at::Tensor* w_up, const at::Tensor& w2, const std::optional<at::Tensor>& b2,
                    const at::Tensor& res, at::Tensor& out) {
  using T = c10::BFloat16;
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // (a kernel: its ATen calls record no graph)
  const int64_t n = x2.size(0), inter = w1.size(0), d_out = w2.size(0);
  const int64_t tb = block_tokens(n, inter);
  at::Tensor g = at::empty({tb, inter}, x2.options()), u = w_up ? at::empty({tb, inter}, x2.options()) : at::Tensor();
  at::Tensor y = at::empty({tb, d_out}, x2.options());
  const at::Tensor b2f = b2.has_value() ? b2->to(at::kFloat).contiguous() : at::Tensor();
  const float* pb2 = b2f.defined() ? b2f.const_data_ptr<float>() : nullptr;
  const T* rp = res.defined() ? res.const_data_ptr<T>() : nullptr;
  const int64_t ldr = res.defined() ? res.stride(0) : 0;
  T* op = out.data_ptr<T>();
  for (int64_t t0 = 0; t0 < n; t0 += tb) {
    const int64_t rows = std::min(tb, n - t0);
    const at::Tensor xb = x2.narrow(0, t0, rows);
    at::Tensor gb = g.narrow(0, 0, rows), yb = y.narrow(0, 0, rows);
    if (b1.has_value())
      at::addmm_out(gb, *b1, xb, w1.t());
    else
      at::mm_out(gb, xb, w1.t());
    if (w_up) {
      at::Tensor ub = u.narrow(0, 0, rows);
      at::mm_out(ub, xb, w_up->t());
    }
    T* gp = gb.data_ptr<T>();
    const T* up = w_up ? u.const_data_ptr<T>() : nullptr;
    at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t i = r0; i < r1; ++i) activate(act, gp + i * inter, up ? up + i * inter : nullptr, inter);
    });
    at::mm_out(yb, gb, w2.t());
    const T* yp = yb.const_data_ptr<T>();
    at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t i = r0; i < r1; ++i)
        for (int64_t c = 0; c < d_out; c += kW) {
          const int64_t len = std::min<int64_t>(kW, d_out - c), row = t0 + i;
          vfloat v = vload_cvt_n(yp + i * d_out + c, len);
          if (pb2) v += vload_cvt_n(pb2 + c, len);
          if (rp) v += vload_cvt_n(rp + row * ldr + c, len);
          vstore_cvt_n(op + row * d_out + c, v, len);
        }
    });
  }
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
        activate(act, ht + n0, w_up ? up + t * inter + n0 : nullptr, n1 - n0);
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
  const at::Tensor x2 = x.reshape({token_count(x), d});
  const int64_t n = x2.size(0);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = d_out;
  at::Tensor out = empty_output({n, d_out}, x.options());
  const bool aten = x.scalar_type() == at::kBFloat16 && bf16_on_aten();  // (gemm.h; checks FASTLM_CPU_BF16)
  if (n > 0 && d_out > 0 && n <= kGemvMaxRows && rows_contiguous({&w_fc, &w_proj}))
    small_mlp(Act::kGelu, x2, w_fc, b_fc, nullptr, w_proj, b_proj, res, out);
  else if (n > 0 && d_out > 0 && aten)
    aten_block_mlp(Act::kGelu, x2, w_fc, b_fc, nullptr, w_proj, b_proj, res, out);
  else if (n > 0 && d_out > 0)
    block_mlp(Act::kGelu, x2, w_fc, b_fc, nullptr, w_proj, b_proj, res, out);
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
  const at::Tensor x2 = x.reshape({token_count(x), d});
  const int64_t n = x2.size(0);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = d_out;
  at::Tensor out = empty_output({n, d_out}, x.options());
  const bool aten = x.scalar_type() == at::kBFloat16 && bf16_on_aten();  // (gemm.h; checks FASTLM_CPU_BF16)
  if (n > 0 && d_out > 0 && n <= kGemvMaxRows && rows_contiguous({&w_gate, &w_up, &w_down}))
    small_mlp(Act::kSwiGLU, x2, w_gate, std::nullopt, &w_up, w_down, std::nullopt, res, out);
  else if (n > 0 && d_out > 0 && aten)
    aten_block_mlp(Act::kSwiGLU, x2, w_gate, std::nullopt, &w_up, w_down, std::nullopt, res, out);
  else if (n > 0 && d_out > 0)
    block_mlp(Act::kSwiGLU, x2, w_gate, std::nullopt, &w_up, w_down, std::nullopt, res, out);
  return out.view(out_shape);
}

namespace {

// Runs f(offset, len) over [0, n) in pieces of at most kW elements, in parallel.
template <typename F>
void for_vectors(int64_t n, F&& f) {
  at::parallel_for(0, (n + kW - 1) / kW, 2048, [&](int64_t v0, int64_t v1) {
    for (int64_t v = v0; v < v1; ++v) f(v * kW, std::min<int64_t>(kW, n - v * kW));
  });
}

void check_act_bwd(const char* op, const at::Tensor& dh, std::initializer_list<const at::Tensor*> ts) {
  const auto dt = dh.scalar_type();
  TORCH_CHECK(dh.device().is_cpu(), "fastlm::", op, " (CPU): dh must be a CPU tensor, got ", dh.device());
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, "fastlm::", op,
              ": dtype must be float32, bfloat16 or float16, got ", dt);
  for (const at::Tensor* t : ts) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == dt && t->sizes() == dh.sizes(), "fastlm::", op,
                ": every input must be a CPU ", dt, " tensor of dh's shape ", dh.sizes(), ", got a ", t->scalar_type(),
                " tensor of shape ", t->sizes(), " on ", t->device());
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> gelu_bwd(const at::Tensor& dh, const at::Tensor& a) {
  check_act_bwd("gelu_bwd", dh, {&a});
  const at::Tensor dhc = dh.contiguous(), ac = a.contiguous();
  at::Tensor da = empty_output(ac.sizes(), ac.options()), h = empty_output(ac.sizes(), ac.options());
  with_float_type(dh.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T *pdh = dhc.const_data_ptr<T>(), *pa = ac.const_data_ptr<T>();
    T *pda = da.data_ptr<T>(), *ph = h.data_ptr<T>();
    const vfloat c = vset1(0.7978845608028654f), k = vset1(0.044715f), one = vset1(1.0f), two = vset1(2.0f);
    for_vectors(ac.numel(), [&](int64_t o, int64_t len) {
      const vfloat x = vload_cvt_n(pa + o, len), g = vload_cvt_n(pdh + o, len);
      // with z = c (x + k x^3) and s = sigmoid(2z) = (1 + tanh z) / 2:  gelu(x) = x s and
      // gelu'(x) = s (1 + 2 x (1 - s) c (1 + 3 k x^2)), free of the cancellation in 1 + tanh z for x << 0
      const vfloat z = c * vfma(k * x, x * x, x);
      const vfloat sg = vlogistic2(vset1(-2.0f * kLog2e) * z);
      const vfloat d = sg * vfma(two * x * (one - sg) * c, vfma(vset1(3.0f) * k, x * x, one), one);
      vstore_cvt_n(pda + o, g * d, len);
      vstore_cvt_n(ph + o, x * sg, len);
    });
  });
  return {da, h};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> swiglu_bwd(const at::Tensor& dh, const at::Tensor& g,
                                                          const at::Tensor& u) {
  check_act_bwd("swiglu_bwd", dh, {&g, &u});
  const at::Tensor dhc = dh.contiguous(), gc = g.contiguous(), uc = u.contiguous();
  at::Tensor dg = empty_output(gc.sizes(), gc.options()), du = empty_output(gc.sizes(), gc.options()),
             h = empty_output(gc.sizes(), gc.options());
  with_float_type(dh.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T *pdh = dhc.const_data_ptr<T>(), *pg = gc.const_data_ptr<T>(), *pu = uc.const_data_ptr<T>();
    T *pdg = dg.data_ptr<T>(), *pdu = du.data_ptr<T>(), *ph = h.data_ptr<T>();
    const vfloat one = vset1(1.0f);
    for_vectors(gc.numel(), [&](int64_t o, int64_t len) {
      const vfloat x = vload_cvt_n(pg + o, len), up = vload_cvt_n(pu + o, len), d = vload_cvt_n(pdh + o, len);
      const vfloat sig = vlogistic2(vset1(-kLog2e) * x);
      const vfloat act = x * sig;                                   // silu(g)
      vstore_cvt_n(pdg + o, d * up * sig * vfma(x, one - sig, one), len);   // silu'(g) = s (1 + g (1 - s))
      vstore_cvt_n(pdu + o, d * act, len);
      vstore_cvt_n(ph + o, act * up, len);
    });
  });
  return {dg, du, h};
}

}  // namespace fastlm_cpu
