"""Decode over KV caches (SPEC §7): one new query token per sequence, split-KV, packed GQA.

Notation
- B batch, H query heads, Hkv KV heads, G = H // Hkv query heads per KV head, D head dim.
- L_b keys of sequence b: seqused_k[b] if given, else the cache length of b; clamped to
  [0, capacity of b]. Logical positions p in [0, L_b); the query is the newest token, so
  dist = (L_b - 1) - p (SPEC §3 with Sq = 1).
- Cache addressing of position p of sequence b (same for K, V and delta, each with its strides
  normalised to (outer, row, head)):
    contiguous [B, Sk, Hkv, D]                    outer b, row p
    packed     [total_k, Hkv, D] + cu_seqlens_k   outer 0, row cu_seqlens_k[b] + p
    paged      [num_pages, page_size, Hkv, D]     outer page_table[b, p // page_size],
                                                  row p % page_size
- Program (pid_bh, pid_s): pid_bh = ((b * Hkv) + hk) * M_CHUNKS + c; rows of its tile are the
  query heads hk * G + c * BLOCK_M + r (r < BLOCK_M, r < G): packed GQA, so each K/V tile is
  loaded once for all G heads (M_CHUNKS > 1 only when G > 64). pid_s is the split.
- Work list of a program: key tiles of BLOCK_N logical positions covering what may be visible
  (dense: [0, L_b); local windows: the sink, the far band and the near band as three disjoint
  tile ranges), or, with gather_kv_indices, tiles of BLOCK_N slots of the index list. Split s
  takes tiles [s * per, (s + 1) * per) of that list, per = cdiv(n_tiles, num_splits).
- `b_q` [BLOCK_M, D], `b_k`/`b_v` [BLOCK_N, D], `b_s` [BLOCK_M, BLOCK_N] base-2 scores
  (q.k + g) * scale * log2(e); `m_i`, `l_i` [BLOCK_M] running max / sum (common.py).
- One split: the kernel writes out / lse. Several: it writes fp32 partials (o normalised by its
  own sum, lse in base 2) that `combine.py` merges with an exact log-sum-exp combine.

Caution
- Skipping (SPEC §7) covers contiguous, packed and paged caches; with gather_kv_indices or
  windows the thresholds drop nothing (those calls are sparse by construction). Every split
  recomputes the anchors' statistics (K of two tiles), so the decisions do not depend on the
  split count; tiles are then the 64-key skip blocks whatever the launch table says.
- Out-of-bounds safety whatever the tensors hold: L_b is clamped to the capacity, positions of
  the index list outside [0, L_b) are masked (never loaded), page ids are clamped into
  [0, num_pages), packed ranges are clamped into [0, total_k). Garbage page ids or cu_seqlens
  give garbage results, never a bad address.
- Only keys some row may see are loaded (masked loads): cache rows at or beyond L_b, and rows
  hidden by every row's window, are never read, so they may hold NaN.
- Per-query-head windows ([H, 4] with G > 1) visit every tile of [0, L_b) (the union of the
  heads' bands is not computed); per-KV-head windows visit only the three bands.
- num_splits is a host int chosen from shapes only (no host sync, no data-dependent
  allocation): CUDA-graph capturable. A split whose share of the work list is empty writes an
  empty partial (o = 0, lse = -inf).
- Loads are 16-byte vectors (cp.async, pipelined) only when Triton can prove 16-byte alignment
  of every row: strides multiples of 16 elements, which holds for D % 16 == 0 caches. With
  D % 16 == 8 (40, 72, ...) the loads fall back to narrow, unpipelined ones (correct, slower).
- Offsets into caches are int64; positions are int32 (caches up to 2**31 rows per sequence).
- bf16 `tl.dot` cannot run under TRITON_INTERPRET (it multiplies raw bits): test in fp16 there.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import configs
from .configs import decode_block_m, decode_config, decode_num_splits, num_sms
from .combine import launch_combine
from .common import (LN2, accumulate_tile, gate, gate_max, gate_skip_threshold, load_tile,
                     online_softmax_step, page_of, softmax_skip_threshold, visible_2d)
from .launch import buffer, buffer_like, launch, planned, replayable

# split heuristic (decode_num_splits): resident programs per SM assumed, least tiles per split


# --------------------------------------------------------------------------------------------
# kv_append
# --------------------------------------------------------------------------------------------
@triton.jit
def _kv_append_kernel(
    K, V, DELTA, K_NEW, V_NEW, DELTA_NEW, PAGE_TABLE, CU_K, SEQUSED_K,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_db, stride_ds, stride_dh,
    stride_knb, stride_knh, stride_vnb, stride_vnh, stride_dnb, stride_dnh,
    stride_pb, cache_len, num_pages, Hkv,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, PAGE_SIZE: tl.constexpr,
    IS_PAGED: tl.constexpr, IS_PACKED: tl.constexpr, HAS_DELTA: tl.constexpr,
):
    """One program per (b, hk): write k_new[b, hk], v_new[b, hk] (delta_new[b, hk]) at logical
    position seqused_k[b]; a position outside the sequence's capacity writes nothing."""
    pid = tl.program_id(0)
    b = pid // Hkv
    hk = pid % Hkv
    o_d = tl.arange(0, HEAD_DIM_PAD)
    m_d = o_d < HEAD_DIM
    # the position, broadcast over the head dim [D] (every mask below is a vector)
    pos = tl.load(SEQUSED_K + b) + o_d * 0
    if IS_PACKED:
        k_start = tl.minimum(tl.maximum(tl.load(CU_K + b), 0), cache_len)
        cap = tl.minimum(tl.load(CU_K + b + 1), cache_len) - k_start
    else:
        k_start = 0
        cap = cache_len
    ok = (pos >= 0) & (pos < cap)
    pos = tl.where(ok, pos, 0)
    if IS_PAGED:
        page = tl.load(PAGE_TABLE + b.to(tl.int64) * stride_pb + pos // PAGE_SIZE, mask=ok,
                       other=0)
        ok = ok & (page >= 0) & (page < num_pages)
        outer = tl.where(ok, page, 0).to(tl.int64)
        row = (pos % PAGE_SIZE).to(tl.int64)
    elif IS_PACKED:
        outer = b.to(tl.int64) * 0
        row = (k_start + pos).to(tl.int64)
    else:
        outer = b.to(tl.int64)
        row = pos.to(tl.int64)
    b_k = tl.load(K_NEW + b.to(tl.int64) * stride_knb + hk * stride_knh + o_d, mask=m_d)
    b_v = tl.load(V_NEW + b.to(tl.int64) * stride_vnb + hk * stride_vnh + o_d, mask=m_d)
    tl.store(K + outer * stride_kb + row * stride_ks + hk * stride_kh + o_d,
             b_k.to(K.dtype.element_ty), mask=m_d & ok)
    tl.store(V + outer * stride_vb + row * stride_vs + hk * stride_vh + o_d,
             b_v.to(V.dtype.element_ty), mask=m_d & ok)
    if HAS_DELTA:
        # one scalar per (b, hk): lane 0 of the head-dim vector writes it
        b_dn = tl.load(DELTA_NEW + b.to(tl.int64) * stride_dnb + hk * stride_dnh + o_d * 0)
        tl.store(DELTA + outer * stride_db + row * stride_ds + hk * stride_dh + o_d * 0,
                 b_dn.to(DELTA.dtype.element_ty), mask=ok & (o_d == 0))


def _cache_strides(t, is_packed):
    """(outer, row, head) strides of a K/V cache: contiguous [B, Sk, Hkv, D], paged
    [num_pages, page_size, Hkv, D] or packed [total_k, Hkv, D] (outer 0)."""
    if t is None:
        return 0, 0, 0
    if is_packed:
        return 0, t.stride(0), t.stride(1)
    return t.stride(0), t.stride(1), t.stride(2)


def _delta_strides(t, is_paged, is_packed):
    """(outer, row, head) strides of a delta cache: [B, Hkv, Sk], paged
    [num_pages, page_size, Hkv] or packed [Hkv, total_k]."""
    if t is None:
        return 0, 0, 0
    if is_paged:
        return t.stride(0), t.stride(1), t.stride(2)
    if is_packed:
        return 0, t.stride(1), t.stride(0)
    return t.stride(0), t.stride(2), t.stride(1)


def _layout(k_cache, page_table, cu_seqlens_k):
    """(is_paged, is_packed, page_size, num_pages, cache_len): cache_len is the capacity of a
    sequence (contiguous: Sk; paged: max_pages * page_size) or total_k when packed."""
    if page_table is not None:
        page_size = k_cache.shape[1]
        return True, False, page_size, k_cache.shape[0], page_table.shape[1] * page_size
    if cu_seqlens_k is not None:
        return False, True, 16, 0, k_cache.shape[0]
    return False, False, 16, 0, k_cache.shape[1]


def launch_kv_append(k_cache, v_cache, delta_cache, k_new, v_new, delta_new, page_table,
                     cu_seqlens_k, seqused_k) -> None:
    """In place: k_new/v_new [B, Hkv, D] (delta_new [B, Hkv]) -> caches at seqused_k[b]."""
    batch, kv_heads, head_dim = k_new.shape
    if batch == 0 or kv_heads == 0:
        return
    is_paged, is_packed, page_size, num_pages, cache_len = _layout(k_cache, page_table,
                                                                   cu_seqlens_k)
    has_delta = delta_cache is not None and delta_new is not None
    dummy = k_cache
    launch(
        _kv_append_kernel, (batch * kv_heads,),
        k_cache, v_cache, delta_cache if has_delta else dummy, k_new, v_new,
        delta_new if has_delta else dummy, page_table if is_paged else dummy,
        cu_seqlens_k if is_packed else dummy, seqused_k,
        *_cache_strides(k_cache, is_packed), *_cache_strides(v_cache, is_packed),
        *(_delta_strides(delta_cache, is_paged, is_packed) if has_delta else (0, 0, 0)),
        k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1),
        *((delta_new.stride(0), delta_new.stride(1)) if has_delta else (0, 0)),
        page_table.stride(0) if is_paged else 0, cache_len, num_pages, kv_heads,
        HEAD_DIM=head_dim, HEAD_DIM_PAD=configs.head_dim_pad(head_dim), PAGE_SIZE=page_size,
        IS_PAGED=is_paged, IS_PACKED=is_packed, HAS_DELTA=has_delta,
        num_warps=1,
    )


# --------------------------------------------------------------------------------------------
# decode
# --------------------------------------------------------------------------------------------
@triton.jit
def _split_part(lo, hi, c, t0, t1, BLOCK_N: tl.constexpr):
    """The part of tile range [lo, hi) (positions, multiples of BLOCK_N; c tiles of the work
    list come before it) inside the split's tiles [t0, t1): returns [start, end), end >= start."""
    start = tl.maximum(lo, lo + (t0 - c) * BLOCK_N)
    end = tl.minimum(hi, lo + (t1 - c) * BLOCK_N)
    return start, tl.maximum(end, start)


@triton.jit
def _window_ranges(seqlen, w_sink, w_left, w_right, w_near, BLOCK_N: tl.constexpr):
    """Tile ranges holding the visible positions of a decode row under one window (SPEC §3,
    dist = seqlen - 1 - p): sink [0, sink), far band [seqlen - near - right - left,
    seqlen - near - right), near band [seqlen - near, seqlen); returned disjoint and ordered
    as (lo1, hi1) (lo2, hi2) (lo3, hi3), multiples of BLOCK_N."""
    n_end = tl.cdiv(seqlen, BLOCK_N) * BLOCK_N
    lo1 = seqlen * 0
    hi1 = tl.cdiv(tl.maximum(tl.minimum(w_sink, seqlen), 0), BLOCK_N) * BLOCK_N
    f_lo = tl.maximum(seqlen - w_near - w_right - w_left, 0)
    f_hi = tl.minimum(seqlen - w_near - w_right, seqlen)
    lo2 = tl.maximum(f_lo // BLOCK_N * BLOCK_N, hi1)
    hi2 = tl.where((w_left > 0) & (f_hi > f_lo), tl.cdiv(tl.maximum(f_hi, 0), BLOCK_N) * BLOCK_N,
                   lo2)
    hi2 = tl.maximum(hi2, lo2)
    lo3 = tl.maximum(tl.maximum(seqlen - w_near, 0) // BLOCK_N * BLOCK_N, hi2)
    hi3 = tl.where(w_near > 0, n_end, lo3)
    hi3 = tl.maximum(hi3, lo3)
    return lo1, hi1, lo2, hi2, lo3, hi3


@triton.jit
def _tile_keys(start, seqlen, n_items, p_pt, p_g, stride_kb, stride_ks, stride_vb, stride_vs,
               stride_db, stride_ds, stride_gi, num_pages, BLOCK_N: tl.constexpr,
               PAGE_SIZE: tl.constexpr, IS_PAGED: tl.constexpr, IS_GATHER: tl.constexpr):
    """The keys of work tile [start, start + BLOCK_N): logical positions, which exist, and their
    row offsets into K, V and delta."""
    o_t = start + tl.arange(0, BLOCK_N)  # [N] work items
    if IS_GATHER:
        pos = tl.load(p_g + o_t.to(tl.int64) * stride_gi, mask=o_t < n_items, other=-1)
        n_ok = (pos >= 0) & (pos < seqlen)
        pos = tl.where(n_ok, pos, 0)
    else:
        pos = o_t
        n_ok = pos < seqlen
    if IS_PAGED:
        page, row = page_of(pos, n_ok, p_pt, num_pages, PAGE_SIZE)
        return pos, n_ok, page * stride_kb + row * stride_ks, page * stride_vb + row * stride_vs, \
            page * stride_db + row * stride_ds
    row = pos.to(tl.int64)
    return pos, n_ok, row * stride_ks, row * stride_vs, row * stride_ds


@triton.jit
def _tile_scores(b_q, b_alpha, o_k, b_delta, n_ok, m_vis, o_d, p_k0, scale_log2,
                 HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, HAS_GATE: tl.constexpr,
                 IS_LOGSIGMOID: tl.constexpr):
    """Base-2 scores [M, N] of one tile, hidden keys at -inf, and the gate g [M, N] (the scores
    when not gated)."""
    # [N, D] key tile
    b_k = load_tile(p_k0 + o_k[:, None] + o_d[None, :], n_ok[:, None], o_d[None, :],
                     HEAD_DIM, HEAD_DIM_PAD, True)
    b_s = tl.dot(b_q, tl.trans(b_k))
    if HAS_GATE:
        b_g = gate(b_alpha, b_delta, IS_LOGSIGMOID)
        b_s += b_g
    else:
        b_g = b_s
    return tl.where(m_vis, b_s * scale_log2, float("-inf")), b_g


@triton.jit
def _decode_tiles(
    acc, m_i, l_i, b_q, b_alpha, i_q, lo, hi, seqlen, n_items, o_d,
    p_k0, p_v0, p_d0, p_pt, p_g, p_code, b_thr, b_gthr, r_ok,
    stride_kb, stride_ks, stride_vb, stride_vs, stride_db, stride_ds, stride_gi,
    num_pages, scale_log2, w_sink, w_left, w_right, w_near,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    PAGE_SIZE: tl.constexpr, IS_PAGED: tl.constexpr, IS_GATHER: tl.constexpr,
    IS_LOCAL: tl.constexpr, WINDOW_PER_QHEAD: tl.constexpr, HAS_GATE: tl.constexpr,
    IS_LOGSIGMOID: tl.constexpr, HAS_THRESHOLD: tl.constexpr, GATE_SKIP: tl.constexpr,
    WRITE_CODES: tl.constexpr,
):
    """Visit work tiles [lo, hi) (positions, or index-list slots with IS_GATHER): the one
    decode tile body. p_k0/p_v0/p_d0 point at (sequence, KV head) for contiguous and packed
    caches, at the KV head only for paged ones.

    Skipping (HAS_THRESHOLD / GATE_SKIP, SPEC §7; BLOCK_N is the 64-key skip block): every
    tile but the anchors (block 0 and the last block) is tested per row (query head): the
    gate test first, from delta's extremes, before K is loaded (b_gthr); then the softmax test
    on the tile's row max (b_thr). A row that skips the tile gets no probability from it; V
    is loaded only when some row keeps it, K only when some row passes the gate test. Codes
    per (row, block) to p_code with WRITE_CODES: 1 kept, 2 softmax skip, 3 gate skip."""
    TESTS: tl.constexpr = HAS_THRESHOLD or GATE_SKIP
    a_last = (seqlen - 1) // BLOCK_N * BLOCK_N  # the anchor holding the newest key
    for start in range(lo, hi, BLOCK_N):
        start = tl.multiple_of(start, BLOCK_N)
        pos, n_ok, o_k, o_v, o_dl = _tile_keys(
            start, seqlen, n_items, p_pt, p_g, stride_kb, stride_ks, stride_vb, stride_vs,
            stride_db, stride_ds, stride_gi, num_pages, BLOCK_N, PAGE_SIZE, IS_PAGED,
            IS_GATHER)
        if IS_LOCAL:
            if WINDOW_PER_QHEAD:
                m_vis = visible_2d(i_q, pos[None, :], seqlen - 1, seqlen, True, True,
                                   w_sink, w_left, w_right, w_near) & n_ok[None, :]  # [M, N]
                n_ok = tl.max(m_vis.to(tl.int32), 0) > 0  # some row sees the key
            else:
                n_ok = n_ok & visible_2d(0, pos, seqlen - 1, seqlen, True, True,
                                         w_sink, w_left, w_right, w_near)
                m_vis = n_ok[None, :]
        else:
            m_vis = n_ok[None, :]
        if HAS_GATE:
            b_delta = tl.load(p_d0 + o_dl, mask=n_ok, other=0.0).to(tl.float32)  # [N]
        else:
            b_delta = b_alpha
        if TESTS:
            anchor = (start == 0) | (start == a_last)
            keep = r_ok  # [M] rows that keep the tile (padding rows never do)
            if GATE_SKIP:
                # g is monotone in alpha * delta: its max over the block from delta's extremes
                d_max = tl.max(tl.where(n_ok, b_delta, float("-inf")), 0)
                d_min = tl.min(tl.where(n_ok, b_delta, float("inf")), 0)
                g_max = gate_max(b_alpha, d_max, d_min, IS_LOGSIGMOID)
                keep = keep & (anchor | (g_max * scale_log2 >= b_gthr))
            code = tl.where(keep, 1, 3)
            if GATE_SKIP:  # K only when some row passed the gate test
                if tl.max(keep.to(tl.int32), 0) > 0:
                    b_s, b_g = _tile_scores(b_q, b_alpha, o_k, b_delta, n_ok, m_vis, o_d, p_k0,
                                            scale_log2, HEAD_DIM, HEAD_DIM_PAD, HAS_GATE,
                                            IS_LOGSIGMOID)
                else:
                    b_s = tl.full([b_q.shape[0], BLOCK_N], float("-inf"), dtype=tl.float32)
            else:  # the K load stays unconditional (pipelined)
                b_s, b_g = _tile_scores(b_q, b_alpha, o_k, b_delta, n_ok, m_vis, o_d, p_k0,
                                        scale_log2, HEAD_DIM, HEAD_DIM_PAD, HAS_GATE,
                                        IS_LOGSIGMOID)
            if HAS_THRESHOLD:
                b_mx = tl.max(b_s, 1)
                pass_s = anchor | ((b_mx > float("-inf")) & (b_mx >= b_thr))
                code = tl.where(keep & ~pass_s, 2, code)
                keep = keep & pass_s
            if tl.max(keep.to(tl.int32), 0) > 0:  # V only when some row keeps the tile
                acc, m_i, l_i = accumulate_tile(
                    acc, m_i, l_i, tl.where(keep[:, None], b_s, float("-inf")), o_v, n_ok,
                    o_d, p_v0, 1, HEAD_DIM, HEAD_DIM_PAD, True)
            if WRITE_CODES:
                tl.store(p_code + start // BLOCK_N, code.to(tl.uint8), mask=r_ok)
        else:
            b_s, b_g = _tile_scores(b_q, b_alpha, o_k, b_delta, n_ok, m_vis, o_d, p_k0,
                                    scale_log2, HEAD_DIM, HEAD_DIM_PAD, HAS_GATE, IS_LOGSIGMOID)
            acc, m_i, l_i = accumulate_tile(acc, m_i, l_i, b_s, o_v, n_ok, o_d, p_v0, 1,
                                            HEAD_DIM, HEAD_DIM_PAD, True)
    return acc, m_i, l_i


@triton.jit
def _anchor_thresholds(b_q, b_alpha, seqlen, o_d, r_ok, p_k0, p_d0, p_pt, stride_kb,
                       stride_ks, stride_db, stride_ds, num_pages, scale_log2,
                       softmax_threshold, gate_threshold, HEAD_DIM: tl.constexpr,
                       HEAD_DIM_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                       PAGE_SIZE: tl.constexpr, IS_PAGED: tl.constexpr,
                       HAS_GATE: tl.constexpr, IS_LOGSIGMOID: tl.constexpr):
    """Per-row thresholds of the decode skip tests (SPEC §7), from exact statistics over the
    anchor blocks (block 0 and the one holding the newest key), which every split computes
    (K and delta only): softmax b_thr = m_ref + log2(t * l_ref / seqlen) (base 2), gate
    b_gthr = g_ref * scale * log2(e) + log2(tg), tg = gate_threshold or, below 0, 1 / seqlen.
    Padding rows never keep a block (+inf)."""
    m_ref = tl.full([b_q.shape[0]], float("-inf"), dtype=tl.float32)
    l_ref = tl.zeros([b_q.shape[0]], dtype=tl.float32)
    g_ref = tl.full([b_q.shape[0]], float("-inf"), dtype=tl.float32)
    a_last = (seqlen - 1) // BLOCK_N * BLOCK_N
    for start in range(0, tl.minimum(a_last, BLOCK_N) + BLOCK_N, BLOCK_N):
        start = tl.where(start == 0, 0, a_last)
        pos, n_ok, o_k, o_v, o_dl = _tile_keys(
            start, seqlen, 0, p_pt, p_pt, stride_kb, stride_ks, 0, 0, stride_db, stride_ds, 0,
            num_pages, BLOCK_N, PAGE_SIZE, IS_PAGED, False)
        if HAS_GATE:
            b_delta = tl.load(p_d0 + o_dl, mask=n_ok, other=0.0).to(tl.float32)
        else:
            b_delta = b_alpha
        b_s, b_g = _tile_scores(b_q, b_alpha, o_k, b_delta, n_ok, n_ok[None, :], o_d, p_k0,
                                scale_log2, HEAD_DIM, HEAD_DIM_PAD, HAS_GATE, IS_LOGSIGMOID)
        _, m_ref, l_ref, _ = online_softmax_step(b_s, m_ref, l_ref)
        g_ref = tl.maximum(g_ref, tl.max(tl.where(n_ok[None, :], b_g, float("-inf")), 1))
    len_f = tl.maximum(seqlen, 1).to(tl.float32)
    tg = tl.where(gate_threshold < 0, 1.0 / len_f, gate_threshold)
    return softmax_skip_threshold(m_ref, l_ref, softmax_threshold, len_f, r_ok), \
        gate_skip_threshold(g_ref, tg, scale_log2, r_ok)


@triton.jit
def _attn_decode_kernel(
    Q, K, V, O, LSE, O_PART, LSE_PART, ALPHA, DELTA, PAGE_TABLE, CU_K, SEQUSED_K, GATHER,
    WINDOWS, CODES,
    stride_qb, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_oh, stride_lb, stride_lh,
    stride_ab, stride_ah,
    stride_db, stride_ds, stride_dh,
    stride_pb, stride_gb, stride_gh, stride_gi, stride_wh, stride_wc, stride_cb, stride_ch,
    cache_len, num_pages, n_items, num_splits, scale_log2, H, Hkv, GROUP, softmax_threshold,
    gate_threshold,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, M_CHUNKS: tl.constexpr,
    PAGE_SIZE: tl.constexpr, IS_PAGED: tl.constexpr, IS_PACKED: tl.constexpr,
    HAS_SEQUSED_K: tl.constexpr, IS_GATHER: tl.constexpr, IS_LOCAL: tl.constexpr,
    WINDOW_PER_QHEAD: tl.constexpr, HAS_GATE: tl.constexpr, IS_LOGSIGMOID: tl.constexpr,
    IS_SPLIT: tl.constexpr, HAS_THRESHOLD: tl.constexpr = False, GATE_SKIP: tl.constexpr = False,
    WRITE_CODES: tl.constexpr = False,
):
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    chunk = pid_bh % M_CHUNKS
    b = pid_bh // M_CHUNKS // Hkv
    hk = pid_bh // M_CHUNKS % Hkv

    # ---- the sequence: its keys [0, seqlen) and where its rows start --------------------
    if IS_PACKED:
        k_start = tl.minimum(tl.maximum(tl.load(CU_K + b), 0), cache_len)
        cap = tl.maximum(tl.minimum(tl.load(CU_K + b + 1), cache_len) - k_start, 0)
    else:
        cap = cache_len
    if HAS_SEQUSED_K:
        seqlen = tl.minimum(tl.maximum(tl.load(SEQUSED_K + b), 0), cap)
    else:
        seqlen = cap

    # ---- the query heads of this KV head: rows of the tile -------------------------------
    o_r = chunk * BLOCK_M + tl.arange(0, BLOCK_M)  # [M] index within the group
    r_ok = o_r < GROUP
    o_h = hk * GROUP + o_r  # [M] query heads
    o_d = tl.arange(0, HEAD_DIM_PAD)
    p_q = Q + b.to(tl.int64) * stride_qb + o_h[:, None] * stride_qh + o_d[None, :]
    b_q = load_tile(p_q, r_ok[:, None], o_d[None, :], HEAD_DIM, HEAD_DIM_PAD, True)  # [M, D]
    if HAS_GATE:
        b_alpha = tl.load(ALPHA + b.to(tl.int64) * stride_ab + o_h * stride_ah, mask=r_ok,
                          other=0.0).to(tl.float32)  # [M]
    else:
        b_alpha = tl.zeros([BLOCK_M], dtype=tl.float32)
    i_q = tl.zeros([BLOCK_M, 1], dtype=tl.int32)  # the query's position (dist offset added)

    if IS_LOCAL:
        if WINDOW_PER_QHEAD:
            p_w = WINDOWS + o_h[:, None] * stride_wh
            w_sink = tl.load(p_w + 0 * stride_wc, mask=r_ok[:, None], other=0)  # [M, 1]
            w_left = tl.load(p_w + 1 * stride_wc, mask=r_ok[:, None], other=0)
            w_right = tl.load(p_w + 2 * stride_wc, mask=r_ok[:, None], other=0)
            w_near = tl.load(p_w + 3 * stride_wc, mask=r_ok[:, None], other=0)
        else:
            p_w = WINDOWS + hk * stride_wh
            w_sink = tl.load(p_w + 0 * stride_wc)
            w_left = tl.load(p_w + 1 * stride_wc)
            w_right = tl.load(p_w + 2 * stride_wc)
            w_near = tl.load(p_w + 3 * stride_wc)
    else:
        w_sink = 0
        w_left = 0
        w_right = 0
        w_near = 0

    # ---- base pointers (contiguous / packed: the sequence's first row; paged: per tile) ----
    p_k0 = K + hk * stride_kh
    p_v0 = V + hk * stride_vh
    p_d0 = DELTA + hk * stride_dh
    if IS_PACKED:
        p_k0 += k_start.to(tl.int64) * stride_ks
        p_v0 += k_start.to(tl.int64) * stride_vs
        p_d0 += k_start.to(tl.int64) * stride_ds
    elif not IS_PAGED:
        p_k0 += b.to(tl.int64) * stride_kb
        p_v0 += b.to(tl.int64) * stride_vb
        p_d0 += b.to(tl.int64) * stride_db
    p_pt = PAGE_TABLE + b.to(tl.int64) * stride_pb
    p_g = GATHER + b.to(tl.int64) * stride_gb + hk * stride_gh

    # ---- the work list and this split's share of it --------------------------------------
    zero = seqlen * 0
    if IS_GATHER:
        lo1, hi1 = zero, tl.cdiv(n_items + zero, BLOCK_N) * BLOCK_N
        lo2, hi2, lo3, hi3 = hi1, hi1, hi1, hi1
    elif IS_LOCAL and not WINDOW_PER_QHEAD:
        lo1, hi1, lo2, hi2, lo3, hi3 = _window_ranges(seqlen, w_sink, w_left, w_right, w_near,
                                                      BLOCK_N)
    else:
        lo1, hi1 = zero, tl.cdiv(seqlen, BLOCK_N) * BLOCK_N
        lo2, hi2, lo3, hi3 = hi1, hi1, hi1, hi1
    n1 = (hi1 - lo1) // BLOCK_N
    n2 = (hi2 - lo2) // BLOCK_N
    n_tiles = n1 + n2 + (hi3 - lo3) // BLOCK_N
    per = tl.cdiv(n_tiles, num_splits)
    t0 = pid_s * per
    t1 = tl.minimum(t0 + per, n_tiles)

    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_THRESHOLD or GATE_SKIP:
        # skip tests (SPEC §7): contiguous, packed and paged caches, no window, no index list
        tl.static_assert(not (IS_GATHER or IS_LOCAL), "decode skips blocks of plain caches")
        b_thr, b_gthr = _anchor_thresholds(
            b_q, b_alpha, seqlen, o_d, r_ok, p_k0, p_d0, p_pt, stride_kb, stride_ks,
            stride_db, stride_ds, num_pages, scale_log2, softmax_threshold, gate_threshold,
            HEAD_DIM, HEAD_DIM_PAD, BLOCK_N, PAGE_SIZE, IS_PAGED, HAS_GATE, IS_LOGSIGMOID)
    else:
        b_thr = m_i
        b_gthr = m_i
    p_code = CODES + b.to(tl.int64) * stride_cb + o_h * stride_ch  # [M]
    # the key ranges in order (sink, far band, near band for windows shared by the group);
    # this split takes tiles [t0, t1) of their concatenation
    if IS_LOCAL and not WINDOW_PER_QHEAD and not IS_GATHER:
        los = (lo1, lo2, lo3)
        his = (hi1, hi2, hi3)
        firsts = (0, n1, n1 + n2)
    else:
        los = (lo1,)
        his = (hi1,)
        firsts = (0,)
    for r in tl.static_range(len(los)):
        lo, hi = _split_part(los[r], his[r], firsts[r], t0, t1, BLOCK_N)
        acc, m_i, l_i = _decode_tiles(
            acc, m_i, l_i, b_q, b_alpha, i_q, lo, hi, seqlen, n_items, o_d, p_k0, p_v0, p_d0,
            p_pt, p_g, p_code, b_thr, b_gthr, r_ok, stride_kb, stride_ks, stride_vb, stride_vs,
            stride_db, stride_ds, stride_gi, num_pages, scale_log2, w_sink, w_left, w_right,
            w_near, HEAD_DIM, HEAD_DIM_PAD, BLOCK_N, PAGE_SIZE, IS_PAGED, IS_GATHER, IS_LOCAL,
            WINDOW_PER_QHEAD, HAS_GATE, IS_LOGSIGMOID, HAS_THRESHOLD, GATE_SKIP, WRITE_CODES)

    # ---- epilogue: rows with no visible key -> o = 0, lse = -inf ------------------------
    has_key = l_i > 0.0
    l_safe = tl.where(has_key, l_i, 1.0)
    b_o = acc / l_safe[:, None]  # [M, D]
    m_st = r_ok[:, None]
    if HEAD_DIM != HEAD_DIM_PAD:
        m_st = m_st & (o_d[None, :] < HEAD_DIM)
    if IS_SPLIT:
        # partials [B * H, num_splits, D] fp32 and [B * H, num_splits] (lse in base 2)
        o_row = (b.to(tl.int64) * H + o_h) * num_splits + pid_s  # [M]
        tl.store(O_PART + o_row[:, None] * HEAD_DIM + o_d[None, :], b_o, mask=m_st)
        b_lse2 = tl.where(has_key, m_i + tl.math.log2(l_safe), float("-inf"))
        tl.store(LSE_PART + o_row, b_lse2, mask=r_ok)
    else:
        p_o = O + b.to(tl.int64) * stride_ob + o_h[:, None] * stride_oh + o_d[None, :]
        tl.store(p_o, b_o.to(O.dtype.element_ty), mask=m_st)
        b_lse = tl.where(has_key, (m_i + tl.math.log2(l_safe)) * LN2, float("-inf"))
        tl.store(LSE + b.to(tl.int64) * stride_lb + o_h * stride_lh, b_lse, mask=r_ok)


def launch_attn_decode(q, k_cache, v_cache, *, config=None, **kw):
    """`_attn_decode_launches` (same arguments), replayed from its launch plan
    (`launch.planned`) on calls whose signature it has seen; `config` (tuning, benchmarks)
    always takes the long way."""
    if config is None:
        return planned(_attn_decode_launches, (q, k_cache, v_cache), kw)
    return _attn_decode_launches(q, k_cache, v_cache, config=config, **kw)


def _attn_decode_launches(q, k_cache, v_cache, *, num_splits, alpha, delta_cache, page_table,
                          cu_seqlens_k, seqused_k, gather_kv_indices, window_sizes,
                          max_seqlen_k, softmax_scale, softmax_threshold, gate_threshold,
                          is_logsigmoid_gate, return_codes=False, config=None):
    """q [B, H, D] -> (out [B, H, D] q.dtype, lse [B, H] fp32, codes). num_splits <= 0:
    heuristic. `config` overrides the launch config (tuning / benchmarks only).
    softmax_threshold > 0 / gate_threshold != 0 (gated) skip blocks of plain caches (SPEC §7;
    with gather_kv_indices or windows nothing is dropped); return_codes: the per (sequence,
    query head, 64-key block) codes uint8 [B, H, nKB] (configs.decode_codes_shape), else [0]."""
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[-2]
    group = num_heads // num_kv_heads
    out = buffer_like(q)
    lse = buffer((batch, num_heads), torch.float32, q.device)
    is_gather = gather_kv_indices is not None
    is_local = window_sizes is not None
    skipping = configs.decode_skips(alpha, gather_kv_indices, window_sizes, softmax_threshold,
                                    gate_threshold)
    has_threshold = skipping and softmax_threshold > 0
    gate_skip = skipping and alpha is not None and gate_threshold != 0
    write_codes = bool(return_codes) and skipping
    codes = buffer(configs.decode_codes_shape(q, k_cache, page_table, cu_seqlens_k,
                                              max_seqlen_k, skipping) if write_codes
                   else [0], torch.uint8, q.device, zero=write_codes)
    if batch == 0 or num_heads == 0:
        return out, lse, codes
    is_paged, is_packed, page_size, num_pages, cache_len = _layout(k_cache, page_table,
                                                                   cu_seqlens_k)
    cfg = config or decode_config(q, head_dim, group, is_paged, is_gather)
    if skipping:  # tiles are the skip blocks
        cfg = configs.Config(cfg.block_m, configs.SKIP_BLOCK_N, cfg.num_warps, cfg.num_stages)
    block_m = decode_block_m(group)
    m_chunks = configs.cdiv(group, block_m)

    if is_gather:
        n_items = gather_kv_indices.shape[-1]
        work = n_items
    else:
        n_items = 0
        work = max_seqlen_k if is_packed and max_seqlen_k > 0 else \
            (cache_len if not is_packed else k_cache.shape[0])
    n_tiles = max(1, configs.cdiv(work, cfg.block_n))
    if num_splits is None or num_splits <= 0:
        num_splits = decode_num_splits(batch, num_heads, num_kv_heads, work, cfg.block_n,
                                       num_sms(q.device))
    num_splits = max(1, min(int(num_splits), n_tiles, configs.DECODE_MAX_SPLITS))
    is_split = num_splits > 1

    if is_split:
        o_part = buffer((batch * num_heads, num_splits, head_dim), torch.float32, q.device)
        lse_part = buffer((batch * num_heads, num_splits), torch.float32, q.device)
    else:
        o_part = lse_part = lse  # placeholders, never dereferenced

    if is_gather:
        g = gather_kv_indices
        stride_g = (g.stride(0), 0, g.stride(1)) if g.dim() == 2 else \
            (g.stride(0), g.stride(1), g.stride(2))
    else:
        stride_g = (0, 0, 0)
    window_per_qhead = is_local and window_sizes.shape[0] == num_heads and group > 1
    dummy = q  # placeholder pointer for absent optional tensors (never dereferenced)
    grid = (batch * num_kv_heads * m_chunks, num_splits)
    launch(
        _attn_decode_kernel, grid,
        q, k_cache, v_cache, out, lse, o_part, lse_part,
        alpha if alpha is not None else dummy,
        delta_cache if alpha is not None else dummy,
        page_table if is_paged else dummy,
        cu_seqlens_k if is_packed else dummy,
        seqused_k if seqused_k is not None else dummy,
        gather_kv_indices if is_gather else dummy,
        window_sizes if is_local else dummy, codes if write_codes else dummy,
        q.stride(0), q.stride(1),
        *_cache_strides(k_cache, is_packed), *_cache_strides(v_cache, is_packed),
        out.stride(0), out.stride(1), lse.stride(0), lse.stride(1),
        *((alpha.stride(0), alpha.stride(1)) if alpha is not None else (0, 0)),
        *(_delta_strides(delta_cache, is_paged, is_packed) if alpha is not None else (0, 0, 0)),
        page_table.stride(0) if is_paged else 0, *stride_g,
        *((window_sizes.stride(0), window_sizes.stride(1)) if is_local else (0, 0)),
        *((codes.stride(0), codes.stride(1)) if write_codes else (0, 0)),
        cache_len, num_pages, n_items, num_splits, float(softmax_scale) * 1.4426950408889634,
        num_heads, num_kv_heads, group, float(softmax_threshold), float(gate_threshold),
        HEAD_DIM=head_dim, HEAD_DIM_PAD=configs.head_dim_pad(head_dim),
        BLOCK_M=block_m, BLOCK_N=cfg.block_n, M_CHUNKS=m_chunks, PAGE_SIZE=page_size,
        IS_PAGED=is_paged, IS_PACKED=is_packed, HAS_SEQUSED_K=seqused_k is not None,
        IS_GATHER=is_gather, IS_LOCAL=is_local, WINDOW_PER_QHEAD=window_per_qhead,
        HAS_GATE=alpha is not None, IS_LOGSIGMOID=bool(is_logsigmoid_gate), IS_SPLIT=is_split,
        HAS_THRESHOLD=has_threshold, GATE_SKIP=gate_skip, WRITE_CODES=write_codes,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if is_split:
        launch_combine(o_part, lse_part, out, lse)
    replayable()
    return out, lse, codes
