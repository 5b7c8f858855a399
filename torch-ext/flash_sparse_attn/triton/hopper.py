"""Hopper (sm_90) forward, warp-specialised, written in Gluon: dense, sparse (SPEC §5) and gated
(SPEC §6) without block tests.

Notation
- A CTA owns 2 * BLOCK_M query rows of one (batch, query head): two consumer warpgroups of
  BLOCK_M = 64 rows each (the default partition, and one worker partition), plus one producer
  warp (a second worker partition) that issues every TMA load.
- The producer loads both Q tiles once (`q_bar`), then K and V tiles into rings of STAGES
  shared-memory buffers (`k_ready` / `v_ready`, with the bytes they expect). A consumer gives a
  K buffer back (`k_empty`) once its Q.K^T is done and a V buffer (`v_empty`) once its P.V is;
  each empty barrier waits for both consumers.
- Each consumer runs the online softmax of its own 64 rows with wgmma (`S = Q.K^T` from shared
  memory, `acc += P.V` with P in registers). Dense (`_dense_loop`): tile j's Q.K^T and tile
  j-1's P.V are issued together and tile j's softmax runs while that P.V does; the consumers
  take turns to issue (mbarriers `turn`), so one's softmax also overlaps the other's matmuls.
- Sparse (`SPARSE`, softmax_threshold > 0): a warpgroup's 64 rows are exactly one row of skip
  blocks (configs.skip_block_m(128) = 64) and a 128-key tile two skip blocks of 64 keys, so a
  block's decision involves one warpgroup only (no CTA barrier). The tile stream is phase 1, the
  anchor tiles of both row blocks (key block 0 and the diagonal blocks, `_stream`), then
  phase 2, every visible tile again, with anchor halves left out: the rule, the thresholds and
  the skip codes are `fwd.py`'s, block for block, so the backward reads the same codes.
- Masks, the visible-key count and the online-softmax step are the portable family's
  (`common.visible`, `common.visible_count`; `common.online_softmax_step_scaled`, its step
  with the scale folded into the exp2's FMA), called from Gluon: one copy of each.
- Gated (`HAS_GATE`, dense loop only): each warpgroup loads its rows' alpha once; the producer
  loads each key tile's delta by TMA with its K (`k_ready` counts both), and the consumer reads
  it from shared memory after the tile's Q.K^T (`_tile_delta` says why not earlier); the gate is
  `common.gate`, the portable kernel's.

Caution
- Batched attention only (no window, varlen or seqused_k; gated only with gate_threshold 0 and
  no softmax_threshold), head dims 64, 128 and 256 (powers of two: the accumulator is one
  register tile per warpgroup; D=256 with 64-key tiles); `configs.fwd_path` chooses which
  calls come here (`HOPPER_HEAD_DIMS`) and sends everything else to the TMA path of `fwd.py`.
  Sparse needs BLOCK_M = 64 and BLOCK_N = 128 (two skip blocks); its tiles run one after the
  other in a warpgroup (`_sparse_phase` says why).
- Q/K/V rows past the tensors' ends read as zeros (TMA); rows past Sq are not stored.
- A row with no visible key (Sq > Sk, causal) gets out 0 and lse -inf, as in `fwd.py`.
- Sparse revisits the anchor tiles in phase 2 (their Q.K^T twice): about two tiles per CTA.
- Triton 3.6 names the TMA load `async_copy_global_to_shared`, later releases `async_load`.
"""

from __future__ import annotations

import functools

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma,
                                                              warpgroup_mma, warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from . import configs
from .common import (LN2, gate, online_softmax_step_scaled, softmax_rescale,
                     softmax_skip_threshold, visible, visible_count)
from .launch import launch

_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared


@gluon.jit
def _key_tiles(m0, seqlen_q, seqlen_k, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
               IS_CAUSAL: gl.constexpr):
    """Key tiles the CTA's 2 * BLOCK_M rows may see: up to the last row's diagonal."""
    if IS_CAUSAL:
        m_last = gl.minimum(m0 + 2 * BLOCK_M, seqlen_q) - 1
        hi = gl.minimum(gl.maximum(m_last + seqlen_k - seqlen_q + 1, 0), seqlen_k)
    else:
        hi = seqlen_k
    return gl.cdiv(hi, BLOCK_N)


@gluon.jit
def _row_block(first, seqlen_q, seqlen_k, SKIP_N: gl.constexpr, IS_CAUSAL: gl.constexpr):
    """The skip rule's keys for the 64-row block of queries [first, first + 64), as in
    `fwd.py`: (hi, a_lo, a_hi), keys [0, hi) hold every key some row sees (the block visits
    the key blocks below cdiv(hi, SKIP_N)), anchors: key block 0 and the blocks [a_lo, a_hi)
    holding some row's last visible key. A block past seqlen_q has none: (0, 0, 0)."""
    dist_offset = seqlen_k - seqlen_q
    m_last = gl.minimum(first + 64, seqlen_q) - 1
    if IS_CAUSAL:
        hi = gl.minimum(gl.maximum(m_last + dist_offset + 1, 0), seqlen_k)
        a_lo = gl.maximum(first + dist_offset, 0) // SKIP_N * SKIP_N
        a_hi = gl.maximum(gl.cdiv(hi, SKIP_N) * SKIP_N, a_lo)
    else:
        hi = seqlen_k
        a_lo = (seqlen_k - 1) // SKIP_N * SKIP_N
        a_hi = gl.cdiv(seqlen_k, SKIP_N) * SKIP_N
    live = first < seqlen_q
    return gl.where(live, hi, 0), gl.where(live, a_lo, 0), gl.where(live, a_hi, 0)


@gluon.jit
def _stream(m0, seqlen_q, seqlen_k, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
            IS_CAUSAL: gl.constexpr, SPARSE: gl.constexpr):
    """The CTA's stream of key tiles, which the producer loads and both consumers take in
    order: SPARSE first visits the anchor tiles of both row blocks (phase 1: tile 0, then the
    tiles [t_lo, t_hi) holding the diagonal blocks), then every tile [0, n) (phase 2; dense:
    phase 2 only). Returns (n1, t_lo, n): stream position i < n1 is phase-1 tile
    `_phase1_tile(i, t_lo)`, position n1 + j is tile j."""
    n = _key_tiles(m0, seqlen_q, seqlen_k, BLOCK_M, BLOCK_N, IS_CAUSAL)
    if SPARSE:
        SKIP_N: gl.constexpr = BLOCK_N // 2
        hi0, a_lo0, a_hi0 = _row_block(m0, seqlen_q, seqlen_k, SKIP_N, IS_CAUSAL)
        hi1, a_lo1, a_hi1 = _row_block(m0 + BLOCK_M, seqlen_q, seqlen_k, SKIP_N, IS_CAUSAL)
        t_lo = a_lo0 // BLOCK_N
        t_hi = gl.cdiv(gl.maximum(a_hi0, a_hi1), BLOCK_N)
        n1 = gl.where(n > 0, t_hi - t_lo + (t_lo > 0).to(gl.int32), 0)
    else:
        t_lo = n * 0
        n1 = n * 0
    return n1, t_lo, n


@gluon.jit
def _phase1_tile(i, t_lo):
    """Tile of phase-1 stream position i: tile 0 first when it is not a diagonal tile."""
    lead = (t_lo > 0).to(gl.int32)
    return gl.where((lead == 1) & (i == 0), 0, t_lo + i - lead)


@gluon.jit
def _producer(args, gates, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
              IS_CAUSAL: gl.constexpr, SPARSE: gl.constexpr, HAS_GATE: gl.constexpr):
    (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_empty, v_empty,
     b, h, hk, m0, seqlen_q, seqlen_k, p_o, p_lse, stride_os, stride_ls,
     scale_log2, p_skip, stride_sm, softmax_threshold) = args
    mbarrier.expect(q_bar, 2 * q_desc.block_type.nbytes)
    _tma_load(q_desc, [b, m0, h, 0], q_bar, q_smem.index(0))
    _tma_load(q_desc, [b, m0 + BLOCK_M, h, 0], q_bar, q_smem.index(1))
    n1, t_lo, n = _stream(m0, seqlen_q, seqlen_k, BLOCK_M, BLOCK_N, IS_CAUSAL, SPARSE)
    for i in range(n1 + n):
        j = gl.where(i < n1, _phase1_tile(i, t_lo), i - n1)
        s = i % STAGES
        phase = (i // STAGES) & 1
        mbarrier.wait(k_empty.index(s), phase ^ 1)
        if HAS_GATE:  # the tile's delta with its K
            d_desc, d_smem = gates[2], gates[3]
            mbarrier.expect(k_ready.index(s), k_desc.block_type.nbytes + d_desc.block_type.nbytes)
            _tma_load(d_desc, [b, hk, j * BLOCK_N], k_ready.index(s), d_smem.index(s))
        else:
            mbarrier.expect(k_ready.index(s), k_desc.block_type.nbytes)
        _tma_load(k_desc, [b, j * BLOCK_N, hk, 0], k_ready.index(s), k_smem.index(s))
        # V with every K: loading it only for the tiles a warpgroup keeps (the producer
        # waiting for both warpgroups' decisions) measured slower (H200, 16k, t=1: LLM-like
        # 3.70 vs 3.10 ms, random 4.98 vs 4.52): the consumers wait for V instead
        mbarrier.wait(v_empty.index(s), phase ^ 1)
        mbarrier.expect(v_ready.index(s), v_desc.block_type.nbytes)
        _tma_load(v_desc, [b, j * BLOCK_N, hk, 0], v_ready.index(s), v_smem.index(s))


@triton.constexpr_function
def _mma_layout(n):
    """wgmma accumulator layout of one warpgroup's [64, n] tile (scores or output)."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                     instr_shape=[16, int(n), 16])


@gluon.jit
def _issue_scores(b_q, k_smem, k_ready, i, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                  STAGES: gl.constexpr):
    """Start S = Q.K^T [BLOCK_M, BLOCK_N] (fp32, unscaled) of stream position i (its K tile in
    ring buffer i % STAGES) on the tensor cores; `_finish_scores` waits for it."""
    HEAD_DIM: gl.constexpr = b_q.shape[1]
    s = i % STAGES
    mbarrier.wait(k_ready.index(s), (i // STAGES) & 1)
    b_k = k_smem.index(s).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0))
    zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=_mma_layout(BLOCK_N))
    return warpgroup_mma(b_q, b_k, zero_s, use_acc=False, is_async=True)


@gluon.jit
def _finish_scores(b_s, k_empty, i, STAGES: gl.constexpr):
    """Wait for the S of stream position i; its K buffer goes back to the producer."""
    b_s = warpgroup_mma_wait(0, deps=[b_s])
    mbarrier.arrive(k_empty.index(i % STAGES), count=1)
    return b_s


@gluon.jit
def _tile_delta(gates, i, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, HAS_GATE: gl.constexpr):
    """delta of stream position i's keys (fp32; TMA reads 0 past seqlen_k, where keys are
    masked), in the layout of a score tile's columns, from the shared-memory ring the
    producer fills with K (`k_ready`); read after the tile's Q.K^T is done and before its
    K buffer goes back. Held in registers from the top of the iteration instead (a global
    load), the 32 values per thread left the gate math too few registers (H200, 16k causal
    D=128: 10.7 ms against 3.6 dense). Without a gate a placeholder that nothing reads."""
    col: gl.constexpr = gl.SliceLayout(0, _mma_layout(BLOCK_N))
    if HAS_GATE:
        return gates[3].index(i % STAGES).reshape([BLOCK_N]).load(col).to(gl.float32)
    else:
        return gl.zeros([BLOCK_N], gl.float32, layout=col)


@gluon.jit
def _dense_softmax(b_s, m_i, l_i, j, o_m, n_full, seqlen_k, dist_offset, scale_log2, dtype,
                   b_alpha, b_delta, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr,
                   IS_CAUSAL: gl.constexpr, HAS_GATE: gl.constexpr,
                   IS_LOGSIGMOID: gl.constexpr):
    """Online softmax of key tile j's scores b_s = Q.K^T (unscaled fp32), plus the gate
    g(alpha_i * delta_j) of SPEC §6 when HAS_GATE (`common.gate`): (P as the P.V operand,
    m_i, l_i, the accumulator's rescale factor)."""
    s_layout: gl.constexpr = _mma_layout(BLOCK_N)
    o_layout: gl.constexpr = _mma_layout(HEAD_DIM)
    if HAS_GATE:
        b_s = b_s + gate(b_alpha, b_delta, IS_LOGSIGMOID)
    if j >= n_full:
        o_n = j * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        m_vis = visible(o_m, o_n, dist_offset, seqlen_k, IS_CAUSAL, False, 0, 0, 0, 0)
        b_s = gl.where(m_vis, b_s, float("-inf"))
    b_p, m_i, l_i, b_r = online_softmax_step_scaled(b_s, m_i, l_i, scale_log2)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    return (gl.convert_layout(b_p.to(dtype), p_layout), m_i, l_i,
            gl.convert_layout(b_r, gl.SliceLayout(1, o_layout)))


@gluon.jit
def _issue_pv(acc, b_p, v_smem, v_ready, i, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    """Start acc += P.V of stream position i (its V tile in ring buffer i % STAGES)."""
    HEAD_DIM: gl.constexpr = acc.shape[1]
    s = i % STAGES
    mbarrier.wait(v_ready.index(s), (i // STAGES) & 1)
    return warpgroup_mma(b_p, v_smem.index(s).reshape([BLOCK_N, HEAD_DIM]), acc, is_async=True)


@gluon.jit
def _dense_loop(acc, m_i, l_i, b_q, args, turn, gates, b_alpha, n, o_m, n_full, dist_offset,
                BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                IS_CAUSAL: gl.constexpr, HAS_GATE: gl.constexpr, IS_LOGSIGMOID: gl.constexpr,
                WG: gl.constexpr):
    """The dense loop over key tiles [0, n). Tile j's Q.K^T and tile j-1's P.V are issued
    together and tile j's softmax runs while that P.V does; the two warpgroups take turns to
    issue (`turn`: warpgroup WG waits on turn[WG], then hands the turn over), so one's softmax
    also overlaps the other's matmuls. Measured (H200, causal, H=32, Hkv=8): 16k D=128 3.75 ms
    against 4.15 with one tile's Q.K^T, softmax and P.V in sequence and 3.77 without the
    turns; 4k 0.286 vs 0.310 and 0.288."""
    (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_empty, v_empty,
     b, h, hk, m0, seqlen_q, seqlen_k, p_o, p_lse, stride_os, stride_ls,
     scale_log2, p_skip, stride_sm, softmax_threshold) = args
    HEAD_DIM: gl.constexpr = b_q.shape[1]
    if WG == 1:  # warpgroup 0 issues first
        mbarrier.arrive(turn.index(0), count=1)
    if n > 0:
        b_s = warpgroup_mma_wait(0, deps=[_issue_scores(b_q, k_smem, k_ready, 0, BLOCK_M,
                                                         BLOCK_N, STAGES)])
        b_delta = _tile_delta(gates, 0, BLOCK_N, STAGES, HAS_GATE)
        mbarrier.arrive(k_empty.index(0), count=1)
        b_p, m_i, l_i, b_r = _dense_softmax(b_s, m_i, l_i, 0, o_m, n_full, seqlen_k,
                                            dist_offset, scale_log2, b_q.dtype, b_alpha,
                                            b_delta, HEAD_DIM, BLOCK_N, IS_CAUSAL, HAS_GATE,
                                            IS_LOGSIGMOID)
        for j in range(1, n):
            mbarrier.wait(turn.index(WG), (j - 1) & 1)
            b_s = _issue_scores(b_q, k_smem, k_ready, j, BLOCK_M, BLOCK_N, STAGES)
            acc = _issue_pv(acc, b_p, v_smem, v_ready, j - 1, BLOCK_N, STAGES)
            mbarrier.arrive(turn.index(1 - WG), count=1)
            b_s = warpgroup_mma_wait(1, deps=[b_s])  # the Q.K^T; the P.V runs on
            b_delta = _tile_delta(gates, j, BLOCK_N, STAGES, HAS_GATE)
            mbarrier.arrive(k_empty.index(j % STAGES), count=1)
            b_p, m_i, l_i, b_r = _dense_softmax(b_s, m_i, l_i, j, o_m, n_full, seqlen_k,
                                                dist_offset, scale_log2, b_q.dtype, b_alpha,
                                                b_delta, HEAD_DIM, BLOCK_N, IS_CAUSAL,
                                                HAS_GATE, IS_LOGSIGMOID)
            acc = warpgroup_mma_wait(0, deps=[acc])
            mbarrier.arrive(v_empty.index((j - 1) % STAGES), count=1)
            acc = acc * b_r[:, None]
        acc = _issue_pv(acc, b_p, v_smem, v_ready, n - 1, BLOCK_N, STAGES)
        acc = warpgroup_mma_wait(0, deps=[acc])
        mbarrier.arrive(v_empty.index((n - 1) % STAGES), count=1)
    return acc, m_i, l_i


@gluon.jit
def _half_probs(b_s, m_use, l_i, scale_log2, dtype, p_layout: gl.constexpr):
    """A kept half tile's exp2 of its unscaled scores against the row offsets m_use (base 2):
    (P as the P.V operand, l_i + its row sums)."""
    b_p = gl.exp2(b_s * scale_log2 - m_use[:, None])
    return gl.convert_layout(b_p.to(dtype), p_layout), l_i + gl.sum(b_p, 1)


@gluon.jit
def _sparse_decide(b_s, b_thr, p_skip, j, o_m, n_full, blocks, seqlen_k, dist_offset, scale_log2,
                   BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, IS_CAUSAL: gl.constexpr,
                   PHASE: gl.constexpr):
    """The skip test of key tile j, its scores b_s = Q.K^T done, as two skip blocks of
    BLOCK_N / 2 keys (2j and 2j + 1): the tile split in registers into halves s0, s1
    (unscaled, masked) and their row maxima mx0, mx1 (base 2: scaled after the max, the same
    maxima as scale_log2 > 0); flags (bit h: half h kept); the blocks' codes.

    PHASE 1 (anchors): a half is kept when it is one of this row block's anchor blocks (code 1).
    PHASE 2: an anchor or unvisited half is left out; any other is kept when some row's max
    over it reaches that row's threshold b_thr (SPEC §5; the test of fwd.py: a warpgroup-wide
    OR, no CTA barrier), and gets code 1 (kept) or 2 (skipped)."""
    HALF: gl.constexpr = BLOCK_N // 2
    h_layout: gl.constexpr = _mma_layout(HALF)
    hi, a_lo, a_hi = blocks
    # halves [BLOCK_M, HALF]: the first and the last HALF columns (register-only split)
    s0, s1 = gl.split(gl.permute(gl.reshape(b_s, [BLOCK_M, 2, HALF]), (0, 2, 1)))
    s0 = gl.convert_layout(s0, h_layout)
    s1 = gl.convert_layout(s1, h_layout)
    if j >= n_full:
        o_n = j * BLOCK_N + gl.arange(0, HALF, layout=gl.SliceLayout(0, h_layout))
        s0 = gl.where(visible(o_m, o_n, dist_offset, seqlen_k, IS_CAUSAL, False, 0, 0, 0, 0),
                      s0, float("-inf"))
        s1 = gl.where(visible(o_m, o_n + HALF, dist_offset, seqlen_k, IS_CAUSAL, False, 0, 0,
                              0, 0), s1, float("-inf"))
    # block k of this row block: visited (some row sees a key of it) and an anchor or not
    blk0 = 2 * j
    vis0 = (blk0 * HALF < hi).to(gl.int32)
    vis1 = ((blk0 + 1) * HALF < hi).to(gl.int32)
    anc0 = ((blk0 == 0) | ((blk0 * HALF >= a_lo) & (blk0 * HALF < a_hi))).to(gl.int32)
    anc1 = (((blk0 + 1) * HALF >= a_lo) & ((blk0 + 1) * HALF < a_hi)).to(gl.int32)
    mx0 = gl.max(s0, 1) * scale_log2
    mx1 = gl.max(s1, 1) * scale_log2
    if PHASE == 1:
        flags = (vis0 & anc0) | ((vis1 & anc1) << 1)
        if (flags & 1) != 0:
            gl.store(p_skip + blk0, (flags & 1).to(gl.uint8))
        if (flags & 2) != 0:
            gl.store(p_skip + blk0 + 1, (flags >> 1).to(gl.uint8))
    else:
        keep = ((mx0 > float("-inf")) & (mx0 >= b_thr)).to(gl.int32) | \
            (((mx1 > float("-inf")) & (mx1 >= b_thr)).to(gl.int32) << 1)
        test = (vis0 & (1 - anc0)) | ((vis1 & (1 - anc1)) << 1)
        flags = gl.reduce_or(keep, 0) & test
        if (test & 1) != 0:
            gl.store(p_skip + blk0, (2 - (flags & 1)).to(gl.uint8))
        if (test & 2) != 0:
            gl.store(p_skip + blk0 + 1, (2 - ((flags >> 1) & 1)).to(gl.uint8))
    return flags, s0, s1, mx0, mx1


@gluon.jit
def _sparse_accumulate(acc, m_i, l_i, flags, s0, s1, mx0, mx1, v_smem, v_ready, v_empty, i,
                       scale_log2, dtype, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    """The online-softmax step over the kept halves of stream position i (`_sparse_decide`):
    each kept half gets its own exp2 and P.V (a wgmma over its half of the V tile), a skipped
    half neither; nothing runs (not even the rescale) when both are skipped. The V buffer goes
    back to the producer either way."""
    HEAD_DIM: gl.constexpr = acc.shape[1]
    HALF: gl.constexpr = BLOCK_N // 2
    o_layout: gl.constexpr = _mma_layout(HEAD_DIM)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    s = i % STAGES
    mbarrier.wait(v_ready.index(s), (i // STAGES) & 1)
    if flags != 0:
        k0 = (flags & 1) != 0
        k1 = (flags & 2) != 0
        m_i, m_use, b_r = softmax_rescale(m_i, gl.maximum(gl.where(k0, mx0, float("-inf")),
                                                          gl.where(k1, mx1, float("-inf"))))
        l_i = l_i * b_r
        acc = acc * gl.convert_layout(b_r, gl.SliceLayout(1, o_layout))[:, None]
        b_v = v_smem.index(s).reshape([BLOCK_N, HEAD_DIM])
        if flags == 3:
            p0, l_i = _half_probs(s0, m_use, l_i, scale_log2, dtype, p_layout)
            p1, l_i = _half_probs(s1, m_use, l_i, scale_log2, dtype, p_layout)
            acc = warpgroup_mma(p0, b_v.slice(0, HALF), acc, is_async=True)
            acc = warpgroup_mma(p1, b_v.slice(HALF, HALF), acc, is_async=True)
            acc = warpgroup_mma_wait(0, deps=[acc])
        elif flags == 1:
            p0, l_i = _half_probs(s0, m_use, l_i, scale_log2, dtype, p_layout)
            acc = warpgroup_mma(p0, b_v.slice(0, HALF), acc, is_async=True)
            acc = warpgroup_mma_wait(0, deps=[acc])
        else:
            p1, l_i = _half_probs(s1, m_use, l_i, scale_log2, dtype, p_layout)
            acc = warpgroup_mma(p1, b_v.slice(HALF, HALF), acc, is_async=True)
            acc = warpgroup_mma_wait(0, deps=[acc])
    mbarrier.arrive(v_empty.index(s), count=1)
    return acc, m_i, l_i


@gluon.jit
def _sparse_phase(acc, m_i, l_i, b_thr, b_q, args, p_skip, start, count, t_lo, o_m, n_full,
                  blocks, dist_offset, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                  STAGES: gl.constexpr, IS_CAUSAL: gl.constexpr, PHASE: gl.constexpr):
    """Stream positions [start, start + count) of one phase of the sparse loop: per tile the
    skip test (`_sparse_decide`), then exp2 and P.V of the kept halves only
    (`_sparse_accumulate`).
    One copy of the body per phase and per kept-halves case: folding them into one loop
    (phase and half as runtime values) measured slower (H200, 16k, t=1: LLM-like 3.42 vs
    3.18 ms, random 4.83 vs 4.66). The dense loop's schedule (tile c's Q.K^T issued with tile
    c-1's P.V, warpgroups taking turns) measured slower here (16k, t=1: LLM-like 3.87 vs 3.33
    ms, mixed 4.19 vs 3.92, random 4.88 vs 5.01): an async wgmma cannot leave the branch
    that issued it, so the P.V of a tile with one kept half had to cover both halves, and
    the test and softmax, written once per branch, doubled the code."""
    (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_empty, v_empty,
     b, h, hk, m0, seqlen_q, seqlen_k, p_o, p_lse, stride_os, stride_ls,
     scale_log2, p_skip_, stride_sm, softmax_threshold) = args
    for c in range(count):
        b_s = _finish_scores(_issue_scores(b_q, k_smem, k_ready, start + c, BLOCK_M, BLOCK_N,
                                           STAGES), k_empty, start + c, STAGES)
        flags, s0, s1, mx0, mx1 = _sparse_decide(
            b_s, b_thr, p_skip, _phase_tile(c, t_lo, PHASE), o_m, n_full, blocks, seqlen_k,
            dist_offset, scale_log2, BLOCK_M, BLOCK_N, IS_CAUSAL, PHASE)
        acc, m_i, l_i = _sparse_accumulate(acc, m_i, l_i, flags, s0, s1, mx0, mx1, v_smem,
                                           v_ready, v_empty, start + c, scale_log2, b_q.dtype,
                                           BLOCK_N, STAGES)
    return acc, m_i, l_i


@gluon.jit
def _phase_tile(c, t_lo, PHASE: gl.constexpr):
    """Key tile of the c-th position of a phase: phase 1 `_phase1_tile`, phase 2 tile c."""
    if PHASE == 1:
        return _phase1_tile(c, t_lo)
    else:
        return c


@gluon.jit
def _consumer(args, turn, gates, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
              STAGES: gl.constexpr, IS_CAUSAL: gl.constexpr, SPARSE: gl.constexpr,
              HAS_GATE: gl.constexpr, IS_LOGSIGMOID: gl.constexpr, WG: gl.constexpr):
    (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_empty, v_empty,
     b, h, hk, m0, seqlen_q, seqlen_k, p_o, p_lse, stride_os, stride_ls,
     scale_log2, p_skip, stride_sm, softmax_threshold) = args
    HEAD_DIM: gl.constexpr = q_desc.block_type.shape[3]
    # rows live in the layout of the score tiles: whole tiles (dense), half tiles (sparse)
    s_layout: gl.constexpr = _mma_layout(BLOCK_N // 2 if SPARSE else BLOCK_N)
    o_layout: gl.constexpr = _mma_layout(HEAD_DIM)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    dist_offset = seqlen_k - seqlen_q
    first = m0 + WG * BLOCK_M
    o_m = first + gl.arange(0, BLOCK_M, layout=row_s)  # [M] positions in the sequence
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=row_s)
    l_i = gl.full([BLOCK_M], 0.0, gl.float32, layout=row_s)
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=o_layout)
    n1, t_lo, n = _stream(m0, seqlen_q, seqlen_k, BLOCK_M, BLOCK_N, IS_CAUSAL, SPARSE)
    # tiles every row of this warpgroup sees whole run without the mask
    n_full = seqlen_k // BLOCK_N
    if IS_CAUSAL:
        n_full = gl.minimum(n_full, gl.maximum(first + dist_offset + 1, 0) // BLOCK_N)
    mbarrier.wait(q_bar, 0)
    b_q = q_smem.index(WG).reshape([BLOCK_M, HEAD_DIM])
    if SPARSE:
        blocks = _row_block(first, seqlen_q, seqlen_k, BLOCK_N // 2, IS_CAUSAL)
        p_skip = p_skip + (first // BLOCK_M) * stride_sm  # this row block's codes
        acc, m_i, l_i = _sparse_phase(acc, m_i, l_i, m_i, b_q, args, p_skip, 0, n1, t_lo, o_m,
                                      n_full, blocks, dist_offset, BLOCK_M, BLOCK_N, STAGES,
                                      IS_CAUSAL, 1)
        # per-row thresholds, as fwd.py's
        vis = gl.maximum(visible_count(o_m, dist_offset, seqlen_k, IS_CAUSAL, False, 0, 0, 0,
                                       0).to(gl.float32), 1.0)
        b_thr = softmax_skip_threshold(m_i, l_i, softmax_threshold, vis, o_m < seqlen_q)
        acc, m_i, l_i = _sparse_phase(acc, m_i, l_i, b_thr, b_q, args, p_skip, n1, n, t_lo, o_m,
                                      n_full, blocks, dist_offset, BLOCK_M, BLOCK_N, STAGES,
                                      IS_CAUSAL, 2)
    else:
        if HAS_GATE:  # this warpgroup's rows' alpha, loaded once
            b_alpha = gl.load(gates[0] + o_m.to(gl.int64) * gates[1], mask=o_m < seqlen_q,
                              other=0.0).to(gl.float32)
        else:
            b_alpha = m_i
        acc, m_i, l_i = _dense_loop(acc, m_i, l_i, b_q, args, turn, gates, b_alpha, n, o_m,
                                    n_full, dist_offset, BLOCK_M, BLOCK_N, STAGES, IS_CAUSAL,
                                    HAS_GATE, IS_LOGSIGMOID, WG)
    # epilogue: normalise, natural-log lse; rows with no visible key -> out 0, lse -inf
    has_key = l_i > 0.0
    l_safe = gl.where(has_key, l_i, 1.0)
    b_lse = gl.where(has_key, (m_i + gl.log2(l_safe)) * LN2, float("-inf"))
    gl.store(p_lse + o_m.to(gl.int64) * stride_ls, b_lse, mask=o_m < seqlen_q)
    # one reciprocal per row (not an IEEE division per element)
    b_o = acc * gl.convert_layout(1.0 / l_safe, row_o)[:, None]
    o_mo = first + gl.arange(0, BLOCK_M, layout=row_o)
    o_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    gl.store(p_o + o_mo.to(gl.int64)[:, None] * stride_os + o_d[None, :],
             b_o.to(p_o.dtype.element_ty), mask=(o_mo < seqlen_q)[:, None])


@gluon.jit
def _consumer_1(args, turn, gates, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                STAGES: gl.constexpr, IS_CAUSAL: gl.constexpr, SPARSE: gl.constexpr,
                HAS_GATE: gl.constexpr, IS_LOGSIGMOID: gl.constexpr):
    _consumer(args, turn, gates, BLOCK_M, BLOCK_N, STAGES, IS_CAUSAL, SPARSE, HAS_GATE,
              IS_LOGSIGMOID, 1)


@gluon.jit
def _attn_fwd_hopper_kernel(
    q_desc, k_desc, v_desc, d_desc, O, LSE, SKIP, ALPHA,
    stride_ob, stride_os, stride_oh, stride_lb, stride_lh, stride_ls,
    stride_sb, stride_sh, stride_sm, stride_ab, stride_ah, stride_as,
    seqlen_q, seqlen_k, scale_log2, H, GROUP, softmax_threshold,
    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
    IS_CAUSAL: gl.constexpr, SPARSE: gl.constexpr, HAS_GATE: gl.constexpr,
    IS_LOGSIGMOID: gl.constexpr, CONSUMER_REGS: gl.constexpr,
):
    # heavy (late, causal) query tiles first; the tiles of one head together
    n_m = gl.cdiv(seqlen_q, 2 * BLOCK_M)
    pid = gl.program_id(0)
    m0 = (n_m - 1 - pid % n_m) * 2 * BLOCK_M
    bh = pid // n_m
    b = bh // H
    h = bh % H
    hk = h // GROUP
    q_smem = gl.allocate_shared_memory(q_desc.dtype, [2] + q_desc.block_type.shape, q_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES] + k_desc.block_type.shape,
                                       k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES] + v_desc.block_type.shape,
                                       v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    mbarrier.init(turn.index(0), count=1)
    mbarrier.init(turn.index(1), count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=2)  # both consumers
        mbarrier.init(v_empty.index(i), count=2)
    fence_async_shared()
    p_o = O + b.to(gl.int64) * stride_ob + h * stride_oh
    p_lse = LSE + b.to(gl.int64) * stride_lb + h * stride_lh
    p_skip = SKIP + b.to(gl.int64) * stride_sb + h * stride_sh
    args = (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_empty,
            v_empty, b, h, hk, m0, seqlen_q, seqlen_k, p_o, p_lse, stride_os, stride_ls,
            scale_log2, p_skip, stride_sm, softmax_threshold)
    # gated: this head's alpha row; delta [B, Hkv, Sk] by TMA into a ring beside K's
    if HAS_GATE:
        d_smem = gl.allocate_shared_memory(d_desc.dtype, [STAGES] + d_desc.block_type.shape,
                                           d_desc.layout)
    else:
        d_smem = k_smem  # never read
    gates = (ALPHA + b.to(gl.int64) * stride_ab + h * stride_ah, stride_as, d_desc, d_smem)
    gl.warp_specialize([(_consumer, (args, turn, gates, BLOCK_M, BLOCK_N, STAGES, IS_CAUSAL,
                                     SPARSE, HAS_GATE, IS_LOGSIGMOID, 0)),
                        (_consumer_1, (args, turn, gates, BLOCK_M, BLOCK_N, STAGES, IS_CAUSAL,
                                       SPARSE, HAS_GATE, IS_LOGSIGMOID)),
                        (_producer, (args, gates, BLOCK_M, BLOCK_N, STAGES, IS_CAUSAL, SPARSE,
                                     HAS_GATE))],
                       [4, 1], [CONSUMER_REGS, 24])


@functools.lru_cache(maxsize=None)
def _smem_layout(rows: int, head_dim: int, dtype: torch.dtype):
    """The shared-memory layout of a [1, rows, 1, head_dim] TMA block (built once: its
    construction costs more host time than the rest of a launch's descriptors)."""
    return gl.NVMMASharedLayout.get_default_for(
        [1, rows, 1, head_dim], gl.bfloat16 if dtype == torch.bfloat16 else gl.float16)


def _descriptor(t, rows, head_dim):
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, rows, 1, head_dim],
                            _smem_layout(rows, head_dim, t.dtype))


@functools.lru_cache(maxsize=None)
def _row_layout(dtype: torch.dtype):
    """Shared layout of a [1, 1, block_n] delta block: unswizzled (one row of keys)."""
    return gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=dtype.itemsize * 8,
                                rank=3)


def _delta_descriptor(delta, block_n):
    """TMA descriptor of delta [B, Hkv, Sk], one [1, 1, block_n] block per key tile. A view
    TMA cannot address (e.g. the transpose of a [B, Sk, Hkv] tensor, or Sk rows not a multiple
    of 16 bytes) is first copied into a [B, Hkv, Sk] buffer with aligned rows (B * Hkv * Sk
    elements: far below the attention's own traffic); float64 delta into a float32 one (the
    kernels compute the gate in fp32 either way)."""
    dtype = torch.float32 if delta.dtype == torch.float64 else delta.dtype
    if dtype != delta.dtype or not configs._tma_ready(delta):
        sk = delta.shape[2]
        buf = torch.empty((*delta.shape[:2], sk + (-sk % 16)), dtype=dtype,
                          device=delta.device)[:, :, :sk]
        delta = buf.copy_(delta)
    return TensorDescriptor(delta, list(delta.shape), list(delta.stride()), [1, 1, block_n],
                            _row_layout(delta.dtype))


def launch_attn_fwd_hopper(q, k, v, out, lse, *, softmax_scale, is_causal, config,
                           softmax_threshold=0.0, skip=None, alpha=None, delta=None,
                           is_logsigmoid_gate=True):
    """Batched forward of q [B, Sq, H, D], k/v [B, Sk, Hkv, D] into out (like q) and
    lse [B, H, Sq] (fp32). softmax_threshold > 0: sparse (SPEC §5), with the skip codes of
    `fwd.py` into skip [B, H, cdiv(Sq, 64), cdiv(Sk, 64)] (uint8, zeros on entry).
    alpha [B, H, Sq] / delta [B, Hkv, Sk] (any strides): gated (SPEC §6) without gate
    sparsity and without softmax_threshold: every visible key is used, no codes."""
    batch, seqlen_q, num_heads, head_dim = q.shape
    seqlen_k, num_kv_heads = k.shape[1], k.shape[2]
    bm = config.block_m // 2  # rows per consumer warpgroup
    sparse = softmax_threshold > 0
    if sparse and (bm != 64 or config.block_n != 128 or skip is None):
        raise ValueError("the sparse Gluon forward takes 64-row warpgroups, 128-key tiles (two "
                         "64-key skip blocks) and a skip tensor")
    gated = alpha is not None
    if gated and sparse:
        raise ValueError("the Gluon forward runs gated attention without softmax_threshold")
    grid = (configs.cdiv(seqlen_q, config.block_m) * batch * num_heads,)
    k_desc = _descriptor(k, config.block_n, head_dim)
    launch(
        _attn_fwd_hopper_kernel, grid,
        _descriptor(q, bm, head_dim), k_desc, _descriptor(v, config.block_n, head_dim),
        _delta_descriptor(delta, config.block_n) if gated else k_desc, out, lse,
        skip if sparse else lse,
        alpha if gated else lse,
        out.stride(0), out.stride(1), out.stride(2), *lse.stride(),
        *(skip.stride()[:3] if sparse else (0, 0, 0)), *(alpha.stride() if gated else (0, 0, 0)),
        seqlen_q, seqlen_k, softmax_scale * 1.4426950408889634, num_heads,
        num_heads // num_kv_heads, float(softmax_threshold),
        BLOCK_M=bm, BLOCK_N=config.block_n, STAGES=config.num_stages, IS_CAUSAL=bool(is_causal),
        # consumer registers: the dense schedule keeps two score tiles and a P tile live
        # (measured at 240); sparse runs as measured fastest (232)
        SPARSE=sparse, HAS_GATE=gated, IS_LOGSIGMOID=bool(is_logsigmoid_gate),
        CONSUMER_REGS=232 if sparse else 240, num_warps=4,
    )
