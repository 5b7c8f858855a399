"""Kernel Hub benchmark (`kernels benchmark` format) of flash-sparse-attn.

`scripts/upload.py` uploads this file as `benchmarks/benchmark.py` on the version branch, so
`kernels benchmark <org>/flash-sparse-attn --version 1` runs it (and `kernels benchmark
<dir>` runs it on a local directory holding `build/` and `benchmarks/`). The runner loads the
kernel into `self.kernel`, sets `self.device`, and for each workload `X` calls `setup_X`, then
`benchmark_X` (timed; leaves its result in `self.out`) and `verify_X` (the reference, timed as
`Ref(ms)`; `torch.allclose(self.out, reference, atol=1e-2)` must hold).

Workloads (GPU: bf16, B=2, S=4096, H=16, Hkv=4, D=128; CPU: fp32 and small shapes, where the
ops run their PyTorch reference path). The references are PyTorch SDPA, so `Speedup` is
against `F.scaled_dot_product_attention` on the same inputs:
- `Dense.causal`, `Dense.flash_attn_func` (the FlashAttention-compatible entry point),
  `Dense.varlen` (three packed sequences);
- `Sparse.llm_like`: inputs with an attention sink and near-diagonal structure, where most far
  key blocks are provably negligible, `softmax_threshold=0.002`. Dropped keys have probability
  below t / visible_len each, so at most m = t = 0.002 of a row's mass goes, and the output
  moves by at most 2m * max|v| = 0.004 with |v| <= 1 (|o' - o| = |K m / (1 - m) - D| with
  |K| <= (1 - m) max|v| kept and |D| <= m max|v| dropped): SDPA's dense output is a valid
  reference within the runner's atol=1e-2, bf16 rounding included;
- `Gated.causal`: scores scale * (q.k + logsigmoid(alpha_i * delta_j)), gate_threshold=0 (no
  gate skipping), against SDPA with that additive bias;
- `Decode.kvcache`: one query per sequence over a KV cache with per-sequence lengths.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kernels.benchmark import Benchmark


def _shapes(device: str) -> dict:
    if device == "cpu":
        return dict(B=1, S=128, H=4, HKV=2, D=64, dtype=torch.float32)
    return dict(B=2, S=4096, H=16, HKV=4, D=128, dtype=torch.bfloat16)


def _sdpa(q, k, v, is_causal=False, bias=None):
    """[B, S, H, D] attention by F.scaled_dot_product_attention (GQA by repetition), computed
    in fp32 and returned in q's dtype."""
    rep = q.shape[2] // k.shape[2]
    qt, kt, vt = (t.transpose(1, 2).float() for t in (q, k, v))
    kt, vt = kt.repeat_interleave(rep, dim=1), vt.repeat_interleave(rep, dim=1)
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=bias, is_causal=is_causal)
    return out.transpose(1, 2).to(q.dtype)


def _llm_like(B, S, H, HKV, D, dtype, device):
    """q, k with a rotating positional component (scaled scores peak at 30 on the diagonal
    and fall to ~0 far from it) plus an attention sink at key 0; v uniform in [-1, 1]. On
    these, about 88% of the visited key blocks are skipped at S=4096 (CPU reference path)."""
    pos = torch.arange(S, device=device, dtype=torch.float32)
    freqs = 1.0 / (64.0 ** (torch.arange(D // 2, device=device, dtype=torch.float32) / (D // 2)))
    ang = pos[:, None] * freqs[None, :] * 0.2
    u = torch.cat([ang.cos(), ang.sin()], dim=-1)  # [S, D], |u_i|^2 = D / 2
    c = (2 * 30.0 / math.sqrt(D)) ** 0.5  # D**-0.5 * c^2 * D / 2 = 30
    q = c * u[None, :, None, :] + 0.3 * torch.randn(B, S, H, D, device=device)
    k = c * u[None, :, None, :] + 0.3 * torch.randn(B, S, HKV, D, device=device)
    sink = torch.randn(D, device=device)
    q = q + 0.5 * sink
    k[:, 0] += 2.0 * sink
    v = torch.rand(B, S, HKV, D, device=device) * 2 - 1
    return q.to(dtype), k.to(dtype), v.to(dtype)


class Dense(Benchmark):
    seed = 0

    def setup(self):
        s = _shapes(self.device)
        self.q = torch.randn(s["B"], s["S"], s["H"], s["D"], device=self.device).to(s["dtype"])
        self.k = torch.randn(s["B"], s["S"], s["HKV"], s["D"], device=self.device).to(s["dtype"])
        self.v = torch.randn(s["B"], s["S"], s["HKV"], s["D"], device=self.device).to(s["dtype"])

    def benchmark_causal(self):
        self.out = self.kernel.flash_dense_attn_func(self.q, self.k, self.v, is_causal=True)

    def verify_causal(self):
        return _sdpa(self.q, self.k, self.v, is_causal=True)

    def benchmark_flash_attn_func(self):
        self.out = self.kernel.flash_attn_func(self.q, self.k, self.v, causal=True)

    def verify_flash_attn_func(self):
        return _sdpa(self.q, self.k, self.v, is_causal=True)

    def setup_varlen(self):
        s = _shapes(self.device)
        self.lens = [s["S"] // 4, s["S"] // 2, s["S"] // 4 + 7]
        total = sum(self.lens)
        self.q = torch.randn(total, s["H"], s["D"], device=self.device).to(s["dtype"])
        self.k = torch.randn(total, s["HKV"], s["D"], device=self.device).to(s["dtype"])
        self.v = torch.randn(total, s["HKV"], s["D"], device=self.device).to(s["dtype"])
        self.cu = torch.tensor([0] + torch.tensor(self.lens).cumsum(0).tolist(),
                               dtype=torch.int32, device=self.device)

    def benchmark_varlen(self):
        m = max(self.lens)
        self.out = self.kernel.flash_dense_attn_varlen_func(
            self.q, self.k, self.v, self.cu, self.cu, m, m, is_causal=True)

    def verify_varlen(self):
        outs, start = [], 0
        for n in self.lens:
            sl = slice(start, start + n)
            outs.append(_sdpa(self.q[None, sl], self.k[None, sl], self.v[None, sl], True)[0])
            start += n
        return torch.cat(outs)


class Sparse(Benchmark):
    seed = 0
    threshold = 0.002

    def setup(self):
        s = _shapes(self.device)
        self.q, self.k, self.v = _llm_like(s["B"], s["S"], s["H"], s["HKV"], s["D"],
                                           s["dtype"], self.device)

    def benchmark_llm_like(self):
        self.out = self.kernel.flash_sparse_attn_func(
            self.q, self.k, self.v, is_causal=True, softmax_threshold=self.threshold)

    def verify_llm_like(self):
        return _sdpa(self.q, self.k, self.v, is_causal=True)


class Gated(Benchmark):
    seed = 0

    def setup(self):
        s = _shapes(self.device)
        B, S, H, HKV, D = s["B"], s["S"], s["H"], s["HKV"], s["D"]
        self.q = torch.randn(B, S, H, D, device=self.device).to(s["dtype"])
        self.k = torch.randn(B, S, HKV, D, device=self.device).to(s["dtype"])
        self.v = torch.randn(B, S, HKV, D, device=self.device).to(s["dtype"])
        self.alpha = torch.randn(B, H, S, device=self.device).to(s["dtype"])
        self.delta = (2 * torch.randn(B, HKV, S, device=self.device)).to(s["dtype"])

    def benchmark_causal(self):
        self.out = self.kernel.flash_gated_attn_func(
            self.q, self.k, self.v, self.alpha, self.delta, is_causal=True, gate_threshold=0.0)

    def verify_causal(self):
        H, HKV, D, S = self.q.shape[2], self.k.shape[2], self.q.shape[3], self.q.shape[1]
        delta = self.delta.float().repeat_interleave(H // HKV, dim=1)
        bias = F.logsigmoid(self.alpha.float()[..., :, None] * delta[..., None, :]) * D ** -0.5
        causal = torch.ones(S, S, dtype=torch.bool, device=self.device).tril()
        return _sdpa(self.q, self.k, self.v, bias=bias.masked_fill(~causal, float("-inf")))


class Decode(Benchmark):
    seed = 0

    def setup(self):
        s = _shapes(self.device)
        B, S, H, HKV, D = 4 * s["B"], s["S"], s["H"], s["HKV"], s["D"]
        self.q = torch.randn(B, H, D, device=self.device).to(s["dtype"])
        self.k = torch.randn(B, S, HKV, D, device=self.device).to(s["dtype"])
        self.v = torch.randn(B, S, HKV, D, device=self.device).to(s["dtype"])
        self.used = torch.linspace(S // 4, S, B, device=self.device).to(torch.int32)

    def benchmark_kvcache(self):
        self.out = self.kernel.flash_dense_attn_with_kvcache_func(
            self.q, self.k, self.v, seqused_k=self.used)

    def verify_kvcache(self):
        return torch.cat([_sdpa(self.q[b, None, None], self.k[b, None, :n], self.v[b, None, :n])[0, 0][None]
                          for b, n in enumerate(self.used.tolist())])
