"""Rotary position embedding, Hugging Face rotate_half convention:

    y[..., :D/2] = x1 * cos[:D/2] - x2 * sin[:D/2]
    y[..., D/2:] = x2 * cos[D/2:] + x1 * sin[D/2:]          (x1, x2 = the two halves of x)

One program per block of BLOCK_R head vectors (rows enumerate batch, token, head); each row reads its token's
cos/sin row (a (S, D) table shared by the batch, or a (B, S, D) table for per-sequence positions when decoding),
which the heads of a token share through the cache. x may be any strided (B, S, H, D) view with unit stride on D
(e.g. q or k sliced out of a fused QKV projection), so no copy is made before the kernel; the output is contiguous.
Backward is the transposed rotation of the incoming gradient (sin halves negated and swapped: the inverse rotation
for Hugging Face tables), the same kernel with INVERSE set. Traffic: one read and one write of x, plus the table rows
(cache hits after a token's first head). Arithmetic in fp32, one rounding.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._helpers import aligned, interpreter, next_pow2, triton_dtype_name


@triton.jit
def rope_kernel(X, COS, SIN, Y, n_rows, S, H, half,
                stride_xb, stride_xs, stride_xh, stride_cb, stride_cs,
                INVERSE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_HALF: tl.constexpr):
    # rows enumerate (b, s, h) in order; each row is one head vector of one token
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    head = rows % H
    tok = rows // H
    b = tok // S
    s = tok % S
    cols = tl.arange(0, BLOCK_HALF)
    mask = (rows < n_rows)[:, None] & (cols < half)[None, :]
    c_off = (b * stride_cb + s * stride_cs)[:, None] + cols[None, :]
    c1 = tl.load(COS + c_off, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(COS + c_off + half, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(SIN + c_off, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(SIN + c_off + half, mask=mask, other=0.0).to(tl.float32)
    x_off = (b * stride_xb + s * stride_xs + head * stride_xh)[:, None] + cols[None, :]
    x1 = tl.load(X + x_off, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(X + x_off + half, mask=mask, other=0.0).to(tl.float32)
    if INVERSE:
        # transpose of the forward rotation: dx1 = dy1 c1 + dy2 s2, dx2 = dy2 c2 - dy1 s1
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    y_off = rows[:, None] * (2 * half) + cols[None, :]
    tl.store(Y + y_off, y1.to(Y.dtype.element_ty), mask=mask)
    tl.store(Y + y_off + half, y2.to(Y.dtype.element_ty), mask=mask)


def _blocks(D: int):
    """(BLOCK_R head-rows per program, BLOCK_HALF): ~2048 pairs per program on a GPU, bigger in the interpreter."""
    block_half = next_pow2(D // 2)
    budget = 16384 if interpreter() else 2048
    return max(1, budget // block_half), block_half


def rope(x, cos, sin, inverse: bool = False):
    """Rotate x (B, S, H, D) (unit stride on D) by cos/sin (S, D) or (B, S, D); the inverse rotation with
    ``inverse``. Returns a contiguous tensor shaped like x."""
    B, S, H, D = x.shape
    y = torch.empty((B, S, H, D), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    stride_cb = cos.stride(0) if cos.dim() == 3 else 0
    n_rows = B * S * H
    block_r, block_half = _blocks(D)
    rope_kernel[(triton.cdiv(n_rows, block_r),)](
        x, cos, sin, y, n_rows, S, H, D // 2, x.stride(0), x.stride(1), x.stride(2), stride_cb, cos.stride(-2),
        INVERSE=inverse, BLOCK_R=block_r, BLOCK_HALF=block_half, num_warps=4)
    return y


def aot_specs():
    specs = []
    for H, D in ((32, 128), (12, 64)):
        block_r, block_half = 2048 // next_pow2(D // 2), next_pow2(D // 2)
        t = triton_dtype_name(torch.bfloat16)
        for inverse in (False, True):
            specs.append({
                "name": f"rope_{'bwd' if inverse else 'fwd'}[H={H},D={D},{t}]", "fn": rope_kernel,
                "signature": {"X": f"*{t}", "COS": "*fp32", "SIN": "*fp32", "Y": f"*{t}", "n_rows": "i32", "S": "i32",
                              "H": "i32", "half": "i32", "stride_xb": "i64", "stride_xs": "i64", "stride_xh": "i64",
                              "stride_cb": "i64", "stride_cs": "i64", "INVERSE": "constexpr", "BLOCK_R": "constexpr",
                              "BLOCK_HALF": "constexpr"},
                "constexprs": {"INVERSE": inverse, "BLOCK_R": block_r, "BLOCK_HALF": block_half},
                "attrs": aligned(rope_kernel, "X", "COS", "SIN", "Y", "half", "stride_xb", "stride_xs", "stride_xh",
                                 "stride_cb", "stride_cs"),
                "num_warps": 4, "num_stages": 1, "expect_wgmma": False})
    return specs
