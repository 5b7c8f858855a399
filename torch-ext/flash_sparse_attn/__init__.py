"""flash-sparse-attn: trainable dense, sparse and gated attention in Triton.

Loaded with `kernels.get_kernel("<org>/flash-sparse-attn", version=1)` or, after
`pip install .`, with `import flash_sparse_attn`.
"""

from . import fa_compat, layers, reference
from .fa_compat import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache
from .interface import (
    block_skip_stats,
    flash_dense_attn_func,
    flash_dense_attn_varlen_func,
    flash_dense_attn_varlen_with_kvcache_func,
    flash_dense_attn_with_kvcache_func,
    flash_gated_attn_func,
    flash_gated_attn_varlen_func,
    flash_gated_attn_varlen_with_kvcache_func,
    flash_gated_attn_with_kvcache_func,
    flash_sparse_attn_func,
    flash_sparse_attn_varlen_func,
    flash_sparse_attn_varlen_with_kvcache_func,
    flash_sparse_attn_with_kvcache_func,
)
from .reference import window_sizes_heuristic

__version__ = "1.0.0"

__all__ = [
    "flash_dense_attn_func",
    "flash_sparse_attn_func",
    "flash_gated_attn_func",
    "flash_dense_attn_varlen_func",
    "flash_sparse_attn_varlen_func",
    "flash_gated_attn_varlen_func",
    "flash_dense_attn_with_kvcache_func",
    "flash_sparse_attn_with_kvcache_func",
    "flash_gated_attn_with_kvcache_func",
    "flash_dense_attn_varlen_with_kvcache_func",
    "flash_sparse_attn_varlen_with_kvcache_func",
    "flash_gated_attn_varlen_with_kvcache_func",
    "window_sizes_heuristic",
    "block_skip_stats",
    "flash_attn_func",
    "flash_attn_varlen_func",
    "flash_attn_with_kvcache",
    "fa_compat",
    "layers",
    "reference",
    "__version__",
]
