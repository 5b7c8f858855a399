"""The registered ops: torch.library.opcheck, torch.compile(fullgraph, dynamic) with no
recompile across sequence lengths, on the CPU reference path and on the kernel path."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

from kernel_utils import HAS_CUDA, INTERPRET


@contextmanager
def _backend(fsa, kind):
    """Run the ops on the CPU reference ("reference") or on the Triton kernels ("kernel":
    CUDA, or the interpreter on CPU)."""
    if kind == "reference":
        with _ops(fsa).cpu_reference():
            yield
    else:
        yield


def _paths():
    paths = [("reference", "cpu", torch.float32)]
    if HAS_CUDA:
        paths.append(("kernel", "cuda", torch.bfloat16))
    elif INTERPRET:
        paths.append(("kernel", "cpu", torch.float16))
    return paths


PATHS = _paths()


def _utils(kind, device):
    """opcheck's checks. The schema check (which replays the op under a dispatch mode that
    Triton's interpreter cannot run in) is done on the reference path and on CUDA; the schema
    is the same op whichever backend serves it."""
    if kind == "kernel" and device == "cpu":
        return ("test_autograd_registration", "test_faketensor")
    return ("test_schema", "test_autograd_registration", "test_faketensor")


def _ops(fsa):
    import importlib

    return importlib.import_module(f"{fsa.__name__}.ops")


def _fwd_args(ops, device, dtype, gated=False, varlen=False, s=40):
    g = torch.Generator().manual_seed(0)
    h, hkv, d = 4, 2, 32
    if varlen:
        cu = torch.tensor([0, 10, 10, s], dtype=torch.int32, device=device)
        q = torch.randn(s, h, d, generator=g).to(device, dtype)
        k = torch.randn(s, hkv, d, generator=g).to(device, dtype)
        v = torch.randn(s, hkv, d, generator=g).to(device, dtype)
        alpha = torch.randn(h, s, generator=g).to(device, dtype) if gated else None
        delta = torch.randn(hkv, s, generator=g).to(device, dtype) if gated else None
        return (q, k, v, alpha, delta, cu, cu, None, None, None,
                *ops.scalar_args(s - 10, s - 10, d ** -0.5, True, 0.0, 0.0, True, False, False))
    q = torch.randn(2, s, h, d, generator=g).to(device, dtype)
    k = torch.randn(2, s, hkv, d, generator=g).to(device, dtype)
    v = torch.randn(2, s, hkv, d, generator=g).to(device, dtype)
    alpha = torch.randn(2, h, s, generator=g).to(device, dtype) if gated else None
    delta = torch.randn(2, hkv, s, generator=g).to(device, dtype) if gated else None
    return (q, k, v, alpha, delta, None, None, None, None, None,
            *ops.scalar_args(s, s, d ** -0.5, True, 0.0, 0.0 if not gated else 0.05, True,
                             False, False))


@pytest.mark.parametrize("kind,device,dtype", PATHS)
@pytest.mark.parametrize("gated,varlen", [(False, False), (True, False), (False, True)])
def test_opcheck_fwd(fsa, kind, device, dtype, gated, varlen):
    ops = _ops(fsa)
    args = _fwd_args(ops, device, dtype, gated, varlen)
    for i in range(3):
        if args[i] is not None:
            args[i].requires_grad_(True)
    if gated:
        args[3].requires_grad_(True)
        args[4].requires_grad_(True)
    # the backward is exercised by test_autograd_registration (gradients vs float64 are
    # tested elsewhere); opcheck checks schema, fake tensors and autograd registration
    with _backend(fsa, kind):
        torch.library.opcheck(ops.attn_fwd, args, test_utils=_utils(kind, device))


@pytest.mark.parametrize("kind,device,dtype", PATHS)
@pytest.mark.parametrize("threshold", [0.0, 1.0])
def test_opcheck_fwd_plain(fsa, kind, device, dtype, threshold):
    """The op the public functions take when no optional tensor is given (dense, sparse),
    with its own backward op; and it returns what `fwd` returns for the same call."""
    ops = _ops(fsa)
    args = _fwd_args(ops, device, dtype)
    q, k, v = args[:3]
    scalars = list(args[10:])
    scalars[1] = [scalars[1][0], threshold, scalars[1][2]]
    plain = (q.clone().requires_grad_(), k.clone().requires_grad_(), v.clone().requires_grad_(),
             *scalars)
    with _backend(fsa, kind):
        torch.library.opcheck(ops.attn_fwd_plain, plain, test_utils=_utils(kind, device))
        full = ops.attn_fwd(q, k, v, None, None, None, None, None, None, None, *scalars)
        mine = ops.attn_fwd_plain(q, k, v, *scalars)
    for a, b in zip(full, mine):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind,device,dtype", PATHS)
def test_opcheck_decode(fsa, kind, device, dtype):
    ops = _ops(fsa)
    g = torch.Generator().manual_seed(1)
    b, h, hkv, d, s = 2, 4, 2, 32, 48
    q = torch.randn(b, h, d, generator=g).to(device, dtype)
    kc = torch.randn(b, s, hkv, d, generator=g).to(device, dtype)
    vc = torch.randn(b, s, hkv, d, generator=g).to(device, dtype)
    used = torch.tensor([10, 40], dtype=torch.int32, device=device)
    with _backend(fsa, kind):
        torch.library.opcheck(ops.attn_decode, (q, kc, vc, None, None, None, None, used, None,
                                                None, s, d ** -0.5, 0.0, 0.0, True, 0, False),
                              test_utils=_utils(kind, device))
        # sparse decode with its skip codes (a third output)
        torch.library.opcheck(ops.attn_decode, (q, kc, vc, None, None, None, None, used, None,
                                                None, s, d ** -0.5, 1.0, 0.0, True, 2, True),
                              test_utils=_utils(kind, device))
        kn = torch.randn(b, hkv, d, generator=g).to(device, dtype)
        vn = torch.randn(b, hkv, d, generator=g).to(device, dtype)
        torch.library.opcheck(ops.kv_append, (kc, vc, None, kn, vn, None, None, None, used),
                              test_utils=_utils(kind, device))


@pytest.mark.parametrize("kind,device,dtype", PATHS)
@pytest.mark.parametrize("gated", [False, True])
def test_eager_entry_matches_op(fsa, kind, device, dtype, gated):
    """`ops.attention` (what the public functions call): in eager mode it runs the ops'
    implementation under its own autograd node, without the dispatcher, and its outputs and
    gradients are bitwise those of the registered op; under a dispatch mode it calls the op."""
    from torch.utils._python_dispatch import TorchDispatchMode

    ops = _ops(fsa)
    args = list(_fwd_args(ops, device, dtype, gated=gated, s=40))
    if not gated:  # the plain op's sparse case: skip codes saved for the backward
        args[11] = [args[11][0], 1.0, 0.0]
    g = torch.Generator().manual_seed(1)
    dout = torch.randn(args[0].shape, generator=g).to(device, dtype)
    with _backend(fsa, kind):
        results = []
        for via_op in (False, True):
            leaves = [a.detach().requires_grad_() if a is not None else None for a in args[:5]]
            if via_op:
                res = (ops.attn_fwd(*leaves, *args[5:]) if gated
                       else ops.attn_fwd_plain(*leaves[:3], *args[10:]))
            else:
                res = ops.attention(*leaves, *args[5:])
            node = type(res[0].grad_fn).__name__
            assert ("EagerAttention" in node) != via_op, node
            want = [t for t in leaves if t is not None]
            results.append(list(res) + list(torch.autograd.grad(res[0], want, dout)))
        assert len(results[0]) == (3 + 5 if gated else 3 + 3)
        for a, b in zip(*results):
            assert torch.equal(a, b)

    if kind != "reference":  # the interpreter cannot run under a dispatch mode
        return

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, a=(), kw=None):
            self.names.append(func.name())
            return func(*a, **(kw or {}))

    with _backend(fsa, kind), Record() as rec:
        ops.attention(*args)
    assert any(n.endswith("::fwd" if gated else "::fwd_plain") for n in rec.names), rec.names


@pytest.mark.parametrize("kind,device,dtype", PATHS)
@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing(fsa, kind, device, dtype, reentrant):
    """torch.utils.checkpoint around the public function (the eager path saves its tensors
    through saved-tensor hooks, or re-runs under no_grad): the same bits as without it."""
    from torch.utils.checkpoint import checkpoint

    g = torch.Generator().manual_seed(2)
    ins = [torch.randn(1, 48, n, 32, generator=g).to(device, dtype) for n in (4, 2, 2)]
    dout = torch.randn(ins[0].shape, generator=g).to(device, dtype)

    def attn(q, k, v):
        return fsa.flash_sparse_attn_func(q, k, v, is_causal=True) * 2

    with _backend(fsa, kind):
        results = []
        for wrap in (False, True):
            leaves = [t.detach().requires_grad_() for t in ins]
            out = checkpoint(attn, *leaves, use_reentrant=reentrant) if wrap else attn(*leaves)
            out.backward(dout)  # (reentrant checkpointing does not take autograd.grad)
            results.append([out, *(t.grad for t in leaves)])
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind,device,dtype", PATHS)
def test_compile_fullgraph_dynamic_no_recompile(fsa, kind, device, dtype):
    """Forward and backward of the public functions trace with no graph break, and changing
    only the sequence length does not recompile."""
    torch._dynamo.reset()

    def step(q, k, v, alpha, delta):
        o1 = fsa.flash_dense_attn_func(q, k, v, is_causal=True)
        o2 = fsa.flash_gated_attn_func(q, k, v, alpha, delta, is_causal=True)
        return (o1.float().square().sum() + o2.float().sum())

    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    h, hkv, d = 4, 2, 32
    with _backend(fsa, kind), torch._dynamo.config.patch(error_on_recompile=False):
        for i, s in enumerate((160, 272)):  # >1 skip block in both (sizes 1 specialise)
            g = torch.Generator().manual_seed(s)
            ins = [torch.randn(1, s, h, d, generator=g), torch.randn(1, s, hkv, d, generator=g),
                   torch.randn(1, s, hkv, d, generator=g), torch.randn(1, h, s, generator=g),
                   torch.randn(1, hkv, s, generator=g)]
            ins = [t.to(device, dtype).requires_grad_() for t in ins]
            ctx = torch._dynamo.config.patch(error_on_recompile=True) if i else _nullctx()
            with ctx:
                loss = compiled(*ins)
                grads = torch.autograd.grad(loss, ins)
            eager = step(*ins)
            eager_grads = torch.autograd.grad(eager, ins)
            torch.testing.assert_close(loss, eager, rtol=1e-3, atol=1e-3)
            for a, b_ in zip(grads, eager_grads):
                torch.testing.assert_close(a, b_, rtol=1e-3, atol=1e-3)


@contextmanager
def _nullctx():
    yield
