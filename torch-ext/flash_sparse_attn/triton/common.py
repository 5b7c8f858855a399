"""Pieces shared by every kernel of the family: constants, masks, gates, the online-softmax step.

Notation
- `o_m` query row indices of a tile (positions within the sequence), `o_n` key positions.
- `dist = o_m + (seqlen_k - seqlen_q) - o_n`: how far key n lies behind query m (SPEC §3).
- Scores are kept in base 2: `s2 = (q.k + g) * scale * log2(e)`, so softmax uses `exp2`;
  lse is converted back to natural log only when it is stored.

Caution
- `visible` assumes `dist` is computed in int32; sequences are limited to 2**31 keys.
- A row with no visible key keeps `m = -inf`; callers must guard `exp2(-inf - -inf)`
  (`safe_max` below returns 0 for such rows).
"""

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)  # log2(e)
LN2 = tl.constexpr(0.6931471805599453)  # ln(2)


@triton.jit
def program_tile(n_tiles, heads_first):
    """(tile, batch-head) of this program in a 1-D grid of n_tiles * (batch x heads) programs:
    tiles fastest when heads_first == 0 (the tiles of one head run together and share its K/V
    or Q/dO in L2), batch-heads fastest otherwise (tile t of every head runs before tile t + 1
    of any head). Chosen per launch by `configs.heads_first`."""
    pid = tl.program_id(0)
    n_bh = tl.num_programs(0) // n_tiles
    if heads_first != 0:
        tile = pid // n_bh
        bh = pid % n_bh
    else:
        tile = pid % n_tiles
        bh = pid // n_tiles
    return tile, bh


@triton.jit
def visible_2d(i2, j2, dist_offset, seqlen_k, IS_CAUSAL: tl.constexpr, IS_LOCAL: tl.constexpr,
               w_sink, w_left, w_right, w_near):
    """Visibility (SPEC §3) for broadcastable query positions i2 and key positions j2
    ([M, 1] x [1, N], or transposed [1, M] x [N, 1] in the backward), including j < seqlen_k.

    dist_offset = seqlen_k - seqlen_q. Local windows: key visible iff dist >= 0 and
    (dist < near, or near + right <= dist < near + right + left, or key < sink).
    """
    dist = i2 + dist_offset - j2
    m = j2 < seqlen_k
    if IS_LOCAL:
        band = (dist < w_near) | ((dist >= w_near + w_right) & (dist < w_near + w_right + w_left))
        band = band | (j2 < w_sink)
        m = m & (dist >= 0) & band
    elif IS_CAUSAL:
        m = m & (dist >= 0)
    return m


@triton.jit
def visible(o_m, o_n, dist_offset, seqlen_k, IS_CAUSAL: tl.constexpr, IS_LOCAL: tl.constexpr,
            w_sink, w_left, w_right, w_near):
    """[M, N] mask of the keys each query row o_m may see among keys o_n (see visible_2d)."""
    return visible_2d(o_m[:, None], o_n[None, :], dist_offset, seqlen_k, IS_CAUSAL, IS_LOCAL,
                      w_sink, w_left, w_right, w_near)


@triton.jit
def visible_count(i, dist_offset, seqlen_k, IS_CAUSAL: tl.constexpr, IS_LOCAL: tl.constexpr,
                  w_sink, w_left, w_right, w_near):
    """Number of keys query row(s) i see (SPEC §3), in closed form (int32)."""
    e = i + dist_offset  # the last key with dist >= 0
    if IS_LOCAL:
        top = tl.minimum(e, seqlen_k - 1) + 1  # keys [0, top) have dist >= 0
        n_lo = tl.maximum(e - w_near + 1, 0)  # near band [n_lo, top)
        f_lo = tl.maximum(e - w_near - w_right - w_left + 1, 0)  # far band [f_lo, f_hi)
        f_hi = tl.minimum(e - w_near - w_right + 1, top)
        s_hi = tl.minimum(w_sink, top)  # sink [0, s_hi)
        n_cnt = tl.maximum(top - n_lo, 0)
        f_cnt = tl.maximum(f_hi - f_lo, 0)
        s_cnt = tl.maximum(s_hi, 0)
        s_and_n = tl.maximum(tl.minimum(s_hi, top) - n_lo, 0)
        s_and_f = tl.maximum(tl.minimum(s_hi, f_hi) - f_lo, 0)
        return n_cnt + f_cnt + s_cnt - s_and_n - s_and_f
    if IS_CAUSAL:
        return tl.minimum(tl.maximum(e + 1, 0), seqlen_k)
    return i * 0 + seqlen_k  # (not zeros_like: Gluon callers need the layout of i)


@triton.jit
def log1p_unit(u):
    """log(1 + u) for u in [0, 1] in fp32 without a transcendental op: u * P(u), P a degree-4
    near-minimax fit on [0, 1] (max abs error 1.0e-5). The gate is added to the fp32 q.k of a
    score whose inputs are fp16/bf16: 1e-5 is about 100x below one fp16 rounding step of a
    unit score (2^-10), so the fit never shows in results, and four FMAs (not seven) keep the
    FP32 pipe, which the gate loads most, free. Frees the special-function unit, which the
    scores' exp2 already saturates."""
    p = 0.032178666 * u - 0.13611971
    p = p * u + 0.28953034
    p = p * u - 0.49193054
    p = p * u + 0.99949825
    return p * u


@triton.jit
def gate_2d(x, IS_LOGSIGMOID: tl.constexpr):
    """g(x) for x = alpha * delta (any shape, fp32): logsigmoid(x) or x."""
    if IS_LOGSIGMOID:
        # logsigmoid(x) = min(x, 0) - log(1 + exp(-|x|)), stable for any x; one exp2
        x = tl.minimum(x, 0.0) - log1p_unit(tl.math.exp2(tl.abs(x) * -LOG2E))
    return x


@triton.jit
def gate_max(alpha, d_max, d_min, IS_LOGSIGMOID: tl.constexpr):
    """Upper bound of g(alpha * delta) over a block whose delta lies in [d_min, d_max] (any
    broadcastable shapes): g is monotone in x = alpha * delta, so the bound is g at the
    extreme x (the gate test of SPEC §6, which needs no K)."""
    return gate_2d(tl.where(alpha >= 0, alpha * d_max, alpha * d_min), IS_LOGSIGMOID)


@triton.jit
def softmax_skip_threshold(m_ref, l_ref, softmax_threshold, visible_len, row_ok):
    """Per-row bound of the softmax test (SPEC §5, base 2): a block whose row max stays below
    it for every row may go, m_ref + log2(t * l_ref / visible_len) from the anchors' exact
    statistics (m_ref, l_ref). Rows without anchor statistics keep every block they see
    (-inf); padding rows (not row_ok) never keep one (+inf)."""
    thr = tl.where(l_ref > 0.0, m_ref + tl.math.log2(softmax_threshold * l_ref / visible_len),
                   float("-inf"))
    return tl.where(row_ok, thr, float("inf"))


@triton.jit
def gate_skip_threshold(g_ref, tg, scale_log2, row_ok):
    """Per-row bound of the gate test (SPEC §6, base 2): a block whose gate bound (`gate_max`,
    times scale_log2) stays below it for every row may go, g_ref * scale_log2 + log2(tg);
    -inf without an anchor gate, +inf for padding rows."""
    thr = tl.where(g_ref > float("-inf"), g_ref * scale_log2 + tl.math.log2(tg), float("-inf"))
    return tl.where(row_ok, thr, float("inf"))


@triton.jit
def page_of(pos, ok, p_pt, num_pages, PAGE_SIZE: tl.constexpr):
    """(page, row) int64 of logical key positions pos (any shape) of one sequence in a paged
    cache: page p_pt[pos // PAGE_SIZE] (clamped into [0, num_pages); positions that are not
    `ok` read page 0), row pos % PAGE_SIZE."""
    page = tl.load(p_pt + pos // PAGE_SIZE, mask=ok, other=0)
    page = tl.minimum(tl.maximum(page, 0), num_pages - 1).to(tl.int64)
    return page, (pos % PAGE_SIZE).to(tl.int64)


@triton.jit
def gate_grad_2d(g, IS_LOGSIGMOID: tl.constexpr):
    """g'(x) from the gate's value g = g(x): sigmoid(-x) = 1 - exp(logsigmoid(x)) for
    logsigmoid (one exp2, no reciprocal; the absolute error stays at the gate's own 1e-5), 1
    for linear."""
    if IS_LOGSIGMOID:
        return 1.0 - tl.math.exp2(g * LOG2E)
    else:  # (an else: Gluon callers trace only the logsigmoid branch, tl.full needs a layout)
        return tl.full(g.shape, 1.0, tl.float32)


@triton.jit
def gate(alpha, delta, IS_LOGSIGMOID: tl.constexpr):
    """g = logsigmoid(alpha * delta) or alpha * delta, fp32, for alpha [M], delta [N] -> [M, N]."""
    return gate_2d(alpha[:, None] * delta[None, :], IS_LOGSIGMOID)


@triton.jit
def safe_max(m):
    """Row max usable as an exp2 offset: -inf (no visible key yet) becomes 0."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def online_softmax_step(b_s, m_i, l_i):
    """One online-softmax update over a tile of base-2 scores b_s [M, N] (masked keys = -inf).

    Returns (b_p [M, N] unnormalised probabilities, m_new, l_new, b_rescale [M]); the caller
    rescales its accumulator by b_rescale and adds b_p @ V. `online_softmax_step_scaled` with
    scale 1 (the compiler drops the multiplications by 1: the same code and bits).
    """
    return online_softmax_step_scaled(b_s, m_i, l_i, 1.0)


@triton.jit
def online_softmax_step_scaled(b_s, m_i, l_i, scale_log2):
    """The online-softmax step over unscaled scores b_s (masked keys = -inf), m_i in base-2
    units: the max is taken before scaling (scale_log2 > 0: the same maxima), so each
    probability's scale and offset are one FMA, exp2(s * scale_log2 - m)."""
    m_new, m_use, b_rescale = softmax_rescale(m_i, tl.max(b_s, 1) * scale_log2)
    b_p = tl.math.exp2(b_s * scale_log2 - m_use[:, None])
    l_new = l_i * b_rescale + tl.sum(b_p, 1)
    return b_p, m_new, l_new, b_rescale


@triton.jit
def softmax_rescale(m_i, b_mx):
    """The running-max part of an online-softmax step, for a tile whose row max is b_mx:
    (m_new, m_use = the exp2 offset, b_rescale = exp2(m_i - m_use), 0 while m_i is -inf)."""
    m_new = tl.maximum(m_i, b_mx)
    m_use = safe_max(m_new)
    return m_new, m_use, tl.math.exp2(m_i - m_use)


@triton.jit
def load_tile(ptrs, row_ok, o_d, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
               ROW_MASK: tl.constexpr):
    """Load a [rows, HEAD_DIM_PAD] (or transposed) tile; masks only what can be out of range."""
    if ROW_MASK:
        if HEAD_DIM == HEAD_DIM_PAD:
            return tl.load(ptrs, mask=row_ok, other=0.0)
        return tl.load(ptrs, mask=row_ok & (o_d < HEAD_DIM), other=0.0)
    if HEAD_DIM == HEAD_DIM_PAD:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=o_d < HEAD_DIM, other=0.0)


@triton.jit
def accumulate_tile(acc, m_i, l_i, b_s, o_n, n_ok, o_d, p_v0, stride_vs,
                     HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, MASKED: tl.constexpr,
                     b_v=None):
    """The online-softmax update (the only copy): rescale the accumulator, add P @ V for the
    value rows at p_v0 + o_n * stride_vs (decode passes element offsets with stride 1), or for
    the value tile b_v [N, D] when the caller loaded it (the forward's TMA loads)."""
    b_p, m_i, l_i, b_r = online_softmax_step(b_s, m_i, l_i)
    if b_v is None:
        # [N, D] value tile
        b_v = load_tile(p_v0 + o_n[:, None].to(tl.int64) * stride_vs + o_d[None, :],
                         n_ok[:, None], o_d[None, :], HEAD_DIM, HEAD_DIM_PAD, MASKED)
    acc = acc * b_r[:, None]
    acc = tl.dot(b_p.to(b_v.dtype), b_v, acc)
    return acc, m_i, l_i


@triton.jit
def _segment(rem, pos, lo, hi):
    """One segment [lo, hi) of a tile walk (hi < lo counts as empty)."""
    size = tl.maximum(hi - lo, 0)
    pos = tl.where((rem >= 0) & (rem < size), lo + rem, pos)
    return rem - size, pos


@triton.jit
def tile_count(los, his, hole_lo, hole_hi, BLOCK: tl.constexpr, HOLE: tl.constexpr):
    """Tiles in the union of the ranges [los[r], his[r]) (multiples of BLOCK, disjoint; hi < lo
    is empty). With HOLE, tile 0 and the tiles [hole_lo, hole_hi) are left out."""
    n = los[0] * 0
    for r in tl.static_range(len(los)):
        if HOLE:
            lo = tl.maximum(los[r], BLOCK)
            n += tl.maximum(tl.minimum(his[r], hole_lo) - lo, 0) // BLOCK
            n += tl.maximum(his[r] - tl.maximum(lo, hole_hi), 0) // BLOCK
        else:
            n += tl.maximum(his[r] - los[r], 0) // BLOCK
    return n


@triton.jit
def tile_start(t, los, his, hole_lo, hole_hi, BLOCK: tl.constexpr, HOLE: tl.constexpr):
    """Start of tile t (0 <= t < tile_count) of that union, ranges taken in tuple order. One
    loop over a union of ranges replaces one loop per range: the software pipeline is filled
    once, not once per range, and the kernel holds one copy of the loop body per mask flavour."""
    rem = t * BLOCK
    pos = rem * 0
    for r in tl.static_range(len(los)):
        if HOLE:
            lo = tl.maximum(los[r], BLOCK)
            rem, pos = _segment(rem, pos, lo, tl.minimum(his[r], hole_lo))
            rem, pos = _segment(rem, pos, tl.maximum(lo, hole_hi), his[r])
        else:
            rem, pos = _segment(rem, pos, los[r], his[r])
    return pos


@triton.jit
def walk_range(los, his, p_list, n_listed, BLOCK: tl.constexpr, LISTED: tl.constexpr,
               CHUNK: tl.constexpr = 128):
    """[first, last) of the tile index t of a backward walk (tile t starts at `walk_start`).
    LISTED (one range): the positions in the ascending tile list p_list[:n_listed] of the tiles
    that start in [los[0], his[0]) (los[0] a multiple of BLOCK), one contiguous run of the
    list, counted CHUNK entries at a time; else 0 and the tiles of the union of the ranges."""
    if LISTED:
        tl.static_assert(len(los) == 1, "a listed walk covers one range")
        first = n_listed * 0
        last = first
        for c in range(0, n_listed, CHUNK):
            o = c + tl.arange(0, CHUNK)
            ok = o < n_listed
            start = tl.load(p_list + o, mask=ok, other=0).to(tl.int32) * BLOCK
            first += tl.sum((ok & (start < los[0])).to(tl.int32), 0)
            last += tl.sum((ok & (start < his[0])).to(tl.int32), 0)
        last = tl.maximum(first, last)
    else:
        first = 0
        last = tile_count(los, his, 0, 0, BLOCK, False)
    return first, last


@triton.jit
def walk_start(t, los, his, hole_lo, hole_hi, p_list, BLOCK: tl.constexpr, HOLE: tl.constexpr,
               LISTED: tl.constexpr):
    """Start of tile t of a walk: BLOCK * p_list[t] (LISTED: tile indices written by a
    decision pass), else `tile_start` over the union of the ranges (HOLE as there)."""
    if LISTED:
        start = tl.load(p_list + t).to(tl.int32) * BLOCK
    else:
        start = tile_start(t, los, his, hole_lo, hole_hi, BLOCK, HOLE)
    return tl.multiple_of(start, BLOCK)
