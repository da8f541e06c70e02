"""Argument checks shared by the public ops: each raises TypeError/ValueError naming the op, the argument, what was
expected and what was given. Also ``needs_grad``, which picks between an op's autograd wrapper and its bare kernel,
and ``autocast_matmul``, the ops' behaviour under torch.autocast."""
from __future__ import annotations

import functools
import math
import numbers

import torch

from fastlm.backends import KERNEL_DTYPES
from fastlm.config import is_real


def autocast_matmul(fn):
    """An op built on matrix products, under torch.autocast: it computes as autocast runs a matmul. Its floating-point
    tensor arguments (float64 excepted, as autocast leaves it) are cast to the autocast dtype of their device, so that
    fp32 weights meet the lower-precision activations; the output comes in that dtype; autocast is off inside (the
    kernels take operands of one dtype, and the torch code around them must not be recast). Casts are
    differentiable: fp32 weights get fp32 gradients. Without autocast on the device the call is unchanged."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not torch._C._is_any_autocast_enabled():                    # (the common case, ~0.5 us)
            return fn(*args, **kwargs)
        device = next((a.device.type for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        if device not in ("cpu", "cuda") or not torch.is_autocast_enabled(device):
            return fn(*args, **kwargs)
        dtype = torch.get_autocast_dtype(device)

        def cast(a):
            eligible = isinstance(a, torch.Tensor) and a.is_floating_point() and a.dtype != torch.float64
            return a.to(dtype) if eligible else a
        with torch.autocast(device, enabled=False):
            return fn(*map(cast, args), **{k: cast(v) for k, v in kwargs.items()})
    return wrapper


def first_order_only(bwd_op, op: str) -> None:
    """Gives the custom op ``bwd_op``, the backward kernel of ``op``, an autograd formula that raises a clear error:
    a gradient through the gradients (after torch.autograd.grad(..., create_graph=True)) has no kernel. The first
    backward with create_graph=True still runs; only differentiating its results fails."""
    def backward(ctx, *grads):
        raise RuntimeError(f"{op}: second-order gradients (differentiating its gradients, e.g. after "
                           f"torch.autograd.grad(..., create_graph=True)) are not supported on the kernel backends; "
                           f"use backend='torch'")
    bwd_op.register_autograd(backward)


def check_float_tensor(op: str, name: str, t) -> None:
    """``t`` is a floating-point torch.Tensor."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")


def check_kernel_dtypes(op: str, backend: str, **tensors) -> None:
    """Every tensor given (None skipped) has a dtype the kernels of ``backend`` (Triton's, or the C++ ones) take."""
    for name, t in tensors.items():
        if t is not None and t.dtype not in KERNEL_DTYPES:
            raise TypeError(f"{op}: the {backend} backend takes float32/float16/bfloat16 {name}, got {t.dtype}")


def kernel_dtype(*tensors):
    """The dtype an op's backend choice should go by: the first tensor's, or that of any tensor no kernel takes
    (float64), so that backend="auto" sends such inputs to the reference (None entries skipped)."""
    given = [t for t in tensors if t is not None]
    odd = [t.dtype for t in given if t.dtype not in KERNEL_DTYPES]
    return odd[0] if odd else given[0].dtype


def needs_grad(*tensors) -> bool:
    """Whether autograd would record an op on these tensors (None entries skipped). Without it an op can call its
    forward kernel directly, skipping the autograd wrapper's per-call cost (tens of microseconds, the time of a small
    kernel: it adds up over a decoding step's hundred calls)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def num_rows(x: torch.Tensor) -> int:
    """Rows of x (..., D) seen as an (N, D) matrix, also when D == 0."""
    return math.prod(x.shape[:-1])


def check_qkv(op: str, q, k, v, *, k_name: str = "k", v_name: str = "v", seq_name: str = "seqlen_k") -> None:
    """Shapes of attention inputs: q (batch, seqlen_q, nheads, headdim) and k, v (batch, <seq_name>, nheads_kv,
    headdim) with nheads % nheads_kv == 0."""
    for name, t in (("q", q), (k_name, k), (v_name, v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            layout = "(batch, seqlen_q, nheads, headdim)" if name == "q" else f"(batch, {seq_name}, nheads_kv, headdim)"
            raise ValueError(f"{op}: {name} must be 4-D {layout}, got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"{op}: {k_name} and {v_name} must have the same shape, got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    B, _, H, D = q.shape
    if k.shape[0] != B:
        raise ValueError(f"{op}: batch of {k_name}/{v_name} ({k.shape[0]}) must equal batch of q ({B})")
    if k.shape[3] != D:
        raise ValueError(f"{op}: headdim of {k_name}/{v_name} ({k.shape[3]}) must equal headdim of q ({D})")
    Hkv = k.shape[2]
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(f"{op}: nheads of q ({H}) must be divisible by nheads of {k_name}/{v_name} ({Hkv})")
    if D < 1:
        raise ValueError(f"{op}: headdim must be >= 1, got {D}")


TRITON_MAX_HEAD_DIM = 256  # the Triton attention kernels keep a next_power_of_2(headdim) wide tile in registers
TRITON_MAX_NORM_DIM = 16384  # the Triton norm kernels keep whole rows in registers (kernels/norm.py: MAX_D)


def fit_triton(op: str, chosen: str, backend: str, what: str, size: int, limit: int) -> str:
    """The backend that runs ``op`` when its ``what`` is ``size``: ``chosen``, unless it is the Triton one and size is
    past ``limit``, what its kernels take; then "auto" falls back to the reference and an explicit backend="triton"
    raises. (The C++ CPU kernels and the reference take any size; the CUDA ones check their own.)"""
    if chosen != "triton" or size <= limit:
        return chosen
    if backend == "auto":
        return "torch"
    raise ValueError(f"{op}: backend='triton' takes {what} 1..{limit}, got {size} (the 'cpu' and 'torch' backends "
                     "take any)")


def fit_head_dim(op: str, chosen: str, backend: str, head_dim: int) -> str:
    """fit_triton for the attention kernels' head dim."""
    return fit_triton(op, chosen, backend, "headdim", head_dim, TRITON_MAX_HEAD_DIM)


_FP32_MAX = torch.finfo(torch.float32).max


def check_softmax_scale(op: str, softmax_scale) -> None:
    """An attention op's softmax_scale: None (1/sqrt(headdim)) or a real number (numpy scalars too) finite in fp32,
    in which every kernel scales the scores."""
    if softmax_scale is None:
        return
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real):
        raise TypeError(f"{op}: softmax_scale must be a number or None, got {softmax_scale!r}")
    if not abs(softmax_scale) <= _FP32_MAX:
        raise ValueError(f"{op}: softmax_scale must be finite in float32 (|softmax_scale| <= {_FP32_MAX:.4g}), got "
                         f"{softmax_scale}")


def check_window_left(op: str, window_left) -> None:
    """A sliding window's left bound: an int >= -1 (-1: no window)."""
    if isinstance(window_left, bool) or not isinstance(window_left, numbers.Integral) or window_left < -1:
        raise ValueError(f"{op}: window_left must be an int >= -1 (-1: no window), got {window_left!r}")


def check_eps(op: str, eps) -> None:
    """A norm's eps: a finite number >= 0."""
    if not is_real(eps) or not 0 <= eps < math.inf:
        raise ValueError(f"{op}: eps must be a finite non-negative number, got {eps!r}")
