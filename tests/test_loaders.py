"""The bundle with each `kernels` release that a current transformers accepts (README "Loaders").

transformers pins `kernels`: 5.17 takes 0.16.x, 5.22 takes 0.17.x (>= 0.17.2). Each pair runs
in its own process: `kernels.get_kernel` loads the bundle (LOCAL_KERNELS, no network) and
transformers' hub-kernel path (`attn_implementation="<repo id>"`) runs a small randomly
initialised Llama through it, logits against float64 SDPA (the error rule of DESIGN.md) and
greedy tokens equal to SDPA's. "newest" is the environment's own pair (requirements-ci.txt);
"oldest" the pair .ci/run installs into $FSA_LOADER_COMPAT_PATH (requirements-compat.txt).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ID

COMPAT_ENV = "FSA_LOADER_COMPAT_PATH"
PAIRS = {"newest": None, "oldest": ("5.17.0", "0.16.2")}

SCRIPT = r"""
import sys
sys.path.insert(0, {tests!r})
import kernels, torch, transformers
print("versions", transformers.__version__, kernels.__version__)
from conftest import REPO_ID
import test_integrations as ti
fsa = kernels.get_kernel(REPO_ID, version=1)
q = torch.randn(1, 33, 4, 64, dtype=torch.float64)
k, v = torch.randn(1, 33, 2, 64, dtype=torch.float64), torch.randn(1, 33, 2, 64, dtype=torch.float64)
ref = fsa.reference.attention_forward(q, k, v, is_causal=True)[0]
assert (fsa.flash_dense_attn_func(q, k, v, is_causal=True) - ref).abs().max() < 1e-12
ours, sdpa, sdpa64 = ti.make_models(REPO_ID)
assert ours.config._attn_implementation == REPO_ID
ti.check_logits_and_generation(ours, sdpa, sdpa64)
import transformers.modeling_flash_attention_utils as fa
assert fa._flash_fn.__module__.endswith("fa_compat"), fa._flash_fn.__module__
print("ok")
"""


@pytest.mark.parametrize("pair", list(PAIRS))
def test_bundle_loads_with_kernels_release(bundle_root, pair):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["LOCAL_KERNELS"] = f"{REPO_ID}={bundle_root}"
    if PAIRS[pair]:
        path = os.environ.get(COMPAT_ENV)
        if not path:
            pytest.skip(f"{COMPAT_ENV} is not set (.ci/run installs requirements-compat.txt there)")
        env["PYTHONPATH"] = path + os.pathsep + env.get("PYTHONPATH", "")
    tests = str(Path(__file__).resolve().parent)
    proc = subprocess.run([sys.executable, "-c", SCRIPT.format(tests=tests)], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    versions = next(x for x in lines if x.startswith("versions")).split()[1:]
    if PAIRS[pair]:
        assert tuple(versions) == PAIRS[pair], versions
    assert lines[-1] == "ok", lines
    print("\n    transformers %s + kernels %s: loaded and ran" % tuple(versions))
