"""The forward's kernel paths (SPEC §5.2, `configs.fwd_path`): on an sm_90 GPU in bf16, the TMA
path (K/V through TMA descriptors) and the warp-specialised Gluon path (`triton/hopper.py`,
dense, sparse and gated)
against float64 and against the portable path on the shapes that hurt; and the dispatch rule
itself, which CI checks on the CPU.

Ground truth: `reference.attention_forward` in float64 over the blocks the kernel kept; the
error rule of DESIGN.md against PyTorch's bf16 attention over the same blocks.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from kernel_utils import (HAS_CUDA, assert_close_rule, draw_qkv, kept_element_mask,
                          torch_lowp_attention, visible_mask)


def _mods(fsa):
    return [importlib.import_module(f"{fsa.__name__}.{m}")
            for m in ("triton.fwd", "triton.configs", "reference")]


def _hopper():
    return HAS_CUDA and torch.cuda.get_device_capability()[0] == 9


CASES = [
    # b, sq, sk, h, hkv, d, causal, window [sink, left, right, near], threshold, gated
    (1, 1, 1, 1, 1, 64, True, None, 0.0, False),
    (2, 63, 63, 4, 1, 64, True, None, 1.0, False),  # MQA
    (1, 65, 1000, 4, 2, 80, True, None, 0.0, False),  # Sq < Sk
    (1, 1000, 65, 4, 2, 96, True, None, 0.0, False),  # Sq > Sk: first rows see nothing
    (1, 1000, 1000, 8, 2, 128, True, None, 1.0, True),
    (1, 4097, 4097, 4, 1, 128, True, None, 1.0, False),
    (1, 1000, 1000, 4, 2, 40, False, None, 0.0, True),
    (1, 1000, 1000, 4, 2, 192, True, None, 1.0, False),
    (1, 4097, 4097, 4, 2, 256, True, None, 0.0, False),
    (1, 1000, 1000, 4, 2, 128, True, [16, 200, 100, 128], 1.0, False),
]


def _element_mask(codes, configs, d, base):
    return kept_element_mask(codes, configs.skip_block_m(d), configs.SKIP_BLOCK_N, base)


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="the TMA path is the sm_90 path")
@pytest.mark.parametrize("b,sq,sk,h,hkv,d,causal,win,t,gated", CASES)
def test_tma_path_matches_float64_and_portable(fsa, b, sq, sk, h, hkv, d, causal, win, t, gated):
    _check_path(fsa, "tma", b, sq, sk, h, hkv, d, causal, win, t, gated, local=False)


SPARSE_HOPPER_CASES = [
    # b, sq, sk, h, hkv, causal, threshold, local (keys near the query's position dominate),
    # and whether these inputs skip blocks
    (1, 63, 63, 4, 1, True, 1.0, False, False),  # the CTA's second row block is past Sq
    (1, 65, 1000, 4, 2, True, 1.0, True, True),  # Sq < Sk
    (1, 1000, 65, 4, 2, True, 1.0, True, False),  # Sq > Sk: first rows see nothing
    (2, 1000, 1000, 8, 2, False, 1.0, True, False),
    (1, 4097, 4097, 4, 1, True, 1.0, True, True),
    (1, 2048, 2048, 8, 2, True, 10.0, True, True),
    (1, 2048, 2048, 8, 2, True, 1.0, False, False),  # random: nothing to skip
    (1, 3000, 1000, 4, 4, False, 10.0, True, True),
]


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="the Gluon path is the sm_90 path")
@pytest.mark.parametrize("b,sq,sk,h,hkv,causal,t,local,skips", SPARSE_HOPPER_CASES)
def test_hopper_sparse_matches_float64_and_portable(fsa, b, sq, sk, h, hkv, causal, t, local,
                                                    skips):
    """The Gluon kernel's sparse forward (two 64-key skip blocks per 128-key tile, the test a
    warpgroup-wide OR) against float64 over the blocks it kept, its skip codes against the
    portable kernel's (SPEC §5.2), and the public function taking it."""
    _, configs, _ = _mods(fsa)
    _check_path(fsa, "hopper", b, sq, sk, h, hkv, configs.HOPPER_HEAD_DIMS["sparse"][-1], causal,
                None, t, False, local, skips)


def _check_path(fsa, path, b, sq, sk, h, hkv, d, causal, win, t, gated, local, skips=None):
    fwd, configs, ref = _mods(fsa)
    g = torch.Generator().manual_seed(sq * 7 + d)
    dev, dt = "cuda", torch.bfloat16
    q, k, v = (x.to(dev, dt) for x in draw_qkv(b, sq, sk, h, hkv, d, local, g))
    alpha = delta = None
    if gated:  # strided views; a stretch of closed keys for the gate test
        alpha = (1 + torch.rand(b, sq, h, generator=g)).to(dev, dt).transpose(1, 2)
        dl = torch.randn(b, sk, hkv, generator=g)
        dl[:, 64:256] -= 120.0
        delta = dl.to(dev, dt).transpose(1, 2)
    windows = None if win is None else torch.tensor([win] * hkv, dtype=torch.int32, device=dev)
    assert configs.fwd_path(q, k, v, hopper_covers=path == "hopper",
                            variant="gated" if gated else "sparse" if t > 0 else "dense") == path
    kw = dict(alpha=alpha, delta=delta, cu_seqlens_q=None, cu_seqlens_k=None, seqused_k=None,
              window_sizes=windows, max_seqlen_q=sq, max_seqlen_k=sk, softmax_scale=d ** -0.5,
              is_causal=causal, softmax_threshold=t, gate_threshold=-1.0 if gated else 0.0,
              is_logsigmoid_gate=True, is_adapt_gate=False, deterministic=False)
    out, lse, skip = fwd.launch_attn_fwd(q, k, v, path=path, **kw)
    out_p, lse_p, skip_p = fwd.launch_attn_fwd(q, k, v, path="portable", **kw)
    # SPEC §5.2: the two paths may disagree only on blocks within fp32 rounding of the threshold
    differ = (skip != skip_p).sum().item()
    print(f"skip codes differing between the paths: {differ} of {skip.numel()}")
    assert differ <= max(1, skip.numel() // 1000)
    d64 = {n: (None if x is None else x.double()) for n, x in
           dict(q=q, k=k, v=v, alpha=alpha, delta=delta).items()}
    ref_out, ref_lse = ref.attention_forward(
        d64["q"], d64["k"], d64["v"], alpha=d64["alpha"], delta=d64["delta"],
        window_sizes=windows, softmax_scale=d ** -0.5, is_causal=causal,
        skip=skip if skip.numel() else None)
    base = visible_mask(sq, sk, causal, windows, h, dev)
    mask = torch.stack([_element_mask(skip[i], configs, d, base) for i in range(b)]) \
        if skip.numel() else base[None].expand(b, -1, -1, -1)
    lowp = torch.cat([torch_lowp_attention(q[i:i + 1], k[i:i + 1], v[i:i + 1], d ** -0.5,
                                           mask[i], None if alpha is None else alpha[i:i + 1],
                                           None if delta is None else delta[i:i + 1])
                      for i in range(b)])
    assert_close_rule("out", out, ref_out, lowp)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    if finite.any():
        assert (lse.double() - ref_lse)[finite].abs().max().item() < 2e-2
    if path == "tma" and differ == 0:  # same blocks, same tile order: the same numbers
        torch.testing.assert_close(out, out_p, rtol=0, atol=0)
    if path == "hopper":
        kept = (skip == 1).sum().item()
        print(f"blocks kept {kept}, skipped {(skip == 2).sum().item()}")
        assert kept > 0 and (skip == 2).any().item() == skips
        # the public function takes this path and returns the same bits
        o_pub = fsa.flash_sparse_attn_func(q, k, v, is_causal=causal, softmax_threshold=t)
        torch.testing.assert_close(o_pub, out, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="the TMA path is the sm_90 path")
@pytest.mark.parametrize("t", [0.0, 1.0])
def test_tma_path_varlen_seqused(fsa, t):
    """Varlen with empty sequences and seqused_k: the masked tiles keep pointer loads, so keys
    past a sequence's used length (here NaN) never reach the output."""
    fwd, configs, ref = _mods(fsa)
    lens = [0, 63, 1000, 65, 2000]
    used = [0, 50, 1000, 10, 1999]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device="cuda")
    tot, h, hkv, d = int(cu[-1]), 8, 2, 80
    g = torch.Generator().manual_seed(5)
    q = torch.randn(tot, h, d, generator=g).cuda().bfloat16()
    k = torch.randn(tot, hkv, d, generator=g).cuda().bfloat16()
    v = torch.randn(tot, hkv, d, generator=g).cuda().bfloat16()
    for i, (s, u) in enumerate(zip(lens, used)):  # unused cache slots hold NaN
        k[int(cu[i]) + u: int(cu[i]) + s] = float("nan")
        v[int(cu[i]) + u: int(cu[i]) + s] = float("nan")
    seqused = torch.tensor(used, dtype=torch.int32, device="cuda")
    assert configs.fwd_path(q, k, v) == "tma"
    kw = dict(alpha=None, delta=None, cu_seqlens_q=cu, cu_seqlens_k=cu, seqused_k=seqused,
              window_sizes=None, max_seqlen_q=max(lens), max_seqlen_k=max(lens),
              softmax_scale=d ** -0.5, is_causal=True, softmax_threshold=t, gate_threshold=0.0,
              is_logsigmoid_gate=True, is_adapt_gate=False, deterministic=False)
    out, lse, skip = fwd.launch_attn_fwd(q, k, v, path="tma", **kw)
    out_p, _, skip_p = fwd.launch_attn_fwd(q, k, v, path="portable", **kw)
    assert not torch.isnan(out).any()
    assert torch.equal(skip, skip_p)
    ref_out, _ = ref.attention_forward(q.double(), k.double(), v.double(), cu_seqlens_q=cu,
                                       cu_seqlens_k=cu, seqused_k=seqused,
                                       softmax_scale=d ** -0.5, is_causal=True,
                                       skip=skip if skip.numel() else None)
    err, err_p = ((x.double() - ref_out).abs().max().item() for x in (out, out_p))
    assert err <= 2 * err_p + 1e-5, (err, err_p)


HOPPER_CASES = [
    # b, sq, sk, h, hkv, d, causal, q as a transposed [B, H, S, D] view
    (1, 1, 1, 1, 1, 64, True, False),
    (2, 63, 63, 4, 1, 64, True, False),  # MQA
    (1, 65, 1000, 4, 2, 128, True, False),  # Sq < Sk
    (1, 1000, 65, 4, 2, 128, True, False),  # Sq > Sk: first rows see nothing
    (1, 1000, 1000, 8, 2, 128, False, True),
    (1, 4097, 4097, 4, 1, 128, True, False),
    (2, 4097, 1000, 4, 4, 64, False, False),
    (1, 2048, 2048, 8, 2, 128, True, True),
    (1, 1000, 65, 4, 2, 256, True, False),  # D=256: 64-key tiles
    (1, 4097, 4097, 4, 1, 256, True, True),
    (2, 1000, 3000, 4, 4, 256, False, False),
]


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="the Gluon path is the sm_90 path")
@pytest.mark.parametrize("b,sq,sk,h,hkv,d,causal,strided", HOPPER_CASES)
def test_hopper_path_matches_float64(fsa, b, sq, sk, h, hkv, d, causal, strided):
    fwd, configs, ref = _mods(fsa)
    hopper = importlib.import_module(f"{fsa.__name__}.triton.hopper")
    g = torch.Generator().manual_seed(sq + 3 * d + h)
    dev, dt = "cuda", torch.bfloat16
    if strided:
        q = torch.randn(b, h, sq, d, generator=g).to(dev, dt).transpose(1, 2)
    else:
        q = torch.randn(b, sq, h, d, generator=g).to(dev, dt)
    k = torch.randn(b, sk, hkv, d, generator=g).to(dev, dt)
    v = torch.randn(b, sk, hkv, d, generator=g).to(dev, dt)
    assert configs.fwd_path(q, k, v, hopper_covers=True) == \
        ("hopper" if d in configs.HOPPER_HEAD_DIMS["dense"] else "tma")
    out = torch.full_like(q, float("nan"))  # every element must be written
    lse = torch.full((b, h, sq), float("nan"), device=dev)
    hopper.launch_attn_fwd_hopper(q, k, v, out, lse, softmax_scale=d ** -0.5, is_causal=causal,
                                  config=configs.hopper_config(q, d))
    mask = visible_mask(sq, sk, causal, None, h, dev)
    ref_out, ref_lse = ref.attention_forward(q.double(), k.double(), v.double(),
                                             softmax_scale=d ** -0.5, is_causal=causal)
    lowp = torch_lowp_attention(q, k, v, d ** -0.5, mask)
    assert_close_rule("out", out, ref_out, lowp)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite) and not torch.isnan(lse).any()
    if finite.any():
        assert (lse.double() - ref_lse)[finite].abs().max().item() < 2e-2
    # where the public function takes this path, it returns the same bits; and it lands within
    # rounding of the portable path
    o_pub = fsa.flash_dense_attn_func(q, k, v, is_causal=causal)
    with configs.fwd_path_override("portable"):
        o_port = fsa.flash_dense_attn_func(q, k, v, is_causal=causal)
    if d in configs.HOPPER_HEAD_DIMS["dense"]:
        torch.testing.assert_close(o_pub, out, rtol=0, atol=0)
    assert (out.double() - o_port.double()).abs().max().item() <= \
        2 * (lowp.double() - ref_out).abs().max().item() + 1e-5


GATED_HOPPER_CASES = [
    # b, sq, sk, h, hkv, d, causal, logsigmoid gate, alpha/delta as transposed views, and
    # their dtype (None: q's)
    (1, 65, 1000, 4, 2, 128, True, True, True, None),  # Sq < Sk
    (1, 1000, 65, 4, 2, 128, True, True, False, None),  # Sq > Sk: first rows see nothing
    (2, 1000, 1000, 8, 2, 64, False, False, True, None),  # linear gate
    (1, 4097, 4097, 4, 1, 128, True, True, False, None),
    (1, 2048, 2048, 8, 2, 256, True, True, True, None),
    (1, 1000, 3000, 4, 4, 256, False, False, False, None),
    (1, 1000, 1000, 4, 2, 128, True, False, False, torch.float32),
    (1, 1000, 1001, 4, 2, 256, True, True, False, torch.float64),  # copied to fp32 rows
]


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="the Gluon path is the sm_90 path")
@pytest.mark.parametrize("b,sq,sk,h,hkv,d,causal,logsig,strided,gdt", GATED_HOPPER_CASES)
def test_hopper_gated_matches_float64(fsa, b, sq, sk, h, hkv, d, causal, logsig, strided, gdt):
    """The Gluon kernel's gated forward (SPEC §6, no block test: gate_threshold 0; alpha by
    pointer loads, delta by TMA or through an aligned copy) against float64, the portable
    path within the rounding rule, and the public function where the dispatch takes it."""
    fwd, configs, ref = _mods(fsa)
    g = torch.Generator().manual_seed(sq + 5 * d + int(logsig))
    dev, dt = "cuda", torch.bfloat16
    q, k, v = (x.to(dev, dt) for x in draw_qkv(b, sq, sk, h, hkv, d, False, g))
    a = 1 + torch.rand(b, sq, h, generator=g)
    dl = 2 * torch.randn(b, sk, hkv, generator=g)
    if logsig:
        dl[:, 64:256] -= 30.0  # closed keys: the gate, not the scores, decides there
    gdt = gdt or dt
    if strided:
        alpha, delta = a.to(dev, gdt).transpose(1, 2), dl.to(dev, gdt).transpose(1, 2)
    else:
        alpha = a.transpose(1, 2).contiguous().to(dev, gdt)
        delta = dl.transpose(1, 2).contiguous().to(dev, gdt)
    variant = "gated" if logsig else "gated_linear"
    dispatched = configs.fwd_path(q, k, v, hopper_covers=True, variant=variant)
    assert dispatched == ("hopper" if d in configs.HOPPER_HEAD_DIMS[variant] else "tma")
    kw = dict(alpha=alpha, delta=delta, cu_seqlens_q=None, cu_seqlens_k=None, seqused_k=None,
              window_sizes=None, max_seqlen_q=sq, max_seqlen_k=sk, softmax_scale=d ** -0.5,
              is_causal=causal, softmax_threshold=0.0, gate_threshold=0.0,
              is_logsigmoid_gate=logsig, is_adapt_gate=False, deterministic=False)
    out, lse, skip = fwd.launch_attn_fwd(q, k, v, path="hopper", **kw)
    out_p, _, _ = fwd.launch_attn_fwd(q, k, v, path="portable", **kw)
    d64 = {n: x.double() for n, x in dict(q=q, k=k, v=v, alpha=alpha, delta=delta).items()}
    ref_out, ref_lse = ref.attention_forward(
        d64["q"], d64["k"], d64["v"], alpha=d64["alpha"], delta=d64["delta"],
        softmax_scale=d ** -0.5, is_causal=causal, is_logsigmoid_gate=logsig)
    mask = visible_mask(sq, sk, causal, None, h, dev)
    lowp = torch_lowp_attention(q, k, v, d ** -0.5, mask, alpha, delta, logsig)
    assert_close_rule("out", out, ref_out, lowp)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite) and not torch.isnan(lse).any()
    if finite.any():
        assert (lse.double() - ref_lse)[finite].abs().max().item() < 2e-2
    assert (out.double() - out_p.double()).abs().max().item() <= \
        2 * (lowp.double() - ref_out).abs().max().item() + 1e-5
    if dispatched == "hopper":  # the public function takes this path: the same bits
        o_pub = fsa.flash_gated_attn_func(q, k, v, alpha, delta, is_causal=causal,
                                          gate_threshold=0.0, is_logsigmoid_gate=logsig)
        torch.testing.assert_close(o_pub, out, rtol=0, atol=0)


def test_fwd_path_dispatch(fsa):
    """CPU tensors and the interpreter take the portable path; the override names a path or
    refuses; TMA needs 16-byte aligned bases and strides (checked on CPU tensors)."""
    _, configs, _ = _mods(fsa)
    q = torch.zeros(1, 8, 2, 64, dtype=torch.float16)
    assert configs.fwd_path(q, q, q) == "portable"
    with configs.fwd_path_override("portable"):
        assert configs.fwd_path(q, q, q) == "portable"
    with configs.fwd_path_override("hopper"):
        assert configs.fwd_path(q, q, q, hopper_covers=True) == "portable"
    with pytest.raises(ValueError, match="path"):
        with configs.fwd_path_override("fast"):
            pass
    assert configs._tma_ready(q)
    flat = torch.zeros(1 + 8 * 2 * 64, dtype=torch.float16)
    assert not configs._tma_ready(flat[1:].view(1, 8, 2, 64))  # base 2 bytes off
    assert not configs._tma_ready(torch.zeros(1, 8, 2, 68, dtype=torch.float16))  # 136-byte rows
    assert not configs._tma_ready(torch.zeros(1, 0, 2, 64, dtype=torch.float16))
