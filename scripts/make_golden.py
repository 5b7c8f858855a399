"""Write tests/golden/reference_v1.safetensors: fixed small cases of the float64 reference.

    python scripts/make_golden.py

Each case stores its inputs, the scalar arguments (in the file's metadata, as JSON) and the
reference's float64 outputs: out, lse and, for attention cases, the gradients for a stored
`dout`. tests/test_reference.py recomputes every case from the stored inputs and compares, so
a change to the reference itself is caught. Re-run this script only for an intended change of
semantics, and say so in the change's description.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "golden" / "reference_v1.safetensors"


def load_reference():
    """Import flash_sparse_attn.reference without running the package's __init__ (which needs
    the generated _ops.py), so this script works from a bare checkout."""
    pkg = ROOT / "torch-ext" / "flash_sparse_attn"
    if "flash_sparse_attn" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "flash_sparse_attn", pkg / "__init__.py", submodule_search_locations=[str(pkg)])
        sys.modules["flash_sparse_attn"] = importlib.util.module_from_spec(spec)
    return importlib.import_module("flash_sparse_attn.reference")


def _randn(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def attention_cases(gen):
    """name -> (tensor inputs, scalar kwargs). Tensors follow attention_forward's layouts."""
    cases = {}
    # dense causal, Sq < Sk
    cases["dense_causal"] = (
        dict(q=_randn(gen, 1, 12, 2, 8), k=_randn(gen, 1, 17, 2, 8), v=_randn(gen, 1, 17, 2, 8)),
        dict(is_causal=True),
    )
    # GQA varlen with an empty sequence, causal
    cu_q = torch.tensor([0, 5, 5, 14], dtype=torch.int32)
    cu_k = torch.tensor([0, 7, 10, 19], dtype=torch.int32)
    cases["gqa_varlen"] = (
        dict(q=_randn(gen, 14, 4, 8), k=_randn(gen, 19, 2, 8), v=_randn(gen, 19, 2, 8),
             cu_seqlens_q=cu_q, cu_seqlens_k=cu_k),
        dict(is_causal=True, softmax_scale=0.3),
    )
    # local window: sink + near + a band, per KV head
    ws = torch.tensor([[2, 3, 1, 2], [0, 4, 5, 1]], dtype=torch.int32)
    cases["local_window"] = (
        dict(q=_randn(gen, 1, 16, 2, 8), k=_randn(gen, 1, 16, 2, 8), v=_randn(gen, 1, 16, 2, 8),
             window_sizes=ws),
        dict(),
    )
    # gated (logsigmoid) GQA causal, and a linear gate without causal mask
    cases["gated_logsigmoid"] = (
        dict(q=_randn(gen, 1, 10, 2, 8), k=_randn(gen, 1, 14, 1, 8), v=_randn(gen, 1, 14, 1, 8),
             alpha=_randn(gen, 1, 2, 10), delta=_randn(gen, 1, 1, 14)),
        dict(is_causal=True, is_logsigmoid_gate=True),
    )
    cases["gated_linear"] = (
        dict(q=_randn(gen, 1, 9, 2, 8), k=_randn(gen, 1, 9, 2, 8), v=_randn(gen, 1, 9, 2, 8),
             alpha=_randn(gen, 1, 2, 9), delta=_randn(gen, 1, 2, 9)),
        dict(is_causal=False, is_logsigmoid_gate=False),
    )
    return cases


def decode_case(gen):
    """Paged gated decode with a gather list (duplicates and negatives) and seqused_k."""
    page_size, num_pages, batch, kv_heads, heads, dim = 4, 6, 2, 2, 4, 8
    tensors = dict(
        q=_randn(gen, batch, heads, dim),
        k_cache=_randn(gen, num_pages, page_size, kv_heads, dim),
        v_cache=_randn(gen, num_pages, page_size, kv_heads, dim),
        alpha=_randn(gen, batch, heads),
        delta_cache=_randn(gen, num_pages, page_size, kv_heads),
        page_table=torch.tensor([[3, 0, 5], [1, 4, 2]], dtype=torch.int32),
        seqused_k=torch.tensor([10, 7], dtype=torch.int32),
        gather_kv_indices=torch.tensor([[0, 9, 9, -1, 4], [6, 2, -3, 11, 0]], dtype=torch.int32),
    )
    return tensors, dict(is_logsigmoid_gate=True)


_TENSOR_ARGS = ("alpha", "delta", "cu_seqlens_q", "cu_seqlens_k", "seqused_k", "window_sizes")
_DECODE_ARGS = ("alpha", "delta_cache", "page_table", "cu_seqlens_k", "seqused_k",
                "gather_kv_indices", "window_sizes")


def run_attention(ref, tensors, scalars, dout):
    """(out, lse, dq, dk, dv[, dalpha, ddelta]) of the float64 reference for one case."""
    kw = {n: tensors.get(n) for n in _TENSOR_ARGS}
    kw.update(scalars)
    out, lse = ref.attention_forward(tensors["q"], tensors["k"], tensors["v"], **kw)
    grads = ref.attention_backward(dout, tensors["q"], tensors["k"], tensors["v"], out, lse, **kw)
    names = ("dq", "dk", "dv", "dalpha", "ddelta")
    res = dict(out=out, lse=lse)
    res.update({n: g for n, g in zip(names, grads) if g is not None})
    return res


def run_decode(ref, tensors, scalars):
    kw = {n: tensors.get(n) for n in _DECODE_ARGS}
    out, lse = ref.decode_forward(tensors["q"], tensors["k_cache"], tensors["v_cache"], **kw,
                                  max_seqlen_k=0, softmax_scale=scalars.get("softmax_scale"),
                                  softmax_threshold=0.0, gate_threshold=0.0,
                                  is_logsigmoid_gate=scalars["is_logsigmoid_gate"])
    return dict(out=out, lse=lse)


def main():
    ref = load_reference()
    gen = torch.Generator().manual_seed(20240601)
    data, meta = {}, {}
    for name, (tensors, scalars) in attention_cases(gen).items():
        q = tensors["q"]
        dout = _randn(gen, *q.shape)
        outputs = run_attention(ref, tensors, scalars, dout)
        meta[name] = dict(kind="attention", scalars=scalars, inputs=sorted(tensors) + ["dout"],
                          outputs=sorted(outputs))
        for k, t in {**tensors, "dout": dout, **outputs}.items():
            data[f"{name}.{k}"] = t.contiguous()
    tensors, scalars = decode_case(gen)
    outputs = run_decode(ref, tensors, scalars)
    meta["decode_paged_gather"] = dict(kind="decode", scalars=scalars, inputs=sorted(tensors),
                                       outputs=sorted(outputs))
    for k, t in {**tensors, **outputs}.items():
        data[f"decode_paged_gather.{k}"] = t.contiguous()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    save_file(data, str(OUT), metadata={"cases": json.dumps(meta, sort_keys=True)})
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes, {len(meta)} cases)")


if __name__ == "__main__":
    main()
