"""Hopper (sm_90) dense forward, warp-specialised, written in Gluon.

Notation
- A CTA owns 2 * BLOCK_M query rows of one (batch, query head): two consumer warpgroups of
  BLOCK_M = 64 rows each (the default partition, and one worker partition), plus one producer
  warp (a second worker partition) that issues every TMA load.
- The producer loads both Q tiles once (`q_bar`), then K and V tiles into rings of STAGES
  shared-memory buffers (`k_ready` / `v_ready`, with the bytes they expect). A consumer gives a
  K buffer back (`k_empty`) once its Q.K^T is done and a V buffer (`v_empty`) once its P.V is;
  each empty barrier waits for both consumers.
- Each consumer runs the online softmax of its own 64 rows with wgmma (`S = Q.K^T` from shared
  memory, `acc += P.V` with P in registers). The two consumers' instruction streams are
  independent, so one's softmax overlaps the other's tensor-core work.
- Masks and the online-softmax step are the portable family's (`common.visible`,
  `common.online_softmax_step`), called from Gluon: one copy of each.

Caution
- Dense, batched attention only (no gate, threshold, window, varlen or seqused_k), head dims 64
  and 128 (a power of two up to 128: the accumulator is one register tile per warpgroup);
  `configs.fwd_path` sends it D=128 only (D=64 measured faster on the TMA path of `fwd.py`)
  and everything else to that TMA path.
- Q/K/V rows past the tensors' ends read as zeros (TMA); rows past Sq are not stored.
- A row with no visible key (Sq > Sk, causal) gets out 0 and lse -inf, as in `fwd.py`.
- Triton 3.6 names the TMA load `async_copy_global_to_shared`, later releases `async_load`.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma,
                                                              warpgroup_mma, warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .common import LN2, online_softmax_step, visible

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
def _producer(args, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
              IS_CAUSAL: gl.constexpr):
    (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_empty, v_empty,
     b, h, hk, m0, seqlen_q, seqlen_k, p_o, p_lse, stride_os, stride_ls, scale_log2) = args
    mbarrier.expect(q_bar, 2 * q_desc.block_type.nbytes)
    _tma_load(q_desc, [b, m0, h, 0], q_bar, q_smem.index(0))
    _tma_load(q_desc, [b, m0 + BLOCK_M, h, 0], q_bar, q_smem.index(1))
    for j in range(_key_tiles(m0, seqlen_q, seqlen_k, BLOCK_M, BLOCK_N, IS_CAUSAL)):
        s = j % STAGES
        phase = (j // STAGES) & 1
        mbarrier.wait(k_empty.index(s), phase ^ 1)
        mbarrier.expect(k_ready.index(s), k_desc.block_type.nbytes)
        _tma_load(k_desc, [b, j * BLOCK_N, hk, 0], k_ready.index(s), k_smem.index(s))
        mbarrier.wait(v_empty.index(s), phase ^ 1)
        mbarrier.expect(v_ready.index(s), v_desc.block_type.nbytes)
        _tma_load(v_desc, [b, j * BLOCK_N, hk, 0], v_ready.index(s), v_smem.index(s))


@gluon.jit
def _consumer(args, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
              IS_CAUSAL: gl.constexpr, WG: gl.constexpr):
    (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_empty, v_empty,
     b, h, hk, m0, seqlen_q, seqlen_k, p_o, p_lse, stride_os, stride_ls, scale_log2) = args
    HEAD_DIM: gl.constexpr = q_desc.block_type.shape[3]
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    dist_offset = seqlen_k - seqlen_q
    first = m0 + WG * BLOCK_M
    o_m = first + gl.arange(0, BLOCK_M, layout=row_s)  # [M] positions in the sequence
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=row_s)
    l_i = gl.full([BLOCK_M], 0.0, gl.float32, layout=row_s)
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=o_layout)
    zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
    n = _key_tiles(m0, seqlen_q, seqlen_k, BLOCK_M, BLOCK_N, IS_CAUSAL)
    # tiles every row of this warpgroup sees whole run without the mask
    n_full = seqlen_k // BLOCK_N
    if IS_CAUSAL:
        n_full = gl.minimum(n_full, gl.maximum(first + dist_offset + 1, 0) // BLOCK_N)
    mbarrier.wait(q_bar, 0)
    b_q = q_smem.index(WG).reshape([BLOCK_M, HEAD_DIM])
    for j in range(n):
        s = j % STAGES
        phase = (j // STAGES) & 1
        mbarrier.wait(k_ready.index(s), phase)
        b_k = k_smem.index(s).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0))
        b_s = warpgroup_mma(b_q, b_k, zero_s, use_acc=False, is_async=True)
        b_s = warpgroup_mma_wait(0, deps=[b_s])
        mbarrier.arrive(k_empty.index(s), count=1)
        b_s = b_s * scale_log2
        if j >= n_full:
            o_n = j * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
            m_vis = visible(o_m, o_n, dist_offset, seqlen_k, IS_CAUSAL, False, 0, 0, 0, 0)
            b_s = gl.where(m_vis, b_s, float("-inf"))
        b_p, m_i, l_i, b_r = online_softmax_step(b_s, m_i, l_i)
        acc = acc * gl.convert_layout(b_r, row_o)[:, None]
        b_p = gl.convert_layout(b_p.to(q_desc.dtype), p_layout)
        mbarrier.wait(v_ready.index(s), phase)
        acc = warpgroup_mma(b_p, v_smem.index(s).reshape([BLOCK_N, HEAD_DIM]), acc, is_async=True)
        acc = warpgroup_mma_wait(0, deps=[acc])
        mbarrier.arrive(v_empty.index(s), count=1)
    # epilogue: normalise, natural-log lse; rows with no visible key -> out 0, lse -inf
    has_key = l_i > 0.0
    l_safe = gl.where(has_key, l_i, 1.0)
    b_lse = gl.where(has_key, (m_i + gl.log2(l_safe)) * LN2, float("-inf"))
    gl.store(p_lse + o_m.to(gl.int64) * stride_ls, b_lse, mask=o_m < seqlen_q)
    b_o = acc / gl.convert_layout(l_safe, row_o)[:, None]
    o_mo = first + gl.arange(0, BLOCK_M, layout=row_o)
    o_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    gl.store(p_o + o_mo.to(gl.int64)[:, None] * stride_os + o_d[None, :],
             b_o.to(p_o.dtype.element_ty), mask=(o_mo < seqlen_q)[:, None])


@gluon.jit
def _consumer_1(args, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                IS_CAUSAL: gl.constexpr):
    _consumer(args, BLOCK_M, BLOCK_N, STAGES, IS_CAUSAL, 1)


@gluon.jit
def _attn_fwd_hopper_kernel(
    q_desc, k_desc, v_desc, O, LSE,
    stride_ob, stride_os, stride_oh, stride_lb, stride_lh, stride_ls,
    seqlen_q, seqlen_k, scale_log2, H, GROUP,
    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
    IS_CAUSAL: gl.constexpr, CONSUMER_REGS: gl.constexpr,
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
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=2)  # both consumers
        mbarrier.init(v_empty.index(i), count=2)
    fence_async_shared()
    p_o = O + b.to(gl.int64) * stride_ob + h * stride_oh
    p_lse = LSE + b.to(gl.int64) * stride_lb + h * stride_lh
    args = (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_empty,
            v_empty, b, h, hk, m0, seqlen_q, seqlen_k, p_o, p_lse, stride_os, stride_ls,
            scale_log2)
    gl.warp_specialize([(_consumer, (args, BLOCK_M, BLOCK_N, STAGES, IS_CAUSAL, 0)),
                        (_consumer_1, (args, BLOCK_M, BLOCK_N, STAGES, IS_CAUSAL)),
                        (_producer, (args, BLOCK_M, BLOCK_N, STAGES, IS_CAUSAL))],
                       [4, 1], [CONSUMER_REGS, 24])


def _descriptor(t, rows, head_dim):
    block = [1, rows, 1, head_dim]
    layout = gl.NVMMASharedLayout.get_default_for(block, gl.bfloat16 if t.dtype == torch.bfloat16
                                                  else gl.float16)
    return TensorDescriptor(t, list(t.shape), list(t.stride()), block, layout)


def launch_attn_fwd_hopper(q, k, v, out, lse, *, softmax_scale, is_causal, config):
    """Dense batched forward of q [B, Sq, H, D], k/v [B, Sk, Hkv, D] into out (like q) and
    lse [B, H, Sq] (fp32)."""
    batch, seqlen_q, num_heads, head_dim = q.shape
    seqlen_k, num_kv_heads = k.shape[1], k.shape[2]
    bm = config.block_m // 2  # rows per consumer warpgroup
    grid = (triton.cdiv(seqlen_q, config.block_m) * batch * num_heads,)
    _attn_fwd_hopper_kernel[grid](
        _descriptor(q, bm, head_dim), _descriptor(k, config.block_n, head_dim),
        _descriptor(v, config.block_n, head_dim), out, lse,
        out.stride(0), out.stride(1), out.stride(2), *lse.stride(),
        seqlen_q, seqlen_k, softmax_scale * 1.4426950408889634, num_heads,
        num_heads // num_kv_heads,
        BLOCK_M=bm, BLOCK_N=config.block_n, STAGES=config.num_stages, IS_CAUSAL=bool(is_causal),
        CONSUMER_REGS=232, num_warps=4,
    )
