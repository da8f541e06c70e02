"""Hugging Face interoperability: convert a transformers model into fastlm.Transformer, or put fastlm's ops inside it.

from_hf(model)   GPT2LMHeadModel, LlamaForCausalLM, MistralForCausalLM and Qwen2ForCausalLM (Llama's shapes, Qwen2
                 with q/k/v biases; RoPE default, "linear" or "llama3") -> fastlm.Transformer with the same
                 weights and config. GPT-2's Conv1D weights are (in, out): they are transposed.
to_hf(model)     the way back: a fastlm.Transformer -> GPT2LMHeadModel, LlamaForCausalLM, MistralForCausalLM (a
                 sliding window) or Qwen2ForCausalLM (q/k/v biases), e.g. to save_pretrained a model trained with
                 fastlm (python -m fastlm export).
patch(model)     in place, swaps the forward of each attention, MLP and norm module (RoPE is applied inside the
                 patched attention) for one built on fastlm.ops, and the causal-LM loss for ops.cross_entropy; a
                 training forward with labels runs the LM head inside ops.linear_cross_entropy (no logits held).
unpatch(model)   restores every swapped forward, the attention implementation and the loss exactly.

transformers is imported only when these functions run.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import math
import types

import torch
from torch import nn
from torch.nn import functional as F

from fastlm import ops, reference
from fastlm.backends import BACKENDS
from fastlm.config import ROPE_SCALING_KEYS, Config, is_int, is_real, plain, sliding_window_left
from fastlm.model import Transformer, effective_state_dict, plain_module, unwrapped

_FROM_HF_SUPPORTED = ("GPT2LMHeadModel", "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
_LLAMA_LIKE = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}  # model_type -> transformers class prefix
_PATCH_SUPPORTED = ("gpt2", *_LLAMA_LIKE)
_GELU_TANH = ("gelu_new", "gelu_pytorch_tanh")


# ----------------------------------------------------------------------------------------------------------------------
# from_hf
# ----------------------------------------------------------------------------------------------------------------------

def _unsupported(model, why=""):
    return NotImplementedError(
        f"from_hf supports {', '.join(_FROM_HF_SUPPORTED)}; got {type(model).__name__}"
        f" (model_type {getattr(getattr(model, 'config', None), 'model_type', None)!r}){why}")


def _config_gpt2(hf) -> Config:
    if hf.activation_function not in _GELU_TANH:
        raise NotImplementedError(f"from_hf: GPT-2 activation {hf.activation_function!r} is not supported "
                                  f"(fastlm's MLP uses the tanh GELU: {', '.join(_GELU_TANH)})")
    if not hf.scale_attn_weights or hf.scale_attn_by_inverse_layer_idx or hf.add_cross_attention:
        raise NotImplementedError("from_hf: GPT-2 with scale_attn_weights=False, scale_attn_by_inverse_layer_idx "
                                  "or cross-attention is not supported")
    return Config(name="hf-gpt2", family="gpt2", vocab_size=hf.vocab_size, n_layer=hf.n_layer, n_head=hf.n_head,
                  d_model=hf.n_embd, intermediate_size=hf.n_inner or 4 * hf.n_embd, max_seqlen=hf.n_positions,
                  norm_eps=hf.layer_norm_epsilon, tie_embeddings=bool(hf.tie_word_embeddings))


def _config_llama(hf, qkv_bias: bool = False) -> Config:
    """Llama's shapes: Llama and Mistral, or Qwen2 (qkv_bias: biases on the q/k/v projections)."""
    name = hf.model_type
    if hf.hidden_act != "silu":
        raise NotImplementedError(f"from_hf: {name} activation {hf.hidden_act!r} is not supported (SwiGLU uses silu)")
    if getattr(hf, "attention_bias", False) or getattr(hf, "mlp_bias", False):
        raise NotImplementedError(f"from_hf: {name} with attention_bias or mlp_bias is not supported (fastlm's "
                                  f"llama family has no biases)")
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    # transformers >= 5: rope_parameters (with rope_theta); 4.x: rope_scaling ("rope_type", formerly "type")
    rope = getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default" and kind not in ROPE_SCALING_KEYS:
        raise NotImplementedError(f"from_hf: RoPE type {kind!r} is not supported (only 'default', "
                                  f"{', '.join(repr(k) for k in ROPE_SCALING_KEYS)})")
    scaling = None if kind == "default" else {"rope_type": kind, **{k: rope[k] for k in ROPE_SCALING_KEYS[kind]}}
    # a sliding window in every layer (Mistral; Qwen2 with use_sliding_window from layer 0 on), or in none; Llama
    # has none: transformers ignores a sliding_window entry in a Llama config (one left by a conversion)
    window = getattr(hf, "sliding_window", None) if getattr(hf, "use_sliding_window", True) else None
    if name == "llama":
        window = None
    layer_types = getattr(hf, "layer_types", None)
    if layer_types is None and getattr(hf, "use_sliding_window", False):   # transformers 4.x Qwen2: from a layer on
        first = getattr(hf, "max_window_layers", 0)
        layer_types = ["sliding_attention" if i >= first else "full_attention" for i in range(hf.num_hidden_layers)]
    if window is not None and layer_types is not None:
        sliding = [t == "sliding_attention" for t in layer_types]
        if any(sliding) and not all(sliding):
            raise NotImplementedError(f"from_hf: {name} with sliding-window attention in some layers only "
                                      f"(layer_types {layer_types}) is not supported; fastlm's sliding_window "
                                      f"applies to every layer")
        window = window if all(sliding) else None
    if window is not None and window >= hf.max_position_embeddings:
        window = None                                       # it reaches every key
    theta = rope.get("rope_theta", getattr(hf, "rope_theta", 10000.0))
    if not is_real(theta) or not 0 < theta < math.inf:
        raise ValueError(f"{name} rope_theta must be a positive finite number, got {theta!r}")
    return Config(name=f"hf-{name}", family="llama", vocab_size=hf.vocab_size, n_layer=hf.num_hidden_layers,
                  n_head=hf.num_attention_heads, n_kv_head=hf.num_key_value_heads or hf.num_attention_heads,
                  d_model=hf.hidden_size, intermediate_size=hf.intermediate_size,
                  max_seqlen=hf.max_position_embeddings, norm_eps=hf.rms_norm_eps,
                  rope_base=float(theta), rope_scaling=scaling,
                  tie_embeddings=bool(hf.tie_word_embeddings), qkv_bias=qkv_bias, head_dim=head_dim,
                  sliding_window=window)


# Parameter names: (transformers name, fastlm name) pairs. GPT-2's Conv1D weights are (in, out) — transposed — and
# its c_attn holds q, k and v side by side (split / joined by the state functions).
_LLAMA_NAMES = (("input_layernorm", "attn_norm"), ("post_attention_layernorm", "mlp_norm"),
                ("self_attn.q_proj", "attn.wq"), ("self_attn.k_proj", "attn.wk"), ("self_attn.v_proj", "attn.wv"),
                ("self_attn.o_proj", "attn.wo"), ("mlp.gate_proj", "mlp.w_gate"), ("mlp.up_proj", "mlp.w_up"),
                ("mlp.down_proj", "mlp.w_down"))
_GPT2_TRANSPOSED = (("attn.c_proj", "attn.wo"), ("mlp.c_fc", "mlp.w_fc"), ("mlp.c_proj", "mlp.w_proj"))
_GPT2_NORMS = (("ln_1", "attn_norm"), ("ln_2", "mlp_norm"))


def _pairs_gpt2(config):
    """(transformers, fastlm) names of the tensors that map one to one (Conv1D weights transposed: the third item)."""
    pairs = [("transformer.wte.weight", "tok_emb.weight", False), ("transformer.wpe.weight", "pos_emb.weight", False),
             ("transformer.ln_f.weight", "norm.weight", False), ("transformer.ln_f.bias", "norm.bias", False)]
    for i in range(config.n_layer):
        p, q = f"transformer.h.{i}.", f"layers.{i}."
        for src, dst in _GPT2_TRANSPOSED:
            pairs += [(p + src + ".weight", q + dst + ".weight", True), (p + src + ".bias", q + dst + ".bias", False)]
        for src, dst in _GPT2_NORMS:
            pairs += [(p + src + ".weight", q + dst + ".weight", False), (p + src + ".bias", q + dst + ".bias", False)]
    if not config.tie_embeddings:
        pairs.append(("lm_head.weight", "lm_head.weight", False))
    return pairs


def _pairs_llama(config):
    pairs = [("model.embed_tokens.weight", "tok_emb.weight", False), ("model.norm.weight", "norm.weight", False)]
    for i in range(config.n_layer):
        for src, dst in _LLAMA_NAMES:
            pairs.append((f"model.layers.{i}.{src}.weight", f"layers.{i}.{dst}.weight", False))
        if config.qkv_bias:
            pairs += [(f"model.layers.{i}.{src}.bias", f"layers.{i}.{dst}.bias", False)
                      for src, dst in _LLAMA_NAMES[2:5]]
    if not config.tie_embeddings:
        pairs.append(("lm_head.weight", "lm_head.weight", False))
    return pairs


def _state_from_hf(sd, config):
    """fastlm's state dict from a transformers one."""
    gpt2 = config.family == "gpt2"
    out = {f: sd[h].t() if t else sd[h] for h, f, t in (_pairs_gpt2 if gpt2 else _pairs_llama)(config)}
    if gpt2:
        d = config.d_model
        for i in range(config.n_layer):
            w_qkv, b_qkv = sd[f"transformer.h.{i}.attn.c_attn.weight"].t(), sd[f"transformer.h.{i}.attn.c_attn.bias"]
            for j, name in enumerate(("wq", "wk", "wv")):
                out[f"layers.{i}.attn.{name}.weight"] = w_qkv[j * d:(j + 1) * d]
                out[f"layers.{i}.attn.{name}.bias"] = b_qkv[j * d:(j + 1) * d]
    return out


def _state_to_hf(sd, config):
    """A transformers state dict from fastlm's."""
    gpt2 = config.family == "gpt2"
    out = {h: sd[f].t() if t else sd[f] for h, f, t in (_pairs_gpt2 if gpt2 else _pairs_llama)(config)}
    if gpt2:
        for i in range(config.n_layer):
            q, p = f"layers.{i}.attn.", f"transformer.h.{i}.attn.c_attn."
            out[p + "weight"] = torch.cat([sd[q + n + ".weight"] for n in ("wq", "wk", "wv")]).t()
            out[p + "bias"] = torch.cat([sd[q + n + ".bias"] for n in ("wq", "wk", "wv")])
    return out


_SIZE_FIELDS = {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "n_embd", "n_layer", "n_head", "n_positions", "n_inner",
                "max_position_embeddings"}


def config_from_hf(hf_config) -> Config:
    """The fastlm.Config of a transformers GPT-2, Llama, Mistral or Qwen2 configuration (a PretrainedConfig, or the
    dict of its config.json); others raise NotImplementedError."""
    if isinstance(hf_config, dict):
        import transformers
        fields = dict(hf_config)
        model_type = fields.pop("model_type", None)
        if model_type not in _PATCH_SUPPORTED:
            raise NotImplementedError(f"fastlm reads transformers configurations of model_type "
                                      f"{', '.join(_PATCH_SUPPORTED)}; got {model_type!r}")
        for key in _SIZE_FIELDS & fields.keys():  # (transformers divides by some of these before it validates them)
            if fields[key] is not None and (not is_int(fields[key]) or fields[key] < 1):
                raise ValueError(f"{key} must be a positive integer, got {fields[key]!r}")
        try:
            hf_config = transformers.AutoConfig.for_model(model_type, **fields)
        except Exception as e:  # noqa: BLE001 - transformers' own validation raises several kinds (even ZeroDivision)
            raise ValueError(f"invalid {model_type} configuration: {type(e).__name__}: {e}") from e
    model_type = getattr(hf_config, "model_type", None)
    if model_type == "gpt2":
        return _config_gpt2(hf_config)
    if model_type in _LLAMA_LIKE:
        return _config_llama(hf_config, qkv_bias=model_type == "qwen2")
    raise NotImplementedError(f"fastlm reads transformers configurations of model_type "
                              f"{', '.join(_PATCH_SUPPORTED)}; got {model_type!r}")


def from_hf(hf_model, backend: str = "auto") -> Transformer:
    """A fastlm.Transformer with the weights and configuration of a transformers causal LM (same dtype and device).

    Supported: GPT2LMHeadModel, LlamaForCausalLM, MistralForCausalLM and Qwen2ForCausalLM (a llama with q/k/v
    biases), with a sliding window in every layer or in none. Other architectures raise NotImplementedError."""
    kind = type(hf_model).__name__
    if kind not in _FROM_HF_SUPPORTED:
        raise _unsupported(hf_model)
    gpt2 = kind == "GPT2LMHeadModel"
    config = _config_gpt2(hf_model.config) if gpt2 else _config_llama(hf_model.config,
                                                                      qkv_bias=kind == "Qwen2ForCausalLM")
    weight = hf_model.get_input_embeddings().weight
    head = hf_model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise NotImplementedError(f"from_hf: {kind} with a bias on its LM head is not supported (fastlm's LM head "
                                  f"has none)")
    # tied as the tensors are: the config's tie_word_embeddings no longer says so for a head untied after loading
    config = dataclasses.replace(config, tie_embeddings=head.weight is weight)
    model = Transformer(config, backend=backend).to(device=weight.device, dtype=weight.dtype)
    sd = hf_model.state_dict()
    state = _state_from_hf(sd, config)
    used = {h for h, _, _ in (_pairs_gpt2 if gpt2 else _pairs_llama)(config)} | {
        f"transformer.h.{i}.attn.c_attn.{p}" for i in range(config.n_layer) for p in ("weight", "bias")}
    unused = sorted(set(sd) - used - ({"lm_head.weight"} if config.tie_embeddings else set()))
    if unused:
        raise NotImplementedError(f"from_hf: {kind} has tensors fastlm's model has no place for: {unused[:5]}")
    model.load_state_dict({k: v.contiguous() for k, v in state.items()}, strict=True)
    return model


def _hf_config(config: Config, tokens: dict):
    """The transformers config of a fastlm Config — GPT2Config; LlamaConfig, MistralConfig with a sliding window,
    Qwen2Config for q/k/v biases — with the special token ids ``tokens`` (bos/eos/pad_token_id, None: none)."""
    import transformers
    if config.family == "gpt2":
        if config.head_dim * config.n_head != config.d_model:
            raise NotImplementedError(f"to_hf: GPT-2 has no head_dim apart from n_embd / n_head; got head_dim "
                                      f"{config.head_dim} with d_model {config.d_model} and {config.n_head} heads")
        return transformers.GPT2Config(
            vocab_size=config.vocab_size, n_positions=config.max_seqlen, n_embd=config.d_model, n_layer=config.n_layer,
            n_head=config.n_head, n_inner=config.intermediate_size, activation_function="gelu_new",
            layer_norm_epsilon=config.norm_eps, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            tie_word_embeddings=config.tie_embeddings, **tokens)
    rope = {"rope_type": "default", **(config.rope_scaling or {}), "rope_theta": config.rope_base}
    common = dict(vocab_size=config.vocab_size, hidden_size=config.d_model, intermediate_size=config.intermediate_size,
                  num_hidden_layers=config.n_layer, num_attention_heads=config.n_head,
                  num_key_value_heads=config.n_kv_head, head_dim=config.head_dim,
                  max_position_embeddings=config.max_seqlen, rms_norm_eps=config.norm_eps, rope_parameters=rope,
                  tie_word_embeddings=config.tie_embeddings, hidden_act="silu", **tokens)
    window = config.sliding_window
    if config.qkv_bias:
        return transformers.Qwen2Config(**common, use_sliding_window=window is not None, sliding_window=window,
                                        max_window_layers=0)
    if window is not None:                                  # Llama has no sliding window; Mistral is Llama with one
        return transformers.MistralConfig(**common, sliding_window=window)
    return transformers.LlamaConfig(**common)


def to_hf(model, *, bos_token_id=None, eos_token_id=None, pad_token_id=None):
    """The transformers causal LM (GPT2LMHeadModel; LlamaForCausalLM, MistralForCausalLM with a sliding window, or
    Qwen2ForCausalLM for q/k/v biases) with the weights and configuration of a fastlm.Transformer (or
    fastlm.reference.Transformer), in its dtype and on its device, in eval mode — e.g. to ``save_pretrained`` a model
    trained with fastlm. fastlm's configs name no special tokens: give the tokenizer's here (otherwise the model has
    none, and ``generate`` stops only at max_new_tokens). Needs transformers >= 5."""
    model = unwrapped(model) if isinstance(model, torch.nn.Module) else model
    config = getattr(model, "config", None)
    if not isinstance(model, torch.nn.Module) or not isinstance(config, Config):
        raise TypeError(f"to_hf: model must be a fastlm.Transformer (a module with a fastlm Config), got "
                        f"{type(model).__name__}")
    tokens = {"bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id}
    for name, value in tokens.items():
        if value is not None and not (is_int(value) and 0 <= value < config.vocab_size):
            raise ValueError(f"to_hf: {name} must be None or a token id in [0, {config.vocab_size}), got {value!r}")
    tokens = {name: plain(value) for name, value in tokens.items()}
    import transformers
    if int(transformers.__version__.split(".")[0]) < 5:
        raise RuntimeError(f"to_hf needs transformers >= 5 (its configs take rope_parameters), got "
                           f"{transformers.__version__}")
    try:   # skip the random initialization: every weight is copied in below
        from transformers.initialization import no_init_weights
    except ImportError:
        no_init_weights = contextlib.nullcontext
    weight = model.tok_emb.weight
    with no_init_weights(), torch.device(weight.device):
        hf = transformers.AutoModelForCausalLM.from_config(_hf_config(config, tokens), dtype=weight.dtype)
    state = _state_to_hf(effective_state_dict(model), config)
    if config.tie_embeddings:                               # transformers lists the tied head too
        state["lm_head.weight"] = state["transformer.wte.weight" if config.family == "gpt2" else
                                        "model.embed_tokens.weight"]
    hf.load_state_dict(state, strict=True)
    if config.tie_embeddings:
        hf.tie_weights()
    return hf.eval()


def cli(argv=None) -> int:
    """``python -m fastlm export``: a training checkpoint -> a transformers model directory (save_pretrained)."""
    import argparse
    import json
    import os
    import sys
    parser = argparse.ArgumentParser(prog="python -m fastlm export",
                                     description="Write a checkpoint of `python -m fastlm train` as a transformers "
                                                 "model directory (config.json + model.safetensors), loadable with "
                                                 "AutoModelForCausalLM.from_pretrained.")
    parser.add_argument("--checkpoint", required=True,
                        help="training output directory (holding checkpoint.safetensors) or a .safetensors file")
    parser.add_argument("out", help="directory to write (created if missing; not a training run's directory)")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty directory, replacing the model files of an earlier export "
                             "(weights, index, configs) there")
    for name in ("bos", "eos", "pad"):
        parser.add_argument(f"--{name}-token-id", type=int, default=None,
                            help=f"the tokenizer's {name} token id (default: none)")
    args = parser.parse_args(argv)
    from fastlm.train import CHECKPOINT, load_model
    try:
        if os.path.isfile(args.out):
            raise ValueError(f"{args.out} is a file; the output must be a directory")
        if os.path.exists(os.path.join(args.out, CHECKPOINT)):
            raise ValueError(f"{args.out} holds a training checkpoint ({CHECKPOINT}): write the export elsewhere "
                             f"(its config.json would replace the run's)")
        existing = sorted(os.listdir(args.out)) if os.path.isdir(args.out) else []
        if existing and not args.overwrite:
            raise ValueError(f"{args.out} is not empty ({', '.join(existing[:5])}): export into a new directory, or "
                             f"pass --overwrite to replace the model files there")
        model, meta = load_model(args.checkpoint, backend="torch", device=torch.device("cpu"))
        model = model.to({"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype])
        hf = to_hf(model, bos_token_id=args.bos_token_id, eos_token_id=args.eos_token_id,
                   pad_token_id=args.pad_token_id)
        for name in existing:   # (--overwrite) an earlier export's model files: shards and index would linger
            if name.endswith((".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json")) or name in (
                    "config.json", "generation_config.json"):
                os.remove(os.path.join(args.out, name))
        hf.save_pretrained(args.out)
        if not os.path.exists(os.path.join(args.out, "config.json")):
            raise OSError(f"transformers wrote no config.json into {args.out}")
    except (ValueError, TypeError, FileNotFoundError, RuntimeError, NotImplementedError, ImportError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    spec = json.loads(meta.get("tokenizer", "{}"))
    print(f"wrote {type(hf).__name__} ({model.config.num_params():,} parameters, {args.dtype}, step "
          f"{int(meta.get('step', 0))}) to {args.out}; token ids are those of fastlm's {spec.get('kind', 'byte')} "
          f"tokenizer")
    return 0


# ----------------------------------------------------------------------------------------------------------------------
# patch / unpatch
# ----------------------------------------------------------------------------------------------------------------------

def _plain_window_mask(mask, Sq, Sk, window_left) -> bool:
    """Whether a 4D sdpa mask (B, 1, Sq, Sk) is, in every row of the batch, exactly ops.attention's causal mask with
    the window (window_left, 0) — bottom-right aligned. Reading it costs a host sync, once per mask: transformers
    builds one mask per forward and hands it to every windowed layer, so the answer is kept on the mask tensor (keyed
    by its version, which an in-place change bumps). Under torch.compile it is not read (no graph break): the mask
    then goes to transformers' sdpa path."""
    if torch.compiler.is_compiling() or mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[-2:] != (Sq, Sk):
        return False
    def read():
        keep = reference.attention_mask(Sq, Sk, causal=True, window=(window_left, 0), device=mask.device)  # (Sq, Sk)
        return bool((mask == keep).all())

    if mask.is_inference():            # (an inference tensor has no version counter: read it every time)
        return read()
    answers = mask.__dict__.setdefault("_fastlm_plain_window", {})
    key = (window_left, mask._version)
    if key not in answers:
        answers[key] = read()
    return answers[key]


def _attend(module, q, k, v, attention_mask, dropout, scaling, kwargs, backend, window_left=-1):
    """Attention of q (B, Sq, H, D) against k, v (B, Sk, Hkv, D) under transformers' sdpa mask convention, with a
    sliding window of window_left keys before each query (-1: none).

    A None mask means plain causal: fastlm's op (bottom-right aligned) serves it when Sq == Sk or Sq == 1 (transformers
    returns None for a sliding-window layer only while every key lies within the window). A sliding-window layer's
    mask, which transformers materializes once the keys reach the window, goes to fastlm's op too when it is exactly
    the op's windowed causal mask (no padding). Padding masks, dropout, and a static cache's upper-left prefill go to
    transformers' own sdpa path, with transformers' mask."""
    Sq, Sk = q.shape[1], k.shape[1]
    if dropout != 0.0:
        plain = False
    elif attention_mask is None:
        plain = Sq == Sk or Sq == 1
    else:
        plain = window_left >= 0 and _plain_window_mask(attention_mask, Sq, Sk, window_left)
    if plain:
        return ops.attention(q, k, v, causal=True, window=(window_left, 0), softmax_scale=scaling, backend=backend)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    out, _ = sdpa_attention_forward(module, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attention_mask,
                                    dropout=dropout, scaling=scaling, **kwargs)
    return out                                                                # (B, Sq, H, D)


def _cache_update(cache, k, v, layer_idx, kwargs):
    """transformers' caches hold (B, H, S, D): update with the new k, v (B, S, H, D), return the full k, v in
    (B, S, H, D) (transposed views)."""
    from transformers.cache_utils import EncoderDecoderCache
    if isinstance(cache, EncoderDecoderCache):
        cache = cache.self_attention_cache
    k, v = cache.update(k.transpose(1, 2), v.transpose(1, 2), layer_idx, kwargs=kwargs)
    return k.transpose(1, 2), v.transpose(1, 2)


def _llama_attention(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, *, backend,
                     window_left=-1, **kwargs):
    cache = kwargs.pop("past_key_values", cache)
    B, S, _ = hidden_states.shape
    q = self.q_proj(hidden_states).view(B, S, -1, self.head_dim)              # (B, S, H, D)
    k = self.k_proj(hidden_states).view(B, S, -1, self.head_dim)              # (B, S, Hkv, D)
    v = self.v_proj(hidden_states).view(B, S, -1, self.head_dim)
    cos, sin = position_embeddings                                            # (B or 1, S, D)
    q, k = ops.apply_rope(q, cos, sin, backend=backend), ops.apply_rope(k, cos, sin, backend=backend)
    if cache is not None:
        k, v = _cache_update(cache, k, v, self.layer_idx, kwargs)
    dropout = self.attention_dropout if self.training else 0.0
    y = _attend(self, q, k, v, attention_mask, dropout, self.scaling, kwargs, backend, window_left)
    return self.o_proj(y.reshape(B, S, -1)), None


def _gpt2_attention(self, hidden_states, cache=None, attention_mask=None, encoder_hidden_states=None,
                    encoder_attention_mask=None, output_attentions=False, *, backend, **kwargs):
    cache = kwargs.pop("past_key_values", cache)
    if encoder_hidden_states is not None or output_attentions:
        return type(self).forward(self, hidden_states, cache=cache, attention_mask=attention_mask,
                                  encoder_hidden_states=encoder_hidden_states,
                                  encoder_attention_mask=encoder_attention_mask, output_attentions=output_attentions,
                                  **kwargs)
    B, S, _ = hidden_states.shape
    q, k, v = self.c_attn(hidden_states).split(self.split_size, dim=2)
    q, k, v = (t.view(B, S, -1, self.head_dim) for t in (q, k, v))           # (B, S, H, D)
    if cache is not None:
        k, v = _cache_update(cache, k, v, self.layer_idx, kwargs)
    dropout = self.attn_dropout.p if self.training else 0.0
    y = _attend(self, q, k, v, attention_mask, dropout, self.scaling, kwargs, backend)
    return self.resid_dropout(self.c_proj(y.reshape(B, S, -1))), None


def _llama_mlp(self, x, *, backend):
    if not all(plain_module(m, nn.Linear) and m.bias is None for m in (self.gate_proj, self.up_proj, self.down_proj)):
        return type(self).forward(self, x)
    return ops.mlp_swiglu(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight, backend=backend)


def _gpt2_mlp(self, x, *, backend):
    from transformers.pytorch_utils import Conv1D
    if (self.training and self.dropout.p > 0) or not all(plain_module(m, Conv1D) for m in (self.c_fc, self.c_proj)):
        return type(self).forward(self, x)
    # Conv1D stores (in, out): its transpose is the nn.Linear layout the op takes
    return ops.mlp_gelu(x, self.c_fc.weight.t(), self.c_fc.bias, self.c_proj.weight.t(), self.c_proj.bias,
                        backend=backend)


def _rms_norm(self, x, *, backend):
    return ops.rms_norm(x, self.weight, self.variance_epsilon, backend=backend)


def _layer_norm(self, x, *, backend):
    return ops.layer_norm(x, self.weight, self.bias, self.eps, backend=backend)


def _causal_lm_loss(logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100, shift_labels=None, *,
                    backend, weight=None, **kwargs):
    """transformers' ForCausalLMLoss (labels shifted by one, mean over non-ignored tokens or sum / num_items) with
    ops.cross_entropy, which works in float32 internally without an upcast copy of the logits. With ``weight`` (the
    LM head's), ``logits`` are the final hidden states (transformers passes them under that name) and
    ops.linear_cross_entropy applies the head chunk by chunk, so the (tokens x vocab) logits never exist. One
    difference: a mean over a batch whose labels are all ignore_index is 0 here (ops.cross_entropy), NaN there."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    targets = shift_labels.reshape(-1).to(logits.device)
    reduction = "mean" if num_items_in_batch is None else "sum"
    if weight is None:
        loss = ops.cross_entropy(logits.reshape(-1, vocab_size), targets, ignore_index=ignore_index,
                                 reduction=reduction, backend=backend)
    else:
        loss = ops.linear_cross_entropy(logits.reshape(-1, logits.shape[-1]), weight, targets,
                                        ignore_index=ignore_index, reduction=reduction, backend=backend)
    if num_items_in_batch is None:
        return loss
    # (no labelled token in the whole step: the sum is 0, and so is the loss; no host sync for a tensor count)
    if torch.is_tensor(num_items_in_batch):
        return loss / num_items_in_batch.to(loss.device).clamp(min=1)
    return loss / max(num_items_in_batch, 1)


def _fused_head_forward(self, *args, backend, **kwargs):
    """A patched causal LM's forward. Training with labels: the LM head passes the hidden states through and the
    loss applies it inside ops.linear_cross_entropy, so the logits are never materialized; the output then has
    logits None (as Liger-Kernel's patched models). Otherwise transformers' own forward: in eval, without labels,
    under torch.compile, and where the LM head or the loss is not the plain one (an adapter or a hook on the head,
    a loss function set after patch())."""
    state = self._fastlm_patch
    previous = state["model_forward"]                # a forward set on the instance before patch(), e.g. a hook
    original = previous if previous is not None else functools.partial(type(self).forward, self)
    head = self.lm_head
    if not (self.training and kwargs.get("labels") is not None and plain_module(head, nn.Linear) and head.bias is None
            and self.__dict__.get("_loss_function") is state["loss_function"]
            and not torch.compiler.is_compiling()):
        return original(*args, **kwargs)
    return_dict = kwargs.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    loss_function = self.loss_function
    head.forward = _identity
    self.loss_function = functools.partial(_causal_lm_loss, weight=head.weight, backend=backend)
    try:
        out = original(*args, return_dict=True, **kwargs)
    finally:
        del head.forward
        self.loss_function = loss_function
    out = type(out)(**{k: v for k, v in out.items() if k != "logits"})   # logits None (they hold the hidden states)
    return out if return_dict else out.to_tuple()          # a tuple without the logits, as to_tuple drops None


def _refuse_output_attentions(model, args, kwargs):
    """A patched model whose attention was transformers' eager one (which returns the probabilities): a call that asks
    for them (output_attentions) is an error, where it would get none (fastlm's attention never forms them)."""
    if kwargs.get("output_attentions", getattr(model.config, "output_attentions", False)):
        raise ValueError("output_attentions=True: the patched attention (fastlm's fused op) never forms the attention "
                         "probabilities; unpatch(model) for this call's outputs")


def _fused_head_method(model, backend):
    """model.forward replaced by _fused_head_forward, under the original's signature: transformers reads it (generate
    builds position_ids from the attention mask only for a forward that takes them, the Trainer keeps the dataset
    columns it names, logits_to_keep is passed only where it is a parameter). A method bound to the model, so that
    a copy of the model (copy.deepcopy) runs its own weights."""
    @functools.wraps(type(model).forward)                         # (self, input_ids, ...): bound, without self
    def forward(self, *args, **kwargs):
        return _fused_head_forward(self, *args, backend=backend, **kwargs)
    return types.MethodType(forward, model)


def _identity(x):
    return x


def _patch_plan(model, model_type):
    """(module, new forward) pairs for every module patch() swaps."""
    plan = []
    if model_type in _LLAMA_LIKE:
        prefix = _LLAMA_LIKE[model_type]
        modeling = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
        attn_cls, mlp_cls, norm_cls = (getattr(modeling, prefix + n) for n in ("Attention", "MLP", "RMSNorm"))
        cfg = model.config
        swiglu = cfg.hidden_act == "silu" and not getattr(cfg, "mlp_bias", False)
        for m in model.modules():
            if isinstance(m, attn_cls):
                # each layer its own window: Qwen2's modules carry theirs (None in full-attention layers of a model
                # with layer_types), Mistral's take the config's; Llama's have none (as in _config_llama)
                window = None if model_type == "llama" else getattr(m, "sliding_window",
                                                                     getattr(cfg, "sliding_window", None))
                # transformers' masking_utils.sliding_window_overlay keeps kv_idx > q_idx - W: a query sees itself
                # and the W - 1 keys before it, as fastlm's Config.sliding_window does
                plan.append((m, functools.partial(_llama_attention, window_left=sliding_window_left(window))))
            elif isinstance(m, mlp_cls) and swiglu:
                plan.append((m, _llama_mlp))
            elif isinstance(m, norm_cls):
                plan.append((m, _rms_norm))
    else:
        from transformers.models.gpt2.modeling_gpt2 import GPT2MLP, GPT2Attention
        cfg = model.config
        gelu_tanh = cfg.activation_function in _GELU_TANH
        for m in model.modules():
            if isinstance(m, GPT2Attention) and not m.is_cross_attention and not (
                    m.reorder_and_upcast_attn and cfg._attn_implementation == "eager"):
                plan.append((m, _gpt2_attention))
            elif isinstance(m, GPT2MLP) and gelu_tanh:
                plan.append((m, _gpt2_mlp))
            elif isinstance(m, nn.LayerNorm) and m.elementwise_affine and m.bias is not None \
                    and len(m.normalized_shape) == 1:
                plan.append((m, _layer_norm))
    return plan


def patch(model, backend: str = "auto", fused_linear_cross_entropy: bool = True):
    """Put fastlm's ops inside a transformers GPT-2, Llama, Mistral or Qwen2 model, in place, and return it.

    Attention (with RoPE for the Llama-like ones, and each layer's sliding window), MLP and norm modules get a
    forward built on fastlm.ops; in the causal LMs (GPT2LMHeadModel, LlamaForCausalLM, MistralForCausalLM,
    Qwen2ForCausalLM) the loss uses ops.cross_entropy, and with
    ``fused_linear_cross_entropy`` a training forward with labels computes the LM head inside
    ops.linear_cross_entropy (the logits are never held; the output's logits are None); a batch whose labels are
    all ignored gets loss 0 where transformers' is NaN. Masks follow
    transformers' sdpa convention while patched, so unpadded causal attention runs in fastlm's kernel and padded
    batches, dropout or attention weights fall back to transformers' sdpa path. (transformers materializes a
    sliding-window layer's mask once the keys reach the window; the patched layers read it to tell a plain window
    from padding, one host sync per forward.)
    Modules that are not plain run transformers' own forward: an MLP whose projections are wrapped (LoRA adapters)
    or hooked, an LM head so (then the training forward returns logits), and a module that already had a forward of
    its own on the instance (an offloading hook) is left as it is; so is the training forward under torch.compile or
    with a loss function set after patching. Attention runs in transformers' sdpa mode, which never forms the
    attention weights: output_attentions gives none, as for transformers' sdpa models, and a model whose attention
    was transformers' eager one refuses output_attentions=True (ValueError) until unpatched. A patched model
    deep-copies (its copy runs its own weights) but does not pickle: save_pretrained it, or unpatch it first.
    ``backend`` is passed to every op. Patching a patched model does nothing. unpatch(model) restores it."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not isinstance(fused_linear_cross_entropy, bool):
        raise TypeError(f"fused_linear_cross_entropy must be a bool, got {fused_linear_cross_entropy!r}")
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if not isinstance(model, nn.Module) or model_type not in _PATCH_SUPPORTED:
        raise NotImplementedError(f"patch supports transformers GPT-2, Llama, Mistral and Qwen2 models (model_type "
                                  f"{' / '.join(map(repr, _PATCH_SUPPORTED))}); got {type(model).__name__} "
                                  f"(model_type {model_type!r})")
    if getattr(model, "_fastlm_patch", None) is not None:
        return model
    forwards = []
    # a module whose instance already has a forward of its own (an offloading or other hook) keeps it
    plan = [(m, fn) for m, fn in _patch_plan(model, model_type) if "forward" not in m.__dict__]
    for module, fn in plan:
        forwards.append((module, None))
        module.forward = types.MethodType(functools.partial(fn, backend=backend), module)
    state = {"forwards": forwards, "attn_implementation": config._attn_implementation, "loss": None,
             "loss_function": None, "model_forward": None}
    if any(fn.func is _llama_attention if isinstance(fn, functools.partial) else fn is _gpt2_attention
           for _, fn in plan):                   # the patched attention reads sdpa's masks (None: causal)
        config._attn_implementation = "sdpa"
    model._fastlm_patch = state
    if config._attn_implementation == "sdpa" and state["attn_implementation"] != "sdpa":
        state["hook"] = model.register_forward_pre_hook(_refuse_output_attentions, with_kwargs=True)
    # the causal-LM loss and fused head only where the model's forward computes that loss through loss_function
    # (transformers' causal LMs; not e.g. GPT2DoubleHeadsModel, whose own loss reads the LM head's logits)
    if type(model).__name__ in _FROM_HF_SUPPORTED and type(model).__module__.startswith("transformers."):
        state["loss"] = (model.__dict__.get("_loss_function"),)
        state["loss_function"] = functools.partial(_causal_lm_loss, backend=backend)
        model.loss_function = state["loss_function"]
        if fused_linear_cross_entropy:
            state["model_forward"] = model.__dict__.get("forward")
            forwards.append((model, state["model_forward"]))
            model.forward = _fused_head_method(model, backend)
    return model


def unpatch(model):
    """Undo patch(model): every swapped forward, the attention implementation and the loss. Returns the model."""
    state = getattr(model, "_fastlm_patch", None)
    if state is None:
        return model
    for module, previous in state["forwards"]:
        if previous is None:
            del module.forward
        else:
            module.forward = previous
    model.config._attn_implementation = state["attn_implementation"]
    if "hook" in state:
        state["hook"].remove()
    if state["loss"] is not None and model.__dict__.get("_loss_function") is state["loss_function"]:
        previous, = state["loss"]             # (a loss function set after patch() stays)
        if previous is None:
            del model._loss_function
        else:
            model._loss_function = previous
    del model._fastlm_patch
    return model
