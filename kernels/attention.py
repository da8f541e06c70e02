"""Fused softmax attention in Triton: FlashAttention-2 forward and backward.

Forward (one program per (query block, batch * head)): the Q tile stays in registers while K/V tiles stream through;
scores are kept in base 2 (log2(e) folded into the softmax scale) with a running max m and running sum l (online
softmax), and the output accumulator is rescaled by exp2(m_old - m_new) whenever the max grows. O and the row
log-sum-exp (LSE, natural log) are written once. Memory traffic: Q, O once; K, V once per query block. The
Sq x Sk score matrix never exists in memory.

Backward, recomputing P from the saved LSE:
  delta = rowsum(dO * O)                                       (_bwd_preprocess)
  dV = P^T dO,  dK = scale * dS^T Q,  dS = P * (dO V^T - delta)  (_bwd_dkdv: one program per key block and kv head,
                                                                  looping over the query heads of its GQA group, so
                                                                  dK/dV of shared K/V heads are summed in registers)
  dQ = scale * dS K                                             (_bwd_dq: one program per query block and head)
No atomics; each gradient element is written once.

Masking: query i sits at key position i + Sk - Sq (bottom-right alignment, FlashAttention >= 2.1) and keeps key j iff
  (left < 0 or j >= pos - left) and (right < 0 or j <= pos + right); causal is right = 0.
Key blocks entirely outside that band are never visited; blocks entirely inside it skip the mask arithmetic.
A row that sees no key gets O = 0 and LSE = -inf.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastlm.backends import interpreter
from fastlm.kernels._helpers import aligned, autotune, check_grid

LOG2E = 1.4426950408889634


# --------------------------------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------------------------------

@triton.jit
def _load_tile(base, rows, offs_d, d_mask, stride_row, n_rows, MASK_ROWS: tl.constexpr):
    """A (rows, D) tile; without MASK_ROWS every row is known to be in bounds (interior key blocks). Row offsets in
    int64: rows * stride_row passes 2^31 for a million-token sequence of 32 x 128 heads."""
    ptrs = base + rows[:, None].to(tl.int64) * stride_row + offs_d[None, :]
    if MASK_ROWS:
        x = tl.load(ptrs, mask=(rows < n_rows)[:, None] & d_mask[None, :], other=0.0)
    else:
        x = tl.load(ptrs, mask=d_mask[None, :], other=0.0)
    return x


@triton.jit
def _load_tile_t(base, rows, offs_d, d_mask, stride_row, n_rows, MASK_ROWS: tl.constexpr):
    """The same tile transposed, (D, rows), for the B operand of tl.dot."""
    ptrs = base + rows[None, :].to(tl.int64) * stride_row + offs_d[:, None]
    if MASK_ROWS:
        x = tl.load(ptrs, mask=(rows < n_rows)[None, :] & d_mask[:, None], other=0.0)
    else:
        x = tl.load(ptrs, mask=d_mask[:, None], other=0.0)
    return x


@triton.jit
def _query_block(group, BLOCK_M: tl.constexpr):
    """(batch, head, kv head, first query row) of a program on the grid (query blocks, heads, batch); batch and heads
    in int64, as they multiply strides (a batch stride times the batch index passes 2^31 from 2^31 elements on)."""
    h = tl.program_id(1).to(tl.int64)
    return tl.program_id(2).to(tl.int64), h, h // group, tl.program_id(0) * BLOCK_M


@triton.jit
def _store_tile(base, rows, offs_d, d_mask, stride_row, n_rows, x):
    tl.store(base + rows[:, None].to(tl.int64) * stride_row + offs_d[None, :], x.to(base.dtype.element_ty),
             mask=(rows < n_rows)[:, None] & d_mask[None, :])


@triton.jit
def _key_range(m_start, Sk, offset, wl, wr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Key blocks [lo, hi) that rows [m_start, m_start + BLOCK_M) may see, and the sub-range [full_lo, full_hi)
    of blocks that every one of those rows sees completely (no mask needed). All multiples of BLOCK_N."""
    lo = 0
    hi = Sk
    full_lo = 0
    full_hi = (Sk // BLOCK_N) * BLOCK_N
    if HAS_LEFT:
        first = tl.maximum(m_start + offset - wl, 0)                       # first key of the first row
        lo = (first // BLOCK_N) * BLOCK_N
        last_first = tl.maximum(m_start + BLOCK_M - 1 + offset - wl, 0)   # first key of the last row
        full_lo = ((last_first + BLOCK_N - 1) // BLOCK_N) * BLOCK_N
    if HAS_RIGHT:
        end = tl.minimum(tl.maximum(m_start + BLOCK_M + offset + wr, 0), Sk)  # one past the last key of the last row
        hi = end
        first_end = tl.maximum(m_start + offset + wr + 1, 0)              # one past the last key of the first row
        full_hi = tl.minimum(full_hi, (first_end // BLOCK_N) * BLOCK_N)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.maximum(tl.minimum(full_hi, hi), full_lo)
    return lo, hi, full_lo, full_hi


@triton.jit
def _band_mask(rows, cols, Sk, offset, wl, wr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """True where query ``rows`` may see key ``cols`` (both already broadcast to the tile's shape)."""
    keep = cols < Sk
    pos = rows + offset
    if HAS_LEFT:
        keep = keep & (cols >= pos - wl)
    if HAS_RIGHT:
        keep = keep & (cols <= pos + wr)
    return keep


# --------------------------------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------------------------------

@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_m, offs_n, offs_d, d_mask,
               start, end, Sk, offset, wl, wr, qk_scale,
               MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
               BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    for start_n in range(start, end, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        kt = _load_tile_t(k_base, cols, offs_d, d_mask, stride_kn, Sk, MASKED)                # (D, N)
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale                         # (M, N), log2 units
        if MASKED:
            s = tl.where(_band_mask(offs_m[:, None], cols[None, :], Sk, offset, wl, wr, HAS_LEFT, HAS_RIGHT), s,
                         float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)                           # rows with no key yet
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(v_base, cols, offs_d, d_mask, stride_vn, Sk, MASKED)                 # (N, D)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(Q, K, V, O, LSE,
              stride_qb, stride_qm, stride_qh,
              stride_kb, stride_kn, stride_kh,
              stride_vb, stride_vn, stride_vh,
              stride_ob, stride_om, stride_oh,
              H, Sq, Sk, D, group, wl, wr, qk_scale, seq_bucket,
              HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, BLOCK_D: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    b, h, hk, m_start = _query_block(group, BLOCK_M)
    offset = Sk - Sq
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D

    q = _load_tile(Q + b * stride_qb + h * stride_qh, offs_m, offs_d, d_mask, stride_qm, Sq, True)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    lo, hi, full_lo, full_hi = _key_range(m_start, Sk, offset, wl, wr, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    if HAS_LEFT:
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_m, offs_n, offs_d,
                                   d_mask, lo, full_lo, Sk, offset, wl, wr, qk_scale, True, HAS_LEFT, HAS_RIGHT,
                                   BLOCK_N, PRECISION)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_m, offs_n, offs_d,
                               d_mask, full_lo, full_hi, Sk, offset, wl, wr, qk_scale, False, HAS_LEFT, HAS_RIGHT,
                               BLOCK_N, PRECISION)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_m, offs_n, offs_d,
                               d_mask, full_hi, hi, Sk, offset, wl, wr, qk_scale, True, HAS_LEFT, HAS_RIGHT,
                               BLOCK_N, PRECISION)

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    # (log2 domain to natural log: times ln 2)
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    _store_tile(O + b * stride_ob + h * stride_oh, offs_m, offs_d, d_mask, stride_om, Sq, out)
    tl.store(LSE + (b * H + h) * Sq + offs_m, lse, mask=offs_m < Sq)


# --------------------------------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------------------------------

@triton.jit
def _bwd_preprocess(O, DO, DLSE, DELTA,
                    stride_ob, stride_om, stride_oh, stride_dob, stride_dom, stride_doh,
                    H, Sq, D, HAS_DLSE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta = rowsum(dO * O) - dLSE (an upstream LSE gradient adds P * dLSE to dS, i.e. shifts delta)."""
    b, h, _, m_start = _query_block(1, BLOCK_M)
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    row_base = (b * H + h) * Sq
    o = _load_tile(O + b * stride_ob + h * stride_oh, offs_m, offs_d, d_mask, stride_om, Sq, True)
    do = _load_tile(DO + b * stride_dob + h * stride_doh, offs_m, offs_d, d_mask, stride_dom, Sq, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + row_base + offs_m, mask=offs_m < Sq, other=0.0)
    tl.store(DELTA + row_base + offs_m, delta, mask=offs_m < Sq)


@triton.jit
def _load_lse2(LSE, row_base, offs_m, Sq):
    """LSE in log2 units; rows that saw no key get +inf so that P = exp2(s - lse) is 0 there, not NaN."""
    lse = tl.load(LSE + row_base + offs_m, mask=offs_m < Sq, other=float("inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV,
                   stride_qb, stride_qm, stride_qh,
                   stride_kb, stride_kn, stride_kh,
                   stride_vb, stride_vn, stride_vh,
                   stride_dob, stride_dom, stride_doh,
                   stride_dkb, stride_dkn, stride_dkh,
                   stride_dvb, stride_dvn, stride_dvh,
                   H, Hkv, Sq, Sk, D, group, wl, wr, qk_scale, sm_scale, seq_bucket,
                   HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    pid_n = tl.program_id(0)
    hk = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    offset = Sk - Sq
    n_start = pid_n * BLOCK_N
    offs_n = n_start + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D

    k = _load_tile(K + b * stride_kb + hk * stride_kh, offs_n, offs_d, d_mask, stride_kn, Sk, True)  # (N, D)
    v = _load_tile(V + b * stride_vb + hk * stride_vh, offs_n, offs_d, d_mask, stride_vn, Sk, True)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    # queries that can see keys [n_start, n_start + BLOCK_N): pos + wr >= j and pos - wl <= j
    m_lo = 0
    m_hi = Sq
    if HAS_RIGHT:
        m_lo = tl.maximum(n_start - offset - wr, 0)
        m_lo = (m_lo // BLOCK_M) * BLOCK_M
    if HAS_LEFT:
        m_hi = tl.minimum(tl.maximum(n_start + BLOCK_N - offset + wl, 0), Sq)

    for g in range(0, group):
        h = hk * group + g
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        row_base = (b * H + h) * Sq
        for m_start in range(m_lo, m_hi, BLOCK_M):
            m_start = tl.multiple_of(m_start, BLOCK_M)
            offs_m = m_start + offs_m0
            qt = _load_tile_t(q_base, offs_m, offs_d, d_mask, stride_qm, Sq, True)                # (D, M)
            do = _load_tile(do_base, offs_m, offs_d, d_mask, stride_dom, Sq, True)                # (M, D)
            lse2 = _load_lse2(LSE, row_base, offs_m, Sq)
            delta = tl.load(DELTA + row_base + offs_m, mask=offs_m < Sq, other=0.0)
            st = tl.dot(k, qt, input_precision=PRECISION) * qk_scale                        # (N, M) = S^T
            keep_t = _band_mask(offs_m[None, :], offs_n[:, None], Sk, offset, wl, wr, HAS_LEFT, HAS_RIGHT)
            pt = tl.where(keep_t, tl.math.exp2(st - lse2[None, :]), 0.0)
            dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=PRECISION)
            dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)                          # (N, M) = (dO V^T)^T
            dst = pt * (dpt - delta[None, :])
            dk = tl.dot(dst.to(qt.dtype), tl.trans(qt), dk, input_precision=PRECISION)
    _store_tile(DK + b * stride_dkb + hk * stride_dkh, offs_n, offs_d, d_mask, stride_dkn, Sk, dk * sm_scale)
    _store_tile(DV + b * stride_dvb + hk * stride_dvh, offs_n, offs_d, d_mask, stride_dvn, Sk, dv)


@triton.jit
def _dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, offs_m, offs_n, offs_d, d_mask,
              start, end, Sk, offset, wl, wr, qk_scale,
              MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
              BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    for start_n in range(start, end, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        kt = _load_tile_t(k_base, cols, offs_d, d_mask, stride_kn, Sk, MASKED)                # (D, N)
        vt = _load_tile_t(v_base, cols, offs_d, d_mask, stride_vn, Sk, MASKED)                # (D, N)
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
        p = tl.math.exp2(s - lse2[:, None])
        if MASKED:
            p = tl.where(_band_mask(offs_m[:, None], cols[None, :], Sk, offset, wl, wr, HAS_LEFT, HAS_RIGHT), p, 0.0)
        dp = tl.dot(do, vt, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kt.dtype), tl.trans(kt), dq, input_precision=PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ,
                 stride_qb, stride_qm, stride_qh,
                 stride_kb, stride_kn, stride_kh,
                 stride_vb, stride_vn, stride_vh,
                 stride_dob, stride_dom, stride_doh,
                 stride_dqb, stride_dqm, stride_dqh,
                 H, Sq, Sk, D, group, wl, wr, qk_scale, sm_scale, seq_bucket,
                 HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    b, h, hk, m_start = _query_block(group, BLOCK_M)
    offset = Sk - Sq
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    row_base = (b * H + h) * Sq

    q = _load_tile(Q + b * stride_qb + h * stride_qh, offs_m, offs_d, d_mask, stride_qm, Sq, True)
    do = _load_tile(DO + b * stride_dob + h * stride_doh, offs_m, offs_d, d_mask, stride_dom, Sq, True)
    lse2 = _load_lse2(LSE, row_base, offs_m, Sq)
    delta = tl.load(DELTA + row_base + offs_m, mask=offs_m < Sq, other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    lo, hi, full_lo, full_hi = _key_range(m_start, Sk, offset, wl, wr, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    if HAS_LEFT:
        dq = _dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, offs_m, offs_n, offs_d, d_mask,
                       lo, full_lo, Sk, offset, wl, wr, qk_scale, True, HAS_LEFT, HAS_RIGHT, BLOCK_N, PRECISION)
    dq = _dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, offs_m, offs_n, offs_d, d_mask,
                   full_lo, full_hi, Sk, offset, wl, wr, qk_scale, False, HAS_LEFT, HAS_RIGHT, BLOCK_N, PRECISION)
    dq = _dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, offs_m, offs_n, offs_d, d_mask,
                   full_hi, hi, Sk, offset, wl, wr, qk_scale, True, HAS_LEFT, HAS_RIGHT, BLOCK_N, PRECISION)
    _store_tile(DQ + b * stride_dqb + h * stride_dqh, offs_m, offs_d, d_mask, stride_dqm, Sq, dq * sm_scale)


# --------------------------------------------------------------------------------------------------------------------
# Configurations: a function of the head dim, one small configuration in the interpreter
# --------------------------------------------------------------------------------------------------------------------

def _configs(shapes):
    if interpreter():
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


# The first shape of each list is the default (compiled by bench/kernel_report.py, spill-free on sm_90); the rest are
# autotuning candidates. Tuples are (BLOCK_M, BLOCK_N, num_warps, num_stages).

def fwd_configs(block_d: int) -> list[triton.Config]:
    """Forward tiles. BLOCK_M = 128 with 8 warps gives two 64-row wgmma warpgroups on Hopper. At head dim 256 the
    Q tile and the accumulator alone fill the register file: 32 x 32 tiles are the largest that do not spill."""
    if block_d <= 64:
        return _configs([(128, 128, 8, 3), (128, 64, 4, 3), (128, 64, 8, 4), (64, 64, 4, 3)])
    if block_d <= 128:
        return _configs([(128, 64, 8, 3), (128, 128, 8, 2), (128, 32, 4, 3), (64, 64, 4, 3)])
    return _configs([(32, 32, 4, 2), (128, 16, 8, 2), (64, 32, 4, 2)])


def dkdv_configs(block_d: int) -> list[triton.Config]:
    """dK/dV program: K, V, dK, dV (4 x BLOCK_N x D) stay in registers while query blocks stream through."""
    if block_d <= 64:
        return _configs([(64, 64, 4, 2), (32, 64, 4, 2), (64, 128, 8, 2)])
    if block_d <= 128:
        return _configs([(64, 64, 8, 2), (32, 64, 4, 2), (64, 128, 8, 2)])
    return _configs([(16, 32, 8, 1), (16, 16, 4, 1)])


def dq_configs(block_d: int) -> list[triton.Config]:
    """dQ program: Q, dO and dQ stay in registers while key blocks stream through."""
    if block_d <= 64:
        return _configs([(64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 2)])
    if block_d <= 128:
        return _configs([(128, 64, 8, 2), (64, 32, 8, 2), (32, 64, 4, 2)])
    return _configs([(32, 16, 8, 1), (16, 16, 4, 1)])


_AUTOTUNE_KEY = ["seq_bucket", "group", "BLOCK_D", "HAS_LEFT", "HAS_RIGHT", "PRECISION"]


def _config_key(c):
    return c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages


def _prune_by_head_dim(make):
    """The candidates of the call's head dim, in make()'s order (its default first)."""
    def prune(configs, named_args, **kwargs):
        block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
        by_key = {_config_key(c): c for c in configs}
        return [by_key[_config_key(c)] for c in make(block_d)]
    return prune


def _all_configs(make):
    seen, out = set(), []
    for d in (16, 32, 64, 128, 256):
        for c in make(d):
            if _config_key(c) not in seen:
                seen.add(_config_key(c))
                out.append(c)
    return out


def _autotuned(fn, make):
    return autotune(_all_configs(make), _AUTOTUNE_KEY, _prune_by_head_dim(make))(fn)


_attn_fwd_tuned = _autotuned(_attn_fwd, fwd_configs)
_attn_bwd_dkdv_tuned = _autotuned(_attn_bwd_dkdv, dkdv_configs)
_attn_bwd_dq_tuned = _autotuned(_attn_bwd_dq, dq_configs)


# --------------------------------------------------------------------------------------------------------------------
# Launch functions (no autograd): check, allocate, launch
# --------------------------------------------------------------------------------------------------------------------

def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs are computed in true fp32: tf32 would be ~1e3 times less accurate than torch's fp32 reference
    return "ieee" if dtype == torch.float32 else "tf32"


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _seq_bucket(n: int) -> int:
    return triton.next_power_of_2(max(n, 1))


def _strides(t):
    return t.stride(0), t.stride(1), t.stride(2)


def attention_fwd(q, k, v, causal: bool, softmax_scale: float, window_left: int = -1, window_right: int = -1):
    """out (B, Sq, H, D) and lse (B, H, Sq) fp32. Arguments are assumed validated (fastlm.ops.attention does it)."""
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    B, Sq, H, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    if causal:
        window_right = 0
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((B, H, Sq), device=q.device, dtype=torch.float32)
    check_grid("attention", batch=B, nheads=H)
    grid = lambda meta: (triton.cdiv(Sq, meta["BLOCK_M"]), H, B)  # noqa: E731
    _attn_fwd_tuned[grid](
        q, k, v, out, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(out),
        H, Sq, Sk, D, H // Hkv, window_left, window_right, softmax_scale * LOG2E, _seq_bucket(max(Sq, Sk)),
        HAS_LEFT=window_left >= 0, HAS_RIGHT=window_right >= 0, BLOCK_D=_block_d(D), PRECISION=_precision(q.dtype))
    return out, lse


def attention_bwd(dout, q, k, v, out, lse, causal: bool, softmax_scale: float, window_left: int = -1,
                  window_right: int = -1, dlse=None):
    """dq, dk, dv for out = attention(q, k, v); ``dlse`` is an optional upstream gradient of lse (B, H, Sq)."""
    dout, q, k, v, out = (_last_dim_contiguous(t) for t in (dout, q, k, v, out))  # any other strides, 0 included
    B, Sq, H, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    if causal:
        window_right = 0
    block_d = _block_d(D)
    delta = torch.empty((B, H, Sq), device=q.device, dtype=torch.float32)
    if dlse is not None:
        dlse = dlse.to(torch.float32).contiguous()
    pre_m = 64 if block_d <= 128 else 32
    check_grid("attention backward", batch=B, nheads=H)
    _bwd_preprocess[(triton.cdiv(Sq, pre_m), H, B)](
        out, dout, dlse if dlse is not None else delta, delta, *_strides(out), *_strides(dout), H, Sq, D,
        HAS_DLSE=dlse is not None, BLOCK_M=pre_m, BLOCK_D=block_d)
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    common = dict(HAS_LEFT=window_left >= 0, HAS_RIGHT=window_right >= 0, BLOCK_D=block_d,
                  PRECISION=_precision(q.dtype))
    bucket = _seq_bucket(max(Sq, Sk))
    _attn_bwd_dkdv_tuned[lambda meta: (triton.cdiv(Sk, meta["BLOCK_N"]), Hkv, B)](
        q, k, v, dout, lse, delta, dk, dv, *_strides(q), *_strides(k), *_strides(v), *_strides(dout),
        *_strides(dk), *_strides(dv), H, Hkv, Sq, Sk, D, H // Hkv, window_left, window_right,
        softmax_scale * LOG2E, softmax_scale, bucket, **common)
    _attn_bwd_dq_tuned[lambda meta: (triton.cdiv(Sq, meta["BLOCK_M"]), H, B)](
        q, k, v, dout, lse, delta, dq, *_strides(q), *_strides(k), *_strides(v), *_strides(dout), *_strides(dq),
        H, Sq, Sk, D, H // Hkv, window_left, window_right, softmax_scale * LOG2E, softmax_scale, bucket, **common)
    return dq, dk, dv


# --------------------------------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (bench/kernel_report.py)
# --------------------------------------------------------------------------------------------------------------------

def aot_specs() -> list[dict]:
    """Each kernel at its first (default) GPU configuration: bf16 at head dims 64, 128, 256 and fp16 at 128."""
    specs = []
    ints = lambda *names: {n: "i32" for n in names}  # noqa: E731

    def strides(*tensors):
        rows = lambda t: "m" if t in ("q", "do", "dq", "o") else "n"  # noqa: E731
        return ints(*(f"stride_{t}{s}" for t in tensors for s in ("b", rows(t), "h")))

    for dtype, d in (("bf16", 64), ("bf16", 128), ("bf16", 256), ("fp16", 128)):
        p = "*" + dtype
        tag = f"D={d},{dtype},causal"
        band = {"HAS_LEFT": False, "HAS_RIGHT": True, "BLOCK_D": d, "PRECISION": "tf32"}
        sig = {n: p for n in ("Q", "K", "V", "O")} | {"LSE": "*fp32"} | strides("q", "k", "v") \
            | ints("stride_ob", "stride_om", "stride_oh", "H", "Sq", "Sk", "D", "group", "wl", "wr") \
            | {"qk_scale": "fp32", "seq_bucket": "i32"}
        specs.append(_spec(f"attention_fwd[{tag}]", _attn_fwd, sig, band, fwd_configs, d, expect_wgmma=d <= 128))
        if dtype != "bf16":
            continue
        sig = {n: p for n in ("Q", "K", "V", "DO")} | {"LSE": "*fp32", "DELTA": "*fp32", "DK": p, "DV": p} \
            | strides("q", "k", "v", "do", "dk", "dv") | ints("H", "Hkv", "Sq", "Sk", "D", "group", "wl", "wr") \
            | {"qk_scale": "fp32", "sm_scale": "fp32", "seq_bucket": "i32"}
        specs.append(_spec(f"attention_bwd_dkdv[{tag}]", _attn_bwd_dkdv, sig, band, dkdv_configs, d))
        sig = {n: p for n in ("Q", "K", "V", "DO")} | {"LSE": "*fp32", "DELTA": "*fp32", "DQ": p} \
            | strides("q", "k", "v", "do", "dq") | ints("H", "Sq", "Sk", "D", "group", "wl", "wr") \
            | {"qk_scale": "fp32", "sm_scale": "fp32", "seq_bucket": "i32"}
        specs.append(_spec(f"attention_bwd_dq[{tag}]", _attn_bwd_dq, sig, band, dq_configs, d))
    sig = {"O": "*bf16", "DO": "*bf16", "DLSE": "*fp32", "DELTA": "*fp32"} | strides("o") \
        | ints("stride_dob", "stride_dom", "stride_doh", "H", "Sq", "D")
    consts = {"HAS_DLSE": False, "BLOCK_M": 64, "BLOCK_D": 128}
    specs.append(dict(name="attention_bwd_preprocess[D=128,bf16]", fn=_bwd_preprocess,
                      signature=_with_constexprs(sig, consts), constexprs=consts,
                      attrs=_aligned_attrs(_bwd_preprocess, sig), num_warps=4, num_stages=1, expect_wgmma=False))
    return specs


def _spec(name, fn, signature, consts, make_configs, block_d, expect_wgmma=False):
    config = _first_gpu_config(make_configs, block_d)
    consts = consts | config.kwargs
    return dict(name=name, fn=fn, signature=_with_constexprs(signature, consts), constexprs=consts,
                attrs=_aligned_attrs(fn, signature), num_warps=config.num_warps, num_stages=config.num_stages,
                expect_wgmma=expect_wgmma)


def _first_gpu_config(make, block_d):
    import os
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        return make(block_d)[0]
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved


def _with_constexprs(signature: dict, constexprs: dict) -> dict:
    return signature | {name: "constexpr" for name in constexprs}


def _aligned_attrs(fn, signature: dict) -> dict:
    """Pointers and strides marked as multiples of 16, as Triton specializes them at run time for D % 16 == 0."""
    return aligned(fn, *(n for n, t in signature.items() if t.startswith("*") or n.startswith("stride_")))


