#!/usr/bin/env bash
# The tests, exactly as the README runs them:  TRITON_INTERPRET=1 python -m pytest tests -q
# (extra arguments go to pytest). Fails on any failure, and also when pytest collected no test
# (its exit code 5) or the run passed none.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

log="$(mktemp "${TMPDIR:-/tmp}/fsa-pytest.XXXXXX")"
trap 'rm -f "$log"' EXIT

TRITON_INTERPRET=1 python -m pytest tests -q "$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}

if [ "$rc" -eq 5 ]; then
    echo "scripts/test.sh: pytest collected no tests" >&2
    exit 1
fi
if [ "$rc" -eq 0 ] && ! tail -n 1 "$log" | grep -Eq '[0-9]+ passed'; then
    echo "scripts/test.sh: no test passed" >&2
    exit 1
fi
exit "$rc"
