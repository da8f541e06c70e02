"""CPU check of the tensor-core index arithmetic of csrc/cuda/ (no GPU needed): numpy emulations of ldmatrix
(plain and .trans) and mma.m16n8k16 as the PTX ISA defines their fragments, driven with the exact shared-memory
address formulas of attention_tile.cuh (warp_qk, warp_pv) and ffn.cu (gemm_tn_kernel's k-step), compared with
plain matrix products. Keep the formulas here in step with the kernels.

    python bench/dev/mma_layout_emu.py
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
        a = ldmatrix_x4(q, lambda lane: (lane & 15) * S + kk * 16 + (lane >> 4) * 8)
        for jp in range(NKEYS // 16):
            b = ldmatrix_x4(k, lambda lane: (jp * 16 + (lane & 7) + ((lane >> 4) << 3)) * S + kk * 16
                            + ((lane >> 3) & 1) * 8)
            s[2*jp] = mma(s[2*jp], a, b[:, 0], b[:, 1]); s[2*jp+1] = mma(s[2*jp+1], a, b[:, 2], b[:, 3])
    Sm = frag_to_matrix(s, NKEYS // 8)
    assert np.allclose(Sm, Q @ K.T), "qk"
    # P = S (values), O = P V
    o = [np.zeros((32, 4)) for _ in range(D // 8)]
    for kk in range(NKEYS // 16):
        a = np.zeros((32, 4, 2))
        a[:, 0] = s[2*kk][:, 0:2]; a[:, 1] = s[2*kk][:, 2:4]; a[:, 2] = s[2*kk+1][:, 0:2]; a[:, 3] = s[2*kk+1][:, 2:4]
        for dp in range(D // 16):
            b = ldmatrix_x4(v, lambda lane: (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * S + dp * 16
                            + (lane >> 4) * 8, trans=True)
            o[2*dp] = mma(o[2*dp], a, b[:, 0], b[:, 1]); o[2*dp+1] = mma(o[2*dp+1], a, b[:, 2], b[:, 3])
    Om = frag_to_matrix(o, D // 8)
    assert np.allclose(Om, Sm @ V), "pv"
    print("attention ok", D, NKEYS)

def check_gemm(BN, dual_w=0):
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
                a = [ldmatrix_x4(st, lambda lane: sa + (i * 16 + (lane & 15)) * kS + kk * 16 + (lane >> 4) * 8)
                     for i in range(MT)]
                for jp in range(NT // 2):
                    b = ldmatrix_x4(st, lambda lane: sb + (jp * 16 + (lane & 7) + ((lane >> 4) << 3)) * kS
                                    + kk * 16 + ((lane >> 3) & 1) * 8)
                    for i in range(MT):
                        acc[i][2*jp] = mma(acc[i][2*jp], a[i], b[:, 0], b[:, 1])
                        acc[i][2*jp+1] = mma(acc[i][2*jp+1], a[i], b[:, 2], b[:, 3])
            C = A @ B.T
            for i in range(MT):
                M = frag_to_matrix(acc[i], NT)
                assert np.allclose(M, C[wm*64 + i*16: wm*64 + i*16 + 16, wn*WN: wn*WN + WN]), (wm, wn, i)
    print("gemm ok", BN)

if __name__ == "__main__":
    for D in (32, 64, 96, 128):
        for NK in (16, 32, 64):
            check_attention(D, NK)
    check_gemm(128)
    check_gemm(64)
