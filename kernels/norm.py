"""LayerNorm and RMSNorm over the last dim, optionally fused with the residual add (h = x + residual; y = norm(h)).

Forward: one program per block of BLOCK_R rows keeps whole rows in registers (BLOCK_D = next power of two >= D;
several rows per program when D is small): it reads x (and residual), writes h (when fused) and y, and the per-row
fp32 statistics (rstd, and mean for LayerNorm) that backward reuses. Traffic: 2 reads + 2 writes of N*D elements
fused (1 + 1 unfused), plus 4-8 bytes per row.

Backward: a persistent grid of programs, each walking a contiguous range of rows, BLOCK_R at a time. Per row it
reloads h and dy and writes dx = rstd * (w*dy - xhat * mean(w*dy*xhat) [- mean(w*dy)]) (+ the gradient flowing into
h directly, for the fused op), while accumulating dweight = sum(dy * xhat) and dbias = sum(dy) for its rows in fp32
registers; the per-program partial sums (num_programs, D) are reduced by one small torch sum. Traffic: 2-3 reads +
1 write of N*D. Statistics and all arithmetic are fp32; h is rounded to the input dtype before the statistics, as the
reference does.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._helpers import aligned, interpreter, next_pow2, num_programs, rows2d, triton_dtype_name

MAX_D = 16384  # whole rows live in registers


@triton.jit
def norm_fwd_kernel(X, R, W, B, Y, H, MEAN, RSTD, n_rows, D, eps,
                    IS_RMS: tl.constexpr, HAS_RES: tl.constexpr, HAS_BIAS: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < n_rows
    mask = rmask[:, None] & (cols[None, :] < D)
    off = rows.to(tl.int64)[:, None] * D + cols[None, :]
    x = tl.load(X + off, mask=mask, other=0.0)
    if HAS_RES:
        h = x + tl.load(R + off, mask=mask, other=0.0)
        tl.store(H + off, h, mask=mask)
        x = h
    x = x.to(tl.float32)
    # the statistics rounded correctly (div_rn / sqrt_rn): a plain `/` and tl.sqrt compile to the GPU's approximate
    # division and square root, off by a few ulp in every row, where the interpreter computes exactly
    n = D * 1.0
    if IS_RMS:
        xc = x
    else:
        mean = tl.div_rn(tl.sum(x, axis=1), n)
        tl.store(MEAN + rows, mean, mask=rmask)
        xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = tl.div_rn(1.0, tl.sqrt_rn(tl.div_rn(tl.sum(xc * xc, axis=1), n) + eps))
    tl.store(RSTD + rows, rstd, mask=rmask)
    y = xc * rstd[:, None] * tl.load(W + cols, mask=cols < D, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y += tl.load(B + cols, mask=cols < D, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + off, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def norm_bwd_kernel(DY, H, W, MEAN, RSTD, DH, DX, DW_PART, DB_PART, n_rows, D, rows_per_program,
                    IS_RMS: tl.constexpr, HAS_DH: tl.constexpr, HAS_BIAS: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    dw = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    db = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    start = pid * rows_per_program
    end = tl.minimum(start + rows_per_program, n_rows)
    for first in range(start, end, BLOCK_R):
        rows = first + tl.arange(0, BLOCK_R)
        rmask = rows < end
        mask = rmask[:, None] & cmask[None, :]
        off = rows.to(tl.int64)[:, None] * D + cols[None, :]
        h = tl.load(H + off, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + off, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)[:, None]
        if IS_RMS:
            xhat = h * rstd
        else:
            xhat = tl.where(mask, (h - tl.load(MEAN + rows, mask=rmask, other=0.0)[:, None]) * rstd, 0.0)
        wdy = w * dy
        dx = wdy - xhat * (tl.sum(wdy * xhat, axis=1) / D)[:, None]
        if not IS_RMS:
            dx -= (tl.sum(wdy, axis=1) / D)[:, None]
        dx *= rstd
        if HAS_DH:
            dx += tl.load(DH + off, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + off, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * xhat
        if HAS_BIAS:
            db += dy
    tl.store(DW_PART + pid * D + cols, tl.sum(dw, axis=0), mask=cmask)
    if HAS_BIAS:
        tl.store(DB_PART + pid * D + cols, tl.sum(db, axis=0), mask=cmask)


def _config(D: int, interpreted: bool | None = None):
    """(BLOCK_R rows per step, BLOCK_D, num_warps): whole rows in registers, ~16 fp32 values per thread and tensor
    (32 at hidden 16384, where the backward spills a few hundred bytes), several short rows per program; in the
    interpreter whole row blocks (numpy steps are what costs there)."""
    block_d = next_pow2(D)
    if interpreted is None:
        interpreted = interpreter()
    if interpreted:
        return max(1, 4096 // block_d), block_d, 1
    block_r = max(1, 2048 // block_d)
    return block_r, block_d, max(1, min(16, block_r * block_d // 512))


def norm_fwd(x, residual, weight, bias, eps: float, is_rms: bool):
    """y = norm(h) with h = x (+ residual). Returns (y, h, mean, rstd), all shaped like x except mean/rstd (N,) fp32;
    h is empty when there is no residual, mean is empty for RMSNorm."""
    D = x.shape[-1]
    if D > MAX_D:
        raise ValueError(f"norm: hidden size must be <= {MAX_D}, got {D}")
    x2 = rows2d(x)
    n = x2.shape[0]
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    h = torch.empty(x.shape if residual is not None else (0,), dtype=x.dtype, device=x.device)
    rstd = torch.empty(n, dtype=torch.float32, device=x.device)
    mean = torch.empty(n if not is_rms else 0, dtype=torch.float32, device=x.device)
    if n == 0 or D == 0:  # nothing to normalize (D == 0: y and h are empty, the statistics are never read)
        return y, h, mean, rstd
    r2 = rows2d(residual) if residual is not None else x2
    block_r, block_d, warps = _config(D)
    norm_fwd_kernel[(triton.cdiv(n, block_r),)](
        x2, r2, weight.contiguous(), bias.contiguous() if bias is not None else weight, y,
        h if residual is not None else y, mean if not is_rms else rstd, rstd, n, D, eps,
        IS_RMS=is_rms, HAS_RES=residual is not None, HAS_BIAS=bias is not None,
        BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps)
    return y, h, mean, rstd


def norm_bwd(dy, h, weight, mean, rstd, dh, has_bias: bool, is_rms: bool):
    """Gradients of y = norm(h) (h the saved normalized input): (dh_total, dweight, dbias).

    ``dh`` is the gradient arriving at h directly (the fused op's second output) or None; dbias is empty without bias.
    """
    D = h.shape[-1]
    h2, dy2 = rows2d(h), rows2d(dy)
    n = h2.shape[0]
    dx = torch.empty(h.shape, dtype=h.dtype, device=h.device)
    if n == 0 or D == 0:
        dw = torch.zeros_like(weight)
        return dx, dw, torch.zeros_like(weight) if has_bias else weight.new_empty(0)
    progs = min(n, num_programs(h.device))
    rows_per = triton.cdiv(n, progs)
    progs = triton.cdiv(n, rows_per)
    dw_part = torch.empty(progs, D, dtype=torch.float32, device=h.device)
    db_part = torch.empty(progs, D, dtype=torch.float32, device=h.device) if has_bias else dw_part
    block_r, block_d, warps = _config(D)
    norm_bwd_kernel[(progs,)](dy2, h2, weight.contiguous(), mean if not is_rms else rstd, rstd,
                              rows2d(dh) if dh is not None else dy2, dx, dw_part, db_part, n, D, rows_per,
                              IS_RMS=is_rms, HAS_DH=dh is not None, HAS_BIAS=has_bias,
                              BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps)
    dw = dw_part.sum(0).to(weight.dtype)
    db = db_part.sum(0).to(weight.dtype) if has_bias else weight.new_empty(0)
    return dx, dw, db


def aot_specs():
    specs = []
    for D, dt in ((4096, torch.bfloat16), (768, torch.bfloat16), (8192, torch.bfloat16)):
        t = triton_dtype_name(dt)
        block_r, block_d, warps = _config(D, interpreted=False)
        for is_rms, res in ((True, True), (False, False)):
            kind = "rms" if is_rms else "layer"
            specs.append({
                "name": f"{kind}_norm_fwd[D={D},{t}{',residual' if res else ''}]", "fn": norm_fwd_kernel,
                "signature": {"X": f"*{t}", "R": f"*{t}", "W": f"*{t}", "B": f"*{t}", "Y": f"*{t}", "H": f"*{t}",
                              "MEAN": "*fp32", "RSTD": "*fp32", "n_rows": "i32", "D": "i32", "eps": "fp32",
                              "IS_RMS": "constexpr", "HAS_RES": "constexpr", "HAS_BIAS": "constexpr",
                              "BLOCK_R": "constexpr", "BLOCK_D": "constexpr"},
                "constexprs": {"IS_RMS": is_rms, "HAS_RES": res, "HAS_BIAS": not is_rms, "BLOCK_R": block_r,
                               "BLOCK_D": block_d},
                "attrs": aligned(norm_fwd_kernel, "X", "R", "W", "B", "Y", "H", "MEAN", "RSTD", "D"),
                "num_warps": warps, "num_stages": 1, "expect_wgmma": False})
            specs.append({
                "name": f"{kind}_norm_bwd[D={D},{t}{',residual' if res else ''}]", "fn": norm_bwd_kernel,
                "signature": {"DY": f"*{t}", "H": f"*{t}", "W": f"*{t}", "MEAN": "*fp32", "RSTD": "*fp32",
                              "DH": f"*{t}", "DX": f"*{t}", "DW_PART": "*fp32", "DB_PART": "*fp32", "n_rows": "i32",
                              "D": "i32", "rows_per_program": "i32", "IS_RMS": "constexpr", "HAS_DH": "constexpr",
                              "HAS_BIAS": "constexpr", "BLOCK_R": "constexpr", "BLOCK_D": "constexpr"},
                "constexprs": {"IS_RMS": is_rms, "HAS_DH": res, "HAS_BIAS": not is_rms, "BLOCK_R": block_r,
                               "BLOCK_D": block_d},
                "attrs": aligned(norm_bwd_kernel, "DY", "H", "W", "MEAN", "RSTD", "DH", "DX", "DW_PART", "DB_PART",
                                 "D"),
                "num_warps": warps, "num_stages": 1, "expect_wgmma": False})
    return specs
