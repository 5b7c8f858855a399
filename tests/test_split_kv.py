"""Split-KV forward (SPEC §2 `num_splits`): each query tile's key tiles shared by several
programs, their partial results merged with the exact lse combine (`triton/combine.py`).

Ground truth: float64 attention over the visible keys; the error rule of DESIGN.md against
PyTorch's attention in the kernels' dtype. Split counts that do and do not divide the key
tiles, causal and not, Sq < Sk and Sq > Sk (rows that see nothing), local windows, GQA/MQA,
varlen, a paged cache, gates without the gate test, the backward after a split forward, and
the calls that skip blocks (which do not split). Runs under TRITON_INTERPRET=1 in fp16 (CI)
and on CUDA in bf16.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from kernel_utils import assert_close_rule, kernel_device_dtype, torch_lowp_attention, visible_mask

DEV = kernel_device_dtype()
pytestmark = pytest.mark.skipif(DEV is None, reason="kernels need CUDA or TRITON_INTERPRET=1")

CASES = {
    # B, Sq, Sk, H, Hkv, D, causal, window [sink, left, right, near] per KV head
    "chunk_causal": (2, 40, 300, 4, 2, 64, True, None),
    "full_mqa": (1, 130, 520, 4, 1, 32, False, None),
    "sq_gt_sk": (1, 300, 200, 2, 2, 64, True, None),  # the first 100 rows see no key
    "local": (1, 64, 600, 4, 2, 64, True, [16, 128, 0, 64]),
}


def _inputs(b, sq, sk, h, hkv, d, seed):
    device, dtype = DEV
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, s, n, d, generator=g).to(device, dtype)
            for s, n in ((sq, h), (sk, hkv), (sk, hkv))]


def _truth(q, k, v, causal, windows):
    """(float64 out, out of PyTorch in q's dtype) over the visible keys."""
    h, d = q.shape[2], q.shape[3]
    mask = visible_mask(q.shape[1], k.shape[1], causal, windows, h, q.device)
    ref = torch_lowp_attention(q.double(), k.double(), v.double(), d ** -0.5, mask)
    return ref, torch_lowp_attention(q, k, v, d ** -0.5, mask)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("splits", [2, 7])
def test_split_forward_matches_float64(fsa, name, splits):
    b, sq, sk, h, hkv, d, causal, win = CASES[name]
    q, k, v = _inputs(b, sq, sk, h, hkv, d, seed=sq + splits)
    windows = None if win is None else torch.tensor([win] * hkv, dtype=torch.int32,
                                                    device=q.device)
    kw = dict(is_causal=causal, window_sizes=windows, return_lse=True)
    out, lse = fsa.flash_dense_attn_func(q, k, v, num_splits=splits, **kw)
    out1, lse1 = fsa.flash_dense_attn_func(q, k, v, num_splits=1, **kw)
    ref, lowp = _truth(q, k, v, causal, windows)
    assert_close_rule(f"{name} split {splits}", out, ref, lowp)
    # lse: the same rows without keys (-inf), the others within fp32 rounding of one pass
    assert torch.equal(torch.isinf(lse), torch.isinf(lse1)) and not torch.isnan(lse).any()
    fin = torch.isfinite(lse1)
    assert (lse - lse1)[fin].abs().max().item() < 1e-4
    if name == "sq_gt_sk":
        assert torch.isinf(lse[..., :100]).all() and (out[:, :100] == 0).all()


def test_split_forward_strided_query(fsa):
    """q as a transposed [B, H, S, D] view: the output keeps q's layout (combined through a
    contiguous buffer) and equals the split call on a contiguous copy."""
    q, k, v = _inputs(2, 40, 300, 4, 2, 64, seed=3)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)
    assert not qt.is_contiguous()
    out, lse = fsa.flash_dense_attn_func(qt, k, v, is_causal=True, num_splits=3,
                                         return_lse=True)
    ref_out, ref_lse = fsa.flash_dense_attn_func(q, k, v, is_causal=True, num_splits=3,
                                                 return_lse=True)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)


def test_split_varlen_and_paged(fsa):
    """Varlen: every sequence against float64 (its own lengths); a paged cache with
    seqused_k: bit for bit the split call on the contiguous cache."""
    device, dtype = DEV
    g = torch.Generator().manual_seed(5)
    h, hkv, d = 4, 2, 32
    q_lens, k_lens = [30, 1, 70], [260, 33, 70]
    qs = [torch.randn(n, h, d, generator=g).to(device, dtype) for n in q_lens]
    ks = [torch.randn(n, hkv, d, generator=g).to(device, dtype) for n in k_lens]
    vs = [torch.randn(n, hkv, d, generator=g).to(device, dtype) for n in k_lens]
    cu = lambda lens: torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(),  # noqa: E731
                                   dtype=torch.int32, device=device)
    out, lse = fsa.flash_dense_attn_varlen_func(
        torch.cat(qs), torch.cat(ks), torch.cat(vs), cu(q_lens), cu(k_lens), max(q_lens),
        max(k_lens), is_causal=True, num_splits=4, return_lse=True)
    start = 0
    for qb, kb, vb in zip(qs, ks, vs):
        n = qb.shape[0]
        ref, lowp = _truth(qb[None], kb[None], vb[None], True, None)
        assert_close_rule(f"varlen sequence of {kb.shape[0]} keys", out[start:start + n][None],
                          ref, lowp)
        start += n
    assert lse.shape == (h, sum(q_lens)) and torch.isfinite(lse).all()
    # paged: two sequences, 64-key pages in a shuffled table
    q, k, v = _inputs(2, 24, 256, h, hkv, d, seed=6)
    used = torch.tensor([256, 100], dtype=torch.int32, device=device)
    table = torch.randperm(8, generator=g)[:8].view(2, 4).to(torch.int32).to(device)
    kp = torch.empty(8, 64, hkv, d, dtype=dtype, device=device)
    vp = torch.empty_like(kp)
    kp[table.long()] = k.view(2, 4, 64, hkv, d)
    vp[table.long()] = v.view(2, 4, 64, hkv, d)
    paged = fsa.flash_dense_attn_func(q, kp, vp, is_causal=True, seqused_k=used,
                                      page_table=table, num_splits=3, return_lse=True)
    contig = fsa.flash_dense_attn_func(q, k, v, is_causal=True, seqused_k=used, num_splits=3,
                                       return_lse=True)
    assert torch.equal(paged[0], contig[0]) and torch.equal(paged[1], contig[1])


def test_split_gated_without_gate_test(fsa):
    """Gates with gate_threshold=0 (no gate test, nothing skipped) split like dense."""
    q, k, v = _inputs(1, 48, 400, 4, 2, 32, seed=8)
    device, dtype = DEV
    g = torch.Generator().manual_seed(9)
    alpha = (1 + torch.rand(1, 4, 48, generator=g)).to(device, dtype)
    delta = torch.randn(1, 2, 400, generator=g).to(device, dtype)
    out = fsa.flash_gated_attn_func(q, k, v, alpha, delta, is_causal=True, gate_threshold=0.0,
                                    num_splits=5)
    mask = visible_mask(48, 400, True, None, 4, q.device)
    ref = torch_lowp_attention(q.double(), k.double(), v.double(), 32 ** -0.5, mask,
                               alpha.double(), delta.double())
    lowp = torch_lowp_attention(q, k, v, 32 ** -0.5, mask, alpha, delta)
    assert_close_rule("gated split 5", out, ref, lowp)


def test_skipping_calls_do_not_split(fsa):
    """softmax_threshold > 0 keeps one program per query tile (the skip rule's anchors and
    thresholds span all of a row's keys): num_splits changes nothing, codes included."""
    q, k, v = _inputs(1, 64, 512, 4, 2, 64, seed=10)
    a = fsa.flash_sparse_attn_func(q, k, v, is_causal=True, softmax_threshold=1.0,
                                   num_splits=4, return_lse=True, return_skip_mask=True)
    b = fsa.flash_sparse_attn_func(q, k, v, is_causal=True, softmax_threshold=1.0,
                                   num_splits=1, return_lse=True, return_skip_mask=True)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_split_forward_backward(fsa):
    """The backward after a split forward (it reads the combined out and lse): gradients
    against float64 autograd."""
    q, k, v = _inputs(1, 40, 300, 4, 2, 32, seed=12)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = fsa.flash_dense_attn_func(*leaves, is_causal=True, num_splits=3)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dout)
    mask = visible_mask(40, 300, True, None, 4, q.device)
    l64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    g64 = torch.autograd.grad(torch_lowp_attention(*l64, 32 ** -0.5, mask), l64, dout.double())
    llp = [t.detach().requires_grad_() for t in (q, k, v)]
    glp = torch.autograd.grad(torch_lowp_attention(*llp, 32 ** -0.5, mask), llp, dout)
    for name, g_, r_, lp in zip(("dq", "dk", "dv"), grads, g64, glp):
        assert_close_rule(name, g_, r_, lp)


def test_split_heuristic(fsa):
    """configs.fwd_split_heuristic (a function of shapes only): launches that leave most of
    the GPU's program slots empty split, those that fill it do not, and every part keeps
    enough key tiles; an explicit num_splits is capped at the key tiles there are; CPU
    tensors never split by heuristic."""
    configs = importlib.import_module(f"{fsa.__name__}.triton.configs")
    h = configs.fwd_split_heuristic
    assert h(256, 2048) == 2  # B=1, H=32, Sq=512 in 64-row tiles, Sk=128k in 64-key tiles
    assert h(64, 512) == 5
    assert h(1024, 2048) == 1 and h(264, 2048) == 1
    assert h(64, 40) == 2  # at least 16 key tiles per part
    assert h(1, 10 ** 6) == configs.FWD_MAX_SPLITS
    q = torch.zeros(1, 1, 1, 8)
    assert configs.fwd_num_splits(q, 64, 131072, 64) == 1
    assert configs.fwd_num_splits(q, 64, 300, 128, requested=9) == 3  # 3 tiles of 128 keys
    # the partials' workspace stays under FWD_SPLIT_WORKSPACE_BYTES
    row = configs.FWD_SPLIT_WORKSPACE_BYTES // 4
    assert configs.fwd_num_splits(q, 64, 1 << 20, 64, requested=32, partial_row_bytes=row) == 4
    assert configs.fwd_num_splits(q, 64, 1 << 20, 64, requested=32,
                                  partial_row_bytes=4 * row) == 1
