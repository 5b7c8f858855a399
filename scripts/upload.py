#!/usr/bin/env python3
"""Publish a version of flash-sparse-attn to the Hugging Face Kernel Hub.

    python scripts/upload.py --dry-run   # check, build, print the exact Hub operations; send nothing
    python scripts/upload.py             # check, build, push, then download and load what was pushed

What a publish does, for `version = N` and `[general.hub] repo-id` of build.toml:
1. refuses, before touching anything, when: the git tree is dirty (`git status --porcelain`
   prints anything, untracked files included); a variant of build.toml's backends is missing
   from the build, or the build holds a variant that build.toml does not list; a variant's
   `metadata.json` has no digest, or the digest does not match its files (checked with
   `kernels`' own hasher); variants carry different versions, or a version other than N;
   (with `--no-build`) `build/` differs from what the sources build to now; the card or the Hub
   benchmark is missing; (not a dry run) there is no token;
2. builds every variant into `build/` with scripts/build.py and writes the card `build/CARD.md`
   with scripts/card.py (`--no-build` takes `build/` as it is);
3. creates the kernel-type repository if it does not exist, and the branch `vN` (from `main`)
   if it does not exist;
4. one commit on `vN`: adds every file of `build/torch-<backend>/` (bytecode excluded) and
   `benchmarks/benchmark.py` (= tests/benchmark_hub.py, for `kernels benchmark`), and deletes
   every other file under `build/` or `benchmarks/` on that branch (stale variants, or files a
   variant no longer has);
5. one commit on `main`: the card as `README.md` (the repository's page);
6. prints both commit URLs; then (unless `--no-verify`) downloads `vN` into a fresh cache and
   loads it offline with `kernels.get_kernel(repo_id, version=N)` for a smoke test.

The token comes only from the environment (HF_TOKEN) or the huggingface_hub login
(`hf auth login`); it is never printed (the script prints only where it came from).

    python scripts/upload.py --verify [--cache DIR]   # download vN (into DIR) and smoke-test it
    python scripts/upload.py --verify --cache DIR     # DIR already holds vN: read it, offline
    python scripts/upload.py --verify --from-build --cache DIR
        # lay out the files a push would send, as huggingface_hub caches them
        # (kernels--<org>--<name>/refs/vN, snapshots/<sha>/..., blobs/), and smoke-test them
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS))

import build as buildmod  # noqa: E402  (scripts/build.py)
import card as cardmod  # noqa: E402  (scripts/card.py)

REPO_TYPE = "kernel"
BENCHMARK_SRC = Path("tests") / "benchmark_hub.py"
BENCHMARK_DST = "benchmarks/benchmark.py"
CARD_DST = "README.md"
MANAGED_PREFIXES = ("build/", "benchmarks/")


class Refusal(Exception):
    """A reason not to publish; all of them are collected and printed together."""


# ---------------------------------------------------------------------------------------------
# output that never shows the token
# ---------------------------------------------------------------------------------------------
class Printer:
    def __init__(self, stream=None):
        self.stream = stream
        self.secrets: list[str] = []

    def __call__(self, *parts) -> None:
        text = " ".join(str(p) for p in parts)
        for secret in self.secrets:
            if secret:
                text = text.replace(secret, "<token>")
        print(text, file=self.stream or sys.stdout, flush=True)


def token_source() -> tuple[Optional[str], Optional[str]]:
    """(where the token comes from, the token) without printing it: HF_TOKEN (or the older
    HUGGING_FACE_HUB_TOKEN) in the environment, else huggingface_hub's login."""
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        if os.environ.get(var, "").strip():
            return f"the {var} environment variable", os.environ[var].strip()
    try:
        from huggingface_hub import get_token

        token = get_token()
    except Exception:  # an OIDC exchange that failed, an unreadable token file
        token = None
    return ("the huggingface_hub login", token) if token else (None, None)


# ---------------------------------------------------------------------------------------------
# local checks
# ---------------------------------------------------------------------------------------------
def git_state(root: Path) -> tuple[str, list[str]]:
    """(HEAD commit, lines of `git status --porcelain`) of the repository at `root`."""
    def git(*args):
        proc = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True)
        if proc.returncode != 0:
            raise Refusal(f"git {' '.join(args)} failed in {root}: {proc.stderr.strip()}")
        return proc.stdout

    head = git("rev-parse", "HEAD").strip()
    dirty = [line for line in git("status", "--porcelain").splitlines() if line.strip()]
    return head, dirty


def _skipped(rel: str) -> bool:
    parts = rel.split("/")
    return "__pycache__" in parts or rel.endswith(".pyc")


def variant_files(variant_dir: Path) -> list[str]:
    """Files of a variant that a push sends (bytecode excluded), sorted, relative."""
    return sorted(p.relative_to(variant_dir).as_posix() for p in variant_dir.rglob("*")
                  if p.is_file() and not _skipped(p.relative_to(variant_dir).as_posix()))


def check_variant(variant_dir: Path) -> int:
    """Raise Refusal unless metadata.json has a digest that matches the files (kernels'
    hasher); return the variant's version."""
    from kernels._rust import Digest, DigestValidationError, Metadata

    meta_path = variant_dir / "metadata.json"
    if not meta_path.is_file():
        raise Refusal(f"{variant_dir}: no metadata.json")
    try:
        meta = Metadata.read_from_file(meta_path)
    except Exception as e:
        raise Refusal(f"{meta_path}: unreadable ({e})")
    if meta.digest is None:
        raise Refusal(f"{meta_path}: missing digest (rebuild with scripts/build.py)")
    current = Digest.hash_variant(meta.digest.algorithm, variant_dir)
    try:
        meta.digest.validate(current)
    except DigestValidationError as e:
        problems = "; ".join(str(v) for v in e.violations) or str(e)
        raise Refusal(f"{variant_dir.name}: stale digest, the files no longer match "
                      f"metadata.json ({problems}); rebuild with scripts/build.py")
    extra = sorted(set(variant_files(variant_dir)) - set(current.files) - {"metadata.json"})
    if extra:
        raise Refusal(f"{variant_dir.name}: files outside the digest: {extra}")
    return int(meta.version)


def check_build(build_dir: Path, cfg: dict) -> dict[str, Path]:
    """{variant name: directory} of a complete, consistent build; Refusal otherwise."""
    problems: list[str] = []
    present = {p.name: p for p in sorted(build_dir.glob("torch-*")) if p.is_dir()} \
        if build_dir.is_dir() else {}
    wanted = [f"torch-{b}" for b in cfg["backends"]]
    missing = [v for v in wanted if v not in present]
    unknown = [v for v in present if v not in wanted]
    if missing:
        problems.append(f"{build_dir}: missing variants {missing} (build.toml backends "
                        f"{cfg['backends']})")
    if unknown:
        problems.append(f"{build_dir}: variants {unknown} are not in build.toml's backends; "
                        "remove them")
    versions: dict[str, int] = {}
    for name in wanted:
        if name in present:
            try:
                versions[name] = check_variant(present[name])
            except Refusal as e:
                problems.append(str(e))
    if len(set(versions.values())) > 1:
        problems.append(f"variants with different versions: {versions}")
    elif versions and set(versions.values()) != {cfg["version"]}:
        problems.append(f"variants have version {sorted(set(versions.values()))}, build.toml "
                        f"says {cfg['version']}")
    if problems:
        raise Refusal("\n".join(problems))
    return {name: present[name] for name in wanted}


def check_build_matches_sources(variants: dict[str, Path], root: Path) -> None:
    """`--no-build`: the build must be what the sources build to now."""
    with tempfile.TemporaryDirectory(prefix="fsa-upload-") as tmp:
        fresh = buildmod.build(Path(tmp), [n.removeprefix("torch-") for n in variants],
                               root=root, quiet=True)
        stale = []
        for backend, fresh_dir in fresh.items():
            name = f"torch-{backend}"
            if buildmod.digest_files(fresh_dir) != buildmod.digest_files(variants[name]) or \
                    (fresh_dir / "metadata.json").read_bytes() != \
                    (variants[name] / "metadata.json").read_bytes():
                stale.append(name)
    if stale:
        raise Refusal(f"build/ is out of date with the sources ({', '.join(stale)}); run "
                      "without --no-build")


# ---------------------------------------------------------------------------------------------
# the plan
# ---------------------------------------------------------------------------------------------
@dataclass
class Plan:
    repo_id: str
    version: int
    branch: str
    source_rev: str
    adds: dict[str, Path]             # path in repo -> local file, on the version branch
    card: Path                        # -> README.md on main
    deletes: list[str] = field(default_factory=list)
    repo_exists: Optional[bool] = None   # None: unknown (dry run without the Hub)
    branch_exists: Optional[bool] = None
    remote_note: str = ""

    @property
    def url(self) -> str:
        return f"https://huggingface.co/kernels/{self.repo_id}"

    def commit_message(self) -> str:
        variants = sorted({p.split("/")[1] for p in self.adds if p.startswith("build/")})
        return (f"flash-sparse-attn v{self.version}: {', '.join(variants)} + "
                f"{BENCHMARK_DST} (source {self.source_rev[:12]})")

    def card_message(self) -> str:
        return f"Card for v{self.version} (source {self.source_rev[:12]})"


def plan_files(variants: dict[str, Path], root: Path) -> dict[str, Path]:
    adds: dict[str, Path] = {}
    for name, vdir in variants.items():
        for rel in variant_files(vdir):
            adds[f"build/{name}/{rel}"] = vdir / rel
    bench = root / BENCHMARK_SRC
    if not bench.is_file():
        raise Refusal(f"{bench}: missing (uploaded as {BENCHMARK_DST} for `kernels benchmark`)")
    adds[BENCHMARK_DST] = bench
    return dict(sorted(adds.items()))


def read_remote(api, plan: Plan, dry_run: bool) -> None:
    """Fill in what exists on the Hub and which managed files are stale there. In a dry run a
    Hub that cannot be reached is planned for as a new repository, and says so."""
    try:
        plan.repo_exists = bool(api.repo_exists(plan.repo_id, repo_type=REPO_TYPE))
        remote_files: list[str] = []
        if plan.repo_exists:
            refs = api.list_repo_refs(plan.repo_id, repo_type=REPO_TYPE)
            branches = {b.name for b in refs.branches}
            plan.branch_exists = plan.branch in branches
            # a new branch starts from main, so main's files are what it would hold
            source = plan.branch if plan.branch_exists else "main"
            remote_files = list(api.list_repo_files(plan.repo_id, repo_type=REPO_TYPE,
                                                    revision=source))
        else:
            plan.branch_exists = False
    except Exception as e:
        if not dry_run:
            raise
        plan.repo_exists = plan.branch_exists = None
        plan.remote_note = (f"the Hub was not reachable ({type(e).__name__}); planned as for "
                            "a repository without this version")
        remote_files = []
    plan.deletes = sorted(f for f in remote_files
                          if f.startswith(MANAGED_PREFIXES) and f not in plan.adds)


def _describe(path: Path) -> str:
    data = path.read_bytes()
    return f"{len(data):>7} B  sha256 {hashlib.sha256(data).hexdigest()[:16]}"


def print_plan(plan: Plan, say: Printer) -> None:
    rid = plan.repo_id
    say(f"plan for {plan.url}:")
    step = 1
    if plan.remote_note:
        say(f"  note: {plan.remote_note}")
    if not plan.repo_exists:
        say(f"  {step}. create_repo(repo_id={rid!r}, repo_type={REPO_TYPE!r}, exist_ok=True)")
        step += 1
    if not plan.branch_exists:
        say(f"  {step}. create_branch(repo_id={rid!r}, branch={plan.branch!r}, "
            f"repo_type={REPO_TYPE!r})  # from main")
        step += 1
    say(f"  {step}. create_commit(repo_id={rid!r}, repo_type={REPO_TYPE!r}, "
        f"revision={plan.branch!r},")
    say(f"       commit_message={plan.commit_message()!r}) with "
        f"{len(plan.adds)} additions, {len(plan.deletes)} deletions:")
    for path_in_repo, local in plan.adds.items():
        say(f"       add    {path_in_repo:<58} {_describe(local)}")
    for path_in_repo in plan.deletes:
        say(f"       delete {path_in_repo}")
    step += 1
    say(f"  {step}. create_commit(repo_id={rid!r}, repo_type={REPO_TYPE!r}, revision='main',")
    say(f"       commit_message={plan.card_message()!r}) with 1 addition:")
    say(f"       add    {CARD_DST:<58} {_describe(plan.card)}  <- {plan.card.name}")


def execute(api, plan: Plan, say: Printer) -> tuple[str, str]:
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    if not plan.repo_exists:
        api.create_repo(plan.repo_id, repo_type=REPO_TYPE, exist_ok=True)
        say(f"created repository {plan.url}")
    if not plan.branch_exists:
        api.create_branch(plan.repo_id, branch=plan.branch, repo_type=REPO_TYPE)
        say(f"created branch {plan.branch}")
    ops = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(local))
           for p, local in plan.adds.items()]
    ops += [CommitOperationDelete(path_in_repo=p) for p in plan.deletes]
    info = api.create_commit(plan.repo_id, ops, commit_message=plan.commit_message(),
                             repo_type=REPO_TYPE, revision=plan.branch)
    say(f"pushed {plan.branch}: {info.commit_url}")
    card = api.create_commit(
        plan.repo_id, [CommitOperationAdd(path_in_repo=CARD_DST, path_or_fileobj=str(plan.card))],
        commit_message=plan.card_message(), repo_type=REPO_TYPE, revision="main")
    say(f"pushed the card to main: {card.commit_url}")
    return info.commit_url, card.commit_url


# ---------------------------------------------------------------------------------------------
# verify: a Hub cache, loaded offline with kernels.get_kernel
# ---------------------------------------------------------------------------------------------
def layout_hub_cache(files: dict[str, Path], repo_id: str, branch: str, cache: Path) -> Path:
    """Lay `files` ({path in repo: local file}) out as huggingface_hub caches a revision of a
    kernel repository: `kernels--<org>--<name>/blobs/<sha256>`, `snapshots/<commit>/<path>`
    (relative symlinks into blobs/) and `refs/<branch>` = commit. Returns the snapshot."""
    from huggingface_hub.file_download import repo_folder_name

    repo_dir = cache / repo_folder_name(repo_id=repo_id, repo_type=REPO_TYPE)
    digests = {p: hashlib.sha256(f.read_bytes()).hexdigest() for p, f in sorted(files.items())}
    commit = hashlib.sha1(json.dumps(digests, sort_keys=True).encode()).hexdigest()
    snapshot = repo_dir / "snapshots" / commit
    for path_in_repo, local in sorted(files.items()):
        blob = repo_dir / "blobs" / digests[path_in_repo]
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            shutil.copyfile(local, blob)
        link = snapshot / path_in_repo
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / branch).write_text(commit)
    return snapshot


def cached_snapshot(cache: Path, repo_id: str, branch: str) -> Optional[Path]:
    from huggingface_hub.file_download import repo_folder_name

    repo_dir = cache / repo_folder_name(repo_id=repo_id, repo_type=REPO_TYPE)
    ref = repo_dir / "refs" / branch
    if not ref.is_file():
        return None
    snapshot = repo_dir / "snapshots" / ref.read_text().strip()
    return snapshot if snapshot.is_dir() else None


SMOKE = r"""
import json, sys
from pathlib import Path
import torch
import kernels

repo_id, version, snapshot = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
fsa = kernels.get_kernel(repo_id, version=version, trust_remote_code=True)
origin = Path(fsa.__file__).parent
assert snapshot in origin.parents, f"loaded {origin}, not from {snapshot}"
# CPU: float64, the reference path's exact mode. (In float32 a CI machine once measured 6.8e-5
# against 1.1e-6 here for the same code: its float32 matmul was not IEEE-accurate.)
device, dtype = ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float64)
g = torch.Generator().manual_seed(0)
q = torch.randn(2, 77, 4, 64, generator=g).to(device, dtype)
k = torch.randn(2, 77, 2, 64, generator=g).to(device, dtype)
v = torch.randn(2, 77, 2, 64, generator=g).to(device, dtype)

def plain(q, k, v):
    k, v = (t.repeat_interleave(2, dim=2) for t in (k, v))
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
    s = s.masked_fill(torch.ones(77, 77, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s.to(torch.promote_types(s.dtype, torch.float32)), -1).to(q.dtype), v)

ref = plain(q.double(), k.double(), v.double())
err_torch = (plain(q, k, v).double() - ref).abs().max().item()
report = {"variant": origin.name, "device": device, "dtype": str(dtype), "err_torch": err_torch}
for name, out in (("flash_dense_attn_func", fsa.flash_dense_attn_func(q, k, v, is_causal=True)),
                  ("flash_attn_func", fsa.flash_attn_func(q, k, v, causal=True)),
                  ("flash_sparse_attn_func(t=0)",
                   fsa.flash_sparse_attn_func(q, k, v, is_causal=True, softmax_threshold=0.0))):
    err = (out.double() - ref).abs().max().item()
    report[name] = err
    assert out.shape == q.shape and err <= 2 * err_torch + 1e-6 * max(1.0, ref.abs().max().item()), (name, err, err_torch)
alpha = torch.randn(2, 4, 77, generator=g).to(device, dtype)
delta = torch.randn(2, 2, 77, generator=g).to(device, dtype)
gated = fsa.flash_gated_attn_func(q, k, v, alpha, delta, is_causal=True)
assert gated.shape == q.shape and torch.isfinite(gated).all()
for layer in ("FlashDenseAttention", "FlashSparseAttention", "FlashGatedAttention"):
    assert getattr(fsa.layers, layer).can_torch_compile is True, layer
report["layers"] = "FlashDenseAttention FlashSparseAttention FlashGatedAttention"
print("SMOKE " + json.dumps(report))
"""


def smoke_test(cache: Path, snapshot: Path, repo_id: str, version: int, say: Printer) -> dict:
    """Load version `version` from the Hub cache `cache` with HF_HUB_OFFLINE=1 in a fresh
    process (no LOCAL_KERNELS) and run attention against float64."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("LOCAL_KERNELS", "KERNELS_CACHE", "TRITON_INTERPRET")}
    env.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache))
    proc = subprocess.run([sys.executable, "-c", SMOKE, repo_id, str(version), str(snapshot)],
                          env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise Refusal(f"smoke test failed loading v{version} from {cache}:\n"
                      f"{proc.stdout}{proc.stderr}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("SMOKE ")][-1]
    report = json.loads(line[len("SMOKE "):])
    say(f"verify: kernels.get_kernel({repo_id!r}, version={version}) loaded "
        f"{report['variant']} from {snapshot} (HF_HUB_OFFLINE=1)")
    say(f"verify: {report['device']} {report['dtype']}: max |out - fp64| dense "
        f"{report['flash_dense_attn_func']:.2e}, flash_attn_func {report['flash_attn_func']:.2e}, "
        f"sparse(t=0) {report['flash_sparse_attn_func(t=0)']:.2e} "
        f"(PyTorch in {report['dtype'].replace('torch.', '')}: {report['err_torch']:.2e}); "
        f"gated ran; layers {report['layers']}")
    return report


def verify(api, args, cfg: dict, root: Path, build_dir: Path, say: Printer) -> dict:
    if args.cache is not None:
        return _verify(api, args, cfg, root, build_dir, args.cache.resolve(), say)
    cache = Path(tempfile.mkdtemp(prefix="fsa-verify-"))
    try:
        return _verify(api, args, cfg, root, build_dir, cache, say)
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def _verify(api, args, cfg: dict, root: Path, build_dir: Path, cache: Path, say: Printer) -> dict:
    repo_id, version = args.repo_id, cfg["version"]
    branch = f"v{version}"
    cache.mkdir(parents=True, exist_ok=True)
    if args.from_build:
        variants = check_build(build_dir, cfg)
        files = plan_files(variants, root)
        snapshot = layout_hub_cache(files, repo_id, branch, cache)
        say(f"verify: laid out the {len(files)} files a push of {branch} sends as a Hub cache "
            f"in {cache}")
    else:
        snapshot = cached_snapshot(cache, repo_id, branch)
        if snapshot is not None:
            say(f"verify: reading {branch} from the cache {cache}")
        else:
            path = api.snapshot_download(repo_id, repo_type=REPO_TYPE, revision=branch,
                                         cache_dir=str(cache))
            snapshot = Path(path)
            say(f"verify: downloaded {branch} of {repo_id} into {cache}")
    return smoke_test(cache, snapshot, repo_id, version, say)


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------
def parse_args(argv):
    ap = argparse.ArgumentParser(
        description="Publish flash-sparse-attn to the Hugging Face Kernel Hub "
                    "(see the module docstring).")
    ap.add_argument("--dry-run", action="store_true",
                    help="check and build, print the exact Hub operations, send nothing")
    ap.add_argument("--no-build", action="store_true",
                    help="take build/ as it is (it must match the sources) instead of building")
    ap.add_argument("--repo-root", type=Path, default=ROOT,
                    help="the git repository to publish from (default: this one)")
    ap.add_argument("--repo-id", default=None,
                    help="Hub repository (default: build.toml [general.hub] repo-id)")
    ap.add_argument("--verify", action="store_true",
                    help="only verify: load version N from a Hub cache offline and smoke-test it")
    ap.add_argument("--cache", type=Path, default=None,
                    help="Hub cache directory for --verify (default: a new temporary one)")
    ap.add_argument("--from-build", action="store_true",
                    help="with --verify: lay out what a push would send, instead of downloading")
    ap.add_argument("--no-verify", action="store_true",
                    help="after pushing, skip downloading and smoke-testing the pushed version")
    return ap.parse_args(argv)


def main(argv=None, api=None, stream=None) -> int:
    """`api`: an object with HfApi's methods (tests pass a recording stand-in); default HfApi()."""
    say = Printer(stream)
    args = parse_args(argv)
    root = args.repo_root.resolve()
    cfg = buildmod.read_config(root)
    args.repo_id = args.repo_id or cfg["repo_id"]
    build_dir = root / "build"
    source, token = token_source()
    say.secrets.append(token or "")
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    try:
        if args.verify:
            verify(api, args, cfg, root, build_dir, say)
            return 0
        return publish(api, args, cfg, root, build_dir, source, say)
    except Refusal as e:
        say(f"refused: {e}")
        return 2
    except Exception as e:  # a Hub error: reported through the printer, which hides the token
        say(f"failed: {type(e).__name__}: {e}")
        return 1


def publish(api, args, cfg: dict, root: Path, build_dir: Path, token_from: Optional[str],
            say: Printer) -> int:
    version, repo_id = cfg["version"], args.repo_id
    if not repo_id:
        raise Refusal("no repository: set [general.hub] repo-id in build.toml or pass --repo-id")
    say(f"flash-sparse-attn v{version} -> {repo_id} (kernel repository), branch v{version}"
        + ("  [dry run: nothing is sent]" if args.dry_run else ""))
    problems: list[str] = []
    rev, dirty = git_state(root)
    if dirty:
        shown = "\n    ".join(dirty[:20]) + ("\n    ..." if len(dirty) > 20 else "")
        problems.append(f"the git tree at {root} is dirty (commit or remove first):\n    {shown}")
    say(f"source: {root} at {rev[:12]}" + (" (dirty)" if dirty else " (clean)"))
    if token_from:
        say(f"token: from {token_from} (not shown)")
    else:
        msg = "token: none found (set HF_TOKEN or run `hf auth login`)"
        if args.dry_run:
            say(msg + "; a real upload would refuse")
        else:
            problems.append(msg)
    if problems:
        raise Refusal("\n".join(problems))

    tmp = None
    try:
        if args.no_build:
            variants = check_build(build_dir, cfg)
            check_build_matches_sources(variants, root)
            card_path = build_dir / "CARD.md"
            if not card_path.is_file():
                raise Refusal(f"{card_path}: missing (run scripts/card.py or drop --no-build)")
            try:
                current_card = cardmod.make_card(root)
            except cardmod.CardError as e:
                raise Refusal(str(e))
            if card_path.read_text() != current_card:
                raise Refusal(f"{card_path} is out of date with README.md/build.toml (run "
                              "scripts/card.py or drop --no-build)")
            where = f"{build_dir} (as it is; matches the sources)"
        else:
            # a dry run leaves build/ alone: the build is deterministic, so a temporary one
            # holds exactly the files a real run would push
            out = Path(tempfile.mkdtemp(prefix="fsa-upload-")) / "build" if args.dry_run \
                else build_dir
            tmp = out.parent if args.dry_run else None
            buildmod.build(out, root=root, quiet=True)
            try:
                card_path = cardmod.write_card(root, out / "CARD.md")
            except cardmod.CardError as e:
                raise Refusal(str(e))
            variants = check_build(out, cfg)
            where = f"{out} (fresh build)"
        say(f"build: {where}: {', '.join(variants)}; version {version}; digests match")
        plan = Plan(repo_id=repo_id, version=version, branch=f"v{version}", source_rev=rev,
                    adds=plan_files(variants, root), card=card_path)
        read_remote(api, plan, args.dry_run)
        state = ("unknown" if plan.repo_exists is None else
                 f"repository {'exists' if plan.repo_exists else 'does not exist'}, branch "
                 f"{plan.branch} {'exists' if plan.branch_exists else 'does not exist'}")
        say(f"hub: {state}")
        print_plan(plan, say)
        if args.dry_run:
            say("dry run: nothing was sent")
            return 0
        commit_url, card_url = execute(api, plan, say)
        say(f"commit: {commit_url}")
        if not args.no_verify:
            args.cache, args.from_build = None, False
            verify(api, args, cfg, root, build_dir, say)
        return 0
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
