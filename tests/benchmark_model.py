"""Model benchmark: `python tests/benchmark_model.py [--tokens ...] [--layers ...]`.

A transformers Llama built from a config (random weights, nothing downloaded), one training
step (forward + backward of the LM loss) per measurement, with attention by:
- `sdpa`: transformers' SDPA attention (the baseline);
- `hub`: this bundle through `attn_implementation="<repo id>"` (transformers loads it with
  `kernels.get_kernel`: LOCAL_KERNELS points at this repository's build, as a user's Hub cache
  would);
- `fsa_dense` / `fsa_sparse` / `fsa_gated`: the functions `fa_compat.register_transformers_attention`
  registers (sparse at `softmax_threshold=1`; gated with gates derived from the layer's own
  queries and keys: alpha = 1 + sigmoid(mean_d q), delta = mean_d k, so the gate costs what a
  trained gate's kernel work costs, without a model change).
Every implementation gets the same weights and inputs; the table shows step time (median of
`--steps` steps after warm-up, CUDA events), tokens/s and the loss difference to SDPA's, and
`--generate` adds a greedy generation (prompt of 512 tokens, 32 new) with its tokens compared to
SDPA's. CSV under --out. `--tiny` runs a small float32 model on the CPU (a smoke test: the ops
take their PyTorch reference path there).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from pathlib import Path

import torch

from bench_utils import ROOT, load_package, print_table, write_csv

IMPLS = ("sdpa", "hub", "fsa_dense", "fsa_sparse", "fsa_gated")


def llama_config(tokens, layers, tiny):
    from transformers import LlamaConfig

    if tiny:
        return LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=max(tokens, 1024))
    # Llama-style 2048 hidden, D = 128, GQA 4:1
    return LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5504,
                       num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=4,
                       max_position_embeddings=max(tokens, 1024))


def register(fsa):
    """The registered fsa_* attention functions, plus fsa_gated with its gates supplied."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    names = fsa.fa_compat.register_transformers_attention()
    gated = fsa.fa_compat.gated_attention_forward

    def gated_with_gates(module, query, key, value, attention_mask, **kwargs):
        # query [B, H, S, D], key [B, Hkv, S, D]
        kwargs["alpha"] = 1 + torch.sigmoid(query.float().mean(-1)).to(query.dtype)
        kwargs["delta"] = key.float().mean(-1).to(key.dtype)
        return gated(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(names["gated"], gated_with_gates)
    AttentionMaskInterface.register(names["gated"], ALL_MASK_ATTENTION_FUNCTIONS["flash_attention_2"])
    return names


def build_models(cfg, impls, repo_id, device, dtype):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM._from_config(copy.deepcopy(cfg), attn_implementation="sdpa",
                                         torch_dtype=dtype).to(device)
    models = {}
    for impl in impls:
        if impl == "sdpa":
            models[impl] = base
            continue
        name = repo_id if impl == "hub" else impl
        m = LlamaForCausalLM._from_config(copy.deepcopy(cfg), attn_implementation=name,
                                          torch_dtype=dtype).to(device)
        m.load_state_dict(base.state_dict())
        models[impl] = m
    return models


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def train_step_time(model, ids, steps, device, sparse):
    """Median step time (ms) of forward + backward of the LM loss, and the first step's loss."""
    kwargs = {"softmax_threshold": 1.0} if sparse else {}
    model.train()
    times, loss0 = [], None
    for i in range(steps + 2):
        model.zero_grad(set_to_none=True)
        sync(device)
        t0 = time.perf_counter()
        loss = model(ids, labels=ids, **kwargs).loss
        loss.backward()
        sync(device)
        if loss0 is None:
            loss0 = loss.item()
        if i >= 2:  # warm-up: first calls compile
            times.append((time.perf_counter() - t0) * 1e3)
    model.zero_grad(set_to_none=True)
    return statistics.median(times), loss0


def generate(model, prompt, new_tokens, device):
    model.eval()
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=2, do_sample=False)  # warm-up
        sync(device)
        t0 = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False)
        sync(device)
    return (time.perf_counter() - t0) * 1e3, out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 8])
    ap.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--generate", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="small float32 model on the CPU")
    ap.add_argument("--out", type=Path, default=ROOT / "tests" / "bench_out")
    args = ap.parse_args(argv)
    device = "cpu" if args.tiny else "cuda"
    dtype = torch.float32 if args.tiny else torch.bfloat16
    fsa = load_package()
    from bench_utils import _repo_id

    repo_id = _repo_id()
    os.environ.setdefault("LOCAL_KERNELS", f"{repo_id}={ROOT / 'build'}")
    register(fsa)
    rows = []
    for layers in args.layers:
        for tokens in args.tokens:
            cfg = llama_config(tokens, layers, args.tiny)
            models = build_models(cfg, args.impls, repo_id, device, dtype)
            g = torch.Generator().manual_seed(1)
            ids = torch.randint(3, cfg.vocab_size, (1, tokens), generator=g).to(device)
            base_ms = base_loss = None
            for impl, model in models.items():
                ms, loss = train_step_time(model, ids, args.steps, device, impl == "fsa_sparse")
                if impl == "sdpa":
                    base_ms, base_loss = ms, loss
                row = {"layers": layers, "tokens": tokens, "impl": impl, "step_ms": ms,
                       "tokens_per_s": tokens / ms * 1e3, "loss": loss,
                       "loss_diff_vs_sdpa": None if base_loss is None else abs(loss - base_loss),
                       "vs_sdpa": None if base_ms is None else ms / base_ms}
                rows.append(row)
                print(row, flush=True)
            if args.generate:
                prompt = ids[:, :min(512, tokens)]
                ref_tokens = None
                for impl in ("sdpa", "hub"):
                    if impl not in models:
                        continue
                    ms, out = generate(models[impl], prompt, 32, device)
                    ref_tokens = out if ref_tokens is None else ref_tokens
                    rows.append({"layers": layers, "tokens": prompt.shape[1], "impl": impl,
                                 "generate_ms": ms, "same_tokens_as_sdpa":
                                 bool(torch.equal(out, ref_tokens))})
                    print(rows[-1], flush=True)
            del models
            if device == "cuda":
                torch.cuda.empty_cache()
    write_csv(args.out / "benchmark_model.csv", rows)
    print_table(rows, ["layers", "tokens", "impl", "step_ms", "tokens_per_s", "vs_sdpa",
                       "loss_diff_vs_sdpa", "generate_ms", "same_tokens_as_sdpa"])
    return rows


if __name__ == "__main__":
    main()
