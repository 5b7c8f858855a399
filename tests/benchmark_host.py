"""Host cost per call: `python tests/benchmark_host.py [--calls N] [--reps R]` (needs a CUDA GPU).

At B=2, S=256, H=16, Hkv=4, D=64, bf16, causal the GPU work of one attention call is a few
microseconds, so an eager loop measures what the host spends per call: validation, the op
layers, autograd, the Triton launches. For this project's dense, sparse and gated functions
and SDPA (cuDNN, flash): the wall time per call of N back-to-back forward calls (no grad) and
of N forward + backward calls, synchronised once at the end. Decode (B=1, 64k cached keys,
H=32, Hkv=8, D=128; top-k: 2048 gathered keys) the same way, next to SDPA cuDNN on the same
cache: there the GPU time is part of each call. The implementations take turns, R rounds,
and each number is the median over the rounds (the host's speed drifts between seconds).
Prints the acceptance lines of the call-path issue: forward + backward <= 1.5x SDPA cuDNN's,
forward <= 2x; decode within 1.3x of cuDNN's, top-k 2048 under 0.1 ms.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench_utils import load_package, print_table


def per_call_us(fn, calls: int) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls * 1e6


def training_cases(fsa, gen):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    b, s, h, hkv, d = 2, 256, 16, 4, 64
    q = torch.randn(b, s, h, d, device="cuda", generator=gen, dtype=torch.bfloat16)
    k = torch.randn(b, s, hkv, d, device="cuda", generator=gen, dtype=torch.bfloat16)
    v = torch.randn(b, s, hkv, d, device="cuda", generator=gen, dtype=torch.bfloat16)
    alpha = torch.randn(b, h, s, device="cuda", generator=gen, dtype=torch.bfloat16)
    delta = torch.randn(b, hkv, s, device="cuda", generator=gen, dtype=torch.bfloat16)
    # SDPA takes [B, H, S, D]; K/V expanded to H heads outside the timed region
    qt = q.transpose(1, 2).contiguous()
    kt = k.transpose(1, 2).repeat_interleave(h // hkv, 1).contiguous()
    vt = v.transpose(1, 2).repeat_interleave(h // hkv, 1).contiguous()

    def sdpa(backend):
        def run(q_, k_, v_):
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(q_, k_, v_,
                                                                        is_causal=True)
        return run

    impls = {
        "fsa dense": (lambda *t: fsa.flash_dense_attn_func(*t, is_causal=True), (q, k, v)),
        "fsa sparse": (lambda *t: fsa.flash_sparse_attn_func(*t, is_causal=True), (q, k, v)),
        "fsa gated": (lambda *t: fsa.flash_gated_attn_func(*t, is_causal=True),
                      (q, k, v, alpha, delta)),
        "sdpa cudnn": (sdpa(SDPBackend.CUDNN_ATTENTION), (qt, kt, vt)),
        "sdpa flash": (sdpa(SDPBackend.FLASH_ATTENTION), (qt, kt, vt)),
    }
    cases = {}
    for name, (fn, ins) in impls.items():
        leaves = [t.detach().requires_grad_() for t in ins]
        dout = torch.randn_like(ins[0])

        def fwd(fn=fn, ins=ins):
            with torch.no_grad():
                fn(*ins)

        def fwd_bwd(fn=fn, leaves=leaves, dout=dout):
            torch.autograd.grad(fn(*leaves), leaves, dout)

        cases[name] = {"fwd_us": fwd, "fwd_bwd_us": fwd_bwd}
    return cases


def decode_cases(fsa, gen):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    sk, h, hkv, d, topk = 65536, 32, 8, 128, 2048
    q = torch.randn(1, h, d, device="cuda", generator=gen, dtype=torch.bfloat16)
    kc = torch.randn(1, sk, hkv, d, device="cuda", generator=gen, dtype=torch.bfloat16)
    vc = torch.randn(1, sk, hkv, d, device="cuda", generator=gen, dtype=torch.bfloat16)
    idx = torch.randperm(sk, device="cuda", generator=gen)[:topk].to(torch.int32).view(1, topk)
    q4, k4, v4 = q[:, :, None], kc.transpose(1, 2).contiguous(), vc.transpose(1, 2).contiguous()

    def cudnn():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            torch.nn.functional.scaled_dot_product_attention(q4, k4, v4, enable_gqa=True)

    return {
        "fsa decode 64k": {"decode_us": lambda: fsa.flash_dense_attn_with_kvcache_func(q, kc, vc)},
        "fsa top-k 2048": {"decode_us": lambda: fsa.flash_dense_attn_with_kvcache_func(
            q, kc, vc, gather_kv_indices=idx)},
        "sdpa cudnn decode 64k": {"decode_us": cudnn},
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    fsa = load_package()
    gen = torch.Generator(device="cuda").manual_seed(0)
    cases = {**training_cases(fsa, gen), **decode_cases(fsa, gen)}
    for modes in cases.values():  # warm-up: compiles, first-call work
        for fn in modes.values():
            for _ in range(20):
                fn()
    times = {(name, m): [] for name, modes in cases.items() for m in modes}
    for _ in range(args.reps):
        for name, modes in cases.items():
            for m, fn in modes.items():
                times[(name, m)].append(per_call_us(fn, args.calls))
    rows = []
    for name, modes in cases.items():
        rows.append({"impl": name, **{m: statistics.median(times[(name, m)]) for m in modes}})
    print_table(rows, ["impl", "fwd_us", "fwd_bwd_us", "decode_us"])
    by = {r["impl"]: r for r in rows}
    ref = by["sdpa cudnn"]
    print("\nacceptance (this run):")
    for r in rows:
        if r["impl"] in ("fsa dense", "fsa sparse", "fsa gated"):
            f, fb = r["fwd_us"] / ref["fwd_us"], r["fwd_bwd_us"] / ref["fwd_bwd_us"]
            print(f"  {r['impl']}: forward {r['fwd_us']:.0f} us = {f:.2f}x cuDNN's -> "
                  f"{'PASS' if f <= 2.0 else 'FAIL'} (<= 2x); forward+backward "
                  f"{r['fwd_bwd_us']:.0f} us = {fb:.2f}x -> {'PASS' if fb <= 1.5 else 'FAIL'} "
                  "(<= 1.5x)")
    dec, top = by["fsa decode 64k"]["decode_us"], by["fsa top-k 2048"]["decode_us"]
    cud = by["sdpa cudnn decode 64k"]["decode_us"]
    print(f"  decode 64k: {dec:.0f} us = {dec / cud:.2f}x cuDNN's -> "
          f"{'PASS' if dec <= 1.3 * cud else 'FAIL'} (<= 1.3x); top-k 2048: {top:.0f} us -> "
          f"{'PASS' if top < 100 else 'FAIL'} (< 100 us)")


if __name__ == "__main__":
    main()
