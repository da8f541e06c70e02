"""Rotary position embedding (Hugging Face rotate_half convention).

    rope_cos_sin(positions, head_dim, base, dtype, *, scaling=None) -> (cos, sin)   tables (len(positions), head_dim)
    apply_rope(x, cos, sin) -> x rotated                   x (B, S, H, D); cos/sin (S, D), (1, S, D) or (B, S, D)

Position offsets (decoding with a KV cache) are expressed through the tables: pass the rows for the positions being
processed, (S, D) when the batch shares them, (B, S, D) when each sequence has its own. x's gradient is the
transposed rotation of the output's gradient (by the kernels); tables that require grad (learned frequencies) get
theirs by torch math, summed over what they broadcast over.

Backends:
  "triton"  kernels/rope.py, forward and backward.
  "cpu"     the C++ extension (torch.ops.fastlm.rope_fwd, csrc/cpu/rope.cpp; float32/bfloat16/float16), forward and
            backward; the tables are cast to x's dtype first, as the reference casts them. There is no CUDA C++
            kernel: "cuda" raises, and "auto" picks Triton for CUDA tensors.
  "torch"   fastlm.reference with plain autograd.
"""
from __future__ import annotations

import math

import torch

from fastlm import reference
from fastlm.backends import resolve
from fastlm.config import check_rope_scaling, is_int, is_real
from fastlm.ops._checks import check_float_tensor, check_kernel_dtypes, needs_grad


def _kernels():
    from fastlm.kernels import rope
    return rope


@torch.library.custom_op("fastlm_triton::rope", mutates_args=())
def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool) -> torch.Tensor:
    return _kernels().rope(x, cos, sin, inverse)


@_rope.register_fake
def _(x, cos, sin, inverse):
    return x.new_empty(x.shape)


def _setup(ctx, inputs, output):
    x, cos, sin, inverse = inputs
    ctx.inverse = inverse
    ctx.table_grads = cos.requires_grad or sin.requires_grad
    ctx.save_for_backward(cos, sin, x if ctx.table_grads else None)


def _table_grads(ctx, dy, x, cos, sin):
    """(dcos, dsin) of y = x cos + rotate_half(x) sin, or of the inverse (transposed) rotation y1 = x1 c1 + x2 s2,
    y2 = x2 c2 - x1 s1 (the backward, differentiated again in a double backward), or (None, None) where no table
    requires grad; fp32 sums over the heads (and the batch, for (S, D) tables)."""
    if not ctx.table_grads:
        return None, None
    dy, x = dy.float(), x.float()
    dims = (0, 2) if cos.dim() == 2 else (2,)
    dcos = (dy * x).sum(dims)
    # forward: dsin = (-dy1 x2, dy2 x1); inverse: dsin = (-dy2 x1, dy1 x2)
    dsin = (reference.rotate_half(dy) * x if ctx.inverse else dy * reference.rotate_half(x)).sum(dims)
    return dcos.to(cos.dtype), dsin.to(sin.dtype)


def _backward_by(op):
    """The backward of a rotation by ``op`` (Triton's or the C++ one): the inverse rotation by the same op."""
    def backward(ctx, dy):
        cos, sin, x = ctx.saved_tensors  # (read once: non-reentrant checkpointing refuses a second unpack)
        return op(dy, cos, sin, not ctx.inverse), *_table_grads(ctx, dy, x, cos, sin), None
    return backward


_rope.register_autograd(_backward_by(_rope), setup_context=_setup)


@torch.library.custom_op("fastlm_native_py::rope", mutates_args=())
def _nat_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool) -> torch.Tensor:
    return torch.ops.fastlm.rope_fwd(x, cos, sin, inverse)


@_nat_rope.register_fake
def _(x, cos, sin, inverse):
    return x.new_empty(x.shape)


_nat_rope.register_autograd(_backward_by(_nat_rope), setup_context=_setup)


def rope_cos_sin(positions, head_dim, base=10000.0, dtype=torch.float32, *, scaling=None):
    """cos, sin tables (len(positions), head_dim) for the given integer positions (computed in float64, then cast),
    with the frequencies rescaled by ``scaling`` (a Config.rope_scaling dict, or None).

    Plain torch (no kernel): the tables are built once per sequence length, not per layer."""
    if not isinstance(positions, torch.Tensor) or positions.dim() != 1:
        got = tuple(positions.shape) if isinstance(positions, torch.Tensor) else type(positions).__name__
        raise ValueError(f"rope_cos_sin: positions must be a 1-D tensor, got {got}")
    if positions.dtype == torch.bool or positions.dtype.is_floating_point or positions.dtype.is_complex:
        raise TypeError(f"rope_cos_sin: positions must be an integer tensor, got {positions.dtype}")
    if not is_int(head_dim) or head_dim <= 0 or head_dim % 2:
        raise ValueError(f"rope_cos_sin: head_dim must be a positive even int, got {head_dim!r}")
    if not is_real(base) or not 0 < base < math.inf:
        raise ValueError(f"rope_cos_sin: base must be a positive finite number, got {base!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"rope_cos_sin: dtype must be a floating-point torch.dtype, got {dtype!r}")
    return reference.rope_cos_sin(positions, head_dim, float(base), dtype, check_rope_scaling(scaling))


def _check(x, cos, sin):
    for name, t in (("x", x), ("cos", cos), ("sin", sin)):
        check_float_tensor("apply_rope", name, t)
    if x.dim() != 4:
        raise ValueError(f"apply_rope: x must be (batch, seqlen, heads, head_dim), got shape {tuple(x.shape)}")
    B, S, H, D = x.shape
    if D % 2:
        raise ValueError(f"apply_rope: head_dim (x.shape[-1]) must be even, got {D}")
    for name, t in (("cos", cos), ("sin", sin)):
        if tuple(t.shape) not in ((S, D), (B, S, D), (1, S, D)):
            raise ValueError(f"apply_rope: {name} must have shape ({S}, {D}), (1, {S}, {D}) or ({B}, {S}, {D}) for x "
                             f"of shape {tuple(x.shape)}, got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"apply_rope: {name} is on {t.device} but x is on {x.device}")
    if cos.shape != sin.shape:
        raise ValueError(f"apply_rope: cos and sin must have the same shape, got {tuple(cos.shape)} and "
                         f"{tuple(sin.shape)}")


def apply_rope(x, cos, sin, *, backend="auto"):
    """x * cos + rotate_half(x) * sin for x (B, S, H, D) (any strides), broadcast over heads; returns x's dtype.
    cos, sin: (S, D) or (1, S, D) (transformers' rotary tables) shared by the batch, or (B, S, D)."""
    _check(x, cos, sin)
    if cos.dim() == 3 and cos.shape[0] == 1:
        cos, sin = cos[0], sin[0]
    be = resolve(backend, x.device, "apply_rope", native_ops=("rope_fwd",), dtype=x.dtype)
    if be == "torch":
        return reference.apply_rope(x, cos, sin)
    if be == "cpu":
        check_kernel_dtypes("apply_rope", be, x=x)
        cos, sin = (t if t.dtype == x.dtype else t.to(x.dtype) for t in (cos, sin))
        native = _nat_rope if needs_grad(x, cos, sin) else torch.ops.fastlm.rope_fwd
        return native(x, cos, sin, False)
    # float64 tables (the Triton kernels take none) are rounded to x's dtype, as the reference and the cpu kernel do
    cos, sin = (t.to(x.dtype) if t.dtype == torch.float64 else t for t in (cos, sin))
    check_kernel_dtypes("apply_rope", be, x=x, cos=cos, sin=sin)
    return _rope(x, cos, sin, False)
