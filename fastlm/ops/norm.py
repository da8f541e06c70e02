"""LayerNorm and RMSNorm over the last dim, alone or fused with the residual add.

    layer_norm(x, weight, bias, eps)               -> y
    rms_norm(x, weight, eps)                       -> y
    add_layer_norm(x, residual, weight, bias, eps) -> (y, h)    h = x + residual, y = layer_norm(h)
    add_rms_norm(x, residual, weight, eps)         -> (y, h)

Statistics in fp32; y and h in x's dtype; gradients to x, residual, weight and bias.

Backends:
  "triton"  kernels/norm.py, forward and backward.
  "cpu"     the C++ extension's forward and backward (torch.ops.fastlm.norm_fwd / norm_bwd, csrc/cpu/norm.cpp;
            float32/bfloat16/float16), the backward in closed form from the saved h (or x). There is no CUDA C++
            kernel: "cuda" raises, and "auto" picks Triton for CUDA tensors.
  "torch"   fastlm.reference with plain autograd.
"""
from __future__ import annotations

from typing import Optional

import torch

from fastlm import reference
from fastlm.backends import resolve
from fastlm.ops._checks import (TRITON_MAX_NORM_DIM, check_eps, check_float_tensor, check_kernel_dtypes,
                                first_order_only, fit_triton, kernel_dtype, needs_grad, num_rows)


def _kernels():
    from fastlm.kernels import norm
    return norm


@torch.library.custom_op("fastlm_triton::norm_fwd", mutates_args=())
def _norm_fwd(x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor, bias: Optional[torch.Tensor],
              eps: float, is_rms: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _kernels().norm_fwd(x, residual, weight, bias, eps, is_rms)


@_norm_fwd.register_fake
def _(x, residual, weight, bias, eps, is_rms):
    n = num_rows(x)
    f32 = torch.float32
    return (torch.empty_like(x), torch.empty_like(x) if residual is not None else x.new_empty(0),
            x.new_empty(n if not is_rms else 0, dtype=f32), x.new_empty(n, dtype=f32))


@torch.library.custom_op("fastlm_triton::norm_bwd", mutates_args=())
def _norm_bwd(dy: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
              dh: Optional[torch.Tensor], has_bias: bool, is_rms: bool
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _kernels().norm_bwd(dy, h, weight, mean, rstd, dh, has_bias, is_rms)


@_norm_bwd.register_fake
def _(dy, h, weight, mean, rstd, dh, has_bias, is_rms):
    return torch.empty_like(h), torch.empty_like(weight), torch.empty_like(weight) if has_bias else weight.new_empty(0)


def _setup(ctx, inputs, output):
    x, residual, weight, bias, eps, is_rms = inputs
    _, h, mean, rstd = output
    ctx.fused = residual is not None
    ctx.has_bias = bias is not None
    ctx.is_rms = is_rms
    ctx.save_for_backward(h if ctx.fused else x, weight, mean, rstd)


def _backward(ctx, dy, dh, dmean, drstd):
    h, weight, mean, rstd = ctx.saved_tensors
    dh = dh if ctx.fused else None
    dx, dw, db = _norm_bwd(dy, h, weight, mean, rstd, dh, ctx.has_bias, ctx.is_rms)
    return dx, dx if ctx.fused else None, dw, db if ctx.has_bias else None, None, None


_norm_fwd.register_autograd(_backward, setup_context=_setup)
first_order_only(_norm_bwd, "rms_norm / layer_norm")


# ---- native (C++ extension forward and backward) -------------------------------------------------------------------

@torch.library.custom_op("fastlm_native_py::norm_fwd", mutates_args=())
def _nat_norm(x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor, bias: Optional[torch.Tensor],
              eps: float, is_rms: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ops.fastlm.norm_fwd(x, residual, weight, bias, eps, is_rms)


@_nat_norm.register_fake
def _(x, residual, weight, bias, eps, is_rms):
    return x.new_empty(x.shape), x.new_empty(x.shape if residual is not None else (0,))


def _nat_setup(ctx, inputs, output):
    x, residual, weight, bias, eps, is_rms = inputs
    ctx.fused = residual is not None
    ctx.has_bias = bias is not None
    ctx.eps, ctx.is_rms = eps, is_rms
    ctx.save_for_backward(output[1] if ctx.fused else x, weight)


def _nat_backward(ctx, dy, dh):
    """torch.ops.fastlm.norm_bwd (csrc/cpu/norm.cpp): in fp32 from the saved h, with n the normalized h and
    g = dy * weight, the gradient of h is rstd (g - mean(g) - n mean(g n)) (no mean(g) term for RMSNorm) plus that of
    the h output when fused; those of weight and bias are the sums over rows of dy n and of dy."""
    h, weight = ctx.saved_tensors
    dx, dw, db = torch.ops.fastlm.norm_bwd(dy, h, weight, dh if ctx.fused else None, ctx.eps, ctx.is_rms,
                                           ctx.has_bias)
    return dx, dx if ctx.fused else None, dw, db if ctx.has_bias else None, None, None


_nat_norm.register_autograd(_nat_backward, setup_context=_nat_setup)


def _check(op, x, residual, weight, bias, eps):
    check_float_tensor(op, "x", x)
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least 1 dim (..., hidden), got a 0-dim tensor")
    D = x.shape[-1]
    named = [("residual", residual, tuple(x.shape)), ("weight", weight, (D,)), ("bias", bias, (D,))]
    for name, t, shape in named:
        if t is None:
            if name == "weight":
                raise TypeError(f"{op}: weight must be a tensor of shape ({D},), got None")
            continue
        check_float_tensor(op, name, t)
        if tuple(t.shape) != shape:
            raise ValueError(f"{op}: {name} must have shape {shape} (x is {tuple(x.shape)}), got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")
    if bias is not None and bias.dtype != weight.dtype:
        raise TypeError(f"{op}: bias must have weight's dtype {weight.dtype}, got {bias.dtype}")
    if residual is not None and residual.dtype != x.dtype:
        raise TypeError(f"{op}: residual must have x's dtype {x.dtype}, got {residual.dtype}")
    check_eps(op, eps)


def _norm(op, x, residual, weight, bias, eps, is_rms, backend):
    _check(op, x, residual, weight, bias, eps)
    be = resolve(backend, x.device, op, native_ops=("norm_fwd",), dtype=kernel_dtype(x, weight, bias))
    be = fit_triton(op, be, backend, "hidden size", x.shape[-1], TRITON_MAX_NORM_DIM)
    if be == "torch":
        if residual is not None:
            return reference.add_norm(x, residual, weight, bias, eps, kind="rms" if is_rms else "layer")
        return reference.rms_norm(x, weight, eps) if is_rms else reference.layer_norm(x, weight, bias, eps)
    check_kernel_dtypes(op, be, x=x, weight=weight, bias=bias)
    if be == "cpu":
        native = _nat_norm if needs_grad(x, residual, weight, bias) else torch.ops.fastlm.norm_fwd
        y, h = native(x, residual, weight, bias, float(eps), is_rms)
    else:
        y, h, _, _ = _norm_fwd(x, residual, weight, bias, float(eps), is_rms)
    return (y, h) if residual is not None else y


def layer_norm(x, weight, bias, eps=1e-5, *, backend="auto"):
    """LayerNorm over the last dim of x (..., D) with weight (D,) and bias (D,) or None."""
    return _norm("layer_norm", x, None, weight, bias, eps, False, backend)


def rms_norm(x, weight, eps=1e-6, *, backend="auto"):
    """RMSNorm over the last dim of x (..., D) with weight (D,)."""
    return _norm("rms_norm", x, None, weight, None, eps, True, backend)


def add_layer_norm(x, residual, weight, bias, eps=1e-5, *, backend="auto"):
    """h = x + residual and y = layer_norm(h) in one pass; returns (y, h)."""
    if residual is None:
        raise TypeError("add_layer_norm: residual must be a tensor shaped like x, got None")
    return _norm("add_layer_norm", x, residual, weight, bias, eps, False, backend)


def add_rms_norm(x, residual, weight, eps=1e-6, *, backend="auto"):
    """h = x + residual and y = rms_norm(h) in one pass; returns (y, h)."""
    if residual is None:
        raise TypeError("add_rms_norm: residual must be a tensor shaped like x, got None")
    return _norm("add_rms_norm", x, residual, weight, None, eps, True, backend)
