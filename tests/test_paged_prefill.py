"""Chunked prefill over a paged KV cache (SPEC §2 as extended in the README): the batched
functions with `page_table` and `seqused_k`, forward only.

A logical cache (per sequence, positions 0..cap-1) is laid out in shuffled pages, with unused
pages and the rows past each sequence's used length filled with NaN, so a kernel that reads
them fails. The paged call must return bit for bit what the same call returns on the
contiguous logical cache (same kernel arithmetic, other addresses), including the skip codes
of the sparse and gated variants; the contiguous call itself is checked against float64 here
too. Runs under TRITON_INTERPRET=1 in fp16 (CI) and on CUDA in bf16.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from kernel_utils import (assert_close_rule, kernel_device_dtype, torch_lowp_attention,
                          visible_mask)

DEV = kernel_device_dtype()
pytestmark = pytest.mark.skipif(DEV is None, reason="kernels need CUDA or TRITON_INTERPRET=1")
NAN = float("nan")


def _paged(t, page_size, gen, spare=3, table=None):
    """[B, cap, ...] -> ([num_pages, page_size, ...] with the unused pages NaN, page_table):
    a shuffled table, or the given one."""
    batch, cap = t.shape[:2]
    per = cap // page_size
    num_pages = batch * per + spare
    if table is None:
        table = torch.randperm(num_pages, generator=gen)[: batch * per].view(batch, per)
    table = table.long()
    paged = torch.full((num_pages, page_size, *t.shape[2:]), NAN, dtype=t.dtype)
    paged[table] = t.reshape(batch, per, page_size, *t.shape[2:])
    return paged, table.to(torch.int32)


def _case(B, Sq, cap, H, Hkv, D, used, page_size, gated=False, seed=0, device=None,
          dtype=None):
    device, dtype = device or DEV[0], dtype or DEV[1]
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Sq, H, D, generator=gen).to(dtype)
    k = torch.randn(B, cap, Hkv, D, generator=gen).to(dtype)
    v = torch.randn(B, cap, Hkv, D, generator=gen).to(dtype)
    # queries close to the keys at their own position: far blocks can be skipped
    for b, u in enumerate(used):
        pos = (torch.arange(Sq) + u - Sq).clamp(0, cap - 1)
        q[b] = (q[b].float() + 3.0 * k[b, pos].float().repeat_interleave(H // Hkv, 1)).to(dtype)
    alpha = delta = None
    if gated:
        alpha = (1 + torch.rand(B, H, Sq, generator=gen)).to(dtype)
        delta = torch.randn(B, Hkv, cap, generator=gen)
        delta[:, :, 64:192] -= 100.0  # closed keys: the gate test can skip them
        delta = delta.to(dtype)
    for b, u in enumerate(used):  # rows past the used length are never read
        k[b, u:] = NAN
        v[b, u:] = NAN
        if gated:
            delta[b, :, u:] = NAN
    kp, table = _paged(k, page_size, gen)
    vp = _paged(v, page_size, gen, table=table)[0]  # V and delta follow K's page table
    dp = None if not gated else _paged(delta.transpose(1, 2), page_size, gen, table=table)[0]
    mv = lambda t: None if t is None else t.to(device)  # noqa: E731
    used_t = torch.tensor(used, dtype=torch.int32, device=device)
    return dict(q=mv(q), k=mv(k), v=mv(v), alpha=mv(alpha), delta=mv(delta), kp=mv(kp),
                vp=mv(vp), dp=mv(dp), table=mv(table), used=used_t)


CASES = {
    # B, Sq, cap, H, Hkv, D, used, page_size
    "dense_chunk": dict(B=2, Sq=40, cap=192, H=4, Hkv=2, D=32, used=[150, 41], page_size=64),
    "dense_page16_mqa": dict(B=2, Sq=17, cap=96, H=4, Hkv=1, D=64, used=[96, 16],
                             page_size=16),
    "sparse": dict(B=2, Sq=64, cap=256, H=4, Hkv=2, D=64, used=[256, 200], page_size=32),
    "gated": dict(B=1, Sq=70, cap=256, H=2, Hkv=1, D=16, used=[250], page_size=64, gated=True),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("causal", [True, False])
def test_paged_prefill_equals_contiguous(fsa, name, causal):
    kw = dict(CASES[name])
    gated = kw.get("gated", False)
    c = _case(seed=len(name), **kw)
    variant = "gated" if gated else ("sparse" if name.startswith("sparse") else "dense")
    fn = getattr(fsa, f"flash_{variant}_attn_func")
    extra = dict(return_skip_mask=True) if variant != "dense" else {}

    def call(k, v, delta, **more):
        args = [c["q"], k, v] + ([c["alpha"], delta] if gated else [])
        return fn(*args, is_causal=causal, seqused_k=c["used"], return_lse=True, **extra,
                  **more)

    paged = call(c["kp"], c["vp"], c["dp"], page_table=c["table"])
    contig = call(c["k"], c["v"], c["delta"])
    for got, ref in zip(paged, contig):
        assert torch.equal(got, ref) or (got.is_floating_point() and torch.equal(
            torch.nan_to_num(got, neginf=-1.0), torch.nan_to_num(ref, neginf=-1.0)))
    out = paged[0]
    assert not torch.isnan(out).any()
    if variant != "dense":
        codes = paged[2]
        st = fsa.block_skip_stats(codes)
        assert st["kept"] > 0 and (not causal or st["skipped_fraction"] > 0), st
    # the contiguous result against float64 over the kept blocks, per sequence
    B, Sq, H, D = c["q"].shape
    for b, u in enumerate(c["used"].tolist()):
        qb, kb, vb = c["q"][b:b + 1].cpu(), c["k"][b:b + 1, :u].cpu(), c["v"][b:b + 1, :u].cpu()
        mask = visible_mask(Sq, u, causal, None, H, "cpu")
        if variant != "dense":
            rows = torch.arange(Sq) // 64
            cols = torch.arange(u) // 64
            mask = mask & (codes[b].cpu()[:, rows][:, :, cols] < 2)
        al = None if not gated else c["alpha"][b:b + 1].cpu()
        dl = None if not gated else c["delta"][b:b + 1, :, :u].cpu()
        lowp = torch_lowp_attention(qb, kb, vb, D ** -0.5, mask, al, dl)
        s = torch.einsum("qhd,khd->hqk", qb[0].double(),
                         kb[0].double().repeat_interleave(H // kb.shape[2], 1)) * D ** -0.5
        if gated:
            x = al[0].double()[:, :, None] * \
                dl[0].double().repeat_interleave(H // kb.shape[2], 0)[:, None, :]
            s = s + torch.nn.functional.logsigmoid(x) * D ** -0.5
        s = s.masked_fill(~mask, -math.inf)
        p = torch.softmax(s, -1).nan_to_num(0.0)
        ref = torch.einsum("hqk,khd->qhd", p, vb[0].double().repeat_interleave(
            H // kb.shape[2], 1))
        assert_close_rule(f"out[{b}]", out[b].cpu(), ref, lowp[0])


def test_paged_prefill_has_no_backward(fsa):
    c = _case(seed=1, **CASES["dense_chunk"])
    q = c["q"].detach().requires_grad_()
    out = fsa.flash_dense_attn_func(q, c["kp"], c["vp"], is_causal=True, seqused_k=c["used"],
                                    page_table=c["table"])
    with pytest.raises(NotImplementedError, match="page_table"):
        out.sum().backward()


def test_paged_prefill_bad_input(fsa):
    c = _case(seed=2, **CASES["dense_chunk"])
    f = fsa.flash_dense_attn_func
    with pytest.raises(TypeError, match="page_table"):
        f(c["q"], c["kp"], c["vp"], page_table=c["table"].long())
    bad = c["table"].clone()
    bad[0, 0] = c["kp"].shape[0]
    with pytest.raises(ValueError, match=r"page_table\[0, 0\]"):
        f(c["q"], c["kp"], c["vp"], page_table=bad)
    with pytest.raises(ValueError, match="seqused_k"):
        f(c["q"], c["kp"], c["vp"], page_table=c["table"],
          seqused_k=torch.full_like(c["used"], 10 ** 6))
    with pytest.raises(ValueError, match="page_table has batch size"):
        f(c["q"], c["kp"], c["vp"], page_table=c["table"][:1])
    with pytest.raises(ValueError, match="key has batch size"):  # contiguous, wrong batch
        f(c["q"], c["k"][:1], c["v"][:1])


@pytest.mark.parametrize("name", ["dense_chunk", "gated"])
def test_paged_prefill_reference_path(fsa, name):
    """The CPU reference path (ops on CPU tensors outside the interpreter) reads a paged cache
    as the kernels do: the same result as on the contiguous logical cache, in float64."""
    ops = importlib.import_module(f"{fsa.__name__}.ops")
    c = _case(seed=3, device="cpu", dtype=torch.float64, **CASES[name])
    gated = c["alpha"] is not None
    fn = fsa.flash_gated_attn_func if gated else fsa.flash_dense_attn_func

    def call(k, v, delta, **more):
        args = [c["q"], k, v] + ([c["alpha"], delta] if gated else [])
        return fn(*args, is_causal=True, seqused_k=c["used"], return_lse=True, **more)

    with ops.cpu_reference():
        paged = call(c["kp"], c["vp"], c["dp"], page_table=c["table"])
        contig = call(c["k"], c["v"], c["delta"])
    torch.testing.assert_close(paged[0], contig[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(paged[1], contig[1], rtol=0, atol=1e-12)
    assert not torch.isnan(paged[0]).any()


@pytest.mark.parametrize("variant", ["dense", "sparse", "gated"])
def test_paged_varlen_prefill_equals_packed(fsa, variant):
    """The varlen functions over a paged cache: cu_seqlens_k gives each sequence's key count,
    its keys are positions [0, count) of its pages; bitwise the result of the same call on the
    packed keys."""
    device, dtype = DEV
    gen = torch.Generator().manual_seed(11)
    H, Hkv, D, ps, per = 4, 2, 64, 32, 6
    q_lens, k_lens = [20, 1, 64], [150, 33, 192]
    B = len(k_lens)
    cap = ps * per
    k = torch.randn(B, cap, Hkv, D, generator=gen).to(dtype)
    v = torch.randn(B, cap, Hkv, D, generator=gen).to(dtype)
    delta = torch.randn(B, cap, Hkv, generator=gen)
    delta[:, 64:128] -= 100.0  # a closed 64-key block: the gate test skips it
    delta = delta.to(dtype)
    qs = []
    for b, (nq, nk) in enumerate(zip(q_lens, k_lens)):
        pos = torch.arange(nk - nq, nk)
        qs.append((torch.randn(nq, H, D, generator=gen) + 3.0 * k[b, pos].float()
                   .repeat_interleave(H // Hkv, 1)).to(dtype))
        k[b, nk:] = NAN
        v[b, nk:] = NAN
        delta[b, nk:] = NAN
    q = torch.cat(qs)
    cu_q = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    cu_k = torch.tensor([0] + torch.tensor(k_lens).cumsum(0).tolist(), dtype=torch.int32)
    kp, table = _paged(k, ps, gen)
    vp = _paged(v, ps, gen, table=table)[0]
    dp = _paged(delta, ps, gen, table=table)[0]
    packed = [torch.cat([t[b, :n] for b, n in enumerate(k_lens)]) for t in (k, v, delta)]
    alpha = (1 + torch.rand(H, q.shape[0], generator=gen)).to(dtype)
    mv = lambda t: t.to(device)  # noqa: E731
    fn = getattr(fsa, f"flash_{variant}_attn_varlen_func")
    extra = {} if variant == "dense" else dict(return_skip_mask=True)

    def call(kk, vv, dd, **more):
        args = [mv(q), mv(kk), mv(vv)]
        if variant == "gated":
            args += [mv(alpha), mv(dd)]
        return fn(*args, mv(cu_q), mv(cu_k), max(q_lens), max(k_lens), is_causal=True,
                  return_lse=True, **extra, **more)

    got = call(kp, vp, dp, page_table=mv(table))
    ref = call(packed[0], packed[1], packed[2].transpose(0, 1))
    assert not torch.isnan(got[0]).any()
    for g_, r_ in zip(got, ref):
        assert torch.equal(torch.nan_to_num(g_.float(), neginf=-1.0),
                           torch.nan_to_num(r_.float(), neginf=-1.0))
    if variant != "dense":
        assert fsa.block_skip_stats(got[2])["skipped_fraction"] > 0


def test_paged_varlen_bad_input(fsa):
    """A sequence longer than its pages can hold, and a delta laid out unpaged."""
    device, dtype = DEV
    kp = torch.zeros(4, 16, 1, 16, dtype=dtype, device=device)
    table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32, device=device)
    q = torch.zeros(3, 2, 16, dtype=dtype, device=device)
    cu_q = torch.tensor([0, 1, 3], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 33, 40], dtype=torch.int32, device=device)  # 33 > 2 pages of 16
    with pytest.raises(ValueError, match="cu_seqlens_k gives sequence 0 33 keys"):
        fsa.flash_dense_attn_varlen_func(q, kp, kp, cu_q, cu_k, 2, 33, page_table=table)
    cu_k = torch.tensor([0, 20, 27], dtype=torch.int32, device=device)
    alpha = torch.ones(2, 3, dtype=dtype, device=device)
    with pytest.raises(ValueError, match="delta"):
        fsa.flash_gated_attn_varlen_func(q, kp, kp, alpha, torch.zeros(1, 27, dtype=dtype,
                                                                       device=device),
                                         cu_q, cu_k, 2, 20, page_table=table)
