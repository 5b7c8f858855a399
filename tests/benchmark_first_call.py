"""First-call latency and first-vs-second call: `python tests/benchmark_first_call.py`.

Each variant (dense, sparse, gated) runs in its own fresh Python process with an empty Triton
cache directory, so its first call pays everything a user's first call pays: Triton's
one-time start-up in the process, and the JIT compilation of the kernels that call needs (no
autotuning: launch configs come from the embedded tables). Per variant it prints the first
forward alone, then the first backward of that shape, the second forward+backward, and whether
the first and second call agree bit for bit (out, dq, dk, dv and, gated, dalpha, ddelta).
`--variants` picks some; `--fwd-only` skips the backward.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = ("dense", "sparse", "gated")


def child(variant: str, fwd_only: bool) -> dict:
    """One variant's first and second call, in this (fresh) process."""
    import torch

    from bench_utils import load_package

    fsa = load_package()
    b, s, h, hkv, d = 1, 4096, 32, 8, 128
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(b, s, n, d, device="cuda", generator=g, dtype=torch.bfloat16)
               for n in (h, hkv, hkv))
    extra = []
    if variant == "gated":
        extra = [torch.rand(b, h, s, device="cuda", generator=g).bfloat16() + 1,
                 torch.randn(b, hkv, s, device="cuda", generator=g).bfloat16()]
    fn = getattr(fsa, f"flash_{variant}_attn_func")
    do = torch.randn_like(q)

    def call(grad: bool):
        leaves = [t.detach().requires_grad_(grad) for t in (q, k, v, *extra)]
        t0 = time.perf_counter()
        out = fn(*leaves, is_causal=True)
        torch.cuda.synchronize()
        t_fwd = time.perf_counter() - t0
        grads = []
        if grad:
            t0 = time.perf_counter()
            grads = torch.autograd.grad(out, leaves, do)
            torch.cuda.synchronize()
            return out, grads, t_fwd, time.perf_counter() - t0
        return out, grads, t_fwd, 0.0

    out1, g1, fwd1, bwd1 = call(not fwd_only)
    out2, g2, fwd2, bwd2 = call(not fwd_only)
    same = torch.equal(out1, out2) and all(torch.equal(a, c) for a, c in zip(g1, g2))
    return dict(variant=variant, shape=f"B={b} S={s} H={h} Hkv={hkv} D={d} causal",
                first_fwd_s=fwd1, first_bwd_s=bwd1, second_ms=(fwd2 + bwd2) * 1e3, same=same)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--fwd-only", action="store_true")
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.fwd_only)), flush=True)
        return
    failed = False
    for variant in args.variants:
        env = dict(os.environ, TRITON_CACHE_DIR=tempfile.mkdtemp(prefix="fsa-triton-cache-"))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", variant] + \
            (["--fwd-only"] if args.fwd_only else [])
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                              cwd=str(Path(__file__).resolve().parent))
        wall = time.perf_counter() - t0
        lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(f"{variant}: failed\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}")
            failed = True
            continue
        r = json.loads(lines[-1][len("RESULT "):])
        print(f"{variant} ({r['shape']}, cold Triton cache, fresh process): first forward "
              f"{r['first_fwd_s']:.2f} s, first backward {r['first_bwd_s']:.2f} s; second "
              f"call {r['second_ms']:.1f} ms; first == second bitwise: {r['same']}; process "
              f"wall time {wall:.1f} s")
        failed |= not r["same"]
    if failed:
        raise SystemExit("a variant failed, or its first and second call differ")


if __name__ == "__main__":
    main()
