"""Varlen and local-window benchmark: `python tests/benchmark_varlen_local.py [--out DIR]`.

bf16, D=128, H=32, Hkv=8, causal, forward (and backward with --bwd).
- varlen: mixed sequence lengths summing to 16k / 64k tokens, against the same number of tokens
  as one batch of equal-length sequences, and against SDPA cuDNN on the sequences padded to the
  longest one (padding fractions reported). TFLOP/s count only the real (causal) work.
- local: default flex bands (window_sizes_heuristic: sink 64, near 1024, Hkv far bands) at
  16k..128k against causal dense; time ratio next to the visible-area ratio.
CSV + PNG under --out.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bench_utils import ROOT, bench, load_package, plot, print_table, sdpa_impl, write_csv

H, HKV, D = 32, 8, 128


def causal_flops(lengths, d=D, h=H):
    return sum(4.0 * h * n * (n + 1) / 2 * d for n in lengths)


def mixed_lengths(total, seed, lo=256, hi=4096):
    g = torch.Generator().manual_seed(seed)
    lens = []
    while sum(lens) < total:
        lens.append(int(torch.randint(lo, hi + 1, (1,), generator=g)))
    lens[-1] -= sum(lens) - total
    if lens[-1] <= 0:
        lens.pop()
        lens[-1] += total - sum(lens)
    return lens


def run_varlen(fsa, total, seed, rows, bwd):
    lens = mixed_lengths(total, seed)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32,
                      device="cuda")
    q = torch.randn(total, H, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(total, HKV, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    mx = max(lens)
    flops = causal_flops(lens) * (2.5 if bwd else 1.0)

    def timed(fn, ins):
        if not bwd:
            return bench(lambda: fn(*ins))
        leaves = [t.detach().requires_grad_() for t in ins]
        out = fn(*leaves)
        g = torch.randn_like(out)
        return bench(lambda: torch.autograd.grad(out, leaves, g, retain_graph=True))

    ms_var = timed(lambda q_, k_, v_: fsa.flash_dense_attn_varlen_func(
        q_, k_, v_, cu, cu, mx, mx, is_causal=True), (q, k, v))
    # same tokens as a batch of equal lengths (mean length)
    n_eq = total // len(lens)
    b_eq = total // n_eq
    qb = q[: b_eq * n_eq].view(b_eq, n_eq, H, D)
    kb = k[: b_eq * n_eq].view(b_eq, n_eq, HKV, D)
    vb = v[: b_eq * n_eq].view(b_eq, n_eq, HKV, D)
    ms_bat = timed(lambda q_, k_, v_: fsa.flash_dense_attn_func(q_, k_, v_, is_causal=True),
                   (qb, kb, vb))
    flops_bat = causal_flops([n_eq] * b_eq) * (2.5 if bwd else 1.0)
    # padded SDPA cuDNN
    pad_q = torch.zeros(len(lens), mx, H, D, device="cuda", dtype=torch.bfloat16)
    pad_k = torch.zeros(len(lens), mx, HKV, D, device="cuda", dtype=torch.bfloat16)
    for i, n in enumerate(lens):
        pad_q[i, :n] = q[cu[i]: cu[i] + n]
        pad_k[i, :n] = k[cu[i]: cu[i] + n]
    prep, run = sdpa_impl("cudnn", True)
    ms_pad = timed(run, prep(pad_q, pad_k, pad_k))
    padding = 1 - total / (len(lens) * mx)
    row = {"case": "varlen", "tokens": total, "seqs": len(lens), "max_len": mx,
           "padding": padding, "mode": "bwd" if bwd else "fwd",
           "varlen_tflops": flops / ms_var * 1e-9, "batched_tflops": flops_bat / ms_bat * 1e-9,
           "padded_cudnn_tflops": flops / ms_pad * 1e-9,
           "varlen_vs_batched": (flops / ms_var) / (flops_bat / ms_bat),
           "varlen_vs_padded_cudnn": ms_pad / ms_var}
    rows.append(row)
    print(row, flush=True)


def run_local(fsa, s, rows, bwd):
    q = torch.randn(1, s, H, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, s, HKV, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    win = fsa.window_sizes_heuristic(s, HKV, "cuda")
    # visible area of the default bands relative to causal, per head, averaged
    i = torch.arange(s, device="cuda", dtype=torch.int64)
    area = 0.0
    for h in range(HKV):
        sink, left, right, near = (int(x) for x in win[h])
        e = i  # dist = i - j; key j visible iff dist >= 0 and a band holds it
        near_c = torch.clamp(torch.minimum(e + 1, torch.tensor(near)), min=0)
        f_hi = torch.clamp(e - near - right + 1, min=0)
        f_lo = torch.clamp(e - near - right - left + 1, min=0)
        far_c = torch.clamp(f_hi - f_lo, min=0)
        s_hi = torch.clamp(torch.minimum(torch.tensor(sink), e + 1), min=0)
        n_lo = torch.clamp(e - near + 1, min=0)
        overlap = torch.clamp(s_hi - n_lo, min=0) + torch.clamp(torch.minimum(s_hi, f_hi) - f_lo,
                                                                min=0)
        area += float((near_c + far_c + s_hi - overlap).sum()) / (s * (s + 1) / 2)
    area /= HKV

    def timed(fn):
        if not bwd:
            return bench(lambda: fn(q, k, v))
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        g = torch.randn_like(out)
        return bench(lambda: torch.autograd.grad(out, leaves, g, retain_graph=True))

    ms_c = timed(lambda q_, k_, v_: fsa.flash_dense_attn_func(q_, k_, v_, is_causal=True))
    ms_l = timed(lambda q_, k_, v_: fsa.flash_dense_attn_func(q_, k_, v_, is_local=True))
    row = {"case": "local", "tokens": s, "mode": "bwd" if bwd else "fwd",
           "causal_ms": ms_c, "local_ms": ms_l, "time_ratio": ms_l / ms_c,
           "visible_area_ratio": area, "ratio_over_area": (ms_l / ms_c) / area}
    rows.append(row)
    print(row, flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--varlen-tokens", type=int, nargs="*", default=[16384, 65536])
    ap.add_argument("--local-seqlens", type=int, nargs="*", default=[16384, 65536, 131072])
    ap.add_argument("--bwd", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "tests" / "bench_out"))
    args = ap.parse_args()
    fsa = load_package()
    rows = []
    for bwd in ([False, True] if args.bwd else [False]):
        for t in args.varlen_tokens:
            run_varlen(fsa, t, seed=t, rows=rows, bwd=bwd)
        for s in args.local_seqlens:
            run_local(fsa, s, rows, bwd)
    out = Path(args.out)
    write_csv(out / "benchmark_varlen_local.csv", rows)
    plot(out / "benchmark_local.png",
         [dict(r, series=f"{r['mode']} time/causal") for r in rows if r["case"] == "local"]
         + [dict(r, series="visible area", time_ratio=r["visible_area_ratio"])
            for r in rows if r["case"] == "local" and r["mode"] == "fwd"],
         "tokens", "time_ratio", "series", "default-band local attention vs causal")
    print_table([r for r in rows if r["case"] == "varlen"],
                ["mode", "tokens", "seqs", "max_len", "padding", "varlen_tflops",
                 "batched_tflops", "padded_cudnn_tflops", "varlen_vs_batched",
                 "varlen_vs_padded_cudnn"])
    print_table([r for r in rows if r["case"] == "local"],
                ["mode", "tokens", "causal_ms", "local_ms", "time_ratio", "visible_area_ratio",
                 "ratio_over_area"])


if __name__ == "__main__":
    main()
