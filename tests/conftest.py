"""Test session setup: the package under test is the built bundle, loaded the way a user loads it.

- `bundle_root` (session): `scripts/build.py` writes every variant into `<tmp>/build/`.
- `fsa` (session): that bundle loaded with `kernels.get_kernel("<repo-id>", version=N)` through
  `LOCAL_KERNELS="<repo-id>=<tmp>"`, so the real resolver, variant selection, metadata checks and
  importer of `kernels` run. `<repo-id>` and `N` come from build.toml.
- marker `gpu`: the test needs a CUDA device; it is reported as skipped, with that reason, when
  none is available. There are no other skip switches.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

with open(ROOT / "build.toml", "rb") as _f:
    _GENERAL = tomllib.load(_f)["general"]
REPO_ID: str = _GENERAL["hub"]["repo-id"]
VERSION: int = _GENERAL["version"]
KERNEL_NAME: str = _GENERAL["name"]


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "gpu: needs a CUDA device; skipped (with that reason) when none is available"
    )


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="gpu test: no CUDA device on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def build_bundle(out: Path, root: Path = ROOT) -> Path:
    """Run `<root>/scripts/build.py --out <out>`; return `out` (holding torch-<backend>/)."""
    proc = subprocess.run(
        [sys.executable, str(root / "scripts" / "build.py"), "--out", str(out), "--quiet"],
        capture_output=True, text=True, cwd=root,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"scripts/build.py failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return out


@pytest.fixture(scope="session")
def bundle_root(tmp_path_factory) -> Path:
    """A repository-like directory whose `build/` holds a fresh build of every variant."""
    root = tmp_path_factory.mktemp("bundle")
    build_bundle(root / "build")
    return root


@pytest.fixture(scope="session")
def fsa(bundle_root):
    """The package, loaded from the built bundle with `kernels.get_kernel`."""
    from kernels import get_kernel

    old = os.environ.get("LOCAL_KERNELS")
    os.environ["LOCAL_KERNELS"] = f"{REPO_ID}={bundle_root}"
    try:
        # trust_remote_code matters only for the Hub resolvers (the repo's org is not one of
        # kernels' trusted publishers); LOCAL_KERNELS is resolved before them.
        return get_kernel(REPO_ID, version=VERSION, trust_remote_code=True)
    finally:
        if old is None:
            os.environ.pop("LOCAL_KERNELS", None)
        else:
            os.environ["LOCAL_KERNELS"] = old
