"""Attention forward: one kernel for dense, sparse and gated, batched and varlen, causal and local.

Notation
- B batch, H query heads, Hkv key/value heads, G = H // Hkv query heads per KV head.
- Program (pid_m, pid_bh): one BLOCK_M tile of queries of one (batch, query head).
- `b_q` [BLOCK_M, D] query tile, `b_k` [D, BLOCK_N] transposed key tile, `b_v` [BLOCK_N, D].
- `b_s` [BLOCK_M, BLOCK_N] base-2 scores: (q.k + g) * scale * log2(e).
- `m_i`, `l_i` [BLOCK_M]: running row max (base 2) and row sum of exp2(b_s - m_i).
- Key ranges: a query tile visits only key tiles that may be visible (causal: up to the
  diagonal; local: the sink, the far band and the near band). Tiles that are fully visible for
  every row run without a mask (stage MASKED=False), the others with it.
- Paths (chosen in `configs.fwd_path`): "portable" loads K/V tiles with pointer loads;
  "tma" (Hopper) loads them through TMA descriptors `K_DESC`/`V_DESC` over
  [batch, key, kv head, dim] into shared memory, in the same body (constexpr USE_TMA /
  TMA_EDGES): same masks, gates, skip rule and codes, and the same launch tables' tile
  shapes where the TMA tables (`*_tma`) have no entry.

Caution
- The TMA path is not warp-specialised: Triton 3.6 accepts `tl.range(warp_specialize=True)`
  on sm_90 but emits the same code as without it (checked on its PTX); a producer warp and
  ping-pong consumer warpgroups need Gluon.
- With varlen or seqused_k the masked tiles keep pointer loads (rows past a sequence's end
  are another sequence's or an unused cache slot's, and may hold any value).
- Varlen sequences are addressed through cu_seqlens; a program whose query tile starts past
  its sequence returns at once (the grid is sized by max_seqlen_q).
- Offsets into q/k/v/out are int64 (large caches); per-sequence positions are int32.
- lse of a row with no visible key is -inf and its output 0; such rows never produce NaN.
- bf16 `tl.dot` cannot run under TRITON_INTERPRET (it multiplies raw bits): test in fp16 there.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import configs
from .common import (LN2, accumulate_tile, gate, gate_max, gate_skip_threshold, load_tile,
                     page_of, program_tile, softmax_skip_threshold, tile_count, tile_start,
                     visible, visible_count, walk_start)
from .launch import buffer, buffer_like, launch, planned, replayable


@triton.jit
def _tma_tile(desc, kv, start_n, BLOCK_N: tl.constexpr, HEAD_DIM_PAD: tl.constexpr):
    """[BLOCK_N, HEAD_DIM_PAD] key or value rows [start_n, start_n + BLOCK_N) of one sequence
    and KV head through a TMA descriptor over [batch, key, kv head, dim]; kv = (batch, first
    row of the sequence, kv head). Rows and columns past the tensor's end read as zeros."""
    return desc.load([kv[0], kv[1] + start_n, kv[2], 0]).reshape(BLOCK_N, HEAD_DIM_PAD)


@triton.jit
def _delta_rows(o_n, n_ok, kv, stride_ds, PAGE_SIZE: tl.constexpr):
    """Offsets of delta at key positions o_n (any shape) of this sequence: o_n * stride_ds,
    or through the page table (PAGE_SIZE > 0, kv = (.., p_pt, num_pages, page strides of K,
    V, delta), `common.page_of`)."""
    if PAGE_SIZE > 0:
        page, row = page_of(o_n, n_ok, kv[3], kv[4], PAGE_SIZE)
        rows = page * kv[7] + row * stride_ds
    else:
        rows = o_n * stride_ds
    return rows


@triton.jit
def _tile_scores(b_q, b_alpha, b_delta, start_n, o_m, o_n, n_ok, o_d, p_k0, k_desc, kv,
                 k_at, seqlen_k, dist_offset, scale_log2, w_sink, w_left, w_right, w_near,
                 HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                 MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, IS_LOCAL: tl.constexpr,
                 HAS_GATE: tl.constexpr, IS_LOGSIGMOID: tl.constexpr, TMA: tl.constexpr):
    """Base-2 scores of one tile, masked keys at -inf: ((q.k + g) * scale * log2e). k_at:
    the int64 offsets of the tile's key rows from p_k0 (pointer loads)."""
    if TMA:
        b_k = _tma_tile(k_desc, kv, start_n, BLOCK_N, HEAD_DIM_PAD).T
    else:
        # [D, N] transposed key tile
        b_k = load_tile(p_k0 + k_at[None, :] + o_d[:, None],
                         n_ok[None, :], o_d[:, None], HEAD_DIM, HEAD_DIM_PAD, MASKED)
    b_s = tl.dot(b_q, b_k)  # [M, N] fp32
    if HAS_GATE:
        b_g = gate(b_alpha, b_delta, IS_LOGSIGMOID)
        b_s += b_g
    else:
        b_g = b_s
    b_s = b_s * scale_log2
    if MASKED:
        m_vis = visible(o_m, o_n, dist_offset, seqlen_k, IS_CAUSAL, IS_LOCAL,
                        w_sink, w_left, w_right, w_near)
        b_s = tl.where(m_vis, b_s, float("-inf"))
    return b_s, b_g


@triton.jit
def _fwd_tile(
    acc, m_i, l_i, g_ref, start_n, b_q, b_alpha, o_m, o_d, p_k0, p_v0, p_delta0, p_skip,
    k_desc, v_desc, kv, stride_ks, stride_vs, stride_ds, seqlen_k, dist_offset, scale_log2,
    w_sink, w_left, w_right, w_near, b_thr, b_gthr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, IS_LOCAL: tl.constexpr,
    HAS_GATE: tl.constexpr, IS_LOGSIGMOID: tl.constexpr, HAS_THRESHOLD: tl.constexpr,
    GATE_SKIP: tl.constexpr, PHASE: tl.constexpr, TMA: tl.constexpr,
    PAGE_SIZE: tl.constexpr = 0,
):
    """One key tile [start_n, start_n + BLOCK_N) (see _fwd_tiles). TMA: K and V come through
    the descriptors (Hopper path). Where the softmax test decides, V's copy is issued only for
    a kept tile: loading it ahead for every tile (pipelined like K) doubles the L2 traffic that
    a 64-row tile's walk already spends on K, and measured slower (H200, 16k, t=1: 5.04 vs
    3.69 ms; t=10: 4.62 vs 2.98)."""
    o_n = start_n + tl.arange(0, BLOCK_N)
    n_ok = o_n < seqlen_k
    # rows of the tile's keys in K, V and delta (accumulate_tile reads p_v0 + v_at * v_st);
    # a paged cache looks its pages up once per tile
    if PAGE_SIZE > 0:
        page, row = page_of(o_n, n_ok, kv[3], kv[4], PAGE_SIZE)
        k_at = page * kv[5] + row * stride_ks
        v_at = page * kv[6] + row * stride_vs
        v_st = 1
        d_at = page * kv[7] + row * stride_ds
    else:
        k_at = o_n.to(tl.int64) * stride_ks
        v_at = o_n
        v_st = stride_vs
        d_at = o_n * stride_ds
    if HAS_GATE:
        if MASKED:
            b_delta = tl.load(p_delta0 + d_at, mask=n_ok, other=0.0)
        else:
            b_delta = tl.load(p_delta0 + d_at)
        b_delta = b_delta.to(tl.float32)
    else:
        b_delta = b_alpha
    if TMA and not (PHASE == 2 and HAS_THRESHOLD):
        b_v = _tma_tile(v_desc, kv, start_n, BLOCK_N, HEAD_DIM_PAD)
    else:
        b_v = None
    if PHASE == 2:
        # the gate test was passed (`_gate_pass`); the softmax test needs the scores, so the
        # K load stays unconditional (and pipelined); a skip saves the exp, V load and P @ V
        code = start_n * 0 + 1
        b_s, b_g = _tile_scores(
            b_q, b_alpha, b_delta, start_n, o_m, o_n, n_ok, o_d, p_k0, k_desc, kv, k_at,
            seqlen_k, dist_offset, scale_log2, w_sink, w_left, w_right, w_near, HEAD_DIM,
            HEAD_DIM_PAD, BLOCK_N, MASKED, IS_CAUSAL, IS_LOCAL, HAS_GATE, IS_LOGSIGMOID, TMA)
        if HAS_THRESHOLD:
            b_mx = tl.max(b_s, 1)
            if tl.max(((b_mx > float("-inf")) & (b_mx >= b_thr)).to(tl.int32), 0) == 0:
                code = start_n * 0 + 2
        if code == 1:
            if TMA and HAS_THRESHOLD:
                acc, m_i, l_i = accumulate_tile(
                    acc, m_i, l_i, b_s, v_at, n_ok, o_d, p_v0, v_st, HEAD_DIM, HEAD_DIM_PAD,
                    MASKED, _tma_tile(v_desc, kv, start_n, BLOCK_N, HEAD_DIM_PAD))
            else:
                acc, m_i, l_i = accumulate_tile(acc, m_i, l_i, b_s, v_at, n_ok, o_d, p_v0,
                                                 v_st, HEAD_DIM, HEAD_DIM_PAD, MASKED, b_v)
        tl.store(p_skip + start_n // BLOCK_N, code.to(tl.uint8))
    else:
        b_s, b_g = _tile_scores(
            b_q, b_alpha, b_delta, start_n, o_m, o_n, n_ok, o_d, p_k0, k_desc, kv, k_at,
            seqlen_k, dist_offset, scale_log2, w_sink, w_left, w_right, w_near, HEAD_DIM,
            HEAD_DIM_PAD, BLOCK_N, MASKED, IS_CAUSAL, IS_LOCAL, HAS_GATE, IS_LOGSIGMOID, TMA)
        if GATE_SKIP and PHASE == 1:
            g_ref = tl.maximum(g_ref, tl.max(tl.where(b_s > float("-inf"), b_g,
                                                      float("-inf")), 1))
        acc, m_i, l_i = accumulate_tile(acc, m_i, l_i, b_s, v_at, n_ok, o_d, p_v0,
                                         v_st, HEAD_DIM, HEAD_DIM_PAD, MASKED, b_v)
        if PHASE == 1:
            tl.store(p_skip + start_n // BLOCK_N, tl.full([], 1, tl.uint8))
    return acc, m_i, l_i, g_ref


@triton.jit
def _gate_pass(b_alpha, p_delta0, p_skip, p_list, stride_ds, los, his, a_lo, a_hi, seqlen_k,
               scale_log2, b_gthr, kv, BLOCK_N: tl.constexpr, IS_LOGSIGMOID: tl.constexpr,
               PAGE_SIZE: tl.constexpr = 0):
    """The gate test of PHASE 2 for every tile of the walk, before any K is loaded, GATE_CHUNK
    tiles at a time: g is monotone in x = alpha * delta, so its max over a tile needs only the
    extremes of delta over the keys that exist. Gate-skipped tiles get code 3; the indices of
    the others are written in order to p_list (this program's scratch row). Returns how many."""
    GATE_CHUNK: tl.constexpr = 16
    count = tl.zeros([], dtype=tl.int32)
    n_tiles = tile_count(los, his, a_lo, a_hi, BLOCK_N, True)
    for c in range(0, n_tiles, GATE_CHUNK):
        t = c + tl.arange(0, GATE_CHUNK)
        t_ok = t < n_tiles
        start_n = tile_start(t, los, his, a_lo, a_hi, BLOCK_N, True)  # [C]
        o_n = start_n[:, None] + tl.arange(0, BLOCK_N)[None, :]  # [C, N]
        n_ok = (o_n < seqlen_k) & t_ok[:, None]
        b_delta = tl.load(p_delta0 + _delta_rows(o_n, n_ok, kv, stride_ds, PAGE_SIZE),
                          mask=n_ok, other=0.0).to(tl.float32)
        d_max = tl.where(t_ok, tl.max(tl.where(n_ok, b_delta, float("-inf")), 1), 0.0)
        d_min = tl.where(t_ok, tl.min(tl.where(n_ok, b_delta, float("inf")), 1), 0.0)
        g_max = gate_max(b_alpha[:, None], d_max[None, :], d_min[None, :],
                         IS_LOGSIGMOID)  # [M, C]
        keep = tl.max((g_max * scale_log2 >= b_gthr[:, None]).to(tl.int32), 0)
        keep = tl.where(t_ok, keep, 0)
        tl.store(p_skip + start_n // BLOCK_N, tl.full([GATE_CHUNK], 3, tl.uint8),
                 mask=t_ok & (keep == 0))
        tl.store(p_list + count + tl.cumsum(keep, 0) - keep, start_n // BLOCK_N, mask=keep == 1)
        count += tl.sum(keep, 0)
    # the list is read back by every thread of the program
    tl.debug_barrier()
    return count


@triton.jit
def _fwd_tiles(
    acc, m_i, l_i, g_ref, b_q, b_alpha, o_m, o_d, p_k0, p_v0, p_delta0, p_skip, p_list, k_desc,
    v_desc, kv, stride_ks, stride_vs, stride_ds, los, his, seqlen_k, dist_offset, scale_log2,
    w_sink, w_left, w_right, w_near, b_thr, b_gthr, a_lo, a_hi,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, IS_LOCAL: tl.constexpr,
    HAS_GATE: tl.constexpr, IS_LOGSIGMOID: tl.constexpr, HAS_THRESHOLD: tl.constexpr,
    GATE_SKIP: tl.constexpr, PHASE: tl.constexpr, TMA: tl.constexpr,
    PAGE_SIZE: tl.constexpr = 0,
):
    """Visit the key tiles of the ranges [los[r], his[r]): a plain loop for one range, else
    one walk over their union (`tile_start`), so each mask flavour has one pipelined loop.

    PHASE 0: dense (no skipping). PHASE 1: anchor tiles of the skip rule: always kept; also
    tracks `g_ref`, the row max of the gate over visible anchor keys. PHASE 2: every other tile
    (tile 0 and the anchors [a_lo, a_hi) are left out of the walk), with the tests of SPEC §5/§6:
    - gate test (before loading K): skip when for every row scale*(gmax - g_ref) < ln(tg),
      i.e. gmax * scale_log2 < b_gthr, where gmax bounds g over the tile from delta extremes;
      taken for the whole walk first (`_gate_pass`), so the loop then visits only the tiles
      that passed, from the list p_list, with K and V loads pipelined as in the dense loop;
    - softmax test (after Q.K^T): skip when for every row rowmax(s2) < b_thr
      (b_thr = m_ref + log2(t * l_ref / visible_len), base 2).
    Tile codes written to p_skip[tile] (phases 1, 2): 1 kept, 2 softmax skip, 3 gate skip;
    tiles never visited stay 0."""
    if len(los) == 1 and PHASE != 2:
        for start_n in range(los[0], his[0], BLOCK_N):
            start_n = tl.multiple_of(start_n, BLOCK_N)
            acc, m_i, l_i, g_ref = _fwd_tile(
                acc, m_i, l_i, g_ref, start_n, b_q, b_alpha, o_m, o_d, p_k0, p_v0, p_delta0,
                p_skip, k_desc, v_desc, kv, stride_ks, stride_vs, stride_ds, seqlen_k,
                dist_offset, scale_log2, w_sink, w_left, w_right, w_near, b_thr, b_gthr,
                HEAD_DIM, HEAD_DIM_PAD, BLOCK_N, MASKED, IS_CAUSAL, IS_LOCAL, HAS_GATE,
                IS_LOGSIGMOID, HAS_THRESHOLD, GATE_SKIP, PHASE, TMA, PAGE_SIZE)
    else:
        if PHASE == 2 and GATE_SKIP:
            n_tiles = _gate_pass(b_alpha, p_delta0, p_skip, p_list, stride_ds, los, his, a_lo,
                                 a_hi, seqlen_k, scale_log2, b_gthr, kv, BLOCK_N, IS_LOGSIGMOID,
                                 PAGE_SIZE)
        else:
            n_tiles = tile_count(los, his, a_lo, a_hi, BLOCK_N, PHASE == 2)
        for t in range(0, n_tiles):
            start_n = walk_start(t, los, his, a_lo, a_hi, p_list, BLOCK_N, PHASE == 2,
                                 PHASE == 2 and GATE_SKIP)
            acc, m_i, l_i, g_ref = _fwd_tile(
                acc, m_i, l_i, g_ref, start_n, b_q, b_alpha, o_m, o_d, p_k0, p_v0, p_delta0,
                p_skip, k_desc, v_desc, kv, stride_ks, stride_vs, stride_ds, seqlen_k,
                dist_offset, scale_log2, w_sink, w_left, w_right, w_near, b_thr, b_gthr,
                HEAD_DIM, HEAD_DIM_PAD, BLOCK_N, MASKED, IS_CAUSAL, IS_LOCAL, HAS_GATE,
                IS_LOGSIGMOID, HAS_THRESHOLD, GATE_SKIP, PHASE, TMA, PAGE_SIZE)
    return acc, m_i, l_i, g_ref


@triton.jit
def _local_full_tiles(start_m, seqlen_q, seqlen_k, dist_offset, w_sink, w_left, w_right, w_near,
                      lo1, hi1, lo2, hi2, lo3, hi3, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr):
    """Within the local ranges of `_key_ranges` (sink [lo1, hi1), far [lo2, hi2), near
    [lo3, hi3)), the tiles every row of the query tile sees whole, which run without a mask:
    returns s_full (sink [lo1, s_full)), (f_lo, f_hi) and (n_lo, n_hi), each inside its range."""
    m_first = start_m * BLOCK_M
    m_last = tl.minimum(m_first + BLOCK_M, seqlen_q) - 1
    e_first = m_first + dist_offset  # the first row's last visible key (dist = 0)
    e_last = m_last + dist_offset
    # sink: j < sink, and dist >= 0 for the first row
    s_full = tl.maximum(tl.minimum(tl.minimum(w_sink, e_first + 1), seqlen_k), 0)
    s_full = tl.minimum(tl.maximum(s_full // BLOCK_N * BLOCK_N, lo1), hi1)
    # far band: near + right <= dist < near + right + left for every row and key
    f_lo = tl.cdiv(tl.maximum(e_last - (w_near + w_right + w_left) + 1, 0), BLOCK_N) * BLOCK_N
    f_hi = tl.maximum(tl.minimum(e_first - (w_near + w_right) + 1, seqlen_k), 0)
    f_hi = f_hi // BLOCK_N * BLOCK_N
    f_lo = tl.minimum(tl.maximum(f_lo, lo2), hi2)
    f_hi = tl.minimum(tl.maximum(f_hi, f_lo), hi2)
    # near band: 0 <= dist < near for every row and key
    n_lo = tl.cdiv(tl.maximum(e_last - w_near + 1, 0), BLOCK_N) * BLOCK_N
    n_hi = tl.maximum(tl.minimum(e_first + 1, seqlen_k), 0) // BLOCK_N * BLOCK_N
    n_lo = tl.minimum(tl.maximum(n_lo, lo3), hi3)
    n_hi = tl.minimum(tl.maximum(n_hi, n_lo), hi3)
    return s_full, f_lo, f_hi, n_lo, n_hi


@triton.jit
def _mask_stages(start_m, seqlen_q, seqlen_k, dist_offset, w_sink, w_left, w_right, w_near,
                 lo0, hi0, lo1, hi1, lo2, hi2, lo3, hi3, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, IS_LOCAL: tl.constexpr):
    """The key-tile ranges of `_key_ranges` split by mask flavour, as two tuple pairs: the
    ranges every row sees whole (run unmasked) and the edge ranges (run masked), each in key
    order. Not local: (fully visible) and (diagonal / sequence end). Local: the whole tiles of
    the sink, far and near bands, and the edges of each."""
    if IS_LOCAL:
        s_full, f_lo, f_hi, n_lo, n_hi = _local_full_tiles(
            start_m, seqlen_q, seqlen_k, dist_offset, w_sink, w_left, w_right, w_near,
            lo1, hi1, lo2, hi2, lo3, hi3, BLOCK_M, BLOCK_N)
        whole = ((lo1, f_lo, n_lo), (s_full, f_hi, n_hi))
        edges = ((s_full, lo2, f_hi, lo3, n_hi), (hi1, f_lo, hi2, n_lo, hi3))
    else:
        whole = ((lo0,), (hi0,))
        edges = ((lo1,), (hi1,))
    return whole, edges


@triton.jit
def _key_ranges(start_m, seqlen_q, seqlen_k, dist_offset, w_sink, w_left, w_right, w_near,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr,
                IS_LOCAL: tl.constexpr):
    """Key-tile ranges a query tile must visit, as (lo0, hi0) unmasked and up to three masked
    ranges (lo1, hi1), (lo2, hi2), (lo3, hi3); all multiples of BLOCK_N, disjoint, ordered.
    Fully hidden tiles fall outside every range."""
    m_first = start_m * BLOCK_M
    m_last = tl.minimum(m_first + BLOCK_M, seqlen_q) - 1
    n_tiles_end = tl.cdiv(seqlen_k, BLOCK_N) * BLOCK_N
    zero = m_first * 0
    if IS_LOCAL:
        # last visible key of the tile (dist >= 0 for its last row), exclusive end in tiles
        d_hi = tl.minimum(m_last + dist_offset + 1, seqlen_k)
        hi_all = tl.cdiv(tl.maximum(d_hi, 0), BLOCK_N) * BLOCK_N
        # sink [0, sink)
        hi1 = tl.minimum(tl.cdiv(tl.minimum(w_sink, seqlen_k), BLOCK_N) * BLOCK_N, hi_all)
        # far band: dist in [near + right, near + right + left)
        f_lo = tl.maximum(m_first + dist_offset - (w_near + w_right + w_left) + 1, 0)
        f_hi = tl.minimum(m_last + dist_offset - (w_near + w_right) + 1, seqlen_k)
        lo2 = tl.maximum((f_lo // BLOCK_N) * BLOCK_N, hi1)
        hi2 = tl.where((w_left > 0) & (f_hi > f_lo),
                       tl.minimum(tl.cdiv(tl.maximum(f_hi, 0), BLOCK_N) * BLOCK_N, hi_all), lo2)
        hi2 = tl.maximum(hi2, lo2)
        # near band: dist in [0, near)
        n_lo = tl.maximum(m_first + dist_offset - w_near + 1, 0)
        lo3 = tl.maximum((n_lo // BLOCK_N) * BLOCK_N, hi2)
        lo3 = tl.maximum(lo3, hi1)
        hi3 = tl.where(w_near > 0, hi_all, lo3)
        hi3 = tl.maximum(hi3, lo3)
        return zero, zero, zero, hi1, lo2, hi2, lo3, hi3
    if IS_CAUSAL:
        # tiles fully left of the first row's diagonal need no mask
        full = tl.minimum(m_first + dist_offset + 1, seqlen_k)
        hi0 = tl.maximum(full, 0) // BLOCK_N * BLOCK_N
        hi = tl.minimum(m_last + dist_offset + 1, seqlen_k)
        hi1 = tl.maximum(tl.cdiv(tl.maximum(hi, 0), BLOCK_N) * BLOCK_N, hi0)
        return zero, hi0, hi0, hi1, hi1, hi1, hi1, hi1
    hi0 = seqlen_k // BLOCK_N * BLOCK_N
    return zero, hi0, hi0, n_tiles_end, n_tiles_end, n_tiles_end, n_tiles_end, n_tiles_end


@triton.jit
def _clip(x, s_lo, s_hi):
    """A bound of one of the ordered key-tile ranges cut to [s_lo, s_hi) (cutting both bounds
    of [lo, hi) leaves it empty, lo == hi, when it lies outside)."""
    return tl.minimum(tl.maximum(x, s_lo), s_hi)


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, ALPHA, DELTA, CU_Q, CU_K, SEQUSED_K, WINDOWS, SKIP, LIST, K_DESC, V_DESC,
    PAGE_TABLE, O_PART, LSE_PART,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    stride_lb, stride_lh, stride_ls,
    stride_ab, stride_ah, stride_as,
    stride_db, stride_dh, stride_ds,
    stride_wh, stride_sb, stride_sh, stride_sm, stride_pb,
    seqlen_q_fixed, seqlen_k_fixed, scale_log2, H, GROUP, softmax_threshold, gate_threshold,
    heads_first, num_pages, num_splits,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, IS_LOCAL: tl.constexpr, WINDOW_PER_QHEAD: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_SEQUSED_K: tl.constexpr,
    HAS_GATE: tl.constexpr, IS_LOGSIGMOID: tl.constexpr,
    HAS_THRESHOLD: tl.constexpr, GATE_SKIP: tl.constexpr, IS_ADAPT_GATE: tl.constexpr,
    USE_TMA: tl.constexpr = False, TMA_EDGES: tl.constexpr = False,
    PAGE_SIZE: tl.constexpr = 0, IS_SPLIT: tl.constexpr = False,
):
    # IS_SPLIT (split-KV, no skipping): program_id(1) of num_splits takes an equal share of
    # the query tile's key tiles and writes its partial result (normalised by its own sum)
    # and base-2 lse to O_PART [tokens * H, num_splits, D] / LSE_PART [tokens * H,
    # num_splits] (fp32; token = b * Sq + row, or the packed row with varlen), which
    # `combine.py` merges exactly
    # PAGE_SIZE > 0 (batched, varlen): K, V and delta are a paged cache [num_pages, PAGE_SIZE, ...]
    # (strides *_b of a page, *_s of a row); key position p of sequence b lives in page
    # PAGE_TABLE[b, p // PAGE_SIZE], row p % PAGE_SIZE (`common.page_of`, in `_fwd_tile`)
    # USE_TMA (Hopper path, configs.fwd_path): whole tiles load K/V through the descriptors
    # K_DESC/V_DESC; TMA_EDGES: masked tiles too (not with varlen or seqused_k, where rows
    # past a sequence's end belong to another sequence or to an unused cache slot, whose
    # values may be anything: those tiles keep the masked pointer loads)
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

    p_q = (Q + b_off.to(tl.int64) * stride_qb + (q_start + o_m[:, None]).to(tl.int64) * stride_qs
           + h * stride_qh + o_d[None, :])
    b_q = load_tile(p_q, m_ok[:, None], o_d[None, :], HEAD_DIM, HEAD_DIM_PAD, True)
    # the sequence's keys: its first row (contiguous, packed), or its page-table row (paged:
    # positions from 0 whatever cu_seqlens_k says, which then only gives the lengths)
    kb_off = b_off * 0 if PAGE_SIZE > 0 else b_off
    ks_off = k_start * 0 if PAGE_SIZE > 0 else k_start
    p_k0 = K + kb_off.to(tl.int64) * stride_kb + ks_off.to(tl.int64) * stride_ks \
        + hk * stride_kh
    p_v0 = V + kb_off.to(tl.int64) * stride_vb + ks_off.to(tl.int64) * stride_vs \
        + hk * stride_vh
    # descriptor coordinates of this sequence and KV head; its page-table row, page count
    # and the page strides of K, V and delta
    kv = (b_off, k_start, hk, PAGE_TABLE + b.to(tl.int64) * stride_pb, num_pages,
          stride_kb, stride_vb, stride_db)

    if HAS_GATE:
        b_alpha = tl.load(ALPHA + b_off.to(tl.int64) * stride_ab + h * stride_ah
                          + (q_start + o_m).to(tl.int64) * stride_as, mask=m_ok, other=0.0)
        b_alpha = b_alpha.to(tl.float32)
        p_delta0 = DELTA + kb_off.to(tl.int64) * stride_db + hk * stride_dh \
            + ks_off.to(tl.int64) * stride_ds
    else:
        b_alpha = tl.zeros([BLOCK_M], dtype=tl.float32)
        p_delta0 = DELTA

    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    lo0, hi0, lo1, hi1, lo2, hi2, lo3, hi3 = _key_ranges(
        start_m, seqlen_q, seqlen_k, dist_offset, w_sink, w_left, w_right, w_near,
        BLOCK_M, BLOCK_N, IS_CAUSAL, IS_LOCAL)
    if IS_SPLIT:
        # this split's share of the key tiles [0, hi3) (the ranges are ordered: hi3 is the
        # end), each range cut to it
        n_t = hi3 // BLOCK_N
        pid_s = tl.program_id(1)
        s_lo = (pid_s * n_t // num_splits) * BLOCK_N
        s_hi = ((pid_s + 1) * n_t // num_splits) * BLOCK_N
        lo0 = _clip(lo0, s_lo, s_hi)
        hi0 = _clip(hi0, s_lo, s_hi)
        lo1 = _clip(lo1, s_lo, s_hi)
        hi1 = _clip(hi1, s_lo, s_hi)
        lo2 = _clip(lo2, s_lo, s_hi)
        hi2 = _clip(hi2, s_lo, s_hi)
        lo3 = _clip(lo3, s_lo, s_hi)
        hi3 = _clip(hi3, s_lo, s_hi)
    g_ref = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    if HAS_THRESHOLD or GATE_SKIP:
        # ---- block-skip rule (SPEC §5, §6): anchors first, then tested tiles -------------
        p_skip = SKIP + b * stride_sb + h * stride_sh + start_m * stride_sm
        p_list = LIST + b * stride_sb + h * stride_sh + start_m * stride_sm  # same layout
        m_first = start_m * BLOCK_M
        m_last = tl.minimum(m_first + BLOCK_M, seqlen_q) - 1
        if IS_CAUSAL or IS_LOCAL:
            # tiles holding some row's last visible key (the diagonal); none if near == 0
            a_lo = tl.maximum(m_first + dist_offset, 0) // BLOCK_N * BLOCK_N
            a_hi = tl.cdiv(tl.minimum(tl.maximum(m_last + dist_offset + 1, 0), seqlen_k),
                           BLOCK_N) * BLOCK_N
            if IS_LOCAL:
                a_hi = tl.where(w_near > 0, a_hi, a_lo)
            a_hi = tl.maximum(a_hi, a_lo)
        else:
            a_lo = (seqlen_k - 1) // BLOCK_N * BLOCK_N
            a_hi = tl.cdiv(seqlen_k, BLOCK_N) * BLOCK_N
        tile0 = ((lo0 == 0) & (hi0 > 0)) | ((lo1 == 0) & (hi1 > 0)) | \
            ((lo2 == 0) & (hi2 > 0)) | ((lo3 == 0) & (hi3 > 0))
        hi_a0 = tl.where(tile0 & (a_lo > 0), BLOCK_N, 0)
        acc, m_i, l_i, g_ref = _fwd_tiles(
            acc, m_i, l_i, g_ref, b_q, b_alpha, o_m, o_d, p_k0, p_v0, p_delta0, p_skip, p_list,
            K_DESC, V_DESC, kv, stride_ks, stride_vs, stride_ds, (0, a_lo), (hi_a0, a_hi),
            seqlen_k, dist_offset, scale_log2, w_sink, w_left, w_right, w_near, m_i, m_i, a_lo,
            a_hi, HEAD_DIM, HEAD_DIM_PAD, BLOCK_N, True, IS_CAUSAL, IS_LOCAL, HAS_GATE,
            IS_LOGSIGMOID, HAS_THRESHOLD, GATE_SKIP, 1, TMA_EDGES, PAGE_SIZE)
        # thresholds per row; padding rows never block a skip, rows with no anchor key
        # (no reference statistics) always do
        vis = visible_count(o_m, dist_offset, seqlen_k, IS_CAUSAL, IS_LOCAL,
                            w_sink, w_left, w_right, w_near).to(tl.float32)
        vis = tl.maximum(vis, 1.0)
        if HAS_THRESHOLD:
            b_thr = softmax_skip_threshold(m_i, l_i, softmax_threshold, vis, m_ok)
        else:
            b_thr = m_i
        # gate_threshold < 0: the default 1 / seqlen_k of this sequence
        tg0 = tl.where(gate_threshold < 0, 1.0 / tl.maximum(seqlen_k, 1).to(tl.float32),
                       gate_threshold)
        if IS_ADAPT_GATE and (IS_CAUSAL or IS_LOCAL):
            tg = tg0 * vis / seqlen_k
        else:
            tg = tl.zeros([BLOCK_M], dtype=tl.float32) + tg0
        if GATE_SKIP:
            b_gthr = gate_skip_threshold(g_ref, tg, scale_log2, m_ok)
        else:
            b_gthr = m_i
        PHASE: tl.constexpr = 2
    else:
        a_lo = 0
        a_hi = 0
        b_thr = m_i
        b_gthr = m_i
        p_skip = SKIP
        p_list = LIST
        PHASE: tl.constexpr = 0
    # tiles every row sees whole run without a mask, tiles crossing a mask boundary (diagonal,
    # band edges, sequence end) with it: one loop for each
    whole, edges = _mask_stages(start_m, seqlen_q, seqlen_k, dist_offset, w_sink, w_left,
                                w_right, w_near, lo0, hi0, lo1, hi1, lo2, hi2, lo3, hi3, BLOCK_M,
                                BLOCK_N, IS_LOCAL)
    acc, m_i, l_i, g_ref = _fwd_tiles(
        acc, m_i, l_i, g_ref, b_q, b_alpha, o_m, o_d, p_k0, p_v0, p_delta0, p_skip, p_list,
        K_DESC, V_DESC, kv, stride_ks, stride_vs, stride_ds, whole[0], whole[1], seqlen_k,
        dist_offset, scale_log2, w_sink, w_left, w_right, w_near, b_thr, b_gthr, a_lo, a_hi,
        HEAD_DIM, HEAD_DIM_PAD, BLOCK_N, False, IS_CAUSAL, IS_LOCAL, HAS_GATE, IS_LOGSIGMOID,
        HAS_THRESHOLD, GATE_SKIP, PHASE, USE_TMA, PAGE_SIZE)
    acc, m_i, l_i, g_ref = _fwd_tiles(
        acc, m_i, l_i, g_ref, b_q, b_alpha, o_m, o_d, p_k0, p_v0, p_delta0, p_skip, p_list,
        K_DESC, V_DESC, kv, stride_ks, stride_vs, stride_ds, edges[0], edges[1], seqlen_k,
        dist_offset, scale_log2, w_sink, w_left, w_right, w_near, b_thr, b_gthr, a_lo, a_hi,
        HEAD_DIM, HEAD_DIM_PAD, BLOCK_N, True, IS_CAUSAL, IS_LOCAL, HAS_GATE, IS_LOGSIGMOID,
        HAS_THRESHOLD, GATE_SKIP, PHASE, TMA_EDGES, PAGE_SIZE)

    # epilogue: normalise, natural-log lse; rows with no visible key -> out 0, lse -inf
    has_key = l_i > 0.0
    l_safe = tl.where(has_key, l_i, 1.0)
    b_o = acc / l_safe[:, None]
    if IS_SPLIT:
        row = ((b_off * seqlen_q_fixed + q_start + o_m) * H + h).to(tl.int64) * num_splits \
            + tl.program_id(1)
        tl.store(O_PART + row[:, None] * HEAD_DIM + o_d[None, :], b_o,
                 mask=m_ok[:, None] & (o_d[None, :] < HEAD_DIM))
        tl.store(LSE_PART + row, tl.where(has_key, m_i + tl.math.log2(l_safe), float("-inf")),
                 mask=m_ok)
        return
    b_lse = tl.where(has_key, (m_i + tl.math.log2(l_safe)) * LN2, float("-inf"))
    p_o = (O + b_off.to(tl.int64) * stride_ob + (q_start + o_m[:, None]).to(tl.int64) * stride_os
           + h * stride_oh + o_d[None, :])
    if HEAD_DIM == HEAD_DIM_PAD:
        tl.store(p_o, b_o.to(O.dtype.element_ty), mask=m_ok[:, None])
    else:
        tl.store(p_o, b_o.to(O.dtype.element_ty), mask=m_ok[:, None] & (o_d[None, :] < HEAD_DIM))
    p_lse = LSE + b_off.to(tl.int64) * stride_lb + h * stride_lh \
        + (q_start + o_m).to(tl.int64) * stride_ls
    tl.store(p_lse, b_lse, mask=m_ok)


def _strides3(t, is_varlen):
    """The first three strides of a batched tensor, or (0, its two strides) of a varlen one
    with no batch dimension: q/k/v/out [B, S, H, D] -> (batch, seq, head) ([total, H, D]);
    alpha/delta [B, H, S] and lse [B, H, Sq] -> (batch, head, seq) ([H, total]). None -> 0s."""
    if t is None:
        return 0, 0, 0
    st = t.stride()  # one call: each Tensor.stride(i) costs as much as the whole tuple
    return (0, st[0], st[1]) if is_varlen else st[:3]


def _kv_descriptor(t, is_varlen, block_n, head_dim_pad):
    """TMA descriptor of keys or values as [batch, key, kv head, dim] (varlen: batch 1 over
    [total_k, Hkv, D]), one [1, block_n, 1, head_dim_pad] block per load."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    if is_varlen:
        shape = [1, *t.shape]
        strides = [t.shape[0] * t.stride(0), *t.stride()]
    else:
        shape, strides = list(t.shape), list(t.stride())
    return TensorDescriptor(t, shape, strides, [1, block_n, 1, head_dim_pad])


def launch_attn_fwd(q, k, v, *, config=None, path=None, **kw):
    """`_attn_fwd_launches` (same arguments), replayed from its launch plan
    (`launch.planned`) on calls whose signature it has seen; `config` / `path` (tuning and
    tests) always take the long way."""
    if config is None and path is None:
        return planned(_attn_fwd_launches, (q, k, v), kw, configs.fwd_path_forced())
    return _attn_fwd_launches(q, k, v, config=config, path=path, **kw)


def _attn_fwd_launches(q, k, v, *, alpha, delta, cu_seqlens_q, cu_seqlens_k, seqused_k,
                       window_sizes, max_seqlen_q, max_seqlen_k, softmax_scale, is_causal,
                       softmax_threshold, gate_threshold, is_logsigmoid_gate, is_adapt_gate,
                       deterministic, page_table=None, num_splits=0, config=None, path=None):
    """`config` overrides the launch config (scripts/tune.py only); `path` the kernel path
    of configs.fwd_path ("hopper", "tma" or "portable": tests compare them). page_table
    (batched or varlen): k/v [num_pages, page_size, Hkv, D] and delta [num_pages, page_size,
    Hkv] are a paged cache, a sequence's keys positions [0, its length) of its pages (batched:
    page_table.shape[1] * page_size long, or seqused_k); the portable path (pointer loads
    through the page table). num_splits: split-KV (`configs.fwd_num_splits`; 0 = its
    heuristic): the key tiles of each query tile shared by that many programs, merged by
    `combine.py`; calls that skip blocks (softmax threshold, gate test) do not split."""
    is_varlen = cu_seqlens_q is not None
    paged = page_table is not None
    if is_varlen:
        batch, num_heads, head_dim = cu_seqlens_q.shape[0] - 1, q.shape[1], q.shape[2]
        num_kv_heads = k.shape[-2]
        seqlen_q, seqlen_k = max_seqlen_q, max_seqlen_k
    else:
        batch, seqlen_q, num_heads, head_dim = q.shape
        seqlen_k, num_kv_heads = k.shape[1], k.shape[2]
        if paged:
            seqlen_k = page_table.shape[1] * k.shape[1]
    out = buffer_like(q)
    lse_shape = (num_heads, q.shape[0]) if is_varlen else (batch, num_heads, seqlen_q)
    lse = buffer(lse_shape, torch.float32, q.device)
    can_skip = softmax_threshold > 0 or alpha is not None
    skip = buffer(configs.skip_shape(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k, can_skip),
                  torch.uint8, q.device, zero=can_skip)
    if q.numel() == 0 or batch == 0:
        lse.fill_(float("-inf"))
        return out.zero_(), lse, skip

    has_threshold = softmax_threshold > 0
    gate_skip = alpha is not None and gate_threshold != 0
    # an explicit `config` is a tile shape of this file's kernel (tune.py sweeps it): it never
    # goes to the Gluon kernel, whose shapes are its own (configs.hopper_config)
    if paged:
        path = "portable"
    gated = alpha is not None
    path = path or configs.fwd_path(
        q, k, v, hopper_covers=config is None and not (num_splits or 0) > 1 and not (
            is_varlen or (gated and (gate_skip or has_threshold)) or window_sizes is not None
            or seqused_k is not None),
        variant=("gated" if is_logsigmoid_gate else "gated_linear") if gated
        else "sparse" if has_threshold else "dense")
    if path == "hopper":
        from .hopper import launch_attn_fwd_hopper

        launch_attn_fwd_hopper(q, k, v, out, lse, softmax_scale=softmax_scale,
                               is_causal=is_causal, config=configs.hopper_config(q, head_dim),
                               softmax_threshold=softmax_threshold if has_threshold else 0.0,
                               skip=skip if has_threshold else None, alpha=alpha, delta=delta,
                               is_logsigmoid_gate=is_logsigmoid_gate)
        replayable()
        return out, lse, skip
    use_tma = path == "tma"
    cfg = config or configs.fwd_config(q, head_dim, seqlen_q, seqlen_k, is_causal,
                                       window_sizes is not None, alpha is not None,
                                       has_threshold or gate_skip, tma=use_tma)
    head_dim_pad = configs.head_dim_pad(head_dim)
    n_m = configs.cdiv(seqlen_q, cfg.block_m)
    tokens = q.shape[0] if is_varlen else batch * seqlen_q
    splits = 1 if has_threshold or gate_skip else configs.fwd_num_splits(
        q, n_m * batch * num_heads, seqlen_k, cfg.block_n, num_splits,
        partial_row_bytes=tokens * num_heads * (head_dim + 1) * 4)
    if use_tma:
        k_desc = _kv_descriptor(k, is_varlen, cfg.block_n, head_dim_pad)
        v_desc = _kv_descriptor(v, is_varlen, cfg.block_n, head_dim_pad)
    else:
        k_desc = v_desc = q  # never dereferenced
    is_local = window_sizes is not None
    stride_l = _strides3(lse, is_varlen)  # [H, total_q] or [B, H, Sq]
    grid = (n_m * batch * num_heads, splits)
    dummy = q  # placeholder pointer for absent optional tensors (never dereferenced)
    if splits > 1:
        o_part = torch.empty((tokens * num_heads, splits, head_dim), dtype=torch.float32,
                             device=q.device)
        lse_part = torch.empty((tokens * num_heads, splits), dtype=torch.float32,
                               device=q.device)
    else:
        o_part = lse_part = lse
    launch(
        _attn_fwd_kernel, grid,
        q, k, v, out, lse,
        alpha if alpha is not None else dummy, delta if delta is not None else dummy,
        cu_seqlens_q if is_varlen else dummy, cu_seqlens_k if is_varlen else dummy,
        seqused_k if seqused_k is not None else dummy,
        window_sizes if is_local else dummy, skip if skip.numel() else dummy,
        buffer(skip.shape, torch.int32, q.device) if gate_skip else dummy,
        k_desc, v_desc, page_table if paged else dummy, o_part, lse_part,
        *_strides3(q, is_varlen), *_strides3(k, is_varlen and not paged),
        *_strides3(v, is_varlen and not paged),
        *_strides3(out, is_varlen), *stride_l,
        *_strides3(alpha, is_varlen),
        *((delta.stride(0), delta.stride(2), delta.stride(1)) if paged and delta is not None
          else _strides3(delta, is_varlen)),  # paged delta [num_pages, page_size, Hkv]
        window_sizes.stride(0) if is_local else 0,
        *(skip.stride()[:3] if skip.dim() == 4 else (0, 0, 0)),
        page_table.stride(0) if paged else 0,
        seqlen_q, seqlen_k, softmax_scale * 1.4426950408889634, num_heads,
        num_heads // num_kv_heads, float(softmax_threshold), float(gate_threshold),
        int(configs.heads_first("fwd", is_local)), k.shape[0] if paged else 1, splits,
        HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        IS_CAUSAL=bool(is_causal), IS_LOCAL=is_local,
        WINDOW_PER_QHEAD=is_local and window_sizes.shape[0] == num_heads
        and num_heads != num_kv_heads,
        IS_VARLEN=is_varlen, HAS_SEQUSED_K=seqused_k is not None,
        HAS_GATE=alpha is not None, IS_LOGSIGMOID=bool(is_logsigmoid_gate),
        HAS_THRESHOLD=has_threshold, GATE_SKIP=gate_skip, IS_ADAPT_GATE=bool(is_adapt_gate),
        USE_TMA=use_tma, TMA_EDGES=use_tma and not is_varlen and seqused_k is None,
        PAGE_SIZE=k.shape[1] if paged else 0, IS_SPLIT=splits > 1,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if splits > 1:
        _combine_splits(o_part, lse_part, out, lse, is_varlen)
    else:
        replayable()
    return out, lse, skip


def _combine_splits(o_part, lse_part, out, lse, is_varlen):
    """Merge the split-KV partials (`_attn_fwd_kernel` with IS_SPLIT) into out (q's layout)
    and lse ([B, H, Sq], or [H, total_q] with varlen): `combine.py`'s exact combine over rows
    (token, head), through contiguous buffers where out / lse cannot be viewed that way."""
    from .combine import launch_combine

    num_heads, head_dim = out.shape[-2], out.shape[-1]
    tokens = o_part.shape[0] // num_heads
    flat = out.view(tokens, num_heads, head_dim) if out.is_contiguous() else \
        torch.empty((tokens, num_heads, head_dim), dtype=out.dtype, device=out.device)
    lse_rows = lse.t() if is_varlen else \
        torch.empty((tokens, num_heads), dtype=torch.float32, device=out.device)
    launch_combine(o_part, lse_part, flat, lse_rows)
    if not out.is_contiguous():
        out.copy_(flat.view(out.shape))
    if not is_varlen:
        lse.copy_(lse_rows.view(lse.shape[0], lse.shape[2], num_heads).permute(0, 2, 1))
