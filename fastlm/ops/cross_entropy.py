"""Cross-entropy over large vocabularies, and the LM head fused with it.

    cross_entropy(logits, targets, *, ignore_index=-100, reduction="mean")
    linear_cross_entropy(x, weight, targets, bias=None, *, ignore_index=-100, reduction="mean", chunk_size=None)

logits (..., V) with targets (...); x (..., d) with weight (V, d) in nn.Linear layout. Losses are fp32 (float64 for
float64 inputs). "mean" divides by the number of targets != ignore_index (the result is 0 when there are none), "sum"
adds, "none" returns per-token losses shaped like targets (0 at ignored positions).

linear_cross_entropy never holds the (N, V) logits: it runs the LM-head GEMM and the loss over chunks of tokens.
With "mean"/"sum" and gradients needed, the gradients (dx, dweight, dbias) are computed in the forward from each
chunk's logits while they exist (three GEMMs per chunk, the logits computed once), and backward only scales them by
the incoming scalar gradient (Liger-Kernel's scheme). That scaling multiplies already-rounded gradients: exact for 1
or a power-of-two loss scale, one extra rounding otherwise. With "none" (a per-token incoming gradient) the forward
computes only the loss and backward recomputes each chunk's logits (four GEMMs per chunk in all).
Backends: "triton" (kernels/cross_entropy.py + torch GEMMs), "cpu" (the C++ extension's row kernels,
csrc/cpu/cross_entropy.cpp; the chunks' logits by its linear, the gradients' GEMMs by torch) and "torch"
(fastlm.reference).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from fastlm import reference
from fastlm.backends import resolve
from fastlm.config import is_int
from fastlm.ops._checks import autocast_matmul, check_float_tensor, check_kernel_dtypes, first_order_only, needs_grad
_REDUCTIONS = ("mean", "sum", "none")
_NATIVE = ("cross_entropy_fwd", "cross_entropy_bwd", "cross_entropy_fused_")


def _kernels():
    from fastlm.kernels import cross_entropy
    return cross_entropy


# ---- cross_entropy -------------------------------------------------------------------------------------------------

@torch.library.custom_op("fastlm_triton::cross_entropy_fwd", mutates_args=())
def _ce_fwd(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _kernels().cross_entropy_fwd(logits, targets, ignore_index)


def _rows_fake(logits, targets, ignore_index):
    """The per-row (loss, lse) of a cross-entropy forward, for fake tensors."""
    n = logits.shape[0]
    return logits.new_empty(n, dtype=torch.float32), logits.new_empty(n, dtype=torch.float32)


def _grad_fake(grad_loss, logits, targets, lse, ignore_index):
    return torch.empty_like(logits)


_ce_fwd.register_fake(_rows_fake)


@torch.library.custom_op("fastlm_triton::cross_entropy_bwd", mutates_args=())
def _ce_bwd(grad_loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
            ignore_index: int) -> torch.Tensor:
    return _kernels().cross_entropy_bwd(grad_loss, logits, targets, lse, ignore_index)


_ce_bwd.register_fake(_grad_fake)


def _ce_setup(ctx, inputs, output):
    logits, targets, ignore_index = inputs
    ctx.ignore_index = ignore_index
    ctx.save_for_backward(logits, targets, output[1])


def _ce_backward_by(bwd_op):
    """The autograd backward of a cross-entropy forward op whose gradient op is ``bwd_op``."""
    def backward(ctx, dloss, dlse):
        logits, targets, lse = ctx.saved_tensors
        return bwd_op(dloss, logits, targets, lse, ctx.ignore_index), None, None
    return backward


_ce_fwd.register_autograd(_ce_backward_by(_ce_bwd), setup_context=_ce_setup)
first_order_only(_ce_bwd, "cross_entropy")


@torch.library.custom_op("fastlm_native_py::cross_entropy", mutates_args=())
def _nat_ce(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ops.fastlm.cross_entropy_fwd(logits, targets, ignore_index)


_nat_ce.register_fake(_rows_fake)


@torch.library.custom_op("fastlm_native_py::cross_entropy_bwd", mutates_args=())
def _nat_ce_bwd(grad_loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                ignore_index: int) -> torch.Tensor:
    """The C++ backward in an op of its own: a double backward raises (first_order_only) instead of returning
    silent zeros."""
    return torch.ops.fastlm.cross_entropy_bwd(grad_loss, logits, targets, lse, ignore_index)


_nat_ce_bwd.register_fake(_grad_fake)
_nat_ce.register_autograd(_ce_backward_by(_nat_ce_bwd), setup_context=_ce_setup)
first_order_only(_nat_ce_bwd, "cross_entropy")


# ---- the chunked LM head + loss, shared by the Triton and C++ row kernels --------------------------------------------

def _row_kernels(backend):
    """(forward, fused in-place loss + gradient) per-row cross-entropy kernels of a backend: (logits, targets,
    ignore_index) -> (loss, lse), and (logits, targets, ignore_index, grad_scale) -> (loss, lse) with the gradient
    written over the logits."""
    if backend == "cpu":
        return torch.ops.fastlm.cross_entropy_fwd, torch.ops.fastlm.cross_entropy_fused_
    k = _kernels()
    return k.cross_entropy_fwd, k.cross_entropy_fused_


@functools.lru_cache(maxsize=None)
def _has_addmm_out_dtype(device_type: str) -> bool:
    key = "CUDA" if device_type == "cuda" else "CPU"
    return torch._C._dispatch_has_kernel_for_dispatch_key("aten::addmm.dtype", key)


def _lm_head(backend):
    """x @ weight.T (+ bias) for a chunk of rows: the C++ packed GEMM on the "cpu" backend (faster than ATen's on
    LM-head shapes, bench/dev/cpu_notes.md), the vendor GEMM otherwise."""
    if backend == "cpu":
        return torch.ops.fastlm.linear
    return lambda x, weight, bias: torch.addmm(bias, x, weight.t()) if bias is not None else torch.mm(x, weight.t())


def _accumulate(acc, a, b, first: bool):
    """acc = a @ b for the first chunk, acc += a @ b for the others; an fp32 acc of fp16/bf16 products accumulates
    them without rounding them to 16 bits (_addmm_fp32)."""
    if acc.dtype != a.dtype:
        return _addmm_fp32(acc.zero_() if first else acc, a, b)
    return torch.mm(a, b, out=acc) if first else acc.addmm_(a, b)


def _addmm_fp32(acc, a, b):
    """acc + a @ b for an fp32 acc and fp16/bf16 a, b, the product never rounded to 16 bits (cuBLAS with an fp32
    output where torch offers it, i.e. torch >= 2.8 on CUDA; an fp32 GEMM otherwise)."""
    if _has_addmm_out_dtype(a.device.type):
        return torch.addmm(acc, a, b, out_dtype=torch.float32)
    return acc.addmm_(a.float(), b.float())


def default_chunk(vocab: int, itemsize: int) -> int:
    """Tokens per chunk for the fused linear + cross-entropy: about 256 MB of logits per chunk, at least 128 rows
    (small chunks starve the LM-head GEMM), a multiple of 128."""
    rows = (256 << 20) // max(1, vocab * itemsize)
    return max(128, rows // 128 * 128)


def _lce_chunks(x, weight, bias, targets, ignore_index: int, chunk: int, compute_grad: bool, row_scale, backend):
    """cross_entropy(x @ weight.T + bias) over token chunks, never holding more than ``chunk`` rows of logits.

    x (N, d), weight (V, d), targets (N,). Returns (loss_rows (N,) fp32, dx, dweight, dbias); with ``compute_grad``
    the gradients of sum_i row_scale[i] * loss[i] (row_scale None: all ones) are accumulated chunk by chunk from the
    gradient the backend's row kernel writes over each chunk's logits; otherwise they are empty tensors. dweight is
    accumulated in fp32 across chunks (fp32 partial products) for fp16/bf16 weights so the chunking adds no rounding of
    its own."""
    ce_fwd, ce_fused_ = _row_kernels(backend)
    lm_head = _lm_head(backend)
    N, d = x.shape
    V = weight.shape[0]
    loss = torch.empty(N, dtype=torch.float32, device=x.device)
    dx, dw, db = x.new_empty(0), x.new_empty(0), x.new_empty(0)
    if compute_grad:
        dx = torch.empty_like(x)
        acc_dtype = torch.float32 if N > chunk else weight.dtype
        # written by the first chunk (zeros when there is none)
        dw = (torch.empty if N > 0 else torch.zeros)(V, d, dtype=acc_dtype, device=x.device)
        if bias is not None:
            db = torch.zeros(V, dtype=torch.float32, device=x.device)
    for s in range(0, N, chunk):
        e = min(N, s + chunk)
        xc = x[s:e]
        logits = lm_head(xc, weight, bias)
        if not compute_grad:
            loss[s:e] = ce_fwd(logits, targets[s:e], ignore_index)[0]
            continue
        scale = row_scale[s:e].contiguous() if row_scale is not None else None
        loss[s:e] = ce_fused_(logits, targets[s:e], ignore_index, scale)[0]
        torch.mm(logits, weight, out=dx[s:e])
        dw = _accumulate(dw, logits.t(), xc, first=s == 0)
        if bias is not None:
            db += logits.sum(0, dtype=torch.float32)
    if compute_grad:
        dw = dw.to(weight.dtype)
        if bias is not None:
            db = db.to(bias.dtype)
    return loss, dx, dw, db


# ---- linear_cross_entropy ------------------------------------------------------------------------------------------

@torch.library.custom_op("fastlm_py::linear_cross_entropy", mutates_args=())
def _lce(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
         ignore_index: int, reduction: str, chunk_size: int, compute_grad: bool, backend: str
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    compute_grad = compute_grad and reduction != "none"
    scale = None
    if compute_grad and reduction == "mean":
        scale = (1.0 / _n_valid(targets, ignore_index)).expand(x.shape[0])
    loss, dx, dw, db = _lce_chunks(x, weight, bias, targets, ignore_index, chunk_size, compute_grad, scale, backend)
    return _reduce(loss, targets, ignore_index, reduction), dx, dw, db


@_lce.register_fake
def _(x, weight, bias, targets, ignore_index, reduction, chunk_size, compute_grad, backend):
    loss = x.new_empty((x.shape[0],) if reduction == "none" else (), dtype=torch.float32)
    if not compute_grad or reduction == "none":
        return loss, x.new_empty(0), x.new_empty(0), x.new_empty(0)
    return loss, torch.empty_like(x), torch.empty_like(weight), \
        torch.empty_like(bias) if bias is not None else x.new_empty(0)


@torch.library.custom_op("fastlm_py::linear_cross_entropy_bwd", mutates_args=())
def _lce_bwd(grad_rows: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
             targets: torch.Tensor, ignore_index: int, chunk_size: int, backend: str
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _, dx, dw, db = _lce_chunks(x, weight, bias, targets, ignore_index, chunk_size, True,
                                grad_rows.to(torch.float32), backend)
    return dx, dw, db


@_lce_bwd.register_fake
def _(grad_rows, x, weight, bias, targets, ignore_index, chunk_size, backend):
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(bias) if bias is not None else \
        x.new_empty(0)


def _lce_setup(ctx, inputs, output):
    x, weight, bias, targets, ignore_index, reduction, chunk_size, compute_grad, backend = inputs
    ctx.precomputed = compute_grad and reduction != "none"
    ctx.has_bias = bias is not None
    ctx.args = (ignore_index, reduction, chunk_size, backend)
    if ctx.precomputed:
        ctx.save_for_backward(*output[1:])
    else:
        ctx.save_for_backward(x, weight, bias, targets)


def _lce_backward(ctx, dloss, ddx, ddw, ddb):
    if torch.is_grad_enabled():  # backward(create_graph=True): the gradients below are constants to autograd
        raise RuntimeError("linear_cross_entropy: higher-order gradients are not supported on the kernel backends "
                           "(the gradients are computed by the kernels, in the forward for reduction='mean'/'sum'); "
                           "use backend='torch'")
    ignore_index, reduction, chunk_size, backend = ctx.args
    if ctx.precomputed:  # the forward's gradients, for an upstream gradient of 1
        dx, dw, db = ctx.saved_tensors
        g = dloss.to(dx.dtype)
        dx, dw, db = dx * g, dw * g, db * g
    else:
        x, weight, bias, targets = ctx.saved_tensors
        n = x.shape[0]
        if reduction == "none":
            grad_rows = dloss
        elif reduction == "sum":
            grad_rows = dloss.expand(n)
        else:
            grad_rows = (dloss / _n_valid(targets, ignore_index)).expand(n)
        dx, dw, db = _lce_bwd(grad_rows.contiguous(), x, weight, bias, targets, ignore_index, chunk_size, backend)
    return dx, dw, db if ctx.has_bias else None, None, None, None, None, None, None


_lce.register_autograd(_lce_backward, setup_context=_lce_setup)


# ---- public functions ----------------------------------------------------------------------------------------------

def _n_valid(targets, ignore_index):
    return (targets != ignore_index).sum().clamp(min=1).to(torch.float32)


def _reduce(loss_rows, targets, ignore_index, reduction):
    if reduction == "none":
        return loss_rows
    total = loss_rows.sum()
    return total if reduction == "sum" else total / _n_valid(targets, ignore_index)


def _check_common(op, targets, lead_shape, device, vocab, ignore_index, reduction):
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"{op}: targets must be a torch.Tensor, got {type(targets).__name__}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{op}: targets must be int64 or int32 class indices, got {targets.dtype}")
    if tuple(targets.shape) != tuple(lead_shape):
        raise ValueError(f"{op}: targets must have shape {tuple(lead_shape)} (one per token), got "
                         f"{tuple(targets.shape)}")
    if targets.device != device:
        raise ValueError(f"{op}: targets is on {targets.device} but the inputs are on {device}")
    if not is_int(ignore_index):
        raise TypeError(f"{op}: ignore_index must be an int, got {ignore_index!r}")
    if not -2 ** 31 <= ignore_index < 2 ** 31:
        raise ValueError(f"{op}: ignore_index must fit in int32, got {ignore_index}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if vocab < 1:
        raise ValueError(f"{op}: the vocabulary size must be >= 1, got {vocab}")
    if targets.numel() and not torch.compiler.is_compiling() and targets.device.type != "meta":
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
        if bool(bad.any()):
            value = int(targets[bad][0])
            raise ValueError(f"{op}: targets must be in [0, {vocab}) or equal ignore_index ({ignore_index}), "
                             f"got {value}")


def cross_entropy(logits, targets, *, ignore_index=-100, reduction="mean", backend="auto"):
    """Cross-entropy of logits (..., V) against integer targets (...), in fp32, without fp32 copies of the logits.
    ``reduction="mean"`` divides by the number of targets other than ``ignore_index``; with none (every target
    ignored, or no tokens) the loss and its gradients are 0, where torch.nn.functional.cross_entropy gives NaN: a
    batch without a labelled token leaves the weights unchanged instead of turning them to NaN."""
    op = "cross_entropy"
    check_float_tensor(op, "logits", logits)
    if logits.dim() < 1:
        raise ValueError(f"{op}: logits must be (..., vocab), got a 0-dim tensor")
    _check_common(op, targets, logits.shape[:-1], logits.device, logits.shape[-1], ignore_index, reduction)
    ignore_index = int(ignore_index)  # (numpy integers too)
    lead = targets.shape
    logits2, targets2 = logits.reshape(targets.numel(), logits.shape[-1]), targets.reshape(-1)
    be = resolve(backend, logits.device, op, native_ops=_NATIVE, dtype=logits.dtype)
    if be == "torch":
        loss = reference.cross_entropy(logits2, targets2, ignore_index=ignore_index, reduction=reduction)
        return loss.reshape(lead) if reduction == "none" else loss
    check_kernel_dtypes(op, be, logits=logits)
    if be == "cpu":
        native = _nat_ce if needs_grad(logits) else torch.ops.fastlm.cross_entropy_fwd
        loss_rows, _ = native(logits2 if logits2.stride(-1) == 1 else logits2.contiguous(), targets2, ignore_index)
    else:
        loss_rows, _ = _ce_fwd(logits2, targets2, ignore_index)
    loss = _reduce(loss_rows, targets2, ignore_index, reduction)
    return loss.reshape(lead) if reduction == "none" else loss


@autocast_matmul
def linear_cross_entropy(x, weight, targets, bias=None, *, ignore_index=-100, reduction="mean", chunk_size=None,
                         backend="auto"):
    """cross_entropy(x @ weight.T + bias, targets) for x (..., d), weight (V, d), chunked over tokens so the (N, V)
    logits are never held; ``chunk_size`` tokens per chunk (default: about 256 MB of logits). ``ignore_index`` and
    ``reduction`` as in cross_entropy (a mean over no labelled token is 0)."""
    op = "linear_cross_entropy"
    check_float_tensor(op, "x", x)
    check_float_tensor(op, "weight", weight)
    if x.dim() < 1:
        raise ValueError(f"{op}: x must be (..., hidden), got a 0-dim tensor")
    d = x.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != d:
        raise ValueError(f"{op}: weight must be (vocab, {d}) in nn.Linear layout for x of hidden size {d}, got "
                         f"{tuple(weight.shape)}")
    V = weight.shape[0]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        check_float_tensor(op, name, t)
        if t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")
        if t.dtype != x.dtype:
            raise TypeError(f"{op}: {name} must have x's dtype {x.dtype}, got {t.dtype}")
    if bias is not None and tuple(bias.shape) != (V,):
        raise ValueError(f"{op}: bias must have shape ({V},), got {tuple(bias.shape)}")
    if chunk_size is not None and (not is_int(chunk_size) or chunk_size < 1):
        raise ValueError(f"{op}: chunk_size must be a positive int or None, got {chunk_size!r}")
    _check_common(op, targets, x.shape[:-1], x.device, V, ignore_index, reduction)
    ignore_index, chunk_size = int(ignore_index), None if chunk_size is None else int(chunk_size)
    lead = targets.shape
    x2, targets2 = x.reshape(targets.numel(), d), targets.reshape(-1)   # (-1, d) is ambiguous for d = 0
    be = resolve(backend, x.device, op, native_ops=_NATIVE, dtype=x.dtype)
    if be == "torch":
        loss = reference.linear_cross_entropy(x2, weight, targets2, bias, ignore_index=ignore_index,
                                              reduction=reduction)
        return loss.reshape(lead) if reduction == "none" else loss
    check_kernel_dtypes(op, be, x=x)
    if chunk_size is None:
        chunk_size = default_chunk(V, x.element_size())
    chunk_size = min(chunk_size, max(targets2.numel(), 1))  # (one chunk; also keeps it an int64 for the custom op)
    loss, _, _, _ = _lce(x2.contiguous(), weight.contiguous(), bias.contiguous() if bias is not None else None,
                         targets2.contiguous(), ignore_index, reduction, chunk_size, needs_grad(x, weight, bias), be)
    return loss.reshape(lead) if reduction == "none" else loss
