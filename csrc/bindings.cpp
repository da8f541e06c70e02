// The binding of fastlm's C++ operators: the schemas of namespace fastlm (torch.ops.fastlm.*), their CPU kernels
// (csrc/cpu/), shape-only Meta kernels (so torch.compile and fake tensors can trace them), and the pybind11 module
// fastlm._C for what is not an operator. The CUDA kernels are registered by csrc/bindings_cuda.cpp when the
// extension is built with FASTLM_WITH_CUDA.
#include "cpu/amx.h"
#include "cpu/bf16dot.h"
#include "cpu/gemm.h"
#include "cpu/ops.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include <string>
#include <utility>
#include <vector>

namespace {

// The dispatcher runs an op's Meta kernel when any tensor argument is on the meta device, also when others are not:
// a call that mixes devices must fail, naming the argument, instead of returning uninitialized tensors on another
// device. Argument names come from the op's schema (looked up only on that error path).
void check_meta_tensor(const char* op, size_t index, const at::Tensor& t) {
  if (!t.defined() || t.is_meta()) return;
  const auto schema = c10::Dispatcher::singleton().findSchema({std::string("fastlm::") + op, ""});
  const auto& args = schema ? schema->schema().arguments() : std::vector<c10::Argument>{};
  const std::string name = index < args.size() ? args[index].name() : "argument " + std::to_string(index);
  TORCH_CHECK(false, "fastlm::", op, ": ", name, " is on ", t.device(),
              " while other tensor arguments are on the meta device: all tensor arguments must be on one device");
}
void check_meta_arg(const char* op, size_t i, const at::Tensor& t) { check_meta_tensor(op, i, t); }
void check_meta_arg(const char* op, size_t i, const std::optional<at::Tensor>& t) {
  if (t.has_value()) check_meta_tensor(op, i, *t);
}
void check_meta_arg(const char* op, size_t i, at::TensorList ts) {
  for (const auto& t : ts) check_meta_tensor(op, i, t);
}
void check_meta_arg(const char* op, size_t i, const c10::List<std::optional<at::Tensor>>& ts) {
  for (const std::optional<at::Tensor>& t : ts) check_meta_arg(op, i, t);
}
template <typename T>
void check_meta_arg(const char*, size_t, const T&) {}  // a scalar argument

// Meta<kOpName, &kernel>::call: the Meta kernel behind the device check of every tensor argument.
template <const char* Op, auto Fn>
struct Meta;
template <const char* Op, typename R, typename... Args, R (*Fn)(Args...)>
struct Meta<Op, Fn> {
  static R call(Args... args) {
    size_t i = 0;
    (check_meta_arg(Op, i++, args), ...);
    return Fn(std::forward<Args>(args)...);
  }
};

std::tuple<at::Tensor, at::Tensor> attention_fwd_meta(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      bool, double, int64_t, int64_t) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
              "fastlm::attention_fwd: q, k, v must be 4-D, got ", q.dim(), "-D, ", k.dim(), "-D, ", v.dim(), "-D");
  auto out = at::empty_symint({q.sym_size(0), q.sym_size(1), q.sym_size(2), q.sym_size(3)}, q.options());
  auto lse = at::empty_symint({q.sym_size(0), q.sym_size(2), q.sym_size(1)}, q.options().dtype(at::kFloat));
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_meta(const at::Tensor&, const at::Tensor& q,
                                                                  const at::Tensor& k, const at::Tensor& v,
                                                                  const at::Tensor&, const at::Tensor&,
                                                                  const std::optional<at::Tensor>&, bool, double,
                                                                  int64_t, int64_t) {
  return {at::empty_symint(q.sym_sizes(), q.options()), at::empty_symint(k.sym_sizes(), k.options()),
          at::empty_symint(v.sym_sizes(), v.options())};
}

at::Tensor decode_attention_meta(const at::Tensor& q, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 double, int64_t) {
  TORCH_CHECK(q.dim() == 4, "fastlm::decode_attention: q must be 4-D, got ", q.dim(), "-D");
  return at::empty_symint(q.sym_sizes(), q.options());
}

at::Tensor mlp_out_meta(const at::Tensor& x, const at::Tensor& w_out) {
  TORCH_CHECK(x.dim() >= 1 && w_out.dim() == 2, "fastlm: x must have at least 1 dim and weights 2, got ",
              x.dim(), " and ", w_out.dim());
  std::vector<c10::SymInt> shape(x.sym_sizes().begin(), x.sym_sizes().end());
  shape.back() = w_out.sym_size(0);
  return at::empty_symint(shape, x.options());
}

at::Tensor linear_meta(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>&) {
  return mlp_out_meta(x, weight);
}

at::Tensor mlp_gelu_meta(const at::Tensor& x, const at::Tensor&, const std::optional<at::Tensor>&,
                         const at::Tensor& w_proj, const std::optional<at::Tensor>&,
                         const std::optional<at::Tensor>&) {
  return mlp_out_meta(x, w_proj);
}

at::Tensor mlp_swiglu_meta(const at::Tensor& x, const at::Tensor&, const at::Tensor&, const at::Tensor& w_down,
                           const std::optional<at::Tensor>&) {
  return mlp_out_meta(x, w_down);
}

std::tuple<at::Tensor, at::Tensor> norm_fwd_meta(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                                 const at::Tensor&, const std::optional<at::Tensor>&, double, bool) {
  TORCH_CHECK(x.dim() >= 1, "fastlm::norm_fwd: x must have at least 1 dim (..., d), got a 0-D tensor");
  auto h = residual.has_value() ? at::empty_symint(x.sym_sizes(), x.options()) : at::empty({0}, x.options());
  return {at::empty_symint(x.sym_sizes(), x.options()), h};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_bwd_meta(const at::Tensor&, const at::Tensor& h,
                                                              const at::Tensor& weight,
                                                              const std::optional<at::Tensor>&, double, bool,
                                                              bool has_bias) {
  return {at::empty_symint(h.sym_sizes(), h.options()), at::empty_symint(weight.sym_sizes(), weight.options()),
          has_bias ? at::empty_symint(weight.sym_sizes(), weight.options()) : at::empty({0}, weight.options())};
}

at::Tensor rope_fwd_meta(const at::Tensor& x, const at::Tensor&, const at::Tensor&, bool) {
  TORCH_CHECK(x.dim() == 4, "fastlm::rope_fwd: x must be 4-D (batch, seqlen, heads, head_dim), got ", x.dim(), "-D");
  return at::empty_symint(x.sym_sizes(), x.options());
}

std::tuple<at::Tensor, at::Tensor> gelu_bwd_meta(const at::Tensor& dh, const at::Tensor& a) {
  return {at::empty_symint(a.sym_sizes(), a.options()), at::empty_symint(a.sym_sizes(), a.options())};
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_rows_meta(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2, "fastlm::cross_entropy: logits must be 2-D (tokens, vocab), got shape ",
              logits.sym_sizes());
  const auto opts = logits.options().dtype(at::kFloat);
  return {at::empty_symint({logits.sym_size(0)}, opts), at::empty_symint({logits.sym_size(0)}, opts)};
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd_meta(const at::Tensor& logits, const at::Tensor&, int64_t) {
  return cross_entropy_rows_meta(logits);
}

at::Tensor cross_entropy_bwd_meta(const at::Tensor&, const at::Tensor& logits, const at::Tensor&, const at::Tensor&,
                                  int64_t) {
  return at::empty_symint(logits.sym_sizes(), logits.options());
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_fused_meta(at::Tensor& logits, const at::Tensor&, int64_t,
                                                            const std::optional<at::Tensor>&) {
  return cross_entropy_rows_meta(logits);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> swiglu_bwd_meta(const at::Tensor&, const at::Tensor& g,
                                                               const at::Tensor&) {
  return {at::empty_symint(g.sym_sizes(), g.options()), at::empty_symint(g.sym_sizes(), g.options()),
          at::empty_symint(g.sym_sizes(), g.options())};
}

at::Tensor decode_step_meta(const at::Tensor& tokens, const at::Tensor&, const at::Tensor& tok_emb,
                            const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                            const std::optional<at::Tensor>&, const c10::List<std::optional<at::Tensor>>&,
                            at::TensorList, at::TensorList, const at::Tensor&, const std::optional<at::Tensor>&,
                            const at::Tensor& head, double, bool, int64_t) {
  TORCH_CHECK(tokens.dim() == 2 && head.dim() == 2, "fastlm::decode_step: tokens and head must be 2-D, got ",
              tokens.dim(), "-D and ", head.dim(), "-D");
  return at::empty_symint({tokens.sym_size(0), tokens.sym_size(1), head.sym_size(0)}, tok_emb.options());
}

}  // namespace

TORCH_LIBRARY(fastlm, m) {
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, bool causal, float softmax_scale, int window_left, "
        "int window_right) -> (Tensor, Tensor)");
  m.def("attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? dlse, "
        "bool causal, float softmax_scale, int window_left, int window_right) -> (Tensor, Tensor, Tensor)");
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_seqlens, float softmax_scale, "
        "int window_left=-1) -> Tensor");
  m.def("linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("mlp_gelu(Tensor x, Tensor w_fc, Tensor? b_fc, Tensor w_proj, Tensor? b_proj, Tensor? residual) -> Tensor");
  m.def("mlp_swiglu(Tensor x, Tensor w_gate, Tensor w_up, Tensor w_down, Tensor? residual) -> Tensor");
  m.def("gelu_bwd(Tensor dh, Tensor a) -> (Tensor da, Tensor h)");
  m.def("swiglu_bwd(Tensor dh, Tensor g, Tensor u) -> (Tensor dg, Tensor du, Tensor h)");
  m.def("cross_entropy_fwd(Tensor logits, Tensor targets, int ignore_index) -> (Tensor loss, Tensor lse)");
  m.def("cross_entropy_bwd(Tensor grad_loss, Tensor logits, Tensor targets, Tensor lse, int ignore_index) -> Tensor");
  m.def("cross_entropy_fused_(Tensor(a!) logits, Tensor targets, int ignore_index, Tensor? grad_scale) "
        "-> (Tensor loss, Tensor lse)");
  m.def("norm_fwd(Tensor x, Tensor? residual, Tensor weight, Tensor? bias, float eps, bool is_rms) "
        "-> (Tensor y, Tensor h)");
  m.def("norm_bwd(Tensor dy, Tensor h, Tensor weight, Tensor? dh, float eps, bool is_rms, bool has_bias) "
        "-> (Tensor dx, Tensor dweight, Tensor dbias)");
  m.def("rope_fwd(Tensor x, Tensor cos, Tensor sin, bool inverse) -> Tensor");
  m.def("decode_step(Tensor tokens, Tensor input_pos, Tensor tok_emb, Tensor? pos_emb, Tensor? rope_cos, "
        "Tensor? rope_sin, Tensor?[] blocks, Tensor(a!)[] k_caches, Tensor(b!)[] v_caches, Tensor norm_w, "
        "Tensor? norm_b, Tensor head, float eps, bool is_rms, int window_left=-1) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastlm, CPU, m) {
  m.impl("attention_fwd", &fastlm_cpu::attention_fwd);
  m.impl("attention_bwd", &fastlm_cpu::attention_bwd);
  m.impl("decode_attention", &fastlm_cpu::decode_attention);
  m.impl("linear", &fastlm_cpu::linear);
  m.impl("mlp_gelu", &fastlm_cpu::mlp_gelu);
  m.impl("mlp_swiglu", &fastlm_cpu::mlp_swiglu);
  m.impl("gelu_bwd", &fastlm_cpu::gelu_bwd);
  m.impl("swiglu_bwd", &fastlm_cpu::swiglu_bwd);
  m.impl("cross_entropy_fwd", &fastlm_cpu::cross_entropy_fwd);
  m.impl("cross_entropy_bwd", &fastlm_cpu::cross_entropy_bwd);
  m.impl("cross_entropy_fused_", &fastlm_cpu::cross_entropy_fused_);
  m.impl("norm_fwd", &fastlm_cpu::norm_fwd);
  m.impl("norm_bwd", &fastlm_cpu::norm_bwd);
  m.impl("rope_fwd", &fastlm_cpu::rope_fwd);
  m.impl("decode_step", &fastlm_cpu::decode_step);
}

TORCH_LIBRARY_IMPL(fastlm, Meta, m) {
#define FASTLM_META(op, kernel)            \
  static constexpr char op##_name[] = #op; \
  m.impl(#op, &Meta<op##_name, &kernel>::call)
  FASTLM_META(attention_fwd, attention_fwd_meta);
  FASTLM_META(attention_bwd, attention_bwd_meta);
  FASTLM_META(decode_attention, decode_attention_meta);
  FASTLM_META(linear, linear_meta);
  FASTLM_META(mlp_gelu, mlp_gelu_meta);
  FASTLM_META(mlp_swiglu, mlp_swiglu_meta);
  FASTLM_META(gelu_bwd, gelu_bwd_meta);
  FASTLM_META(swiglu_bwd, swiglu_bwd_meta);
  FASTLM_META(cross_entropy_fwd, cross_entropy_fwd_meta);
  FASTLM_META(cross_entropy_bwd, cross_entropy_bwd_meta);
  FASTLM_META(cross_entropy_fused_, cross_entropy_fused_meta);
  FASTLM_META(norm_fwd, norm_fwd_meta);
  FASTLM_META(norm_bwd, norm_bwd_meta);
  FASTLM_META(rope_fwd, rope_fwd_meta);
  FASTLM_META(decode_step, decode_step_meta);
#undef FASTLM_META
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastlm C++ operators (registered as torch.ops.fastlm.*)";
#ifdef FASTLM_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  // whether the CUDA kernels include the sm_90a (wgmma) family, which Hopper GPUs run
#if defined(FASTLM_WITH_CUDA) && defined(FASTLM_CUDA_SM90A)
  m.attr("with_sm90a") = true;
#else
  m.attr("with_sm90a") = false;
#endif
  // the vector extensions the CPU kernels were compiled for (setup.py's FASTLM_MARCH), named as
  // fastlm.benchmark.cpu_isa() names the host's: a kernel uses no more than both lists have in common
  pybind11::list isa;
#ifdef __AVX2__
  isa.append("AVX2");
#endif
#ifdef __FMA__
  isa.append("FMA");
#endif
#ifdef __AVX512F__
  isa.append("AVX-512");
#endif
#ifdef FASTLM_BF16_DOT
  isa.append("AVX512-BF16");
#endif
#ifdef FASTLM_AMX
  isa.append("AMX-BF16");
#endif
  m.attr("cpu_isa") = pybind11::tuple(isa);
  m.def("bf16_on_aten", [] { return fastlm_cpu::bf16_on_aten(); },
        "whether the CPU kernels' bf16 matrix products run on ATen's (oneDNN: AMX-BF16 tiles) now, per FASTLM_CPU_BF16 "
        "(auto: where the CPU has AMX-BF16)");
  m.def("amx_enabled", &fastlm_cpu::amx_enabled,
        "whether fastlm's own AMX-BF16 kernels (the bf16 attention forward) run now: built with them, the CPU has "
        "AMX-BF16, the OS grants the tile state, and FASTLM_CPU_AMX (auto|off) allows them");
}
