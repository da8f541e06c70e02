"""Cross-entropy over a large vocabulary, one program per token row (on a GPU), streaming the row in BLOCK_V chunks.

Pass 1 (unless the row's logsumexp is given): online logsumexp in fp32 (running max, rescaled running sum, exp2 with
log2(e) folded in), plus a single load of the target logit; writes the row's loss and LSE (fp32, 8 bytes per row).
Pass 2 (when a gradient is asked for): re-streams the row and writes (softmax - onehot(target)) * scale in the
gradient buffer's dtype; the buffer may be the logits themselves (in-place, as the fused linear + cross-entropy does
with its per-chunk logits). Nothing of size (N, V) is ever held in fp32.

Traffic: forward reads the logits once; backward (LSE given) reads them once and writes the gradient once; the
fused mode reads twice and writes once. Targets equal to ignore_index give loss 0 and gradient 0; a target outside
[0, V) gives a NaN loss and a NaN gradient row (the ops layer rejects such targets eagerly outside torch.compile,
where they cannot be checked without a host sync).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._helpers import aligned, interpreter, next_pow2, triton_dtype_name

@triton.jit
def cross_entropy_kernel(LOGITS, stride_l, TARGETS, LOSS, LSE, GRAD, stride_g, GSCALE, n_rows, V, ignore_index,
                         LSE_IN: tl.constexpr, WRITE_LOSS: tl.constexpr, HAS_GRAD: tl.constexpr,
                         HAS_GSCALE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    # BLOCK_N rows per program: 1 on a GPU (a row is long), many in the interpreter (fewer numpy steps)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < n_rows
    rows64 = rows.to(tl.int64)
    logits = LOGITS + rows64[:, None] * stride_l
    cols = tl.arange(0, BLOCK_V)[None, :]
    tgt = tl.load(TARGETS + rows, mask=rmask, other=ignore_index).to(tl.int64)
    valid = tgt != ignore_index
    in_range = (tgt >= 0) & (tgt < V)
    if LSE_IN:
        lse = tl.load(LSE + rows, mask=rmask, other=0.0)
    else:
        # online logsumexp; 1.4426... = log2(e). While the running max is -inf (only -inf so far) the shift is 0,
        # so -inf - -inf never happens; a finite start value instead would swallow rows of huge negative logits.
        m = tl.full([BLOCK_N], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK_N], tl.float32)
        for start in range(0, V, BLOCK_V):
            c = start + cols
            x = tl.load(logits + c, mask=rmask[:, None] & (c < V), other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=1))
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            s = s * tl.exp2((m - shift) * 1.4426950408889634) + \
                tl.sum(tl.exp2((x - shift[:, None]) * 1.4426950408889634), axis=1)
            m = m_new
        log_s = tl.log(tl.where(rmask, s, 1.0))      # padding rows of the last block: no log(0)
        # a +inf logit: the sum above is inf - inf = NaN, but the logsumexp is +inf (and so is the loss, unless the
        # target's logit is +inf too), as torch gives them
        log_s = tl.where(m == float("inf"), 0.0, log_s)
        lse = m + log_s
    if WRITE_LOSS:  # (never with LSE_IN) the loss as (m - picked) + log s: exact next to huge logits
        picked = tl.load(LOGITS + rows64 * stride_l + tgt, mask=rmask & valid & in_range, other=0.0).to(tl.float32)
        loss = tl.where(valid, tl.where(in_range, (m - picked) + log_s, float("nan")), 0.0)
        tl.store(LOSS + rows, loss, mask=rmask)
        tl.store(LSE + rows, lse, mask=rmask)
    if HAS_GRAD:
        scale = tl.where(valid, tl.where(in_range, 1.0, float("nan")), 0.0)
        if HAS_GSCALE:
            scale *= tl.load(GSCALE + rows, mask=rmask, other=0.0).to(tl.float32)
        grad = GRAD + rows64[:, None] * stride_g
        if WRITE_LOSS:
            # in place (cross_entropy_fused_: GRAD is LOGITS) the thread that read the target's logit above and
            # the one that writes its gradient below differ: a barrier orders the read first
            tl.debug_barrier()
        for start in range(0, V, BLOCK_V):
            c = start + cols
            mask = rmask[:, None] & (c < V)
            x = tl.load(logits + c, mask=mask, other=0.0).to(tl.float32)
            p = tl.exp2((x - lse[:, None]) * 1.4426950408889634)
            g = (p - tl.where(c == tgt[:, None], 1.0, 0.0)) * scale[:, None]
            tl.store(grad + c, g.to(GRAD.dtype.element_ty), mask=mask)


def _block(V: int):
    """(BLOCK_N, BLOCK_V, num_warps): a GPU program streams one row in 4096-wide chunks (16 values per thread); the
    interpreter takes blocks of rows and wide chunks."""
    if interpreter():
        block_v = min(next_pow2(V), 8192)
        return max(1, 32768 // block_v), block_v, 1
    block_v = min(next_pow2(V), 4096)
    return 1, block_v, max(1, min(8, block_v // 512))


def _launch(logits, targets, loss, lse, grad, gscale, ignore_index, lse_in, write_loss):
    n, V = logits.shape
    block_n, block_v, warps = _block(V)
    cross_entropy_kernel[(triton.cdiv(n, block_n),)](
        logits, logits.stride(0), targets, loss, lse, grad if grad is not None else logits,
        grad.stride(0) if grad is not None else 0, gscale if gscale is not None else lse, n, V, ignore_index,
        LSE_IN=lse_in, WRITE_LOSS=write_loss, HAS_GRAD=grad is not None, HAS_GSCALE=gscale is not None,
        BLOCK_N=block_n, BLOCK_V=block_v, num_warps=warps)


def _rows(logits):
    return logits if logits.stride(-1) == 1 else logits.contiguous()


def cross_entropy_fwd(logits, targets, ignore_index: int):
    """Per-row (loss, lse), both (N,) fp32; loss is 0 where targets == ignore_index."""
    n = logits.shape[0]
    loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    lse = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n:
        _launch(_rows(logits), targets.contiguous(), loss, lse, None, None, ignore_index, False, True)
    return loss, lse


def cross_entropy_bwd(grad_loss, logits, targets, lse, ignore_index: int):
    """d(sum_i grad_loss[i] * loss[i]) / d logits, in the logits' dtype, from the saved per-row lse."""
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    if logits.shape[0]:
        _launch(_rows(logits), targets.contiguous(), None, lse.contiguous(), grad,
                grad_loss.to(torch.float32).contiguous(), ignore_index, True, False)
    return grad


def cross_entropy_fused_(logits, targets, ignore_index: int, gscale=None):
    """Loss and gradient in one call, the gradient written over ``logits`` (a contiguous scratch chunk):
    returns per-row (loss, lse); logits then hold (softmax - onehot) * (gscale per row, or 1)."""
    n = logits.shape[0]
    loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    lse = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n:
        _launch(logits, targets, loss, lse, logits, gscale, ignore_index, False, True)
    return loss, lse


def aot_specs():
    specs = []
    block, warps = 4096, 8
    t = triton_dtype_name(torch.bfloat16)
    sig = {"LOGITS": f"*{t}", "stride_l": "i64", "TARGETS": "*i64", "LOSS": "*fp32", "LSE": "*fp32",
           "GRAD": f"*{t}", "stride_g": "i64", "GSCALE": "*fp32", "n_rows": "i32", "V": "i32", "ignore_index": "i32",
           "LSE_IN": "constexpr", "WRITE_LOSS": "constexpr", "HAS_GRAD": "constexpr", "HAS_GSCALE": "constexpr",
           "BLOCK_N": "constexpr", "BLOCK_V": "constexpr"}
    for name, lse_in, write_loss, has_grad, has_gscale in (("fwd", False, True, False, False),
                                                           ("bwd", True, False, True, True),
                                                           ("fused", False, True, True, False)):
        specs.append({
            "name": f"cross_entropy_{name}[V=128256,{t}]", "fn": cross_entropy_kernel, "signature": dict(sig),
            "constexprs": {"LSE_IN": lse_in, "WRITE_LOSS": write_loss, "HAS_GRAD": has_grad,
                           "HAS_GSCALE": has_gscale, "BLOCK_N": 1, "BLOCK_V": block},
            "attrs": aligned(cross_entropy_kernel, "LOGITS", "stride_l", "TARGETS", "LOSS", "LSE", "GRAD", "stride_g",
                             "GSCALE", "V"),
            "num_warps": warps, "num_stages": 1, "expect_wgmma": False})
    return specs
