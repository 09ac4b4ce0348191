#!/usr/bin/env bash
# Set everything up and run the whole test suite: lint, format, types, Dockerfile lint,
# then pytest. Extra arguments go to pytest, e.g. scripts/test.sh -k config -x
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
ensure_venv "test,bench"

# System tools the tests use. promtool comes with Debian's prometheus package.
command -v promtool >/dev/null 2>&1 || apt_install prometheus ||
    say "promtool missing: its test will be skipped (and fails under CI=true)"
# The image test (tests/deploy/test_image.py) builds and runs the Dockerfile with podman
# (no Docker engine needed) from a base image made by debootstrap.
for cmd in podman buildah runc debootstrap; do
    command -v "$cmd" >/dev/null 2>&1 && continue
    apt_install podman buildah runc uidmap slirp4netns fuse-overlayfs catatonit debootstrap ||
        say "podman/debootstrap missing: the image test will be skipped (and fails under CI=true)"
    break
done

# The loss test (tests/netns) drops UDP with iptables' statistic match inside a network
# namespace it creates with `ip netns`; this kernel has no netem (docs/testing.md). The
# simulcast browser test rate-limits a veth between two namespaces with `tc` (iproute2).
for cmd in ip tc iptables; do
    command -v "$cmd" >/dev/null 2>&1 && continue
    apt_install iproute2 iptables ||
        say "ip/tc/iptables missing: the loss and simulcast tests will be skipped (and fail under CI=true)"
    break
done

# The cluster tests (tests/cluster) coordinate nodes through a real Redis.
command -v redis-server >/dev/null 2>&1 || apt_install redis-server ||
    say "redis-server missing: the cluster tests will be skipped (and fail under CI=true)"

# The browser client's JavaScript is tested with Node's own runner (node:test, WebCrypto),
# and the real-browser tests drive Debian's Chromium through Playwright (never its own
# browser download: `playwright install` cannot work here).
command -v node >/dev/null 2>&1 || apt_install nodejs ||
    say "node missing: the JavaScript tests cannot run"
command -v chromium >/dev/null 2>&1 || apt_install chromium ||
    say "chromium missing: the browser tests will be skipped (and fail under CI=true)"

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
gate node --test tests/js/
say "pytest"
status=0
pytest "$@" || status=$?
if [ "${#failed[@]}" -gt 0 ]; then
    printf 'quality gates failed: %s\n' "${failed[@]}" >&2
    exit 1
fi
exit "$status"
