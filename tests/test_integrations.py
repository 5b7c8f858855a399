"""The bundle inside the ecosystem: FlashAttention-compatible functions, transformers, kernelize.

- `flash_attn_func` / `flash_attn_varlen_func` (fa_compat.py) against a float64 computation of
  FlashAttention's own semantics written here (`fa_attention`: causal bottom-right, windows
  `-right <= dist <= left`), and the unsupported features raising.
- transformers: a small randomly initialised Llama built from its config (nothing downloaded)
  with `attn_implementation="<repo-id>"` resolves the bundle through `kernels.get_kernel`
  (LOCAL_KERNELS, no network), runs through transformers' FlashAttention path (padding ->
  varlen) and matches the sdpa implementation under the error rule against the same model in
  float64; greedy generation gives sdpa's tokens. The registered `fsa_sparse` / `fsa_gated`
  attention functions are checked the same way.
- `kernels.kernelize` with `LocalLayerRepository` on a tiny model whose attention module is
  decorated with `use_kernel_forward_from_hub`: inference, and training under
  `torch.compile(fullgraph=True)`, against float64.

Everything runs in float32 on the CPU reference path of the ops (under TRITON_INTERPRET=1 the
tests enter `ops.cpu_reference()`, as the Triton interpreter only does fp16 dots).
"""

from __future__ import annotations

import copy
import functools
import importlib
import math
import os

import pytest
import torch
import torch.nn.functional as F
import transformers  # noqa: F401  (requirements-ci.txt)
from torch import nn

from conftest import REPO_ID


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def ref_path(fsa):
    """CPU tensors take the PyTorch reference path of the ops, also under TRITON_INTERPRET=1."""
    with importlib.import_module(f"{fsa.__name__}.ops").cpu_reference():
        yield


def err(x, ref):
    return (x.double() - ref.double()).abs().max().item()


def assert_rule(name, got, ref64, lowp, eps=2e-7):
    """err(got, fp64) <= 2 * err(PyTorch in the same dtype, fp64) + eps * max(1, max|ref|)."""
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    e, e_t = err(got, ref64), err(lowp, ref64)
    bound = 2 * e_t + eps * max(1.0, ref64.abs().max().item())
    assert e <= bound, f"{name}: err {e:.3e} > 2 * torch err {e_t:.3e} + eps ({bound:.3e})"
    return f"{name}: max |ours - fp64| {e:.3e} <= {bound:.3e} (2 * sdpa-fp32 err {e_t:.3e} + eps)"


def fa_attention(q, k, v, causal=False, window=(-1, -1), scale=None, bias=None):
    """FlashAttention's semantics in q's dtype: q [B, Sq, H, D], k/v [B, Sk, Hkv, D]; key j
    visible for query i iff -right <= i + Sk - Sq - j <= left (-1 = unbounded), causal -> right
    = 0. bias [B, H, Sq, Sk] is added to the scaled scores. Rows that see nothing give 0."""
    sq, h, d = q.shape[1], q.shape[2], q.shape[3]
    sk, hkv = k.shape[1], k.shape[2]
    k = k.repeat_interleave(h // hkv, dim=2)
    v = v.repeat_interleave(h // hkv, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * (scale if scale is not None else d ** -0.5)
    if bias is not None:
        s = s + bias
    left, right = window
    if causal:
        right = 0
    dist = torch.arange(sq)[:, None] + (sk - sq) - torch.arange(sk)[None, :]
    visible = torch.ones(sq, sk, dtype=torch.bool)
    if left >= 0:
        visible &= dist <= left
    if right >= 0:
        visible &= dist >= -right
    s = s.masked_fill(~visible, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return torch.einsum("bhqk,bkhd->bqhd", p, v)


def qkv(b=2, sq=37, sk=53, h=4, hkv=2, d=40, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, s, n, d, generator=g, dtype=torch.float64).to(dtype)
            for s, n in ((sq, h), (sk, hkv), (sk, hkv))]


# ---------------------------------------------------------------------------------------------
# FlashAttention-compatible functions
# ---------------------------------------------------------------------------------------------
FA_CASES = [
    # (sq, sk, causal, window)
    (37, 53, False, (-1, -1)),
    (37, 53, True, (-1, -1)),
    (53, 37, True, (-1, -1)),      # Sq > Sk: the first rows see no key
    (37, 53, True, (7, 0)),
    (37, 53, True, (7, 5)),        # causal: right is ignored, as in FlashAttention
    (37, 53, False, (7, 0)),       # non-causal sliding window over past keys
    (37, 53, False, (-1, 0)),      # = causal
    (1, 53, False, (7, 7)),        # one query at the end: the right side cannot matter
    (1, 53, False, (-1, -1)),
]


@pytest.mark.parametrize("sq,sk,causal,window", FA_CASES)
def test_flash_attn_func_matches_flashattention_semantics(fsa, ref_path, sq, sk, causal, window):
    q, k, v = qkv(sq=sq, sk=sk)
    out, lse, probs = fsa.flash_attn_func(q, k, v, causal=causal, window_size=window,
                                          return_attn_probs=True)
    assert probs is None and out.shape == q.shape and lse.shape == (2, 4, sq)
    ref = fa_attention(q.double(), k.double(), v.double(), causal, window)
    assert_rule(f"flash_attn_func{(sq, sk, causal, window)}", out, ref,
                fa_attention(q, k, v, causal, window))
    plain = fsa.flash_attn_func(q, k, v, causal=causal, window_size=window)
    assert torch.equal(plain, out)


@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (True, (5, 0))])
def test_flash_attn_varlen_func(fsa, ref_path, causal, window):
    lens_q, lens_k = [5, 0, 17, 30], [9, 3, 17, 41]
    g = torch.Generator().manual_seed(1)
    qs = [torch.randn(1, n, 4, 24, generator=g) for n in lens_q]
    ks = [torch.randn(1, n, 2, 24, generator=g) for n in lens_k]
    vs = [torch.randn(1, n, 2, 24, generator=g) for n in lens_k]
    # transformers may hand over int64 cu_seqlens and tensor max_seqlen: both are accepted
    cu_q = torch.tensor([0] + torch.tensor(lens_q).cumsum(0).tolist(), dtype=torch.int64)
    cu_k = torch.tensor([0] + torch.tensor(lens_k).cumsum(0).tolist(), dtype=torch.int64)
    out = fsa.flash_attn_varlen_func(
        torch.cat(qs, 1)[0], torch.cat(ks, 1)[0], torch.cat(vs, 1)[0], cu_q, cu_k,
        torch.tensor(max(lens_q)), max(lens_k), causal=causal, window_size=window)
    assert out.shape == (sum(lens_q), 4, 24)
    ref = torch.cat([fa_attention(q.double(), k.double(), v.double(), causal, window)[0]
                     for q, k, v in zip(qs, ks, vs)])
    low = torch.cat([fa_attention(q, k, v, causal, window)[0] for q, k, v in zip(qs, ks, vs)])
    assert_rule("flash_attn_varlen_func", out, ref, low)


def test_flash_attn_func_softmax_scale_and_lse(fsa, ref_path):
    q, k, v = qkv(sq=20, sk=20, d=16)
    out, lse, _ = fsa.flash_attn_func(q, k, v, softmax_scale=0.3, causal=True,
                                      return_attn_probs=True)
    ref = fa_attention(q.double(), k.double(), v.double(), True, scale=0.3)
    assert_rule("softmax_scale", out, ref, fa_attention(q, k, v, True, scale=0.3))
    kk = k.double().repeat_interleave(2, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), kk) * 0.3
    s = s.masked_fill(torch.ones(20, 20, dtype=torch.bool).triu(1), float("-inf"))
    assert lse.dtype == torch.float32
    assert err(lse, torch.logsumexp(s, dim=-1)) < 1e-5


@pytest.mark.parametrize("kwargs,needle", [
    (dict(dropout_p=0.1), "dropout_p"),
    (dict(softcap=30.0), "softcap"),
    (dict(alibi_slopes=torch.ones(4)), "alibi_slopes"),
    (dict(s_aux=torch.zeros(4)), "s_aux"),
    (dict(window_size=(7, 3)), "window_size"),
    (dict(window_size=(-1, 3)), "window_size"),
    (dict(window_size=(7, -1)), "window_size"),
])
def test_flash_attn_func_unsupported_features_raise(fsa, kwargs, needle):
    q, k, v = qkv(sq=8, sk=8, d=16)
    with pytest.raises(ValueError, match=needle):
        fsa.flash_attn_func(q, k, v, **kwargs)


def test_flash_attn_varlen_func_block_table(fsa, ref_path):
    """A paged KV cache as FlashAttention takes it (block_table int64 [B, max_blocks], k/v
    [num_blocks, block_size, Hkv, D], cu_seqlens_k the key counts): the result of the same
    call on the packed keys; a block size that is not a multiple of 16 is refused."""
    lens_q, lens_k, bs = [5, 16], [40, 16], 16
    qs = [qkv(b=1, sq=n, sk=1, d=16)[0][0] for n in lens_q]
    kv = [qkv(b=1, sq=1, sk=n, d=16)[1:] for n in lens_k]
    k_blocks = torch.zeros(8, bs, 2, 16, dtype=qs[0].dtype)
    v_blocks = torch.zeros_like(k_blocks)
    table = torch.tensor([[5, 2, 7], [0, 3, 1]], dtype=torch.int64)
    for b, ((k, v), n) in enumerate(zip(kv, lens_k)):
        for j in range(-(-n // bs)):
            rows = slice(j * bs, min(j * bs + bs, n))
            k_blocks[table[b, j], : rows.stop - rows.start] = k[0, rows]
            v_blocks[table[b, j], : rows.stop - rows.start] = v[0, rows]
    cu_q = torch.tensor([0] + torch.tensor(lens_q).cumsum(0).tolist(), dtype=torch.int32)
    cu_k = torch.tensor([0] + torch.tensor(lens_k).cumsum(0).tolist(), dtype=torch.int32)
    q = torch.cat(qs)
    paged = fsa.flash_attn_varlen_func(q, k_blocks, v_blocks, cu_q, cu_k, max(lens_q),
                                       max(lens_k), causal=True, block_table=table)
    packed = fsa.flash_attn_varlen_func(q, torch.cat([k[0] for k, _ in kv]),
                                        torch.cat([v[0] for _, v in kv]), cu_q, cu_k,
                                        max(lens_q), max(lens_k), causal=True)
    torch.testing.assert_close(paged, packed, rtol=0, atol=0)
    with pytest.raises(ValueError, match="page_size"):
        fsa.flash_attn_varlen_func(q, k_blocks.view(16, 8, 2, 16), v_blocks.view(16, 8, 2, 16),
                                   cu_q, cu_k, max(lens_q), max(lens_k), causal=True,
                                   block_table=table)


KVCACHE_CASES = [
    # (queries, new keys appended, causal)
    (1, 1, True),    # decoding: the decode kernel's fused append
    (1, 0, False),   # decoding over the cache as it is
    (5, 5, True),    # chunked prefill: append 5, attend causally
    (5, 5, False),
    (3, 0, True),
]


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("sq,s_new,causal", KVCACHE_CASES)
def test_flash_attn_with_kvcache(fsa, ref_path, paged, sq, s_new, causal):
    """FlashAttention's flash_attn_with_kvcache: k/v appended in place at cache_seqlens[b],
    then q attends over keys [0, cache_seqlens[b] + S_new) aligned to their end; against
    float64 FlashAttention semantics per sequence, contiguous and paged (block_table int64)."""
    b, h, hkv, d, cap, bs = 2, 4, 2, 16, 64, 16
    lens = torch.tensor([20, 37], dtype=torch.int64)
    q, k_full, v_full = qkv(b=b, sq=sq, sk=cap, h=h, hkv=hkv, d=d, seed=sq + s_new)
    k_new, v_new = (x[:, :s_new].clone() + 1.0 for x in qkv(b=b, sq=1, sk=max(s_new, 1),
                                                             h=h, hkv=hkv, d=d, seed=7)[1:])
    table = torch.tensor([[3, 0, 6, 1], [5, 7, 2, 4]], dtype=torch.int64)
    if paged:
        k_cache = torch.zeros(8, bs, hkv, d)
        v_cache = torch.zeros_like(k_cache)
        for i in range(b):
            for j in range(cap // bs):
                k_cache[table[i, j]] = k_full[i, j * bs:(j + 1) * bs]
                v_cache[table[i, j]] = v_full[i, j * bs:(j + 1) * bs]
    else:
        k_cache, v_cache = k_full.clone(), v_full.clone()
    kw = dict(k=k_new, v=v_new) if s_new else {}
    out, lse = fsa.flash_attn_with_kvcache(
        q, k_cache, v_cache, cache_seqlens=lens, block_table=table if paged else None,
        causal=causal, return_softmax_lse=True, **kw)
    assert out.shape == q.shape and lse.shape == (b, h, sq)
    for i in range(b):
        n = int(lens[i]) + s_new
        keys = torch.cat([k_full[i:i + 1, :lens[i]], k_new[i:i + 1]], 1)
        vals = torch.cat([v_full[i:i + 1, :lens[i]], v_new[i:i + 1]], 1)
        ref = fa_attention(q[i:i + 1].double(), keys.double(), vals.double(), causal=causal)
        low = fa_attention(q[i:i + 1], keys, vals, causal=causal)
        assert_rule(f"sequence {i} ({n} keys)", out[i:i + 1], ref, low)
        # the new keys and values are in the cache, where the sequence's positions map
        pos = torch.arange(int(lens[i]), n)
        if paged:
            rows = (table[i, pos // bs], pos % bs)
        else:
            rows = (torch.full_like(pos, i), pos)
        torch.testing.assert_close(k_cache[rows], k_new[i], rtol=0, atol=0)
        torch.testing.assert_close(v_cache[rows], v_new[i], rtol=0, atol=0)


def test_flash_attn_with_kvcache_refuses(fsa, ref_path):
    q, k, v = qkv(b=2, sq=3, sk=64, h=4, hkv=2, d=16)
    with pytest.raises(ValueError, match="exceed"):
        fsa.flash_attn_with_kvcache(q, k.clone(), v.clone(), k[:, :3], v[:, :3],
                                    cache_seqlens=torch.tensor([10, 62]))
    with pytest.raises(ValueError, match="rotary_cos"):
        fsa.flash_attn_with_kvcache(q, k, v, rotary_cos=torch.zeros(64, 8))
    with pytest.raises(ValueError, match="k and v"):
        fsa.flash_attn_with_kvcache(q, k, v, k[:, :3])
    with pytest.raises(ValueError, match="softcap"):
        fsa.flash_attn_with_kvcache(q, k, v, softcap=30.0)


# ---------------------------------------------------------------------------------------------
# transformers
# ---------------------------------------------------------------------------------------------
def llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)


def make_models(attn_implementation):
    """(model with attn_implementation, the same weights with sdpa, the same in float64)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    ours = LlamaForCausalLM._from_config(copy.deepcopy(llama_config()),
                                         attn_implementation=attn_implementation).eval()
    sdpa = LlamaForCausalLM._from_config(copy.deepcopy(llama_config()),
                                         attn_implementation="sdpa").eval()
    sdpa.load_state_dict(ours.state_dict())
    sdpa64 = copy.deepcopy(sdpa).double()
    return ours, sdpa, sdpa64


def batch():
    """Two prompts of 24 tokens, the second left-padded by 7 (padding -> the varlen path)."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 96, (2, 24), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    ids[1, :7] = 0
    return ids, mask


def check_logits_and_generation(ours, sdpa, sdpa64, **kwargs):
    ids, mask = batch()
    keep = mask.bool()
    report = []
    with torch.no_grad():
        for m in (None, mask):
            got = ours(ids, attention_mask=m, **kwargs).logits
            low = sdpa(ids, attention_mask=m).logits
            ref = sdpa64(ids, attention_mask=m).logits
            sel = keep if m is not None else torch.ones_like(keep)
            # padded positions are garbage in both implementations; compare the real tokens
            report.append(assert_rule(f"logits {'left-padded batch' if m is not None else 'no mask'}",
                                      got[sel], ref[sel], low[sel]))
        gen = ours.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                            **kwargs)
        gen_sdpa = sdpa.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert gen.shape == (2, 29)
    assert torch.equal(gen, gen_sdpa), (gen[:, -5:], gen_sdpa[:, -5:])
    report.append(f"greedy generate(max_new_tokens=5): {gen[:, -5:].tolist()} == sdpa's")
    print("\n" + "\n".join(f"    {line}" for line in report))
    return gen


def test_transformers_hub_kernel(fsa, bundle_root, ref_path, monkeypatch):
    """attn_implementation="<repo-id>": transformers loads the bundle with kernels.get_kernel
    and calls its flash_attn_func / flash_attn_varlen_func."""
    import transformers.modeling_flash_attention_utils as fa_utils

    monkeypatch.setenv("LOCAL_KERNELS", f"{REPO_ID}={bundle_root}")
    monkeypatch.setattr(fa_utils, "_loaded_implementation", None)  # load afresh, as a user would
    calls = {"flash_attn_func": 0, "flash_attn_varlen_func": 0}
    for name in calls:
        real = getattr(fsa.fa_compat, name)

        @functools.wraps(real)  # transformers reads the signature to choose the keywords
        def spy(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)
        monkeypatch.setattr(fsa, name, spy)  # what transformers reads off the loaded module

    ours, sdpa, sdpa64 = make_models(REPO_ID)
    assert ours.config._attn_implementation == REPO_ID
    assert fa_utils._flash_fn is fsa.flash_attn_func  # the bundle's function, via get_kernel
    check_logits_and_generation(ours, sdpa, sdpa64)
    # batched (no padding mask) and varlen (the left-padded prompt, and its decoding) both ran
    assert calls["flash_attn_func"] > 0 and calls["flash_attn_varlen_func"] > 0, calls
    print(f"    attn_implementation={REPO_ID!r}: calls into the bundle {calls}")


def test_transformers_continuous_batching(fsa, bundle_root, ref_path, monkeypatch):
    """transformers' continuous batching (generate_batch: paged cache, prompts of different
    lengths batched together) with attn_implementation="<repo-id>": the bundle loads with no
    warning about block tables (it has flash_attn_with_kvcache), the attention runs through it,
    and the greedy tokens equal SDPA's generate on the same weights, prompt by prompt."""
    import logging

    import transformers.modeling_flash_attention_utils as fa_utils
    from transformers import GenerationConfig

    monkeypatch.setenv("LOCAL_KERNELS", f"{REPO_ID}={bundle_root}")
    monkeypatch.setattr(fa_utils, "_loaded_implementation", None)
    calls = {"flash_attn_varlen_func": 0}
    real = fsa.fa_compat.flash_attn_varlen_func

    @functools.wraps(real)
    def spy(*args, **kwargs):
        calls["flash_attn_varlen_func"] += 1
        return real(*args, **kwargs)
    monkeypatch.setattr(fsa, "flash_attn_varlen_func", spy)

    class Records(logging.Handler):
        def __init__(self):
            super().__init__(logging.WARNING)
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())
    records = Records()
    logger = logging.getLogger("transformers")
    logger.addHandler(records)
    try:
        ours, sdpa, _ = make_models(REPO_ID)
        g = torch.Generator().manual_seed(5)
        prompts = [torch.randint(3, 96, (n,), generator=g).tolist() for n in (24, 9, 17)]
        config = GenerationConfig(max_new_tokens=5, do_sample=False)
        with torch.no_grad():
            results = ours.generate_batch(inputs=prompts, generation_config=config,
                                          progress_bar=False)
    finally:
        logger.removeHandler(records)
    assert not [m for m in records.messages if "block table" in m], records.messages
    assert calls["flash_attn_varlen_func"] > 0, calls
    got = [results[rid].generated_tokens for rid in sorted(results, key=lambda r: int(r[4:]))]
    with torch.no_grad():
        want = [sdpa.generate(torch.tensor([p]), generation_config=config)[0, len(p):].tolist()
                for p in prompts]
    assert got == want, (got, want)
    print(f"\n    continuous batching through the bundle: {got} == sdpa's; {calls}")


@pytest.mark.parametrize("variant", ["dense", "sparse"])
def test_transformers_registered_attention(fsa, ref_path, monkeypatch, variant):
    """register_transformers_attention() -> attn_implementation="fsa_<variant>". The prompts
    are shorter than one key block, so the sparse skip rule cannot drop anything (SPEC §5: the
    anchor blocks are always kept) and the result is dense attention."""
    names = fsa.fa_compat.register_transformers_attention()
    assert names == {"dense": "fsa_dense", "sparse": "fsa_sparse", "gated": "fsa_gated"}
    target = {"dense": "flash_dense_attn", "sparse": "flash_sparse_attn"}[variant]
    calls = {"batched": 0, "varlen": 0}
    for kind, name in (("batched", f"{target}_func"), ("varlen", f"{target}_varlen_func")):
        real = getattr(fsa.interface, name)

        @functools.wraps(real)
        def spy(*args, _real=real, _kind=kind, **kwargs):
            calls[_kind] += 1
            if variant == "sparse":
                assert kwargs["softmax_threshold"] == 1.0
            return _real(*args, **kwargs)
        monkeypatch.setattr(fsa.interface, name, spy)
    ours, sdpa, sdpa64 = make_models(names[variant])
    check_logits_and_generation(ours, sdpa, sdpa64)
    assert calls["batched"] > 0 and calls["varlen"] > 0, calls


def test_transformers_gated_attention_function(fsa, ref_path):
    """gated_attention_forward: transformers layout [B, H, S, D], left padding -> varlen, with
    alpha/delta unpadded alongside; against float64 gated attention per sequence."""
    b, h, hkv, s, d = 2, 4, 2, 19, 16
    g = torch.Generator().manual_seed(5)
    q = torch.randn(b, h, s, d, generator=g)
    k = torch.randn(b, hkv, s, d, generator=g)
    v = torch.randn(b, hkv, s, d, generator=g)
    alpha = torch.randn(b, h, s, generator=g)
    delta = 2 * torch.randn(b, hkv, s, generator=g)
    mask = torch.ones(b, s, dtype=torch.bool)
    mask[1, :6] = False

    module = nn.Module()
    module.is_causal = True
    out, none = fsa.fa_compat.gated_attention_forward(
        module, q, k, v, mask, alpha=alpha, delta=delta, gate_threshold=0.0)
    assert none is None and out.shape == (b, s, h, d)
    assert torch.equal(out[1, :6], torch.zeros(6, h, d))  # padded queries are left at zero
    for i in range(b):
        keep = mask[i]
        qi, ki, vi = (t[i:i + 1, :, keep].transpose(1, 2) for t in (q, k, v))
        ai, di = alpha[i:i + 1, :, keep], delta[i:i + 1, :, keep]

        def gated(dtype):
            grp = di.to(dtype).repeat_interleave(h // hkv, dim=1)
            bias = F.logsigmoid(ai.to(dtype)[..., :, None] * grp[..., None, :]) * d ** -0.5
            return fa_attention(qi.to(dtype), ki.to(dtype), vi.to(dtype), True, bias=bias)
        assert_rule(f"gated seq {i}", out[i:i + 1, keep], gated(torch.float64), gated(q.dtype))
    with pytest.raises(ValueError, match="alpha"):
        fsa.fa_compat.gated_attention_forward(module, q, k, v, None)


# ---------------------------------------------------------------------------------------------
# kernels.kernelize
# ---------------------------------------------------------------------------------------------
def sdpa_bshd(q, k, v, is_causal, bias=None):
    """Plain attention in [B, S, H, D] (GQA by repetition) - the forward kernelize replaces."""
    h, hkv = q.shape[2], k.shape[2]
    k = k.repeat_interleave(h // hkv, dim=2)
    v = v.repeat_interleave(h // hkv, dim=2)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                         v.transpose(1, 2), attn_mask=bias,
                                         is_causal=is_causal and bias is None)
    return out.transpose(1, 2)


def make_kernelizable_model(layer_name):
    from kernels import use_kernel_forward_from_hub

    gated = layer_name == "FlashGatedAttention"

    if gated:
        @use_kernel_forward_from_hub(layer_name)
        class CoreAttention(nn.Module):
            is_causal = True
            gate_threshold = 0.0  # read by the kernel layer: no gate skipping

            def forward(self, query, key, value, alpha, delta):
                d = query.shape[-1]
                grp = delta.repeat_interleave(query.shape[2] // key.shape[2], dim=1)
                g = F.logsigmoid(alpha[..., :, None] * grp[..., None, :]) * d ** -0.5
                sq, sk = query.shape[1], key.shape[1]
                causal = torch.ones(sq, sk, dtype=torch.bool).tril(sk - sq)
                return sdpa_bshd(query, key, value, True,
                                 bias=g.masked_fill(~causal, float("-inf")))
    else:
        @use_kernel_forward_from_hub(layer_name)
        class CoreAttention(nn.Module):
            is_causal = True

            def forward(self, query, key, value):
                return sdpa_bshd(query, key, value, self.is_causal)

    class Block(nn.Module):
        def __init__(self, dim=32, heads=4, kv_heads=2, head_dim=16):
            super().__init__()
            self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
            self.q = nn.Linear(dim, heads * head_dim)
            self.kv = nn.Linear(dim, 2 * kv_heads * head_dim)
            self.gate = nn.Linear(dim, heads + kv_heads) if gated else None
            self.o = nn.Linear(heads * head_dim, dim)
            self.attn = CoreAttention()

        def forward(self, x):
            b, s, _ = x.shape
            q = self.q(x).view(b, s, self.heads, self.head_dim)
            k, v = self.kv(x).view(b, s, 2, self.kv_heads, self.head_dim).unbind(2)
            if self.gate is None:
                y = self.attn(q, k, v)
            else:
                ad = self.gate(x)
                y = self.attn(q, k, v, ad[..., :self.heads].transpose(1, 2),
                              ad[..., self.heads:].transpose(1, 2))
            return self.o(y.reshape(b, s, -1))

    torch.manual_seed(0)
    return Block()


@pytest.mark.parametrize("layer_name", ["FlashDenseAttention", "FlashSparseAttention",
                                        "FlashGatedAttention"])
def test_kernelize_with_local_layer_repository(fsa, bundle_root, ref_path, layer_name):
    from kernels import LocalLayerRepository, Mode, kernelize, use_kernel_mapping

    layer = getattr(fsa.layers, layer_name)
    assert layer.can_torch_compile is True and layer.has_backward is True
    model = make_kernelizable_model(layer_name)
    model64 = copy.deepcopy(model).double()
    x = torch.randn(2, 40, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        low, ref = model(x), model64(x.double())
    mapping = {layer_name: {"cpu": LocalLayerRepository(repo_path=bundle_root,
                                                         layer_name=layer_name)}}
    with use_kernel_mapping(mapping, inherit_mapping=False):
        kernelize(model, mode=Mode.INFERENCE, device="cpu")
    assert model.attn.forward.__func__ is layer.forward  # the bundle's layer now runs
    with torch.no_grad():
        assert_rule(f"kernelize {layer_name}", model(x), ref, low)

    # training + torch.compile: kernelize keeps the layer (can_torch_compile, has_backward),
    # dynamo traces it with no graph break, and the gradients follow float64
    model = make_kernelizable_model(layer_name)
    with use_kernel_mapping(mapping, inherit_mapping=False):
        kernelize(model, mode=Mode.TRAINING | Mode.TORCH_COMPILE, device="cpu")
    assert model.attn.forward.__func__ is layer.forward
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    compiled(x).square().sum().backward()
    ref_model = make_kernelizable_model(layer_name)
    ref_model64 = copy.deepcopy(ref_model).double()
    ref_model(x).square().sum().backward()
    ref_model64(x.double()).square().sum().backward()
    for (name, p), p_low, p64 in zip(model.named_parameters(), ref_model.parameters(),
                                     ref_model64.parameters()):
        assert_rule(f"grad {name}", p.grad, p64.grad, p_low.grad)


@pytest.mark.gpu
def test_transformers_hub_kernel_cuda_bf16(fsa, bundle_root, monkeypatch):
    """The Triton kernels through transformers: bf16 on CUDA, logits under the error rule
    against the float64 model (sdpa in bf16 as the same-dtype computation); generation runs."""
    import transformers.modeling_flash_attention_utils as fa_utils

    monkeypatch.setenv("LOCAL_KERNELS", f"{REPO_ID}={bundle_root}")
    monkeypatch.setattr(fa_utils, "_loaded_implementation", None)
    ours, sdpa, sdpa64 = make_models(REPO_ID)
    sdpa64 = sdpa64.cuda()
    ours, sdpa = ours.to("cuda", torch.bfloat16), sdpa.to("cuda", torch.bfloat16)
    ids, mask = (t.cuda() for t in batch())
    keep = mask.bool()
    with torch.no_grad():
        for m in (None, mask):
            sel = keep if m is not None else torch.ones_like(keep)
            got = ours(ids, attention_mask=m).logits[sel]
            assert_rule(f"cuda logits (mask={m is not None})", got,
                        sdpa64(ids, attention_mask=m).logits[sel],
                        sdpa(ids, attention_mask=m).logits[sel], eps=1e-3)
        gen = ours.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert gen.shape == (2, 29)


def test_model_benchmark_runs_on_cpu(bundle_root, tmp_path):
    """tests/benchmark_model.py --tiny: every attention implementation trains one step of a
    small Llama with the same weights as SDPA's and lands on SDPA's loss (the gated row
    computes another function: its loss is only required finite), and the bundle's greedy
    generation through transformers' hub-kernel path gives SDPA's tokens."""
    import csv
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["LOCAL_KERNELS"] = f"{REPO_ID}={bundle_root}"
    script = Path(__file__).resolve().parent / "benchmark_model.py"
    proc = subprocess.run([sys.executable, str(script), "--tiny", "--tokens", "96", "--layers",
                           "2", "--steps", "1", "--generate", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=600,
                          cwd=script.parent)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "benchmark_model.csv")))
    steps = {r["impl"]: r for r in rows if r["step_ms"]}
    assert set(steps) == {"sdpa", "hub", "fsa_dense", "fsa_sparse", "fsa_gated"}, steps
    for impl in ("hub", "fsa_dense", "fsa_sparse"):
        assert float(steps[impl]["loss_diff_vs_sdpa"]) < 1e-4, steps[impl]
    assert math.isfinite(float(steps["fsa_gated"]["loss"]))
    gen = [r for r in rows if r.get("generate_ms")]
    assert [r["impl"] for r in gen] == ["sdpa", "hub"]
    assert all(r["same_tokens_as_sdpa"] == "True" for r in gen), gen
