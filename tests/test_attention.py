"""Triton attention kernels (forward and backward) against float64, through the public API.

Runs the kernels under TRITON_INTERPRET=1 on the CPU in fp16 (CI) and on CUDA in bf16 (device).
Ground truth: `torch_lowp_attention` evaluated in float64 on the same rounded inputs.
"""

from __future__ import annotations

import pytest
import torch

from kernel_utils import (
    HAS_CUDA,
    assert_close_rule,
    kernel_device_dtype,
    poison_like,
    torch_lowp_attention,
    visible_mask,
)

DEV = kernel_device_dtype()
pytestmark = pytest.mark.skipif(DEV is None, reason="kernels need CUDA or TRITON_INTERPRET=1")


def _inputs(b, sq, sk, h, hkv, d, gated=False, seed=0):
    device, dtype = DEV
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, sq, h, d, generator=g).to(device, dtype)
    k = torch.randn(b, sk, hkv, d, generator=g).to(device, dtype)
    v = torch.randn(b, sk, hkv, d, generator=g).to(device, dtype)
    do = torch.randn(b, sq, h, d, generator=g).to(device, dtype)
    if not gated:
        return q, k, v, do, None, None
    # alpha/delta as strided views (transposes of [B, S, H] tensors), SPEC §1
    alpha = torch.randn(b, sq, h, generator=g).to(device, dtype).transpose(1, 2)
    delta = (2 * torch.randn(b, sk, hkv, generator=g)).to(device, dtype).transpose(1, 2)
    return q, k, v, do, alpha, delta


def _truth(q, k, v, scale, mask, alpha=None, delta=None, logsig=True):
    """float64 out and lse, plus the same-dtype PyTorch output, for [B,S,H,D] inputs."""
    ref = torch_lowp_attention(*(t.double() for t in (q, k, v)), scale, mask,
                               None if alpha is None else alpha.double(),
                               None if delta is None else delta.double(), logsig)
    group = q.shape[2] // k.shape[2]
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double().repeat_interleave(group, 2))
    if alpha is not None:
        x = alpha.double()[..., None] * delta.double().repeat_interleave(group, 1)[:, :, None, :]
        s = s + (torch.nn.functional.logsigmoid(x) if logsig else x)
    lse = (s * scale).masked_fill(~mask[None], float("-inf")).logsumexp(-1)
    lowp = torch_lowp_attention(q, k, v, scale, mask, alpha, delta, logsig)
    return ref, lse, lowp


def _check_lse(lse, lse_ref):
    finite = torch.isfinite(lse_ref)
    assert torch.equal(torch.isinf(lse.cpu()) & (lse.cpu() < 0), ~finite.cpu()), \
        "rows with no visible key must have lse = -inf, and only those"
    if finite.any():
        err = (lse.double() - lse_ref)[finite].abs().max().item()
        assert err < 2e-2, f"lse error {err}"


FWD_CASES = [
    # b, sq, sk, h, hkv, d, causal
    (1, 1, 1, 1, 1, 64, True),
    (2, 63, 63, 2, 1, 64, True),
    (1, 65, 65, 4, 4, 40, False),
    (1, 63, 130, 4, 2, 80, True),  # Sq < Sk
    (1, 130, 63, 2, 1, 96, True),  # Sq > Sk: first rows see nothing
    (1, 1, 257, 4, 1, 128, False),  # MQA, one query
    (1, 33, 47, 2, 2, 192, True),
    (1, 40, 40, 2, 1, 256, True),
    (2, 17, 100, 8, 2, 64, False),
]


@pytest.mark.parametrize("b,sq,sk,h,hkv,d,causal", FWD_CASES)
def test_forward(fsa, b, sq, sk, h, hkv, d, causal):
    q, k, v, _, _, _ = _inputs(b, sq, sk, h, hkv, d)
    scale = d ** -0.5
    mask = visible_mask(sq, sk, causal, None, h, q.device)
    ref, lse_ref, lowp = _truth(q, k, v, scale, mask)
    out = poison_like(q)
    lse = torch.full((b, h, sq), float("nan"), device=q.device)
    o, l = fsa.flash_dense_attn_func(q, k, v, is_causal=causal, out=out, lse=lse, return_lse=True)
    assert o.data_ptr() == out.data_ptr()
    assert_close_rule("out", o, ref, lowp)
    _check_lse(l, lse_ref)


BWD_CASES = [
    (1, 63, 63, 2, 1, 64, True),
    (1, 40, 100, 4, 2, 40, True),
    (1, 100, 40, 2, 2, 32, True),
    (2, 33, 70, 2, 1, 64, False),
    (1, 1, 65, 2, 1, 128, True),
]


def _grads(fn, ins, do):
    ins = [t.detach().requires_grad_() for t in ins]
    out = fn(*ins)
    grads = torch.autograd.grad(out, ins, do)
    return out, grads


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("b,sq,sk,h,hkv,d,causal", BWD_CASES)
def test_backward(fsa, b, sq, sk, h, hkv, d, causal, deterministic):
    q, k, v, do, _, _ = _inputs(b, sq, sk, h, hkv, d, seed=1)
    scale = d ** -0.5
    mask = visible_mask(sq, sk, causal, None, h, q.device)
    _, g_ref = _grads(lambda *t: torch_lowp_attention(*t, scale, mask),
                      [t.double() for t in (q, k, v)], do.double())
    _, g_low = _grads(lambda *t: torch_lowp_attention(*t, scale, mask), [q, k, v], do)
    _, g = _grads(lambda *t: fsa.flash_dense_attn_func(*t, is_causal=causal,
                                                       deterministic=deterministic),
                  [q, k, v], do)
    for name, a, r, lo in zip(("dq", "dk", "dv"), g, g_ref, g_low):
        assert_close_rule(name, a, r, lo)


WINDOWS = [
    [[3, 10, 5, 7], [0, 20, 0, 33]],  # sink + far + near; near only + far with no gap
    [[0, 0, 0, 1], [16, 0, 0, 0]],  # diagonal only; sink only
    [[0, 200, 0, 4], [5, 3, 400, 2]],  # bands beyond the sequence
]


@pytest.mark.parametrize("win", WINDOWS)
@pytest.mark.parametrize("per_qhead", [False, True])
def test_local_window(fsa, win, per_qhead):
    b, sq, sk, h, hkv, d = 1, 70, 90, 4, 2, 32
    q, k, v, do, _, _ = _inputs(b, sq, sk, h, hkv, d, seed=2)
    windows = torch.tensor(win, dtype=torch.int32, device=q.device)
    if per_qhead:
        windows = windows.repeat_interleave(h // hkv, 0).flip(0).contiguous()
    scale = d ** -0.5
    mask = visible_mask(sq, sk, True, windows.cpu(), h, "cpu").to(q.device)
    fn = lambda *t: fsa.flash_dense_attn_func(*t, window_sizes=windows)  # noqa: E731
    _, g_ref = _grads(lambda *t: torch_lowp_attention(*t, scale, mask),
                      [t.double() for t in (q, k, v)], do.double())
    out_low, g_low = _grads(lambda *t: torch_lowp_attention(*t, scale, mask), [q, k, v], do)
    out, g = _grads(fn, [q, k, v], do)
    ref, _, _ = _truth(q, k, v, scale, mask)
    assert_close_rule("out", out, ref, out_low)
    for name, a, r, lo in zip(("dq", "dk", "dv"), g, g_ref, g_low):
        assert_close_rule(name, a, r, lo)


@pytest.mark.parametrize("shape", [
    (2, 45, 70, 4, 2, 32),
    pytest.param((1, 1000, 1000, 8, 2, 128), marks=pytest.mark.skipif(
        not HAS_CUDA, reason="D=128 at 1000 tokens (the gated launch tables) is for the GPU")),
    # on Hopper the linear gate at D=128 and both at D=256 take the Gluon forward
    pytest.param((1, 1000, 1000, 4, 2, 256), marks=pytest.mark.skipif(
        not HAS_CUDA, reason="D=256 at 1000 tokens is for the GPU")),
])
@pytest.mark.parametrize("logsig", [True, False])
@pytest.mark.parametrize("causal", [True, False])
def test_gated(fsa, logsig, causal, shape):
    b, sq, sk, h, hkv, d = shape
    q, k, v, do, alpha, delta = _inputs(b, sq, sk, h, hkv, d, gated=True, seed=3)
    scale = d ** -0.5
    mask = visible_mask(sq, sk, causal, None, h, q.device)

    def ours(q_, k_, v_, a_, d_):
        return fsa.flash_gated_attn_func(q_, k_, v_, a_, d_, is_causal=causal,
                                          is_logsigmoid_gate=logsig, gate_threshold=0.0)

    def torch_fn(q_, k_, v_, a_, d_):
        return torch_lowp_attention(q_, k_, v_, scale, mask, a_, d_, logsig)

    ins = [q, k, v, alpha, delta]
    ref, g_ref = _grads(torch_fn, [t.double() for t in ins], do.double())
    low, g_low = _grads(torch_fn, ins, do)
    out, g = _grads(ours, ins, do)
    assert_close_rule("out", out, ref, low)
    for name, a, r, lo in zip(("dq", "dk", "dv", "dalpha", "ddelta"), g, g_ref, g_low):
        assert_close_rule(name, a, r, lo)


def _pack(ts):
    return torch.cat([t.reshape(-1, *t.shape[2:]) for t in ts])


@pytest.mark.parametrize("causal", [True, False])
def test_varlen(fsa, causal):
    device, dtype = DEV
    lens_q = [5, 0, 40, 33, 1]
    lens_k = [9, 3, 40, 70, 0]
    h, hkv, d = 4, 2, 64
    g = torch.Generator().manual_seed(4)
    qs = [torch.randn(1, n, h, d, generator=g).to(device, dtype) for n in lens_q]
    ks = [torch.randn(1, n, hkv, d, generator=g).to(device, dtype) for n in lens_k]
    vs = [torch.randn(1, n, hkv, d, generator=g).to(device, dtype) for n in lens_k]
    dos = [torch.randn(1, n, h, d, generator=g).to(device, dtype) for n in lens_q]
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32,
                        device=device)
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32,
                        device=device)
    q, k, v, do = _pack(qs), _pack(ks), _pack(vs), _pack(dos)
    fn = lambda q_, k_, v_: fsa.flash_dense_attn_varlen_func(  # noqa: E731
        q_, k_, v_, cu_q, cu_k, max(lens_q), max(lens_k), is_causal=causal, return_lse=True)
    qv, kv, vv = (t.detach().requires_grad_() for t in (q, k, v))
    out, lse = fn(qv, kv, vv)
    dq, dk, dv = torch.autograd.grad(out, (qv, kv, vv), do)
    scale = d ** -0.5
    for i, (sq, sk) in enumerate(zip(lens_q, lens_k)):
        rq = slice(int(cu_q[i]), int(cu_q[i + 1]))
        rk = slice(int(cu_k[i]), int(cu_k[i + 1]))
        mask = visible_mask(sq, sk, causal, None, h, device)
        ins = [qs[i], ks[i], vs[i]]
        ref, g_ref = _grads(lambda *t: torch_lowp_attention(*t, scale, mask),
                            [t.double() for t in ins], dos[i].double())
        low, g_low = _grads(lambda *t: torch_lowp_attention(*t, scale, mask), ins, dos[i])
        assert_close_rule(f"seq{i} out", out[rq][None], ref, low)
        for name, a, r, lo in zip(("dq", "dk", "dv"), (dq[rq], dk[rk], dv[rk]), g_ref, g_low):
            assert_close_rule(f"seq{i} {name}", a[None], r, lo)
        if sq:
            _, lse_ref, _ = _truth(qs[i], ks[i], vs[i], scale, mask)
            _check_lse(lse[:, rq][None], lse_ref)


def test_varlen_seqused_k(fsa):
    device, dtype = DEV
    h, hkv, d = 2, 1, 32
    lens = [30, 50]
    used = [10, 0]
    g = torch.Generator().manual_seed(5)
    q = torch.randn(sum(lens), h, d, generator=g).to(device, dtype)
    k = torch.randn(sum(lens), hkv, d, generator=g).to(device, dtype)
    v = torch.randn(sum(lens), hkv, d, generator=g).to(device, dtype)
    cu = torch.tensor([0, 30, 80], dtype=torch.int32, device=device)
    seqused = torch.tensor(used, dtype=torch.int32, device=device)
    out, lse = fsa.flash_dense_attn_varlen_func(q, k, v, cu, cu, 50, 50, is_causal=False,
                                                seqused_k=seqused, return_lse=True)
    # sequence 0: keys 0..9 only; sequence 1: no key at all
    mask = visible_mask(30, 10, False, None, h, device)
    ref, _, low = _truth(q[None, :30], k[None, :10], v[None, :10], d ** -0.5, mask)
    assert_close_rule("seq0", out[None, :30], ref, low)
    assert torch.equal(out[30:], torch.zeros_like(out[30:]))
    assert torch.isinf(lse[:, 30:]).all()


def test_rows_without_keys_have_zero_grads(fsa):
    q, k, v, do, _, _ = _inputs(1, 50, 20, 2, 1, 32, seed=6)
    qv, kv, vv = (t.detach().requires_grad_() for t in (q, k, v))
    out, lse = fsa.flash_dense_attn_func(qv, kv, vv, is_causal=True, return_lse=True)
    dq, dk, dv = torch.autograd.grad(out, (qv, kv, vv), do)
    hidden = slice(0, 30)  # rows i with i + (20 - 50) < 0 see no key
    assert torch.equal(out[:, hidden], torch.zeros_like(out[:, hidden]))
    assert torch.isinf(lse[:, :, hidden]).all()
    assert torch.equal(dq[:, hidden], torch.zeros_like(dq[:, hidden]))
    assert torch.isfinite(dk).all() and torch.isfinite(dv).all()


def test_first_backward_equals_second_and_deterministic_is_bitwise(fsa):
    """The first backward of a new shape is the second one (no autotuner writes into live
    buffers); the default dQ pass and deterministic=True are bitwise reproducible."""
    q, k, v, do, _, _ = _inputs(1, 64, 64, 4, 2, 64, seed=7)

    def grads(det):
        ins = [t.detach().requires_grad_() for t in (q, k, v)]
        out = fsa.flash_dense_attn_func(*ins, is_causal=True, deterministic=det)
        return torch.autograd.grad(out, ins, do)

    first, second, det = grads(False), grads(False), grads(True)
    for a, b, c in zip(first, second, det):
        assert torch.equal(a, b)
        assert torch.equal(a, c)


@pytest.mark.parametrize("gated", [False, True])
def test_atomic_dq_path(fsa, gated, monkeypatch):
    """The opt-in atomic dQ (and dalpha) path of the dK/dV kernel agrees with the dQ pass,
    with every buffer from torch.empty NaN-filled (the preprocess zeroes the accumulator)."""
    import importlib

    bwd = importlib.import_module(f"{fsa.__name__}.triton.bwd")
    fwd = importlib.import_module(f"{fsa.__name__}.triton.fwd")
    configs = importlib.import_module(f"{fsa.__name__}.triton.configs")
    q, k, v, do, alpha, delta = _inputs(1, 70, 90, 4, 2, 32, gated=gated, seed=9)
    kw = dict(alpha=alpha, delta=delta, cu_seqlens_q=None, cu_seqlens_k=None, seqused_k=None,
              window_sizes=None, max_seqlen_q=70, max_seqlen_k=90, softmax_scale=32 ** -0.5,
              is_causal=True, softmax_threshold=0.0, gate_threshold=0.0,
              is_logsigmoid_gate=True, is_adapt_gate=False)
    o, lse, skip = fwd.launch_attn_fwd(q, k, v, deterministic=False, **kw)
    base = configs.bwd_config(q, 32, 70, 90, True, False, gated)
    atomic = configs.BwdConfig(*[getattr(base, f) for f in (
        "block_m", "block_n", "num_warps", "num_stages", "block_m_dq", "block_n_dq",
        "num_warps_dq", "num_stages_dq", "block_m_pre")], atomic_dq=True)
    g_pass = bwd.launch_attn_bwd(do, q, k, v, o, lse, skip, deterministic=False, **kw)
    empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", nan_empty)
    g_atom = bwd.launch_attn_bwd(do, q, k, v, o, lse, skip, deterministic=False,
                                 config=atomic, **kw)
    monkeypatch.undo()
    names = ("dq", "dk", "dv", "dalpha", "ddelta")
    for name, a, b in list(zip(names, g_pass, g_atom))[: 5 if gated else 3]:
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2 * b.abs().max().item(),
                                   msg=name)


@pytest.mark.skipif(not HAS_CUDA, reason="long sequences are for the GPU")
@pytest.mark.parametrize("s,d", [(1000, 128), (4097, 64), (4097, 128)])
def test_long_sequences_gpu(fsa, s, d):
    q, k, v, do, _, _ = _inputs(1, s, s, 8, 2, d, seed=8)
    scale = d ** -0.5
    mask = visible_mask(s, s, True, None, 8, q.device)
    _, g_ref = _grads(lambda *t: torch_lowp_attention(*t, scale, mask),
                      [t.double() for t in (q, k, v)], do.double())
    low, g_low = _grads(lambda *t: torch_lowp_attention(*t, scale, mask), [q, k, v], do)
    out, g = _grads(lambda *t: fsa.flash_dense_attn_func(*t, is_causal=True), [q, k, v], do)
    ref, _, _ = _truth(q, k, v, scale, mask)
    assert_close_rule("out", out, ref, low)
    for name, a, r, lo in zip(("dq", "dk", "dv"), g, g_ref, g_low):
        assert_close_rule(name, a, r, lo)
