"""Device probe of the Gluon spike: correctness against float64, time against cuDNN and the package's
forward. Run from the repository root on an sm_90 GPU: python scripts/spikes/probe_gluon.py"""
import sys, os, importlib
sys.path.insert(0, "tests"); sys.path.insert(0, "scripts/spikes")
import torch
from bench_utils import load_package, bench, sdpa_impl
import gluon_fwd as G
torch.manual_seed(0)
dev = "cuda"
# correctness, small
for (b, h, hkv, s) in [(1, 2, 1, 256), (2, 4, 2, 1024)]:
    q = torch.randn(b, h, s, 128, device=dev, dtype=torch.bfloat16)
    k = torch.randn(b, hkv, s, 128, device=dev, dtype=torch.bfloat16)
    v = torch.randn(b, hkv, s, 128, device=dev, dtype=torch.bfloat16)
    for bn, st, pp in [(128, 2, False), (128, 2, True), (64, 3, True)]:
        o, lse = G.gluon_fwd(q, k, v, True, bn, st, pipe=pp)
        torch.cuda.synchronize()
        kk = k.double().repeat_interleave(h // hkv, 1); vv = v.double().repeat_interleave(h // hkv, 1)
        sc = q.double() @ kk.transpose(-1, -2) / 128 ** 0.5
        sc = sc.masked_fill(torch.ones(s, s, device=dev, dtype=torch.bool).tril().logical_not(), float("-inf"))
        ref = torch.softmax(sc, -1) @ vv
        print(f"check b={b} h={h} s={s} bn={bn} st={st} pipe={pp}: max err {(o.double() - ref).abs().max().item():.3e} lse err {(lse.double() - sc.logsumexp(-1)).abs().max().item():.3e}", flush=True)
fsa = load_package()
F = importlib.import_module(fsa.__name__ + ".triton.fwd")
def ours(q, k, v):
    return F.launch_attn_fwd(q, k, v, alpha=None, delta=None, cu_seqlens_q=None, cu_seqlens_k=None, seqused_k=None,
        window_sizes=None, max_seqlen_q=q.shape[1], max_seqlen_k=k.shape[1], softmax_scale=q.shape[-1] ** -0.5,
        is_causal=True, softmax_threshold=0.0, gate_threshold=0.0, is_logsigmoid_gate=True, is_adapt_gate=False, deterministic=False)
for s in (4096, 16384):
    b = 16384 // s
    q = torch.randn(b, s, 32, 128, device=dev, dtype=torch.bfloat16); k = torch.randn(b, s, 8, 128, device=dev, dtype=torch.bfloat16); v = torch.randn_like(k)
    qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    prep, run = sdpa_impl("cudnn", True); ins = prep(q, k, v)
    line = {"cudnn": bench(lambda: run(*ins)), "ours_tma": bench(lambda: ours(q, k, v))}
    for bn, st, pp, rg in [(128, 2, False, 232), (128, 2, True, 232), (128, 2, True, 240), (64, 3, True, 232), (64, 4, True, 232), (128, 3, True, 232)]:
        key = f"gluon{bn}/{st}{'p' if pp else ''}/{rg}"
        try:
            line[key] = bench(lambda: G.gluon_fwd(qt, kt, vt, True, bn, st, pipe=pp, regs=rg))
        except Exception as e:
            line[key] = type(e).__name__ + str(e)[:80]
    o, _ = G.gluon_fwd(qt, kt, vt, True, 128, 2, pipe=True)
    ob, _, _ = ours(q, k, v)
    print(f"s={s} b={b} gluon vs ours max diff {(o.transpose(1, 2) - ob).abs().max().item():.3e}; " + ", ".join(f"{k_}={v_:.3f}" if isinstance(v_, float) else f"{k_}={v_}" for k_, v_ in line.items()), flush=True)
