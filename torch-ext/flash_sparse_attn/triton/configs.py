"""Launch configurations: the one place where block sizes, warps and stages are chosen.

No autotuning happens on a call: configs come from the launch tables in `kernels_src/`
(embedded into each build variant as `launch_tables.json`) or from the heuristics below.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import triton

# Block-skip decisions of the sparse and gated variants (SPEC §5, §6) are taken on fixed blocks of
# skip_block_m(head_dim) queries x SKIP_BLOCK_N keys, whatever tile shape a launch uses, so that
# the skip set never depends on a launch config, a split count or a GPU.
SKIP_BLOCK_N = 64


def skip_block_m(head_dim: int) -> int:
    """Query rows of a skip block: 64 for head dims up to 128, 128 above. The forward tests a
    block as one tile, so this is also its tile height: 64-row tiles skip more (finer blocks)
    and run two CTAs per SM (H200, 16k, t=1, D=128: forward 4.39 -> 4.19 ms, backward 6.44 ->
    5.29 ms), while at D=256 a 64-row tile's test costs too much (5.92 -> 8.35 ms)."""
    return 64 if head_dim_pad(head_dim) <= 128 else 128


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
    return [batch, heads, cdiv(max_seqlen_q, skip_block_m(q.shape[-1])),
            cdiv(max_seqlen_k, SKIP_BLOCK_N)]


# --------------------------------------------------------------------------------------------
# launch tables
# --------------------------------------------------------------------------------------------

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
    major, minor = _capability(t.device)
    return f"sm{major}{minor}"


def _table_lookup(kernel: str, arch: str, key: str, cls=None):
    """The `cls` (default Config) of table `kernel` for `arch` and head-dim `key`, or None."""
    entry = launch_tables().get(arch, {}).get(kernel, {}).get(key)
    return (cls or Config)(*entry) if entry else None


def _tma_ready(t) -> bool:
    """A tensor TMA can address: 16-byte aligned base and strides, last dim contiguous."""
    step = t.element_size()
    return (t.numel() > 0 and t.stride(-1) == 1 and t.data_ptr() % 16 == 0
            and all(s * step % 16 == 0 for s in t.stride()[:-1]))


_FWD_PATH = [None]  # fwd_path_override


@functools.lru_cache(maxsize=None)
def _capability_of(index: int) -> tuple:
    return torch.cuda.get_device_capability(index)


def _capability(device: torch.device) -> tuple:
    """(major, minor) of a CUDA device, looked up once per device."""
    return _capability_of(device.index if device.index is not None
                          else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _has_module(name: str) -> bool:
    """Whether this Triton ships `name` (TMA descriptors: 3.4+; Gluon's Hopper ops: 3.5+)."""
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


FWD_PATHS = ("hopper", "tma", "portable")
# the head dims fwd_path sends to the "hopper" path: dense, sparse (softmax_threshold) and
# gated without gate sparsity or softmax_threshold, with the logsigmoid or the linear gate.
# Measured (H200, bf16, causal, H=32, Hkv=8, 16k, one run; Gluon vs TMA path): dense D=256
# 6.77 vs 7.88 ms (cuDNN 6.84); logsigmoid gate D=128 5.98 vs 5.90, D=64 4.69 vs 4.67 (the
# gate's exp2 and polynomial make Gluon's softmax the bottleneck: a tie, so "tma" keeps
# them), D=256 9.09 vs 9.27; linear gate D=128 3.77 vs 4.94, D=256 6.75 vs 8.31, D=64 3.04
# vs 3.06 (4k: 0.264 vs 0.253, so "tma")
HOPPER_HEAD_DIMS = {"dense": (64, 128, 256), "sparse": (128,), "gated": (256,),
                    "gated_linear": (128, 256)}
# the backward's "hopper" path (triton/hopper_bwd.py): its tile (query rows, keys: two
# consumer warpgroups of 64 keys, each one skip block), and per head dim how dQ is made:
# "atomic", by the kernel's dQ warpgroup (5 matmuls per tile pair), or "pass", by bwd.py's
# deterministic dQ kernel next to it (7). Measured (H200, bf16, causal, H=32, Hkv=8, 16k):
# D=64 atomic 6.65 ms (portable 8.33, cuDNN 6.39); D=128 the dK/dV kernel alone 6.97 ms, with
# atomic dQ 23.8 (a dQ warpgroup leaves the consumers 208 registers: they spill), with each
# consumer adding half of dQ after a barrier between the two 14.6, or taking turns over pairs
# of tiles 14.9, all slower than the portable backward (13.6)
HOPPER_BWD_TILE = (64, 128)
HOPPER_BWD_DQ = {64: "atomic", 128: "pass"}


@contextlib.contextmanager
def fwd_path_override(path: str | None):
    """Within this context the forward takes `path` ("hopper", "tma" or "portable") or, where
    fwd_path does not allow it, the next one down that list: benchmarks and tests compare the
    paths in one process."""
    if path is not None and path not in FWD_PATHS:
        raise ValueError(f"path must be one of {FWD_PATHS} or None, got {path!r}")
    old, _FWD_PATH[0] = _FWD_PATH[0], path
    try:
        yield
    finally:
        _FWD_PATH[0] = old


def fwd_path_forced():
    """The path `fwd_path_override` forces now (None: none)."""
    return _FWD_PATH[0]


def fwd_path(q, k, v, hopper_covers: bool = False, variant: str = "dense") -> str:
    """The forward's kernel path, the one place it is chosen, on Hopper (sm_90) when TMA can
    address the tensors:
    - "hopper": `triton/hopper.py`, the warp-specialised Gluon kernel, for the calls it covers
      (`hopper_covers`: batched, no window or seqused_k; `variant` "dense", "sparse" (SPEC §5)
      or "gated" / "gated_linear" (SPEC §6 with no block test)) at the head dims of
      HOPPER_HEAD_DIMS. Measured against "tma" (H200, causal, H=32,
      Hkv=8): dense D=128 16k 3.75 vs 4.42 ms (cuDNN 3.86), 4k 0.286 vs 0.348 (cuDNN 0.274);
      D=64 16k 2.57 vs 2.72 (cuDNN 2.43), 4k 0.212 vs 0.245 (cuDNN 0.182); sparse t=1 at 16k
      D=128: LLM-like 3.30 vs 3.66, mixed 3.96 vs 4.58, random 4.83 vs 5.74. Sparse D=64 was
      not measured on this path and stays on "tma";
    - "tma": `triton/fwd.py` with K/V tiles through TMA descriptors, every other call;
    - "portable": `triton/fwd.py` with pointer loads: other GPUs, the interpreter, unaligned
      views."""
    forced = _FWD_PATH[0]
    if (q.device.type != "cuda" or interpreting() or forced == "portable"
            or _capability(q.device)[0] != 9
            or not (_tma_ready(k) and _tma_ready(v))
            or not _has_module("triton.tools.tensor_descriptor")):
        return "portable"
    dims = HOPPER_HEAD_DIMS[variant]
    if (hopper_covers and forced in (None, "hopper") and q.shape[-1] in dims and _tma_ready(q)
            and q.dtype in (torch.bfloat16, torch.float16)
            and _has_module("triton.experimental.gluon.language.nvidia.hopper")):
        return "hopper"
    return "tma"


def bwd_path(q, k, v, dout, hopper_covers: bool = False) -> str:
    """The backward's kernel path, chosen here only: "hopper" (`triton/hopper_bwd.py`, the
    warp-specialised Gluon dK/dV + dQ kernel) for the calls it covers (`hopper_covers`:
    batched, no window or seqused_k; dense, sparse or gated, 64-row skip blocks) at the
    head dims of HOPPER_BWD_DQ on sm_90 when TMA can address q, k, v and dout; else
    "portable" (`triton/bwd.py`). fwd_path_override("hopper" / None) allows the Gluon path,
    any other forced path the portable one."""
    forced = _FWD_PATH[0]
    if (hopper_covers and forced in (None, "hopper") and q.device.type == "cuda"
            and not interpreting() and q.shape[-1] in HOPPER_BWD_DQ
            and q.dtype in (torch.bfloat16, torch.float16)
            and _capability(q.device)[0] == 9
            and all(_tma_ready(t) for t in (q, k, v, dout))
            and _has_module("triton.experimental.gluon.language.nvidia.hopper")):
        return "hopper"
    return "portable"


def hopper_config(q, head_dim) -> Config:
    """Launch config of the "hopper" path: block_m query rows per CTA (two consumer
    warpgroups of block_m / 2), block_n keys per tile, num_stages K/V buffers (table
    `fwd_hopper`; num_warps is the default partition's, one warpgroup)."""
    return _table_lookup("fwd_hopper", _arch_key(q), f"d{head_dim_pad(head_dim)}") or \
        Config(128, 128, 4, 2)


def fwd_config(q, head_dim, seqlen_q, seqlen_k, is_causal, is_local, has_gate,
               has_skip=False, tma=False) -> Config:
    """Forward tile shape and pipelining for one launch. With block skipping the tile is the
    skip block (skip_block_m x SKIP_BLOCK_N); a table gives only its warps and stages. The TMA
    path reads tables `fwd_tma` / `fwd_skip_tma` / `fwd_gate_tma` first."""
    d = head_dim_pad(head_dim)
    arch = _arch_key(q)

    def lookup(name):
        return (tma and _table_lookup(name + "_tma", arch, f"d{d}")) or \
            _table_lookup(name, arch, f"d{d}")

    if has_skip:
        bm = skip_block_m(head_dim)
        if interpreting() or q.device.type == "cpu":
            return Config(bm, SKIP_BLOCK_N, 4, 1)
        found = lookup("fwd_skip")
        if found:
            return Config(bm, SKIP_BLOCK_N, found.num_warps, found.num_stages)
        # one warpgroup per 64 rows
        return Config(bm, SKIP_BLOCK_N, bm // 16, 3 if d <= 128 else 2)
    if interpreting() or q.device.type == "cpu":
        return Config(32, 32, 4, 1)
    # gated: the gate's per-score work changes the best pipelining (table `fwd_gate`)
    found = (has_gate and lookup("fwd_gate")) or lookup("fwd")
    if found:
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
    """Backward tile shapes. With block skipping the query tiles must nest in the skip blocks'
    rows (block_m divides skip_block_m); key tiles may cover several skip blocks (their
    skipped keys are masked) or part of one. Launch tables, first present wins: `bwd_gate`
    (gated, with or without block skipping), `bwd_skip` (block skipping), `bwd_causal` (causal
    without a local window), `bwd`. Measured on the H200 (bf16, D=128, 16k): the causal
    backward is fastest with two 64x64 dK/dV CTAs per SM, the full one with one 64x128 CTA."""
    if interpreting() or q.device.type == "cpu":
        return BwdConfig(32, 32, 4, 1, 32, 32, 4, 1, 32)
    d = head_dim_pad(head_dim)
    arch, key = _arch_key(q), f"d{d}"
    found = (has_gate and _table_lookup("bwd_gate", arch, key, BwdConfig)) or \
        (has_skip and _table_lookup("bwd_skip", arch, key, BwdConfig)) or \
        (is_causal and not is_local and _table_lookup("bwd_causal", arch, key, BwdConfig)) or \
        _table_lookup("bwd", arch, key, BwdConfig)
    if found:
        return found
    if d <= 64:
        return BwdConfig(64, 64, 4, 3, 64, 64, 4, 3)
    if d <= 128:
        return BwdConfig(64, 64, 8, 2, 64, 64, 8, 2)
    return BwdConfig(32, 64, 8, 1, 32, 64, 8, 1)


def check_skip_tiles(cfg: BwdConfig, skip_m: int) -> None:
    """Tile shapes a backward with block skipping can use (see bwd_config); skip_m is the
    launch's `skip_block_m`."""
    for bm, bn in ((cfg.block_m, cfg.block_n), (cfg.block_m_dq, cfg.block_n_dq)):
        if skip_m % bm or (bn % SKIP_BLOCK_N and SKIP_BLOCK_N % bn):
            raise ValueError(f"backward tiles {bm}x{bn} do not nest in the "
                             f"{skip_m}x{SKIP_BLOCK_N} skip blocks")


def heads_first(kernel: str, is_local: bool) -> bool:
    """Program order of the attention grids (common.program_tile): the tiles of one head
    together (they share that head's K/V or Q/dO in L2), or tile t of every head before tile
    t + 1 of any head. Measured on the H200 (bf16, H=32, Hkv=8, D=128): causal 16k backward
    14.11 ms tiles-together vs 14.53 ms heads-first, forward within 1%; default-band local
    windows at 64k backward 47.8 ms vs 41.2 ms heads-first (the sink's key tile, which every
    query sees, and the long far bands of all heads start first), forward 12.6 vs 12.8 ms."""
    return kernel == "bwd" and bool(is_local)


def decode_skips(alpha, gather_kv_indices, window_sizes, softmax_threshold,
                 gate_threshold) -> bool:
    """Whether a decode call drops blocks (SPEC §7): a positive softmax threshold, or gates
    with a gate threshold != 0; plain caches only (no index list, no window)."""
    return gather_kv_indices is None and window_sizes is None and (
        softmax_threshold > 0 or (alpha is not None and gate_threshold != 0))


def decode_codes_shape(q, k_cache, page_table, cu_seqlens_k, max_seqlen_k,
                       has_skip: bool) -> list:
    """Shape of decode's skip codes: [B, H, cdiv(max keys of a sequence, SKIP_BLOCK_N)] (the
    keys: paged page_table.shape[1] * page_size, packed max_seqlen_k or the whole cache,
    contiguous the cache length); [0] when the call cannot skip."""
    if not has_skip:
        return [0]
    if page_table is not None:
        keys = page_table.shape[1] * k_cache.shape[1]
    elif cu_seqlens_k is not None:
        keys = max_seqlen_k if max_seqlen_k > 0 else k_cache.shape[0]
    else:
        keys = k_cache.shape[1]
    return [q.shape[0], q.shape[1], cdiv(keys, SKIP_BLOCK_N)]


# Decode (split-KV, packed GQA)
DECODE_CTAS_PER_SM = 2
DECODE_MIN_TILES_PER_SPLIT = 2
DECODE_MAX_SPLITS = 256
DECODE_MAX_BLOCK_M = 64  # at most this many query heads of a KV head per program


# --------------------------------------------------------------------------------------------
# launch configuration
# --------------------------------------------------------------------------------------------
def cdiv(a: int, b: int) -> int:
    """Ceil division for host code: `triton.cdiv` is a constexpr_function, whose call from
    Python costs ~1.7 us (Triton 3.6 and 3.9), and launchers call it several times per call.
    No int() coercion: under torch.compile a and b may be symbolic sizes, which must stay
    symbolic (fake implementations compute shapes with it)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1), for host code (see `cdiv`), of static
    ints (head dims, group sizes, split counts)."""
    return 1 << max(int(n) - 1, 0).bit_length()


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (132 on H200); a nominal 132 elsewhere."""
    if device.type == "cuda" and torch.cuda.is_available():
        return _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    return 132


FWD_SPLIT_CTAS_PER_SM = 2  # resident programs per SM the split forward aims for
FWD_MIN_TILES_PER_SPLIT = 16
FWD_MAX_SPLITS = 32
FWD_SPLIT_WORKSPACE_BYTES = 1 << 30  # at most this much fp32 workspace for the partials


def fwd_num_splits(q, programs: int, seqlen_k: int, block_n: int, requested: int = 0,
                   partial_row_bytes: int = 0) -> int:
    """Split-KV of the forward's "tma" and "portable" paths (`fwd.py`, IS_SPLIT; the Gluon
    path does not split, and `fwd_path` takes it only when no split is asked for): how many
    programs share each query tile's keys. `requested` > 0 (the functions' `num_splits`) is
    taken as given, at most the key tiles there are; 0 = `fwd_split_heuristic` on CUDA (CPU
    tensors and the interpreter never split by heuristic). `programs`: batch x heads x query
    tiles of the launch. `partial_row_bytes`: the workspace one split needs (all rows' fp32
    partial out and lse); the count is capped so that the partials stay under
    FWD_SPLIT_WORKSPACE_BYTES (a large num_splits on a long prefill would otherwise ask for
    tens of GB)."""
    n_tiles = cdiv(max(int(seqlen_k), 1), block_n)
    if requested and requested > 0:
        splits = max(1, min(int(requested), n_tiles))
    elif q.device.type != "cuda" or interpreting():
        return 1
    else:
        splits = fwd_split_heuristic(programs, n_tiles, num_sms(q.device))
    if partial_row_bytes > 0:
        splits = min(splits, max(1, FWD_SPLIT_WORKSPACE_BYTES // partial_row_bytes))
    return splits


def fwd_split_heuristic(programs: int, n_tiles: int, sms: int = 132) -> int:
    """When the launch's programs fill less than sms * FWD_SPLIT_CTAS_PER_SM resident slots
    (chunked prefill of a few hundred queries, few heads), split into cdiv(slots, programs)
    parts, keeping at least FWD_MIN_TILES_PER_SPLIT key tiles per part and at most
    FWD_MAX_SPLITS parts; otherwise 1. A function of shapes only. Not yet tuned on the GPU: the
    constants are a starting point. Examples (132 SMs; H=32, 64-row query tiles, 64-key
    tiles): Sq=512, Sk=128k -> 256 programs, 2048 key tiles: 2 splits; Sq=128, Sk=32k -> 64
    programs: 5; Sq=2048 -> 1024 programs: 1."""
    programs = max(1, int(programs))
    slots = sms * FWD_SPLIT_CTAS_PER_SM
    if programs >= slots:
        return 1
    return max(1, min(cdiv(slots, programs), int(n_tiles) // FWD_MIN_TILES_PER_SPLIT,
                      FWD_MAX_SPLITS))


def decode_block_m(group: int) -> int:
    """Rows of the packed-GQA tile: the G query heads of a KV head, padded to a power of two
    (>= 16 for tl.dot), at most DECODE_MAX_BLOCK_M (larger groups use several programs)."""
    return min(max(16, next_pow2(group)), DECODE_MAX_BLOCK_M)


def decode_config(q, head_dim: int, group: int, paged: bool = False,
                  gather: bool = False) -> Config:
    """Tile shape and pipelining of the decode kernel.

    Launch table entry `decode` / `d<D>` (`d<D>_paged`, `d<D>_gather`, `d<D>_gather_paged`) of
    the device's arch if present, else: a K+V tile of 32 KB (bf16: BLOCK_N = 8192 / D) and the
    number of pipeline stages that gives two K/V tiles in flight per program. Indirect row
    addressing (page table, index list) costs Triton's software pipeliner stages: read off the
    TTGIR / shared-memory size of Triton 3.6 for sm_90 (2 tiles = ~72 KB of shared memory):
    contiguous 3; paged 5; gathered 5 (3 at D <= 64, where the pipeliner overlaps the index
    load); gathered + paged 7 (5 at D <= 64). BLOCK_M always comes from `decode_block_m`."""
    block_m = decode_block_m(group)
    if interpreting() or q.device.type == "cpu":
        return Config(block_m, 32, 4, 1)
    d = head_dim_pad(head_dim)
    kind = "_".join(n for n, on in (("gather", gather), ("paged", paged)) if on)
    found = _table_lookup("decode", _arch_key(q),
                                  f"d{d}_{kind}" if kind else f"d{d}")
    if found is not None:
        return Config(block_m, found.block_n, found.num_warps, found.num_stages)
    block_n = 128 if d <= 64 else 64 if d <= 128 else 32
    stages = 3 + 2 * int(paged) + (2 * int(gather) if d > 64 else 0)
    return Config(block_m, block_n, 4, stages)


def decode_num_splits(batch: int, num_heads: int, num_kv_heads: int, seqlen_k: int,
                      block_n: int, num_sms: int = 132) -> int:
    """Split-KV heuristic: how many programs share one (sequence, KV head)'s keys.

    Without splitting there are P = batch * Hkv * cdiv(G, BLOCK_M) programs (packed GQA). A
    decode program streams K/V with two tiles in flight, so two resident programs per SM are
    enough to keep HBM busy; the best launch is then one resident wave: every program running
    from start to end at once, no tail wave. So split into floor(slots / P) parts with
    slots = num_sms * DECODE_CTAS_PER_SM (one program per SM when BLOCK_M = 64: larger
    tiles), keeping at least DECODE_MIN_TILES_PER_SPLIT key tiles per split (seqlen_k: the
    longest sequence, or topk with a gather list) and at most DECODE_MAX_SPLITS. P >= slots:
    no split (several waves of whole sequences). Examples on an H200 (132 SMs, H=32, Hkv=8,
    D=128, BLOCK_N=64): B=1 -> 33 splits, B=8 -> 4, B=32 -> 1.
    A function of shapes only: the same count for a whole CUDA graph / compiled region."""
    group = max(1, num_heads // max(num_kv_heads, 1))
    block_m = decode_block_m(group)
    programs = batch * num_kv_heads * cdiv(group, block_m)
    if programs <= 0:
        return 1
    slots = num_sms * (1 if block_m >= 64 else DECODE_CTAS_PER_SM)
    n_tiles = cdiv(max(int(seqlen_k), 1), block_n)
    splits = min(slots // programs, n_tiles // DECODE_MIN_TILES_PER_SPLIT, DECODE_MAX_SPLITS)
    return max(1, splits)
