"""CPU check of the tensor-core index arithmetic of csrc/cuda/ (no GPU needed): numpy emulations of ldmatrix (plain and
.trans) and mma.m16n8k16 as the PTX ISA defines their fragments, driven with the shared-memory address formulas of
attention_tile.cuh (warp_qk, warp_pv) and of ffn.cu's mma.sync GEMM (every warp's operand rows and output elements),
compared with plain matrix products; and of wgmma.mma_async (sm_90a): the 64-bit shared-memory descriptor decoded
field by field, the 128-byte swizzle applied to absolute byte addresses, K-major and MN-major (transposed) canonical
layouts and the m64nNk16 accumulator / register-A fragments, driven with wgmma.cuh's descriptors and sw128 tile
offsets as attention_sm90.cu and ffn.cu's wgmma GEMM use them, their operands loaded from global memory by emulated
TMA boxes through tma.cuh's tensor-map geometry (128-byte swizzle, zero fill); and the lane / column / k mapping of
ffn.cu's CUDA-core gemv kernel. Every formula these checks take from the kernels (sw128_desc, slab, k_step, mn_step,
mn_lbo, sm90_tile, tile_map, ldsm_a, ldsm_b, ldsm_b_trans, the gemm_*, wg_gemm_* and gemv_* mappings) is compared
with the C++ one, printed by tests/cuda_layout_test.cu, in tests/test_cuda_ext.py.

    python bench/dev/mma_layout_emu.py      (tests/test_cuda_ext.py runs it too)
"""
import numpy as np
rng = np.random.default_rng(0)

def ldmatrix_x4(mem, addr_of_lane, trans=False):
    # mem: flat array; addr_of_lane(l) -> flat element offset of the row start given by lane l
    regs = np.zeros((32, 4, 2))
    for i in range(4):
        rows = [mem[addr_of_lane(8 * i + r): addr_of_lane(8 * i + r) + 8] for r in range(8)]
        M = np.array(rows)  # 8x8, M[r][c]
        for L in range(32):
            if not trans:
                regs[L, i] = M[L // 4, 2 * (L % 4): 2 * (L % 4) + 2]
            else:
                regs[L, i] = [M[2 * (L % 4), L // 4], M[2 * (L % 4) + 1, L // 4]]
    return regs

# mma.cuh's rows of the lanes' ldmatrix addresses: element offsets in a tile of row stride `stride`
def ldsm_a(lane, row0, col0, stride):         # A, 16 x 16 at (row0, col0)
    return (row0 + (lane & 15)) * stride + col0 + (lane >> 4) * 8

def ldsm_b(lane, row0, col0, stride):         # B, two n8 tiles stored n-major
    return (row0 + (lane & 7) + ((lane >> 4) << 3)) * stride + col0 + ((lane >> 3) & 1) * 8

def ldsm_b_trans(lane, row0, col0, stride):   # B, two n8 tiles stored k-major (ldmatrix .trans)
    return (row0 + (lane & 7) + ((lane >> 3) & 1) * 8) * stride + col0 + (lane >> 4) * 8

def mma(c, a, b0, b1):
    # c: (32,4) floats, a: (32,4,2), b0,b1: (32,2)
    A = np.zeros((16, 16)); B = np.zeros((16, 8)); C = np.zeros((16, 8))
    for L in range(32):
        g, t = L // 4, L % 4
        A[g, 2*t:2*t+2] = a[L, 0]; A[g+8, 2*t:2*t+2] = a[L, 1]
        A[g, 2*t+8:2*t+10] = a[L, 2]; A[g+8, 2*t+8:2*t+10] = a[L, 3]
        B[2*t:2*t+2, g] = b0[L]; B[2*t+8:2*t+10, g] = b1[L]
        C[g, 2*t:2*t+2] = c[L, 0:2]; C[g+8, 2*t:2*t+2] = c[L, 2:4]
    D = C + A @ B
    out = np.zeros((32, 4))
    for L in range(32):
        g, t = L // 4, L % 4
        out[L, 0:2] = D[g, 2*t:2*t+2]; out[L, 2:4] = D[g+8, 2*t:2*t+2]
    return out

def frag_to_matrix(s, ntiles):
    M = np.zeros((16, 8 * ntiles))
    for j in range(ntiles):
        for L in range(32):
            g, t = L // 4, L % 4
            M[g, 8*j+2*t:8*j+2*t+2] = s[j][L, 0:2]; M[g+8, 8*j+2*t:8*j+2*t+2] = s[j][L, 2:4]
    return M

def check_attention(D, NKEYS):
    S = D + 8
    q = np.zeros(16 * S); k = np.zeros(NKEYS * S); v = np.zeros(NKEYS * S)
    Q = rng.standard_normal((16, D)); K = rng.standard_normal((NKEYS, D)); V = rng.standard_normal((NKEYS, D))
    for r in range(16): q[r*S:r*S+D] = Q[r]
    for r in range(NKEYS): k[r*S:r*S+D] = K[r]; v[r*S:r*S+D] = V[r]
    s = [np.zeros((32, 4)) for _ in range(NKEYS // 8)]
    for kk in range(D // 16):
        a = ldmatrix_x4(q, lambda lane: ldsm_a(lane, 0, kk * 16, S))
        for jp in range(NKEYS // 16):
            b = ldmatrix_x4(k, lambda lane: ldsm_b(lane, jp * 16, kk * 16, S))
            s[2*jp] = mma(s[2*jp], a, b[:, 0], b[:, 1]); s[2*jp+1] = mma(s[2*jp+1], a, b[:, 2], b[:, 3])
    Sm = frag_to_matrix(s, NKEYS // 8)
    assert np.allclose(Sm, Q @ K.T), "qk"
    # P = S (values), O = P V
    o = [np.zeros((32, 4)) for _ in range(D // 8)]
    for kk in range(NKEYS // 16):
        a = np.zeros((32, 4, 2))
        a[:, 0] = s[2*kk][:, 0:2]; a[:, 1] = s[2*kk][:, 2:4]; a[:, 2] = s[2*kk+1][:, 0:2]; a[:, 3] = s[2*kk+1][:, 2:4]
        for dp in range(D // 16):
            b = ldmatrix_x4(v, lambda lane: ldsm_b_trans(lane, kk * 16, dp * 16, S), trans=True)
            o[2*dp] = mma(o[2*dp], a, b[:, 0], b[:, 1]); o[2*dp+1] = mma(o[2*dp+1], a, b[:, 2], b[:, 3])
    Om = frag_to_matrix(o, D // 8)
    assert np.allclose(Om, Sm @ V), "pv"
    print("attention ok", D, NKEYS)

# ffn_layout.cuh, the mma.sync GEMM: block rows, k tile, shared-memory row stride; the mapping
GEMM_SHAPE = (128, 32, 40)

def gemm_stage_rows(nw, bn):
    return GEMM_SHAPE[0] + nw * bn

def gemm_weight_row(w, bn):
    return GEMM_SHAPE[0] + w * bn

def gemm_a_row(warp):
    return (warp >> 2) * 64

def gemm_b_row(warp, w, bn):
    return gemm_weight_row(w, bn) + (warp & 3) * (bn // 4)

def gemm_row(warp, i, lane, hh):
    return gemm_a_row(warp) + i * 16 + (lane >> 2) + 8 * hh

def gemm_col(warp, j, lane, bn):
    return (warp & 3) * (bn // 4) + j * 8 + 2 * (lane & 3)

def check_gemm(bn, nw):
    """One k tile of ffn.cu's gemm_tn_kernel with nw weights of bn rows (bn 128; SwiGLU: 64 and two weights): the
    stage as the loaders fill it, each of the 8 warps' ldmatrix / mma steps from its rows, and its accumulators
    stored where the epilogue stores them. Every output element is written once and equals A B_w^T."""
    BM, BK, kS = GEMM_SHAPE
    MT, NT = 4, bn // 32
    A = rng.standard_normal((BM, BK)); B = rng.standard_normal((nw, bn, BK))
    st = np.zeros(gemm_stage_rows(nw, bn) * kS)
    for r in range(BM): st[r*kS:r*kS+BK] = A[r]
    for w in range(nw):
        for r in range(bn): st[(gemm_weight_row(w, bn) + r)*kS:(gemm_weight_row(w, bn) + r)*kS+BK] = B[w, r]
    C = np.full((nw, BM, bn), np.nan)
    for warp in range(8):
        acc = [[[np.zeros((32, 4)) for _ in range(NT)] for _ in range(MT)] for _ in range(nw)]
        sa = gemm_a_row(warp) * kS
        for kk in range(BK // 16):
            a = [ldmatrix_x4(st, lambda lane: sa + ldsm_a(lane, i * 16, kk * 16, kS)) for i in range(MT)]
            for w in range(nw):
                sb = gemm_b_row(warp, w, bn) * kS
                for jp in range(NT // 2):
                    b = ldmatrix_x4(st, lambda lane: sb + ldsm_b(lane, jp * 16, kk * 16, kS))
                    for i in range(MT):
                        acc[w][i][2*jp] = mma(acc[w][i][2*jp], a[i], b[:, 0], b[:, 1])
                        acc[w][i][2*jp+1] = mma(acc[w][i][2*jp+1], a[i], b[:, 2], b[:, 3])
        for w in range(nw):
            for i in range(MT):
                for j in range(NT):
                    for lane in range(32):
                        for hh in range(2):
                            r, c = gemm_row(warp, i, lane, hh), gemm_col(warp, j, lane, bn)
                            assert np.isnan(C[w, r, c: c + 2]).all(), ("gemm stored twice", warp, r, c)
                            C[w, r, c: c + 2] = acc[w][i][j][lane, 2 * hh: 2 * hh + 2]
    for w in range(nw):
        assert np.allclose(C[w], A @ B[w].T), ("gemm", bn, nw, w)
    print("gemm ok", bn, nw)

# ---------------------------------------------------------------- wgmma (sm_90a)

def sw128_desc(addr, lbo_bytes):     # wgmma.cuh's sw128_desc_bits
    return ((addr & 0x3FFFF) >> 4) | ((lbo_bytes >> 4) << 16) | ((1024 >> 4) << 32) | (1 << 62)

# wgmma.cuh's byte offsets in an sw128 tile of `rows` rows
K_MAJOR_LBO = 16                     # (unused by the hardware for K-major operands)

def slab(c, rows):                   # 64-column slab c
    return c * rows * 128

def k_step(kk, rows, row0):          # K-major k step kk of rows row0 ..
    return slab(kk // 4, rows) + row0 * 128 + (kk % 4) * 32

def mn_step(kk, rows, col0):         # MN-major k step kk of columns col0 ..
    return slab(col0 // 64, rows) + kk * 16 * 128

def mn_lbo(rows):
    return rows * 128

def decode_desc(desc):
    start, lbo, sbo = (desc & 0x3FFF) << 4, ((desc >> 16) & 0x3FFF) << 4, ((desc >> 32) & 0x3FFF) << 4
    base_offset, swizzle = (desc >> 49) & 7, desc >> 62
    assert swizzle == 1 and base_offset == 0 and (start >> 7) & 7 == 0, "128B swizzle, start on a pattern row"
    return start, lbo, sbo

def swizzled(addr):                  # the hardware's 128-byte swizzle: byte address bits [4,7) ^= bits [7,10)
    return addr ^ (((addr >> 7) & 7) << 4)

def read_k_major(smem, desc, rows):
    """(rows x 16) operand, K-major: ((8,m),(8,2)):((128 B, SBO),(2 B, 16 B)) on the swizzled addresses."""
    start, _, sbo = decode_desc(desc)
    out = np.zeros((rows, 16))
    for r in range(rows):
        for k in range(16):
            out[r, k] = smem[swizzled(start + (r % 8) * 128 + (r // 8) * sbo + (k // 8) * 16 + (k % 8) * 2) // 2]
    return out

def read_mn_major(smem, desc, n):
    """(16 x n) operand, MN-major: ((64,m),(8,2)):((2 B, LBO),(128 B, SBO)) on the swizzled addresses."""
    start, lbo, sbo = decode_desc(desc)
    out = np.zeros((16, n))
    for k in range(16):
        for c in range(n):
            out[k, c] = smem[swizzled(start + (c % 64) * 2 + (c // 64) * lbo + (k % 8) * 128 + (k // 8) * sbo) // 2]
    return out

def acc_to_matrix(d, n):
    """m64nN fp32 accumulators d[thread][j][e] of a warpgroup -> the 64 x n matrix."""
    M = np.zeros((64, n))
    for th in range(128):
        w, g, t = th // 32, (th % 32) // 4, th % 4
        for j in range(n // 8):
            for e in range(4):
                M[16 * w + g + 8 * (e // 2), 8 * j + 2 * t + e % 2] = d[th][j][e]
    return M

def matrix_to_acc(M):
    n = M.shape[1]
    d = np.zeros((128, n // 8, 4))
    for th in range(128):
        w, g, t = th // 32, (th % 32) // 4, th % 4
        for j in range(n // 8):
            for e in range(4):
                d[th][j][e] = M[16 * w + g + 8 * (e // 2), 8 * j + 2 * t + e % 2]
    return d

def regs_a_to_matrix(a):
    """register A of m64nNk16: a[thread][i] = 2 values, per warp the m16n8k16 A layout -> 64 x 16."""
    A = np.zeros((64, 16))
    for th in range(128):
        w, g, t = th // 32, (th % 32) // 4, th % 4
        r = 16 * w
        A[r + g, 2*t:2*t+2] = a[th][0]; A[r + g + 8, 2*t:2*t+2] = a[th][1]
        A[r + g, 2*t+8:2*t+10] = a[th][2]; A[r + g + 8, 2*t+8:2*t+10] = a[th][3]
    return A

def wgmma_ss(d, smem, desc_a, desc_b, n, scale_d):
    A, B = read_k_major(smem, desc_a, 64), read_k_major(smem, desc_b, n)
    return matrix_to_acc((acc_to_matrix(d, n) if scale_d else 0) + A @ B.T)

def wgmma_rs_mn(d, a, smem, desc_b, n):
    return matrix_to_acc(acc_to_matrix(d, n) + regs_a_to_matrix(a) @ read_mn_major(smem, desc_b, n))

def tile_map(cols, rows, heads, batch, row_stride, head_stride, batch_stride, box_rows):
    """tma.cuh's tile_map_layout: the tensor map of a 16-bit (batch, rows, heads, cols) tensor with the given element
    strides: dims (cols, rows, heads, batch), byte strides of dims 1..3 (a size-1 dim's as if packed), the box."""
    s0 = 2 * (cols if rows == 1 else row_stride)
    s1 = s0 * rows if heads == 1 else 2 * head_stride
    s2 = s1 * heads if batch == 1 else 2 * batch_stride
    return cols, rows, heads, batch, s0, s1, s2, 64, box_rows, 1, 1

def map_of(X, box_rows):
    """tile_map of a numpy view X (batch, rows, heads, cols), as the launchers build it from a tensor's strides."""
    batch, rows, heads, cols = X.shape
    bs, rs, hs, _ = (st // X.itemsize for st in X.strides)
    return tile_map(cols, rows, heads, batch, rs, hs, bs, box_rows)

def tma_load_box(smem, dst, mem, tmap, coords, swizzle=swizzled):
    """cp.async.bulk.tensor (tma.cuh's tma_load_4d) of the box at element coordinates coords (c0 .. c3) of tensor
    map tmap (tile_map) over the global memory mem (16-bit elements, flat), with CU_TENSOR_MAP_SWIZZLE_128B: box row
    r, element j lands at byte r * 128 + 2 j of dst through the 128-byte swizzle of the absolute address; elements
    outside the tensor's dims arrive as zeros."""
    dims, strides, box = tmap[:4], tmap[4:7], tmap[7:]
    assert dst % 1024 == 0, "a 128-byte swizzled box starts 1024-byte aligned"
    assert box[0] * 2 == 128 and box[2] == box[3] == 1, "a box of 128-byte rows of one head and batch"
    for r in range(box[1]):
        for j in range(box[0]):
            at = (coords[0] + j, coords[1] + r, coords[2], coords[3])
            inside = all(0 <= a < d for a, d in zip(at, dims))
            offset = (2 * at[0] + sum(a * st for a, st in zip(at[1:], strides))) // 2 if inside else None
            assert offset is None or 0 <= offset < len(mem), ("TMA read outside the tensor's memory", at)
            smem[swizzle(dst + r * 128 + 2 * j) // 2] = mem[offset] if inside else 0.0

def sm90_tile(D):
    """attention_tile.cuh's Sm90Shape<D>: 64-column slabs, padded width, keys per tile, N of one P V wgmma."""
    slabs = (D + 63) // 64
    do = 64 * slabs
    return slabs, do, 64 if D > 128 else 128, min(do, 128)

def check_attention_wgmma(D, BM=128, sq_len=200, sk_len=333, m0=128, n0=256):
    """attention_sm90.cu: the producer's TMA boxes of Q (BM rows from m0) and of one K and one V tile (BN keys from
    n0; both past the sequence ends, so partly zero-filled; columns past D of the padded slabs zero-filled too), then
    per consumer warpgroup S = Q K^T (D / 16 k steps) and O = P V (per k step, one wgmma per PV_N columns of the
    padded width) through descriptors as the kernel builds them."""
    slabs, DO, BN, PV_N = sm90_tile(D)
    q_bytes, kv_bytes = BM * DO * 2, BN * DO * 2
    sq, sk, sv = 0, q_bytes, q_bytes + kv_bytes                      # 1024-aligned tile bases
    smem = np.full((q_bytes + 2 * kv_bytes) // 2, np.nan)
    H, Hkv, h, b = 4, 2, 3, 1
    # q in (batch, seqlen, heads, D) order, k and v stored head-major (batch, heads, seqlen, D) and seen transposed
    mq = rng.standard_normal((2, sq_len, H, D))
    mk, mv = rng.standard_normal((2, Hkv, sk_len, D)), rng.standard_normal((2, Hkv, sk_len, D))
    Xq, Xk, Xv = mq, mk.transpose(0, 2, 1, 3), mv.transpose(0, 2, 1, 3)
    hk = h // (H // Hkv)
    for c in range(slabs):                                           # the producer's loads, slab c per box
        tma_load_box(smem, sq + slab(c, BM), mq.ravel(), map_of(Xq, BM), (64 * c, m0, h, b))
        tma_load_box(smem, sk + slab(c, BN), mk.ravel(), map_of(Xk, BN), (64 * c, n0, hk, b))
        tma_load_box(smem, sv + slab(c, BN), mv.ravel(), map_of(Xv, BN), (64 * c, n0, hk, b))
    assert not np.isnan(smem).any()
    pad = lambda X, r0, rows, hh: np.vstack([X[b, r0: r0 + rows, hh], np.zeros((max(0, r0 + rows - X.shape[1]), D))])
    Q, K, V = pad(Xq, m0, BM, h), pad(Xk, n0, BN, hk), pad(Xv, n0, BN, hk)
    for wg in range(2):
        s = np.zeros((128, BN // 8, 4))
        for kk in range(D // 16):
            s = wgmma_ss(s, smem, sw128_desc(sq + k_step(kk, BM, wg * 64), K_MAJOR_LBO),
                         sw128_desc(sk + k_step(kk, BN, 0), K_MAJOR_LBO), BN, kk > 0)
        S = acc_to_matrix(s, BN)
        assert np.allclose(S, Q[wg * 64: wg * 64 + 64] @ K.T), ("qk", D, wg)
        o = np.zeros((128, DO // 8, 4))
        for kk in range(BN // 16):
            pa = [[s[th][2*kk][0:2], s[th][2*kk][2:4], s[th][2*kk+1][0:2], s[th][2*kk+1][2:4]] for th in range(128)]
            for j in range(DO // PV_N):
                part = slice(j * PV_N // 8, (j + 1) * PV_N // 8)
                o[:, part] = wgmma_rs_mn(o[:, part], pa, smem,
                                         sw128_desc(sv + mn_step(kk, BN, j * PV_N), mn_lbo(BN)), PV_N)
        O = acc_to_matrix(o, DO)
        assert np.allclose(O[:, :D], S @ V) and not O[:, D:].any(), ("pv", D, wg)
    print("attention wgmma ok", D, BN)

# ffn_layout.cuh, the wgmma GEMM: block rows, block columns, k tile, bytes of an operand tile; the mapping
WG_GEMM_SHAPE = (128, 128, 64, 128 * 64 * 2)

def wg_gemm_b_tile(w):
    return (1 + w) * WG_GEMM_SHAPE[3]

def wg_gemm_a_row(cw):
    return cw * 64

def wg_gemm_row(cw, warp, lane, hh):
    return wg_gemm_a_row(cw) + warp * 16 + (lane >> 2) + 8 * hh

def wg_gemm_col(j, lane):
    return j * 8 + 2 * (lane & 3)

def check_gemm_wgmma(k_valid, nw=1, m_valid=100, k_tile=1):
    """ffn.cu's gemm_tn_wgmma_kernel, one stage: the producer's TMA boxes of k tile k_tile of A (m_valid rows) and of
    nw weights (SwiGLU: 2), partial in k (k_valid columns of that tile) and A partial in rows (both arrive
    zero-filled); each consumer warpgroup's 4 k steps of m64n128k16 per weight, its accumulators stored where the
    epilogue stores them: every element of the block's A B_w^T once."""
    BM, BN, BK, tile = WG_GEMM_SHAPE
    smem = np.full(wg_gemm_b_tile(nw) // 2, np.nan)
    K = BK * k_tile + k_valid
    A, B = rng.standard_normal((1, m_valid, 1, K)), rng.standard_normal((nw, 1, BN, 1, K))
    tma_load_box(smem, 0, A.ravel(), map_of(A, BM), (BK * k_tile, 0, 0, 0))
    for w in range(nw):
        tma_load_box(smem, wg_gemm_b_tile(w), B[w].ravel(), map_of(B[w], BN), (BK * k_tile, 0, 0, 0))
    assert not np.isnan(smem).any()
    a = np.zeros((BM, BK)); a[:m_valid, :k_valid] = A[0, :, 0, BK * k_tile:]
    C = np.full((nw, BM, BN), np.nan)
    for cw in range(2):
        for w in range(nw):
            acc = np.zeros((128, BN // 8, 4))
            for kk in range(BK // 16):
                acc = wgmma_ss(acc, smem, sw128_desc(k_step(kk, BM, wg_gemm_a_row(cw)), K_MAJOR_LBO),
                               sw128_desc(wg_gemm_b_tile(w) + k_step(kk, BN, 0), K_MAJOR_LBO), BN, 1)
            for th in range(128):
                for j in range(BN // 8):
                    for hh in range(2):
                        r, c = wg_gemm_row(cw, th // 32, th % 32, hh), wg_gemm_col(j, th % 32)
                        assert np.isnan(C[w, r, c: c + 2]).all(), ("gemm wgmma stored twice", r, c)
                        C[w, r, c: c + 2] = acc[th][j][2 * hh: 2 * hh + 2]
    for w in range(nw):
        b = np.zeros((BN, BK)); b[:, :k_valid] = B[w, 0, :, 0, BK * k_tile:]
        assert np.allclose(C[w], a @ b.T), ("gemm wgmma", w, k_valid)
    print("gemm wgmma ok", k_valid, nw)

# ffn_layout.cuh, the gemv: rows, warps per block, unrolled loads, elements per warp-wide load; the mapping
GEMV_SHAPE = (8, 4, 4, 256)

def gemv_col(block, warp):
    return 2 * (block * GEMV_SHAPE[1] + warp)

def gemv_k(k0, u, lane):
    return k0 + u * GEMV_SHAPE[3] + lane * 8

def check_gemv(rows, n, k):
    """ffn.cu's gemv_kernel (<= 8 rows): warp w of block b owns columns col = gemv_col(b, w), col + 1; lane l reads
    elements gemv_k(k0, u, l) .. + 7 of each of its weight rows (k0 in strides of step * unroll); the butterfly sums
    the lanes' partial dot products and lane m stores row m. Every weight element is read exactly once."""
    max_rows, warps, unroll, step = GEMV_SHAPE
    assert rows <= max_rows
    A, W = rng.standard_normal((rows, k)), rng.standard_normal((n, k))
    out, reads = np.full((rows, n), np.nan), np.zeros((n, k), dtype=int)
    for b in range((n // 2 + warps - 1) // warps):
        for w in range(warps):
            col = gemv_col(b, w)
            if col >= n:
                continue
            acc = np.zeros((2, rows, 32))  # (column of the pair, row of A, lane)
            for k0 in range(0, k, step * unroll):
                for u in range(unroll):
                    for lane in range(32):
                        kk = gemv_k(k0, u, lane)
                        if kk >= k:
                            continue
                        reads[col: col + 2, kk: kk + 8] += 1
                        acc[:, :, lane] += W[col: col + 2, kk: kk + 8] @ A[:, kk: kk + 8].T
            total = acc.sum(axis=2)
            for lane in range(rows):
                out[lane, col: col + 2] = total[:, lane]
    assert (reads == 1).all(), ("gemv reads", rows, n, k)
    assert np.allclose(out, A @ W.T), ("gemv", rows, n, k)
    print("gemv ok", rows, n, k)

def main():
    for rows, n, k in ((1, 48, 96), (8, 96, 1376), (5, 200, 264)):
        check_gemv(rows, n, k)
    check_gemm_wgmma(64)
    check_gemm_wgmma(40, nw=2)
    for D in (32, 64, 96, 128, 256):
        check_attention_wgmma(D)
    for D in (32, 64, 96, 128):
        for NK in (16, 32, 64):
            check_attention(D, NK)
    check_gemm(128, 1)
    check_gemm(64, 2)


if __name__ == "__main__":
    main()
