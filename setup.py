"""`pip install .`: the package from torch-ext/, plus the two generated files the build adds.

`build_py` copies torch-ext/flash_sparse_attn/ (any developer `_ops.py` in it is replaced), then
writes `_ops.py` with scripts/opsgen.py for the backend name "pip" and copies
kernels_src/launch_tables.json next to the package's `__init__.py`, as scripts/build.py does for
each Hub variant. Project metadata lives in pyproject.toml.
"""

import sys
import tempfile
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
PACKAGE = "flash_sparse_attn"
BACKEND = "pip"


class BuildPyWithGenerated(build_py):
    def run(self):
        super().run()
        sys.path.insert(0, str(ROOT / "scripts"))
        import opsgen

        package_dir = ROOT / "torch-ext" / PACKAGE
        src = ROOT / "kernels_src"
        extra = sorted(p for p in src.rglob("*") if p.is_file()) if src.is_dir() else []
        target = Path(self.build_lib) / PACKAGE
        target.mkdir(parents=True, exist_ok=True)
        rev = opsgen.source_revision(package_dir, extra)
        (target / "_ops.py").write_text(opsgen.ops_py(opsgen.namespace(BACKEND, rev)))
        tables = src / "launch_tables.json"
        (target / "launch_tables.json").write_bytes(
            tables.read_bytes() if tables.is_file() else b"{}\n"
        )

    def get_outputs(self, include_bytecode=True):
        outputs = list(super().get_outputs(include_bytecode))
        extra = str(Path(self.build_lib) / PACKAGE / "launch_tables.json")
        if extra not in outputs:
            outputs.append(extra)
        return outputs


# setuptools' scratch files go to the temp dir: build/ holds only the Hub variants (it is what
# scripts/upload.py pushes) and torch-ext/ only the package.
SCRATCH = Path(tempfile.gettempdir()) / "flash-sparse-attn-setuptools"
SCRATCH.mkdir(parents=True, exist_ok=True)

setup(
    cmdclass={"build_py": BuildPyWithGenerated},
    options={"build": {"build_base": str(SCRATCH / "build")},
             "egg_info": {"egg_base": str(SCRATCH)}},
)
