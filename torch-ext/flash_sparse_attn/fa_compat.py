"""FlashAttention-compatible entry points, and attention functions for `transformers`.

`flash_attn_func` / `flash_attn_varlen_func` / `flash_attn_with_kvcache` take FlashAttention 2's
arguments and run this package's dense attention, so code written for `flash_attn` (and
`transformers`, which loads `attn_implementation="<org>/flash-sparse-attn"` through exactly these
names: without `flash_attn_with_kvcache` its continuous batching warns that the kernel "does
not support block tables") runs unchanged.
A FlashAttention feature that has no exact equivalent here raises `ValueError` instead of being
approximated: `dropout_p > 0`, `softcap`, `alibi_slopes`, attention sinks (`s_aux`), and
windows that let a query see keys after its own position. `flash_attn_varlen_func` takes a
paged KV cache as FlashAttention does (`block_table [B, max_blocks]`, k/v
`[num_blocks, block_size, Hkv, D]`, `cu_seqlens_k` giving each sequence's key count; forward
only, block sizes a multiple of 16).

Windows. FlashAttention's `window_size=(left, right)` lets query `i` see key `j` when
`-right <= dist <= left`, `dist = i + Sk - Sq - j` (-1 = unbounded; `causal=True` forces
`right = 0`). This package's flex windows (SPEC §3) only ever see `dist >= 0`, so:
- `right == 0` (or `causal=True`), `left == -1`  -> causal attention;
- `right == 0` (or `causal=True`), `left >= 0`   -> window_sizes `[sink 0, left 0, right 0,
  near left + 1]` for every KV head: visible iff `0 <= dist <= left`, exactly FlashAttention's set;
- `(-1, -1)` without `causal`                   -> full (non-causal) attention;
- anything else sees keys with `dist < 0` and raises, except when every query sits at the end
  of the keys (`Sq == 1`, decoding), where `dist >= 0` for every key and `right` cannot matter.

`dense_attention_forward`, `sparse_attention_forward` and `gated_attention_forward` have the
signature of a `transformers` attention function (`AttentionInterface`): `(module, query, key,
value, attention_mask, scaling=None, dropout=0.0, sliding_window=None, softcap=None, **kwargs)`
with `[B, H, S, D]` tensors and a 2-D padding mask (FlashAttention's mask convention) or None.
`register_transformers_attention()` registers them as `fsa_dense`, `fsa_sparse`, `fsa_gated`
so that `attn_implementation="fsa_sparse"` works.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from . import interface

Tensor = torch.Tensor

TRANSFORMERS_NAMES = {"dense": "fsa_dense", "sparse": "fsa_sparse", "gated": "fsa_gated"}


# ------------------------------------------------------------------------------------------
# argument mapping
# ------------------------------------------------------------------------------------------
def _unsupported(fn: str, dropout_p, softcap, alibi_slopes, s_aux=None):
    if dropout_p is not None and float(dropout_p) != 0.0:
        raise ValueError(f"{fn}: dropout_p={dropout_p} is not supported; expected 0.0 "
                         "(flash-sparse-attn has no attention dropout)")
    if softcap is not None and float(softcap) != 0.0:
        raise ValueError(f"{fn}: softcap={softcap} is not supported; expected 0.0 "
                         "(flash-sparse-attn has no logit soft-capping)")
    if alibi_slopes is not None:
        raise ValueError(f"{fn}: alibi_slopes is not supported; expected None")
    if s_aux is not None:
        raise ValueError(f"{fn}: s_aux (attention sinks) is not supported; expected None")


def _window_args(fn: str, window_size, causal: bool, num_kv_heads: int, single_query: bool,
                 device) -> Tuple[bool, Optional[Tensor]]:
    """FlashAttention (causal, window_size) -> (is_causal, window_sizes or None); raises where
    no exact equivalent exists (see the module docstring)."""
    if window_size is None:
        window_size = (-1, -1)
    try:
        left, right = (int(w) for w in window_size)
    except (TypeError, ValueError):
        raise TypeError(f"{fn}: window_size must be a pair of ints (left, right), got "
                        f"{window_size!r}") from None
    if left < -1 or right < -1:
        raise ValueError(f"{fn}: window_size entries must be >= -1, got {window_size!r}")
    if causal or single_query:
        # causal clips the right side to 0; a lone query at the end of the keys has no key to
        # its right (dist >= 0 for every key), so there `right` cannot change the result.
        right = 0
    if right != 0:
        if left == -1 and right == -1:
            return False, None
        raise ValueError(
            f"{fn}: window_size={tuple(window_size)} with causal={causal} lets queries see keys "
            "after their own position, which flash-sparse-attn windows cannot express; "
            "supported: causal=True, or window_size=(left, 0), or (-1, -1)")
    if left == -1:
        return True, None
    windows = torch.tensor([[0, 0, 0, left + 1]], dtype=torch.int32, device=device)
    return True, windows.expand(num_kv_heads, 4).contiguous()


def _as_int(x) -> int:
    return int(x.item()) if isinstance(x, Tensor) else int(x)


def _as_cu(cu: Tensor) -> Tensor:
    return cu if cu.dtype == torch.int32 else cu.to(torch.int32)


def _result(res, return_attn_probs: bool):
    out, lse = res
    return (out, lse, None) if return_attn_probs else out


# ------------------------------------------------------------------------------------------
# FlashAttention 2 signatures
# ------------------------------------------------------------------------------------------
def flash_attn_func(
    q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None, causal: bool = False,
    window_size: Sequence[int] = (-1, -1), softcap: float = 0.0,
    alibi_slopes: Optional[Tensor] = None, deterministic: bool = False,
    return_attn_probs: bool = False, s_aux: Optional[Tensor] = None,
):
    """FlashAttention's `flash_attn_func` on dense attention: q [B, Sq, H, D], k/v
    [B, Sk, Hkv, D] -> out [B, Sq, H, D]; with `return_attn_probs=True`, (out, lse [B, H, Sq],
    None) (no probabilities are materialised)."""
    fn = "flash_attn_func"
    _unsupported(fn, dropout_p, softcap, alibi_slopes, s_aux)
    is_causal, windows = _window_args(fn, window_size, causal, k.shape[-2], q.shape[1] == 1,
                                      q.device)
    res = interface.flash_dense_attn_func(
        q, k, v, is_causal=is_causal, softmax_scale=softmax_scale, window_sizes=windows,
        deterministic=deterministic, return_lse=True)
    return _result(res, return_attn_probs)


def flash_attn_varlen_func(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
    max_seqlen_q: int, max_seqlen_k: int, dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None, causal: bool = False,
    window_size: Sequence[int] = (-1, -1), softcap: float = 0.0,
    alibi_slopes: Optional[Tensor] = None, deterministic: bool = False,
    return_attn_probs: bool = False, block_table: Optional[Tensor] = None,
    s_aux: Optional[Tensor] = None,
):
    """FlashAttention's `flash_attn_varlen_func` on dense attention: q [total_q, H, D], k/v
    [total_k, Hkv, D], cu_seqlens_q/k [B+1] (int64 is converted to int32) -> out
    [total_q, H, D]; with `return_attn_probs=True`, (out, lse [H, total_q], None). With
    block_table [B, max_blocks] (int64 converted too), k/v are a paged cache
    [num_blocks, block_size, Hkv, D] (forward only)."""
    fn = "flash_attn_varlen_func"
    _unsupported(fn, dropout_p, softcap, alibi_slopes, s_aux)
    max_seqlen_q, max_seqlen_k = _as_int(max_seqlen_q), _as_int(max_seqlen_k)
    is_causal, windows = _window_args(fn, window_size, causal, k.shape[-2], max_seqlen_q == 1,
                                      q.device)
    res = interface.flash_dense_attn_varlen_func(
        q, k, v, _as_cu(cu_seqlens_q), _as_cu(cu_seqlens_k), max_seqlen_q, max_seqlen_k,
        is_causal=is_causal, softmax_scale=softmax_scale, window_sizes=windows,
        deterministic=deterministic, return_lse=True,
        page_table=None if block_table is None else _as_cu(block_table))
    return _result(res, return_attn_probs)


def flash_attn_with_kvcache(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, k: Optional[Tensor] = None,
    v: Optional[Tensor] = None, rotary_cos: Optional[Tensor] = None,
    rotary_sin: Optional[Tensor] = None, cache_seqlens=None,
    cache_batch_idx: Optional[Tensor] = None, cache_leftpad: Optional[Tensor] = None,
    block_table: Optional[Tensor] = None, softmax_scale: Optional[float] = None,
    causal: bool = False, window_size: Sequence[int] = (-1, -1), softcap: float = 0.0,
    rotary_interleaved: bool = True, alibi_slopes: Optional[Tensor] = None,
    num_splits: int = 0, return_softmax_lse: bool = False,
):
    """FlashAttention's `flash_attn_with_kvcache` on dense attention: q [B, Sq, H, D] over
    k_cache/v_cache [B, S_cache, Hkv, D], or a paged cache [num_blocks, block_size, Hkv, D]
    with block_table [B, max_blocks] (block size a multiple of 16). cache_seqlens (int or [B])
    counts each sequence's cached keys (default: all of them); k/v [B, S_new, Hkv, D], when
    given, are written into the cache in place at positions cache_seqlens[b] .. + S_new - 1,
    then q attends over keys [0, cache_seqlens[b] + S_new), aligned to their end (causal).
    -> out [B, Sq, H, D]; with return_softmax_lse=True, (out, lse [B, H, Sq]). Rotary
    embedding, cache_batch_idx, cache_leftpad, softcap and alibi_slopes raise ValueError.
    A single new token with a single query (decoding) takes the fused append of the decode
    kernel; anything else appends with torch indexing, which checks that the new keys fit."""
    fn = "flash_attn_with_kvcache"
    _unsupported(fn, 0.0, softcap, alibi_slopes)
    for name, val in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin),
                      ("cache_batch_idx", cache_batch_idx), ("cache_leftpad", cache_leftpad)):
        if val is not None:
            raise ValueError(f"{fn}: {name} is not supported; expected None")
    if not isinstance(q, Tensor) or q.dim() != 4:
        raise ValueError(f"{fn}: q must be a [B, Sq, H, D] tensor, got "
                         f"{tuple(q.shape) if isinstance(q, Tensor) else type(q).__name__}")
    if (k is None) != (v is None):
        raise ValueError(f"{fn}: k and v must be given together (the new keys and values)")
    batch, seqlen_q = q.shape[:2]
    if not isinstance(k_cache, Tensor) or k_cache.dim() != 4:
        raise ValueError(f"{fn}: k_cache must be a [B, S_cache, Hkv, D] (or paged "
                         "[num_blocks, block_size, Hkv, D]) tensor")
    if block_table is not None:
        block_table = _as_cu(block_table)
        capacity = block_table.shape[-1] * k_cache.shape[1] if block_table.dim() == 2 else 0
    else:
        capacity = k_cache.shape[1]
    if cache_seqlens is None:
        lens = torch.full((batch,), capacity, dtype=torch.int32, device=q.device)
    elif isinstance(cache_seqlens, Tensor):
        lens = _as_cu(cache_seqlens.reshape(-1))
    else:
        lens = torch.full((batch,), int(cache_seqlens), dtype=torch.int32, device=q.device)
    is_causal, windows = _window_args(fn, window_size, causal, k_cache.shape[-2],
                                      seqlen_q == 1, q.device)
    if seqlen_q == 1 and (k is None or k.dim() == 4 and k.shape[1] == 1):
        # decoding: the decode kernel (fused append of the one new token)
        res = interface.flash_dense_attn_with_kvcache_func(
            q[:, 0], k_cache, v_cache, softmax_scale=softmax_scale, window_sizes=windows,
            return_lse=True, seqused_k=lens, page_table=block_table,
            k_new=None if k is None else k[:, 0], v_new=None if v is None else v[:, 0],
            num_splits=int(num_splits) or None)
        out, lse = res[0][:, None], res[1][..., None]
    else:
        if k is not None:
            lens = _append_to_cache(fn, k_cache, v_cache, k, v, lens, block_table, capacity)
        out, lse = interface.flash_dense_attn_func(
            q, k_cache, v_cache, is_causal=is_causal, softmax_scale=softmax_scale,
            window_sizes=windows, return_lse=True, seqused_k=lens, page_table=block_table,
            num_splits=int(num_splits) or None)
    return (out, lse) if return_softmax_lse else out


def _append_to_cache(fn: str, k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor,
                     lens: Tensor, block_table: Optional[Tensor], capacity: int) -> Tensor:
    """Write k/v [B, S_new, Hkv, D] into the cache at positions lens[b] + [0, S_new) (through
    block_table when paged); returns the new lengths. Raises when a sequence would overflow."""
    if k.dim() != 4 or k.shape != v.shape or k.shape[0] != lens.shape[0] or \
            k.shape[2:] != k_cache.shape[2:]:
        raise ValueError(f"{fn}: k and v must be [B, S_new, Hkv, D] matching q's batch and the "
                         f"cache's heads and dim; got k {tuple(k.shape)}, v {tuple(v.shape)}, "
                         f"k_cache {tuple(k_cache.shape)}")
    s_new = k.shape[1]
    new_lens = lens + s_new
    if bool(((lens < 0) | (new_lens > capacity)).any()):
        raise ValueError(f"{fn}: cache_seqlens + {s_new} new keys exceed the cache's {capacity} "
                         "positions (or cache_seqlens is negative)")
    pos = lens.to(torch.int64)[:, None] + torch.arange(s_new, device=k.device)  # [B, S_new]
    if block_table is not None:
        page_size = k_cache.shape[1]
        pages = block_table.to(torch.int64).gather(1, pos // page_size)
        if bool(((pages < 0) | (pages >= k_cache.shape[0])).any()):
            raise ValueError(f"{fn}: block_table names a block outside k_cache's "
                             f"{k_cache.shape[0]} blocks for the new keys")
        index = (pages.reshape(-1), (pos % page_size).reshape(-1))
    else:
        rows = torch.arange(k.shape[0], device=k.device)[:, None].expand_as(pos)
        index = (rows.reshape(-1), pos.reshape(-1))
    k_cache[index] = k.reshape(-1, *k.shape[2:]).to(k_cache.dtype)
    v_cache[index] = v.reshape(-1, *v.shape[2:]).to(v_cache.dtype)
    return new_lens


# ------------------------------------------------------------------------------------------
# transformers attention functions
# ------------------------------------------------------------------------------------------
def _unpad(mask: Tensor, sq: int):
    """2-D padding mask [B, Sk] (True/1 = token) -> (indices_q, cu_q, max_q, indices_k, cu_k,
    max_k). Queries are the last `sq` positions of the keys (left padding), as in
    FlashAttention's transformers integration."""
    mask = mask.to(torch.bool)
    b, sk = mask.shape
    mask_q = mask[:, -sq:] if sq <= sk else mask
    if sq == 1:
        mask_q = torch.ones(b, 1, dtype=torch.bool, device=mask.device)

    def cu(m):
        lens = m.sum(dim=1, dtype=torch.int32)
        return (torch.nn.functional.pad(torch.cumsum(lens, 0, dtype=torch.int32), (1, 0)),
                int(lens.max().item()) if b else 0,
                torch.nonzero(m.flatten(), as_tuple=False).flatten())

    cu_k, max_k, idx_k = cu(mask)
    cu_q, max_q, idx_q = cu(mask_q)
    return idx_q, cu_q, max_q, idx_k, cu_k, max_k


def _hf_attention(variant: str, module, query: Tensor, key: Tensor, value: Tensor,
                  attention_mask: Optional[Tensor], scaling: Optional[float], dropout: float,
                  sliding_window: Optional[int], softcap: Optional[float], kwargs: dict):
    fn = TRANSFORMERS_NAMES[variant]
    _unsupported(fn, dropout, softcap, None, kwargs.get("s_aux"))
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            f"{fn}: expected a 2-D padding mask [B, Sk] or None (register the function with "
            f"transformers' flash_attention_2 mask, as register_transformers_attention() does), "
            f"got a mask of shape {list(attention_mask.shape)}")
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    # transformers: [B, H, S, D] -> this package: [B, S, H, D]
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    b, sq, h, _ = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    window = None
    if sliding_window is not None and sk > sliding_window:
        # transformers' sliding_window counts the query's own token: 0 <= dist < sliding_window
        is_causal = True
        window = torch.tensor([[0, 0, 0, int(sliding_window)]], dtype=torch.int32,
                              device=q.device).expand(hkv, 4).contiguous()
    opts = dict(is_causal=bool(is_causal), softmax_scale=scaling, window_sizes=window)
    extra = {}
    alpha = delta = None
    if variant == "sparse":
        extra["softmax_threshold"] = kwargs.get(
            "softmax_threshold", getattr(getattr(module, "config", None), "softmax_threshold", 1.0))
    if variant == "gated":
        alpha, delta = kwargs.get("alpha"), kwargs.get("delta")
        if alpha is None or delta is None:
            raise ValueError(f"{fn}: gated attention needs the keyword arguments alpha [B, H, Sq] "
                             "and delta [B, Hkv, Sk]; the model's attention module must pass them")
        for name in ("softmax_threshold", "gate_threshold", "is_logsigmoid_gate",
                     "is_adapt_gate"):
            if name in kwargs:
                extra[name] = kwargs[name]

    if attention_mask is None:
        if variant == "dense":
            out = interface.flash_dense_attn_func(q, k, v, **opts)
        elif variant == "sparse":
            out = interface.flash_sparse_attn_func(q, k, v, **opts, **extra)
        else:
            out = interface.flash_gated_attn_func(q, k, v, alpha, delta, **opts, **extra)
        return out, None

    if attention_mask.shape[1] < sk:
        # a static cache is longer than what was written to it: only the mask's keys exist
        sk = attention_mask.shape[1]
        k, v = k[:, :sk], v[:, :sk]
        delta = delta[..., :sk] if delta is not None else None
    mask = attention_mask[:, -sk:]
    idx_q, cu_q, max_q, idx_k, cu_k, max_k = _unpad(mask, sq)
    qv = q.reshape(b * sq, h, -1)[idx_q]
    kv, vv = (t.reshape(b * sk, hkv, -1)[idx_k] for t in (k, v))
    args = (cu_q, cu_k, max_q, max_k)
    if variant == "dense":
        o = interface.flash_dense_attn_varlen_func(qv, kv, vv, *args, **opts)
    elif variant == "sparse":
        o = interface.flash_sparse_attn_varlen_func(qv, kv, vv, *args, **opts, **extra)
    else:
        a = alpha.permute(1, 0, 2).reshape(h, b * sq)[:, idx_q]      # [B, H, Sq] -> [H, total_q]
        d = delta.permute(1, 0, 2).reshape(hkv, b * sk)[:, idx_k]    # [B, Hkv, Sk] -> [Hkv, total_k]
        o = interface.flash_gated_attn_varlen_func(qv, kv, vv, a, d, *args, **opts, **extra)
    out = o.new_zeros(b * sq, h, o.shape[-1])
    out[idx_q] = o
    return out.view(b, sq, h, -1), None


def dense_attention_forward(module, query, key, value, attention_mask, scaling=None,
                            dropout=0.0, sliding_window=None, softcap=None, **kwargs):
    """transformers attention function (query/key/value [B, H, S, D]) -> ([B, Sq, H, D], None)."""
    return _hf_attention("dense", module, query, key, value, attention_mask, scaling, dropout,
                         sliding_window, softcap, kwargs)


def sparse_attention_forward(module, query, key, value, attention_mask, scaling=None,
                             dropout=0.0, sliding_window=None, softcap=None, **kwargs):
    """As `dense_attention_forward` with `flash_sparse_attn_func`; the threshold comes from the
    `softmax_threshold` keyword, else `module.config.softmax_threshold`, else 1.0."""
    return _hf_attention("sparse", module, query, key, value, attention_mask, scaling, dropout,
                         sliding_window, softcap, kwargs)


def gated_attention_forward(module, query, key, value, attention_mask, scaling=None,
                            dropout=0.0, sliding_window=None, softcap=None, **kwargs):
    """As `dense_attention_forward` with `flash_gated_attn_func`; needs the keywords `alpha`
    [B, H, Sq] and `delta` [B, Hkv, Sk] (the model's attention module passes them)."""
    return _hf_attention("gated", module, query, key, value, attention_mask, scaling, dropout,
                         sliding_window, softcap, kwargs)


def register_transformers_attention() -> dict:
    """Register `fsa_dense`, `fsa_sparse`, `fsa_gated` with transformers' `AttentionInterface`
    (and FlashAttention's 2-D padding mask for them); returns {variant: name}. Then
    `from_pretrained(..., attn_implementation="fsa_sparse")` uses `flash_sparse_attn_func`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    functions = {"dense": dense_attention_forward, "sparse": sparse_attention_forward,
                 "gated": gated_attention_forward}
    for variant, name in TRANSFORMERS_NAMES.items():
        AttentionInterface.register(name, functions[variant])
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS["flash_attention_2"])
    return dict(TRANSFORMERS_NAMES)
