// Host-side checks of the CUDA launchers (csrc/cuda/launchers.h), built with nvcc and run where there may be no GPU
// at all (tests/test_cuda_ext.py::test_cuda_launchers_host_side): every argument check answers with an error that
// says what was wrong, problems without work succeed without touching the device, the split heuristic of decode
// gives its documented figures, and (without a usable GPU) a valid problem fails with an error from the CUDA
// runtime instead of crashing. Prints one line per failed check; exit status 1 if any.
#include <cstdio>
#include <string>

#include "cuda/launchers.h"

using namespace fastlm_cuda;

namespace {

int failures = 0;

void expect_error(const Status& s, const std::string& needle, const char* what) {
  if (s.ok() || s.error.find(needle) == std::string::npos) {
    std::printf("FAIL %s: expected an error containing '%s', got '%s'\n", what, needle.c_str(), s.error.c_str());
    ++failures;
  }
}

void expect_ok(const Status& s, const char* what) {
  if (!s.ok()) {
    std::printf("FAIL %s: expected success, got '%s'\n", what, s.error.c_str());
    ++failures;
  }
}

void expect_eq(int64_t got, int64_t want, const char* what) {
  if (got != want) {
    std::printf("FAIL %s: expected %lld, got %lld\n", what, static_cast<long long>(want), static_cast<long long>(got));
    ++failures;
  }
}

// Whether a GPU is usable. With one, valid problems are not launched here (the buffers below are host memory; the
// kernels are tested on the GPU through torch); without, launching them must fail cleanly.
bool have_gpu() {
  int n = 0;
  const bool gpu = cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
  cudaGetLastError();
  return gpu;
}

void expect_runtime_error(const Status& s, const char* what) {
  if (s.ok()) {
    std::printf("FAIL %s: no GPU here, yet the launch reported success\n", what);
    ++failures;
  }
}

alignas(16) unsigned char buffer[1 << 16];  // stands in for device memory: the checks read addresses only

AttentionParams attention_problem() {
  AttentionParams p{};
  p.q = p.k = p.v = buffer;
  p.out = buffer;
  p.lse = reinterpret_cast<float*>(buffer);
  p.q_sb = p.k_sb = p.v_sb = p.o_sb = 4 * 2 * 64;
  p.q_ss = p.k_ss = p.v_ss = p.o_ss = 2 * 64;
  p.q_sh = p.k_sh = p.v_sh = p.o_sh = 64;
  p.batch = 1, p.nheads = 2, p.nheads_kv = 1, p.seqlen_q = 4, p.seqlen_k = 4, p.head_dim = 64;
  p.softmax_scale = 0.125f;
  p.window_left = p.window_right = -1;
  p.dtype = DType::kBFloat16;
  p.kernels = KernelFamily::kMma;
  return p;
}

DecodeParams decode_problem() {
  DecodeParams p{};
  p.q = p.k = p.v = p.cache_seqlens = buffer;
  p.out = buffer;
  p.workspace = reinterpret_cast<float*>(buffer);
  p.q_sb = p.q_ss = 2 * 64, p.q_sh = 64;
  p.k_sb = p.v_sb = 16 * 64, p.k_ss = p.v_ss = 64, p.k_sh = p.v_sh = 64;
  p.batch = 1, p.seqlen_q = 1, p.nheads = 2, p.nheads_kv = 1, p.max_seqlen = 16, p.head_dim = 64, p.num_splits = 1;
  p.softmax_scale = 0.125f;
  p.window_left = -1;
  p.dtype = DType::kFloat16;
  return p;
}

MlpParams mlp_problem() {
  MlpParams p{};
  p.x = p.w1 = p.w1b = p.w2 = buffer;
  p.hidden = p.out = buffer;
  p.rows = 3, p.d_model = 64, p.d_ff = 128;
  p.dtype = DType::kBFloat16;
  p.kernels = KernelFamily::kMma;
  return p;
}

}  // namespace

int main() {
  const bool gpu = have_gpu();
  AttentionParams a = attention_problem();
  a.dtype = DType::kFloat32;
  expect_error(attention_fwd(a, nullptr), "fp16/bf16", "attention fp32");
  a = attention_problem();
  a.nheads = 3, a.nheads_kv = 2;
  expect_error(attention_fwd(a, nullptr), "multiple of nheads_kv", "attention heads");
  a = attention_problem();
  a.window_left = -2;
  expect_error(attention_fwd(a, nullptr), "window values must be >= -1", "attention window");
  a = attention_problem();
  a.k_ss = 60;
  expect_error(attention_fwd(a, nullptr), "multiple of 8 elements", "attention stride");
  a = attention_problem();
  a.q = buffer + 2;
  expect_error(attention_fwd(a, nullptr), "16-byte aligned", "attention alignment");
  a = attention_problem();
  a.head_dim = 40;
  expect_error(attention_fwd(a, nullptr), "head dims 32, 64, 96, 128, 256", "attention head dim");
  a = attention_problem();
  a.kernels = KernelFamily::kWgmma;
  a.head_dim = 32;
  expect_error(attention_fwd(a, nullptr), "FASTLM_CUDA_KERNELS=wgmma, but", "attention forced wgmma");
  a = attention_problem();
  a.batch = 0;
  expect_ok(attention_fwd(a, nullptr), "attention empty batch");
  a = attention_problem();
  a.seqlen_q = 0;
  expect_ok(attention_fwd(a, nullptr), "attention no queries");
  if (!gpu) {
    a = attention_problem();
    expect_runtime_error(attention_fwd(a, nullptr), "attention launch");
    a.kernels = KernelFamily::kAuto;
    expect_runtime_error(attention_fwd(a, nullptr), "attention launch (auto)");
  }

  // ~16 warps per SM (132 SMs when the device cannot be asked), >= 4 tiles per split, <= 1024 splits
  int sms = 132, dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) !=
                                                cudaSuccess)
    sms = 132;
  cudaGetLastError();
  expect_eq(decode_num_splits(1, 1, 32, 8, 131072), 16 * sms / 8, "splits: B1 Hkv8 128k");
  expect_eq(decode_num_splits(1, 1, 32, 8, 100), 2, "splits: a short cache");
  expect_eq(decode_num_splits(1, 1, 1, 1, 1 << 30), 1024, "splits: capped");
  expect_eq(decode_num_splits(1024, 1, 8, 8, 4096), 1, "splits: a big batch");
  expect_eq(decode_workspace_floats(2, 3, 4, 5, 64), 2 * 3 * 4 * 5 * 66, "workspace floats");
  DecodeParams d = decode_problem();
  d.window_left = -5;
  expect_error(decode_attention(d, nullptr), "window_left must be >= -1 (-1: no window), got -5", "decode window");
  d = decode_problem();
  d.dtype = DType::kFloat32;
  expect_error(decode_attention(d, nullptr), "fp16/bf16", "decode fp32");
  d = decode_problem();
  d.num_splits = 0;
  expect_error(decode_attention(d, nullptr), "num_splits >= 1", "decode splits");
  d = decode_problem();
  d.k_sh = 4;
  expect_error(decode_attention(d, nullptr), "multiple of 8 elements", "decode stride");
  d = decode_problem();
  d.batch = 0;
  expect_ok(decode_attention(d, nullptr), "decode empty batch");
  if (!gpu) expect_runtime_error(decode_attention(decode_problem(), nullptr), "decode launch");

  MlpParams m = mlp_problem();
  m.d_model = 60;
  expect_error(mlp_swiglu(m, nullptr), "multiples of 8, got 60 and 128", "mlp d_model");
  m = mlp_problem();
  m.w1b = nullptr;
  expect_error(mlp_swiglu(m, nullptr), "non-null and 16-byte aligned", "mlp w_up missing");
  m = mlp_problem();
  m.dtype = DType::kFloat32;
  expect_error(mlp_gelu(m, nullptr), "fp16/bf16", "mlp fp32");
  m = mlp_problem();
  m.rows = 0;
  expect_ok(mlp_gelu(m, nullptr), "mlp no rows");
  m = mlp_problem();
  if (!gpu) expect_runtime_error(mlp_swiglu(m, nullptr), "mlp launch");
  m.kernels = KernelFamily::kWgmma;
  int major = 0;
  const bool hopper = cudaGetDevice(&dev) == cudaSuccess &&
                      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess &&
                      major == 9;
  cudaGetLastError();
  if (!hopper) expect_error(mlp_gelu(m, nullptr), "mlp_gelu: FASTLM_CUDA_KERNELS=wgmma, but", "mlp forced wgmma");

  std::printf("%s: %d failed check(s)\n", failures ? "FAILED" : "ok", failures);
  return failures ? 1 : 0;
}
