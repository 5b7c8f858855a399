"""Sweep launch configs of the attention kernels on this GPU and write a launch table.

    python scripts/tune.py --out kernels_src/launch_tables.json [--dims 64 128 256]

Runs on a GPU only. The table it writes is reviewed like code and embedded into every build
variant (kernels_src/launch_tables.json -> <variant>/launch_tables.json), so a first call never
autotunes. Each candidate is timed with do_bench (median) on fresh buffers; gradients are never
accumulated into live buffers (every backward call writes new tensors).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from bench_utils import attn_flops, bench, load_package  # noqa: E402


# (block_m, block_n, num_warps, num_stages): a short list of shapes known to suit wgmma tiles;
# compile time, not timing, dominates a sweep, so the list stays short.
FWD_CANDIDATES = [(128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2), (128, 128, 8, 3),
                  (128, 64, 4, 3), (64, 64, 4, 3), (64, 128, 4, 3), (128, 32, 4, 4),
                  (64, 64, 4, 2)]
BWD_CANDIDATES = [(64, 128, 8, 2), (64, 128, 8, 3), (64, 128, 4, 2), (32, 128, 8, 2),
                  (32, 64, 4, 2), (64, 64, 8, 2), (64, 64, 4, 2), (32, 64, 4, 3),
                  (128, 64, 8, 2), (128, 128, 8, 1), (32, 32, 4, 2)]
DQ_CANDIDATES = [(128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2), (64, 128, 8, 2),
                 (64, 64, 4, 3), (64, 64, 8, 2), (128, 32, 8, 3)]


def _arch():
    major, minor = torch.cuda.get_device_capability()
    return f"sm{major}{minor}"


def _inputs(b, s, h, hkv, d, dtype=torch.bfloat16):
    q = torch.randn(b, s, h, d, device="cuda", dtype=dtype)
    k = torch.randn(b, s, hkv, d, device="cuda", dtype=dtype)
    v = torch.randn(b, s, hkv, d, device="cuda", dtype=dtype)
    return q, k, v


def sweep(fsa, d, seqlen, causal=True, b=1, h=32, hkv=8, top=5):
    from importlib import import_module

    pkg = fsa.__name__
    fwd = import_module(f"{pkg}.triton.fwd")
    bwd = import_module(f"{pkg}.triton.bwd")
    configs = import_module(f"{pkg}.triton.configs")
    q, k, v = _inputs(b, seqlen, h, hkv, d)
    do = torch.randn_like(q)
    kw = dict(alpha=None, delta=None, cu_seqlens_q=None, cu_seqlens_k=None, seqused_k=None,
              window_sizes=None, max_seqlen_q=seqlen, max_seqlen_k=seqlen,
              softmax_scale=d ** -0.5, is_causal=causal, softmax_threshold=0.0,
              gate_threshold=0.0, is_logsigmoid_gate=True, is_adapt_gate=False)
    flops_f = attn_flops(b, h, seqlen, seqlen, d, causal, "fwd")
    flops_b = attn_flops(b, h, seqlen, seqlen, d, causal, "bwd")

    results_f = []
    for bm, bn, w, st in FWD_CANDIDATES:
        if d >= 256 and bm * bn > 128 * 64:
            continue
        cfg = configs.Config(bm, bn, w, st)
        try:
            fn = lambda: fwd.launch_attn_fwd(q, k, v, deterministic=False, config=cfg, **kw)  # noqa: E731
            fn()
            ms = bench(fn, warmup=5, rep=30)
        except Exception as e:  # out of shared memory / registers
            print(f"  fwd {cfg}: {type(e).__name__}")
            continue
        results_f.append((ms, cfg))
    results_f.sort(key=lambda r: r[0])
    out, lse, skip = fwd.launch_attn_fwd(q, k, v, deterministic=False, config=results_f[0][1],
                                         **kw)
    for ms, cfg in results_f[:top]:
        print(f"  fwd d={d} S={seqlen} {cfg}: {ms:.3f} ms {flops_f / ms * 1e-9:.1f} TFLOP/s")

    def time_bwd(cfg, deterministic=False):
        fn = lambda: bwd.launch_attn_bwd(do, q, k, v, out, lse, skip,  # noqa: E731
                                         deterministic=deterministic, config=cfg, **kw)
        fn()
        return bench(fn, warmup=5, rep=30)

    # 1. dK/dV tiles (dQ pass fixed), 2. dQ-pass tiles, 3. atomic dQ instead of the pass
    results_b = []
    for bm, bn, w, st in BWD_CANDIDATES:
        if d >= 256 and bm * bn > 32 * 64:
            continue
        cfg = configs.BwdConfig(bm, bn, w, st, 64, 64, 8, 2)
        try:
            results_b.append((time_bwd(cfg), cfg))
        except Exception as e:  # out of shared memory / registers
            print(f"  bwd {cfg}: {type(e).__name__}")
    results_b.sort(key=lambda r: r[0])
    for ms, cfg in results_b[:top]:
        print(f"  bwd d={d} S={seqlen} {cfg}: {ms:.3f} ms {flops_b / ms * 1e-9:.1f} TFLOP/s")
    best_b = results_b[0][1]
    results_dq = []
    for bm, bn, w, st in DQ_CANDIDATES:
        if d >= 256 and bm * bn > 64 * 64:
            continue
        cfg = configs.BwdConfig(best_b.block_m, best_b.block_n, best_b.num_warps,
                                best_b.num_stages, bm, bn, w, st)
        try:
            results_dq.append((time_bwd(cfg), cfg))
        except Exception as e:
            print(f"  bwd-dq {cfg}: {type(e).__name__}")
    results_dq.sort(key=lambda r: r[0])
    best_ms, best = results_dq[0]
    print(f"  bwd with dQ pass d={d}: {best_ms:.3f} ms {flops_b / best_ms * 1e-9:.1f} TFLOP/s "
          f"{best}")
    atomic = configs.BwdConfig(*[getattr(best, f) for f in (
        "block_m", "block_n", "num_warps", "num_stages", "block_m_dq", "block_n_dq",
        "num_warps_dq", "num_stages_dq", "block_m_pre")], atomic_dq=True)
    try:
        atomic_ms = time_bwd(atomic)
        print(f"  bwd with atomic dQ d={d}: {atomic_ms:.3f} ms "
              f"{flops_b / atomic_ms * 1e-9:.1f} TFLOP/s")
        if atomic_ms < best_ms:
            best = atomic
    except Exception as e:
        print(f"  bwd atomic: {type(e).__name__}")

    bf = results_f[0][1]
    return (configs.fwd_path(q, k, v), [bf.block_m, bf.block_n, bf.num_warps, bf.num_stages],
            [best.block_m, best.block_n, best.num_warps, best.num_stages, best.block_m_dq,
             best.block_n_dq, best.num_warps_dq, best.num_stages_dq, best.block_m_pre,
             int(best.atomic_dq)])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=ROOT / "kernels_src" / "launch_tables.json")
    ap.add_argument("--dims", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--seqlen", type=int, default=8192)
    args = ap.parse_args()
    fsa = load_package()
    table = json.loads(args.out.read_text()) if args.out.exists() else {}
    arch = _arch()
    entry = table.setdefault(arch, {})
    for d in args.dims:
        # causal and full attention differ in the backward's best tiles (configs.bwd_config)
        path, f, b_causal = sweep(fsa, d, args.seqlen, causal=True)
        _, _, b = sweep(fsa, d, args.seqlen, causal=False)
        # the forward's table of the path it ran (configs.fwd_path: "fwd_tma" on Hopper)
        entry.setdefault("fwd_tma" if path == "tma" else "fwd", {})[f"d{d}"] = f
        entry.setdefault("bwd_causal", {})[f"d{d}"] = b_causal
        entry.setdefault("bwd", {})[f"d{d}"] = b
        print(f"d={d}: fwd {f} bwd causal {b_causal} bwd {b}", flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
        print(f"wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
