"""fastlm.ops.decode_attention: a few new queries against a static KV cache (the decode step of generation).

Backends: "torch" (fastlm.reference), "triton" (kernels/decode.py, Flash-Decoding), "cpu" / "cuda" (the C++
extension's torch.ops.fastlm.decode_attention). Forward only: decoding is inference (a backward through the kernel
backends raises; "torch" differentiates). No backend reads cache_seqlens on the host, so a decode step can be
captured in a CUDA graph or compiled with fullgraph=True; none reads what the cache holds past the lengths (or
before every query's window), so it may hold anything.

fastlm.ops.decode_step: a whole decoding step of a stack of pre-norm transformer blocks in one call of the C++ CPU
kernels (its only backend): what CUDA graphs do for a GPU step, removing the per-op launch and Python cost.
"""
from __future__ import annotations

import math

import torch

from fastlm import backends, reference
from fastlm.ops._checks import (KERNEL_DTYPES, autocast_matmul, check_eps, check_qkv, check_softmax_scale,
                                check_window_left, fit_head_dim)
NATIVE_OPS = ("decode_attention",)


@torch.library.custom_op("fastlm_triton::decode_attention", mutates_args=())
def _decode_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                             cache_seqlens: torch.Tensor, softmax_scale: float, window_left: int) -> torch.Tensor:
    from fastlm.kernels.decode import decode_attention_fwd
    return decode_attention_fwd(q, k_cache, v_cache, cache_seqlens, softmax_scale, window_left=window_left)


@_decode_attention_triton.register_fake
def _(q, k_cache, v_cache, cache_seqlens, softmax_scale, window_left):
    return q.new_empty(q.shape)


def _check(q, k_cache, v_cache, cache_seqlens, backend):
    check_qkv("decode_attention", q, k_cache, v_cache, k_name="k_cache", v_name="v_cache", seq_name="max_seqlen")
    if not isinstance(cache_seqlens, torch.Tensor):
        raise TypeError(f"decode_attention: cache_seqlens must be a torch.Tensor, got {type(cache_seqlens).__name__}")
    B = q.shape[0]
    allowed = KERNEL_DTYPES + ((torch.float64,) if backend == "torch" else ())
    if q.dtype not in allowed:
        raise TypeError(f"decode_attention: q dtype must be one of {[str(d) for d in allowed]} for backend "
                        f"{backend!r}, got {q.dtype}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype != q.dtype:
            raise TypeError(f"decode_attention: {name} dtype must equal q's dtype {q.dtype}, got {t.dtype}")
    if cache_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"decode_attention: cache_seqlens must be int32 or int64, got {cache_seqlens.dtype}")
    if tuple(cache_seqlens.shape) != (B,):
        raise ValueError(f"decode_attention: cache_seqlens must have shape (batch,) = ({B},), got "
                         f"{tuple(cache_seqlens.shape)}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("cache_seqlens", cache_seqlens)):
        if t.device != q.device:
            raise ValueError(f"decode_attention: {name} must be on q's device {q.device}, got {t.device}")


class _ForwardOnly(torch.autograd.Function):
    """run(q, k_cache, v_cache) for inputs that require grad, with a backward that raises: the kernels have no
    backward (a custom op without an autograd formula would give None gradients, or fail obscurely)."""

    @staticmethod
    def forward(ctx, run, q, k_cache, v_cache):
        return run(q, k_cache, v_cache)

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("decode_attention has no backward with the kernel backends (decoding is inference): run "
                           "it under torch.no_grad(), or with backend='torch' where gradients are wanted")


@autocast_matmul
def decode_attention(q, k_cache, v_cache, cache_seqlens, *, softmax_scale=None, window_left=-1, backend="auto"):
    """Attention of the Sq newest tokens of each sequence against its KV cache.

    q: (B, Sq, H, D); k_cache, v_cache: (B, S_max, Hkv, D), H % Hkv == 0; cache_seqlens: (B,) int32/int64, the number
    of valid cache positions of each sequence, the new tokens' keys and values already written. Query i of sequence b
    sits at position p = cache_seqlens[b] - Sq + i and sees keys 0..p, or p - window_left..p with a sliding window
    (window_left >= 0). Returns (B, Sq, H, D) in q's dtype (under torch.autocast q and the caches are cast to the
    autocast dtype first, the caches copied on every call: keep them in that dtype); a query that sees no key
    gets 0. Lengths must lie in [0, S_max]: they are not checked on the host (no sync) and the kernels clamp them into
    that range.
    """
    device = q.device if isinstance(q, torch.Tensor) else torch.device("cpu")
    concrete = backends.resolve(backend, device, "decode_attention", native_ops=NATIVE_OPS,
                                dtype=q.dtype if isinstance(q, torch.Tensor) else None)
    _check(q, k_cache, v_cache, cache_seqlens, concrete)
    concrete = fit_head_dim("decode_attention", concrete, backend, q.shape[-1])
    check_softmax_scale("decode_attention", softmax_scale)
    check_window_left("decode_attention", window_left)
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    if q.numel() == 0:
        return q.new_empty(q.shape)
    # a window reaching every key is no window (and keeps the kernels' position arithmetic small)
    window_left = -1 if window_left >= k_cache.shape[1] else int(window_left)
    if concrete == "torch":
        return reference.decode_attention(q, k_cache, v_cache, cache_seqlens, softmax_scale=scale,
                                          window_left=window_left)
    if concrete == "triton":
        def run(q, k_cache, v_cache):
            return _decode_attention_triton(q, k_cache, v_cache, cache_seqlens, scale, window_left)
    else:
        def run(q, k_cache, v_cache):
            # the C++ kernels read rows with unit stride along the head dim
            q, k_cache, v_cache = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k_cache, v_cache))
            return torch.ops.fastlm.decode_attention(q, k_cache, v_cache, cache_seqlens, scale, window_left)
    if torch.is_grad_enabled() and (q.requires_grad or k_cache.requires_grad or v_cache.requires_grad):
        return _ForwardOnly.apply(run, q, k_cache, v_cache)
    return run(q, k_cache, v_cache)


DECODE_STEP_SLOTS = ("norm1_weight", "norm1_bias", "wq", "bq", "wk", "bk", "wv", "bv", "wo", "bo", "norm2_weight",
                     "norm2_bias", "w1", "b1", "w_up", "w2", "b2")


def decode_step_backend(backend, device, dtype) -> str | None:
    """The backend that runs decode_step for these arguments, or None when none does ("cpu" is its only one)."""
    if backend not in ("auto", "cpu") or dtype not in KERNEL_DTYPES:
        return None
    try:
        concrete = backends.resolve(backend, device, "decode_step", native_ops=("decode_step",), dtype=dtype)
    except (RuntimeError, ValueError):
        return None
    return concrete if concrete == "cpu" else None


def decode_step(tokens, input_pos, tok_emb, blocks, k_caches, v_caches, norm_weight, head, *, eps, is_rms,
                norm_bias=None, pos_emb=None, rope_cos=None, rope_sin=None, window_left=-1, backend="auto"):
    """One decoding step of a stack of pre-norm transformer blocks in a single call (the C++ extension's
    torch.ops.fastlm.decode_step, CPU tensors): the logits (B, S, vocab) of ``tokens`` (B, S) at positions
    ``input_pos[b] + t``, whose keys and values are written into ``k_caches`` / ``v_caches`` (one (B, max_seqlen,
    Hkv, D) pair per block).

    Per block: y = norm1(h); q, k, v projections (biases optional), RoPE from the rows of the ``rope_cos`` /
    ``rope_sin`` tables (max_seqlen, D) at the positions when given; cache write; decode attention (sliding window
    ``window_left`` as in decode_attention); output
    projection; (y, h) = norm2(a + h); h = mlp(y) + h, SwiGLU when the block has ``w_up``, else GELU-tanh. Then
    norm(h) @ head^T. ``blocks`` is a flat list of len(DECODE_STEP_SLOTS) tensors (or None) per block, in that
    order. The same kernels as op by op (fastlm.Transformer's step), in the same order: the same logits, bit for bit,
    without the per-op Python cost. Positions, ids and shapes are checked (on the CPU that costs no sync).
    """
    device = tokens.device if isinstance(tokens, torch.Tensor) else torch.device("cpu")
    dtype = tok_emb.dtype if isinstance(tok_emb, torch.Tensor) else None
    if decode_step_backend(backend, device, dtype) is None:
        raise RuntimeError(f"decode_step: only the C++ CPU backend implements it (CPU tensors of dtype "
                           f"{[str(d) for d in KERNEL_DTYPES]}, the extension built: {backends.BUILD_HINT}); got "
                           f"backend={backend!r}, {device} tensors of dtype {dtype}")
    check_window_left("decode_step", window_left)
    if not isinstance(is_rms, bool):
        raise TypeError(f"decode_step: is_rms must be a bool (RMSNorm, else LayerNorm), got {is_rms!r}")
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"decode_step: tokens must be a tensor, got {type(tokens).__name__}")
    for name, value in (("blocks", blocks), ("k_caches", k_caches), ("v_caches", v_caches)):
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"decode_step: {name} must be a list of tensors, got {type(value).__name__}")
    check_eps("decode_step", eps)
    # every other tensor argument a tensor (or None where it may be) on tokens' device; entries named only for an
    # error (this runs every decoding step)
    lists = (("input_pos", [input_pos], False), ("tok_emb", [tok_emb], False), ("norm_weight", [norm_weight], False),
             ("head", [head], False), ("norm_bias", [norm_bias], True), ("pos_emb", [pos_emb], True),
             ("rope_cos", [rope_cos], True), ("rope_sin", [rope_sin], True), ("blocks", blocks, True),
             ("k_caches", k_caches, False), ("v_caches", v_caches, False))
    for name, ts, optional in lists:
        for i, t in enumerate(ts):
            if isinstance(t, torch.Tensor) and t.device == device or t is None and optional:
                continue
            if name == "blocks":
                name = f"blocks[{i}] ({DECODE_STEP_SLOTS[i % len(DECODE_STEP_SLOTS)]})"
            elif name.endswith("_caches"):
                name = f"{name}[{i}]"
            if isinstance(t, torch.Tensor):
                raise ValueError(f"decode_step: {name} is on {t.device} but tokens is on {device}")
            raise TypeError(f"decode_step: {name} must be a tensor{' or None' if optional else ''}, got "
                            f"{type(t).__name__}")
    if len(blocks) != len(DECODE_STEP_SLOTS) * len(k_caches):
        raise ValueError(f"decode_step: blocks must hold {len(DECODE_STEP_SLOTS)} entries per block "
                         f"({', '.join(DECODE_STEP_SLOTS)}) for the {len(k_caches)} blocks of k_caches, got "
                         f"{len(blocks)}")
    # a window reaching every cache position is no window (as in decode_attention; it also keeps int64 arguments)
    if k_caches and isinstance(k_caches[0], torch.Tensor) and k_caches[0].dim() >= 2 and \
            window_left >= k_caches[0].shape[1]:
        window_left = -1
    return torch.ops.fastlm.decode_step(tokens, input_pos, tok_emb, pos_emb, rope_cos, rope_sin, blocks, k_caches,
                                        v_caches, norm_weight, norm_bias, head, float(eps), bool(is_rms),
                                        int(window_left))
