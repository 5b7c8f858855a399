"""`triton/launch.py`: the launch cache replays a compiled kernel only for a launch that Triton
would specialise the same way, and a replayed launch computes the same bits as Triton's."""

from __future__ import annotations

import importlib

import pytest
import torch

from kernel_utils import HAS_CUDA


def _launch(fsa):
    return importlib.import_module(f"{fsa.__name__}.triton.launch")


def test_key_separates_what_triton_specialises(fsa):
    key = _launch(fsa)._arg_key
    base = torch.zeros(64, dtype=torch.float16)
    # ints: the value itself (1 and multiples of 16 are specialised); a bool is not an int
    assert key(1) != key(2) and key(16) != key(17) and key(True) != key(1)
    assert key(2 ** 31) != key(2 ** 31 - 1)
    # tensors: dtype and address modulo 16 (alignment is specialised), not the address
    assert key(base) == key(torch.zeros(64, dtype=torch.float16))
    assert key(base) != key(base[1:]) and key(base) != key(base.float())
    # floats are fp32 arguments Triton never specialises
    assert key(0.5) == key(0.125) and key(0.5) != key(1)


def test_key_of_a_tma_descriptor(fsa):
    pytest.importorskip("triton.tools.tensor_descriptor")
    from triton.tools.tensor_descriptor import TensorDescriptor

    key = _launch(fsa)._arg_key
    t = torch.zeros(4, 64, 32, dtype=torch.bfloat16)
    a = TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 16, 32])
    assert key(a) == key(TensorDescriptor(t.clone(), list(t.shape), list(t.stride()),
                                          [1, 16, 32]))
    assert key(a) != key(TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 32, 32]))
    u = torch.zeros(4, 80, 32, dtype=torch.bfloat16)
    assert key(a) != key(TensorDescriptor(u, list(u.shape), list(u.stride()), [1, 16, 32]))


def test_launch_hooks_turn_replay_off(fsa):
    """A Triton launch hook (what profilers such as proton install) sends every launch
    through Triton's own path, which gives hooks their metadata; removing it turns replay
    back on."""
    from triton import knobs

    lc = _launch(fsa)
    assert lc._hooks_idle()

    def hook(metadata):
        pass

    knobs.runtime.launch_enter_hook.add(hook)
    try:
        assert not lc._hooks_idle()
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    assert lc._hooks_idle()


@pytest.mark.skipif(not HAS_CUDA, reason="replays compiled kernels: needs a CUDA GPU")
@pytest.mark.parametrize("variant", ["dense", "sparse", "gated"])
def test_replay_matches_jit_launch(fsa, variant, monkeypatch):
    """Forward and backward through the cache (the second call replays every kernel of the
    first) are bitwise those with the cache off, for q aligned and for a view of it 2 bytes
    off 16-byte alignment (launched after the aligned one: its own cache entries)."""
    lc = _launch(fsa)
    lc._CACHE.clear()
    g = torch.Generator(device="cuda").manual_seed(0)
    b, s, h, hkv, d = 2, 200, 4, 2, 64
    q, k, v = (torch.randn(b, s, n, d, device="cuda", generator=g, dtype=torch.bfloat16)
               for n in (h, hkv, hkv))
    gates = ([torch.randn(b, h, s, device="cuda", generator=g).bfloat16(),
              torch.randn(b, hkv, s, device="cuda", generator=g).bfloat16()]
             if variant == "gated" else [])
    dout = torch.randn_like(q)
    fn = getattr(fsa, f"flash_{variant}_attn_func")

    def run(q_):
        leaves = [t.detach().requires_grad_() for t in [q_, k, v, *gates]]
        out = fn(*leaves, is_causal=True)
        return [out, *torch.autograd.grad(out, leaves, dout)]

    buf = torch.empty(q.numel() + 1, device="cuda", dtype=q.dtype)
    shifted = buf[1:].view(q.shape).copy_(q)  # 2 bytes off 16-byte alignment
    assert shifted.data_ptr() % 16 != 0
    for q_ in (q, shifted):
        before = len(lc._CACHE)
        first, replay = run(q_), run(q_)
        assert len(lc._CACHE) > before  # the aligned and the shifted q are keyed apart
        monkeypatch.setattr(lc, "_ENABLED", False)
        plain = run(q_)
        monkeypatch.undo()
        for a, r, p in zip(first, replay, plain):
            assert torch.equal(a, p) and torch.equal(r, p)


@pytest.mark.skipif(not HAS_CUDA, reason="compiles for the GPU")
def test_backward_compiled_ahead(fsa):
    """The first forward with autograd of a configuration compiles its backward's kernels on
    a background thread (ops._compile_ahead) without an error, and the backward that follows
    gives the same bits as the second one's."""
    ops = importlib.import_module(f"{fsa.__name__}.ops")
    ops._AHEAD_SEEN.clear()  # configurations earlier tests ran count as new again
    g = torch.Generator(device="cuda").manual_seed(3)
    for d in (64, 80):  # the Gluon backward's head dim and one of the portable backward
        b, s, h, hkv = 1, 128, 4, 2  # one key tile: the atomic dQ adds in one order
        q, k, v = (torch.randn(b, s, n, d, device="cuda", generator=g, dtype=torch.bfloat16)
                   for n in (h, hkv, hkv))
        alpha = torch.randn(b, h, s, device="cuda", generator=g).bfloat16()
        delta = torch.randn(b, hkv, s, device="cuda", generator=g).bfloat16()
        dout = torch.randn_like(q)
        calls = [lambda *t: fsa.flash_dense_attn_func(*t, is_causal=True),
                 lambda *t: fsa.flash_sparse_attn_func(*t, is_causal=False),
                 lambda *t: fsa.flash_gated_attn_func(*t, alpha, delta, is_causal=True)]
        for fn in calls:
            seen = len(ops._AHEAD_SEEN)
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            out = fn(*leaves)
            assert len(ops._AHEAD_SEEN) == seen + 1  # a new configuration: compiled ahead
            ops._await_ahead()
            assert ops._AHEAD_ERRORS == []
            first = torch.autograd.grad(out, leaves, dout)
            again = torch.autograd.grad(fn(*leaves), leaves, dout)
            for a, b_ in zip(first, again):
                assert torch.equal(a, b_)
