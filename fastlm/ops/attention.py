"""fastlm.ops.attention: fused softmax attention in FlashAttention's layout, with backend dispatch and autograd.

Backends: "triton" (kernels/attention.py, forward and backward), "cpu" / "cuda" (the C++ extension's forward,
torch.ops.fastlm.attention_fwd, with the Triton backward on CUDA and the C++ backward torch.ops.fastlm.attention_bwd
on CPU), "torch" (the reference). The Triton path is a torch.library custom op with a fake (meta) implementation
and a registered autograd formula, so it works under torch.compile(fullgraph=True).
"""
from __future__ import annotations

import math
import numbers

import torch

from fastlm import backends, reference
from fastlm.ops._checks import (autocast_matmul, check_qkv, check_softmax_scale, fit_head_dim, first_order_only,
                                needs_grad)

# --------------------------------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------------------------------

def _check(q, k, v, causal, softmax_scale, window, return_lse):
    check_qkv("attention", q, k, v)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"attention: q, k, v must have the same dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"attention: q, k, v must be on the same device, got {q.device}, {k.device}, {v.device}")
    if not isinstance(causal, bool):
        raise TypeError(f"attention: causal must be a bool, got {causal!r} ({type(causal).__module__}."
                        f"{type(causal).__qualname__})")
    if not isinstance(return_lse, bool):
        raise TypeError(f"attention: return_lse must be a bool, got {return_lse!r} ({type(return_lse).__module__}."
                        f"{type(return_lse).__qualname__})")
    check_softmax_scale("attention", softmax_scale)
    if (not isinstance(window, (tuple, list)) or len(window) != 2
            or not all(isinstance(w, numbers.Integral) and not isinstance(w, bool) for w in window)):
        raise TypeError(f"attention: window must be a pair of ints (left, right), got {window!r}")
    if window[0] < -1 or window[1] < -1:
        raise ValueError(f"attention: window values must be >= -1 (-1 = unbounded), got {tuple(window)}")
    if causal and window[1] > 0:
        raise ValueError(f"attention: causal=True means window right = 0; got window={tuple(window)} "
                         "(pass window=(left, -1) or (left, 0) with causal=True)")


# --------------------------------------------------------------------------------------------------------------------
# The Triton path as a torch.library custom op
# --------------------------------------------------------------------------------------------------------------------

@torch.library.custom_op("fastlm_triton::attention_fwd", mutates_args=())
def _triton_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, softmax_scale: float,
                window_left: int, window_right: int) -> tuple[torch.Tensor, torch.Tensor]:
    from fastlm.kernels import attention as kernel
    return kernel.attention_fwd(q, k, v, causal, softmax_scale, window_left, window_right)


def _fwd_fake(q, k, v, causal, softmax_scale, window_left, window_right):
    B, Sq, H, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty((B, H, Sq), dtype=torch.float32)


@torch.library.custom_op("fastlm_triton::attention_bwd", mutates_args=())
def _triton_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                lse: torch.Tensor, dlse: torch.Tensor | None, causal: bool, softmax_scale: float, window_left: int,
                window_right: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from fastlm.kernels import attention as kernel
    return kernel.attention_bwd(dout, q, k, v, out, lse, causal, softmax_scale, window_left, window_right, dlse)


def _bwd_fake(dout, q, k, v, out, lse, dlse, causal, softmax_scale, window_left, window_right):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    q, k, v, causal, softmax_scale, window_left, window_right = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.args = (causal, softmax_scale, window_left, window_right)


def _backward_with(bwd_op):
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = bwd_op(dout, q, k, v, out, lse, dlse, *ctx.args)
        return dq, dk, dv, None, None, None, None
    return backward


_triton_fwd.register_fake(_fwd_fake)
_triton_bwd.register_fake(_bwd_fake)
_triton_fwd.register_autograd(_backward_with(_triton_bwd), setup_context=_setup_context)
first_order_only(_triton_bwd, "attention")


# --------------------------------------------------------------------------------------------------------------------
# The C++ forward ("cpu", "cuda"); backward by the Triton kernels on CUDA, by the C++ kernel on CPU (the reference
# in blocks of query rows where neither is available, and on CPU for rows whose LSE is too large to recompute
# probabilities from)

# The C++ CPU backward recomputes P = 2^(S c - LSE log2 e) from the fp32 LSE, whose rounding grows with it: from
# |LSE log2 e| = 2^14 on (scaled scores of ~1e4, a diverged model) it moves a row's largest probability by 0.07 % and
# more (at 2^24 by a factor up to 2), where PyTorch's softmax still gives it exactly 1 (it subtracts the row's max).
# Such rows take the reference's backward instead, in blocks of query rows that hold about _FALLBACK_SCORES scores
# (a long sequence's whole score matrix would not fit in memory). Checked on the host, which costs nothing on a CPU.
_LSE_RECOMPUTE_LIMIT = 2.0 ** 14 / math.log2(math.e)
_FALLBACK_SCORES = 1 << 22


def _lse_too_large(lse: torch.Tensor) -> bool:
    return bool((torch.isfinite(lse) & (lse.abs() >= _LSE_RECOMPUTE_LIMIT)).any())


# custom ops around the C++ forward and the backward's choice, so that torch.compile(fullgraph=True) sees two opaque
# calls (it would trace an autograd.Function's backward, with its host reads, into the graph)
@torch.library.custom_op("fastlm_native_py::attention_fwd", mutates_args=())
def _native_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, softmax_scale: float,
                window_left: int, window_right: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ops.fastlm.attention_fwd(q, k, v, causal, softmax_scale, window_left, window_right)


@torch.library.custom_op("fastlm_native_py::attention_bwd", mutates_args=())
def _native_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                lse: torch.Tensor, dlse: torch.Tensor | None, causal: bool, softmax_scale: float, window_left: int,
                window_right: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if q.is_cuda and backends.triton_available():
        from fastlm.kernels import attention as kernel
        return kernel.attention_bwd(dout, q, k, v, out, lse, causal, softmax_scale, window_left, window_right,
                                    dlse=dlse)
    if not q.is_cuda and backends.extension_has("attention_bwd", "cpu") and not _lse_too_large(lse):
        return torch.ops.fastlm.attention_bwd(dout, q, k, v, out, lse, dlse, causal, softmax_scale, window_left,
                                              window_right)
    return _reference_backward_in_blocks(dout, q, k, v, dlse, causal, softmax_scale, window_left, window_right)


def _reference_backward_in_blocks(dout, q, k, v, dlse, causal, softmax_scale, window_left, window_right):
    """reference.attention_backward over blocks of query rows of about _FALLBACK_SCORES scores each, computed in fp32
    (float64 for float64 inputs), as the kernels compute: fp16 / bf16 scores of the size that sends rows here (|LSE|
    >= ~1.1e4) would be coarse, and in fp16 past its range."""
    B, Sq, H, _ = q.shape
    Sk = k.shape[1]
    rows = max(1, _FALLBACK_SCORES // max(1, B * H * Sk))
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)      # contiguous, as the op's fake promises
    dk = torch.zeros(k.shape, dtype=acc, device=k.device)
    dv = torch.zeros(v.shape, dtype=acc, device=v.device)
    k_acc, v_acc = k.to(acc), v.to(acc)
    for start in range(0, Sq, rows):
        stop = min(Sq, start + rows)
        keep = reference.attention_mask(Sq, Sk, causal=causal, window=(window_left, window_right), device=q.device,
                                        rows=(start, stop))
        gq, gk, gv = reference.masked_attention_backward(
            dout[:, start:stop].to(acc), q[:, start:stop].to(acc), k_acc, v_acc, keep, softmax_scale,
            dlse[:, :, start:stop] if dlse is not None else None)
        dq[:, start:stop] = gq
        dk += gk
        dv += gv
    return dq, dk.to(k.dtype), dv.to(v.dtype)


_native_fwd.register_fake(_fwd_fake)
_native_bwd.register_fake(_bwd_fake)
_native_fwd.register_autograd(_backward_with(_native_bwd), setup_context=_setup_context)
first_order_only(_native_bwd, "attention")


# --------------------------------------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------------------------------------

class _NoKeys(torch.autograd.Function):
    """The output of a problem where no row sees a key: zeros, whose gradients to q, k and v are zeros."""

    @staticmethod
    def forward(ctx, q, k, v):
        ctx.save_for_backward(q, k, v)
        return q.new_zeros(q.shape)

    @staticmethod
    def backward(ctx, grad):
        return tuple(torch.zeros_like(t) for t in ctx.saved_tensors)


@autocast_matmul
def attention(q, k, v, *, causal=False, softmax_scale=None, window=(-1, -1), return_lse=False, backend="auto"):
    """Softmax attention: out = softmax(q k^T * softmax_scale + mask) v, never materializing the score matrix.

    q: (batch, seqlen_q, nheads, headdim); k, v: (batch, seqlen_k, nheads_kv, headdim), nheads % nheads_kv == 0
    (grouped-query / multi-query attention without copying K/V). Any strides.
    causal: mask aligned bottom-right (query i sits at key position i + seqlen_k - seqlen_q).
    window: (left, right) sliding window around that position, -1 = unbounded (causal implies right = 0).
    softmax_scale: default 1 / sqrt(headdim); any value finite in float32, but the kernels' scaled scores are float32
    too (the "torch" backend's are in the inputs' dtype): a scale that takes them past that range overflows them, and
    such rows come out NaN.
    Under torch.autocast q, k, v are cast to the autocast dtype first (ops._checks.autocast_matmul).
    Returns out (q's shape and dtype), and with return_lse also lse (batch, nheads, seqlen_q) float32 (float64 for
    float64 inputs), the natural-log log-sum-exp of each row's scaled scores. A query that sees no key gets out = 0
    and lse = -inf.
    backend: "auto", "triton", "cpu", "cuda" or "torch" (see fastlm.backends).
    """
    _check(q, k, v, causal, softmax_scale, window, return_lse)
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    scale = float(1.0 / math.sqrt(D) if softmax_scale is None else softmax_scale)
    # a bound of Sq + Sk or more reaches every key: clamped, so that no backend's position arithmetic overflows
    window_left, window_right = (min(int(w), Sq + Sk) for w in (window[0], 0 if causal else window[1]))
    chosen = backends.resolve(backend, q.device, "attention", native_ops=("attention_fwd",), dtype=q.dtype)
    chosen = fit_head_dim("attention", chosen, backend, D)
    if chosen != "torch" and q.dtype not in backends.KERNEL_DTYPES:
        raise TypeError(f"attention: dtype must be one of float16, bfloat16, float32 for backend {chosen!r}, "
                        f"got {q.dtype}")
    if chosen == "torch" and q.dtype not in backends.KERNEL_DTYPES + (torch.float64,):
        raise TypeError(f"attention: dtype must be a floating type (float16, bfloat16, float32, float64), "
                        f"got {q.dtype}")

    if q.numel() == 0 or Sk == 0:  # empty batch / no query / no key: every row sees no key
        out = _NoKeys.apply(q, k, v) if needs_grad(q, k, v) else q.new_zeros(q.shape)
        lse = q.new_full((B, H, Sq), float("-inf"), dtype=torch.promote_types(q.dtype, torch.float32))
        return (out, lse) if return_lse else out

    if chosen == "torch":
        return reference.attention(q, k, v, causal=causal, softmax_scale=scale, window=(window_left, window_right),
                                   return_lse=return_lse)
    if chosen == "triton":
        out, lse = _triton_fwd(q, k, v, causal, scale, window_left, window_right)
    else:
        # the C++ kernels read rows with unit stride along the head dim
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        native = _native_fwd if needs_grad(q, k, v) else torch.ops.fastlm.attention_fwd
        out, lse = native(q, k, v, causal, scale, window_left, window_right)
    return (out, lse) if return_lse else out
