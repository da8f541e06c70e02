"""Argument checks shared by the public ops: each raises TypeError/ValueError naming the op, the argument, what was
expected and what was given."""
from __future__ import annotations

import math

import torch

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what the Triton and C++ kernels take


def check_float_tensor(op: str, name: str, t) -> None:
    """``t`` is a floating-point torch.Tensor."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")


def check_triton_dtypes(op: str, **tensors) -> None:
    """Every tensor given (None skipped) has a dtype the Triton kernels take."""
    for name, t in tensors.items():
        if t is not None and t.dtype not in KERNEL_DTYPES:
            raise TypeError(f"{op}: the triton backend takes float32/float16/bfloat16 {name}, got {t.dtype}")


def num_rows(x: torch.Tensor) -> int:
    """Rows of x (..., D) seen as an (N, D) matrix, also when D == 0."""
    return math.prod(x.shape[:-1])
