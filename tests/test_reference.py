"""Tests of reference.py, the plain-PyTorch implementation of SPEC §1–§7.

The chunked forward/backward are checked against `attention_naive` (unchunked float64,
differentiated by autograd), the naive one against the SPEC formulas written out in loops,
decode against the forward on the equivalent last-row problem, and everything against stored
golden vectors (scripts/make_golden.py).
"""

import json
import math
from pathlib import Path

import pytest
import torch

GOLDEN = Path(__file__).parent / "golden" / "reference_v1.safetensors"
F64 = torch.float64


@pytest.fixture(scope="module")
def reference(fsa):
    return fsa.reference


def rand(gen, *shape, dtype=F64):
    return torch.randn(*shape, generator=gen, dtype=F64).to(dtype)


def assert_lse_equal(a, b, atol=1e-12):
    assert a.shape == b.shape
    assert torch.equal(torch.isneginf(a), torch.isneginf(b))
    fin = torch.isfinite(b)
    assert torch.isfinite(a[fin]).all()
    torch.testing.assert_close(a[fin].double(), b[fin].double(), rtol=0, atol=atol)


def make_problem(gen, B, Sq, Sk, H, Hkv, D, gated=False, dtype=F64):
    t = dict(q=rand(gen, B, Sq, H, D, dtype=dtype), k=rand(gen, B, Sk, Hkv, D, dtype=dtype),
             v=rand(gen, B, Sk, Hkv, D, dtype=dtype))
    if gated:
        # alpha as a strided view (transpose of [B, Sq, H]), as the SPEC allows
        t["alpha"] = (2 * rand(gen, B, Sq, H)).transpose(1, 2)
        t["delta"] = 2 * rand(gen, B, Hkv, Sk)
    return t


def ws(rows):
    return torch.tensor(rows, dtype=torch.int32)


# ---------------------------------------------------------------------------------------------
# masks and windows
# ---------------------------------------------------------------------------------------------
def spec_visible(i, j, sq, sk, causal, w):
    """SPEC §3 written out for one (query, key) pair."""
    dist = i + (sk - sq) - j
    if w is not None:
        sink, left, right, near = w
        return dist >= 0 and (dist < near or near + right <= dist < near + right + left
                              or j < sink)
    return dist >= 0 if causal else True


@pytest.mark.parametrize("sq,sk", [(5, 9), (9, 5), (7, 7)])
def test_mask_visible_matches_spec(reference, sq, sk):
    heads = 4
    per_kv = ws([[1, 2, 1, 1], [0, 0, 3, 2]])  # [Hkv=2, 4]
    per_q = ws([[0, 1, 0, 1], [2, 0, 0, 0], [0, 3, 1, 0], [1, 9, 9, 9]])  # [H=4, 4]
    rows, cols = torch.arange(sq), torch.arange(sk)
    for causal in (False, True):
        m = reference.mask_visible(rows, cols, sq, sk, is_causal=causal, num_heads=heads)
        exp = [[spec_visible(i, j, sq, sk, causal, None) for j in range(sk)] for i in range(sq)]
        assert torch.equal(m[0], torch.tensor(exp))
    for w in (per_kv, per_q):
        m = reference.mask_visible(rows, cols, sq, sk, window_sizes=w, num_heads=heads)
        assert m.shape == (heads, sq, sk)
        for h in range(heads):
            wh = w[h // (heads // w.shape[0])].tolist()
            exp = [[spec_visible(i, j, sq, sk, True, wh) for j in range(sk)] for i in range(sq)]
            assert torch.equal(m[h], torch.tensor(exp)), (h, wh)


@pytest.mark.parametrize("seqlen_k,heads", [(5000, 4), (1030, 8), (100, 2), (1031, 3), (1, 1)])
def test_window_heuristic_bands_partition(reference, seqlen_k, heads):
    w = reference.window_sizes_heuristic(seqlen_k, heads, "cpu")
    assert w.dtype == torch.int32 and w.shape == (heads, 4)
    assert (w[:, 0] == 64).all() and (w[:, 3] == 1024).all() and (w >= 0).all()
    # bands [near + right, near + right + left) are disjoint and cover [near, seqlen_k)
    covered = torch.zeros(max(seqlen_k, 1025) + 1, dtype=torch.int64)
    for sink, left, right, near in w.tolist():
        covered[near + right: near + right + left] += 1
    assert (covered[1024:seqlen_k] == 1).all()
    assert covered[:1024].sum() == 0 and covered[max(seqlen_k, 1024):].sum() == 0
    widths = w[:, 1]
    assert widths.max() - widths.min() <= 1  # equal split


def test_window_heuristic_tensor_parallel(reference):
    full = reference.window_sizes_heuristic(9000, 8, "cpu", window_near=100, window_sink=4)
    for tp in (2, 4, 8):
        parts = [reference.window_sizes_heuristic(9000, 8 // tp, "cpu", window_near=100,
                                                  window_sink=4, num_heads_kv_global=8,
                                                  tp_rank=r, tp_size=tp) for r in range(tp)]
        assert torch.equal(torch.cat(parts), full)
    # more ranks than KV heads: each head replicated over tp_size // Hkv consecutive ranks
    two = reference.window_sizes_heuristic(9000, 2, "cpu")
    for r in range(4):
        got = reference.window_sizes_heuristic(9000, 1, "cpu", num_heads_kv_global=2,
                                               tp_rank=r, tp_size=4)
        assert torch.equal(got, two[r // 2: r // 2 + 1])


# ---------------------------------------------------------------------------------------------
# chunked forward vs naive
# ---------------------------------------------------------------------------------------------
FWD_CASES = {
    # name: (B, Sq, Sk, H, Hkv, D, gated, kwargs)
    "dense": (2, 19, 23, 2, 2, 16, False, {}),
    "causal_sq_lt_sk": (1, 13, 29, 2, 2, 8, False, dict(is_causal=True)),
    "causal_sq_gt_sk": (2, 29, 13, 2, 1, 8, False, dict(is_causal=True)),  # masked rows
    "gqa_causal": (1, 21, 21, 6, 2, 8, False, dict(is_causal=True, softmax_scale=0.7)),
    "mqa": (2, 11, 17, 4, 1, 8, False, {}),
    "win_bands": (1, 40, 40, 2, 2, 8, False, dict(window_sizes=ws([[2, 5, 3, 4], [0, 6, 9, 1]]))),
    "win_zero_width": (1, 30, 30, 2, 2, 8, False,
                       dict(window_sizes=ws([[0, 0, 3, 4], [1, 0, 0, 0]]))),
    "win_sink_only": (1, 25, 30, 2, 1, 8, False, dict(window_sizes=ws([[3, 0, 0, 0]]))),
    "win_near_only": (1, 30, 25, 2, 2, 8, False, dict(window_sizes=ws([[0, 0, 0, 5]] * 2))),
    "win_beyond_seq": (1, 20, 20, 2, 2, 8, False,
                       dict(window_sizes=ws([[0, 50, 40, 2], [0, 100, 10, 30]]))),
    "win_per_qhead": (1, 24, 24, 4, 2, 8, False,
                      dict(window_sizes=ws([[1, 2, 3, 4], [0, 8, 2, 1], [5, 0, 0, 1],
                                            [0, 0, 0, 0]]))),  # head 3 sees nothing
    "gated_logsig": (2, 17, 23, 4, 2, 8, True, dict(is_causal=True)),
    "gated_linear": (1, 19, 15, 2, 2, 8, True, dict(is_logsigmoid_gate=False)),
    "gated_window": (1, 33, 33, 4, 2, 8, True,
                     dict(window_sizes=ws([[2, 5, 3, 4], [0, 6, 9, 1]]))),
}


@pytest.mark.parametrize("name", sorted(FWD_CASES))
def test_forward_chunked_matches_naive(reference, name):
    B, Sq, Sk, H, Hkv, D, gated, kw = FWD_CASES[name]
    t = make_problem(torch.Generator().manual_seed(1), B, Sq, Sk, H, Hkv, D, gated)
    exp_out, exp_lse = reference.attention_naive(**t, **kw)
    out, lse = reference.attention_forward(**t, **kw, chunk_size=8)
    assert out.dtype == F64 and lse.dtype == F64 and out.shape == t["q"].shape
    assert lse.shape == (B, H, Sq)
    torch.testing.assert_close(out, exp_out, rtol=0, atol=1e-12)
    assert_lse_equal(lse, exp_lse)
    masked = torch.isneginf(lse)  # rows that see no key: out 0
    assert (out.permute(0, 2, 1, 3)[masked] == 0).all()
    if name in ("causal_sq_gt_sk", "win_per_qhead"):
        assert masked.any()


def test_naive_dense_against_softmax_formula(reference):
    """The naive reference itself, against SPEC §4/§6 spelled out for one row."""
    gen = torch.Generator().manual_seed(2)
    t = make_problem(gen, 1, 6, 9, 2, 1, 8, gated=True)
    out, lse = reference.attention_naive(**t, is_causal=True)
    i, h = 2, 1  # query 2 sees keys 0..5 (dist = i + 3 - j >= 0)
    q, k, v = t["q"][0, i, h], t["k"][0, :6, 0], t["v"][0, :6, 0]
    g = torch.nn.functional.logsigmoid(t["alpha"][0, h, i] * t["delta"][0, 0, :6])
    s = 8 ** -0.5 * (k @ q + g)
    torch.testing.assert_close(lse[0, h, i], torch.logsumexp(s, 0), rtol=0, atol=1e-13)
    torch.testing.assert_close(out[0, i, h], torch.softmax(s, 0) @ v, rtol=0, atol=1e-13)


def varlen_problem(gen, gated):
    cu_q = torch.tensor([0, 7, 7, 20, 21, 30], dtype=torch.int32)  # seq 1: no query
    cu_k = torch.tensor([0, 9, 12, 30, 30, 35], dtype=torch.int32)  # seq 3: no key
    H, Hkv, D = 4, 2, 8
    t = dict(q=rand(gen, 30, H, D), k=rand(gen, 35, Hkv, D), v=rand(gen, 35, Hkv, D),
             cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=13, max_seqlen_k=18)
    if gated:
        t["alpha"] = rand(gen, 30, H).t()  # [H, total_q], strided
        t["delta"] = rand(gen, Hkv, 35)
    return t


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seqused", [False, True])
def test_varlen_matches_per_sequence(reference, gated, causal, seqused):
    t = varlen_problem(torch.Generator().manual_seed(3), gated)
    if seqused:
        t["seqused_k"] = torch.tensor([5, 3, 18, 0, 2], dtype=torch.int32)
    out, lse = reference.attention_forward(**t, is_causal=causal, chunk_size=4)
    exp_out, exp_lse = reference.attention_naive(**t, is_causal=causal)
    torch.testing.assert_close(out, exp_out, rtol=0, atol=1e-12)
    assert_lse_equal(lse, exp_lse)
    # each sequence as its own batched problem (independent of the varlen slicing)
    cq, ck = t["cu_seqlens_q"].tolist(), t["cu_seqlens_k"].tolist()
    for b in range(len(cq) - 1):
        qs = slice(cq[b], cq[b + 1])
        nk = t["seqused_k"][b].item() if seqused else ck[b + 1] - ck[b]
        ks = slice(ck[b], ck[b] + nk)
        sub = dict(q=t["q"][None, qs], k=t["k"][None, ks], v=t["v"][None, ks])
        if gated:
            sub.update(alpha=t["alpha"][None, :, qs], delta=t["delta"][None, :, ks])
        o, l = reference.attention_naive(**sub, is_causal=causal)
        torch.testing.assert_close(out[qs], o[0], rtol=0, atol=1e-12)
        assert_lse_equal(lse[:, qs], l[0])
    assert (out[cq[3]:cq[4]] == 0).all() and torch.isneginf(lse[:, cq[3]:cq[4]]).all()


def test_seqused_k_batched_truncates_keys(reference):
    t = make_problem(torch.Generator().manual_seed(4), 2, 5, 12, 2, 2, 8, gated=True)
    used = torch.tensor([7, 12], dtype=torch.int32)
    out, lse = reference.attention_forward(**t, seqused_k=used, is_causal=True, chunk_size=4)
    for b, n in enumerate(used.tolist()):
        o, l = reference.attention_naive(t["q"][b:b + 1], t["k"][b:b + 1, :n],
                                         t["v"][b:b + 1, :n], alpha=t["alpha"][b:b + 1],
                                         delta=t["delta"][b:b + 1, :, :n], is_causal=True)
        torch.testing.assert_close(out[b:b + 1], o, rtol=0, atol=1e-12)
        assert_lse_equal(lse[b:b + 1], l)


# ---------------------------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------------------------
def check_backward(reference, t, kw, chunk_size=8):
    """Manual chunked backward vs autograd through attention_naive (float64)."""
    names = [n for n in ("q", "k", "v", "alpha", "delta") if n in t]
    leaves = {n: t[n].detach().clone().requires_grad_() for n in names}
    out, lse = reference.attention_naive(**{**t, **leaves}, **kw)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(9), dtype=F64)
    out.backward(dout)
    fwd_out, fwd_lse = reference.attention_forward(**t, **kw, chunk_size=chunk_size)
    rest = {n: x for n, x in t.items() if n not in ("q", "k", "v")}
    grads = reference.attention_backward(dout, t["q"], t["k"], t["v"], fwd_out, fwd_lse, **rest,
                                         **kw, chunk_size=chunk_size)
    for n, g in zip(("q", "k", "v", "alpha", "delta"), grads):
        if n not in t:
            assert g is None
            continue
        assert g.shape == t[n].shape and g.dtype == t[n].dtype and g.is_contiguous()
        torch.testing.assert_close(g, leaves[n].grad, rtol=0, atol=1e-11, msg=n)
    return grads


@pytest.mark.parametrize("name", ["dense", "causal_sq_gt_sk", "gqa_causal", "mqa", "win_bands",
                                  "win_per_qhead", "gated_logsig", "gated_linear",
                                  "gated_window"])
def test_backward_matches_autograd(reference, name):
    B, Sq, Sk, H, Hkv, D, gated, kw = FWD_CASES[name]
    t = make_problem(torch.Generator().manual_seed(5), B, Sq, Sk, H, Hkv, D, gated)
    dq = check_backward(reference, t, kw)[0]
    if name == "causal_sq_gt_sk":  # rows that see no key get zero gradient
        assert (dq[:, : Sq - Sk] == 0).all()


@pytest.mark.parametrize("gated", [False, True])
def test_backward_varlen_matches_autograd(reference, gated):
    t = varlen_problem(torch.Generator().manual_seed(6), gated)
    t["seqused_k"] = torch.tensor([5, 3, 18, 0, 2], dtype=torch.int32)
    dq, dk, dv, _, ddelta = check_backward(reference, t, dict(is_causal=True), chunk_size=4)
    # keys beyond seqused_k get zero gradient
    assert (dk[5:9] == 0).all() and (dv[30:35][2:] == 0).all()
    if gated:
        assert (ddelta[:, 5:9] == 0).all()


def test_gradcheck_naive_gated(reference):
    gen = torch.Generator().manual_seed(7)
    t = make_problem(gen, 1, 3, 4, 2, 1, 4, gated=True)
    ws_ = ws([[1, 1, 1, 1]])

    def fn(q, k, v, alpha, delta):
        out, lse = reference.attention_naive(q, k, v, alpha=alpha, delta=delta, is_causal=True)
        out2, _ = reference.attention_naive(q, k, v, alpha=alpha, delta=delta,
                                            window_sizes=ws_, is_logsigmoid_gate=False)
        return out, lse[torch.isfinite(lse)], out2

    inputs = [t[n].detach().clone().requires_grad_() for n in ("q", "k", "v", "alpha", "delta")]
    assert torch.autograd.gradcheck(fn, inputs)


# ---------------------------------------------------------------------------------------------
# block skip
# ---------------------------------------------------------------------------------------------
def test_skip_blocks_forward_backward(reference):
    gen = torch.Generator().manual_seed(8)
    B, Sq, Sk, H, Hkv, D = 1, 140, 150, 2, 1, 8
    t = make_problem(gen, B, Sq, Sk, H, Hkv, D, gated=True)
    nqb, nkb = -(-Sq // reference.skip_block_m(D)), -(-Sk // reference.SKIP_BLOCK_N)
    assert (nqb, nkb) == (3, 3)
    skip = torch.ones(B, H, nqb, nkb, dtype=torch.uint8)  # codes: 1 kept, 2/3 skipped
    skip[0, 0, 0, 1] = 2
    skip[0, 1, 1, 0] = 3
    skip[0, 1, 1, 2] = 2
    kw = dict(is_causal=True, skip=skip)
    out, lse = reference.attention_forward(**t, **kw, chunk_size=32)
    exp_out, exp_lse = reference.attention_naive(**t, **kw)
    torch.testing.assert_close(out, exp_out, rtol=0, atol=1e-12)
    assert_lse_equal(lse, exp_lse)
    dense_out, _ = reference.attention_forward(**t, is_causal=True)
    assert not torch.allclose(out, dense_out)  # the skip set changed something
    check_backward(reference, t, kw, chunk_size=32)
    # everything skipped: out 0, lse -inf, zero gradients
    full = torch.full_like(skip, 2)
    out, lse = reference.attention_forward(**t, skip=full)
    assert (out == 0).all() and torch.isneginf(lse).all()
    g = reference.attention_backward(torch.ones_like(out), t["q"], t["k"], t["v"], out, lse,
                                     alpha=t["alpha"], delta=t["delta"], skip=full)
    assert all((x == 0).all() for x in g)


# ---------------------------------------------------------------------------------------------
# dtypes, op wrappers, memory
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_dtypes(reference, dtype):
    t = make_problem(torch.Generator().manual_seed(10), 1, 20, 20, 2, 1, 16, True, dtype)
    out, lse = reference.attention_forward(**t, is_causal=True, chunk_size=8)
    assert out.dtype == dtype and lse.dtype == torch.float32
    exp_out, exp_lse = reference.attention_naive(**t, is_causal=True)  # fp64 on the same inputs
    torch.testing.assert_close(out.double(), exp_out.double(), rtol=0,
                               atol=4 * torch.finfo(dtype).eps)
    torch.testing.assert_close(lse.double(), exp_lse, rtol=0, atol=1e-5)
    grads = reference.attention_backward(out, t["q"], t["k"], t["v"], out, lse, alpha=t["alpha"],
                                         delta=t["delta"], is_causal=True)
    for g, n in zip(grads, ("q", "k", "v", "alpha", "delta")):
        assert g.dtype == t[n].dtype and g.shape == t[n].shape and torch.isfinite(g).all()


def op_kwargs(t, **over):
    kw = dict(alpha=None, delta=None, cu_seqlens_q=None, cu_seqlens_k=None, seqused_k=None,
              window_sizes=None, max_seqlen_q=t["q"].shape[1], max_seqlen_k=t["k"].shape[1],
              softmax_scale=t["q"].shape[-1] ** -0.5, is_causal=True, softmax_threshold=0.0,
              gate_threshold=0.0, is_logsigmoid_gate=True, is_adapt_gate=False)
    kw.update({n: t[n] for n in ("alpha", "delta") if n in t})
    kw.update(over)
    return kw


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("threshold", [0.0, 1.0])
def test_op_wrappers(reference, gated, threshold):
    t = make_problem(torch.Generator().manual_seed(11), 2, 9, 140, 4, 2, 8, gated, torch.float16)
    kw = op_kwargs(t, softmax_threshold=threshold)
    out, lse, skip = reference.attention_forward_op(t["q"], t["k"], t["v"], **kw,
                                                    deterministic=False)
    can_skip = threshold > 0 or gated
    assert list(skip.shape) == reference.skip_shape(t["q"], t["k"], None, 9, 140, can_skip)
    assert skip.dtype == torch.uint8 and (skip <= 3).all()
    if can_skip:  # the block decisions of the skip rule (codes 0..3), as skip_decisions says
        assert torch.equal(skip, reference.skip_decisions(
            t["q"], t["k"], t["v"], max_seqlen_q=9, max_seqlen_k=140,
            **{n: kw[n] for n in ("alpha", "delta", "softmax_scale", "is_causal",
                                   "softmax_threshold", "gate_threshold", "is_adapt_gate")
               if n in kw}))
    assert out.dtype == torch.float16 and lse.dtype == torch.float32 and lse.shape == (2, 4, 9)
    dout = torch.randn_like(out)
    grads = reference.attention_backward_op(dout, t["q"], t["k"], t["v"], out, lse, skip, **kw)
    for g, x in zip(grads[:3], (t["q"], t["k"], t["v"])):
        assert g.shape == x.shape and g.dtype == x.dtype
    if gated:
        for g, x in zip(grads[3:], (t["alpha"], t["delta"])):
            assert g.shape == x.shape and g.dtype == x.dtype and g.is_contiguous()
    else:
        assert grads[3].shape == (0,) and grads[4].shape == (0,)
    produced = [out, lse, skip, *grads]
    for a in produced:  # outputs never alias inputs
        for b in (t["q"], t["k"], t["v"], t.get("alpha"), t.get("delta"), dout):
            if b is not None and a.numel() and b.numel():
                assert a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()


def test_op_backward_float64_exact(reference):
    """The op's lse is float32; in float64 the backward op must still be exact."""
    t = make_problem(torch.Generator().manual_seed(12), 1, 12, 12, 2, 1, 8, gated=True)
    kw = op_kwargs(t)
    out, lse, skip = reference.attention_forward_op(t["q"], t["k"], t["v"], **kw)
    assert lse.dtype == torch.float32
    dout = torch.randn_like(out)
    grads = reference.attention_backward_op(dout, t["q"], t["k"], t["v"], out, lse, skip, **kw)
    leaves = {n: t[n].clone().requires_grad_() for n in ("q", "k", "v", "alpha", "delta")}
    o, _ = reference.attention_naive(**leaves, is_causal=True)
    o.backward(dout)
    for g, n in zip(grads, ("q", "k", "v", "alpha", "delta")):
        torch.testing.assert_close(g, leaves[n].grad, rtol=0, atol=1e-11)


def test_long_sequence_bounded_memory(reference):
    """8k x 8k single head: peak live memory stays far below one [Sq, Sk] fp32 matrix."""
    from torch.profiler import ProfilerActivity, profile

    S, D = 8192, 64
    gen = torch.Generator().manual_seed(13)
    q, k, v = (torch.randn(1, S, 1, D, generator=gen) for _ in range(3))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out, lse = reference.attention_forward(q, k, v, is_causal=True)
    live = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    full = S * S * 4
    assert 0 < peak < full // 4, (peak, full)
    # spot-check a few rows against an exact computation
    for i in (0, 1000, S - 1):
        s = (k[0, : i + 1, 0].double() @ q[0, i, 0].double()) * D ** -0.5
        torch.testing.assert_close(lse[0, 0, i].double(), torch.logsumexp(s, 0), rtol=0,
                                   atol=1e-4)
        exp = torch.softmax(s, 0) @ v[0, : i + 1, 0].double()
        torch.testing.assert_close(out[0, i, 0].double(), exp, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# decode and kv_append
# ---------------------------------------------------------------------------------------------
def decode_kw(**over):
    kw = dict(alpha=None, delta_cache=None, page_table=None, cu_seqlens_k=None, seqused_k=None,
              gather_kv_indices=None, window_sizes=None, max_seqlen_k=0, softmax_scale=None,
              softmax_threshold=0.0, gate_threshold=0.0, is_logsigmoid_gate=True)
    kw.update(over)
    return kw


def paginate(cache, page_size, gen, extra_pages=3):
    """Contiguous [B, S, ...] -> (paged [num_pages, page_size, ...], page_table) with the pages
    of all sequences shuffled (and unused pages filled with garbage)."""
    B, S = cache.shape[:2]
    per_seq = S // page_size
    num_pages = B * per_seq + extra_pages
    perm = torch.randperm(num_pages, generator=gen)[: B * per_seq]
    table = perm.view(B, per_seq).to(torch.int32)
    paged = torch.full((num_pages, page_size, *cache.shape[2:]), float("nan"), dtype=cache.dtype)
    paged[table.long()] = cache.reshape(B, per_seq, page_size, *cache.shape[2:])
    return paged, table


def delta_paginate(delta, table, num_pages, page_size):
    """delta [B, Hkv, S] -> paged [num_pages, page_size, Hkv] with the same table."""
    B, Hkv, S = delta.shape
    paged = torch.full((num_pages, page_size, Hkv), float("nan"), dtype=delta.dtype)
    paged[table.long()] = delta.transpose(1, 2).reshape(B, S // page_size, page_size, Hkv)
    return paged


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("windowed", [False, True])
def test_decode_matches_forward_last_row(reference, gated, windowed):
    gen = torch.Generator().manual_seed(14)
    B, S, H, Hkv, D, page = 3, 24, 4, 2, 8, 4
    q = rand(gen, B, H, D)
    kc, vc = rand(gen, B, S, Hkv, D), rand(gen, B, S, Hkv, D)
    used = torch.tensor([24, 9, 13], dtype=torch.int32)
    alpha = rand(gen, B, H) if gated else None
    delta = rand(gen, B, Hkv, S) if gated else None
    window = ws([[1, 3, 2, 2], [0, 5, 1, 3]]) if windowed else None
    fwd_kw = dict(alpha=alpha[:, :, None] if gated else None, delta=delta, window_sizes=window,
                  is_causal=True)
    exp_out, exp_lse = reference.attention_naive(q[:, None], kc, vc, seqused_k=used, **fwd_kw)
    exp_out, exp_lse = exp_out[:, 0], exp_lse[:, :, 0]

    def check(out, lse):
        assert out.shape == (B, H, D) and lse.shape == (B, H) and lse.dtype == torch.float32
        torch.testing.assert_close(out, exp_out, rtol=0, atol=1e-12)
        torch.testing.assert_close(lse.double(), exp_lse, rtol=1e-6, atol=0)

    # contiguous cache
    check(*reference.decode_forward(q, kc, vc, **decode_kw(
        alpha=alpha, delta_cache=delta, seqused_k=used, window_sizes=window)))
    # paged cache, shuffled page table
    kp, table = paginate(kc, page, gen)
    vp = torch.empty_like(kp)
    vp[table.long()] = vc.reshape(B, S // page, page, Hkv, D)
    dp = delta_paginate(delta, table, kp.shape[0], page) if gated else None
    check(*reference.decode_forward(q, kp, vp, **decode_kw(
        alpha=alpha, delta_cache=dp, page_table=table, seqused_k=used, window_sizes=window)))
    # packed caches: sequence b owns rows cu[b]:cu[b+1] (no seqused_k)
    cu = torch.tensor([0, 24, 33, 46], dtype=torch.int32)
    kpk = torch.cat([kc[b, :n] for b, n in enumerate(used.tolist())])
    vpk = torch.cat([vc[b, :n] for b, n in enumerate(used.tolist())])
    dpk = torch.cat([delta[b, :, :n] for b, n in enumerate(used.tolist())], 1) if gated else None
    check(*reference.decode_forward(q, kpk, vpk, **decode_kw(
        alpha=alpha, delta_cache=dpk, cu_seqlens_k=cu, window_sizes=window)))


def explicit_gather(q, kc, vc, idx, used, alpha=None, delta=None, scale=None):
    """Gathered decode written out one (sequence, head) at a time on a contiguous cache."""
    B, H, D = q.shape
    Hkv = kc.shape[2]
    scale = scale or D ** -0.5
    out, lse = torch.zeros(B, H, D, dtype=F64), torch.full((B, H), -math.inf, dtype=F64)
    for b in range(B):
        for h in range(H):
            hk = h // (H // Hkv)
            row = idx[b] if idx.dim() == 2 else idx[b, hk]
            keep = [p for p in row.tolist() if 0 <= p < used[b]]  # duplicates kept
            if not keep:
                continue
            s = kc[b, keep, hk] @ q[b, h]
            if alpha is not None:
                s = s + torch.nn.functional.logsigmoid(alpha[b, h] * delta[b, hk, keep])
            s = scale * s
            lse[b, h] = torch.logsumexp(s, 0)
            out[b, h] = torch.softmax(s, 0) @ vc[b, keep, hk]
    return out, lse


@pytest.mark.parametrize("per_head", [False, True])
def test_decode_gather(reference, per_head):
    gen = torch.Generator().manual_seed(15)
    B, S, H, Hkv, D, page = 3, 16, 4, 2, 8, 4
    q, kc, vc = rand(gen, B, H, D), rand(gen, B, S, Hkv, D), rand(gen, B, S, Hkv, D)
    alpha, delta = rand(gen, B, H), rand(gen, B, Hkv, S)
    used = torch.tensor([16, 10, 0], dtype=torch.int32)  # seq 2 is empty
    if per_head:
        idx = torch.tensor([[[3, 3, -1, 15, 0], [7, 7, 7, -5, 16]],
                            [[9, 10, 2, -1, 2], [-1, -1, -1, -1, -1]],  # head 1: nothing
                            [[0, 1, 2, 3, 4], [0, 0, 0, 0, 0]]], dtype=torch.int32)
    else:
        idx = torch.tensor([[3, 3, -1, 15, 0], [9, 10, 2, -1, 2], [0, 1, 2, 3, 4]],
                           dtype=torch.int32)
    exp_out, exp_lse = explicit_gather(q, kc, vc, idx, used.tolist(), alpha, delta)
    kp, table = paginate(kc, page, gen)
    vp = torch.empty_like(kp)
    vp[table.long()] = vc.reshape(B, S // page, page, Hkv, D)
    dp = delta_paginate(delta, table, kp.shape[0], page)
    for caches in ((kc, vc, delta, None), (kp, vp, dp, table)):
        out, lse = reference.decode_forward(q, caches[0], caches[1], **decode_kw(
            alpha=alpha, delta_cache=caches[2], page_table=caches[3], seqused_k=used,
            gather_kv_indices=idx))
        torch.testing.assert_close(out, exp_out, rtol=0, atol=1e-12)
        assert_lse_equal(lse.double(), exp_lse, atol=1e-5)
    assert (out[2] == 0).all() and torch.isneginf(lse[2]).all()
    if per_head:
        assert (out[1, 2:] == 0).all() and torch.isneginf(lse[1, 2:]).all()


def test_kv_append_page_boundary(reference):
    gen = torch.Generator().manual_seed(16)
    B, Hkv, D, page = 3, 2, 8, 4
    table = torch.tensor([[5, 2], [0, 4], [1, 3]], dtype=torch.int32)
    kp, vp = rand(gen, 6, page, Hkv, D), rand(gen, 6, page, Hkv, D)
    dp = rand(gen, 6, page, Hkv)
    k_new, v_new, d_new = rand(gen, B, Hkv, D), rand(gen, B, Hkv, D), rand(gen, B, Hkv)
    used = torch.tensor([4, 7, 0], dtype=torch.int32)  # first slot of page 1, last of 1, first
    exp_k, exp_v, exp_d = kp.clone(), vp.clone(), dp.clone()
    for b, (pg, row) in enumerate([(2, 0), (4, 3), (1, 0)]):
        exp_k[pg, row], exp_v[pg, row], exp_d[pg, row] = k_new[b], v_new[b], d_new[b]
    ptrs = (kp.data_ptr(), vp.data_ptr(), dp.data_ptr())
    reference.kv_append(kp, vp, dp, k_new, v_new, d_new, page_table=table, cu_seqlens_k=None,
                        seqused_k=used)
    assert (kp.data_ptr(), vp.data_ptr(), dp.data_ptr()) == ptrs
    assert torch.equal(kp, exp_k) and torch.equal(vp, exp_v) and torch.equal(dp, exp_d)
    # contiguous and packed caches
    kc, dc = rand(gen, B, 8, Hkv, D), rand(gen, B, Hkv, 8)
    exp_kc, exp_dc = kc.clone(), dc.clone()
    for b, p in enumerate(used.tolist()):
        exp_kc[b, p], exp_dc[b, :, p] = k_new[b], d_new[b]
    reference.kv_append(kc, kc.clone(), dc, k_new, v_new, d_new, page_table=None,
                        cu_seqlens_k=None, seqused_k=used)
    assert torch.equal(kc, exp_kc) and torch.equal(dc, exp_dc)
    cu = torch.tensor([0, 5, 13, 14], dtype=torch.int32)
    kpk, dpk = rand(gen, 14, Hkv, D), rand(gen, Hkv, 14)
    exp_kpk, exp_dpk = kpk.clone(), dpk.clone()
    for b, p in enumerate(used.tolist()):
        exp_kpk[cu[b] + p], exp_dpk[:, cu[b] + p] = k_new[b], d_new[b]
    reference.kv_append(kpk, kpk.clone(), dpk, k_new, v_new, d_new, page_table=None,
                        cu_seqlens_k=cu, seqused_k=used)
    assert torch.equal(kpk, exp_kpk) and torch.equal(dpk, exp_dpk)


# ---------------------------------------------------------------------------------------------
# golden vectors
# ---------------------------------------------------------------------------------------------
def test_golden_vectors(reference):
    """Recompute every stored case; a change to the reference's results fails here."""
    from safetensors import safe_open

    with safe_open(str(GOLDEN), framework="pt") as f:
        meta = json.loads(f.metadata()["cases"])
        data = {k: f.get_tensor(k) for k in f.keys()}
    assert len(meta) >= 6
    for name, case in meta.items():
        t = {n: data[f"{name}.{n}"] for n in case["inputs"]}
        if case["kind"] == "attention":
            args = {n: t.get(n) for n in ("alpha", "delta", "cu_seqlens_q", "cu_seqlens_k",
                                          "seqused_k", "window_sizes")}
            args.update(case["scalars"])
            out, lse = reference.attention_forward(t["q"], t["k"], t["v"], **args)
            grads = reference.attention_backward(t["dout"], t["q"], t["k"], t["v"], out, lse,
                                                 **args)
            got = dict(out=out, lse=lse, **{n: g for n, g in zip(
                ("dq", "dk", "dv", "dalpha", "ddelta"), grads) if g is not None})
        else:
            args = {n: t.get(n) for n in ("alpha", "delta_cache", "page_table", "cu_seqlens_k",
                                          "seqused_k", "gather_kv_indices", "window_sizes")}
            out, lse = reference.decode_forward(
                t["q"], t["k_cache"], t["v_cache"], **args, max_seqlen_k=0,
                softmax_scale=case["scalars"].get("softmax_scale"), softmax_threshold=0.0,
                gate_threshold=0.0, is_logsigmoid_gate=case["scalars"]["is_logsigmoid_gate"])
            got = dict(out=out, lse=lse)
        assert sorted(got) == sorted(case["outputs"]), name
        for n, value in got.items():
            exp = data[f"{name}.{n}"]
            assert value.dtype == exp.dtype, (name, n)
            assert torch.equal(torch.isneginf(value), torch.isneginf(exp)), (name, n)
            fin = torch.isfinite(exp)
            rtol = 1e-10 if exp.dtype == F64 else 1e-6  # decode lse is float32
            torch.testing.assert_close(value[fin], exp[fin], rtol=rtol, atol=1e-12,
                                       msg=f"{name}.{n}")
