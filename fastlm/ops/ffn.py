"""The transformer MLPs, fused.

    mlp_gelu(x, w_fc, b_fc, w_proj, b_proj, residual=None)   GPT-2: proj(gelu_tanh(fc(x))) (+ residual)
    mlp_swiglu(x, w_gate, w_up, w_down, residual=None)       Llama: down(silu(gate(x)) * up(x)) (+ residual)

x (..., d); weights in nn.Linear layout (out_features, in_features); biases may be None; the output is
(..., d_out) in x's dtype (under torch.autocast every argument, the residual included, is cast to the autocast
dtype first). Gradients to x, every weight and bias, and the residual.

Backends:
  "triton"       kernels/ffn.py: GEMMs with bias/activation/residual epilogues; backward = one Triton elementwise
                 pass for the activation gradient (from the pre-activations saved by the forward) + torch matmuls.
  "cpu"/"cuda"   the C++ extension's fused forward (torch.ops.fastlm.mlp_gelu / mlp_swiglu) when autograd records
                 nothing; under autograd the three products run separately (CPU: the extension's linear) and the
                 pre-activations are kept; backward = torch matmuls + the extension's one-pass activation gradient
                 (torch.ops.fastlm.gelu_bwd / swiglu_bwd; torch math where a device lacks it).
  "torch"        fastlm.reference with plain autograd.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from fastlm import reference
from fastlm.backends import extension_has, resolve
from fastlm.ops._checks import (autocast_matmul, check_float_tensor, check_kernel_dtypes, first_order_only, needs_grad,
                                num_rows)
from fastlm.ops.linear import linear


def _kernels():
    from fastlm.kernels import ffn
    return ffn


def _out_shape(x, w_out):
    return (*x.shape[:-1], w_out.shape[0])


# ---- shared backward (GEMMs in torch; the activation gradient from a pluggable elementwise function) --------------

def _gelu_bwd_torch(dh, a):
    af = a.float()
    c = math.sqrt(2.0 / math.pi)
    t = torch.tanh(c * (af + 0.044715 * af ** 3))
    dgelu = 0.5 * (1.0 + t) + 0.5 * af * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044715 * af * af)
    return (dh.float() * dgelu).to(a.dtype), (0.5 * af * (1.0 + t)).to(a.dtype)


def _swiglu_bwd_torch(dh, g, u):
    gf, uf, dhf = g.float(), u.float(), dh.float()
    sig = torch.sigmoid(gf)
    act = gf * sig
    dg = dhf * uf * sig * (1.0 + gf * (1.0 - sig))
    return dg.to(g.dtype), (dhf * act).to(u.dtype), (act * uf).to(g.dtype)


def _gelu_grads(dy, x, w_fc, b_fc, w_proj, has_b_proj, has_res, a, act_bwd):
    x2 = x.reshape(num_rows(x), x.shape[-1])
    dy2 = dy.reshape(num_rows(x), w_proj.shape[0])
    if a.numel() == 0 and x2.shape[0]:  # not saved by the forward: recompute the pre-activation
        a = F.linear(x2, w_fc, b_fc)
    dh = dy2 @ w_proj                                      # (M, I)
    da, h = act_bwd(dh, a)
    dx = (da @ w_fc).reshape(x.shape)
    return (dx, da.t() @ x2, da.sum(0) if b_fc is not None else None, dy2.t() @ h,
            dy2.sum(0) if has_b_proj else None, dy if has_res else None)


def _swiglu_grads(dy, x, w_gate, w_up, w_down, has_res, g, u, act_bwd):
    x2 = x.reshape(num_rows(x), x.shape[-1])
    dy2 = dy.reshape(num_rows(x), w_down.shape[0])
    if g.numel() == 0 and x2.shape[0]:
        g, u = F.linear(x2, w_gate), F.linear(x2, w_up)
    dh = dy2 @ w_down                                      # (M, I)
    dg, du, h = act_bwd(dh, g, u)
    dx = torch.addmm(dg @ w_gate, du, w_up).reshape(x.shape)
    return dx, dg.t() @ x2, du.t() @ x2, dy2.t() @ h, dy if has_res else None


# ---- triton ---------------------------------------------------------------------------------------------------------

@torch.library.custom_op("fastlm_triton::mlp_gelu", mutates_args=())
def _tr_gelu(x: torch.Tensor, w_fc: torch.Tensor, b_fc: Optional[torch.Tensor], w_proj: torch.Tensor,
             b_proj: Optional[torch.Tensor], residual: Optional[torch.Tensor], save_pre: bool
             ) -> tuple[torch.Tensor, torch.Tensor]:
    return _kernels().mlp_gelu_fwd(x, w_fc, b_fc, w_proj, b_proj, residual, save_pre)


@_tr_gelu.register_fake
def _(x, w_fc, b_fc, w_proj, b_proj, residual, save_pre):
    return x.new_empty(_out_shape(x, w_proj)), x.new_empty((num_rows(x), w_fc.shape[0]) if save_pre else (0,))


@torch.library.custom_op("fastlm_triton::gelu_bwd", mutates_args=())
def _tr_gelu_bwd(dh: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _kernels().gelu_bwd(dh, a)


def _gelu_bwd_fake(dh, a):
    return torch.empty_like(a), torch.empty_like(a)


def _swiglu_bwd_fake(dh, g, u):
    return torch.empty_like(g), torch.empty_like(g), torch.empty_like(g)


_tr_gelu_bwd.register_fake(_gelu_bwd_fake)
first_order_only(_tr_gelu_bwd, "mlp_gelu")


def _gelu_setup(ctx, inputs, output):
    """For the Triton and the native op alike (the Triton op's last input, save_pre, plays no part)."""
    x, w_fc, b_fc, w_proj, b_proj, residual = inputs[:6]
    ctx.flags = (b_proj is not None, residual is not None)
    ctx.save_for_backward(x, w_fc, b_fc, w_proj, output[1])


def _tr_gelu_backward(ctx, dy, _da):
    x, w_fc, b_fc, w_proj, a = ctx.saved_tensors
    return *_gelu_grads(dy, x, w_fc, b_fc, w_proj, *ctx.flags, a, _tr_gelu_bwd), None


_tr_gelu.register_autograd(_tr_gelu_backward, setup_context=_gelu_setup)


@torch.library.custom_op("fastlm_triton::mlp_swiglu", mutates_args=())
def _tr_swiglu(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
               residual: Optional[torch.Tensor], save_pre: bool
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _kernels().mlp_swiglu_fwd(x, w_gate, w_up, w_down, residual, save_pre)


@_tr_swiglu.register_fake
def _(x, w_gate, w_up, w_down, residual, save_pre):
    pre = (num_rows(x), w_gate.shape[0]) if save_pre else (0,)
    return x.new_empty(_out_shape(x, w_down)), x.new_empty(pre), x.new_empty(pre)


@torch.library.custom_op("fastlm_triton::swiglu_bwd", mutates_args=())
def _tr_swiglu_bwd(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _kernels().swiglu_bwd(dh, g, u)


_tr_swiglu_bwd.register_fake(_swiglu_bwd_fake)
first_order_only(_tr_swiglu_bwd, "mlp_swiglu")


def _swiglu_setup(ctx, inputs, output):
    """For the Triton and the native op alike (the Triton op's last input, save_pre, plays no part)."""
    x, w_gate, w_up, w_down, residual = inputs[:5]
    ctx.has_res = residual is not None
    ctx.save_for_backward(x, w_gate, w_up, w_down, output[1], output[2])


def _tr_swiglu_backward(ctx, dy, _dg, _du):
    x, w_gate, w_up, w_down, g, u = ctx.saved_tensors
    return *_swiglu_grads(dy, x, w_gate, w_up, w_down, ctx.has_res, g, u, _tr_swiglu_bwd), None


_tr_swiglu.register_autograd(_tr_swiglu_backward, setup_context=_swiglu_setup)


# ---- native (C++ extension forward; under autograd the pre-activations are kept for a torch backward) ------------

def _native_call(name, *args):
    return getattr(torch.ops.fastlm, name)(*args)


@torch.library.custom_op("fastlm_native_py::gelu_bwd", mutates_args=())
def _nat_gelu_bwd(dh: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ops.fastlm.gelu_bwd(dh, a)


_nat_gelu_bwd.register_fake(_gelu_bwd_fake)
first_order_only(_nat_gelu_bwd, "mlp_gelu")


@torch.library.custom_op("fastlm_native_py::swiglu_bwd", mutates_args=())
def _nat_swiglu_bwd(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.ops.fastlm.swiglu_bwd(dh, g, u)


_nat_swiglu_bwd.register_fake(_swiglu_bwd_fake)
first_order_only(_nat_swiglu_bwd, "mlp_swiglu")


def _native_act_bwd(name, device, fallback):
    """The extension's fused activation backward for this device (one pass over the intermediate), else the torch
    formula. The C++ ops are called through ops without an autograd formula, so that a double backward raises
    instead of returning silent zeros."""
    if extension_has(name, device.type):
        return {"gelu_bwd": _nat_gelu_bwd, "swiglu_bwd": _nat_swiglu_bwd}[name]
    return fallback


def _with_residual(y, residual, shape):
    y = y.view(shape)
    return y if residual is None else y + residual


# Under autograd the native forward runs the three products separately and keeps the pre-activations (tokens x
# intermediate, as eager and the Triton backend keep them): recomputing them in the backward instead costs two more
# GEMMs than eager's training step runs.
@torch.library.custom_op("fastlm_native_py::mlp_gelu", mutates_args=())
def _nat_gelu(x: torch.Tensor, w_fc: torch.Tensor, b_fc: Optional[torch.Tensor], w_proj: torch.Tensor,
              b_proj: Optional[torch.Tensor], residual: Optional[torch.Tensor]
              ) -> tuple[torch.Tensor, torch.Tensor]:
    a = linear(x.reshape(num_rows(x), x.shape[-1]), w_fc, b_fc)
    y = linear(F.gelu(a, approximate="tanh"), w_proj, b_proj)
    return _with_residual(y, residual, _out_shape(x, w_proj)), a


@_nat_gelu.register_fake
def _(x, w_fc, b_fc, w_proj, b_proj, residual):
    return x.new_empty(_out_shape(x, w_proj)), x.new_empty((num_rows(x), w_fc.shape[0]))


def _nat_gelu_backward(ctx, dy, _da):
    x, w_fc, b_fc, w_proj, a = ctx.saved_tensors
    return _gelu_grads(dy, x, w_fc, b_fc, w_proj, *ctx.flags, a,
                       _native_act_bwd("gelu_bwd", x.device, _gelu_bwd_torch))


_nat_gelu.register_autograd(_nat_gelu_backward, setup_context=_gelu_setup)


@torch.library.custom_op("fastlm_native_py::mlp_swiglu", mutates_args=())
def _nat_swiglu(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                residual: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x2 = x.reshape(num_rows(x), x.shape[-1])
    g, u = linear(x2, w_gate), linear(x2, w_up)
    y = linear(F.silu(g) * u, w_down)
    return _with_residual(y, residual, _out_shape(x, w_down)), g, u


@_nat_swiglu.register_fake
def _(x, w_gate, w_up, w_down, residual):
    pre = (num_rows(x), w_gate.shape[0])
    return x.new_empty(_out_shape(x, w_down)), x.new_empty(pre), x.new_empty(pre)


def _nat_swiglu_backward(ctx, dy, _dg, _du):
    x, w_gate, w_up, w_down, g, u = ctx.saved_tensors
    return _swiglu_grads(dy, x, w_gate, w_up, w_down, ctx.has_res, g, u,
                         _native_act_bwd("swiglu_bwd", x.device, _swiglu_bwd_torch))


_nat_swiglu.register_autograd(_nat_swiglu_backward, setup_context=_swiglu_setup)


# ---- public functions ----------------------------------------------------------------------------------------------

def _check_x(op, x):
    check_float_tensor(op, "x", x)
    if x.dim() < 1:
        raise ValueError(f"{op}: x must be (..., hidden), got a 0-dim tensor")


def _check(op, x, weights, named):
    """weights: (name, tensor), shaped already (_weight_dims); named: (name, tensor or None, expected shape) for the
    biases, the residual and a weight whose shape another one fixes. Each of x's dtype and device."""
    for name, t, shape in [(n, w, None) for n, w in weights] + named:
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise ValueError(f"{op}: {name} must have shape {tuple(shape)} (x is {tuple(x.shape)}), got "
                             f"{tuple(t.shape)}")
        if t.dtype != x.dtype:
            raise TypeError(f"{op}: {name} must have x's dtype {x.dtype}, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")


def _weight_dims(op, name, w, in_dim):
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        got = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
        raise ValueError(f"{op}: {name} must be a 2-D (out_features, in_features) weight, got {got}")
    if in_dim is not None and w.shape[1] != in_dim:
        raise ValueError(f"{op}: {name} must have {in_dim} in_features (shape (*, {in_dim})), got {tuple(w.shape)}")
    return w.shape[0]


@autocast_matmul
def mlp_gelu(x, w_fc, b_fc, w_proj, b_proj, residual=None, *, backend="auto"):
    """GPT-2 MLP: gelu_tanh(x @ w_fc^T + b_fc) @ w_proj^T + b_proj (+ residual)."""
    op = "mlp_gelu"
    _check_x(op, x)
    inter = _weight_dims(op, "w_fc", w_fc, x.shape[-1])
    out_dim = _weight_dims(op, "w_proj", w_proj, inter)
    _check(op, x, [("w_fc", w_fc), ("w_proj", w_proj)],
           [("b_fc", b_fc, (inter,)), ("b_proj", b_proj, (out_dim,)), ("residual", residual, (*x.shape[:-1], out_dim))])
    be = resolve(backend, x.device, op, native_ops=("mlp_gelu",), dtype=x.dtype)
    if be == "torch":
        return reference.mlp_gelu(x, w_fc, b_fc, w_proj, b_proj, residual)
    check_kernel_dtypes(op, be, x=x)
    if be in ("cpu", "cuda"):
        if not needs_grad(x, w_fc, b_fc, w_proj, b_proj, residual):
            return _native_call("mlp_gelu", x, w_fc, b_fc, w_proj, b_proj, residual)
        return _nat_gelu(x, w_fc, b_fc, w_proj, b_proj, residual)[0]
    y, _ = _tr_gelu(x, w_fc, b_fc, w_proj, b_proj, residual, needs_grad(x, w_fc, b_fc, w_proj, b_proj))
    return y


@autocast_matmul
def mlp_swiglu(x, w_gate, w_up, w_down, residual=None, *, backend="auto"):
    """Llama MLP: (silu(x @ w_gate^T) * (x @ w_up^T)) @ w_down^T (+ residual)."""
    op = "mlp_swiglu"
    _check_x(op, x)
    inter = _weight_dims(op, "w_gate", w_gate, x.shape[-1])
    _weight_dims(op, "w_up", w_up, x.shape[-1])
    out_dim = _weight_dims(op, "w_down", w_down, inter)
    _check(op, x, [("w_gate", w_gate), ("w_down", w_down)],
           [("w_up", w_up, w_gate.shape), ("residual", residual, (*x.shape[:-1], out_dim))])
    be = resolve(backend, x.device, op, native_ops=("mlp_swiglu",), dtype=x.dtype)
    if be == "torch":
        return reference.mlp_swiglu(x, w_gate, w_up, w_down, residual)
    check_kernel_dtypes(op, be, x=x)
    if be in ("cpu", "cuda"):
        if not needs_grad(x, w_gate, w_up, w_down, residual):
            return _native_call("mlp_swiglu", x, w_gate, w_up, w_down, residual)
        return _nat_swiglu(x, w_gate, w_up, w_down, residual)[0]
    y, _, _ = _tr_swiglu(x, w_gate, w_up, w_down, residual, needs_grad(x, w_gate, w_up, w_down))
    return y
