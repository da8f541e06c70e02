// CUDA implementations of the fastlm operators (schemas in csrc/bindings.cpp): torch tensors -> the plain launchers
// of csrc/cuda/launchers.h. Compiled to nothing unless the extension is built with FASTLM_WITH_CUDA.
// What the CUDA kernels do not support (fp32, head dims not compiled, MLP sizes not multiples of 8) raises a clear
// error; backend='triton' serves those cases. Attention rows that are not 16-byte aligned are copied (rows_aligned).
#ifdef FASTLM_WITH_CUDA

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string>
#include <tuple>

#include "cuda/launchers.h"

namespace {

using fastlm_cuda::DType;

DType dtype_of(const at::Tensor& t, const char* op) {
  TORCH_CHECK(t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16, "fastlm::", op,
              " (CUDA): inputs must be float16 or bfloat16 (tensor-core kernels), got ", t.scalar_type(),
              "; use backend='triton' for other dtypes");
  return t.scalar_type() == at::kHalf ? DType::kFloat16 : DType::kBFloat16;
}

// t is a CUDA tensor, on the device of `like` when given (the kernels run on one device and take raw pointers).
void check_cuda(const at::Tensor& t, const char* op, const char* name, const at::Tensor* like = nullptr) {
  TORCH_CHECK(t.is_cuda(), "fastlm::", op, " (CUDA): ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(!like || t.device() == like->device(), "fastlm::", op, " (CUDA): ", name, " must be on ",
              like ? like->device() : t.device(), " with the other inputs, got ", t.device());
}

// The head dim (q's last) is one the kernels are compiled for: checked before anything is copied or allocated.
void check_head_dim(const at::Tensor& q, const char* op) {
  const int64_t d = q.size(-1);
  TORCH_CHECK(d <= 1024 && fastlm_cuda::compiled_head_dim(static_cast<int>(d)), "fastlm::", op, " (CUDA): the head "
              "dim must be one of ", fastlm_cuda::kCompiledHeadDims, " (the dims the kernels are compiled for), got ",
              d, "; use backend='triton' for others");
}

// The stride the kernels are given: 0 for a size-1 dim (its index is always 0, and torch leaves such strides
// arbitrary even in "contiguous" tensors).
int64_t stride_of(const at::Tensor& t, int64_t d) { return t.size(d) == 1 ? 0 : t.stride(d); }

// The kernels read rows with 16-byte copies: unit stride in the last dim, other strides multiples of 8 elements
// and a 16-byte aligned base. Anything else is copied into a fresh contiguous tensor first.
at::Tensor rows_aligned(const at::Tensor& t) {
  bool ok = (t.size(-1) == 1 || t.stride(-1) == 1) && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int64_t d = 0; ok && d + 1 < t.dim(); ++d) ok = stride_of(t, d) % 8 == 0;
  return ok ? t : t.clone(at::MemoryFormat::Contiguous);
}

void throw_if(const fastlm_cuda::Status& s) { TORCH_CHECK(s.ok(), "fastlm (CUDA): ", s.error); }

// The tensor-core kernels chosen by FASTLM_CUDA_KERNELS for the attention forward and the MLPs: unset or "auto"
// (wgmma on Hopper where the kernel serves the shape, mma.sync otherwise), "mma" (the sm_80 kernels everywhere) or
// "wgmma" (an error where they cannot run).
fastlm_cuda::KernelFamily kernel_family() {
  const char* env = std::getenv("FASTLM_CUDA_KERNELS");
  const std::string choice = env ? env : "";
  if (choice.empty() || choice == "auto") return fastlm_cuda::KernelFamily::kAuto;
  if (choice == "mma") return fastlm_cuda::KernelFamily::kMma;
  if (choice == "wgmma") return fastlm_cuda::KernelFamily::kWgmma;
  TORCH_CHECK(false, "fastlm (CUDA): FASTLM_CUDA_KERNELS must be 'auto', 'mma' or 'wgmma', got '", choice, "'");
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                      const at::Tensor& v_in, bool causal, double softmax_scale,
                                                      int64_t window_left, int64_t window_right) {
  const char* op = "attention_fwd";
  check_cuda(q_in, op, "q");
  check_cuda(k_in, op, "k", &q_in);
  check_cuda(v_in, op, "v", &q_in);
  TORCH_CHECK(q_in.dim() == 4 && k_in.dim() == 4 && v_in.dim() == 4, "fastlm::attention_fwd (CUDA): q, k, v must be "
              "4-D (batch, seqlen, nheads, headdim)");
  TORCH_CHECK(k_in.scalar_type() == q_in.scalar_type() && v_in.scalar_type() == q_in.scalar_type(),
              "fastlm::attention_fwd (CUDA): q, k, v must share a dtype");
  TORCH_CHECK(k_in.sizes() == v_in.sizes() && k_in.size(0) == q_in.size(0) && k_in.size(3) == q_in.size(3),
              "fastlm::attention_fwd (CUDA): k and v must be (batch, seqlen_k, nheads_kv, headdim) matching q");
  const DType dtype = dtype_of(q_in, op);
  check_head_dim(q_in, op);
  c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = rows_aligned(q_in), k = rows_aligned(k_in), v = rows_aligned(v_in);
  const int64_t B = q.size(0), Sq = q.size(1), H = q.size(2), D = q.size(3), Sk = k.size(1), Hkv = k.size(2);
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0, "fastlm::attention_fwd (CUDA): nheads (", H, ") must be a multiple of "
              "nheads_kv (", Hkv, ")");
  TORCH_CHECK(std::abs(softmax_scale) <= std::numeric_limits<float>::max(),  // (false for NaN)
              "fastlm::attention_fwd (CUDA): softmax_scale must be finite in float32, got ", softmax_scale);
  TORCH_CHECK(Sq + Sk <= (int64_t{1} << 30), "fastlm::attention_fwd (CUDA): seqlen_q + seqlen_k must be <= 2^30 "
              "(the kernels' positions are int), got ", Sq, " + ", Sk);
  auto out = at::empty({B, Sq, H, D}, q.options());
  auto lse = at::empty({B, H, Sq}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  fastlm_cuda::AttentionParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.q_sb = stride_of(q, 0), p.q_ss = stride_of(q, 1), p.q_sh = stride_of(q, 2);
  p.k_sb = stride_of(k, 0), p.k_ss = stride_of(k, 1), p.k_sh = stride_of(k, 2);
  p.v_sb = stride_of(v, 0), p.v_ss = stride_of(v, 1), p.v_sh = stride_of(v, 2);
  p.o_sb = stride_of(out, 0), p.o_ss = stride_of(out, 1), p.o_sh = stride_of(out, 2);
  p.batch = static_cast<int>(B), p.nheads = static_cast<int>(H), p.nheads_kv = static_cast<int>(Hkv);
  p.seqlen_q = static_cast<int>(Sq), p.seqlen_k = static_cast<int>(Sk), p.head_dim = static_cast<int>(D);
  p.softmax_scale = static_cast<float>(softmax_scale);
  // a window past every key is unbounded in effect (left Sk, right Sq reach every key from any position): clamped
  // so that the kernels' position arithmetic stays in int
  p.window_left = static_cast<int>(std::min(window_left, Sk));
  p.window_right = causal ? 0 : static_cast<int>(std::min(window_right, Sq));
  p.dtype = dtype;
  p.kernels = kernel_family();
  throw_if(fastlm_cuda::attention_fwd(p, c10::cuda::getCurrentCUDAStream()));
  return {out, lse};
}

at::Tensor decode_attention_cuda(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                 const at::Tensor& cache_seqlens, double softmax_scale, int64_t window_left) {
  const char* op = "decode_attention";
  TORCH_CHECK(std::abs(softmax_scale) <= std::numeric_limits<float>::max(),  // (false for NaN)
              "fastlm::decode_attention (CUDA): softmax_scale must be finite in float32, got ", softmax_scale);
  TORCH_CHECK(window_left >= -1, "fastlm::decode_attention (CUDA): window_left must be >= -1 (-1: no window), got ",
              window_left);
  check_cuda(q_in, op, "q");
  check_cuda(k_in, op, "k_cache", &q_in);
  check_cuda(v_in, op, "v_cache", &q_in);
  check_cuda(cache_seqlens, op, "cache_seqlens", &q_in);
  TORCH_CHECK(q_in.dim() == 4 && k_in.dim() == 4 && k_in.sizes() == v_in.sizes(),
              "fastlm::decode_attention (CUDA): q must be 4-D and k_cache, v_cache 4-D of the same shape");
  TORCH_CHECK(k_in.scalar_type() == q_in.scalar_type() && v_in.scalar_type() == q_in.scalar_type(),
              "fastlm::decode_attention (CUDA): q, k_cache, v_cache must share a dtype");
  TORCH_CHECK(cache_seqlens.dim() == 1 && cache_seqlens.size(0) == q_in.size(0) &&
              (cache_seqlens.scalar_type() == at::kInt || cache_seqlens.scalar_type() == at::kLong),
              "fastlm::decode_attention (CUDA): cache_seqlens must be int32/int64 of shape (batch,)");
  TORCH_CHECK(k_in.size(0) == q_in.size(0) && k_in.size(3) == q_in.size(3),
              "fastlm::decode_attention (CUDA): caches must be (batch, max_seqlen, nheads_kv, headdim) matching q");
  const DType dtype = dtype_of(q_in, op);
  check_head_dim(q_in, op);
  c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = rows_aligned(q_in), k = rows_aligned(k_in), v = rows_aligned(v_in);
  const at::Tensor lens = cache_seqlens.contiguous();
  const int64_t B = q.size(0), Sq = q.size(1), H = q.size(2), D = q.size(3), S = k.size(1), Hkv = k.size(2);
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0, "fastlm::decode_attention (CUDA): nheads (", H, ") must be a multiple of "
              "nheads_kv (", Hkv, ")");
  auto out = at::empty({B, Sq, H, D}, q.options());
  if (out.numel() == 0) return out;
  const int splits = fastlm_cuda::decode_num_splits(static_cast<int>(B), static_cast<int>(Sq), static_cast<int>(H),
                                                    static_cast<int>(Hkv), static_cast<int>(S));
  auto workspace = at::empty({fastlm_cuda::decode_workspace_floats(static_cast<int>(B), static_cast<int>(Sq),
                                                                   static_cast<int>(H), splits, static_cast<int>(D))},
                             q.options().dtype(at::kFloat));
  fastlm_cuda::DecodeParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.cache_seqlens = lens.data_ptr();
  p.seqlens_int64 = lens.scalar_type() == at::kLong;
  p.out = out.data_ptr();
  p.workspace = workspace.data_ptr<float>();
  p.q_sb = stride_of(q, 0), p.q_ss = stride_of(q, 1), p.q_sh = stride_of(q, 2);
  p.k_sb = stride_of(k, 0), p.k_ss = stride_of(k, 1), p.k_sh = stride_of(k, 2);
  p.v_sb = stride_of(v, 0), p.v_ss = stride_of(v, 1), p.v_sh = stride_of(v, 2);
  p.batch = static_cast<int>(B), p.seqlen_q = static_cast<int>(Sq), p.nheads = static_cast<int>(H);
  p.nheads_kv = static_cast<int>(Hkv), p.max_seqlen = static_cast<int>(S), p.head_dim = static_cast<int>(D);
  p.num_splits = splits;
  p.softmax_scale = static_cast<float>(softmax_scale);
  // (the launcher takes a window reaching every key, >= max_seqlen, for none)
  p.window_left = static_cast<int>(std::min<int64_t>(window_left, S));
  p.dtype = dtype;
  throw_if(fastlm_cuda::decode_attention(p, c10::cuda::getCurrentCUDAStream()));
  return out;
}

// Shared by both MLPs: flattens x to (M, d_model), checks the weights, runs the launcher, restores x's shape.
template <typename Launch>
at::Tensor mlp_cuda(const char* op, const at::Tensor& x, const at::Tensor& w1, const at::Tensor* w1b,
                    const std::optional<at::Tensor>& b1, const at::Tensor& w2, const std::optional<at::Tensor>& b2,
                    const std::optional<at::Tensor>& residual, Launch launch) {
  check_cuda(x, op, "x");
  TORCH_CHECK(x.dim() >= 1, "fastlm::", op, " (CUDA): x must have at least 1 dim");
  const DType dtype = dtype_of(x, op);
  const int64_t d_model = x.size(-1);
  TORCH_CHECK(d_model > 0, "fastlm::", op, " (CUDA): x's last dim (d_model) must be positive, got shape ", x.sizes());
  auto same = [&](const at::Tensor& t, const char* name) {
    check_cuda(t, op, name, &x);
    TORCH_CHECK(t.scalar_type() == x.scalar_type(), "fastlm::", op, " (CUDA): ", name, " must have x's dtype ",
                x.scalar_type(), ", got ", t.scalar_type());
  };
  same(w1, "first weight");
  same(w2, "second weight");
  TORCH_CHECK(w1.dim() == 2 && w1.size(1) == d_model, "fastlm::", op, " (CUDA): first weight must be (d_ff, ",
              d_model, "), got ", w1.sizes());
  const int64_t d_ff = w1.size(0);
  TORCH_CHECK(w2.dim() == 2 && w2.size(0) == d_model && w2.size(1) == d_ff, "fastlm::", op,
              " (CUDA): second weight must be (", d_model, ", ", d_ff, "), got ", w2.sizes());
  if (w1b) {
    same(*w1b, "w_up");
    TORCH_CHECK(w1b->sizes() == w1.sizes(), "fastlm::", op, " (CUDA): w_up must have w_gate's shape ", w1.sizes());
  }
  if (b1) {
    same(*b1, "b_fc");
    TORCH_CHECK(b1->dim() == 1 && b1->size(0) == d_ff, "fastlm::", op, " (CUDA): b_fc must be (", d_ff, ")");
  }
  if (b2) {
    same(*b2, "b_proj");
    TORCH_CHECK(b2->dim() == 1 && b2->size(0) == d_model, "fastlm::", op, " (CUDA): b_proj must be (", d_model, ")");
  }
  if (residual) {
    same(*residual, "residual");
    TORCH_CHECK(residual->sizes() == x.sizes(), "fastlm::", op, " (CUDA): residual must have x's shape ", x.sizes());
  }
  TORCH_CHECK(d_model % 8 == 0 && d_ff % 8 == 0, "fastlm::", op, " (CUDA): d_model and d_ff must be multiples of "
              "8, got ", d_model, " and ", d_ff);
  c10::cuda::CUDAGuard guard(x.device());
  // the GEMMs read contiguous rows with 16-byte copies from 16-byte aligned bases
  auto dense = [](const at::Tensor& t) { return rows_aligned(t.contiguous()); };
  const at::Tensor x2 = dense(x.reshape({-1, d_model}));
  const at::Tensor w1c = dense(w1), w2c = dense(w2);
  const at::Tensor w1bc = w1b ? dense(*w1b) : at::Tensor();
  const at::Tensor b1c = b1 ? b1->contiguous() : at::Tensor(), b2c = b2 ? b2->contiguous() : at::Tensor();
  const at::Tensor res = residual ? dense(residual->reshape({-1, d_model})) : at::Tensor();
  const int64_t rows = x2.size(0);
  auto hidden = at::empty({rows, d_ff}, x.options());
  auto out = at::empty({rows, d_model}, x.options());
  fastlm_cuda::MlpParams p{};
  p.x = x2.data_ptr();
  p.w1 = w1c.data_ptr();
  p.w1b = w1b ? w1bc.data_ptr() : nullptr;
  p.b1 = b1 ? b1c.data_ptr() : nullptr;
  p.w2 = w2c.data_ptr();
  p.b2 = b2 ? b2c.data_ptr() : nullptr;
  p.residual = residual ? res.data_ptr() : nullptr;
  p.hidden = hidden.data_ptr();
  p.out = out.data_ptr();
  p.rows = rows, p.d_model = d_model, p.d_ff = d_ff;
  p.dtype = dtype;
  p.kernels = kernel_family();
  throw_if(launch(p, c10::cuda::getCurrentCUDAStream()));
  return out.view(x.sizes());
}

at::Tensor mlp_gelu_cuda(const at::Tensor& x, const at::Tensor& w_fc, const std::optional<at::Tensor>& b_fc,
                         const at::Tensor& w_proj, const std::optional<at::Tensor>& b_proj,
                         const std::optional<at::Tensor>& residual) {
  return mlp_cuda("mlp_gelu", x, w_fc, nullptr, b_fc, w_proj, b_proj, residual,
                  [](const fastlm_cuda::MlpParams& p, cudaStream_t s) { return fastlm_cuda::mlp_gelu(p, s); });
}

at::Tensor mlp_swiglu_cuda(const at::Tensor& x, const at::Tensor& w_gate, const at::Tensor& w_up,
                           const at::Tensor& w_down, const std::optional<at::Tensor>& residual) {
  return mlp_cuda("mlp_swiglu", x, w_gate, &w_up, std::nullopt, w_down, std::nullopt, residual,
                  [](const fastlm_cuda::MlpParams& p, cudaStream_t s) { return fastlm_cuda::mlp_swiglu(p, s); });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlm, CUDA, m) {
  m.impl("attention_fwd", &attention_fwd_cuda);
  m.impl("decode_attention", &decode_attention_cuda);
  m.impl("mlp_gelu", &mlp_gelu_cuda);
  m.impl("mlp_swiglu", &mlp_swiglu_cuda);
}

#endif  // FASTLM_WITH_CUDA
