#!/usr/bin/env bash
# Set everything up and run the whole test suite: lint, format, types, Dockerfile lint,
# then pytest. Extra arguments go to pytest, e.g. scripts/test.sh -k config -x
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
ensure_venv "test"

# System tools the tests use. promtool comes with Debian's prometheus package.
command -v promtool >/dev/null 2>&1 || apt_install prometheus ||
    say "promtool missing: its test will be skipped (and fails under CI=true)"

cd "$ROOT"
failed=()
gate() {
    say "$*"
    "$@" || failed+=("$*")
}
gate ruff check .
gate ruff format --check .
gate mypy sfu
gate hadolint Dockerfile
say "pytest"
status=0
pytest "$@" || status=$?
if [ "${#failed[@]}" -gt 0 ]; then
    printf 'quality gates failed: %s\n' "${failed[@]}" >&2
    exit 1
fi
exit "$status"
