"""Decode benchmark: `python tests/benchmark_decode.py [--quick] [--out DIR]` (needs a CUDA GPU).

One new token per sequence over a KV cache, bf16, H=32, Hkv=8, D=128:
- dense decode, B in {1, 8, 32, 128} x Sk in {1k, 8k, 64k, 128k} (combinations whose K+V cache
  exceeds ~40 GB are skipped): this project on a contiguous cache [B, Sk, Hkv, D] and on a paged
  cache (page 64, shuffled page table), next to `F.scaled_dot_product_attention` with the cuDNN
  and flash backends on the same data (q [B, H, 1, D], k/v [B, Hkv, Sk, D] contiguous,
  `enable_gqa=True`; a backend that refuses GQA gets K/V expanded to H heads, marked
  `gqa=expanded`, when that fits in memory);
- sparse decode (SPEC §7), B in {1, 32} x 64k keys, on LLM-like caches (attention sinks +
  positional locality: `benchmark_sparse.llm_like`, the last query row as the new token) and
  random ones: `flash_sparse_attn_with_kvcache_func` at t = 1 next to the dense decode on the
  same cache, with the skipped fraction and the output error against exact float64 decode;
- top-k decode, 512..4096 of 64k keys at B=1 and B=32 (gather_kv_indices [B, topk], random
  distinct positions; also [B, Hkv, topk] at topk 2048), next to SDPA cuDNN on the same rows
  gathered beforehand into a contiguous cache (the bandwidth a dense read of those bytes gets).
GB/s counts the K/V bytes a call must read: B * Sk * Hkv * D * 2 bytes * 2 (K and V), or topk
rows instead of Sk for top-k; % of the 4.8 TB/s HBM peak, and of the ~4.3 TB/s copy ceiling
(the copy ceiling measured in this run is printed too).

Timing. `graph` (the headline): the calls are captured in a CUDA graph of R calls over R
input sets with distinct memory (R grows for small problems so a replay holds >= ~64 MB of
reads, at most 16), L2 flushed (256 MB memset) before every replay outside the timed events;
median of the replays / R. That is how decode runs in serving (no Python/launch overhead) and
it is the same for every implementation. `eager`: triton.testing.do_bench (median, its own L2
flush) of the plain call, Python and launch overhead included. This project's calls pass
`skip_checks=True` (value checks read tensors on the host: a sync per call).
A split-count and launch-config sweep for the headline cases follows (unless --no-sweep), to
tune `decode_num_splits` / the `decode` launch tables. CSV, PNG and a Markdown table (for the
README) go to --out; a compact table and the acceptance checks are printed last.
"""

from __future__ import annotations

import argparse
import importlib
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_utils import ROOT, load_package, plot, print_table, write_csv  # noqa: E402

HBM_PEAK = 4.8e12  # H200 HBM3e, bytes/s
COPY_CEIL = 4.3e12  # measured device-to-device copy on the H200 (DESIGN.md)
H, HKV, D = 32, 8, 128
DEV = ["cuda", torch.bfloat16]  # --dry-run: ["cpu", torch.float16]
DRY = [False]
MAX_CACHE_BYTES = 40e9
SET_BYTES = 64 << 20  # a graph replay reads at least this much (R input sets)
MAX_SETS = 16

_FLUSH = {}


def flush_l2():
    if DRY[0]:
        return
    buf = _FLUSH.get("buf")
    if buf is None:
        buf = _FLUSH["buf"] = torch.empty(256 << 20, dtype=torch.int8, device=DEV[0])
    buf.zero_()


def n_sets(bytes_per_call: float) -> int:
    return int(min(MAX_SETS, max(1, math.ceil(SET_BYTES / max(bytes_per_call, 1)))))


def time_graph(calls, replays=20) -> float:
    """ms per call: `calls` (R closures) captured in one CUDA graph, replayed with L2 flushed
    before each replay; median over replays / R."""
    if DRY[0]:
        for c in calls:
            c()
        return 1.0
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for c in calls:  # warm-up outside the graph (compiles, plans)
            c()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        flush_l2()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del graph
    return statistics.median(times) / len(calls)


def time_eager(fn) -> float:
    import triton

    if DRY[0]:
        fn()
        return 1.0

    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")


def measure(row: dict, name: str, calls, bytes_per_call: float, eager=True):
    """Fill row[name_*]: graph ms, eager ms, GB/s, % of HBM peak, % of the copy ceiling."""
    try:
        ms = time_graph(calls)
        row[f"{name}_ms"] = ms
        row[f"{name}_GBps"] = bytes_per_call / ms * 1e-6
        row[f"{name}_pct_peak"] = 100 * bytes_per_call / ms * 1e3 / HBM_PEAK
        row[f"{name}_pct_copy"] = 100 * bytes_per_call / ms * 1e3 / COPY_CEIL
    except Exception as e:  # report and go on: one baseline failing must not stop the run
        print(f"  {name}: graph timing failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
    if eager:
        try:
            row[f"{name}_eager_ms"] = time_eager(calls[0])
        except Exception as e:
            print(f"  {name}: eager timing failed: {type(e).__name__}: {str(e)[:300]}",
                  flush=True)


def sync():
    if not DRY[0]:
        torch.cuda.synchronize()


def empty_cache():
    if not DRY[0]:
        torch.cuda.empty_cache()


def shrink(batch, seqlen, topk=None):
    """The shapes themselves, or tiny stand-ins for --dry-run."""
    if DRY[0]:
        batch, seqlen = min(batch, 2), max(64, seqlen // 1024)
        topk = topk if not topk else min(seqlen, max(16, topk // 64))
    return (batch, seqlen) if topk is None else (batch, seqlen, topk)


def randn(*shape):
    return torch.randn(*shape, device=DEV[0], dtype=DEV[1])


# ---------------------------------------------------------------------------------------------
# SDPA baselines
# ---------------------------------------------------------------------------------------------
def sdpa_calls(backend_name, qs, ks, vs):
    """Closures running SDPA (backend) on head-major q [B,H,1,D], k/v [B,Hkv,S,D] sets, and the
    GQA mode used ("native": enable_gqa=True; "expanded": K/V repeated to H heads)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[
        backend_name]

    def make(q4, k4, v4, gqa):
        def call():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q4, k4, v4, enable_gqa=gqa)
        return call

    try:
        calls = [make(q, k, v, True) for q, k, v in zip(qs, ks, vs)]
        calls[0]()
        sync()
        return calls, "native"
    except Exception as e:  # noqa: BLE001 - any refusal of GQA: try expanded K/V
        need = sum(k.numel() for k in ks) * 2 * (H // HKV) * ks[0].element_size()
        if need > 30e9 or DRY[0] or torch.cuda.mem_get_info()[0] < need * 1.3:
            print(f"  sdpa {backend_name}: no native GQA ({str(e)[:120]}); expanded K/V too "
                  "large, skipped", flush=True)
            return None, "n/a"
        ke = [k.repeat_interleave(H // HKV, 1) for k in ks]
        ve = [v.repeat_interleave(H // HKV, 1) for v in vs]
        return [make(q, k, v, False) for q, k, v in zip(qs, ke, ve)], "expanded"


# ---------------------------------------------------------------------------------------------
# dense decode
# ---------------------------------------------------------------------------------------------
def paged_copy(k, page):
    """[B, S, Hkv, D] -> (paged [B*S/page, page, Hkv, D], page_table [B, S/page]) with the pages
    of all sequences in a shuffled order."""
    b, s = k.shape[:2]
    per = s // page
    perm = torch.randperm(b * per, device=k.device)
    paged = torch.empty((b * per, page) + tuple(k.shape[2:]), dtype=k.dtype, device=k.device)
    paged[perm] = k.reshape(b * per, page, *k.shape[2:])
    return paged, perm.view(b, per).to(torch.int32)


def bench_dense(fsa, batch, seqlen, baselines, paged, page=64):
    kv_bytes = batch * seqlen * HKV * D * 2 * 2
    sets = n_sets(kv_bytes)
    row = {"case": "dense", "batch": batch, "seqlen": seqlen, "topk": 0, "sets": sets}
    qs = [randn(batch, H, D) for _ in range(sets)]
    ks = [randn(batch, seqlen, HKV, D) for _ in range(sets)]
    vs = [randn(batch, seqlen, HKV, D) for _ in range(sets)]
    cfgs = importlib.import_module(f"{fsa.__name__}.triton.configs")
    row["fsa_splits"] = cfgs.decode_num_splits(batch, H, HKV, seqlen, 64,
                                              cfgs.num_sms(torch.device(DEV[0])))

    def fsa_call(q, k, v, **kw):
        return lambda: fsa.flash_dense_attn_with_kvcache_func(q, k, v, skip_checks=True, **kw)

    measure(row, "fsa", [fsa_call(q, k, v) for q, k, v in zip(qs, ks, vs)], kv_bytes)
    if paged:
        pk = [paged_copy(k, page) for k in ks]
        pv = [torch.empty_like(p[0]) for p in pk]
        for p, (kp, table), v in zip(pv, pk, vs):  # same page table for V
            per = seqlen // page
            p[table.view(-1).long()] = v.reshape(batch * per, page, HKV, D)
        measure(row, "fsa_paged", [fsa_call(q, kp, vp, page_table=t)
                                   for q, (kp, t), vp in zip(qs, pk, pv)], kv_bytes)
        del pk, pv
    # SDPA on its own head-major copy of the same data (fsa's caches freed first)
    q4 = [q[:, :, None, :] for q in qs]  # [B, H, 1, D]
    k4 = [k.transpose(1, 2).contiguous() for k in ks]
    del ks
    v4 = [v.transpose(1, 2).contiguous() for v in vs]
    del vs
    empty_cache()
    for name in baselines:
        calls, mode = sdpa_calls(name, q4, k4, v4)
        row[f"{name}_gqa"] = mode
        if calls is not None:
            measure(row, name, calls, kv_bytes)
        del calls
    for name in ("fsa", "fsa_paged") + tuple(baselines):
        if row.get(f"{name}_ms") and row.get("cudnn_ms"):
            row[f"{name}_vs_cudnn"] = row["cudnn_ms"] / row[f"{name}_ms"]
    del q4, k4, v4, qs
    empty_cache()
    return row


# ---------------------------------------------------------------------------------------------
# sparse decode
# ---------------------------------------------------------------------------------------------
def bench_sparse(fsa, batch, seqlen, family, threshold=1.0):
    """Dense vs sparse decode at `threshold` on one cache family ("llm" or "random")."""
    import benchmark_sparse as bs

    kv_bytes = batch * seqlen * HKV * D * 2 * 2
    row = {"case": f"sparse_{family}", "batch": batch, "seqlen": seqlen, "topk": 0,
           "threshold": threshold}
    if family == "llm":
        q1, k1, v1 = bs.llm_like(seqlen, H, HKV, D, device=DEV[0])
        q, k, v = (t.to(DEV[1]).expand(batch, *t.shape[1:]).contiguous()
                   for t in (q1[:, -1], k1, v1))
        del q1, k1, v1
    else:
        q, k, v = randn(batch, H, D), randn(batch, seqlen, HKV, D), randn(batch, seqlen, HKV, D)
    dense = lambda: fsa.flash_dense_attn_with_kvcache_func(q, k, v, skip_checks=True)  # noqa
    sparse = lambda: fsa.flash_sparse_attn_with_kvcache_func(  # noqa: E731
        q, k, v, softmax_threshold=threshold, skip_checks=True)
    measure(row, "fsa_dense", [dense], kv_bytes)
    measure(row, "fsa_sparse", [sparse], kv_bytes)
    out, codes = fsa.flash_sparse_attn_with_kvcache_func(
        q, k, v, softmax_threshold=threshold, return_skip_mask=True)
    row["skipped"] = fsa.block_skip_stats(codes)["skipped_fraction"]
    g = H // HKV
    s_ = torch.einsum("hd,shd->hs", q[0].double(),
                      k[0].double().repeat_interleave(g, 1)) * D ** -0.5
    exact = torch.einsum("hs,shd->hd", torch.softmax(s_, -1), v[0].double().repeat_interleave(g, 1))
    row["err_vs_exact"] = (out[0].double() - exact).abs().max().item()
    if row.get("fsa_sparse_ms") and row.get("fsa_dense_ms"):
        row["sparse_speedup"] = row["fsa_dense_ms"] / row["fsa_sparse_ms"]
    del q, k, v
    empty_cache()
    return row


# ---------------------------------------------------------------------------------------------
# top-k decode
# ---------------------------------------------------------------------------------------------
def bench_topk(fsa, batch, seqlen, topk, per_head=False):
    kv_bytes = batch * topk * HKV * D * 2 * 2  # gathered rows only
    sets = n_sets(kv_bytes)
    row = {"case": "topk_per_head" if per_head else "topk", "batch": batch, "seqlen": seqlen,
           "topk": topk, "sets": sets}
    cache_bytes = batch * seqlen * HKV * D * 2 * 2
    if cache_bytes * sets > 24e9:
        sets = max(1, int(24e9 // cache_bytes))
        row["sets"] = sets
    qs = [randn(batch, H, D) for _ in range(sets)]
    ks = [randn(batch, seqlen, HKV, D) for _ in range(sets)]
    vs = [randn(batch, seqlen, HKV, D) for _ in range(sets)]
    rows = HKV if per_head else 1

    def index_set():
        idx = torch.stack([torch.randperm(seqlen, device=DEV[0])[:topk]
                           for _ in range(batch * rows)]).to(torch.int32)
        return idx.view(batch, HKV, topk) if per_head else idx.view(batch, topk)

    idxs = [index_set() for _ in range(sets)]
    cfgs = importlib.import_module(f"{fsa.__name__}.triton.configs")
    row["fsa_splits"] = cfgs.decode_num_splits(batch, H, HKV, topk, 64,
                                              cfgs.num_sms(torch.device(DEV[0])))
    calls = [(lambda q=q, k=k, v=v, i=i: fsa.flash_dense_attn_with_kvcache_func(
        q, k, v, gather_kv_indices=i, skip_checks=True)) for q, k, v, i in zip(qs, ks, vs, idxs)]
    measure(row, "fsa", calls, kv_bytes)
    if not per_head:
        # the same rows gathered beforehand, read densely by SDPA cuDNN
        kg = [k[torch.arange(batch, device=DEV[0])[:, None], i.long()].transpose(1, 2)
              .contiguous() for k, i in zip(ks, idxs)]
        vg = [v[torch.arange(batch, device=DEV[0])[:, None], i.long()].transpose(1, 2)
              .contiguous() for v, i in zip(vs, idxs)]
        c, mode = sdpa_calls("cudnn", [q[:, :, None, :] for q in qs], kg, vg)
        row["cudnn_gqa"] = mode
        if c is not None:
            measure(row, "cudnn_pregathered", c, kv_bytes, eager=False)
        del kg, vg, c
    del qs, ks, vs, idxs, calls
    empty_cache()
    return row


# ---------------------------------------------------------------------------------------------
# sweep: split counts and launch configs of the headline cases
# ---------------------------------------------------------------------------------------------
def sweep(fsa, quick):
    cases = [("dense", 1, 65536, 0), ("dense", 32, 8192, 0), ("topk", 1, 65536, 2048),
             ("topk", 32, 65536, 4096)]
    if quick:
        cases = [cases[0], cases[1], cases[3]]
    else:
        cases.append(("paged", 1, 65536, 0))
    rows = []
    for kind, *shape in cases:
        rows += _sweep_case(fsa, quick, kind, *shrink(*shape))
        empty_cache()
    return rows


def _sweep_case(fsa, quick, kind, batch, seqlen, topk):
    dec = importlib.import_module(f"{fsa.__name__}.triton.decode")
    cfgs = importlib.import_module(f"{fsa.__name__}.triton.configs")
    read = batch * (topk or seqlen) * HKV * D * 4
    sets = n_sets(read)
    if batch * seqlen * HKV * D * 4 * sets > 24e9:
        sets = 1
    qs = [randn(batch, H, D) for _ in range(sets)]
    ks = [randn(batch, seqlen, HKV, D) for _ in range(sets)]
    vs = [randn(batch, seqlen, HKV, D) for _ in range(sets)]
    extra = [dict() for _ in range(sets)]
    if kind == "topk":
        for e in extra:
            e["gather_kv_indices"] = torch.stack(
                [torch.randperm(seqlen, device=DEV[0])[:topk] for _ in range(batch)]
            ).to(torch.int32)
    if kind == "paged":
        for i in range(sets):
            ks[i], table = paged_copy(ks[i], 64)
            vs[i] = vs[i].reshape(-1, 64, HKV, D)[torch.argsort(table.view(-1).long())]
            extra[i]["page_table"] = table
    base = cfgs.decode_config(qs[0], D, H // HKV, paged=kind == "paged", gather=kind == "topk")
    heur = cfgs.decode_num_splits(batch, H, HKV, topk or seqlen, base.block_n,
                                 cfgs.num_sms(qs[0].device))
    splits = sorted({1, 2, 4, 8, 16, 24, 33, 48, 66, 99, 132, heur} if batch == 1 else
                    {1, 2, 3, 4, 6, 8, heur})
    if quick:
        splits = sorted({1, heur, max(1, heur // 2), heur * 2})
    configs_ = [base] + [cfgs.Config(base.block_m, bn, w, st) for bn, w, st in (
        (64, 4, 2), (64, 4, 4), (64, 8, 3), (128, 4, 2), (128, 4, 3), (32, 4, 4), (32, 4, 6),
        (64, 4, 5), (64, 4, 7))]
    if quick:
        configs_ = configs_[:3]
    kw = dict(alpha=None, delta_cache=None, page_table=None, cu_seqlens_k=None,
              seqused_k=None, gather_kv_indices=None, window_sizes=None,
              max_seqlen_k=seqlen, softmax_scale=D ** -0.5, softmax_threshold=0.0,
              gate_threshold=0.0, is_logsigmoid_gate=True)

    def launcher(cfg, ns):
        return [(lambda q=q, k=k, v=v, e=e: dec.launch_attn_decode(
            q, k, v, num_splits=ns, config=cfg, **{**kw, **e}))
            for q, k, v, e in zip(qs, ks, vs, extra)]

    rows, seen = [], set()
    for cfg in configs_:
        for ns in (splits if cfg == base else [heur]):
            if (cfg, ns) in seen:
                continue
            seen.add((cfg, ns))
            r = {"case": kind, "batch": batch, "seqlen": seqlen, "topk": topk,
                 "block_n": cfg.block_n, "warps": cfg.num_warps, "stages": cfg.num_stages,
                 "splits": ns, "default": int(cfg == base and ns == heur)}
            try:
                ms = time_graph(launcher(cfg, ns), replays=10)
                r["ms"], r["GBps"] = ms, read / ms * 1e-6
            except Exception as e:
                r["error"] = f"{type(e).__name__}: {str(e)[:100]}"
            rows.append(r)
            print("  sweep", {k: (round(v, 4) if isinstance(v, float) else v)
                              for k, v in r.items()}, flush=True)
    return rows


# ---------------------------------------------------------------------------------------------
def copy_ceiling() -> float:
    """Device copy bandwidth (read + write bytes / s) of a 2 GiB tensor, this run."""
    if DRY[0]:
        return float("nan")
    src = torch.empty(1 << 31, dtype=torch.uint8, device=DEV[0])
    dst = torch.empty_like(src)
    ms = time_graph([lambda: dst.copy_(src)], replays=10)
    return 2 * (1 << 31) / ms * 1e3


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer shapes (about a minute)")
    ap.add_argument("--out", type=Path, default=ROOT / "tests" / "bench_out")
    ap.add_argument("--no-sweep", action="store_true", help="skip the splits / config sweep")
    ap.add_argument("--baselines", nargs="*", default=["cudnn", "flash"])
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU, fp16, tiny shapes, no timing: checks the script end to end "
                         "(run with TRITON_INTERPRET=1)")
    args = ap.parse_args(argv)
    if args.dry_run:
        DEV[:] = ["cpu", torch.float16]
        DRY[0] = True
    elif not torch.cuda.is_available():
        sys.exit("benchmark_decode.py needs a CUDA GPU")
    t_start = time.time()
    fsa = load_package()
    import triton

    if DRY[0]:
        name, sms = "cpu (dry run)", 132
    else:
        props = torch.cuda.get_device_properties(0)
        name, sms = props.name, props.multi_processor_count
    print(f"device {name}, {sms} SMs, torch {torch.__version__}, "
          f"triton {triton.__version__}; H={H} Hkv={HKV} D={D} {DEV[1]}", flush=True)
    torch.manual_seed(0)
    ceiling = copy_ceiling()
    empty_cache()
    print(f"copy ceiling this run: {ceiling / 1e9:.0f} GB/s (read + write)", flush=True)

    if args.quick:
        dense = [(1, 8192), (1, 65536), (32, 8192), (32, 65536), (128, 1024)]
        topks = [(1, 512), (1, 2048), (32, 2048), (32, 4096)]
    else:
        dense = [(b, s) for b in (1, 8, 32, 128) for s in (1024, 8192, 65536, 131072)]
        topks = [(b, t) for b in (1, 32) for t in (512, 1024, 2048, 4096)]
    if DRY[0]:
        dense = [shrink(b, s_) for b, s_ in dense]
        topks = [shrink(b, 65536, t)[::2] for b, t in topks]
    rows = []
    for batch, seqlen in dense:
        if batch * seqlen * HKV * D * 4 > MAX_CACHE_BYTES:
            print(f"dense B={batch} Sk={seqlen}: cache over {MAX_CACHE_BYTES / 1e9:.0f} GB, "
                  "skipped", flush=True)
            continue
        paged = not args.quick or seqlen == 65536
        rows.append(bench_dense(fsa, batch, seqlen, args.baselines, paged))
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rows[-1].items()},
              flush=True)
    for batch in (1, 32):
        for family in ("llm", "random"):
            b_, s_ = shrink(batch, 65536)
            rows.append(bench_sparse(fsa, b_, s_, family))
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rows[-1].items()},
                  flush=True)
    for batch, topk in topks:
        rows.append(bench_topk(fsa, batch, shrink(1, 65536)[1], topk))
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rows[-1].items()},
              flush=True)
    for batch in (1, 32):
        b_, s_, t_ = shrink(batch, 65536, 2048)
        rows.append(bench_topk(fsa, b_, s_, t_, per_head=True))
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rows[-1].items()},
              flush=True)
    sweep_rows = [] if args.no_sweep else sweep(fsa, args.quick)

    # ---- outputs ----------------------------------------------------------------------------
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / "benchmark_decode.csv", rows)
    if sweep_rows:
        write_csv(args.out / "benchmark_decode_sweep.csv", sweep_rows)
    impls = ("fsa", "fsa_paged", "cudnn", "flash", "cudnn_pregathered")
    long_dense = [{"seqlen": r["seqlen"], "GBps": r[f"{n}_GBps"], "impl": n,
                   "panel": f"B={r['batch']}"} for r in rows if r["case"] == "dense"
                  for n in impls if r.get(f"{n}_GBps")]
    plot(args.out / "benchmark_decode.png", long_dense, "seqlen", "GBps", "impl",
         "decode GB/s (bf16, H=32, Hkv=8, D=128; HBM peak 4800)", facet="panel")
    long_topk = [{"topk": r["topk"], "GBps": r[f"{n}_GBps"], "impl": n,
                  "panel": f"B={r['batch']}"} for r in rows if r["case"] == "topk"
                 for n in impls if r.get(f"{n}_GBps")]
    plot(args.out / "benchmark_decode_topk.png", long_topk, "topk", "GBps", "impl",
         "top-k decode GB/s of gathered K/V (of 64k keys)", facet="panel")
    cols = ["case", "batch", "seqlen", "topk", "fsa_splits", "fsa_ms", "fsa_eager_ms",
            "fsa_GBps", "fsa_pct_peak", "fsa_paged_GBps", "cudnn_GBps", "flash_GBps",
            "cudnn_pregathered_GBps", "fsa_vs_cudnn", "fsa_paged_vs_cudnn", "cudnn_gqa"]
    write_markdown(args.out / "benchmark_decode.md", rows, cols, name, ceiling)
    print(f"\nCSV/PNG/MD under {args.out}; total {time.time() - t_start:.0f} s\n")
    if sweep_rows:
        best_of_sweep(sweep_rows)
    acceptance(rows)
    print()
    print_table(rows, cols)


def write_markdown(path, rows, cols, device, ceiling):
    def fmt(x):
        if isinstance(x, float):
            return f"{x:.3f}" if abs(x) < 10 else f"{x:.0f}"
        return "-" if x is None else str(x)

    lines = [f"Decode, {device}, bf16, H=32, Hkv=8, D=128 (GB/s of K/V bytes read; HBM peak "
             f"4800 GB/s; copy ceiling this run {ceiling / 1e9:.0f} GB/s; CUDA-graph timing)",
             "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    path.write_text("\n".join(lines) + "\n")


def best_of_sweep(sweep_rows):
    print("sweep: best launch per case (default = heuristic splits + default config)")
    keys = sorted({(r["case"], r["batch"], r["seqlen"], r["topk"]) for r in sweep_rows})
    for key in keys:
        rs = [r for r in sweep_rows if (r["case"], r["batch"], r["seqlen"], r["topk"]) == key
              and r.get("ms")]
        if not rs:
            continue
        best = min(rs, key=lambda r: r["ms"])
        dflt = [r for r in rs if r["default"]]
        d = dflt[0] if dflt else None
        print(f"  {key}: best {best['GBps']:.0f} GB/s (splits {best['splits']}, BN "
              f"{best['block_n']}, warps {best['warps']}, stages {best['stages']})"
              + (f"; default {d['GBps']:.0f} GB/s (splits {d['splits']})" if d else ""))


def acceptance(rows):
    """The issue's targets, evaluated on this run (graph timing; eager in brackets)."""
    def find(case, b, s, t=0):
        for r in rows:
            if r["case"] == case and r["batch"] == b and r["seqlen"] == s and r["topk"] == t:
                return r
        return None

    print("\nacceptance (this run):")
    for b, s in ((1, 65536), (32, 8192)):
        r = find("dense", b, s)
        if r and r.get("fsa_ms") and r.get("cudnn_ms"):
            ratio = r["cudnn_ms"] / r["fsa_ms"]
            eager = (r["cudnn_eager_ms"] / r["fsa_eager_ms"]) if r.get("fsa_eager_ms") and \
                r.get("cudnn_eager_ms") else float("nan")
            print(f"  dense B={b} Sk={s}: fsa {r['fsa_GBps']:.0f} GB/s vs cuDNN "
                  f"{r['cudnn_GBps']:.0f} GB/s ({r.get('cudnn_gqa')}) = {ratio:.3f}x "
                  f"[eager {eager:.3f}x] -> {'PASS' if ratio >= 0.95 else 'FAIL'} (>= 0.95)")
    for family, target in (("llm", 1.3), ("random", 1 / 1.05)):
        r = find(f"sparse_{family}", 1, 65536)
        if r and r.get("sparse_speedup"):
            print(f"  sparse decode t=1, {family} 64k, B=1: {r['skipped']:.1%} skipped, "
                  f"{r['sparse_speedup']:.2f}x dense -> "
                  f"{'PASS' if r['sparse_speedup'] >= target else 'FAIL'} (>= {target:.2f}x)")
    r = find("topk", 1, 65536, 2048)
    if r and r.get("fsa_ms"):
        print(f"  top-k 2048 of 64k, B=1: {r['fsa_ms'] * 1e3:.1f} us "
              f"[eager {r.get('fsa_eager_ms', float('nan')) * 1e3:.1f} us] -> "
              f"{'PASS' if r['fsa_ms'] < 0.02 else 'FAIL'} (< 20 us)")
    for t in (512, 1024, 2048, 4096):
        r = find("topk", 32, 65536, t)
        if r and r.get("fsa_ms"):
            pct = r["fsa_pct_peak"]
            print(f"  top-k {t} of 64k, B=32: {r['fsa_GBps']:.0f} GB/s = {pct:.0f}% of HBM "
                  f"peak -> {'PASS' if pct >= 60 else 'FAIL'} (>= 60%)")


if __name__ == "__main__":
    main()
