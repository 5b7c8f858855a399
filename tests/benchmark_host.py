"""Host cost per call: `python tests/benchmark_host.py [--calls N]` (needs a CUDA GPU).

At B=2, S=256, H=16, Hkv=4, D=64, bf16, causal the GPU work of one attention call is a few
microseconds, so an eager loop measures what the host spends per call: validation, the op
layers, autograd, the Triton launches. For this project's dense and sparse functions and SDPA
(cuDNN, flash): the wall time per call of N back-to-back forward calls (no grad) and of N
forward + backward calls, synchronised once at the end. Prints the acceptance lines of the
call-path issue: forward + backward <= 1.5x SDPA cuDNN's, forward <= 2x.
"""

from __future__ import annotations

import argparse
import time

import torch

from bench_utils import load_package, print_table


def per_call_us(fn, calls: int) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls * 1e6


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=500)
    args = ap.parse_args()
    fsa = load_package()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    b, s, h, hkv, d = 2, 256, 16, 4, 64
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(b, s, h, d, device="cuda", generator=gen, dtype=torch.bfloat16)
    k = torch.randn(b, s, hkv, d, device="cuda", generator=gen, dtype=torch.bfloat16)
    v = torch.randn(b, s, hkv, d, device="cuda", generator=gen, dtype=torch.bfloat16)
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
        "fsa dense": (lambda q_, k_, v_: fsa.flash_dense_attn_func(q_, k_, v_, is_causal=True),
                      (q, k, v)),
        "fsa sparse": (lambda q_, k_, v_: fsa.flash_sparse_attn_func(q_, k_, v_, is_causal=True),
                       (q, k, v)),
        "sdpa cudnn": (sdpa(SDPBackend.CUDNN_ATTENTION), (qt, kt, vt)),
        "sdpa flash": (sdpa(SDPBackend.FLASH_ATTENTION), (qt, kt, vt)),
    }
    rows = []
    for name, (fn, ins) in impls.items():
        leaves = [t.detach().requires_grad_() for t in ins]
        dout = torch.randn_like(ins[0])

        def fwd_bwd():
            torch.autograd.grad(fn(*leaves), leaves, dout)

        with torch.no_grad():
            fwd = per_call_us(lambda: fn(*ins), args.calls)
        rows.append({"impl": name, "fwd_us": fwd, "fwd_bwd_us": per_call_us(fwd_bwd, args.calls)})
        print(rows[-1], flush=True)
    print_table(rows, ["impl", "fwd_us", "fwd_bwd_us"])
    ref = next(r for r in rows if r["impl"] == "sdpa cudnn")
    print("\nacceptance (this run):")
    for r in rows:
        if r["impl"].startswith("fsa"):
            f, fb = r["fwd_us"] / ref["fwd_us"], r["fwd_bwd_us"] / ref["fwd_bwd_us"]
            print(f"  {r['impl']}: forward {r['fwd_us']:.0f} us = {f:.2f}x cuDNN's -> "
                  f"{'PASS' if f <= 2.0 else 'FAIL'} (<= 2x); forward+backward "
                  f"{r['fwd_bwd_us']:.0f} us = {fb:.2f}x -> {'PASS' if fb <= 1.5 else 'FAIL'} "
                  "(<= 1.5x)")


if __name__ == "__main__":
    main()
