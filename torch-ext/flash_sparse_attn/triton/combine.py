"""Split-KV combine: merge the per-split partial results of the decode kernel exactly.

Notation
- Program pid = b * H + h: one (sequence, query head) row.
- Partials of split s: `o_s` [D] fp32, normalised by the split's own softmax sum, and `lse2_s`
  its log-sum-exp in base 2 (-inf when the split saw no key; then o_s = 0).
- Exact combine: M = max_s lse2_s, w_s = exp2(lse2_s - M), l = sum_s w_s,
  out = sum_s w_s * o_s / l, lse = (M + log2(l)) * ln(2) (natural log, as the API reports).

Caution
- A row whose splits all saw nothing gets out = 0 and lse = -inf (never NaN).
- Splits are read in chunks of BLOCK_S rows, so any split count works; the lse vector is read
  whole first (SPLITS_PAD = next power of two of num_splits, at most a few hundred).
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import configs
from .common import LN2, safe_max
from .launch import launch


@triton.jit
def _combine_kernel(
    O_PART, LSE_PART, O, LSE,
    stride_ob, stride_oh, stride_lb, stride_lh,
    H, num_splits,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    p_lse = LSE_PART + pid.to(tl.int64) * num_splits
    p_o = O_PART + pid.to(tl.int64) * num_splits * HEAD_DIM
    # [S] every split's lse (base 2): the max and the sum of weights
    o_s = tl.arange(0, SPLITS_PAD)
    b_lse = tl.load(p_lse + o_s, mask=o_s < num_splits, other=float("-inf"))
    m_all = safe_max(tl.max(b_lse, 0))
    l_all = tl.sum(tl.math.exp2(b_lse - m_all), 0)
    # weighted sum of the partial outputs, BLOCK_S splits at a time
    o_d = tl.arange(0, HEAD_DIM_PAD)
    acc = tl.zeros([HEAD_DIM_PAD], dtype=tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        o_c = s0 + tl.arange(0, BLOCK_S)
        c_ok = o_c < num_splits
        b_w = tl.math.exp2(tl.load(p_lse + o_c, mask=c_ok, other=float("-inf")) - m_all)  # [S]
        m_o = c_ok[:, None] & (o_d[None, :] < HEAD_DIM)
        b_o = tl.load(p_o + o_c[:, None] * HEAD_DIM + o_d[None, :], mask=m_o, other=0.0)
        acc += tl.sum(b_w[:, None] * b_o, 0)  # [D]
    has_key = l_all > 0.0
    l_safe = tl.where(has_key, l_all, 1.0)
    b_out = acc / l_safe
    tl.store(O + b.to(tl.int64) * stride_ob + h * stride_oh + o_d, b_out.to(O.dtype.element_ty),
             mask=o_d < HEAD_DIM)
    b_lse_out = tl.where(has_key, (m_all + tl.math.log2(l_safe)) * LN2, float("-inf"))
    tl.store(LSE + b.to(tl.int64) * stride_lb + h * stride_lh, b_lse_out)


def launch_combine(o_part, lse_part, out, lse) -> None:
    """o_part [B * H, S, D] fp32, lse_part [B * H, S] fp32 (base 2) -> out [B, H, D] (its
    dtype), lse [B, H] fp32 natural log, both written in place."""
    batch, num_heads, head_dim = out.shape
    num_splits = o_part.shape[1]
    head_dim_pad = max(16, configs.next_pow2(head_dim))
    splits_pad = max(16, configs.next_pow2(num_splits))
    block_s = min(splits_pad, max(1, 4096 // head_dim_pad))
    launch(
        _combine_kernel, (batch * num_heads,),
        o_part, lse_part, out, lse,
        out.stride(0), out.stride(1), lse.stride(0), lse.stride(1),
        num_heads, num_splits,
        HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, SPLITS_PAD=splits_pad, BLOCK_S=block_s,
        num_warps=4 if head_dim_pad * block_s >= 4096 else 2,
    )
