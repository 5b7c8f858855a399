"""Spike (not wired into the package): a warp-specialised Hopper forward in Gluon, to settle how
the sm_90 fast path should be written. Dense, causal or full, D=128, bf16, q [B, H, S, D] and
k/v [B, Hkv, S, D] contiguous, S a multiple of 128.

Structure: a CTA owns 128 query rows as two consumer warpgroups of 64 rows (the default
partition and one worker partition, 4 warps each) and one producer warp that issues the TMA
loads of Q (once) and of K/V into a ring of STAGES shared-memory buffers. `k_empty` / `v_empty`
(two arrivals: both consumers) give a K or V buffer back to the producer as soon as its last
wgmma has finished. The two consumers have independent instruction streams, so the softmax of
one overlaps the other's wgmma through the warp scheduler (no named-barrier ping-pong).
PIPE=True adds FA3's intra-warpgroup pipeline (Q.K^T of tile j+1 and P.V of tile j-1 in flight
during the softmax of tile j).

Measured on the H200 (python scripts/spikes/probe_gluon.py; same run, B*S = 16k tokens, H=32,
Hkv=8, causal; outputs within bf16 rounding of float64 and of the package's forward):
  16k: cuDNN 3.83-3.84 ms, package TMA path 4.46-4.50, this spike 4.04-4.08 (0.94-0.95x
       cuDNN), PIPE 4.35-4.37, 64-key tiles 4.38-5.02
  4k:  cuDNN 1.02, package TMA path 1.23-1.24, this spike 1.11-1.17, PIPE 1.24
Also checked (offline, both Tritons): a @gluon.jit kernel can call the package's @triton.jit
helpers (triton/common.py `visible`, `gate`), so a Gluon path can share masks and gate math
with the portable family. Triton 3.6 names the TMA load `async_copy_global_to_shared`; later
releases `async_load` (the alias below).
"""
import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
from triton.experimental.gluon.language.nvidia.hopper import (tma, mbarrier, fence_async_shared,
                                                              warpgroup_mma, warpgroup_mma_wait)

# Triton 3.6 names the TMA load async_copy_global_to_shared; later releases async_load
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared


@gluon.jit
def _n_tiles(m0, BLOCK_M2: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr, seqlen):
    if CAUSAL:
        return gl.cdiv(gl.minimum(m0 + BLOCK_M2, seqlen), BLOCK_N)
    return gl.cdiv(seqlen, BLOCK_N)


@gluon.jit
def _producer(args, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
              CAUSAL: gl.constexpr, PIPE: gl.constexpr):
    (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_empty, v_empty,
     q_row, kv_row, m0, seqlen, o_ptr, lse_ptr, scale_log2) = args
    mbarrier.expect(q_bar, 2 * q_desc.block_type.nbytes)
    _tma_load(q_desc, [q_row, 0], q_bar, q_smem.index(0))
    _tma_load(q_desc, [q_row + BLOCK_M, 0], q_bar, q_smem.index(1))
    n = _n_tiles(m0, 2 * BLOCK_M, BLOCK_N, CAUSAL, seqlen)
    for j in range(n):
        s = j % STAGES
        ph = (j // STAGES) & 1
        mbarrier.wait(k_empty.index(s), ph ^ 1)
        mbarrier.expect(k_ready.index(s), k_desc.block_type.nbytes)
        _tma_load(k_desc, [kv_row + j * BLOCK_N, 0], k_ready.index(s), k_smem.index(s))
        mbarrier.wait(v_empty.index(s), ph ^ 1)
        mbarrier.expect(v_ready.index(s), v_desc.block_type.nbytes)
        _tma_load(v_desc, [kv_row + j * BLOCK_N, 0], v_ready.index(s), v_smem.index(s))


@gluon.jit
def _consumer(args, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
              CAUSAL: gl.constexpr, PIPE: gl.constexpr, WG: gl.constexpr):
    (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_empty, v_empty,
     q_row, kv_row, m0, seqlen, o_ptr, lse_ptr, scale_log2) = args
    D: gl.constexpr = q_desc.block_type.shape[1]
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_l: gl.constexpr = gl.SliceLayout(1, s_layout)
    col_l: gl.constexpr = gl.SliceLayout(0, s_layout)
    rows = m0 + WG * BLOCK_M + gl.arange(0, BLOCK_M, layout=row_l)
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=row_l)
    l_i = gl.full([BLOCK_M], 0.0, gl.float32, layout=row_l)
    acc = gl.zeros([BLOCK_M, D], gl.float32, layout=o_layout)
    zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
    mbarrier.wait(q_bar, 0)
    q = q_smem.index(WG)
    n = _n_tiles(m0, 2 * BLOCK_M, BLOCK_N, CAUSAL, seqlen)
    # tiles before the first row of this warpgroup need no mask
    n_full = (m0 + WG * BLOCK_M + 1) // BLOCK_N if CAUSAL else n
    if PIPE:
        # intra-warpgroup pipeline: Q.K^T of tile j + 1 and P.V of tile j - 1 run on the tensor
        # cores while this warpgroup does the softmax of tile j
        mbarrier.wait(k_ready.index(0), 0)
        sc = warpgroup_mma(q, k_smem.index(0).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        sc = warpgroup_mma_wait(0, deps=[sc])
        mbarrier.arrive(k_empty.index(0), count=1)
        for j in range(n):
            s = j % STAGES
            ph = (j // STAGES) & 1
            sc = sc * scale_log2
            if CAUSAL:
                if j >= n_full:
                    cols = j * BLOCK_N + gl.arange(0, BLOCK_N, layout=col_l)
                    sc = gl.where(rows[:, None] >= cols[None, :], sc, float("-inf"))
            m_new = gl.maximum(m_i, gl.max(sc, 1))
            p = gl.exp2(sc - m_new[:, None])
            r = gl.exp2(m_i - m_new)
            l_i = l_i * r + gl.sum(p, 1)
            m_i = m_new
            p16 = gl.convert_layout(p.to(gl.bfloat16), p_layout)
            # next tile's scores (the last iteration recomputes its own tile: its K stays held)
            jn = gl.minimum(j + 1, n - 1)
            sn = jn % STAGES
            mbarrier.wait(k_ready.index(sn), (jn // STAGES) & 1)
            sc_next = warpgroup_mma(q, k_smem.index(sn).permute((1, 0)), zero_s, use_acc=False,
                                    is_async=True)
            # P.V of tile j - 1 done: its V buffer goes back to the producer
            acc = warpgroup_mma_wait(1, deps=[acc])
            mbarrier.arrive(v_empty.index((j + STAGES - 1) % STAGES), count=1, pred=j > 0)
            acc = acc * gl.convert_layout(r, gl.SliceLayout(1, o_layout))[:, None]
            mbarrier.wait(v_ready.index(s), ph)
            acc = warpgroup_mma(p16, v_smem.index(s), acc, is_async=True)
            sc, acc = warpgroup_mma_wait(1, deps=[sc_next, acc])
            mbarrier.arrive(k_empty.index(sn), count=1, pred=j + 1 < n)
        acc = warpgroup_mma_wait(0, deps=[acc])
        mbarrier.arrive(v_empty.index((n - 1) % STAGES), count=1)
    else:
        for j in range(n):
            s = j % STAGES
            ph = (j // STAGES) & 1
            mbarrier.wait(k_ready.index(s), ph)
            sc = warpgroup_mma(q, k_smem.index(s).permute((1, 0)), zero_s, use_acc=False,
                               is_async=True)
            sc = warpgroup_mma_wait(0, deps=[sc])
            mbarrier.arrive(k_empty.index(s), count=1)
            sc = sc * scale_log2
            if CAUSAL:
                if j >= n_full:
                    cols = j * BLOCK_N + gl.arange(0, BLOCK_N, layout=col_l)
                    sc = gl.where(rows[:, None] >= cols[None, :], sc, float("-inf"))
            m_new = gl.maximum(m_i, gl.max(sc, 1))
            p = gl.exp2(sc - m_new[:, None])
            r = gl.exp2(m_i - m_new)
            l_i = l_i * r + gl.sum(p, 1)
            m_i = m_new
            acc = acc * gl.convert_layout(r, gl.SliceLayout(1, o_layout))[:, None]
            p16 = gl.convert_layout(p.to(gl.bfloat16), p_layout)
            mbarrier.wait(v_ready.index(s), ph)
            acc = warpgroup_mma(p16, v_smem.index(s), acc, is_async=True)
            acc = warpgroup_mma_wait(0, deps=[acc])
            mbarrier.arrive(v_empty.index(s), count=1)
    acc = acc / gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))[:, None]
    o_rows = q_row + WG * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, o_layout))
    o_cols = gl.arange(0, D, layout=gl.SliceLayout(0, o_layout))
    gl.store(o_ptr + o_rows.to(gl.int64)[:, None] * D + o_cols[None, :], acc.to(gl.bfloat16))
    lse = (m_i + gl.log2(l_i)) * 0.6931471805599453
    gl.store(lse_ptr + q_row + WG * BLOCK_M + gl.arange(0, BLOCK_M, layout=row_l), lse)


@gluon.jit
def _consumer1(args, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
               CAUSAL: gl.constexpr, PIPE: gl.constexpr):
    _consumer(args, BLOCK_M, BLOCK_N, STAGES, CAUSAL, PIPE, 1)


@gluon.jit
def _gluon_fwd_kernel(q_desc, k_desc, v_desc, o_ptr, lse_ptr, seqlen, H, GROUP, scale_log2,
                      BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                      CAUSAL: gl.constexpr, PIPE: gl.constexpr, CONSUMER_REGS: gl.constexpr):
    n_m = gl.cdiv(seqlen, 2 * BLOCK_M)
    pid = gl.program_id(0)
    tile = n_m - 1 - pid % n_m  # heavy tiles first
    bh = pid // n_m
    hk = (bh % H) // GROUP + (bh // H) * (H // GROUP)
    m0 = tile * 2 * BLOCK_M
    q_row = bh * seqlen + m0
    kv_row = hk * seqlen
    q_smem = gl.allocate_shared_memory(q_desc.dtype, [2] + q_desc.block_type.shape, q_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=2)
        mbarrier.init(v_empty.index(i), count=2)
    fence_async_shared()
    args = (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_empty,
            v_empty, q_row, kv_row, m0, seqlen, o_ptr, lse_ptr, scale_log2)
    gl.warp_specialize([(_consumer, (args, BLOCK_M, BLOCK_N, STAGES, CAUSAL, PIPE, 0)),
                        (_consumer1, (args, BLOCK_M, BLOCK_N, STAGES, CAUSAL, PIPE)),
                        (_producer, (args, BLOCK_M, BLOCK_N, STAGES, CAUSAL, PIPE))], [4, 1],
                       [CONSUMER_REGS, 24])


def gluon_fwd(q, k, v, causal=True, block_n=128, stages=2, maxnreg=None, pipe=False, regs=232):
    """q [B, H, S, D], k/v [B, Hkv, S, D] contiguous bf16; S a multiple of 128."""
    b, h, s, d = q.shape
    hkv = k.shape[1]
    bm = 64
    q2, k2, v2 = q.view(-1, d), k.reshape(-1, d), v.reshape(-1, d)
    lay_q = gl.NVMMASharedLayout.get_default_for([bm, d], gl.bfloat16)
    lay_k = gl.NVMMASharedLayout.get_default_for([block_n, d], gl.bfloat16)
    qd = TensorDescriptor.from_tensor(q2, [bm, d], lay_q)
    kd = TensorDescriptor.from_tensor(k2, [block_n, d], lay_k)
    vd = TensorDescriptor.from_tensor(v2, [block_n, d], lay_k)
    o = torch.empty_like(q)
    lse = torch.empty(b, h, s, device=q.device, dtype=torch.float32)
    grid = (triton.cdiv(s, 2 * bm) * b * h,)
    kw = dict(num_warps=4)
    if maxnreg:
        kw["maxnreg"] = maxnreg
    _gluon_fwd_kernel[grid](qd, kd, vd, o, lse, s, h, h // hkv, d ** -0.5 * 1.4426950408889634,
                            BLOCK_M=bm, BLOCK_N=block_n, STAGES=stages, CAUSAL=causal, PIPE=pipe,
                            CONSUMER_REGS=regs, **kw)
    return o, lse
