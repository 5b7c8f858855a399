#!/usr/bin/env python3
"""Load the built bundle as a user does (`kernels.get_kernel`) and run attention once.

On a CUDA GPU the inputs are bf16 and the Triton kernels run; otherwise the inputs are fp32 CPU
tensors and the ops take their plain PyTorch reference path. For dense (causal, GQA), sparse and
gated attention it prints the output's shape, a few values, and the max error against a float64
computation written below, next to the error of the same computation done by PyTorch in the
input dtype.

    python scripts/build.py && python scripts/demo.py   # (scripts/main.sh does both)

Needs torch, triton and kernels (with huggingface_hub); nothing else.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from build import read_config  # noqa: E402  (scripts/build.py: reads build.toml)


def attention(q, k, v, is_causal, alpha=None, delta=None, dtype=torch.float64):
    """Softmax attention computed in `dtype` (SPEC §3, §4, §6): query head h reads KV head
    h // (H // Hkv); gated scores are scale * (q.k + logsigmoid(alpha_i * delta_j))."""
    q, k, v = (t.to(dtype) for t in (q, k, v))
    sq, heads, dim = q.shape[1], q.shape[2], q.shape[3]
    sk, kv_heads = k.shape[1], k.shape[2]
    rep = heads // kv_heads
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k)
    if alpha is not None:
        d = delta.to(dtype).repeat_interleave(rep, dim=1)  # [B, H, Sk]
        s = s + F.logsigmoid(alpha.to(dtype)[..., :, None] * d[..., None, :])
    s = s * dim ** -0.5
    if is_causal:
        i = torch.arange(sq, device=q.device)[:, None]
        j = torch.arange(sk, device=q.device)[None, :]
        s = s.masked_fill(j > i + (sk - sq), float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, dim=-1), v)


def report(name, out, ref64, lowp, seconds, note=""):
    err = (out.double() - ref64).abs().max().item()
    err_torch = (lowp.double() - ref64).abs().max().item()
    dtype = str(out.dtype).replace("torch.", "")
    values = ", ".join(f"{x:+.4f}" for x in out[0, -1, 0, :4].float().tolist())
    print(f"{name}: out {tuple(out.shape)} {dtype}, out[0, -1, 0, :4] = [{values}]")
    print(f"    max |out - fp64| = {err:.3e}  (PyTorch in {dtype}: {err_torch:.3e}); "
          f"{seconds * 1e3:.1f} ms{note}")
    return err


def with_skip_stats(fsa, fn):
    """Call a sparse/gated function; where the build exports `block_skip_stats`, also ask for
    its block decisions and describe them."""
    if not hasattr(fsa, "block_skip_stats"):
        return timed(fn) + ("",)
    (out, mask), seconds = timed(lambda: fn(return_skip_mask=True))
    s = fsa.block_skip_stats(mask)
    return out, seconds, (f"; skipped {s['softmax_skipped'] + s['gate_skipped']} of "
                          f"{s['visited']} visited block pairs")


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def main(argv=None) -> int:
    cfg = read_config()
    ap = argparse.ArgumentParser(description="Run the built bundle once.")
    ap.add_argument("--build", type=Path, default=ROOT / "build",
                    help="directory holding torch-<backend>/ (default: build/)")
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    ap.add_argument("--seqlen", type=int, default=256)
    args = ap.parse_args(argv)

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        os.environ.pop("TRITON_INTERPRET", None)  # CPU tensors: the reference path of the ops
    dtype = torch.bfloat16 if device == "cuda" else torch.float32

    build = args.build.resolve()
    if not any(build.glob("torch-*/metadata.json")):
        print(f"no build in {build}: run `python scripts/build.py` first", file=sys.stderr)
        return 1
    os.environ["LOCAL_KERNELS"] = f"{cfg['repo_id']}={build}"
    from kernels import get_kernel

    fsa = get_kernel(cfg["repo_id"], version=cfg["version"], trust_remote_code=True)
    print(f"loaded {cfg['repo_id']} v{cfg['version']} with kernels.get_kernel: module "
          f"{fsa.__name__} from {Path(fsa.__file__).parent}")
    path = "Triton kernels" if device == "cuda" else "reference path (PyTorch)"
    print(f"device {device}, {str(dtype).replace('torch.', '')}, {path}; torch {torch.__version__}")

    gen = torch.Generator(device="cpu").manual_seed(0)
    B, S, H, Hkv, D = 2, args.seqlen, 8, 2, 64
    q = torch.randn(B, S, H, D, generator=gen).to(device, dtype)
    k = torch.randn(B, S, Hkv, D, generator=gen).to(device, dtype)
    v = torch.randn(B, S, Hkv, D, generator=gen).to(device, dtype)
    alpha = torch.randn(B, H, S, generator=gen).to(device, dtype)
    delta = torch.randn(B, Hkv, S, generator=gen).to(device, dtype)
    print(f"problem: batch {B}, seqlen {S}, heads {H} (kv heads {Hkv}, GQA), head dim {D}, causal")

    ref = attention(q, k, v, True)
    lowp = attention(q, k, v, True, dtype=dtype)
    out, t = timed(lambda: fsa.flash_dense_attn_func(q, k, v, is_causal=True))
    report("flash_dense_attn_func", out, ref, lowp, t)

    out, t, note = with_skip_stats(fsa, lambda **kw: fsa.flash_sparse_attn_func(
        q, k, v, is_causal=True, softmax_threshold=1.0, **kw))
    report("flash_sparse_attn_func (softmax_threshold=1.0; skipped blocks count as error "
           "against dense fp64)", out, ref, lowp, t, note)

    ref_g = attention(q, k, v, True, alpha, delta)
    lowp_g = attention(q, k, v, True, alpha, delta, dtype=dtype)
    out, t, note = with_skip_stats(fsa, lambda **kw: fsa.flash_gated_attn_func(
        q, k, v, alpha, delta, is_causal=True, **kw))
    report("flash_gated_attn_func (logsigmoid gate, default gate_threshold; fp64 without "
           "skipping)", out, ref_g, lowp_g, t, note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
