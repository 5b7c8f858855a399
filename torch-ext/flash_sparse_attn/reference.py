"""Plain-PyTorch implementation of SPEC.md §1–§7: the ops' CPU path and the tests' ground truth.

Everything here is written for clarity, not speed. Each sequence (a batch element, or a varlen
sequence) is its own problem, laid out head-major: q [H, Sq, D], k/v [Hkv, Sk, D],
alpha [H, Sq], delta [Hkv, Sk]. Forward and backward walk (query chunk, key chunk) blocks with
an online softmax, so memory stays bounded (no [Sq, Sk] matrix is ever built): a block holds
at most `chunk_size * chunk_size` scores, whatever the number of heads.

Numerics: computations run in float64 when q is float64, else in float32. `out` and the
gradients come back in the inputs' dtypes, `lse` in the compute dtype (the op wrappers
return float32, as the op contract says).

Notation: `dist(i, j) = i + (Sk - Sq) - j`, the distance of key j behind query i, with queries
aligned to the end of the keys (SPEC §3). With `seqused_k`, `Sk` is the number of keys used.

Block skipping (SPEC §5, §6) is decided by `_Problem.skip_codes`, block for block as the
kernels do (README "Sparse and gated skipping" gives the rule), and expressed by `skip`: a uint8
tensor [B, H, nQB, nKB] over blocks of skip_block_m(D) queries x SKIP_BLOCK_N keys (block
indices counted from the start of each sequence), codes 0 not visited, 1 kept, 2 skipped by the
softmax threshold, 3 skipped by the gate threshold; a pair with code >= 2 contributes nothing to
numerator or denominator.

Caution:
- Decode is not chunked over keys: one sequence's scores [H, L] are built at once (linear in L).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .triton.configs import (SKIP_BLOCK_N, decode_codes_shape, decode_skips, skip_block_m,
                             skip_shape)

Tensor = torch.Tensor


# ---------------------------------------------------------------------------------------------
# windows and masks (SPEC §3)
# ---------------------------------------------------------------------------------------------
def window_sizes_heuristic(seqlen_k, num_kv_heads, device, window_near=1024, window_sink=64,
                           num_heads_kv_global=None, tp_rank=None, tp_size=None) -> Tensor:
    """Default local-window bands: int32 [num_kv_heads, 4], columns [sink, left, right, near].

    Every head sees the first `window_sink` keys and the `window_near` nearest distances
    (`0 <= dist < near`). The remaining causal distances `[near, seqlen_k)` (a span of
    `S = max(seqlen_k - near, 0)`) are split into `G = num_heads_kv_global` contiguous,
    disjoint bands, one per global KV head, with integer breakpoints

        e_h = floor(h * S / G),   h = 0 .. G
        right_h = e_h,  left_h = e_{h+1} - e_h

    so global head h sees `near + e_h <= dist < near + e_{h+1}`. The bands cover the span with
    no gap or overlap; widths differ by at most one, and are zero when `G > S`.

    Tensor parallelism: `num_kv_heads` is the number of KV heads on this rank. The global head
    count is `num_heads_kv_global` (default `num_kv_heads * (tp_size or 1)`); rank `r` gets the
    rows of global heads `[r * num_kv_heads, (r + 1) * num_kv_heads)`. When `tp_size > G`, each
    KV head is replicated over `tp_size // G` consecutive ranks and rank `r` gets head
    `r // (tp_size // G)`. `seqlen_k` may be a Python int or a SymInt (torch.compile).
    """
    global_heads = num_heads_kv_global
    if global_heads is None:
        global_heads = num_kv_heads * (tp_size or 1)
    rank = tp_rank or 0
    if tp_size is not None and tp_size > global_heads:
        first = (rank // (tp_size // global_heads)) * num_kv_heads
    else:
        first = rank * num_kv_heads
    span = torch.sym_max(seqlen_k - window_near, 0)
    heads = torch.arange(first, first + num_kv_heads + 1, device=device, dtype=torch.int64)
    edges = heads * span // global_heads  # [num_kv_heads + 1]
    left = edges[1:] - edges[:-1]
    right = edges[:-1]
    sink = torch.full_like(left, window_sink)
    near = torch.full_like(left, window_near)
    return torch.stack([sink, left, right, near], dim=1).to(torch.int32)


def mask_visible(rows: Tensor, cols: Tensor, seqlen_q: int, seqlen_k: int, *,
                 is_causal: bool = False, window_sizes: Optional[Tensor] = None,
                 num_heads: int = 1) -> Tensor:
    """Which keys each query sees (SPEC §3), as a bool tensor [X, m, n].

    rows: query positions [m]; cols: key positions [n], or [C, n] per head (C = 1 or
    num_heads); positions count from the start of the sequence. Key j is visible to query i iff
    `0 <= j < seqlen_k` and, with dist = i + (seqlen_k - seqlen_q) - j:
    - window_sizes given (`[Hkv, 4]` shared by the query heads of a KV head, or `[H, 4]` per
      query head; columns [sink, left, right, near]): `dist >= 0` and (`dist < near` or
      `near + right <= dist < near + right + left` or `j < sink`). Local is always causal.
    - else if is_causal: `dist >= 0`;
    - else: always.
    X is num_heads when windows are given or cols is per head, else 1.
    """
    rows = rows.to(torch.int64).view(-1, 1)  # [m, 1]
    cols = cols.to(torch.int64).unsqueeze(-2)  # [1, n] or [C, 1, n]
    dist = rows + (seqlen_k - seqlen_q) - cols  # [m, n] or [C, m, n]
    visible = (cols >= 0) & (cols < seqlen_k) & torch.ones_like(dist, dtype=torch.bool)
    if visible.dim() == 2:
        visible = visible.unsqueeze(0)
        dist, cols = dist.unsqueeze(0), cols.unsqueeze(0)
    if window_sizes is not None:
        ws = window_sizes.to(device=rows.device, dtype=torch.int64)
        if ws.shape[0] != num_heads:  # one row per KV head: expand to its query heads
            ws = ws.repeat_interleave(num_heads // ws.shape[0], dim=0)
        sink, left, right, near = (ws[:, c].view(-1, 1, 1) for c in range(4))  # [H, 1, 1]
        in_band = (dist >= near + right) & (dist < near + right + left)
        visible = visible & (dist >= 0) & ((dist < near) | in_band | (cols < sink))
    elif is_causal:
        visible = visible & (dist >= 0)
    return visible


def _compute_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _gate(x: Tensor, is_logsigmoid_gate: bool) -> Tensor:
    """g = logsigmoid(x) or x, for x = alpha_i * delta_j."""
    return F.logsigmoid(x) if is_logsigmoid_gate else x


# ---------------------------------------------------------------------------------------------
# splitting a (batched or varlen) problem into sequences
# ---------------------------------------------------------------------------------------------
def _sequences(q, k, cu_seqlens_q, cu_seqlens_k, seqused_k):
    """Yields (b, q_index, k_index): index pairs (batch or None, slice) that select sequence b's
    queries / used keys from token-major tensors (see `_tok`, `_headmaj`)."""
    used = seqused_k.tolist() if seqused_k is not None else None
    if cu_seqlens_q is None:
        for b in range(q.shape[0]):
            n_k = used[b] if used is not None else k.shape[1]
            yield b, (b, slice(0, q.shape[1])), (b, slice(0, n_k))
    else:
        cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        for b in range(len(cq) - 1):
            n_k = used[b] if used is not None else ck[b + 1] - ck[b]
            yield b, (None, slice(cq[b], cq[b + 1])), (None, slice(ck[b], ck[b] + n_k))


def _tok(t, index):
    """Token-major [B, S, heads, D] / [total, heads, D] -> sequence view [S, heads, D]."""
    b, sl = index
    return t[sl] if b is None else t[b, sl]


def _headmaj(t, index):
    """Head-major [B, heads, S] / [heads, total] -> sequence view [heads, S]."""
    if t is None:
        return None
    b, sl = index
    return t[:, sl] if b is None else t[b, :, sl]


def _heads_first(t, dtype):
    """[S, heads, D] -> contiguous [heads, S, D] in dtype."""
    return t.to(dtype).permute(1, 0, 2).contiguous()


class _Problem:
    """One sequence's attention problem, in compute dtype, head-major."""

    def __init__(self, q, k, v, alpha, delta, skip, *, scale, is_causal, window_sizes,
                 is_logsigmoid_gate, chunk_size):
        dt = _compute_dtype(q)
        self.q, self.k, self.v = (_heads_first(t, dt) for t in (q, k, v))  # [H|Hkv, S, D]
        self.heads, self.seqlen_q, self.head_dim = self.q.shape
        self.skip_m = skip_block_m(self.head_dim)  # query rows of a skip block
        self.kv_heads, self.seqlen_k = self.k.shape[:2]
        self.group = self.heads // self.kv_heads
        self.alpha = alpha.to(dt) if alpha is not None else None  # [H, Sq]
        # delta expanded to the query heads of each KV head: [H, Sk]
        self.delta = (delta.to(dt).repeat_interleave(self.group, 0)
                      if delta is not None else None)
        self.skip = skip if skip is not None and bool(skip.any()) else None  # [H, nQB, nKB]
        self.scale, self.is_causal, self.window_sizes = scale, is_causal, window_sizes
        self.is_logsigmoid_gate = is_logsigmoid_gate
        self.block_n = max(1, chunk_size)
        self.block_m = max(1, chunk_size * chunk_size // (self.heads * self.block_n))

    def blocks(self):
        """(query slice, key slice) pairs covering [Sq] x [Sk]."""
        for q0 in range(0, self.seqlen_q, self.block_m):
            for k0 in range(0, self.seqlen_k, self.block_n):
                yield (slice(q0, min(q0 + self.block_m, self.seqlen_q)),
                       slice(k0, min(k0 + self.block_n, self.seqlen_k)))

    def mask_raw(self, qs: slice, ks: slice) -> Tensor:
        """Visible pairs of a block (SPEC §3), bool [H, m, n]."""
        rows = torch.arange(qs.start, qs.stop, device=self.q.device)
        cols = torch.arange(ks.start, ks.stop, device=self.q.device)
        vis = mask_visible(rows, cols, self.seqlen_q, self.seqlen_k, is_causal=self.is_causal,
                           window_sizes=self.window_sizes, num_heads=self.heads)
        return vis.expand(self.heads, *vis.shape[-2:])

    def mask(self, qs: slice, ks: slice) -> Tensor:
        """Visible (and not skipped) pairs of a block: bool [H or 1, m, n]."""
        rows = torch.arange(qs.start, qs.stop, device=self.q.device)
        cols = torch.arange(ks.start, ks.stop, device=self.q.device)
        vis = mask_visible(rows, cols, self.seqlen_q, self.seqlen_k, is_causal=self.is_causal,
                           window_sizes=self.window_sizes, num_heads=self.heads)
        if self.skip is not None:
            skipped = self.skip[:, rows // self.skip_m][:, :, cols // SKIP_BLOCK_N]
            vis = vis & (skipped < 2)  # [H, m, n]
        return vis

    def grouped(self, t: Tensor) -> Tensor:
        """[H, m, X] -> [Hkv, group * m, X]: the query heads of one KV head stacked as rows."""
        return t.reshape(self.kv_heads, self.group * t.shape[1], t.shape[2])

    def ungrouped(self, t: Tensor) -> Tensor:
        """[Hkv, group * m, X] -> [H, m, X]."""
        return t.reshape(self.heads, t.shape[1] // self.group, t.shape[2])

    def gate_input(self, qs, ks):
        """x = alpha_i * delta_j: [H, m, n] (None without gate)."""
        if self.alpha is None:
            return None
        return self.alpha[:, qs, None] * self.delta[:, None, ks]

    def scores(self, qs, ks, x):
        """scale * (q.k + g): [H, m, n]."""
        qk = self.ungrouped(self.grouped(self.q[:, qs]) @ self.k[:, ks].transpose(1, 2))
        if x is not None:
            qk = qk + _gate(x, self.is_logsigmoid_gate)
        return self.scale * qk

    # ---------------------------------------------------------------------------------
    def skip_codes(self, softmax_threshold, gate_threshold, is_adapt_gate):
        """The block-skip decisions of SPEC §5/§6 for this sequence: uint8 [H, nQB, nKB].

        Per query block (skip_block_m(D) rows) and head: anchor key blocks are block 0 and the
        blocks holding some row's last visible key (causal/local: the diagonal, none when
        near == 0; otherwise the last block). Over the visible keys of the anchors: row max
        m_ref, l_ref = sum exp(s - m_ref), g_ref = max gate. Any other block with a visible
        key is skipped when (gate) for every row scale * (gmax - g_ref) < ln(tg_i), gmax the
        gate bound from delta's extremes over the block, or else (softmax) for every row
        max_block(s) < m_ref + ln(t * l_ref / visible_len). Rows without anchor keys never
        allow a skip.
        """
        bm, bn = self.skip_m, SKIP_BLOCK_N
        sq, sk, heads = self.seqlen_q, self.seqlen_k, self.heads
        nqb, nkb = -(-sq // bm), -(-sk // bn)
        codes = torch.zeros((heads, nqb, nkb), dtype=torch.uint8, device=self.q.device)
        if nqb == 0 or nkb == 0:
            return codes
        off = sk - sq
        neg = -math.inf
        near = None
        if self.window_sizes is not None:
            w = self.window_sizes.to(torch.int64).cpu()
            if w.shape[0] != heads:
                w = w.repeat_interleave(heads // w.shape[0], 0)
            near = w[:, 3]
        for qb in range(nqb):
            qs = slice(qb * bm, min(qb * bm + bm, sq))
            m0, m1 = qs.start, qs.stop - 1
            blocks = [slice(kb * bn, min(kb * bn + bn, sk)) for kb in range(nkb)]
            vis = [self.mask_raw(qs, ks) for ks in blocks]  # [H, m, n] each
            x = [self.gate_input(qs, ks) for ks in blocks]
            s = [self.scores(qs, ks, xi).masked_fill(~vi, neg) for ks, xi, vi in zip(blocks, x, vis)]
            count = sum(vi.sum(-1) for vi in vis).to(s[0].dtype)  # [H, m]
            anchor = torch.zeros((heads, nkb), dtype=torch.bool, device=self.q.device)
            anchor[:, 0] = True
            if self.is_causal or self.window_sizes is not None:
                a_lo = max(m0 + off, 0) // bn
                a_hi = max(-(-min(max(m1 + off + 1, 0), sk) // bn), a_lo)
                for h in range(heads):
                    if near is None or int(near[h]) > 0:
                        anchor[h, a_lo:a_hi] = True
            else:
                anchor[:, (sk - 1) // bn] = True
            m_ref = torch.full(count.shape, neg, dtype=count.dtype, device=count.device)
            for kb in range(nkb):
                m_ref = torch.where(anchor[:, kb, None], torch.maximum(m_ref, s[kb].amax(-1)),
                                    m_ref)
            safe = m_ref.masked_fill(m_ref == neg, 0.0)
            l_ref = sum(torch.where(anchor[:, kb, None], torch.exp(s[kb] - safe[..., None]).sum(-1),
                                    0.0) for kb in range(nkb))
            thr = torch.where(l_ref > 0, m_ref + torch.log(
                softmax_threshold * l_ref / count.clamp(min=1)), neg)
            gated = self.alpha is not None and gate_threshold != 0
            if gate_threshold < 0:  # the default: 1 / seqlen_k of this sequence
                gate_threshold = 1.0 / max(sk, 1)
            if gated:
                g_ref = torch.full(count.shape, neg, dtype=count.dtype, device=count.device)
                for kb in range(nkb):
                    g = _gate(x[kb], self.is_logsigmoid_gate).masked_fill(~vis[kb], neg)
                    g_ref = torch.where(anchor[:, kb, None], torch.maximum(g_ref, g.amax(-1)),
                                        g_ref)
                tg = gate_threshold * count / sk if (
                    is_adapt_gate and (self.is_causal or self.window_sizes is not None)) \
                    else torch.full_like(count, gate_threshold)
                gthr = torch.where(g_ref > neg, g_ref * self.scale + torch.log(tg), neg)
            for kb, ks in enumerate(blocks):
                has = vis[kb].flatten(1).any(-1)  # [H]
                codes[:, qb, kb] = has.to(torch.uint8)
                for h in torch.nonzero(has & ~anchor[:, kb]).flatten().tolist():
                    if gated:
                        d = self.delta[h, ks]
                        a = self.alpha[h, qs]
                        x_max = torch.where(a >= 0, a * d.max(), a * d.min())
                        g_max = _gate(x_max, self.is_logsigmoid_gate)
                        if bool((g_max * self.scale < gthr[h]).all()):
                            codes[h, qb, kb] = 3
                            continue
                    if softmax_threshold > 0:
                        mx = s[kb][h].amax(-1)
                        if not bool(((mx > neg) & (mx >= thr[h])).any()):
                            codes[h, qb, kb] = 2
        return codes

    def forward(self):
        """-> out [H, Sq, D], lse [H, Sq] (compute dtype); rows seeing no key: 0 and -inf."""
        out = self.q.new_zeros(self.q.shape)
        lse = self.q.new_full((self.heads, self.seqlen_q), -math.inf)
        for q0 in range(0, self.seqlen_q, self.block_m):
            qs = slice(q0, min(q0 + self.block_m, self.seqlen_q))
            m = qs.stop - qs.start
            row_max = self.q.new_full((self.heads, m), -math.inf)
            row_sum = self.q.new_zeros((self.heads, m))
            acc = self.q.new_zeros((self.heads, m, self.head_dim))
            for k0 in range(0, self.seqlen_k, self.block_n):
                ks = slice(k0, min(k0 + self.block_n, self.seqlen_k))
                vis = self.mask(qs, ks)
                if not bool(vis.any()):
                    continue
                s = self.scores(qs, ks, self.gate_input(qs, ks)).masked_fill(~vis, -math.inf)
                new_max = torch.maximum(row_max, s.amax(-1))
                safe_max = new_max.masked_fill(new_max == -math.inf, 0.0)
                p = torch.exp(s - safe_max[..., None])  # masked -> 0
                rescale = torch.exp(row_max - safe_max)  # -inf (nothing yet) -> 0
                row_sum = row_sum * rescale + p.sum(-1)
                pv = self.ungrouped(self.grouped(p) @ self.v[:, ks])
                acc = acc * rescale[..., None] + pv
                row_max = new_max
            seen = row_sum > 0
            out[:, qs] = acc / row_sum.masked_fill(~seen, 1.0)[..., None]  # unseen: 0 / 1
            lse[:, qs] = torch.where(seen, row_max + torch.log(row_sum), -math.inf)
        return out, lse

    def backward(self, dout, out, lse):
        """Flash-style backward from the forward's (out, lse).

        With P = exp(s - lse), dP = dO V^T, D_i = rowsum(dO * O): dS = P * (dP - D_i) is the
        gradient of the scores s = scale * (q.k + g). Then dq = scale dS K, dk = scale dS^T Q,
        dv = P^T dO, and through x = alpha_i delta_j: dx = scale dS g'(x),
        dalpha_i = sum_j dx delta_j, ddelta_j = sum_(i, query heads of the KV head) dx alpha_i.
        Returns dq [H, Sq, D], dk/dv [Hkv, Sk, D], dalpha [H, Sq], ddelta [Hkv, Sk] (or None).
        """
        dt = self.q.dtype
        dout, out, lse = dout.to(dt), out.to(dt), lse.to(dt)  # [H, Sq, D], [H, Sq, D], [H, Sq]
        rowdot = (dout * out).sum(-1)  # D_i: [H, Sq]
        dq, dk, dv = torch.zeros_like(self.q), torch.zeros_like(self.k), torch.zeros_like(self.v)
        gated = self.alpha is not None
        dalpha = torch.zeros_like(self.alpha) if gated else None
        ddelta = self.q.new_zeros((self.heads, self.seqlen_k)) if gated else None
        for qs, ks in self.blocks():
            vis = self.mask(qs, ks)
            if not bool(vis.any()):
                continue
            x = self.gate_input(qs, ks)
            s = self.scores(qs, ks, x)
            p = torch.where(vis, torch.exp(s - lse[:, qs, None]), 0.0)  # [H, m, n]
            do_g = self.grouped(dout[:, qs])  # [Hkv, group*m, D]
            dv[:, ks] += self.grouped(p).transpose(1, 2) @ do_g
            dp = self.ungrouped(do_g @ self.v[:, ks].transpose(1, 2))  # [H, m, n]
            dlogit = self.scale * p * (dp - rowdot[:, qs, None])  # d/d(q.k + g)
            dq[:, qs] += self.ungrouped(self.grouped(dlogit) @ self.k[:, ks])
            dk[:, ks] += self.grouped(dlogit).transpose(1, 2) @ self.grouped(self.q[:, qs])
            if gated:
                dx = dlogit * torch.sigmoid(-x) if self.is_logsigmoid_gate else dlogit
                dalpha[:, qs] += (dx * self.delta[:, None, ks]).sum(-1)
                ddelta[:, ks] += (dx * self.alpha[:, qs, None]).sum(1)
        if gated:
            ddelta = ddelta.view(self.kv_heads, self.group, self.seqlen_k).sum(1)
        return dq, dk, dv, dalpha, ddelta


def _problems(q, k, v, alpha, delta, cu_seqlens_q, cu_seqlens_k, seqused_k, skip, opts):
    """Yields (q_index, k_index, _Problem) for every sequence."""
    for b, qi, ki in _sequences(q, k, cu_seqlens_q, cu_seqlens_k, seqused_k):
        skip_b = skip[b] if skip is not None and skip.numel() > 0 else None
        prob = _Problem(_tok(q, qi), _tok(k, ki), _tok(v, ki), _headmaj(alpha, qi),
                        _headmaj(delta, ki), skip_b, **opts)
        yield qi, ki, prob


def _options(q, softmax_scale, is_causal, window_sizes, is_logsigmoid_gate, chunk_size):
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    return dict(scale=float(scale), is_causal=bool(is_causal), window_sizes=window_sizes,
                is_logsigmoid_gate=bool(is_logsigmoid_gate), chunk_size=int(chunk_size))


def _lse_empty(q, is_varlen, dtype):
    shape = (q.shape[1], q.shape[0]) if is_varlen else (q.shape[0], q.shape[2], q.shape[1])
    return q.new_full(shape, -math.inf, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# attention forward / backward (SPEC §1, §3, §4, §6)
# ---------------------------------------------------------------------------------------------
def attention_forward(q, k, v, *, alpha=None, delta=None, cu_seqlens_q=None, cu_seqlens_k=None,
                      seqused_k=None, max_seqlen_q=None, max_seqlen_k=None, window_sizes=None,
                      softmax_scale=None, is_causal=False, softmax_threshold=0.0,
                      gate_threshold=0.0, is_logsigmoid_gate=True, is_adapt_gate=False,
                      chunk_size=1024, skip=None):
    """Chunked attention forward -> (out like q in q.dtype, lse in the compute dtype).

    Batched: q [B, Sq, H, D], k/v [B, Sk, Hkv, D], alpha [B, H, Sq], delta [B, Hkv, Sk],
    lse [B, H, Sq]. Varlen (cu_seqlens_q/k given): q [total_q, H, D], k/v [total_k, Hkv, D],
    alpha [H, total_q], delta [Hkv, total_k], lse [H, total_q]. seqused_k [B]: sequence b uses
    its first seqused_k[b] keys (and they define its Sk in `dist`). Gated when alpha is given.
    `skip` [B, H, nQB, nKB] uint8: block pairs to leave out (see module docstring).
    Thresholds and max_seqlen_* do not change the result (nothing is dropped yet).
    """
    opts = _options(q, softmax_scale, is_causal, window_sizes, is_logsigmoid_gate, chunk_size)
    is_varlen = cu_seqlens_q is not None
    out = torch.zeros_like(q, memory_format=torch.contiguous_format)
    lse = _lse_empty(q, is_varlen, _compute_dtype(q))
    for qi, _, prob in _problems(q, k, v, alpha, delta, cu_seqlens_q, cu_seqlens_k, seqused_k,
                                 skip, opts):
        o, l = prob.forward()
        _tok(out, qi).copy_(o.permute(1, 0, 2))
        _headmaj(lse, qi).copy_(l)
    return out, lse


def attention_backward(dout, q, k, v, out, lse, *, alpha=None, delta=None, cu_seqlens_q=None,
                       cu_seqlens_k=None, seqused_k=None, max_seqlen_q=None, max_seqlen_k=None,
                       window_sizes=None, softmax_scale=None, is_causal=False,
                       softmax_threshold=0.0, gate_threshold=0.0, is_logsigmoid_gate=True,
                       is_adapt_gate=False, chunk_size=1024, skip=None):
    """Chunked backward of `attention_forward` -> (dq, dk, dv, dalpha, ddelta).

    Gradients have the shapes and dtypes of their inputs (contiguous); dk/dv sum over the query
    heads of each KV head; keys beyond seqused_k and rows that see no key get zero gradients.
    dalpha/ddelta are None without a gate. `skip` must be the forward's.
    """
    opts = _options(q, softmax_scale, is_causal, window_sizes, is_logsigmoid_gate, chunk_size)
    grads = [torch.zeros_like(t, memory_format=torch.contiguous_format) if t is not None
             else None for t in (q, k, v, alpha, delta)]
    dq, dk, dv, dalpha, ddelta = grads
    for qi, ki, prob in _problems(q, k, v, alpha, delta, cu_seqlens_q, cu_seqlens_k, seqused_k,
                                  skip, opts):
        dt = prob.q.dtype
        g = prob.backward(_heads_first(_tok(dout, qi), dt), _heads_first(_tok(out, qi), dt),
                          _headmaj(lse, qi))
        _tok(dq, qi).copy_(g[0].permute(1, 0, 2))
        _tok(dk, ki).copy_(g[1].permute(1, 0, 2))
        _tok(dv, ki).copy_(g[2].permute(1, 0, 2))
        if alpha is not None:
            _headmaj(dalpha, qi).copy_(g[3])
            _headmaj(ddelta, ki).copy_(g[4])
    return dq, dk, dv, dalpha, ddelta


def attention_naive(q, k, v, *, alpha=None, delta=None, cu_seqlens_q=None, cu_seqlens_k=None,
                    seqused_k=None, max_seqlen_q=None, max_seqlen_k=None, window_sizes=None,
                    softmax_scale=None, is_causal=False, softmax_threshold=0.0,
                    gate_threshold=0.0, is_logsigmoid_gate=True, is_adapt_gate=False,
                    chunk_size=None, skip=None):
    """Unchunked float64 attention, differentiable by autograd (tests only).

    Same arguments and layouts as `attention_forward`; returns (out in q.dtype, lse float64).
    Builds each sequence's full [H, Sq, Sk] scores and mask.
    """
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    outs, lses = [], []
    for b, qi, ki in _sequences(q, k, cu_seqlens_q, cu_seqlens_k, seqused_k):
        qb, kb, vb = (_tok(t, i).double().transpose(0, 1) for t, i in ((q, qi), (k, ki), (v, ki)))
        heads, sq, sk = qb.shape[0], qb.shape[1], kb.shape[1]
        kb = kb.repeat_interleave(heads // kb.shape[0], 0)  # GQA: [H, Sk, D]
        vb = vb.repeat_interleave(heads // vb.shape[0], 0)
        logits = qb @ kb.transpose(1, 2)  # [H, Sq, Sk]
        if alpha is not None:
            a = _headmaj(alpha, qi).double()  # [H, Sq]
            d = _headmaj(delta, ki).double()
            d = d.repeat_interleave(heads // d.shape[0], 0)  # [H, Sk]
            logits = logits + _gate(a[:, :, None] * d[:, None, :], is_logsigmoid_gate)
        rows, cols = torch.arange(sq, device=q.device), torch.arange(sk, device=q.device)
        mask = mask_visible(rows, cols, sq, sk, is_causal=is_causal,
                            window_sizes=window_sizes, num_heads=heads).expand(heads, sq, sk)
        if skip is not None and skip.numel() > 0:
            blk = skip[b][:, rows // skip_block_m(q.shape[-1])][:, :, cols // SKIP_BLOCK_N]
            mask = mask & (blk < 2)
        empty = ~mask.any(-1, keepdim=True)  # rows that see no key
        s = torch.where(mask, scale * logits, -math.inf)
        s = torch.where(empty, 0.0, s)  # keeps logsumexp finite on empty rows
        row_lse = torch.logsumexp(s, -1, keepdim=True)
        p = torch.exp(s - row_lse) * mask
        outs.append((p @ vb).transpose(0, 1))  # [Sq, H, D]
        lses.append(torch.where(empty, -math.inf, row_lse).squeeze(-1))  # [H, Sq]
    if cu_seqlens_q is None:
        return torch.stack(outs).to(q.dtype), torch.stack(lses)
    return torch.cat(outs).to(q.dtype), torch.cat(lses, dim=1)


# ---------------------------------------------------------------------------------------------
# op-facing wrappers (called by ops.py on CPU tensors)
# ---------------------------------------------------------------------------------------------
def skip_decisions(q, k, v, *, alpha=None, delta=None, cu_seqlens_q=None, cu_seqlens_k=None,
                   seqused_k=None, window_sizes=None, max_seqlen_q=None, max_seqlen_k=None,
                   softmax_scale=None, is_causal=False, softmax_threshold=0.0,
                   gate_threshold=0.0, is_logsigmoid_gate=True, is_adapt_gate=False):
    """The block-skip codes of SPEC §5/§6 for a whole (batched or varlen) problem:
    uint8 [B, H, nQB, nKB] (see `_Problem.skip_codes`), computed in the compute dtype."""
    if cu_seqlens_q is None:
        max_seqlen_q, max_seqlen_k = q.shape[1], k.shape[1]
    skip = q.new_zeros(skip_shape(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k, True),
                       dtype=torch.uint8)
    if softmax_threshold <= 0 and not (alpha is not None and gate_threshold != 0):
        return skip
    opts = _options(q, softmax_scale, is_causal, window_sizes, is_logsigmoid_gate, 1024)
    for b, qi, ki in _sequences(q, k, cu_seqlens_q, cu_seqlens_k, seqused_k):
        prob = _Problem(_tok(q, qi), _tok(k, ki), _tok(v, ki), _headmaj(alpha, qi),
                        _headmaj(delta, ki), None, **opts)
        codes = prob.skip_codes(float(softmax_threshold), float(gate_threshold),
                                bool(is_adapt_gate))
        skip[b, :, :codes.shape[1], :codes.shape[2]] = codes
    return skip


def unpage(k, v, delta, page_table, cu_seqlens_k=None):
    """A paged cache (k/v [num_pages, page_size, Hkv, D], delta [num_pages, page_size, Hkv],
    page_table [B, max_pages]) as contiguous [B, max_pages * page_size, Hkv, D] keys/values
    and delta [B, Hkv, max_pages * page_size]: logical position p of sequence b is row
    p % page_size of page page_table[b, p // page_size]. With cu_seqlens_k (varlen): packed
    [total_k, Hkv, D] / delta [Hkv, total_k], sequence b's first
    cu_seqlens_k[b+1] - cu_seqlens_k[b] positions at rows cu_seqlens_k[b]:cu_seqlens_k[b+1]."""
    pages = page_table.long()  # [B, max_pages]
    batch, per = pages.shape

    def flat(t):  # [num_pages, page_size, ...] -> [B, per * page_size, ...]
        return t[pages].reshape(batch, per * t.shape[1], *t.shape[2:])

    k, v, d = flat(k), flat(v), None if delta is None else flat(delta)
    if cu_seqlens_k is None:
        return k, v, None if d is None else d.transpose(1, 2)
    lengths = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).tolist()

    def pack(t):
        return torch.cat([t[b, :n] for b, n in enumerate(lengths)])

    return pack(k), pack(v), None if d is None else pack(d).transpose(0, 1)


def attention_forward_op(q, k, v, *, alpha, delta, cu_seqlens_q, cu_seqlens_k, seqused_k,
                         window_sizes, max_seqlen_q, max_seqlen_k, softmax_scale, is_causal,
                         softmax_threshold, gate_threshold, is_logsigmoid_gate, is_adapt_gate,
                         deterministic=False, page_table=None):
    """The `fwd` op on CPU: (out, lse float32, skip uint8 of `skip_shape(...)`). With
    page_table (batched or varlen) the keys are a paged cache, read as `unpage` lays it out."""
    if page_table is not None:
        k, v, delta = unpage(k, v, delta, page_table, cu_seqlens_k)
    args = dict(alpha=alpha, delta=delta, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                seqused_k=seqused_k, window_sizes=window_sizes, softmax_scale=softmax_scale,
                is_causal=is_causal, is_logsigmoid_gate=is_logsigmoid_gate)
    if softmax_threshold > 0 or alpha is not None:
        skip = skip_decisions(q, k, v, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
                              softmax_threshold=softmax_threshold,
                              gate_threshold=gate_threshold, is_adapt_gate=is_adapt_gate,
                              **args)
    else:
        skip = q.new_zeros((0,), dtype=torch.uint8)
    out, lse = attention_forward(q, k, v, skip=skip, **args)
    return out, lse.to(torch.float32), skip


def attention_backward_op(dout, q, k, v, out, lse, skip, *, alpha, delta, cu_seqlens_q,
                          cu_seqlens_k, seqused_k, window_sizes, max_seqlen_q, max_seqlen_k,
                          softmax_scale, is_causal, softmax_threshold, gate_threshold,
                          is_logsigmoid_gate, is_adapt_gate, deterministic=False):
    """The `bwd` op on CPU: (dq, dk, dv, dalpha, ddelta); dalpha/ddelta are `q.new_empty((0,))`
    without a gate. For float64 inputs the float32 lse of the op is recomputed in float64 (same
    skip set), so float64 gradients stay exact."""
    args = dict(alpha=alpha, delta=delta, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                seqused_k=seqused_k, window_sizes=window_sizes, softmax_scale=softmax_scale,
                is_causal=is_causal, is_logsigmoid_gate=is_logsigmoid_gate, skip=skip)
    if q.dtype == torch.float64 and lse.dtype != torch.float64:
        _, lse = attention_forward(q, k, v, **args)
    dq, dk, dv, dalpha, ddelta = attention_backward(dout, q, k, v, out, lse, **args)
    if alpha is None:
        dalpha, ddelta = q.new_empty((0,)), q.new_empty((0,))
    return dq, dk, dv, dalpha, ddelta


# ---------------------------------------------------------------------------------------------
# KV caches and decode (SPEC §7)
# ---------------------------------------------------------------------------------------------
def _cache_rows(k_cache, page_table, cu_seqlens_k, b, pos):
    """Physical addressing of logical positions `pos` (int64, any shape) of sequence b:
    returns an index tuple into the token dims of a cache (before the head dim)."""
    if page_table is not None:  # [num_pages, page_size, ...]
        page_size = k_cache.shape[1]
        return page_table[b].long()[pos // page_size], pos % page_size
    if cu_seqlens_k is not None:  # packed [total_k, ...]
        return (int(cu_seqlens_k[b]) + pos,)
    return b, pos  # contiguous [B, Sk, ...]


def _cache_len(k_cache, page_table, cu_seqlens_k, b):
    if page_table is not None:
        return page_table.shape[1] * k_cache.shape[1]
    if cu_seqlens_k is not None:
        return int(cu_seqlens_k[b + 1] - cu_seqlens_k[b])
    return k_cache.shape[1]


def _delta_index(delta_cache, page_table, cu_seqlens_k, b, pos, kv_head):
    """Index tuple of delta at logical positions pos of sequence b, for KV heads kv_head."""
    if page_table is not None:  # [num_pages, page_size, Hkv]
        page, row = _cache_rows(delta_cache, page_table, None, b, pos)
        return page, row, kv_head
    if cu_seqlens_k is not None:  # [Hkv, total_k]
        return kv_head, int(cu_seqlens_k[b]) + pos
    return b, kv_head, pos  # [B, Hkv, Sk]


def decode_forward(q, k_cache, v_cache, *, alpha, delta_cache, page_table, cu_seqlens_k,
                   seqused_k, gather_kv_indices, window_sizes, max_seqlen_k, softmax_scale,
                   softmax_threshold, gate_threshold, is_logsigmoid_gate, codes=None):
    """One query token per sequence over a KV cache -> (out [B, H, D] q.dtype, lse [B, H] fp32).

    q [B, H, D] is the newest token of sequence b, aligned to the end of its L_b keys
    (L_b = seqused_k[b], else the cache length of b): dist = (L_b - 1) - p for logical
    position p. Caches: contiguous [B, Sk, Hkv, D] (delta [B, Hkv, Sk]); paged
    [num_pages, page_size, Hkv, D] with page_table [B, max_pages] (position p lives in page
    page_table[b, p // page_size], row p % page_size; delta [num_pages, page_size, Hkv]);
    packed [total_k, Hkv, D] with cu_seqlens_k (delta [Hkv, total_k]). alpha [B, H].
    gather_kv_indices [B, topk] or [B, Hkv, topk]: only these logical positions are attended;
    entries < 0 or >= L_b are ignored; every remaining entry is one key slot, so a repeated
    position is attended as many times as it is listed. Windows apply to logical positions.
    Skipping (SPEC §7; plain caches: no index list, no window): the rule of the training
    forward for a single query row aligned to the end of the keys (`_Problem.skip_codes`,
    causal), per (sequence, query head, 64-key block); `codes` [B, H, nKB] uint8, if given,
    receives the decisions.
    """
    batch, heads, head_dim = q.shape
    kv_heads = k_cache.shape[-2]
    group = heads // kv_heads
    dt = _compute_dtype(q)
    scale = float(softmax_scale) if softmax_scale is not None else head_dim ** -0.5
    out = torch.zeros_like(q, memory_format=torch.contiguous_format)
    lse = q.new_full((batch, heads), -math.inf, dtype=torch.float32)
    kv_head = torch.arange(kv_heads, device=q.device).view(-1, 1)  # [Hkv, 1]
    skips = decode_skips(alpha, gather_kv_indices, window_sizes, softmax_threshold,
                         gate_threshold)
    for b in range(batch):
        length = int(seqused_k[b]) if seqused_k is not None else \
            _cache_len(k_cache, page_table, cu_seqlens_k, b)
        if length <= 0:
            continue
        if gather_kv_indices is not None:
            pos = gather_kv_indices[b].long()
            pos = pos.expand(kv_heads, -1) if pos.dim() == 1 else pos  # [Hkv, n]
        else:
            pos = torch.arange(length, device=q.device).expand(kv_heads, -1)
        valid = (pos >= 0) & (pos < length)  # [Hkv, n]
        pos = pos.clamp(0, length - 1)
        rows = _cache_rows(k_cache, page_table, cu_seqlens_k, b, pos)
        kb = k_cache[(*rows, kv_head)].to(dt)  # [Hkv, n, D]
        vb = v_cache[(*rows, kv_head)].to(dt)
        if skips:
            d = None if alpha is None else delta_cache[_delta_index(
                delta_cache, page_table, cu_seqlens_k, b, pos, kv_head)]  # [Hkv, n]
            prob = _Problem(q[b][None], kb.transpose(0, 1), vb.transpose(0, 1),
                            None if alpha is None else alpha[b][:, None], d, None,
                            **_options(q, scale, True, None, is_logsigmoid_gate, 1024))
            c = prob.skip_codes(float(softmax_threshold), float(gate_threshold), False)
            prob.skip = c if bool((c >= 2).any()) else None  # [H, 1, nKB]
            ob, lb = prob.forward()
            out[b], lse[b] = ob[:, 0].to(out.dtype), lb[:, 0].to(lse.dtype)
            if codes is not None:
                codes[b, :, :c.shape[2]] = c[:, 0]
            continue
        qb = q[b].to(dt).view(kv_heads, group, head_dim)  # [Hkv, group, D]
        logits = (qb @ kb.transpose(1, 2)).view(heads, -1)  # [H, n]
        if alpha is not None:
            d = delta_cache[_delta_index(delta_cache, page_table, cu_seqlens_k, b, pos,
                                         kv_head)].to(dt)  # [Hkv, n]
            x = alpha[b].to(dt).view(heads, 1) * d.repeat_interleave(group, 0)
            logits = logits + _gate(x, is_logsigmoid_gate)
        vis = mask_visible(pos.new_zeros(1), pos.repeat_interleave(group, 0),
                           1, length, is_causal=True, window_sizes=window_sizes,
                           num_heads=heads)[:, 0]  # [H, n]
        vis = vis & valid.repeat_interleave(group, 0)
        s = (scale * logits).masked_fill(~vis, -math.inf)
        row_lse = torch.logsumexp(s, -1)  # [H]
        seen = row_lse > -math.inf
        p = torch.where(vis, torch.exp(s - row_lse.masked_fill(~seen, 0.0)[:, None]), 0.0)
        ob = (p.view(kv_heads, group, -1) @ vb).view(heads, head_dim)
        out[b] = ob
        lse[b] = row_lse
    return out, lse


def decode_forward_op(q, k_cache, v_cache, *, return_codes, **kw):
    """`decode_forward` as the decode op returns it: (out, lse, codes), codes
    [B, H, nKB] uint8 when return_codes and the call can skip, else empty."""
    skips = return_codes and decode_skips(kw["alpha"], kw["gather_kv_indices"],
                                          kw["window_sizes"], kw["softmax_threshold"],
                                          kw["gate_threshold"])
    codes = torch.zeros(decode_codes_shape(q, k_cache, kw["page_table"], kw["cu_seqlens_k"],
                                           kw["max_seqlen_k"], skips),
                        dtype=torch.uint8, device=q.device)
    out, lse = decode_forward(q, k_cache, v_cache, codes=codes if skips else None, **kw)
    return out, lse, codes


def kv_append(k_cache, v_cache, delta_cache, k_new, v_new, delta_new, *, page_table,
              cu_seqlens_k, seqused_k):
    """In place: write k_new/v_new [B, Hkv, D] (and delta_new [B, Hkv] into delta_cache) at
    logical position seqused_k[b] of each sequence, with the addressing of `decode_forward`."""
    for b in range(k_new.shape[0]):
        pos = torch.tensor(int(seqused_k[b]), device=k_cache.device)
        rows = _cache_rows(k_cache, page_table, cu_seqlens_k, b, pos)
        k_cache[rows] = k_new[b].to(k_cache.dtype)
        v_cache[rows] = v_new[b].to(v_cache.dtype)
        if delta_cache is not None and delta_new is not None:
            kv_head = torch.arange(k_new.shape[1], device=k_cache.device)
            idx = _delta_index(delta_cache, page_table, cu_seqlens_k, b, pos, kv_head)
            delta_cache[idx] = delta_new[b].to(delta_cache.dtype)

