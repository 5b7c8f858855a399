"""Registered custom ops: the one place where public functions meet kernels.

Every op is declared with `add_op_namespace_prefix(...)` (a unique namespace per build), has a
fake implementation for `torch.compile`, and the training op has `register_autograd`.
Inside an op, CUDA (and ROCm/XPU) tensors go to the Triton kernels; CPU tensors go to
`reference.py`, unless `TRITON_INTERPRET=1`, in which case the same Triton kernels run through
Triton's interpreter (that is how CI tests the kernels without a GPU).

Ops:
- `fwd`      attention forward (batched or varlen, dense/sparse/gated, causal/local).
- `bwd`      its backward.
- `fwd_plain`, `bwd_plain`  the same for the common call without any optional tensor (batched,
             no gate, window, seqused_k or page table), with 6 and 10 arguments instead of 13
             and 16: torch's custom-op autograd wrapper costs host time that grows with the
             square of the argument count (it rebuilds the schema's argument list once per
             argument), measured on an empty op with autograd: 105 us per call at 13
             arguments, 55 us at 6.
- `kv_append` writes the new token's key/value (and delta) into a cache, in place.
- `decode`   one query token per sequence over a (paged, gathered) KV cache.

interface.py calls `attention`, `decode` and `kv_append_entry`: traced (torch.compile,
export, a dispatch or torch-function mode, torch.func, tensor subclasses) they call these
ops; in plain eager mode (`eager`) the same implementations directly, under a plain
autograd.Function for the forward (the op layers alone measured 55 us per call, and an op's
autograd wrapper several times that, against a whole SDPA call of 40 us). Both give the same
bits (tests/test_ops.py).
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from typing import Optional

import torch

from . import reference
from ._ops import add_op_namespace_prefix

Tensor = torch.Tensor


_CPU_REFERENCE = [False]


@contextmanager
def cpu_reference():
    """Within this context CPU tensors take the reference path even under
    TRITON_INTERPRET=1 (tests use it to check both CPU paths in one session)."""
    _CPU_REFERENCE[0] = True
    try:
        yield
    finally:
        _CPU_REFERENCE[0] = False


def use_triton(t: Tensor) -> bool:
    """Triton kernels for device tensors; for CPU tensors only under TRITON_INTERPRET=1."""
    if t.device.type != "cpu":
        return True
    return os.environ.get("TRITON_INTERPRET", "0") == "1" and not _CPU_REFERENCE[0]


def scalar_args(max_seqlen_q, max_seqlen_k, softmax_scale, is_causal, softmax_threshold,
                gate_threshold, is_logsigmoid_gate, is_adapt_gate, deterministic,
                num_splits=0) -> tuple:
    """The scalar arguments of `fwd` / `bwd`, packed into three lists (ints, floats, bools):
    each op argument costs host time on every call (torch's custom-op autograd wrapper walks
    the schema once per argument, so the cost grows with the square of the count)."""
    return ([max_seqlen_q, max_seqlen_k, num_splits],
            [softmax_scale, softmax_threshold, gate_threshold],
            [is_causal, is_logsigmoid_gate, is_adapt_gate, deterministic])


def unpack_scalars(max_seqlens, floats, flags) -> dict:
    """The keywords of `scalar_args`' lists."""
    return dict(max_seqlen_q=max_seqlens[0], max_seqlen_k=max_seqlens[1],
                num_splits=max_seqlens[2] if len(max_seqlens) > 2 else 0,
                softmax_scale=floats[0], softmax_threshold=floats[1], gate_threshold=floats[2],
                is_causal=flags[0], is_logsigmoid_gate=flags[1], is_adapt_gate=flags[2],
                deterministic=flags[3])


def _lse_shape(q: Tensor, is_varlen: bool) -> list:
    if is_varlen:  # q [total_q, H, D] -> lse [H, total_q]
        return [q.shape[1], q.shape[0]]
    return [q.shape[0], q.shape[2], q.shape[1]]  # q [B, Sq, H, D] -> lse [B, H, Sq]


# --------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------
@torch.library.custom_op(add_op_namespace_prefix("fwd"), mutates_args=())
def attn_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    alpha: Optional[Tensor],
    delta: Optional[Tensor],
    cu_seqlens_q: Optional[Tensor],
    cu_seqlens_k: Optional[Tensor],
    seqused_k: Optional[Tensor],
    page_table: Optional[Tensor],
    window_sizes: Optional[Tensor],
    max_seqlens: list[int],
    floats: list[float],
    flags: list[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (out, lse, skip). `skip` holds the forward's block-skip decisions (uint8, one
    per (batch, head, query block, key block)); it is empty when nothing can be skipped.
    Scalars come packed (`scalar_args`): max_seqlens (q, k, num_splits: split-KV, 0 = the
    heuristic, a hint that never changes results beyond rounding), floats (softmax_scale,
    softmax_threshold, gate_threshold), flags (is_causal, is_logsigmoid_gate, is_adapt_gate,
    deterministic; `deterministic` only matters to the backward, which gets it saved).
    page_table (batched or varlen): k/v (and delta) are a paged cache
    [num_pages, page_size, ...]."""
    return _fwd_impl(q, k, v, alpha, delta, cu_seqlens_q, cu_seqlens_k, seqused_k, page_table,
                     window_sizes, max_seqlens, floats, flags)


def _fwd_impl(q, k, v, alpha, delta, cu_seqlens_q, cu_seqlens_k, seqused_k, page_table,
              window_sizes, max_seqlens, floats, flags):
    args = dict(alpha=alpha, delta=delta, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                seqused_k=seqused_k, page_table=page_table, window_sizes=window_sizes,
                **unpack_scalars(max_seqlens, floats, flags))
    if use_triton(q):
        from .triton.fwd import launch_attn_fwd

        return launch_attn_fwd(q, k, v, **args)
    args.pop("num_splits")
    return reference.attention_forward_op(q, k, v, **args)


@attn_fwd.register_fake
def _attn_fwd_fake(q, k, v, alpha, delta, cu_seqlens_q, cu_seqlens_k, seqused_k, page_table,
                   window_sizes, max_seqlens, floats, flags):
    is_varlen = cu_seqlens_q is not None
    out = torch.empty_like(q)
    lse = q.new_empty(_lse_shape(q, is_varlen), dtype=torch.float32)
    from .triton.configs import skip_shape

    skip = q.new_empty(
        skip_shape(q, k, cu_seqlens_q, max_seqlens[0], max_seqlens[1],
                   floats[1] > 0 or alpha is not None),
        dtype=torch.uint8,
    )
    return out, lse, skip


# --------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------
@torch.library.custom_op(add_op_namespace_prefix("bwd"), mutates_args=())
def attn_bwd(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    skip: Tensor,
    alpha: Optional[Tensor],
    delta: Optional[Tensor],
    cu_seqlens_q: Optional[Tensor],
    cu_seqlens_k: Optional[Tensor],
    seqused_k: Optional[Tensor],
    window_sizes: Optional[Tensor],
    max_seqlens: list[int],
    floats: list[float],
    flags: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (dq, dk, dv, dalpha, ddelta); dalpha/ddelta are empty without gates. Scalars
    packed as for `fwd`."""
    return _bwd_impl(dout, q, k, v, out, lse, skip, alpha, delta, cu_seqlens_q, cu_seqlens_k,
                     seqused_k, window_sizes, max_seqlens, floats, flags)


def _bwd_impl(dout, q, k, v, out, lse, skip, alpha, delta, cu_seqlens_q, cu_seqlens_k,
              seqused_k, window_sizes, max_seqlens, floats, flags):
    args = dict(alpha=alpha, delta=delta, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                seqused_k=seqused_k, window_sizes=window_sizes,
                **unpack_scalars(max_seqlens, floats, flags))
    deterministic = args.pop("deterministic")
    args.pop("num_splits")
    if use_triton(q):
        from .triton.bwd import launch_attn_bwd

        return launch_attn_bwd(dout, q, k, v, out, lse, skip, deterministic=deterministic, **args)
    return reference.attention_backward_op(dout, q, k, v, out, lse, skip, **args)



@attn_bwd.register_fake
def _attn_bwd_fake(dout, q, k, v, out, lse, skip, alpha, delta, *rest):
    dalpha = torch.empty_like(alpha, memory_format=torch.contiguous_format) if alpha is not None \
        else q.new_empty((0,))
    ddelta = torch.empty_like(delta, memory_format=torch.contiguous_format) if delta is not None \
        else q.new_empty((0,))
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dalpha, ddelta


def _unit_last_stride(dout):
    """The kernels read dout rows with unit stride: a copy only when autograd hands over
    another layout."""
    return dout.contiguous() if dout.stride(-1) != 1 else dout


def _fwd_setup_context(ctx, inputs, output):
    # inputs: q, k, v, alpha, delta, cu_seqlens_q, cu_seqlens_k, seqused_k, page_table,
    # window_sizes, max_seqlens, floats, flags
    out, lse, skip = output
    ctx.save_for_backward(*inputs[:3], out, lse, skip, *inputs[3:8], inputs[9])
    ctx.paged = inputs[8] is not None
    ctx.scalars = inputs[10:]


def _fwd_grads(ctx, dout, bwd):
    """(dq, dk, dv, dalpha or None, ddelta or None) from what `_fwd_setup_context` saved;
    `bwd` is the `bwd` op (traced calls) or `_bwd_impl` (eager)."""
    if ctx.paged:
        raise NotImplementedError(
            "backward through a paged KV cache (page_table) is not supported: the paged "
            "forward is for inference (chunked prefill); pass contiguous keys/values to train")
    (q, k, v, out, lse, skip, alpha, delta, cu_q, cu_k, seqused_k,
     window_sizes) = ctx.saved_tensors
    dq, dk, dv, dalpha, ddelta = bwd(
        _unit_last_stride(dout), q, k, v, out, lse, skip, alpha,
        delta, cu_q, cu_k, seqused_k, window_sizes, *ctx.scalars,
    )
    return (dq, dk, dv, dalpha if alpha is not None else None,
            ddelta if delta is not None else None)


def _fwd_backward(ctx, dout, dlse, dskip):
    return _fwd_grads(ctx, dout, attn_bwd) + (None,) * 8


attn_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


@torch.library.custom_op(add_op_namespace_prefix("fwd_plain"), mutates_args=())
def attn_fwd_plain(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    max_seqlens: list[int],
    floats: list[float],
    flags: list[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    """`fwd` with every optional tensor None (batched dense or sparse attention, no window,
    seqused_k or page table)."""
    return _fwd_impl(q, k, v, None, None, None, None, None, None, None, max_seqlens, floats,
                     flags)


@attn_fwd_plain.register_fake
def _attn_fwd_plain_fake(q, k, v, max_seqlens, floats, flags):
    return _attn_fwd_fake(q, k, v, None, None, None, None, None, None, None, max_seqlens, floats,
                          flags)


@torch.library.custom_op(add_op_namespace_prefix("bwd_plain"), mutates_args=())
def attn_bwd_plain(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    skip: Tensor,
    max_seqlens: list[int],
    floats: list[float],
    flags: list[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    """The backward of `fwd_plain`: (dq, dk, dv)."""
    return _bwd_impl(dout, q, k, v, out, lse, skip, None, None, None, None, None, None,
                     max_seqlens, floats, flags)[:3]


@attn_bwd_plain.register_fake
def _attn_bwd_plain_fake(dout, q, k, v, out, lse, skip, *rest):
    return _attn_bwd_fake(dout, q, k, v, out, lse, skip, None, None)[:3]


def _fwd_plain_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:3], *output)
    ctx.scalars = inputs[3:]


def _fwd_plain_backward(ctx, dout, dlse, dskip):
    q, k, v, out, lse, skip = ctx.saved_tensors
    dq, dk, dv = attn_bwd_plain(_unit_last_stride(dout), q, k, v, out, lse, skip,
                                *ctx.scalars)
    return dq, dk, dv, None, None, None


attn_fwd_plain.register_autograd(_fwd_plain_backward, setup_context=_fwd_plain_setup_context)


# --------------------------------------------------------------------------------------------
# the entry points of interface.py: the registered ops when traced, the same code without the
# dispatcher in eager mode
# --------------------------------------------------------------------------------------------
_EAGER_TYPES = (Tensor, torch.nn.Parameter)


def eager(*tensors) -> bool:
    """True when a call can run its implementation without the op dispatcher: not traced
    (torch.compile, torch.jit), no torch-function or dispatch mode active (FakeTensor,
    export, FlopCounterMode, selective checkpointing ...), no torch.func transform, and plain
    tensors (no subclass with its own dispatch). Then the registered op would only add host
    time (about 55 us per op call, and ~3x that for an op with autograd: its wrapper rebuilds
    the schema's arguments several times); everything else goes through the ops."""
    return (not torch.compiler.is_compiling()
            and torch._C._len_torch_dispatch_stack() == 0
            and not torch._C._is_torch_function_mode_enabled()
            and torch._C._functorch.peek_interpreter_stack() is None
            and torch._C._get_tracing_state() is None
            and all(type(t) in _EAGER_TYPES for t in tensors if t is not None))


class _EagerAttention(torch.autograd.Function):
    """Autograd of `attention` in eager mode: the ops' forward and backward implementations
    and their save/restore (`_fwd_setup_context`, `_fwd_grads`), without the dispatcher."""

    @staticmethod
    def forward(ctx, q, k, v, alpha, delta, cu_seqlens_q, cu_seqlens_k, seqused_k, page_table,
                window_sizes, max_seqlens, floats, flags):
        inputs = (q, k, v, alpha, delta, cu_seqlens_q, cu_seqlens_k, seqused_k, page_table,
                  window_sizes, max_seqlens, floats, flags)
        output = _fwd_impl(*inputs)
        _fwd_setup_context(ctx, inputs, output)
        ctx.mark_non_differentiable(output[2])
        ctx.set_materialize_grads(False)  # no zero tensor for the unused lse gradient
        return output

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, dlse, dskip):
        if dout is None:
            return (None,) * 13
        if _AHEAD_RUNNING:
            _await_ahead()
        return _fwd_grads(ctx, dout, _bwd_impl) + (None,) * 8


_AHEAD_SEEN: set = set()  # configurations whose backward was compiled ahead (or tried)
_AHEAD_RUNNING: list = []  # threads still compiling
_AHEAD_ERRORS: list = []  # (key, exception) of compiles that failed (tests read it)
_AHEAD_ENABLED = os.environ.get("FSA_COMPILE_AHEAD", "1") != "0"


def _compile_ahead(q, k, v, alpha, delta, cu_seqlens_q, cu_seqlens_k, seqused_k,
                   window_sizes, max_seqlens, floats, flags):
    """The first forward with autograd of a configuration on a GPU starts compiling its
    backward's kernels on a background thread, so that they compile while the forward's own
    kernel compiles and runs (Triton's compiler releases the GIL) instead of after it. The
    thread runs the backward's launch code on stand-in outputs with every launch compile-only
    (`launch.compile_only`); the backward waits for it (`_await_ahead`). Failures are
    ignored: the backward then compiles as it always did. FSA_COMPILE_AHEAD=0 turns it off."""
    key = (q.device, q.dtype, q.shape[-1], q.dim(), alpha is None, window_sizes is None,
           seqused_k is None, floats[1] > 0, floats[2] != 0, tuple(flags))
    if key in _AHEAD_SEEN:
        return
    _AHEAD_SEEN.add(key)
    if torch.cuda.is_current_stream_capturing():  # no CUDA work from other threads then
        return

    def work():
        try:
            from .triton.configs import skip_shape
            from .triton.launch import compile_only

            with torch.cuda.device(q.device), compile_only():
                out = torch.empty_like(q)
                lse = q.new_empty(_lse_shape(q, cu_seqlens_q is not None), dtype=torch.float32)
                skip = q.new_empty(skip_shape(q, k, cu_seqlens_q, max_seqlens[0], max_seqlens[1],
                                              floats[1] > 0 or alpha is not None),
                                   dtype=torch.uint8)
                _bwd_impl(out, q, k, v, out, lse, skip, alpha, delta, cu_seqlens_q,
                          cu_seqlens_k, seqused_k, window_sizes, max_seqlens, floats, flags)
        except Exception as e:  # noqa: BLE001 - the backward compiles on its own then
            _AHEAD_ERRORS.append((key, e))

    thread = threading.Thread(target=work, name="fsa-compile-ahead", daemon=True)
    _AHEAD_RUNNING.append(thread)
    thread.start()


def _await_ahead():
    """Wait for the backward compiles that `_compile_ahead` started."""
    while _AHEAD_RUNNING:
        _AHEAD_RUNNING.pop().join()


def attention(q, k, v, alpha, delta, cu_seqlens_q, cu_seqlens_k, seqused_k, page_table,
              window_sizes, max_seqlens, floats, flags):
    """(out, lse, skip) of `fwd`, differentiable in q, k, v, alpha, delta: in eager mode
    (`eager`) the implementation under a plain autograd.Function (or no autograd at all
    when nothing needs a gradient), traced the registered op (`fwd_plain` when every optional
    tensor is None, its shorter schema)."""
    if eager(q, k, v, alpha, delta):
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad
                                        or (alpha is not None and alpha.requires_grad)
                                        or (delta is not None and delta.requires_grad)):
            if _AHEAD_ENABLED and q.is_cuda and page_table is None:
                _compile_ahead(q, k, v, alpha, delta, cu_seqlens_q, cu_seqlens_k, seqused_k,
                               window_sizes, max_seqlens, floats, flags)
            return _EagerAttention.apply(q, k, v, alpha, delta, cu_seqlens_q, cu_seqlens_k,
                                         seqused_k, page_table, window_sizes, max_seqlens,
                                         floats, flags)
        return _fwd_impl(q, k, v, alpha, delta, cu_seqlens_q, cu_seqlens_k, seqused_k,
                         page_table, window_sizes, max_seqlens, floats, flags)
    if (alpha is None and delta is None and cu_seqlens_q is None and seqused_k is None
            and page_table is None and window_sizes is None):
        return attn_fwd_plain(q, k, v, max_seqlens, floats, flags)
    return attn_fwd(q, k, v, alpha, delta, cu_seqlens_q, cu_seqlens_k, seqused_k, page_table,
                    window_sizes, max_seqlens, floats, flags)


# --------------------------------------------------------------------------------------------
# decode
# --------------------------------------------------------------------------------------------
@torch.library.custom_op(
    add_op_namespace_prefix("kv_append"), mutates_args=("k_cache", "v_cache", "delta_cache")
)
def kv_append(
    k_cache: Tensor,
    v_cache: Tensor,
    delta_cache: Optional[Tensor],
    k_new: Tensor,
    v_new: Tensor,
    delta_new: Optional[Tensor],
    page_table: Optional[Tensor],
    cu_seqlens_k: Optional[Tensor],
    seqused_k: Tensor,
) -> None:
    """Write k_new/v_new [B, Hkv, D] (delta_new [B, Hkv]) at position seqused_k[b] of each
    sequence's cache, in place."""
    _kv_append_impl(k_cache, v_cache, delta_cache, k_new, v_new, delta_new, page_table,
                    cu_seqlens_k, seqused_k)


def _kv_append_impl(k_cache, v_cache, delta_cache, k_new, v_new, delta_new, page_table,
                    cu_seqlens_k, seqused_k):
    if use_triton(k_new):
        from .triton.decode import launch_kv_append

        launch_kv_append(k_cache, v_cache, delta_cache, k_new, v_new, delta_new, page_table,
                         cu_seqlens_k, seqused_k)
        return
    reference.kv_append(k_cache, v_cache, delta_cache, k_new, v_new, delta_new,
                        page_table=page_table, cu_seqlens_k=cu_seqlens_k, seqused_k=seqused_k)


@kv_append.register_fake
def _kv_append_fake(*args):
    return None


@torch.library.custom_op(add_op_namespace_prefix("decode"), mutates_args=())
def attn_decode(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    alpha: Optional[Tensor],
    delta_cache: Optional[Tensor],
    page_table: Optional[Tensor],
    cu_seqlens_k: Optional[Tensor],
    seqused_k: Optional[Tensor],
    gather_kv_indices: Optional[Tensor],
    window_sizes: Optional[Tensor],
    max_seqlen_k: int,
    softmax_scale: float,
    softmax_threshold: float,
    gate_threshold: float,
    is_logsigmoid_gate: bool,
    num_splits: int,
    return_codes: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """q [B, H, D] -> (out [B, H, D], lse [B, H] fp32, codes). num_splits <= 0: heuristic.
    codes: the skip codes of SPEC §7, uint8 [B, H, nKB] when return_codes and the call can
    skip (configs.decode_codes_shape), else empty."""
    return _decode_impl(q, k_cache, v_cache, alpha, delta_cache, page_table, cu_seqlens_k,
                        seqused_k, gather_kv_indices, window_sizes, max_seqlen_k, softmax_scale,
                        softmax_threshold, gate_threshold, is_logsigmoid_gate, num_splits,
                        return_codes)


def _decode_impl(q, k_cache, v_cache, alpha, delta_cache, page_table, cu_seqlens_k, seqused_k,
                 gather_kv_indices, window_sizes, max_seqlen_k, softmax_scale, softmax_threshold,
                 gate_threshold, is_logsigmoid_gate, num_splits, return_codes):
    args = dict(
        alpha=alpha, delta_cache=delta_cache, page_table=page_table, cu_seqlens_k=cu_seqlens_k,
        seqused_k=seqused_k, gather_kv_indices=gather_kv_indices, window_sizes=window_sizes,
        max_seqlen_k=max_seqlen_k, softmax_scale=softmax_scale,
        softmax_threshold=softmax_threshold, gate_threshold=gate_threshold,
        is_logsigmoid_gate=is_logsigmoid_gate, return_codes=return_codes,
    )
    if use_triton(q):
        from .triton.decode import launch_attn_decode

        return launch_attn_decode(q, k_cache, v_cache, num_splits=num_splits, **args)
    return reference.decode_forward_op(q, k_cache, v_cache, **args)


@attn_decode.register_fake
def _attn_decode_fake(q, k_cache, v_cache, alpha, delta_cache, page_table, cu_seqlens_k,
                      seqused_k, gather_kv_indices, window_sizes, max_seqlen_k, softmax_scale,
                      softmax_threshold, gate_threshold, is_logsigmoid_gate, num_splits,
                      return_codes):
    from .triton.configs import decode_codes_shape, decode_skips

    skips = return_codes and decode_skips(alpha, gather_kv_indices, window_sizes,
                                          softmax_threshold, gate_threshold)
    return (torch.empty_like(q), q.new_empty((q.shape[0], q.shape[1]), dtype=torch.float32),
            q.new_empty(decode_codes_shape(q, k_cache, page_table, cu_seqlens_k, max_seqlen_k,
                                           skips), dtype=torch.uint8))


def kv_append_entry(k_cache, v_cache, delta_cache, k_new, v_new, delta_new, page_table,
                    cu_seqlens_k, seqused_k) -> None:
    """`kv_append`, without the dispatcher in eager mode (`eager`)."""
    fn = _kv_append_impl if eager(k_cache, v_cache, delta_cache, k_new, v_new) else kv_append
    fn(k_cache, v_cache, delta_cache, k_new, v_new, delta_new, page_table, cu_seqlens_k,
       seqused_k)


def decode(q, k_cache, v_cache, alpha, delta_cache, *rest):
    """`attn_decode` (same arguments), without the dispatcher in eager mode (`eager`)."""
    fn = _decode_impl if eager(q, k_cache, v_cache, alpha, delta_cache) else attn_decode
    return fn(q, k_cache, v_cache, alpha, delta_cache, *rest)
