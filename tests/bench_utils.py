"""Shared by the benchmark scripts (not by tests): loading the package, baselines, FLOPs, output.

Benchmarks are scripts, never timed tests. Times are medians of `triton.testing.do_bench`
after warm-up; TFLOP/s use 4*B*H*Sq*Sk*D (causal x0.5, backward x2.5, sparse counted as dense).
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def load_package():
    """The bundle through `kernels.get_kernel` when `kernels` is importable (building it first),
    else the package sources from torch-ext (generating _ops.py). Returns the module."""
    try:
        import kernels  # noqa: F401

        have_kernels = True
    except ImportError:
        have_kernels = False
    if have_kernels and (ROOT / "scripts" / "build.py").exists():
        subprocess.run([sys.executable, str(ROOT / "scripts" / "build.py")], check=True,
                       stdout=subprocess.DEVNULL)
        repo_id = _repo_id()
        os.environ["LOCAL_KERNELS"] = f"{repo_id}={ROOT / 'build'}"
        from kernels import get_kernel

        return get_kernel(repo_id, version=1)
    pkg = ROOT / "torch-ext" / "flash_sparse_attn"
    if not (pkg / "_ops.py").exists():
        sys.path.insert(0, str(ROOT / "scripts"))
        import opsgen

        opsgen.write_ops(pkg, "dev", opsgen.source_revision(pkg))
    sys.path.insert(0, str(ROOT / "torch-ext"))
    import flash_sparse_attn

    return flash_sparse_attn


def _repo_id() -> str:
    text = (ROOT / "build.toml").read_text()
    for line in text.splitlines():
        if line.strip().startswith("repo-id"):
            return line.split("=", 1)[1].strip().strip('"')
    raise RuntimeError("build.toml has no [general.hub] repo-id")


def attn_flops(b, h, sq, sk, d, causal, mode="fwd"):
    f = 4.0 * b * h * sq * sk * d
    if causal:
        f *= 0.5
    return f * (2.5 if mode == "bwd" else 1.0)


def bench(fn, warmup=25, rep=100):
    import triton

    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def sdpa_impl(backend, causal):
    """(prepare, run) for SDPA: prepare transposes [B,S,H,D] to [B,H,S,D] and expands K/V for
    GQA (not every backend takes enable_gqa) outside the timed region."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    b = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend]

    def prepare(q, k, v):
        qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
        group = q.shape[2] // k.shape[2]
        if group > 1:
            kt = kt.repeat_interleave(group, 1)
            vt = vt.repeat_interleave(group, 1)
        return qt, kt, vt

    def run(qt, kt, vt):
        with sdpa_kernel(b):
            return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)

    return prepare, run


def flex_impl(causal):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)
    state = {}

    def prepare(q, k, v):
        sq, sk = q.shape[1], k.shape[1]
        off = sk - sq
        state["mask"] = create_block_mask(lambda b, h, i, j: i + off >= j, None, None, sq, sk,
                                          device=q.device) if causal else None
        return tuple(t.transpose(1, 2).contiguous() for t in (q, k, v))

    def run(qt, kt, vt):
        return compiled(qt, kt, vt, block_mask=state["mask"], enable_gqa=True)

    return prepare, run


def write_csv(path: Path, rows: list[dict]):
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = list(rows[0].keys()) if rows else []
    for r in rows:
        for k_ in r:
            if k_ not in keys:
                keys.append(k_)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def print_table(rows: list[dict], cols: list[str]):
    if not rows:
        return
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).rjust(w) for c, w in zip(cols, widths)))


def _fmt(x):
    if isinstance(x, float):
        return f"{x:.3f}" if abs(x) < 10 else f"{x:.1f}"
    return "-" if x is None else str(x)


def plot(path: Path, rows: list[dict], x: str, y: str, series: str, title: str, facet=None):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib not available: no plot {path}")
        return
    facets = sorted({r[facet] for r in rows}) if facet else [None]
    fig, axes = plt.subplots(1, len(facets), figsize=(5 * len(facets), 4), squeeze=False)
    for ax, fv in zip(axes[0], facets):
        sub = [r for r in rows if facet is None or r[facet] == fv]
        for s in sorted({r[series] for r in sub}):
            pts = sorted((r[x], r[y]) for r in sub if r[series] == s and r.get(y) is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=str(s))
        ax.set_xscale("log", base=2)
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.set_title(f"{title} {facet}={fv}" if facet else title)
        finish_axes(ax)
    save_figure(fig, path)


def finish_axes(ax):
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)


def save_figure(fig, path: Path):
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_attention_benchmark(mode: str, argv=None):
    """Forward (`mode="fwd"`) or backward (`"bwd"`) benchmark: this project vs SDPA flash,
    SDPA cuDNN and FlexAttention, same inputs, same run. Writes CSV + PNG, prints a table."""
    import argparse

    ap = argparse.ArgumentParser(description=f"attention {mode} benchmark")
    ap.add_argument("--seqlens", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    ap.add_argument("--dims", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--causal", type=int, nargs="+", default=[1, 0])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=16384, help="B = max(1, tokens // seqlen)")
    ap.add_argument("--baselines", nargs="*", default=["cudnn", "flash", "flex"])
    ap.add_argument("--flex-dims", type=int, nargs="*", default=[128],
                    help="FlexAttention only for these head dims (it compiles per shape)")
    ap.add_argument("--flex-seqlens", type=int, nargs="*", default=None,
                    help="FlexAttention only at these lengths (default: all)")
    ap.add_argument("--only-dims-at", type=str, default=None,
                    help="'D:S1,S2;D2:...' restricts head dim D to the listed lengths")
    ap.add_argument("--out", type=Path, default=ROOT / "tests" / "bench_out")
    args = ap.parse_args(argv)
    fsa = load_package()
    import importlib

    configs = importlib.import_module(f"{fsa.__name__}.triton.configs")
    torch.manual_seed(0)
    rows = []
    only = {}
    if args.only_dims_at:
        for part in args.only_dims_at.split(";"):
            dd, ss = part.split(":")
            only[int(dd)] = {int(x) for x in ss.split(",")}
    for d in args.dims:
        for causal in map(bool, args.causal):
            for s in args.seqlens:
                if d in only and s not in only[d]:
                    continue
                b = max(1, args.tokens // s)
                q = torch.randn(b, s, args.heads, d, device="cuda", dtype=torch.bfloat16)
                k = torch.randn(b, s, args.kv_heads, d, device="cuda", dtype=torch.bfloat16)
                v = torch.randn_like(k)
                impls = {"fsa": (lambda *t: t, lambda q_, k_, v_: fsa.flash_dense_attn_func(
                    q_, k_, v_, is_causal=causal))}
                if mode == "bwd":
                    # the portable backward next to the one configs.bwd_path picks (on
                    # Hopper: the Gluon kernel at D = 64 / 128); the path is forced around
                    # the backward call below
                    impls["portable"] = impls["fsa"]
                else:
                    # the other kernel paths next to the one configs.fwd_path picks (on
                    # Hopper: the Gluon kernel at D = 64 / 128, else the TMA path)
                    for path in ("tma", "portable"):
                        def forced(q_, k_, v_, path=path):
                            with configs.fwd_path_override(path):
                                return fsa.flash_dense_attn_func(q_, k_, v_, is_causal=causal)

                        impls[path] = (lambda *t: t, forced)
                for name in args.baselines:
                    if name == "flex" and (d not in args.flex_dims or (
                            args.flex_seqlens is not None and s not in args.flex_seqlens)):
                        continue
                    impls[name] = flex_impl(causal) if name == "flex" \
                        else sdpa_impl(name, causal)
                flops = attn_flops(b, args.heads, s, s, d, causal, mode)
                row = {"mode": mode, "d": d, "causal": int(causal), "seqlen": s, "batch": b}
                for name, (prepare, run) in list(impls.items()):
                    try:
                        ins = prepare(q, k, v)
                        if mode == "fwd":
                            call = (lambda run=run, ins=ins: run(*ins))
                        else:
                            leaves = [t.detach().requires_grad_() for t in ins]
                            out = run(*leaves)
                            g = torch.randn_like(out)

                            def call(out=out, g=g, leaves=leaves,
                                     path="portable" if name == "portable" else None):
                                with configs.fwd_path_override(path):
                                    return torch.autograd.grad(out, leaves, g,
                                                               retain_graph=True)
                        call()
                        ms = bench(call)
                        row[f"{name}_ms"] = ms
                        row[f"{name}_tflops"] = flops / ms * 1e-9
                    except Exception as e:
                        print(f"{name} failed d={d} s={s} causal={causal}: "
                              f"{type(e).__name__}: {str(e)[:200]}")
                        impls.pop(name)
                    ins = leaves = out = g = call = None
                if row.get("cudnn_tflops"):
                    for name in impls:
                        if row.get(f"{name}_tflops"):
                            row[f"{name}_vs_cudnn"] = row[f"{name}_tflops"] / row["cudnn_tflops"]
                rows.append(row)
                print({k_: (round(v_, 3) if isinstance(v_, float) else v_)
                       for k_, v_ in row.items()}, flush=True)
                del q, k, v
                torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / f"benchmark_{mode}.csv", rows)
    long_rows = []
    for r in rows:
        for name in ("fsa", "tma", "portable", "cudnn", "flash", "flex"):
            if r.get(f"{name}_tflops"):
                long_rows.append({"seqlen": r["seqlen"], "tflops": r[f"{name}_tflops"],
                                  "impl": name, "panel": f"d{r['d']} causal={r['causal']}"})
    plot(args.out / f"benchmark_{mode}.png", long_rows, "seqlen", "tflops", "impl",
         f"{mode} TFLOP/s (bf16, H={args.heads}, Hkv={args.kv_heads})", facet="panel")
    cols = ["d", "causal", "seqlen", "batch"] + \
        [f"{n}_tflops" for n in ("fsa", "tma", "portable", "cudnn", "flash", "flex")] + \
        ["fsa_vs_cudnn", "tma_vs_cudnn", "portable_vs_cudnn"]
    print_table(rows, cols)
    return rows

