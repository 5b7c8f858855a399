"""Decode over KV caches (SPEC §7) against float64, through the public `*_with_kvcache_func`s.

Runs the Triton decode kernels under TRITON_INTERPRET=1 on the CPU in fp16 (CI) and on CUDA in
bf16 (device). Every case is built from a *logical* cache (per sequence, positions 0..cap-1)
that is then laid out contiguous, paged (shuffled page table, unused pages NaN) or packed
(cu_seqlens_k); cache rows at or beyond a sequence's length hold NaN, so a kernel that reads
them fails. Expected values are computed here one (sequence, head) at a time from the logical
cache (`explicit_decode`), in float64 (truth, cross-checked against `reference.decode_forward`)
and in the kernel's dtype (the DESIGN error rule's baseline: fp16/bf16 scores, fp32 softmax,
probabilities rounded before P @ V).
"""

from __future__ import annotations

import importlib
import math
import zlib

import pytest
import torch
import torch.nn.functional as F

from kernel_utils import HAS_CUDA, assert_close_rule, kernel_device_dtype, max_err

DEV = kernel_device_dtype()
pytestmark = pytest.mark.skipif(DEV is None, reason="kernels need CUDA or TRITON_INTERPRET=1")
NAN = float("nan")


# ---------------------------------------------------------------------------------------------
# expected values
# ---------------------------------------------------------------------------------------------
def _positions(b, hk, h, length, idx, windows, heads):
    """Logical positions row (b, h) attends to, in order, duplicates kept (SPEC §3, §7)."""
    if idx is None:
        pos = list(range(length))
    else:
        row = idx[b] if idx.dim() == 2 else idx[b, hk]
        pos = [p for p in row.tolist() if 0 <= p < length]
    if windows is not None:
        sink, left, right, near = windows[h if windows.shape[0] == heads else hk].tolist()
        keep = []
        for p in pos:
            d = length - 1 - p
            if d >= 0 and (d < near or near + right <= d < near + right + left or p < sink):
                keep.append(p)
        pos = keep
    return pos


def explicit_decode(q, klog, vlog, lengths, *, scale, idx=None, windows=None, alpha=None,
                    dlog=None, logsig=True, lowp=False):
    """out [B, H, D], lse [B, H] from logical caches klog/vlog [B, cap, Hkv, D] (dlog
    [B, Hkv, cap]). lowp=False: float64. lowp=True: scores in q's dtype, softmax in fp32,
    probabilities rounded to q's dtype before P @ V."""
    B, H, D = q.shape
    Hkv = klog.shape[2]
    G = H // Hkv
    out = torch.zeros(B, H, D, dtype=q.dtype if lowp else torch.float64, device=q.device)
    lse = torch.full((B, H), -math.inf, dtype=torch.float64, device=q.device)
    for b in range(B):
        for h in range(H):
            hk = h // G
            pos = _positions(b, hk, h, int(lengths[b]), idx, windows, H)
            if not pos:
                continue
            kk, vv = klog[b, pos, hk], vlog[b, pos, hk]  # [n, D]
            if lowp:
                s = kk @ q[b, h]  # [n] in q's dtype
                if alpha is not None:
                    x = alpha[b, h].float() * dlog[b, hk, pos].float()
                    s = s + (F.logsigmoid(x) if logsig else x).to(s.dtype)
                s = s.float() * scale
                o = torch.softmax(s, 0).to(q.dtype) @ vv
            else:
                s = kk.double() @ q[b, h].double()
                if alpha is not None:
                    x = alpha[b, h].double() * dlog[b, hk, pos].double()
                    s = s + (F.logsigmoid(x) if logsig else x)
                s = s * scale
                o = torch.softmax(s, 0) @ vv.double()
            out[b, h] = o
            lse[b, h] = torch.logsumexp(s.double(), 0)
    return out, lse


def check_lse(lse, ref64, lowp, name="lse"):
    """-inf exactly where the truth is -inf; elsewhere err <= 2 * err(lowp) + eps."""
    assert lse.dtype == torch.float32
    lse, ref64, lowp = lse.double().cpu(), ref64.cpu(), lowp.cpu()
    empty = torch.isneginf(ref64)
    assert torch.equal(torch.isneginf(lse), empty), f"{name}: -inf rows differ"
    assert not torch.isnan(lse).any(), f"{name}: NaN"
    if (~empty).any():
        assert_close_rule(name, lse[~empty], ref64[~empty], lowp[~empty])


# ---------------------------------------------------------------------------------------------
# cases: logical caches laid out contiguous / paged / packed
# ---------------------------------------------------------------------------------------------
class Case:
    """A decode problem. `caps[b]` positions of logical cache per sequence; `used[b]` keys in
    use (None: all of caps[b]); append=True writes k_new/v_new(/delta_new) at used[b]."""

    def __init__(self, *, B, H, Hkv, D, caps, used=None, layout="contig", page_size=16,
                 gated=False, logsig=True, append=False, windows=None, idx=None, scale=None,
                 seed=0):
        device, dtype = DEV
        gen = torch.Generator().manual_seed(seed)
        self.B, self.H, self.Hkv, self.D = B, H, Hkv, D
        self.layout, self.gated, self.logsig, self.append = layout, gated, logsig, append
        self.scale = scale if scale is not None else D ** -0.5
        self.caps = list(caps)
        cap = max(self.caps)
        self.used = None if used is None else torch.tensor(used, dtype=torch.int32)
        # logical caches [B, cap, Hkv, D]; delta [B, Hkv, cap]
        self.q = torch.randn(B, H, D, generator=gen).to(dtype)
        self.klog = torch.randn(B, cap, Hkv, D, generator=gen).to(dtype)
        self.vlog = torch.randn(B, cap, Hkv, D, generator=gen).to(dtype)
        self.alpha = torch.randn(H, B, generator=gen).to(dtype).t() if gated else None  # view
        self.dlog = (2 * torch.randn(B, cap, Hkv, generator=gen)).to(dtype).transpose(1, 2) \
            if gated else None
        if append:
            self.k_new = torch.randn(B, Hkv, D, generator=gen).to(dtype)
            self.v_new = torch.randn(B, Hkv, D, generator=gen).to(dtype)
            self.d_new = torch.randn(B, Hkv, generator=gen).to(dtype) if gated else None
        # rows beyond what is used are never read: poison them
        in_use = self.used.tolist() if self.used is not None else self.caps
        for b in range(B):
            self.klog[b, in_use[b]:] = NAN
            self.vlog[b, in_use[b]:] = NAN
            if gated:
                self.dlog[b, :, in_use[b]:] = NAN
        self.windows = None if windows is None else torch.tensor(windows, dtype=torch.int32)
        self.idx = None if idx is None else torch.tensor(idx, dtype=torch.int32)
        self._layout(gen, page_size)
        self.device = device

    def _layout(self, gen, page_size):
        B, cap = self.B, max(self.caps)
        self.page_table = self.cu = None
        self.max_seqlen_k = None
        if self.layout == "contig":
            assert all(c == cap for c in self.caps)
            self.k, self.v = self.klog.clone(), self.vlog.clone()
            self.delta = self.dlog.clone() if self.gated else None
        elif self.layout == "paged":
            assert all(c == cap for c in self.caps) and cap % page_size == 0
            per = cap // page_size
            num_pages = B * per + 3
            table = torch.randperm(num_pages, generator=gen)[: B * per].view(B, per)
            self.page_table = table.to(torch.int32)

            def page(t):  # [B, cap, ...] -> [num_pages, page_size, ...], unused pages NaN
                paged = torch.full((num_pages, page_size, *t.shape[2:]), NAN, dtype=t.dtype)
                paged[table] = t.reshape(B, per, page_size, *t.shape[2:])
                return paged

            self.k, self.v = page(self.klog), page(self.vlog)
            self.delta = page(self.dlog.transpose(1, 2)) if self.gated else None
        else:  # packed: sequence b owns rows cu[b]:cu[b+1]
            self.cu = torch.tensor([0] + list(torch.tensor(self.caps).cumsum(0).tolist()),
                                   dtype=torch.int32)
            self.k = torch.cat([self.klog[b, :c] for b, c in enumerate(self.caps)])
            self.v = torch.cat([self.vlog[b, :c] for b, c in enumerate(self.caps)])
            self.delta = torch.cat([self.dlog[b, :, :c] for b, c in enumerate(self.caps)], 1) \
                if self.gated else None
            self.max_seqlen_k = max(self.caps)

    # lengths the decode attends to (after the append)
    def lengths(self):
        if self.used is None:
            return list(self.caps)
        return [u + (1 if self.append else 0) for u in self.used.tolist()]

    def logical_after_append(self):
        klog, vlog = self.klog.clone(), self.vlog.clone()
        dlog = self.dlog.clone() if self.gated else None
        if self.append:
            for b, p in enumerate(self.used.tolist()):
                klog[b, p], vlog[b, p] = self.k_new[b], self.v_new[b]
                if self.gated:
                    dlog[b, :, p] = self.d_new[b]
        return klog, vlog, dlog

    def expected(self):
        """(truth out, truth lse, lowp out, lowp lse), computed on the CPU."""
        klog, vlog, dlog = self.logical_after_append()
        kw = dict(scale=self.scale, idx=self.idx, windows=self.windows, alpha=self.alpha,
                  dlog=dlog, logsig=self.logsig)
        o64, l64 = explicit_decode(self.q, klog, vlog, self.lengths(), **kw)
        olp, llp = explicit_decode(self.q, klog, vlog, self.lengths(), lowp=True, **kw)
        return o64, l64, olp, llp

    def tensors(self):
        """Fresh copies of every input on the kernel's device (the call may append)."""
        dev = self.device

        def mv(t):
            return None if t is None else t.to(dev).clone()

        return {n: mv(getattr(self, n)) for n in (
            "q", "k", "v", "alpha", "delta", "page_table", "cu", "used", "windows", "idx")} | (
            {"k_new": mv(self.k_new), "v_new": mv(self.v_new), "d_new": mv(self.d_new)}
            if self.append else {})


def run(fsa, case: Case, t=None, variant=None, **kw):
    """Call the public decode function of the case's layout and variant on tensors t."""
    t = t or case.tensors()
    variant = variant or ("gated" if case.gated else "dense")
    packed = case.layout == "packed"
    name = f"flash_{variant}_attn_{'varlen_' if packed else ''}with_kvcache_func"
    args = [t["q"], t["k"], t["v"]]
    if variant == "gated":
        args += [t["alpha"], t["delta"]]
        kw.setdefault("is_logsigmoid_gate", case.logsig)
        if case.append:
            kw["delta_new"] = t["d_new"]
    if packed:
        args += [t["cu"], case.max_seqlen_k]
    else:
        kw["page_table"] = t["page_table"]
    if case.append:
        kw["k_new"], kw["v_new"] = t["k_new"], t["v_new"]
    return getattr(fsa, name)(
        *args, softmax_scale=case.scale, window_sizes=t["windows"], seqused_k=t["used"],
        gather_kv_indices=t["idx"], return_lse=True, **kw)


def check_case(fsa, case: Case, splits=(1, 3), variant=None, **kw):
    """Run with each split count: every result obeys the error rule against float64, and the
    split counts agree with each other within rounding."""
    o64, l64, olp, llp = case.expected()
    results = []
    for ns in splits:
        out, lse = run(fsa, case, variant=variant, num_splits=ns, **kw)
        assert out.shape == case.q.shape and out.dtype == case.q.dtype
        assert lse.shape == (case.B, case.H)
        assert_close_rule(f"out (num_splits={ns})", out.cpu(), o64.cpu(), olp.cpu())
        check_lse(lse, l64, llp, f"lse (num_splits={ns})")
        empty = torch.isneginf(l64.cpu())
        assert (out.cpu()[empty] == 0).all(), "rows with no visible key must be 0"
        results.append((out.cpu().double(), lse.cpu().double()))
    # splits differ only by the fp32 combine: within a couple of output ulps
    ulp = 2.0 ** -7 if case.q.dtype == torch.bfloat16 else 2.0 ** -10
    for out, lse in results[1:]:
        o0, l0 = results[0]
        assert max_err(out, o0) <= 2 * ulp * max(o0.abs().max().item(), 1.0)
        fin = torch.isfinite(l0)
        assert torch.equal(torch.isfinite(lse), fin)
        if fin.any():
            assert (lse[fin] - l0[fin]).abs().max().item() <= 1e-4 * max(
                l0[fin].abs().max().item(), 1.0)
    return o64, l64


def reference_module(fsa):
    return importlib.import_module(f"{fsa.__name__}.reference")


# ---------------------------------------------------------------------------------------------
# the cases
# ---------------------------------------------------------------------------------------------
CASES = {
    # contiguous caches; seqused_k with an empty sequence; GQA / MQA / MHA; head dims
    "contig_gqa_d64": dict(B=2, H=4, Hkv=2, D=64, caps=[100, 100], used=[77, 0]),
    "contig_mqa_d40": dict(B=1, H=4, Hkv=1, D=40, caps=[300], scale=0.3),
    "contig_mha_d16": dict(B=3, H=2, Hkv=2, D=16, caps=[33, 33, 33], used=[33, 1, 5]),
    # paged caches, shuffled page tables: a full cache, one key past a page, an empty one
    "paged16_gqa": dict(B=3, H=4, Hkv=2, D=64, caps=[80] * 3, used=[80, 17, 0],
                        layout="paged", page_size=16),
    "paged32_gated": dict(B=2, H=4, Hkv=2, D=40, caps=[128, 128], used=[50, 128],
                          layout="paged", page_size=32, gated=True),
    "paged_full_gated_linear": dict(B=2, H=4, Hkv=1, D=16, caps=[64, 64], layout="paged",
                                    page_size=32, gated=True, logsig=False),
    # packed caches, with an empty sequence, with and without seqused_k
    "packed": dict(B=3, H=4, Hkv=2, D=64, caps=[60, 0, 45], layout="packed"),
    "packed_used_gated_linear": dict(B=3, H=2, Hkv=1, D=16, caps=[60, 3, 45], used=[10, 0, 45],
                                     layout="packed", gated=True, logsig=False),
    # flex windows [sink, left, right, near], per KV head and per query head
    "window_kv": dict(B=2, H=4, Hkv=2, D=64, caps=[200, 200], used=[200, 70],
                      windows=[[5, 30, 20, 40], [0, 50, 0, 16]]),
    "window_kv_paged": dict(B=2, H=4, Hkv=2, D=16, caps=[192, 192], used=[150, 192],
                            layout="paged", page_size=32, windows=[[40, 10, 60, 0], [3, 0, 0, 1]]),
    # band edges one key past / before a tile edge (tiles of 32 under the interpreter, 64 on
    # GPU): a tile range that is one tile short loses a visible key
    "window_edges": dict(B=2, H=2, Hkv=2, D=16, caps=[200, 200], used=[200, 193],
                         windows=[[33, 34, 62, 9], [65, 64, 62, 1]]),
    "window_qhead": dict(B=2, H=4, Hkv=2, D=16, caps=[120, 120], used=[120, 33],
                         windows=[[5, 30, 20, 40], [0, 50, 0, 16], [0, 0, 0, 200], [64, 0, 0, 0]]),
    # gathered keys: duplicates, negatives, entries past the sequence (< capacity)
    "gather_shared": dict(B=2, H=4, Hkv=2, D=64, caps=[96, 96], used=[90, 7],
                          idx=[[3, 3, -1, 89, 0, 90, 50, 50, 50, -7] + list(range(56, 96)),
                               [6, 0, 0, 95, 1, -1, 2, 2, 3] + [-1] * 41]),
    "gather_per_head_paged": dict(
        B=2, H=4, Hkv=2, D=40, caps=[64, 64], used=[64, 20], layout="paged", page_size=16,
        gated=True,
        idx=[[[63, 0, 0, -2, 17, 33], [5, 5, 5, 5, 5, 5]],
             [[19, 20, 21, 0, 1, -1], [-1, -1, -1, -1, -1, -1]]]),
    "gather_window_packed": dict(B=2, H=4, Hkv=2, D=16, caps=[70, 40], layout="packed",
                                 idx=[[69, 68, 0, 1, 30, 69], [39, 0, 20, 10, -1, 38]],
                                 windows=[[1, 10, 20, 5], [0, 100, 0, 0]]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_decode(fsa, name):
    check_case(fsa, Case(seed=zlib.crc32(name.encode()) % 1000, **CASES[name]))


def test_decode_heuristic_splits_and_many(fsa):
    """The split heuristic (num_splits=None) and more splits than tiles agree with one split."""
    case = Case(B=1, H=4, Hkv=2, D=64, caps=[250], used=[237], seed=3)
    check_case(fsa, case, splits=(1, None, 64))


def test_decode_truth_matches_reference(fsa):
    """The test's own float64 computation is the package reference's (same semantics)."""
    ref = reference_module(fsa)
    for name in ("paged32_gated", "gather_per_head_paged", "gather_window_packed", "window_qhead"):
        case = Case(seed=1, **CASES[name])
        o64, l64, _, _ = case.expected()
        t = {n: (v.cpu().double() if v is not None and v.is_floating_point() else
                 (None if v is None else v.cpu())) for n, v in case.tensors().items()}
        out, lse = ref.decode_forward(
            t["q"], t["k"], t["v"], alpha=t["alpha"], delta_cache=t["delta"],
            page_table=t["page_table"], cu_seqlens_k=t["cu"], seqused_k=t["used"],
            gather_kv_indices=t["idx"], window_sizes=t["windows"],
            max_seqlen_k=case.max_seqlen_k or 0, softmax_scale=case.scale, softmax_threshold=0.0,
            gate_threshold=0.0, is_logsigmoid_gate=case.logsig)
        torch.testing.assert_close(out, o64.cpu(), rtol=0, atol=1e-9)
        torch.testing.assert_close(lse.double(), l64.cpu(), rtol=1e-6, atol=0)


def test_decode_all_empty(fsa):
    """seqused_k = 0 everywhere: out 0, lse -inf, for one and several splits."""
    case = Case(B=2, H=4, Hkv=2, D=16, caps=[64, 64], used=[0, 0], layout="paged",
                page_size=16, seed=6)
    for ns in (1, 4):
        out, lse = run(fsa, case, num_splits=ns)
        assert (out.cpu() == 0).all() and torch.isneginf(lse.cpu()).all()


# ---------------------------------------------------------------------------------------------
# append (k_new / v_new / delta_new written at seqused_k before attending)
# ---------------------------------------------------------------------------------------------
APPEND_CASES = {
    # page 16, three pages: last row of page 0, last row of the last page, first row
    "paged_boundaries": dict(B=3, H=4, Hkv=2, D=64, caps=[48] * 3, used=[15, 47, 0],
                             layout="paged", page_size=16, gated=True),
    "contig": dict(B=2, H=4, Hkv=1, D=40, caps=[70, 70], used=[69, 3]),
    "packed": dict(B=3, H=4, Hkv=2, D=16, caps=[20, 7, 1], used=[19, 0, 0], layout="packed",
                   gated=True, logsig=False),
    "paged_gather": dict(B=2, H=4, Hkv=2, D=16, caps=[32, 32], used=[31, 16], layout="paged",
                         page_size=16, idx=[[31, 31, 0, -1, 30], [16, 15, 17, 31, 0]]),
}


def _physical_rows(case: Case, b: int, p: int):
    """Index of logical position p of sequence b in the layout's cache (token dims)."""
    if case.layout == "paged":
        ps = case.k.shape[1]
        return int(case.page_table[b, p // ps]), p % ps
    if case.layout == "packed":
        return (int(case.cu[b]) + p,)
    return b, p


@pytest.mark.parametrize("name", list(APPEND_CASES))
def test_decode_append(fsa, name):
    case = Case(append=True, seed=len(name), **APPEND_CASES[name])
    o64, l64, olp, llp = case.expected()
    t = case.tensors()
    ptrs = (t["k"].data_ptr(), t["v"].data_ptr())
    out, lse = run(fsa, case, t=t, num_splits=2)
    assert (t["k"].data_ptr(), t["v"].data_ptr()) == ptrs, "the append must be in place"
    assert_close_rule("out", out.cpu(), o64.cpu(), olp.cpu())
    check_lse(lse, l64, llp)
    # the caches changed exactly at the appended rows (bitwise), nowhere else
    exp_k, exp_v = case.k.clone(), case.v.clone()
    exp_d = case.delta.clone() if case.gated else None
    for b, p in enumerate(case.used.tolist()):
        at = _physical_rows(case, b, p)
        exp_k[at], exp_v[at] = case.k_new[b], case.v_new[b]
        if case.gated:
            if case.layout == "paged":
                exp_d[at] = case.d_new[b]
            elif case.layout == "packed":
                exp_d[:, at[0]] = case.d_new[b]
            else:
                exp_d[b, :, p] = case.d_new[b]
    for got, exp in ((t["k"], exp_k), (t["v"], exp_v), (t["delta"], exp_d)):
        if exp is not None:
            torch.testing.assert_close(got.cpu(), exp, rtol=0, atol=0, equal_nan=True)


def test_kv_append_skips_out_of_range(fsa):
    """The append kernel writes nothing for a position outside the capacity (only reachable
    with skip_checks=True) and never follows an out-of-range page id."""
    device, dtype = DEV
    ops = importlib.import_module(f"{fsa.__name__}.ops")
    gen = torch.Generator().manual_seed(8)
    kp = torch.randn(5, 16, 2, 16, generator=gen).to(device, dtype)
    vp = torch.randn(5, 16, 2, 16, generator=gen).to(device, dtype)
    k_new = torch.randn(3, 2, 16, generator=gen).to(device, dtype)
    table = torch.tensor([[0, 1], [2, 99], [3, -4]], dtype=torch.int32, device=device)
    used = torch.tensor([32, 20, -1], dtype=torch.int32, device=device)  # past cap, bad page, <0
    exp_k, exp_v = kp.clone(), vp.clone()
    ops.kv_append(kp, vp, None, k_new, k_new, None, table, None, used)
    assert torch.equal(kp, exp_k) and torch.equal(vp, exp_v)


# ---------------------------------------------------------------------------------------------
# preallocated outputs, out-of-range inputs with skip_checks
# ---------------------------------------------------------------------------------------------
def test_decode_nan_poisoned_out(fsa):
    case = Case(seed=9, **CASES["paged16_gqa"])
    o64, l64, olp, llp = case.expected()
    out = torch.full_like(case.q, NAN, device=case.device)
    lse = torch.full((case.B, case.H), NAN, dtype=torch.float32, device=case.device)
    got_o, got_l = run(fsa, case, num_splits=3, out=out, lse=lse)
    assert got_o is out and got_l is lse
    assert_close_rule("out", out.cpu(), o64.cpu(), olp.cpu())
    check_lse(lse, l64, llp)


def test_decode_garbage_beyond_length_skip_checks(fsa):
    """With skip_checks=True, page-table entries of pages past the sequence and gather entries
    past the capacity hold garbage; the kernel never follows them and ignores those keys."""
    case = Case(seed=10, **CASES["gather_per_head_paged"])
    o64, l64, olp, llp = case.expected()
    t = case.tensors()
    t["page_table"][1, 2:] = torch.tensor([10 ** 6, -7], dtype=torch.int32)  # seq 1 uses 20 keys
    t["idx"][0, 0, 3] = 10 ** 8
    t["idx"][1, 1, :3] = torch.tensor([2 ** 31 - 1, 64, 1000], dtype=torch.int32)
    out, lse = run(fsa, case, t=t, num_splits=2, skip_checks=True)
    assert_close_rule("out", out.cpu(), o64.cpu(), olp.cpu())
    check_lse(lse, l64, llp)


# ---------------------------------------------------------------------------------------------
# GPU only (bf16): realistic shapes, split heuristic, CUDA graphs
# ---------------------------------------------------------------------------------------------
GPU_CASES = {
    "contig_long": dict(B=2, H=32, Hkv=8, D=128, caps=[4097, 4097], used=[4097, 1000]),
    "paged64_append": dict(B=3, H=32, Hkv=8, D=128, caps=[4096] * 3, used=[4095, 63, 0],
                           layout="paged", page_size=64, append=True),
    "gather_topk": dict(B=2, H=16, Hkv=2, D=128, caps=[8192, 8192], used=[8192, 3000],
                        idx=None),
    "gated_window_d256": dict(B=2, H=8, Hkv=2, D=256, caps=[2048, 2048], gated=True,
                              windows=[[64, 300, 200, 128], [0, 0, 0, 700]]),
    "mqa_d96_packed": dict(B=3, H=128, Hkv=1, D=96, caps=[1500, 65, 1], layout="packed"),
}


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("name", list(GPU_CASES))
def test_decode_gpu_bf16(fsa, name):
    kw = dict(GPU_CASES[name])
    if name == "gather_topk":
        gen = torch.Generator().manual_seed(11)
        idx = torch.randint(-100, 8192, (2, 1024), generator=gen)
        idx[:, :8] = idx[:, 8:16]  # duplicates
        kw["idx"] = idx.tolist()
    check_case(fsa, Case(seed=12, **kw), splits=(1, None, 7))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_decode_cuda_graph_replay(fsa):
    """Append + decode captured in a CUDA graph (skip_checks=True: no value checks, so no host
    sync) replays on new values of q, k_new, v_new and seqused_k."""
    B, H, Hkv, D, S = 4, 32, 8, 128, 2048
    dev, dt = "cuda", torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(13)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, device=dev).to(dt)

    k, v = rnd(B, S, Hkv, D), rnd(B, S, Hkv, D)
    q, kn, vn = rnd(B, H, D), rnd(B, Hkv, D), rnd(B, Hkv, D)
    used = torch.tensor([5, 2000, 0, 1023], dtype=torch.int32, device=dev)

    def step(q_, k_, v_, kn_, vn_, used_):
        return fsa.flash_dense_attn_with_kvcache_func(
            q_, k_, v_, seqused_k=used_, k_new=kn_, v_new=vn_, skip_checks=True, return_lse=True)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step(q, k, v, kn, vn, used)  # warm-up (compiles); the append is idempotent
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g_out, g_lse = step(q, k, v, kn, vn, used)
    # new values, then replay
    k2, v2 = k.clone(), v.clone()
    q.copy_(rnd(B, H, D))
    kn.copy_(rnd(B, Hkv, D))
    vn.copy_(rnd(B, Hkv, D))
    used.copy_(torch.tensor([6, 1, 2047, 17], dtype=torch.int32))
    exp_out, exp_lse = step(q.clone(), k2, v2, kn.clone(), vn.clone(), used.clone())
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(k, k2) and torch.equal(v, v2)
    torch.testing.assert_close(g_out, exp_out, rtol=0, atol=0)
    torch.testing.assert_close(g_lse, exp_lse, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# block skipping (SPEC §7)
# ---------------------------------------------------------------------------------------------
def _structured(case: Case, hot_blocks, shut_blocks=(), seed=0):
    """Make the case's keys LLM-like: each query strongly aligned with the keys of block 0,
    of its sequence's last block and of `hot_blocks` (64-key blocks), weakly with the rest,
    so the softmax test can drop the others; gated cases close `shut_blocks` (delta - 80)."""
    gen = torch.Generator().manual_seed(seed)
    B, H, Hkv, D = case.B, case.H, case.Hkv, case.D
    lengths = case.lengths()
    q = torch.randn(B, H, D, generator=gen)
    klog = 0.3 * torch.randn(case.klog.shape, generator=gen)
    for b in range(B):
        last = (lengths[b] - 1) // 64
        for blk in {0, last, *hot_blocks}:
            rows = slice(64 * blk, min(64 * blk + 64, lengths[b]))
            for hk in range(Hkv):
                klog[b, rows, hk] += 0.5 * q[b, hk * (H // Hkv)]
    in_use = case.used.tolist() if case.used is not None else case.caps
    for b in range(B):
        klog[b, in_use[b]:] = NAN
    case.q, case.klog = q.to(case.q.dtype), klog.to(case.klog.dtype)
    if case.gated:
        dlog = case.dlog.float()
        for blk in shut_blocks:
            dlog[:, :, 64 * blk: 64 * blk + 64] -= 80.0
        case.dlog = dlog.to(case.dlog.dtype)
        case.alpha = case.alpha.abs() + 1.0
    case._layout(torch.Generator().manual_seed(seed + 1), 64)


def _kept_decode(case: Case, codes, lowp):
    """Attention of each (sequence, head) over the keys of its kept blocks (codes < 2), as
    explicit_decode computes it (float64, or the kernel dtype's baseline)."""
    klog, vlog, dlog = case.logical_after_append()
    out = torch.zeros(case.q.shape, dtype=case.q.dtype if lowp else torch.float64)
    G = case.H // case.Hkv
    for b, length in enumerate(case.lengths()):
        for h in range(case.H):
            pos = [p for p in range(length) if int(codes[b, h, p // 64]) < 2]
            kk, vv = klog[b, pos, h // G], vlog[b, pos, h // G]
            dt = case.q.dtype if lowp else torch.float64
            s = kk.to(dt) @ case.q[b, h].to(dt)
            if case.gated:
                x = case.alpha[b, h].double() * dlog[b, h // G, pos].double()
                s = s + (F.logsigmoid(x) if case.logsig else x).to(s.dtype)
            s = s.double() * case.scale if not lowp else s.float() * case.scale
            p_ = torch.softmax(s, 0)
            out[b, h] = (p_.to(case.q.dtype) @ vv) if lowp else p_ @ vv.double()
    return out


SKIP_CASES = {
    "contig": dict(B=2, H=4, Hkv=2, D=64, caps=[448, 448], used=[448, 300]),
    "paged_gqa": dict(B=2, H=8, Hkv=2, D=32, caps=[384, 384], used=[383, 129],
                      layout="paged", page_size=64),
    "packed": dict(B=3, H=4, Hkv=4, D=16, caps=[320, 65, 200], layout="packed"),
    "gated_paged": dict(B=2, H=4, Hkv=2, D=32, caps=[384, 384], used=[384, 250],
                        layout="paged", page_size=64, gated=True),
}


@pytest.mark.parametrize("name", list(SKIP_CASES))
def test_decode_skips_blocks_like_reference(fsa, name):
    """Sparse (t=1) and gated (default gate threshold) decode drop the blocks the rule of SPEC
    §7 drops: codes equal the reference's for every split count (the anchors are recomputed
    per split), and the output obeys the error rule against float64 attention over exactly
    the kept blocks. V (and for gated blocks K) of dropped blocks is never needed: the rows
    of those blocks are finite here, so this checks the decisions, not the loads."""
    case = Case(seed=zlib.crc32(name.encode()) % 1000, **SKIP_CASES[name])
    _structured(case, hot_blocks=(2,), shut_blocks=(3, 4))
    ref = reference_module(fsa)
    t = {n: (v.cpu().double() if v is not None and v.is_floating_point() else
             (None if v is None else v.cpu())) for n, v in case.tensors().items()}
    variant = "gated" if case.gated else "sparse"
    ref_codes = torch.zeros(case.B, case.H, -(-max(case.caps) // 64), dtype=torch.uint8)
    ref.decode_forward(
        t["q"], t["k"], t["v"], alpha=t["alpha"], delta_cache=t["delta"],
        page_table=t["page_table"], cu_seqlens_k=t["cu"], seqused_k=t["used"],
        gather_kv_indices=None, window_sizes=None, max_seqlen_k=case.max_seqlen_k or 0,
        softmax_scale=case.scale, softmax_threshold=1.0 if variant == "sparse" else 0.0,
        gate_threshold=-1.0 if variant == "gated" else 0.0, is_logsigmoid_gate=case.logsig,
        codes=ref_codes)
    st = fsa.block_skip_stats(ref_codes)
    assert st["softmax_skipped"] + st["gate_skipped"] > 0 and st["kept"] > 0, st
    if variant == "gated":
        assert st["gate_skipped"] > 0, st
    o64 = _kept_decode(case, ref_codes, lowp=False)
    olp = _kept_decode(case, ref_codes, lowp=True)
    for ns in (1, 3):
        out, lse, codes = run(fsa, case, variant=variant, num_splits=ns, return_skip_mask=True)
        assert codes.dtype == torch.uint8 and codes.shape == ref_codes.shape
        differ = (codes.cpu() != ref_codes).sum().item()
        assert differ == 0, f"{differ} codes differ from the reference (num_splits={ns})"
        assert_close_rule(f"out (num_splits={ns})", out.cpu(), o64, olp)
        assert torch.isfinite(lse).all()


def test_decode_threshold_zero_and_windows_drop_nothing(fsa):
    """t = 0 is exact dense decode and returns no codes; with a window (sparse by
    construction) the threshold drops nothing either."""
    case = Case(seed=5, **CASES["contig_gqa_d64"])
    check_case(fsa, case, splits=(2,), variant="sparse", softmax_threshold=0.0)
    out, codes = run(fsa, case, variant="sparse", softmax_threshold=0.0, num_splits=2,
                     return_skip_mask=True)[::2]
    assert codes.numel() == 0
    wcase = Case(seed=6, **CASES["window_kv"])
    check_case(fsa, wcase, splits=(2,), variant="sparse", softmax_threshold=1.0)
