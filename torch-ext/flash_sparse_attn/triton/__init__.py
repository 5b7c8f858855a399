"""Triton kernels of flash-sparse-attn: one attention kernel family specialised by constexpr flags."""
