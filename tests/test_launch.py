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
        lc._PLANS.clear()
        first, replay = run(q_), run(q_)
        assert len(lc._CACHE) > before  # the aligned and the shifted q are keyed apart
        # the second call replayed the forward's launch plan (and the backward's where it
        # runs on the caller's stream only: no dQ pass on a side stream)
        made = {key[0].__name__ for key, p in lc._PLANS.items() if p is not lc._NO_PLAN}
        assert "_attn_fwd_launches" in made
        # (the Gluon backward of aligned q adds dQ atomically on the caller's stream)
        assert "_attn_bwd_launches" in made or variant == "gated" or q_ is shifted
        monkeypatch.setattr(lc, "_ENABLED", False)
        plain = run(q_)
        monkeypatch.undo()
        for a, r, p in zip(first, replay, plain):
            assert torch.equal(a, p) and torch.equal(r, p)


@pytest.mark.skipif(not HAS_CUDA, reason="replays compiled kernels: needs a CUDA GPU")
@pytest.mark.parametrize("gather", [False, True])
def test_decode_plan_matches_jit_launch(fsa, gather, monkeypatch):
    """Decode (split-KV with its combine, and top-k gathered) replayed from its launch plan
    gives the bits of the cache off, on new query values."""
    lc = _launch(fsa)
    lc._PLANS.clear()
    g = torch.Generator(device="cuda").manual_seed(1)
    b, sk, h, hkv, d = 2, 3000, 8, 2, 128
    kc, vc = (torch.randn(b, sk, hkv, d, device="cuda", generator=g, dtype=torch.bfloat16)
              for _ in range(2))
    idx = torch.randint(0, sk, (b, 256), device="cuda", generator=g, dtype=torch.int32) \
        if gather else None
    outs = []
    for _ in range(3):
        q = torch.randn(b, h, d, device="cuda", generator=g, dtype=torch.bfloat16)
        got = fsa.flash_dense_attn_with_kvcache_func(q, kc, vc, gather_kv_indices=idx,
                                                     return_lse=True)
        monkeypatch.setattr(lc, "_ENABLED", False)
        plain = fsa.flash_dense_attn_with_kvcache_func(q, kc, vc, gather_kv_indices=idx,
                                                       return_lse=True)
        monkeypatch.undo()
        outs.append((got, plain))
    assert any(key[0].__name__ == "_attn_decode_launches" and p is not lc._NO_PLAN
               for key, p in lc._PLANS.items())
    for got, plain in outs:
        for a, p in zip(got, plain):
            assert torch.equal(a, p)


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


class _FakeKernel:
    """Stands in for a compiled kernel's launcher in the launch-plan tests (CPU): its
    "kernel" writes x + y into the third argument and records each launch."""

    def __init__(self):
        self.calls = []

    def __call__(self, g0, g1, g2, stream, function, packed, meta, enter, exit_, *args):
        self.calls.append(((g0, g1, g2), stream, function, packed, args))
        x, y, out = args[0], args[1], args[2]
        out.copy_(x + y)


class _Desc:
    """A TMA-descriptor-like argument: a tensor `base` and other fields."""

    def __init__(self, base, block):
        self.base, self.block = base, block


@pytest.fixture
def plans(fsa, monkeypatch):
    """launch.py with a fake driver (device 0, stream 7) and an empty plan table."""
    lc = _launch(fsa)
    monkeypatch.setattr(lc, "_DRIVER", [(lambda: 0, lambda device: 7)])
    monkeypatch.setattr(lc, "_ENABLED", True)
    monkeypatch.setattr(lc, "_PLANS", {})
    return lc


def test_plan_replays_a_recorded_call(plans):
    """The second call of a signature replays the first one's launches: fresh buffers (zeros
    where asked, views at the same offset), the new call's tensors and rebased descriptors
    in the recorded positions, the recorded grid, stream, constants and trailing arguments;
    the function itself does not run again."""
    lc, kernel, ran = plans, _FakeKernel(), []

    def launches(x, y, *, scale):
        ran.append(1)
        out = lc.buffer_like(x)
        acc = lc.buffer((4, 8), torch.float32, x.device, zero=True)
        lc._record((kernel, "fn", "packed", (16,)), (3,),
                   (x, y, out, acc[1:3], _Desc(y, [1, 8]), scale, 5), 7)
        kernel(3, 1, 1, 7, "fn", "packed", None, None, None, x, y, out, acc[1:3],
               _Desc(y, [1, 8]), scale, 5, 16)
        lc.replayable()
        return out, acc[1:3], 11

    x, y = torch.randn(4, 8), torch.randn(4, 8)
    first = lc.planned(launches, (x, y), {"scale": 0.5})
    [plan] = lc._PLANS.values()
    assert plan is not lc._NO_PLAN and len(ran) == 1
    assert all(d.base is None for _, _, _, _, _, _, _, descs in plan.launches
               for _, _, d in descs)  # the plan keeps no tensor alive
    x2, y2 = torch.randn(4, 8), torch.randn(4, 8)
    out, view, n = lc.planned(launches, (x2, y2), {"scale": 0.5})
    assert len(ran) == 1 and n == 11
    grid, stream, function, packed, args = kernel.calls[-1]
    assert (grid, stream, function, packed) == ((3, 1, 1), 7, "fn", "packed")
    assert args[0] is x2 and args[1] is y2 and args[2] is out
    assert torch.equal(out, x2 + y2) and out.data_ptr() != first[0].data_ptr()
    assert args[3] is not view and torch.equal(args[3], torch.zeros(2, 8))
    assert view.shape == (2, 8) and view.storage_offset() == 8 and torch.equal(view, args[3])
    assert isinstance(args[4], _Desc) and args[4].base is y2 and args[4].block == [1, 8]
    assert args[5:] == (0.5, 5, 16)


@pytest.mark.parametrize("change", ["shape", "alignment", "scalar", "extra"])
def test_plan_signature_separates_calls(plans, change):
    """A call that differs in a shape, an address modulo 16, a scalar or the caller's extra
    key records a plan of its own."""
    lc, kernel = plans, _FakeKernel()

    def launches(x, y, *, scale):
        out = lc.buffer_like(x)
        lc._record((kernel, "fn", "packed", ()), (1,), (x, y, out, scale), 7)
        lc.replayable()
        return (out,)

    x = torch.randn(64)
    lc.planned(launches, (x[:16], x[16:32]), {"scale": 1.0}, "a")
    other = {"shape": ((x[:32], x[32:64]), {"scale": 1.0}, "a"),
             "alignment": ((x[1:17], x[16:32]), {"scale": 1.0}, "a"),
             "scalar": ((x[:16], x[16:32]), {"scale": 2.0}, "a"),
             "extra": ((x[:16], x[16:32]), {"scale": 1.0}, "b")}[change]
    lc.planned(launches, *other)
    assert len(lc._PLANS) == 2


@pytest.mark.parametrize("why", ["foreign tensor", "not replayable", "other stream",
                                 "unreplayable launch", "same tensor twice"])
def test_no_plan_unless_the_record_is_complete(plans, why):
    """A record becomes no plan when a launch names a tensor that is neither an argument nor a
    `buffer`, when the function never said `replayable()`, when a launch ran on another
    stream or could not be replayed; one tensor passed twice is recorded again next time.
    Every such call runs the function itself."""
    lc, kernel, ran = plans, _FakeKernel(), []

    def launches(x, y):
        ran.append(1)
        out = x * 1 if why == "foreign tensor" else lc.buffer_like(x)
        entry = None if why == "unreplayable launch" else (kernel, "fn", "packed", ())
        lc._record(entry, (1,), (x, y, out), 8 if why == "other stream" else 7)
        if why != "not replayable":
            lc.replayable()
        return (out,)

    x = torch.randn(8)
    y = x if why == "same tensor twice" else torch.randn(8)
    for _ in range(3):
        lc.planned(launches, (x, y), {})
    assert len(ran) == 3
    assert list(lc._PLANS.values()) == ([] if why == "same tensor twice" else [lc._NO_PLAN])
