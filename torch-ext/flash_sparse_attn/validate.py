"""Input validation of the public functions (SPEC §9): one check per entry point kind.

`check_attn_func` (batched), `check_attn_varlen_func` (varlen) and
`check_attn_with_kvcache_func` (decode over contiguous, paged or packed caches) run first in
every public function, so a bad input raises before any kernel is launched. Messages name the
public function, the argument, what was expected and what was given, e.g.
    flash_dense_attn_func: key has head dim 72 but query has 64; expected the same head dim

Exception types
- TypeError: an argument of the wrong Python type (not a tensor, not an int / float), a tensor
  of the wrong dtype, or a required argument that is None (alpha/delta of the gated functions).
- ValueError: wrong rank, shape, device or strides; an argument that the entry point does not
  support (seqused_q); bad tensor contents (cu_seqlens, page_table, seqused_k, window_sizes,
  gather_kv_indices); out-of-range scalars.
- NotImplementedError: is_quant=True (the fused fp8 path of SPEC §8 is not implemented).

dtypes: query/key/value share one dtype, fp16 or bf16. float32 and float64 are accepted too,
but only for CPU tensors: the CPU reference path computes in them (the tests' float64 ground
truth goes through the public functions); the device kernels take fp16/bf16 only.

Value checks read tensor contents (cu_seqlens start/monotonicity/total, max_seqlen against the
sequence lengths, seqused_k bounds, page_table bounds, negative window sizes, the upper bound of
gather_kv_indices). They are collected per call and reduced to one host sync at the end. They are
skipped with `skip_checks=True`, while compiling (`torch.compiler.is_compiling()`: reading a value
would force a host sync or a graph break), while capturing a CUDA graph and for meta tensors.
Shape, dtype and device checks always run and never read tensor contents.

A passed value check is remembered (`_VALIDATED`, at most `_MEMO_SIZE` entries) for the very
tensor objects it read, at their version counters (any in-place write bumps the version), with
the same shapes, strides and scalars: a model whose layers all receive the same cu_seqlens pays
the host sync once, not once per layer (nor once per call in a benchmark loop).
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
import weakref
from collections import OrderedDict
from typing import Callable, List, Optional, Sequence, Tuple

import torch

Tensor = torch.Tensor

VARIANTS = ("dense", "sparse", "gated")
HEAD_DIM_MULTIPLE = 8
MAX_HEAD_DIM = 256
PAGE_SIZE_MULTIPLE = 16

_LOWP_DTYPES = (torch.float16, torch.bfloat16)
_CPU_ONLY_DTYPES = (torch.float32, torch.float64)
_GATE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FP8_DTYPES = tuple(
    getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
                                "float8_e5m2fnuz") if hasattr(torch, n)
)


# ------------------------------------------------------------------------------------------
# context of one call: the public function's name, the device, pending value checks
# ------------------------------------------------------------------------------------------
class _Ctx:
    def __init__(self, fn: str, skip_checks: bool = False):
        self.fn = fn
        self.skip_values = self.user_skip = bool(skip_checks)
        self.values_done = False  # the value checks ran (or passed before: `memoize`)
        self.device: Optional[torch.device] = None
        # (bad-entries mask, message(mask) -> str) pairs, reduced with one sync at the end
        self.pending: List[Tuple[Tensor, Callable[[Tensor], str]]] = []

        self.memo_key: Optional[tuple] = None
        self.memo_refs: list = []

    def fail(self, exc: type, msg: str):
        raise exc(f"{self.fn}: {msg}")

    def memoize(self, tensors: Sequence[Optional[Tensor]], scalars: Sequence = ()):
        """Declare everything the value checks of this call read: the tensors whose contents
        are checked and the shapes/scalars they are checked against. If the same objects, at
        the same versions, passed before, this call's value checks are skipped."""
        if not self.reads_values:
            return
        parts, refs = [], []
        for t in tensors:
            if not isinstance(t, Tensor):
                parts.append(None)
                continue
            try:
                version = t._version
            except RuntimeError:  # inference-mode tensors carry no version counter
                return
            parts.append((id(t), version, t.data_ptr(), tuple(t.shape), tuple(t.stride()),
                          t.dtype, str(t.device)))
            refs.append(weakref.ref(t))
        key = (self.fn, tuple(parts), tuple(scalars))
        try:
            hash(key)
        except TypeError:  # an unhashable scalar argument: its own check reports it
            return
        alive = _VALIDATED.get(key)
        if alive is not None and all(r() is not None for r in alive):
            _VALIDATED.move_to_end(key)
            self.skip_values = self.values_done = True
            return
        self.memo_key, self.memo_refs = key, refs

    @property
    def reads_values(self) -> bool:
        # value checks need a host sync: not while compiling or capturing a CUDA graph
        if self.skip_values or torch.compiler.is_compiling():
            return False
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return False
        return self.device is None or self.device.type != "meta"


# value checks that passed: key of `_Ctx.memoize` -> weak references to the tensors it names
_VALIDATED: "OrderedDict[tuple, list]" = OrderedDict()
_MEMO_SIZE = 64

# whole calls that passed (`_memoized`): key -> weak references to their value-checked tensors
_PASSED: "OrderedDict[tuple, list]" = OrderedDict()
_PASSED_SIZE = 256


def _call_key(args, kwargs, value_tensors):
    """What a check reads of a call: per tensor its type, shape, strides, dtype and device,
    per other argument its type and value; for the tensors whose contents are checked also
    their identity, version and address. None where that cannot be keyed."""
    parts = []
    try:
        for a in (*args, *kwargs.values()):
            if isinstance(a, Tensor):
                parts.append((type(a), a.shape, a.stride(), a.dtype, a.device))
            else:
                parts.append((type(a), a))
        for t in value_tensors:
            parts.append((id(t), t._version, t.data_ptr()))
        key = (tuple(parts), tuple(kwargs))
        hash(key)
    except (RuntimeError, TypeError, NotImplementedError):  # sparse layouts, inference
        return None  # tensors without a version, unhashable arguments: checked every time
    return key


def _memoized(*value_args: str):
    """A check function whose passing calls are remembered: a later call with the same key
    (`_call_key`: same shapes, strides, dtypes, devices and scalars, and the very same
    value-checked tensors `value_args` at the same versions) passes without running the
    checks again. Only calls whose value checks really ran (or had none to run, or were
    skipped by `skip_checks=True`, which is part of the key) are remembered: not those
    traced by torch.compile or under CUDA-graph capture."""
    def wrap(check):
        names = list(inspect.signature(check).parameters)
        positions = [names.index(n) for n in value_args]

        @functools.wraps(check)
        def run(*args, **kwargs):
            if torch.compiler.is_compiling():
                check(*args, **kwargs)
                return
            values = [a for a in (args[i] if i < len(args) else kwargs.get(names[i])
                                  for i in positions) if isinstance(a, Tensor)]
            key = _call_key(args, kwargs, values)
            if key is not None:
                refs = _PASSED.get((check, key))
                if refs is not None and all(r() is not None for r in refs):
                    return
            ctx = check(*args, **kwargs)
            if key is not None and (not values or ctx.values_done or ctx.user_skip):
                _PASSED[(check, key)] = [weakref.ref(t) for t in values]
                while len(_PASSED) > _PASSED_SIZE:
                    _PASSED.popitem(last=False)
        return run
    return wrap


def _fn_name(variant: str, kind: str) -> str:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    return f"flash_{variant}_attn_{kind}"


def _shape(t) -> Optional[tuple]:
    return tuple(t.shape) if isinstance(t, Tensor) else None


def _dims(t: Tensor) -> list:
    return list(t.shape)


def _dtype_list(dtypes: Sequence[torch.dtype]) -> str:
    names = [str(d).replace("torch.", "") for d in dtypes]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


# ------------------------------------------------------------------------------------------
# small checks
# ------------------------------------------------------------------------------------------
def _expect_tensor(ctx: _Ctx, name: str, t, required: bool = True, why: str = "") -> bool:
    """t is a tensor on the call's device (the device of query). Returns False for an
    optional None."""
    if t is None:
        if required:
            ctx.fail(TypeError, f"{name} is required{why}, got None")
        return False
    if not isinstance(t, torch.Tensor):
        ctx.fail(TypeError, f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ctx.device is None:
        ctx.device = t.device
    elif t.device != ctx.device:
        ctx.fail(ValueError, f"{name} is on device {t.device} but query is on {ctx.device}; "
                             "expected all tensors on one device")
    return True


def _expect_none(ctx: _Ctx, name: str, x, why: str):
    if x is not None:
        ctx.fail(ValueError, f"{name} must be None {why}, got {type(x).__name__}")


def _expect_dtype(ctx: _Ctx, name: str, t: Tensor, dtypes: Sequence[torch.dtype]):
    if t.dtype not in dtypes:
        ctx.fail(TypeError, f"{name} must be {_dtype_list(dtypes)}, got {t.dtype}")


def _expect_same_dtype(ctx: _Ctx, name: str, t: Tensor, ref_name: str, ref: Tensor):
    if t.dtype != ref.dtype:
        ctx.fail(TypeError, f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; "
                            "expected the same dtype")


def _expect_rank(ctx: _Ctx, name: str, t: Tensor, layout: str):
    rank = layout.count(",") + 1
    if t.dim() != rank:
        ctx.fail(ValueError, f"{name} must be {rank}-D {layout}, got shape {_dims(t)}")


def _expect_shape(ctx: _Ctx, name: str, t: Tensor, shape: Sequence[int], layout: str):
    if t.dim() != len(shape) or any(a != b for a, b in zip(t.shape, shape)):
        ctx.fail(ValueError, f"{name} must have shape {layout} = {list(shape)}, "
                             f"got {_dims(t)}")


def _expect_last_dim_contiguous(ctx: _Ctx, name: str, t: Tensor):
    if t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        ctx.fail(ValueError, f"{name} must have a contiguous last dim (stride(-1) == 1), got "
                             f"strides {list(t.stride())}")


def _is_int(x) -> bool:
    return isinstance(x, (numbers.Integral, torch.SymInt)) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, (numbers.Real, torch.SymInt, torch.SymFloat)) and not isinstance(x, bool)


def _expect_int(ctx: _Ctx, name: str, x, minimum: int, optional: bool = False):
    if x is None and optional:
        return
    if not _is_int(x):
        ctx.fail(TypeError, f"{name} must be an int, got {type(x).__name__}")
    if x < minimum:
        ctx.fail(ValueError, f"{name} must be >= {minimum}, got {x}")


def _expect_float(ctx: _Ctx, name: str, x, positive: bool = False):
    """None or a finite real number (> 0 with positive=True)."""
    if x is None:
        return
    if not _is_real(x):
        ctx.fail(TypeError, f"{name} must be a float or None, got {type(x).__name__}")
    if torch.compiler.is_compiling():
        return  # a float input is symbolic there: testing its value would specialise the graph
    if not math.isfinite(float(x)):
        ctx.fail(ValueError, f"{name} must be finite, got {x}")
    if positive and x <= 0:
        ctx.fail(ValueError, f"{name} must be > 0, got {x}")


def _expect_value(ctx: _Ctx, bad: Callable[[], Tensor], message: Callable[[Tensor], str]):
    """Queue a value check. `bad()` returns a bool tensor (any shape), true where the input is
    invalid; it runs only when values are read. `message(mask)` runs only on failure."""
    if ctx.reads_values:
        mask = bad()
        ctx.pending.append((mask, message))


def _run_value_checks(ctx: _Ctx) -> _Ctx:
    if not ctx.skip_values and ctx.reads_values:
        ctx.values_done = True
    if not ctx.pending:
        return ctx
    flags = torch.stack([m.any() for m, _ in ctx.pending]).tolist()  # the one host sync
    for flag, (mask, message) in zip(flags, ctx.pending):
        if flag:
            ctx.fail(ValueError, message(mask))
    if ctx.memo_key is not None:
        _VALIDATED[ctx.memo_key] = ctx.memo_refs
        while len(_VALIDATED) > _MEMO_SIZE:
            _VALIDATED.popitem(last=False)
    return ctx


def _first(mask: Tensor) -> list:
    """Index (as a list) of the first True entry of mask."""
    return [int(i) for i in mask.nonzero()[0]]


# ------------------------------------------------------------------------------------------
# checks shared by the entry points
# ------------------------------------------------------------------------------------------
def _check_quant(ctx: _Ctx, is_quant):
    if is_quant:
        raise NotImplementedError(
            f"{ctx.fn}: is_quant=True (fused fp8 attention, SPEC §8) is not implemented; "
            "expected is_quant=False with fp16/bf16 inputs")


def _check_qkv(ctx: _Ctx, query, key, value, q_layout: str, kv_layout: str):
    """Types, device, dtype, rank, head dim, heads and strides of query/key/value."""
    _expect_tensor(ctx, "query", query)
    _expect_tensor(ctx, "key", key)
    _expect_tensor(ctx, "value", value)
    dtype = query.dtype
    if dtype in _FP8_DTYPES:
        ctx.fail(TypeError, f"query has dtype {dtype}; fp8 inputs need is_quant=True, which is "
                            "not implemented; expected float16 or bfloat16")
    allowed = _LOWP_DTYPES + (_CPU_ONLY_DTYPES if query.device.type == "cpu" else ())
    if dtype not in allowed:
        extra = " (float32/float64 only on CPU tensors)" if dtype in _CPU_ONLY_DTYPES else ""
        ctx.fail(TypeError, f"query must be float16 or bfloat16{extra}, got {dtype} on "
                            f"{query.device}")
    _expect_same_dtype(ctx, "key", key, "query", query)
    _expect_same_dtype(ctx, "value", value, "query", query)
    _expect_rank(ctx, "query", query, q_layout)
    _expect_rank(ctx, "key", key, kv_layout)
    _expect_rank(ctx, "value", value, kv_layout)
    head_dim = query.shape[-1]
    if head_dim % HEAD_DIM_MULTIPLE != 0 or not 0 < head_dim <= MAX_HEAD_DIM:
        ctx.fail(ValueError, f"query has head dim {head_dim}; expected a multiple of "
                             f"{HEAD_DIM_MULTIPLE} between {HEAD_DIM_MULTIPLE} and {MAX_HEAD_DIM}")
    for name, t in (("key", key), ("value", value)):
        if t.shape[-1] != head_dim:
            ctx.fail(ValueError, f"{name} has head dim {t.shape[-1]} but query has {head_dim}; "
                                 "expected the same head dim")
    if _dims(value) != _dims(key):
        ctx.fail(ValueError, f"value has shape {_dims(value)} but key has {_dims(key)}; "
                             "expected the same shape")
    heads, kv_heads = query.shape[-2], key.shape[-2]
    if kv_heads < 1 or heads % kv_heads != 0:
        ctx.fail(ValueError, f"query has {heads} heads and key/value {kv_heads}; expected the "
                             "query heads to be a multiple of the key/value heads (H % Hkv == 0)")
    for name, t in (("query", query), ("key", key), ("value", value)):
        _expect_last_dim_contiguous(ctx, name, t)


def _check_gates(ctx: _Ctx, variant: str, alpha, delta, alpha_shape, alpha_layout,
                 delta_shape, delta_layout):
    if variant != "gated":
        _expect_none(ctx, "alpha", alpha, "for non-gated attention")
        _expect_none(ctx, "delta", delta, "for non-gated attention")
        return
    why = " for gated attention"
    for name, t, shape, layout in (("alpha", alpha, alpha_shape, alpha_layout),
                                   ("delta", delta, delta_shape, delta_layout)):
        _expect_tensor(ctx, name, t, why=why)
        _expect_dtype(ctx, name, t, _GATE_DTYPES)
        _expect_shape(ctx, name, t, shape, layout)


def _check_windows(ctx: _Ctx, window_sizes, heads: int, kv_heads: int):
    if not _expect_tensor(ctx, "window_sizes", window_sizes, required=False):
        return
    _expect_dtype(ctx, "window_sizes", window_sizes, (torch.int32,))
    if window_sizes.dim() != 2 or window_sizes.shape[1] != 4 or \
            window_sizes.shape[0] not in (kv_heads, heads):
        ctx.fail(ValueError, f"window_sizes must have shape [Hkv, 4] = [{kv_heads}, 4] or "
                             f"[H, 4] = [{heads}, 4], got {_dims(window_sizes)}")
    _expect_value(ctx, lambda: window_sizes < 0, lambda bad: (
        f"window_sizes must be >= 0 (columns [sink, left, right, near]), got "
        f"window_sizes{_first(bad)} = {int(window_sizes[tuple(_first(bad))])}"))


def _check_contiguous_keys(ctx: _Ctx, key, batch: int, capacity_name: str):
    """Keys [B, Sk, Hkv, D] of the query's batch: (capacity Sk as a thunk, its name, delta's
    shape and layout), as `_check_page_table` returns them."""
    if key.shape[0] != batch:
        ctx.fail(ValueError, f"key has batch size {key.shape[0]} but query has {batch}; "
                             "expected the same batch size")
    seqlen_k = key.shape[1]
    return (lambda: seqlen_k), capacity_name, [batch, key.shape[2], seqlen_k], "[B, Hkv, Sk]"


def _check_page_table(ctx: _Ctx, page_table, key, batch: int):
    """A paged cache key/value [num_pages, page_size, Hkv, D] with page_table int32
    [B, max_pages] (every entry a valid page index): returns (capacity of a sequence as a
    thunk, its name, delta's shape and layout)."""
    _expect_tensor(ctx, "page_table", page_table)
    _expect_dtype(ctx, "page_table", page_table, (torch.int32,))
    _expect_rank(ctx, "page_table", page_table, "[B, max_pages]")
    if page_table.shape[0] != batch:
        ctx.fail(ValueError, f"page_table has batch size {page_table.shape[0]} but query "
                             f"has {batch}; expected the same batch size")
    num_pages, page_size = key.shape[0], key.shape[1]
    if page_size % PAGE_SIZE_MULTIPLE != 0:
        ctx.fail(ValueError, f"key has page_size {page_size} (key.shape[1]); expected a "
                             f"multiple of {PAGE_SIZE_MULTIPLE}")
    _expect_value(ctx, lambda: (page_table < 0) | (page_table >= num_pages), lambda bad: (
        f"page_table{_first(bad)} = {int(page_table[tuple(_first(bad))])}; expected "
        f"entries in [0, num_pages) = [0, {num_pages})"))
    max_len = page_table.shape[1] * page_size
    return (lambda: max_len), "max_pages * page_size", \
        [num_pages, page_size, key.shape[-2]], "[num_pages, page_size, Hkv]"


def _check_scalars(ctx: _Ctx, softmax_scale, softmax_threshold, gate_threshold):
    _expect_float(ctx, "softmax_scale", softmax_scale, positive=True)
    _expect_float(ctx, "softmax_threshold", softmax_threshold)
    _expect_float(ctx, "gate_threshold", gate_threshold)


def _check_out_lse(ctx: _Ctx, query: Tensor, out, lse, lse_shape, lse_layout: str):
    if _expect_tensor(ctx, "out", out, required=False):
        _expect_same_dtype(ctx, "out", out, "query", query)
        _expect_shape(ctx, "out", out, query.shape, "like query")
        _expect_last_dim_contiguous(ctx, "out", out)
    if _expect_tensor(ctx, "lse", lse, required=False):
        _expect_dtype(ctx, "lse", lse, (torch.float32,))
        _expect_shape(ctx, "lse", lse, lse_shape, lse_layout)


def _seq_lengths(cu: Tensor) -> Tensor:
    return cu[1:] - cu[:-1]


def _check_cu_seqlens(ctx: _Ctx, name: str, cu, batch_plus_one: Optional[int],
                      total: Optional[int], total_name: str) -> int:
    """int32 [B+1]; (value checks) starts at 0, non-decreasing, last entry == total (unless
    total is None: lengths only, as over a paged cache). Returns B+1."""
    _expect_tensor(ctx, name, cu)
    _expect_dtype(ctx, name, cu, (torch.int32,))
    if cu.dim() != 1 or cu.shape[0] < 1:
        ctx.fail(ValueError, f"{name} must be 1-D [B+1] with at least one entry, got shape "
                             f"{_dims(cu)}")
    if batch_plus_one is not None and cu.shape[0] != batch_plus_one:
        ctx.fail(ValueError, f"{name} has {cu.shape[0]} entries; expected B+1 = "
                             f"{batch_plus_one}")
    _expect_value(ctx, lambda: cu[0] != 0, lambda _: f"{name} must start at 0, got {int(cu[0])}")
    _expect_value(ctx, lambda: _seq_lengths(cu) < 0, lambda bad: (
        f"{name} must be non-decreasing, got {name}[{_first(bad)[0]}] = "
        f"{int(cu[_first(bad)[0]])} > {name}[{_first(bad)[0] + 1}] = "
        f"{int(cu[_first(bad)[0] + 1])}"))
    if total is not None:
        _expect_value(ctx, lambda: cu[-1] != total, lambda _: (
            f"{name}[-1] = {int(cu[-1])}; expected it to equal {total_name} = {total}"))
    return cu.shape[0]


def _check_max_seqlen(ctx: _Ctx, name: str, max_seqlen, lengths: Callable[[], Tensor],
                      lengths_name: str):
    """int >= 0, and (value check) >= every per-sequence length."""
    _expect_int(ctx, name, max_seqlen, 0)
    _expect_value(ctx, lambda: lengths() > max_seqlen, lambda bad: (
        f"{name} = {max_seqlen} but sequence {_first(bad)[0]} has {lengths_name} "
        f"{int(lengths()[_first(bad)[0]])}; expected {name} >= every sequence length"))


def _check_seqused_k(ctx: _Ctx, seqused_k, batch: int, capacity: Callable[[], object],
                     capacity_name: str, appending: bool = False) -> bool:
    """int32 [B]; (value checks) 0 <= seqused_k <= capacity, or < capacity when a new token is
    appended. `capacity()` is an int or an int tensor [B]. Returns whether seqused_k is given."""
    if not _expect_tensor(ctx, "seqused_k", seqused_k, required=False):
        return False
    _expect_dtype(ctx, "seqused_k", seqused_k, (torch.int32,))
    _expect_shape(ctx, "seqused_k", seqused_k, [batch], "[B]")
    _expect_value(ctx, lambda: seqused_k < 0, lambda bad: (
        f"seqused_k must be >= 0, got seqused_k[{_first(bad)[0]}] = "
        f"{int(seqused_k[_first(bad)[0]])}"))

    def over():
        return seqused_k >= capacity() if appending else seqused_k > capacity()

    def message(bad):
        b = _first(bad)[0]
        cap = capacity()
        cap = int(cap[b]) if isinstance(cap, Tensor) else cap
        return (f"seqused_k[{b}] = {int(seqused_k[b])}; expected seqused_k "
                f"{'<' if appending else '<='} {capacity_name} = {cap}"
                + (" (k_new is written at position seqused_k[b])" if appending else ""))
    _expect_value(ctx, over, message)
    return True


# ------------------------------------------------------------------------------------------
# entry points
# ------------------------------------------------------------------------------------------
@_memoized("window_sizes", "seqused_k", "page_table")
def check_attn_func(variant, query, key, value, alpha, delta, softmax_scale, window_sizes,
                    softmax_threshold, gate_threshold, is_quant, out, lse, seqused_k=None,
                    page_table=None, num_splits=None, skip_checks=False):
    """Batched: query [B, Sq, H, D], key/value [B, Sk, Hkv, D], or a paged cache
    [num_pages, page_size, Hkv, D] with page_table int32 [B, max_pages] (Sk = max_pages *
    page_size); seqused_k int32 [B] (keys in use, <= Sk); gated alpha [B, H, Sq], delta
    [B, Hkv, Sk] (paged: [num_pages, page_size, Hkv]); out like query, lse [B, H, Sq]
    float32."""
    ctx = _Ctx(_fn_name(variant, "func"), skip_checks)
    ctx.memoize([window_sizes, seqused_k, page_table], [_shape(query), _shape(key)])
    _check_quant(ctx, is_quant)
    paged = page_table is not None
    _check_qkv(ctx, query, key, value, "[B, Sq, H, D]",
               "[num_pages, page_size, Hkv, D]" if paged else "[B, Sk, Hkv, D]")
    batch, seqlen_q, heads, _ = query.shape
    kv_heads = key.shape[2]
    if paged:
        capacity, capacity_name, delta_shape, delta_layout = _check_page_table(
            ctx, page_table, key, batch)
        seqlen_k = capacity()
    else:
        capacity, capacity_name, delta_shape, delta_layout = _check_contiguous_keys(
            ctx, key, batch, "the key length key.shape[1]")
        seqlen_k = capacity()
    _check_seqused_k(ctx, seqused_k, batch, capacity, capacity_name)
    _expect_int(ctx, "num_splits", num_splits, 0, optional=True)
    _check_gates(ctx, variant, alpha, delta, [batch, heads, seqlen_q], "[B, H, Sq]",
                 delta_shape, delta_layout)
    _check_windows(ctx, window_sizes, heads, kv_heads)
    _check_scalars(ctx, softmax_scale, softmax_threshold, gate_threshold)
    _check_out_lse(ctx, query, out, lse, [batch, heads, seqlen_q], "[B, H, Sq]")
    return _run_value_checks(ctx)


@_memoized("cu_seqlens_q", "cu_seqlens_k", "seqused_k", "window_sizes", "page_table")
def check_attn_varlen_func(variant, query, key, value, alpha, delta, cu_seqlens_q, cu_seqlens_k,
                           max_seqlen_q, max_seqlen_k, seqused_q, seqused_k, softmax_scale,
                           window_sizes, softmax_threshold, gate_threshold, is_quant, out, lse,
                           skip_checks, page_table=None, num_splits=None):
    """Varlen: query [total_q, H, D], key/value [total_k, Hkv, D], cu_seqlens_q/k int32 [B+1],
    seqused_k int32 [B]; gated alpha [H, total_q], delta [Hkv, total_k]; out like query,
    lse [H, total_q] float32. max_seqlen_q >= every query length; max_seqlen_k >= every key
    length used (seqused_k[b] where given, else the cu_seqlens_k length). With page_table
    [B, max_pages]: key/value a paged cache [num_pages, page_size, Hkv, D] (delta
    [num_pages, page_size, Hkv]); cu_seqlens_k then only gives lengths, each at most
    max_pages * page_size."""
    ctx = _Ctx(_fn_name(variant, "varlen_func"), skip_checks)
    ctx.memoize([cu_seqlens_q, cu_seqlens_k, seqused_k, window_sizes, page_table],
                [_shape(query), _shape(key), max_seqlen_q, max_seqlen_k])
    _check_quant(ctx, is_quant)
    if seqused_q is not None:
        ctx.fail(ValueError, "seqused_q is not supported; expected None (trim cu_seqlens_q "
                             "instead)")
    paged = page_table is not None
    _check_qkv(ctx, query, key, value, "[total_q, H, D]",
               "[num_pages, page_size, Hkv, D]" if paged else "[total_k, Hkv, D]")
    total_q, heads, _ = query.shape
    total_k, kv_heads = key.shape[0], key.shape[-2]
    n = _check_cu_seqlens(ctx, "cu_seqlens_q", cu_seqlens_q, None, total_q, "query.shape[0]")
    _check_cu_seqlens(ctx, "cu_seqlens_k", cu_seqlens_k, n, None if paged else total_k,
                      "key.shape[0]")
    delta_shape, delta_layout = [kv_heads, total_k], "[Hkv, total_k]"
    if paged:
        capacity, capacity_name, delta_shape, delta_layout = _check_page_table(
            ctx, page_table, key, n - 1)
        _expect_value(ctx, lambda: _seq_lengths(cu_seqlens_k) > capacity(), lambda bad: (
            f"cu_seqlens_k gives sequence {_first(bad)[0]} "
            f"{int(_seq_lengths(cu_seqlens_k)[_first(bad)[0]])} keys; expected at most "
            f"{capacity_name} = {capacity()}"))
    _expect_int(ctx, "num_splits", num_splits, 0, optional=True)
    has_used = _check_seqused_k(ctx, seqused_k, n - 1, lambda: _seq_lengths(cu_seqlens_k),
                                "cu_seqlens_k[b+1] - cu_seqlens_k[b]")
    _check_max_seqlen(ctx, "max_seqlen_q", max_seqlen_q, lambda: _seq_lengths(cu_seqlens_q),
                      "query length")
    if has_used:
        _check_max_seqlen(ctx, "max_seqlen_k", max_seqlen_k, lambda: seqused_k,
                          "used key length seqused_k")
    else:
        _check_max_seqlen(ctx, "max_seqlen_k", max_seqlen_k, lambda: _seq_lengths(cu_seqlens_k),
                          "key length")
    _check_gates(ctx, variant, alpha, delta, [heads, total_q], "[H, total_q]", delta_shape,
                 delta_layout)
    _check_windows(ctx, window_sizes, heads, kv_heads)
    _check_scalars(ctx, softmax_scale, softmax_threshold, gate_threshold)
    _check_out_lse(ctx, query, out, lse, [heads, total_q], "[H, total_q]")
    return _run_value_checks(ctx)


@_memoized("cu_seqlens_k", "seqused_k", "page_table", "gather_kv_indices",
           "window_sizes")
def check_attn_with_kvcache_func(variant, query, key, value, alpha, delta, cu_seqlens_k,
                                 max_seqlen_k, seqused_k, page_table, k_new, v_new, delta_new,
                                 gather_kv_indices, softmax_scale, window_sizes,
                                 softmax_threshold, gate_threshold, num_splits, is_quant, out,
                                 lse, skip_checks):
    """Decode: query [B, H, D] over key/value caches, one of
    - contiguous [B, Sk, Hkv, D] (gated delta [B, Hkv, Sk]);
    - paged [num_pages, page_size, Hkv, D] with page_table int32 [B, max_pages]
      (delta [num_pages, page_size, Hkv]), when page_table is given; every page_table entry,
      used or not, must be a valid page index;
    - packed [total_k, Hkv, D] with cu_seqlens_k int32 [B+1] and max_seqlen_k
      (delta [Hkv, total_k]), when cu_seqlens_k is given.
    alpha [B, H]; seqused_k int32 [B]; k_new/v_new [B, Hkv, D] (delta_new [B, Hkv]) written at
    seqused_k[b]; gather_kv_indices int32 [B, topk] or [B, Hkv, topk] (entries below the
    sequence's cache capacity; negative entries are ignored); out like query, lse [B, H] float32.
    """
    packed, paged = cu_seqlens_k is not None, page_table is not None
    ctx = _Ctx(_fn_name(variant, "varlen_with_kvcache_func" if packed else "with_kvcache_func"),
               skip_checks)
    ctx.memoize([cu_seqlens_k, seqused_k, page_table, gather_kv_indices, window_sizes],
                [_shape(query), _shape(key), max_seqlen_k, k_new is not None, v_new is not None])
    _check_quant(ctx, is_quant)
    if packed and paged:
        ctx.fail(ValueError, "page_table must be None with packed caches (cu_seqlens_k given); "
                             "expected either a paged or a packed cache")
    kv_layout = ("[num_pages, page_size, Hkv, D]" if paged else
                 "[total_k, Hkv, D]" if packed else "[B, Sk, Hkv, D]")
    _check_qkv(ctx, query, key, value, "[B, H, D]", kv_layout)
    batch, heads, head_dim = query.shape
    kv_heads = key.shape[-2]

    # cache layout -> capacity of each sequence (an int, or an int tensor [B] when packed)
    if paged:
        capacity, capacity_name, delta_shape, delta_layout = _check_page_table(
            ctx, page_table, key, batch)
    elif packed:
        _check_cu_seqlens(ctx, "cu_seqlens_k", cu_seqlens_k, batch + 1, key.shape[0],
                          "key.shape[0]")
        capacity = lambda: _seq_lengths(cu_seqlens_k)  # noqa: E731
        capacity_name = "cu_seqlens_k[b+1] - cu_seqlens_k[b]"
        delta_shape, delta_layout = [kv_heads, key.shape[0]], "[Hkv, total_k]"
    else:
        capacity, capacity_name, delta_shape, delta_layout = _check_contiguous_keys(
            ctx, key, batch, "the cache length key.shape[1]")
    if not packed:
        _expect_none(ctx, "max_seqlen_k", max_seqlen_k, "without cu_seqlens_k")

    # the new token
    appending = k_new is not None or v_new is not None
    if appending:
        for name, t in (("k_new", k_new), ("v_new", v_new)):
            _expect_tensor(ctx, name, t, why=" when k_new or v_new is given (both or neither)")
            _expect_same_dtype(ctx, name, t, "key", key)
            _expect_shape(ctx, name, t, [batch, kv_heads, head_dim], "[B, Hkv, D]")
            _expect_last_dim_contiguous(ctx, name, t)
        _expect_tensor(ctx, "seqused_k", seqused_k,
                       why=" with k_new/v_new (the new token is written at seqused_k[b])")
    has_used = _check_seqused_k(ctx, seqused_k, batch, capacity, capacity_name, appending)
    if packed:  # max_seqlen_k bounds the keys attended to, after the append
        lengths = (lambda: seqused_k + 1) if appending else \
            (lambda: seqused_k) if has_used else capacity
        _check_max_seqlen(ctx, "max_seqlen_k", max_seqlen_k, lengths,
                          "key length (after k_new)" if appending else "key length")

    # gates
    _check_gates(ctx, variant, alpha, delta, [batch, heads], "[B, H]", delta_shape, delta_layout)
    if variant != "gated":
        _expect_none(ctx, "delta_new", delta_new, "for non-gated attention")
    elif appending:
        _expect_tensor(ctx, "delta_new", delta_new, why=" for gated attention with k_new")
        _expect_dtype(ctx, "delta_new", delta_new, _GATE_DTYPES)
        _expect_shape(ctx, "delta_new", delta_new, [batch, kv_heads], "[B, Hkv]")
    else:
        _expect_none(ctx, "delta_new", delta_new, "without k_new")

    if _expect_tensor(ctx, "gather_kv_indices", gather_kv_indices, required=False):
        g = gather_kv_indices
        _expect_dtype(ctx, "gather_kv_indices", g, (torch.int32,))
        if not (g.dim() == 2 and g.shape[0] == batch) and \
                not (g.dim() == 3 and g.shape[0] == batch and g.shape[1] == kv_heads):
            ctx.fail(ValueError, f"gather_kv_indices must have shape [B, topk] = [{batch}, topk] "
                                 f"or [B, Hkv, topk] = [{batch}, {kv_heads}, topk], got "
                                 f"{_dims(g)}")

        def over():
            cap = capacity()
            if isinstance(cap, Tensor):
                cap = cap.view([batch] + [1] * (g.dim() - 1))
            return g >= cap

        def message(bad):
            at = _first(bad)
            cap = capacity()
            cap = int(cap[at[0]]) if isinstance(cap, Tensor) else cap
            return (f"gather_kv_indices{at} = {int(g[tuple(at)])}; expected indices < "
                    f"{capacity_name} = {cap} for b = {at[0]} (negative entries are ignored)")
        _expect_value(ctx, over, message)

    _expect_int(ctx, "num_splits", num_splits, 1, optional=True)
    _check_windows(ctx, window_sizes, heads, kv_heads)
    _check_scalars(ctx, softmax_scale, softmax_threshold, gate_threshold)
    _check_out_lse(ctx, query, out, lse, [batch, heads], "[B, H]")
    return _run_value_checks(ctx)
