// Host launchers of the fastlm CUDA kernels. Plain C++ (no torch): raw pointers, element strides, sizes and a
// cudaStream_t. Each launcher checks what its kernel assumes, launches, checks the launch error and returns a
// Status whose message says what was wrong (empty = success).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>

namespace fastlm_cuda {

enum class DType { kFloat32, kFloat16, kBFloat16 };

struct Status {
  std::string error;  // empty on success
  bool ok() const { return error.empty(); }
  static Status Ok() { return {}; }
  static Status Error(std::string msg) { return {std::move(msg)}; }
};

// Which tensor-core kernels run the attention forward and the MLP GEMMs: kAuto takes the sm_90a wgmma kernels where
// they can run (a Hopper GPU, an sm_90a build), otherwise the sm_80 mma.sync kernels;
// kMma always the mma.sync ones; kWgmma the wgmma ones, failing with an error where they cannot run.
enum class KernelFamily { kAuto, kMma, kWgmma };

// The head dims the attention and decode kernels are compiled for (fastlm.backends.CUDA_HEAD_DIMS in Python).
inline bool compiled_head_dim(int head_dim) {
  return head_dim == 32 || head_dim == 64 || head_dim == 96 || head_dim == 128 || head_dim == 256;
}
inline constexpr const char* kCompiledHeadDims = "32, 64, 96, 128, 256";
// The error for any other head dim, naming the launcher `op`.
inline Status head_dim_error(const std::string& op, int head_dim) {
  return Status::Error(op + ": CUDA kernels support head dims " + kCompiledHeadDims + "; got " +
                       std::to_string(head_dim));
}

// Forward attention in FlashAttention's layout. q: (B, Sq, H, D), k/v: (B, Sk, Hkv, D), out like q; strides in
// elements (the head dim is contiguous); lse: (B, H, Sq) fp32 contiguous. Query i sits at key position
// i + Sk - Sq; it sees keys in [pos - window_left, pos + window_right] (-1 = unbounded; causal is right = 0).
// Rows that see no key get out = 0 and lse = -inf. fp16/bf16, head dims 32, 64, 96, 128, 256.
struct AttentionParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  float* lse;
  int64_t q_sb, q_ss, q_sh;
  int64_t k_sb, k_ss, k_sh;
  int64_t v_sb, v_ss, v_sh;
  int64_t o_sb, o_ss, o_sh;
  int batch, nheads, nheads_kv, seqlen_q, seqlen_k, head_dim;
  float softmax_scale;
  int window_left, window_right;
  DType dtype;
  KernelFamily kernels;
};
Status attention_fwd(const AttentionParams& p, cudaStream_t stream);
// Whether the wgmma kernel can run head_dim on the current device (built for sm_90a, a 9.x device, a compiled head
// dim); if not and why is given, *why says what is missing.
bool attention_wgmma_supported(int head_dim, std::string* why);
// The two kernels, after attention_fwd's checks; the wgmma one falls back to the mma.sync one under kAuto where the
// driver refuses a TMA tensor map.
Status attention_fwd_wgmma(const AttentionParams& p, cudaStream_t stream);
Status attention_fwd_mma(const AttentionParams& p, cudaStream_t stream);

// Decode attention (Flash-Decoding). q: (B, Sq, H, D); k/v caches: (B, S_max, Hkv, D); cache_seqlens: (B,) int32
// or int64 on the device, read only by the kernels (clamped to [0, S_max]). Query i of sequence b sits at position
// cache_seqlens[b] - Sq + i and sees keys from position - window_left (-1: from 0) to its position. The work is
// split along the cache into num_splits chunks (decode_num_splits) whose partial results go to `workspace`
// (decode_workspace_floats floats) and are merged by a combine kernel. Every pointer is required (k and v may be
// null for an empty cache, max_seqlen 0); a window_left >= max_seqlen is no window.
struct DecodeParams {
  const void* q;
  const void* k;
  const void* v;
  const void* cache_seqlens;
  bool seqlens_int64;
  void* out;  // (B, Sq, H, D) contiguous
  float* workspace;
  int64_t q_sb, q_ss, q_sh;
  int64_t k_sb, k_ss, k_sh;
  int64_t v_sb, v_ss, v_sh;
  int batch, seqlen_q, nheads, nheads_kv, max_seqlen, head_dim, num_splits;
  float softmax_scale;
  int window_left;
  DType dtype;
};
int decode_num_splits(int batch, int seqlen_q, int nheads, int nheads_kv, int max_seqlen);
int64_t decode_workspace_floats(int batch, int seqlen_q, int nheads, int num_splits, int head_dim);
Status decode_attention(const DecodeParams& p, cudaStream_t stream);

// Fused MLPs on row-major (M, d_model) activations with nn.Linear weights (out_features, in_features).
//   gelu:   out = (gelu_tanh(x w_fc^T + b_fc)) w_proj^T + b_proj + residual
//   swiglu: out = (silu(x w_gate^T) * (x w_up^T)) w_down^T + residual
// Biases and residual may be null. `hidden` is an (M, d_ff) workspace in the input dtype. fp16/bf16; d_model
// and d_ff multiples of 8; all pointers 16-byte aligned (any may be null when M = 0), all matrices contiguous.
// At most 8 rows run a CUDA-core kernel whatever `kernels` says; the family applies to the tensor-core GEMMs.
struct MlpParams {
  const void* x;
  const void* w1;   // w_fc or w_gate: (d_ff, d_model)
  const void* w1b;  // w_up for swiglu: (d_ff, d_model); null for gelu
  const void* b1;   // b_fc (d_ff) or null
  const void* w2;   // w_proj or w_down: (d_model, d_ff)
  const void* b2;   // b_proj (d_model) or null
  const void* residual;  // (M, d_model) or null
  void* hidden;
  void* out;
  int64_t rows, d_model, d_ff;
  DType dtype;
  KernelFamily kernels;
};
Status mlp_gelu(const MlpParams& p, cudaStream_t stream);
Status mlp_swiglu(const MlpParams& p, cudaStream_t stream);

}  // namespace fastlm_cuda
