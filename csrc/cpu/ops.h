// The CPU implementations of the torch.ops.fastlm operators (schemas in csrc/bindings.cpp). Each checks its
// arguments with TORCH_CHECK (errors name the argument, what was expected and what was given), allocates its
// outputs and runs the kernels of csrc/cpu/<op>.cpp.
#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace fastlm_cpu {

// Softmax attention forward in FlashAttention's layout: q (B, Sq, H, D), k/v (B, Sk, Hkv, D), any strides with a
// contiguous head dim. Returns out (B, Sq, H, D) in q's dtype and lse (B, H, Sq) fp32.
std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 bool causal, double softmax_scale, int64_t window_left,
                                                 int64_t window_right);

// Its backward: dq, dk, dv (q's, k's, v's shapes, contiguous) from dout (and optionally dlse, a gradient of lse) and
// the forward's out and lse, recomputing the probabilities.
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(const at::Tensor& dout, const at::Tensor& q,
                                                             const at::Tensor& k, const at::Tensor& v,
                                                             const at::Tensor& out, const at::Tensor& lse,
                                                             const std::optional<at::Tensor>& dlse, bool causal,
                                                             double softmax_scale, int64_t window_left,
                                                             int64_t window_right);

// A few queries per sequence against a KV cache: q (B, Sq, H, D), caches (B, S_max, Hkv, D), cache_seqlens (B,);
// window_left >= 0: a sliding window (a query at position i sees keys i - window_left .. i), -1: none.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& cache_seqlens, double softmax_scale, int64_t window_left);

// x W^T (+ bias), weight in nn.Linear layout (out_features, in_features).
at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias);

// proj(gelu_tanh(fc(x))) (+ residual); weights in nn.Linear layout.
at::Tensor mlp_gelu(const at::Tensor& x, const at::Tensor& w_fc, const std::optional<at::Tensor>& b_fc,
                    const at::Tensor& w_proj, const std::optional<at::Tensor>& b_proj,
                    const std::optional<at::Tensor>& residual);

// down(silu(gate(x)) * up(x)) (+ residual); weights in nn.Linear layout.
at::Tensor mlp_swiglu(const at::Tensor& x, const at::Tensor& w_gate, const at::Tensor& w_up,
                      const at::Tensor& w_down, const std::optional<at::Tensor>& residual);

// The MLP activations' backward, elementwise in fp32 with one rounding, for the pre-activations and the gradient dh
// of the activation's output: gelu_bwd -> (dh * gelu'(a), gelu(a)); swiglu_bwd -> (dh * u * silu'(g), dh * silu(g),
// silu(g) * u). The second / third outputs are the activation, which the weight gradient of the second GEMM needs.
std::tuple<at::Tensor, at::Tensor> gelu_bwd(const at::Tensor& dh, const at::Tensor& a);
std::tuple<at::Tensor, at::Tensor, at::Tensor> swiglu_bwd(const at::Tensor& dh, const at::Tensor& g,
                                                          const at::Tensor& u);

// Cross-entropy of logits (N, V) (contiguous last dim; fp32/bf16/fp16) against targets (N,) (int64/int32, each in
// [0, V) or equal to ignore_index): cross_entropy_fwd -> per-row (loss, lse), fp32, loss 0 in ignored rows;
// cross_entropy_bwd -> d(sum_i grad_loss[i] loss[i]) / d logits in the logits' dtype, from the forward's lse;
// cross_entropy_fused_ -> (loss, lse), with the gradient (scaled by grad_scale[i], or 1) written over the logits.
std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd(const at::Tensor& logits, const at::Tensor& targets,
                                                     int64_t ignore_index);
at::Tensor cross_entropy_bwd(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& targets,
                             const at::Tensor& lse, int64_t ignore_index);
std::tuple<at::Tensor, at::Tensor> cross_entropy_fused_(at::Tensor& logits, const at::Tensor& targets,
                                                        int64_t ignore_index,
                                                        const std::optional<at::Tensor>& grad_scale);

// LayerNorm (is_rms false) or RMSNorm over the last dim of h = x (+ residual): y = norm(h) * weight (+ bias), fp32
// statistics. Returns (y, h) in x's dtype, h an empty (0,) tensor without a residual; weight and bias may have
// another float dtype than x (bias: weight's).
std::tuple<at::Tensor, at::Tensor> norm_fwd(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                            const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                            double eps, bool is_rms);
// Its backward from the saved h (x without a residual): (dx, dweight, dbias) for the output gradient dy and dh, the
// gradient of the h output (a fused norm's), added to dx; dx in h's dtype, dweight / dbias in weight's (dbias an empty
// (0,) tensor unless has_bias).
std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_bwd(const at::Tensor& dy, const at::Tensor& h,
                                                         const at::Tensor& weight, const std::optional<at::Tensor>& dh,
                                                         double eps, bool is_rms, bool has_bias);

// Rotary embedding, rotate-half convention: x (B, S, H, D) with a contiguous head dim, cos/sin (S, D) or (B, S, D)
// in x's dtype. Returns x cos + rotate_half(x) sin, or with inverse the transposed rotation (contiguous, x's dtype).
at::Tensor rope_fwd(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool inverse);

// One decoding step of a stack of pre-norm transformer blocks (decode_step.cpp): the logits (B, S, vocab) of tokens
// (B, S) at positions input_pos[b] + t, their keys and values written into the caches (B, max_seqlen, Hkv, D);
// window_left as in decode_attention (a sliding window in every block, -1: none).
at::Tensor decode_step(const at::Tensor& tokens, const at::Tensor& input_pos, const at::Tensor& tok_emb,
                       const std::optional<at::Tensor>& pos_emb, const std::optional<at::Tensor>& rope_cos,
                       const std::optional<at::Tensor>& rope_sin, const c10::List<std::optional<at::Tensor>>& blocks,
                       at::TensorList k_caches, at::TensorList v_caches, const at::Tensor& norm_w,
                       const std::optional<at::Tensor>& norm_b, const at::Tensor& head, double eps, bool is_rms,
                       int64_t window_left);

}  // namespace fastlm_cpu
