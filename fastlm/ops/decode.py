"""fastlm.ops.decode_attention: a few new queries against a static KV cache (the decode step of generation).

Backends: "torch" (fastlm.reference), "triton" (kernels/decode.py, Flash-Decoding), "cpu" / "cuda" (the C++
extension's torch.ops.fastlm.decode_attention). Forward only: decoding is inference. No backend but "torch" reads
cache_seqlens on the host, so a decode step can be captured in a CUDA graph or compiled with fullgraph=True.
"""
from __future__ import annotations

import math

import torch

from fastlm import backends, reference
from fastlm.ops._checks import KERNEL_DTYPES, check_qkv
NATIVE_OPS = ("decode_attention",)


@torch.library.custom_op("fastlm_triton::decode_attention", mutates_args=())
def _decode_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                             cache_seqlens: torch.Tensor, softmax_scale: float) -> torch.Tensor:
    from fastlm.kernels.decode import decode_attention_fwd
    return decode_attention_fwd(q, k_cache, v_cache, cache_seqlens, softmax_scale)


@_decode_attention_triton.register_fake
def _(q, k_cache, v_cache, cache_seqlens, softmax_scale):
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


def decode_attention(q, k_cache, v_cache, cache_seqlens, *, softmax_scale=None, backend="auto"):
    """Attention of the Sq newest tokens of each sequence against its KV cache.

    q: (B, Sq, H, D); k_cache, v_cache: (B, S_max, Hkv, D), H % Hkv == 0; cache_seqlens: (B,) int32/int64, the number
    of valid cache positions of each sequence, the new tokens' keys and values already written. Query i of sequence b
    sits at position cache_seqlens[b] - Sq + i and sees keys 0..that position. Returns (B, Sq, H, D) in q's dtype; a
    query that sees no key gets 0. Lengths must lie in [0, S_max]: they are not checked on the host (no sync) and the
    kernels clamp them into that range.
    """
    if backend not in backends.BACKENDS:
        raise ValueError(f"decode_attention: backend must be one of {backends.BACKENDS}, got {backend!r}")
    device = q.device if isinstance(q, torch.Tensor) else torch.device("cpu")
    concrete = backends.resolve(backend, device, "decode_attention", native_ops=NATIVE_OPS,
                                dtype=q.dtype if isinstance(q, torch.Tensor) else None)
    _check(q, k_cache, v_cache, cache_seqlens, concrete)
    if softmax_scale is not None and (isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float))):
        raise TypeError(f"decode_attention: softmax_scale must be a number or None, got {softmax_scale!r}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    if q.numel() == 0:
        return q.new_empty(q.shape)
    if concrete == "torch":
        return reference.decode_attention(q, k_cache, v_cache, cache_seqlens, softmax_scale=scale)
    if concrete == "triton":
        return _decode_attention_triton(q, k_cache, v_cache, cache_seqlens, scale)
    return torch.ops.fastlm.decode_attention(q, k_cache, v_cache, cache_seqlens, scale)
