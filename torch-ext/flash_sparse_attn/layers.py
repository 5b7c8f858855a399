"""`nn.Module` layers for `kernels.kernelize`.

`kernelize` replaces the `forward` of a module whose class was decorated with
`@use_kernel_forward_from_hub("<layer name>")` by the `forward` of the layer of the same name
here; `self` stays the user's module. So these classes are stateless (no `__init__`, no members
besides `forward`, `can_torch_compile`, `has_backward`) and read their options from the user's
module, with defaults where it has none:

| layer | forward | options read from the module (default) |
|---|---|---|
| `FlashDenseAttention` | `(query, key, value)` | `is_causal` (True), `softmax_scale` (None: D**-0.5), `window_sizes` (None) |
| `FlashSparseAttention` | `(query, key, value)` | the above and `softmax_threshold` (1.0) |
| `FlashGatedAttention` | `(query, key, value, alpha, delta)` | the above, `gate_threshold` (None), `is_logsigmoid_gate` (True), `is_adapt_gate` (True) |

query `[B, Sq, H, D]`, key/value `[B, Sk, Hkv, D]` -> `[B, Sq, H, D]` (alpha `[B, H, Sq]`, delta
`[B, Hkv, Sk]`); the user's module must take the same positional arguments (kernelize compares
the signatures). The layers are differentiable and trace under `torch.compile(fullgraph=True)`.
"""

from __future__ import annotations

import torch
from torch import nn

from .interface import flash_dense_attn_func, flash_gated_attn_func, flash_sparse_attn_func


def _common(module: nn.Module) -> dict:
    return dict(
        is_causal=getattr(module, "is_causal", True),
        softmax_scale=getattr(module, "softmax_scale", None),
        window_sizes=getattr(module, "window_sizes", None),
    )


class FlashDenseAttention(nn.Module):
    """Dense attention: forward(query [B, Sq, H, D], key/value [B, Sk, Hkv, D])."""

    can_torch_compile = True
    has_backward = True

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return flash_dense_attn_func(query, key, value, **_common(self))


class FlashSparseAttention(nn.Module):
    """Sparse attention (SPEC §5), threshold `self.softmax_threshold` (default 1.0)."""

    can_torch_compile = True
    has_backward = True

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return flash_sparse_attn_func(
            query, key, value, softmax_threshold=getattr(self, "softmax_threshold", 1.0),
            **_common(self))


class FlashGatedAttention(nn.Module):
    """Gated attention (SPEC §6): forward(query, key, value, alpha [B, H, Sq], delta [B, Hkv, Sk])."""

    can_torch_compile = True
    has_backward = True

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                alpha: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return flash_gated_attn_func(
            query, key, value, alpha, delta,
            softmax_threshold=getattr(self, "softmax_threshold", None),
            gate_threshold=getattr(self, "gate_threshold", None),
            is_logsigmoid_gate=getattr(self, "is_logsigmoid_gate", True),
            is_adapt_gate=getattr(self, "is_adapt_gate", True),
            **_common(self))


__all__ = ["FlashDenseAttention", "FlashSparseAttention", "FlashGatedAttention"]
