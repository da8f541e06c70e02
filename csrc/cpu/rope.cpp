// Rotary position embedding on the CPU, Hugging Face's rotate-half convention. With x1, x2 the two halves of a head
// vector and c1, c2, s1, s2 those of its position's cos and sin rows:
//
//     forward:  y1 = x1 c1 - x2 s1,   y2 = x2 c2 + x1 s2      (y = x cos + rotate_half(x) sin)
//     inverse:  y1 = x1 c1 + x2 s2,   y2 = x2 c2 - x1 s1      (the transposed rotation: the backward; for Hugging
//                                                              Face tables, whose halves are equal, the rotation
//                                                              by -sin)
//
// Algorithm: the (batch, position) pairs in parallel; for each, the position's table rows (in x's dtype: fastlm.ops
// casts them first, as the reference does) are read once from memory and serve every head from L1. fp32 arithmetic
// in simd.h vectors over the half head dim (a padded vector for its tail), one rounding to x's dtype.
//
// Memory traffic: x read once (any strides with a contiguous head dim: q or k sliced out of a fused QKV
// projection are not copied), the output written once, contiguous; the tables once per (batch, position).
#include "cpu/ops.h"
#include "cpu/output.h"
#include "cpu/simd.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>

namespace fastlm_cpu {
namespace {

// Lanes [i, i + n) of both halves of one head vector x rotated into y by the table rows c, s (n == kW, or fewer
// in the tail).
template <typename T, bool kTail>
inline void rotate(const T* x, const T* c, const T* s, T* y, int64_t half, int64_t i, int64_t n, bool inverse) {
  auto load = [n](const T* p) {
    if constexpr (kTail) return vload_cvt_n(p, n);
    else return vload_cvt(p);
  };
  auto store = [n](T* p, vfloat v) {
    if constexpr (kTail) vstore_cvt_n(p, v, n);
    else vstore_cvt(p, v);
  };
  const vfloat x1 = load(x + i), x2 = load(x + half + i);
  const vfloat s1 = load(s + i), s2 = load(s + half + i);
  // y1 = x1 c1 + x2 a, y2 = x2 c2 + x1 b
  const vfloat a = inverse ? s2 : -s1, b = inverse ? -s1 : s2;
  store(y + i, vfma(x1, load(c + i), x2 * a));
  store(y + half + i, vfma(x2, load(c + half + i), x1 * b));
}

void check_table(const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.device().is_cpu(), "fastlm::rope_fwd (CPU): ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "fastlm::rope_fwd: ", name, " must have x's dtype ",
              x.scalar_type(), ", got ", t.scalar_type());
  const int64_t B = x.size(0), S = x.size(1), D = x.size(3);
  TORCH_CHECK((t.dim() == 2 && t.size(0) == S && t.size(1) == D) ||
                  (t.dim() == 3 && t.size(0) == B && t.size(1) == S && t.size(2) == D),
              "fastlm::rope_fwd: ", name, " must have shape (", S, ", ", D, ") or (", B, ", ", S, ", ", D,
              ") for x of shape ", x.sizes(), ", got ", t.sizes());
}

}  // namespace

at::Tensor rope_fwd(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool inverse) {
  TORCH_CHECK(x.device().is_cpu(), "fastlm::rope_fwd (CPU): x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 4, "fastlm::rope_fwd: x must be 4-D (batch, seqlen, heads, head_dim), got shape ",
              x.sizes());
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "fastlm::rope_fwd: dtype must be float32, bfloat16 or float16, got ", dtype);
  const int64_t B = x.size(0), S = x.size(1), H = x.size(2), D = x.size(3);
  TORCH_CHECK(D % 2 == 0, "fastlm::rope_fwd: head_dim (x's last dim) must be even, got ", D);
  check_table("cos", cos, x);
  check_table("sin", sin, x);
  TORCH_CHECK(sin.sizes() == cos.sizes(), "fastlm::rope_fwd: sin must have cos's shape ", cos.sizes(), ", got ",
              sin.sizes());

  at::Tensor out = empty_output(x.sizes(), x.options());
  if (out.numel() == 0) return out;
  const at::Tensor xc = x.stride(3) == 1 ? x : x.contiguous();
  const at::Tensor c = cos.stride(-1) == 1 ? cos : cos.contiguous();
  const at::Tensor s = sin.stride(-1) == 1 ? sin : sin.contiguous();
  // table strides over (batch, position); 0 over the batch for shared (S, D) tables
  const int64_t cb = c.dim() == 3 ? c.stride(0) : 0, cs = c.stride(-2);
  const int64_t sb = s.dim() == 3 ? s.stride(0) : 0, ss = s.stride(-2);
  const int64_t xb = xc.stride(0), xs = xc.stride(1), xh = xc.stride(2), half = D / 2;
  auto run = [&](auto tag) {
    using T = decltype(tag);
    const T *xp = xc.const_data_ptr<T>(), *cp = c.const_data_ptr<T>(), *sp = s.const_data_ptr<T>();
    T* op = out.data_ptr<T>();
    at::parallel_for(0, B * S, std::max<int64_t>(1, kGrainElems / (H * D)), [&](int64_t begin, int64_t end) {
      for (int64_t bs = begin; bs < end; ++bs) {
        const int64_t b = bs / S, p = bs % S;
        const T* crow = cp + b * cb + p * cs;
        const T* srow = sp + b * sb + p * ss;
        for (int64_t h = 0; h < H; ++h) {
          const T* xrow = xp + b * xb + p * xs + h * xh;
          T* yrow = op + (bs * H + h) * D;
          int64_t i = 0;
          for (; i + kW <= half; i += kW) rotate<T, false>(xrow, crow, srow, yrow, half, i, kW, inverse);
          if (i < half) rotate<T, true>(xrow, crow, srow, yrow, half, i, half - i, inverse);
        }
      }
    });
  };
  with_float_type(dtype, run);
  return out;
}

}  // namespace fastlm_cpu
