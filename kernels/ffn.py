"""Fused transformer MLPs: GEMMs with the bias, activation and residual add in their epilogues.

GPT-2:  a = x @ W_fc^T + b_fc;  h = gelu_tanh(a);  y = h @ W_proj^T + b_proj (+ residual)
Llama:  g = x @ W_gate^T;  u = x @ W_up^T;  h = silu(g) * u;  y = h @ W_down^T (+ residual)

One tiled GEMM kernel serves all three GEMMs. A program owns a BLOCK_M x BLOCK_N output tile (grouped launch order
so consecutive programs share weight tiles in L2), streams BLOCK_K slices of x and of the weight rows (nn.Linear
layout (out, in), read as the transposed operand) through tl.dot with fp32 accumulators (wgmma on sm_90), and applies
the epilogue in fp32 before one rounding to the output dtype:
  ACT=1 (up, GPT-2):   + bias, GELU-tanh
  ACT=2 (gate+up):     both weights' tiles against the same x tile into two accumulators, silu(g) * u, so neither
                       g, u nor the 2x intermediate is written in inference
  ACT=0 (down):        + bias, + residual
Traffic per MLP forward (inference): x, the weights, h once written and once read, y written.

Backward saves the pre-activations instead of recomputing the up GEMM(s): in training the epilogue also stores a
(GPT-2) or g and u (Llama), which costs one extra write of the intermediate in the forward but saves 2*M*d*I (GPT-2)
or 4*M*d*I (Llama) FLOPs in the backward; h is not kept (the backward kernel recomputes it from the pre-activations
when it forms their gradient). The backward's elementwise work is one Triton pass: from dh = dy @ W_down and the
pre-activations it writes da (or dg, du) and h (needed by dW_down); the GEMMs are torch matmuls (cuBLAS).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._helpers import (aligned, autotune, dot_acc, gelu_tanh, gelu_tanh_and_grad, interpreter, next_pow2, rows2d,
                       shared_memory, silu, triton_dtype_name)

ACT_NONE, ACT_GELU, ACT_SWIGLU = 0, 1, 2
SMEM_RESERVE = 7 * 1024  # shared memory kept free of the pipeline's buffers for the epilogue's layout conversions


@triton.jit
def ffn_gemm_kernel(X, W1, W2, BIAS, RES, OUT, PRE1, PRE2, M, N, K, M_KEY,
                    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, STORE_PRE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # X (M, K), W1/W2 (N, K), OUT/RES/PRE* (M, N), all contiguous; M_KEY only keys the autotuner
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_m
    pid_n = (pid % group) // group_m

    # 64-bit tile bases, 32-bit offsets inside the tile (fewer address registers); rows/cols past a ragged edge are
    # clamped onto the last valid one, so loads need no M/N mask and only the stores are masked
    m0 = pid_m * BLOCK_M
    n0 = pid_n * BLOCK_N
    local_m = tl.arange(0, BLOCK_M)
    local_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rows = tl.minimum(local_m, M - 1 - m0)
    cols = tl.minimum(local_n, N - 1 - n0)
    x_ptrs = X + m0.to(tl.int64) * K + (rows[:, None] * K + offs_k[None, :])
    w1_ptrs = W1 + n0.to(tl.int64) * K + (cols[:, None] * K + offs_k[None, :])
    w2_ptrs = W2 + n0.to(tl.int64) * K + (cols[:, None] * K + offs_k[None, :])
    acc1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_mask = offs_k[None, :] < K - k * BLOCK_K
        a = tl.load(x_ptrs, mask=k_mask, other=0.0)
        acc1 = dot_acc(a, tl.trans(tl.load(w1_ptrs, mask=k_mask, other=0.0)), acc1)
        if ACT == 2:
            acc2 = dot_acc(a, tl.trans(tl.load(w2_ptrs, mask=k_mask, other=0.0)), acc2)
            w2_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
        w1_ptrs += BLOCK_K

    out_mask = (local_m[:, None] < M - m0) & (local_n[None, :] < N - n0)
    tile = m0.to(tl.int64) * N + n0
    out_off = local_m[:, None] * N + local_n[None, :]
    OUT += tile
    PRE1 += tile
    PRE2 += tile
    RES += tile
    if HAS_BIAS:
        acc1 += tl.load(BIAS + n0 + local_n, mask=local_n < N - n0, other=0.0).to(tl.float32)[None, :]
    # with STORE_PRE the activation is taken of the rounded pre-activation that backward will see (as unfused
    # torch does), which also frees the fp32 accumulator's registers before the epilogue math
    if ACT == 1:
        if STORE_PRE:
            pre = acc1.to(PRE1.dtype.element_ty)
            tl.store(PRE1 + out_off, pre, mask=out_mask)
            acc1 = pre.to(tl.float32)
        acc1 = gelu_tanh(acc1)
    elif ACT == 2:
        if STORE_PRE:
            pre = acc1.to(PRE1.dtype.element_ty)
            tl.store(PRE1 + out_off, pre, mask=out_mask)
            acc1 = pre.to(tl.float32)
            pre = acc2.to(PRE2.dtype.element_ty)
            tl.store(PRE2 + out_off, pre, mask=out_mask)
            acc2 = pre.to(tl.float32)
        acc1 = silu(acc1) * acc2
    if HAS_RES:
        acc1 += tl.load(RES + out_off, mask=out_mask, other=0.0).to(tl.float32)
    tl.store(OUT + out_off, acc1.to(OUT.dtype.element_ty), mask=out_mask)


@triton.jit
def act_bwd_kernel(DH, A, U, DA, DU, H, n, SWIGLU: tl.constexpr, BLOCK: tl.constexpr):
    """GELU: (dh, a) -> da = dh * gelu'(a), h = gelu(a).  SwiGLU: (dh, g, u) -> dg, du, h = silu(g) * u."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dh = tl.load(DH + offs, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(A + offs, mask=mask, other=0.0).to(tl.float32)
    if SWIGLU:
        u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(a)
        act = a * sig
        tl.store(DA + offs, (dh * u * sig * (1.0 + a * (1.0 - sig))).to(DA.dtype.element_ty), mask=mask)
        tl.store(DU + offs, (dh * act).to(DU.dtype.element_ty), mask=mask)
        tl.store(H + offs, (act * u).to(H.dtype.element_ty), mask=mask)
    else:
        act, dact = gelu_tanh_and_grad(a)
        tl.store(DA + offs, (dh * dact).to(DA.dtype.element_ty), mask=mask)
        tl.store(H + offs, act.to(H.dtype.element_ty), mask=mask)


# ---- autotuning ----------------------------------------------------------------------------------------------------

def gemm_configs():
    """The autotuner's candidates: one small tile in the interpreter, else gpu_gemm_configs()."""
    if interpreter():
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 4}, num_warps=4,
                              num_stages=1)]
    return gpu_gemm_configs()


def gpu_gemm_configs():
    """Candidate tiles (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages). On sm_90 the 64/128/256-row tiles map onto wgmma
    (one warpgroup per 64 rows); the 16/32-row ones serve decoding (M = a few tokens), where the time is streaming the
    weights and N / BLOCK_N is the number of programs that stream them: the 32- and 16-column tiles give a 2048-wide
    down projection 64 and 128 programs (enough to keep every SM of an H200 reading) instead of 32."""
    tiles = [(128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4),
             (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4), (32, 64, 128, 4, 4), (16, 64, 128, 4, 4),
             (16, 128, 128, 4, 3), (16, 64, 64, 4, 4), (16, 32, 128, 4, 4), (16, 16, 256, 2, 4)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in tiles]


def prune_configs(configs, named_args, **kwargs):
    """Keep tiles that fit the problem (no tile far larger than M, N or K), the device's shared memory, and the
    register file (at most 128 fp32 accumulator values per thread, counting both of gate+up's accumulators); large M
    skips the decode tiles. The pipeline holds num_stages tiles of the operands on sm_90 (TMA / wgmma pipelining)
    and num_stages - 1 on earlier GPUs (cp.async)."""
    args = {**named_args, **kwargs}
    M, N, K = args["M"], args["N"], args["K"]
    dual = args["ACT"] == ACT_SWIGLU
    size = args["X"].element_size()
    limit, major = shared_memory(args["X"].device)
    m_cap, n_cap, k_cap = max(16, next_pow2(M)), max(16, next_pow2(N)), max(16, next_pow2(K))
    kept = []
    for c in configs:
        bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        buffers = c.num_stages if major >= 9 else c.num_stages - 1
        smem = buffers * (bm * bk + (2 if dual else 1) * bn * bk) * size
        acc_regs = (2 if dual else 1) * bm * bn // (32 * c.num_warps)
        if bm > m_cap or bn > n_cap or bk > k_cap or smem > limit - SMEM_RESERVE or acc_regs > 128:
            continue
        if M >= 512 and bm < 64:
            continue
        kept.append(c)
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"])]


_gemm = autotune(gemm_configs(), ["M_KEY", "N", "K", "ACT"], prune_configs)(ffn_gemm_kernel)


# ---- launchers -----------------------------------------------------------------------------------------------------

def _gemm_launch(x, w1, w2, bias, residual, act: int, store_pre: bool):
    """out = epilogue(x @ w1^T [, x @ w2^T]) for x (M, K), w (N, K). Returns (out, pre1, pre2); pre* are the
    pre-activations when ``store_pre`` (else empty)."""
    M, K = x.shape
    N = w1.shape[0]
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    n_pre = (1 if act == ACT_GELU else 2 if act == ACT_SWIGLU else 0) if store_pre else 0
    pre = [torch.empty(M, N, dtype=x.dtype, device=x.device) if i < n_pre else x.new_empty(0) for i in range(2)]
    if M == 0 or N == 0:
        return out, pre[0], pre[1]
    # K == 0 runs no k step: the epilogue sees zero accumulators (bias, activation and residual still apply)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    _gemm[grid](x, w1, w2 if w2 is not None else w1, bias if bias is not None else w1,
                residual if residual is not None else out, out,
                pre[0] if n_pre else out, pre[1] if n_pre == 2 else out, M, N, K, next_pow2(M),
                ACT=act, HAS_BIAS=bias is not None, HAS_RES=residual is not None, STORE_PRE=n_pre > 0)
    return out, pre[0], pre[1]


def _maybe(t):
    return t.contiguous() if t is not None else None


def mlp_gelu_fwd(x, w_fc, b_fc, w_proj, b_proj, residual, save_pre: bool):
    """GPT-2 MLP forward. x (..., d), w_fc (I, d), w_proj (d_out, I). Returns (y (..., d_out), a (M, I) or empty)."""
    x2 = rows2d(x)
    h, a, _ = _gemm_launch(x2, w_fc.contiguous(), None, _maybe(b_fc), None, ACT_GELU, save_pre)
    res = rows2d(residual) if residual is not None else None
    y, _, _ = _gemm_launch(h, w_proj.contiguous(), None, _maybe(b_proj), res, ACT_NONE, False)
    return y.reshape(*x.shape[:-1], w_proj.shape[0]), a


def mlp_swiglu_fwd(x, w_gate, w_up, w_down, residual, save_pre: bool):
    """Llama MLP forward. x (..., d), w_gate/w_up (I, d), w_down (d_out, I). Returns (y, g, u); g, u (M, I) are
    the saved pre-activations (empty unless ``save_pre``)."""
    x2 = rows2d(x)
    h, g, u = _gemm_launch(x2, w_gate.contiguous(), w_up.contiguous(), None, None, ACT_SWIGLU, save_pre)
    res = rows2d(residual) if residual is not None else None
    y, _, _ = _gemm_launch(h, w_down.contiguous(), None, None, res, ACT_NONE, False)
    return y.reshape(*x.shape[:-1], w_down.shape[0]), g, u


def _act_bwd(dh, a, u):
    dh, a = dh.contiguous(), a.contiguous()
    swiglu = u is not None
    da, h = torch.empty_like(a), torch.empty_like(a)
    du = torch.empty_like(a) if swiglu else a.new_empty(0)
    n = a.numel()
    if n:
        block = 1024
        act_bwd_kernel[(triton.cdiv(n, block),)](dh, a, u.contiguous() if swiglu else a, da, du if swiglu else da,
                                                 h, n, SWIGLU=swiglu, BLOCK=block, num_warps=4)
    return da, du, h


def gelu_bwd(dh, a):
    """(da, h) from dh = dL/dh and the saved pre-activation a, h = gelu_tanh(a)."""
    da, _, h = _act_bwd(dh, a, None)
    return da, h


def swiglu_bwd(dh, g, u):
    """(dg, du, h) from dh and the saved pre-activations, h = silu(g) * u."""
    return _act_bwd(dh, g, u)


def aot_specs():
    specs = []
    t = triton_dtype_name(torch.bfloat16)
    sig = {"X": f"*{t}", "W1": f"*{t}", "W2": f"*{t}", "BIAS": f"*{t}", "RES": f"*{t}", "OUT": f"*{t}",
           "PRE1": f"*{t}", "PRE2": f"*{t}", "M": "i32", "N": "i32", "K": "i32", "M_KEY": "i32"}
    sig.update({k: "constexpr" for k in ("ACT", "HAS_BIAS", "HAS_RES", "STORE_PRE", "BLOCK_M", "BLOCK_N", "BLOCK_K",
                                         "GROUP_M")})
    variants = (("gelu_up", ACT_GELU, True, False, False, (128, 256, 64, 8, 3)),
                ("gelu_up_train", ACT_GELU, True, False, True, (128, 128, 64, 8, 4)),
                ("down_residual", ACT_NONE, True, True, False, (128, 256, 64, 8, 3)),
                ("swiglu_gate_up", ACT_SWIGLU, False, False, False, (128, 128, 64, 8, 4)),
                ("swiglu_gate_up_train", ACT_SWIGLU, False, False, True, (128, 128, 64, 8, 4)),
                ("decode_down", ACT_NONE, False, True, False, (16, 64, 128, 4, 4)),
                ("decode_down_narrow", ACT_NONE, False, True, False, (16, 16, 256, 2, 4)),
                ("decode_swiglu_narrow", ACT_SWIGLU, False, False, False, (16, 32, 128, 4, 4)))
    for name, act, bias, res, pre, (bm, bn, bk, w, s) in variants:
        specs.append({
            "name": f"ffn_{name}[{bm}x{bn}x{bk},{t}]", "fn": ffn_gemm_kernel, "signature": dict(sig),
            "constexprs": {"ACT": act, "HAS_BIAS": bias, "HAS_RES": res, "STORE_PRE": pre, "BLOCK_M": bm,
                           "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
            "attrs": aligned(ffn_gemm_kernel, "X", "W1", "W2", "BIAS", "RES", "OUT", "PRE1", "PRE2", "M", "N", "K"),
            "num_warps": w, "num_stages": s, "expect_wgmma": bm >= 64})
    for swiglu in (False, True):
        specs.append({
            "name": f"ffn_{'swiglu' if swiglu else 'gelu'}_bwd_act[{t}]", "fn": act_bwd_kernel,
            "signature": {"DH": f"*{t}", "A": f"*{t}", "U": f"*{t}", "DA": f"*{t}", "DU": f"*{t}", "H": f"*{t}",
                          "n": "i32", "SWIGLU": "constexpr", "BLOCK": "constexpr"},
            "constexprs": {"SWIGLU": swiglu, "BLOCK": 1024},
            "attrs": aligned(act_bwd_kernel, "DH", "A", "U", "DA", "DU", "H", "n"),
            "num_warps": 4, "num_stages": 1, "expect_wgmma": False})
    return specs
