// Host-side checks of the CUDA launchers (csrc/cuda/launchers.h), built with nvcc and run where there may be no GPU
// at all (tests/test_cuda_ext.py::test_cuda_launchers_host_side): every argument check answers with an error that
// says what was wrong, problems without work succeed without touching the device, the split heuristic of decode
// gives its documented figures, and (without a usable GPU) a valid problem fails with an error from the CUDA
// runtime instead of crashing. Prints one line per failed check; exit status 1 if any.
#include <cstdio>
#include <cstdlib>
#include <set>
#include <string>

#include "cuda/launch_utils.cuh"
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

// The launcher's answer for its reference problem changed by `change` (a function of the params).
template <typename Change>
Status attention(Change change) {
  AttentionParams p = attention_problem();
  change(p);
  return attention_fwd(p, nullptr);
}
template <typename Change>
Status decode(Change change) {
  DecodeParams p = decode_problem();
  change(p);
  return decode_attention(p, nullptr);
}
template <typename Change>
Status mlp(Change change, bool swiglu = true) {
  MlpParams p = mlp_problem();
  change(p);
  return swiglu ? mlp_swiglu(p, nullptr) : mlp_gelu(p, nullptr);
}

// argv: the head dims Python believes the kernels are compiled for (fastlm.backends.CUDA_HEAD_DIMS).
int main(int argc, char** argv) {
  const bool gpu = have_gpu();
  std::set<int> head_dims;
  for (int i = 1; i < argc; ++i) head_dims.insert(std::atoi(argv[i]));
  if (head_dims.empty()) {
    std::printf("FAIL: pass the head dims of fastlm.backends.CUDA_HEAD_DIMS as arguments\n");
    return 1;
  }
  for (int d = 0; d <= 512; ++d) {
    if (compiled_head_dim(d) != (head_dims.count(d) == 1)) {
      std::printf("FAIL head dim %d: compiled_head_dim says %d, CUDA_HEAD_DIMS says %d\n", d, compiled_head_dim(d),
                  int(head_dims.count(d)));
      ++failures;
    }
    // the switch that picks the compiled kernels: the same head dims, each to its own instantiation
    const Status s = dispatch_head_dim(d, "dispatch", [&](auto D) {
      return decltype(D)::value == d ? Status::Ok() : Status::Error("instantiation " + std::to_string(D()));
    });
    if (s.ok() != compiled_head_dim(d)) {
      std::printf("FAIL head dim %d: dispatch_head_dim says \"%s\", compiled_head_dim %d\n", d,
                  s.ok() ? "ok" : s.error.c_str(), compiled_head_dim(d));
      ++failures;
    }
  }
  int dev = 0, sms = 132, major = 0;  // 132 SMs when the device cannot be asked
  if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) !=
                                                cudaSuccess)
    sms = 132;
  const bool hopper = cudaGetDevice(&dev) == cudaSuccess &&
                      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess &&
                      major == 9;
  cudaGetLastError();

  expect_error(attention([](auto& p) { p.dtype = DType::kFloat32; }), "fp16/bf16", "attention fp32");
  expect_error(attention([](auto& p) { p.nheads = 3, p.nheads_kv = 2; }), "multiple of nheads_kv", "attention heads");
  expect_error(attention([](auto& p) { p.window_left = -2; }), "window values must be >= -1", "attention window");
  expect_error(attention([](auto& p) { p.k_ss = 60; }), "multiple of 8 elements", "attention stride");
  expect_error(attention([](auto& p) { p.q = buffer + 2; }), "16-byte aligned", "attention alignment");
  expect_error(attention([](auto& p) { p.head_dim = 40; }), "head dims 32, 64, 96, 128, 256; got 40",
               "attention head dim");
  // the head dim is named first: its strides (36, not a multiple of 8) would be refused next
  expect_error(attention([](auto& p) { p.head_dim = 36, p.q_sh = p.k_sh = p.v_sh = p.o_sh = 36; }),
               "head dims 32, 64, 96, 128, 256; got 36", "attention head dim before strides");
  // (a head dim no kernel serves: on a Hopper GPU too, the forced wgmma kernel refuses before any launch)
  expect_error(attention([](auto& p) { p.kernels = KernelFamily::kWgmma, p.head_dim = 40; }),
               "head dims 32, 64, 96, 128, 256; got 40", "attention forced wgmma, head dim");
  if (!hopper)
    expect_error(attention([](auto& p) { p.kernels = KernelFamily::kWgmma; }), "FASTLM_CUDA_KERNELS=wgmma, but",
                 "attention forced wgmma");
  expect_error(attention([](auto& p) { p.k = nullptr; }), "q, k, v, out and lse must be set", "attention null k");
  expect_error(attention([](auto& p) { p.lse = nullptr; }), "q, k, v, out and lse must be set", "attention null lse");
  expect_error(attention([](auto& p) { p.seqlen_q = 1 << 29, p.seqlen_k = (1 << 29) + 1; }),
               "seqlen_q + seqlen_k must be <= 2^30", "attention positions past int");
  expect_ok(attention([](auto& p) { p.batch = 0; }), "attention empty batch");
  expect_ok(attention([](auto& p) { p.seqlen_q = 0; }), "attention no queries");
  if (!gpu) {
    expect_runtime_error(attention([](auto&) {}), "attention launch");
    expect_runtime_error(attention([](auto& p) { p.kernels = KernelFamily::kAuto; }), "attention launch (auto)");
  }

  // ~16 warps per SM, >= 4 tiles per split, <= 1024 splits
  expect_eq(decode_num_splits(1, 1, 32, 8, 131072), 16 * sms / 8, "splits: B1 Hkv8 128k");
  expect_eq(decode_num_splits(1, 1, 32, 8, 100), 2, "splits: a short cache");
  expect_eq(decode_num_splits(1, 1, 1, 1, 1 << 30), 1024, "splits: capped");
  expect_eq(decode_num_splits(1024, 1, 8, 8, 4096), 1, "splits: a big batch");
  expect_eq(decode_workspace_floats(2, 3, 4, 5, 64), 2 * 3 * 4 * 5 * 66, "workspace floats");
  expect_error(decode([](auto& p) { p.window_left = -5; }), "window_left must be >= -1 (-1: no window), got -5",
               "decode window");
  expect_error(decode([](auto& p) { p.dtype = DType::kFloat32; }), "fp16/bf16", "decode fp32");
  expect_error(decode([](auto& p) { p.num_splits = 0; }), "num_splits >= 1", "decode splits");
  expect_error(decode([](auto& p) { p.k_sh = 4; }), "multiple of 8 elements", "decode stride");
  expect_error(decode([](auto& p) { p.head_dim = 36, p.q_sh = p.k_sh = p.v_sh = 36; }),
               "decode_attention: CUDA kernels support head dims 32, 64, 96, 128, 256; got 36", "decode head dim");
  expect_error(decode([](auto& p) { p.cache_seqlens = nullptr; }), "cache_seqlens, out and the workspace must be set",
               "decode null lengths");
  expect_error(decode([](auto& p) { p.num_splits = 65536; }), "num_splits must be <= 65535", "decode too many splits");
  expect_error(decode([](auto& p) { p.seqlen_q = 65535 * 8 + 1; }), "<= 65535 * 16 query rows per kv head, got 1048562",
               "decode rows per kv head");
  expect_ok(decode([](auto& p) { p.batch = 0; }), "decode empty batch");
  if (!gpu) expect_runtime_error(decode([](auto&) {}), "decode launch");

  expect_error(mlp([](auto& p) { p.d_model = 60; }), "multiples of 8, got 60 and 128", "mlp d_model");
  expect_error(mlp([](auto& p) { p.w1b = nullptr; }), "non-null and 16-byte aligned", "mlp w_up missing");
  expect_error(mlp([](auto& p) { p.dtype = DType::kFloat32; }, false), "fp16/bf16", "mlp fp32");
  expect_ok(mlp([](auto& p) { p.rows = 0, p.x = p.hidden = p.out = nullptr; }, false), "mlp no rows (null buffers)");
  expect_error(mlp([](auto& p) { p.rows = 65535 * 128 + 1; }),
               "too many rows for one launch (at most 65535 * 128), got 8388481", "mlp rows past the grid");
  if (!gpu) {  // which kernel a valid problem takes shows in how its launch fails without a device
    expect_error(mlp([](auto& p) { p.rows = 8; }), "mlp_swiglu (gemv): launch failed", "mlp launch (8 rows: gemv)");
    expect_error(mlp([](auto& p) { p.rows = 9; }), "mlp_swiglu: cannot reserve", "mlp launch (9 rows: tensor cores)");
  }
  // the kernel family applies to the tensor-core GEMMs, from 9 rows on
  if (!hopper)
    expect_error(mlp([](auto& p) { p.kernels = KernelFamily::kWgmma, p.rows = 9; }, false),
                 "mlp_gelu: FASTLM_CUDA_KERNELS=wgmma, but", "mlp forced wgmma");

  std::printf("%s: %d failed check(s)\n", failures ? "FAILED" : "ok", failures);
  return failures ? 1 : 0;
}
