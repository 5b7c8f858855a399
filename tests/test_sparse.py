"""Sparse (softmax_threshold) and gated attention: the block-skip rule of SPEC §5/§6.

The kernels are compared with the reference that skips the same blocks: the reference decides
block for block in float64 (`reference.skip_decisions`) and must agree with the kernel's
decisions; outputs and gradients are then compared with float64 attention over exactly the
kept blocks, under the error rule of DESIGN.md.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import triton
import triton.language as tl

from kernel_utils import assert_close_rule, kernel_device_dtype, torch_lowp_attention, visible_mask

DEV = kernel_device_dtype()
pytestmark = pytest.mark.skipif(DEV is None, reason="kernels need CUDA or TRITON_INTERPRET=1")


def llm_like(b, s, h, hkv, d, seed, gated=False):
    """Inputs with attention sinks and a shared direction, so that many blocks are provably
    negligible; gated: positive alpha and a stretch of strongly negative delta."""
    device, dtype = DEV
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(d, generator=g)
    q = torch.randn(b, s, h, d, generator=g) + 1.5 * common
    k = 0.7 * torch.randn(b, s, hkv, d, generator=g)
    k[:, :8] += 2.5 * common  # sinks
    v = torch.randn(b, s, hkv, d, generator=g)
    do = torch.randn(b, s, h, d, generator=g)
    ins = [t.to(device, dtype) for t in (q, k, v, do)]
    if not gated:
        return ins + [None, None]
    alpha = (1 + torch.randn(b, s, h, generator=g).abs()).to(device, dtype).transpose(1, 2)
    delta = 2 * torch.randn(b, s, hkv, generator=g)
    delta[:, 64:192] = -40.0
    delta[:, 1088:1216] = -40.0  # long inputs: gate skips past the first 16 tiles too
    return ins + [alpha, delta.to(device, dtype).transpose(1, 2)]


def _ref(fsa):
    return importlib.import_module(f"{fsa.__name__}.reference")


def _element_mask(fsa, skip, sq, sk, head_dim, base_mask):
    """[H, Sq, Sk] mask of the pairs kept by block codes skip[0] ([H, nQB, nKB])."""
    configs = importlib.import_module(f"{fsa.__name__}.triton.configs")
    rows = torch.arange(sq) // configs.skip_block_m(head_dim)
    cols = torch.arange(sk) // configs.SKIP_BLOCK_N
    codes = skip[0].cpu()[:, rows][:, :, cols]
    return base_mask.cpu() & (codes < 2)


CASES = [
    # s, h, hkv, d, causal, windows, threshold, gated, gate_threshold, adapt
    (300, 2, 1, 32, True, None, 1.0, False, 0.0, False),
    (300, 4, 2, 32, False, None, 1.0, False, 0.0, False),
    (260, 2, 1, 32, True, [[64, 64, 32, 64]], 1.0, False, 0.0, False),
    (300, 2, 1, 32, True, None, 0.0, True, 0.05, False),
    (300, 4, 2, 32, True, None, 0.5, True, 0.05, True),
    (1300, 2, 1, 32, True, None, 0.0, True, 0.05, False),  # > 16 tiles: several gate chunks
    (300, 2, 1, 192, True, None, 1.0, True, 0.05, False),  # head dim > 128: 128-row blocks
]


def _wide_backward_tiles(fsa, monkeypatch):
    """Make every backward launch use key tiles of two skip blocks (and dQ query tiles of a
    whole block row), so a tile can hold a kept and a skipped block."""
    configs = importlib.import_module(f"{fsa.__name__}.triton.configs")
    n2 = 2 * configs.SKIP_BLOCK_N

    def wide(q, head_dim, *args, **kwargs):
        # a whole block row per dQ tile, where its shared memory allows (head dim <= 128)
        bm_dq = configs.skip_block_m(head_dim) if head_dim <= 128 else 32
        return configs.BwdConfig(32, n2, 4, 1, bm_dq, n2, 4, 1, 32)

    monkeypatch.setattr(configs, "bwd_config", wide)


def _mixed_wide_tiles(skip):
    """Number of (query block, 2-block key tile) pairs holding one kept and one skipped block."""
    codes = skip[..., : skip.shape[-1] // 2 * 2].reshape(*skip.shape[:-1], -1, 2)
    kept, skipped = (codes == 1).any(-1), (codes >= 2).any(-1)
    return int((kept & skipped).sum())


@pytest.mark.parametrize("wide", [False, True], ids=["tiles", "wide_tiles"])
@pytest.mark.parametrize("s,h,hkv,d,causal,win,t,gated,tg,adapt", CASES)
def test_skip_rule_matches_reference(fsa, monkeypatch, s, h, hkv, d, causal, win, t, gated, tg,
                                     adapt, wide):
    if wide:
        _wide_backward_tiles(fsa, monkeypatch)
    q, k, v, do, alpha, delta = llm_like(1, s, h, hkv, d, seed=s + h, gated=gated)
    device = q.device
    windows = torch.tensor(win, dtype=torch.int32, device=device) if win else None
    scale = d ** -0.5
    kw = dict(is_causal=causal, window_sizes=windows, softmax_threshold=t, return_skip_mask=True)
    ins = [q, k, v] + ([alpha, delta] if gated else [])
    leaves = [x.detach().requires_grad_() for x in ins]
    if gated:
        out, skip = fsa.flash_gated_attn_func(*leaves, gate_threshold=tg, is_adapt_gate=adapt,
                                              **kw)
    else:
        out, skip = fsa.flash_sparse_attn_func(*leaves, **kw)
    grads = torch.autograd.grad(out, leaves, do)

    # 1. the kernel's decisions are the reference's, block for block (float64 decisions)
    ref = _ref(fsa)
    r_skip = ref.skip_decisions(
        *(x.double() for x in (q, k, v)), alpha=None if alpha is None else alpha.double(),
        delta=None if delta is None else delta.double(), window_sizes=windows,
        softmax_scale=scale, is_causal=causal, softmax_threshold=t, gate_threshold=tg,
        is_adapt_gate=adapt)
    visible = r_skip.cpu() > 0
    assert torch.equal((skip.cpu() >= 2) & visible, (r_skip.cpu() >= 2) & visible)
    assert (r_skip >= 2).any(), "test inputs must make the rule skip something"
    if wide:
        assert _mixed_wide_tiles(skip) > 0, "a wide tile must mix kept and skipped blocks"
    stats = fsa.block_skip_stats(skip)
    assert stats["softmax_skipped"] + stats["gate_skipped"] == int((skip >= 2).sum())

    # 2. output and gradients against float64 attention over exactly the kept blocks
    base = visible_mask(s, s, causal, None if windows is None else windows.cpu(), h, "cpu")
    mask = _element_mask(fsa, skip, s, s, d, base).to(device)

    def torch_fn(*t):
        a_, d_ = (t[3], t[4]) if gated else (None, None)
        return torch_lowp_attention(t[0], t[1], t[2], scale, mask, a_, d_)

    ref_leaves = [x.detach().double().requires_grad_() for x in ins]
    ref_out = torch_fn(*ref_leaves)
    ref_grads = torch.autograd.grad(ref_out, ref_leaves, do.double())
    low_leaves = [x.detach().requires_grad_() for x in ins]
    low_out = torch_fn(*low_leaves)
    low_grads = torch.autograd.grad(low_out, low_leaves, do)
    assert_close_rule("out", out, ref_out, low_out)
    for name, a, r, lo in zip(("dq", "dk", "dv", "dalpha", "ddelta"), grads, ref_grads,
                              low_grads):
        assert_close_rule(name, a, r, lo)


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("wide", [False, True], ids=["tiles", "wide_tiles"])
def test_backward_skips_exactly_the_given_blocks(fsa, gated, wide):
    """The backward visits exactly the pairs the codes keep, whatever its tile shapes: codes
    drawn at random (not by the rule, so skipped pairs carry full-size probabilities), the
    forward's out/lse taken from float64 attention over the kept pairs, gradients against
    float64 autograd of that attention."""
    bwd = importlib.import_module(f"{fsa.__name__}.triton.bwd")
    configs = importlib.import_module(f"{fsa.__name__}.triton.configs")
    device, dtype = DEV
    s, h, hkv, d = 300, 2, 1, 32
    scale = d ** -0.5
    g = torch.Generator().manual_seed(21 + gated)
    q, k, v, do = (torch.randn(1, s, n, d, generator=g).to(device, dtype)
                   for n in (h, hkv, hkv, h))
    alpha = (torch.rand(1, h, s, generator=g) + 0.5).to(device, dtype) if gated else None
    delta = torch.randn(1, hkv, s, generator=g).to(device, dtype) if gated else None
    base = visible_mask(s, s, True, None, h, "cpu")
    sm, sn = configs.skip_block_m(d), configs.SKIP_BLOCK_N
    nqb, nkb = -(-s // sm), -(-s // sn)
    seen = base.float()
    seen = torch.nn.functional.pad(seen, (0, nkb * sn - s, 0, nqb * sm - s))
    seen = seen.reshape(h, nqb, sm, nkb, sn).amax((2, 4)) > 0
    skip = torch.where(torch.rand(h, nqb, nkb, generator=g) < 0.5, 2, 1).to(torch.uint8)
    diag = (torch.arange(nkb)[None, :] == (torch.arange(nqb)[:, None] * sm + sm - 1).clamp(
        max=s - 1) // sn)
    skip = torch.where(diag, 1, skip) * seen  # every row keeps its diagonal block
    skip = skip[None].to(device)
    mask = _element_mask(fsa, skip, s, s, d, base).to(device)
    if wide:
        assert _mixed_wide_tiles(skip) > 0

    def torch_fn(*t):
        return torch_lowp_attention(t[0], t[1], t[2], scale, mask, *t[3:])

    ins = [q, k, v] + ([alpha, delta] if gated else [])
    ref_leaves = [x.detach().double().requires_grad_() for x in ins]
    ref_out = torch_fn(*ref_leaves)
    ref_grads = torch.autograd.grad(ref_out, ref_leaves, do.double())
    low_leaves = [x.detach().requires_grad_() for x in ins]
    low_grads = torch.autograd.grad(torch_fn(*low_leaves), low_leaves, do)
    logits = torch.einsum("bqhd,bkhd->bhqk", *(x.double() for x in (q, k.repeat_interleave(
        h // hkv, 2))))
    if gated:
        x = alpha.double()[..., :, None] * delta.double().repeat_interleave(h // hkv, 1)[
            ..., None, :]
        logits = logits + torch.nn.functional.logsigmoid(x)
    lse = torch.where(mask, logits * scale, float("-inf")).logsumexp(-1).float()
    n2 = 2 * sn
    cfg = configs.BwdConfig(32, n2, 4, 1, sm, n2, 4, 1, 32) if wide else \
        configs.BwdConfig(32, 32, 4, 1, 32, 32, 4, 1, 32)
    grads = bwd.launch_attn_bwd(
        do, q, k, v, ref_out.detach().to(dtype), lse, skip, alpha=alpha, delta=delta,
        cu_seqlens_q=None, cu_seqlens_k=None, seqused_k=None, window_sizes=None,
        max_seqlen_q=s, max_seqlen_k=s, softmax_scale=scale, is_causal=True,
        softmax_threshold=1.0, gate_threshold=0.0, is_logsigmoid_gate=True,
        is_adapt_gate=False, deterministic=False, config=cfg)
    for name, a, r, lo in zip(("dq", "dk", "dv", "dalpha", "ddelta"), grads, ref_grads,
                              low_grads):
        assert_close_rule(name, a, r, lo)


@pytest.mark.parametrize("sm,bm,bn", [(64, 32, 32), (64, 64, 128), (128, 32, 64), (128, 128, 64),
                                      (128, 64, 256)])
def test_kept_tile_lists_match_the_codes(fsa, sm, bm, bn):
    """The backward's visit lists (`_kept_tile_lists`, one kernel) against a plain-Python
    reading of the codes: per key tile the query tiles, per query tile the key tiles, holding a
    kept (code 1) block, ascending; on strided codes, tiles narrower and wider than a block."""
    bwd = importlib.import_module(f"{fsa.__name__}.triton.bwd")
    configs = importlib.import_module(f"{fsa.__name__}.triton.configs")
    sn = configs.SKIP_BLOCK_N
    sq, sk = 700, 1000
    g = torch.Generator().manual_seed(bm + bn)
    full = torch.randint(0, 4, (2, 3, -(-sq // sm), -(-sk // sn) + 2), generator=g,
                         dtype=torch.int8)
    codes = full[:, :, :, 1:-1]  # strided: rows longer than the codes
    n_m, n_n = -(-sq // bm), -(-sk // bn)

    def kept(b, h, m, n):
        blocks = range(n * bn // sn, min((n * bn + bn - 1) // sn + 1, codes.shape[3]))
        return any(codes[b, h, m * bm // sm, kb] == 1 for kb in blocks)

    for by_key in (True, False):
        lists, counts = bwd._kept_tile_lists(codes.to(DEV[0]), sm, bm, bn, n_m, n_n, by_key)
        lists, counts = lists.cpu().long(), counts.cpu()
        for b in range(2):
            for h in range(3):
                for o in range(n_n if by_key else n_m):
                    want = [i for i in range(n_m if by_key else n_n)
                            if (kept(b, h, i, o) if by_key else kept(b, h, o, i))]
                    assert counts[b, h, o] == len(want), (by_key, b, h, o)
                    assert lists[b, h, o, :len(want)].tolist() == want, (by_key, b, h, o)


def test_kept_tile_lists_long_rows(fsa):
    """Rows longer than one chunk of the list kernel (2048 query tiles per key tile)."""
    bwd = importlib.import_module(f"{fsa.__name__}.triton.bwd")
    configs = importlib.import_module(f"{fsa.__name__}.triton.configs")
    sm, sn = 128, configs.SKIP_BLOCK_N
    n_m, n_n = 2048, 3
    g = torch.Generator().manual_seed(5)
    shape = (1, 1, n_m * 32 // sm, n_n * 128 // sn)
    codes = torch.randint(0, 4, shape, generator=g, dtype=torch.int8)
    codes[torch.rand(shape, generator=g) < 0.5] = 1  # most rows keep more than 1024 tiles
    lists, counts = bwd._kept_tile_lists(codes.to(DEV[0]), sm, 32, 128, n_m, n_n, True)
    for n in range(n_n):
        block_kept = (codes[0, 0, :, n * 128 // sn:(n + 1) * 128 // sn] == 1).any(1)
        want = [m for m in range(n_m) if block_kept[m * 32 // sm]]
        assert counts[0, 0, n].item() == len(want) > 1024
        assert lists[0, 0, n, :len(want)].cpu().tolist() == want


def test_threshold_zero_equals_dense(fsa):
    q, k, v, do, _, _ = llm_like(1, 200, 2, 1, 32, seed=11)
    dense = fsa.flash_dense_attn_func(q, k, v, is_causal=True)
    sparse = fsa.flash_sparse_attn_func(q, k, v, is_causal=True, softmax_threshold=0.0)
    assert torch.equal(dense, sparse)


def test_no_gate_sparsity_equals_plain_gate(fsa):
    q, k, v, do, alpha, delta = llm_like(1, 200, 2, 1, 32, seed=12, gated=True)
    a = fsa.flash_gated_attn_func(q, k, v, alpha, delta, is_causal=True, gate_threshold=0.0)
    b, skip = fsa.flash_gated_attn_func(q, k, v, alpha, delta, is_causal=True,
                                        gate_threshold=0.0, softmax_threshold=0.0,
                                        return_skip_mask=True)
    assert torch.equal(a, b)
    assert not (skip >= 2).any()


def test_skip_set_independent_of_launch_config(fsa):
    """The decisions do not depend on warps / pipelining of a launch (tiles are the fixed
    skip blocks)."""
    fwd = importlib.import_module(f"{fsa.__name__}.triton.fwd")
    configs = importlib.import_module(f"{fsa.__name__}.triton.configs")
    q, k, v, _, alpha, delta = llm_like(1, 300, 2, 1, 32, seed=13, gated=True)
    kw = dict(alpha=alpha, delta=delta, cu_seqlens_q=None, cu_seqlens_k=None, seqused_k=None,
              window_sizes=None, max_seqlen_q=300, max_seqlen_k=300, softmax_scale=32 ** -0.5,
              is_causal=True, softmax_threshold=1.0, gate_threshold=0.05,
              is_logsigmoid_gate=True, is_adapt_gate=False, deterministic=False)
    bm, bn = configs.skip_block_m(32), configs.SKIP_BLOCK_N
    _, _, s1 = fwd.launch_attn_fwd(q, k, v, config=configs.Config(bm, bn, 4, 1), **kw)
    _, _, s2 = fwd.launch_attn_fwd(q, k, v, config=configs.Config(bm, bn, 8, 3), **kw)
    assert (s1 >= 2).any()
    assert torch.equal(s1, s2)


def test_reference_gradcheck_with_skips(fsa):
    """float64 gradcheck of the reference on a gated problem with a fixed skip set."""
    ref = _ref(fsa)
    g = torch.Generator().manual_seed(14)
    s, d = 140, 8
    q = torch.randn(1, s, 2, d, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, s, 1, d, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, s, 1, d, generator=g, dtype=torch.float64, requires_grad=True)
    alpha = torch.randn(1, 2, s, generator=g, dtype=torch.float64, requires_grad=True)
    delta = torch.randn(1, 1, s, generator=g, dtype=torch.float64, requires_grad=True)
    skip = torch.ones(1, 2, 3, 3, dtype=torch.uint8)  # 64-row blocks at this head dim
    skip[0, 0, 1, 1] = 2
    skip[0, 1, 2, 0] = 3

    def fn(q_, k_, v_, a_, d_):
        return ref.attention_naive(q_, k_, v_, alpha=a_, delta=d_, is_causal=True,
                                   skip=skip)[0]

    assert torch.autograd.gradcheck(fn, (q, k, v, alpha, delta), eps=1e-6, atol=1e-6)


_GATE_2D = None  # the kernels' gate functions, set by the tests below
_GATE_GRAD_2D = None


@triton.jit
def _gate_kernel(X, Y, N: tl.constexpr):
    o = tl.arange(0, N)
    tl.store(Y + o, _GATE_2D(tl.load(X + o), True))


@triton.jit
def _gate_grad_kernel(X, Y, N: tl.constexpr):
    o = tl.arange(0, N)
    tl.store(Y + o, _GATE_GRAD_2D(_GATE_2D(tl.load(X + o), True), True))


def test_logsigmoid_gate_matches_float64(fsa):
    """The kernels' logsigmoid (one exp2 and a polynomial log1p) against float64 over the range
    of x = alpha * delta that matters: never more than 1.2e-5 off (the fit's 1.0e-5 plus fp32
    rounding), about 100x below one fp16 rounding step of a unit score (see log1p_unit)."""
    global _GATE_2D
    _GATE_2D = importlib.import_module(f"{fsa.__name__}.triton.common").gate_2d
    device, _ = kernel_device_dtype()
    x = torch.linspace(-40.0, 40.0, 4096, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    _gate_kernel[(1,)](x, y, N=x.numel())
    want = torch.nn.functional.logsigmoid(x.double())
    err = (y.double() - want).abs()
    worst = int(err.argmax())
    assert float(err[worst]) <= 1.2e-5, (float(x[worst]), float(err[worst]))


def test_logsigmoid_gate_derivative_matches_float64(fsa):
    """The backward's gate derivative, sigmoid(-x) taken as 1 - exp(g) from the kernels' own g =
    logsigmoid(x): never more than 1.2e-5 off float64 over x in [-200, 200] (it inherits g's
    error, scaled by exp(g) <= 1), for closed (x << 0), open (x >> 0) and in-between gates."""
    global _GATE_2D, _GATE_GRAD_2D
    common = importlib.import_module(f"{fsa.__name__}.triton.common")
    _GATE_2D, _GATE_GRAD_2D = common.gate_2d, common.gate_grad_2d
    device, _ = kernel_device_dtype()
    x = torch.linspace(-200.0, 200.0, 4096, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    _gate_grad_kernel[(1,)](x, y, N=x.numel())
    want = torch.sigmoid(-x.double())
    err = (y.double() - want).abs()
    worst = int(err.argmax())
    assert float(err[worst]) <= 1.2e-5, (float(x[worst]), float(err[worst]))
