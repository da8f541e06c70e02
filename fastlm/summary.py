"""Model size and compute accounting: parameters, FLOPs, memory and a roofline speed estimate.

Everything is computed from the Config alone (so a 70B-parameter shape costs nothing to summarize); the tests check
the parameter counts against sum(p.numel()) of a model built on the meta device and against published numbers.

Conventions (stated in the printed output too):
  * FLOPs count matmuls only, 2 per multiply-add: the projections, the MLP, the LM head, and attention's
    QK^T and PV (4 * n_head * head_dim per key attended). Norms, RoPE, softmax and activations are left out.
  * A causal sequence of S tokens attends (S + 1) / 2 keys per token on average (kernels skip masked blocks); with
    a sliding window W < S, (W (W + 1) / 2 + (S - W) W) / S, and a decoding step reads W tokens of the KV cache.
  * Training FLOPs = 3 x forward (backward computes the gradient w.r.t. inputs and w.r.t. weights).
  * Training memory assumes mixed precision the way fastlm.train does it: fp32 parameters, fp32 gradients, AdamW
    moments in fp32 (4 + 4 + 8 bytes per parameter) and activations in the compute dtype.
  * Speeds are roofline estimates, time = max(FLOPs / matmul ceiling, bytes / bandwidth), from the device table
    below; real runs reach a fraction of them.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import types

from fastlm.config import is_int

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
_DTYPE_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float": "fp32"}

# Ceilings per device: dense matmul FLOP/s per dtype and memory bandwidth in bytes/s.
DEVICES = {
    "h200": {
        "label": "NVIDIA H200 (measured: bf16/fp16 matmul ~790 TFLOP/s through PyTorch, copy ~4.3 TB/s; "
                 "fp32 non-tensor-core ~67 TFLOP/s datasheet)",
        "flops": {"bf16": 790e12, "fp16": 790e12, "fp32": 67e12},
        "bandwidth": 4.3e12,
    },
    "a100": {
        "label": "NVIDIA A100 SXM 80GB (datasheet: bf16/fp16 312 TFLOP/s, fp32 19.5 TFLOP/s, HBM 2.04 TB/s)",
        "flops": {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12},
        "bandwidth": 2.04e12,
    },
    "cpu": None,   # this machine's CPU, measured on first use (_measure_cpu)
}


@functools.cache
def _measure_cpu() -> dict:
    """The ceilings of this machine's CPU, timed now by the bench's ceiling kernels (benchmark.measure_ceilings, a
    few seconds): fp32 and bf16 GEMM rates, bf16 at the faster of its GEMM and fp32's (fastlm's CPU kernels widen it
    exactly), fp16 at the fp32 rate (widened likewise; its own GEMM is not timed), and the copy bandwidth."""
    import torch

    from fastlm.benchmark import QUICK_CPU, _cpu_model, measure_ceilings
    ceilings = measure_ceilings(torch.device("cpu"), [torch.float32, torch.bfloat16], QUICK_CPU)
    rate = ceilings["compute_flop_per_s"]
    flops = {"fp32": rate["float32"], "bf16": rate["bfloat16"], "fp16": rate["float32"]}
    bandwidth = ceilings["copy_bytes_per_s"]
    return {"label": f"this machine's CPU, {_cpu_model()}, {torch.get_num_threads()} threads (measured now through "
                     f"torch: fp32 GEMM {flops['fp32'] / 1e9:.0f} GFLOP/s, bf16 at {flops['bf16'] / 1e9:.0f} (the "
                     f"faster of its GEMM and fp32's), fp16 at the fp32 rate, copy {bandwidth / 1e9:.1f} GB/s)",
            "flops": flops, "bandwidth": bandwidth}


def _canon_dtype(dtype) -> str:
    name = str(dtype).replace("torch.", "")
    name = _DTYPE_ALIASES.get(name, name)
    if name not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {dtype!r}")
    return name


def _device(name: str) -> dict:
    if not isinstance(name, str) or name not in DEVICES:
        raise ValueError(f"unknown device {name!r}; known devices: {', '.join(DEVICES)}")
    return _measure_cpu() if name == "cpu" else DEVICES[name]


def _config_of(model_or_config):
    from fastlm.config import Config
    if isinstance(model_or_config, str):
        return Config.from_name(model_or_config)
    if isinstance(model_or_config, Config):
        return model_or_config
    cfg = getattr(model_or_config, "config", None)
    if isinstance(cfg, Config):
        return cfg
    for hf_config in (model_or_config, cfg):        # a transformers model or its configuration
        if any(k.__name__.lower() == "pretrainedconfig" for k in type(hf_config).__mro__):
            from fastlm.hf import config_from_hf
            return config_from_hf(hf_config)
    raise TypeError(f"model_or_config must be a fastlm.Config, a preset name, a fastlm or transformers model, or a "
                    f"transformers configuration, got {type(model_or_config).__name__}")


def layer_table(cfg) -> list[dict]:
    """Rows (name, kind, output shape per token, params, matmul FLOPs per token without attention scores), named
    like fastlm.Transformer's modules. One block is listed (``per_block=True``); the model repeats it n_layer times.
    """
    d, V, hd = cfg.d_model, cfg.vocab_size, cfg.head_dim
    H, Hkv, I = cfg.n_head, cfg.n_kv_head, cfg.intermediate_size
    gpt2 = cfg.family == "gpt2"
    b = 1 if cfg.bias else 0
    norm_kind = "LayerNorm" if gpt2 else "RMSNorm"
    norm_params = d + (d if gpt2 else 0)
    q_dim, kv_dim = H * hd, Hkv * hd

    def linear(name, n_in, n_out, kind="Linear", bias=b):
        return (name, kind, n_out, n_in * n_out + bias * n_out, 2 * n_in * n_out)

    qb = 1 if cfg.qkv_bias else 0

    rows = [dict(name="tok_emb", kind="Embedding", shape=d, params=V * d, flops=0, per_block=False)]
    if gpt2:
        rows.append(dict(name="pos_emb", kind="Embedding", shape=d, params=cfg.max_seqlen * d, flops=0,
                         per_block=False))
    block = [("attn_norm", norm_kind, d, norm_params, 0),
             linear("attn.wq", d, q_dim, bias=qb), linear("attn.wk", d, kv_dim, bias=qb),
             linear("attn.wv", d, kv_dim, bias=qb),
             ("attn.core", f"Attention {H}q/{Hkv}kv heads", q_dim, 0, 0),
             linear("attn.wo", q_dim, d),
             ("mlp_norm", norm_kind, d, norm_params, 0)]
    if gpt2:
        block += [linear("mlp.w_fc", d, I, "Linear+GELU"), linear("mlp.w_proj", I, d)]
    else:
        block += [linear("mlp.w_gate", d, I), linear("mlp.w_up", d, I, "Linear, SwiGLU"), linear("mlp.w_down", I, d)]
    rows += [dict(name=f"layers.*.{n}", kind=k, shape=s, params=p, flops=f, per_block=True) for n, k, s, p, f in block]
    rows.append(dict(name="norm", kind=norm_kind, shape=d, params=norm_params, flops=0, per_block=False))
    rows.append(dict(name="lm_head" if not cfg.tie_embeddings else "lm_head (tied to tok_emb)", kind="Linear",
                     shape=V, params=0 if cfg.tie_embeddings else V * d, flops=2 * V * d, per_block=False))
    return rows


def param_counts(cfg) -> dict:
    """total, embedding (token + position tables, and the untied LM head), non_embedding."""
    rows = layer_table(cfg)
    total = sum(r["params"] * (cfg.n_layer if r["per_block"] else 1) for r in rows)
    embedding = cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)
    if cfg.family == "gpt2":
        embedding += cfg.max_seqlen * cfg.d_model
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding}


def forward_flops_per_token(cfg, context: float) -> float:
    """Matmul FLOPs to run one token through the model when it attends ``context`` keys."""
    dense = sum(r["flops"] * (cfg.n_layer if r["per_block"] else 1) for r in layer_table(cfg))
    return dense + 4 * cfg.n_layer * cfg.n_head * cfg.head_dim * context


def kv_cache_bytes_per_token(cfg, dtype="bf16") -> int:
    return 2 * cfg.n_layer * cfg.n_kv_head * cfg.head_dim * DTYPE_BYTES[_canon_dtype(dtype)]


def activation_elements_per_token(cfg) -> int:
    """Elements saved for backward per token (estimate): each matmul input once, the norm inputs, q/k/v and the
    attention output (flash attention: no S x S scores, plus an fp32 log-sum-exp per head), the MLP hidden state(s).
    The fused linear cross-entropy keeps no logits."""
    d, I = cfg.d_model, cfg.intermediate_size
    q_dim, kv_dim = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    attn = d + d + q_dim + 2 * kv_dim + q_dim + cfg.n_head   # norm in, norm out, q, k, v, attn out, lse
    mlp = d + d + (2 * I if cfg.family == "gpt2" else 3 * I)  # norm in, norm out, hidden pre/post activation
    return cfg.n_layer * (attn + mlp) + 2 * d                  # + final norm in/out


def summary(model_or_config, *, batch: int = 1, seqlen: int | None = None, dtype="bf16", device: str = "h200",
            print_table: bool = True) -> dict:
    """Parameters, FLOPs, memory and roofline speeds for a model, a Config or a preset name.

    ``seqlen`` (default and at most: the config's max_seqlen) is the context for the per-token attention FLOPs, the
    sequence length for training and prefill, and the cache length for decode. Returns a nested dict; prints a table too
    unless ``print_table=False``.
    """
    cfg = _config_of(model_or_config)
    dt = _canon_dtype(dtype)
    dev = _device(device)
    seqlen = cfg.max_seqlen if seqlen is None else seqlen
    for name, value in (("batch", batch), ("seqlen", seqlen)):
        if not is_int(value) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    batch, seqlen = int(batch), int(seqlen)
    if seqlen > cfg.max_seqlen:
        raise ValueError(f"seqlen must be at most the model's context max_seqlen={cfg.max_seqlen}, got {seqlen}")
    nbytes = DTYPE_BYTES[dt]
    params = param_counts(cfg)
    rows = layer_table(cfg)

    # keys a token attends: position p sees p + 1 keys, at most sliding_window
    window = cfg.sliding_window or seqlen
    if seqlen <= window:
        causal_ctx = (seqlen + 1) / 2
    else:
        causal_ctx = (window * (window + 1) / 2 + (seqlen - window) * window) / seqlen
    fwd_decode = forward_flops_per_token(cfg, min(seqlen, window))   # the token at position seqlen
    fwd_train = forward_flops_per_token(cfg, causal_ctx)
    train_per_token = 3 * fwd_train
    kv_tok = kv_cache_bytes_per_token(cfg, dt)
    tokens = batch * seqlen

    weights = params["total"] * nbytes
    kv_cache = kv_tok * tokens
    act_inf = batch * (4 * cfg.d_model + 2 * cfg.intermediate_size) * nbytes + batch * cfg.vocab_size * 4
    act_train = activation_elements_per_token(cfg) * tokens * nbytes
    master = params["total"] * 4
    memory = {
        "inference": {"weights": weights, "kv_cache": kv_cache, "activations": act_inf,
                      "total": weights + kv_cache + act_inf},
        "training": {"weights": master, "grads": master, "adamw_states": 2 * master, "activations": act_train,
                     "total": 4 * master + act_train},
        "weights_by_dtype": {k: params["total"] * v for k, v in DTYPE_BYTES.items()},
    }

    peak, bw = dev["flops"][dt], dev["bandwidth"]
    prefill_flops = tokens * fwd_train
    prefill_bytes = weights + kv_cache + tokens * 2 * cfg.d_model * nbytes * cfg.n_layer
    t_prefill = max(prefill_flops / peak, prefill_bytes / bw)
    decode_flops = batch * fwd_decode
    # a decode step reads every weight but the embedding tables, of which it gathers a row per token; the LM head
    # (tied or not) is read whole; and the KV cache of the window's keys
    streamed = (params["non_embedding"] + cfg.vocab_size * cfg.d_model) * nbytes
    decode_bytes = streamed + kv_tok * batch * min(seqlen, window)
    t_decode = max(decode_flops / peak, decode_bytes / bw)
    train_flops = tokens * train_per_token
    # per optimizer step: weights read 3x in compute dtype, fp32 grads written, AdamW reads/writes p, g, m, v
    train_bytes = 3 * weights + master + params["total"] * (4 + 4 + 4 + 8 + 8) + 2 * act_train
    t_train = max(train_flops / peak, train_bytes / bw)
    speed = {
        "device": device, "device_label": dev["label"], "matmul_flops": peak, "bandwidth": bw,
        "prefill_tokens_per_s": tokens / t_prefill, "prefill_bound": _bound(prefill_flops / peak, prefill_bytes / bw),
        "decode_tokens_per_s": batch / t_decode, "decode_bound": _bound(decode_flops / peak, decode_bytes / bw),
        "decode_ms_per_step": t_decode * 1e3,
        "train_tokens_per_s": tokens / t_train, "train_bound": _bound(train_flops / peak, train_bytes / bw),
        "note": "roofline estimates: time = max(FLOPs / matmul ceiling, bytes / bandwidth); prefill computes the "
                "logits of every position, as a forward pass does (generate's prefill only the last one's)",
    }
    result = {
        "name": cfg.name, "family": cfg.family, "batch": batch, "seqlen": seqlen, "dtype": dt,
        "layers": rows, "params": params,
        "flops": {"forward_per_token": fwd_train, "forward_per_token_at_context": fwd_decode,
                  "training_per_token": train_per_token, "attention_context_train": causal_ctx,
                  "note": "matmul FLOPs (2 per multiply-add); training = 3 x forward; causal mean context (S+1)/2 "
                          "(less with a sliding window)"},
        "kv_cache_bytes_per_token": kv_tok, "memory": memory, "speed": speed,
    }
    if print_table:
        print(format_summary(result, cfg))
    return result


def _bound(t_compute, t_memory):
    return "compute" if t_compute >= t_memory else "memory"


def _n(x: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def _bytes(x: float) -> str:
    for unit, scale in (("TiB", 2 ** 40), ("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x:.0f} B"


def _rate(x: float) -> str:
    return f"{_n(x)} tok/s" if x >= 1e3 else f"{x:.1f} tok/s"


def format_summary(s: dict, cfg) -> str:
    w = (34, 26, 14, 16, 16)
    sep = "=" * sum(w)
    out = [f"Model: {s['name']} ({s['family']}), d_model={cfg.d_model}, layers={cfg.n_layer}, heads={cfg.n_head}"
           f"/{cfg.n_kv_head} kv, head_dim={cfg.head_dim}, vocab={cfg.vocab_size}, max_seqlen={cfg.max_seqlen}", sep,
           f"{'Layer':<{w[0]}}{'Type':<{w[1]}}{'Output/token':<{w[2]}}{'Param #':>{w[3]}}{'FLOPs/token':>{w[4]}}",
           sep]
    attn_row = 4 * cfg.n_head * cfg.head_dim * s["flops"]["attention_context_train"]
    block_params = 0
    for r in s["layers"]:
        if r["per_block"] and block_params == 0 and r["name"].endswith("attn_norm"):
            out.append(f"layers.0 .. layers.{cfg.n_layer - 1}  (Block x {cfg.n_layer}, one shown)")
        flops = r["flops"] + (attn_row if r["name"].endswith("attn.core") else 0)
        name = ("  " + r["name"].replace("layers.*.", "")) if r["per_block"] else r["name"]
        shape = f"({r['shape']})"
        out.append(f"{name:<{w[0]}}{r['kind'][:w[1] - 1]:<{w[1]}}{shape:<{w[2]}}{r['params']:>{w[3]},}"
                   f"{_n(flops):>{w[4]}}")
        if r["per_block"]:
            block_params += r["params"]
    out.append(sep)
    p = s["params"]
    f = s["flops"]
    m = s["memory"]
    sp = s["speed"]
    out += [
        f"Params: total {p['total']:,} ({_n(p['total'])}), embedding {p['embedding']:,}, "
        f"non-embedding {p['non_embedding']:,}; per block {block_params:,}",
        f"FLOPs/token (matmuls, batch={s['batch']}, seqlen={s['seqlen']}): forward {_n(f['forward_per_token'])} "
        f"(causal mean context {f['attention_context_train']:.1f}), at context {s['seqlen']} "
        f"{_n(f['forward_per_token_at_context'])}, training {_n(f['training_per_token'])} (3 x forward)",
        f"KV cache: {_bytes(s['kv_cache_bytes_per_token'])}/token in {s['dtype']}",
        "Weights: " + ", ".join(f"{k} {_bytes(v)}" for k, v in m["weights_by_dtype"].items()),
        f"Inference memory ({s['dtype']}, batch {s['batch']} x {s['seqlen']}): "
        f"weights {_bytes(m['inference']['weights'])} + KV cache {_bytes(m['inference']['kv_cache'])}"
        f" + activations of a decode step {_bytes(m['inference']['activations'])}"
        f" = {_bytes(m['inference']['total'])}",
        f"Training memory (fp32 master weights, {s['dtype']} activations): weights {_bytes(m['training']['weights'])}"
        f" + grads {_bytes(m['training']['grads'])} + AdamW {_bytes(m['training']['adamw_states'])}"
        f" + activations {_bytes(m['training']['activations'])} = {_bytes(m['training']['total'])}",
        f"Roofline estimate on {sp['device']}: {sp['device_label']}",
        f"  prefill {_rate(sp['prefill_tokens_per_s'])} ({sp['prefill_bound']}-bound), "
        f"decode {_rate(sp['decode_tokens_per_s'])} = {sp['decode_ms_per_step']:.3g} ms/step "
        f"({sp['decode_bound']}-bound), training {_rate(sp['train_tokens_per_s'])} ({sp['train_bound']}-bound)",
        f"  ({sp['note']}; real runs reach a fraction of these ceilings)",
    ]
    return "\n".join(out)


def cli(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastlm summary",
                                     description="Parameters, FLOPs, memory and a roofline estimate for a preset, a "
                                                 "checkpoint or a transformers model.")
    parser.add_argument("name", help="preset name (see fastlm.config), a checkpoint (directory or .safetensors), "
                                     "a config.json, or a transformers model directory or config.json (GPT-2, Llama, "
                                     "Mistral, Qwen2)")
    parser.add_argument("--seqlen", type=int, default=None,
                        help="context / sequence length (default and at most: max_seqlen)")
    parser.add_argument("--batch", type=int, default=1, help="(default: 1)")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPE_BYTES), help="(default: bf16)")
    parser.add_argument("--device", default="h200",
                        help=f"the roofline's device: one of {', '.join(DEVICES)} (default: h200)")
    args = parser.parse_args(argv)
    try:
        cfg = _resolve_name(args.name)
        summary(cfg, batch=args.batch, seqlen=args.seqlen, dtype=args.dtype, device=args.device)
    except (ValueError, TypeError, KeyError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _resolve_name(name: str):
    from fastlm.config import Config
    if os.path.isdir(name) or name.endswith((".json", ".safetensors")):
        from fastlm.train import load_config
        return load_config(name)
    if os.path.exists(name):
        raise ValueError(f"{name} is a file but not a checkpoint (.safetensors) or a config (.json); expected one of "
                         f"those, a checkpoint or model directory, or a preset name")
    return Config.from_name(name)


__all__ = ["summary", "param_counts", "forward_flops_per_token", "kv_cache_bytes_per_token", "DEVICES"]


class _CallableModule(types.ModuleType):
    """Importing this module (``import fastlm.summary``, ``from fastlm.summary import ...``) makes ``fastlm.summary``
    the module, where ``import fastlm`` alone gives the function: calling the module calls the function, so
    ``fastlm.summary(...)`` works whatever was imported first."""

    def __call__(self, *args, **kwargs):
        return summary(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
