"""A numpy replay of cuda_src/gemm.cu, thread by thread, for CPU tests.

It follows the kernel's index arithmetic (which rows each cp.async copies, where the scales sit in
both layouts, which 16 K values each thread of a quad owns, which pair register feeds which k step)
and the PTX fragment layouts of mma.m16n8k16, and the bit recipes of common/dequant.cuh. A wrong
permutation, a swapped register, a wrong scale offset or a wrong epilogue mapping makes its output
differ from the float64 reference, with no GPU. It is slow: small problems only.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

STAGE_K = 64
BLOCK_N = 128
WARPS_N = 4
WARP_ROWS = 32
ATOM_ROWS = 128
ATOM_BYTES = 512

# ----------------------------------------------------------------------------------------------
# Bit-level building blocks (uint32 arithmetic as the GPU does it)
# ----------------------------------------------------------------------------------------------

M32 = np.uint64(0xFFFFFFFF)


def u32(x):
    return (np.asarray(x, dtype=np.uint64) & M32).astype(np.uint64)


def shl(x, n):
    return u32(np.asarray(x, dtype=np.uint64) << np.uint64(n))


def shr(x, n):
    return u32(np.asarray(x, dtype=np.uint64) >> np.uint64(n))


def byte_perm(x, y, sel: int):
    """__byte_perm(x, y, sel): result byte i is byte (sel >> 4i) & 7 of the pool [x0..x3, y0..y3]."""
    x, y = u32(x), u32(y)
    out = np.zeros_like(x)
    for i in range(4):
        idx = (sel >> (4 * i)) & 0xF
        assert idx < 8, "sign-replicate selectors are not used by the kernel"
        src = x if idx < 4 else y
        byte = (src >> np.uint64(8 * (idx % 4))) & np.uint64(0xFF)
        out |= byte << np.uint64(8 * i)
    return out


def _halves(word):
    """(low, high) 16-bit halves of uint32 words, as float16 values."""
    w = u32(word)
    lo = (w & np.uint64(0xFFFF)).astype(np.uint16).view(np.float16)
    hi = (w >> np.uint64(16)).astype(np.uint16).view(np.float16)
    return lo, hi


def _pack_halves(lo, hi):
    lo = np.asarray(lo, dtype=np.float16).view(np.uint16).astype(np.uint64)
    hi = np.asarray(hi, dtype=np.float16).view(np.uint16).astype(np.uint64)
    return lo | (hi << np.uint64(16))


def e4m3_to_f16(bits):
    return np.asarray(bits, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32).astype(np.float16)


def scale_factor(sbits, fp8_cvt: bool):
    """common/dequant.cuh scale_factor: fp16 (s * 64) on sm_89+, fp16 s on sm_80."""
    s = e4m3_to_f16(sbits)
    return (s * np.float16(64.0)).astype(np.float16) if fp8_cvt else s


def dequant_e2m1x8(w, factor, fp8_cvt: bool):
    """common/dequant.cuh dequant_e2m1x8_f16: 4 uint32 words of fp16 pairs (values 2i, 2i+1)."""
    w = u32(w)
    factor = np.asarray(factor, dtype=np.float16)
    out = []
    if fp8_cvt:
        odd = (w & np.uint64(0x80808080)) | (shr(w, 2) & np.uint64(0x1C1C1C1C))
        even = (shl(w, 4) & np.uint64(0x80808080)) | (shl(w, 2) & np.uint64(0x1C1C1C1C))
        lo = byte_perm(even, odd, 0x5140)
        hi = byte_perm(even, odd, 0x7362)
        for word in (lo & np.uint64(0xFFFF), lo >> np.uint64(16), hi & np.uint64(0xFFFF), hi >> np.uint64(16)):
            b0 = (word & np.uint64(0xFF)).astype(np.uint8)
            b1 = (word >> np.uint64(8)).astype(np.uint8)
            q_lo, q_hi = e4m3_to_f16(b0), e4m3_to_f16(b1)  # cvt.rn.f16x2.e4m3x2: low byte -> low half
            out.append(_pack_halves(q_lo * factor, q_hi * factor))
    else:
        odd = (w & np.uint64(0x80808080)) | (shr(w, 3) & np.uint64(0x0E0E0E0E))
        even = (shl(w, 4) & np.uint64(0x80808080)) | (shl(w, 1) & np.uint64(0x0E0E0E0E))
        for sel in (0x4000, 0x5111, 0x6222, 0x7333):
            bits = byte_perm(even, odd, sel) & np.uint64(0xFF00FF00)
            lo, hi = _halves(bits)
            bias = np.float16(16384.0)
            out.append(_pack_halves((lo * bias) * factor, (hi * bias) * factor))
    return out


# ----------------------------------------------------------------------------------------------
# mma.sync m16n8k16 with the PTX fragment layouts
# ----------------------------------------------------------------------------------------------

LANES = np.arange(32)
G = LANES >> 2
T = LANES & 3


def mma_16816(d, a_regs, b_regs):
    """d [32, 4] float64 accumulators += A B from per-lane registers a_regs [4][32], b_regs [2][32]."""
    A = np.zeros((16, 16))
    B = np.zeros((16, 8))
    for r, (row_off, col_off) in enumerate(((0, 0), (8, 0), (0, 8), (8, 8))):
        lo, hi = _halves(a_regs[r])
        A[G + row_off, 2 * T + col_off] = lo
        A[G + row_off, 2 * T + col_off + 1] = hi
    for r, k_off in enumerate((0, 8)):
        lo, hi = _halves(b_regs[r])
        B[2 * T + k_off, G] = lo
        B[2 * T + k_off + 1, G] = hi
    D = A.astype(np.float64) @ B.astype(np.float64)
    d[:, 0] += D[G, 2 * T]
    d[:, 1] += D[G, 2 * T + 1]
    d[:, 2] += D[G + 8, 2 * T]
    d[:, 3] += D[G + 8, 2 * T + 1]


# ----------------------------------------------------------------------------------------------
# The kernel
# ----------------------------------------------------------------------------------------------


def scale_offset(row, kt, row_bytes, blocked, num_k_stages):
    if blocked:
        atom = (row // ATOM_ROWS) * num_k_stages + kt
        return atom * ATOM_BYTES + (row % 32) * 16 + ((row % ATOM_ROWS) // 32) * 4
    return row * row_bytes + kt * 4


def _words(byte_rows):
    """uint8 [..., 4j] -> little-endian uint32 words [..., j]."""
    return np.ascontiguousarray(byte_rows).view("<u4").astype(np.uint64)


def run_problem(*, a, b_list, sfa, sfb_list, m_rows, row_base, n, k, blocked, block_m, warps_m, tokens,
                alpha, alpha2, fp8_cvt=True):
    """Replay one problem: returns C [m_rows, n] in float64 (before the output dtype rounding).

    a: uint8 [rows, K/2] (nvfp4) or float16 [rows, K] (bf16 tokens are replayed in fp16: same
    mapping); b_list: one or two uint8 [N, K/2]; sfa / sfb_list: flat uint8 byte buffers of the
    scale layout (plain: row stride K/16 bytes).
    """
    kts = k // STAGE_K
    warp_tokens = block_m // warps_m
    tiles_m = -(-m_rows // block_m)
    tiles_n = -(-n // BLOCK_N)
    nw = len(b_list)
    out = np.full((m_rows, n), np.nan)
    sf_row = k // 16
    for tm in range(tiles_m):
        for tn in range(tiles_n):
            m0, n0 = tm * block_m, tn * BLOCK_N
            acc = np.zeros((nw, WARPS_N * warps_m, 2, warp_tokens // 8, 32, 4))
            for kt in range(kts):
                # --- load_stage: clamped rows, 32 packed bytes and 4 scale bytes per weight row
                wrows = np.minimum(n0 + np.arange(BLOCK_N), n - 1)
                w_raw = [bb[wrows, kt * 32:(kt + 1) * 32] for bb in b_list]
                w_sf = [np.stack([sfb[scale_offset(r, kt, sf_row, blocked, kts) + np.arange(4)] for r in wrows])
                        for sfb in sfb_list]
                trows = row_base + np.minimum(m0 + np.arange(block_m), m_rows - 1)
                if tokens == "nvfp4":
                    t_raw = a[trows, kt * 32:(kt + 1) * 32]
                    t_sf = np.stack([sfa[scale_offset(r, kt, sf_row, blocked, kts) + np.arange(4)] for r in trows])
                    # --- dequant_tokens: natural order fp16 rows
                    tb = np.zeros((block_m, STAGE_K), dtype=np.float16)
                    for r in range(block_m):
                        for blk in range(4):
                            words = _words(t_raw[r, blk * 8:(blk + 1) * 8])
                            f = scale_factor(t_sf[r, blk], fp8_cvt)
                            pairs = dequant_e2m1x8(words[0], f, fp8_cvt) + dequant_e2m1x8(words[1], f, fp8_cvt)
                            for i, pw in enumerate(pairs):
                                lo, hi = _halves(pw)
                                tb[r, blk * 16 + 2 * i] = lo
                                tb[r, blk * 16 + 2 * i + 1] = hi
                else:
                    tb = a[trows, kt * STAGE_K:(kt + 1) * STAGE_K].astype(np.float16)
                tb_words = _words(tb.view(np.uint8))  # [block_m, 32] words of 2 halves
                # --- compute_stage, warp by warp, all 32 lanes at once
                for warp in range(WARPS_N * warps_m):
                    wn, wm = warp % WARPS_N, warp // WARPS_N
                    raw = {}
                    fac = {}
                    for w in range(nw):
                        for mt in range(2):
                            for h in range(2):
                                r = wn * WARP_ROWS + mt * 16 + h * 8 + G
                                by = np.stack([w_raw[w][r[l], T[l] * 8:T[l] * 8 + 8] for l in range(32)])
                                raw[w, mt, h] = _words(by)  # [32, 2]
                                fac[w, mt, h] = scale_factor(w_sf[w][r, T], fp8_cvt)
                    for s in range(2):
                        apairs = {key: dequant_e2m1x8(raw[key][:, s], fac[key], fp8_cvt) for key in raw}
                        for nt in range(warp_tokens // 8):
                            tok = wm * warp_tokens + nt * 8 + G
                            base = (16 * T + 8 * s) // 2  # word index of value 16t + 8s
                            bx = [tb_words[tok, base + i] for i in range(4)]
                            for j in range(2):
                                bf = (bx[0], bx[1]) if j == 0 else (bx[2], bx[3])
                                for w in range(nw):
                                    for mt in range(2):
                                        af = (apairs[w, mt, 0][2 * j], apairs[w, mt, 1][2 * j],
                                              apairs[w, mt, 0][2 * j + 1], apairs[w, mt, 1][2 * j + 1])
                                        mma_16816(acc[w, warp, mt, nt], af, bf)
            # --- epilogue
            for warp in range(WARPS_N * warps_m):
                wn, wm = warp % WARPS_N, warp // WARPS_N
                for mt in range(2):
                    for h in range(2):
                        col = n0 + wn * WARP_ROWS + mt * 16 + h * 8 + G
                        for nt in range(warp_tokens // 8):
                            for e in range(2):
                                mm = m0 + wm * warp_tokens + nt * 8 + 2 * T + e
                                ok = (col < n) & (mm < m_rows)
                                v = alpha * acc[0, warp, mt, nt, :, 2 * h + e]
                                if nw == 2:
                                    v = v / (1 + np.exp(-v)) * (alpha2 * acc[1, warp, mt, nt, :, 2 * h + e])
                                assert np.all(np.isnan(out[mm[ok], col[ok]])), "an output element written twice"
                                out[mm[ok], col[ok]] = v[ok]
    return out
