"""scripts/upload.py (publishing to the Kernel Hub), scripts/card.py and the Hub benchmark,
all offline.

Each test publishes from a temporary git repository holding a committed copy of the sources
(build.toml, README.md, torch-ext/, kernels_src/, tests/benchmark_hub.py), so the dirty-tree
check sees a tree the test controls. The Hub is either absent (`--dry-run` with
HF_HUB_OFFLINE=1: planned as a new repository) or `RecordingApi`, a stand-in with HfApi's
method names that records every call and keeps the files of each branch in memory; it is passed
to `upload.main(api=...)`. Downloads are served by laying the recorded files out as a Hub
cache, and the verify step loads them in a fresh process with `kernels.get_kernel(version=1)`
and HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import REPO_ID, ROOT, VERSION

sys.path.insert(0, str(ROOT / "scripts"))
import build as buildmod  # noqa: E402
import card as cardmod  # noqa: E402
import upload  # noqa: E402

SECRET = "hf_TESTSECRETdoNotPrint0123456789"
BRANCH = f"v{VERSION}"
COPIED = ["build.toml", "README.md", ".gitignore", "torch-ext", "kernels_src",
          "tests/benchmark_hub.py"]


def _ignore(_dir, names):
    return [n for n in names if n in ("__pycache__", "_ops.py") or n.endswith(".pyc")]


def git(root: Path, *args) -> str:
    proc = subprocess.run(["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t",
                           *args], capture_output=True, text=True, check=True)
    return proc.stdout


@pytest.fixture
def repo(tmp_path) -> Path:
    """A clean git repository with a committed copy of the sources."""
    root = tmp_path / "repo"
    for rel in COPIED:
        src, dst = ROOT / rel, root / rel
        if src.is_dir():
            shutil.copytree(src, dst, ignore=_ignore)
        elif src.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    git(root, "init", "-q", "-b", "main")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "sources")
    assert git(root, "status", "--porcelain") == ""
    return root


@pytest.fixture
def token(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    return SECRET


def built(root: Path) -> dict[str, Path]:
    """build/ of `root` as scripts/build.py writes it, plus the card."""
    out = buildmod.build(root / "build", root=root, quiet=True)
    cardmod.write_card(root, root / "build" / "CARD.md")
    return {f"torch-{b}": d for b, d in out.items()}


def expected_adds(root: Path, variants: dict[str, Path]) -> dict[str, bytes]:
    files = {}
    for name, vdir in variants.items():
        for p in vdir.rglob("*"):
            if p.is_file() and "__pycache__" not in p.parts:
                files[f"build/{name}/{p.relative_to(vdir).as_posix()}"] = p.read_bytes()
    files["benchmarks/benchmark.py"] = (root / "tests" / "benchmark_hub.py").read_bytes()
    return files


class RecordingApi:
    """HfApi's methods used by upload.py, recording each call; branches hold {path: bytes}.
    `branches=None`: the repository does not exist."""

    def __init__(self, branches=None):
        self.branches = branches
        self.calls: list[tuple] = []
        self.commits: list[dict] = []

    def _record(self, name, repo_id, repo_type, **kw):
        self.calls.append((name, repo_id, repo_type, kw))
        assert repo_id == REPO_ID and repo_type == "kernel", (name, repo_id, repo_type)

    def repo_exists(self, repo_id, *, repo_type=None, token=None):
        self._record("repo_exists", repo_id, repo_type)
        return self.branches is not None

    def list_repo_refs(self, repo_id, *, repo_type=None, token=None):
        self._record("list_repo_refs", repo_id, repo_type)
        return SimpleNamespace(branches=[SimpleNamespace(name=b) for b in self.branches])

    def list_repo_files(self, repo_id, *, repo_type=None, revision=None, token=None):
        self._record("list_repo_files", repo_id, repo_type, revision=revision)
        return sorted(self.branches[revision])

    def create_repo(self, repo_id, *, repo_type=None, exist_ok=False, token=None, private=None):
        self._record("create_repo", repo_id, repo_type, exist_ok=exist_ok)
        self.branches = {"main": {".gitattributes": b"*.so filter=lfs\n"}}

    def create_branch(self, repo_id, *, branch, revision=None, repo_type=None, token=None,
                      exist_ok=False):
        self._record("create_branch", repo_id, repo_type, branch=branch, revision=revision)
        assert branch not in self.branches
        self.branches[branch] = dict(self.branches[revision or "main"])

    def create_commit(self, repo_id, operations, *, commit_message, repo_type=None,
                      revision=None, token=None, **kw):
        self._record("create_commit", repo_id, repo_type, revision=revision)
        files = self.branches[revision]
        adds, deletes = {}, []
        for op in operations:
            if type(op).__name__ == "CommitOperationAdd":
                with op.as_file() as f:
                    adds[op.path_in_repo] = f.read()
            else:
                assert type(op).__name__ == "CommitOperationDelete", op
                deletes.append(op.path_in_repo)
        for p in deletes:
            del files[p]
        files.update(adds)
        oid = hashlib.sha1(json.dumps(sorted(files)).encode() + commit_message.encode()).hexdigest()
        self.commits.append(dict(revision=revision, adds=adds, deletes=deletes,
                                 message=commit_message, oid=oid))
        return SimpleNamespace(commit_url=f"https://huggingface.co/kernels/{repo_id}/commit/{oid}",
                               oid=oid)

    def snapshot_download(self, repo_id, *, repo_type=None, revision=None, cache_dir=None,
                          **kw):
        """What was pushed to `revision`, laid out as huggingface_hub caches it."""
        self._record("snapshot_download", repo_id, repo_type, revision=revision)
        with tempfile.TemporaryDirectory() as tmp:
            files = {}
            for path, data in self.branches[revision].items():
                f = Path(tmp) / path
                f.parent.mkdir(parents=True, exist_ok=True)
                f.write_bytes(data)
                files[path] = f
            return str(upload.layout_hub_cache(files, repo_id, revision, Path(cache_dir)))

    def writes(self):
        return [c for c in self.calls if c[0] in ("create_repo", "create_branch", "create_commit")]


def run_main(argv, api):
    out = io.StringIO()
    rc = upload.main(argv, api=api, stream=out)
    return rc, out.getvalue()


# ---------------------------------------------------------------------------------------------
# dry run
# ---------------------------------------------------------------------------------------------
def test_dry_run_prints_the_exact_operations_for_a_fresh_version(repo, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_KERNELS", "TRITON_INTERPRET")}
    env.update(HF_HUB_OFFLINE="1", HF_TOKEN=SECRET, HF_HOME=str(tmp_path / "hf-home"))
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "upload.py"), "--dry-run",
                           "--repo-root", str(repo)], env=env, capture_output=True, text=True,
                          timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert SECRET not in out
    assert "token: from the HF_TOKEN environment variable (not shown)" in out
    assert f"create_repo(repo_id='{REPO_ID}', repo_type='kernel', exist_ok=True)" in out
    assert f"create_branch(repo_id='{REPO_ID}', branch='{BRANCH}', repo_type='kernel')" in out
    assert f"revision='{BRANCH}'" in out and "revision='main'" in out
    assert "dry run: nothing was sent" in out and "delete " not in out
    # exactly the files of a fresh build, and the benchmark, go to the version branch
    planned = {line.split()[1] for line in out.splitlines() if line.strip().startswith("add ")}
    reference = tmp_path / "reference"
    shutil.copytree(repo, reference, ignore=shutil.ignore_patterns(".git"))
    want = set(expected_adds(reference, built(reference))) | {"README.md"}
    assert planned == want
    assert not (repo / "build").exists()  # a dry run leaves build/ alone
    assert git(repo, "status", "--porcelain") == ""


# ---------------------------------------------------------------------------------------------
# publishing against the recording stand-in
# ---------------------------------------------------------------------------------------------
def test_upload_existing_branch_replaces_stale_files(repo, token):
    stale = {
        "build/torch-cpu/old_module.py": b"stale",           # a file the variant no longer has
        "build/torch-metal/metadata.json": b"{}",            # a variant no longer built
        "benchmarks/old_benchmark.py": b"stale",
        "README.md": b"branch readme",                       # not managed: kept
        "build/torch-cpu/__init__.py": b"old init",          # replaced by the add
    }
    api = RecordingApi({"main": {"README.md": b"old card"}, BRANCH: dict(stale)})
    rc, out = run_main(["--repo-root", str(repo), "--no-verify"], api)
    assert rc == 0, out
    assert SECRET not in out
    assert [c[0] for c in api.writes()] == ["create_commit", "create_commit"]  # repo, branch exist
    version_commit, card_commit = api.commits
    assert version_commit["revision"] == BRANCH and card_commit["revision"] == "main"
    variants = {name: repo / "build" / name for name in ("torch-cpu", "torch-cuda", "torch-rocm",
                                                          "torch-xpu")}
    assert version_commit["adds"] == expected_adds(repo, variants)
    assert sorted(version_commit["deletes"]) == ["benchmarks/old_benchmark.py",
                                                 "build/torch-cpu/old_module.py",
                                                 "build/torch-metal/metadata.json"]
    assert api.branches[BRANCH]["README.md"] == b"branch readme"
    assert card_commit["adds"] == {"README.md": (repo / "build" / "CARD.md").read_bytes()}
    assert card_commit["deletes"] == []
    assert (repo / "build" / "CARD.md").read_text() == cardmod.make_card(repo)
    assert f"https://huggingface.co/kernels/{REPO_ID}/commit/{version_commit['oid']}" in out


def test_upload_new_branch_deletes_inherited_variants_and_verifies(repo, token):
    """A new version branch starts from main; build/ files it inherits from main are stale.
    After the push, verify downloads the branch (from the stand-in) into a fresh Hub cache and
    loads it with get_kernel(version=1) offline."""
    api = RecordingApi({"main": {"README.md": b"card", "build/torch-cuda/old.py": b"legacy"}})
    rc, out = run_main(["--repo-root", str(repo)], api)
    assert rc == 0, out
    assert SECRET not in out
    names = [c[0] for c in api.writes()]
    assert names == ["create_branch", "create_commit", "create_commit"]
    assert api.writes()[0][3] == {"branch": BRANCH, "revision": None}
    assert api.commits[0]["deletes"] == ["build/torch-cuda/old.py"]
    assert set(api.branches[BRANCH]) == set(expected_adds(repo, {
        n: repo / "build" / n for n in ("torch-cpu", "torch-cuda", "torch-rocm", "torch-xpu")
    })) | {"README.md"}
    assert ("snapshot_download", REPO_ID, "kernel", {"revision": BRANCH}) in api.calls
    assert f"verify: kernels.get_kernel('{REPO_ID}', version={VERSION}) loaded torch-cpu" in out
    assert "gated ran" in out


def test_upload_creates_the_repository(repo, token):
    api = RecordingApi(None)
    rc, out = run_main(["--repo-root", str(repo), "--no-verify"], api)
    assert rc == 0, out
    assert [(c[0], c[3]) for c in api.writes()] == [
        ("create_repo", {"exist_ok": True}),
        ("create_branch", {"branch": BRANCH, "revision": None}),
        ("create_commit", {"revision": BRANCH}),
        ("create_commit", {"revision": "main"}),
    ]
    assert api.commits[0]["deletes"] == []
    assert "benchmarks/benchmark.py" in api.branches[BRANCH]


# ---------------------------------------------------------------------------------------------
# refusals: nothing is written
# ---------------------------------------------------------------------------------------------
def refused(repo, argv, needle):
    api = RecordingApi({"main": {}})
    rc, out = run_main(["--repo-root", str(repo), "--no-verify", *argv], api)
    assert rc == 2 and "refused:" in out and needle in out, out
    assert api.writes() == []
    assert SECRET not in out
    return out


def test_refuses_a_dirty_tree(repo, token):
    (repo / "torch-ext" / "flash_sparse_attn" / "scratch.py").write_text("x = 1\n")
    refused(repo, [], "is dirty")
    refused(repo, ["--dry-run"], "is dirty")
    git(repo, "add", "-A")  # staged but not committed: still dirty
    refused(repo, [], "is dirty")


def test_refuses_without_a_token(repo, tmp_path):
    """No HF_TOKEN and no huggingface_hub login (an empty HF_HOME, read at import: hence a
    fresh process): a real upload refuses before building or calling the Hub."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HF_TOKEN_PATH")}
    env.update(HF_HOME=str(tmp_path / "hf-home"), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "upload.py"),
                           "--repo-root", str(repo)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "refused: token: none found (set HF_TOKEN or run `hf auth login`)" in proc.stdout
    assert not (repo / "build").exists()


def test_refuses_a_stale_digest(repo, token):
    variants = built(repo)
    with open(variants["torch-cuda"] / "interface.py", "a") as f:
        f.write("# edited after the build\n")
    out = refused(repo, ["--no-build"], "stale digest")
    assert "torch-cuda" in out


def test_refuses_a_missing_digest(repo, token):
    variants = built(repo)
    meta_path = variants["torch-rocm"] / "metadata.json"
    meta = json.loads(meta_path.read_text())
    del meta["digest"]
    meta_path.write_text(json.dumps(meta, indent=2))
    refused(repo, ["--no-build"], "missing digest")


def test_refuses_mixed_versions(repo, token):
    variants = built(repo)
    meta_path = variants["torch-xpu"] / "metadata.json"  # not part of the digest
    meta = json.loads(meta_path.read_text())
    meta["version"] = VERSION + 1
    meta_path.write_text(json.dumps(meta, indent=2))
    refused(repo, ["--no-build"], "variants with different versions")


def test_refuses_a_stale_card(repo, token):
    built(repo)
    readme = repo / "README.md"
    readme.write_text(readme.read_text().replace("\n## API\n", "\n## API\n\nA new note.\n", 1))
    git(repo, "commit", "-q", "-am", "readme")
    refused(repo, ["--no-build"], "CARD.md is out of date")


def test_refuses_a_build_older_than_the_sources(repo, token):
    built(repo)
    with open(repo / "torch-ext" / "flash_sparse_attn" / "layers.py", "a") as f:
        f.write("# a committed change after the build\n")
    git(repo, "commit", "-q", "-am", "change")
    refused(repo, ["--no-build"], "out of date with the sources")


def test_refuses_missing_and_unknown_variants(repo, token):
    variants = built(repo)
    shutil.rmtree(variants["torch-xpu"])
    shutil.copytree(variants["torch-cpu"], repo / "build" / "torch-metal")
    out = refused(repo, ["--no-build"], "missing variants ['torch-xpu']")
    assert "['torch-metal'] are not in build.toml" in out


# ---------------------------------------------------------------------------------------------
# verify from a Hub cache, offline
# ---------------------------------------------------------------------------------------------
def test_verify_offline_from_the_pushed_layout(repo, tmp_path):
    built(repo)
    cache = tmp_path / "hub-cache"
    env = {k: v for k, v in os.environ.items()
           if k not in ("LOCAL_KERNELS", "TRITON_INTERPRET", "HF_TOKEN")}
    env.update(HF_HUB_OFFLINE="1")
    cmd = [sys.executable, str(ROOT / "scripts" / "upload.py"), "--repo-root", str(repo),
           "--verify", "--cache", str(cache)]
    proc = subprocess.run(cmd + ["--from-build"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "laid out the" in proc.stdout and "loaded torch-cpu from" in proc.stdout
    repo_dir = cache / f"kernels--{REPO_ID.replace('/', '--')}"
    commit = (repo_dir / "refs" / BRANCH).read_text()
    meta = repo_dir / "snapshots" / commit / "build" / "torch-cpu" / "metadata.json"
    assert meta.is_symlink() and meta.resolve().parent == (repo_dir / "blobs").resolve()
    assert (repo_dir / "snapshots" / commit / "benchmarks" / "benchmark.py").is_file()
    # the cache now holds v1: a second verify reads it as it is
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"reading {BRANCH} from the cache" in proc.stdout
    assert "loaded torch-cpu from" in proc.stdout


# ---------------------------------------------------------------------------------------------
# the Hub benchmark and the card
# ---------------------------------------------------------------------------------------------
def test_kernels_benchmark_runs_the_uploaded_benchmark(repo, tmp_path):
    """`kernels benchmark <dir>` on a directory laid out like the version branch."""
    variants = built(repo)
    branch = tmp_path / "branch"
    for path, local in upload.plan_files(variants, repo).items():
        (branch / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(local, branch / path)
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_KERNELS", "TRITON_INTERPRET")}
    result = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, "-c", "from kernels.cli import main; main()", "benchmark",
         str(branch), "--iterations", "2", "--warmup", "1", "--output", str(result)],
        env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    payload = json.loads(result.read_text())
    workloads = {r["workload"]: r.get("verified") for r in payload["results"]}
    assert workloads == {
        "Decode.kvcache": True, "Dense.causal": True, "Dense.flash_attn_func": True,
        "Dense.varlen": True, "Gated.causal": True, "Sparse.llm_like": True,
    }


def test_card_is_generated_from_the_readme(repo):
    text = cardmod.make_card(repo)
    assert text.startswith("---\nlicense: bsd-3-clause\nlibrary_name: kernels\n")
    readme = (repo / "README.md").read_text()
    intro = cardmod.first_paragraph(cardmod.split_sections(readme)[0])
    assert intro and intro in text
    assert f'get_kernel("{REPO_ID}", version={VERSION}' in text
    for heading in ("## API", "## Supported GPUs", "## Benchmarks"):
        assert heading in text
    assert "| CUDA `torch-cuda` | sm 9.0 | H100, H200, GH200 (Hopper) |" in text
    assert "| ROCm `torch-rocm` | gfx942 |" in text
    # the API section is copied as it is
    api = dict(cardmod.split_sections(readme)[1])
    api_body = next(b for h, b in api.items() if h == "API")
    assert api_body in text


def test_card_refuses_a_readme_without_its_sections(repo):
    readme = repo / "README.md"
    readme.write_text("# flash-sparse-attn\n\nIntro.\n\n## API\n\nx\n")
    with pytest.raises(cardmod.CardError, match="get_kernel.*Benchmarks"):
        cardmod.make_card(repo)
