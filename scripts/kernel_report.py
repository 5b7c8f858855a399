"""What the GPU would run, read without a GPU: registers, spills and the instruction mix of each
loop of the attention kernels, compiled for sm_90a exactly as a launch specialises them.

The launch functions run on CPU tensors of the real shape with the @triton.jit kernels replaced
by recorders; each recorded call is specialised by Triton's own rule (ints equal to 1 become
constants, ints and pointers divisible by 16 get the divisibility hint), compiled for sm_90a,
assembled with Triton's ptxas (-v: registers, spill bytes) and disassembled with its cuobjdump.
Every backward branch whose body issues wgmma (HGMMA) is a main loop; its SASS is counted per
opcode, per warp and iteration.

Use it with the Triton the GPU machines run (3.6; .ci/run installs it into
$FSA_TRITON_COMPAT_PATH):

    PYTHONPATH=$FSA_TRITON_COMPAT_PATH python scripts/kernel_report.py bwd
    PYTHONPATH=... python scripts/kernel_report.py fwd --threshold 1.0
    PYTHONPATH=... python scripts/kernel_report.py bwd --gate --config 64,64,4,2,64,64,4,2

Launch configs come from the sm90 launch tables as on the H200 unless --config is given.
Reading numbers: one SM issues 4 warp-instructions per clock, so a loop of N instructions per
warp and W warps needs at least N * W / 4 clocks per iteration; compare it with the MMA time of
the iteration (about 4096 bf16 FLOP per clock per SM on the H200).
"""

from __future__ import annotations

import argparse
import collections
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OPCODES = ("HGMMA", "MUFU", "LDGSTS", "UTMALDG", "LDS", "LDL", "STL", "FFMA", "FMUL", "FADD",
           "IMAD", "LOP3", "IADD3", "ISETP", "SEL")


def record_launches(args):
    """Run the forward or backward launch function on CPU tensors; return the recorded
    (jit function, args, kwargs) of each attention kernel launch (the backward's preprocess
    and visit-list kernels left out: they do no attention math)."""
    import torch
    import triton

    # the kernel sources only: the package's __init__ needs the generated _ops.py of a build
    if "fsa_kernel_sources" not in sys.modules:
        pkg = types.ModuleType("fsa_kernel_sources")
        pkg.__path__ = [str(ROOT / "torch-ext" / "flash_sparse_attn")]
        sys.modules["fsa_kernel_sources"] = pkg
    fwd, bwd, configs = (importlib.import_module(f"fsa_kernel_sources.triton.{m}")
                         for m in ("fwd", "bwd", "configs"))

    recorded = []

    class Recorder:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            return lambda *a, **kw: recorded.append((self.fn, a, kw))

    for mod in (fwd, bwd):
        for name in dir(mod):
            obj = getattr(mod, name)
            if type(obj).__name__ == "Recorder":  # left by an earlier call
                obj = obj.fn
            if isinstance(obj, triton.runtime.jit.JITFunction) and name.endswith("_kernel"):
                setattr(mod, name, Recorder(obj))

    s, h, hkv, d = args.seqlen, args.heads, args.kv_heads, args.head_dim
    bf16 = torch.bfloat16
    q = torch.zeros(1, s, h, d, dtype=bf16)
    k = torch.zeros(1, s, hkv, d, dtype=bf16)
    gated = dict(alpha=torch.zeros(1, h, s, dtype=bf16), delta=torch.zeros(1, hkv, s, dtype=bf16)) \
        if args.gate else dict(alpha=None, delta=None)
    kw = dict(cu_seqlens_q=None, cu_seqlens_k=None, seqused_k=None, window_sizes=None,
              max_seqlen_q=s, max_seqlen_k=s, softmax_scale=d ** -0.5, is_causal=args.causal,
              softmax_threshold=args.threshold, gate_threshold=args.gate_threshold,
              is_logsigmoid_gate=True, is_adapt_gate=False, **gated)
    has_skip = args.threshold > 0 or (args.gate and args.gate_threshold != 0)

    class OnGpu:  # what the config functions look at
        device = torch.device("cuda")

    configs._arch_key = lambda t: args.arch
    configs.launch_tables = lambda: json.loads((ROOT / "kernels_src" / "launch_tables.json").read_text())
    cfg = None
    if args.config:
        nums = [int(x) for x in args.config.split(",")]
        cfg = configs.Config(*nums) if args.kernel == "fwd" else configs.BwdConfig(*nums)
    if args.kernel == "fwd":
        cfg = cfg or configs.fwd_config(OnGpu, d, s, s, args.causal, False, args.gate, has_skip)
        fwd.launch_attn_fwd(q, k, k, deterministic=False, config=cfg, **kw)
    else:
        cfg = cfg or configs.bwd_config(OnGpu, d, s, s, args.causal, False, args.gate, has_skip)
        skip = torch.ones(configs.skip_shape(q, k, None, s, s, has_skip), dtype=torch.uint8)
        bwd.launch_attn_bwd(q, q, k, k, q, torch.zeros(1, h, s), skip, deterministic=False,
                            config=cfg, **kw)
    print(f"{args.kernel}: S={s} H={h} Hkv={hkv} D={d} causal={args.causal} "
          f"threshold={args.threshold} gate={args.gate} config={cfg}")
    return [r for r in recorded if "_attn_" in r[0].__name__]


def compile_recorded(fn, args, kwargs):
    """Compile one recorded launch for sm_90a, specialised as Triton specialises a launch."""
    import triton
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler import ASTSource

    kwargs = dict(kwargs)
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    values = dict(zip(fn.arg_names, args), **kwargs)
    signature, attrs, constexprs = {}, {}, {}
    for i, param in enumerate(fn.params):
        value = values[param.name]
        if param.is_constexpr:
            signature[param.name], constexprs[(i,)] = "constexpr", value
            continue
        ty, key = native_specialize_impl(CUDABackend, value, False,
                                         not param.do_not_specialize,
                                         not param.do_not_specialize_on_alignment)
        signature[param.name] = ty
        if ty == "constexpr":
            constexprs[(i,)] = key
        elif key:
            attrs[(i,)] = CUDABackend.parse_attr(key)
    src = ASTSource(fn=fn, signature=signature, attrs=attrs, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def main_loops(sass: str):
    """(start, end, opcode counts) of every backward branch whose body holds an HGMMA."""
    code = []
    for line in sass.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            code.append((int(m.group(1), 16), m.group(2)))
    loops = []
    for addr, text in code:
        m = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", text)
        if not m or int(m.group(1), 16) >= addr:
            continue
        start = int(m.group(1), 16)
        body = [t for a, t in code if start <= a <= addr]
        ops = collections.Counter(re.match(r"(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", t).group(1)
                                  for t in body)
        # innermost loops only (an inner loop's back branch comes first in address order)
        if ops["HGMMA"] and not any(start <= s and e <= addr for s, e, _ in loops):
            loops.append((start, addr, ops))
    return loops


def analyse(kernel, num_warps) -> dict:
    """Registers, spill bytes, shared memory and main loops of one compiled kernel."""
    nvbin = Path(__import__("triton").__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = Path(tmp) / "k.ptx", Path(tmp) / "k.cubin"
        ptx.write_text(kernel.asm["ptx"])
        log = subprocess.run([str(nvbin / "ptxas"), "-arch=sm_90a", "-v", str(ptx), "-o",
                              str(cubin)], capture_output=True, text=True, check=True).stderr
        sass = subprocess.run([str(nvbin / "cuobjdump"), "-sass", str(cubin)],
                              capture_output=True, text=True, check=True).stdout
    return dict(num_warps=num_warps, shared=kernel.metadata.shared,
                registers=int(re.search(r"Used (\d+) registers", log).group(1)),
                spill_bytes=int(re.search(r"(\d+) bytes spill stores", log).group(1)),
                loops=[dict(start=a, end=b, ops=dict(ops)) for a, b, ops in main_loops(sass)])


def kernel_reports(argv) -> list:
    """[(kernel name, analyse(...))] for one command line (see main)."""
    args = parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    return [(fn.__name__, analyse(compile_recorded(fn, a, kw), kw.get("num_warps", 4)))
            for fn, a, kw in record_launches(args)]


def print_report(name, r):
    print(f"{name}: {r['num_warps']} warps, shared {r['shared']} B, {r['registers']} registers, "
          f"{r['spill_bytes']} B spill stores per thread")
    for loop in r["loops"]:
        ops = collections.Counter(loop["ops"])
        n = sum(ops.values())
        print(f"  loop {loop['start']:#x}-{loop['end']:#x}: {n} instructions per warp, "
              f">= {n * r['num_warps'] // 4} issue clocks per iteration; "
              + " ".join(f"{o}={ops[o]}" for o in OPCODES))


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("kernel", choices=("fwd", "bwd"))
    ap.add_argument("--seqlen", type=int, default=16384)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--no-causal", dest="causal", action="store_false")
    ap.add_argument("--threshold", type=float, default=0.0, help="softmax_threshold")
    ap.add_argument("--gate", action="store_true", help="gated (logsigmoid)")
    ap.add_argument("--gate-threshold", type=float, default=0.0)
    ap.add_argument("--config", help="comma-separated Config / BwdConfig fields")
    ap.add_argument("--arch", default="sm90", help="launch-table key")
    return ap.parse_args(argv)


def main(argv=None):
    for name, r in kernel_reports(argv):
        print_report(name, r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
