"""Bad input (SPEC §9): every rule raises TypeError / ValueError (NotImplementedError for
is_quant) naming the argument, before any kernel runs.

The rule tests call the PUBLIC functions with one bad argument on top of inputs that are valid
otherwise, for each entry point kind: batched, varlen, decode over a contiguous, a paged and a
packed cache. The errors come from `validate.py`; nothing reaches an op (the inputs are tiny CPU
fp16 tensors, and several bad inputs would index out of bounds if they got there).
The "valid input passes" tests call the validate functions directly.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch

KINDS = ("batched", "varlen", "decode", "paged", "packed")
B, H, HKV, D = 2, 4, 2, 16
F16 = torch.float16
I32 = torch.int32


def _t(*shape, dtype=F16, seed=0):
    g = torch.Generator().manual_seed(seed + len(shape))
    return torch.randn(*shape, generator=g).to(dtype)


def _i32(rows):
    return torch.tensor(rows, dtype=I32)


def inputs(kind: str, variant: str) -> dict:
    """Valid keyword arguments of the public function of (kind, variant), with every optional
    argument given, so that each rule has its argument to break."""
    windows = _i32([[1, 2, 0, 3]] * HKV)
    if kind == "batched":
        sq, sk = 5, 7
        kw = dict(query=_t(B, sq, H, D), key=_t(B, sk, HKV, D, seed=1),
                  value=_t(B, sk, HKV, D, seed=2),
                  alpha=_t(B, sq, H, seed=3).transpose(1, 2),  # any strides (SPEC §1)
                  delta=_t(B, sk, HKV, seed=4).transpose(1, 2),
                  out=torch.empty(B, sq, H, D, dtype=F16),
                  lse=torch.empty(B, H, sq, dtype=torch.float32))
    elif kind == "varlen":
        cu_q, cu_k = [0, 3, 3, 5], [0, 4, 6, 7]
        kw = dict(query=_t(5, H, D), key=_t(7, HKV, D, seed=1), value=_t(7, HKV, D, seed=2),
                  alpha=_t(H, 5, seed=3), delta=_t(HKV, 7, seed=4),
                  cu_seqlens_q=_i32(cu_q), cu_seqlens_k=_i32(cu_k), max_seqlen_q=3,
                  max_seqlen_k=4, seqused_k=_i32([4, 1, 0]),
                  out=torch.empty(5, H, D, dtype=F16),
                  lse=torch.empty(H, 5, dtype=torch.float32))
    else:
        common = dict(query=_t(B, H, D), alpha=_t(B, H, seed=3),
                      k_new=_t(B, HKV, D, seed=5), v_new=_t(B, HKV, D, seed=6),
                      delta_new=_t(B, HKV, seed=7), num_splits=2,
                      out=torch.empty(B, H, D, dtype=F16),
                      lse=torch.empty(B, H, dtype=torch.float32))
        if kind == "decode":  # contiguous cache [B, Sk, Hkv, D], capacity 7
            kw = dict(key=_t(B, 7, HKV, D, seed=1), value=_t(B, 7, HKV, D, seed=2),
                      delta=_t(B, HKV, 7, seed=4), seqused_k=_i32([3, 5]),
                      gather_kv_indices=_i32([[0, 2, -1], [4, 1, 0]]))
        elif kind == "paged":  # 3 pages of 16, 2 pages per sequence: capacity 32
            kw = dict(key=_t(3, 16, HKV, D, seed=1), value=_t(3, 16, HKV, D, seed=2),
                      delta=_t(3, 16, HKV, seed=4), page_table=_i32([[0, 1], [2, 0]]),
                      seqused_k=_i32([3, 20]),
                      gather_kv_indices=_i32([[[0, 2, 31]] * HKV, [[4, -1, 0]] * HKV]))
        else:  # packed [total_k, Hkv, D]: capacities 4 and 5
            kw = dict(key=_t(9, HKV, D, seed=1), value=_t(9, HKV, D, seed=2),
                      delta=_t(HKV, 9, seed=4), cu_seqlens_k=_i32([0, 4, 9]), max_seqlen_k=5,
                      seqused_k=_i32([2, 3]), gather_kv_indices=_i32([[0, 3, -1], [4, 1, 0]]))
        kw.update(common)
    kw.update(window_sizes=windows, softmax_scale=0.25)
    if variant != "gated":
        for name in ("alpha", "delta", "delta_new", "gate_threshold"):
            kw.pop(name, None)
    else:
        kw.update(softmax_threshold=0.5, gate_threshold=0.01)
    if variant == "sparse":
        kw.update(softmax_threshold=0.5)
    return kw


def public(fsa, kind: str, variant: str):
    suffix = {"batched": "func", "varlen": "varlen_func", "decode": "with_kvcache_func",
              "paged": "with_kvcache_func", "packed": "varlen_with_kvcache_func"}[kind]
    return getattr(fsa, f"flash_{variant}_attn_{suffix}")


def call_validate(v, kind: str, variant: str, kw: dict, skip_checks: bool = False):
    """The validate call that interface.py makes for these keyword arguments."""
    g = kw.get
    thr = g("softmax_threshold", 1.0 if variant == "sparse" else None)
    if kind == "batched":
        return v.check_attn_func(variant, g("query"), g("key"), g("value"), g("alpha"),
                                 g("delta"), g("softmax_scale"), g("window_sizes"), thr,
                                 g("gate_threshold"), g("is_quant", False), g("out"), g("lse"))
    if kind == "varlen":
        return v.check_attn_varlen_func(
            variant, g("query"), g("key"), g("value"), g("alpha"), g("delta"),
            g("cu_seqlens_q"), g("cu_seqlens_k"), g("max_seqlen_q"), g("max_seqlen_k"),
            g("seqused_q"), g("seqused_k"), g("softmax_scale"), g("window_sizes"), thr,
            g("gate_threshold"), g("is_quant", False), g("out"), g("lse"), skip_checks)
    return v.check_attn_with_kvcache_func(
        variant, g("query"), g("key"), g("value"), g("alpha"), g("delta"), g("cu_seqlens_k"),
        g("max_seqlen_k"), g("seqused_k"), g("page_table"), g("k_new"), g("v_new"),
        g("delta_new"), g("gather_kv_indices"), g("softmax_scale"), g("window_sizes"), thr,
        g("gate_threshold"), g("num_splits"), g("is_quant", False), g("out"), g("lse"),
        skip_checks)


@pytest.fixture(scope="module")
def validate(fsa):
    return importlib.import_module(f"{fsa.__name__}.validate")


# ------------------------------------------------------------------------------------------
# rules that apply to every entry point kind
# ------------------------------------------------------------------------------------------
def _qkv(kw, fn):
    for name in ("query", "key", "value"):
        kw[name] = fn(kw[name])


def _strided_last(t):
    """Same values, stride(-1) == 2."""
    return torch.stack([t, t], -1)[..., 0]


def _wide_head_dim(kw):
    _qkv(kw, lambda t: torch.cat([t] * 17, -1)[..., :264])
    kw.pop("out"), kw.pop("k_new", None), kw.pop("v_new", None), kw.pop("delta_new", None)


def _drop_append(kw):
    for name in ("k_new", "v_new", "delta_new"):
        kw.pop(name, None)


def _set(**items):
    return lambda kw: kw.update(items)


# (id, variant, mutation of the valid kwargs, exception type, regex the message must match)
GENERIC = [
    ("query-not-tensor", "dense", lambda kw: kw.update(query=kw["query"].tolist()), TypeError,
     r"query must be a torch\.Tensor, got list"),
    ("value-not-tensor", "sparse", lambda kw: kw.update(value=3), TypeError,
     r"value must be a torch\.Tensor, got int"),
    ("key-dtype-differs", "dense", lambda kw: kw.update(key=kw["key"].float()), TypeError,
     r"key has dtype torch\.float32 but query has torch\.float16"),
    ("value-dtype-differs", "gated", lambda kw: kw.update(value=kw["value"].to(torch.bfloat16)),
     TypeError, r"value has dtype torch\.bfloat16 but query has torch\.float16"),
    ("int-dtype", "dense", lambda kw: _qkv(kw, lambda t: t.to(torch.int16)), TypeError,
     r"query must be float16 or bfloat16, got torch\.int16"),
    ("fp32-off-cpu", "dense",
     lambda kw: kw.update({n: t.float().to("meta") if n in ("query", "key", "value") else
                           t.to("meta") for n, t in kw.items() if isinstance(t, torch.Tensor)}),
     TypeError, r"query must be float16 or bfloat16 \(float32/float64 only on CPU tensors\)"),
    ("fp8-without-quant", "dense", lambda kw: _qkv(kw, lambda t: t.to(torch.float8_e4m3fn)),
     TypeError, r"fp8 inputs need is_quant=True"),
    ("is-quant", "sparse", _set(is_quant=True), NotImplementedError, r"is_quant=True"),
    ("key-device", "dense", lambda kw: kw.update(key=kw["key"].to("meta")), ValueError,
     r"key is on device meta but query is on cpu"),
    ("query-rank", "dense", lambda kw: kw.update(query=kw["query"][None]), ValueError,
     r"query must be \d-D"),
    ("key-rank", "dense", lambda kw: kw.update(key=kw["key"][0], value=kw["value"][0]),
     ValueError, r"key must be \d-D"),
    ("value-shape", "dense", lambda kw: kw.update(value=kw["value"][:-1]), ValueError,
     r"value has shape \[.*\] but key has \[.*\]; expected the same shape"),
    ("heads-divisible", "dense", lambda kw: kw.update(query=kw["query"][..., :3, :]),
     ValueError, r"query has 3 heads and key/value 2; .*H % Hkv == 0"),
    ("head-dim-multiple-of-8", "sparse", lambda kw: _qkv(kw, lambda t: t[..., :12]),
     ValueError, r"query has head dim 12; expected a multiple of 8"),
    ("head-dim-max-256", "dense", _wide_head_dim, ValueError,
     r"query has head dim 264; expected a multiple of 8 between 8 and 256"),
    ("key-head-dim", "dense",
     lambda kw: kw.update(key=kw["key"][..., :8], value=kw["value"][..., :8]), ValueError,
     r"key has head dim 8 but query has 16; expected the same head dim"),
    ("query-last-dim-strided", "gated", lambda kw: kw.update(query=_strided_last(kw["query"])),
     ValueError, r"query must have a contiguous last dim"),
    ("value-last-dim-strided", "dense", lambda kw: kw.update(value=_strided_last(kw["value"])),
     ValueError, r"value must have a contiguous last dim"),
    ("alpha-missing", "gated", _set(alpha=None), TypeError,
     r"alpha is required for gated attention, got None"),
    ("delta-missing", "gated", _set(delta=None), TypeError,
     r"delta is required for gated attention, got None"),
    ("alpha-shape", "gated", lambda kw: kw.update(alpha=kw["alpha"][None]), ValueError,
     r"alpha must have shape \["),
    ("delta-shape", "gated", lambda kw: kw.update(delta=kw["delta"][..., :1]), ValueError,
     r"delta must have shape \["),
    ("alpha-dtype", "gated", lambda kw: kw.update(alpha=kw["alpha"].long()), TypeError,
     r"alpha must be float16, bfloat16, float32 or float64, got torch\.int64"),
    ("window-dtype", "dense", lambda kw: kw.update(window_sizes=kw["window_sizes"].long()),
     TypeError, r"window_sizes must be int32, got torch\.int64"),
    ("window-shape", "sparse", lambda kw: kw.update(window_sizes=kw["window_sizes"][:, :3]),
     ValueError, r"window_sizes must have shape \[Hkv, 4\] = \[2, 4\] or \[H, 4\] = \[4, 4\], "
                 r"got \[2, 3\]"),
    ("window-negative", "gated", _set(window_sizes=_i32([[0, 4, 0, 2], [0, 4, -1, 2]])),
     ValueError, r"window_sizes must be >= 0 .*got window_sizes\[1, 2\] = -1"),
    ("softmax-scale-zero", "dense", _set(softmax_scale=0.0), ValueError,
     r"softmax_scale must be > 0, got 0\.0"),
    ("softmax-scale-nan", "gated", _set(softmax_scale=math.nan), ValueError,
     r"softmax_scale must be finite, got nan"),
    ("softmax-scale-type", "dense", _set(softmax_scale="0.1"), TypeError,
     r"softmax_scale must be a float or None, got str"),
    ("softmax-threshold-inf", "sparse", _set(softmax_threshold=math.inf), ValueError,
     r"softmax_threshold must be finite, got inf"),
    ("gate-threshold-nan", "gated", _set(gate_threshold=math.nan), ValueError,
     r"gate_threshold must be finite, got nan"),
    ("gate-threshold-type", "gated", _set(gate_threshold=torch.tensor(0.1)), TypeError,
     r"gate_threshold must be a float or None, got Tensor"),
    ("out-shape", "dense", lambda kw: kw.update(out=kw["out"][:-1]), ValueError,
     r"out must have shape like query = \["),
    ("out-dtype", "gated", lambda kw: kw.update(out=kw["out"].float()), TypeError,
     r"out has dtype torch\.float32 but query has torch\.float16"),
    ("out-device", "dense", lambda kw: kw.update(out=kw["out"].to("meta")), ValueError,
     r"out is on device meta but query is on cpu"),
    ("out-strided", "sparse", lambda kw: kw.update(out=_strided_last(kw["out"])), ValueError,
     r"out must have a contiguous last dim"),
    ("lse-dtype", "dense", lambda kw: kw.update(lse=kw["lse"].half()), TypeError,
     r"lse must be float32, got torch\.float16"),
    ("lse-shape", "gated", lambda kw: kw.update(lse=kw["lse"][None]), ValueError,
     r"lse must have shape \["),
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rule,variant,mutate,exc,match", GENERIC, ids=[r[0] for r in GENERIC])
def test_generic_rule(fsa, kind, rule, variant, mutate, exc, match):
    check_rule(fsa, kind, variant, mutate, exc, match)


def check_rule(fsa, kind, variant, mutate, exc, match):
    """One bad input through the public function: the exception type, a message naming the
    argument (`match`), prefixed with the function's name."""
    kw = inputs(kind, variant)
    mutate(kw)
    with pytest.raises(exc, match=match) as info:
        public(fsa, kind, variant)(**kw)
    assert str(info.value).startswith(f"{public(fsa, kind, variant).__name__}: ")


# ------------------------------------------------------------------------------------------
# rules of one or a few kinds
# ------------------------------------------------------------------------------------------
def _cu(name, rows):
    return _set(**{name: _i32(rows)})


SPECIFIC = [
    # batched
    ("batched", "dense", "key-batch",
     lambda kw: kw.update(key=kw["key"][:1], value=kw["value"][:1]), ValueError,
     r"key has batch size 1 but query has 2; expected the same batch size"),
    ("batched", "gated", "delta-seqlen",
     lambda kw: kw.update(delta=kw["delta"][:, :, :-1]), ValueError,
     r"delta must have shape \[B, Hkv, Sk\] = \[2, 2, 7\], got \[2, 2, 6\]"),
    # varlen
    ("varlen", "dense", "seqused_q", _set(seqused_q=_i32([1, 0, 1])), ValueError,
     r"seqused_q is not supported; expected None \(trim cu_seqlens_q instead\)"),
    ("varlen", "dense", "cu_seqlens_q-dtype",
     lambda kw: kw.update(cu_seqlens_q=kw["cu_seqlens_q"].long()), TypeError,
     r"cu_seqlens_q must be int32, got torch\.int64"),
    ("varlen", "gated", "cu_seqlens_k-rank",
     lambda kw: kw.update(cu_seqlens_k=kw["cu_seqlens_k"][None]), ValueError,
     r"cu_seqlens_k must be 1-D \[B\+1\]"),
    ("varlen", "sparse", "cu_seqlens_k-length", _cu("cu_seqlens_k", [0, 4, 7]), ValueError,
     r"cu_seqlens_k has 3 entries; expected B\+1 = 4"),
    ("varlen", "dense", "cu_seqlens_q-start", _cu("cu_seqlens_q", [1, 3, 3, 5]), ValueError,
     r"cu_seqlens_q must start at 0, got 1"),
    ("varlen", "dense", "cu_seqlens_q-decreasing", _cu("cu_seqlens_q", [0, 3, 2, 5]),
     ValueError, r"cu_seqlens_q must be non-decreasing, got cu_seqlens_q\[1\] = 3 > "
                 r"cu_seqlens_q\[2\] = 2"),
    ("varlen", "gated", "cu_seqlens_k-total", _cu("cu_seqlens_k", [0, 4, 6, 6]), ValueError,
     r"cu_seqlens_k\[-1\] = 6; expected it to equal key\.shape\[0\] = 7"),
    ("varlen", "dense", "max_seqlen_q-type", _set(max_seqlen_q=3.0), TypeError,
     r"max_seqlen_q must be an int, got float"),
    ("varlen", "dense", "max_seqlen_k-negative", _set(max_seqlen_k=-1), ValueError,
     r"max_seqlen_k must be >= 0, got -1"),
    ("varlen", "sparse", "max_seqlen_q-too-small", _set(max_seqlen_q=2), ValueError,
     r"max_seqlen_q = 2 but sequence 0 has query length 3"),
    ("varlen", "dense", "max_seqlen_k-too-small", _set(seqused_k=None, max_seqlen_k=3),
     ValueError, r"max_seqlen_k = 3 but sequence 0 has key length 4"),
    ("varlen", "dense", "seqused_k-dtype", _set(seqused_k=torch.tensor([4, 1, 0])), TypeError,
     r"seqused_k must be int32, got torch\.int64"),
    ("varlen", "dense", "seqused_k-shape", _set(seqused_k=_i32([4, 1])), ValueError,
     r"seqused_k must have shape \[B\] = \[3\], got \[2\]"),
    ("varlen", "gated", "seqused_k-negative", _set(seqused_k=_i32([4, -1, 0])), ValueError,
     r"seqused_k must be >= 0, got seqused_k\[1\] = -1"),
    ("varlen", "dense", "seqused_k-over-length", _set(seqused_k=_i32([4, 3, 0])), ValueError,
     r"seqused_k\[1\] = 3; expected seqused_k <= cu_seqlens_k\[b\+1\] - cu_seqlens_k\[b\] = 2"),
    ("varlen", "gated", "alpha-total", lambda kw: kw.update(alpha=kw["alpha"][:, :4]),
     ValueError, r"alpha must have shape \[H, total_q\] = \[4, 5\], got \[4, 4\]"),
    # decode, every cache layout
    *[(kind, variant, f"{kind}-{rule}", mutate, exc, match)
      for kind in ("decode", "paged", "packed")
      for variant, rule, mutate, exc, match in [
          ("dense", "seqused_k-dtype", _set(seqused_k=torch.tensor([1, 2])), TypeError,
           r"seqused_k must be int32, got torch\.int64"),
          ("dense", "seqused_k-shape", _set(seqused_k=_i32([[1, 2]])), ValueError,
           r"seqused_k must have shape \[B\] = \[2\], got \[1, 2\]"),
          ("sparse", "seqused_k-negative", _set(seqused_k=_i32([-2, 1])), ValueError,
           r"seqused_k must be >= 0, got seqused_k\[0\] = -2"),
          ("dense", "seqused_k-full-with-k_new", _set(seqused_k=_i32([1, 1000])), ValueError,
           r"seqused_k\[1\] = 1000; expected seqused_k < .* \(k_new is written at position"),
          ("dense", "seqused_k-over-capacity", lambda kw: _drop_append(kw) or kw.update(
              seqused_k=_i32([1, 1000])), ValueError, r"seqused_k\[1\] = 1000; expected "
                                                      r"seqused_k <= "),
          ("dense", "k_new-without-v_new", _set(v_new=None), TypeError,
           r"v_new is required when k_new or v_new is given \(both or neither\), got None"),
          ("sparse", "v_new-without-k_new", _set(k_new=None), TypeError,
           r"k_new is required when k_new or v_new is given"),
          ("dense", "k_new-without-seqused_k", _set(seqused_k=None), TypeError,
           r"seqused_k is required with k_new/v_new"),
          ("dense", "k_new-shape", lambda kw: kw.update(k_new=kw["k_new"][:, :1]), ValueError,
           r"k_new must have shape \[B, Hkv, D\] = \[2, 2, 16\], got \[2, 1, 16\]"),
          ("dense", "v_new-dtype", lambda kw: kw.update(v_new=kw["v_new"].float()), TypeError,
           r"v_new has dtype torch\.float32 but key has torch\.float16"),
          ("gated", "delta_new-missing", _set(delta_new=None), TypeError,
           r"delta_new is required for gated attention with k_new, got None"),
          ("gated", "delta_new-shape", lambda kw: kw.update(delta_new=kw["delta_new"][:, :1]),
           ValueError, r"delta_new must have shape \[B, Hkv\] = \[2, 2\], got \[2, 1\]"),
          ("gated", "delta_new-without-k_new",
           lambda kw: kw.update(k_new=None, v_new=None), ValueError,
           r"delta_new must be None without k_new"),
          ("gated", "alpha-shape", lambda kw: kw.update(alpha=kw["alpha"][:, :2]), ValueError,
           r"alpha must have shape \[B, H\] = \[2, 4\], got \[2, 2\]"),
          ("dense", "gather-dtype",
           lambda kw: kw.update(gather_kv_indices=kw["gather_kv_indices"].long()), TypeError,
           r"gather_kv_indices must be int32, got torch\.int64"),
          ("dense", "gather-shape",
           lambda kw: kw.update(gather_kv_indices=kw["gather_kv_indices"][:1]), ValueError,
           r"gather_kv_indices must have shape \[B, topk\] = \[2, topk\] or \[B, Hkv, topk\]"),
          ("sparse", "gather-out-of-range", _set(gather_kv_indices=_i32([[0, 1], [1, 99]])),
           ValueError, r"gather_kv_indices\[1, 1\] = 99; expected indices < "),
          ("dense", "num_splits-zero", _set(num_splits=0), ValueError,
           r"num_splits must be >= 1, got 0"),
          ("dense", "num_splits-type", _set(num_splits=2.0), TypeError,
           r"num_splits must be an int, got float"),
      ]],
    # decode, contiguous cache
    ("decode", "dense", "cache-batch",
     lambda kw: kw.update(key=kw["key"][:1], value=kw["value"][:1]), ValueError,
     r"key has batch size 1 but query has 2; expected the same batch size"),
    ("decode", "gated", "delta-cache-shape",
     lambda kw: kw.update(delta=kw["delta"].transpose(1, 2)), ValueError,
     r"delta must have shape \[B, Hkv, Sk\] = \[2, 2, 7\], got \[2, 7, 2\]"),
    # decode, paged cache
    ("paged", "dense", "page_table-dtype",
     lambda kw: kw.update(page_table=kw["page_table"].long()), TypeError,
     r"page_table must be int32, got torch\.int64"),
    ("paged", "dense", "page_table-rank", _set(page_table=_i32([0, 1])), ValueError,
     r"page_table must be 2-D \[B, max_pages\], got shape \[2\]"),
    ("paged", "sparse", "page_table-batch", _set(page_table=_i32([[0, 1]])), ValueError,
     r"page_table has batch size 1 but query has 2"),
    ("paged", "dense", "page_table-too-large", _set(page_table=_i32([[0, 1], [3, 0]])),
     ValueError, r"page_table\[1, 0\] = 3; expected entries in \[0, num_pages\) = \[0, 3\)"),
    ("paged", "gated", "page_table-negative", _set(page_table=_i32([[0, -1], [2, 0]])),
     ValueError, r"page_table\[0, 1\] = -1; expected entries in \[0, num_pages\)"),
    ("paged", "dense", "page_size",
     lambda kw: kw.update(key=kw["key"][:, :8], value=kw["value"][:, :8]), ValueError,
     r"key has page_size 8 \(key\.shape\[1\]\); expected a multiple of 16"),
    ("paged", "gated", "delta-paged-shape",
     lambda kw: kw.update(delta=kw["delta"].permute(2, 0, 1)), ValueError,
     r"delta must have shape \[num_pages, page_size, Hkv\] = \[3, 16, 2\], got \[2, 3, 16\]"),
    ("paged", "dense", "gather-past-capacity", _set(gather_kv_indices=_i32([[0, 32], [1, 2]])),
     ValueError, r"gather_kv_indices\[0, 1\] = 32; expected indices < max_pages \* page_size"),
    # decode, packed cache
    ("packed", "dense", "cu_seqlens_k-dtype",
     lambda kw: kw.update(cu_seqlens_k=kw["cu_seqlens_k"].long()), TypeError,
     r"cu_seqlens_k must be int32, got torch\.int64"),
    ("packed", "dense", "cu_seqlens_k-length", _cu("cu_seqlens_k", [0, 9]), ValueError,
     r"cu_seqlens_k has 2 entries; expected B\+1 = 3"),
    ("packed", "sparse", "cu_seqlens_k-start", _cu("cu_seqlens_k", [2, 4, 9]), ValueError,
     r"cu_seqlens_k must start at 0, got 2"),
    ("packed", "dense", "cu_seqlens_k-decreasing", _cu("cu_seqlens_k", [0, 10, 9]), ValueError,
     r"cu_seqlens_k must be non-decreasing"),
    ("packed", "gated", "cu_seqlens_k-total", _cu("cu_seqlens_k", [0, 4, 8]), ValueError,
     r"cu_seqlens_k\[-1\] = 8; expected it to equal key\.shape\[0\] = 9"),
    ("packed", "dense", "max_seqlen_k-type", _set(max_seqlen_k=None), TypeError,
     r"max_seqlen_k must be an int, got NoneType"),
    ("packed", "dense", "max_seqlen_k-too-small", _set(max_seqlen_k=3), ValueError,
     r"max_seqlen_k = 3 but sequence 1 has key length \(after k_new\) 4"),
    ("packed", "gated", "delta-packed-shape", lambda kw: kw.update(delta=kw["delta"].t()),
     ValueError, r"delta must have shape \[Hkv, total_k\] = \[2, 9\], got \[9, 2\]"),
    ("packed", "dense", "gather-past-sequence", _set(gather_kv_indices=_i32([[0, 4], [1, 2]])),
     ValueError, r"gather_kv_indices\[0, 1\] = 4; expected indices < cu_seqlens_k\[b\+1\] - "),
]


@pytest.mark.parametrize("kind,variant,rule,mutate,exc,match", SPECIFIC,
                         ids=[r[2] if r[2].startswith(r[0]) else f"{r[0]}-{r[2]}"
                              for r in SPECIFIC])
def test_specific_rule(fsa, kind, variant, rule, mutate, exc, match):
    check_rule(fsa, kind, variant, mutate, exc, match)


def test_validate_refuses_paged_and_packed_together(validate):
    kw = inputs("paged", "dense")
    kw.update(cu_seqlens_k=_i32([0, 16, 32]), max_seqlen_k=16)
    with pytest.raises(ValueError, match=r"page_table must be None with packed caches"):
        call_validate(validate, "paged", "dense", kw)


def test_validate_refuses_unknown_variant(validate):
    with pytest.raises(ValueError, match=r"variant must be one of"):
        call_validate(validate, "batched", "blocky", inputs("batched", "dense"))


@pytest.mark.parametrize("kind", KINDS)
def test_gates_refused_for_dense(validate, kind):
    kw = inputs(kind, "gated")
    with pytest.raises(ValueError, match=r"alpha must be None for non-gated attention"):
        call_validate(validate, kind, "dense", kw)


# ------------------------------------------------------------------------------------------
# valid inputs pass; what skip_checks skips
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["dense", "sparse", "gated"])
@pytest.mark.parametrize("kind", KINDS)
def test_valid_inputs_pass(validate, kind, variant):
    kw = inputs(kind, variant)
    assert call_validate(validate, kind, variant, kw) is None
    # every optional argument absent is valid too
    minimal = {n: kw[n] for n in ("query", "key", "value", "alpha", "delta", "cu_seqlens_q",
                                  "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k",
                                  "page_table") if n in kw}
    assert call_validate(validate, kind, variant, minimal) is None


@pytest.mark.parametrize("kind", KINDS)
def test_valid_edge_cases_pass(validate, kind):
    # float64 on CPU (the reference path), per-query-head windows, negative thresholds (= none),
    # D = 8 and D = 256, MQA, a transposed (strided) out whose last dim is contiguous
    kw = inputs(kind, "gated")
    _qkv(kw, lambda t: t.double())
    kw.update(out=kw["out"].double(), window_sizes=_i32([[0, 1, 2, 3]] * H),
              softmax_threshold=-1.0, gate_threshold=-0.5, softmax_scale=1)
    for name in ("k_new", "v_new"):
        if name in kw:
            kw[name] = kw[name].double()
    call_validate(validate, kind, "gated", kw)
    for d in (8, 256):
        kw = inputs(kind, "dense")
        _qkv(kw, lambda t: torch.cat([t] * 16, -1)[..., :d])
        _drop_append(kw)
        kw.pop("out")
        call_validate(validate, kind, "dense", kw)
    kw = inputs(kind, "sparse")
    kw["key"], kw["value"] = kw["key"][..., :1, :], kw["value"][..., :1, :]  # MQA
    kw.pop("window_sizes"), kw.pop("gather_kv_indices", None)
    _drop_append(kw)
    if kind == "batched":  # an out that is a transposed view, last dim contiguous
        kw["out"] = torch.empty(B, H, 5, D, dtype=F16).transpose(1, 2)
    call_validate(validate, kind, "sparse", kw)


BAD_VALUES = {  # kind -> (a bad value, its message), each read from tensor contents
    "batched": ({"window_sizes": _i32([[0, -1, 0, 0]] * HKV)}, r"window_sizes must be >= 0"),
    "varlen": ({"cu_seqlens_q": _i32([0, 3, 2, 5])}, r"cu_seqlens_q must be non-decreasing"),
    "decode": ({"seqused_k": _i32([3, 9])}, r"seqused_k\[1\] = 9"),
    "paged": ({"page_table": _i32([[0, 7], [2, 0]])}, r"page_table\[0, 1\] = 7"),
    "packed": ({"gather_kv_indices": _i32([[0, 99, -1], [4, 1, 0]])},
               r"gather_kv_indices\[0, 1\] = 99"),
}


def _refused_bad_value(validate, kind):
    """Inputs of `kind` holding the bad tensor contents of BAD_VALUES, checked to be refused
    when value checks run."""
    bad, message = BAD_VALUES[kind]
    kw = inputs(kind, "dense")
    kw.update(bad)
    with pytest.raises(ValueError, match=message):
        call_validate(validate, kind, "dense", kw)
    return kw


@pytest.mark.parametrize("kind", ["varlen", "decode", "paged", "packed"])
def test_skip_checks_skips_value_checks_only(fsa, validate, kind):
    kw = _refused_bad_value(validate, kind)
    assert call_validate(validate, kind, "dense", kw, skip_checks=True) is None
    # shape and dtype checks still run, through the public function too
    kw["key"] = kw["key"][..., :8]
    with pytest.raises(ValueError, match=r"key has head dim 8 but query has 16"):
        public(fsa, kind, "dense")(**kw, skip_checks=True)
    kw = inputs(kind, "dense")
    kw["window_sizes"] = kw["window_sizes"].long()
    with pytest.raises(TypeError, match=r"window_sizes must be int32"):
        public(fsa, kind, "dense")(**kw, skip_checks=True)


@pytest.mark.parametrize("kind", KINDS)
def test_compiling_skips_value_checks(validate, kind, monkeypatch):
    """Under torch.compile the value checks would force a host sync / graph break: skipped."""
    kw = _refused_bad_value(validate, kind)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert call_validate(validate, kind, "dense", kw) is None
    kw["query"] = kw["query"][..., :12]
    with pytest.raises(ValueError, match=r"query has head dim 12"):
        call_validate(validate, kind, "dense", kw)


@pytest.fixture
def host_reads(monkeypatch):
    """A list that grows by one at every Tensor.tolist (the value checks' one host read)."""
    calls = []
    orig = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: calls.append(1) or orig(t))
    return calls


def test_value_checks_sync_once(validate, host_reads):
    """All value checks of a call are reduced to one host read (Tensor.tolist)."""
    calls = host_reads
    for kind in KINDS:
        calls.clear()
        call_validate(validate, kind, "gated", inputs(kind, "gated"))
        assert len(calls) == 1, (kind, len(calls))


@pytest.mark.parametrize("kind", ["varlen", "decode", "paged", "packed"])
def test_value_checks_remembered_until_tensor_changes(validate, host_reads, kind):
    """A passed value check is not repeated for the same tensor objects at the same version
    (no host sync per layer); an in-place write or another object re-checks, and a failed
    check is never remembered."""
    calls = host_reads
    kw = inputs(kind, "dense")
    for _ in range(3):
        call_validate(validate, kind, "dense", kw)
    assert len(calls) == 1
    bad, message = BAD_VALUES[kind]
    (name, value), = bad.items()
    if kw.get(name) is not None and kw[name].shape == value.shape:
        kw[name].copy_(value)  # same object, written in place: its version changes
    else:
        kw.update(bad)
    with pytest.raises(ValueError, match=message):
        call_validate(validate, kind, "dense", kw)
    with pytest.raises(ValueError, match=message):  # a failed check is never remembered
        call_validate(validate, kind, "dense", kw)
    assert len(calls) == 3


@pytest.mark.parametrize("kind", KINDS)
def test_passed_calls_remembered(validate, kind, monkeypatch):
    """A call that passed is not checked again when it comes back with the same shapes,
    strides, dtypes, devices and scalars (and the same value-checked tensors at the same
    versions); any difference runs every check again, and a call whose value checks were
    skipped (here: as under CUDA-graph capture) is not remembered."""
    runs = []
    orig = validate._check_qkv
    monkeypatch.setattr(validate, "_check_qkv", lambda *a: runs.append(1) or orig(*a))
    validate._PASSED.clear()
    kw = inputs(kind, "dense")
    for _ in range(3):
        call_validate(validate, kind, "dense", kw)
    assert len(runs) == 1
    kw["softmax_scale"] = 0.375  # another scalar
    call_validate(validate, kind, "dense", kw)
    kw["query"] = kw["query"].transpose(-1, -2).contiguous().transpose(-1, -2)  # strides
    with pytest.raises(ValueError, match="query"):
        call_validate(validate, kind, "dense", kw)
    assert len(runs) == 3
    kw = inputs(kind, "dense")
    monkeypatch.setattr(validate._Ctx, "reads_values", property(lambda self: False))
    for _ in range(2):
        call_validate(validate, kind, "dense", kw)
    # with value-checked tensors (all kinds but batched without them) nothing is remembered
    assert len(runs) == 5
