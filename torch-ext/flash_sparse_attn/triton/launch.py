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
        return
    key = None
    if _DRIVER:
        device = _DRIVER[0][0]()
        key = (fn, device, tuple(map(_arg_key, args)), tuple(meta.items()))
        hit = _CACHE.get(key)
        if hit is not None:
            run, function, packed, tail = hit
            g = tuple(grid) + (1, 1)
            run(g[0], g[1], g[2], _DRIVER[0][1](device), function, packed, None, None, None,
                *args, *tail)
            return
    compiled = fn[grid](*args, **meta)
    entry = _entry(fn, compiled, len(args), meta) if compiled is not None else None
    if entry is None:
        return
    if key is None:  # the first replayable launch of the process
        from triton.runtime import driver

        _DRIVER.append((driver.active.get_current_device, driver.active.get_current_stream))
        key = (fn, _DRIVER[0][0](), tuple(map(_arg_key, args)), tuple(meta.items()))
    if len(_CACHE) >= _CACHE_SIZE:
        _CACHE.clear()
    _CACHE[key] = entry
