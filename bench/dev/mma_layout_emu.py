"""CPU check of the tensor-core index arithmetic of csrc/cuda/ (no GPU needed): numpy emulations of ldmatrix (plain and
.trans) and mma.m16n8k16 as the PTX ISA defines their fragments, driven with the exact shared-memory address formulas
of attention_tile.cuh (warp_qk, warp_pv) and ffn.cu (gemm_tn_kernel's k-step), compared with plain matrix products;
and of wgmma.mma_async (sm_90a): the 64-bit shared-memory descriptor decoded field by field, the 128-byte swizzle
applied to absolute byte addresses, K-major and MN-major (transposed) canonical layouts and the m64nNk16 accumulator
/ register-A fragments, driven with wgmma.cuh's descriptors and sw128 tile offsets as attention_sm90.cu and ffn.cu's
wgmma GEMM use them, their operands written as their TMA boxes write them (128-byte swizzle, zero fill); and the
lane / column / k mapping of ffn.cu's CUDA-core gemv kernel. The wgmma formulas (sw128_desc, slab, k_step, mn_step,
mn_lbo, sm90_tile) and the lanes' ldmatrix rows (ldsm_a, ldsm_b, ldsm_b_trans) are compared with the C++ ones, printed
by tests/cuda_layout_test.cu, in tests/test_cuda_ext.py, as is the gemv mapping (GEMV_SHAPE, gemv_col, gemv_k); the
tile bases of the mma.sync GEMM and the TMA box placement of tma_load_box are kept in step with the kernels by hand.

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

def check_gemm(BN):
    # one k-step of the GEMM kernel for warp (wm, wn): A tile 128 x 32, B tile BN x 32, stride 40
    kS = 40; BM = 128; WN = BN // 4; MT = 4; NT = WN // 8
    A = rng.standard_normal((BM, 32)); B = rng.standard_normal((BN, 32))
    st = np.zeros((BM + BN) * kS)
    for r in range(BM): st[r*kS:r*kS+32] = A[r]
    for r in range(BN): st[(BM + r)*kS:(BM + r)*kS+32] = B[r]
    for wm in range(2):
        for wn in range(4):
            acc = [[np.zeros((32, 4)) for _ in range(NT)] for _ in range(MT)]
            sa = wm * 64 * kS
            sb = (BM + wn * WN) * kS
            for kk in range(2):
                a = [ldmatrix_x4(st, lambda lane: sa + ldsm_a(lane, i * 16, kk * 16, kS)) for i in range(MT)]
                for jp in range(NT // 2):
                    b = ldmatrix_x4(st, lambda lane: sb + ldsm_b(lane, jp * 16, kk * 16, kS))
                    for i in range(MT):
                        acc[i][2*jp] = mma(acc[i][2*jp], a[i], b[:, 0], b[:, 1])
                        acc[i][2*jp+1] = mma(acc[i][2*jp+1], a[i], b[:, 2], b[:, 3])
            C = A @ B.T
            for i in range(MT):
                M = frag_to_matrix(acc[i], NT)
                assert np.allclose(M, C[wm*64 + i*16: wm*64 + i*16 + 16, wn*WN: wn*WN + WN]), (wm, wn, i)
    print("gemm ok", BN)

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

def tma_load_box(smem, dst, X, b, row0, h, c, box_rows, swizzle=swizzled):
    """tma.cuh's tma_load_4d on a tensor map of tma.cuh's encode_tile_map (dims (D, seqlen, heads, batch), box of 64
    columns x box_rows rows, SWIZZLE_128B) over X (batch, seqlen, heads, D): box row r, column j lands at byte
    r * 128 + 2 j of dst, through the 128-byte swizzle of the absolute address; elements past the tensor (rows past
    seqlen, columns past D) arrive as zeros."""
    assert dst % 1024 == 0, "a 128-byte swizzled box starts 1024-byte aligned"
    for r in range(box_rows):
        for j in range(64):
            n, col = row0 + r, 64 * c + j
            smem[swizzle(dst + r * 128 + 2 * j) // 2] = X[b, n, h, col] if n < X.shape[1] and col < X.shape[3] else 0.0

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
    Xq = rng.standard_normal((2, sq_len, H, D))
    Xk, Xv = rng.standard_normal((2, sk_len, Hkv, D)), rng.standard_normal((2, sk_len, Hkv, D))
    hk = h // (H // Hkv)
    for c in range(slabs):                                           # the producer's loads, slab c per box
        tma_load_box(smem, sq + slab(c, BM), Xq, b, m0, h, c, BM)
        tma_load_box(smem, sk + slab(c, BN), Xk, b, n0, hk, c, BN)
        tma_load_box(smem, sv + slab(c, BN), Xv, b, n0, hk, c, BN)
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

def check_gemm_wgmma(k_valid, m_valid=100, k_tile=1):
    """ffn.cu's gemm_tn_wgmma_kernel, one stage: the producer's TMA boxes of k tile k_tile of A (m_valid rows) and of
    B, partial in k (k_valid columns of that tile) and A partial in rows (both arrive zero-filled); each consumer
    warpgroup's 4 k steps of m64n128k16 give its 64 x 128 block of A B^T."""
    tile = 128 * 128
    smem = np.full(2 * tile // 2, np.nan)
    K = 64 * k_tile + k_valid
    A, B = rng.standard_normal((1, m_valid, 1, K)), rng.standard_normal((1, 128, 1, K))
    tma_load_box(smem, 0, A, 0, 0, 0, k_tile, 128)                  # A: (K, M) map, box at (64 k_tile, m0 = 0)
    tma_load_box(smem, tile, B, 0, 0, 0, k_tile, 128)               # B: (K, N) map, box at (64 k_tile, n0 = 0)
    assert not np.isnan(smem).any()
    a = np.zeros((128, 64)); a[:m_valid, :k_valid] = A[0, :, 0, 64 * k_tile:]
    b = np.zeros((128, 64)); b[:, :k_valid] = B[0, :, 0, 64 * k_tile:]
    for wg in range(2):
        acc = np.zeros((128, 16, 4))
        for kk in range(4):
            acc = wgmma_ss(acc, smem, sw128_desc(k_step(kk, 128, wg * 64), K_MAJOR_LBO),
                           sw128_desc(tile + k_step(kk, 128, 0), K_MAJOR_LBO), 128, 1)
        ref = a[wg * 64: wg * 64 + 64] @ b.T
        assert np.allclose(acc_to_matrix(acc, 128), ref), ("gemm wgmma", wg, k_valid)
    print("gemm wgmma ok", k_valid)

# gemv_layout.cuh: rows, warps per block, unrolled loads, elements per warp-wide load; the mapping
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
    check_gemm_wgmma(40)
    for D in (32, 64, 96, 128, 256):
        check_attention_wgmma(D)
    for D in (32, 64, 96, 128):
        for NK in (16, 32, 64):
            check_attention(D, NK)
    check_gemm(128)
    check_gemm(64)


if __name__ == "__main__":
    main()
