"""Helpers shared by the kernel tests: devices/dtypes, the error rule of DESIGN.md, inputs.

Error rule: a kernel's error against float64 must be at most twice the error of the same
computation done by PyTorch in the kernel's dtype, plus a small eps band:
    err(kernel, fp64) <= 2 * err(torch_lowp, fp64) + eps
`torch_lowp_attention` is that PyTorch computation: scores by a low-precision matmul, softmax in
fp32, probabilities rounded to the low dtype before P @ V (what a flash kernel does too).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
HAS_CUDA = torch.cuda.is_available()


def kernel_device_dtype():
    """Where kernels run in this session: CUDA bf16, or the Triton interpreter on CPU in fp16
    (the interpreter cannot do bf16 dots). None if neither is available."""
    if HAS_CUDA:
        return "cuda", torch.bfloat16
    if INTERPRET:
        return "cpu", torch.float16
    return None


def max_err(x, ref):
    return (x.double() - ref.double()).abs().max().item() if x.numel() else 0.0


def assert_close_rule(name, got, ref64, lowp, eps=1e-5):
    """err(got) <= 2 * err(lowp) + eps * max|ref|, NaN never passes."""
    assert not torch.isnan(got).any(), f"{name}: NaN in kernel output"
    e_k = max_err(got, ref64)
    e_t = max_err(lowp, ref64)
    scale = max(ref64.abs().max().item(), 1.0) if ref64.numel() else 1.0
    bound = 2 * e_t + eps * scale
    assert e_k <= bound, f"{name}: kernel err {e_k:.3e} > 2 * torch err {e_t:.3e} + eps ({bound:.3e})"


def visible_mask(sq, sk, is_causal, windows, num_heads, device):
    """[H, Sq, Sk] bool mask of SPEC §3 (windows [Hkv,4] or [H,4] or None)."""
    i = torch.arange(sq, device=device)[:, None]
    j = torch.arange(sk, device=device)[None, :]
    dist = i + (sk - sq) - j
    if windows is None:
        m = dist >= 0 if is_causal else torch.ones(sq, sk, dtype=torch.bool, device=device)
        return m.expand(num_heads, sq, sk)
    group = num_heads // windows.shape[0] if windows.shape[0] != num_heads else 1
    rows = []
    for h in range(num_heads):
        sink, left, right, near = (int(x) for x in windows[h // group])
        band = (dist < near) | ((dist >= near + right) & (dist < near + right + left)) | (j < sink)
        rows.append((dist >= 0) & band)
    return torch.stack(rows)


def torch_lowp_attention(q, k, v, scale, mask, alpha=None, delta=None, logsigmoid=True):
    """PyTorch's same-dtype attention (batched [B,S,H,D]); mask [H,Sq,Sk]. Differentiable.
    With float64 inputs every step is float64: that is the ground truth of the tests."""
    group = q.shape[2] // k.shape[2]
    qh = q.transpose(1, 2)
    kh = k.transpose(1, 2).repeat_interleave(group, 1)
    vh = v.transpose(1, 2).repeat_interleave(group, 1)
    s = torch.matmul(qh, kh.transpose(-1, -2))  # low precision, fp32 accumulate
    if alpha is not None:
        x = alpha[:, :, :, None] * delta.repeat_interleave(group, 1)[:, :, None, :]
        hi = torch.promote_types(x.dtype, torch.float32)
        s = s + (F.logsigmoid(x.to(hi)) if logsigmoid else x.to(hi)).to(s.dtype)
    s = s.to(torch.promote_types(s.dtype, torch.float32)) * scale
    s = s.masked_fill(~mask[None], float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return torch.matmul(p.to(q.dtype), vh).transpose(1, 2)


def poison_like(t):
    return torch.full_like(t, float("nan"))


def kept_element_mask(codes, skip_m, skip_n, base):
    """[H, Sq, Sk]: the visible pairs of `base` whose block a kernel kept (codes [H, nQB, nKB]
    of skip_m x skip_n blocks, 2 = skipped); base when there are no codes."""
    if codes.numel() == 0:
        return base
    rows = torch.arange(base.shape[1], device=codes.device) // skip_m
    cols = torch.arange(base.shape[2], device=codes.device) // skip_n
    return base & (codes[:, rows][:, :, cols] < 2)


def draw_qkv(b, sq, sk, h, hkv, d, local, generator):
    """(q [B, Sq, H, D], k, v [B, Sk, Hkv, D]), float32 on the CPU. local: each query close to
    the key at its own position (plus noise), so far blocks can be skipped; else random."""
    k = torch.randn(b, sk, hkv, d, generator=generator)
    v = torch.randn(b, sk, hkv, d, generator=generator)
    if local:
        pos = (torch.arange(sq) + sk - sq).clamp(0, sk - 1)
        q = k[:, pos].repeat_interleave(h // hkv, 2) + torch.randn(b, sq, h, d,
                                                                   generator=generator)
    else:
        q = torch.randn(b, sq, h, d, generator=generator)
    return q, k, v
