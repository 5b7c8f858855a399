"""Sparse and gated benchmark: `python tests/benchmark_sparse.py [--seqlens ...] [--out DIR]`.

LLM-like inputs (attention sinks + positional locality) and random inputs, bf16, causal,
B=1, H=32, Hkv=8, D=128. For each softmax threshold: forward and backward time of this
project's sparse attention, next to this project's dense attention and SDPA cuDNN dense (same
run, same inputs), the fraction of (query block, key block) pairs skipped, and the output error
against exact dense attention (float64 on 256 sampled query rows), so users see the accuracy
they trade. Gated: no gate sparsity vs the default gate threshold. CSV + PNG under --out.
"""

from __future__ import annotations

import argparse

import torch

from bench_utils import (ROOT, bench, finish_axes, load_package, plot, print_table, save_figure,
                         sdpa_impl, write_csv)


def llm_like(s, h, hkv, d, seed=0, device="cuda", pos_scale=1.2):
    """Attention sinks plus positional locality, as in trained LLMs: queries and keys carry a
    rotary-style positional code (sinusoids over 1 .. 2048 tokens), so q_i.k_j is large for
    nearby j and small far away; 8 sink keys align with a direction every query shares.
    `pos_scale` sets the weight of the positional code."""
    import math

    g = torch.Generator(device=device).manual_seed(seed)
    t = torch.arange(s, device=device, dtype=torch.float32)[:, None, None]
    omega = torch.exp(-torch.linspace(0, math.log(2048), d // 2, device=device))
    group = h // hkv
    # one positional code per KV head, shared by the query heads of its group
    phase = 6.28 * torch.rand(hkv, d // 2, device=device, generator=g)
    ang = omega * t + phase  # [S, Hkv, D/2]
    pos = torch.cat([torch.cos(ang), torch.sin(ang)], -1)  # [S, Hkv, D]
    common = torch.randn(hkv, d, device=device, generator=g)
    q = (pos_scale * pos + 0.6 * common).repeat_interleave(group, 1) \
        + 0.3 * torch.randn(s, h, d, device=device, generator=g)
    k = pos_scale * pos + 0.3 * torch.randn(s, hkv, d, device=device, generator=g)
    k[:8] += 1.8 * common
    v = torch.randn(s, hkv, d, device=device, generator=g)
    return [x[None].to(torch.bfloat16).contiguous() for x in (q, k, v)]


def mixed_heads(s, h, hkv, d, seed=0):
    """Half the KV heads (and their query heads) LLM-like, half random, as in trained models
    where local/sink heads sit beside diffuse ones: t=1 skips about half of what it skips on
    "llm" (25-40% of the blocks), so a kernel must pay in proportion to what it skips."""
    q, k, v = llm_like(s, h, hkv, d, seed)
    rq, rk, rv = random_inputs(s, h, hkv, d, seed + 1)
    group, half = h // hkv, hkv // 2
    q[:, :, half * group:] = rq[:, :, half * group:]
    k[:, :, half:] = rk[:, :, half:]
    v[:, :, half:] = rv[:, :, half:]
    return q, k, v


INPUTS = {"llm": llm_like, "mixed": mixed_heads}


def random_inputs(s, h, hkv, d, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(1, s, n, d, device="cuda", generator=g).to(torch.bfloat16)
            for n in (h, hkv, hkv)]


def gate_inputs(s, h, hkv, closed=0.7, shut=160.0, seed=2, device="cuda"):
    """Gates that close most keys, as a trained gate does: alpha in [1, 2] per query; delta
    ~ N(0, 1) on open keys and lowered by `shut` on a random `closed` fraction of 64-key
    blocks, aligned to the skip blocks (the 8 sink keys stay open). A closed key's gate is
    about -shut * alpha, so exp(scale * g) < exp(-150 / sqrt(128)) ~ 2e-6 at D=128: the key
    is switched off, and the default gate threshold (1 / seqlen_k, SPEC §6) can skip its
    blocks. Gates of a few units would not: scaled by 1 / sqrt(D) they move a logit by less
    than one."""
    g = torch.Generator(device=device).manual_seed(seed)
    alpha = (1 + torch.rand(1, h, s, device=device, generator=g)).to(torch.bfloat16)
    delta = torch.randn(1, hkv, s, device=device, generator=g)
    shut_key = (torch.rand(1, hkv, s // 64 + 1, device=device, generator=g) < closed
                ).repeat_interleave(64, -1)[:, :, :s]  # whole 64-key blocks
    shut_key[:, :, :8] = False
    delta -= shut * shut_key
    return alpha, delta.to(torch.bfloat16)


def exact_rows(q, k, v, rows, scale, alpha=None, delta=None):
    """float64 dense causal attention for the sampled query rows: [len(rows), H, D]."""
    group = q.shape[2] // k.shape[2]
    kk = k[0].double().repeat_interleave(group, 1)  # [S, H, D]
    vv = v[0].double().repeat_interleave(group, 1)
    out = []
    for r in rows.tolist():
        sc = torch.einsum("hd,shd->hs", q[0, r].double(), kk[: r + 1])
        if alpha is not None:
            x = alpha[0, :, r].double()[:, None] * \
                delta[0].double().repeat_interleave(group, 0)[:, : r + 1]
            sc = sc + torch.nn.functional.logsigmoid(x)
        p = torch.softmax(sc * scale, -1)
        out.append(torch.einsum("hs,shd->hd", p, vv[: r + 1]))
    return torch.stack(out)


def timed(fn, ins, mode):
    leaves = [t.detach().requires_grad_(mode == "bwd") for t in ins]
    if mode == "fwd":
        return bench(lambda: fn(*leaves))
    out = fn(*leaves)
    out = out[0] if isinstance(out, tuple) else out
    g = torch.randn_like(out)
    return bench(lambda: torch.autograd.grad(out, leaves, g, retain_graph=True))


def add_timings(row, fn, ins, modes, base, paths=None):
    """Time fn on ins per mode; add times and ratios to our dense and to cuDNN dense.
    `paths` ({name: context manager factory}): also time the forward on those kernel paths
    (configs.fwd_path_override), to compare the path taken with them in the same run."""
    for m in modes:
        ms = timed(fn, ins, m)
        row[f"{m}_ms"] = ms
        row[f"{m}_dense_ms"] = base[m]["dense"]
        row[f"{m}_cudnn_ms"] = base[m]["cudnn"]
        row[f"{m}_speedup_vs_cudnn"] = base[m]["cudnn"] / ms
        row[f"{m}_vs_dense"] = ms / base[m]["dense"]
    for name, ctx in (paths or {}).items():
        if "fwd" in modes:
            with ctx():
                row[f"fwd_{name}_ms"] = timed(fn, ins, "fwd")
    if paths:
        row["fwd_dense_portable_ms"] = base["fwd"].get("dense_portable")


def plot_vs_skipped(path, rows):
    """Forward time over our dense forward against the skipped fraction, one series per input
    family, with the line kept + 0.45 * skipped (a skipped block costing 45% of a kept one)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib not available: no plot {path}")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, seqlen in sorted({(r["inputs"], int(r["seqlen"])) for r in rows}):
        pts = sorted((float(r["skipped"]), float(r["fwd_vs_dense"])) for r in rows
                     if (r["inputs"], int(r["seqlen"])) == (kind, seqlen)
                     and r["variant"] == "sparse" and r.get("fwd_vs_dense") not in (None, ""))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o" if seqlen >= 16384 else "x",
                label=f"{kind} {seqlen // 1024}k")
    ax.plot([0, 1], [1, 0.45], "k--", lw=1, label="kept + 0.45 x skipped")
    ax.set_xlabel("skipped fraction of visited blocks")
    ax.set_ylabel("sparse fwd time / our dense fwd time")
    ax.set_title("sparse forward vs skipped fraction (H200, bf16, D=128)")
    finish_axes(ax)
    save_figure(fig, path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqlens", type=int, nargs="+", default=[4096, 16384, 65536])
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.0, 0.1, 1.0, 10.0])
    ap.add_argument("--inputs", nargs="+", default=["llm", "mixed", "random"])
    ap.add_argument("--no-bwd", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "tests" / "bench_out"))
    ap.add_argument("--replot", metavar="CSV",
                    help="only redraw the time-vs-skipped plot from a CSV this script wrote")
    args = ap.parse_args()
    if args.replot:
        import csv
        from pathlib import Path

        with open(args.replot) as f:
            plot_vs_skipped(Path(args.out) / "benchmark_sparse_skipped.png", list(csv.DictReader(f)))
        return
    fsa = load_package()
    import importlib

    configs = importlib.import_module(f"{fsa.__name__}.triton.configs")
    portable = lambda: configs.fwd_path_override("portable")  # noqa: E731
    paths = {"tma": lambda: configs.fwd_path_override("tma"), "portable": portable}
    h, hkv, d = 32, 8, 128
    scale = d ** -0.5
    rows_out = []
    modes = ["fwd"] if args.no_bwd else ["fwd", "bwd"]
    for kind in args.inputs:
        for s in args.seqlens:
            q, k, v = INPUTS.get(kind, random_inputs)(s, h, hkv, d)
            sample = torch.randint(0, s, (256,), generator=torch.Generator().manual_seed(1))
            exact = exact_rows(q, k, v, sample.cuda(), scale)
            prep, run = sdpa_impl("cudnn", True)
            base = {m: {} for m in modes}
            for m in modes:
                base[m]["cudnn"] = timed(run, prep(q, k, v), m)
                base[m]["dense"] = timed(
                    lambda q_, k_, v_: fsa.flash_dense_attn_func(q_, k_, v_, is_causal=True),
                    (q, k, v), m)
            with portable():
                base["fwd"]["dense_portable"] = timed(
                    lambda q_, k_, v_: fsa.flash_dense_attn_func(q_, k_, v_, is_causal=True),
                    (q, k, v), "fwd")
            dense_out = fsa.flash_dense_attn_func(q, k, v, is_causal=True)
            dense_err = (dense_out[0, sample].double() - exact).abs().max().item()
            for t in args.thresholds:
                out, skip = fsa.flash_sparse_attn_func(q, k, v, is_causal=True,
                                                       softmax_threshold=t,
                                                       return_skip_mask=True)
                st = fsa.block_skip_stats(skip)
                row = {"inputs": kind, "seqlen": s, "variant": "sparse", "threshold": t,
                       "skipped": st["skipped_fraction"],
                       "err_vs_exact": (out[0, sample].double() - exact).abs().max().item(),
                       "dense_err_vs_exact": dense_err}
                fn = lambda q_, k_, v_, t=t: fsa.flash_sparse_attn_func(  # noqa: E731
                    q_, k_, v_, is_causal=True, softmax_threshold=t)
                add_timings(row, fn, (q, k, v), modes, base, paths)
                rows_out.append(row)
                print(row, flush=True)
            if kind == "llm":
                alpha, delta = gate_inputs(s, h, hkv)
                for gt, label in ((0.0, "gated (no gate sparsity)"),
                                  (None, "gated (default gate threshold)")):
                    out, skip = fsa.flash_gated_attn_func(q, k, v, alpha, delta, is_causal=True,
                                                          gate_threshold=gt,
                                                          return_skip_mask=True)
                    ex = exact_rows(q, k, v, sample.cuda(), scale, alpha, delta)
                    st = fsa.block_skip_stats(skip)
                    row = {"inputs": kind, "seqlen": s, "variant": label, "threshold": 0.0,
                           "skipped": st["skipped_fraction"],
                           "err_vs_exact": (out[0, sample].double() - ex).abs().max().item()}
                    fn = lambda q_, k_, v_, a_, d_, gt=gt: fsa.flash_gated_attn_func(  # noqa
                        q_, k_, v_, a_, d_, is_causal=True, gate_threshold=gt)
                    add_timings(row, fn, (q, k, v, alpha, delta), modes, base, paths)
                    rows_out.append(row)
                    print(row, flush=True)
            del q, k, v
            torch.cuda.empty_cache()
    from pathlib import Path

    out_dir = Path(args.out)
    write_csv(out_dir / "benchmark_sparse.csv", rows_out)
    plot(out_dir / "benchmark_sparse.png",
         [dict(r, series=f"{r['variant']} t={r['threshold']}") for r in rows_out
          if r["inputs"] == "llm"],
         "seqlen", "fwd_speedup_vs_cudnn", "series", "sparse fwd speedup vs cuDNN dense (LLM-like)")
    plot_vs_skipped(out_dir / "benchmark_sparse_skipped.png", rows_out)
    cols = ["inputs", "seqlen", "variant", "threshold", "skipped", "err_vs_exact",
            "fwd_dense_ms", "fwd_tma_ms", "fwd_portable_ms"] + \
        [c for m in modes for c in (f"{m}_ms", f"{m}_cudnn_ms", f"{m}_speedup_vs_cudnn",
                                    f"{m}_vs_dense")]
    print_table(rows_out, cols)


if __name__ == "__main__":
    main()
