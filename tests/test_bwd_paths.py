"""The backward's kernel paths (`configs.bwd_path`): on an sm_90 GPU in bf16, the warp-specialised
Gluon backward (`triton/hopper_bwd.py`, dense and sparse, dQ by atomics or by the deterministic
pass) against float64 and against the portable backward on the shapes that hurt; and the
dispatch rule itself, which CI checks on the CPU.

Ground truth: `reference.attention_backward` in float64 over the blocks the forward kept; the
error rule of DESIGN.md against PyTorch's bf16 attention backward over the same blocks.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from kernel_utils import (HAS_CUDA, assert_close_rule, draw_qkv, kept_element_mask,
                          torch_lowp_attention, visible_mask)


def _mods(fsa):
    return [importlib.import_module(f"{fsa.__name__}.{m}")
            for m in ("triton.fwd", "triton.bwd", "triton.configs", "reference")]


def _hopper():
    return HAS_CUDA and torch.cuda.get_device_capability()[0] == 9


CASES = [
    # b, sq, sk, h, hkv, d, causal, threshold, local (keys near the query's position dominate)
    (1, 1, 1, 1, 1, 64, True, 0.0, False),
    (2, 63, 63, 4, 1, 64, True, 0.0, False),  # MQA, one partial tile
    (1, 65, 1000, 4, 2, 128, True, 0.0, False),  # Sq < Sk
    (1, 1000, 65, 4, 2, 128, True, 0.0, False),  # Sq > Sk: first rows see nothing
    (2, 1000, 1000, 8, 2, 128, False, 0.0, False),
    (1, 4097, 4097, 4, 1, 128, True, 0.0, False),
    (2, 4097, 1000, 4, 4, 64, False, 0.0, False),
    (1, 2048, 2048, 8, 2, 128, True, 1.0, True),  # sparse: skips blocks
    (1, 2048, 2048, 8, 2, 128, True, 1.0, False),  # sparse, random: nothing to skip
    (1, 1000, 3000, 4, 1, 128, True, 10.0, True),
]


def _inputs(b, sq, sk, h, hkv, d, local, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = draw_qkv(b, sq, sk, h, hkv, d, local, g)
    dout = torch.randn(b, sq, h, d, generator=g)
    return [x.to("cuda", torch.bfloat16) for x in (q, k, v, dout)]


def _kw(sq, sk, d, causal, t, deterministic=False):
    return dict(alpha=None, delta=None, cu_seqlens_q=None, cu_seqlens_k=None, seqused_k=None,
                window_sizes=None, max_seqlen_q=sq, max_seqlen_k=sk, softmax_scale=d ** -0.5,
                is_causal=causal, softmax_threshold=t, gate_threshold=0.0,
                is_logsigmoid_gate=True, is_adapt_gate=False, deterministic=deterministic)


def _element_mask(codes, configs, d, base):
    return kept_element_mask(codes, configs.skip_block_m(d), configs.SKIP_BLOCK_N, base)


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="the Gluon backward is the sm_90 path")
@pytest.mark.parametrize("b,sq,sk,h,hkv,d,causal,t,local", CASES)
def test_hopper_bwd_matches_float64_and_portable(fsa, b, sq, sk, h, hkv, d, causal, t, local):
    fwd, bwd, configs, ref = _mods(fsa)
    q, k, v, dout = _inputs(b, sq, sk, h, hkv, d, local, sq * 5 + sk + d)
    assert configs.bwd_path(q, k, v, dout, hopper_covers=True) == "hopper"
    kw = _kw(sq, sk, d, causal, t)
    out, lse, skip = fwd.launch_attn_fwd(q, k, v, **kw)
    if t > 0:
        print(f"blocks kept {(skip == 1).sum().item()}, skipped {(skip == 2).sum().item()}")
        assert (skip == 2).any().item() == local
    grads = bwd.launch_attn_bwd(dout, q, k, v, out, lse, skip, **kw)[:3]
    with configs.fwd_path_override("portable"):
        grads_p = bwd.launch_attn_bwd(dout, q, k, v, out, lse, skip, **kw)[:3]
    # deterministic: dK/dV from the Gluon kernel, dQ from the deterministic pass; bitwise
    # reproducible, and dK/dV the same bits as the atomic launch's
    det = [bwd.launch_attn_bwd(dout, q, k, v, out, lse, skip, **_kw(sq, sk, d, causal, t, True))
           [:3] for _ in range(2)]
    for x, y in zip(det[0], det[1]):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    torch.testing.assert_close(det[0][1], grads[1], rtol=0, atol=0)
    torch.testing.assert_close(det[0][2], grads[2], rtol=0, atol=0)

    kept = skip if skip.numel() else None
    d64 = [x.double() for x in (q, k, v, dout)]
    ref_out, ref_lse = ref.attention_forward(*d64[:3], softmax_scale=d ** -0.5, is_causal=causal,
                                             skip=kept)
    ref_grads = ref.attention_backward(d64[3], *d64[:3], ref_out, ref_lse,
                                       softmax_scale=d ** -0.5, is_causal=causal, skip=kept)[:3]
    base = visible_mask(sq, sk, causal, None, h, "cuda")
    lowp = []
    for i in range(b):
        mask = _element_mask(skip[i], configs, d, base) if kept is not None else base
        leaves = [x[i:i + 1].detach().requires_grad_() for x in (q, k, v)]
        o = torch_lowp_attention(*leaves, d ** -0.5, mask)
        lowp.append(torch.autograd.grad(o, leaves, dout[i:i + 1]))
    lowp = [torch.cat([g[j] for g in lowp]) for j in range(3)]
    for name, got, got_p, r, lp in zip(("dq", "dk", "dv"), grads, grads_p, ref_grads, lowp):
        assert got.dtype == q.dtype and got.shape == r.shape
        assert_close_rule(name, got, r, lp)
        # within rounding of the portable backward
        err, err_p = ((x.double() - r).abs().max().item() for x in (got, got_p))
        assert err <= 2 * err_p + 1e-5, (name, err, err_p)


GATED_CASES = [
    # b, sq, sk, h, hkv, d, causal, logsigmoid, strided gates (no gate test: gate_threshold 0)
    (1, 1000, 1000, 8, 2, 128, True, True, False),
    (2, 63, 200, 4, 1, 64, True, False, True),  # MQA, Sq < Sk, linear gate
    (1, 700, 300, 4, 4, 128, False, True, True),  # Sq > Sk, MHA
    (1, 1500, 1500, 4, 2, 64, True, True, True),
    (1, 2048, 2048, 8, 2, 128, True, False, False),
]


def _gates(b, sq, sk, h, hkv, strided, seed):
    """alpha [B, H, Sq] in [1, 2] and delta [B, Hkv, Sk] ~ N(0, 1) with every third 64-key
    block closed (delta -100: its keys' gate is about -150), bf16 on the GPU; strided:
    transposes of [B, S, H] tensors."""
    g = torch.Generator().manual_seed(seed)
    alpha = 1 + torch.rand(b, sq, h, generator=g)
    delta = torch.randn(b, sk, hkv, generator=g)
    delta[:, (torch.arange(sk) // 64) % 3 == 1] = -100.0
    alpha, delta = (x.to("cuda", torch.bfloat16) for x in (alpha, delta))
    if strided:
        return alpha.transpose(1, 2), delta.transpose(1, 2)
    return alpha.transpose(1, 2).contiguous(), delta.transpose(1, 2).contiguous()


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="the Gluon backward is the sm_90 path")
@pytest.mark.parametrize("b,sq,sk,h,hkv,d,causal,logsig,strided", GATED_CASES)
def test_hopper_gated_bwd(fsa, b, sq, sk, h, hkv, d, causal, logsig, strided):
    """Gated (SPEC §6) without the gate test: dK/dV/ddelta from the Gluon kernel, dQ/dalpha
    from the dQ pass; against float64, within rounding of the portable backward, and bitwise
    reproducible. (With the gate test the backward is the portable one: `bwd.py` says why.)"""
    fwd, bwd, configs, ref = _mods(fsa)
    q, k, v, dout = _inputs(b, sq, sk, h, hkv, d, False, sq + 3 * sk + d)
    alpha, delta = _gates(b, sq, sk, h, hkv, strided, sq + sk)
    assert configs.bwd_path(q, k, v, dout, hopper_covers=True) == "hopper"
    kw = _kw(sq, sk, d, causal, 0.0)
    kw.update(alpha=alpha, delta=delta, is_logsigmoid_gate=logsig)
    out, lse, skip = fwd.launch_attn_fwd(q, k, v, **kw)
    grads = bwd.launch_attn_bwd(dout, q, k, v, out, lse, skip, **kw)
    with configs.fwd_path_override("portable"):
        grads_p = bwd.launch_attn_bwd(dout, q, k, v, out, lse, skip, **kw)
    again = bwd.launch_attn_bwd(dout, q, k, v, out, lse, skip, **{**kw, "deterministic": True})
    for x, y in zip(grads, again):
        torch.testing.assert_close(x, y, rtol=0, atol=0)

    d64 = [x.double() for x in (q, k, v, dout, alpha, delta)]
    gkw = dict(alpha=d64[4], delta=d64[5], softmax_scale=d ** -0.5, is_causal=causal,
               is_logsigmoid_gate=logsig)
    ref_out, ref_lse = ref.attention_forward(*d64[:3], **gkw)
    ref_grads = ref.attention_backward(d64[3], *d64[:3], ref_out, ref_lse, **gkw)
    mask = visible_mask(sq, sk, causal, None, h, "cuda")
    lowp = []
    for i in range(b):
        leaves = [x[i:i + 1].detach().requires_grad_() for x in (q, k, v, alpha, delta)]
        o = torch_lowp_attention(*leaves[:3], d ** -0.5, mask, leaves[3], leaves[4], logsig)
        lowp.append(torch.autograd.grad(o, leaves, dout[i:i + 1]))
    lowp = [torch.cat([g[j] for g in lowp]) for j in range(5)]
    for name, got, got_p, r, lp in zip(("dq", "dk", "dv", "dalpha", "ddelta"), grads, grads_p,
                                       ref_grads, lowp):
        assert got.shape == r.shape
        assert_close_rule(name, got, r, lp)
        err, err_p = ((x.double() - r).abs().max().item() for x in (got, got_p))
        assert err <= 2 * err_p + 1e-5 * max(r.abs().max().item(), 1.0), (name, err, err_p)


def test_bwd_path_dispatch(fsa):
    """CPU tensors and the interpreter take the portable backward, so does any forced path other
    than "hopper"."""
    _, _, configs, _ = _mods(fsa)
    q = torch.zeros(1, 8, 2, 64, dtype=torch.float16)
    assert configs.bwd_path(q, q, q, q, hopper_covers=True) == "portable"
    with configs.fwd_path_override("hopper"):
        assert configs.bwd_path(q, q, q, q, hopper_covers=True) == "portable"
    assert set(configs.HOPPER_BWD_DQ.values()) <= {"atomic", "pass"}
