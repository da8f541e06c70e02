"""linear(x, weight, bias=None): x @ weight^T (+ bias), weight in nn.Linear layout (out_features, in_features).

The projections and the LM head of a decoding step multiply a handful of rows by a large weight: a matrix-vector
product whose time is reading the weight once.

Backends:
  "cpu"    the C++ extension (torch.ops.fastlm.linear): for up to 16 rows of x, matrix-vector products that stream
           the weight at the memory's rate on every thread (csrc/cpu/gemv.h); the packed GEMM of csrc/cpu/gemm.h
           above that. Backward in torch matmuls.
  others   torch (F.linear): on a GPU that is cuBLAS, which a Triton GEMM of these shapes would not beat.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from fastlm.backends import resolve
from fastlm.ops._checks import autocast_matmul, check_float_tensor, check_kernel_dtypes, needs_grad, num_rows


@torch.library.custom_op("fastlm_native_py::linear", mutates_args=())
def _nat_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return torch.ops.fastlm.linear(x, weight, bias)


@_nat_linear.register_fake
def _(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _setup(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight)


def _backward(ctx, dy):
    x, weight = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad
    x2, dy2 = x.reshape(num_rows(x), x.shape[-1]), dy.reshape(num_rows(x), weight.shape[0])
    return (dy @ weight if need_x else None, dy2.t() @ x2 if need_w else None,
            dy2.sum(0) if ctx.has_bias and need_b else None)


_nat_linear.register_autograd(_backward, setup_context=_setup)


@autocast_matmul
def linear(x, weight, bias=None, *, backend="auto"):
    """x (..., in_features) @ weight^T + bias: (..., out_features) in x's dtype (under torch.autocast, every
    argument cast to the autocast dtype first: ops._checks.autocast_matmul)."""
    op = "linear"
    check_float_tensor(op, "x", x)
    if x.dim() < 1:
        raise ValueError(f"{op}: x must be (..., in_features), got a 0-dim tensor")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"{op}: weight must be 2-D (out_features, {x.shape[-1]}) for x of shape {tuple(x.shape)}, "
                         f"got {got}")
    for name, t, shape in (("weight", weight, tuple(weight.shape)), ("bias", bias, (weight.shape[0],))):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{op}: {name} must be a tensor of shape {shape}, got {got}")
        if t.dtype != x.dtype:
            raise TypeError(f"{op}: {name} must have x's dtype {x.dtype}, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")
    # (its "triton" path is torch's GEMM: no Triton kernel, bf16 on the interpreter included)
    be = resolve(backend, x.device, op, native_ops=("linear",), dtype=x.dtype, triton_kernel=False)
    if be == "cpu":
        check_kernel_dtypes(op, be, x=x)
        return _nat_linear(x, weight, bias) if needs_grad(x, weight, bias) else torch.ops.fastlm.linear(x, weight, bias)
    return F.linear(x, weight, bias)
