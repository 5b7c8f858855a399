"""First-call latency and first-vs-second backward: `python tests/benchmark_first_call.py`.

Run in a fresh process (empty Triton cache dir by default): the first forward+backward of a
new shape includes JIT compilation of the kernels (no autotuning: launch configs come from the
embedded tables), and its gradients must equal those of the second call bit for bit.
"""

from __future__ import annotations

import os
import tempfile
import time

if "TRITON_CACHE_DIR" not in os.environ:  # measure a cold compile, not a warm cache
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="fsa-triton-cache-")

import torch  # noqa: E402

from bench_utils import load_package  # noqa: E402


def main():
    fsa = load_package()
    b, s, h, hkv, d = 1, 4096, 32, 8, 128
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(b, s, n, d, device="cuda", generator=g, dtype=torch.bfloat16)
               for n in (h, hkv, hkv))
    do = torch.randn_like(q)

    def step():
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out = fsa.flash_dense_attn_func(*leaves, is_causal=True)
        grads = torch.autograd.grad(out, leaves, do)
        torch.cuda.synchronize()
        return out, grads

    t0 = time.perf_counter()
    out1, g1 = step()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    out2, g2 = step()
    second = time.perf_counter() - t0
    same = torch.equal(out1, out2) and all(torch.equal(a, c) for a, c in zip(g1, g2))
    print(f"first call (fwd+bwd, cold JIT compile, shape B={b} S={s} H={h} Hkv={hkv} D={d}): "
          f"{first:.2f} s; second call: {second * 1e3:.1f} ms; "
          f"first == second (out, dq, dk, dv bitwise): {same}")
    if not same:
        raise SystemExit("first and second call differ")


if __name__ == "__main__":
    main()
