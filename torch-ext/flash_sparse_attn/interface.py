"""The twelve public functions (names and keywords of upstream flash-sparse-attn 2.0.6).

Each entry point: validate (one function per entry point, `validate.py`), resolve defaults,
call `ops.py`'s entry (the registered op when traced, its implementation in eager mode).
Nothing here launches a kernel directly, so every function traces under
`torch.compile(fullgraph=True)`.

Tuning hints of upstream (`is_split_kv`, `is_split_qo`, `pack_gqa`, `is_autotune`, `tile_mn`,
`skip_checks`) are accepted; they never change results. `skip_checks=True` skips only the
checks that read tensor values (cu_seqlens monotonicity, page-table and gather-index bounds);
the kernels stay in bounds regardless.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from . import ops, validate
from .reference import window_sizes_heuristic

Tensor = torch.Tensor
Out = Union[Tensor, Tuple[Tensor, Tensor]]


def _scale(softmax_scale, head_dim):
    return float(softmax_scale) if softmax_scale is not None else head_dim ** -0.5


def _gate_arg(alpha, gate_threshold) -> float:
    """The ops' gate threshold: None (default) -> -1.0, which the kernels read as
    1 / seqlen_k of each sequence (no specialisation on the length under torch.compile);
    <= 0 -> 0.0 (no gate sparsity)."""
    if alpha is None:
        return 0.0
    if gate_threshold is None:
        return -1.0
    return max(float(gate_threshold), 0.0)


def _default_windows(window_sizes, is_local, seqlen_k, num_kv_heads, device):
    if window_sizes is not None or not is_local:
        return window_sizes
    return window_sizes_heuristic(seqlen_k, num_kv_heads, device)


def _finish(res_out, res_lse, out, lse, return_lse, skip=None):
    if out is not None:
        out.copy_(res_out)
        res_out = out
    if lse is not None:
        lse.copy_(res_lse)
        res_lse = lse
    res = (res_out, res_lse) if return_lse else (res_out,)
    if skip is not None:
        res = res + (skip,)
    return res if len(res) > 1 else res[0]


def block_skip_stats(skip_mask: Tensor) -> dict:
    """Summarise the skip mask returned with `return_skip_mask=True` (SPEC §5.4): counts of
    (query block, key block) pairs visited, kept, skipped by the softmax threshold and by the
    gate threshold, and the skipped fraction of the visited pairs."""
    counts = torch.bincount(skip_mask.flatten().to(torch.int64), minlength=4).tolist()
    visited = counts[1] + counts[2] + counts[3]
    return {"visited": visited, "kept": counts[1], "softmax_skipped": counts[2],
            "gate_skipped": counts[3],
            "skipped_fraction": (counts[2] + counts[3]) / visited if visited else 0.0}


def _attention(query, key, value, alpha, delta, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
               max_seqlen_k, seqused_k, is_causal, softmax_scale, window_sizes, is_local,
               softmax_threshold, gate_threshold, is_logsigmoid_gate, is_adapt_gate, out, lse,
               return_lse, deterministic, return_skip_mask=False, page_table=None,
               num_splits=None):
    is_varlen = cu_seqlens_q is not None
    num_kv_heads = key.shape[-2]
    if not is_varlen:
        max_seqlen_q, max_seqlen_k = query.shape[1], key.shape[1]
        if page_table is not None:  # the capacity of a sequence
            max_seqlen_k = page_table.shape[1] * key.shape[1]
    window_sizes = _default_windows(window_sizes, is_local, max_seqlen_k, num_kv_heads,
                                    query.device)
    scalars = ops.scalar_args(int(max_seqlen_q), int(max_seqlen_k),
                              _scale(softmax_scale, query.shape[-1]), bool(is_causal),
                              float(softmax_threshold or 0.0), _gate_arg(alpha, gate_threshold),
                              bool(is_logsigmoid_gate), bool(is_adapt_gate), bool(deterministic),
                              int(num_splits or 0))
    o, l, skip = ops.attention(query, key, value, alpha, delta, cu_seqlens_q, cu_seqlens_k,
                               seqused_k, page_table, window_sizes, *scalars)
    return _finish(o, l, out, lse, return_lse, skip if return_skip_mask else None)


def _decode(query, key, value, alpha, delta, cu_seqlens_k, max_seqlen_k, seqused_k, page_table,
            gather_kv_indices, k_new, v_new, delta_new, softmax_scale, window_sizes, is_local,
            softmax_threshold, gate_threshold, is_logsigmoid_gate, num_splits, out, lse,
            return_lse, return_skip_mask=False):
    if k_new is not None:
        ops.kv_append_entry(key, value, delta, k_new, v_new, delta_new, page_table,
                            cu_seqlens_k, seqused_k)
        seqused_k = seqused_k + 1
    if cu_seqlens_k is None:
        if page_table is not None:
            max_seqlen_k = page_table.shape[1] * key.shape[1]
        else:
            max_seqlen_k = key.shape[1]
    window_sizes = _default_windows(window_sizes, is_local, max_seqlen_k, key.shape[-2],
                                    query.device)
    o, l, codes = ops.decode(
        query, key, value, alpha, delta, page_table, cu_seqlens_k, seqused_k, gather_kv_indices,
        window_sizes, int(max_seqlen_k), _scale(softmax_scale, query.shape[-1]),
        float(softmax_threshold or 0.0), _gate_arg(alpha, gate_threshold), bool(is_logsigmoid_gate),
        int(num_splits or 0), bool(return_skip_mask),
    )
    return _finish(o, l, out, lse, return_lse, codes if return_skip_mask else None)


# ------------------------------------------------------------------------------------------
# batched
# ------------------------------------------------------------------------------------------
def flash_dense_attn_func(
    query: Tensor, key: Tensor, value: Tensor, is_causal: bool = False,
    softmax_scale: Optional[float] = None, query_scale: Optional[Tensor] = None,
    key_scale: Optional[Tensor] = None, value_scale: Optional[Tensor] = None,
    window_sizes: Optional[Tensor] = None, is_local: bool = False, is_quant: bool = False,
    is_split_kv: bool = False, is_split_qo: bool = False, pack_gqa: bool = False,
    out: Optional[Tensor] = None, lse: Optional[Tensor] = None, is_autotune: bool = False,
    skip_checks: bool = False, return_lse: bool = False, deterministic: bool = False, *,
    seqused_k: Optional[Tensor] = None, page_table: Optional[Tensor] = None,
    num_splits: Optional[int] = None,
) -> Out:
    """Dense attention. query [B, Sq, H, D], key/value [B, Sk, Hkv, D] -> out [B, Sq, H, D]
    (and lse [B, H, Sq] fp32 with return_lse=True). Chunked prefill over a paged cache:
    key/value [num_pages, page_size, Hkv, D] with page_table int32 [B, max_pages] (forward
    only); seqused_k int32 [B]: keys in use, the queries aligned to their end. num_splits:
    split-KV (each query tile's keys shared by that many programs, merged exactly; None or
    0 = the heuristic of configs.fwd_num_splits, 1 = no split; calls that skip blocks never
    split, and > 1 moves a call off the Gluon path); it changes speed and rounding, never
    the result beyond that."""
    validate.check_attn_func(
        "dense", query, key, value, None, None, softmax_scale, window_sizes, None, None,
        is_quant, out, lse, seqused_k, page_table, num_splits, skip_checks,
    )
    return _attention(query, key, value, None, None, None, None, None, None, seqused_k,
                      is_causal,
                      softmax_scale, window_sizes, is_local or window_sizes is not None, 0.0,
                      None, True, False, out, lse, return_lse, deterministic,
                      page_table=page_table,
                      num_splits=num_splits)


def flash_sparse_attn_func(
    query: Tensor, key: Tensor, value: Tensor, is_causal: bool = False,
    softmax_scale: Optional[float] = None, query_scale: Optional[Tensor] = None,
    key_scale: Optional[Tensor] = None, value_scale: Optional[Tensor] = None,
    window_sizes: Optional[Tensor] = None, softmax_threshold: Optional[float] = 1.0,
    is_local: bool = False, is_quant: bool = False, is_split_kv: bool = False,
    is_split_qo: bool = False, pack_gqa: bool = False, out: Optional[Tensor] = None,
    lse: Optional[Tensor] = None, is_autotune: bool = False, skip_checks: bool = False,
    return_lse: bool = False, deterministic: bool = False,
    return_skip_mask: bool = False, *,
    seqused_k: Optional[Tensor] = None, page_table: Optional[Tensor] = None,
    num_splits: Optional[int] = None,
) -> Out:
    """Sparse attention: drops key blocks whose probability is provably below
    softmax_threshold / visible_len (SPEC §5). Shapes (paged caches too) as
    flash_dense_attn_func.
    `return_skip_mask=True` also returns the block decisions [B, H, nQB, nKB] uint8
    (0 not visited, 1 kept, 2 softmax skip, 3 gate skip); see `block_skip_stats`."""
    softmax_threshold = 1.0 if softmax_threshold is None else softmax_threshold
    validate.check_attn_func(
        "sparse", query, key, value, None, None, softmax_scale, window_sizes,
        softmax_threshold, None, is_quant, out, lse, seqused_k, page_table, num_splits,
        skip_checks,
    )
    return _attention(query, key, value, None, None, None, None, None, None, seqused_k,
                      is_causal, softmax_scale, window_sizes,
                      is_local or window_sizes is not None, softmax_threshold, None, True, False,
                      out, lse, return_lse, deterministic, return_skip_mask=return_skip_mask,
                      page_table=page_table,
                      num_splits=num_splits)


def flash_gated_attn_func(
    query: Tensor, key: Tensor, value: Tensor, alpha: Tensor, delta: Tensor,
    is_causal: bool = False, softmax_scale: Optional[float] = None,
    query_scale: Optional[Tensor] = None, key_scale: Optional[Tensor] = None,
    value_scale: Optional[Tensor] = None, window_sizes: Optional[Tensor] = None,
    softmax_threshold: Optional[float] = None, gate_threshold: Optional[float] = None,
    is_logsigmoid_gate: bool = True, is_adapt_gate: bool = True, is_local: bool = False,
    is_quant: bool = False, is_split_kv: bool = False, is_split_qo: bool = False,
    pack_gqa: bool = False, out: Optional[Tensor] = None, lse: Optional[Tensor] = None,
    is_autotune: bool = False, skip_checks: bool = False, return_lse: bool = False,
    deterministic: bool = False,
    return_skip_mask: bool = False, *,
    seqused_k: Optional[Tensor] = None, page_table: Optional[Tensor] = None,
    num_splits: Optional[int] = None,
) -> Out:
    """Gated attention: score = scale * (q.k + g(alpha_i * delta_j)) (SPEC §6).
    alpha [B, H, Sq], delta [B, Hkv, Sk] (any strides; paged cache: [num_pages, page_size,
    Hkv]). seqused_k, page_table, num_splits as flash_dense_attn_func."""
    validate.check_attn_func(
        "gated", query, key, value, alpha, delta, softmax_scale, window_sizes,
        softmax_threshold, gate_threshold, is_quant, out, lse, seqused_k, page_table,
        num_splits, skip_checks,
    )
    return _attention(query, key, value, alpha, delta, None, None, None, None, seqused_k,
                      is_causal, softmax_scale, window_sizes,
                      is_local or window_sizes is not None, softmax_threshold, gate_threshold,
                      is_logsigmoid_gate, is_adapt_gate, out, lse, return_lse, deterministic,
                      return_skip_mask=return_skip_mask, page_table=page_table,
                      num_splits=num_splits)


# ------------------------------------------------------------------------------------------
# varlen
# ------------------------------------------------------------------------------------------
def flash_dense_attn_varlen_func(
    query: Tensor, key: Tensor, value: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
    max_seqlen_q: int, max_seqlen_k: int, is_causal: bool = False,
    softmax_scale: Optional[float] = None, query_scale: Optional[Tensor] = None,
    key_scale: Optional[Tensor] = None, value_scale: Optional[Tensor] = None,
    window_sizes: Optional[Tensor] = None, is_local: bool = False, is_quant: bool = False,
    is_split_kv: bool = False, is_split_qo: bool = False, pack_gqa: bool = False,
    seqused_q: Optional[Tensor] = None, seqused_k: Optional[Tensor] = None,
    out: Optional[Tensor] = None, lse: Optional[Tensor] = None, is_autotune: bool = False,
    skip_checks: bool = False, return_lse: bool = False, deterministic: bool = False, *,
    page_table: Optional[Tensor] = None, num_splits: Optional[int] = None,
) -> Out:
    """Dense varlen attention. query [total_q, H, D], key/value [total_k, Hkv, D],
    cu_seqlens_q/k int32 [B+1] -> out [total_q, H, D] (lse [H, total_q]). With page_table
    [B, max_pages] (forward only) key/value are a paged cache [num_pages, page_size, Hkv, D]:
    sequence b's keys are positions [0, cu_seqlens_k[b+1] - cu_seqlens_k[b]) (or
    seqused_k[b]) of its pages."""
    validate.check_attn_varlen_func(
        "dense", query, key, value, None, None, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
        max_seqlen_k, seqused_q, seqused_k, softmax_scale, window_sizes, None, None, is_quant,
        out, lse, skip_checks, page_table, num_splits,
    )
    return _attention(query, key, value, None, None, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                      max_seqlen_k, seqused_k, is_causal, softmax_scale, window_sizes,
                      is_local or window_sizes is not None, 0.0, None, True, False, out, lse,
                      return_lse, deterministic, page_table=page_table,
                      num_splits=num_splits)


def flash_sparse_attn_varlen_func(
    query: Tensor, key: Tensor, value: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
    max_seqlen_q: int, max_seqlen_k: int, is_causal: bool = False,
    softmax_scale: Optional[float] = None, query_scale: Optional[Tensor] = None,
    key_scale: Optional[Tensor] = None, value_scale: Optional[Tensor] = None,
    window_sizes: Optional[Tensor] = None, softmax_threshold: Optional[float] = 1.0,
    is_local: bool = False, is_quant: bool = False, is_split_kv: bool = False,
    is_split_qo: bool = False, pack_gqa: bool = False, seqused_q: Optional[Tensor] = None,
    seqused_k: Optional[Tensor] = None, out: Optional[Tensor] = None,
    lse: Optional[Tensor] = None, is_autotune: bool = False, skip_checks: bool = False,
    return_lse: bool = False, deterministic: bool = False,
    return_skip_mask: bool = False, *,
    page_table: Optional[Tensor] = None, num_splits: Optional[int] = None,
) -> Out:
    """Sparse varlen attention (SPEC §5). Shapes as flash_dense_attn_varlen_func."""
    softmax_threshold = 1.0 if softmax_threshold is None else softmax_threshold
    validate.check_attn_varlen_func(
        "sparse", query, key, value, None, None, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
        max_seqlen_k, seqused_q, seqused_k, softmax_scale, window_sizes, softmax_threshold,
        None, is_quant, out, lse, skip_checks, page_table, num_splits,
    )
    return _attention(query, key, value, None, None, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                      max_seqlen_k, seqused_k, is_causal, softmax_scale, window_sizes,
                      is_local or window_sizes is not None, softmax_threshold, None, True,
                      False, out, lse, return_lse, deterministic,
                      return_skip_mask=return_skip_mask, page_table=page_table,
                      num_splits=num_splits)


def flash_gated_attn_varlen_func(
    query: Tensor, key: Tensor, value: Tensor, alpha: Tensor, delta: Tensor,
    cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int,
    is_causal: bool = False, softmax_scale: Optional[float] = None,
    query_scale: Optional[Tensor] = None, key_scale: Optional[Tensor] = None,
    value_scale: Optional[Tensor] = None, window_sizes: Optional[Tensor] = None,
    softmax_threshold: Optional[float] = None, gate_threshold: Optional[float] = None,
    is_logsigmoid_gate: bool = True, is_adapt_gate: bool = True, is_local: bool = False,
    is_quant: bool = False, is_split_kv: bool = False, is_split_qo: bool = False,
    pack_gqa: bool = False, seqused_q: Optional[Tensor] = None,
    seqused_k: Optional[Tensor] = None, out: Optional[Tensor] = None,
    lse: Optional[Tensor] = None, is_autotune: bool = False, skip_checks: bool = False,
    return_lse: bool = False, deterministic: bool = False,
    return_skip_mask: bool = False, *,
    page_table: Optional[Tensor] = None, num_splits: Optional[int] = None,
) -> Out:
    """Gated varlen attention (SPEC §6). alpha [H, total_q], delta [Hkv, total_k]."""
    validate.check_attn_varlen_func(
        "gated", query, key, value, alpha, delta, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
        max_seqlen_k, seqused_q, seqused_k, softmax_scale, window_sizes, softmax_threshold,
        gate_threshold, is_quant, out, lse, skip_checks, page_table, num_splits,
    )
    return _attention(query, key, value, alpha, delta, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                      max_seqlen_k, seqused_k, is_causal, softmax_scale, window_sizes,
                      is_local or window_sizes is not None, softmax_threshold, gate_threshold,
                      is_logsigmoid_gate, is_adapt_gate, out, lse, return_lse, deterministic,
                      return_skip_mask=return_skip_mask, page_table=page_table,
                      num_splits=num_splits)


# ------------------------------------------------------------------------------------------
# decode over KV caches
# ------------------------------------------------------------------------------------------
def flash_dense_attn_with_kvcache_func(
    query: Tensor, key: Tensor, value: Tensor, softmax_scale: Optional[float] = None,
    query_scale: Optional[Tensor] = None, key_scale: Optional[Tensor] = None,
    value_scale: Optional[Tensor] = None, window_sizes: Optional[Tensor] = None,
    is_local: bool = False, is_quant: bool = False, out: Optional[Tensor] = None,
    lse: Optional[Tensor] = None, is_autotune: bool = False, skip_checks: bool = False,
    return_lse: bool = False, *, seqused_k: Optional[Tensor] = None,
    page_table: Optional[Tensor] = None, k_new: Optional[Tensor] = None,
    v_new: Optional[Tensor] = None, gather_kv_indices: Optional[Tensor] = None,
    num_splits: Optional[int] = None, return_skip_mask: bool = False,
) -> Out:
    """Decode: query [B, H, D] over key/value caches [B, Sk, Hkv, D] (or paged
    [num_pages, page_size, Hkv, D] with page_table [B, max_pages]). k_new/v_new [B, Hkv, D]
    are written at seqused_k[b] before attending. -> out [B, H, D] (lse [B, H]).
    The sparse and gated variants drop 64-key blocks of plain caches (SPEC §7);
    `return_skip_mask=True` also returns their codes [B, H, nKB] uint8 (empty when the call
    cannot skip), which `block_skip_stats` counts."""
    validate.check_attn_with_kvcache_func(
        "dense", query, key, value, None, None, None, None, seqused_k, page_table, k_new, v_new,
        None, gather_kv_indices, softmax_scale, window_sizes, None, None, num_splits, is_quant,
        out, lse, skip_checks,
    )
    return _decode(query, key, value, None, None, None, None, seqused_k, page_table,
                   gather_kv_indices, k_new, v_new, None, softmax_scale, window_sizes,
                   is_local or window_sizes is not None, 0.0, None, True, num_splits, out, lse,
                   return_lse, return_skip_mask)


def flash_sparse_attn_with_kvcache_func(
    query: Tensor, key: Tensor, value: Tensor, softmax_scale: Optional[float] = None,
    softmax_threshold: Optional[float] = 1.0, query_scale: Optional[Tensor] = None,
    key_scale: Optional[Tensor] = None, value_scale: Optional[Tensor] = None,
    window_sizes: Optional[Tensor] = None, is_local: bool = False, is_quant: bool = False,
    out: Optional[Tensor] = None, lse: Optional[Tensor] = None, is_autotune: bool = False,
    skip_checks: bool = False, return_lse: bool = False, *,
    seqused_k: Optional[Tensor] = None, page_table: Optional[Tensor] = None,
    k_new: Optional[Tensor] = None, v_new: Optional[Tensor] = None,
    gather_kv_indices: Optional[Tensor] = None, num_splits: Optional[int] = None,
    return_skip_mask: bool = False,
) -> Out:
    """Sparse decode (SPEC §5, §7). Shapes as flash_dense_attn_with_kvcache_func."""
    softmax_threshold = 1.0 if softmax_threshold is None else softmax_threshold
    validate.check_attn_with_kvcache_func(
        "sparse", query, key, value, None, None, None, None, seqused_k, page_table, k_new,
        v_new, None, gather_kv_indices, softmax_scale, window_sizes, softmax_threshold, None,
        num_splits, is_quant, out, lse, skip_checks,
    )
    return _decode(query, key, value, None, None, None, None, seqused_k, page_table,
                   gather_kv_indices, k_new, v_new, None, softmax_scale, window_sizes,
                   is_local or window_sizes is not None, softmax_threshold, None, True,
                   num_splits, out, lse, return_lse,
                   return_skip_mask)


def flash_gated_attn_with_kvcache_func(
    query: Tensor, key: Tensor, value: Tensor, alpha: Tensor, delta: Tensor,
    softmax_scale: Optional[float] = None, softmax_threshold: Optional[float] = None,
    gate_threshold: Optional[float] = None, is_logsigmoid_gate: bool = True,
    query_scale: Optional[Tensor] = None, key_scale: Optional[Tensor] = None,
    value_scale: Optional[Tensor] = None, window_sizes: Optional[Tensor] = None,
    is_local: bool = False, is_quant: bool = False, out: Optional[Tensor] = None,
    lse: Optional[Tensor] = None, is_autotune: bool = False, skip_checks: bool = False,
    return_lse: bool = False, *, seqused_k: Optional[Tensor] = None,
    page_table: Optional[Tensor] = None, k_new: Optional[Tensor] = None,
    v_new: Optional[Tensor] = None, delta_new: Optional[Tensor] = None,
    gather_kv_indices: Optional[Tensor] = None, num_splits: Optional[int] = None,
    return_skip_mask: bool = False,
) -> Out:
    """Gated decode (SPEC §6, §7). alpha [B, H]; delta cache [B, Hkv, Sk]
    (paged: [num_pages, page_size, Hkv]); delta_new [B, Hkv]."""
    validate.check_attn_with_kvcache_func(
        "gated", query, key, value, alpha, delta, None, None, seqused_k, page_table, k_new,
        v_new, delta_new, gather_kv_indices, softmax_scale, window_sizes, softmax_threshold,
        gate_threshold, num_splits, is_quant, out, lse, skip_checks,
    )
    return _decode(query, key, value, alpha, delta, None, None, seqused_k, page_table,
                   gather_kv_indices, k_new, v_new, delta_new, softmax_scale, window_sizes,
                   is_local or window_sizes is not None, softmax_threshold, gate_threshold,
                   is_logsigmoid_gate, num_splits, out, lse, return_lse,
                   return_skip_mask)


def flash_dense_attn_varlen_with_kvcache_func(
    query: Tensor, key: Tensor, value: Tensor, cu_seqlens_k: Tensor, max_seqlen_k: int,
    softmax_scale: Optional[float] = None, query_scale: Optional[Tensor] = None,
    key_scale: Optional[Tensor] = None, value_scale: Optional[Tensor] = None,
    window_sizes: Optional[Tensor] = None, is_local: bool = False, is_quant: bool = False,
    seqused_k: Optional[Tensor] = None, out: Optional[Tensor] = None,
    lse: Optional[Tensor] = None, is_autotune: bool = False, skip_checks: bool = False,
    return_lse: bool = False, *, k_new: Optional[Tensor] = None, v_new: Optional[Tensor] = None,
    gather_kv_indices: Optional[Tensor] = None, num_splits: Optional[int] = None,
    return_skip_mask: bool = False,
) -> Out:
    """Decode over packed caches: query [B, H, D], key/value [total_k, Hkv, D] with
    cu_seqlens_k [B+1]; sequence b owns rows cu_seqlens_k[b]:cu_seqlens_k[b+1]."""
    validate.check_attn_with_kvcache_func(
        "dense", query, key, value, None, None, cu_seqlens_k, max_seqlen_k, seqused_k, None,
        k_new, v_new, None, gather_kv_indices, softmax_scale, window_sizes, None, None,
        num_splits, is_quant, out, lse, skip_checks,
    )
    return _decode(query, key, value, None, None, cu_seqlens_k, max_seqlen_k, seqused_k, None,
                   gather_kv_indices, k_new, v_new, None, softmax_scale, window_sizes,
                   is_local or window_sizes is not None, 0.0, None, True, num_splits, out, lse,
                   return_lse, return_skip_mask)


def flash_sparse_attn_varlen_with_kvcache_func(
    query: Tensor, key: Tensor, value: Tensor, cu_seqlens_k: Tensor, max_seqlen_k: int,
    softmax_scale: Optional[float] = None, softmax_threshold: Optional[float] = 1.0,
    query_scale: Optional[Tensor] = None, key_scale: Optional[Tensor] = None,
    value_scale: Optional[Tensor] = None, window_sizes: Optional[Tensor] = None,
    is_local: bool = False, is_quant: bool = False, seqused_k: Optional[Tensor] = None,
    out: Optional[Tensor] = None, lse: Optional[Tensor] = None, is_autotune: bool = False,
    skip_checks: bool = False, return_lse: bool = False, *, k_new: Optional[Tensor] = None,
    v_new: Optional[Tensor] = None, gather_kv_indices: Optional[Tensor] = None,
    num_splits: Optional[int] = None, return_skip_mask: bool = False,
) -> Out:
    """Sparse decode over packed caches. Shapes as flash_dense_attn_varlen_with_kvcache_func."""
    softmax_threshold = 1.0 if softmax_threshold is None else softmax_threshold
    validate.check_attn_with_kvcache_func(
        "sparse", query, key, value, None, None, cu_seqlens_k, max_seqlen_k, seqused_k, None,
        k_new, v_new, None, gather_kv_indices, softmax_scale, window_sizes, softmax_threshold,
        None, num_splits, is_quant, out, lse, skip_checks,
    )
    return _decode(query, key, value, None, None, cu_seqlens_k, max_seqlen_k, seqused_k, None,
                   gather_kv_indices, k_new, v_new, None, softmax_scale, window_sizes,
                   is_local or window_sizes is not None, softmax_threshold, None, True,
                   num_splits, out, lse, return_lse,
                   return_skip_mask)


def flash_gated_attn_varlen_with_kvcache_func(
    query: Tensor, key: Tensor, value: Tensor, alpha: Tensor, delta: Tensor,
    cu_seqlens_k: Tensor, max_seqlen_k: int, softmax_scale: Optional[float] = None,
    softmax_threshold: Optional[float] = None, gate_threshold: Optional[float] = None,
    is_logsigmoid_gate: bool = True, query_scale: Optional[Tensor] = None,
    key_scale: Optional[Tensor] = None, value_scale: Optional[Tensor] = None,
    window_sizes: Optional[Tensor] = None, is_local: bool = False, is_quant: bool = False,
    seqused_k: Optional[Tensor] = None, out: Optional[Tensor] = None,
    lse: Optional[Tensor] = None, is_autotune: bool = False, skip_checks: bool = False,
    return_lse: bool = False, *, k_new: Optional[Tensor] = None, v_new: Optional[Tensor] = None,
    delta_new: Optional[Tensor] = None, gather_kv_indices: Optional[Tensor] = None,
    num_splits: Optional[int] = None, return_skip_mask: bool = False,
) -> Out:
    """Gated decode over packed caches. alpha [B, H], delta [Hkv, total_k]."""
    validate.check_attn_with_kvcache_func(
        "gated", query, key, value, alpha, delta, cu_seqlens_k, max_seqlen_k, seqused_k, None,
        k_new, v_new, delta_new, gather_kv_indices, softmax_scale, window_sizes,
        softmax_threshold, gate_threshold, num_splits, is_quant, out, lse, skip_checks,
    )
    return _decode(query, key, value, alpha, delta, cu_seqlens_k, max_seqlen_k, seqused_k, None,
                   gather_kv_indices, k_new, v_new, delta_new, softmax_scale, window_sizes,
                   is_local or window_sizes is not None, softmax_threshold, gate_threshold,
                   is_logsigmoid_gate, num_splits, out, lse, return_lse,
                   return_skip_mask)
