# Shared set-up for scripts/run.sh and scripts/test.sh. Sourced, not run.
# Creates ./.venv with a Python 3.11+ interpreter and installs the project into it; on
# Debian, installs the system packages it needs when run as root (CI runs as root).

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"

if [ -t 2 ]; then
    say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
else
    say() { printf '==> %s\n' "$*" >&2; }
fi
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

is_root() { [ "$(id -u)" = 0 ]; }

apt_updated=0
apt_install() {
    # Installs Debian packages as root; elsewhere says which ones are missing and why.
    if ! command -v apt-get >/dev/null 2>&1; then
        say "cannot install $* (no apt-get here): install them yourself"
        return 1
    fi
    if ! is_root; then
        say "missing Debian packages: $* (run: sudo apt-get install -y $*)"
        return 1
    fi
    if [ "$apt_updated" = 0 ]; then
        say "apt-get update"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq -o DPkg::Lock::Timeout=600 >&2
        apt_updated=1
    fi
    say "apt-get install $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        -o DPkg::Lock::Timeout=600 "$@" >&2
}

find_python() {
    for candidate in "${PYTHON:-}" python3 python3.13 python3.12 python3.11; do
        [ -n "$candidate" ] || continue
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            command -v "$candidate"
            return 0
        fi
    done
    return 1
}

ensure_python() {
    PY="$(find_python)" || {
        apt_install python3 python3-venv || die "Python 3.11+ is needed (apt-get install python3 python3-venv)"
        PY="$(find_python)" || die "Python 3.11+ is needed; found none on PATH"
    }
    # Debian splits venv/ensurepip into python3-venv.
    if ! "$PY" -c 'import venv, ensurepip' 2>/dev/null; then
        apt_install python3-venv || die "the venv module is missing (apt-get install python3-venv)"
    fi
}

# The native fan-out core (sfu/media/_fastpath.c) is compiled by the package's own build:
# it needs a C compiler and the interpreter's headers. Without them the install still works
# and the SFU forwards in pure Python (rtc.fastpath: auto warns once at start).
ensure_build_tools() {
    local headers
    headers="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h"
    if command -v cc >/dev/null 2>&1 && [ -f "$headers" ]; then
        return 0
    fi
    apt_install gcc libc6-dev python3-dev ||
        say "no C compiler or Python headers: the native fast path will not be built"
}

# ensure_venv EXTRAS: create .venv if needed and install the project with those extras
# (e.g. "test"); skipped when pyproject.toml and the extras are unchanged since last time.
ensure_venv() {
    local extras="$1" spec stamp hash want
    ensure_python
    if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import sys' 2>/dev/null; then
        say "creating $VENV with $("$PY" --version)"
        rm -rf "$VENV"
        "$PY" -m venv "$VENV"
    fi
    spec="$ROOT"
    [ -n "$extras" ] && spec="$ROOT[$extras]"
    # One line per extras set installed for this pyproject.toml: installing fewer extras
    # removes nothing, so `run` after `test` (or the reverse) needs no reinstall.
    stamp="$VENV/.blindfold-installed"
    # The build inputs: a changed C file or setup.py rebuilds the extension in place.
    hash="$(cat "$ROOT/pyproject.toml" "$ROOT/setup.py" "$ROOT/sfu/media/_fastpath.c" |
        sha256sum | cut -d' ' -f1)"
    want="$hash ${extras:-base}"
    if ! compgen -G "$ROOT/sfu/media/_fastpath*.so" >/dev/null; then
        ensure_build_tools
        rm -f "$stamp"  # e.g. after `git clean`: build it again
    fi
    if ! grep -qxF "$want" "$stamp" 2>/dev/null; then
        say "installing blindfold-sfu${extras:+[$extras]} into .venv"
        "$VENV/bin/python" -m pip install --disable-pip-version-check -q -e "$spec" >&2
        { grep -F "$hash " "$stamp" 2>/dev/null || true; echo "$want"; } > "$stamp.new"
        mv "$stamp.new" "$stamp"
    fi
    export PATH="$VENV/bin:$PATH"
}
