"""The built bundle: its layout, metadata and digest, and loading it the ways a user does.

Loading paths, each checked by running attention and comparing with a float64 computation
written here (`plain_attention`):
- `kernels.get_kernel` with LOCAL_KERNELS (the `fsa` fixture of conftest.py, in this process);
- `kernels.get_kernel` from an offline Hub cache (`kernels--<org>--<name>/refs/v1` and
  `snapshots/<sha>/build/...`, files symlinked into `blobs/` as huggingface_hub lays them out);
- `kernels.get_local_kernel`;
- the compatibility entry point `<variant>/flash_sparse_attn/__init__.py` of older loaders;
- `pip wheel .`, imported as `flash_sparse_attn`.
The last four run in subprocesses: huggingface_hub and kernels read HF_* at import time, and one
process cannot register the same op namespace twice. They run without TRITON_INTERPRET, so CPU
tensors take the reference path of the ops.
"""

from __future__ import annotations

import ast
import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import torch
from kernels._rust import Digest, DigestAlgorithm, DigestValidationError, Metadata

from conftest import KERNEL_NAME, REPO_ID, ROOT, VERSION, build_bundle

PACKAGE = "flash_sparse_attn"
PACKAGE_DIR = ROOT / "torch-ext" / PACKAGE
with open(ROOT / "build.toml", "rb") as _f:
    BUILD_TOML = tomllib.load(_f)
BACKENDS = BUILD_TOML["general"]["backends"]
DTYPES = (torch.float32, torch.float64)


# ---------------------------------------------------------------------------------------------
# float64 ground truth and the error rule
# ---------------------------------------------------------------------------------------------
def plain_attention(q, k, v, is_causal):
    """Softmax attention in the dtype of q. q [B, Sq, H, D], k/v [B, Sk, Hkv, D]; query head h
    reads KV head h // (H // Hkv); causal: key j visible iff j <= i + Sk - Sq."""
    sq, heads, dim = q.shape[1], q.shape[2], q.shape[3]
    sk, kv_heads = k.shape[1], k.shape[2]
    k = k.repeat_interleave(heads // kv_heads, dim=2)
    v = v.repeat_interleave(heads // kv_heads, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * dim ** -0.5
    if is_causal:
        i = torch.arange(sq)[:, None]
        j = torch.arange(sk)[None, :]
        s = s.masked_fill(j > i + (sk - sq), float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, dim=-1), v)


def make_inputs(dtype, seed=0, B=2, Sq=37, Sk=53, H=4, Hkv=2, D=40):
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(B, S, h, D, generator=gen, dtype=torch.float64).to(dtype)
            for n, S, h in (("q", Sq, H), ("k", Sk, Hkv), ("v", Sk, Hkv))}


def check_attention(out, t):
    """err(out, fp64) <= 2 * err(torch in the same dtype, fp64) + eps, on the same inputs."""
    q, k, v = t["q"], t["k"], t["v"]
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all()
    ref = plain_attention(q.double(), k.double(), v.double(), True)
    err = (out.double() - ref).abs().max().item()
    err_torch = (plain_attention(q, k, v, True).double() - ref).abs().max().item()
    eps = 64 * torch.finfo(q.dtype).eps * max(1.0, ref.abs().max().item())
    assert err <= 2 * err_torch + eps, (q.dtype, err, err_torch, eps)


# ---------------------------------------------------------------------------------------------
# loading in a fresh process
# ---------------------------------------------------------------------------------------------
LOADER = r"""
import importlib, importlib.util, json, sys
from pathlib import Path
import torch

cfg = json.loads(sys.argv[1])
mode = cfg["mode"]
if mode == "hub":
    import kernels
    module = kernels.get_kernel(cfg["repo_id"], version=cfg["version"], trust_remote_code=True)
elif mode == "local":
    import kernels
    module = kernels.get_local_kernel(Path(cfg["path"]), trust_remote_code=True)
elif mode == "compat":
    spec = importlib.util.spec_from_file_location(
        "fsa_compat", Path(cfg["path"]) / "flash_sparse_attn" / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
elif mode == "pip":
    sys.path.insert(0, cfg["path"])
    import flash_sparse_attn as module
package = sys.modules[module.flash_dense_attn_func.__module__.rsplit(".", 1)[0]]
inputs = torch.load(cfg["inputs"])
outs = {name: module.flash_dense_attn_func(t["q"], t["k"], t["v"], is_causal=True)
        for name, t in inputs.items()}
tables = importlib.import_module(package.__name__ + ".triton.configs").launch_tables()
torch.save({"out": outs, "package": package.__name__, "file": package.__file__,
            "tables": tables}, cfg["result"])
"""


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "LOCAL_KERNELS", "KERNELS_CACHE")
           and not k.startswith("HF_")}
    env.update(extra)
    return env


def load_in_subprocess(tmp_path, env, **cfg):
    inputs = {str(dt): make_inputs(dt, seed=i + 1) for i, dt in enumerate(DTYPES)}
    cfg.update(inputs=str(tmp_path / "inputs.pt"), result=str(tmp_path / "result.pt"))
    torch.save(inputs, cfg["inputs"])
    proc = subprocess.run([sys.executable, "-c", LOADER, json.dumps(cfg)], env=env,
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = torch.load(cfg["result"])
    for name, t in inputs.items():
        check_attention(result["out"][name], t)
    return result


def variant_for_this_machine() -> str:
    if torch.version.cuda is not None:
        return "torch-cuda"
    if torch.version.hip is not None:
        return "torch-rocm"
    if getattr(torch.version, "xpu", None) is not None:
        return "torch-xpu"
    return "torch-cpu"


def metadata_id(variant_dir: Path) -> str:
    return json.loads((variant_dir / "metadata.json").read_text())["id"]


def ops_namespace(variant_dir: Path) -> str:
    m = re.search(r"^ops = torch\.ops\.(\w+)$", (variant_dir / "_ops.py").read_text(), re.M)
    assert m, f"no `ops = torch.ops.<ns>` line in {variant_dir / '_ops.py'}"
    return m.group(1)


def tree(d: Path) -> dict[str, tuple[bytes, int]]:
    return {p.relative_to(d).as_posix(): (p.read_bytes(), p.stat().st_mode & 0o777)
            for p in sorted(d.rglob("*")) if p.is_file()}


def package_sources() -> dict[str, bytes]:
    """What the build must ship from torch-ext/ (listed here independently of the build)."""
    out = {}
    for p in sorted(PACKAGE_DIR.rglob("*")):
        rel = p.relative_to(PACKAGE_DIR).as_posix()
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc" and rel != "_ops.py":
            out[rel] = p.read_bytes()
    return out


def expected_tables() -> bytes:
    src = ROOT / "kernels_src" / "launch_tables.json"
    return src.read_bytes() if src.is_file() else b"{}\n"


SENTINEL_TABLES = {"sm00": {"fwd": {"d64": [16, 16, 1, 1]}}}


@pytest.fixture(scope="module")
def sentinel_bundle(tmp_path_factory) -> Path:
    """A build of a copy of the sources whose launch tables hold a recognisable entry (for a
    device that does not exist), to see the tables travel from kernels_src/ to the loaded code."""
    src = tmp_path_factory.mktemp("src")
    for name in ("build.toml", "scripts", "torch-ext", "kernels_src"):
        p = ROOT / name
        if p.is_dir():
            shutil.copytree(p, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif p.exists():
            shutil.copy(p, src / name)
    (src / "kernels_src").mkdir(exist_ok=True)
    (src / "kernels_src" / "launch_tables.json").write_text(json.dumps(SENTINEL_TABLES) + "\n")
    build_bundle(src / "build", root=src)
    return src


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------
def test_fsa_is_the_built_bundle(fsa, bundle_root):
    variant_dir = bundle_root / "build" / variant_for_this_machine()
    assert Path(fsa.__file__) == variant_dir / "__init__.py"
    assert fsa.__name__ == metadata_id(variant_dir) == ops_namespace(variant_dir)
    for name in fsa.__all__:
        assert hasattr(fsa, name), name


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attention_through_get_kernel(fsa, dtype, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # CPU tensors: the reference path
    t = make_inputs(dtype)
    check_attention(fsa.flash_dense_attn_func(t["q"], t["k"], t["v"], is_causal=True), t)


@pytest.fixture(scope="module")
def hub_cache(sentinel_bundle, tmp_path_factory) -> Path:
    """The sentinel build as huggingface_hub caches a download of branch v<N>: refs/v<N> holds
    the commit, snapshots/<commit>/ files are symlinks into blobs/. Returns the cache dir."""
    cache = tmp_path_factory.mktemp("hub")
    org, name = REPO_ID.split("/")
    repo_dir = cache / f"kernels--{org}--{name}"
    sha = hashlib.sha1(b"flash-sparse-attn test snapshot").hexdigest()
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / f"v{VERSION}").write_text(sha)
    (repo_dir / "blobs").mkdir()
    for p in sorted((sentinel_bundle / "build").rglob("*")):
        if p.is_file():
            blob = repo_dir / "blobs" / hashlib.sha256(p.read_bytes()).hexdigest()
            blob.write_bytes(p.read_bytes())
            link = repo_dir / "snapshots" / sha / "build" / p.relative_to(sentinel_bundle / "build")
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
    return cache


def snapshot_variant(hub_cache: Path) -> Path:
    (snapshot,) = hub_cache.glob("kernels--*/snapshots/*")
    return snapshot / "build" / variant_for_this_machine()


def test_get_kernel_from_offline_hub_cache(hub_cache, tmp_path):
    """HF_HUB_OFFLINE=1: get_kernel resolves v<N> and the files from the cache alone."""
    env = clean_env(HF_HUB_CACHE=str(hub_cache), HF_HOME=str(tmp_path / "hf_home"),
                    HF_HUB_OFFLINE="1")
    result = load_in_subprocess(tmp_path, env, mode="hub", repo_id=REPO_ID, version=VERSION)
    variant_dir = snapshot_variant(hub_cache)
    assert Path(result["file"]) == variant_dir / "__init__.py"
    assert result["package"] == metadata_id(variant_dir)
    assert result["tables"] == SENTINEL_TABLES  # found next to __init__.py, through symlinks
    meta = Metadata.read_from_file(variant_dir / "metadata.json")
    meta.digest.validate(Digest.hash_variant(DigestAlgorithm.SHA256, variant_dir))


def test_get_local_kernel(sentinel_bundle, tmp_path):
    result = load_in_subprocess(tmp_path, clean_env(HF_HUB_OFFLINE="1"), mode="local",
                                path=str(sentinel_bundle))
    variant_dir = sentinel_bundle / "build" / variant_for_this_machine()
    assert Path(result["file"]) == variant_dir / "__init__.py"
    assert result["tables"] == SENTINEL_TABLES


def test_compat_entry_point(hub_cache, tmp_path):
    """`<variant>/flash_sparse_attn/__init__.py`, imported by path as older loaders do, loads the
    variant's package under the build's op namespace (here from the symlinked Hub cache)."""
    variant_dir = snapshot_variant(hub_cache)
    result = load_in_subprocess(tmp_path, clean_env(), mode="compat", path=str(variant_dir))
    assert result["package"] == metadata_id(variant_dir)
    assert Path(result["file"]) == variant_dir / "__init__.py"
    assert result["tables"] == SENTINEL_TABLES


def test_pip_wheel(bundle_root, tmp_path):
    """`pip install .` ships the same package as `flash_sparse_attn`, with an `_ops.py` of
    backend "pip" from the same generator and revision, and the launch tables."""
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
         "--no-cache-dir", "-q", "-w", str(tmp_path / "dist")],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = (tmp_path / "dist").glob("flash_sparse_attn-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        z.extractall(site)
    shipped = {n[len(PACKAGE) + 1:] for n in names if n.startswith(PACKAGE + "/")}
    assert shipped == set(package_sources()) | {"_ops.py", "launch_tables.json"}
    assert (site / PACKAGE / "launch_tables.json").read_bytes() == expected_tables()
    rev = metadata_id(bundle_root / "build" / "torch-cpu").rsplit("_", 1)[1]
    assert ops_namespace(site / PACKAGE) == f"_{PACKAGE}_pip_{rev}"
    result = load_in_subprocess(tmp_path, clean_env(), mode="pip", path=str(site))
    assert result["package"] == PACKAGE
    assert result["tables"] == json.loads(expected_tables())


# ---------------------------------------------------------------------------------------------
# layout, metadata, digest, determinism
# ---------------------------------------------------------------------------------------------
def test_variants_and_layout(bundle_root):
    build = bundle_root / "build"
    assert sorted(p.name for p in build.iterdir()) == sorted(f"torch-{b}" for b in BACKENDS)
    sources = package_sources()
    for backend in BACKENDS:
        files = tree(build / f"torch-{backend}")
        extra = {"_ops.py", "launch_tables.json", "metadata.json", f"{PACKAGE}/__init__.py"}
        assert set(files) == set(sources) | extra, backend
        for rel, data in sources.items():
            assert files[rel][0] == data, rel
        assert files["launch_tables.json"][0] == expected_tables()
        assert all(mode == 0o644 for _, mode in files.values())


@pytest.mark.parametrize("backend", BACKENDS)
def test_metadata_parses_with_kernels(bundle_root, backend):
    variant_dir = bundle_root / "build" / f"torch-{backend}"
    meta = Metadata.read_from_file(variant_dir / "metadata.json")
    general = BUILD_TOML["general"]
    assert str(meta.name) == KERNEL_NAME == general["name"]
    assert meta.name.python_name == PACKAGE
    assert meta.version == VERSION and isinstance(VERSION, int)
    assert meta.license == general["license"] == "BSD-3-Clause"
    assert meta.python_depends == []
    assert str(meta.backend.backend_type).lower().endswith(backend)
    noarch = BUILD_TOML["torch-noarch"]
    declared = {"cuda": noarch.get("cuda_capabilities"), "rocm": noarch.get("rocm_archs")}
    assert meta.backend.archs == declared.get(backend)
    assert re.fullmatch(rf"_{PACKAGE}_{backend}_[0-9a-f]{{10}}", meta.id)
    assert meta.id == ops_namespace(variant_dir)


@pytest.mark.parametrize("backend", BACKENDS)
def test_digest_is_what_kernels_computes(bundle_root, backend, tmp_path):
    variant_dir = bundle_root / "build" / f"torch-{backend}"
    meta = Metadata.read_from_file(variant_dir / "metadata.json")
    actual = Digest.hash_variant(DigestAlgorithm.SHA256, variant_dir)
    assert meta.digest is not None and meta.digest.algorithm == DigestAlgorithm.SHA256
    assert meta.digest.files == actual.files
    meta.digest.validate(actual)
    for rel, h in actual.files.items():
        expected = base64.b64encode(hashlib.sha256((variant_dir / rel).read_bytes()).digest())
        assert h == expected.decode()
    assert set(actual.files) == set(tree(variant_dir)) - {"metadata.json"}
    # and a changed file is caught
    copy = tmp_path / variant_dir.name
    shutil.copytree(variant_dir, copy)
    (copy / "ops.py").write_text((copy / "ops.py").read_text() + "\n# changed\n")
    with pytest.raises(DigestValidationError):
        meta.digest.validate(Digest.hash_variant(DigestAlgorithm.SHA256, copy))


def test_build_is_deterministic(bundle_root, tmp_path):
    again = build_bundle(tmp_path / "build")
    build_bundle(tmp_path / "build")  # over an existing build: same result, no leftovers
    first = {b: tree(bundle_root / "build" / f"torch-{b}") for b in BACKENDS}
    second = {b: tree(again / f"torch-{b}") for b in BACKENDS}
    assert first == second


def test_op_namespace_unique_per_backend_and_per_source(bundle_root, sentinel_bundle):
    ids = {b: metadata_id(bundle_root / "build" / f"torch-{b}") for b in BACKENDS}
    assert len(set(ids.values())) == len(BACKENDS)
    revs = {i.rsplit("_", 1)[1] for i in ids.values()}
    assert len(revs) == 1  # one source revision, one namespace per backend
    # different sources (here: other launch tables) give another namespace
    other = {b: metadata_id(sentinel_bundle / "build" / f"torch-{b}") for b in BACKENDS}
    assert not set(other.values()) & set(ids.values())
    tables = (sentinel_bundle / "build" / "torch-cpu" / "launch_tables.json").read_text()
    assert json.loads(tables) == SENTINEL_TABLES


# ---------------------------------------------------------------------------------------------
# package rules of the Hub (DESIGN.md): op namespaces and relative imports
# ---------------------------------------------------------------------------------------------
def package_modules():
    """(relative path, AST) of every Python file of the package but the developer `_ops.py`."""
    files = [p for p in sorted(PACKAGE_DIR.rglob("*.py"))
             if "__pycache__" not in p.parts and p.relative_to(PACKAGE_DIR).as_posix() != "_ops.py"]
    assert files
    return [(p.relative_to(PACKAGE_DIR).as_posix(), ast.parse(p.read_text())) for p in files]


# torch.library functions that take an op name first
REGISTRATIONS = {"custom_op", "triton_op", "define", "register_fake", "register_kernel",
                 "register_autograd", "register_autocast", "register_torch_dispatch",
                 "register_vmap", "impl", "impl_abstract"}


def _name(node):
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Name):
        return node.id
    return None


def _is_torch_library(node) -> bool:
    """`torch.library` or a plain `library` (as in `from torch import library`)."""
    return (isinstance(node, ast.Attribute) and node.attr == "library"
            and isinstance(node.value, ast.Name) and node.value.id == "torch") or (
        isinstance(node, ast.Name) and node.id == "library")


def library_registrations(mod):
    """Calls of torch.library's registration functions, as `torch.library.f(...)`,
    `library.f(...)` or a bare `f(...)` imported from torch.library; methods of an op object
    (`op.register_fake(fn)`) name no op and are not included."""
    imported = {a.asname or a.name for node in ast.walk(mod)
                if isinstance(node, ast.ImportFrom) and node.module == "torch.library"
                for a in node.names}
    for node in ast.walk(mod):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Attribute) and f.attr in REGISTRATIONS and _is_torch_library(f.value):
            yield f.attr, node
        elif isinstance(f, ast.Name) and f.id in REGISTRATIONS and f.id in imported:
            yield f.id, node


def test_every_op_is_declared_with_the_namespace_prefix():
    declared = []
    for rel, mod in package_modules():
        for node in ast.walk(mod):
            if isinstance(node, ast.Call) and _name(node.func) == "Library":
                raise AssertionError(f"{rel}:{node.lineno}: torch.library.Library fixes its own "
                                     "namespace; declare ops with custom_op/triton_op")
        for fname, node in library_registrations(mod):
            first = node.args[0] if node.args else (
                node.keywords[0].value if node.keywords else None)
            ok = isinstance(first, ast.Call) and _name(first.func) == "add_op_namespace_prefix"
            assert ok, (f"{rel}:{node.lineno}: {fname}(...) must name its op with "
                        f"add_op_namespace_prefix(...), got {first and ast.unparse(first)}")
            if fname in ("custom_op", "triton_op"):
                declared.append(ast.literal_eval(first.args[0]))
    assert declared, "no custom_op / triton_op found in the package"
    assert len(declared) == len(set(declared)), declared
    ops_text = (PACKAGE_DIR / "ops.py").read_text()
    for name in declared:
        assert f'add_op_namespace_prefix("{name}")' in ops_text


def test_package_imports_are_relative():
    for rel, mod in package_modules():
        for node in ast.walk(mod):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    assert alias.name.split(".")[0] != PACKAGE, f"{rel}:{node.lineno}"
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                assert (node.module or "").split(".")[0] != PACKAGE, f"{rel}:{node.lineno}"
            elif (isinstance(node, ast.Call) and _name(node.func) in ("import_module", "__import__")
                  and node.args and isinstance(node.args[0], ast.Constant)):
                assert not str(node.args[0].value).startswith(PACKAGE), f"{rel}:{node.lineno}"
        # `_ops` is imported plainly: no try/except fallback around it (the Hub's checker).
        for node in ast.walk(mod):
            if isinstance(node, ast.Try):
                for inner in ast.walk(node):
                    if isinstance(inner, ast.ImportFrom) and (inner.module or "").endswith("_ops"):
                        raise AssertionError(f"{rel}:{inner.lineno}: _ops import inside try")
