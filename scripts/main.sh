#!/usr/bin/env bash
# The main job: install what requirements-ci.txt lists into .venv (once), build the Hub bundle
# (build/torch-*/), load it with kernels.get_kernel and run attention on the GPU, or else the CPU
# (scripts/demo.py; extra arguments go to it).
# PYTHON=/path/to/python uses that interpreter instead of .venv (it needs torch, triton, kernels).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ -n "${PYTHON:-}" ]; then
    py="$PYTHON"
else
    venv=.venv
    if ! cmp -s requirements-ci.txt "$venv/requirements-ci.txt"; then
        echo "== installing requirements-ci.txt into $venv"
        python3 -m venv "$venv"
        "$venv/bin/python" -m pip install -qq --disable-pip-version-check -r requirements-ci.txt
        cp requirements-ci.txt "$venv/requirements-ci.txt"
    fi
    py="$venv/bin/python"
fi

echo "== build"
"$py" scripts/build.py --quiet
echo "== demo"
"$py" scripts/demo.py "$@"
