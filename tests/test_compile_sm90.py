"""The kernel family compiles for Hopper (sm_90) with this machine's Triton, no GPU needed.

The interpreter (how CI runs the kernels) skips Triton's compiler front end and code generation:
a construct the interpreter accepts can still fail to compile (e.g. a non-constexpr global).
This compiles every kernel, in its main flag combinations, to PTX and cubin for sm_90 (Triton
ships ptxas) and checks that the attention matmuls use Hopper's warpgroup MMA (wgmma).
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest


I32_PTRS = {"CU_Q", "CU_K", "SEQUSED_K", "WINDOWS", "PAGE_TABLE", "GATHER", "COUNT"}
F32_PTRS = {"LSE", "LSE2", "DI", "DQ", "DQ_ACC", "DALPHA", "O_PART", "LSE_PART"}
FLOATS = {"scale", "scale_log2", "softmax_threshold", "gate_threshold"}
INT_SCALARS = {"H", "HKV", "GROUP"}  # upper-case names that are not pointers


def _compile(fn, consts, num_warps=8, num_stages=2, ptrs=None):
    """Compile a @triton.jit kernel: upper-case arguments are pointers (bf16 unless listed
    above), known float scalars fp32, other scalars int32 divisible by 16 like Triton's own
    specialisation of strides. `ptrs` overrides pointer types by name."""
    names = fn.arg_names
    sig, attrs = {}, {}
    for i, n in enumerate(names):
        if n in consts:
            sig[n] = "constexpr"
        elif n not in INT_SCALARS and n.upper() == n:
            sig[n] = (ptrs or {}).get(n) or (
                "*i32" if n in I32_PTRS else "*fp32" if n in F32_PTRS
                else "*u8" if n in ("SKIP", "CODES") else "*i16" if n == "LIST" else "*bf16")
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif n in FLOATS:
            sig[n] = "fp32"
        else:
            sig[n] = "i32"
            if n.startswith("stride"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=fn, signature=sig, attrs=attrs,
                    constexprs={(names.index(k),): v for k, v in consts.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


FWD_FLAGS = [
    dict(),
    dict(IS_CAUSAL=False),
    dict(HAS_THRESHOLD=True),
    dict(HAS_THRESHOLD=True, BLOCK_M=64),  # the skip block of head dims <= 128: one warpgroup
    dict(HAS_GATE=True, GATE_SKIP=True, HAS_THRESHOLD=True, IS_ADAPT_GATE=True),
    dict(IS_LOCAL=True, WINDOW_PER_QHEAD=True),
    dict(IS_VARLEN=True, HAS_SEQUSED_K=True, HEAD_DIM=80),
    # chunked prefill over a paged cache
    dict(PAGE_SIZE=64, HAS_SEQUSED_K=True, HAS_GATE=True, GATE_SKIP=True, HAS_THRESHOLD=True,
         BLOCK_M=64),
    # split-KV chunked prefill over a paged cache
    dict(IS_SPLIT=True, PAGE_SIZE=64, HAS_SEQUSED_K=True),
]
# the Hopper path (configs.fwd_path "tma"): K/V through TMA descriptors, at the sm90 TMA tables
FWD_TMA_FLAGS = [
    dict(BLOCK_N=128),
    dict(IS_CAUSAL=False, HEAD_DIM=256, BLOCK_N=64),
    dict(HAS_THRESHOLD=True, BLOCK_M=64),
    dict(HAS_GATE=True, GATE_SKIP=True, HAS_THRESHOLD=True, IS_ADAPT_GATE=True, BLOCK_M=64),
    dict(IS_LOCAL=True, WINDOW_PER_QHEAD=True),
    dict(IS_VARLEN=True, HAS_SEQUSED_K=True, HEAD_DIM=80, TMA_EDGES=False),
    dict(IS_SPLIT=True, BLOCK_N=128),
]


def compile_all(pkg):
    """Compile every kernel variant below; returns a list of report lines. Runs in a process
    without TRITON_INTERPRET (the interpreter replaces @triton.jit functions at import)."""
    fwd, bwd, dec, comb = (importlib.import_module(f"{pkg}.triton.{m}")
                           for m in ("fwd", "bwd", "decode", "combine"))
    lines = []
    for flags in FWD_FLAGS + [dict(f, USE_TMA=True) for f in FWD_TMA_FLAGS]:
        consts = dict(HEAD_DIM=128, BLOCK_M=128, BLOCK_N=64, IS_CAUSAL=True, IS_LOCAL=False,
                      WINDOW_PER_QHEAD=False, IS_VARLEN=False, HAS_SEQUSED_K=False,
                      HAS_GATE=False, IS_LOGSIGMOID=True, HAS_THRESHOLD=False,
                      GATE_SKIP=False, IS_ADAPT_GATE=False, USE_TMA=False, TMA_EDGES=False,
                      PAGE_SIZE=0, IS_SPLIT=False)
        if flags.get("USE_TMA"):
            consts["TMA_EDGES"] = True
        consts.update(flags)
        consts["HEAD_DIM_PAD"] = dp = max(16, 1 << (consts["HEAD_DIM"] - 1).bit_length())
        ptrs = {"LIST": "*i32"}
        if consts["USE_TMA"]:
            desc = f"tensordesc<bf16[1, {consts['BLOCK_N']}, 1, {dp}]>"
            ptrs.update(K_DESC=desc, V_DESC=desc)
        k = _compile(fwd._attn_fwd_kernel, consts, num_warps=consts["BLOCK_M"] // 16,
                     num_stages=2 if consts["USE_TMA"] else 3, ptrs=ptrs)
        tma = "cp.async.bulk.tensor" in k.asm["ptx"]
        assert tma == consts["USE_TMA"], (flags, tma)
        lines.append(f"fwd {sorted(flags)} wgmma={'wgmma.mma_async' in k.asm['ptx']} tma={tma}")
    for flags in (dict(), dict(HAS_SKIP=True, HAS_GATE=True), dict(HAS_SKIP=True, BLOCK_N=128),
                  dict(HAS_SKIP=True, SKIP_M=64),
                  dict(IS_LOCAL=True, IS_VARLEN=True),
                  dict(IS_LOCAL=True, WINDOW_PER_QHEAD=True)):
        base = dict(HEAD_DIM=128, HEAD_DIM_PAD=128, BLOCK_M=64, BLOCK_N=64, IS_CAUSAL=True,
                    IS_LOCAL=False, WINDOW_PER_QHEAD=False, IS_VARLEN=False,
                    HAS_SEQUSED_K=False, HAS_GATE=False, IS_LOGSIGMOID=True, HAS_SKIP=False,
                    SKIP_M=128, SKIP_N=64)
        base.update(flags)
        for name, fn, extra in (("dkdv", bwd._attn_bwd_dkdv_kernel, dict(ATOMIC_DQ=False)),
                                ("dq", bwd._attn_bwd_dq_kernel, {})):
            k = _compile(fn, {**base, **extra})
            lines.append(f"bwd-{name} {sorted(flags)} wgmma={'wgmma.mma_async' in k.asm['ptx']}")
    for zero_dq in (False, True):  # True: also zeroes the atomic dQ's fp32 accumulator
        _compile(bwd._bwd_preprocess_kernel,
                 dict(HEAD_DIM=128, HEAD_DIM_PAD=128, BLOCK_M=64, IS_VARLEN=False,
                      ZERO_DQ=zero_dq), num_warps=4)
    lines.append("bwd-preprocess ok")
    for flags in (dict(), dict(IS_PAGED=True, IS_GATHER=True),
                  dict(IS_LOCAL=True, HAS_GATE=True, IS_SPLIT=True),
                  dict(IS_PAGED=True, HAS_GATE=True, IS_SPLIT=True, HAS_THRESHOLD=True,
                       GATE_SKIP=True, WRITE_CODES=True)):
        consts = dict(HEAD_DIM=128, HEAD_DIM_PAD=128, BLOCK_M=16, BLOCK_N=64, M_CHUNKS=1,
                      PAGE_SIZE=64, IS_PAGED=False, IS_PACKED=False, HAS_SEQUSED_K=True,
                      IS_GATHER=False, IS_LOCAL=False, WINDOW_PER_QHEAD=False, HAS_GATE=False,
                      IS_LOGSIGMOID=True, IS_SPLIT=False, HAS_THRESHOLD=False, GATE_SKIP=False,
                      WRITE_CODES=False)
        consts.update(flags)
        _compile(dec._attn_decode_kernel, consts, num_warps=4, num_stages=3)
        lines.append(f"decode {sorted(flags)} ok")
    _compile(dec._kv_append_kernel, dict(HEAD_DIM=128, HEAD_DIM_PAD=128, PAGE_SIZE=64,
                                         IS_PAGED=True, IS_PACKED=False, HAS_DELTA=True),
             num_warps=4)
    _compile(comb._combine_kernel, dict(HEAD_DIM=128, HEAD_DIM_PAD=128, SPLITS_PAD=64,
                                        BLOCK_S=64), num_warps=4)
    lines.append("kv_append ok")
    lines.append("combine ok")
    lines += compile_hopper(pkg)
    lines += compile_hopper_bwd(pkg)
    return lines


def _gluon_sm90(fn, sig, consts):
    """Compile Gluon kernel `fn` for sm_90 with the given argument types and constexprs (every
    other argument an i32), as its launch would."""
    from triton.experimental.gluon._runtime import GluonASTSource
    import triton
    from triton.backends.compiler import GPUTarget

    for n in fn.arg_names:
        sig.setdefault(n, "constexpr" if n in consts else "i32")
    src = GluonASTSource(fn=fn, signature=sig, constexprs={
        (fn.arg_names.index(k),): v for k, v in consts.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))


def _desc(rows, d):
    from triton.experimental.gluon import language as gl

    lay = gl.NVMMASharedLayout.get_default_for([1, rows, 1, d], gl.bfloat16)
    return f"tensordesc<bf16[1, {rows}, 1, {d}],{lay!r}>"


def _row_desc(n):
    from triton.experimental.gluon import language as gl

    lay = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=16, rank=3)
    return f"tensordesc<bf16[1, 1, {n}],{lay!r}>"


def compile_hopper(pkg):
    """The Gluon forward (triton/hopper.py): dense at the head dims it runs, sparse, and gated
    (logsigmoid and linear), with ptxas's spill bytes."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    import kernel_report
    import triton

    compat = triton.__version__.startswith("3.6.")

    fn = importlib.import_module(f"{pkg}.triton.hopper")._attn_fwd_hopper_kernel
    lines = []
    variants = ((128, 128, True, False, None), (64, 128, False, False, None),
                (256, 64, True, False, None), (128, 128, True, True, None),
                (128, 128, True, False, "logsigmoid"), (256, 64, False, False, "linear"))
    for d, bn, causal, sparse, gate in variants:
        sig = dict(q_desc=_desc(64, d), k_desc=_desc(bn, d), v_desc=_desc(bn, d),
                   d_desc=_row_desc(bn) if gate else _desc(bn, d), O="*bf16", LSE="*fp32",
                   SKIP="*u8", ALPHA="*bf16", scale_log2="fp32", softmax_threshold="fp32")
        consts = dict(BLOCK_M=64, BLOCK_N=bn, STAGES=2, IS_CAUSAL=causal, SPARSE=sparse,
                      HAS_GATE=gate is not None, IS_LOGSIGMOID=gate == "logsigmoid",
                      CONSUMER_REGS=232 if sparse else 240)  # as the launch sets them
        k = _gluon_sm90(fn, sig, consts)
        ptx = k.asm["ptx"]
        assert "wgmma.mma_async" in ptx and "cp.async.bulk.tensor" in ptx and "setmaxnreg" in ptx
        # ptxas -v with Triton 3.6's ptxas (later Tritons emit PTX newer than their bin/ptxas)
        spill = kernel_report.analyse(k, 4)["spill_bytes"] if compat else "-"
        lines.append(f"hopper d{d} causal={causal} sparse={sparse} gate={gate} spill={spill} "
                     f"warps={k.metadata.num_warps}")
    return lines


def compile_hopper_bwd(pkg):
    """The Gluon backward (triton/hopper_bwd.py): dense at both head dims with atomic dQ,
    dense without (the dQ pass), sparse, and gated (logsigmoid with block skipping, linear)."""
    fn = importlib.import_module(f"{pkg}.triton.hopper_bwd")._attn_bwd_hopper_kernel
    lines = []
    for d, causal, skip, atomic, gate in ((128, True, False, True, None),
                                          (64, False, False, True, None),
                                          (128, True, False, False, None),
                                          (128, True, True, True, None),
                                          (128, True, True, False, "logsigmoid"),
                                          (64, False, False, False, "linear")):
        desc = _desc(64, d)
        sig = dict(q_desc=desc, k_desc=desc, v_desc=desc, do_desc=desc, DQ="*fp32",
                   DK="*bf16", DV="*bf16", LSE2="*fp32", DI="*fp32", SKIP="*u8", LIST="*i16",
                   COUNT="*i32", ALPHA="*bf16", DELTA="*fp32", DDELTA="*fp32",
                   softmax_scale="fp32", scale_log2="fp32")
        consts = dict(BLOCK_M=64, BLOCK_N=128, STAGES=2, IS_CAUSAL=causal, HAS_SKIP=skip,
                      ATOMIC_DQ=atomic, SKIP_M=64, HAS_GATE=gate is not None,
                      IS_LOGSIGMOID=gate == "logsigmoid",
                      CONSUMER_REGS=208 if atomic else 240, DQ_REGS=88)  # as the launch
        ptx = _gluon_sm90(fn, sig, consts).asm["ptx"]
        assert "wgmma.mma_async" in ptx and "cp.async.bulk.tensor" in ptx
        assert ("red.global" in ptx or "atom.global" in ptx) == atomic
        lines.append(f"hopper_bwd d{d} causal={causal} skip={skip} atomic_dq={atomic} "
                     f"gate={gate} ok")
    return lines


COMPAT_ENV = "FSA_TRITON_COMPAT_PATH"


@pytest.mark.parametrize("triton_path", [None, "compat"], ids=["ci-triton", "compat-triton"])
def test_kernels_compile_for_sm90(fsa, triton_path):
    """Every kernel variant compiles to an sm_90 cubin; the attention matmuls use wgmma.
    `compat-triton` repeats it with the Triton the GPU machines run (3.6), installed by .ci/run
    into the folder named by $FSA_TRITON_COMPAT_PATH: the kernels must build with both."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if triton_path == "compat":
        path = os.environ.get(COMPAT_ENV)
        if not path:
            pytest.skip(f"{COMPAT_ENV} is not set (.ci/run installs triton==3.6.0 there)")
        env["PYTHONPATH"] = path + os.pathsep + env.get("PYTHONPATH", "")
    variant = Path(fsa.__file__).parent
    code = (
        "import sys; from pathlib import Path; import triton, kernels;"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r});"
        "import test_compile_sm90 as t;"
        f"m = kernels.get_local_kernel(Path({str(variant)!r}));"
        "print('triton', triton.__version__);"
        "print('\\n'.join(t.compile_all(m.__name__)))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    if triton_path == "compat":
        assert lines[0] == "triton 3.6.0", lines[0]
    assert len([x for x in lines if x.startswith(("fwd", "bwd-dkdv", "bwd-dq"))]) == 28, lines
    assert sum("tma=True" in x for x in lines if x.startswith("fwd")) == 7, lines
    assert all("wgmma=True" in x for x in lines if "wgmma=" in x), lines
    assert sum("decode" in x for x in lines) == 4 and "combine ok" in lines, lines
    hopper = [x for x in lines if x.startswith("hopper ")]
    assert sum(x.startswith("hopper_bwd") and x.endswith(" ok") for x in lines) == 6, lines
    assert len(hopper) == 6 and all(x.endswith("warps=12") for x in hopper), hopper
    if triton_path == "compat":
        # the GPU machines' Triton: the Gluon forward's consumers hold their tiles in
        # registers (a gated variant that held delta in registers spilled and ran 3x slower)
        hot = [x for x in hopper
               if "gate=None" in x or "d128 causal=True sparse=False gate=log" in x]
        assert len(hot) == 5 and all(" spill=0 " in x for x in hot), hopper


def test_hot_kernels_keep_their_state_in_registers():
    """Compiled as an H200 launch specialises them (scripts/kernel_report.py, Triton 3.6, the
    sm90 launch tables, causal 16k, H=32, Hkv=8): the main loops of the forward (dense, sparse,
    gated) and of the dQ pass at D=128 do no local-memory access (LDL/STL: a register spill in
    the loops that set the speed), and every kernel has a main loop that issues wgmma (HGMMA).
    The forwards spill nothing at all."""
    path = os.environ.get(COMPAT_ENV)
    if not path:
        pytest.skip(f"{COMPAT_ENV} is not set (.ci/run installs triton==3.6.0 there)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = path + os.pathsep + env.get("PYTHONPATH", "")
    root = Path(__file__).resolve().parent.parent
    cases = [["fwd"], ["fwd", "--threshold", "1"], ["fwd", "--gate"], ["bwd"],
             ["bwd", "--threshold", "1"], ["bwd", "--gate"]]
    code = (
        "import json, sys;"
        f"sys.path.insert(0, {str(root / 'scripts')!r});"
        "import triton, kernel_report as kr;"
        "print('triton', triton.__version__);"
        f"[print(json.dumps([c, n, r])) for c in {cases!r} for n, r in kr.kernel_reports(c)]"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == "triton 3.6.0", lines[0]
    import json

    reports = [json.loads(x) for x in lines[1:] if x.startswith("[")]
    assert len(reports) == 9, reports  # 3 forwards, 3 x (dK/dV, dQ)
    for case, name, r in reports:
        assert any(loop["ops"].get("HGMMA") for loop in r["loops"]), (case, name, r)
        if "dkdv" not in name:
            for loop in r["loops"]:
                local = loop["ops"].get("LDL", 0) + loop["ops"].get("STL", 0)
                assert local == 0, (case, name, loop["ops"], r["spill_bytes"])
        if name.endswith("fwd_kernel"):
            assert r["spill_bytes"] == 0, (case, name, r["spill_bytes"], r["registers"])

