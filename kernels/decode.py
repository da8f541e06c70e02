"""Decode attention over a KV cache (Flash-Decoding), Triton.

A few new queries (Sq small) attend to a static KV cache of S_max slots, of which cache_seqlens[b] are valid.
The valid length of each sequence is split into NUM_SPLITS contiguous chunks of whole key blocks; program
(split, b, kv head, row block) streams its chunk of K and V once and computes, for every query head of the GQA group
and every new query (GROUP * Sq rows, padded to >= 16 for tl.dot; more than 64 rows take several row blocks), the
partial softmax state: running max m (log2 domain), running sum l and the unnormalized output acc.
A combine kernel merges the splits of each (b, query, head) row:
    out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s,   M = max_s m_s.

Memory traffic: each K/V byte of the valid cache is read once per kv head and row block (not once per query head;
one row block unless GROUP * Sq > 64); the partial states add NUM_SPLITS * (D + 2) fp32 per output row, written
once and read once by the combine.

The grid depends only on shapes (S_max, not the lengths): cache_seqlens is read on the device, never on the host, so
the launch can be captured in a CUDA graph or traced by torch.compile. Lengths are clamped to [0, S_max] on the
device. Query i of sequence b sits at position p = cache_seqlens[b] - Sq + i and sees keys 0..p (p - WINDOW_LEFT..p
with a sliding window: the splits then share only the keys from the first query's window on); a query with no key
(cache_seqlens[b] < Sq - i) gets output 0.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._helpers import aligned, check_grid, interpreter, next_pow2, sm_count

LOG2E = 1.4426950408889634


@triton.jit
def _decode_split_kernel(
    Q, K, V, SEQLENS, MID_O, MID_M, MID_L,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    Sq, H, S_max, NUM_SPLITS, N_ROW_BLOCKS, qk_scale, WINDOW_LEFT,
    D: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    split = tl.program_id(0) // N_ROW_BLOCKS
    row_block = tl.program_id(0) % N_ROW_BLOCKS
    hk = tl.program_id(1).to(tl.int64)  # (int64: they multiply strides)
    b = tl.program_id(2).to(tl.int64)

    # clamped before the cast to int32 (an int64 length past 2^31 must not wrap)
    seqlen = tl.minimum(tl.maximum(tl.load(SEQLENS + b), 0), S_max).to(tl.int32)
    # the keys any query may see: [first, seqlen), first > 0 with a sliding window (WINDOW_LEFT >= 0)
    first = tl.where(WINDOW_LEFT >= 0, tl.maximum(seqlen - Sq - WINDOW_LEFT, 0), 0)
    # balance them (not S_max) over the splits, in whole key blocks
    blocks_per_split = ((seqlen - first + BLOCK_N - 1) // BLOCK_N + NUM_SPLITS - 1) // NUM_SPLITS
    lo = first + split * blocks_per_split * BLOCK_N
    hi = tl.minimum(lo + blocks_per_split * BLOCK_N, seqlen)

    # row r = (query qi, head hk * GROUP + g): the whole GQA group shares each K/V tile; more than BLOCK_M rows
    # (many new queries) take several row blocks
    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    qi = rows // GROUP
    head = hk * GROUP + rows % GROUP
    row_ok = qi < Sq
    pos = seqlen - Sq + qi  # the last key position this row may see
    pos_lo = tl.where(WINDOW_LEFT >= 0, pos - WINDOW_LEFT, 0)  # and the first
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q = tl.load(Q + b * stride_qb + qi[:, None].to(tl.int64) * stride_qs + head[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    for start in range(lo, hi, BLOCK_N):
        n = start + offs_n
        n_ok = n < hi
        kt = tl.load(k_base + n[None, :].to(tl.int64) * stride_ks + offs_d[:, None],
                     mask=n_ok[None, :] & d_ok[:, None], other=0.0)                       # (BLOCK_D, BLOCK_N)
        s = tl.dot(q, kt, input_precision="ieee") * qk_scale
        s = tl.where((n[None, :] <= pos[:, None]) & (n[None, :] >= pos_lo[:, None]) & n_ok[None, :], s,
                     float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # rows that have seen no key yet keep m = -inf; shift them by 0 so exp2 gives 0, not NaN
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + n[:, None].to(tl.int64) * stride_vs + offs_d[None, :],
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)                        # (BLOCK_N, BLOCK_D)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new

    mid_row = ((b * Sq + qi) * H + head) * NUM_SPLITS + split
    tl.store(MID_M + mid_row, m_i, mask=row_ok)
    tl.store(MID_L + mid_row, l_i, mask=row_ok)
    tl.store(MID_O + mid_row[:, None] * D + offs_d[None, :], acc, mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _decode_combine_kernel(
    MID_O, MID_M, MID_L, O,
    stride_ob, stride_os, stride_oh,
    Sq, H, NUM_SPLITS, n_rows,
    D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # BLOCK_R output rows, row = (b * Sq + i) * H + h; the splits are merged one at a time (online, elementwise)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    h = rows % H
    i = (rows // H) % Sq
    b = rows // (H * Sq)
    offs_d = tl.arange(0, BLOCK_D)
    mask = row_ok[:, None] & (offs_d < D)[None, :]
    base = rows.to(tl.int64) * NUM_SPLITS

    m_run = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_run = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for s in range(0, NUM_SPLITS):
        m_s = tl.load(MID_M + base + s, mask=row_ok, other=float("-inf"))
        l_s = tl.load(MID_L + base + s, mask=row_ok, other=0.0)
        o_s = tl.load(MID_O + (base + s)[:, None] * D + offs_d[None, :], mask=mask, other=0.0)
        m_new = tl.maximum(m_run, m_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key in any split so far: weights 0, not NaN
        alpha = tl.exp2(m_run - m_safe)
        w = tl.exp2(m_s - m_safe)
        l_run = l_run * alpha + w * l_s
        acc = acc * alpha[:, None] + w[:, None] * o_s
        m_run = m_new
    out = acc / tl.where(l_run > 0, l_run, 1.0)[:, None]  # no key at all: acc = 0, out = 0
    tl.store(O + (b.to(tl.int64) * stride_ob + i.to(tl.int64) * stride_os + h.to(tl.int64) * stride_oh)[:, None]
             + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=mask)


def block_sizes(group: int, sq: int, head_dim: int, on_gpu: bool) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D): rows = GROUP * Sq padded to a power of two >= 16 (tl.dot's minimum), at most 64
    (16 in the interpreter, so that small tests cover several row blocks)."""
    block_m = min(64 if on_gpu else 16, max(16, next_pow2(group * sq)))
    block_d = max(16, next_pow2(head_dim))
    if not on_gpu:
        return block_m, 32, block_d  # interpreter: cost is per block, not per element
    # K/V tiles of 64 keys up to head dim 128, 32 beyond (registers and the two-stage shared-memory pipeline)
    block_n = 64 if block_d * max(block_m, 64) <= 128 * 64 else 32
    return block_m, block_n, block_d


def split_num_warps(block_m: int, block_d: int) -> int:
    # 8 warps from 16 x 128 tiles on: more K/V loads in flight per program (decode is bandwidth-bound)
    return 4 if block_m * block_d < 16 * 128 else 8


def default_num_splits(batch: int, nheads_kv: int, s_max: int, block_n: int, device: torch.device) -> int:
    """Splits per (sequence, kv head): enough programs for ~2 waves on the GPU, each with >= 4 key blocks.

    Depends only on shapes, so it is the same for every step of a static-cache decode (graphs, compile)."""
    n_blocks = max(1, triton.cdiv(s_max, block_n))
    if device.type != "cuda":
        return min(n_blocks, 2)
    target = triton.cdiv(2 * sm_count(device), max(1, batch * nheads_kv))
    return max(1, min(target, triton.cdiv(n_blocks, 4), 256))


def decode_attention_fwd(q, k_cache, v_cache, cache_seqlens, softmax_scale=None, *, window_left=-1, num_splits=None,
                         num_warps=None):
    """Launch the split and combine kernels; returns out (B, Sq, H, D) in q's dtype. No autograd, no host sync.
    window_left >= 0: a sliding window (query position p sees keys p - window_left .. p); -1: none.

    Assumes validated arguments (fastlm.ops.decode_attention checks them): q (B, Sq, H, D), caches
    (B, S_max, Hkv, D) with H % Hkv == 0, cache_seqlens (B,) integer on the same device.
    """
    B, Sq, H, D = q.shape
    S_max, Hkv = k_cache.shape[1], k_cache.shape[2]
    # the kernels index the last dim with unit stride
    q = q if q.stride(-1) == 1 else q.contiguous()
    k_cache = k_cache if k_cache.stride(-1) == 1 else k_cache.contiguous()
    v_cache = v_cache if v_cache.stride(-1) == 1 else v_cache.contiguous()
    cache_seqlens = cache_seqlens.contiguous()
    out = torch.empty((B, Sq, H, D), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else float(softmax_scale)
    group = H // Hkv
    on_gpu = q.device.type == "cuda" and not interpreter()
    block_m, block_n, block_d = block_sizes(group, Sq, D, on_gpu)
    if num_splits is None:
        num_splits = default_num_splits(B, Hkv, S_max, block_n, q.device)
    if num_warps is None:
        num_warps = split_num_warps(block_m, block_d)
    mid_o = torch.empty((B * Sq * H * num_splits, D), dtype=torch.float32, device=q.device)
    mid_m, mid_l = torch.empty((2, B * Sq * H * num_splits), dtype=torch.float32, device=q.device)
    n_row_blocks = triton.cdiv(group * Sq, block_m)
    check_grid("decode_attention", nheads_kv=Hkv, batch=B)
    _decode_split_kernel[(num_splits * n_row_blocks, Hkv, B)](
        q, k_cache, v_cache, cache_seqlens, mid_o, mid_m, mid_l,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        Sq, H, S_max, num_splits, n_row_blocks, scale * LOG2E, window_left,
        D=D, GROUP=group, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        num_warps=num_warps, num_stages=2,
    )
    n_rows = B * Sq * H
    block_r = 4 if on_gpu else 64
    _decode_combine_kernel[(triton.cdiv(n_rows, block_r),)](
        mid_o, mid_m, mid_l, out, out.stride(0), out.stride(1), out.stride(2), Sq, H, num_splits, n_rows,
        D=D, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4,
    )
    return out


def aot_specs():
    """Default GPU configurations for the ahead-of-time report (bench/kernel_report.py).

    Each spec also carries "attrs" for triton.compiler.ASTSource (pointer / stride divisibility by 16)."""
    specs = []
    for dtype, D, group, sq in (("bf16", 128, 4, 1), ("bf16", 64, 8, 1), ("fp16", 128, 4, 4), ("bf16", 256, 1, 1),
                                ("bf16", 128, 8, 16)):
        block_m, block_n, block_d = block_sizes(group, sq, D, on_gpu=True)
        specs.append({
            "name": f"decode_split[D={D},group={group},Sq={sq},{dtype}]",
            "fn": _decode_split_kernel,
            "signature": {
                "Q": f"*{dtype}", "K": f"*{dtype}", "V": f"*{dtype}", "SEQLENS": "*i32",
                "MID_O": "*fp32", "MID_M": "*fp32", "MID_L": "*fp32",
                **{f"stride_{t}{a}": "i32" for t in "qkv" for a in "bsh"},
                "Sq": "i32", "H": "i32", "S_max": "i32", "NUM_SPLITS": "i32", "N_ROW_BLOCKS": "i32",
                "qk_scale": "fp32", "WINDOW_LEFT": "i32",
                "D": "constexpr", "GROUP": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
                "BLOCK_D": "constexpr",
            },
            "constexprs": {"D": D, "GROUP": group, "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_D": block_d},
            "num_warps": split_num_warps(block_m, block_d), "num_stages": 2, "expect_wgmma": False,
        })
    for D in (128, 256):
        specs.append({
            "name": f"decode_combine[D={D},bf16]",
            "fn": _decode_combine_kernel,
            "signature": {"MID_O": "*fp32", "MID_M": "*fp32", "MID_L": "*fp32", "O": "*bf16",
                          "stride_ob": "i32", "stride_os": "i32", "stride_oh": "i32",
                          "Sq": "i32", "H": "i32", "NUM_SPLITS": "i32", "n_rows": "i32",
                          "D": "constexpr", "BLOCK_R": "constexpr", "BLOCK_D": "constexpr"},
            "constexprs": {"D": D, "BLOCK_R": 4, "BLOCK_D": D},
            "num_warps": 4, "num_stages": 1, "expect_wgmma": False,
        })
    # what the JIT sees at run time (16-byte aligned tensors, strides multiple of 16): without it the AOT compile
    # cannot prove alignment, loads stay scalar and the K/V loads are not pipelined through cp.async
    for spec in specs:
        spec["attrs"] = aligned(spec["fn"], *[name for name, ty in spec["signature"].items()
                                              if ty.startswith("*") or name.startswith("stride_")])
    return specs
