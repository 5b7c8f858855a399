"""Launch configurations: the one place where block sizes, warps and stages are chosen.

No autotuning happens on a call: configs come from the launch tables in `kernels_src/`
(embedded into each build variant as `launch_tables.json`) or from the heuristics below.
"""

from __future__ import annotations

# Block-skip decisions of the sparse and gated variants (SPEC §5, §6) are taken on fixed blocks of
# SKIP_BLOCK_M queries x SKIP_BLOCK_N keys, whatever tile shape a launch uses, so that the skip
# set never depends on a launch config, a split count or a GPU.
SKIP_BLOCK_M = 128
SKIP_BLOCK_N = 64


def cdiv(a, b):
    return (a + b - 1) // b


def skip_shape(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k, has_skip: bool) -> list:
    """Shape of the forward's stored skip decisions: [B, H, n_query_blocks, n_key_blocks]
    (varlen: B = number of sequences, blocks counted over max_seqlen_q/k); [0] when the
    variant cannot skip."""
    if not has_skip:
        return [0]
    if cu_seqlens_q is not None:
        batch, heads = cu_seqlens_q.shape[0] - 1, q.shape[1]
    else:
        batch, heads = q.shape[0], q.shape[2]
    return [batch, heads, cdiv(max_seqlen_q, SKIP_BLOCK_M), cdiv(max_seqlen_k, SKIP_BLOCK_N)]


# --------------------------------------------------------------------------------------------
# launch tables
# --------------------------------------------------------------------------------------------
import functools  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

_TABLES_FILE = Path(__file__).parent.parent / "launch_tables.json"  # no resolve(): Hub files are symlinks into blobs/


@dataclass(frozen=True)
class Config:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


@functools.lru_cache(maxsize=None)
def launch_tables() -> dict:
    """The tables embedded by the build (`kernels_src/launch_tables.json`); {} if absent."""
    if _TABLES_FILE.exists():
        return json.loads(_TABLES_FILE.read_text())
    return {}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def head_dim_pad(head_dim: int) -> int:
    """Head dims are padded to a power of two (>= 16) inside the kernels."""
    return max(16, 1 << (int(head_dim) - 1).bit_length())


def _arch_key(t) -> str:
    if t.device.type != "cuda":
        return t.device.type
    major, minor = __import__("torch").cuda.get_device_capability(t.device)
    return f"sm{major}{minor}"


def _table_lookup(kernel: str, arch: str, key: str):
    entry = launch_tables().get(arch, {}).get(kernel, {}).get(key)
    return Config(*entry) if entry else None


def fwd_config(q, head_dim, seqlen_q, seqlen_k, is_causal, is_local, has_gate,
               has_skip=False) -> Config:
    """Forward tile shape and pipelining for one launch. With block skipping the tile is the
    skip block (SKIP_BLOCK_M x SKIP_BLOCK_N) whatever the table says."""
    d = head_dim_pad(head_dim)
    if has_skip:
        if interpreting() or q.device.type == "cpu":
            return Config(SKIP_BLOCK_M, SKIP_BLOCK_N, 4, 1)
        found = _table_lookup("fwd_skip", _arch_key(q), f"d{d}")
        return found or Config(SKIP_BLOCK_M, SKIP_BLOCK_N, 8, 3 if d <= 128 else 2)
    if interpreting() or q.device.type == "cpu":
        return Config(32, 32, 4, 1)
    found = _table_lookup("fwd", _arch_key(q), f"d{d}")
    if found is not None:
        return found
    if d <= 64:
        return Config(128, 64, 4, 3)
    if d <= 128:
        return Config(128, 64, 8, 3)
    return Config(64, 64, 8, 2)


@dataclass(frozen=True)
class BwdConfig:
    block_m: int  # dK/dV kernel: query tile
    block_n: int  # dK/dV kernel: key tile
    num_warps: int
    num_stages: int
    block_m_dq: int  # deterministic dQ kernel
    block_n_dq: int
    num_warps_dq: int
    num_stages_dq: int
    block_m_pre: int = 64  # preprocess
    atomic_dq: bool = False  # dQ by fp32 atomics in the dK/dV kernel instead of its own pass


def bwd_config(q, head_dim, seqlen_q, seqlen_k, is_causal, is_local, has_gate,
               has_skip=False) -> BwdConfig:
    """Backward tile shapes. With block skipping every tile must nest in a skip block
    (block_m divides SKIP_BLOCK_M, block_n divides SKIP_BLOCK_N) so a pair the forward skipped
    is skipped whole."""
    if interpreting() or q.device.type == "cpu":
        return BwdConfig(32, 32, 4, 1, 32, 32, 4, 1, 32)
    d = head_dim_pad(head_dim)
    found = launch_tables().get(_arch_key(q), {}).get("bwd_skip" if has_skip else "bwd",
                                                      {}).get(f"d{d}")
    if found:
        return BwdConfig(*found)
    if has_skip:
        return BwdConfig(64, 64, 8, 2, 64, 64, 8, 2) if d <= 128 else \
            BwdConfig(32, 64, 8, 1, 32, 64, 8, 1)
    if d <= 64:
        return BwdConfig(64, 64, 4, 3, 64, 64, 4, 3)
    if d <= 128:
        return BwdConfig(64, 64, 8, 2, 64, 64, 8, 2)
    return BwdConfig(32, 64, 8, 1, 32, 64, 8, 1)
