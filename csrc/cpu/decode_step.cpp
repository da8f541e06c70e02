// One decoding step of a stack of pre-norm transformer blocks on the CPU, as one call:
//
//     h = emb[tokens] (+ pos_emb[positions])
//     for each block:  y = norm1(h)
//                      q, k, v = y Wq^T + bq, y Wk^T + bk, y Wv^T + bv;  rope(q), rope(k) with the tables' rows
//                      cache[b, pos_b + t] = k, v;  a = decode_attention(q, caches, pos + S, window) Wo^T + bo
//                      (y, h) = norm2(a + h);  h = mlp(y) + h              (gelu MLP, or SwiGLU with w_up)
//     logits = norm(h) W_head^T
//
// Every step is the kernel of the op of the same name in this directory (linear, rope_fwd, decode_attention,
// norm_fwd, mlp_gelu / mlp_swiglu), called in the order of the op-by-op step, so the logits are that step's, bit for
// bit. What one call saves is the cost above the kernels (argument checks and dispatch in Python, about a dozen op
// calls per block): for a 56M-parameter model at batch 1, 4.5-6.5 ms of a 15-18 ms step (bench/dev/cpu_notes.md),
// after which reading the weights is what remains.
//
// The block's tensors arrive in one flat list, kBlockTensors per block (see Slot); absent biases and the SwiGLU
// w_up of a GELU MLP are None. Positions and token ids are on the CPU, so they are checked here, unlike in the
// GPU decode steps.
#include "cpu/layout.h"
#include "cpu/ops.h"

#include <ATen/ops/add.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/index_select.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

namespace fastlm_cpu {
namespace {

// Slots of one block in the flat list.
enum Slot { kNorm1W, kNorm1B, kWq, kBq, kWk, kBk, kWv, kBv, kWo, kBo, kNorm2W, kNorm2B, kW1, kB1, kWUp, kW2, kB2 };
constexpr int64_t kBlockTensors = kB2 + 1;

// pos[b] (+ t) as int64, from an int32 or int64 (B,) tensor.
std::vector<int64_t> read_positions(const at::Tensor& input_pos, int64_t B) {
  TORCH_CHECK(input_pos.device().is_cpu() && input_pos.dim() == 1 && input_pos.size(0) == B &&
                  (input_pos.scalar_type() == at::kInt || input_pos.scalar_type() == at::kLong),
              "fastlm::decode_step: input_pos must be an int32/int64 CPU tensor of shape (", B, ",), got a ",
              input_pos.scalar_type(), " tensor of shape ", input_pos.sizes(), " on ", input_pos.device());
  std::vector<int64_t> pos(B);
  const at::Tensor p = input_pos.to(at::kLong);
  for (int64_t b = 0; b < B; ++b) pos[b] = p.const_data_ptr<int64_t>()[b * p.stride(0)];
  return pos;
}

// cache[b, pos[b] + t, h, :] = x[b, t, h, :] for x (B, S, Hkv, D) contiguous.
void write_cache(at::Tensor& cache, const at::Tensor& x, const std::vector<int64_t>& pos) {
  TORCH_CHECK(x.scalar_type() == cache.scalar_type(), "fastlm::decode_step: keys and values of ", x.scalar_type(),
              " for a ", cache.scalar_type(), " KV cache");
  const int64_t B = x.size(0), S = x.size(1), H = x.size(2), D = x.size(3), bytes = D * x.element_size();
  const char* src = static_cast<const char*>(x.const_data_ptr());
  char* dst = static_cast<char*>(cache.data_ptr());
  const int64_t e = cache.element_size();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < S; ++t)
      for (int64_t h = 0; h < H; ++h)
        std::memcpy(dst + (b * cache.stride(0) + (pos[b] + t) * cache.stride(1) + h * cache.stride(2)) * e,
                    src + ((b * S + t) * H + h) * bytes, bytes);
}

using Blocks = c10::List<std::optional<at::Tensor>>;

std::optional<at::Tensor> slot(const Blocks& blocks, int64_t layer, int s) { return blocks[layer * kBlockTensors + s]; }

at::Tensor required(const Blocks& blocks, int64_t layer, int s, const char* name) {
  const std::optional<at::Tensor> t = blocks[layer * kBlockTensors + s];
  TORCH_CHECK(t.has_value(), "fastlm::decode_step: block ", layer, " has no ", name, " (slot ", s, " of ",
              kBlockTensors, ")");
  return *t;
}

// A weight (rows x cols, cols < 0: a vector of rows) of block `layer` (-1: outside the blocks), when present, in
// tok_emb's dtype `dtype` unless that is nullopt (the norms' weights and biases: norm_fwd takes any float dtype);
// `why` ends the message's expectation.
void check_shape(const std::optional<at::Tensor>& t, int64_t layer, const char* name,
                 std::optional<at::ScalarType> dtype, int64_t rows, int64_t cols, const std::string& why = "") {
  if (!t.has_value()) return;
  const bool ok = cols < 0 ? t->dim() == 1 && t->size(0) == rows
                           : t->dim() == 2 && t->size(0) == rows && t->size(1) == cols;
  const std::string where = layer < 0 ? std::string() : "block " + std::to_string(layer) + "'s ";
  const std::string shape = cols < 0 ? std::to_string(rows) + "," : std::to_string(rows) + ", " + std::to_string(cols);
  TORCH_CHECK(ok, "fastlm::decode_step: ", where, name, " must have shape (", shape, ")", why, ", got ", t->sizes());
  TORCH_CHECK(!dtype || t->scalar_type() == *dtype, "fastlm::decode_step: ", where, name, " must have tok_emb's dtype ",
              *dtype, ", got ", t->scalar_type());
}

// The shapes of block l's tensors for d_model d, n_kv_head Hkv and head_dim D (n_head from wq, the MLP width from
// its first weight), so that a wrong one is named rather than reported by the kernel it reaches.
void check_block(const Blocks& blocks, int64_t l, at::ScalarType dt, int64_t d, int64_t Hkv, int64_t D) {
  const std::string for_d = " for tok_emb's d_model " + std::to_string(d);
  check_shape(required(blocks, l, kNorm1W, "norm1 weight"), l, "norm1 weight", std::nullopt, d, -1, for_d);
  check_shape(required(blocks, l, kNorm2W, "norm2 weight"), l, "norm2 weight", std::nullopt, d, -1, for_d);
  const at::Tensor wq = required(blocks, l, kWq, "wq"), w1 = required(blocks, l, kW1, "w1 (w_fc / w_gate)");
  TORCH_CHECK(wq.dim() == 2 && wq.size(0) % (Hkv * D) == 0 && wq.size(1) == d, "fastlm::decode_step: block ", l,
              "'s wq must have shape (n_head * ", D, ", ", d, "), n_head a multiple of the caches' n_kv_head ", Hkv,
              ", for the caches' head_dim ", D, " and tok_emb's d_model ", d, ", got ", wq.sizes());
  check_shape(wq, l, "wq", dt, wq.size(0), d);
  TORCH_CHECK(w1.dim() == 2 && w1.size(1) == d, "fastlm::decode_step: block ", l,
              "'s w1 (w_fc / w_gate) must have shape (intermediate, ", d, "), got ", w1.sizes());
  check_shape(w1, l, "w1 (w_fc / w_gate)", dt, w1.size(0), d);
  const int64_t q_dim = wq.size(0), kv_dim = Hkv * D, inter = w1.size(0);
  check_shape(slot(blocks, l, kBq), l, "bq", dt, q_dim, -1);
  check_shape(required(blocks, l, kWk, "wk"), l, "wk", dt, kv_dim, d);
  check_shape(slot(blocks, l, kBk), l, "bk", dt, kv_dim, -1);
  check_shape(required(blocks, l, kWv, "wv"), l, "wv", dt, kv_dim, d);
  check_shape(slot(blocks, l, kBv), l, "bv", dt, kv_dim, -1);
  check_shape(required(blocks, l, kWo, "wo"), l, "wo", dt, d, q_dim);
  check_shape(slot(blocks, l, kBo), l, "bo", dt, d, -1);
  check_shape(slot(blocks, l, kNorm1B), l, "norm1 bias", std::nullopt, d, -1);
  check_shape(slot(blocks, l, kNorm2B), l, "norm2 bias", std::nullopt, d, -1);
  check_shape(slot(blocks, l, kB1), l, "b1", dt, inter, -1);
  check_shape(slot(blocks, l, kWUp), l, "w_up", dt, inter, d);
  check_shape(required(blocks, l, kW2, "w2 (w_proj / w_down)"), l, "w2 (w_proj / w_down)", dt, d, inter);
  check_shape(slot(blocks, l, kB2), l, "b2", dt, d, -1);
}

// The caches are written in place: no element of one may alias another element of any cache.
void check_disjoint(at::TensorList k_caches, at::TensorList v_caches) {
  std::vector<std::pair<uintptr_t, uintptr_t>> spans;  // [first byte, one past the last) of each cache
  for (at::TensorList list : {k_caches, v_caches})
    for (const at::Tensor& c : list) {
      TORCH_CHECK(non_overlapping(c),
                  "fastlm::decode_step: the KV caches are written in place, so their elements must not overlap "
                  "(e.g. an expanded tensor), got strides ", c.strides());
      int64_t last = 0;
      for (int64_t i = 0; i < c.dim(); ++i) last += (c.size(i) - 1) * c.stride(i);
      const auto begin = reinterpret_cast<uintptr_t>(c.const_data_ptr());
      spans.emplace_back(begin, begin + (last + 1) * c.element_size());
    }
  std::sort(spans.begin(), spans.end());
  for (size_t i = 1; i < spans.size(); ++i)
    TORCH_CHECK(spans[i].first >= spans[i - 1].second,
                "fastlm::decode_step: the KV caches are written in place, so no two of them may share memory");
}

}  // namespace

at::Tensor decode_step(const at::Tensor& tokens, const at::Tensor& input_pos, const at::Tensor& tok_emb,
                       const std::optional<at::Tensor>& pos_emb, const std::optional<at::Tensor>& rope_cos,
                       const std::optional<at::Tensor>& rope_sin, const Blocks& blocks, at::TensorList k_caches,
                       at::TensorList v_caches,
                       const at::Tensor& norm_w, const std::optional<at::Tensor>& norm_b, const at::Tensor& head,
                       double eps, bool is_rms, int64_t window_left) {
  TORCH_CHECK(tokens.device().is_cpu() && tokens.dim() == 2 &&
                  (tokens.scalar_type() == at::kInt || tokens.scalar_type() == at::kLong),
              "fastlm::decode_step: tokens must be an int32/int64 CPU tensor of shape (batch, seqlen), got a ",
              tokens.scalar_type(), " tensor of shape ", tokens.sizes(), " on ", tokens.device());
  const int64_t B = tokens.size(0), S = tokens.size(1);
  TORCH_CHECK(B >= 1 && S >= 1, "fastlm::decode_step: tokens must have batch >= 1 and seqlen >= 1, got shape ",
              tokens.sizes());
  const int64_t L = static_cast<int64_t>(k_caches.size());
  TORCH_CHECK(L >= 1 && v_caches.size() == k_caches.size() &&
                  static_cast<int64_t>(blocks.size()) == L * kBlockTensors,
              "fastlm::decode_step: need one k_cache and one v_cache per block and ", kBlockTensors,
              " block tensors per block; got ", k_caches.size(), " k_caches, ", v_caches.size(), " v_caches and ",
              blocks.size(), " block tensors");
  TORCH_CHECK(tok_emb.dim() == 2, "fastlm::decode_step: tok_emb must be 2-D (vocab, d_model), got shape ",
              tok_emb.sizes());
  TORCH_CHECK(rope_cos.has_value() == rope_sin.has_value(),
              "fastlm::decode_step: rope_cos and rope_sin must be given together");
  TORCH_CHECK(k_caches[0].dim() == 4 && k_caches[0].size(0) == B, "fastlm::decode_step: the batch of tokens (",
              B, ") must equal the KV caches' batch; block 0's k_cache has shape ", k_caches[0].sizes());
  const int64_t V = tok_emb.size(0), S_max = k_caches[0].size(1);
  for (int64_t l = 0; l < L; ++l) {
    for (const auto* c : {&k_caches[l], &v_caches[l]}) {
      TORCH_CHECK(c->dim() == 4 && c->sizes() == k_caches[0].sizes() && c->size(0) == B && c->stride(3) == 1 &&
                      c->scalar_type() == tok_emb.scalar_type() && c->device().is_cpu(),
                  "fastlm::decode_step: every KV cache must be a CPU ", tok_emb.scalar_type(),
                  " tensor of shape (", B, ", max_seqlen, n_kv_head, head_dim) like block 0's ", k_caches[0].sizes(),
                  " with a contiguous last dim; block ", l, " has ", c->scalar_type(), " ", c->sizes());
    }
  }
  const int64_t Hkv = k_caches[0].size(2), D = k_caches[0].size(3);
  TORCH_CHECK(Hkv >= 1 && D >= 1, "fastlm::decode_step: the KV caches need n_kv_head >= 1 and head_dim >= 1, got ",
              "shape ", k_caches[0].sizes());
  for (const auto* t : {&rope_cos, &rope_sin, &pos_emb}) {
    if (!t->has_value()) continue;
    const char* name = t == &rope_cos ? "rope_cos" : (t == &rope_sin ? "rope_sin" : "pos_emb");
    const int64_t cols = t == &pos_emb ? tok_emb.size(1) : D;
    TORCH_CHECK((*t)->dim() == 2 && (*t)->size(0) >= S_max && (*t)->size(1) == cols, "fastlm::decode_step: ",
                name, " must be a (positions >= ", S_max, " (the caches' max_seqlen), ", cols, ") table, got shape ",
                (*t)->sizes());
    TORCH_CHECK((*t)->scalar_type() == tok_emb.scalar_type(), "fastlm::decode_step: ", name,
                " must have tok_emb's dtype ", tok_emb.scalar_type(), ", got ", (*t)->scalar_type());
  }
  const std::vector<int64_t> pos = read_positions(input_pos, B);
  // (no sum that can overflow: a position near 2^63 must not pass the check and write before the cache). Bad
  // positions and ids are ValueErrors in Python, worded as fastlm.Transformer's op-by-op step words them.
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK_VALUE(pos[b] >= 0 && S <= S_max && pos[b] <= S_max - S, "fastlm::decode_step: input_pos[", b,
                      "] + seqlen = ", pos[b], " + ", S, " must lie in [", S, ", ", S_max,
                      "] (the KV cache's max_seqlen)");
  const at::Tensor ids = tokens.reshape({B * S}).to(at::kLong).contiguous();
  const int64_t* id = ids.const_data_ptr<int64_t>();
  const auto [lo, hi] = std::minmax_element(id, id + B * S);
  TORCH_CHECK_VALUE(*lo >= 0 && *hi < V, "fastlm::decode_step: tokens must be ids in [0, ", V, "), got values in [",
                    *lo, ", ", *hi, "]");
  check_disjoint(k_caches, v_caches);
  const int64_t d = tok_emb.size(1);
  const at::ScalarType dt = tok_emb.scalar_type();
  for (int64_t l = 0; l < L; ++l) check_block(blocks, l, dt, d, Hkv, D);
  check_shape(norm_w, -1, "norm_w", std::nullopt, d, -1);
  check_shape(norm_b, -1, "norm_b", std::nullopt, d, -1);
  TORCH_CHECK(head.dim() == 2 && head.size(1) == d, "fastlm::decode_step: head must have shape (vocab, ", d,
              "), got ", head.sizes());
  check_shape(head, -1, "head", dt, head.size(0), d);
  at::Tensor positions = at::empty({B * S}, ids.options());
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < S; ++t) positions.data_ptr<int64_t>()[b * S + t] = pos[b] + t;
  at::Tensor seqlens = at::empty({B}, ids.options());
  for (int64_t b = 0; b < B; ++b) seqlens.data_ptr<int64_t>()[b] = pos[b] + S;

  at::Tensor h = at::index_select(tok_emb, 0, ids).view({B, S, d});
  if (pos_emb.has_value()) h = at::add(h, at::index_select(*pos_emb, 0, positions).view({B, S, d}));
  at::Tensor cos, sin;
  if (rope_cos.has_value()) {
    cos = at::index_select(*rope_cos, 0, positions).view({B, S, D});
    sin = at::index_select(*rope_sin, 0, positions).view({B, S, D});
  }
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));

  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor y = std::get<0>(norm_fwd(h, std::nullopt, required(blocks, l, kNorm1W, "norm1 weight"),
                                              slot(blocks, l, kNorm1B), eps, is_rms));
    const at::Tensor wq = required(blocks, l, kWq, "wq");
    const int64_t H = wq.size(0) / D;
    at::Tensor q = linear(y, wq, slot(blocks, l, kBq)).view({B, S, H, D});
    at::Tensor k = linear(y, required(blocks, l, kWk, "wk"), slot(blocks, l, kBk)).view({B, S, Hkv, D});
    const at::Tensor v = linear(y, required(blocks, l, kWv, "wv"), slot(blocks, l, kBv)).view({B, S, Hkv, D});
    if (cos.defined()) {
      q = rope_fwd(q, cos, sin, false);
      k = rope_fwd(k, cos, sin, false);
    }
    at::Tensor kc = k_caches[l], vc = v_caches[l];
    write_cache(kc, k, pos);
    write_cache(vc, v, pos);
    const at::Tensor att = decode_attention(q, kc, vc, seqlens, scale, window_left);
    const at::Tensor a = linear(att.view({B, S, H * D}), required(blocks, l, kWo, "wo"), slot(blocks, l, kBo));
    auto [y2, h2] = norm_fwd(a, h, required(blocks, l, kNorm2W, "norm2 weight"), slot(blocks, l, kNorm2B), eps,
                             is_rms);
    const auto w_up = slot(blocks, l, kWUp);
    h = w_up.has_value() ? mlp_swiglu(y2, required(blocks, l, kW1, "w_gate"), *w_up,
                                      required(blocks, l, kW2, "w_down"), h2)
                         : mlp_gelu(y2, required(blocks, l, kW1, "w_fc"), slot(blocks, l, kB1),
                                    required(blocks, l, kW2, "w_proj"), slot(blocks, l, kB2), h2);
  }
  const at::Tensor y = std::get<0>(norm_fwd(h, std::nullopt, norm_w, norm_b, eps, is_rms));
  return linear(y, head, std::nullopt);
}

}  // namespace fastlm_cpu
