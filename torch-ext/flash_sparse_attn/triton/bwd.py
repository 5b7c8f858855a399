"""Attention backward: preprocess, dK/dV (+ atomic dQ), and a deterministic dQ pass.

Notation
- `lse2` = lse * log2(e) with -inf (row sees no key) replaced by +inf so exp2(s - lse2) = 0.
- `Di` = rowsum(dO * O) (fp32), the softmax-backward row term: dS = P * (dP - Di).
- dK/dV program: one BLOCK_N tile of keys of one (batch, KV head); loops over the G query heads
  of that KV head and over the query tiles that can see its keys, so dK/dV need no atomics.
  Scores are computed transposed (`b_sT` [BLOCK_N, BLOCK_M] = K Q^T) so P^T feeds dV directly.
- dQ: by default its own kernel (7 matmuls per tile pair in all, no atomics, bitwise
  reproducible); a launch table may instead ask for fp32 atomics from the dK/dV program
  (5 matmuls), which `deterministic=True` always overrides.
  The dK/dV grid runs on a high-priority side stream while the dQ pass runs on the caller's
  stream (they share inputs only), so dQ programs fill the SMs the dK/dV tail leaves idle.
- Block skipping (sparse / gated): the forward's codes say which skip blocks were kept;
  `_kept_tile_lists` turns them into, per key tile (dK/dV) and per query tile (dQ), the list of
  tiles holding a kept block, and the loops walk only those (skipped pairs cost nothing). A
  tile wider than a skip block masks the keys of its skipped blocks (COL_SKIP).
- Gated: score = scale * (q.k + g(x)), x = alpha_i * delta_j; dL/dx = scale * dS * g'(x);
  dalpha is a row sum (dQ side), ddelta a column sum over rows and query heads (dK/dV side).

Caution
- The dK/dV program visits query tiles in the same mask stages as the forward (hidden pairs are
  never visited); rows past seqlen_q load zeros and lse2 = +inf, so they contribute nothing.
- Atomic dQ (opt-in per launch table) makes the low bits of dq and dalpha depend on
  scheduling; dk, dv, ddelta never use atomics.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from . import configs
from .common import (LOG2E, gate_2d, gate_grad_2d, load_tile, program_tile, visible_2d,
                     walk_range, walk_start)
from .fwd import _key_ranges, _mask_stages, _strides3
from .launch import buffer, buffer_like, compiling, launch, planned, replayable


@triton.jit
def _bwd_preprocess_kernel(
    O, DO, LSE, DI, LSE2, CU_Q, DQ_ACC,
    stride_ob, stride_os, stride_oh, stride_db, stride_ds, stride_dh,
    stride_lb, stride_lh, stride_ls, stride_qb, stride_qs, stride_qh, seqlen_q_fixed, H,
    dq_pad,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
    IS_VARLEN: tl.constexpr, ZERO_DQ: tl.constexpr,
):
    """Di = rowsum(O * dO) and lse2 = lse * log2(e) (+inf for empty rows) per query row;
    ZERO_DQ: also zeroes the fp32 dQ accumulator of the atomic dQ (its rows and the dq_pad
    rows past them, the padding of the Gluon kernel's whole-tile adds)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    if IS_VARLEN:
        q_start = tl.load(CU_Q + b)
        seqlen_q = tl.load(CU_Q + b + 1) - q_start
        b_off = 0
    else:
        q_start = 0
        seqlen_q = seqlen_q_fixed
        b_off = b
    o_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, HEAD_DIM_PAD)
    rows = (q_start + o_m[:, None]).to(tl.int64)
    if ZERO_DQ:
        z_ok = (o_m < seqlen_q + dq_pad)[:, None] & (o_d < HEAD_DIM)[None, :]
        tl.store(DQ_ACC + b_off.to(tl.int64) * stride_qb + rows * stride_qs + h * stride_qh
                 + o_d[None, :], tl.zeros((BLOCK_M, HEAD_DIM_PAD), tl.float32), mask=z_ok)
    if pid_m * BLOCK_M >= seqlen_q:
        return
    m_ok = o_m < seqlen_q
    b_o = load_tile(O + b_off.to(tl.int64) * stride_ob + rows * stride_os + h * stride_oh
                     + o_d[None, :], m_ok[:, None], o_d[None, :], HEAD_DIM, HEAD_DIM_PAD, True)
    b_do = load_tile(DO + b_off.to(tl.int64) * stride_db + rows * stride_ds + h * stride_dh
                      + o_d[None, :], m_ok[:, None], o_d[None, :], HEAD_DIM, HEAD_DIM_PAD, True)
    b_di = tl.sum(b_o.to(tl.float32) * b_do.to(tl.float32), 1)
    o_l = b_off.to(tl.int64) * stride_lb + h * stride_lh + (q_start + o_m).to(tl.int64) * stride_ls
    b_lse = tl.load(LSE + o_l, mask=m_ok, other=0.0)
    b_lse2 = tl.where(b_lse == float("-inf"), float("inf"), b_lse * LOG2E)
    tl.store(DI + o_l, b_di, mask=m_ok)
    tl.store(LSE2 + o_l, b_lse2, mask=m_ok)


@triton.jit
def _query_ranges(start_n, seqlen_q, seqlen_k, dist_offset, w_sink, w_left, w_right, w_near,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr,
                  IS_LOCAL: tl.constexpr):
    """Query-tile ranges that can see key tile [start_n, start_n + BLOCK_N), split by mask
    flavour into two tuple pairs (whole, edges): query tiles whose every row sees every key of
    the tile (run unmasked) and the others (run masked). Not local: whole (below the diagonal)
    and edges (the diagonal, or everything for an incomplete key tile). Local: near band
    (edge | whole | edge), far band (edge | whole | edge); a key tile inside the sink:
    (edge | whole), then nothing."""
    n_first = start_n
    n_last = tl.minimum(start_n + BLOCK_N, seqlen_k) - 1
    q_end = tl.cdiv(seqlen_q, BLOCK_M) * BLOCK_M
    complete = start_n + BLOCK_N <= seqlen_k
    # rows i with dist = i + off - j >= 0 for some key j of the tile, and for all of them
    lo1 = tl.minimum(tl.maximum(n_first - dist_offset, 0) // BLOCK_M * BLOCK_M, q_end)
    full = tl.minimum(tl.cdiv(tl.maximum(n_last - dist_offset, 0), BLOCK_M) * BLOCK_M, q_end)
    full = tl.maximum(full, lo1)
    if IS_LOCAL:
        # near band: dist in [0, near) -> i in [j - off, j - off + near)
        n_hi = tl.minimum(n_last - dist_offset + w_near, seqlen_q)
        hi1 = tl.where(w_near > 0, tl.cdiv(tl.maximum(n_hi, 0), BLOCK_M) * BLOCK_M, lo1)
        hi1 = tl.maximum(hi1, lo1)
        nw_hi = tl.maximum(n_first - dist_offset + w_near, 0) // BLOCK_M * BLOCK_M
        nw_lo = tl.minimum(full, hi1)
        nw_hi = tl.where(complete, tl.minimum(tl.maximum(nw_hi, nw_lo), hi1), nw_lo)
        # far band: dist in [near + right, near + right + left)
        f_lo = tl.maximum(n_first - dist_offset + w_near + w_right, 0)
        f_hi = tl.minimum(n_last - dist_offset + w_near + w_right + w_left, seqlen_q)
        lo3 = tl.maximum(tl.minimum(f_lo // BLOCK_M * BLOCK_M, q_end), hi1)
        hi3 = tl.where((w_left > 0) & (f_hi > f_lo),
                       tl.cdiv(tl.maximum(f_hi, 0), BLOCK_M) * BLOCK_M, lo3)
        hi3 = tl.maximum(hi3, lo3)
        fw_lo = tl.cdiv(tl.maximum(n_last - dist_offset + w_near + w_right, 0), BLOCK_M) * BLOCK_M
        fw_hi = tl.maximum(n_first - dist_offset + w_near + w_right + w_left, 0) // BLOCK_M \
            * BLOCK_M
        fw_lo = tl.minimum(tl.maximum(fw_lo, lo3), hi3)
        fw_hi = tl.where(complete, tl.minimum(tl.maximum(fw_hi, fw_lo), hi3), fw_lo)
        # a key tile starting inside the sink: every row from its first visible one sees it
        in_sink = n_first < w_sink
        sw = tl.where(complete & (n_last < w_sink), full, q_end)
        whole = ((tl.where(in_sink, sw, nw_lo), tl.where(in_sink, q_end, fw_lo)),
                 (tl.where(in_sink, q_end, nw_hi), tl.where(in_sink, q_end, fw_hi)))
        edges = ((lo1, tl.where(in_sink, q_end, nw_hi), tl.where(in_sink, q_end, lo3),
                  tl.where(in_sink, q_end, fw_hi)),
                 (tl.where(in_sink, sw, nw_lo), tl.where(in_sink, q_end, hi1),
                  tl.where(in_sink, q_end, fw_lo), tl.where(in_sink, q_end, hi3)))
    elif IS_CAUSAL:
        hi1 = tl.where(complete, full, q_end)
        whole = ((hi1,), (q_end,))
        edges = ((lo1,), (hi1,))
    else:
        zero = q_end * 0
        hi1 = tl.where(complete, zero, q_end)
        whole = ((hi1,), (q_end,))
        edges = ((zero,), (hi1,))
    return whole, edges


@triton.jit
def _dkdv_load(p_q0, p_do0, p_lse2, p_di, p_alpha0, o_d, stride_qs, stride_dos, stride_ls,
               stride_as, start_m, seqlen_q, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
               BLOCK_M: tl.constexpr, HAS_GATE: tl.constexpr):
    """Inputs of one query tile for the dK/dV program (rows past seqlen_q load 0 / +inf)."""
    o_m = start_m + tl.arange(0, BLOCK_M)
    m_ok = o_m < seqlen_q
    rows = o_m.to(tl.int64)
    # [D, M] transposed query tile, [M, D] dO tile
    b_qT = load_tile(p_q0 + rows[None, :] * stride_qs + o_d[:, None], m_ok[None, :],
                      o_d[:, None], HEAD_DIM, HEAD_DIM_PAD, True)
    b_do = load_tile(p_do0 + rows[:, None] * stride_dos + o_d[None, :], m_ok[:, None],
                      o_d[None, :], HEAD_DIM, HEAD_DIM_PAD, True)
    b_lse2 = tl.load(p_lse2 + rows * stride_ls, mask=m_ok, other=float("inf"))
    b_di = tl.load(p_di + rows * stride_ls, mask=m_ok, other=0.0)
    if HAS_GATE:
        b_alpha = tl.load(p_alpha0 + rows * stride_as, mask=m_ok, other=0.0).to(tl.float32)
    else:
        b_alpha = b_lse2
    return o_m, m_ok, rows, b_qT, b_do, b_lse2, b_di, b_alpha


@triton.jit
def _dkdv_math(
    b_dk, b_dv, b_ddelta, b_k, b_v, b_delta, o_n, o_d, o_m, m_ok, rows, b_qT, b_do, b_lse2,
    b_di, b_alpha, b_keep, p_dq0, p_dalpha0, stride_dqs, stride_das, seqlen_k, dist_offset,
    scale, scale_log2, w_sink, w_left, w_right, w_near,
    HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr,
    IS_LOCAL: tl.constexpr, HAS_GATE: tl.constexpr, IS_LOGSIGMOID: tl.constexpr,
    ATOMIC_DQ: tl.constexpr, COL_SKIP: tl.constexpr,
):
    """One (query tile, key tile) pair of the dK/dV program (the only copy of its math).
    COL_SKIP: the key tile spans several skip blocks; keys of the blocks the forward skipped
    (b_keep [N] False) get P = 0, so they add nothing, exactly as in the forward."""
    b_sT = tl.dot(b_k, b_qT)  # [N, M]
    # dP^T is issued before the exponentials so its MMA can overlap them
    b_dpT = tl.dot(b_v, tl.trans(b_do))  # [N, M]
    if HAS_GATE:
        b_gT = gate_2d(b_delta[:, None] * b_alpha[None, :], IS_LOGSIGMOID)
        b_sT += b_gT
    b_pT = tl.math.exp2(b_sT * scale_log2 - b_lse2[None, :])
    if MASKED:
        m_vis = visible_2d(o_m[None, :], o_n[:, None], dist_offset, seqlen_k, IS_CAUSAL,
                           IS_LOCAL, w_sink, w_left, w_right, w_near)
        b_pT = tl.where(m_vis, b_pT, 0.0)
    if COL_SKIP:
        b_pT = tl.where(b_keep[:, None], b_pT, 0.0)
    b_dv = tl.dot(b_pT.to(b_do.dtype), b_do, b_dv)
    b_dsT = b_pT * (b_dpT - b_di[None, :])
    b_dk = tl.dot(b_dsT.to(b_qT.dtype), tl.trans(b_qT), b_dk)
    if HAS_GATE:
        b_dxT = b_dsT * gate_grad_2d(b_gT, IS_LOGSIGMOID)
        b_ddelta += tl.sum(b_dxT * b_alpha[None, :], 1)
        if ATOMIC_DQ:
            tl.atomic_add(p_dalpha0 + rows * stride_das,
                          tl.sum(b_dxT * b_delta[:, None], 0) * scale, mask=m_ok,
                          sem="relaxed")
    if ATOMIC_DQ:
        b_dq = tl.dot(tl.trans(b_dsT.to(b_k.dtype)), b_k) * scale  # [M, D]
        p_dq = p_dq0 + rows[:, None] * stride_dqs + o_d[None, :]
        tl.atomic_add(p_dq, b_dq, mask=m_ok[:, None] & (o_d[None, :] < HEAD_DIM),
                      sem="relaxed")
    return b_dk, b_dv, b_ddelta


@triton.jit
def _kept_keys(p_codes, o_n, seqlen_k, SKIP_N: tl.constexpr):
    """[N] whether the forward kept the skip block of each key o_n, from one query block's row
    of codes (COL_SKIP tiles, which span several blocks)."""
    return tl.load(p_codes + o_n // SKIP_N, mask=o_n < seqlen_k, other=0) == 1


@triton.jit
def _dkdv_tile(
    b_dk, b_dv, b_ddelta, start_m, b_k, b_v, b_delta, o_n, o_d, p_q0, p_do0, p_lse2, p_di,
    p_alpha0, p_dq0, p_dalpha0, p_skip, stride_qs, stride_dos, stride_ls, stride_as, stride_dqs,
    stride_das, stride_sm, seqlen_q, seqlen_k, dist_offset, scale, scale_log2, w_sink, w_left,
    w_right, w_near,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
    MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, IS_LOCAL: tl.constexpr,
    HAS_GATE: tl.constexpr, IS_LOGSIGMOID: tl.constexpr, ATOMIC_DQ: tl.constexpr,
    COL_SKIP: tl.constexpr, SKIP_M: tl.constexpr, SKIP_N: tl.constexpr,
):
    """One query tile of the dK/dV program. COL_SKIP: the forward's codes of this query
    block (row start_m // SKIP_M of p_skip) decide which keys of the tile count."""
    o_m, m_ok, rows, b_qT, b_do, b_lse2, b_di, b_alpha = _dkdv_load(
        p_q0, p_do0, p_lse2, p_di, p_alpha0, o_d, stride_qs, stride_dos, stride_ls,
        stride_as, start_m, seqlen_q, HEAD_DIM, HEAD_DIM_PAD, BLOCK_M, HAS_GATE)
    if COL_SKIP:
        b_keep = _kept_keys(p_skip + (start_m // SKIP_M) * stride_sm, o_n, seqlen_k, SKIP_N)
    else:
        b_keep = m_ok
    b_dk, b_dv, b_ddelta = _dkdv_math(
        b_dk, b_dv, b_ddelta, b_k, b_v, b_delta, o_n, o_d, o_m, m_ok, rows, b_qT, b_do,
        b_lse2, b_di, b_alpha, b_keep, p_dq0, p_dalpha0, stride_dqs, stride_das, seqlen_k,
        dist_offset, scale, scale_log2, w_sink, w_left, w_right, w_near, HEAD_DIM,
        MASKED, IS_CAUSAL, IS_LOCAL, HAS_GATE, IS_LOGSIGMOID, ATOMIC_DQ, COL_SKIP)
    return b_dk, b_dv, b_ddelta


@triton.jit
def _dkdv_tiles(
    b_dk, b_dv, b_ddelta, b_k, b_v, b_delta, o_n, o_d, p_q0, p_do0, p_lse2, p_di, p_alpha0,
    p_dq0, p_dalpha0, p_skip, p_list, n_listed, stride_qs, stride_dos, stride_ls, stride_as,
    stride_dqs, stride_das, stride_sm, los, his, seqlen_q, seqlen_k,
    dist_offset, scale, scale_log2, w_sink, w_left, w_right, w_near,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
    MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, IS_LOCAL: tl.constexpr,
    HAS_GATE: tl.constexpr, IS_LOGSIGMOID: tl.constexpr, ATOMIC_DQ: tl.constexpr,
    LISTED: tl.constexpr, COL_SKIP: tl.constexpr, SKIP_M: tl.constexpr, SKIP_N: tl.constexpr,
):
    """Visit the query tiles of the ranges [los[r], his[r]) for one key tile and query head: a
    plain loop for one range, else one walk over their union. LISTED: visit instead the query
    tiles whose indices p_list[:n_listed] holds (the tiles the forward kept, ascending): with one
    range those inside it, else all of them."""
    if len(los) == 1 and not LISTED:
        for start_m in range(los[0], his[0], BLOCK_M):
            start_m = tl.multiple_of(start_m, BLOCK_M)
            b_dk, b_dv, b_ddelta = _dkdv_tile(
                b_dk, b_dv, b_ddelta, start_m, b_k, b_v, b_delta, o_n, o_d, p_q0, p_do0,
                p_lse2, p_di, p_alpha0, p_dq0, p_dalpha0, p_skip, stride_qs, stride_dos,
                stride_ls, stride_as, stride_dqs, stride_das, stride_sm, seqlen_q, seqlen_k,
                dist_offset, scale, scale_log2, w_sink, w_left, w_right, w_near, HEAD_DIM,
                HEAD_DIM_PAD, BLOCK_M, MASKED, IS_CAUSAL, IS_LOCAL, HAS_GATE, IS_LOGSIGMOID,
                ATOMIC_DQ, COL_SKIP, SKIP_M, SKIP_N)
    else:
        t_first, t_last = walk_range(los, his, p_list, n_listed, BLOCK_M, LISTED)
        for t in range(t_first, t_last):
            start_m = walk_start(t, los, his, 0, 0, p_list, BLOCK_M, False, LISTED)
            b_dk, b_dv, b_ddelta = _dkdv_tile(
                b_dk, b_dv, b_ddelta, start_m, b_k, b_v, b_delta, o_n, o_d, p_q0, p_do0,
                p_lse2, p_di, p_alpha0, p_dq0, p_dalpha0, p_skip, stride_qs, stride_dos,
                stride_ls, stride_as, stride_dqs, stride_das, stride_sm, seqlen_q, seqlen_k,
                dist_offset, scale, scale_log2, w_sink, w_left, w_right, w_near, HEAD_DIM,
                HEAD_DIM_PAD, BLOCK_M, MASKED, IS_CAUSAL, IS_LOCAL, HAS_GATE, IS_LOGSIGMOID,
                ATOMIC_DQ, COL_SKIP, SKIP_M, SKIP_N)
    return b_dk, b_dv, b_ddelta


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, DQ, DK, DV, LSE2, DI, ALPHA, DELTA, DALPHA, DDELTA, CU_Q, CU_K, SEQUSED_K,
    WINDOWS, SKIP, LIST, COUNT,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh, stride_dob, stride_dos, stride_doh,
    stride_dqb, stride_dqs, stride_dqh, stride_dkb, stride_dks, stride_dkh,
    stride_dvb, stride_dvs, stride_dvh, stride_lb, stride_lh, stride_ls,
    stride_ab, stride_ah, stride_as, stride_db, stride_dh, stride_ds,
    stride_dab, stride_dah, stride_das, stride_ddb, stride_ddh, stride_dds, stride_wh,
    stride_sb, stride_sh, stride_sm,
    seqlen_q_fixed, seqlen_k_fixed, scale, scale_log2, HKV, GROUP, heads_first, list_len,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, IS_LOCAL: tl.constexpr, WINDOW_PER_QHEAD: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_SEQUSED_K: tl.constexpr,
    HAS_GATE: tl.constexpr, IS_LOGSIGMOID: tl.constexpr, ATOMIC_DQ: tl.constexpr,
    HAS_SKIP: tl.constexpr, SKIP_M: tl.constexpr, SKIP_N: tl.constexpr,
):
    """dK/dV (and ddelta) of one key tile of one (batch, KV head). HAS_SKIP: the query tiles
    come from LIST (row (b, h, key tile), COUNT entries; see `_kept_tile_lists`): pairs the
    forward skipped are never visited."""
    # heavy (early, causal) key tiles first
    pid_n, pid_bh = program_tile(tl.cdiv(seqlen_k_fixed, BLOCK_N), heads_first)
    b = pid_bh // HKV
    hk = pid_bh % HKV
    if IS_VARLEN:
        q_start = tl.load(CU_Q + b)
        seqlen_q = tl.load(CU_Q + b + 1) - q_start
        k_start = tl.load(CU_K + b)
        seqlen_k = tl.load(CU_K + b + 1) - k_start
        b_off = 0
    else:
        q_start = 0
        k_start = 0
        seqlen_q = seqlen_q_fixed
        seqlen_k = seqlen_k_fixed
        b_off = b
    seqlen_k_all = seqlen_k
    if HAS_SEQUSED_K:
        seqlen_k = tl.minimum(tl.load(SEQUSED_K + b), seqlen_k)
    start_n = pid_n * BLOCK_N
    if start_n >= seqlen_k_all:
        return
    b_off64 = b_off.to(tl.int64)
    dist_offset = seqlen_k - seqlen_q
    o_n = start_n + tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, HEAD_DIM_PAD)
    n_ok = o_n < seqlen_k
    krows = (k_start + o_n).to(tl.int64)

    b_k = load_tile(K + b_off64 * stride_kb + krows[:, None] * stride_ks + hk * stride_kh
                     + o_d[None, :], n_ok[:, None], o_d[None, :], HEAD_DIM, HEAD_DIM_PAD, True)
    b_v = load_tile(V + b_off64 * stride_vb + krows[:, None] * stride_vs + hk * stride_vh
                     + o_d[None, :], n_ok[:, None], o_d[None, :], HEAD_DIM, HEAD_DIM_PAD, True)
    b_dk = tl.zeros([BLOCK_N, HEAD_DIM_PAD], dtype=tl.float32)
    b_dv = tl.zeros([BLOCK_N, HEAD_DIM_PAD], dtype=tl.float32)
    b_ddelta = tl.zeros([BLOCK_N], dtype=tl.float32)
    if HAS_GATE:
        b_delta = tl.load(DELTA + b_off64 * stride_db + hk * stride_dh + krows * stride_ds,
                          mask=n_ok, other=0.0).to(tl.float32)
    else:
        b_delta = b_ddelta

    for g in range(GROUP):
        h = hk * GROUP + g
        if IS_LOCAL:
            p_w = WINDOWS + (h if WINDOW_PER_QHEAD else hk) * stride_wh
            w_sink = tl.load(p_w + 0)
            w_left = tl.load(p_w + 1)
            w_right = tl.load(p_w + 2)
            w_near = tl.load(p_w + 3)
        else:
            w_sink = 0
            w_left = 0
            w_right = 0
            w_near = 0
        p_q0 = Q + b_off64 * stride_qb + q_start.to(tl.int64) * stride_qs + h * stride_qh
        p_do0 = DO + b_off64 * stride_dob + q_start.to(tl.int64) * stride_dos + h * stride_doh
        p_dq0 = DQ + b_off64 * stride_dqb + q_start.to(tl.int64) * stride_dqs + h * stride_dqh
        o_l = b_off64 * stride_lb + h * stride_lh + q_start.to(tl.int64) * stride_ls
        p_alpha0 = ALPHA + b_off64 * stride_ab + h * stride_ah + q_start.to(tl.int64) * stride_as
        p_dalpha0 = DALPHA + b_off64 * stride_dab + h * stride_dah \
            + q_start.to(tl.int64) * stride_das
        p_skip = SKIP + b * stride_sb + h * stride_sh
        whole, edges = _query_ranges(
            start_n, seqlen_q, seqlen_k, dist_offset, w_sink, w_left, w_right, w_near,
            BLOCK_M, BLOCK_N, IS_CAUSAL, IS_LOCAL)
        if HAS_SKIP:
            # the query tiles the forward kept; local windows: one masked walk over all of them
            row = (b * HKV * GROUP + h) * tl.cdiv(seqlen_k_fixed, BLOCK_N) + pid_n
            p_list = LIST + row.to(tl.int64) * list_len
            n_listed = tl.load(COUNT + row)
            if IS_LOCAL:
                edges = ((seqlen_q * 0,), (seqlen_q,))
                whole = ((seqlen_q * 0,), (seqlen_q * 0,))
        else:
            p_list = LIST
            n_listed = 0
        for stage in tl.static_range(2):  # edge tiles masked, whole-visible tiles unmasked
            b_dk, b_dv, b_ddelta = _dkdv_tiles(
                b_dk, b_dv, b_ddelta, b_k, b_v, b_delta, o_n, o_d, p_q0, p_do0, LSE2 + o_l,
                DI + o_l, p_alpha0, p_dq0, p_dalpha0, p_skip, p_list, n_listed, stride_qs,
                stride_dos, stride_ls, stride_as, stride_dqs, stride_das, stride_sm,
                edges[0] if stage == 0 else whole[0], edges[1] if stage == 0 else whole[1],
                seqlen_q, seqlen_k, dist_offset, scale, scale_log2, w_sink, w_left, w_right,
                w_near, HEAD_DIM, HEAD_DIM_PAD, BLOCK_M, stage == 0, IS_CAUSAL, IS_LOCAL,
                HAS_GATE, IS_LOGSIGMOID, ATOMIC_DQ, HAS_SKIP, HAS_SKIP and BLOCK_N > SKIP_N,
                SKIP_M, SKIP_N)

    # keys past seqused_k (and padding rows) get zero gradients
    w_ok = (o_n < seqlen_k_all)[:, None]
    d_ok = w_ok & (o_d[None, :] < HEAD_DIM)
    b_dk = tl.where(n_ok[:, None], b_dk * scale, 0.0)
    b_dv = tl.where(n_ok[:, None], b_dv, 0.0)
    tl.store(DK + b_off64 * stride_dkb + krows[:, None] * stride_dks + hk * stride_dkh
             + o_d[None, :], b_dk.to(DK.dtype.element_ty), mask=d_ok)
    tl.store(DV + b_off64 * stride_dvb + krows[:, None] * stride_dvs + hk * stride_dvh
             + o_d[None, :], b_dv.to(DV.dtype.element_ty), mask=d_ok)
    if HAS_GATE:
        b_ddelta = tl.where(n_ok, b_ddelta * scale, 0.0)
        tl.store(DDELTA + b_off64 * stride_ddb + hk * stride_ddh + krows * stride_dds,
                 b_ddelta.to(DDELTA.dtype.element_ty), mask=o_n < seqlen_k_all)


@triton.jit
def _dq_load(p_k0, p_v0, p_delta0, o_d, stride_ks, stride_vs, stride_ds, start_n, seqlen_k,
             HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
             MASKED: tl.constexpr, HAS_GATE: tl.constexpr):
    """Inputs of one key tile for the dQ kernel: K^T, V^T [D, N] and delta [N]."""
    o_n = start_n + tl.arange(0, BLOCK_N)
    n_ok = o_n < seqlen_k
    rows = o_n.to(tl.int64)
    b_kT = load_tile(p_k0 + rows[None, :] * stride_ks + o_d[:, None], n_ok[None, :],
                      o_d[:, None], HEAD_DIM, HEAD_DIM_PAD, MASKED)
    b_vT = load_tile(p_v0 + rows[None, :] * stride_vs + o_d[:, None], n_ok[None, :],
                      o_d[:, None], HEAD_DIM, HEAD_DIM_PAD, MASKED)
    if HAS_GATE:
        b_delta = tl.load(p_delta0 + rows * stride_ds, mask=n_ok, other=0.0).to(tl.float32)
    else:
        b_delta = o_n
    return o_n, b_kT, b_vT, b_delta


@triton.jit
def _dq_math(
    b_dq, b_dalpha, b_q, b_do, b_lse2, b_di, b_alpha, o_m, o_n, b_kT, b_vT, b_delta, b_keep,
    seqlen_k, dist_offset, scale_log2, w_sink, w_left, w_right, w_near,
    MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, IS_LOCAL: tl.constexpr,
    HAS_GATE: tl.constexpr, IS_LOGSIGMOID: tl.constexpr, COL_SKIP: tl.constexpr,
):
    """One (query tile, key tile) pair of the dQ kernel (COL_SKIP: as in `_dkdv_math`)."""
    b_s = tl.dot(b_q, b_kT)  # [M, N]
    b_dp = tl.dot(b_do, b_vT)  # issued before the exponentials: its MMA overlaps them
    if HAS_GATE:
        b_g = gate_2d(b_alpha[:, None] * b_delta[None, :], IS_LOGSIGMOID)
        b_s += b_g
    b_p = tl.math.exp2(b_s * scale_log2 - b_lse2[:, None])
    if MASKED:
        m_vis = visible_2d(o_m[:, None], o_n[None, :], dist_offset, seqlen_k, IS_CAUSAL,
                           IS_LOCAL, w_sink, w_left, w_right, w_near)
        b_p = tl.where(m_vis, b_p, 0.0)
    if COL_SKIP:
        b_p = tl.where(b_keep[None, :], b_p, 0.0)
    b_ds = b_p * (b_dp - b_di[:, None])
    b_dq = tl.dot(b_ds.to(b_kT.dtype), tl.trans(b_kT), b_dq)
    if HAS_GATE:
        b_dalpha += tl.sum(b_ds * gate_grad_2d(b_g, IS_LOGSIGMOID) * b_delta[None, :], 1)
    return b_dq, b_dalpha


@triton.jit
def _dq_tile(
    b_dq, b_dalpha, start_n, b_q, b_do, b_lse2, b_di, b_alpha, o_m, o_d, p_k0, p_v0, p_delta0,
    p_skip, stride_ks, stride_vs, stride_ds, seqlen_k, dist_offset, scale_log2,
    w_sink, w_left, w_right, w_near,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, IS_LOCAL: tl.constexpr,
    HAS_GATE: tl.constexpr, IS_LOGSIGMOID: tl.constexpr, COL_SKIP: tl.constexpr,
    SKIP_N: tl.constexpr,
):
    """One key tile of the dQ kernel (COL_SKIP: p_skip is this query block's row of codes)."""
    o_n, b_kT, b_vT, b_delta = _dq_load(p_k0, p_v0, p_delta0, o_d, stride_ks, stride_vs,
                                        stride_ds, start_n, seqlen_k, HEAD_DIM,
                                        HEAD_DIM_PAD, BLOCK_N, MASKED, HAS_GATE)
    if COL_SKIP:
        b_keep = _kept_keys(p_skip, o_n, seqlen_k, SKIP_N)
    else:
        b_keep = o_n
    b_dq, b_dalpha = _dq_math(
        b_dq, b_dalpha, b_q, b_do, b_lse2, b_di, b_alpha, o_m, o_n, b_kT, b_vT, b_delta,
        b_keep, seqlen_k, dist_offset, scale_log2, w_sink, w_left, w_right, w_near, MASKED,
        IS_CAUSAL, IS_LOCAL, HAS_GATE, IS_LOGSIGMOID, COL_SKIP)
    return b_dq, b_dalpha


@triton.jit
def _dq_tiles(
    b_dq, b_dalpha, b_q, b_do, b_lse2, b_di, b_alpha, o_m, o_d, p_k0, p_v0, p_delta0, p_skip,
    p_list, n_listed, stride_ks, stride_vs, stride_ds, los, his, seqlen_k, dist_offset,
    scale_log2, w_sink, w_left, w_right, w_near,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, IS_LOCAL: tl.constexpr,
    HAS_GATE: tl.constexpr, IS_LOGSIGMOID: tl.constexpr, LISTED: tl.constexpr,
    COL_SKIP: tl.constexpr, SKIP_N: tl.constexpr,
):
    """Visit the key tiles of the ranges [los[r], his[r]): a plain loop for one range, else
    one walk over their union; LISTED: the listed key tiles (as `_dkdv_tiles`)."""
    if len(los) == 1 and not LISTED:
        for start_n in range(los[0], his[0], BLOCK_N):
            start_n = tl.multiple_of(start_n, BLOCK_N)
            b_dq, b_dalpha = _dq_tile(
                b_dq, b_dalpha, start_n, b_q, b_do, b_lse2, b_di, b_alpha, o_m, o_d, p_k0,
                p_v0, p_delta0, p_skip, stride_ks, stride_vs, stride_ds, seqlen_k, dist_offset,
                scale_log2, w_sink, w_left, w_right, w_near, HEAD_DIM, HEAD_DIM_PAD, BLOCK_N,
                MASKED, IS_CAUSAL, IS_LOCAL, HAS_GATE, IS_LOGSIGMOID, COL_SKIP, SKIP_N)
    else:
        t_first, t_last = walk_range(los, his, p_list, n_listed, BLOCK_N, LISTED)
        for t in range(t_first, t_last):
            start_n = walk_start(t, los, his, 0, 0, p_list, BLOCK_N, False, LISTED)
            b_dq, b_dalpha = _dq_tile(
                b_dq, b_dalpha, start_n, b_q, b_do, b_lse2, b_di, b_alpha, o_m, o_d, p_k0,
                p_v0, p_delta0, p_skip, stride_ks, stride_vs, stride_ds, seqlen_k, dist_offset,
                scale_log2, w_sink, w_left, w_right, w_near, HEAD_DIM, HEAD_DIM_PAD, BLOCK_N,
                MASKED, IS_CAUSAL, IS_LOCAL, HAS_GATE, IS_LOGSIGMOID, COL_SKIP, SKIP_N)
    return b_dq, b_dalpha


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE2, DI, ALPHA, DELTA, DALPHA, CU_Q, CU_K, SEQUSED_K, WINDOWS, SKIP,
    LIST, COUNT,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh, stride_dob, stride_dos, stride_doh,
    stride_dqb, stride_dqs, stride_dqh, stride_lb, stride_lh, stride_ls,
    stride_ab, stride_ah, stride_as, stride_db, stride_dh, stride_ds,
    stride_dab, stride_dah, stride_das, stride_wh, stride_sb, stride_sh, stride_sm,
    seqlen_q_fixed, seqlen_k_fixed, scale, scale_log2, H, GROUP, heads_first, list_len,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, IS_LOCAL: tl.constexpr, WINDOW_PER_QHEAD: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_SEQUSED_K: tl.constexpr,
    HAS_GATE: tl.constexpr, IS_LOGSIGMOID: tl.constexpr,
    HAS_SKIP: tl.constexpr, SKIP_M: tl.constexpr, SKIP_N: tl.constexpr,
):
    """Deterministic dQ (and dalpha) for one query tile, no atomics. HAS_SKIP: the key tiles
    come from LIST (row (b, h, query tile), COUNT entries), as in the dK/dV kernel."""
    # heavy (late, causal) query tiles first
    n_m = tl.cdiv(seqlen_q_fixed, BLOCK_M)
    tile, pid_bh = program_tile(n_m, heads_first)
    pid_m = n_m - 1 - tile
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    if IS_VARLEN:
        q_start = tl.load(CU_Q + b)
        seqlen_q = tl.load(CU_Q + b + 1) - q_start
        k_start = tl.load(CU_K + b)
        seqlen_k = tl.load(CU_K + b + 1) - k_start
        b_off = 0
    else:
        q_start = 0
        k_start = 0
        seqlen_q = seqlen_q_fixed
        seqlen_k = seqlen_k_fixed
        b_off = b
    if HAS_SEQUSED_K:
        seqlen_k = tl.minimum(tl.load(SEQUSED_K + b), seqlen_k)
    start_m = pid_m
    if start_m * BLOCK_M >= seqlen_q:
        return
    b_off64 = b_off.to(tl.int64)
    dist_offset = seqlen_k - seqlen_q
    if IS_LOCAL:
        p_w = WINDOWS + (h if WINDOW_PER_QHEAD else hk) * stride_wh
        w_sink = tl.load(p_w + 0)
        w_left = tl.load(p_w + 1)
        w_right = tl.load(p_w + 2)
        w_near = tl.load(p_w + 3)
    else:
        w_sink = 0
        w_left = 0
        w_right = 0
        w_near = 0
    o_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, HEAD_DIM_PAD)
    m_ok = o_m < seqlen_q
    rows = (q_start + o_m).to(tl.int64)
    b_q = load_tile(Q + b_off64 * stride_qb + rows[:, None] * stride_qs + h * stride_qh
                     + o_d[None, :], m_ok[:, None], o_d[None, :], HEAD_DIM, HEAD_DIM_PAD, True)
    b_do = load_tile(DO + b_off64 * stride_dob + rows[:, None] * stride_dos + h * stride_doh
                      + o_d[None, :], m_ok[:, None], o_d[None, :], HEAD_DIM, HEAD_DIM_PAD, True)
    o_l = b_off64 * stride_lb + h * stride_lh + rows * stride_ls
    b_lse2 = tl.load(LSE2 + o_l, mask=m_ok, other=float("inf"))
    b_di = tl.load(DI + o_l, mask=m_ok, other=0.0)
    if HAS_GATE:
        b_alpha = tl.load(ALPHA + b_off64 * stride_ab + h * stride_ah + rows * stride_as,
                          mask=m_ok, other=0.0).to(tl.float32)
    else:
        b_alpha = tl.zeros([BLOCK_M], dtype=tl.float32)
    p_k0 = K + b_off64 * stride_kb + k_start.to(tl.int64) * stride_ks + hk * stride_kh
    p_v0 = V + b_off64 * stride_vb + k_start.to(tl.int64) * stride_vs + hk * stride_vh
    p_delta0 = DELTA + b_off64 * stride_db + hk * stride_dh + k_start.to(tl.int64) * stride_ds
    b_dq = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    b_dalpha = tl.zeros([BLOCK_M], dtype=tl.float32)
    p_skip = SKIP + b * stride_sb + h * stride_sh + (start_m * BLOCK_M // SKIP_M) * stride_sm

    lo0, hi0, lo1, hi1, lo2, hi2, lo3, hi3 = _key_ranges(
        start_m, seqlen_q, seqlen_k, dist_offset, w_sink, w_left, w_right, w_near,
        BLOCK_M, BLOCK_N, IS_CAUSAL, IS_LOCAL)
    # as in the forward: whole-visible tiles unmasked, edge tiles masked, one loop each
    whole, edges = _mask_stages(start_m, seqlen_q, seqlen_k, dist_offset, w_sink, w_left,
                                w_right, w_near, lo0, hi0, lo1, hi1, lo2, hi2, lo3, hi3,
                                BLOCK_M, BLOCK_N, IS_LOCAL)
    if HAS_SKIP:
        # the key tiles the forward kept; local windows: one masked walk over all of them
        row = pid_bh * n_m + pid_m
        p_list = LIST + row.to(tl.int64) * list_len
        n_listed = tl.load(COUNT + row)
        if IS_LOCAL:
            whole = ((seqlen_k * 0,), (seqlen_k * 0,))
            edges = ((seqlen_k * 0,), (seqlen_k,))
    else:
        p_list = LIST
        n_listed = 0
    for stage in tl.static_range(2):  # whole-visible tiles unmasked, edge tiles masked
        b_dq, b_dalpha = _dq_tiles(
            b_dq, b_dalpha, b_q, b_do, b_lse2, b_di, b_alpha, o_m, o_d, p_k0, p_v0, p_delta0,
            p_skip, p_list, n_listed, stride_ks, stride_vs, stride_ds,
            whole[0] if stage == 0 else edges[0], whole[1] if stage == 0 else edges[1],
            seqlen_k, dist_offset, scale_log2, w_sink, w_left, w_right, w_near, HEAD_DIM,
            HEAD_DIM_PAD, BLOCK_N, stage == 1, IS_CAUSAL, IS_LOCAL, HAS_GATE, IS_LOGSIGMOID,
            HAS_SKIP, HAS_SKIP and BLOCK_N > SKIP_N, SKIP_N)
    tl.store(DQ + b_off64 * stride_dqb + rows[:, None] * stride_dqs + h * stride_dqh
             + o_d[None, :], (b_dq * scale).to(DQ.dtype.element_ty),
             mask=m_ok[:, None] & (o_d[None, :] < HEAD_DIM))
    if HAS_GATE:
        tl.store(DALPHA + b_off64 * stride_dab + h * stride_dah + rows * stride_das,
                 (b_dalpha * scale).to(DALPHA.dtype.element_ty), mask=m_ok)


_SIDE_STREAMS: dict = {}


def _side_stream(q):
    """The high-priority stream of q's CUDA device (None off CUDA), made to wait for the
    caller's stream: work queued on it sees everything queued before."""
    if q.device.type != "cuda":
        return None
    index = q.device.index if q.device.index is not None else torch.cuda.current_device()
    side = _SIDE_STREAMS.get(index)
    if side is None:
        low, high = torch.cuda.Stream.priority_range()
        side = _SIDE_STREAMS[index] = torch.cuda.Stream(q.device, priority=high)
    side.wait_stream(torch.cuda.current_stream(q.device))
    return side


def _on_stream(side):
    return torch.cuda.stream(side) if side is not None else contextlib.nullcontext()


@triton.jit
def _kept_tiles_kernel(
    SKIP, LIST, COUNT, stride_sb, stride_sh, stride_sm, stride_sn, n_outer, n_inner, n_kb, H,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SKIP_M: tl.constexpr, SKIP_N: tl.constexpr,
    BY_KEY: tl.constexpr, CHUNK: tl.constexpr,
):
    """One row of `_kept_tile_lists`: program (b, h, outer tile) writes the ascending indices of
    the inner tiles that hold a kept block pair to LIST[row, :count] and count to COUNT[row]."""
    row = tl.program_id(0)
    outer = row % n_outer
    bh = row // n_outer
    p_codes = SKIP + (bh // H).to(tl.int64) * stride_sb + (bh % H).to(tl.int64) * stride_sh
    PER: tl.constexpr = BLOCK_N // SKIP_N if BLOCK_N > SKIP_N else 1
    count = 0
    for c0 in range(0, n_inner, CHUNK):
        inner = c0 + tl.arange(0, CHUNK)
        if BY_KEY:
            m_tile, n_tile = inner, outer
        else:
            m_tile, n_tile = outer, inner
        p_row = p_codes + (m_tile * BLOCK_M // SKIP_M).to(tl.int64) * stride_sm
        kept = tl.zeros([CHUNK], dtype=tl.int32)
        for p in tl.static_range(PER):
            kb = n_tile * BLOCK_N // SKIP_N + p + 0 * inner  # [CHUNK] in both orders
            code = tl.load(p_row + kb * stride_sn, mask=(inner < n_inner) & (kb < n_kb), other=0)
            kept = kept | (code == 1).to(tl.int32)
        pos = count + tl.cumsum(kept, 0) - 1
        tl.store(LIST + row.to(tl.int64) * n_inner + pos, inner.to(LIST.dtype.element_ty),
                 mask=kept != 0)
        count += tl.sum(kept, 0)
    tl.store(COUNT + row, count)


def _kept_tile_lists(skip, skip_m, block_m, block_n, n_m, n_n, by_key):
    """Which (query tile, key tile) pairs of a backward launch hold a pair the forward kept,
    as ascending index lists: (LIST, COUNT). by_key (dK/dV): LIST[b, h, key tile, :COUNT[b, h,
    key tile]] are query tiles; else (dQ) LIST[b, h, query tile, :COUNT] are key tiles (entries
    past COUNT are not written).

    `skip` holds the forward's codes per skip block (skip_m x SKIP_BLOCK_N, 1 = kept);
    a tile lies inside one block row (block_m divides skip_m) and covers one or more
    blocks, or part of one, of that row. One kernel launch, no host sync (the lists used to
    take ~30 small torch ops, whose launch overhead exceeded the kernels' time at 4k)."""
    batch, heads, _, n_kb = skip.shape
    n_outer, n_inner = (n_n, n_m) if by_key else (n_m, n_n)
    dtype = torch.int16 if n_inner < 2 ** 15 else torch.int32
    lists = buffer((batch, heads, n_outer, n_inner), dtype, skip.device)
    counts = buffer((batch, heads, n_outer), torch.int32, skip.device)
    if lists.numel() == 0:
        return lists, counts.zero_()
    chunk = min(1024, max(16, configs.next_pow2(n_inner)))
    launch(
        _kept_tiles_kernel, (batch * heads * n_outer,),
        skip, lists, counts, *skip.stride(), n_outer, n_inner, n_kb, heads,
        BLOCK_M=block_m, BLOCK_N=block_n, SKIP_M=skip_m,
        SKIP_N=configs.SKIP_BLOCK_N, BY_KEY=by_key, CHUNK=chunk, num_warps=4,
    )
    return lists, counts


def launch_attn_bwd(dout, q, k, v, out, lse, skip, *, config=None, **kw):
    """(dq, dk, dv, dalpha, ddelta) of `_attn_bwd_launches` (same arguments), replayed from
    its launch plan (`launch.planned`) on calls whose signature it has seen (`config`, for
    tuning, always takes the long way); an fp32 dQ / dalpha accumulator cast to the input
    dtype."""
    args = (dout, q, k, v, out, lse, skip)
    if config is None:
        dq, dk, dv, dalpha, ddelta = planned(_attn_bwd_launches, args, kw,
                                             configs.fwd_path_forced())
    else:
        dq, dk, dv, dalpha, ddelta = _attn_bwd_launches(*args, config=config, **kw)
    if not compiling():
        if dq.dtype != q.dtype:
            dq = dq.to(q.dtype)
        alpha = kw["alpha"]
        if alpha is not None and dalpha.dtype != alpha.dtype:
            dalpha = dalpha.to(alpha.dtype)
    return dq, dk, dv, dalpha, ddelta


def _attn_bwd_launches(dout, q, k, v, out, lse, skip, *, alpha, delta, cu_seqlens_q,
                       cu_seqlens_k, seqused_k, window_sizes, max_seqlen_q, max_seqlen_k,
                       softmax_scale, is_causal, softmax_threshold, gate_threshold,
                       is_logsigmoid_gate, is_adapt_gate, deterministic, config=None):
    """`config` overrides the launch config (scripts/tune.py only). dq (and dalpha) come
    back as the fp32 accumulators where dQ is added atomically."""
    is_varlen = cu_seqlens_q is not None
    if is_varlen:
        batch, num_heads, head_dim = cu_seqlens_q.shape[0] - 1, q.shape[1], q.shape[2]
        num_kv_heads = k.shape[1]
        seqlen_q, seqlen_k = max_seqlen_q, max_seqlen_k
    else:
        batch, seqlen_q, num_heads, head_dim = q.shape
        seqlen_k, num_kv_heads = k.shape[1], k.shape[2]
    has_gate = alpha is not None
    dk = buffer_like(k)
    dv = buffer_like(v)
    has_skip = skip.numel() > 0 and (softmax_threshold > 0 or (has_gate and gate_threshold != 0))
    cfg = config or configs.bwd_config(q, head_dim, seqlen_q, seqlen_k, is_causal,
                                       window_sizes is not None, has_gate, has_skip)
    skip_m = configs.skip_block_m(head_dim)
    # gated with block skipping stays portable: the Gluon kernel visits 64 x 128 tile pairs,
    # and gates close scattered 64-key blocks, so a pair with one block kept runs whole (H200,
    # 16k causal, 70% of the blocks closed: 8.8 ms vs 7.3 portable at D=128, 6.5 vs 5.0 at D=64)
    path = configs.bwd_path(q, k, v, dout, hopper_covers=not is_varlen and window_sizes is None
                            and seqused_k is None and config is None
                            and not (has_gate and has_skip))
    # portable: dQ in its own pass (deterministic, and on H200 faster than fp32 atomics at
    # D=128) unless the launch table prefers atomics; hopper: as configs.HOPPER_BWD_DQ says,
    # gated always the pass (which also sums dalpha). deterministic=True: always the own pass
    atomic_dq = (configs.HOPPER_BWD_DQ[head_dim] == "atomic" and not has_gate
                 if path == "hopper" else cfg.atomic_dq) and not deterministic
    dalpha = buffer(alpha.shape, torch.float32 if atomic_dq else alpha.dtype, q.device,
                    zero=True) if has_gate else buffer((0,), q.dtype, q.device)
    ddelta = buffer(delta.shape, delta.dtype, q.device) if has_gate \
        else buffer((0,), q.dtype, q.device)
    if q.numel() == 0 or k.numel() == 0 or batch == 0:
        return torch.zeros_like(q), dk.zero_(), dv.zero_(), dalpha.zero_(), ddelta.zero_()

    head_dim_pad = configs.head_dim_pad(head_dim)
    is_local = window_sizes is not None
    lse = lse.contiguous()
    di = buffer_like(lse)
    lse2 = buffer_like(lse)
    stride_l = _strides3(lse, is_varlen)  # [H, total_q] or [B, H, Sq]
    dummy = q
    common = dict(HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, IS_VARLEN=is_varlen)
    dq_pad = 0
    if atomic_dq:
        # the Gluon kernel adds whole query tiles: rows padded to its tile, no masked atomics
        if path == "hopper":
            dq_pad = configs.cdiv(seqlen_q, configs.HOPPER_BWD_TILE[0]) \
                * configs.HOPPER_BWD_TILE[0] - seqlen_q
        dq_acc = buffer((batch, seqlen_q + dq_pad) + tuple(q.shape[2:]) if not is_varlen
                        else q.shape, torch.float32, q.device)
        dq = dq_acc[:, :seqlen_q] if dq_pad else dq_acc
    else:
        dq = buffer_like(q)
    launch(
        _bwd_preprocess_kernel,
        (configs.cdiv(seqlen_q + dq_pad, cfg.block_m_pre), batch * num_heads),
        out, dout, lse, di, lse2, cu_seqlens_q if is_varlen else dummy,
        dq_acc if atomic_dq else dummy,
        *_strides3(out, is_varlen), *_strides3(dout, is_varlen), *stride_l,
        *(_strides3(dq_acc, is_varlen) if atomic_dq else (0, 0, 0)), seqlen_q, num_heads, dq_pad,
        BLOCK_M=cfg.block_m_pre, ZERO_DQ=atomic_dq, num_warps=4, **common,
    )
    flags = dict(
        IS_CAUSAL=bool(is_causal), IS_LOCAL=is_local,
        WINDOW_PER_QHEAD=is_local and window_sizes.shape[0] == num_heads
        and num_heads != num_kv_heads,
        HAS_SEQUSED_K=seqused_k is not None, HAS_GATE=has_gate,
        IS_LOGSIGMOID=bool(is_logsigmoid_gate), **common,
    )
    tensors = dict(
        CU_Q=cu_seqlens_q if is_varlen else dummy, CU_K=cu_seqlens_k if is_varlen else dummy,
        SEQUSED_K=seqused_k if seqused_k is not None else dummy,
        WINDOWS=window_sizes if is_local else dummy,
        ALPHA=alpha if has_gate else dummy, DELTA=delta if has_gate else dummy,
        SKIP=skip if has_skip else dummy,
    )
    stride_s = skip.stride()[:3] if has_skip else (0, 0, 0)
    flags.update(HAS_SKIP=has_skip, SKIP_M=skip_m, SKIP_N=configs.SKIP_BLOCK_N)
    scale_log2 = softmax_scale * 1.4426950408889634
    heads_first = int(configs.heads_first("bwd", is_local))
    n_m, n_n = configs.cdiv(seqlen_q, cfg.block_m), configs.cdiv(seqlen_k, cfg.block_n)
    n_m_dq, n_n_dq = configs.cdiv(seqlen_q, cfg.block_m_dq), configs.cdiv(seqlen_k, cfg.block_n_dq)
    if path == "hopper":
        n_m, n_n = (configs.cdiv(seqlen_q, configs.HOPPER_BWD_TILE[0]),
                    configs.cdiv(seqlen_k, configs.HOPPER_BWD_TILE[1]))
    if has_skip:
        configs.check_skip_tiles(cfg, skip_m)
        list_kv, count_kv = _kept_tile_lists(
            skip, skip_m, *(configs.HOPPER_BWD_TILE if path == "hopper"
                            else (cfg.block_m, cfg.block_n)), n_m, n_n, True)
        list_q, count_q = _kept_tile_lists(skip, skip_m, cfg.block_m_dq, cfg.block_n_dq,
                                           n_m_dq, n_n_dq, False) if not atomic_dq \
            else (dummy, dummy)
    else:
        list_kv = count_kv = list_q = count_q = dummy
    # dK/dV on a high-priority side stream, the dQ pass on the caller's stream: the two are
    # independent, and dQ programs fill the SMs that the tail of the dK/dV grid leaves idle
    side = _side_stream(q) if not atomic_dq else None
    with _on_stream(side):
        if path == "hopper":
            from .hopper_bwd import launch_attn_bwd_hopper

            launch_attn_bwd_hopper(q, k, v, dout, dq_acc if atomic_dq else dq, dk, dv, lse2, di,
                                   softmax_scale=softmax_scale, is_causal=is_causal,
                                   atomic_dq=atomic_dq, skip=skip if has_skip else None,
                                   lists=(list_kv, count_kv), alpha=alpha, delta=delta,
                                   ddelta=ddelta, is_logsigmoid_gate=is_logsigmoid_gate)
        else:
            launch(
                _attn_bwd_dkdv_kernel, (n_n * batch * num_kv_heads,),
                q, k, v, dout, dq, dk, dv, lse2, di, tensors["ALPHA"], tensors["DELTA"],
                dalpha if has_gate else dummy, ddelta if has_gate else dummy, tensors["CU_Q"],
                tensors["CU_K"], tensors["SEQUSED_K"], tensors["WINDOWS"], tensors["SKIP"],
                list_kv, count_kv,
                *_strides3(q, is_varlen), *_strides3(k, is_varlen), *_strides3(v, is_varlen),
                *_strides3(dout, is_varlen), *_strides3(dq, is_varlen), *_strides3(dk, is_varlen),
                *_strides3(dv, is_varlen), *stride_l, *_strides3(alpha, is_varlen),
                *_strides3(delta, is_varlen),
                *_strides3(dalpha if has_gate else None, is_varlen),
                *_strides3(ddelta if has_gate else None, is_varlen),
                window_sizes.stride(0) if is_local else 0, *stride_s,
                seqlen_q, seqlen_k, softmax_scale, scale_log2, num_kv_heads,
                num_heads // num_kv_heads, heads_first, n_m,
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, ATOMIC_DQ=atomic_dq,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages, **flags,
            )
    if not atomic_dq:
        launch(
            _attn_bwd_dq_kernel, (n_m_dq * batch * num_heads,),
            q, k, v, dout, dq, lse2, di, tensors["ALPHA"], tensors["DELTA"],
            dalpha if has_gate else dummy, tensors["CU_Q"], tensors["CU_K"],
            tensors["SEQUSED_K"], tensors["WINDOWS"], tensors["SKIP"], list_q, count_q,
            *_strides3(q, is_varlen), *_strides3(k, is_varlen), *_strides3(v, is_varlen),
            *_strides3(dout, is_varlen), *_strides3(dq, is_varlen), *stride_l,
            *_strides3(alpha, is_varlen), *_strides3(delta, is_varlen),
            *_strides3(dalpha if has_gate else None, is_varlen),
            window_sizes.stride(0) if is_local else 0, *stride_s,
            seqlen_q, seqlen_k, softmax_scale, scale_log2, num_heads,
            num_heads // num_kv_heads, heads_first, n_n_dq,
            BLOCK_M=cfg.block_m_dq, BLOCK_N=cfg.block_n_dq,
            num_warps=cfg.num_warps_dq, num_stages=cfg.num_stages_dq, **flags,
        )
    if side is not None:
        torch.cuda.current_stream(q.device).wait_stream(side)
    else:
        replayable()
    return dq, dk, dv, dalpha, ddelta
