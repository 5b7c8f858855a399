"""Kernel launches with less host time than `kernel[grid](...)`: every launch of this package
goes through `launch`.

`JITFunction.run` re-derives on every call what the compiled kernel depends on: it
specialises each argument (dtype and 16-byte alignment of tensors, ints equal to 1 or
divisible by 16, their width), builds and hashes a key from that, reads several knobs and
builds launch metadata. For our kernels of 20-60 arguments that is 40-80 us per launch on the
H200 machine's host (a 4-argument kernel: 22 us), as much as a whole SDPA call. `launch` keys
its own cache on the same facts, gathered more cheaply: the ints themselves (so a key also
fixes every specialisation of an int), each tensor's dtype and address modulo 16, each TMA
descriptor's block, layout, shape and strides, the constexprs and launch options, and the
current device. The first launch of a key goes through the JIT (compiling if needed) and
keeps the compiled kernel; later ones call its launcher directly, as `CompiledKernel[grid]`
does. Floats are not part of the key: Triton passes them as fp32 without specialising.

Off (plain `kernel[grid](...)`) under the interpreter, while Triton launch hooks are set
(profilers read their metadata), and with FSA_LAUNCH_CACHE=0.
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager

import torch

_ENABLED = os.environ.get("FSA_LAUNCH_CACHE", "1") != "0"
_CACHE: dict = {}  # (kernel, key) -> (run, function, packed metadata, trailing args)
_CACHE_SIZE = 4096  # keys hold ints such as sequence lengths: cleared when this many
_DRIVER: list = []  # (get_current_device, get_current_stream), bound at the first hit


def _arg_key(a):
    t = type(a)
    if t is int:
        return a
    if t is bool:  # True == 1 as a key, but Triton types them differently
        return bool, a
    if t is float:
        return float
    if isinstance(a, torch.Tensor):
        return a.dtype, a.data_ptr() % 16
    base = getattr(a, "base", None)
    if isinstance(base, torch.Tensor):  # a TMA tensor descriptor
        return (base.dtype, base.data_ptr() % 16, tuple(a.shape), tuple(a.strides),
                tuple(a.block_shape), getattr(a, "layout", None), getattr(a, "padding", None))
    return a


_RUNTIME: list = []  # triton.knobs.runtime, looked up once


def _hooks_idle() -> bool:
    if not _RUNTIME:
        from triton import knobs

        _RUNTIME.append(knobs.runtime)
    runtime = _RUNTIME[0]
    for hook in (runtime.launch_enter_hook, runtime.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return False
    return True


def _entry(fn, compiled, n_args, meta):
    """What a direct launch of `compiled` needs, or None when it cannot be replayed."""
    if not hasattr(compiled, "packed_metadata") or not hasattr(fn, "params"):
        return None
    tail = []
    for p in fn.params[n_args:]:
        if p.name in meta:
            tail.append(meta[p.name])
        elif getattr(p, "has_default", False):
            tail.append(p.default)
        else:
            return None
    return compiled.run, compiled.function, compiled.packed_metadata, tuple(tail)


_LOCAL = threading.local()  # compile_only


@contextmanager
def compile_only():
    """Within this context (on this thread) `launch` compiles the kernel a launch would run,
    and loads it, without running it (ops.py compiles a backward ahead of its first use)."""
    _LOCAL.compile_only = True
    try:
        yield
    finally:
        _LOCAL.compile_only = False


def compiling() -> bool:
    """Inside `compile_only` on this thread (launch code skips its torch work after the
    kernels then)."""
    return getattr(_LOCAL, "compile_only", False)


def launch(fn, grid, *args, **meta):
    """`fn[grid](*args, **meta)` (grid: a tuple of up to three ints), replaying the compiled
    kernel of an earlier launch with the same key."""
    if compiling():
        compiled = fn.warmup(*args, grid=grid, **meta)
        init = getattr(compiled, "_init_handles", None)
        if init is not None:  # builds Triton's launcher and loads the module
            init()
        return
    if not _ENABLED or not _hooks_idle():
        fn[grid](*args, **meta)
        _record(None, grid, args)
        return
    key = None
    if _DRIVER:
        device = _DRIVER[0][0]()
        key = (fn, device, tuple(map(_arg_key, args)), tuple(meta.items()))
        hit = _CACHE.get(key)
        if hit is not None:
            run, function, packed, tail = hit
            g = tuple(grid) + (1, 1)
            stream = _DRIVER[0][1](device)
            run(g[0], g[1], g[2], stream, function, packed, None, None, None, *args, *tail)
            _record(hit, grid, args, stream)
            return
    compiled = fn[grid](*args, **meta)
    entry = _entry(fn, compiled, len(args), meta) if compiled is not None else None
    if entry is None:
        _record(None, grid, args)
        return
    if key is None:  # the first replayable launch of the process
        from triton.runtime import driver

        _DRIVER.append((driver.active.get_current_device, driver.active.get_current_stream))
        key = (fn, _DRIVER[0][0](), tuple(map(_arg_key, args)), tuple(meta.items()))
    if len(_CACHE) >= _CACHE_SIZE:
        _CACHE.clear()
    _CACHE[key] = entry
    _record(entry, grid, args, _DRIVER[0][1](key[1]))


# --------------------------------------------------------------------------------------------
# launch plans: a whole launch function replayed per call signature
# --------------------------------------------------------------------------------------------
# A launch function (fwd.py's, bwd.py's, decode.py's) spends more host time computing its
# launches (configs, paths, grids, strides, TMA descriptors, 20-60 arguments per kernel) than
# the launches themselves. `planned` runs it once per call signature while recording what it
# does, and replays that record on later calls of the same signature: allocate the same
# buffers, rebase the same TMA descriptors onto the new tensors, and call each compiled
# kernel's launcher with the recorded arguments, the call's tensors put in.
#
# A record becomes a plan only when it is complete by construction:
# - the function said so (`replayable()`, on the branches whose device work is only
#   `launch` calls: a branch that also runs torch ops on its tensors never calls it);
# - every tensor a launch or the result names is an input, a buffer made by `buffer` /
#   `buffer_like` within the call (zeros where asked), or a view of one; any other tensor (a
#   copy, a `.contiguous()`) means no plan;
# - every launch was replayable (the launch cache on, no hooks) and ran on the caller's stream;
# - the signature fixes everything the function reads: for each tensor argument its shape,
#   strides, dtype, device and 16-byte alignment (Triton specialises pointers on it), every
#   other argument by type and value, and the current device and path override (`extra`).
# Tensor contents (cu_seqlens, page tables, ...) are read by the kernels only, never by
# the launch code, so they are not part of a signature.

_PLANS: dict = {}
_PLAN_SIZE = 1024  # signatures hold sequence lengths: cleared when this many
_NO_PLAN = object()


class _Recording:
    def __init__(self):
        self.launches = []  # (entry or None, grid, args, stream)
        self.buffers = {}  # id -> (tensor, zero)
        self.ok = False


def _record(entry, grid, args, stream=None):
    rec = getattr(_LOCAL, "recording", None)
    if rec is not None:
        rec.launches.append((entry, tuple(grid), args, stream))


def replayable():
    """Called by a `planned` function on a branch whose device work is `launch` calls only."""
    rec = getattr(_LOCAL, "recording", None)
    if rec is not None:
        rec.ok = True


def _declare(t, zero=False):
    rec = getattr(_LOCAL, "recording", None)
    if rec is not None:
        rec.buffers[id(t)] = (t, zero)
    return t


def buffer(shape, dtype, device, zero=False):
    """torch.empty (or torch.zeros) that a launch plan re-creates on replay."""
    return _declare(torch.zeros(shape, dtype=dtype, device=device) if zero else
                    torch.empty(shape, dtype=dtype, device=device), zero)


def buffer_like(t):
    """torch.empty_like that a launch plan re-creates on replay."""
    return _declare(torch.empty_like(t))


_PLAIN = (int, float, bool, str, type(None))  # keyed by type and value as they are


def _signature(items, tensors):
    """The signature of `items`; their tensors (nested lists too) appended to `tensors`."""
    key = []
    for a in items:
        t = type(a)
        if t in _PLAIN:
            key.append((t, a))
        elif isinstance(a, torch.Tensor):
            key.append((a.shape, a.stride(), a.dtype, a.device, a.data_ptr() % 16))
            tensors.append(a)
        elif isinstance(a, (list, tuple)):
            key.append((t, _signature(a, tensors)))
        else:
            key.append((t, a))
    return tuple(key)


class _Plan:
    """The replay of one recorded call: `__call__(tensors)` with the call's tensor arguments
    in signature order returns the function's result."""

    def __init__(self, allocs, launches, result):
        # ("new", shape, stride, dtype, zero) or ("view", slot, size, stride, offset)
        self.allocs = allocs
        self.launches = launches  # (run, function, packed, tail, grid, template, slots, descs)
        self.result = result  # slot per result tensor (None for a non-tensor item: its value)

    def __call__(self, tensors):
        slots = list(tensors)
        device = tensors[0].device
        for a in self.allocs:
            if a[0] == "new":
                _, shape, stride, dtype, zero = a
                t = torch.empty_strided(shape, stride, dtype=dtype, device=device)
                slots.append(t.zero_() if zero else t)
            else:
                _, i, size, stride, offset = a
                slots.append(slots[i].as_strided(size, stride, offset))
        stream = _DRIVER[0][1](_DRIVER[0][0]())
        for run, function, packed, tail, g, template, tslots, descs in self.launches:
            args = list(template)
            for pos, i in tslots:
                args[pos] = slots[i]
            for pos, i, desc in descs:
                d = object.__new__(type(desc))
                d.__dict__.update(desc.__dict__)
                d.base = slots[i]
                args[pos] = d
            run(g[0], g[1], g[2], stream, function, packed, None, None, None, *args, *tail)
        return tuple(slots[i] if i is not None else v for i, v in self.result)


def _make_plan(rec, inputs, result):
    """The `_Plan` of a finished recording, or None where it is not complete (see above)."""
    if not rec.ok or not rec.launches or not _DRIVER:
        return None
    stream = _DRIVER[0][1](_DRIVER[0][0]())
    index = {id(t): i for i, t in enumerate(inputs)}  # id(tensor) -> slot
    n_inputs = len(inputs)
    if len(index) != n_inputs:  # one tensor passed twice: replay binds by position
        return None
    allocs = []

    def slot(t):
        i = index.get(id(t))
        if i is not None:
            return i
        base = t._base
        if id(t) in rec.buffers:
            if base is not None:
                return None
            zero = rec.buffers[id(t)][1]
            allocs.append(("new", tuple(t.shape), tuple(t.stride()), t.dtype, zero))
        elif base is not None and id(base) in rec.buffers:
            j = slot(base)
            if j is None:
                return None
            allocs.append(("view", j, tuple(t.shape), tuple(t.stride()), t.storage_offset()))
        else:
            return None
        index[id(t)] = n_inputs + len(allocs) - 1
        return index[id(t)]

    launches = []
    for entry, grid, args, s in rec.launches:
        if entry is None or s != stream:
            return None
        template, tslots, descs = list(args), [], []
        for pos, a in enumerate(args):
            if isinstance(a, torch.Tensor):
                i = slot(a)
                if i is None:
                    return None
                tslots.append((pos, i))
                template[pos] = None
            elif isinstance(getattr(a, "base", None), torch.Tensor):  # a TMA descriptor
                i = slot(a.base)
                if i is None or not hasattr(a, "__dict__"):
                    return None
                desc = object.__new__(type(a))
                desc.__dict__.update(a.__dict__)
                desc.base = None  # the template holds no tensor
                descs.append((pos, i, desc))
                template[pos] = None
        run, function, packed, tail = entry
        g = grid + (1,) * (3 - len(grid))
        launches.append((run, function, packed, tail, g, tuple(template), tuple(tslots),
                         tuple(descs)))
    res = []
    for r in result:
        if isinstance(r, torch.Tensor):
            i = slot(r)
            if i is None:
                return None
            res.append((i, None))
        else:
            res.append((None, r))
    return _Plan(tuple(allocs), tuple(launches), tuple(res))


def planned(fn, args: tuple, kwargs: dict, extra=()):
    """`fn(*args, **kwargs)` (a launch function returning a tuple), replayed from its launch
    plan when an earlier call had the same signature (`args`, `kwargs`, `extra`: whatever
    else the function's choices read, e.g. a path override)."""
    if (compiling() or not _ENABLED or not _DRIVER or not _hooks_idle()
            or getattr(_LOCAL, "recording", None) is not None):
        return fn(*args, **kwargs)
    tensors = []
    key = (fn, _DRIVER[0][0](), _signature(args, tensors),
           _signature(kwargs.values(), tensors), tuple(kwargs), extra)
    plan = _PLANS.get(key)
    if plan is _NO_PLAN:
        return fn(*args, **kwargs)
    if plan is not None:
        return plan(tensors)
    rec = _Recording()
    _LOCAL.recording = rec
    try:
        result = fn(*args, **kwargs)
    finally:
        _LOCAL.recording = None
    made = _make_plan(rec, tensors, result)
    if made is not None or len({id(t) for t in tensors}) == len(tensors):
        if len(_PLANS) >= _PLAN_SIZE:
            _PLANS.clear()
        _PLANS[key] = made if made is not None else _NO_PLAN
    return result
