"""Hopper (sm_90) backward, warp-specialised, written in Gluon: dK/dV, and dQ where the head dim
allows, of dense, sparse and gated attention (SPEC §4, §5, §6).

Notation
- A CTA owns BLOCK_N = 128 keys of one (batch, KV head): two consumer warpgroups of HALF = 64
  keys each (the default partition and one worker partition), plus one producer warp that
  issues every TMA load. Each warpgroup keeps its keys' dK and dV (fp32, [64, D]) in registers
  over the whole stream: the query tiles (BLOCK_M = 64 rows) of every query head of the group
  that can see the CTA's keys, so dK/dV need no atomics (GQA sums in registers).
- The producer loads K and V once (`kv_bar`), then Q and dO of each stream position into a
  ring of STAGES buffers (`q_ready`, given back through `q_empty` by both consumers).
- Per position a warpgroup computes, transposed so that P^T and dS^T feed dV and dK directly:
  S^T = K Q^T, dP^T = V dO^T (issued together), P^T = exp2(S^T * scale_log2 - lse2),
  dV += P^T dO, dS^T = P^T * (dP^T - Di), dK += dS^T Q. `lse2` and `Di` come from the
  portable family's preprocess (`bwd.py`).
- dQ (ATOMIC_DQ): a third warpgroup (worker partition) owns it. Each consumer stores its dS^T
  half into shared memory (`ds_smem`, two buffers; `ds_full` counts both halves, `ds_empty`
  gives a buffer back) and goes on; the dQ warpgroup runs dQ = dS K over all 128 keys with
  wgmma, 64 columns at a time, and adds it to the fp32 dQ accumulator with atomics: one dQ per
  tile pair, 5 matmuls in all, and the consumers never wait for each other (with each
  consumer computing half of dQ's columns after a barrier between the two, 16k causal D=128
  took 14.6 ms against 7.25 for dK/dV alone: the lockstep, not the atomics, plain stores gave
  13.5). The dQ warpgroup's registers come out of the consumers': used at D=64 only
  (`configs.HOPPER_BWD_DQ` has the numbers). ATOMIC_DQ off (D=128, deterministic=True): dQ is
  left to `bwd.py`'s deterministic pass, this kernel computes dK/dV only.
- Sparse (HAS_SKIP): the stream walks the query tiles of the forward's kept lists
  (`bwd._kept_tile_lists`, 64 x 128 tiles: a tile pair whose two blocks were both skipped is
  never visited); a warpgroup's 64 keys are exactly one skip block, and a block the forward
  skipped inside a visited pair gets P = 0 (masked, exact).
- Gated (HAS_GATE): each warpgroup loads its keys' delta once and each stream position's
  alpha (one value per thread, like lse2); the scores are K Q^T + g^T with g the portable
  family's gate (`common.gate_2d`), and the warpgroup sums ddelta of its keys over the stream
  (dS^T * g' * alpha, g' from `common.gate_grad_2d`, taken before the dP^T wait so that g dies
  early: keeping g across it spilled 840 bytes, this 540). dalpha, a sum over keys, is the dQ
  pass's, so gated never uses the atomic dQ warpgroup.
- Masks and the query tiles a key tile visits are the portable family's (`common.visible_2d`,
  `bwd._query_ranges`), called from Gluon.

Caution
- Batched attention only (no window, varlen or seqused_k; gated without the gate test, see
  `bwd.py`), head dims 64 and 128
  (`configs.HOPPER_BWD_DQ`, which also says how each makes dQ), bf16/fp16; `configs.bwd_path`
  sends everything else to `bwd.py`.
- K/V/Q/dO rows past the tensors' ends read as zeros (TMA) and are masked: keys past Sk by the
  mask, queries past Sq by lse2 = +inf (P = 0).
- Atomic dQ makes dq's low bits depend on scheduling (deterministic=True avoids it).
- Triton 3.6 names the partition barrier `thread_barrier`, later releases `barrier`.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier,
                                                              warpgroup_mma, warpgroup_mma_wait)

from . import configs
from .bwd import _query_ranges
from .common import gate_2d, gate_grad_2d, visible_2d
from .hopper import _descriptor, _mma_layout, _tma_load
from .launch import launch

# a barrier over the calling partition's warps: Triton 3.6 `thread_barrier`, later `barrier`
_warps_barrier = getattr(gl, "thread_barrier", None) or gl.barrier


@gluon.jit
def _query_tiles(n0, seqlen_q, seqlen_k, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                 IS_CAUSAL: gl.constexpr):
    """The portable backward's query-tile rule (`bwd._query_ranges`) for the BLOCK_N keys from
    n0, in tiles: (m_lo, m_mask, n_m): the tiles [m_lo, n_m) see some key, those below m_mask
    need the mask (the diagonal, or every tile for keys past Sk)."""
    whole, edges = _query_ranges(n0, seqlen_q, seqlen_k, seqlen_k - seqlen_q, 0, 0, 0, 0,
                                 BLOCK_M, BLOCK_N, IS_CAUSAL, False)
    return edges[0][0] // BLOCK_M, edges[1][0] // BLOCK_M, whole[1][0] // BLOCK_M


@gluon.jit
def _stream_len(p_count, stride_ch, g, m_lo, n_m, HAS_SKIP: gl.constexpr):
    """Positions of query head g of the group in the stream: its listed query tiles (sparse)
    or every tile of [m_lo, n_m)."""
    if HAS_SKIP:
        return gl.load(p_count + g * stride_ch)
    else:
        return n_m - m_lo


@gluon.jit
def _stream_tile(p_list, stride_lh, g, c, m_lo, HAS_SKIP: gl.constexpr):
    """Query tile of the c-th position of query head g."""
    if HAS_SKIP:
        return gl.load(p_list + g * stride_lh + c).to(gl.int32)
    else:
        return m_lo + c


@gluon.jit
def _bwd_producer(args, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                  IS_CAUSAL: gl.constexpr, HAS_SKIP: gl.constexpr):
    (desc, q_smem, do_smem, k_smem, v_smem, ds_smem, kv_bar, q_ready, q_empty, ds_full,
     ds_empty, b, hk, n0, seqlen_q, seqlen_k, GROUP, pointers, strides, scales) = args
    q_desc, k_desc, v_desc, do_desc = desc
    p_list, p_count = pointers[6], pointers[7]
    stride_lst, stride_ch = strides[8], strides[9]
    HALF: gl.constexpr = BLOCK_N // 2
    mbarrier.expect(kv_bar, 4 * k_desc.block_type.nbytes)
    for w in gl.static_range(2):
        _tma_load(k_desc, [b, n0 + w * HALF, hk, 0], kv_bar, k_smem.index(w))
        _tma_load(v_desc, [b, n0 + w * HALF, hk, 0], kv_bar, v_smem.index(w))
    m_lo, _, n_m = _query_tiles(n0, seqlen_q, seqlen_k, BLOCK_M, BLOCK_N, IS_CAUSAL)
    i = 0
    for g in range(GROUP):
        h = hk * GROUP + g
        for c in range(_stream_len(p_count, stride_ch, g, m_lo, n_m, HAS_SKIP)):
            m = _stream_tile(p_list, stride_lst, g, c, m_lo, HAS_SKIP)
            s = i % STAGES
            mbarrier.wait(q_empty.index(s), ((i // STAGES) & 1) ^ 1)
            mbarrier.expect(q_ready.index(s), 2 * q_desc.block_type.nbytes)
            _tma_load(q_desc, [b, m * BLOCK_M, h, 0], q_ready.index(s), q_smem.index(s))
            _tma_load(do_desc, [b, m * BLOCK_M, h, 0], q_ready.index(s), do_smem.index(s))
            i += 1


@gluon.jit
def _block_kept(p_skip, stride_sh, stride_sm, g, m, kb, BLOCK_M: gl.constexpr,
                SKIP_M: gl.constexpr, HAS_SKIP: gl.constexpr):
    """Whether the forward kept skip block (row of query tile m, key block kb) of head g."""
    if HAS_SKIP:
        code = gl.load(p_skip + g * stride_sh + (m * BLOCK_M // SKIP_M) * stride_sm + kb)
        return code == 1
    else:
        return True


@gluon.jit
def _dq_chunk(ds_smem, k_smem, d, c0: gl.constexpr, BLOCK_M: gl.constexpr,
              HEAD_DIM: gl.constexpr):
    """Columns [c0, c0 + 64) of dQ = dS K for one query tile over the CTA's 128 keys: the two
    dS^T halves in ds_smem buffer d against the matching K halves (fp32 [BLOCK_M, 64])."""
    HALF: gl.constexpr = ds_smem.shape[1]
    CW: gl.constexpr = 64 if HEAD_DIM > 64 else HEAD_DIM
    b_dq = warpgroup_mma(ds_smem.index(2 * d).permute((1, 0)),  # dS [BLOCK_M, HALF], keys 0..63
                         k_smem.index(0).reshape([HALF, HEAD_DIM]).slice(c0, CW, dim=1),
                         gl.zeros([BLOCK_M, CW], gl.float32, layout=_mma_layout(CW)),
                         use_acc=False, is_async=True)
    b_dq = warpgroup_mma(ds_smem.index(2 * d + 1).permute((1, 0)),
                         k_smem.index(1).reshape([HALF, HEAD_DIM]).slice(c0, CW, dim=1), b_dq,
                         is_async=True)
    return warpgroup_mma_wait(0, deps=[b_dq])


@gluon.jit
def _dq_add(b_dq, p_dq, stride_dqs, m, c0: gl.constexpr, dq_scale):
    """Add columns [c0, c0 + 64) of query tile m's dQ to the fp32 accumulator (no mask: its
    rows are padded to whole query tiles)."""
    BLOCK_M: gl.constexpr = b_dq.shape[0]
    CW: gl.constexpr = b_dq.shape[1]
    q_layout: gl.constexpr = _mma_layout(CW)
    o_q = m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, q_layout))
    o_d = c0 + gl.arange(0, CW, layout=gl.SliceLayout(0, q_layout))
    gl.atomic_add(p_dq + o_q.to(gl.int64)[:, None] * stride_dqs + o_d[None, :], b_dq * dq_scale,
                  sem="relaxed")


@gluon.jit
def _bwd_dq_worker(args, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                   IS_CAUSAL: gl.constexpr, HAS_SKIP: gl.constexpr):
    """The dQ warpgroup: per stream position, once both consumers stored their dS^T halves
    (`ds_full`), dQ = dS K over the CTA's 128 keys, 64 columns at a time, added to the fp32
    accumulator with atomics; the buffer goes back (`ds_empty`) once its matmuls are done."""
    (desc, q_smem, do_smem, k_smem, v_smem, ds_smem, kv_bar, q_ready, q_empty, ds_full,
     ds_empty, b, hk, n0, seqlen_q, seqlen_k, GROUP, pointers, strides, scales) = args
    p_dq, p_list, p_count = pointers[2], pointers[6], pointers[7]
    stride_dqh, stride_dqs, stride_lst, stride_ch = strides[2], strides[3], strides[8], strides[9]
    HEAD_DIM: gl.constexpr = desc[0].block_type.shape[3]
    CW: gl.constexpr = 64 if HEAD_DIM > 64 else HEAD_DIM
    mbarrier.wait(kv_bar, 0)
    m_lo, _, n_m = _query_tiles(n0, seqlen_q, seqlen_k, BLOCK_M, BLOCK_N, IS_CAUSAL)
    i = 0
    for g in range(GROUP):
        for c in range(_stream_len(p_count, stride_ch, g, m_lo, n_m, HAS_SKIP)):
            m = _stream_tile(p_list, stride_lst, g, c, m_lo, HAS_SKIP)
            d = i % 2
            mbarrier.wait(ds_full.index(d), (i // 2) & 1)
            for c0 in gl.static_range(0, HEAD_DIM, CW):
                b_dq = _dq_chunk(ds_smem, k_smem, d, c0, BLOCK_M, HEAD_DIM)
                if c0 + CW == HEAD_DIM:
                    mbarrier.arrive(ds_empty.index(d), count=1)
                _dq_add(b_dq, p_dq + g * stride_dqh, stride_dqs, m, c0, scales[0])
            i += 1


@gluon.jit
def _tile_grads(b_dk, b_dv, b_ddelta, b_k, b_v, q_buf, do_buf, b_lse2, b_di, b_alpha, b_delta,
                o_k, m, m_mask, kept, dist_offset, seqlen_k, scale_log2,
                IS_CAUSAL: gl.constexpr, HAS_SKIP: gl.constexpr, HAS_GATE: gl.constexpr,
                IS_LOGSIGMOID: gl.constexpr):
    """One stream position of a warpgroup: dV += P^T dO and dK += dS^T Q (unscaled) for its
    keys b_k/b_v against the query tile in q_buf/do_buf; returns dK, dV, ddelta and dS^T
    (bf16, for the tile's dQ). HAS_SKIP: a block the forward skipped (not `kept`) gets P = 0,
    so it adds nothing (a branch around the matmuls instead crashed Triton 3.6's ptxas, CUDA
    12.8). HAS_GATE (SPEC §6): the scores are K Q^T + g^T, g = `common.gate_2d` of
    delta_k * alpha_q, and ddelta of the warpgroup's keys (unscaled) gains the row sums of
    dS^T * g' * alpha (dalpha, a sum over keys, is the dQ pass's)."""
    HALF: gl.constexpr = b_k.shape[0]
    HEAD_DIM: gl.constexpr = b_k.shape[1]
    BLOCK_M: gl.constexpr = q_buf.shape[1]
    dtype: gl.constexpr = q_buf.dtype
    st_layout: gl.constexpr = _mma_layout(BLOCK_M)
    op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=_mma_layout(HEAD_DIM),
                                                  k_width=2)
    b_q = q_buf.reshape([BLOCK_M, HEAD_DIM])
    b_do = do_buf.reshape([BLOCK_M, HEAD_DIM])
    zero_s = gl.zeros([HALF, BLOCK_M], gl.float32, layout=st_layout)
    b_st = warpgroup_mma(b_k, b_q.permute((1, 0)), zero_s, use_acc=False, is_async=True)
    b_dpt = warpgroup_mma(b_v, b_do.permute((1, 0)), zero_s, use_acc=False, is_async=True)
    col: gl.constexpr = gl.SliceLayout(0, st_layout)
    b_st = warpgroup_mma_wait(1, deps=[b_st])
    if HAS_GATE:
        a_col = gl.convert_layout(b_alpha, col)
        b_g = gate_2d(b_delta[:, None] * a_col[None, :], IS_LOGSIGMOID)
        b_st = b_st + b_g
        if IS_LOGSIGMOID:  # g' * alpha, ddelta's weights (g itself dies here)
            b_w = gate_grad_2d(b_g, True) * a_col[None, :]
        else:
            b_w = a_col[None, :]
    x = b_st * scale_log2 - gl.convert_layout(b_lse2, col)[None, :]
    if m < m_mask:
        o_q = m * BLOCK_M + gl.arange(0, BLOCK_M, layout=col)
        x = gl.where(visible_2d(o_q[None, :], o_k[:, None], dist_offset, seqlen_k, IS_CAUSAL,
                                False, 0, 0, 0, 0), x, float("-inf"))
    if HAS_SKIP:
        x = gl.where(kept, x, float("-inf"))
    b_pt = gl.exp2(x)
    b_dv = warpgroup_mma(gl.convert_layout(b_pt.to(dtype), op_layout), b_do, b_dv,
                         is_async=True)
    # dP^T and dV done: P^T's bf16 operand registers are free before dS^T needs its own
    b_dpt, b_dv = warpgroup_mma_wait(0, deps=[b_dpt, b_dv])
    b_ds = b_pt * (b_dpt - gl.convert_layout(b_di, col)[None, :])
    b_dst = b_ds.to(dtype)
    b_dk = warpgroup_mma(gl.convert_layout(b_dst, op_layout), b_q, b_dk, is_async=True)
    if HAS_GATE:  # while dK's wgmma runs
        b_ddelta += gl.sum(b_ds * b_w, 1)
    b_dk = warpgroup_mma_wait(0, deps=[b_dk])
    return b_dk, b_dv, b_ddelta, b_dst


@gluon.jit
def _bwd_consumer(args, gates, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                  STAGES: gl.constexpr, IS_CAUSAL: gl.constexpr, HAS_SKIP: gl.constexpr,
                  ATOMIC_DQ: gl.constexpr, SKIP_M: gl.constexpr, HAS_GATE: gl.constexpr,
                  IS_LOGSIGMOID: gl.constexpr, WG: gl.constexpr):
    (desc, q_smem, do_smem, k_smem, v_smem, ds_smem, kv_bar, q_ready, q_empty, ds_full,
     ds_empty, b, hk, n0, seqlen_q, seqlen_k, GROUP, pointers, strides, scales) = args
    (p_lse2, p_di, p_dq, p_dk, p_dv, p_skip, p_list, p_count) = pointers
    (stride_lh, stride_ls, stride_dqh, stride_dqs, stride_dks, stride_dvs, stride_sh,
     stride_sm, stride_lst, stride_ch) = strides
    softmax_scale, scale_log2 = scales
    HEAD_DIM: gl.constexpr = desc[0].block_type.shape[3]
    HALF: gl.constexpr = BLOCK_N // 2
    st_layout: gl.constexpr = _mma_layout(BLOCK_M)  # [HALF keys, BLOCK_M queries]
    o_layout: gl.constexpr = _mma_layout(HEAD_DIM)  # [HALF keys, HEAD_DIM]: dK, dV
    lin: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
    dist_offset = seqlen_k - seqlen_q
    k_first = n0 + WG * HALF
    o_k = k_first + gl.arange(0, HALF, layout=gl.SliceLayout(1, st_layout))
    # query tiles below m_mask need the mask against this warpgroup's keys
    _, m_mask, _ = _query_tiles(k_first, seqlen_q, seqlen_k, BLOCK_M, HALF, IS_CAUSAL)
    b_dk = gl.zeros([HALF, HEAD_DIM], gl.float32, layout=o_layout)
    b_dv = gl.zeros([HALF, HEAD_DIM], gl.float32, layout=o_layout)
    b_ddelta = gl.zeros([HALF], gl.float32, layout=gl.SliceLayout(1, st_layout))
    p_alpha, stride_ah, stride_as, p_delta, stride_ds, p_ddelta, stride_dds = gates
    if HAS_GATE:  # this warpgroup's keys' delta (0 past Sk, where keys are masked)
        b_delta = gl.load(p_delta + o_k * stride_ds, mask=o_k < seqlen_k,
                          other=0.0).to(gl.float32)
    else:
        b_delta = b_ddelta
    mbarrier.wait(kv_bar, 0)
    b_k = k_smem.index(WG).reshape([HALF, HEAD_DIM])
    b_v = v_smem.index(WG).reshape([HALF, HEAD_DIM])
    m_lo, _, n_m = _query_tiles(n0, seqlen_q, seqlen_k, BLOCK_M, BLOCK_N, IS_CAUSAL)
    i = 0
    for g in range(GROUP):
        for c in range(_stream_len(p_count, stride_ch, g, m_lo, n_m, HAS_SKIP)):
            m = _stream_tile(p_list, stride_lst, g, c, m_lo, HAS_SKIP)
            kept = _block_kept(p_skip, stride_sh, stride_sm, g, m, n0 // HALF + WG, BLOCK_M,
                               SKIP_M, HAS_SKIP)
            s = i % STAGES
            # lse2 and Di of the tile's rows, loaded one value per thread (the score tile's
            # column layout would hold 16 per thread, and as many 64-bit addresses)
            o_ql = m * BLOCK_M + gl.arange(0, BLOCK_M, layout=lin)
            off_l = g * stride_lh + o_ql * stride_ls
            b_lse2 = gl.load(p_lse2 + off_l, mask=o_ql < seqlen_q, other=float("inf"))
            b_di = gl.load(p_di + off_l, mask=o_ql < seqlen_q, other=0.0)
            if HAS_GATE:
                b_alpha = gl.load(p_alpha + g * stride_ah + o_ql * stride_as,
                                  mask=o_ql < seqlen_q, other=0.0).to(gl.float32)
            else:
                b_alpha = b_di
            mbarrier.wait(q_ready.index(s), (i // STAGES) & 1)
            b_dk, b_dv, b_ddelta, b_dst = _tile_grads(
                b_dk, b_dv, b_ddelta, b_k, b_v, q_smem.index(s), do_smem.index(s), b_lse2, b_di,
                b_alpha, b_delta, o_k, m, m_mask, kept, dist_offset, seqlen_k, scale_log2,
                IS_CAUSAL, HAS_SKIP, HAS_GATE, IS_LOGSIGMOID)
            mbarrier.arrive(q_empty.index(s), count=1)
            if ATOMIC_DQ:
                # this warpgroup's dS^T half for the dQ warpgroup (buffer i % 2, once free)
                d = i % 2
                mbarrier.wait(ds_empty.index(d), ((i // 2) & 1) ^ 1)
                ds_smem.index(2 * d + WG).store(b_dst)
                fence_async_shared()
                _warps_barrier()
                mbarrier.arrive(ds_full.index(d), count=1)
            i += 1
    # epilogue: dK (scaled) and dV of this warpgroup's keys
    o_kd = k_first + gl.arange(0, HALF, layout=gl.SliceLayout(1, o_layout))
    o_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    rows = o_kd.to(gl.int64)[:, None]
    gl.store(p_dk + rows * stride_dks + o_d[None, :],
             (b_dk * softmax_scale).to(p_dk.dtype.element_ty), mask=(o_kd < seqlen_k)[:, None])
    gl.store(p_dv + rows * stride_dvs + o_d[None, :], b_dv.to(p_dv.dtype.element_ty),
             mask=(o_kd < seqlen_k)[:, None])
    if HAS_GATE:
        gl.store(p_ddelta + o_k * stride_dds,
                 (b_ddelta * softmax_scale).to(p_ddelta.dtype.element_ty), mask=o_k < seqlen_k)


@gluon.jit
def _bwd_consumer_1(args, gates, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                    STAGES: gl.constexpr, IS_CAUSAL: gl.constexpr, HAS_SKIP: gl.constexpr,
                    ATOMIC_DQ: gl.constexpr, SKIP_M: gl.constexpr, HAS_GATE: gl.constexpr,
                    IS_LOGSIGMOID: gl.constexpr):
    _bwd_consumer(args, gates, BLOCK_M, BLOCK_N, STAGES, IS_CAUSAL, HAS_SKIP, ATOMIC_DQ, SKIP_M,
                  HAS_GATE, IS_LOGSIGMOID, 1)


@gluon.jit
def _attn_bwd_hopper_kernel(
    q_desc, k_desc, v_desc, do_desc, DQ, DK, DV, LSE2, DI, SKIP, LIST, COUNT, ALPHA, DELTA,
    DDELTA, stride_lb, stride_lh, stride_ls, stride_dqb, stride_dqs, stride_dqh,
    stride_dkb, stride_dks, stride_dkh, stride_dvb, stride_dvs, stride_dvh,
    stride_sb, stride_sh, stride_sm, stride_lstb, stride_lsth, stride_lstn, stride_cb,
    stride_ch, stride_ab, stride_ah, stride_as, stride_db, stride_dh, stride_ds, stride_ddb,
    stride_ddh, stride_dds,
    seqlen_q, seqlen_k, softmax_scale, scale_log2, H_KV, GROUP,
    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
    IS_CAUSAL: gl.constexpr, HAS_SKIP: gl.constexpr, ATOMIC_DQ: gl.constexpr,
    SKIP_M: gl.constexpr, HAS_GATE: gl.constexpr, IS_LOGSIGMOID: gl.constexpr,
    CONSUMER_REGS: gl.constexpr, DQ_REGS: gl.constexpr,
):
    # the key tiles of one KV head together (they share its Q/dO in L2), causal-heavy first
    n_n = gl.cdiv(seqlen_k, BLOCK_N)
    pid = gl.program_id(0)
    tile = pid % n_n
    bh = pid // n_n
    b = bh // H_KV
    hk = bh % H_KV
    n0 = tile * BLOCK_N
    HALF: gl.constexpr = BLOCK_N // 2
    q_smem = gl.allocate_shared_memory(q_desc.dtype, [STAGES] + q_desc.block_type.shape,
                                       q_desc.layout)
    do_smem = gl.allocate_shared_memory(do_desc.dtype, [STAGES] + do_desc.block_type.shape,
                                        do_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [2] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [2] + v_desc.block_type.shape, v_desc.layout)
    ds_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([HALF, BLOCK_M], q_desc.dtype)
    ds_smem = gl.allocate_shared_memory(q_desc.dtype, [4 if ATOMIC_DQ else 1, HALF, BLOCK_M],
                                        ds_layout)
    kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    q_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    ds_full = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    ds_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(kv_bar, count=1)
    for j in gl.static_range(STAGES):
        mbarrier.init(q_ready.index(j), count=1)
        mbarrier.init(q_empty.index(j), count=2)  # both consumers
    for j in gl.static_range(2):
        mbarrier.init(ds_full.index(j), count=2)  # both consumers' halves
        mbarrier.init(ds_empty.index(j), count=1)  # the dQ warpgroup
    fence_async_shared()
    h0 = hk * GROUP
    b64 = b.to(gl.int64)
    pointers = (LSE2 + b64 * stride_lb + h0 * stride_lh, DI + b64 * stride_lb + h0 * stride_lh,
                DQ + b64 * stride_dqb + h0 * stride_dqh,
                DK + b64 * stride_dkb + hk * stride_dkh, DV + b64 * stride_dvb + hk * stride_dvh,
                SKIP + b64 * stride_sb + h0 * stride_sh,
                LIST + b64 * stride_lstb + h0 * stride_lsth + tile * stride_lstn,
                COUNT + b64 * stride_cb + h0 * stride_ch + tile)
    strides = (stride_lh, stride_ls, stride_dqh, stride_dqs, stride_dks, stride_dvs, stride_sh,
               stride_sm, stride_lsth, stride_ch)
    args = ((q_desc, k_desc, v_desc, do_desc), q_smem, do_smem, k_smem, v_smem, ds_smem, kv_bar,
            q_ready, q_empty, ds_full, ds_empty, b, hk, n0, seqlen_q, seqlen_k, GROUP, pointers,
            strides, (softmax_scale, scale_log2))
    # gated: alpha [B, H, Sq] of the group's first query head, delta / ddelta [B, Hkv, Sk]
    gates = (ALPHA + b64 * stride_ab + h0 * stride_ah, stride_ah, stride_as,
             DELTA + b64 * stride_db + hk * stride_dh, stride_ds,
             DDELTA + b64 * stride_ddb + hk * stride_ddh, stride_dds)
    # (the two lists differ by the dQ warpgroup; Gluon cannot build a partition list in parts)
    if ATOMIC_DQ:
        gl.warp_specialize([
            (_bwd_consumer, (args, gates, BLOCK_M, BLOCK_N, STAGES, IS_CAUSAL, HAS_SKIP,
                             ATOMIC_DQ, SKIP_M, HAS_GATE, IS_LOGSIGMOID, 0)),
            (_bwd_consumer_1, (args, gates, BLOCK_M, BLOCK_N, STAGES, IS_CAUSAL, HAS_SKIP,
                               ATOMIC_DQ, SKIP_M, HAS_GATE, IS_LOGSIGMOID)),
            (_bwd_producer, (args, BLOCK_M, BLOCK_N, STAGES, IS_CAUSAL, HAS_SKIP)),
            (_bwd_dq_worker, (args, BLOCK_M, BLOCK_N, STAGES, IS_CAUSAL, HAS_SKIP))],
            [4, 1, 4], [CONSUMER_REGS, 24, DQ_REGS])
    else:
        gl.warp_specialize([
            (_bwd_consumer, (args, gates, BLOCK_M, BLOCK_N, STAGES, IS_CAUSAL, HAS_SKIP,
                             ATOMIC_DQ, SKIP_M, HAS_GATE, IS_LOGSIGMOID, 0)),
            (_bwd_consumer_1, (args, gates, BLOCK_M, BLOCK_N, STAGES, IS_CAUSAL, HAS_SKIP,
                               ATOMIC_DQ, SKIP_M, HAS_GATE, IS_LOGSIGMOID)),
            (_bwd_producer, (args, BLOCK_M, BLOCK_N, STAGES, IS_CAUSAL, HAS_SKIP))],
            [4, 1], [CONSUMER_REGS, 24])


def launch_attn_bwd_hopper(q, k, v, dout, dq, dk, dv, lse2, di, *, softmax_scale, is_causal,
                           atomic_dq, skip=None, lists=None, alpha=None, delta=None, ddelta=None,
                           is_logsigmoid_gate=True):
    """Batched backward of q/dout [B, Sq, H, D], k/v [B, Sk, Hkv, D]: dk/dv (like k/v) and,
    atomic_dq, dq += (fp32 [B, Sq, H, D], zeros on entry); lse2/di [B, H, Sq] from the
    preprocess. Sparse: skip (the forward's codes) and lists = (LIST, COUNT) of
    `bwd._kept_tile_lists` at 64 x 128 tiles. Gated: alpha [B, H, Sq], delta [B, Hkv, Sk] (any
    strides) and ddelta (like delta) written; dalpha is the dQ pass's (no atomic dQ)."""
    batch, seqlen_q, num_heads, head_dim = q.shape
    seqlen_k, num_kv_heads = k.shape[1], k.shape[2]
    block_m, block_n = configs.HOPPER_BWD_TILE
    has_skip = skip is not None
    lst, cnt = lists if has_skip else (lse2, lse2)
    gated = alpha is not None
    if gated and atomic_dq:
        raise ValueError("the gated Gluon backward leaves dQ and dalpha to the dQ pass")
    grid = (configs.cdiv(seqlen_k, block_n) * batch * num_kv_heads,)
    launch(
        _attn_bwd_hopper_kernel, grid,
        _descriptor(q, block_m, head_dim), _descriptor(k, block_n // 2, head_dim),
        _descriptor(v, block_n // 2, head_dim), _descriptor(dout, block_m, head_dim),
        dq if atomic_dq else dk, dk, dv, lse2, di, skip if has_skip else lse2, lst, cnt,
        *((alpha, delta, ddelta) if gated else (lse2, lse2, lse2)),
        *lse2.stride(), *(dq.stride()[:3] if atomic_dq else (0, 0, 0)), *dk.stride()[:3],
        *dv.stride()[:3], *(skip.stride()[:3] if has_skip else (0, 0, 0)),
        *(lst.stride()[:3] if has_skip else (0, 0, 0)), *(cnt.stride()[:2] if has_skip else (0, 0)),
        *(alpha.stride() + delta.stride() + ddelta.stride() if gated else (0,) * 9),
        seqlen_q, seqlen_k, float(softmax_scale), float(softmax_scale) * 1.4426950408889634,
        num_kv_heads, num_heads // num_kv_heads,
        BLOCK_M=block_m, BLOCK_N=block_n, STAGES=2, IS_CAUSAL=bool(is_causal),
        HAS_SKIP=has_skip, ATOMIC_DQ=bool(atomic_dq), SKIP_M=configs.skip_block_m(head_dim),
        HAS_GATE=gated, IS_LOGSIGMOID=bool(is_logsigmoid_gate),
        # registers: the two consumers, the producer warp (24) and the dQ warpgroup share the
        # 64K of an SM; measured (H200, 16k causal D=64): 208/88 6.65 ms, 216/72 6.69
        CONSUMER_REGS=208 if atomic_dq else 240, DQ_REGS=88, num_warps=4,
    )
