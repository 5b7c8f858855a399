#!/usr/bin/env python3
"""Write the Hub card `build/CARD.md` from README.md and build.toml.

`scripts/upload.py` pushes the card to the `main` branch of the Hub repository as README.md
(the kernel's page); `scripts/build.py` may call `write_card()` so that every build carries it.
The card is a pure function of README.md and build.toml:
- YAML front matter (license, `library_name: kernels`, tags);
- what it is: the README's first paragraph;
- the README sections whose headings name `get_kernel` (loading, required), `transformers`
  (optional), `API` (required), `Feature status` (optional) and `Benchmarks` (required), copied
  as they are (headings demoted/kept at level 2);
- supported GPUs: a table from build.toml's backends and architectures.

    python scripts/card.py                  # -> build/CARD.md
    python scripts/card.py --out /tmp/CARD.md
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None

ROOT = Path(__file__).resolve().parents[1]

# (heading keyword, required); matched case-insensitively against the README's `## ` headings
SECTIONS = (
    ("get_kernel", True),
    ("transformers", False),
    ("API", True),
    ("Feature status", False),
    ("Benchmarks", True),
)

# What each declared architecture covers. CUDA: kernels admits capability x.z for z >= y of a
# declared x.y, so 8.0 covers 8.6/8.9 too.
CUDA_GPUS = {
    "7.0": "V100 (Volta)",
    "7.5": "T4, RTX 20xx (Turing)",
    "8.0": "A100, A30 (Ampere); also 8.6/8.9: A10, A40, L4, L40S, RTX 30xx/40xx",
    "8.6": "A10, A40, RTX 30xx (Ampere); also 8.9: L4, L40S, RTX 40xx",
    "8.9": "L4, L40S, RTX 40xx (Ada)",
    "9.0": "H100, H200, GH200 (Hopper)",
    "10.0": "B200, GB200 (Blackwell)",
    "12.0": "RTX 50xx, RTX PRO 6000 Blackwell",
}
ROCM_GPUS = {
    "gfx90a": "Instinct MI210, MI250, MI250X (CDNA 2)",
    "gfx942": "Instinct MI300X, MI300A, MI325X (CDNA 3)",
    "gfx950": "Instinct MI350X, MI355X (CDNA 4)",
}


class CardError(Exception):
    """The README lacks what the card needs."""


def _read_toml(path: Path) -> dict:
    if tomllib is not None:
        with open(path, "rb") as f:
            return tomllib.load(f)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from build import _read_toml as read  # scripts/build.py reads TOML without tomllib

    return read(path)


def split_sections(readme: str) -> tuple[str, list[tuple[str, str]]]:
    """(text before the first `## ` heading, [(heading, body)]) outside code fences."""
    head: list[str] = []
    sections: list[tuple[str, list[str]]] = []
    fenced = False
    for line in readme.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        if not fenced and line.startswith("## "):
            sections.append((line[3:].strip(), []))
            continue
        (sections[-1][1] if sections else head).append(line)
    return "\n".join(head), [(h, "\n".join(b).strip("\n")) for h, b in sections]


def first_paragraph(head: str) -> str:
    """The first paragraph after the `# title` line."""
    lines = [ln for ln in head.splitlines() if not ln.startswith("# ")]
    text = "\n".join(lines).strip()
    return text.split("\n\n")[0].strip()


def _find(sections, keyword: str):
    key = keyword.lower()
    for heading, body in sections:
        if key in heading.lower().replace("`", ""):
            return heading, body
    return None


def gpu_table(toml: dict) -> str:
    general = toml["general"]
    noarch = toml.get("torch-noarch", {})
    rows = ["| backend (variant) | architectures declared | GPUs |", "|---|---|---|"]
    for backend in general["backends"]:
        variant = f"`torch-{backend}`"
        if backend == "cuda":
            caps = noarch.get("cuda_capabilities") or []
            for cap in caps:
                rows.append(f"| CUDA {variant} | sm {cap} | {CUDA_GPUS.get(cap, 'compute capability ' + cap)} |")
        elif backend == "rocm":
            for arch in noarch.get("rocm_archs") or []:
                rows.append(f"| ROCm {variant} | {arch} | {ROCM_GPUS.get(arch, arch)} |")
        elif backend == "xpu":
            rows.append(f"| XPU {variant} | (Triton XPU) | Intel Data Center GPU Max, Arc (untested) |")
        elif backend == "cpu":
            rows.append(f"| CPU {variant} | any | no GPU: the plain PyTorch reference path of the ops |")
        else:
            rows.append(f"| {backend} {variant} | | |")
    return "\n".join(rows)


def make_card(root: Path = ROOT) -> str:
    """The card's text (Markdown with YAML front matter)."""
    readme = (root / "README.md").read_text()
    toml = _read_toml(root / "build.toml")
    general = toml["general"]
    repo_id = general.get("hub", {}).get("repo-id", f"<org>/{general['name']}")
    head, sections = split_sections(readme)
    intro = first_paragraph(head)
    if not intro:
        raise CardError("README.md: no introductory paragraph under the `# title`")
    found, missing = [], []
    for keyword, required in SECTIONS:
        hit = _find(sections, keyword)
        if hit is None:
            if required:
                missing.append(keyword)
            continue
        found.append(hit)
    if missing:
        raise CardError("README.md lacks the sections the card needs: "
                        + ", ".join(f"a `## ` heading containing {k!r}" for k in missing))
    license_id = str(general.get("license", "other")).lower()
    parts = [
        "---",
        f"license: {license_id}",
        "library_name: kernels",
        "tags:",
        "- kernels",
        "- attention",
        "- sparse-attention",
        "- triton",
        "---",
        "",
        f"# {general['name']}",
        "",
        "<!-- Generated by scripts/card.py from README.md and build.toml; edit those instead. -->",
        "",
        intro,
        "",
        f"Version {general['version']} is on branch `v{general['version']}` of "
        f"[`{repo_id}`](https://huggingface.co/kernels/{repo_id}).",
        "",
    ]
    for heading, body in found:
        parts += [f"## {heading}", "", body, ""]
        if "get_kernel" in heading.replace("`", ""):
            parts += ["## Supported GPUs", "", gpu_table(toml), ""]
    text = "\n".join(parts).rstrip("\n") + "\n"
    return re.sub(r"\n{3,}", "\n\n", text)


def write_card(root: Path = ROOT, out: Path | None = None) -> Path:
    """Write the card to `out` (default `<root>/build/CARD.md`); returns its path."""
    out = root / "build" / "CARD.md" if out is None else out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(make_card(root))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, default=ROOT, help="repository root (default: this one)")
    ap.add_argument("--out", type=Path, default=None, help="output file (default: ROOT/build/CARD.md)")
    args = ap.parse_args(argv)
    try:
        path = write_card(args.root.resolve(), args.out)
    except CardError as e:
        print(f"card.py: {e}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
